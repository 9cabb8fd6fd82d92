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

use mover_format::storage::Storage;
use std::sync::Arc;

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
        o.region = s3.region.clone();
        Ok(Arc::new(S3Storage::new(o).await))
    } else if url.contains("://") {
        Err(UrlError { url: url.into(), reason: "unknown scheme (use a local path or s3://bucket/prefix)".into() })
    } else {
        Ok(Arc::new(LocalStorage::new(url)))
    }
}
