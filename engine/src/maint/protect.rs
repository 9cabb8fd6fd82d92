//! `protect` / `unprotect`: a protected snapshot is never removed by `forget` — neither by
//! a policy nor by id — until its protection is removed. A protection is an object,
//! `protected/<snapshot id>` (`docs/repo-format.md`); removing it is a delete, which a
//! node with create-only credentials cannot do. Both hold the exclusive `gc` lock, as
//! `forget` does, so a snapshot is never forgotten between the check that it exists and
//! its protection.

use crate::error::{Error, Result};
use crate::lock::{self, Hold};
use mover_format::repo::Protection;
use mover_format::{Repository, SnapshotId};
use std::collections::HashSet;
use tokio_util::sync::CancellationToken;

/// What `protect` and `unprotect` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProtectOutcome {
    pub snapshot: SnapshotId,
    /// Protected after the call.
    pub protected: bool,
    /// The call changed the repository (`false`: it already was as asked).
    pub changed: bool,
    /// The protection in force (the first one stays when a snapshot is protected twice).
    pub protection: Option<Protection>,
}

/// Protects `id`. A snapshot that does not exist is refused and nothing is written.
pub async fn protect(repo: &Repository, id: &SnapshotId, note: &str, cancel: &CancellationToken) -> Result<ProtectOutcome> {
    lock::scope(repo, Hold::Exclusive("protect a snapshot"), cancel, |me| async move {
        match repo.read_snapshot(id, cancel).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {
                return Err(Error::not_found(format!("snapshot {id} does not exist in repository {}; nothing was protected", repo.location())))
            }
            Err(e) => return Err(e.into()),
        }
        let p = Protection { time_unix_ms: mover_format::now_unix_ms(), hostname: mover_format::hostname(), note: note.to_string() };
        let created = me.lease().commit("writing the snapshot's protection", async { Ok(repo.write_protection(id, &p, cancel).await?) }).await?;
        let protection = repo.read_protection(id, cancel).await?;
        Ok(ProtectOutcome { snapshot: *id, protected: true, changed: created, protection })
    })
    .await
}

/// Removes `id`'s protection; a snapshot without one is left as it is.
pub async fn unprotect(repo: &Repository, id: &SnapshotId, cancel: &CancellationToken) -> Result<ProtectOutcome> {
    repo.require_deletes("unprotect", cancel).await?;
    lock::scope(repo, Hold::Exclusive("unprotect a snapshot"), cancel, |me| async move {
        let had = repo.read_protection(id, cancel).await?;
        if had.is_some() {
            me.lease().commit("removing the snapshot's protection", async { Ok(repo.delete_protection(id, cancel).await?) }).await?;
        }
        Ok(ProtectOutcome { snapshot: *id, protected: false, changed: had.is_some(), protection: None })
    })
    .await
}

/// The protected snapshots.
pub async fn protected(repo: &Repository, cancel: &CancellationToken) -> Result<HashSet<SnapshotId>> {
    Ok(repo.list_protected(cancel).await?)
}
