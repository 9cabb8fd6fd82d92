//! Blobs: compress (zstd, kept raw when compression does not pay), then seal with
//! XChaCha20-Poly1305, the chunk id as associated data. Stored form:
//! `nonce[24] || AEAD(flag u8 || payload) || tag[16]`. Encoding seals in the output buffer;
//! decoding opens in a reused buffer and decompresses straight into the caller's.

use crate::crypto::Keys;
use crate::error::FormatError;
use crate::file_formats::{BLOB_RAW, BLOB_ZSTD, KIND_DATA, KIND_METADATA, KIND_TREE, NONCE_LEN, TAG_LEN};
use crate::id::ChunkId;

/// What a blob holds, as recorded (one byte) in pack trailers and index segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// A chunk of volume data.
    Data,
    /// A segment map or segment group.
    Tree,
    /// An opaque metadata blob of a snapshot (e.g. the VM's YAML).
    Metadata,
}

impl BlobKind {
    pub fn as_u8(self) -> u8 {
        match self {
            BlobKind::Data => KIND_DATA,
            BlobKind::Tree => KIND_TREE,
            BlobKind::Metadata => KIND_METADATA,
        }
    }

    pub fn from_u8(b: u8) -> Result<Self, FormatError> {
        match b {
            KIND_DATA => Ok(BlobKind::Data),
            KIND_TREE => Ok(BlobKind::Tree),
            KIND_METADATA => Ok(BlobKind::Metadata),
            k => Err(FormatError::Corrupt(format!("unknown blob kind {k}"))),
        }
    }
}

/// A sealed blob ready for a pack.
#[derive(Debug, Clone)]
pub struct EncodedBlob {
    pub id: ChunkId,
    pub kind: BlobKind,
    pub raw_len: u32,
    pub sealed: Vec<u8>,
}

/// Reusable encoder (one per worker thread: it owns a zstd context).
/// Bytes a blob stored uncompressed takes beyond its plaintext (nonce, flag, tag).
pub const RAW_OVERHEAD: usize = NONCE_LEN + 1 + TAG_LEN;

pub struct BlobEncoder {
    level: i32,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Compression output, reused across blobs (grows to the largest chunk once).
    scratch: Vec<u8>,
}

impl BlobEncoder {
    /// `level` 0 disables compression.
    pub fn new(level: i32) -> Self {
        let zstd = if level == 0 { None } else { zstd::bulk::Compressor::new(level).ok() };
        Self { level, zstd, scratch: Vec::new() }
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    pub fn encode(&mut self, keys: &Keys, id: ChunkId, kind: BlobKind, plain: &[u8]) -> Result<EncodedBlob, FormatError> {
        let raw_len = u32::try_from(plain.len()).map_err(|_| FormatError::InvalidParameter(format!("blob {id} is larger than 4 GiB")))?;
        // Worth compressing only when it saves at least 1/32 of the bytes.
        let limit = (plain.len() - plain.len() / 32).max(1);
        let mut compressed = None;
        if let Some(z) = self.zstd.as_mut() {
            if self.scratch.len() < limit {
                self.scratch.resize(limit, 0);
            }
            if let Ok(n) = z.compress_to_buffer(plain, &mut self.scratch[..limit]) {
                if n < limit {
                    compressed = Some(n);
                }
            }
        }
        let body = match compressed {
            Some(n) => &self.scratch[..n],
            None => plain,
        };
        // One buffer, sealed in place: nonce || flag || body || tag.
        let mut sealed = Vec::with_capacity(NONCE_LEN + 1 + body.len() + TAG_LEN);
        sealed.resize(NONCE_LEN, 0);
        sealed.push(if compressed.is_some() { BLOB_ZSTD } else { BLOB_RAW });
        sealed.extend_from_slice(body);
        keys.seal_in_place(&mut sealed, id.as_bytes())?;
        Ok(EncodedBlob { id, kind, raw_len, sealed })
    }
}

/// Reusable decoder state (one per thread): the buffer blobs are opened in and a zstd
/// context, so decoding allocates nothing once warm.
pub struct BlobDecoder {
    scratch: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Default for BlobDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl BlobDecoder {
    pub fn new() -> Self {
        Self { scratch: Vec::new(), zstd: None }
    }

    /// Opens, decompresses and verifies a blob into `out`, which must be exactly `raw_len`
    /// bytes long.
    pub fn decode_into(&mut self, keys: &Keys, id: &ChunkId, sealed: &[u8], out: &mut [u8]) -> Result<(), FormatError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(sealed);
        let r = self.decode_in_place(keys, id, &mut scratch, out);
        self.scratch = scratch;
        r
    }

    /// [`Self::decode_into`] that opens the blob where it lies, overwriting `sealed`: the
    /// sealed bytes are not copied first.
    pub fn decode_in_place(&mut self, keys: &Keys, id: &ChunkId, sealed: &mut [u8], out: &mut [u8]) -> Result<(), FormatError> {
        let payload = keys
            .open_in_place(sealed, id.as_bytes())
            .ok_or_else(|| FormatError::Corrupt("authentication failed (modified, truncated or encrypted with another key)".into()))?;
        let (flag, body) = payload.split_first().ok_or_else(|| FormatError::Corrupt("empty blob payload".into()))?;
        let n = match *flag {
            BLOB_RAW => {
                if body.len() != out.len() {
                    return Err(FormatError::Corrupt(format!("blob is {} bytes, the index says {}", body.len(), out.len())));
                }
                out.copy_from_slice(body);
                body.len()
            }
            BLOB_ZSTD => {
                if self.zstd.is_none() {
                    self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| FormatError::Corrupt(format!("zstd: {e}")))?);
                }
                let z = self.zstd.as_mut().ok_or_else(|| FormatError::Corrupt("zstd context".into()))?;
                // Output larger than `out` is an error from zstd, not an overflow.
                z.decompress_to_buffer(body, out).map_err(|e| FormatError::Corrupt(format!("zstd: {e}")))?
            }
            other => return Err(FormatError::Unsupported(format!("blob payload flag {other}"))),
        };
        if n != out.len() {
            return Err(FormatError::Corrupt(format!("blob is {n} bytes, the index says {}", out.len())));
        }
        if keys.chunk_id(out) != *id {
            return Err(FormatError::Corrupt("content does not hash to its id".into()));
        }
        Ok(())
    }
}

thread_local! {
    static DECODER: std::cell::RefCell<BlobDecoder> = std::cell::RefCell::new(BlobDecoder::new());
}

/// [`BlobDecoder::decode_into`] with this thread's decoder.
pub fn decode_into(keys: &Keys, id: &ChunkId, sealed: &[u8], out: &mut [u8]) -> Result<(), FormatError> {
    DECODER.with(|d| d.borrow_mut().decode_into(keys, id, sealed, out))
}

/// [`BlobDecoder::decode_in_place`] with this thread's decoder.
pub fn decode_in_place(keys: &Keys, id: &ChunkId, sealed: &mut [u8], out: &mut [u8]) -> Result<(), FormatError> {
    DECODER.with(|d| d.borrow_mut().decode_in_place(keys, id, sealed, out))
}

/// Opens, decompresses and verifies a blob against its id.
pub fn decode(keys: &Keys, id: &ChunkId, sealed: &[u8], raw_len: u32) -> Result<Vec<u8>, FormatError> {
    let mut plain = vec![0u8; raw_len as usize];
    decode_into(keys, id, sealed, &mut plain)?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    #[test]
    fn roundtrip_compressible_and_random() {
        let keys = Keys::derive(&MasterKey::generate());
        let mut enc = BlobEncoder::new(3);
        let text = b"abcabcabc".repeat(10_000);
        let mut random = vec![0u8; 100_000];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        for plain in [&text[..], &random[..], &[][..], b"x"] {
            let id = keys.chunk_id(plain);
            let b = enc.encode(&keys, id, BlobKind::Data, plain).unwrap();
            assert_eq!(decode(&keys, &id, &b.sealed, b.raw_len).unwrap(), plain);
        }
        let id = keys.chunk_id(&text);
        assert!(enc.encode(&keys, id, BlobKind::Data, &text).unwrap().sealed.len() < text.len() / 10);
        let id = keys.chunk_id(&random);
        let b = enc.encode(&keys, id, BlobKind::Data, &random).unwrap();
        assert_eq!(b.sealed.len(), random.len() + 1 + 24 + 16);
        let other = keys.chunk_id(b"other");
        assert!(decode(&keys, &other, &b.sealed, b.raw_len).is_err());
    }
}
