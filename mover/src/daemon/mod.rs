//! `mover serve`: [`config`] (validated once) → wiring (here) → [`grpc`] (the only module
//! that touches generated proto types; it builds plans and maps errors to status codes) →
//! [`jobs`] (state machine, per-job cancellation) → the engine. [`metrics`] and [`http`]
//! serve Prometheus and the probes; [`auth`] decides who may call what. Shutdown is
//! ordered: stop accepting, give running transfers a grace period, cancel the rest (they
//! keep what they uploaded and end Interrupted), then exit.

pub mod auth;
pub mod config;
pub mod exports;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod metrics;

use crate::nbd::NbdOptions;
use crate::plan::{Env, NbdPolicy};
use crate::sources::csi::CsiService;
use crate::sources::file::{Confinement, PathPolicy};
use config::{DaemonConfig, Listen, RepoEntry};
use jobs::Jobs;
use metrics::Metrics;
use mover_backends::instrumented::Instrumented;
use mover_engine::ops::RepoHandle;
use mover_engine::{Error, ErrorKind, Result, ResultExt};
use mover_format::{InitOptions, RepoError, Repository};
use mover_protocol::v1 as pb;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Daemon {
    pub cfg: DaemonConfig,
    pub jobs: Arc<Jobs>,
    pub metrics: Arc<Metrics>,
    pub exports: Arc<exports::Exports>,
    /// What plans may use on this node.
    pub env: Env,
    /// One cell per repository, opened on first use: the map's lock is held only to find
    /// the cell, so a repository that is slow to open (an unreachable store, retried)
    /// never delays requests for another.
    repos: std::sync::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<RepoHandle>>>>,
    ready: AtomicBool,
    /// Why a repository could not be opened, by name (gone once it opens).
    repo_errors: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// The daemon's stop: request-time work is tied to it.
    shutdown: CancellationToken,
    /// What the last recovery-point status of each repository read: the next reads only
    /// manifests and reports added since.
    status_caches: tokio::sync::Mutex<HashMap<String, mover_engine::maint::report::StatusCache>>,
}

/// Makes a directory the daemon keeps state in private (0700).
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("restricting {}", dir.display()))
}

fn password_for(name: &str, e: &RepoEntry) -> Result<crate::secrets::Password> {
    if let Some(f) = &e.password_file {
        if e.init_if_missing {
            // The embedded default: a random password kept beside the state, mode 0600.
            crate::secrets::ensure_password_file(f)?;
        }
        return crate::secrets::read_password_file(f, &format!("password file of repository '{name}'"));
    }
    let var = e.password_env.clone().unwrap_or_else(|| "MOVER_PASSWORD".into());
    crate::secrets::env_password(&var).ok_or_else(|| Error::precondition(format!("repository '{name}': no password (set {var} or password_file)")))
}

/// What plans may use, from the configuration.
pub(crate) fn env_from(cfg: &DaemonConfig) -> Env {
    Env {
        paths: PathPolicy::Confined(Confinement { roots: cfg.allowed_roots.clone(), kubelet_root: cfg.kubelet_root.clone(), scope: None }),
        nbd: NbdPolicy::Confined { tcp: cfg.nbd_tcp_endpoints.clone() },
        nbd_options: NbdOptions { connect_timeout: cfg.nbd_connect_timeout, io_timeout: cfg.nbd_io_timeout, ..Default::default() },
        csi: cfg
            .csi
            .iter()
            .map(|c| {
                let s = CsiService {
                    endpoint: c.endpoint.clone(),
                    ca: c.ca_file.clone(),
                    token_file: c.token_file.clone(),
                    server_name: c.tls_server_name.clone(),
                    timeout: Duration::from_secs(c.timeout_seconds.unwrap_or(30).max(1)),
                };
                (c.driver.clone(), s)
            })
            .collect(),
        kubevirt_hosts: Some(cfg.kubevirt_export_hosts.clone()),
        backup: cfg.backup,
        upload_limit: (cfg.bandwidth_limit > 0).then(|| Arc::new(mover_engine::ratelimit::RateLimiter::new(cfg.bandwidth_limit))),
    }
}

impl Daemon {
    /// A token for a request's work before its job exists (planning, resolving): cancelled
    /// when the daemon shuts down, so no request outlives it.
    pub fn request_token(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// What a plan for `caller` may use: the node's environment, with paths narrowed to the
    /// caller's `[authorization.paths]` when any of its identities is listed there.
    pub fn env_for(&self, caller: &auth::Caller) -> Env {
        let mut env = self.env.clone();
        let listed: Vec<&Vec<std::path::PathBuf>> =
            self.cfg.authorization.iter().flat_map(|a| caller.identities.iter().filter_map(|i| a.paths.get(i))).collect();
        if let (false, PathPolicy::Confined(c)) = (listed.is_empty(), &mut env.paths) {
            c.scope = Some(listed.into_iter().flatten().cloned().collect());
        }
        env
    }

    /// How exports are reached: a unix socket beside the daemon's own (its mode and group),
    /// or TCP at `export_address` with NBD over TLS when the daemon has [tls].
    pub fn export_listen(&self, id: &str, tcp: bool) -> Result<(crate::nbd::server::ExportListen, crate::nbd::server::ExportTls)> {
        use crate::nbd::server::{ExportListen, ExportTls};
        if !tcp {
            let dir = match &self.cfg.listen {
                Listen::Unix(p) => p.parent().map(Path::to_path_buf).unwrap_or_else(|| self.cfg.state_dir.clone()),
                Listen::Tcp(_) => self.cfg.state_dir.clone(),
            }
            .join("exports");
            let listen = ExportListen::Unix {
                path: dir.join(format!("{id}.sock")),
                mode: self.cfg.socket_mode,
                group: self.cfg.socket_group,
                peers: Some(auth::export_peers(&self.cfg)),
            };
            return Ok((listen, ExportTls::None));
        }
        let listen = ExportListen::Tcp(std::net::SocketAddr::new(self.cfg.export_address, 0));
        let Some(t) = &self.cfg.tls else {
            // NBD has no authentication: a plaintext TCP export is readable by every local
            // user (a port scan finds it), so it takes the operator's explicit word.
            if !self.cfg.insecure_plaintext_exports {
                return Err(Error::precondition(
                    "a TCP export needs [tls] (NBD over TLS with client certificates): plaintext NBD on TCP is readable by any local user; use the unix-socket export, or set insecure_plaintext_exports = true",
                ));
            }
            tracing::warn!("export {id}: plaintext NBD on TCP {}: any local user can read it (insecure_plaintext_exports)", self.cfg.export_address);
            return Ok((listen, ExportTls::None));
        };
        Ok((listen, ExportTls::Required { config: nbd_tls_config(t)?, admit: self.nbd_admission() }))
    }

    /// Who may connect to a TLS export: a certificate the CA signed (checked by the
    /// handshake) whose identities may call `restore` RPCs.
    fn nbd_admission(&self) -> Arc<dyn Fn(&[u8]) -> std::result::Result<(), String> + Send + Sync> {
        let authorization = self.cfg.authorization.clone();
        Arc::new(move |der: &[u8]| {
            let ids = auth::cert_identities(der);
            if ids.is_empty() {
                return Err("the client certificate names no identity (no SAN, no CN)".into());
            }
            if auth::permits(authorization.as_ref(), &ids, auth::Group::Restore) {
                Ok(())
            } else {
                Err(format!("{} may not read exports (restore)", ids.join(" / ")))
            }
        })
    }

    /// Listening, with every configured repository open.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_none()
    }

    /// Why the daemon is not ready: still starting, or the repositories that are not open
    /// and why (`/readyz` answers it).
    pub fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Some("starting".into());
        }
        let errors = self.repo_errors.lock().map(|e| e.clone()).unwrap_or_default();
        let cells = self.repos.lock().map(|m| m.clone()).unwrap_or_default();
        let down: Vec<String> = self
            .cfg
            .repositories
            .keys()
            .filter(|n| cells.get(*n).and_then(|c| c.get()).is_none())
            .map(|n| format!("repository '{n}': {}", errors.get(n).map(String::as_str).unwrap_or("not opened yet")))
            .collect();
        (!down.is_empty()).then(|| down.join("; "))
    }

    /// The repository names configured here, for messages.
    pub fn repository_names(&self) -> String {
        self.cfg.repositories.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The open repository `name`, opened (and for the embedded default, created) on first use.
    pub async fn repo(&self, name: &str) -> Result<RepoHandle> {
        if name.is_empty() {
            return Err(Error::invalid(format!("repository: empty; name one configured on this node ({})", self.repository_names())));
        }
        let e = self
            .cfg
            .repositories
            .get(name)
            .ok_or_else(|| Error::not_found(format!("repository '{name}' is not configured on this node (configured: {})", self.repository_names())))?;
        let cell = self.repos.lock().map_err(|_| Error::permanent("the repository map is poisoned"))?.entry(name.to_string()).or_default().clone();
        // Callers for the same repository wait for one open; a failed open is tried again
        // by the next caller.
        let h = cell
            .get_or_try_init(|| async {
                let r = self.open_repo(name, e).await;
                if let Ok(mut errs) = self.repo_errors.lock() {
                    match &r {
                        Ok(_) => errs.remove(name),
                        Err(err) => errs.insert(name.to_string(), format!("{err:#}")),
                    };
                }
                self.metrics.repository_up.with_label_values(&[name]).set(r.is_ok() as i64);
                r.map_err(|err| err.context(format!("repository '{name}'")))
            })
            .await?;
        Ok(h.clone())
    }

    async fn open_repo(&self, name: &str, e: &RepoEntry) -> Result<RepoHandle> {
        let s3 = mover_backends::S3Endpoint { endpoint: e.s3_endpoint.clone(), region: e.s3_region.clone() };
        let c = self.request_token();
        let inner = match mover_backends::open_verified(&e.url, &s3, &c).await {
            Ok(s) => s,
            Err(mover_backends::OpenError::Url(err)) => return Err(Error::invalid(err.to_string())),
            Err(mover_backends::OpenError::Store(err)) => return Err(err.into()),
        };
        let storage: Arc<dyn mover_format::storage::Storage> = Arc::new(Instrumented::new(inner, self.metrics.store_observer()));
        let pw = password_for(name, e)?;
        let repo = match Repository::open(storage.clone(), &pw, &c).await {
            Ok(r) => r,
            Err(RepoError::NotInitialised { .. }) if e.init_if_missing => {
                tracing::info!("creating repository '{name}' at {}", e.url);
                Repository::init(storage, &pw, InitOptions::default(), &c).await?
            }
            Err(err) => return Err(err.into()),
        };
        repo.cache_manifests_in(mover_engine::index::manifest_cache_dir(&self.cfg.cache_dir, &repo));
        if e.append_only || mover_engine::lock::append_only_from_env() {
            repo.set_append_only();
        }
        let index = mover_engine::index::open_local(&repo, &self.cfg.cache_dir);
        Ok(RepoHandle { repo, index })
    }
}

/// Opens every configured repository that is not open yet, again every 10 s until it
/// opens (each try bounded by 60 s): `/readyz` and `mover_repository_up` say which cannot
/// be opened and why, and the log says it once per change.
async fn keep_open(d: Arc<Daemon>, stop: CancellationToken) {
    let mut said: HashMap<String, String> = HashMap::new();
    loop {
        for name in d.cfg.repositories.keys() {
            let open = d.repos.lock().ok().and_then(|m| m.get(name).and_then(|c| c.get().map(|_| ()))).is_some();
            if open {
                continue;
            }
            let why = match tokio::time::timeout(Duration::from_secs(60), d.repo(name)).await {
                Ok(Ok(_)) => {
                    if said.remove(name).is_some() {
                        tracing::info!("repository '{name}' is open again");
                    }
                    continue;
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => {
                    let why = format!("repository '{name}': its store did not answer within 60 s");
                    if let Ok(mut errs) = d.repo_errors.lock() {
                        errs.insert(name.clone(), "its store did not answer within 60 s".into());
                    }
                    why
                }
            };
            if said.get(name) != Some(&why) {
                tracing::warn!("not ready: {why}");
                said.insert(name.clone(), why);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// After a job ends the recovery-point metrics are recomputed, but not sooner than this
/// after the last time: a node ending a backup every second would otherwise list the
/// repository's snapshots and reports once a second (issue 33: on the fleet benchmark,
/// three of a backup's eight listings).
const STATUS_AFTER_JOB_GAP: Duration = Duration::from_secs(5);

/// Scheduled verify jobs, and the recovery-point metrics recomputed every
/// `status_interval` and soon after jobs end.
async fn background(d: Arc<Daemon>, stop: CancellationToken) {
    let mut next_verify: HashMap<String, u64> = HashMap::new();
    let mut next_status = 0u64;
    let mut last_status: Option<std::time::Instant> = None;
    let shortest = d.cfg.repositories.values().filter_map(|e| e.verify_interval_seconds).min().unwrap_or(u64::MAX);
    let tick = Duration::from_secs((shortest / 4).clamp(1, 60)).min(d.cfg.status_interval);
    loop {
        let now = mover_format::now_unix_ms();
        for (name, e) in &d.cfg.repositories {
            let Some(every) = e.verify_interval_seconds else { continue };
            if now < next_verify.get(name).copied().unwrap_or(0) {
                continue;
            }
            let next = match d.schedule_verify(name, e, every * 1000, now).await {
                Ok(next) => next,
                Err(err) => {
                    tracing::warn!("scheduled verify of repository '{name}': {err:#}");
                    now + (every * 1000).min(60_000)
                }
            };
            next_verify.insert(name.clone(), next);
        }
        if now >= next_status {
            for (name, e) in &d.cfg.repositories {
                if let Err(err) = d.refresh_status(name, e).await {
                    d.metrics.status_unknown(name);
                    tracing::warn!("recovery-point status of repository '{name}': {err:#}");
                }
            }
            next_status = mover_format::now_unix_ms() + d.cfg.status_interval.as_millis() as u64;
            last_status = Some(std::time::Instant::now());
        }
        let until_status = Duration::from_millis(next_status.saturating_sub(mover_format::now_unix_ms()));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = d.jobs.finished.notified() => {
                let wait = last_status.map(|t| STATUS_AFTER_JOB_GAP.saturating_sub(t.elapsed())).unwrap_or_default();
                next_status = next_status.min(mover_format::now_unix_ms() + wait.as_millis() as u64);
            }
            _ = tokio::time::sleep(tick.min(until_status)) => {}
        }
    }
}

/// When the newest verify that opens was written: a report named in the future (beyond
/// five minutes of clock skew) or one that does not authenticate is skipped, so a junk
/// object in `reports/` cannot stop scheduled verifies on every node.
async fn last_verify(repo: &mover_format::Repository, now: u64, c: &CancellationToken) -> Result<Option<u64>> {
    use mover_engine::maint::report::{VerifyResult, VERIFY};
    let mut verifies: Vec<(String, u64)> =
        repo.list_reports(c).await?.into_iter().filter(|(_, ms, k)| k == VERIFY && *ms <= now + 300_000).map(|(n, ms, _)| (n, ms)).collect();
    verifies.sort_by_key(|(_, ms)| std::cmp::Reverse(*ms));
    for (name, ms) in verifies.into_iter().take(8) {
        match repo.read_report::<VerifyResult>(&name, c).await {
            Ok(_) => return Ok(Some(ms)),
            Err(e) if e.is_cancelled() => return Err(e.into()),
            Err(e) => tracing::warn!("skipping report {name}: {e:#}"),
        }
    }
    Ok(None)
}

impl Daemon {
    /// Starts a verify of `name` when its last one (by any node: the reports in the
    /// repository say) is `every_ms` old; returns when to look again.
    async fn schedule_verify(&self, name: &str, e: &RepoEntry, every_ms: u64, now: u64) -> Result<u64> {
        let running = self.jobs.list().iter().any(|j| {
            let r = j.record();
            r.kind == jobs::Kind::Verify && r.repository == name && !r.state.is_terminal()
        });
        if running {
            return Ok(now + every_ms.min(60_000));
        }
        let h = self.repo(name).await?;
        let c = self.request_token();
        let last = last_verify(&h.repo, now, &c).await?;
        if let Some(last) = last.filter(|l| now.saturating_sub(*l) < every_ms) {
            return Ok(last + every_ms);
        }
        let pct = e.verify_read_data_percent.unwrap_or(10);
        let plan = crate::plan::verify::VerifyPlan::from_percent(pct)?;
        tracing::info!("starting the scheduled verify of repository '{name}' ({pct}% of the data)");
        self.jobs.start(String::new(), name.to_string(), "scheduler".into(), jobs::Work::Verify(plan), h).await;
        Ok(now + every_ms)
    }

    /// Recomputes the recovery-point metrics of `name`, once it is open (a repository no
    /// request or schedule has used yet is not opened for this: an unreachable store must
    /// not hold up the others).
    async fn refresh_status(&self, name: &str, e: &RepoEntry) -> Result<()> {
        let cell = self.repos.lock().ok().and_then(|m| m.get(name).cloned());
        let Some(h) = cell.as_ref().and_then(|c| c.get()) else { return Ok(()) };
        let st = self.repo_status(name, h).await?;
        self.metrics.set_status(name, &st, &e.status_groups);
        Ok(())
    }

    /// The recovery-point status of the open repository `name`, reading only the manifests
    /// and reports added since the last one.
    pub async fn repo_status(&self, name: &str, h: &RepoHandle) -> Result<mover_engine::maint::report::RepoStatus> {
        let t0 = std::time::Instant::now();
        let mut caches = self.status_caches.lock().await;
        let cache = caches.entry(name.to_string()).or_default();
        let (st, cost) = mover_engine::maint::report::refresh(&h.repo, cache, &self.request_token()).await?;
        self.metrics.status_refresh_seconds.with_label_values(&[name]).set(t0.elapsed().as_secs_f64());
        self.metrics.status_manifests_read.with_label_values(&[name]).inc_by(cost.manifests_read as u64);
        tracing::debug!("status of '{name}': {} snapshots, {} manifests read, {:?}", cost.snapshots, cost.manifests_read, t0.elapsed());
        Ok(st)
    }
}

/// The NBD exports' TLS: the daemon's certificate, and client certificates verified
/// against its client CA (mandatory).
fn nbd_tls_config(t: &config::TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &Path, what: &str| crate::secrets::read_small_file(p, what);
    let bad = |what: &str, e: String| Error::invalid(format!("TLS configuration for NBD exports: {what}: {e}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&t.cert, "TLS certificate")?)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad("certificate", e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&t.key, "TLS key")?).map_err(|e| bad("key", e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(&t.client_ca, "client CA")?) {
        roots.add(c.map_err(|e| bad("client CA", e.to_string()))?).map_err(|e| bad("client CA", e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().map_err(|e| bad("client CA", e.to_string()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocols", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Runs the daemon until `stop` fires.
pub async fn serve(cfg: DaemonConfig, stop: CancellationToken) -> Result<()> {
    crate::init_tls();
    if let Some(f) = std::env::var_os("MOVER_CLOCK_OFFSET_FILE") {
        tracing::warn!(
            "MOVER_CLOCK_OFFSET_FILE={}: snapshot, report and lock times are shifted by the seconds in it (for benchmarks only)",
            f.to_string_lossy()
        );
    }
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
    private_dir(&cfg.state_dir)?;
    std::fs::create_dir_all(&cfg.cache_dir).with_context(|| format!("creating cache directory {}", cfg.cache_dir.display()))?;
    let metrics = Arc::new(Metrics::new().map_err(|e| Error::with_source(ErrorKind::Permanent, "registering metrics", e))?);
    let jobs_stop = CancellationToken::new();
    let jobs = Arc::new(Jobs::load(&cfg.state_dir, cfg.max_concurrent_transfers, metrics.clone(), jobs_stop.clone(), cfg.transfer_history)?);
    let env = env_from(&cfg);
    let exports = Arc::new(exports::Exports::new(metrics.clone()));
    let d = Arc::new(Daemon {
        cfg: cfg.clone(),
        jobs: jobs.clone(),
        metrics,
        exports: exports.clone(),
        env,
        repos: std::sync::Mutex::new(HashMap::new()),
        ready: AtomicBool::new(false),
        repo_errors: Default::default(),
        shutdown: stop.clone(),
        status_caches: Default::default(),
    });

    for (name, e) in &cfg.repositories {
        d.metrics.init_repository(name, &e.status_groups);
    }
    // Repositories that must exist are opened (or created) before we accept requests.
    for (name, e) in &cfg.repositories {
        if e.init_if_missing {
            d.repo(name).await?;
        }
    }
    let bg_task = tokio::spawn(background(d.clone(), stop.clone()));
    let open_task = tokio::spawn(keep_open(d.clone(), stop.clone()));
    let velero_task = cfg.velero.clone().map(|v| tokio::spawn(crate::velero::controller::run(d.clone(), v, stop.clone())));

    let http = tokio::net::TcpListener::bind(cfg.http_listen).await.with_context(|| format!("binding HTTP listener {}", cfg.http_listen))?;
    let http_task = tokio::spawn(http::serve(d.clone(), http, stop.clone()));

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<pb::transfer_service_server::TransferServiceServer<grpc::Api>>().await;
    health.set_serving::<pb::repository_service_server::RepositoryServiceServer<grpc::Api>>().await;
    health.set_serving::<pb::export_service_server::ExportServiceServer<grpc::Api>>().await;
    // Both reflection versions: grpcurl speaks v1; the Python client, Evans and older
    // grpcurl only v1alpha.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::with_source(ErrorKind::Permanent, "building the reflection service", e))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::with_source(ErrorKind::Permanent, "building the reflection service (v1alpha)", e))?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &cfg.tls {
        let read = |p: &Path, what: &str| crate::secrets::read_small_file(p, what);
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(read(&t.cert, "TLS certificate")?, read(&t.key, "TLS key")?))
            .client_ca_root(tonic::transport::Certificate::from_pem(read(&t.client_ca, "client CA")?));
        builder = builder.tls_config(tls).map_err(|e| Error::with_source(ErrorKind::InvalidRequest, "TLS configuration", e))?;
    }
    let api = grpc::Api { d: d.clone() };
    let router = builder
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::transfer_service_server::TransferServiceServer::new(api.clone()))
        .add_service(pb::repository_service_server::RepositoryServiceServer::new(api.clone()))
        .add_service(pb::export_service_server::ExportServiceServer::new(api));
    let shutdown = {
        let s = stop.clone();
        async move { s.cancelled().await }
    };
    let io = mover_engine::pipeline::reader::probe_io_uring();
    let started = |where_: &str| {
        tracing::info!(
            "mover {} serving gRPC on {where_}, HTTP on {}; repositories: {}; I/O: {io}; state in {}",
            env!("CARGO_PKG_VERSION"),
            cfg.http_listen,
            cfg.repositories.iter().map(|(n, r)| format!("{n}={}", r.url)).collect::<Vec<_>>().join(", "),
            cfg.state_dir.display()
        )
    };
    let grpc_result = match &cfg.listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding gRPC listener {addr}"))?;
            d.ready.store(true, Ordering::Relaxed);
            started(&addr.to_string());
            if cfg.tls.is_none() {
                let open = match &cfg.authorization {
                    None => "every RPC (no [authorization] section)".to_string(),
                    Some(a) => {
                        let anon = |l: &Vec<String>| l.iter().any(|i| i == "anonymous");
                        let groups: Vec<&str> = [("backup", anon(&a.backup)), ("restore", anon(&a.restore)), ("read", anon(&a.read))]
                            .into_iter()
                            .filter_map(|(g, y)| y.then_some(g))
                            .collect();
                        if groups.is_empty() {
                            "nothing ([authorization] lists no 'anonymous')".to_string()
                        } else {
                            format!("{} RPCs", groups.join(", "))
                        }
                    }
                };
                tracing::warn!("gRPC on {addr} is plaintext TCP: any process that can reach it, every local user included, calls as 'anonymous' and may call {open}; prefer the unix socket or [tls]");
            }
            if cfg.insecure_plaintext_exports {
                tracing::warn!("insecure_plaintext_exports: TCP exports without [tls] are readable by any local user");
            }
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(l), shutdown).await
        }
        Listen::Unix(path) => {
            let l = crate::socket::bind_unix(path, cfg.socket_mode, cfg.socket_group, "gRPC socket")?;
            d.ready.store(true, Ordering::Relaxed);
            started(&format!("unix:{}", path.display()));
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(l), shutdown).await
        }
    };
    d.ready.store(false, Ordering::Relaxed);
    tracing::info!("stopping: waiting up to {} s for running transfers", cfg.shutdown_grace_seconds);
    exports.shutdown().await;
    jobs.shutdown(Duration::from_secs(cfg.shutdown_grace_seconds)).await;
    let _ = http_task.await;
    let _ = bg_task.await;
    let _ = open_task.await;
    if let Some(t) = velero_task {
        let _ = t.await;
    }
    grpc_result.map_err(|e| Error::with_source(ErrorKind::Permanent, "gRPC server", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A junk report named in the future, or one that does not authenticate, does not
    /// count as the last verify: scheduled verifies go on.
    #[tokio::test]
    async fn junk_reports_do_not_stop_scheduled_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let c = CancellationToken::new();
        let opts = InitOptions { kdf: mover_format::crypto::KdfParams::insecure_for_tests(), ..Default::default() };
        let storage = Arc::new(mover_backends::LocalStorage::new(dir.path()));
        let repo = Repository::init(storage, b"pw", opts, &c).await.unwrap();
        let now = mover_format::now_unix_ms();
        assert_eq!(last_verify(&repo, now, &c).await.unwrap(), None);
        let junk = |ms: u64, tag: &str| std::fs::write(dir.path().join(format!("reports/{ms:013}-verify-{tag}")), b"not a report").unwrap();
        std::fs::create_dir_all(dir.path().join("reports")).unwrap();
        junk(now - 1000, "0badf00d");
        junk(9_999_999_999_999, "deadbeef");
        assert_eq!(last_verify(&repo, now, &c).await.unwrap(), None, "junk is no verify");
        mover_engine::ops::verify(&repo, None, true, &Default::default(), &c).await.unwrap();
        let t = mover_format::now_unix_ms();
        // A newer one that does not open (within the clock-skew allowance) is skipped too.
        junk(t + 60_000, "0ddba11a");
        let last = last_verify(&repo, t, &c).await.unwrap().expect("the real report");
        assert!(last >= now && last <= t, "{last}");
    }
}
