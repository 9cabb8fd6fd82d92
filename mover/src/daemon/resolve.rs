//! Turns a volume reference from a request into a path on this node, refusing anything
//! outside the allowed roots (after resolving `..` and symlinks).

use super::config::DaemonConfig;
use std::path::{Path, PathBuf};

/// A rejected reference, with the gRPC status class it maps to.
#[derive(Debug)]
pub enum ResolveError {
    Invalid(String),
    NotFound(String),
}

fn under_roots(cfg: &DaemonConfig, p: &Path) -> bool {
    cfg.allowed_roots.iter().any(|r| {
        let r = std::fs::canonicalize(r).unwrap_or_else(|_| r.clone());
        p.starts_with(&r)
    })
}

/// An existing source (or existing restore target).
pub fn existing_path(cfg: &DaemonConfig, raw: &str, what: &str) -> Result<PathBuf, ResolveError> {
    if raw.is_empty() {
        return Err(ResolveError::Invalid(format!("{what}: empty path")));
    }
    let p = Path::new(raw);
    if !p.is_absolute() {
        return Err(ResolveError::Invalid(format!("{what} {raw}: path must be absolute")));
    }
    let canon = std::fs::canonicalize(p).map_err(|e| ResolveError::NotFound(format!("{what} {raw}: {e}")))?;
    if !under_roots(cfg, &canon) {
        return Err(ResolveError::Invalid(format!("{what} {raw} (resolves to {}) is outside the allowed roots", canon.display())));
    }
    Ok(canon)
}

/// A restore target that may not exist yet: its directory must exist under a root.
pub fn target_path(cfg: &DaemonConfig, raw: &str, what: &str) -> Result<PathBuf, ResolveError> {
    let p = Path::new(raw);
    if p.exists() {
        return existing_path(cfg, raw, what);
    }
    if !p.is_absolute() {
        return Err(ResolveError::Invalid(format!("{what} {raw}: path must be absolute")));
    }
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(ResolveError::Invalid(format!("{what} {raw}: not a file path")));
    };
    let dir = existing_path(cfg, &parent.display().to_string(), what)?;
    Ok(dir.join(name))
}

/// A pod's volume under the kubelet root: block mode
/// (`pods/<uid>/volumeDevices/<plugin>/<name>`) or filesystem mode
/// (`pods/<uid>/volumes/<plugin>/<name>/disk.img`, or `…/<name>/mount/disk.img` for CSI).
pub fn pod_volume(cfg: &DaemonConfig, uid: &str, name: &str, what: &str) -> Result<PathBuf, ResolveError> {
    let ok = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != "..";
    if !ok(uid) || !ok(name) {
        return Err(ResolveError::Invalid(format!("{what}: pod uid '{uid}' and volume name '{name}' must be plain names")));
    }
    let pod = cfg.kubelet_root.join("pods").join(uid);
    if !pod.is_dir() {
        return Err(ResolveError::NotFound(format!("{what}: pod {uid} has no directory under {}", cfg.kubelet_root.display())));
    }
    let mut candidates = Vec::new();
    for (sub, tails) in [("volumeDevices", vec![""]), ("volumes", vec!["disk.img", "mount/disk.img"])] {
        if let Ok(rd) = std::fs::read_dir(pod.join(sub)) {
            for plugin in rd.flatten() {
                for tail in &tails {
                    let c = if tail.is_empty() { plugin.path().join(name) } else { plugin.path().join(name).join(tail) };
                    if c.exists() {
                        candidates.push(c);
                    }
                }
            }
        }
    }
    match candidates.len() {
        0 => Err(ResolveError::NotFound(format!("{what}: volume '{name}' of pod {uid} has no block device or disk.img under {}", pod.display()))),
        1 => existing_path(cfg, &candidates[0].display().to_string(), what),
        _ => Err(ResolveError::Invalid(format!("{what}: volume '{name}' of pod {uid} is ambiguous ({} candidates)", candidates.len()))),
    }
}
