//! A drill request → the snapshot resolved and where its scratch files go.

use mover_engine::{snapshots, Result};
use mover_format::manifest::Manifest;
use mover_format::{Repository, SnapshotId};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct DrillRequest {
    /// An id, a unique prefix, or `latest`.
    pub snapshot: String,
    /// The group `latest` is looked up in.
    pub group: Option<String>,
    /// Where the scratch files go; `None`: the front end's default.
    pub scratch: Option<PathBuf>,
}

pub struct DrillPlan {
    pub snapshot: SnapshotId,
    pub manifest: Manifest,
    pub scratch: PathBuf,
}

pub async fn prepare(req: DrillRequest, default_scratch: &Path, repo: &Repository, cancel: &CancellationToken) -> Result<DrillPlan> {
    let (snapshot, manifest) = snapshots::resolve(repo, &req.snapshot, req.group.as_deref(), cancel).await?;
    Ok(DrillPlan { snapshot, manifest, scratch: req.scratch.unwrap_or_else(|| default_scratch.to_path_buf()) })
}
