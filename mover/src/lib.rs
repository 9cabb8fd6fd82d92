//! Mover: the data-mover daemon and CLI for block-level volume backup and restore.
//! See `docs/design.md` for how the parts fit.

pub mod aligned;
pub mod client;
pub mod csi;
pub mod daemon;
pub mod extents;
pub mod index_cache;
pub mod instrumented;
pub mod metrics;
pub mod nbd;
pub mod open;
pub mod pipeline;
pub mod ratelimit;
pub mod s3;
pub mod source;

/// Selects rustls's crypto provider (ring) for the process. The AWS SDK and tonic enable
/// different providers, so rustls cannot choose one by itself. Idempotent.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
pub mod forget;
pub mod gc;
pub mod lock;
pub mod maint;
pub mod timeutil;
