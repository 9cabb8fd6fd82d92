//! The one walk from a manifest to everything it references: metadata blobs, each volume's
//! segment groups, their segment maps, and the chunks those list. `gc` marks with it,
//! `check` verifies with it, `stats` counts with it; each supplies how tree blobs are read
//! ([`Trees`]) and what to do at each node ([`Visitor`]).

use crate::error::{Error, Result};
use mover_format::manifest::{Manifest, VolumeEntry};
use mover_format::tree::{MapEntry, SegmentGroup, SegmentMap, SegmentRef};
use mover_format::{ChunkId, SnapshotId};

/// Reads tree blobs for a walk.
#[async_trait::async_trait]
pub trait Trees: Send {
    /// The tree blob `id` (`what` names it for messages). `Ok(None)` when it cannot be read
    /// and the walker should skip it (the implementation recorded the problem).
    async fn blob(&mut self, id: &ChunkId, what: &str) -> Result<Option<Vec<u8>>>;
    /// A tree blob that does not decode: `Ok(())` to skip it (after recording), or an error
    /// to stop the walk. Stops by default.
    fn undecodable(&mut self, err: Error) -> Result<()> {
        Err(err)
    }
}

/// What a walk does at each node. Returning `false` from `group` or `map` skips what is
/// below it (already seen).
pub trait Visitor: Send {
    fn metadata(&mut self, _name: &str, _blob: &ChunkId) {}
    fn group(&mut self, _id: &ChunkId) -> bool {
        true
    }
    /// A segment map at byte `offset` of the volume.
    fn map(&mut self, _id: &ChunkId, _offset: u64) -> bool {
        true
    }
    /// A chunk or a slice of one (`entry`) at byte `offset` of the volume, listed by the
    /// segment map of the segment at `segment_offset`.
    fn chunk(&mut self, _entry: &MapEntry, _offset: u64, _segment_offset: u64) {}
}

/// What a volume's walk found about its shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct VolumeShape {
    /// Segments listed by the groups that could be read.
    pub segments: u64,
    /// Every group could be read and decoded.
    pub complete: bool,
}

impl VolumeShape {
    /// The segment count the volume's size needs, when the walk saw every group and it
    /// differs: a problem to report.
    pub fn mismatch(&self, vol: &VolumeEntry) -> Option<u64> {
        let want = vol.size.div_ceil(vol.segment_size as u64);
        (self.complete && self.segments != want).then_some(want)
    }
}

/// Walks every volume and metadata blob of a snapshot.
pub async fn snapshot(trees: &mut dyn Trees, v: &mut dyn Visitor, sid: &SnapshotId, m: &Manifest) -> Result<Vec<VolumeShape>> {
    for md in &m.metadata {
        v.metadata(&md.name, &md.blob);
    }
    let mut out = Vec::new();
    for vol in &m.volumes {
        out.push(volume(trees, v, sid, vol).await?);
    }
    Ok(out)
}

/// Walks one volume: groups, then maps, then chunks.
pub async fn volume(trees: &mut dyn Trees, v: &mut dyn Visitor, sid: &SnapshotId, vol: &VolumeEntry) -> Result<VolumeShape> {
    let mut shape = VolumeShape { segments: 0, complete: true };
    for g in &vol.groups {
        if !v.group(g) {
            continue;
        }
        let what = format!("snapshot {sid} volume '{}' segment group {g}", vol.name);
        let Some(bytes) = trees.blob(g, &what).await? else {
            shape.complete = false;
            continue;
        };
        let group = match SegmentGroup::decode(&bytes) {
            Ok(gr) => gr,
            Err(e) => {
                trees.undecodable(Error::from(e).context(&what))?;
                shape.complete = false;
                continue;
            }
        };
        for (i, r) in group.segments.iter().enumerate() {
            let SegmentRef::Map { map, .. } = r else { continue };
            let off = (group.first_segment + i as u64) * vol.segment_size as u64;
            if !v.map(map, off) {
                continue;
            }
            let what = format!("snapshot {sid} volume '{}' segment map {map} at offset {off}", vol.name);
            let Some(bytes) = trees.blob(map, &what).await? else { continue };
            let sm = match SegmentMap::decode(&bytes) {
                Ok(sm) => sm,
                Err(e) => {
                    trees.undecodable(Error::from(e).context(&what))?;
                    continue;
                }
            };
            let mut pos = off;
            for e in &sm.entries {
                if e.chunk().is_some() {
                    v.chunk(e, pos, off);
                }
                pos += e.len() as u64;
            }
        }
        shape.segments += group.segments.len() as u64;
    }
    Ok(shape)
}
