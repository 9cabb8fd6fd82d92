//! The Velero data mover inside the daemon (`[velero]`): a loop that, on every watch event
//! and every `resync`, takes one pass over the DataUploads and DataDownloads
//! ([`super::node::pass`]: claim, refuse, cancel, time out) and does what the pass leaves
//! to this node — exposes the volume, and runs the transfer as a daemon job built by the
//! same plan as a gRPC or CLI request and run by the same operation (`plan::backup`,
//! `plan::restore`, `Jobs::start`). A running job's progress is written to the object;
//! its end is written as `Completed`, `Failed` (the error, naming the object) or
//! `Canceled`, and what was created for it is removed whatever the outcome. A job cut
//! short by the daemon's stop leaves the object `InProgress` on this node: the next start
//! resumes it (what was uploaded is found again, not sent twice).

use super::cluster::{Cluster, TargetClaim};
use super::node::{backup_request, completed, ended, pass, Local, NodeConfig, Outcome};
use super::reconcile::{download_request, format_time, upload_request, DownloadRequest, Moved, SnapshotRef, Step, UploadRequest};
use super::types::{DataDownload, DataUpload, Phase};
use crate::daemon::config::VeleroConfig;
use crate::daemon::jobs::{Job, State, Work};
use crate::daemon::Daemon;
use mover_engine::ops::RepoHandle;
use mover_engine::{Error, ErrorKind, Result};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

struct Controller {
    d: Arc<Daemon>,
    c: Cluster,
    cfg: VeleroConfig,
    node: NodeConfig,
    /// The image of the pods that hold exposed volumes.
    image: String,
    /// Per kind: what runs here and what is being prepared.
    local: Mutex<HashMap<&'static str, Local>>,
    stop: CancellationToken,
}

/// Either kind, for the steps that differ.
#[derive(Clone)]
enum Obj {
    Up(DataUpload),
    Down(DataDownload),
}

fn now() -> u64 {
    mover_format::now_unix_ms()
}

/// Runs the data mover until `stop`.
pub async fn run(d: Arc<Daemon>, cfg: VeleroConfig, stop: CancellationToken) {
    let (c, image) = loop {
        let r = async {
            let c = Cluster::connect(cfg.api_server.as_deref(), &cfg.namespace).await?;
            let image = match &cfg.holder_image {
                Some(i) => i.clone(),
                None => {
                    let var = |k: &str| std::env::var(k).unwrap_or_default();
                    c.pod_image(&var("POD_NAMESPACE"), &var("POD_NAME")).await?
                }
            };
            Ok::<_, Error>((c, image))
        }
        .await;
        match r {
            Ok(x) => break x,
            Err(e) => tracing::error!("velero: connecting to the Kubernetes API: {e:#}; trying again in 10 s"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
        }
    };
    let node = NodeConfig { node: cfg.node.clone(), locations: cfg.locations.keys().cloned().collect(), prepare_timeout: cfg.prepare_timeout };
    tracing::info!(
        "velero: data mover '{}' on node {} for namespace {} (locations: {})",
        super::types::DATA_MOVER,
        cfg.node,
        cfg.namespace,
        cfg.locations.iter().map(|(b, r)| format!("{b}→{r}")).collect::<Vec<_>>().join(", ")
    );
    let ctl = Arc::new(Controller { d, c, cfg, node, image, local: Mutex::default(), stop: stop.clone() });
    let wake = Arc::new(tokio::sync::Notify::new());
    let watchers = [watch::<DataUpload>(ctl.clone(), wake.clone()), watch::<DataDownload>(ctl.clone(), wake.clone())];
    loop {
        ctl.round::<DataUpload>(Obj::Up).await;
        ctl.round::<DataDownload>(Obj::Down).await;
        // While something is being prepared, its pod and claim (not watched) are looked at
        // every second.
        let preparing = ctl.local.lock().map(|l| l.values().any(|l| !l.waiting.is_empty())).unwrap_or(false);
        let tick = if preparing { std::time::Duration::from_secs(1) } else { ctl.cfg.resync };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
    for w in watchers {
        w.abort();
    }
}

/// Wakes the loop on every change of the kind (list, then watch from the list's version;
/// on 410 Expired or any failure, list again).
fn watch<T: Moved>(ctl: Arc<Controller>, wake: Arc<tokio::sync::Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let r = async {
                let (_, rv) = ctl.c.list::<T>().await?;
                ctl.c.changes::<T>(&rv, ctl.cfg.resync).await
            }
            .await;
            match r {
                Ok(()) => wake.notify_one(),
                Err(e) => {
                    tracing::debug!("velero: watch: {e:#}; listing again");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    })
}

impl Controller {
    fn local<R>(&self, kind: &'static str, f: impl FnOnce(&mut Local) -> R) -> R {
        let mut g = self.local.lock().unwrap_or_else(|p| p.into_inner());
        f(g.entry(kind).or_default())
    }

    async fn round<T: Moved>(self: &Arc<Self>, wrap: fn(T) -> Obj) {
        let local = self.local(T::KIND, |l| l.clone());
        let out = match pass::<T>(&self.c, &self.node, &local, now()).await {
            Ok(o) => o,
            Err(e) => return tracing::warn!("velero: {e:#}"),
        };
        for (o, outcome) in out {
            let (what, name) = (o.what(), o.meta().name.clone());
            let phase = o.claim().phase;
            match outcome {
                Outcome::Left | Outcome::Lost => {}
                Outcome::Accepted => tracing::info!("velero: {what}: accepted on node {}", self.node.node),
                Outcome::Failed(msg) => {
                    tracing::warn!("velero: {msg}");
                    // A request refused before it was accepted created nothing.
                    if phase != Phase::New {
                        self.clean_up(&wrap(o)).await;
                    }
                }
                Outcome::Canceled => {
                    tracing::info!("velero: {what}: cancelled before it ran");
                    self.clean_up(&wrap(o)).await;
                }
                Outcome::Pending(step) => {
                    if let Err(e) = self.act(wrap(o), step).await {
                        tracing::warn!("velero: {what}: {e:#}");
                    }
                }
            }
            if phase.is_final() {
                self.local(T::KIND, |l| l.waiting.remove(&name));
            }
        }
    }

    async fn act(self: &Arc<Self>, o: Obj, step: Step) -> Result<()> {
        match step {
            Step::Prepare => self.prepare(o).await,
            Step::Run => self.start(o, false).await,
            Step::Resume => self.start(o, true).await,
            Step::CancelRunning => {
                if o.set_status(&self.c, json!({"phase": "Canceling"})).await? {
                    let key = o.name();
                    let job = self.local(o.kind(), |l| l.running.contains(&key)).then(|| self.job_of(&o)).flatten();
                    if let Some(j) = job {
                        tracing::info!("velero: {}: cancelling transfer {}", o.what(), j.record().id);
                        j.cancel.cancel();
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn job_of(&self, o: &Obj) -> Option<Arc<Job>> {
        self.d.jobs.list().into_iter().rev().find(|j| j.record().request_id.starts_with(&request_prefix(o)) && !j.record().state.is_terminal())
    }

    /// Fails `o` now with `msg` and removes what was created for it.
    async fn fail(&self, o: &Obj, msg: String) -> Result<()> {
        tracing::warn!("velero: {msg}");
        if o.set_status(&self.c, o.ended("Failed", &msg)).await? {
            self.clean_up(o).await;
        }
        self.local(o.kind(), |l| l.waiting.remove(&o.name()));
        Ok(())
    }

    /// Gives `o` back (`New` again, this node's claim cleared, its exposure deleted) for
    /// another node to take, when this node cannot reach its volume. This node does not
    /// accept it again; the first acceptance's time still bounds the whole preparation.
    async fn release(&self, o: &Obj, why: String) -> Result<()> {
        let Obj::Up(du) = o else { return Ok(()) };
        let req = upload_request(du).map_err(Error::invalid)?;
        self.c.unexpose(du, &req).await?;
        let msg = format!("released by node {}: {why}", self.node.node);
        if o.set_status(&self.c, json!({"phase": "New", "acceptedByNode": "", "message": msg})).await? {
            tracing::info!("velero: {}: {msg}", o.what());
        }
        self.local(o.kind(), |l| {
            l.waiting.remove(&o.name());
            l.released.insert(o.name())
        });
        Ok(())
    }

    /// Refuses `o` (`Failed` with `msg`): nothing was created for it, and what it names —
    /// its snapshot — is left as it was.
    async fn refuse(&self, o: &Obj, msg: String) -> Result<()> {
        tracing::warn!("velero: {msg}");
        o.set_status(&self.c, o.ended("Failed", &msg)).await?;
        self.local(o.kind(), |l| l.waiting.remove(&o.name()));
        Ok(())
    }

    /// The repository `location` maps to, opened within `repository_timeout`.
    async fn repository(&self, o: &Obj, location: &str) -> std::result::Result<(String, RepoHandle), String> {
        let name = self.cfg.locations.get(location).cloned().unwrap_or_default();
        let t = self.cfg.repository_timeout;
        match tokio::time::timeout(t, self.d.repo(&name)).await {
            Ok(Ok(h)) => Ok((name, h)),
            Ok(Err(e)) => Err(format!("{}: BackupStorageLocation '{location}': {e:#}", o.what())),
            Err(_) => {
                Err(format!("{}: BackupStorageLocation '{location}': repository '{name}' did not open within {} s (unreachable?)", o.what(), t.as_secs()))
            }
        }
    }

    /// Exposes the volume on this node and, once its pod runs, marks the object `Prepared`.
    /// A request that cannot succeed (no repository, a missing snapshot, a refused object)
    /// fails now; one that waits (a snapshot not ready, a pod not yet running) is looked at
    /// again, and the prepare timeout fails it with what it waited for.
    async fn prepare(&self, o: Obj) -> Result<()> {
        let (node, image) = (&self.node.node, &self.image);
        let exposed = match &o {
            Obj::Up(du) => {
                let req = match upload_request(du) {
                    Ok(r) => r,
                    Err(msg) => return self.refuse(&o, msg).await,
                };
                if let Err(msg) = self.repository(&o, &req.location).await {
                    return self.fail(&o, msg).await;
                }
                match self.c.check_source(du, &req).await {
                    Ok(()) => match self.c.expose(du, &req, node, image).await {
                        Ok(()) => self.c.exposed(du, &req).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            Obj::Down(dd) => {
                let req = match download_request(dd) {
                    Ok(r) => r,
                    Err(msg) => return self.refuse(&o, msg).await,
                };
                if let Err(msg) = self.download_repository(&o, &req).await {
                    return self.fail(&o, msg).await;
                }
                match self.c.target_claim(dd, &req).await {
                    Ok(t) => match self.c.expose_restore(dd, &t, node, image).await {
                        Ok(()) => self.c.restore_exposed(dd).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
        };
        match exposed {
            Ok(Some(_)) => {
                if o.set_status(&self.c, json!({"phase": "Prepared", "node": node})).await? {
                    tracing::info!("velero: {}: prepared on node {node}", o.what());
                }
                self.local(o.kind(), |l| l.waiting.remove(&o.name()));
                Ok(())
            }
            Ok(None) => {
                let (ns, pod) = match &o {
                    Obj::Up(du) => (du.spec.source_namespace.clone(), super::cluster::exposure_name(du)),
                    Obj::Down(dd) => (self.cfg.namespace.clone(), format!("mover-{}", dd.metadata.name)),
                };
                match self.c.not_running(&ns, &pod).await? {
                    // This node cannot reach the volume: another node may.
                    Some((true, why)) if matches!(o, Obj::Up(_)) => self.release(&o, why).await,
                    Some((_, why)) => {
                        self.local(o.kind(), |l| l.waiting.insert(o.name(), why));
                        Ok(())
                    }
                    None => {
                        let why = format!("pod {ns}/{pod} is not running on node {node} or its claim is not bound");
                        self.local(o.kind(), |l| l.waiting.insert(o.name(), why));
                        Ok(())
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::Precondition | ErrorKind::Transient) => {
                self.local(o.kind(), |l| l.waiting.insert(o.name(), format!("{e:#}")));
                Ok(())
            }
            // What names nothing that exists, or is not a valid request: refused, and
            // nothing was created to remove (the snapshot is left as it was).
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidRequest) => self.refuse(&o, format!("{}: {e:#}", o.what())).await,
            Err(e) => self.fail(&o, format!("{}: {e:#}", o.what())).await,
        }
    }

    /// For a restore: the repository whose id the snapshotID names — the one the
    /// BackupStorageLocation maps to, or else any location's (a restore in another cluster
    /// may name it differently).
    async fn download_repository(&self, o: &Obj, req: &DownloadRequest) -> std::result::Result<(String, RepoHandle), String> {
        let first = self.repository(o, &req.location).await?;
        if first.1.repo.config().id.to_hex() == req.snapshot.repository_id {
            return Ok(first);
        }
        for bsl in self.cfg.locations.keys().filter(|b| **b != req.location) {
            if let Ok(r) = self.repository(o, bsl).await {
                if r.1.repo.config().id.to_hex() == req.snapshot.repository_id {
                    return Ok(r);
                }
            }
        }
        Err(format!(
            "{}: snapshotID names repository {}, which is not configured on node {} (BackupStorageLocation '{}' is repository '{}', id {})",
            o.what(),
            req.snapshot.repository_id,
            self.node.node,
            req.location,
            first.0,
            first.1.repo.config().id.to_hex()
        ))
    }

    /// Runs (or resumes) the transfer of a prepared object as a daemon job.
    async fn start(self: &Arc<Self>, o: Obj, resume: bool) -> Result<()> {
        let mut status = json!({"phase": "InProgress", "node": self.node.node});
        if !resume {
            status["startTimestamp"] = json!(format_time(now()));
        }
        // Marked InProgress first (with the version read), so that no other writer's
        // decision is overwritten; a resumed one is InProgress already.
        if !resume && !o.set_status(&self.c, status).await? {
            return Ok(());
        }
        let cancel = self.stop.child_token();
        let planned = async {
            match &o {
                Obj::Up(du) => {
                    let req = upload_request(du).map_err(Error::invalid)?;
                    let (name, h) = self.repository(&o, &req.location).await.map_err(Error::transient)?;
                    let exposed = self.c.exposed(du, &req).await?.ok_or_else(|| Error::permanent("its exposure pod no longer runs"))?;
                    let handle = self.c.snapshot_handle(&req).await?;
                    let cbt = !req.driver.is_empty() && crate::plan::backup::csi_service(&self.d.env, Some(&req.driver), &req.source_pvc).is_ok();
                    let plan = crate::plan::backup::prepare(backup_request(du, &req, &exposed, handle, cbt), &self.d.env, &h.repo, &cancel).await?;
                    let repository_id = h.repo.config().id.to_hex();
                    Ok::<_, Error>((name, h, Work::Backup(plan), Then::Upload(req, repository_id)))
                }
                Obj::Down(dd) => {
                    let req = download_request(dd).map_err(Error::invalid)?;
                    let (name, h) = self.download_repository(&o, &req).await.map_err(Error::transient)?;
                    let target = self.c.target_claim(dd, &req).await?;
                    let exposed = self.c.restore_exposed(dd).await?.ok_or_else(|| Error::permanent("its restore pod no longer runs"))?;
                    let r = crate::plan::restore::RestoreRequest {
                        snapshot: req.snapshot.snapshot.clone(),
                        group: None,
                        volume: Some(req.snapshot.volume.clone()),
                        target: crate::plan::restore::TargetRef::PodVolume { uid: exposed.pod_uid, volume: exposed.pv },
                        into_directory: false,
                        holes: Default::default(),
                        // A resumed restore writes over what its first run wrote.
                        overwrite: resume,
                    };
                    let plan = crate::plan::restore::prepare(r, &self.d.env, &h.repo, &cancel).await?;
                    Ok((name, h, Work::Restore(plan), Then::Download(req, target)))
                }
            }
        }
        .await;
        let (repo_name, h, work, then) = match planned {
            Ok(p) => p,
            Err(e) => return self.fail(&self.fresh(&o).await?, format!("{}: {e:#}", o.what())).await,
        };
        let request_id = format!("{}{}", request_prefix(&o), now());
        let job = self.d.jobs.start(request_id, repo_name, "velero".into(), work, h).await;
        tracing::info!("velero: {}: {} as transfer {}", o.what(), if resume { "resumed" } else { "running" }, job.record().id);
        self.local(o.kind(), |l| l.running.insert(o.name()));
        let ctl = self.clone();
        tokio::spawn(async move { ctl.drive(o, job, then).await });
        Ok(())
    }

    /// Writes the job's progress while it runs, then its end.
    async fn drive(self: Arc<Self>, o: Obj, job: Arc<Job>, then: Then) {
        let mut changed = job.subscribe();
        let mut last = (u64::MAX, u64::MAX);
        loop {
            let p = (job.progress.total(), job.progress.done());
            if p != last && p.0 > 0 {
                match o.set_progress(&self.c, p.0, p.1).await {
                    Ok(()) => last = p,
                    Err(e) => tracing::debug!("velero: {}: {e:#}", o.what()),
                }
            }
            if job.record().state.is_terminal() {
                break;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(self.cfg.progress_interval) => {}
            }
        }
        let r = job.record();
        if r.state == State::Interrupted {
            // The daemon stops: the object stays InProgress here, resumed at the next start.
            self.local(o.kind(), |l| l.running.remove(&o.name()));
            return;
        }
        let outcome = match r.state {
            State::Succeeded => self.succeeded(&o, &r, &then).await,
            State::Cancelled => Ok(("Canceled", "cancelled; what was uploaded is kept and not sent again".to_string(), None)),
            _ => Ok(("Failed", format!("{}: transfer {} failed: {}", o.what(), r.id, r.error), None)),
        };
        let (phase, msg, extra) = outcome.unwrap_or_else(|e| ("Failed", format!("{}: {e:#}", o.what()), None));
        let mut status = o.ended(phase, &msg);
        if let Some(x) = extra {
            merge(&mut status, x);
        }
        // Cleaned up first, as Velero's node-agent does: whoever sees the end sees what
        // was made for it gone.
        self.clean_up(&o).await;
        // Written on the object as it is now (its version moved with every progress write).
        for _ in 0..5 {
            match self.fresh(&o).await {
                Ok(cur) => match cur.set_status(&self.c, status.clone()).await {
                    Ok(true) => break,
                    Ok(false) => continue,
                    Err(e) => tracing::warn!("velero: {}: {e:#}", o.what()),
                },
                Err(e) => tracing::warn!("velero: {}: {e:#}", o.what()),
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        match phase {
            "Failed" => tracing::warn!("velero: {msg}"),
            _ => tracing::info!("velero: {}: {phase}", o.what()),
        }
        self.local(o.kind(), |l| l.running.remove(&o.name()));
    }

    /// A successful job's `Completed` status: for a backup the snapshotID; for a restore
    /// the volume handed to the target claim first.
    async fn succeeded(&self, o: &Obj, r: &crate::daemon::jobs::Record, then: &Then) -> Result<(&'static str, String, Option<serde_json::Value>)> {
        match (o, then) {
            (Obj::Up(_), Then::Upload(req, repository_id)) => {
                let sref = SnapshotRef { repository_id: repository_id.clone(), snapshot: r.snapshot_id.clone(), volume: req.source_pvc.clone() };
                let st = completed(&sref, r.stats.backup.bytes_total, r.stats.backup.bytes_new, now());
                Ok(("Completed", String::new(), Some(st)))
            }
            (Obj::Down(dd), Then::Download(req, target)) => {
                let pv = self.c.hand_over(dd, req, target).await?;
                let size = r.stats.backup.bytes_total;
                Ok(("Completed", format!("restored into PersistentVolume {pv}"), Some(json!({"progress": {"totalBytes": size, "bytesDone": size}}))))
            }
            _ => Err(Error::permanent("internal: the job's kind does not match its object")),
        }
    }

    async fn fresh(&self, o: &Obj) -> Result<Obj> {
        let gone = || Error::not_found(format!("{} is gone", o.what()));
        Ok(match o {
            Obj::Up(x) => Obj::Up(self.c.get::<DataUpload>(&x.metadata.name).await?.ok_or_else(gone)?),
            Obj::Down(x) => Obj::Down(self.c.get::<DataDownload>(&x.metadata.name).await?.ok_or_else(gone)?),
        })
    }

    /// Removes what was created for `o`; a failure is logged (a later pass does not
    /// retry it: the objects carry Mover's labels for an operator to find).
    async fn clean_up(&self, o: &Obj) {
        let r = match o {
            Obj::Up(du) => match upload_request(du) {
                Ok(req) => self.c.clean_up(du, &req).await,
                Err(_) => Ok(()),
            },
            Obj::Down(dd) => self.c.clean_up_restore(dd).await,
        };
        if let Err(e) = r {
            tracing::warn!("velero: {}: cleaning up: {e:#}", o.what());
        }
    }
}

/// What a job's success leads to.
enum Then {
    /// The request, and the id of the repository the backup goes to (the snapshotID's).
    Upload(UploadRequest, String),
    Download(DownloadRequest, TargetClaim),
}

/// The request ids of an object's jobs: `velero:<kind>:<uid>:` and the start time (each
/// run — a resumed one too — is a new transfer).
fn request_prefix(o: &Obj) -> String {
    format!("velero:{}:{}:", o.kind(), o.meta().uid)
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::Up(_) => DataUpload::KIND,
            Obj::Down(_) => DataDownload::KIND,
        }
    }
    fn meta(&self) -> &super::types::ObjectMeta {
        match self {
            Obj::Up(x) => x.meta(),
            Obj::Down(x) => x.meta(),
        }
    }
    fn name(&self) -> String {
        self.meta().name.clone()
    }
    fn what(&self) -> String {
        match self {
            Obj::Up(x) => x.what(),
            Obj::Down(x) => x.what(),
        }
    }
    fn ended(&self, phase: &str, msg: &str) -> serde_json::Value {
        match self {
            Obj::Up(x) => ended(x, phase, msg, now()),
            Obj::Down(x) => ended(x, phase, msg, now()),
        }
    }
    async fn set_status(&self, c: &Cluster, status: serde_json::Value) -> Result<bool> {
        match self {
            Obj::Up(x) => c.set_status(x, status).await,
            Obj::Down(x) => c.set_status(x, status).await,
        }
    }
    async fn set_progress(&self, c: &Cluster, total: u64, done: u64) -> Result<()> {
        match self {
            Obj::Up(x) => c.set_progress::<DataUpload>(&x.metadata.name, total, done).await,
            Obj::Down(x) => c.set_progress::<DataDownload>(&x.metadata.name, total, done).await,
        }
    }
}
