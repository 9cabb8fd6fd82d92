//! `mover gc`: free what no snapshot references; safe while backups run (docs/gc.md).

use super::mib;
use mover::repo::RepoArgs;
use mover_engine::maint::gc::{self, GcOptions};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the plan (what would be deleted and copied), change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Repack a pack when more than this share of its bytes is unreferenced.
    #[arg(long, default_value_t = 0.3, value_name = "SHARE")]
    repack_unused: f64,
    /// Also compress the stored data again at this zstd level (e.g. 19): backups stay fast,
    /// the repository shrinks afterwards. Rewrites only packs that shrink by 3 % or more.
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(i32).range(1..=22))]
    recompress: Option<i32>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    // The working set (on disk, about 120 bytes per chunk) goes under the cache directory.
    let opts = GcOptions { dry_run: a.dry_run, repack_unused: a.repack_unused, scratch_dir: Some(ra.cache_root()), recompress: a.recompress };
    let r = gc::run(&repo, &opts, cancel).await?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{}gc of repository {}: {} snapshots, {} packs ({:.1} MiB)",
        if a.dry_run { "dry run: " } else { "" },
        repo.location(),
        r.snapshots,
        r.packs_before,
        mib(r.bytes_before)
    );
    println!("  unreferenced packs   {}", r.packs_unreferenced);
    println!("  packs to repack      {} ({:.1} MiB of live blobs {})", r.packs_repacked, mib(r.bytes_copied), if a.dry_run { "to copy" } else { "copied" });
    println!("  unindexed packs      {}", r.packs_unindexed);
    if a.recompress.is_some() && !a.dry_run {
        println!("  recompressed         {} packs, {:.1} MiB smaller", r.packs_recompressed, mib(r.bytes_saved_by_recompression));
    }
    if a.dry_run {
        for p in r.plan.iter().take(50) {
            println!("  {:9} pack {}  {:8.1} MiB, {:8.1} MiB referenced", p.action.as_str(), p.pack, mib(p.size), mib(p.referenced_bytes));
        }
        if r.plan.len() > 50 {
            println!("  … and {} more packs (--json lists all)", r.plan.len() - 50);
        }
        println!("  would free           {:.1} MiB (if no backup holds it back); nothing changed", mib(r.bytes_freed));
        return Ok(());
    }
    println!("  deleted              {} packs, {:.1} MiB freed", r.packs_deleted, mib(r.bytes_freed));
    if r.entries_resurrected > 0 {
        println!("  kept                 {} blobs that snapshots written meanwhile use", r.entries_resurrected);
    }
    if r.bytes_held_back > 0 {
        println!("  held back            {:.1} MiB until these finish (run gc again later):", mib(r.bytes_held_back));
        for h in &r.held_by {
            println!("    {h}");
        }
    }
    if r.stale_locks_removed > 0 {
        println!("  stale locks removed  {}", r.stale_locks_removed);
    }
    let phases: Vec<String> = r.phase_seconds.iter().filter(|(_, s)| **s >= 0.05).map(|(p, s)| format!("{p} {s:.1} s")).collect();
    if !phases.is_empty() {
        println!("  time                 {}", phases.join(", "));
    }
    Ok(())
}
