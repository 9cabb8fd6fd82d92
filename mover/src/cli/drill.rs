//! `mover drill SNAPSHOT`: restore into scratch space, verify against the digests recorded
//! at backup, report throughput and projected restore time, remove the scratch files.
//! Each result, passed or failed, is recorded in the repository (`reports/`), where
//! `mover status` and every daemon find it.

use super::progress_bar;
use mover::repo::RepoArgs;
use mover_engine::lock::RepoLock;
use mover_engine::maint::drill::drill;
use mover_engine::maint::report::{record, DrillResult, DRILL};
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
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let lock = RepoLock::read(&repo, cancel).await?;
    let (snap, m) = match mover_engine::snapshots::resolve(&repo, &a.snapshot, a.group.as_deref(), cancel).await {
        Ok(v) => v,
        Err(e) => {
            lock.release().await;
            return Err(e.into());
        }
    };
    let r = async {
        let index = mover_engine::index::with_pending(&repo, mover_engine::index::open_local(&repo, &ra.cache_root()), cancel).await?;
        let scratch = a.scratch.clone().unwrap_or_else(|| ra.cache_root().join("drill"));
        let progress = Arc::new(Progress::default());
        let bar = progress_bar(progress.clone(), !a.json, "drill");
        let r = drill(&repo, index, &snap, &m, &scratch, progress, cancel).await;
        if let Some(h) = bar {
            h.abort();
        }
        r
    }
    .await;
    lock.release().await;
    // A failed drill is recorded too (unless it was interrupted): status reports it.
    if !cancel.is_cancelled() {
        let result = DrillResult::of(snap, m.group(), &r);
        if let Err(e) = record(&repo, DRILL, &result, cancel).await {
            eprintln!("warning: {e:#}");
        }
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
