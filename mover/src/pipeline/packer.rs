//! The pack and upload stages: blobs go into a data pack or a tree pack; a full pack is
//! sealed and uploaded concurrently (bounded by a semaphore, which also bounds memory);
//! every `checkpoint_packs` uploaded packs an index segment is written for them — only
//! after they are durable — and ingested into the local index. A killed backup thus keeps
//! everything up to its last checkpoint, and a rerun deduplicates against it.

use crate::metrics::Progress;
use anyhow::{anyhow, Result};
use mover_format::blob::EncodedBlob;
use mover_format::file_formats::KIND_DATA;
use mover_format::index::IndexEntry;
use mover_format::local_index::ChunkIndex;
use mover_format::pack::PackBuilder;
use mover_format::{PackId, Repository};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

type UploadResult = Result<(PackId, Vec<IndexEntry>, u64)>;

pub struct Packer {
    repo: Repository,
    index: Arc<dyn ChunkIndex>,
    data: PackBuilder,
    tree: PackBuilder,
    pack_size: usize,
    sem: Arc<Semaphore>,
    uploads: JoinSet<UploadResult>,
    pending: Vec<IndexEntry>,
    packs_pending: usize,
    checkpoint_packs: usize,
    progress: Arc<Progress>,
    cancel: CancellationToken,
    pub packs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub index_segments: u64,
    pub limiters: Vec<Arc<crate::ratelimit::RateLimiter>>,
    /// The backup's lock: no index segment is written once its lease may have expired
    /// (GC may have deleted the packs it names as unindexed).
    pub lease: Option<crate::lock::Lease>,
}

impl Packer {
    pub fn new(
        repo: Repository,
        index: Arc<dyn ChunkIndex>,
        upload_concurrency: usize,
        checkpoint_packs: usize,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> Self {
        let pack_size = repo.config().pack_size as usize;
        Self {
            data: PackBuilder::new(pack_size),
            tree: PackBuilder::new(1 << 20),
            repo,
            index,
            pack_size,
            sem: Arc::new(Semaphore::new(upload_concurrency.max(1))),
            uploads: JoinSet::new(),
            pending: Vec::new(),
            packs_pending: 0,
            checkpoint_packs: checkpoint_packs.max(1),
            progress,
            cancel,
            packs_uploaded: 0,
            bytes_uploaded: 0,
            index_segments: 0,
            limiters: Vec::new(),
            lease: None,
        }
    }

    pub async fn add(&mut self, blob: &EncodedBlob) -> Result<()> {
        let is_data = blob.kind == KIND_DATA;
        let b = if is_data { &mut self.data } else { &mut self.tree };
        b.add(blob).map_err(|e| anyhow!("adding chunk {} to a pack: {e}", blob.id))?;
        if b.len() >= self.pack_size {
            self.seal(is_data).await?;
        }
        self.reap(false).await
    }

    async fn seal(&mut self, data: bool) -> Result<()> {
        let fresh = PackBuilder::new(if data { self.pack_size } else { 1 << 20 });
        let b = std::mem::replace(if data { &mut self.data } else { &mut self.tree }, fresh);
        if b.is_empty() {
            return Ok(());
        }
        tracing::debug!(bytes = b.len(), data, "pack sealed, waiting for an upload slot");
        // Back-pressure: wait for an upload slot before taking more data.
        let permit = tokio::select! {
            p = self.sem.clone().acquire_owned() => p.map_err(|_| anyhow!("upload semaphore closed"))?,
            _ = self.cancel.cancelled() => return Err(anyhow!("cancelled")),
        };
        let repo = self.repo.clone();
        let cancel = self.cancel.clone();
        let progress = self.progress.clone();
        let limiters = self.limiters.clone();
        let size = b.len() as u64;
        self.uploads.spawn(async move {
            let _permit = permit;
            for l in &limiters {
                if !l.acquire(size, &cancel).await {
                    return Err(anyhow!("cancelled"));
                }
            }
            let r = repo.write_pack(b, &cancel).await.map_err(|e| anyhow!(e))?;
            progress.add_uploaded(r.2);
            Ok(r)
        });
        Ok(())
    }

    /// Collects finished uploads; with `all`, waits for every one.
    async fn reap(&mut self, all: bool) -> Result<()> {
        loop {
            let next = if all { self.uploads.join_next().await } else { self.uploads.try_join_next() };
            let Some(r) = next else { break };
            let (_id, entries, size) = r.map_err(|e| anyhow!("upload task failed: {e}"))??;
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

    /// Writes an index segment for every uploaded (hence durable) pack not yet indexed.
    async fn checkpoint(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Some(l) = &self.lease {
            l.check()?;
        }
        let id = self.repo.write_index(&self.pending, &self.cancel).await?;
        self.index.ingest(Some(&id), &self.pending)?;
        self.index_segments += 1;
        self.pending.clear();
        self.packs_pending = 0;
        Ok(())
    }

    /// Seals and uploads what is left, waits for every upload, writes the last index
    /// segment. After it returns, every blob added is durable and indexed.
    pub async fn finish(&mut self) -> Result<()> {
        self.seal(true).await?;
        self.seal(false).await?;
        self.reap(true).await?;
        self.checkpoint().await
    }

    /// After a failure: waits for uploads already under way and indexes those that
    /// succeeded (with a fresh token: the job's is cancelled), so a rerun skips them.
    pub async fn finish_after_error(&mut self) -> Result<()> {
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
        if let Some(l) = &self.lease {
            l.check()?;
        }
        let fresh = CancellationToken::new();
        let id = self.repo.write_index(&self.pending, &fresh).await?;
        self.index.ingest(Some(&id), &self.pending)?;
        self.pending.clear();
        Ok(())
    }
}
