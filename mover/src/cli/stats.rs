//! `mover stats`: sizes, dedup and compression ratios.

use mover::repo::RepoArgs;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let s = mover_engine::maint::stats::stats(&repo, cancel).await?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("snapshots          {}", s.snapshots);
        let size = super::size;
        println!("logical size       {} (all volumes of all snapshots)", size(s.logical_bytes));
        println!("referenced data    {} (holes excluded)", size(s.referenced_bytes));
        println!("unique data        {} in {} chunks", size(s.unique_bytes), s.chunks);
        println!("stored             {} in {} packs", size(s.stored_bytes), s.packs);
        println!("dedup ratio        {:.2}", s.dedup_ratio);
        println!("compression ratio  {:.2}", s.compression_ratio);
        for p in &s.per_snapshot {
            println!("  {}  logical {}  unique {}", &p.id.to_hex()[..16], size(p.logical_bytes), size(p.unique_bytes));
        }
    }
    Ok(())
}
