//! Opening a repository from what a user gives: `--repo PATH|s3://bucket/prefix`,
//! password from `MOVER_PASSWORD` or a file, cache directory for the local index.

use crate::index_cache::RocksIndex;
use crate::s3::{S3Options, S3Storage};
use anyhow::{bail, Context, Result};
use mover_format::local_index::{ChunkIndex, MemIndex};
use mover_format::storage::local::LocalStorage;
use mover_format::storage::Storage;
use mover_format::Repository;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
/// A password; zeroed when dropped, never printed.
pub type Password = zeroize::Zeroizing<Vec<u8>>;

/// Reads a password file as bytes, without its trailing newline. Every reader of password
/// files (CLI, `key` commands, daemon) goes through here, so they agree on the key.
pub fn read_password_file(path: &Path, what: &str) -> Result<Password> {
    let s = Password::new(std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?);
    let end = s.iter().rposition(|&b| b != b'\n' && b != b'\r').map(|i| i + 1).unwrap_or(0);
    if end == 0 {
        bail!("{what} {} is empty", path.display());
    }
    Ok(Password::new(s[..end].to_vec()))
}

/// A password from the environment variable `var`, if set and non-empty.
pub fn env_password(var: &str) -> Option<Password> {
    std::env::var(var).ok().filter(|p| !p.is_empty()).map(|p| Password::new(p.into_bytes()))
}

#[derive(Debug, Clone, Default)]
pub struct RepoArgs {
    pub repo: Option<String>,
    pub password_file: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub cache_dir: Option<PathBuf>,
}

pub async fn storage_for(url: &str, endpoint: Option<String>, region: Option<String>) -> Result<Arc<dyn Storage>> {
    if url.starts_with("s3://") {
        let mut o = S3Options::from_url(url).map_err(anyhow::Error::msg)?;
        o.endpoint = endpoint.or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok()).or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        o.region = region;
        Ok(Arc::new(S3Storage::new(o).await))
    } else if url.contains("://") {
        bail!("repository '{url}': unknown scheme (use a local path or s3://bucket/prefix)")
    } else {
        Ok(Arc::new(LocalStorage::new(url)))
    }
}

impl RepoArgs {
    pub fn url(&self) -> Result<String> {
        match &self.repo {
            Some(r) if !r.is_empty() => Ok(r.clone()),
            _ => bail!("no repository given: use --repo PATH|s3://bucket/prefix or set MOVER_REPOSITORY"),
        }
    }

    pub fn password(&self) -> Result<Password> {
        if let Some(p) = &self.password_file {
            return read_password_file(p, "password file");
        }
        env_password("MOVER_PASSWORD").ok_or_else(|| anyhow::anyhow!("no password given: set MOVER_PASSWORD or use --password-file FILE"))
    }

    pub async fn storage(&self) -> Result<Arc<dyn Storage>> {
        storage_for(&self.url()?, self.s3_endpoint.clone(), self.s3_region.clone()).await
    }

    pub async fn open(&self, cancel: &CancellationToken) -> Result<Repository> {
        let storage = self.storage().await?;
        let pw = self.password()?;
        Ok(Repository::open(storage, &pw, cancel).await?)
    }

    pub fn cache_root(&self) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        if let Ok(d) = std::env::var("MOVER_CACHE_DIR") {
            return PathBuf::from(d);
        }
        if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
            return Path::new(&d).join("mover");
        }
        match std::env::var("HOME") {
            Ok(h) => Path::new(&h).join(".cache").join("mover"),
            Err(_) => PathBuf::from("/var/cache/mover"),
        }
    }
}

/// The local index of `repo`: RocksDB under the cache directory; when another process
/// holds it, an in-memory index instead. Not synced here: `backup` and
/// [`crate::gc::with_pending`] sync it in the order the GC protocol needs.
pub fn open_local_index(repo: &Repository, cache_root: &Path) -> Arc<dyn ChunkIndex> {
    let path = RocksIndex::path_for(cache_root, &repo.config().id);
    match RocksIndex::open(&path) {
        Ok(i) => Arc::new(i),
        Err(e) => {
            tracing::warn!("{e:#}; using an in-memory index for this run");
            Arc::new(MemIndex::default())
        }
    }
}
