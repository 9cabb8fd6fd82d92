//! Mover as a Velero/OADP data mover (`spec.datamover: mover`; issue 31, docs/velero.md):
//! the `velero.io/v2alpha1` types as a data mover reads and writes them ([`types`]), the
//! reconcile rules as pure functions ([`reconcile`]), the Kubernetes API calls
//! ([`cluster`]), one node's pass over the objects for the steps that need no transfer
//! ([`node`]: claim, refuse, cancel, time out), and the controller in the daemon that
//! exposes volumes and runs the transfers as daemon jobs through `plan` and
//! `mover_engine::ops` — a third front end beside the CLI and gRPC ([`controller`]).

pub mod cluster;
pub mod controller;
pub mod node;
pub mod reconcile;
pub mod types;
