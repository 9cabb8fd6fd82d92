//! Mover as a Velero/OADP data mover (`spec.datamover: mover`; issue 31, in progress).
//! So far: the `velero.io/v2alpha1` types as a data mover reads and writes them
//! ([`types`]), the reconcile rules as pure functions ([`reconcile`]), the Kubernetes API
//! calls ([`cluster`]), and one node's pass over the DataUploads for the steps that need
//! no exposure yet ([`node`]: claim, refuse, cancel, time out). The controller
//! that watches the Kubernetes API, exposes snapshots and runs transfers through
//! `plan` and `mover_engine::ops` — a third front end beside the CLI and the daemon's jobs —
//! comes next (`docs/velero.md`).

pub mod cluster;
pub mod node;
pub mod reconcile;
pub mod types;
