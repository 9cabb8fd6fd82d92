//! The daemon's HTTP side: `/metrics` (Prometheus), `/healthz` (alive), `/readyz`
//! (listening, every configured repository open; else 503 saying which and why).

use super::Daemon;
use mover_engine::{Error, ErrorKind, Result};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub async fn serve(d: Arc<Daemon>, listener: tokio::net::TcpListener, stop: CancellationToken) -> Result<()> {
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
                match r.not_ready() {
                    None => (StatusCode::OK, "ready\n".to_string()),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Permanent, "HTTP server", e))
}
