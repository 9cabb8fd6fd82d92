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
}

fn problems_free(e: &Env) -> bool {
    e.run(&["check", "--read-data"]).status.success()
}
