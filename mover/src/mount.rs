//! `mover mount DIR`: the repository's snapshots as a read-only FUSE file system, for
//! file-level restore — `DIR/<group>/<snapshot id>/<volume>.img` is the volume as a disk
//! image (loop-mount it read-only and copy files out), `…/metadata/<name>` each metadata
//! blob (the VM's objects), `DIR/<group>/latest` links to the group's newest snapshot.
//!
//! Volume bytes are read on demand through [`VolumeImage`] (fetched, verified, cached a
//! bounded number of segments at a time); nothing is restored in advance. The tree is the
//! snapshots that existed when it was mounted.

use fuser::{FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request};
use mover_engine::export::{ImageOptions, VolumeImage};
use mover_engine::lock::ReadView;
use mover_engine::{Error, Result};
use mover_format::manifest::{Manifest, VolumeEntry};
use mover_format::{ChunkId, Repository, SnapshotId};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;

enum Kind {
    Dir(BTreeMap<String, u64>),
    Image { snap: SnapshotId, vol: VolumeEntry },
    Meta { blob: ChunkId, size: u64 },
    Link(String),
}

struct Node {
    kind: Kind,
    /// Seconds since the epoch (the snapshot's time).
    mtime: u64,
}

/// The mounted file system.
pub struct SnapshotFs {
    nodes: Vec<Node>,
    repo: Repository,
    view: ReadView,
    rt: tokio::runtime::Handle,
    images: Arc<Mutex<HashMap<u64, Arc<VolumeImage>>>>,
    metas: Arc<Mutex<HashMap<u64, Arc<Vec<u8>>>>>,
    opts: ImageOptions,
    cancel: CancellationToken,
}

impl SnapshotFs {
    /// The tree of `snaps` (each with its manifest).
    pub fn new(repo: Repository, view: ReadView, snaps: Vec<(SnapshotId, Manifest)>, opts: ImageOptions, cancel: CancellationToken) -> Self {
        let mut fs = SnapshotFs {
            nodes: vec![Node { kind: Kind::Dir(BTreeMap::new()), mtime: 0 }, Node { kind: Kind::Dir(BTreeMap::new()), mtime: 0 }],
            repo,
            view,
            rt: tokio::runtime::Handle::current(),
            images: Default::default(),
            metas: Default::default(),
            opts,
            cancel,
        };
        let mut latest: BTreeMap<u64, (u64, String)> = BTreeMap::new();
        for (id, m) in snaps {
            let t = m.time_unix_ms / 1000;
            // The group's path components are directories ("vms/web-1" → vms/web-1/).
            let mut dir = ROOT;
            for part in m.group().split('/').filter(|p| !p.is_empty() && *p != "." && *p != "..") {
                dir = fs.child_dir(dir, part, t);
            }
            let sdir = fs.add(dir, &id.to_string(), Node { kind: Kind::Dir(BTreeMap::new()), mtime: t });
            for v in &m.volumes {
                fs.add(sdir, &format!("{}.img", v.name), Node { kind: Kind::Image { snap: id, vol: v.clone() }, mtime: t });
            }
            if !m.metadata.is_empty() {
                let md = fs.add(sdir, "metadata", Node { kind: Kind::Dir(BTreeMap::new()), mtime: t });
                for b in &m.metadata {
                    fs.add(md, &b.name, Node { kind: Kind::Meta { blob: b.blob, size: b.size }, mtime: t });
                }
            }
            if latest.get(&dir).is_none_or(|(lt, _)| t >= *lt) {
                latest.insert(dir, (t, id.to_string()));
            }
        }
        for (dir, (t, id)) in latest {
            fs.add(dir, "latest", Node { kind: Kind::Link(id), mtime: t });
        }
        fs
    }

    fn add(&mut self, parent: u64, name: &str, node: Node) -> u64 {
        let ino = self.nodes.len() as u64;
        self.nodes.push(node);
        if let Kind::Dir(c) = &mut self.nodes[parent as usize].kind {
            c.insert(name.to_string(), ino);
        }
        ino
    }

    fn child_dir(&mut self, parent: u64, name: &str, t: u64) -> u64 {
        if let Kind::Dir(c) = &self.nodes[parent as usize].kind {
            if let Some(&i) = c.get(name) {
                if matches!(self.nodes[i as usize].kind, Kind::Dir(_)) {
                    self.nodes[i as usize].mtime = self.nodes[i as usize].mtime.max(t);
                    return i;
                }
            }
        }
        self.add(parent, name, Node { kind: Kind::Dir(BTreeMap::new()), mtime: t })
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(ino as usize).filter(|_| ino >= ROOT)?;
        let (kind, size, perm, nlink) = match &n.kind {
            Kind::Dir(c) => (FileType::Directory, 0, 0o555, 2 + c.len() as u32),
            Kind::Image { vol, .. } => (FileType::RegularFile, vol.size, 0o444, 1),
            Kind::Meta { size, .. } => (FileType::RegularFile, *size, 0o444, 1),
            Kind::Link(t) => (FileType::Symlink, t.len() as u64, 0o777, 1),
        };
        let t = UNIX_EPOCH + Duration::from_secs(n.mtime);
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        })
    }
}

impl Filesystem for SnapshotFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = match self.nodes.get(parent as usize).map(|n| &n.kind) {
            Some(Kind::Dir(c)) => name.to_str().and_then(|n| c.get(n)).copied(),
            _ => None,
        };
        match found.and_then(|i| self.attr(i)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.nodes.get(ino as usize).map(|n| &n.kind) {
            Some(Kind::Link(t)) => reply.data(t.as_bytes()),
            _ => reply.error(libc::EINVAL),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        match self.nodes.get(ino as usize).map(|n| &n.kind) {
            Some(Kind::Image { .. } | Kind::Meta { .. }) => reply.opened(0, 0),
            Some(Kind::Dir(_)) => reply.error(libc::EISDIR),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn read(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, size: u32, _flags: i32, _lock: Option<u64>, reply: ReplyData) {
        let Some(node) = self.nodes.get(ino as usize) else { return reply.error(libc::ENOENT) };
        let (repo, view, cancel, opts) = (self.repo.clone(), self.view.clone(), self.cancel.clone(), self.opts);
        match &node.kind {
            Kind::Image { snap, vol } => {
                let (snap, vol, images) = (*snap, vol.clone(), self.images.clone());
                self.rt.spawn(async move {
                    let r: Result<Vec<u8>> = async {
                        let existing = images.lock().ok().and_then(|m| m.get(&ino).cloned());
                        let image = match existing {
                            Some(i) => i,
                            None => {
                                let i = VolumeImage::open(&repo, &view, snap, vol, opts, &cancel).await?;
                                images.lock().map_err(|_| Error::permanent("image table lock poisoned"))?.entry(ino).or_insert(i).clone()
                            }
                        };
                        let off = (offset.max(0) as u64).min(image.size());
                        let n = (size as u64).min(image.size() - off) as usize;
                        let mut buf = vec![0u8; n];
                        image.read(off, &mut buf).await?;
                        Ok(buf)
                    }
                    .await;
                    match r {
                        Ok(b) => reply.data(&b),
                        Err(e) => {
                            tracing::warn!("reading {} bytes at offset {offset} of inode {ino}: {e:#}", size);
                            reply.error(libc::EIO)
                        }
                    }
                });
            }
            Kind::Meta { blob, .. } => {
                let (blob, metas) = (*blob, self.metas.clone());
                self.rt.spawn(async move {
                    let r: Result<Arc<Vec<u8>>> = async {
                        if let Some(b) = metas.lock().ok().and_then(|m| m.get(&ino).cloned()) {
                            return Ok(b);
                        }
                        let b = Arc::new(view.load_blob(&repo, &blob, "metadata blob", &cancel).await?);
                        if let Ok(mut m) = metas.lock() {
                            m.insert(ino, b.clone());
                        }
                        Ok(b)
                    }
                    .await;
                    match r {
                        Ok(b) => {
                            let off = (offset.max(0) as usize).min(b.len());
                            reply.data(&b[off..(off + size as usize).min(b.len())])
                        }
                        Err(e) => {
                            tracing::warn!("reading metadata blob {blob}: {e:#}");
                            reply.error(libc::EIO)
                        }
                    }
                });
            }
            _ => reply.error(libc::EISDIR),
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let Some(Kind::Dir(children)) = self.nodes.get(ino as usize).map(|n| &n.kind) else { return reply.error(libc::ENOTDIR) };
        let mut entries: Vec<(u64, FileType, String)> = vec![(ino, FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into())];
        for (name, &child) in children {
            let kind = self.attr(child).map(|a| a.kind).unwrap_or(FileType::RegularFile);
            entries.push((child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(child, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok()
    }
}
