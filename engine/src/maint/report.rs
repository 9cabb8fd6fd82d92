//! What the repository can prove about itself: verify and drill results, kept in the
//! repository (`reports/`, sealed like everything else) so that every node and every
//! later `mover status` sees them, and the RPO/RTO report built from them and the
//! snapshots — per group: how old the newest snapshot is (RPO), the newest snapshot a
//! verify found intact, the newest one a drill restored, and how long restoring the newest
//! would take at the rate the last drill measured (RTO).

use super::check::{CheckReport, DamagedObject};
use super::drill::DrillReport;
use crate::error::{Result, ResultExt};
use mover_format::{Repository, SnapshotId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_util::sync::CancellationToken;

/// Reports kept of each kind; older ones are removed when a new one is written.
pub const KEEP_REPORTS: usize = 200;
/// Problems and damaged objects a verify report keeps (the count says how many there were).
const MAX_LISTED: usize = 1000;

pub const VERIFY: &str = "verify";
pub const DRILL: &str = "drill";

/// The result of a verify (`check`, structure and a share of the data).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyResult {
    pub time_unix_ms: u64,
    pub hostname: String,
    /// Share of the packs downloaded and verified (0: structure only).
    pub read_data_percent: u32,
    pub duration_s: f64,
    pub ok: bool,
    pub snapshots_checked: Vec<SnapshotId>,
    pub packs_read: usize,
    pub bytes_verified: u64,
    pub problems_total: usize,
    pub problems: Vec<String>,
    pub damaged: Vec<DamagedObject>,
    pub affected_snapshots: Vec<SnapshotId>,
}

impl VerifyResult {
    pub fn from_check(r: &CheckReport, read_data_percent: u32, duration_s: f64) -> Self {
        Self {
            time_unix_ms: mover_format::now_unix_ms(),
            hostname: mover_format::hostname(),
            read_data_percent,
            duration_s,
            ok: r.problems.is_empty(),
            snapshots_checked: r.checked.clone(),
            packs_read: r.packs_read,
            bytes_verified: r.bytes_verified,
            problems_total: r.problems.len(),
            problems: r.problems.iter().take(MAX_LISTED).cloned().collect(),
            damaged: r.damaged.iter().take(MAX_LISTED).cloned().collect(),
            affected_snapshots: r.affected_snapshots.clone(),
        }
    }
}

/// The result of a drill, passed or failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillResult {
    pub time_unix_ms: u64,
    pub hostname: String,
    pub snapshot_id: SnapshotId,
    pub group: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The drill's figures, when it passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<DrillReport>,
}

impl DrillResult {
    /// The result of a drill of `snapshot` (of `group`) that ended with `r`, as of now.
    pub fn of(snapshot: SnapshotId, group: String, r: &Result<DrillReport>) -> Self {
        Self {
            time_unix_ms: mover_format::now_unix_ms(),
            hostname: mover_format::hostname(),
            snapshot_id: snapshot,
            group,
            ok: r.is_ok(),
            error: r.as_ref().err().map(|e| format!("{e:#}")),
            report: r.as_ref().ok().cloned(),
        }
    }

    /// Bytes restored per second over every volume.
    pub fn bytes_per_s(&self) -> Option<f64> {
        let r = self.report.as_ref()?;
        let (bytes, secs) = r.volumes.iter().fold((0u64, 0f64), |(b, s), v| (b + v.size, s + v.restore_s));
        (secs > 0.0).then(|| bytes as f64 / secs)
    }
}

/// Writes a report and removes the oldest of its kind beyond [`KEEP_REPORTS`] (an
/// append-only node leaves them to gc, [`prune`]).
pub async fn record<T: Serialize>(repo: &Repository, kind: &str, value: &T, cancel: &CancellationToken) -> Result<String> {
    let name = repo.write_report(kind, value, cancel).await.with_context(|| format!("recording the {kind} result in {}", repo.location()))?;
    if repo.append_only().is_none() {
        if let Err(e) = prune(repo, Some(kind), cancel).await {
            tracing::warn!("removing old {kind} reports: {e:#}");
        }
    }
    Ok(name)
}

/// Removes the oldest reports of `kind` (every kind: `None`) beyond [`KEEP_REPORTS`];
/// returns how many.
pub async fn prune(repo: &Repository, kind: Option<&str>, cancel: &CancellationToken) -> Result<usize> {
    let all = repo.list_reports(cancel).await?;
    let mut by_kind: std::collections::BTreeMap<&str, Vec<&String>> = Default::default();
    for (n, _, k) in &all {
        if kind.is_none_or(|want| want == k.as_str()) {
            by_kind.entry(k.as_str()).or_default().push(n);
        }
    }
    let mut removed = 0;
    for mine in by_kind.values() {
        for old in mine.iter().take(mine.len().saturating_sub(KEEP_REPORTS)) {
            repo.delete_object(old, cancel).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The newest readable reports of `kind` among `all` (a listing, oldest first), newest
/// first, at most `n`, with their names; those in `known` are taken from there, not read.
/// Unreadable ones are skipped with a warning: a damaged report must not hide the others.
async fn newest<T: serde::de::DeserializeOwned + Send + Clone>(
    repo: &Repository,
    all: &[(String, u64, String)],
    kind: &str,
    n: usize,
    known: &HashMap<String, T>,
    cancel: &CancellationToken,
) -> Result<Vec<(String, T)>> {
    use futures::StreamExt;
    let names: Vec<String> = all.iter().rev().filter(|(_, _, k)| k == kind).take(n).map(|(name, _, _)| name.clone()).collect();
    let mut reads = futures::stream::iter(names)
        .map(|name| async move {
            match known.get(&name) {
                Some(v) => (Ok(v.clone()), name),
                None => (repo.read_report::<T>(&name, cancel).await, name),
            }
        })
        .buffered(16);
    let mut out = Vec::new();
    while let Some((r, name)) = reads.next().await {
        match r {
            Ok(v) => out.push((name, v)),
            Err(e) if e.is_cancelled() => return Err(e.into()),
            Err(e) => tracing::warn!("skipping report {name}: {e:#}"),
        }
    }
    Ok(out)
}

pub use mover_format::repo::SnapshotRow as SnapRow;

/// The reports the last status read, so that the next reads only those written since
/// (the snapshots' rows are kept by the repository handle: [`Repository::snapshot_rows`]).
#[derive(Debug, Default)]
pub struct StatusCache {
    verify: HashMap<String, VerifyResult>,
    drills: HashMap<String, DrillResult>,
}

/// What a refresh cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefreshCost {
    pub snapshots: usize,
    pub manifests_read: usize,
}

/// The RPO/RTO report of a repository.
pub async fn status(repo: &Repository, cancel: &CancellationToken) -> Result<RepoStatus> {
    Ok(refresh(repo, &mut StatusCache::default(), cancel).await?.0)
}

/// [`status`], reading only what changed since `cache` was last refreshed.
pub async fn refresh(repo: &Repository, cache: &mut StatusCache, cancel: &CancellationToken) -> Result<(RepoStatus, RefreshCost)> {
    let ((rows, manifests_read), reports) = tokio::try_join!(repo.snapshot_rows(cancel), repo.list_reports(cancel))?;
    let (verify, drills) = tokio::try_join!(
        newest::<VerifyResult>(repo, &reports, VERIFY, 1, &cache.verify, cancel),
        newest::<DrillResult>(repo, &reports, DRILL, KEEP_REPORTS, &cache.drills, cancel),
    )?;
    let cost = RefreshCost { snapshots: rows.len(), manifests_read };
    cache.verify = verify.iter().cloned().collect();
    cache.drills = drills.iter().cloned().collect();
    let st = build(repo.location(), mover_format::now_unix_ms(), rows, verify.into_iter().next().map(|x| x.1), drills.into_iter().map(|x| x.1).collect());
    Ok((st, cost))
}

/// Recovery points and times of one group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub snapshots: usize,
    pub newest_snapshot: SnapshotId,
    pub newest_time_unix_ms: u64,
    /// Age of the newest snapshot: the data lost if the protected thing failed now.
    pub rpo_seconds: f64,
    /// The newest snapshot the last verify covered and found intact.
    pub newest_verified: Option<SnapshotId>,
    pub verified_age_seconds: Option<f64>,
    /// The newest snapshot a drill restored and verified.
    pub newest_drilled: Option<SnapshotId>,
    pub drilled_age_seconds: Option<f64>,
    pub last_drill_unix_ms: Option<u64>,
    /// Restore rate the last passed drill of the group measured.
    pub drill_bytes_per_s: Option<f64>,
    /// The newest snapshot's size at that rate: the restore time to expect (RTO).
    pub projected_restore_seconds: Option<f64>,
    /// The last drill of the group failed.
    pub last_drill_failed: bool,
    /// The newest snapshot needs an object the last verify found damaged.
    pub newest_damaged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastVerify {
    pub time_unix_ms: u64,
    pub ok: bool,
    pub read_data_percent: u32,
    pub damaged_objects: usize,
    pub affected_snapshots: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepoStatus {
    pub repository: String,
    pub time_unix_ms: u64,
    pub last_verify: Option<LastVerify>,
    pub groups: Vec<GroupStatus>,
}

/// [`status`] from what was read (`snaps` oldest first, `drills` newest first).
pub fn build(location: &str, now_ms: u64, snaps: Vec<SnapRow>, verify: Option<VerifyResult>, drills: Vec<DrillResult>) -> RepoStatus {
    let age = |t: u64| now_ms.saturating_sub(t) as f64 / 1000.0;
    let checked: HashSet<SnapshotId> = verify.iter().flat_map(|v| v.snapshots_checked.iter().copied()).collect();
    let affected: HashSet<SnapshotId> = verify.iter().flat_map(|v| v.affected_snapshots.iter().copied()).collect();
    let time_of: HashMap<SnapshotId, u64> = snaps.iter().map(|r| (r.id, r.time_unix_ms)).collect();
    let mut by_group: BTreeMap<String, Vec<SnapRow>> = BTreeMap::new();
    for r in snaps {
        by_group.entry(r.group.clone()).or_default().push(r);
    }
    let mut groups = Vec::new();
    for (group, list) in by_group {
        let Some(nm) = list.last() else { continue };
        let newest = &nm.id;
        let verified = list.iter().rev().find(|r| checked.contains(&r.id) && !affected.contains(&r.id));
        let group_drills: Vec<&DrillResult> = drills.iter().filter(|d| d.group == group).collect();
        // The newest snapshot (still in the repository) a passed drill restored.
        let drilled = group_drills.iter().filter(|d| d.ok).filter_map(|d| time_of.get(&d.snapshot_id).map(|t| (d.snapshot_id, *t))).max_by_key(|(_, t)| *t);
        let last_ok = group_drills.iter().find(|d| d.ok);
        let rate = last_ok.and_then(|d| d.bytes_per_s());
        let size = nm.size;
        groups.push(GroupStatus {
            group: group.clone(),
            snapshots: list.len(),
            newest_snapshot: *newest,
            newest_time_unix_ms: nm.time_unix_ms,
            rpo_seconds: age(nm.time_unix_ms),
            newest_verified: verified.map(|r| r.id),
            verified_age_seconds: verified.map(|r| age(r.time_unix_ms)),
            newest_drilled: drilled.map(|(id, _)| id),
            drilled_age_seconds: drilled.map(|(_, t)| age(t)),
            last_drill_unix_ms: group_drills.first().map(|d| d.time_unix_ms),
            drill_bytes_per_s: rate,
            projected_restore_seconds: rate.map(|r| size as f64 / r),
            last_drill_failed: group_drills.first().is_some_and(|d| !d.ok),
            newest_damaged: affected.contains(newest),
        });
    }
    RepoStatus {
        repository: location.to_string(),
        time_unix_ms: now_ms,
        last_verify: verify.map(|v| LastVerify {
            time_unix_ms: v.time_unix_ms,
            ok: v.ok,
            read_data_percent: v.read_data_percent,
            damaged_objects: v.damaged.len(),
            affected_snapshots: v.affected_snapshots.len(),
        }),
        groups,
    }
}

/// The groups of a status, as given, with everything else summed into `other` — for
/// metrics whose labels must stay bounded. Returns `(label, statuses)`.
pub fn bounded_groups<'a>(st: &'a RepoStatus, wanted: &[String]) -> BTreeMap<String, Vec<&'a GroupStatus>> {
    let mut out: BTreeMap<String, Vec<&GroupStatus>> = BTreeMap::new();
    for g in &st.groups {
        let label = if wanted.contains(&g.group) { g.group.clone() } else { "other".to_string() };
        out.entry(label).or_default().push(g);
    }
    out
}
