//! One node's pass over the DataUploads: the steps of [`super::reconcile`] applied through
//! [`Cluster`]. So far the steps that need no exposure: claiming (with requests checked
//! first, so a malformed one fails at once, naming the field, and nothing is created for
//! it), cancelling what has not run, and failing a preparation past its timeout. Exposing
//! and running are returned as work for the caller.

use super::cluster::Cluster;
use super::reconcile::{format_time, step, Moved, Step};
use super::types::DataUpload;
use mover_engine::Result;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

/// What a node needs to know to take part.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name (`spec.nodeName`, from the downward API).
    pub node: String,
    /// The BackupStorageLocations this node has a repository for.
    pub locations: BTreeSet<String>,
    /// How long an accepted DataUpload may take to be prepared.
    pub prepare_timeout: Duration,
}

/// What a pass did to one DataUpload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing (not ours, done, or another node's).
    Left,
    /// Refused before anything was created; the message written.
    Failed(String),
    /// Accepted by this node: to be prepared.
    Accepted,
    /// Another node accepted it first.
    Lost,
    Canceled,
    /// Work for the caller: prepare, run, resume or cancel the running transfer.
    Pending(Step),
}

/// What this process knows of the objects it works on.
#[derive(Debug, Clone, Default)]
pub struct Local {
    /// Those whose transfer this process runs.
    pub running: BTreeSet<String>,
    /// Those being prepared here, with what the preparation waits for (a timeout says it).
    pub waiting: std::collections::BTreeMap<String, String>,
    /// Those this node released (it could not reach their volume): not accepted again here.
    pub released: BTreeSet<String>,
}

/// One pass over every object of the kind in Velero's namespace.
pub async fn pass<T: Moved>(c: &Cluster, cfg: &NodeConfig, local: &Local, now_ms: u64) -> Result<Vec<(T, Outcome)>> {
    let mut out = Vec::new();
    for o in c.list::<T>().await?.0 {
        let r = one(c, cfg, &o, local, now_ms).await?;
        out.push((o, r));
    }
    Ok(out)
}

/// The status of an object that ends now with `phase` and `message`.
pub fn ended<T: Moved>(o: &T, phase: &str, message: &str, now_ms: u64) -> serde_json::Value {
    json!({"phase": phase, "message": message, "completionTimestamp": format_time(now_ms),
           "startTimestamp": o.start_timestamp().map(str::to_string).unwrap_or_else(|| format_time(now_ms))})
}

async fn one<T: Moved>(c: &Cluster, cfg: &NodeConfig, o: &T, local: &Local, now_ms: u64) -> Result<Outcome> {
    let name = &o.meta().name;
    let end = |phase: &'static str, msg: String| end_as(c, o, phase, msg, now_ms);
    Ok(match step(o.claim(), &cfg.node, local.running.contains(name), now_ms, cfg.prepare_timeout) {
        Step::NotOurs | Step::Done | Step::Wait => Outcome::Left,
        Step::Accept if local.released.contains(name) => Outcome::Left,
        Step::Accept => {
            let checked = o.location().and_then(|l| match cfg.locations.contains(&l) {
                true => Ok(l),
                false => Err(format!(
                    "{}: BackupStorageLocation '{l}' has no Mover repository on node {} (configured: {})",
                    o.what(),
                    cfg.node,
                    cfg.locations.iter().cloned().collect::<Vec<_>>().join(", ")
                )),
            });
            match checked {
                Err(msg) => end("Failed", msg).await?,
                Ok(_) => match c.accept(o, &cfg.node, now_ms).await? {
                    Some(_) => Outcome::Accepted,
                    None => Outcome::Lost,
                },
            }
        }
        Step::Cancel => end("Canceled", "cancelled before it ran".into()).await?,
        Step::PrepareTimedOut => {
            let why = local.waiting.get(name).map(|w| format!(": {w}")).unwrap_or_default();
            let msg = format!("{}: accepted by node {} but not prepared within {} s{why}", o.what(), o.claim().accepted_by, cfg.prepare_timeout.as_secs());
            end("Failed", msg).await?
        }
        s @ (Step::Prepare | Step::Run | Step::Resume | Step::CancelRunning) => Outcome::Pending(s),
    })
}

/// Writes `o` as ended with `phase` and `msg` (if still at the version read).
async fn end_as<T: Moved>(c: &Cluster, o: &T, phase: &'static str, msg: String, now_ms: u64) -> Result<Outcome> {
    Ok(match c.set_status(o, ended(o, phase, &msg, now_ms)).await? {
        true if phase == "Canceled" => Outcome::Canceled,
        true => Outcome::Failed(msg),
        false => Outcome::Lost,
    })
}

/// The backup a DataUpload becomes once its volume is exposed on this node — the same
/// request the CLI and gRPC build, run by the same plan and operation: the exposed device
/// through the pod-volume rule, in the group `<sourceNamespace>/<sourcePVC>` with the
/// group's latest snapshot as parent, the volume named after the source PVC, and the
/// DataUpload (with the Velero backup it belongs to) recorded as the snapshot's metadata.
/// `handle`, the snapshot's CSI handle, is recorded as the checkpoint; with `cbt` (the
/// node has a SnapshotMetadata service for the DataUpload's driver) the changed blocks
/// since the parent's checkpoint are asked for, and only they are read.
pub fn backup_request(
    du: &DataUpload,
    req: &super::reconcile::UploadRequest,
    exposed: &super::cluster::Exposed,
    handle: Option<String>,
    cbt: bool,
) -> crate::plan::backup::BackupRequest {
    use crate::plan::backup::{BackupRequest, SourceRef, VolumeRequest};
    let backup = du.metadata.labels.get("velero.io/backup-name").cloned().unwrap_or_default();
    let record = json!({
        "dataUpload": {"namespace": du.metadata.namespace, "name": du.metadata.name, "uid": du.metadata.uid},
        "backup": backup,
        "sourceNamespace": req.source_namespace,
        "sourcePVC": req.source_pvc,
        "volumeSnapshot": req.volume_snapshot,
        "storageClass": req.storage_class,
        "driver": req.driver,
    });
    let mut tags = std::collections::BTreeMap::new();
    if !backup.is_empty() {
        tags.insert("velero.io/backup-name".to_string(), backup);
    }
    BackupRequest {
        group: Some(req.group.clone()),
        volumes: vec![VolumeRequest {
            name: req.source_pvc.clone(),
            source: SourceRef::PodVolume { uid: exposed.pod_uid.clone(), volume: exposed.pv.clone() },
            changed_extents: None,
            csi: cbt.then(|| crate::sources::csi::CsiQuery {
                namespace: req.source_namespace.clone(),
                snapshot: req.volume_snapshot.clone(),
                base_id: None,
                driver: Some(req.driver.clone()),
            }),
            checkpoint: handle,
        }],
        parent: Some("latest".into()),
        metadata: vec![("velero-dataupload.json".into(), record.to_string().into_bytes())],
        tags,
        ..Default::default()
    }
}

/// The status of a DataUpload whose backup is committed: `Completed`, the `snapshotID` a
/// DataDownload restores from alone, and the volume's size as done.
pub fn completed(snapshot: &super::reconcile::SnapshotRef, size: u64, new_bytes: u64, now_ms: u64) -> serde_json::Value {
    json!({
        "phase": "Completed",
        "snapshotID": snapshot.encode(),
        "progress": {"totalBytes": size, "bytesDone": size},
        "incrementalBytes": new_bytes,
        "completionTimestamp": format_time(now_ms),
        "message": "",
    })
}
