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

/// Selects rustls's crypto provider (ring) for the process. The AWS SDK and tonic enable
/// different providers, so rustls cannot choose one by itself. Idempotent.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
