//! The node's local index as a command: bring it up to date, or delete and rebuild it from
//! index segments and — for packs no readable segment names — from pack trailers.

use crate::error::{Error, Result, ResultExt};
use crate::index::RocksIndex;
use crate::lock::{self, Hold};
use mover_format::local_index::{self, RebuildReport, SyncReport};
use mover_format::Repository;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Ingests the index segments the local index under `cache_root` has not seen: those
/// added since its last sync, or every segment when a gc has deleted some since
/// (`local_index::sync_at`).
pub async fn sync(repo: &Repository, cache_root: &Path, cancel: &CancellationToken) -> Result<(PathBuf, SyncReport)> {
    let path = RocksIndex::path_for(cache_root, &repo.config().id);
    let idx = RocksIndex::open(&path)?;
    let generation = repo.list_gc(cancel).await?.generation();
    let r = crate::index::sync(repo, &idx, &generation, None, cancel).await?;
    Ok((path, r))
}

/// Deletes the local index and rebuilds it; writes index segments for packs no segment
/// names. Holds the exclusive `gc` lock: gc would delete those packs as unindexed.
pub async fn rebuild(repo: &Repository, cache_root: &Path, cancel: &CancellationToken) -> Result<(PathBuf, RebuildReport)> {
    let path = RocksIndex::path_for(cache_root, &repo.config().id);
    // The lock first, then the index: nothing is deleted while another process (a running
    // daemon) has the database open — RocksDB's own lock refuses the open then.
    let r = lock::scope(repo, Hold::Exclusive("rebuild the index"), cancel, |_held| async {
        if path.exists() {
            if held_elsewhere(&path.join("LOCK")) {
                return Err(Error::precondition(format!(
                    "local index {} is in use by another process (a running daemon or backup?); stop it first; nothing was deleted",
                    path.display()
                )));
            }
            std::fs::remove_dir_all(&path).with_context(|| format!("deleting local index {}", path.display()))?;
        }
        let idx = RocksIndex::open(&path)?;
        local_index::rebuild_from_packs(repo, &idx, true, cancel).await.map_err(Error::from)
    })
    .await;
    Ok((path, r?))
}

/// Whether another process holds RocksDB's lock on `lock` (a POSIX record lock, which
/// RocksDB takes with `fcntl(F_SETLK)`); asked with `F_GETLK`, which takes nothing.
fn held_elsewhere(lock: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).open(lock) else { return false };
    // SAFETY: a zeroed `flock` is a valid value of the plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as _;
    fl.l_whence = libc::SEEK_SET as _;
    // SAFETY: F_GETLK on a descriptor we own, with a pointer to a live `flock`.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    r == 0 && i32::from(fl.l_type) != libc::F_UNLCK
}
