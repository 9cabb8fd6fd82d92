//! Backup groups: the identity of what is protected. On Kubernetes a VM's disk is read from
//! a new path every time (a PVC cloned from a new VolumeSnapshot), so `latest`, retention
//! and listings go by group, never by path — and never across groups.
use super::nbd::QemuNbd;
use super::*;

fn id(v: &serde_json::Value) -> String {
    v["snapshot_id"].as_str().unwrap().to_string()
}

fn restore_to_hash(e: &Env, args: &[&str]) -> String {
    let t = e.path("restored.img");
    let _ = std::fs::remove_file(&t);
    let mut a = vec!["restore"];
    a.extend_from_slice(args);
    a.push(t.to_str().unwrap());
    e.ok(&a);
    let h = hash(&t);
    std::fs::remove_file(t).unwrap();
    h
}

#[test]
fn three_backups_of_one_group_from_three_paths_chain_and_forget_keeps_one() {
    let e = Env::new();
    // Three "PVCs", each a copy of the disk at a later point in time, at different paths.
    let paths: Vec<PathBuf> = (1..=3).map(|i| e.path(&format!("pvc-{i}/disk.img"))).collect();
    std::fs::create_dir_all(paths[0].parent().unwrap()).unwrap();
    make_volume(&paths[0], 48 << 20, 3);
    for i in 1..3 {
        std::fs::create_dir_all(paths[i].parent().unwrap()).unwrap();
        std::fs::copy(&paths[i - 1], &paths[i]).unwrap();
        modify(&paths[i], 8, i as u64);
    }
    let mut ids: Vec<String> = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let vol = format!("root={}", p.display());
        let r = e.json(&["backup", "--volume", &vol, "--group", "vms/web-1", "--parent", "latest"]);
        assert_eq!(r["group"], "vms/web-1");
        if i == 0 {
            assert!(r["parent"].is_null(), "the first backup has no parent: {r}");
        } else {
            assert_eq!(r["parent"].as_str(), Some(ids[i - 1].as_str()), "backup {} from {} finds the previous one: {r}", i + 1, p.display());
            assert!(r["bytes_reused_parent"].as_u64().unwrap() >= 16 << 20, "unchanged segments come from the parent: {r}");
            assert!(r["bytes_new"].as_u64().unwrap() < 8 << 20, "only the changes are new: {r}");
        }
        ids.push(id(&r));
    }
    // `restore latest` of the group is the third.
    assert_eq!(restore_to_hash(&e, &["latest", "--group", "vms/web-1"]), hash(&paths[2]));
    // Another group's backup of a disk with the same volume name does not change that.
    let other = e.path("other.img");
    make_volume(&other, 8 << 20, 99);
    e.json(&["backup", "--volume", &format!("root={}", other.display()), "--group", "vms/db-1"]);
    assert_eq!(restore_to_hash(&e, &["latest", "--group", "vms/web-1"]), hash(&paths[2]));
    let listed = e.json(&["snapshots", "--group", "vms/web-1"]);
    let listed: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>(), "the group's snapshots, oldest first");

    // Retention per group: the web VM keeps one, the db VM's only snapshot stays.
    let f = e.json(&["forget", "--keep-last", "1"]);
    assert_eq!(f["removed"].as_u64(), Some(2), "{f}");
    let left = e.json(&["snapshots"]);
    let mut left: Vec<(String, String)> =
        left.as_array().unwrap().iter().map(|s| (s["group"].as_str().unwrap().into(), s["id"].as_str().unwrap().into())).collect();
    left.sort();
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(left[1], ("vms/web-1".to_string(), ids[2].clone()));
    assert_eq!(left[0].0, "vms/db-1");
    assert_eq!(restore_to_hash(&e, &["latest", "--group", "vms/web-1"]), hash(&paths[2]));
}

#[test]
fn without_a_group_a_hosts_disks_of_the_same_names_form_one_group() {
    let e = Env::new();
    let a = e.path("a.img");
    make_volume(&a, 16 << 20, 5);
    let first = e.json(&["backup", a.to_str().unwrap()]);
    let host = e.json(&["snapshots"])[0]["hostname"].as_str().unwrap().to_string();
    assert_eq!(first["group"].as_str(), Some(format!("host/{host}/disk").as_str()), "the documented default: {first}");
    // The same disk name from another path: same group, the first is its parent.
    let b = e.path("b.img");
    std::fs::copy(&a, &b).unwrap();
    let second = e.json(&["backup", b.to_str().unwrap(), "--parent", "latest"]);
    assert_eq!(second["parent"].as_str(), Some(id(&first).as_str()), "{second}");
    // Other volume names: another group, no parent.
    let third = e.json(&["backup", "--volume", &format!("data={}", b.display()), "--parent", "latest"]);
    assert!(third["parent"].is_null(), "{third}");
    assert_eq!(third["group"].as_str(), Some(format!("host/{host}/data").as_str()));
    // `--group-by none` treats the repository as one group.
    let plan = e.json(&["forget", "--keep-last", "1", "--group-by", "none", "--dry-run"]);
    assert_eq!(plan["groups"].as_array().unwrap().len(), 1, "{plan}");
    // A bad group is refused before anything is read or written.
    let before = e.snapshot_count();
    let err = e.fail(&["backup", a.to_str().unwrap(), "--group", "has space"]);
    assert!(err.contains("group 'has space'"), "{err}");
    assert_eq!(e.snapshot_count(), before);
}

#[test]
fn two_groups_with_the_same_volume_name_never_parent_each_other_over_files_and_nbd() {
    let e = Env::new();
    // Files: two VMs, both with a disk called "root".
    let (a, b) = (e.path("a.img"), e.path("b.img"));
    make_volume(&a, 16 << 20, 11);
    make_volume(&b, 16 << 20, 12);
    let ra = e.json(&["backup", "--volume", &format!("root={}", a.display()), "--group", "ns/vm-a"]);
    let rb = e.json(&["backup", "--volume", &format!("root={}", b.display()), "--group", "ns/vm-b", "--parent", "latest"]);
    assert!(rb["parent"].is_null(), "vm-b must not take vm-a's snapshot as its parent: {rb}");
    let ra2 = e.json(&["backup", "--volume", &format!("root={}", a.display()), "--group", "ns/vm-a", "--parent", "latest"]);
    assert_eq!(ra2["parent"].as_str(), Some(id(&ra).as_str()));
    assert_eq!(restore_to_hash(&e, &["latest", "--group", "ns/vm-b"]), hash(&b));
    assert_eq!(restore_to_hash(&e, &["latest", "--group", "ns/vm-a"]), hash(&a));

    // NBD: two exports (QEMU, each with its own dirty bitmap of the same name), the same
    // volume name and checkpoint name; the second VM's incremental must not apply its
    // bitmap to the first VM's snapshot.
    let img = |name: &str, pattern: u8| {
        let p = e.path(name);
        assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "32M"]).status().unwrap().success());
        super::nbd::qemu_io(&p, &[&format!("write -P {pattern} 0 8M")]);
        assert!(Command::new("qemu-img").args(["bitmap", "--add", p.to_str().unwrap(), "cp1"]).status().unwrap().success());
        p
    };
    let (qa, qb) = (img("a.qcow2", 0x11), img("b.qcow2", 0x22));
    let sa = QemuNbd::start(&qa, Some("cp1"), &e.path("a.sock"), None);
    let sb = QemuNbd::start(&qb, Some("cp1"), &e.path("b.sock"), None);
    let fa = e.json(&["backup", "--nbd", &sa.uri, "--name", "root", "--group", "ns/nbd-a", "--checkpoint", "cp1"]);
    // vm-b has never been backed up: `latest` of its group is nothing, so its bitmap has
    // nothing to apply to and the volume is read in full.
    let fb = e.json(&["backup", "--nbd", &sb.uri, "--name", "root", "--group", "ns/nbd-b", "--nbd-bitmap", "cp1", "--parent", "latest", "--checkpoint", "cp1"]);
    assert!(fb["parent"].is_null(), "{fb}");
    assert_ne!(fb["volumes"][0]["change_source"], "nbd", "{fb}");
    assert_eq!(restore_to_hash(&e, &[fb["snapshot_id"].as_str().unwrap()]), super::nbd::raw_hash(&e, &qb));
    // Each VM's next incremental takes its own parent.
    drop((sa, sb));
    super::nbd::qemu_io(&qa, &["write -P 0x33 1M 64k"]);
    super::nbd::qemu_io(&qb, &["write -P 0x44 2M 64k"]);
    for (q, g, first) in [(&qa, "ns/nbd-a", &fa), (&qb, "ns/nbd-b", &fb)] {
        let s = QemuNbd::start(q, Some("cp1"), &e.path("x.sock"), None);
        let r = e.json(&["backup", "--nbd", &s.uri, "--name", "root", "--group", g, "--nbd-bitmap", "cp1", "--parent", "latest"]);
        assert_eq!(r["parent"].as_str(), Some(id(first).as_str()), "{g}: {r}");
        assert_eq!(r["volumes"][0]["change_source"], "nbd", "{r}");
        assert_eq!(r["bytes_read"].as_u64(), Some(64 << 10), "{g}: only the dirty 64 KiB: {r}");
        assert_eq!(restore_to_hash(&e, &["latest", "--group", g]), super::nbd::raw_hash(&e, q));
    }
}
