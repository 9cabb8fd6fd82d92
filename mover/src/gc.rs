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
//! ([`with_pending`]). Every step is idempotent, so a killed `gc` is finished by the next.

use crate::lock::{self, RepoLock};
use anyhow::{anyhow, bail, Context, Result};
use mover_format::blob::EncodedBlob;
use mover_format::index::{BlobLocation, IndexEntry};
use mover_format::local_index::{ChunkIndex, MemIndex};
use mover_format::manifest::Manifest;
use mover_format::pack::PackBuilder;
use mover_format::pending::{PendingDeletion, Ready};
use mover_format::tree::{MapEntry, SegmentGroup, SegmentMap, SegmentRef};
use mover_format::{names, ChunkId, IndexId, PackId, Repository, SnapshotId};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Entries per index segment GC writes (about 5 MiB each).
const SEGMENT_ENTRIES: usize = 65_536;

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub dry_run: bool,
    /// Repack a pack when more than this share of its bytes is unreferenced (0.0–1.0).
    pub repack_unused: f64,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self { dry_run: false, repack_unused: 0.3 }
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
    pub stale_locks_removed: usize,
    /// What the mark decided, pack by pack.
    pub plan: Vec<PlannedPack>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedPack {
    pub pack: PackId,
    /// `delete` (nothing referenced), `repack` (mostly unreferenced), `unindexed`.
    pub action: &'static str,
    pub size: u64,
    pub referenced_bytes: u64,
}

/// A record as loaded: its entries and, once complete, its `.ready` marker.
struct Record {
    id: String,
    p: PendingDeletion,
    ready: Option<Ready>,
}

/// What GC knows about the repository; only grows while it runs.
#[derive(Default)]
struct View {
    packs: HashMap<PackId, u64>,
    segments: BTreeSet<IndexId>,
    entries: Vec<IndexEntry>,
    first: HashMap<ChunkId, BlobLocation>,
    snapshots: HashSet<SnapshotId>,
    reachable: HashSet<ChunkId>,
}

impl View {
    fn add_entries(&mut self, es: &[IndexEntry]) {
        for e in es {
            self.first.entry(e.id).or_insert(e.loc);
        }
        self.entries.extend_from_slice(es);
    }

    fn replace_index(&mut self, segments: BTreeSet<IndexId>, entries: Vec<IndexEntry>) {
        self.segments = segments;
        self.entries.clear();
        self.first.clear();
        self.add_entries(&entries);
    }

    fn indexed_packs(&self) -> HashSet<PackId> {
        self.entries.iter().map(|e| e.loc.pack).collect()
    }

    /// Reads index segments not seen yet. An unreadable segment stops GC: its packs would
    /// look unindexed.
    async fn refresh_index(&mut self, repo: &Repository, cancel: &CancellationToken) -> Result<()> {
        for id in repo.list_index(cancel).await? {
            if self.segments.contains(&id) {
                continue;
            }
            let es = repo
                .read_index(&id, cancel)
                .await
                .map_err(|e| anyhow!("{e:#}; gc deletes nothing while an index segment is unreadable (run `mover check`, then `mover index rebuild`)"))?;
            self.add_entries(&es);
            self.segments.insert(id);
        }
        Ok(())
    }

    /// Reads snapshots not seen yet and marks what they reference.
    async fn refresh_snapshots(&mut self, repo: &Repository, pending: &HashMap<ChunkId, BlobLocation>, cancel: &CancellationToken) -> Result<()> {
        for id in repo.list_snapshot_ids(cancel).await? {
            if self.snapshots.contains(&id) {
                continue;
            }
            let m = match repo.read_snapshot(&id, cancel).await {
                Ok(m) => m,
                // Forgotten between listing and reading: its record (read later) keeps it.
                Err(mover_format::RepoError::NotFound { .. }) => continue,
                Err(e) => return Err(anyhow!("{e:#}; gc deletes nothing while a snapshot is unreadable")),
            };
            self.walk(repo, &id, &m, pending, cancel).await?;
            self.snapshots.insert(id);
        }
        Ok(())
    }

    /// Marks every blob `m` references.
    async fn walk(
        &mut self,
        repo: &Repository,
        sid: &SnapshotId,
        m: &Manifest,
        pending: &HashMap<ChunkId, BlobLocation>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        for md in &m.metadata {
            self.reachable.insert(md.blob);
        }
        for vol in &m.volumes {
            for g in &vol.groups {
                if !self.reachable.insert(*g) {
                    continue;
                }
                let what = format!("snapshot {sid} volume '{}' segment group {g}", vol.name);
                let group = SegmentGroup::decode(&self.blob(repo, g, pending, &what, cancel).await?).with_context(|| what.clone())?;
                for r in &group.segments {
                    let SegmentRef::Map { map, .. } = r else { continue };
                    if !self.reachable.insert(*map) {
                        continue;
                    }
                    let what = format!("snapshot {sid} volume '{}' segment map {map}", vol.name);
                    let sm = SegmentMap::decode(&self.blob(repo, map, pending, &what, cancel).await?).with_context(|| what.clone())?;
                    for e in &sm.entries {
                        if let MapEntry::Chunk { id, .. } = e {
                            self.reachable.insert(*id);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn blob(
        &mut self,
        repo: &Repository,
        id: &ChunkId,
        pending: &HashMap<ChunkId, BlobLocation>,
        what: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<u8>> {
        if !self.first.contains_key(id) && !pending.contains_key(id) {
            // A snapshot written after the index was read: its segments are there by now.
            self.refresh_index(repo, cancel).await?;
        }
        let loc = self.first.get(id).or_else(|| pending.get(id)).ok_or_else(|| {
            anyhow!(
                "{what}: blob is in no index segment of repository {}; gc deletes nothing until `mover index rebuild` has indexed every pack",
                repo.location()
            )
        })?;
        Ok(repo.read_blob(id, loc, cancel).await.with_context(|| format!("{what}; gc deletes nothing while a referenced blob is unreadable"))?)
    }
}

fn pending_locations(records: &[Record]) -> HashMap<ChunkId, BlobLocation> {
    let mut m = HashMap::new();
    for r in records {
        for e in &r.p.entries {
            m.entry(e.id).or_insert(e.loc);
        }
    }
    m
}

/// The records in the store. GC and forget hold the `gc` lock, so nothing else removes a
/// record while they read; readers (`shared`) may see one swept between listing and
/// reading, and skip it.
async fn load_records_as(repo: &Repository, shared: bool, cancel: &CancellationToken) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (id, has_entries, has_ready) in repo.list_gc_records(cancel).await? {
        if !has_entries {
            continue; // a sweep was killed between deleting `.entries` and `.ready`
        }
        let p = match repo.read_pending(&id, cancel).await {
            Ok(p) => p,
            Err(mover_format::RepoError::Storage(e)) if shared && e.is_not_found() => continue,
            Err(e) => return Err(anyhow!("{e:#}; gc deletes nothing while a gc record is unreadable")),
        };
        let ready = if !has_ready {
            None
        } else {
            match repo.read_ready(&id, cancel).await {
                Ok(r) => Some(r),
                Err(mover_format::RepoError::Storage(e)) if shared && e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            }
        };
        out.push(Record { id, p, ready });
    }
    Ok(out)
}

async fn load_records(repo: &Repository, cancel: &CancellationToken) -> Result<Vec<Record>> {
    load_records_as(repo, false, cancel).await
}

/// Runs GC: sweep what earlier runs left, mark, sweep again. Holds the `gc` lock throughout.
pub async fn run(repo: &Repository, opts: &GcOptions, cancel: &CancellationToken) -> Result<GcReport> {
    if !(0.0..=1.0).contains(&opts.repack_unused) {
        bail!("--repack-unused must be between 0 and 1 (a share of a pack's bytes), not {}", opts.repack_unused);
    }
    let lock = RepoLock::acquire_exclusive(repo, "run gc", cancel).await?;
    let r = run_locked(repo, opts, &lock, cancel).await;
    lock.release().await;
    r
}

async fn run_locked(repo: &Repository, opts: &GcOptions, me: &RepoLock, cancel: &CancellationToken) -> Result<GcReport> {
    let mut rep = GcReport { dry_run: opts.dry_run, ..Default::default() };
    let lease = me.lease();
    let mut v = View::default();
    // Order matters (docs/gc.md): packs, then index, then records and snapshots; locks last.
    // Manifests parked by `forget` become roots in `sweep`, unless their record is swept.
    v.packs = repo.list_packs(cancel).await?.into_iter().collect();
    rep.packs_before = v.packs.len();
    rep.bytes_before = v.packs.values().sum();
    v.refresh_index(repo, cancel).await?;
    let mut records = load_records(repo, cancel).await?;
    v.refresh_snapshots(repo, &pending_locations(&records), cancel).await?;
    rep.snapshots = v.snapshots.len();

    // Locks that expired or whose process is gone protect nothing; tidy them away (ours
    // is live, so it stays).
    if !opts.dry_run {
        rep.stale_locks_removed = lock::unlock(repo, false, cancel).await?.len();
    }

    sweep(repo, &mut v, &mut records, me, opts.dry_run, &mut rep, cancel).await?;
    lease.check()?;
    if let Some(record) = mark(repo, &mut v, &records, opts, me, &mut rep, cancel).await? {
        records.push(record);
        sweep(repo, &mut v, &mut records, me, opts.dry_run, &mut rep, cancel).await?;
    }
    rep.records_held = records.len();
    Ok(rep)
}

/// Live lock ids other than `me`.
async fn live_locks(repo: &Repository, me: &RepoLock, cancel: &CancellationToken) -> Result<Vec<lock::LockView>> {
    Ok(lock::list(repo, cancel).await?.into_iter().filter(|l| l.stale.is_none() && l.info.id != me.id()).collect())
}

/// Sweeps every record none of whose locks is live; keeps the others in `records`.
async fn sweep(
    repo: &Repository,
    v: &mut View,
    records: &mut Vec<Record>,
    me: &RepoLock,
    dry_run: bool,
    rep: &mut GcReport,
    cancel: &CancellationToken,
) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let live = live_locks(repo, me, cancel).await?;
    let live_ids: HashSet<&str> = live.iter().map(|l| l.info.id.as_str()).collect();
    // A record whose gc was killed before `.ready`: its gc is gone, so the locks live now
    // are a superset of what it must wait for.
    for r in records.iter_mut().filter(|r| r.ready.is_none()) {
        let ready = ready_now(&live);
        if !dry_run {
            repo.write_ready(&r.id, &ready, cancel).await?;
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
    let pending = pending_locations(records);
    let pending_all: HashMap<ChunkId, BlobLocation> = pending.into_iter().chain(pending_locations(&eligible)).collect();
    for r in records.iter() {
        for (sid, bytes) in &r.p.forgotten {
            let m = Manifest::open(repo.keys(), bytes).map_err(|e| anyhow!("forgotten snapshot {sid} in gc record {}: {e}", r.id))?;
            v.walk(repo, sid, &m, &pending_all, cancel).await?;
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
            if v.reachable.contains(&e.id) && !v.first.contains_key(&e.id) && v.packs.contains_key(&e.loc.pack) {
                resurrect.entry(e.id).or_insert(*e);
            }
        }
    }
    if !resurrect.is_empty() {
        let es: Vec<IndexEntry> = resurrect.into_values().collect();
        rep.entries_resurrected += es.len();
        if !dry_run {
            let id = repo.write_index(&es, cancel).await?;
            v.segments.insert(id);
            rep.index_segments_written += 1;
        }
        v.add_entries(&es);
    }
    let keep: HashSet<PackId> = v.indexed_packs().into_iter().chain(records.iter().flat_map(|r| r.p.packs())).collect();
    for r in &eligible {
        for p in r.p.packs() {
            if keep.contains(&p) {
                continue;
            }
            let Some(size) = v.packs.remove(&p) else { continue };
            if !dry_run {
                repo.delete_object(&names::pack(&p), cancel).await?;
            }
            rep.packs_deleted += 1;
            rep.bytes_freed += size;
        }
        if !dry_run {
            repo.delete_object(&names::gc_entries(&r.id), cancel).await?;
            repo.delete_object(&names::gc_ready(&r.id), cancel).await?;
        }
        rep.records_swept += 1;
    }
    Ok(())
}

/// Takes garbage out of the index into a new record; `None` when there is nothing to do.
async fn mark(
    repo: &Repository,
    v: &mut View,
    records: &[Record],
    opts: &GcOptions,
    me: &RepoLock,
    rep: &mut GcReport,
    cancel: &CancellationToken,
) -> Result<Option<Record>> {
    // One location per chunk: the pack with the most referenced bytes wins.
    let mut by_pack: HashMap<PackId, Vec<IndexEntry>> = HashMap::new();
    let mut seen: HashSet<(ChunkId, PackId)> = HashSet::new();
    for e in &v.entries {
        if seen.insert((e.id, e.loc.pack)) {
            by_pack.entry(e.loc.pack).or_default().push(*e);
        }
    }
    let naive: HashMap<PackId, u64> =
        by_pack.iter().map(|(p, es)| (*p, es.iter().filter(|e| v.reachable.contains(&e.id)).map(|e| e.loc.stored_len as u64).sum())).collect();
    let mut home: HashMap<ChunkId, PackId> = HashMap::new();
    for e in &v.entries {
        let better = match home.get(&e.id) {
            None => true,
            Some(cur) => naive.get(&e.loc.pack) > naive.get(cur) || (naive.get(&e.loc.pack) == naive.get(cur) && e.loc.pack < *cur),
        };
        if better && v.packs.contains_key(&e.loc.pack) {
            home.insert(e.id, e.loc.pack);
        }
    }
    let held_packs: HashSet<PackId> = records.iter().flat_map(|r| r.p.packs()).collect();
    let (mut drop_packs, mut repack): (Vec<PackId>, Vec<PackId>) = (Vec::new(), Vec::new());
    let mut live_of: HashMap<PackId, u64> = HashMap::new();
    for (p, es) in &by_pack {
        let Some(&size) = v.packs.get(p) else { continue }; // missing pack: `check` reports it
        let live: u64 = es.iter().filter(|e| v.reachable.contains(&e.id) && home.get(&e.id) == Some(p)).map(|e| e.loc.stored_len as u64).sum();
        live_of.insert(*p, live);
        if live == 0 {
            drop_packs.push(*p);
        } else if size > 0 && (size - live.min(size)) as f64 / size as f64 > opts.repack_unused {
            repack.push(*p);
        }
    }
    let orphans: Vec<PackId> = v.packs.keys().filter(|p| !by_pack.contains_key(p) && !held_packs.contains(p)).copied().collect();
    let present = v.entries.iter().filter(|e| v.packs.contains_key(&e.loc.pack)).map(|e| (e.id, e.loc.pack)).collect::<HashSet<_>>().len();
    let duplicates = present != home.len();
    for (list, action) in [(&drop_packs, "delete"), (&repack, "repack"), (&orphans, "unindexed")] {
        for p in list.iter() {
            rep.plan.push(PlannedPack { pack: *p, action, size: v.packs[p], referenced_bytes: live_of.get(p).copied().unwrap_or(0) });
        }
    }
    rep.packs_unreferenced += drop_packs.len();
    rep.packs_repacked += repack.len();
    rep.packs_unindexed += orphans.len();
    if drop_packs.is_empty() && repack.is_empty() && orphans.is_empty() && !duplicates {
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
    let mut new_entries: Vec<IndexEntry> = Vec::new();
    let pack_size = repo.config().pack_size as usize;
    let mut builder = PackBuilder::new(pack_size);
    let mut failed_repack: HashSet<PackId> = HashSet::new();
    for p in &repack {
        let bytes = repo.get_object(&names::pack(p), cancel).await?;
        let mut blobs = Vec::new();
        for e in by_pack[p].iter().filter(|e| v.reachable.contains(&e.id) && home.get(&e.id) == Some(p)) {
            let (a, b) = (e.loc.offset as usize, e.loc.offset as usize + e.loc.stored_len as usize);
            let ok = bytes.get(a..b).map(|s| repo.decode_blob(&e.id, &e.loc, s));
            match ok {
                Some(Ok(_)) => blobs.push(EncodedBlob { id: e.id, kind: e.loc.kind, raw_len: e.loc.raw_len, sealed: bytes[a..b].to_vec() }),
                Some(Err(err)) => {
                    tracing::warn!("not repacking pack {p}: {err:#}");
                    failed_repack.insert(*p);
                    break;
                }
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
        for b in &blobs {
            if builder.len() + b.sealed.len() > pack_size && !builder.is_empty() {
                let full = std::mem::replace(&mut builder, PackBuilder::new(pack_size));
                let (_, es, _) = repo.write_pack(full, cancel).await?;
                new_entries.extend(es);
            }
            builder.add(b)?;
            rep.bytes_copied += b.sealed.len() as u64;
        }
    }
    if !builder.is_empty() {
        let (_, es, _) = repo.write_pack(builder, cancel).await?;
        new_entries.extend(es);
    }
    let repacked: HashSet<PackId> = repack.iter().filter(|p| !failed_repack.contains(p)).copied().collect();
    rep.packs_repacked -= failed_repack.len();
    let going: HashSet<PackId> = drop_packs.iter().copied().chain(repacked.iter().copied()).collect();

    // The new index: every entry of the packs that stay (one per chunk), and the copies.
    let mut kept: Vec<IndexEntry> = Vec::new();
    let mut emitted: HashSet<ChunkId> = new_entries.iter().map(|e| e.id).collect();
    let mut taken: Vec<IndexEntry> = Vec::new();
    for e in &v.entries {
        if going.contains(&e.loc.pack) {
            taken.push(*e);
        } else if v.packs.contains_key(&e.loc.pack) && home.get(&e.id).is_none_or(|h| h == &e.loc.pack || !v.reachable.contains(&e.id)) && emitted.insert(e.id)
        {
            kept.push(*e);
        } else if !v.packs.contains_key(&e.loc.pack) {
            // An entry for a missing pack stays as it is, for `check` to report.
            kept.push(*e);
        }
    }
    kept.extend(new_entries);
    me.lease().check()?;
    let mut new_segments = BTreeSet::new();
    for part in kept.chunks(SEGMENT_ENTRIES) {
        new_segments.insert(repo.write_index(part, cancel).await?);
        rep.index_segments_written += 1;
    }
    let (record_id, created_ms) = new_record_id();
    let p = PendingDeletion { created_ms, orphans: orphans.clone(), forgotten: Vec::new(), entries: taken };
    repo.write_pending(&record_id, &p, cancel).await?;
    rep.records_written += 1;
    for s in v.segments.iter().filter(|s| !new_segments.contains(s)) {
        repo.delete_object(&names::index(s), cancel).await?;
        rep.index_segments_deleted += 1;
    }
    // Every backup that may have read the old segments holds a lock now listed.
    let live = live_locks(repo, me, cancel).await?;
    let ready = ready_now(&live);
    repo.write_ready(&record_id, &ready, cancel).await?;
    v.replace_index(new_segments, kept);
    Ok(Some(Record { id: record_id, p, ready: Some(ready) }))
}

/// A new record's id (time first, so records list oldest first) and its creation time.
fn new_record_id() -> (String, u64) {
    let created_ms = mover_format::now_unix_ms();
    (format!("{created_ms:013}-{}", hex::encode(rand::random::<[u8; 4]>())), created_ms)
}

/// A record's `.ready` marker: the locks live now.
fn ready_now(live: &[lock::LockView]) -> Ready {
    Ready { locks: live.iter().map(|l| l.info.id.clone()).collect(), written_ms: mover_format::now_unix_ms() }
}

/// Parks forgotten manifests in a record (under the `gc` lock) and deletes them from
/// `snapshots/`. They stay roots for GC until every lock live now is gone.
pub async fn forget_snapshots(repo: &Repository, ids: &[SnapshotId], cancel: &CancellationToken) -> Result<usize> {
    if ids.is_empty() {
        return Ok(0);
    }
    let me = RepoLock::acquire_exclusive(repo, "forget snapshots", cancel).await?;
    let r = async {
        let mut forgotten = Vec::new();
        for id in ids {
            let bytes = repo.get_object(&names::snapshot(id), cancel).await.with_context(|| format!("reading snapshot {id} to forget it"))?;
            forgotten.push((*id, bytes.to_vec()));
        }
        let (record_id, created_ms) = new_record_id();
        repo.write_pending(&record_id, &PendingDeletion { created_ms, forgotten, ..Default::default() }, cancel).await?;
        for id in ids {
            repo.delete_object(&names::snapshot(id), cancel).await?;
        }
        let live = live_locks(repo, &me, cancel).await?;
        repo.write_ready(&record_id, &ready_now(&live), cancel).await?;
        Ok::<usize, anyhow::Error>(ids.len())
    }
    .await;
    me.release().await;
    r
}

/// Syncs `index` and returns it plus the entries of unswept GC records, for reading
/// snapshots: a snapshot whose backup used an entry GC had just taken out restores before
/// the next sweep puts it back.
pub async fn with_pending(repo: &Repository, index: Arc<dyn ChunkIndex>, cancel: &CancellationToken) -> Result<Arc<dyn ChunkIndex>> {
    // Records first, then the index: a record swept in between has put its live entries
    // back into an index segment before it was deleted, and the sync sees that segment.
    let records = load_records_as(repo, true, cancel).await?;
    mover_format::local_index::sync(repo, &*index, cancel).await?;
    if records.iter().all(|r| r.p.entries.is_empty()) {
        return Ok(index);
    }
    let extra = MemIndex::default();
    for r in &records {
        extra.ingest(None, &r.p.entries)?;
    }
    Ok(Arc::new(Fallback { primary: index, extra }))
}

struct Fallback {
    primary: Arc<dyn ChunkIndex>,
    extra: MemIndex,
}

impl ChunkIndex for Fallback {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, mover_format::RepoError> {
        match self.primary.lookup(id)? {
            Some(l) => Ok(Some(l)),
            None => self.extra.lookup(id),
        }
    }
    fn ingested_segments(&self) -> Result<HashSet<IndexId>, mover_format::RepoError> {
        self.primary.ingested_segments()
    }
    fn entry_count(&self) -> Result<u64, mover_format::RepoError> {
        self.primary.entry_count()
    }
    fn active_generation(&self) -> Result<u64, mover_format::RepoError> {
        self.primary.active_generation()
    }
    fn begin_generation(&self) -> Result<u64, mover_format::RepoError> {
        self.primary.begin_generation()
    }
    fn ingest_into(&self, generation: u64, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), mover_format::RepoError> {
        self.primary.ingest_into(generation, segment, entries)
    }
    fn activate(&self, generation: u64) -> Result<(), mover_format::RepoError> {
        self.primary.activate(generation)
    }
}

/// Entry locations of unswept records, for `check`.
pub async fn pending_entries(repo: &Repository, cancel: &CancellationToken) -> Result<HashMap<ChunkId, BlobLocation>> {
    Ok(pending_locations(&load_records_as(repo, true, cancel).await?))
}
