//! `stats`: sizes, dedup and compression ratios, and each snapshot's unique bytes (chunks no
//! other snapshot references). Reads the store itself, like `check`.

use super::check::{load_view, CheckReport, ViewTrees};
use crate::error::{Error, Result};
use crate::walk::{self, Trees, Visitor};
use mover_format::tree::MapEntry;
use mover_format::{ChunkId, Repository, SnapshotId};
use std::collections::HashMap;
use tokio_util::sync::CancellationToken;

#[derive(Debug, serde::Serialize)]
pub struct SnapshotStats {
    pub id: SnapshotId,
    pub logical_bytes: u64,
    /// Raw bytes of chunks no other snapshot references.
    pub unique_bytes: u64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    pub snapshots: usize,
    /// Sum of volume sizes over all snapshots.
    pub logical_bytes: u64,
    /// Bytes of data in chunks (holes excluded), over all snapshots.
    pub referenced_bytes: u64,
    /// Raw bytes of distinct chunks.
    pub unique_bytes: u64,
    /// Bytes of all packs in the store.
    pub stored_bytes: u64,
    pub packs: usize,
    pub chunks: usize,
    /// referenced / unique
    pub dedup_ratio: f64,
    /// unique / stored
    pub compression_ratio: f64,
    pub per_snapshot: Vec<SnapshotStats>,
}

/// Tree blobs read once each (a segment map shared by many snapshots is fetched once).
struct Cached<'a> {
    inner: ViewTrees<'a>,
    cache: HashMap<ChunkId, Vec<u8>>,
}

#[async_trait::async_trait]
impl Trees for Cached<'_> {
    async fn blob(&mut self, id: &ChunkId, what: &str) -> Result<Option<Vec<u8>>> {
        if let Some(b) = self.cache.get(id) {
            return Ok(Some(b.clone()));
        }
        let b = self.inner.blob(id, what).await?;
        if let Some(b) = &b {
            self.cache.insert(*id, b.clone());
        }
        Ok(b)
    }
}

/// Counts every chunk reference of one snapshot.
struct Count<'a> {
    view: &'a super::check::StoreView,
    /// chunk → (raw length, snapshots referencing it, index of the last one)
    refs: &'a mut HashMap<ChunkId, (u32, u32, usize)>,
    index: usize,
    referenced: u64,
}

impl Visitor for Count<'_> {
    fn chunk(&mut self, e: &MapEntry, _offset: u64, _segment: u64) {
        let Some(id) = e.chunk() else { return };
        self.referenced += e.len() as u64;
        // A slice still keeps its whole chunk stored.
        let raw = self.view.locate(&id).map(|l| l.raw_len).unwrap_or(e.len());
        let ent = self.refs.entry(id).or_insert((raw, 0, usize::MAX));
        if ent.2 != self.index {
            ent.1 += 1;
            ent.2 = self.index;
        }
    }
}

pub async fn stats(repo: &Repository, cancel: &CancellationToken) -> Result<Stats> {
    let mut rep = CheckReport::default();
    let v = load_view(repo, &mut rep, cancel).await?;
    if let Some(p) = rep.problems.first() {
        return Err(Error::corrupt(format!("repository {} has problems (run `mover check`): {p}", repo.location())));
    }
    let mut st = Stats { snapshots: v.snapshots.len(), packs: v.packs.len(), stored_bytes: v.packs.values().sum(), ..Default::default() };
    let mut refs: HashMap<ChunkId, (u32, u32, usize)> = HashMap::new();
    let mut trees = Cached { inner: ViewTrees { repo, view: &v, cancel, problems: None, failed: None }, cache: HashMap::new() };
    for (si, (sid, m)) in v.snapshots.iter().enumerate() {
        let mut c = Count { view: &v, refs: &mut refs, index: si, referenced: 0 };
        walk::snapshot(&mut trees, &mut c, sid, m).await?;
        st.referenced_bytes += c.referenced;
        let logical: u64 = m.volumes.iter().map(|v| v.size).sum();
        st.logical_bytes += logical;
        st.per_snapshot.push(SnapshotStats { id: *sid, logical_bytes: logical, unique_bytes: 0 });
    }
    st.chunks = refs.len();
    st.unique_bytes = refs.values().map(|r| r.0 as u64).sum();
    for (len, count, last) in refs.values() {
        if *count == 1 {
            st.per_snapshot[*last].unique_bytes += *len as u64;
        }
    }
    st.dedup_ratio = if st.unique_bytes > 0 { st.referenced_bytes as f64 / st.unique_bytes as f64 } else { 0.0 };
    st.compression_ratio = if st.stored_bytes > 0 { st.unique_bytes as f64 / st.stored_bytes as f64 } else { 0.0 };
    Ok(st)
}
