//! The one place that builds object names. Everything else asks here.
//!
//! Layout: `config`, `keys/<id>`, `packs/<first 2 hex>/<id>`, `index/<id>`,
//! `snapshots/<id>`, `locks/<lock id>-<refreshed ms>`, `gc/<record id>.entries|.ready`,
//! `gc/generation-<counter>-<8 hex>`,
//! `reports/<created ms>-<kind>-<8 hex>`, `quarantine/<created ms>-<8 hex>`,
//! `protected/<snapshot id>`, `journal/<seq, 20 digits>`, `probe/…`.

use crate::id::{IndexId, KeyId, PackId, SnapshotId};

pub const CONFIG: &str = "config";
pub const KEYS_PREFIX: &str = "keys/";
pub const PACKS_PREFIX: &str = "packs/";
pub const INDEX_PREFIX: &str = "index/";
pub const SNAPSHOTS_PREFIX: &str = "snapshots/";
pub const LOCKS_PREFIX: &str = "locks/";
pub const GC_PREFIX: &str = "gc/";
pub const REPORTS_PREFIX: &str = "reports/";
pub const QUARANTINE_PREFIX: &str = "quarantine/";
pub const PROTECTED_PREFIX: &str = "protected/";
pub const JOURNAL_PREFIX: &str = "journal/";

/// Entry `seq` of the journal (`docs/immutability.md`, "Tamper evidence").
pub fn journal(seq: u64) -> String {
    format!("{JOURNAL_PREFIX}{seq:020}")
}

/// The sequence number of a journal entry's name.
pub fn parse_journal(name: &str) -> Option<u64> {
    let s = name.strip_prefix(JOURNAL_PREFIX)?;
    (s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

pub fn key(id: &KeyId) -> String {
    format!("{KEYS_PREFIX}{id}")
}
pub fn pack(id: &PackId) -> String {
    let hex = id.to_hex();
    format!("{PACKS_PREFIX}{}/{hex}", &hex[..2])
}
pub fn index(id: &IndexId) -> String {
    format!("{INDEX_PREFIX}{id}")
}
pub fn snapshot(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS_PREFIX}{id}")
}
/// A gc generation marker: `gc/generation-<counter, 20 digits>-<8 hex>` (names sort by
/// counter; the random part tells a marker written again under a reused counter apart).
pub fn generation(counter: u64, rand: u32) -> String {
    format!("{GC_PREFIX}generation-{counter:020}-{rand:08x}")
}

/// The counter of a generation marker's name.
pub fn parse_generation(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(GC_PREFIX)?.strip_prefix("generation-")?;
    let (n, r) = rest.split_once('-')?;
    (n.len() == 20 && r.len() == 8 && r.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
    n.parse().ok()
}

/// A snapshot's protection: `protected/<snapshot id>`.
pub fn protection(id: &SnapshotId) -> String {
    format!("{PROTECTED_PREFIX}{id}")
}

pub fn lock(name: &str) -> String {
    format!("{LOCKS_PREFIX}{name}")
}

/// A verify or drill result: `reports/<created ms, 13 digits>-<kind>-<8 hex>` (names sort
/// by time).
pub fn report(created_ms: u64, kind: &str, rand: u32) -> String {
    format!("{REPORTS_PREFIX}{created_ms:013}-{kind}-{rand:08x}")
}

/// `(created ms, kind)` of a report object's name.
pub fn parse_report(name: &str) -> Option<(u64, String)> {
    let base = name.strip_prefix(REPORTS_PREFIX)?;
    let mut it = base.splitn(3, '-');
    let ms = it.next()?.parse().ok()?;
    let kind = it.next()?;
    let rand = it.next()?;
    (rand.len() == 8 && !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase())).then(|| (ms, kind.to_string()))
}

/// A quarantine record: `quarantine/<created ms, 13 digits>-<8 hex>`.
pub fn quarantine(created_ms: u64, rand: u32) -> String {
    format!("{QUARANTINE_PREFIX}{created_ms:013}-{rand:08x}")
}

/// A GC pending-deletion record: the index entries it took out of the index.
pub fn gc_entries(record: &str) -> String {
    format!("{GC_PREFIX}{record}.entries")
}
/// A GC record's completion marker: the locks that were live when it took effect.
pub fn gc_ready(record: &str) -> String {
    format!("{GC_PREFIX}{record}.ready")
}

/// Where probes write (`mover_backends::verify_create_only`, `Repository::
/// require_deletes`); nothing else reads this prefix, and a probe left behind (a killed
/// process, credentials that may not delete) is harmless: gc removes those older than
/// [`PROBE_MAX_AGE_MS`].
pub const PROBE_PREFIX: &str = "probe/";

/// A probe object: `probe/create-only-<stamp>` ([`probe_stamp`]: its time comes first).
pub fn probe(id: &str) -> String {
    format!("{PROBE_PREFIX}create-only-{id}")
}

/// A probe's unique part: its time (ms, 13 digits) and 8 random bytes.
pub fn probe_stamp() -> String {
    format!("{:013}-{}", crate::now_unix_ms(), hex::encode(rand::random::<[u8; 8]>()))
}

/// The time in a probe's name (names of older Movers have none).
pub fn probe_time_ms(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(PROBE_PREFIX)?.strip_prefix("create-only-")?;
    let rest = rest.strip_prefix("deletes-").unwrap_or(rest);
    let (ms, _) = rest.split_once('-')?;
    (ms.len() == 13).then(|| ms.parse().ok()).flatten()
}

/// How old a probe must be before gc removes it (no probe takes an hour).
pub const PROBE_MAX_AGE_MS: u64 = 3_600_000;

/// The largest object of each kind a reader accepts: a store that serves more is refused
/// before memory is sized by it. Packs are bounded by the largest pack size `init` allows
/// (256 MiB) plus a full chunk beyond it and the trailer; gc records carry every entry gc
/// took out (77 bytes each) and the manifests forget parked.
pub fn max_len(name: &str) -> u64 {
    if name == CONFIG || name.starts_with(KEYS_PREFIX) || name.starts_with(LOCKS_PREFIX) || name.starts_with(JOURNAL_PREFIX) {
        1 << 20
    } else if name.starts_with(REPORTS_PREFIX) || name.starts_with(QUARANTINE_PREFIX) || name.starts_with(PROTECTED_PREFIX) {
        4 << 20
    } else if name.starts_with(SNAPSHOTS_PREFIX) {
        64 << 20
    } else if name.starts_with(INDEX_PREFIX) {
        256 << 20
    } else if name.starts_with(PACKS_PREFIX) {
        320 << 20
    } else if name.starts_with(GC_PREFIX) {
        2 << 30
    } else {
        64 << 20
    }
}

/// The id part of an object name (`packs/ab/abcd…` → `abcd…`), parsed as `T`.
pub fn parse_id<T: std::str::FromStr>(name: &str) -> Option<T> {
    name.rsplit('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn pack_names_are_sharded_and_parse_back() {
        let id = PackId([0x3f; 32]);
        let n = pack(&id);
        assert!(n.starts_with("packs/3f/3f3f"));
        assert_eq!(parse_id::<PackId>(&n), Some(id));
    }

    #[test]
    fn generation_markers_sort_by_counter_and_parse_back() {
        let a = generation(9, 0xdead_beef);
        let b = generation(10, 1);
        assert!(a < b);
        assert_eq!(parse_generation(&a), Some(9));
        assert_eq!(parse_generation("gc/0001700000000000-abcd0123.entries"), None);
    }
}
