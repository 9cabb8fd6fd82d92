//! The daemon over real gRPC: loopback TCP, a unix socket, and mTLS with certificates made
//! by the real `openssl` tool.

use super::{hash, make_volume, noise, Loop};
use mover_protocol::v1 as pb;
use pb::transfer_service_client::TransferServiceClient;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

pub(crate) struct Daemon {
    child: Option<Child>,
    pub cfg: PathBuf,
    pub log: PathBuf,
    pub grpc: String,
    pub http: u16,
    /// What `spawn` waits for: `/readyz`, or `/healthz` for a daemon that cannot be ready.
    probe: &'static str,
}

/// Ports handed out once per test process (parallel tests never share one), each checked
/// to be bindable. They come from 10000–32767, below the kernel's ephemeral range
/// (32768–60999 by default): a port there can be taken by any outgoing connection between
/// this check and the daemon's bind (a CI run failed so, on 38684). The starting point
/// depends on the process id, so two test processes rarely start on the same port.
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 100) as u16 * 227;
    loop {
        let p = 10_000 + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % 22_700;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub(crate) fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    Some((code, body))
}

impl Daemon {
    /// Writes a config under `dir` (volumes allowed under `dir/vols`) and starts the daemon;
    /// returns once it is ready (`/readyz`: every repository open).
    pub(crate) fn start(dir: &Path, extra: &str, unix: bool) -> Daemon {
        Self::start_waiting_for(dir, extra, unix, "/readyz")
    }

    /// Starts the daemon and returns once it is alive (`/healthz`), for a configuration
    /// with a repository that cannot be opened (it is never ready).
    pub(crate) fn start_alive(dir: &Path, extra: &str, unix: bool) -> Daemon {
        Self::start_waiting_for(dir, extra, unix, "/healthz")
    }

    fn start_waiting_for(dir: &Path, extra: &str, unix: bool, probe: &'static str) -> Daemon {
        std::fs::create_dir_all(dir.join("vols")).unwrap();
        std::fs::create_dir_all(dir.join("kubelet")).unwrap();
        let http = free_port();
        let (listen, grpc) = if unix {
            let p = dir.join("mover.sock");
            (format!("unix:{}", p.display()), format!("unix:{}", p.display()))
        } else {
            let port = free_port();
            (format!("127.0.0.1:{port}"), format!("http://127.0.0.1:{port}"))
        };
        let cfg = dir.join("mover.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"{listen}\"\nhttp_listen = \"127.0.0.1:{http}\"\nstate_dir = \"{s}\"\nallowed_roots = [\"{v}\", \"{k}\", \"/dev\"]\nkubelet_root = \"{k}\"\nshutdown_grace_seconds = 0\n{extra}\n\
                 [repositories.main]\nurl = \"{r}\"\npassword_env = \"MOVER_TEST_DAEMON_PW\"\ninit_if_missing = true\n",
                s = dir.join("state").display(),
                v = dir.join("vols").display(),
                k = dir.join("kubelet").display(),
                r = dir.join("repo").display(),
            ),
        )
        .unwrap();
        let log = dir.join("daemon.log");
        let mut d = Daemon { child: None, cfg, log, grpc, http, probe };
        d.spawn();
        d
    }

    pub(crate) fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_mover"))
            .args(["serve", "--config"])
            .arg(&self.cfg)
            .env("MOVER_TEST_DAEMON_PW", "daemon-test-pw")
            .env("MOVER_LOG", std::env::var("MOVER_TEST_DAEMON_LOG").unwrap_or_else(|_| "info".into()))
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if let Some((200, _)) = http_get(self.http, self.probe) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("daemon exited ({st}): {}", std::fs::read_to_string(&self.log).unwrap_or_default());
                }
            }
            assert!(t.elapsed() < Duration::from_secs(30), "daemon not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn signal(&mut self, sig: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }

    pub(crate) fn metric(&self, name_and_labels: &str) -> u64 {
        let (_, body) = http_get(self.http, "/metrics").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name_and_labels).and_then(|r| r.trim().parse::<f64>().ok()))
            .unwrap_or_else(|| panic!("metric {name_and_labels} missing")) as u64
    }
}

/// A metric's value (`+Inf` included); `None` when the series is absent.
pub(crate) fn metric(d: &Daemon, series: &str) -> Option<f64> {
    let (_, body) = http_get(d.http, "/metrics")?;
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse::<f64>().ok()))
}

/// Waits until `f` holds for the metric (the status refresher runs after every job).
pub(crate) fn wait_metric(d: &Daemon, series: &str, f: impl Fn(f64) -> bool) -> f64 {
    let t0 = Instant::now();
    loop {
        if let Some(v) = metric(d, series).filter(|v| f(*v)) {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{series} is {:?}", metric(d, series));
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal("-KILL");
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

pub(crate) async fn client(d: &Daemon) -> TransferServiceClient<Channel> {
    let ch = mover::client::connect(&mover::client::Conn { server: d.grpc.clone(), ..Default::default() }).await.unwrap();
    TransferServiceClient::new(ch)
}

pub(crate) fn path_ref(p: &Path) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::Path(p.display().to_string())) })
}

pub(crate) fn backup_req(name: &str, p: &Path) -> pb::StartBackupRequest {
    pb::StartBackupRequest {
        repository: "main".into(),
        volumes: vec![pb::BackupVolume { name: name.into(), source: path_ref(p), ..Default::default() }],
        ..Default::default()
    }
}

pub(crate) async fn watch_end(c: &mut TransferServiceClient<Channel>, id: &str) -> pb::Transfer {
    let mut s = c.watch_transfer(pb::GetTransferRequest { id: id.into() }).await.unwrap().into_inner();
    let mut last = None;
    let mut seen = 0;
    while let Some(t) = s.message().await.unwrap() {
        seen += 1;
        last = Some(t);
    }
    assert!(seen >= 1);
    last.unwrap()
}

pub(crate) async fn wait_state(c: &mut TransferServiceClient<Channel>, id: &str, want: pb::TransferState, within: Duration) -> pb::Transfer {
    let t0 = Instant::now();
    loop {
        let t = c.get_transfer(pb::GetTransferRequest { id: id.into() }).await.unwrap().into_inner();
        if t.state() == want {
            return t;
        }
        assert!(t0.elapsed() < within, "transfer {id} is {:?}, expected {want:?} within {within:?}: {} {:?}", t.state(), t.error, t.progress);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn backup_watch_restore_and_metrics_agree() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 40 << 20, 21);
    rt().block_on(async {
        let mut c = client(&d).await;
        let t = c.start_backup(backup_req("disk", &src)).await.unwrap().into_inner();
        let end = watch_end(&mut c, &t.id).await;
        assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
        let st = end.stats.clone().unwrap();
        assert_eq!(end.progress.as_ref().unwrap().bytes_done, 40 << 20);
        // /metrics agrees with the transfer's own figures.
        assert_eq!(d.metric("mover_backup_bytes_total{what=\"new\"}"), st.bytes_new);
        assert_eq!(d.metric("mover_backup_bytes_total{what=\"read\"}"), st.bytes_read);
        assert_eq!(d.metric("mover_backup_bytes_total{what=\"zero\"}"), st.bytes_zero);
        assert_eq!(d.metric("mover_upload_bytes_total"), st.bytes_uploaded);
        assert_eq!(d.metric("mover_transfers_total{kind=\"backup\",result=\"ok\"}"), 1);
        assert!(d.metric("mover_store_request_seconds_count{op=\"put\",result=\"ok\"}") >= 2);

        let out = dir.path().join("vols/restored.img");
        let r = c
            .start_restore(pb::StartRestoreRequest {
                repository: "main".into(),
                snapshot: end.snapshot_id.clone(),
                target: path_ref(&out),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let r = watch_end(&mut c, &r.id).await;
        assert_eq!(r.state(), pb::TransferState::Succeeded, "{}", r.error);
        assert_eq!(hash(&src), hash(&out));
        assert_eq!(d.metric("mover_restore_bytes_total{what=\"written\"}"), r.stats.unwrap().bytes_written);

        // An incremental with extents: progress tells what was skipped, reused and new.
        super::modify(&src, 2, 5);
        let mut inc = backup_req("disk", &src);
        inc.parent = "latest".into();
        let t = c.start_backup(inc).await.unwrap().into_inner();
        let end2 = watch_end(&mut c, &t.id).await;
        let p = end2.progress.clone().unwrap();
        let s2 = end2.stats.clone().unwrap();
        assert!(p.bytes_reused_parent > 0 && p.bytes_reused_parent == s2.bytes_reused_parent, "{p:?}");
        assert_eq!(p.bytes_new, s2.bytes_new);
        assert_eq!(p.bytes_done, 40 << 20);

        let mut rc = pb::repository_service_client::RepositoryServiceClient::new(
            mover::client::connect(&mover::client::Conn { server: d.grpc.clone(), ..Default::default() }).await.unwrap(),
        );
        let snaps = rc.list_snapshots(pb::ListSnapshotsRequest { repository: "main".into(), ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(snaps.snapshots.len(), 2);
        assert_eq!(snaps.snapshots[0].id, end.snapshot_id);
        assert_eq!(snaps.snapshots[1].id, end2.snapshot_id);
        assert_eq!(snaps.snapshots[1].parent, end.snapshot_id);
        assert!(!snaps.snapshots[0].protected);

        // A scheduler protects the first snapshot from forget; a snapshot that does not
        // exist is NOT_FOUND.
        let p = rc
            .protect_snapshot(pb::ProtectSnapshotRequest {
                repository: "main".into(),
                snapshot: end.snapshot_id.clone(),
                note: "audit".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(p.protected && p.id == end.snapshot_id, "{p:?}");
        let snaps = rc.list_snapshots(pb::ListSnapshotsRequest { repository: "main".into(), ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(snaps.snapshots.iter().map(|s| s.protected).collect::<Vec<_>>(), vec![true, false]);
        let err =
            rc.protect_snapshot(pb::ProtectSnapshotRequest { repository: "main".into(), snapshot: "0".repeat(64), ..Default::default() }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    });
    let (code, _) = http_get(d.http, "/healthz").unwrap();
    assert_eq!(code, 200);
}

#[test]
fn unix_socket_listener() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", true);
    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 8 << 20, 22);
    rt().block_on(async {
        let mut c = client(&d).await;
        let t = c.start_backup(backup_req("disk", &src)).await.unwrap().into_inner();
        let end = watch_end(&mut c, &t.id).await;
        assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
        let l = c.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner();
        assert_eq!(l.transfers.len(), 1);
    });
}

#[test]
fn invalid_requests_get_the_right_status_and_name_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let vols = dir.path().join("vols");
    let src = vols.join("disk.img");
    make_volume(&src, 8 << 20, 23);
    std::fs::write(dir.path().join("secret.img"), b"secret").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.img"), vols.join("link.img")).unwrap();
    rt().block_on(async {
        let mut c = client(&d).await;
        let expect = |r: Result<tonic::Response<pb::Transfer>, tonic::Status>, code: Code, needle: &str| {
            let e = r.expect_err("request should be refused");
            assert_eq!(e.code(), code, "{}", e.message());
            assert!(e.message().contains(needle), "'{}' does not name '{needle}'", e.message());
        };
        expect(c.start_backup(pb::StartBackupRequest::default()).await, Code::InvalidArgument, "repository");
        let mut r = backup_req("disk", &src);
        r.repository = "nope".into();
        expect(c.start_backup(r).await, Code::NotFound, "'nope'");
        let mut r = backup_req("disk", &src);
        r.volumes.clear();
        expect(c.start_backup(r).await, Code::InvalidArgument, "at least one volume");
        expect(c.start_backup(backup_req("disk", Path::new("/etc/passwd"))).await, Code::InvalidArgument, "outside the allowed roots");
        expect(c.start_backup(backup_req("disk", &vols.join("../secret.img"))).await, Code::InvalidArgument, "'..' components");
        expect(c.start_backup(backup_req("disk", &vols.join("link.img"))).await, Code::InvalidArgument, "outside the allowed roots");
        expect(c.start_backup(backup_req("disk", &vols.join("missing.img"))).await, Code::NotFound, "missing.img");
        let mut r = backup_req("disk", &src);
        r.parent = "abcdef0123".into();
        expect(c.start_backup(r).await, Code::NotFound, "snapshot abcdef0123");
        let mut r = backup_req("disk", &src);
        r.volumes[0].changed_extents_given = true;
        r.volumes[0].changed_extents = vec![pb::Extent { offset: 0, length: 4096 }];
        expect(c.start_backup(r).await, Code::FailedPrecondition, "need a parent");

        // A snapshot of another volume as parent.
        let t = c.start_backup(backup_req("other", &src)).await.unwrap().into_inner();
        let t = watch_end(&mut c, &t.id).await;
        let mut r = backup_req("disk", &src);
        r.parent = t.snapshot_id.clone();
        expect(c.start_backup(r).await, Code::FailedPrecondition, "no volume named 'disk'");

        // Restore onto a device that is too small.
        let small = Loop::new(&dir.path().join("small.img"), 4 << 20);
        let r = pb::StartRestoreRequest { repository: "main".into(), snapshot: t.snapshot_id.clone(), target: path_ref(&small.dev), ..Default::default() };
        expect(c.start_restore(r).await, Code::FailedPrecondition, "smaller than volume 'other'");
        let r = pb::StartRestoreRequest {
            repository: "main".into(),
            snapshot: t.snapshot_id.clone(),
            volume: "nope".into(),
            target: path_ref(&vols.join("x.img")),
            ..Default::default()
        };
        expect(c.start_restore(r).await, Code::NotFound, "no volume named 'nope'");
        let e = c.get_transfer(pb::GetTransferRequest { id: "tr-nothing".into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains("tr-nothing"));
    });
    assert_eq!(d.metric("mover_transfers_total{kind=\"backup\",result=\"ok\"}"), 1, "refused requests start nothing");
}

#[test]
fn cancel_queue_and_idempotent_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "max_concurrent_transfers = 1", false);
    let a = dir.path().join("vols/a.img");
    let b = dir.path().join("vols/b.img");
    std::fs::write(&a, noise(31, 48 << 20)).unwrap();
    std::fs::write(&b, noise(32, 48 << 20)).unwrap();
    rt().block_on(async {
        let mut c = client(&d).await;
        let mut ra = backup_req("a", &a);
        ra.request_id = "req-a".into();
        ra.bandwidth_limit = 4 << 20; // 12 s: long enough to observe
        let ta = c.start_backup(ra.clone()).await.unwrap().into_inner();
        let again = c.start_backup(ra).await.unwrap().into_inner();
        assert_eq!(again.id, ta.id, "same request id, same transfer");
        let mut rb = backup_req("b", &b);
        rb.bandwidth_limit = 4 << 20;
        let tb = c.start_backup(rb).await.unwrap().into_inner();
        wait_state(&mut c, &ta.id, pb::TransferState::Running, Duration::from_secs(10)).await;
        let qb = c.get_transfer(pb::GetTransferRequest { id: tb.id.clone() }).await.unwrap().into_inner();
        assert_eq!(qb.state(), pb::TransferState::Queued, "the second transfer waits for a slot");
        assert_eq!(d.metric("mover_transfers_queued{kind=\"backup\"}"), 1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t0 = Instant::now();
        c.cancel_transfer(pb::GetTransferRequest { id: ta.id.clone() }).await.unwrap();
        let ca = wait_state(&mut c, &ta.id, pb::TransferState::Cancelled, Duration::from_secs(10)).await;
        assert!(t0.elapsed() < Duration::from_secs(5), "cancel took {:?}", t0.elapsed());
        assert!(ca.error.contains("cancelled"), "{}", ca.error);
        wait_state(&mut c, &tb.id, pb::TransferState::Running, Duration::from_secs(10)).await;
        c.cancel_transfer(pb::GetTransferRequest { id: tb.id.clone() }).await.unwrap();
        wait_state(&mut c, &tb.id, pb::TransferState::Cancelled, Duration::from_secs(10)).await;
    });
    assert_eq!(d.metric("mover_transfers_total{kind=\"backup\",result=\"cancelled\"}"), 2);
}

#[test]
fn restart_marks_interrupted_and_the_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), "", false);
    let src = dir.path().join("vols/big.img");
    std::fs::write(&src, noise(41, 96 << 20)).unwrap();
    let rt = rt();
    let id = rt.block_on(async {
        let mut c = client(&d).await;
        let mut r = backup_req("big", &src);
        r.bandwidth_limit = 24 << 20;
        let t = c.start_backup(r).await.unwrap().into_inner();
        wait_state(&mut c, &t.id, pb::TransferState::Running, Duration::from_secs(10)).await;
        // Let a few 16 MiB packs go up.
        let t0 = Instant::now();
        loop {
            let g = c.get_transfer(pb::GetTransferRequest { id: t.id.clone() }).await.unwrap().into_inner();
            if g.progress.unwrap().bytes_uploaded >= 32 << 20 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        t.id
    });
    d.signal("-TERM"); // grace 0: the transfer is cancelled, keeps its uploads, ends Interrupted
    d.spawn();
    rt.block_on(async {
        let mut c = client(&d).await;
        let t = c.get_transfer(pb::GetTransferRequest { id: id.clone() }).await.unwrap().into_inner();
        assert_eq!(t.state(), pb::TransferState::Interrupted, "{}", t.error);
        let again = c.start_backup(backup_req("big", &src)).await.unwrap().into_inner();
        let end = watch_end(&mut c, &again.id).await;
        assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
        let st = end.stats.unwrap();
        assert!(st.chunks_dedup >= 100, "the rerun skipped only {} chunks", st.chunks_dedup);
        assert!(st.bytes_new <= 70 << 20, "the rerun stored {} new bytes", st.bytes_new);
        let out = dir.path().join("vols/out.img");
        let r = c
            .start_restore(pb::StartRestoreRequest { repository: "main".into(), snapshot: end.snapshot_id, target: path_ref(&out), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(watch_end(&mut c, &r.id).await.state(), pb::TransferState::Succeeded);
        assert_eq!(hash(&src), hash(&out));

        // A daemon killed outright: its running transfer is Interrupted after the restart.
        let mut r = backup_req("big2", &src);
        r.bandwidth_limit = 1 << 20;
        let t = c.start_backup(r).await.unwrap().into_inner();
        wait_state(&mut c, &t.id, pb::TransferState::Running, Duration::from_secs(10)).await;
        t.id
    });
    let killed = rt.block_on(async { client(&d).await.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner() });
    let running: Vec<_> = killed.transfers.iter().filter(|t| t.state() == pb::TransferState::Running).map(|t| t.id.clone()).collect();
    d.signal("-KILL");
    d.spawn();
    rt.block_on(async {
        let mut c = client(&d).await;
        for id in running {
            let t = c.get_transfer(pb::GetTransferRequest { id }).await.unwrap().into_inner();
            assert_eq!(t.state(), pb::TransferState::Interrupted);
        }
    });
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl is needed for the TLS tests");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// `openssl req` making a new P-256 key `<name>.key` for the subject `CN=<name>`, plus `out`
/// (the rest of the request: what to write).
fn new_key(dir: &Path, name: &str, out: &[&str]) {
    let (key, subj) = (format!("{name}.key"), format!("/CN={name}"));
    let mut args = vec!["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", &key, "-subj", &subj];
    args.extend_from_slice(out);
    openssl(dir, &args);
}

/// A self-signed CA: `<name>.key`, `<name>.pem` (also used by the CSI tests).
pub(crate) fn make_ca(dir: &Path, name: &str) {
    new_key(dir, name, &["-x509", "-out", &format!("{name}.pem"), "-days", "2"]);
}

/// `<name>.key` and `<name>.pem` signed by the CA `ca`, with the extension line `ext`.
pub(crate) fn make_cert(dir: &Path, ca: &str, name: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    new_key(dir, name, &["-out", &format!("{name}.csr")]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// In `p`: a CA `ca` with a server certificate for 127.0.0.1 (`server`) and a client one
/// (`client`, CN=client), and another CA's client certificate (`rogue`). Returns the
/// daemon's `[tls]` section for them.
pub(crate) fn tls_fixture(p: &Path) -> String {
    make_ca(p, "ca");
    make_ca(p, "otherca");
    make_cert(p, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
    make_cert(p, "ca", "client", "extendedKeyUsage=clientAuth\n");
    make_cert(p, "otherca", "rogue", "extendedKeyUsage=clientAuth\n");
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        p.join("server.pem").display(),
        p.join("server.key").display(),
        p.join("ca.pem").display()
    );
    tls
}

#[test]
fn mtls_rejects_clients_without_a_certificate_or_from_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let tls = tls_fixture(p);
    let mut d = Daemon::start(p, &tls, false);
    d.grpc = d.grpc.replace("http://", "https://");
    let conn = |cert: Option<&str>| mover::client::Conn {
        server: d.grpc.clone(),
        ca: Some(p.join("ca.pem")),
        cert: cert.map(|c| p.join(format!("{c}.pem"))),
        key: cert.map(|c| p.join(format!("{c}.key"))),
    };
    rt().block_on(async {
        let ok = mover::client::connect(&conn(Some("client"))).await.unwrap();
        TransferServiceClient::new(ok).list_transfers(pb::ListTransfersRequest::default()).await.unwrap();
        for who in [None, Some("rogue")] {
            let refused = match mover::client::connect(&conn(who)).await {
                Err(_) => true,
                Ok(ch) => TransferServiceClient::new(ch).list_transfers(pb::ListTransfersRequest::default()).await.is_err(),
            };
            assert!(refused, "a client with {who:?} was let in");
        }
    });
    // Without TLS the daemon refuses a non-loopback address.
    let o = Command::new(env!("CARGO_BIN_EXE_mover")).args(["serve", "--listen", "0.0.0.0:0", "--state-dir"]).arg(p.join("st2")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not loopback"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn pod_volumes_resolve_under_the_kubelet_root() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let uid = "6f0c2a4e-1111-2222-3333-444455556666";
    let pod = dir.path().join("kubelet/pods").join(uid);
    // Filesystem mode: a KubeVirt disk.img inside the CSI mount.
    let fs_dir = pod.join("volumes/kubernetes.io~csi/rootdisk/mount");
    std::fs::create_dir_all(&fs_dir).unwrap();
    make_volume(&fs_dir.join("disk.img"), 12 << 20, 51);
    // Block mode: the kubelet publishes the device under volumeDevices.
    let img = dir.path().join("block.img");
    make_volume(&img, 16 << 20, 52);
    let lo = Loop::new(&img, 0);
    let bdir = pod.join("volumeDevices/kubernetes.io~csi");
    std::fs::create_dir_all(&bdir).unwrap();
    std::os::unix::fs::symlink(&lo.dev, bdir.join("datadisk")).unwrap();
    let pv = |name: &str| Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::PodVolume(pb::PodVolume { pod_uid: uid.into(), volume_name: name.into() })) });
    rt().block_on(async {
        let mut c = client(&d).await;
        let req = pb::StartBackupRequest {
            repository: "main".into(),
            volumes: vec![
                pb::BackupVolume { name: "root".into(), source: pv("rootdisk"), ..Default::default() },
                pb::BackupVolume { name: "data".into(), source: pv("datadisk"), ..Default::default() },
            ],
            ..Default::default()
        };
        let t = c.start_backup(req).await.unwrap().into_inner();
        let end = watch_end(&mut c, &t.id).await;
        assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
        for (vol, src) in [("root", fs_dir.join("disk.img")), ("data", img.clone())] {
            let out = dir.path().join(format!("vols/{vol}.out"));
            let r = pb::StartRestoreRequest {
                repository: "main".into(),
                snapshot: end.snapshot_id.clone(),
                volume: vol.into(),
                target: path_ref(&out),
                ..Default::default()
            };
            let r = c.start_restore(r).await.unwrap().into_inner();
            assert_eq!(watch_end(&mut c, &r.id).await.state(), pb::TransferState::Succeeded);
            assert_eq!(hash(&src), hash(&out), "volume {vol}");
        }
        let bad = pb::StartBackupRequest {
            repository: "main".into(),
            volumes: vec![pb::BackupVolume { name: "x".into(), source: pv("nosuch"), ..Default::default() }],
            ..Default::default()
        };
        let e = c.start_backup(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains("'nosuch'") && e.message().contains(uid), "{}", e.message());
        let bad = pb::StartBackupRequest {
            repository: "main".into(),
            volumes: vec![pb::BackupVolume {
                name: "x".into(),
                source: Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::PodVolume(pb::PodVolume { pod_uid: "../..".into(), volume_name: "v".into() })) }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(c.start_backup(bad).await.unwrap_err().code(), Code::InvalidArgument);
    });
}

/// StartBackup over gRPC with an NBD source and dirty bitmap (real qemu-nbd), and a
/// bitmap the export lacks: the transfer reports the fallback and the metric counts it.
#[test]
fn nbd_sources_through_the_api_report_change_source_and_fallbacks() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let img = dir.path().join("vm.qcow2");
    let run = |args: &[&str]| assert!(Command::new(args[0]).args(&args[1..]).status().unwrap().success(), "{args:?}");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 12M", img.to_str().unwrap()]);
    run(&["qemu-img", "bitmap", "--add", img.to_str().unwrap(), "cp1"]);
    // The socket lies beneath an allowed root: the daemon resolves it like any path.
    let sock = dir.path().join("vols/nbd.sock");
    let mut q = Command::new("qemu-nbd").args(["-r", "-t", "-f", "qcow2", "-B", "cp1", "-k", sock.to_str().unwrap(), img.to_str().unwrap()]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let vol = |bitmap: &str, checkpoint: &str| pb::BackupVolume {
        name: "vm".into(),
        nbd_uri: uri.clone(),
        nbd_bitmap: bitmap.into(),
        checkpoint: checkpoint.into(),
        ..Default::default()
    };
    rt().block_on(async {
        let mut c = client(&d).await;
        let req = |v: pb::BackupVolume, parent: &str| pb::StartBackupRequest {
            repository: "main".into(),
            volumes: vec![v],
            parent: parent.into(),
            ..Default::default()
        };
        let t = c.start_backup(req(vol("", "cp1"), "")).await.unwrap().into_inner();
        let full = watch_end(&mut c, &t.id).await;
        assert_eq!(full.state(), pb::TransferState::Succeeded, "{}", full.error);
        assert_eq!(full.changes[0].change_source, "full");
        let t = c.start_backup(req(vol("cp1", ""), "latest")).await.unwrap().into_inner();
        let inc = watch_end(&mut c, &t.id).await;
        assert_eq!(inc.state(), pb::TransferState::Succeeded, "{}", inc.error);
        assert_eq!((inc.changes[0].change_source.as_str(), inc.changes[0].fallback.as_str()), ("nbd", ""));
        assert_eq!(inc.stats.unwrap().bytes_read, 0, "nothing written since the checkpoint: nothing read");
        let t = c.start_backup(req(vol("gone", ""), "latest")).await.unwrap().into_inner();
        let fb = watch_end(&mut c, &t.id).await;
        assert_eq!(fb.state(), pb::TransferState::Succeeded, "{}", fb.error);
        assert!(fb.changes[0].fallback.contains("qemu:dirty-bitmap:gone"), "{:?}", fb.changes);
        assert_eq!(d.metric("mover_change_source_fallbacks_total"), 1);
        assert_eq!(d.metric("mover_backup_volumes_total{change_source=\"nbd\"}"), 1);
        // A bitmap without an NBD source is a malformed request.
        let bad = pb::BackupVolume { name: "vm".into(), nbd_bitmap: "cp1".into(), source: path_ref(&img), ..Default::default() };
        let e = c.start_backup(req(bad, "")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    });
    let _ = q.kill();
    let _ = q.wait();
}

/// A store on 127.0.0.1 that accepts connections and never answers; its port.
fn silent_store() -> u16 {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

#[test]
fn an_unreachable_repository_never_delays_requests_on_another() {
    // A store that accepts connections and never answers, configured beside the local one.
    let port = silent_store();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[repositories.far]\nurl = \"s3://mover-far/x\"\ns3_endpoint = \"http://127.0.0.1:{port}\"\npassword_env = \"MOVER_TEST_DAEMON_PW\"\n");
    let d = Daemon::start_alive(dir.path(), &extra, false);
    // Not ready while a configured repository cannot be opened: the probe says which and
    // why, and so does the metric.
    let t0 = Instant::now();
    loop {
        let (code, body) = http_get(d.http, "/readyz").unwrap();
        if body.contains("repository 'far'") && d.metric("mover_repository_up{repository=\"main\"}") == 1 {
            assert_eq!(code, 503, "{body}");
            assert!(!body.contains("'main'"), "{body}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{code} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.metric("mover_repository_up{repository=\"far\"}"), 0);
    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 4 << 20, 81);
    rt().block_on(async {
        let ch = mover::client::connect(&mover::client::Conn { server: d.grpc.clone(), ..Default::default() }).await.unwrap();
        let mut far = pb::repository_service_client::RepositoryServiceClient::new(ch.clone());
        // Requests on the far repository: they wait for its store (retried).
        let stuck = tokio::spawn(async move { far.list_snapshots(pb::ListSnapshotsRequest { repository: "far".into(), ..Default::default() }).await });
        let mut tc = client(&d).await;
        let mut far_backup = backup_req("disk", &src);
        far_backup.repository = "far".into();
        let stuck_backup = tokio::spawn(async move { tc.start_backup(far_backup).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The local repository answers at once, for listings and for new transfers.
        let mut rc = pb::repository_service_client::RepositoryServiceClient::new(ch);
        let mut c = client(&d).await;
        for _ in 0..3 {
            let t0 = Instant::now();
            rc.list_snapshots(pb::ListSnapshotsRequest { repository: "main".into(), ..Default::default() }).await.unwrap();
            let t = c.start_backup(backup_req("disk", &src)).await.unwrap().into_inner();
            assert!(t0.elapsed() < Duration::from_secs(1), "the local repository answered in {:?} while the far one hung", t0.elapsed());
            assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
        }
        assert!(!stuck.is_finished() && !stuck_backup.is_finished(), "the far repository's requests did not wait for its store");
        stuck.abort();
        stuck_backup.abort();
    });
}

/// A backup refused at the call (its source does not exist) is a failed backup for the
/// metrics: `MoverBackupsFailing` sees a node whose every backup is refused.
#[test]
fn a_backup_refused_at_the_call_counts_as_a_failed_backup() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let err = "mover_transfers_total{kind=\"backup\",result=\"err\"}";
    assert_eq!(d.metric(err), 0);
    rt().block_on(async {
        let mut c = client(&d).await;
        let e = c.start_backup(backup_req("disk", &dir.path().join("vols/missing.img"))).await.unwrap_err();
        assert!(e.message().contains("missing.img"), "{e:?}");
    });
    assert_eq!(d.metric(err), 1, "the refused backup is counted as failed");
}

#[test]
fn ended_transfers_are_kept_by_count_and_then_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "transfer_history = 2", false);
    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 4 << 20, 82);
    rt().block_on(async {
        let mut c = client(&d).await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            let t = c.start_backup(backup_req("disk", &src)).await.unwrap().into_inner();
            assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
            ids.push(t.id);
        }
        // The end state is published a moment before the record is settled.
        let t0 = Instant::now();
        let listed = loop {
            let l: Vec<String> =
                c.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner().transfers.into_iter().map(|t| t.id).collect();
            if l.len() <= 2 || t0.elapsed() > Duration::from_secs(5) {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(listed, ids[1..].to_vec(), "the newest two are kept, the oldest forgotten");
        let e = c.get_transfer(pb::GetTransferRequest { id: ids[0].clone() }).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let records = std::fs::read_dir(dir.path().join("state/transfers"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
            .count();
        assert_eq!(records, 2, "the forgotten transfer's record is still on disk");
    });
}

#[test]
fn list_transfers_filters_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 4 << 20, 83);
    rt().block_on(async {
        let mut c = client(&d).await;
        let mut ids = Vec::new();
        for group in ["vms/a", "vms/b", "vms/a"] {
            let t = c.start_backup(pb::StartBackupRequest { group: group.into(), ..backup_req("disk", &src) }).await.unwrap().into_inner();
            assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
            ids.push(t.id);
        }
        let snap = c.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner().transfers[0].snapshot_id.clone();
        let out = dir.path().join("vols/out.img");
        let r = pb::StartRestoreRequest { repository: "main".into(), snapshot: snap, target: path_ref(&out), ..Default::default() };
        let r = c.start_restore(r).await.unwrap().into_inner();
        watch_end(&mut c, &r.id).await;
        let list = |req: pb::ListTransfersRequest| {
            let mut c = c.clone();
            async move { c.list_transfers(req).await.map(|r| r.into_inner()) }
        };
        let ids_of = |r: &pb::ListTransfersResponse| r.transfers.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        let backups = list(pb::ListTransfersRequest { kind: pb::TransferKind::Backup as i32, ..Default::default() }).await.unwrap();
        assert_eq!(ids_of(&backups), ids);
        let a = list(pb::ListTransfersRequest { group: "vms/a".into(), state: pb::TransferState::Succeeded as i32, ..Default::default() }).await.unwrap();
        // The restore is of a snapshot of vms/a: it concerns that group too.
        assert_eq!(ids_of(&a), vec![ids[0].clone(), ids[2].clone(), r.id.clone()]);
        // Pages of two: every transfer once, in order.
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let p = list(pb::ListTransfersRequest { page_size: 2, page_token: token.clone(), ..Default::default() }).await.unwrap();
            assert!(p.transfers.len() <= 2);
            seen.extend(ids_of(&p));
            if p.next_page_token.is_empty() {
                break;
            }
            token = p.next_page_token;
        }
        assert_eq!(seen, ids.iter().cloned().chain([r.id.clone()]).collect::<Vec<_>>());
        let e = list(pb::ListTransfersRequest { page_token: "nonsense".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    });
}

#[test]
fn a_kubelet_link_into_its_plugins_directory_is_a_block_volume() {
    // CSI block volumes: the kubelet's volumeDevices entry links to the device it published
    // under plugins/kubernetes.io/csi/volumeDevices/publish/ (inside the kubelet root).
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let uid = "6f0c2a4e-1111-2222-3333-444455556667";
    let img = dir.path().join("block.img");
    make_volume(&img, 8 << 20, 53);
    let lo = Loop::new(&img, 0);
    let publish = dir.path().join("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pv-1");
    std::fs::create_dir_all(&publish).unwrap();
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&lo.dev).unwrap());
    nix::sys::stat::mknod(&publish.join(uid), nix::sys::stat::SFlag::S_IFBLK, nix::sys::stat::Mode::from_bits_truncate(0o600), rdev).unwrap();
    let entry = dir.path().join("kubelet/pods").join(uid).join("volumeDevices/kubernetes.io~csi");
    std::fs::create_dir_all(&entry).unwrap();
    std::os::unix::fs::symlink(publish.join(uid), entry.join("pvdisk")).unwrap();
    rt().block_on(async {
        let mut c = client(&d).await;
        let by_ref = pb::StartBackupRequest {
            repository: "main".into(),
            volumes: vec![pb::BackupVolume {
                name: "disk".into(),
                source: Some(pb::VolumeRef {
                    r#ref: Some(pb::volume_ref::Ref::PodVolume(pb::PodVolume { pod_uid: uid.into(), volume_name: "pvdisk".into() })),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        for req in [by_ref, backup_req("disk", &entry.join("pvdisk"))] {
            let t = c.start_backup(req).await.unwrap().into_inner();
            let end = watch_end(&mut c, &t.id).await;
            assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
            let out = dir.path().join("vols/out.img");
            let _ = std::fs::remove_file(&out);
            let r = pb::StartRestoreRequest { repository: "main".into(), snapshot: end.snapshot_id, target: path_ref(&out), ..Default::default() };
            let r = c.start_restore(r).await.unwrap().into_inner();
            assert_eq!(watch_end(&mut c, &r.id).await.state(), pb::TransferState::Succeeded);
            assert_eq!(hash(&out), hash(&img));
        }
    });
}

/// Recovery points read "unknown" (NaN), never "0 s old", until a listing succeeded: for
/// every configured group from the start, and again while the store cannot be listed. The
/// last success per kind and group survives a restart.
#[test]
fn recovery_points_are_unknown_until_listed_and_the_last_success_survives_a_restart() {
    let port = silent_store();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "status_interval_seconds = 1\n\
         [repositories.far]\nurl = \"s3://mover-far/x\"\ns3_endpoint = \"http://127.0.0.1:{port}\"\npassword_env = \"MOVER_TEST_DAEMON_PW\"\nstatus_groups = [\"vms/a\"]\n\
         [repositories.grouped]\nurl = \"{}\"\npassword_env = \"MOVER_TEST_DAEMON_PW\"\ninit_if_missing = true\nstatus_groups = [\"vms/a\", \"vms/b\"]\n",
        dir.path().join("grouped").display()
    );
    let mut d = Daemon::start_alive(dir.path(), &extra, false);
    let (_, body) = http_get(d.http, "/metrics").unwrap();
    for l in ["{group=\"vms/a\",repository=\"far\"}", "{group=\"other\",repository=\"far\"}"] {
        for m in ["mover_snapshot_age_seconds", "mover_verified_snapshot_age_seconds", "mover_drilled_snapshot_age_seconds", "mover_projected_restore_seconds"]
        {
            let v = metric(&d, &format!("{m}{l}"));
            assert!(v.is_some_and(f64::is_nan), "{m}{l} = {v:?} (unknown must be NaN, never 0)\n{body}");
        }
    }
    assert!(!body.contains("mover_last_success_timestamp_seconds{"), "no success yet, no series: {body}");
    assert!(!body.contains("mover_repository_status_timestamp_seconds{repository=\"far\"}"), "{body}");
    // The open repository, listed: its configured groups without snapshots are +Inf (none),
    // `other` has no snapshots and no series.
    let a = "{group=\"vms/a\",repository=\"grouped\"}";
    assert_eq!(wait_metric(&d, &format!("mover_snapshot_age_seconds{a}"), |v| !v.is_nan()), f64::INFINITY);
    assert_eq!(metric(&d, "mover_snapshot_age_seconds{group=\"other\",repository=\"grouped\"}"), None);
    assert!(metric(&d, "mover_repository_status_timestamp_seconds{repository=\"grouped\"}").unwrap() > 1e9);

    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 4 << 20, 83);
    rt().block_on(async {
        let mut c = client(&d).await;
        for group in ["vms/a", "vms/zzz"] {
            let mut req = backup_req("disk", &src);
            req.repository = "grouped".into();
            req.group = group.into();
            let t = c.start_backup(req).await.unwrap().into_inner();
            assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
        }
    });
    assert!(wait_metric(&d, &format!("mover_snapshot_age_seconds{a}"), f64::is_finite) < 60.0);
    assert!(wait_metric(&d, "mover_snapshot_age_seconds{group=\"other\",repository=\"grouped\"}", f64::is_finite) < 60.0);
    assert_eq!(metric(&d, "mover_snapshot_age_seconds{group=\"vms/b\",repository=\"grouped\"}"), Some(f64::INFINITY));
    let (sa, so) =
        ("mover_last_success_timestamp_seconds{group=\"vms/a\",kind=\"backup\"}", "mover_last_success_timestamp_seconds{group=\"other\",kind=\"backup\"}");
    let (ta, to) = (metric(&d, sa).unwrap(), metric(&d, so).unwrap());
    assert!(ta > 1e9 && to >= ta, "{ta} {to}");

    // After a restart (killed: nothing written at shutdown), the same times, before any
    // transfer; the far repository's recovery points are unknown again.
    d.signal("-KILL");
    d.spawn();
    assert_eq!((metric(&d, sa), metric(&d, so)), (Some(ta), Some(to)));
    assert!(metric(&d, "mover_snapshot_age_seconds{group=\"vms/a\",repository=\"far\"}").is_some_and(f64::is_nan));
    let state = dir.path().join("state/last-success.json");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["backup"]["vms/a"].as_f64(), Some(ta), "{saved}");
}

/// The recovery-point refresh after every job reads only the manifests added since the
/// refresh before (issue 33: its cost follows the work, not the repository): after three
/// backups it has read three manifests, not 1 + 2 + 3; a status request reads none; a
/// snapshot forgotten by another process is gone from the next status without a read.
/// The index syncs before each backup are counted.
#[test]
fn recovery_point_refreshes_read_only_what_was_added() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 4 << 20, 91);
    let read = "mover_status_manifests_read_total{repository=\"main\"}";
    let counts = |st: &pb::RepositoryStatus| -> Vec<(String, u64)> { st.groups.iter().map(|g| (g.group.clone(), g.snapshots)).collect() };
    rt().block_on(async {
        let mut c = client(&d).await;
        let mut ids = Vec::new();
        for (i, group) in ["vms/a", "vms/b", "vms/a"].into_iter().enumerate() {
            let mut req = backup_req("disk", &src);
            req.group = group.into();
            let t = c.start_backup(req).await.unwrap().into_inner();
            let end = watch_end(&mut c, &t.id).await;
            assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
            ids.push(end.snapshot_id);
            // The refresh after this job has read this job's manifest, and only it.
            assert_eq!(wait_metric(&d, read, |v| v >= (i + 1) as f64), (i + 1) as f64);
        }
        let mut rc = pb::repository_service_client::RepositoryServiceClient::new(
            mover::client::connect(&mover::client::Conn { server: d.grpc.clone(), ..Default::default() }).await.unwrap(),
        );
        let st = rc.get_status(pb::GetStatusRequest { repository: "main".into() }).await.unwrap().into_inner();
        assert_eq!(counts(&st), [("vms/a".to_string(), 2), ("vms/b".to_string(), 1)]);
        assert_eq!(metric(&d, read), Some(3.0), "a status request reads no manifest it has read before");
        assert!(metric(&d, "mover_index_syncs_total").unwrap() >= 3.0);
        assert!(metric(&d, "mover_status_refresh_seconds{repository=\"main\"}").is_some());

        // Another process forgets the first snapshot of vms/a: the next status has one left.
        let out = Command::new(env!("CARGO_BIN_EXE_mover"))
            .args(["forget", &ids[0], "-r"])
            .arg(dir.path().join("repo"))
            .env("MOVER_PASSWORD", "daemon-test-pw")
            .env("MOVER_CACHE_DIR", dir.path().join("cli-cache"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let st = rc.get_status(pb::GetStatusRequest { repository: "main".into() }).await.unwrap().into_inner();
        assert_eq!(counts(&st), [("vms/a".to_string(), 1), ("vms/b".to_string(), 1)]);
        assert_eq!(st.groups[0].newest_snapshot, ids[2]);
        assert_eq!(metric(&d, read), Some(3.0));
    });
}

/// `mover serve -r REPO` serves REPO as its `default` repository (not a new one in its
/// state directory), with JSON logs when asked; `mover client` refuses repository options
/// given on its command line instead of ignoring them (from the environment they are
/// left to the repository commands); a configuration with its own repositories and a
/// `MOVER_REPOSITORY` is refused, naming both.
#[test]
fn serve_takes_its_default_repository_from_repo_and_client_refuses_repository_options() {
    let e = super::Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 4 << 20, 92);
    let state = e.path("state");
    let http = free_port();
    let log = e.path("serve.log");
    // A configuration without [repositories]: -r (here MOVER_REPOSITORY) names the default;
    // without `listen`, the socket follows --state-dir.
    let cfg = e.path("serve.toml");
    std::fs::write(&cfg, format!("allowed_roots = [\"{}\"]\nshutdown_grace_seconds = 0\n", e.dir.path().display())).unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        e.cmd(&[
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
            "--log-format",
            "json",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let t0 = Instant::now();
    while http_get(http, "/readyz").map(|r| r.0) != Some(200) {
        assert!(t0.elapsed() < Duration::from_secs(20), "not ready: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    let server = format!("unix:{}", state.join("mover.sock").display());
    let out = e.ok(&["client", "--server", &server, "start-backup", "--repository", "default", "--volume", &format!("disk={}", src.display()), "--watch"]);
    assert!(out.contains("succeeded"), "{out}");
    // `client list`: kind, state, group and age per line, filtered on request.
    let listed = e.ok(&["client", "--server", &server, "list", "--kind", "backup", "--state", "succeeded"]);
    let line = listed.lines().next().unwrap_or_default();
    assert!(line.contains("  backup ") && line.contains("succeeded") && line.contains(" ago") && line.contains("4.00 MiB/4.00 MiB (100%)"), "{listed}");
    assert_eq!(e.ok(&["client", "--server", &server, "list", "--kind", "restore"]), "", "no restore ran");
    // The snapshot is in the repository -r named, and no repository was made in the state
    // directory.
    let snaps = e.ok(&["snapshots", "--json"]);
    assert_eq!(snaps.lines().count(), 1, "{snaps}");
    assert!(!state.join("repository").exists());
    // Repository options on client's command line are refused, naming them.
    let err = e.fail(&["client", "--server", &server, "snapshots", "-r", "dr"]);
    assert!(err.contains("does not take --repo") && err.contains("--repository"), "{err}");
    let _ = Command::new("kill").arg(child.0.id().to_string()).status();
    let _ = child.0.wait();
    // Every log line is a JSON object with a level and a message, without colour codes.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = 0;
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|err| panic!("not JSON ({err}): {l}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string() && !l.contains('\u{1b}'), "{l}");
        lines += 1;
    }
    assert!(lines >= 2 && text.contains("serving gRPC"), "{text}");
    // A configuration naming its own repositories and MOVER_REPOSITORY: refused.
    let cfg = e.path("c.toml");
    std::fs::write(&cfg, format!("state_dir = \"{}\"\n[repositories.main]\nurl = \"{}\"\n", e.path("s2").display(), e.repo)).unwrap();
    let err = e.fail(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(err.contains("MOVER_REPOSITORY") && err.contains("main"), "{err}");
}

/// `mover_upload_bytes_total` grows while a transfer uploads (not only when it ends), and
/// ends equal to what the transfer reports.
#[test]
fn upload_bytes_are_counted_as_they_upload() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let src = dir.path().join("vols/disk.img");
    std::fs::write(&src, super::noise(94, 48 << 20)).unwrap();
    rt().block_on(async {
        let mut c = client(&d).await;
        let mut req = backup_req("disk", &src);
        req.bandwidth_limit = 8 << 20; // ~6 s of uploads, pack by pack
        let t = c.start_backup(req).await.unwrap().into_inner();
        let mut seen_between = Vec::new();
        let end = loop {
            let now = c.get_transfer(pb::GetTransferRequest { id: t.id.clone() }).await.unwrap().into_inner();
            let m = d.metric("mover_upload_bytes_total");
            if now.state() != pb::TransferState::Running && now.state() != pb::TransferState::Queued {
                break now;
            }
            if m > 0 {
                seen_between.push(m);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
        let total = end.stats.unwrap().bytes_uploaded;
        assert!(seen_between.iter().any(|m| *m < total), "uploads were not counted before the end: {seen_between:?} of {total}");
        assert_eq!(d.metric("mover_upload_bytes_total"), total);
    });
}
