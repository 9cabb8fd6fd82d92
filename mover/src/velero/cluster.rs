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
