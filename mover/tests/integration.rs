//! End-to-end tests of the `mover` binary on real files, real loop devices, a real
//! RocksDB index and a real S3 server (SeaweedFS started by `scripts/test.sh`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    dir: tempfile::TempDir,
    repo: String,
    extra: Vec<String>,
}

impl Env {
    fn new() -> Self {
        let e = Self::new_uninit();
        e.ok(&["init"]);
        e
    }
    /// A local repository path, not initialised yet.
    fn new_uninit() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo").display().to_string();
        Env { dir, repo, extra: vec![] }
    }
    fn s3(prefix: &str) -> Self {
        let (endpoint, bucket) = s3_env();
        let dir = tempfile::tempdir().unwrap();
        let repo = format!("s3://{bucket}/{prefix}-{}", rand_suffix());
        let e = Env { dir, repo, extra: vec!["--s3-endpoint".into(), endpoint] };
        e.ok(&["init"]);
        e
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mover"));
        c.args(args)
            .args(&self.extra)
            .env("MOVER_REPOSITORY", &self.repo)
            .env("MOVER_PASSWORD", "test-password")
            .env("MOVER_CACHE_DIR", self.dir.path().join("cache"))
            .env("MOVER_INSECURE_TEST_KDF", "1")
            .env_remove("MOVER_LOG");
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "mover {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
    /// Runs a command that must fail; returns its stderr.
    fn fail(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "mover {args:?} should have failed");
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(err.starts_with("error: "), "first line names the error: {err}");
        err
    }
    fn snapshot_count(&self) -> usize {
        self.json(&["snapshots"]).as_array().unwrap().len()
    }
}

fn rand_suffix() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

fn s3_env() -> (String, String) {
    let endpoint = std::env::var("MOVER_TEST_S3_ENDPOINT")
        .expect("MOVER_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts a SeaweedFS S3 server on 127.0.0.1");
    let bucket = std::env::var("MOVER_TEST_S3_BUCKET").unwrap_or_else(|_| "mover-test".into());
    (endpoint, bucket)
}

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut v);
    v
}

/// A sparse volume image: random regions, compressible text, duplicated blocks and holes.
fn make_volume(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut off = 0u64;
    let mut i = 0u64;
    while off < size {
        let len = (((seed + i) * 2_654_435_761) % (3 << 20) + 65_536).min(size - off);
        match i % 4 {
            0 => f.write_all_at(&noise(seed * 1000 + i, len as usize), off).unwrap(),
            1 => f.write_all_at(&b"the quick brown fox jumps over the lazy dog\n".repeat(len as usize / 44 + 1)[..len as usize], off).unwrap(),
            2 => {}                                                        // hole
            _ => f.write_all_at(&noise(seed, len as usize), off).unwrap(), // repeats: dedup
        }
        off += len;
        i += 1;
    }
}

/// Overwrites ~`count` scattered 64 KiB regions; returns them as extents.
fn modify(path: &Path, count: u64, seed: u64) -> Vec<(u64, u64)> {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut ext = Vec::new();
    for k in 0..count {
        let off = ((seed * 7919 + k * 104_729) * 4096 * 37) % (size - 65_536) / 4096 * 4096;
        f.write_all_at(&noise(seed * 77 + k, 65_536), off).unwrap();
        ext.push((off, 65_536));
    }
    f.sync_all().unwrap();
    ext
}

fn hash_prefix(path: &Path, len: u64) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = f.read(&mut buf[..(left.min(1 << 20)) as usize]).unwrap();
        assert!(n > 0, "{} shorter than {len}", path.display());
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize().to_hex().to_string()
}

fn hash(path: &Path) -> String {
    hash_prefix(path, std::fs::metadata(path).unwrap().len())
}

fn write_extents(path: &Path, ext: &[(u64, u64)]) {
    let mut f = std::fs::File::create(path).unwrap();
    for (o, l) in ext {
        writeln!(f, "{o} {l}").unwrap();
    }
}

/// A loop device over a new image file; detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(img: &Path, size: u64) -> Loop {
        if !img.exists() {
            std::fs::File::create(img).unwrap().set_len(size).unwrap();
        }
        let o = Command::new("losetup").args(["--direct-io=on", "-f", "--show"]).arg(img).output().expect("losetup (util-linux) is needed");
        assert!(o.status.success(), "losetup failed (root and loop devices are needed): {}", String::from_utf8_lossy(&o.stderr));
        Loop { dev: PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()) }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

mod roundtrip {
    use super::*;

    #[test]
    fn file_backup_restore_is_byte_exact_and_sparse() {
        let e = Env::new();
        let src = e.path("disk.img");
        make_volume(&src, 96 << 20, 1);
        let s = e.json(&["backup", src.to_str().unwrap()]);
        assert_eq!(s["bytes_total"], 96 << 20);
        assert!(s["bytes_zero"].as_u64().unwrap() > 0);
        assert!(s["chunks_dedup"].as_u64().unwrap() > 0, "repeated regions dedup: {s}");
        assert!(["io_uring", "pread"].contains(&s["io_backend"].as_str().unwrap()));
        for k in ["snapshot_id", "bytes_read", "bytes_reused_parent", "bytes_new", "bytes_stored", "chunks_new", "duration_s"] {
            assert!(s.get(k).is_some(), "summary lacks {k}");
        }
        let out = e.path("out.img");
        let r = e.json(&["restore", s["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(hash(&src), hash(&out));
        assert_eq!(r["bytes_written"].as_u64().unwrap() + r["bytes_holes"].as_u64().unwrap(), 96 << 20);
        assert_eq!(r["io_backend"], "io_uring+direct", "restore writes through io_uring with O_DIRECT on this kernel and filesystem");
        // Holes stay holes on a new file.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(allocated < (96 << 20) - r["bytes_holes"].as_u64().unwrap() + (8 << 20), "restored file is not sparse: {allocated}");
    }

    #[test]
    fn odd_sized_volume_restores_exactly_with_direct_writes_and_a_buffered_tail() {
        let e = Env::new();
        let src = e.path("odd.img");
        make_volume(&src, (9 << 20) + 1234, 17);
        let s = e.json(&["backup", "--volume", &format!("odd={}", src.display())]);
        let id = s["snapshot_id"].as_str().unwrap();
        for (name, pre) in [("fresh.img", None), ("dirty.img", Some(0xa5u8))] {
            let t = e.path(name);
            if let Some(b) = pre {
                std::fs::write(&t, vec![b; 12 << 20]).unwrap();
            }
            let r = e.json(&["restore", id, t.to_str().unwrap()]);
            assert_eq!(hash(&t), hash(&src), "{name}: {r}");
        }
    }

    #[test]
    fn pread_fallback_path_roundtrips() {
        let e = Env::new();
        let src = e.path("disk.img");
        make_volume(&src, 24 << 20, 2);
        let s = e.json(&["backup", src.to_str().unwrap(), "--io", "pread"]);
        assert_eq!(s["io_backend"], "pread");
        let out = e.path("out.img");
        e.ok(&["restore", "latest", out.to_str().unwrap()]);
        assert_eq!(hash(&src), hash(&out));
    }

    #[test]
    fn loop_devices_roundtrip_and_holes_are_zeroed_on_a_dirty_target() {
        let e = Env::new();
        let img = e.path("src.img");
        make_volume(&img, 64 << 20, 3);
        let src = Loop::new(&img, 0);
        let s = e.json(&["backup", src.dev.to_str().unwrap()]);
        assert_eq!(s["io_backend"], "io_uring", "io_uring is available on this kernel");
        // A target full of garbage: holes must come back as zeros.
        let timg = e.path("dst.img");
        std::fs::write(&timg, noise(99, 80 << 20)).unwrap();
        let dst = Loop::new(&timg, 0);
        e.ok(&["restore", s["snapshot_id"].as_str().unwrap(), dst.dev.to_str().unwrap()]);
        assert_eq!(hash(&img), hash_prefix(&dst.dev, 64 << 20));
    }

    #[test]
    fn incremental_chain_with_and_without_extents() {
        let e = Env::new();
        let src = e.path("disk.img");
        make_volume(&src, 64 << 20, 4);
        let full = e.json(&["backup", src.to_str().unwrap()]);
        let h0 = hash(&src);

        // Incremental 1: no extents, parent digests.
        modify(&src, 6, 1);
        let h1 = hash(&src);
        let inc1 = e.json(&["backup", src.to_str().unwrap(), "--parent", "latest"]);
        assert_eq!(inc1["parent"], full["snapshot_id"]);
        assert_eq!(inc1["volumes"][0]["change_source"], "parent-digest");
        assert!(inc1["bytes_reused_parent"].as_u64().unwrap() > 32 << 20, "{inc1}");
        assert!(inc1["bytes_new"].as_u64().unwrap() < 12 << 20, "{inc1}");

        // Incremental 2: with changed extents; the same data backed up without extents
        // must restore identically.
        let ext = modify(&src, 5, 2);
        let h2 = hash(&src);
        let ef = e.path("ext.txt");
        write_extents(&ef, &ext);
        let inc2 = e.json(&["backup", src.to_str().unwrap(), "--parent", inc1["snapshot_id"].as_str().unwrap(), "--changed-extents", ef.to_str().unwrap()]);
        assert_eq!(inc2["volumes"][0]["change_source"], "extents");
        assert!(inc2["bytes_skipped"].as_u64().unwrap() > 32 << 20, "{inc2}");
        assert!(inc2["bytes_read"].as_u64().unwrap() <= 5 * 2 * (4 << 20), "{inc2}");
        let inc2b = e.json(&["backup", src.to_str().unwrap(), "--parent", inc1["snapshot_id"].as_str().unwrap()]);

        for (snap, h) in [(&full, &h0), (&inc1, &h1), (&inc2, &h2), (&inc2b, &h2)] {
            let out = e.path(&format!("r-{}.img", &snap["snapshot_id"].as_str().unwrap()[..8]));
            e.ok(&["restore", snap["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
            assert_eq!(&hash(&out), h, "restore of {} differs", snap["snapshot_id"]);
        }
        // The manifest records the change source and the statistics.
        let shown = e.json(&["show", inc2["snapshot_id"].as_str().unwrap()]);
        assert_eq!(shown["volumes"][0]["change_source"], "extents");
        assert_eq!(shown["volumes"][0]["stats"]["bytes_skipped"], inc2["bytes_skipped"]);
    }

    #[test]
    fn multi_volume_snapshot_with_metadata() {
        let e = Env::new();
        let (a, b) = (e.path("root.img"), e.path("data.img"));
        make_volume(&a, 20 << 20, 5);
        make_volume(&b, 12 << 20, 6);
        let yaml = e.path("vm.yaml");
        std::fs::write(&yaml, "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: web-1\n").unwrap();
        let s = e.json(&[
            "backup",
            "--volume",
            &format!("root={}", a.display()),
            "--volume",
            &format!("data={}", b.display()),
            "--metadata",
            &format!("vm.yaml={}", yaml.display()),
            "--tag",
            "vm=web-1",
        ]);
        let id = s["snapshot_id"].as_str().unwrap();
        let shown = e.json(&["show", id]);
        assert_eq!(shown["volumes"].as_array().unwrap().len(), 2);
        assert_eq!(shown["metadata"][0]["name"], "vm.yaml");
        assert_eq!(shown["tags"]["vm"], "web-1");
        // One volume by name, then all into a directory.
        let one = e.path("data-only.img");
        e.ok(&["restore", &format!("{id}:data"), one.to_str().unwrap()]);
        assert_eq!(hash(&b), hash(&one));
        let dir = e.path("all");
        std::fs::create_dir(&dir).unwrap();
        e.ok(&["restore", id, dir.to_str().unwrap()]);
        assert_eq!(hash(&a), hash(&dir.join("root.img")));
        assert_eq!(hash(&b), hash(&dir.join("data.img")));
    }
}

mod resume {
    use super::*;

    #[test]
    fn a_killed_backup_keeps_its_uploads_and_the_rerun_skips_them() {
        let dir = tempfile::tempdir().unwrap();
        let e = Env { repo: dir.path().join("repo").display().to_string(), dir, extra: vec![] };
        e.ok(&["init", "--pack-size-mib", "1"]);
        let src = e.path("big.img");
        std::fs::write(&src, noise(42, 512 << 20)).unwrap();
        let mut child = e.cmd(&["backup", src.to_str().unwrap(), "--json", "--uploads", "1", "--workers", "1"]).spawn().unwrap();
        let index_dir = Path::new(&e.repo).join("index");
        let t0 = std::time::Instant::now();
        loop {
            let n = std::fs::read_dir(&index_dir).map(|d| d.count()).unwrap_or(0);
            if n >= 10 {
                break;
            }
            assert!(t0.elapsed().as_secs() < 120, "no checkpoints appeared");
            assert!(child.try_wait().unwrap().is_none(), "backup finished before it could be killed; make the volume larger");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_eq!(e.snapshot_count(), 0, "a killed backup writes no snapshot");
        let s = e.json(&["backup", src.to_str().unwrap()]);
        let dedup = s["chunks_dedup"].as_u64().unwrap();
        let new = s["chunks_new"].as_u64().unwrap();
        // 10 checkpoints of 4 packs of 1 MiB: at least ~40 MiB were kept and are not
        // uploaded again.
        assert!(dedup >= 200, "rerun skipped only {dedup} chunks: {s}");
        assert!(s["bytes_new"].as_u64().unwrap() <= (512 - 38) << 20, "{s}");
        eprintln!("resume: rerun found {dedup} chunks already stored, uploaded {new} new chunks");
        let out = e.path("out.img");
        e.ok(&["restore", "latest", out.to_str().unwrap()]);
        assert_eq!(hash(&src), hash(&out));
    }
}

mod index {
    use super::*;

    #[test]
    fn deleted_cache_and_deleted_index_segments_are_rebuilt() {
        let e = Env::new();
        let src = e.path("disk.img");
        make_volume(&src, 32 << 20, 7);
        let s = e.json(&["backup", src.to_str().unwrap()]);
        std::fs::remove_dir_all(e.path("cache")).unwrap();
        let out = e.path("a.img");
        e.ok(&["restore", "latest", out.to_str().unwrap()]);
        assert_eq!(hash(&src), hash(&out));

        // Lose every index segment: restore fails, naming a chunk; rebuild from packs fixes it.
        for f in std::fs::read_dir(Path::new(&e.repo).join("index")).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        std::fs::remove_dir_all(e.path("cache")).unwrap();
        let err = e.fail(&["restore", "latest", e.path("b.img").to_str().unwrap()]);
        assert!(err.contains("not in the index"), "{err}");
        let r = e.json(&["index", "rebuild"]);
        assert!(r["packs_from_trailers"].as_u64().unwrap() >= 1, "{r}");
        assert!(r["segments_written"].as_array().unwrap().len() >= 1);
        std::fs::remove_dir_all(e.path("cache")).unwrap();
        let out = e.path("c.img");
        e.ok(&["restore", s["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(hash(&src), hash(&out));
    }
}

mod bad_input {
    use super::*;

    #[test]
    fn missing_source_and_non_volume_source() {
        let e = Env::new();
        let err = e.fail(&["backup", "/nonexistent/disk.img"]);
        assert!(err.contains("/nonexistent/disk.img"), "{err}");
        let err = e.fail(&["backup", e.dir.path().to_str().unwrap()]);
        assert!(err.contains("neither a block device nor a regular file"), "{err}");
        assert_eq!(e.snapshot_count(), 0);
    }

    #[test]
    fn wrong_password_and_uninitialised_repository() {
        let e = Env::new();
        let o = e.cmd(&["snapshots"]).env("MOVER_PASSWORD", "wrong").output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("wrong password for repository") && err.contains(&e.repo), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let o = e.cmd(&["snapshots"]).env("MOVER_REPOSITORY", empty.path()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("is not initialised"), "{err}");
    }

    #[test]
    fn target_too_small_is_refused_before_writing() {
        let e = Env::new();
        let src = e.path("disk.img");
        make_volume(&src, 40 << 20, 8);
        e.ok(&["backup", src.to_str().unwrap()]);
        let timg = e.path("small.img");
        std::fs::write(&timg, noise(5, 32 << 20)).unwrap();
        let before = hash(&timg);
        let dev = Loop::new(&timg, 0);
        let err = e.fail(&["restore", "latest", dev.dev.to_str().unwrap()]);
        assert!(err.contains("smaller than volume 'disk'") && err.contains(dev.dev.to_str().unwrap()), "{err}");
        drop(dev);
        assert_eq!(hash(&timg), before, "nothing was written");
    }

    #[test]
    fn parent_without_the_volume_and_malformed_extents() {
        let e = Env::new();
        let src = e.path("disk.img");
        make_volume(&src, 8 << 20, 9);
        let other = e.json(&["backup", "--volume", &format!("other={}", src.display())]);
        let err = e.fail(&["backup", src.to_str().unwrap(), "--parent", other["snapshot_id"].as_str().unwrap()]);
        assert!(err.contains("has no volume named 'disk'"), "{err}");
        let ef = e.path("bad.txt");
        std::fs::write(&ef, "0 4096\nnot numbers\n").unwrap();
        let err = e.fail(&["backup", src.to_str().unwrap(), "--parent", "latest", "--changed-extents", ef.to_str().unwrap()]);
        assert!(err.contains("bad.txt line 2"), "{err}");
        std::fs::write(&ef, "0 999999999999\n").unwrap();
        let err = e.fail(&["backup", "--volume", &format!("other={}", src.display()), "--parent", "latest", "--changed-extents", ef.to_str().unwrap()]);
        assert!(err.contains("outside the volume"), "{err}");
        assert_eq!(e.snapshot_count(), 1);
    }

    #[test]
    fn corrupt_chunk_stops_restore_naming_everything() {
        let e = Env::new();
        let src = e.path("disk.img");
        std::fs::write(&src, noise(11, 6 << 20)).unwrap();
        let s = e.json(&["backup", src.to_str().unwrap()]);
        // Flip one byte in the middle of the (single) data pack.
        let mut packs = Vec::new();
        for d in std::fs::read_dir(Path::new(&e.repo).join("packs")).unwrap() {
            for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                packs.push((std::fs::metadata(&p).unwrap().len(), p));
            }
        }
        packs.sort();
        let (len, big) = packs.last().unwrap().clone();
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&big).unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&[b[0] ^ 0x40]).unwrap();
        drop(f);
        let out = e.path("out.img");
        let err = e.fail(&["restore", s["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
        let pack_id = big.file_name().unwrap().to_str().unwrap();
        assert!(err.contains("volume 'disk'") && err.contains(s["snapshot_id"].as_str().unwrap()) && err.contains("at offset"), "{err}");
        assert!(err.contains(pack_id) && err.contains("chunk ") && err.contains("authentication failed"), "{err}");
    }
}

mod s3 {
    use super::*;
    use mover::s3::{S3Options, S3Storage};
    use mover_format::storage::{conformance, Storage};
    use std::sync::Arc;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
    }

    #[test]
    fn conformance_against_a_real_server() {
        let (endpoint, bucket) = s3_env();
        rt().block_on(async {
            let mut o = S3Options::from_url(&format!("s3://{bucket}/conf-{}", rand_suffix())).unwrap();
            o.endpoint = Some(endpoint.clone());
            let s: Arc<dyn Storage> = Arc::new(S3Storage::new(o).await);
            conformance::run_all(s, "c/").await.unwrap();
            // Multipart: a small threshold forces it; create-only holds for it too.
            let mut o = S3Options::from_url(&format!("s3://{bucket}/mp-{}", rand_suffix())).unwrap();
            o.endpoint = Some(endpoint);
            o.multipart_threshold = 6 << 20;
            o.part_size = 5 << 20;
            let s = S3Storage::new(o).await;
            let c = tokio_util::sync::CancellationToken::new();
            let data = bytes::Bytes::from(noise(3, 13 << 20));
            assert_eq!(s.put("big", data.clone(), &c).await.unwrap(), mover_format::storage::PutOutcome::Created);
            assert_eq!(s.get("big", &c).await.unwrap(), data);
            assert_eq!(s.put("big", bytes::Bytes::from(noise(4, 13 << 20)), &c).await.unwrap(), mover_format::storage::PutOutcome::Existed);
            assert_eq!(s.get("big", &c).await.unwrap(), data);
        });
    }

    #[test]
    fn backup_restore_through_s3() {
        let e = Env::s3("rt");
        let src = e.path("disk.img");
        make_volume(&src, 48 << 20, 12);
        let s = e.json(&["backup", src.to_str().unwrap()]);
        modify(&src, 3, 3);
        let inc = e.json(&["backup", src.to_str().unwrap(), "--parent", "latest"]);
        assert!(inc["bytes_reused_parent"].as_u64().unwrap() > 0);
        let out = e.path("out.img");
        e.ok(&["restore", inc["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(hash(&src), hash(&out));
        assert_ne!(s["snapshot_id"], inc["snapshot_id"]);
    }

    #[test]
    fn unreachable_store_fails_quickly_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = Env { repo: "s3://nobucket/x".into(), dir, extra: vec!["--s3-endpoint".into(), "http://127.0.0.1:9".into()] };
        let t = std::time::Instant::now();
        let err = e.fail(&["snapshots"]);
        assert!(err.contains("s3://nobucket/x") && err.contains("unreachable"), "{err}");
        assert!(t.elapsed().as_secs() < 60);
    }
}

#[path = "daemon/mod.rs"]
mod daemon;

/// `check` and `stats` on healthy and broken repositories.
mod maint {
    use super::*;

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    out.extend(files_under(&p))
                } else {
                    out.push(p)
                }
            }
        }
        out.sort();
        out
    }

    /// A repository with two snapshots of one volume (the second after a small change).
    fn setup() -> (Env, PathBuf) {
        let e = Env::new();
        let src = e.path("disk.img");
        std::fs::write(&src, noise(61, 20 << 20)).unwrap();
        e.ok(&["backup", src.to_str().unwrap()]);
        modify(&src, 2, 9);
        e.ok(&["backup", src.to_str().unwrap(), "--parent", "latest"]);
        (e, src)
    }

    fn largest_pack(e: &Env) -> PathBuf {
        let mut packs = files_under(&Path::new(&e.repo).join("packs"));
        packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
        packs.pop().unwrap()
    }

    fn problems(e: &Env, args: &[&str]) -> Vec<String> {
        let mut a = vec!["check", "--json"];
        a.extend_from_slice(args);
        let o = e.run(&a);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let p: Vec<String> = v["problems"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
        assert_eq!(o.status.success(), p.is_empty(), "exit status must say whether there were problems");
        p
    }

    #[test]
    fn healthy_repository_checks_clean_and_stats_add_up() {
        let (e, _src) = setup();
        assert!(problems(&e, &[]).is_empty());
        assert!(problems(&e, &["--read-data"]).is_empty());
        let r = e.json(&["check", "--read-data"]);
        assert!(r["blobs_verified"].as_u64().unwrap() > 100);
        assert!(problems(&e, &["--read-data-subset", "50%"]).is_empty());
        let s = e.json(&["stats"]);
        assert_eq!(s["snapshots"], 2);
        assert_eq!(s["logical_bytes"], 40 << 20);
        let dedup = s["dedup_ratio"].as_f64().unwrap();
        assert!(dedup > 1.7 && dedup < 2.01, "two nearly equal snapshots dedup about 2x: {s}");
        let unique: Vec<u64> = s["per_snapshot"].as_array().unwrap().iter().map(|p| p["unique_bytes"].as_u64().unwrap()).collect();
        assert!(unique.iter().all(|&u| u > 0 && u < 4 << 20), "only the changed chunks are unique: {unique:?}");
    }

    #[test]
    fn flipped_bit_in_a_pack_is_found_by_read_data() {
        let (e, _src) = setup();
        let pack = largest_pack(&e);
        let mut b = std::fs::read(&pack).unwrap();
        let n = b.len();
        b[n / 3] ^= 0x08;
        std::fs::write(&pack, b).unwrap();
        assert!(problems(&e, &[]).is_empty(), "structure is intact");
        let p = problems(&e, &["--read-data"]);
        let id = pack.file_name().unwrap().to_str().unwrap();
        assert!(p.iter().any(|x| x.contains(&format!("pack {id}")) && x.contains("does not hash to its name")), "{p:?}");
        assert!(p.iter().any(|x| x.contains(id) && x.contains("chunk ") && x.contains("authentication failed")), "{p:?}");
    }

    #[test]
    fn missing_and_truncated_packs() {
        let (e, _src) = setup();
        let pack = largest_pack(&e);
        let id = pack.file_name().unwrap().to_str().unwrap().to_string();
        let b = std::fs::read(&pack).unwrap();
        std::fs::write(&pack, &b[..b.len() / 2]).unwrap();
        let p = problems(&e, &[]);
        assert!(p.iter().any(|x| x.contains(&format!("in pack {id}")) && x.contains("but the pack holds")), "{p:?}");
        std::fs::remove_file(&pack).unwrap();
        let p = problems(&e, &[]);
        assert!(p.iter().any(|x| x.contains(&format!("pack {id}")) && x.contains("missing")), "{p:?}");
    }

    #[test]
    fn flipped_bits_in_index_segment_and_manifest() {
        let (e, _src) = setup();
        let seg = files_under(&Path::new(&e.repo).join("index")).pop().unwrap();
        let mut b = std::fs::read(&seg).unwrap();
        b[40] ^= 1;
        std::fs::write(&seg, b).unwrap();
        let sid = seg.file_name().unwrap().to_str().unwrap().to_string();
        let p = problems(&e, &[]);
        assert!(p.iter().any(|x| x.contains(&format!("index/{sid}")) && x.contains("does not hash to its name")), "{p:?}");
        // index rebuild repairs it from pack trailers.
        e.ok(&["index", "rebuild"]);
        std::fs::remove_file(&seg).unwrap();
        assert!(problems(&e, &["--read-data"]).is_empty(), "after rebuild and removing the damaged segment");

        let snap = files_under(&Path::new(&e.repo).join("snapshots")).pop().unwrap();
        let mut b = std::fs::read(&snap).unwrap();
        b[30] ^= 1;
        std::fs::write(&snap, b).unwrap();
        let name = snap.file_name().unwrap().to_str().unwrap().to_string();
        let p = problems(&e, &[]);
        assert!(p.iter().any(|x| x.contains(&format!("snapshots/{name}"))), "{p:?}");
    }

    #[test]
    fn missing_index_segments_are_reported_and_rebuilt() {
        let (e, src) = setup();
        for f in files_under(&Path::new(&e.repo).join("index")) {
            std::fs::remove_file(f).unwrap();
        }
        let p = problems(&e, &[]);
        assert!(!p.is_empty() && p.iter().all(|x| x.contains("is not in any index segment")), "{p:?}");
        e.ok(&["index", "rebuild"]);
        assert!(problems(&e, &["--read-data"]).is_empty());
        let out = e.path("out.img");
        e.ok(&["restore", "latest", out.to_str().unwrap()]);
        assert_eq!(hash(&src), hash(&out));
    }

    #[test]
    fn wrong_key_is_refused() {
        let (e, _src) = setup();
        let o = e.cmd(&["check"]).env("MOVER_PASSWORD", "not-it").output().unwrap();
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("wrong password for repository"));
    }
}

mod forget {
    use super::*;

    #[test]
    fn retention_plan_dry_run_and_execute() {
        let e = Env::new();
        let src = e.path("disk.img");
        std::fs::write(&src, noise(71, 2 << 20)).unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let tag = if i == 1 { "keep=forever" } else { "keep=no" };
            modify(&src, 1, 20 + i);
            ids.push(e.json(&["backup", src.to_str().unwrap(), "--tag", tag])["snapshot_id"].as_str().unwrap().to_string());
        }
        let err = e.fail(&["forget"]);
        assert!(err.contains("no retention policy"), "{err}");
        let plan = e.json(&["forget", "--keep-last", "2", "--keep-tag", "keep=forever", "--dry-run"]);
        assert_eq!(plan["removed"], 0);
        assert_eq!(e.snapshot_count(), 5, "a dry run changes nothing");
        let kept: Vec<String> =
            plan["groups"][0]["snapshots"].as_array().unwrap().iter().filter(|d| d["keep"] == true).map(|d| d["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(kept.len(), 3);
        assert!(kept.contains(&ids[4]) && kept.contains(&ids[3]) && kept.contains(&ids[1]));
        let done = e.json(&["forget", "--keep-last", "2", "--keep-tag", "keep=forever"]);
        assert_eq!(done["removed"], 2);
        assert_eq!(e.snapshot_count(), 3);
        // What is kept still restores.
        let out = e.path("out.img");
        e.ok(&["restore", &ids[4], out.to_str().unwrap()]);
        assert_eq!(hash(&src), hash(&out));
        assert!(problems_free(&e));
    }

    fn problems_free(e: &Env) -> bool {
        e.run(&["check", "--read-data"]).status.success()
    }
}

mod gc {
    //! Garbage collection with concurrent writers (docs/gc.md): real backup processes,
    //! stopped and killed with signals, against a local directory and SeaweedFS.
    use super::*;
    use std::process::Child;
    use std::time::{Duration, Instant};

    fn signal(c: &Child, sig: &str) {
        assert!(Command::new("kill").args([sig, &c.id().to_string()]).status().unwrap().success());
    }

    /// Writes `len` bytes of content `seed` at `off` (the same seed gives the same bytes, so
    /// data forgotten earlier comes back and is deduplicated against what GC took out).
    fn write_region(path: &Path, off: u64, len: usize, seed: u64) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&noise(seed, len), off).unwrap();
        f.sync_all().unwrap();
    }

    fn backup(e: &Env, vol: &str, img: &Path) -> String {
        let v = format!("{vol}={}", img.display());
        e.json(&["backup", "--volume", &v, "--parent", "latest"])["snapshot_id"].as_str().unwrap().to_string()
    }

    fn restore_matches(e: &Env, snap: &str, want: &str) {
        let t = e.path(&format!("restore-{}.img", &snap[..12]));
        let _ = std::fs::remove_file(&t);
        e.ok(&["restore", snap, t.to_str().unwrap()]);
        assert_eq!(hash(&t), want, "snapshot {snap} restores byte-exact");
        std::fs::remove_file(&t).unwrap();
    }

    fn check_read_data(e: &Env) {
        let r = e.json(&["check", "--read-data"]);
        assert_eq!(r["problems"].as_array().unwrap().len(), 0, "{r}");
    }

    fn local_lock_count(e: &Env) -> usize {
        // Only objects: the local store's `.tmp-` files are not locks yet.
        std::fs::read_dir(Path::new(&e.repo).join("locks"))
            .map(|d| d.filter(|f| !f.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-")).count())
            .unwrap_or(0)
    }

    #[test]
    fn forget_then_gc_frees_at_once_and_caches_forget_the_deleted_packs() {
        let e = Env::new();
        let img = e.path("a.img");
        make_volume(&img, 24 << 20, 1);
        let h1 = hash(&img);
        backup(&e, "vm", &img);
        write_region(&img, 0, 16 << 20, 99);
        let h2 = hash(&img);
        let s2 = backup(&e, "vm", &img);
        e.ok(&["forget", "--keep-last", "1"]);
        let r = e.json(&["gc"]);
        assert!(r["packs_deleted"].as_u64().unwrap() > 0 && r["bytes_freed"].as_u64().unwrap() > 8 << 20, "{r}");
        assert_eq!(r["bytes_held_back"], 0, "idle repository: nothing held back: {r}");
        assert_eq!(r["records_held"], 0, "{r}");
        check_read_data(&e);
        restore_matches(&e, &s2, &h2);
        // The node's RocksDB cache had indexed the deleted packs; a backup of the old content
        // must upload it again instead of deduplicating against packs that are gone.
        make_volume(&img, 24 << 20, 1);
        let v = format!("vm={}", img.display());
        let b = e.json(&["backup", "--volume", &v]);
        assert!(b["bytes_new"].as_u64().unwrap() > 8 << 20, "the deleted data is uploaded again: {b}");
        check_read_data(&e);
        restore_matches(&e, b["snapshot_id"].as_str().unwrap(), &h1);
        let again = e.json(&["gc"]);
        assert_eq!(again["packs_deleted"], 0, "a second gc finds nothing: {again}");
    }

    #[test]
    fn a_running_backup_holds_back_what_gc_took_out_until_it_finishes() {
        let e = Env::new();
        let a = e.path("a.img");
        make_volume(&a, 16 << 20, 1);
        backup(&e, "vm", &a);
        write_region(&a, 0, 12 << 20, 5);
        let ha = hash(&a);
        let sa = backup(&e, "vm", &a);
        e.ok(&["forget", "--keep-last", "1"]);
        // A slow backup of another disk, stopped once it holds its lock.
        let b = e.path("b.img");
        make_volume(&b, 192 << 20, 7);
        let hb = hash(&b);
        let vb = format!("other={}", b.display());
        let child = e.cmd(&["backup", "--volume", &vb, "--json", "--limit-upload", "40000000"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
        let t0 = Instant::now();
        while local_lock_count(&e) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "backup never took its lock");
            std::thread::sleep(Duration::from_millis(5));
        }
        signal(&child, "-STOP");
        let r = e.json(&["gc"]);
        signal(&child, "-CONT");
        assert_eq!(r["packs_deleted"], 0, "nothing deleted while a backup that may use it runs: {r}");
        assert!(r["bytes_held_back"].as_u64().unwrap() > 0 && r["records_held"] == 1, "{r}");
        assert_eq!(r["held_by"].as_array().unwrap().len(), 1, "{r}");
        let locks = e.json(&["locks"]);
        assert!(locks.as_array().unwrap().iter().any(|l| l["kind"] == "backup"), "{locks}");
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let sb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let r = e.json(&["gc"]);
        assert!(r["packs_deleted"].as_u64().unwrap() > 0 && r["records_swept"].as_u64().unwrap() >= 1, "freed once the backup finished: {r}");
        assert_eq!(r["bytes_held_back"], 0, "{r}");
        check_read_data(&e);
        restore_matches(&e, &sa, &ha);
        restore_matches(&e, sb["snapshot_id"].as_str().unwrap(), &hb);
    }

    #[test]
    fn stale_locks_expire_and_unlock_removes_only_stale_ones() {
        let e = Env::new();
        let img = e.path("a.img");
        make_volume(&img, 192 << 20, 3);
        let v = format!("vm={}", img.display());
        let wait_lock = |e: &Env| {
            let t0 = Instant::now();
            while local_lock_count(e) == 0 {
                assert!(t0.elapsed() < Duration::from_secs(20), "backup never took its lock");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // A live lock (stopped process, long TTL) is kept by unlock, removed by --force.
        let slow = ["--limit-upload", "40000000"];
        let mut live = e.cmd(&["backup", "--volume", &v]).args(slow).spawn().unwrap();
        wait_lock(&e);
        signal(&live, "-STOP");
        let u = e.json(&["unlock"]);
        assert_eq!(u["removed"].as_array().unwrap().len(), 0, "{u}");
        assert_eq!(u["remaining"].as_array().unwrap().len(), 1, "{u}");
        let u = e.json(&["unlock", "--force"]);
        assert_eq!(u["removed"].as_array().unwrap().len(), 1, "{u}");
        signal(&live, "-KILL");
        live.wait().unwrap();
        // A killed process's lock on this host is stale at once.
        let mut killed = e.cmd(&["backup", "--volume", &v]).args(slow).spawn().unwrap();
        wait_lock(&e);
        signal(&killed, "-KILL");
        killed.wait().unwrap();
        let l = e.json(&["locks"]);
        assert!(l[0]["stale"].as_str().unwrap().contains("is gone"), "{l}");
        let u = e.json(&["unlock"]);
        assert_eq!(u["removed"].as_array().unwrap().len(), 1, "{u}");
        assert_eq!(local_lock_count(&e), 0);
        // A lock not refreshed within its TTL expires; its holder then commits nothing.
        let stopped = e.cmd(&["backup", "--volume", &v]).args(slow).env("MOVER_LOCK_TTL", "2").stderr(std::process::Stdio::piped()).spawn().unwrap();
        wait_lock(&e);
        signal(&stopped, "-STOP");
        std::thread::sleep(Duration::from_millis(2600));
        let l = e.json(&["locks"]);
        assert!(l[0]["stale"].as_str().unwrap_or("").contains("expired"), "{l}");
        let r = e.json(&["gc"]);
        assert_eq!(r["stale_locks_removed"], 1, "{r}");
        signal(&stopped, "-CONT");
        let out = stopped.wait_with_output().unwrap();
        assert!(!out.status.success(), "a backup whose lease expired must not commit");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lease may have expired"), "{err}");
        assert_eq!(e.snapshot_count(), 0);
        // What it uploaded is garbage the next gc removes; the repository stays sound.
        e.ok(&["gc"]);
        check_read_data(&e);
    }

    /// Three backup processes loop over their disks (content drawn from a small pool, so
    /// forgotten data keeps coming back) while forget + gc run again and again.
    fn backups_in_a_loop_while_gc_runs(e: Env) {
        let e = std::sync::Arc::new(e);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..3u64 {
            let e = e.clone();
            writers.push(std::thread::spawn(move || {
                let img = e.path(&format!("disk{w}.img"));
                make_volume(&img, 12 << 20, 10 + w);
                let mut made = Vec::new();
                for i in 0..6u64 {
                    write_region(&img, ((i * 3 + w) % 10) << 20, 2 << 20, (i + w) % 3);
                    let h = hash(&img);
                    made.push((backup(&e, &format!("disk{w}"), &img), h));
                }
                made
            }));
        }
        let gc = {
            let e = e.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut runs, mut freed, mut held, mut resurrected) = (0, 0u64, 0, 0);
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    e.ok(&["forget", "--keep-last", "2"]);
                    let r = e.json(&["gc"]);
                    freed += r["bytes_freed"].as_u64().unwrap();
                    held += (r["bytes_held_back"].as_u64().unwrap() > 0) as usize;
                    resurrected += r["entries_resurrected"].as_u64().unwrap();
                    runs += 1;
                }
                eprintln!("gc ran {runs} times: freed {freed} bytes, held back by running backups {held} times, {resurrected} entries put back");
                (runs, freed)
            })
        };
        let made: Vec<(String, String)> = writers.into_iter().flat_map(|t| t.join().unwrap()).collect();
        stop.store(true, std::sync::atomic::Ordering::Release);
        let (runs, freed) = gc.join().unwrap();
        assert!(runs >= 2, "gc ran {runs} times during the backups");
        e.ok(&["forget", "--keep-last", "2"]);
        let last = e.json(&["gc"]);
        assert!(freed + last["bytes_freed"].as_u64().unwrap() > 0, "gc freed something: {last}");
        assert_eq!(last["records_held"], 0, "{last}");
        check_read_data(&e);
        let alive: Vec<String> = e.json(&["snapshots"]).as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(alive.len(), 6, "two per disk are kept");
        for (id, h) in made.iter().filter(|(id, _)| alive.contains(id)) {
            restore_matches(&e, id, h);
        }
    }

    #[test]
    fn backups_in_a_loop_while_gc_runs_local() {
        backups_in_a_loop_while_gc_runs(Env::new());
    }

    #[test]
    fn backups_in_a_loop_while_gc_runs_s3() {
        backups_in_a_loop_while_gc_runs(Env::s3("gc-loop"));
    }

    #[test]
    fn gc_killed_at_random_points_is_finished_by_the_next() {
        let e = Env::new_uninit();
        e.ok(&["init", "--pack-size-mib", "1"]);
        let img = e.path("a.img");
        make_volume(&img, 48 << 20, 4);
        for i in 0..3u64 {
            write_region(&img, (i * 7 % 40) << 20, 8 << 20, 50 + i);
            backup(&e, "vm", &img);
        }
        let h = hash(&img);
        e.ok(&["forget", "--keep-last", "1"]);
        let mut seed = 0x9e37_79b9_u64;
        for _ in 0..8 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let delay = Duration::from_millis(30 + (seed >> 33) % 400);
            let mut c = e.cmd(&["gc"]).stdout(std::process::Stdio::null()).spawn().unwrap();
            std::thread::sleep(delay);
            signal(&c, "-KILL");
            c.wait().unwrap();
            // At every point the repository is sound.
            let r = e.json(&["check"]);
            assert_eq!(r["problems"].as_array().unwrap().len(), 0, "after a gc killed at {delay:?}: {r}");
        }
        let r = e.json(&["gc"]);
        assert_eq!(r["records_held"], 0, "{r}");
        let again = e.json(&["gc"]);
        assert_eq!((again["packs_deleted"].as_u64(), again["records_written"].as_u64()), (Some(0), Some(0)), "nothing left to do: {again}");
        assert_eq!(local_lock_count(&e), 0, "locks of killed gcs are gone");
        check_read_data(&e);
        let snaps = e.json(&["snapshots"]);
        restore_matches(&e, snaps[0]["id"].as_str().unwrap(), &h);
    }
}

mod nbd {
    //! NBD as a backup source, against real `qemu-nbd` exporting a qcow2 image with a QEMU
    //! dirty bitmap (what KubeVirt's incremental backup uses); `nbdinfo --map` is the
    //! independent reference for which extents are dirty.
    use super::*;
    use std::process::Child;
    use std::time::{Duration, Instant};

    struct QemuNbd {
        child: Child,
        uri: String,
    }

    impl QemuNbd {
        /// Exports `img` read-only over a unix socket, or TCP on 127.0.0.1 when `port` is set.
        fn start(img: &Path, bitmap: Option<&str>, sock: &Path, port: Option<u16>) -> Self {
            let mut c = Command::new("qemu-nbd");
            c.args(["-r", "-t", "-f", "qcow2"]);
            if let Some(b) = bitmap {
                c.args(["-B", b]);
            }
            let uri = match port {
                Some(p) => {
                    c.args(["-b", "127.0.0.1", "-p", &p.to_string()]);
                    format!("nbd://127.0.0.1:{p}/")
                }
                None => {
                    let _ = std::fs::remove_file(sock);
                    c.args(["-k", sock.to_str().unwrap()]);
                    format!("nbd+unix:///?socket={}", sock.display())
                }
            };
            let child = c.arg(img).spawn().expect("qemu-nbd (apt-get install qemu-utils)");
            let t0 = Instant::now();
            loop {
                let up = match port {
                    Some(p) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
                    None => sock.exists(),
                };
                if up {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "qemu-nbd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            QemuNbd { child, uri }
        }
    }

    impl Drop for QemuNbd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn qemu_io(img: &Path, cmds: &[&str]) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "qcow2"]);
        for x in cmds {
            c.args(["-c", x]);
        }
        let o = c.arg(img).output().unwrap();
        assert!(o.status.success(), "qemu-io: {}", String::from_utf8_lossy(&o.stderr));
    }

    fn raw_hash(e: &Env, img: &Path) -> String {
        let raw = e.path("expected.raw");
        assert!(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()])
            .status()
            .unwrap()
            .success());
        let h = hash(&raw);
        std::fs::remove_file(raw).unwrap();
        h
    }

    /// Dirty extents as `nbdinfo --map` sees them.
    fn nbdinfo_dirty(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
        let o =
            Command::new("nbdinfo").args(["--json", &format!("--map=qemu:dirty-bitmap:{bitmap}"), uri]).output().expect("nbdinfo (apt-get install libnbd-bin)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|x| x["type"].as_u64().unwrap() & 1 == 1)
            .map(|x| (x["offset"].as_u64().unwrap(), x["length"].as_u64().unwrap()))
            .collect()
    }

    fn port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn restore_hash(e: &Env, snap: &str) -> String {
        let t = e.path(&format!("r-{}.img", &snap[..8]));
        e.ok(&["restore", snap, t.to_str().unwrap()]);
        let h = hash(&t);
        std::fs::remove_file(t).unwrap();
        h
    }

    fn image(e: &Env) -> PathBuf {
        let img = e.path("vm.qcow2");
        assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "96M"]).status().unwrap().success());
        qemu_io(&img, &["write -P 0x11 0 24M", "write -P 0x22 40M 8M", "write -P 0x5a 90M 6M"]);
        assert!(Command::new("qemu-img").args(["bitmap", "--add", img.to_str().unwrap(), "b0"]).status().unwrap().success());
        img
    }

    #[test]
    fn dirty_bitmap_incremental_reads_only_dirty_segments_and_restores_byte_exact() {
        let e = Env::new();
        let img = image(&e);
        let full = {
            let s = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
            let r = e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--checkpoint", "b0"]);
            assert_eq!(r["io_backend"], "nbd");
            assert_eq!(r["bytes_read"].as_u64(), Some(40 << 20), "only allocated data is read: {r}");
            r
        };
        assert_eq!(restore_hash(&e, full["snapshot_id"].as_str().unwrap()), raw_hash(&e, &img));
        // The guest writes; the bitmap records it.
        qemu_io(&img, &["write -P 0x33 5M 64k", "write -P 0x44 41M 1M", "write -P 0x55 70M 3M"]);
        let want = raw_hash(&e, &img);
        let s = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), Some(port()));
        let dirty = nbdinfo_dirty(&s.uri, "b0");
        assert!(!dirty.is_empty());
        let seg = 4u64 << 20;
        let touched: std::collections::BTreeSet<u64> = dirty.iter().flat_map(|&(o, l)| (o / seg)..(o + l).div_ceil(seg)).collect();
        let r = e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--nbd-bitmap", "b0", "--parent", "latest"]);
        let v = &r["volumes"][0];
        assert_eq!(v["change_source"], "nbd", "{r}");
        assert_eq!(r["bytes_read"].as_u64(), Some(touched.len() as u64 * seg), "reads exactly the segments the bitmap marks ({touched:?}): {r}");
        assert_eq!(r["bytes_skipped"].as_u64(), Some((96 << 20) - touched.len() as u64 * seg), "{r}");
        assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want, "incremental restores byte-exact");
        // Reading everything gives the same volume.
        let plain = QemuNbd::start(&img, None, &e.path("plain.sock"), None);
        let f = e.json(&["backup", "--nbd", &plain.uri, "--name", "vm"]);
        assert_eq!(restore_hash(&e, f["snapshot_id"].as_str().unwrap()), want);
    }

    #[test]
    fn a_bitmap_not_matching_the_parent_is_refused_and_a_missing_one_falls_back() {
        let e = Env::new();
        let img = image(&e);
        let s = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
        // Parent taken without a checkpoint: the bitmap's base cannot be proven to match.
        e.json(&["backup", "--nbd", &s.uri, "--name", "vm"]);
        let before = e.snapshot_count();
        let err = e.fail(&["backup", "--nbd", &s.uri, "--name", "vm", "--nbd-bitmap", "b0", "--parent", "latest"]);
        assert!(err.contains("refusing an incremental that could miss changes") && err.contains("'b0'"), "{err}");
        assert_eq!(e.snapshot_count(), before, "nothing written");
        // A bitmap the server does not have: everything is read (parent reuse on), and said so.
        let r = e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--nbd-bitmap", "nosuch", "--parent", "latest"]);
        let v = &r["volumes"][0];
        assert_eq!(v["change_source"], "parent-digest", "{r}");
        assert!(v["change_fallback"].as_str().unwrap().contains("qemu:dirty-bitmap:nosuch"), "{r}");
        assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), raw_hash(&e, &img));
        // Bad input names the object.
        let err = e.fail(&["backup", "--nbd", "nbd+unix:///?socket=/nonexistent/sock", "--name", "vm"]);
        assert!(err.contains("/nonexistent/sock"), "{err}");
        let err = e.fail(&["backup", "--nbd", "http://x", "--name", "vm"]);
        assert!(err.contains("http://x"), "{err}");
    }
}

mod csi {
    //! CSI SnapshotMetadata (KEP-3314) as a change source: a test server implementing the
    //! same gRPC service over real TLS on 127.0.0.1, serving extents computed from real data
    //! (allocated 64 KiB blocks of an image, and the blocks where two images differ), in many
    //! small messages, with a stream it breaks once to be resumed.
    use super::*;
    use mover_protocol::snapshotmetadata as sm;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tonic::{Request, Response, Status};

    const BLOCK: u64 = 64 << 10;

    #[derive(Default)]
    struct Server {
        /// VolumeSnapshot name → (image, CSI handle).
        snaps: Mutex<HashMap<String, (PathBuf, String)>>,
        token: String,
        /// Messages to send before breaking the next stream (0: never).
        break_after: AtomicUsize,
        /// Every starting_offset asked for.
        offsets: Mutex<Vec<i64>>,
        /// Overrides the capacity reported (0: the image's size).
        capacity: std::sync::atomic::AtomicU64,
    }

    type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

    fn blocks(a: &[u8], b: Option<&[u8]>, from: i64) -> Vec<sm::BlockMetadata> {
        let mut out = Vec::new();
        for (i, blk) in a.chunks(BLOCK as usize).enumerate() {
            let off = i as u64 * BLOCK;
            let pick = match b {
                None => blk.iter().any(|&x| x != 0),
                Some(base) => base.get(off as usize..off as usize + blk.len()) != Some(blk),
            };
            if pick && (off + blk.len() as u64) as i64 > from {
                out.push(sm::BlockMetadata { byte_offset: off as i64, size_bytes: blk.len() as i64 });
            }
        }
        out
    }

    impl Server {
        fn check(&self, token: &str) -> Result<(), Status> {
            if token != self.token {
                return Err(Status::unauthenticated("security token rejected"));
            }
            Ok(())
        }
        fn by_name(&self, ns: &str, name: &str) -> Result<PathBuf, Status> {
            self.snaps
                .lock()
                .unwrap()
                .get(&format!("{ns}/{name}"))
                .map(|s| s.0.clone())
                .ok_or_else(|| Status::not_found(format!("VolumeSnapshot {ns}/{name} not found")))
        }
        fn by_handle(&self, id: &str) -> Result<PathBuf, Status> {
            self.snaps
                .lock()
                .unwrap()
                .values()
                .find(|s| s.1 == id)
                .map(|s| s.0.clone())
                .ok_or_else(|| Status::not_found(format!("snapshot handle {id} not found")))
        }
        /// Sends `bl` four per message; breaks the stream once if asked to.
        fn stream<T: Send + 'static>(&self, cap: u64, bl: Vec<sm::BlockMetadata>, make: fn(i32, i64, Vec<sm::BlockMetadata>) -> T) -> Stream<T> {
            let cap = match self.capacity.load(Ordering::SeqCst) {
                0 => cap,
                c => c,
            };
            let mut msgs: Vec<Result<T, Status>> = bl.chunks(4).map(|c| Ok(make(sm::BlockMetadataType::FixedLength as i32, cap as i64, c.to_vec()))).collect();
            let n = self.break_after.swap(0, Ordering::SeqCst);
            if n > 0 && n < msgs.len() {
                msgs.truncate(n);
                msgs.push(Err(Status::unavailable("connection to the CSI driver lost")));
            }
            Box::pin(tokio_stream::iter(msgs))
        }
    }

    /// The service as registered (a local type, so it may implement the generated trait).
    struct Svc(Arc<Server>);

    impl std::ops::Deref for Svc {
        type Target = Server;
        fn deref(&self) -> &Server {
            &self.0
        }
    }

    #[tonic::async_trait]
    impl sm::snapshot_metadata_server::SnapshotMetadata for Svc {
        type GetMetadataAllocatedStream = Stream<sm::GetMetadataAllocatedResponse>;
        type GetMetadataDeltaStream = Stream<sm::GetMetadataDeltaResponse>;

        async fn get_metadata_allocated(&self, r: Request<sm::GetMetadataAllocatedRequest>) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
            let r = r.into_inner();
            self.check(&r.security_token)?;
            let img = std::fs::read(self.by_name(&r.namespace, &r.snapshot_name)?).unwrap();
            self.offsets.lock().unwrap().push(r.starting_offset);
            Ok(Response::new(self.stream(img.len() as u64, blocks(&img, None, r.starting_offset), |t, c, b| sm::GetMetadataAllocatedResponse {
                block_metadata_type: t,
                volume_capacity_bytes: c,
                block_metadata: b,
            })))
        }

        async fn get_metadata_delta(&self, r: Request<sm::GetMetadataDeltaRequest>) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
            let r = r.into_inner();
            self.check(&r.security_token)?;
            let base = std::fs::read(self.by_handle(&r.base_snapshot_id)?).unwrap();
            let img = std::fs::read(self.by_name(&r.namespace, &r.target_snapshot_name)?).unwrap();
            self.offsets.lock().unwrap().push(r.starting_offset);
            Ok(Response::new(self.stream(img.len() as u64, blocks(&img, Some(&base), r.starting_offset), |t, c, b| sm::GetMetadataDeltaResponse {
                block_metadata_type: t,
                volume_capacity_bytes: c,
                block_metadata: b,
            })))
        }
    }

    /// Starts the server with TLS (a CA and a certificate for 127.0.0.1 made by openssl).
    fn start(dir: &Path, srv: Arc<Server>) -> (String, tokio::runtime::Runtime) {
        super::daemon::make_ca(dir, "ca");
        super::daemon::make_cert(dir, "ca", "srv", "subjectAltName=IP:127.0.0.1,DNS:snapshot-metadata.test\n");
        let identity = tonic::transport::Identity::from_pem(std::fs::read(dir.join("srv.pem")).unwrap(), std::fs::read(dir.join("srv.key")).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        mover::init_tls();
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .unwrap()
                .add_service(sm::snapshot_metadata_server::SnapshotMetadataServer::new(Svc(srv)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (addr.to_string(), rt)
    }

    fn cbt_args<'a>(ep: &'a str, dir: &'a Path, snap: &'a str) -> Vec<String> {
        [
            "--cbt-csi",
            ep,
            "--cbt-ca",
            dir.join("ca.pem").to_str().unwrap(),
            "--cbt-token",
            dir.join("token").to_str().unwrap(),
            "--cbt-namespace",
            "vms",
            "--cbt-snapshot",
            snap,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn run_json(e: &Env, args: &[String]) -> serde_json::Value {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).chain(["--json"]).collect();
        serde_json::from_str(&e.ok(&a)).unwrap()
    }

    #[test]
    fn allocated_then_delta_with_a_resumed_stream_restore_byte_exact() {
        let e = Env::new();
        let dir = e.path("csi");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("token"), "s3cr3t\n").unwrap();
        // Two snapshots of one volume: snap-1, then snap-2 after scattered writes.
        let s1 = e.path("snap-1.img");
        make_volume(&s1, 32 << 20, 21);
        let s2 = e.path("snap-2.img");
        std::fs::copy(&s1, &s2).unwrap();
        modify(&s2, 12, 5);
        let srv = Arc::new(Server { token: "s3cr3t".into(), ..Default::default() });
        srv.snaps.lock().unwrap().insert("vms/snap-1".into(), (s1.clone(), "handle-1".into()));
        srv.snaps.lock().unwrap().insert("vms/snap-2".into(), (s2.clone(), "handle-2".into()));
        let (ep, _rt) = start(&dir, srv.clone());

        // Full: only allocated blocks are read; the stream breaks after 3 messages and resumes.
        srv.break_after.store(3, Ordering::SeqCst);
        let mut a: Vec<String> = ["backup", "--volume"].iter().map(|s| s.to_string()).collect();
        a.push(format!("vm={}", s1.display()));
        a.extend(cbt_args(&ep, &dir, "snap-1"));
        a.extend(["--checkpoint".into(), "handle-1".into()]);
        let full = run_json(&e, &a);
        let offs = srv.offsets.lock().unwrap().clone();
        assert_eq!(offs.len(), 2, "one resume: {offs:?}");
        assert_eq!(offs[0], 0);
        assert_eq!(offs[1] as u64 % BLOCK, 0, "resumed after the last extent received: {offs:?}");
        assert!(offs[1] > 0);
        assert_eq!(restore(&e, &full), hash(&s1));

        // Incremental: GetMetadataDelta from the parent's recorded handle; reads only the
        // segments the changed blocks touch, restores byte-exact.
        srv.offsets.lock().unwrap().clear();
        srv.break_after.store(1, Ordering::SeqCst);
        let mut a: Vec<String> = ["backup", "--volume"].iter().map(|s| s.to_string()).collect();
        a.push(format!("vm={}", s1.display()));
        // The source of the incremental is the second snapshot's data, at the same path.
        std::fs::copy(&s2, e.path("vm-now.img")).unwrap();
        a[2] = format!("vm={}", e.path("vm-now.img").display());
        a.extend(cbt_args(&ep, &dir, "snap-2"));
        a.extend(["--parent".into(), full["snapshot_id"].as_str().unwrap().into(), "--checkpoint".into(), "handle-2".into()]);
        let inc = run_json(&e, &a);
        assert_eq!(inc["volumes"][0]["change_source"], "csi", "{inc}");
        let b1 = std::fs::read(&s1).unwrap();
        let b2 = std::fs::read(&s2).unwrap();
        let seg = 4u64 << 20;
        let touched: std::collections::BTreeSet<u64> = blocks(&b2, Some(&b1), 0).iter().map(|b| b.byte_offset as u64 / seg).collect();
        assert_eq!(inc["bytes_read"].as_u64(), Some(touched.len() as u64 * seg), "reads the changed segments only: {inc}");
        assert_eq!(srv.offsets.lock().unwrap().len(), 2, "the delta stream was resumed");
        assert_eq!(restore(&e, &inc), hash(&s2));
    }

    fn restore(e: &Env, r: &serde_json::Value) -> String {
        let t = e.path("restored.img");
        let _ = std::fs::remove_file(&t);
        e.ok(&["restore", r["snapshot_id"].as_str().unwrap(), t.to_str().unwrap()]);
        hash(&t)
    }

    #[test]
    fn wrong_token_unknown_snapshot_and_wrong_base_fall_back_or_are_refused() {
        let e = Env::new();
        let dir = e.path("csi");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("token"), "wrong").unwrap();
        let s1 = e.path("snap-1.img");
        make_volume(&s1, 16 << 20, 3);
        let srv = Arc::new(Server { token: "right".into(), ..Default::default() });
        srv.snaps.lock().unwrap().insert("vms/snap-1".into(), (s1.clone(), "handle-1".into()));
        let (ep, _rt) = start(&dir, srv.clone());
        let vol = format!("vm={}", s1.display());
        let base: Vec<String> = ["backup", "--volume", &vol].iter().map(|s| s.to_string()).collect();

        // Wrong token: the service says UNAUTHENTICATED; the backup reads everything and says why.
        let r = run_json(&e, &[base.clone(), cbt_args(&ep, &dir, "snap-1"), vec!["--checkpoint".into(), "handle-1".into()]].concat());
        let fb = r["volumes"][0]["change_fallback"].as_str().unwrap();
        assert!(fb.contains("authenticated") || fb.contains("Unauthenticated") || fb.contains("UNAUTHENTICATED"), "{fb}");
        assert_eq!(restore(&e, &r), hash(&s1));
        std::fs::write(dir.join("token"), "right").unwrap();
        // Unknown snapshot: NOT_FOUND, named.
        let r = run_json(
            &e,
            &[base.clone(), cbt_args(&ep, &dir, "no-such-snap"), vec!["--parent".into(), "latest".into(), "--checkpoint".into(), "handle-1".into()]].concat(),
        );
        let fb = r["volumes"][0]["change_fallback"].as_str().unwrap();
        assert!(fb.contains("not found") && fb.contains("handle-1"), "{fb}");
        // A base that is not the parent's: refused, nothing written.
        let n = e.snapshot_count();
        let err = e.fail(
            &[
                base.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                cbt_args(&ep, &dir, "snap-1").iter().map(|s| s.as_str()).collect(),
                vec!["--parent", "latest", "--cbt-base-id", "handle-0"],
            ]
            .concat(),
        );
        assert!(err.contains("refusing an incremental") && err.contains("handle-0"), "{err}");
        assert_eq!(e.snapshot_count(), n);
        // A capacity that is not the source's: refused.
        srv.capacity.store(1 << 30, Ordering::SeqCst);
        let err = e.fail(&[base.iter().map(|s| s.as_str()).collect::<Vec<_>>(), cbt_args(&ep, &dir, "snap-1").iter().map(|s| s.as_str()).collect()].concat());
        assert!(err.contains("1073741824") && err.contains("same volume"), "{err}");
    }
}
