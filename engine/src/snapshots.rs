//! Snapshots as callers name them: by id, unique prefix, or `latest` of a group — the one
//! definition of `latest` that backups (`--parent latest`), restores, exports and listings
//! share — and reading a stored volume's segment refs.

use crate::error::{Error, Result, ResultExt};
use mover_format::local_index::ChunkIndex;
use mover_format::manifest::{Manifest, VolumeEntry};
use mover_format::tree::{SegRefs, SegmentGroup};
use mover_format::{ChunkId, Repository, SnapshotId};
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

/// Every snapshot of `group`, oldest first.
pub async fn in_group(repo: &Repository, group: &str, cancel: &CancellationToken) -> Result<Vec<(SnapshotId, Manifest)>> {
    let ids = repo.group_snapshots(group, cancel).await?.into_iter().map(|(id, _)| id).collect();
    // Read again (kept copies): the group's own manifests, checked as always.
    Ok(repo.read_listed_snapshots(ids, cancel).await?.into_iter().filter(|(_, m)| m.group() == group).collect())
}

/// The newest snapshot of `group`, if it has any. `latest` never crosses groups. Reads one
/// manifest beyond those added since this handle last looked (one forgotten since the
/// listing is passed over for the one before it).
pub async fn latest(repo: &Repository, group: &str, cancel: &CancellationToken) -> Result<Option<(SnapshotId, Manifest)>> {
    for (id, _) in repo.group_snapshots(group, cancel).await?.into_iter().rev() {
        if let Some((id, m)) = repo.read_listed_snapshots(vec![id], cancel).await?.pop() {
            if m.group() == group {
                return Ok(Some((id, m)));
            }
        }
    }
    Ok(None)
}

/// Snapshots by group, each group oldest first.
pub fn by_group(snaps: Vec<(SnapshotId, Manifest)>) -> BTreeMap<String, Vec<(SnapshotId, Manifest)>> {
    let mut out: BTreeMap<String, Vec<(SnapshotId, Manifest)>> = BTreeMap::new();
    for (id, m) in snaps {
        out.entry(m.group()).or_default().push((id, m));
    }
    out
}

/// Volume `name` of snapshot `id`; not found names the volumes it has.
pub fn volume<'a>(id: &SnapshotId, m: &'a Manifest, name: &str) -> Result<&'a mover_format::manifest::VolumeEntry> {
    m.volume(name).ok_or_else(|| Error::not_found(format!("snapshot {id} has no volume named '{name}' (it has: {})", volume_names(m))))
}

/// A snapshot's volume names, for messages.
pub fn volume_names(m: &Manifest) -> String {
    m.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Refuses a request that names no snapshot, before anything is read or written.
pub fn check_spec(spec: &str) -> Result<()> {
    if spec.is_empty() {
        return Err(Error::invalid("snapshot: empty; give an id, a unique prefix or 'latest'"));
    }
    Ok(())
}

/// A snapshot named by a caller: an id, a unique prefix of at least 4 hex digits, or
/// `latest` — of `group` when one is given, else of the repository's only group.
pub async fn resolve(repo: &Repository, spec: &str, group: Option<&str>, cancel: &CancellationToken) -> Result<(SnapshotId, Manifest)> {
    check_spec(spec)?;
    if spec != "latest" {
        let id = repo.resolve_snapshot(spec, cancel).await?;
        let m = repo.read_snapshot(&id, cancel).await?;
        if let Some(g) = group {
            if m.group() != g {
                return Err(Error::invalid(format!("snapshot {id} belongs to group '{}', not '{g}'", m.group())));
            }
        }
        return Ok((id, m));
    }
    match group {
        Some(g) => latest(repo, g, cancel).await?.ok_or_else(|| Error::not_found(format!("group '{g}' has no snapshots in repository {}", repo.location()))),
        None => {
            let mut groups = by_group(repo.snapshots(cancel).await?);
            match groups.len() {
                0 => Err(Error::not_found(format!("repository {} has no snapshots", repo.location()))),
                1 => groups.pop_first().and_then(|(_, mut s)| s.pop()).ok_or_else(|| Error::not_found("no snapshots")),
                n => Err(Error::invalid(format!(
                    "'latest' is ambiguous: repository {} holds {n} groups ({}); name one (--group)",
                    repo.location(),
                    groups.keys().take(5).cloned().collect::<Vec<_>>().join(", ")
                ))),
            }
        }
    }
}

/// Reads a tree blob through the local index.
pub async fn load_blob(repo: &Repository, index: &dyn ChunkIndex, id: &ChunkId, what: &str, cancel: &CancellationToken) -> Result<Vec<u8>> {
    let loc = index.lookup(id)?.ok_or_else(|| Error::corrupt(format!("{what}: blob {id} is not in the index of repository {}", repo.location())))?;
    repo.read_blob(id, &loc, cancel).await.context(what)
}

/// The segment refs of a stored volume, in order (compact: a hole costs 4 bytes).
pub async fn load_refs(repo: &Repository, index: &dyn ChunkIndex, snap: &SnapshotId, vol: &VolumeEntry, cancel: &CancellationToken) -> Result<SegRefs> {
    use futures::StreamExt;
    let nseg = vol.size.div_ceil(vol.segment_size as u64);
    let mut refs = SegRefs::default();
    let what = format!("segment group of volume '{}' in snapshot {snap}", vol.name);
    // Several groups fetched at once (in order): a large volume has one per few GiB.
    let what_ = what.as_str();
    let mut groups = futures::stream::iter(vol.groups.clone())
        .map(move |g: ChunkId| async move {
            let b = load_blob(repo, index, &g, what_, cancel).await;
            (g, b)
        })
        .buffered(8);
    while let Some((g, b)) = groups.next().await {
        let b = b?;
        let group = SegmentGroup::decode(&b).with_context(|| format!("{what}: blob {g}"))?;
        if group.first_segment != refs.len() as u64 {
            return Err(Error::corrupt(format!("{what}: blob {g} starts at segment {}, expected {}", group.first_segment, refs.len())));
        }
        if refs.len() as u64 + group.segments.len() as u64 > nseg {
            return Err(Error::corrupt(format!("{what}: blob {g} lists segments past the volume's {nseg}")));
        }
        for r in group.segments {
            refs.push(r);
        }
    }
    if refs.len() as u64 != nseg {
        return Err(Error::corrupt(format!("volume '{}' in snapshot {snap}: {} segments recorded, size {} needs {nseg}", vol.name, refs.len(), vol.size)));
    }
    Ok(refs)
}
