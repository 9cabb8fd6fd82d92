//! Mover's engine: what happens to the bytes once a request has been validated.
//!
//! - [`pipeline`] — backup (read → chunk + hash + dedup → compress + encrypt → pack →
//!   upload → commit) and restore (fetch → verify → write), one file per stage.
//! - [`source`] — what the backup pipeline reads: an opened descriptor or a block reader,
//!   and what a change source said about it.
//! - [`index`] — the node's local index (RocksDB, or memory) and the read view that also
//!   sees entries gc has taken out but not swept.
//! - [`maint`] — repository maintenance side by side: check, stats, forget, gc, index
//!   rebuild, keys.
//! - [`lock`] — leases on a repository (what gc waits for).
//! - [`snapshots`] — snapshot groups, `latest`, and reading a snapshot's tree.
//! - [`error`] — the one error type, with a kind that says whether to retry.
//!
//! The engine knows no gRPC, no Prometheus and no command line: the `mover` crate builds
//! requests into plans and renders results; the engine runs them.

pub mod aligned;
pub mod device;
pub mod error;
pub mod export;
pub mod index;
pub mod lock;
pub mod maint;
pub mod ops;
pub mod pipeline;
pub mod progress;
pub mod ratelimit;
pub mod snapshots;
pub mod source;
pub mod timeutil;
pub mod walk;

pub use error::{Error, ErrorKind, Result, ResultExt};
