//! The command line: one file per command. Each builds a request (or calls a maintenance
//! function of the engine) and renders the result, as text or with `--json`.

mod backup;
mod check;
mod client;
mod copy;
mod drill;
mod export;
mod forget;
mod gc;
mod index;
mod init;
mod key;
mod locks;
mod mount;
mod protect;
mod repair;
mod restore;
mod serve;
mod snapshots;
mod stats;
mod status;

use clap::{Args, Parser, Subcommand};
use mover::repo::RepoArgs;
use mover_engine::progress::Progress;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The version line: version, commit and enabled features.
const VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("MOVER_COMMIT"), "; features: io_uring, s3, nbd, nbd-export, fuse, csi, kubevirt, rocksdb)");

#[derive(Parser, Debug)]
#[command(name = "mover", version = VERSION, about = "Block-level volume backup and restore into a deduplicated, encrypted repository")]
pub struct Cli {
    #[command(flatten)]
    repo: RepoOpts,
    /// Log filter (e.g. info, debug); also MOVER_LOG.
    #[arg(long, global = true, env = "MOVER_LOG")]
    log: Option<String>,
    /// Log lines as text, or as JSON objects (one per line: timestamp, level, fields) for a
    /// log collector. No colour codes unless stderr is a terminal.
    #[arg(long, global = true, env = "MOVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
    /// The repository options given on the command line (not from the environment):
    /// `mover client` refuses them rather than ignore them.
    #[arg(skip)]
    repo_flags_given: Vec<String>,
}

impl Cli {
    /// Parses the command line, noting which repository options it gave.
    pub fn parse_noting_flags() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let m = Self::command().get_matches();
        let mut cli = Self::from_arg_matches(&m).unwrap_or_else(|e| e.exit());
        for (id, flag) in [
            ("repo", "--repo"),
            ("password_file", "--password-file"),
            ("s3_endpoint", "--s3-endpoint"),
            ("s3_region", "--s3-region"),
            ("cache_dir", "--cache-dir"),
        ] {
            if m.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                cli.repo_flags_given.push(flag.to_string());
            }
        }
        cli
    }

    /// The log filter: as given; by default `warn`, and `info` for the daemon (its startup
    /// line says where it listens).
    pub fn log_filter(&self) -> String {
        let level = match (&self.log, &self.cmd) {
            (Some(l), _) => return l.clone(),
            (None, Cmd::Serve(_)) => "info",
            (None, _) => "warn",
        };
        // The AWS SDK's own warnings (each attempt of each credential provider) say less
        // than the error Mover reports.
        format!("{level},aws_config=error,aws_runtime=error")
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
struct RepoOpts {
    /// Repository: a directory, or s3://bucket/prefix. For `serve`: its default
    /// repository (without [repositories] in its configuration). Not for `client`.
    #[arg(long, short = 'r', global = true, env = "MOVER_REPOSITORY", help_heading = "Repository options")]
    repo: Option<String>,
    /// File holding the password (else MOVER_PASSWORD).
    #[arg(long, global = true, env = "MOVER_PASSWORD_FILE", help_heading = "Repository options")]
    password_file: Option<PathBuf>,
    /// S3 endpoint URL with its scheme (else AWS_ENDPOINT_URL).
    #[arg(long, global = true, help_heading = "Repository options")]
    s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, else us-east-1).
    #[arg(long, global = true, help_heading = "Repository options")]
    s3_region: Option<String>,
    /// Directory of the local index cache (else MOVER_CACHE_DIR, else ~/.cache/mover).
    #[arg(long, global = true, help_heading = "Repository options")]
    cache_dir: Option<PathBuf>,
}

impl From<RepoOpts> for RepoArgs {
    fn from(o: RepoOpts) -> Self {
        RepoArgs {
            repo: o.repo,
            password_file: o.password_file,
            s3_endpoint: o.s3_endpoint,
            s3_region: o.s3_region,
            cache_dir: o.cache_dir,
            password_env: None,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a repository.
    Init(init::Args),
    /// Back up block devices or disk-image files into one snapshot.
    Backup(backup::Args),
    /// Restore a snapshot's volume(s) onto a block device or file.
    Restore(restore::Args),
    /// Prove a snapshot restores: restore it into scratch space, compare with the digests
    /// recorded at backup, report throughput and the restore time to expect; clean up.
    Drill(drill::Args),
    /// Copy snapshots to another repository (a second site): only what the target lacks is
    /// sent, re-encrypted with its keys; resumable; the copies keep group, time and tags.
    Copy(copy::Args),
    /// Serve a snapshot's volume read-only over NBD, straight from the repository.
    Export(export::Args),
    /// Mount the snapshots read-only (FUSE): volumes as .img files, for file-level restore.
    Mount(mount::Args),
    /// List snapshots.
    Snapshots(snapshots::ListArgs),
    /// Show one snapshot.
    Show(snapshots::ShowArgs),
    /// The local index cache.
    #[command(subcommand)]
    Index(index::Cmd),
    /// Key files (passwords) of the repository.
    #[command(subcommand)]
    Key(key::Cmd),
    /// Check the repository: structure, and with --read-data every blob.
    Check(check::Args),
    /// Heal damaged blobs from a second repository (--from) or a volume's data (--source),
    /// and list the snapshots and byte ranges that stay lost (docs/repair.md).
    Repair(repair::Args),
    /// Remove snapshots by retention policy (per group); data is freed by gc.
    Forget(forget::Args),
    /// Keep a snapshot from forget (by policy or by id) until it is unprotected.
    Protect(protect::ProtectArgs),
    /// Remove a snapshot's protection (a delete: needs credentials that may delete).
    Unprotect(protect::UnprotectArgs),
    /// Free the space of forgotten snapshots: delete unreferenced packs, repack mostly
    /// unused ones, rewrite the index. Safe while backups run (docs/gc.md).
    Gc(gc::Args),
    /// List the locks held on the repository (backups, gc, forget).
    Locks(locks::ListArgs),
    /// Remove locks left by crashed processes (expired, or of a process gone from this host).
    Unlock(locks::UnlockArgs),
    /// Sizes, dedup and compression ratios, per-snapshot unique size.
    Stats(stats::Args),
    /// Recovery points and times per group: age of the newest, newest verified and newest
    /// drilled snapshot, and the restore time to expect.
    Status(status::Args),
    /// Run the per-node daemon (gRPC API, /metrics, /healthz, /readyz).
    Serve(serve::Args),
    /// Talk to a daemon.
    Client(client::Args),
    /// Write the seccomp profile built into this binary (deploy/seccomp/mover.json) to
    /// DIR/mover.json: what the DaemonSet's init container runs on each node.
    InstallSeccompProfile {
        /// The kubelet's seccomp directory (e.g. /var/lib/kubelet/seccomp).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Hold a volume and do nothing until stopped (SIGTERM): what the pod that exposes a
    /// Velero DataUpload's snapshot on a node runs (docs/velero.md).
    #[command(hide = true)]
    Hold,
}

pub async fn run(cli: Cli, cancel: CancellationToken) -> anyhow::Result<()> {
    let ra: RepoArgs = cli.repo.clone().into();
    match cli.cmd {
        Cmd::Init(a) => init::run(&ra, a, &cancel).await,
        Cmd::Backup(a) => backup::run(&ra, a, &cancel).await,
        Cmd::Restore(a) => restore::run(&ra, a, &cancel).await,
        Cmd::Export(a) => export::run(&ra, a, &cancel).await,
        Cmd::Drill(a) => drill::run(&ra, a, &cancel).await,
        Cmd::Copy(a) => copy::run(&ra, a, &cancel).await,
        Cmd::Mount(a) => mount::run(&ra, a, &cancel).await,
        Cmd::Snapshots(a) => snapshots::list(&ra, a, &cancel).await,
        Cmd::Show(a) => snapshots::show(&ra, a, &cancel).await,
        Cmd::Index(c) => index::run(&ra, c, &cancel).await,
        Cmd::Key(c) => key::run(&ra, c, &cancel).await,
        Cmd::Check(a) => check::run(&ra, a, &cancel).await,
        Cmd::Repair(a) => repair::run(&ra, a, &cancel).await,
        Cmd::Forget(a) => forget::run(&ra, a, &cancel).await,
        Cmd::Protect(a) => protect::protect(&ra, a, &cancel).await,
        Cmd::Unprotect(a) => protect::unprotect(&ra, a, &cancel).await,
        Cmd::Gc(a) => gc::run(&ra, a, &cancel).await,
        Cmd::Locks(a) => locks::list(&ra, a, &cancel).await,
        Cmd::Unlock(a) => locks::unlock(&ra, a, &cancel).await,
        Cmd::Stats(a) => stats::run(&ra, a, &cancel).await,
        Cmd::Status(a) => status::run(&ra, a, &cancel).await,
        Cmd::Serve(a) => serve::run(&ra, a, &cancel).await,
        Cmd::Client(a) => {
            if !cli.repo_flags_given.is_empty() {
                anyhow::bail!(
                    "mover client does not take {}: the daemon opens its repositories from its configuration; name one with --repository",
                    cli.repo_flags_given.join(", ")
                );
            }
            client::run(a).await
        }
        Cmd::InstallSeccompProfile { dir } => install_seccomp_profile(&dir),
        Cmd::Hold => {
            cancel.cancelled().await;
            Ok(())
        }
    }
}

/// deploy/seccomp/mover.json, built in.
const SECCOMP_PROFILE: &str = include_str!("../../../deploy/seccomp/mover.json");

/// Writes [`SECCOMP_PROFILE`] to `dir/mover.json` (mode 0644) with
/// [`mover::replace_file`], so the kubelet never reads half a profile; an identical file
/// is left.
fn install_seccomp_profile(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("mover.json");
    if std::fs::read(&path).ok().as_deref() == Some(SECCOMP_PROFILE.as_bytes()) {
        println!("{} is up to date", path.display());
        return Ok(());
    }
    mover::replace_file(&path, SECCOMP_PROFILE.as_bytes(), 0o644).with_context(|| format!("writing {}", path.display()))?;
    println!("installed {}", path.display());
    Ok(())
}

/// A progress bar on stderr while `progress` advances, when stderr is a terminal. It stays
/// hidden until the total is known (never a full bar at "0 B/0 B"), and ends at what was
/// done (never frozen at a stale 90 %).
pub fn progress_bar(progress: Arc<Progress>, enabled: bool, label: &'static str) -> Option<Bar> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = bar(label);
    let (p, b) = (progress.clone(), pb.clone());
    let task = tokio::spawn(async move {
        loop {
            let total = p.total();
            if total > 0 {
                b.set_length(total);
                b.set_position(p.done().min(total));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Some(Bar { task, pb, progress })
}

/// A running progress bar; [`Bar::abort`] draws its last state and clears it.
pub struct Bar {
    task: tokio::task::JoinHandle<()>,
    pb: indicatif::ProgressBar,
    progress: Arc<Progress>,
}

impl Bar {
    /// Stops updating, shows where the work ended, and clears the bar (the command's
    /// summary follows).
    pub fn abort(self) {
        self.task.abort();
        let (total, done) = (self.progress.total(), self.progress.done());
        if total > 0 {
            self.pb.set_length(total);
            self.pb.set_position(done.min(total));
        }
        self.pb.finish_and_clear();
    }
}

/// The progress bar style every command uses.
pub fn bar(label: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(label.to_string());
    pb
}

/// `K=V` values of a repeatable flag.
pub fn key_values(items: &[String], what: &str) -> anyhow::Result<Vec<(String, String)>> {
    items.iter().map(|t| mover::plan::split_kv(t, what).map(|(k, v)| (k.to_string(), v.to_string())).map_err(Into::into)).collect()
}

/// A size for people: binary units ("1.50 GiB"); `--json` keeps exact bytes.
pub fn size(b: u64) -> String {
    indicatif::BinaryBytes(b).to_string()
}

pub fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}
