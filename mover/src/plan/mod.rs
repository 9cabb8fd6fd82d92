//! One plan per request. Every request kind — backup, restore, copy, verify, drill,
//! export — from the CLI, from gRPC or from any later front end is turned here, once, into
//! a validated plan: names checked, sources and targets resolved and opened (the plan
//! carries the descriptors the checks were made on), sizes known, parent and snapshot
//! resolved. The plan is then run by one operation of `mover_engine::ops`, which owns the
//! lock and the read view. Front ends only build requests and render or record results;
//! every rule lives in this module or in the engine (`docs/design.md`, "Where each rule
//! lives").

pub mod backup;
pub mod copy;
pub mod drill;
pub mod export;
pub mod restore;
pub mod verify;

use mover_engine::ratelimit::RateLimiter;
use std::sync::Arc;

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
    /// The node's upload limit, shared by every transfer that uploads (`bandwidth_limit`).
    pub upload_limit: Option<Arc<RateLimiter>>,
}

impl Env {
    /// The operator's environment (the CLI): paths as given, any NBD endpoint, no CSI
    /// service, no node-wide upload limit.
    pub fn operator() -> Self {
        Self {
            paths: PathPolicy::Operator,
            nbd: NbdPolicy::Any,
            nbd_options: NbdOptions::default(),
            csi: Vec::new(),
            kubevirt_hosts: None,
            backup: BackupDefaults::default(),
            upload_limit: None,
        }
    }

    /// The rate limiters an upload passes: the node's, and the request's own
    /// `bytes_per_s` (0: none).
    pub fn limiters(&self, bytes_per_s: u64) -> Vec<Arc<RateLimiter>> {
        self.upload_limit.iter().cloned().chain((bytes_per_s > 0).then(|| Arc::new(RateLimiter::new(bytes_per_s)))).collect()
    }
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
