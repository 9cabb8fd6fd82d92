//! Operations own their locks (`engine::ops`, `engine::lock::scope`): whichever way an
//! operation ends — done, refused, or failed half way on a damaged pack — the lock it took
//! is gone from the repository when the command returns, so gc on another node never
//! waits for a TTL behind a finished command.

use super::*;

fn locks(repo: &str) -> Vec<String> {
    std::fs::read_dir(Path::new(repo).join("locks")).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

#[test]
fn every_operation_leaves_no_lock_whether_it_succeeds_or_fails() {
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 24 << 20, 41);
    e.ok(&["backup", src.to_str().unwrap(), "--group", "g"]);
    let snap = e.json(&["backup", src.to_str().unwrap(), "--group", "g"])["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(locks(&e.repo), Vec::<String>::new(), "backup");

    // Done: each read operation restores, verifies or copies, and its read lock is gone.
    let out = e.path("out.img");
    e.ok(&["restore", &snap, out.to_str().unwrap()]);
    assert_eq!(hash(&out), hash(&src), "restored byte-exact");
    e.ok(&["drill", &snap]);
    e.ok(&["check", "--read-data"]);
    let second = Env::new();
    let mut copy = e.cmd(&["copy", "--to", &second.repo]);
    copy.env("MOVER_TO_PASSWORD", "test-password");
    let o = copy.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(locks(&e.repo), Vec::<String>::new(), "restore, drill, check, copy (source)");
    assert_eq!(locks(&second.repo), Vec::<String>::new(), "copy (target)");

    // Refused after the lock was taken (the volume is resolved under it).
    let err = e.fail(&["export", &format!("{snap}:nosuch"), "--socket", e.path("x.sock").to_str().unwrap()]);
    assert!(err.contains("'nosuch'"), "{err}");
    assert_eq!(locks(&e.repo), Vec::<String>::new(), "a refused export");

    // Failed half way: a damaged data pack fails the restore, the drill and the check.
    flip_byte_in_largest_pack(Path::new(&e.repo));
    let out2 = e.path("out2.img");
    let err = e.fail(&["restore", &snap, out2.to_str().unwrap()]);
    assert!(err.contains("pack"), "the error names the damaged object: {err}");
    let err = e.fail(&["drill", &snap]);
    assert!(err.contains("pack") || err.contains("chunk"), "{err}");
    let err = e.fail(&["check", "--read-data"]);
    assert!(err.contains("damaged object"), "{err}");
    assert_eq!(locks(&e.repo), Vec::<String>::new(), "failed restore, drill and check");

    // Exclusive operations too.
    e.ok(&["forget", "--keep-last", "1"]);
    assert_eq!(e.snapshot_count(), 1);
    e.ok(&["gc"]);
    assert_eq!(locks(&e.repo), Vec::<String>::new(), "forget and gc");
}
