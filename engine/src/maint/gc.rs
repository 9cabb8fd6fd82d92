//! Garbage collection that is safe while backups keep writing. The protocol and why it is
//! safe are in `docs/gc.md`; in short:
//!
//! 1. **Mark.** Under an exclusive `gc` lock: list packs, read every index segment, read
//!    every snapshot (and the manifests `forget` parked in unswept records) and walk what
//!    they reference. Packs with nothing referenced, packs whose unused share exceeds the
//!    threshold (their live blobs are copied into new packs first) and packs no index names
//!    leave the index: the new index is written, then a *record* (`gc/<id>.entries`) with
//!    every entry taken out, then the old segments are deleted, then the locks live at that
//!    moment are written as the record's `.ready` marker.
//! 2. **Sweep.** A record whose `.ready` locks are all gone (released, or stale) is swept:
//!    index segments and snapshots written meanwhile are read, every entry a snapshot now
//!    references is put back into the index ("resurrected"), and the remaining packs are
//!    deleted. On an idle repository the sweep follows the mark at once.
//!
//! Until a record is swept, restores and checks still find its entries
//! ([`crate::index::with_pending`]). Every step is idempotent, so a killed `gc` is finished by the next.

use super::gc_work::{self, Entries, Reach};
use crate::error::{Error, Result, ResultExt};
use crate::index::pending::{self, Record};
use crate::index::Quarantined;
use crate::lock::{self, Held, Hold};
use crate::walk::{self, Trees, Visitor};
use mover_format::blob::{BlobEncoder, EncodedBlob};
use mover_format::index::{BlobLocation, IndexEntry};
use mover_format::manifest::Manifest;
use mover_format::pack::PackBuilder;
use mover_format::pending::{PendingDeletion, Ready};
use mover_format::tree::{MapEntry, SegmentGroup, SegmentRef};
use mover_format::{names, ChunkId, IndexId, PackId, Repository, SnapshotId};
use std::collections::{HashMap, HashSet};
use tokio_util::sync::CancellationToken;

/// Entries per index segment GC writes (about 5 MiB each).
const SEGMENT_ENTRIES: usize = 65_536;

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub dry_run: bool,
    /// Repack a pack when more than this share of its bytes is unreferenced (0.0–1.0).
    pub repack_unused: f64,
    /// Where gc keeps its working set (every index entry and the reachable set, on disk:
    /// about 120 bytes per chunk); deleted when gc ends. Default: the system's temporary
    /// directory.
    pub scratch_dir: Option<std::path::PathBuf>,
    /// Also rewrite packs with their compressible blobs compressed again at this zstd
    /// level (backups compress fast; storage shrinks afterwards). A pack is rewritten only
    /// when it shrinks by at least [`RECOMPRESS_MIN_GAIN`]; blobs stored uncompressed
    /// (incompressible at backup) are copied as they are.
    pub recompress: Option<i32>,
}

/// The share a pack must shrink by for `--recompress` to rewrite it.
pub const RECOMPRESS_MIN_GAIN: f64 = 0.03;

impl Default for GcOptions {
    fn default() -> Self {
        Self { dry_run: false, repack_unused: 0.3, scratch_dir: None, recompress: None }
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub packs_before: usize,
    pub bytes_before: u64,
    /// Packs no snapshot references any more.
    pub packs_unreferenced: usize,
    /// Packs whose unused share exceeded the threshold; their live blobs were copied.
    pub packs_repacked: usize,
    pub bytes_copied: u64,
    /// Packs rewritten with their blobs compressed again (`recompress`), and the bytes
    /// that saved.
    pub packs_recompressed: usize,
    pub bytes_saved_by_recompression: u64,
    /// Packs no index segment names (left by killed backups, or still being written).
    pub packs_unindexed: usize,
    pub packs_deleted: usize,
    pub bytes_freed: u64,
    /// Bytes taken out of the index but held back because backups that may still use
    /// them are running; a later `gc` frees them.
    pub bytes_held_back: u64,
    /// The locks holding them back.
    pub held_by: Vec<String>,
    pub records_written: usize,
    pub records_swept: usize,
    pub records_held: usize,
    /// Entries put back because a snapshot written meanwhile references them.
    pub entries_resurrected: usize,
    pub index_segments_deleted: usize,
    pub index_segments_written: usize,
    /// Index segments the mark left as they were (nothing in them changed).
    pub index_segments_kept: usize,
    pub stale_locks_removed: usize,
    /// Probe objects older than an hour (left by credentials that may not delete, or by
    /// killed processes) and verify/drill reports beyond the newest 200 of each kind
    /// (append-only nodes leave them): removed here, on the maintenance node.
    pub probes_removed: usize,
    pub reports_removed: usize,
    /// Quarantine records removed: every pack they named is gone.
    pub quarantine_records_removed: usize,
    /// Where the time went, phase by phase (seconds): `listing` (packs, index segments,
    /// quarantine, records), `snapshots` (reading every snapshot's tree), `sweep` (records
    /// whose backups are gone), `plan` (which packs go or are repacked), `repack` (copying
    /// live blobs), `index` (rewriting the segments that name a pack that goes, and the
    /// record).
    pub phase_seconds: std::collections::BTreeMap<&'static str, f64>,
    /// What the mark decided, pack by pack.
    pub plan: Vec<PlannedPack>,
}

impl GcReport {
    fn timed(&mut self, phase: &'static str, since: std::time::Instant) {
        *self.phase_seconds.entry(phase).or_default() += since.elapsed().as_secs_f64();
    }
}

/// What the mark decided for a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PackAction {
    /// Nothing in it is referenced.
    Delete,
    /// Mostly unreferenced: its live blobs are copied, then it goes.
    Repack,
    /// No index segment names it (left by a killed backup, or still being written).
    Unindexed,
    /// A candidate for compressing again (rewritten only if it shrinks enough).
    Recompress,
}

impl PackAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PackAction::Delete => "delete",
            PackAction::Repack => "repack",
            PackAction::Unindexed => "unindexed",
            PackAction::Recompress => "recompress",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedPack {
    pub pack: PackId,
    pub action: PackAction,
    pub size: u64,
    pub referenced_bytes: u64,
}

/// What GC knows about the repository; only grows while it runs. The index entries and
/// the reachable set live on disk ([`gc_work`]): memory does not grow with the repository.
struct View {
    /// Damaged locations: never a chunk's home when it has another (`docs/repair.md`).
    q: Quarantined,
    packs: HashMap<PackId, u64>,
    idx: Entries,
    snapshots: HashSet<SnapshotId>,
    reach: Reach,
}

impl View {
    async fn refresh_index(&mut self, repo: &Repository, cancel: &CancellationToken) -> Result<()> {
        self.idx.refresh(repo, cancel).await
    }

    /// Reads snapshots not seen yet and marks what they reference. A batch of manifests,
    /// and the tree blobs of theirs not marked yet, are read several at once (a round trip
    /// each on an object store); the walk itself goes in order.
    async fn refresh_snapshots(&mut self, repo: &Repository, pending: &HashMap<ChunkId, BlobLocation>, cancel: &CancellationToken) -> Result<()> {
        use futures::StreamExt;
        let todo: Vec<SnapshotId> = repo.list_snapshot_ids(cancel).await?.into_iter().filter(|id| !self.snapshots.contains(id)).collect();
        for batch in todo.chunks(SNAPSHOT_BATCH) {
            let read: Vec<Result<Option<(SnapshotId, Manifest)>>> = futures::stream::iter(batch.iter().copied())
                .map(|id| async move {
                    match repo.read_snapshot(&id, cancel).await {
                        Ok(m) => Ok(Some((id, m))),
                        // Forgotten between listing and reading: its record (read later) keeps it.
                        Err(mover_format::RepoError::NotFound { .. }) => Ok(None),
                        Err(e) => Err(Error::from(e).context("gc deletes nothing while a snapshot is unreadable")),
                    }
                })
                .buffered(gc_work::READS_IN_FLIGHT)
                .collect()
                .await;
            let mut manifests = Vec::new();
            for r in read {
                manifests.extend(r?);
            }
            // Their groups not marked yet, then those groups' maps not marked yet.
            let mut pre: HashMap<ChunkId, Vec<u8>> = HashMap::new();
            let mut groups: Vec<ChunkId> = manifests.iter().flat_map(|(_, m)| m.volumes.iter().flat_map(|v| v.groups.iter().copied())).collect();
            groups.sort_unstable();
            groups.dedup();
            groups.retain(|g| !self.reach.contains(g).unwrap_or(true));
            self.prefetch(repo, &groups, pending, &mut pre, cancel).await;
            let mut maps: Vec<ChunkId> = Vec::new();
            for g in &groups {
                let Some(group) = pre.get(g).and_then(|b| SegmentGroup::decode(b).ok()) else { continue };
                maps.extend(group.segments.iter().filter_map(|r| if let SegmentRef::Map { map, .. } = r { Some(*map) } else { None }));
            }
            maps.sort_unstable();
            maps.dedup();
            maps.retain(|m| !self.reach.contains(m).unwrap_or(true));
            maps.truncate(MAPS_PREFETCHED);
            self.prefetch(repo, &maps, pending, &mut pre, cancel).await;
            for (id, m) in manifests {
                self.walk(repo, &id, &m, pending, &mut pre, cancel).await?;
                self.snapshots.insert(id);
            }
        }
        Ok(())
    }

    /// Reads the tree blobs `ids` into `pre`, several at once. One that cannot be located or
    /// read is left out: the walk reads it again and stops gc if it fails then.
    async fn prefetch(
        &self,
        repo: &Repository,
        ids: &[ChunkId],
        pending: &HashMap<ChunkId, BlobLocation>,
        pre: &mut HashMap<ChunkId, Vec<u8>>,
        cancel: &CancellationToken,
    ) {
        use futures::StreamExt;
        let q = &self.q;
        let located: Vec<(ChunkId, BlobLocation)> = ids
            .iter()
            .filter_map(|id| {
                let loc = self.idx.first(id, |l| !q.is_bad(id, &l.pack)).ok().flatten().or_else(|| pending.get(id).copied())?;
                Some((*id, loc))
            })
            .collect();
        let mut reads = futures::stream::iter(located)
            .map(|(id, loc)| async move { (id, repo.read_blob(&id, &loc, cancel).await) })
            .buffer_unordered(gc_work::READS_IN_FLIGHT);
        while let Some((id, r)) = reads.next().await {
            if let Ok(b) = r {
                pre.insert(id, b);
            }
        }
    }

    /// Marks every blob `m` references; tree blobs in `pre` are taken from there.
    async fn walk(
        &mut self,
        repo: &Repository,
        sid: &SnapshotId,
        m: &Manifest,
        pending: &HashMap<ChunkId, BlobLocation>,
        pre: &mut HashMap<ChunkId, Vec<u8>>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let View { q, packs: _, idx, snapshots: _, reach } = self;
        let mut trees = GcTrees { repo, idx, q, pending, pre, cancel };
        walk::snapshot(&mut trees, &mut Mark(reach), sid, m).await?;
        reach.settle()
    }
}

/// Manifests gc reads at once, with their tree blobs.
const SNAPSHOT_BATCH: usize = 64;
/// At most this many segment maps read ahead per batch of manifests (a few KiB each).
const MAPS_PREFETCHED: usize = 4096;

/// Marks reachable blobs; a group or map already marked is not walked again.
struct Mark<'a>(&'a mut Reach);

impl Visitor for Mark<'_> {
    fn metadata(&mut self, _name: &str, blob: &ChunkId) {
        self.0.insert(blob);
    }
    fn group(&mut self, id: &ChunkId) -> bool {
        self.0.insert(id)
    }
    fn map(&mut self, id: &ChunkId, _offset: u64) -> bool {
        self.0.insert(id)
    }
    fn chunk(&mut self, e: &MapEntry, _offset: u64, _segment: u64) {
        if let Some(id) = e.chunk() {
            self.0.insert(&id);
        }
    }
}

/// Tree blobs for gc's walk: located in the index it read (re-read when a snapshot written
/// after it names a blob it does not know) or in unswept records; any failure stops gc.
struct GcTrees<'a> {
    repo: &'a Repository,
    idx: &'a mut Entries,
    q: &'a Quarantined,
    pending: &'a HashMap<ChunkId, BlobLocation>,
    /// Read ahead ([`View::prefetch`]), verified like every read.
    pre: &'a mut HashMap<ChunkId, Vec<u8>>,
    cancel: &'a CancellationToken,
}

#[async_trait::async_trait]
impl Trees for GcTrees<'_> {
    async fn blob(&mut self, id: &ChunkId, what: &str) -> Result<Option<Vec<u8>>> {
        if let Some(b) = self.pre.remove(id) {
            return Ok(Some(b));
        }
        let q = self.q;
        let mut loc = self.idx.first(id, |l| !q.is_bad(id, &l.pack))?.or_else(|| self.pending.get(id).copied());
        if loc.is_none() {
            // A snapshot written after the index was read: its segments are there by now.
            self.idx.refresh(self.repo, self.cancel).await?;
            loc = self.idx.first(id, |l| !q.is_bad(id, &l.pack))?;
        }
        let loc = loc.ok_or_else(|| {
            Error::corrupt(format!(
                "{what}: blob is in no index segment of repository {}; gc deletes nothing until `mover index rebuild` has indexed every pack",
                self.repo.location()
            ))
        })?;
        let b =
            self.repo.read_blob(id, &loc, self.cancel).await.with_context(|| format!("{what}; gc deletes nothing while a referenced blob is unreadable"))?;
        Ok(Some(b))
    }
}

/// Runs GC: sweep what earlier runs left, mark, sweep again. Holds the `gc` lock throughout.
pub async fn run(repo: &Repository, opts: &GcOptions, cancel: &CancellationToken) -> Result<GcReport> {
    if !(0.0..=1.0).contains(&opts.repack_unused) {
        return Err(Error::invalid(format!("--repack-unused must be between 0 and 1 (a share of a pack's bytes), not {}", opts.repack_unused)));
    }
    if !opts.dry_run {
        repo.require_deletes("gc", cancel).await?;
    }
    lock::scope(repo, Hold::Exclusive("run gc"), cancel, |me| async move {
        let scratch = opts.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
        let (idx, reach) = gc_work::create(&scratch)?;
        let mut v = View { q: Quarantined::default(), packs: HashMap::new(), idx, snapshots: HashSet::new(), reach };
        run_locked(repo, opts, &mut v, &me, cancel).await
    })
    .await
}

async fn run_locked(repo: &Repository, opts: &GcOptions, v: &mut View, me: &Held, cancel: &CancellationToken) -> Result<GcReport> {
    let mut rep = GcReport { dry_run: opts.dry_run, ..Default::default() };
    // Order matters (docs/gc.md): packs, then index, then records and snapshots; locks last.
    // Manifests parked by `forget` become roots in `sweep`, unless their record is swept.
    let t = std::time::Instant::now();
    v.packs = repo.list_packs(cancel).await?.into_iter().collect();
    rep.packs_before = v.packs.len();
    rep.bytes_before = v.packs.values().sum();
    v.refresh_index(repo, cancel).await?;
    v.q = Quarantined::load(repo, cancel).await?;
    let mut records = pending::load(repo, pending::Reader::Gc, cancel).await?;
    rep.timed("listing", t);
    let t = std::time::Instant::now();
    v.refresh_snapshots(repo, &pending::locations(&records), cancel).await?;
    rep.snapshots = v.snapshots.len();
    rep.timed("snapshots", t);

    // Locks that expired or whose process is gone protect nothing; tidy them away (ours
    // is live, so it stays).
    if !opts.dry_run {
        rep.stale_locks_removed = lock::unlock(repo, false, cancel).await?.len();
        let now = mover_format::now_unix_ms();
        let old: Vec<String> = repo
            .list_objects(names::PROBE_PREFIX, cancel)
            .await?
            .into_iter()
            .filter(|o| names::probe_time_ms(&o.name).is_some_and(|ms| ms.saturating_add(names::PROBE_MAX_AGE_MS) < now))
            .map(|o| o.name)
            .collect();
        delete_objects(repo, &old, &me.lease(), "removing old probe objects", cancel).await?;
        rep.probes_removed = old.len();
        rep.reports_removed = super::report::prune(repo, None, cancel).await?;
    }

    let t = std::time::Instant::now();
    sweep(repo, v, &mut records, me, opts.dry_run, &mut rep, cancel).await?;
    rep.timed("sweep", t);
    if let Some(record) = mark(repo, v, &records, opts, me, &mut rep, cancel).await? {
        records.push(record);
        let t = std::time::Instant::now();
        sweep(repo, v, &mut records, me, opts.dry_run, &mut rep, cancel).await?;
        rep.timed("sweep", t);
    }
    rep.records_held = records.len();
    if !opts.dry_run {
        rep.quarantine_records_removed = prune_quarantine(repo, v, &me.lease(), cancel).await?;
    }
    Ok(rep)
}

/// Removes the quarantine records whose every pack is gone from the store and the index:
/// what they warned about cannot be met again.
async fn prune_quarantine(repo: &Repository, v: &View, lease: &lock::Lease, cancel: &CancellationToken) -> Result<usize> {
    if v.q.records.is_empty() {
        return Ok(0);
    }
    let stored: HashSet<PackId> = repo.list_packs(cancel).await?.into_iter().map(|(p, _)| p).collect();
    let named = v.idx.packs()?;
    let gone: Vec<String> =
        v.q.records.iter().filter(|(_, packs)| packs.iter().all(|p| !stored.contains(p) && !named.contains(p))).map(|(n, _)| n.clone()).collect();
    delete_objects(repo, &gone, lease, "removing quarantine records of packs that are gone", cancel).await?;
    Ok(gone.len())
}

/// Live lock ids other than `me`.
pub(super) async fn live_locks(repo: &Repository, me: &Held, cancel: &CancellationToken) -> Result<Vec<lock::LockView>> {
    Ok(lock::list(repo, cancel).await?.into_iter().filter(|l| l.stale.is_none() && l.info.id != me.id()).collect())
}

/// Sweeps every record none of whose locks is live; keeps the others in `records`.
async fn sweep(
    repo: &Repository,
    v: &mut View,
    records: &mut Vec<Record>,
    me: &Held,
    dry_run: bool,
    rep: &mut GcReport,
    cancel: &CancellationToken,
) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let lease = me.lease();
    // A record whose gc was killed before `.ready` may have had its segments deleted: a new
    // generation first, then the locks, as in `mark` (docs/gc.md).
    if !dry_run && records.iter().any(|r| r.ready.is_none()) {
        lease.commit("writing a gc generation marker", async { Ok(repo.write_generation(cancel).await?) }).await?;
    }
    let live = live_locks(repo, me, cancel).await?;
    let live_ids: HashSet<&str> = live.iter().map(|l| l.info.id.as_str()).collect();
    // A record whose gc was killed before `.ready`: its gc is gone, so the locks live now
    // are a superset of what it must wait for.
    for r in records.iter_mut().filter(|r| r.ready.is_none()) {
        let ready = ready_now(&live);
        if !dry_run {
            lease.commit("writing a gc record's ready marker", async { Ok(repo.write_ready(&r.id, &ready, cancel).await?) }).await?;
        }
        r.ready = Some(ready);
    }
    let (eligible, held): (Vec<Record>, Vec<Record>) =
        std::mem::take(records).into_iter().partition(|r| r.ready.as_ref().is_some_and(|d| d.locks.iter().all(|l| !live_ids.contains(l.as_str()))));
    *records = held;
    rep.held_by =
        live.iter().filter(|l| records.iter().any(|r| r.ready.as_ref().is_some_and(|d| d.locks.contains(&l.info.id)))).map(|l| l.describe()).collect();
    rep.bytes_held_back = records.iter().flat_map(|r| r.p.packs()).collect::<HashSet<_>>().iter().filter_map(|p| v.packs.get(p)).sum();
    // Manifests parked by `forget` in the records still held stay roots: a backup that
    // started from one as its parent may still be running.
    let pending = pending::locations(records);
    let pending_all: HashMap<ChunkId, BlobLocation> = pending.into_iter().chain(pending::locations(&eligible)).collect();
    for r in records.iter() {
        for (sid, bytes) in &r.p.forgotten {
            let m = Manifest::open(repo.keys(), bytes).with_context(|| format!("forgotten snapshot {sid} in gc record {}", r.id))?;
            v.walk(repo, sid, &m, &pending_all, &mut HashMap::new(), cancel).await?;
        }
    }
    if eligible.is_empty() {
        return Ok(());
    }
    // Every backup that could have used these entries has finished or died: whatever it
    // wrote is visible now.
    v.refresh_index(repo, cancel).await?;
    v.refresh_snapshots(repo, &pending_all, cancel).await?;
    let mut resurrect: HashMap<ChunkId, IndexEntry> = HashMap::new();
    for r in &eligible {
        for e in &r.p.entries {
            if !resurrect.contains_key(&e.id) && v.packs.contains_key(&e.loc.pack) && v.reach.contains(&e.id)? && v.idx.first(&e.id, |_| true)?.is_none() {
                resurrect.insert(e.id, *e);
            }
        }
    }
    if !resurrect.is_empty() {
        let mut es: Vec<IndexEntry> = resurrect.into_values().collect();
        es.sort_by_key(|e| e.id);
        rep.entries_resurrected += es.len();
        let id = if dry_run {
            IndexId([0; 32])
        } else {
            rep.index_segments_written += 1;
            lease.commit("writing the resurrected index entries", async { Ok(repo.write_index(&es, cancel).await?) }).await?
        };
        v.idx.add(id, &es)?;
    }
    let keep: HashSet<PackId> = v.idx.packs()?.into_iter().chain(records.iter().flat_map(|r| r.p.packs())).collect();
    for r in &eligible {
        let mut doomed = Vec::new();
        for p in r.p.packs() {
            if keep.contains(&p) {
                continue;
            }
            let Some(size) = v.packs.remove(&p) else { continue };
            doomed.push(names::pack(&p));
            rep.packs_deleted += 1;
            rep.bytes_freed += size;
        }
        if !dry_run {
            delete_objects(repo, &doomed, &lease, "deleting swept packs", cancel).await?;
            delete_objects(repo, &[names::gc_entries(&r.id), names::gc_ready(&r.id)], &lease, "deleting a swept gc record", cancel).await?;
        }
        rep.records_swept += 1;
    }
    Ok(())
}

/// Packs read ahead of the one being repacked.
const REPACK_READS_AHEAD: usize = 3;
/// New packs uploading while the next is filled.
const REPACK_UPLOADS: usize = 2;

/// A spawned task that is aborted when dropped (a gc that fails stops its reads and
/// uploads: a pack half uploaded is never seen, one uploaded and not indexed is deleted by
/// the next gc as unindexed).
struct Task<T>(Option<tokio::task::JoinHandle<T>>);

impl<T: Send + 'static> Task<T> {
    fn spawn(f: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        Task(Some(tokio::spawn(f)))
    }

    async fn join(mut self) -> Result<T> {
        let h = self.0.take().expect("joined once");
        h.await.map_err(|e| Error::permanent(format!("a gc read or upload task failed: {e}")))
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Objects deleted per commit, concurrently.
const DELETE_BATCH: usize = 64;

/// Deletes `names` in batches, each a commit under `lease`: a gc whose lease lapsed deletes
/// nothing more (another gc may be running by then).
pub(super) async fn delete_objects(repo: &Repository, names: &[String], lease: &crate::lock::Lease, what: &str, cancel: &CancellationToken) -> Result<()> {
    use futures::stream::{StreamExt, TryStreamExt};
    for batch in names.chunks(DELETE_BATCH) {
        lease
            .commit(what, async {
                futures::stream::iter(batch)
                    .map(|n| async move { repo.delete_object(n, cancel).await.map_err(Error::from) })
                    .buffer_unordered(16)
                    .try_collect::<Vec<()>>()
                    .await
            })
            .await?;
    }
    Ok(())
}

/// Takes garbage out of the index into a new record; `None` when there is nothing to do.
async fn mark(
    repo: &Repository,
    v: &mut View,
    records: &[Record],
    opts: &GcOptions,
    me: &Held,
    rep: &mut GcReport,
    cancel: &CancellationToken,
) -> Result<Option<Record>> {
    // One location per chunk: the pack with the most referenced bytes wins. Each figure is
    // a pass over the working set in chunk order; only per-pack figures stay in memory.
    let planning = std::time::Instant::now();
    v.reach.settle()?;
    let naive = gc_work::reachable_bytes_per_pack(&v.idx, &v.reach)?;
    // A quarantined location is a home only when the chunk has no other: a healed chunk's
    // damaged copy is garbage like any unreferenced blob.
    let home_of = |es: &[IndexEntry]| -> Option<IndexEntry> {
        es.iter()
            .filter(|e| v.packs.contains_key(&e.loc.pack))
            .max_by(|a, b| {
                let healthy = |e: &IndexEntry| !v.q.is_bad(&e.id, &e.loc.pack);
                healthy(a).cmp(&healthy(b)).then_with(|| naive.get(&a.loc.pack).cmp(&naive.get(&b.loc.pack))).then_with(|| b.loc.pack.cmp(&a.loc.pack))
            })
            .copied()
    };
    let mut named: HashSet<PackId> = HashSet::new();
    let mut live_of: HashMap<PackId, u64> = HashMap::new();
    v.idx.for_each_chunk(|es| {
        named.extend(es.iter().map(|e| e.loc.pack));
        if let Some(h) = home_of(es) {
            if v.reach.contains(&h.id)? {
                *live_of.entry(h.loc.pack).or_default() += h.loc.stored_len as u64;
            }
        }
        Ok(())
    })?;
    let held_packs: HashSet<PackId> = records.iter().flat_map(|r| r.p.packs()).collect();
    let damaged: HashSet<PackId> = v.q.iter().map(|(_, p, _)| *p).collect();
    let (mut drop_packs, mut repack): (Vec<PackId>, Vec<PackId>) = (Vec::new(), Vec::new());
    for p in &named {
        let Some(&size) = v.packs.get(p) else { continue }; // missing pack: `check` reports it
        let live = live_of.get(p).copied().unwrap_or(0);
        if live == 0 {
            drop_packs.push(*p);
        } else if damaged.contains(p) || (size > 0 && (size - live.min(size)) as f64 / size as f64 > opts.repack_unused) {
            // A pack with a damaged blob is repacked whatever its use: its healthy blobs are
            // copied (verified), and the damage goes with it (a blob nothing healed stays
            // its home and fails the copy, so the pack stays).
            repack.push(*p);
        }
    }
    let orphans: Vec<PackId> = v.packs.keys().filter(|p| !named.contains(p) && !held_packs.contains(p)).copied().collect();
    // Recompression candidates: every other pack with live blobs.
    let mut recompress: Vec<PackId> = Vec::new();
    if opts.recompress.is_some() {
        let taken: HashSet<&PackId> = drop_packs.iter().chain(&repack).collect();
        recompress = named.iter().filter(|p| v.packs.contains_key(*p) && live_of.get(*p).is_some_and(|l| *l > 0) && !taken.contains(p)).copied().collect();
        recompress.sort();
    }
    for (list, action) in
        [(&drop_packs, PackAction::Delete), (&repack, PackAction::Repack), (&orphans, PackAction::Unindexed), (&recompress, PackAction::Recompress)]
    {
        for p in list.iter() {
            rep.plan.push(PlannedPack { pack: *p, action, size: v.packs[p], referenced_bytes: live_of.get(p).copied().unwrap_or(0) });
        }
    }
    rep.packs_unreferenced += drop_packs.len();
    rep.packs_repacked += repack.len();
    rep.packs_unindexed += orphans.len();
    rep.timed("plan", planning);
    if drop_packs.is_empty() && repack.is_empty() && orphans.is_empty() && recompress.is_empty() {
        return Ok(None);
    }
    if opts.dry_run {
        rep.bytes_copied += repack.iter().map(|p| live_of[p]).sum::<u64>();
        rep.bytes_freed += drop_packs.iter().chain(&repack).chain(&orphans).map(|p| v.packs[p]).sum::<u64>();
        rep.bytes_freed -= rep.bytes_copied.min(rep.bytes_freed);
        return Ok(None);
    }

    // Copy the live blobs of the packs to repack (still sealed: a blob's AEAD binds its
    // chunk id, not its place), verifying each first so damage is not copied.
    let t = std::time::Instant::now();
    let mut new_entries: Vec<IndexEntry> = Vec::new();
    let pack_size = repo.config().pack_size as usize;
    let mut builder = PackBuilder::new(pack_size);
    let mut failed_repack: HashSet<PackId> = HashSet::new();
    // The live entries of the packs to repack (what is copied is held anyway).
    let repack_set: HashSet<PackId> = repack.iter().chain(&recompress).copied().collect();
    let mut live_in: HashMap<PackId, Vec<IndexEntry>> = HashMap::new();
    if !repack_set.is_empty() {
        v.idx.for_each_chunk(|es| {
            if let Some(h) = home_of(es).filter(|h| repack_set.contains(&h.loc.pack)) {
                if v.reach.contains(&h.id)? {
                    live_in.entry(h.loc.pack).or_default().push(h);
                }
            }
            Ok(())
        })?;
    }
    let mut recompressed: HashSet<PackId> = HashSet::new();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // Reading, verifying and writing overlap: the next packs are read while one is
    // verified, and full new packs upload while the next are filled (a round trip and a
    // transfer each on an object store). Memory: REPACK_READS_AHEAD + REPACK_UPLOADS + 1
    // packs.
    let order: Vec<(PackId, bool)> = repack.iter().map(|p| (*p, true)).chain(recompress.iter().map(|p| (*p, false))).collect();
    let mut order = order.into_iter();
    let mut ahead: std::collections::VecDeque<(PackId, bool, Task<std::result::Result<bytes::Bytes, mover_format::RepoError>>)> = Default::default();
    let mut uploads: std::collections::VecDeque<Task<std::result::Result<(PackId, Vec<IndexEntry>, u64), mover_format::RepoError>>> = Default::default();
    loop {
        while ahead.len() < REPACK_READS_AHEAD {
            let Some((p, must)) = order.next() else { break };
            let (r, c) = (repo.clone(), cancel.clone());
            ahead.push_back((p, must, Task::spawn(async move { r.get_object(&names::pack(&p), &c).await })));
        }
        let Some((p, must, read)) = ahead.pop_front() else { break };
        let p = &p;
        let bytes = read.join().await??;
        // Each live blob is verified (damage is not copied) and, with `recompress`, those
        // stored compressed are compressed again — on every core, one blob's plaintext at a
        // time per core (a pack of text can hold ten times its size in plaintext).
        let mut blobs: Vec<(EncodedBlob, BlobLocation)> = Vec::new();
        for e in live_in.remove(p).unwrap_or_default().iter() {
            let (a, b) = (e.loc.offset as usize, e.loc.offset as usize + e.loc.stored_len as usize);
            match bytes.get(a..b) {
                Some(s) => blobs.push((EncodedBlob { id: e.id, kind: e.loc.kind, raw_len: e.loc.raw_len, sealed: s.to_vec() }, e.loc)),
                None => {
                    tracing::warn!("not repacking pack {p}: chunk {} lies past its end", e.id);
                    failed_repack.insert(*p);
                    break;
                }
            }
        }
        if failed_repack.contains(p) {
            continue;
        }
        let before: u64 = blobs.iter().map(|(b, _)| b.sealed.len() as u64).sum();
        let per = blobs.len().div_ceil(threads).max(1);
        let (keys, level) = (repo.keys(), opts.recompress);
        let checked: std::result::Result<(), String> = off_reactor(|| {
            std::thread::scope(|sc| {
                let hs: Vec<_> = blobs
                    .chunks_mut(per)
                    .map(|part| {
                        sc.spawn(move || -> std::result::Result<(), String> {
                            let mut enc = level.map(BlobEncoder::new);
                            for (blob, loc) in part.iter_mut() {
                                let plain = repo.decode_blob(&blob.id, loc, &blob.sealed).map_err(|e| format!("{e:#}"))?;
                                // Stored uncompressed: it did not compress at backup; kept as it is.
                                let stored_raw = loc.stored_len as u64 == loc.raw_len as u64 + mover_format::blob::RAW_OVERHEAD as u64;
                                if let (Some(enc), false) = (enc.as_mut(), stored_raw) {
                                    let new = enc.encode(keys, blob.id, blob.kind, &plain).map_err(|e| format!("{e:#}"))?;
                                    if new.sealed.len() < blob.sealed.len() {
                                        *blob = new;
                                    }
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                hs.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err("a verification thread panicked".into())))
            })
        });
        if let Err(err) = checked {
            tracing::warn!("not repacking pack {p}: {err}");
            failed_repack.insert(*p);
            continue;
        }
        let after: u64 = blobs.iter().map(|(b, _)| b.sealed.len() as u64).sum();
        let blobs: Vec<EncodedBlob> = blobs.into_iter().map(|(b, _)| b).collect();
        if !must {
            if (after as f64) > before as f64 * (1.0 - RECOMPRESS_MIN_GAIN) {
                continue; // not worth rewriting
            }
            recompressed.insert(*p);
            rep.packs_recompressed += 1;
            rep.bytes_saved_by_recompression += before - after;
        }
        for b in &blobs {
            if builder.len() + b.sealed.len() > pack_size && !builder.is_empty() {
                let full = std::mem::replace(&mut builder, PackBuilder::new(pack_size));
                let (r, c) = (repo.clone(), cancel.clone());
                uploads.push_back(Task::spawn(async move { r.write_pack(full, &c).await }));
                if uploads.len() > REPACK_UPLOADS {
                    let (_, es, _) = uploads.pop_front().expect("an upload").join().await??;
                    new_entries.extend(es);
                }
            }
            builder.add(b)?;
            rep.bytes_copied += b.sealed.len() as u64;
        }
    }
    if !builder.is_empty() {
        let (r, c) = (repo.clone(), cancel.clone());
        uploads.push_back(Task::spawn(async move { r.write_pack(builder, &c).await }));
    }
    while let Some(u) = uploads.pop_front() {
        let (_, es, _) = u.join().await??;
        new_entries.extend(es);
    }
    rep.timed("repack", t);
    let t = std::time::Instant::now();
    let repacked: HashSet<PackId> = repack.iter().filter(|p| !failed_repack.contains(p)).copied().chain(recompressed.iter().copied()).collect();
    rep.packs_repacked -= repack.iter().filter(|p| failed_repack.contains(p)).count();
    let going: HashSet<PackId> = drop_packs.iter().copied().chain(repacked.iter().copied()).collect();

    // Only the segments that name a pack that goes are rewritten — without those entries,
    // plus the copies; every other segment stays as it is, so nodes' local indexes re-read
    // only what changed (`local_index::sync`).
    let mut dirty: HashSet<IndexId> = HashSet::new();
    let mut taken: Vec<IndexEntry> = Vec::new();
    v.idx.for_each(|e, seg| {
        if going.contains(&e.loc.pack) {
            dirty.insert(seg);
            taken.push(*e);
        }
        Ok(())
    })?;
    let lease = me.lease();
    let mut written: Vec<IndexId> = Vec::new();
    let mut copies = Some(new_entries);
    let mut from: Option<Vec<u8>> = None;
    let mut done = dirty.is_empty();
    while !done || copies.is_some() {
        // A segment's worth of the dirty segments' other entries at a time (in chunk
        // order, one per chunk and pack), then the copies.
        let mut part: Vec<IndexEntry> = Vec::new();
        if !done {
            let mut last: Option<(ChunkId, PackId)> = None;
            let next = v.idx.scan(from.as_deref(), |e, seg| {
                if part.len() >= SEGMENT_ENTRIES {
                    return Ok(false);
                }
                if dirty.contains(&seg) && !going.contains(&e.loc.pack) && last != Some((e.id, e.loc.pack)) {
                    part.push(*e);
                    last = Some((e.id, e.loc.pack));
                }
                Ok(true)
            })?;
            done = next.is_none();
            from = next;
        }
        if done {
            if let Some(c) = copies.take() {
                part.extend(c);
            }
        }
        for piece in part.chunks(SEGMENT_ENTRIES) {
            let id = lease.commit("writing the new index", async { Ok(repo.write_index(piece, cancel).await?) }).await?;
            v.idx.add(id, piece)?;
            written.push(id);
            rep.index_segments_written += 1;
        }
    }
    rep.index_segments_kept += v.idx.segments.len() - dirty.len() - written.len();
    let (record_id, created_ms) = new_record_id();
    let p = PendingDeletion { created_ms, orphans: orphans.clone(), forgotten: Vec::new(), entries: taken };
    lease.commit("writing the gc record", async { Ok(repo.write_pending(&record_id, &p, cancel).await?) }).await?;
    rep.records_written += 1;
    let replaced: HashSet<IndexId> = dirty.iter().filter(|s| !written.contains(s)).copied().collect();
    let old: Vec<String> = replaced.iter().map(names::index).collect();
    delete_objects(repo, &old, &lease, "deleting replaced index segments", cancel).await?;
    rep.index_segments_deleted += old.len();
    // A new generation after the deletions and before the locks: a node that lists it
    // lists every segment again and drops the deleted ones; one that listed the markers
    // before holds a lock listed now (docs/gc.md).
    if !old.is_empty() {
        lease.commit("writing a gc generation marker", async { Ok(repo.write_generation(cancel).await?) }).await?;
    }
    // Every backup that may have read the old segments holds a lock now listed.
    let live = live_locks(repo, me, cancel).await?;
    let ready = ready_now(&live);
    lease.commit("writing the gc record's ready marker", async { Ok(repo.write_ready(&record_id, &ready, cancel).await?) }).await?;
    v.idx.remove(&replaced)?;
    rep.timed("index", t);
    Ok(Some(Record { id: record_id, p, ready: Some(ready) }))
}

/// Runs CPU-bound `f` (which borrows) without stalling other tasks: through
/// `block_in_place` on a multi-threaded runtime; on a current-thread runtime (a test, an
/// embedding), where `block_in_place` panics, in place.
fn off_reactor<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A new record's id (time first, so records list oldest first) and its creation time.
pub(super) fn new_record_id() -> (String, u64) {
    let created_ms = mover_format::now_unix_ms();
    (format!("{created_ms:013}-{}", hex::encode(rand::random::<[u8; 4]>())), created_ms)
}

/// A record's `.ready` marker: the locks live now.
pub(super) fn ready_now(live: &[lock::LockView]) -> Ready {
    Ready { locks: live.iter().map(|l| l.info.id.clone()).collect(), written_ms: mover_format::now_unix_ms() }
}

#[cfg(test)]
mod tests {
    /// gc's verification runs off the reactor on a multi-threaded runtime and in place on a
    /// current-thread one, where `block_in_place` would panic (an embedding, a test).
    #[tokio::test(flavor = "current_thread")]
    async fn off_reactor_does_not_panic_on_a_current_thread_runtime() {
        let v = [1u8, 2, 3];
        assert_eq!(super::off_reactor(|| v.iter().map(|&b| b as u32).sum::<u32>()), 6);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn off_reactor_blocks_in_place_on_a_multi_threaded_runtime() {
        let v = [1u8, 2, 3];
        assert_eq!(super::off_reactor(|| v.len()), 3);
    }
}
