use super::*;

#[test]
fn retention_plan_dry_run_and_execute() {
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(71, 2 << 20)).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let tag = if i == 1 { "keep=forever" } else { "keep=no" };
        modify(&src, 1, 20 + i);
        ids.push(e.json(&["backup", src.to_str().unwrap(), "--tag", tag])["snapshot_id"].as_str().unwrap().to_string());
    }
    let err = e.fail(&["forget"]);
    assert!(err.contains("no retention policy"), "{err}");
    let plan = e.json(&["forget", "--keep-last", "2", "--keep-tag", "keep=forever", "--dry-run"]);
    assert_eq!(plan["removed"], 0);
    assert_eq!(e.snapshot_count(), 5, "a dry run changes nothing");
    let kept: Vec<String> =
        plan["groups"][0]["snapshots"].as_array().unwrap().iter().filter(|d| d["keep"] == true).map(|d| d["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(kept.len(), 3);
    assert!(kept.contains(&ids[4]) && kept.contains(&ids[3]) && kept.contains(&ids[1]));
    let done = e.json(&["forget", "--keep-last", "2", "--keep-tag", "keep=forever"]);
    assert_eq!(done["removed"], 2);
    assert_eq!(e.snapshot_count(), 3);
    // What is kept still restores.
    let out = e.path("out.img");
    e.ok(&["restore", &ids[4], out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));
    assert!(problems_free(&e));

    // `forget ID…`: those snapshots (a unique prefix will do), nothing else; with a policy
    // it is refused; an unknown id removes nothing.
    let o = e.run(&["forget", &ids[3], "--keep-last", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cannot be used with"), "{err}");
    let err = e.fail(&["forget", &ids[3], "ffffffffffffffff"]);
    assert!(err.contains("ffffffffffffffff"), "{err}");
    assert_eq!(e.snapshot_count(), 3, "nothing removed when one id is unknown");
    let dry = e.json(&["forget", &ids[3][..12], "--dry-run"]);
    assert_eq!((dry["removed"].as_u64(), dry["snapshots"][0]["id"].as_str()), (Some(0), Some(ids[3].as_str())));
    assert_eq!(e.snapshot_count(), 3);
    let done = e.json(&["forget", &ids[3][..12]]);
    assert_eq!(done["removed"], 1);
    assert_eq!(e.snapshot_count(), 2);
    let out = e.path("out.img");
    e.ok(&["restore", &ids[4], out.to_str().unwrap(), "--overwrite"]);
    assert_eq!(hash(&src), hash(&out));
    assert!(problems_free(&e));
}

fn problems_free(e: &Env) -> bool {
    e.run(&["check", "--read-data"]).status.success()
}

/// A protected snapshot survives `forget`: a policy keeps it (reason "protected"), by id
/// it is refused and nothing is removed — until it is unprotected. Protecting a snapshot
/// that does not exist is refused and writes nothing.
#[test]
fn a_protected_snapshot_survives_forget_until_unprotected() {
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(72, 2 << 20)).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        modify(&src, 1, 40 + i);
        ids.push(e.json(&["backup", src.to_str().unwrap()])["snapshot_id"].as_str().unwrap().to_string());
    }
    let p = e.json(&["protect", &ids[0][..12], "--note", "before the upgrade"]);
    assert_eq!((p["protected"].as_bool(), p["changed"].as_bool()), (Some(true), Some(true)), "{p}");
    assert_eq!(p["protection"]["note"], "before the upgrade", "{p}");
    let again = e.json(&["protect", &ids[0]]);
    assert_eq!(again["changed"], false, "protecting twice keeps the first protection: {again}");
    assert_eq!(again["protection"]["note"], "before the upgrade", "{again}");

    let done = e.json(&["forget", "--keep-last", "1"]);
    assert_eq!(done["removed"], 1, "{done}");
    let d0 = done["groups"][0]["snapshots"].as_array().unwrap().iter().find(|d| d["id"] == ids[0].as_str()).unwrap().clone();
    assert_eq!(d0["keep"], true, "{d0}");
    assert!(d0["reasons"].as_array().unwrap().iter().any(|r| r == "protected"), "{d0}");
    let listed = e.json(&["snapshots"]);
    let mut left: Vec<(String, bool)> = listed.as_array().unwrap().iter().map(|s| (s["id"].as_str().unwrap().to_string(), s["protected"] == true)).collect();
    left.sort();
    let mut want = vec![(ids[0].clone(), true), (ids[2].clone(), false)];
    want.sort();
    assert_eq!(left, want);

    // By id: refused, nothing removed (not even the unprotected one named with it).
    let err = e.fail(&["forget", &ids[2], &ids[0]]);
    assert!(err.contains(&ids[0]) && err.contains("protected") && err.contains("nothing was forgotten"), "{err}");
    assert_eq!(e.snapshot_count(), 2);
    // A snapshot that does not exist: refused, no protection written.
    let err = e.fail(&["protect", &"0".repeat(64)]);
    assert!(err.contains(&"0".repeat(64)), "{err}");
    assert_eq!(std::fs::read_dir(Path::new(&e.repo).join("protected")).unwrap().count(), 1);

    let u = e.json(&["unprotect", &ids[0]]);
    assert_eq!(u["changed"], true, "{u}");
    assert_eq!(e.json(&["unprotect", &ids[0]])["changed"], false);
    let done = e.json(&["forget", "--keep-last", "1"]);
    assert_eq!(done["removed"], 1, "{done}");
    assert_eq!(e.snapshot_count(), 1);
    e.ok(&["gc"]);
    let out = e.path("out.img");
    e.ok(&["restore", &ids[2], out.to_str().unwrap()]);
    assert_eq!(hash(&src), hash(&out));
    assert!(problems_free(&e));
}
