//! Packs: `header magic[8] || blob… || sealed trailer || trailer_len u32 || footer magic[8]`.
//! The trailer lists every blob so the index can be rebuilt from packs alone. A pack's id
//! is the BLAKE3 of all its bytes.

use crate::blob::{BlobKind, EncodedBlob};
use crate::bytes_io::{put_u32, Reader};
use crate::crypto::Keys;
use crate::error::FormatError;
use crate::file_formats::*;
use crate::id::{content_id, ChunkId, PackId};
use bytes::Bytes;

/// Bytes after the trailer: its length and the footer magic.
pub const FOOTER_LEN: usize = 12;
/// One trailer record: id, kind, offset, stored length, raw length.
pub const TRAILER_RECORD: usize = 32 + 1 + 4 + 4 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub kind: BlobKind,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

/// Memory alignment of a finished pack's bytes (a local store writes them with `O_DIRECT`).
pub const PACK_ALIGN: usize = 4096;

/// Takes a finished pack's buffer back once the last reference to its bytes is gone (the
/// upload is over), so that a later pack can be built in it.
pub type Recycle = std::sync::Arc<dyn Fn(Vec<u8>) + Send + Sync>;

/// Collects sealed blobs into one pack.
pub struct PackBuilder {
    /// `pad` filler bytes, then the pack: its first byte sits at a [`PACK_ALIGN`]-aligned
    /// address as long as `buf` is not reallocated (`capacity` covers a full pack).
    buf: Vec<u8>,
    pad: usize,
    entries: Vec<PackEntry>,
    recycle: Option<Recycle>,
}

/// A finished pack's buffer, handed to its [`Recycle`] when dropped.
struct Recycled {
    buf: Vec<u8>,
    recycle: Recycle,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        (self.recycle)(std::mem::take(&mut self.buf));
    }
}

impl PackBuilder {
    /// `capacity`: the pack size to reserve for (a pack may end up longer by its last blob
    /// and the trailer; it then stays correct, only unaligned).
    pub fn new(capacity: usize) -> Self {
        Self::in_buffer(Vec::with_capacity(Self::buffer_size(capacity)), None)
    }
    /// The buffer capacity [`PackBuilder::new`] reserves for a pack of `capacity` bytes.
    pub fn buffer_size(capacity: usize) -> usize {
        capacity + (1 << 20) + PACK_ALIGN
    }
    /// Builds the pack in `buf` (cleared first; its capacity should be
    /// [`PackBuilder::buffer_size`]): the caller chooses how the memory is backed, and with
    /// `recycle` gets the buffer back after the finished pack's bytes are dropped.
    pub fn in_buffer(mut buf: Vec<u8>, recycle: Option<Recycle>) -> Self {
        buf.clear();
        let pad = buf.as_ptr().align_offset(PACK_ALIGN).min(PACK_ALIGN);
        buf.resize(pad, 0);
        buf.extend_from_slice(&PACK_HEADER_MAGIC);
        Self { buf, pad, entries: Vec::new(), recycle }
    }
    pub fn len(&self) -> usize {
        self.buf.len() - self.pad
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }
    pub fn add(&mut self, blob: &EncodedBlob) -> Result<(), FormatError> {
        let offset = u32::try_from(self.len()).map_err(|_| FormatError::InvalidParameter("pack larger than 4 GiB".into()))?;
        let stored_len = u32::try_from(blob.sealed.len()).map_err(|_| FormatError::InvalidParameter("blob larger than 4 GiB".into()))?;
        self.buf.extend_from_slice(&blob.sealed);
        self.entries.push(PackEntry { id: blob.id, kind: blob.kind, offset, stored_len, raw_len: blob.raw_len });
        Ok(())
    }
    /// The finished pack: its id, bytes and entries.
    pub fn finish(mut self, keys: &Keys) -> Result<(PackId, Bytes, Vec<PackEntry>), FormatError> {
        let trailer = keys.seal(&encode_trailer(&self.entries), PACK_TRAILER_AAD)?;
        self.buf.extend_from_slice(&trailer);
        put_u32(&mut self.buf, trailer.len() as u32);
        self.buf.extend_from_slice(&PACK_FOOTER_MAGIC);
        let id = PackId(content_id(&self.buf[self.pad..]));
        let bytes = match self.recycle {
            Some(recycle) => Bytes::from_owner(Recycled { buf: self.buf, recycle }),
            None => Bytes::from(self.buf),
        };
        Ok((id, bytes.slice(self.pad..), self.entries))
    }
}

pub fn encode_trailer(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + entries.len() * TRAILER_RECORD);
    out.push(PACK_TRAILER_VERSION);
    put_u32(&mut out, entries.len() as u32);
    for e in entries {
        out.extend_from_slice(e.id.as_bytes());
        out.push(e.kind.as_u8());
        put_u32(&mut out, e.offset);
        put_u32(&mut out, e.stored_len);
        put_u32(&mut out, e.raw_len);
    }
    out
}

/// Parses a trailer's plaintext; every entry must lie inside `[8, blobs_end)`.
pub fn decode_trailer(plain: &[u8], blobs_end: u64) -> Result<Vec<PackEntry>, FormatError> {
    let mut r = Reader::new(plain, "pack trailer");
    let v = r.u8()?;
    if v != PACK_TRAILER_VERSION {
        return Err(FormatError::Unsupported(format!("pack trailer version {v}")));
    }
    let n = r.count(TRAILER_RECORD)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let e = PackEntry { id: ChunkId(r.id()?), kind: BlobKind::from_u8(r.u8()?)?, offset: r.u32()?, stored_len: r.u32()?, raw_len: r.u32()? };
        if (e.offset as u64) < PACK_HEADER_MAGIC.len() as u64 || e.offset as u64 + e.stored_len as u64 > blobs_end {
            return Err(FormatError::Corrupt(format!("trailer entry for chunk {} points outside the pack", e.id)));
        }
        out.push(e);
    }
    r.finish()?;
    Ok(out)
}

/// From the last [`FOOTER_LEN`] bytes of a pack of `pack_len` bytes: where the sealed
/// trailer starts and how long it is.
pub fn parse_footer(footer: &[u8], pack_len: u64) -> Result<(u64, u32), FormatError> {
    if footer.len() != FOOTER_LEN || footer[4..] != PACK_FOOTER_MAGIC {
        return Err(FormatError::Corrupt("pack footer magic missing (truncated or not a pack)".into()));
    }
    let mut r = Reader::new(&footer[..4], "pack footer");
    let tlen = r.u32()?;
    let start = pack_len
        .checked_sub(FOOTER_LEN as u64 + tlen as u64)
        .filter(|&s| s >= PACK_HEADER_MAGIC.len() as u64)
        .ok_or_else(|| FormatError::Corrupt(format!("pack trailer length {tlen} does not fit in {pack_len} bytes")))?;
    Ok((start, tlen))
}

/// Parses a whole pack held in memory: checks header, footer and trailer.
pub fn read_pack(keys: &Keys, bytes: &[u8]) -> Result<Vec<PackEntry>, FormatError> {
    if bytes.len() < PACK_HEADER_MAGIC.len() + FOOTER_LEN || bytes[..8] != PACK_HEADER_MAGIC {
        return Err(FormatError::Corrupt("pack header magic missing".into()));
    }
    let (start, tlen) = parse_footer(&bytes[bytes.len() - FOOTER_LEN..], bytes.len() as u64)?;
    let sealed = &bytes[start as usize..start as usize + tlen as usize];
    let plain = keys.open(sealed, PACK_TRAILER_AAD).ok_or_else(|| FormatError::Corrupt("pack trailer fails authentication".into()))?;
    decode_trailer(&plain, start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobEncoder;
    use crate::crypto::MasterKey;

    #[test]
    fn build_and_read_back() {
        let keys = Keys::derive(&MasterKey::generate());
        let mut enc = BlobEncoder::new(1);
        let mut b = PackBuilder::new(1 << 20);
        let blobs: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1000 + i as usize * 100]).collect();
        for p in &blobs {
            b.add(&enc.encode(&keys, keys.chunk_id(p), BlobKind::Data, p).unwrap()).unwrap();
        }
        let (id, bytes, entries) = b.finish(&keys).unwrap();
        assert_eq!(id, PackId(content_id(&bytes)));
        assert_eq!(read_pack(&keys, &bytes).unwrap(), entries);
        for (e, p) in entries.iter().zip(&blobs) {
            let s = &bytes[e.offset as usize..(e.offset + e.stored_len) as usize];
            assert_eq!(&crate::blob::decode(&keys, &e.id, s, e.raw_len).unwrap(), p);
        }
        // Truncation and flipped bits are caught.
        assert!(read_pack(&keys, &bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.to_vec();
        let n = bad.len();
        bad[n - 20] ^= 1;
        assert!(read_pack(&keys, &bad).is_err());
    }

    /// A pack built in a recycled buffer reads back exactly; the buffer comes back only
    /// once every reference to the pack's bytes is gone, and a pack built in it again (over
    /// the old contents) reads back exactly too.
    #[test]
    fn recycled_buffers_give_exact_packs() {
        let keys = Keys::derive(&MasterKey::generate());
        let mut enc = BlobEncoder::new(1);
        let returned = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
        let r = returned.clone();
        let recycle: Recycle = std::sync::Arc::new(move |v| r.lock().unwrap().push(v));
        let plain = |n: u8| -> Vec<Vec<u8>> { (0..n).map(|i| vec![i ^ n; 3000 + i as usize * 7]).collect() };
        let mut check = |b: PackBuilder, n: u8| -> Bytes {
            let mut b = b;
            for p in plain(n) {
                b.add(&enc.encode(&keys, keys.chunk_id(&p), BlobKind::Data, &p).unwrap()).unwrap();
            }
            let (id, bytes, entries) = b.finish(&keys).unwrap();
            assert_eq!(id, PackId(content_id(&bytes)));
            assert_eq!(read_pack(&keys, &bytes).unwrap(), entries);
            for (e, p) in entries.iter().zip(plain(n)) {
                let s = &bytes[e.offset as usize..(e.offset + e.stored_len) as usize];
                assert_eq!(crate::blob::decode(&keys, &e.id, s, e.raw_len).unwrap(), p);
            }
            bytes
        };
        let bytes = check(PackBuilder::in_buffer(Vec::with_capacity(PackBuilder::buffer_size(1 << 16)), Some(recycle.clone())), 9);
        let slice = bytes.slice(8..);
        drop(bytes);
        assert!(returned.lock().unwrap().is_empty(), "still referenced by a slice");
        drop(slice);
        let buf = returned.lock().unwrap().pop().expect("buffer handed back");
        let again = check(PackBuilder::in_buffer(buf, Some(recycle)), 5);
        drop(again);
        assert_eq!(returned.lock().unwrap().len(), 1);
    }

    #[test]
    fn trailer_roundtrip_and_bounds() {
        let e = PackEntry { id: ChunkId([7; 32]), kind: BlobKind::Tree, offset: 8, stored_len: 10, raw_len: 3 };
        let t = encode_trailer(&[e]);
        assert_eq!(decode_trailer(&t, 18).unwrap(), vec![e]);
        assert!(decode_trailer(&t, 17).is_err());
        assert!(decode_trailer(&t[..t.len() - 1], 18).is_err());
    }
}
