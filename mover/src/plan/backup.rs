//! A backup request → a validated [`BackupPlan`]: names and group checked, every source
//! resolved and opened (or, for NBD, its endpoint checked), changed extents checked
//! against the volume, the parent resolved and checked to hold every volume.

use super::{Env, NbdPolicy, MAX_METADATA_BYTES};
use crate::nbd::NbdUri;
use crate::sources::csi::CsiQuery;
use crate::sources::{CsiSource, FileSource, NbdSource};
use mover_engine::pipeline::backup::{validate_volume_name, BackupJob, ParentChoice, Tuning, VolumeInput};
use mover_engine::source::{validate_extents, Extents, VolumeSource};
use mover_engine::{Error, Result};
use mover_format::manifest::{default_group, validate_group};
use mover_format::Repository;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Where a volume is read from, as a request names it.
#[derive(Debug, Clone)]
pub enum SourceRef {
    /// A block device or image file.
    Path(PathBuf),
    /// A pod's volume under the kubelet root (filesystem mode: its `disk.img`; block
    /// mode: its device).
    PodVolume { uid: String, volume: String },
    /// An NBD export, optionally with a QEMU dirty bitmap holding the changes since the
    /// parent's checkpoint.
    Nbd { uri: String, bitmap: Option<String> },
    /// A KubeVirt pull-mode export of the disk; `pvc`, when given, is read instead if the
    /// export cannot be used.
    Kubevirt { export: Box<crate::sources::kubevirt::Export>, pvc: Option<Box<SourceRef>> },
    /// A KubeVirt push-mode output image (qcow2): a full backup's, or with `since` an
    /// incremental one holding the changes since that checkpoint.
    Qcow2 { path: PathBuf, since: Option<String> },
}

#[derive(Debug, Clone)]
pub struct VolumeRequest {
    pub name: String,
    pub source: SourceRef,
    /// Only these byte ranges may have changed since the parent (needs a parent).
    pub changed_extents: Option<Extents>,
    /// Ask the CSI SnapshotMetadata service which blocks are allocated or changed.
    pub csi: Option<CsiQuery>,
    /// Record this checkpoint (bitmap, CSI snapshot handle) for the next incremental.
    pub checkpoint: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct BackupRequest {
    /// What is protected; default: this host and the volume names.
    pub group: Option<String>,
    pub volumes: Vec<VolumeRequest>,
    /// A snapshot id or unique prefix, `latest` (of the group), or none.
    pub parent: Option<String>,
    pub metadata: Vec<(String, Vec<u8>)>,
    pub tags: BTreeMap<String, String>,
    pub tuning: Tuning,
    /// Upload limit in bytes per second (0: none of its own; the node's still applies).
    pub upload_limit: u64,
    /// Segments a change source called unchanged to read and compare anyway; `None`: the
    /// node's default.
    pub verify_sample: Option<usize>,
    /// Every Nth trusting backup reads everything; `None`: the node's default.
    pub compare_every: Option<u32>,
}

/// A validated backup: what the engine runs.
pub struct BackupPlan {
    pub group: String,
    pub volume_names: Vec<String>,
    pub job: BackupJob,
}

/// Validates `req` and opens its sources. Fails with an error naming the object, before
/// anything is read or written.
pub async fn prepare(req: BackupRequest, env: &Env, repo: &Repository, cancel: &CancellationToken) -> Result<BackupPlan> {
    if req.volumes.is_empty() {
        return Err(Error::invalid("nothing to back up: a backup needs at least one volume (give a source, a volume NAME=SOURCE or an NBD URI)"));
    }
    let mut names = HashSet::new();
    for v in &req.volumes {
        validate_volume_name(&v.name)?;
        if !names.insert(v.name.clone()) {
            return Err(Error::invalid(format!("volume name '{}' is given twice", v.name)));
        }
    }
    let group = match &req.group {
        Some(g) => {
            validate_group(g).map_err(Error::invalid)?;
            g.clone()
        }
        None => default_group(&mover_format::hostname(), req.volumes.iter().map(|v| v.name.as_str())),
    };
    let mut seen_md = HashSet::new();
    for (name, data) in &req.metadata {
        if name.is_empty() || name.contains('/') || !seen_md.insert(name) {
            return Err(Error::invalid(format!("metadata blob '{name}': needs a unique name without '/'")));
        }
        if data.len() > MAX_METADATA_BYTES {
            return Err(Error::invalid(format!("metadata blob '{name}' is {} bytes, more than {MAX_METADATA_BYTES}", data.len())));
        }
    }
    for (k, v) in &req.tags {
        if k.is_empty() || v.is_empty() {
            return Err(Error::invalid(format!("tag '{k}={v}' needs a key and a value")));
        }
    }

    // The parent, before opening sources: a request naming a missing parent fails first.
    let parent = match req.parent.as_deref() {
        None | Some("") => ParentChoice::None,
        Some("latest") => ParentChoice::Latest,
        Some(p) => {
            let id = repo.resolve_snapshot(p, cancel).await?;
            let m = repo.read_snapshot(&id, cancel).await?;
            for v in &req.volumes {
                // The parent exists; a volume it lacks makes the request wrong for it.
                mover_engine::snapshots::volume(&id, &m, &v.name).map_err(|e| Error::precondition(format!("parent {e}")))?;
            }
            ParentChoice::Id(id)
        }
    };
    if parent == ParentChoice::None {
        if let Some(v) = req.volumes.iter().find(|v| v.changed_extents.is_some()) {
            return Err(Error::precondition(format!("changed extents for volume '{}' need a parent snapshot (--parent)", v.name)));
        }
    }

    let mut volumes = Vec::new();
    for v in req.volumes {
        let what = format!("source of volume '{}'", v.name);
        let source: Box<dyn VolumeSource> = match v.source {
            SourceRef::Nbd { uri, bitmap } => {
                if v.changed_extents.is_some() || v.csi.is_some() {
                    return Err(Error::invalid(format!("volume '{}': an NBD source does not combine with changed extents or CSI", v.name)));
                }
                let uri = NbdUri::parse(&uri).map_err(|e| e.context(format!("volume '{}'", v.name)))?;
                let socket = nbd_allowed(env, &uri, &what)?;
                Box::new(NbdSource { uri, bitmap, options: env.nbd_options, socket })
            }
            SourceRef::Kubevirt { mut export, pvc } => {
                export.retry_for = env.backup.kubevirt_retry;
                if v.changed_extents.is_some() || v.csi.is_some() {
                    return Err(Error::invalid(format!("volume '{}': a KubeVirt export does not combine with changed extents or CSI", v.name)));
                }
                if let Some(hosts) = &env.kubevirt_hosts {
                    let hp = export.host_port();
                    if !hosts.iter().any(|pattern| crate::sources::kubevirt::host_matches(pattern, &hp)) {
                        return Err(Error::invalid(format!(
                            "{what}: KubeVirt export server {} is not among the hosts this node allows (kubevirt_export_hosts)",
                            export.host_port()
                        )));
                    }
                }
                if export.token.is_empty() || export.token.len() > 64 << 10 {
                    return Err(Error::invalid(format!("volume '{}': the KubeVirt export token must be 1 to 65536 bytes", v.name)));
                }
                let fallback = match pvc.map(|p| *p) {
                    None => None,
                    Some(SourceRef::Path(p)) => Some(FileSource { opened: env.paths.open_source(env.paths.resolve(&p, &what)?, &what)?, extents: None }),
                    Some(SourceRef::PodVolume { uid, volume }) => {
                        Some(FileSource { opened: env.paths.open_source(pod_volume(env, &uid, &volume, &what)?, &what)?, extents: None })
                    }
                    Some(_) => {
                        return Err(Error::invalid(format!("volume '{}': the PVC read instead of a KubeVirt export must be a path or pod volume", v.name)))
                    }
                };
                Box::new(crate::sources::kubevirt::KubevirtSource { export: *export, fallback })
            }
            SourceRef::Qcow2 { path, since } => {
                if v.changed_extents.is_some() || v.csi.is_some() {
                    return Err(Error::invalid(format!("volume '{}': a qcow2 image does not combine with changed extents or CSI", v.name)));
                }
                let r = env.paths.resolve(&path, &what)?;
                if r.kind != mover_engine::device::Kind::File {
                    return Err(Error::invalid(format!("{what} {}: a qcow2 image must be a regular file", r.label)));
                }
                let o = env.paths.open_source(r, &what)?;
                let kind = match since {
                    Some(s) if !s.is_empty() => crate::sources::qcow2::Qcow2Kind::Incremental { since: s },
                    _ => crate::sources::qcow2::Qcow2Kind::Full,
                };
                Box::new(crate::sources::qcow2::Qcow2Source { file: o.file, label: o.label, kind })
            }
            SourceRef::Path(p) => file_source(env, env.paths.resolve(&p, &what)?, v.changed_extents, v.csi, &v.name, &what)?,
            SourceRef::PodVolume { uid, volume } => file_source(env, pod_volume(env, &uid, &volume, &what)?, v.changed_extents, v.csi, &v.name, &what)?,
        };
        volumes.push(VolumeInput { name: v.name, source, checkpoint: v.checkpoint.filter(|c| !c.is_empty()), recorded: None });
    }
    let volume_names = volumes.iter().map(|v| v.name.clone()).collect();
    let mut tuning = req.tuning;
    tuning.verify_sample = req.verify_sample.unwrap_or(env.backup.verify_sample);
    tuning.compare_every = req.compare_every.unwrap_or(env.backup.compare_every);
    tuning.limiters = env.limiters(req.upload_limit);
    Ok(BackupPlan {
        group: group.clone(),
        volume_names,
        job: BackupJob { group, volumes, parent, metadata: req.metadata, tags: req.tags, tuning, copy_of: None },
    })
}

/// A pod's volume, resolved under the kubelet root (the daemon only).
fn pod_volume(env: &Env, uid: &str, volume: &str, what: &str) -> Result<crate::sources::file::Resolved> {
    match &env.paths {
        crate::sources::file::PathPolicy::Confined(c) => c.pod_volume(uid, volume, what),
        _ => Err(Error::invalid(format!("{what}: pod volumes are resolved by the daemon only"))),
    }
}

/// The node's SnapshotMetadata service for `driver` (a node may run several CBT-capable
/// CSI drivers, each with its own service); without a driver, the only one configured.
pub(crate) fn csi_service(env: &Env, driver: Option<&str>, name: &str) -> Result<crate::sources::csi::CsiService> {
    let known = || env.csi.iter().map(|(d, _)| d.as_deref().unwrap_or("[csi]").to_string()).collect::<Vec<_>>().join(", ");
    if env.csi.is_empty() {
        return Err(Error::precondition(format!(
            "volume '{name}': CSI changed-block tracking is not configured on this node (the service comes from the configuration, never from a request)"
        )));
    }
    match driver {
        Some(d) => env.csi.iter().find(|(k, _)| k.as_deref() == Some(d)).map(|(_, s)| s.clone()).ok_or_else(|| {
            Error::precondition(format!(
                "volume '{name}': no SnapshotMetadata service is configured for CSI driver '{d}' on this node (configured: {})",
                known()
            ))
        }),
        None if env.csi.len() == 1 => Ok(env.csi[0].1.clone()),
        None => env.csi.iter().find(|(k, _)| k.is_none()).map(|(_, s)| s.clone()).ok_or_else(|| {
            Error::invalid(format!("volume '{name}': this node has SnapshotMetadata services for several CSI drivers ({}): name the driver", known()))
        }),
    }
}

/// Opens a resolved file or device source, with its changed extents or CSI query.
fn file_source(
    env: &Env,
    resolved: crate::sources::file::Resolved,
    extents: Option<Extents>,
    csi: Option<CsiQuery>,
    name: &str,
    what: &str,
) -> Result<Box<dyn VolumeSource>> {
    let opened = env.paths.open_source(resolved, what)?;
    if let Some(ext) = &extents {
        validate_extents(name, ext, opened.size)?;
    }
    let inner = FileSource { opened, extents };
    match csi {
        None => Ok(Box::new(inner)),
        Some(_) if inner.extents.is_some() => Err(Error::invalid(format!("volume '{name}': changed extents and CSI do not combine"))),
        Some(query) => {
            let service = csi_service(env, query.driver.as_deref(), name)?;
            if query.snapshot.is_empty() {
                return Err(Error::invalid(format!("volume '{name}': CSI needs the VolumeSnapshot name")));
            }
            Ok(Box::new(CsiSource { inner, service, query }))
        }
    }
}

/// Checks an NBD endpoint against the node's policy; for a confined unix socket, returns
/// it resolved.
fn nbd_allowed(env: &Env, uri: &NbdUri, what: &str) -> Result<Option<crate::sources::file::SocketPath>> {
    match (&env.nbd, &uri.target) {
        (NbdPolicy::Any, _) => Ok(None),
        (NbdPolicy::Confined { .. }, crate::nbd::Target::Unix(p)) => env.paths.resolve_socket(std::path::Path::new(p), &format!("{what}: NBD socket")),
        (NbdPolicy::Confined { tcp }, crate::nbd::Target::Tcp(hp)) => {
            if tcp.iter().any(|t| t == hp) {
                Ok(None)
            } else {
                Err(Error::invalid(format!("{what}: NBD server {hp} is not among the TCP endpoints this node allows (nbd_tcp_endpoints)")))
            }
        }
    }
}
