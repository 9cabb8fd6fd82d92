//! Files and block devices named by a request: resolved once, checked on the open
//! descriptor, and handed to the job as that descriptor — never opened by path again.
//!
//! - [`PathPolicy::Operator`] (the CLI): the operator's own paths, as given.
//! - [`PathPolicy::Confined`] (the daemon): only beneath configured roots (and the caller's
//!   `[authorization.paths]`), resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`,
//!   by the rules of where the path lies — the same whether a request names it by path or
//!   as a pod volume ([`Place`]):
//!   - inside a pod's volume (`<kubelet>/pods/<uid>/volumes/<plugin>/<name>/…`), the
//!     tenant's: no symbolic link is ever followed, and only a regular file of the volume's
//!     own filesystem with one name is accepted — never a device node, a link out, or a
//!     hard link to a node file; Secret, ConfigMap, projected and downward-API volumes are
//!     refused outright;
//!   - the kubelet's entry for a block volume (`…/pods/<uid>/volumeDevices/<plugin>/<name>`):
//!     a device node or the kubelet's link to one outside the pods' directories;
//!   - nothing else under the kubelet's `pods/` (`etc-hosts`, containers' files);
//!   - elsewhere beneath a root (the operator's, e.g. `/dev`): a symbolic link is followed
//!     only when it stays beneath its root *and* leads to a block device (`/dev/disk/by-id/…`).
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
    /// The caller's own prefixes (`[authorization.paths]`): when set, a request may name
    /// only paths beneath one of them, and pod volumes whose pod directory lies beneath one.
    pub scope: Option<Vec<PathBuf>>,
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

/// Volume plugins whose files are credentials or node configuration, never a disk:
/// Secrets, ConfigMaps, projected service-account tokens, the downward API.
const CREDENTIAL_PLUGINS: [&str; 4] = ["kubernetes.io~secret", "kubernetes.io~configmap", "kubernetes.io~projected", "kubernetes.io~downward-api"];

/// Where a requested path lies, which decides the rules it is resolved by. Every source and
/// target, named by path or as a pod volume, is resolved through one of these.
enum Place<'a> {
    /// A file inside a pod's volume, `<kubelet>/pods/<uid>/volumes/<plugin>/<name>/<rest>`:
    /// the tenant's. No symbolic link is followed, and the file must be a regular file of
    /// the volume's own filesystem with no other name ([`check_volume_file`]).
    VolumeFile { uid: &'a str, plugin: &'a str, name: &'a str, rest: PathBuf },
    /// The kubelet's entry for a block-mode volume, `<kubelet>/pods/<uid>/volumeDevices/<plugin>/<name>`.
    VolumeDevice { uid: &'a str, plugin: &'a str, name: &'a str },
    /// Anywhere else beneath an allowed root (the operator's): a symbolic link is followed
    /// only when it stays beneath the root and leads to a block device.
    Node { root: &'a Path, rel: PathBuf },
}

impl Confinement {
    /// Whether the caller's scope (if any) admits the lexical path `p`.
    fn in_scope(&self, p: &Path, what: &str) -> Result<()> {
        match &self.scope {
            Some(prefixes) if !prefixes.iter().any(|s| p.starts_with(s)) => Err(Error::invalid(format!(
                "{what} {} is outside the paths this caller may name ([authorization.paths]: {})",
                p.display(),
                prefixes.iter().map(|s| s.display().to_string()).collect::<Vec<_>>().join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// Decides where `p` lies: beneath an allowed root, inside the caller's scope, written
    /// without `.` or `..`; beneath the kubelet's `pods/` only a pod volume's file or the
    /// kubelet's entry for a block volume.
    fn place<'a>(&'a self, p: &'a Path, what: &str) -> Result<Place<'a>> {
        let raw = p.display().to_string();
        if !p.is_absolute() {
            return Err(Error::invalid(format!("{what} {raw}: path must be absolute")));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(Error::invalid(format!("{what} {raw}: a path with '.' or '..' components is refused; name the file itself")));
        }
        let Some(root) = self.roots.iter().find(|r| p.starts_with(r)) else {
            return Err(Error::invalid(format!("{what} {raw} is outside the allowed roots")));
        };
        let rel = p.strip_prefix(root).unwrap_or(p).to_path_buf();
        if rel.as_os_str().is_empty() {
            return Err(Error::invalid(format!("{what} {raw} is an allowed root itself, not a volume")));
        }
        self.in_scope(p, what)?;
        let Ok(in_kubelet) = p.strip_prefix(&self.kubelet_root) else { return Ok(Place::Node { root, rel }) };
        let parts: Vec<&str> = in_kubelet.iter().map(|c| c.to_str().unwrap_or("\u{0}")).collect();
        let refuse = || {
            Error::invalid(format!(
                "{what} {raw} lies in the kubelet's directory but is no pod volume: only pods/<uid>/volumes/<plugin>/<volume>/<file> and pods/<uid>/volumeDevices/<plugin>/<volume> may be named there"
            ))
        };
        match parts.as_slice() {
            ["pods", uid, "volumes", plugin, name, rest @ ..] if !rest.is_empty() => {
                if CREDENTIAL_PLUGINS.contains(plugin) {
                    return Err(Error::invalid(format!("{what} {raw} lies in a {plugin} volume, which holds credentials or configuration, not disks")));
                }
                Ok(Place::VolumeFile { uid, plugin, name, rest: rest.iter().collect() })
            }
            ["pods", uid, "volumeDevices", plugin, name] => Ok(Place::VolumeDevice { uid, plugin, name }),
            _ => Err(refuse()),
        }
    }

    fn open_root(root: &Path) -> Result<OwnedFd> {
        nix::fcntl::open(root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| errno_err(e, "allowed root", &root.display().to_string()))
    }

    /// The directory `rel` beneath `dir`, no symbolic link followed; `None` when absent.
    fn strict_dir(dir: &OwnedFd, rel: &Path, label: &str, what: &str) -> Result<Option<OwnedFd>> {
        match openat2(dir, rel, strict_dir_how()) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP) => Err(Error::invalid(format!("{what} {label}: a directory on the way is a symbolic link; it is not followed"))),
            Err(e) => Err(errno_err(e, what, label)),
        }
    }

    /// An existing file or device, by the rules of where it lies.
    pub fn resolve(&self, p: &Path, what: &str) -> Result<Resolved> {
        let label = p.display().to_string();
        match self.place(p, what)? {
            Place::Node { root, rel } => beneath(&Self::open_root(root)?, &rel, &label, what).map_err(|(_, e)| e),
            Place::VolumeFile { uid, plugin, name, rest } => match self.volume_file(uid, plugin, name, &rest, &label, what)? {
                VolumeFile::Found(r) => Ok(r),
                VolumeFile::Absent { .. } => Err(Error::not_found(format!("{what} {label}: no such file"))),
            },
            Place::VolumeDevice { uid, plugin, name } => {
                self.volume_device(uid, plugin, name, &label, what)?.ok_or_else(|| Error::not_found(format!("{what} {label}: no such volume device")))
            }
        }
    }

    /// A file inside a pod's filesystem volume (`rest` beneath `pods/<uid>/volumes/<plugin>/<name>`):
    /// resolved without following any symbolic link, and held to [`check_volume_file`]. The
    /// volume's own filesystem is that of `<name>/mount` when `rest` lies in it (CSI), else
    /// of `<name>`.
    fn volume_file(&self, uid: &str, plugin: &str, name: &str, rest: &Path, label: &str, what: &str) -> Result<VolumeFile> {
        let kube = Self::open_root(&self.kubelet_root)?;
        let vol_rel = Path::new("pods").join(uid).join("volumes").join(plugin).join(name);
        let Some(mut vdir) = Self::strict_dir(&kube, &vol_rel, label, what)? else {
            return Err(Error::not_found(format!("{what} {label}: pod {uid} has no volume '{name}' of plugin {plugin}")));
        };
        let mut rest = rest.to_path_buf();
        if let Ok(inner) = rest.strip_prefix("mount") {
            if !inner.as_os_str().is_empty() {
                if let Some(m) = Self::strict_dir(&vdir, Path::new("mount"), label, what)? {
                    vdir = m;
                    rest = inner.to_path_buf();
                }
            }
        }
        let vst = fstat(&vdir).map_err(|e| errno_err(e, what, label))?;
        let how = OpenHow::new().flags(o_path()).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match openat2(&vdir, &rest, how) {
            Ok(fd) => {
                let r = Resolved::new(fd, label.to_string(), what)?;
                check_volume_file(&r, &vst, what)?;
                Ok(VolumeFile::Found(r))
            }
            Err(Errno::ENOENT) => Ok(VolumeFile::Absent { vdir, rest }),
            Err(Errno::ELOOP) => Err(Error::invalid(format!(
                "{what} {label} is reached through a symbolic link inside a pod volume; a volume's files are never followed out of it"
            ))),
            Err(Errno::EXDEV) => Err(Error::invalid(format!("{what} {label} resolves outside its pod volume"))),
            Err(e) => Err(errno_err(e, what, label)),
        }
    }

    /// The kubelet's entry for a block-mode volume; `None` when absent.
    fn volume_device(&self, uid: &str, plugin: &str, name: &str, label: &str, what: &str) -> Result<Option<Resolved>> {
        let kube = Self::open_root(&self.kubelet_root)?;
        let rel = Path::new("pods").join(uid).join("volumeDevices").join(plugin);
        let Some(pdir) = Self::strict_dir(&kube, &rel, label, what)? else { return Ok(None) };
        self.kubelet_device(&pdir, name, label, what)
    }

    /// A pod's volume under the kubelet root, by pod uid and volume name: block mode (the
    /// kubelet's `pods/<uid>/volumeDevices/<plugin>/<name>`) or filesystem mode
    /// (`pods/<uid>/volumes/<plugin>/<name>/disk.img`, or `…/<name>/mount/disk.img` for CSI).
    /// The candidates are resolved exactly as if named by path.
    pub fn pod_volume(&self, uid: &str, name: &str, what: &str) -> Result<Resolved> {
        let plain = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != ".." && s.len() <= 253;
        if !plain(uid) || !plain(name) {
            return Err(Error::invalid(format!("{what}: pod uid '{uid}' and volume name '{name}' must be plain names")));
        }
        let pod_path = self.kubelet_root.join("pods").join(uid);
        let pod_label = pod_path.display().to_string();
        self.in_scope(&pod_path, what)?;
        let kube = Self::open_root(&self.kubelet_root)?;
        let Some(pod) = Self::strict_dir(&kube, &Path::new("pods").join(uid), &pod_label, what)? else {
            return Err(Error::not_found(format!("{what}: pod {uid} has no directory under {}", self.kubelet_root.display())));
        };
        let mut found: Vec<Resolved> = Vec::new();
        for plugin in list_dir(&pod, "volumeDevices") {
            let label = format!("{pod_label}/volumeDevices/{plugin}/{name}");
            if let Some(r) = self.volume_device(uid, &plugin, name, &label, what)? {
                found.push(r);
            }
        }
        for plugin in list_dir(&pod, "volumes").into_iter().filter(|p| !CREDENTIAL_PLUGINS.contains(&p.as_str())) {
            for tail in ["disk.img", "mount/disk.img"] {
                let label = format!("{pod_label}/volumes/{plugin}/{name}/{tail}");
                match self.volume_file(uid, &plugin, name, Path::new(tail), &label, what) {
                    Ok(VolumeFile::Found(r)) => found.push(r),
                    Ok(VolumeFile::Absent { .. }) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
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
    /// symlink the kubelet made to one (beneath an allowed root, outside the pods'
    /// directories). `None` when absent.
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
        if target.starts_with(self.kubelet_root.join("pods")) {
            return Err(Error::invalid(format!("{what} {label}: the link points into a pod's directory ({}), not to a device", target.display())));
        }
        // The kubelet's link, not the caller's path: resolved by the node's rules (it may
        // point into the kubelet's `plugins/…/volumeDevices/publish/`), beneath an allowed
        // root; the caller's scope was checked on the entry.
        let root = self
            .roots
            .iter()
            .find(|r| target.starts_with(r))
            .ok_or_else(|| Error::invalid(format!("{what} {label}: the kubelet's link points to {}, outside the allowed roots", target.display())))?;
        let rel = target.strip_prefix(root).unwrap_or(&target);
        let r = beneath(&Self::open_root(root)?, rel, &target.display().to_string(), what)
            .map_err(|(_, e)| e.context(format!("{what} {label} (a link to {})", target.display())))?;
        if r.kind != Kind::BlockDevice {
            return Err(Error::invalid(format!("{what} {label}: links to {}, which is not a block device", target.display())));
        }
        Ok(Some(Resolved { label: label.to_string(), ..r }))
    }

    /// A restore target, by the rules of where it lies: an existing device or file, or a
    /// new file in an existing directory (created there, never through a symlink).
    fn target(&self, p: &Path, what: &str) -> Result<(Option<Resolved>, Option<(File, PendingName)>)> {
        let label = p.display().to_string();
        let (dir, rel) = match self.place(p, what)? {
            Place::VolumeDevice { uid, plugin, name } => {
                let r = self.volume_device(uid, plugin, name, &label, what)?;
                return match r {
                    Some(r) => Ok((Some(r), None)),
                    None => Err(Error::not_found(format!("{what} {label}: no such volume device (a block volume's entry is the kubelet's to create)"))),
                };
            }
            Place::VolumeFile { uid, plugin, name, rest } => match self.volume_file(uid, plugin, name, &rest, &label, what)? {
                VolumeFile::Found(r) => return Ok((Some(r), None)),
                VolumeFile::Absent { vdir, rest } => (vdir, rest),
            },
            Place::Node { root, rel } => {
                let dir = Self::open_root(root)?;
                match beneath(&dir, &rel, &label, what) {
                    Ok(r) => return Ok((Some(r), None)),
                    Err((Errno::ENOENT, _)) => (dir, rel),
                    Err((_, e)) => return Err(e),
                }
            }
        };
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else { return Err(Error::invalid(format!("{what} {label}: not a file path"))) };
        let parent_rel = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        let pdir = openat2(&dir, parent_rel, strict_dir_how()).map_err(|e| errno_err(e, &format!("{what}: directory of"), &label))?;
        Ok((None, Some(create_new(pdir, Path::new(name), &label, what)?)))
    }
}

/// What [`Confinement::volume_file`] found: the file, or where it would be created.
enum VolumeFile {
    Found(Resolved),
    Absent { vdir: OwnedFd, rest: PathBuf },
}

fn strict_dir_how() -> OpenHow {
    OpenHow::new()
        .flags(o_path() | OFlag::O_DIRECTORY)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS)
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
        let label = p.display().to_string();
        let how = OpenHow::new().flags(o_path()).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let (dir, rel) = match c.place(p, what)? {
            Place::Node { root, rel } => (Confinement::open_root(root)?, rel),
            Place::VolumeFile { uid, plugin, name, .. } => {
                // A socket a tenant put in its volume: beneath that volume, no symlink.
                let kube = Confinement::open_root(&c.kubelet_root)?;
                let vol_rel = Path::new("pods").join(uid).join("volumes").join(plugin).join(name);
                let vdir = Confinement::strict_dir(&kube, &vol_rel, &label, what)?
                    .ok_or_else(|| Error::not_found(format!("{what} {label}: pod {uid} has no volume '{name}'")))?;
                let rest = p.strip_prefix(c.kubelet_root.join(&vol_rel)).unwrap_or(p).to_path_buf();
                (vdir, rest)
            }
            Place::VolumeDevice { .. } => return Err(Error::invalid(format!("{what} {label} is a block volume's entry, not a unix socket"))),
        };
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
                // O_EXCL sees mounts and exclusive openers only: QEMU holds a raw block
                // volume open read-write, not exclusively.
                device::refuse_if_held(&file, &r.label, what)?;
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
