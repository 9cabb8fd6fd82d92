//! The engine's one error type. Every error carries a [`ErrorKind`] that says what a caller
//! can do about it (fix the request, retry, give up), a message that names the object it
//! concerns ("restoring volume 'disk' of snapshot 3f9a…: chunk … in pack …: …"), and the
//! underlying cause as its `source`. The gRPC adapter maps kinds to status codes, transfer
//! records say whether a failure is worth retrying, and the CLI prints the whole chain.
//!
//! Library code never turns an error into a string on the way up: context is added with
//! [`ResultExt::context`], which keeps the kind.

use mover_format::storage::{ErrorKind as StoreKind, StorageError};
use mover_format::RepoError;
use std::error::Error as StdError;
use std::fmt;

/// What a caller can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed: a bad name, extents outside the volume, an unknown option.
    InvalidRequest,
    /// Something the request names does not exist: a snapshot, a source, a volume.
    NotFound,
    /// The request is well formed but the state does not allow it: a target too small or in
    /// use, a parent without the volume, a wrong password.
    Precondition,
    /// Another operation holds what this one needs (a gc lock, a lease): retry later.
    Conflict,
    /// May succeed if tried again: an unreachable or slow store or server, a timeout, a
    /// lease that could not be refreshed.
    Transient,
    /// Will fail again as it is: permission denied, an unsupported format.
    Permanent,
    /// Stored or served bytes fail verification: a corrupt chunk, pack, index or manifest.
    Corrupt,
    /// The caller (or a shutdown) cancelled the operation.
    Cancelled,
}

impl ErrorKind {
    /// True when running the same request again may succeed without anyone changing anything.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorKind::Transient | ErrorKind::Conflict)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Precondition => "precondition",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with a kind, a message naming the object, and its cause.
///
/// `{}` prints the message; `{:#}` prints the message and every cause, joined by `: `
/// (the form logs, transfer records and the CLI use).
pub struct Error {
    kind: ErrorKind,
    /// Empty when the whole message is the source's (an error converted as it is).
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Precondition, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    /// "`what` cancelled".
    pub fn cancelled(what: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Cancelled, format!("{what} cancelled"))
    }

    /// Wraps a cause of another type with a kind and a message.
    pub fn with_source(kind: ErrorKind, message: impl Into<String>, source: impl StdError + Send + Sync + 'static) -> Self {
        Self { kind, message: message.into(), source: Some(Box::new(source)) }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_cancelled(&self) -> bool {
        self.kind == ErrorKind::Cancelled
    }

    /// Prefixes the message with `ctx` ("ctx: message"); the kind stays.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = if self.message.is_empty() { ctx.to_string() } else { format!("{ctx}: {}", self.message) };
        self
    }

    /// The same error with another kind (when the caller knows better, e.g. a missing
    /// object that means corruption rather than a bad request).
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// The message and every cause, as `{:#}` prints them.
    pub fn report(&self) -> String {
        format!("{self:#}")
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {:#}", self.kind, self)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first: Option<&(dyn StdError + 'static)> = self.source.as_deref().map(|s| s as &(dyn StdError + 'static));
        if !f.alternate() {
            return match (self.message.is_empty(), first) {
                (true, Some(e)) => write!(f, "{e}"),
                _ => f.write_str(&self.message),
            };
        }
        // The whole chain. A cause whose text the line already ends with (a library that
        // puts its source's message into its own) is not printed twice.
        let mut line = self.message.clone();
        let mut next = first;
        while let Some(e) = next {
            let text = e.to_string();
            if !line.ends_with(&text) {
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&text);
            }
            next = e.source();
        }
        f.write_str(&line)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        let s = self.source.as_deref().map(|s| s as &(dyn StdError + 'static))?;
        // Without a message of our own, Display already printed the source's line.
        if self.message.is_empty() {
            s.source()
        } else {
            Some(s)
        }
    }
}

fn store_kind(k: StoreKind) -> ErrorKind {
    match k {
        StoreKind::NotFound => ErrorKind::NotFound,
        StoreKind::Transient => ErrorKind::Transient,
        StoreKind::Permanent => ErrorKind::Permanent,
        StoreKind::Denied => ErrorKind::Precondition,
        StoreKind::Cancelled => ErrorKind::Cancelled,
    }
}

impl From<StorageError> for Error {
    fn from(e: StorageError) -> Self {
        Self { kind: store_kind(e.kind), message: String::new(), source: Some(Box::new(e)) }
    }
}

impl From<RepoError> for Error {
    fn from(e: RepoError) -> Self {
        let kind = match &e {
            RepoError::Storage(s) => store_kind(s.kind),
            RepoError::Format { .. } | RepoError::BadChunk { .. } | RepoError::ChunkNotIndexed { .. } | RepoError::ConfigMismatch { .. } => ErrorKind::Corrupt,
            RepoError::NotInitialised { .. } | RepoError::AlreadyInitialised { .. } | RepoError::WrongPassword { .. } => ErrorKind::Precondition,
            RepoError::UnsupportedVersion { .. } | RepoError::Index { .. } => ErrorKind::Permanent,
            RepoError::NotFound { .. } => ErrorKind::NotFound,
            RepoError::Ambiguous { .. } | RepoError::Invalid(_) => ErrorKind::InvalidRequest,
            RepoError::Cancelled => ErrorKind::Cancelled,
        };
        Self { kind, message: String::new(), source: Some(Box::new(e)) }
    }
}

impl From<mover_format::FormatError> for Error {
    fn from(e: mover_format::FormatError) -> Self {
        Self { kind: ErrorKind::Corrupt, message: String::new(), source: Some(Box::new(e)) }
    }
}

/// The kind an I/O error suggests: missing → not found, interrupted or timed out →
/// transient, busy → conflict, everything else permanent.
pub fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => ErrorKind::NotFound,
        K::Interrupted | K::TimedOut | K::WouldBlock | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => ErrorKind::Transient,
        K::ResourceBusy => ErrorKind::Conflict,
        _ => ErrorKind::Permanent,
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self { kind: io_kind(&e), message: String::new(), source: Some(Box::new(e)) }
    }
}

impl From<nix::errno::Errno> for Error {
    fn from(e: nix::errno::Errno) -> Self {
        std::io::Error::from(e).into()
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        if e.is_cancelled() {
            Self::with_source(ErrorKind::Cancelled, "a task was cancelled", e)
        } else {
            Self::with_source(ErrorKind::Permanent, "a task failed", e)
        }
    }
}

/// Adds context to any result whose error converts into [`Error`], keeping its kind.
pub trait ResultExt<T> {
    fn context(self, ctx: impl fmt::Display) -> Result<T>;
    fn with_context<C: fmt::Display>(self, ctx: impl FnOnce() -> C) -> Result<T>;
    /// Converts the error with `kind` instead of the one its type suggests.
    fn kind(self, kind: ErrorKind) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, ctx: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(ctx))
    }
    fn with_context<C: fmt::Display>(self, ctx: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(ctx()))
    }
    fn kind(self, kind: ErrorKind) -> Result<T> {
        self.map_err(|e| e.into().with_kind(kind))
    }
}

/// Returns early with an [`Error`] of the given kind: `bail!(invalid, "volume '{n}' …")`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$kind(format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_kind_and_the_chain_prints_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e: Error = Err::<(), _>(io).context("opening source /x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "opening source /x");
        assert_eq!(format!("{e:#}"), "opening source /x: No such file");
        let e = e.context("volume 'disk'");
        assert_eq!(format!("{e:#}"), "volume 'disk': opening source /x: No such file");
        // Through anyhow at the binary edge: the same line.
        let a = anyhow::Error::new(e);
        assert_eq!(format!("{a:#}"), "volume 'disk': opening source /x: No such file");
    }

    #[test]
    fn converted_errors_print_their_own_message() {
        let r = RepoError::NotFound { what: "snapshot abcd".into(), location: "/r".into() };
        let e: Error = r.into();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "snapshot abcd in repository /r: not found");
        assert_eq!(format!("{e:#}"), "snapshot abcd in repository /r: not found");
        assert_eq!(format!("{:#}", anyhow::Error::new(e)), "snapshot abcd in repository /r: not found");
        assert!(Error::transient("x").kind().retryable());
        assert!(!Error::corrupt("x").kind().retryable());
    }
}
