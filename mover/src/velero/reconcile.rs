//! What a node does next with a DataUpload or DataDownload, as pure functions of the
//! object, the node's name, whether this process runs its transfer, and the time. The
//! rules follow Velero's own node-agent (`pkg/controller/data_upload_controller.go`,
//! `data_download_controller.go`): every node races to accept a `New` object with an
//! update that carries its `resourceVersion` (a 409 means another node won); the node that
//! accepted prepares it; `spec.cancel` is honoured in every phase; a preparation that does
//! not finish in time fails — decided by any node, so a node that died after accepting
//! does not leave it waiting — and says why.

use super::types::{DataDownload, DataUpload, Phase, DATA_MOVER};
use std::time::Duration;

/// The claim-related state either kind carries.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub data_mover: &'a str,
    pub phase: Phase,
    pub cancel: bool,
    pub accepted_by: &'a str,
    /// `status.acceptedTimestamp`, in ms since the epoch (unparsable: `None`).
    pub accepted_ms: Option<u64>,
    /// `status.node`: where it is prepared and runs.
    pub node: &'a str,
}

/// What the node's pass needs of either kind: the claim, and the request checked.
pub trait Moved: serde::de::DeserializeOwned + Clone + Send + Sync + 'static {
    const KIND: &'static str;
    const PLURAL: &'static str;
    fn meta(&self) -> &super::types::ObjectMeta;
    fn claim(&self) -> Claim<'_>;
    fn start_timestamp(&self) -> Option<&str>;
    /// The request checked before anything is created for it: the BackupStorageLocation
    /// it names, or the `Failed` message (naming the object and the field).
    fn location(&self) -> Result<String, String>;
    /// `KIND namespace/name`, for messages.
    fn what(&self) -> String {
        format!("{} {}/{}", Self::KIND, self.meta().namespace, self.meta().name)
    }
}

/// Both kinds carry the claim in the same fields.
macro_rules! claim_of {
    ($kind:ty, $plural:literal, $check:ident) => {
        impl Moved for $kind {
            const KIND: &'static str = stringify!($kind);
            const PLURAL: &'static str = $plural;
            fn meta(&self) -> &super::types::ObjectMeta {
                &self.metadata
            }
            fn claim(&self) -> Claim<'_> {
                let s = &self.status;
                Claim {
                    data_mover: &self.spec.data_mover,
                    phase: s.phase,
                    cancel: self.spec.cancel,
                    accepted_by: &s.accepted_by_node,
                    accepted_ms: s.accepted_timestamp.as_deref().and_then(parse_time_ms),
                    node: &s.node,
                }
            }
            fn start_timestamp(&self) -> Option<&str> {
                self.status.start_timestamp.as_deref()
            }
            fn location(&self) -> Result<String, String> {
                $check(self).map(|r| r.location)
            }
        }
    };
}
claim_of!(DataUpload, "datauploads", upload_request);
claim_of!(DataDownload, "datadownloads", download_request);

/// The next step for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Another data mover's object.
    NotOurs,
    /// Completed, Failed or Canceled: only leftovers to clean up.
    Done,
    /// Not this node's to act on now (another node's, or this node's work under way).
    Wait,
    /// Race to accept it (also after a node released it).
    Accept,
    /// Cancelled before it ran: Canceled, and clean up what was exposed.
    Cancel,
    /// Accepted here: expose the volume and get it ready.
    Prepare,
    /// Accepted (by any node) longer ago than the prepare timeout: Failed, with why.
    PrepareTimedOut,
    /// Prepared here: run the transfer.
    Run,
    /// Running here and cancelled: Canceling, and cancel the transfer.
    CancelRunning,
    /// In progress on this node but not running in this process (the daemon restarted):
    /// run it again; what was uploaded is found again and not sent twice.
    Resume,
}

pub fn step(c: Claim<'_>, me: &str, running_here: bool, now_ms: u64, prepare_timeout: Duration) -> Step {
    if c.data_mover != DATA_MOVER {
        return Step::NotOurs;
    }
    let mine = |n: &str| n == me;
    let timed_out = c.accepted_ms.is_some_and(|t| now_ms.saturating_sub(t) >= prepare_timeout.as_millis() as u64);
    match c.phase {
        Phase::Completed | Phase::Failed | Phase::Canceled => Step::Done,
        Phase::Unknown => Step::Wait,
        Phase::New if c.cancel => Step::Cancel,
        // Released by a node that could not reach its volume: the first acceptance's time
        // still bounds how long preparing may take, across nodes.
        Phase::New if timed_out => Step::PrepareTimedOut,
        Phase::New => Step::Accept,
        Phase::Accepted if mine(c.accepted_by) && c.cancel => Step::Cancel,
        Phase::Accepted if timed_out => Step::PrepareTimedOut,
        Phase::Accepted if mine(c.accepted_by) && !running_here => Step::Prepare,
        Phase::Accepted => Step::Wait,
        Phase::Prepared if mine(c.node) && c.cancel => Step::Cancel,
        Phase::Prepared if mine(c.node) && !running_here => Step::Run,
        Phase::Prepared => Step::Wait,
        Phase::InProgress if mine(c.node) && c.cancel && running_here => Step::CancelRunning,
        Phase::InProgress if mine(c.node) && c.cancel => Step::Cancel,
        Phase::InProgress if mine(c.node) && !running_here => Step::Resume,
        Phase::InProgress => Step::Wait,
        Phase::Canceling if mine(c.node) && !running_here => Step::Cancel,
        Phase::Canceling => Step::Wait,
    }
}

/// What a DataUpload asks for, checked: the snapshot to expose and where the backup goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRequest {
    pub volume_snapshot: String,
    pub storage_class: String,
    pub driver: String,
    pub source_namespace: String,
    pub source_pvc: String,
    /// `spec.backupStorageLocation`: names the repository (`[velero] repositories`).
    pub location: String,
    /// The snapshot group: `<sourceNamespace>/<sourcePVC>`.
    pub group: String,
}

/// The first of `fields` (spec field, value) that is empty, as `object`'s `Failed` message.
fn required(object: &str, fields: &[(&str, &String)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| v.is_empty()) {
        Some((field, _)) => Err(format!("{object}: spec.{field} is missing")),
        None => Ok(()),
    }
}

/// Checks a DataUpload before anything is created for it; the error is its `Failed`
/// message and names the object.
pub fn upload_request(du: &DataUpload) -> Result<UploadRequest, String> {
    let name = format!("DataUpload {}/{}", du.metadata.namespace, du.metadata.name);
    let s = &du.spec;
    if s.snapshot_type != "CSI" {
        return Err(format!("{name}: snapshotType '{}' is not supported (only CSI)", s.snapshot_type));
    }
    let Some(csi) = s.csi_snapshot.as_ref().filter(|c| !c.volume_snapshot.is_empty()) else {
        return Err(format!("{name}: spec.csiSnapshot.volumeSnapshot is missing"));
    };
    required(&name, &[("sourceNamespace", &s.source_namespace), ("sourcePVC", &s.source_pvc), ("backupStorageLocation", &s.backup_storage_location)])?;
    Ok(UploadRequest {
        volume_snapshot: csi.volume_snapshot.clone(),
        storage_class: csi.storage_class.clone(),
        driver: csi.driver.clone(),
        source_namespace: s.source_namespace.clone(),
        source_pvc: s.source_pvc.clone(),
        location: s.backup_storage_location.clone(),
        group: format!("{}/{}", s.source_namespace, s.source_pvc),
    })
}

/// What a DataDownload asks for, checked: the backup its `snapshotID` names and the PVC
/// Velero's restore created for it (whose selector the PV Mover creates must match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRequest {
    pub snapshot: SnapshotRef,
    pub target_namespace: String,
    pub target_pvc: String,
    /// `spec.backupStorageLocation`: names the repository on this node.
    pub location: String,
}

/// Checks a DataDownload before anything is created for it; the error is its `Failed`
/// message and names the object. Velero passes a restore nothing but `snapshotID` (not
/// `dataMoverResult`), so everything must come from it.
pub fn download_request(dd: &DataDownload) -> Result<DownloadRequest, String> {
    let name = format!("DataDownload {}/{}", dd.metadata.namespace, dd.metadata.name);
    let s = &dd.spec;
    let snapshot = SnapshotRef::parse(&s.snapshot_id).map_err(|e| format!("{name}: {e}"))?;
    required(
        &name,
        &[
            ("targetVolume.namespace", &s.target_volume.namespace),
            ("targetVolume.pvc", &s.target_volume.pvc),
            ("backupStorageLocation", &s.backup_storage_location),
        ],
    )?;
    Ok(DownloadRequest {
        snapshot,
        target_namespace: s.target_volume.namespace.clone(),
        target_pvc: s.target_volume.pvc.clone(),
        location: s.backup_storage_location.clone(),
    })
}

/// Everything a DataDownload needs to find a backup, from `snapshotID` alone (Velero passes
/// a restore nothing else): the repository by its id — so any cluster whose Mover has it
/// configured, under any name, can restore — the snapshot and the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub repository_id: String,
    pub snapshot: String,
    pub volume: String,
}

const SNAPSHOT_REF_PREFIX: &str = "mover1";

impl SnapshotRef {
    pub fn encode(&self) -> String {
        format!("{SNAPSHOT_REF_PREFIX}:{}:{}:{}", self.repository_id, self.snapshot, self.volume)
    }

    /// Parses what [`SnapshotRef::encode`] wrote; anything else is refused with why.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("snapshotID '{s}' is not one Mover wrote ({why})");
        let mut it = s.splitn(4, ':');
        if it.next() != Some(SNAPSHOT_REF_PREFIX) {
            return Err(bad("it does not start with 'mover1:'"));
        }
        let (Some(repo), Some(snap), Some(vol)) = (it.next(), it.next(), it.next()) else {
            return Err(bad("it needs repository, snapshot and volume"));
        };
        let hex = |x: &str| !x.is_empty() && x.len() <= 64 && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(repo) || !hex(snap) {
            return Err(bad("the repository and snapshot are hexadecimal ids"));
        }
        if vol.is_empty() || vol.contains(['/', ':']) {
            return Err(bad("the volume name is empty or holds '/' or ':'"));
        }
        Ok(Self { repository_id: repo.into(), snapshot: snap.into(), volume: vol.into() })
    }
}

/// An RFC 3339 time as Kubernetes writes it (`2026-12-06T10:00:00Z`, optionally with
/// fractional seconds), in ms since the epoch.
pub fn parse_time_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || !(0..=23).contains(&hh) || !(0..=59).contains(&mm) || !(0..=60).contains(&ss) {
        return None;
    }
    let ms = match frac {
        "" => 0,
        f if f.bytes().all(|b| b.is_ascii_digit()) => format!("{:0<3}", &f[..f.len().min(3)]).parse::<i64>().ok()?,
        _ => return None,
    };
    let days = mover_engine::timeutil::days_from_civil(y, m as u32, day as u32);
    u64::try_from(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms).ok()
}

/// `ms` since the epoch as Kubernetes writes a time (`metav1.Time`: seconds, UTC).
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = mover_engine::timeutil::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::velero::types::*;

    const T: Duration = Duration::from_secs(300);

    fn du(phase: Phase, cancel: bool, accepted_by: &str, node: &str) -> DataUpload {
        let mut d = DataUpload::default();
        d.spec.data_mover = DATA_MOVER.into();
        d.spec.cancel = cancel;
        d.status.phase = phase;
        d.status.accepted_by_node = accepted_by.into();
        d.status.accepted_timestamp = Some(format_time(1_000_000));
        d.status.node = node.into();
        d
    }

    #[test]
    fn each_node_acts_only_on_what_is_its_own() {
        let now = 1_000_000 + 1000;
        let s = |d: &DataUpload, running| step(d.claim(), "n1", running, now, T);
        let mut other = du(Phase::New, false, "", "");
        other.spec.data_mover = "velero".into();
        assert_eq!(s(&other, false), Step::NotOurs, "Velero's own is not ours");
        assert_eq!(s(&du(Phase::New, false, "", ""), false), Step::Accept);
        assert_eq!(s(&du(Phase::New, true, "", ""), false), Step::Cancel, "cancelled before any node took it");
        assert_eq!(s(&du(Phase::Accepted, false, "n1", ""), false), Step::Prepare);
        assert_eq!(s(&du(Phase::Accepted, false, "n1", ""), true), Step::Wait, "already preparing");
        assert_eq!(s(&du(Phase::Accepted, false, "n2", ""), false), Step::Wait, "another node's");
        assert_eq!(s(&du(Phase::Prepared, false, "n1", "n1"), false), Step::Run);
        assert_eq!(s(&du(Phase::Prepared, false, "n2", "n2"), false), Step::Wait);
        assert_eq!(s(&du(Phase::InProgress, true, "n1", "n1"), true), Step::CancelRunning);
        assert_eq!(s(&du(Phase::InProgress, false, "n1", "n1"), false), Step::Resume, "after a restart it runs again");
        assert_eq!(s(&du(Phase::InProgress, true, "n1", "n1"), false), Step::Cancel, "cancelled while the daemon was down");
        assert_eq!(s(&du(Phase::InProgress, false, "n2", "n2"), false), Step::Wait);
        assert_eq!(s(&du(Phase::Canceling, true, "n1", "n1"), false), Step::Cancel, "the transfer is gone: finish the cancel");
        for p in [Phase::Completed, Phase::Failed, Phase::Canceled] {
            assert_eq!(s(&du(p, false, "n1", "n1"), false), Step::Done);
        }
        assert_eq!(s(&du(Phase::Unknown, false, "n1", "n1"), false), Step::Wait);
    }

    #[test]
    fn a_preparation_past_its_timeout_fails_on_any_node() {
        let late = 1_000_000 + T.as_millis() as u64;
        assert_eq!(step(du(Phase::Accepted, false, "n2", "").claim(), "n1", false, late, T), Step::PrepareTimedOut, "the accepting node may be dead");
        assert_eq!(step(du(Phase::Accepted, false, "n1", "").claim(), "n1", true, late, T), Step::PrepareTimedOut);
        assert_eq!(step(du(Phase::Accepted, false, "n1", "").claim(), "n1", true, late - 1, T), Step::Wait);
    }

    /// A DataUpload released by a node that could not reach its volume is `New` again
    /// with its first acceptance's time: another node accepts it, and the prepare timeout
    /// still counts from that first acceptance.
    #[test]
    fn a_released_upload_is_accepted_again_within_the_first_prepare_timeout() {
        const T: Duration = Duration::from_secs(300);
        let mut d = du(Phase::New, false, "", "");
        d.status.accepted_timestamp = Some(format_time(1_000_000));
        assert_eq!(step(d.claim(), "n2", false, 1_000_000 + 299_000, T), Step::Accept);
        assert_eq!(step(d.claim(), "n2", false, 1_000_000 + 300_000, T), Step::PrepareTimedOut);
    }

    #[test]
    fn a_malformed_upload_is_refused_naming_the_object_and_the_field() {
        let mut d = du(Phase::New, false, "", "");
        d.metadata = ObjectMeta { name: "du-1".into(), namespace: "velero".into(), ..Default::default() };
        d.spec.snapshot_type = "CSI".into();
        d.spec.source_namespace = "vms".into();
        d.spec.source_pvc = "web-disk".into();
        d.spec.backup_storage_location = "default".into();
        let e = upload_request(&d).unwrap_err();
        assert!(e.contains("velero/du-1") && e.contains("volumeSnapshot"), "{e}");
        d.spec.csi_snapshot = Some(CsiSnapshotSpec { volume_snapshot: "snap-1".into(), ..Default::default() });
        let r = upload_request(&d).unwrap();
        assert_eq!(r.group, "vms/web-disk");
        d.spec.snapshot_type = "FS".into();
        assert!(upload_request(&d).unwrap_err().contains("snapshotType 'FS'"));
        d.spec.snapshot_type = "CSI".into();
        d.spec.source_pvc.clear();
        assert!(upload_request(&d).unwrap_err().contains("spec.sourcePVC"));
    }

    #[test]
    fn upstream_json_reads_and_phases_map() {
        // The shape Velero writes (field names from data_upload_types.go).
        let j = r#"{"apiVersion":"velero.io/v2alpha1","kind":"DataUpload","metadata":{"name":"b-1-x","namespace":"velero","resourceVersion":"7","uid":"u"},
            "spec":{"snapshotType":"CSI","csiSnapshot":{"volumeSnapshot":"vs","storageClass":"sc","snapshotClass":"vsc","driver":"d"},
            "sourcePVC":"disk","datamover":"mover","backupStorageLocation":"default","sourceNamespace":"vms","operationTimeout":"10m0s"},
            "status":{"phase":"","progress":{}}}"#;
        let d: DataUpload = serde_json::from_str(j).unwrap();
        assert_eq!(d.status.phase, Phase::New, "an empty phase is New");
        assert_eq!(d.spec.source_pvc, "disk");
        assert_eq!(d.spec.csi_snapshot.as_ref().unwrap().volume_snapshot, "vs");
        let d: DataUpload = serde_json::from_str(r#"{"status":{"phase":"SomethingNew"}}"#).unwrap();
        assert_eq!(d.status.phase, Phase::Unknown);
        let d: DataDownload = serde_json::from_str(
            r#"{"spec":{"targetVolume":{"pvc":"p","pv":"","namespace":"n"},"snapshotID":"x","datamover":"mover"},"status":{"phase":"InProgress"}}"#,
        )
        .unwrap();
        assert_eq!((d.spec.target_volume.pvc.as_str(), d.spec.snapshot_id.as_str(), d.status.phase), ("p", "x", Phase::InProgress));
        let st = serde_json::to_value(DataUploadStatus { snapshot_id: "s".into(), ..Default::default() }).unwrap();
        assert_eq!(st["snapshotID"], "s");
        assert_eq!(st["nodeOS"], "");
    }

    #[test]
    fn a_download_is_checked_from_its_snapshot_id_alone() {
        let mut d = DataDownload { metadata: ObjectMeta { name: "dd-1".into(), namespace: "velero".into(), ..Default::default() }, ..Default::default() };
        d.spec.data_mover = DATA_MOVER.into();
        d.spec.snapshot_id = "kopia-abc".into();
        d.spec.target_volume = TargetVolumeSpec { pvc: "disk".into(), pv: String::new(), namespace: "vms-restored".into() };
        d.spec.backup_storage_location = "default".into();
        let e = download_request(&d).unwrap_err();
        assert!(e.contains("DataDownload velero/dd-1") && e.contains("not one Mover wrote"), "{e}");
        let r = SnapshotRef { repository_id: "ab".into(), snapshot: "cd".into(), volume: "disk".into() };
        d.spec.snapshot_id = r.encode();
        let req = download_request(&d).unwrap();
        assert_eq!((req.snapshot, req.target_namespace.as_str(), req.target_pvc.as_str()), (r, "vms-restored", "disk"));
        d.spec.target_volume.pvc.clear();
        assert!(download_request(&d).unwrap_err().contains("spec.targetVolume.pvc is missing"));
    }

    #[test]
    fn a_snapshot_ref_round_trips_and_junk_is_refused() {
        let r = SnapshotRef { repository_id: "ab12".into(), snapshot: "cd34ef".into(), volume: "disk-0".into() };
        assert_eq!(SnapshotRef::parse(&r.encode()).unwrap(), r);
        for bad in ["", "kopia-123", "mover1:ab12:cd34", "mover1:zz:cd:disk", "mover1:ab:cd:", "mover1:ab:cd:a:b", "mover2:ab:cd:disk"] {
            assert!(SnapshotRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kubernetes_times_round_trip() {
        for ms in [0u64, 951_782_400_000, 1_796_560_000_000] {
            assert_eq!(parse_time_ms(&format_time(ms)), Some(ms));
        }
        assert_eq!(parse_time_ms("2026-12-06T10:00:00Z"), Some(1_796_551_200_000));
        assert_eq!(parse_time_ms("2026-12-06T10:00:00.25Z"), Some(1_796_551_200_250));
        assert_eq!(format_time(1_796_551_200_999), "2026-12-06T10:00:00Z");
        for bad in ["", "2026-12-06", "2026-13-06T10:00:00Z", "2026-12-06T-1:00:00Z", "2026-12-06T10:00:00+01:00", "2026-12-06T10:00:00.x1Z"] {
            assert_eq!(parse_time_ms(bad), None, "{bad}");
        }
    }
}
