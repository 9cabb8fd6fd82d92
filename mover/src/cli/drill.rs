//! `mover drill SNAPSHOT`: restore into scratch space, verify against the digests recorded
//! at backup, report throughput and projected restore time, remove the scratch files.
//! Each result, passed or failed, is recorded in the repository (`reports/`), where
//! `mover status` and every daemon find it.

use super::progress_bar;
use mover::plan::drill::DrillRequest;
use mover::repo::RepoArgs;
use mover_engine::ops::{self, RepoHandle};
use mover_engine::progress::Progress;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A snapshot id, a unique prefix, or `latest` (of --group).
    snapshot: String,
    /// The group `latest` is looked up in.
    #[arg(long)]
    group: Option<String>,
    /// Where the scratch files go (default: <cache>/drill); each is removed when its
    /// volume is verified, or when the drill fails.
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let h = RepoHandle::local(ra.open(cancel).await?, &ra.cache_root());
    let req = DrillRequest { snapshot: a.snapshot.clone(), group: a.group.clone(), scratch: a.scratch.clone() };
    let plan = mover::plan::drill::prepare(req, &ra.cache_root().join("drill"), &h.repo, cancel).await?;
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(progress.clone(), !a.json, "drill");
    let r = ops::drill(&h, plan.snapshot, &plan.manifest, &plan.scratch, progress, cancel).await;
    if let Some(h) = bar {
        h.abort();
    }
    let report = r?;
    let line = serde_json::to_string(&report)?;
    if a.json {
        println!("{line}");
    } else {
        println!("drill of snapshot {} ({}): restored and verified in {:.1} s", report.snapshot_id, report.group, report.duration_s);
        for v in &report.volumes {
            println!(
                "  {}: {} bytes, {} segments match the backup's digests; restore {:.1} s at {:.0} MiB/s, verify {:.1} s; expect {:.0} s to restore it here",
                v.name,
                v.size,
                v.segments_verified,
                v.restore_s,
                v.restore_bytes_per_s / (1 << 20) as f64,
                v.verify_s,
                v.projected_restore_s
            );
        }
    }
    Ok(())
}
