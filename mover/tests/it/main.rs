//! End-to-end tests of Mover on real parts: the `mover` binary on real files and loop
//! devices, a real RocksDB index, a real S3 server (SeaweedFS, started by
//! `scripts/test.sh`), real NBD servers, a CSI SnapshotMetadata server over real gRPC, and
//! the daemon over real sockets. One test binary; one module per topic; shared helpers in
//! `common`.

mod common;
use common::*;

mod append_only;
mod bad_input;
mod copy;
mod csi;
mod csi_server;
mod daemon;
mod dr;
mod drill;
mod export;
mod forget;
mod format;
mod gc;
mod groups;
mod grpc_clients;
mod heal;
mod index;
mod kubevirt;
mod maint;
mod nbd;
mod ops;
mod resume;
mod roundtrip;
mod s3;
mod security;
mod trust;
mod velero;
