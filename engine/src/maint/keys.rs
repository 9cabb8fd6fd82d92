//! Passwords of a repository: key files that each wrap the same master key. Adding,
//! removing or changing one never touches data.

use crate::error::Result;
use mover_format::crypto::KdfParams;
use mover_format::storage::Storage;
use mover_format::{KeyId, Repository};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Changes the password of the key `repo` was opened with: adds a key file with the new
/// password, proves it opens the repository, then removes the old key file. Returns
/// `(old, new)`.
pub async fn passwd(
    repo: &Repository,
    storage: Arc<dyn Storage>,
    current: &[u8],
    new: &[u8],
    kdf: KdfParams,
    cancel: &CancellationToken,
) -> Result<(KeyId, KeyId)> {
    repo.require_deletes("changing a password (the old key file is removed)", cancel).await?;
    let new_id = repo.add_key(current, new, kdf, cancel).await?;
    let reopened = Repository::open(storage, new, cancel).await?;
    reopened.remove_key(&repo.key_id(), cancel).await?;
    Ok((repo.key_id(), new_id))
}
