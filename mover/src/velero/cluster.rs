//! The Kubernetes API as the data mover uses it (the `kube` crate): DataUploads and
//! DataDownloads read and claimed. Status writes are merge patches to the `/status`
//! subresource carrying the `resourceVersion` the decision was made on, so two nodes that
//! decide at once cannot both win (the API server answers the second with 409).

use super::reconcile::format_time;
use super::reconcile::Moved;
use super::types::{DataUpload, API_VERSION};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use mover_engine::{Error, Result};
use serde_json::json;

/// A connection to the cluster, scoped to Velero's namespace.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    namespace: String,
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    let (group, version) = API_VERSION.split_once('/').expect("group/version");
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// A Kubernetes API error as a Mover error of the matching kind, naming the object.
fn api_error(e: kube::Error, what: &str) -> Error {
    match &e {
        kube::Error::Api(s) => {
            let msg = format!("{what}: {} ({} {})", s.message, s.code, s.reason);
            match s.code {
                404 => Error::not_found(msg),
                409 => Error::conflict(msg),
                400 | 415 | 422 => Error::invalid(msg),
                401 | 403 => Error::precondition(msg),
                _ => Error::transient(msg),
            }
        }
        _ => Error::transient(format!("{what}: {e}")),
    }
}

impl Cluster {
    /// `server`: the API server's URL (a test stand-in, or an operator's choice); `None`:
    /// the in-cluster configuration (service account token and CA).
    pub async fn connect(server: Option<&str>, namespace: &str) -> Result<Self> {
        crate::init_tls();
        let config = match server {
            Some(url) => kube::Config::new(url.parse().map_err(|e| Error::invalid(format!("Kubernetes API server URL '{url}': {e}")))?),
            None => kube::Config::infer().await.map_err(|e| Error::precondition(format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}")))?,
        };
        let client = kube::Client::try_from(config).map_err(|e| Error::precondition(format!("Kubernetes client: {e}")))?;
        Ok(Self { client, namespace: namespace.to_string() })
    }

    /// The Kubernetes client (the controller's watch uses it).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn api<T: Moved>(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &resource(T::KIND, T::PLURAL))
    }

    /// Every object of the kind in Velero's namespace, and the list's resourceVersion (a
    /// watch starts from it).
    pub async fn list<T: Moved>(&self) -> Result<(Vec<T>, String)> {
        let what = format!("listing {}s in namespace {}", T::KIND, self.namespace);
        let list = self.api::<T>().list(&ListParams::default()).await.map_err(|e| api_error(e, &what))?;
        let rv = list.metadata.resource_version.clone().unwrap_or_default();
        Ok((list.items.into_iter().map(|o| decode(o, T::KIND)).collect::<Result<_>>()?, rv))
    }

    /// The object as it is now; `None` when it is gone.
    pub async fn get<T: Moved>(&self, name: &str) -> Result<Option<T>> {
        match self.api::<T>().get(name).await {
            Ok(o) => Ok(Some(decode(o, T::KIND)?)),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(api_error(e, &format!("reading {} {}/{name}", T::KIND, self.namespace))),
        }
    }

    /// Races to accept `o` for `node`, as every node does: `Some(updated)` when this node
    /// won, `None` when another wrote first (the resourceVersion `o` was read at is stale).
    pub async fn accept<T: Moved>(&self, o: &T, node: &str, now_ms: u64) -> Result<Option<T>> {
        let mut status = json!({"phase": "Accepted", "acceptedByNode": node, "acceptedTimestamp": format_time(now_ms)});
        // Accepted again after a release: the first acceptance's time stays, so the
        // prepare timeout bounds the whole preparation across nodes.
        if o.claim().accepted_ms.is_some() {
            status.as_object_mut().map(|m| m.remove("acceptedTimestamp"));
        }
        match self.patch_status(o, status).await? {
            Some(o) => Ok(Some(decode(o, T::KIND)?)),
            None => Ok(None),
        }
    }

    /// Writes `status` (merged) if `o` is still at the resourceVersion it was read at:
    /// `true` when written, `false` when another writer came first.
    pub async fn set_status<T: Moved>(&self, o: &T, status: serde_json::Value) -> Result<bool> {
        Ok(self.patch_status(o, status).await?.is_some())
    }

    async fn patch_status<T: Moved>(&self, o: &T, status: serde_json::Value) -> Result<Option<DynamicObject>> {
        let name = &o.meta().name;
        let patch = json!({"metadata": {"resourceVersion": o.meta().resource_version}, "status": status});
        match self.api::<T>().patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(o) => Ok(Some(o)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
            Err(e) => Err(api_error(e, &format!("updating the status of {}", o.what()))),
        }
    }

    /// Merges `progress` into the status whatever its resourceVersion (progress only
    /// grows, and only the node running the transfer writes it).
    pub async fn set_progress<T: Moved>(&self, name: &str, total: u64, done: u64) -> Result<()> {
        let patch = json!({"status": {"progress": {"totalBytes": total, "bytesDone": done}}});
        self.api::<T>()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| api_error(e, &format!("updating the progress of {} {}/{name}", T::KIND, self.namespace)))
    }

    /// Waits until something changes in either kind after `rv` (a watch), or `timeout`.
    /// `Err` with a resource version too old (410 Expired) or any other failure: the caller
    /// lists again.
    pub async fn changes<T: Moved>(&self, rv: &str, timeout: std::time::Duration) -> Result<()> {
        use futures::StreamExt;
        let wp = kube::api::WatchParams::default().timeout(timeout.as_secs().clamp(1, 290) as u32);
        let what = format!("watching {}s in namespace {}", T::KIND, self.namespace);
        let mut stream = self.api::<T>().watch(&wp, rv).await.map_err(|e| api_error(e, &what))?.boxed();
        match stream.next().await {
            Some(Ok(kube::api::WatchEvent::Error(e))) => Err(Error::transient(format!("{what}: {} ({} {})", e.message, e.code, e.reason))),
            Some(Ok(_)) | None => Ok(()),
            Some(Err(e)) => Err(api_error(e, &what)),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(o: DynamicObject, kind: &str) -> Result<T> {
    let name = o.metadata.name.clone().unwrap_or_default();
    serde_json::to_value(&o).and_then(serde_json::from_value).map_err(|e| Error::invalid(format!("{kind} {name} does not read as one: {e}")))
}

/// The label on what Mover creates for a DataUpload (its name as the value).
pub const UPLOAD_LABEL: &str = "mover.io/data-upload";

/// What Mover creates for a DataUpload: a PVC and a pod of this name in the source
/// namespace.
pub fn exposure_name(du: &DataUpload) -> String {
    exposure_name_of(&du.metadata.name)
}

/// A volume exposed on this node: the hosting pod's uid and the PV bound to its claim,
/// which name the kubelet's entry for it (`pods/<uid>/volumeDevices/kubernetes.io~csi/<pv>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    pub pod_uid: String,
    pub pv: String,
}

fn snapshot_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", kind), plural)
}

fn core_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", kind), plural)
}

impl Cluster {
    /// VolumeSnapshotContents (cluster-scoped).
    fn contents(&self) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &snapshot_resource("VolumeSnapshotContent", "volumesnapshotcontents"))
    }

    fn namespaced(&self, ns: &str, ar: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, ar)
    }

    /// The image of pod `ns/name`'s container `mover` (or its first): the daemon's own,
    /// which the pods holding exposed volumes run.
    pub async fn pod_image(&self, ns: &str, name: &str) -> Result<String> {
        let what = format!("the daemon's own pod {ns}/{name}");
        let pod = self.namespaced(ns, &core_resource("Pod", "pods")).get(name).await.map_err(|e| api_error(e, &what))?;
        let containers = pod.data["spec"]["containers"].as_array().cloned().unwrap_or_default();
        let c = containers.iter().find(|c| c["name"] == "mover").or(containers.first());
        c.and_then(|c| c["image"].as_str()).map(str::to_string).ok_or_else(|| Error::permanent(format!("{what} names no image")))
    }

    /// The CSI handle of the DataUpload's snapshot (its content's `status.snapshotHandle`):
    /// recorded as the backup's checkpoint, the base of the next one's changed blocks.
    pub async fn snapshot_handle(&self, req: &super::reconcile::UploadRequest) -> Result<Option<String>> {
        let ns = &req.source_namespace;
        let what = format!("VolumeSnapshot {ns}/{}", req.volume_snapshot);
        let vs =
            self.namespaced(ns, &snapshot_resource("VolumeSnapshot", "volumesnapshots")).get(&req.volume_snapshot).await.map_err(|e| api_error(e, &what))?;
        let Some(content) = vs.data["status"]["boundVolumeSnapshotContentName"].as_str() else { return Ok(None) };
        let api = self.contents();
        let c = api.get(content).await.map_err(|e| api_error(e, &format!("VolumeSnapshotContent {content} of {what}")))?;
        Ok(c.data["status"]["snapshotHandle"].as_str().filter(|h| !h.is_empty()).map(str::to_string))
    }

    /// Checks the source claim's volume mode, as Velero's node-agent reads it before
    /// exposing (`pkg/controller/data_upload_controller.go` setupExposeParam): Block or
    /// Filesystem (unset: Filesystem) — both are exposed as Block — anything else is
    /// refused. A source claim deleted since its snapshot was taken is no obstacle.
    pub async fn check_source(&self, du: &DataUpload, req: &super::reconcile::UploadRequest) -> Result<()> {
        let (ns, name) = (&req.source_namespace, &req.source_pvc);
        let what = format!("source PersistentVolumeClaim {ns}/{name} of {}", du.what());
        match self.namespaced(ns, &core_resource("PersistentVolumeClaim", "persistentvolumeclaims")).get(name).await {
            Ok(p) => match p.data["spec"]["volumeMode"].as_str() {
                None | Some("Block") | Some("Filesystem") => Ok(()),
                Some(m) => Err(Error::invalid(format!("{what}: volumeMode '{m}' is neither Block nor Filesystem"))),
            },
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error(e, &what)),
        }
    }

    /// Creates the claim (a Block volume from the VolumeSnapshot, whatever the source's
    /// mode: Mover reads devices) and the pod that holds it on `node`. The snapshot must
    /// exist and be ready; what exists already (a preparation resumed) is kept.
    pub async fn expose(&self, du: &DataUpload, req: &super::reconcile::UploadRequest, node: &str, image: &str) -> Result<()> {
        let ns = &req.source_namespace;
        let vs_name = &req.volume_snapshot;
        let what = format!("VolumeSnapshot {ns}/{vs_name} of DataUpload {}/{}", self.namespace, du.metadata.name);
        let vs = self.namespaced(ns, &snapshot_resource("VolumeSnapshot", "volumesnapshots")).get(vs_name).await.map_err(|e| api_error(e, &what))?;
        let st = &vs.data["status"];
        if st["readyToUse"] != json!(true) {
            let why = st["error"]["message"].as_str().map(|m| format!(": {m}")).unwrap_or_default();
            return Err(Error::precondition(format!("{what} is not ready to use{why}")));
        }
        // A Quantity ("64Mi"), as VolumeSnapshot's status writes it.
        let size = match &st["restoreSize"] {
            serde_json::Value::String(s) if !s.is_empty() => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(Error::precondition(format!("{what} has no restoreSize"))),
        };
        // Mover reads devices: the claim is Block whatever the snapshot's source was, and
        // a claim whose mode differs from its snapshot's source needs the content to
        // allow it (external-snapshotter 7.0; the annotation as Kubernetes documents it).
        if let Some(content) = st["boundVolumeSnapshotContentName"].as_str() {
            let api = self.contents();
            let allow = json!({"metadata": {"annotations": {"snapshot.storage.kubernetes.io/allow-volume-mode-change": "true"}}});
            api.patch(content, &PatchParams::default(), &Patch::Merge(&allow))
                .await
                .map_err(|e| api_error(e, &format!("allowing a Block claim from VolumeSnapshotContent {content} of {what}")))?;
        }
        let name = exposure_name(du);
        let labels = json!({UPLOAD_LABEL: du.metadata.name});
        let mut pvc_spec = json!({
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Block",
            "resources": {"requests": {"storage": size}},
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": vs_name},
        });
        if !req.storage_class.is_empty() {
            pvc_spec["storageClassName"] = json!(req.storage_class);
        }
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": pvc_spec});
        let pod = holder_pod(&name, ns, &labels, node, image, true);
        self.create_all(ns, vec![pvc, pod], &du.what()).await
    }

    /// Creates each object in `ns`; one that exists already (a preparation resumed) is kept.
    async fn create_all(&self, ns: &str, objects: Vec<serde_json::Value>, owner: &str) -> Result<()> {
        for obj in objects {
            let kind = obj["kind"].as_str().unwrap_or_default().to_string();
            let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let ar = match kind.as_str() {
                "Pod" => core_resource("Pod", "pods"),
                _ => core_resource("PersistentVolumeClaim", "persistentvolumeclaims"),
            };
            let o: DynamicObject = serde_json::from_value(obj).map_err(|e| Error::permanent(format!("building the {kind}: {e}")))?;
            match self.namespaced(ns, &ar).create(&kube::api::PostParams::default(), &o).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {}
                Err(e) => return Err(api_error(e, &format!("creating {kind} {ns}/{name} for {owner}"))),
            }
        }
        Ok(())
    }

    /// The exposed volume once its pod runs and its claim is bound; `None` before.
    pub async fn exposed(&self, du: &DataUpload, req: &super::reconcile::UploadRequest) -> Result<Option<Exposed>> {
        self.held(&req.source_namespace, &exposure_name(du), &du.what()).await
    }

    /// Why the exposure pod of `du` does not run yet, when the scheduler said: `(true, why)`
    /// when it cannot be placed on this node (`PodScheduled` false, reason `Unschedulable`:
    /// a volume node affinity conflict, no room), `(false, why)` for another condition.
    pub async fn not_running(&self, ns: &str, name: &str) -> Result<Option<(bool, String)>> {
        let pod = match self.namespaced(ns, &core_resource("Pod", "pods")).get(name).await {
            Ok(p) => p,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(e) => return Err(api_error(e, &format!("pod {ns}/{name}"))),
        };
        let conds = pod.data["status"]["conditions"].as_array().cloned().unwrap_or_default();
        Ok(conds.iter().find(|c| c["type"] == "PodScheduled" && c["status"] == "False").map(|c| {
            let why = format!("pod {ns}/{name}: {} ({})", c["message"].as_str().unwrap_or(""), c["reason"].as_str().unwrap_or(""));
            (c["reason"] == "Unschedulable", why)
        }))
    }

    /// Deletes the exposure pod and claim of `du` (not the snapshot: another node exposes
    /// it again).
    pub async fn unexpose(&self, du: &DataUpload, req: &super::reconcile::UploadRequest) -> Result<()> {
        self.delete_exposure(&req.source_namespace, &exposure_name(du)).await
    }

    async fn delete_exposure(&self, ns: &str, name: &str) -> Result<()> {
        let dp = kube::api::DeleteParams::default();
        for (ar, kind) in [(core_resource("Pod", "pods"), "pod"), (core_resource("PersistentVolumeClaim", "persistentvolumeclaims"), "PersistentVolumeClaim")] {
            match self.namespaced(ns, &ar).delete(name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(api_error(e, &format!("deleting {kind} {ns}/{name}"))),
            }
        }
        Ok(())
    }

    /// The volume of claim `ns/name` held by pod `ns/name`, once the pod runs and the claim
    /// is bound.
    async fn held(&self, ns: &str, name: &str, owner: &str) -> Result<Option<Exposed>> {
        let what = format!("the exposure {ns}/{name} of {owner}");
        let pod = self.namespaced(ns, &core_resource("Pod", "pods")).get(name).await.map_err(|e| api_error(e, &what))?;
        let pvc = self.namespaced(ns, &core_resource("PersistentVolumeClaim", "persistentvolumeclaims")).get(name).await.map_err(|e| api_error(e, &what))?;
        let phase = pod.data["status"]["phase"].as_str().unwrap_or("Pending");
        if phase == "Failed" || phase == "Succeeded" {
            return Err(Error::permanent(format!("{what}: its pod ended ({phase})")));
        }
        let bound = pvc.data["status"]["phase"].as_str() == Some("Bound");
        match (phase, bound, pvc.data["spec"]["volumeName"].as_str(), pod.metadata.uid) {
            ("Running", true, Some(pv), Some(uid)) if !pv.is_empty() => Ok(Some(Exposed { pod_uid: uid, pv: pv.to_string() })),
            _ => Ok(None),
        }
    }

    /// Removes what the DataUpload left: the pod and claim Mover created, and the
    /// VolumeSnapshot with its content (the data-mover contract: the data moved, the
    /// snapshot goes). What is already gone is fine.
    pub async fn clean_up(&self, du: &DataUpload, req: &super::reconcile::UploadRequest) -> Result<()> {
        let (ns, name) = (&req.source_namespace, exposure_name(du));
        let vs_api = self.namespaced(ns, &snapshot_resource("VolumeSnapshot", "volumesnapshots"));
        let content = match vs_api.get(&req.volume_snapshot).await {
            Ok(vs) => vs.data["status"]["boundVolumeSnapshotContentName"].as_str().map(str::to_string),
            Err(_) => None,
        };
        let dp = kube::api::DeleteParams::default();
        let gone = |r: std::result::Result<_, kube::Error>, what: String| match r {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error(e, &what)),
        };
        self.delete_exposure(ns, &name).await?;
        gone(vs_api.delete(&req.volume_snapshot, &dp).await.map(|_| ()), format!("deleting VolumeSnapshot {ns}/{}", req.volume_snapshot))?;
        if let Some(c) = content {
            let api = self.contents();
            gone(api.delete(&c, &dp).await.map(|_| ()), format!("deleting VolumeSnapshotContent {c}"))?;
        }
        Ok(())
    }
}

/// The pod that holds claim `name` on `node` for Mover to read (or write) its device: a
/// required node affinity, not `spec.nodeName` (a WaitForFirstConsumer storage class binds
/// the claim only through the scheduler); no privileges; `mover hold` until deleted.
/// The pod reads nothing itself: Mover reads the device through the kubelet's entry.
fn holder_pod(name: &str, ns: &str, labels: &serde_json::Value, node: &str, image: &str, read_only: bool) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "hold", "image": image, "args": ["hold"],
                "volumeDevices": [{"name": "data", "devicePath": "/dev/mover-data"}],
                // The "restricted" Pod Security Standard (and OpenShift's restricted-v2,
                // which picks the uid): the image's own user is non-root.
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
                                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name, "readOnly": read_only}}],
        },
    })
}

/// The label on what Mover creates for a DataDownload (its name as the value).
pub const DOWNLOAD_LABEL: &str = "mover.io/data-download";

/// What Velero's rewritten target claim asks of the volume Mover provides: its storage
/// class, size, mode and access modes, and the labels its selector matches
/// (`velero.io/dynamic-pv-restore`).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetClaim {
    pub storage_class: String,
    pub size: String,
    pub volume_mode: String,
    pub access_modes: serde_json::Value,
    pub match_labels: serde_json::Map<String, serde_json::Value>,
}

impl Cluster {
    /// The target claim of a DataDownload. Velero creates it after the DataDownload, so a
    /// missing one is waited for (`precondition`).
    pub async fn target_claim(&self, dd: &super::types::DataDownload, req: &super::reconcile::DownloadRequest) -> Result<TargetClaim> {
        let (ns, name) = (&req.target_namespace, &req.target_pvc);
        let what = format!("target PersistentVolumeClaim {ns}/{name} of {}", dd.what());
        let pvc = match self.namespaced(ns, &core_resource("PersistentVolumeClaim", "persistentvolumeclaims")).get(name).await {
            Ok(p) => p,
            Err(kube::Error::Api(s)) if s.code == 404 => return Err(Error::precondition(format!("waiting for {what} to be created"))),
            Err(e) => return Err(api_error(e, &what)),
        };
        let spec = &pvc.data["spec"];
        let size = match &spec["resources"]["requests"]["storage"] {
            serde_json::Value::String(s) if !s.is_empty() => s.clone(),
            _ => return Err(Error::invalid(format!("{what} requests no storage size"))),
        };
        let volume_mode = spec["volumeMode"].as_str().unwrap_or("Filesystem").to_string();
        if volume_mode != "Filesystem" && volume_mode != "Block" {
            return Err(Error::invalid(format!("{what}: volumeMode '{volume_mode}' is neither Block nor Filesystem")));
        }
        Ok(TargetClaim {
            storage_class: spec["storageClassName"].as_str().unwrap_or_default().to_string(),
            size,
            volume_mode,
            access_modes: match &spec["accessModes"] {
                serde_json::Value::Array(a) if !a.is_empty() => serde_json::Value::Array(a.clone()),
                _ => json!(["ReadWriteOnce"]),
            },
            match_labels: spec["selector"]["matchLabels"].as_object().cloned().unwrap_or_default(),
        })
    }

    /// Creates, in Velero's namespace, a new Block claim of the target's storage class and
    /// size and the pod that holds it (writable) on `node`: Mover restores into its device.
    pub async fn expose_restore(&self, dd: &super::types::DataDownload, target: &TargetClaim, node: &str, image: &str) -> Result<()> {
        let (ns, name) = (self.namespace.clone(), exposure_name_of(&dd.metadata.name));
        let labels = json!({DOWNLOAD_LABEL: dd.metadata.name});
        let mut pvc_spec = json!({"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "resources": {"requests": {"storage": target.size}}});
        if !target.storage_class.is_empty() {
            pvc_spec["storageClassName"] = json!(target.storage_class);
        }
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": pvc_spec});
        let pod = holder_pod(&name, &ns, &labels, node, image, false);
        self.create_all(&ns, vec![pvc, pod], &dd.what()).await
    }

    /// The restore volume once its pod runs and its claim is bound.
    pub async fn restore_exposed(&self, dd: &super::types::DataDownload) -> Result<Option<Exposed>> {
        self.held(&self.namespace, &exposure_name_of(&dd.metadata.name), &dd.what()).await
    }

    /// Hands the restored volume to Velero's target claim, as Velero's own restore exposer
    /// does (`pkg/exposer/generic_restore.go` RebindVolume): the PV is retained, the pod
    /// and claim that held it deleted; then the PV is created anew for the target — same
    /// volume, the target's volume mode (Mover restored through a Block claim), a
    /// `claimRef` to the target and the labels its selector matches — the target claim is
    /// pointed at it (`pkg/util/kube/pvc_pv.go` RebindPVC, ResetPVBinding), and the
    /// original reclaim policy is put back. Returns the PV's name.
    pub async fn hand_over(&self, dd: &super::types::DataDownload, req: &super::reconcile::DownloadRequest, target: &TargetClaim) -> Result<String> {
        let (ns, name) = (self.namespace.clone(), exposure_name_of(&dd.metadata.name));
        let owner = dd.what();
        let pvcs = self.namespaced(&ns, &core_resource("PersistentVolumeClaim", "persistentvolumeclaims"));
        let pvs: Api<DynamicObject> = Api::all_with(self.client.clone(), &core_resource("PersistentVolume", "persistentvolumes"));
        let claim = pvcs.get(&name).await.map_err(|e| api_error(e, &format!("the restore claim {ns}/{name} of {owner}")))?;
        let pv_name = claim.data["spec"]["volumeName"].as_str().filter(|v| !v.is_empty()).map(str::to_string);
        let pv_name = pv_name.ok_or_else(|| Error::permanent(format!("the restore claim {ns}/{name} of {owner} is bound to no volume")))?;
        let what = format!("PersistentVolume {pv_name} restored for {owner}");
        let pv = pvs.get(&pv_name).await.map_err(|e| api_error(e, &what))?;
        let reclaim = pv.data["spec"]["persistentVolumeReclaimPolicy"].as_str().unwrap_or("Delete").to_string();
        let retain = json!({"spec": {"persistentVolumeReclaimPolicy": "Retain"}});
        pvs.patch(&pv_name, &PatchParams::default(), &Patch::Merge(&retain)).await.map_err(|e| api_error(e, &format!("retaining {what}")))?;
        self.delete_and_wait(&self.namespaced(&ns, &core_resource("Pod", "pods")), &name, &format!("pod {ns}/{name}")).await?;
        self.delete_and_wait(&pvcs, &name, &format!("PersistentVolumeClaim {ns}/{name}")).await?;
        self.delete_and_wait(&pvs, &pv_name, &what).await?;
        let mut spec = pv.data["spec"].clone();
        spec["volumeMode"] = json!(target.volume_mode);
        spec["persistentVolumeReclaimPolicy"] = json!(reclaim);
        spec["claimRef"] = json!({"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": req.target_namespace, "name": req.target_pvc});
        let mut labels = pv.metadata.labels.clone().unwrap_or_default();
        labels.remove(DOWNLOAD_LABEL);
        for (k, v) in &target.match_labels {
            labels.entry(k.clone()).or_insert_with(|| v.as_str().unwrap_or_default().to_string());
        }
        let new = json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name, "labels": labels}, "spec": spec});
        let o: DynamicObject = serde_json::from_value(new).map_err(|e| Error::permanent(format!("building {what}: {e}")))?;
        pvs.create(&kube::api::PostParams::default(), &o).await.map_err(|e| api_error(e, &format!("creating {what}")))?;
        let bind = json!({"spec": {"volumeName": pv_name}});
        self.namespaced(&req.target_namespace, &core_resource("PersistentVolumeClaim", "persistentvolumeclaims"))
            .patch(&req.target_pvc, &PatchParams::default(), &Patch::Merge(&bind))
            .await
            .map_err(|e| api_error(e, &format!("binding target PersistentVolumeClaim {}/{} to {what}", req.target_namespace, req.target_pvc)))?;
        Ok(pv_name)
    }

    /// Deletes `name` and waits (a minute at most) until the API server no longer has it.
    async fn delete_and_wait(&self, api: &Api<DynamicObject>, name: &str, what: &str) -> Result<()> {
        match api.delete(name, &kube::api::DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(api_error(e, &format!("deleting {what}"))),
        }
        let t0 = std::time::Instant::now();
        loop {
            match api.get(name).await {
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
                Err(e) => return Err(api_error(e, &format!("waiting for {what} to go"))),
                Ok(_) if t0.elapsed() > std::time::Duration::from_secs(60) => return Err(Error::transient(format!("{what} was not deleted within 60 s"))),
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    }

    /// Removes the restore pod and claim (what is gone already is fine).
    pub async fn clean_up_restore(&self, dd: &super::types::DataDownload) -> Result<()> {
        self.delete_exposure(&self.namespace.clone(), &exposure_name_of(&dd.metadata.name)).await
    }
}

fn exposure_name_of(name: &str) -> String {
    format!("mover-{name}")
}
