use super::*;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p))
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

/// A repository with two snapshots of one volume (the second after a small change).
fn setup() -> (Env, PathBuf) {
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(61, 20 << 20)).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    modify(&src, 2, 9);
    e.ok(&["backup", src.to_str().unwrap(), "--parent", "latest"]);
    (e, src)
}

fn largest_pack(e: &Env) -> PathBuf {
    let mut packs = files_under(&Path::new(&e.repo).join("packs"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    packs.pop().unwrap()
}

fn problems(e: &Env, args: &[&str]) -> Vec<String> {
    let mut a = vec!["check", "--json"];
    a.extend_from_slice(args);
    let o = e.run(&a);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p: Vec<String> = v["problems"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    assert_eq!(o.status.success(), p.is_empty(), "exit status must say whether there were problems");
    p
}

#[test]
fn healthy_repository_checks_clean_and_stats_add_up() {
    let (e, _src) = setup();
    assert!(problems(&e, &[]).is_empty());
    assert!(problems(&e, &["--read-data"]).is_empty());
    let r = e.json(&["check", "--read-data"]);
    assert!(r["blobs_verified"].as_u64().unwrap() > 100);
    assert!(problems(&e, &["--read-data-subset", "50%"]).is_empty());
    let s = e.json(&["stats"]);
    assert_eq!(s["snapshots"], 2);
    assert_eq!(s["logical_bytes"], 40 << 20);
    let dedup = s["dedup_ratio"].as_f64().unwrap();
    assert!(dedup > 1.7 && dedup < 2.01, "two nearly equal snapshots dedup about 2x: {s}");
    let unique: Vec<u64> = s["per_snapshot"].as_array().unwrap().iter().map(|p| p["unique_bytes"].as_u64().unwrap()).collect();
    assert!(unique.iter().all(|&u| u > 0 && u < 4 << 20), "only the changed chunks are unique: {unique:?}");
}

#[test]
fn flipped_bit_in_a_pack_is_found_by_read_data() {
    let (e, _src) = setup();
    let pack = largest_pack(&e);
    let mut b = std::fs::read(&pack).unwrap();
    let n = b.len();
    b[n / 3] ^= 0x08;
    std::fs::write(&pack, b).unwrap();
    assert!(problems(&e, &[]).is_empty(), "structure is intact");
    let p = problems(&e, &["--read-data"]);
    let id = pack.file_name().unwrap().to_str().unwrap();
    assert!(p.iter().any(|x| x.contains(&format!("pack {id}")) && x.contains("does not hash to its name")), "{p:?}");
    assert!(p.iter().any(|x| x.contains(id) && x.contains("chunk ") && x.contains("authentication failed")), "{p:?}");
    // The damaged pack is named with every snapshot that needs the chunk in it.
    let snaps: Vec<String> = e.json(&["snapshots"]).as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    let o = e.run(&["check", "--read-data", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let d = r["damaged"].as_array().unwrap();
    assert_eq!(d.len(), 1, "one damaged object: {r}");
    assert_eq!(d[0]["object"], format!("pack {id}"));
    let mut needed: Vec<&str> = d[0]["snapshots"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let mut all: Vec<&str> = snaps.iter().map(|s| s.as_str()).collect();
    needed.sort();
    all.sort();
    assert_eq!(needed, all, "both snapshots share the damaged chunk: {r}");
    assert_eq!(r["affected_snapshots"].as_array().unwrap().len(), 2);
    let text = String::from_utf8_lossy(&e.run(&["check", "--read-data"]).stdout).into_owned();
    assert!(text.contains(&format!("damaged: pack {id}")) && text.contains(&snaps[0]) && text.contains("2 snapshot(s) do not restore"), "{text}");
}

#[test]
fn missing_and_truncated_packs() {
    let (e, _src) = setup();
    let pack = largest_pack(&e);
    let id = pack.file_name().unwrap().to_str().unwrap().to_string();
    let b = std::fs::read(&pack).unwrap();
    std::fs::write(&pack, &b[..b.len() / 2]).unwrap();
    let p = problems(&e, &[]);
    assert!(p.iter().any(|x| x.contains(&format!("in pack {id}")) && x.contains("but the pack holds")), "{p:?}");
    std::fs::remove_file(&pack).unwrap();
    let p = problems(&e, &[]);
    assert!(p.iter().any(|x| x.contains(&format!("pack {id}")) && x.contains("missing")), "{p:?}");
}

#[test]
fn flipped_bits_in_index_segment_and_manifest() {
    let (e, _src) = setup();
    let seg = files_under(&Path::new(&e.repo).join("index")).pop().unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    b[40] ^= 1;
    std::fs::write(&seg, b).unwrap();
    let sid = seg.file_name().unwrap().to_str().unwrap().to_string();
    let p = problems(&e, &[]);
    assert!(p.iter().any(|x| x.contains(&format!("index/{sid}")) && x.contains("does not hash to its name")), "{p:?}");
    // index rebuild repairs it from pack trailers.
    e.ok(&["index", "rebuild"]);
    std::fs::remove_file(&seg).unwrap();
    assert!(problems(&e, &["--read-data"]).is_empty(), "after rebuild and removing the damaged segment");

    let snap = files_under(&Path::new(&e.repo).join("snapshots")).pop().unwrap();
    let mut b = std::fs::read(&snap).unwrap();
    b[30] ^= 1;
    std::fs::write(&snap, b).unwrap();
    let name = snap.file_name().unwrap().to_str().unwrap().to_string();
    let p = problems(&e, &[]);
    assert!(p.iter().any(|x| x.contains(&format!("snapshots/{name}"))), "{p:?}");
}

#[test]
fn missing_index_segments_are_reported_and_rebuilt() {
    let (e, src) = setup();
    for f in files_under(&Path::new(&e.repo).join("index")) {
        std::fs::remove_file(f).unwrap();
    }
    let p = problems(&e, &[]);
    assert!(!p.is_empty() && p.iter().all(|x| x.contains("is not in any index segment")), "{p:?}");
    e.ok(&["index", "rebuild"]);
    assert!(problems(&e, &["--read-data"]).is_empty());
    let out = e.path("out.img");
    e.ok(&["restore", "latest", out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));
}

#[test]
fn wrong_key_is_refused() {
    let (e, _src) = setup();
    let o = e.cmd(&["check"]).env("MOVER_PASSWORD", "not-it").output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrong password for repository"));
}
