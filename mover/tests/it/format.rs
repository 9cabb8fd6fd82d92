//! The repository format is kept, and proven kept: `tests/fixtures/format-v1` is a
//! repository made by release 0.1.0 (`scripts/make-format-fixture.sh`: two volumes, one
//! with a hole and one of odd size, a full snapshot, an incremental from changed extents
//! with spliced segments, one from the parent's digests, two key files, a drill report).
//! Every later build must open it with either password, check every blob, restore every
//! volume of every snapshot byte-exact, and back up on top of it.

use super::*;

fn fixture() -> (Env, serde_json::Value) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1");
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("expected.json")).unwrap()).unwrap();
    // A copy: locks and new snapshots are written into it.
    let e = Env::new_uninit();
    assert!(Command::new("cp").args(["-a"]).arg(src.join("repo")).arg(&e.repo).status().unwrap().success());
    (e, expected)
}

#[test]
fn a_repository_of_format_v1_reads_checks_and_restores_byte_exact() {
    let (e, want) = fixture();
    let with = |pw: &str, args: &[&str]| {
        let o = e.cmd(args).env("MOVER_PASSWORD", pw).output().unwrap();
        assert!(o.status.success(), "mover {args:?} (password {pw}) failed on the format-v1 repository:\n{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let snaps = want["snapshots"].as_array().unwrap();
    for pw in want["passwords"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()) {
        let listed: serde_json::Value = serde_json::from_str(&with(pw, &["snapshots", "--json"])).unwrap();
        let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
        for s in snaps {
            assert!(ids.contains(&s["id"].as_str().unwrap()), "snapshot {} of the fixture is not listed: {ids:?}", s["id"]);
        }
    }
    let pw = "fixture-password";
    with(pw, &["check", "--read-data"]);
    for s in snaps {
        let id = s["id"].as_str().unwrap();
        for (vol, hash_want) in s["volumes"].as_object().unwrap() {
            let out = e.path(&format!("{}-{vol}.img", &id[..8]));
            with(pw, &["restore", &format!("{id}:{vol}"), out.to_str().unwrap()]);
            assert_eq!(hash(&out), hash_want.as_str().unwrap(), "volume {vol} of snapshot {id} restores differently from what format v1 stored");
        }
    }
    // A backup on top of the old repository: incremental to its newest snapshot.
    let a = e.path(&format!("{}-a.img", &snaps[2]["id"].as_str().unwrap()[..8]));
    let b = e.path(&format!("{}-b.img", &snaps[2]["id"].as_str().unwrap()[..8]));
    modify(&a, 2, 9);
    let vols = [format!("a={}", a.display()), format!("b={}", b.display())];
    let out = with(pw, &["backup", "--volume", &vols[0], "--volume", &vols[1], "--group", "vms/fixture", "--parent", "latest", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["parent"], snaps[2]["id"], "{s}");
    let back = e.path("new-a.img");
    with(pw, &["restore", &format!("{}:a", s["snapshot_id"].as_str().unwrap()), back.to_str().unwrap()]);
    assert_eq!(hash(&back), hash(&a));
    with(pw, &["check"]);
}
