//! `forget`: retention policies over snapshot groups. Split into [`plan`] (pure, gives
//! `--dry-run`) and [`execute`], which parks the manifests the plan removes in a gc record
//! (they stay roots until every backup that may have started from one is gone) and deletes
//! them from `snapshots/`. Data is freed by `gc` later, never here.

use crate::error::{Error, Result, ResultExt};
use crate::lock::{self, Hold};
use crate::timeutil::civil_from_days;
use mover_format::manifest::Manifest;
use mover_format::pending::PendingDeletion;
use mover_format::{names, Repository, SnapshotId};
use std::collections::{BTreeMap, HashSet};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub last: usize,
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
    pub yearly: usize,
    /// `K=V`: snapshots with this tag are always kept.
    pub tags: Vec<(String, String)>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.last + self.hourly + self.daily + self.weekly + self.monthly + self.yearly == 0 && self.tags.is_empty()
    }
}

/// What the policy is applied to, one set of snapshots at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    /// The snapshot's group (what was protected): the default.
    #[default]
    Group,
    /// The host that took the snapshot.
    Host,
    /// The set of volume names.
    Volumes,
    /// All snapshots of the repository together.
    None,
}

impl std::str::FromStr for GroupBy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "group" => Ok(GroupBy::Group),
            "host" => Ok(GroupBy::Host),
            "volumes" => Ok(GroupBy::Volumes),
            "none" => Ok(GroupBy::None),
            _ => Err(Error::invalid(format!("--group-by '{s}': use group, host, volumes or none"))),
        }
    }
}

impl GroupBy {
    fn key(self, m: &Manifest) -> String {
        match self {
            GroupBy::Group => m.group(),
            GroupBy::Host => format!("host {}", m.hostname),
            GroupBy::Volumes => {
                let mut v: Vec<&str> = m.volumes.iter().map(|v| v.name.as_str()).collect();
                v.sort_unstable();
                format!("volumes {}", v.join(","))
            }
            GroupBy::None => "all snapshots".into(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    pub id: SnapshotId,
    pub time_unix_ms: u64,
    pub keep: bool,
    /// Which rules keep it (empty when removed).
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Group {
    /// What the snapshots have in common (their group, by default).
    pub key: String,
    pub snapshots: Vec<Decision>,
}

fn buckets(ms: u64) -> [(&'static str, i64); 5] {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let (y, m, _) = civil_from_days(days);
    [("hourly", secs.div_euclid(3600)), ("daily", days), ("weekly", (days + 3).div_euclid(7)), ("monthly", y * 12 + m as i64), ("yearly", y)]
}

/// Decides, per group, what the policy keeps. Newest first within each group.
pub fn plan(snaps: &[(SnapshotId, Manifest)], p: &Policy, by: GroupBy, protected: &HashSet<SnapshotId>) -> Result<Vec<Group>> {
    if p.is_empty() {
        return Err(Error::invalid("no retention policy given (--keep-last, --keep-daily, … or --keep-tag): refusing to forget every snapshot"));
    }
    let mut groups: BTreeMap<String, Vec<&(SnapshotId, Manifest)>> = BTreeMap::new();
    for s in snaps {
        groups.entry(by.key(&s.1)).or_default().push(s);
    }
    let mut out = Vec::new();
    for (key, mut list) in groups {
        list.sort_by_key(|s| std::cmp::Reverse((s.1.time_unix_ms, s.0)));
        let limits = [("hourly", p.hourly), ("daily", p.daily), ("weekly", p.weekly), ("monthly", p.monthly), ("yearly", p.yearly)];
        let mut seen: Vec<HashSet<i64>> = vec![HashSet::new(); limits.len()];
        let mut decisions = Vec::new();
        for (i, (id, m)) in list.iter().map(|s| (&s.0, &s.1)).enumerate() {
            let mut reasons = Vec::new();
            if i < p.last {
                reasons.push(format!("last {}", p.last));
            }
            for (k, ((name, bucket), (_, limit))) in buckets(m.time_unix_ms).iter().zip(limits.iter()).enumerate() {
                if *limit > 0 && seen[k].len() < *limit && seen[k].insert(*bucket) {
                    reasons.push(format!("{name} {limit}"));
                }
            }
            for (tk, tv) in &p.tags {
                if m.tags.get(tk) == Some(tv) {
                    reasons.push(format!("tag {tk}={tv}"));
                }
            }
            if protected.contains(id) {
                reasons.push("protected".into());
            }
            decisions.push(Decision { id: *id, time_unix_ms: m.time_unix_ms, keep: !reasons.is_empty(), reasons });
        }
        out.push(Group { key, snapshots: decisions });
    }
    Ok(out)
}

/// Removes the manifests the plan removes; returns how many. One protected since the plan
/// was made is kept.
pub async fn execute(repo: &Repository, groups: &[Group], cancel: &CancellationToken) -> Result<usize> {
    let ids: Vec<SnapshotId> = groups.iter().flat_map(|g| g.snapshots.iter()).filter(|d| !d.keep).map(|d| d.id).collect();
    forget(repo, &ids, Protected::Keep, cancel).await
}

/// What [`forget`] does with a protected snapshot among those it is asked to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protected {
    /// Refuse the whole request, removing nothing (asked by id: the operator meant it).
    Refuse,
    /// Keep it, remove the others (a policy: protection is one more reason to keep).
    Keep,
}

/// Parks manifests in a gc record (under the `gc` lock) and deletes them from `snapshots/`.
/// They stay roots for gc until every lock live now is gone (`docs/gc.md`). A protected
/// snapshot among them refuses the whole request.
pub async fn forget_snapshots(repo: &Repository, ids: &[SnapshotId], cancel: &CancellationToken) -> Result<usize> {
    forget(repo, ids, Protected::Refuse, cancel).await
}

/// [`forget_snapshots`], with a choice for protected snapshots.
pub async fn forget(repo: &Repository, ids: &[SnapshotId], on_protected: Protected, cancel: &CancellationToken) -> Result<usize> {
    if ids.is_empty() {
        return Ok(0);
    }
    repo.require_deletes("forget", cancel).await?;
    lock::scope(repo, Hold::Exclusive("forget snapshots"), cancel, |me| async move {
        // Under the lock `protect` also takes: a protection written before is seen here.
        let protected = repo.list_protected(cancel).await?;
        let hit: Vec<&SnapshotId> = ids.iter().filter(|id| protected.contains(id)).collect();
        if !hit.is_empty() && on_protected == Protected::Refuse {
            let list: Vec<String> = hit.iter().map(|id| id.to_hex()).collect();
            return Err(Error::precondition(format!(
                "snapshot {} is protected (`mover unprotect ID` first, with the maintenance credentials); nothing was forgotten",
                list.join(", ")
            )));
        }
        let ids: Vec<SnapshotId> = ids.iter().filter(|id| !protected.contains(id)).copied().collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let ids = &ids[..];
        // The journal first: a snapshot is never missing without an entry saying it was
        // forgotten (`docs/immutability.md`); a failure here changes nothing.
        for part in ids.chunks(mover_format::journal::FORGOTTEN_PER_ENTRY) {
            let event = mover_format::journal::JournalEvent::Forgotten { snapshots: part.to_vec() };
            repo.journal_append(event, cancel).await.context("recording the forget in the repository's journal")?;
        }
        let mut forgotten = Vec::new();
        for id in ids {
            let bytes = repo.get_object(&names::snapshot(id), cancel).await.with_context(|| format!("reading snapshot {id} to forget it"))?;
            forgotten.push((*id, bytes.to_vec()));
        }
        let lease = me.lease();
        let (record_id, created_ms) = super::gc::new_record_id();
        let record = PendingDeletion { created_ms, forgotten, ..Default::default() };
        lease.commit("writing the gc record of forgotten snapshots", async { Ok(repo.write_pending(&record_id, &record, cancel).await?) }).await?;
        let names: Vec<String> = ids.iter().map(names::snapshot).collect();
        super::gc::delete_objects(repo, &names, &lease, "deleting forgotten snapshots", cancel).await?;
        let live = super::gc::live_locks(repo, &me, cancel).await?;
        let ready = super::gc::ready_now(&live);
        lease.commit("writing the gc record's ready marker", async { Ok(repo.write_ready(&record_id, &ready, cancel).await?) }).await?;
        Ok::<usize, Error>(ids.len())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::manifest::{VolumeEntry, VolumeStats, MANIFEST_VERSION};

    fn snap(i: u8, hours: u64, vol: &str, tag: Option<&str>) -> (SnapshotId, Manifest) {
        let m = Manifest {
            version: MANIFEST_VERSION,
            group: None,
            time_unix_ms: 1_790_000_000_000 + hours * 3_600_000,
            hostname: "h".into(),
            tags: tag.map(|t| [("keep".to_string(), t.to_string())].into()).unwrap_or_default(),
            parent: None,
            volumes: vec![VolumeEntry {
                name: vol.into(),
                size: 1,
                segment_size: 1,
                groups: vec![],
                source: "/dev/x".into(),
                change_source: mover_format::manifest::ChangeSource::Full,
                change_base: None,
                change_fallback: None,
                trusted_run: 0,
                stats: VolumeStats::default(),
            }],
            metadata: vec![],
            stats: VolumeStats::default(),
            duration_ms: 0,
            origin: None,
        };
        (SnapshotId([i; 32]), m)
    }

    #[test]
    fn keep_last_daily_and_tags_per_group() {
        // Group "a": one snapshot every 6 hours for 4 days; group "b": two snapshots.
        let mut s: Vec<_> = (0..16u8).map(|i| snap(i, i as u64 * 6, "a", if i == 1 { Some("yes") } else { None })).collect();
        s.push(snap(100, 0, "b", None));
        s.push(snap(101, 1, "b", None));
        let p = Policy { last: 2, daily: 3, tags: vec![("keep".into(), "yes".into())], ..Default::default() };
        let g = plan(&s, &p, GroupBy::Volumes, &HashSet::new()).unwrap();
        assert_eq!(g.len(), 2);
        let a = g.iter().find(|g| g.key == "volumes a").unwrap();
        let kept: Vec<u8> = a.snapshots.iter().filter(|d| d.keep).map(|d| d.id.0[0]).collect();
        // Newest two; the newest of each of the last three days; the tagged one.
        assert!(kept.contains(&15) && kept.contains(&14) && kept.contains(&1), "{kept:?}");
        assert!(kept.len() <= 6 && kept.len() >= 4, "{kept:?}");
        let b = g.iter().find(|g| g.key == "volumes b").unwrap();
        assert!(b.snapshots.iter().all(|d| d.keep), "each group keeps its own last 2");
        assert!(plan(&s, &Policy::default(), GroupBy::Group, &HashSet::new()).is_err());
    }
}
