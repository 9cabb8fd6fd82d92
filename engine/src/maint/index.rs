//! The node's local index as a command: bring it up to date, or delete and rebuild it from
//! index segments and — for packs no readable segment names — from pack trailers.

use crate::error::{Error, Result, ResultExt};
use crate::index::RocksIndex;
use crate::lock::RepoLock;
use mover_format::local_index::{self, RebuildReport, SyncReport};
use mover_format::Repository;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Ingests the index segments the local index under `cache_root` has not seen.
pub async fn sync(repo: &Repository, cache_root: &Path, cancel: &CancellationToken) -> Result<(PathBuf, SyncReport)> {
    let path = RocksIndex::path_for(cache_root, &repo.config().id);
    let idx = RocksIndex::open(&path)?;
    let r = local_index::sync(repo, &idx, cancel).await?;
    Ok((path, r))
}

/// Deletes the local index and rebuilds it; writes index segments for packs no segment
/// names. Holds the exclusive `gc` lock: gc would delete those packs as unindexed.
pub async fn rebuild(repo: &Repository, cache_root: &Path, cancel: &CancellationToken) -> Result<(PathBuf, RebuildReport)> {
    let path = RocksIndex::path_for(cache_root, &repo.config().id);
    if path.exists() {
        std::fs::remove_dir_all(&path).with_context(|| format!("deleting local index {}", path.display()))?;
    }
    let idx = RocksIndex::open(&path)?;
    let lock = RepoLock::acquire_exclusive(repo, "rebuild the index", cancel).await?;
    let r = local_index::rebuild_from_packs(repo, &idx, true, cancel).await;
    lock.release().await;
    Ok((path, r.map_err(Error::from)?))
}
