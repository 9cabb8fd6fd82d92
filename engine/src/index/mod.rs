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
/// segments since (`docs/gc.md`, "Index sync"). The overlap is the lock TTL. With
/// `reuse_listed_after_ms` ([`reuse_for_backup`]), a listing begun after that time is
/// not repeated.
pub async fn sync(
    repo: &Repository,
    index: &dyn ChunkIndex,
    generation: &str,
    reuse_listed_after_ms: Option<u64>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<mover_format::local_index::SyncReport, mover_format::RepoError> {
    let overlap_ms = crate::lock::default_ttl().as_millis() as u64;
    let inc = mover_format::local_index::Incremental { generation, overlap_ms, reuse_listed_after_ms };
    mover_format::local_index::sync_at(repo, index, Some(inc), cancel).await
}

/// How long a backup may deduplicate against the node's last listing of the index
/// segments instead of listing again: `MOVER_INDEX_SYNC_INTERVAL` seconds, 60 by default
/// (0: list before every backup).
pub fn sync_interval() -> std::time::Duration {
    std::time::Duration::from_secs(std::env::var("MOVER_INDEX_SYNC_INTERVAL").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(60))
}

/// The oldest listing a backup with `parent` can use (`docs/gc.md`, "Index sync"): one
/// begun less than [`sync_interval`] ago — dedup against it misses at most what other
/// nodes added since, which costs a chunk stored twice, never a wrong result — and after
/// the parent's manifest was written (the parent's tree is read through the index), by
/// the writer's clock plus one lock TTL. `None`: list (a copied parent's time is its
/// origin's, not when it was written here).
pub fn reuse_for_backup(parent: Option<&mover_format::manifest::Manifest>) -> Option<u64> {
    let window = sync_interval().as_millis() as u64;
    if window == 0 {
        return None;
    }
    let mut after = mover_format::now_unix_ms().saturating_sub(window);
    if let Some(m) = parent {
        if m.origin.is_some() {
            return None;
        }
        let written = m.time_unix_ms.saturating_add(m.duration_ms).saturating_add(crate::lock::default_ttl().as_millis() as u64);
        after = after.max(written);
    }
    Some(after)
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
