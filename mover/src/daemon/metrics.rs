//! Prometheus metrics. Names `mover_<subsystem>_<what>_{total,bytes,seconds}`; label values
//! come only from fixed sets (never ids or volume names).

use prometheus::{exponential_buckets, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    /// what = read | zero | skipped | reused_parent | deduplicated | new | stored
    pub backup_bytes: IntCounterVec,
    pub upload_bytes: IntCounter,
    /// what = written | holes
    pub restore_bytes: IntCounterVec,
    /// kind = backup | restore, result = ok | err | cancelled | interrupted
    pub transfers: IntCounterVec,
    pub active: IntGaugeVec,
    pub queued: IntGaugeVec,
    pub duration: HistogramVec,
    /// op = put | get | get_range | head | list | delete, result = ok | err | not_found | cancelled
    pub store_request: HistogramVec,
    pub io_uring_fallbacks: IntCounter,
    /// Volumes backed up, by change source (full, parent-digest, extents, nbd, csi).
    pub change_sources: IntCounterVec,
    /// Volumes whose requested change source failed, so everything was read.
    pub change_fallbacks: IntCounter,
    /// Volumes where a change source called segments unchanged that differed from the
    /// parent (caught by the sample or a full comparison), by source.
    pub change_mismatches: IntCounterVec,
    /// NBD exports serving now.
    pub exports_active: prometheus::IntGauge,
    /// When a transfer of each kind last succeeded on this node, by group (configured
    /// `status_groups`, the rest as `other`); unix seconds, kept across restarts; absent
    /// until the first success.
    pub last_success: prometheus::GaugeVec,
    /// When the recovery-point gauges of a repository were last computed from a listing
    /// that succeeded (absent until the first).
    pub status_time: prometheus::GaugeVec,
    /// The configured `status_groups` of each repository: bounds the `group` label.
    groups: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// Verify runs by repository (configured names) and result = ok | damaged | err.
    pub verify_runs: IntCounterVec,
    /// Damaged objects / affected snapshots the last verify found, per repository.
    pub verify_damaged: IntGaugeVec,
    pub verify_affected: IntGaugeVec,
    /// When a verify last found the repository intact (unix seconds; 0: never).
    pub verify_last_ok: prometheus::GaugeVec,
    /// 1 while the repository is open (its store answered and the key opened), else 0.
    pub repository_up: IntGaugeVec,
    /// Per repository and group (configured `status_groups`, the rest as `other`, worst
    /// of them): age of the newest snapshot (RPO), of the newest verified and newest
    /// drilled snapshot (+Inf: none), and the restore time to expect (+Inf: never drilled).
    pub snapshot_age: prometheus::GaugeVec,
    pub verified_age: prometheus::GaugeVec,
    pub drilled_age: prometheus::GaugeVec,
    pub projected_restore: prometheus::GaugeVec,
    /// How long the last recovery-point refresh of a repository took, and the manifests
    /// refreshes read (only those added since the one before: the cost follows the work).
    pub status_refresh_seconds: prometheus::GaugeVec,
    pub status_manifests_read: IntCounterVec,
    /// This process's local index syncs (before every backup and restore): count, time,
    /// and what they ingested of other writers' index segments. Copied from
    /// `mover_format::local_index::SYNCS` at each scrape.
    index_syncs: IntCounter,
    index_sync_seconds: prometheus::Counter,
    index_sync_segments: IntCounter,
    index_sync_entries: IntCounter,
    index_syncs_reused: IntCounter,
    scrape: std::sync::Mutex<()>,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let backup_bytes = IntCounterVec::new(Opts::new("mover_backup_bytes_total", "Bytes of backed-up volumes by what happened to them"), &["what"])?;
        let upload_bytes = IntCounter::new("mover_upload_bytes_total", "Bytes of packs uploaded to repositories (as they upload, failed transfers' included)")?;
        let restore_bytes = IntCounterVec::new(Opts::new("mover_restore_bytes_total", "Bytes restored, written or left as holes"), &["what"])?;
        let transfers = IntCounterVec::new(Opts::new("mover_transfers_total", "Finished transfers by kind and result"), &["kind", "result"])?;
        let active = IntGaugeVec::new(Opts::new("mover_transfers_active", "Transfers running now"), &["kind"])?;
        let queued = IntGaugeVec::new(Opts::new("mover_transfers_queued", "Transfers waiting for a slot"), &["kind"])?;
        let duration = HistogramVec::new(
            HistogramOpts::new("mover_transfer_duration_seconds", "Duration of finished transfers").buckets(exponential_buckets(0.5, 2.0, 16)?),
            &["kind", "result"],
        )?;
        let store_request = HistogramVec::new(
            HistogramOpts::new("mover_store_request_seconds", "Object store request latency").buckets(exponential_buckets(0.0005, 2.0, 18)?),
            &["op", "result"],
        )?;
        let io_uring_fallbacks = IntCounter::new("mover_io_uring_fallbacks_total", "Backups that read with pread because io_uring was refused")?;
        registry.register(Box::new(backup_bytes.clone()))?;
        registry.register(Box::new(upload_bytes.clone()))?;
        registry.register(Box::new(restore_bytes.clone()))?;
        registry.register(Box::new(transfers.clone()))?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(store_request.clone()))?;
        registry.register(Box::new(io_uring_fallbacks.clone()))?;
        let change_sources = IntCounterVec::new(Opts::new("mover_backup_volumes_total", "Volumes backed up, by change source"), &["change_source"])?;
        let change_fallbacks =
            IntCounter::new("mover_change_source_fallbacks_total", "Volumes whose changed-block source failed, so the backup read everything")?;
        registry.register(Box::new(change_sources.clone()))?;
        registry.register(Box::new(change_fallbacks.clone()))?;
        let change_mismatches = IntCounterVec::new(
            Opts::new("mover_change_source_mismatches_total", "Volumes whose change source called segments unchanged that differ from the parent"),
            &["change_source"],
        )?;
        registry.register(Box::new(change_mismatches.clone()))?;
        let exports_active = prometheus::IntGauge::new("mover_exports_active", "Snapshot volumes served over NBD now")?;
        registry.register(Box::new(exports_active.clone()))?;
        let last_success = prometheus::GaugeVec::new(
            Opts::new(
                "mover_last_success_timestamp_seconds",
                "When a transfer of this kind and group last succeeded on this node (kept across restarts; absent: never)",
            ),
            &["kind", "group"],
        )?;
        registry.register(Box::new(last_success.clone()))?;
        let status_time = prometheus::GaugeVec::new(
            Opts::new(
                "mover_repository_status_timestamp_seconds",
                "When the repository's snapshots were last listed for the recovery-point gauges (absent: never)",
            ),
            &["repository"],
        )?;
        registry.register(Box::new(status_time.clone()))?;
        let verify_runs = IntCounterVec::new(Opts::new("mover_verify_runs_total", "Verify jobs run, by repository and result"), &["repository", "result"])?;
        let verify_damaged =
            IntGaugeVec::new(Opts::new("mover_verify_damaged_objects", "Damaged objects the last verify of the repository found"), &["repository"])?;
        let verify_affected = IntGaugeVec::new(
            Opts::new("mover_verify_affected_snapshots", "Snapshots needing a damaged object, per the last verify of the repository"),
            &["repository"],
        )?;
        let verify_last_ok = prometheus::GaugeVec::new(
            Opts::new("mover_verify_last_success_timestamp_seconds", "When a verify last found the repository intact (0: never)"),
            &["repository"],
        )?;
        let repository_up = IntGaugeVec::new(
            Opts::new("mover_repository_up", "1 while the repository is open (store reachable, key opened); 0 while it cannot be opened"),
            &["repository"],
        )?;
        registry.register(Box::new(repository_up.clone()))?;
        let gauge = |name: &str, help: &str| prometheus::GaugeVec::new(Opts::new(name, help), &["repository", "group"]);
        let snapshot_age = gauge(
            "mover_snapshot_age_seconds",
            "Age of the newest snapshot of the group (RPO; NaN: not known yet, +Inf: none; 'other': the worst unlisted group, absent when none has snapshots)",
        )?;
        let verified_age = gauge(
            "mover_verified_snapshot_age_seconds",
            "Age of the newest snapshot a verify found intact (+Inf: none; NaN: not known yet; absent: no snapshots)",
        )?;
        let drilled_age = gauge(
            "mover_drilled_snapshot_age_seconds",
            "Age of the newest snapshot a drill restored and verified (+Inf: none; NaN: not known yet; absent: no snapshots)",
        )?;
        let projected_restore = gauge(
            "mover_projected_restore_seconds",
            "Restore time of the newest snapshot at the last drill's rate (RTO; +Inf: never drilled; NaN: not known yet; absent: no snapshots)",
        )?;
        registry.register(Box::new(verify_runs.clone()))?;
        registry.register(Box::new(verify_damaged.clone()))?;
        registry.register(Box::new(verify_affected.clone()))?;
        registry.register(Box::new(verify_last_ok.clone()))?;
        registry.register(Box::new(snapshot_age.clone()))?;
        registry.register(Box::new(verified_age.clone()))?;
        registry.register(Box::new(drilled_age.clone()))?;
        registry.register(Box::new(projected_restore.clone()))?;
        let status_refresh_seconds = prometheus::GaugeVec::new(
            Opts::new("mover_status_refresh_seconds", "How long the last recovery-point refresh of the repository took (absent: none yet)"),
            &["repository"],
        )?;
        let status_manifests_read = IntCounterVec::new(
            Opts::new("mover_status_manifests_read_total", "Snapshot manifests recovery-point refreshes read (only those new since the refresh before)"),
            &["repository"],
        )?;
        let index_syncs = IntCounter::new("mover_index_syncs_total", "Syncs of the node's local index with the repository's index segments")?;
        let index_sync_seconds = prometheus::Counter::new("mover_index_sync_seconds_total", "Time spent syncing the node's local index")?;
        let index_sync_segments = IntCounter::new("mover_index_sync_segments_total", "Index segments (written by other nodes or a gc) the syncs ingested")?;
        let index_sync_entries = IntCounter::new("mover_index_sync_entries_total", "Index entries the syncs ingested")?;
        registry.register(Box::new(status_refresh_seconds.clone()))?;
        registry.register(Box::new(status_manifests_read.clone()))?;
        registry.register(Box::new(index_syncs.clone()))?;
        registry.register(Box::new(index_sync_seconds.clone()))?;
        registry.register(Box::new(index_sync_segments.clone()))?;
        registry.register(Box::new(index_sync_entries.clone()))?;
        let index_syncs_reused =
            IntCounter::new("mover_index_syncs_reused_total", "Syncs that listed nothing: the node's listing of a moment before served the backup")?;
        registry.register(Box::new(index_syncs_reused.clone()))?;
        // Every label set exists from the start, at zero: rate() and absent() work before the
        // first transfer, and dashboards find every series they query.
        for w in ["read", "zero", "skipped", "reused_parent", "deduplicated", "new", "stored"] {
            backup_bytes.with_label_values(&[w]);
        }
        for w in ["written", "holes"] {
            restore_bytes.with_label_values(&[w]);
        }
        for c in ["full", "parent-digest", "extents", "nbd", "csi", "kubevirt", "qcow2"] {
            change_sources.with_label_values(&[c]);
        }
        for c in ["extents", "nbd", "csi", "kubevirt"] {
            change_mismatches.with_label_values(&[c]);
        }
        for op in ["put", "get", "get_range", "head", "list", "delete"] {
            for r in ["ok", "err"] {
                store_request.with_label_values(&[op, r]);
            }
        }
        for k in ["backup", "restore", "copy", "verify", "drill"] {
            for r in ["ok", "err", "cancelled", "interrupted"] {
                transfers.with_label_values(&[k, r]);
                duration.with_label_values(&[k, r]);
            }
            active.with_label_values(&[k]).set(0);
            queued.with_label_values(&[k]).set(0);
        }
        Ok(Self {
            registry,
            backup_bytes,
            upload_bytes,
            restore_bytes,
            transfers,
            active,
            queued,
            duration,
            store_request,
            io_uring_fallbacks,
            change_sources,
            change_fallbacks,
            change_mismatches,
            exports_active,
            last_success,
            status_time,
            groups: Default::default(),
            verify_runs,
            verify_damaged,
            verify_affected,
            verify_last_ok,
            repository_up,
            snapshot_age,
            verified_age,
            drilled_age,
            projected_restore,
            status_refresh_seconds,
            status_manifests_read,
            index_syncs,
            index_sync_seconds,
            index_sync_segments,
            index_sync_entries,
            index_syncs_reused,
            scrape: std::sync::Mutex::new(()),
        })
    }

    /// Label sets of a configured repository, so dashboards and alerts find them before the
    /// first verify: counters at zero, recovery points unknown (NaN) for every configured
    /// group and `other` until a listing succeeds.
    pub fn init_repository(&self, name: &str, groups: &[String]) {
        if let Ok(mut m) = self.groups.lock() {
            m.insert(name.to_string(), groups.to_vec());
        }
        for r in ["ok", "damaged", "err"] {
            self.verify_runs.with_label_values(&[name, r]);
        }
        self.verify_damaged.with_label_values(&[name]).set(0);
        self.verify_affected.with_label_values(&[name]).set(0);
        self.verify_last_ok.with_label_values(&[name]).set(0.0);
        self.repository_up.with_label_values(&[name]).set(0);
        self.status_unknown(name);
    }

    /// The recovery-point gauges of a repository read "unknown" (NaN): its snapshots could
    /// not be listed, so nothing is known about its recovery points.
    pub fn status_unknown(&self, name: &str) {
        let groups = self.groups.lock().ok().and_then(|m| m.get(name).cloned()).unwrap_or_default();
        for label in groups.iter().map(String::as_str).chain(["other"]) {
            for g in [&self.snapshot_age, &self.verified_age, &self.drilled_age, &self.projected_restore] {
                g.with_label_values(&[name, label]).set(f64::NAN);
            }
        }
    }

    /// The `group` label of a transfer's group in `repository`: a configured status group,
    /// else `other` (label values come from fixed sets).
    pub fn group_label(&self, repository: &str, group: &str) -> String {
        let listed = self.groups.lock().ok().is_some_and(|m| m.get(repository).is_some_and(|g| g.iter().any(|g| g == group)));
        if listed {
            group.to_string()
        } else {
            "other".into()
        }
    }

    /// Sets the recovery-point gauges of a repository from its status (groups bounded by
    /// `wanted`; the rest summed up as `other`, by their worst value).
    pub fn set_status(&self, name: &str, st: &mover_engine::maint::report::RepoStatus, wanted: &[String]) {
        let inf = f64::INFINITY;
        let groups = mover_engine::maint::report::bounded_groups(st, wanted);
        self.status_time.with_label_values(&[name]).set(st.time_unix_ms as f64 / 1000.0);
        // A configured group without snapshots has no recovery point: +Inf. `other` exists
        // while some unlisted group has snapshots (never 0 for "none").
        for w in wanted {
            if !groups.contains_key(w) {
                for g in [&self.snapshot_age, &self.verified_age, &self.drilled_age, &self.projected_restore] {
                    g.with_label_values(&[name, w.as_str()]).set(inf);
                }
            }
        }
        if !groups.contains_key("other") {
            for g in [&self.snapshot_age, &self.verified_age, &self.drilled_age, &self.projected_restore] {
                let _ = g.remove_label_values(&[name, "other"]);
            }
        }
        for (label, gs) in groups {
            let worst = |f: &dyn Fn(&mover_engine::maint::report::GroupStatus) -> Option<f64>| gs.iter().map(|g| f(g).unwrap_or(inf)).fold(0.0, f64::max);
            let l = [name, label.as_str()];
            self.snapshot_age.with_label_values(&l).set(worst(&|g| Some(g.rpo_seconds)));
            self.verified_age.with_label_values(&l).set(worst(&|g| g.verified_age_seconds));
            self.drilled_age.with_label_values(&l).set(worst(&|g| g.drilled_age_seconds));
            self.projected_restore.with_label_values(&l).set(worst(&|g| g.projected_restore_seconds));
        }
        if let Some(v) = &st.last_verify {
            self.verify_damaged.with_label_values(&[name]).set(v.damaged_objects as i64);
            self.verify_affected.with_label_values(&[name]).set(v.affected_snapshots as i64);
            if v.ok {
                self.verify_last_ok.with_label_values(&[name]).set(v.time_unix_ms as f64 / 1000.0);
            }
        }
    }

    pub fn render(&self) -> String {
        self.copy_index_syncs();
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }

    /// Brings the index-sync counters up to the process's totals (one scrape at a time, so
    /// two cannot add the same difference twice).
    fn copy_index_syncs(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let _one = self.scrape.lock();
        let t = &mover_format::local_index::SYNCS;
        let up = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        up(&self.index_syncs, t.syncs.load(Relaxed));
        up(&self.index_sync_segments, t.segments_ingested.load(Relaxed));
        up(&self.index_sync_entries, t.entries_ingested.load(Relaxed));
        up(&self.index_syncs_reused, t.reused.load(Relaxed));
        let secs = t.nanos.load(Relaxed) as f64 / 1e9;
        self.index_sync_seconds.inc_by((secs - self.index_sync_seconds.get()).max(0.0));
    }

    /// The object-store observer that feeds `mover_store_request_seconds`.
    pub fn store_observer(&self) -> std::sync::Arc<dyn mover_backends::instrumented::Observer> {
        std::sync::Arc::new(StoreObserver(self.store_request.clone()))
    }
}

/// Records store requests by operation and outcome (both from fixed sets).
#[derive(Debug)]
struct StoreObserver(HistogramVec);

impl mover_backends::instrumented::Observer for StoreObserver {
    fn observe(&self, op: mover_backends::instrumented::Op, outcome: mover_backends::instrumented::Outcome, took: std::time::Duration) {
        self.0.with_label_values(&[op.as_str(), outcome.as_str()]).observe(took.as_secs_f64());
    }
}
