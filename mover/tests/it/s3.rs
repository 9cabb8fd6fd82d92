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
    assert!(err.contains("s3://nobucket/x") && err.contains("unreachable"), "{err}");
    assert!(t.elapsed().as_secs() < 60);
}
