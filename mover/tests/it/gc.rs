//! Garbage collection with concurrent writers (docs/gc.md): real backup processes,
//! stopped and killed with signals, against a local directory and SeaweedFS.
use super::*;
use std::process::Child;
use std::time::{Duration, Instant};

fn signal(c: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &c.id().to_string()]).status().unwrap().success());
}

/// Writes `len` bytes of content `seed` at `off` (the same seed gives the same bytes, so
/// data forgotten earlier comes back and is deduplicated against what GC took out).
fn write_region(path: &Path, off: u64, len: usize, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&noise(seed, len), off).unwrap();
    f.sync_all().unwrap();
}

fn backup(e: &Env, vol: &str, img: &Path) -> String {
    let v = format!("{vol}={}", img.display());
    e.json(&["backup", "--volume", &v, "--parent", "latest"])["snapshot_id"].as_str().unwrap().to_string()
}

fn restore_matches(e: &Env, snap: &str, want: &str) {
    let t = e.path(&format!("restore-{}.img", &snap[..12]));
    let _ = std::fs::remove_file(&t);
    e.ok(&["restore", snap, t.to_str().unwrap()]);
    assert_eq!(hash(&t), want, "snapshot {snap} restores byte-exact");
    std::fs::remove_file(&t).unwrap();
}

fn check_read_data(e: &Env) {
    let r = e.json(&["check", "--read-data"]);
    assert_eq!(r["problems"].as_array().unwrap().len(), 0, "{r}");
}

fn local_lock_count(e: &Env) -> usize {
    // Only objects: the local store's `.tmp-` files are not locks yet.
    std::fs::read_dir(Path::new(&e.repo).join("locks"))
        .map(|d| d.filter(|f| !f.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-")).count())
        .unwrap_or(0)
}

/// Waits until a backup started in the background holds its lock.
fn wait_lock(e: &Env) {
    let t0 = Instant::now();
    while local_lock_count(e) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "backup never took its lock");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forget_then_gc_frees_at_once_and_caches_forget_the_deleted_packs() {
    let e = Env::new();
    let img = e.path("a.img");
    make_volume(&img, 24 << 20, 1);
    let h1 = hash(&img);
    backup(&e, "vm", &img);
    write_region(&img, 0, 16 << 20, 99);
    let h2 = hash(&img);
    let s2 = backup(&e, "vm", &img);
    e.ok(&["forget", "--keep-last", "1"]);
    let r = e.json(&["gc"]);
    assert!(r["packs_deleted"].as_u64().unwrap() > 0 && r["bytes_freed"].as_u64().unwrap() > 8 << 20, "{r}");
    assert_eq!(r["bytes_held_back"], 0, "idle repository: nothing held back: {r}");
    assert_eq!(r["records_held"], 0, "{r}");
    check_read_data(&e);
    restore_matches(&e, &s2, &h2);
    // The node's RocksDB cache had indexed the deleted packs; a backup of the old content
    // must upload it again instead of deduplicating against packs that are gone.
    make_volume(&img, 24 << 20, 1);
    let v = format!("vm={}", img.display());
    let b = e.json(&["backup", "--volume", &v]);
    assert!(b["bytes_new"].as_u64().unwrap() > 8 << 20, "the deleted data is uploaded again: {b}");
    check_read_data(&e);
    restore_matches(&e, b["snapshot_id"].as_str().unwrap(), &h1);
    let again = e.json(&["gc"]);
    assert_eq!(again["packs_deleted"], 0, "a second gc finds nothing: {again}");
}

#[test]
fn a_running_backup_holds_back_what_gc_took_out_until_it_finishes() {
    let e = Env::new();
    let a = e.path("a.img");
    make_volume(&a, 16 << 20, 1);
    backup(&e, "vm", &a);
    write_region(&a, 0, 12 << 20, 5);
    let ha = hash(&a);
    let sa = backup(&e, "vm", &a);
    e.ok(&["forget", "--keep-last", "1"]);
    // A slow backup of another disk, stopped once it holds its lock.
    let b = e.path("b.img");
    make_volume(&b, 192 << 20, 7);
    let hb = hash(&b);
    let vb = format!("other={}", b.display());
    let child = e.cmd(&["backup", "--volume", &vb, "--json", "--limit-upload", "40000000"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    wait_lock(&e);
    signal(&child, "-STOP");
    let r = e.json(&["gc"]);
    signal(&child, "-CONT");
    assert_eq!(r["packs_deleted"], 0, "nothing deleted while a backup that may use it runs: {r}");
    assert!(r["bytes_held_back"].as_u64().unwrap() > 0 && r["records_held"] == 1, "{r}");
    assert_eq!(r["held_by"].as_array().unwrap().len(), 1, "{r}");
    let locks = e.json(&["locks"]);
    assert!(locks.as_array().unwrap().iter().any(|l| l["kind"] == "backup"), "{locks}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let sb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = e.json(&["gc"]);
    assert!(r["packs_deleted"].as_u64().unwrap() > 0 && r["records_swept"].as_u64().unwrap() >= 1, "freed once the backup finished: {r}");
    assert_eq!(r["bytes_held_back"], 0, "{r}");
    check_read_data(&e);
    restore_matches(&e, &sa, &ha);
    restore_matches(&e, sb["snapshot_id"].as_str().unwrap(), &hb);
}

#[test]
fn stale_locks_expire_and_unlock_removes_only_stale_ones() {
    let e = Env::new();
    let img = e.path("a.img");
    make_volume(&img, 192 << 20, 3);
    let v = format!("vm={}", img.display());
    // A live lock (stopped process, long TTL) is kept by unlock, removed by --force.
    let slow = ["--limit-upload", "40000000"];
    let mut live = e.cmd(&["backup", "--volume", &v]).args(slow).spawn().unwrap();
    wait_lock(&e);
    signal(&live, "-STOP");
    let u = e.json(&["unlock"]);
    assert_eq!(u["removed"].as_array().unwrap().len(), 0, "{u}");
    assert_eq!(u["remaining"].as_array().unwrap().len(), 1, "{u}");
    let u = e.json(&["unlock", "--force"]);
    assert_eq!(u["removed"].as_array().unwrap().len(), 1, "{u}");
    signal(&live, "-KILL");
    live.wait().unwrap();
    // A killed process's lock on this host is stale at once.
    let mut killed = e.cmd(&["backup", "--volume", &v]).args(slow).spawn().unwrap();
    wait_lock(&e);
    signal(&killed, "-KILL");
    killed.wait().unwrap();
    let l = e.json(&["locks"]);
    assert!(l[0]["stale"].as_str().unwrap().contains("is gone"), "{l}");
    let u = e.json(&["unlock"]);
    assert_eq!(u["removed"].as_array().unwrap().len(), 1, "{u}");
    assert_eq!(local_lock_count(&e), 0);
    // A lock not refreshed within its TTL expires; its holder then commits nothing.
    let stopped = e.cmd(&["backup", "--volume", &v]).args(slow).env("MOVER_LOCK_TTL", "2").stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_lock(&e);
    signal(&stopped, "-STOP");
    std::thread::sleep(Duration::from_millis(2600));
    let l = e.json(&["locks"]);
    assert!(l[0]["stale"].as_str().unwrap_or("").contains("expired"), "{l}");
    let r = e.json(&["gc"]);
    assert_eq!(r["stale_locks_removed"], 1, "{r}");
    signal(&stopped, "-CONT");
    let out = stopped.wait_with_output().unwrap();
    assert!(!out.status.success(), "a backup whose lease expired must not commit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lease"), "{err}");
    assert_eq!(e.snapshot_count(), 0);
    // What it uploaded is garbage the next gc removes; the repository stays sound.
    e.ok(&["gc"]);
    check_read_data(&e);
}

/// Three backup processes loop over their disks (content drawn from a small pool, so
/// forgotten data keeps coming back) while forget + gc run again and again.
fn backups_in_a_loop_while_gc_runs(e: Env) {
    let e = std::sync::Arc::new(e);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let e = e.clone();
        writers.push(std::thread::spawn(move || {
            let img = e.path(&format!("disk{w}.img"));
            make_volume(&img, 12 << 20, 10 + w);
            let mut made = Vec::new();
            for i in 0..6u64 {
                write_region(&img, ((i * 3 + w) % 10) << 20, 2 << 20, (i + w) % 3);
                let h = hash(&img);
                made.push((backup(&e, &format!("disk{w}"), &img), h));
            }
            made
        }));
    }
    let gc = {
        let e = e.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut runs, mut freed, mut held, mut resurrected) = (0, 0u64, 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                e.ok(&["forget", "--keep-last", "2"]);
                let r = e.json(&["gc"]);
                freed += r["bytes_freed"].as_u64().unwrap();
                held += (r["bytes_held_back"].as_u64().unwrap() > 0) as usize;
                resurrected += r["entries_resurrected"].as_u64().unwrap();
                runs += 1;
            }
            eprintln!("gc ran {runs} times: freed {freed} bytes, held back by running backups {held} times, {resurrected} entries put back");
            (runs, freed)
        })
    };
    let made: Vec<(String, String)> = writers.into_iter().flat_map(|t| t.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (runs, freed) = gc.join().unwrap();
    assert!(runs >= 2, "gc ran {runs} times during the backups");
    e.ok(&["forget", "--keep-last", "2"]);
    let last = e.json(&["gc"]);
    assert!(freed + last["bytes_freed"].as_u64().unwrap() > 0, "gc freed something: {last}");
    assert_eq!(last["records_held"], 0, "{last}");
    check_read_data(&e);
    let alive: Vec<String> = e.json(&["snapshots"]).as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(alive.len(), 6, "two per disk are kept");
    for (id, h) in made.iter().filter(|(id, _)| alive.contains(id)) {
        restore_matches(&e, id, h);
    }
}

#[test]
fn backups_in_a_loop_while_gc_runs_local() {
    backups_in_a_loop_while_gc_runs(Env::new());
}

#[test]
fn backups_in_a_loop_while_gc_runs_s3() {
    backups_in_a_loop_while_gc_runs(Env::s3("gc-loop"));
}

#[test]
fn gc_killed_at_random_points_is_finished_by_the_next() {
    let e = Env::new_uninit();
    e.ok(&["init", "--pack-size-mib", "1"]);
    let img = e.path("a.img");
    make_volume(&img, 48 << 20, 4);
    for i in 0..3u64 {
        write_region(&img, (i * 7 % 40) << 20, 8 << 20, 50 + i);
        backup(&e, "vm", &img);
    }
    let h = hash(&img);
    e.ok(&["forget", "--keep-last", "1"]);
    let mut seed = 0x9e37_79b9_u64;
    for _ in 0..8 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let delay = Duration::from_millis(30 + (seed >> 33) % 400);
        let mut c = e.cmd(&["gc"]).stdout(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        signal(&c, "-KILL");
        c.wait().unwrap();
        // At every point the repository is sound.
        let r = e.json(&["check"]);
        assert_eq!(r["problems"].as_array().unwrap().len(), 0, "after a gc killed at {delay:?}: {r}");
    }
    let r = e.json(&["gc"]);
    assert_eq!(r["records_held"], 0, "{r}");
    let again = e.json(&["gc"]);
    assert_eq!((again["packs_deleted"].as_u64(), again["records_written"].as_u64()), (Some(0), Some(0)), "nothing left to do: {again}");
    assert_eq!(local_lock_count(&e), 0, "locks of killed gcs are gone");
    check_read_data(&e);
    let snaps = e.json(&["snapshots"]);
    restore_matches(&e, snaps[0]["id"].as_str().unwrap(), &h);
}

/// Locks name their holder's boot and PID namespace: a process id means nothing in another
/// namespace, so containers on one node (one host name) never declare each other's live
/// locks stale — while a killed holder in the same namespace still is at once.
#[test]
fn locks_of_another_pid_namespace_on_this_host_are_never_declared_stale() {
    let e = Env::new();
    let img = e.path("a.img");
    make_volume(&img, 192 << 20, 3);
    let v = format!("vm={}", img.display());
    let ns = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"];
    let in_ns = |args: &[&str]| -> serde_json::Value {
        let o = e.cmd_in(&ns, args).output().unwrap();
        assert!(o.status.success(), "{args:?} in a new PID namespace: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // The holder here; another "container" (a new PID namespace) looks at its lock, where
    // the holder's pid does not exist.
    let mut live = e.cmd(&["backup", "--volume", &v, "--limit-upload", "40000000"]).spawn().unwrap();
    wait_lock(&e);
    signal(&live, "-STOP");
    let l = in_ns(&["locks", "--json"]);
    assert!(l[0]["stale"].is_null(), "a live lock of another namespace was declared stale: {l}");
    assert!(!l[0]["pid_ns"].as_str().unwrap_or_default().is_empty() && !l[0]["boot_id"].as_str().unwrap_or_default().is_empty(), "{l}");
    let u = in_ns(&["unlock", "--json"]);
    assert_eq!(u["removed"].as_array().unwrap().len(), 0, "{u}");
    let g = in_ns(&["gc", "--json"]);
    assert_eq!(g["stale_locks_removed"], 0, "{g}");
    assert_eq!(local_lock_count(&e), 1);
    signal(&live, "-KILL");
    live.wait().unwrap();
    // Killed: in its own namespace that is known at once.
    let l = e.json(&["locks"]);
    assert!(l[0]["stale"].as_str().unwrap_or_default().contains("is gone"), "{l}");
    e.json(&["unlock"]);

    // The holder in a new namespace; this one looks.
    let mut inner = e.cmd_in(&ns, &["backup", "--volume", &v, "--limit-upload", "40000000"]).spawn().unwrap();
    wait_lock(&e);
    let l = e.json(&["locks"]);
    assert!(l[0]["stale"].is_null(), "{l}");
    assert_eq!(e.json(&["unlock"])["removed"].as_array().unwrap().len(), 0);
    // Killed there, it cannot be known here: the lock holds until its TTL.
    signal(&inner, "-KILL");
    inner.wait().unwrap();
    let l = e.json(&["locks"]);
    assert!(l[0]["stale"].is_null(), "only the TTL can tell for another namespace: {l}");
}

/// Restores loop (two at a time) while backups, `forget --keep-last 1` and
/// `gc --repack-unused 0` loop: gc moves live chunks out of every pack with garbage and
/// deletes the old packs, and forgets the snapshot being restored. Every restore succeeds
/// and is byte-exact.
fn restores_in_a_loop_while_gc_repacks(e: Env) {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let e = Arc::new(e);
    let a = e.path("a.img");
    make_volume(&a, 64 << 20, 21);
    let b = e.path("b.img");
    make_volume(&b, 8 << 20, 22);
    let (va, vb) = (format!("a={}", a.display()), format!("b={}", b.display()));
    let hashes: Arc<Mutex<HashMap<String, String>>> = Default::default();
    let snap = |e: &Env| {
        let h = hash(&a);
        let id = e.json(&["backup", "--volume", &va, "--volume", &vb, "--group", "vm", "--parent", "latest"])["snapshot_id"].as_str().unwrap().to_string();
        hashes.lock().unwrap().insert(id.clone(), h);
    };
    snap(&e);
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (e, stop, hashes) = (e.clone(), stop.clone(), hashes.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Acquire) || n == 0 {
                    let t = e.path(&format!("r{r}.img"));
                    let _ = std::fs::remove_file(&t);
                    let o = e.run(&["restore", "latest:a", "--group", "vm", t.to_str().unwrap(), "--json"]);
                    assert!(o.status.success(), "restore {n} of reader {r} failed beside gc: {}", String::from_utf8_lossy(&o.stderr));
                    let id = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["snapshot_id"].as_str().unwrap().to_string();
                    let t0 = Instant::now();
                    let want = loop {
                        if let Some(h) = hashes.lock().unwrap().get(&id) {
                            break h.clone();
                        }
                        assert!(t0.elapsed() < Duration::from_secs(30), "snapshot {id} unknown");
                        std::thread::sleep(Duration::from_millis(10));
                    };
                    assert_eq!(hash(&t), want, "restore {n} of reader {r} (snapshot {id})");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let (mut repacked, mut deleted) = (0, 0);
    for i in 0..6u64 {
        // Both disks change: every older pack ends up with garbage beside live chunks.
        write_region(&a, (i * 9 % 60) << 20, 1 << 20, 100 + i);
        write_region(&b, (i % 6) << 20, 2 << 20, 200 + i);
        snap(&e);
        e.ok(&["forget", "--keep-last", "1"]);
        let r = e.json(&["gc", "--repack-unused", "0"]);
        repacked += r["packs_repacked"].as_u64().unwrap();
        deleted += r["packs_deleted"].as_u64().unwrap();
    }
    stop.store(true, Ordering::Release);
    let restores: usize = readers.into_iter().map(|t| t.join().unwrap()).sum();
    eprintln!("{restores} restores beside 6 rounds of forget + gc: {repacked} packs repacked, {deleted} deleted");
    assert!(repacked > 0 && deleted > 0, "gc moved and deleted packs: {repacked} repacked, {deleted} deleted");
    assert!(restores >= 4, "{restores} restores");
    e.ok(&["gc", "--repack-unused", "0"]);
    check_read_data(&e);
}

#[test]
fn restores_in_a_loop_while_gc_repacks_local() {
    restores_in_a_loop_while_gc_repacks(Env::new());
}

#[test]
fn restores_in_a_loop_while_gc_repacks_s3() {
    restores_in_a_loop_while_gc_repacks(Env::s3("gc-restore"));
}

#[test]
fn gc_recompress_shrinks_compressible_data_keeps_it_byte_exact_and_is_not_redone() {
    let e = Env::new();
    let src = e.path("logs.img");
    let line = "2026-11-22T05:00:00Z INFO api request path=/v1/volumes status=200 took=";
    let text: String = (0..200_000u64).map(|k| format!("{line}{}ms id={}\n", k % 91, k * 7919 % 100_003)).collect();
    let mut data = text.into_bytes();
    data.extend(noise(5, 512 << 10)); // incompressible: copied as it is
    std::fs::write(&src, &data).unwrap();
    e.ok(&["backup", src.to_str().unwrap()]);
    let size = |e: &Env| {
        std::process::Command::new("du")
            .args(["-sb", &e.repo])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap().parse::<u64>().unwrap())
            .unwrap()
    };
    let before = size(&e);
    let r = e.json(&["gc", "--recompress", "15"]);
    assert!(r["packs_recompressed"].as_u64().unwrap() >= 1, "{r}");
    let saved = r["bytes_saved_by_recompression"].as_u64().unwrap();
    let after = size(&e);
    assert!(saved > 0 && after + saved / 2 < before, "recompression shrank the repository: {before} -> {after}, saved {saved}");
    let out = e.path("out.img");
    e.ok(&["restore", "latest", out.to_str().unwrap()]);
    assert_eq!(hash(&out), hash(&src));
    assert!(e.run(&["check", "--read-data"]).status.success());
    let again = e.json(&["gc", "--recompress", "15"]);
    assert_eq!(again["packs_recompressed"], 0, "already compressed at that level: nothing rewritten: {again}");
    assert_eq!(size(&e), after);
}
