//! KubeVirt's backup API (`backup.kubevirt.io`) as a source.
//!
//! Pull mode runs against `kubevirt_standin.py`, a TEST STAND-IN for virt-exportserver
//! (there is no Kubernetes here) that serves the documented map and data endpoints over
//! HTTPS with the export token, reading the disk from a real qemu-nbd export of a real
//! qcow2 with a real dirty bitmap. Push mode reads real qcow2 files written by `qemu-img`,
//! `qemu-io`, and for incrementals the bitmap's dirty clusters copied the way QEMU's
//! push-mode backup job writes them.
use super::daemon::{make_ca, make_cert};
use super::nbd::{image, nbdinfo_dirty, qemu_io, raw_hash, restore_hash, QemuNbd};
use super::*;
use std::io::BufRead;
use std::process::{Child, Stdio};

const STANDIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/kubevirt_standin.py");
/// Debian's interpreter, which has libnbd's Python binding (python3-libnbd).
const PYTHON: &str = "/usr/bin/python3";
const TOKEN: &str = "export-token-0123456789";

/// The stand-in export server for one disk.
struct Standin {
    child: Child,
    port: u16,
    /// The disk's endpoint prefix (`…/exports/<disk>`), as a backup's status gives it.
    url: String,
    ca: PathBuf,
}

impl Standin {
    /// `mode`: "full" (allocation map) or "incremental" (the dirty bitmap `bitmap`).
    fn start(dir: &Path, nbd_uri: &str, mode: &str, bitmap: Option<&str>) -> Standin {
        Self::start_on(dir, nbd_uri, mode, bitmap, "127.0.0.1:0")
    }

    fn start_on(dir: &Path, nbd_uri: &str, mode: &str, bitmap: Option<&str>, listen: &str) -> Standin {
        Self::start_with(dir, nbd_uri, mode, bitmap, listen, &[])
    }

    /// With the stand-in's test knobs (`--unavailable-for S`, `--blip-after N --blip-for S`,
    /// `--map-ends-at B`).
    fn start_with(dir: &Path, nbd_uri: &str, mode: &str, bitmap: Option<&str>, listen: &str, knobs: &[&str]) -> Standin {
        if !dir.join("kvca.pem").exists() {
            make_ca(dir, "kvca");
            make_cert(dir, "kvca", "export", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
        }
        let mut c = Command::new(PYTHON);
        c.arg(STANDIN).arg("serve").args(knobs).arg(listen).arg(dir.join("export.pem")).arg(dir.join("export.key"));
        c.args([TOKEN, nbd_uri, "root", mode]);
        if let Some(b) = bitmap {
            c.arg(b);
        }
        let mut child = c.stdout(Stdio::piped()).spawn().expect("/usr/bin/python3 with python3-libnbd (scripts/deps.sh test)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let (port, prefix) = line.trim().split_once(' ').unwrap_or_else(|| panic!("the stand-in did not start: '{line}'"));
        let port: u16 = port.parse().unwrap();
        Standin { child, port, url: format!("https://127.0.0.1:{port}{prefix}"), ca: dir.join("kvca.pem") }
    }

    /// Bytes the data endpoint served.
    fn data_bytes(&self) -> u64 {
        self.stats()["data_bytes"].as_u64().unwrap()
    }

    fn stats(&self) -> serde_json::Value {
        let o = Command::new("curl").args(["-sf", "--cacert"]).arg(&self.ca).arg(format!("https://127.0.0.1:{}/stats", self.port)).output().unwrap();
        assert!(o.status.success(), "stats: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an incremental reads, per the engine's rule: in each touched 4 MiB segment the
/// dirty bytes when they are at most a quarter of it, else the whole segment.
fn expected_read(dirty: &[(u64, u64)]) -> u64 {
    let seg = 4u64 << 20;
    let mut per_seg: std::collections::BTreeMap<u64, u64> = Default::default();
    for &(o, l) in dirty {
        for sg in (o / seg)..(o + l).div_ceil(seg) {
            *per_seg.entry(sg).or_default() += (o + l).min((sg + 1) * seg) - o.max(sg * seg);
        }
    }
    per_seg.values().map(|&d| if d * 4 <= seg { d } else { seg }).sum()
}

/// What the data endpoint is asked for by an incremental, per the engine's rule: the
/// requests (dirty ranges of a spliced segment closer than 256 KiB are one request) and
/// their bytes.
fn expected_fetch(dirty: &[(u64, u64)]) -> (u64, u64) {
    let seg = 4u64 << 20;
    let mut per_seg: std::collections::BTreeMap<u64, Vec<(u64, u64)>> = Default::default();
    for &(o, l) in dirty {
        for sg in (o / seg)..(o + l).div_ceil(seg) {
            per_seg.entry(sg).or_default().push((o.max(sg * seg), (o + l).min((sg + 1) * seg)));
        }
    }
    let (mut requests, mut bytes) = (0, 0);
    for rs in per_seg.values() {
        if rs.iter().map(|(a, b)| b - a).sum::<u64>() * 4 > seg {
            (requests, bytes) = (requests + 1, bytes + seg);
            continue;
        }
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for &(a, b) in rs {
            match merged.last_mut() {
                Some(m) if a <= m.1 + (256 << 10) => m.1 = m.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        requests += merged.len() as u64;
        bytes += merged.iter().map(|(a, b)| b - a).sum::<u64>();
    }
    (requests, bytes)
}

fn token_file(e: &Env, token: &str) -> PathBuf {
    let p = e.path(&format!("token-{}", token.len()));
    std::fs::write(&p, token).unwrap();
    p
}

fn kv_args<'a>(url: &'a str, token: &'a Path, ca: &'a Path) -> Vec<&'a str> {
    vec!["--name", "root", "--group", "vms/web-1", "--kubevirt-export", url, "--kubevirt-token", token.to_str().unwrap(), "--kubevirt-ca", ca.to_str().unwrap()]
}

#[test]
fn pull_mode_full_then_incremental_reads_only_what_the_export_marks_and_restores_byte_exact() {
    let e = Env::new();
    let img = image(&e); // 96 MiB: 24 MiB at 0, 8 MiB at 40 MiB, 6 MiB at 90 MiB; bitmap b0
    let tok = token_file(&e, TOKEN);
    // The full backup (VirtualMachineBackup without a tracker checkpoint): the allocation map.
    let full = {
        let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
        let s = Standin::start(e.dir.path(), &nbd.uri, "full", None);
        let mut a = vec!["backup"];
        a.extend(kv_args(&s.url, &tok, &s.ca));
        a.extend(["--checkpoint", "cp-1"]);
        let r = e.json(&a);
        assert_eq!(r["io_backend"], "kubevirt", "{r}");
        assert_eq!(r["bytes_read"].as_u64(), Some(40 << 20), "only the allocated segments: {r}");
        assert_eq!(s.data_bytes(), (40 << 20) + 1, "what the data endpoint served, and the one byte that proves where the map ends");
        r
    };
    assert_eq!(restore_hash(&e, full["snapshot_id"].as_str().unwrap()), raw_hash(&e, &img));
    let shown = e.json(&["show", full["snapshot_id"].as_str().unwrap()]);
    assert_eq!(shown["volumes"][0]["change_base"], "cp-1", "{shown}");

    // The guest writes; the next VirtualMachineBackup is incremental since cp-1.
    // Four small writes 192 KiB apart in one segment: spliced, and fetched in one request.
    qemu_io(
        &img,
        &["write -P 0x33 5M 64k", "write -P 0x44 41M 1M", "write -P 0x55 70M 3M", "write -P 0x66 1000 100"]
            .into_iter()
            .chain(["write -P 0x77 20M 4k", "write -P 0x77 20672k 4k", "write -P 0x77 20864k 4k", "write -P 0x77 21056k 4k"])
            .collect::<Vec<_>>(),
    );
    let want = raw_hash(&e, &img);
    let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    let dirty = nbdinfo_dirty(&nbd.uri, "b0");
    let expect = expected_read(&dirty);
    let (requests, fetched) = expected_fetch(&dirty);
    let s = Standin::start(e.dir.path(), &nbd.uri, "incremental", Some("b0"));
    let mut a = vec!["backup"];
    a.extend(kv_args(&s.url, &tok, &s.ca));
    a.extend(["--kubevirt-base", "cp-1", "--parent", "latest", "--checkpoint", "cp-2"]);
    let r = e.json(&a);
    let v = &r["volumes"][0];
    assert_eq!(v["change_source"], "kubevirt", "{r}");
    assert!(v["change_fallback"].is_null(), "{r}");
    assert_eq!(r["parent"], full["snapshot_id"]);
    assert_eq!(r["bytes_read"].as_u64(), Some(expect), "reads what the map marks dirty ({dirty:?}): {r}");
    let checked = v["change_check"]["bytes"].as_u64().unwrap();
    assert!(v["change_check"]["compared"].as_u64().unwrap() > 0 && v["change_check"]["differed"] == 0, "{r}");
    assert_eq!(
        s.data_bytes(),
        fetched + checked + 1,
        "and the data endpoint served exactly that (with the gaps of coalesced reads), the sample and the end's byte"
    );
    let sampled = checked / (4 << 20);
    assert_eq!(s.stats()["data_requests"].as_u64(), Some(requests + sampled + 1), "nearby dirty ranges of a segment in one GET ({dirty:?})");
    // The four writes in segment 5 are one request; the gaps between them are fetched too.
    let pieces: u64 = dirty.iter().map(|&(o, l)| (o + l).div_ceil(4 << 20) - o / (4 << 20)).sum();
    assert!(fetched > expect && requests + 3 <= pieces, "the four small writes were coalesced: {dirty:?}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want, "incremental restores byte-exact");
}

#[test]
fn a_refused_token_an_expired_export_or_a_wrong_certificate_fall_back_to_the_pvc() {
    let e = Env::new();
    let img = image(&e);
    let pvc = e.path("pvc.img");
    let convert = |to: &Path| {
        let _ = std::fs::remove_file(to);
        assert!(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&img).arg(to).status().unwrap().success());
    };
    // The full backup, from the PVC, taken at checkpoint cp-1.
    convert(&pvc);
    let full = e.json(&["backup", "--name", "root", "--group", "vms/web-1", "--checkpoint", "cp-1", pvc.to_str().unwrap()]);
    qemu_io(&img, &["write -P 0x77 9M 128k", "write -P 0x78 60M 2M"]);
    convert(&pvc); // the PVC of the new snapshot
    let want = hash(&pvc);
    let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    let s = Standin::start(e.dir.path(), &nbd.uri, "incremental", Some("b0"));
    let good = token_file(&e, TOKEN);
    let bad = token_file(&e, "wrong");
    let gone = s.url.replace("/exports/root", "/exports/deleted");
    make_ca(e.dir.path(), "otherca");
    let other_ca = e.path("otherca.pem");

    let mut prev = full["snapshot_id"].clone();
    for (what, url, tok, ca, reason) in [
        ("refused token", s.url.as_str(), &bad, &s.ca, "token was refused"),
        ("expired export", gone.as_str(), &good, &s.ca, "export is gone"),
        ("wrong certificate", s.url.as_str(), &good, &other_ca, "certificate"),
    ] {
        let before = s.data_bytes();
        let mut a = vec!["backup"];
        a.extend(kv_args(url, tok, ca));
        a.extend(["--kubevirt-base", "cp-1", "--parent", "latest", pvc.to_str().unwrap()]);
        let r = e.json(&a);
        let v = &r["volumes"][0];
        assert_eq!(v["change_source"], "parent-digest", "{what}: read in full with parent reuse: {r}");
        let why = v["change_fallback"].as_str().unwrap_or_default();
        assert!(why.contains(reason) && why.contains("PVC"), "{what}: the reason: {why}");
        assert_eq!(r["parent"], prev, "{what}: the group's latest");
        prev = r["snapshot_id"].clone();
        assert!(r["bytes_reused_parent"].as_u64().unwrap() > 0, "{what}: {r}");
        assert_eq!(s.data_bytes(), before, "{what}: nothing was read from the export");
        assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want, "{what}");
    }

    // Without the PVC to fall back on, the backup fails naming the endpoint, and stores nothing.
    let before = e.snapshot_count();
    let mut a = vec!["backup"];
    a.extend(kv_args(&s.url, &bad, &s.ca));
    a.extend(["--kubevirt-base", "cp-1", "--parent", "latest"]);
    let err = e.fail(&a);
    assert!(err.contains(&s.url) && err.contains("401") && err.contains("no PVC"), "{err}");
    assert_eq!(e.snapshot_count(), before);
    // Plain http is refused before anything is sent.
    let err = e.fail(&[
        "backup",
        "--name",
        "root",
        "--kubevirt-export",
        "http://127.0.0.1:1/x",
        "--kubevirt-token",
        good.to_str().unwrap(),
        "--kubevirt-ca",
        s.ca.to_str().unwrap(),
    ]);
    assert!(err.contains("https://"), "{err}");
}

/// Writes what QEMU's push-mode backup job writes for an incremental: the bitmap's dirty
/// clusters of `disk` into a fresh qcow2. Returns the image and the bytes copied.
fn push_incremental(e: &Env, disk: &Path, bitmap: &str, name: &str) -> (PathBuf, u64) {
    let out = e.path(name);
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", out.to_str().unwrap(), "96M"]).status().unwrap().success());
    let src = QemuNbd::start(disk, Some(bitmap), &e.path("src.sock"), None);
    let dst = QemuNbd::writable(&out, &e.path("dst.sock"));
    let o = Command::new(PYTHON).arg(STANDIN).args(["push-incremental", &src.uri, bitmap, &dst.uri]).output().unwrap();
    assert!(o.status.success(), "push-incremental: {}", String::from_utf8_lossy(&o.stderr));
    drop((src, dst));
    (out, String::from_utf8_lossy(&o.stdout).trim().parse().unwrap())
}

#[test]
fn push_mode_qcow2_full_and_incremental_restore_byte_exact() {
    let e = Env::new();
    let disk = image(&e); // the VM's disk, with bitmap b0 from the full backup's checkpoint
                          // The full backup's output image: the disk's data, sparse.
    let full_img = e.path("full.qcow2");
    assert!(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "qcow2"]).arg(&disk).arg(&full_img).status().unwrap().success());
    let full = e.json(&["backup", "--name", "root", "--group", "vms/web-1", "--qcow2", full_img.to_str().unwrap(), "--checkpoint", "cp-1"]);
    assert_eq!(full["volumes"][0]["change_source"], "full", "{full}");
    assert!(full["bytes_read"].as_u64().unwrap() <= 40 << 20, "clusters the image does not hold are holes: {full}");
    assert_eq!(restore_hash(&e, full["snapshot_id"].as_str().unwrap()), raw_hash(&e, &disk));

    // The guest writes (unaligned too); the incremental image holds only dirty clusters.
    qemu_io(&disk, &["write -P 0x33 5M 64k", "write -P 0x44 41M 1M", "write -P 0x55 70M 3M", "write -P 0x66 1000 100"]);
    let (inc, copied) = push_incremental(&e, &disk, "b0", "inc-1.qcow2");
    assert!(copied > 0 && copied < 8 << 20);
    let r = e.json(&[
        "backup",
        "--name",
        "root",
        "--group",
        "vms/web-1",
        "--qcow2",
        inc.to_str().unwrap(),
        "--qcow2-base",
        "cp-1",
        "--parent",
        "latest",
        "--checkpoint",
        "cp-2",
    ]);
    let v = &r["volumes"][0];
    assert_eq!(v["change_source"], "qcow2", "{r}");
    assert_eq!(r["bytes_read"].as_u64(), Some(copied), "only the clusters the image holds: {r}");
    assert_eq!(r["parent"], full["snapshot_id"]);
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), raw_hash(&e, &disk), "applied onto the parent, byte-exact");

    // An incremental image whose base is not the parent's checkpoint cannot be applied
    // (it holds only changes), so it is refused, naming why, and nothing is stored.
    let before = e.snapshot_count();
    let err = e.fail(&["backup", "--name", "root", "--group", "vms/web-1", "--qcow2", inc.to_str().unwrap(), "--qcow2-base", "cp-1", "--parent", "latest"]);
    assert!(err.contains("cp-1") && err.contains("cp-2") && err.contains("holds only the changes"), "{err}");
    // Not a qcow2, a truncated one, a compressed one: clear errors naming the file.
    let raw = e.path("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let err = e.fail(&["backup", "--name", "root", "--qcow2", raw.to_str().unwrap()]);
    assert!(err.contains("raw.img") && err.contains("qcow2"), "{err}");
    let cut = e.path("cut.qcow2");
    std::fs::write(&cut, &std::fs::read(&full_img).unwrap()[..300]).unwrap();
    let err = e.fail(&["backup", "--name", "root", "--qcow2", cut.to_str().unwrap()]);
    assert!(err.contains("cut.qcow2"), "{err}");
    let comp = e.path("comp.qcow2");
    assert!(Command::new("qemu-img").args(["convert", "-c", "-f", "qcow2", "-O", "qcow2"]).arg(&disk).arg(&comp).status().unwrap().success());
    let err = e.fail(&["backup", "--name", "root", "--qcow2", comp.to_str().unwrap()]);
    assert!(err.contains("comp.qcow2") && err.contains("compressed"), "{err}");
    assert_eq!(e.snapshot_count(), before);
}

/// The same through the daemon: a scheduler's StartBackup names the export (its host
/// listed in `kubevirt_export_hosts`), the token and certificate as values, and the VM's
/// group; the incremental finds its parent by group and ListSnapshots filters by it.
#[test]
fn pull_mode_through_the_daemon_by_group() {
    use super::daemon::{client, rt, watch_end, Daemon};
    use mover_protocol::v1 as pb;
    let e = Env::new(); // for its directory and the qemu helpers
    let img = image(&e);
    let (full_port, inc_port) = (super::daemon::free_port(), super::daemon::free_port());
    let hosts = format!("kubevirt_export_hosts = [\"127.0.0.1:{full_port}\", \"127.0.0.1:{inc_port}\"]\n");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &hosts, false);
    let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    let full_srv = Standin::start_on(e.dir.path(), &nbd.uri, "full", None, &format!("127.0.0.1:{full_port}"));
    let cert = std::fs::read_to_string(&full_srv.ca).unwrap();
    let vol = |url: &str, base: &str, checkpoint: &str| pb::BackupVolume {
        name: "root".into(),
        checkpoint: checkpoint.into(),
        kubevirt: Some(pb::KubevirtExport {
            endpoint: url.into(),
            token: TOKEN.into(),
            endpoint_cert: cert.clone(),
            base_checkpoint: base.into(),
            // The VirtualMachineBackup's status.type, as a scheduler reads it.
            backup_type: if base.is_empty() { "Full" } else { "Incremental" }.into(),
        }),
        ..Default::default()
    };
    let req = |v: pb::BackupVolume, group: &str| pb::StartBackupRequest {
        repository: "main".into(),
        volumes: vec![v],
        parent: "latest".into(),
        group: group.into(),
        ..Default::default()
    };
    rt().block_on(async {
        let mut c = client(&d).await;
        let t = c.start_backup(req(vol(&full_srv.url, "", "cp-1"), "vms/web-1")).await.unwrap().into_inner();
        let full = watch_end(&mut c, &t.id).await;
        assert_eq!(full.state(), pb::TransferState::Succeeded, "{}", full.error);
        assert_eq!(full.group, "vms/web-1");
        // Another VM's backup in between must not become the parent.
        let t = c.start_backup(req(vol(&full_srv.url, "", "cp-1"), "vms/other")).await.unwrap().into_inner();
        assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
        // The guest writes (the export servers are stopped: QEMU holds the image).
        drop((full_srv, nbd));
        qemu_io(&img, &["write -P 0x44 41M 1M"]);
        let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
        let inc_srv = Standin::start_on(e.dir.path(), &nbd.uri, "incremental", Some("b0"), &format!("127.0.0.1:{inc_port}"));
        let t = c.start_backup(req(vol(&inc_srv.url, "cp-1", "cp-2"), "vms/web-1")).await.unwrap().into_inner();
        let inc = watch_end(&mut c, &t.id).await;
        assert_eq!(inc.state(), pb::TransferState::Succeeded, "{}", inc.error);
        assert_eq!((inc.changes[0].change_source.as_str(), inc.changes[0].fallback.as_str()), ("kubevirt", ""), "{:?}", inc.changes);
        assert_eq!(inc.stats.unwrap().bytes_read, 1 << 20, "only the dirty megabyte");
        let ch = mover::client::connect(&mover::client::Conn { server: d.grpc.clone(), ..Default::default() }).await.unwrap();
        let mut rc = pb::repository_service_client::RepositoryServiceClient::new(ch);
        let list = rc.list_snapshots(pb::ListSnapshotsRequest { repository: "main".into(), group: "vms/web-1".into() }).await.unwrap().into_inner();
        let ids: Vec<&str> = list.snapshots.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, [full.snapshot_id.as_str(), inc.snapshot_id.as_str()]);
        assert!(list.snapshots.iter().all(|s| s.group == "vms/web-1"));
        let snap = list.snapshots.last().unwrap();
        assert_eq!(snap.parent, full.snapshot_id, "the parent is the group's latest, not the other VM's");
    });
    // Restored through the CLI from the daemon's repository: byte-exact.
    let out = e.path("restored.img");
    let o = Command::new(env!("CARGO_BIN_EXE_mover"))
        .args(["restore", "latest", "--group", "vms/web-1"])
        .arg(&out)
        .env("MOVER_REPOSITORY", dir.path().join("repo"))
        .env("MOVER_PASSWORD", "daemon-test-pw")
        .env("MOVER_CACHE_DIR", dir.path().join("clicache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(hash(&out), raw_hash(&e, &img));
}

/// A full backup at cp-1 through the export, then the guest writes 4 MiB: the image, the
/// full snapshot's id and the bytes the disk now holds.
fn full_then_write(e: &Env, tok: &Path) -> (PathBuf, String, String) {
    let img = image(e);
    let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    let s = Standin::start(e.dir.path(), &nbd.uri, "full", None);
    let mut a = vec!["backup"];
    a.extend(kv_args(&s.url, tok, &s.ca));
    a.extend(["--kubevirt-type", "Full", "--checkpoint", "cp-1"]);
    let full = e.json(&a)["snapshot_id"].as_str().unwrap().to_string();
    drop((s, nbd));
    qemu_io(&img, &["write -P 0x66 44M 4M"]);
    let want = raw_hash(e, &img);
    (img, full, want)
}

#[test]
fn a_full_map_is_never_taken_for_an_incremental_whatever_the_request_says() {
    let e = Env::new();
    let tok = token_file(&e, TOKEN);
    let (img, full, want) = full_then_write(&e, &tok);
    let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    // KubeVirt decided Full (forceFullBackup, or its tracker lost cp-1): the export serves
    // the allocation map, whose bit 0 means "hole", not "dirty".
    let s = Standin::start(e.dir.path(), &nbd.uri, "full", None);
    for (declared, says) in [(None, "took a Full backup"), (Some("Incremental"), "reports a Incremental backup but")] {
        let mut a = vec!["backup"];
        a.extend(kv_args(&s.url, &tok, &s.ca));
        if let Some(d) = declared {
            a.extend(["--kubevirt-type", d]);
        }
        a.extend(["--kubevirt-base", "cp-1", "--parent", full.as_str(), "--checkpoint", "cp-2"]);
        let r = e.json(&a);
        let v = &r["volumes"][0];
        assert_eq!(v["change_source"], "parent-digest", "{declared:?}: read in full with parent reuse: {r}");
        assert!(v["change_fallback"].as_str().unwrap_or_default().contains(says), "{declared:?}: {r}");
        assert_eq!(r["bytes_read"].as_u64(), Some(40 << 20), "{declared:?}: what the allocation map marks: {r}");
        assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want, "{declared:?}: the 4 MiB written are in the snapshot");
    }
}

#[test]
fn an_incremental_map_is_never_taken_for_a_full_backup() {
    let e = Env::new();
    let tok = token_file(&e, TOKEN);
    let (img, full, want) = full_then_write(&e, &tok);
    let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    let s = Standin::start(e.dir.path(), &nbd.uri, "incremental", Some("b0"));
    let mut a = vec!["backup"];
    a.extend(kv_args(&s.url, &tok, &s.ca));
    a.extend(["--kubevirt-type", "Full", "--parent", full.as_str(), "--checkpoint", "cp-2"]);
    let r = e.json(&a);
    let v = &r["volumes"][0];
    assert_eq!(v["change_source"], "parent-digest", "{r}");
    assert!(v["change_fallback"].as_str().unwrap_or_default().contains("reports a Full backup but"), "{r}");
    assert_eq!(r["bytes_read"].as_u64(), Some(96 << 20), "no allocation is known from a dirty map: everything is read: {r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want);
}

#[test]
fn an_export_answering_503_until_its_tunnel_connects_and_a_blip_mid_backup_are_waited_out() {
    let e = Env::new();
    let tok = token_file(&e, TOKEN);
    let (img, full, want) = full_then_write(&e, &tok);
    let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    // 503 for the first 4 s (virt-launcher not connected yet), then again for 3 s after the
    // first data request (the tunnel reconnects).
    let s = Standin::start_with(
        e.dir.path(),
        &nbd.uri,
        "incremental",
        Some("b0"),
        "127.0.0.1:0",
        &["--unavailable-for", "4", "--blip-after", "1", "--blip-for", "3"],
    );
    let mut a = vec!["backup"];
    a.extend(kv_args(&s.url, &tok, &s.ca));
    a.extend(["--kubevirt-type", "Incremental", "--kubevirt-base", "cp-1", "--parent", full.as_str(), "--checkpoint", "cp-2", "--verify-sample", "0"]);
    let t = std::time::Instant::now();
    let r = e.json(&a);
    assert!(t.elapsed() >= std::time::Duration::from_secs(6), "it waited the 503s out");
    assert!(s.stats()["unavailable"].as_u64().unwrap() >= 2, "{}", s.stats());
    let v = &r["volumes"][0];
    assert_eq!(v["change_source"], "kubevirt", "{r}");
    assert!(v["change_fallback"].is_null(), "{r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want);
    // A window too short to wait in fails naming the endpoint and what it said, and stores
    // nothing.
    drop(s);
    let s = Standin::start_with(e.dir.path(), &nbd.uri, "incremental", Some("b0"), "127.0.0.1:0", &["--unavailable-for", "60"]);
    let before = e.snapshot_count();
    let mut a = vec!["backup"];
    a.extend(kv_args(&s.url, &tok, &s.ca));
    a.extend(["--kubevirt-type", "Incremental", "--kubevirt-base", "cp-1", "--parent", full.as_str(), "--kubevirt-retry", "3"]);
    let o = e.run(&a);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let err = stderr.lines().last().unwrap_or_default();
    assert!(!o.status.success() && err.contains("503") && err.contains("tunnel") && err.contains(&s.url) && err.contains("retries"), "{stderr}");
    assert!(stderr.contains("trying again in 1 s"), "each retry is logged: {stderr}");
    assert_eq!(e.snapshot_count(), before);
}

#[test]
fn a_map_that_ends_early_is_refused_and_a_pvc_read_instead_records_no_checkpoint() {
    let e = Env::new();
    let tok = token_file(&e, TOKEN);
    let (img, full, want) = full_then_write(&e, &tok);
    let pvc = e.path("pvc.img");
    assert!(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&img).arg(&pvc).status().unwrap().success());
    let nbd = QemuNbd::start(&img, Some("b0"), &e.path("nbd.sock"), None);
    let s = Standin::start_with(e.dir.path(), &nbd.uri, "incremental", Some("b0"), "127.0.0.1:0", &["--map-ends-at", &(64u64 << 20).to_string()]);
    // Without the PVC: refused, nothing stored.
    let before = e.snapshot_count();
    let mut a = vec!["backup"];
    a.extend(kv_args(&s.url, &tok, &s.ca));
    a.extend(["--kubevirt-type", "Incremental", "--kubevirt-base", "cp-1", "--parent", full.as_str(), "--checkpoint", "cp-2"]);
    let err = e.fail(&a);
    assert!(err.contains("ends early"), "{err}");
    assert_eq!(e.snapshot_count(), before);
    // With it: the PVC is read in full, and cp-2 is not recorded (the PVC may predate it).
    a.push(pvc.to_str().unwrap());
    let r = e.json(&a);
    let v = &r["volumes"][0];
    let why = v["change_fallback"].as_str().unwrap_or_default();
    assert!(why.contains("ends early") && why.contains("PVC") && why.contains("'cp-2' not recorded"), "{r}");
    assert_eq!(restore_hash(&e, r["snapshot_id"].as_str().unwrap()), want);
    let shown = e.json(&["show", r["snapshot_id"].as_str().unwrap()]);
    assert!(shown["volumes"][0]["change_base"].is_null(), "{shown}");
}

/// A qcow2 with a backing file holds only what differs from it: its absent clusters are
/// the backing file's data, not zeros. Reading it as a disk would store a different disk:
/// refused, naming the image, and nothing stored.
#[test]
fn a_push_mode_image_with_a_backing_file_is_refused() {
    let e = Env::new();
    let base = image(&e);
    let overlay = e.path("overlay.qcow2");
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&base).arg(&overlay).status().unwrap().success());
    qemu_io(&overlay, &["write -P 0x77 1M 64k"]);
    let before = e.snapshot_count();
    let err = e.fail(&["backup", "--name", "root", "--qcow2", overlay.to_str().unwrap()]);
    assert!(err.contains("backing file") && err.contains("overlay.qcow2"), "{err}");
    assert_eq!(e.snapshot_count(), before);
}
