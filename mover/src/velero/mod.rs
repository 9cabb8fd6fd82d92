//! Mover as a Velero/OADP data mover (`spec.datamover: mover`; issue 31, in progress).
//! So far: the `velero.io/v2alpha1` types as a data mover reads and writes them
//! ([`types`]) and the reconcile rules as pure functions ([`reconcile`]). The controller
//! that watches the Kubernetes API, exposes snapshots and runs transfers through
//! `plan` and `mover_engine::ops` — a third front end beside the CLI and the daemon's jobs —
//! comes next (`docs/velero.md`).

pub mod reconcile;
pub mod types;
