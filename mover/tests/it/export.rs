//! Restore without restoring: `mover export` (an NBD server straight from the repository)
//! read by real NBD clients (`nbdcopy`, `qemu-img`, `nbdinfo`, `nbdsh`, `nbdfuse`), and
//! `mover mount` (FUSE) with a real read-only loop mount of a volume image.
use super::*;
use std::io::BufRead;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running `mover export` and the NBD URI it printed.
struct Export {
    child: Child,
    uri: String,
    stderr: PathBuf,
}

impl Export {
    fn start(e: &Env, spec: &str, extra: &[&str]) -> Export {
        let sock = e.path(&format!("export-{}.sock", rand_suffix()));
        let stderr = e.path(&format!("export-{}.log", rand_suffix()));
        let mut args = vec!["export", spec, "--socket", sock.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let mut child = e.cmd(&args).stdout(Stdio::piped()).stderr(std::fs::File::create(&stderr).unwrap()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("export did not start: {}", std::fs::read_to_string(&stderr).unwrap_or_default()));
        Export { child, uri: v["uri"].as_str().unwrap().to_string(), stderr }
    }

    /// Peak resident memory of the server so far, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Runs a Python script against the export with nbdsh (under Debian's interpreter,
    /// which has libnbd's binding; the handle is `h`).
    fn nbdsh(&self, script: &str) -> Output {
        Command::new("/usr/bin/python3").args(["-m", "nbd", "-u", &self.uri, "-c", script]).output().unwrap()
    }

    /// `len` bytes at `at`, or `None` when the read fails.
    fn pread(&self, len: u64, at: u64) -> Option<Vec<u8>> {
        let o = self.nbdsh(&format!("import sys; sys.stdout.buffer.write(h.pread({len}, {at}))"));
        o.status.success().then_some(o.stdout)
    }

    /// SIGTERM; returns how long it took to exit.
    fn stop(mut self) -> Duration {
        let t0 = Instant::now();
        assert!(Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success());
        let st = self.child.wait().unwrap();
        assert!(st.success(), "export exited with {st}: {}", self.log());
        t0.elapsed()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_ok(args: &[&str]) -> Output {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// A sparse 2 GiB volume: 384 MiB of data, then a 1 GiB hole, then 128 MiB of data.
fn sparse_volume(e: &Env) -> PathBuf {
    let p = e.path("vol.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(2 << 30).unwrap();
    for (i, (off, len)) in [(0u64, 256u64 << 20), (256 << 20, 128 << 20), (1664 << 20, 128 << 20)].into_iter().enumerate() {
        f.write_all_at(&noise(60 + i as u64, len as usize), off).unwrap();
    }
    p
}

#[test]
fn an_export_reads_back_byte_exact_with_its_holes_in_bounded_memory() {
    let e = Env::new();
    let vol = sparse_volume(&e);
    let want = hash(&vol);
    e.json(&["backup", "--volume", &format!("disk={}", vol.display()), "--group", "vms/big"]);
    let x = Export::start(&e, "latest", &["--group", "vms/big"]);
    // nbdcopy (libnbd) and qemu-img (QEMU's own NBD client) read it all.
    let a = e.path("nbdcopy.img");
    run_ok(&["nbdcopy", &x.uri, a.to_str().unwrap()]);
    assert_eq!(hash(&a), want, "nbdcopy from the export");
    std::fs::remove_file(&a).unwrap();
    let b = e.path("qemu.img");
    run_ok(&["qemu-img", "convert", "-f", "raw", "-O", "raw", &x.uri, b.to_str().unwrap()]);
    assert_eq!(hash(&b), want, "qemu-img convert from the export");
    std::fs::remove_file(&b).unwrap();
    // The hole is reported as a hole (base:allocation), the data as data.
    let map = run_ok(&["nbdinfo", "--json", "--map", &x.uri]);
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let kind_at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|m| m["offset"].as_u64().unwrap() <= off && off < m["offset"].as_u64().unwrap() + m["length"].as_u64().unwrap())
            .unwrap()["type"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(kind_at(1 << 30), 3, "the 1 GiB hole reads as hole and zero: {map}");
    assert_eq!(kind_at(10 << 20), 0, "data: {map}");
    assert_eq!(kind_at(1700 << 20), 0, "data: {map}");
    let holes: u64 = map.as_array().unwrap().iter().filter(|m| m["type"] == 3).map(|m| m["length"].as_u64().unwrap()).sum();
    assert!(holes >= 1 << 30, "{holes} bytes of holes");
    // Two full reads of 512 MiB of data: memory stays bounded by the segment cache.
    let rss = x.peak_rss_kib();
    assert!(rss < 400 << 10, "export peak RSS {} MiB", rss >> 10);
    // A client in the middle of a read when the export stops is not left hanging.
    let mut slow = Command::new("nbdcopy").args(["--requests=1", &x.uri, "-"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let took = x.stop();
    assert!(took < Duration::from_secs(5), "the export took {took:?} to stop");
    drop(slow.stdout.take());
    let t0 = Instant::now();
    while slow.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the client hangs after the export stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!slow.wait().unwrap().success(), "the client saw the export go away");
}

#[test]
fn a_16_gib_volume_reads_end_to_end_in_bounded_memory() {
    // 4 KiB of distinct data at the start of every 4 MiB segment, zeros elsewhere: each of
    // the 4,096 segments is fetched and decoded as a client reads the whole volume, so the
    // segment cache turns over 128 times.
    let e = Env::new();
    let vol = e.path("big.img");
    let f = std::fs::File::create(&vol).unwrap();
    f.set_len(16 << 30).unwrap();
    for seg in 0..4096u64 {
        f.write_all_at(&noise(9000 + seg, 4096), seg << 22).unwrap();
    }
    drop(f);
    let want = hash(&vol);
    e.json(&["backup", "--volume", &format!("disk={}", vol.display())]);
    let x = Export::start(&e, "latest", &[]);
    // Every byte over the wire (no block status), hashed as it arrives.
    let o = Command::new("sh").args(["-c", &format!("nbdcopy --no-extents '{}' - | b3sum --no-names", x.uri)]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want, "16 GiB read through the export");
    let rss = x.peak_rss_kib();
    assert!(rss < 400 << 10, "export peak RSS {} MiB after reading 16 GiB", rss >> 10);
    x.stop();
}

fn ext4_with_files(e: &Env) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let src = e.path("files");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("var/lib/db")).unwrap();
    let files = vec![
        ("etc/hostname".to_string(), b"web-1\n".to_vec()),
        ("var/lib/db/data.bin".to_string(), noise(70, 5 << 20)),
        ("var/lib/db/log.txt".to_string(), b"2026-12-02 started\n".repeat(10_000)),
    ];
    for (p, d) in &files {
        std::fs::write(src.join(p), d).unwrap();
    }
    let img = e.path("fs.img");
    std::fs::File::create(&img).unwrap().set_len(128 << 20).unwrap();
    run_ok(&["mkfs.ext4", "-q", "-F", "-d", src.to_str().unwrap(), img.to_str().unwrap()]);
    (img, files)
}

/// Loop-mounts `image` read-only at `at`, checks `files`, unmounts.
fn check_files_in(image: &Path, at: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(at).unwrap();
    run_ok(&["mount", "-o", "ro,loop", image.to_str().unwrap(), at.to_str().unwrap()]);
    let r = std::panic::catch_unwind(|| {
        for (p, d) in files {
            assert_eq!(&std::fs::read(at.join(p)).unwrap(), d, "{p}");
        }
    });
    run_ok(&["umount", at.to_str().unwrap()]);
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn one_file_back_through_the_fuse_mount_and_through_the_nbd_export() {
    let e = Env::new();
    let (img, files) = ext4_with_files(&e);
    let vm = e.path("vm.yaml");
    std::fs::write(&vm, b"kind: VirtualMachine\nmetadata: {name: web-1}\n").unwrap();
    let r = e.json(&["backup", "--volume", &format!("root={}", img.display()), "--group", "vms/web-1", "--metadata", &format!("vm.yaml={}", vm.display())]);
    let id = r["snapshot_id"].as_str().unwrap().to_string();

    // FUSE: DIR/vms/web-1/<id>/root.img, loop-mounted read-only.
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut m = e.cmd(&["mount", mnt.to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(m.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("mounted 1 snapshots"), "{line}");
    let dir = mnt.join("vms/web-1").join(&id);
    assert_eq!(std::fs::metadata(dir.join("root.img")).unwrap().len(), 128 << 20);
    assert_eq!(std::fs::read(dir.join("metadata/vm.yaml")).unwrap(), std::fs::read(&vm).unwrap());
    assert_eq!(std::fs::read_link(mnt.join("vms/web-1/latest")).unwrap(), Path::new(&id));
    assert!(std::fs::write(dir.join("root.img"), b"x").is_err(), "read-only");
    check_files_in(&dir.join("root.img"), &e.path("loop1"), &files);
    assert!(Command::new("kill").args(["-INT", &m.id().to_string()]).status().unwrap().success());
    assert!(m.wait().unwrap().success());
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none(), "unmounted on exit");

    // NBD: nbdfuse turns the export into a file; loop-mounted read-only.
    let x = Export::start(&e, &format!("{id}:root"), &[]);
    let nf = e.path("nbdfuse");
    std::fs::create_dir_all(&nf).unwrap();
    let mut fuse = Command::new("nbdfuse").args(["--readonly", nf.to_str().unwrap(), "--uri", &x.uri]).spawn().unwrap();
    let t0 = Instant::now();
    while !nf.join("nbd").exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "nbdfuse did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    check_files_in(&nf.join("nbd"), &e.path("loop2"), &files);
    run_ok(&["fusermount3", "-u", nf.to_str().unwrap()]);
    let _ = fuse.wait();
    x.stop();
}

/// `len` bytes of noise backed up as `vol.img`: the noise, the snapshot id and the
/// repository's pack files, smallest first.
fn backed_up_noise(e: &Env, seed: u64, len: usize) -> (Vec<u8>, String, Vec<PathBuf>) {
    let vol = e.path("vol.img");
    let data = noise(seed, len);
    std::fs::write(&vol, &data).unwrap();
    let r = e.json(&["backup", vol.to_str().unwrap()]);
    let mut packs: Vec<PathBuf> = walk(&Path::new(&e.repo).join("packs"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    (data, r["snapshot_id"].as_str().unwrap().to_string(), packs)
}

/// [`backed_up_noise`] with a byte in the middle of its largest pack inverted (inside some
/// chunk): the noise, the snapshot id and the damaged pack's id.
fn noise_with_a_damaged_chunk(e: &Env, seed: u64, len: usize) -> (Vec<u8>, String, String) {
    let (want, id, packs) = backed_up_noise(e, seed, len);
    let pack = packs.last().unwrap();
    flip_at(pack, 0.5);
    (want, id, pack.file_name().unwrap().to_str().unwrap().to_string())
}

/// Inverts the byte at `frac` of the file's length.
fn flip_at(path: &Path, frac: f64) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = (bytes.len() as f64 * frac) as usize;
    bytes[at] ^= 0xff;
    std::fs::write(path, &bytes).unwrap();
}

/// Reads the export's first `n` segments, each whole; each that reads must equal `want`'s
/// bytes there. Returns how many read and how many failed.
fn read_segments(x: &Export, n: u64, want: &[u8]) -> (usize, usize) {
    let seg = 4u64 << 20;
    let (mut ok, mut failed) = (0, 0);
    for s in 0..n {
        match x.pread(seg, s * seg) {
            Some(got) => {
                assert!(got == want[(s * seg) as usize..((s + 1) * seg) as usize], "segment {s} read back different bytes");
                ok += 1;
            }
            None => failed += 1,
        }
    }
    (ok, failed)
}

#[test]
fn a_client_that_floods_reads_without_reading_replies_holds_bounded_memory() {
    // 96 reads of 32 MiB (3 GiB of replies) queued at once through libnbd's asynchronous
    // API before a single reply is read: the server takes on at most 64 MiB of them per
    // connection and the client waits for the rest, so its memory stays bounded.
    let e = Env::new();
    let (want, id, _) = backed_up_noise(&e, 98, 64 << 20);
    let x = Export::start(&e, &id, &[]);
    let script = "buf = nbd.Buffer(32 << 20)\n\
                  cmds = [h.aio_pread(buf, (i % 2) * (32 << 20)) for i in range(96)]\n\
                  while h.aio_in_flight() > 0: h.poll(-1)\n\
                  assert all(h.aio_command_completed(c) for c in cmds)\n\
                  import sys; sys.stdout.buffer.write(h.pread(1 << 20, 40 << 20))";
    let t0 = Instant::now();
    let o = x.nbdsh(script);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(&o.stdout[..], &want[40 << 20..41 << 20], "and reads stay right");
    let rss = x.peak_rss_kib();
    assert!(rss < 400 << 10, "export peak RSS {} MiB while flooded", rss >> 10);
    assert!(t0.elapsed() < Duration::from_secs(120), "{:?}", t0.elapsed());
}

#[test]
fn an_export_whose_window_is_smaller_than_a_segment_still_reads_back_byte_exact() {
    // A segment's reads wait for the fetch window all together; a segment that needs more
    // than the whole window takes all of it, rather than waiting forever.
    let e = Env::new();
    let (want, id, _) = backed_up_noise(&e, 82, 24 << 20);
    let x = Export::start(&e, &id, &["--window-mib", "1"]);
    let out = e.path("copy.img");
    run_ok(&["timeout", "60", "nbdcopy", &x.uri, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == want, "nbdcopy through a 1 MiB window read back different bytes");
    x.stop();
}

#[test]
fn a_corrupt_chunk_fails_only_its_range_and_the_error_names_it() {
    let e = Env::new();
    let (want, id, pack_id) = noise_with_a_damaged_chunk(&e, 80, 32 << 20);
    let x = Export::start(&e, &id, &[]);
    let (ok, failed) = read_segments(&x, 8, &want);
    assert!(failed >= 1 && ok >= 6, "{failed} segments failed, {ok} read");
    let log = x.log();
    for needle in [id.as_str(), "volume 'disk'", "offset", "chunk", pack_id.as_str()] {
        assert!(log.contains(needle), "the error names {needle}: {log}");
    }
    x.stop();
}

/// Reads `len` bytes at `at` through a fresh export of snapshot `id` (nothing kept from
/// other reads); `Ok` with the bytes, or `Err` with the export's log.
fn read_alone(e: &Env, id: &str, at: u64, len: u64) -> Result<Vec<u8>, String> {
    let x = Export::start(e, id, &[]);
    let got = x.pread(len, at);
    let log = x.log();
    x.stop();
    got.ok_or(log)
}

#[test]
fn a_damaged_chunk_fails_only_the_small_reads_it_lies_under() {
    // A small read of a segment that is not read in order fetches only the chunks under it,
    // so a damaged chunk fails the reads that need it and no other read of its segment.
    let e = Env::new();
    let (want, id, pack_id) = noise_with_a_damaged_chunk(&e, 83, 24 << 20);
    // 4 KiB at the start and at the end of each segment, each through a fresh export.
    let seg = 4u64 << 20;
    let mut failed = Vec::new();
    for s in 0..6u64 {
        for at in [s * seg, (s + 1) * seg - 4096] {
            match read_alone(&e, &id, at, 4096) {
                Ok(got) => assert!(got == want[at as usize..at as usize + 4096], "4 KiB at {at} read back different bytes"),
                Err(log) => failed.push((at, log)),
            }
        }
    }
    // Whole segments of noise are several chunks each: the damaged one lies under one of
    // the two reads of its segment at most.
    assert_eq!(failed.len(), 1, "reads that failed: {:?}", failed.iter().map(|f| f.0).collect::<Vec<_>>());
    for needle in [id.as_str(), "volume 'disk'", "chunk", pack_id.as_str()] {
        assert!(failed[0].1.contains(needle), "the error names {needle}: {}", failed[0].1);
    }
}

#[test]
fn small_random_reads_of_an_incremental_read_back_byte_exact() {
    // Random reads of a few bytes to 64 KiB, some across segment boundaries, of a snapshot
    // whose segments splice changed regions into the parent's chunks (slices): the first
    // small read of a segment fetches only its chunks, a second the whole segment.
    let e = Env::new();
    let src = e.path("vol.img");
    make_volume(&src, 96 << 20, 34);
    e.ok(&["backup", src.to_str().unwrap()]);
    let ext = modify(&src, 12, 6);
    write_extents(&e.path("ext"), &ext);
    e.ok(&["backup", src.to_str().unwrap(), "--parent", "latest", "--changed-extents", e.path("ext").to_str().unwrap()]);
    let x = Export::start(&e, "latest", &[]);
    let script = format!(
        r#"
import random
r = random.Random(11)
f = open("{path}", "rb")
size, seg, bad = h.get_size(), 4 << 20, []
# First across the edges of the changed regions (a slice of a parent's chunk beside a new
# chunk), each the first read of its segment unless two regions share one.
reads = [(max(0, o + d - 2048), 4096) for o, l in {ext} for d in (0, l)]
reads += [(r.randrange(0, size - n), n) for n in [r.choice([1, 512, 4096, 65536]) for _ in range(400)]]
reads += [(k * seg - 2048, 4096) for k in range(1, size // seg)]
for off, n in reads:
    f.seek(off)
    if h.pread(n, off) != f.read(n):
        bad.append(off)
print(len(reads), len(bad), bad[:10])
"#,
        path = src.display(),
        ext = format_args!("{ext:?}")
    );
    let o = x.nbdsh(&script);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stderr), x.log());
    let out = String::from_utf8_lossy(&o.stdout);
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f[1], "0", "reads that differ (count, number wrong, first offsets): {out}");
    x.stop();
}

#[test]
fn a_damaged_segment_map_fails_only_its_segment_and_the_error_names_it() {
    // Maps load 256 segments at a time; one damaged map must not fail its whole batch.
    let e = Env::new();
    // 24 MiB of noise fills a 16 MiB data pack and most of a second; the smallest pack
    // holds the tree: six segment maps, then the segment group. A quarter of the way in is
    // inside a map.
    let (want, id, packs) = backed_up_noise(&e, 81, 24 << 20);
    let tree = &packs[0];
    let len = std::fs::metadata(tree).unwrap().len();
    assert!(len < 1 << 20, "the smallest pack is not the tree pack: {len} bytes");
    flip_at(tree, 0.25);
    let x = Export::start(&e, &id, &[]);
    let (ok, failed) = read_segments(&x, 6, &want);
    assert!(failed == 1 && ok == 5, "{failed} segments failed, {ok} read: {}", x.log());
    let log = x.log();
    for needle in [id.as_str(), "volume 'disk'", "segment map at offset"] {
        assert!(log.contains(needle), "the error names {needle}: {log}");
    }
    x.stop();
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for f in std::fs::read_dir(d).unwrap() {
        let p = f.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Lock objects in a local repository (each export holds one while it serves).
fn lock_count(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("locks")).map(|d| d.count()).unwrap_or(0)
}

/// `nbdinfo URI` succeeds.
fn nbd_reachable(uri: &str) -> bool {
    Command::new("nbdinfo").arg("--size").arg(uri).output().map(|o| o.status.success()).unwrap_or(false)
}

#[test]
fn daemon_exports_on_its_socket_and_over_nbd_tls_and_stops_them() {
    use super::daemon::{rt, Daemon};
    use mover_protocol::v1 as pb;
    use pb::export_service_client::ExportServiceClient;
    use pb::transfer_service_client::TransferServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let tls = super::daemon::tls_fixture(p);
    // libnbd's certificate directories (gnutls layout), one per client identity.
    for who in ["client", "rogue"] {
        let d = p.join(format!("nbd-{who}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(p.join("ca.pem"), d.join("ca-cert.pem")).unwrap();
        std::fs::copy(p.join(format!("{who}.pem")), d.join("client-cert.pem")).unwrap();
        std::fs::copy(p.join(format!("{who}.key")), d.join("client-key.pem")).unwrap();
    }
    let mut d = Daemon::start(p, &tls, false);
    d.grpc = d.grpc.replace("http://", "https://");
    let src = p.join("vols/disk.img");
    make_volume(&src, 24 << 20, 77);
    let repo = p.join("repo");
    let conn = mover::client::Conn { server: d.grpc.clone(), ca: Some(p.join("ca.pem")), cert: Some(p.join("client.pem")), key: Some(p.join("client.key")) };
    let rt = rt();
    let ch = rt.block_on(mover::client::connect(&conn)).unwrap();
    let mut tc = TransferServiceClient::new(ch.clone());
    let mut ec = ExportServiceClient::new(ch);
    let snap = rt.block_on(async {
        let t = tc.start_backup(super::daemon::backup_req("disk", &src)).await.unwrap().into_inner();
        let end = super::daemon::watch_end(&mut tc, &t.id).await;
        assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
        end.snapshot_id
    });
    let start = |tcp: bool, request_id: &str| pb::StartExportRequest {
        repository: "main".into(),
        snapshot: snap.clone(),
        tcp,
        request_id: request_id.into(),
        ..Default::default()
    };

    // Refused requests name what is wrong and leave no lease behind.
    let e = rt.block_on(ec.start_export(pb::StartExportRequest { snapshot: "ffffffff".into(), ..start(false, "") })).unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    assert!(e.message().contains("ffffffff"), "{}", e.message());
    let e = rt.block_on(ec.start_export(pb::StartExportRequest { volume: "nosuch".into(), ..start(false, "") })).unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    assert!(e.message().contains("'nosuch'") && e.message().contains("disk"), "{}", e.message());
    assert_eq!(lock_count(&repo), 0, "a refused export left a lock");

    // On a unix socket beside the daemon's: read byte-exact; a retried start is the same export.
    let ux = rt.block_on(ec.start_export(start(false, "req-1"))).unwrap().into_inner();
    assert_eq!(ux.state(), pb::ExportState::Serving);
    assert!(ux.uri.starts_with("nbd+unix://"), "{}", ux.uri);
    let sock = PathBuf::from(ux.uri.split("socket=").nth(1).unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let again = rt.block_on(ec.start_export(start(false, "req-1"))).unwrap().into_inner();
    assert_eq!(again.id, ux.id);
    let out = p.join("ux.out");
    run_ok(&["nbdcopy", &ux.uri, out.to_str().unwrap()]);
    assert_eq!(hash(&out), hash(&src));

    // Over TCP with the daemon's TLS: only clients with a certificate from its CA get in.
    let tx = rt.block_on(ec.start_export(start(true, "req-2"))).unwrap().into_inner();
    assert!(tx.uri.starts_with("nbds://127.0.0.1:"), "{}", tx.uri);
    let with = |who: &str| format!("{}?tls-certificates={}", tx.uri, p.join(format!("nbd-{who}")).display());
    let out = p.join("tx.out");
    run_ok(&["nbdcopy", &with("client"), out.to_str().unwrap()]);
    assert_eq!(hash(&out), hash(&src));
    assert!(!nbd_reachable(&tx.uri.replacen("nbds://", "nbd://", 1)), "a plaintext client read a TLS export");
    assert!(!nbd_reachable(&with("rogue")), "a certificate from another CA was let in");
    assert_eq!(lock_count(&repo), 2, "each export holds a read lease");
    assert_eq!(d.metric("mover_exports_active"), 2);
    let list = rt.block_on(ec.list_exports(pb::ListExportsRequest {})).unwrap().into_inner();
    let listed = list.exports.iter().find(|x| x.id == ux.id).unwrap();
    // nbdcopy skips the holes block status reports, so less than the whole volume was read.
    assert!(listed.bytes_read > 0 && listed.bytes_read <= 24 << 20 && listed.caller == "client" && listed.size == 24 << 20, "{listed:?}");

    // Stopping closes the socket and releases the lease.
    let stopped = rt.block_on(ec.stop_export(pb::StopExportRequest { id: ux.id.clone() })).unwrap().into_inner();
    assert_eq!(stopped.state(), pb::ExportState::Stopped, "{}", stopped.error);
    assert!(!sock.exists() && !nbd_reachable(&ux.uri));
    assert_eq!(lock_count(&repo), 1);
    assert_eq!(d.metric("mover_exports_active"), 1);

    // Daemon shutdown with a client connected: the client is not left hanging, the lease goes.
    let mut client = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd,sys,time\nh=nbd.NBD()\nh.set_tls_certificates(sys.argv[2])\nh.connect_uri(sys.argv[1])\nh.pread(4096,0)\nprint('connected',flush=True)\ntry:\n  time.sleep(1)\n  [h.pread(1<<20,i<<20) for i in range(10**6)]\nexcept Exception as e:\n  print('ended:',e)\n"])
        .arg(&tx.uri)
        .arg(p.join("nbd-client"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = std::io::BufReader::new(client.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    let t0 = Instant::now();
    d.signal("-TERM");
    assert!(t0.elapsed() < Duration::from_secs(15), "daemon took {:?} to stop with an export client connected", t0.elapsed());
    let st = client.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(st.success() && rest.contains("ended:"), "client: {st} {rest}");
    assert_eq!(lock_count(&repo), 0, "the daemon's exports kept a lease after shutdown");
}
