//! `mover snapshots` and `mover show`.

use mover::repo::RepoArgs;
use mover_engine::timeutil::fmt_time;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only this group's snapshots.
    #[arg(long)]
    group: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// An id, a unique prefix, or `latest` (of --group, or of the only group).
    snapshot: String,
    /// The group `latest` is looked up in.
    #[arg(long)]
    group: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn list(ra: &RepoArgs, a: ListArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let snaps = match &a.group {
        Some(g) => mover_engine::snapshots::in_group(&repo, g, cancel).await?,
        None => repo.snapshots(cancel).await?,
    };
    let protected = mover_engine::maint::protect::protected(&repo, cancel).await?;
    if a.json {
        let v: Vec<_> = snaps
            .iter()
            .map(|(id, m)| {
                serde_json::json!({"id": id, "group": m.group(), "time": fmt_time(m.time_unix_ms), "time_unix_ms": m.time_unix_ms, "hostname": m.hostname, "parent": m.parent, "tags": m.tags, "protected": protected.contains(id),
                    "volumes": m.volumes.iter().map(|v| serde_json::json!({"name": v.name, "size": v.size, "source": v.source, "change_source": v.change_source, "change_base": v.change_base})).collect::<Vec<_>>()})
            })
            .collect();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("{:<16} {:<20} {:<28} {:>14}  volumes", "id", "time (UTC)", "group", "size");
        for (id, m) in &snaps {
            let vols: Vec<String> = m.volumes.iter().map(|v| v.name.clone()).collect();
            println!(
                "{:<16} {:<20} {:<28} {:>14}  {}{}",
                &id.to_hex()[..16],
                fmt_time(m.time_unix_ms),
                m.group(),
                super::size(m.stats.bytes_total),
                vols.join(","),
                if protected.contains(id) { "  (protected)" } else { "" }
            );
        }
        println!("{} snapshots", snaps.len());
    }
    Ok(())
}

pub async fn show(ra: &RepoArgs, a: ShowArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let (id, m) = mover_engine::snapshots::resolve(&repo, &a.snapshot, a.group.as_deref(), cancel).await?;
    if a.json {
        let mut v = serde_json::to_value(&m)?;
        v["id"] = serde_json::json!(id);
        v["group"] = serde_json::json!(m.group());
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("snapshot {id}");
        println!("  group     {}", m.group());
        println!("  time      {} UTC", fmt_time(m.time_unix_ms));
        println!("  host      {}", m.hostname);
        if let Some(p) = m.parent {
            println!("  parent    {p}");
        }
        for (k, v) in &m.tags {
            println!("  tag       {k}={v}");
        }
        for v in &m.volumes {
            println!(
                "  volume    {} ({}) from {} [{}{}]: read {}, new {}, stored {}",
                v.name,
                super::size(v.size),
                v.source,
                v.change_source,
                v.change_base.as_ref().map(|b| format!(", checkpoint {b}")).unwrap_or_default(),
                super::size(v.stats.bytes_read),
                super::size(v.stats.bytes_new),
                super::size(v.stats.bytes_stored)
            );
        }
        for md in &m.metadata {
            println!("  metadata  {} ({}, blob {})", md.name, super::size(md.size), md.blob);
        }
    }
    Ok(())
}
