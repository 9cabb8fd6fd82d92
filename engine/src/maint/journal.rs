//! `check`'s reading of the journal (`docs/immutability.md`, "Tamper evidence"): the chain
//! must be whole — numbers without a gap, each entry naming the hash of the one before, no
//! shorter than the head this node verified last — and every snapshot it says was added
//! and no entry says was forgotten must still be there.

use crate::error::Result;
use mover_format::journal::{Head, JournalEvent};
use mover_format::manifest::Manifest;
use mover_format::{names, Repository, SnapshotId};
use std::collections::{HashMap, HashSet};
use tokio_util::sync::CancellationToken;

/// What the journal says, against the snapshots `check` listed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct JournalAudit {
    pub entries: usize,
    /// Problems: a gap, a broken link, a truncation, a snapshot deleted behind Mover's back.
    pub problems: Vec<String>,
    /// Not problems: snapshots written without a journal entry (older Movers, a crash
    /// before the entry), forgotten snapshots still present (a forget that did not finish).
    pub notes: Vec<String>,
}

struct Added {
    seq: u64,
    group: String,
    hostname: String,
}

/// Reads the journal and compares it with `snapshots` (listed before it was read). A
/// whole chain's head is remembered for the next check.
pub async fn audit(repo: &Repository, snapshots: &[(SnapshotId, Manifest)], cancel: &CancellationToken) -> Result<JournalAudit> {
    let loc = repo.location().to_string();
    let entries = repo.read_journal(cancel).await?;
    let mut out = JournalAudit { entries: entries.len(), ..Default::default() };
    let remembered = repo.remembered_journal_head();
    let mut chain_whole = true;
    let mut expect = 1u64;
    let mut prev: Option<String> = None;
    let mut last: Option<Head> = None;
    let mut links: HashMap<u64, String> = HashMap::new();
    let mut added: HashMap<SnapshotId, Added> = HashMap::new();
    let mut forgotten: HashMap<SnapshotId, u64> = HashMap::new();
    let mut since_ms: Option<u64> = None;
    for (seq, r) in entries {
        if seq != expect {
            out.problems.push(format!("journal of repository {loc}: entries {expect} to {} are missing (deleted behind Mover's back)", seq - 1));
            chain_whole = false;
            prev = None;
        }
        expect = seq + 1;
        match r {
            Err(e) => {
                out.problems.push(format!("{e:#}: a journal entry Mover did not write with this repository's key"));
                chain_whole = false;
                prev = None;
            }
            Ok((e, link)) => {
                let follows = match &prev {
                    Some(p) => &e.prev == p,
                    None => seq != 1 || e.prev.is_empty(),
                };
                if e.seq != seq || !follows {
                    out.problems
                        .push(format!("journal entry {seq} of repository {loc} does not follow entry {}: the chain was altered", seq.saturating_sub(1)));
                    chain_whole = false;
                }
                since_ms.get_or_insert(e.time_unix_ms);
                match e.event {
                    JournalEvent::Added { snapshot, group } => {
                        added.insert(snapshot, Added { seq, group, hostname: e.hostname });
                    }
                    JournalEvent::Forgotten { snapshots } => {
                        for s in snapshots {
                            forgotten.insert(s, seq);
                        }
                    }
                }
                links.insert(seq, link.clone());
                prev = Some(link.clone());
                last = Some(Head { seq, hash: link });
            }
        }
    }
    if let Some(r) = &remembered {
        match links.get(&r.seq) {
            Some(h) if *h != r.hash => {
                out.problems.push(format!("journal entry {} of repository {loc} changed since this node verified it", r.seq));
                chain_whole = false;
            }
            None if last.as_ref().is_none_or(|l| l.seq < r.seq) => {
                out.problems.push(format!(
                    "the journal of repository {loc} ends at entry {}, but this node verified it up to entry {}: entries at its end were deleted",
                    last.as_ref().map_or(0, |l| l.seq),
                    r.seq
                ));
                chain_whole = false;
            }
            _ => {}
        }
    }
    let listed: HashSet<SnapshotId> = snapshots.iter().map(|(id, _)| *id).collect();
    let mut gone: Vec<(&SnapshotId, &Added)> = added.iter().filter(|(id, _)| !listed.contains(id) && !forgotten.contains_key(id)).collect();
    if !gone.is_empty() {
        // Written after the listing, or forgotten since the journal was read (a forget
        // records itself before it deletes): look again before saying it was deleted.
        let later = repo.read_journal_after(last.as_ref().map_or(0, |l| l.seq), cancel).await?;
        let forgotten_later: HashSet<SnapshotId> = later
            .into_iter()
            .filter_map(|e| match e.event {
                JournalEvent::Forgotten { snapshots } => Some(snapshots),
                _ => None,
            })
            .flatten()
            .collect();
        let mut still = Vec::new();
        for (id, a) in gone {
            if forgotten_later.contains(id) || repo.head_object(&names::snapshot(id), cancel).await?.is_some() {
                continue;
            }
            still.push((id, a));
        }
        gone = still;
    }
    gone.sort_by_key(|(_, a)| a.seq);
    for (id, a) in gone {
        out.problems.push(format!(
            "snapshot {id} (group '{}', written by {}, journal entry {}) is gone from repository {loc}, and no forget recorded it: deleted behind Mover's back",
            a.group, a.hostname, a.seq
        ));
    }
    for (id, m) in snapshots {
        if let Some(seq) = forgotten.get(id) {
            out.notes
                .push(format!("snapshot {id} was forgotten (journal entry {seq}) but is still present: a forget that did not finish, or a manifest put back"));
        } else if !added.contains_key(id) && since_ms.is_some_and(|t| m.time_unix_ms >= t) {
            out.notes.push(format!("snapshot {id} is not in the journal: written by a Mover without one, or its entry was not written (a crash)"));
        }
    }
    if chain_whole {
        if let Some(l) = &last {
            if let Err(e) = repo.remember_journal_head(l) {
                tracing::warn!("remembering the journal head of {loc}: {e}");
            }
        }
    }
    Ok(out)
}
