//! `mover serve`: the per-node daemon.

use mover::daemon::config::DaemonConfig;
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

pub async fn run(a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let mut cfg = DaemonConfig::load(a.config.as_deref())?;
    cfg.override_with(a.listen.as_deref(), a.http_listen.as_deref(), a.state_dir.as_deref(), a.config.is_some())?;
    mover::daemon::serve(cfg, cancel.clone()).await?;
    Ok(())
}
