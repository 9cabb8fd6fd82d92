//! Restore drills: a snapshot proven restorable against the digests its backup recorded,
//! with scratch space always cleaned up.
use super::*;

fn scratch_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|d| d.count() == 0).unwrap_or(true)
}

#[test]
fn a_drill_restores_every_volume_verifies_it_reports_the_rate_and_cleans_up() {
    let e = Env::new();
    let a = e.path("root.img");
    make_volume(&a, 22 << 20, 81);
    let b = e.path("data.img");
    make_volume(&b, 9 << 20, 82);
    let meta = e.path("vm.yaml");
    std::fs::write(&meta, "kind: VirtualMachine\n").unwrap();
    e.json(&[
        "backup",
        "--volume",
        &format!("root={}", a.display()),
        "--volume",
        &format!("data={}", b.display()),
        "--metadata",
        &format!("vm={}", meta.display()),
        "--group",
        "vms/web-1",
    ]);
    let scratch = e.path("scratch");
    let r = e.json(&["drill", "latest", "--group", "vms/web-1", "--scratch", scratch.to_str().unwrap()]);
    let vols = r["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2, "{r}");
    for (v, size) in vols.iter().zip([22u64 << 20, 9 << 20]) {
        assert_eq!(v["size"].as_u64().unwrap(), size, "{v}");
        assert_eq!(v["segments_verified"].as_u64().unwrap(), size.div_ceil(4 << 20), "every segment compared: {v}");
        assert!(v["restore_bytes_per_s"].as_f64().unwrap() > 0.0 && v["projected_restore_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    assert_eq!(r["group"], "vms/web-1");
    assert!(scratch_is_empty(&scratch), "the drill left scratch files");
    // Recorded in the repository: status reports the drilled snapshot and the RTO.
    let st = e.json(&["status"]);
    let g = &st["groups"][0];
    assert_eq!(g["group"], "vms/web-1");
    assert_eq!(g["newest_drilled"], r["snapshot_id"], "{st}");
    let rto = g["projected_restore_seconds"].as_f64().unwrap();
    let sum: f64 = vols.iter().map(|v| v["projected_restore_s"].as_f64().unwrap()).sum();
    assert!((rto - sum).abs() / sum < 0.01, "the projection is the drill's measured rate over the newest snapshot: {rto} vs {sum}");
    assert!(g["newest_verified"].is_null() && st["last_verify"].is_null(), "never verified: {st}");
    e.ok(&["check", "--record"]);
    let st = e.json(&["status"]);
    assert_eq!(st["groups"][0]["newest_verified"], r["snapshot_id"], "{st}");
    assert_eq!(st["last_verify"]["ok"], true);
    let text = e.ok(&["status"]);
    assert!(text.contains("vms/web-1") && text.contains("last verify"), "{text}");
}

#[test]
fn a_drill_of_a_damaged_snapshot_fails_naming_where_and_cleans_up() {
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(83, 6 << 20)).unwrap();
    let s = e.json(&["backup", "--volume", &format!("disk={}", src.display())]);
    let pack = flip_byte_in_largest_pack(Path::new(&e.repo));
    let scratch = e.path("scratch");
    let err = e.fail(&["drill", s["snapshot_id"].as_str().unwrap(), "--scratch", scratch.to_str().unwrap()]);
    let pack_id = pack.file_name().unwrap().to_str().unwrap();
    assert!(err.contains("volume 'disk'") && err.contains("at offset") && err.contains(pack_id), "{err}");
    assert!(scratch_is_empty(&scratch), "a failed drill left scratch files");
    // The failure is recorded: status says the last drill failed and nothing was drilled.
    let st = e.json(&["status"]);
    let g = &st["groups"][0];
    assert_eq!(g["last_drill_failed"], true, "{st}");
    assert!(g["newest_drilled"].is_null() && g["projected_restore_seconds"].is_null(), "{st}");
    assert!(e.ok(&["status"]).contains("LAST DRILL FAILED"));
    // And a recorded verify names the damage and the snapshot that needs it.
    let o = e.run(&["check", "--read-data", "--record"]);
    assert!(!o.status.success());
    let st = e.json(&["status"]);
    assert_eq!(st["last_verify"]["ok"], false, "{st}");
    assert_eq!(st["groups"][0]["newest_damaged"], true, "{st}");
    assert!(st["groups"][0]["newest_verified"].is_null());
}

#[test]
fn a_drill_of_an_incremental_that_read_only_changed_pages_passes() {
    // Spliced segments have no whole-segment digest: the drill compares them with the
    // repository's copy instead of failing them.
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(84, 12 << 20)).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&noise(85, 4096), 100 * 4096).unwrap();
    f.write_all_at(&noise(86, 4096), 2000 * 4096).unwrap();
    write_extents(&e.path("ext"), &[(100 * 4096, 4096), (2000 * 4096, 4096)]);
    let s = e.json(&["backup", src.to_str().unwrap(), "--parent", "latest", "--changed-extents", e.path("ext").to_str().unwrap()]);
    assert!(s["bytes_read"].as_u64().unwrap() <= 4 * 4096, "only the changed pages were read: {s}");
    let r = e.json(&["drill", "latest", "--scratch", e.path("scratch").to_str().unwrap()]);
    assert_eq!(r["volumes"][0]["segments_verified"], 3, "{r}");
}
