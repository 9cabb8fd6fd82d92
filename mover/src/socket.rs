//! Unix sockets the daemon and exports listen on, created so that nobody but the intended
//! users can ever connect: a stale socket is replaced (anything else at the path is
//! refused), the socket is bound under a restrictive umask, then given its group and mode.

use mover_engine::{Error, Result, ResultExt};
use std::path::Path;

/// Binds `path` (creating its directory) with permission bits `mode` and group `group`;
/// `what` names it in errors ("gRPC socket").
pub fn bind_unix(path: &Path, mode: u32, group: Option<u32>, what: &str) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(Error::precondition(format!("{} exists and is not a socket; refusing to replace it", path.display())));
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l.with_context(|| format!("binding {what} {}", path.display()))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(path, None, Some(g)).with_context(|| format!("giving {what} {} to group {g}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("setting the mode of {what} {}", path.display()))?;
    Ok(l)
}
