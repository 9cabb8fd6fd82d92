//! `mover serve`: config → app wiring → gRPC (+ health, reflection) and HTTP (`/metrics`,
//! `/healthz`, `/readyz`) → jobs → pipeline. Shutdown is ordered: stop accepting, give
//! running transfers a grace period, cancel the rest (they keep what they uploaded and end
//! Interrupted), then exit.

pub mod config;
pub mod grpc;
pub mod jobs;
pub mod prom;
pub mod resolve;

use crate::index_cache::RocksIndex;
use crate::instrumented::Instrumented;
use anyhow::{anyhow, Context, Result};
use config::{DaemonConfig, Listen, RepoEntry};
use jobs::{Jobs, RepoHandle};
use mover_format::local_index::{ChunkIndex, MemIndex};
use mover_format::{InitOptions, RepoError, Repository};
use mover_protocol::v1 as pb;
use prom::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub struct Daemon {
    pub cfg: DaemonConfig,
    pub jobs: Arc<Jobs>,
    pub metrics: Arc<Metrics>,
    repos: tokio::sync::Mutex<HashMap<String, RepoHandle>>,
    ready: AtomicBool,
}

fn password_for(name: &str, e: &RepoEntry) -> Result<crate::open::Password> {
    if let Some(f) = &e.password_file {
        if !f.exists() && e.init_if_missing {
            // The embedded default: a random password kept beside the state, mode 0600.
            use std::os::unix::fs::OpenOptionsExt;
            let pw = hex::encode(rand::random::<[u8; 24]>());
            if let Some(d) = f.parent() {
                std::fs::create_dir_all(d)?;
            }
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(f)?;
            std::io::Write::write_all(&mut file, pw.as_bytes())?;
        }
        return crate::open::read_password_file(f, &format!("password file of repository '{name}'"));
    }
    let var = e.password_env.clone().unwrap_or_else(|| "MOVER_PASSWORD".into());
    crate::open::env_password(&var).ok_or_else(|| anyhow!("repository '{name}': no password (set {var} or password_file)"))
}

impl Daemon {
    /// The open repository `name`, opened (and for the embedded default, created) on first use.
    pub async fn repo(&self, name: &str) -> Result<RepoHandle, Status> {
        let mut g = self.repos.lock().await;
        if let Some(h) = g.get(name) {
            return Ok(h.clone());
        }
        let e = self.cfg.repositories.get(name).ok_or_else(|| Status::not_found(format!("repository '{name}' is not configured on this node")))?;
        let h = self.open_repo(name, e).await.map_err(|err| match err.downcast_ref::<RepoError>() {
            Some(r) => grpc::repo_status(r),
            None => Status::unavailable(format!("repository '{name}': {err:#}")),
        })?;
        g.insert(name.to_string(), h.clone());
        Ok(h)
    }

    async fn open_repo(&self, name: &str, e: &RepoEntry) -> Result<RepoHandle> {
        let inner = crate::open::storage_for(&e.url, e.s3_endpoint.clone(), e.s3_region.clone()).await?;
        let storage: Arc<dyn mover_format::storage::Storage> = Arc::new(Instrumented::new(inner, self.metrics.store_request.clone()));
        let pw = password_for(name, e)?;
        let c = CancellationToken::new();
        let repo = match Repository::open(storage.clone(), &pw, &c).await {
            Ok(r) => r,
            Err(RepoError::NotInitialised { .. }) if e.init_if_missing => {
                tracing::info!("creating repository '{name}' at {}", e.url);
                Repository::init(storage, &pw, InitOptions::default(), &c).await?
            }
            Err(err) => return Err(err.into()),
        };
        let path = RocksIndex::path_for(&self.cfg.cache_dir, &repo.config().id);
        let index: Arc<dyn ChunkIndex> = match RocksIndex::open(&path) {
            Ok(i) => Arc::new(i),
            Err(err) => {
                tracing::warn!("{err:#}; using an in-memory index for repository '{name}'");
                Arc::new(MemIndex::default())
            }
        };
        Ok(RepoHandle { repo, index })
    }
}

async fn http_server(d: Arc<Daemon>, listener: tokio::net::TcpListener, stop: CancellationToken) -> Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m = d.clone();
    let r = d.clone();
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { ([("content-type", "text/plain; version=0.0.4")], m.metrics.render()) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if r.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await.context("HTTP server")
}

/// Runs the daemon until `stop` fires.
pub async fn serve(cfg: DaemonConfig, stop: CancellationToken) -> Result<()> {
    crate::init_tls();
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
    std::fs::create_dir_all(&cfg.cache_dir).with_context(|| format!("creating cache directory {}", cfg.cache_dir.display()))?;
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let jobs_stop = CancellationToken::new();
    let jobs = Arc::new(Jobs::load(&cfg.state_dir, cfg.max_concurrent_transfers, metrics.clone(), jobs_stop.clone(), cfg.bandwidth_limit)?);
    let d = Arc::new(Daemon { cfg: cfg.clone(), jobs: jobs.clone(), metrics, repos: tokio::sync::Mutex::new(HashMap::new()), ready: AtomicBool::new(false) });

    // Repositories that must exist are opened (or created) before we accept requests.
    for (name, e) in &cfg.repositories {
        if e.init_if_missing {
            d.repo(name).await.map_err(|s| anyhow!("repository '{name}': {}", s.message()))?;
        }
    }

    let http = tokio::net::TcpListener::bind(cfg.http_listen).await.with_context(|| format!("binding HTTP listener {}", cfg.http_listen))?;
    let http_task = tokio::spawn(http_server(d.clone(), http, stop.clone()));

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<pb::transfer_service_server::TransferServiceServer<grpc::Api>>().await;
    health.set_serving::<pb::repository_service_server::RepositoryServiceServer<grpc::Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &cfg.tls {
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading TLS file {}", p.display()));
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(read(&t.cert)?, read(&t.key)?))
            .client_ca_root(tonic::transport::Certificate::from_pem(read(&t.client_ca)?));
        builder = builder.tls_config(tls).context("TLS configuration")?;
    }
    let router = builder
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(pb::transfer_service_server::TransferServiceServer::new(grpc::Api { d: d.clone() }))
        .add_service(pb::repository_service_server::RepositoryServiceServer::new(grpc::Api { d: d.clone() }));
    let shutdown = {
        let s = stop.clone();
        async move { s.cancelled().await }
    };
    let grpc_result = match &cfg.listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding gRPC listener {addr}"))?;
            d.ready.store(true, Ordering::Relaxed);
            tracing::info!("serving gRPC on {addr}, HTTP on {}", cfg.http_listen);
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(l), shutdown).await
        }
        Listen::Unix(path) => {
            if path.exists() {
                std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
            }
            let l = tokio::net::UnixListener::bind(path).with_context(|| format!("binding gRPC socket {}", path.display()))?;
            d.ready.store(true, Ordering::Relaxed);
            tracing::info!("serving gRPC on unix:{}, HTTP on {}", path.display(), cfg.http_listen);
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(l), shutdown).await
        }
    };
    d.ready.store(false, Ordering::Relaxed);
    tracing::info!("stopping: waiting up to {} s for running transfers", cfg.shutdown_grace_seconds);
    jobs.shutdown(Duration::from_secs(cfg.shutdown_grace_seconds)).await;
    let _ = http_task.await;
    grpc_result.context("gRPC server")?;
    Ok(())
}
