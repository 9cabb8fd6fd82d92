//! gc's working set on disk: every index entry with the segment it is in, and the set of
//! reachable blobs, in a scratch RocksDB that is deleted when gc ends. Memory stays bounded
//! whatever the repository's size (RocksDB's buffers, plus per-pack and per-segment
//! figures); what grows with the repository is disk, about 120 bytes per chunk.
//!
//! `entries`: chunk id ‖ pack id ‖ segment ordinal (u32 BE) → kind, offset, stored and raw
//! length (13 bytes), so one chunk's locations are adjacent and a full scan visits entries
//! chunk by chunk. `reach`: chunk id → (empty).

use crate::error::{Error, Result, ResultExt};
use mover_format::blob::BlobKind;
use mover_format::index::{BlobLocation, IndexEntry};
use mover_format::{ChunkId, IndexId, PackId, Repository};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Objects gc reads at once (index segments, manifests, tree blobs): a round trip each on
/// an object store; a backup-sized segment or a tree blob is small.
pub(super) const READS_IN_FLIGHT: usize = 16;
const CF_ENTRIES: &str = "entries";
const CF_REACH: &str = "reach";
/// Reachable ids buffered before they are written.
const REACH_BATCH: usize = 65_536;

fn entry_key(e: &IndexEntry, ord: u32) -> [u8; 68] {
    let mut k = [0u8; 68];
    k[..32].copy_from_slice(e.id.as_bytes());
    k[32..64].copy_from_slice(e.loc.pack.as_bytes());
    k[64..].copy_from_slice(&ord.to_be_bytes());
    k
}

fn entry_value(l: &BlobLocation) -> [u8; 13] {
    let mut v = [0u8; 13];
    v[0] = l.kind.as_u8();
    v[1..5].copy_from_slice(&l.offset.to_le_bytes());
    v[5..9].copy_from_slice(&l.stored_len.to_le_bytes());
    v[9..13].copy_from_slice(&l.raw_len.to_le_bytes());
    v
}

/// One stored entry and the ordinal of its segment.
fn decode(k: &[u8], v: &[u8]) -> Option<(IndexEntry, u32)> {
    if k.len() != 68 || v.len() != 13 {
        return None;
    }
    let u = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let loc = BlobLocation {
        pack: PackId::from_slice(&k[32..64])?,
        kind: BlobKind::from_u8(v[0]).ok()?,
        offset: u(&v[1..5]),
        stored_len: u(&v[5..9]),
        raw_len: u(&v[9..13]),
    };
    Some((IndexEntry { id: ChunkId::from_slice(&k[..32])?, loc }, u32::from_be_bytes([k[64], k[65], k[66], k[67]])))
}

/// The scratch database; its directory goes when the last handle does.
struct Scratch {
    db: Option<DB>,
    dir: PathBuf,
    wo: rocksdb::WriteOptions,
}

impl Scratch {
    fn db(&self) -> &DB {
        self.db.as_ref().expect("open until dropped")
    }
    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db().cf_handle(name).expect("created with the database")
    }
    fn e(&self, e: rocksdb::Error) -> Error {
        Error::permanent(format!("gc's working set in {}: {e}", self.dir.display()))
    }
    fn write(&self, b: WriteBatch) -> Result<()> {
        self.db().write_opt(b, &self.wo).map_err(|e| self.e(e))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        drop(self.db.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The index entries gc read, each with its segment.
pub(super) struct Entries {
    s: Arc<Scratch>,
    /// Segment ordinal → id (ordinals index this vector).
    seg_ids: Vec<IndexId>,
    pub segments: BTreeSet<IndexId>,
}

/// The blobs found reachable.
pub(super) struct Reach {
    s: Arc<Scratch>,
    /// Ids not yet written.
    pending: HashSet<ChunkId>,
    failed: Option<Error>,
}

/// A new working set in a new directory under `parent`.
pub(super) fn create(parent: &Path) -> Result<(Entries, Reach)> {
    let dir = parent.join(format!("gc-work-{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 4]>())));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating gc's working directory {}", dir.display()))?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let mut cf = Options::default();
    cf.set_write_buffer_size(32 << 20);
    cf.set_max_write_buffer_number(2);
    // Most lookups miss (a chunk seen for the first time): a bloom filter on the memtable
    // answers them without walking it.
    cf.set_memtable_whole_key_filtering(true);
    cf.set_memtable_prefix_bloom_ratio(0.1);
    let mut bb = rocksdb::BlockBasedOptions::default();
    bb.set_bloom_filter(10.0, false);
    bb.set_block_cache(&rocksdb::Cache::new_lru_cache(32 << 20));
    cf.set_block_based_table_factory(&bb);
    let cfs = vec![ColumnFamilyDescriptor::new(CF_ENTRIES, cf.clone()), ColumnFamilyDescriptor::new(CF_REACH, cf)];
    let db = DB::open_cf_descriptors(&opts, &dir, cfs).map_err(|e| Error::permanent(format!("gc's working set in {}: {e}", dir.display())))?;
    let mut wo = rocksdb::WriteOptions::default();
    wo.disable_wal(true);
    let s = Arc::new(Scratch { db: Some(db), dir, wo });
    Ok((Entries { s: s.clone(), seg_ids: Vec::new(), segments: BTreeSet::new() }, Reach { s, pending: HashSet::new(), failed: None }))
}

impl Entries {
    /// Records a segment's entries.
    pub fn add(&mut self, segment: IndexId, es: &[IndexEntry]) -> Result<()> {
        let ord = self.seg_ids.len() as u32;
        self.seg_ids.push(segment);
        self.segments.insert(segment);
        let mut b = WriteBatch::default();
        let cf = self.s.cf(CF_ENTRIES);
        for e in es {
            b.put_cf(cf, entry_key(e, ord), entry_value(&e.loc));
        }
        self.s.write(b)
    }

    /// Reads index segments not seen yet. An unreadable segment stops gc: its packs would
    /// look unindexed.
    pub async fn refresh(&mut self, repo: &Repository, cancel: &CancellationToken) -> Result<()> {
        use futures::StreamExt;
        // Several read at once (a round trip each on an object store); recorded in arrival
        // order (the entries do not depend on it).
        let todo: Vec<IndexId> = repo.list_index(cancel).await?.into_iter().filter(|id| !self.segments.contains(id)).collect();
        let mut reads = futures::stream::iter(todo)
            .map(|id| async move {
                let es = repo
                    .read_index(&id, cancel)
                    .await
                    .context("gc deletes nothing while an index segment is unreadable (run `mover check`, then `mover index rebuild`)")?;
                Ok::<_, Error>((id, es))
            })
            .buffer_unordered(READS_IN_FLIGHT);
        while let Some(r) = reads.next().await {
            let (id, es) = r?;
            self.add(id, &es)?;
        }
        Ok(())
    }

    /// A location of `id` that `usable` accepts (a healthy one), if the index has one.
    pub fn first(&self, id: &ChunkId, usable: impl Fn(&BlobLocation) -> bool) -> Result<Option<BlobLocation>> {
        let mut it = self.s.db().raw_iterator_cf(self.s.cf(CF_ENTRIES));
        it.seek(id.as_bytes());
        let mut any = None;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() != 68 || &k[..32] != id.as_bytes() {
                break;
            }
            if let Some((e, _)) = decode(k, v) {
                if usable(&e.loc) {
                    return Ok(Some(e.loc));
                }
                any.get_or_insert(e.loc);
            }
            it.next();
        }
        it.status().map_err(|e| self.s.e(e))?;
        Ok(any)
    }

    /// Every entry from `from` (a key) on, in chunk id order, with its segment's id, until
    /// `f` says stop; returns the key to resume at.
    pub fn scan(&self, from: Option<&[u8]>, mut f: impl FnMut(&IndexEntry, IndexId) -> Result<bool>) -> Result<Option<Vec<u8>>> {
        let mode = match from {
            Some(k) => IteratorMode::From(k, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        for item in self.s.db().iterator_cf(self.s.cf(CF_ENTRIES), mode) {
            let (k, v) = item.map_err(|e| self.s.e(e))?;
            let (e, ord) = decode(&k, &v).ok_or_else(|| Error::permanent("gc's working set holds a malformed entry"))?;
            if !f(&e, self.seg_ids[ord as usize])? {
                return Ok(Some(k.to_vec()));
            }
        }
        Ok(None)
    }

    /// Every entry, in chunk id order, with its segment's id.
    pub fn for_each(&self, mut f: impl FnMut(&IndexEntry, IndexId) -> Result<()>) -> Result<()> {
        self.scan(None, |e, s| f(e, s).map(|()| true)).map(|_| ())
    }

    /// Every chunk's entries together, in chunk id order.
    pub fn for_each_chunk(&self, mut f: impl FnMut(&[IndexEntry]) -> Result<()>) -> Result<()> {
        let mut group: Vec<IndexEntry> = Vec::new();
        self.for_each(|e, _| {
            if group.first().is_some_and(|g| g.id != e.id) {
                f(&group)?;
                group.clear();
            }
            group.push(*e);
            Ok(())
        })?;
        if !group.is_empty() {
            f(&group)?;
        }
        Ok(())
    }

    /// Packs the index names.
    pub fn packs(&self) -> Result<HashSet<PackId>> {
        let mut out = HashSet::new();
        self.for_each(|e, _| {
            out.insert(e.loc.pack);
            Ok(())
        })?;
        Ok(out)
    }

    /// Drops the segments in `gone` and what they held.
    pub fn remove(&mut self, gone: &HashSet<IndexId>) -> Result<()> {
        let cf = self.s.cf(CF_ENTRIES);
        let mut b = WriteBatch::default();
        for item in self.s.db().iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.s.e(e))?;
            let ord = u32::from_be_bytes([k[64], k[65], k[66], k[67]]);
            if gone.contains(&self.seg_ids[ord as usize]) {
                b.delete_cf(cf, &k);
            }
            if b.len() >= 100_000 {
                self.s.write(std::mem::take(&mut b))?;
            }
        }
        self.s.write(b)?;
        self.segments.retain(|s| !gone.contains(s));
        Ok(())
    }
}

impl Reach {
    /// Marks `id` reachable; `true` when it was not yet. A failure to record is kept and
    /// reported by [`Reach::settle`].
    pub fn insert(&mut self, id: &ChunkId) -> bool {
        if self.pending.contains(id) {
            return false;
        }
        match self.s.db().get_pinned_cf(self.s.cf(CF_REACH), id.as_bytes()) {
            Ok(Some(_)) => return false,
            Ok(None) => {}
            Err(e) => {
                self.failed.get_or_insert(self.s.e(e));
            }
        }
        self.pending.insert(*id);
        if self.pending.len() >= REACH_BATCH {
            if let Err(e) = self.flush() {
                self.failed.get_or_insert(e);
            }
        }
        true
    }

    fn flush(&mut self) -> Result<()> {
        let mut b = WriteBatch::default();
        let cf = self.s.cf(CF_REACH);
        for id in self.pending.drain() {
            b.put_cf(cf, id.as_bytes(), []);
        }
        self.s.write(b)
    }

    /// Writes what is buffered; fails if anything could not be recorded.
    pub fn settle(&mut self) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e.context("gc deletes nothing when it cannot record what is reachable"));
        }
        if !self.pending.is_empty() {
            self.flush()?;
        }
        Ok(())
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        if self.pending.contains(id) {
            return Ok(true);
        }
        Ok(self.s.db().get_pinned_cf(self.s.cf(CF_REACH), id.as_bytes()).map_err(|e| self.s.e(e))?.is_some())
    }
}

/// Per pack: the stored bytes of its reachable entries (a chunk stored twice in one pack
/// counts once) — the first step of choosing one home per chunk.
pub(super) fn reachable_bytes_per_pack(idx: &Entries, reach: &Reach) -> Result<HashMap<PackId, u64>> {
    let mut out: HashMap<PackId, u64> = HashMap::new();
    idx.for_each_chunk(|es| {
        if reach.contains(&es[0].id)? {
            let mut seen: Vec<PackId> = Vec::new();
            for e in es {
                if !seen.contains(&e.loc.pack) {
                    seen.push(e.loc.pack);
                    *out.entry(e.loc.pack).or_default() += e.loc.stored_len as u64;
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}
