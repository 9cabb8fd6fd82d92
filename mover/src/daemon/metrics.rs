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
    /// NBD exports serving now.
    pub exports_active: prometheus::IntGauge,
    /// When a transfer of each kind last succeeded (unix seconds; 0: not since start).
    pub last_success: prometheus::GaugeVec,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let backup_bytes = IntCounterVec::new(Opts::new("mover_backup_bytes_total", "Bytes of backed-up volumes by what happened to them"), &["what"])?;
        let upload_bytes = IntCounter::new("mover_upload_bytes_total", "Bytes of packs uploaded to repositories")?;
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
        let exports_active = prometheus::IntGauge::new("mover_exports_active", "Snapshot volumes served over NBD now")?;
        registry.register(Box::new(exports_active.clone()))?;
        let last_success = prometheus::GaugeVec::new(
            Opts::new("mover_last_success_timestamp_seconds", "When a transfer of this kind last succeeded on this node (0: not since the daemon started)"),
            &["kind"],
        )?;
        registry.register(Box::new(last_success.clone()))?;
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
        for op in ["put", "get", "get_range", "head", "list", "delete"] {
            for r in ["ok", "err"] {
                store_request.with_label_values(&[op, r]);
            }
        }
        for k in ["backup", "restore"] {
            for r in ["ok", "err", "cancelled", "interrupted"] {
                transfers.with_label_values(&[k, r]);
                duration.with_label_values(&[k, r]);
            }
            active.with_label_values(&[k]).set(0);
            last_success.with_label_values(&[k]).set(0.0);
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
            exports_active,
            last_success,
        })
    }

    pub fn render(&self) -> String {
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
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
