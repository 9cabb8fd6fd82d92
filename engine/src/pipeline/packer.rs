//! The pack and upload stages: blobs go into a data pack or a tree pack; a full pack is
//! sealed and uploaded concurrently (bounded by a semaphore, which also bounds memory);
//! every `checkpoint_packs` uploaded packs an index segment is written for them — only
//! after they are durable — and ingested into the local index. A killed backup thus keeps
//! everything up to its last checkpoint, and a rerun deduplicates against it.
//! A chunk claimed by this backup stays in the claim set only until the index holds it, so
//! the set is bounded by the packs in flight, not by the volume's size.

use crate::aligned::Reuse;
use crate::error::{Error, Result, ResultExt};
use crate::progress::Progress;
use mover_format::blob::{BlobKind, EncodedBlob};
use mover_format::index::IndexEntry;
use mover_format::local_index::ChunkIndex;
use mover_format::pack::{PackBuilder, Recycle};
use mover_format::{ChunkId, PackId, Repository};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Chunks this backup has taken on but the local index does not hold yet (they are being
/// encoded, packed or uploaded): two workers never store one chunk twice. An id leaves the
/// set once its index entry is ingested; from then on the index answers for it.
#[derive(Default)]
pub struct Claims(Mutex<HashSet<ChunkId>>);

impl Claims {
    /// True when the chunk is stored (in `index`) or already claimed; otherwise claims it.
    pub fn known(&self, index: &dyn ChunkIndex, id: &ChunkId) -> Result<bool> {
        if !self.set().insert(*id) {
            return Ok(true);
        }
        if index.lookup(id)?.is_some() {
            // Stored before this backup: the index answers for it, nothing to hold.
            self.set().remove(id);
            return Ok(true);
        }
        Ok(false)
    }

    /// Drops ids whose entries the index now holds.
    fn release(&self, entries: &[IndexEntry]) {
        let mut s = self.set();
        for e in entries {
            s.remove(&e.id);
        }
    }

    pub fn len(&self) -> usize {
        self.set().len()
    }

    pub fn is_empty(&self) -> bool {
        self.set().is_empty()
    }

    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<ChunkId>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A data pack builder in a reused buffer (on huge pages): the buffer comes back when the
/// upload drops the pack's bytes. At most one per upload slot plus the one being filled
/// exist; a fresh 17 MiB buffer per pack cost 4,352 page faults in this single task.
fn data_builder(buffers: &Reuse<Vec<u8>>, pack_size: usize) -> PackBuilder {
    let size = PackBuilder::buffer_size(pack_size);
    let buf = buffers.take(|b| b.capacity() >= size, || crate::aligned::huge_vec(size));
    let back = buffers.clone();
    let recycle: Recycle = Arc::new(move |b| back.put(b));
    PackBuilder::in_buffer(buf, Some(recycle))
}

type UploadResult = Result<(PackId, Vec<IndexEntry>, u64)>;
/// How a checkpoint ended: its index segment not written (the entries go back to
/// `pending`, and an error's clean-up writes them), or written and — with what the local
/// index said — recorded there.
enum CheckpointResult {
    NotWritten(Vec<IndexEntry>, Error),
    Written(Vec<IndexEntry>, Result<()>),
}

/// Records a written segment's entries in the local index off the reactor: RocksDB syncs
/// its log on every write.
async fn record_segment(index: Arc<dyn ChunkIndex>, id: mover_format::IndexId, entries: Vec<IndexEntry>) -> (Vec<IndexEntry>, Result<()>) {
    let r = tokio::task::spawn_blocking(move || {
        let r = index.ingest(Some(&id), &entries);
        (entries, r)
    })
    .await;
    match r {
        Ok((entries, r)) => (entries, r.map_err(Error::from)),
        Err(e) => (Vec::new(), Err(Error::permanent(format!("recording an index segment in the local index: {e}")))),
    }
}

/// Index segments being written at once. A checkpoint's write runs beside the backup (one
/// round trip each: awaited inline, they stalled the pipeline a round trip every
/// `checkpoint_packs` packs against a distant store); a third waits for the first.
const CHECKPOINTS_IN_FLIGHT: usize = 2;

pub struct Packer {
    repo: Repository,
    index: Arc<dyn ChunkIndex>,
    claims: Arc<Claims>,
    data: PackBuilder,
    tree: PackBuilder,
    pack_size: usize,
    sem: Arc<Semaphore>,
    uploads: JoinSet<UploadResult>,
    /// Index segment writes under way; their entries are ingested when they finish.
    checkpoints: JoinSet<CheckpointResult>,
    buffers: Reuse<Vec<u8>>,
    pending: Vec<IndexEntry>,
    packs_pending: usize,
    checkpoint_packs: usize,
    progress: Arc<Progress>,
    cancel: CancellationToken,
    pub packs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub index_segments: u64,
    pub limiters: Vec<Arc<crate::ratelimit::RateLimiter>>,
    /// The writer's lock: no index segment is written once its lease may have expired
    /// (GC may have deleted the packs it names as unindexed).
    lease: crate::lock::Lease,
}

impl Packer {
    pub fn new(
        repo: Repository,
        index: Arc<dyn ChunkIndex>,
        claims: Arc<Claims>,
        lease: crate::lock::Lease,
        upload_concurrency: usize,
        checkpoint_packs: usize,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> Self {
        let pack_size = repo.config().pack_size as usize;
        let buffers = Reuse::default();
        Self {
            data: data_builder(&buffers, pack_size),
            buffers,
            tree: PackBuilder::new(1 << 20),
            repo,
            index,
            claims,
            pack_size,
            sem: Arc::new(Semaphore::new(upload_concurrency.max(1))),
            uploads: JoinSet::new(),
            checkpoints: JoinSet::new(),
            pending: Vec::new(),
            packs_pending: 0,
            checkpoint_packs: checkpoint_packs.max(1),
            progress,
            cancel,
            packs_uploaded: 0,
            bytes_uploaded: 0,
            index_segments: 0,
            limiters: Vec::new(),
            lease,
        }
    }

    pub async fn add(&mut self, blob: &EncodedBlob) -> Result<()> {
        let is_data = blob.kind == BlobKind::Data;
        let b = if is_data { &mut self.data } else { &mut self.tree };
        b.add(blob).with_context(|| format!("adding chunk {} to a pack", blob.id))?;
        if b.len() >= self.pack_size {
            self.seal(is_data).await?;
        }
        self.reap(false).await
    }

    async fn seal(&mut self, data: bool) -> Result<()> {
        if (if data { &self.data } else { &self.tree }).is_empty() {
            return Ok(());
        }
        // Back-pressure: wait for an upload slot before taking more data, and only then
        // allocate the next pack (a sealed pack waiting here is one 17 MiB buffer, not two).
        let permit = tokio::select! {
            p = self.sem.clone().acquire_owned() => p.map_err(|_| Error::permanent("upload semaphore closed"))?,
            _ = self.cancel.cancelled() => return Err(Error::cancelled("the backup")),
        };
        let fresh = if data { data_builder(&self.buffers, self.pack_size) } else { PackBuilder::new(1 << 20) };
        let b = std::mem::replace(if data { &mut self.data } else { &mut self.tree }, fresh);
        tracing::debug!(bytes = b.len(), data, "pack sealed, uploading");
        let repo = self.repo.clone();
        let cancel = self.cancel.clone();
        let progress = self.progress.clone();
        let limiters = self.limiters.clone();
        let size = b.len() as u64;
        self.uploads.spawn(async move {
            let _permit = permit;
            for l in &limiters {
                if !l.acquire(size, &cancel).await {
                    return Err(Error::cancelled("the backup"));
                }
            }
            let r = repo.write_pack(b, &cancel).await?;
            progress.add_uploaded(r.2);
            Ok(r)
        });
        Ok(())
    }

    /// Collects finished uploads and index segment writes; with `all`, waits for every
    /// upload.
    async fn reap(&mut self, all: bool) -> Result<()> {
        while let Some(r) = self.checkpoints.try_join_next() {
            self.ingest(r?)?;
        }
        loop {
            let next = if all { self.uploads.join_next().await } else { self.uploads.try_join_next() };
            let Some(r) = next else { break };
            let (_id, entries, size) = r??;
            self.packs_uploaded += 1;
            self.bytes_uploaded += size;
            self.pending.extend(entries);
            self.packs_pending += 1;
            if self.packs_pending >= self.checkpoint_packs {
                self.checkpoint().await?;
            }
        }
        Ok(())
    }

    /// Starts writing an index segment for every uploaded (hence durable) pack not yet
    /// indexed; its entries go into the local index (and leave the claim set) when the
    /// write is done ([`Self::ingest`]).
    async fn checkpoint(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        while self.checkpoints.len() >= CHECKPOINTS_IN_FLIGHT {
            if let Some(r) = self.checkpoints.join_next().await {
                self.ingest(r?)?;
            }
        }
        let entries = std::mem::take(&mut self.pending);
        self.packs_pending = 0;
        let (repo, index, cancel, lease) = (self.repo.clone(), self.index.clone(), self.cancel.clone(), self.lease.clone());
        self.checkpoints.spawn(async move {
            let write = async { Ok(repo.write_index(&entries, &cancel).await?) };
            match lease.commit("writing an index segment", write).await {
                Ok(id) => {
                    let (entries, r) = record_segment(index, id, entries).await;
                    CheckpointResult::Written(entries, r)
                }
                Err(e) => CheckpointResult::NotWritten(entries, e),
            }
        });
        Ok(())
    }

    /// A recorded checkpoint's entries out of the claim set; a failed write's entries back
    /// to `pending` (for [`Self::finish_after_error`]) and its error.
    fn ingest(&mut self, c: CheckpointResult) -> Result<()> {
        let entries = match c {
            CheckpointResult::NotWritten(entries, e) => {
                self.pending.extend(entries);
                return Err(e);
            }
            CheckpointResult::Written(entries, r) => {
                r?;
                entries
            }
        };
        self.claims.release(&entries);
        self.index_segments += 1;
        Ok(())
    }

    /// Waits for every index segment write under way.
    async fn drain_checkpoints(&mut self) -> Result<()> {
        while let Some(r) = self.checkpoints.join_next().await {
            self.ingest(r?)?;
        }
        Ok(())
    }

    /// Seals and uploads what is left, waits for every upload, writes the last index
    /// segment. After it returns, every blob added is durable and indexed.
    pub async fn finish(&mut self) -> Result<()> {
        self.seal(true).await?;
        self.seal(false).await?;
        self.reap(true).await?;
        self.checkpoint().await?;
        self.drain_checkpoints().await
    }

    /// After a failure: waits for uploads already under way and indexes those that
    /// succeeded (with a fresh token: the job's is cancelled), so a rerun skips them.
    pub async fn finish_after_error(&mut self) -> Result<()> {
        // Index segments already being written are kept (their packs are durable); the
        // entries of one that failed are written below with the others.
        while let Some(r) = self.checkpoints.join_next().await {
            if let Ok(done) = r {
                let _ = self.ingest(done);
            }
        }
        while let Some(r) = self.uploads.join_next().await {
            if let Ok(Ok((_id, entries, size))) = r {
                self.packs_uploaded += 1;
                self.bytes_uploaded += size;
                self.pending.extend(entries);
            }
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let fresh = CancellationToken::new();
        let write = async { Ok(self.repo.write_index(&self.pending, &fresh).await?) };
        let id = self.lease.commit("writing an index segment", write).await?;
        let (entries, r) = record_segment(self.index.clone(), id, std::mem::take(&mut self.pending)).await;
        r?;
        self.claims.release(&entries);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_backends::LocalStorage;
    use mover_format::crypto::KdfParams;
    use mover_format::local_index::MemIndex;
    use mover_format::InitOptions;

    /// The claim set holds only what the index does not hold yet: after each checkpoint it
    /// is empty again, so it does not grow with the volume (16 MiB per checkpoint here would
    /// be ~1 GiB of ids on a 16 TiB volume if it kept every chunk).
    #[tokio::test]
    async fn claims_are_released_once_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let opts = InitOptions { pack_size: 64 * 1024, kdf: KdfParams::insecure_for_tests(), ..Default::default() };
        let repo = Repository::init(Arc::new(LocalStorage::new(dir.path())), b"pw", opts, &cancel).await.unwrap();
        let index: Arc<dyn ChunkIndex> = Arc::new(MemIndex::default());
        let claims = Arc::new(Claims::default());
        let (r, c) = (repo.clone(), cancel.clone());
        crate::lock::scope(&r, crate::lock::Hold::Backup, &c, |held| async move {
            let mut packer = Packer::new(repo.clone(), index.clone(), claims.clone(), held.lease(), 2, 1, Arc::new(Progress::default()), cancel.clone());
            let mut enc = mover_format::blob::BlobEncoder::new(1);
            let mut ids = Vec::new();
            let mut most = 0;
            for i in 0..64u32 {
                // Incompressible (xorshift), so three chunks fill a 64 KiB pack.
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ i as u64;
                let data: Vec<u8> = (0..20_000)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let id = repo.keys().chunk_id(&data);
                assert!(!claims.known(&*index, &id).unwrap(), "chunk {i} is new");
                assert!(claims.known(&*index, &id).unwrap(), "chunk {i} is claimed: a second worker must not store it");
                packer.add(&enc.encode(repo.keys(), id, BlobKind::Data, &data).unwrap()).await.unwrap();
                ids.push(id);
                most = most.max(claims.len());
            }
            packer.finish().await.unwrap();
            assert!(packer.index_segments >= 4, "{} checkpoints", packer.index_segments);
            assert!(most < 32, "at most a few packs' chunks are held at once, not all 64 (held {most})");
            assert_eq!(claims.len(), 0, "every chunk is indexed, none is held");
            for id in &ids {
                assert!(index.lookup(id).unwrap().is_some());
                assert!(claims.known(&*index, id).unwrap(), "an indexed chunk is known");
            }
            assert_eq!(claims.len(), 0, "asking about stored chunks holds nothing");
            Ok(())
        })
        .await
        .unwrap();
    }
}
