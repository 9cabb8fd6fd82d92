//! `mover status`: per group, the age of the newest snapshot (RPO), of the newest verified
//! and drilled one, and the restore time to expect (RTO), from the repository's snapshots
//! and the verify and drill results recorded in it.

use mover::repo::RepoArgs;
use mover_engine::maint::report::{status, RepoStatus};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    let st = status(&repo, cancel).await?;
    if a.json {
        println!("{}", serde_json::to_string(&st)?);
    } else {
        print!("{}", render(&st));
    }
    Ok(())
}

/// A duration for people: 42 s, 7 min, 3.5 h, 2.1 d.
pub fn human(secs: f64) -> String {
    match secs {
        s if s < 10.0 => format!("{s:.1} s"),
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} d", s / 86400.0),
    }
}

pub fn render(st: &RepoStatus) -> String {
    let mut out = format!("repository {}\n", st.repository);
    match &st.last_verify {
        None => out.push_str("  never verified (run `mover check --read-data-subset 10% --record`, or configure verify jobs in the daemon)\n"),
        Some(v) => out.push_str(&format!(
            "  last verify {} ago ({}% of the data read): {}\n",
            human(st.time_unix_ms.saturating_sub(v.time_unix_ms) as f64 / 1000.0),
            v.read_data_percent,
            if v.ok { "intact".to_string() } else { format!("{} damaged object(s), {} snapshot(s) affected", v.damaged_objects, v.affected_snapshots) }
        )),
    }
    let opt = |v: Option<f64>| v.map(human).unwrap_or_else(|| "never".into());
    out.push_str(&format!("  {:<32} {:>6} {:>10} {:>10} {:>10} {:>12}\n", "group", "snaps", "newest", "verified", "drilled", "restore in"));
    for g in &st.groups {
        let mut flags = String::new();
        if g.newest_damaged {
            flags.push_str("  NEWEST DAMAGED");
        }
        if g.last_drill_failed {
            flags.push_str("  LAST DRILL FAILED");
        }
        out.push_str(&format!(
            "  {:<32} {:>6} {:>10} {:>10} {:>10} {:>12}{flags}\n",
            g.group,
            g.snapshots,
            human(g.rpo_seconds),
            opt(g.verified_age_seconds),
            opt(g.drilled_age_seconds),
            g.projected_restore_seconds.map(human).unwrap_or_else(|| "no drill".into()),
        ));
    }
    out
}
