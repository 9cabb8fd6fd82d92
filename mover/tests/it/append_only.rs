//! Append-only nodes (issue 34, docs/immutability.md): a node that may create objects but
//! never delete them backs up, restores, verifies, drills and copies; forget, gc, unlock
//! and unprotect are refused before they change anything; the maintenance node's gc
//! removes what append-only nodes leave (released locks).

use super::*;
use std::collections::BTreeSet;

/// Every object of a local repository (paths under it).
fn files(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

fn run(c: &mut Command) -> (bool, String, String) {
    let o = c.output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn an_append_only_node_backs_up_restores_verifies_drills_and_copies_and_deletes_nothing() {
    let e = Env::new();
    let repo = PathBuf::from(&e.repo);
    let src = e.path("disk.img");
    make_volume(&src, 8 << 20, 91);
    let vol = format!("disk={}", src.display());
    let first = e.json(&["backup", "--volume", &vol, "--group", "vm"]);
    let before = files(&repo);
    let ao = |args: &[&str]| run(e.cmd(args).env("MOVER_APPEND_ONLY", "1"));

    // Everything a backup node does works without deleting.
    let mut data = std::fs::read(&src).unwrap();
    data[1 << 20..(1 << 20) + 4096].copy_from_slice(&noise(92, 4096));
    std::fs::write(&src, &data).unwrap();
    let (ok, out, err) = ao(&["backup", "--volume", &vol, "--group", "vm", "--parent", "latest", "--json"]);
    assert!(ok, "{err}");
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b["parent"], first["snapshot_id"], "{b}");
    let snap = b["snapshot_id"].as_str().unwrap().to_string();
    let restored = e.path("out.img");
    let (ok, _, err) = ao(&["restore", &snap, restored.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(hash(&restored), hash(&src));
    let (ok, _, err) = ao(&["check", "--read-data", "--record"]);
    assert!(ok, "{err}");
    let (ok, _, err) = ao(&["drill", "latest", "--group", "vm", "--scratch", e.path("scratch").to_str().unwrap()]);
    assert!(ok, "{err}");
    let dst = Env::new();
    let (ok, _, err) = run(e.cmd(&["copy", "--to", dst.repo.as_str(), "--json"]).env("MOVER_APPEND_ONLY", "1").env("MOVER_TO_PASSWORD", "test-password"));
    assert!(ok, "{err}");
    assert_eq!(dst.json(&["snapshots"]).as_array().unwrap().len(), 2);
    let after = files(&repo);
    let gone: Vec<&String> = before.difference(&after).collect();
    assert!(gone.is_empty(), "an append-only node deleted {gone:?}");
    // Its locks were released by a newer object of each, not deleted.
    let locks = e.json(&["locks"]);
    let locks = locks.as_array().unwrap();
    assert!(!locks.is_empty(), "no lock object left: were they deleted?");
    assert!(locks.iter().all(|l| l["stale"].as_str().is_some_and(|s| s.contains("released"))), "{locks:?}");

    // What deletes is refused before it changes anything, naming why.
    let now = files(&repo);
    for args in [&["forget", snap.as_str()][..], &["forget", "--keep-last", "1"], &["gc"], &["unlock", "--force"], &["unprotect", snap.as_str()]] {
        let (ok, _, err) = ao(args);
        assert!(!ok, "{args:?} ran on an append-only node");
        assert!(err.contains("append-only") && err.contains("nothing was changed"), "{args:?}: {err}");
        assert!(err.trim_end().lines().count() == 1, "{args:?}: not one line: {err}");
    }
    assert_eq!(files(&repo), now, "a refused operation changed the repository");
    assert_eq!(e.json(&["snapshots"]).as_array().unwrap().len(), 2);

    // The maintenance node (deletes allowed) removes the released locks.
    let g = e.json(&["gc"]);
    assert!(g["stale_locks_removed"].as_u64().unwrap() >= 1, "{g}");
    assert!(e.json(&["locks"]).as_array().unwrap().is_empty());
    assert!(!files(&repo).iter().any(|f| f.starts_with("locks/")), "{:?}", files(&repo));
}

/// Credentials the store denies deletes (the test server's `appender` identity, under a
/// bucket policy that denies `s3:DeleteObject`): backup, restore and verify work; forget
/// and unlock are refused, in one line saying the store refused, with nothing changed; the
/// probe that asked stays as evidence; the maintenance credentials' gc tidies up.
#[test]
fn append_only_credentials_back_up_restore_and_verify_and_the_store_refuses_their_deletes() {
    let e = Env::s3("appendonly");
    let appender = std::env::var("MOVER_TEST_S3_APPENDER").expect("MOVER_TEST_S3_APPENDER: run with scripts/test.sh");
    let (key, secret) = appender.split_once(':').unwrap();
    let objects = || e.s3_objects().into_iter().collect::<BTreeSet<_>>();
    let as_appender = |args: &[&str]| run(e.cmd(args).env("AWS_ACCESS_KEY_ID", key).env("AWS_SECRET_ACCESS_KEY", secret));
    let src = e.path("disk.img");
    make_volume(&src, 8 << 20, 93);
    let (ok, out, err) = as_appender(&["backup", src.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let snap = serde_json::from_str::<serde_json::Value>(&out).unwrap()["snapshot_id"].as_str().unwrap().to_string();
    let restored = e.path("out.img");
    let (ok, _, err) = as_appender(&["restore", &snap, restored.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(hash(&restored), hash(&src));
    let (ok, _, err) = as_appender(&["check", "--read-data", "--record"]);
    assert!(ok, "{err}");
    let left = objects();
    assert!(left.iter().any(|n| n.starts_with("locks/")), "the store kept the appender's lock objects: {left:?}");

    for args in [&["forget", snap.as_str()][..], &["unlock", "--force"]] {
        let (ok, _, err) = as_appender(args);
        assert!(!ok, "{args:?} ran with credentials that may not delete");
        assert!(err.contains("refuses these credentials deletes") && err.contains("nothing was changed"), "{args:?}: {err}");
        assert!(err.trim_end().lines().count() == 1, "{args:?}: not one line: {err}");
    }
    let now = objects();
    assert!(now.iter().any(|n| n.starts_with("probe/create-only-deletes-")), "the refused probe stays: {now:?}");
    let changed: Vec<&String> = now.symmetric_difference(&left).filter(|n| !n.starts_with("probe/")).collect();
    assert!(changed.is_empty(), "a refused operation changed {changed:?}");
    assert_eq!(e.json(&["snapshots"]).as_array().unwrap().len(), 1);

    let g = e.json(&["gc"]);
    assert!(g["stale_locks_removed"].as_u64().unwrap() >= 1, "{g}");
    assert!(!objects().iter().any(|n| n.starts_with("locks/")));
}

/// The journal (tamper evidence): `check` reports a snapshot whose manifest was deleted
/// behind Mover's back — naming it — while one removed by `forget` is not reported; an
/// entry deleted from the middle of the journal, and entries deleted at its end (against
/// the head this node verified), are reported too.
#[test]
fn check_reports_a_snapshot_deleted_behind_movers_back_and_a_cut_journal() {
    let e = Env::new();
    let repo = PathBuf::from(&e.repo);
    let check = || -> (bool, serde_json::Value) {
        let o = e.run(&["check", "--json"]);
        (o.status.success(), serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr))))
    };
    let mut ids = Vec::new();
    for (i, g) in ["a", "b", "c"].iter().enumerate() {
        let p = e.path(&format!("{g}.img"));
        make_volume(&p, 4 << 20, 100 + i as u64);
        ids.push(e.json(&["backup", "--volume", &format!("disk={}", p.display()), "--group", g])["snapshot_id"].as_str().unwrap().to_string());
    }
    let (ok, c) = check();
    assert!(ok, "{c}");
    assert_eq!(c["journal_entries"], 3, "{c}");
    // forget records itself: what it removed is not "deleted behind Mover's back".
    e.ok(&["forget", &ids[1]]);
    let (ok, c) = check();
    assert!(ok && c["journal_entries"] == 4, "{c}");

    // A manifest deleted behind Mover's back.
    std::fs::remove_file(repo.join("snapshots").join(&ids[0])).unwrap();
    let (ok, c) = check();
    assert!(!ok, "{c}");
    let problems: Vec<&str> = c["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(problems.iter().any(|p| p.contains(&ids[0]) && p.contains("deleted behind Mover's back") && p.contains("group 'a'")), "{problems:?}");
    assert!(!problems.iter().any(|p| p.contains(&ids[1])), "the forgotten snapshot is reported: {problems:?}");
    assert_eq!(problems.len(), 1, "{problems:?}");

    // The journal's last entry deleted: shorter than this node verified.
    let entry = |n: u64| repo.join("journal").join(format!("{n:020}"));
    std::fs::remove_file(entry(4)).unwrap();
    let (_, c) = check();
    let problems = c["problems"].to_string();
    assert!(problems.contains("ends at entry 3, but this node verified it up to entry 4"), "{problems}");
    // An entry deleted from the middle: a gap.
    std::fs::remove_file(entry(2)).unwrap();
    let (_, c) = check();
    let problems = c["problems"].to_string();
    assert!(problems.contains("entries 2 to 2 are missing"), "{problems}");
    // A new backup continues the chain after its last entry.
    let p = e.path("d.img");
    make_volume(&p, 4 << 20, 110);
    e.json(&["backup", "--volume", &format!("disk={}", p.display()), "--group", "d"]);
    assert!(entry(4).exists(), "the next backup took entry 4");
}
