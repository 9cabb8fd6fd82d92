//! The RocksDB implementation of the local index ([`ChunkIndex`]): one database per
//! repository id under the cache directory. Column family `chunks`: chunk id → location
//! (45 bytes); `segments`: ingested index segment ids. It is a cache: delete the directory
//! and the next `sync` rebuilds it.

use mover_format::index::{BlobLocation, IndexEntry};
use mover_format::local_index::ChunkIndex;
use mover_format::{ChunkId, IndexId, RepoError, RepoId};
use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Options, WriteBatch, DB};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const CF_CHUNKS: &str = "chunks";
const CF_SEGMENTS: &str = "segments";

pub struct RocksIndex {
    db: DB,
    path: PathBuf,
}

impl RocksIndex {
    /// The database directory of a repository under `cache_root`.
    pub fn path_for(cache_root: &Path, repo: &RepoId) -> PathBuf {
        cache_root.join(repo.to_hex()).join("index")
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
        let cfs = vec![ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts), ColumnFamilyDescriptor::new(CF_SEGMENTS, Options::default())];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| err(path, e.to_string()))?;
        Ok(Self { db, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, RepoError> {
        self.db.cf_handle(name).ok_or_else(|| err(&self.path, format!("column family {name} missing")))
    }
}

fn err(path: &Path, message: String) -> RepoError {
    RepoError::Index { path: path.display().to_string(), message }
}

impl ChunkIndex for RocksIndex {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError> {
        match self.db.get_pinned_cf(self.cf(CF_CHUNKS)?, id.as_bytes()).map_err(|e| err(&self.path, e.to_string()))? {
            Some(v) => BlobLocation::from_bytes(&v).map(Some).map_err(|e| err(&self.path, format!("entry for chunk {id}: {e}"))),
            None => Ok(None),
        }
    }

    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError> {
        let mut b = WriteBatch::default();
        let chunks = self.cf(CF_CHUNKS)?;
        for e in entries {
            b.put_cf(chunks, e.id.as_bytes(), e.loc.to_bytes());
        }
        if let Some(s) = segment {
            b.put_cf(self.cf(CF_SEGMENTS)?, s.as_bytes(), []);
        }
        self.db.write(b).map_err(|e| err(&self.path, e.to_string()))
    }

    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError> {
        let mut out = HashSet::new();
        for item in self.db.iterator_cf(self.cf(CF_SEGMENTS)?, rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(|e| err(&self.path, e.to_string()))?;
            if let Some(id) = IndexId::from_slice(&k) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    fn entry_count(&self) -> Result<u64, RepoError> {
        let mut n = 0;
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS)?, rocksdb::IteratorMode::Start) {
            item.map_err(|e| err(&self.path, e.to_string()))?;
            n += 1;
        }
        Ok(n)
    }
}
