//! The Kubernetes API as the data mover uses it (the `kube` crate): DataUploads and
//! DataDownloads read and claimed. Status writes are merge patches to the `/status`
//! subresource carrying the `resourceVersion` the decision was made on, so two nodes that
//! decide at once cannot both win (the API server answers the second with 409).

use super::reconcile::format_time;
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

    fn uploads(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &resource("DataUpload", "datauploads"))
    }

    /// Every DataUpload in Velero's namespace.
    pub async fn list_uploads(&self) -> Result<Vec<DataUpload>> {
        let what = format!("listing DataUploads in namespace {}", self.namespace);
        let list = self.uploads().list(&ListParams::default()).await.map_err(|e| api_error(e, &what))?;
        list.items.into_iter().map(|o| decode(o, "DataUpload")).collect()
    }

    /// Races to accept `du` for `node`, as every node does: `Some(updated)` when this node
    /// won, `None` when another wrote first (the resourceVersion `du` was read at is stale).
    pub async fn accept_upload(&self, du: &DataUpload, node: &str, now_ms: u64) -> Result<Option<DataUpload>> {
        let name = &du.metadata.name;
        let patch = json!({
            "metadata": {"resourceVersion": du.metadata.resource_version},
            "status": {"phase": "Accepted", "acceptedByNode": node, "acceptedTimestamp": format_time(now_ms)},
        });
        let what = format!("accepting DataUpload {}/{name}", self.namespace);
        match self.uploads().patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(o) => Ok(Some(decode(o, "DataUpload")?)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
            Err(e) => Err(api_error(e, &what)),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(o: DynamicObject, kind: &str) -> Result<T> {
    let name = o.metadata.name.clone().unwrap_or_default();
    serde_json::to_value(&o).and_then(serde_json::from_value).map_err(|e| Error::invalid(format!("{kind} {name} does not read as one: {e}")))
}

/// A status change written only if the object is still at the resourceVersion it was
/// decided on.
impl Cluster {
    /// Writes `status` (merged) if `du` is still at the resourceVersion it was read at:
    /// `true` when written, `false` when another writer came first.
    pub async fn set_upload_status(&self, du: &DataUpload, status: serde_json::Value) -> Result<bool> {
        let name = &du.metadata.name;
        let patch = json!({"metadata": {"resourceVersion": du.metadata.resource_version}, "status": status});
        let what = format!("updating the status of DataUpload {}/{name}", self.namespace);
        match self.uploads().patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(api_error(e, &what)),
        }
    }
}

/// The label on what Mover creates for a DataUpload (its name as the value).
pub const UPLOAD_LABEL: &str = "mover.io/data-upload";

/// What Mover creates for a DataUpload: a PVC and a pod of this name in the source
/// namespace.
pub fn exposure_name(du: &DataUpload) -> String {
    format!("mover-{}", du.metadata.name)
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
    fn namespaced(&self, ns: &str, ar: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, ar)
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
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &snapshot_resource("VolumeSnapshotContent", "volumesnapshotcontents"));
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
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                // A required node affinity, not spec.nodeName: a WaitForFirstConsumer
                // storage class binds the claim only through the scheduler.
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "hold", "image": image, "args": ["hold"],
                    "volumeDevices": [{"name": "data", "devicePath": "/dev/mover-data"}],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true, "runAsUser": 65532, "capabilities": {"drop": ["ALL"]}},
                }],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name, "readOnly": true}}],
            },
        });
        for (obj, ar) in [(pvc, core_resource("PersistentVolumeClaim", "persistentvolumeclaims")), (pod, core_resource("Pod", "pods"))] {
            let kind = obj["kind"].as_str().unwrap_or_default().to_string();
            let o: DynamicObject = serde_json::from_value(obj).map_err(|e| Error::permanent(format!("building the {kind}: {e}")))?;
            match self.namespaced(ns, &ar).create(&kube::api::PostParams::default(), &o).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {}
                Err(e) => return Err(api_error(e, &format!("creating {kind} {ns}/{name} for DataUpload {}/{}", self.namespace, du.metadata.name))),
            }
        }
        Ok(())
    }

    /// The exposed volume once its pod runs and its claim is bound; `None` before.
    pub async fn exposed(&self, du: &DataUpload, req: &super::reconcile::UploadRequest) -> Result<Option<Exposed>> {
        let (ns, name) = (&req.source_namespace, exposure_name(du));
        let what = format!("the exposure {ns}/{name} of DataUpload {}/{}", self.namespace, du.metadata.name);
        let pod = self.namespaced(ns, &core_resource("Pod", "pods")).get(&name).await.map_err(|e| api_error(e, &what))?;
        let pvc = self.namespaced(ns, &core_resource("PersistentVolumeClaim", "persistentvolumeclaims")).get(&name).await.map_err(|e| api_error(e, &what))?;
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
        gone(self.namespaced(ns, &core_resource("Pod", "pods")).delete(&name, &dp).await.map(|_| ()), format!("deleting pod {ns}/{name}"))?;
        gone(
            self.namespaced(ns, &core_resource("PersistentVolumeClaim", "persistentvolumeclaims")).delete(&name, &dp).await.map(|_| ()),
            format!("deleting PersistentVolumeClaim {ns}/{name}"),
        )?;
        gone(vs_api.delete(&req.volume_snapshot, &dp).await.map(|_| ()), format!("deleting VolumeSnapshot {ns}/{}", req.volume_snapshot))?;
        if let Some(c) = content {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &snapshot_resource("VolumeSnapshotContent", "volumesnapshotcontents"));
            gone(api.delete(&c, &dp).await.map(|_| ()), format!("deleting VolumeSnapshotContent {c}"))?;
        }
        Ok(())
    }
}
