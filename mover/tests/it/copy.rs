//! `mover copy`: snapshots to a second repository (local ↔ S3), incrementals as
//! incrementals, nothing sent twice, resumable after a kill, safe beside gc on the target.

use super::*;

/// `mover copy` from `src` to `dst` (whose password is `dst-password`), with `--json`.
fn copy(src: &Env, dst: &Env, extra: &[&str]) -> serde_json::Value {
    let out = copy_cmd(src, dst, extra).output().unwrap();
    assert!(out.status.success(), "copy failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn copy_cmd(src: &Env, dst: &Env, extra: &[&str]) -> Command {
    let mut a = vec!["copy", "--to", dst.repo.as_str(), "--json"];
    a.extend_from_slice(extra);
    let mut c = src.cmd(&a);
    if let Some(i) = dst.extra.iter().position(|x| x == "--s3-endpoint") {
        c.args(["--to-s3-endpoint", &dst.extra[i + 1]]);
    }
    c.env("MOVER_TO_PASSWORD", "test-password");
    c
}

fn ids(e: &Env) -> Vec<serde_json::Value> {
    e.json(&["snapshots"]).as_array().unwrap().clone()
}

/// Restores `snap` of `e` and returns the hash of what was restored.
fn restored_hash(e: &Env, snap: &str, name: &str) -> String {
    let out = e.path(name);
    let _ = std::fs::remove_file(&out);
    e.ok(&["restore", snap, out.to_str().unwrap()]);
    let h = hash(&out);
    std::fs::remove_file(&out).unwrap();
    h
}

#[test]
fn a_chain_copies_to_s3_and_back_as_incrementals_byte_exact_and_only_once() {
    let a = Env::new();
    let src = a.path("disk.img");
    make_volume(&src, 48 << 20, 5);
    let meta = a.path("vm.yaml");
    std::fs::write(&meta, "kind: VirtualMachine\n").unwrap();
    let mut hashes = Vec::new();
    a.ok(&["backup", src.to_str().unwrap(), "--group", "vms/web", "--tag", "tier=gold", "--metadata", &format!("vm.yaml={}", meta.display())]);
    hashes.push(hash(&src));
    for seed in [1, 2] {
        let ext = modify(&src, 6, seed);
        write_extents(&a.path("ext"), &ext);
        a.ok(&["backup", src.to_str().unwrap(), "--group", "vms/web", "--parent", "latest", "--changed-extents", a.path("ext").to_str().unwrap()]);
        hashes.push(hash(&src));
    }
    let originals = ids(&a);

    // Local → S3.
    let b = Env::s3("copy-target");
    let r = copy(&a, &b, &[]);
    let copied = r["copied"].as_array().unwrap();
    assert_eq!(copied.len(), 3, "{r}");
    assert!(copied[0]["incremental_to"].is_null());
    for (i, c) in copied.iter().enumerate().skip(1) {
        assert_eq!(c["incremental_to"], copied[i - 1]["target_id"], "an incremental copies as an incremental: {r}");
        // Only the segments that differ from the parent are read: 6 writes of 64 KiB
        // touch at most 12 segments of 4 MiB.
        assert!(c["bytes_read"].as_u64().unwrap() <= 6 * 2 * (4 << 20), "{c}");
    }
    let copies = ids(&b);
    assert_eq!(copies.len(), 3);
    for (o, c) in originals.iter().zip(&copies) {
        for k in ["group", "time_unix_ms", "tags", "hostname"] {
            assert_eq!(o[k], c[k], "the copy keeps {k}");
        }
    }
    let shown = b.json(&["show", copies[2]["id"].as_str().unwrap()]);
    assert_eq!(shown["origin"]["snapshot"], originals[2]["id"], "the copy records its origin: {shown}");
    assert_eq!(shown["parent"], copies[1]["id"]);
    let first = b.json(&["show", copies[0]["id"].as_str().unwrap()]);
    assert_eq!(first["metadata"][0]["name"], "vm.yaml", "{first}");
    for (i, c) in copies.iter().enumerate() {
        assert_eq!(restored_hash(&b, c["id"].as_str().unwrap(), "from-s3.img"), hashes[i], "copy {i} restores byte-exact");
    }

    // A second copy finds everything there and sends nothing.
    let again = copy(&a, &b, &[]);
    assert_eq!(again["copied"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["already_there"].as_array().unwrap().len(), 3);
    assert_eq!(again["bytes_uploaded"], 0);

    // S3 → a new local repository, and back to the original (where all is already there).
    let c = Env::new();
    let r = copy(&b, &c, &[]);
    assert_eq!(r["copied"].as_array().unwrap().len(), 3, "{r}");
    let back = ids(&c);
    let shown = c.json(&["show", back[2]["id"].as_str().unwrap()]);
    assert_eq!(shown["origin"]["snapshot"], originals[2]["id"], "a copy of a copy names the original: {shown}");
    assert_eq!(restored_hash(&c, back[2]["id"].as_str().unwrap(), "back.img"), hashes[2]);
    let home = copy(&b, &a, &[]);
    assert_eq!(home["copied"].as_array().unwrap().len(), 0, "copies are recognised as the originals: {home}");
    assert_eq!(home["already_there"].as_array().unwrap().len(), 3);
    assert_eq!(a.snapshot_count(), 3);

    // --newer: only what is newer than the target's newest of the group.
    let ext = modify(&src, 2, 3);
    write_extents(&a.path("ext"), &ext);
    a.ok(&["backup", src.to_str().unwrap(), "--group", "vms/web", "--parent", "latest", "--changed-extents", a.path("ext").to_str().unwrap()]);
    let r = copy(&a, &c, &["--newer", "--group", "vms/web"]);
    assert_eq!(r["copied"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["already_there"].as_array().unwrap().len(), 0, "older snapshots are not even considered: {r}");
    assert_eq!(restored_hash(&c, "latest", "newest.img"), hash(&src));
}

#[test]
fn copy_refuses_a_wrong_target_password_and_the_same_repository_and_writes_nothing() {
    let a = Env::new();
    let src = a.path("disk.img");
    make_volume(&src, 8 << 20, 2);
    a.ok(&["backup", src.to_str().unwrap()]);
    let b = Env::new();
    let before = std::fs::read_dir(Path::new(&b.repo).join("packs")).map(|d| d.count()).unwrap_or(0);
    let o = copy_cmd(&a, &b, &[]).env("MOVER_TO_PASSWORD", "wrong").output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("wrong password") && err.contains(&b.repo), "{err}");
    let o = copy_cmd(&a, &a, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("same repository"), "{err}");
    assert_eq!(std::fs::read_dir(Path::new(&b.repo).join("packs")).map(|d| d.count()).unwrap_or(0), before, "nothing written");
    assert_eq!(b.snapshot_count(), 0);
    assert!(std::fs::read_dir(Path::new(&b.repo).join("locks")).map(|d| d.count()).unwrap_or(0) == 0, "no lock left behind");
}

#[test]
fn a_killed_copy_resumes_without_sending_again_what_was_indexed() {
    let a = Env::new();
    let src = a.path("big.img");
    std::fs::write(&src, noise(77, 384 << 20)).unwrap();
    a.ok(&["backup", src.to_str().unwrap()]);
    let b = Env::new_uninit();
    b.ok(&["init", "--pack-size-mib", "1"]);
    // Throttled so that it is still running after ten checkpoints.
    let mut child = copy_cmd(&a, &b, &["--uploads", "1", "--limit-upload", &(48u64 << 20).to_string()]).spawn().unwrap();
    kill_after_checkpoints(&mut child, &Path::new(&b.repo).join("index"), 10, "the copy");
    assert_eq!(b.snapshot_count(), 0, "a killed copy writes no snapshot");
    let r = copy(&a, &b, &[]);
    let c = &r["copied"][0];
    // Ten checkpoints of 4 packs of 1 MiB were indexed before the kill: not sent again.
    assert!(c["bytes_new"].as_u64().unwrap() <= (384 - 38) << 20, "{r}");
    // Uploaded: those bytes plus the packs' framing (headers, sealed trailers: ~0.2 %).
    assert!(c["bytes_uploaded"].as_u64().unwrap() <= ((384 - 38) << 20) + (1 << 20), "{r}");
    assert_eq!(restored_hash(&b, "latest", "out.img"), hash(&src));
}

#[test]
fn gc_on_the_target_during_a_copy_loses_nothing() {
    let a = Env::new();
    let src = a.path("disk.img");
    std::fs::write(&src, noise(91, 96 << 20)).unwrap();
    a.ok(&["backup", src.to_str().unwrap(), "--group", "vms/db"]);
    // The target has data of its own to free: a forgotten snapshot.
    let b = Env::new_uninit();
    b.ok(&["init", "--pack-size-mib", "1"]);
    let other = b.path("other.img");
    for seed in [92, 93] {
        std::fs::write(&other, noise(seed, 32 << 20)).unwrap();
        b.ok(&["backup", other.to_str().unwrap(), "--group", "old"]);
    }
    b.ok(&["forget", "--group", "old", "--keep-last", "1"]);
    let mut child = copy_cmd(&a, &b, &["--limit-upload", &(24u64 << 20).to_string()]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let g = b.json(&["gc"]);
    assert!(child.try_wait().unwrap().is_none(), "gc ran while the copy was still running");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(g["bytes_held_back"].as_u64().unwrap() > 0, "gc saw the copy's lease and held back what it uploaded: {}", g["held_by"]);
    eprintln!("gc during copy: held back {} bytes for {}", g["bytes_held_back"], g["held_by"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(restored_hash(&b, r["copied"][0]["target_id"].as_str().unwrap(), "out.img"), hash(&src));
    let o = b.run(&["check", "--read-data"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}
