//! `mover forget`: retention per group; data is freed by `gc`.

use super::key_values;
use mover::repo::RepoArgs;
use mover_engine::maint::forget::{self, GroupBy, Policy};
use mover_engine::timeutil::fmt_time;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshots to remove (ids or unique prefixes), instead of a policy.
    #[arg(value_name = "ID", conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_tags", "group", "group_by"])]
    ids: Vec<String>,
    /// Keep the newest N snapshots of each group.
    #[arg(long, default_value_t = 0)]
    keep_last: usize,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, default_value_t = 0)]
    keep_hourly: usize,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, default_value_t = 0)]
    keep_daily: usize,
    /// Keep the newest snapshot of each of the last N weeks that have one.
    #[arg(long, default_value_t = 0)]
    keep_weekly: usize,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, default_value_t = 0)]
    keep_monthly: usize,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, default_value_t = 0)]
    keep_yearly: usize,
    /// K=V, repeatable: always keep snapshots with this tag.
    #[arg(long = "keep-tag", value_name = "K=V")]
    keep_tags: Vec<String>,
    /// Apply the policy to this group only.
    #[arg(long)]
    group: Option<String>,
    /// What the policy is applied to, one set at a time: group (default), host, volumes, none.
    #[arg(long, default_value = "group", value_parser = ["group", "host", "volumes", "none"])]
    group_by: String,
    /// Show the plan, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the plan and the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    if !a.ids.is_empty() {
        return by_id(ra, a, cancel).await;
    }
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        tags: key_values(&a.keep_tags, "--keep-tag")?,
    };
    let by: GroupBy = a.group_by.parse()?;
    let repo = ra.open(cancel).await?;
    let snaps = match &a.group {
        Some(g) => mover_engine::snapshots::in_group(&repo, g, cancel).await?,
        None => repo.snapshots(cancel).await?,
    };
    let protected = mover_engine::maint::protect::protected(&repo, cancel).await?;
    let groups = forget::plan(&snaps, &policy, by, &protected)?;
    let removed = if a.dry_run { 0 } else { forget::execute(&repo, &groups, cancel).await? };
    if a.json {
        println!("{}", serde_json::json!({"dry_run": a.dry_run, "removed": removed, "groups": groups}));
        return Ok(());
    }
    for g in &groups {
        println!("group {}", g.key);
        for d in &g.snapshots {
            let what = if d.keep {
                format!("keep   ({})", d.reasons.join(", "))
            } else if a.dry_run {
                "would remove".into()
            } else {
                "removed".into()
            };
            println!("  {} {}  {what}", &d.id.to_hex()[..16], fmt_time(d.time_unix_ms));
        }
    }
    let n: usize = groups.iter().map(|g| g.snapshots.iter().filter(|d| !d.keep).count()).sum();
    if a.dry_run {
        println!("dry run: {n} snapshot(s) would be removed; nothing changed");
    } else {
        println!("removed {removed} snapshot(s); run gc to free their data");
    }
    Ok(())
}

/// `mover forget ID…`: those snapshots, each resolved (a prefix must be unique) before
/// anything is removed.
async fn by_id(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let mut picked = Vec::new();
    for spec in &a.ids {
        let (id, m) = mover_engine::snapshots::resolve(&repo, spec, None, cancel).await?;
        if !picked.iter().any(|(p, _)| *p == id) {
            picked.push((id, m));
        }
    }
    let ids: Vec<_> = picked.iter().map(|(id, _)| *id).collect();
    let removed = if a.dry_run { 0 } else { forget::forget_snapshots(&repo, &ids, cancel).await? };
    if a.json {
        let snaps: Vec<_> = picked.iter().map(|(id, m)| serde_json::json!({"id": id.to_hex(), "group": m.group(), "time_unix_ms": m.time_unix_ms})).collect();
        println!("{}", serde_json::json!({"dry_run": a.dry_run, "removed": removed, "snapshots": snaps}));
        return Ok(());
    }
    for (id, m) in &picked {
        let what = if a.dry_run { "would remove" } else { "removed" };
        println!("  {} {}  {}  {what}", &id.to_hex()[..16], fmt_time(m.time_unix_ms), m.group());
    }
    if a.dry_run {
        println!("dry run: {} snapshot(s) would be removed; nothing changed", picked.len());
    } else {
        println!("removed {removed} snapshot(s); run gc to free their data");
    }
    Ok(())
}
