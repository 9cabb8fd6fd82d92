//! Copying snapshots to another repository (a second site): each snapshot is read from the
//! source repository like an export reads it (fetched, decrypted, verified) and backed up
//! into the target through the backup pipeline — so it is re-chunked with the target's
//! chunker, re-keyed with its chunk-id key and re-encrypted with its keys, deduplicated
//! against everything the target holds, and committed under a backup lease there (gc on the
//! target is safe beside it, and a copy killed half way resumes: what was uploaded and
//! indexed is found again and not sent twice).
//!
//! A copy keeps the original's group, time, host, tags, metadata, and each volume's source,
//! change source and change base; its manifest records the original in `origin`. Copies are
//! recognised by that identity, so a copy run skips what the target already has (and a copy
//! copied back is recognised as the original). When the target holds a copy of the
//! snapshot's parent, only the segments that differ between the two in the source are read:
//! an incremental copies as an incremental.

use super::backup::{backup, BackupJob, BackupSummary, CopyOf, ParentChoice, Tuning, VolumeInput};
use crate::error::{Error, Result, ResultExt};
use crate::export::{ImageOptions, VolumeImage};
use crate::lock::{self, Hold};
use crate::progress::Progress;
use crate::source::{BlockRead, Changes, Opened, ParentVolume, Reader, VolumeSource};
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::{ChangeSource, Manifest, Origin};
use mover_format::{Repository, SnapshotId};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Which snapshots of the source to copy.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These snapshots (and nothing else).
    Ids(Vec<SnapshotId>),
    /// Every snapshot of these groups; an empty list: of every group.
    Groups(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct CopyRequest {
    pub selection: Selection,
    /// Only snapshots newer than the newest one the target has of their group.
    pub newer_only: bool,
    pub tuning: Tuning,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CopiedSnapshot {
    pub source_id: SnapshotId,
    pub target_id: SnapshotId,
    pub group: String,
    /// The target's copy of the source's parent, when there is one: only what changed
    /// since it was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incremental_to: Option<SnapshotId>,
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_uploaded: u64,
    pub packs_uploaded: u64,
    pub duration_s: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AlreadyThere {
    pub source_id: SnapshotId,
    pub target_id: SnapshotId,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CopySummary {
    pub source: String,
    pub target: String,
    pub copied: Vec<CopiedSnapshot>,
    /// Selected snapshots the target already holds (as a copy, or as the original).
    pub already_there: Vec<AlreadyThere>,
    pub bytes_read: u64,
    pub bytes_uploaded: u64,
    pub duration_s: f64,
}

/// Copies the selected snapshots from `src` to `dst`, oldest first (so that parents are
/// there before their children). Holds a read lease on the source throughout; each
/// snapshot is committed under a backup lease on the target.
pub(crate) async fn copy(
    src: &Repository,
    src_index: Arc<dyn ChunkIndex>,
    dst: &Repository,
    dst_index: Arc<dyn ChunkIndex>,
    req: CopyRequest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<CopySummary> {
    if src.config().id == dst.config().id {
        return Err(Error::invalid(format!("{} and {} are the same repository (id {}): nothing to copy", src.location(), dst.location(), src.config().id)));
    }
    lock::scope(src, Hold::Read, cancel, |held| async move {
        let view = held.view(src_index, cancel).await.context("syncing the source's local index")?;
        let r = run(src, view, dst, dst_index, req, progress, cancel).await;
        crate::index::quarantine::note_seen(src, "copy").await;
        r
    })
    .await
}

async fn run(
    src: &Repository,
    tree: crate::lock::ReadView,
    dst: &Repository,
    dst_index: Arc<dyn ChunkIndex>,
    req: CopyRequest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<CopySummary> {
    let started = Instant::now();
    let src_id = src.config().id.to_string();
    let dst_id = dst.config().id.to_string();
    let (sources, targets) =
        tokio::try_join!(async { src.snapshots(cancel).await.with_context(|| format!("listing the snapshots of {}", src.location())) }, async {
            dst.snapshots(cancel).await.with_context(|| format!("listing the snapshots of {}", dst.location()))
        },)?;
    let selected = select(&sources, &targets, &req)?;
    // What the target holds, by identity (the original each snapshot is, or is a copy of).
    let mut held: HashMap<(String, SnapshotId), SnapshotId> = targets.iter().map(|(id, m)| (m.identity(&dst_id, id), *id)).collect();
    let by_id: HashMap<SnapshotId, &Manifest> = sources.iter().map(|(id, m)| (*id, m)).collect();

    let mut out = CopySummary {
        source: src.location().to_string(),
        target: dst.location().to_string(),
        copied: Vec::new(),
        already_there: Vec::new(),
        bytes_read: 0,
        bytes_uploaded: 0,
        duration_s: 0.0,
    };
    for (sid, m) in selected {
        let ident = m.identity(&src_id, &sid);
        if let Some(t) = held.get(&ident) {
            out.already_there.push(AlreadyThere { source_id: sid, target_id: *t });
            continue;
        }
        if ident.0 == dst_id {
            // A copy of one of the target's own snapshots that the target has since forgotten:
            // copying it back would resurrect what retention removed.
            tracing::info!("snapshot {sid} is a copy of snapshot {} of the target, which no longer has it: not copied back", ident.1);
            continue;
        }
        // The target's copy of the parent: then only the segments that differ are read.
        let parent = m.parent.and_then(|p| by_id.get(&p).map(|pm| (p, *pm))).and_then(|(p, pm)| held.get(&pm.identity(&src_id, &p)).map(|t| (p, pm, *t)));
        let t0 = Instant::now();
        let s = copy_one(src, &tree, dst, dst_index.clone(), sid, m, parent, &req.tuning, &progress, cancel)
            .await
            .with_context(|| format!("copying snapshot {sid} (group {}) from {} to {}", m.group(), src.location(), dst.location()))?;
        held.insert(ident, s.snapshot_id);
        out.bytes_read += s.stats.bytes_read;
        out.bytes_uploaded += s.bytes_uploaded;
        out.copied.push(CopiedSnapshot {
            source_id: sid,
            target_id: s.snapshot_id,
            group: s.group.clone(),
            incremental_to: parent.map(|p| p.2),
            bytes_total: s.stats.bytes_total,
            bytes_read: s.stats.bytes_read,
            bytes_new: s.stats.bytes_new,
            bytes_uploaded: s.bytes_uploaded,
            packs_uploaded: s.packs_uploaded,
            duration_s: t0.elapsed().as_secs_f64(),
        });
    }
    out.duration_s = started.elapsed().as_secs_f64();
    Ok(out)
}

/// The snapshots a request selects, oldest first.
fn select<'a>(sources: &'a [(SnapshotId, Manifest)], targets: &[(SnapshotId, Manifest)], req: &CopyRequest) -> Result<Vec<(SnapshotId, &'a Manifest)>> {
    let mut picked: Vec<(SnapshotId, &Manifest)> = match &req.selection {
        Selection::Ids(ids) => {
            let mut v = Vec::new();
            for id in ids {
                let (_, m) = sources.iter().find(|(s, _)| s == id).ok_or_else(|| Error::not_found(format!("snapshot {id} is not in the source repository")))?;
                v.push((*id, m));
            }
            v
        }
        Selection::Groups(groups) => {
            let known: BTreeSet<String> = sources.iter().map(|(_, m)| m.group()).collect();
            if let Some(g) = groups.iter().find(|g| !known.contains(*g)) {
                return Err(Error::not_found(format!("group '{g}' has no snapshots in the source repository")));
            }
            sources.iter().filter(|(_, m)| groups.is_empty() || groups.contains(&m.group())).map(|(id, m)| (*id, m)).collect()
        }
    };
    if req.newer_only {
        let mut newest: HashMap<String, u64> = HashMap::new();
        for (_, m) in targets {
            let e = newest.entry(m.group()).or_default();
            *e = (*e).max(m.time_unix_ms);
        }
        picked.retain(|(_, m)| newest.get(&m.group()).is_none_or(|t| m.time_unix_ms > *t));
    }
    picked.sort_by_key(|(id, m)| (m.time_unix_ms, *id));
    picked.dedup_by_key(|(id, _)| *id);
    Ok(picked)
}

async fn copy_one(
    src: &Repository,
    tree: &crate::lock::ReadView,
    dst: &Repository,
    dst_index: Arc<dyn ChunkIndex>,
    sid: SnapshotId,
    m: &Manifest,
    parent: Option<(SnapshotId, &Manifest, SnapshotId)>,
    tuning: &Tuning,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<BackupSummary> {
    // Few decoded segments: the pipeline reads each segment once, in order.
    let opts = ImageOptions { cache_segments: 2, read_ahead: 2, window: None };
    let mut volumes = Vec::new();
    for v in &m.volumes {
        let image = VolumeImage::open(src, tree, sid, v.clone(), opts, cancel).await?;
        // Segments that differ from the parent's copy of the volume, when the target has it.
        let mut changed = None;
        if let Some((pid, pm, _)) = parent {
            if let Some(pv) = pm.volume(&v.name).filter(|pv| pv.size == v.size && pv.segment_size == v.segment_size) {
                let prefs = crate::snapshots::load_refs(src, &**tree.index(), &pid, pv, cancel).await?;
                let seg = v.segment_size as u64;
                let mut ext: Vec<(u64, u64)> = Vec::new();
                for (i, (a, b)) in image.refs().iter().zip(prefs.iter()).enumerate() {
                    if a == b {
                        continue;
                    }
                    let (o, l) = (i as u64 * seg, seg.min(v.size - i as u64 * seg));
                    match ext.last_mut() {
                        Some(last) if last.0 + last.1 == o => last.1 += l,
                        _ => ext.push((o, l)),
                    }
                }
                changed = Some(ext);
            }
        }
        let describe = format!("volume '{}' of snapshot {sid} in {}", v.name, src.location());
        volumes.push(VolumeInput {
            name: v.name.clone(),
            source: Box::new(RepoVolume { image, describe, changed }),
            checkpoint: v.change_base.clone(),
            recorded: Some((v.source.clone(), v.change_source.clone())),
        });
    }
    let mut metadata = Vec::new();
    for e in &m.metadata {
        let what = format!("metadata '{}' of snapshot {sid}", e.name);
        metadata.push((e.name.clone(), crate::snapshots::load_blob(src, &**tree.index(), &e.blob, &what, cancel).await?));
    }
    let origin = m.origin.clone().unwrap_or_else(|| Origin {
        repository: src.config().id.to_string(),
        snapshot: sid,
        location: src.location().to_string(),
        copied_unix_ms: mover_format::now_unix_ms(),
    });
    let job = BackupJob {
        group: m.group(),
        volumes,
        parent: match parent {
            Some((_, _, t)) => ParentChoice::Id(t),
            None => ParentChoice::Latest,
        },
        metadata,
        tags: m.tags.clone(),
        tuning: tuning.clone(),
        copy_of: Some(CopyOf { time_unix_ms: m.time_unix_ms, hostname: m.hostname.clone(), duration_ms: m.duration_ms, origin }),
    };
    backup(dst, dst_index, job, progress.clone(), cancel).await
}

/// A volume of a snapshot in the source repository, as the backup pipeline reads it.
struct RepoVolume {
    image: Arc<VolumeImage>,
    describe: String,
    changed: Option<Vec<(u64, u64)>>,
}

#[async_trait::async_trait]
impl VolumeSource for RepoVolume {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn open(self: Box<Self>, _parent: Option<ParentVolume<'_>>, _cancel: &CancellationToken) -> Result<Opened> {
        let rt = tokio::runtime::Handle::current();
        let changes = match self.changed {
            Some(ext) => Changes { source: Some(ChangeSource::Other("copy".into())), changed: Some(ext), ..Default::default() },
            None => Changes::default(),
        };
        Ok(Opened {
            size: self.image.size(),
            allocated: Some(self.image.allocated()),
            reader: Reader::Blocks(Box::new(ImageReader { image: self.image, rt })),
            changes,
        })
    }
}

/// Reads a source volume from the pipeline's reader threads.
struct ImageReader {
    image: Arc<VolumeImage>,
    rt: tokio::runtime::Handle,
}

impl BlockRead for ImageReader {
    fn name(&self) -> &'static str {
        "repository"
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.rt.block_on(self.image.read(offset, buf))
    }

    fn try_clone(&self) -> Option<Box<dyn BlockRead>> {
        Some(Box::new(ImageReader { image: self.image.clone(), rt: self.rt.clone() }))
    }
}
