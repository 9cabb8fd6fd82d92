//! Local-directory storage: the embedded default.
//!
//! A `put` writes a temporary file beside the target, fsyncs it, then *hard-links* it to
//! the final name (atomic, and unlike `rename` it fails when the name exists, so the store
//! is create-only even between processes), removes the temporary name and fsyncs the
//! directory. Temporary files start with `.tmp-` and are never listed.

use async_trait::async_trait;
use bytes::Bytes;
use mover_format::storage::{too_large, ErrorKind, ListPage, ObjectMeta, PutOutcome, Storage, StorageError};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

const PAGE: usize = 1000;

/// A listing's walk, kept for its next page: `(prefix, token)` → (when, the sorted
/// objects, where the next page starts). A listing of P objects then walks the directory
/// once, not once per page (O(P), not O(P²/PAGE)); a listing abandoned midway is dropped
/// after [`WALK_TTL`], and at most [`WALKS`] are kept.
type Walks = std::collections::HashMap<(String, String), (std::time::Instant, std::sync::Arc<Vec<ObjectMeta>>, usize)>;
const WALK_TTL: std::time::Duration = std::time::Duration::from_secs(60);
const WALKS: usize = 16;

#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    location: String,
    walks: std::sync::Arc<std::sync::Mutex<Walks>>,
}

impl LocalStorage {
    /// A store rooted at `root`; the directory is created by the first `put`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let location = root.display().to_string();
        Self { root, location, walks: Default::default() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The object's path, checked when the operation runs ([`beneath`]).
    fn path(&self, name: &str) -> (PathBuf, String) {
        (self.root.clone(), name.to_string())
    }

    fn err(&self, op: &'static str, name: &str, e: io::Error) -> StorageError {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::Transient,
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => ErrorKind::Denied,
            _ => ErrorKind::Permanent,
        };
        StorageError::new(kind, op, name, &self.location, e.to_string()).with_source(e)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        name: &str,
        cancel: &CancellationToken,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, StorageError> {
        if cancel.is_cancelled() {
            return Err(StorageError::cancelled(op, name, &self.location));
        }
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r.map_err(|e| self.err(op, name, e)),
            Err(e) => Err(StorageError::new(ErrorKind::Permanent, op, name, &self.location, format!("worker failed: {e}"))),
        }
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes the longest 4096-multiple prefix of `data` to `path` with `O_DIRECT` when `data`
/// sits at an aligned address (packs do) and is long enough; returns how many bytes were
/// written (0 when not eligible or refused: the caller writes the rest buffered). Large
/// objects then skip the page cache: no copy into it, and the fsync has little to flush.
fn write_direct_prefix(path: &Path, data: &[u8]) -> usize {
    use std::os::unix::fs::OpenOptionsExt;
    let n = data.len() / DIRECT_ALIGN as usize * DIRECT_ALIGN as usize;
    if (n as u64) < DIRECT_MIN || !(data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN as usize) {
        return 0;
    }
    let Ok(f) = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) else {
        return 0;
    };
    let mut done = 0usize;
    while done < n {
        match f.write_at(&data[done..n], done as u64) {
            Ok(k) if k > 0 && k % DIRECT_ALIGN as usize == 0 => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A short unaligned write or an error: the buffered write takes over from here.
            _ => break,
        }
    }
    done
}

/// The path of object `name` below `root`, refused when a directory or file on the way
/// below the root is a symbolic link (or the name climbs out): the store never reads or
/// writes through a link out of the repository, whoever planted it. (The root itself may
/// be a link: the operator chose it.) Opens below also use `O_NOFOLLOW`.
fn beneath(root: &Path, name: &str) -> io::Result<PathBuf> {
    let mut p = root.to_path_buf();
    for comp in name.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("object name '{name}' is not a plain relative path")));
        }
        p.push(comp);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{} is a symbolic link; the repository's store never follows links", p.display()),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        }
    }
    Ok(root.join(name))
}

/// Opens an existing object for reading without following a link at its last component;
/// anything but a regular file (a FIFO planted as `config`, a device) is refused without
/// blocking: the open is non-blocking, the type checked on the descriptor.
fn open_nofollow(path: &Path, extra: libc::c_int) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | extra).open(path)?;
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file ({t:?}); the repository's store holds only files", path.display()),
        ));
    }
    Ok(f)
}

fn put_file(path: &Path, data: &[u8]) -> io::Result<PutOutcome> {
    if path.exists() {
        return Ok(PutOutcome::Existed);
    }
    let dir = path.parent().ok_or_else(|| io::Error::other("object name has no directory"))?;
    // Only the repository's owner reads it, as restic does: the key files hold the
    // encrypted master key (a brute-force target), and the rest is nobody else's.
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        let done = write_direct_prefix(&tmp, data);
        f.write_all_at(&data[done..], done as u64)?;
        f.sync_all()?;
        drop(f);
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(PutOutcome::Created),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(PutOutcome::Existed),
            Err(e) => Err(e),
        }
    })();
    let _ = fs::remove_file(&tmp);
    let outcome = result?;
    fsync_dir(dir)?;
    Ok(outcome)
}

/// Ranges at least this long are read with `O_DIRECT` where the filesystem allows it.
const DIRECT_MIN: u64 = 256 << 10;
const DIRECT_ALIGN: u64 = 4096;

fn read_range(path: &Path, offset: u64, len: u64) -> io::Result<Bytes> {
    // Long ranges: one descriptor with O_DIRECT when the filesystem allows it.
    let direct = if len >= DIRECT_MIN { open_nofollow(path, libc::O_DIRECT).ok() } else { None };
    let is_direct = direct.is_some();
    let f = match direct {
        Some(d) => d,
        None => open_nofollow(path, 0)?,
    };
    let size = f.metadata()?.len();
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("range {offset}+{len} is past the end of the object ({size} bytes)")));
    }
    if is_direct {
        if let Some(b) = read_range_direct(&f, offset, len) {
            return Ok(b);
        }
    }
    let f = if is_direct { open_nofollow(path, 0)? } else { f };
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)?;
    Ok(Bytes::from(buf))
}

/// Reads a long range through an `O_DIRECT` descriptor: one large I/O straight into our
/// buffer instead of small readahead requests through the page cache and a copy out of it
/// (cold pack reads in a restore ran at a fraction of the disk's speed). `None` when the
/// read fails (e.g. the filesystem refuses unaligned I/O); the caller then reads buffered.
fn read_range_direct(f: &File, offset: u64, len: u64) -> Option<Bytes> {
    let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
    let end = (offset + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let span = (end - start) as usize;
    // An aligned window inside a plain Vec: no unsafe allocation needed.
    let mut v = vec![0u8; span + DIRECT_ALIGN as usize];
    let pad = v.as_ptr().align_offset(DIRECT_ALIGN as usize);
    let want = (offset + len - start) as usize;
    let mut done = 0usize;
    // Reads stay aligned; only the object's end makes one short (then `done >= want`).
    while done < want {
        match f.read_at(&mut v[pad + done..pad + span], start + done as u64) {
            Ok(0) => return None,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let from = pad + (offset - start) as usize;
    Some(Bytes::from(v).slice(from..from + len as usize))
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            continue;
        }
        let ft = entry.file_type()?;
        let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        if ft.is_dir() {
            walk(&entry.path(), &child, out)?;
        } else if ft.is_file() {
            match entry.metadata() {
                Ok(m) => out.push(ObjectMeta { name: child, size: m.len() }),
                // Deleted since the directory was read (a concurrent forget or gc): it is
                // not part of the listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

impl LocalStorage {
    /// One page of a walk from `from`; the rest is kept for the next page's token.
    /// One page of a listing (names after `after` when given). The next page of a listing
    /// in progress comes from its walk: objects written or deleted since the listing began
    /// may or may not be in it (as on S3).
    async fn list(&self, prefix: &str, after: Option<&str>, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        if let Some(t) = &token {
            let kept = self.walks.lock().ok().and_then(|mut w| w.remove(&(prefix.to_string(), t.clone())));
            if let Some((_, all, from)) = kept {
                return Ok(self.page(prefix, all, from));
            }
        }
        // Walk the directory that holds the prefix, filter by the full prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let dir = self.root.join(dir_part);
        let rel = dir_part.to_string();
        let prefix_owned = prefix.to_string();
        let mut all = self
            .blocking("listing", prefix, cancel, move || {
                let mut v = Vec::new();
                walk(&dir, &rel, &mut v)?;
                Ok(v)
            })
            .await?;
        let after = token.as_deref().or(after).map(str::to_owned);
        all.retain(|o| o.name.starts_with(&prefix_owned) && after.as_ref().is_none_or(|t| o.name > *t));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(self.page(prefix, std::sync::Arc::new(all), 0))
    }

    fn page(&self, prefix: &str, all: std::sync::Arc<Vec<ObjectMeta>>, from: usize) -> ListPage {
        let end = (from + PAGE).min(all.len());
        let objects = all[from..end].to_vec();
        let next = (end < all.len()).then(|| all[end - 1].name.clone());
        if let (Some(n), Ok(mut w)) = (&next, self.walks.lock()) {
            w.retain(|_, (t, _, _)| t.elapsed() < WALK_TTL);
            if w.len() < WALKS {
                w.insert((prefix.to_string(), n.clone()), (std::time::Instant::now(), all, end));
            }
        }
        ListPage { objects, next }
    }
}

#[async_trait]
impl Storage for LocalStorage {
    fn location(&self) -> &str {
        &self.location
    }

    async fn put(&self, name: &str, data: Bytes, cancel: &CancellationToken) -> Result<PutOutcome, StorageError> {
        let (root, n) = self.path(name);
        self.blocking("writing", name, cancel, move || put_file(&beneath(&root, &n)?, &data)).await
    }

    async fn get(&self, name: &str, max_len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        let (root, n) = self.path(name);
        let path = self.blocking("reading", name, cancel, move || beneath(&root, &n)).await?;
        let len = self
            .blocking("reading", name, cancel, {
                let path = path.clone();
                move || fs::symlink_metadata(path).map(|m| m.len())
            })
            .await?;
        if len > max_len {
            return Err(too_large("reading", name, &self.location, len, max_len));
        }
        let data = self
            .blocking("reading", name, cancel, move || {
                use std::io::Read;
                let mut v = Vec::with_capacity(len as usize);
                open_nofollow(&path, 0)?.take(max_len.saturating_add(1)).read_to_end(&mut v)?;
                Ok(v)
            })
            .await?;
        if data.len() as u64 > max_len {
            return Err(too_large("reading", name, &self.location, data.len() as u64, max_len));
        }
        Ok(Bytes::from(data))
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        let (root, n) = self.path(name);
        self.blocking("reading", name, cancel, move || read_range(&beneath(&root, &n)?, offset, len)).await
    }

    async fn head(&self, name: &str, cancel: &CancellationToken) -> Result<Option<u64>, StorageError> {
        let (root, n) = self.path(name);
        self.blocking("inspecting", name, cancel, move || match fs::symlink_metadata(beneath(&root, &n)?) {
            Ok(m) if m.file_type().is_symlink() => Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{n} is a symbolic link"))),
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn list_page(&self, prefix: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        self.list(prefix, None, token, cancel).await
    }

    async fn list_page_after(&self, prefix: &str, after: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        self.list(prefix, Some(after), token, cancel).await
    }

    async fn delete(&self, name: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        let (root, n) = self.path(name);
        self.blocking("deleting", name, cancel, move || {
            let path = beneath(&root, &n)?;
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            if let Some(dir) = path.parent() {
                fsync_dir(dir)?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing of more than one page returns every object once, in order, whether its
    /// pages come from one walk or (another listing, an expired walk) from a new one.
    #[tokio::test]
    async fn a_listing_of_many_pages_returns_every_object_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path().join("repo"));
        let c = CancellationToken::new();
        let mut want = Vec::new();
        for i in 0..2_500u32 {
            let name = format!("packs/{:02x}/{i:08}", i % 7);
            s.put(&name, Bytes::from_static(b"x"), &c).await.unwrap();
            want.push(name);
        }
        s.put("index/a", Bytes::from_static(b"y"), &c).await.unwrap();
        want.sort();
        let t0 = std::time::Instant::now();
        let got: Vec<String> = mover_format::storage::list_all(&s, "packs/", &c).await.unwrap().into_iter().map(|o| o.name).collect();
        eprintln!("listed {} objects in {:?}", got.len(), t0.elapsed());
        assert_eq!(got, want);
        // Two listings interleaved, and one resumed from a token its walk no longer has.
        let (a, b) = (s.list_page("packs/", None, &c).await.unwrap(), s.list_page("packs/", None, &c).await.unwrap());
        assert_eq!(a.objects.len(), PAGE);
        let a2 = s.list_page("packs/", a.next.clone(), &c).await.unwrap();
        s.walks.lock().unwrap().clear();
        let b2 = s.list_page("packs/", b.next.clone(), &c).await.unwrap();
        assert_eq!(a2.objects.iter().map(|o| &o.name).collect::<Vec<_>>(), b2.objects.iter().map(|o| &o.name).collect::<Vec<_>>());
        assert_eq!(a2.objects[0].name, want[PAGE]);
    }

    /// A link planted below the root (a directory or an object) is never followed: reads,
    /// writes, deletes and listings refuse or skip it, and nothing outside is touched.
    #[tokio::test]
    async fn links_below_the_root_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("repo"), dir.path().join("outside"));
        fs::create_dir_all(root.join("index")).unwrap();
        fs::create_dir_all(outside.join("ab")).unwrap();
        fs::write(outside.join("ab/secret"), b"the node's file").unwrap();
        fs::write(outside.join("target"), b"another").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("packs")).unwrap();
        std::os::unix::fs::symlink(outside.join("target"), root.join("index/seg")).unwrap();
        let s = LocalStorage::new(&root);
        let c = CancellationToken::new();
        for name in ["packs/ab/secret", "index/seg"] {
            let e = s.get(name, 1 << 20, &c).await.unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{e}");
            assert!(s.get_range(name, 0, 4, &c).await.is_err());
            assert!(s.head(name, &c).await.is_err());
            assert!(s.delete(name, &c).await.is_err());
        }
        let e = s.put("packs/ab/new", Bytes::from_static(b"x"), &c).await.unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!outside.join("ab/new").exists(), "nothing written outside");
        assert!(outside.join("ab/secret").exists() && outside.join("target").exists(), "nothing deleted outside");
        let listed = s.list_page("", None, &c).await.unwrap();
        assert!(listed.objects.is_empty(), "links are not listed: {:?}", listed.objects);
        // A plain object works as before.
        s.put("index/real", Bytes::from_static(b"ok"), &c).await.unwrap();
        assert_eq!(&s.get("index/real", 16, &c).await.unwrap()[..], b"ok");
    }

    /// A FIFO planted as an object (`config`) is refused at once: it was opened for reading
    /// and waited for a writer for ever (`mover snapshots` hung, deaf to SIGTERM).
    #[tokio::test]
    async fn a_fifo_in_place_of_an_object_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("config").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let s = LocalStorage::new(dir.path());
        let c = CancellationToken::new();
        let t0 = std::time::Instant::now();
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), s.get("config", 1 << 20, &c)).await.expect("the read blocked").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), s.get_range("config", 0, 16, &c)).await.expect("the read blocked").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
    }
}
