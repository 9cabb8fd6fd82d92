//! Where a backup's bytes come from, and what changed, side by side:
//!
//! - [`file`] — a block device or a `disk.img` file (resolved once, read by descriptor),
//!   with changed extents the caller gives ([`extents`]);
//! - [`nbd`] — an NBD export (QEMU dirty bitmaps, `base:allocation`);
//! - [`csi`] — CSI SnapshotMetadata (KEP-3314) for a file or device source;
//! - [`kubevirt`] — KubeVirt's backup API in pull mode (map and data endpoints), with the
//!   disk's PVC to fall back to;
//! - [`qcow2`] — KubeVirt's push-mode output images (full, or only the changed clusters).
//!
//! Each becomes an engine [`VolumeSource`]; the engine decides, once for all of them,
//! whether the changes they report may be trusted.

pub mod csi;
pub mod extents;
pub mod file;
pub mod kubevirt;
pub mod nbd;
pub mod qcow2;

use mover_engine::source::{Changes, Extents, Opened, ParentVolume, Reader, VolumeSource};
use mover_engine::Result;
use mover_format::manifest::ChangeSource;
use tokio_util::sync::CancellationToken;

/// A file or block device, already opened and checked, with the caller's changed extents.
pub struct FileSource {
    pub opened: file::OpenedSource,
    pub extents: Option<Extents>,
}

#[async_trait::async_trait]
impl VolumeSource for FileSource {
    fn describe(&self) -> String {
        self.opened.label.clone()
    }
    async fn open(self: Box<Self>, _parent: Option<ParentVolume<'_>>, _cancel: &CancellationToken) -> Result<Opened> {
        let changes = match self.extents {
            Some(e) => Changes { source: Some(ChangeSource::Extents), changed: Some(e), since: None, fallback: None, sparse: false, ..Default::default() },
            None => Changes::default(),
        };
        Ok(Opened { size: self.opened.size, reader: Reader::File(self.opened.file), allocated: None, changes })
    }
}

/// A file or device source whose allocated (full) or changed (incremental) blocks a CSI
/// SnapshotMetadata service reports.
pub struct CsiSource {
    pub inner: FileSource,
    pub service: csi::CsiService,
    pub query: csi::CsiQuery,
}

#[async_trait::async_trait]
impl VolumeSource for CsiSource {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn open(self: Box<Self>, parent: Option<ParentVolume<'_>>, cancel: &CancellationToken) -> Result<Opened> {
        let size = self.inner.opened.size;
        let label = self.inner.opened.label.clone();
        let mut opened = Box::new(self.inner).open(parent, cancel).await?;
        // The base: the one given, else the parent's recorded checkpoint. Without a parent,
        // the allocated blocks; a parent without a checkpoint: everything (the engine says why).
        let base = match (&self.query.base_id, parent.and_then(|p| p.checkpoint().map(String::from))) {
            (Some(given), _) => Some(given.clone()),
            (None, Some(recorded)) => Some(recorded),
            (None, None) if parent.is_some() => {
                opened.changes = Changes::fallback(format!(
                    "parent snapshot {} recorded no CSI snapshot id (take backups with a checkpoint, or give the base snapshot id)",
                    parent.map(|p| p.snapshot.to_string()).unwrap_or_default()
                ));
                return Ok(opened);
            }
            (None, None) => None,
        };
        let r = tokio::select! {
            r = async { match &base { None => csi::allocated(&self.service, &self.query).await, Some(b) => csi::delta(&self.service, &self.query, b).await } } => r,
            _ = cancel.cancelled() => return Err(mover_engine::Error::cancelled("asking the SnapshotMetadata service")),
        };
        match r {
            Ok(mut md) => {
                if md.capacity > size {
                    return Err(mover_engine::Error::precondition(format!(
                        "the SnapshotMetadata service reports {} bytes for snapshot {}/{}, but the source {label} has only {size}; is it the same volume?",
                        md.capacity, self.query.namespace, self.query.snapshot
                    )));
                }
                if md.capacity < size {
                    // A volume provisioned from the snapshot may be larger than it (a PVC
                    // restored with a larger request): the service knows nothing past its
                    // capacity, so those bytes count as allocated and changed.
                    tracing::info!(
                        "{label} has {size} bytes, snapshot {}/{} {}: the bytes past it are read whole",
                        self.query.namespace,
                        self.query.snapshot,
                        md.capacity
                    );
                    md.extents.push((md.capacity, size - md.capacity));
                }
                if md.resumed > 0 {
                    tracing::info!("the SnapshotMetadata stream for {label} was resumed {} time(s)", md.resumed);
                }
                match base {
                    None => opened.allocated = Some(md.extents.iter().map(|&(o, l)| (o, o + l)).collect()),
                    Some(b) => {
                        opened.changes = Changes {
                            source: Some(ChangeSource::Csi),
                            changed: Some(md.extents),
                            since: Some(b),
                            fallback: None,
                            sparse: false,
                            ..Default::default()
                        }
                    }
                }
            }
            Err(e) => opened.changes = Changes::fallback(format!("{e:#}")),
        }
        Ok(opened)
    }
}

/// An NBD export, optionally with a QEMU dirty bitmap holding the changes since the
/// parent's checkpoint.
pub struct NbdSource {
    pub uri: crate::nbd::NbdUri,
    pub bitmap: Option<String>,
    pub options: crate::nbd::NbdOptions,
    /// For a confined daemon: the socket, resolved and checked when the request came; the
    /// connection goes to this inode, not to whatever the path names later.
    pub socket: Option<file::SocketPath>,
}

#[async_trait::async_trait]
impl VolumeSource for NbdSource {
    fn describe(&self) -> String {
        self.uri.text.clone()
    }
    async fn open(self: Box<Self>, _parent: Option<ParentVolume<'_>>, cancel: &CancellationToken) -> Result<Opened> {
        // Blocking socket I/O (bounded by its timeouts and deadlines), off the reactor; a
        // cancel shuts the socket, so the blocking thread ends with the job.
        let c = cancel.clone();
        let work = tokio::task::spawn_blocking(move || {
            let mut uri = self.uri.clone();
            if let Some(s) = &self.socket {
                uri.target = crate::nbd::Target::Unix(s.proc_path());
            }
            nbd::open(&uri, self.bitmap.as_deref(), self.options, &c)
        });
        tokio::select! {
            r = work => r?,
            _ = cancel.cancelled() => Err(mover_engine::Error::cancelled("connecting to the NBD server")),
        }
    }
}
