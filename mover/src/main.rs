//! The `mover` command: repository CLI (init, backup, restore, snapshots, show, index, key).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mover::metrics::Progress;
use mover::open::{open_local_index, RepoArgs};
use mover::pipeline::backup::{backup, BackupOptions, ParentSpec, VolumeSpec};
use mover::pipeline::reader::IoChoice;
use mover::pipeline::restore::{restore_volume, HoleMode, RestoreOptions};
use mover_format::config::CompressionConfig;
use mover_format::crypto::KdfParams;
use mover_format::local_index;
use mover_format::{InitOptions, Repository};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "mover", version, about = "Block-level volume backup and restore into a deduplicated, encrypted repository")]
struct Cli {
    #[command(flatten)]
    repo: RepoOpts,
    /// Log filter (e.g. info, debug); also MOVER_LOG.
    #[arg(long, global = true, env = "MOVER_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct RepoOpts {
    /// Repository: a directory, or s3://bucket/prefix.
    #[arg(long, short = 'r', global = true, env = "MOVER_REPOSITORY")]
    repo: Option<String>,
    /// File holding the password (else MOVER_PASSWORD).
    #[arg(long, global = true, env = "MOVER_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// S3 endpoint URL (else AWS_ENDPOINT_URL).
    #[arg(long, global = true)]
    s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, else us-east-1).
    #[arg(long, global = true)]
    s3_region: Option<String>,
    /// Directory of the local index cache (else MOVER_CACHE_DIR, else ~/.cache/mover).
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
}

impl From<RepoOpts> for RepoArgs {
    fn from(o: RepoOpts) -> Self {
        RepoArgs { repo: o.repo, password_file: o.password_file, s3_endpoint: o.s3_endpoint, s3_region: o.s3_region, cache_dir: o.cache_dir }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a repository.
    Init {
        /// zstd level for new blobs (0 = no compression).
        #[arg(long, default_value_t = 1)]
        compression_level: i32,
        /// Target pack size in MiB.
        #[arg(long, default_value_t = 16)]
        pack_size_mib: u32,
        #[arg(long)]
        json: bool,
    },
    /// Back up block devices or disk-image files into one snapshot.
    Backup(BackupArgs),
    /// Restore a snapshot's volume(s) onto a block device or file.
    Restore {
        /// SNAPSHOT or SNAPSHOT:VOLUME (id, unique prefix, or `latest`).
        snapshot: String,
        /// Target device or file; a directory when restoring several volumes.
        target: PathBuf,
        /// How to treat holes (zero runs) on the target.
        #[arg(long, value_enum, default_value_t = HoleMode::Auto)]
        holes: HoleMode,
        /// Segments restored concurrently.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    Snapshots {
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot.
    Show {
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
    /// The local index cache.
    #[command(subcommand)]
    Index(IndexCmd),
    /// Key files (passwords) of the repository.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Check the repository: structure, and with --read-data every blob.
    Check {
        /// Download and verify every pack and blob.
        #[arg(long)]
        read_data: bool,
        /// Download and verify a deterministic N % sample of the packs (e.g. 10%).
        #[arg(long, value_name = "N%")]
        read_data_subset: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots by retention policy (per group of volumes); data is freed by gc.
    Forget {
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        #[arg(long, default_value_t = 0)]
        keep_hourly: usize,
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        #[arg(long, default_value_t = 0)]
        keep_monthly: usize,
        #[arg(long, default_value_t = 0)]
        keep_yearly: usize,
        /// K=V, repeatable: always keep snapshots with this tag.
        #[arg(long = "keep-tag", value_name = "K=V")]
        keep_tags: Vec<String>,
        /// Show the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Free the space of forgotten snapshots: delete unreferenced packs, repack mostly
    /// unused ones, rewrite the index. Safe while backups run (docs/gc.md).
    Gc {
        /// Print the plan (what would be deleted and copied), change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Repack a pack when more than this share of its bytes is unreferenced.
        #[arg(long, default_value_t = 0.3, value_name = "SHARE")]
        repack_unused: f64,
        #[arg(long)]
        json: bool,
    },
    /// List the locks held on the repository (backups, gc, forget).
    Locks {
        #[arg(long)]
        json: bool,
    },
    /// Remove locks left by crashed processes (expired, or of a process gone from this host).
    Unlock {
        /// Remove every lock, also live ones. Only when you know their holders are gone.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Sizes, dedup and compression ratios, per-snapshot unique size.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Run the per-node daemon (gRPC API, /metrics, /healthz, /readyz).
    Serve {
        /// TOML configuration; without it: 127.0.0.1, a local repository in the state directory.
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
    },
    /// Talk to a daemon.
    Client(ClientArgs),
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// http://HOST:PORT, https://HOST:PORT or unix:PATH.
    #[arg(long, env = "MOVER_SERVER", default_value = "http://127.0.0.1:7600")]
    server: String,
    /// CA certificate of the server (https).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate and key (mTLS).
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: ClientCmd,
}

#[derive(Subcommand, Debug)]
enum ClientCmd {
    StartBackup {
        #[arg(long, default_value = "default")]
        repository: String,
        /// NAME=PATH, repeatable.
        #[arg(long = "volume", value_name = "NAME=PATH")]
        volumes: Vec<String>,
        /// NAME=PODUID/VOLUME, repeatable: a pod's volume under the kubelet root.
        #[arg(long = "pod-volume", value_name = "NAME=PODUID/VOLUME")]
        pod_volumes: Vec<String>,
        #[arg(long, default_value = "")]
        parent: String,
        #[arg(long, default_value = "")]
        request_id: String,
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<String>,
        /// Upload limit for this transfer, bytes per second.
        #[arg(long, default_value_t = 0)]
        bandwidth_limit: u64,
        /// Follow progress until the transfer ends.
        #[arg(long)]
        watch: bool,
    },
    StartRestore {
        #[arg(long, default_value = "default")]
        repository: String,
        #[arg(long)]
        snapshot: String,
        #[arg(long, default_value = "")]
        volume: String,
        #[arg(long)]
        target: String,
        #[arg(long, default_value = "")]
        request_id: String,
        #[arg(long)]
        watch: bool,
    },
    Get {
        id: String,
    },
    Watch {
        id: String,
    },
    Cancel {
        id: String,
    },
    List,
    Snapshots {
        #[arg(long, default_value = "default")]
        repository: String,
    },
}

#[derive(Subcommand, Debug)]
enum IndexCmd {
    /// Bring the local index up to date with the store's index segments.
    Sync {
        #[arg(long)]
        json: bool,
    },
    /// Delete the local index and rebuild it from index segments, and from pack trailers
    /// for packs no readable index segment names (writing new segments for them).
    Rebuild {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a password; the new one from MOVER_NEW_PASSWORD or --new-password-file.
    Add {
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// Remove a key file by id.
    Remove { id: String },
    /// Change the password: add a key with the new password, remove the current one.
    Passwd {
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct BackupArgs {
    /// A single source (block device or file): short for --volume disk=SOURCE.
    source: Option<PathBuf>,
    /// Volume name for the positional source.
    #[arg(long, default_value = "disk")]
    name: String,
    /// NAME=SOURCE, repeatable: the disks of one VM, taken together.
    #[arg(long = "volume", value_name = "NAME=SOURCE")]
    volumes: Vec<String>,
    /// Parent snapshot: an id, a unique prefix, or `latest` (same volume name and source).
    #[arg(long)]
    parent: Option<String>,
    /// Changed extents: FILE for the single volume, or NAME=FILE per volume.
    #[arg(long = "changed-extents", value_name = "[NAME=]FILE")]
    changed_extents: Vec<String>,
    /// Read the volume (named by --name) over NBD: nbd+unix:///EXPORT?socket=PATH or
    /// nbd://HOST[:PORT]/EXPORT.
    #[arg(long, value_name = "URI")]
    nbd: Option<String>,
    /// QEMU dirty bitmap on the NBD export holding the changes since the parent's
    /// checkpoint (the parent must have been taken with --checkpoint NAME).
    #[arg(long, value_name = "NAME", requires = "nbd")]
    nbd_bitmap: Option<String>,
    /// Record NAME as the change-tracking checkpoint this snapshot was taken at (the bitmap
    /// or CSI snapshot the next incremental starts from).
    #[arg(long, value_name = "NAME")]
    checkpoint: Option<String>,
    /// CSI SnapshotMetadata service (HOST:PORT, TLS) to ask for allocated (full) or changed
    /// (incremental) blocks of the single volume.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["cbt_ca", "cbt_token", "cbt_snapshot"])]
    cbt_csi: Option<String>,
    /// CA certificate (PEM) of the SnapshotMetadata service.
    #[arg(long, value_name = "FILE")]
    cbt_ca: Option<PathBuf>,
    /// File holding the security token (e.g. a projected service-account token).
    #[arg(long, value_name = "FILE")]
    cbt_token: Option<PathBuf>,
    #[arg(long, value_name = "NS", default_value = "default")]
    cbt_namespace: String,
    /// The VolumeSnapshot being backed up.
    #[arg(long, value_name = "NAME")]
    cbt_snapshot: Option<String>,
    /// CSI handle of the base snapshot (default: the parent's recorded checkpoint).
    #[arg(long, value_name = "ID")]
    cbt_base_id: Option<String>,
    /// TLS server name of the service, when it differs from the host.
    #[arg(long, value_name = "NAME")]
    cbt_server_name: Option<String>,
    /// NAME=FILE, repeatable: opaque metadata stored with the snapshot (e.g. VM YAML).
    #[arg(long = "metadata", value_name = "NAME=FILE")]
    metadata: Vec<String>,
    /// K=V, repeatable.
    #[arg(long = "tag", value_name = "K=V")]
    tags: Vec<String>,
    /// Read path.
    #[arg(long, value_enum, default_value_t = IoChoice::Auto)]
    io: IoChoice,
    /// Segment reads in flight.
    #[arg(long, default_value_t = 4)]
    queue_depth: usize,
    /// Chunking/compression threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Concurrent pack uploads (default: 2 to a local directory, 3 to S3).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    uploads: usize,
    /// Upload limit in bytes per second (0: none).
    #[arg(long, default_value_t = 0, value_name = "BYTES_PER_S")]
    limit_upload: u64,
    #[arg(long)]
    json: bool,
}

fn split_kv<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
        _ => bail!("{what} '{s}' is not of the form NAME=VALUE"),
    }
}

fn progress_bar(progress: Arc<Progress>, enabled: bool, label: &'static str) -> Option<tokio::task::JoinHandle<()>> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(label);
    Some(tokio::spawn(async move {
        loop {
            pb.set_length(progress.total());
            pb.set_position(progress.done());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}

async fn run(cli: Cli, cancel: CancellationToken) -> Result<()> {
    let ra: RepoArgs = cli.repo.clone().into();
    match cli.cmd {
        Cmd::Serve { config, listen, http_listen, state_dir } => {
            let mut cfg = mover::daemon::config::DaemonConfig::load(config.as_deref())?;
            if let Some(l) = listen {
                cfg.listen = mover::daemon::config::parse_listen(&l)?;
            }
            if let Some(h) = http_listen {
                cfg.http_listen = h.parse().with_context(|| format!("--http-listen '{h}'"))?;
            }
            if let Some(s) = state_dir {
                if config.is_none() {
                    // Keep the embedded defaults inside the given state directory.
                    for r in cfg.repositories.values_mut() {
                        if r.init_if_missing {
                            r.url = s.join("repository").display().to_string();
                            r.password_file = Some(s.join("default-repository.password"));
                        }
                    }
                    cfg.cache_dir = s.join("cache");
                }
                cfg.state_dir = s;
            }
            if let mover::daemon::config::Listen::Tcp(a) = &cfg.listen {
                if !a.ip().is_loopback() && cfg.tls.is_none() && std::env::var("MOVER_INSECURE_PLAINTEXT").as_deref() != Ok("1") {
                    bail!("listen address {a} is not loopback: configure [tls] (mTLS) or set insecure_plaintext = true");
                }
            }
            let stop = cancel.clone();
            mover::daemon::serve(cfg, stop).await?;
        }
        Cmd::Client(c) => client(c).await?,
        Cmd::Check { read_data, read_data_subset, json } => {
            let pct = match (&read_data_subset, read_data) {
                (Some(s), _) => {
                    let n: u32 = s.trim_end_matches('%').parse().map_err(|_| anyhow!("--read-data-subset '{s}' is not a percentage like 10%"))?;
                    if !(1..=100).contains(&n) {
                        bail!("--read-data-subset '{s}' must be between 1% and 100%");
                    }
                    Some(n)
                }
                (None, true) => Some(100),
                (None, false) => None,
            };
            let repo = ra.open(&cancel).await?;
            let r = mover::maint::check(&repo, pct, &cancel).await?;
            if json {
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
            }
            if !r.problems.is_empty() {
                bail!("repository {} has {} problem(s)", repo.location(), r.problems.len());
            }
        }
        Cmd::Forget { keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_tags, dry_run, json } => {
            let mut tags = Vec::new();
            for t in &keep_tags {
                let (k, v) = split_kv(t, "--keep-tag")?;
                tags.push((k.to_string(), v.to_string()));
            }
            let policy = mover::forget::Policy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
                tags,
            };
            let repo = ra.open(&cancel).await?;
            let snaps = repo.snapshots(&cancel).await?;
            let groups = mover::forget::plan(&snaps, &policy)?;
            let removed = if dry_run { 0 } else { mover::forget::execute(&repo, &groups, &cancel).await? };
            if json {
                println!("{}", serde_json::json!({"dry_run": dry_run, "removed": removed, "groups": groups}));
            } else {
                for g in &groups {
                    println!("group {}", g.key);
                    for d in &g.snapshots {
                        let what = if d.keep {
                            format!("keep   ({})", d.reasons.join(", "))
                        } else if dry_run {
                            "would remove".into()
                        } else {
                            "removed".into()
                        };
                        println!("  {} {}  {what}", &d.id.to_hex()[..16], fmt_time(d.time_unix_ms));
                    }
                }
                let n: usize = groups.iter().map(|g| g.snapshots.iter().filter(|d| !d.keep).count()).sum();
                if dry_run {
                    println!("dry run: {n} snapshot(s) would be removed; nothing changed");
                } else {
                    println!("removed {removed} snapshot(s); run gc to free their data");
                }
            }
        }
        Cmd::Gc { dry_run, repack_unused, json } => {
            let repo = ra.open(&cancel).await?;
            let r = mover::gc::run(&repo, &mover::gc::GcOptions { dry_run, repack_unused }, &cancel).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let mib = |b: u64| b as f64 / (1 << 20) as f64;
                println!(
                    "{}gc of repository {}: {} snapshots, {} packs ({:.1} MiB)",
                    if dry_run { "dry run: " } else { "" },
                    repo.location(),
                    r.snapshots,
                    r.packs_before,
                    mib(r.bytes_before)
                );
                println!("  unreferenced packs   {}", r.packs_unreferenced);
                println!(
                    "  packs to repack      {} ({:.1} MiB of live blobs {})",
                    r.packs_repacked,
                    mib(r.bytes_copied),
                    if dry_run { "to copy" } else { "copied" }
                );
                println!("  unindexed packs      {}", r.packs_unindexed);
                if dry_run {
                    for p in r.plan.iter().take(50) {
                        println!("  {:9} pack {}  {:8.1} MiB, {:8.1} MiB referenced", p.action, p.pack, mib(p.size), mib(p.referenced_bytes));
                    }
                    if r.plan.len() > 50 {
                        println!("  … and {} more packs (--json lists all)", r.plan.len() - 50);
                    }
                    println!("  would free           {:.1} MiB (if no backup holds it back); nothing changed", mib(r.bytes_freed));
                } else {
                    println!("  deleted              {} packs, {:.1} MiB freed", r.packs_deleted, mib(r.bytes_freed));
                    if r.entries_resurrected > 0 {
                        println!("  kept                 {} blobs that snapshots written meanwhile use", r.entries_resurrected);
                    }
                    if r.bytes_held_back > 0 {
                        println!("  held back            {:.1} MiB until these finish (run gc again later):", mib(r.bytes_held_back));
                        for h in &r.held_by {
                            println!("    {h}");
                        }
                    }
                    if r.stale_locks_removed > 0 {
                        println!("  stale locks removed  {}", r.stale_locks_removed);
                    }
                }
            }
        }
        Cmd::Locks { json } => {
            let repo = ra.open(&cancel).await?;
            let l = mover::lock::list(&repo, &cancel).await?;
            if json {
                println!("{}", serde_json::to_string(&l)?);
            } else if l.is_empty() {
                println!("no locks in repository {}", repo.location());
            } else {
                for v in &l {
                    println!("{}{}", v.describe(), v.stale.as_ref().map(|s| format!(": stale, {s}")).unwrap_or_default());
                }
            }
        }
        Cmd::Unlock { force, json } => {
            let repo = ra.open(&cancel).await?;
            let removed = mover::lock::unlock(&repo, force, &cancel).await?;
            let left = mover::lock::list(&repo, &cancel).await?;
            if json {
                println!("{}", serde_json::json!({"removed": removed, "remaining": left}));
            } else {
                for v in &removed {
                    println!("removed {}{}", v.describe(), v.stale.as_ref().map(|s| format!(" ({s})")).unwrap_or_else(|| " (live; --force)".into()));
                }
                println!(
                    "removed {} lock(s); {} live lock(s) remain{}",
                    removed.len(),
                    left.len(),
                    if left.is_empty() || force { "" } else { " (use --force only when their holders are gone)" }
                );
            }
        }
        Cmd::Stats { json } => {
            let repo = ra.open(&cancel).await?;
            let s = mover::maint::stats(&repo, &cancel).await?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("snapshots          {}", s.snapshots);
                println!("logical size       {} bytes (all volumes of all snapshots)", s.logical_bytes);
                println!("referenced data    {} bytes (holes excluded)", s.referenced_bytes);
                println!("unique data        {} bytes in {} chunks", s.unique_bytes, s.chunks);
                println!("stored             {} bytes in {} packs", s.stored_bytes, s.packs);
                println!("dedup ratio        {:.2}", s.dedup_ratio);
                println!("compression ratio  {:.2}", s.compression_ratio);
                for p in &s.per_snapshot {
                    println!("  {}  logical {}  unique {}", &p.id.to_hex()[..16], p.logical_bytes, p.unique_bytes);
                }
            }
        }
        Cmd::Init { compression_level, pack_size_mib, json } => {
            if !(1..=256).contains(&pack_size_mib) {
                bail!("--pack-size-mib {pack_size_mib}: must be between 1 and 256");
            }
            let storage = ra.storage().await?;
            let pw = ra.password()?;
            let kdf = match std::env::var("MOVER_INSECURE_TEST_KDF") {
                Ok(v) if v == "1" => KdfParams::insecure_for_tests(),
                _ => KdfParams::default(),
            };
            let opts = InitOptions {
                compression: CompressionConfig { algorithm: "zstd".into(), level: compression_level },
                pack_size: pack_size_mib * 1024 * 1024,
                kdf,
                ..Default::default()
            };
            let repo = Repository::init(storage, &pw, opts, &cancel).await?;
            if json {
                println!("{}", serde_json::json!({"repository": repo.location(), "id": repo.config().id, "key": repo.key_id()}));
            } else {
                println!("created repository {} (id {})", repo.location(), repo.config().id);
            }
        }
        Cmd::Backup(b) => {
            let mut specs: Vec<VolumeSpec> = Vec::new();
            if let Some(s) = &b.source {
                specs.push(VolumeSpec { name: b.name.clone(), source: s.clone(), ..Default::default() });
            }
            for v in &b.volumes {
                let (n, s) = split_kv(v, "--volume")?;
                specs.push(VolumeSpec { name: n.into(), source: s.into(), ..Default::default() });
            }
            if let Some(uri) = &b.nbd {
                mover::nbd::parse_uri(uri)?;
                specs.push(VolumeSpec {
                    name: b.name.clone(),
                    source: uri.into(),
                    nbd: Some(mover::pipeline::backup::NbdSpec { uri: uri.clone(), bitmap: b.nbd_bitmap.clone() }),
                    ..Default::default()
                });
            }
            if let Some(c) = &b.checkpoint {
                for s in specs.iter_mut() {
                    s.checkpoint = Some(c.clone());
                }
            }
            if let Some(ep) = &b.cbt_csi {
                if specs.len() != 1 {
                    bail!("--cbt-csi applies to a single volume; {} were given", specs.len());
                }
                specs[0].csi = Some(mover::csi::CsiSpec {
                    endpoint: ep.clone(),
                    ca: b.cbt_ca.clone().unwrap_or_default(),
                    token_file: b.cbt_token.clone().unwrap_or_default(),
                    server_name: b.cbt_server_name.clone(),
                    namespace: b.cbt_namespace.clone(),
                    snapshot: b.cbt_snapshot.clone().unwrap_or_default(),
                    base_id: b.cbt_base_id.clone(),
                });
            }
            for ce in &b.changed_extents {
                let (name, file) = match ce.split_once('=') {
                    Some((n, f)) if specs.iter().any(|s| s.name == n) => (n.to_string(), PathBuf::from(f)),
                    _ if specs.len() == 1 => (specs[0].name.clone(), PathBuf::from(ce)),
                    _ => bail!("--changed-extents '{ce}': with several volumes, give NAME=FILE naming one of them"),
                };
                let ext = mover::extents::read(&file)?;
                if let Some(s) = specs.iter_mut().find(|s| s.name == name) {
                    s.changed = Some(ext);
                }
            }
            let mut metadata = Vec::new();
            for m in &b.metadata {
                let (n, f) = split_kv(m, "--metadata")?;
                let bytes = std::fs::read(f).with_context(|| format!("reading metadata file {f}"))?;
                if bytes.len() > 64 << 20 {
                    bail!("metadata file {f} is larger than 64 MiB");
                }
                metadata.push((n.to_string(), bytes));
            }
            let mut tags = BTreeMap::new();
            for t in &b.tags {
                let (k, v) = split_kv(t, "--tag")?;
                tags.insert(k.to_string(), v.to_string());
            }
            let parent = match b.parent.as_deref() {
                None => ParentSpec::None,
                Some("latest") => ParentSpec::Latest,
                Some(s) => ParentSpec::Id(s.to_string()),
            };
            let mut opts = BackupOptions {
                volumes: specs,
                metadata,
                parent,
                tags,
                io: b.io,
                queue_depth: b.queue_depth,
                upload_concurrency: b.uploads,
                ..Default::default()
            };
            if let Some(w) = b.workers {
                opts.workers = w;
            }
            if b.limit_upload > 0 {
                opts.limiters.push(Arc::new(mover::ratelimit::RateLimiter::new(b.limit_upload)));
            }
            if opts.volumes.is_empty() {
                bail!("nothing to back up: give a SOURCE, --volume NAME=SOURCE or --nbd URI");
            }
            let repo = ra.open(&cancel).await?;
            let index = open_local_index(&repo, &ra.cache_root());
            let progress = Arc::new(Progress::default());
            let bar = progress_bar(progress.clone(), !b.json, "backup");
            let r = backup(&repo, index, opts, progress, &cancel).await;
            if let Some(h) = bar {
                h.abort();
            }
            let s = r?;
            if b.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                let st = &s.stats;
                println!("snapshot {} saved", s.snapshot_id);
                if let Some(p) = s.parent {
                    println!("  parent          {p}");
                }
                println!("  volume bytes    {}", st.bytes_total);
                println!("  read            {} ({} reused from parent)", st.bytes_read, st.bytes_reused_parent);
                println!("  skipped         {} (unchanged per extents)", st.bytes_skipped);
                println!("  zero            {}", st.bytes_zero);
                println!("  new             {} in {} chunks, stored as {}", st.bytes_new, st.chunks_new, st.bytes_stored);
                println!("  deduplicated    {} chunks", st.chunks_dedup);
                println!("  took            {:.2} s via {}", s.duration_s, s.io_backend);
            }
        }
        Cmd::Restore { snapshot, target, holes, concurrency, json } => {
            let repo = ra.open(&cancel).await?;
            let (snap_s, vol_name) = match snapshot.split_once(':') {
                Some((s, v)) => (s.to_string(), Some(v.to_string())),
                None => (snapshot.clone(), None),
            };
            let snap_id = if snap_s == "latest" {
                repo.snapshots(&cancel).await?.last().map(|(id, _)| *id).ok_or_else(|| anyhow!("repository {} has no snapshots", repo.location()))?
            } else {
                repo.resolve_snapshot(&snap_s, &cancel).await?
            };
            let m = repo.read_snapshot(&snap_id, &cancel).await?;
            let vols: Vec<_> = match &vol_name {
                Some(v) => vec![m.volume(v).cloned().ok_or_else(|| {
                    anyhow!(
                        "snapshot {snap_id} has no volume named '{v}' (it has: {})",
                        m.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
                    )
                })?],
                None => m.volumes.clone(),
            };
            let targets: Vec<PathBuf> = if vols.len() == 1 {
                vec![target.clone()]
            } else {
                if !target.is_dir() {
                    bail!(
                        "snapshot {snap_id} has {} volumes: the target {} must be a directory (or name one volume as SNAPSHOT:VOLUME)",
                        vols.len(),
                        target.display()
                    );
                }
                vols.iter().map(|v| target.join(format!("{}.img", v.name))).collect()
            };
            let index = mover::gc::with_pending(&repo, open_local_index(&repo, &ra.cache_root()), &cancel).await?;
            let progress = Arc::new(Progress::default());
            let bar = progress_bar(progress.clone(), !json, "restore");
            let mut out = Vec::new();
            for (v, t) in vols.iter().zip(&targets) {
                let r = restore_volume(&repo, index.clone(), &snap_id, v, t, &RestoreOptions { holes, concurrency }, progress.clone(), &cancel).await;
                match r {
                    Ok(s) => out.push(s),
                    Err(e) => {
                        if let Some(h) = &bar {
                            h.abort();
                        }
                        return Err(e);
                    }
                }
            }
            if let Some(h) = bar {
                h.abort();
            }
            if json {
                let bytes_written: u64 = out.iter().map(|s| s.bytes_written).sum();
                let bytes_holes: u64 = out.iter().map(|s| s.bytes_holes).sum();
                let duration_s: f64 = out.iter().map(|s| s.duration_s).sum();
                let io_backend = out.first().map(|s| s.io_backend.clone()).unwrap_or_default();
                println!(
                    "{}",
                    serde_json::json!({"snapshot_id": snap_id, "bytes_written": bytes_written, "bytes_holes": bytes_holes, "duration_s": duration_s, "io_backend": io_backend, "volumes": out})
                );
            } else {
                for s in &out {
                    println!(
                        "restored volume '{}' of snapshot {} to {}: {} bytes written, {} bytes of holes, {:.2} s",
                        s.volume,
                        s.snapshot_id,
                        s.target.display(),
                        s.bytes_written,
                        s.bytes_holes,
                        s.duration_s
                    );
                }
            }
        }
        Cmd::Snapshots { json } => {
            let repo = ra.open(&cancel).await?;
            let snaps = repo.snapshots(&cancel).await?;
            if json {
                let v: Vec<_> = snaps
                    .iter()
                    .map(|(id, m)| {
                        serde_json::json!({"id": id, "time": fmt_time(m.time_unix_ms), "time_unix_ms": m.time_unix_ms, "hostname": m.hostname, "parent": m.parent, "tags": m.tags,
                            "volumes": m.volumes.iter().map(|v| serde_json::json!({"name": v.name, "size": v.size, "source": v.source, "change_source": v.change_source})).collect::<Vec<_>>()})
                    })
                    .collect();
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{:<16} {:<20} {:<16} {:>14}  volumes", "id", "time (UTC)", "host", "size");
                for (id, m) in &snaps {
                    let vols: Vec<String> = m.volumes.iter().map(|v| v.name.clone()).collect();
                    println!("{:<16} {:<20} {:<16} {:>14}  {}", &id.to_hex()[..16], fmt_time(m.time_unix_ms), m.hostname, m.stats.bytes_total, vols.join(","));
                }
                println!("{} snapshots", snaps.len());
            }
        }
        Cmd::Show { snapshot, json } => {
            let repo = ra.open(&cancel).await?;
            let id = repo.resolve_snapshot(&snapshot, &cancel).await?;
            let m = repo.read_snapshot(&id, &cancel).await?;
            if json {
                let mut v = serde_json::to_value(&m)?;
                v["id"] = serde_json::json!(id);
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("snapshot {id}");
                println!("  time      {} UTC", fmt_time(m.time_unix_ms));
                println!("  host      {}", m.hostname);
                if let Some(p) = m.parent {
                    println!("  parent    {p}");
                }
                for (k, v) in &m.tags {
                    println!("  tag       {k}={v}");
                }
                for v in &m.volumes {
                    println!(
                        "  volume    {} ({} bytes) from {} [{}]: read {}, new {}, stored {}",
                        v.name, v.size, v.source, v.change_source, v.stats.bytes_read, v.stats.bytes_new, v.stats.bytes_stored
                    );
                }
                for md in &m.metadata {
                    println!("  metadata  {} ({} bytes, blob {})", md.name, md.size, md.blob);
                }
            }
        }
        Cmd::Index(cmd) => {
            let repo = ra.open(&cancel).await?;
            let root = ra.cache_root();
            let path = mover::index_cache::RocksIndex::path_for(&root, &repo.config().id);
            match cmd {
                IndexCmd::Sync { json } => {
                    let idx = mover::index_cache::RocksIndex::open(&path)?;
                    let r = local_index::sync(&repo, &idx, &cancel).await?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"segments_total": r.segments_total, "segments_ingested": r.segments_ingested, "entries_ingested": r.entries_ingested})
                        );
                    } else {
                        println!(
                            "index {}: {} segments in the store, {} new, {} entries added",
                            path.display(),
                            r.segments_total,
                            r.segments_ingested,
                            r.entries_ingested
                        );
                    }
                }
                IndexCmd::Rebuild { json } => {
                    if path.exists() {
                        std::fs::remove_dir_all(&path).with_context(|| format!("deleting local index {}", path.display()))?;
                    }
                    let idx = mover::index_cache::RocksIndex::open(&path)?;
                    // It writes index segments for packs no segment names, which gc may be
                    // about to delete as unindexed: the two exclude each other.
                    let lock = mover::lock::RepoLock::acquire_exclusive(&repo, "rebuild the index", &cancel).await?;
                    let r = local_index::rebuild_from_packs(&repo, &idx, true, &cancel).await;
                    lock.release().await;
                    let r = r?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"segments_read": r.segments_read, "segments_unreadable": r.segments_unreadable, "packs_total": r.packs_total,
                            "packs_from_trailers": r.packs_from_trailers, "packs_unreadable": r.packs_unreadable, "entries": r.entries, "segments_written": r.segments_written})
                        );
                    } else {
                        println!(
                            "rebuilt {}: {} entries from {} index segments and {} of {} packs' trailers",
                            path.display(),
                            r.entries,
                            r.segments_read,
                            r.packs_from_trailers,
                            r.packs_total
                        );
                        for s in &r.segments_unreadable {
                            println!("  unreadable index segment: {s}");
                        }
                        for p in &r.packs_unreadable {
                            println!("  unreadable pack: {p}");
                        }
                        for s in &r.segments_written {
                            println!("  wrote index segment {s}");
                        }
                    }
                }
            }
        }
        Cmd::Key(cmd) => {
            let repo = ra.open(&cancel).await?;
            let new_pw = |file: &Option<PathBuf>| -> Result<mover::open::Password> {
                match file {
                    Some(f) => mover::open::read_password_file(f, "new password file"),
                    None => mover::open::env_password("MOVER_NEW_PASSWORD")
                        .ok_or_else(|| anyhow!("no new password: set MOVER_NEW_PASSWORD or use --new-password-file")),
                }
            };
            match cmd {
                KeyCmd::List { json } => {
                    let keys = repo.list_keys(&cancel).await?;
                    if json {
                        let v: Vec<_> = keys.iter().map(|(id, k)| serde_json::json!({"id": id, "current": *id == repo.key_id(), "created_unix": k.created_unix, "hostname": k.hostname})).collect();
                        println!("{}", serde_json::to_string(&v)?);
                    } else {
                        for (id, k) in &keys {
                            println!("{} {id} {} {}", if *id == repo.key_id() { "*" } else { " " }, fmt_time(k.created_unix * 1000), k.hostname);
                        }
                    }
                }
                KeyCmd::Add { new_password_file } => {
                    let np = new_pw(&new_password_file)?;
                    let id = repo.add_key(&ra.password()?, &np, KdfParams::default(), &cancel).await?;
                    println!("added key {id}");
                }
                KeyCmd::Remove { id } => {
                    let id = id.parse().map_err(|e| anyhow!("{e}"))?;
                    repo.remove_key(&id, &cancel).await?;
                    println!("removed key {id}");
                }
                KeyCmd::Passwd { new_password_file } => {
                    let np = new_pw(&new_password_file)?;
                    let new_id = repo.add_key(&ra.password()?, &np, KdfParams::default(), &cancel).await?;
                    let storage = ra.storage().await?;
                    let reopened = Repository::open(storage, &np, &cancel).await?;
                    reopened.remove_key(&repo.key_id(), &cancel).await?;
                    println!("password changed: key {} replaced by {new_id}", repo.key_id());
                }
            }
        }
    }
    Ok(())
}

async fn client(a: ClientArgs) -> Result<()> {
    use mover::client::{connect, is_terminal, state_name, transfer_json, Conn};
    use mover_protocol::v1 as pb;
    let ch = connect(&Conn { server: a.server.clone(), ca: a.ca.clone(), cert: a.cert.clone(), key: a.key.clone() }).await?;
    let mut tc = pb::transfer_service_client::TransferServiceClient::new(ch.clone());
    let status = |e: tonic::Status| anyhow!("{}: {}", a.server, e.message());
    let print = |t: &pb::Transfer| {
        if a.json {
            println!("{}", transfer_json(t));
        } else {
            let p = t.progress.clone().unwrap_or_default();
            println!(
                "{} {} {} {}/{} bytes {}{}",
                t.id,
                state_name(t),
                p.phase,
                p.bytes_done,
                p.bytes_total,
                t.snapshot_id,
                if t.error.is_empty() { String::new() } else { format!(" error: {}", t.error) }
            );
        }
    };
    let watch = |id: String, mut tc: pb::transfer_service_client::TransferServiceClient<tonic::transport::Channel>| async move {
        let mut stream = tc.watch_transfer(pb::GetTransferRequest { id }).await.map_err(status)?.into_inner();
        let mut last = None;
        let bar = (!a.json && std::io::stderr().is_terminal()).then(|| {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb
        });
        while let Some(t) = stream.message().await.map_err(status)? {
            if let (Some(b), Some(p)) = (&bar, &t.progress) {
                b.set_length(p.bytes_total);
                b.set_position(p.bytes_done);
                b.set_message(p.phase.clone());
            }
            last = Some(t);
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        last.ok_or_else(|| anyhow!("the watch stream ended without a transfer"))
    };
    let finish = |t: &pb::Transfer| -> Result<()> {
        match t.state() {
            pb::TransferState::Succeeded | pb::TransferState::Queued | pb::TransferState::Running => Ok(()),
            _ => bail!("transfer {} {}: {}", t.id, state_name(t), t.error),
        }
    };
    // A started transfer, and whether to follow it to its end.
    let started: Option<(pb::Transfer, bool)> = match a.cmd {
        ClientCmd::StartBackup { repository, volumes, pod_volumes, parent, request_id, tags, bandwidth_limit, watch: w } => {
            let mut vols = Vec::new();
            for v in &volumes {
                let (n, p) = split_kv(v, "--volume")?;
                vols.push(pb::BackupVolume {
                    name: n.into(),
                    source: Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::Path(p.into())) }),
                    ..Default::default()
                });
            }
            for v in &pod_volumes {
                let (n, p) = split_kv(v, "--pod-volume")?;
                let (uid, vol) = p.split_once('/').ok_or_else(|| anyhow!("--pod-volume '{v}' is not NAME=PODUID/VOLUME"))?;
                vols.push(pb::BackupVolume {
                    name: n.into(),
                    source: Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::PodVolume(pb::PodVolume { pod_uid: uid.into(), volume_name: vol.into() })) }),
                    ..Default::default()
                });
            }
            let mut tagmap = std::collections::HashMap::new();
            for t in &tags {
                let (k, v) = split_kv(t, "--tag")?;
                tagmap.insert(k.to_string(), v.to_string());
            }
            let t = tc
                .start_backup(pb::StartBackupRequest { request_id, repository, volumes: vols, parent, metadata: vec![], tags: tagmap, bandwidth_limit })
                .await
                .map_err(status)?
                .into_inner();
            Some((t, w))
        }
        ClientCmd::StartRestore { repository, snapshot, volume, target, request_id, watch: w } => {
            let t = tc
                .start_restore(pb::StartRestoreRequest {
                    request_id,
                    repository,
                    snapshot,
                    volume,
                    target: Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::Path(target)) }),
                    holes: 0,
                })
                .await
                .map_err(status)?
                .into_inner();
            Some((t, w))
        }
        ClientCmd::Get { id } => {
            print(&tc.get_transfer(pb::GetTransferRequest { id }).await.map_err(status)?.into_inner());
            None
        }
        ClientCmd::Watch { id } => {
            let t = tc.get_transfer(pb::GetTransferRequest { id }).await.map_err(status)?.into_inner();
            Some((t, true))
        }
        ClientCmd::Cancel { id } => {
            print(&tc.cancel_transfer(pb::GetTransferRequest { id }).await.map_err(status)?.into_inner());
            None
        }
        ClientCmd::List => {
            let l = tc.list_transfers(pb::ListTransfersRequest {}).await.map_err(status)?.into_inner();
            if a.json {
                println!("{}", serde_json::Value::Array(l.transfers.iter().map(transfer_json).collect()));
            } else {
                for t in &l.transfers {
                    print(t);
                }
            }
            None
        }
        ClientCmd::Snapshots { repository } => {
            let mut rc = pb::repository_service_client::RepositoryServiceClient::new(ch);
            let l = rc.list_snapshots(pb::ListSnapshotsRequest { repository }).await.map_err(status)?.into_inner();
            if a.json {
                let v: Vec<_> = l.snapshots.iter().map(|s| serde_json::json!({"id": s.id, "time_unix_ms": s.time_unix_ms, "hostname": s.hostname, "parent": s.parent, "volumes": s.volumes.iter().map(|v| serde_json::json!({"name": v.name, "size": v.size})).collect::<Vec<_>>()})).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for s in &l.snapshots {
                    println!("{} {} {}", s.id, fmt_time(s.time_unix_ms as u64), s.volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>().join(","));
                }
            }
            None
        }
    };
    if let Some((t, w)) = started {
        let t = if w && !is_terminal(&t) { watch(t.id.clone(), tc.clone()).await? } else { t };
        print(&t);
        finish(&t)?;
    }
    Ok(())
}

use mover::timeutil::fmt_time;

fn main() -> ExitCode {
    let cli = Cli::parse();
    mover::init_tls();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
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
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("stopping (what was uploaded is kept)");
            c2.cancel();
        });
        run(cli, cancel).await
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
