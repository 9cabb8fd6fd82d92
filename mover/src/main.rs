//! The `mover` command. Parsing and dispatch live in `cli/` (one file per command); this
//! file sets up logging, the runtime and Ctrl-C / SIGTERM, and turns the result into an
//! exit code with one line on stderr.

mod cli;

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    mover::init_tls();
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log_filter()).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let result = rt.block_on(async move {
        tokio::spawn(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else { return };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("stopping (what was uploaded is kept)");
            c2.cancel();
        });
        cli::run(cli, cancel).await
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
