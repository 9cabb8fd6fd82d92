//! `mover stats`: sizes, dedup and compression ratios.

use mover::repo::RepoArgs;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
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
        println!("logical size       {} bytes (all volumes of all snapshots)", s.logical_bytes);
        println!("referenced data    {} bytes (holes excluded)", s.referenced_bytes);
        println!("unique data        {} bytes in {} chunks", s.unique_bytes, s.chunks);
        println!("stored             {} bytes in {} packs", s.stored_bytes, s.packs);
        println!("dedup ratio        {:.2}", s.dedup_ratio);
        println!("compression ratio  {:.2}", s.compression_ratio);
        for p in &s.per_snapshot {
            println!("  {}  logical {}  unique {}", &p.id.to_hex()[..16], p.logical_bytes, p.unique_bytes);
        }
    }
    Ok(())
}
