//! Snapshot manifests (`snapshots/<id>`): `magic[8] || sealed(JSON)`. Written last, after
//! every pack and index segment they need is durable. JSON because manifests are small
//! (a volume's segment data lives in tree blobs) and worth reading by eye after `open`.

use crate::crypto::Keys;
use crate::error::FormatError;
use crate::file_formats::SNAPSHOT_MAGIC;
use crate::id::{ChunkId, SnapshotId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MANIFEST_VERSION: u32 = 1;

/// Counters of one volume's backup (and, summed, of a snapshot).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeStats {
    /// The volume's size.
    pub bytes_total: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes found to be zeros (read or known unallocated), stored as holes.
    pub bytes_zero: u64,
    /// Bytes not read because the change source said they were unchanged.
    pub bytes_skipped: u64,
    /// Bytes whose segment map was taken from the parent.
    pub bytes_reused_parent: u64,
    /// Bytes in chunks that were not in the repository before.
    pub bytes_new: u64,
    /// Bytes those new chunks take in the store (compressed, encrypted).
    pub bytes_stored: u64,
    pub chunks_new: u64,
    pub chunks_dedup: u64,
    /// Bytes in chunks that were already stored (or stored earlier in this backup).
    #[serde(default)]
    pub bytes_dedup: u64,
}

impl VolumeStats {
    pub fn add(&mut self, o: &VolumeStats) {
        self.bytes_total += o.bytes_total;
        self.bytes_read += o.bytes_read;
        self.bytes_zero += o.bytes_zero;
        self.bytes_skipped += o.bytes_skipped;
        self.bytes_reused_parent += o.bytes_reused_parent;
        self.bytes_new += o.bytes_new;
        self.bytes_stored += o.bytes_stored;
        self.chunks_new += o.chunks_new;
        self.chunks_dedup += o.chunks_dedup;
        self.bytes_dedup += o.bytes_dedup;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeEntry {
    pub name: String,
    pub size: u64,
    pub segment_size: u32,
    /// Segment group blobs, in order.
    pub groups: Vec<ChunkId>,
    /// What the volume was read from (a path, an NBD URI), for people.
    pub source: String,
    /// How changes were found: `full`, `parent-digest`, `extents`, `csi`, `nbd`.
    pub change_source: String,
    /// The change source's own base (e.g. a CSI snapshot id), for the next incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_base: Option<String>,
    pub stats: VolumeStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetadataEntry {
    pub name: String,
    pub blob: ChunkId,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub time_unix_ms: u64,
    pub hostname: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub parent: Option<SnapshotId>,
    pub volumes: Vec<VolumeEntry>,
    #[serde(default)]
    pub metadata: Vec<MetadataEntry>,
    pub stats: VolumeStats,
    pub duration_ms: u64,
}

impl Manifest {
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>, FormatError> {
        keys.seal_json(&SNAPSHOT_MAGIC, self, "snapshot manifest")
    }

    pub fn open(keys: &Keys, bytes: &[u8]) -> Result<Self, FormatError> {
        let m: Manifest = keys.open_json(&SNAPSHOT_MAGIC, bytes, "snapshot manifest")?;
        if m.version != MANIFEST_VERSION {
            return Err(FormatError::Unsupported(format!("snapshot manifest version {}", m.version)));
        }
        Ok(m)
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.name == name)
    }
}
