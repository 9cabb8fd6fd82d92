//! Leases on a repository (protocol and argument: `docs/gc.md`).
//!
//! A backup holds a `backup` lock from before it syncs its index until after its manifest
//! is written; `gc` and `forget` hold a `gc` lock, and two `gc` locks exclude each other.
//! A holder refreshes its lock every fifth of its TTL; every commit must complete within
//! three quarters of the TTL after the last refresh was sent ([`Lease::commit`]), and a
//! holder past that no longer trusts its lease and commits nothing.

use crate::error::{Error, Result, ResultExt};
use mover_format::local_index::ChunkIndex;
use mover_format::lock::{self, LockInfo, LockKind};
use mover_format::{names, Repository};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The lease TTL: `MOVER_LOCK_TTL` seconds, 600 by default. It is also GC's grace window
/// for a holder that died without removing its lock on another node.
pub fn default_ttl() -> Duration {
    let s = std::env::var("MOVER_LOCK_TTL").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(600);
    Duration::from_secs(s.max(2))
}

/// `MOVER_APPEND_ONLY` is set (`1`, `true`, `yes`): every repository this process opens is
/// append-only ([`mover_format::Repository::set_append_only`], `docs/immutability.md`).
pub fn append_only_from_env() -> bool {
    std::env::var("MOVER_APPEND_ONLY").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// A cheap handle on a held lock's lease, for stages that commit (index segments, manifest,
/// gc records and deletions).
///
/// Other nodes consider the lock live until `refreshed + TTL` (their clocks). The holder
/// measures its lease from when its last successful refresh was *sent* — the earliest the
/// new `refreshed` time can be — and trusts it for ¾ TTL: every commit must have
/// *completed* by then ([`Lease::commit`]) or it is abandoned. The last quarter is the
/// margin for clock differences and for a write the store receives after its client gave
/// up on it (`docs/gc.md`).
#[derive(Clone)]
pub struct Lease {
    /// When the last successful refresh (or the lock's creation) was sent.
    last_ok: Arc<Mutex<Instant>>,
    /// Set once the lease was given up: an expired lease is never revived, since GC may
    /// already have acted on its expiry.
    lost: Arc<std::sync::atomic::AtomicBool>,
    ttl: Duration,
    id: String,
}

impl Lease {
    /// The instant by which every commit must have completed.
    pub fn deadline(&self) -> Instant {
        let sent = self.last_ok.lock().map(|t| *t).unwrap_or_else(|_| Instant::now() - self.ttl);
        sent + self.ttl * 3 / 4
    }

    fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Acquire)
    }

    fn give_up(&self) {
        self.lost.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The lease of a reader that could not write a lock: it never expires (nothing of
    /// another node's depends on it).
    fn without_lock() -> Self {
        Lease { last_ok: Arc::new(Mutex::new(Instant::now())), lost: Default::default(), ttl: Duration::from_secs(100 * 365 * 86_400), id: String::new() }
    }

    /// Fails when the lock may have expired in the eyes of another node.
    pub fn check(&self) -> Result<()> {
        if self.lost() || Instant::now() >= self.deadline() {
            self.give_up();
            let age = self.last_ok.lock().map(|t| t.elapsed()).unwrap_or(Duration::MAX);
            return Err(Error::transient(format!(
                "lock {} was last refreshed {:.0} s ago (TTL {} s): the lease may have expired, so nothing more is committed; run again to resume",
                self.id,
                age.as_secs_f64(),
                self.ttl.as_secs()
            )));
        }
        Ok(())
    }

    /// Runs one commit — a write or deletion other nodes act on — so that it completes
    /// within the lease: started only while the lease holds, and abandoned (dropped, with
    /// its retries) when the deadline passes first. A refresh that lands meanwhile moves
    /// the deadline. An abandoned commit gives the lease up and fails as transient; what
    /// was uploaded before it is kept, so a rerun resumes.
    pub async fn commit<T, F>(&self, what: &str, fut: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        self.check().with_context(|| format!("not {what}"))?;
        tokio::pin!(fut);
        loop {
            let deadline = self.deadline();
            tokio::select! {
                r = &mut fut => return r,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if self.deadline() > deadline && !self.lost() {
                        continue;
                    }
                    self.give_up();
                    return Err(Error::transient(format!(
                        "{what} did not complete within the lease of lock {} (¾ of its {} s TTL after its last refresh): abandoned, and nothing more is committed; run again to resume",
                        self.id,
                        self.ttl.as_secs()
                    )));
                }
            }
        }
    }
}

/// What a lock is held for.
#[derive(Debug, Clone, Copy)]
pub enum Hold<'a> {
    /// Restores, exports, drills, copies (on their source) and `check`: gc deletes nothing
    /// they may still read until the scope ends or the lock expires.
    Read,
    /// Backups and repairs: gc keeps what they write and may still reference.
    Backup,
    /// `gc`, `forget` and index rebuilds: refused while another live `gc` lock exists.
    /// The text names the operation in that refusal ("run gc").
    Exclusive(&'a str),
}

/// The one way to hold a lock: writes it, keeps it refreshed while `f` runs, and removes it
/// when `f` ends — on success, on error and on cancellation alike. There is no other
/// acquire or release: the order the gc protocol needs (lease → read view → work →
/// release, `docs/gc.md`) is kept by this scope and by [`Held::view`], not by comments.
pub async fn scope<T, F, Fut>(repo: &Repository, hold: Hold<'_>, cancel: &CancellationToken, f: F) -> Result<T>
where
    F: FnOnce(Held) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let lock = match hold {
        Hold::Read => match RepoLock::acquire_or_denied(repo, LockKind::Read, cancel).await? {
            Ok(l) => Some(l),
            Err(e) => {
                // Read-only credentials: reading needs no lock to be right — every chunk is
                // checked against its hash, so a pack a concurrent gc deleted fails the
                // read, never changes it — only to be sure to finish.
                tracing::warn!("reading without a lock ({e}): a gc running now could make this fail, never read wrong data");
                None
            }
        },
        Hold::Backup => Some(RepoLock::acquire(repo, LockKind::Backup, cancel).await?),
        Hold::Exclusive(what) => Some(RepoLock::acquire_exclusive(repo, what, cancel).await?),
    };
    let lease = lock.as_ref().map(|l| l.lease.clone()).unwrap_or_else(Lease::without_lock);
    let held = Held { repo: repo.clone(), lease };
    let r = f(held).await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    r
}

/// A held lock, as the work inside a [`scope`] sees it: its lease (for commits) and the
/// read view it makes safe to take. Once the scope ends its lease is given up, so a copy
/// kept past it commits nothing.
pub struct Held {
    repo: Repository,
    lease: Lease,
}

impl Held {
    pub fn id(&self) -> String {
        self.lease.id.clone()
    }

    pub fn lease(&self) -> Lease {
        self.lease.clone()
    }

    /// The read view: the local index synced with the repository's segments, plus the
    /// entries gc took out of the index but has not swept (they stay readable while this
    /// lock lives). Taken after the lock, so nothing it names is deleted while it is used.
    pub async fn view(&self, index: Arc<dyn ChunkIndex>, cancel: &CancellationToken) -> Result<ReadView> {
        Ok(ReadView(crate::index::with_pending(&self.repo, index, cancel).await?))
    }

    /// [`Held::view`] and the quarantine, for writers that must not deduplicate against
    /// damaged locations (backup, repair). `reuse_listed_after_ms`: a listing of the index
    /// begun after it is not repeated ([`crate::index::reuse_for_backup`]).
    pub async fn view_screened(
        &self,
        index: Arc<dyn ChunkIndex>,
        reuse_listed_after_ms: Option<u64>,
        cancel: &CancellationToken,
    ) -> Result<(ReadView, Arc<crate::index::Quarantined>)> {
        let (tree, q) = crate::index::reading(&self.repo, index, reuse_listed_after_ms, cancel).await?;
        Ok((ReadView(tree), q))
    }
}

/// Where a snapshot's chunks are, for reading them: obtainable only from a held lock
/// ([`Held::view`]), so every reader has the lease that keeps what it names in the store.
/// Lookups only; writers go through the `Packer`, which needs a lease of its own.
#[derive(Clone)]
pub struct ReadView(Arc<dyn ChunkIndex>);

impl ReadView {
    pub fn lookup(&self, id: &mover_format::ChunkId) -> Result<Option<mover_format::index::BlobLocation>> {
        Ok(self.0.lookup(id)?)
    }

    /// A blob (a segment map, metadata) named in the view ([`crate::snapshots::load_blob`]).
    pub async fn load_blob(&self, repo: &Repository, id: &mover_format::ChunkId, what: &str, cancel: &CancellationToken) -> Result<Vec<u8>> {
        crate::snapshots::load_blob(repo, &*self.0, id, what, cancel).await
    }

    /// The index behind the view, for the engine's readers.
    pub(crate) fn index(&self) -> &Arc<dyn ChunkIndex> {
        &self.0
    }
}

struct RepoLock {
    repo: Repository,
    info: Arc<Mutex<LockInfo>>,
    lease: Lease,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RepoLock {
    /// Writes a lock of `kind` and starts refreshing it.
    async fn acquire(repo: &Repository, kind: LockKind, cancel: &CancellationToken) -> Result<Self> {
        let what = format!("creating {kind} lock in repository {}", repo.location());
        Self::acquire_or_denied(repo, kind, cancel)
            .await?
            .map_err(|e| Error::precondition(format!("{what}: {e} (these credentials may not write; a node that backs up or maintains needs write access)")))
    }

    /// [`Self::acquire`], or the store's refusal when it denies writing the lock (read-only
    /// credentials).
    async fn acquire_or_denied(
        repo: &Repository,
        kind: LockKind,
        cancel: &CancellationToken,
    ) -> Result<std::result::Result<Self, mover_format::storage::StorageError>> {
        let ttl = default_ttl();
        let what = format!("creating {kind} lock in repository {}", repo.location());
        let info = LockInfo::new(kind, ttl.as_secs());
        let sent = Instant::now();
        match repo.write_lock(&info, cancel).await {
            Err(mover_format::RepoError::Storage(e)) if e.kind == mover_format::storage::ErrorKind::Denied => return Ok(Err(e)),
            r => r.context(what)?,
        };
        let lease = Lease { last_ok: Arc::new(Mutex::new(sent)), lost: Default::default(), ttl, id: info.id.clone() };
        let info = Arc::new(Mutex::new(info));
        let stop = CancellationToken::new();
        let task = tokio::spawn(refresh_loop(repo.clone(), info.clone(), lease.clone(), stop.clone()));
        Ok(Ok(Self { repo: repo.clone(), info, lease, stop, task: Some(task) }))
    }

    /// A `gc` lock, refused while another live `gc` lock exists.
    async fn acquire_exclusive(repo: &Repository, what: &str, cancel: &CancellationToken) -> Result<Self> {
        let me = Self::acquire(repo, LockKind::Gc, cancel).await?;
        let others: Vec<LockView> = match list(repo, cancel).await {
            Ok(l) => l.into_iter().filter(|l| l.info.kind == LockKind::Gc && l.stale.is_none() && l.info.id != me.lease.id).collect(),
            Err(e) => {
                me.release().await;
                return Err(e);
            }
        };
        if let Some(o) = others.first() {
            me.release().await;
            return Err(Error::conflict(format!(
                "cannot {what}: repository {} is locked by {} (another gc or forget is running; `mover unlock` removes a lock left by a crashed process)",
                repo.location(),
                o.describe()
            )));
        }
        Ok(me)
    }

    /// Stops refreshing, gives the lease up and removes the lock.
    async fn release(mut self) {
        self.lease.give_up();
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let info = self.info.lock().map(|i| i.clone()).ok();
        if let Some(info) = info {
            remove(&self.repo, &info).await;
        }
    }
}

/// Removes a lock: deletes its object, or — append-only ([`Repository::append_only`]) —
/// writes a newer object of it that says it was released (`ttl_s` 0: expired at once, to
/// older Movers too). The maintenance node's gc deletes released and expired lock objects.
async fn remove(repo: &Repository, info: &LockInfo) {
    let name = info.object_name();
    if repo.append_only().is_none() {
        match repo.delete_object(&name, &CancellationToken::new()).await {
            Ok(()) => return,
            Err(e) if repo.append_only().is_none() => {
                tracing::warn!("removing lock {name}: {e:#}");
                return;
            }
            Err(e) => tracing::info!("{e:#}: lock {} is released by a newer object of it instead", info.id),
        }
    }
    let mut done = info.clone();
    done.refreshed_ms = mover_format::now_unix_ms().max(info.refreshed_ms + 1);
    done.ttl_s = 0;
    if let Err(e) = repo.write_lock(&done, &CancellationToken::new()).await {
        tracing::warn!("releasing lock {} (append-only): {e:#}; it expires {} s after its last refresh", info.id, info.ttl_s);
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        // Dropped inside its scope (the scope's future was dropped: a cancelled request):
        // stop refreshing and remove it in the background so other nodes need not wait
        // for the TTL.
        if self.task.is_some() {
            self.lease.give_up();
            self.stop.cancel();
            if let (Ok(info), Ok(rt)) = (self.info.lock().map(|i| i.clone()), tokio::runtime::Handle::try_current()) {
                let repo = self.repo.clone();
                rt.spawn(async move { remove(&repo, &info).await });
            }
        }
    }
}

async fn refresh_loop(repo: Repository, info: Arc<Mutex<LockInfo>>, lease: Lease, stop: CancellationToken) {
    let every = (lease.ttl / 5).max(Duration::from_millis(400));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Ok(cur) = info.lock().map(|i| i.clone()) else { return };
        if lease.check().is_err() {
            // Too late (the process was stopped, or the store unreachable): the lease is given up.
            tracing::warn!("lock {} in repository {} was not refreshed in time; its holder commits nothing more", cur.id, repo.location());
            return;
        }
        let mut next = cur.clone();
        // The lease is measured from when the refresh was sent, not from when the store
        // acknowledged it: other nodes see `refreshed_ms`, which is no later than this.
        let sent = Instant::now();
        next.refreshed_ms = mover_format::now_unix_ms().max(cur.refreshed_ms + 1);
        match repo.write_lock(&next, &stop).await {
            Ok(()) => {
                if let Ok(mut i) = info.lock() {
                    *i = next;
                }
                if let Ok(mut t) = lease.last_ok.lock() {
                    *t = (*t).max(sent);
                }
                // Append-only: the superseded object stays (the newest one is the lock's
                // state); gc on the maintenance node removes it once the lock is gone.
                if repo.append_only().is_none() {
                    if let Err(e) = repo.delete_object(&cur.object_name(), &stop).await {
                        tracing::warn!("removing superseded lock object {}: {e:#}", cur.object_name());
                    }
                }
            }
            Err(_) if stop.is_cancelled() => return,
            Err(e) => tracing::warn!("refreshing lock {} in repository {}: {e:#}", cur.id, repo.location()),
        }
    }
}

/// A lock as listed: its latest refresh, the objects that hold it, and why it is stale.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LockView {
    #[serde(flatten)]
    pub info: LockInfo,
    /// Every object of this lock (older refreshes a crash left behind included).
    pub objects: Vec<String>,
    /// `None` while the lock is live; otherwise why it is not.
    pub stale: Option<String>,
}

impl LockView {
    pub fn describe(&self) -> String {
        format!(
            "{} lock {} of process {} on {} (created {} ms, refreshed {} ms since the epoch)",
            self.info.kind, self.info.id, self.info.pid, self.info.hostname, self.info.created_ms, self.info.refreshed_ms
        )
    }
}

fn pid_gone(pid: u32) -> bool {
    matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None), Err(nix::errno::Errno::ESRCH))
}

/// Why a lock no longer protects anything, or `None` while it does: its lease has expired,
/// or its process is known to be gone — known only for a process of this machine's boot in
/// this PID namespace (containers on one node share the host name, not their process ids).
pub fn staleness(info: &LockInfo, now_ms: u64) -> Option<String> {
    if info.ttl_s == 0 {
        return Some("released (by an append-only node)".into());
    }
    if info.expired(now_ms) {
        return Some(format!("expired {} s ago", (now_ms - info.expires_ms()) / 1000));
    }
    if info.same_process_space() && info.pid != std::process::id() && pid_gone(info.pid) {
        return Some(format!("process {} on this host is gone", info.pid));
    }
    None
}

/// How far in the future a lock's name may lie (another node's clock) and still be taken
/// for a lock.
const MAX_NAME_SKEW_MS: u64 = 3_600_000;

/// Every lock in the repository. A lock whose object cannot be opened (damaged, or written
/// with another key) is reported live until its name's refresh time plus the default TTL,
/// unless that name lies more than an hour in the future (junk: stale).
pub async fn list(repo: &Repository, cancel: &CancellationToken) -> Result<Vec<LockView>> {
    let mut by_id: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for o in repo.list_objects(names::LOCKS_PREFIX, cancel).await? {
        if let Some((id, ms)) = lock::parse_name(&o.name) {
            by_id.entry(id).or_default().push((ms, o.name));
        }
    }
    let now = mover_format::now_unix_ms();
    let mut out = Vec::new();
    for (id, objs) in by_id {
        // A lock refreshed or released between the listing and the read: its objects are
        // listed again (only its own: on a busy fleet some lock always changes while all
        // are read, and listing everything again never ended). Released: it protects
        // nothing any more and is left out.
        let Some((objs, read)) = read_latest(repo, &id, objs, cancel).await? else { continue };
        let ms = objs.last().map(|(ms, _)| *ms).unwrap_or_default();
        let unreadable = read.is_err();
        let info = read.unwrap_or_else(|e| {
            tracing::warn!("{e:#}");
            LockInfo {
                id: id.clone(),
                kind: LockKind::Other("unknown".into()),
                hostname: "unknown".into(),
                boot_id: String::new(),
                pid_ns: String::new(),
                pid: 0,
                created_ms: ms,
                refreshed_ms: ms,
                ttl_s: default_ttl().as_secs(),
            }
        });
        // A lock that does not open and is named past any clock skew was not written by
        // a Mover (its name is its refresh time): junk that would otherwise look live
        // for ever and block gc. Stale; `unlock` removes it.
        let stale = match unreadable {
            true if ms > now.saturating_add(MAX_NAME_SKEW_MS) => {
                Some(format!("it does not open and is named {} s in the future: not a lock Mover wrote", (ms - now) / 1000))
            }
            _ => staleness(&info, now),
        };
        out.push(LockView { info, objects: objs.into_iter().map(|(_, n)| n).collect(), stale });
    }
    out.sort_by(|a, b| (a.info.created_ms, &a.info.id).cmp(&(b.info.created_ms, &b.info.id)));
    Ok(out)
}

/// The newest object of lock `id` (listed as `objs`), read: its objects (sorted) and what
/// reading it gave; `None` when the lock is gone (released). An object gone before it
/// was read (refreshed) makes the lock's own objects listed again, a few times.
async fn read_latest(
    repo: &Repository,
    id: &str,
    mut objs: Vec<(u64, String)>,
    cancel: &CancellationToken,
) -> Result<Option<(Vec<(u64, String)>, std::result::Result<LockInfo, mover_format::RepoError>)>> {
    for _attempt in 0..5 {
        objs.sort();
        let Some((_, latest)) = objs.last().cloned() else { return Ok(None) };
        match repo.read_lock(&latest, cancel).await {
            Err(mover_format::RepoError::Storage(e)) if e.is_not_found() => {}
            Err(e) if e.is_cancelled() => return Err(e.into()),
            r => return Ok(Some((objs, r))),
        }
        objs = repo
            .list_objects(&format!("{}{id}-", names::LOCKS_PREFIX), cancel)
            .await?
            .into_iter()
            .filter_map(|o| lock::parse_name(&o.name).filter(|(i, _)| i == id).map(|(_, ms)| (ms, o.name)))
            .collect();
    }
    Err(Error::transient(format!("lock {id} in repository {} kept changing while being read", repo.location())))
}

/// Removes stale locks (all locks with `force`); returns what was removed.
pub async fn unlock(repo: &Repository, force: bool, cancel: &CancellationToken) -> Result<Vec<LockView>> {
    repo.require_deletes("unlock", cancel).await?;
    let mut removed = Vec::new();
    for l in list(repo, cancel).await? {
        if l.stale.is_some() || force {
            for o in &l.objects {
                repo.delete_object(o, cancel).await?;
            }
            removed.push(l);
        }
    }
    Ok(removed)
}
