//! The NBD protocol (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>):
//! Mover's own client, for reading exports (QEMU's dirty bitmaps for KubeVirt incremental
//! backups; this kernel has no NBD block device). [`proto`] holds the wire constants.

pub mod client;
pub mod proto;
pub mod server;

pub use client::{NbdClient, NbdOptions, NbdUri, Target};
