use super::*;

#[test]
fn deleted_cache_and_deleted_index_segments_are_rebuilt() {
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 32 << 20, 7);
    let s = e.json(&["backup", src.to_str().unwrap()]);
    std::fs::remove_dir_all(e.path("cache")).unwrap();
    let out = e.path("a.img");
    e.ok(&["restore", "latest", out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));

    // Lose every index segment: restore fails, naming a chunk; rebuild from packs fixes it.
    for f in std::fs::read_dir(Path::new(&e.repo).join("index")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    std::fs::remove_dir_all(e.path("cache")).unwrap();
    let err = e.fail(&["restore", "latest", e.path("b.img").to_str().unwrap()]);
    assert!(err.contains("not in the index"), "{err}");
    let r = e.json(&["index", "rebuild"]);
    assert!(r["packs_from_trailers"].as_u64().unwrap() >= 1, "{r}");
    assert!(!r["segments_written"].as_array().unwrap().is_empty());
    std::fs::remove_dir_all(e.path("cache")).unwrap();
    let out = e.path("c.img");
    e.ok(&["restore", s["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));
}

/// After a gc, a node's local index re-reads only the segments gc wrote and removes what
/// the replaced ones contributed — no rebuild — and ends as a cache built from scratch
/// would: deleted data is not deduplicated against, everything left restores.
#[test]
fn after_gc_a_node_reads_only_the_segments_gc_rewrote() {
    let e = Env::new();
    let mut disks = Vec::new();
    for i in 0..6u64 {
        let p = e.path(&format!("disk{i}.img"));
        make_volume(&p, 8 << 20, 40 + i);
        let r = e.json(&["backup", "--volume", &format!("disk={}", p.display()), "--group", &format!("vm{i}")]);
        disks.push((p, r["snapshot_id"].as_str().unwrap().to_string()));
    }
    // vm0's disk is rewritten; its first snapshot is forgotten and gc frees its packs.
    let old0 = std::fs::read(&disks[0].0).unwrap();
    std::fs::write(&disks[0].0, noise(99, 8 << 20)).unwrap();
    let now0 = e.json(&["backup", "--volume", &format!("disk={}", disks[0].0.display()), "--group", "vm0"]);
    disks[0].1 = now0["snapshot_id"].as_str().unwrap().to_string();
    let before = e.json(&["index", "sync"]);
    assert_eq!(before["segments_ingested"], 0, "the backups ingested their own segments: {before}");
    e.ok(&["forget", "--group", "vm0", "--keep-last", "1"]);
    let g = e.json(&["gc"]);
    assert!(g["packs_deleted"].as_u64().unwrap() > 0, "{g}");
    assert!(g["index_segments_kept"].as_u64().unwrap() >= 6, "the other VMs' segments stay as they are: {g}");
    let s = e.json(&["index", "sync"]);
    assert_eq!(s["segments_removed"], g["index_segments_deleted"], "{s} after {g}");
    assert_eq!(s["segments_ingested"], g["index_segments_written"], "only what gc wrote is read: {s} after {g}");
    assert!(s["entries_removed"].as_u64().unwrap() > 0, "{s}");
    assert!(s["segments_ingested"].as_u64().unwrap() * 2 < s["segments_total"].as_u64().unwrap(), "{s}");
    // Deleted data is not deduplicated against: backed up again, it is uploaded again.
    let back = e.path("old0.img");
    std::fs::write(&back, &old0).unwrap();
    let r = e.json(&["backup", "--volume", &format!("disk={}", back.display()), "--group", "vm0-old"]);
    assert!(r["bytes_new"].as_u64().unwrap() > 4 << 20, "{r}");
    for (p, id) in &disks {
        let out = e.path("out.img");
        let _ = std::fs::remove_file(&out);
        e.ok(&["restore", id, out.to_str().unwrap()]);
        assert_eq!(hash(&out), hash(p), "{id}");
    }
    let c = e.json(&["check", "--read-data"]);
    assert_eq!(c["problems"].as_array().unwrap().len(), 0, "{c}");
}

/// A node's sync lists and reads only the segments other nodes added since its last one,
/// however many the repository holds; after a gc deleted segments it lists everything once
/// and drops what they contributed, so nothing deleted is deduplicated against.
#[test]
fn a_node_syncs_what_others_added_and_everything_after_a_gc() {
    let e = Env::new();
    let node_b = |args: &[&str]| -> serde_json::Value {
        let out = e.cmd(args).env("MOVER_CACHE_DIR", e.path("cache-b")).env("MOVER_LOCK_TTL", "2").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let segments = || std::fs::read_dir(Path::new(&e.repo).join("index")).unwrap().count() as u64;
    let mut disks = Vec::new();
    for i in 0..6u64 {
        let p = e.path(&format!("disk{i}.img"));
        make_volume(&p, 4 << 20, 60 + i);
        e.json(&["backup", "--volume", &format!("disk={}", p.display()), "--group", &format!("vm{i}")]);
        disks.push(p);
    }
    // Node B syncs past the overlap (the lock TTL, 2 s here) after those backups.
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let first = node_b(&["index", "sync", "--json"]);
    assert_eq!(first["incremental"], false, "a new cache lists everything: {first}");
    assert_eq!(first["segments_ingested"].as_u64(), Some(segments()), "{first}");
    // Past the overlap again, node A adds two backups.
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let had = segments();
    for (i, p) in disks.iter().enumerate().take(2) {
        std::fs::write(p, noise(80 + i as u64, 4 << 20)).unwrap();
        e.json(&["backup", "--volume", &format!("disk={}", p.display()), "--group", &format!("vm{i}")]);
    }
    let added = segments() - had;
    assert!(added >= 2, "{added}");
    let next = node_b(&["index", "sync", "--json"]);
    assert_eq!(next["incremental"], true, "{next}");
    assert_eq!(next["segments_total"].as_u64(), Some(added), "only what was added is listed: {next}");
    assert_eq!(next["segments_ingested"].as_u64(), Some(added), "{next}");

    // A gc replaces segments: node B's next sync lists everything and drops them.
    e.ok(&["forget", "--group", "vm0", "--keep-last", "1"]);
    let g = e.json(&["gc"]);
    assert!(g["index_segments_deleted"].as_u64().unwrap() > 0, "{g}");
    let after = node_b(&["index", "sync", "--json"]);
    assert_eq!(after["incremental"], false, "a new gc generation lists everything: {after}");
    assert_eq!(after["segments_removed"], g["index_segments_deleted"], "{after} after {g}");
    let again = node_b(&["index", "sync", "--json"]);
    assert_eq!(again["incremental"], true, "{again}");
    assert_eq!(again["segments_ingested"], 0, "{again}");
    // What gc deleted is not deduplicated against on node B: vm0's first disk is stored again.
    let old0 = e.path("old0.img");
    make_volume(&old0, 4 << 20, 60);
    let r = node_b(&["backup", "--volume", &format!("disk={}", old0.display()), "--group", "vm0-old", "--json"]);
    assert_eq!(r["chunks_dedup"], 0, "{r}");
    assert_eq!(r["bytes_new"].as_u64().unwrap(), r["bytes_total"].as_u64().unwrap() - r["bytes_zero"].as_u64().unwrap(), "{r}");
    let out = e.path("out.img");
    e.ok(&["restore", r["snapshot_id"].as_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(hash(&out), hash(&old0));
    let c = e.json(&["check", "--read-data"]);
    assert_eq!(c["problems"].as_array().unwrap().len(), 0, "{c}");
}

/// A backup reuses only a listing its own process made (a daemon's earlier backups): a new
/// process — a rerun, a daemon restarted after a kill — lists, so it deduplicates what
/// another node stored a moment before, and a parent written by another node is found
/// through the index (after a gc: `a_node_syncs_what_others_added_and_everything_after_a_gc`).
/// (Reuse within a daemon is measured by `benches/fleet.py`: `mover_index_syncs_reused_total`.)
#[test]
fn a_backup_reuses_a_recent_listing_but_not_across_a_gc_or_a_newer_parent() {
    let e = Env::new();
    let node_b = |args: &[&str], interval: &str| -> serde_json::Value {
        let out = e.cmd(args).env("MOVER_CACHE_DIR", e.path("cache-b")).env("MOVER_LOCK_TTL", "2").env("MOVER_INDEX_SYNC_INTERVAL", interval).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let on_b = |p: &Path, group: &str, interval: &str| {
        let vol = format!("disk={}", p.display());
        node_b(&["backup", "--volume", &vol, "--group", group, "--json"], interval)
    };
    let on_a = |p: &Path, group: &str| e.json(&["backup", "--volume", &format!("disk={}", p.display()), "--group", group]);
    let x = e.path("x.img");
    make_volume(&x, 4 << 20, 70);
    let first = on_b(&x, "x", "60");
    assert!(first["bytes_new"].as_u64().unwrap() > 0, "{first}");

    // Node A stores a disk; node B, a new process within the interval, lists and
    // deduplicates all of it.
    let d = e.path("d.img");
    make_volume(&d, 4 << 20, 71);
    on_a(&d, "d");
    let again = on_b(&d, "d-on-b", "60");
    assert_eq!(again["bytes_new"], 0, "a new process lists: {again}");

    // A parent written by A after B's last listing: B lists (the parent's tree is read
    // through the index), and the backup uses the parent's tree.
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let pdisk = e.path("p.img");
    make_volume(&pdisk, 4 << 20, 72);
    let parent = on_a(&pdisk, "p");
    let vol = format!("disk={}", pdisk.display());
    let child = node_b(&["backup", "--volume", &vol, "--group", "p", "--parent", "latest", "--json"], "60");
    assert_eq!(child["parent"], parent["snapshot_id"], "{child}");
    assert_eq!(child["bytes_new"], 0, "the parent's content is known: {child}");
    assert_eq!(child["bytes_reused_parent"].as_u64(), Some(4 << 20), "every segment reused from the parent's tree: {child}");
}

/// `index rebuild` while another process has the local index open (a running daemon holds
/// RocksDB's lock on it) is refused before anything is deleted; once it is closed, the
/// rebuild runs.
#[test]
fn index_rebuild_never_deletes_an_index_another_process_has_open() {
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 8 << 20, 3);
    e.json(&["backup", src.to_str().unwrap()]);
    let lock = std::fs::read_dir(e.path("cache")).unwrap().flatten().map(|d| d.path().join("index-v3/LOCK")).find(|p| p.exists()).expect("the local index");
    let dir = lock.parent().unwrap().to_path_buf();
    // Another process takes RocksDB's lock the way RocksDB does (a POSIX record lock).
    let mut holder = Command::new("python3")
        .args(["-c", "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"])
        .arg(&lock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "held");
    let files_before = std::fs::read_dir(&dir).unwrap().count();
    let err = e.fail(&["index", "rebuild"]);
    assert!(err.contains("in use by another process") && err.contains("nothing was deleted"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), files_before, "the index is untouched");
    let _ = holder.kill();
    let _ = holder.wait();
    e.json(&["index", "rebuild"]);
    assert!(lock.exists(), "rebuilt");
}

#[test]
fn index_rebuild_refuses_a_pack_whose_size_exceeds_any_pack_and_reads_nothing_of_it() {
    // An object under packs/ that no index names, claiming 4 GiB (sparse): its trailer is
    // never read; the rebuild names it and indexes the rest.
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 8 << 20, 4);
    e.json(&["backup", src.to_str().unwrap()]);
    let id = "cd".repeat(32);
    let dir = Path::new(&e.repo).join("packs/cd");
    std::fs::create_dir_all(&dir).unwrap();
    let f = std::fs::File::create(dir.join(&id)).unwrap();
    f.set_len(4 << 30).unwrap();
    let t0 = std::time::Instant::now();
    let r = e.json(&["index", "rebuild"]);
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
    let bad = r["packs_unreadable"].as_array().unwrap();
    assert!(bad.len() == 1 && bad[0].as_str().unwrap().contains(&id) && bad[0].as_str().unwrap().contains("more than"), "{r}");
    assert!(r["entries"].as_u64().unwrap() > 0, "{r}");
}
