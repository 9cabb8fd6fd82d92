//! Restore: the reverse pipeline. Segments are restored concurrently; each fetches its
//! chunks with as few ranged reads as possible (adjacent blobs of one pack in one read),
//! decrypts and decompresses every chunk straight into its segment's (reused, aligned)
//! buffer, verifies it against its id, and writes with one io_uring write (or `pwrite`)
//! per run of data.
//! Holes stay unwritten on a new or empty file; elsewhere they are zeroed (BLKZEROOUT on a
//! device, hole punching on a file), unless the caller says the target is already zeroed.

use crate::aligned::{AlignedBuf, Reuse, ALIGN};
use crate::device::{self, Kind};
use crate::error::{Error, Result, ResultExt};
use crate::progress::Progress;
use crate::snapshots::{load_blob, load_refs};
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::VolumeEntry;
use mover_format::names;
use mover_format::tree::{MapEntry, SegmentMap, SegmentRef};
use mover_format::{Repository, SnapshotId};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoleMode {
    /// Leave holes unwritten on a new or empty file, zero them everywhere else.
    #[default]
    Auto,
    /// Always zero holes.
    Zero,
    /// Never write holes: the caller guarantees the target reads as zeros.
    Skip,
}

impl HoleMode {
    /// Whether holes must be written as zeros on a target that is `fresh` (a new or empty
    /// file reads as zeros where nothing is written).
    pub fn zero_holes(self, fresh: bool) -> bool {
        match self {
            HoleMode::Auto => !fresh,
            HoleMode::Zero => true,
            HoleMode::Skip => false,
        }
    }
}

impl std::str::FromStr for HoleMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(HoleMode::Auto),
            "zero" => Ok(HoleMode::Zero),
            "skip" => Ok(HoleMode::Skip),
            _ => Err(Error::invalid(format!("hole handling '{s}': use auto, zero or skip"))),
        }
    }
}

/// A restore target, opened and checked by the caller (exclusively, for a block device;
/// large enough; not mounted): it is written through this descriptor and never reopened by
/// path.
pub struct Target {
    pub file: File,
    /// Names it in messages (its path).
    pub label: String,
    pub kind: Kind,
    /// A new or empty regular file.
    pub fresh: bool,
    /// Run once the target is byte-complete and synced (a file created under a temporary
    /// name gets its real one); dropped unrun when the restore fails.
    pub finish: Option<Box<dyn FnOnce() -> Result<()> + Send>>,
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub holes: HoleMode,
    /// The fetch window: bytes of packs being fetched or fetched and waiting to be decoded
    /// (at least 1 MiB; a segment's reads start when all of them fit). Segment buffers are
    /// apart from it: one per decode slot (the cores plus two). `None`: [`default_window`]
    /// for the repository.
    pub window: Option<u64>,
}

/// The fetch window when none is given: 64 MiB against an object store, enough to cover
/// the bandwidth-delay product of a store 100 ms away at ~600 MiB/s of packs; 32 MiB for
/// a local directory, where more in flight gains nothing.
pub fn default_window(repo: &Repository) -> u64 {
    if repo.is_remote() {
        64 << 20
    } else {
        32 << 20
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreSummary {
    pub snapshot_id: SnapshotId,
    pub volume: String,
    pub target: String,
    pub bytes_written: u64,
    pub bytes_holes: u64,
    pub duration_s: f64,
    /// `io_uring`, or `pwrite` when io_uring was refused.
    pub io_backend: String,
}

/// Refuses a block device smaller than the volume (a file target is sized to it).
pub fn check_target_size(label: &str, file: &File, vol: &VolumeEntry, snap: &SnapshotId) -> Result<()> {
    let (kind, size) = device::inspect(label, file)?;
    if kind == Kind::BlockDevice && size < vol.size {
        return Err(Error::precondition(format!(
            "restore target {label} is {size} bytes, smaller than volume '{}' of snapshot {snap} ({} bytes); nothing was written",
            vol.name, vol.size
        )));
    }
    Ok(())
}

fn zero_range(f: &File, kind: Kind, offset: u64, len: u64) -> std::io::Result<()> {
    let r = match kind {
        Kind::BlockDevice => device::zero_out_device(f, offset, len),
        Kind::File => device::punch_hole(f, offset, len),
    };
    if r.is_ok() {
        return Ok(());
    }
    // Fall back to writing zeros.
    let zeros = vec![0u8; (1usize << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

struct Ctx {
    repo: Repository,
    writer: Option<super::writer::UringWriter>,
    /// The target opened with `O_DIRECT` (the writer uses it when there is one): aligned
    /// writes skip the page cache, so nothing is copied there and the final fsync is short.
    direct: Option<Arc<File>>,
    index: Arc<dyn ChunkIndex>,
    file: Arc<File>,
    kind: Kind,
    zero_holes: bool,
    snap: SnapshotId,
    vol: String,
    progress: Arc<Progress>,
    /// Segment buffers for reuse (fresh 4 MiB buffers cost page faults and zeroing on every
    /// segment, a tenth of a restore's CPU before): at most one per decode slot.
    buffers: Reuse<AlignedBuf>,
    /// The fetch window, in KiB of packs fetched and not yet decoded.
    window: Arc<tokio::sync::Semaphore>,
    window_kib: u32,
    /// Segments being decoded and written at once, each with a buffer.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Where a segment is: for reading it and for naming it in errors.
pub struct SegmentAt<'a> {
    pub repo: &'a Repository,
    pub index: &'a dyn ChunkIndex,
    pub snap: &'a SnapshotId,
    pub vol: &'a str,
    /// The segment's offset in the volume, and its length.
    pub offset: u64,
    pub len: u64,
}

/// Fetches a segment's chunks with as few ranged reads as possible (adjacent blobs of one
/// pack in one read), decrypts, decompresses and verifies each straight into `buf` (resized
/// to the segment, holes zeroed). Returns the buffer and the holes (offset, length) in it.
/// Every error names the snapshot, volume, offset, chunk and pack.
pub async fn fetch_segment(
    at: &SegmentAt<'_>,
    map: &mover_format::ChunkId,
    buf: AlignedBuf,
    cancel: &CancellationToken,
) -> Result<(AlignedBuf, Vec<(u64, u64)>)> {
    let map = load_map(at, map, cancel).await?;
    fetch_segment_with_map(at, &map, buf, cancel).await
}

/// A segment's map, read and decoded; errors name the segment.
pub(crate) async fn load_map(at: &SegmentAt<'_>, map: &mover_format::ChunkId, cancel: &CancellationToken) -> Result<SegmentMap> {
    let what = format!("segment map at offset {} of volume '{}' in snapshot {}", at.offset, at.vol, at.snap);
    let mb = load_blob(at.repo, at.index, map, &what, cancel).await?;
    SegmentMap::decode(&mb).with_context(|| format!("{what}: blob {map}"))
}

/// Blobs `0..n` (sorted by pack and offset; `loc(k)` is blob k's location) in runs that
/// one ranged read each fetches: adjacent blobs of one pack, a run growing while it is under
/// `cap` bytes. Each run is `(first, end, start offset, end offset)`.
fn adjacent_runs<'a>(n: usize, loc: impl Fn(usize) -> &'a mover_format::index::BlobLocation, cap: u64) -> Vec<(usize, usize, u64, u64)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < n {
        let (pack, start) = (loc(i).pack, loc(i).offset as u64);
        let mut end = start + loc(i).stored_len as u64;
        let mut j = i + 1;
        while j < n && loc(j).pack == pack && loc(j).offset as u64 == end && end - start < cap {
            end += loc(j).stored_len as u64;
            j += 1;
        }
        runs.push((i, j, start, end));
        i = j;
    }
    runs
}

/// Ranged reads of one segment in flight at once: a segment's runs are fetched
/// concurrently (a deduplicated segment's chunks are spread over many packs). The restore
/// bounds what all segments fetch together by bytes ([`RestoreOptions::window`]).
const RUNS_IN_FLIGHT: usize = 16;

/// A chunk a segment needs, where it goes and where it is stored.
struct Want {
    off_in_seg: u64,
    id: mover_format::ChunkId,
    loc: mover_format::index::BlobLocation,
    /// Only these bytes of the chunk (a slice): `(offset, len)`.
    slice: Option<(u32, u32)>,
}

/// A segment's chunks located in the index and grouped into ranged reads: nothing fetched
/// yet, no buffer held.
pub struct Located {
    offset: u64,
    /// The bytes of the segment located (`0..len` unless [`locate_span`] was asked for less):
    /// a decode fills a buffer of this span's length.
    span: (u64, u64),
    /// Sorted by pack and offset.
    wants: Vec<Want>,
    /// `uniq[k]`: the range of `wants` of the k-th distinct chunk (a chunk the map uses more
    /// than once — the slices around a change an incremental spliced in — is fetched and
    /// decoded once).
    uniq: Vec<(usize, usize)>,
    holes: Vec<(u64, u64)>,
    /// `(first, end, start offset, end offset)` over `uniq`: one ranged read each.
    runs: Vec<(usize, usize, u64, u64)>,
}

impl Located {
    /// Bytes of packs the segment's reads fetch.
    pub fn fetch_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.3 - r.2).sum()
    }
}

/// A located segment with its reads done: what the fetch window holds until it is decoded.
pub struct Fetched {
    located: Located,
    /// `(first, end, start offset, bytes)` per run.
    runs: Vec<(usize, usize, u64, bytes::Bytes)>,
}

/// Locates every chunk of a segment in the index and plans its ranged reads.
pub fn locate(at: &SegmentAt<'_>, map: &SegmentMap) -> Result<Located> {
    locate_span(at, map, 0, at.len)
}

/// [`locate`] for the segment's bytes `lo..hi` only: the chunks (and holes) they overlap.
pub fn locate_span(at: &SegmentAt<'_>, map: &SegmentMap, lo: u64, hi: u64) -> Result<Located> {
    let (seg_offset, seg_len) = (at.offset, at.len);
    let hi = hi.min(seg_len);
    let lo = lo.min(hi);
    let what = format!("segment map at offset {seg_offset} of volume '{}' in snapshot {}", at.vol, at.snap);
    if map.total_len() != seg_len {
        return Err(Error::corrupt(format!("{what}: covers {} bytes, the segment has {seg_len}", map.total_len())));
    }
    let mut wants = Vec::new();
    let mut holes = Vec::new();
    let mut pos = 0u64;
    for e in &map.entries {
        if pos + e.len() as u64 <= lo || pos >= hi {
            pos += e.len() as u64;
            continue;
        }
        match *e {
            MapEntry::Chunk { id, .. } | MapEntry::Slice { id, .. } => {
                let loc = at.index.lookup(&id)?.ok_or_else(|| {
                    Error::corrupt(format!(
                        "reading volume '{}' of snapshot {} at offset {}: chunk {id} is not in the index of repository {}",
                        at.vol,
                        at.snap,
                        seg_offset + pos,
                        at.repo.location()
                    ))
                })?;
                let (fits, slice) = match *e {
                    MapEntry::Slice { offset, len, .. } => (offset as u64 + len as u64 <= loc.raw_len as u64, Some((offset, len))),
                    _ => (loc.raw_len == e.len(), None),
                };
                if !fits {
                    return Err(Error::corrupt(format!(
                        "reading volume '{}' of snapshot {} at offset {}: chunk {id} in pack {} has {} bytes, the segment map takes {} of them{}",
                        at.vol,
                        at.snap,
                        seg_offset + pos,
                        loc.pack,
                        loc.raw_len,
                        e.len(),
                        slice.map(|(o, _)| format!(" at {o}")).unwrap_or_default()
                    )));
                }
                wants.push(Want { off_in_seg: pos, id, loc, slice });
            }
            MapEntry::Hole { len } => holes.push((pos, len as u64)),
        }
        pos += e.len() as u64;
    }
    wants.sort_by_key(|w| (w.loc.pack, w.loc.offset, w.off_in_seg));
    let mut uniq: Vec<(usize, usize)> = Vec::new();
    for (k, w) in wants.iter().enumerate() {
        match uniq.last_mut() {
            Some(u) if wants[u.0].loc.pack == w.loc.pack && wants[u.0].loc.offset == w.loc.offset => u.1 = k + 1,
            _ => uniq.push((k, k + 1)),
        }
    }
    let runs = adjacent_runs(uniq.len(), |k| &wants[uniq[k].0].loc, 8 << 20);
    Ok(Located { offset: seg_offset, span: (lo, hi), wants, uniq, holes, runs })
}

/// Does a located segment's ranged reads, several at once.
pub async fn fetch(at: &SegmentAt<'_>, located: Located, cancel: &CancellationToken) -> Result<Fetched> {
    use futures::StreamExt;
    let seg_offset = located.offset;
    let got: Vec<(usize, usize, u64, bytes::Bytes)> = {
        let (wants, uniq) = (&located.wants, &located.uniq);
        futures::stream::iter(located.runs.clone().into_iter().map(|(i, j, start, end)| async move {
            let first = &wants[uniq[i].0];
            let pack = first.loc.pack;
            let bytes = at.repo.get_object_range(&names::pack(&pack), start, end - start, cancel).await.map_err(|e| {
                Error::from(e).context(format!(
                    "reading volume '{}' of snapshot {} at offset {}: reading chunk {} from pack {pack}",
                    at.vol,
                    at.snap,
                    seg_offset + first.off_in_seg,
                    first.id
                ))
            })?;
            Ok::<_, Error>((i, j, start, bytes))
        }))
        .buffer_unordered(RUNS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?
    };
    Ok(Fetched { located, runs: got })
}

/// Decrypts, decompresses and verifies a fetched segment's chunks straight into `buf`
/// (resized to the segment, holes zeroed), off the reactor. Returns the buffer and the
/// holes (offset, length) in it. A segment located for a span of its bytes
/// ([`locate_span`]) fills `buf` with that span only: byte `k` of it is the segment's byte
/// `lo + k`.
pub async fn decode(at: &SegmentAt<'_>, fetched: Fetched, mut buf: AlignedBuf) -> Result<(AlignedBuf, Vec<(u64, u64)>)> {
    let repo = at.repo.clone();
    let (vol, snap) = (at.vol.to_string(), *at.snap);
    tokio::task::spawn_blocking(move || -> Result<(AlignedBuf, Vec<(u64, u64)>)> {
        let Fetched { located, runs } = fetched;
        let Located { offset: seg_offset, span: (lo, hi), wants, uniq, holes, .. } = located;
        // 4096-aligned, so O_DIRECT can write it as is; reused, so holes are zeroed here.
        let len = (hi - lo) as usize;
        if buf.capacity() < len {
            buf = AlignedBuf::new(len);
        }
        buf.set_len(len);
        let dst = &mut buf.as_mut_full()[..len];
        // The part of segment bytes `a..a + n` inside the span, as a range of `dst`.
        let clip = |a: u64, n: u64| {
            let s = a.clamp(lo, hi);
            (s - lo) as usize..((a + n).clamp(s, hi) - lo) as usize
        };
        for &(off, len) in &holes {
            dst[clip(off, len)].fill(0);
        }
        let mut scratch = Vec::new();
        for (i, j, start, bytes) in runs {
            // Blobs are opened where they lie in the fetched run, which is ours alone once
            // fetched (else it is copied once).
            let mut bytes = bytes.try_into_mut().unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
            // Each distinct chunk of the run once, with every use the map makes of it.
            for &(a, b) in &uniq[i..j] {
                let uses = &wants[a..b];
                let (off, id, loc) = (uses[0].off_in_seg, uses[0].id, uses[0].loc);
                let s = (loc.offset as u64 - start) as usize;
                let sealed = &mut bytes[s..s + loc.stored_len as usize];
                let at = || format!("reading volume '{vol}' of snapshot {snap} at offset {}", seg_offset + off);
                if uses.len() == 1 && uses[0].slice.is_none() && off >= lo && off + loc.raw_len as u64 <= hi {
                    // A whole chunk used once: straight into the segment buffer.
                    repo.decode_blob_into(&id, &loc, sealed, &mut dst[clip(off, loc.raw_len as u64)]).with_context(at)?;
                } else {
                    // Slices, several uses or a chunk the span cuts: the whole chunk is
                    // verified once, then what the span holds of each use copied to its place.
                    scratch.resize(loc.raw_len as usize, 0);
                    repo.decode_blob_into(&id, &loc, sealed, &mut scratch).with_context(at)?;
                    for u in uses {
                        let (so, sl) = u.slice.unwrap_or((0, loc.raw_len));
                        let to = clip(u.off_in_seg, sl as u64);
                        if to.is_empty() {
                            continue;
                        }
                        let from = so as usize + (lo + to.start as u64 - u.off_in_seg) as usize;
                        let n = to.len();
                        dst[to].copy_from_slice(&scratch[from..from + n]);
                    }
                }
            }
        }
        Ok((buf, holes))
    })
    .await?
}

/// [`fetch_segment`] with its map already loaded.
pub async fn fetch_segment_with_map(
    at: &SegmentAt<'_>,
    map: &SegmentMap,
    buf: AlignedBuf,
    cancel: &CancellationToken,
) -> Result<(AlignedBuf, Vec<(u64, u64)>)> {
    let located = locate(at, map)?;
    let fetched = fetch(at, located, cancel).await?;
    decode(at, fetched, buf).await
}

/// Restores one segment; returns (bytes written, bytes of holes).
async fn restore_segment(
    cx: Arc<Ctx>,
    seg_offset: u64,
    seg_len: u64,
    r: SegmentRef,
    loaded: Option<Arc<SegmentMap>>,
    cancel: CancellationToken,
) -> Result<(u64, u64)> {
    let map = match r {
        SegmentRef::Hole => {
            if cx.zero_holes {
                let f = cx.file.clone();
                let kind = cx.kind;
                tokio::task::spawn_blocking(move || zero_range(&f, kind, seg_offset, seg_len)).await??;
            }
            return Ok((0, seg_len));
        }
        SegmentRef::Map { map, .. } => map,
    };
    let at = SegmentAt { repo: &cx.repo, index: &*cx.index, snap: &cx.snap, vol: &cx.vol, offset: seg_offset, len: seg_len };
    let map = match loaded {
        Some(m) => m,
        None => Arc::new(load_map(&at, &map, &cancel).await?),
    };
    let located = locate(&at, &map)?;
    // The fetch window: the segment's reads start once their bytes fit in it (all at once,
    // so no segment holds part of the window while waiting for the rest).
    let need = (located.fetch_bytes().div_ceil(1024).max(1)).min(cx.window_kib as u64) as u32;
    let cancelled = || Error::cancelled(format!("restore of volume '{}'", cx.vol));
    let window = tokio::select! {
        p = cx.window.clone().acquire_many_owned(need) => p.map_err(|_| cancelled())?,
        _ = cancel.cancelled() => return Err(cancelled()),
    };
    let fetched = fetch(&at, located, &cancel).await?;
    // A decode slot (a segment buffer) only now: fetched data waiting for one holds no buffer.
    let slot = tokio::select! {
        p = cx.slots.clone().acquire_owned() => p.map_err(|_| cancelled())?,
        _ = cancel.cancelled() => return Err(cancelled()),
    };
    let buf = cx.buffers.take(|b| b.capacity() >= seg_len as usize, || AlignedBuf::new(seg_len as usize));
    let (mut buf, holes) = decode(&at, fetched, buf).await?;
    drop(window);
    // Write: the whole segment at once when holes must be zeroed (the buffer holds their
    // zeros), else only the data runs.
    let hole_bytes: u64 = holes.iter().map(|h| h.1).sum();
    let runs: Vec<(u64, u64)> = if cx.zero_holes || holes.is_empty() {
        vec![(0, buf.len() as u64)]
    } else {
        let mut v = Vec::new();
        let mut pos = 0u64;
        for (hoff, hlen) in holes.iter().copied().chain(std::iter::once((buf.len() as u64, 0))) {
            if hoff > pos {
                v.push((pos, hoff));
            }
            pos = hoff + hlen;
        }
        v
    };
    let written: u64 = runs.iter().map(|(a, b)| b - a).sum();
    let ctx = || format!("writing volume '{}' at offset {seg_offset}", cx.vol);
    let aligned = |a: u64, b: u64| (seg_offset + a).is_multiple_of(ALIGN as u64) && (b - a).is_multiple_of(ALIGN as u64);
    let direct_ok = cx.direct.is_some() && runs.iter().all(|&(a, b)| aligned(a, b));
    match (&cx.writer, direct_ok || cx.direct.is_none()) {
        // io_uring on the O_DIRECT descriptor (or on the plain one when there is none).
        (Some(w), true) => {
            for &(a, b) in &runs {
                buf = w.write(seg_offset + a, buf, a as usize..b as usize).await.with_context(ctx)?;
            }
            cx.buffers.put(buf);
        }
        // pwrite: on the O_DIRECT descriptor when every run is aligned (the buffer is), else
        // buffered (the volume's unaligned tail).
        _ => {
            let f = if direct_ok { cx.direct.clone().unwrap_or_else(|| cx.file.clone()) } else { cx.file.clone() };
            let buf = tokio::task::spawn_blocking(move || -> std::io::Result<AlignedBuf> {
                for (a, b) in runs {
                    f.write_all_at(&buf.as_slice()[a as usize..b as usize], seg_offset + a)?;
                }
                Ok(buf)
            })
            .await?
            .with_context(ctx)?;
            cx.buffers.put(buf);
        }
    }
    drop(slot);
    cx.progress.add_written(written);
    Ok((written, hole_bytes))
}

/// Segments started ahead of the writer at most (each located, waiting for the window).
const MAX_SEGMENTS_AHEAD: u64 = 512;

/// Segments decoded and written at once (each holds a segment buffer): the cores, plus two
/// whose writes are in flight.
fn decode_slots() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) + 2
}

/// Segment maps are loaded this many segments at a time, one batch ahead of the restores.
pub(crate) const MAP_BATCH: usize = 256;
/// Ranged reads of map blobs in flight while a batch loads.
const MAP_READS_IN_FLIGHT: usize = 8;

/// The segment maps `ids`, loaded together ahead of the segments that need them: located
/// in the index, adjacent blobs of one pack fetched with one ranged read, several reads in
/// flight. Against a distant store this takes a round trip per segment off the restore.
pub(crate) async fn load_maps(
    repo: Repository,
    index: Arc<dyn ChunkIndex>,
    ids: Vec<mover_format::ChunkId>,
    cancel: CancellationToken,
) -> Result<HashMap<mover_format::ChunkId, Arc<SegmentMap>>> {
    use futures::StreamExt;
    let mut locs = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(loc) = index.lookup(&id)? {
            locs.push((id, loc));
        }
    }
    locs.sort_by_key(|(_, l)| (l.pack, l.offset));
    locs.dedup_by_key(|(id, _)| *id);
    let runs = adjacent_runs(locs.len(), |k| &locs[k].1, 4 << 20);
    let (locs, repo, cancel) = (&locs, &repo, &cancel);
    let mut fetched = futures::stream::iter(runs.into_iter().map(|(i, j, start, end)| async move {
        let bytes = repo.get_object_range(&names::pack(&locs[i].1.pack), start, end - start, cancel).await?;
        Ok::<_, Error>((i, j, start, bytes))
    }))
    .buffer_unordered(MAP_READS_IN_FLIGHT);
    let mut out = HashMap::new();
    while let Some(r) = fetched.next().await {
        let (i, j, start, bytes) = r?;
        for (id, loc) in &locs[i..j] {
            let s = (loc.offset as u64 - start) as usize;
            let raw = repo.decode_blob(id, loc, &bytes[s..s + loc.stored_len as usize])?;
            out.insert(*id, Arc::new(SegmentMap::decode(&raw)?));
        }
    }
    Ok(out)
}

/// Restores one volume of a snapshot onto `target` (a block device or a file). Damaged
/// blobs it meets are quarantined (`docs/repair.md`).
pub(crate) async fn restore_volume(
    repo: &Repository,
    view: &crate::lock::ReadView,
    snap: &SnapshotId,
    vol: &VolumeEntry,
    target: Target,
    opts: &RestoreOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<RestoreSummary> {
    let r = restore_volume_inner(repo, view.index().clone(), snap, vol, target, opts, progress, cancel).await;
    crate::index::quarantine::note_seen(repo, "restore").await;
    r
}

/// How much of an existing target's start is cleared before a restore writes anything:
/// the partition table (MBR, primary GPT), LVM and RAID labels, filesystem superblocks.
pub const HEADER_WIPE: u64 = 1 << 20;

/// Zeroes the first [`HEADER_WIPE`] bytes of a target and syncs them.
fn wipe_header(f: &std::fs::File, kind: Kind, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let n = HEADER_WIPE.min(size);
    if n == 0 {
        return Ok(());
    }
    match kind {
        // In whole sectors (a device's size is a multiple of them).
        Kind::BlockDevice => crate::device::zero_out_device(f, 0, n.div_ceil(512) * 512)?,
        Kind::File => f.write_all_at(&vec![0u8; n as usize], 0)?,
    }
    f.sync_data()
}

/// A finished segment of a restore: its counts added, or its error kept (the first one
/// stops the others).
fn settle(
    r: std::result::Result<Result<(u64, u64, u64)>, tokio::task::JoinError>,
    written: &mut u64,
    holes: &mut u64,
    first_err: &mut Option<Error>,
    job: &CancellationToken,
    progress: &Progress,
) {
    match r.map_err(Error::from).and_then(|x| x) {
        Ok((w, h, len)) => {
            *written += w;
            *holes += h;
            progress.add_done(len);
        }
        Err(e) => {
            if first_err.is_none() {
                *first_err = Some(e);
                job.cancel();
            }
        }
    }
}

async fn restore_volume_inner(
    repo: &Repository,
    index: Arc<dyn ChunkIndex>,
    snap: &SnapshotId,
    vol: &VolumeEntry,
    target: Target,
    opts: &RestoreOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let refs = load_refs(repo, &*index, snap, vol, cancel).await?;
    let Target { file, label, kind, fresh, finish } = target;
    check_target_size(&label, &file, vol, snap)?;
    // Again at the moment of writing: a queued restore starts long after its request, and
    // a VM may have opened its disk since. (Off the reactor: a device's check reads every
    // process's descriptors, and waits a moment when it finds a holder.)
    if kind == Kind::BlockDevice || !fresh {
        let (f, l) = (file.try_clone().with_context(|| format!("restore target {label}"))?, label.clone());
        tokio::task::spawn_blocking(move || match kind {
            Kind::BlockDevice => crate::device::refuse_if_held(&f, &l, "restore target"),
            Kind::File => crate::device::refuse_if_in_use(&f, &l, "restore target"),
        })
        .await??;
    }
    if kind == Kind::File {
        file.set_len(vol.size).with_context(|| format!("sizing restore target {label} to {} bytes", vol.size))?;
    }
    if !fresh {
        // Whatever the target held (a disk's partition table, a filesystem's superblock)
        // goes first, and the snapshot's first segment is written last: a restore that is
        // cut short leaves no header that makes old and new bytes look like one disk.
        wipe_header(&file, kind, vol.size).with_context(|| format!("clearing the first {} bytes of restore target {label}", HEADER_WIPE.min(vol.size)))?;
    }
    let zero_holes = opts.holes.zero_holes(fresh);
    progress.add_total(vol.size);
    // O_DIRECT when the target allows it (a second descriptor on the same open target,
    // through /proc/self/fd: no path is resolved again); io_uring writes on it (or on a
    // duplicate of the plain descriptor); pwrite when io_uring is refused.
    let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok().map(Arc::new);
    let writer = match &direct {
        Some(d) => d.try_clone().ok(),
        None => file.try_clone().ok(),
    }
    .and_then(super::writer::UringWriter::spawn);
    let io_backend = match (writer.is_some(), direct.is_some()) {
        (true, true) => "io_uring+direct",
        (true, false) => "io_uring",
        (false, true) => "pwrite+direct",
        (false, false) => "pwrite",
    };
    let window_bytes = opts.window.unwrap_or_else(|| default_window(repo)).max(1 << 20);
    let window_kib = (window_bytes >> 10).min(u32::MAX as u64) as u32;
    let cx = Arc::new(Ctx {
        writer,
        direct,
        repo: repo.clone(),
        index,
        file: Arc::new(file),
        kind,
        zero_holes,
        snap: *snap,
        vol: vol.name.clone(),
        progress: progress.clone(),
        buffers: Reuse::default(),
        window: Arc::new(tokio::sync::Semaphore::new(window_kib as usize)),
        window_kib,
        slots: Arc::new(tokio::sync::Semaphore::new(decode_slots())),
    });
    let job = cancel.child_token();
    let seg_size = vol.segment_size as u64;
    // Segments started ahead: enough that the window fills with data that compresses 4:1;
    // one waiting for the window holds only its located chunks.
    let in_flight = (window_bytes.saturating_mul(4) / seg_size.max(1)).clamp(2, MAX_SEGMENTS_AHEAD) as usize;
    let mut set: JoinSet<Result<(u64, u64, u64)>> = JoinSet::new();
    let (mut written, mut holes) = (0u64, 0u64);
    let mut first_err = None;
    let mut next = 0usize;
    // Segments in order, the first one last (see `wipe_header`): step `k` restores segment
    // `seg_at(k)`.
    let n = refs.len();
    let seg_at = |k: usize| if n > 1 { (k + 1) % n } else { k };
    // Maps one batch ahead. A batch that fails to load is left to the segments, which load
    // their own maps and report exactly what is wrong.
    let batch_ids = |b: usize| -> Vec<mover_format::ChunkId> {
        (b * MAP_BATCH..((b + 1) * MAP_BATCH).min(refs.len()))
            .filter_map(|k| match refs.at(seg_at(k)) {
                SegmentRef::Map { map, .. } => Some(map),
                SegmentRef::Hole => None,
            })
            .collect()
    };
    let load = |b: usize| tokio::spawn(load_maps(repo.clone(), cx.index.clone(), batch_ids(b), job.clone()));
    let mut maps: HashMap<mover_format::ChunkId, Arc<SegmentMap>> = HashMap::new();
    let mut pending = Some(load(0));
    let mut loaded = 0usize;
    loop {
        while next < refs.len() && set.len() < in_flight && first_err.is_none() {
            while loaded <= next / MAP_BATCH {
                if let Some(p) = pending.take() {
                    match p.await.map_err(Error::from).and_then(|x| x) {
                        Ok(m) => maps.extend(m),
                        Err(e) => tracing::debug!("loading segment maps ahead of volume '{}': {e:#}; segments load their own", vol.name),
                    }
                }
                loaded += 1;
                if loaded * MAP_BATCH < refs.len() {
                    pending = Some(load(loaded));
                }
            }
            let seg = seg_at(next);
            let off = seg as u64 * seg_size;
            let len = seg_size.min(vol.size - off);
            let map = match refs.at(seg) {
                SegmentRef::Map { map, .. } => maps.remove(&map),
                SegmentRef::Hole => None,
            };
            // The first segment starts only once every other one is written (each task
            // ends when its writes have completed) and synced.
            if seg == 0 && n > 1 {
                while let Some(r) = set.join_next().await {
                    settle(r, &mut written, &mut holes, &mut first_err, &job, &progress);
                }
                if first_err.is_some() || job.is_cancelled() {
                    break;
                }
                let f = cx.file.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || f.sync_data()).await.map_err(Error::from).and_then(|r| r.map_err(Error::from)) {
                    first_err = Some(e.context(format!("flushing restore target {label}")));
                    break;
                }
            }
            let (cx, r, c) = (cx.clone(), refs.at(seg), job.clone());
            set.spawn(async move { restore_segment(cx, off, len, r, map, c).await.map(|(w, h)| (w, h, len)) });
            next += 1;
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        settle(r, &mut written, &mut holes, &mut first_err, &job, &progress);
    }
    if let Some(p) = pending {
        p.abort();
    }
    // A target cut short says so: what it holds is neither the old disk nor the snapshot.
    let done_here = (written + holes).min(vol.size);
    let incomplete = |e: Error| {
        if fresh {
            e
        } else {
            e.context(format!(
                "restore target {label} is incomplete ({} of {} bytes restored): its first {} bytes are cleared until the restore completes, so it cannot be taken for a whole disk; restore it again",
                done_here,
                vol.size,
                HEADER_WIPE.min(vol.size)
            ))
        }
    };
    if let Some(e) = first_err {
        return Err(incomplete(e));
    }
    if cancel.is_cancelled() {
        return Err(incomplete(Error::cancelled(format!("restore of volume '{}'", vol.name))));
    }
    // Every write is complete before the fsync.
    let mut cx = cx;
    if let Some(w) = Arc::get_mut(&mut cx).and_then(|c| c.writer.take()) {
        w.close().await;
    }
    let f = cx.file.clone();
    tokio::task::spawn_blocking(move || f.sync_all()).await?.with_context(|| format!("flushing restore target {label}"))?;
    if let Some(finish) = finish {
        finish()?;
    }
    Ok(RestoreSummary {
        snapshot_id: *snap,
        volume: vol.name.clone(),
        target: label,
        bytes_written: written,
        bytes_holes: holes,
        duration_s: started.elapsed().as_secs_f64(),
        io_backend: io_backend.into(),
    })
}
