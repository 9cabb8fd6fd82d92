//! A CSI SnapshotMetadata (KEP-3314) server for the tests — a stand-in for a CSI driver's
//! sidecar, named as such: it implements the same gRPC service over real TLS on 127.0.0.1,
//! serving extents computed from real data (allocated 64 KiB blocks of an image, and the
//! blocks where two images differ), four per message, with a stream it breaks once when
//! asked, to be resumed.
use crate::common::*;
use mover_protocol::snapshotmetadata as sm;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

pub const BLOCK: u64 = 64 << 10;

#[derive(Default)]
pub struct Server {
    /// VolumeSnapshot name → (image, CSI handle).
    pub snaps: Mutex<HashMap<String, (PathBuf, String)>>,
    pub token: String,
    /// Messages to send before breaking the next stream (0: never).
    pub break_after: AtomicUsize,
    /// Every starting_offset asked for.
    pub offsets: Mutex<Vec<i64>>,
    /// Overrides the capacity reported (0: the image's size).
    pub capacity: std::sync::atomic::AtomicU64,
    /// On a resumed stream, the first tuple starts this many bytes before the resume offset
    /// (KEP-3314 allows it: the first tuple need only end after `starting_offset`).
    pub early_by: std::sync::atomic::AtomicU64,
    /// Calls answered UNAVAILABLE before any is served (the sidecar while the VolumeSnapshot
    /// is not ready yet).
    pub unavailable: AtomicUsize,
}

type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

pub fn blocks(a: &[u8], b: Option<&[u8]>, from: i64) -> Vec<sm::BlockMetadata> {
    let mut out = Vec::new();
    for (i, blk) in a.chunks(BLOCK as usize).enumerate() {
        let off = i as u64 * BLOCK;
        let pick = match b {
            None => blk.iter().any(|&x| x != 0),
            Some(base) => base.get(off as usize..off as usize + blk.len()) != Some(blk),
        };
        if pick && (off + blk.len() as u64) as i64 > from {
            out.push(sm::BlockMetadata { byte_offset: off as i64, size_bytes: blk.len() as i64 });
        }
    }
    out
}

impl Server {
    fn check(&self, token: &str) -> Result<(), Status> {
        if token != self.token {
            return Err(Status::unauthenticated("security token rejected"));
        }
        Ok(())
    }
    fn by_name(&self, ns: &str, name: &str) -> Result<PathBuf, Status> {
        self.snaps
            .lock()
            .unwrap()
            .get(&format!("{ns}/{name}"))
            .map(|s| s.0.clone())
            .ok_or_else(|| Status::not_found(format!("VolumeSnapshot {ns}/{name} not found")))
    }
    fn not_ready(&self) -> Result<(), Status> {
        match self.unavailable.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
            Ok(_) => Err(Status::unavailable("VolumeSnapshot vms/snap-2 is not ready to use yet")),
            Err(_) => Ok(()),
        }
    }
    fn by_handle(&self, id: &str) -> Result<PathBuf, Status> {
        self.snaps.lock().unwrap().values().find(|s| s.1 == id).map(|s| s.0.clone()).ok_or_else(|| Status::not_found(format!("snapshot handle {id} not found")))
    }
    /// Sends `bl` four per message; breaks the stream once if asked to.
    fn stream<T: Send + 'static>(&self, cap: u64, bl: Vec<sm::BlockMetadata>, make: fn(i32, i64, Vec<sm::BlockMetadata>) -> T) -> Stream<T> {
        let cap = match self.capacity.load(Ordering::SeqCst) {
            0 => cap,
            c => c,
        };
        let mut bl = bl;
        // A resumed stream whose first tuple starts `early_by` before the resume offset
        // (and reaches back over whatever lay between: extents say what *may* have changed).
        let from = *self.offsets.lock().unwrap().last().unwrap_or(&0);
        let early = self.early_by.load(Ordering::SeqCst) as i64;
        if let (true, Some(first)) = (from > early && early > 0, bl.first_mut()) {
            let end = first.byte_offset + first.size_bytes;
            first.byte_offset = from - early;
            first.size_bytes = end - first.byte_offset;
        }
        let mut msgs: Vec<Result<T, Status>> = bl.chunks(4).map(|c| Ok(make(sm::BlockMetadataType::FixedLength as i32, cap as i64, c.to_vec()))).collect();
        let n = self.break_after.swap(0, Ordering::SeqCst);
        if n > 0 && n < msgs.len() {
            msgs.truncate(n);
            msgs.push(Err(Status::unavailable("connection to the CSI driver lost")));
        }
        Box::pin(tokio_stream::iter(msgs))
    }
}

/// The service as registered (a local type, so it may implement the generated trait).
struct Svc(Arc<Server>);

impl std::ops::Deref for Svc {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

#[tonic::async_trait]
impl sm::snapshot_metadata_server::SnapshotMetadata for Svc {
    type GetMetadataAllocatedStream = Stream<sm::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Stream<sm::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(&self, r: Request<sm::GetMetadataAllocatedRequest>) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = r.into_inner();
        self.check(&r.security_token)?;
        let img = std::fs::read(self.by_name(&r.namespace, &r.snapshot_name)?).unwrap();
        self.offsets.lock().unwrap().push(r.starting_offset);
        Ok(Response::new(self.stream(img.len() as u64, blocks(&img, None, r.starting_offset), |t, c, b| sm::GetMetadataAllocatedResponse {
            block_metadata_type: t,
            volume_capacity_bytes: c,
            block_metadata: b,
        })))
    }

    async fn get_metadata_delta(&self, r: Request<sm::GetMetadataDeltaRequest>) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = r.into_inner();
        self.check(&r.security_token)?;
        self.not_ready()?;
        let base = std::fs::read(self.by_handle(&r.base_snapshot_id)?).unwrap();
        let img = std::fs::read(self.by_name(&r.namespace, &r.target_snapshot_name)?).unwrap();
        self.offsets.lock().unwrap().push(r.starting_offset);
        Ok(Response::new(self.stream(img.len() as u64, blocks(&img, Some(&base), r.starting_offset), |t, c, b| sm::GetMetadataDeltaResponse {
            block_metadata_type: t,
            volume_capacity_bytes: c,
            block_metadata: b,
        })))
    }
}

/// Starts the server with TLS (a CA and a certificate for 127.0.0.1 made by openssl).
pub fn start(dir: &Path, srv: Arc<Server>) -> (String, tokio::runtime::Runtime) {
    crate::daemon::make_ca(dir, "ca");
    crate::daemon::make_cert(dir, "ca", "srv", "subjectAltName=IP:127.0.0.1,DNS:snapshot-metadata.test\n");
    let identity = tonic::transport::Identity::from_pem(std::fs::read(dir.join("srv.pem")).unwrap(), std::fs::read(dir.join("srv.key")).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    mover::init_tls();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(sm::snapshot_metadata_server::SnapshotMetadataServer::new(Svc(srv)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr.to_string(), rt)
}
