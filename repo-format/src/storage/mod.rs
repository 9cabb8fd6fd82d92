//! The storage trait: where a repository's objects live.
//!
//! # Contract (every implementation)
//! - **Names** are `/`-separated relative paths built by [`crate::names`]; nothing else.
//! - **`put` is create-only.** It never replaces an object. When an object of that name
//!   exists it returns [`PutOutcome::Existed`] and leaves it untouched. Objects are named by
//!   content, so an existing name holds the same bytes; locks rely on the create-only rule
//!   for mutual exclusion.
//! - **Durability:** when `put` returns `Ok`, the object survives a crash of this process and
//!   of the machine (local: file and directory fsynced; S3: the PUT was acknowledged).
//!   A `put` that failed or was cancelled leaves either nothing or the complete object, never
//!   a partial one under the final name.
//! - **Idempotence:** `put` of the same name and bytes, `delete` and every read may be
//!   retried freely. `delete` of a missing object succeeds.
//! - **Cancellation:** every call takes a [`CancellationToken`]; a cancelled call returns
//!   an error of kind [`ErrorKind::Cancelled`] as soon as it can. Blocking filesystem calls
//!   already under way finish first.
//! - **Errors** are classified by [`ErrorKind`] so that one retry helper
//!   ([`crate::retry`]) serves every caller: only `Transient` is retried.
//!
//! The implementations (local directory, S3, the fault injector) and the conformance suite
//! every one of them passes live side by side in the `mover-backends` crate.

use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use tokio_util::sync::CancellationToken;

/// How a failed storage call should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object (or the store, for the root) does not exist.
    NotFound,
    /// May succeed if tried again: timeouts, throttling, 5xx, connection resets.
    Transient,
    /// Will fail again: bad request, corrupt response.
    Permanent,
    /// The store refuses these credentials the operation (HTTP 401/403, EACCES/EPERM):
    /// not damage, not retried.
    Denied,
    /// The caller's cancellation token fired.
    Cancelled,
}

/// A storage call that failed, naming the operation, the object and the store.
#[derive(Debug, thiserror::Error)]
#[error("{op} {object} in {location}: {message}")]
pub struct StorageError {
    pub kind: ErrorKind,
    pub op: &'static str,
    pub object: String,
    pub location: String,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StorageError {
    pub fn new(kind: ErrorKind, op: &'static str, object: &str, location: &str, message: impl Into<String>) -> Self {
        Self { kind, op, object: object.to_string(), location: location.to_string(), message: message.into(), source: None }
    }
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
    pub fn cancelled(op: &'static str, object: &str, location: &str) -> Self {
        Self::new(ErrorKind::Cancelled, op, object, location, "cancelled")
    }
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
}

/// What a create-only `put` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Existed,
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub name: String,
    pub size: u64,
}

/// One page of a listing; `next` continues it.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    pub next: Option<String>,
}

#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Where the store is, for messages: a path or `s3://bucket/prefix`.
    fn location(&self) -> &str;

    /// Whether the store is reached over a network (an object store), where latency, not
    /// a disk, bounds one request: more requests in flight pay off.
    fn is_remote(&self) -> bool {
        false
    }

    /// Create-only write; see the module docs for durability.
    async fn put(&self, name: &str, data: Bytes, cancel: &CancellationToken) -> Result<PutOutcome, StorageError>;

    /// The whole object. An object larger than `max_len` bytes is refused (kind
    /// `Permanent`, naming the object) without reading it all: sizes come from whoever
    /// writes the store and are bounded before memory is sized by them.
    async fn get(&self, name: &str, max_len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError>;

    /// `len` bytes at `offset`. Asking past the end is an error of kind `Permanent`.
    async fn get_range(&self, name: &str, offset: u64, len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError>;

    /// The object's size, or `None` when it does not exist.
    async fn head(&self, name: &str, cancel: &CancellationToken) -> Result<Option<u64>, StorageError>;

    /// Objects whose names start with `prefix`, in name order, one page at a time.
    async fn list_page(&self, prefix: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError>;

    /// [`Storage::list_page`] of only the names that sort after `after` (S3's `StartAfter`):
    /// a listing that costs what was added after a point, not everything under `prefix`.
    /// The default filters a whole listing (correct, not cheaper); real stores override it.
    async fn list_page_after(&self, prefix: &str, after: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        let mut page = self.list_page(prefix, token, cancel).await?;
        page.objects.retain(|o| o.name.as_str() > after);
        Ok(page)
    }

    /// Removes an object; a missing object is not an error.
    async fn delete(&self, name: &str, cancel: &CancellationToken) -> Result<(), StorageError>;
}

/// The most objects one listing returns before it is refused (a store that never ends a
/// listing must not exhaust memory).
pub const MAX_LISTING: usize = 50_000_000;

/// The error of an object larger than the caller allows.
pub fn too_large(op: &'static str, name: &str, location: &str, len: u64, max_len: u64) -> StorageError {
    StorageError::new(ErrorKind::Permanent, op, name, location, format!("object is {len} bytes, more than the {max_len} allowed for it"))
}

/// Every object under `prefix`, following continuation tokens. A token the store hands
/// out twice (a listing that would loop forever) or a listing longer than
/// [`MAX_LISTING`] is an error.
pub async fn list_all(storage: &dyn Storage, prefix: &str, cancel: &CancellationToken) -> Result<Vec<ObjectMeta>, StorageError> {
    list_all_after(storage, prefix, None, cancel).await
}

/// [`list_all`] of the names after `after` ([`Storage::list_page_after`]).
pub async fn list_all_after(storage: &dyn Storage, prefix: &str, after: Option<&str>, cancel: &CancellationToken) -> Result<Vec<ObjectMeta>, StorageError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    loop {
        let page = match after {
            Some(a) => storage.list_page_after(prefix, a, token, cancel).await?,
            None => storage.list_page(prefix, token, cancel).await?,
        };
        out.extend(page.objects);
        if out.len() > MAX_LISTING {
            return Err(StorageError::new(ErrorKind::Permanent, "listing", prefix, storage.location(), format!("more than {MAX_LISTING} objects")));
        }
        match page.next {
            Some(t) if !seen.insert(t.clone()) => {
                return Err(StorageError::new(
                    ErrorKind::Permanent,
                    "listing",
                    prefix,
                    storage.location(),
                    "the store repeated a continuation token (the listing would never end)",
                ))
            }
            Some(t) if t.len() > 4096 => {
                return Err(StorageError::new(ErrorKind::Permanent, "listing", prefix, storage.location(), "continuation token longer than 4096 bytes"))
            }
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hostile store's listing (a test double: what a malicious or broken server could
    /// send): every page hands out `token(n)` as the next token.
    #[derive(Debug)]
    struct Looping(fn(u64) -> Option<String>, std::sync::atomic::AtomicU64);

    #[async_trait]
    impl Storage for Looping {
        fn location(&self) -> &str {
            "hostile"
        }
        async fn put(&self, _: &str, _: Bytes, _: &CancellationToken) -> Result<PutOutcome, StorageError> {
            unreachable!()
        }
        async fn get(&self, _: &str, _: u64, _: &CancellationToken) -> Result<Bytes, StorageError> {
            unreachable!()
        }
        async fn get_range(&self, _: &str, _: u64, _: u64, _: &CancellationToken) -> Result<Bytes, StorageError> {
            unreachable!()
        }
        async fn head(&self, _: &str, _: &CancellationToken) -> Result<Option<u64>, StorageError> {
            unreachable!()
        }
        async fn list_page(&self, prefix: &str, _: Option<String>, _: &CancellationToken) -> Result<ListPage, StorageError> {
            let n = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(ListPage { objects: vec![ObjectMeta { name: format!("{prefix}{n}"), size: 1 }], next: (self.0)(n) })
        }
        async fn delete(&self, _: &str, _: &CancellationToken) -> Result<(), StorageError> {
            unreachable!()
        }
    }

    #[tokio::test]
    async fn a_listing_that_would_never_end_is_refused() {
        let c = CancellationToken::new();
        // The same token again and again.
        let s = Looping(|_| Some("again".into()), Default::default());
        let e = list_all(&s, "index/", &c).await.unwrap_err();
        assert!(e.to_string().contains("repeated a continuation token"), "{e}");
        assert_eq!(s.1.load(std::sync::atomic::Ordering::Relaxed), 2, "refused at the first repeat");
        // A token too long to be real.
        let s = Looping(|_| Some("x".repeat(5000)), Default::default());
        let e = list_all(&s, "index/", &c).await.unwrap_err();
        assert!(e.to_string().contains("longer than 4096"), "{e}");
        // A well-behaved listing of three pages ends.
        let s = Looping(|n| (n < 2).then(|| format!("t{n}")), Default::default());
        assert_eq!(list_all(&s, "index/", &c).await.unwrap().len(), 3);
    }
}
