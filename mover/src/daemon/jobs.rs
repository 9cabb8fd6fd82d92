//! Transfers as jobs: a state machine (Queued → Running → Succeeded | Failed | Cancelled,
//! or Interrupted when the daemon stops), a per-node concurrency limit, per-job
//! cancellation, and records persisted in the state directory so a restarted daemon still
//! reports finished transfers and marks in-flight ones Interrupted.

use super::metrics::Metrics;
use crate::plan::backup::BackupPlan;
use crate::plan::drill::DrillPlan;
use crate::plan::restore::RestorePlan;
use crate::plan::verify::VerifyPlan;
use mover_engine::maint::drill::DrillReport;
use mover_engine::maint::report::VerifyResult;
use mover_engine::ops::{self, RepoHandle};
use mover_engine::pipeline::copy::CopyRequest;
use mover_engine::pipeline::restore::RestoreOptions;
use mover_engine::progress::Progress;
use mover_engine::{ErrorKind, Result, ResultExt};
use mover_format::manifest::VolumeStats;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Backup,
    Restore,
    Copy,
    Verify,
    Drill,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Backup, Kind::Restore, Kind::Copy, Kind::Verify, Kind::Drill];

    pub fn label(&self) -> &'static str {
        match self {
            Kind::Backup => "backup",
            Kind::Restore => "restore",
            Kind::Copy => "copy",
            Kind::Verify => "verify",
            Kind::Drill => "drill",
        }
    }
}

/// What a running transfer is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    BackingUp,
    Restoring,
    Copying,
    Verifying,
    Drilling,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::BackingUp => "backing up",
            Phase::Restoring => "restoring",
            Phase::Copying => "copying",
            Phase::Verifying => "verifying",
            Phase::Drilling => "drilling",
            Phase::Done => "done",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
}

impl State {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, State::Queued | State::Running)
    }
}

/// A transfer's figures: the backup counters of the manifest (flattened, so records keep
/// one flat JSON shape) plus what uploads and restores add.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    #[serde(flatten)]
    pub backup: VolumeStats,
    pub bytes_uploaded: u64,
    pub bytes_written: u64,
    pub bytes_holes: u64,
    pub io_backend: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub request_id: String,
    pub kind: Kind,
    pub state: State,
    pub repository: String,
    pub error: String,
    pub snapshot_id: String,
    pub stats: Stats,
    pub created_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub volumes: Vec<String>,
    /// `(volume, change source, fallback reason)` of a finished backup.
    #[serde(default)]
    pub changes: Vec<(String, String, String)>,
    /// The snapshot group the transfer concerns.
    #[serde(default)]
    pub group: String,
    /// What kind of failure (see `mover_engine::ErrorKind`), when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    /// Who started it.
    #[serde(default)]
    pub caller: String,
    /// A copy's target repository.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// What a copy copied (or found already there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copied: Vec<CopiedRecord>,
    /// What a verify found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyResult>,
    /// What a drill measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopiedRecord {
    pub source_id: String,
    pub target_id: String,
    pub group: String,
    pub incremental_to: String,
    pub bytes_read: u64,
    pub bytes_uploaded: u64,
    /// False: the target already held it.
    pub copied: bool,
}

impl Record {
    /// Whether starting the same transfer again may succeed as it is.
    pub fn retryable(&self) -> bool {
        match self.state {
            State::Interrupted | State::Cancelled => true,
            State::Failed => self.error_kind.is_some_and(|k| k.retryable()),
            _ => false,
        }
    }
}

/// What a job does: a validated plan, run by one operation of `mover_engine::ops`.
pub enum Work {
    Backup(BackupPlan),
    Restore(RestorePlan),
    Copy { target_name: String, target: RepoHandle, plan: CopyRequest },
    Verify(VerifyPlan),
    Drill(DrillPlan),
}

pub struct Job {
    record: Mutex<Record>,
    pub progress: Arc<Progress>,
    pub cancel: CancellationToken,
    changed: watch::Sender<u64>,
    phase: Mutex<Phase>,
    started: Mutex<Option<Instant>>,
}

impl Job {
    pub fn record(&self) -> Record {
        self.record.lock().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }
    pub fn phase(&self) -> Phase {
        self.phase.lock().map(|p| *p).unwrap_or(Phase::Done)
    }
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
    /// Seconds since the job started running, when it has.
    pub fn elapsed(&self) -> Option<f64> {
        self.started.lock().ok().and_then(|s| s.map(|t| t.elapsed().as_secs_f64()))
    }
    fn update(&self, f: impl FnOnce(&mut Record)) -> Record {
        let r = {
            let mut g = self.record.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut g);
            g.clone()
        };
        self.changed.send_modify(|v| *v += 1);
        r
    }
    fn set_phase(&self, p: Phase) {
        if let Ok(mut g) = self.phase.lock() {
            *g = p;
        }
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The state directory's `transfers/`: one JSON record per transfer.
#[derive(Clone)]
struct RecordDir(Arc<PathBuf>);

impl RecordDir {
    /// Writes `r` durably ([`crate::replace_file`]).
    fn persist_now(&self, r: &Record) {
        let path = self.0.join(format!("{}.json", r.id));
        let res = serde_json::to_vec_pretty(r).map_err(std::io::Error::other).and_then(|b| crate::replace_file(&path, &b, 0o600));
        if let Err(e) = res {
            tracing::error!("persisting transfer {}: {e}", r.id);
        }
    }
}

pub struct Jobs {
    map: Mutex<HashMap<String, Arc<Job>>>,
    by_request: Mutex<HashMap<String, String>>,
    sem: Arc<Semaphore>,
    dir: RecordDir,
    metrics: Arc<Metrics>,
    /// Cancelled at shutdown: running jobs end Interrupted.
    shutdown: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Told when a job ends (the status refresher recomputes the repository's report).
    pub finished: Arc<tokio::sync::Notify>,
    retention: Retention,
    /// When a transfer of each kind and group last succeeded, kept in the state directory
    /// (so `mover_last_success_timestamp_seconds` survives restarts).
    successes: Arc<Mutex<LastSuccess>>,
    /// Held while `last-success.json` is written: each write encodes the times as they are
    /// then, so the newest write holds the newest times.
    successes_file: Arc<Mutex<()>>,
}

/// `last-success.json` in the state directory: kind → group label → unix seconds.
struct LastSuccess {
    path: PathBuf,
    times: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
}

impl LastSuccess {
    fn load(state_dir: &std::path::Path) -> Self {
        let path = state_dir.join("last-success.json");
        let times = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!("ignoring unreadable {}: {e}", path.display());
                Default::default()
            }),
            Err(_) => Default::default(),
        };
        Self { path, times }
    }

    /// The file's new contents, to write with [`crate::replace_file`].
    fn encoded(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.times).unwrap_or_default()
    }
}

/// How many ended transfers are kept (in memory and as records), and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub count: usize,
    pub age: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self { count: 1000, age: std::time::Duration::from_secs(30 * 86_400) }
    }
}

/// Of ended transfers `(id, finished_ms)`, those to forget: past the newest `keep.count`,
/// or finished more than `keep.age` before `now_ms`.
fn expired(mut ended: Vec<(String, u64)>, keep: Retention, now_ms: u64) -> Vec<String> {
    ended.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let oldest = now_ms.saturating_sub(keep.age.as_millis() as u64);
    ended.into_iter().enumerate().filter(|(i, (_, t))| *i >= keep.count || *t < oldest).map(|(_, (id, _))| id).collect()
}

fn now_ms() -> u64 {
    mover_format::now_unix_ms()
}

impl Jobs {
    pub fn load(state_dir: &std::path::Path, max: usize, metrics: Arc<Metrics>, shutdown: CancellationToken, retention: Retention) -> Result<Self> {
        let dir = state_dir.join("transfers");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        super::private_dir(&dir)?;
        let dir = RecordDir(Arc::new(dir));
        let jobs = Self {
            map: Mutex::new(HashMap::new()),
            by_request: Mutex::new(HashMap::new()),
            sem: Arc::new(Semaphore::new(max)),
            dir,
            metrics,
            shutdown,
            tasks: Mutex::new(Vec::new()),
            finished: Arc::new(tokio::sync::Notify::new()),
            retention,
            successes: Arc::new(Mutex::new(LastSuccess::load(state_dir))),
            successes_file: Default::default(),
        };
        if let Ok(s) = jobs.successes.lock() {
            for (kind, groups) in &s.times {
                for (group, t) in groups {
                    jobs.metrics.last_success.with_label_values(&[kind, group]).set(*t);
                }
            }
        }
        for e in std::fs::read_dir(&*jobs.dir.0).with_context(|| format!("listing {}", jobs.dir.0.display()))?.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let rec: Record = match std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                Some(r) => r,
                None => {
                    tracing::warn!("ignoring unreadable transfer record {}", p.display());
                    continue;
                }
            };
            let mut rec = rec;
            if !rec.state.is_terminal() {
                rec.state = State::Interrupted;
                rec.error = "the daemon stopped while this transfer ran; start it again to resume".into();
                rec.error_kind = Some(ErrorKind::Transient);
                rec.finished_ms = now_ms();
                jobs.dir.persist_now(&rec);
            }
            let (tx, _) = watch::channel(0);
            let job = Arc::new(Job {
                record: Mutex::new(rec.clone()),
                progress: Arc::default(),
                cancel: CancellationToken::new(),
                changed: tx,
                phase: Mutex::new(Phase::Done),
                started: Mutex::new(None),
            });
            if let Ok(mut m) = jobs.by_request.lock() {
                if !rec.request_id.is_empty() {
                    m.insert(rec.request_id.clone(), rec.id.clone());
                }
            }
            if let Ok(mut m) = jobs.map.lock() {
                m.insert(rec.id.clone(), job);
            }
        }
        jobs.evict();
        Ok(jobs)
    }

    /// Forgets ended transfers past the retention (`transfer_history`,
    /// `transfer_history_days`): from memory, the request-id map and the state directory.
    fn evict(&self) {
        let ended: Vec<(String, u64)> = self
            .map
            .lock()
            .map(|m| m.values().map(|j| j.record()).filter(|r| r.state.is_terminal()).map(|r| (r.id, r.finished_ms)).collect())
            .unwrap_or_default();
        let gone = expired(ended, self.retention, now_ms());
        if gone.is_empty() {
            return;
        }
        if let Ok(mut m) = self.map.lock() {
            for id in &gone {
                m.remove(id);
            }
        }
        if let Ok(mut m) = self.by_request.lock() {
            m.retain(|_, id| !gone.contains(id));
        }
        for id in &gone {
            let _ = std::fs::remove_file(self.dir.0.join(format!("{id}.json")));
        }
        tracing::debug!(forgotten = gone.len(), "ended transfers past the retention forgotten");
    }

    /// Records a success of `kind` for `group` of `repository`: the metric, and the state
    /// directory's `last-success.json` (written off the reactor).
    async fn succeeded(&self, kind: &str, repository: &str, group: &str) {
        let label = self.metrics.group_label(repository, group);
        let t = mover_format::now_unix_ms() as f64 / 1000.0;
        self.metrics.last_success.with_label_values(&[kind, &label]).set(t);
        match self.successes.lock() {
            Ok(mut s) => s.times.entry(kind.to_string()).or_default().insert(label, t),
            Err(_) => return,
        };
        let (successes, file) = (self.successes.clone(), self.successes_file.clone());
        let write = move || {
            let _one = file.lock().map_err(|_| "last-success.json: a writer panicked".to_string())?;
            let (path, bytes) = match successes.lock() {
                Ok(s) => (s.path.clone(), s.encoded()),
                Err(_) => return Ok(()),
            };
            crate::replace_file(&path, &bytes, 0o600).map_err(|e| format!("{}: {e}", path.display()))
        };
        match tokio::task::spawn_blocking(write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("persisting {e}"),
            Err(e) => tracing::error!("persisting the last successes: {e}"),
        }
    }

    /// Writes a record durably, off the reactor (a `fsync` may take as long as the disk
    /// has writeback queued).
    async fn persist(&self, r: &Record) {
        let (dir, r) = (self.dir.clone(), r.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || dir.persist_now(&r)).await {
            tracing::error!("persisting a transfer record: {e}");
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.map.lock().ok()?.get(id).cloned()
    }

    pub fn by_request(&self, request_id: &str) -> Option<Arc<Job>> {
        if request_id.is_empty() {
            return None;
        }
        let id = self.by_request.lock().ok()?.get(request_id).cloned()?;
        self.get(&id)
    }

    pub fn list(&self) -> Vec<Arc<Job>> {
        let mut v: Vec<Arc<Job>> = self.map.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
        // Oldest first; the id breaks ties (ListTransfers pages by this order).
        v.sort_by_cached_key(|j| {
            let r = j.record();
            (r.created_ms, r.id)
        });
        v
    }

    /// Registers and spawns a validated job; it waits for a slot (Queued) first. A request
    /// id already started returns that transfer instead.
    pub async fn start(self: &Arc<Self>, request_id: String, repository: String, caller: String, work: Work, handle: RepoHandle) -> Arc<Job> {
        let (kind, volumes, group) = match &work {
            Work::Backup(p) => (Kind::Backup, p.volume_names.clone(), p.group.clone()),
            Work::Restore(p) => (Kind::Restore, p.volumes.iter().map(|(v, _)| v.name.clone()).collect(), p.manifest.group()),
            Work::Copy { .. } => (Kind::Copy, Vec::new(), String::new()),
            Work::Verify(_) => (Kind::Verify, Vec::new(), String::new()),
            Work::Drill(p) => (Kind::Drill, p.manifest.volumes.iter().map(|v| v.name.clone()).collect(), p.manifest.group()),
        };
        let target = match &work {
            Work::Copy { target_name, .. } => target_name.clone(),
            _ => String::new(),
        };
        let snapshot_id = match &work {
            Work::Drill(p) => p.snapshot.to_string(),
            _ => String::new(),
        };
        let id = format!("tr-{}", hex::encode(rand_bytes()));
        let rec = Record {
            id: id.clone(),
            request_id: request_id.clone(),
            kind,
            state: State::Queued,
            repository,
            error: String::new(),
            snapshot_id,
            stats: Stats::default(),
            created_ms: now_ms(),
            started_ms: 0,
            finished_ms: 0,
            volumes,
            changes: Vec::new(),
            group,
            error_kind: None,
            caller,
            target,
            copied: Vec::new(),
            verify: None,
            drill: None,
        };
        let (tx, _) = watch::channel(0);
        let job = Arc::new(Job {
            record: Mutex::new(rec),
            progress: Arc::default(),
            cancel: self.shutdown.child_token(),
            changed: tx,
            phase: Mutex::new(Phase::Queued),
            started: Mutex::new(None),
        });
        {
            // One transfer per request id: the check and the registration under one lock
            // (requests are planned before, concurrently; the second start of a request id
            // gets the first one's transfer, its own plan dropped).
            let mut reqs = self.by_request.lock().expect("transfers by request");
            if let Some(j) = reqs.get(&request_id).filter(|_| !request_id.is_empty()).and_then(|id| self.get(id)) {
                return j;
            }
            self.map.lock().expect("transfers").insert(id.clone(), job.clone());
            if !request_id.is_empty() {
                reqs.insert(request_id, id);
            }
        }
        self.persist(&job.record()).await;
        let me = self.clone();
        let j = job.clone();
        let h = tokio::spawn(async move { me.run(j, work, handle).await });
        if let Ok(mut t) = self.tasks.lock() {
            t.retain(|h| !h.is_finished());
            t.push(h);
        }
        job
    }

    async fn run(self: Arc<Self>, job: Arc<Job>, work: Work, h: RepoHandle) {
        let kind = job.record().kind;
        let k = kind.label();
        self.metrics.queued.with_label_values(&[k]).inc();
        let permit = tokio::select! {
            p = self.sem.clone().acquire_owned() => p.ok(),
            _ = job.cancel.cancelled() => None,
        };
        self.metrics.queued.with_label_values(&[k]).dec();
        let Some(_permit) = permit else {
            let state = if self.shutdown.is_cancelled() { State::Interrupted } else { State::Cancelled };
            self.metrics.transfers.with_label_values(&[k, result_label(state)]).inc();
            let r = job.update(|r| {
                r.state = state;
                r.finished_ms = now_ms();
            });
            job.set_phase(Phase::Done);
            self.persist(&r).await;
            return;
        };
        self.metrics.active.with_label_values(&[k]).inc();
        if let Ok(mut s) = job.started.lock() {
            *s = Some(Instant::now());
        }
        let r = job.update(|r| {
            r.state = State::Running;
            r.started_ms = now_ms();
        });
        self.persist(&r).await;
        let t0 = Instant::now();
        // `mover_upload_bytes_total` follows the uploads as they happen (every second),
        // and counts what a failed or cancelled transfer uploaded too.
        let mut counted = 0u64;
        let mut count_uploads = || {
            let now = job.progress.bytes_uploaded.load(std::sync::atomic::Ordering::Relaxed);
            self.metrics.upload_bytes.inc_by(now.saturating_sub(counted));
            counted = counted.max(now);
        };
        let result = {
            let exec = self.execute(&job, work, &h);
            tokio::pin!(exec);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    r = &mut exec => break r,
                    _ = tick.tick() => count_uploads(),
                }
            }
        };
        count_uploads();
        let secs = t0.elapsed().as_secs_f64();
        let state = match &result {
            Ok(()) => State::Succeeded,
            Err(_) if self.shutdown.is_cancelled() => State::Interrupted,
            Err(_) if job.cancel.is_cancelled() => State::Cancelled,
            Err(_) => State::Failed,
        };
        // Metrics first: whoever sees the end state sees the counters that go with it.
        self.metrics.active.with_label_values(&[k]).dec();
        self.metrics.transfers.with_label_values(&[k, result_label(state)]).inc();
        self.metrics.duration.with_label_values(&[k, result_label(state)]).observe(secs);
        if state == State::Succeeded {
            let r = job.record();
            self.succeeded(k, &r.repository, &r.group).await;
        }
        let r = job.update(|r| {
            r.state = state;
            r.finished_ms = now_ms();
            if let Err(e) = &result {
                r.error = match state {
                    State::Cancelled => format!("cancelled (what was uploaded is kept): {e:#}"),
                    State::Interrupted => format!("interrupted by daemon shutdown; start it again to resume: {e:#}"),
                    _ => format!("{e:#}"),
                };
                r.error_kind = Some(match state {
                    State::Cancelled | State::Interrupted => ErrorKind::Cancelled,
                    _ => e.kind(),
                });
            }
        });
        job.set_phase(Phase::Done);
        self.persist(&r).await;
        self.evict();
        self.finished.notify_one();
    }

    /// Runs the job's plan with its operation and records what it returned.
    async fn execute(&self, job: &Arc<Job>, work: Work, h: &RepoHandle) -> Result<()> {
        let m = &self.metrics;
        let rec = match work {
            Work::Backup(plan) => {
                job.set_phase(Phase::BackingUp);
                let s = ops::backup(h, plan.job, job.progress.clone(), &job.cancel).await?;
                let st = &s.stats;
                for (what, v) in [
                    ("read", st.bytes_read),
                    ("zero", st.bytes_zero),
                    ("skipped", st.bytes_skipped),
                    ("reused_parent", st.bytes_reused_parent),
                    ("deduplicated", st.bytes_dedup),
                    ("new", st.bytes_new),
                    ("stored", st.bytes_stored),
                ] {
                    m.backup_bytes.with_label_values(&[what]).inc_by(v);
                }
                if s.io_backend == "pread" {
                    m.io_uring_fallbacks.inc();
                }
                for v in &s.volumes {
                    m.change_sources.with_label_values(&[v.change_source.as_str()]).inc();
                    if v.change_fallback.is_some() {
                        m.change_fallbacks.inc();
                    }
                    if let Some(c) = v.change_check.as_ref().filter(|c| c.differed > 0) {
                        m.change_mismatches.with_label_values(&[c.source.as_str()]).inc();
                    }
                }
                job.update(|r| {
                    r.snapshot_id = s.snapshot_id.to_string();
                    r.changes =
                        s.volumes.iter().map(|v| (v.name.clone(), v.change_source.to_string(), v.change_fallback.clone().unwrap_or_default())).collect();
                    r.stats = Stats { backup: *st, bytes_uploaded: s.bytes_uploaded, io_backend: s.io_backend.clone(), ..Default::default() };
                })
            }
            Work::Restore(plan) => {
                job.set_phase(Phase::Restoring);
                let opts = RestoreOptions { holes: plan.holes, ..Default::default() };
                let total: u64 = plan.volumes.iter().map(|(v, _)| v.size).sum();
                let out = ops::restore(h, plan.snapshot, plan.volumes, &opts, job.progress.clone(), &job.cancel, |s| {
                    m.restore_bytes.with_label_values(&["written"]).inc_by(s.bytes_written);
                    m.restore_bytes.with_label_values(&["holes"]).inc_by(s.bytes_holes);
                })
                .await?;
                job.update(|r| {
                    r.snapshot_id = plan.snapshot.to_string();
                    r.stats = Stats {
                        backup: VolumeStats { bytes_total: total, ..Default::default() },
                        bytes_written: out.iter().map(|s| s.bytes_written).sum(),
                        bytes_holes: out.iter().map(|s| s.bytes_holes).sum(),
                        ..Default::default()
                    };
                })
            }
            Work::Copy { target, plan, .. } => {
                job.set_phase(Phase::Copying);
                let s = ops::copy(h, &target, plan, job.progress.clone(), &job.cancel).await?;
                job.update(|r| {
                    r.copied = s
                        .copied
                        .iter()
                        .map(|c| CopiedRecord {
                            source_id: c.source_id.to_string(),
                            target_id: c.target_id.to_string(),
                            group: c.group.clone(),
                            incremental_to: c.incremental_to.map(|p| p.to_string()).unwrap_or_default(),
                            bytes_read: c.bytes_read,
                            bytes_uploaded: c.bytes_uploaded,
                            copied: true,
                        })
                        .chain(s.already_there.iter().map(|t| CopiedRecord {
                            source_id: t.source_id.to_string(),
                            target_id: t.target_id.to_string(),
                            group: String::new(),
                            incremental_to: String::new(),
                            bytes_read: 0,
                            bytes_uploaded: 0,
                            copied: false,
                        }))
                        .collect();
                    r.stats = Stats {
                        backup: VolumeStats { bytes_total: s.copied.iter().map(|c| c.bytes_total).sum(), bytes_read: s.bytes_read, ..Default::default() },
                        bytes_uploaded: s.bytes_uploaded,
                        ..Default::default()
                    };
                })
            }
            Work::Verify(plan) => {
                job.set_phase(Phase::Verifying);
                let repo_label = job.record().repository;
                let runs = |result: &str| m.verify_runs.with_label_values(&[repo_label.as_str(), result]).inc();
                // Recorded in the repository, damaged or not: the damage and last-success
                // gauges follow from it (the status refresher sets them once this job ends).
                let v = ops::verify(&h.repo, plan.read_percent, true, &job.progress, &job.cancel).await.inspect_err(|_| runs("err"))?;
                runs(if v.result.ok { "ok" } else { "damaged" });
                let rec = job.update(|r| {
                    r.stats = Stats { backup: VolumeStats { bytes_read: v.result.bytes_verified, ..Default::default() }, ..Default::default() };
                    r.verify = Some(v.result.clone());
                });
                self.persist(&rec).await;
                return v.ok(&h.repo);
            }
            Work::Drill(plan) => {
                job.set_phase(Phase::Drilling);
                let d = ops::drill(h, plan.snapshot, &plan.manifest, &plan.scratch, job.progress.clone(), &job.cancel).await?;
                job.update(|rec| {
                    rec.stats = Stats {
                        backup: VolumeStats { bytes_total: d.volumes.iter().map(|v| v.size).sum(), ..Default::default() },
                        bytes_written: d.volumes.iter().map(|v| v.bytes_written).sum(),
                        ..Default::default()
                    };
                    rec.drill = Some(d.clone());
                })
            }
        };
        self.persist(&rec).await;
        Ok(())
    }

    /// Stops the jobs at shutdown: lets running ones finish within `grace`, then cancels
    /// them (they index what they uploaded) and waits for them to record Interrupted.
    pub async fn shutdown(&self, grace: Duration) {
        let handles: Vec<_> = self.tasks.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        let all = futures::future::join_all(handles);
        tokio::pin!(all);
        if tokio::time::timeout(grace, &mut all).await.is_err() {
            self.shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(60), all).await;
        }
        self.shutdown.cancel();
    }
}

fn result_label(s: State) -> &'static str {
    match s {
        State::Succeeded => "ok",
        State::Cancelled => "cancelled",
        State::Interrupted => "interrupted",
        _ => "err",
    }
}

fn rand_bytes() -> [u8; 8] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_transfers_past_the_count_or_the_age_are_forgotten_newest_kept() {
        let keep = Retention { count: 2, age: std::time::Duration::from_secs(10) };
        let ended = vec![("a".to_string(), 95_000), ("b".to_string(), 99_000), ("c".to_string(), 97_000), ("d".to_string(), 80_000)];
        let mut gone = expired(ended, keep, 100_000);
        gone.sort();
        assert_eq!(gone, vec!["a".to_string(), "d".to_string()]);
        assert!(expired(vec![("x".into(), 100_000)], Retention::default(), 100_000).is_empty());
    }
}
