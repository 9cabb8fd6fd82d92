//! Mover's repository format: objects, ids, keys, the chunker, packs, index segments, tree
//! blobs, manifests, and the storage trait with its local-directory backend.
//!
//! This crate is pure: no gRPC, io_uring, metrics or RocksDB (see `docs/design.md`).
#![forbid(unsafe_code)]

pub mod blob;
pub mod bytes_io;
pub mod chunker;
pub mod config;
pub mod crypto;
pub mod error;
pub mod file_formats;
pub mod id;
pub mod index;
pub mod journal;
pub mod local_index;
pub mod lock;
pub mod manifest;
pub mod names;
pub mod pack;
pub mod pending;
pub mod quarantine;
pub mod repo;
pub mod retry;
pub mod storage;
pub mod tree;

pub use error::{FormatError, RepoError};
pub use id::{ChunkId, IndexId, KeyId, PackId, RepoId, SegmentDigest, SnapshotId};
pub use repo::{InitOptions, Repository};
pub use tokio_util::sync::CancellationToken;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// Milliseconds since the Unix epoch: the time Mover stamps on snapshots, reports and locks
/// and judges retention by.
///
/// For the fleet benchmark only (`benches/fleet.py`), which plays months of daily backups in
/// an hour: with `MOVER_CLOCK_OFFSET_FILE` set, the number of seconds in that file is added
/// (read at every call; a missing or unreadable file adds nothing). Every process of one
/// repository must then see the same file, and the offset may only move while no process
/// holds a lock (a jump ages every lock by as much). Nothing else reads it: the store's
/// request signatures keep the real clock.
pub fn now_unix_ms() -> u64 {
    let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    real.saturating_add(clock_offset_s().saturating_mul(1000))
}

fn clock_offset_s() -> u64 {
    static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let Some(path) = FILE.get_or_init(|| std::env::var_os("MOVER_CLOCK_OFFSET_FILE").map(Into::into)) else { return 0 };
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// This machine's host name, or `unknown`.
pub fn hostname() -> String {
    hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

/// This boot of this machine (`/proc/sys/kernel/random/boot_id`); empty where unknown.
/// Containers on one node share it; a reboot changes it.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// This process's PID namespace (`pid:[4026531836]`); empty where unknown. Process ids
/// mean something only within one namespace: containers on one node have their own.
pub fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default()
}
