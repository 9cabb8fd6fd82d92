//! Lock objects: who is working on a repository, so that `gc` knows which backups may
//! still reference what it takes out of the index (the protocol is in `docs/gc.md`).
//!
//! A lock is a lease. Its object is `locks/<lock id>-<refreshed ms>`: `LOCK_MAGIC ||
//! sealed(JSON LockInfo)`. The holder refreshes it by writing the same lock under a newer
//! time and deleting the older object (the store is create-only), so a listing shows each
//! lock's latest refresh in its name. A lock whose `refreshed_ms + ttl_s` has passed has
//! expired: its holder has stopped refreshing and must not commit anything.

use crate::crypto::Keys;
use crate::error::FormatError;
use crate::file_formats::LOCK_MAGIC;
use crate::names;
use serde::{Deserialize, Serialize};

/// What a lock holder does. GC waits for every live lock but its own before it deletes
/// what the holder may still use: backups (they may reference it) and readers (restores,
/// exports, `check`: they may still read it); `gc` locks exclude each other. Stored as a
/// string (`backup`, `read`, `gc`); a kind written by a newer Mover is kept as `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum LockKind {
    Backup,
    Read,
    Gc,
    Other(String),
}

impl LockKind {
    pub fn as_str(&self) -> &str {
        match self {
            LockKind::Backup => "backup",
            LockKind::Read => "read",
            LockKind::Gc => "gc",
            LockKind::Other(s) => s,
        }
    }
}

impl From<String> for LockKind {
    fn from(s: String) -> Self {
        match s.as_str() {
            "backup" => LockKind::Backup,
            "read" => LockKind::Read,
            "gc" => LockKind::Gc,
            _ => LockKind::Other(s),
        }
    }
}

impl From<LockKind> for String {
    fn from(k: LockKind) -> Self {
        k.as_str().to_string()
    }
}

impl std::fmt::Display for LockKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    /// 16 hex digits, random; the same across refreshes.
    pub id: String,
    pub kind: LockKind,
    pub hostname: String,
    /// The holder's boot of its machine and PID namespace: `pid` means something only
    /// where both are the same (empty in locks of older versions: then nothing is known).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pid_ns: String,
    pub pid: u32,
    pub created_ms: u64,
    pub refreshed_ms: u64,
    /// The lease: valid until `refreshed_ms + ttl_s * 1000`.
    pub ttl_s: u64,
}

impl LockInfo {
    pub fn new(kind: LockKind, ttl_s: u64) -> Self {
        let now = crate::now_unix_ms();
        Self {
            id: hex::encode(rand::random::<[u8; 8]>()),
            kind,
            hostname: crate::hostname(),
            boot_id: crate::boot_id(),
            pid_ns: crate::pid_namespace(),
            pid: std::process::id(),
            created_ms: now,
            refreshed_ms: now,
            ttl_s,
        }
    }

    /// Whether this lock's `pid` names a process of this machine's current boot, in the
    /// caller's PID namespace: only then can "its process is gone" be known.
    pub fn same_process_space(&self) -> bool {
        !self.boot_id.is_empty()
            && !self.pid_ns.is_empty()
            && self.hostname == crate::hostname()
            && self.boot_id == crate::boot_id()
            && self.pid_ns == crate::pid_namespace()
    }

    /// The object holding this lock as of its last refresh.
    pub fn object_name(&self) -> String {
        names::lock(&format!("{}-{}", self.id, self.refreshed_ms))
    }

    pub fn expires_ms(&self) -> u64 {
        self.refreshed_ms.saturating_add(self.ttl_s.saturating_mul(1000))
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms > self.expires_ms()
    }

    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>, FormatError> {
        keys.seal_json(&LOCK_MAGIC, self, "lock")
    }

    pub fn open(keys: &Keys, bytes: &[u8]) -> Result<Self, FormatError> {
        keys.open_json(&LOCK_MAGIC, bytes, "lock")
    }
}

/// `(lock id, refreshed ms)` from an object name `locks/<id>-<ms>`.
pub fn parse_name(name: &str) -> Option<(String, u64)> {
    let base = name.strip_prefix(names::LOCKS_PREFIX)?;
    let (id, ms) = base.rsplit_once('-')?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((id.to_string(), ms.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    #[test]
    fn lock_round_trips_and_names_parse() {
        let keys = Keys::derive(&MasterKey::generate());
        let l = LockInfo::new(LockKind::Backup, 60);
        let b = l.seal(&keys).unwrap();
        assert_eq!(LockInfo::open(&keys, &b).unwrap(), l);
        assert_eq!(parse_name(&l.object_name()), Some((l.id.clone(), l.refreshed_ms)));
        assert!(!l.expired(l.refreshed_ms + 60_000));
        assert!(l.expired(l.refreshed_ms + 60_001));
        let other = Keys::derive(&MasterKey::generate());
        assert!(LockInfo::open(&other, &b).is_err());
        assert_eq!(parse_name("locks/nothex-12"), None);
    }
}
