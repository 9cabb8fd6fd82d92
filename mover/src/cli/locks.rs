//! `mover locks` and `mover unlock`.

use mover::repo::RepoArgs;
use mover_engine::lock;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct UnlockArgs {
    /// Remove every lock, also live ones. Only when you know their holders are gone.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn list(ra: &RepoArgs, a: ListArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let l = lock::list(&repo, cancel).await?;
    if a.json {
        println!("{}", serde_json::to_string(&l)?);
    } else if l.is_empty() {
        println!("no locks in repository {}", repo.location());
    } else {
        for v in &l {
            println!("{}{}", v.describe(), v.stale.as_ref().map(|s| format!(": stale, {s}")).unwrap_or_default());
        }
    }
    Ok(())
}

pub async fn unlock(ra: &RepoArgs, a: UnlockArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let removed = lock::unlock(&repo, a.force, cancel).await?;
    let left = lock::list(&repo, cancel).await?;
    if a.json {
        println!("{}", serde_json::json!({"removed": removed, "remaining": left}));
        return Ok(());
    }
    for v in &removed {
        println!("removed {}{}", v.describe(), v.stale.as_ref().map(|s| format!(" ({s})")).unwrap_or_else(|| " (live; --force)".into()));
    }
    println!(
        "removed {} lock(s); {} live lock(s) remain{}",
        removed.len(),
        left.len(),
        if left.is_empty() || a.force { "" } else { " (use --force only when their holders are gone)" }
    );
    Ok(())
}
