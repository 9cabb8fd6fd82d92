//! Incrementals that read only what changed. When a change source says a few small ranges
//! of a segment changed, only those bytes are read; they are chunked anew, and every other
//! byte of the segment keeps pointing where the parent's segment map pointed — a whole
//! parent chunk where none of it changed, a *slice* of one (`MapEntry::Slice`) where part
//! of it did. A 4 KiB page rewrite reads and stores about 4 KiB, not the 4 MiB segment or
//! the ~128 KiB chunk around it.
//!
//! The new map's segment digest is unknown (all zeros: the whole segment was not read),
//! so a later backup without change information re-chunks that segment in full — which
//! also compacts its slices.
//!
//! [`ParentMaps`] fetches the parent's maps of the segments to splice ahead of the chunk
//! workers, several at a time, a bounded number ahead.

use crate::error::{Error, Result};
use mover_format::local_index::ChunkIndex;
use mover_format::tree::{MapEntry, SegmentMap, SegmentRef};
use mover_format::{Repository, SegmentDigest};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The digest recorded for a segment that was not read in full.
pub const UNKNOWN_DIGEST: SegmentDigest = SegmentDigest([0; 32]);

/// One piece of a spliced segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Kept from the parent (a whole entry, or a slice or hole cut from one).
    Keep(MapEntry),
    /// New bytes `[start, end)` of the segment, to chunk.
    New(usize, usize),
}

/// Cuts the parent's map around the changed `ranges` (sorted, disjoint, within the
/// segment): what is outside them is kept, what is inside them is new.
pub fn plan(parent: &SegmentMap, ranges: &[(usize, usize)], seg_len: usize) -> Result<Vec<Part>> {
    if parent.total_len() != seg_len as u64 {
        return Err(Error::corrupt(format!("the parent's segment map covers {} bytes, the segment has {seg_len}", parent.total_len())));
    }
    // The parent's entries with their positions.
    let mut pieces = Vec::with_capacity(parent.entries.len());
    let mut pos = 0usize;
    for e in &parent.entries {
        pieces.push((pos, pos + e.len() as usize, *e));
        pos += e.len() as usize;
    }
    let mut out = Vec::new();
    let mut p = 0usize;
    let (mut ri, mut pi) = (0usize, 0usize);
    while p < seg_len {
        while ri < ranges.len() && ranges[ri].1 <= p {
            ri += 1;
        }
        if let Some(&(a, b)) = ranges.get(ri) {
            if a <= p {
                out.push(Part::New(p, b.min(seg_len)));
                p = b.min(seg_len);
                continue;
            }
        }
        while pieces[pi].1 <= p {
            pi += 1;
        }
        let (a, b, e) = pieces[pi];
        let next_change = ranges.get(ri).map(|r| r.0).unwrap_or(seg_len);
        let q = b.min(next_change);
        let kept = if p == a && q == b {
            e
        } else {
            let (off, len) = ((p - a) as u32, (q - p) as u32);
            match e {
                MapEntry::Hole { .. } => MapEntry::Hole { len },
                MapEntry::Chunk { id, .. } => MapEntry::Slice { id, offset: off, len },
                MapEntry::Slice { id, offset, .. } => MapEntry::Slice { id, offset: offset + off, len },
            }
        };
        out.push(Part::Keep(kept));
        p = q;
    }
    Ok(out)
}

/// Joins neighbouring holes.
pub fn merge_holes(entries: Vec<MapEntry>) -> Vec<MapEntry> {
    let mut out: Vec<MapEntry> = Vec::with_capacity(entries.len());
    for e in entries {
        match (out.last_mut(), e) {
            (Some(MapEntry::Hole { len: a }), MapEntry::Hole { len: b }) if (*a as u64 + b as u64) <= u32::MAX as u64 => *a += b,
            _ => out.push(e),
        }
    }
    out
}

struct Slot {
    map: std::result::Result<Arc<SegmentMap>, String>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// The parent's segment maps of the segments to splice, fetched ahead of the workers.
pub struct ParentMaps {
    ready: Mutex<HashMap<u64, Slot>>,
    cv: Condvar,
}

impl ParentMaps {
    /// Starts fetching the maps of `segs` (segment number, the parent's ref) in order, at
    /// most `ahead` not yet taken.
    pub fn spawn(repo: Repository, tree: Arc<dyn ChunkIndex>, segs: Vec<(u64, SegmentRef)>, ahead: usize, cancel: CancellationToken) -> Arc<Self> {
        use futures::StreamExt;
        let me = Arc::new(Self { ready: Mutex::new(HashMap::new()), cv: Condvar::new() });
        if segs.is_empty() {
            return me;
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(ahead.max(1)));
        let out = me.clone();
        tokio::spawn(async move {
            let fetches = futures::stream::iter(segs).map(|(seg, r)| {
                let (repo, tree, sem, cancel) = (repo.clone(), tree.clone(), sem.clone(), cancel.clone());
                async move {
                    let permit = sem.acquire_owned().await.ok()?;
                    let map = match r {
                        SegmentRef::Hole => Ok(Arc::new(SegmentMap { entries: Vec::new() })),
                        SegmentRef::Map { map, .. } => {
                            let what = format!("the parent's segment map {map}");
                            crate::snapshots::load_blob(&repo, &*tree, &map, &what, &cancel)
                                .await
                                .and_then(|b| SegmentMap::decode(&b).map_err(|e| Error::from(e).context(&what)))
                                .map(Arc::new)
                                .map_err(|e| format!("{e:#}"))
                        }
                    };
                    Some((seg, Slot { map, _permit: permit }))
                }
            });
            let mut fetches = fetches.buffered(16);
            while let Some(Some((seg, slot))) = tokio::select! {
                n = fetches.next() => n,
                _ = cancel.cancelled() => None,
            } {
                if let Ok(mut g) = out.ready.lock() {
                    g.insert(seg, slot);
                }
                out.cv.notify_all();
            }
        });
        me
    }

    /// The parent's map of segment `seg` (an empty map for a parent hole), waiting for it;
    /// blocking (called from the chunk workers).
    pub fn take(&self, seg: u64, cancel: &CancellationToken) -> Result<Arc<SegmentMap>> {
        let mut g = self.ready.lock().map_err(|_| Error::permanent("parent map cache poisoned"))?;
        loop {
            if let Some(slot) = g.remove(&seg) {
                return slot.map.map_err(Error::corrupt);
            }
            if cancel.is_cancelled() {
                return Err(Error::cancelled("the backup"));
            }
            g = self.cv.wait_timeout(g, Duration::from_millis(100)).map_err(|_| Error::permanent("parent map cache poisoned"))?.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::ChunkId;

    fn c(i: u8, len: u32) -> MapEntry {
        MapEntry::Chunk { id: ChunkId([i; 32]), len }
    }

    /// Reassembles the kept parts as byte ranges of "chunk i at offset o", to compare with
    /// the parent's layout.
    fn bytes_of(parts: &[Part], parent: &SegmentMap) -> Vec<Option<(u8, u32)>> {
        let mut out = Vec::new();
        for p in parts {
            match *p {
                Part::New(a, b) => out.extend((a..b).map(|_| None)),
                Part::Keep(MapEntry::Hole { len }) => out.extend((0..len).map(|_| Some((0, 0)))),
                Part::Keep(MapEntry::Chunk { id, len }) => out.extend((0..len).map(|o| Some((id.0[0], o)))),
                Part::Keep(MapEntry::Slice { id, offset, len }) => out.extend((offset..offset + len).map(|o| Some((id.0[0], o)))),
            }
        }
        let _ = parent;
        out
    }

    #[test]
    fn kept_bytes_point_where_the_parent_pointed_and_new_bytes_are_exactly_the_ranges() {
        let parent =
            SegmentMap { entries: vec![c(1, 100), MapEntry::Hole { len: 50 }, c(2, 100), MapEntry::Slice { id: ChunkId([3; 32]), offset: 10, len: 50 }] };
        let want_parent: Vec<Option<(u8, u32)>> = (0..100)
            .map(|o| Some((1, o)))
            .chain((0..50).map(|_| Some((0, 0))))
            .chain((0..100).map(|o| Some((2, o))))
            .chain((10..60).map(|o| Some((3, o))))
            .collect();
        for ranges in [vec![], vec![(0, 300)], vec![(10, 20)], vec![(90, 160), (170, 171)], vec![(0, 1), (299, 300)], vec![(120, 260)]] {
            let parts = plan(&parent, &ranges, 300).unwrap();
            let got = bytes_of(&parts, &parent);
            assert_eq!(got.len(), 300, "{ranges:?}");
            for (i, b) in got.iter().enumerate() {
                let changed = ranges.iter().any(|&(a, e)| a <= i && i < e);
                match b {
                    None => assert!(changed, "byte {i} read though unchanged: {ranges:?}"),
                    Some(x) => {
                        assert!(!changed, "byte {i} kept though changed: {ranges:?}");
                        assert_eq!(Some(*x), want_parent[i], "byte {i}: {ranges:?}");
                    }
                }
            }
            // Untouched whole entries stay whole.
            if ranges == vec![(10, 20)] {
                assert!(parts.contains(&Part::Keep(c(2, 100))));
            }
        }
        assert!(plan(&parent, &[], 301).is_err(), "a map of another length is refused");
    }

    #[test]
    fn a_parent_hole_segment_splices_as_holes() {
        let hole = SegmentMap { entries: vec![MapEntry::Hole { len: 64 }] };
        let parts = plan(&hole, &[(8, 16)], 64).unwrap();
        assert_eq!(parts, vec![Part::Keep(MapEntry::Hole { len: 8 }), Part::New(8, 16), Part::Keep(MapEntry::Hole { len: 48 })]);
        assert_eq!(merge_holes(vec![MapEntry::Hole { len: 2 }, MapEntry::Hole { len: 3 }, c(1, 4)]), vec![MapEntry::Hole { len: 5 }, c(1, 4)]);
    }
}
