//! `mover check`: structure, and with `--read-data` every (or a sample of) blob.

use mover::repo::RepoArgs;
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
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let pct = match (&a.read_data_subset, a.read_data) {
        (Some(s), _) => {
            let n: u32 = s.trim_end_matches('%').parse().map_err(|_| anyhow::anyhow!("--read-data-subset '{s}' is not a percentage like 10%"))?;
            if !(1..=100).contains(&n) {
                anyhow::bail!("--read-data-subset '{s}' must be between 1% and 100%");
            }
            Some(n)
        }
        (None, true) => Some(100),
        (None, false) => None,
    };
    let repo = ra.open(cancel).await?;
    let t0 = std::time::Instant::now();
    let r = mover_engine::maint::check::check(&repo, pct, cancel).await?;
    if a.record {
        let v = mover_engine::maint::report::VerifyResult::from_check(&r, pct.unwrap_or(0), t0.elapsed().as_secs_f64());
        mover_engine::maint::report::record(&repo, mover_engine::maint::report::VERIFY, &v, cancel).await?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "checked repository {}: {} snapshots, {} packs, {} index segments ({} entries){}",
            repo.location(),
            r.snapshots,
            r.packs,
            r.index_segments,
            r.index_entries,
            if pct.is_some() {
                format!("; read {} packs, verified {} blobs ({} bytes)", r.packs_read, r.blobs_verified, r.bytes_verified)
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
    if !r.problems.is_empty() {
        anyhow::bail!("repository {} has {} problem(s)", repo.location(), r.problems.len());
    }
    Ok(())
}
