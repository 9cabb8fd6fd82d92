//! The daemon's configuration (TOML), validated once into typed values. Every setting and
//! its default is documented in docs/configuration.md.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that signs client certificates; clients must present one.
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    http_listen: Option<String>,
    tls: Option<TlsFiles>,
    #[serde(default)]
    insecure_plaintext: bool,
    #[serde(default)]
    repositories: BTreeMap<String, RepoEntry>,
    allowed_roots: Option<Vec<PathBuf>>,
    kubelet_root: Option<PathBuf>,
    max_concurrent_transfers: Option<usize>,
    bandwidth_limit: Option<u64>,
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    shutdown_grace_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub listen: Listen,
    pub http_listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub repositories: BTreeMap<String, RepoEntry>,
    pub allowed_roots: Vec<PathBuf>,
    pub kubelet_root: PathBuf,
    pub max_concurrent_transfers: usize,
    pub bandwidth_limit: u64,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub shutdown_grace_seconds: u64,
}

pub fn parse_listen(s: &str) -> Result<Listen> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(Listen::Unix(PathBuf::from(p)));
    }
    Ok(Listen::Tcp(s.parse().with_context(|| format!("listen address '{s}' is not HOST:PORT or unix:PATH"))?))
}

impl DaemonConfig {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let raw: Raw = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("config {}", p.display()))?
            }
            None => Raw::default(),
        };
        Self::from_raw(raw)
    }

    fn from_raw(raw: Raw) -> Result<Self> {
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/mover"));
        let listen = parse_listen(raw.listen.as_deref().unwrap_or("127.0.0.1:7600"))?;
        let http_listen: SocketAddr = raw.http_listen.as_deref().unwrap_or("127.0.0.1:7601").parse().context("http_listen is not HOST:PORT")?;
        if let Listen::Tcp(a) = &listen {
            if !a.ip().is_loopback() && raw.tls.is_none() && !raw.insecure_plaintext {
                bail!("listen address {a} is not loopback: configure [tls] (mTLS) or set insecure_plaintext = true");
            }
        }
        let mut repositories = raw.repositories;
        if repositories.is_empty() {
            repositories.insert(
                "default".into(),
                RepoEntry {
                    url: state_dir.join("repository").display().to_string(),
                    password_file: Some(state_dir.join("default-repository.password")),
                    password_env: None,
                    s3_endpoint: None,
                    s3_region: None,
                    init_if_missing: true,
                },
            );
        }
        for (name, r) in &repositories {
            if name.is_empty() || r.url.is_empty() {
                bail!("repository '{name}' needs a name and a url");
            }
        }
        let max = raw.max_concurrent_transfers.unwrap_or(2);
        if max == 0 {
            bail!("max_concurrent_transfers must be at least 1");
        }
        Ok(Self {
            listen,
            http_listen,
            tls: raw.tls,
            repositories,
            allowed_roots: raw.allowed_roots.unwrap_or_else(|| vec![PathBuf::from("/var/lib/kubelet"), PathBuf::from("/dev")]),
            kubelet_root: raw.kubelet_root.unwrap_or_else(|| PathBuf::from("/var/lib/kubelet")),
            max_concurrent_transfers: max,
            bandwidth_limit: raw.bandwidth_limit.unwrap_or(0),
            cache_dir: raw.cache_dir.unwrap_or_else(|| state_dir.join("cache")),
            state_dir,
            shutdown_grace_seconds: raw.shutdown_grace_seconds.unwrap_or(30),
        })
    }
}
