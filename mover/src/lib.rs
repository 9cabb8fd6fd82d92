//! Mover's front end: what turns a request — a command line or a gRPC call — into work for
//! the engine (`mover-engine`), and renders the result.
//!
//! - [`plan`] — one validated plan per request, shared by the CLI and the daemon;
//! - [`sources`] — where a backup's bytes and changes come from (files and devices, NBD,
//!   CSI SnapshotMetadata), side by side; [`nbd`] is the protocol client;
//! - [`daemon`] — `mover serve`: config → wiring → gRPC adapter → jobs → engine;
//! - [`client`] — the daemon's gRPC client, for `mover client` and tests;
//! - [`repo`], [`secrets`] — opening repositories and reading credentials.
//!
//! The CLI itself (one file per command) is in the binary, `src/cli/`.
#![forbid(unsafe_code)]

pub mod client;
pub mod daemon;
pub mod mount;
pub mod nbd;
pub mod plan;
pub mod repo;
pub mod secrets;
pub mod socket;
pub mod sources;
pub mod velero;

/// Replaces `path` with `bytes` durably: a temporary file beside it with permissions
/// `mode`, synced, renamed over it — a crash leaves the old file or the new one, never half
/// of one. The temporary name is unique to the call (`.NAME.PID.N.tmp`): two replacements
/// of one file at once each rename their own (a shared name made the second fail with
/// ENOENT, seen in the fleet benchmark); the last rename wins.
pub fn replace_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    // Exactly `mode`, whatever the umask.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Selects rustls's crypto provider (ring) for the process. The AWS SDK and tonic enable
/// different providers, so rustls cannot choose one by itself. Idempotent.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    /// Replacements of one file from several threads at once all succeed, the file holds
    /// one whole payload, and no temporary file is left (a shared temporary name failed
    /// the second rename with ENOENT).
    #[test]
    fn concurrent_replacements_of_one_file_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last-success.json");
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        super::replace_file(&path, &[t; 4096], 0o600).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let got = std::fs::read(&path).unwrap();
        assert!(got.len() == 4096 && got.iter().all(|b| *b == got[0]), "one whole payload");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("last-success.json")]);
    }
}
