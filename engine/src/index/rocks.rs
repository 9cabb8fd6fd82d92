//! The RocksDB implementation of the local index ([`ChunkIndex`]): one database per
//! repository id under the cache directory. Keys carry the generation (8 bytes, big
//! endian) before the id. Column family `chunks`: generation ‖ chunk id → location
//! (45 bytes); `segments`: generation ‖ ingested index segment id; `meta`: `active` → the
//! active generation. It is a cache: delete the directory and the next `sync` rebuilds it.

use mover_format::index::{BlobLocation, IndexEntry};
use mover_format::local_index::ChunkIndex;
use mover_format::{ChunkId, IndexId, RepoError, RepoId};
use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Options, WriteBatch, DB};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const CF_CHUNKS: &str = "chunks";
const CF_SEGMENTS: &str = "segments";
const CF_META: &str = "meta";
const ACTIVE: &[u8] = b"active";

pub struct RocksIndex {
    db: DB,
    path: PathBuf,
    active: AtomicU64,
    next: AtomicU64,
}

fn key(generation: u64, id: &[u8; 32]) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&generation.to_be_bytes());
    k[8..].copy_from_slice(id);
    k
}

impl RocksIndex {
    /// The database directory of a repository under `cache_root` (`index-v2`: keys with
    /// generations; an older `index` directory is ignored).
    pub fn path_for(cache_root: &Path, repo: &RepoId) -> PathBuf {
        cache_root.join(repo.to_hex()).join("index-v2")
    }

    pub fn open(path: &Path) -> Result<Self, RepoError> {
        std::fs::create_dir_all(path).map_err(|e| err(path, format!("creating directory: {e}")))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let mut chunk_opts = Options::default();
        let mut bb = BlockBasedOptions::default();
        bb.set_bloom_filter(10.0, false);
        chunk_opts.set_block_based_table_factory(&bb);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts),
            ColumnFamilyDescriptor::new(CF_SEGMENTS, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| err(path, e.to_string()))?;
        let mut me = Self { db, path: path.to_path_buf(), active: AtomicU64::new(0), next: AtomicU64::new(1) };
        let active = match me.db.get_cf(me.cf(CF_META)?, ACTIVE).map_err(|e| err(path, e.to_string()))? {
            Some(v) if v.len() == 8 => u64::from_le_bytes(v[..8].try_into().unwrap_or_default()),
            _ => 0,
        };
        me.active = AtomicU64::new(active);
        me.next = AtomicU64::new(active + 1);
        // A generation left half-built by a killed process is dropped.
        me.drop_except(active)?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, RepoError> {
        self.db.cf_handle(name).ok_or_else(|| err(&self.path, format!("column family {name} missing")))
    }

    fn drop_except(&self, keep: u64) -> Result<(), RepoError> {
        let mut b = WriteBatch::default();
        for cf in [CF_CHUNKS, CF_SEGMENTS] {
            let cf = self.cf(cf)?;
            b.delete_range_cf(cf, 0u64.to_be_bytes().to_vec(), keep.to_be_bytes().to_vec());
            if keep < u64::MAX {
                b.delete_range_cf(cf, (keep + 1).to_be_bytes().to_vec(), vec![0xffu8; 41]);
            }
        }
        self.db.write(b).map_err(|e| err(&self.path, e.to_string()))
    }
}

fn err(path: &Path, message: String) -> RepoError {
    RepoError::Index { path: path.display().to_string(), message }
}

impl ChunkIndex for RocksIndex {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError> {
        let k = key(self.active.load(Ordering::Acquire), id.as_bytes());
        match self.db.get_pinned_cf(self.cf(CF_CHUNKS)?, k).map_err(|e| err(&self.path, e.to_string()))? {
            Some(v) => BlobLocation::from_bytes(&v).map(Some).map_err(|e| err(&self.path, format!("entry for chunk {id}: {e}"))),
            None => Ok(None),
        }
    }

    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError> {
        let g = self.active.load(Ordering::Acquire).to_be_bytes();
        let mut out = HashSet::new();
        for item in self.db.prefix_iterator_cf(self.cf(CF_SEGMENTS)?, g) {
            let (k, _) = item.map_err(|e| err(&self.path, e.to_string()))?;
            if k[..8] != g {
                break;
            }
            if let Some(id) = IndexId::from_slice(&k[8..]) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    fn entry_count(&self) -> Result<u64, RepoError> {
        let g = self.active.load(Ordering::Acquire).to_be_bytes();
        let mut n = 0;
        for item in self.db.prefix_iterator_cf(self.cf(CF_CHUNKS)?, g) {
            let (k, _) = item.map_err(|e| err(&self.path, e.to_string()))?;
            if k[..8] != g {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn active_generation(&self) -> Result<u64, RepoError> {
        Ok(self.active.load(Ordering::Acquire))
    }

    fn begin_generation(&self) -> Result<u64, RepoError> {
        Ok(self.next.fetch_add(1, Ordering::AcqRel).max(self.active.load(Ordering::Acquire) + 1))
    }

    fn ingest_into(&self, generation: u64, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError> {
        let mut b = WriteBatch::default();
        let chunks = self.cf(CF_CHUNKS)?;
        for e in entries {
            b.put_cf(chunks, key(generation, e.id.as_bytes()), e.loc.to_bytes());
        }
        if let Some(s) = segment {
            b.put_cf(self.cf(CF_SEGMENTS)?, key(generation, s.as_bytes()), []);
        }
        self.db.write(b).map_err(|e| err(&self.path, e.to_string()))
    }

    fn activate(&self, generation: u64) -> Result<(), RepoError> {
        let prev = self.active.fetch_max(generation, Ordering::AcqRel);
        let active = prev.max(generation);
        self.db.put_cf(self.cf(CF_META)?, ACTIVE, active.to_le_bytes()).map_err(|e| err(&self.path, e.to_string()))?;
        // Older generations go; a newer one still being built by another sync stays.
        let mut b = WriteBatch::default();
        for cf in [CF_CHUNKS, CF_SEGMENTS] {
            b.delete_range_cf(self.cf(cf)?, 0u64.to_be_bytes(), active.to_be_bytes());
        }
        self.db.write(b).map_err(|e| err(&self.path, e.to_string()))
    }
}
