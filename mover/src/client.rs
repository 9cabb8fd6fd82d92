//! `mover client`: a gRPC client for people and tests, with TLS flags.

use hyper_util::rt::TokioIo;
use mover_engine::{Error, ErrorKind, Result, ResultExt};
use mover_protocol::v1 as pb;
use std::path::PathBuf;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

#[derive(Debug, Clone, Default)]
pub struct Conn {
    /// `http://HOST:PORT`, `https://HOST:PORT` or `unix:/path`.
    pub server: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

pub async fn connect(c: &Conn) -> Result<Channel> {
    crate::init_tls();
    if let Some(path) = c.server.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        let ch = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
            }))
            .await
            .map_err(|e| cannot_connect(&c.server, &e))?;
        return Ok(ch);
    }
    let mut ep =
        Endpoint::from_shared(c.server.clone()).map_err(|e| Error::with_source(ErrorKind::InvalidRequest, format!("server address '{}'", c.server), e))?;
    if c.server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &c.ca {
            tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca).with_context(|| format!("reading CA {}", ca.display()))?));
        }
        match (&c.cert, &c.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    std::fs::read(cert).with_context(|| format!("reading client certificate {}", cert.display()))?,
                    std::fs::read(key).with_context(|| format!("reading client key {}", key.display()))?,
                ))
            }
            (None, None) => {}
            _ => return Err(Error::invalid("--cert and --key go together")),
        }
        ep = ep.tls_config(tls).map_err(|e| Error::with_source(ErrorKind::InvalidRequest, "TLS configuration", e))?;
    }
    ep.connect().await.map_err(|e| cannot_connect(&c.server, &e))
}

/// "connecting to SERVER: CAUSE", the innermost cause once (tonic's transport error wraps
/// the same I/O error twice).
fn cannot_connect(server: &str, e: &(dyn std::error::Error + 'static)) -> Error {
    let mut cause = e;
    while let Some(s) = cause.source() {
        cause = s;
    }
    Error::new(ErrorKind::Transient, format!("connecting to {server}: {cause}"))
}

pub fn state_name(t: &pb::Transfer) -> &'static str {
    match t.state() {
        pb::TransferState::Queued => "queued",
        pb::TransferState::Running => "running",
        pb::TransferState::Succeeded => "succeeded",
        pb::TransferState::Failed => "failed",
        pb::TransferState::Cancelled => "cancelled",
        pb::TransferState::Interrupted => "interrupted",
        pb::TransferState::Unspecified => "unspecified",
    }
}

pub fn is_terminal(t: &pb::Transfer) -> bool {
    !matches!(t.state(), pb::TransferState::Queued | pb::TransferState::Running | pb::TransferState::Unspecified)
}

/// A transfer as JSON (the proto's fields, enums by name).
pub fn transfer_json(t: &pb::Transfer) -> serde_json::Value {
    let p = t.progress.clone().unwrap_or_default();
    let s = t.stats.clone().unwrap_or_default();
    serde_json::json!({
        "id": t.id, "request_id": t.request_id, "kind": t.kind().as_str_name().trim_start_matches("TRANSFER_KIND_").to_lowercase(),
        "state": state_name(t), "repository": t.repository, "error": t.error, "snapshot_id": t.snapshot_id, "volumes": t.volumes,
        "progress": {"phase": p.phase, "bytes_total": p.bytes_total, "bytes_done": p.bytes_done, "bytes_read": p.bytes_read,
                     "bytes_uploaded": p.bytes_uploaded, "bytes_written": p.bytes_written, "rate_bytes_per_second": p.rate_bytes_per_second, "eta_seconds": p.eta_seconds,
                     "bytes_skipped": p.bytes_skipped, "bytes_reused_parent": p.bytes_reused_parent, "bytes_new": p.bytes_new},
        "stats": {"bytes_total": s.bytes_total, "bytes_read": s.bytes_read, "bytes_zero": s.bytes_zero, "bytes_skipped": s.bytes_skipped,
                  "bytes_reused_parent": s.bytes_reused_parent, "bytes_new": s.bytes_new, "bytes_stored": s.bytes_stored, "chunks_new": s.chunks_new,
                  "chunks_dedup": s.chunks_dedup, "bytes_uploaded": s.bytes_uploaded, "bytes_written": s.bytes_written, "bytes_holes": s.bytes_holes, "io_backend": s.io_backend},
        "created_unix_ms": t.created_unix_ms, "started_unix_ms": t.started_unix_ms, "finished_unix_ms": t.finished_unix_ms,
        "error_kind": t.error_kind, "retryable": t.retryable, "group": t.group, "caller": t.caller,
        "changes": t.changes.iter().map(|c| serde_json::json!({"volume": c.volume, "change_source": c.change_source, "fallback": c.fallback})).collect::<Vec<_>>(),
        "target_repository": t.target_repository,
        "copied": t.copied.iter().map(|c| serde_json::json!({"source_id": c.source_id, "target_id": c.target_id, "group": c.group,
            "incremental_to": c.incremental_to, "bytes_read": c.bytes_read, "bytes_uploaded": c.bytes_uploaded, "copied": c.copied})).collect::<Vec<_>>(),
        "verify": t.verify.as_ref().map(|v| serde_json::json!({"ok": v.ok, "read_data_percent": v.read_data_percent, "problems": v.problems,
            "damaged": v.damaged.iter().map(|d| serde_json::json!({"object": d.object, "problem": d.problem, "snapshots": d.snapshots})).collect::<Vec<_>>(),
            "affected_snapshots": v.affected_snapshots, "packs_read": v.packs_read, "bytes_verified": v.bytes_verified})),
        "drill_volumes": t.drill_volumes.iter().map(|v| serde_json::json!({"name": v.name, "size": v.size, "restore_bytes_per_second": v.restore_bytes_per_second,
            "projected_restore_seconds": v.projected_restore_seconds, "segments_verified": v.segments_verified})).collect::<Vec<_>>(),
    })
}
