//! The local index: a per-node cache of the union of all index segments, so dedup lookups
//! never touch the store. The trait lives here so the format crate stays free of RocksDB;
//! the engine implements it with RocksDB (`mover_engine::index::RocksIndex`), [`MemIndex`]
//! serves tests and small tools. The cache can be deleted at any time: [`sync`] rebuilds it
//! from `index/`, [`rebuild_from_packs`] from pack trailers when segments are missing.

use crate::error::RepoError;
use crate::id::{ChunkId, IndexId, PackId};
use crate::index::{BlobLocation, IndexEntry};
use crate::repo::Repository;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// The union of the index segments a node has ingested, kept incrementally: every entry
/// remembers which segment it came from, so when a `gc` replaces segments, [`sync`]
/// removes exactly what the vanished ones contributed — an entry another ingested segment
/// also holds stays — and ingests their replacements, instead of rebuilding everything.
pub trait ChunkIndex: Send + Sync {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError>;
    /// Every location of a chunk, the one [`ChunkIndex::lookup`] answers first. A chunk has
    /// several when two backups stored it at once, or when a damaged copy was stored anew.
    fn locations(&self, id: &ChunkId) -> Result<Vec<BlobLocation>, RepoError> {
        Ok(self.lookup(id)?.into_iter().collect())
    }
    /// Records entries. With `segment`, as that segment's contribution (removed with it by
    /// [`ChunkIndex::remove_segment`]) and marks it ingested, atomically; ingesting a
    /// segment twice changes nothing. Without, the entries stay until the cache is deleted.
    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError>;
    /// The segments ingested.
    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError>;
    /// Removes what `segment` contributed and forgets it; returns the entries removed.
    fn remove_segment(&self, segment: &IndexId) -> Result<usize, RepoError>;
    /// Chunks with at least one location.
    fn entry_count(&self) -> Result<u64, RepoError>;
    /// Whether `segment` was ingested.
    fn has_segment(&self, segment: &IndexId) -> Result<bool, RepoError> {
        Ok(self.ingested_segments()?.contains(segment))
    }
    /// What the last sync left ([`SyncMark`]); `None` makes the next sync a full one.
    fn sync_mark(&self) -> Result<Option<SyncMark>, RepoError> {
        Ok(None)
    }
    /// Records the mark of a sync that completed.
    fn set_sync_mark(&self, _mark: &SyncMark) -> Result<(), RepoError> {
        Ok(())
    }
}

/// What a cache remembers of its last sync, kept with it (a deleted cache starts over
/// with a full listing).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncMark {
    /// The gc generation ([`crate::repo::GcListing::generation`]) seen before the last
    /// full listing of the segments began; `"unknown"` when the sync was not given one.
    pub generation: String,
    /// When the last listing began, by this node's clock (ms).
    pub listed_ms: u64,
}

/// An in-memory [`ChunkIndex`].
#[derive(Default)]
pub struct MemIndex {
    inner: Mutex<MemInner>,
}

#[derive(Default)]
struct MemInner {
    /// Per chunk, its locations with the segment (ordinal, 0: none) each came from.
    entries: HashMap<ChunkId, Vec<(u32, BlobLocation)>>,
    segments: HashMap<IndexId, u32>,
    members: HashMap<u32, Vec<ChunkId>>,
    next: u32,
    mark: Option<SyncMark>,
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
        self.with(|m| m.entries.get(id).and_then(|v| v.first()).map(|(_, l)| *l))
    }
    fn locations(&self, id: &ChunkId) -> Result<Vec<BlobLocation>, RepoError> {
        self.with(|m| {
            let mut out: Vec<BlobLocation> = Vec::new();
            for (_, l) in m.entries.get(id).map(|v| v.as_slice()).unwrap_or(&[]) {
                if !out.contains(l) {
                    out.push(*l);
                }
            }
            out
        })
    }
    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError> {
        self.with(|m| {
            let ord = match segment {
                Some(s) if m.segments.contains_key(s) => return,
                Some(s) => {
                    m.next += 1;
                    m.segments.insert(*s, m.next);
                    m.next
                }
                None => 0,
            };
            for e in entries {
                let v = m.entries.entry(e.id).or_default();
                if !v.iter().any(|(o, l)| *o == ord && *l == e.loc) {
                    v.push((ord, e.loc));
                    if ord != 0 {
                        m.members.entry(ord).or_default().push(e.id);
                    }
                }
            }
        })
    }
    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError> {
        self.with(|m| m.segments.keys().copied().collect())
    }
    fn remove_segment(&self, segment: &IndexId) -> Result<usize, RepoError> {
        self.with(|m| {
            let Some(ord) = m.segments.remove(segment) else { return 0 };
            let mut n = 0;
            for id in m.members.remove(&ord).unwrap_or_default() {
                if let Some(v) = m.entries.get_mut(&id) {
                    let before = v.len();
                    v.retain(|(o, _)| *o != ord);
                    n += before - v.len();
                    if v.is_empty() {
                        m.entries.remove(&id);
                    }
                }
            }
            n
        })
    }
    fn entry_count(&self) -> Result<u64, RepoError> {
        self.with(|m| m.entries.len() as u64)
    }
    fn has_segment(&self, segment: &IndexId) -> Result<bool, RepoError> {
        self.with(|m| m.segments.contains_key(segment))
    }
    fn sync_mark(&self) -> Result<Option<SyncMark>, RepoError> {
        self.with(|m| m.mark.clone())
    }
    fn set_sync_mark(&self, mark: &SyncMark) -> Result<(), RepoError> {
        self.with(|m| m.mark = Some(mark.clone()))
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub segments_total: usize,
    pub segments_ingested: usize,
    pub entries_ingested: usize,
    /// Segments this cache had ingested that are gone from the store (a `gc` replaced
    /// them): what they contributed was removed.
    pub segments_removed: usize,
    pub entries_removed: usize,
    /// Listed only the segments added since the last sync (the gc generation had not
    /// changed), not all of them.
    pub incremental: bool,
    /// Listed nothing: the last listing was recent enough for the caller ([`Incremental::
    /// reuse_listed_after_ms`]) and no gc had deleted segments since.
    pub reused: bool,
}

/// What lets a sync list less than every segment ([`sync_at`]).
#[derive(Debug, Clone, Copy)]
pub struct Incremental<'a> {
    /// The newest gc generation marker, listed after the caller's lock was written.
    pub generation: &'a str,
    /// How far before the last listing the next one starts (the lock TTL).
    pub overlap_ms: u64,
    /// List nothing when the last listing began at or after this time (unix ms, this
    /// process's clock), this process made it, and `generation` is the one it saw: for a
    /// caller that only deduplicates against the cache, and reads nothing written after
    /// that time.
    pub reuse_listed_after_ms: Option<u64>,
}

/// Brings the cache to the union of the index segments in the store: ingests the new ones,
/// then removes what segments gone from the store had contributed (entries of deleted
/// segments must not be deduplicated against; new segments first, so a chunk a `gc` only
/// moved to a new segment is never missing in between).
pub async fn sync(repo: &Repository, index: &dyn ChunkIndex, cancel: &CancellationToken) -> Result<SyncReport, RepoError> {
    sync_at(repo, index, None, cancel).await
}

/// [`sync`], listing only the segments added since the last sync when the generation —
/// the newest gc generation marker, listed after the caller's lock was written — is the
/// one the last full listing began after: then no segment this cache holds was deleted
/// since (a gc writes a new marker after deleting segments and before listing the locks
/// its record waits for, `docs/gc.md`). Otherwise, and without `inc`, every segment is
/// listed. The overlap: how far before the last listing the next one starts (the lock
/// TTL: a segment committed after a listing began was sealed less than one TTL before it
/// by the lister's clock, given the lease and clock assumptions of `docs/gc.md`). With
/// `reuse_listed_after_ms`, a listing recent enough is not repeated at all (syncs in a
/// process run one at a time, so backups that start together share one listing).
pub async fn sync_at(repo: &Repository, index: &dyn ChunkIndex, inc: Option<Incremental<'_>>, cancel: &CancellationToken) -> Result<SyncReport, RepoError> {
    // One sync at a time in a process: a sync that ingests a segment after another one's
    // full listing removed it would leave its entries with a mark that says the cache is
    // exact, and the next syncs would not list it again (a cache is one process's: RocksDB
    // locks its directory).
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = tokio::select! {
        g = ONE_AT_A_TIME.lock() => g,
        _ = cancel.cancelled() => return Err(RepoError::Cancelled),
    };
    let t0 = std::time::Instant::now();
    let listed_ms = crate::now_unix_ms();
    let mark = index.sync_mark()?;
    let same = match (&inc, &mark) {
        (Some(i), Some(m)) if m.generation == i.generation => Some((i, m)),
        _ => None,
    };
    if let Some((Incremental { reuse_listed_after_ms: Some(after), .. }, m)) = same {
        if m.listed_ms >= *after && listed_here(m.listed_ms) {
            let rep = SyncReport { reused: true, incremental: true, ..Default::default() };
            SYNCS.record(t0.elapsed(), Some(&rep));
            return Ok(rep);
        }
    }
    let since = same.map(|(i, m)| m.listed_ms.saturating_sub(i.overlap_ms));
    let r = match since {
        Some(ms) => sync_since(repo, index, ms, cancel).await,
        None => sync_retrying(repo, index, cancel).await,
    };
    if r.is_ok() {
        index.set_sync_mark(&SyncMark { generation: inc.map_or("unknown", |i| i.generation).to_string(), listed_ms })?;
        if let Ok(mut l) = LISTED_HERE.lock() {
            if l.len() >= 64 {
                l.remove(0);
            }
            l.push(listed_ms);
        }
    }
    SYNCS.record(t0.elapsed(), r.as_ref().ok());
    r
}

/// When the listings this process made began: only those are reused. A process killed
/// after its listing may not have recorded all of its own segments in the cache, so the
/// next process (a rerun, a restarted daemon) lists again.
static LISTED_HERE: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

fn listed_here(ms: u64) -> bool {
    LISTED_HERE.lock().is_ok_and(|l| l.contains(&ms))
}

/// Ingests the segments sealed since `ms` that this cache lacks. A segment listed and then
/// gone (a gc replaced it just now) is skipped: an entry missing from the cache costs a
/// chunk stored twice, never a wrong dedup.
async fn sync_since(repo: &Repository, index: &dyn ChunkIndex, ms: u64, cancel: &CancellationToken) -> Result<SyncReport, RepoError> {
    let listed = repo.list_index_since(ms, cancel).await?;
    let mut rep = SyncReport { segments_total: listed.len(), incremental: true, ..Default::default() };
    let mut todo = Vec::new();
    for (id, size) in listed {
        if !index.has_segment(&id)? {
            todo.push((id, size));
        }
    }
    ingest(repo, index, todo, true, &mut rep, cancel).await?;
    Ok(rep)
}

/// What this process's syncs cost, since it started: for the daemon's metrics (a node's
/// share of the fleet's work is what it must ingest of the others' writes).
#[derive(Debug, Default)]
pub struct SyncTotals {
    pub syncs: std::sync::atomic::AtomicU64,
    pub nanos: std::sync::atomic::AtomicU64,
    pub segments_ingested: std::sync::atomic::AtomicU64,
    pub entries_ingested: std::sync::atomic::AtomicU64,
    pub segments_removed: std::sync::atomic::AtomicU64,
    /// Syncs that listed nothing: a recent listing served them ([`SyncReport::reused`]).
    pub reused: std::sync::atomic::AtomicU64,
}

pub static SYNCS: SyncTotals = SyncTotals {
    syncs: std::sync::atomic::AtomicU64::new(0),
    nanos: std::sync::atomic::AtomicU64::new(0),
    segments_ingested: std::sync::atomic::AtomicU64::new(0),
    entries_ingested: std::sync::atomic::AtomicU64::new(0),
    segments_removed: std::sync::atomic::AtomicU64::new(0),
    reused: std::sync::atomic::AtomicU64::new(0),
};

impl SyncTotals {
    fn record(&self, took: std::time::Duration, r: Option<&SyncReport>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.syncs.fetch_add(1, Relaxed);
        self.nanos.fetch_add(took.as_nanos() as u64, Relaxed);
        if let Some(r) = r {
            self.segments_ingested.fetch_add(r.segments_ingested as u64, Relaxed);
            self.entries_ingested.fetch_add(r.entries_ingested as u64, Relaxed);
            self.segments_removed.fetch_add(r.segments_removed as u64, Relaxed);
            self.reused.fetch_add(r.reused as u64, Relaxed);
        }
    }
}

async fn sync_retrying(repo: &Repository, index: &dyn ChunkIndex, cancel: &CancellationToken) -> Result<SyncReport, RepoError> {
    // A segment deleted between listing and reading means a gc replaced it just now: list
    // again, which shows its replacement. Back off between attempts so that gc runs in
    // quick succession cannot starve the sync.
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

/// Index segments read at once by a sync: a round trip each, so a fresh node facing a
/// distant store wants many. A backup's are ~100 KiB, a gc's up to a few MiB: the reads in
/// flight are also bounded in bytes.
const SYNC_READS_IN_FLIGHT: usize = 64;
const SYNC_BYTES_IN_FLIGHT_KIB: u32 = 32 << 10;

async fn sync_once(repo: &Repository, index: &dyn ChunkIndex, cancel: &CancellationToken) -> Result<SyncReport, RepoError> {
    let have = index.ingested_segments()?;
    let all = repo.list_index_sized(cancel).await?;
    let listed: HashSet<IndexId> = all.iter().map(|(id, _)| *id).collect();
    let mut rep = SyncReport { segments_total: all.len(), ..Default::default() };
    // Several segments read at once: against a distant store a sync costs round trips, not
    // bandwidth. Ingested as they arrive (segments are independent).
    let todo: Vec<(IndexId, u64)> = all.into_iter().filter(|(id, _)| !have.contains(id)).collect();
    ingest(repo, index, todo, false, &mut rep, cancel).await?;
    for id in have.iter().filter(|s| !listed.contains(s)) {
        rep.entries_removed += index.remove_segment(id)?;
        rep.segments_removed += 1;
    }
    Ok(rep)
}

/// Reads `todo` and ingests each segment as it arrives (segments are independent). With
/// `skip_gone`, a segment deleted since it was listed is skipped instead of failing.
async fn ingest(
    repo: &Repository,
    index: &dyn ChunkIndex,
    todo: Vec<(IndexId, u64)>,
    skip_gone: bool,
    rep: &mut SyncReport,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    use futures::StreamExt;
    let budget = tokio::sync::Semaphore::new(SYNC_BYTES_IN_FLIGHT_KIB as usize);
    let budget = &budget;
    let mut reads = futures::stream::iter(todo)
        .map(|(id, size)| async move {
            let kib = (size >> 10).clamp(1, SYNC_BYTES_IN_FLIGHT_KIB as u64) as u32;
            let _held = budget.acquire_many(kib).await.map_err(|_| RepoError::Cancelled)?;
            repo.read_index(&id, cancel).await.map(|e| (id, Some(e))).or_else(|e| match e {
                RepoError::Storage(s) if skip_gone && s.is_not_found() => Ok((id, None)),
                e => Err(e),
            })
        })
        .buffer_unordered(SYNC_READS_IN_FLIGHT);
    while let Some(done) = reads.next().await {
        let (id, Some(entries)) = done? else { continue };
        index.ingest(Some(&id), &entries)?;
        rep.segments_ingested += 1;
        rep.entries_ingested += entries.len();
    }
    Ok(())
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
