//! Opening a repository from what an operator gives: `--repo PATH|s3://bucket/prefix`,
//! the password from `MOVER_PASSWORD` or a file, and the cache directory of the local index.

use crate::secrets::{env_password, read_password_file, Password};
use mover_engine::{Error, Result};
use mover_format::storage::Storage;
use mover_format::Repository;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct RepoArgs {
    pub repo: Option<String>,
    pub password_file: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub cache_dir: Option<PathBuf>,
    /// The environment variable holding the password when no file is given (default
    /// `MOVER_PASSWORD`).
    pub password_env: Option<String>,
}

impl RepoArgs {
    /// A second repository (a copy's target, a repair's source): its own location and
    /// password (file, else the variable `password_env`), this one's S3 endpoint and
    /// region unless given, and the same cache directory.
    pub fn second(&self, repo: &str, password_file: Option<PathBuf>, s3_endpoint: Option<String>, s3_region: Option<String>, password_env: &str) -> Self {
        RepoArgs {
            repo: Some(repo.to_string()),
            password_file,
            s3_endpoint: s3_endpoint.or_else(|| self.s3_endpoint.clone()),
            s3_region: s3_region.or_else(|| self.s3_region.clone()),
            cache_dir: self.cache_dir.clone(),
            password_env: Some(password_env.into()),
        }
    }

    pub fn url(&self) -> Result<String> {
        match &self.repo {
            Some(r) if !r.is_empty() => Ok(r.clone()),
            _ => Err(Error::invalid("no repository given: use --repo PATH|s3://bucket/prefix or set MOVER_REPOSITORY")),
        }
    }

    pub fn password(&self) -> Result<Password> {
        if let Some(p) = &self.password_file {
            return read_password_file(p, "password file");
        }
        let var = self.password_env.as_deref().unwrap_or("MOVER_PASSWORD");
        env_password(var).ok_or_else(|| {
            Error::invalid(format!("no password given for repository {}: set {var} or give a password file", self.repo.as_deref().unwrap_or("?")))
        })
    }

    /// The store, checked to honour create-only writes (S3: probed once per process).
    pub async fn storage(&self, cancel: &CancellationToken) -> Result<Arc<dyn Storage>> {
        let s3 = mover_backends::S3Endpoint { endpoint: self.s3_endpoint.clone(), region: self.s3_region.clone() };
        match mover_backends::open_verified(&self.url()?, &s3, cancel).await {
            Ok(s) => Ok(s),
            Err(mover_backends::OpenError::Url(e)) => Err(Error::invalid(e.to_string())),
            Err(mover_backends::OpenError::Store(e)) => Err(e.into()),
        }
    }

    /// The repository, its store checked to honour create-only writes before the first
    /// write (a process that only reads needs only read access).
    pub async fn open(&self, cancel: &CancellationToken) -> Result<Repository> {
        let storage = self.storage(cancel).await?;
        let pw = self.password()?;
        let repo = Repository::open(storage, &pw, cancel).await?;
        repo.cache_manifests_in(mover_engine::index::manifest_cache_dir(&self.cache_root(), &repo));
        if mover_engine::lock::append_only_from_env() {
            repo.set_append_only();
        }
        tracing::debug!(repository = %repo.location(), "repository opened");
        Ok(repo)
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
