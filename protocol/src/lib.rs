//! Mover's gRPC API, package `mover.v1`. Only the daemon's `grpc` module and the client
//! touch these generated types.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("mover.v1");
    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mover_v1_descriptor");
}

/// The Kubernetes SnapshotMetadata service (changed block tracking, KEP-3314).
pub mod snapshotmetadata {
    tonic::include_proto!("snapshotmetadata");
}
