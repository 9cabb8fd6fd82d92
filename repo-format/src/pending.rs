//! GC pending-deletion records (`gc/<record>.entries` and `gc/<record>.ready`).
//!
//! When `gc` takes entries out of the index it first writes them here, so no entry is ever
//! lost: restores and checks still find a chunk through a record until the record is swept,
//! and the sweep puts back ("resurrects") every entry a snapshot references by then.
//!
//! `.entries`: `PENDING_MAGIC || sealed(version u8 || created_ms u64 || orphans u32 ||
//! orphan pack ids || forgotten u32 || (snapshot id || len u32 || manifest bytes)… ||
//! index-segment plaintext of the entries)`. Orphans are packs no index
//! segment named when the record was made.
//! `.ready`: `PENDING_READY_MAGIC || sealed(JSON Ready)`, written after the old index
//! segments are gone: the locks live at that moment. The record may be swept once none of
//! them is live any more.

use crate::bytes_io::{put_u32, put_u64, Reader};
use crate::crypto::Keys;
use crate::error::FormatError;
use crate::file_formats::{PENDING_MAGIC, PENDING_READY_MAGIC};
use crate::id::{PackId, SnapshotId};
use crate::index::{self, IndexEntry};
use serde::{Deserialize, Serialize};

const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingDeletion {
    pub created_ms: u64,
    pub orphans: Vec<PackId>,
    /// Manifests removed by `forget`, as stored. They stay roots of reachability until the
    /// record is swept, so a backup that started from one of them as its parent is safe.
    pub forgotten: Vec<(SnapshotId, Vec<u8>)>,
    pub entries: Vec<IndexEntry>,
}

impl PendingDeletion {
    /// Every pack the record would delete.
    pub fn packs(&self) -> std::collections::HashSet<PackId> {
        self.entries.iter().map(|e| e.loc.pack).chain(self.orphans.iter().copied()).collect()
    }

    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>, FormatError> {
        let mut plain = vec![VERSION];
        put_u64(&mut plain, self.created_ms);
        put_u32(&mut plain, self.orphans.len() as u32);
        for p in &self.orphans {
            plain.extend_from_slice(p.as_bytes());
        }
        put_u32(&mut plain, self.forgotten.len() as u32);
        for (id, bytes) in &self.forgotten {
            plain.extend_from_slice(id.as_bytes());
            put_u32(&mut plain, bytes.len() as u32);
            plain.extend_from_slice(bytes);
        }
        plain.extend_from_slice(&index::encode_plain(&self.entries));
        keys.seal_object(&PENDING_MAGIC, &plain)
    }

    pub fn open(keys: &Keys, bytes: &[u8]) -> Result<Self, FormatError> {
        let plain = keys.open_object(&PENDING_MAGIC, bytes, "gc record")?;
        let mut r = Reader::new(&plain, "gc record");
        let v = r.u8()?;
        if v != VERSION {
            return Err(FormatError::Unsupported(format!("gc record version {v}")));
        }
        let created_ms = r.u64()?;
        let n = r.count(32)?;
        let mut orphans = Vec::with_capacity(n);
        for _ in 0..n {
            orphans.push(PackId(r.id()?));
        }
        let n = r.count(36)?;
        let mut forgotten = Vec::with_capacity(n);
        for _ in 0..n {
            let id = SnapshotId(r.id()?);
            let len = r.u32()? as usize;
            forgotten.push((id, r.take(len)?.to_vec()));
        }
        let rest = r.take(r.remaining())?;
        let entries = index::decode_plain(rest)?;
        Ok(Self { created_ms, orphans, forgotten, entries })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ready {
    /// Ids of the locks (other than the gc's own) live when the old index segments were gone.
    pub locks: Vec<String>,
    pub written_ms: u64,
}

impl Ready {
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>, FormatError> {
        keys.seal_json(&PENDING_READY_MAGIC, self, "gc marker")
    }
    pub fn open(keys: &Keys, bytes: &[u8]) -> Result<Self, FormatError> {
        keys.open_json(&PENDING_READY_MAGIC, bytes, "gc marker")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;
    use crate::index::BlobLocation;
    use crate::ChunkId;

    #[test]
    fn records_round_trip() {
        let keys = Keys::derive(&MasterKey::generate());
        let e = IndexEntry {
            id: ChunkId([7; 32]),
            loc: BlobLocation { pack: PackId([1; 32]), kind: crate::blob::BlobKind::Data, offset: 8, stored_len: 100, raw_len: 90 },
        };
        let r =
            PendingDeletion { created_ms: 42, orphans: vec![PackId([2; 32])], forgotten: vec![(SnapshotId([3; 32]), b"manifest".to_vec())], entries: vec![e] };
        let back = PendingDeletion::open(&keys, &r.seal(&keys).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.packs().len(), 2);
        let m = Ready { locks: vec!["00112233aabbccdd".into()], written_ms: 5 };
        assert_eq!(Ready::open(&keys, &m.seal(&keys).unwrap()).unwrap(), m);
        let mut bad = r.seal(&keys).unwrap();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(PendingDeletion::open(&keys, &bad).is_err());
    }
}
