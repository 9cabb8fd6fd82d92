//! Velero's `velero.io/v2alpha1` DataUpload and DataDownload, as far as a data mover reads
//! and writes them. Field names and phases follow upstream
//! (`vmware-tanzu/velero`: `pkg/apis/velero/v2alpha1/data_upload_types.go`,
//! `data_download_types.go`, `pkg/apis/velero/shared/data_move_operation_progress.go`).
//! Status is written with merge patches carrying `metadata.resourceVersion` (a stale one is
//! a 409, as upstream's `Update` is), so fields this module does not know are never lost.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The API group and version of both kinds.
pub const API_VERSION: &str = "velero.io/v2alpha1";
/// The value of `spec.datamover` Mover reconciles (Velero's node-agent ignores it).
pub const DATA_MOVER: &str = "mover";

/// The part of `metadata` the controller uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub resource_version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub finalizers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
}

/// A DataUpload's or DataDownload's phase. An absent or empty phase is `New`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    #[default]
    #[serde(alias = "")]
    New,
    Accepted,
    Prepared,
    InProgress,
    Canceling,
    Canceled,
    Completed,
    Failed,
    /// A phase this version does not know: left alone.
    #[serde(other)]
    Unknown,
}

impl Phase {
    /// Completed, Failed or Canceled: nothing more happens to it.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Canceled)
    }
}

/// `shared.DataMoveOperationProgress`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    #[serde(default)]
    pub total_bytes: i64,
    #[serde(default)]
    pub bytes_done: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CsiSnapshotSpec {
    #[serde(default)]
    pub volume_snapshot: String,
    #[serde(default)]
    pub storage_class: String,
    #[serde(default)]
    pub snapshot_class: String,
    #[serde(default)]
    pub driver: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataUploadSpec {
    #[serde(default)]
    pub snapshot_type: String,
    #[serde(default)]
    pub csi_snapshot: Option<CsiSnapshotSpec>,
    #[serde(default, rename = "sourcePVC")]
    pub source_pvc: String,
    #[serde(default, rename = "datamover")]
    pub data_mover: String,
    #[serde(default)]
    pub backup_storage_location: String,
    #[serde(default)]
    pub source_namespace: String,
    #[serde(default)]
    pub data_mover_config: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub cancel: bool,
    /// A Go duration ("10m0s").
    #[serde(default)]
    pub operation_timeout: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataUploadStatus {
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub path: String,
    #[serde(default, rename = "snapshotID")]
    pub snapshot_id: String,
    #[serde(default)]
    pub data_mover_result: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub start_timestamp: Option<String>,
    #[serde(default)]
    pub completion_timestamp: Option<String>,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub incremental_bytes: i64,
    #[serde(default)]
    pub node: String,
    #[serde(default, rename = "nodeOS")]
    pub node_os: String,
    #[serde(default)]
    pub accepted_by_node: String,
    #[serde(default)]
    pub accepted_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataUpload {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DataUploadSpec,
    #[serde(default)]
    pub status: DataUploadStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetVolumeSpec {
    #[serde(default)]
    pub pvc: String,
    #[serde(default)]
    pub pv: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataDownloadSpec {
    #[serde(default)]
    pub target_volume: TargetVolumeSpec,
    #[serde(default)]
    pub backup_storage_location: String,
    #[serde(default, rename = "datamover")]
    pub data_mover: String,
    #[serde(default, rename = "snapshotID")]
    pub snapshot_id: String,
    #[serde(default)]
    pub source_namespace: String,
    #[serde(default)]
    pub data_mover_config: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub cancel: bool,
    #[serde(default)]
    pub operation_timeout: String,
    #[serde(default)]
    pub snapshot_size: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataDownloadStatus {
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub start_timestamp: Option<String>,
    #[serde(default)]
    pub completion_timestamp: Option<String>,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub accepted_by_node: String,
    #[serde(default)]
    pub accepted_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataDownload {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DataDownloadSpec,
    #[serde(default)]
    pub status: DataDownloadStatus,
}
