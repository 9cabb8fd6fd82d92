//! KubeVirt's backup API (`backup.kubevirt.io`, KubeVirt ≥ 1.8) in pull mode as a backup
//! source. A `VirtualMachineBackup` with `mode: Pull` exposes, per disk, a map endpoint
//! (`GET …/map?offset=&page_size=` → `{"extents": [{"offset", "length", "type",
//! "description"}], "next_offset": N|null}`) and a data endpoint (`GET …/data?offset=&length=`
//! → the bytes), over HTTPS with the `x-kubevirt-export-token` header and the backup's
//! `endpointCert`. A full backup's map is the disk's allocation (`type` bit 1: zero, bit 0:
//! hole); an incremental's map is the checkpoint's dirty bitmap (`type` bit 0: dirty).
//!
//! Data is read from the data endpoint, several requests in flight. When the export cannot
//! be used (refused token, expired export, a map that does not parse) and the request also
//! names the volume's PVC, the PVC is read in full instead (with parent reuse) and the
//! transfer says why; without one, the backup fails naming the endpoint.

use super::FileSource;
use mover_engine::source::{BlockRead, Changes, Opened, ParentVolume, Reader, VolumeSource};
use mover_engine::{Error, ErrorKind, Result};
use mover_format::manifest::ChangeSource;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const TOKEN_HEADER: &str = "x-kubevirt-export-token";
/// Extents asked for per map page.
const PAGE_SIZE: usize = 4096;
/// A map page larger than this is refused.
const MAX_PAGE_BYTES: u64 = 16 << 20;
/// More extents than this in one map is refused (they are held in memory).
const MAX_EXTENTS: usize = 16 << 20;

/// Which backup the export serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupType {
    Full,
    /// The changes since the checkpoint `since` (the tracker's previous checkpoint).
    Incremental {
        since: String,
    },
}

/// One volume of a pull-mode `VirtualMachineBackup`.
#[derive(Clone)]
pub struct Export {
    /// The volume's endpoint prefix: `…/exports/<disk>` (its `/map` and `/data` are used).
    pub base: String,
    pub token: zeroize::Zeroizing<String>,
    /// The backup's `endpointCert` (PEM).
    pub ca_pem: Vec<u8>,
    pub kind: BackupType,
    pub timeout: Duration,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("base", &self.base).field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Export {
    /// Accepts `…/exports/<disk>`, or its `/map` or `/data` endpoint.
    pub fn base_of(url: &str) -> Result<String> {
        let u = url.trim_end_matches('/');
        let u = u.strip_suffix("/map").or_else(|| u.strip_suffix("/data")).unwrap_or(u);
        if !u.starts_with("https://") {
            return Err(Error::invalid(format!("KubeVirt export endpoint '{url}' must be an https:// URL")));
        }
        if u.len() > 2048 || u.contains(['?', '#', ' ']) {
            return Err(Error::invalid(format!("KubeVirt export endpoint '{url}' is not a plain URL")));
        }
        Ok(u.to_string())
    }

    /// `host:port` of the endpoint, for the daemon's allow-list.
    pub fn host_port(&self) -> String {
        let rest = self.base.trim_start_matches("https://");
        let host = rest.split('/').next().unwrap_or("");
        if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !host.ends_with(']') {
            host.to_string()
        } else {
            format!("{host}:443")
        }
    }

    fn agent(&self) -> Result<ureq::Agent> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&self.ca_pem) {
            let c = c.map_err(|e| Error::invalid(format!("the KubeVirt endpoint certificate is not PEM: {e}")))?;
            roots.add(c).map_err(|e| Error::invalid(format!("the KubeVirt endpoint certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::invalid("no KubeVirt endpoint certificate (the backup's status.endpointCert) was given"));
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::permanent(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ureq::AgentBuilder::new()
            .tls_config(Arc::new(cfg))
            .timeout_connect(self.timeout.min(Duration::from_secs(30)))
            .timeout_read(self.timeout)
            .timeout_write(self.timeout)
            .build())
    }

    /// GET `url` with the token; a refusal or failure is an error naming the endpoint and
    /// the status.
    fn get(&self, agent: &ureq::Agent, url: &str) -> Result<ureq::Response> {
        match agent.get(url).set(TOKEN_HEADER, &self.token).call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let mut body = String::new();
                let _ = r.into_reader().take(512).read_to_string(&mut body);
                let (kind, why) = match code {
                    401 | 403 => (ErrorKind::Precondition, "the export token was refused"),
                    404 | 410 => (ErrorKind::NotFound, "the export is gone (expired or deleted VirtualMachineBackup)"),
                    408 | 429 | 500..=599 => (ErrorKind::Transient, "the export server failed"),
                    _ => (ErrorKind::Permanent, "the request was refused"),
                };
                Err(Error::new(
                    kind,
                    format!("KubeVirt export {url}: HTTP {code}: {why}{}", if body.trim().is_empty() { String::new() } else { format!(" ({})", body.trim()) }),
                ))
            }
            Err(ureq::Error::Transport(t)) => Err(Error::transient(format!("KubeVirt export {url}: {t}"))),
        }
    }

    /// Every extent of the map, in order, checked to cover `[0, size)` contiguously;
    /// returns `(size, extents)` with extents as `(offset, length, type)`.
    fn map(&self, agent: &ureq::Agent) -> Result<(u64, Vec<(u64, u64, u64)>)> {
        #[derive(serde::Deserialize)]
        struct Ext {
            offset: u64,
            length: u64,
            #[serde(rename = "type", default)]
            typ: u64,
        }
        #[derive(serde::Deserialize)]
        struct Page {
            extents: Vec<Ext>,
            next_offset: Option<u64>,
        }
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        let mut at = 0u64;
        let mut from = 0u64;
        loop {
            let url = format!("{}/map?offset={from}&page_size={PAGE_SIZE}", self.base);
            let r = self.get(agent, &url)?;
            let mut body = Vec::new();
            r.into_reader()
                .take(MAX_PAGE_BYTES + 1)
                .read_to_end(&mut body)
                .map_err(|e| Error::transient(format!("KubeVirt export {url}: reading the map: {e}")))?;
            if body.len() as u64 > MAX_PAGE_BYTES {
                return Err(Error::permanent(format!("KubeVirt export {url}: a map page larger than {MAX_PAGE_BYTES} bytes")));
            }
            let page: Page = serde_json::from_slice(&body).map_err(|e| Error::permanent(format!("KubeVirt export {url}: the map is not JSON extents: {e}")))?;
            for e in page.extents {
                if e.offset != at || e.length == 0 {
                    return Err(Error::permanent(format!("KubeVirt export {url}: extent at {} of {} bytes where {at} was expected", e.offset, e.length)));
                }
                at = at
                    .checked_add(e.length)
                    .filter(|&a| a <= mover_engine::pipeline::backup::MAX_VOLUME_SIZE)
                    .ok_or_else(|| Error::permanent(format!("KubeVirt export {url}: the map covers more than the largest volume Mover backs up")))?;
                if out.len() >= MAX_EXTENTS {
                    return Err(Error::permanent(format!("KubeVirt export {url}: more than {MAX_EXTENTS} extents")));
                }
                out.push((e.offset, e.length, e.typ));
            }
            match page.next_offset {
                None => break,
                Some(n) if n <= from || n != at => {
                    return Err(Error::permanent(format!("KubeVirt export {url}: next_offset {n} does not continue the map (at {at})")));
                }
                Some(n) => from = n,
            }
        }
        Ok((at, out))
    }
}

/// Reads the data endpoint by ranges.
struct DataReader {
    export: Export,
    agent: ureq::Agent,
}

impl BlockRead for DataReader {
    fn name(&self) -> &'static str {
        "kubevirt"
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let url = format!("{}/data?offset={offset}&length={}", self.export.base, buf.len());
        let mut attempt = 0u32;
        loop {
            let r = self.export.get(&self.agent, &url).and_then(|r| {
                let mut rd = r.into_reader().take(buf.len() as u64 + 1);
                let mut got = 0usize;
                while got < buf.len() {
                    match rd.read(&mut buf[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return Err(Error::transient(format!("KubeVirt export {url}: reading data: {e}"))),
                    }
                }
                let mut extra = [0u8; 1];
                if got != buf.len() || rd.read(&mut extra).unwrap_or(0) != 0 {
                    return Err(Error::transient(format!("KubeVirt export {url}: {got} bytes where {} were asked for", buf.len())));
                }
                Ok(())
            });
            match r {
                Err(e) if e.kind() == ErrorKind::Transient && attempt < 3 => {
                    attempt += 1;
                    tracing::warn!("{e:#}; trying again ({attempt})");
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                }
                r => return r,
            }
        }
    }
    fn try_clone(&self) -> Option<Box<dyn BlockRead>> {
        Some(Box::new(DataReader { export: self.export.clone(), agent: self.agent.clone() }))
    }
}

/// A volume read through a KubeVirt pull-mode export, with the volume's PVC (opened and
/// checked) to read in full when the export cannot be used.
pub struct KubevirtSource {
    pub export: Export,
    pub fallback: Option<FileSource>,
}

#[async_trait::async_trait]
impl VolumeSource for KubevirtSource {
    fn describe(&self) -> String {
        self.export.base.clone()
    }
    async fn open(self: Box<Self>, parent: Option<ParentVolume<'_>>, cancel: &CancellationToken) -> Result<Opened> {
        let export = self.export.clone();
        let work = tokio::task::spawn_blocking(move || {
            let agent = export.agent()?;
            let map = export.map(&agent);
            Ok::<_, Error>((agent, map))
        });
        let (agent, map) = tokio::select! {
            r = work => r??,
            _ = cancel.cancelled() => return Err(Error::cancelled("reading the KubeVirt export map")),
        };
        let (size, extents) = match map {
            Ok(m) => m,
            Err(e) => {
                return match self.fallback {
                    Some(f) => {
                        let mut o = Box::new(f).open(parent, cancel).await?;
                        o.changes = Changes::fallback(format!("{e:#}; reading the volume's PVC instead"));
                        Ok(o)
                    }
                    None => Err(e.context("and no PVC of the volume was given to read instead")),
                };
            }
        };
        if let Some(f) = &self.fallback {
            if f.opened.size != size {
                return Err(Error::precondition(format!(
                    "KubeVirt export {} serves {size} bytes, but the volume's PVC {} has {}; is it the same disk?",
                    self.export.base, f.opened.label, f.opened.size
                )));
            }
        }
        let reader = Reader::Blocks(Box::new(DataReader { export: self.export.clone(), agent }));
        let (allocated, changes) = match &self.export.kind {
            // base:allocation: bit 1 says the range reads as zeros.
            BackupType::Full => (Some(extents.iter().filter(|e| e.2 & 2 == 0).map(|e| (e.0, e.0 + e.1)).collect()), Changes::default()),
            // The dirty bitmap: bit 0 says the range changed.
            BackupType::Incremental { since } => {
                let dirty = extents.iter().filter(|e| e.2 & 1 != 0).map(|e| (e.0, e.1)).collect();
                (None, Changes { source: Some(ChangeSource::Kubevirt), changed: Some(dirty), since: Some(since.clone()), fallback: None, sparse: false })
            }
        };
        Ok(Opened { size, reader, allocated, changes })
    }
}
