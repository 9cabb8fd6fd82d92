//! An export request (`mover export`, the daemon's `StartExport`), checked before anything
//! is written. The snapshot is resolved and the volume opened by
//! `mover_engine::ops::with_image`, after its read lock is held.

pub use mover_engine::ops::ImageRequest as ExportRequest;
use mover_engine::Result;

/// `SNAPSHOT` or `SNAPSHOT:VOLUME`.
pub fn parse(spec: &str) -> ExportRequest {
    let (snapshot, volume) = match spec.split_once(':') {
        Some((s, v)) => (s.to_string(), Some(v.to_string())),
        None => (spec.to_string(), None),
    };
    ExportRequest { snapshot, volume, ..Default::default() }
}

pub fn prepare(req: ExportRequest) -> Result<ExportRequest> {
    mover_engine::snapshots::check_spec(&req.snapshot)?;
    Ok(req)
}
