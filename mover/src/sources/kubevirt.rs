//! KubeVirt's backup API (`backup.kubevirt.io`, KubeVirt ≥ 1.8) in pull mode as a backup
//! source. A `VirtualMachineBackup` with `mode: Pull` exposes, per disk, a map endpoint
//! (`GET …/map?offset=&page_size=` → `{"extents": [{"offset", "length", "type",
//! "description"}] | null, "next_offset": N|null}`, 512 extents a page by default) and a
//! data endpoint (`GET …/data?offset=&length=` → the bytes, streamed), over HTTPS with the
//! `x-kubevirt-export-token` header and the backup's `endpointCert` (upstream:
//! `pkg/storage/export/virt-exportserver/exportserver.go`, `backupMapHandler`,
//! `backupDataHandler`; `pkg/storage/nbdclient/nbdclient.go`).
//!
//! KubeVirt, not the caller, decides whether a backup is Full or Incremental (Full when
//! `forceFullBackup` is set or the tracker lost its checkpoint). A Full backup's map is the
//! disk's `base:allocation` (`type` bit 0 hole, bit 1 zero; descriptions `data`, `hole`,
//! `zero`, `hole,zero`); an Incremental's merges the checkpoint's dirty bitmap with the zero
//! bit (bit 0 dirty, bit 1 zero; `clean`, `dirty`, `zero`, `dirty,zero`). Bit 0 means
//! opposite things in the two, so the type the request declares (the backup's
//! `status.type`) is checked against the descriptions; when they disagree, or neither says,
//! the volume is read in full through the export (parent digests reuse what is unchanged)
//! and the transfer says why — never an incremental taken from a full map.
//!
//! The export answers 503 until virt-launcher's tunnel connects (and while it reconnects):
//! 503s and transport errors are retried with backoff for `retry_for`. 404/410 mean the
//! export is gone. When the export cannot be used and the request also names the volume's
//! PVC, the PVC is read in full instead (with parent reuse), the transfer says why, and the
//! request's checkpoint is not recorded (the PVC may predate it); without one, the backup
//! fails naming the endpoint.

use super::FileSource;
use mover_engine::source::{BlockRead, Changes, Opened, ParentVolume, Reader, VolumeSource};
use mover_engine::{Error, ErrorKind, Result};
use mover_format::manifest::ChangeSource;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const TOKEN_HEADER: &str = "x-kubevirt-export-token";
/// Extents asked for per map page (upstream's default is 512).
const PAGE_SIZE: usize = 4096;
/// The longest wait between two tries of a 503 or an unreachable export.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A map page larger than this is refused.
const MAX_PAGE_BYTES: u64 = 16 << 20;
/// More extents than this in one map is refused (they are held in memory).
const MAX_EXTENTS: usize = 16 << 20;

/// Which backup the export serves (`VirtualMachineBackup.status.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupType {
    Full,
    Incremental,
}

impl BackupType {
    /// `Full` or `Incremental` (as KubeVirt spells them; any case).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(BackupType::Full),
            "incremental" => Ok(BackupType::Incremental),
            _ => Err(Error::invalid(format!("KubeVirt backup type '{s}' is neither Full nor Incremental"))),
        }
    }
}

impl std::fmt::Display for BackupType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupType::Full => "Full",
            BackupType::Incremental => "Incremental",
        })
    }
}

/// What a map's descriptions say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Described {
    full: bool,
    incremental: bool,
}

impl Described {
    fn see(&mut self, description: &str) {
        match description {
            "data" | "hole" | "hole,zero" => self.full = true,
            "clean" | "dirty" | "dirty,zero" => self.incremental = true,
            // "zero" and "unknown" occur in both; an empty one says nothing.
            _ => {}
        }
    }
    /// The type the descriptions show; `Err` when they mix both.
    fn kind(self) -> std::result::Result<Option<BackupType>, ()> {
        match (self.full, self.incremental) {
            (true, true) => Err(()),
            (true, false) => Ok(Some(BackupType::Full)),
            (false, true) => Ok(Some(BackupType::Incremental)),
            (false, false) => Ok(None),
        }
    }
}

/// Whether a transport error is TLS refusing the server (a certificate the backup's
/// `endpointCert` does not sign, a name it does not cover): rustls's error somewhere in
/// its chain.
fn is_tls_refusal(t: &ureq::Transport) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = cur {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if inner.downcast_ref::<rustls::Error>().is_some() {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// Whether `host_port` is allowed by `pattern`: equal, or with `*` in the pattern's host
/// standing for any run of characters other than `.` (`virt-export-*.vms.svc:443`).
pub fn host_matches(pattern: &str, host_port: &str) -> bool {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).take_while(|&i| i == 0 || s[i - 1] != b'.').any(|i| glob(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
        }
    }
    let (p, s) = (pattern.to_ascii_lowercase(), host_port.to_ascii_lowercase());
    p.len() <= 512 && glob(p.as_bytes(), s.as_bytes())
}

/// One volume of a pull-mode `VirtualMachineBackup`.
#[derive(Clone)]
pub struct Export {
    /// The volume's endpoint prefix: `…/exports/<disk>` (its `/map` and `/data` are used).
    pub base: String,
    pub token: zeroize::Zeroizing<String>,
    /// The backup's `endpointCert` (PEM).
    pub ca_pem: Vec<u8>,
    /// The backup's `status.type`, as the request declares it; `None`: as the map says.
    pub declared: Option<BackupType>,
    /// The checkpoint an Incremental's changes are relative to.
    pub since: Option<String>,
    pub timeout: Duration,
    /// How long 503s and transport errors are retried (set by the plan from the node's
    /// configuration).
    pub retry_for: Duration,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("base", &self.base).field("declared", &self.declared).field("since", &self.since).finish_non_exhaustive()
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

    /// GET `url` with the token, retrying 503s and transport errors with backoff (1 s, then
    /// doubling up to 30 s) for `retry_for`; a refusal or failure is an error naming the
    /// endpoint and the status.
    fn get(&self, agent: &ureq::Agent, url: &str) -> Result<ureq::Response> {
        self.retrying(|| self.get_once(agent, url))
    }

    /// Runs `f` until it succeeds, fails other than transiently, or `retry_for` is spent.
    fn retrying<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let started = std::time::Instant::now();
        let mut wait = Duration::from_secs(1);
        let mut tries = 0u32;
        loop {
            match f() {
                Err(e) if e.kind() == ErrorKind::Transient && started.elapsed() + wait <= self.retry_for => {
                    tries += 1;
                    tracing::warn!("{e:#}; trying again in {} s ({tries})", wait.as_secs());
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
                Err(e) if tries > 0 => return Err(e.context(format!("after {tries} retries over {} s", started.elapsed().as_secs()))),
                r => return r,
            }
        }
    }

    fn get_once(&self, agent: &ureq::Agent, url: &str) -> Result<ureq::Response> {
        match agent.get(url).set(TOKEN_HEADER, &self.token).call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let mut body = String::new();
                let _ = r.into_reader().take(512).read_to_string(&mut body);
                let (kind, why) = match code {
                    401 | 403 => (ErrorKind::Precondition, "the export token was refused"),
                    404 | 410 => (ErrorKind::NotFound, "the export is gone (the VirtualMachineBackup was deleted, or its ttlDuration passed: 2 h unless set)"),
                    503 => (ErrorKind::Transient, "the export is not serving yet (virt-launcher's tunnel is not connected)"),
                    408 | 429 | 500..=599 => (ErrorKind::Transient, "the export server failed"),
                    _ => (ErrorKind::Permanent, "the request was refused"),
                };
                Err(Error::new(
                    kind,
                    format!("KubeVirt export {url}: HTTP {code}: {why}{}", if body.trim().is_empty() { String::new() } else { format!(" ({})", body.trim()) }),
                ))
            }
            // A refused certificate is not a blip: waiting does not change it.
            Err(ureq::Error::Transport(t)) if is_tls_refusal(&t) => Err(Error::precondition(format!("KubeVirt export {url}: {t}"))),
            Err(ureq::Error::Transport(t)) => Err(Error::transient(format!("KubeVirt export {url}: {t}"))),
        }
    }

    /// Every extent of the map, in order, checked to cover `[0, size)` contiguously;
    /// returns `(size, extents, what the descriptions say)` with extents as `(offset,
    /// length, type)`.
    fn map(&self, agent: &ureq::Agent) -> Result<(u64, Vec<(u64, u64, u64)>, std::result::Result<Option<BackupType>, ()>)> {
        #[derive(serde::Deserialize)]
        struct Ext {
            offset: u64,
            length: u64,
            #[serde(rename = "type", default)]
            typ: u64,
            #[serde(default)]
            description: String,
        }
        #[derive(serde::Deserialize)]
        struct Page {
            // Upstream encodes an empty page as `null`.
            #[serde(default)]
            extents: Option<Vec<Ext>>,
            #[serde(default)]
            next_offset: Option<u64>,
        }
        let mut described = Described::default();
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
            for e in page.extents.unwrap_or_default() {
                if e.description.len() <= 64 {
                    described.see(&e.description);
                }
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
        if at == 0 {
            return Err(Error::permanent(format!("KubeVirt export {}/map: the map is empty", self.base)));
        }
        self.check_end(agent, at)?;
        Ok((at, out, described.kind()))
    }

    /// The map gives the disk's size; a map that ends early would make a shorter disk. The
    /// data endpoint clamps a read past the end (upstream `clampLength`), so two bytes asked
    /// at `end - 1` come back as one only when `end` is the disk's end.
    fn check_end(&self, agent: &ureq::Agent, end: u64) -> Result<()> {
        let url = format!("{}/data?offset={}&length=2", self.base, end - 1);
        let r = self.get(agent, &url)?;
        let mut got = Vec::new();
        r.into_reader().take(3).read_to_end(&mut got).map_err(|e| Error::transient(format!("KubeVirt export {url}: {e}")))?;
        match got.len() {
            1 => Ok(()),
            0 => Err(Error::permanent(format!("KubeVirt export {url}: no data at byte {} of a map of {end} bytes", end - 1))),
            _ => Err(Error::permanent(format!(
                "KubeVirt export {}: the map ends at byte {end}, but the disk holds data past it (a map that ends early)",
                self.base
            ))),
        }
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
        self.export.retrying(|| {
            self.export.get_once(&self.agent, &url).and_then(|r| {
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
            })
        })
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
        let (size, extents, described) = match map {
            Ok(m) => m,
            Err(e) => {
                return match self.fallback {
                    Some(f) => {
                        let mut o = Box::new(f).open(parent, cancel).await?;
                        o.changes = Changes::fallback(format!("{e:#}; reading the volume's PVC instead"));
                        o.changes.drop_checkpoint = Some("the volume was read from its PVC, not through the export that owns the checkpoint".into());
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
        let base = &self.export.base;
        let allocation = || Some(extents.iter().filter(|e| e.2 & 2 == 0).map(|e| (e.0, e.0 + e.1)).collect());
        // The type is KubeVirt's: as the request declares it (status.type), checked against
        // the map's descriptions. Any doubt reads everything through the export.
        let (allocated, changes) = match (self.export.declared, described) {
            (_, Err(())) => (None, Changes::fallback(format!("KubeVirt export {base}: the map mixes Full and Incremental descriptions; reading everything"))),
            (Some(d), Ok(Some(m))) if d != m => {
                let why = format!("KubeVirt reports a {d} backup but export {base} serves a {m} map; reading everything through the export");
                // A Full map is the disk's allocation, and may still skip what reads as zeros.
                (if m == BackupType::Full { allocation() } else { None }, Changes::fallback(why))
            }
            (None, Ok(None)) => (
                None,
                Changes::fallback(format!(
                    "KubeVirt export {base}: the map does not say whether the backup is Full or Incremental, and the request did not either (give the VirtualMachineBackup's status.type); reading everything"
                )),
            ),
            (Some(BackupType::Full), _) | (None, Ok(Some(BackupType::Full))) => {
                let changes = match &self.export.since {
                    Some(since) => Changes::fallback(format!(
                        "KubeVirt took a Full backup (forceFullBackup, or its tracker lost checkpoint '{since}'): reading all it holds, not only the changes since '{since}'"
                    )),
                    None => Changes::default(),
                };
                (allocation(), changes)
            }
            (Some(BackupType::Incremental), _) | (None, Ok(Some(BackupType::Incremental))) => match &self.export.since {
                None => (
                    None,
                    Changes::fallback(format!(
                        "KubeVirt took an Incremental backup but the request names no base checkpoint (the tracker's latestCheckpoint before it); reading everything through export {base}"
                    )),
                ),
                // The dirty bitmap: bit 0 says the range changed.
                Some(since) => {
                    let dirty = extents.iter().filter(|e| e.2 & 1 != 0).map(|e| (e.0, e.1)).collect();
                    (None, Changes { source: Some(ChangeSource::Kubevirt), changed: Some(dirty), since: Some(since.clone()), ..Default::default() })
                }
            },
        };
        Ok(Opened { size, reader, allocated, changes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_one_label_per_star() {
        assert!(host_matches("virt-export-*.vms.svc:443", "virt-export-backup-1.vms.svc:443"));
        assert!(host_matches("exportproxy.example:443", "EXPORTPROXY.example:443"));
        assert!(!host_matches("virt-export-*.vms.svc:443", "virt-export-b.other.svc:443"), "another namespace");
        assert!(!host_matches("virt-export-*.vms.svc:443", "virt-export-a.evil.vms.svc:443"), "a star never spans a dot");
        assert!(!host_matches("virt-export-*.vms.svc:443", "virt-export-a.vms.svc:8443"), "another port");
        assert!(!host_matches("a.b:443", "a.b:4430"));
    }

    #[test]
    fn descriptions_tell_full_from_incremental() {
        let kind = |ds: &[&str]| {
            let mut d = Described::default();
            ds.iter().for_each(|x| d.see(x));
            d.kind()
        };
        assert_eq!(kind(&["data", "hole", "zero"]), Ok(Some(BackupType::Full)));
        assert_eq!(kind(&["hole,zero"]), Ok(Some(BackupType::Full)));
        assert_eq!(kind(&["clean", "dirty,zero", "zero"]), Ok(Some(BackupType::Incremental)));
        assert_eq!(kind(&["zero", "", "unknown"]), Ok(None));
        assert_eq!(kind(&["data", "dirty"]), Err(()));
    }
}
