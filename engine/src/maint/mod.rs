//! Repository maintenance, side by side: [`check`] and [`stats`] read; [`forget`] and [`gc`]
//! remove (gc is the one operation that deletes data; see `docs/gc.md`); [`index`] syncs
//! or rebuilds the node's local index; [`keys`] manages passwords; [`repair`] heals damaged
//! blobs from a second repository or a source and reports what stays lost; [`protect`]
//! keeps snapshots from `forget`; [`journal`] reads the tamper-evident record of added and
//! forgotten snapshots for `check`.

pub mod check;
pub mod drill;
pub mod forget;
pub mod gc;
mod gc_work;
pub mod index;
pub mod journal;
pub mod keys;
pub mod protect;
pub mod repair;
pub mod report;
pub mod stats;
