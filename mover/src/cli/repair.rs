//! `mover repair`: heals damaged blobs (quarantined by check, verify, restore, drill, copy
//! or export) from a second repository or from a volume's data, and reports what stays
//! lost (`docs/repair.md`).

use mover::repo::RepoArgs;
use mover_engine::maint::repair::{repair, RepairSources};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A second repository holding the same data (a copy target, or the repository this
    /// one's snapshots were copied from): a directory, or s3://bucket/prefix.
    #[arg(long, env = "MOVER_FROM_REPOSITORY")]
    from: Option<String>,
    /// File holding the second repository's password (else MOVER_FROM_PASSWORD).
    #[arg(long, env = "MOVER_FROM_PASSWORD_FILE")]
    from_password_file: Option<PathBuf>,
    /// The second repository's S3 endpoint URL, when it differs from this one's.
    #[arg(long)]
    from_s3_endpoint: Option<String>,
    /// The second repository's S3 region, when it differs from this one's.
    #[arg(long)]
    from_s3_region: Option<String>,
    /// A volume's data as it is now, to look for damaged content in: NAME=PATH (a file
    /// or a block device, opened read-only; repeatable).
    #[arg(long = "source", value_name = "VOLUME=PATH")]
    sources: Vec<String>,
    /// Only report what is damaged and which bytes of which snapshots it costs.
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let mut volumes = Vec::new();
    for s in &a.sources {
        let Some((name, path)) = s.split_once('=').filter(|(n, p)| !n.is_empty() && !p.is_empty()) else {
            anyhow::bail!("--source '{s}' must be VOLUME=PATH (e.g. disk0=/dev/vg0/vm1-disk0)");
        };
        volumes.push((name.to_string(), PathBuf::from(path)));
    }
    let repo = ra.open(cancel).await?;
    let from = match &a.from {
        None => None,
        Some(f) => {
            let other = ra.second(f, a.from_password_file.clone(), a.from_s3_endpoint.clone(), a.from_s3_region.clone(), "MOVER_FROM_PASSWORD");
            let r = other.open(cancel).await?;
            if r.config().id == repo.config().id {
                anyhow::bail!("--from {f} is this repository (id {}): give a second one", repo.config().id);
            }
            let idx = mover_engine::index::open_local(&r, &ra.cache_root());
            Some((r, idx))
        }
    };
    let index = mover_engine::index::open_local(&repo, &ra.cache_root());
    let r = repair(&repo, index, RepairSources { from, volumes, dry_run: a.dry_run }, cancel).await?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "repair of {}: {} damaged location(s) quarantined, {} blob(s) without a healthy copy; healed {} from the second repository, {} from sources ({} bytes stored); {} still damaged",
            repo.location(),
            r.quarantined,
            r.unhealed_before,
            r.healed_from_repository,
            r.healed_from_source,
            r.bytes_stored,
            r.unhealed_after
        );
        for l in &r.lost {
            println!("lost: snapshot {} ({}) volume '{}' bytes {}..{} ({} bytes)", l.snapshot, l.group, l.volume, l.offset, l.offset + l.len, l.len);
        }
        if !r.lost_snapshots.is_empty() {
            println!("{} snapshot(s) do not restore whole; every other snapshot restores", r.lost_snapshots.len());
        }
    }
    if r.unhealed_after > 0 && !r.dry_run {
        anyhow::bail!("{} damaged blob(s) could not be healed; {} snapshot(s) keep lost ranges (listed above)", r.unhealed_after, r.lost_snapshots.len());
    }
    Ok(())
}
