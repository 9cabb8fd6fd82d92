//! `mover check`: structure, and with `--read-data` every (or a sample of) blob.

use mover::plan::verify::VerifyPlan;
use mover::repo::RepoArgs;
use mover_engine::progress::Progress;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Download and verify every pack and blob.
    #[arg(long)]
    read_data: bool,
    /// Download and verify a deterministic N % sample of the packs (e.g. 10%).
    #[arg(long, value_name = "N%")]
    read_data_subset: Option<String>,
    /// Record the result in the repository (`reports/`), where `mover status` and the
    /// daemons find it as the last verify.
    #[arg(long)]
    record: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let plan = VerifyPlan::from_flags(a.read_data, a.read_data_subset.as_deref())?;
    let repo = ra.open(cancel).await?;
    let v = mover_engine::ops::verify(&repo, plan.read_percent, a.record, &Progress::default(), cancel).await?;
    let r = &v.check;
    if a.json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "checked repository {}: {} snapshots, {} packs, {} index segments ({} entries){}",
            repo.location(),
            r.snapshots,
            r.packs,
            r.index_segments,
            r.index_entries,
            if plan.read_percent.is_some() {
                format!("; read {} packs, verified {} blobs ({})", r.packs_read, r.blobs_verified, super::size(r.bytes_verified))
            } else {
                String::new()
            }
        );
        for p in &r.problems {
            println!("problem: {p}");
        }
        for n in &r.notes {
            println!("note: {n}");
        }
        if r.quarantined > 0 || r.newly_quarantined > 0 {
            println!(
                "quarantine: {} damaged location(s) known before this check, {} healed (stored again); {} found now; `mover repair` heals the rest (docs/repair.md)",
                r.quarantined, r.healed, r.newly_quarantined
            );
        }
        for d in &r.damaged {
            let snaps: Vec<String> = d.snapshots.iter().map(|s| s.to_string()).collect();
            println!(
                "damaged: {}: {}; needed by {}",
                d.object,
                d.problem,
                if snaps.is_empty() { "no snapshot".to_string() } else { format!("snapshot(s) {}", snaps.join(", ")) }
            );
        }
        if !r.affected_snapshots.is_empty() {
            println!("{} snapshot(s) do not restore as they are", r.affected_snapshots.len());
        }
    }
    Ok(v.ok(&repo)?)
}
