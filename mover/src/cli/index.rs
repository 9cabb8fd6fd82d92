//! `mover index sync|rebuild`: the node's local index cache.

use mover::repo::RepoArgs;
use tokio_util::sync::CancellationToken;

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Bring the local index up to date with the store's index segments.
    Sync {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete the local index and rebuild it from index segments, and from pack trailers
    /// for packs no readable index segment names (writing new segments for them).
    Rebuild {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(ra: &RepoArgs, cmd: Cmd, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    match cmd {
        Cmd::Sync { json } => {
            let (path, r) = mover_engine::maint::index::sync(&repo, &ra.cache_root(), cancel).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "index {}: {} segments in the store, {} new ({} entries added), {} gone ({} entries removed)",
                    path.display(),
                    r.segments_total,
                    r.segments_ingested,
                    r.entries_ingested,
                    r.segments_removed,
                    r.entries_removed
                );
            }
        }
        Cmd::Rebuild { json } => {
            let (path, r) = mover_engine::maint::index::rebuild(&repo, &ra.cache_root(), cancel).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"segments_read": r.segments_read, "segments_unreadable": r.segments_unreadable, "packs_total": r.packs_total,
                    "packs_from_trailers": r.packs_from_trailers, "packs_unreadable": r.packs_unreadable, "entries": r.entries, "segments_written": r.segments_written})
                );
            } else {
                println!(
                    "rebuilt {}: {} entries from {} index segments and {} of {} packs' trailers",
                    path.display(),
                    r.entries,
                    r.segments_read,
                    r.packs_from_trailers,
                    r.packs_total
                );
                for s in &r.segments_unreadable {
                    println!("  unreadable index segment: {s}");
                }
                for p in &r.packs_unreadable {
                    println!("  unreadable pack: {p}");
                }
                for s in &r.segments_written {
                    println!("  wrote index segment {s}");
                }
            }
        }
    }
    Ok(())
}
