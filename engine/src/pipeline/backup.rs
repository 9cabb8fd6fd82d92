//! Backup: reader → chunk + hash + dedup (worker threads, one per core) → compress +
//! encrypt (new chunks only, same workers) → pack → upload → commit (index segment, then
//! manifest). Bounded channels and a fixed buffer pool bound memory; the first error or a
//! cancel stops every stage; segment results are put back in volume order so the manifest
//! does not depend on scheduling.
//!
//! Order (`docs/gc.md`): write the backup lease, sync the local index, resolve the parent,
//! open each source (which asks its change source, relative to the parent), run, write the
//! manifest, release the lease.

use super::chunk::{spawn_workers, SegOut, Shared};
use super::packer::Packer;
use super::reader::{self, IoBackend, IoChoice, ReadDone, ReadJob, ReadPlan};
use super::splice::ParentMaps;
use crate::aligned::{AlignedBuf, ALIGN};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::lock::{self, Hold, Lease};
use crate::progress::Progress;
use crate::source::{self, Opened, ParentVolume, Reader, VolumeSource};
use mover_format::blob::{BlobEncoder, BlobKind};
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::{ChangeSource, Manifest, MetadataEntry, VolumeEntry, VolumeStats, MANIFEST_VERSION};
use mover_format::tree::{SegRefs, SegmentGroup, SegmentMap, SegmentRef, GROUP_SEGMENTS};
use mover_format::{ChunkId, Repository, SnapshotId};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The largest volume Mover backs up (64 TiB): a size a source reports beyond it is
/// refused before anything is allocated for it (16 Mi segments of 4 MiB).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// Which snapshot the backup is incremental to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentChoice {
    None,
    /// The newest snapshot of the backup's group, found once the lease is held.
    Latest,
    /// A snapshot the caller named (checked to hold every volume when the request was
    /// validated).
    Id(SnapshotId),
}

/// A volume to back up: its name in the snapshot, where it is read from, and the
/// checkpoint to record for the next incremental.
pub struct VolumeInput {
    pub name: String,
    pub source: Box<dyn VolumeSource>,
    /// Recorded as the volume's `change_base`: the change-tracking point this snapshot was
    /// taken at (a bitmap, a CSI snapshot handle, a KubeVirt checkpoint).
    pub checkpoint: Option<String>,
    /// For a copy: the volume's `source` and `change_source` as the original snapshot
    /// recorded them (they say what the data was read from, which a copy does not change).
    pub recorded: Option<(String, ChangeSource)>,
}

/// What a copied snapshot keeps of its original (`mover copy`).
#[derive(Debug, Clone)]
pub struct CopyOf {
    pub time_unix_ms: u64,
    pub hostname: String,
    pub duration_ms: u64,
    pub origin: mover_format::manifest::Origin,
}

/// How hard the pipeline works; defaults fit a node that also runs VMs.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub io: IoChoice,
    /// Segment reads in flight.
    pub queue_depth: usize,
    /// Chunking and compression threads.
    pub workers: usize,
    /// Pack uploads in flight; 0 picks by store (see [`upload_slots`]).
    pub upload_concurrency: usize,
    /// Uploaded packs per index segment (checkpoint).
    pub checkpoint_packs: usize,
    /// Upload bandwidth limits (node-wide and per transfer); every pack takes from each.
    pub limiters: Vec<Arc<crate::ratelimit::RateLimiter>>,
    /// Segments a change source called unchanged that are read anyway and compared with
    /// the parent ([`DEFAULT_VERIFY_SAMPLE`]; 0: none). One that differs makes the backup
    /// read the whole volume.
    pub verify_sample: usize,
    /// Every Nth backup in a row of a volume that took a change source's word reads the
    /// whole volume instead and compares (0: never).
    pub compare_every: u32,
}

/// Segments sampled per volume by default: a source whose omissions touch at least 5 % of
/// the segments it called unchanged is caught with probability 1 - 0.95^64 > 96 %, for a
/// volume of any size, at the cost of reading 256 MiB (4 MiB segments); see
/// `docs/change-sources.md`.
pub const DEFAULT_VERIFY_SAMPLE: usize = 64;

impl Default for Tuning {
    fn default() -> Self {
        Self {
            io: IoChoice::Auto,
            queue_depth: 4,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            upload_concurrency: 0,
            checkpoint_packs: 4,
            limiters: Vec::new(),
            verify_sample: DEFAULT_VERIFY_SAMPLE,
            compare_every: 0,
        }
    }
}

/// A validated backup, ready to run.
pub struct BackupJob {
    /// What is protected: recorded in the manifest; `latest` is looked up within it.
    pub group: String,
    pub volumes: Vec<VolumeInput>,
    pub parent: ParentChoice,
    pub metadata: Vec<(String, Vec<u8>)>,
    pub tags: BTreeMap<String, String>,
    pub tuning: Tuning,
    /// Set when the job copies a snapshot from another repository.
    pub copy_of: Option<CopyOf>,
}

/// Pack uploads in flight: `requested`, or for 0 two to a local directory (its `O_DIRECT`
/// writes run at device speed; a third only holds another 16 MiB) and three to S3 (where
/// latency, not the disk, limits one upload).
fn upload_slots(repo: &Repository, requested: usize) -> usize {
    match requested {
        0 if repo.is_remote() => 3,
        0 => 2,
        n => n,
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeSummary {
    pub name: String,
    pub change_source: ChangeSource,
    /// Set when a change source failed and the volume was read in full (parent reuse on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_fallback: Option<String>,
    /// How the change source's word was checked, when one was given and trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_check: Option<ChangeCheck>,
    #[serde(flatten)]
    pub stats: VolumeStats,
}

/// The check of what a change source called unchanged: segments read anyway and compared
/// with the parent, and how many differed (then the volume was read in full).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChangeCheck {
    pub source: ChangeSource,
    /// Segments compared with the parent.
    pub compared: u64,
    /// Of those, segments that differed: the source left out changes.
    pub differed: u64,
    /// Bytes the sample read from the source (besides the backup's own `bytes_read`).
    pub bytes: u64,
    /// A periodic full comparison (every segment read), rather than a sample.
    pub full: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub snapshot_id: SnapshotId,
    pub group: String,
    pub parent: Option<SnapshotId>,
    #[serde(flatten)]
    pub stats: VolumeStats,
    pub duration_s: f64,
    pub io_backend: String,
    pub packs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub volumes: Vec<VolumeSummary>,
}

/// Runs a backup and writes its manifest. Progress is reported through `progress`.
///
/// The backup holds a `backup` lock from before it syncs the local index until its
/// manifest is written, so `gc` knows what it may still reference (`docs/gc.md`).
pub(crate) async fn backup(
    repo: &Repository,
    index: Arc<dyn ChunkIndex>,
    job: BackupJob,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<BackupSummary> {
    lock::scope(repo, Hold::Backup, cancel, |held| async move {
        tracing::debug!("backup lock held");
        // After the lock: segments a gc replaced before it are seen as gone. Dedup looks
        // chunks up in the index only; the parent's tree may also use entries of unswept gc
        // records, which the parent (or its parked manifest) keeps alive (docs/gc.md).
        // The parent first: a listing of the index that began after it was written (and
        // less than MOVER_INDEX_SYNC_INTERVAL ago) is not repeated (docs/gc.md).
        let parent = resolve_parent(repo, &job, cancel).await?;
        tracing::debug!(parent = ?parent.as_ref().map(|p| p.0), "parent resolved");
        let reuse = crate::index::reuse_for_backup(parent.as_ref().map(|(_, m, _)| m));
        let (view, q) = held.view_screened(index.clone(), reuse, cancel).await.context("syncing the local index")?;
        let tree = view.index().clone();
        tracing::debug!(quarantined = q.len(), "local index in sync");
        // Damaged locations are never deduplicated against: what they held is stored anew
        // (docs/repair.md), and the segments of the parent that need it are read again.
        let index = crate::index::quarantine::screen(index, &q, crate::index::Screen::Dedup);
        let unhealed = Arc::new(q.unhealed(&*tree)?);
        let r = run(repo, index, tree, job, parent, unhealed, progress, held.lease(), cancel).await;
        crate::index::quarantine::note_seen(repo, "backup").await;
        r
    })
    .await
}

/// The parent, read after the lease is held (a parent forgotten before that is not used:
/// its chunks may be gone).
async fn resolve_parent(repo: &Repository, job: &BackupJob, cancel: &CancellationToken) -> Result<Option<(SnapshotId, Manifest, bool)>> {
    match &job.parent {
        ParentChoice::None => Ok(None),
        ParentChoice::Id(id) => match repo.read_snapshot(id, cancel).await {
            Ok(m) => Ok(Some((*id, m, true))),
            Err(mover_format::RepoError::NotFound { .. }) => Err(Error::not_found(format!("parent snapshot {id} was forgotten before this backup started"))),
            Err(e) => Err(e.into()),
        },
        ParentChoice::Latest => {
            let found = crate::snapshots::latest(repo, &job.group, cancel).await?;
            if found.is_none() {
                tracing::info!("group '{}' has no snapshot yet: this backup reads everything", job.group);
            }
            Ok(found.map(|(id, m)| (id, m, false)))
        }
    }
}

/// A volume opened for the pipeline.
struct OpenVolume {
    name: String,
    source: String,
    recorded: Option<(String, ChangeSource)>,
    checkpoint: Option<String>,
    opened: Opened,
    parent: Option<(SnapshotId, VolumeEntry)>,
}

async fn run(
    repo: &Repository,
    index: Arc<dyn ChunkIndex>,
    tree: Arc<dyn ChunkIndex>,
    job: BackupJob,
    parent: Option<(SnapshotId, Manifest, bool)>,
    unhealed: Arc<HashSet<ChunkId>>,
    progress: Arc<Progress>,
    lease: Lease,
    cancel: &CancellationToken,
) -> Result<BackupSummary> {
    let started = Instant::now();
    let segment_size = repo.config().chunker.segment_size;
    // Open every source before reading any: a wrong path or an unreachable server fails
    // here, naming it, before anything is uploaded.
    let mut vols = Vec::new();
    for v in job.volumes {
        let source = v.source.describe();
        let pvol =
            parent.as_ref().and_then(|(id, m, named)| m.volume(&v.name).map(|pv| (ParentVolume { snapshot: *id, volume: pv, named: *named }, pv.clone())));
        let mut opened = v.source.open(pvol.as_ref().map(|p| p.0), cancel).await.with_context(|| format!("volume '{}'", v.name))?;
        if opened.size > MAX_VOLUME_SIZE {
            return Err(Error::invalid(format!(
                "volume '{}': {source} has {} bytes, more than the largest volume Mover backs up ({MAX_VOLUME_SIZE})",
                v.name, opened.size
            )));
        }
        if let Some(ext) = &opened.changes.changed {
            source::validate_extents(&v.name, ext, opened.size)?;
        }
        source::trust_changes(&mut opened.changes, &v.name, &source, pvol.as_ref().map(|p| p.0), segment_size);
        source::check_sparse(&opened.changes, &v.name, &source)?;
        if let Some(f) = &opened.changes.fallback {
            tracing::warn!("volume '{}': {f}; reading everything (unchanged segments still reused from the parent)", v.name);
        }
        let mut checkpoint = v.checkpoint;
        if let (Some(why), Some(cp)) = (&opened.changes.drop_checkpoint, &checkpoint) {
            tracing::warn!("volume '{}': checkpoint '{cp}' is not recorded: {why}; the next backup of it reads everything", v.name);
            let note = format!("checkpoint '{cp}' not recorded ({why})");
            add_reason(&mut opened.changes.fallback, note);
            checkpoint = None;
        }
        progress.add_total(opened.size);
        let parent = pvol.map(|(p, pv)| (p.snapshot, pv));
        vols.push(OpenVolume { name: v.name, source, recorded: v.recorded, checkpoint, opened, parent });
    }

    let stop = cancel.child_token();
    let shared = Arc::new(Shared::new(repo, index.clone()));
    let mut packer = Packer::new(
        repo.clone(),
        index.clone(),
        shared.claims.clone(),
        lease.clone(),
        upload_slots(repo, job.tuning.upload_concurrency),
        job.tuning.checkpoint_packs,
        progress.clone(),
        stop.clone(),
    );
    packer.limiters = job.tuning.limiters.clone();
    let mut enc = BlobEncoder::new(repo.config().compression.level);

    let mut checks = Vec::new();
    let result: Result<(Vec<VolumeEntry>, Vec<MetadataEntry>, IoBackend)> = async {
        let mut metadata = Vec::new();
        for (name, bytes) in &job.metadata {
            let id = shared.keys().chunk_id(bytes);
            if !shared.known(&id)? {
                packer.add(&enc.encode(shared.keys(), id, BlobKind::Metadata, bytes)?).await?;
            }
            metadata.push(MetadataEntry { name: name.clone(), blob: id, size: bytes.len() as u64 });
        }
        let mut volumes = Vec::new();
        let mut backend = IoBackend::Pread;
        for mut v in vols {
            let prefs = match v.parent.clone() {
                Some((pid, pv)) if pv.segment_size == segment_size => match crate::snapshots::load_refs(repo, &*tree, &pid, &pv, &stop).await {
                    Ok(p) => Some(avoid_damage(repo, &tree, &mut v, p, &unhealed, &stop).await?),
                    Err(e) if e.kind() == ErrorKind::Corrupt => {
                        // The parent's tree is damaged: nothing of it can be reused.
                        tracing::warn!("volume '{}': {e:#}; reading everything without the parent", v.name);
                        add_reason(&mut v.opened.changes.fallback, format!("the parent's tree is damaged ({e:#})"));
                        v.opened.changes.changed = None;
                        None
                    }
                    Err(e) => return Err(e),
                },
                _ => None,
            };
            tracing::debug!(volume = %v.name, parent_segments = prefs.as_ref().map(|p| p.len()), "parent's segment refs loaded");
            let (entry, b, check) = backup_volume(&shared, &tree, &mut packer, &mut enc, v, prefs, &job.tuning, &progress, &stop).await?;
            backend = b;
            checks.push(check);
            volumes.push(entry);
        }
        packer.finish().await?;
        Ok((volumes, metadata, backend))
    }
    .await;
    let (volumes, metadata, backend) = match result {
        Ok(v) => v,
        Err(e) => {
            stop.cancel();
            // Keep what was uploaded: wait for uploads under way and index them, so a rerun
            // skips them. Failures here are secondary to the first error.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), packer.finish_after_error()).await;
            return Err(e);
        }
    };

    let mut stats = VolumeStats::default();
    for v in &volumes {
        stats.add(&v.stats);
    }
    let copy = job.copy_of.clone();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        group: Some(job.group.clone()),
        time_unix_ms: copy.as_ref().map(|c| c.time_unix_ms).unwrap_or_else(mover_format::now_unix_ms),
        hostname: copy.as_ref().map(|c| c.hostname.clone()).unwrap_or_else(mover_format::hostname),
        tags: job.tags.clone(),
        parent: parent.as_ref().map(|(id, _, _)| *id),
        volumes: volumes.clone(),
        metadata,
        stats,
        duration_ms: copy.as_ref().map(|c| c.duration_ms).unwrap_or(started.elapsed().as_millis() as u64),
        origin: copy.map(|c| c.origin),
    };
    tracing::debug!("data and index written; committing the snapshot");
    let snapshot_id = lease.commit("writing the snapshot manifest", async { Ok(repo.write_snapshot(&manifest, cancel).await?) }).await?;
    // The journal after the manifest: an entry never names a snapshot that was not written.
    // The snapshot stands without it (`check` notes the missing entry).
    let added = mover_format::journal::JournalEvent::Added { snapshot: snapshot_id, group: job.group.clone() };
    if let Err(e) = repo.journal_append(added, cancel).await {
        tracing::warn!("snapshot {snapshot_id} was written, but its journal entry was not: {e:#}");
    }
    Ok(BackupSummary {
        snapshot_id,
        group: job.group,
        parent: manifest.parent,
        stats,
        duration_s: started.elapsed().as_secs_f64(),
        io_backend: backend.as_str().into(),
        packs_uploaded: packer.packs_uploaded,
        bytes_uploaded: packer.bytes_uploaded,
        volumes: volumes
            .iter()
            .zip(checks)
            .map(|(v, check)| VolumeSummary {
                name: v.name.clone(),
                change_source: v.change_source.clone(),
                change_fallback: v.change_fallback.clone(),
                change_check: check,
                stats: v.stats,
            })
            .collect(),
    })
}

/// The changed ranges of segment `[start, end)` as in-segment `[a, b)` ranges, merged; for
/// a descriptor read with `O_DIRECT`, widened to 4096-byte boundaries (the volume's end
/// excepted).
///
/// `ext` is sorted and disjoint ([`normalized`]): only the extents from the first that
/// ends after `start` are looked at, so planning stays linear in segments plus extents.
fn segment_ranges(ext: &[(u64, u64)], start: u64, end: u64, align: bool) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let first = ext.partition_point(|&(o, l)| o.saturating_add(l) <= start);
    for &(o, l) in &ext[first..] {
        if o >= end {
            break;
        }
        let (a, b) = (o.max(start), o.saturating_add(l).min(end));
        if a >= b {
            continue;
        }
        let (mut a, mut b) = ((a - start) as usize, (b - start) as usize);
        if align {
            a = a / ALIGN * ALIGN;
            b = (b.div_ceil(ALIGN) * ALIGN).min((end - start) as usize);
        }
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `(offset, length)` extents sorted and merged where they overlap or touch (empty ones
/// dropped): what [`segment_ranges`] searches.
fn normalized(ext: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ext.iter().copied().filter(|e| e.1 > 0).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if o <= last.0.saturating_add(last.1) => last.1 = last.1.max(o.saturating_add(l) - last.0),
            _ => out.push((o, l)),
        }
    }
    out
}

/// Which segments to read, and how: unchanged ones (per the change source) and
/// unallocated ones are taken as they are, filling `refs` and the counters; a segment with
/// a few small changes is spliced (only its changed bytes read, see [`super::splice`]); the
/// rest is read whole. Returns the reads and the parent refs of the spliced segments.
fn plan_reads(
    v: &OpenVolume,
    allocated: impl FnOnce() -> Option<Vec<(u64, u64)>>,
    prefs: Option<&SegRefs>,
    seg_size: u64,
    refs: &mut SegRefs,
    st: &mut VolumeStats,
    progress: &Progress,
) -> Result<(ReadPlan, Vec<(u64, SegmentRef)>)> {
    let size = v.opened.size;
    let parent_size = v.parent.as_ref().map(|p| p.1.size).unwrap_or(0);
    let sparse = v.opened.changes.sparse;
    if sparse && parent_size != size {
        return Err(Error::precondition(format!(
            "volume '{}': {} holds only the changes since a checkpoint, but the disk is {size} bytes and its parent {parent_size}; a resized disk needs a full backup",
            v.name, v.source
        )));
    }
    let align = matches!(v.opened.reader, Reader::File(_));
    let changed = v.opened.changes.changed.as_deref().map(normalized);
    // Allocated `[a, b)` ranges, sorted and disjoint, so each segment's test is a binary
    // search. Asked for only when a segment is read whole: finding them walks the file's
    // extents (150 ms on a fragmented 16 GiB image, more than a scattered incremental's
    // whole read), which an incremental that splices every changed segment never needs.
    let allocated = std::cell::LazyCell::new(|| allocated().map(|al| normalized(&al.iter().map(|&(a, b)| (a, b.saturating_sub(a))).collect::<Vec<_>>())));
    let mut jobs = ReadPlan::new(seg_size, size);
    let mut spliced = Vec::new();
    for seg in 0..refs.len() as u64 {
        let start = seg * seg_size;
        let end = (start + seg_size).min(size);
        let len = end - start;
        if let (Some(ext), Some(pr)) = (&changed, prefs) {
            // Only a segment wholly inside the parent's volume has a parent copy to keep.
            let same_shape = end <= parent_size && (end < parent_size || parent_size == size);
            if same_shape {
                let ranges = segment_ranges(ext, start, end, align);
                if ranges.is_empty() {
                    // Untouched: the parent's copy as is.
                    refs.set(seg as usize, pr.at(seg as usize));
                    st.bytes_skipped += len;
                    progress.add_skipped(len);
                    progress.add_done(len);
                    continue;
                }
                let changed: u64 = ranges.iter().map(|(a, b)| (b - a) as u64).sum();
                if sparse || changed * 4 <= len {
                    spliced.push((seg, pr.at(seg as usize)));
                    jobs.push(ReadJob { seg, offset: start, len: len as usize, ranges: Some(ranges) });
                    continue;
                }
            }
        }
        if let Some(al) = &*allocated {
            let i = al.partition_point(|&(o, l)| o + l <= start);
            if al.get(i).is_none_or(|&(o, _)| o >= end) {
                refs.set(seg as usize, SegmentRef::Hole);
                st.bytes_zero += len;
                progress.add_done(len);
                continue;
            }
        }
        jobs.push(ReadJob { seg, offset: start, len: len as usize, ranges: None });
    }
    Ok((jobs, spliced))
}

async fn backup_volume(
    sh: &Arc<Shared>,
    tree: &Arc<dyn ChunkIndex>,
    packer: &mut Packer,
    enc: &mut BlobEncoder,
    v: OpenVolume,
    prefs: Option<SegRefs>,
    tuning: &Tuning,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(VolumeEntry, IoBackend, Option<ChangeCheck>)> {
    let seg_size = sh.params.segment_size as u64;
    let (v, mut check, compare) = check_changes(sh, v, prefs.as_ref(), tuning, cancel).await?;
    let size = v.opened.size;
    let nseg = size.div_ceil(seg_size);
    let mut refs = SegRefs::unset(nseg as usize);
    let mut st = VolumeStats { bytes_total: size, ..Default::default() };
    let allocated = || match (&v.opened.allocated, &v.opened.reader) {
        (Some(a), _) => Some(a.clone()),
        (None, Reader::File(f)) => crate::device::allocated_ranges(f, size),
        (None, Reader::Blocks(_)) => None,
    };
    let change_source = match (&v.opened.changes.changed, &prefs) {
        (Some(_), Some(_)) => v.opened.changes.source.clone().unwrap_or(ChangeSource::Extents),
        (_, Some(_)) => ChangeSource::ParentDigest,
        _ => ChangeSource::Full,
    };
    let trusted = v.opened.changes.changed.is_some() && prefs.is_some();
    let (jobs, spliced) = plan_reads(&v, allocated, prefs.as_ref(), seg_size, &mut refs, &mut st, progress)?;
    tracing::debug!(volume = %v.name, reads = jobs.len(), spliced = spliced.len(), "reads planned");
    let parent_maps = ParentMaps::spawn(sh.repo.clone(), tree.clone(), spliced, 256, cancel.clone());

    let workers = tuning.workers.max(1);
    let qd = tuning.queue_depth.max(1);
    let pool_size = qd + workers + 2;
    let (pool_tx, pool_rx) = mpsc::channel::<AlignedBuf>(pool_size);
    for _ in 0..pool_size.min(jobs.len().max(1)) {
        pool_tx.try_send(AlignedBuf::new(seg_size as usize)).map_err(|_| Error::permanent("buffer pool full"))?;
    }
    let (read_tx, read_rx) = mpsc::channel::<Result<ReadDone>>(2);
    let (out_tx, mut out_rx) = mpsc::channel::<Result<SegOut>>(workers + 1);
    let (reader, backend) = match v.opened.reader {
        Reader::File(f) => reader::spawn(f, v.source.clone(), jobs, tuning.io, qd, pool_rx, read_tx, cancel.clone())?,
        Reader::Blocks(b) => reader::spawn_blocks(b, jobs, qd, pool_rx, read_tx, cancel.clone())?,
    };
    let prefs = Arc::new(prefs);
    let threads = spawn_workers(workers, sh, enc.level(), prefs.clone(), parent_maps, read_rx, &pool_tx, &out_tx, cancel)?;
    drop(out_tx);
    drop(pool_tx);

    let mut first_err: Option<Error> = None;
    loop {
        let item = tokio::select! {
            i = out_rx.recv() => match i { Some(i) => i, None => break },
            _ = cancel.cancelled() => { first_err = Some(Error::cancelled(format!("backup of volume '{}'", v.name))); break }
        };
        let step = async {
            let o = item?;
            tracing::trace!(seg = o.seg, blobs = o.blobs.len(), "segment assembled");
            for b in &o.blobs {
                packer.add(b).await?;
            }
            progress.add_read(o.stats.bytes_read);
            progress.add_skipped(o.stats.bytes_skipped);
            progress.add_reused(o.stats.bytes_reused_parent);
            progress.add_new(o.stats.bytes_new);
            progress.add_done(o.stats.bytes_read + o.stats.bytes_skipped);
            st.add(&o.stats);
            refs.set(o.seg as usize, o.r);
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = step {
            first_err = Some(e);
            break;
        }
    }
    if first_err.is_some() {
        cancel.cancel();
    }
    drop(out_rx);
    // Join the stage threads off the async workers.
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
        let _ = reader.join();
    })
    .await;
    if let Some(e) = first_err {
        return Err(e.context(format!("backing up volume '{}' from {}", v.name, v.source)));
    }
    if cancel.is_cancelled() {
        return Err(Error::cancelled(format!("backup of volume '{}'", v.name)));
    }

    // Segment groups, in order.
    let mut groups = Vec::new();
    if let Some(i) = refs.first_unset() {
        return Err(Error::new(ErrorKind::Permanent, format!("volume '{}': segment {i} was never processed", v.name)));
    }
    let all = refs;
    // A periodic full comparison: the segments the source called unchanged, as read now,
    // against the parent's copies.
    let mut fallback = v.opened.changes.fallback.clone();
    if let (Some(claimed), Some(pr), Some(c)) = (&compare, prefs.as_ref(), check.as_mut()) {
        let differed: Vec<u64> = claimed.iter().copied().filter(|&s| !same_content(&all.at(s as usize), &pr.at(s as usize))).collect();
        c.compared = claimed.len() as u64;
        c.differed = differed.len() as u64;
        if let Some(&first) = differed.first() {
            let why = format!(
                "the change source ({}) called {} of {} compared segments unchanged that differ from the parent (the first: segment {first}, bytes {}..{})",
                c.source,
                differed.len(),
                claimed.len(),
                first * seg_size,
                ((first + 1) * seg_size).min(size)
            );
            tracing::warn!("volume '{}': {why}; this backup read everything and holds the volume as it is", v.name);
            add_reason(&mut fallback, why);
        }
    }
    for first in (0..all.len()).step_by(GROUP_SEGMENTS) {
        let g = SegmentGroup { first_segment: first as u64, segments: all.range(first, (first + GROUP_SEGMENTS).min(all.len())) }.encode();
        let id = sh.keys().chunk_id(&g);
        if !sh.known(&id)? {
            packer.add(&enc.encode(sh.keys(), id, BlobKind::Tree, &g)?).await?;
        }
        groups.push(id);
    }
    let trusted_run = if trusted { next_trusted_run(v.parent.as_ref()) } else { 0 };
    let (source, change_source) = v.recorded.clone().unwrap_or((v.source, change_source));
    let entry = VolumeEntry {
        name: v.name.clone(),
        size,
        segment_size: sh.params.segment_size,
        groups,
        source,
        change_source,
        change_base: v.checkpoint,
        change_fallback: fallback,
        trusted_run,
        stats: st,
    };
    Ok((entry, backend, check))
}

/// Adds `why` to the reasons a volume was read in full.
/// Segments of the parent that need a damaged blob nobody has stored anew ([`Quarantined::unhealed`]):
/// they are read again and chunked, not reused (their digest is forgotten, and they count
/// as changed for the change source), so this backup stores the content anew and heals
/// every older snapshot that needs it. Maps are read only when there is such damage.
///
/// [`Quarantined::unhealed`]: crate::index::Quarantined::unhealed
async fn avoid_damage(
    repo: &Repository,
    tree: &Arc<dyn ChunkIndex>,
    v: &mut OpenVolume,
    mut prefs: SegRefs,
    unhealed: &HashSet<ChunkId>,
    cancel: &CancellationToken,
) -> Result<SegRefs> {
    // A sparse source holds only the changes: the rest of a segment cannot be read from it.
    if unhealed.is_empty() || v.opened.changes.sparse {
        return Ok(prefs);
    }
    use futures::StreamExt;
    let maps: Vec<(usize, ChunkId)> =
        prefs.iter().enumerate().filter_map(|(i, r)| if let Some(SegmentRef::Map { map, .. }) = r { Some((i, map)) } else { None }).collect();
    let what = format!("parent of volume '{}'", v.name);
    let what = what.as_str();
    let mut loads = futures::stream::iter(maps)
        .map(|(i, map)| async move {
            if unhealed.contains(&map) {
                return Ok((i, true));
            }
            match crate::snapshots::load_blob(repo, &**tree, &map, what, cancel).await.and_then(|b| Ok(SegmentMap::decode(&b)?)) {
                Ok(m) => Ok((i, m.entries.iter().filter_map(|e| e.chunk()).any(|c| unhealed.contains(&c)))),
                Err(e) if e.kind() == ErrorKind::Corrupt => Ok((i, true)),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(16);
    let seg_size = repo.config().chunker.segment_size as u64;
    let mut tainted = Vec::new();
    while let Some(r) = loads.next().await {
        let (i, bad) = r?;
        if bad {
            tainted.push(i);
        }
    }
    tainted.sort_unstable();
    for &i in &tainted {
        if let SegmentRef::Map { map, .. } = prefs.at(i) {
            prefs.set(i, SegmentRef::Map { map, digest: super::splice::UNKNOWN_DIGEST });
        }
        if let Some(ch) = v.opened.changes.changed.as_mut() {
            let start = i as u64 * seg_size;
            ch.push((start, (start + seg_size).min(v.opened.size) - start));
        }
    }
    if !tainted.is_empty() {
        tracing::warn!(
            "volume '{}': {} segment(s) of parent snapshot {} need damaged blobs: reading them again to store the content anew",
            v.name,
            tainted.len(),
            v.parent.as_ref().map(|p| p.0.to_string()).unwrap_or_default()
        );
    }
    Ok(prefs)
}

fn add_reason(slot: &mut Option<String>, why: String) {
    *slot = Some(match slot.take() {
        Some(f) => format!("{f}; {why}"),
        None => why,
    });
}

/// This backup's place in the run of backups that took a change source's word.
fn next_trusted_run(parent: Option<&(SnapshotId, VolumeEntry)>) -> u32 {
    parent.map(|p| p.1.trusted_run).unwrap_or(0).saturating_add(1)
}

/// True when two refs of a segment hold the same bytes: both holes, or the same map.
fn same_content(a: &SegmentRef, b: &SegmentRef) -> bool {
    match (a, b) {
        (SegmentRef::Hole, SegmentRef::Hole) => true,
        (SegmentRef::Map { map: x, .. }, SegmentRef::Map { map: y, .. }) => x == y,
        _ => false,
    }
}

/// The segments a change source called unchanged whose parent copy can be compared with
/// what the source holds now: wholly inside the parent's volume, with a parent copy known
/// by content (a hole, or a map of a segment read whole: a spliced segment's digest is
/// unknown), and for a descriptor of whole 4096-byte blocks.
fn claimed_unchanged(v: &OpenVolume, ext: &[(u64, u64)], prefs: &SegRefs, seg_size: u64) -> Vec<u64> {
    let size = v.opened.size;
    let parent_size = v.parent.as_ref().map(|p| p.1.size).unwrap_or(0);
    let align = matches!(v.opened.reader, Reader::File(_));
    let ext = normalized(ext);
    let mut out = Vec::new();
    for seg in 0..size.div_ceil(seg_size) {
        let (start, end) = (seg * seg_size, ((seg + 1) * seg_size).min(size));
        let same_shape = end <= parent_size && (end < parent_size || parent_size == size);
        if !same_shape || (align && (end - start) % ALIGN as u64 != 0) || !segment_ranges(&ext, start, end, false).is_empty() {
            continue;
        }
        match prefs.get(seg as usize) {
            Some(SegmentRef::Hole) => out.push(seg),
            Some(SegmentRef::Map { digest, .. }) if digest != super::splice::UNKNOWN_DIGEST => out.push(seg),
            _ => {}
        }
    }
    out
}

/// Checks a change source's word before the volume is planned (`docs/change-sources.md`,
/// "Trust, but verify"). When a periodic full comparison is due, drops the changes (the
/// volume is read in full) and returns the segments to compare afterwards. Otherwise reads
/// a random sample of the segments the source called unchanged and compares each with the
/// parent's copy; when one differs, the changes are dropped and the volume is read in
/// full in this same backup, the reason recorded.
async fn check_changes(
    sh: &Arc<Shared>,
    mut v: OpenVolume,
    prefs: Option<&SegRefs>,
    tuning: &Tuning,
    cancel: &CancellationToken,
) -> Result<(OpenVolume, Option<ChangeCheck>, Option<Vec<u64>>)> {
    let (Some(ext), Some(pr)) = (&v.opened.changes.changed, prefs) else { return Ok((v, None, None)) };
    if v.opened.changes.sparse || v.recorded.is_some() {
        // A sparse source holds nothing but the changes; a copy's changes are the
        // repository's own.
        return Ok((v, None, None));
    }
    let source = v.opened.changes.source.clone().unwrap_or(ChangeSource::Extents);
    let seg_size = sh.params.segment_size as u64;
    let claimed = claimed_unchanged(&v, ext, pr, seg_size);
    if tuning.compare_every > 0 && next_trusted_run(v.parent.as_ref()) >= tuning.compare_every {
        let why = format!("a full comparison is due (every {} backups that trusted a change source)", tuning.compare_every);
        tracing::info!("volume '{}': {why}; reading everything", v.name);
        v.opened.changes.changed = None;
        add_reason(&mut v.opened.changes.fallback, why);
        return Ok((v, Some(ChangeCheck { source, compared: 0, differed: 0, bytes: 0, full: true }), Some(claimed)));
    }
    let k = tuning.verify_sample.min(claimed.len());
    if k == 0 {
        return Ok((v, Some(ChangeCheck { source, compared: 0, differed: 0, bytes: 0, full: false }), None));
    }
    let mut sample: Vec<u64> = rand::seq::index::sample(&mut rand::rng(), claimed.len(), k).into_iter().map(|i| claimed[i]).collect();
    sample.sort_unstable();
    let parents: Vec<SegmentRef> = sample.iter().map(|&s| pr.at(s as usize)).collect();
    let bytes: u64 = sample.iter().map(|&s| seg_size.min(v.opened.size - s * seg_size)).sum();
    let (sh2, cancel2) = (sh.clone(), cancel.clone());
    let size = v.opened.size;
    let t = Instant::now();
    let work = tokio::task::spawn_blocking(move || {
        let r = compare_sample(&sh2, &mut v.opened.reader, &v.source, &sample, &parents, seg_size, size, &cancel2);
        (v, r)
    });
    let (mut v, differed) = work.await.map_err(|e| Error::permanent(format!("the change-source check stopped: {e}")))?;
    let differed = differed?;
    tracing::debug!(volume = %v.name, sampled = k, differed = differed.len(), ms = t.elapsed().as_millis() as u64, "change source checked");
    if let Some(&first) = differed.first() {
        let why = format!(
            "the change source ({source}) called segment {first} (bytes {}..{}) unchanged, but it differs from parent snapshot {} ({} of {k} sampled segments differ): reading the whole volume",
            first * seg_size,
            ((first + 1) * seg_size).min(size),
            v.parent.as_ref().map(|p| p.0.to_string()).unwrap_or_default(),
            differed.len()
        );
        tracing::warn!("volume '{}': {why}", v.name);
        v.opened.changes.changed = None;
        add_reason(&mut v.opened.changes.fallback, why);
    }
    Ok((v, Some(ChangeCheck { source, compared: k as u64, differed: differed.len() as u64, bytes, full: false }), None))
}

/// Reads each of `segs` whole and returns those whose content differs from `parents`.
fn compare_sample(
    sh: &Shared,
    reader: &mut Reader,
    label: &str,
    segs: &[u64],
    parents: &[SegmentRef],
    seg_size: u64,
    size: u64,
    cancel: &CancellationToken,
) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let mut buf = AlignedBuf::new(seg_size as usize);
    let mut differed = Vec::new();
    for (&seg, parent) in segs.iter().zip(parents) {
        if cancel.is_cancelled() {
            return Err(Error::cancelled(format!("checking the change source of {label}")));
        }
        let offset = seg * seg_size;
        let len = (seg_size.min(size - offset)) as usize;
        let data = &mut buf.as_mut_full()[..len];
        match reader {
            Reader::File(f) => {
                let mut done = 0;
                while done < len {
                    let n =
                        f.read_at(&mut data[done..], offset + done as u64).with_context(|| format!("reading {label} at offset {}", offset + done as u64))?;
                    if n == 0 {
                        return Err(Error::permanent(format!("reading {label}: it ended at {} bytes, inside segment {seg}", offset + done as u64)));
                    }
                    done += n;
                }
            }
            Reader::Blocks(b) => b.read_at(offset, data).with_context(|| format!("reading {label} at offset {offset}"))?,
        }
        let same = match parent {
            SegmentRef::Hole => mover_format::chunker::is_zero(data),
            SegmentRef::Map { digest, .. } => !mover_format::chunker::is_zero(data) && sh.keys().segment_digest(data) == *digest,
        };
        if !same {
            differed.push(seg);
        }
    }
    Ok(differed)
}

/// Rejects a volume name that cannot be one (empty, or holding `/` or `:`, which name
/// volumes in `SNAPSHOT:VOLUME` and restore file names).
pub fn validate_volume_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.contains(':') || name.len() > 253 {
        return Err(Error::invalid(format!("volume name '{name}' is not valid (1 to 253 characters, without '/' or ':')")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary-searched ranges equal a scan of every extent, for extents given in any
    /// order, overlapping, touching or empty.
    #[test]
    fn segment_ranges_of_normalized_extents_equal_a_full_scan() {
        let mut seed = 7u64;
        let mut rnd = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..200 {
            let ext: Vec<(u64, u64)> = (0..rnd(40)).map(|_| (rnd(1 << 20), rnd(70_000))).collect();
            let norm = normalized(&ext);
            assert!(norm.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0), "sorted, disjoint, not touching: {norm:?}");
            for seg in 0..5u64 {
                let (start, end) = (seg * 262_144, (seg + 1) * 262_144);
                for align in [false, true] {
                    // Brute force: every byte of the segment, changed or not.
                    let mut want: Vec<(usize, usize)> = Vec::new();
                    for p in start..end {
                        if ext.iter().any(|&(o, l)| o <= p && p < o + l) {
                            let (mut a, mut b) = ((p - start) as usize, (p - start) as usize + 1);
                            if align {
                                a = a / ALIGN * ALIGN;
                                b = (b.div_ceil(ALIGN) * ALIGN).min((end - start) as usize);
                            }
                            match want.last_mut() {
                                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                                _ => want.push((a, b)),
                            }
                        }
                    }
                    assert_eq!(segment_ranges(&norm, start, end, align), want, "segment {seg}, align {align}, extents {ext:?}");
                }
            }
        }
    }
}
