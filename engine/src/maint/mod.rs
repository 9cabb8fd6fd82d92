//! Repository maintenance, side by side: [`check`] and [`stats`] read; [`forget`] and [`gc`]
//! remove (gc is the one operation that deletes data; see `docs/gc.md`); [`index`] syncs
//! or rebuilds the node's local index; [`keys`] manages passwords.

pub mod check;
pub mod drill;
pub mod forget;
pub mod gc;
mod gc_work;
pub mod index;
pub mod keys;
pub mod report;
pub mod stats;
