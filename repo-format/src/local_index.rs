//! The local index: a per-node cache of the union of all index segments, so dedup lookups
//! never touch the store. The trait lives here so the format crate stays free of RocksDB;
//! the daemon implements it with RocksDB (`mover::index_cache`), [`MemIndex`] serves tests
//! and small tools. The cache can be deleted at any time: [`sync`] rebuilds it from
//! `index/`, [`rebuild_from_packs`] from pack trailers when segments are missing.

use crate::error::RepoError;
use crate::id::{ChunkId, IndexId, PackId};
use crate::index::{BlobLocation, IndexEntry};
use crate::repo::Repository;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub trait ChunkIndex: Send + Sync {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError>;
    /// Records entries; when `segment` is given, marks that segment ingested in the same
    /// atomic write.
    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError>;
    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError>;
    fn entry_count(&self) -> Result<u64, RepoError>;
}

/// An in-memory [`ChunkIndex`].
#[derive(Default)]
pub struct MemIndex {
    entries: Mutex<HashMap<ChunkId, BlobLocation>>,
    segments: Mutex<HashSet<IndexId>>,
}

fn poisoned() -> RepoError {
    RepoError::Index { path: "memory".into(), message: "lock poisoned".into() }
}

impl ChunkIndex for MemIndex {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError> {
        Ok(self.entries.lock().map_err(|_| poisoned())?.get(id).copied())
    }
    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError> {
        let mut m = self.entries.lock().map_err(|_| poisoned())?;
        for e in entries {
            m.insert(e.id, e.loc);
        }
        if let Some(s) = segment {
            self.segments.lock().map_err(|_| poisoned())?.insert(*s);
        }
        Ok(())
    }
    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError> {
        Ok(self.segments.lock().map_err(|_| poisoned())?.clone())
    }
    fn entry_count(&self) -> Result<u64, RepoError> {
        Ok(self.entries.lock().map_err(|_| poisoned())?.len() as u64)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub segments_total: usize,
    pub segments_ingested: usize,
    pub entries_ingested: usize,
}

/// Ingests every index segment in the store that the cache has not seen.
pub async fn sync(repo: &Repository, index: &dyn ChunkIndex, cancel: &CancellationToken) -> Result<SyncReport, RepoError> {
    let have = index.ingested_segments()?;
    let all = repo.list_index(cancel).await?;
    let mut rep = SyncReport { segments_total: all.len(), ..Default::default() };
    for id in all.iter().filter(|id| !have.contains(id)) {
        let entries = repo.read_index(id, cancel).await?;
        index.ingest(Some(id), &entries)?;
        rep.segments_ingested += 1;
        rep.entries_ingested += entries.len();
    }
    Ok(rep)
}

#[derive(Debug, Default, Clone)]
pub struct RebuildReport {
    pub segments_read: usize,
    /// Index segments that could not be read, with the reason.
    pub segments_unreadable: Vec<String>,
    pub packs_total: usize,
    /// Packs no readable index segment names, indexed from their trailers.
    pub packs_from_trailers: usize,
    /// Packs whose trailer could not be read, with the reason.
    pub packs_unreadable: Vec<String>,
    pub entries: usize,
    /// New index segments written for the packs found unindexed.
    pub segments_written: Vec<IndexId>,
}

/// Rebuilds the cache from index segments, and from pack trailers for every pack that no
/// readable segment names. With `write_segments`, also writes index segments for those
/// packs, so other nodes and later syncs find them.
pub async fn rebuild_from_packs(
    repo: &Repository,
    index: &dyn ChunkIndex,
    write_segments: bool,
    cancel: &CancellationToken,
) -> Result<RebuildReport, RepoError> {
    let mut rep = RebuildReport::default();
    let mut covered: HashSet<PackId> = HashSet::new();
    for id in repo.list_index(cancel).await? {
        match repo.read_index(&id, cancel).await {
            Ok(entries) => {
                covered.extend(entries.iter().map(|e| e.loc.pack));
                index.ingest(Some(&id), &entries)?;
                rep.segments_read += 1;
                rep.entries += entries.len();
            }
            Err(e) if e.is_cancelled() => return Err(e),
            Err(e) => rep.segments_unreadable.push(format!("{e:#}")),
        }
    }
    let packs = repo.list_packs(cancel).await?;
    rep.packs_total = packs.len();
    let mut pending: Vec<IndexEntry> = Vec::new();
    for (pack, _size) in packs.iter().filter(|(p, _)| !covered.contains(p)) {
        match repo.read_pack_trailer(pack, cancel).await {
            Ok(t) => {
                let entries: Vec<IndexEntry> = t.iter().map(|e| IndexEntry::from_pack(*pack, e)).collect();
                rep.packs_from_trailers += 1;
                rep.entries += entries.len();
                pending.extend(entries);
            }
            Err(e) if e.is_cancelled() => return Err(e),
            Err(e) => rep.packs_unreadable.push(format!("{e:#}")),
        }
        if pending.len() >= 50_000 {
            flush(repo, index, write_segments, &mut pending, &mut rep, cancel).await?;
        }
    }
    flush(repo, index, write_segments, &mut pending, &mut rep, cancel).await?;
    Ok(rep)
}

async fn flush(
    repo: &Repository,
    index: &dyn ChunkIndex,
    write: bool,
    pending: &mut Vec<IndexEntry>,
    rep: &mut RebuildReport,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    if pending.is_empty() {
        return Ok(());
    }
    if write {
        let id = repo.write_index(pending, cancel).await?;
        index.ingest(Some(&id), pending)?;
        rep.segments_written.push(id);
    } else {
        index.ingest(None, pending)?;
    }
    pending.clear();
    Ok(())
}
