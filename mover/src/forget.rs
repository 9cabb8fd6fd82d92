//! `mover forget`: retention policies over snapshot groups. Split into `plan` (pure, gives
//! `--dry-run`) and `execute` (deletes the manifests the plan removes). Data is freed by
//! garbage collection later, never here.

use crate::timeutil::civil_from_days;
use anyhow::{bail, Result};
use mover_format::manifest::Manifest;
use mover_format::{Repository, SnapshotId};
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
    /// The volumes (name=source) the group's snapshots hold.
    pub key: String,
    pub snapshots: Vec<Decision>,
}

/// Snapshots are grouped by their set of volumes (name and source): the disks of one VM.
fn group_key(m: &Manifest) -> String {
    let mut v: Vec<String> = m.volumes.iter().map(|v| format!("{}={}", v.name, v.source)).collect();
    v.sort();
    v.join(",")
}

fn buckets(ms: u64) -> [(&'static str, i64); 5] {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let (y, m, _) = civil_from_days(days);
    [("hourly", secs.div_euclid(3600)), ("daily", days), ("weekly", (days + 3).div_euclid(7)), ("monthly", y * 12 + m as i64), ("yearly", y)]
}

/// Decides, per group, what the policy keeps. Newest first within each group.
pub fn plan(snaps: &[(SnapshotId, Manifest)], p: &Policy) -> Result<Vec<Group>> {
    if p.is_empty() {
        bail!("no retention policy given (--keep-last, --keep-daily, … or --keep-tag): refusing to forget every snapshot");
    }
    let mut groups: BTreeMap<String, Vec<&(SnapshotId, Manifest)>> = BTreeMap::new();
    for s in snaps {
        groups.entry(group_key(&s.1)).or_default().push(s);
    }
    let mut out = Vec::new();
    for (key, mut list) in groups {
        list.sort_by(|a, b| (b.1.time_unix_ms, b.0).cmp(&(a.1.time_unix_ms, a.0)));
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
            decisions.push(Decision { id: *id, time_unix_ms: m.time_unix_ms, keep: !reasons.is_empty(), reasons });
        }
        out.push(Group { key, snapshots: decisions });
    }
    Ok(out)
}

/// Removes the manifests the plan removes (parked in a GC record, see [`crate::gc`]);
/// returns how many.
pub async fn execute(repo: &Repository, groups: &[Group], cancel: &CancellationToken) -> Result<usize> {
    let ids: Vec<SnapshotId> = groups.iter().flat_map(|g| g.snapshots.iter()).filter(|d| !d.keep).map(|d| d.id).collect();
    crate::gc::forget_snapshots(repo, &ids, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::manifest::{VolumeEntry, VolumeStats, MANIFEST_VERSION};

    fn snap(i: u8, hours: u64, vol: &str, tag: Option<&str>) -> (SnapshotId, Manifest) {
        let m = Manifest {
            version: MANIFEST_VERSION,
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
                change_source: "full".into(),
                change_base: None,
                stats: VolumeStats::default(),
            }],
            metadata: vec![],
            stats: VolumeStats::default(),
            duration_ms: 0,
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
        let g = plan(&s, &p).unwrap();
        assert_eq!(g.len(), 2);
        let a = g.iter().find(|g| g.key.starts_with("a=")).unwrap();
        let kept: Vec<u8> = a.snapshots.iter().filter(|d| d.keep).map(|d| d.id.0[0]).collect();
        // Newest two; the newest of each of the last three days; the tagged one.
        assert!(kept.contains(&15) && kept.contains(&14) && kept.contains(&1), "{kept:?}");
        assert!(kept.len() <= 6 && kept.len() >= 4, "{kept:?}");
        let b = g.iter().find(|g| g.key.starts_with("b=")).unwrap();
        assert!(b.snapshots.iter().all(|d| d.keep), "each group keeps its own last 2");
        assert!(plan(&s, &Policy::default()).is_err());
    }
}
