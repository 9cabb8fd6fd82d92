//! `mover backup`: one snapshot of one or several volumes.

use super::{key_values, progress_bar};
use mover::nbd::NbdOptions;
use mover::plan::backup::{BackupRequest, SourceRef, VolumeRequest};
use mover::plan::Env;
use mover::repo::RepoArgs;
use mover::sources::csi::{CsiQuery, CsiService};
use mover_engine::ops::{self, RepoHandle};
use mover_engine::pipeline::backup::Tuning;
use mover_engine::progress::Progress;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A single source (block device or file): short for --volume disk=SOURCE.
    source: Option<PathBuf>,
    /// Volume name for the positional source (and for --nbd).
    #[arg(long, default_value = "disk")]
    name: String,
    /// NAME=SOURCE, repeatable: the disks of one VM, taken together.
    #[arg(long = "volume", value_name = "NAME=SOURCE")]
    volumes: Vec<String>,
    /// What is protected (e.g. vms/web-1): `--parent latest`, retention and listing go by
    /// it. Default: host/<this host>/<volume names>.
    #[arg(long)]
    group: Option<String>,
    /// Parent snapshot: an id, a unique prefix, or `latest` (of the group).
    #[arg(long)]
    parent: Option<String>,
    /// Changed extents: FILE for the single volume, or NAME=FILE per volume.
    #[arg(long = "changed-extents", value_name = "[NAME=]FILE")]
    changed_extents: Vec<String>,
    /// Read the volume (named by --name) over NBD: nbd+unix:///EXPORT?socket=PATH or
    /// nbd://HOST[:PORT]/EXPORT.
    #[arg(long, value_name = "URI")]
    nbd: Option<String>,
    /// QEMU dirty bitmap on the NBD export holding the changes since the parent's
    /// checkpoint (a parent taken at another checkpoint, or none, is read in full).
    #[arg(long, value_name = "NAME", requires = "nbd")]
    nbd_bitmap: Option<String>,
    /// Seconds to wait for an NBD server or a KubeVirt export to answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    nbd_timeout: u64,
    /// Read the volume (named by --name) through a KubeVirt pull-mode export: the disk's
    /// mapEndpoint or dataEndpoint (or their …/exports/<disk> prefix) of a
    /// VirtualMachineBackup. A SOURCE given as well is the disk's PVC, read instead if the
    /// export cannot be used.
    #[arg(long, value_name = "URL", requires_all = ["kubevirt_token", "kubevirt_ca"])]
    kubevirt_export: Option<String>,
    /// File holding the export token (x-kubevirt-export-token).
    #[arg(long, value_name = "FILE")]
    kubevirt_token: Option<PathBuf>,
    /// The backup's endpointCert (PEM file).
    #[arg(long, value_name = "FILE")]
    kubevirt_ca: Option<PathBuf>,
    /// The VirtualMachineBackup's status.type: Full or Incremental (KubeVirt decides, not
    /// the caller). Checked against the map's own descriptions; when they disagree, or
    /// neither says, the volume is read in full through the export. Unset: as the map says.
    #[arg(long, value_name = "TYPE", requires = "kubevirt_export", value_parser = ["Full", "Incremental", "full", "incremental"])]
    kubevirt_type: Option<String>,
    /// The checkpoint an Incremental backup's changes are relative to (the tracker's
    /// latestCheckpoint before this backup); it must be the parent's recorded checkpoint.
    #[arg(long, value_name = "CHECKPOINT", requires = "kubevirt_export")]
    kubevirt_base: Option<String>,
    /// Seconds to keep retrying a KubeVirt export that answers 503 (virt-launcher's tunnel
    /// not connected yet) or cannot be reached, with backoff.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    kubevirt_retry: u64,
    /// Back up a KubeVirt push-mode output image (qcow2) as the volume named by --name.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["nbd", "kubevirt_export"])]
    qcow2: Option<PathBuf>,
    /// The qcow2 image is an incremental one holding the changes since CHECKPOINT (applied
    /// onto the parent taken at it); without it, a full backup's image.
    #[arg(long, value_name = "CHECKPOINT", requires = "qcow2")]
    qcow2_base: Option<String>,
    /// Record NAME as the change-tracking checkpoint this snapshot was taken at (the bitmap
    /// or CSI snapshot the next incremental starts from).
    #[arg(long, value_name = "NAME")]
    checkpoint: Option<String>,
    /// CSI SnapshotMetadata service (HOST:PORT, TLS) to ask for allocated (full) or changed
    /// (incremental) blocks of the single volume.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["cbt_ca", "cbt_token", "cbt_snapshot"])]
    cbt_csi: Option<String>,
    /// CA certificate (PEM) of the SnapshotMetadata service.
    #[arg(long, value_name = "FILE")]
    cbt_ca: Option<PathBuf>,
    /// File holding the security token (e.g. a projected service-account token).
    #[arg(long, value_name = "FILE")]
    cbt_token: Option<PathBuf>,
    /// Namespace of the VolumeSnapshots (--cbt-snapshot, --cbt-base).
    #[arg(long, value_name = "NS", default_value = "default")]
    cbt_namespace: String,
    /// The VolumeSnapshot being backed up.
    #[arg(long, value_name = "NAME")]
    cbt_snapshot: Option<String>,
    /// CSI handle of the base snapshot (default: the parent's recorded checkpoint).
    #[arg(long, value_name = "ID")]
    cbt_base_id: Option<String>,
    /// TLS server name of the service, when it differs from the host.
    #[arg(long, value_name = "NAME")]
    cbt_server_name: Option<String>,
    /// NAME=FILE, repeatable: opaque metadata stored with the snapshot (e.g. VM YAML).
    #[arg(long = "metadata", value_name = "NAME=FILE")]
    metadata: Vec<String>,
    /// K=V, repeatable.
    #[arg(long = "tag", value_name = "K=V")]
    tags: Vec<String>,
    /// Segments a change source (extents, bitmap, CSI, KubeVirt map) called unchanged that
    /// are read anyway and compared with the parent; one that differs makes this backup read
    /// the whole volume (0: none).
    #[arg(long, value_name = "SEGMENTS", default_value_t = mover_engine::pipeline::backup::DEFAULT_VERIFY_SAMPLE)]
    verify_sample: usize,
    /// Read the whole volume and compare when this is the Nth backup in a row that took a
    /// change source's word (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    compare_every: u32,
    /// Read path: auto (io_uring, else pread), io_uring, pread.
    #[arg(long, default_value = "auto", value_parser = ["auto", "io_uring", "pread"])]
    io: String,
    /// Segment reads in flight.
    #[arg(long, default_value_t = 4)]
    queue_depth: usize,
    /// Chunking/compression threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Concurrent pack uploads (default: 2 to a local directory, 3 to S3).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    uploads: usize,
    /// Upload limit in bytes per second (0: none).
    #[arg(long, default_value_t = 0, value_name = "BYTES_PER_S")]
    limit_upload: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// The request the flags describe.
fn request(b: &Args) -> anyhow::Result<BackupRequest> {
    let mut vols: Vec<VolumeRequest> = Vec::new();
    let vol = |name: &str, source: SourceRef| VolumeRequest { name: name.into(), source, changed_extents: None, csi: None, checkpoint: b.checkpoint.clone() };
    if let Some(url) = &b.kubevirt_export {
        let read = |f: &Option<PathBuf>, what: &str| -> anyhow::Result<Vec<u8>> {
            let f = f.as_ref().ok_or_else(|| anyhow::anyhow!("--kubevirt-export needs {what}"))?;
            Ok(mover::secrets::read_small_file(f, what)?)
        };
        let token = String::from_utf8(read(&b.kubevirt_token, "--kubevirt-token")?).map_err(|_| anyhow::anyhow!("the KubeVirt export token is not UTF-8"))?;
        let export = mover::sources::kubevirt::Export {
            base: mover::sources::kubevirt::Export::base_of(url)?,
            token: zeroize::Zeroizing::new(token.trim().to_string()),
            ca_pem: read(&b.kubevirt_ca, "--kubevirt-ca")?,
            declared: b.kubevirt_type.as_deref().map(mover::sources::kubevirt::BackupType::parse).transpose()?,
            since: b.kubevirt_base.clone().filter(|s| !s.is_empty()),
            retry_for: Duration::ZERO,
            timeout: Duration::from_secs(b.nbd_timeout.max(1)),
        };
        let pvc = b.source.clone().map(|p| Box::new(SourceRef::Path(p)));
        vols.push(vol(&b.name, SourceRef::Kubevirt { export: Box::new(export), pvc }));
    } else if let Some(q) = &b.qcow2 {
        vols.push(vol(&b.name, SourceRef::Qcow2 { path: q.clone(), since: b.qcow2_base.clone() }));
    } else if let Some(s) = &b.source {
        vols.push(vol(&b.name, SourceRef::Path(s.clone())));
    }
    for (n, s) in key_values(&b.volumes, "--volume")? {
        vols.push(vol(&n, SourceRef::Path(s.into())));
    }
    if let Some(uri) = &b.nbd {
        vols.push(vol(&b.name, SourceRef::Nbd { uri: uri.clone(), bitmap: b.nbd_bitmap.clone() }));
    }
    if b.cbt_csi.is_some() {
        if vols.len() != 1 {
            anyhow::bail!("--cbt-csi applies to a single volume; {} were given", vols.len());
        }
        vols[0].csi = Some(CsiQuery {
            namespace: b.cbt_namespace.clone(),
            snapshot: b.cbt_snapshot.clone().unwrap_or_default(),
            base_id: b.cbt_base_id.clone(),
            driver: None,
        });
    }
    for ce in &b.changed_extents {
        let (name, file) = match ce.split_once('=') {
            Some((n, f)) if vols.iter().any(|s| s.name == n) => (n.to_string(), PathBuf::from(f)),
            _ if vols.len() == 1 => (vols[0].name.clone(), PathBuf::from(ce)),
            _ => anyhow::bail!("--changed-extents '{ce}': with several volumes, give NAME=FILE naming one of them"),
        };
        let ext = mover::sources::extents::read(&file)?;
        if let Some(s) = vols.iter_mut().find(|s| s.name == name) {
            s.changed_extents = Some(ext);
        }
    }
    let mut metadata = Vec::new();
    for (n, f) in key_values(&b.metadata, "--metadata")? {
        let len = std::fs::metadata(&f).map_err(|e| anyhow::anyhow!("reading metadata file {f}: {e}"))?.len();
        if len > mover::plan::MAX_METADATA_BYTES as u64 {
            anyhow::bail!("metadata file {f} is larger than {} MiB", mover::plan::MAX_METADATA_BYTES >> 20);
        }
        let bytes = std::fs::read(&f).map_err(|e| anyhow::anyhow!("reading metadata file {f}: {e}"))?;
        metadata.push((n, bytes));
    }
    let mut tuning = Tuning { io: b.io.parse()?, queue_depth: b.queue_depth, upload_concurrency: b.uploads, ..Default::default() };
    if let Some(w) = b.workers {
        tuning.workers = w;
    }
    Ok(BackupRequest {
        group: b.group.clone(),
        volumes: vols,
        parent: b.parent.clone(),
        metadata,
        tags: key_values(&b.tags, "--tag")?.into_iter().collect(),
        tuning,
        upload_limit: b.limit_upload,
        verify_sample: Some(b.verify_sample),
        compare_every: Some(b.compare_every),
    })
}

pub async fn run(ra: &RepoArgs, b: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let req = request(&b)?;
    let env = Env {
        nbd_options: NbdOptions { io_timeout: Duration::from_secs(b.nbd_timeout.max(1)), ..Default::default() },
        csi: b
            .cbt_csi
            .as_ref()
            .map(|ep| {
                (
                    None,
                    CsiService {
                        endpoint: ep.clone(),
                        ca: b.cbt_ca.clone().unwrap_or_default(),
                        token_file: b.cbt_token.clone().unwrap_or_default(),
                        server_name: b.cbt_server_name.clone(),
                        timeout: Duration::from_secs(30),
                    },
                )
            })
            .into_iter()
            .collect(),
        backup: mover::plan::BackupDefaults { kubevirt_retry: Duration::from_secs(b.kubevirt_retry), ..Default::default() },
        ..Env::operator()
    };
    let h = RepoHandle::local(ra.open(cancel).await?, &ra.cache_root());
    let plan = mover::plan::backup::prepare(req, &env, &h.repo, cancel).await?;
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(progress.clone(), !b.json, "backup");
    let r = ops::backup(&h, plan.job, progress, cancel).await;
    if let Some(h) = bar {
        h.abort();
    }
    let s = r?;
    if b.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        let st = &s.stats;
        println!("snapshot {} saved (group {})", s.snapshot_id, s.group);
        if let Some(p) = s.parent {
            println!("  parent          {p}");
        }
        let size = super::size;
        println!("  volume size     {}", size(st.bytes_total));
        println!("  read            {} ({} reused from parent)", size(st.bytes_read), size(st.bytes_reused_parent));
        println!("  skipped         {} (unchanged per extents)", size(st.bytes_skipped));
        println!("  zero            {}", size(st.bytes_zero));
        println!("  new             {} in {} chunks, stored as {}", size(st.bytes_new), st.chunks_new, size(st.bytes_stored));
        println!("  deduplicated    {} chunks", st.chunks_dedup);
        for v in &s.volumes {
            if let Some(f) = &v.change_fallback {
                println!("  volume '{}' read in full: {f}", v.name);
            }
        }
        println!("  took            {:.2} s via {}", s.duration_s, s.io_backend);
    }
    Ok(())
}
