//! `mover protect` and `mover unprotect`: keep a snapshot from `forget`.

use mover::repo::RepoArgs;
use mover_engine::maint::protect;
use mover_engine::timeutil::fmt_time;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct ProtectArgs {
    /// The snapshot (id, unique prefix, or `latest` with --group).
    #[arg(value_name = "ID")]
    snapshot: String,
    /// With `latest`: the group whose newest snapshot is meant.
    #[arg(long)]
    group: Option<String>,
    /// Why it is kept (shown by `mover snapshots --json`).
    #[arg(long, default_value = "")]
    note: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct UnprotectArgs {
    /// The snapshot (id or unique prefix).
    #[arg(value_name = "ID")]
    snapshot: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn protect(ra: &RepoArgs, a: ProtectArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let (id, _) = mover_engine::snapshots::resolve(&repo, &a.snapshot, a.group.as_deref(), cancel).await?;
    let out = protect::protect(&repo, &id, &a.note, cancel).await?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        let since = out.protection.as_ref().map(|p| format!(" since {} (by {})", fmt_time(p.time_unix_ms), p.hostname)).unwrap_or_default();
        println!("snapshot {id} is protected{since}{}", if out.changed { "" } else { "; it already was" });
    }
    Ok(())
}

pub async fn unprotect(ra: &RepoArgs, a: UnprotectArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let id = repo.resolve_snapshot(&a.snapshot, cancel).await?;
    let out = protect::unprotect(&repo, &id, cancel).await?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else if out.changed {
        println!("snapshot {id} is no longer protected");
    } else {
        println!("snapshot {id} was not protected; nothing changed");
    }
    Ok(())
}
