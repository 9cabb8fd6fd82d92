//! Damaged blob locations (`quarantine/` records, `docs/repair.md`) and the index views that
//! honour them. A backup's dedup view ([`Screen::Dedup`]) never answers with a quarantined
//! location, so the next backup that produces the content stores it anew; a reader's view
//! ([`Screen::Read`]) answers with another location of the chunk when there is one — the
//! healed copy, which content addressing makes every older snapshot's too — and with the
//! damaged one only when nothing else exists (the read then fails naming the damage).

use crate::error::{Error, Result};
use mover_format::index::{BlobLocation, IndexEntry};
use mover_format::local_index::ChunkIndex;
use mover_format::quarantine::{Damaged, Quarantine, MAX_ENTRIES};
use mover_format::{ChunkId, IndexId, PackId, RepoError, Repository};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The quarantined locations of a repository, as read from its records.
#[derive(Debug, Default, Clone)]
pub struct Quarantined {
    bad: HashMap<(ChunkId, PackId), String>,
    /// The records read, oldest first, with the packs each names.
    pub records: Vec<(String, HashSet<PackId>)>,
}

impl Quarantined {
    /// Reads every quarantine record of `repo`. A record that cannot be read is skipped
    /// with a warning (it may have been removed by gc between listing and reading).
    pub async fn load(repo: &Repository, cancel: &CancellationToken) -> Result<Self> {
        let mut q = Self::default();
        for name in repo.list_quarantine(cancel).await? {
            match repo.read_quarantine(&name, cancel).await {
                Ok(r) => {
                    let packs = r.entries.iter().map(|d| d.pack).collect();
                    for d in r.entries {
                        q.bad.entry((d.chunk, d.pack)).or_insert(d.problem);
                    }
                    q.records.push((name, packs));
                }
                Err(RepoError::Storage(e)) if e.is_not_found() => {}
                Err(e) if e.is_cancelled() => return Err(e.into()),
                Err(e) => tracing::warn!("skipping quarantine record: {e:#}"),
            }
        }
        Ok(q)
    }

    pub fn is_empty(&self) -> bool {
        self.bad.is_empty()
    }

    pub fn len(&self) -> usize {
        self.bad.len()
    }

    pub fn is_bad(&self, id: &ChunkId, pack: &PackId) -> bool {
        self.bad.contains_key(&(*id, *pack))
    }

    /// Why a location is quarantined.
    pub fn problem(&self, id: &ChunkId, pack: &PackId) -> Option<&str> {
        self.bad.get(&(*id, *pack)).map(String::as_str)
    }

    /// Every quarantined location.
    pub fn iter(&self) -> impl Iterator<Item = (&ChunkId, &PackId, &str)> {
        self.bad.iter().map(|((c, p), w)| (c, p, w.as_str()))
    }

    /// The first of `locs` that is not quarantined.
    pub fn healthy(&self, id: &ChunkId, locs: &[BlobLocation]) -> Option<BlobLocation> {
        locs.iter().find(|l| !self.is_bad(id, &l.pack)).copied()
    }

    /// Chunks of which every location in `index` is quarantined: what no read can return
    /// until a backup or `mover repair` stores the content anew.
    pub fn unhealed(&self, index: &dyn ChunkIndex) -> Result<HashSet<ChunkId>> {
        let mut out = HashSet::new();
        for (id, _) in self.bad.keys() {
            if self.healthy(id, &index.locations(id)?).is_none() {
                out.insert(*id);
            }
        }
        Ok(out)
    }
}

/// Writes a quarantine record of the `found` locations not quarantined yet (in `known`,
/// when given); returns the record's name, `None` when there was nothing new.
pub async fn record(repo: &Repository, found_by: &str, found: Vec<Damaged>, known: Option<&Quarantined>, cancel: &CancellationToken) -> Result<Option<String>> {
    let mut seen = HashSet::new();
    let entries: Vec<Damaged> =
        found.into_iter().filter(|d| known.is_none_or(|q| !q.is_bad(&d.chunk, &d.pack)) && seen.insert((d.chunk, d.pack))).take(MAX_ENTRIES).collect();
    if entries.is_empty() {
        return Ok(None);
    }
    let n = entries.len();
    let q = Quarantine { time_unix_ms: mover_format::now_unix_ms(), hostname: mover_format::hostname(), found_by: found_by.to_string(), entries };
    let name =
        repo.write_quarantine(&q, cancel).await.map_err(|e| Error::from(e).context(format!("quarantining {n} damaged blob(s) in {}", repo.location())))?;
    // Info, not a warning: the operation that found the damage reports it as its error.
    tracing::info!(record = %name, "{found_by} found {n} damaged blob(s) in {}: quarantined (never deduplicated against again; `mover repair` heals)", repo.location());
    Ok(Some(name))
}

/// Quarantines what `repo` found damaged since the last call (blobs that failed to
/// decode, packs that are missing). Never fails the caller: the operation's own error is
/// what matters; a record that cannot be written is logged and found again by `check`.
pub async fn note_seen(repo: &Repository, found_by: &str) {
    let found = repo.take_damage_seen();
    if found.is_empty() {
        return;
    }
    // Its own token: the operation that found the damage may be the one being cancelled.
    let cancel = CancellationToken::new();
    let known = Quarantined::load(repo, &cancel).await.ok();
    let write = record(repo, found_by, found, known.as_ref(), &cancel);
    match tokio::time::timeout(std::time::Duration::from_secs(60), write).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("{e:#}"),
        Err(_) => tracing::warn!("quarantining damaged blobs in {}: no answer in 60 s; `mover check --read-data` finds them again", repo.location()),
    }
}

/// How a [`Screened`] index treats quarantined locations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// For deduplication: a quarantined location does not exist.
    Dedup,
    /// For reading: another location first; a quarantined one only when nothing else
    /// exists (reading it then fails, naming the damage).
    Read,
}

/// `inner` seen through the quarantine (itself when nothing is quarantined).
pub fn screen(inner: Arc<dyn ChunkIndex>, q: &Arc<Quarantined>, how: Screen) -> Arc<dyn ChunkIndex> {
    if q.is_empty() {
        return inner;
    }
    Arc::new(Screened { inner, q: q.clone(), how })
}

struct Screened {
    inner: Arc<dyn ChunkIndex>,
    q: Arc<Quarantined>,
    how: Screen,
}

impl ChunkIndex for Screened {
    fn lookup(&self, id: &ChunkId) -> std::result::Result<Option<BlobLocation>, RepoError> {
        let first = self.inner.lookup(id)?;
        match first {
            Some(l) if self.q.is_bad(id, &l.pack) => {
                let all = self.inner.locations(id)?;
                Ok(self.q.healthy(id, &all).or(match self.how {
                    Screen::Dedup => None,
                    Screen::Read => Some(l),
                }))
            }
            other => Ok(other),
        }
    }
    fn locations(&self, id: &ChunkId) -> std::result::Result<Vec<BlobLocation>, RepoError> {
        let mut all = self.inner.locations(id)?;
        // Healthy ones first.
        all.sort_by_key(|l| self.q.is_bad(id, &l.pack));
        if self.how == Screen::Dedup {
            all.retain(|l| !self.q.is_bad(id, &l.pack));
        }
        Ok(all)
    }
    fn ingest(&self, segment: Option<&IndexId>, entries: &[IndexEntry]) -> std::result::Result<(), RepoError> {
        self.inner.ingest(segment, entries)
    }
    fn ingested_segments(&self) -> std::result::Result<HashSet<IndexId>, RepoError> {
        self.inner.ingested_segments()
    }
    fn remove_segment(&self, segment: &IndexId) -> std::result::Result<usize, RepoError> {
        self.inner.remove_segment(segment)
    }
    fn entry_count(&self) -> std::result::Result<u64, RepoError> {
        self.inner.entry_count()
    }
    fn has_segment(&self, segment: &IndexId) -> std::result::Result<bool, RepoError> {
        self.inner.has_segment(segment)
    }
    fn sync_mark(&self) -> std::result::Result<Option<mover_format::local_index::SyncMark>, RepoError> {
        self.inner.sync_mark()
    }
    fn set_sync_mark(&self, mark: &mover_format::local_index::SyncMark) -> std::result::Result<(), RepoError> {
        self.inner.set_sync_mark(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::blob::BlobKind;
    use mover_format::local_index::MemIndex;

    fn loc(pack: u8) -> BlobLocation {
        BlobLocation { pack: PackId([pack; 32]), kind: BlobKind::Data, offset: 8, stored_len: 100, raw_len: 60 }
    }

    /// A quarantined location is never a dedup answer; a reader gets the healed copy when
    /// there is one, and the damaged one only when nothing else exists.
    #[test]
    fn screens_answer_by_purpose() {
        let (c, other) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let idx: Arc<dyn ChunkIndex> = Arc::new(MemIndex::default());
        idx.ingest(Some(&IndexId([1; 32])), &[IndexEntry { id: c, loc: loc(10) }, IndexEntry { id: other, loc: loc(10) }]).unwrap();
        let mut q = Quarantined::default();
        q.bad.insert((c, PackId([10; 32])), "fails authentication".into());
        let q = Arc::new(q);
        let (dedup, read) = (screen(idx.clone(), &q, Screen::Dedup), screen(idx.clone(), &q, Screen::Read));
        assert_eq!(dedup.lookup(&c).unwrap(), None);
        assert_eq!(read.lookup(&c).unwrap(), Some(loc(10)), "nothing else: the damaged one, so the read names it");
        assert_eq!(dedup.lookup(&other).unwrap(), Some(loc(10)), "another chunk of the same pack is fine");
        assert_eq!(q.unhealed(&*idx).unwrap(), [c].into_iter().collect());
        // Stored anew: both views answer with the new copy.
        idx.ingest(Some(&IndexId([2; 32])), &[IndexEntry { id: c, loc: loc(20) }]).unwrap();
        assert_eq!(dedup.lookup(&c).unwrap(), Some(loc(20)));
        assert_eq!(read.lookup(&c).unwrap(), Some(loc(20)));
        assert_eq!(read.locations(&c).unwrap(), vec![loc(20), loc(10)]);
        assert!(q.unhealed(&*idx).unwrap().is_empty());
    }
}
