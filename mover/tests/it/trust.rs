//! A change source is a claim, not a fact (issue: no input may make Mover store a snapshot
//! that differs from its source). Caller extents that leave changes out and a QEMU dirty
//! bitmap that was reset are caught by the sample of segments they called unchanged; the
//! volume is then read in full in the same backup, and the snapshot restores byte-exact.
//! A restore never writes over data without being told to.
use super::nbd::{image, qemu_io, raw_hash, restore_hash, QemuNbd};
use super::*;
use std::os::unix::fs::FileExt;

/// Overwrites 64 KiB at the start of each of `segs` (4 MiB segments).
fn touch_segments(path: &Path, segs: &[u64], seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (i, s) in segs.iter().enumerate() {
        f.write_all_at(&noise(seed + i as u64, 65_536), s * (4 << 20)).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn extents_that_leave_out_changes_are_caught_and_the_volume_read_in_full() {
    let e = Env::new();
    let vol = e.path("disk.img");
    make_volume(&vol, 64 << 20, 5);
    let v = vol.to_str().unwrap();
    e.json(&["backup", "--name", "disk", "--group", "g", v]);
    // A quarter of the 16 segments change; the extents file claims one small range elsewhere.
    touch_segments(&vol, &[2, 5, 9, 13], 40);
    let lie = e.path("lie.txt");
    write_extents(&lie, &[(7 << 20, 4096)]);
    let want = hash(&vol);

    // Without the check the lie is stored (what the sample prevents): the snapshot is not
    // the volume.
    let blind =
        e.json(&["backup", "--name", "disk", "--group", "g", "--parent", "latest", "--changed-extents", lie.to_str().unwrap(), "--verify-sample", "0", v]);
    assert_eq!(blind["volumes"][0]["change_source"], "extents", "{blind}");
    assert_ne!(restore_hash(&e, blind["snapshot_id"].as_str().unwrap()), want, "an unchecked lie is stored as it was told");

    // With the default sample: caught, read in full in the same backup, said why.
    let r = e.json(&["backup", "--name", "disk", "--group", "g", "--parent", "latest", "--changed-extents", lie.to_str().unwrap(), v]);
    let vr = &r["volumes"][0];
    assert_eq!(vr["change_source"], "parent-digest", "read in full with parent reuse: {r}");
    let check = &vr["change_check"];
    assert_eq!(check["source"], "extents", "{r}");
    assert_eq!(check["differed"].as_u64(), Some(4), "the four segments left out (the sample covers all 15 called unchanged): {r}");
    assert!(vr["change_fallback"].as_str().unwrap_or_default().contains("differs from parent snapshot"), "{r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want, "byte-exact");
    // The manifest records why.
    let shown = e.json(&["show", r["snapshot_id"].as_str().unwrap()]);
    assert!(shown["volumes"][0]["change_fallback"].as_str().unwrap_or_default().contains("extents"), "{shown}");

    // Truthful extents pass the check and are used: only their segments are read.
    touch_segments(&vol, &[11], 90);
    let truth = e.path("truth.txt");
    write_extents(&truth, &[(11 << 22, 65_536)]);
    let r = e.json(&["backup", "--name", "disk", "--group", "g", "--parent", "latest", "--changed-extents", truth.to_str().unwrap(), v]);
    let vr = &r["volumes"][0];
    assert_eq!(vr["change_source"], "extents", "{r}");
    assert_eq!(vr["change_check"]["differed"].as_u64(), Some(0), "{r}");
    assert!(vr["change_check"]["compared"].as_u64().unwrap() >= 10, "{r}");
    assert_eq!(r["bytes_read"].as_u64(), Some(65_536), "{r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), hash(&vol));
}

#[test]
fn a_periodic_full_comparison_reads_everything_and_reports_a_lie() {
    let e = Env::new();
    let vol = e.path("disk.img");
    make_volume(&vol, 32 << 20, 8);
    let v = vol.to_str().unwrap();
    e.json(&["backup", "--name", "disk", "--group", "g", v]);
    let ext = e.path("ext.txt");
    touch_segments(&vol, &[1], 3);
    write_extents(&ext, &[(1 << 22, 65_536)]);
    let args = |every: &'static str| -> Vec<String> {
        [
            "backup",
            "--name",
            "disk",
            "--group",
            "g",
            "--parent",
            "latest",
            "--changed-extents",
            ext.to_str().unwrap(),
            "--verify-sample",
            "0",
            "--compare-every",
            every,
            v,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| e.json(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let first = run(args("2"));
    assert_eq!(first["volumes"][0]["change_source"], "extents", "the first trusting backup: {first}");
    // The second in a row compares everything; a segment left out is found and reported.
    touch_segments(&vol, &[1, 6], 4);
    let second = run(args("2"));
    let vr = &second["volumes"][0];
    assert_eq!(vr["change_source"], "parent-digest", "{second}");
    assert_eq!(vr["change_check"]["full"], true, "{second}");
    assert_eq!(vr["change_check"]["differed"].as_u64(), Some(1), "segment 6 was left out: {second}");
    assert!(vr["change_fallback"].as_str().unwrap().contains("full comparison"), "{second}");
    assert_eq!(restore_hash(&e, second["snapshot_id"].as_str().unwrap()), hash(&vol));
}

#[test]
fn a_reset_dirty_bitmap_is_caught_and_the_volume_read_in_full() {
    let e = Env::new();
    let img = image(&e); // 96 MiB qcow2 with bitmap b0
    {
        let s = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
        e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--checkpoint", "b0"]);
    }
    qemu_io(&img, &["write -P 0x33 5M 64k", "write -P 0x44 41M 1M", "write -P 0x55 70M 3M"]);
    // The bitmap is reset behind the backup's back (a driver bug, a lost checkpoint).
    assert!(Command::new("qemu-img").args(["bitmap", "--clear", img.to_str().unwrap(), "b0"]).status().unwrap().success());
    let want = raw_hash(&e, &img);
    let s = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    let r = e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--nbd-bitmap", "b0", "--parent", "latest"]);
    let vr = &r["volumes"][0];
    assert_eq!(vr["change_check"]["source"], "nbd", "{r}");
    assert!(vr["change_check"]["differed"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(vr["change_source"], "parent-digest", "{r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want, "byte-exact despite the bitmap");
}

#[test]
fn a_restore_never_overwrites_data_unless_told_and_changes_nothing_when_refused() {
    let e = Env::new();
    let vol = e.path("disk.img");
    make_volume(&vol, 8 << 20, 2);
    let r = e.json(&["backup", "--name", "disk", vol.to_str().unwrap()]);
    let id = r["snapshot_id"].as_str().unwrap();

    // A file that holds data.
    let existing = e.path("existing.img");
    std::fs::write(&existing, noise(9, 8 << 20)).unwrap();
    let before = hash(&existing);
    let err = e.fail(&["restore", id, existing.to_str().unwrap()]);
    assert!(err.contains("already holds data") && err.contains("--overwrite") && err.contains("existing.img"), "{err}");
    assert_eq!(hash(&existing), before, "nothing was written");
    e.ok(&["restore", "--overwrite", id, existing.to_str().unwrap()]);
    assert_eq!(hash(&existing), hash(&vol));

    // A device with a partition table (data in its first MiB), and one with data only in
    // its last MiB (a backup GPT); an all-zero device is restored without asking.
    for (name, at) in [("head", 0u64), ("tail", (8 << 20) - 512)] {
        let img = e.path(&format!("{name}.img"));
        std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        std::fs::OpenOptions::new().write(true).open(&img).unwrap().write_all_at(b"EFI PART", at).unwrap();
        let dev = Loop::new(&img, 8 << 20);
        let before = hash(&img);
        let err = e.fail(&["restore", id, dev.dev.to_str().unwrap()]);
        assert!(err.contains("already holds data") && err.contains(dev.dev.to_str().unwrap()), "{name}: {err}");
        assert_eq!(hash(&img), before, "{name}: nothing was written");
    }
    let zero = Loop::new(&e.path("zero.img"), 8 << 20);
    e.ok(&["restore", id, zero.dev.to_str().unwrap()]);
    assert_eq!(hash(&e.path("zero.img")), hash(&vol));
}

/// A new file target gets its name only once byte-complete: a restore that fails half-way
/// (a damaged chunk) leaves neither the name nor its temporary file behind.
#[test]
fn a_restore_into_a_new_file_names_it_only_once_complete() {
    let e = Env::new();
    let vol = e.path("noise.img");
    std::fs::write(&vol, noise(11, 24 << 20)).unwrap();
    e.json(&["backup", "--name", "disk", vol.to_str().unwrap()]);
    let out_dir = e.path("out");
    std::fs::create_dir(&out_dir).unwrap();
    let ok = out_dir.join("good.img");
    e.ok(&["restore", "latest", ok.to_str().unwrap()]);
    assert_eq!(hash(&ok), hash(&vol));
    let names = |d: &Path| -> Vec<String> { std::fs::read_dir(d).unwrap().map(|f| f.unwrap().file_name().to_string_lossy().into_owned()).collect() };
    assert_eq!(names(&out_dir), ["good.img"], "no temporary file left");

    flip_byte_in_largest_pack(Path::new(&e.repo));
    let bad = out_dir.join("bad.img");
    let err = e.fail(&["restore", "latest", bad.to_str().unwrap()]);
    assert!(err.contains("chunk") || err.contains("pack"), "{err}");
    assert!(!bad.exists(), "a half-written file never carries the target's name");
    assert_eq!(names(&out_dir), ["good.img"], "and its temporary file is removed");
}

#[test]
fn a_restore_onto_a_file_whose_holders_cannot_be_told_is_refused_and_one_held_open_too() {
    // A VM's disk.img belongs to the VM's user (QEMU's uid 107). Without CAP_LEASE no
    // lease can be taken on it, so whether QEMU holds it open cannot be told: the restore
    // is refused (it used to go ahead) and nothing is written. With the capability (as the
    // DaemonSet now has it) the holder is seen.
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(71, 4 << 20)).unwrap();
    let s = e.json(&["backup", "--volume", &format!("disk={}", src.display())]);
    let id = s["snapshot_id"].as_str().unwrap().to_string();
    let target = e.path("vm-disk.img");
    std::fs::write(&target, noise(72, 4 << 20)).unwrap();
    std::os::unix::fs::chown(&target, Some(107), Some(107)).unwrap();
    let before = hash(&target);
    let mut holder = Command::new("sh").arg("-c").arg(format!("exec 3<>{}; exec sleep 60", target.display())).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = target.to_str().unwrap();
    let o = e.cmd_in(&["setpriv", "--bounding-set=-lease", "--inh-caps=-lease"], &["restore", &id, t, "--overwrite"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cannot tell whether another process has it open") && err.contains("CAP_LEASE"), "{err}");
    assert_eq!(hash(&target), before, "nothing was written");
    let err = e.fail(&["restore", &id, t, "--overwrite"]);
    assert!(err.contains("is in use"), "{err}");
    assert_eq!(hash(&target), before, "nothing was written");
    let _ = holder.kill();
    let _ = holder.wait();
    e.ok(&["restore", &id, t, "--overwrite"]);
    assert_eq!(hash(&target), hash(&src));
}

#[test]
fn a_restore_cut_short_leaves_no_header_that_passes_for_a_disk() {
    // An existing disk image restored over (--overwrite) from a snapshot whose data is
    // damaged: the restore fails part-way. The target's old partition table must not stay
    // in front of a mix of old and new bytes (it did: a full-size target 16 % written, no
    // marker); its first MiB is cleared and the snapshot's first segment written last.
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(61, 64 << 20)).unwrap();
    let snap = e.json(&["backup", "--volume", &format!("disk={}", src.display())])["snapshot_id"].as_str().unwrap().to_string();
    let target = e.path("target.img");
    let mut old = noise(62, 64 << 20);
    old[..512].copy_from_slice(&[0x55; 512]); // the old disk's "partition table"
    std::fs::write(&target, &old).unwrap();
    flip_bytes_in_largest_of(&pack_files(Path::new(&e.repo)), &[0.5]);
    let err = e.fail(&["restore", "--overwrite", &snap, target.to_str().unwrap()]);
    assert!(err.contains("is incomplete") && err.contains("restore it again"), "{err}");
    let now = std::fs::read(&target).unwrap();
    assert!(now[..1 << 20].iter().all(|b| *b == 0), "the first MiB of an incomplete restore is not cleared");
    // A restore from an intact snapshot then completes byte-exact, header and all.
    let src2 = e.path("disk2.img");
    std::fs::write(&src2, noise(63, 64 << 20)).unwrap();
    let snap2 = e.json(&["backup", "--volume", &format!("disk={}", src2.display())])["snapshot_id"].as_str().unwrap().to_string();
    e.ok(&["restore", "--overwrite", &snap2, target.to_str().unwrap()]);
    assert_eq!(hash(&target), hash(&src2));
}
