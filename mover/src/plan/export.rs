//! An export request (`mover export`, the daemon's `StartExport`) turned into a plan: a
//! `read` lock taken first (gc deletes nothing the export may still read), then the
//! snapshot and volume resolved and the volume opened for reading in place.

use mover_engine::export::{ImageOptions, VolumeImage};
use mover_engine::lock::RepoLock;
use mover_engine::{Error, Result};
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::VolumeEntry;
use mover_format::{Repository, SnapshotId};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct ExportRequest {
    /// Id, unique prefix or `latest`.
    pub snapshot: String,
    /// The group `latest` is looked up in.
    pub group: Option<String>,
    /// The volume; may be left out when the snapshot has one.
    pub volume: Option<String>,
    pub options: ImageOptions,
}

impl ExportRequest {
    /// `SNAPSHOT` or `SNAPSHOT:VOLUME`.
    pub fn parse(spec: &str) -> Self {
        let (snapshot, volume) = match spec.split_once(':') {
            Some((s, v)) => (s.to_string(), Some(v.to_string())),
            None => (spec.to_string(), None),
        };
        Self { snapshot, volume, ..Default::default() }
    }
}

/// A volume ready to serve, with the lease that keeps it readable. Release the lock when
/// the export ends.
pub struct ExportPlan {
    pub snapshot: SnapshotId,
    pub volume: VolumeEntry,
    pub image: Arc<VolumeImage>,
    pub lock: RepoLock,
}

pub async fn prepare(req: ExportRequest, repo: &Repository, index: Arc<dyn ChunkIndex>, cancel: &CancellationToken) -> Result<ExportPlan> {
    if req.snapshot.is_empty() {
        return Err(Error::invalid("snapshot: empty; give an id, a unique prefix or 'latest'"));
    }
    let lock = RepoLock::read(repo, cancel).await?;
    match open(req, repo, index, cancel).await {
        Ok((snapshot, volume, image)) => Ok(ExportPlan { snapshot, volume, image, lock }),
        Err(e) => {
            lock.release().await;
            Err(e)
        }
    }
}

async fn open(
    req: ExportRequest,
    repo: &Repository,
    index: Arc<dyn ChunkIndex>,
    cancel: &CancellationToken,
) -> Result<(SnapshotId, VolumeEntry, Arc<VolumeImage>)> {
    let (snap, m) = mover_engine::snapshots::resolve(repo, &req.snapshot, req.group.as_deref(), cancel).await?;
    let names = || m.volumes.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ");
    let vol = match (&req.volume, m.volumes.len()) {
        (Some(v), _) => m
            .volumes
            .iter()
            .find(|x| &x.name == v)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("snapshot {snap} has no volume '{v}' (it has: {})", names())))?,
        (None, 1) => m.volumes[0].clone(),
        (None, n) => return Err(Error::invalid(format!("snapshot {snap} has {n} volumes ({}): name one as SNAPSHOT:VOLUME", names()))),
    };
    let index = mover_engine::index::with_pending(repo, index, cancel).await?;
    let opts = ImageOptions { cache_segments: req.options.cache_segments.max(1), ..req.options };
    let image = VolumeImage::open(repo, index, snap, vol.clone(), opts, cancel).await?;
    Ok((snap, vol, image))
}
