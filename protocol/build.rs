fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("mover_v1_descriptor.bin")).compile_protos(&["proto/mover/v1/mover.proto"], &["proto"])?;
    // The Kubernetes CSI SnapshotMetadata service (KEP-3314): Mover is its client; the
    // server side is generated too, for the test server.
    tonic_prost_build::configure().compile_protos(&["proto/snapshotmetadata/schema.proto"], &["proto"])?;
    Ok(())
}
