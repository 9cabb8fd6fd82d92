//! Files and block devices named by a request: resolved once, checked on the open
//! descriptor, and handed to the job as that descriptor — never opened by path again.
//!
//! - [`PathPolicy::Operator`] (the CLI): the operator's own paths, as given.
//! - [`PathPolicy::Confined`] (the daemon): only beneath configured roots, resolved with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`. A symbolic link is followed only when
//!   it stays beneath its root *and* leads to a block device (`/dev/disk/by-id/…`, the
//!   kubelet's `volumeDevices` entries): tenants control what is inside their filesystem
//!   volumes, symlinks included, and must not reach anything else through them.
//!
//! Every path is first opened `O_PATH` (which opens nothing: a FIFO does not block, a
//! device is not touched), its type checked with `fstat`, and only a block device or a
//! regular file is then reopened for I/O through `/proc/self/fd/N` — the same inode, no
//! path resolved again, so a swap after the check changes nothing.

use mover_engine::device::{self, Kind};
use mover_engine::{Error, ErrorKind, Result};
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// How request paths are resolved.
#[derive(Debug, Clone)]
pub enum PathPolicy {
    /// The CLI: paths as the operator gives them.
    Operator,
    /// The daemon: beneath allowed roots only.
    Confined(Confinement),
}

#[derive(Debug, Clone)]
pub struct Confinement {
    /// Sources and restore targets must lie beneath one of these (absolute, canonical).
    pub roots: Vec<PathBuf>,
    /// Where pod volumes are found (`pods/<uid>/…`).
    pub kubelet_root: PathBuf,
}

/// A resolved, type-checked path, still `O_PATH`.
pub struct Resolved {
    fd: OwnedFd,
    pub label: String,
    pub kind: Kind,
    stat: FileStat,
}

/// A volume opened for reading.
pub struct OpenedSource {
    pub file: File,
    pub label: String,
    pub kind: Kind,
    pub size: u64,
}

/// A restore target opened for writing: a block device held exclusively, or a regular
/// file no other process has open.
pub struct OpenedTarget {
    pub file: File,
    pub label: String,
    pub kind: Kind,
    /// Created by this open, or empty.
    pub fresh: bool,
    /// A file this open created: it lies under a temporary name until [`PendingName::commit`].
    pub pending: Option<PendingName>,
}

/// A restore target created under a temporary name (`.<name>.mover-<random>`) beside its
/// real one, so that the real name appears only once the file is byte-complete; dropped
/// without a commit (a failed or cancelled restore), the temporary file is removed.
pub struct PendingName {
    dir: OwnedFd,
    tmp: PathBuf,
    name: PathBuf,
    label: String,
    done: bool,
}

impl PendingName {
    /// Gives the file its real name; refused when something took that name meanwhile.
    pub fn commit(mut self) -> Result<()> {
        nix::fcntl::renameat2(&self.dir, &self.tmp, &self.dir, &self.name, nix::fcntl::RenameFlags::RENAME_NOREPLACE)
            .map_err(|e| errno_err(e, "naming the restored file (from its temporary name)", &self.label))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PendingName {
    fn drop(&mut self) {
        if !self.done {
            let _ = nix::unistd::unlinkat(&self.dir, &self.tmp, nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
}

fn describe_type(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFREG => "a regular file",
        _ => "not a regular file",
    }
}

fn kind_of(st: &FileStat) -> Option<Kind> {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFBLK => Some(Kind::BlockDevice),
        SFlag::S_IFREG => Some(Kind::File),
        _ => None,
    }
}

fn errno_err(e: Errno, what: &str, label: &str) -> Error {
    let kind = match e {
        Errno::ENOENT | Errno::ENOTDIR => ErrorKind::NotFound,
        Errno::EBUSY => ErrorKind::Precondition,
        Errno::EACCES | Errno::EPERM => ErrorKind::Precondition,
        _ => ErrorKind::Permanent,
    };
    Error::with_source(kind, format!("{what} {label}"), std::io::Error::from(e))
}

impl Resolved {
    fn new(fd: OwnedFd, label: String, what: &str) -> Result<Self> {
        let stat = fstat(&fd).map_err(|e| errno_err(e, what, &label))?;
        let kind =
            kind_of(&stat).ok_or_else(|| Error::invalid(format!("{what} {label} is {}: neither a block device nor a regular file", describe_type(&stat))))?;
        Ok(Self { fd, label, kind, stat })
    }

    /// Reopens the checked inode for I/O (through `/proc/self/fd`: no path resolved).
    fn reopen(&self, flags: OFlag, what: &str) -> Result<File> {
        let p = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        let fd = nix::fcntl::open(p.as_str(), flags | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| errno_err(e, &format!("opening {what}"), &self.label))?;
        let f = File::from(fd);
        // The same inode as checked, or nothing (guards against a missing /proc).
        let st = fstat(&f).map_err(|e| errno_err(e, what, &self.label))?;
        if (st.st_dev, st.st_ino) != (self.stat.st_dev, self.stat.st_ino) {
            return Err(Error::permanent(format!("{what} {}: reopening the checked descriptor gave another file", self.label)));
        }
        Ok(f)
    }

    pub fn stat(&self) -> &FileStat {
        &self.stat
    }
}

fn o_path() -> OFlag {
    OFlag::O_PATH | OFlag::O_CLOEXEC
}

/// `openat2` beneath `dir`: no symlinks; or, when a symlink is in the way, following it
/// only if it stays beneath `dir` and leads to a block device. `ENOENT` is returned as is
/// for the caller to decide.
fn beneath(dir: &OwnedFd, rel: &Path, label: &str, what: &str) -> std::result::Result<Resolved, (Errno, Error)> {
    let strict = OpenHow::new().flags(o_path()).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let outside = || Error::invalid(format!("{what} {label} is outside the allowed roots (it resolves outside them)"));
    match openat2(dir, rel, strict) {
        Ok(fd) => Resolved::new(fd, label.to_string(), what).map_err(|e| (Errno::UnknownErrno, e)),
        Err(Errno::ELOOP) => {
            let follow = OpenHow::new().flags(o_path()).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match openat2(dir, rel, follow) {
                Ok(fd) => {
                    let r = Resolved::new(fd, label.to_string(), what).map_err(|e| (Errno::UnknownErrno, e))?;
                    if r.kind != Kind::BlockDevice {
                        return Err((
                            Errno::ELOOP,
                            Error::invalid(format!(
                                "{what} {label} is reached through a symbolic link; only block devices may be (a volume's files are never followed out of it)"
                            )),
                        ));
                    }
                    Ok(r)
                }
                Err(Errno::EXDEV) => Err((Errno::EXDEV, outside())),
                Err(e) => Err((e, errno_err(e, what, label))),
            }
        }
        Err(Errno::EXDEV) => Err((Errno::EXDEV, outside())),
        Err(e) => Err((e, errno_err(e, what, label))),
    }
}

impl Confinement {
    /// The root `p` lies beneath (lexically) and the rest of the path.
    fn split<'a>(&'a self, p: &'a Path, what: &str) -> Result<(&'a Path, PathBuf)> {
        let raw = p.display().to_string();
        if !p.is_absolute() {
            return Err(Error::invalid(format!("{what} {raw}: path must be absolute")));
        }
        for r in &self.roots {
            if let Ok(rest) = p.strip_prefix(r) {
                if rest.as_os_str().is_empty() {
                    return Err(Error::invalid(format!("{what} {raw} is an allowed root itself, not a volume")));
                }
                return Ok((r, rest.to_path_buf()));
            }
        }
        Err(Error::invalid(format!("{what} {raw} is outside the allowed roots")))
    }

    fn open_root(root: &Path) -> Result<OwnedFd> {
        nix::fcntl::open(root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| errno_err(e, "allowed root", &root.display().to_string()))
    }

    /// An existing file or device beneath the roots.
    pub fn resolve(&self, p: &Path, what: &str) -> Result<Resolved> {
        let (root, rel) = self.split(p, what)?;
        let dir = Self::open_root(root)?;
        beneath(&dir, &rel, &p.display().to_string(), what).map_err(|(_, e)| e)
    }

    /// A pod's volume under the kubelet root: block mode (`pods/<uid>/volumeDevices/<plugin>/<name>`,
    /// the kubelet's entry for the device) or filesystem mode
    /// (`pods/<uid>/volumes/<plugin>/<name>/disk.img`, or `…/<name>/mount/disk.img` for CSI).
    pub fn pod_volume(&self, uid: &str, name: &str, what: &str) -> Result<Resolved> {
        let plain = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != ".." && s.len() <= 253;
        if !plain(uid) || !plain(name) {
            return Err(Error::invalid(format!("{what}: pod uid '{uid}' and volume name '{name}' must be plain names")));
        }
        let kube = Self::open_root(&self.kubelet_root)?;
        let pod_rel = Path::new("pods").join(uid);
        let pod_label = self.kubelet_root.join(&pod_rel).display().to_string();
        let dir_how = || OpenHow::new().flags(o_path() | OFlag::O_DIRECTORY).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let pod = match openat2(&kube, &pod_rel, dir_how()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(Error::not_found(format!("{what}: pod {uid} has no directory under {}", self.kubelet_root.display()))),
            Err(e) => return Err(errno_err(e, what, &pod_label)),
        };
        let mut found: Vec<Resolved> = Vec::new();
        // Block mode: the kubelet's entry (a device node, or the kubelet's symlink to one).
        for plugin in list_dir(&pod, "volumeDevices") {
            let rel = Path::new("volumeDevices").join(&plugin);
            let Ok(pdir) = openat2(&pod, &rel, dir_how()) else { continue };
            let label = format!("{pod_label}/volumeDevices/{plugin}/{name}");
            if let Some(r) = self.kubelet_device(&pdir, name, &label, what)? {
                found.push(r);
            }
        }
        // Filesystem mode: disk.img inside the volume, never through a symlink.
        for plugin in list_dir(&pod, "volumes") {
            for tail in ["", "mount"] {
                let vdir_rel = Path::new("volumes").join(&plugin).join(name).join(tail);
                let Ok(vdir) = openat2(&pod, &vdir_rel, dir_how()) else { continue };
                let label = format!("{pod_label}/{}/disk.img", vdir_rel.display()).replace("//", "/");
                match beneath(&vdir, Path::new("disk.img"), &label, what) {
                    Ok(r) => {
                        let vst = fstat(&vdir).map_err(|e| errno_err(e, what, &label))?;
                        check_volume_file(&r, &vst, what)?;
                        found.push(r);
                    }
                    Err((Errno::ENOENT, _)) => {}
                    Err((_, e)) => return Err(e),
                }
            }
        }
        match found.len() {
            0 => Err(Error::not_found(format!("{what}: volume '{name}' of pod {uid} has no block device or disk.img under {pod_label}"))),
            1 => Ok(found.remove(0)),
            n => Err(Error::invalid(format!("{what}: volume '{name}' of pod {uid} is ambiguous ({n} candidates)"))),
        }
    }

    /// The kubelet's `volumeDevices` entry `name` in `dir`: a block device node, or a
    /// symlink the kubelet made to one (beneath an allowed root). `None` when absent.
    fn kubelet_device(&self, dir: &OwnedFd, name: &str, label: &str, what: &str) -> Result<Option<Resolved>> {
        let target = match nix::fcntl::readlinkat(dir, name) {
            Ok(t) => PathBuf::from(t),
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::EINVAL) => {
                // Not a symlink: the entry itself must be a block device.
                let how = OpenHow::new().flags(o_path()).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
                let fd = openat2(dir, name, how).map_err(|e| errno_err(e, what, label))?;
                let r = Resolved::new(fd, label.to_string(), what)?;
                if r.kind != Kind::BlockDevice {
                    return Err(Error::invalid(format!("{what} {label}: a volumeDevices entry that is not a block device")));
                }
                return Ok(Some(r));
            }
            Err(e) => return Err(errno_err(e, what, label)),
        };
        if !target.is_absolute() || target.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(Error::invalid(format!("{what} {label}: the kubelet's link points to {}, not a plain absolute path", target.display())));
        }
        let r = self.resolve(&target, what).map_err(|e| e.context(format!("{what} {label} (a link to {})", target.display())))?;
        if r.kind != Kind::BlockDevice {
            return Err(Error::invalid(format!("{what} {label}: links to {}, which is not a block device", target.display())));
        }
        Ok(Some(Resolved { label: label.to_string(), ..r }))
    }

    /// A restore target beneath the roots: an existing device or file, or a new file in an
    /// existing directory (created here, never through a symlink).
    fn target(&self, p: &Path, what: &str) -> Result<(Option<Resolved>, Option<(File, PendingName)>)> {
        let (root, rel) = self.split(p, what)?;
        let dir = Self::open_root(root)?;
        let label = p.display().to_string();
        match beneath(&dir, &rel, &label, what) {
            Ok(r) => Ok((Some(r), None)),
            Err((Errno::ENOENT, e)) => {
                let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else { return Err(e) };
                let how = OpenHow::new().flags(o_path() | OFlag::O_DIRECTORY).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
                let parent_rel = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
                let pdir = openat2(&dir, parent_rel, how).map_err(|e| errno_err(e, &format!("{what}: directory of"), &label))?;
                Ok((None, Some(create_new(pdir, Path::new(name), &label, what)?)))
            }
            Err((_, e)) => Err(e),
        }
    }
}

/// Names in the subdirectory `sub` of `dir` (empty when it is absent).
fn list_dir(dir: &OwnedFd, sub: &str) -> Vec<String> {
    let how =
        OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let Ok(fd) = openat2(dir, sub, how) else { return Vec::new() };
    let Ok(mut d) = nix::dir::Dir::from_fd(fd) else { return Vec::new() };
    let mut out: Vec<String> = d.iter().flatten().filter_map(|e| e.file_name().to_str().ok().map(String::from)).filter(|n| n != "." && n != "..").collect();
    out.sort();
    out
}

/// A KubeVirt `disk.img` must belong to its volume: a regular file on the volume's
/// filesystem with no other name (a hard link would let a volume name a file of the node).
fn check_volume_file(r: &Resolved, volume_dir: &FileStat, what: &str) -> Result<()> {
    if r.kind != Kind::File {
        return Err(Error::invalid(format!("{what} {}: disk.img must be a regular file", r.label)));
    }
    if r.stat.st_dev != volume_dir.st_dev {
        return Err(Error::invalid(format!("{what} {}: disk.img lies on another filesystem than its volume", r.label)));
    }
    if r.stat.st_nlink != 1 {
        return Err(Error::invalid(format!("{what} {}: disk.img has {} names (hard links); refusing a file the volume may not own", r.label, r.stat.st_nlink)));
    }
    Ok(())
}

/// Creates `name` in `dir` — under a temporary name first (see [`PendingName`]); refused
/// when `name` exists by then.
fn create_new(dir: OwnedFd, name: &Path, label: &str, what: &str) -> Result<(File, PendingName)> {
    let tmp = PathBuf::from(format!(".{}.mover-{}", name.display(), hex::encode(rand::random::<[u8; 6]>())));
    let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(&dir, &tmp, flags, Mode::from_bits_truncate(0o600)).map_err(|e| errno_err(e, &format!("creating {what}"), label))?;
    let pending = PendingName { dir, tmp, name: name.to_path_buf(), label: label.to_string(), done: false };
    Ok((File::from(fd), pending))
}

/// A unix socket resolved beneath the roots (for an NBD server), kept `O_PATH`: connect to
/// it through [`SocketPath::proc_path`], which names this inode and nothing else.
pub struct SocketPath {
    fd: OwnedFd,
    pub label: String,
}

impl SocketPath {
    pub fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }
}

impl PathPolicy {
    /// Resolves a unix socket path: beneath the roots without symlinks when confined.
    pub fn resolve_socket(&self, p: &Path, what: &str) -> Result<Option<SocketPath>> {
        let PathPolicy::Confined(c) = self else { return Ok(None) };
        let (root, rel) = c.split(p, what)?;
        let dir = Confinement::open_root(root)?;
        let label = p.display().to_string();
        let how = OpenHow::new().flags(o_path()).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = match openat2(&dir, &rel, how) {
            Ok(fd) => fd,
            Err(Errno::EXDEV) => return Err(Error::invalid(format!("{what} {label} is outside the allowed roots"))),
            Err(Errno::ELOOP) => return Err(Error::invalid(format!("{what} {label} is reached through a symbolic link"))),
            Err(e) => return Err(errno_err(e, what, &label)),
        };
        let st = fstat(&fd).map_err(|e| errno_err(e, what, &label))?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFSOCK {
            return Err(Error::invalid(format!("{what} {label} is {}, not a unix socket", describe_type(&st))));
        }
        Ok(Some(SocketPath { fd, label }))
    }

    /// Resolves and type-checks an existing source or target path.
    pub fn resolve(&self, p: &Path, what: &str) -> Result<Resolved> {
        match self {
            PathPolicy::Confined(c) => c.resolve(p, what),
            PathPolicy::Operator => {
                let label = p.display().to_string();
                let fd = nix::fcntl::open(p, o_path(), Mode::empty()).map_err(|e| errno_err(e, &format!("opening {what}"), &label))?;
                Resolved::new(fd, label, what)
            }
        }
    }

    /// Opens a source for reading.
    pub fn open_source(&self, r: Resolved, what: &str) -> Result<OpenedSource> {
        let file = r.reopen(OFlag::O_RDONLY, what)?;
        let (kind, size) = device::inspect(&r.label, &file)?;
        Ok(OpenedSource { file, label: r.label, kind, size })
    }

    /// Opens a restore target: an existing block device exclusively (refused while mounted
    /// or held by another opener), an existing regular file that no other process has open,
    /// or a new file. Nothing is written here.
    pub fn open_target(&self, p: &Path, what: &str) -> Result<OpenedTarget> {
        let (existing, created) = match self {
            PathPolicy::Confined(c) => c.target(p, what)?,
            PathPolicy::Operator => match nix::fcntl::open(p, o_path(), Mode::empty()) {
                Ok(fd) => (Some(Resolved::new(fd, p.display().to_string(), what)?), None),
                Err(Errno::ENOENT) => {
                    let label = p.display().to_string();
                    let parent = match p.parent() {
                        Some(d) if !d.as_os_str().is_empty() => d,
                        _ => Path::new("."),
                    };
                    let dir = nix::fcntl::open(parent, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                        .map_err(|e| errno_err(e, &format!("{what}: directory of"), &label))?;
                    let name = p.file_name().ok_or_else(|| Error::invalid(format!("{what} {label}: not a file path")))?;
                    (None, Some(create_new(dir, Path::new(name), &label, what)?))
                }
                Err(e) => return Err(errno_err(e, &format!("opening {what}"), &p.display().to_string())),
            },
        };
        if let Some((file, pending)) = created {
            return Ok(OpenedTarget { file, label: p.display().to_string(), kind: Kind::File, fresh: true, pending: Some(pending) });
        }
        let Some(r) = existing else { return Err(Error::permanent(format!("{what} {}: neither found nor created", p.display()))) };
        Self::open_resolved_target(r, what)
    }

    /// Opens an existing, resolved restore target for writing (see [`PathPolicy::open_target`]).
    pub fn open_resolved_target(r: Resolved, what: &str) -> Result<OpenedTarget> {
        match r.kind {
            Kind::BlockDevice => {
                // Read as well: the plan looks whether the device already holds data.
                let file = r.reopen(OFlag::O_RDWR | OFlag::O_EXCL, what).map_err(|e| {
                    if e.kind() == ErrorKind::Precondition {
                        Error::precondition(format!(
                            "{what} {} is in use: it is mounted or held open exclusively by another program (the kernel refused an exclusive open); nothing was written",
                            r.label
                        ))
                    } else {
                        e
                    }
                })?;
                Ok(OpenedTarget { file, label: r.label, kind: Kind::BlockDevice, fresh: false, pending: None })
            }
            Kind::File => {
                let file = r.reopen(OFlag::O_RDWR, what)?;
                device::refuse_if_in_use(&file, &r.label, what)?;
                let fresh = r.stat.st_size == 0;
                Ok(OpenedTarget { file, label: r.label, kind: Kind::File, fresh, pending: None })
            }
        }
    }
}
