//! The gRPC services: the only module that touches generated proto types. Each RPC
//! authorizes its caller, converts the request into a plan request (`TryFrom`), lets
//! [`crate::plan`] validate it — the same rules the CLI goes through — and maps engine
//! error kinds to status codes. Every error names the object it concerns.

use super::auth::{self, Group};
use super::jobs::{Job, Kind, State, Work};
use super::Daemon;
use crate::plan::backup::{BackupRequest, SourceRef, VolumeRequest};
use crate::plan::copy::CopyRequest;
use crate::plan::drill::DrillRequest;
use crate::plan::export::ExportRequest;
use crate::plan::restore::{RestoreRequest, TargetRef};
use crate::plan::verify::VerifyPlan;
use crate::sources::csi::CsiQuery;
use mover_engine::pipeline::restore::HoleMode;
use mover_engine::{Error, ErrorKind};
use mover_protocol::v1 as pb;
use pb::export_service_server::ExportService;
use pb::repository_service_server::RepositoryService;
use pb::transfer_service_server::TransferService;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct Api {
    pub d: Arc<Daemon>,
}

impl Api {
    /// A transfer refused at the call (its repository cannot be opened, its plan fails):
    /// counted as a failed transfer of its kind, so alerts on failures see it.
    fn refused(&self, kind: Kind, e: Error) -> Status {
        self.d.metrics.transfers.with_label_values(&[kind.label(), "err"]).inc();
        status(e)
    }
}

/// The status code for an engine error kind; the message is the whole chain.
pub fn status(e: Error) -> Status {
    let msg = format!("{e:#}");
    match e.kind() {
        ErrorKind::InvalidRequest => Status::invalid_argument(msg),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::Precondition => Status::failed_precondition(msg),
        ErrorKind::Conflict => Status::aborted(msg),
        ErrorKind::Transient => Status::unavailable(msg),
        ErrorKind::Permanent => Status::internal(msg),
        ErrorKind::Corrupt => Status::data_loss(msg),
        ErrorKind::Cancelled => Status::cancelled(msg),
    }
}

fn empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

fn volume_ref(r: Option<pb::VolumeRef>, what: &str) -> Result<SourceRefOrTarget, Error> {
    match r.and_then(|r| r.r#ref) {
        Some(pb::volume_ref::Ref::Path(p)) if p.is_empty() => Err(Error::invalid(format!("{what}: empty path"))),
        Some(pb::volume_ref::Ref::Path(p)) => Ok(SourceRefOrTarget::Path(PathBuf::from(p))),
        Some(pb::volume_ref::Ref::PodVolume(pv)) => Ok(SourceRefOrTarget::Pod(pv.pod_uid, pv.volume_name)),
        None => Err(Error::invalid(format!("{what}: no path or pod volume given"))),
    }
}

enum SourceRefOrTarget {
    Path(PathBuf),
    Pod(String, String),
}

impl TryFrom<pb::BackupVolume> for VolumeRequest {
    type Error = Error;
    fn try_from(v: pb::BackupVolume) -> Result<Self, Error> {
        let what = format!("source of volume '{}'", v.name);
        if !v.nbd_bitmap.is_empty() && v.nbd_uri.is_empty() {
            return Err(Error::invalid(format!("volume '{}': nbd_bitmap needs nbd_uri", v.name)));
        }
        let given = [!v.nbd_uri.is_empty(), v.kubevirt.is_some(), v.qcow2.is_some()].iter().filter(|x| **x).count();
        if given > 1 {
            return Err(Error::invalid(format!("volume '{}': give one of nbd_uri, kubevirt and qcow2", v.name)));
        }
        let plain = |r: Option<pb::VolumeRef>, what: &str| -> Result<SourceRef, Error> {
            Ok(match volume_ref(r, what)? {
                SourceRefOrTarget::Path(p) => SourceRef::Path(p),
                SourceRefOrTarget::Pod(uid, volume) => SourceRef::PodVolume { uid, volume },
            })
        };
        let source = if !v.nbd_uri.is_empty() {
            SourceRef::Nbd { uri: v.nbd_uri, bitmap: empty(v.nbd_bitmap) }
        } else if let Some(k) = v.kubevirt {
            let export = crate::sources::kubevirt::Export {
                base: crate::sources::kubevirt::Export::base_of(&k.endpoint)?,
                token: zeroize::Zeroizing::new(k.token),
                ca_pem: k.endpoint_cert.into_bytes(),
                declared: empty(k.backup_type).as_deref().map(crate::sources::kubevirt::BackupType::parse).transpose()?,
                since: empty(k.base_checkpoint),
                timeout: Duration::from_secs(60),
                retry_for: Duration::ZERO,
            };
            let pvc = match v.source {
                Some(r) => Some(Box::new(plain(Some(r), &what)?)),
                None => None,
            };
            SourceRef::Kubevirt { export: Box::new(export), pvc }
        } else if let Some(q) = v.qcow2 {
            match plain(q.image, &format!("qcow2 image of volume '{}'", v.name))? {
                SourceRef::Path(path) => SourceRef::Qcow2 { path, since: empty(q.base_checkpoint) },
                _ => return Err(Error::invalid(format!("volume '{}': the qcow2 image must be a path", v.name))),
            }
        } else {
            plain(v.source, &what)?
        };
        let csi = match v.csi {
            None => None,
            Some(c) => {
                if !(c.endpoint.is_empty() && c.ca_file.is_empty() && c.token_file.is_empty() && c.tls_server_name.is_empty()) {
                    return Err(Error::invalid(format!(
                        "volume '{}': csi endpoint, ca_file, token_file and tls_server_name come from the daemon's configuration ([csi]), never from a request",
                        v.name
                    )));
                }
                Some(CsiQuery {
                    namespace: if c.namespace.is_empty() { "default".into() } else { c.namespace },
                    snapshot: c.snapshot_name,
                    base_id: empty(c.base_snapshot_id),
                    driver: empty(c.driver),
                })
            }
        };
        let changed_extents = v.changed_extents_given.then(|| {
            let mut ext: Vec<(u64, u64)> = v.changed_extents.iter().map(|e| (e.offset, e.length)).collect();
            ext.sort();
            ext
        });
        Ok(VolumeRequest { name: v.name, source, changed_extents, csi, checkpoint: empty(v.checkpoint) })
    }
}

impl TryFrom<pb::StartBackupRequest> for BackupRequest {
    type Error = Error;
    fn try_from(r: pb::StartBackupRequest) -> Result<Self, Error> {
        Ok(BackupRequest {
            group: empty(r.group),
            volumes: r.volumes.into_iter().map(VolumeRequest::try_from).collect::<Result<_, _>>()?,
            parent: empty(r.parent),
            metadata: r.metadata.into_iter().map(|m| (m.name, m.data)).collect(),
            tags: r.tags.into_iter().collect(),
            tuning: Default::default(),
            upload_limit: r.bandwidth_limit,
            verify_sample: r.verify_sample.map(|n| n as usize),
            compare_every: r.compare_every,
        })
    }
}

impl TryFrom<pb::StartRestoreRequest> for RestoreRequest {
    type Error = Error;
    fn try_from(r: pb::StartRestoreRequest) -> Result<Self, Error> {
        let target = match volume_ref(r.target, "restore target")? {
            SourceRefOrTarget::Path(p) => TargetRef::Path(p),
            SourceRefOrTarget::Pod(uid, volume) => TargetRef::PodVolume { uid, volume },
        };
        let holes = match pb::HoleHandling::try_from(r.holes).map_err(|_| Error::invalid(format!("holes: unknown value {}", r.holes)))? {
            pb::HoleHandling::Auto => HoleMode::Auto,
            pb::HoleHandling::Zero => HoleMode::Zero,
            pb::HoleHandling::Skip => HoleMode::Skip,
        };
        Ok(RestoreRequest {
            snapshot: r.snapshot,
            group: empty(r.group),
            volume: empty(r.volume),
            target,
            into_directory: false,
            holes,
            overwrite: r.overwrite,
        })
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
    use std::sync::atomic::Ordering::Relaxed;
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
            phase: j.phase().as_str().to_string(),
            bytes_total: total,
            bytes_done: done,
            bytes_read: p.bytes_read.load(Relaxed),
            bytes_uploaded: p.bytes_uploaded.load(Relaxed),
            bytes_written: p.bytes_written.load(Relaxed),
            rate_bytes_per_second: rate,
            eta_seconds: eta,
            bytes_skipped: p.bytes_skipped.load(Relaxed),
            bytes_reused_parent: p.bytes_reused.load(Relaxed),
            bytes_new: p.bytes_new.load(Relaxed),
        }),
        stats: Some(pb::Stats {
            bytes_uploaded: r.stats.bytes_uploaded,
            bytes_written: r.stats.bytes_written,
            bytes_holes: r.stats.bytes_holes,
            io_backend: r.stats.io_backend.clone(),
            ..stats_proto(&r.stats.backup)
        }),
        error_kind: r.error_kind.map(|k| k.as_str().to_string()).unwrap_or_default(),
        retryable: r.retryable(),
        group: r.group.clone(),
        caller: r.caller.clone(),
        ..Default::default()
    };
    t.target_repository = r.target.clone();
    t.copied = r
        .copied
        .iter()
        .map(|c| pb::CopiedSnapshot {
            source_id: c.source_id.clone(),
            target_id: c.target_id.clone(),
            group: c.group.clone(),
            incremental_to: c.incremental_to.clone(),
            bytes_read: c.bytes_read,
            bytes_uploaded: c.bytes_uploaded,
            copied: c.copied,
        })
        .collect();
    t.verify = r.verify.as_ref().map(|v| pb::VerifyOutcome {
        ok: v.ok,
        read_data_percent: v.read_data_percent,
        problems: v.problems_total as u64,
        damaged: v
            .damaged
            .iter()
            .map(|d| pb::DamagedObject { object: d.object.clone(), problem: d.problem.clone(), snapshots: d.snapshots.iter().map(|s| s.to_string()).collect() })
            .collect(),
        affected_snapshots: v.affected_snapshots.iter().map(|s| s.to_string()).collect(),
        packs_read: v.packs_read as u64,
        bytes_verified: v.bytes_verified,
    });
    t.drill_volumes = r
        .drill
        .iter()
        .flat_map(|d| d.volumes.iter())
        .map(|v| pb::DrillVolume {
            name: v.name.clone(),
            size: v.size,
            restore_bytes_per_second: v.restore_bytes_per_s,
            projected_restore_seconds: v.projected_restore_s,
            segments_verified: v.segments_verified,
        })
        .collect();
    t.set_kind(match r.kind {
        Kind::Backup => pb::TransferKind::Backup,
        Kind::Restore => pb::TransferKind::Restore,
        Kind::Copy => pb::TransferKind::Copy,
        Kind::Verify => pb::TransferKind::Verify,
        Kind::Drill => pb::TransferKind::Drill,
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

fn snapshot_proto(id: &mover_format::SnapshotId, m: &mover_format::manifest::Manifest, protected: bool) -> pb::Snapshot {
    pb::Snapshot {
        protected,
        id: id.to_string(),
        time_unix_ms: m.time_unix_ms as i64,
        hostname: m.hostname.clone(),
        parent: m.parent.map(|p| p.to_string()).unwrap_or_default(),
        tags: m.tags.clone().into_iter().collect(),
        volumes: m
            .volumes
            .iter()
            .map(|v| pb::SnapshotVolume {
                name: v.name.clone(),
                size: v.size,
                source: v.source.clone(),
                change_source: v.change_source.to_string(),
                change_base: v.change_base.clone().unwrap_or_default(),
            })
            .collect(),
        metadata_names: m.metadata.iter().map(|x| x.name.clone()).collect(),
        stats: Some(stats_proto(&m.stats)),
        group: m.group(),
    }
}

impl Api {
    fn job(&self, id: &str) -> Result<Arc<Job>, Status> {
        self.d.jobs.get(id).ok_or_else(|| Status::not_found(format!("transfer '{id}' is not known to this node")))
    }
}

#[tonic::async_trait]
impl TransferService for Api {
    async fn start_backup(&self, request: Request<pb::StartBackupRequest>) -> Result<Response<pb::Transfer>, Status> {
        let caller = auth::authorize(&self.d, &request, Group::Backup)?;
        let req = request.into_inner();
        if let Some(j) = self.d.jobs.by_request(&req.request_id) {
            return Ok(Response::new(to_proto(&j)));
        }
        let (request_id, repository) = (req.request_id.clone(), req.repository.clone());
        // Opening the repository and planning (listings, the parent, paths) hold no
        // node-wide lock: a slow repository delays only its own requests. `Jobs::start`
        // keeps one transfer per request id.
        let h = self.d.repo(&repository).await.map_err(|e| self.refused(Kind::Backup, e))?;
        let plan_req = BackupRequest::try_from(req).map_err(|e| self.refused(Kind::Backup, e))?;
        let plan = crate::plan::backup::prepare(plan_req, &self.d.env_for(&caller), &h.repo, &self.d.request_token())
            .await
            .map_err(|e| self.refused(Kind::Backup, e))?;
        let job = self.d.jobs.start(request_id, repository, caller.name(), Work::Backup(plan), h).await;
        Ok(Response::new(to_proto(&job)))
    }

    async fn start_restore(&self, request: Request<pb::StartRestoreRequest>) -> Result<Response<pb::Transfer>, Status> {
        let caller = auth::authorize(&self.d, &request, Group::Restore)?;
        let req = request.into_inner();
        if let Some(j) = self.d.jobs.by_request(&req.request_id) {
            return Ok(Response::new(to_proto(&j)));
        }
        let (request_id, repository) = (req.request_id.clone(), req.repository.clone());
        let h = self.d.repo(&repository).await.map_err(|e| self.refused(Kind::Restore, e))?;
        let plan_req = RestoreRequest::try_from(req).map_err(|e| self.refused(Kind::Restore, e))?;
        let plan = crate::plan::restore::prepare(plan_req, &self.d.env_for(&caller), &h.repo, &self.d.request_token())
            .await
            .map_err(|e| self.refused(Kind::Restore, e))?;
        let job = self.d.jobs.start(request_id, repository, caller.name(), Work::Restore(plan), h).await;
        Ok(Response::new(to_proto(&job)))
    }

    async fn start_copy(&self, request: Request<pb::StartCopyRequest>) -> Result<Response<pb::Transfer>, Status> {
        let caller = auth::authorize(&self.d, &request, Group::Backup)?;
        let req = request.into_inner();
        if let Some(j) = self.d.jobs.by_request(&req.request_id) {
            return Ok(Response::new(to_proto(&j)));
        }
        if req.target_repository.is_empty() {
            return Err(Status::invalid_argument(format!("target_repository: empty; name one configured on this node ({})", self.d.repository_names())));
        }
        if req.target_repository == req.repository {
            return Err(Status::invalid_argument(format!("target_repository '{}' is the source repository", req.repository)));
        }
        let (h, target) = tokio::try_join!(self.d.repo(&req.repository), self.d.repo(&req.target_repository)).map_err(|e| self.refused(Kind::Copy, e))?;
        let plan_req =
            CopyRequest { snapshots: req.snapshots, groups: req.groups, newer_only: req.newer_only, upload_concurrency: 0, upload_limit: req.bandwidth_limit };
        let plan =
            crate::plan::copy::prepare(plan_req, &self.d.env_for(&caller), &h.repo, &self.d.request_token()).await.map_err(|e| self.refused(Kind::Copy, e))?;
        let work = Work::Copy { target_name: req.target_repository.clone(), target, plan };
        let job = self.d.jobs.start(req.request_id, req.repository, caller.name(), work, h).await;
        Ok(Response::new(to_proto(&job)))
    }

    async fn start_verify(&self, request: Request<pb::StartVerifyRequest>) -> Result<Response<pb::Transfer>, Status> {
        let caller = auth::authorize(&self.d, &request, Group::Backup)?;
        let req = request.into_inner();
        if let Some(j) = self.d.jobs.by_request(&req.request_id) {
            return Ok(Response::new(to_proto(&j)));
        }
        let plan = VerifyPlan::from_percent(req.read_data_percent).map_err(|e| self.refused(Kind::Verify, e))?;
        let h = self.d.repo(&req.repository).await.map_err(|e| self.refused(Kind::Verify, e))?;
        let job = self.d.jobs.start(req.request_id, req.repository, caller.name(), Work::Verify(plan), h).await;
        Ok(Response::new(to_proto(&job)))
    }

    async fn start_drill(&self, request: Request<pb::StartDrillRequest>) -> Result<Response<pb::Transfer>, Status> {
        let caller = auth::authorize(&self.d, &request, Group::Restore)?;
        let req = request.into_inner();
        if let Some(j) = self.d.jobs.by_request(&req.request_id) {
            return Ok(Response::new(to_proto(&j)));
        }
        mover_engine::snapshots::check_spec(&req.snapshot).map_err(|e| self.refused(Kind::Drill, e))?;
        let h = self.d.repo(&req.repository).await.map_err(|e| self.refused(Kind::Drill, e))?;
        let plan_req = DrillRequest { snapshot: req.snapshot, group: empty(req.group), scratch: None };
        let plan = crate::plan::drill::prepare(plan_req, &self.d.cfg.drill_scratch_dir, &h.repo, &self.d.request_token())
            .await
            .map_err(|e| self.refused(Kind::Drill, e))?;
        let job = self.d.jobs.start(req.request_id, req.repository, caller.name(), Work::Drill(plan), h).await;
        Ok(Response::new(to_proto(&job)))
    }

    async fn get_transfer(&self, request: Request<pb::GetTransferRequest>) -> Result<Response<pb::Transfer>, Status> {
        auth::authorize(&self.d, &request, Group::Read)?;
        let j = self.job(&request.into_inner().id)?;
        Ok(Response::new(to_proto(&j)))
    }

    type WatchTransferStream = ReceiverStream<Result<pb::Transfer, Status>>;

    async fn watch_transfer(&self, request: Request<pb::GetTransferRequest>) -> Result<Response<Self::WatchTransferStream>, Status> {
        auth::authorize(&self.d, &request, Group::Read)?;
        let j = self.job(&request.into_inner().id)?;
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
        let caller = auth::authorize(&self.d, &request, Group::Read)?;
        let j = self.job(&request.into_inner().id)?;
        let r = j.record();
        let group = if matches!(r.kind, Kind::Backup | Kind::Copy | Kind::Verify) { Group::Backup } else { Group::Restore };
        if r.caller != caller.name() && !auth::allowed(&self.d, &caller, group) {
            return Err(Status::permission_denied(format!("caller {} may not cancel transfer {} (started by {})", caller.name(), r.id, r.caller)));
        }
        j.cancel.cancel();
        Ok(Response::new(to_proto(&j)))
    }

    async fn list_transfers(&self, request: Request<pb::ListTransfersRequest>) -> Result<Response<pb::ListTransfersResponse>, Status> {
        auth::authorize(&self.d, &request, Group::Read)?;
        let req = request.into_inner();
        // A page continues after the (created, id) the previous one ended with.
        let after = match req.page_token.as_str() {
            "" => None,
            t => Some(
                t.split_once(':')
                    .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_string())))
                    .ok_or_else(|| Status::invalid_argument(format!("page_token '{t}' is not one this node gave")))?,
            ),
        };
        let mut out: Vec<pb::Transfer> = self
            .d
            .jobs
            .list()
            .iter()
            .map(|j| to_proto(j))
            .filter(|t| req.kind == 0 || t.kind == req.kind)
            .filter(|t| req.state == 0 || t.state == req.state)
            .filter(|t| req.group.is_empty() || t.group == req.group)
            .filter(|t| after.as_ref().is_none_or(|(ms, id)| (t.created_unix_ms, &t.id) > (*ms, id)))
            .collect();
        let mut next_page_token = String::new();
        if req.page_size > 0 && out.len() > req.page_size as usize {
            out.truncate(req.page_size as usize);
            let last = out.last().expect("a page of at least one");
            next_page_token = format!("{}:{}", last.created_unix_ms, last.id);
        }
        Ok(Response::new(pb::ListTransfersResponse { transfers: out, next_page_token }))
    }
}

#[tonic::async_trait]
impl RepositoryService for Api {
    async fn list_snapshots(&self, request: Request<pb::ListSnapshotsRequest>) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        auth::authorize(&self.d, &request, Group::Read)?;
        let req = request.into_inner();
        let h = self.d.repo(&req.repository).await.map_err(status)?;
        let c = self.d.request_token();
        let snaps = match empty(req.group) {
            Some(g) => mover_engine::snapshots::in_group(&h.repo, &g, &c).await.map_err(status)?,
            None => h.repo.snapshots(&c).await.map_err(|e| status(e.into()))?,
        };
        let protected = h.repo.list_protected(&c).await.map_err(|e| status(e.into()))?;
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots: snaps.iter().map(|(id, m)| snapshot_proto(id, m, protected.contains(id))).collect() }))
    }

    async fn get_snapshot(&self, request: Request<pb::GetSnapshotRequest>) -> Result<Response<pb::Snapshot>, Status> {
        auth::authorize(&self.d, &request, Group::Read)?;
        let req = request.into_inner();
        let h = self.d.repo(&req.repository).await.map_err(status)?;
        let c = self.d.request_token();
        let (id, m) = mover_engine::snapshots::resolve(&h.repo, &req.snapshot, None, &c).await.map_err(status)?;
        let protected = h.repo.read_protection(&id, &c).await.map_err(|e| status(e.into()))?.is_some();
        Ok(Response::new(snapshot_proto(&id, &m, protected)))
    }

    async fn protect_snapshot(&self, request: Request<pb::ProtectSnapshotRequest>) -> Result<Response<pb::Snapshot>, Status> {
        auth::authorize(&self.d, &request, Group::Backup)?;
        let req = request.into_inner();
        let h = self.d.repo(&req.repository).await.map_err(status)?;
        let c = self.d.request_token();
        let (id, m) = mover_engine::snapshots::resolve(&h.repo, &req.snapshot, empty(req.group).as_deref(), &c).await.map_err(status)?;
        let out = mover_engine::maint::protect::protect(&h.repo, &id, &req.note, &c).await.map_err(status)?;
        tracing::info!(snapshot = %id, changed = out.changed, "snapshot protected");
        Ok(Response::new(snapshot_proto(&id, &m, true)))
    }

    async fn get_status(&self, request: Request<pb::GetStatusRequest>) -> Result<Response<pb::RepositoryStatus>, Status> {
        auth::authorize(&self.d, &request, Group::Read)?;
        let req = request.into_inner();
        let h = self.d.repo(&req.repository).await.map_err(status)?;
        let st = self.d.repo_status(&req.repository, &h).await.map_err(status)?;
        Ok(Response::new(status_proto(&req.repository, &st)))
    }
}

pub fn status_proto(name: &str, st: &mover_engine::maint::report::RepoStatus) -> pb::RepositoryStatus {
    let v = st.last_verify.as_ref();
    pb::RepositoryStatus {
        repository: name.to_string(),
        time_unix_ms: st.time_unix_ms as i64,
        last_verify_unix_ms: v.map(|v| v.time_unix_ms as i64),
        last_verify_ok: v.is_some_and(|v| v.ok),
        last_verify_read_data_percent: v.map(|v| v.read_data_percent).unwrap_or(0),
        damaged_objects: v.map(|v| v.damaged_objects as u64).unwrap_or(0),
        affected_snapshots: v.map(|v| v.affected_snapshots as u64).unwrap_or(0),
        groups: st
            .groups
            .iter()
            .map(|g| pb::GroupStatus {
                group: g.group.clone(),
                snapshots: g.snapshots as u64,
                newest_snapshot: g.newest_snapshot.to_string(),
                newest_time_unix_ms: g.newest_time_unix_ms as i64,
                rpo_seconds: g.rpo_seconds,
                newest_verified: g.newest_verified.map(|s| s.to_string()),
                verified_age_seconds: g.verified_age_seconds,
                newest_drilled: g.newest_drilled.map(|s| s.to_string()),
                drilled_age_seconds: g.drilled_age_seconds,
                drill_bytes_per_second: g.drill_bytes_per_s,
                projected_restore_seconds: g.projected_restore_seconds,
                last_drill_failed: g.last_drill_failed,
                newest_damaged: g.newest_damaged,
            })
            .collect(),
    }
}

fn export_proto(e: &super::exports::Export) -> pb::Export {
    use super::exports::ExportState;
    let (state, error) = e.state();
    let mut x = pb::Export {
        id: e.id.clone(),
        request_id: e.request_id.clone(),
        repository: e.repository.clone(),
        snapshot_id: e.snapshot_id.clone(),
        volume: e.volume.clone(),
        size: e.size,
        uri: e.uri.clone(),
        caller: e.caller.clone(),
        started_unix_ms: e.started_ms as i64,
        bytes_read: e.bytes_read(),
        error,
        ..Default::default()
    };
    x.set_state(match state {
        ExportState::Serving => pb::ExportState::Serving,
        ExportState::Stopped => pb::ExportState::Stopped,
        ExportState::Failed => pb::ExportState::Failed,
    });
    x
}

#[tonic::async_trait]
impl ExportService for Api {
    async fn start_export(&self, request: Request<pb::StartExportRequest>) -> Result<Response<pb::Export>, Status> {
        let caller = auth::authorize(&self.d, &request, Group::Restore)?;
        let req = request.into_inner();
        if let Some(e) = self.d.exports.by_request(&req.request_id) {
            return Ok(Response::new(export_proto(&e)));
        }
        let plan_req = ExportRequest { snapshot: req.snapshot, group: empty(req.group), volume: empty(req.volume), options: Default::default() };
        let plan = crate::plan::export::prepare(plan_req).map_err(status)?;
        let h = self.d.repo(&req.repository).await.map_err(status)?;
        let id = super::exports::Exports::new_id();
        let (listen, tls) = self.d.export_listen(&id, req.tcp).map_err(status)?;
        let start = super::exports::Start { request_id: req.request_id, repository: req.repository, caller: caller.name(), listen, tls };
        let e = self.d.exports.start(id, h, plan, start).await.map_err(status)?;
        Ok(Response::new(export_proto(&e)))
    }

    async fn stop_export(&self, request: Request<pb::StopExportRequest>) -> Result<Response<pb::Export>, Status> {
        let caller = auth::authorize(&self.d, &request, Group::Read)?;
        let id = request.into_inner().id;
        let e = self.d.exports.get(&id).ok_or_else(|| Status::not_found(format!("export '{id}' is not known to this node")))?;
        if e.caller != caller.name() && !auth::allowed(&self.d, &caller, Group::Restore) {
            return Err(Status::permission_denied(format!("caller {} may not stop export {id} (started by {})", caller.name(), e.caller)));
        }
        e.stop().await;
        Ok(Response::new(export_proto(&e)))
    }

    async fn list_exports(&self, request: Request<pb::ListExportsRequest>) -> Result<Response<pb::ListExportsResponse>, Status> {
        auth::authorize(&self.d, &request, Group::Read)?;
        Ok(Response::new(pb::ListExportsResponse { exports: self.d.exports.list().iter().map(|e| export_proto(e)).collect() }))
    }
}
