//! Entries gc has taken out of the index but not swept yet (`gc/<record>.entries`), and the
//! read view that still finds them. A snapshot whose backup deduplicated against an entry
//! gc had just taken out restores at once through this view, not only after the next sweep
//! puts the entry back (`docs/gc.md`).

use super::quarantine::{screen, Quarantined, Screen};
use crate::error::{Error, Result};
use mover_format::index::{BlobLocation, IndexEntry};
use mover_format::local_index::{ChunkIndex, MemIndex};
use mover_format::pending::{PendingDeletion, Ready};
use mover_format::{ChunkId, IndexId, RepoError, Repository};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A gc record as loaded: its entries and, once complete, its `.ready` marker.
pub struct Record {
    pub id: String,
    pub p: PendingDeletion,
    pub ready: Option<Ready>,
}

/// The first location of every entry in `records`.
pub fn locations(records: &[Record]) -> HashMap<ChunkId, BlobLocation> {
    let mut m = HashMap::new();
    for r in records {
        for e in &r.p.entries {
            m.entry(e.id).or_insert(e.loc);
        }
    }
    m
}

/// Who reads the records: gc and forget hold the exclusive `gc` lock, so nothing removes a
/// record while they read; readers may see one swept between listing and reading, and
/// skip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Gc,
    Shared,
}

/// The records in the store, oldest first.
pub async fn load(repo: &Repository, who: Reader, cancel: &CancellationToken) -> Result<Vec<Record>> {
    Ok(load_listed(repo, who, cancel).await?.0)
}

/// [`load`], and the gc generation the same listing saw
/// ([`mover_format::repo::GcListing::generation`]).
pub async fn load_listed(repo: &Repository, who: Reader, cancel: &CancellationToken) -> Result<(Vec<Record>, String)> {
    let shared = who == Reader::Shared;
    let mut out = Vec::new();
    let listing = repo.list_gc(cancel).await?;
    let generation = listing.generation();
    for (id, has_entries, has_ready) in listing.records {
        if !has_entries {
            continue; // a sweep was killed between deleting `.entries` and `.ready`
        }
        let p = match repo.read_pending(&id, cancel).await {
            Ok(p) => p,
            Err(RepoError::Storage(e)) if shared && e.is_not_found() => continue,
            Err(e) => return Err(Error::from(e).context("gc deletes nothing while a gc record is unreadable")),
        };
        let ready = if !has_ready {
            None
        } else {
            match repo.read_ready(&id, cancel).await {
                Ok(r) => Some(r),
                Err(RepoError::Storage(e)) if shared && e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            }
        };
        out.push(Record { id, p, ready });
    }
    Ok((out, generation))
}

/// Syncs `index` and returns it plus the entries of unswept gc records, seen through the
/// quarantine ([`Screen::Read`]: a healed copy before a damaged one), for reading
/// snapshots (restore, export, a backup's parent tree).
pub(crate) async fn with_pending(repo: &Repository, index: Arc<dyn ChunkIndex>, cancel: &CancellationToken) -> Result<Arc<dyn ChunkIndex>> {
    Ok(reading(repo, index, None, cancel).await?.0)
}

/// [`with_pending`], and the quarantine it was screened with. `reuse_listed_after_ms`:
/// see [`super::sync`] (a backup's, [`super::reuse_for_backup`]).
pub(crate) async fn reading(
    repo: &Repository,
    index: Arc<dyn ChunkIndex>,
    reuse_listed_after_ms: Option<u64>,
    cancel: &CancellationToken,
) -> Result<(Arc<dyn ChunkIndex>, Arc<Quarantined>)> {
    // Records first, then the index: a record swept in between has put its live entries
    // back into an index segment before it was deleted, and the sync sees that segment.
    // The records' listing also tells whether a gc deleted index segments since this
    // cache's last full listing (its generation marker): if not, only what was added since
    // is listed (docs/gc.md).
    let ((records, generation), q) = tokio::try_join!(load_listed(repo, Reader::Shared, cancel), Quarantined::load(repo, cancel))?;
    let q = Arc::new(q);
    super::sync(repo, &*index, &generation, reuse_listed_after_ms, cancel).await?;
    if records.iter().all(|r| r.p.entries.is_empty()) {
        return Ok((screen(index, &q, Screen::Read), q));
    }
    let extra = MemIndex::default();
    for r in &records {
        extra.ingest(None, &r.p.entries)?;
    }
    Ok((screen(Arc::new(Fallback { primary: index, extra }), &q, Screen::Read), q))
}

/// Entry locations of unswept records, for `check`.
pub async fn entries(repo: &Repository, cancel: &CancellationToken) -> Result<HashMap<ChunkId, BlobLocation>> {
    Ok(locations(&load(repo, Reader::Shared, cancel).await?))
}

/// The local index, then the records' entries.
struct Fallback {
    primary: Arc<dyn ChunkIndex>,
    extra: MemIndex,
}

impl ChunkIndex for Fallback {
    fn lookup(&self, id: &ChunkId) -> Result<Option<BlobLocation>, RepoError> {
        match self.primary.lookup(id)? {
            Some(l) => Ok(Some(l)),
            None => self.extra.lookup(id),
        }
    }
    fn locations(&self, id: &ChunkId) -> Result<Vec<BlobLocation>, RepoError> {
        let mut out = self.primary.locations(id)?;
        for l in self.extra.locations(id)? {
            if !out.contains(&l) {
                out.push(l);
            }
        }
        Ok(out)
    }
    fn ingested_segments(&self) -> Result<HashSet<IndexId>, RepoError> {
        self.primary.ingested_segments()
    }
    fn entry_count(&self) -> Result<u64, RepoError> {
        self.primary.entry_count()
    }
    fn has_segment(&self, segment: &IndexId) -> Result<bool, RepoError> {
        self.primary.has_segment(segment)
    }
    fn sync_mark(&self) -> Result<Option<mover_format::local_index::SyncMark>, RepoError> {
        self.primary.sync_mark()
    }
    fn set_sync_mark(&self, mark: &mover_format::local_index::SyncMark) -> Result<(), RepoError> {
        self.primary.set_sync_mark(mark)
    }
    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> Result<(), RepoError> {
        self.primary.ingest(segment, entries)
    }
    fn remove_segment(&self, segment: &IndexId) -> Result<usize, RepoError> {
        self.primary.remove_segment(segment)
    }
}
