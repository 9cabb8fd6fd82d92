//! The chunk stage: worker threads (one per core) take read segments and, off the async
//! reactor, detect zeros, compute the segment digest (and reuse the parent's map when it
//! matches), cut content-defined chunks, hash them with the keyed hash, look each up in the
//! local index and this backup's claim set, and compress + encrypt the new ones. Results go
//! back to the assembler with their segment number, so the manifest never depends on
//! scheduling.

use super::packer::Claims;
use super::reader::ReadDone;
use super::splice::{self, ParentMaps};
use crate::aligned::AlignedBuf;
use crate::error::{Error, Result};
use mover_format::blob::{BlobEncoder, BlobKind, EncodedBlob};
use mover_format::chunker::{is_zero, split_segment, Chunker, ChunkerParams, Piece};
use mover_format::crypto::Keys;
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::VolumeStats;
use mover_format::tree::{MapEntry, SegRefs, SegmentMap, SegmentRef};
use mover_format::{ChunkId, Repository, SegmentDigest};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the worker threads share.
pub(super) struct Shared {
    pub repo: Repository,
    pub index: Arc<dyn ChunkIndex>,
    pub chunker: Chunker,
    pub params: ChunkerParams,
    pub claims: Arc<Claims>,
}

impl Shared {
    pub fn new(repo: &Repository, index: Arc<dyn ChunkIndex>) -> Self {
        Self { repo: repo.clone(), index, chunker: repo.chunker(), params: repo.config().chunker, claims: Arc::new(Claims::default()) }
    }
    pub fn keys(&self) -> &Keys {
        self.repo.keys()
    }
    /// True when the chunk is already stored or claimed by this backup (then it is not
    /// stored again); otherwise this backup claims it.
    pub fn known(&self, id: &ChunkId) -> Result<bool> {
        self.claims.known(&*self.index, id)
    }
}

/// One processed segment.
pub(super) struct SegOut {
    pub seg: u64,
    pub r: SegmentRef,
    /// New blobs (data chunks, and the segment map when it is new), sealed.
    pub blobs: Vec<EncodedBlob>,
    pub stats: VolumeStats,
}

/// Chunks `data` (a part of a segment), appending its entries and new blobs.
fn chunk_into(sh: &Shared, enc: &mut BlobEncoder, data: &[u8], entries: &mut Vec<MapEntry>, blobs: &mut Vec<EncodedBlob>, st: &mut VolumeStats) -> Result<()> {
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
                    let b = enc.encode(sh.keys(), id, BlobKind::Data, bytes)?;
                    st.chunks_new += 1;
                    st.bytes_new += len as u64;
                    st.bytes_stored += b.sealed.len() as u64;
                    blobs.push(b);
                }
                entries.push(MapEntry::Chunk { id, len: len as u32 });
            }
        }
    }
    Ok(())
}

/// Stores a segment map (when new) and returns its ref.
fn finish_map(sh: &Shared, enc: &mut BlobEncoder, entries: Vec<MapEntry>, digest: SegmentDigest, blobs: &mut Vec<EncodedBlob>) -> Result<SegmentRef> {
    if entries.iter().all(|e| matches!(e, MapEntry::Hole { .. })) {
        return Ok(SegmentRef::Hole);
    }
    let map = SegmentMap { entries }.encode();
    let map_id = sh.keys().chunk_id(&map);
    if !sh.known(&map_id)? {
        blobs.push(enc.encode(sh.keys(), map_id, BlobKind::Tree, &map)?);
    }
    Ok(SegmentRef::Map { map: map_id, digest })
}

/// Processes a segment of which only `ranges` were read: those bytes are chunked anew,
/// the rest keeps pointing into the parent's map (`splice`).
fn process_splice(
    sh: &Shared,
    enc: &mut BlobEncoder,
    data: &[u8],
    ranges: &[(usize, usize)],
    parent: &SegmentMap,
) -> Result<(SegmentRef, Vec<EncodedBlob>, VolumeStats)> {
    let hole;
    let parent = if parent.entries.is_empty() {
        hole = SegmentMap { entries: vec![MapEntry::Hole { len: data.len() as u32 }] };
        &hole
    } else {
        parent
    };
    let read: u64 = ranges.iter().map(|(a, b)| (b - a) as u64).sum();
    let mut st = VolumeStats { bytes_read: read, bytes_skipped: data.len() as u64 - read, ..Default::default() };
    let mut entries = Vec::new();
    let mut blobs = Vec::new();
    for part in splice::plan(parent, ranges, data.len())? {
        match part {
            splice::Part::Keep(e) => entries.push(e),
            splice::Part::New(a, b) => chunk_into(sh, enc, &data[a..b], &mut entries, &mut blobs, &mut st)?,
        }
    }
    let r = finish_map(sh, enc, splice::merge_holes(entries), splice::UNKNOWN_DIGEST, &mut blobs)?;
    Ok((r, blobs, st))
}

/// Processes one segment of `data` (its parent's ref, if any, for digest reuse).
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
    chunk_into(sh, enc, data, &mut entries, &mut blobs, &mut st)?;
    let r = finish_map(sh, enc, entries, digest, &mut blobs)?;
    Ok((r, blobs, st))
}

/// Starts `workers` threads that take reads from `reads`, hand their buffers back to
/// `pool`, and send results to `out`. They stop when `reads` closes, `out` is dropped, or
/// `cancel` fires.
pub(super) fn spawn_workers(
    workers: usize,
    shared: &Arc<Shared>,
    level: i32,
    parent_refs: Arc<Option<SegRefs>>,
    parent_maps: Arc<ParentMaps>,
    reads: mpsc::Receiver<Result<ReadDone>>,
    pool: &mpsc::Sender<AlignedBuf>,
    out: &mpsc::Sender<Result<SegOut>>,
    cancel: &CancellationToken,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let reads = Arc::new(Mutex::new(reads));
    let mut threads = Vec::new();
    for i in 0..workers {
        let (sh, reads, out, pool, prefs, pmaps, cancel) =
            (shared.clone(), reads.clone(), out.clone(), pool.clone(), parent_refs.clone(), parent_maps.clone(), cancel.clone());
        let t = std::thread::Builder::new().name(format!("mover-chunk-{i}")).spawn(move || {
            let mut enc = BlobEncoder::new(level);
            loop {
                if cancel.is_cancelled() {
                    return;
                }
                let item = match reads.lock() {
                    Ok(mut rx) => rx.blocking_recv(),
                    Err(_) => return,
                };
                let Some(item) = item else { return };
                let done = item.and_then(|done| {
                    let t = std::time::Instant::now();
                    let r = match &done.ranges {
                        None => process_segment(&sh, &mut enc, done.buf.as_slice(), prefs.as_ref().as_ref().and_then(|p| p.get(done.seg as usize)).as_ref()),
                        Some(ranges) => pmaps.take(done.seg, &cancel).and_then(|pm| process_splice(&sh, &mut enc, done.buf.as_slice(), ranges, &pm)),
                    };
                    let seg = done.seg;
                    tracing::trace!(seg, worker = i, ms = t.elapsed().as_millis() as u64, "segment processed");
                    let _ = pool.try_send(done.buf);
                    r.map(|(r, blobs, stats)| SegOut { seg, r, blobs, stats })
                });
                if out.blocking_send(done).is_err() {
                    return;
                }
            }
        });
        threads.push(t.map_err(|e| Error::with_source(crate::ErrorKind::Permanent, "starting a chunking thread", e))?);
    }
    // Only the workers hold the read receiver: if the caller kept one, a reader blocked on
    // a full channel after a cancel would never see it close.
    Ok(threads)
}
