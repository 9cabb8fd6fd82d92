use super::*;

#[test]
fn a_killed_backup_keeps_its_uploads_and_the_rerun_skips_them() {
    let dir = tempfile::tempdir().unwrap();
    let e = Env { repo: dir.path().join("repo").display().to_string(), dir, extra: vec![] };
    e.ok(&["init", "--pack-size-mib", "1"]);
    let src = e.path("big.img");
    std::fs::write(&src, noise(42, 512 << 20)).unwrap();
    let mut child = e.cmd(&["backup", src.to_str().unwrap(), "--json", "--uploads", "1", "--workers", "1"]).spawn().unwrap();
    kill_after_checkpoints(&mut child, &Path::new(&e.repo).join("index"), 10, "the backup");
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
