//! NBD as a backup source, against real `qemu-nbd` exporting a qcow2 image with a QEMU
//! dirty bitmap (what KubeVirt's incremental backup uses); `nbdinfo --map` is the
//! independent reference for which extents are dirty.
use super::*;
use std::process::Child;
use std::time::{Duration, Instant};

pub(crate) struct QemuNbd {
    child: Child,
    pub uri: String,
}

impl QemuNbd {
    /// Exports `img` read-only over a unix socket, or TCP on 127.0.0.1 when `port` is set.
    pub(crate) fn start(img: &Path, bitmap: Option<&str>, sock: &Path, port: Option<u16>) -> Self {
        Self::spawn(img, bitmap, sock, port, true)
    }

    /// Exports `img` writable over a unix socket.
    pub(crate) fn writable(img: &Path, sock: &Path) -> Self {
        Self::spawn(img, None, sock, None, false)
    }

    fn spawn(img: &Path, bitmap: Option<&str>, sock: &Path, port: Option<u16>, read_only: bool) -> Self {
        let mut c = Command::new("qemu-nbd");
        if read_only {
            c.arg("-r");
        }
        c.args(["-t", "-e", "8", "-f", "qcow2"]);
        if let Some(b) = bitmap {
            c.args(["-B", b]);
        }
        let uri = match port {
            Some(p) => {
                c.args(["-b", "127.0.0.1", "-p", &p.to_string()]);
                format!("nbd://127.0.0.1:{p}/")
            }
            None => {
                let _ = std::fs::remove_file(sock);
                c.args(["-k", sock.to_str().unwrap()]);
                format!("nbd+unix:///?socket={}", sock.display())
            }
        };
        let child = c.arg(img).spawn().expect("qemu-nbd (apt-get install qemu-utils)");
        let t0 = Instant::now();
        loop {
            let up = match port {
                Some(p) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
                None => sock.exists(),
            };
            if up {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, uri }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.arg(img).output().unwrap();
    assert!(o.status.success(), "qemu-io: {}", String::from_utf8_lossy(&o.stderr));
}

pub(crate) fn raw_hash(e: &Env, img: &Path) -> String {
    let raw = e.path("expected.raw");
    assert!(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]).status().unwrap().success());
    let h = hash(&raw);
    std::fs::remove_file(raw).unwrap();
    h
}

/// Dirty extents as `nbdinfo --map` sees them.
pub(crate) fn nbdinfo_dirty(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let o = Command::new("nbdinfo").args(["--json", &format!("--map=qemu:dirty-bitmap:{bitmap}"), uri]).output().expect("nbdinfo (apt-get install libnbd-bin)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|x| x["type"].as_u64().unwrap() & 1 == 1)
        .map(|x| (x["offset"].as_u64().unwrap(), x["length"].as_u64().unwrap()))
        .collect()
}

fn port() -> u16 {
    super::daemon::free_port()
}

pub(crate) fn restore_hash(e: &Env, snap: &str) -> String {
    let t = e.path(&format!("r-{}.img", &snap[..8]));
    e.ok(&["restore", snap, t.to_str().unwrap()]);
    let h = hash(&t);
    std::fs::remove_file(t).unwrap();
    h
}

pub(crate) fn image(e: &Env) -> PathBuf {
    let img = e.path("vm.qcow2");
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "96M"]).status().unwrap().success());
    qemu_io(&img, &["write -P 0x11 0 24M", "write -P 0x22 40M 8M", "write -P 0x5a 90M 6M"]);
    assert!(Command::new("qemu-img").args(["bitmap", "--add", img.to_str().unwrap(), "b0"]).status().unwrap().success());
    img
}

#[test]
fn dirty_bitmap_incremental_reads_only_dirty_segments_and_restores_byte_exact() {
    let e = Env::new();
    let img = image(&e);
    let full = {
        let s = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
        let r = e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--checkpoint", "b0"]);
        assert_eq!(r["io_backend"], "nbd");
        assert_eq!(r["bytes_read"].as_u64(), Some(40 << 20), "only allocated data is read: {r}");
        r
    };
    assert_eq!(restore_hash(&e, full["snapshot_id"].as_str().unwrap()), raw_hash(&e, &img));
    // The guest writes; the bitmap records it.
    qemu_io(&img, &["write -P 0x33 5M 64k", "write -P 0x44 41M 1M", "write -P 0x55 70M 3M"]);
    let want = raw_hash(&e, &img);
    let s = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), Some(port()));
    let dirty = nbdinfo_dirty(&s.uri, "b0");
    assert!(!dirty.is_empty());
    let seg = 4u64 << 20;
    // Per touched segment, the dirty bytes when they are at most a quarter of it (only
    // those are read, the rest kept from the parent), else the whole segment.
    let mut per_seg: std::collections::BTreeMap<u64, u64> = Default::default();
    for &(o, l) in &dirty {
        for sg in (o / seg)..(o + l).div_ceil(seg) {
            *per_seg.entry(sg).or_default() += (o + l).min((sg + 1) * seg) - o.max(sg * seg);
        }
    }
    let expect: u64 = per_seg.values().map(|&d| if d * 4 <= seg { d } else { seg }).sum();
    let r = e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--nbd-bitmap", "b0", "--parent", "latest"]);
    let v = &r["volumes"][0];
    assert_eq!(v["change_source"], "nbd", "{r}");
    assert_eq!(r["bytes_read"].as_u64(), Some(expect), "reads exactly what the bitmap marks ({per_seg:?}): {r}");
    assert_eq!(r["bytes_skipped"].as_u64(), Some((96 << 20) - expect), "{r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want, "incremental restores byte-exact");
    // Reading everything gives the same volume.
    let plain = QemuNbd::start(&img, None, &e.path("plain.sock"), None);
    let f = e.json(&["backup", "--nbd", &plain.uri, "--name", "vm"]);
    assert_eq!(restore_hash(&e, f["snapshot_id"].as_str().unwrap()), want);
}

#[test]
fn a_bitmap_not_matching_the_parent_and_a_missing_one_fall_back_to_a_full_read() {
    let e = Env::new();
    let img = image(&e);
    let s = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    // Parent taken without a checkpoint: the bitmap's base cannot be proven to match, so
    // the bitmap is not used — the volume is read in full (parent reuse on) and the
    // backup says why. A scheduled backup runs slower instead of failing.
    e.json(&["backup", "--nbd", &s.uri, "--name", "vm"]);
    let before = e.snapshot_count();
    let r = e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--nbd-bitmap", "b0", "--parent", "latest"]);
    let v = &r["volumes"][0];
    assert_eq!(v["change_source"], "parent-digest", "{r}");
    let why = v["change_fallback"].as_str().unwrap();
    assert!(why.contains("'b0'") && why.contains("no recorded checkpoint"), "{why}");
    assert_eq!(r["bytes_skipped"].as_u64(), Some(0), "read in full, nothing skipped as unchanged: {r}");
    assert_eq!(e.snapshot_count(), before + 1);
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), raw_hash(&e, &img));
    // A bitmap the server does not have: everything is read (parent reuse on), and said so.
    let r = e.json(&["backup", "--nbd", &s.uri, "--name", "vm", "--nbd-bitmap", "nosuch", "--parent", "latest"]);
    let v = &r["volumes"][0];
    assert_eq!(v["change_source"], "parent-digest", "{r}");
    assert!(v["change_fallback"].as_str().unwrap().contains("qemu:dirty-bitmap:nosuch"), "{r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), raw_hash(&e, &img));
    // Bad input names the object.
    let err = e.fail(&["backup", "--nbd", "nbd+unix:///?socket=/nonexistent/sock", "--name", "vm"]);
    assert!(err.contains("/nonexistent/sock"), "{err}");
    let err = e.fail(&["backup", "--nbd", "http://x", "--name", "vm"]);
    assert!(err.contains("http://x"), "{err}");
}

/// nbdkit, the second NBD server: its `file` plugin exports a raw image, read-only, over a
/// unix socket, with the given filters and options.
pub(crate) struct Nbdkit {
    child: Child,
    pub uri: String,
}

impl Nbdkit {
    pub(crate) fn start(img: &Path, sock: &Path, opts: &[&str]) -> Self {
        let _ = std::fs::remove_file(sock);
        let child = Command::new("nbdkit")
            .args(["-f", "-r", "-U"])
            .arg(sock)
            .args(opts.iter().filter(|o| o.starts_with('-')))
            .arg("file")
            .arg(img)
            .args(opts.iter().filter(|o| !o.starts_with('-')))
            .spawn()
            .expect("nbdkit (apt-get install nbdkit)");
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nbdkit { child, uri: format!("nbd+unix:///?socket={}", sock.display()) }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbdkit_with_a_small_maximum_block_size_no_extents_or_no_structured_replies_restores_byte_exact() {
    let e = Env::new();
    // 40 MiB with a 16 MiB hole in the middle (four whole segments).
    let vol = e.path("vol.img");
    let size = 40u64 << 20;
    {
        let f = std::fs::File::create(&vol).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&noise(21, 8 << 20), 0).unwrap();
        f.write_all_at(&b"log line of a guest\n".repeat(8 << 16)[..8 << 20], 24 << 20).unwrap();
        f.write_all_at(&noise(22, 8 << 20), 32 << 20).unwrap();
    }
    let want = hash(&vol);
    let cases: [(&str, &[&str]); 4] = [
        ("plain", &[]),
        // A 4 MiB read is an error here: reads must be split to 1 MiB, aligned to 4 KiB.
        ("blocksize-policy", &["--filter=blocksize-policy", "blocksize-minimum=4096", "blocksize-maximum=1M", "blocksize-error-policy=error"]),
        // No block status: everything is read; zeros still become holes.
        ("noextents", &["--filter=noextents"]),
        // No structured replies: simple replies, no block status.
        ("no-sr", &["--no-sr"]),
    ];
    for (what, opts) in cases {
        let s = Nbdkit::start(&vol, &e.path("kit.sock"), opts);
        let r = e.json(&["backup", "--nbd", &s.uri, "--name", "disk", "--group", "kit"]);
        let read = r["bytes_read"].as_u64().unwrap();
        if what == "plain" || what == "blocksize-policy" {
            assert_eq!(read, 24 << 20, "{what}: the hole found by block status is not read: {r}");
        } else {
            assert_eq!(read, size, "{what}: read in full: {r}");
        }
        assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want, "{what}: byte-exact");
    }
    // A bitmap asked of a server without structured replies: read in full, and said why.
    let s = Nbdkit::start(&vol, &e.path("kit.sock"), &["--no-sr"]);
    let r = e.json(&["backup", "--nbd", &s.uri, "--name", "disk", "--group", "kit", "--nbd-bitmap", "b0", "--parent", "latest"]);
    let why = r["volumes"][0]["change_fallback"].as_str().unwrap_or_default();
    assert!(why.contains("structured replies"), "{r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want);
}

#[test]
fn nbdkit_read_errors_are_retried_and_persistent_ones_fail_naming_the_export() {
    let e = Env::new();
    let vol = e.path("vol.img");
    make_volume(&vol, 24 << 20, 22);
    let trigger = e.path("fail-reads");
    let log = e.path("nbdkit.log");
    // Reads fail with EIO while `trigger` exists; the log filter, outside the error filter,
    // records the failed replies. The trigger goes once the first failure is logged, so
    // the client's retry (100 ms later) succeeds.
    std::fs::write(&trigger, b"").unwrap();
    let opts = [
        "--filter=log",
        "--filter=error",
        &format!("logfile={}", log.display()),
        "error-pread=EIO",
        "error-pread-rate=100%",
        &format!("error-pread-file={}", trigger.display()),
    ];
    let s = Nbdkit::start(&vol, &e.path("kit.sock"), &opts);
    let watcher = {
        let (log, trigger) = (log.clone(), trigger.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if std::fs::read_to_string(&log).unwrap_or_default().contains("error=EIO") {
                    std::fs::remove_file(&trigger).unwrap();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        })
    };
    let o = e.run(&["backup", "--nbd", &s.uri, "--name", "disk", "--json"]);
    assert!(watcher.join().unwrap(), "no read failed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("trying again"), "the retry is logged: {err}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), hash(&vol));
    // Errors that do not stop: the backup fails naming the export and the offset; nothing stored.
    std::fs::write(&trigger, b"").unwrap();
    let before = e.snapshot_count();
    let o = e.run(&["backup", "--nbd", &s.uri, "--name", "disk"]);
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(!o.status.success() && last.starts_with("error: "), "{err}");
    assert!(last.contains("kit.sock") && last.contains("EIO") && last.contains("offset"), "{last}");
    assert_eq!(e.snapshot_count(), before);
}
