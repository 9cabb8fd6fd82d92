//! Clients that are not Mover's own, on the daemon's unix socket with their default
//! options: Python `grpcio` (grpc-core, what a scheduler written in Python uses) and
//! `grpcurl -unix` (grpc-go). Both send the socket's path as `:authority`, which upstream
//! h2 rejects with RST_STREAM (third_party/h2/README.md). `scripts/test.sh` installs both
//! into the tests' venv (`MOVER_VENV`, default /var/tmp/mover-venv).

use super::daemon::{client, rt, wait_state, Daemon};
use super::make_volume;
use mover_protocol::v1 as pb;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var("MOVER_VENV").unwrap_or_else(|_| "/var/tmp/mover-venv".into());
    let p = PathBuf::from(venv).join("bin").join(name);
    assert!(p.exists(), "{} is missing: scripts/test.sh installs grpcio and grpcurl into the venv", p.display());
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{so}\n{se}", out.status);
    so
}

#[test]
fn python_grpcio_and_grpcurl_work_on_the_unix_socket_with_default_options() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "", true);
    let sock = dir.path().join("mover.sock");

    // Python grpcio, both spellings of a unix target, no channel options: the health check
    // (SERVING is field 1 = 1) and a mover RPC (ListTransfers, an empty request).
    let py = r#"
import sys, grpc
raw = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
for target in ("unix:" + sys.argv[1], "unix://" + sys.argv[1]):
    ch = grpc.insecure_channel(target)
    health = ch.unary_unary("/grpc.health.v1.Health/Check", **raw)(b"", timeout=10)
    assert health == b"\x08\x01", health
    transfers = ch.unary_unary("/mover.v1.TransferService/ListTransfers", **raw)(b"", timeout=10)
    print(target, "SERVING", len(transfers))
"#;
    let out = run(Command::new(venv_bin("python")).args(["-c", py]).arg(&sock));
    assert_eq!(out.lines().filter(|l| l.contains("SERVING")).count(), 2, "{out}");

    // grpcurl: reflection lists the services; a backup started from JSON runs to the end.
    let grpcurl = venv_bin("grpcurl");
    let s = sock.display().to_string();
    let list = run(Command::new(&grpcurl).args(["-plaintext", "-unix", &s, "list"]));
    for svc in ["mover.v1.TransferService", "mover.v1.RepositoryService", "grpc.health.v1.Health"] {
        assert!(list.lines().any(|l| l == svc), "{svc} not listed: {list}");
    }
    let src = dir.path().join("vols/disk.img");
    make_volume(&src, 4 << 20, 91);
    let req = serde_json::json!({"repository": "main", "group": "vms/grpcurl", "volumes": [{"name": "disk", "source": {"path": src.display().to_string()}}]});
    let started = run(Command::new(&grpcurl).args(["-plaintext", "-unix", "-d", &req.to_string(), &s, "mover.v1.TransferService/StartBackup"]));
    let t: serde_json::Value = serde_json::from_str(&started).unwrap();
    let id = t["id"].as_str().unwrap_or_else(|| panic!("no id: {started}")).to_string();
    rt().block_on(async {
        let mut c = client(&d).await;
        let end = wait_state(&mut c, &id, pb::TransferState::Succeeded, Duration::from_secs(60)).await;
        assert_eq!(end.group, "vms/grpcurl");
    });
    // A malformed request through grpcurl gets the daemon's own error, naming the object.
    let out = Command::new(&grpcurl)
        .args(["-plaintext", "-unix", "-d", r#"{"repository":"nowhere","volumes":[{"name":"disk","source":{"path":"/nonexistent"}}]}"#, &s])
        .arg("mover.v1.TransferService/StartBackup")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("NotFound") && err.contains("nowhere"), "{err}");
}
