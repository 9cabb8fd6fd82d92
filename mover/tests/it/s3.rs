use super::*;
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
    assert!(err.contains("s3://nobucket/x") && err.contains("unreachable") && err.contains("Connection refused"), "{err}");
    // One line, the causes in words: not the SDK's debug dump.
    assert!(err.trim_end().lines().count() == 1 && !err.contains("DispatchFailure(") && !err.contains("ConnectorError"), "{err}");
    assert!(t.elapsed().as_secs() < 60);
}

#[test]
fn missing_credentials_fail_at_once_saying_so_and_write_nothing() {
    let (endpoint, bucket) = s3_env();
    let dir = tempfile::tempdir().unwrap();
    let e = Env { dir, repo: format!("s3://{bucket}/nocreds-{}", rand_suffix()), extra: vec!["--s3-endpoint".into(), endpoint] };
    // No credentials anywhere the AWS SDK looks (no instance metadata either, so the test
    // does not depend on how this machine answers it).
    std::fs::write(e.path("empty"), "").unwrap();
    let t = std::time::Instant::now();
    let o = e
        .cmd(&["init"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_SHARED_CREDENTIALS_FILE", e.path("empty"))
        .env("AWS_CONFIG_FILE", e.path("empty"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // The first line is Mover's error (no SDK warnings before it), naming the store and
    // what is missing; not retried as if the store were unreachable.
    assert!(err.starts_with("error: ") && err.contains("no S3 credentials") && err.contains(&e.repo), "{err}");
    assert!(t.elapsed().as_secs() < 5, "took {:?} to fail", t.elapsed());
    // Nothing was written: with credentials, init finds the place empty.
    e.ok(&["init"]);
}

/// The fetch window bounds bytes of packs in flight. A window smaller than one segment's
/// reads (incompressible data: ~4 MiB per segment against 1 MiB) still restores — such a
/// segment takes the whole window — and a large one too; both byte-exact.
#[test]
fn restore_with_a_window_smaller_than_a_segment_or_a_large_one_is_byte_exact() {
    let e = Env::s3("win");
    let src = e.path("disk.img");
    std::fs::write(&src, noise(77, 24 << 20)).unwrap();
    e.json(&["backup", src.to_str().unwrap()]);
    for w in ["1", "256"] {
        let out = e.path(&format!("out-{w}.img"));
        let o = e.cmd_in(&["timeout", "120"], &["restore", "latest", out.to_str().unwrap(), "--window-mib", w]).output().unwrap();
        assert!(o.status.success(), "window {w} MiB: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(hash(&src), hash(&out), "window {w} MiB");
    }
}

/// Credentials that may only read and list (the test server's `reader` identity): listing,
/// showing, checking and restoring work — no probe object is written for them — and a
/// backup is refused by the store, in one line naming the store, with nothing written.
#[test]
fn read_only_credentials_list_check_and_restore_and_a_backup_is_refused_writing_nothing() {
    let e = Env::s3("readonly");
    let src = e.path("disk.img");
    make_volume(&src, 8 << 20, 31);
    let snap = e.json(&["backup", src.to_str().unwrap()])["snapshot_id"].as_str().unwrap().to_string();
    let reader = std::env::var("MOVER_TEST_S3_READER").expect("MOVER_TEST_S3_READER: run with scripts/test.sh");
    let (key, secret) = reader.split_once(':').unwrap();
    let objects = || e.s3_objects();
    let before = objects();
    let as_reader = |args: &[&str]| {
        let o = e.cmd(args).env("AWS_ACCESS_KEY_ID", key).env("AWS_SECRET_ACCESS_KEY", secret).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (ok, out, err) = as_reader(&["snapshots"]);
    assert!(ok && out.contains(&snap[..8]), "{out}{err}");
    let (ok, _, err) = as_reader(&["show", &snap]);
    assert!(ok, "{err}");
    let (ok, _, err) = as_reader(&["check", "--read-data"]);
    assert!(ok, "{err}");
    let out_img = e.path("out.img");
    let (ok, _, err) = as_reader(&["restore", &snap, out_img.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(hash(&src), hash(&out_img));
    // A backup needs to write: refused by the store, said in one line naming it.
    let (ok, _, err) = as_reader(&["backup", src.to_str().unwrap()]);
    assert!(!ok, "a backup with read-only credentials succeeded");
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "not one line: {err}");
    assert!(err.contains(&e.repo) && (err.contains("AccessDenied") || err.contains("denied")), "{err}");
    assert_eq!(objects(), before, "something was written or deleted with read-only credentials");
}
