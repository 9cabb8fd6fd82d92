//! The node's local index: a cache of every index segment, so dedup lookups never touch the
//! store. [`rocks`] keeps it in RocksDB; [`pending`] adds, for reading snapshots, the
//! entries gc has taken out of the index but not swept yet; [`quarantine`] keeps damaged
//! locations out of dedup and behind healed copies.

pub mod pending;
pub mod quarantine;
pub mod rocks;

use mover_format::local_index::{ChunkIndex, MemIndex};
use mover_format::Repository;
use std::path::Path;
use std::sync::Arc;

pub(crate) use pending::{reading, with_pending};

/// Syncs `index`, listing only what was added since its last sync unless `generation`
/// (the newest gc generation marker, listed after the caller's lock) says a gc deleted
/// segments since (`docs/gc.md`, "Index sync"). The overlap is the lock TTL.
pub async fn sync(
    repo: &Repository,
    index: &dyn ChunkIndex,
    generation: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<mover_format::local_index::SyncReport, mover_format::RepoError> {
    let overlap_ms = crate::lock::default_ttl().as_millis() as u64;
    mover_format::local_index::sync_at(repo, index, Some((generation, overlap_ms)), cancel).await
}
pub use quarantine::{Quarantined, Screen};
pub use rocks::RocksIndex;

/// Where a node keeps copies of a repository's snapshot manifests, beside its local index
/// ([`Repository::cache_manifests_in`]).
pub fn manifest_cache_dir(cache_root: &Path, repo: &Repository) -> std::path::PathBuf {
    cache_root.join(repo.config().id.to_hex()).join("snapshots-v1")
}

/// The local index of `repo` under `cache_root`: RocksDB, or — when another process holds
/// the database — an in-memory index for this run (it is a cache: correct, only slower to
/// fill). Not synced here: backups and [`with_pending`] sync it in the order the gc
/// protocol needs.
pub fn open_local(repo: &Repository, cache_root: &Path) -> Arc<dyn ChunkIndex> {
    let path = RocksIndex::path_for(cache_root, &repo.config().id);
    match RocksIndex::open(&path) {
        Ok(i) => Arc::new(i),
        Err(e) => {
            tracing::warn!("{e:#}; using an in-memory index for repository {} in this run", repo.location());
            Arc::new(MemIndex::default())
        }
    }
}
