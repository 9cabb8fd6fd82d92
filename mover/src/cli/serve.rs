//! `mover serve`: the per-node daemon.

use mover::daemon::config::DaemonConfig;
use mover::repo::RepoArgs;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML configuration; without it: a unix socket in the state directory and a local
    /// repository there.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override `listen` (HOST:PORT or unix:PATH).
    #[arg(long)]
    listen: Option<String>,
    /// Override `http_listen`.
    #[arg(long)]
    http_listen: Option<String>,
    /// Override `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// The global repository options name the daemon's `default` repository (`--repo`, its
/// `--password-file` and S3 options) and its cache directory (`--cache-dir`).
pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let mut cfg = DaemonConfig::load(a.config.as_deref())?;
    cfg.override_with(a.listen.as_deref(), a.http_listen.as_deref(), a.state_dir.as_deref())?;
    match ra.repo.as_deref() {
        Some(url) if !url.is_empty() => cfg.use_repository(url, ra.password_file.clone(), ra.s3_endpoint.clone(), ra.s3_region.clone())?,
        _ => {
            if ra.password_file.is_some() || ra.s3_endpoint.is_some() || ra.s3_region.is_some() {
                anyhow::bail!("--password-file and the S3 options of `mover serve` go with --repo (the daemon's default repository); configured repositories take them in [repositories.NAME]");
            }
        }
    }
    if let Some(c) = &ra.cache_dir {
        cfg.cache_dir = c.clone();
    }
    mover::daemon::serve(cfg, cancel.clone()).await?;
    Ok(())
}
