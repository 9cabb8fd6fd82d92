//! Repository maintenance that changes nothing: `check` (structure, and `--read-data`
//! verification of every or a sample of packs) and `stats`. Both read the store itself —
//! index segments, not the local cache — so they judge what is really there.

use anyhow::Result;
use mover_format::index::BlobLocation;
use mover_format::manifest::Manifest;
use mover_format::pack::FOOTER_LEN;
use mover_format::tree::{MapEntry, SegmentGroup, SegmentMap, SegmentRef};
use mover_format::{names, ChunkId, PackId, Repository, SnapshotId};
use std::collections::{HashMap, HashSet};
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
}

/// What the store holds, read from its index segments and pack listing.
struct View {
    packs: HashMap<PackId, u64>,
    index: HashMap<ChunkId, BlobLocation>,
    /// Entries a running or killed `gc` took out of the index and has not swept yet: a
    /// snapshot may use them until the sweep puts them back.
    pending: HashMap<ChunkId, BlobLocation>,
    snapshots: Vec<(SnapshotId, Manifest)>,
}

async fn load_view(repo: &Repository, rep: &mut CheckReport, cancel: &CancellationToken) -> Result<View> {
    let packs: HashMap<PackId, u64> = repo.list_packs(cancel).await?.into_iter().collect();
    let mut index = HashMap::new();
    let segs = repo.list_index(cancel).await?;
    rep.index_segments = segs.len();
    for id in segs {
        match repo.read_index(&id, cancel).await {
            Ok(entries) => {
                for e in entries {
                    index.insert(e.id, e.loc);
                }
            }
            Err(e) if e.is_cancelled() => return Err(e.into()),
            Err(e) => rep.problems.push(format!("{e:#}")),
        }
    }
    let mut snapshots = Vec::new();
    for id in repo.list_snapshot_ids(cancel).await? {
        match repo.read_snapshot(&id, cancel).await {
            Ok(m) => snapshots.push((id, m)),
            Err(e) if e.is_cancelled() => return Err(e.into()),
            Err(e) => rep.problems.push(format!("{e:#}")),
        }
    }
    rep.packs = packs.len();
    rep.index_entries = index.len();
    rep.snapshots = snapshots.len();
    let pending = crate::gc::pending_entries(repo, cancel).await.unwrap_or_else(|e| {
        rep.problems.push(format!("{e:#}"));
        HashMap::new()
    });
    Ok(View { packs, index, pending, snapshots })
}

async fn tree_blob(repo: &Repository, v: &View, id: &ChunkId, what: &str, cancel: &CancellationToken) -> Result<Vec<u8>, String> {
    let loc = v
        .index
        .get(id)
        .or_else(|| v.pending.get(id))
        .ok_or_else(|| format!("{what}: blob {id} is not in any index segment of repository {}", repo.location()))?;
    repo.read_blob(id, loc, cancel).await.map_err(|e| format!("{what}: {e:#}"))
}

/// Checks structure: every manifest's groups, segment maps and chunks are indexed; every
/// indexed pack exists; no index entry points past its pack's end. With `read_percent`
/// (1..=100), also downloads that share of the packs and verifies every blob in them.
pub async fn check(repo: &Repository, read_percent: Option<u32>, cancel: &CancellationToken) -> Result<CheckReport> {
    let mut rep = CheckReport::default();
    let v = load_view(repo, &mut rep, cancel).await?;
    // Index entries against packs.
    let mut reported_missing = HashSet::new();
    for (id, loc) in &v.index {
        match v.packs.get(&loc.pack) {
            None => {
                if reported_missing.insert(loc.pack) {
                    rep.problems.push(format!("pack {} in repository {}: missing, but the index lists chunks in it (e.g. {id})", loc.pack, repo.location()));
                }
            }
            Some(&size) if loc.offset as u64 + loc.stored_len as u64 > size.saturating_sub(FOOTER_LEN as u64) => rep.problems.push(format!(
                "chunk {id} in pack {}: index entry ends at {} but the pack holds {size} bytes",
                loc.pack,
                loc.offset as u64 + loc.stored_len as u64
            )),
            _ => {}
        }
    }
    // Manifests → groups → segment maps → chunks.
    let mut seen_maps = HashSet::new();
    for (sid, m) in &v.snapshots {
        for md in &m.metadata {
            if !v.index.contains_key(&md.blob) && !v.pending.contains_key(&md.blob) {
                rep.problems.push(format!("snapshot {sid}: metadata '{}' blob {} is not indexed", md.name, md.blob));
            }
        }
        for vol in &m.volumes {
            let mut nseg = 0u64;
            let mut all_groups = true;
            for g in &vol.groups {
                let what = format!("snapshot {sid} volume '{}' segment group", vol.name);
                let group = match tree_blob(repo, &v, g, &what, cancel).await.and_then(|b| SegmentGroup::decode(&b).map_err(|e| format!("{what} {g}: {e}"))) {
                    Ok(g) => g,
                    Err(p) => {
                        rep.problems.push(p);
                        all_groups = false;
                        continue;
                    }
                };
                for (i, r) in group.segments.iter().enumerate() {
                    let SegmentRef::Map { map, .. } = r else { continue };
                    if !seen_maps.insert(*map) {
                        continue;
                    }
                    let off = (group.first_segment + i as u64) * vol.segment_size as u64;
                    let what = format!("snapshot {sid} volume '{}' segment at offset {off}", vol.name);
                    match tree_blob(repo, &v, map, &what, cancel).await.and_then(|b| SegmentMap::decode(&b).map_err(|e| format!("{what}: map {map}: {e}"))) {
                        Ok(sm) => {
                            let mut pos = off;
                            for e in &sm.entries {
                                if let MapEntry::Chunk { id, len } = e {
                                    match v.index.get(id).or_else(|| v.pending.get(id)) {
                                        None => rep.problems.push(format!("{what}: chunk {id} at offset {pos} is not in any index segment")),
                                        Some(l) if l.raw_len != *len => {
                                            rep.problems.push(format!("{what}: chunk {id} is {} bytes in the index, {len} in the map", l.raw_len))
                                        }
                                        _ => {}
                                    }
                                }
                                pos += e.len() as u64;
                            }
                        }
                        Err(p) => rep.problems.push(p),
                    }
                }
                nseg += group.segments.len() as u64;
            }
            if all_groups && nseg != vol.size.div_ceil(vol.segment_size as u64) {
                rep.problems.push(format!("snapshot {sid} volume '{}': {nseg} segments recorded for {} bytes", vol.name, vol.size));
            }
        }
    }
    if let Some(pct) = read_percent {
        read_data(repo, &v, pct.clamp(1, 100), &mut rep, cancel).await?;
    }
    Ok(rep)
}

async fn read_data(repo: &Repository, v: &View, pct: u32, rep: &mut CheckReport, cancel: &CancellationToken) -> Result<()> {
    let mut by_pack: HashMap<PackId, Vec<(ChunkId, BlobLocation)>> = HashMap::new();
    for (id, loc) in &v.index {
        by_pack.entry(loc.pack).or_default().push((*id, *loc));
    }
    let mut packs: Vec<&PackId> = v.packs.keys().collect();
    packs.sort();
    for pack in packs {
        // A deterministic sample: a pack is in the N % subset when its id says so.
        if pct < 100 && (u16::from_le_bytes([pack.0[0], pack.0[1]]) as u32 % 100) >= pct {
            continue;
        }
        let name = names::pack(pack);
        let bytes = match repo.get_object(&name, cancel).await {
            Ok(b) => b,
            Err(e) if e.is_cancelled() => return Err(e.into()),
            Err(e) => {
                rep.problems.push(format!("{e:#}"));
                continue;
            }
        };
        rep.packs_read += 1;
        if PackId(mover_format::id::content_id(&bytes)) != *pack {
            rep.problems.push(format!("pack {pack} in repository {}: content does not hash to its name (corrupt or truncated)", repo.location()));
        }
        if let Err(e) = mover_format::pack::read_pack(repo.keys(), &bytes) {
            rep.problems.push(format!("pack {pack} in repository {}: trailer: {e}", repo.location()));
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
                Err(err) => rep.problems.push(format!("{err:#}")),
            }
        }
    }
    Ok(())
}

#[derive(Debug, serde::Serialize)]
pub struct SnapshotStats {
    pub id: SnapshotId,
    pub logical_bytes: u64,
    /// Raw bytes of chunks no other snapshot references.
    pub unique_bytes: u64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    pub snapshots: usize,
    /// Sum of volume sizes over all snapshots.
    pub logical_bytes: u64,
    /// Bytes of data in chunks (holes excluded), over all snapshots.
    pub referenced_bytes: u64,
    /// Raw bytes of distinct chunks.
    pub unique_bytes: u64,
    /// Bytes of all packs in the store.
    pub stored_bytes: u64,
    pub packs: usize,
    pub chunks: usize,
    /// referenced / unique
    pub dedup_ratio: f64,
    /// unique / stored
    pub compression_ratio: f64,
    pub per_snapshot: Vec<SnapshotStats>,
}

pub async fn stats(repo: &Repository, cancel: &CancellationToken) -> Result<Stats> {
    let mut rep = CheckReport::default();
    let v = load_view(repo, &mut rep, cancel).await?;
    if let Some(p) = rep.problems.first() {
        anyhow::bail!("repository {} has problems (run `mover check`): {p}", repo.location());
    }
    let mut st = Stats { snapshots: v.snapshots.len(), packs: v.packs.len(), stored_bytes: v.packs.values().sum(), ..Default::default() };
    // chunk → (raw length, number of snapshots referencing it, last snapshot index)
    let mut refs: HashMap<ChunkId, (u32, u32, usize)> = HashMap::new();
    let mut maps: HashMap<ChunkId, SegmentMap> = HashMap::new();
    for (si, (sid, m)) in v.snapshots.iter().enumerate() {
        let mut s = SnapshotStats { id: *sid, logical_bytes: 0, unique_bytes: 0 };
        let mut mine: HashSet<ChunkId> = HashSet::new();
        for vol in &m.volumes {
            s.logical_bytes += vol.size;
            for g in &vol.groups {
                let group = SegmentGroup::decode(&tree_blob(repo, &v, g, "segment group", cancel).await.map_err(anyhow::Error::msg)?)?;
                for r in &group.segments {
                    let SegmentRef::Map { map, .. } = r else { continue };
                    if !maps.contains_key(map) {
                        let sm = SegmentMap::decode(&tree_blob(repo, &v, map, "segment map", cancel).await.map_err(anyhow::Error::msg)?)?;
                        maps.insert(*map, sm);
                    }
                    for e in &maps[map].entries {
                        if let MapEntry::Chunk { id, len } = e {
                            st.referenced_bytes += *len as u64;
                            mine.insert(*id);
                            let ent = refs.entry(*id).or_insert((*len, 0, usize::MAX));
                            if ent.2 != si {
                                ent.1 += 1;
                                ent.2 = si;
                            }
                        }
                    }
                }
            }
        }
        st.logical_bytes += s.logical_bytes;
        st.per_snapshot.push(s);
    }
    st.chunks = refs.len();
    st.unique_bytes = refs.values().map(|r| r.0 as u64).sum();
    for (_id, (len, count, last)) in &refs {
        if *count == 1 {
            st.per_snapshot[*last].unique_bytes += *len as u64;
        }
    }
    st.dedup_ratio = if st.unique_bytes > 0 { st.referenced_bytes as f64 / st.unique_bytes as f64 } else { 0.0 };
    st.compression_ratio = if st.stored_bytes > 0 { st.unique_bytes as f64 / st.stored_bytes as f64 } else { 0.0 };
    Ok(st)
}
