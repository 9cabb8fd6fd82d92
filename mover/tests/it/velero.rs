//! The Velero data mover against `kube_standin.py`, a TEST STAND-IN for the Kubernetes API
//! server (no API server runs here; the stand-in follows upstream's REST semantics and
//! cites the files it follows).

use super::*;
use mover::velero::cluster::Cluster;
use mover::velero::types::{DataUpload, Phase};
use std::process::{Child, Stdio};

const STANDIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/kube_standin.py");

pub struct KubeStandin {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl KubeStandin {
    pub fn start() -> Self {
        Self::with_history(1000)
    }

    /// Keeping only `events` watch events (upstream keeps a bounded window too).
    pub fn with_history(events: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let child = Command::new("python3").arg(STANDIN).arg(&port_file).arg(events.to_string()).stdout(Stdio::null()).spawn().expect("python3");
        let t0 = std::time::Instant::now();
        while !port_file.exists() {
            assert!(t0.elapsed().as_secs() < 10, "the Kubernetes API stand-in did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let port = std::fs::read_to_string(&port_file).unwrap();
        KubeStandin { child, url: format!("http://127.0.0.1:{}", port.trim()), _dir: dir }
    }

    /// `curl` against the stand-in: (status code, body).
    pub fn call(&self, method: &str, path: &str, ctype: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let o = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, "-H"])
            .arg(format!("Content-Type: {ctype}"))
            .arg("--data-binary")
            .arg(body.to_string())
            .arg(format!("{}{path}", self.url))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
    }
}

impl Drop for KubeStandin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

const UPLOADS: &str = "/apis/velero.io/v2alpha1/namespaces/velero/datauploads";

fn create_upload(k: &KubeStandin, name: &str, datamover: &str) {
    let du = serde_json::json!({
        "apiVersion": "velero.io/v2alpha1", "kind": "DataUpload",
        "metadata": {"name": name, "namespace": "velero"},
        "spec": {"snapshotType": "CSI", "csiSnapshot": {"volumeSnapshot": format!("vs-{name}"), "storageClass": "sc"},
                 "sourcePVC": "disk", "sourceNamespace": "vms", "backupStorageLocation": "default", "datamover": datamover,
                 "operationTimeout": "10m0s"},
    });
    let (code, body) = k.call("POST", UPLOADS, "application/json", &du);
    assert_eq!(code, 201, "{body}");
}

/// Velero's node-agents race to accept a DataUpload, and so do Mover's: each node writes
/// with the resourceVersion it read, the API server refuses all but the first (409), and
/// exactly one node runs it. Twenty DataUploads, two nodes deciding at the same moment:
/// every one is accepted exactly once, and the loser's status write changed nothing.
#[test]
fn two_nodes_race_for_each_data_upload_and_exactly_one_wins() {
    let k = KubeStandin::start();
    for i in 0..20 {
        create_upload(&k, &format!("du-{i}"), "mover");
    }
    let rt = rt();
    let won: Vec<(String, String)> = rt.block_on(async {
        let (a, b) = (Cluster::connect(Some(&k.url), "velero").await.unwrap(), Cluster::connect(Some(&k.url), "velero").await.unwrap());
        // Both read the same objects at the same resourceVersions, then both accept each.
        let (la, lb) = (a.list::<DataUpload>().await.unwrap().0, b.list::<DataUpload>().await.unwrap().0);
        assert_eq!(la.len(), 20);
        let mut won = Vec::new();
        for (da, db) in la.iter().zip(lb.iter()) {
            assert_eq!(da.status.phase, Phase::New, "created without a phase: New");
            let (ra, rb) = tokio::join!(a.accept(da, "node-a", 1_000), b.accept(db, "node-b", 1_000));
            match (ra.unwrap(), rb.unwrap()) {
                (Some(x), None) | (None, Some(x)) => won.push((x.metadata.name.clone(), x.status.accepted_by_node.clone())),
                (x, y) => panic!("{}: both or neither won: {x:?} {y:?}", da.metadata.name),
            }
        }
        won
    });
    // What the API server holds agrees with the winners.
    for (name, node) in &won {
        let (code, body) = k.call("GET", &format!("{UPLOADS}/{name}"), "application/json", &serde_json::Value::Null);
        assert_eq!(code, 200);
        let du: DataUpload = serde_json::from_value(body).unwrap();
        assert_eq!(du.status.phase, Phase::Accepted);
        assert_eq!(&du.status.accepted_by_node, node, "{name}: the loser's write changed nothing");
        assert_eq!(du.status.accepted_timestamp.as_deref(), Some("1970-01-01T00:00:01Z"));
        assert_eq!(du.spec.source_pvc, "disk", "a status write leaves the spec alone");
    }
    assert_eq!(won.len(), 20);
}

/// The stand-in keeps the API server's rules the controller relies on: a stale
/// resourceVersion is a 409 Conflict (with upstream's message), a missing object a 404
/// naming it, a status write leaves the spec alone and a spec write the status, a watch
/// from an expired resourceVersion is a 410 ERROR event, and kubectl can read it.
#[test]
fn the_kubernetes_api_stand_in_keeps_upstream_rules() {
    let k = KubeStandin::with_history(20);
    create_upload(&k, "du-x", "velero");
    let merge = "application/merge-patch+json";
    let (c, b) =
        k.call("PATCH", &format!("{UPLOADS}/du-x/status"), merge, &serde_json::json!({"metadata": {"resourceVersion": "1"}, "status": {"phase": "Accepted"}}));
    assert_eq!(c, 409, "{b}");
    assert_eq!(b["reason"], "Conflict");
    assert!(b["message"].as_str().unwrap().contains("the object has been modified; please apply your changes to the latest version and try again"), "{b}");
    let (c, b) = k.call("PATCH", &format!("{UPLOADS}/du-x/status"), merge, &serde_json::json!({"status": {"phase": "Accepted"}, "spec": {"cancel": true}}));
    assert_eq!(c, 200, "{b}");
    assert_eq!((b["status"]["phase"].as_str(), b["spec"]["cancel"].as_bool()), (Some("Accepted"), None), "status only: {b}");
    let (c, b) = k.call("PATCH", &format!("{UPLOADS}/du-x"), merge, &serde_json::json!({"status": {"phase": "Failed"}, "spec": {"cancel": true}}));
    assert_eq!(c, 200, "{b}");
    assert_eq!((b["status"]["phase"].as_str(), b["spec"]["cancel"].as_bool()), (Some("Accepted"), Some(true)), "spec only: {b}");
    let (c, b) = k.call("PATCH", &format!("{UPLOADS}/du-x"), "application/json-patch+json", &serde_json::json!([]));
    assert_eq!(c, 415, "{b}");
    let (c, b) = k.call("GET", &format!("{UPLOADS}/nosuch"), "application/json", &serde_json::Value::Null);
    assert_eq!((c, b["reason"].as_str()), (404, Some("NotFound")));
    assert!(b["message"].as_str().unwrap().contains("datauploads.velero.io \"nosuch\" not found"), "{b}");
    let (c, b) = k.call("POST", UPLOADS, "application/json", &serde_json::json!({"metadata": {"name": "du-x"}}));
    assert_eq!((c, b["reason"].as_str()), (409, Some("AlreadyExists")));
    // Push the first events out of the kept history (20 here), then watch from before them.
    for i in 0..30 {
        k.call("PATCH", &format!("{UPLOADS}/du-x/status"), merge, &serde_json::json!({"status": {"message": format!("m{i}")}}));
    }
    let o = Command::new("curl").arg("-sN").arg(format!("{}{UPLOADS}?watch=true&resourceVersion=101&timeoutSeconds=1", k.url)).output().unwrap();
    let ev: serde_json::Value = serde_json::from_slice(o.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!((ev["type"].as_str(), ev["object"]["code"].as_u64(), ev["object"]["reason"].as_str()), (Some("ERROR"), Some(410), Some("Expired")), "{ev}");
    // A real client: kubectl reads what the stand-in serves (discovery, list, get).
    let o = Command::new("kubectl").args(["--server", &k.url, "-n", "velero", "get", "datauploads.velero.io", "du-x", "-o", "json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let du: DataUpload = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(du.status.message, "m29");
}

fn get_upload(k: &KubeStandin, name: &str) -> DataUpload {
    let (code, body) = k.call("GET", &format!("{UPLOADS}/{name}"), "application/json", &serde_json::Value::Null);
    assert_eq!(code, 200, "{body}");
    serde_json::from_value(body).unwrap()
}

/// One node's pass: a malformed DataUpload (no VolumeSnapshot named) and one for a
/// BackupStorageLocation this node has no repository for fail at once with a message
/// naming the object and what is wrong, and nothing is created for them; one cancelled
/// before any node took it ends Canceled; one accepted by a node that died long ago fails
/// as not prepared in time; Velero's own is never touched; the good one is accepted.
#[test]
fn a_pass_refuses_bad_uploads_at_once_cancels_unstarted_ones_and_fails_what_a_dead_node_held() {
    use mover::velero::node::{pass, NodeConfig, Outcome};
    let k = KubeStandin::start();
    let merge = "application/merge-patch+json";
    for n in ["good", "velero-own", "no-snap", "elsewhere", "cancelled", "orphaned"] {
        create_upload(&k, n, if n == "velero-own" { "velero" } else { "mover" });
    }
    k.call("PATCH", &format!("{UPLOADS}/no-snap"), merge, &serde_json::json!({"spec": {"csiSnapshot": null}}));
    k.call("PATCH", &format!("{UPLOADS}/elsewhere"), merge, &serde_json::json!({"spec": {"backupStorageLocation": "elsewhere"}}));
    k.call("PATCH", &format!("{UPLOADS}/cancelled"), merge, &serde_json::json!({"spec": {"cancel": true}}));
    let dead = serde_json::json!({"status": {"phase": "Accepted", "acceptedByNode": "dead-node", "acceptedTimestamp": "2026-01-01T00:00:00Z"}});
    k.call("PATCH", &format!("{UPLOADS}/orphaned/status"), merge, &dead);
    let before: serde_json::Value =
        serde_json::from_str(&String::from_utf8(Command::new("curl").arg("-s").arg(format!("{}/standin/requests", k.url)).output().unwrap().stdout).unwrap())
            .unwrap();

    let cfg = NodeConfig { node: "n1".into(), locations: ["default".to_string()].into(), prepare_timeout: std::time::Duration::from_secs(300) };
    let t0 = std::time::Instant::now();
    let out = rt().block_on(async {
        let c = Cluster::connect(Some(&k.url), "velero").await.unwrap();
        pass::<DataUpload>(&c, &cfg, &Default::default(), mover_format::now_unix_ms()).await.unwrap()
    });
    assert!(t0.elapsed().as_secs() < 5, "a pass answers in seconds: {:?}", t0.elapsed());
    let out: std::collections::BTreeMap<String, Outcome> = out.into_iter().map(|(o, r)| (o.metadata.name, r)).collect();
    assert_eq!(out["good"], Outcome::Accepted);
    assert_eq!(out["velero-own"], Outcome::Left);
    assert_eq!(out["cancelled"], Outcome::Canceled);
    for (n, what) in [
        ("no-snap", "spec.csiSnapshot.volumeSnapshot is missing"),
        ("elsewhere", "BackupStorageLocation 'elsewhere' has no Mover repository on node n1"),
        ("orphaned", "accepted by node dead-node but not prepared within 300 s"),
    ] {
        let Outcome::Failed(msg) = &out[n] else { panic!("{n}: {:?}", out[n]) };
        assert!(msg.contains(&format!("DataUpload velero/{n}")) && msg.contains(what), "{n}: {msg}");
        let du = get_upload(&k, n);
        assert_eq!(du.status.phase, Phase::Failed, "{n}");
        assert_eq!(&du.status.message, msg, "{n}: the message is on the object");
        assert!(du.status.completion_timestamp.is_some(), "{n}");
    }
    assert_eq!(get_upload(&k, "cancelled").status.phase, Phase::Canceled);
    assert_eq!(get_upload(&k, "good").status.accepted_by_node, "n1");
    let own = get_upload(&k, "velero-own");
    assert_eq!((own.status.phase, own.metadata.resource_version.as_str()), (Phase::New, "102"), "Velero's own DataUpload is untouched");

    // Nothing was created and nothing but the DataUploads' status was written.
    let after: serde_json::Value =
        serde_json::from_str(&String::from_utf8(Command::new("curl").arg("-s").arg(format!("{}/standin/requests", k.url)).output().unwrap().stdout).unwrap())
            .unwrap();
    for (req, n) in after.as_object().unwrap() {
        let was = before.get(req).and_then(|v| v.as_u64()).unwrap_or(0);
        if n.as_u64().unwrap() > was && !req.starts_with("GET ") {
            assert!(req.starts_with("PATCH ") && req.ends_with("/status") && !req.contains("velero-own"), "the pass wrote {req}");
        }
    }
}

/// Exposing a DataUpload's snapshot on a node: a snapshot that is not ready is refused
/// naming it, and nothing is created; a ready one gets a Block claim from the snapshot
/// and a pod that holds it on this node only (a required node affinity, read-only, no
/// privileges); it counts as exposed once the pod runs and the claim is bound; cleaning
/// up removes the pod, the claim, the VolumeSnapshot and its content, and again is fine.
#[test]
fn a_snapshot_is_exposed_on_this_node_as_a_block_claim_and_cleaned_up_with_the_snapshot() {
    use mover::velero::cluster::Exposed;
    use mover::velero::reconcile::upload_request;
    let k = KubeStandin::start();
    let merge = "application/merge-patch+json";
    create_upload(&k, "du-1", "mover");
    const VS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/vms/volumesnapshots";
    const VSC: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";
    let (c, b) = k.call(
        "POST",
        VS,
        "application/json",
        &serde_json::json!({"metadata": {"name": "vs-du-1"}, "spec": {"source": {"persistentVolumeClaimName": "disk"}}}),
    );
    assert_eq!(c, 201, "{b}");
    let (c, b) = k.call("POST", VSC, "application/json", &serde_json::json!({"metadata": {"name": "snapcontent-1"}, "spec": {"driver": "d", "deletionPolicy": "Delete", "source": {"volumeHandle": "h"}, "volumeSnapshotRef": {"name": "vs-du-1", "namespace": "vms"}}}));
    assert_eq!(c, 201, "{b}");
    let rt = rt();
    let c = rt.block_on(Cluster::connect(Some(&k.url), "velero")).unwrap();
    let du = get_upload(&k, "du-1");
    let req = upload_request(&du).unwrap();

    let e = rt.block_on(c.expose(&du, &req, "n1", "mover:test")).unwrap_err();
    assert!(format!("{e:#}").contains("VolumeSnapshot vms/vs-du-1 of DataUpload velero/du-1 is not ready to use"), "{e:#}");
    let (code, _) = k.call("GET", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1", "application/json", &serde_json::Value::Null);
    assert_eq!(code, 404, "nothing created for a snapshot that is not ready");

    let ready = serde_json::json!({"status": {"readyToUse": true, "restoreSize": "64Mi", "boundVolumeSnapshotContentName": "snapcontent-1"}});
    k.call("PATCH", &format!("{VS}/vs-du-1/status"), merge, &ready);
    rt.block_on(c.expose(&du, &req, "n1", "mover:test")).unwrap();
    rt.block_on(c.expose(&du, &req, "n1", "mover:test")).unwrap(); // resumed: what exists is kept
    let (_, pvc) = k.call("GET", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1", "application/json", &serde_json::Value::Null);
    assert_eq!(pvc["spec"]["volumeMode"], "Block");
    assert_eq!(pvc["spec"]["dataSource"], serde_json::json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "vs-du-1"}));
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "64Mi");
    assert_eq!(pvc["spec"]["storageClassName"], "sc");
    assert_eq!(pvc["metadata"]["labels"]["mover.io/data-upload"], "du-1");
    let (_, pod) = k.call("GET", "/api/v1/namespaces/vms/pods/mover-du-1", "application/json", &serde_json::Value::Null);
    let term = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0];
    assert_eq!((term["key"].as_str(), term["values"][0].as_str()), (Some("kubernetes.io/hostname"), Some("n1")), "{pod}");
    assert!(pod["spec"]["nodeName"].is_null(), "scheduled, not forced: WaitForFirstConsumer binds through the scheduler");
    assert_eq!(pod["spec"]["volumes"][0]["persistentVolumeClaim"], serde_json::json!({"claimName": "mover-du-1", "readOnly": true}));
    assert_eq!(pod["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["spec"]["containers"][0]["args"], serde_json::json!(["hold"]));
    let (_, vsc) = k.call("GET", &format!("{VSC}/snapcontent-1"), "application/json", &serde_json::Value::Null);
    assert_eq!(vsc["metadata"]["annotations"]["snapshot.storage.kubernetes.io/allow-volume-mode-change"], "true", "a Block claim from any source mode");

    assert_eq!(rt.block_on(c.exposed(&du, &req)).unwrap(), None, "not running, not bound");
    k.call("PATCH", "/api/v1/namespaces/vms/pods/mover-du-1/status", merge, &serde_json::json!({"status": {"phase": "Running"}}));
    k.call("PATCH", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1", merge, &serde_json::json!({"spec": {"volumeName": "pvc-123"}}));
    k.call("PATCH", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1/status", merge, &serde_json::json!({"status": {"phase": "Bound"}}));
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(rt.block_on(c.exposed(&du, &req)).unwrap(), Some(Exposed { pod_uid: uid, pv: "pvc-123".into() }));

    rt.block_on(c.clean_up(&du, &req)).unwrap();
    for p in [
        "/api/v1/namespaces/vms/pods/mover-du-1",
        "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1",
        &format!("{VS}/vs-du-1"),
        &format!("{VSC}/snapcontent-1"),
    ] {
        let (code, _) = k.call("GET", p, "application/json", &serde_json::Value::Null);
        assert_eq!(code, 404, "{p} is gone");
    }
    rt.block_on(c.clean_up(&du, &req)).unwrap();
}

/// A DataUpload end to end, step by step as a node takes it: accepted, its snapshot
/// exposed (a stand-in kubelet publishes the claim's device for the hosting pod, as the
/// real one does under `plugins/kubernetes.io/csi/volumeDevices/publish/`), backed up
/// through the same plan and operation as the CLI and gRPC (confined to the kubelet's
/// pod volume), `Completed` with a snapshotID that alone finds the data, the exposure and
/// the snapshot cleaned up — and what the snapshotID names restores byte-exact.
#[test]
fn a_data_upload_is_backed_up_from_its_exposed_snapshot_and_its_snapshot_id_restores_byte_exact() {
    use mover::sources::file::{Confinement, PathPolicy};
    use mover::velero::node::{backup_request, completed, pass, NodeConfig, Outcome};
    use mover::velero::reconcile::{upload_request, SnapshotRef};
    let k = KubeStandin::start();
    let e = Env::new();
    let merge = "application/merge-patch+json";
    create_upload(&k, "du-1", "mover");
    const VS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/vms/volumesnapshots";
    k.call("POST", VS, "application/json", &serde_json::json!({"metadata": {"name": "vs-du-1"}, "spec": {"source": {"persistentVolumeClaimName": "disk"}}}));
    k.call("PATCH", &format!("{VS}/vs-du-1/status"), merge, &serde_json::json!({"status": {"readyToUse": true, "restoreSize": "16Mi"}}));
    // The snapshot's content, as the CSI driver would restore it into the new claim.
    let img = e.path("snapshot.img");
    make_volume(&img, 16 << 20, 71);
    let lo = Loop::new(&img, 0);
    let kubelet = e.path("kubelet");

    let rt = rt();
    let cfg = NodeConfig { node: "n1".into(), locations: ["default".to_string()].into(), prepare_timeout: std::time::Duration::from_secs(300) };
    let pw = e.path("password");
    std::fs::write(&pw, "test-password").unwrap();
    let ra = mover::repo::RepoArgs {
        repo: Some(e.repo.clone()),
        password_file: Some(pw),
        s3_endpoint: None,
        s3_region: None,
        cache_dir: Some(e.dir.path().join("cache")),
        password_env: None,
    };
    let repo = rt.block_on(ra.open(&Default::default())).unwrap();
    let c = rt.block_on(Cluster::connect(Some(&k.url), "velero")).unwrap();
    let out = rt.block_on(pass::<DataUpload>(&c, &cfg, &Default::default(), mover_format::now_unix_ms())).unwrap();
    assert_eq!(out.iter().map(|(o, r)| (o.metadata.name.as_str(), r)).collect::<Vec<_>>(), vec![("du-1", &Outcome::Accepted)]);
    let du = get_upload(&k, "du-1");
    let req = upload_request(&du).unwrap();
    rt.block_on(c.expose(&du, &req, "n1", "mover:test")).unwrap();

    // The stand-in kubelet and provisioner: the claim bound to a PV, the device published
    // for the pod, the pod running.
    let (_, pod) = k.call("GET", "/api/v1/namespaces/vms/pods/mover-du-1", "application/json", &serde_json::Value::Null);
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let publish = kubelet.join("plugins/kubernetes.io/csi/volumeDevices/publish/pvc-du-1");
    std::fs::create_dir_all(&publish).unwrap();
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&lo.dev).unwrap());
    nix::sys::stat::mknod(&publish.join(&uid), nix::sys::stat::SFlag::S_IFBLK, nix::sys::stat::Mode::from_bits_truncate(0o600), rdev).unwrap();
    let entry = kubelet.join("pods").join(&uid).join("volumeDevices/kubernetes.io~csi");
    std::fs::create_dir_all(&entry).unwrap();
    std::os::unix::fs::symlink(publish.join(&uid), entry.join("pvc-du-1")).unwrap();
    k.call("PATCH", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1", merge, &serde_json::json!({"spec": {"volumeName": "pvc-du-1"}}));
    k.call("PATCH", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1/status", merge, &serde_json::json!({"status": {"phase": "Bound"}}));
    k.call("PATCH", "/api/v1/namespaces/vms/pods/mover-du-1/status", merge, &serde_json::json!({"status": {"phase": "Running"}}));
    let exposed = rt.block_on(c.exposed(&du, &req)).unwrap().expect("exposed");

    // The daemon's confinement: the kubelet's pods, nothing else.
    let env = mover::plan::Env {
        paths: PathPolicy::Confined(Confinement { roots: vec![kubelet.canonicalize().unwrap()], kubelet_root: kubelet.canonicalize().unwrap(), scope: None }),
        ..mover::plan::Env::operator()
    };
    let h = mover_engine::ops::RepoHandle::local(repo.clone(), &e.dir.path().join("cache"));
    let cancel = tokio_util::sync::CancellationToken::new();
    let summary = rt.block_on(async {
        let plan = mover::plan::backup::prepare(backup_request(&du, &req, &exposed, None, false), &env, &repo, &cancel).await.unwrap();
        mover_engine::ops::backup(&h, plan.job, Default::default(), &cancel).await.unwrap()
    });
    assert_eq!(summary.group, "vms/disk");
    let sref = SnapshotRef { repository_id: repo.config().id.to_hex(), snapshot: summary.snapshot_id.to_string(), volume: "disk".into() };
    let du = get_upload(&k, "du-1");
    assert!(rt.block_on(c.set_status(&du, completed(&sref, summary.stats.bytes_total, summary.stats.bytes_new, mover_format::now_unix_ms()))).unwrap());
    rt.block_on(c.clean_up(&du, &req)).unwrap();

    let du = get_upload(&k, "du-1");
    assert_eq!(du.status.phase, Phase::Completed);
    assert_eq!((du.status.progress.total_bytes, du.status.progress.bytes_done), (16 << 20, 16 << 20));
    for p in ["/api/v1/namespaces/vms/pods/mover-du-1", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1", &format!("{VS}/vs-du-1")] {
        assert_eq!(k.call("GET", p, "application/json", &serde_json::Value::Null).0, 404, "{p} is gone");
    }
    // The snapshotID alone finds the data.
    let back = SnapshotRef::parse(&du.status.snapshot_id).unwrap();
    assert_eq!(back.repository_id, repo.config().id.to_hex());
    let out = e.path("restored.img");
    e.ok(&["restore", &format!("{}:{}", back.snapshot, back.volume), out.to_str().unwrap()]);
    assert_eq!(hash(&out), hash(&img), "byte-exact");
    let meta = e.ok(&["snapshots", "--json"]);
    assert!(meta.contains("vms/disk"), "{meta}");
}

/// The exposure pod runs `mover hold`: it holds the volume until the pod is deleted, then
/// ends at once on SIGTERM (the pod has no grace period to wait out).
#[test]
fn the_exposure_pod_command_holds_until_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mover")).arg("hold").env_remove("MOVER_REPOSITORY").spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "it holds");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 5, "it ends on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

// ---- The data mover inside the daemon, against the API stand-in and the stand-in
// kubelet and provisioner (`kubelet_standin.py`).

const KUBELET_STANDIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/kubelet_standin.py");
const VS_PATH: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/vms/volumesnapshots";
const VSC_PATH: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";
const DOWNLOADS: &str = "/apis/velero.io/v2alpha1/namespaces/velero/datadownloads";
const MERGE: &str = "application/merge-patch+json";

/// One node's stand-in kubelet (and, on one node, the cluster's provisioner).
struct Kubelet(Child);

impl Kubelet {
    fn start(k: &KubeStandin, node: &str, root: &std::path::Path, volumes: &std::path::Path, provisioner: bool) -> Self {
        Self::with_args(k, node, root, volumes, if provisioner { &["--provisioner"] } else { &[] })
    }

    fn with_args(k: &KubeStandin, node: &str, root: &std::path::Path, volumes: &std::path::Path, args: &[&str]) -> Self {
        std::fs::create_dir_all(root).unwrap();
        let mut c = Command::new("python3");
        c.arg(KUBELET_STANDIN).arg(&k.url).arg(node).arg(root).arg(volumes).args(args);
        Kubelet(c.spawn().expect("python3"))
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // SIGTERM: the stand-in detaches its loop devices.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// One node: its daemon, with `[velero]` for node `name` (and `extra` settings first), and
/// its stand-in kubelet (with the cluster's provisioner when `provisioner`). Dropped in
/// that order: the daemon stops, then the kubelet detaches its loop devices.
struct Node {
    d: super::daemon::Daemon,
    _kubelet: Kubelet,
}

impl Node {
    fn start(k: &KubeStandin, dir: &std::path::Path, name: &str, extra: &str, provisioner: bool) -> Self {
        Self::with_config(k, dir, name, &velero_config(k, name, extra), provisioner)
    }

    fn with_config(k: &KubeStandin, dir: &std::path::Path, name: &str, config: &str, provisioner: bool) -> Self {
        let d = super::daemon::Daemon::start(dir, config, true);
        Node { d, _kubelet: Kubelet::start(k, name, &dir.join("kubelet"), &dir.join("volumes"), provisioner) }
    }
}

/// Restores what a snapshotID names from the daemon's repository under `dir` with the CLI.
fn restore_snapshot_id(dir: &std::path::Path, snapshot_id: &str) -> std::path::PathBuf {
    let back = mover::velero::reconcile::SnapshotRef::parse(snapshot_id).unwrap();
    let out = dir.join("restored.img");
    let o = Command::new(env!("CARGO_BIN_EXE_mover"))
        .args(["restore", "-r"])
        .arg(dir.join("repo"))
        .arg(format!("{}:{}", back.snapshot, back.volume))
        .arg(&out)
        .env("MOVER_PASSWORD", "daemon-test-pw")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A ready VolumeSnapshot `vms/<name>` whose content's handle is `image` (the stand-in
/// CSI driver restores a claim from it by copying the file).
fn snapshot(k: &KubeStandin, name: &str, image: &std::path::Path, size: &str) {
    let content = format!("content-{name}");
    let (code, body) = k.call(
        "POST",
        VS_PATH,
        "application/json",
        &serde_json::json!({"metadata": {"name": name}, "spec": {"source": {"persistentVolumeClaimName": "disk"}}}),
    );
    assert_eq!(code, 201, "{body}");
    let st = serde_json::json!({"status": {"readyToUse": true, "restoreSize": size, "boundVolumeSnapshotContentName": content}});
    k.call("PATCH", &format!("{VS_PATH}/{name}/status"), MERGE, &st);
    let (code, body) =
        k.call("POST", VSC_PATH, "application/json", &serde_json::json!({"metadata": {"name": content}, "spec": {"driver": "standin.csi.mover.test"}}));
    assert_eq!(code, 201, "{body}");
    k.call(
        "PATCH",
        &format!("{VSC_PATH}/{content}/status"),
        MERGE,
        &serde_json::json!({"status": {"snapshotHandle": image.display().to_string(), "readyToUse": true}}),
    );
}

fn get_json(k: &KubeStandin, path: &str) -> (u16, serde_json::Value) {
    k.call("GET", path, "application/json", &serde_json::Value::Null)
}

/// Bytes in the files beneath `dir`.
fn walkdir(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walkdir(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// A counter of the daemon's `/metrics` (0 when it has no series yet).
fn counter(d: &super::daemon::Daemon, series: &str) -> u64 {
    let (_, body) = super::daemon::http_get(d.http, "/metrics").unwrap();
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse::<f64>().ok())).unwrap_or(0.0) as u64
}

fn requests(k: &KubeStandin) -> serde_json::Value {
    get_json(k, "/standin/requests").1
}

/// Waits (at most `secs`) until the DataUpload `name` is in a final phase.
fn wait_upload_final(k: &KubeStandin, name: &str, secs: u64) -> DataUpload {
    let t0 = std::time::Instant::now();
    loop {
        let du = get_upload(k, name);
        if du.status.phase.is_final() {
            return du;
        }
        assert!(t0.elapsed().as_secs() < secs, "{name} still {:?} after {secs} s: {:?}", du.status.phase, du.status);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Waits (at most `secs`) until the DataDownload `name` ends, and asserts it `Completed`.
fn wait_download_completed(k: &KubeStandin, name: &str, secs: u64) -> mover::velero::types::DataDownload {
    let t0 = std::time::Instant::now();
    loop {
        let dd: mover::velero::types::DataDownload = serde_json::from_value(get_json(k, &format!("{DOWNLOADS}/{name}")).1).unwrap();
        if dd.status.phase.is_final() {
            assert_eq!(dd.status.phase, Phase::Completed, "{name}: {:?}", dd.status);
            return dd;
        }
        assert!(t0.elapsed().as_secs() < secs, "{name} still {:?} after {secs} s: {:?}", dd.status.phase, dd.status);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The `[velero]` section of a node's daemon configuration.
fn velero_config(k: &KubeStandin, node: &str, extra: &str) -> String {
    format!(
        "{extra}\n[velero]\nnamespace = \"velero\"\nnode_name = \"{node}\"\napi_server = \"{}\"\nholder_image = \"mover:test\"\nresync_seconds = 1\nprogress_interval_seconds = 1\nprepare_timeout_seconds = 60\nrepository_timeout_seconds = 5\n[velero.locations]\ndefault = \"main\"\n",
        k.url
    )
}

/// An incompressible volume image of `size` bytes.
fn noise_image(path: &std::path::Path, size: usize, seed: u64) {
    std::fs::write(path, noise(seed, size)).unwrap();
}

/// The daemon as Velero's data mover, end to end: a DataUpload goes to `Completed` with
/// progress that grows while it runs; the exposure, the VolumeSnapshot and its content
/// are gone after; and a DataDownload of its snapshotID (into another namespace, as a
/// restore to a new namespace does) gives Velero's rewritten claim a PV — the claim's
/// mode, its selector's label, a claimRef to it — whose volume holds the source's bytes.
#[test]
fn the_daemon_backs_up_a_data_upload_and_restores_its_snapshot_id_into_a_new_volume() {
    let k = KubeStandin::start();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snapshot.img");
    noise_image(&img, 128 << 20, 5);
    snapshot(&k, "vs-du-1", &img, "128Mi");
    // 16 MiB/s: the transfer takes seconds, long enough to watch its progress (which runs
    // ahead of the upload by what the pipeline holds).
    let _d = Node::start(&k, dir.path(), "n1", "bandwidth_limit = 16777216", true);
    create_upload(&k, "du-1", "mover");

    let t0 = std::time::Instant::now();
    let mut seen = Vec::new();
    let du = loop {
        let du = get_upload(&k, "du-1");
        if du.status.phase == Phase::InProgress && seen.last() != Some(&du.status.progress.bytes_done) {
            seen.push(du.status.progress.bytes_done);
        }
        if du.status.phase.is_final() {
            break du;
        }
        assert!(t0.elapsed().as_secs() < 90, "du-1 still {:?}: {:?}", du.status.phase, du.status);
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(du.status.phase, Phase::Completed, "{:?}", du.status);
    assert_eq!((du.status.progress.total_bytes, du.status.progress.bytes_done), (128 << 20, 128 << 20));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "progress only grows: {seen:?}");
    assert!(seen.iter().filter(|d| **d > 0 && **d < 128 << 20).count() >= 2, "progress was seen growing while it ran: {seen:?}");
    assert_eq!(du.status.node, "n1");
    assert!(du.status.start_timestamp.is_some() && du.status.completion_timestamp.is_some());
    for p in [
        "/api/v1/namespaces/vms/pods/mover-du-1",
        "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-1",
        &format!("{VS_PATH}/vs-du-1"),
        &format!("{VSC_PATH}/content-vs-du-1"),
    ] {
        assert_eq!(get_json(&k, p).0, 404, "{p} is gone");
    }

    // Velero's restore: the rewritten claim in the new namespace (a selector, no
    // volume), then the DataDownload with nothing but the snapshotID.
    let selector = "restored.disk.x7k2p";
    let target = serde_json::json!({"metadata": {"name": "disk", "namespace": "restored"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "storageClassName": "sc",
        "resources": {"requests": {"storage": "128Mi"}},
        "selector": {"matchLabels": {"velero.io/dynamic-pv-restore": selector}}}});
    assert_eq!(k.call("POST", "/api/v1/namespaces/restored/persistentvolumeclaims", "application/json", &target).0, 201);
    let dd = serde_json::json!({"apiVersion": "velero.io/v2alpha1", "kind": "DataDownload",
        "metadata": {"name": "dd-1", "namespace": "velero"},
        "spec": {"targetVolume": {"pvc": "disk", "namespace": "restored", "pv": ""}, "backupStorageLocation": "default",
                 "datamover": "mover", "snapshotID": du.status.snapshot_id, "sourceNamespace": "vms", "operationTimeout": "10m0s"}});
    assert_eq!(k.call("POST", DOWNLOADS, "application/json", &dd).0, 201);
    let dd = wait_download_completed(&k, "dd-1", 90);
    assert_eq!(dd.status.progress.bytes_done, 128 << 20);
    let (_, claim) = get_json(&k, "/api/v1/namespaces/restored/persistentvolumeclaims/disk");
    let pv_name = claim["spec"]["volumeName"].as_str().expect("the target claim names the PV").to_string();
    let (code, pv) = get_json(&k, &format!("/api/v1/persistentvolumes/{pv_name}"));
    assert_eq!(code, 200);
    assert_eq!(pv["metadata"]["labels"]["velero.io/dynamic-pv-restore"], selector, "{pv}");
    assert_eq!((pv["spec"]["claimRef"]["namespace"].as_str(), pv["spec"]["claimRef"]["name"].as_str()), (Some("restored"), Some("disk")), "{pv}");
    assert_eq!(pv["spec"]["volumeMode"], "Block");
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete", "the original reclaim policy is back");
    let t0 = std::time::Instant::now();
    while get_json(&k, "/api/v1/namespaces/restored/persistentvolumeclaims/disk").1["status"]["phase"] != "Bound" {
        assert!(t0.elapsed().as_secs() < 10, "the target claim binds to the PV");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let volume = std::path::PathBuf::from(pv["spec"]["csi"]["volumeHandle"].as_str().unwrap());
    assert_eq!(hash(&volume), hash(&img), "the PV's volume holds the source's bytes");
    for p in ["/api/v1/namespaces/velero/pods/mover-dd-1", "/api/v1/namespaces/velero/persistentvolumeclaims/mover-dd-1"] {
        assert_eq!(get_json(&k, p).0, 404, "{p} is gone");
    }
}

/// Two nodes' daemons race for every DataUpload: each is run by exactly one of them — the
/// one that accepted it — and completes.
#[test]
fn two_daemons_race_for_data_uploads_and_each_runs_on_exactly_one_node() {
    let k = KubeStandin::start();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let names: Vec<String> = (0..4).map(|i| format!("du-{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        let img = a.path().join(format!("{n}.img"));
        noise_image(&img, 8 << 20, 20 + i as u64);
        snapshot(&k, &format!("vs-{n}"), &img, "8Mi");
    }
    let da = Node::start(&k, a.path(), "n1", "", true);
    let db = Node::start(&k, b.path(), "n2", "", false);
    for n in &names {
        create_upload(&k, n, "mover");
    }
    let mut by_node = std::collections::BTreeMap::<String, u64>::new();
    for n in &names {
        let du = wait_upload_final(&k, n, 90);
        assert_eq!(du.status.phase, Phase::Completed, "{n}: {:?}", du.status);
        assert_eq!(du.status.node, du.status.accepted_by_node, "{n} ran where it was accepted");
        *by_node.entry(du.status.node.clone()).or_default() += 1;
    }
    let ok = "mover_transfers_total{kind=\"backup\",result=\"ok\"}";
    assert_eq!(counter(&da.d, ok), by_node.get("n1").copied().unwrap_or(0), "node n1 ran exactly what it accepted ({by_node:?})");
    assert_eq!(counter(&db.d, ok), by_node.get("n2").copied().unwrap_or(0), "node n2 ran exactly what it accepted ({by_node:?})");
    assert_eq!(counter(&da.d, ok) + counter(&db.d, ok), 4, "each DataUpload ran once");
}

/// `spec.cancel` on a running DataUpload: it ends `Canceled` within seconds, its
/// transfer cancelled and what it made removed; the next DataUpload of the same volume
/// (Velero's next backup) sends only what the cancelled one had not.
#[test]
fn a_cancelled_data_upload_ends_canceled_and_the_next_one_does_not_upload_again() {
    let k = KubeStandin::start();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    noise_image(&img, 96 << 20, 9);
    snapshot(&k, "vs-du-a", &img, "96Mi");
    let d = Node::start(&k, dir.path(), "n1", "bandwidth_limit = 8388608", true);
    create_upload(&k, "du-a", "mover");
    let t0 = std::time::Instant::now();
    // What is in the store is what was uploaded (the local repository's files).
    let stored = || -> u64 { walkdir(&dir.path().join("repo")) };
    while stored() < 24 << 20 {
        assert!(t0.elapsed().as_secs() < 60, "du-a uploads: {:?}", get_upload(&k, "du-a").status);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(get_upload(&k, "du-a").status.phase, Phase::InProgress);
    k.call("PATCH", &format!("{UPLOADS}/du-a"), MERGE, &serde_json::json!({"spec": {"cancel": true}}));
    let t0 = std::time::Instant::now();
    let du = wait_upload_final(&k, "du-a", 15);
    assert!(t0.elapsed().as_secs() < 10, "cancelled in seconds: {:?}", t0.elapsed());
    assert_eq!(du.status.phase, Phase::Canceled, "{:?}", du.status);
    assert_eq!(counter(&d.d, "mover_transfers_total{kind=\"backup\",result=\"cancelled\"}"), 1, "the transfer was cancelled");
    for p in ["/api/v1/namespaces/vms/pods/mover-du-a", &format!("{VS_PATH}/vs-du-a")] {
        assert_eq!(get_json(&k, p).0, 404, "{p} is gone");
    }
    let sent_before = stored();
    assert!(sent_before < 90 << 20, "cancelled before the end: {sent_before}");

    snapshot(&k, "vs-du-b", &img, "96Mi");
    create_upload(&k, "du-b", "mover");
    let du = wait_upload_final(&k, "du-b", 90);
    assert_eq!(du.status.phase, Phase::Completed, "{:?}", du.status);
    let sent = stored();
    // Noise does not compress: one volume is ~96 MiB of packs. Sending the cancelled part
    // again would make it ~96 MiB + what was sent before.
    assert!(sent < (96 << 20) + (4 << 20), "the volume was sent once in all: {sent} bytes (before the cancel: {sent_before})");
    assert!((du.status.incremental_bytes as u64) < (96 << 20) - (20 << 20), "du-b stored only what du-a had not: {}", du.status.incremental_bytes);
}

/// A DataUpload whose repository cannot be reached fails in seconds, with a message that
/// names it and the repository — not after Velero's 4-hour operation timeout — and no pod
/// or claim is created for it.
#[test]
fn an_unreachable_repository_fails_the_data_upload_in_seconds() {
    let k = KubeStandin::start();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    noise_image(&img, 4 << 20, 3);
    snapshot(&k, "vs-du-far", &img, "4Mi");
    let cfg = velero_config(&k, "n1", "")
        + "remote = \"far\"\n[repositories.far]\nurl = \"s3://unreachable/repo\"\ns3_endpoint = \"http://127.0.0.1:9\"\npassword_env = \"MOVER_TEST_DAEMON_PW\"\n";
    let d = super::daemon::Daemon::start_alive(dir.path(), &cfg, true);
    let _kubelet = Kubelet::start(&k, "n1", &dir.path().join("kubelet"), &dir.path().join("volumes"), true);
    create_upload(&k, "du-far", "mover");
    k.call("PATCH", &format!("{UPLOADS}/du-far"), MERGE, &serde_json::json!({"spec": {"backupStorageLocation": "remote"}}));
    let t0 = std::time::Instant::now();
    let du = wait_upload_final(&k, "du-far", 30);
    assert!(t0.elapsed().as_secs() < 15, "failed in seconds: {:?}", t0.elapsed());
    assert_eq!(du.status.phase, Phase::Failed);
    let m = &du.status.message;
    assert!(m.contains("DataUpload velero/du-far") && m.contains("'remote'") && m.contains("far"), "{m}");
    for p in ["/api/v1/namespaces/vms/pods/mover-du-far", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-far"] {
        assert_eq!(get_json(&k, p).0, 404, "{p} was never created");
    }
    // The node says so too: not ready, naming the repository.
    let (code, body) = super::daemon::http_get(d.http, "/readyz").unwrap();
    assert!(code == 503 && body.contains("repository 'far'"), "{code} {body}");
}

/// Malformed DataUploads — no snapshot named, a snapshot that does not exist, a source
/// claim of an unknown volume mode — fail at once with a message naming the object and
/// what is wrong, and change nothing else: nothing created, nothing deleted (the
/// snapshot stays), no transfer run.
#[test]
fn malformed_data_uploads_fail_with_a_clear_message_and_change_nothing() {
    let k = KubeStandin::start();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    noise_image(&img, 4 << 20, 4);
    snapshot(&k, "vs-odd-mode", &img, "4Mi");
    let odd = serde_json::json!({"metadata": {"name": "odd", "namespace": "vms"}, "spec": {"volumeMode": "Tape", "volumeName": "pv-odd", "resources": {"requests": {"storage": "4Mi"}}}});
    assert_eq!(k.call("POST", "/api/v1/namespaces/vms/persistentvolumeclaims", "application/json", &odd).0, 201);
    let d = Node::start(&k, dir.path(), "n1", "", true);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = requests(&k);
    for n in ["no-snap", "gone-snap", "odd-mode"] {
        create_upload(&k, n, "mover");
    }
    k.call("PATCH", &format!("{UPLOADS}/no-snap"), MERGE, &serde_json::json!({"spec": {"csiSnapshot": null}}));
    k.call("PATCH", &format!("{UPLOADS}/odd-mode"), MERGE, &serde_json::json!({"spec": {"sourcePVC": "odd"}}));
    let t0 = std::time::Instant::now();
    for (n, what) in [
        ("no-snap", "spec.csiSnapshot.volumeSnapshot is missing"),
        ("gone-snap", "VolumeSnapshot vms/vs-gone-snap"),
        ("odd-mode", "volumeMode 'Tape' is neither Block nor Filesystem"),
    ] {
        let du = wait_upload_final(&k, n, 20);
        assert_eq!(du.status.phase, Phase::Failed, "{n}: {:?}", du.status);
        assert!(du.status.message.contains(&format!("DataUpload velero/{n}")) && du.status.message.contains(what), "{n}: {}", du.status.message);
    }
    assert!(t0.elapsed().as_secs() < 10, "refused at once: {:?}", t0.elapsed());
    assert_eq!(get_json(&k, &format!("{VS_PATH}/vs-odd-mode")).0, 200, "the snapshot is left as it was");
    let after = requests(&k);
    for (req, n) in after.as_object().unwrap() {
        let was = before.get(req).and_then(|v| v.as_u64()).unwrap_or(0);
        let new = n.as_u64().unwrap() > was;
        assert!(
            !(new && (req.starts_with("DELETE ") || (req.starts_with("POST ") && !req.contains("datauploads")))),
            "a malformed DataUpload made the data mover call {req}"
        );
    }
    assert_eq!(
        counter(&d.d, "mover_transfers_total{kind=\"backup\",result=\"ok\"}") + counter(&d.d, "mover_transfers_total{kind=\"backup\",result=\"err\"}"),
        0
    );
}

/// A node that restarts mid-transfer (the daemon killed, its pod and claim still there)
/// resumes the DataUpload it was running: it completes, byte-exact, and what the last
/// index checkpoint before the kill recorded is not sent again.
#[test]
fn a_daemon_killed_mid_transfer_resumes_its_data_upload_after_restart() {
    let k = KubeStandin::start();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    noise_image(&img, 192 << 20, 11);
    snapshot(&k, "vs-du-r", &img, "192Mi");
    let mut d = Node::start(&k, dir.path(), "n1", "bandwidth_limit = 25165824", true);
    create_upload(&k, "du-r", "mover");
    let stored = || -> u64 { walkdir(&dir.path().join("repo")) };
    let t0 = std::time::Instant::now();
    // Killed once an index checkpoint (every 4 packs of 16 MiB) made the first uploads
    // findable; what came after it is the most a kill may cost.
    let index = dir.path().join("repo/index");
    while std::fs::read_dir(&index).map(|d| d.count()).unwrap_or(0) < 1 {
        assert!(t0.elapsed().as_secs() < 60, "du-r uploads: {:?}", get_upload(&k, "du-r").status);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    d.d.signal("-KILL");
    let before = stored();
    assert_eq!(get_upload(&k, "du-r").status.phase, Phase::InProgress);
    d.d.spawn();
    let du = wait_upload_final(&k, "du-r", 90);
    assert_eq!(du.status.phase, Phase::Completed, "{:?}", du.status);
    assert_eq!(du.status.progress.bytes_done, 192 << 20);
    let sent = stored();
    assert!(sent < (192 << 20) + (68 << 20), "at most one checkpoint's packs were sent again: {sent} bytes (before the restart: {before})");
    // At least one checkpointed pack (16 MiB) was found again, not stored twice.
    assert!(
        (du.status.incremental_bytes as u64) <= (192 - 16) << 20,
        "the resumed run found the checkpointed packs: {} new bytes (stored before the restart: {before})",
        du.status.incremental_bytes
    );
    assert_eq!(get_json(&k, &format!("{VS_PATH}/vs-du-r")).0, 404, "cleaned up after the resumed run");
    let out = restore_snapshot_id(dir.path(), &du.status.snapshot_id);
    assert_eq!(hash(&out), hash(&img), "byte-exact after the resume");
}

/// A Filesystem-mode source (an ext4 volume) is backed up through a Block claim, and its
/// DataDownload gives a Filesystem-mode target claim a Filesystem PV holding the same
/// filesystem, its file intact.
#[test]
fn a_filesystem_mode_volume_goes_through_velero_and_comes_back_as_a_filesystem_pv() {
    let k = KubeStandin::start();
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "restored through Velero\n").unwrap();
    let img = dir.path().join("fs.img");
    let st = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&content).arg(&img).arg("16M").status().unwrap();
    assert!(st.success());
    let source = serde_json::json!({"metadata": {"name": "disk", "namespace": "vms"}, "spec": {"volumeMode": "Filesystem", "volumeName": "pv-src", "resources": {"requests": {"storage": "16Mi"}}}});
    assert_eq!(k.call("POST", "/api/v1/namespaces/vms/persistentvolumeclaims", "application/json", &source).0, 201);
    snapshot(&k, "vs-du-fs", &img, "16Mi");
    let _d = Node::start(&k, dir.path(), "n1", "", true);
    create_upload(&k, "du-fs", "mover");
    let du = wait_upload_final(&k, "du-fs", 60);
    assert_eq!(du.status.phase, Phase::Completed, "{:?}", du.status);

    let target = serde_json::json!({"metadata": {"name": "disk", "namespace": "vms-copy"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem", "storageClassName": "sc",
        "resources": {"requests": {"storage": "16Mi"}},
        "selector": {"matchLabels": {"velero.io/dynamic-pv-restore": "vms-copy.disk.abcde"}}}});
    assert_eq!(k.call("POST", "/api/v1/namespaces/vms-copy/persistentvolumeclaims", "application/json", &target).0, 201);
    let dd = serde_json::json!({"apiVersion": "velero.io/v2alpha1", "kind": "DataDownload", "metadata": {"name": "dd-fs", "namespace": "velero"},
        "spec": {"targetVolume": {"pvc": "disk", "namespace": "vms-copy"}, "backupStorageLocation": "default", "datamover": "mover", "snapshotID": du.status.snapshot_id}});
    assert_eq!(k.call("POST", DOWNLOADS, "application/json", &dd).0, 201);
    wait_download_completed(&k, "dd-fs", 60);
    let (_, claim) = get_json(&k, "/api/v1/namespaces/vms-copy/persistentvolumeclaims/disk");
    let (_, pv) = get_json(&k, &format!("/api/v1/persistentvolumes/{}", claim["spec"]["volumeName"].as_str().unwrap()));
    assert_eq!(pv["spec"]["volumeMode"], "Filesystem", "the target's mode: {pv}");
    let volume = std::path::PathBuf::from(pv["spec"]["csi"]["volumeHandle"].as_str().unwrap());
    assert_eq!(hash(&volume), hash(&img));
    let o = Command::new("debugfs").args(["-R", "cat /hello.txt"]).arg(&volume).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "restored through Velero\n");
}

/// With a CSI SnapshotMetadata service configured for the DataUpload's driver (here the
/// test stand-in of `csi_server`), Velero's next backup of a volume asks for the blocks
/// changed since the last one's snapshot (its CSI handle, recorded as the checkpoint) and
/// reads only those; the result restores byte-exact.
#[test]
fn the_next_data_upload_of_a_volume_reads_only_the_blocks_csi_says_changed() {
    use crate::csi_server::{start, Server};
    let k = KubeStandin::start();
    let dir = tempfile::tempdir().unwrap();
    let csi = dir.path().join("csi");
    std::fs::create_dir(&csi).unwrap();
    std::fs::write(csi.join("token"), "s3cr3t\n").unwrap();
    let (s1, s2) = (dir.path().join("snap-1.img"), dir.path().join("snap-2.img"));
    make_volume(&s1, 32 << 20, 31);
    std::fs::copy(&s1, &s2).unwrap();
    modify(&s2, 6, 8);
    let srv = std::sync::Arc::new(Server { token: "s3cr3t".into(), ..Default::default() });
    for (vs, img) in [("vms/vs-du-1", &s1), ("vms/vs-du-2", &s2)] {
        srv.snaps.lock().unwrap().insert(vs.into(), (img.clone(), img.display().to_string()));
    }
    let (ep, _rt) = start(&csi, srv.clone());
    let driver = "standin.csi.mover.test";
    let extra = format!(
        "[[csi_drivers]]\ndriver = \"{driver}\"\nendpoint = \"{ep}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\n",
        csi.join("ca.pem").display(),
        csi.join("token").display()
    );
    let d = Node::start(&k, dir.path(), "n1", &extra, true);
    let read = || counter(&d.d, "mover_backup_bytes_total{what=\"read\"}");
    let mut done = Vec::new();
    for (n, img) in [("du-1", &s1), ("du-2", &s2)] {
        snapshot(&k, &format!("vs-{n}"), img, "32Mi");
        let du = serde_json::json!({"apiVersion": "velero.io/v2alpha1", "kind": "DataUpload", "metadata": {"name": n, "namespace": "velero"},
            "spec": {"snapshotType": "CSI", "csiSnapshot": {"volumeSnapshot": format!("vs-{n}"), "storageClass": "sc", "driver": driver},
                     "sourcePVC": "disk", "sourceNamespace": "vms", "backupStorageLocation": "default", "datamover": "mover"}});
        assert_eq!(k.call("POST", UPLOADS, "application/json", &du).0, 201);
        let before = read();
        let du = wait_upload_final(&k, n, 60);
        assert_eq!(du.status.phase, Phase::Completed, "{n}: {:?}", du.status);
        done.push((du, read() - before));
    }
    // The first has no parent to take changes against; the second's changes came from CSI.
    assert_eq!(counter(&d.d, "mover_backup_volumes_total{change_source=\"csi\"}"), 1, "the second asked the SnapshotMetadata service");
    let (full, inc) = (done[0].1, done[1].1);
    assert!(inc * 4 < full, "the second read only the changed blocks' segments: {inc} bytes (the first: {full})");
    let out = restore_snapshot_id(dir.path(), &done[1].0.status.snapshot_id);
    assert_eq!(hash(&out), hash(&s2), "byte-exact");
}

/// A node that cannot reach a DataUpload's volume (the scheduler cannot place the pod
/// holding it there: a volume node affinity conflict) releases it — its pod and claim
/// deleted, the DataUpload `New` again with why — and another node takes and completes it.
#[test]
fn a_node_that_cannot_reach_the_volume_releases_it_and_another_node_runs_it() {
    let k = KubeStandin::start();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let img = a.path().join("disk.img");
    noise_image(&img, 8 << 20, 41);
    snapshot(&k, "vs-du-z", &img, "8Mi");
    // Node n1 cannot reach storage class "sc" (the class create_upload names).
    let d1 = super::daemon::Daemon::start(a.path(), &velero_config(&k, "n1", ""), true);
    let _k1 = Kubelet::with_args(&k, "n1", &a.path().join("kubelet"), &a.path().join("volumes"), &["--provisioner", "--unreachable=sc"]);
    create_upload(&k, "du-z", "mover");
    let t0 = std::time::Instant::now();
    loop {
        let du = get_upload(&k, "du-z");
        if du.status.message.starts_with("released by node n1") {
            assert_eq!((du.status.phase, du.status.accepted_by_node.as_str()), (Phase::New, ""), "{:?}", du.status);
            assert!(du.status.message.contains("volume node affinity conflict"), "{}", du.status.message);
            assert!(du.status.accepted_timestamp.is_some(), "the first acceptance's time stays");
            break;
        }
        assert!(t0.elapsed().as_secs() < 20, "n1 releases it: {:?}", du.status);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for p in ["/api/v1/namespaces/vms/pods/mover-du-z", "/api/v1/namespaces/vms/persistentvolumeclaims/mover-du-z"] {
        assert_eq!(get_json(&k, p).0, 404, "{p}: n1's exposure is gone");
    }
    assert_eq!(get_json(&k, &format!("{VS_PATH}/vs-du-z")).0, 200, "the snapshot stays for the next node");
    let _n2 = Node::start(&k, b.path(), "n2", "", false);
    let du = wait_upload_final(&k, "du-z", 60);
    assert_eq!(du.status.phase, Phase::Completed, "{:?}", du.status);
    assert_eq!(du.status.node, "n2");
    assert_eq!(counter(&d1, "mover_transfers_total{kind=\"backup\",result=\"ok\"}"), 0, "n1 ran nothing");
}

/// A restore in another cluster from the snapshotID alone: the second cluster (its own API
/// server) has the same repository configured under another name, behind another
/// BackupStorageLocation; its DataDownload names only the snapshotID and that location,
/// and the PV it gets holds the source's bytes.
#[test]
fn another_cluster_restores_from_the_snapshot_id_alone() {
    let (k1, k2) = (KubeStandin::start(), KubeStandin::start());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let img = a.path().join("disk.img");
    noise_image(&img, 8 << 20, 51);
    snapshot(&k1, "vs-du-x", &img, "8Mi");
    let _n1 = Node::start(&k1, a.path(), "n1", "", true);
    create_upload(&k1, "du-x", "mover");
    let du = wait_upload_final(&k1, "du-x", 60);
    assert_eq!(du.status.phase, Phase::Completed, "{:?}", du.status);

    // Cluster 2: the first cluster's repository as "dr", behind location "site-a".
    let cfg = velero_config(&k2, "m1", &format!("[repositories.dr]\nurl = \"{}\"\npassword_env = \"MOVER_TEST_DAEMON_PW\"\n", a.path().join("repo").display()))
        + "site-a = \"dr\"\n";
    let _m1 = Node::with_config(&k2, b.path(), "m1", &cfg, true);
    let target = serde_json::json!({"metadata": {"name": "disk", "namespace": "vms"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "storageClassName": "other-sc",
        "resources": {"requests": {"storage": "8Mi"}},
        "selector": {"matchLabels": {"velero.io/dynamic-pv-restore": "vms.disk.q9w8e"}}}});
    assert_eq!(k2.call("POST", "/api/v1/namespaces/vms/persistentvolumeclaims", "application/json", &target).0, 201);
    let dd = serde_json::json!({"apiVersion": "velero.io/v2alpha1", "kind": "DataDownload", "metadata": {"name": "dd-x", "namespace": "velero"},
        "spec": {"targetVolume": {"pvc": "disk", "namespace": "vms"}, "backupStorageLocation": "site-a", "datamover": "mover", "snapshotID": du.status.snapshot_id}});
    assert_eq!(k2.call("POST", DOWNLOADS, "application/json", &dd).0, 201);
    wait_download_completed(&k2, "dd-x", 60);
    let (_, claim) = get_json(&k2, "/api/v1/namespaces/vms/persistentvolumeclaims/disk");
    let (_, pv) = get_json(&k2, &format!("/api/v1/persistentvolumes/{}", claim["spec"]["volumeName"].as_str().unwrap()));
    assert_eq!(pv["spec"]["storageClassName"], "other-sc", "the target's storage class");
    assert_eq!(hash(std::path::Path::new(pv["spec"]["csi"]["volumeHandle"].as_str().unwrap())), hash(&img));
}
