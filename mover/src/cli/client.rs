//! `mover client …`: talk to a daemon over gRPC.

use super::bar;
use mover::client::{connect, is_terminal, state_name, transfer_json, Conn};
use mover_engine::timeutil::fmt_time;
use mover_protocol::v1 as pb;
use pb::transfer_service_client::TransferServiceClient;
use std::io::IsTerminal;
use std::path::PathBuf;
use tonic::transport::Channel;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// unix:PATH, http://HOST:PORT or https://HOST:PORT.
    #[arg(long, env = "MOVER_SERVER", default_value = "unix:/var/lib/mover/mover.sock")]
    server: String,
    /// CA certificate of the server (https).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (mTLS).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Print transfers and snapshots as JSON, one per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Start a backup of one or more volumes into one snapshot.
    StartBackup {
        /// A repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
        /// What is protected (e.g. vms/web-1).
        #[arg(long, default_value = "")]
        group: String,
        /// NAME=PATH, repeatable.
        #[arg(long = "volume", value_name = "NAME=PATH")]
        volumes: Vec<String>,
        /// NAME=PODUID/VOLUME, repeatable: a pod's volume under the kubelet root.
        #[arg(long = "pod-volume", value_name = "NAME=PODUID/VOLUME")]
        pod_volumes: Vec<String>,
        /// Parent snapshot: an id, a unique prefix, or `latest` (of the group).
        #[arg(long, default_value = "")]
        parent: String,
        /// Idempotency key: a repeated start with the same id returns the same transfer.
        #[arg(long, default_value = "")]
        request_id: String,
        /// K=V, repeatable.
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<String>,
        /// Upload limit for this transfer, bytes per second.
        #[arg(long, default_value_t = 0)]
        bandwidth_limit: u64,
        /// Follow progress until the transfer ends.
        #[arg(long)]
        watch: bool,
    },
    /// Start a restore of a snapshot's volume onto a device or file.
    StartRestore {
        /// A repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
        /// A snapshot id, a unique prefix, or `latest` (of --group).
        #[arg(long)]
        snapshot: String,
        /// The group `latest` is looked up in.
        #[arg(long, default_value = "")]
        group: String,
        /// The volume to restore (needed when the snapshot has several).
        #[arg(long, default_value = "")]
        volume: String,
        /// A block device or a file path (beneath the daemon's allowed roots).
        #[arg(long)]
        target: String,
        /// Write over a target that already holds data.
        #[arg(long)]
        overwrite: bool,
        /// Idempotency key: a repeated start with the same id returns the same transfer.
        #[arg(long, default_value = "")]
        request_id: String,
        /// Follow progress until the transfer ends.
        #[arg(long)]
        watch: bool,
    },
    /// Copy snapshots to another repository of the daemon (a second site).
    StartCopy {
        /// The source: a repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
        /// The target: another configured repository.
        #[arg(long)]
        to: String,
        /// Snapshot ids or prefixes; none: every snapshot of --group (or of every group).
        snapshots: Vec<String>,
        /// Copy the snapshots of this group (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Only snapshots newer than the target's newest of their group.
        #[arg(long)]
        newer: bool,
        /// Idempotency key: a repeated start with the same id returns the same transfer.
        #[arg(long, default_value = "")]
        request_id: String,
        /// Upload limit for this transfer, bytes per second (0: none).
        #[arg(long, default_value_t = 0)]
        bandwidth_limit: u64,
        /// Follow progress until the transfer ends.
        #[arg(long)]
        watch: bool,
    },
    /// Verify a repository: structure, and a share of the data; damaged objects are named
    /// with the snapshots that need them.
    StartVerify {
        /// A repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
        /// Share of the packs to download and check (0: structure only).
        #[arg(long, default_value_t = 10)]
        read_data_percent: u32,
        /// Idempotency key: a repeated start with the same id returns the same transfer.
        #[arg(long, default_value = "")]
        request_id: String,
        /// Follow progress until the transfer ends.
        #[arg(long)]
        watch: bool,
    },
    /// Restore a snapshot into the daemon's scratch space, compare it with the backup's
    /// digests, measure the rate, clean up.
    StartDrill {
        /// A repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
        /// A snapshot id, a unique prefix, or `latest` (of --group).
        snapshot: String,
        /// The group `latest` is looked up in.
        #[arg(long, default_value = "")]
        group: String,
        /// Idempotency key: a repeated start with the same id returns the same transfer.
        #[arg(long, default_value = "")]
        request_id: String,
        /// Follow progress until the transfer ends.
        #[arg(long)]
        watch: bool,
    },
    /// Recovery points and times per group of a repository.
    Status {
        /// A repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
    },
    /// Show one transfer.
    Get { id: String },
    /// Follow a transfer until it ends.
    Watch { id: String },
    /// Cancel a transfer (what it uploaded is kept; a rerun resumes).
    Cancel { id: String },
    /// List the daemon's transfers, newest first: id, kind, state, group, age, progress,
    /// snapshot, error.
    List {
        /// Only this kind: backup, restore, copy, verify, drill.
        #[arg(long, value_parser = ["backup", "restore", "copy", "verify", "drill"])]
        kind: Option<String>,
        /// Only this state: queued, running, succeeded, failed, cancelled, interrupted.
        #[arg(long, value_parser = ["queued", "running", "succeeded", "failed", "cancelled", "interrupted"])]
        state: Option<String>,
        /// Only this snapshot group.
        #[arg(long)]
        group: Option<String>,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Serve a snapshot's volume over NBD from the daemon; prints the export and its URI.
    StartExport {
        /// A repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
        /// SNAPSHOT or SNAPSHOT:VOLUME (id, unique prefix, or `latest` of --group).
        snapshot: String,
        /// The group `latest` is looked up in.
        #[arg(long, default_value = "")]
        group: String,
        /// On TCP at the daemon's export address (NBD over TLS when the daemon has TLS).
        #[arg(long)]
        tcp: bool,
        /// Idempotency key: a repeated start with the same id returns the same export.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Stop an export: its clients are disconnected, its lease released.
    StopExport { id: String },
    /// List the daemon's exports.
    Exports,
    /// Ask the daemon's grpc.health.v1 service; exits non-zero unless it is serving.
    Health,
    /// List a repository's snapshots.
    Snapshots {
        /// A repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
        /// Only this group's snapshots.
        #[arg(long, default_value = "")]
        group: String,
    },
    /// Keep a snapshot from forget (ProtectSnapshot); removing a protection is
    /// `mover unprotect`, with credentials that may delete.
    Protect {
        /// An id, a unique prefix, or `latest` (with --group).
        snapshot: String,
        /// A repository of the daemon's configuration.
        #[arg(long, default_value = "default")]
        repository: String,
        /// With `latest`: the group.
        #[arg(long, default_value = "")]
        group: String,
        /// Why it is kept.
        #[arg(long, default_value = "")]
        note: String,
    },
}

fn export_json(e: &pb::Export) -> serde_json::Value {
    serde_json::json!({"id": e.id, "state": e.state().as_str_name().trim_start_matches("EXPORT_STATE_").to_lowercase(), "uri": e.uri,
        "repository": e.repository, "snapshot_id": e.snapshot_id, "volume": e.volume, "size": e.size, "bytes_read": e.bytes_read,
        "caller": e.caller, "started_unix_ms": e.started_unix_ms, "error": e.error})
}

fn print_export(e: &pb::Export, json: bool) {
    if json {
        println!("{}", export_json(e));
    } else {
        let state = e.state().as_str_name().trim_start_matches("EXPORT_STATE_").to_lowercase();
        let err = if e.error.is_empty() { String::new() } else { format!(" error: {}", e.error) };
        println!("{} {state} {} volume '{}' of {} ({} bytes, {} read){err}", e.id, e.uri, e.volume, e.snapshot_id, e.size, e.bytes_read);
    }
}

fn print(t: &pb::Transfer, json: bool) {
    if json {
        println!("{}", transfer_json(t));
    } else {
        let p = t.progress.clone().unwrap_or_default();
        let kind = t.kind().as_str_name().trim_start_matches("TRANSFER_KIND_").to_lowercase();
        let age = (mover_format::now_unix_ms() as i64 - t.created_unix_ms).max(0) as f64 / 1000.0;
        let progress = if p.bytes_total > 0 {
            format!("{}/{} ({:.0}%)", super::size(p.bytes_done), super::size(p.bytes_total), 100.0 * p.bytes_done as f64 / p.bytes_total as f64)
        } else {
            "-".into()
        };
        let snap = if t.snapshot_id.is_empty() { "-" } else { &t.snapshot_id[..t.snapshot_id.len().min(16)] };
        let group = if t.group.is_empty() { "-" } else { &t.group };
        println!(
            "{}  {kind:<7}  {:<11}  {group:<20}  {:>7} ago  {progress:<26}  {snap}{}",
            t.id,
            state_name(t),
            super::status::human(age),
            if t.error.is_empty() { String::new() } else { format!("  error: {}{}", t.error, if t.retryable { " (retryable)" } else { "" }) }
        );
    }
}

/// Follows a transfer to its end, with a progress bar on a terminal.
async fn watch(server: &str, id: String, mut tc: TransferServiceClient<Channel>, json: bool) -> anyhow::Result<pb::Transfer> {
    let status = |e: tonic::Status| anyhow::anyhow!("{server}: {}", e.message());
    let mut stream = tc.watch_transfer(pb::GetTransferRequest { id }).await.map_err(status)?.into_inner();
    let mut last = None;
    let pb = (!json && std::io::stderr().is_terminal()).then(|| bar(""));
    while let Some(t) = stream.message().await.map_err(status)? {
        if let (Some(b), Some(p)) = (&pb, &t.progress) {
            b.set_length(p.bytes_total);
            b.set_position(p.bytes_done);
            b.set_message(p.phase.clone());
        }
        last = Some(t);
    }
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    last.ok_or_else(|| anyhow::anyhow!("the watch stream ended without a transfer"))
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let ch = connect(&Conn { server: a.server.clone(), ca: a.ca.clone(), cert: a.cert.clone(), key: a.key.clone() }).await?;
    let mut tc = TransferServiceClient::new(ch.clone());
    let server = a.server.clone();
    let status = |e: tonic::Status| anyhow::anyhow!("{server}: {}", e.message());
    // A started transfer, and whether to follow it to its end.
    let started: Option<(pb::Transfer, bool)> = match a.cmd {
        Cmd::StartBackup { repository, group, volumes, pod_volumes, parent, request_id, tags, bandwidth_limit, watch: w } => {
            let mut vols = Vec::new();
            for (n, p) in super::key_values(&volumes, "--volume")? {
                vols.push(pb::BackupVolume { name: n, source: Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::Path(p)) }), ..Default::default() });
            }
            for (n, p) in super::key_values(&pod_volumes, "--pod-volume")? {
                let (uid, vol) = p.split_once('/').ok_or_else(|| anyhow::anyhow!("--pod-volume '{n}={p}' is not NAME=PODUID/VOLUME"))?;
                let r = pb::volume_ref::Ref::PodVolume(pb::PodVolume { pod_uid: uid.into(), volume_name: vol.into() });
                vols.push(pb::BackupVolume { name: n, source: Some(pb::VolumeRef { r#ref: Some(r) }), ..Default::default() });
            }
            let tags = super::key_values(&tags, "--tag")?.into_iter().collect();
            let req = pb::StartBackupRequest {
                request_id,
                repository,
                volumes: vols,
                parent,
                metadata: vec![],
                tags,
                bandwidth_limit,
                group,
                verify_sample: None,
                compare_every: None,
            };
            Some((tc.start_backup(req).await.map_err(status)?.into_inner(), w))
        }
        Cmd::StartRestore { repository, snapshot, group, volume, target, overwrite, request_id, watch: w } => {
            let req = pb::StartRestoreRequest {
                request_id,
                repository,
                snapshot,
                volume,
                target: Some(pb::VolumeRef { r#ref: Some(pb::volume_ref::Ref::Path(target)) }),
                holes: 0,
                group,
                overwrite,
            };
            Some((tc.start_restore(req).await.map_err(status)?.into_inner(), w))
        }
        Cmd::StartCopy { repository, to, snapshots, groups, newer, request_id, bandwidth_limit, watch: w } => {
            let req = pb::StartCopyRequest { request_id, repository, target_repository: to, snapshots, groups, newer_only: newer, bandwidth_limit };
            Some((tc.start_copy(req).await.map_err(status)?.into_inner(), w))
        }
        Cmd::StartVerify { repository, read_data_percent, request_id, watch: w } => {
            let req = pb::StartVerifyRequest { request_id, repository, read_data_percent };
            Some((tc.start_verify(req).await.map_err(status)?.into_inner(), w))
        }
        Cmd::StartDrill { repository, snapshot, group, request_id, watch: w } => {
            let req = pb::StartDrillRequest { request_id, repository, snapshot, group };
            Some((tc.start_drill(req).await.map_err(status)?.into_inner(), w))
        }
        Cmd::Status { repository } => {
            let mut rc = pb::repository_service_client::RepositoryServiceClient::new(ch);
            let st = rc.get_status(pb::GetStatusRequest { repository }).await.map_err(status)?.into_inner();
            if a.json {
                let groups: Vec<_> = st
                    .groups
                    .iter()
                    .map(|g| {
                        serde_json::json!({"group": g.group, "snapshots": g.snapshots, "newest_snapshot": g.newest_snapshot, "rpo_seconds": g.rpo_seconds,
                            "newest_verified": g.newest_verified, "verified_age_seconds": g.verified_age_seconds, "newest_drilled": g.newest_drilled,
                            "drilled_age_seconds": g.drilled_age_seconds, "drill_bytes_per_second": g.drill_bytes_per_second,
                            "projected_restore_seconds": g.projected_restore_seconds, "last_drill_failed": g.last_drill_failed, "newest_damaged": g.newest_damaged})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"repository": st.repository, "last_verify_unix_ms": st.last_verify_unix_ms, "last_verify_ok": st.last_verify_ok,
                        "damaged_objects": st.damaged_objects, "affected_snapshots": st.affected_snapshots, "groups": groups})
                );
            } else {
                let fmt = |v: Option<f64>| v.map(super::status::human).unwrap_or_else(|| "never".into());
                println!(
                    "repository {}: last verify {}",
                    st.repository,
                    match st.last_verify_unix_ms {
                        None => "never".to_string(),
                        Some(t) => format!("{} ({})", fmt_time(t as u64), if st.last_verify_ok { "intact" } else { "DAMAGED" }),
                    }
                );
                for g in &st.groups {
                    println!(
                        "  {} {} snapshots; newest {} ago, verified {}, drilled {}, restore in {}",
                        g.group,
                        g.snapshots,
                        super::status::human(g.rpo_seconds),
                        fmt(g.verified_age_seconds),
                        fmt(g.drilled_age_seconds),
                        g.projected_restore_seconds.map(super::status::human).unwrap_or_else(|| "unknown (no drill)".into())
                    );
                }
            }
            None
        }
        Cmd::Get { id } => {
            print(&tc.get_transfer(pb::GetTransferRequest { id }).await.map_err(status)?.into_inner(), a.json);
            None
        }
        Cmd::Watch { id } => Some((tc.get_transfer(pb::GetTransferRequest { id }).await.map_err(status)?.into_inner(), true)),
        Cmd::Cancel { id } => {
            print(&tc.cancel_transfer(pb::GetTransferRequest { id }).await.map_err(status)?.into_inner(), a.json);
            None
        }
        Cmd::List { kind, state, group, limit } => {
            let mut req = pb::ListTransfersRequest { group: group.unwrap_or_default(), page_size: 500, ..Default::default() };
            if let Some(k) = kind {
                req.set_kind(pb::TransferKind::from_str_name(&format!("TRANSFER_KIND_{}", k.to_uppercase())).unwrap_or_default());
            }
            if let Some(st) = state {
                req.set_state(pb::TransferState::from_str_name(&format!("TRANSFER_STATE_{}", st.to_uppercase())).unwrap_or_default());
            }
            let mut all = Vec::new();
            loop {
                let l = tc.list_transfers(req.clone()).await.map_err(status)?.into_inner();
                all.extend(l.transfers);
                if l.next_page_token.is_empty() || (limit > 0 && all.len() >= limit) {
                    break;
                }
                req.page_token = l.next_page_token;
            }
            all.sort_by_key(|t| std::cmp::Reverse(t.created_unix_ms));
            if limit > 0 {
                all.truncate(limit);
            }
            if a.json {
                println!("{}", serde_json::Value::Array(all.iter().map(transfer_json).collect()));
            } else {
                if all.is_empty() {
                    eprintln!("no transfers");
                }
                for t in &all {
                    print(t, false);
                }
            }
            None
        }
        Cmd::StartExport { repository, snapshot, group, tcp, request_id } => {
            let (snapshot, volume) = match snapshot.split_once(':') {
                Some((s, v)) => (s.to_string(), v.to_string()),
                None => (snapshot, String::new()),
            };
            let mut ec = pb::export_service_client::ExportServiceClient::new(ch);
            let req = pb::StartExportRequest { repository, snapshot, group, volume, tcp, request_id };
            print_export(&ec.start_export(req).await.map_err(status)?.into_inner(), a.json);
            None
        }
        Cmd::StopExport { id } => {
            let mut ec = pb::export_service_client::ExportServiceClient::new(ch);
            print_export(&ec.stop_export(pb::StopExportRequest { id }).await.map_err(status)?.into_inner(), a.json);
            None
        }
        Cmd::Health => {
            let mut hc = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = hc.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.map_err(status)?.into_inner();
            let st = r.status().as_str_name().to_string();
            println!("{st}");
            if r.status() != tonic_health::pb::health_check_response::ServingStatus::Serving {
                anyhow::bail!("{server}: not serving ({st})");
            }
            None
        }
        Cmd::Exports => {
            let mut ec = pb::export_service_client::ExportServiceClient::new(ch);
            let l = ec.list_exports(pb::ListExportsRequest {}).await.map_err(status)?.into_inner();
            if a.json {
                println!("{}", serde_json::Value::Array(l.exports.iter().map(export_json).collect()));
            } else {
                for e in &l.exports {
                    print_export(e, false);
                }
            }
            None
        }
        Cmd::Protect { snapshot, repository, group, note } => {
            let mut rc = pb::repository_service_client::RepositoryServiceClient::new(ch);
            let s = rc.protect_snapshot(pb::ProtectSnapshotRequest { repository, snapshot, group, note }).await.map_err(status)?.into_inner();
            if a.json {
                println!("{}", serde_json::json!({"id": s.id, "group": s.group, "time_unix_ms": s.time_unix_ms, "protected": s.protected}));
            } else {
                println!("snapshot {} is protected", s.id);
            }
            None
        }
        Cmd::Snapshots { repository, group } => {
            let mut rc = pb::repository_service_client::RepositoryServiceClient::new(ch);
            let l = rc.list_snapshots(pb::ListSnapshotsRequest { repository, group }).await.map_err(status)?.into_inner();
            if a.json {
                let v: Vec<_> = l
                    .snapshots
                    .iter()
                    .map(|s| {
                        serde_json::json!({"id": s.id, "group": s.group, "time_unix_ms": s.time_unix_ms, "hostname": s.hostname, "parent": s.parent, "protected": s.protected,
                            "volumes": s.volumes.iter().map(|v| serde_json::json!({"name": v.name, "size": v.size})).collect::<Vec<_>>()})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for s in &l.snapshots {
                    println!(
                        "{} {} {} {}",
                        s.id,
                        fmt_time(s.time_unix_ms as u64),
                        s.group,
                        s.volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>().join(",")
                    );
                }
            }
            None
        }
    };
    if let Some((t, w)) = started {
        let t = if w && !is_terminal(&t) { watch(&a.server, t.id.clone(), tc.clone(), a.json).await? } else { t };
        print(&t, a.json);
        match t.state() {
            pb::TransferState::Succeeded | pb::TransferState::Queued | pb::TransferState::Running => {}
            _ => anyhow::bail!("transfer {} {}: {}", t.id, state_name(&t), t.error),
        }
    }
    Ok(())
}
