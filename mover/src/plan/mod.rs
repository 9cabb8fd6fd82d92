//! One plan per request. A backup or restore request — from the CLI or from gRPC — is
//! turned here, once, into a validated plan: names checked, sources and targets resolved
//! and opened (the plan carries the descriptors the checks were made on), sizes known,
//! parent and snapshot resolved. The CLI and the daemon's gRPC adapter only build requests
//! and render results; every rule lives in this module (or in the engine it calls).

pub mod backup;
pub mod export;
pub mod restore;

use crate::nbd::NbdOptions;
use crate::sources::csi::CsiService;
use crate::sources::file::PathPolicy;

/// What a plan may use on this node: how paths resolve, which NBD endpoints a request may
/// name, and the CSI SnapshotMetadata service. The CLI trusts its operator; the daemon
/// confines requests (`docs/security.md`).
#[derive(Debug, Clone)]
pub struct Env {
    pub paths: PathPolicy,
    pub nbd: NbdPolicy,
    pub nbd_options: NbdOptions,
    /// The CSI SnapshotMetadata services, by CSI driver (`None`: the one `[csi]` service,
    /// for a request that names no driver). Empty: CSI changed-block tracking is not
    /// configured here.
    pub csi: Vec<(Option<String>, CsiService)>,
    /// `host:port` of the KubeVirt export servers a request may name (a `*` in the host
    /// stands for any run of characters but `.`); `None`: any (the CLI).
    pub kubevirt_hosts: Option<Vec<String>>,
    /// What a backup request leaves unset.
    pub backup: BackupDefaults,
}

/// The node's defaults for what a backup request may leave unset.
#[derive(Debug, Clone, Copy)]
pub struct BackupDefaults {
    /// Segments a change source called unchanged that are read and compared anyway.
    pub verify_sample: usize,
    /// Every Nth backup that trusted a change source reads everything (0: never).
    pub compare_every: u32,
    /// How long a KubeVirt export answering 503 (virt-launcher's tunnel not connected) or
    /// failing to connect is retried, with backoff.
    pub kubevirt_retry: std::time::Duration,
}

impl Default for BackupDefaults {
    fn default() -> Self {
        Self { verify_sample: mover_engine::pipeline::backup::DEFAULT_VERIFY_SAMPLE, compare_every: 0, kubevirt_retry: std::time::Duration::from_secs(600) }
    }
}

/// Which NBD endpoints a request may name.
#[derive(Debug, Clone)]
pub enum NbdPolicy {
    /// Any (the CLI).
    Any,
    /// Unix sockets resolved beneath the allowed roots like any other path (no symlinks),
    /// and TCP endpoints listed exactly (`host:port`).
    Confined { tcp: Vec<String> },
}

/// The largest metadata blob a snapshot may carry (the VM's objects as YAML fit easily).
pub const MAX_METADATA_BYTES: usize = 64 << 20;

/// `K=V` → `(K, V)`, both non-empty; `what` names the flag or field.
pub fn split_kv<'a>(s: &'a str, what: &str) -> mover_engine::Result<(&'a str, &'a str)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
        _ => Err(mover_engine::Error::invalid(format!("{what} '{s}' is not of the form NAME=VALUE"))),
    }
}
