//! A fault-injecting wrapper for tests: fails the first N calls, and/or a fraction of
//! calls, with transient errors, deterministically from a seed; holds writes of chosen
//! objects back (a slow or stalled store); reports chosen writes as failed after they
//! landed (a reply lost on the way back); or ignores create-only (a store that silently
//! overwrites). It is a test double for an unreliable network or a non-conforming store,
//! named as such; the stores it wraps are real.

use async_trait::async_trait;
use bytes::Bytes;
use mover_format::storage::{ErrorKind, ListPage, PutOutcome, Storage, StorageError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    fail_first: AtomicU64,
    /// Fails a call when a hash of (seed, call number) falls below this share of u64::MAX.
    fail_per_million: u64,
    seed: u64,
    calls: AtomicU64,
    injected: AtomicU64,
    /// Puts of names with one of these prefixes wait this long before reaching the store;
    /// a put dropped while it waits never happens.
    delays: Mutex<Vec<(String, Duration)>>,
    /// Puts of names with one of these prefixes land, then fail (that many times).
    lost_replies: Mutex<Vec<(String, u64)>>,
    /// Puts overwrite an existing object and report it created.
    overwrite: AtomicBool,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn Storage>, fail_first: u64, fail_fraction: f64, seed: u64) -> Self {
        Self {
            inner,
            fail_first: AtomicU64::new(fail_first),
            fail_per_million: (fail_fraction.clamp(0.0, 1.0) * 1e6) as u64,
            seed,
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            delays: Mutex::new(Vec::new()),
            lost_replies: Mutex::new(Vec::new()),
            overwrite: AtomicBool::new(false),
        }
    }

    /// From now on, puts of objects whose names start with `prefix` wait `delay` first.
    pub fn delay_puts(&self, prefix: &str, delay: Duration) {
        if let Ok(mut d) = self.delays.lock() {
            d.push((prefix.to_string(), delay));
        }
    }

    /// No more delays.
    pub fn clear_delays(&self) {
        if let Ok(mut d) = self.delays.lock() {
            d.clear();
        }
    }

    /// The next `times` puts of objects whose names start with `prefix` land in the store
    /// and are then reported as failed (transient).
    pub fn lose_put_replies(&self, prefix: &str, times: u64) {
        if let Ok(mut l) = self.lost_replies.lock() {
            l.push((prefix.to_string(), times));
        }
    }

    /// Makes every put overwrite what exists and report it created (a store that ignores
    /// create-only writes).
    pub fn ignore_create_only(&self) {
        self.overwrite.store(true, Ordering::Relaxed);
    }

    fn delay_for(&self, name: &str) -> Option<Duration> {
        self.delays.lock().ok()?.iter().filter(|(p, _)| name.starts_with(p.as_str())).map(|(_, d)| *d).max()
    }

    fn lose_reply(&self, name: &str) -> bool {
        let Ok(mut l) = self.lost_replies.lock() else { return false };
        match l.iter_mut().find(|(p, n)| name.starts_with(p.as_str()) && *n > 0) {
            Some((_, n)) => {
                *n -= 1;
                true
            }
            None => false,
        }
    }

    /// How many failures were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn maybe_fail(&self, op: &'static str, name: &str) -> Result<(), StorageError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let first = self.fail_first.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1)).is_ok();
        let h = u64::from_le_bytes(blake3::hash(&[self.seed.to_le_bytes(), n.to_le_bytes()].concat()).as_bytes()[..8].try_into().unwrap_or([0; 8]));
        if first || h % 1_000_000 < self.fail_per_million {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StorageError::new(ErrorKind::Transient, op, name, self.inner.location(), "injected fault (test)"));
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for FaultyStorage {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
    async fn put(&self, name: &str, data: Bytes, cancel: &CancellationToken) -> Result<PutOutcome, StorageError> {
        self.maybe_fail("writing", name)?;
        if let Some(d) = self.delay_for(name) {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = cancel.cancelled() => return Err(StorageError::cancelled("writing", name, self.inner.location())),
            }
        }
        if self.overwrite.load(Ordering::Relaxed) {
            self.inner.delete(name, cancel).await?;
        }
        let out = self.inner.put(name, data, cancel).await?;
        if self.lose_reply(name) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StorageError::new(ErrorKind::Transient, "writing", name, self.inner.location(), "injected fault after the write landed (test)"));
        }
        Ok(out)
    }
    async fn get(&self, name: &str, max_len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        self.maybe_fail("reading", name)?;
        self.inner.get(name, max_len, cancel).await
    }
    async fn get_range(&self, name: &str, offset: u64, len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        self.maybe_fail("reading", name)?;
        self.inner.get_range(name, offset, len, cancel).await
    }
    async fn head(&self, name: &str, cancel: &CancellationToken) -> Result<Option<u64>, StorageError> {
        self.maybe_fail("inspecting", name)?;
        self.inner.head(name, cancel).await
    }
    async fn list_page(&self, prefix: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        self.maybe_fail("listing", prefix)?;
        self.inner.list_page(prefix, token, cancel).await
    }
    async fn list_page_after(&self, prefix: &str, after: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        self.maybe_fail("listing", prefix)?;
        self.inner.list_page_after(prefix, after, token, cancel).await
    }
    async fn delete(&self, name: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        self.maybe_fail("deleting", name)?;
        self.inner.delete(name, cancel).await
    }
}
