//! One entry point per operation. Each owns its whole lifecycle — lock, read view, work,
//! record, release — so that a front end (the CLI, the daemon's jobs, the Velero adapter)
//! turns a request into a plan, calls one of these, and renders or records what it
//! returns; none takes a lock or a read view itself. Locks are held only through
//! [`crate::lock::scope`], read views come only from a held lock ([`crate::lock::Held::view`]).
//!
//! | operation | lock | entry point |
//! |---|---|---|
//! | backup | backup | [`backup`] |
//! | restore | read | [`restore`] |
//! | drill | read | [`drill`] (records its result) |
//! | verify / check | read | [`verify`] |
//! | copy | read on the source, backup on the target per snapshot | [`copy`] |
//! | export, mount | read, while serving | [`with_image`], [`with_snapshots`] |
//! | gc | gc (exclusive) | [`crate::maint::gc::run`] |
//! | forget | gc (exclusive) | [`crate::maint::forget::forget_snapshots`] |
//! | repair | backup (+ read on the source) | [`crate::maint::repair::repair`] |
//! | index rebuild | gc (exclusive) | [`crate::maint::index::rebuild`] |
//! | protect, unprotect | gc (exclusive) | [`crate::maint::protect::protect`], [`crate::maint::protect::unprotect`] |

use crate::error::{Error, Result, ResultExt};
use crate::export::{ImageOptions, VolumeImage};
use crate::lock::{self, Hold, ReadView};
use crate::maint::check::CheckReport;
use crate::maint::drill::DrillReport;
use crate::maint::report::{self, DrillResult, VerifyResult};
use crate::pipeline::backup::{BackupJob, BackupSummary};
use crate::pipeline::copy::{CopyRequest, CopySummary};
use crate::pipeline::restore::{RestoreOptions, RestoreSummary, Target};
use crate::progress::Progress;
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::{Manifest, VolumeEntry};
use mover_format::{Repository, SnapshotId};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// An open repository and this node's local index of it.
#[derive(Clone)]
pub struct RepoHandle {
    pub repo: Repository,
    pub index: Arc<dyn ChunkIndex>,
}

impl RepoHandle {
    /// `repo` with its local index under `cache_root` ([`crate::index::open_local`]).
    pub fn local(repo: Repository, cache_root: &Path) -> Self {
        let index = crate::index::open_local(&repo, cache_root);
        Self { repo, index }
    }
}

/// Backs up `job` under a backup lock (`docs/gc.md`: lock, sync the index, resolve the
/// parent, read, upload, commit the manifest within the lease, release).
pub async fn backup(h: &RepoHandle, job: BackupJob, progress: Arc<Progress>, cancel: &CancellationToken) -> Result<BackupSummary> {
    crate::pipeline::backup::backup(&h.repo, h.index.clone(), job, progress, cancel).await
}

/// Copies the selected snapshots of `from` into `to` (`crate::pipeline::copy`).
pub async fn copy(from: &RepoHandle, to: &RepoHandle, req: CopyRequest, progress: Arc<Progress>, cancel: &CancellationToken) -> Result<CopySummary> {
    crate::pipeline::copy::copy(&from.repo, from.index.clone(), &to.repo, to.index.clone(), req, progress, cancel).await
}

/// Under a read lock, the view of the repository a reader of `snapshot` needs, once the
/// snapshot is known to still exist: it was resolved when the request was planned, and a
/// `forget` since then would otherwise go unnoticed until a pack is missing.
async fn still_there(h: &RepoHandle, held: &lock::Held, snapshot: &SnapshotId, what: &str, cancel: &CancellationToken) -> Result<ReadView> {
    // Both at once: a round trip less against a distant store.
    let (snap, view) = tokio::join!(h.repo.read_snapshot(snapshot, cancel), held.view(h.index.clone(), cancel));
    snap.map_err(|e| Error::from(e).context(format!("snapshot {snapshot} was forgotten after the {what} was requested")))?;
    view.context("syncing the local index")
}

/// Restores `volumes` of `snapshot` onto their targets, one after the other, under a read
/// lock; `each` sees every volume's result as it completes. Stops at the first failure.
pub async fn restore(
    h: &RepoHandle,
    snapshot: SnapshotId,
    volumes: Vec<(VolumeEntry, Target)>,
    opts: &RestoreOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
    mut each: impl FnMut(&RestoreSummary),
) -> Result<Vec<RestoreSummary>> {
    lock::scope(&h.repo, Hold::Read, cancel, |held| async move {
        let view = still_there(h, &held, &snapshot, "restore", cancel).await?;
        let mut out = Vec::new();
        for (volume, target) in volumes {
            let s = crate::pipeline::restore::restore_volume(&h.repo, &view, &snapshot, &volume, target, opts, progress.clone(), cancel).await?;
            each(&s);
            out.push(s);
        }
        Ok(out)
    })
    .await
}

/// Restores every volume of `snapshot` into scratch files under `scratch`, verifies them
/// against the digests recorded at backup, and removes them (`crate::maint::drill`).
/// The result, passed or failed, is recorded in the repository unless the drill was
/// interrupted: `status` and every daemon report it.
pub async fn drill(
    h: &RepoHandle,
    snapshot: SnapshotId,
    manifest: &Manifest,
    scratch: &Path,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<DrillReport> {
    let r = lock::scope(&h.repo, Hold::Read, cancel, |held| async move {
        let view = still_there(h, &held, &snapshot, "drill", cancel).await?;
        crate::maint::drill::drill(&h.repo, &view, &snapshot, manifest, scratch, progress, cancel).await
    })
    .await;
    if !cancel.is_cancelled() {
        let result = DrillResult::of(snapshot, manifest.group(), &r);
        if let Err(e) = report::record(&h.repo, report::DRILL, &result, cancel).await {
            tracing::warn!("{e:#}");
        }
    }
    r
}

/// What [`verify`] found.
pub struct Verified {
    pub check: CheckReport,
    /// As recorded (when it was).
    pub result: VerifyResult,
}

impl Verified {
    /// The error a damaged repository fails the operation with, naming the first damaged
    /// objects; `Ok` when nothing is wrong.
    pub fn ok(&self, repo: &Repository) -> Result<()> {
        let v = &self.result;
        if v.ok {
            return Ok(());
        }
        let objects: Vec<String> = v.damaged.iter().take(5).map(|d| d.object.clone()).collect();
        Err(Error::corrupt(format!(
            "repository {}: {} problem(s); {} damaged object(s) ({}{}) needed by {} snapshot(s)",
            repo.location(),
            v.problems_total,
            v.damaged.len(),
            objects.join(", "),
            if v.damaged.len() > 5 { ", …" } else { "" },
            v.affected_snapshots.len()
        )))
    }
}

/// Checks the repository's structure and, with `read_percent` (1..=100), downloads that
/// share of its packs and verifies every blob in them, under a read lock. With `record`
/// the result is written to the repository (`reports/`) as the last verify, also when it
/// found damage; a failure to record fails the operation after the check completed.
pub async fn verify(repo: &Repository, read_percent: Option<u32>, record: bool, progress: &Progress, cancel: &CancellationToken) -> Result<Verified> {
    let t0 = Instant::now();
    let check = crate::maint::check::check_with_progress(repo, read_percent, progress, cancel).await?;
    let result = VerifyResult::from_check(&check, read_percent.unwrap_or(0), t0.elapsed().as_secs_f64());
    if record {
        report::record(repo, report::VERIFY, &result, cancel).await?;
    }
    Ok(Verified { check, result })
}

/// Which volume image to open: a snapshot (id, unique prefix or `latest` of `group`) and
/// one of its volumes (may be left out when it has one).
#[derive(Debug, Clone, Default)]
pub struct ImageRequest {
    pub snapshot: String,
    pub group: Option<String>,
    pub volume: Option<String>,
    pub options: ImageOptions,
}

/// A volume opened for reading in place.
pub struct OpenImage {
    pub snapshot: SnapshotId,
    pub volume: VolumeEntry,
    pub image: Arc<VolumeImage>,
}

/// Opens one volume of a snapshot for reading in place and runs `serve` with it, under a
/// read lock that lives as long as `serve` does (an NBD export, a mount): gc deletes
/// nothing the image may still read. The snapshot is resolved after the lock is held.
pub async fn with_image<T, F, Fut>(h: &RepoHandle, req: ImageRequest, cancel: &CancellationToken, serve: F) -> Result<T>
where
    F: FnOnce(OpenImage) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    lock::scope(&h.repo, Hold::Read, cancel, |held| async move {
        let (snapshot, m) = crate::snapshots::resolve(&h.repo, &req.snapshot, req.group.as_deref(), cancel).await?;
        let volume = match (&req.volume, m.volumes.len()) {
            (Some(v), _) => crate::snapshots::volume(&snapshot, &m, v)?.clone(),
            (None, 1) => m.volumes[0].clone(),
            (None, n) => {
                let names = crate::snapshots::volume_names(&m);
                return Err(Error::invalid(format!("snapshot {snapshot} has {n} volumes ({names}): name one as SNAPSHOT:VOLUME")));
            }
        };
        let view = held.view(h.index.clone(), cancel).await.context("syncing the local index")?;
        let opts = ImageOptions { cache_segments: req.options.cache_segments.max(1), ..req.options };
        let image = VolumeImage::open(&h.repo, &view, snapshot, volume.clone(), opts, cancel).await?;
        serve(OpenImage { snapshot, volume, image }).await
    })
    .await
}

/// The snapshots (of `group`, or all) and a read view to open their images with, for as
/// long as `serve` runs, under a read lock (a mount of the whole repository).
pub async fn with_snapshots<T, F, Fut>(h: &RepoHandle, group: Option<&str>, cancel: &CancellationToken, serve: F) -> Result<T>
where
    F: FnOnce(Vec<(SnapshotId, Manifest)>, ReadView) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    lock::scope(&h.repo, Hold::Read, cancel, |held| async move {
        let snaps = match group {
            Some(g) => crate::snapshots::in_group(&h.repo, g, cancel).await?,
            None => h.repo.snapshots(cancel).await?,
        };
        let view = held.view(h.index.clone(), cancel).await.context("syncing the local index")?;
        serve(snaps, view).await
    })
    .await
}
