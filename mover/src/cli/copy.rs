//! `mover copy --to TARGET`: copy snapshots to a second repository.

use super::{mib, progress_bar};
use mover::plan::copy::CopyRequest;
use mover::plan::Env;
use mover::repo::RepoArgs;
use mover_engine::ops::{self, RepoHandle};
use mover_engine::progress::Progress;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshots to copy (ids or unique prefixes). Without any: every snapshot of the
    /// --group(s), or of every group.
    snapshots: Vec<String>,
    /// The target repository: a directory, or s3://bucket/prefix.
    #[arg(long, env = "MOVER_TO_REPOSITORY")]
    to: String,
    /// File holding the target's password (else MOVER_TO_PASSWORD).
    #[arg(long, env = "MOVER_TO_PASSWORD_FILE")]
    to_password_file: Option<PathBuf>,
    /// The target's S3 endpoint URL, when it differs from the source's.
    #[arg(long)]
    to_s3_endpoint: Option<String>,
    /// The target's S3 region, when it differs from the source's.
    #[arg(long)]
    to_s3_region: Option<String>,
    /// Copy only these groups' snapshots (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Only snapshots newer than the newest one the target has of their group.
    #[arg(long)]
    newer: bool,
    /// Concurrent pack uploads to the target (default: 2 to a directory, 3 to S3).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    uploads: usize,
    /// Upload limit in bytes per second (0: none).
    #[arg(long, default_value_t = 0, value_name = "BYTES_PER_S")]
    limit_upload: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let to = ra.second(&a.to, a.to_password_file.clone(), a.to_s3_endpoint.clone(), a.to_s3_region.clone(), "MOVER_TO_PASSWORD");
    let (src, dst) = tokio::try_join!(ra.open(cancel), to.open(cancel))?;
    let (src, dst) = (RepoHandle::local(src, &ra.cache_root()), RepoHandle::local(dst, &ra.cache_root()));
    let req = CopyRequest {
        snapshots: a.snapshots.clone(),
        groups: a.groups.clone(),
        newer_only: a.newer,
        upload_concurrency: a.uploads,
        upload_limit: a.limit_upload,
    };
    let plan = mover::plan::copy::prepare(req, &Env::operator(), &src.repo, cancel).await?;
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(progress.clone(), !a.json, "copy");
    let r = ops::copy(&src, &dst, plan, progress, cancel).await;
    if let Some(h) = bar {
        h.abort();
    }
    let s = r?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    println!("copy from {} to {}: {} copied, {} already there, in {:.1} s", s.source, s.target, s.copied.len(), s.already_there.len(), s.duration_s);
    for c in &s.copied {
        println!(
            "  {} -> {} ({}){}: read {:.1} MiB, {:.1} MiB new, uploaded {:.1} MiB in {} packs, {:.1} s",
            c.source_id,
            c.target_id,
            c.group,
            c.incremental_to.map(|p| format!(", incremental to {p}")).unwrap_or_default(),
            mib(c.bytes_read),
            mib(c.bytes_new),
            mib(c.bytes_uploaded),
            c.packs_uploaded,
            c.duration_s
        );
    }
    for t in &s.already_there {
        println!("  {} already there as {}", t.source_id, t.target_id);
    }
    Ok(())
}
