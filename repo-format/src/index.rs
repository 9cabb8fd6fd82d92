//! Index segments (`index/<id>`): `magic[8] || sealed(version u8 || count u32 || records)`,
//! one record per blob: chunk id, pack id, kind, offset, stored length, raw length.
//! Sorted by chunk id. Immutable; written only after the packs they name are durable.

use crate::blob::BlobKind;
use crate::bytes_io::{put_u32, Reader};
use crate::crypto::Keys;
use crate::error::FormatError;
use crate::file_formats::*;
use crate::id::{ChunkId, PackId};
use crate::pack::PackEntry;

pub const INDEX_RECORD: usize = 32 + 32 + 1 + 4 + 4 + 4;
/// Encoded length of a [`BlobLocation`].
pub const LOCATION_LEN: usize = 32 + 1 + 4 + 4 + 4;

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: PackId,
    pub kind: BlobKind,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl BlobLocation {
    pub fn to_bytes(&self) -> [u8; LOCATION_LEN] {
        let mut out = [0u8; LOCATION_LEN];
        out[..32].copy_from_slice(self.pack.as_bytes());
        out[32] = self.kind.as_u8();
        out[33..37].copy_from_slice(&self.offset.to_le_bytes());
        out[37..41].copy_from_slice(&self.stored_len.to_le_bytes());
        out[41..45].copy_from_slice(&self.raw_len.to_le_bytes());
        out
    }
    pub fn from_bytes(b: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(b, "blob location");
        let l = Self { pack: PackId(r.id()?), kind: BlobKind::from_u8(r.u8()?)?, offset: r.u32()?, stored_len: r.u32()?, raw_len: r.u32()? };
        r.finish()?;
        Ok(l)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: ChunkId,
    pub loc: BlobLocation,
}

impl IndexEntry {
    pub fn from_pack(pack: PackId, e: &PackEntry) -> Self {
        Self { id: e.id, loc: BlobLocation { pack, kind: e.kind, offset: e.offset, stored_len: e.stored_len, raw_len: e.raw_len } }
    }
}

pub fn encode_plain(entries: &[IndexEntry]) -> Vec<u8> {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|a| a.id);
    let mut out = Vec::with_capacity(5 + sorted.len() * INDEX_RECORD);
    out.push(INDEX_VERSION);
    put_u32(&mut out, sorted.len() as u32);
    for e in &sorted {
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&e.loc.to_bytes());
    }
    out
}

pub fn decode_plain(plain: &[u8]) -> Result<Vec<IndexEntry>, FormatError> {
    let mut r = Reader::new(plain, "index segment");
    let v = r.u8()?;
    if v != INDEX_VERSION {
        return Err(FormatError::Unsupported(format!("index segment version {v}")));
    }
    let n = r.count(INDEX_RECORD)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = ChunkId(r.id()?);
        let loc = BlobLocation::from_bytes(r.take(LOCATION_LEN)?)?;
        out.push(IndexEntry { id, loc });
    }
    r.finish()?;
    Ok(out)
}

/// The stored bytes of an index segment.
pub fn seal(keys: &Keys, entries: &[IndexEntry]) -> Result<Vec<u8>, FormatError> {
    let mut out = INDEX_MAGIC.to_vec();
    out.extend_from_slice(&keys.seal(&encode_plain(entries), &INDEX_MAGIC)?);
    Ok(out)
}

pub fn open(keys: &Keys, bytes: &[u8]) -> Result<Vec<IndexEntry>, FormatError> {
    if bytes.len() < 8 || bytes[..8] != INDEX_MAGIC {
        return Err(FormatError::Corrupt("index segment magic missing".into()));
    }
    let plain = keys.open(&bytes[8..], &INDEX_MAGIC).ok_or_else(|| FormatError::Corrupt("index segment fails authentication".into()))?;
    decode_plain(&plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(raw in proptest::collection::vec((any::<[u8; 32]>(), any::<[u8; 32]>(), any::<u8>(), any::<u32>(), any::<u32>(), any::<u32>()), 0..50)) {
            let entries: Vec<IndexEntry> = raw.iter().map(|(c, p, k, o, s, r)| IndexEntry {
                id: ChunkId(*c), loc: BlobLocation { pack: PackId(*p), kind: [BlobKind::Data, BlobKind::Tree, BlobKind::Metadata][*k as usize % 3], offset: *o, stored_len: *s, raw_len: *r } }).collect();
            let mut sorted = entries.clone();
            sorted.sort_by_key(|a| a.id);
            prop_assert_eq!(decode_plain(&encode_plain(&entries)).unwrap(), sorted);
        }
    }

    #[test]
    fn sealed_flip_detected() {
        let keys = Keys::derive(&MasterKey::generate());
        let e = IndexEntry { id: ChunkId([1; 32]), loc: BlobLocation { pack: PackId([2; 32]), kind: BlobKind::Data, offset: 8, stored_len: 5, raw_len: 5 } };
        let s = seal(&keys, &[e]).unwrap();
        assert_eq!(open(&keys, &s).unwrap(), vec![e]);
        let mut bad = s.clone();
        bad[40] ^= 4;
        assert!(open(&keys, &bad).is_err());
    }
}
