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
    let log = std::fs::read_to_string(e.path("cache/drills.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 1, "the drill is recorded");
    assert!(log.contains(r["snapshot_id"].as_str().unwrap()));
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
    assert!(!e.path("cache/drills.jsonl").exists(), "a failed drill was recorded as a result");
}
