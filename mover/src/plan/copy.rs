//! A copy request → the engine's [`CopyRequest`]: the selection resolved (snapshot ids or
//! prefixes, or groups — not both) and the upload tuning with the node's and the request's
//! limits.

use super::Env;
use mover_engine::pipeline::backup::Tuning;
use mover_engine::pipeline::copy::{CopyRequest as Plan, Selection};
use mover_engine::{Error, Result};
use mover_format::Repository;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct CopyRequest {
    /// Ids or unique prefixes; none: every snapshot of `groups` (or of every group).
    pub snapshots: Vec<String>,
    pub groups: Vec<String>,
    /// Only snapshots newer than the newest one the target has of their group.
    pub newer_only: bool,
    /// Concurrent pack uploads to the target (0: the target's default).
    pub upload_concurrency: usize,
    /// Bytes per second (0: no limit of its own).
    pub upload_limit: u64,
}

pub async fn prepare(req: CopyRequest, env: &Env, from: &Repository, cancel: &CancellationToken) -> Result<Plan> {
    if !req.snapshots.is_empty() && !req.groups.is_empty() {
        return Err(Error::invalid("give snapshots or groups, not both"));
    }
    let selection = if req.snapshots.is_empty() {
        Selection::Groups(req.groups)
    } else {
        let mut ids = Vec::new();
        for s in &req.snapshots {
            ids.push(from.resolve_snapshot(s, cancel).await?);
        }
        Selection::Ids(ids)
    };
    let tuning = Tuning { upload_concurrency: req.upload_concurrency, limiters: env.limiters(req.upload_limit), ..Default::default() };
    Ok(Plan { selection, newer_only: req.newer_only, tuning })
}
