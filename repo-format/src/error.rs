//! Errors of the format library. Every message names the object and the repository.

use crate::storage::StorageError;

/// A problem with bytes or parameters, before we know which object they came from.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
}

/// What can go wrong with a repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    // The cause is part of the message, so it is not also a `source()`: printing the
    // chain would otherwise say it twice.
    #[error("{object} in repository {location}: {cause}")]
    Format { object: String, location: String, cause: FormatError },
    #[error("repository {location} is not initialised (no config object); run `mover init` first")]
    NotInitialised { location: String },
    #[error("repository {location} already exists (it has a config object)")]
    AlreadyInitialised { location: String },
    #[error("repository {location} has format version {found}; this Mover reads version {supported}")]
    UnsupportedVersion { location: String, found: u32, supported: u32 },
    #[error("wrong password for repository {location}: no key file in keys/ opens with it")]
    WrongPassword { location: String },
    #[error("config of repository {location} does not match its key (tampered or from another repository)")]
    ConfigMismatch { location: String },
    #[error("{what} in repository {location}: not found")]
    NotFound { what: String, location: String },
    #[error("{what} in repository {location}: ambiguous prefix, matches {count} objects")]
    Ambiguous { what: String, location: String, count: usize },
    #[error("chunk {chunk} in repository {location}: not in the index")]
    ChunkNotIndexed { chunk: crate::ChunkId, location: String },
    #[error("chunk {chunk} from pack {pack} in repository {location}: {what}")]
    BadChunk { chunk: crate::ChunkId, pack: crate::PackId, location: String, what: String },
    #[error("local index {path}: {message}")]
    Index { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
}

impl RepoError {
    pub fn is_transient(&self) -> bool {
        matches!(self, RepoError::Storage(e) if e.is_transient())
    }
    /// The object asked for is not in the store.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RepoError::NotFound { .. }) || matches!(self, RepoError::Storage(e) if e.is_not_found())
    }
    pub fn is_cancelled(&self) -> bool {
        matches!(self, RepoError::Cancelled) || matches!(self, RepoError::Storage(e) if e.kind == crate::storage::ErrorKind::Cancelled)
    }
}
