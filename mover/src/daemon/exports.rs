//! Exports the daemon serves (`ExportService`): one NBD server per export, each with its
//! read lease, its stop token (a child of the daemon's), and its task. Stopping an export —
//! by `StopExport` or at daemon shutdown — closes its client connections, removes its
//! socket and releases its lease. Exports are not kept across restarts: an NBD client's
//! connection does not survive the daemon either.

use super::metrics::Metrics;
use crate::nbd::server::{run_export, ExportListen, ExportTls};
use crate::plan::export::ExportRequest;
use mover_engine::export::VolumeImage;
use mover_engine::ops::{self, RepoHandle};
use mover_engine::{Error, Result};
use mover_format::manifest::VolumeEntry;
use mover_format::SnapshotId;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportState {
    Serving,
    Stopped,
    Failed,
}

/// One export.
pub struct Export {
    pub id: String,
    pub request_id: String,
    pub repository: String,
    pub snapshot_id: String,
    pub volume: String,
    pub size: u64,
    pub uri: String,
    pub caller: String,
    pub started_ms: u64,
    image: Arc<VolumeImage>,
    stop: CancellationToken,
    state: Mutex<(ExportState, String)>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Export {
    pub fn bytes_read(&self) -> u64 {
        self.image.bytes_read()
    }

    pub fn state(&self) -> (ExportState, String) {
        self.state.lock().expect("export state").clone()
    }

    /// Stops serving and waits until every connection is closed and the lease released.
    pub async fn stop(&self) {
        self.stop.cancel();
        if let Some(t) = self.task.lock().await.take() {
            let _ = t.await;
        }
    }
}

pub struct Exports {
    map: Mutex<BTreeMap<String, Arc<Export>>>,
    /// One start at a time per request id, so a retried request finds the export its
    /// first attempt started; starts of different requests run side by side.
    starting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

/// What a new export is given besides its plan.
pub struct Start {
    pub request_id: String,
    pub repository: String,
    pub caller: String,
    pub listen: ExportListen,
    pub tls: ExportTls,
}

impl Exports {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { map: Mutex::new(BTreeMap::new()), starting: Mutex::new(HashMap::new()), shutdown: CancellationToken::new(), metrics }
    }

    /// A new export id.
    pub fn new_id() -> String {
        format!("ex-{}", hex::encode(rand::random::<[u8; 6]>()))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Export>> {
        self.map.lock().expect("exports").get(id).cloned()
    }

    pub fn by_request(&self, request_id: &str) -> Option<Arc<Export>> {
        if request_id.is_empty() {
            return None;
        }
        self.map.lock().expect("exports").values().find(|e| e.request_id == request_id && e.state().0 == ExportState::Serving).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Export>> {
        self.map.lock().expect("exports").values().cloned().collect()
    }

    /// Starts serving the volume `req` names as export `id`; returns once clients can
    /// connect, or with the error that kept it from serving. A request id already serving
    /// returns that export.
    pub async fn start(self: &Arc<Self>, id: String, h: RepoHandle, req: ExportRequest, s: Start) -> Result<Arc<Export>> {
        let gate = match s.request_id.as_str() {
            "" => None,
            r => Some(self.starting.lock().expect("export starts").entry(r.to_string()).or_default().clone()),
        };
        let r = {
            let _one = match &gate {
                Some(g) => Some(g.lock().await),
                None => None,
            };
            match self.by_request(&s.request_id) {
                Some(e) => Ok(e),
                None => self.serve(id, h, req, s).await,
            }
        };
        if let Some(g) = gate {
            let mut m = self.starting.lock().expect("export starts");
            // Only the map and this start hold it: nobody waits on it.
            if Arc::strong_count(&g) == 2 {
                m.retain(|_, x| !Arc::ptr_eq(x, &g));
            }
        }
        r
    }

    async fn serve(self: &Arc<Self>, id: String, h: RepoHandle, req: ExportRequest, s: Start) -> Result<Arc<Export>> {
        let stop = self.shutdown.child_token();
        type Ready = (String, SnapshotId, VolumeEntry, Arc<VolumeImage>);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Ready>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        let (listen, tls) = (s.listen, s.tls);
        let serving = {
            let (stop, conns) = (stop.clone(), stop.clone());
            // The export's whole life is one operation: its read lock is held until serving
            // ends, and released by the operation.
            tokio::spawn(async move {
                let r = ops::with_image(&h, req, &stop, |img| async move {
                    let what = format!("export of volume '{}' of snapshot {}", img.volume.name, img.snapshot);
                    let ready = (img.snapshot, img.volume, img.image.clone());
                    run_export(img.image, listen, String::new(), tls, conns, move |uri| {
                        let _ = ready_tx.send((uri, ready.0, ready.1, ready.2));
                    })
                    .await
                    .map_err(|e| e.context(what))
                })
                .await;
                let _ = done_tx.send(r);
            })
        };
        let (uri, snapshot, volume, image) = match ready_rx.await {
            Ok(x) => x,
            Err(_) => {
                let _ = serving.await;
                return Err(match done_rx.await {
                    Ok(Err(e)) => e,
                    _ => Error::permanent(format!("export {id} ended before it listened")),
                });
            }
        };
        let e = Arc::new(Export {
            id: id.clone(),
            request_id: s.request_id,
            repository: s.repository,
            snapshot_id: snapshot.to_string(),
            volume: volume.name.clone(),
            size: volume.size,
            uri,
            caller: s.caller,
            started_ms: mover_format::now_unix_ms(),
            image,
            stop,
            state: Mutex::new((ExportState::Serving, String::new())),
            task: tokio::sync::Mutex::new(None),
        });
        // The watcher records how serving ended and keeps the gauge true.
        let watcher = {
            let (e, metrics) = (e.clone(), self.metrics.clone());
            metrics.exports_active.inc();
            tokio::spawn(async move {
                let _ = serving.await;
                let end = match done_rx.await {
                    Ok(Ok(())) => (ExportState::Stopped, String::new()),
                    Ok(Err(err)) => (ExportState::Failed, format!("{err:#}")),
                    Err(_) => (ExportState::Failed, "the export's task ended unexpectedly".into()),
                };
                if end.0 == ExportState::Failed {
                    tracing::warn!("export {} of volume '{}' of snapshot {}: {}", e.id, e.volume, e.snapshot_id, end.1);
                }
                *e.state.lock().expect("export state") = end;
                metrics.exports_active.dec();
            })
        };
        *e.task.lock().await = Some(watcher);
        tracing::info!("export {id}: volume '{}' of snapshot {} at {}", e.volume, e.snapshot_id, e.uri);
        let mut m = self.map.lock().expect("exports");
        // Stopped exports are kept for listing until a few newer ones replace them.
        let ended: Vec<String> = m.values().filter(|x| x.state().0 != ExportState::Serving).map(|x| x.id.clone()).collect();
        for old in ended.iter().take(ended.len().saturating_sub(16)) {
            m.remove(old);
        }
        m.insert(id, e.clone());
        Ok(e)
    }

    /// Stops every export (daemon shutdown).
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        for e in self.list() {
            e.stop().await;
        }
    }
}
