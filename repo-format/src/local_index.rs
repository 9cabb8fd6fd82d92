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

/// A local index holds one active *generation* of entries. Lookups and [`ChunkIndex::ingest`]
/// use the active one. When `gc` has removed index segments, [`sync`] builds a new
/// generation from the segments that remain and then activates it, so entries of deleted
/// segments disappear without a moment in which lookups see an empty index.
pub trait ChunkIndex: Send + Sync {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError>;
    /// Records entries in the active generation; when `segment` is given, marks that segment
    /// ingested in the same atomic write.
    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError> {
        self.ingest_into(self.active_generation()?, segment, entries)
    }
    /// The segments ingested into the active generation.
    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError>;
    fn entry_count(&self) -> Result<u64, RepoError>;
    fn active_generation(&self) -> Result<u64, RepoError>;
    /// A new, empty generation next to the active one.
    fn begin_generation(&self) -> Result<u64, RepoError>;
    fn ingest_into(&self, generation: u64, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError>;
    /// Makes `generation` active and drops every older one. A generation older than the
    /// active one is dropped instead (two syncs rebuilt at once; the newer wins).
    fn activate(&self, generation: u64) -> Result<(), RepoError>;
}

#[derive(Default)]
struct MemGeneration {
    entries: HashMap<ChunkId, BlobLocation>,
    segments: HashSet<IndexId>,
}

/// An in-memory [`ChunkIndex`].
#[derive(Default)]
pub struct MemIndex {
    inner: Mutex<MemInner>,
}

#[derive(Default)]
struct MemInner {
    active: u64,
    next: u64,
    gens: HashMap<u64, MemGeneration>,
}

fn poisoned() -> RepoError {
    RepoError::Index { path: "memory".into(), message: "lock poisoned".into() }
}

impl MemIndex {
    fn with<T>(&self, f: impl FnOnce(&mut MemInner) -> T) -> Result<T, RepoError> {
        Ok(f(&mut *self.inner.lock().map_err(|_| poisoned())?))
    }
}

impl ChunkIndex for MemIndex {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError> {
        self.with(|m| m.gens.get(&m.active).and_then(|g| g.entries.get(id).copied()))
    }
    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError> {
        self.with(|m| m.gens.get(&m.active).map(|g| g.segments.clone()).unwrap_or_default())
    }
    fn entry_count(&self) -> Result<u64, RepoError> {
        self.with(|m| m.gens.get(&m.active).map(|g| g.entries.len() as u64).unwrap_or(0))
    }
    fn active_generation(&self) -> Result<u64, RepoError> {
        self.with(|m| m.active)
    }
    fn begin_generation(&self) -> Result<u64, RepoError> {
        self.with(|m| {
            m.next = m.next.max(m.active) + 1;
            m.gens.insert(m.next, MemGeneration::default());
            m.next
        })
    }
    fn ingest_into(&self, generation: u64, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError> {
        self.with(|m| {
            let g = m.gens.entry(generation).or_default();
            for e in entries {
                g.entries.insert(e.id, e.loc);
            }
            if let Some(s) = segment {
                g.segments.insert(*s);
            }
        })
    }
    fn activate(&self, generation: u64) -> Result<(), RepoError> {
        self.with(|m| {
            if generation >= m.active {
                m.active = generation;
            }
            let active = m.active;
            m.gens.retain(|&g, _| g >= active);
        })
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub segments_total: usize,
    pub segments_ingested: usize,
    pub entries_ingested: usize,
    /// Segments this cache had ingested were gone from the store (a `gc` replaced them),
    /// so a new generation was built from the segments that remain.
    pub rebuilt: bool,
}

/// Ingests every index segment in the store that the cache has not seen. When segments the
/// cache ingested are gone (a `gc` rewrote the index), rebuilds a new generation from what
/// remains and activates it: entries of deleted segments must not be deduplicated against.
pub async fn sync(repo: &Repository, index: &dyn ChunkIndex, cancel: &CancellationToken) -> Result<SyncReport, RepoError> {
    // A segment deleted between listing and reading means a gc replaced it just now: list
    // again, which shows its replacement. Back off between attempts so that gc runs in
    // quick succession (each rewrites the index) cannot starve the sync.
    let mut last = None;
    for attempt in 0..8u32 {
        match sync_once(repo, index, cancel).await {
            Err(RepoError::Storage(e)) if e.is_not_found() => last = Some(RepoError::Storage(e)),
            r => return r,
        }
        let pause = std::time::Duration::from_millis((20u64 << attempt).min(500) + rand::random::<u64>() % 20);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = cancel.cancelled() => return Err(RepoError::Cancelled),
        }
    }
    Err(last.unwrap_or(RepoError::Cancelled))
}

async fn sync_once(repo: &Repository, index: &dyn ChunkIndex, cancel: &CancellationToken) -> Result<SyncReport, RepoError> {
    let have = index.ingested_segments()?;
    let all = repo.list_index(cancel).await?;
    let listed: HashSet<IndexId> = all.iter().copied().collect();
    let mut rep = SyncReport { segments_total: all.len(), ..Default::default() };
    if have.iter().any(|s| !listed.contains(s)) {
        let g = index.begin_generation()?;
        for id in &all {
            let entries = repo.read_index(id, cancel).await?;
            index.ingest_into(g, Some(id), &entries)?;
            rep.segments_ingested += 1;
            rep.entries_ingested += entries.len();
        }
        index.activate(g)?;
        rep.rebuilt = true;
        return Ok(rep);
    }
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
