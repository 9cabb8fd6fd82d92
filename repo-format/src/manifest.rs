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

/// How a backup learned which parts of a volume changed. Stored as a string; a value
/// written by a newer Mover is kept as `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ChangeSource {
    /// No parent: everything allocated was read.
    Full,
    /// Everything was read; segments equal to the parent's (by digest) reused its maps.
    ParentDigest,
    /// Extents given by the caller.
    Extents,
    /// A QEMU dirty bitmap over NBD.
    Nbd,
    /// CSI SnapshotMetadata (KEP-3314).
    Csi,
    /// KubeVirt's backup API (pull mode: map endpoint).
    Kubevirt,
    /// A KubeVirt push-mode incremental qcow2: the clusters it holds.
    Qcow2,
    Other(String),
}

impl ChangeSource {
    pub fn as_str(&self) -> &str {
        match self {
            ChangeSource::Full => "full",
            ChangeSource::ParentDigest => "parent-digest",
            ChangeSource::Extents => "extents",
            ChangeSource::Nbd => "nbd",
            ChangeSource::Csi => "csi",
            ChangeSource::Kubevirt => "kubevirt",
            ChangeSource::Qcow2 => "qcow2",
            ChangeSource::Other(s) => s,
        }
    }
}

impl From<String> for ChangeSource {
    fn from(s: String) -> Self {
        match s.as_str() {
            "full" => ChangeSource::Full,
            "parent-digest" => ChangeSource::ParentDigest,
            "extents" => ChangeSource::Extents,
            "nbd" => ChangeSource::Nbd,
            "csi" => ChangeSource::Csi,
            "kubevirt" => ChangeSource::Kubevirt,
            "qcow2" => ChangeSource::Qcow2,
            _ => ChangeSource::Other(s),
        }
    }
}

impl From<ChangeSource> for String {
    fn from(c: ChangeSource) -> Self {
        c.as_str().to_string()
    }
}

impl std::fmt::Display for ChangeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// How changes were found.
    pub change_source: ChangeSource,
    /// The change source's own base (e.g. a CSI snapshot id), for the next incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_base: Option<String>,
    /// Why the volume was read in full although a change source said what changed (the
    /// source failed, lied, or a periodic full comparison was due).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_fallback: Option<String>,
    /// Backups of this volume in a row, up to this one, that took a change source's word
    /// for what was unchanged (0: this one read everything); for the periodic full
    /// comparison.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub trusted_run: u32,
    pub stats: VolumeStats,
}

/// The smallest and largest segment sizes a manifest may record, and the largest volume.
const MIN_SEGMENT_SIZE: u32 = 4096;
const MAX_SEGMENT_SIZE: u32 = 1 << 30;
const MAX_VOLUME_BYTES: u64 = 1 << 46;

impl VolumeEntry {
    /// What every reader relies on, checked when a manifest is opened (a manifest is written
    /// by anyone holding the key): a usable name (restore names files after it), a segment
    /// size in bounds (volumes are divided by it), a bounded size and as many segment groups
    /// as the size needs.
    pub fn check(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty() || n.len() > 253 || n == "." || n == ".." || n.contains(['/', ':', '\0']) {
            return Err(format!("volume name {n:?} is not valid"));
        }
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&self.segment_size) || !self.segment_size.is_multiple_of(MIN_SEGMENT_SIZE) {
            return Err(format!("volume '{n}': segment size {} is out of bounds", self.segment_size));
        }
        if self.size > MAX_VOLUME_BYTES {
            return Err(format!("volume '{n}': size {} is larger than any volume Mover writes", self.size));
        }
        let groups = self.size.div_ceil(self.segment_size as u64).div_ceil(crate::tree::GROUP_SEGMENTS as u64);
        if self.groups.len() as u64 != groups {
            return Err(format!("volume '{n}': {} segment groups where its size needs {groups}", self.groups.len()));
        }
        Ok(())
    }
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
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
    /// What is protected: the identity `latest`, parents, retention and listing go by
    /// (e.g. `vms/web-1` on Kubernetes). Absent in manifests written before groups existed:
    /// [`Manifest::group`] derives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
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
    /// Set on a snapshot made by `mover copy`: the snapshot it is a copy of (the first
    /// one, when copies are copied again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// Where a copied snapshot came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Origin {
    /// The id of the repository the snapshot was first written to.
    pub repository: String,
    pub snapshot: SnapshotId,
    /// Where that repository was when it was copied (for people).
    pub location: String,
    /// When the copy was made.
    pub copied_unix_ms: u64,
}

impl Manifest {
    /// What this snapshot is a copy of, or itself: `(repository id, snapshot id)`. Two
    /// snapshots with the same identity hold the same volumes.
    pub fn identity(&self, repository: &str, id: &SnapshotId) -> (String, SnapshotId) {
        match &self.origin {
            Some(o) => (o.repository.clone(), o.snapshot),
            None => (repository.to_string(), *id),
        }
    }

    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>, FormatError> {
        keys.seal_json(&SNAPSHOT_MAGIC, self, "snapshot manifest")
    }

    pub fn open(keys: &Keys, bytes: &[u8]) -> Result<Self, FormatError> {
        let m: Manifest = keys.open_json(&SNAPSHOT_MAGIC, bytes, "snapshot manifest")?;
        if m.version != MANIFEST_VERSION {
            return Err(FormatError::Unsupported(format!("snapshot manifest version {}", m.version)));
        }
        for v in &m.volumes {
            v.check().map_err(|e| FormatError::Corrupt(format!("snapshot manifest: {e}")))?;
        }
        Ok(m)
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// The snapshot's group: as recorded, or for a manifest written before groups existed,
    /// [`default_group`] of its host and volume names.
    pub fn group(&self) -> String {
        match &self.group {
            Some(g) => g.clone(),
            None => default_group(&self.hostname, self.volumes.iter().map(|v| v.name.as_str())),
        }
    }
}

/// The group of a backup whose caller named none: `host/<hostname>/<volume names, sorted,
/// comma-separated>` — the disks of one machine, taken together.
pub fn default_group<'a>(hostname: &str, volumes: impl IntoIterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = volumes.into_iter().collect();
    v.sort_unstable();
    format!("host/{hostname}/{}", v.join(","))
}

/// Checks a caller-chosen group name: 1 to 253 bytes of printable ASCII without spaces
/// (Kubernetes `namespace/name` fits).
pub fn validate_group(g: &str) -> Result<(), String> {
    if g.is_empty() || g.len() > 253 {
        return Err(format!("group '{g}' must be 1 to 253 characters"));
    }
    if !g.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("group '{g}' may hold only printable ASCII without spaces"));
    }
    Ok(())
}
