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
