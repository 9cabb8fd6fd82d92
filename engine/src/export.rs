//! A snapshot's volume read in place, without restoring it: any byte range, fetched from
//! the repository on demand a segment at a time (its chunks fetched, decrypted, verified),
//! with a bounded cache of decoded segments and read-ahead for sequential readers. It is
//! what the NBD export (`mover export`) and the FUSE mount (`mover mount`) serve.
//!
//! Memory is bounded by configuration: at most `cache_segments` decoded segments (4 MiB
//! each by default) plus a fetch window of packs being fetched (a restore's:
//! [`default_window`], 64 MiB against S3), whatever the volume's size and however many
//! requests a client sends at once, plus the segment maps of at most [`MAP_BATCHES_KEPT`]
//! batches of 256 segments (a few KiB per segment). The window is in bytes, not segments:
//! segments fetched at once are as many as their packs' bytes allow, so a store 100 ms away
//! is read with as many round trips in flight as a restore keeps.
//!
//! A small read of a segment that is neither cached nor read in order fetches only the
//! chunks under it ([`locate_span`]); a second one fetches the segment whole.
//!
//! Segment maps are loaded a batch of 256 segments at a time (adjacent map blobs in one
//! ranged read, as a restore does): against a distant store a segment's fetch then costs
//! one round trip, not two.

use crate::aligned::AlignedBuf;
use crate::error::{Error, Result};
use crate::pipeline::restore::{decode, default_window, fetch, load_map, load_maps, locate_span, SegmentAt, MAP_BATCH};
use crate::snapshots::load_refs;
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::VolumeEntry;
use mover_format::tree::{MapEntry, SegRefs, SegmentMap, SegmentRef};
use mover_format::{Repository, SnapshotId};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
pub struct ImageOptions {
    /// Decoded segments kept.
    pub cache_segments: usize,
    /// Segments fetched ahead of a sequential reader.
    pub read_ahead: usize,
    /// The fetch window: bytes of packs being fetched at once (at least 1 MiB; a segment's
    /// reads start when all of them fit). `None`: [`default_window`] for the repository.
    pub window: Option<u64>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self { cache_segments: 32, read_ahead: 4, window: None }
    }
}

type Slot = Arc<OnceCell<Arc<AlignedBuf>>>;

/// A batch's segment maps, by map id (a map that failed to load is missing: its segment
/// loads its own, see [`VolumeImage::map_of`]).
type MapBatch = Arc<OnceCell<Arc<HashMap<mover_format::ChunkId, Arc<SegmentMap>>>>>;

/// Batches of segment maps kept (the most recently used).
pub const MAP_BATCHES_KEPT: usize = 8;

/// Sequential readers told apart.
const MAX_STREAMS: usize = 8;

/// Segments remembered as read in part: a second small read of one fetches it whole.
const PARTS_KEPT: usize = 64;

/// The decoded segments: an LRU of at most `cap` (slots being filled included).
struct Cache {
    slots: HashMap<u64, Slot>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Cache {
    fn slot(&mut self, seg: u64) -> Slot {
        if let Some(s) = self.slots.get(&seg) {
            let s = s.clone();
            self.order.retain(|x| *x != seg);
            self.order.push_back(seg);
            return s;
        }
        while self.slots.len() >= self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.slots.remove(&old);
                }
                None => break,
            }
        }
        let s: Slot = Arc::new(OnceCell::new());
        self.slots.insert(seg, s.clone());
        self.order.push_back(seg);
        s
    }
}

/// One volume of one snapshot, readable at any offset.
pub struct VolumeImage {
    repo: Repository,
    index: Arc<dyn ChunkIndex>,
    snap: SnapshotId,
    vol: VolumeEntry,
    refs: SegRefs,
    cache: Mutex<Cache>,
    opts: ImageOptions,
    /// Per sequential reader (a client may read several regions at once, e.g. one per
    /// connection), the segment after the last one it read: a read there is sequential.
    streams: Mutex<VecDeque<u64>>,
    /// Segments a small random read fetched only part of, most recent last.
    parts: Mutex<VecDeque<u64>>,
    /// The fetch window, in KiB of packs being fetched (a segment's buffer is its cache slot).
    window: tokio::sync::Semaphore,
    window_kib: u32,
    /// Loaded (or loading) batches of segment maps, most recently used last.
    maps: Mutex<VecDeque<(usize, MapBatch)>>,
    cancel: CancellationToken,
    bytes_read: std::sync::atomic::AtomicU64,
}

impl VolumeImage {
    /// Loads the volume's segment references (groups); chunks are fetched on read.
    pub async fn open(
        repo: &Repository,
        view: &crate::lock::ReadView,
        snap: SnapshotId,
        vol: VolumeEntry,
        opts: ImageOptions,
        cancel: &CancellationToken,
    ) -> Result<Arc<Self>> {
        let index = view.index().clone();
        let refs = load_refs(repo, &*index, &snap, &vol, cancel).await?;
        let window_kib = (opts.window.unwrap_or_else(|| default_window(repo)).max(1 << 20) >> 10).min(u32::MAX as u64) as u32;
        Ok(Arc::new(Self {
            repo: repo.clone(),
            index,
            snap,
            vol,
            refs,
            cache: Mutex::new(Cache { slots: HashMap::new(), order: VecDeque::new(), cap: opts.cache_segments.max(2 * opts.read_ahead + 2) }),
            opts,
            streams: Mutex::new(VecDeque::new()),
            parts: Mutex::new(VecDeque::new()),
            window: tokio::sync::Semaphore::new(window_kib as usize),
            window_kib,
            maps: Mutex::new(VecDeque::new()),
            cancel: cancel.child_token(),
            bytes_read: Default::default(),
        }))
    }

    pub fn size(&self) -> u64 {
        self.vol.size
    }

    pub fn name(&self) -> &str {
        &self.vol.name
    }

    pub fn snapshot(&self) -> &SnapshotId {
        &self.snap
    }

    fn seg_size(&self) -> u64 {
        self.vol.segment_size as u64
    }

    fn seg_len(&self, seg: u64) -> u64 {
        self.seg_size().min(self.vol.size - seg * self.seg_size())
    }

    /// The byte ranges `[start, end)` of segments that are not wholly zero.
    pub fn allocated(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, r) in self.refs.iter().enumerate() {
            if matches!(r, Some(SegmentRef::Hole)) {
                continue;
            }
            let (a, b) = (i as u64 * self.seg_size(), i as u64 * self.seg_size() + self.seg_len(i as u64));
            match out.last_mut() {
                Some(l) if l.1 == a => l.1 = b,
                _ => out.push((a, b)),
            }
        }
        out
    }

    /// The volume's segment references.
    pub fn refs(&self) -> &SegRefs {
        &self.refs
    }

    /// Stops every fetch in flight (readers then fail).
    pub fn close(&self) {
        self.cancel.cancel();
    }

    /// A decoded segment (`None` for a hole), from the cache or fetched.
    async fn segment(self: &Arc<Self>, seg: u64) -> Result<Option<Arc<AlignedBuf>>> {
        let map = match self.refs.at(seg as usize) {
            SegmentRef::Hole => return Ok(None),
            SegmentRef::Map { map, .. } => map,
        };
        let slot = self.cache.lock().map_err(|_| Error::permanent("segment cache lock poisoned"))?.slot(seg);
        let me = self.clone();
        let buf = slot.get_or_try_init(|| async move { Ok::<_, Error>(Arc::new(me.fetch_span(seg, &map, 0, me.seg_len(seg)).await?)) }).await?;
        Ok(Some(buf.clone()))
    }

    /// Bytes `lo..hi` of segment `seg` (map `map`): the chunks under them fetched, once their
    /// packs' bytes fit in the window, and decoded.
    async fn fetch_span(&self, seg: u64, map: &mover_format::ChunkId, lo: u64, hi: u64) -> Result<AlignedBuf> {
        let at = self.at(seg);
        let m = self.map_of(seg, map).await?;
        let located = locate_span(&at, &m, lo, hi)?;
        let need = (located.fetch_bytes().div_ceil(1024).max(1)).min(self.window_kib as u64) as u32;
        let cancelled = || Error::cancelled(format!("reading volume '{}' at offset {}", self.vol.name, at.offset));
        let _permit = tokio::select! {
            p = self.window.acquire_many(need) => p.map_err(|_| cancelled())?,
            _ = self.cancel.cancelled() => return Err(cancelled()),
        };
        let fetched = fetch(&at, located, &self.cancel).await?;
        Ok(decode(&at, fetched, AlignedBuf::new((hi - lo) as usize)).await?.0)
    }

    /// A small read of a segment not kept and not read in order: only the chunks under it
    /// are fetched and decoded (a random 4 KiB read costs a chunk, not 4 MiB of them), and
    /// nothing is kept. The segment is remembered, so a second such read fetches it whole
    /// into the cache. Returns whether it served the read (`false`: read it whole).
    async fn read_part(self: &Arc<Self>, seg: u64, in_seg: u64, dst: &mut [u8]) -> Result<bool> {
        let SegmentRef::Map { map, .. } = self.refs.at(seg as usize) else { return Ok(false) };
        let cached = self.cache.lock().map(|c| c.slots.contains_key(&seg)).unwrap_or(true);
        let again = self.parts.lock().map(|p| p.contains(&seg)).unwrap_or(true);
        if cached || again || dst.len() as u64 >= self.seg_len(seg) {
            return Ok(false);
        }
        let buf = self.fetch_span(seg, &map, in_seg, in_seg + dst.len() as u64).await?;
        dst.copy_from_slice(buf.as_slice());
        // Remembered only once read: a failed part leaves the segment's other parts to be
        // read in part too.
        if let Ok(mut p) = self.parts.lock() {
            if p.len() >= PARTS_KEPT {
                p.pop_front();
            }
            p.push_back(seg);
        }
        Ok(true)
    }

    /// Where segment `seg` is, for fetches and their errors.
    fn at(&self, seg: u64) -> SegmentAt<'_> {
        SegmentAt { repo: &self.repo, index: &*self.index, snap: &self.snap, vol: &self.vol.name, offset: seg * self.seg_size(), len: self.seg_len(seg) }
    }

    /// Segment `seg`'s map: from its batch (loaded when it is not kept), else — the batch
    /// could not load it — alone, so the error names this map.
    async fn map_of(&self, seg: u64, map: &mover_format::ChunkId) -> Result<Arc<SegmentMap>> {
        let b = seg as usize / MAP_BATCH;
        let cell = {
            let mut kept = self.maps.lock().map_err(|_| Error::permanent("segment map cache lock poisoned"))?;
            let cell = match kept.iter().position(|(n, _)| *n == b) {
                Some(i) => kept.remove(i).map(|(_, c)| c).unwrap_or_default(),
                None => MapBatch::default(),
            };
            kept.push_back((b, cell.clone()));
            while kept.len() > MAP_BATCHES_KEPT {
                kept.pop_front();
            }
            cell
        };
        let batch = cell
            .get_or_init(|| async {
                let ids = (b * MAP_BATCH..((b + 1) * MAP_BATCH).min(self.refs.len()))
                    .filter_map(|i| match self.refs.at(i) {
                        SegmentRef::Map { map, .. } => Some(map),
                        SegmentRef::Hole => None,
                    })
                    .collect();
                match load_maps(self.repo.clone(), self.index.clone(), ids, self.cancel.clone()).await {
                    Ok(m) => Arc::new(m),
                    Err(e) => {
                        // Kept empty, so the batch is not tried again for each of its segments.
                        tracing::debug!("loading segment maps of volume '{}' from segment {}: {e:#}; segments load their own", self.vol.name, b * MAP_BATCH);
                        Arc::default()
                    }
                }
            })
            .await;
        match batch.get(map) {
            Some(m) => Ok(m.clone()),
            None => Ok(Arc::new(load_map(&self.at(seg), map, &self.cancel).await?)),
        }
    }

    /// Starts fetching the segments after `seg` when the reader is sequential; returns
    /// whether it is.
    fn read_ahead(self: &Arc<Self>, seg: u64) -> bool {
        let sequential = {
            let Ok(mut streams) = self.streams.lock() else { return false };
            match streams.iter().position(|&n| n == seg || n == seg + 1 || n + 1 == seg) {
                Some(i) => {
                    streams.remove(i);
                    streams.push_back(seg + 1);
                    true
                }
                None => {
                    if streams.len() >= MAX_STREAMS {
                        streams.pop_front();
                    }
                    streams.push_back(seg + 1);
                    false
                }
            }
        };
        if !sequential {
            return false;
        }
        let last = self.refs.len() as u64;
        for ahead in (seg + 1..last).take(self.opts.read_ahead) {
            if matches!(self.refs.at(ahead as usize), SegmentRef::Hole) {
                continue;
            }
            let cached = self.cache.lock().map(|c| c.slots.contains_key(&ahead)).unwrap_or(true);
            if !cached {
                let me = self.clone();
                tokio::spawn(async move {
                    let _ = me.segment(ahead).await;
                });
            }
        }
        true
    }

    /// Reads `buf.len()` bytes at `offset` (within the volume). Damaged blobs it meets are
    /// quarantined (`docs/repair.md`).
    pub async fn read(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.read_inner(offset, buf).await;
        if r.as_ref().is_err_and(|e| e.kind() == crate::error::ErrorKind::Corrupt) {
            crate::index::quarantine::note_seen(&self.repo, "export").await;
        }
        r
    }

    async fn read_inner(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.vol.size).ok_or_else(|| {
            Error::invalid(format!("read of {} bytes at {offset} past the end of volume '{}' ({} bytes)", buf.len(), self.vol.name, self.vol.size))
        })?;
        let mut pos = offset;
        while pos < end {
            let seg = pos / self.seg_size();
            let in_seg = pos - seg * self.seg_size();
            let n = (self.seg_len(seg) - in_seg).min(end - pos) as usize;
            let dst = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
            if self.read_ahead(seg) || !self.read_part(seg, in_seg, dst).await? {
                match self.segment(seg).await? {
                    None => dst.fill(0),
                    Some(b) => dst.copy_from_slice(&b.as_slice()[in_seg as usize..in_seg as usize + n]),
                }
            }
            pos += n as u64;
        }
        self.bytes_read.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Bytes clients have read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The data and holes of `[offset, offset + len)`: runs `(length, is_hole)`, covering
    /// it. Holes are whole hole segments and the holes of segment maps.
    pub async fn extents(self: &Arc<Self>, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let end = (offset + len).min(self.vol.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, hole: bool| match out.last_mut() {
            Some((l, h)) if *h == hole => *l += n,
            _ => out.push((n, hole)),
        };
        let mut pos = offset;
        while pos < end {
            let seg = pos / self.seg_size();
            let base = seg * self.seg_size();
            let seg_end = (base + self.seg_len(seg)).min(end);
            match self.refs.at(seg as usize) {
                SegmentRef::Hole => push(seg_end - pos, true),
                SegmentRef::Map { map, .. } => {
                    let m = self.map_of(seg, &map).await?;
                    let mut at = base;
                    for e in &m.entries {
                        let (a, b) = (at.max(pos), (at + e.len() as u64).min(seg_end));
                        if a < b {
                            push(b - a, matches!(e, MapEntry::Hole { .. }));
                        }
                        at += e.len() as u64;
                    }
                }
            }
            pos = seg_end;
        }
        Ok(out)
    }
}
