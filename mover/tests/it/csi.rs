//! CSI SnapshotMetadata (KEP-3314) as a change source, against the test server in
//! `csi_server`.
use super::*;
use crate::csi_server::{blocks, start, Server, BLOCK};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn cbt_args<'a>(ep: &'a str, dir: &'a Path, snap: &'a str) -> Vec<String> {
    [
        "--cbt-csi",
        ep,
        "--cbt-ca",
        dir.join("ca.pem").to_str().unwrap(),
        "--cbt-token",
        dir.join("token").to_str().unwrap(),
        "--cbt-namespace",
        "vms",
        "--cbt-snapshot",
        snap,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_json(e: &Env, args: &[String]) -> serde_json::Value {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).chain(["--json"]).collect();
    serde_json::from_str(&e.ok(&a)).unwrap()
}

#[test]
fn allocated_then_delta_with_a_resumed_stream_restore_byte_exact() {
    let e = Env::new();
    let dir = e.path("csi");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("token"), "s3cr3t\n").unwrap();
    // Two snapshots of one volume: snap-1, then snap-2 after scattered writes.
    let s1 = e.path("snap-1.img");
    make_volume(&s1, 32 << 20, 21);
    let s2 = e.path("snap-2.img");
    std::fs::copy(&s1, &s2).unwrap();
    modify(&s2, 12, 5);
    let srv = Arc::new(Server { token: "s3cr3t".into(), ..Default::default() });
    srv.snaps.lock().unwrap().insert("vms/snap-1".into(), (s1.clone(), "handle-1".into()));
    srv.snaps.lock().unwrap().insert("vms/snap-2".into(), (s2.clone(), "handle-2".into()));
    let (ep, _rt) = start(&dir, srv.clone());

    // Full: only allocated blocks are read; the stream breaks after 3 messages and resumes.
    srv.break_after.store(3, Ordering::SeqCst);
    let mut a: Vec<String> = ["backup", "--volume"].iter().map(|s| s.to_string()).collect();
    a.push(format!("vm={}", s1.display()));
    a.extend(cbt_args(&ep, &dir, "snap-1"));
    a.extend(["--checkpoint".into(), "handle-1".into()]);
    let full = run_json(&e, &a);
    let offs = srv.offsets.lock().unwrap().clone();
    assert_eq!(offs.len(), 2, "one resume: {offs:?}");
    assert_eq!(offs[0], 0);
    assert_eq!(offs[1] as u64 % BLOCK, 0, "resumed after the last extent received: {offs:?}");
    assert!(offs[1] > 0);
    assert_eq!(restore(&e, &full), hash(&s1));

    // Incremental: GetMetadataDelta from the parent's recorded handle; reads only the
    // segments the changed blocks touch, restores byte-exact.
    srv.offsets.lock().unwrap().clear();
    srv.break_after.store(1, Ordering::SeqCst);
    // The snapshot is not ready for four calls (UNAVAILABLE, waited out with backoff), and
    // the resumed stream's first tuple starts half a block before the resume offset.
    srv.unavailable.store(4, Ordering::SeqCst);
    srv.early_by.store(BLOCK / 2, Ordering::SeqCst);
    let mut a: Vec<String> = ["backup", "--volume"].iter().map(|s| s.to_string()).collect();
    a.push(format!("vm={}", s1.display()));
    // The source of the incremental is the second snapshot's data, at the same path.
    std::fs::copy(&s2, e.path("vm-now.img")).unwrap();
    a[2] = format!("vm={}", e.path("vm-now.img").display());
    a.extend(cbt_args(&ep, &dir, "snap-2"));
    a.extend(["--parent".into(), full["snapshot_id"].as_str().unwrap().into(), "--checkpoint".into(), "handle-2".into()]);
    let inc = run_json(&e, &a);
    assert_eq!(inc["volumes"][0]["change_source"], "csi", "{inc}");
    let b1 = std::fs::read(&s1).unwrap();
    let b2 = std::fs::read(&s2).unwrap();
    let seg = 4u64 << 20;
    // Per touched segment: the changed blocks when they are at most a quarter of it (only
    // they are read), else the whole segment.
    let mut per_seg: std::collections::BTreeMap<u64, u64> = Default::default();
    for b in blocks(&b2, Some(&b1), 0) {
        *per_seg.entry(b.byte_offset as u64 / seg).or_default() += b.size_bytes as u64;
    }
    let expect: u64 = per_seg.values().map(|&d| if d * 4 <= seg { d } else { seg }).sum();
    // The resumed stream's first tuple reaches back over the gap before it: at most that
    // one extra range (within one segment) is read.
    let read = inc["bytes_read"].as_u64().unwrap();
    assert!(read >= expect && read <= expect + seg, "reads the changed blocks only ({per_seg:?}): {inc}");
    assert_eq!(srv.offsets.lock().unwrap().len(), 2, "the delta stream was resumed");
    assert_eq!(srv.unavailable.load(Ordering::SeqCst), 0, "the UNAVAILABLE answers were waited out");
    assert_eq!(restore(&e, &inc), hash(&s2));
}

fn restore(e: &Env, r: &serde_json::Value) -> String {
    let t = e.path("restored.img");
    let _ = std::fs::remove_file(&t);
    e.ok(&["restore", r["snapshot_id"].as_str().unwrap(), t.to_str().unwrap()]);
    hash(&t)
}

#[test]
fn wrong_token_unknown_snapshot_and_wrong_base_fall_back_or_are_refused() {
    let e = Env::new();
    let dir = e.path("csi");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("token"), "wrong").unwrap();
    let s1 = e.path("snap-1.img");
    make_volume(&s1, 16 << 20, 3);
    let srv = Arc::new(Server { token: "right".into(), ..Default::default() });
    srv.snaps.lock().unwrap().insert("vms/snap-1".into(), (s1.clone(), "handle-1".into()));
    let (ep, _rt) = start(&dir, srv.clone());
    let vol = format!("vm={}", s1.display());
    let base: Vec<String> = ["backup", "--volume", &vol].iter().map(|s| s.to_string()).collect();

    // Wrong token: the service says UNAUTHENTICATED; the backup reads everything and says why.
    let r = run_json(&e, &[base.clone(), cbt_args(&ep, &dir, "snap-1"), vec!["--checkpoint".into(), "handle-1".into()]].concat());
    let fb = r["volumes"][0]["change_fallback"].as_str().unwrap();
    assert!(fb.contains("authenticated") || fb.contains("Unauthenticated") || fb.contains("UNAUTHENTICATED"), "{fb}");
    assert_eq!(restore(&e, &r), hash(&s1));
    std::fs::write(dir.join("token"), "right").unwrap();
    // Unknown snapshot: NOT_FOUND, named.
    let r = run_json(
        &e,
        &[base.clone(), cbt_args(&ep, &dir, "no-such-snap"), vec!["--parent".into(), "latest".into(), "--checkpoint".into(), "handle-1".into()]].concat(),
    );
    let fb = r["volumes"][0]["change_fallback"].as_str().unwrap();
    assert!(fb.contains("not found") && fb.contains("handle-1"), "{fb}");
    // A base that is not the parent's: not used; read in full with parent reuse, said so.
    let n = e.snapshot_count();
    let r = run_json(
        &e,
        &[base.clone(), cbt_args(&ep, &dir, "snap-1"), vec!["--parent".into(), "latest".into(), "--cbt-base-id".into(), "handle-0".into()]].concat(),
    );
    let v = &r["volumes"][0];
    assert_eq!(v["change_source"], "parent-digest", "{r}");
    assert!(v["change_fallback"].as_str().unwrap().contains("handle-0"), "{r}");
    assert_eq!(e.snapshot_count(), n + 1);
    assert_eq!(restore(&e, &r), hash(&s1));
    // A source larger than its snapshot (a PVC restored from it with a larger request):
    // the service's blocks cover the snapshot, the bytes past it are read whole.
    let small = e.path("snap-small.img");
    make_volume(&small, 8 << 20, 4);
    srv.snaps.lock().unwrap().insert("vms/snap-small".into(), (small.clone(), "handle-s".into()));
    let grown = e.path("grown.img");
    std::fs::copy(&small, &grown).unwrap();
    std::fs::OpenOptions::new().write(true).open(&grown).unwrap().write_all_at(&noise(5, 4 << 20), 8 << 20).unwrap();
    let r = run_json(
        &e,
        &[vec!["backup".into(), "--volume".into(), format!("vm={}", grown.display()), "--group".into(), "grown".into()], cbt_args(&ep, &dir, "snap-small")]
            .concat(),
    );
    assert_eq!(r["bytes_total"], 12 << 20, "{r}");
    assert!(r["volumes"][0]["change_fallback"].is_null(), "{r}");
    assert_eq!(restore(&e, &r), hash(&grown), "the bytes past the snapshot are there");
    // A source smaller than the snapshot: refused.
    srv.capacity.store(1 << 30, Ordering::SeqCst);
    let err = e.fail(&[base.iter().map(|s| s.as_str()).collect::<Vec<_>>(), cbt_args(&ep, &dir, "snap-1").iter().map(|s| s.as_str()).collect()].concat());
    assert!(err.contains("1073741824") && err.contains("same volume"), "{err}");
}
