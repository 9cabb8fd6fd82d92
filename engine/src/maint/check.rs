//! `check`: structure (every manifest's groups, segment maps and chunks are indexed, every
//! indexed pack exists, no entry points past its pack's end) and, with a share of packs to
//! read, every blob in them downloaded, decrypted and verified. It reads the store itself —
//! index segments, not the local cache — so it judges what is really there. Every problem
//! names its object; the report lists them all.

use crate::error::Result;
use crate::index::Quarantined;
use crate::progress::Progress;
use crate::walk::{self, Trees, Visitor};
use mover_format::index::BlobLocation;
use mover_format::manifest::Manifest;
use mover_format::pack::FOOTER_LEN;
use mover_format::quarantine::Damaged;
use mover_format::tree::MapEntry;
use mover_format::{names, ChunkId, PackId, Repository, SnapshotId};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    pub snapshots: usize,
    pub packs: usize,
    pub index_segments: usize,
    pub index_entries: usize,
    pub packs_read: usize,
    pub blobs_verified: u64,
    pub bytes_verified: u64,
    /// Every problem found, each naming its object.
    pub problems: Vec<String>,
    /// Each damaged object (a pack, a chunk missing from the index, a tree blob that
    /// cannot be read), what is wrong with it, and the snapshots that need it.
    pub damaged: Vec<DamagedObject>,
    /// Every snapshot that needs a damaged object: these do not restore as they are.
    pub affected_snapshots: Vec<SnapshotId>,
    /// The snapshots the check covered.
    #[serde(skip)]
    pub checked: Vec<SnapshotId>,
    /// What is not a problem but worth knowing (a damaged pack whose damage is healed).
    pub notes: Vec<String>,
    /// Entries of the journal read (`docs/immutability.md`, "Tamper evidence"); its
    /// problems and notes are among the others.
    pub journal_entries: usize,
    /// Damaged blob locations quarantined before this check (`docs/repair.md`).
    pub quarantined: usize,
    /// Of those, the ones whose content is stored again elsewhere (healed).
    pub healed: usize,
    /// Damaged locations this check found and quarantined.
    pub newly_quarantined: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DamagedObject {
    pub object: String,
    pub problem: String,
    pub snapshots: Vec<SnapshotId>,
}

/// What the store holds, read from its index segments and pack listing.
pub(super) struct StoreView {
    pub packs: HashMap<PackId, u64>,
    pub index: HashMap<ChunkId, BlobLocation>,
    /// Entries a running or killed `gc` took out of the index and has not swept yet: a
    /// snapshot may use them until the sweep puts them back.
    pub pending: HashMap<ChunkId, BlobLocation>,
    pub snapshots: Vec<(SnapshotId, Manifest)>,
    /// Damaged locations; `index` holds another location of a chunk when there is one.
    pub quarantine: Quarantined,
}

impl StoreView {
    pub fn locate(&self, id: &ChunkId) -> Option<&BlobLocation> {
        self.index.get(id).or_else(|| self.pending.get(id))
    }
}

/// Reads the store's packs, index segments, gc records and snapshots; what cannot be read
/// goes into `problems`.
pub(super) async fn load_view(repo: &Repository, rep: &mut CheckReport, cancel: &CancellationToken) -> Result<StoreView> {
    // Snapshots first, then gc records, then the index, then packs (the reverse of the
    // order writers create them): everything a listed snapshot references is in a segment
    // or record read after it, and every pack a segment names is listed after it.
    let mut snapshots = Vec::new();
    for id in repo.list_snapshot_ids(cancel).await? {
        match repo.read_snapshot(&id, cancel).await {
            Ok(m) => snapshots.push((id, m)),
            // Forgotten between listing and reading.
            Err(mover_format::RepoError::NotFound { .. }) => {}
            Err(e) if e.is_cancelled() => return Err(e.into()),
            Err(e) => rep.problems.push(format!("{e:#}")),
        }
    }
    let pending = crate::index::pending::entries(repo, cancel).await.unwrap_or_else(|e| {
        rep.problems.push(format!("{e:#}"));
        HashMap::new()
    });
    let quarantine = Quarantined::load(repo, cancel).await?;
    let mut index: HashMap<ChunkId, BlobLocation> = HashMap::new();
    // A segment a running gc replaced between listing and reading: its entries are in
    // segments written before it was deleted, so the index is read again.
    'read: for attempt in 0.. {
        index.clear();
        let segs = repo.list_index(cancel).await?;
        rep.index_segments = segs.len();
        for id in segs {
            match repo.read_index(&id, cancel).await {
                Ok(entries) => {
                    for e in entries {
                        // A healthy location before a quarantined one.
                        match index.get(&e.id) {
                            Some(have) if !quarantine.is_bad(&e.id, &have.pack) || quarantine.is_bad(&e.id, &e.loc.pack) => {}
                            _ => {
                                index.insert(e.id, e.loc);
                            }
                        }
                    }
                }
                Err(mover_format::RepoError::Storage(e)) if e.is_not_found() && attempt < 5 => continue 'read,
                Err(e) if e.is_cancelled() => return Err(e.into()),
                Err(e) => rep.problems.push(format!("{e:#}")),
            }
        }
        break;
    }
    let packs: HashMap<PackId, u64> = repo.list_packs(cancel).await?.into_iter().collect();
    rep.packs = packs.len();
    rep.index_entries = index.len();
    rep.snapshots = snapshots.len();
    Ok(StoreView { packs, index, pending, snapshots, quarantine })
}

/// Tree blobs located through a [`StoreView`]; an unreadable one is a problem, not a stop.
pub(super) struct ViewTrees<'a> {
    pub repo: &'a Repository,
    pub view: &'a StoreView,
    pub cancel: &'a CancellationToken,
    /// Where problems go; `None` makes every problem an error (stats).
    pub problems: Option<Vec<String>>,
    /// Where tree blobs that could not be read or decoded are noted (check).
    pub failed: Option<Arc<Mutex<Vec<(ChunkId, String)>>>>,
}

#[async_trait::async_trait]
impl Trees for ViewTrees<'_> {
    async fn blob(&mut self, id: &ChunkId, what: &str) -> Result<Option<Vec<u8>>> {
        let r = match self.view.locate(id) {
            None => Err(crate::error::Error::corrupt(format!("{what}: blob {id} is not in any index segment of repository {}", self.repo.location()))),
            Some(loc) => self.repo.read_blob(id, loc, self.cancel).await.map_err(|e| crate::error::Error::from(e).context(what)),
        };
        match (r, &mut self.problems) {
            (Ok(b), _) => Ok(Some(b)),
            (Err(e), Some(p)) if !e.is_cancelled() => {
                if let Some(f) = &self.failed {
                    if let Ok(mut f) = f.lock() {
                        f.push((*id, format!("{e:#}")));
                    }
                }
                p.push(format!("{e:#}"));
                Ok(None)
            }
            (Err(e), _) => Err(e),
        }
    }
    fn undecodable(&mut self, err: crate::error::Error) -> Result<()> {
        match &mut self.problems {
            Some(p) => {
                p.push(format!("{err:#}"));
                Ok(())
            }
            None => Err(err),
        }
    }
}

/// Damaged objects and the snapshots that depend on them.
#[derive(Debug, Default)]
struct Damage {
    /// Blobs that cannot be read, with the object that holds the damage (`pack …`, `chunk
    /// …`): the object named to the operator.
    blobs: HashMap<ChunkId, String>,
    /// Per damaged object: what is wrong, and the snapshots that need it.
    objects: BTreeMap<String, (String, BTreeSet<SnapshotId>)>,
    /// Tree blobs a walk failed to read or decode (filled by [`ViewTrees`]).
    failed: Arc<Mutex<Vec<(ChunkId, String)>>>,
    /// Blobs in missing packs, to quarantine (blobs that fail to decode are noted by the
    /// repository handle as they are read).
    found: Vec<Damaged>,
}

impl Damage {
    fn object(&mut self, object: String, problem: String) {
        self.objects.entry(object).or_insert_with(|| (problem, BTreeSet::new()));
    }
    fn blob(&mut self, id: ChunkId, object: String, problem: String) {
        self.object(object.clone(), problem);
        self.blobs.insert(id, object);
    }
    fn attribute(&mut self, object: &str, sid: SnapshotId) {
        if let Some(o) = self.objects.get_mut(object) {
            o.1.insert(sid);
        }
    }
}

/// Checks each chunk against the index, each segment map once, and finds which snapshots
/// need each damaged object (a map seen before passes on the damage found in it).
struct Structure<'a> {
    view: &'a StoreView,
    sid: SnapshotId,
    volume: String,
    seen_maps: HashSet<ChunkId>,
    /// Damaged objects found under each segment map.
    memo: HashMap<ChunkId, Vec<String>>,
    current_map: Option<ChunkId>,
    damage: Damage,
    problems: Vec<String>,
}

impl Structure<'_> {
    /// Attributes tree blobs the walk failed to read to the snapshot being walked (called
    /// after each volume: later snapshots that use them find them among the damaged blobs).
    fn drain_failed(&mut self) {
        let failed: Vec<(ChunkId, String)> = self.damage.failed.lock().map(|mut f| std::mem::take(&mut *f)).unwrap_or_default();
        for (id, problem) in failed {
            let object = format!("tree blob {id}");
            self.damage.blob(id, object.clone(), problem);
            self.damage.attribute(&object, self.sid);
        }
    }
    fn hit(&mut self, id: &ChunkId) {
        if let Some(o) = self.damage.blobs.get(id).cloned() {
            self.damage.attribute(&o, self.sid);
            if let Some(m) = self.current_map {
                self.memo.entry(m).or_default().push(o);
            }
        }
    }
}

impl Visitor for Structure<'_> {
    fn metadata(&mut self, name: &str, blob: &ChunkId) {
        if self.view.locate(blob).is_none() {
            self.problems.push(format!("snapshot {}: metadata '{name}' blob {blob} is not indexed", self.sid));
            self.damage.blob(*blob, format!("metadata blob {blob}"), "not in any index segment".into());
        }
        self.current_map = None;
        self.hit(blob);
    }
    fn group(&mut self, id: &ChunkId) -> bool {
        self.current_map = None;
        self.hit(id);
        true
    }
    fn map(&mut self, id: &ChunkId, _offset: u64) -> bool {
        self.current_map = None;
        self.hit(id);
        if !self.seen_maps.insert(*id) {
            for o in self.memo.get(id).cloned().unwrap_or_default() {
                self.damage.attribute(&o, self.sid);
            }
            return false;
        }
        self.current_map = Some(*id);
        true
    }
    fn chunk(&mut self, e: &MapEntry, offset: u64, segment_offset: u64) {
        let what = || format!("snapshot {} volume '{}' segment at offset {segment_offset}", self.sid, self.volume);
        let Some(id) = e.chunk() else { return };
        match (self.view.locate(&id), *e) {
            (None, _) => {
                self.problems.push(format!("{}: chunk {id} at offset {offset} is not in any index segment", what()));
                self.damage.blob(id, format!("chunk {id}"), "not in any index segment".into());
            }
            (Some(l), MapEntry::Chunk { len, .. }) if l.raw_len != len => {
                self.problems.push(format!("{}: chunk {id} is {} bytes in the index, {len} in the map", what(), l.raw_len))
            }
            (Some(l), MapEntry::Slice { offset: so, len, .. }) if so as u64 + len as u64 > l.raw_len as u64 => {
                self.problems.push(format!("{}: a slice {so}+{len} of chunk {id} lies past its {} bytes", what(), l.raw_len))
            }
            _ => {}
        }
        self.hit(&id);
    }
}

/// Checks structure; with `read_percent` (1..=100), also downloads that share of the packs
/// and verifies every blob in them, counting their bytes in `progress` (total: the
/// sample's size). Every damaged object is listed with the snapshots that need it.
pub(crate) async fn check_with_progress(repo: &Repository, read_percent: Option<u32>, progress: &Progress, cancel: &CancellationToken) -> Result<CheckReport> {
    // Under a `read` lock: a concurrent gc deletes nothing this check may still read.
    crate::lock::scope(repo, crate::lock::Hold::Read, cancel, |_held| check_locked(repo, read_percent, progress, cancel)).await
}

async fn check_locked(repo: &Repository, read_percent: Option<u32>, progress: &Progress, cancel: &CancellationToken) -> Result<CheckReport> {
    let mut rep = CheckReport::default();
    let v = load_view(repo, &mut rep, cancel).await?;
    let j = super::journal::audit(repo, &v.snapshots, cancel).await?;
    rep.journal_entries = j.entries;
    rep.problems.extend(j.problems);
    rep.notes.extend(j.notes);
    let mut damage = Damage::default();
    // Quarantined locations: damaged, unless the content is stored again elsewhere.
    rep.quarantined = v.quarantine.len();
    for (id, pack, problem) in v.quarantine.iter() {
        match v.index.get(id) {
            Some(loc) if loc.pack == *pack => damage.blob(*id, format!("pack {pack}"), format!("quarantined: {problem}")),
            Some(_) => rep.healed += 1,
            None => {}
        }
    }
    // Index entries against packs.
    let mut reported_missing = HashSet::new();
    for (id, loc) in &v.index {
        match v.packs.get(&loc.pack) {
            None => {
                damage.found.push(Damaged { chunk: *id, pack: loc.pack, problem: "pack is missing".into() });
                if reported_missing.insert(loc.pack) {
                    rep.problems.push(format!("pack {} in repository {}: missing, but the index lists chunks in it (e.g. {id})", loc.pack, repo.location()));
                }
                damage.blob(*id, format!("pack {}", loc.pack), "missing, but the index lists blobs in it".into());
            }
            Some(&size) if loc.offset as u64 + loc.stored_len as u64 > size.saturating_sub(FOOTER_LEN as u64) => {
                rep.problems.push(format!(
                    "chunk {id} in pack {}: index entry ends at {} but the pack holds {size} bytes",
                    loc.pack,
                    loc.offset as u64 + loc.stored_len as u64
                ));
                damage.blob(*id, format!("pack {}", loc.pack), format!("shorter ({size} bytes) than its index entries say"));
            }
            _ => {}
        }
    }
    // Data first, so that the walk below can say which snapshots need what is damaged.
    if let Some(pct) = read_percent {
        read_data(repo, &v, pct.clamp(1, 100), &mut rep, &mut damage, progress, cancel).await?;
    }
    // Manifests → groups → segment maps → chunks.
    let failed = damage.failed.clone();
    let mut trees = ViewTrees { repo, view: &v, cancel, problems: Some(Vec::new()), failed: Some(failed) };
    let mut s = Structure {
        view: &v,
        sid: SnapshotId([0; 32]),
        volume: String::new(),
        seen_maps: HashSet::new(),
        memo: HashMap::new(),
        current_map: None,
        damage,
        problems: Vec::new(),
    };
    for (sid, m) in &v.snapshots {
        s.sid = *sid;
        for md in &m.metadata {
            s.metadata(&md.name, &md.blob);
        }
        for vol in &m.volumes {
            s.volume = vol.name.clone();
            let shape = walk::volume(&mut trees, &mut s, sid, vol).await?;
            s.drain_failed();
            if let Some(want) = shape.mismatch(vol) {
                s.problems.push(format!("snapshot {sid} volume '{}': {} segments recorded for {} bytes (needs {want})", vol.name, shape.segments, vol.size));
            }
        }
    }
    rep.problems.extend(trees.problems.take().unwrap_or_default());
    rep.problems.extend(s.problems);
    let mut affected = BTreeSet::new();
    for (object, (problem, snaps)) in s.damage.objects {
        affected.extend(snaps.iter().copied());
        rep.damaged.push(DamagedObject { object, problem, snapshots: snaps.into_iter().collect() });
    }
    rep.affected_snapshots = affected.into_iter().collect();
    rep.checked = v.snapshots.iter().map(|(id, _)| *id).collect();
    // What this check found damaged is never deduplicated against again: blobs in missing
    // packs, and every blob that failed to decode (noted by the repository handle).
    let mut found = std::mem::take(&mut s.damage.found);
    found.extend(repo.take_damage_seen());
    let before = found.len();
    found.retain(|d| !v.quarantine.is_bad(&d.chunk, &d.pack));
    if before > 0 {
        let n = found.len();
        crate::index::quarantine::record(repo, "check", found, Some(&v.quarantine), cancel).await?;
        rep.newly_quarantined = n;
    }
    Ok(rep)
}

async fn read_data(
    repo: &Repository,
    v: &StoreView,
    pct: u32,
    rep: &mut CheckReport,
    damage: &mut Damage,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<()> {
    let mut by_pack: HashMap<PackId, Vec<(ChunkId, BlobLocation)>> = HashMap::new();
    for (id, loc) in &v.index {
        by_pack.entry(loc.pack).or_default().push((*id, *loc));
    }
    let mut packs: Vec<&PackId> = v.packs.keys().collect();
    packs.sort();
    // A deterministic sample: a pack is in the N % subset when its id says so.
    packs.retain(|pack| pct >= 100 || (u16::from_le_bytes([pack.0[0], pack.0[1]]) as u32 % 100) < pct);
    progress.add_total(packs.iter().map(|p| v.packs[*p]).sum());
    for pack in packs {
        progress.add_done(v.packs[pack]);
        progress.add_read(v.packs[pack]);
        let name = names::pack(pack);
        let bytes = match repo.get_object(&name, cancel).await {
            Ok(b) => b,
            Err(e) if e.is_cancelled() => return Err(e.into()),
            Err(e) => {
                rep.problems.push(format!("{e:#}"));
                for (id, _) in by_pack.get(pack).map(|v| v.as_slice()).unwrap_or(&[]) {
                    damage.blob(*id, format!("pack {pack}"), format!("cannot be read: {e:#}"));
                }
                continue;
            }
        };
        rep.packs_read += 1;
        let object = format!("pack {pack}");
        let hash_differs = PackId(mover_format::id::content_id(&bytes)) != *pack;
        let problems_before = rep.problems.len();
        if let Err(e) = mover_format::pack::read_pack(repo.keys(), &bytes) {
            rep.problems.push(format!("pack {pack} in repository {}: trailer: {e}", repo.location()));
            damage.object(object.clone(), format!("trailer: {e}"));
        }
        for (id, loc) in by_pack.get(pack).map(|v| v.as_slice()).unwrap_or(&[]) {
            let (s, e) = (loc.offset as usize, loc.offset as usize + loc.stored_len as usize);
            if e > bytes.len() {
                continue; // reported by the structure check
            }
            match repo.decode_blob(id, loc, &bytes[s..e]) {
                Ok(p) => {
                    rep.blobs_verified += 1;
                    rep.bytes_verified += p.len() as u64;
                }
                Err(err) => {
                    rep.problems.push(format!("{err:#}"));
                    damage.blob(*id, object.clone(), format!("{err:#}"));
                }
            }
        }
        if hash_differs {
            let healed = rep.problems.len() == problems_before && v.quarantine.records.iter().any(|(_, packs)| packs.contains(pack));
            if healed {
                // Its damaged blobs are quarantined and stored again elsewhere; every blob
                // still used from it verifies. gc removes it.
                rep.notes.push(format!("pack {pack}: damaged, but nothing needs its damaged blobs any more (healed); `mover gc` removes it"));
            } else {
                rep.problems.push(format!("pack {pack} in repository {}: content does not hash to its name (corrupt or truncated)", repo.location()));
                damage.object(object.clone(), "content does not hash to its name (corrupt or truncated)".into());
            }
        }
    }
    Ok(())
}
