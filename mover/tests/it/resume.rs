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
