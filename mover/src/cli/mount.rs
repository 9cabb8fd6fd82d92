//! `mover mount DIR`: the snapshots as a read-only FUSE file system, for file-level restore
//! (`DIR/<group>/<snapshot>/<volume>.img`; loop-mount an image read-only and copy files
//! out). Runs until interrupted, then unmounts.

use mover::mount::SnapshotFs;
use mover::repo::RepoArgs;
use mover_engine::export::ImageOptions;
use mover_engine::ops::{self, RepoHandle};
use mover_engine::Error;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An empty directory to mount on.
    dir: PathBuf,
    /// Only this group's snapshots.
    #[arg(long)]
    group: Option<String>,
    /// Decoded 4 MiB segments kept in memory per open image.
    #[arg(long, default_value_t = 32)]
    cache_segments: usize,
    /// Print the mount (directory, repository, snapshots) as JSON once mounted.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let meta = std::fs::metadata(&a.dir).map_err(|e| Error::from(e).context(format!("mount point {}", a.dir.display())))?;
    if !meta.is_dir() {
        anyhow::bail!("mount point {} is not a directory", a.dir.display());
    }
    let h = RepoHandle::local(ra.open(cancel).await?, &ra.cache_root());
    // Under a read lock while mounted: gc deletes nothing the mount may still read.
    let (repo, location) = (h.repo.clone(), h.repo.location().to_string());
    ops::with_snapshots(&h, a.group.as_deref(), cancel, |snaps, view| async move {
        let n = snaps.len();
        let opts = ImageOptions { cache_segments: a.cache_segments.max(1), ..Default::default() };
        let fs = SnapshotFs::new(repo, view, snaps, opts, cancel.clone());
        let options = [fuser::MountOption::RO, fuser::MountOption::FSName("mover".into()), fuser::MountOption::Subtype("mover".into())];
        let session = fuser::spawn_mount2(fs, &a.dir, &options).map_err(|e| Error::from(e).context(format!("mounting on {}", a.dir.display())))?;
        if a.json {
            println!("{}", serde_json::json!({"mounted": a.dir, "repository": location, "snapshots": n}));
        } else {
            println!("mounted {n} snapshots of repository {location} read-only on {}; Ctrl-C unmounts", a.dir.display());
        }
        cancel.cancelled().await;
        drop(session);
        Ok(())
    })
    .await?;
    Ok(())
}
