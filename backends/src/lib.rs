//! Where a repository's objects live, side by side: a local directory (the embedded
//! default), any S3-compatible store, and two decorators — a fault injector for tests and
//! request instrumentation for metrics. Every backend implements
//! [`mover_format::storage::Storage`] and passes the same [`conformance`] suite.
//!
//! [`open`] is the one place that turns a repository URL into a store.

pub mod conformance;
pub mod fault;
pub mod instrumented;
pub mod local;
pub mod s3;

use mover_format::storage::{PutOutcome, Storage, StorageError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tokio_util::sync::CancellationToken;

pub use local::LocalStorage;
pub use s3::{S3Options, S3Storage};

/// A repository URL that names no store Mover knows.
#[derive(Debug, thiserror::Error)]
#[error("repository '{url}': {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

/// Where an S3 store is, beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct S3Endpoint {
    /// Endpoint URL (Ceph RGW, MinIO, SeaweedFS); else `AWS_ENDPOINT_URL_S3`, else
    /// `AWS_ENDPOINT_URL`, else AWS.
    pub endpoint: Option<String>,
    /// Region; else the AWS configuration chain, else us-east-1.
    pub region: Option<String>,
}

/// Opens the store a repository URL names: `s3://bucket[/prefix]`, or a local directory
/// path. Any other `scheme://` is refused.
pub async fn open(url: &str, s3: &S3Endpoint) -> Result<Arc<dyn Storage>, UrlError> {
    if url.is_empty() {
        return Err(UrlError { url: url.into(), reason: "empty".into() });
    }
    if url.starts_with("s3://") {
        let mut o = S3Options::from_url(url).map_err(|reason| UrlError { url: url.into(), reason })?;
        o.endpoint = s3.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok()).or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(e) = o.endpoint.as_deref() {
            check_endpoint(e).map_err(|reason| UrlError { url: url.into(), reason })?;
        }
        o.region = s3.region.clone();
        Ok(Arc::new(S3Storage::new(o).await))
    } else if url.contains("://") {
        Err(UrlError { url: url.into(), reason: "unknown scheme (use a local path or s3://bucket/prefix)".into() })
    } else if looks_like_a_url(url) {
        // `s3:/bucket/x` or `s3:bucket` would otherwise become a local directory named so.
        Err(UrlError {
            url: url.into(),
            reason:
                "neither a path nor a URL Mover knows: an S3 repository is s3://bucket/prefix; a local directory with a colon in its name is written ./NAME"
                    .into(),
        })
    } else {
        Ok(Arc::new(LocalStorage::new(url)))
    }
}

/// `scheme:` at the start of something that is not written as a path.
fn looks_like_a_url(url: &str) -> bool {
    match url.split_once(':') {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        }
        None => false,
    }
}

/// An S3 endpoint is a URL with its scheme: `127.0.0.1:9000` alone would be retried as
/// "unreachable" for seconds.
fn check_endpoint(e: &str) -> Result<(), String> {
    let rest = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        Some(_) => Err(format!("S3 endpoint '{e}' names no host")),
        None => Err(format!("S3 endpoint '{e}' needs its scheme: http://{e} or https://{e}")),
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    /// A mistyped URL is refused at once, naming what is wrong (`s3:/bucket/x` used to
    /// become a local directory of that name).
    #[tokio::test]
    async fn mistyped_urls_and_endpoints_are_refused_at_once() {
        for bad in ["s3:/bucket/x", "s3:bucket", "S3:/b"] {
            let Err(e) = open(bad, &S3Endpoint::default()).await else { panic!("{bad} was accepted") };
            assert!(e.reason.contains("s3://bucket/prefix"), "{bad}: {}", e.reason);
        }
        let s3 = |e: &str| S3Endpoint { endpoint: Some(e.into()), region: None };
        let e = open("s3://b/x", &s3("127.0.0.1:9000")).await.err().unwrap();
        assert!(e.reason.contains("needs its scheme: http://127.0.0.1:9000"), "{}", e.reason);
        assert!(open("s3://b/x", &s3("http://")).await.err().unwrap().reason.contains("names no host"));
        // Paths stay paths, colons included when written as one.
        assert!(open("./a:b", &S3Endpoint::default()).await.is_ok());
        assert!(open("/srv/backup", &S3Endpoint::default()).await.is_ok());
    }
}

/// Opening a store failed: a URL Mover does not know, or a store that does not keep the
/// contract (create-only writes) or cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error(transparent)]
    Store(#[from] StorageError),
}

/// [`open`]; an S3 store is wrapped so that [`verify_create_only`] runs (once per process
/// and store) before its first write or delete — never for a process that only reads, so
/// read-only credentials can list, show, check and restore. A local directory needs no
/// probe: its create-only write is a hard link, which the kernel refuses onto an existing
/// name.
pub async fn open_verified(url: &str, s3: &S3Endpoint, _cancel: &CancellationToken) -> Result<Arc<dyn Storage>, OpenError> {
    let storage = open(url, s3).await?;
    if !storage.is_remote() {
        return Ok(storage);
    }
    let key = format!("{}|{url}", s3.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()).unwrap_or_default());
    Ok(Arc::new(CheckedBeforeWrite { inner: storage, key, checked: tokio::sync::OnceCell::new() }))
}

/// A store whose create-only contract is checked before the first write or delete through
/// it (a failed check is tried again by the next write).
#[derive(Debug)]
pub struct CheckedBeforeWrite {
    inner: Arc<dyn Storage>,
    key: String,
    checked: tokio::sync::OnceCell<()>,
}

impl CheckedBeforeWrite {
    async fn check(&self, cancel: &CancellationToken) -> Result<(), StorageError> {
        self.checked.get_or_try_init(|| verify_create_only_cached(&*self.inner, &self.key, cancel)).await.map(|_| ())
    }
}

#[async_trait::async_trait]
impl Storage for CheckedBeforeWrite {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
    async fn put(&self, name: &str, data: bytes::Bytes, cancel: &CancellationToken) -> Result<PutOutcome, StorageError> {
        self.check(cancel).await?;
        self.inner.put(name, data, cancel).await
    }
    async fn get(&self, name: &str, max_len: u64, cancel: &CancellationToken) -> Result<bytes::Bytes, StorageError> {
        self.inner.get(name, max_len, cancel).await
    }
    async fn get_range(&self, name: &str, offset: u64, len: u64, cancel: &CancellationToken) -> Result<bytes::Bytes, StorageError> {
        self.inner.get_range(name, offset, len, cancel).await
    }
    async fn head(&self, name: &str, cancel: &CancellationToken) -> Result<Option<u64>, StorageError> {
        self.inner.head(name, cancel).await
    }
    async fn list_page(&self, prefix: &str, token: Option<String>, cancel: &CancellationToken) -> Result<mover_format::storage::ListPage, StorageError> {
        self.inner.list_page(prefix, token, cancel).await
    }
    async fn list_page_after(
        &self,
        prefix: &str,
        after: &str,
        token: Option<String>,
        cancel: &CancellationToken,
    ) -> Result<mover_format::storage::ListPage, StorageError> {
        self.inner.list_page_after(prefix, after, token, cancel).await
    }
    async fn delete(&self, name: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        self.check(cancel).await?;
        self.inner.delete(name, cancel).await
    }
}

/// Stores that passed [`verify_create_only`] in this process.
fn verified() -> &'static Mutex<HashMap<String, ()>> {
    static V: OnceLock<Mutex<HashMap<String, ()>>> = OnceLock::new();
    V.get_or_init(Default::default)
}

/// [`verify_create_only`] unless `key` passed it before in this process.
pub async fn verify_create_only_cached(storage: &dyn Storage, key: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
    if verified().lock().map(|v| v.contains_key(key)).unwrap_or(false) {
        return Ok(());
    }
    verify_create_only(storage, cancel).await?;
    if let Ok(mut v) = verified().lock() {
        v.insert(key.to_string(), ());
    }
    Ok(())
}

/// Checks that the store honours create-only writes: every invariant of the repository
/// (immutable objects, lock refreshes, gc records) rests on a write never replacing an
/// existing object. Writes a probe object, writes it again with other bytes — which must be
/// refused — reads it back, and deletes it (credentials that may not delete leave it to
/// gc). A store that overwrites is refused with an error that says so.
pub async fn verify_create_only(storage: &dyn Storage, cancel: &CancellationToken) -> Result<(), StorageError> {
    let name = mover_format::names::probe(&mover_format::names::probe_stamp());
    let refuse = |what: &str| {
        StorageError::new(
            mover_format::storage::ErrorKind::Permanent,
            "checking create-only writes",
            &name,
            storage.location(),
            format!(
                "{what}: the store does not honour create-only writes (S3 `If-None-Match: *`), which every repository invariant rests on; use a store that does (AWS S3, Ceph RGW ≥ 18, MinIO, SeaweedFS)"
            ),
        )
    };
    let first = bytes::Bytes::from_static(b"first");
    let r = async {
        if storage.put(&name, first.clone(), cancel).await? != PutOutcome::Created {
            return Err(refuse("a new probe object was reported as existing"));
        }
        if storage.put(&name, bytes::Bytes::from_static(b"second"), cancel).await? != PutOutcome::Existed {
            return Err(refuse("a second write of the same name was accepted"));
        }
        if storage.get(&name, 64, cancel).await? != first {
            return Err(refuse("a refused second write replaced the object"));
        }
        Ok(())
    }
    .await;
    let _ = storage.delete(&name, cancel).await;
    r
}
