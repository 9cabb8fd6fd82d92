//! Leases bound every commit (`docs/gc.md`). Its own test binary: it runs with a 3-second
//! lock TTL (`MOVER_LOCK_TTL` is read per process, and every test here wants it short).
//!
//! A backup whose store stalls — its lock refreshes and its commits held back by the
//! fault-injecting wrapper (a test double for a stalled network, in front of a real local
//! directory or the real S3 server) — while gc runs again and again on the same store
//! through an unaffected connection. Without commit deadlines the backup's manifest lands
//! after gc swept the packs it names; with them, the commit is abandoned, nothing a written
//! manifest references is deleted, and everything restores byte-exact.

use mover::plan::backup::{BackupRequest, SourceRef, VolumeRequest};
use mover::plan::Env;
use mover_backends::fault::FaultyStorage;
use mover_engine::maint::gc::{self, GcOptions};
use mover_engine::ops::{self, RepoHandle};
use mover_engine::pipeline::backup::BackupSummary;
use mover_engine::progress::Progress;
use mover_format::crypto::KdfParams;
use mover_format::storage::Storage;
use mover_format::{InitOptions, Repository};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TTL_S: u64 = 3;

fn short_ttl() {
    std::env::set_var("MOVER_LOCK_TTL", TTL_S.to_string());
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut v);
    v
}

async fn backup_file(repo: &Repository, cache: &Path, path: &Path, group: &str, limit: u64) -> mover_engine::Result<BackupSummary> {
    let c = CancellationToken::new();
    let req = BackupRequest {
        group: Some(group.into()),
        volumes: vec![VolumeRequest { name: "disk".into(), source: SourceRef::Path(path.into()), changed_extents: None, csi: None, checkpoint: None }],
        upload_limit: limit,
        ..Default::default()
    };
    let plan = mover::plan::backup::prepare(req, &Env::operator(), repo, &c).await?;
    let h = RepoHandle::local(repo.clone(), cache);
    ops::backup(&h, plan.job, Arc::new(Progress::default()), &c).await
}

/// `mover ARGS` against the repository, through the CLI.
fn cli(url: &str, endpoint: Option<&str>, cache: &Path, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mover"));
    c.args(args).env("MOVER_REPOSITORY", url).env("MOVER_PASSWORD", "pw").env("MOVER_CACHE_DIR", cache).env_remove("MOVER_LOG");
    if let Some(e) = endpoint {
        c.args(["--s3-endpoint", e]);
    }
    c.output().unwrap()
}

fn b3(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap()).to_hex().to_string()
}

async fn scenario(real: Arc<dyn Storage>, url: &str, endpoint: Option<&str>) {
    short_ttl();
    let dir = tempfile::tempdir().unwrap();
    let c = CancellationToken::new();
    let opts = InitOptions { kdf: KdfParams::insecure_for_tests(), ..Default::default() };
    Repository::init(real.clone(), b"pw", opts, &c).await.unwrap();
    let repo_g = Repository::open(real.clone(), b"pw", &c).await.unwrap();
    // A snapshot that must survive everything below.
    let keep = dir.path().join("keep.img");
    std::fs::write(&keep, noise(1, 8 << 20)).unwrap();
    let kept = backup_file(&repo_g, &dir.path().join("cache-k"), &keep, "vms/keep", 0).await.unwrap();

    // Backup B through a store that is about to stall.
    let faulty = Arc::new(FaultyStorage::new(real.clone(), 0, 0.0, 7));
    let repo_b = Repository::open(faulty.clone(), b"pw", &c).await.unwrap();
    let vol = dir.path().join("b.img");
    std::fs::write(&vol, noise(2, 48 << 20)).unwrap();
    let cache_b = dir.path().join("cache-b");
    let (vol2, cache2) = (vol.clone(), cache_b.clone());
    let b = tokio::spawn(async move { backup_file(&repo_b, &cache2, &vol2, "vms/b", 24 << 20).await });
    // Once B holds its lock, its refreshes and every commit stall for longer than the TTL.
    let t0 = Instant::now();
    while mover_engine::lock::list(&repo_g, &c).await.unwrap().iter().all(|l| l.info.kind != mover_format::lock::LockKind::Backup) {
        assert!(t0.elapsed() < Duration::from_secs(10), "B never took its lock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stall = Duration::from_secs(TTL_S * 3);
    for p in ["locks/", "snapshots/", "index/"] {
        faulty.delay_puts(p, stall);
    }
    // gc, again and again, until well after B's stalled writes would have landed.
    let mut swept = 0;
    let until = Instant::now() + stall + Duration::from_secs(2);
    while Instant::now() < until {
        match gc::run(&repo_g, &GcOptions::default(), &c).await {
            Ok(r) => swept += r.packs_deleted,
            Err(e) => assert_eq!(e.kind(), mover_engine::ErrorKind::Conflict, "{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = b.await.unwrap();
    let e = r.expect_err("B's commit must not land after its lease");
    assert_eq!(e.kind(), mover_engine::ErrorKind::Transient, "retryable: {e:#}");
    assert!(format!("{e:#}").contains("lease"), "{e:#}");
    assert!(swept > 0, "gc swept what B had uploaded once B's lease expired");
    faulty.clear_delays();

    // Nothing a written manifest references was deleted.
    let cache = dir.path().join("cache-cli");
    let o = cli(url, endpoint, &cache, &["check", "--read-data", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(
        o.status.success() && report["problems"].as_array().is_some_and(|p| p.is_empty()),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = dir.path().join("out.img");
    let o = cli(url, endpoint, &cache, &["restore", &kept.snapshot_id.to_string(), out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(b3(&out), b3(&keep));
    std::fs::remove_file(&out).unwrap();

    // B again, on a healthy store: it completes and restores byte-exact.
    let repo_b = Repository::open(faulty.clone(), b"pw", &c).await.unwrap();
    let again = backup_file(&repo_b, &cache_b, &vol, "vms/b", 0).await.unwrap();
    let o = cli(url, endpoint, &cache, &["restore", &again.snapshot_id.to_string(), out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(b3(&out), b3(&vol));
    let o = cli(url, endpoint, &cache, &["check", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_delayed_past_the_lease_is_abandoned_and_gc_loses_nothing_local() {
    let dir = tempfile::tempdir().unwrap();
    let url: PathBuf = dir.path().join("repo");
    let real: Arc<dyn Storage> = Arc::new(mover_backends::LocalStorage::new(&url));
    scenario(real, url.to_str().unwrap(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_delayed_past_the_lease_is_abandoned_and_gc_loses_nothing_s3() {
    let endpoint = std::env::var("MOVER_TEST_S3_ENDPOINT")
        .expect("MOVER_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts a SeaweedFS S3 server on 127.0.0.1");
    let bucket = std::env::var("MOVER_TEST_S3_BUCKET").unwrap_or_else(|_| "mover-test".into());
    let url = format!("s3://{bucket}/lease-{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let mut o = mover_backends::S3Options::from_url(&url).unwrap();
    o.endpoint = Some(endpoint.clone());
    let real: Arc<dyn Storage> = Arc::new(mover_backends::S3Storage::new(o).await);
    scenario(real, &url, Some(&endpoint)).await;
}
