//! Tree blobs, stored in packs like data (kind `KIND_TREE`) and named by content:
//!
//! - a **segment map** lists one segment's pieces: chunks (id, length), holes (length), and
//!   slices (a byte range of a stored chunk: id, offset, length) — what an incremental
//!   that read only the changed bytes keeps of the parent's chunks around them;
//! - a **segment group** lists up to [`GROUP_SEGMENTS`] consecutive segments of a volume,
//!   each a hole or (segment map id, segment digest).
//!
//! A manifest lists a volume's groups. An incremental snapshot writes only the maps and
//! groups that changed: its metadata grows with the changed segments, not the volume.

use crate::bytes_io::{put_u32, put_u64, Reader};
use crate::error::FormatError;
use crate::file_formats::*;
use crate::id::{ChunkId, SegmentDigest};

/// Segments per group: 1024 × 4 MiB = 4 GiB of volume per group blob (≈ 65 KiB).
pub const GROUP_SEGMENTS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapEntry {
    Chunk {
        id: ChunkId,
        len: u32,
    },
    Hole {
        len: u32,
    },
    /// `len` bytes at `offset` of the chunk `id`.
    Slice {
        id: ChunkId,
        offset: u32,
        len: u32,
    },
}

impl MapEntry {
    pub fn len(&self) -> u32 {
        match *self {
            MapEntry::Chunk { len, .. } | MapEntry::Hole { len } | MapEntry::Slice { len, .. } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stored chunk this entry reads from, if any.
    pub fn chunk(&self) -> Option<ChunkId> {
        match *self {
            MapEntry::Chunk { id, .. } | MapEntry::Slice { id, .. } => Some(id),
            MapEntry::Hole { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SegmentMap {
    pub entries: Vec<MapEntry>,
}

impl SegmentMap {
    pub fn total_len(&self) -> u64 {
        self.entries.iter().map(|e| e.len() as u64).sum()
    }

    /// Encodes the map: version 1 when it holds no slices (the bytes maps always had, so
    /// they still deduplicate), version 2 when it does.
    pub fn encode(&self) -> Vec<u8> {
        let slices = self.entries.iter().any(|e| matches!(e, MapEntry::Slice { .. }));
        let mut out = Vec::with_capacity(6 + self.entries.len() * 41);
        out.push(if slices { TREE_VERSION_SLICES } else { TREE_VERSION });
        out.push(TREE_SEGMENT_MAP);
        put_u32(&mut out, self.entries.len() as u32);
        for e in &self.entries {
            match e {
                MapEntry::Chunk { id, len } => {
                    out.push(0);
                    put_u32(&mut out, *len);
                    out.extend_from_slice(id.as_bytes());
                }
                MapEntry::Hole { len } => {
                    out.push(1);
                    put_u32(&mut out, *len);
                }
                MapEntry::Slice { id, offset, len } => {
                    out.push(2);
                    put_u32(&mut out, *len);
                    out.extend_from_slice(id.as_bytes());
                    put_u32(&mut out, *offset);
                }
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(b, "segment map");
        let version = check_header_versions(&mut r, TREE_SEGMENT_MAP, "segment map", &[TREE_VERSION, TREE_VERSION_SLICES])?;
        let n = r.count(5)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let tag = r.u8()?;
            let len = r.u32()?;
            entries.push(match tag {
                0 => MapEntry::Chunk { id: ChunkId(r.id()?), len },
                1 => MapEntry::Hole { len },
                2 if version == TREE_VERSION_SLICES => {
                    let id = ChunkId(r.id()?);
                    let offset = r.u32()?;
                    if len == 0 || offset.checked_add(len).is_none() {
                        return Err(FormatError::Corrupt(format!("segment map slice of chunk {id} at {offset}+{len}")));
                    }
                    MapEntry::Slice { id, offset, len }
                }
                t => return Err(FormatError::Corrupt(format!("segment map entry tag {t}"))),
            });
        }
        r.finish()?;
        Ok(Self { entries })
    }
}

fn check_header(r: &mut Reader<'_>, ty: u8, what: &str) -> Result<(), FormatError> {
    check_header_versions(r, ty, what, &[TREE_VERSION]).map(|_| ())
}

fn check_header_versions(r: &mut Reader<'_>, ty: u8, what: &str, versions: &[u8]) -> Result<u8, FormatError> {
    let v = r.u8()?;
    if !versions.contains(&v) {
        return Err(FormatError::Unsupported(format!("{what} version {v}")));
    }
    let t = r.u8()?;
    if t != ty {
        return Err(FormatError::Corrupt(format!("expected a {what}, found tree type {t}")));
    }
    Ok(v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentRef {
    /// The whole segment is zeros.
    Hole,
    Map {
        map: ChunkId,
        digest: SegmentDigest,
    },
}

/// A volume's segment refs, in order, held compactly: 4 bytes a segment, and 64 more for
/// each segment that holds data. A 64 TiB volume of holes costs 64 MiB here, where a
/// `Vec<SegmentRef>` costs 1 GiB (the DaemonSet's whole memory limit). A slot may be
/// unset while a backup fills it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SegRefs {
    slots: Vec<u32>,
    maps: Vec<(ChunkId, SegmentDigest)>,
}

const SLOT_UNSET: u32 = u32::MAX;
const SLOT_HOLE: u32 = u32::MAX - 1;

impl SegRefs {
    /// `n` unset slots.
    pub fn unset(n: usize) -> Self {
        Self { slots: vec![SLOT_UNSET; n], maps: Vec::new() }
    }
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    fn slot_of(&mut self, r: SegmentRef) -> u32 {
        match r {
            SegmentRef::Hole => SLOT_HOLE,
            SegmentRef::Map { map, digest } => {
                self.maps.push((map, digest));
                (self.maps.len() - 1) as u32
            }
        }
    }
    pub fn push(&mut self, r: SegmentRef) {
        let s = self.slot_of(r);
        self.slots.push(s);
    }
    /// Segment `i`'s ref; `None` past the end or while unset.
    pub fn get(&self, i: usize) -> Option<SegmentRef> {
        match *self.slots.get(i)? {
            SLOT_UNSET => None,
            SLOT_HOLE => Some(SegmentRef::Hole),
            m => {
                let (map, digest) = self.maps[m as usize];
                Some(SegmentRef::Map { map, digest })
            }
        }
    }
    /// Segment `i`'s ref, which must be set (refs loaded from a snapshot always are).
    pub fn at(&self, i: usize) -> SegmentRef {
        self.get(i).unwrap_or_else(|| panic!("segment {i} of {} has no ref", self.slots.len()))
    }
    pub fn set(&mut self, i: usize, r: SegmentRef) {
        match (self.slots[i], r) {
            // A map over a map: in place (no garbage grows).
            (m, SegmentRef::Map { map, digest }) if m < SLOT_HOLE => self.maps[m as usize] = (map, digest),
            _ => self.slots[i] = self.slot_of(r),
        }
    }
    /// The first unset slot.
    pub fn first_unset(&self) -> Option<usize> {
        self.slots.iter().position(|&s| s == SLOT_UNSET)
    }
    /// The refs in order (`None` for unset slots).
    pub fn iter(&self) -> impl Iterator<Item = Option<SegmentRef>> + '_ {
        (0..self.slots.len()).map(|i| self.get(i))
    }
    /// Segments `[from, to)`, which must be set: a group's contents.
    pub fn range(&self, from: usize, to: usize) -> Vec<SegmentRef> {
        (from..to).map(|i| self.at(i)).collect()
    }
}

impl FromIterator<SegmentRef> for SegRefs {
    fn from_iter<I: IntoIterator<Item = SegmentRef>>(it: I) -> Self {
        let mut r = SegRefs::default();
        for x in it {
            r.push(x);
        }
        r
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SegmentGroup {
    pub first_segment: u64,
    pub segments: Vec<SegmentRef>,
}

impl SegmentGroup {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(14 + self.segments.len() * 65);
        out.push(TREE_VERSION);
        out.push(TREE_SEGMENT_GROUP);
        put_u64(&mut out, self.first_segment);
        put_u32(&mut out, self.segments.len() as u32);
        for s in &self.segments {
            match s {
                SegmentRef::Hole => out.push(0),
                SegmentRef::Map { map, digest } => {
                    out.push(1);
                    out.extend_from_slice(map.as_bytes());
                    out.extend_from_slice(digest.as_bytes());
                }
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(b, "segment group");
        check_header(&mut r, TREE_SEGMENT_GROUP, "segment group")?;
        let first_segment = r.u64()?;
        let n = r.count(1)?;
        let mut segments = Vec::with_capacity(n);
        for _ in 0..n {
            segments.push(match r.u8()? {
                0 => SegmentRef::Hole,
                1 => SegmentRef::Map { map: ChunkId(r.id()?), digest: SegmentDigest(r.id()?) },
                t => return Err(FormatError::Corrupt(format!("segment group entry tag {t}"))),
            });
        }
        r.finish()?;
        Ok(Self { first_segment, segments })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seg_refs_hold_holes_in_four_bytes_and_give_back_what_was_set() {
        let m = |b: u8| SegmentRef::Map { map: ChunkId::from_bytes([b; 32]), digest: SegmentDigest::from_bytes([b ^ 1; 32]) };
        let mut r = SegRefs::unset(4);
        assert_eq!((r.len(), r.first_unset(), r.get(0)), (4, Some(0), None));
        r.set(0, SegmentRef::Hole);
        r.set(1, m(1));
        r.set(1, m(2));
        r.set(3, m(3));
        assert_eq!(r.first_unset(), Some(2));
        r.set(2, SegmentRef::Hole);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![Some(SegmentRef::Hole), Some(m(2)), Some(SegmentRef::Hole), Some(m(3))]);
        assert_eq!(r.range(1, 3), vec![m(2), SegmentRef::Hole]);
        assert_eq!(r.maps.len(), 2, "a map set over a map is replaced in place");
        let mut holes = SegRefs::default();
        for _ in 0..1000 {
            holes.push(SegmentRef::Hole);
        }
        assert!(holes.maps.is_empty() && holes.slots.capacity() * 4 < 8192);
    }
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn map_roundtrip(raw in proptest::collection::vec((0u8..3, any::<[u8; 32]>(), 1u32..1 << 20, 0u32..1 << 20), 0..40)) {
            let m = SegmentMap { entries: raw.iter().map(|(t, id, len, off)| match t {
                0 => MapEntry::Hole { len: *len },
                1 => MapEntry::Chunk { id: ChunkId(*id), len: *len },
                _ => MapEntry::Slice { id: ChunkId(*id), offset: *off, len: *len },
            }).collect() };
            let bytes = m.encode();
            // Maps without slices keep the version-1 bytes they always had.
            let has_slices = m.entries.iter().any(|e| matches!(e, MapEntry::Slice { .. }));
            prop_assert_eq!(bytes[0], if has_slices { TREE_VERSION_SLICES } else { TREE_VERSION });
            prop_assert_eq!(SegmentMap::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn group_roundtrip(first in any::<u64>(), raw in proptest::collection::vec((any::<bool>(), any::<[u8; 32]>(), any::<[u8; 32]>()), 0..40)) {
            let g = SegmentGroup { first_segment: first, segments: raw.iter().map(|(h, a, b)| if *h { SegmentRef::Hole } else { SegmentRef::Map { map: ChunkId(*a), digest: SegmentDigest(*b) } }).collect() };
            prop_assert_eq!(SegmentGroup::decode(&g.encode()).unwrap(), g);
        }
    }

    #[test]
    fn wrong_type_and_truncation_are_errors() {
        let g = SegmentGroup { first_segment: 0, segments: vec![SegmentRef::Hole] }.encode();
        assert!(SegmentMap::decode(&g).is_err());
        let m = SegmentMap { entries: vec![MapEntry::Hole { len: 5 }] }.encode();
        assert!(SegmentMap::decode(&m[..m.len() - 1]).is_err());
        // A slice tag in a version-1 map is corruption, not a slice.
        let mut v1 = SegmentMap { entries: vec![MapEntry::Slice { id: ChunkId([1; 32]), offset: 0, len: 9 }] }.encode();
        v1[0] = TREE_VERSION;
        assert!(SegmentMap::decode(&v1).is_err());
    }
}
