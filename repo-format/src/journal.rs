//! The journal: a tamper-evident record of which snapshots were added and forgotten
//! (`docs/immutability.md`, "Tamper evidence"). Entries are `journal/<seq>` objects,
//! sealed with the repository's key (only a holder of the key can write one that opens),
//! each naming the BLAKE3 hash of the entry before it; a writer takes the next number with a
//! create-only write, so concurrent writers form one chain. A snapshot deleted behind
//! Mover's back is then one the journal says was added and no entry says was forgotten;
//! an entry deleted leaves a gap or breaks a link; entries deleted at the end are found
//! against the head a node remembers from its last check.

use crate::id::SnapshotId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub seq: u64,
    /// BLAKE3 of the previous entry's stored bytes, hex; empty for the first entry.
    pub prev: String,
    pub time_unix_ms: u64,
    pub hostname: String,
    pub event: JournalEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JournalEvent {
    /// A snapshot was written (after its manifest: an entry never names a snapshot that
    /// was not written).
    Added { snapshot: SnapshotId, group: String },
    /// Snapshots are being forgotten (before their manifests are deleted); at most
    /// [`FORGOTTEN_PER_ENTRY`] in one entry (an entry is at most 1 MiB to a reader).
    Forgotten { snapshots: Vec<SnapshotId> },
}

/// The most snapshots one `forgotten` entry names (~66 bytes each).
pub const FORGOTTEN_PER_ENTRY: usize = 10_000;

/// The hash a next entry names.
pub fn link(stored: &[u8]) -> String {
    blake3::hash(stored).to_hex().to_string()
}

/// The last entry a node verified (kept in its cache beside the manifests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    /// [`link`] of that entry's stored bytes.
    pub hash: String,
}
