//! NBD as a backup source, against real `qemu-nbd` exporting a qcow2 image with a QEMU
//! dirty bitmap (what KubeVirt's incremental backup uses); `nbdinfo --map` is the
//! independent reference for which extents are dirty.
use super::*;
use std::process::Child;
use std::time::{Duration, Instant};

struct QemuNbd {
    child: Child,
    uri: String,
}

impl QemuNbd {
    /// Exports `img` read-only over a unix socket, or TCP on 127.0.0.1 when `port` is set.
    fn start(img: &Path, bitmap: Option<&str>, sock: &Path, port: Option<u16>) -> Self {
        let mut c = Command::new("qemu-nbd");
        c.args(["-r", "-t", "-f", "qcow2"]);
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

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.arg(img).output().unwrap();
    assert!(o.status.success(), "qemu-io: {}", String::from_utf8_lossy(&o.stderr));
}

fn raw_hash(e: &Env, img: &Path) -> String {
    let raw = e.path("expected.raw");
    assert!(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]).status().unwrap().success());
    let h = hash(&raw);
    std::fs::remove_file(raw).unwrap();
    h
}

/// Dirty extents as `nbdinfo --map` sees them.
fn nbdinfo_dirty(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
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
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn restore_hash(e: &Env, snap: &str) -> String {
    let t = e.path(&format!("r-{}.img", &snap[..8]));
    e.ok(&["restore", snap, t.to_str().unwrap()]);
    let h = hash(&t);
    std::fs::remove_file(t).unwrap();
    h
}

fn image(e: &Env) -> PathBuf {
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
