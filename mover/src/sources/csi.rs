//! Client of the Kubernetes SnapshotMetadata service (KEP-3314 changed block tracking):
//! `GetMetadataAllocated` for a full backup, `GetMetadataDelta` against the parent's CSI
//! snapshot for an incremental. TLS with the service's CA; the security token is read from a
//! file (a projected service-account token in Kubernetes). A stream that breaks is resumed
//! at the end of the last extent received; extents must be non-empty, strictly increasing
//! and within `volume_capacity_bytes`, which must be the same in every message.

use mover_engine::{Error, ErrorKind, Result};
use mover_protocol::snapshotmetadata as sm;
use sm::snapshot_metadata_client::SnapshotMetadataClient;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

/// How to reach the SnapshotMetadata service: from the daemon's configuration (or, for
/// the CLI, the operator's arguments) — never from a request.
#[derive(Debug, Clone, Default)]
pub struct CsiService {
    /// `HOST:PORT` (or `https://HOST:PORT`) of the SnapshotMetadata service.
    pub endpoint: String,
    /// PEM CA certificate the service's certificate must chain to.
    pub ca: PathBuf,
    /// File holding the security token (re-read on every call).
    pub token_file: PathBuf,
    /// TLS server name when it differs from the endpoint's host.
    pub server_name: Option<String>,
    /// Bound on connecting and on each message of a stream.
    pub timeout: Duration,
}

/// Which snapshots to ask about (from the request).
#[derive(Debug, Clone, Default)]
pub struct CsiQuery {
    pub namespace: String,
    /// The VolumeSnapshot being backed up.
    pub snapshot: String,
    /// The base snapshot's CSI handle; by default the parent's recorded checkpoint.
    pub base_id: Option<String>,
    /// The CSI driver of the snapshot: picks the node's service for it (daemon).
    pub driver: Option<String>,
}

/// Extents `(offset, length)` of a snapshot and the capacity the service reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub capacity: u64,
    pub extents: Vec<(u64, u64)>,
    /// Streams that broke and were resumed.
    pub resumed: u32,
}

/// Breaks in a row without progress before a stream is given up (a stream cut after making
/// progress — the sidecar cuts every 10 minutes — does not count). With the backoff below
/// (0.5 s doubling to 30 s) that is about a minute and a half of a service that answers
/// UNAVAILABLE, e.g. while the VolumeSnapshot is not ready yet.
const MAX_STALLS: u32 = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// More extents than this from one stream is refused (they are held in memory).
const MAX_EXTENTS: usize = 16 << 20;

async fn channel(svc: &CsiService) -> Result<Channel> {
    crate::init_tls();
    let (host, url) = match svc.endpoint.strip_prefix("https://") {
        Some(h) => (h.to_string(), svc.endpoint.clone()),
        None => (svc.endpoint.clone(), format!("https://{}", svc.endpoint)),
    };
    let host_only = host.rsplit_once(':').map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string()).unwrap_or(host.clone());
    let ca = crate::secrets::read_small_file(&svc.ca, "SnapshotMetadata CA certificate")?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(svc.server_name.clone().unwrap_or(host_only));
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::invalid(format!("SnapshotMetadata endpoint '{}': {e}", svc.endpoint)))?
        .tls_config(tls)
        .map_err(|e| Error::invalid(format!("TLS for SnapshotMetadata endpoint {url}: {e}")))?
        .connect_timeout(svc.timeout)
        .timeout(svc.timeout);
    ep.connect().await.map_err(|e| Error::with_source(ErrorKind::Transient, format!("connecting to SnapshotMetadata service {url}"), e))
}

fn token(svc: &CsiService) -> Result<String> {
    let t = crate::secrets::read_small_file(&svc.token_file, "security token file")?;
    Ok(String::from_utf8_lossy(&t).trim().to_string())
}

/// Accumulates a stream's messages, checking what the API promises.
struct Acc {
    what: String,
    capacity: Option<u64>,
    kind: Option<i32>,
    extents: Vec<(u64, u64)>,
    next: u64,
    /// The next tuple is the first after a resume at `next`: it may start before it
    /// (KEP-3314 only promises it ends after it), and is clipped there.
    resuming: bool,
}

impl Acc {
    fn add(&mut self, kind: i32, capacity: i64, blocks: &[sm::BlockMetadata]) -> Result<()> {
        let capacity = u64::try_from(capacity).map_err(|_| Error::permanent(format!("{}: negative volume_capacity_bytes {capacity}", self.what)))?;
        match self.capacity {
            None => self.capacity = Some(capacity),
            Some(c) if c != capacity => {
                return Err(Error::permanent(format!("{}: volume_capacity_bytes changed within the stream ({c} then {capacity})", self.what)))
            }
            _ => {}
        }
        match self.kind {
            None => self.kind = Some(kind),
            Some(k) if k != kind => return Err(Error::permanent(format!("{}: block_metadata_type changed within the stream", self.what))),
            _ => {}
        }
        for b in blocks {
            let (o, l) = (b.byte_offset, b.size_bytes);
            if o < 0 || l <= 0 {
                return Err(Error::permanent(format!("{}: invalid extent at offset {o} of {l} bytes", self.what)));
            }
            let (mut o, mut l) = (o as u64, l as u64);
            if std::mem::take(&mut self.resuming) && o < self.next {
                let end = o.saturating_add(l);
                if end <= self.next {
                    return Err(Error::permanent(format!(
                        "{}: the first extent after resuming at {} ends at {end}, before the resume offset",
                        self.what, self.next
                    )));
                }
                (o, l) = (self.next, end - self.next);
            }
            if self.extents.len() >= MAX_EXTENTS {
                return Err(Error::permanent(format!("{}: more than {MAX_EXTENTS} extents", self.what)));
            }
            if o < self.next {
                return Err(Error::permanent(format!(
                    "{}: extents are not strictly increasing (extent at offset {o} after data up to {})",
                    self.what, self.next
                )));
            }
            let end = o.checked_add(l).ok_or_else(|| Error::permanent(format!("{}: extent at {o} overflows", self.what)))?;
            if end > capacity {
                return Err(Error::permanent(format!("{}: extent {o}+{l} lies past volume_capacity_bytes {capacity}", self.what)));
            }
            match self.extents.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += l,
                _ => self.extents.push((o, l)),
            }
            self.next = end;
        }
        Ok(())
    }
}

/// A stream that broke in a way worth resuming (not a refusal by the server).
fn resumable(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Aborted | Code::Internal | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled)
}

fn refusal(what: &str, s: tonic::Status) -> Error {
    Error::permanent(format!("{what}: {:?} ({}): {}", s.code(), s.code().description(), s.message()))
}

/// A response message of either call.
trait BlockMessage {
    fn parts(&self) -> (i32, i64, &[sm::BlockMetadata]);
}
impl BlockMessage for sm::GetMetadataAllocatedResponse {
    fn parts(&self) -> (i32, i64, &[sm::BlockMetadata]) {
        (self.block_metadata_type, self.volume_capacity_bytes, &self.block_metadata)
    }
}
impl BlockMessage for sm::GetMetadataDeltaResponse {
    fn parts(&self) -> (i32, i64, &[sm::BlockMetadata]) {
        (self.block_metadata_type, self.volume_capacity_bytes, &self.block_metadata)
    }
}

/// Runs a streaming call from offset 0, resuming it after the last extent received when
/// the stream breaks or falls silent for `timeout`; `call(starting_offset)` starts the
/// stream. Gives up after [`MAX_STALLS`] breaks in a row that made no progress.
async fn collect<T, F, Fut>(what: String, timeout: Duration, mut call: F) -> Result<Metadata>
where
    T: BlockMessage,
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Result<Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>>,
{
    let mut acc = Acc { what: what.clone(), capacity: None, kind: None, extents: Vec::new(), next: 0, resuming: false };
    let (mut resumed, mut stalls) = (0u32, 0u32);
    let mut wait = Duration::from_millis(500);
    loop {
        let from = acc.next;
        acc.resuming = from > 0;
        let broke: String = match call(from as i64).await? {
            Err(s) if resumable(&s) => format!("{}: {}", s.code().description(), s.message()),
            Err(s) => return Err(refusal(&what, s)),
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    let Ok(next) = tokio::time::timeout(timeout, stream.message()).await else {
                        break format!("no message within {} s", timeout.as_secs());
                    };
                    match next {
                        Ok(Some(m)) => {
                            let (kind, cap, blocks) = m.parts();
                            acc.add(kind, cap, blocks)?
                        }
                        Ok(None) => return Ok(Metadata { capacity: acc.capacity.unwrap_or(0), extents: acc.extents, resumed }),
                        Err(s) if resumable(&s) => break format!("{}: {}", s.code().description(), s.message()),
                        Err(s) => return Err(refusal(&what, s)),
                    }
                }
            }
        };
        if acc.next > from {
            (stalls, wait) = (0, Duration::from_millis(500));
        } else {
            stalls += 1;
        }
        if stalls > MAX_STALLS {
            return Err(Error::transient(format!("{what}: {broke} ({stalls} tries in a row without progress, at offset {})", acc.next)));
        }
        resumed += 1;
        tracing::warn!("{what}: stream broke ({broke}); resuming at offset {} in {} ms", acc.next, wait.as_millis());
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_BACKOFF);
    }
}

/// The allocated extents of `q.snapshot`.
pub async fn allocated(svc: &CsiService, q: &CsiQuery) -> Result<Metadata> {
    let client = SnapshotMetadataClient::new(channel(svc).await?);
    let what = format!("GetMetadataAllocated for snapshot {}/{} from {}", q.namespace, q.snapshot, svc.endpoint);
    collect(what, svc.timeout, |starting_offset| {
        let mut client = client.clone();
        let req = token(svc).map(|security_token| sm::GetMetadataAllocatedRequest {
            security_token,
            namespace: q.namespace.clone(),
            snapshot_name: q.snapshot.clone(),
            starting_offset,
            max_results: 0,
        });
        async move { Ok(client.get_metadata_allocated(req?).await) }
    })
    .await
}

/// The extents that changed between the snapshot with CSI handle `base_id` and
/// `q.snapshot`.
pub async fn delta(svc: &CsiService, q: &CsiQuery, base_id: &str) -> Result<Metadata> {
    let client = SnapshotMetadataClient::new(channel(svc).await?);
    let what = format!("GetMetadataDelta from base {base_id} to snapshot {}/{} from {}", q.namespace, q.snapshot, svc.endpoint);
    collect(what, svc.timeout, |starting_offset| {
        let mut client = client.clone();
        let req = token(svc).map(|security_token| sm::GetMetadataDeltaRequest {
            security_token,
            namespace: q.namespace.clone(),
            base_snapshot_id: base_id.to_string(),
            target_snapshot_name: q.snapshot.clone(),
            starting_offset,
            max_results: 0,
        });
        async move { Ok(client.get_metadata_delta(req?).await) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    fn b(o: i64, l: i64) -> sm::BlockMetadata {
        sm::BlockMetadata { byte_offset: o, size_bytes: l }
    }
    #[test]
    fn extents_must_increase_and_fit() {
        let mut a = Acc { what: "t".into(), capacity: None, kind: None, extents: vec![], next: 0, resuming: false };
        a.add(1, 1000, &[b(0, 10), b(10, 10), b(50, 10)]).unwrap();
        assert_eq!(a.extents, vec![(0, 20), (50, 10)]);
        assert!(a.add(1, 1000, &[b(55, 1)]).unwrap_err().to_string().contains("strictly increasing"));
        assert!(a.add(1, 999, &[]).unwrap_err().to_string().contains("changed"));
        assert!(a.add(1, 1000, &[b(990, 20)]).unwrap_err().to_string().contains("past"));
        assert!(a.add(1, 1000, &[b(100, 0)]).unwrap_err().to_string().contains("invalid"));
    }

    /// After a resume at 60 the first tuple may start before it (KEP-3314): it is clipped
    /// there; only that first one, and only when it ends after the offset.
    #[test]
    fn the_first_tuple_after_a_resume_is_clipped_at_the_resume_offset() {
        let mut a = Acc { what: "t".into(), capacity: None, kind: None, extents: vec![], next: 0, resuming: false };
        a.add(1, 1000, &[b(0, 10), b(50, 10)]).unwrap();
        a.resuming = true;
        a.add(1, 1000, &[b(40, 30), b(80, 10)]).unwrap();
        assert_eq!(a.extents, vec![(0, 10), (50, 20), (80, 10)]);
        assert!(a.add(1, 1000, &[b(85, 10)]).unwrap_err().to_string().contains("strictly increasing"), "later tuples stay strict");
        a.resuming = true;
        assert!(a.add(1, 1000, &[b(10, 20)]).unwrap_err().to_string().contains("before the resume offset"));
    }
}
