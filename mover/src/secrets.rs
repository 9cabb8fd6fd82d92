//! Reading secrets and credentials from files: passwords, tokens, certificates. Each must
//! be a regular file (not a FIFO that blocks, not a device) of bounded size, and every
//! reader goes through here so that the CLI, the key commands and the daemon agree on the
//! bytes of a password.

use mover_engine::{Error, Result, ResultExt};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A password; zeroed when dropped, never printed.
pub type Password = zeroize::Zeroizing<Vec<u8>>;

/// Largest credential file read (a certificate chain, a token, a password).
pub const MAX_SECRET_FILE: u64 = 1 << 20;

/// Reads a small regular file (at most [`MAX_SECRET_FILE`] bytes); `what` names it.
pub fn read_small_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    let meta = f.metadata().with_context(|| format!("reading {what} {}", path.display()))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!("{what} {} is not a regular file", path.display())));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(Error::invalid(format!("{what} {} is {} bytes, more than the {MAX_SECRET_FILE} allowed", path.display(), meta.len())));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_SECRET_FILE + 1).read_to_end(&mut out).with_context(|| format!("reading {what} {}", path.display()))?;
    if out.len() as u64 > MAX_SECRET_FILE {
        return Err(Error::invalid(format!("{what} {} grew past {MAX_SECRET_FILE} bytes while read", path.display())));
    }
    Ok(out)
}

/// Reads a password file as bytes, without its trailing newline.
pub fn read_password_file(path: &Path, what: &str) -> Result<Password> {
    let s = Password::new(read_small_file(path, what)?);
    let end = s.iter().rposition(|&b| b != b'\n' && b != b'\r').map(|i| i + 1).unwrap_or(0);
    if end == 0 {
        return Err(Error::invalid(format!("{what} {} is empty", path.display())));
    }
    Ok(Password::new(s[..end].to_vec()))
}

/// A password from the environment variable `var`, if set and non-empty.
pub fn env_password(var: &str) -> Option<Password> {
    std::env::var(var).ok().filter(|p| !p.is_empty()).map(|p| Password::new(p.into_bytes()))
}

/// Creates a random password file (mode 0600) when missing: the embedded default
/// repository's.
pub fn ensure_password_file(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let pw = hex::encode(rand::random::<[u8; 24]>());
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating password file {}", path.display()))?;
    std::io::Write::write_all(&mut file, pw.as_bytes()).with_context(|| format!("writing password file {}", path.display()))?;
    Ok(())
}
