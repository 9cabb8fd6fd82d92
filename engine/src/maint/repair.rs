//! `repair`: heals what is quarantined and no backup has stored anew, and says exactly what
//! stays lost (`docs/repair.md`).
//!
//! For every damaged blob nobody has stored again, the snapshots are walked to find where
//! it lies: which volume, at which byte offset, how long. Its content is then looked for
//!
//! - in a second repository (`from`): the same snapshot there (a copy of it, or the one it
//!   is a copy of), then the other snapshots of its group there, newest first — read
//!   through their own keys and chunker, at the same offset;
//! - in sources the operator names (`sources`: a volume's disk or image as it is now), at
//!   the same offset.
//!
//! Content addressing is the proof: bytes whose keyed hash is the damaged chunk's id *are*
//! that chunk, wherever they came from. They are stored as a new blob (under a backup lease,
//! like a backup), and every snapshot that needs the chunk restores again. What cannot be
//! found is listed as lost ranges, snapshot by snapshot.

use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::export::{ImageOptions, VolumeImage};
use crate::lock::{self, Hold};
use crate::pipeline::packer::{Claims, Packer};
use crate::progress::Progress;
use crate::walk::{self, Trees, Visitor};
use mover_format::blob::{BlobEncoder, BlobKind};
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::Manifest;
use mover_format::tree::MapEntry;
use mover_format::{ChunkId, Repository, SnapshotId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Where to look for damaged content.
#[derive(Default)]
pub struct RepairSources {
    /// A second repository holding the same data (a copy target, or the copy's source),
    /// with its local index.
    pub from: Option<(Repository, Arc<dyn ChunkIndex>)>,
    /// Volume name → a file or device that holds that volume's data now.
    pub volumes: Vec<(String, PathBuf)>,
    /// Only report what is lost; store nothing.
    pub dry_run: bool,
}

/// A byte range of a snapshot's volume that does not restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LostRange {
    pub snapshot: SnapshotId,
    pub group: String,
    pub volume: String,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RepairReport {
    /// Damaged locations quarantined.
    pub quarantined: usize,
    /// Damaged blobs no backup had stored anew when the repair started.
    pub unhealed_before: usize,
    /// Healed from the second repository, and from the sources named.
    pub healed_from_repository: usize,
    pub healed_from_source: usize,
    pub bytes_stored: u64,
    /// Damaged blobs still without a healthy copy.
    pub unhealed_after: usize,
    /// Snapshots that still do not restore whole, and exactly which bytes of them.
    pub lost_snapshots: Vec<SnapshotId>,
    pub lost: Vec<LostRange>,
    pub dry_run: bool,
}

/// Where a damaged blob is needed: by each use, `(snapshot, volume, offset, length)`.
#[derive(Debug, Default)]
struct Needs {
    /// Data chunks used whole: where each lies, to look for its bytes.
    chunks: HashMap<ChunkId, Vec<(SnapshotId, String, u64, u32)>>,
    /// Metadata blobs: the snapshots that hold each, and its name there.
    metadata: HashMap<ChunkId, Vec<(SnapshotId, String)>>,
    /// Every byte range that needs a damaged blob (a chunk, a slice of one, a segment map,
    /// a segment group), with the blob.
    ranges: Vec<(ChunkId, SnapshotId, String, u64, u64)>,
}

/// Tree blobs through the read view; one that cannot be read is skipped (what it covers is
/// lost, and found by the blob's id in `unhealed`).
struct RepairTrees<'a> {
    repo: &'a Repository,
    tree: &'a dyn ChunkIndex,
    cancel: &'a CancellationToken,
}

#[async_trait::async_trait]
impl Trees for RepairTrees<'_> {
    async fn blob(&mut self, id: &ChunkId, what: &str) -> Result<Option<Vec<u8>>> {
        match crate::snapshots::load_blob(self.repo, self.tree, id, what, self.cancel).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::Corrupt => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn undecodable(&mut self, _err: Error) -> Result<()> {
        Ok(())
    }
}

struct Finder<'a> {
    unhealed: &'a HashSet<ChunkId>,
    sid: SnapshotId,
    volume: String,
    seg_size: u64,
    size: u64,
    needs: Needs,
}

impl Visitor for Finder<'_> {
    fn map(&mut self, id: &ChunkId, offset: u64) -> bool {
        if self.unhealed.contains(id) {
            let len = self.seg_size.min(self.size.saturating_sub(offset));
            self.needs.ranges.push((*id, self.sid, self.volume.clone(), offset, len));
        }
        true
    }
    fn chunk(&mut self, e: &MapEntry, offset: u64, _segment_offset: u64) {
        let Some(id) = e.chunk() else { return };
        if !self.unhealed.contains(&id) {
            return;
        }
        self.needs.ranges.push((id, self.sid, self.volume.clone(), offset, e.len() as u64));
        if let MapEntry::Chunk { len, .. } = e {
            self.needs.chunks.entry(id).or_default().push((self.sid, self.volume.clone(), offset, *len));
        }
    }
}

/// Heals what it can; reports what stays lost.
pub async fn repair(repo: &Repository, index: Arc<dyn ChunkIndex>, src: RepairSources, cancel: &CancellationToken) -> Result<RepairReport> {
    // A backup lease: repair stores blobs and index segments as a backup does, and gc
    // running beside it keeps what it writes.
    lock::scope(repo, Hold::Backup, cancel, |held| async move { repair_locked(repo, index, &src, &held, cancel).await }).await
}

async fn repair_locked(
    repo: &Repository,
    index: Arc<dyn ChunkIndex>,
    src: &RepairSources,
    lock: &lock::Held,
    cancel: &CancellationToken,
) -> Result<RepairReport> {
    let (view, q) = lock.view_screened(index.clone(), None, cancel).await.context("syncing the local index")?;
    let tree = view.index().clone();
    let mut rep = RepairReport { quarantined: q.len(), dry_run: src.dry_run, ..Default::default() };
    let unhealed = q.unhealed(&*tree)?;
    rep.unhealed_before = unhealed.len();
    if unhealed.is_empty() {
        return Ok(rep);
    }
    let snaps = repo.snapshots(cancel).await?;
    let needs = find_needs(repo, &*tree, &snaps, &unhealed, cancel).await?;

    let mut healed: HashSet<ChunkId> = HashSet::new();
    if !src.dry_run {
        let progress = Arc::new(Progress::default());
        let dedup = crate::index::quarantine::screen(index.clone(), &q, crate::index::Screen::Dedup);
        let mut packer = Packer::new(repo.clone(), dedup, Arc::new(Claims::default()), lock.lease(), 2, 4, progress, cancel.clone());
        let mut enc = BlobEncoder::new(repo.config().compression.level);
        let by_id: HashMap<SnapshotId, &Manifest> = snaps.iter().map(|(id, m)| (*id, m)).collect();
        if let Some((from, from_index)) = &src.from {
            let n = heal_from_repository(repo, from, from_index.clone(), &by_id, &needs, &mut healed, &mut packer, &mut enc, &mut rep, cancel).await?;
            rep.healed_from_repository = n;
        }
        for (volume, path) in &src.volumes {
            let n = heal_from_source(repo, volume, path, &needs, &mut healed, &mut packer, &mut enc, &mut rep).await?;
            rep.healed_from_source += n;
        }
        packer.finish().await?;
        // Tree blobs fetched from the second repository may have met damage there; ours
        // was noted already.
        crate::index::quarantine::note_seen(repo, "repair").await;
    }
    let still: HashSet<ChunkId> = unhealed.difference(&healed).copied().collect();
    rep.unhealed_after = still.len();
    rep.lost = lost_ranges(&needs, &still, &snaps);
    rep.lost_snapshots = rep.lost.iter().map(|l| l.snapshot).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    Ok(rep)
}

/// Walks every snapshot for the places that need an unhealed blob.
async fn find_needs(
    repo: &Repository,
    tree: &dyn ChunkIndex,
    snaps: &[(SnapshotId, Manifest)],
    unhealed: &HashSet<ChunkId>,
    cancel: &CancellationToken,
) -> Result<Needs> {
    let mut trees = RepairTrees { repo, tree, cancel };
    let mut f = Finder { unhealed, sid: SnapshotId([0; 32]), volume: String::new(), seg_size: 0, size: 0, needs: Needs::default() };
    for (sid, m) in snaps {
        f.sid = *sid;
        for md in &m.metadata {
            if unhealed.contains(&md.blob) {
                // Metadata is not a volume's bytes: reported under its name, offset 0.
                f.needs.ranges.push((md.blob, *sid, format!("metadata '{}'", md.name), 0, md.size));
                f.needs.metadata.entry(md.blob).or_default().push((*sid, md.name.clone()));
            }
        }
        for vol in &m.volumes {
            (f.volume, f.seg_size, f.size) = (vol.name.clone(), vol.segment_size as u64, vol.size);
            // A damaged group: every segment it lists is lost (groups list GROUP_SEGMENTS
            // segments each, in order).
            let span = mover_format::tree::GROUP_SEGMENTS as u64 * vol.segment_size as u64;
            for (i, g) in vol.groups.iter().enumerate() {
                if unhealed.contains(g) {
                    let off = i as u64 * span;
                    f.needs.ranges.push((*g, *sid, vol.name.clone(), off, span.min(vol.size.saturating_sub(off))));
                }
            }
            walk::volume(&mut trees, &mut f, sid, vol).await?;
        }
    }
    Ok(f.needs)
}

/// Stores `bytes` as chunk `id` when they are that chunk (their keyed hash is its id).
async fn store_if_same(
    repo: &Repository,
    id: &ChunkId,
    kind: BlobKind,
    bytes: &[u8],
    packer: &mut Packer,
    enc: &mut BlobEncoder,
    rep: &mut RepairReport,
) -> Result<bool> {
    if repo.keys().chunk_id(bytes) != *id {
        return Ok(false);
    }
    let b = enc.encode(repo.keys(), *id, kind, bytes)?;
    rep.bytes_stored += b.sealed.len() as u64;
    packer.add(&b).await?;
    tracing::info!("chunk {id}: content found again and stored anew");
    Ok(true)
}

async fn heal_from_repository(
    repo: &Repository,
    from: &Repository,
    from_index: Arc<dyn ChunkIndex>,
    ours: &HashMap<SnapshotId, &Manifest>,
    needs: &Needs,
    healed: &mut HashSet<ChunkId>,
    packer: &mut Packer,
    enc: &mut BlobEncoder,
    rep: &mut RepairReport,
    cancel: &CancellationToken,
) -> Result<usize> {
    lock::scope(from, Hold::Read, cancel, |held| async move {
        let from_view = held.view(from_index, cancel).await.with_context(|| format!("syncing the local index of {}", from.location()))?;
        let theirs = from.snapshots(cancel).await?;
        let mut images: HashMap<(SnapshotId, String), Option<Arc<VolumeImage>>> = HashMap::new();
        let mut n = 0;
        for (id, uses) in &needs.chunks {
            'found: for (sid, volume, offset, len) in uses {
                let Some(m) = ours.get(sid) else { continue };
                // The same snapshot there first, then its group's others, newest first.
                let ident = m.identity(&repo.config().id.to_hex(), sid);
                let mut cands: Vec<&(SnapshotId, Manifest)> = theirs.iter().filter(|(tid, tm)| tm.identity(&from.config().id.to_hex(), tid) == ident).collect();
                let mut same_group: Vec<&(SnapshotId, Manifest)> =
                    theirs.iter().filter(|(tid, tm)| tm.group() == m.group() && !cands.iter().any(|c| c.0 == *tid)).collect();
                same_group.sort_by_key(|(_, tm)| std::cmp::Reverse(tm.time_unix_ms));
                cands.extend(same_group.into_iter().take(8));
                for (tid, tm) in cands {
                    let Some(tv) = tm.volume(volume) else { continue };
                    if offset + *len as u64 > tv.size {
                        continue;
                    }
                    let key = (*tid, volume.clone());
                    if !images.contains_key(&key) {
                        let img =
                            VolumeImage::open(from, &from_view, *tid, tv.clone(), ImageOptions { cache_segments: 4, read_ahead: 0, window: None }, cancel)
                                .await;
                        images.insert(key.clone(), img.map_err(|e| tracing::warn!("{e:#}")).ok());
                    }
                    let Some(img) = images.get(&key).cloned().flatten() else { continue };
                    let mut buf = vec![0u8; *len as usize];
                    match img.read(*offset, &mut buf).await {
                        Ok(()) => {}
                        Err(e) if e.is_cancelled() => return Err(e),
                        Err(e) => {
                            tracing::warn!("{e:#}");
                            continue;
                        }
                    }
                    if store_if_same(repo, id, BlobKind::Data, &buf, packer, enc, rep).await? {
                        healed.insert(*id);
                        n += 1;
                        break 'found;
                    }
                }
            }
        }
        for (id, uses) in &needs.metadata {
            'meta: for (sid, name) in uses {
                let Some(m) = ours.get(sid) else { continue };
                let ident = m.identity(&repo.config().id.to_hex(), sid);
                for (tid, tm) in theirs.iter().filter(|(tid, tm)| tm.identity(&from.config().id.to_hex(), tid) == ident) {
                    let Some(md) = tm.metadata.iter().find(|md| md.name == *name) else { continue };
                    let what = format!("metadata '{name}' of snapshot {tid} in {}", from.location());
                    let bytes = match from_view.load_blob(from, &md.blob, &what, cancel).await {
                        Ok(b) => b,
                        Err(e) if e.is_cancelled() => return Err(e),
                        Err(e) => {
                            tracing::warn!("{e:#}");
                            continue;
                        }
                    };
                    if store_if_same(repo, id, BlobKind::Metadata, &bytes, packer, enc, rep).await? {
                        healed.insert(*id);
                        n += 1;
                        break 'meta;
                    }
                }
            }
        }
        Ok(n)
    })
    .await
}

async fn heal_from_source(
    repo: &Repository,
    volume: &str,
    path: &std::path::Path,
    needs: &Needs,
    healed: &mut HashSet<ChunkId>,
    packer: &mut Packer,
    enc: &mut BlobEncoder,
    rep: &mut RepairReport,
) -> Result<usize> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).with_context(|| format!("opening {} (the data of volume '{volume}') to repair from", path.display()))?;
    let (_, size) = crate::device::inspect(&path.display().to_string(), &f)?;
    let mut n = 0;
    for (id, uses) in &needs.chunks {
        if healed.contains(id) {
            continue;
        }
        for (_, v, offset, len) in uses.iter().filter(|u| u.1 == volume) {
            if offset + *len as u64 > size {
                continue;
            }
            let mut buf = vec![0u8; *len as usize];
            f.read_exact_at(&mut buf, *offset).with_context(|| format!("reading {len} bytes at {offset} of {} (volume '{v}')", path.display()))?;
            if store_if_same(repo, id, BlobKind::Data, &buf, packer, enc, rep).await? {
                healed.insert(*id);
                n += 1;
                break;
            }
        }
    }
    Ok(n)
}

/// The byte ranges that need a blob in `still`, merged per snapshot and volume.
fn lost_ranges(needs: &Needs, still: &HashSet<ChunkId>, snaps: &[(SnapshotId, Manifest)]) -> Vec<LostRange> {
    let group: HashMap<SnapshotId, String> = snaps.iter().map(|(id, m)| (*id, m.group())).collect();
    let mut per: BTreeMap<(SnapshotId, String), Vec<(u64, u64)>> = BTreeMap::new();
    for (id, sid, vol, off, len) in &needs.ranges {
        if still.contains(id) {
            per.entry((*sid, vol.clone())).or_default().push((*off, *len));
        }
    }
    let mut out = Vec::new();
    for ((sid, volume), mut rs) in per {
        rs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (o, l) in rs {
            match merged.last_mut() {
                Some(last) if o <= last.0 + last.1 => last.1 = last.1.max(o + l - last.0),
                _ => merged.push((o, l)),
            }
        }
        for (offset, len) in merged {
            out.push(LostRange { snapshot: sid, group: group.get(&sid).cloned().unwrap_or_default(), volume: volume.clone(), offset, len });
        }
    }
    out
}
