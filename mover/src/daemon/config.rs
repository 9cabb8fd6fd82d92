//! The daemon's configuration (TOML), validated once into typed values. Every setting and
//! its default is documented in docs/configuration.md.

use mover_engine::{Error, Result, ResultExt};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoEntry {
    /// A directory, or s3://bucket/prefix.
    pub url: String,
    /// File holding the password.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password (default MOVER_PASSWORD).
    pub password_env: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    /// Create the repository when it does not exist yet.
    #[serde(default)]
    pub init_if_missing: bool,
    /// Verify the repository this often (a verify job: structure and
    /// `verify_read_data_percent` of the data); unset: no scheduled verify.
    pub verify_interval_seconds: Option<u64>,
    /// Share of the packs a scheduled verify downloads and checks (0–100; default 10).
    pub verify_read_data_percent: Option<u32>,
    /// Groups reported by name in the recovery-point metrics; the others are summed up
    /// as `other` (labels stay bounded).
    #[serde(default)]
    pub status_groups: Vec<String>,
    /// Never delete (an append-only node: its credentials may create objects but not
    /// delete them); `forget`, `gc` and `unprotect` are refused up front, locks are released
    /// by a newer object. `MOVER_APPEND_ONLY=1` does the same for every repository.
    #[serde(default)]
    pub append_only: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that signs client certificates; clients must present one.
    pub client_ca: PathBuf,
}

/// The CSI SnapshotMetadata service of this cluster (KEP-3314). Requests name snapshots;
/// where to ask, and with which credentials, comes only from here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsiConfig {
    /// The CSI driver this service answers for (`[[csi_drivers]]`; optional in `[csi]`).
    #[serde(default)]
    pub driver: Option<String>,
    /// `HOST:PORT` of the service (TLS).
    pub endpoint: String,
    /// The service's CA certificate (PEM): the SnapshotMetadataService's `spec.caCert`.
    pub ca_file: PathBuf,
    /// A projected service-account token with the service's audience.
    pub token_file: PathBuf,
    pub tls_server_name: Option<String>,
    /// Bound on connecting and on each streamed message (default 30).
    pub timeout_seconds: Option<u64>,
}

/// Who may call which RPCs. Without a section every caller that passes the transport's
/// checks may call everything (the unix socket's permissions and peer check, or mTLS).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Client certificate identities (a URI or DNS SAN, or the subject CN) per RPC group.
    #[serde(default)]
    pub backup: Vec<String>,
    #[serde(default)]
    pub restore: Vec<String>,
    #[serde(default)]
    pub read: Vec<String>,
    /// Identity → the path prefixes its requests may name (sources, restore targets, NBD
    /// sockets; a pod volume by its pod's directory, `<kubelet>/pods/<uid>`). A caller none
    /// of whose identities is listed here is limited only by `allowed_roots`.
    #[serde(default)]
    pub paths: BTreeMap<String, Vec<PathBuf>>,
}

/// `[velero]`: Mover as Velero's data mover `mover` (docs/velero.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VeleroRaw {
    namespace: Option<String>,
    node_name: Option<String>,
    api_server: Option<String>,
    holder_image: Option<String>,
    prepare_timeout_seconds: Option<u64>,
    repository_timeout_seconds: Option<u64>,
    resync_seconds: Option<u64>,
    progress_interval_seconds: Option<u64>,
    #[serde(default)]
    locations: BTreeMap<String, String>,
}

/// The Velero data mover's settings, checked.
#[derive(Debug, Clone)]
pub struct VeleroConfig {
    /// Velero's namespace (`openshift-adp` under OADP); default `velero`.
    pub namespace: String,
    /// This node's name: `node_name`, else `$NODE_NAME` (the downward API).
    pub node: String,
    /// The API server; unset: the in-cluster configuration.
    pub api_server: Option<String>,
    /// The image of the pods that hold exposed volumes: `holder_image`, else `$MOVER_IMAGE`;
    /// unset: the image of the daemon's own pod (`$POD_NAME` in `$POD_NAMESPACE`).
    pub holder_image: Option<String>,
    pub prepare_timeout: Duration,
    /// Bound on opening a DataUpload's or DataDownload's repository before it fails.
    pub repository_timeout: Duration,
    /// How often every object is looked at again without a watch event.
    pub resync: Duration,
    /// How often a running transfer's progress is written.
    pub progress_interval: Duration,
    /// BackupStorageLocation name → repository name.
    pub locations: BTreeMap<String, String>,
}

impl VeleroRaw {
    fn check(self, repositories: &BTreeMap<String, RepoEntry>) -> Result<VeleroConfig> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let node = self.node_name.filter(|n| !n.is_empty()).or_else(|| env("NODE_NAME"));
        let node = node.ok_or_else(|| Error::invalid("[velero]: node_name is unset and so is NODE_NAME (set it from spec.nodeName)"))?;
        let holder_image = self.holder_image.filter(|n| !n.is_empty()).or_else(|| env("MOVER_IMAGE"));
        if holder_image.is_none() && (env("POD_NAME").is_none() || env("POD_NAMESPACE").is_none()) {
            return Err(Error::invalid(
                "[velero]: holder_image is unset, and so are MOVER_IMAGE and POD_NAME/POD_NAMESPACE (to read the daemon's own image from its pod)",
            ));
        }
        if self.locations.is_empty() {
            return Err(Error::invalid("[velero]: locations is empty: map each BackupStorageLocation to a repository (e.g. default = \"default\")"));
        }
        for (bsl, repo) in &self.locations {
            if !repositories.contains_key(repo) {
                return Err(Error::invalid(format!(
                    "[velero.locations] {bsl} = \"{repo}\": no such repository (configured: {})",
                    repositories.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let secs = |v: Option<u64>, d: u64| Duration::from_secs(v.unwrap_or(d).max(1));
        Ok(VeleroConfig {
            namespace: self.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "velero".into()),
            node,
            api_server: self.api_server.filter(|s| !s.is_empty()),
            holder_image,
            prepare_timeout: secs(self.prepare_timeout_seconds, 300),
            repository_timeout: secs(self.repository_timeout_seconds, 30),
            resync: secs(self.resync_seconds, 30),
            progress_interval: secs(self.progress_interval_seconds, 2),
            locations: self.locations,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    velero: Option<VeleroRaw>,
    listen: Option<String>,
    http_listen: Option<String>,
    tls: Option<TlsFiles>,
    #[serde(default)]
    insecure_plaintext: bool,
    #[serde(default)]
    insecure_plaintext_exports: bool,
    socket_mode: Option<String>,
    socket_group: Option<u32>,
    #[serde(default)]
    socket_allowed_uids: Vec<u32>,
    authorization: Option<AuthConfig>,
    #[serde(default)]
    repositories: BTreeMap<String, RepoEntry>,
    allowed_roots: Option<Vec<PathBuf>>,
    kubelet_root: Option<PathBuf>,
    #[serde(default)]
    nbd_tcp_endpoints: Vec<String>,
    #[serde(default)]
    kubevirt_export_hosts: Vec<String>,
    nbd_connect_timeout_seconds: Option<u64>,
    nbd_io_timeout_seconds: Option<u64>,
    kubevirt_retry_seconds: Option<u64>,
    backup_verify_sample: Option<usize>,
    backup_compare_every: Option<u32>,
    csi: Option<CsiConfig>,
    /// One SnapshotMetadata service per CBT-capable CSI driver on the node.
    #[serde(default)]
    csi_drivers: Vec<CsiConfig>,
    max_concurrent_transfers: Option<usize>,
    transfer_history: Option<usize>,
    transfer_history_days: Option<u64>,
    bandwidth_limit: Option<u64>,
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    shutdown_grace_seconds: Option<u64>,
    export_address: Option<String>,
    status_interval_seconds: Option<u64>,
    drill_scratch_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub listen: Listen,
    pub http_listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Permission bits of the unix socket (default 0600: the daemon's user only).
    pub socket_mode: u32,
    /// Group owning the unix socket (with a mode like 0660, its members may connect).
    pub socket_group: Option<u32>,
    /// Peers (by uid, checked with SO_PEERCRED) the unix socket accepts besides the
    /// daemon's own uid and root.
    pub socket_allowed_uids: Vec<u32>,
    pub authorization: Option<AuthConfig>,
    pub repositories: BTreeMap<String, RepoEntry>,
    pub allowed_roots: Vec<PathBuf>,
    pub kubelet_root: PathBuf,
    pub nbd_tcp_endpoints: Vec<String>,
    /// `host:port` of the KubeVirt export servers (virt-exportproxy) requests may name.
    pub kubevirt_export_hosts: Vec<String>,
    pub nbd_connect_timeout: Duration,
    pub nbd_io_timeout: Duration,
    /// What a backup request leaves unset: the change-source check and the KubeVirt
    /// export's retry window.
    pub backup: crate::plan::BackupDefaults,
    /// `[csi]` and every `[[csi_drivers]]`: at most one without a driver, no driver twice.
    pub csi: Vec<CsiConfig>,
    pub max_concurrent_transfers: usize,
    /// Ended transfers kept (records, and what Get/List/Watch answer): the newest
    /// `transfer_history` (default 1000), none older than `transfer_history_days` (30).
    pub transfer_history: super::jobs::Retention,
    pub bandwidth_limit: u64,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub shutdown_grace_seconds: u64,
    /// The address TCP exports listen on (a free port each); 127.0.0.1 unless set. Off
    /// loopback, exports need [tls] (NBD over TLS with the same certificates and rules).
    pub export_address: std::net::IpAddr,
    /// TCP exports without [tls] (plaintext NBD, readable by any local user) are allowed.
    pub insecure_plaintext_exports: bool,
    /// How often the recovery-point metrics are recomputed (also after every job).
    pub status_interval: Duration,
    /// Where drills restore to (default `<state_dir>/drill`); scratch files are removed.
    pub drill_scratch_dir: PathBuf,
    /// `[velero]`: the Velero data mover runs when set.
    pub velero: Option<VeleroConfig>,
    /// The settings that took their default beneath `state_dir` (not set in the file):
    /// `--state-dir` moves them along.
    derived: Derived,
}

/// Which state-directory defaults were taken (see [`DaemonConfig::override_with`]).
#[derive(Debug, Clone, Copy, Default)]
struct Derived {
    repository: bool,
    listen: bool,
    cache_dir: bool,
    drill_scratch_dir: bool,
}

pub fn parse_listen(s: &str) -> Result<Listen> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(Listen::Unix(PathBuf::from(p)));
    }
    Ok(Listen::Tcp(s.parse().map_err(|_| Error::invalid(format!("listen address '{s}' is not HOST:PORT or unix:PATH")))?))
}

/// `[csi]` and `[[csi_drivers]]` as one list: every `[[csi_drivers]]` entry names its
/// driver, and no driver is named twice.
fn csi_services(one: Option<CsiConfig>, drivers: Vec<CsiConfig>) -> Result<Vec<CsiConfig>> {
    let mut seen = std::collections::HashSet::new();
    for d in &drivers {
        match d.driver.as_deref() {
            None | Some("") => return Err(Error::invalid(format!("[[csi_drivers]] entry for {}: `driver` is required (the CSI driver's name)", d.endpoint))),
            Some(name) if !seen.insert(name.to_string()) => return Err(Error::invalid(format!("CSI driver '{name}' is configured twice"))),
            _ => {}
        }
    }
    if let Some(name) = one.as_ref().and_then(|c| c.driver.as_deref()) {
        if seen.contains(name) {
            return Err(Error::invalid(format!("CSI driver '{name}' is configured twice ([csi] and [[csi_drivers]])")));
        }
    }
    Ok(one.into_iter().chain(drivers).collect())
}

impl DaemonConfig {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let raw: Raw = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str(&text).map_err(|e| Error::invalid(format!("config {}: {e}", p.display())))?
            }
            None => Raw::default(),
        };
        Self::from_raw(raw)
    }

    /// The embedded default repository in `state_dir` (created on first start).
    fn default_repository(state_dir: &Path) -> RepoEntry {
        RepoEntry {
            url: state_dir.join("repository").display().to_string(),
            password_file: Some(state_dir.join("default-repository.password")),
            password_env: None,
            s3_endpoint: None,
            s3_region: None,
            init_if_missing: true,
            verify_interval_seconds: None,
            verify_read_data_percent: None,
            status_groups: Vec::new(),
            append_only: false,
        }
    }

    fn from_raw(raw: Raw) -> Result<Self> {
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/mover"));
        // Without configuration: a unix socket only the daemon's user can reach, never TCP.
        let listen = match raw.listen.as_deref() {
            Some(l) => parse_listen(l)?,
            None => Listen::Unix(state_dir.join("mover.sock")),
        };
        let http_listen: SocketAddr =
            raw.http_listen.as_deref().unwrap_or("127.0.0.1:7601").parse().map_err(|_| Error::invalid("http_listen is not HOST:PORT"))?;
        let derived = Derived {
            repository: raw.repositories.is_empty(),
            listen: raw.listen.is_none(),
            cache_dir: raw.cache_dir.is_none(),
            drill_scratch_dir: raw.drill_scratch_dir.is_none(),
        };
        let mut repositories = raw.repositories;
        if repositories.is_empty() {
            repositories.insert("default".into(), Self::default_repository(&state_dir));
        }
        for (name, r) in &repositories {
            if name.is_empty() || r.url.is_empty() {
                return Err(Error::invalid(format!("repository '{name}' needs a name and a url")));
            }
            if let Some(p) = r.verify_read_data_percent {
                crate::plan::verify::VerifyPlan::from_percent(p).map_err(|e| e.context(format!("repository '{name}': verify_read_data_percent")))?;
            }
            if r.verify_interval_seconds == Some(0) {
                return Err(Error::invalid(format!("repository '{name}': verify_interval_seconds must be at least 1")));
            }
        }
        let max = raw.max_concurrent_transfers.unwrap_or(2);
        if max == 0 {
            return Err(Error::invalid("max_concurrent_transfers must be at least 1".to_string()));
        }
        let socket_mode = match raw.socket_mode.as_deref() {
            None => 0o600,
            Some(m) => {
                u32::from_str_radix(m.trim_start_matches("0o"), 8).map_err(|_| Error::invalid(format!("socket_mode '{m}' is not octal (e.g. \"0660\")")))?
            }
        };
        if socket_mode & 0o007 != 0 {
            return Err(Error::invalid(format!("socket_mode {socket_mode:o} lets every local user connect; use 0600 or 0660 with socket_group")));
        }
        // Roots are compared with request paths as they are given: keep them canonical.
        let canon = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
        let kubelet_root = canon(raw.kubelet_root.unwrap_or_else(|| PathBuf::from("/var/lib/kubelet")));
        let allowed_roots: Vec<PathBuf> =
            raw.allowed_roots.unwrap_or_else(|| vec![kubelet_root.clone(), PathBuf::from("/dev")]).into_iter().map(canon).collect();
        for r in &allowed_roots {
            if !r.is_absolute() || r == Path::new("/") {
                return Err(Error::invalid(format!("allowed root {} must be an absolute directory other than /", r.display())));
            }
        }
        let mut authorization = raw.authorization;
        if let Some(a) = authorization.as_mut() {
            for (who, prefixes) in a.paths.iter_mut() {
                for p in prefixes.iter_mut() {
                    *p = canon(p.clone());
                    if !allowed_roots.iter().any(|r| p.starts_with(r)) {
                        return Err(Error::invalid(format!(
                            "[authorization.paths] '{who}': {} is not beneath an allowed root ({})",
                            p.display(),
                            allowed_roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
                        )));
                    }
                }
            }
        }
        let export_address: std::net::IpAddr = match raw.export_address.as_deref() {
            None => std::net::Ipv4Addr::LOCALHOST.into(),
            Some(a) => a.parse().map_err(|_| Error::invalid(format!("export_address '{a}' is not an IP address")))?,
        };
        if !export_address.is_loopback() && raw.tls.is_none() {
            return Err(Error::invalid(format!(
                "export_address {export_address} is not loopback: NBD has no authentication of its own, so exports off loopback need [tls]"
            )));
        }
        let velero = raw.velero.map(|v| v.check(&repositories)).transpose()?;
        let cfg = Self {
            derived,
            velero,
            export_address,
            insecure_plaintext_exports: raw.insecure_plaintext_exports,
            status_interval: Duration::from_secs(raw.status_interval_seconds.unwrap_or(300).max(1)),
            drill_scratch_dir: raw.drill_scratch_dir.unwrap_or_else(|| state_dir.join("drill")),
            listen,
            http_listen,
            tls: raw.tls,
            socket_mode,
            socket_group: raw.socket_group,
            socket_allowed_uids: raw.socket_allowed_uids,
            authorization,
            repositories,
            allowed_roots,
            kubelet_root,
            nbd_tcp_endpoints: raw.nbd_tcp_endpoints,
            kubevirt_export_hosts: raw.kubevirt_export_hosts,
            nbd_connect_timeout: Duration::from_secs(raw.nbd_connect_timeout_seconds.unwrap_or(10).max(1)),
            nbd_io_timeout: Duration::from_secs(raw.nbd_io_timeout_seconds.unwrap_or(60).max(1)),
            backup: {
                let d = crate::plan::BackupDefaults::default();
                crate::plan::BackupDefaults {
                    verify_sample: raw.backup_verify_sample.unwrap_or(d.verify_sample),
                    compare_every: raw.backup_compare_every.unwrap_or(d.compare_every),
                    kubevirt_retry: raw.kubevirt_retry_seconds.map(Duration::from_secs).unwrap_or(d.kubevirt_retry),
                }
            },
            csi: csi_services(raw.csi, raw.csi_drivers)?,
            max_concurrent_transfers: max,
            transfer_history: super::jobs::Retention {
                count: raw.transfer_history.unwrap_or(1000).max(1),
                age: Duration::from_secs(raw.transfer_history_days.unwrap_or(30).max(1) * 86_400),
            },
            bandwidth_limit: raw.bandwidth_limit.unwrap_or(0),
            cache_dir: raw.cache_dir.unwrap_or_else(|| state_dir.join("cache")),
            state_dir,
            shutdown_grace_seconds: raw.shutdown_grace_seconds.unwrap_or(30),
        };
        cfg.check_transport(raw.insecure_plaintext)?;
        Ok(cfg)
    }

    /// The one transport rule: a TCP listener on anything but loopback needs mTLS (or an
    /// explicit `insecure_plaintext`).
    fn check_transport(&self, insecure_plaintext: bool) -> Result<()> {
        if let Listen::Tcp(a) = &self.listen {
            if !a.ip().is_loopback() && self.tls.is_none() && !insecure_plaintext {
                return Err(Error::invalid(format!("listen address {a} is not loopback: configure [tls] (mTLS) or set insecure_plaintext = true")));
            }
        }
        Ok(())
    }

    /// `mover serve -r URL` (or `MOVER_REPOSITORY`): the daemon's `default` repository is
    /// `url` instead of the embedded one — its password from `password_file`, else
    /// `MOVER_PASSWORD`; not created when missing (`mover init` creates it). Refused when
    /// the configuration names its own repositories: one place says where they are.
    pub fn use_repository(&mut self, url: &str, password_file: Option<PathBuf>, s3_endpoint: Option<String>, s3_region: Option<String>) -> Result<()> {
        let embedded = self.repositories.len() == 1
            && self
                .repositories
                .get("default")
                .is_some_and(|r| r.init_if_missing && r.password_file.as_ref().is_some_and(|p| p.ends_with("default-repository.password")));
        if !embedded {
            return Err(Error::invalid(format!(
                "--repo / MOVER_REPOSITORY ('{url}') names the default repository of a daemon without [repositories]; this configuration names its own ({}): set the url there, or unset MOVER_REPOSITORY",
                self.repositories.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let entry = RepoEntry {
            url: url.to_string(),
            password_file,
            password_env: None,
            s3_endpoint,
            s3_region,
            init_if_missing: false,
            verify_interval_seconds: None,
            verify_read_data_percent: None,
            status_groups: Vec::new(),
            append_only: false,
        };
        self.repositories.insert("default".into(), entry);
        Ok(())
    }

    /// Applies the command line's overrides, then checks the transport rule again.
    pub fn override_with(&mut self, listen: Option<&str>, http_listen: Option<&str>, state_dir: Option<&Path>) -> Result<()> {
        if let Some(s) = state_dir {
            // Keep the defaults inside the given state directory: whatever the file (if
            // any) left to its default, the embedded repository included.
            if self.derived.repository {
                for r in self.repositories.values_mut() {
                    if r.init_if_missing {
                        *r = Self::default_repository(s);
                    }
                }
            }
            if self.derived.cache_dir {
                self.cache_dir = s.join("cache");
            }
            if self.derived.drill_scratch_dir {
                self.drill_scratch_dir = s.join("drill");
            }
            if self.derived.listen && listen.is_none() {
                self.listen = Listen::Unix(s.join("mover.sock"));
            }
            self.state_dir = s.to_path_buf();
        }
        if let Some(l) = listen {
            self.listen = parse_listen(l)?;
        }
        if let Some(h) = http_listen {
            self.http_listen = h.parse().map_err(|_| Error::invalid(format!("--http-listen '{h}' is not HOST:PORT")))?;
        }
        self.check_transport(std::env::var("MOVER_INSECURE_PLAINTEXT").as_deref() == Ok("1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_on_a_private_socket_and_tcp_off_loopback_needs_tls() {
        let c = DaemonConfig::from_raw(Raw { state_dir: Some("/tmp/st".into()), ..Default::default() }).unwrap();
        assert_eq!(c.listen, Listen::Unix("/tmp/st/mover.sock".into()));
        assert_eq!(c.socket_mode, 0o600);
        let e = DaemonConfig::from_raw(Raw { listen: Some("0.0.0.0:7600".into()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("not loopback"), "{e}");
        let e = DaemonConfig::from_raw(Raw { socket_mode: Some("0666".into()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("every local user"), "{e}");
    }

    /// The shipped ConfigMap's `[velero]` section, uncommented, loads (the node and image,
    /// which the DaemonSet passes as NODE_NAME and POD_NAME, given here); a location naming
    /// no repository, or none at all, is refused naming what is wrong.
    #[test]
    fn the_shipped_velero_section_loads_and_bad_ones_are_refused() {
        let yaml = include_str!("../../../deploy/kubernetes/configmap.yaml");
        let mut on = false;
        let toml_text: String = yaml
            .lines()
            .skip_while(|l| !l.contains("mover.toml: |"))
            .skip(1)
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .map(|l| {
                on |= l == "# [velero]";
                if on {
                    l.strip_prefix("# ").unwrap_or(l)
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let text = toml_text.replace("[velero]\n", "[velero]\nnode_name = \"n1\"\nholder_image = \"mover:1\"\n");
        let c = DaemonConfig::from_raw(toml::from_str(&text).unwrap()).unwrap();
        let v = c.velero.expect("[velero] is set");
        assert_eq!((v.namespace.as_str(), v.node.as_str()), ("openshift-adp", "n1"));
        assert_eq!(v.locations.get("default").map(String::as_str), Some("default"));
        assert_eq!(v.prepare_timeout, Duration::from_secs(300));
        let bad = text.replace("default = \"default\"", "default = \"nowhere\"");
        let e = DaemonConfig::from_raw(toml::from_str(&bad).unwrap()).unwrap_err().to_string();
        assert!(e.contains("default = \"nowhere\": no such repository (configured: default)"), "{e}");
        let none = text.replace("default = \"default\"", "");
        let e = DaemonConfig::from_raw(toml::from_str(&none).unwrap()).unwrap_err().to_string();
        assert!(e.contains("locations is empty"), "{e}");
    }

    /// A node with two CBT-capable CSI drivers has a service for each; a request picks by
    /// driver, and without one only when the choice is unambiguous.
    #[test]
    fn one_csi_service_per_driver() {
        let raw = |text: &str| -> Raw { toml::from_str(text).unwrap() };
        let two = "[[csi_drivers]]\ndriver = \"a.csi\"\nendpoint = \"a:6443\"\nca_file = \"/a.pem\"\ntoken_file = \"/a.tok\"\n\
                   [[csi_drivers]]\ndriver = \"b.csi\"\nendpoint = \"b:6443\"\nca_file = \"/b.pem\"\ntoken_file = \"/b.tok\"\n";
        let c = DaemonConfig::from_raw(raw(two)).unwrap();
        let env = crate::daemon::env_from(&c);
        let pick = |d: Option<&str>| crate::plan::backup::csi_service(&env, d, "disk").map(|s| s.endpoint);
        assert_eq!(pick(Some("b.csi")).unwrap(), "b:6443");
        assert_eq!(pick(Some("a.csi")).unwrap(), "a:6443");
        let e = pick(Some("c.csi")).unwrap_err().to_string();
        assert!(e.contains("'c.csi'") && e.contains("a.csi, b.csi"), "{e}");
        let e = pick(None).unwrap_err().to_string();
        assert!(e.contains("name the driver"), "{e}");
        // With [csi] beside them, a request without a driver gets [csi].
        let three = format!("[csi]\nendpoint = \"d:6443\"\nca_file = \"/d.pem\"\ntoken_file = \"/d.tok\"\n{two}");
        let env = crate::daemon::env_from(&DaemonConfig::from_raw(raw(&three)).unwrap());
        assert_eq!(crate::plan::backup::csi_service(&env, None, "disk").unwrap().endpoint, "d:6443");
        // A driver twice, or an entry without one: refused.
        let dup = format!("{two}[[csi_drivers]]\ndriver = \"a.csi\"\nendpoint = \"x:1\"\nca_file = \"/x\"\ntoken_file = \"/x\"\n");
        assert!(DaemonConfig::from_raw(raw(&dup)).unwrap_err().to_string().contains("'a.csi' is configured twice"));
        let nameless = "[[csi_drivers]]\nendpoint = \"x:1\"\nca_file = \"/x\"\ntoken_file = \"/x\"\n";
        assert!(DaemonConfig::from_raw(raw(nameless)).unwrap_err().to_string().contains("`driver` is required"));
    }
}
