//! Damage never spreads, and heals (`docs/repair.md`): a damaged blob is quarantined by
//! whatever finds it, never deduplicated against again, stored anew by the next backup
//! that produces it (which heals every older snapshot that needs it), healed by
//! `mover repair` from a second repository or from a volume's data, and what cannot be
//! healed is listed byte range by byte range.
use super::*;

fn quarantine_records(e: &Env) -> usize {
    std::fs::read_dir(Path::new(&e.repo).join("quarantine")).map(|d| d.count()).unwrap_or(0)
}

/// `check --read-data --json`, which fails when it finds problems; its report either way.
fn check(e: &Env) -> (bool, serde_json::Value) {
    let o = e.run(&["check", "--read-data", "--json"]);
    (o.status.success(), serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr))))
}

/// Restores `snap` into a new file and returns its hash (or the error).
fn restored(e: &Env, snap: &str, name: &str) -> Result<String, String> {
    let out = e.path(name);
    let _ = std::fs::remove_file(&out);
    let o = e.run(&["restore", snap, out.to_str().unwrap()]);
    if !o.status.success() {
        assert!(!out.exists(), "a failed restore into a new file leaves nothing under its name");
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let h = hash(&out);
    std::fs::remove_file(&out).unwrap();
    Ok(h)
}

fn id(v: &serde_json::Value) -> String {
    v["snapshot_id"].as_str().unwrap().to_string()
}

/// Flips a byte in the repository's largest pack, runs the check that finds it, and returns
/// the pack's id.
fn damage_and_find(e: &Env) -> String {
    let pack = flip_byte_in_largest_pack(Path::new(&e.repo));
    let pack_id = pack.file_name().unwrap().to_str().unwrap().to_string();
    let (ok, r) = check(e);
    assert!(!ok, "{r}");
    assert!(r["newly_quarantined"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["damaged"].as_array().unwrap().iter().any(|d| d["object"] == format!("pack {pack_id}")), "{r}");
    assert_eq!(quarantine_records(e), 1);
    // Checking again finds nothing new to quarantine, and still reports the damage.
    let (ok, r) = check(e);
    assert!(!ok && r["newly_quarantined"] == 0 && r["quarantined"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(quarantine_records(e), 1);
    pack_id
}

#[test]
fn a_new_full_backup_stores_damaged_content_anew_and_heals_older_snapshots() {
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(91, 12 << 20)).unwrap();
    let want = hash(&src);
    let v = format!("disk={}", src.display());
    let s1 = e.json(&["backup", "--volume", &v, "--group", "vms/a"]);
    let pack_id = damage_and_find(&e);
    let err = restored(&e, &id(&s1), "r.img").unwrap_err();
    assert!(err.contains(&pack_id), "the restore names the damaged pack: {err}");

    // A full backup of the same data into a new group: without the quarantine it would
    // deduplicate against the damaged chunk and be unrestorable too.
    let s2 = e.json(&["backup", "--volume", &v, "--group", "vms/b"]);
    assert!(s2["chunks_new"].as_u64().unwrap() >= 1 && s2["chunks_dedup"].as_u64().unwrap() >= 1, "only the damaged chunk is stored anew: {s2}");
    assert_eq!(restored(&e, &id(&s2), "r.img").unwrap(), want, "the new snapshot restores byte-exact");
    assert_eq!(restored(&e, &id(&s1), "r.img").unwrap(), want, "the old snapshot restores again: the healed copy is its too");

    // Healed: check passes, saying the damaged pack is no longer needed; gc removes the
    // pack (copying its healthy blobs) and the quarantine record with it.
    let (ok, r) = check(&e);
    assert!(ok && r["healed"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains(&pack_id)), "{r}");
    let g = e.json(&["gc"]);
    assert!(g["packs_repacked"].as_u64().unwrap() >= 1 && g["quarantine_records_removed"] == 1, "{g}");
    assert!(!pack_files(Path::new(&e.repo)).iter().any(|p| p.ends_with(&pack_id)), "the damaged pack is gone");
    assert_eq!(quarantine_records(&e), 0);
    let (ok, r) = check(&e);
    assert!(ok && r["notes"].as_array().unwrap().is_empty() && r["quarantined"] == 0, "{r}");
    for s in [&s1, &s2] {
        assert_eq!(restored(&e, &id(s), "r.img").unwrap(), want, "after gc");
    }
}

#[test]
fn an_incremental_reads_again_the_segments_that_need_damaged_content() {
    // Parent reuse would keep pointing at the damaged chunk: the segments of the parent
    // that need it are read again, with a change source (extents) and without one.
    for with_extents in [false, true] {
        let e = Env::new();
        let src = e.path("disk.img");
        std::fs::write(&src, noise(92, 16 << 20)).unwrap();
        let v = format!("disk={}", src.display());
        let s1 = e.json(&["backup", "--volume", &v, "--group", "g"]);
        let want1 = hash(&src);
        // A change in the last segment; the damage lies in the full backup's pack.
        std::fs::OpenOptions::new().write(true).open(&src).unwrap().write_all_at(&noise(93, 65_536), 15 << 20).unwrap();
        let s2 = e.json(&["backup", "--volume", &v, "--group", "g", "--parent", "latest"]);
        assert!(s2["bytes_reused_parent"].as_u64().unwrap() >= 12 << 20, "{s2}");
        let want2 = hash(&src);
        damage_and_find(&e);
        assert!(restored(&e, &id(&s2), "r.img").is_err(), "the incremental shares the damaged chunk");

        // Nothing changed since: yet the backup reads the damaged chunk's segment again.
        let mut args = vec!["backup", "--volume", &v, "--group", "g", "--parent", "latest"];
        let none = e.path("none.txt");
        write_extents(&none, &[]);
        if with_extents {
            args.extend(["--changed-extents", none.to_str().unwrap()]);
        }
        let s3 = e.json(&args);
        assert_eq!(s3["chunks_new"].as_u64(), Some(1), "the damaged chunk, stored anew (with_extents {with_extents}): {s3}");
        if with_extents {
            assert!(s3["bytes_read"].as_u64().unwrap() <= 8 << 20, "only the segment(s) that need it are read: {s3}");
        }
        assert_eq!(restored(&e, &id(&s3), "r.img").unwrap(), want2);
        assert_eq!(restored(&e, &id(&s2), "r.img").unwrap(), want2, "healed");
        assert_eq!(restored(&e, &id(&s1), "r.img").unwrap(), want1, "healed");
        let (ok, r) = check(&e);
        assert!(ok, "{r}");
    }
}

/// A primary with two snapshots of a 12 MiB disk, copied to a second repository; then the
/// disk is gone (nothing a backup could heal from) and a pack at the primary is damaged.
fn primary_and_copy() -> (Env, Env, PathBuf, Vec<(String, String)>) {
    let a = Env::new();
    let b = Env::new();
    let src = a.path("disk.img");
    std::fs::write(&src, noise(94, 12 << 20)).unwrap();
    let v = format!("disk={}", src.display());
    let mut snaps = Vec::new();
    let s = a.json(&["backup", "--volume", &v, "--group", "vms/db"]);
    snaps.push((id(&s), hash(&src)));
    std::fs::OpenOptions::new().write(true).open(&src).unwrap().write_all_at(&noise(95, 65_536), 0).unwrap();
    let s = a.json(&["backup", "--volume", &v, "--group", "vms/db", "--parent", "latest"]);
    snaps.push((id(&s), hash(&src)));
    let mut c = a.cmd(&["copy", "--to", b.repo.as_str(), "--json"]);
    c.env("MOVER_TO_PASSWORD", "test-password");
    assert!(c.output().unwrap().status.success());
    let kept = a.path("kept.img");
    std::fs::rename(&src, &kept).unwrap();
    damage_and_find(&a);
    (a, b, kept, snaps)
}

#[test]
fn repair_reports_exactly_what_is_lost_then_heals_it_from_a_second_repository() {
    let (a, b, _kept, snaps) = primary_and_copy();
    // Nothing to heal from: the lost ranges, per snapshot, and a failure.
    let o = a.run(&["repair", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["unhealed_before"].as_u64().unwrap() >= 1 && r["unhealed_after"] == r["unhealed_before"], "{r}");
    let lost = r["lost"].as_array().unwrap();
    let lost_snaps: Vec<&str> = r["lost_snapshots"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(!lost.is_empty() && !lost_snaps.is_empty(), "{r}");
    for l in lost {
        assert_eq!(l["volume"], "disk");
        assert_eq!(l["group"], "vms/db");
        let (off, len) = (l["offset"].as_u64().unwrap(), l["len"].as_u64().unwrap());
        assert!(len > 0 && len <= 8 << 20 && off + len <= 12 << 20, "a chunk's bytes, inside the volume: {l}");
        // The restore of that snapshot fails exactly there.
        let err = restored(&a, l["snapshot"].as_str().unwrap(), "r.img").unwrap_err();
        let at: u64 = err
            .split("at offset ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{err}"));
        assert!(
            lost.iter().any(|m| m["snapshot"] == l["snapshot"] && {
                let (o, n) = (m["offset"].as_u64().unwrap(), m["len"].as_u64().unwrap());
                // The restore names the segment or chunk it failed in: within 4 MiB of a lost range.
                at < o + n && at + (4 << 20) > o
            }),
            "{err} vs {r}"
        );
    }
    // A dry run stores nothing.
    let packs = pack_files(Path::new(&a.repo)).len();
    let d = a.json(&["repair", "--dry-run"]);
    assert_eq!(d["bytes_stored"], 0, "{d}");
    assert_eq!(pack_files(Path::new(&a.repo)).len(), packs);

    // From the copy: read there with its own keys and chunker, proven by our chunk id.
    let mut c = a.cmd(&["repair", "--from", b.repo.as_str(), "--json"]);
    c.env("MOVER_FROM_PASSWORD", "test-password");
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["healed_from_repository"].as_u64().unwrap() >= 1 && r["unhealed_after"] == 0 && r["lost"].as_array().unwrap().is_empty(), "{r}");
    for (sid, want) in &snaps {
        assert_eq!(&restored(&a, sid, "r.img").unwrap(), want, "snapshot {sid} restores byte-exact");
    }
    assert!(check(&a).0);
    // Nothing left to do.
    let r = a.json(&["repair"]);
    assert_eq!(r["unhealed_before"], 0, "{r}");
}

#[test]
fn repair_heals_from_a_volumes_data_and_refuses_what_does_not_match() {
    let (a, _b, kept, snaps) = primary_and_copy();
    // Other data at that path: nothing matches the damaged chunk's id, nothing is stored.
    let wrong = a.path("wrong.img");
    std::fs::write(&wrong, noise(96, 12 << 20)).unwrap();
    let o = a.run(&["repair", "--source", &format!("disk={}", wrong.display()), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["healed_from_source"] == 0 && r["bytes_stored"] == 0, "{r}");
    assert!(a.fail(&["repair", "--source", "disk"]).contains("VOLUME=PATH"));
    assert!(a.fail(&["repair", "--source", &format!("disk={}", a.path("absent.img").display())]).contains("absent.img"));
    // The disk as it is now (it holds the damaged chunk's bytes where they were).
    let r = a.json(&["repair", "--source", &format!("disk={}", kept.display())]);
    assert!(r["healed_from_source"].as_u64().unwrap() >= 1 && r["unhealed_after"] == 0, "{r}");
    for (sid, want) in &snaps {
        assert_eq!(&restored(&a, sid, "r.img").unwrap(), want);
    }
}

#[test]
fn a_restore_that_meets_damage_quarantines_it() {
    // Damage found by a restore (no check ran) is quarantined at once: the next backup
    // does not deduplicate against it.
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(97, 8 << 20)).unwrap();
    let v = format!("disk={}", src.display());
    let s1 = e.json(&["backup", "--volume", &v]);
    flip_byte_in_largest_pack(Path::new(&e.repo));
    assert!(restored(&e, &id(&s1), "r.img").is_err());
    assert_eq!(quarantine_records(&e), 1, "the restore quarantined what it found");
    let s2 = e.json(&["backup", "--volume", &v, "--group", "other"]);
    assert_eq!(s2["chunks_new"].as_u64(), Some(1), "{s2}");
    assert_eq!(restored(&e, &id(&s1), "r.img").unwrap(), hash(&src));
}
