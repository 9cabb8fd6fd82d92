//! Backup: reader → chunk + hash + dedup (worker threads, one per core) → compress +
//! encrypt (new chunks only, same workers) → pack → upload → commit (index segment, then
//! manifest). Bounded channels and a fixed buffer pool bound memory; the first error or a
//! cancel stops every stage; segment results are put back in volume order so the manifest
//! does not depend on scheduling.

use super::packer::{Claims, Packer};
use super::reader::{self, IoBackend, IoChoice, ReadDone, ReadJob};
use crate::aligned::AlignedBuf;
use crate::lock::{Lease, RepoLock};
use crate::metrics::Progress;
use crate::source;
use anyhow::{anyhow, bail, Context, Result};
use mover_format::blob::{BlobEncoder, EncodedBlob};
use mover_format::chunker::{is_zero, split_segment, Chunker, ChunkerParams, Piece};
use mover_format::crypto::Keys;
use mover_format::file_formats::{KIND_DATA, KIND_METADATA, KIND_TREE};
use mover_format::local_index::ChunkIndex;
use mover_format::lock::KIND_BACKUP;
use mover_format::manifest::{Manifest, MetadataEntry, VolumeEntry, VolumeStats, MANIFEST_VERSION};
use mover_format::tree::{MapEntry, SegmentGroup, SegmentMap, SegmentRef, GROUP_SEGMENTS};
use mover_format::{ChunkId, Repository, SnapshotId};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Byte ranges `[offset, offset + len)` that may have changed.
pub type Extents = Vec<(u64, u64)>;

#[derive(Debug, Clone, Default)]
pub struct VolumeSpec {
    pub name: String,
    /// A file or block device; for an NBD source, its URI (for messages and `--parent latest`).
    pub source: PathBuf,
    /// Changed extents from the caller; `None` reads everything.
    pub changed: Option<Extents>,
    /// Read over NBD instead of from `source`.
    pub nbd: Option<NbdSpec>,
    /// Ask a CSI SnapshotMetadata service which blocks are allocated (full) or changed
    /// since the parent's CSI snapshot (incremental).
    pub csi: Option<crate::csi::CsiSpec>,
    /// Recorded as the volume's `change_base`: the change-tracking point this snapshot was
    /// taken at (an NBD bitmap name, a CSI snapshot id), for the next incremental to check.
    pub checkpoint: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct NbdSpec {
    pub uri: String,
    /// A QEMU dirty bitmap holding the changes since the parent's checkpoint.
    pub bitmap: Option<String>,
}

/// An opened source.
enum Opened {
    File(std::fs::File),
    /// The connection and the export's data ranges (`base:allocation`), `[start, end)`.
    Nbd(crate::nbd::NbdClient, Vec<(u64, u64)>),
}

/// What a change-tracking source said about one volume.
#[derive(Default)]
struct ChangeInfo {
    /// `extents`, `nbd`, `csi`.
    label: Option<&'static str>,
    changed: Option<Extents>,
    /// Why the source could not be used and everything was read instead.
    fallback: Option<String>,
    /// The source's changed extents, before checking them against the parent.
    pending: Option<(Extents, String)>,
    /// Data ranges `[start, end)` from the change source, replacing SEEK_DATA.
    alloc: Option<Vec<(u64, u64)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentSpec {
    None,
    Latest,
    Id(String),
}

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub volumes: Vec<VolumeSpec>,
    pub metadata: Vec<(String, Vec<u8>)>,
    pub parent: ParentSpec,
    pub tags: BTreeMap<String, String>,
    pub io: IoChoice,
    pub queue_depth: usize,
    pub workers: usize,
    /// Pack uploads in flight; 0 picks by store (see `upload_slots`).
    pub upload_concurrency: usize,
    pub checkpoint_packs: usize,
    /// Upload bandwidth limits (node-wide and per transfer); every pack takes from each.
    pub limiters: Vec<Arc<crate::ratelimit::RateLimiter>>,
}

/// Pack uploads in flight: `requested`, or for 0 two to a local directory (its `O_DIRECT`
/// writes run at device speed; a third only holds another 16 MiB) and three to S3 (where
/// latency, not the disk, limits one upload).
fn upload_slots(repo: &Repository, requested: usize) -> usize {
    match requested {
        0 if repo.location().starts_with("s3://") => 3,
        0 => 2,
        n => n,
    }
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            volumes: Vec::new(),
            metadata: Vec::new(),
            parent: ParentSpec::None,
            tags: BTreeMap::new(),
            io: IoChoice::Auto,
            queue_depth: 4,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            upload_concurrency: 0,
            checkpoint_packs: 4,
            limiters: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeSummary {
    pub name: String,
    pub change_source: String,
    /// Set when a change source failed and the volume was read in full (parent reuse on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_fallback: Option<String>,
    #[serde(flatten)]
    pub stats: VolumeStats,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub snapshot_id: SnapshotId,
    pub parent: Option<SnapshotId>,
    #[serde(flatten)]
    pub stats: VolumeStats,
    pub duration_s: f64,
    pub io_backend: String,
    pub packs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub volumes: Vec<VolumeSummary>,
}

/// What the worker threads share.
struct Shared {
    repo: Repository,
    index: Arc<dyn ChunkIndex>,
    chunker: Chunker,
    params: ChunkerParams,
    claims: Arc<Claims>,
}

impl Shared {
    fn keys(&self) -> &Keys {
        self.repo.keys()
    }
    /// True when the chunk is already stored or claimed by this backup.
    fn known(&self, id: &ChunkId) -> Result<bool> {
        self.claims.known(&*self.index, id)
    }
}

struct SegOut {
    seg: u64,
    r: SegmentRef,
    blobs: Vec<EncodedBlob>,
    stats: VolumeStats,
}

fn process_segment(sh: &Shared, enc: &mut BlobEncoder, data: &[u8], parent: Option<&SegmentRef>) -> Result<(SegmentRef, Vec<EncodedBlob>, VolumeStats)> {
    let len = data.len() as u64;
    let mut st = VolumeStats { bytes_read: len, ..Default::default() };
    if is_zero(data) {
        st.bytes_zero = len;
        return Ok((SegmentRef::Hole, Vec::new(), st));
    }
    let digest = sh.keys().segment_digest(data);
    if let Some(SegmentRef::Map { map, digest: d }) = parent {
        if *d == digest {
            st.bytes_reused_parent = len;
            return Ok((SegmentRef::Map { map: *map, digest }, Vec::new(), st));
        }
    }
    let mut blobs = Vec::new();
    let mut entries = Vec::new();
    for piece in split_segment(&sh.params, &sh.chunker, data) {
        match piece {
            Piece::Hole { len, .. } => {
                st.bytes_zero += len as u64;
                entries.push(MapEntry::Hole { len: len as u32 });
            }
            Piece::Data { offset, len } => {
                let bytes = &data[offset..offset + len];
                let id = sh.keys().chunk_id(bytes);
                if sh.known(&id)? {
                    st.chunks_dedup += 1;
                    st.bytes_dedup += len as u64;
                } else {
                    let b = enc.encode(sh.keys(), id, KIND_DATA, bytes)?;
                    st.chunks_new += 1;
                    st.bytes_new += len as u64;
                    st.bytes_stored += b.sealed.len() as u64;
                    blobs.push(b);
                }
                entries.push(MapEntry::Chunk { id, len: len as u32 });
            }
        }
    }
    let map = SegmentMap { entries }.encode();
    let map_id = sh.keys().chunk_id(&map);
    if !sh.known(&map_id)? {
        blobs.push(enc.encode(sh.keys(), map_id, KIND_TREE, &map)?);
    }
    Ok((SegmentRef::Map { map: map_id, digest }, blobs, st))
}

/// Asks the CSI SnapshotMetadata service about one volume: the allocated blocks for a full
/// backup, the changed blocks since the parent's CSI snapshot for an incremental. A base that
/// does not match the parent, or a capacity that does not match the source, is refused; a
/// service that fails is recorded as a fallback (everything is read).
async fn csi_changes(v: &VolumeSpec, c: &crate::csi::CsiSpec, size: u64, parent: Option<&(SnapshotId, Manifest)>, ch: &mut ChangeInfo) -> Result<()> {
    let pvol = parent.and_then(|(id, m)| m.volume(&v.name).map(|pv| (*id, pv.change_base.clone())));
    let base = match (&pvol, &c.base_id) {
        (None, _) => None,
        (Some((pid, Some(recorded))), Some(given)) if recorded != given => bail!(
            "volume '{}': --cbt-base-id {given} does not match parent snapshot {pid}, which was taken at CSI snapshot {recorded}; refusing an incremental that could miss changes",
            v.name
        ),
        (Some(_), Some(given)) => Some(given.clone()),
        (Some((_, Some(recorded))), None) => Some(recorded.clone()),
        (Some((pid, None)), None) => {
            ch.fallback = Some(format!("parent snapshot {pid} recorded no CSI snapshot id for volume '{}' (take backups with --checkpoint, or give --cbt-base-id)", v.name));
            return Ok(());
        }
    };
    let r = match &base {
        None => crate::csi::allocated(c).await,
        Some(b) => crate::csi::delta(c, b).await,
    };
    match r {
        Ok(md) => {
            if md.capacity != size {
                bail!(
                    "volume '{}': the SnapshotMetadata service reports {} bytes for snapshot {}/{}, but the source {} has {size}; is it the same volume?",
                    v.name,
                    md.capacity,
                    c.namespace,
                    c.snapshot,
                    v.source.display()
                );
            }
            if md.resumed > 0 {
                tracing::info!("volume '{}': the SnapshotMetadata stream was resumed {} time(s)", v.name, md.resumed);
            }
            match base {
                None => ch.alloc = Some(md.extents.iter().map(|&(o, l)| (o, o + l)).collect()),
                Some(_) => {
                    ch.changed = Some(md.extents);
                    ch.label = Some("csi");
                }
            }
        }
        Err(e) => ch.fallback = Some(format!("{e:#}")),
    }
    Ok(())
}

/// Connects to an NBD export: its data ranges and, with a bitmap, its dirty ranges. A
/// bitmap the server does not offer is recorded as a fallback, not an error.
fn open_nbd(n: &NbdSpec, ch: &mut ChangeInfo) -> Result<(crate::nbd::NbdClient, Vec<(u64, u64)>, Option<Extents>)> {
    use crate::nbd::{self, BASE_ALLOCATION};
    let uri = nbd::parse_uri(&n.uri)?;
    let base = vec![BASE_ALLOCATION.to_string()];
    let (mut client, with_bitmap) = match &n.bitmap {
        Some(b) => match nbd::NbdClient::connect(&uri, &[BASE_ALLOCATION.to_string(), nbd::bitmap_context(b)]) {
            Ok(c) => (c, true),
            Err(e) => {
                ch.fallback = Some(format!("dirty bitmap '{b}' unavailable: {e:#}"));
                (nbd::NbdClient::connect(&uri, &base)?, false)
            }
        },
        None => (nbd::NbdClient::connect(&uri, &base)?, false),
    };
    // As `[start, end)` pairs, like `source::allocated_ranges`.
    let alloc = client.ranges_where(BASE_ALLOCATION, |f| f & nbd::STATE_ZERO == 0)?.into_iter().map(|(o, l)| (o, o + l)).collect();
    let dirty = match (&n.bitmap, with_bitmap) {
        (Some(b), true) => match client.ranges_where(&nbd::bitmap_context(b), |f| f & nbd::STATE_DIRTY != 0) {
            Ok(d) => Some(d),
            Err(e) => {
                ch.fallback = Some(format!("reading dirty bitmap '{b}' failed: {e:#}"));
                // The connection may be unusable after a failed request: open a fresh one.
                client = nbd::NbdClient::connect(&uri, &base)?;
                None
            }
        },
        _ => None,
    };
    Ok((client, alloc, dirty))
}

/// Reads a tree blob through the local index.
pub async fn load_blob(repo: &Repository, index: &dyn ChunkIndex, id: &ChunkId, what: &str, cancel: &CancellationToken) -> Result<Vec<u8>> {
    let loc = index.lookup(id)?.ok_or_else(|| anyhow!("{what}: blob {id} is not in the index of repository {}", repo.location()))?;
    Ok(repo.read_blob(id, &loc, cancel).await.with_context(|| what.to_string())?)
}

/// The segment refs of a stored volume, in order.
pub async fn load_refs(repo: &Repository, index: &dyn ChunkIndex, snap: &SnapshotId, vol: &VolumeEntry, cancel: &CancellationToken) -> Result<Vec<SegmentRef>> {
    let mut refs = Vec::new();
    for g in &vol.groups {
        let what = format!("segment group of volume '{}' in snapshot {snap}", vol.name);
        let b = load_blob(repo, index, g, &what, cancel).await?;
        let group = SegmentGroup::decode(&b).with_context(|| format!("{what}: blob {g}"))?;
        if group.first_segment != refs.len() as u64 {
            bail!("{what}: blob {g} starts at segment {}, expected {}", group.first_segment, refs.len());
        }
        refs.extend(group.segments);
    }
    let nseg = vol.size.div_ceil(vol.segment_size as u64);
    if refs.len() as u64 != nseg {
        bail!("volume '{}' in snapshot {snap}: {} segments recorded, size {} needs {nseg}", vol.name, refs.len(), vol.size);
    }
    Ok(refs)
}

fn overlaps(ext: &Extents, start: u64, end: u64) -> bool {
    ext.iter().any(|&(o, l)| o < end && o.saturating_add(l) > start)
}

/// Validates caller extents against the volume size: within bounds, non-empty lengths.
pub fn validate_extents(name: &str, ext: &Extents, size: u64) -> Result<()> {
    for &(o, l) in ext {
        if l == 0 || o.checked_add(l).is_none_or(|e| e > size) {
            bail!("changed extent {o}+{l} of volume '{name}' lies outside the volume ({size} bytes)");
        }
    }
    Ok(())
}

async fn resolve_parent(repo: &Repository, opts: &BackupOptions, cancel: &CancellationToken) -> Result<Option<(SnapshotId, Manifest)>> {
    match &opts.parent {
        ParentSpec::None => Ok(None),
        ParentSpec::Id(s) => {
            let id = repo.resolve_snapshot(s, cancel).await?;
            let m = repo.read_snapshot(&id, cancel).await?;
            for v in &opts.volumes {
                if m.volume(&v.name).is_none() {
                    let names: Vec<&str> = m.volumes.iter().map(|v| v.name.as_str()).collect();
                    bail!("parent snapshot {id} has no volume named '{}' (it has: {})", v.name, names.join(", "));
                }
            }
            Ok(Some((id, m)))
        }
        ParentSpec::Latest => {
            let first = &opts.volumes[0];
            let src = first.source.display().to_string();
            let snaps = repo.snapshots(cancel).await?;
            // An NBD export's URI changes from one backup session to the next: for NBD
            // sources the latest snapshot of the same volume name read over NBD is the parent.
            let same = |v: &VolumeEntry| if first.nbd.is_some() { v.source.starts_with("nbd") } else { v.source == src };
            let found = snaps.into_iter().rev().find(|(_, m)| m.volume(&first.name).is_some_and(same));
            if found.is_none() {
                tracing::warn!("no earlier snapshot of volume '{}' from {src}: this backup reads everything", first.name);
            }
            Ok(found)
        }
    }
}

/// Runs a backup and writes its manifest. Progress is reported through `progress`.
///
/// The backup holds a `backup` lock from before it syncs the local index until its
/// manifest is written, so `gc` knows what it may still reference (`docs/gc.md`).
pub async fn backup(
    repo: &Repository,
    index: Arc<dyn ChunkIndex>,
    opts: BackupOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<BackupSummary> {
    let lock = RepoLock::acquire(repo, KIND_BACKUP, cancel).await?;
    let r = async {
        // After the lock: segments a gc replaced before it are seen as gone. Dedup looks
        // chunks up in the index only; the parent's tree may also use entries of unswept gc
        // records, which the parent (or its parked manifest) keeps alive (docs/gc.md).
        let tree = crate::gc::with_pending(repo, index.clone(), cancel).await.context("syncing the local index")?;
        backup_locked(repo, index, tree, opts, progress, lock.lease(), cancel).await
    }
    .await;
    lock.release().await;
    r
}

#[allow(clippy::too_many_arguments)]
async fn backup_locked(
    repo: &Repository,
    index: Arc<dyn ChunkIndex>,
    tree: Arc<dyn ChunkIndex>,
    opts: BackupOptions,
    progress: Arc<Progress>,
    lease: Lease,
    cancel: &CancellationToken,
) -> Result<BackupSummary> {
    let started = Instant::now();
    if opts.volumes.is_empty() {
        bail!("nothing to back up: name a source or at least one --volume NAME=SOURCE");
    }
    let mut names = HashSet::new();
    for v in &opts.volumes {
        if v.name.is_empty() || v.name.contains('/') || v.name.contains(':') {
            bail!("volume name '{}' is not valid (non-empty, without '/' or ':')", v.name);
        }
        if !names.insert(v.name.clone()) {
            bail!("volume name '{}' is given twice", v.name);
        }
    }
    // Open every source before any work: a wrong path fails here, naming it.
    let mut sources = Vec::new();
    let mut changes = Vec::new();
    for v in &opts.volumes {
        let mut ch = ChangeInfo { changed: v.changed.clone(), label: v.changed.as_ref().map(|_| "extents"), ..Default::default() };
        let (opened, size) = match &v.nbd {
            None => {
                let f = std::fs::File::open(&v.source).with_context(|| format!("opening source {} of volume '{}'", v.source.display(), v.name))?;
                let (_kind, size) = source::inspect(&v.source, &f)?;
                (Opened::File(f), size)
            }
            Some(n) => {
                let (client, alloc, dirty) = open_nbd(n, &mut ch).with_context(|| format!("volume '{}'", v.name))?;
                if let (Some(d), Some(b)) = (dirty, &n.bitmap) {
                    ch.pending = Some((d, b.clone()));
                }
                let size = client.size();
                (Opened::Nbd(client, alloc), size)
            }
        };
        if let Some(ext) = &ch.changed {
            validate_extents(&v.name, ext, size)?;
        }
        progress.add_total(size);
        sources.push((opened, size));
        changes.push(ch);
    }
    let parent = resolve_parent(repo, &opts, cancel).await?;
    for (v, ch) in opts.volumes.iter().zip(changes.iter_mut()) {
        if v.changed.is_some() && parent.is_none() {
            bail!("changed extents for volume '{}' need a parent snapshot (--parent)", v.name);
        }
        let Some((dirty, base)) = ch.pending.take() else { continue };
        let pvol = parent.as_ref().and_then(|(id, m)| m.volume(&v.name).map(|pv| (*id, pv.change_base.clone())));
        match pvol {
            None => ch.fallback = Some(format!("no parent snapshot of volume '{}' to apply the changes of bitmap '{base}' to", v.name)),
            Some((_, Some(b))) if b == base => {
                ch.changed = Some(dirty);
                ch.label = Some("nbd");
            }
            Some((pid, other)) => bail!(
                "volume '{}': the change source tracks changes since '{base}', but parent snapshot {pid} was taken at {}; refusing an incremental that could miss changes (choose the matching parent, or back up without the bitmap)",
                v.name,
                other.map(|o| format!("'{o}'")).unwrap_or_else(|| "no recorded checkpoint".into())
            ),
        }
    }
    for ((v, ch), (_, size)) in opts.volumes.iter().zip(changes.iter_mut()).zip(&sources) {
        if let Some(c) = &v.csi {
            csi_changes(v, c, *size, parent.as_ref(), ch).await?;
        }
    }
    for (v, ch) in opts.volumes.iter().zip(&changes) {
        if let Some(f) = &ch.fallback {
            tracing::warn!("volume '{}': {f}; reading everything (unchanged segments still reused from the parent)", v.name);
        }
    }

    let job = cancel.child_token();
    let params = repo.config().chunker;
    let shared = Arc::new(Shared { repo: repo.clone(), index: index.clone(), chunker: repo.chunker(), params, claims: Arc::new(Claims::default()) });
    let mut packer = Packer::new(
        repo.clone(),
        index.clone(),
        shared.claims.clone(),
        upload_slots(repo, opts.upload_concurrency),
        opts.checkpoint_packs,
        progress.clone(),
        job.clone(),
    );
    packer.limiters = opts.limiters.clone();
    packer.lease = Some(lease.clone());
    let mut enc = BlobEncoder::new(repo.config().compression.level);

    let result: Result<(Vec<VolumeEntry>, Vec<MetadataEntry>, IoBackend)> = async {
        let mut metadata = Vec::new();
        for (name, bytes) in &opts.metadata {
            let id = shared.keys().chunk_id(bytes);
            if !shared.known(&id)? {
                packer.add(&enc.encode(shared.keys(), id, KIND_METADATA, bytes)?).await?;
            }
            metadata.push(MetadataEntry { name: name.clone(), blob: id, size: bytes.len() as u64 });
        }
        let mut volumes = Vec::new();
        let mut backend = IoBackend::Pread;
        for ((spec, (opened, size)), ch) in opts.volumes.iter().zip(sources).zip(changes.iter()) {
            let pvol = parent.as_ref().and_then(|(id, m)| m.volume(&spec.name).map(|v| (*id, v.clone())));
            let prefs = match &pvol {
                Some((pid, pv)) if pv.segment_size == params.segment_size => Some(load_refs(repo, &*tree, pid, pv, &job).await?),
                _ => None,
            };
            let (entry, b) =
                backup_volume(&shared, &mut packer, &mut enc, spec, ch, opened, size, pvol.as_ref().map(|p| &p.1), prefs, &opts, &progress, &job).await?;
            backend = b;
            volumes.push(entry);
        }
        packer.finish().await?;
        Ok((volumes, metadata, backend))
    }
    .await;
    let (volumes, metadata, backend) = match result {
        Ok(v) => v,
        Err(e) => {
            job.cancel();
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
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        time_unix_ms: mover_format::now_unix_ms(),
        hostname: mover_format::hostname(),
        tags: opts.tags.clone(),
        parent: parent.as_ref().map(|(id, _)| *id),
        volumes: volumes.clone(),
        metadata,
        stats,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    lease.check()?;
    let snapshot_id = repo.write_snapshot(&manifest, cancel).await?;
    Ok(BackupSummary {
        snapshot_id,
        parent: manifest.parent,
        stats,
        duration_s: started.elapsed().as_secs_f64(),
        io_backend: backend.as_str().into(),
        packs_uploaded: packer.packs_uploaded,
        bytes_uploaded: packer.bytes_uploaded,
        volumes: volumes
            .iter()
            .zip(&changes)
            .map(|(v, ch)| VolumeSummary { name: v.name.clone(), change_source: v.change_source.clone(), change_fallback: ch.fallback.clone(), stats: v.stats })
            .collect(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn backup_volume(
    sh: &Arc<Shared>,
    packer: &mut Packer,
    enc: &mut BlobEncoder,
    spec: &VolumeSpec,
    ch: &ChangeInfo,
    opened: Opened,
    size: u64,
    pvol: Option<&VolumeEntry>,
    prefs: Option<Vec<SegmentRef>>,
    opts: &BackupOptions,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(VolumeEntry, IoBackend)> {
    let seg_size = sh.params.segment_size as u64;
    let nseg = size.div_ceil(seg_size);
    let mut refs: Vec<Option<SegmentRef>> = vec![None; nseg as usize];
    let mut st = VolumeStats { bytes_total: size, ..Default::default() };
    let allocated = match (&opened, &ch.alloc) {
        (_, Some(a)) => Some(a.clone()),
        (Opened::File(f), None) => source::allocated_ranges(f, size),
        (Opened::Nbd(_, a), None) => Some(a.clone()),
    };
    let parent_size = pvol.map(|p| p.size).unwrap_or(0);
    let change_source = match (&ch.changed, &prefs) {
        (Some(_), Some(_)) => ch.label.unwrap_or("extents"),
        (_, Some(_)) => "parent-digest",
        _ => "full",
    };

    let mut jobs = Vec::new();
    for seg in 0..nseg {
        let start = seg * seg_size;
        let end = (start + seg_size).min(size);
        let len = end - start;
        // A segment that lies wholly inside the parent's volume and touches no changed
        // extent is taken from the parent as is.
        if let (Some(ext), Some(pr)) = (&ch.changed, &prefs) {
            let same_shape = end <= parent_size && (end < parent_size || parent_size == size);
            if same_shape && !overlaps(ext, start, end) {
                refs[seg as usize] = Some(pr[seg as usize]);
                st.bytes_skipped += len;
                progress.add_skipped(len);
                progress.add_done(len);
                continue;
            }
        }
        if let Some(al) = &allocated {
            if !al.iter().any(|&(a, b)| a < end && b > start) {
                refs[seg as usize] = Some(SegmentRef::Hole);
                st.bytes_zero += len;
                progress.add_done(len);
                continue;
            }
        }
        jobs.push(ReadJob { seg, offset: start, len: len as usize });
    }

    let workers = opts.workers.max(1);
    let qd = opts.queue_depth.max(1);
    let pool_size = qd + workers + 2;
    let (pool_tx, pool_rx) = mpsc::channel::<AlignedBuf>(pool_size);
    for _ in 0..pool_size.min(jobs.len().max(1)) {
        pool_tx.try_send(AlignedBuf::new(seg_size as usize)).map_err(|_| anyhow!("buffer pool full"))?;
    }
    let (read_tx, read_rx) = mpsc::channel::<Result<ReadDone>>(2);
    let (out_tx, mut out_rx) = mpsc::channel::<Result<SegOut>>(workers + 1);
    let (reader, backend) = match opened {
        Opened::File(_) => reader::spawn(spec.source.clone(), jobs, opts.io, qd, pool_rx, read_tx, cancel.clone())?,
        Opened::Nbd(client, _) => reader::spawn_nbd(client, jobs, pool_rx, read_tx, cancel.clone())?,
    };

    let read_rx = Arc::new(Mutex::new(read_rx));
    let prefs = Arc::new(prefs);
    let mut threads = Vec::new();
    for i in 0..workers {
        let sh = sh.clone();
        let read_rx = read_rx.clone();
        let out_tx = out_tx.clone();
        let pool_tx = pool_tx.clone();
        let prefs = prefs.clone();
        let cancel = cancel.clone();
        let level = enc.level();
        threads.push(std::thread::Builder::new().name(format!("mover-chunk-{i}")).spawn(move || {
            let mut enc = BlobEncoder::new(level);
            loop {
                if cancel.is_cancelled() {
                    return;
                }
                let item = match read_rx.lock() {
                    Ok(mut rx) => rx.blocking_recv(),
                    Err(_) => return,
                };
                let Some(item) = item else { return };
                let out = item.and_then(|done| {
                    let parent = prefs.as_ref().as_ref().and_then(|p| p.get(done.seg as usize));
                    let t = std::time::Instant::now();
                    let r = process_segment(&sh, &mut enc, done.buf.as_slice(), parent);
                    let seg = done.seg;
                    tracing::trace!(seg, worker = i, ms = t.elapsed().as_millis() as u64, "segment processed");
                    let _ = pool_tx.try_send(done.buf);
                    r.map(|(r, blobs, stats)| SegOut { seg, r, blobs, stats })
                });
                if out_tx.blocking_send(out).is_err() {
                    return;
                }
            }
        })?);
    }
    // Only the workers may hold the read receiver: if this function kept a handle, a
    // reader blocked on a full channel after a cancel would never see it close.
    drop(read_rx);
    drop(out_tx);
    drop(pool_tx);

    let mut first_err: Option<anyhow::Error> = None;
    loop {
        let item = tokio::select! {
            i = out_rx.recv() => match i { Some(i) => i, None => break },
            _ = cancel.cancelled() => { first_err = Some(anyhow!("cancelled")); break }
        };
        let step = async {
            let o = item?;
            tracing::trace!(seg = o.seg, blobs = o.blobs.len(), "segment assembled");
            for b in &o.blobs {
                packer.add(b).await?;
            }
            let len = o.stats.bytes_read;
            progress.add_read(len);
            progress.add_reused(o.stats.bytes_reused_parent);
            progress.add_new(o.stats.bytes_new);
            progress.add_done(len);
            st.add(&o.stats);
            refs[o.seg as usize] = Some(o.r);
            Ok::<(), anyhow::Error>(())
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
        return Err(e.context(format!("backing up volume '{}' from {}", spec.name, spec.source.display())));
    }
    if cancel.is_cancelled() {
        bail!("backup of volume '{}' cancelled", spec.name);
    }

    // Segment groups, in order.
    let mut groups = Vec::new();
    let all: Vec<SegmentRef> = refs
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| anyhow!("volume '{}': segment {i} was never processed", spec.name)))
        .collect::<Result<_>>()?;
    for (gi, chunk) in all.chunks(GROUP_SEGMENTS).enumerate() {
        let g = SegmentGroup { first_segment: (gi * GROUP_SEGMENTS) as u64, segments: chunk.to_vec() }.encode();
        let id = sh.keys().chunk_id(&g);
        if !sh.known(&id)? {
            packer.add(&enc.encode(sh.keys(), id, KIND_TREE, &g)?).await?;
        }
        groups.push(id);
    }
    let entry = VolumeEntry {
        name: spec.name.clone(),
        size,
        segment_size: sh.params.segment_size,
        groups,
        source: spec.source.display().to_string(),
        change_source: change_source.into(),
        change_base: spec.checkpoint.clone(),
        stats: st,
    };
    Ok((entry, backend))
}
