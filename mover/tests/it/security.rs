//! The trust boundary (docs/security.md): each attack of a tenant, a caller or a store,
//! reproduced against the daemon over a real socket (and the CLI where it applies). Each
//! asserts the refusal, with a clear error, and that nothing outside the volume was read
//! (the victim file's access time does not move: this filesystem updates it on read, which
//! each test checks first) or written (hashes, no snapshot, no transfer).

use super::*;
use crate::daemon::{backup_req, client, path_ref, rt, wait_state, watch_end, Daemon};
use mover_protocol::v1 as pb;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime};
use tonic::Code;

/// Sets a file's access time two days into the past.
fn age(p: &Path) {
    let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() - 2 * 86_400;
    assert!(Command::new("touch").args(["-a", "-d", &format!("@{t}")]).arg(p).status().unwrap().success());
}

fn atime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().accessed().unwrap()
}

/// A victim file whose reads show: aged, and the filesystem proven to update atime on read.
/// Returns its access time, which must not move.
fn victim(path: &Path, content: &[u8]) -> SystemTime {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    age(path);
    let before = atime(path);
    std::fs::read(path).unwrap();
    assert!(atime(path) > before, "this filesystem does not record reads in atime; the tests could not see a read");
    age(path);
    atime(path)
}

fn expect(r: Result<tonic::Response<pb::Transfer>, tonic::Status>, code: Code, needles: &[&str]) -> String {
    let e = r.expect_err("the request should be refused");
    assert_eq!(e.code(), code, "{}", e.message());
    for n in needles {
        assert!(e.message().contains(n), "'{}' does not say '{n}'", e.message());
    }
    e.message().to_string()
}

fn pod_ref(uid: &str, vol: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::PodVolume(pb::PodVolume { pod_uid: uid.into(), volume_name: vol.into() })) })
}

fn pod_req(uid: &str, vol: &str) -> pb::StartBackupRequest {
    pb::StartBackupRequest {
        repository: "main".into(),
        volumes: vec![pb::BackupVolume { name: "disk".into(), source: pod_ref(uid, vol), ..Default::default() }],
        ..Default::default()
    }
}

/// No transfer was started and the repository holds no snapshot.
async fn nothing_started(c: &mut pb::transfer_service_client::TransferServiceClient<tonic::transport::Channel>, d: &Daemon) {
    assert!(c.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner().transfers.is_empty(), "a refused request started a transfer");
    let ch = mover::client::connect(&mover::client::Conn { server: d.grpc.clone(), ..Default::default() }).await.unwrap();
    let mut rc = pb::repository_service_client::RepositoryServiceClient::new(ch);
    let snaps = rc.list_snapshots(pb::ListSnapshotsRequest { repository: "main".into(), ..Default::default() }).await.unwrap().into_inner().snapshots;
    assert!(snaps.is_empty(), "a refused request wrote a snapshot");
}

/// The directory of a filesystem-mode pod volume (`…/volumes/kubernetes.io~csi/<vol>/mount`).
fn fs_volume(dir: &Path, uid: &str, vol: &str) -> PathBuf {
    let p = dir.join("kubelet/pods").join(uid).join("volumes/kubernetes.io~csi").join(vol).join("mount");
    std::fs::create_dir_all(&p).unwrap();
    p
}

const UID: &str = "0d3b1c2a-aaaa-bbbb-cccc-000000000001";

#[test]
fn a_symlinked_disk_img_is_refused_and_the_node_file_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let secret = dir.path().join("kubelet/pki/kubelet-client-current.pem");
    let untouched = victim(&secret, b"-----BEGIN PRIVATE KEY----- node secret\n");
    let img = dir.path().join("dev.img");
    std::fs::write(&img, noise(3, 4 << 20)).unwrap();
    let dev = Loop::new(&img, 0);
    let vol = fs_volume(dir.path(), UID, "rootdisk");
    rt().block_on(async {
        let mut c = client(&d).await;
        // To a file of the node, relative and absolute; to a block device.
        for target in [PathBuf::from("../../../../../../../pki/kubelet-client-current.pem"), secret.clone(), dev.dev.clone()] {
            let _ = std::fs::remove_file(vol.join("disk.img"));
            std::os::unix::fs::symlink(&target, vol.join("disk.img")).unwrap();
            let m = expect(c.start_backup(pod_req(UID, "rootdisk")).await, Code::InvalidArgument, &["disk.img"]);
            assert!(m.contains("symbolic link") || m.contains("outside the allowed roots"), "{m}");
            // The same file named by path.
            expect(c.start_backup(backup_req("disk", &vol.join("disk.img"))).await, Code::InvalidArgument, &["disk.img"]);
        }
        nothing_started(&mut c, &d).await;
    });
    assert_eq!(atime(&secret), untouched, "the node's file was read");
}

#[test]
fn a_disk_img_swapped_for_a_symlink_never_backs_up_the_node_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "max_concurrent_transfers = 4", false);
    let secret = dir.path().join("kubelet/pki/kubelet-client-current.pem");
    let untouched = victim(&secret, &noise(9, 1 << 20));
    let vol = fs_volume(dir.path(), UID, "rootdisk");
    let own = noise(8, 1 << 20);
    std::fs::write(vol.join("disk.img"), &own).unwrap();
    std::os::unix::fs::symlink(&secret, vol.join("swap")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The tenant swaps disk.img and a symlink to the node's file, as fast as it can.
    let swapper = {
        let (vol, stop) = (vol.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &vol.join("disk.img"),
                    nix::fcntl::AT_FDCWD,
                    &vol.join("swap"),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
                n += 1;
            }
            n
        })
    };
    let (mut ok, mut refused) = (Vec::new(), 0);
    rt().block_on(async {
        let mut c = client(&d).await;
        // At least 40 attempts, and on until both outcomes were seen (a loaded machine can
        // line the swaps up with the requests for a while).
        for i in 0..2000 {
            if i >= 40 && !ok.is_empty() && refused > 0 {
                break;
            }
            match c.start_backup(pod_req(UID, "rootdisk")).await {
                Ok(t) => ok.push(t.into_inner().id),
                Err(e) => {
                    assert!(matches!(e.code(), Code::InvalidArgument | Code::NotFound), "{e:?}");
                    refused += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut snaps = Vec::new();
        for id in &ok {
            let t = watch_end(&mut c, id).await;
            assert_eq!(t.state(), pb::TransferState::Succeeded, "{}", t.error);
            snaps.push(t.snapshot_id);
        }
        for s in snaps {
            let out = dir.path().join("vols").join(format!("{}.out", &s[..8]));
            let r = pb::StartRestoreRequest { repository: "main".into(), snapshot: s.clone(), target: path_ref(&out), ..Default::default() };
            let t = c.start_restore(r).await.unwrap().into_inner();
            assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
            assert_eq!(std::fs::read(&out).unwrap(), own, "snapshot {s} holds something other than the volume's own disk.img");
        }
    });
    let swaps = swapper.join().unwrap();
    eprintln!("swap race: {swaps} swaps, {} backups of the volume's file, {refused} refused", ok.len());
    assert!(swaps > 100 && !ok.is_empty() && refused > 0, "the race did not happen: {swaps} swaps, {} ok, {refused} refused", ok.len());
    assert_eq!(atime(&secret), untouched, "the node's file was read");
}

#[test]
fn fifos_sockets_and_character_devices_are_not_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let vol = fs_volume(dir.path(), UID, "rootdisk");
    let disk = vol.join("disk.img");
    rt().block_on(async {
        let mut c = client(&d).await;
        for (make, what) in [("fifo", "a FIFO"), ("chr", "a character device"), ("sock", "a socket")] {
            let _ = std::fs::remove_file(&disk);
            match make {
                "fifo" => nix::unistd::mkfifo(&disk, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap(),
                // The numbers of /dev/watchdog: opening it would arm the node's watchdog.
                "chr" => nix::sys::stat::mknod(
                    &disk,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    nix::sys::stat::makedev(10, 130),
                )
                .unwrap(),
                // Bound under a short name (a socket path has a length limit), then moved.
                _ => {
                    let short = tempfile::Builder::new().prefix("s").tempdir_in("/tmp").unwrap();
                    drop(std::os::unix::net::UnixListener::bind(short.path().join("s")).unwrap());
                    std::fs::rename(short.path().join("s"), &disk).unwrap();
                }
            }
            let t0 = Instant::now();
            expect(c.start_backup(pod_req(UID, "rootdisk")).await, Code::InvalidArgument, &[what, "disk.img"]);
            assert!(t0.elapsed() < Duration::from_secs(2), "a {make} blocked the request for {:?}", t0.elapsed());
        }
        // A character device named by path under /dev, and /dev itself.
        expect(c.start_backup(backup_req("disk", Path::new("/dev/null"))).await, Code::InvalidArgument, &["a character device"]);
        expect(c.start_backup(backup_req("disk", Path::new("/dev"))).await, Code::InvalidArgument, &["/dev"]);
        nothing_started(&mut c, &d).await;
        // The daemon is not stuck: a volume of the tenant's backs up.
        let _ = std::fs::remove_file(&disk);
        std::fs::write(&disk, noise(1, 1 << 20)).unwrap();
        let t = c.start_backup(pod_req(UID, "rootdisk")).await.unwrap().into_inner();
        assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
    });
}

/// A process that holds `path` open read-write, not exclusively (as QEMU holds a disk),
/// for a minute or until killed.
fn hold_open(path: &Path) -> std::process::Child {
    Command::new("sh").arg("-c").arg(format!("exec 3<>{} && sleep 60", path.display())).spawn().unwrap()
}

/// Runs `mover restore` through the CLI against the daemon's repository.
fn cli_restore(dir: &Path, snap: &str, target: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mover"))
        .args(["restore", snap])
        .arg(target)
        .env("MOVER_REPOSITORY", dir.join("repo"))
        .env("MOVER_PASSWORD", "daemon-test-pw")
        .env("MOVER_CACHE_DIR", dir.join("clicache"))
        .output()
        .unwrap()
}

#[test]
fn restores_onto_a_mounted_held_or_open_target_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let src = dir.path().join("vols/src.img");
    std::fs::write(&src, noise(4, 8 << 20)).unwrap();
    // A device with a filesystem, mounted read-only (a writable mount must never be tried:
    // writeback under it can hang every sync on the machine).
    let fsimg = dir.path().join("fs.img");
    std::fs::File::create(&fsimg).unwrap().set_len(16 << 20).unwrap();
    assert!(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&fsimg).status().unwrap().success());
    let dev = Loop::new(&fsimg, 0);
    // Hashed before mounting: while mounted, reads of the device show the mount's
    // in-memory superblock, not what is on it.
    let before = hash_prefix(&dev.dev, 16 << 20);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    assert!(Command::new("mount").args(["-o", "ro"]).arg(&dev.dev).arg(&mnt).status().unwrap().success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let mounted = Unmount(mnt.clone());
    rt().block_on(async {
        let mut c = client(&d).await;
        let t = c.start_backup(backup_req("disk", &src)).await.unwrap().into_inner();
        let snap = watch_end(&mut c, &t.id).await.snapshot_id;
        let req = |target: &Path| pb::StartRestoreRequest { repository: "main".into(), snapshot: snap.clone(), target: path_ref(target), ..Default::default() };
        expect(c.start_restore(req(&dev.dev)).await, Code::FailedPrecondition, &["in use", dev.dev.to_str().unwrap()]);
        let o = cli_restore(dir.path(), &snap, &dev.dev);
        assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("in use"), "{}", String::from_utf8_lossy(&o.stderr));
        drop(mounted);
        assert_eq!(hash_prefix(&dev.dev, 16 << 20), before, "the mounted device was written");

        // A device another program holds exclusively.
        use std::os::unix::fs::OpenOptionsExt;
        let held = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&dev.dev).unwrap();
        expect(c.start_restore(req(&dev.dev)).await, Code::FailedPrecondition, &["in use"]);
        drop(held);
        assert_eq!(hash_prefix(&dev.dev, 16 << 20), before, "the held device was written");
        // Released: the restore goes ahead (over the filesystem: it is told to).
        expect(c.start_restore(req(&dev.dev)).await, Code::FailedPrecondition, &["already holds data", "overwrite"]);
        assert_eq!(hash_prefix(&dev.dev, 16 << 20), before, "the refused device was written");
        let t = c.start_restore(pb::StartRestoreRequest { overwrite: true, ..req(&dev.dev) }).await.unwrap().into_inner();
        assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
        assert_eq!(hash_prefix(&dev.dev, 8 << 20), hash(&src));

        // A device another program holds open read-write but not exclusively, as QEMU
        // holds a raw block volume: O_EXCL does not see it; the look at every process's
        // descriptors does (daemon and CLI), and names the holder.
        let before = hash_prefix(&dev.dev, 16 << 20);
        let mut holder = hold_open(&dev.dev);
        std::thread::sleep(Duration::from_millis(300));
        let m = expect(
            c.start_restore(pb::StartRestoreRequest { overwrite: true, ..req(&dev.dev) }).await,
            Code::FailedPrecondition,
            &["in use", "held open by pid"],
        );
        assert!(m.contains(&format!("pid {}", holder.id())), "{m}");
        let o = cli_restore(dir.path(), &snap, &dev.dev);
        assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("held open by pid"), "{}", String::from_utf8_lossy(&o.stderr));
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(hash_prefix(&dev.dev, 16 << 20), before, "the device held open was written");

        // A regular file another process has open (a running VM's disk).
        let busy = dir.path().join("vols/busy.img");
        std::fs::write(&busy, b"in use").unwrap();
        let mut holder = hold_open(&busy);
        std::thread::sleep(Duration::from_millis(300));
        expect(c.start_restore(req(&busy)).await, Code::FailedPrecondition, &["in use", "busy.img"]);
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(std::fs::read(&busy).unwrap(), b"in use");
    });
}

#[test]
fn requests_cannot_name_credentials_or_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    let src = dir.path().join("vols/disk.img");
    std::fs::write(&src, noise(5, 1 << 20)).unwrap();
    let token = dir.path().join("kubelet/pki/token");
    let untouched = victim(&token, b"node credential");
    rt().block_on(async {
        let mut c = client(&d).await;
        let mut r = backup_req("disk", &src);
        r.volumes[0].csi = Some(pb::CsiChangedBlocks {
            endpoint: "attacker.example:443".into(),
            ca_file: token.display().to_string(),
            token_file: token.display().to_string(),
            snapshot_name: "s".into(),
            ..Default::default()
        });
        expect(c.start_backup(r).await, Code::InvalidArgument, &["daemon's configuration"]);
        // Without [csi] configured, a request naming only snapshots is refused too.
        let mut r = backup_req("disk", &src);
        r.volumes[0].csi = Some(pb::CsiChangedBlocks { snapshot_name: "s".into(), ..Default::default() });
        expect(c.start_backup(r).await, Code::FailedPrecondition, &["not configured"]);
        // NBD: TCP endpoints must be listed; sockets must lie beneath the allowed roots.
        let nbd = |uri: &str| pb::StartBackupRequest {
            repository: "main".into(),
            volumes: vec![pb::BackupVolume { name: "disk".into(), nbd_uri: uri.into(), ..Default::default() }],
            ..Default::default()
        };
        expect(c.start_backup(nbd("nbd://127.0.0.1:10809/x")).await, Code::InvalidArgument, &["nbd_tcp_endpoints"]);
        expect(c.start_backup(nbd("nbd+unix:///x?socket=/run/containerd/containerd.sock")).await, Code::InvalidArgument, &["outside the allowed roots"]);
        std::os::unix::fs::symlink("/run/containerd/containerd.sock", dir.path().join("vols/evil.sock")).unwrap();
        let evil = format!("nbd+unix:///x?socket={}", dir.path().join("vols/evil.sock").display());
        expect(c.start_backup(nbd(&evil)).await, Code::InvalidArgument, &["evil.sock"]);
        // KubeVirt exports: only listed hosts.
        let mut r = backup_req("disk", &src);
        r.volumes[0].kubevirt = Some(pb::KubevirtExport {
            endpoint: "https://attacker.example/exports/d".into(),
            token: "t".into(),
            endpoint_cert: "x".into(),
            ..Default::default()
        });
        expect(c.start_backup(r).await, Code::InvalidArgument, &["kubevirt_export_hosts", "attacker.example:443"]);
        nothing_started(&mut c, &d).await;
    });
    assert_eq!(atime(&token), untouched, "the credential file was read");
}

#[test]
fn callers_are_authorized_by_certificate_identity() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    crate::daemon::make_ca(p, "ca");
    crate::daemon::make_cert(p, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
    crate::daemon::make_cert(p, "ca", "alice", "subjectAltName=URI:spiffe://cluster/ns/backup/sa/scheduler\nextendedKeyUsage=clientAuth\n");
    crate::daemon::make_cert(p, "ca", "bob", "extendedKeyUsage=clientAuth\n");
    let cfg = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n[authorization]\nbackup = [\"spiffe://cluster/ns/backup/sa/scheduler\"]\nread = [\"bob\", \"spiffe://cluster/ns/backup/sa/scheduler\"]\n",
        p.join("server.pem").display(),
        p.join("server.key").display(),
        p.join("ca.pem").display()
    );
    let mut d = Daemon::start(p, &cfg, false);
    d.grpc = d.grpc.replace("http://", "https://");
    let src = p.join("vols/disk.img");
    std::fs::write(&src, noise(6, 1 << 20)).unwrap();
    let conn = |who: &str| mover::client::Conn {
        server: d.grpc.clone(),
        ca: Some(p.join("ca.pem")),
        cert: Some(p.join(format!("{who}.pem"))),
        key: Some(p.join(format!("{who}.key"))),
    };
    rt().block_on(async {
        let mut alice = pb::transfer_service_client::TransferServiceClient::new(mover::client::connect(&conn("alice")).await.unwrap());
        let mut bob = pb::transfer_service_client::TransferServiceClient::new(mover::client::connect(&conn("bob")).await.unwrap());
        bob.list_transfers(pb::ListTransfersRequest::default()).await.unwrap();
        expect(bob.start_backup(backup_req("disk", &src)).await, Code::PermissionDenied, &["bob", "backup"]);
        let r =
            pb::StartRestoreRequest { repository: "main".into(), snapshot: "latest".into(), target: path_ref(&p.join("vols/out.img")), ..Default::default() };
        expect(alice.start_restore(r).await, Code::PermissionDenied, &["restore"]);
        let mut slow = backup_req("disk", &src);
        slow.bandwidth_limit = 64 << 10;
        let t = alice.start_backup(slow).await.unwrap().into_inner();
        assert_eq!(t.caller, "spiffe://cluster/ns/backup/sa/scheduler");
        expect(bob.cancel_transfer(pb::GetTransferRequest { id: t.id.clone() }).await, Code::PermissionDenied, &["may not cancel"]);
        alice.cancel_transfer(pb::GetTransferRequest { id: t.id.clone() }).await.unwrap();
        wait_state(&mut alice, &t.id, pb::TransferState::Cancelled, Duration::from_secs(10)).await;
    });
}

#[test]
fn the_unix_socket_is_private_and_checks_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = p.join("mover.sock");
    let d = Daemon::start(p, "socket_mode = \"0660\"\nsocket_group = 4242\n", true);
    let meta = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 4242), "socket mode and group");
    let as_user = |uid: u32, gid: u32| {
        Command::new("setpriv")
            .args([format!("--reuid={uid}"), format!("--regid={gid}"), "--groups=4242".into()])
            .arg(env!("CARGO_BIN_EXE_mover"))
            .args(["client", "--server", &d.grpc, "list"])
            .output()
            .unwrap()
    };
    // Another uid, allowed into the socket by its supplementary group, is refused by the
    // peer check (its primary group is not the socket's).
    let o = as_user(4343, 4343);
    assert!(!o.status.success(), "uid 4343 was served");
    assert!(String::from_utf8_lossy(&o.stderr).contains("may not use this daemon's socket"), "{}", String::from_utf8_lossy(&o.stderr));
    // A member by primary group is served.
    let o = as_user(4343, 4242);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Without configuration: a 0600 socket in the state directory, no TCP.
    let st = p.join("st-default");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mover"))
        .args(["serve", "--state-dir"])
        .arg(&st)
        .args(["--http-listen", &format!("127.0.0.1:{}", crate::daemon::free_port())])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let s = st.join("mover.sock");
    let t0 = Instant::now();
    while !s.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no socket in the state directory");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::metadata(&s).unwrap().mode() & 0o777, 0o600);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(&format!("serving gRPC on unix:{}", s.display())) && log.contains("I/O: io_uring"), "startup line: {log}");
}

/// An NBD server that accepts and then says nothing.
fn silent_server(path: &Path) -> std::thread::JoinHandle<()> {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut keep = Vec::new();
        for s in l.incoming().flatten() {
            keep.push(s);
        }
    })
}

/// An NBD server that negotiates and claims an export of 8 EiB.
fn huge_server(path: &Path) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = (|| -> std::io::Result<()> {
                s.write_all(&0x4e42_444d_4147_4943u64.to_be_bytes())?;
                s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())?;
                s.write_all(&3u16.to_be_bytes())?;
                let mut flags = [0u8; 4];
                s.read_exact(&mut flags)?;
                loop {
                    let mut h = [0u8; 16];
                    s.read_exact(&mut h)?;
                    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                    let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
                    let mut data = vec![0u8; len];
                    s.read_exact(&mut data)?;
                    let reply = |s: &mut std::os::unix::net::UnixStream, typ: u32, d: &[u8]| -> std::io::Result<()> {
                        s.write_all(&0x0003_e889_0455_65a9u64.to_be_bytes())?;
                        s.write_all(&opt.to_be_bytes())?;
                        s.write_all(&typ.to_be_bytes())?;
                        s.write_all(&(d.len() as u32).to_be_bytes())?;
                        s.write_all(d)
                    };
                    if opt == 7 {
                        let mut info = 0u16.to_be_bytes().to_vec();
                        info.extend_from_slice(&(8u64 << 60).to_be_bytes());
                        info.extend_from_slice(&1u16.to_be_bytes());
                        reply(&mut s, 3, &info)?;
                        reply(&mut s, 1, &[])?;
                        let mut rest = [0u8; 1];
                        let _ = s.read(&mut rest);
                        return Ok(());
                    }
                    reply(&mut s, 1, &[])?;
                }
            })();
        }
    })
}

#[test]
fn a_silent_nbd_server_fails_the_backup_in_time_and_gc_runs_after() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "nbd_io_timeout_seconds = 2", false);
    let sock = dir.path().join("vols/silent.sock");
    let _srv = silent_server(&sock);
    rt().block_on(async {
        let mut c = client(&d).await;
        let r = pb::StartBackupRequest {
            repository: "main".into(),
            volumes: vec![pb::BackupVolume { name: "vm".into(), nbd_uri: format!("nbd+unix:///?socket={}", sock.display()), ..Default::default() }],
            ..Default::default()
        };
        let t0 = Instant::now();
        let t = c.start_backup(r).await.unwrap().into_inner();
        let end = watch_end(&mut c, &t.id).await;
        assert_eq!(end.state(), pb::TransferState::Failed);
        assert!(end.error.contains("no answer within 2 s"), "{}", end.error);
        assert_eq!((end.error_kind.as_str(), end.retryable), ("transient", true));
        assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
    });
    // The lease went with the job: gc runs, and finds no live backup lock.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mover"))
            .args(args)
            .env("MOVER_REPOSITORY", dir.path().join("repo"))
            .env("MOVER_PASSWORD", "daemon-test-pw")
            .env("MOVER_CACHE_DIR", dir.path().join("clicache"))
            .output()
            .unwrap()
    };
    let o = cli(&["gc", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let locks: serde_json::Value = serde_json::from_slice(&cli(&["locks", "--json"]).stdout).unwrap();
    assert_eq!(locks.as_array().unwrap().len(), 0, "{locks}");
}

#[test]
fn an_nbd_export_of_8_eib_is_refused_before_anything_is_sized_by_it() {
    let e = Env::new();
    let sock = e.path("huge.sock");
    let _srv = huge_server(&sock);
    let t0 = Instant::now();
    let err = e.fail(&["backup", "--nbd", &format!("nbd+unix:///?socket={}", sock.display()), "--name", "vm"]);
    assert!(err.contains("9223372036854775808") && err.contains("largest volume"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(e.snapshot_count(), 0);
}

#[test]
fn a_key_file_with_absurd_key_derivation_costs_is_refused_at_once() {
    let e = Env::new();
    let keys = Path::new(&e.repo).join("keys");
    let key = std::fs::read_dir(&keys).unwrap().next().unwrap().unwrap().path();
    let mut kf: serde_json::Value = serde_json::from_slice(&std::fs::read(&key).unwrap()).unwrap();
    kf["params"]["m_cost_kib"] = serde_json::json!(u32::MAX);
    kf["params"]["t_cost"] = serde_json::json!(1_000_000);
    std::fs::remove_file(&key).unwrap();
    let evil = keys.join("0".repeat(64));
    std::fs::write(&evil, serde_json::to_vec(&kf).unwrap()).unwrap();
    let t0 = Instant::now();
    let err = e.fail(&["snapshots"]);
    assert!(err.contains("outside the bounds") && err.contains(&format!("keys/{}", "0".repeat(64))), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
}

#[test]
fn a_junk_object_among_the_snapshots_is_skipped_by_listings_and_reported_by_check() {
    // A store writer without the key drops an object under snapshots/: listings, `latest`
    // and backups go on (it was: every listing failed); check names it.
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(73, 4 << 20)).unwrap();
    let v = format!("disk={}", src.display());
    let s1 = e.json(&["backup", "--volume", &v]);
    let junk = "ab".repeat(32).to_string();
    std::fs::write(Path::new(&e.repo).join("snapshots").join(&junk), noise(74, 4096)).unwrap();
    let list = e.json(&["snapshots"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], s1["snapshot_id"], "{list}");
    let s2 = e.json(&["backup", "--volume", &v, "--parent", "latest"]);
    assert_eq!(s2["parent"], s1["snapshot_id"], "{s2}");
    let o = e.run(&["check"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains(&junk), "{}", String::from_utf8_lossy(&o.stdout));
}

/// A restore request of `snap` onto `target` named by path.
fn restore_req(snap: &str, target: &Path) -> pb::StartRestoreRequest {
    pb::StartRestoreRequest { repository: "main".into(), snapshot: snap.into(), target: path_ref(target), overwrite: true, ..Default::default() }
}

#[test]
fn a_tenant_volume_yields_no_device_or_link_out_whether_named_by_path_or_as_a_pod_volume() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", false);
    const VICTIM: &str = "0d3b1c2a-aaaa-bbbb-cccc-00000000000f";
    // The victim pod's raw block volume: the kubelet's device node for it.
    let img = dir.path().join("victim.img");
    std::fs::write(&img, noise(11, 4 << 20)).unwrap();
    let lo = Loop::new(&img, 0);
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&lo.dev).unwrap());
    let vdev_dir = dir.path().join("kubelet/pods").join(VICTIM).join("volumeDevices/kubernetes.io~csi");
    std::fs::create_dir_all(&vdev_dir).unwrap();
    let node = |p: &Path| {
        nix::sys::stat::mknod(p, nix::sys::stat::SFlag::S_IFBLK, nix::sys::stat::Mode::from_bits_truncate(0o600), rdev).unwrap();
    };
    node(&vdev_dir.join("data"));
    let victim_file = dir.path().join("kubelet/pods").join(VICTIM).join("volumes/kubernetes.io~csi/data/mount/disk.img");
    victim(&victim_file, &noise(12, 1 << 20));
    let secret = dir.path().join("kubelet/pods").join(VICTIM).join("volumes/kubernetes.io~secret/token/token");
    let secret_untouched = victim(&secret, b"eyJhbGciOi service account token");
    let hosts = dir.path().join("kubelet/pods").join(VICTIM).join("etc-hosts");
    std::fs::write(&hosts, b"127.0.0.1 localhost\n").unwrap();
    let before = (hash(&lo.dev), hash(&victim_file), hash(&hosts));
    age(&victim_file);
    let untouched = atime(&victim_file);
    // A snapshot to restore with.
    let own = dir.path().join("vols/own.img");
    std::fs::write(&own, noise(13, 1 << 20)).unwrap();
    let vol = fs_volume(dir.path(), UID, "rootdisk");
    let disk = vol.join("disk.img");
    rt().block_on(async {
        let mut c = client(&d).await;
        let t = c.start_backup(backup_req("disk", &own)).await.unwrap().into_inner();
        let snap = watch_end(&mut c, &t.id).await.snapshot_id;
        // What the tenant puts in its own volume as disk.img.
        let rel_link = PathBuf::from("../../../../../../").join(VICTIM).join("volumeDevices/kubernetes.io~csi/data");
        let plants: Vec<(&str, Box<dyn Fn()>, &[&str])> = vec![
            ("a relative symlink to another pod's device", Box::new(|| std::os::unix::fs::symlink(&rel_link, &disk).unwrap()), &["symbolic link"]),
            ("a block node of its own", Box::new(|| node(&disk)), &["regular file"]),
            ("a hard link to another pod's file", Box::new(|| std::fs::hard_link(&victim_file, &disk).unwrap()), &["hard links"]),
        ];
        for (what, plant, says) in &plants {
            let _ = std::fs::remove_file(&disk);
            plant();
            let by_path = expect(c.start_backup(backup_req("disk", &disk)).await, Code::InvalidArgument, says);
            let by_pod = expect(c.start_backup(pod_req(UID, "rootdisk")).await, Code::InvalidArgument, says);
            let restore = expect(c.start_restore(restore_req(&snap, &disk)).await, Code::InvalidArgument, says);
            eprintln!("{what}:\n  by path: {by_path}\n  by pod volume: {by_pod}\n  restore: {restore}");
        }
        // Beneath the kubelet's pods/: only volumes. Never a credential volume, etc-hosts, or a
        // path that walks out with '..'.
        expect(c.start_backup(backup_req("disk", &secret)).await, Code::InvalidArgument, &["kubernetes.io~secret", "credentials"]);
        expect(c.start_backup(pod_req(VICTIM, "token")).await, Code::NotFound, &["'token'"]);
        expect(c.start_restore(restore_req(&snap, &hosts)).await, Code::InvalidArgument, &["no pod volume"]);
        let walk = vol.join("../../../../../").join(VICTIM).join("volumeDevices/kubernetes.io~csi/data");
        expect(c.start_backup(backup_req("disk", &walk)).await, Code::InvalidArgument, &["'..'"]);
        // The kubelet's own entry for a block volume is still a volume.
        let t = c.start_backup(backup_req("disk", &vdev_dir.join("data"))).await.unwrap().into_inner();
        assert_eq!(watch_end(&mut c, &t.id).await.state(), pb::TransferState::Succeeded);
        let tr = c.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner().transfers;
        assert_eq!(tr.len(), 2, "a refused request started a transfer: {tr:?}");
    });
    assert_eq!(atime(&victim_file), untouched, "another pod's file was read");
    assert_eq!(atime(&secret), secret_untouched, "a credential was read");
    assert_eq!((hash(&lo.dev), hash(&victim_file), hash(&hosts)), before, "another pod's data was written");
}

#[test]
fn a_caller_scoped_to_its_pods_names_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    const OTHER: &str = "0d3b1c2a-aaaa-bbbb-cccc-00000000000e";
    let k = dir.path().join("kubelet");
    let extra = format!(
        "[authorization]\nbackup = [\"anonymous\"]\nrestore = [\"anonymous\"]\nread = [\"anonymous\"]\n[authorization.paths]\nanonymous = [\"{}\"]\n",
        k.join("pods").join(UID).display()
    );
    std::fs::create_dir_all(k.join("pods").join(UID)).unwrap();
    let d = Daemon::start(dir.path(), &extra, false);
    let mine = fs_volume(dir.path(), UID, "rootdisk").join("disk.img");
    std::fs::write(&mine, noise(21, 1 << 20)).unwrap();
    let theirs = fs_volume(dir.path(), OTHER, "rootdisk").join("disk.img");
    victim(&theirs, &noise(22, 1 << 20));
    let node_file = dir.path().join("vols/node.img");
    victim(&node_file, &noise(23, 1 << 20));
    let before = (hash(&theirs), hash(&node_file));
    age(&theirs);
    age(&node_file);
    let (untouched, node_untouched) = (atime(&theirs), atime(&node_file));
    rt().block_on(async {
        let mut c = client(&d).await;
        for r in [backup_req("disk", &theirs), backup_req("disk", &node_file), pod_req(OTHER, "rootdisk")] {
            expect(c.start_backup(r).await, Code::InvalidArgument, &["[authorization.paths]"]);
        }
        let t = c.start_backup(pod_req(UID, "rootdisk")).await.unwrap().into_inner();
        let end = watch_end(&mut c, &t.id).await;
        assert_eq!(end.state(), pb::TransferState::Succeeded, "{}", end.error);
        for target in [&theirs, &node_file] {
            expect(c.start_restore(restore_req(&end.snapshot_id, target)).await, Code::InvalidArgument, &["[authorization.paths]"]);
        }
        assert_eq!(c.list_transfers(pb::ListTransfersRequest::default()).await.unwrap().into_inner().transfers.len(), 1);
    });
    assert_eq!((atime(&theirs), atime(&node_file)), (untouched, node_untouched), "a scoped caller read outside its scope");
    assert_eq!((hash(&theirs), hash(&node_file)), before, "a scoped caller wrote outside its scope");
}

/// What a hostile NBD server does (`hostile_nbd`).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Hostile {
    /// Grants meta contexts without end (1 MiB each).
    MetaFlood,
    /// Answers a block status request with 16 MiB chunks without end.
    StatusFlood,
    /// Answers a block status request with error chunks without end, never done.
    ErrorFlood,
    /// Sends its greeting one byte every 500 ms.
    TrickleGreeting,
    /// Negotiates, then answers a read one byte every 500 ms.
    TrickleRead,
}

/// An NBD server on `path` that attacks its client as `mode` says. The returned flag is set
/// once the client has gone (its socket read EOF or failed).
fn hostile_nbd(path: &Path, mode: Hostile) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use mover::nbd::proto::*;
    use std::io::{Read, Write};
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    let gone = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = gone.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let flag = flag.clone();
            std::thread::spawn(move || {
                let _ = (|| -> std::io::Result<()> {
                    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
                    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
                    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                    if mode == Hostile::TrickleGreeting {
                        for b in greeting.iter().cycle() {
                            s.write_all(&[*b])?;
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                    s.write_all(&greeting)?;
                    let mut flags = [0u8; 4];
                    s.read_exact(&mut flags)?;
                    let structured = mode != Hostile::TrickleRead;
                    loop {
                        let mut h = [0u8; 16];
                        s.read_exact(&mut h)?;
                        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                        let mut data = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
                        s.read_exact(&mut data)?;
                        let mut reply = |typ: u32, d: &[u8]| -> std::io::Result<()> {
                            let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                            b.extend_from_slice(&opt.to_be_bytes());
                            b.extend_from_slice(&typ.to_be_bytes());
                            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
                            b.extend_from_slice(d);
                            s.write_all(&b)
                        };
                        match opt {
                            OPT_STRUCTURED_REPLY if structured => reply(REP_ACK, &[])?,
                            OPT_STRUCTURED_REPLY => reply(REP_ERR_UNSUP, &[])?,
                            OPT_SET_META_CONTEXT if mode == Hostile::MetaFlood => {
                                let mut ctx = 1u32.to_be_bytes().to_vec();
                                ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                ctx.resize(1 << 20, b'x');
                                loop {
                                    reply(REP_META_CONTEXT, &ctx)?;
                                }
                            }
                            OPT_SET_META_CONTEXT => {
                                let mut ctx = 1u32.to_be_bytes().to_vec();
                                ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                reply(REP_META_CONTEXT, &ctx)?;
                                reply(REP_ACK, &[])?;
                            }
                            OPT_GO => {
                                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                                info.extend_from_slice(&(1u64 << 30).to_be_bytes());
                                info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
                                reply(REP_INFO, &info)?;
                                reply(REP_ACK, &[])?;
                                break;
                            }
                            _ => reply(REP_ERR_UNSUP, &[])?,
                        }
                    }
                    loop {
                        let mut r = [0u8; 28];
                        s.read_exact(&mut r)?;
                        let cmd = u16::from_be_bytes([r[6], r[7]]);
                        let cookie = &r[8..16];
                        let chunk = |flags: u16, typ: u16, len: u32| {
                            let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                            b.extend_from_slice(&flags.to_be_bytes());
                            b.extend_from_slice(&typ.to_be_bytes());
                            b.extend_from_slice(cookie);
                            b.extend_from_slice(&len.to_be_bytes());
                            b
                        };
                        match (mode, cmd) {
                            (Hostile::StatusFlood, CMD_BLOCK_STATUS) => {
                                // Extents of 512 bytes, allocated and not, alternating.
                                let n = (16 << 20) / 8 - 1;
                                let mut b = chunk(0, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
                                b.extend_from_slice(&1u32.to_be_bytes());
                                for i in 0..n {
                                    b.extend_from_slice(&512u32.to_be_bytes());
                                    b.extend_from_slice(&((i % 2) * 3).to_be_bytes());
                                }
                                loop {
                                    s.write_all(&b)?;
                                }
                            }
                            (Hostile::ErrorFlood, CMD_BLOCK_STATUS) => {
                                let mut b = chunk(0, REPLY_TYPE_ERROR, 6);
                                b.extend_from_slice(&5u32.to_be_bytes());
                                b.extend_from_slice(&0u16.to_be_bytes());
                                loop {
                                    s.write_all(&b)?;
                                }
                            }
                            (Hostile::TrickleRead, CMD_READ) => {
                                let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                                b.extend_from_slice(&0u32.to_be_bytes());
                                b.extend_from_slice(cookie);
                                b.resize(b.len() + u32::from_be_bytes(r[24..28].try_into().unwrap()) as usize, 7);
                                for x in b {
                                    s.write_all(&[x])?;
                                    std::thread::sleep(Duration::from_millis(500));
                                }
                            }
                            _ => return Ok(()),
                        }
                    }
                })();
                // The client is gone when a read sees EOF (or the socket fails).
                let mut b = [0u8; 4096];
                while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    gone
}

#[test]
fn a_hostile_nbd_server_costs_bounded_memory_and_time() {
    let e = Env::new();
    for (mode, says) in [
        (Hostile::MetaFlood, "meta context"),
        (Hostile::StatusFlood, "more than 16 chunks"),
        (Hostile::ErrorFlood, "block status"),
        (Hostile::TrickleGreeting, "too slow"),
        (Hostile::TrickleRead, "too slow"),
    ] {
        let sock = e.path(&format!("{mode:?}.sock"));
        hostile_nbd(&sock, mode);
        let mut c = e.cmd(&["backup", "--nbd", &format!("nbd+unix:///?socket={}", sock.display()), "--name", "vm", "--nbd-timeout", "2"]);
        c.env("MOVER_LOG", "warn");
        let m = measured(c);
        eprintln!("{mode:?}: exit {:?} in {:?}, peak {} MiB: {}", m.code, m.elapsed, m.max_rss_mib, m.stderr.lines().next().unwrap_or(""));
        assert_eq!(m.code, Some(1), "{}", m.stderr);
        assert!(m.stderr.contains(says), "{mode:?}: {}", m.stderr);
        // The DaemonSet's limit is 1 GiB; a backup's own buffers are a fraction of it.
        assert!(m.max_rss_mib < 256, "{mode:?}: peak {} MiB", m.max_rss_mib);
        // A trickling read may take the I/O timeout plus a second per MiB of its request.
        assert!(m.elapsed < Duration::from_secs(30), "{mode:?}: took {:?}", m.elapsed);
    }
    assert_eq!(e.snapshot_count(), 0);
}

#[test]
fn a_cancelled_nbd_backup_lets_go_of_its_server_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "nbd_io_timeout_seconds = 600", false);
    let sock = dir.path().join("vols/trickle.sock");
    let gone = hostile_nbd(&sock, Hostile::TrickleRead);
    rt().block_on(async {
        let mut c = client(&d).await;
        let r = pb::StartBackupRequest {
            repository: "main".into(),
            volumes: vec![pb::BackupVolume { name: "vm".into(), nbd_uri: format!("nbd+unix:///?socket={}", sock.display()), ..Default::default() }],
            ..Default::default()
        };
        let t = c.start_backup(r).await.unwrap().into_inner();
        wait_state(&mut c, &t.id, pb::TransferState::Running, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!gone.load(std::sync::atomic::Ordering::SeqCst), "the server lost its client before the cancel");
        let t0 = Instant::now();
        c.cancel_transfer(pb::GetTransferRequest { id: t.id.clone() }).await.unwrap();
        let end = watch_end(&mut c, &t.id).await;
        assert_eq!(end.state(), pb::TransferState::Cancelled, "{}", end.error);
        // The reading thread let go of the socket: the server sees its client gone.
        while !gone.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(t0.elapsed() < Duration::from_secs(5), "the backup still holds the NBD connection {:?} after the cancel", t0.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("cancelled, and the connection closed, in {:?}", t0.elapsed());
    });
}

#[test]
fn a_64_tib_export_of_holes_backs_up_in_bounded_memory_and_one_read_in_full_too() {
    // The largest volume Mover accepts, from nbdkit's null plugin: all holes (block status
    // says so), then without block status (every segment read, 10 s of it).
    let e = Env::new();
    for (filter, full) in [(None, false), (Some("--filter=noextents"), true)] {
        let sock = e.path(if full { "full.sock" } else { "holes.sock" });
        let mut args = vec!["-f".to_string(), "-r".into(), "-U".into(), sock.display().to_string()];
        args.extend(filter.map(String::from));
        args.extend(["null".into(), "size=64T".into()]);
        let mut srv = Command::new("nbdkit").args(&args).spawn().expect("nbdkit");
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let m = if full {
            // Interrupted after 10 s: the plan for 16 Mi segments is built and reading runs.
            let mut c = e.cmd_in(&["timeout", "-s", "INT", "10"], &["backup", "--nbd", &uri, "--name", "vm"]);
            c.env("MOVER_LOG", "warn");
            measured(c)
        } else {
            let mut c = e.cmd(&["backup", "--nbd", &uri, "--name", "vm"]);
            c.env("MOVER_LOG", "warn");
            measured(c)
        };
        let _ = srv.kill();
        let _ = srv.wait();
        eprintln!("64 TiB, {}: exit {:?} in {:?}, peak {} MiB", if full { "read in full" } else { "holes" }, m.code, m.elapsed, m.max_rss_mib);
        if !full {
            assert_eq!(m.code, Some(0), "{}", m.stderr);
        }
        // 16 Mi segments: 4 bytes each for their refs; a Vec of refs was 1 GiB, a Vec of reads 768 MiB.
        assert!(m.max_rss_mib < 384, "peak {} MiB for a 64 TiB volume", m.max_rss_mib);
    }
    assert_eq!(e.snapshot_count(), 1);
}

#[test]
fn exports_admit_only_who_may_restore_and_bound_their_connections() {
    use pb::export_service_client::ExportServiceClient;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    // uid 65534 may use the daemon's sockets but not restore; root may do both.
    let extra = "socket_allowed_uids = [65534]\n[authorization]\nbackup = [\"anonymous\"]\nrestore = [\"anonymous\", \"uid:0\"]\nread = [\"anonymous\"]\n";
    let d = Daemon::start(dir.path(), extra, false);
    let src = dir.path().join("vols/disk.img");
    std::fs::write(&src, noise(31, 4 << 20)).unwrap();
    rt().block_on(async {
        let mut c = client(&d).await;
        let t = c.start_backup(backup_req("disk", &src)).await.unwrap().into_inner();
        let snap = watch_end(&mut c, &t.id).await.snapshot_id;
        let ch = mover::client::connect(&mover::client::Conn { server: d.grpc.clone(), ..Default::default() }).await.unwrap();
        let mut ec = ExportServiceClient::new(ch);
        let start = |tcp: bool| pb::StartExportRequest { repository: "main".into(), snapshot: snap.clone(), tcp, ..Default::default() };
        // Plaintext NBD on TCP: refused without the operator's explicit word, no lease kept.
        let e = ec.start_export(start(true)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("insecure_plaintext_exports"), "{}", e.message());
        assert_eq!(std::fs::read_dir(dir.path().join("repo/locks")).map(|d| d.count()).unwrap_or(0), 0, "a refused export kept its lease");
        let x = ec.start_export(start(false)).await.unwrap().into_inner();
        let sock = PathBuf::from(x.uri.split("socket=").nth(1).unwrap());
        // A client that connects and says nothing: dropped once the handshake time is up.
        let mut silent = UnixStream::connect(&sock).unwrap();
        let t_silent = Instant::now();
        // The socket's mode opened to everyone (an operator's mistake): the peer check holds.
        let mut p = sock.clone();
        while p != dir.path().parent().unwrap() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(if p == sock { 0o666 } else { 0o755 })).unwrap();
            p = p.parent().unwrap().to_path_buf();
        }
        let nbdinfo_as = |uid: u32| {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--clear-groups", "nbdinfo", "--size", &x.uri]);
            c.output().unwrap()
        };
        for uid in [65534, 65533] {
            let o = nbdinfo_as(uid);
            assert!(!o.status.success(), "uid {uid} read the export: {}", String::from_utf8_lossy(&o.stdout));
        }
        let o = nbdinfo_as(0);
        assert!(o.status.success(), "root (uid:0 may restore) was refused: {}", String::from_utf8_lossy(&o.stderr));
        let log = std::fs::read_to_string(&d.log).unwrap();
        // The plaintext loopback listener said at start whom it admits.
        assert!(log.contains("is plaintext TCP") && log.contains("may call backup, restore, read RPCs"), "{log}");
        assert!(log.contains("refused uid 65534") && log.contains("may not read exports (restore)"), "{log}");
        assert!(log.contains("refused uid 65533") && log.contains("may not use this daemon's socket"), "{log}");
        // Connections past the cap are closed as they come; the export goes on serving.
        let mut held = Vec::new();
        let mut closed = 0;
        for _ in 0..200 {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut greeting = [0u8; 18];
            match s.read_exact(&mut greeting) {
                Ok(()) => held.push(s),
                Err(_) => closed += 1,
            }
        }
        assert_eq!(
            (held.len(), closed),
            (mover::nbd::server::MAX_CONNECTIONS - 1, 200 - mover::nbd::server::MAX_CONNECTIONS + 1),
            "connections served and closed"
        );
        drop(held);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let list = ec.list_exports(pb::ListExportsRequest {}).await.unwrap().into_inner().exports;
        assert_eq!(list[0].state(), pb::ExportState::Serving);
        assert!(nbdinfo_as(0).status.success(), "the export stopped serving after the flood");
        // The silent client is gone by the handshake's deadline.
        silent.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let mut b = [0u8; 64];
        let mut total = 0;
        while let Ok(n) = silent.read(&mut b) {
            if n == 0 {
                break;
            }
            total += n;
        }
        let waited = t_silent.elapsed();
        assert!(total <= 18 && waited >= Duration::from_secs(29) && waited < Duration::from_secs(40), "silent client held {waited:?}");
    });
}

#[test]
fn a_junk_lock_named_in_the_future_blocks_nothing_and_unlock_removes_it() {
    // A store writer without the key drops lock objects: one named years ahead (it was: live
    // for ever, so gc never swept what it took out), one named now (it may be a lock damaged
    // in flight: live for its TTL, kept).
    let e = Env::new();
    let src = e.path("disk.img");
    std::fs::write(&src, noise(75, 1 << 20)).unwrap();
    e.json(&["backup", "--volume", &format!("disk={}", src.display())]);
    let locks = Path::new(&e.repo).join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64;
    let future = locks.join(format!("{}-{}", "a1".repeat(8), now_ms + 10 * 365 * 86_400_000));
    std::fs::write(&future, noise(76, 300)).unwrap();
    let l = e.json(&["locks"]);
    assert!(l[0]["stale"].as_str().is_some_and(|s| s.contains("in the future")), "{l}");
    let g = e.json(&["gc"]);
    assert_eq!(g["stale_locks_removed"], 1, "{g}");
    assert!(!future.exists(), "gc kept the junk lock");
    std::fs::write(&future, noise(76, 300)).unwrap();
    e.ok(&["unlock"]);
    assert!(!future.exists(), "unlock kept the junk lock");
    let recent = locks.join(format!("{}-{}", "b2".repeat(8), now_ms));
    std::fs::write(&recent, noise(77, 300)).unwrap();
    let l = e.json(&["locks"]);
    assert!(l[0]["stale"].is_null(), "{l}");
    e.ok(&["unlock"]);
    assert!(recent.exists(), "unlock removed a lock that may be live");
}

#[test]
fn a_queued_restore_looks_for_holders_again_when_it_starts() {
    // The restore waits behind a slow backup; meanwhile a VM opens the device (not
    // exclusively). When the restore's turn comes, it is refused and writes nothing.
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "max_concurrent_transfers = 1", false);
    let src = dir.path().join("vols/src.img");
    std::fs::write(&src, noise(41, 8 << 20)).unwrap();
    let img = dir.path().join("target.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let dev = Loop::new(&img, 0);
    let before = hash(&dev.dev);
    rt().block_on(async {
        let mut c = client(&d).await;
        let t = c.start_backup(backup_req("disk", &src)).await.unwrap().into_inner();
        let snap = watch_end(&mut c, &t.id).await.snapshot_id;
        let other = dir.path().join("vols/other.img");
        std::fs::write(&other, noise(42, 8 << 20)).unwrap();
        let slow = c.start_backup(pb::StartBackupRequest { bandwidth_limit: 2 << 20, ..backup_req("other", &other) }).await.unwrap().into_inner();
        wait_state(&mut c, &slow.id, pb::TransferState::Running, Duration::from_secs(10)).await;
        let r = pb::StartRestoreRequest { repository: "main".into(), snapshot: snap, target: path_ref(&dev.dev), ..Default::default() };
        let r = c.start_restore(r).await.unwrap().into_inner();
        assert_eq!(r.state(), pb::TransferState::Queued, "the restore should wait for the backup");
        let mut holder = hold_open(&dev.dev);
        let end = watch_end(&mut c, &r.id).await;
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(end.state(), pb::TransferState::Failed, "{}", end.error);
        assert!(end.error.contains("held open by pid"), "{}", end.error);
        assert_eq!(watch_end(&mut c, &slow.id).await.state(), pb::TransferState::Succeeded);
    });
    assert_eq!(hash(&dev.dev), before, "a queued restore wrote onto a device a VM opened meanwhile");
}

#[test]
fn a_device_whose_holders_cannot_be_seen_is_not_written() {
    // Outside the host's PID namespace (a container without hostPID) the look for holders
    // cannot be complete: refused, nothing written.
    let e = Env::new();
    let src = e.path("src.img");
    std::fs::write(&src, noise(43, 4 << 20)).unwrap();
    let snap = e.json(&["backup", "--volume", &format!("disk={}", src.display())])["snapshot_id"].as_str().unwrap().to_string();
    let img = e.path("target.img");
    std::fs::File::create(&img).unwrap().set_len(4 << 20).unwrap();
    let dev = Loop::new(&img, 0);
    let before = hash(&dev.dev);
    let target = dev.dev.to_str().unwrap();
    // (Descriptors this process may not read fail closed the same way; this kernel lets
    // root without CAP_SYS_PTRACE read them, so that case is not reproduced here.)
    {
        let (wrapper, says) = (vec!["unshare", "--pid", "--fork", "--mount-proc"], "not in the host's PID namespace");
        let o = e.cmd_in(&wrapper, &["restore", &snap, target]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("cannot tell whether another process holds it") && err.contains(says), "{wrapper:?}: {err}");
    }
    assert_eq!(hash(&dev.dev), before, "a device whose holders could not be seen was written");
    e.ok(&["restore", &snap, target]);
    assert_eq!(hash(&img), hash(&src), "the restore after is not byte-exact");
}

/// A qcow2 image (version 2) of `clusters` clusters of 2^`bits` bytes claiming a disk of
/// `size` bytes: L1 table in cluster 1; `l1` gives its entries, `l2` the entries of the L2
/// table in cluster 2 (when some L1 entry points there); cluster 3 holds data.
fn qcow2_image(path: &Path, bits: u32, size: u64, l1: &[u64], l2: &[u64]) {
    let cs = 1usize << bits;
    let mut f = vec![0u8; 4 * cs];
    f[0..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
    f[4..8].copy_from_slice(&2u32.to_be_bytes());
    f[20..24].copy_from_slice(&bits.to_be_bytes());
    f[24..32].copy_from_slice(&size.to_be_bytes());
    f[36..40].copy_from_slice(&(l1.len() as u32).to_be_bytes());
    f[40..48].copy_from_slice(&(cs as u64).to_be_bytes());
    for (i, e) in l1.iter().enumerate() {
        f[cs + 8 * i..cs + 8 * i + 8].copy_from_slice(&e.to_be_bytes());
    }
    for (i, e) in l2.iter().enumerate() {
        f[2 * cs + 8 * i..2 * cs + 8 * i + 8].copy_from_slice(&e.to_be_bytes());
    }
    f[3 * cs..].fill(0x5a);
    std::fs::write(path, f).unwrap();
}

#[test]
fn a_hostile_qcow2_image_costs_bounded_memory_and_time() {
    let e = Env::new();
    // 256 KiB claiming 64 GiB of data: every L1 entry at the one L2 table, every L2 entry
    // at the one data cluster (it was: 64 GiB read, 31 s of CPU).
    let (bits, cs) = (16u32, 1u64 << 16);
    let per_l2 = cs / 8;
    let size = 64u64 << 30;
    let aliased = e.path("aliased.qcow2");
    qcow2_image(&aliased, bits, size, &vec![2 * cs; (size / (cs * per_l2)) as usize], &vec![3 * cs; per_l2 as usize]);
    // One table, each of its entries at the one data cluster: 512 MiB claimed.
    let one_table = e.path("aliased-data.qcow2");
    qcow2_image(&one_table, bits, cs * per_l2, &[2 * cs], &vec![3 * cs; per_l2 as usize]);
    // 256 KiB claiming a 1 TiB disk it holds nothing of: 1 TiB of holes.
    let empty = e.path("empty.qcow2");
    qcow2_image(&empty, 21, 1 << 40, &[0, 0], &[]);
    for (img, ok) in [(&aliased, false), (&one_table, false), (&empty, true)] {
        let mut c = e.cmd(&["backup", "--name", "vm", "--qcow2", img.to_str().unwrap()]);
        c.env("MOVER_LOG", "warn");
        let m = measured(c);
        eprintln!("{}: exit {:?} in {:?}, peak {} MiB: {}", img.display(), m.code, m.elapsed, m.max_rss_mib, m.stderr.lines().next().unwrap_or(""));
        if ok {
            assert_eq!(m.code, Some(0), "{}", m.stderr);
        } else {
            assert_eq!(m.code, Some(1), "{}", m.stderr);
            assert!(m.stderr.contains("aliased") && m.stderr.contains(img.to_str().unwrap()), "{}", m.stderr);
        }
        assert!(m.max_rss_mib < 256 && m.elapsed < Duration::from_secs(20), "peak {} MiB, {:?}", m.max_rss_mib, m.elapsed);
    }
    assert_eq!(e.snapshot_count(), 1);
}

/// A local repository is its owner's alone (files 0600, directories 0700, as restic
/// keeps them): the key files hold the encrypted master key. And logs written anywhere but
/// a terminal carry no colour codes.
#[test]
fn a_local_repository_is_private_and_logs_off_a_terminal_are_plain() {
    use std::os::unix::fs::PermissionsExt;
    let e = Env::new();
    let src = e.path("disk.img");
    make_volume(&src, 4 << 20, 3);
    let o = e.cmd(&["backup", src.to_str().unwrap()]).env("MOVER_LOG", "debug").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("DEBUG"), "the backup logged at debug: {log}");
    assert!(!log.contains('\x1b'), "no ANSI escape codes off a terminal: {log:?}");
    let mut seen = 0;
    let mut stack = vec![std::path::PathBuf::from(&e.repo)];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let m = entry.metadata().unwrap();
            let mode = m.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}: readable by others", entry.path().display());
            if m.is_dir() {
                stack.push(entry.path());
            } else {
                seen += 1;
            }
        }
    }
    assert!(seen >= 4, "config, key, pack, index, snapshot: {seen} files");
}
