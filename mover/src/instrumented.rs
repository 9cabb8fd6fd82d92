//! A storage decorator that records request latency and errors per operation in
//! Prometheus (`mover_store_request_seconds{op,result}`).

use async_trait::async_trait;
use bytes::Bytes;
use mover_format::storage::{ErrorKind, ListPage, PutOutcome, Storage, StorageError};
use prometheus::HistogramVec;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Instrumented {
    inner: Arc<dyn Storage>,
    hist: HistogramVec,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Storage>, hist: HistogramVec) -> Self {
        Self { inner, hist }
    }
    fn observe<T>(&self, op: &str, t: Instant, r: &Result<T, StorageError>) {
        let result = match r {
            Ok(_) => "ok",
            Err(e) if e.kind == ErrorKind::Cancelled => "cancelled",
            Err(e) if e.kind == ErrorKind::NotFound => "not_found",
            Err(_) => "err",
        };
        self.hist.with_label_values(&[op, result]).observe(t.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl Storage for Instrumented {
    fn location(&self) -> &str {
        self.inner.location()
    }
    async fn put(&self, name: &str, data: Bytes, cancel: &CancellationToken) -> Result<PutOutcome, StorageError> {
        let t = Instant::now();
        let r = self.inner.put(name, data, cancel).await;
        self.observe("put", t, &r);
        r
    }
    async fn get(&self, name: &str, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        let t = Instant::now();
        let r = self.inner.get(name, cancel).await;
        self.observe("get", t, &r);
        r
    }
    async fn get_range(&self, name: &str, offset: u64, len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        let t = Instant::now();
        let r = self.inner.get_range(name, offset, len, cancel).await;
        self.observe("get_range", t, &r);
        r
    }
    async fn head(&self, name: &str, cancel: &CancellationToken) -> Result<Option<u64>, StorageError> {
        let t = Instant::now();
        let r = self.inner.head(name, cancel).await;
        self.observe("head", t, &r);
        r
    }
    async fn list_page(&self, prefix: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        let t = Instant::now();
        let r = self.inner.list_page(prefix, token, cancel).await;
        self.observe("list", t, &r);
        r
    }
    async fn delete(&self, name: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        let t = Instant::now();
        let r = self.inner.delete(name, cancel).await;
        self.observe("delete", t, &r);
        r
    }
}
