use super::*;

#[test]
fn file_backup_restore_is_byte_exact_and_sparse() {
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 96 << 20, 1);
    let s = e.json(&["backup", src.to_str().unwrap()]);
    assert_eq!(s["bytes_total"], 96 << 20);
    assert!(s["bytes_zero"].as_u64().unwrap() > 0);
    assert!(s["chunks_dedup"].as_u64().unwrap() > 0, "repeated regions dedup: {s}");
    assert!(["io_uring", "pread"].contains(&s["io_backend"].as_str().unwrap()));
    for k in ["snapshot_id", "bytes_read", "bytes_reused_parent", "bytes_new", "bytes_stored", "chunks_new", "duration_s"] {
        assert!(s.get(k).is_some(), "summary lacks {k}");
    }
    let out = e.path("out.img");
    let r = e.json(&["restore", s["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));
    assert_eq!(r["bytes_written"].as_u64().unwrap() + r["bytes_holes"].as_u64().unwrap(), 96 << 20);
    assert_eq!(r["io_backend"], "io_uring+direct", "restore writes through io_uring with O_DIRECT on this kernel and filesystem");
    // Holes stay holes on a new file.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(allocated < (96 << 20) - r["bytes_holes"].as_u64().unwrap() + (8 << 20), "restored file is not sparse: {allocated}");
}

#[test]
fn odd_sized_volume_restores_exactly_with_direct_writes_and_a_buffered_tail() {
    let e = Env::new();
    let src = e.path("odd.img");
    make_volume(&src, (9 << 20) + 1234, 17);
    let s = e.json(&["backup", "--volume", &format!("odd={}", src.display())]);
    let id = s["snapshot_id"].as_str().unwrap();
    for (name, pre) in [("fresh.img", None), ("dirty.img", Some(0xa5u8))] {
        let t = e.path(name);
        if let Some(b) = pre {
            std::fs::write(&t, vec![b; 12 << 20]).unwrap();
        }
        let r = e.json(&["restore", "--overwrite", id, t.to_str().unwrap()]);
        assert_eq!(hash(&t), hash(&src), "{name}: {r}");
    }
}

#[test]
fn pread_fallback_path_roundtrips() {
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 24 << 20, 2);
    let s = e.json(&["backup", src.to_str().unwrap(), "--io", "pread"]);
    assert_eq!(s["io_backend"], "pread");
    let out = e.path("out.img");
    e.ok(&["restore", "latest", out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));
}

#[test]
fn loop_devices_roundtrip_and_holes_are_zeroed_on_a_dirty_target() {
    let e = Env::new();
    let img = e.path("src.img");
    make_volume(&img, 64 << 20, 3);
    let src = Loop::new(&img, 0);
    let s = e.json(&["backup", src.dev.to_str().unwrap()]);
    assert_eq!(s["io_backend"], "io_uring", "io_uring is available on this kernel");
    // A target full of garbage: holes must come back as zeros.
    let timg = e.path("dst.img");
    std::fs::write(&timg, noise(99, 80 << 20)).unwrap();
    let dst = Loop::new(&timg, 0);
    let err = e.fail(&["restore", s["snapshot_id"].as_str().unwrap(), dst.dev.to_str().unwrap()]);
    assert!(err.contains("already holds data"), "{err}");
    e.ok(&["restore", "--overwrite", s["snapshot_id"].as_str().unwrap(), dst.dev.to_str().unwrap()]);
    assert_eq!(hash(&img), hash_prefix(&dst.dev, 64 << 20));
}

#[test]
fn incremental_chain_with_and_without_extents() {
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 64 << 20, 4);
    let full = e.json(&["backup", src.to_str().unwrap()]);
    let h0 = hash(&src);

    // Incremental 1: no extents, parent digests.
    modify(&src, 6, 1);
    let h1 = hash(&src);
    let inc1 = e.json(&["backup", src.to_str().unwrap(), "--parent", "latest"]);
    assert_eq!(inc1["parent"], full["snapshot_id"]);
    assert_eq!(inc1["volumes"][0]["change_source"], "parent-digest");
    assert!(inc1["bytes_reused_parent"].as_u64().unwrap() > 32 << 20, "{inc1}");
    assert!(inc1["bytes_new"].as_u64().unwrap() < 12 << 20, "{inc1}");

    // Incremental 2: with changed extents; the same data backed up without extents
    // must restore identically.
    let ext = modify(&src, 5, 2);
    let h2 = hash(&src);
    let ef = e.path("ext.txt");
    write_extents(&ef, &ext);
    let inc2 = e.json(&["backup", src.to_str().unwrap(), "--parent", inc1["snapshot_id"].as_str().unwrap(), "--changed-extents", ef.to_str().unwrap()]);
    assert_eq!(inc2["volumes"][0]["change_source"], "extents");
    assert!(inc2["bytes_skipped"].as_u64().unwrap() > 32 << 20, "{inc2}");
    assert!(inc2["bytes_read"].as_u64().unwrap() <= 5 * 2 * (4 << 20), "{inc2}");
    let inc2b = e.json(&["backup", src.to_str().unwrap(), "--parent", inc1["snapshot_id"].as_str().unwrap()]);

    for (snap, h) in [(&full, &h0), (&inc1, &h1), (&inc2, &h2), (&inc2b, &h2)] {
        let out = e.path(&format!("r-{}.img", &snap["snapshot_id"].as_str().unwrap()[..8]));
        e.ok(&["restore", snap["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(&hash(&out), h, "restore of {} differs", snap["snapshot_id"]);
    }
    // The manifest records the change source and the statistics.
    let shown = e.json(&["show", inc2["snapshot_id"].as_str().unwrap()]);
    assert_eq!(shown["volumes"][0]["change_source"], "extents");
    assert_eq!(shown["volumes"][0]["stats"]["bytes_skipped"], inc2["bytes_skipped"]);
}

#[test]
fn multi_volume_snapshot_with_metadata() {
    let e = Env::new();
    let (a, b) = (e.path("root.img"), e.path("data.img"));
    make_volume(&a, 20 << 20, 5);
    make_volume(&b, 12 << 20, 6);
    let yaml = e.path("vm.yaml");
    std::fs::write(&yaml, "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: web-1\n").unwrap();
    let s = e.json(&[
        "backup",
        "--volume",
        &format!("root={}", a.display()),
        "--volume",
        &format!("data={}", b.display()),
        "--metadata",
        &format!("vm.yaml={}", yaml.display()),
        "--tag",
        "vm=web-1",
    ]);
    let id = s["snapshot_id"].as_str().unwrap();
    let shown = e.json(&["show", id]);
    assert_eq!(shown["volumes"].as_array().unwrap().len(), 2);
    assert_eq!(shown["metadata"][0]["name"], "vm.yaml");
    assert_eq!(shown["tags"]["vm"], "web-1");
    // One volume by name, then all into a directory.
    let one = e.path("data-only.img");
    e.ok(&["restore", &format!("{id}:data"), one.to_str().unwrap()]);
    assert_eq!(hash(&b), hash(&one));
    let dir = e.path("all");
    std::fs::create_dir(&dir).unwrap();
    e.ok(&["restore", id, dir.to_str().unwrap()]);
    assert_eq!(hash(&a), hash(&dir.join("root.img")));
    assert_eq!(hash(&b), hash(&dir.join("data.img")));
}
