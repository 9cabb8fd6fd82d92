//! Progress of one transfer: atomic counters that the pipeline stages bump and that the
//! CLI progress bar and the daemon's transfer status read.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes this transfer has to process (volume sizes).
    pub bytes_total: AtomicU64,
    /// Bytes processed: read and chunked, skipped, reused or found zero.
    pub bytes_done: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Not read: unchanged per the change source.
    pub bytes_skipped: AtomicU64,
    /// Read, and equal to the parent's segment: its map was reused.
    pub bytes_reused: AtomicU64,
    /// In chunks not stored before.
    pub bytes_new: AtomicU64,
}

impl Progress {
    pub fn add_total(&self, n: u64) {
        self.bytes_total.fetch_add(n, Relaxed);
    }
    pub fn add_done(&self, n: u64) {
        self.bytes_done.fetch_add(n, Relaxed);
    }
    pub fn add_read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Relaxed);
    }
    pub fn add_uploaded(&self, n: u64) {
        self.bytes_uploaded.fetch_add(n, Relaxed);
    }
    pub fn add_written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Relaxed);
    }
    pub fn add_skipped(&self, n: u64) {
        self.bytes_skipped.fetch_add(n, Relaxed);
    }
    pub fn add_reused(&self, n: u64) {
        self.bytes_reused.fetch_add(n, Relaxed);
    }
    pub fn add_new(&self, n: u64) {
        self.bytes_new.fetch_add(n, Relaxed);
    }
    pub fn total(&self) -> u64 {
        self.bytes_total.load(Relaxed)
    }
    pub fn done(&self) -> u64 {
        self.bytes_done.load(Relaxed)
    }
}
