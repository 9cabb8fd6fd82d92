//! A storage decorator that reports every request's operation, outcome and latency to an
//! [`Observer`] (the daemon turns them into `mover_store_request_seconds{op,result}`). It
//! knows nothing of Prometheus: the observer does.

use async_trait::async_trait;
use bytes::Bytes;
use mover_format::storage::{ErrorKind, ListPage, PutOutcome, Storage, StorageError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A storage request, as a bounded label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    GetRange,
    Head,
    List,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::GetRange => "get_range",
            Op::Head => "head",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }
}

/// How a request ended, as a bounded label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NotFound,
    Cancelled,
    Err,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Cancelled => "cancelled",
            Outcome::Err => "err",
        }
    }
}

/// Receives one call per finished request.
pub trait Observer: Send + Sync + std::fmt::Debug {
    fn observe(&self, op: Op, outcome: Outcome, took: Duration);
}

#[derive(Debug)]
pub struct Instrumented {
    inner: Arc<dyn Storage>,
    observer: Arc<dyn Observer>,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Storage>, observer: Arc<dyn Observer>) -> Self {
        Self { inner, observer }
    }
    fn observe<T>(&self, op: Op, t: Instant, r: &Result<T, StorageError>) {
        let outcome = match r {
            Ok(_) => Outcome::Ok,
            Err(e) if e.kind == ErrorKind::Cancelled => Outcome::Cancelled,
            Err(e) if e.kind == ErrorKind::NotFound => Outcome::NotFound,
            Err(_) => Outcome::Err,
        };
        self.observer.observe(op, outcome, t.elapsed());
    }
}

#[async_trait]
impl Storage for Instrumented {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
    async fn put(&self, name: &str, data: Bytes, cancel: &CancellationToken) -> Result<PutOutcome, StorageError> {
        let t = Instant::now();
        let r = self.inner.put(name, data, cancel).await;
        self.observe(Op::Put, t, &r);
        r
    }
    async fn get(&self, name: &str, max_len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        let t = Instant::now();
        let r = self.inner.get(name, max_len, cancel).await;
        self.observe(Op::Get, t, &r);
        r
    }
    async fn get_range(&self, name: &str, offset: u64, len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        let t = Instant::now();
        let r = self.inner.get_range(name, offset, len, cancel).await;
        self.observe(Op::GetRange, t, &r);
        r
    }
    async fn head(&self, name: &str, cancel: &CancellationToken) -> Result<Option<u64>, StorageError> {
        let t = Instant::now();
        let r = self.inner.head(name, cancel).await;
        self.observe(Op::Head, t, &r);
        r
    }
    async fn list_page(&self, prefix: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        let t = Instant::now();
        let r = self.inner.list_page(prefix, token, cancel).await;
        self.observe(Op::List, t, &r);
        r
    }
    async fn list_page_after(&self, prefix: &str, after: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        let t = Instant::now();
        let r = self.inner.list_page_after(prefix, after, token, cancel).await;
        self.observe(Op::List, t, &r);
        r
    }
    async fn delete(&self, name: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        let t = Instant::now();
        let r = self.inner.delete(name, cancel).await;
        self.observe(Op::Delete, t, &r);
        r
    }
}
