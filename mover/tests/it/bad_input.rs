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
    let big = flip_byte_in_largest_pack(Path::new(&e.repo));
    let out = e.path("out.img");
    let err = e.fail(&["restore", s["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
    let pack_id = big.file_name().unwrap().to_str().unwrap();
    assert!(err.contains("volume 'disk'") && err.contains(s["snapshot_id"].as_str().unwrap()) && err.contains("at offset"), "{err}");
    assert!(err.contains(pack_id) && err.contains("chunk ") && err.contains("authentication failed"), "{err}");
}

/// A mistyped repository URL or S3 endpoint is refused at once with one line, and nothing
/// is created (`s3:/bucket/x` used to become a local directory `./s3:/bucket/x`; an
/// endpoint without its scheme was retried for seconds as "unreachable").
#[test]
fn a_mistyped_repository_url_or_endpoint_is_refused_at_once_and_creates_nothing() {
    let e = Env::new_uninit();
    let cwd = tempfile::tempdir().unwrap();
    for (repo, endpoint, want) in [
        ("s3:/bucket/x", None, "s3://bucket/prefix"),
        ("s3:bucket", None, "s3://bucket/prefix"),
        ("s3://bucket/x", Some("127.0.0.1:9000"), "needs its scheme: http://127.0.0.1:9000"),
    ] {
        let mut c = e.cmd(&["init"]);
        c.env("MOVER_REPOSITORY", repo).current_dir(cwd.path());
        if let Some(ep) = endpoint {
            c.args(["--s3-endpoint", ep]);
        }
        let t0 = std::time::Instant::now();
        let o = c.output().unwrap();
        assert!(!o.status.success(), "{repo}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want) && err.contains(repo), "{repo}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(t0.elapsed().as_secs() < 3, "{repo}: refused at once, not retried: {:?}", t0.elapsed());
    }
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0, "nothing was created");
}
