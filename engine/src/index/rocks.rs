//! The RocksDB implementation of the local index ([`ChunkIndex`]): one database per
//! repository id under the cache directory. Every ingested index segment gets an ordinal;
//! every location remembers the ordinal of the segment it came from, so a segment gone
//! from the store is removed exactly (`local_index::sync`).
//!
//! Column families: `chunks`: chunk id → its locations, each `ordinal u32 LE ‖ location
//! (45 bytes)` (ordinal 0: ingested without a segment); `segments`: segment id → ordinal;
//! `members`: ordinal (u32 BE) → the chunk ids the segment contributed, concatenated;
//! `meta`: `next` → the next ordinal. Writes skip the write-ahead log and the column
//! families flush together: a crash loses the latest writes whole — a segment is then
//! simply ingested again. It is a cache: delete the directory and the next sync rebuilds
//! it.

use mover_format::index::{BlobLocation, IndexEntry};
use mover_format::local_index::{ChunkIndex, SyncMark};
use mover_format::{ChunkId, IndexId, RepoError, RepoId};
use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Options, WriteBatch, DB};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const CF_CHUNKS: &str = "chunks";
const CF_SEGMENTS: &str = "segments";
const CF_MEMBERS: &str = "members";
const CF_META: &str = "meta";
const NEXT: &[u8] = b"next";
/// The [`SyncMark`] of the last sync that completed.
const SYNC_MARK: &[u8] = b"sync_mark";
/// One location in a `chunks` value.
const REC: usize = 4 + mover_format::index::LOCATION_LEN;

pub struct RocksIndex {
    db: DB,
    path: PathBuf,
    /// Writers read, modify and write a chunk's locations: one at a time.
    write: Mutex<()>,
    wo: rocksdb::WriteOptions,
}

/// The records of a `chunks` value.
fn records(v: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    v.chunks_exact(REC).map(|r| (u32::from_le_bytes([r[0], r[1], r[2], r[3]]), &r[4..]))
}

impl RocksIndex {
    /// The database directory of a repository under `cache_root` (`index-v3`: locations
    /// with their segment; older layouts in `index`, `index-v2` are ignored).
    pub fn path_for(cache_root: &Path, repo: &RepoId) -> PathBuf {
        cache_root.join(repo.to_hex()).join("index-v3")
    }

    pub fn open(path: &Path) -> Result<Self, RepoError> {
        std::fs::create_dir_all(path).map_err(|e| err(path, format!("creating directory: {e}")))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_atomic_flush(true);
        let mut chunk_opts = Options::default();
        chunk_opts.set_merge_operator_associative("append-locations", append);
        let mut bb = BlockBasedOptions::default();
        bb.set_bloom_filter(10.0, false);
        chunk_opts.set_block_based_table_factory(&bb);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts),
            ColumnFamilyDescriptor::new(CF_SEGMENTS, Options::default()),
            ColumnFamilyDescriptor::new(CF_MEMBERS, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| err(path, e.to_string()))?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        Ok(Self { db, path: path.to_path_buf(), write: Mutex::new(()), wo })
    }

    fn commit(&self, b: WriteBatch) -> Result<(), RepoError> {
        self.db.write_opt(b, &self.wo).map_err(|e| self.e(e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, RepoError> {
        self.db.cf_handle(name).ok_or_else(|| err(&self.path, format!("column family {name} missing")))
    }

    fn e(&self, e: rocksdb::Error) -> RepoError {
        err(&self.path, e.to_string())
    }

    fn next_ordinal(&self) -> Result<u32, RepoError> {
        Ok(match self.db.get_cf(self.cf(CF_META)?, NEXT).map_err(|e| self.e(e))? {
            Some(v) if v.len() == 4 => u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
            _ => 1,
        })
    }

    fn segment_ordinal(&self, s: &IndexId) -> Result<Option<u32>, RepoError> {
        Ok(match self.db.get_cf(self.cf(CF_SEGMENTS)?, s.as_bytes()).map_err(|e| self.e(e))? {
            Some(v) if v.len() == 4 => Some(u32::from_le_bytes([v[0], v[1], v[2], v[3]])),
            _ => None,
        })
    }
}

/// The `chunks` merge operator: a chunk's locations are appended.
fn append(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let mut v = existing.map(<[u8]>::to_vec).unwrap_or_default();
    for op in operands {
        v.extend_from_slice(op);
    }
    Some(v)
}

fn err(path: &Path, message: String) -> RepoError {
    RepoError::Index { path: path.display().to_string(), message }
}

impl ChunkIndex for RocksIndex {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError> {
        match self.db.get_pinned_cf(self.cf(CF_CHUNKS)?, id.as_bytes()).map_err(|e| self.e(e))? {
            Some(v) => match records(&v).next() {
                Some((_, loc)) => BlobLocation::from_bytes(loc).map(Some).map_err(|e| err(&self.path, format!("entry for chunk {id}: {e}"))),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    fn locations(&self, id: &ChunkId) -> Result<Vec<BlobLocation>, RepoError> {
        let Some(v) = self.db.get_pinned_cf(self.cf(CF_CHUNKS)?, id.as_bytes()).map_err(|e| self.e(e))? else { return Ok(Vec::new()) };
        let mut out: Vec<BlobLocation> = Vec::new();
        for (_, loc) in records(&v) {
            let l = BlobLocation::from_bytes(loc).map_err(|e| err(&self.path, format!("entry for chunk {id}: {e}")))?;
            if !out.contains(&l) {
                out.push(l);
            }
        }
        Ok(out)
    }

    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError> {
        let _w = self.write.lock().map_err(|_| err(&self.path, "writer lock poisoned".into()))?;
        let mut b = WriteBatch::default();
        let ord = match segment {
            Some(s) if self.segment_ordinal(s)?.is_some() => return Ok(()),
            Some(s) => {
                let ord = self.next_ordinal()?;
                b.put_cf(self.cf(CF_SEGMENTS)?, s.as_bytes(), ord.to_le_bytes());
                b.put_cf(self.cf(CF_META)?, NEXT, (ord + 1).to_le_bytes());
                ord
            }
            None => 0,
        };
        let (chunks, members) = (self.cf(CF_CHUNKS)?, self.cf(CF_MEMBERS)?);
        // Blind appends (the `chunks` merge operator concatenates): no read per entry.
        let mut seen: HashSet<(ChunkId, [u8; mover_format::index::LOCATION_LEN])> = HashSet::with_capacity(entries.len());
        let mut contributed: Vec<u8> = Vec::new();
        let mut rec = [0u8; REC];
        for e in entries {
            let loc = e.loc.to_bytes();
            if !seen.insert((e.id, loc)) {
                continue;
            }
            rec[..4].copy_from_slice(&ord.to_le_bytes());
            rec[4..].copy_from_slice(&loc);
            b.merge_cf(chunks, e.id.as_bytes(), rec);
            if ord != 0 {
                contributed.extend_from_slice(e.id.as_bytes());
            }
        }
        if ord != 0 {
            b.put_cf(members, ord.to_be_bytes(), contributed);
        }
        self.commit(b)
    }

    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError> {
        let mut out = HashSet::new();
        for item in self.db.iterator_cf(self.cf(CF_SEGMENTS)?, rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.e(e))?;
            if let Some(id) = IndexId::from_slice(&k) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    fn remove_segment(&self, segment: &IndexId) -> Result<usize, RepoError> {
        let _w = self.write.lock().map_err(|_| err(&self.path, "writer lock poisoned".into()))?;
        let Some(ord) = self.segment_ordinal(segment)? else { return Ok(0) };
        let (chunks, members) = (self.cf(CF_CHUNKS)?, self.cf(CF_MEMBERS)?);
        let mut b = WriteBatch::default();
        let mut removed = 0;
        let list = self.db.get_cf(members, ord.to_be_bytes()).map_err(|e| self.e(e))?.unwrap_or_default();
        let mut ids: Vec<ChunkId> = list.chunks_exact(32).filter_map(ChunkId::from_slice).collect();
        ids.sort_unstable();
        ids.dedup();
        b.delete_cf(members, ord.to_be_bytes());
        // One sorted batch of reads.
        let values = self.db.batched_multi_get_cf(chunks, ids.iter().map(|i| i.as_bytes()), true);
        for (id, v) in ids.iter().zip(values) {
            let Some(v) = v.map_err(|e| self.e(e))? else { continue };
            let kept: Vec<u8> = v.chunks_exact(REC).filter(|r| r[..4] != ord.to_le_bytes()).flatten().copied().collect();
            removed += (v.len() - kept.len()) / REC;
            if kept.is_empty() {
                b.delete_cf(chunks, id.as_bytes());
            } else {
                b.put_cf(chunks, id.as_bytes(), kept);
            }
        }
        b.delete_cf(self.cf(CF_SEGMENTS)?, segment.as_bytes());
        self.commit(b)?;
        Ok(removed)
    }

    fn entry_count(&self) -> Result<u64, RepoError> {
        let mut n = 0;
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS)?, rocksdb::IteratorMode::Start) {
            item.map_err(|e| self.e(e))?;
            n += 1;
        }
        Ok(n)
    }

    fn has_segment(&self, segment: &IndexId) -> Result<bool, RepoError> {
        Ok(self.segment_ordinal(segment)?.is_some())
    }

    fn sync_mark(&self) -> Result<Option<SyncMark>, RepoError> {
        // A mark that does not parse (written by another version) only costs a full sync.
        Ok(self.db.get_cf(self.cf(CF_META)?, SYNC_MARK).map_err(|e| self.e(e))?.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn set_sync_mark(&self, mark: &SyncMark) -> Result<(), RepoError> {
        let v = serde_json::to_vec(mark).map_err(|e| err(&self.path, format!("encoding the sync mark: {e}")))?;
        self.db.put_cf(self.cf(CF_META)?, SYNC_MARK, v).map_err(|e| self.e(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::blob::BlobKind;
    use mover_format::PackId;

    fn entry(chunk: u8, pack: u8) -> IndexEntry {
        IndexEntry { id: ChunkId([chunk; 32]), loc: BlobLocation { pack: PackId([pack; 32]), kind: BlobKind::Data, offset: 8, stored_len: 100, raw_len: 60 } }
    }

    /// The cache is always the union of the segments it holds: removing a segment takes
    /// exactly what it contributed; a location another segment also holds stays; a
    /// reopened database keeps all of it.
    #[test]
    fn removing_a_segment_takes_exactly_its_contribution() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, s2, s3) = (IndexId([1; 32]), IndexId([2; 32]), IndexId([3; 32]));
        {
            let idx = RocksIndex::open(dir.path()).unwrap();
            idx.ingest(Some(&s1), &[entry(1, 10), entry(2, 10), entry(2, 10)]).unwrap();
            idx.ingest(Some(&s2), &[entry(2, 10), entry(3, 20)]).unwrap();
            idx.ingest(Some(&s2), &[entry(9, 99)]).unwrap(); // already ingested: nothing
            idx.ingest(None, &[entry(4, 30)]).unwrap();
            assert_eq!(idx.entry_count().unwrap(), 4);
            assert_eq!(idx.lookup(&ChunkId([9; 32])).unwrap(), None);
            assert_eq!(idx.remove_segment(&s1).unwrap(), 2);
            assert_eq!(idx.lookup(&ChunkId([1; 32])).unwrap(), None, "only s1 had chunk 1");
            assert_eq!(idx.lookup(&ChunkId([2; 32])).unwrap(), Some(entry(2, 10).loc), "s2 has chunk 2 too");
            idx.ingest(Some(&s3), &[entry(3, 21)]).unwrap();
        }
        let idx = RocksIndex::open(dir.path()).unwrap();
        assert_eq!(idx.ingested_segments().unwrap(), [s2, s3].into_iter().collect());
        assert_eq!(idx.remove_segment(&s2).unwrap(), 2);
        assert_eq!(idx.lookup(&ChunkId([2; 32])).unwrap(), None);
        assert_eq!(idx.lookup(&ChunkId([3; 32])).unwrap(), Some(entry(3, 21).loc), "the location s3 gave");
        assert_eq!(idx.lookup(&ChunkId([4; 32])).unwrap(), Some(entry(4, 30).loc), "ingested without a segment: stays");
        assert_eq!(idx.remove_segment(&s2).unwrap(), 0, "removing twice changes nothing");
        assert_eq!(idx.entry_count().unwrap(), 2);
    }
}
