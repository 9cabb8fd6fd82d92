//! Mover's front end: what turns a request — a command line or a gRPC call — into work for
//! the engine (`mover-engine`), and renders the result.
//!
//! - [`plan`] — one validated plan per request, shared by the CLI and the daemon;
//! - [`sources`] — where a backup's bytes and changes come from (files and devices, NBD,
//!   CSI SnapshotMetadata), side by side; [`nbd`] is the protocol client;
//! - [`daemon`] — `mover serve`: config → wiring → gRPC adapter → jobs → engine;
//! - [`client`] — the daemon's gRPC client, for `mover client` and tests;
//! - [`repo`], [`secrets`] — opening repositories and reading credentials.
//!
//! The CLI itself (one file per command) is in the binary, `src/cli/`.
#![forbid(unsafe_code)]

pub mod client;
pub mod daemon;
pub mod mount;
pub mod nbd;
pub mod plan;
pub mod repo;
pub mod secrets;
pub mod socket;
pub mod sources;
pub mod velero;

/// Replaces `path` with `bytes` durably: a temporary file beside it (`.NAME.tmp`) with
/// permissions `mode`, synced, renamed over it — a crash leaves the old file or the new
/// one, never half of one.
pub fn replace_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    // Exactly `mode`, whatever the umask.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Selects rustls's crypto provider (ring) for the process. The AWS SDK and tonic enable
/// different providers, so rustls cannot choose one by itself. Idempotent.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
