//! The gRPC services. The only module that touches generated proto types; requests are
//! validated here, before any work starts, and every error names the object it concerns.

use super::jobs::{Job, Kind, State, Work};
use super::resolve::{self, ResolveError};
use super::Daemon;
use crate::pipeline::backup::{validate_extents, BackupOptions, ParentSpec, VolumeSpec};
use crate::pipeline::restore::HoleMode;
use crate::source::{self, Kind as SrcKind};
use mover_protocol::v1 as pb;
use pb::repository_service_server::RepositoryService;
use pb::transfer_service_server::TransferService;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct Api {
    pub d: Arc<Daemon>,
}

fn resolve_err(e: ResolveError) -> Status {
    match e {
        ResolveError::Invalid(m) => Status::invalid_argument(m),
        ResolveError::NotFound(m) => Status::not_found(m),
    }
}

pub fn repo_status(e: &mover_format::RepoError) -> Status {
    use mover_format::RepoError as E;
    let msg = format!("{e:#}");
    match e {
        E::NotFound { .. } => Status::not_found(msg),
        E::Ambiguous { .. } | E::Invalid(_) => Status::invalid_argument(msg),
        E::WrongPassword { .. } | E::NotInitialised { .. } | E::UnsupportedVersion { .. } | E::ConfigMismatch { .. } => Status::failed_precondition(msg),
        E::Cancelled => Status::cancelled(msg),
        e if e.is_transient() => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

pub fn anyhow_status(e: anyhow::Error) -> Status {
    match e.downcast_ref::<mover_format::RepoError>() {
        Some(r) => repo_status(r),
        None => Status::internal(format!("{e:#}")),
    }
}

impl Api {
    fn resolve_ref(&self, r: Option<&pb::VolumeRef>, what: &str, for_target: bool) -> Result<PathBuf, Status> {
        let cfg = &self.d.cfg;
        match r.and_then(|r| r.r#ref.as_ref()) {
            Some(pb::volume_ref::Ref::Path(p)) => {
                if for_target { resolve::target_path(cfg, p, what) } else { resolve::existing_path(cfg, p, what) }.map_err(resolve_err)
            }
            Some(pb::volume_ref::Ref::PodVolume(pv)) => resolve::pod_volume(cfg, &pv.pod_uid, &pv.volume_name, what).map_err(resolve_err),
            None => Err(Status::invalid_argument(format!("{what}: no path or pod volume given"))),
        }
    }

    fn check_repo_name(&self, name: &str) -> Result<(), Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument(format!(
                "repository: empty; name one configured on this node ({})",
                self.d.cfg.repositories.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if !self.d.cfg.repositories.contains_key(name) {
            return Err(Status::not_found(format!(
                "repository '{name}' is not configured on this node (configured: {})",
                self.d.cfg.repositories.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }
}

/// The backup counters as the proto's `Stats` (upload/restore fields left zero).
fn stats_proto(v: &mover_format::manifest::VolumeStats) -> pb::Stats {
    pb::Stats {
        bytes_total: v.bytes_total,
        bytes_read: v.bytes_read,
        bytes_zero: v.bytes_zero,
        bytes_skipped: v.bytes_skipped,
        bytes_reused_parent: v.bytes_reused_parent,
        bytes_new: v.bytes_new,
        bytes_stored: v.bytes_stored,
        chunks_new: v.chunks_new,
        chunks_dedup: v.chunks_dedup,
        ..Default::default()
    }
}

pub fn to_proto(j: &Job) -> pb::Transfer {
    let r = j.record();
    let p = &j.progress;
    let total = p.total().max(r.stats.backup.bytes_total);
    let done = if r.state == State::Succeeded { total } else { p.done() };
    let rate = match j.elapsed() {
        Some(s) if s > 0.0 && !r.state.is_terminal() => done as f64 / s,
        _ => 0.0,
    };
    let eta = if rate > 0.0 && total > done { (total - done) as f64 / rate } else { 0.0 };
    let mut t = pb::Transfer {
        id: r.id.clone(),
        request_id: r.request_id.clone(),
        repository: r.repository.clone(),
        error: r.error.clone(),
        snapshot_id: r.snapshot_id.clone(),
        created_unix_ms: r.created_ms as i64,
        started_unix_ms: r.started_ms as i64,
        finished_unix_ms: r.finished_ms as i64,
        volumes: r.volumes.clone(),
        changes: r.changes.iter().map(|(v, c, f)| pb::VolumeChange { volume: v.clone(), change_source: c.clone(), fallback: f.clone() }).collect(),
        progress: Some(pb::Progress {
            phase: j.phase().to_string(),
            bytes_total: total,
            bytes_done: done,
            bytes_read: p.bytes_read.load(std::sync::atomic::Ordering::Relaxed),
            bytes_uploaded: p.bytes_uploaded.load(std::sync::atomic::Ordering::Relaxed),
            bytes_written: p.bytes_written.load(std::sync::atomic::Ordering::Relaxed),
            rate_bytes_per_second: rate,
            eta_seconds: eta,
            bytes_skipped: p.bytes_skipped.load(std::sync::atomic::Ordering::Relaxed),
            bytes_reused_parent: p.bytes_reused.load(std::sync::atomic::Ordering::Relaxed),
            bytes_new: p.bytes_new.load(std::sync::atomic::Ordering::Relaxed),
        }),
        stats: Some(pb::Stats {
            bytes_uploaded: r.stats.bytes_uploaded,
            bytes_written: r.stats.bytes_written,
            bytes_holes: r.stats.bytes_holes,
            io_backend: r.stats.io_backend.clone(),
            ..stats_proto(&r.stats.backup)
        }),
        ..Default::default()
    };
    t.set_kind(match r.kind {
        Kind::Backup => pb::TransferKind::Backup,
        Kind::Restore => pb::TransferKind::Restore,
    });
    t.set_state(match r.state {
        State::Queued => pb::TransferState::Queued,
        State::Running => pb::TransferState::Running,
        State::Succeeded => pb::TransferState::Succeeded,
        State::Failed => pb::TransferState::Failed,
        State::Cancelled => pb::TransferState::Cancelled,
        State::Interrupted => pb::TransferState::Interrupted,
    });
    t
}

fn snapshot_proto(id: &mover_format::SnapshotId, m: &mover_format::manifest::Manifest) -> pb::Snapshot {
    pb::Snapshot {
        id: id.to_string(),
        time_unix_ms: m.time_unix_ms as i64,
        hostname: m.hostname.clone(),
        parent: m.parent.map(|p| p.to_string()).unwrap_or_default(),
        tags: m.tags.clone().into_iter().collect(),
        volumes: m
            .volumes
            .iter()
            .map(|v| pb::SnapshotVolume { name: v.name.clone(), size: v.size, source: v.source.clone(), change_source: v.change_source.clone() })
            .collect(),
        metadata_names: m.metadata.iter().map(|x| x.name.clone()).collect(),
        stats: Some(stats_proto(&m.stats)),
    }
}

#[tonic::async_trait]
impl TransferService for Api {
    async fn start_backup(&self, request: Request<pb::StartBackupRequest>) -> Result<Response<pb::Transfer>, Status> {
        let req = request.into_inner();
        let _g = self.d.jobs.start_lock.lock().await;
        if let Some(j) = self.d.jobs.by_request(&req.request_id) {
            return Ok(Response::new(to_proto(&j)));
        }
        self.check_repo_name(&req.repository)?;
        if req.volumes.is_empty() {
            return Err(Status::invalid_argument("a backup needs at least one volume"));
        }
        let mut specs = Vec::new();
        let mut names = std::collections::HashSet::new();
        for v in &req.volumes {
            if v.name.is_empty() || v.name.contains('/') || v.name.contains(':') {
                return Err(Status::invalid_argument(format!("volume name '{}' is not valid (non-empty, without '/' or ':')", v.name)));
            }
            if !names.insert(v.name.clone()) {
                return Err(Status::invalid_argument(format!("volume name '{}' is given twice", v.name)));
            }
            let what = format!("source of volume '{}'", v.name);
            if !v.nbd_uri.is_empty() {
                if v.changed_extents_given || v.csi.is_some() {
                    return Err(Status::invalid_argument(format!("volume '{}': nbd_uri does not combine with changed_extents or csi", v.name)));
                }
                crate::nbd::parse_uri(&v.nbd_uri).map_err(|e| Status::invalid_argument(format!("volume '{}': {e:#}", v.name)))?;
                specs.push(VolumeSpec {
                    name: v.name.clone(),
                    source: v.nbd_uri.clone().into(),
                    nbd: Some(crate::pipeline::backup::NbdSpec { uri: v.nbd_uri.clone(), bitmap: Some(v.nbd_bitmap.clone()).filter(|b| !b.is_empty()) }),
                    checkpoint: Some(v.checkpoint.clone()).filter(|c| !c.is_empty()),
                    ..Default::default()
                });
                continue;
            }
            if !v.nbd_bitmap.is_empty() {
                return Err(Status::invalid_argument(format!("volume '{}': nbd_bitmap needs nbd_uri", v.name)));
            }
            let path = self.resolve_ref(v.source.as_ref(), &what, false)?;
            let f = std::fs::File::open(&path).map_err(|e| Status::failed_precondition(format!("{what} {}: {e}", path.display())))?;
            let (_, size) = source::inspect(&path, &f).map_err(|e| Status::invalid_argument(format!("{what}: {e:#}")))?;
            let csi = match &v.csi {
                None => None,
                Some(c) => {
                    if c.endpoint.is_empty() || c.ca_file.is_empty() || c.token_file.is_empty() || c.snapshot_name.is_empty() {
                        return Err(Status::invalid_argument(format!("volume '{}': csi needs endpoint, ca_file, token_file and snapshot_name", v.name)));
                    }
                    Some(crate::csi::CsiSpec {
                        endpoint: c.endpoint.clone(),
                        ca: c.ca_file.clone().into(),
                        token_file: c.token_file.clone().into(),
                        server_name: Some(c.tls_server_name.clone()).filter(|s| !s.is_empty()),
                        namespace: if c.namespace.is_empty() { "default".into() } else { c.namespace.clone() },
                        snapshot: c.snapshot_name.clone(),
                        base_id: Some(c.base_snapshot_id.clone()).filter(|s| !s.is_empty()),
                    })
                }
            };
            let changed = if v.changed_extents_given {
                let mut ext: Vec<(u64, u64)> = v.changed_extents.iter().map(|e| (e.offset, e.length)).collect();
                ext.sort();
                validate_extents(&v.name, &ext, size).map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
                Some(ext)
            } else {
                None
            };
            specs.push(VolumeSpec {
                name: v.name.clone(),
                source: path,
                changed,
                csi,
                checkpoint: Some(v.checkpoint.clone()).filter(|c| !c.is_empty()),
                ..Default::default()
            });
        }
        for m in &req.metadata {
            if m.name.is_empty() || m.data.len() > 64 << 20 {
                return Err(Status::invalid_argument(format!("metadata blob '{}': needs a name and at most 64 MiB", m.name)));
            }
        }
        let h = self.d.repo(&req.repository).await?;
        let parent = match req.parent.as_str() {
            "" => ParentSpec::None,
            "latest" => ParentSpec::Latest,
            p => {
                let c = tokio_util::sync::CancellationToken::new();
                let id = h.repo.resolve_snapshot(p, &c).await.map_err(|e| repo_status(&e))?;
                let m = h.repo.read_snapshot(&id, &c).await.map_err(|e| repo_status(&e))?;
                for s in &specs {
                    if m.volume(&s.name).is_none() {
                        return Err(Status::failed_precondition(format!("parent snapshot {id} has no volume named '{}'", s.name)));
                    }
                }
                ParentSpec::Id(id.to_string())
            }
        };
        if parent == ParentSpec::None {
            if let Some(s) = specs.iter().find(|s| s.changed.is_some()) {
                return Err(Status::failed_precondition(format!("changed extents for volume '{}' need a parent snapshot", s.name)));
            }
        }
        let volumes = specs.iter().map(|s| s.name.clone()).collect();
        let opts = BackupOptions {
            volumes: specs,
            metadata: req.metadata.into_iter().map(|m| (m.name, m.data)).collect(),
            parent,
            tags: req.tags.into_iter().collect(),
            ..Default::default()
        };
        let job = self.d.jobs.start(Kind::Backup, req.request_id, req.repository, volumes, Work::Backup(opts), h, req.bandwidth_limit);
        Ok(Response::new(to_proto(&job)))
    }

    async fn start_restore(&self, request: Request<pb::StartRestoreRequest>) -> Result<Response<pb::Transfer>, Status> {
        let req = request.into_inner();
        let _g = self.d.jobs.start_lock.lock().await;
        if let Some(j) = self.d.jobs.by_request(&req.request_id) {
            return Ok(Response::new(to_proto(&j)));
        }
        self.check_repo_name(&req.repository)?;
        if req.snapshot.is_empty() {
            return Err(Status::invalid_argument("snapshot: empty; give an id, a unique prefix or 'latest'"));
        }
        let target = self.resolve_ref(req.target.as_ref(), "restore target", true)?;
        let h = self.d.repo(&req.repository).await?;
        let c = tokio_util::sync::CancellationToken::new();
        let id = if req.snapshot == "latest" {
            let snaps = h.repo.snapshots(&c).await.map_err(|e| repo_status(&e))?;
            snaps.last().map(|(id, _)| *id).ok_or_else(|| Status::not_found(format!("repository '{}' has no snapshots", req.repository)))?
        } else {
            h.repo.resolve_snapshot(&req.snapshot, &c).await.map_err(|e| repo_status(&e))?
        };
        let m = h.repo.read_snapshot(&id, &c).await.map_err(|e| repo_status(&e))?;
        let vol = if req.volume.is_empty() {
            if m.volumes.len() != 1 {
                return Err(Status::invalid_argument(format!("snapshot {id} has {} volumes: name one", m.volumes.len())));
            }
            m.volumes[0].clone()
        } else {
            m.volume(&req.volume).cloned().ok_or_else(|| Status::not_found(format!("snapshot {id} has no volume named '{}'", req.volume)))?
        };
        if target.exists() {
            let f = std::fs::File::open(&target).map_err(|e| Status::failed_precondition(format!("restore target {}: {e}", target.display())))?;
            let (kind, size) = source::inspect(&target, &f).map_err(|e| Status::invalid_argument(format!("restore target: {e:#}")))?;
            if kind == SrcKind::BlockDevice && size < vol.size {
                return Err(Status::failed_precondition(format!(
                    "restore target {} is {size} bytes, smaller than volume '{}' of snapshot {id} ({} bytes)",
                    target.display(),
                    vol.name,
                    vol.size
                )));
            }
        }
        let holes = match pb::HoleHandling::try_from(req.holes).unwrap_or(pb::HoleHandling::Auto) {
            pb::HoleHandling::Auto => HoleMode::Auto,
            pb::HoleHandling::Zero => HoleMode::Zero,
            pb::HoleHandling::Skip => HoleMode::Skip,
        };
        let volumes = vec![vol.name.clone()];
        let job = self.d.jobs.start(Kind::Restore, req.request_id, req.repository, volumes, Work::Restore { snapshot: id, volume: vol, target, holes }, h, 0);
        Ok(Response::new(to_proto(&job)))
    }

    async fn get_transfer(&self, request: Request<pb::GetTransferRequest>) -> Result<Response<pb::Transfer>, Status> {
        let id = request.into_inner().id;
        let j = self.d.jobs.get(&id).ok_or_else(|| Status::not_found(format!("transfer '{id}' is not known to this node")))?;
        Ok(Response::new(to_proto(&j)))
    }

    type WatchTransferStream = ReceiverStream<Result<pb::Transfer, Status>>;

    async fn watch_transfer(&self, request: Request<pb::GetTransferRequest>) -> Result<Response<Self::WatchTransferStream>, Status> {
        let id = request.into_inner().id;
        let j = self.d.jobs.get(&id).ok_or_else(|| Status::not_found(format!("transfer '{id}' is not known to this node")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut changes = j.subscribe();
            loop {
                let t = to_proto(&j);
                let end = j.record().state.is_terminal();
                if tx.send(Ok(t)).await.is_err() || end {
                    return;
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_transfer(&self, request: Request<pb::GetTransferRequest>) -> Result<Response<pb::Transfer>, Status> {
        let id = request.into_inner().id;
        let j = self.d.jobs.cancel(&id).ok_or_else(|| Status::not_found(format!("transfer '{id}' is not known to this node")))?;
        Ok(Response::new(to_proto(&j)))
    }

    async fn list_transfers(&self, _r: Request<pb::ListTransfersRequest>) -> Result<Response<pb::ListTransfersResponse>, Status> {
        Ok(Response::new(pb::ListTransfersResponse { transfers: self.d.jobs.list().iter().map(|j| to_proto(j)).collect() }))
    }
}

#[tonic::async_trait]
impl RepositoryService for Api {
    async fn list_snapshots(&self, request: Request<pb::ListSnapshotsRequest>) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        self.check_repo_name(&req.repository)?;
        let h = self.d.repo(&req.repository).await?;
        let snaps = h.repo.snapshots(&tokio_util::sync::CancellationToken::new()).await.map_err(|e| repo_status(&e))?;
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots: snaps.iter().map(|(id, m)| snapshot_proto(id, m)).collect() }))
    }

    async fn get_snapshot(&self, request: Request<pb::GetSnapshotRequest>) -> Result<Response<pb::Snapshot>, Status> {
        let req = request.into_inner();
        self.check_repo_name(&req.repository)?;
        if req.snapshot.is_empty() {
            return Err(Status::invalid_argument("snapshot: empty"));
        }
        let h = self.d.repo(&req.repository).await?;
        let c = tokio_util::sync::CancellationToken::new();
        let id = h.repo.resolve_snapshot(&req.snapshot, &c).await.map_err(|e| repo_status(&e))?;
        let m = h.repo.read_snapshot(&id, &c).await.map_err(|e| repo_status(&e))?;
        Ok(Response::new(snapshot_proto(&id, &m)))
    }
}
