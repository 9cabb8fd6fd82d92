//! `mover restore`: one volume onto a device or file, or every volume into a directory.

use super::progress_bar;
use mover::plan::restore::{RestoreRequest, TargetRef};
use mover::plan::Env;
use mover::repo::RepoArgs;
use mover_engine::ops::{self, RepoHandle};
use mover_engine::pipeline::restore::RestoreOptions;
use mover_engine::progress::Progress;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// SNAPSHOT or SNAPSHOT:VOLUME (id, unique prefix, or `latest`).
    snapshot: String,
    /// Target device or file; a directory when restoring several volumes.
    target: PathBuf,
    /// The group `latest` is looked up in (needed when the repository holds several).
    #[arg(long)]
    group: Option<String>,
    /// How to treat holes (zero runs) on the target: auto, zero, skip.
    #[arg(long, default_value = "auto", value_parser = ["auto", "zero", "skip"])]
    holes: String,
    /// Write over a target that already holds data (a non-empty file, or a device whose
    /// first or last MiB is not all zeros); without it such a target is refused.
    #[arg(long)]
    overwrite: bool,
    /// The fetch window: MiB of packs being fetched or waiting to be decoded (default: 64
    /// against S3, 32 for a local directory). More covers a more distant store, at about a
    /// MiB of memory per MiB.
    #[arg(long)]
    window_mib: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let (snapshot, volume) = match a.snapshot.split_once(':') {
        Some((s, v)) => (s.to_string(), Some(v.to_string())),
        None => (a.snapshot.clone(), None),
    };
    let req = RestoreRequest {
        snapshot,
        group: a.group.clone(),
        volume,
        target: TargetRef::Path(a.target.clone()),
        into_directory: true,
        holes: a.holes.parse()?,
        overwrite: a.overwrite,
    };
    let h = RepoHandle::local(ra.open(cancel).await?, &ra.cache_root());
    let plan = mover::plan::restore::prepare(req, &Env::operator(), &h.repo, cancel).await?;
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(progress.clone(), !a.json, "restore");
    let opts = RestoreOptions { holes: plan.holes, window: a.window_mib.map(|m| m << 20) };
    let r = ops::restore(&h, plan.snapshot, plan.volumes, &opts, progress, cancel, |_| {}).await;
    if let Some(h) = bar {
        h.abort();
    }
    let out = r?;
    if a.json {
        let bytes_written: u64 = out.iter().map(|s| s.bytes_written).sum();
        let bytes_holes: u64 = out.iter().map(|s| s.bytes_holes).sum();
        let duration_s: f64 = out.iter().map(|s| s.duration_s).sum();
        let io_backend = out.first().map(|s| s.io_backend.clone()).unwrap_or_default();
        println!(
            "{}",
            serde_json::json!({"snapshot_id": plan.snapshot, "bytes_written": bytes_written, "bytes_holes": bytes_holes, "duration_s": duration_s, "io_backend": io_backend, "volumes": out})
        );
    } else {
        for s in &out {
            println!(
                "restored volume '{}' of snapshot {} to {}: {} written, {} of holes, {:.2} s",
                s.volume,
                s.snapshot_id,
                s.target,
                super::size(s.bytes_written),
                super::size(s.bytes_holes),
                s.duration_s
            );
        }
    }
    Ok(())
}
