//! A repository: a [`Storage`] plus the unlocked keys and the config. Every object goes
//! through here, so every error names the object and the repository.

use crate::blob;
use crate::chunker::{Chunker, ChunkerParams};
use crate::config::{CompressionConfig, RepoConfig, DEFAULT_PACK_SIZE};
use crate::crypto::{KdfParams, KeyFile, Keys, MasterKey};
use crate::error::{FormatError, RepoError};
use crate::id::{content_id, ChunkId, IndexId, KeyId, PackId, SnapshotId};
use crate::index::{self, BlobLocation, IndexEntry};
use crate::manifest::Manifest;
use crate::names;
use crate::pack::{self, PackBuilder, PackEntry, FOOTER_LEN};
use crate::retry::{retry, RetryPolicy};
use crate::storage::{list_all, PutOutcome, Storage};
use bytes::Bytes;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

/// Parameters of a new repository.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub compression: CompressionConfig,
    pub pack_size: u32,
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self { chunker: ChunkerParams::default(), compression: CompressionConfig::default(), pack_size: DEFAULT_PACK_SIZE, kdf: KdfParams::default() }
    }
}

struct Inner {
    storage: Arc<dyn Storage>,
    config: RepoConfig,
    keys: Keys,
    key_id: KeyId,
    retry: RetryPolicy,
    /// Where snapshot manifests read from the store are kept, sealed as stored (see
    /// [`Repository::cache_manifests_in`]).
    manifest_cache: std::sync::OnceLock<std::path::PathBuf>,
    /// Blob locations this handle found damaged (a blob that failed to decode, a pack that
    /// is missing), not yet written to a quarantine record ([`Repository::take_damage_seen`]).
    damage_seen: std::sync::Mutex<Vec<crate::quarantine::Damaged>>,
    /// What listings need of every snapshot this handle has read (a few dozen bytes each),
    /// so that the next reads only manifests listed since ([`Repository::snapshot_rows`]).
    rows: std::sync::Mutex<std::collections::HashMap<SnapshotId, SnapshotRow>>,
    /// Whether this handle may delete: [`DELETES_ALLOWED`], or append-only because it was
    /// configured so ([`APPEND_ONLY_CONFIGURED`]) or the store refused a delete
    /// ([`APPEND_ONLY_REFUSED`]); `docs/immutability.md`.
    deletes: std::sync::atomic::AtomicU8,
    /// The newest journal entry this handle knows of: where the next append looks from.
    journal_head: std::sync::Mutex<Option<crate::journal::Head>>,
}

/// What listings need of a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotRow {
    pub id: SnapshotId,
    pub group: String,
    pub time_unix_ms: u64,
    /// Bytes of all its volumes.
    pub size: u64,
}

impl SnapshotRow {
    pub fn of(id: SnapshotId, m: &Manifest) -> Self {
        Self { id, group: m.group(), time_unix_ms: m.time_unix_ms, size: m.volumes.iter().map(|v| v.size).sum() }
    }
}

/// An open repository; cheap to clone.
#[derive(Clone)]
pub struct Repository {
    inner: Arc<Inner>,
}

/// [`Inner::deletes`]: deletes allowed (as far as this handle knows).
const DELETES_ALLOWED: u8 = 0;
/// Append-only by configuration.
const APPEND_ONLY_CONFIGURED: u8 = 1;
/// Append-only because the store refused a delete.
const APPEND_ONLY_REFUSED: u8 = 2;
/// A probe object was deleted ([`Repository::require_deletes`]): not asked again.
const DELETES_VERIFIED: u8 = 3;

/// Why and since when a snapshot is protected from `forget` (`protected/<id>`, sealed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Protection {
    pub time_unix_ms: u64,
    pub hostname: String,
    /// What the operator wrote (`mover protect --note`).
    #[serde(default)]
    pub note: String,
}

/// What one listing of `gc/` holds.
#[derive(Debug, Clone, Default)]
pub struct GcListing {
    /// `(record, has .entries, has .ready)`, in name order.
    pub records: Vec<(String, bool, bool)>,
    /// Generation marker names, oldest first: a gc writes a new one after it deletes index
    /// segments, so a node whose newest marker is unchanged since its last full listing
    /// knows no segment it holds was deleted since, and lists only what is new.
    pub generations: Vec<String>,
}

impl GcListing {
    /// The newest marker, or `"none"`: what a node compares with the one it last synced at.
    pub fn generation(&self) -> String {
        self.generations.last().cloned().unwrap_or_else(|| "none".into())
    }
}

impl Repository {
    /// A handle on a repository whose config and key were just read or written.
    fn opened(storage: Arc<dyn Storage>, config: RepoConfig, keys: Keys, key_id: KeyId, retry: RetryPolicy) -> Self {
        let inner = Inner {
            storage,
            config,
            keys,
            key_id,
            retry,
            manifest_cache: Default::default(),
            damage_seen: Default::default(),
            rows: Default::default(),
            deletes: Default::default(),
            journal_head: Default::default(),
        };
        Self { inner: Arc::new(inner) }
    }
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repository({}, id {})", self.location(), self.inner.config.id)
    }
}

/// Key files tried when opening a repository.
pub const MAX_KEY_FILES: usize = 64;

/// Reads a whole object, bounded by the largest object of its kind ([`names::max_len`]).
async fn get_retry(s: &dyn Storage, policy: &RetryPolicy, name: &str, cancel: &CancellationToken) -> Result<Bytes, RepoError> {
    Ok(retry(policy, cancel, || s.get(name, names::max_len(name), cancel)).await?)
}

impl Repository {
    /// Creates a repository in an empty store: a key file, then the config (create-only;
    /// a concurrent `init` that loses the race fails with `AlreadyInitialised`).
    pub async fn init(storage: Arc<dyn Storage>, password: &[u8], opts: InitOptions, cancel: &CancellationToken) -> Result<Self, RepoError> {
        let policy = RetryPolicy::default();
        let loc = storage.location().to_string();
        if password.is_empty() {
            return Err(RepoError::Invalid(format!("repository {loc}: the password is empty")));
        }
        opts.chunker.validate().map_err(|e| RepoError::Invalid(format!("repository {loc}: {e}")))?;
        if retry(&policy, cancel, || storage.head(names::CONFIG, cancel)).await?.is_some() {
            return Err(RepoError::AlreadyInitialised { location: loc });
        }
        let master = MasterKey::generate();
        let keys = Keys::derive(&master);
        let config = RepoConfig::new(opts.chunker, opts.compression, opts.pack_size);
        let kf = KeyFile::wrap(&master, password, opts.kdf).map_err(|e| fmt_err(&loc, "new key file", e))?;
        let kbytes = kf.to_bytes().map_err(|e| fmt_err(&loc, "new key file", e))?;
        let key_id = KeyId(content_id(&kbytes));
        let kname = names::key(&key_id);
        retry(&policy, cancel, || storage.put(&kname, Bytes::from(kbytes.clone()), cancel)).await?;
        let cbytes = config.to_bytes(&keys).map_err(|e| fmt_err(&loc, names::CONFIG, e))?;
        let out = retry(&policy, cancel, || storage.put(names::CONFIG, Bytes::from(cbytes.clone()), cancel)).await?;
        if out == PutOutcome::Existed {
            // Our own write may have landed before a retry found it: the same bytes are ours.
            let stored = get_retry(&*storage, &policy, names::CONFIG, cancel).await?;
            if stored[..] != cbytes[..] {
                // Another init won. Our key file wraps a master key that config was not made
                // with, so it cannot open this repository: removing it loses nothing.
                let _ = storage.delete(&kname, cancel).await;
                return Err(RepoError::AlreadyInitialised { location: loc });
            }
        }
        Ok(Self::opened(storage, config, keys, key_id, policy))
    }

    /// Opens an existing repository with a password.
    pub async fn open(storage: Arc<dyn Storage>, password: &[u8], cancel: &CancellationToken) -> Result<Self, RepoError> {
        let policy = RetryPolicy::default();
        let loc = storage.location().to_string();
        // The config read and the key files listed at once: against a distant store each
        // is a round trip, and neither needs the other. The config's answer is judged first,
        // so an uninitialised repository is reported as such.
        let (config, keys) = tokio::join!(
            retry(&policy, cancel, || storage.get(names::CONFIG, names::max_len(names::CONFIG), cancel)),
            retry(&policy, cancel, || list_all(&*storage, names::KEYS_PREFIX, cancel))
        );
        let cbytes = match config {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(RepoError::NotInitialised { location: loc }),
            Err(e) => return Err(e.into()),
        };
        let (config, mac, mac_at) = match RepoConfig::parse_unverified(&cbytes) {
            Ok(v) => v,
            Err(FormatError::UnsupportedVersion(v)) => {
                return Err(RepoError::UnsupportedVersion { location: loc, found: v, supported: crate::file_formats::FORMAT_VERSION })
            }
            Err(e) => return Err(fmt_err(&loc, names::CONFIG, e)),
        };
        let key_objects = keys?;
        // Each key file costs a key derivation (0.2 s, 64 MiB by default): a store full of
        // them must not make opening take hours.
        if key_objects.len() > MAX_KEY_FILES {
            return Err(RepoError::Invalid(format!(
                "repository {loc}: {} key files, more than the {MAX_KEY_FILES} Mover tries; remove the ones no longer used (mover key list/remove)",
                key_objects.len()
            )));
        }
        let mut opened = None;
        // A key file that cannot be used (damaged, or asking for absurd key-derivation
        // costs) is skipped; it is reported when no other key opens the repository.
        let mut unusable = None;
        for obj in &key_objects {
            let kb = get_retry(&*storage, &policy, &obj.name, cancel).await?;
            // The key derivation (argon2id, ~0.15 s) off the reactor: the create-only probe
            // and other start-up requests of the caller go on meanwhile.
            let (kb2, pw) = (kb.clone(), zeroize::Zeroizing::new(password.to_vec()));
            let unwrapped = match tokio::task::spawn_blocking(move || KeyFile::from_bytes(&kb2).and_then(|kf| kf.unwrap_key(&pw))).await {
                Ok(u) => u,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return Err(RepoError::Cancelled),
            };
            match unwrapped {
                Ok(Some(master)) => {
                    let id = names::parse_id::<KeyId>(&obj.name).unwrap_or(KeyId(content_id(&kb)));
                    opened = Some((master, id));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    unusable.get_or_insert(fmt_err(&loc, &obj.name, e));
                }
            }
        }
        let (master, key_id) = match (opened, unusable) {
            (Some(o), Some(skipped)) => {
                tracing::warn!("{skipped} (skipped; another key file opened the repository)");
                o
            }
            (Some(o), None) => o,
            (None, Some(e)) => return Err(e),
            (None, None) => return Err(RepoError::WrongPassword { location: loc.clone() }),
        };
        let keys = Keys::derive(&master);
        if keys.config_mac(&cbytes[..mac_at]) != mac {
            return Err(RepoError::ConfigMismatch { location: loc });
        }
        Ok(Self::opened(storage, config, keys, key_id, policy))
    }

    pub fn location(&self) -> &str {
        self.inner.storage.location()
    }
    /// Whether the store is reached over a network ([`Storage::is_remote`]).
    pub fn is_remote(&self) -> bool {
        self.inner.storage.is_remote()
    }
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }
    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }
    pub fn key_id(&self) -> KeyId {
        self.inner.key_id
    }
    pub fn chunker(&self) -> Chunker {
        Chunker::new(&self.inner.config.chunker, self.inner.keys.gear())
    }
    fn err(&self, object: &str, e: FormatError) -> RepoError {
        fmt_err(self.location(), object, e)
    }

    // ---- raw objects, with retries ----

    pub async fn put_object(&self, name: &str, bytes: Bytes, cancel: &CancellationToken) -> Result<PutOutcome, RepoError> {
        let s = &self.inner.storage;
        Ok(retry(&self.inner.retry, cancel, || s.put(name, bytes.clone(), cancel)).await?)
    }
    pub async fn get_object(&self, name: &str, cancel: &CancellationToken) -> Result<Bytes, RepoError> {
        get_retry(&*self.inner.storage, &self.inner.retry, name, cancel).await
    }
    pub async fn get_object_range(&self, name: &str, offset: u64, len: u64, cancel: &CancellationToken) -> Result<Bytes, RepoError> {
        let s = &self.inner.storage;
        Ok(retry(&self.inner.retry, cancel, || s.get_range(name, offset, len, cancel)).await?)
    }
    pub async fn head_object(&self, name: &str, cancel: &CancellationToken) -> Result<Option<u64>, RepoError> {
        let s = &self.inner.storage;
        Ok(retry(&self.inner.retry, cancel, || s.head(name, cancel)).await?)
    }
    /// Deletes `name`. An append-only handle refuses without asking the store; a store
    /// that refuses (these credentials may not delete) makes the handle append-only.
    pub async fn delete_object(&self, name: &str, cancel: &CancellationToken) -> Result<(), RepoError> {
        if let Some(why) = self.append_only() {
            return Err(RepoError::Storage(crate::storage::StorageError::new(crate::storage::ErrorKind::Denied, "deleting", name, self.location(), why)));
        }
        let s = &self.inner.storage;
        let r = retry(&self.inner.retry, cancel, || s.delete(name, cancel)).await;
        if let Err(e) = &r {
            if e.kind == crate::storage::ErrorKind::Denied {
                self.inner.deletes.store(APPEND_ONLY_REFUSED, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(r?)
    }

    /// Makes this handle append-only: it creates objects and never deletes one (locks are
    /// released by a newer lock object that says so; `docs/immutability.md`).
    pub fn set_append_only(&self) {
        self.inner.deletes.store(APPEND_ONLY_CONFIGURED, std::sync::atomic::Ordering::Relaxed);
    }

    /// Why this handle does not delete, or `None` while it may.
    pub fn append_only(&self) -> Option<&'static str> {
        match self.inner.deletes.load(std::sync::atomic::Ordering::Relaxed) {
            DELETES_ALLOWED | DELETES_VERIFIED => None,
            APPEND_ONLY_CONFIGURED => Some("this node is append-only (MOVER_APPEND_ONLY or the repository's append_only): it never deletes"),
            _ => Some("the store refuses these credentials deletes (an append-only identity)"),
        }
    }

    /// Fails unless this handle may delete, asking the store when it is not known: a probe
    /// object is written and deleted (with credentials that may not delete, it stays, under
    /// `probe/`, until a gc with maintenance credentials removes it). For the operations
    /// that delete — `forget`, `gc`, `unprotect`, `unlock`, removing a key — before they
    /// change anything.
    pub async fn require_deletes(&self, what: &str, cancel: &CancellationToken) -> Result<(), RepoError> {
        if self.inner.deletes.load(std::sync::atomic::Ordering::Relaxed) == DELETES_VERIFIED {
            return Ok(());
        }
        if self.append_only().is_none() {
            let name = names::probe(&format!("deletes-{}", names::probe_stamp()));
            self.put_object(&name, Bytes::from_static(b"may this identity delete?\n"), cancel).await?;
            match self.delete_object(&name, cancel).await {
                Ok(()) => {
                    let _ = self.inner.deletes.compare_exchange(
                        DELETES_ALLOWED,
                        DELETES_VERIFIED,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    return Ok(());
                }
                Err(RepoError::Storage(e)) if e.kind == crate::storage::ErrorKind::Denied => {}
                Err(e) => return Err(e),
            }
        }
        let why = self.append_only().unwrap_or("deletes are refused");
        Err(RepoError::Storage(crate::storage::StorageError::new(
            crate::storage::ErrorKind::Denied,
            "checking the right to delete",
            names::PROBE_PREFIX,
            self.location(),
            format!("{what} deletes objects, and {why}; nothing was changed. Run it where the repository's maintenance credentials are configured (docs/immutability.md)"),
        )))
    }
    pub async fn list_objects(&self, prefix: &str, cancel: &CancellationToken) -> Result<Vec<crate::storage::ObjectMeta>, RepoError> {
        let s = &self.inner.storage;
        Ok(retry(&self.inner.retry, cancel, || list_all(&**s, prefix, cancel)).await?)
    }

    // ---- packs ----

    /// Seals the trailer, uploads the pack; returns its id, index entries and size.
    /// Durable when it returns.
    pub async fn write_pack(&self, builder: PackBuilder, cancel: &CancellationToken) -> Result<(PackId, Vec<IndexEntry>, u64), RepoError> {
        let (id, bytes, entries) = builder.finish(self.keys()).map_err(|e| self.err("new pack", e))?;
        let size = bytes.len() as u64;
        self.put_object(&names::pack(&id), bytes, cancel).await?;
        Ok((id, entries.iter().map(|e| IndexEntry::from_pack(id, e)).collect(), size))
    }

    pub async fn list_packs(&self, cancel: &CancellationToken) -> Result<Vec<(PackId, u64)>, RepoError> {
        let objs = self.list_objects(names::PACKS_PREFIX, cancel).await?;
        Ok(objs.into_iter().filter_map(|o| names::parse_id::<PackId>(&o.name).map(|id| (id, o.size))).collect())
    }

    /// Reads a pack's trailer with two ranged reads.
    pub async fn read_pack_trailer(&self, id: &PackId, cancel: &CancellationToken) -> Result<Vec<PackEntry>, RepoError> {
        let name = names::pack(id);
        let size =
            self.head_object(&name, cancel).await?.ok_or_else(|| RepoError::NotFound { what: format!("pack {id}"), location: self.location().into() })?;
        if size < (8 + FOOTER_LEN) as u64 {
            return Err(self.err(&name, FormatError::Corrupt(format!("pack is only {size} bytes"))));
        }
        // The trailer lies within the pack, and no pack is larger than its kind's bound:
        // a store that lies about a size cannot make `index rebuild` read without limit.
        if size > names::max_len(&name) {
            return Err(crate::storage::too_large("reading the trailer of", &name, self.location(), size, names::max_len(&name)).into());
        }
        let footer = self.get_object_range(&name, size - FOOTER_LEN as u64, FOOTER_LEN as u64, cancel).await?;
        let (start, tlen) = pack::parse_footer(&footer, size).map_err(|e| self.err(&name, e))?;
        let sealed = self.get_object_range(&name, start, tlen as u64, cancel).await?;
        let plain = self
            .keys()
            .open(&sealed, crate::file_formats::PACK_TRAILER_AAD)
            .ok_or_else(|| self.err(&name, FormatError::Corrupt("pack trailer fails authentication".into())))?;
        pack::decode_trailer(&plain, start).map_err(|e| self.err(&name, e))
    }

    /// Reads, decrypts, decompresses and verifies one blob.
    pub async fn read_blob(&self, id: &ChunkId, loc: &BlobLocation, cancel: &CancellationToken) -> Result<Vec<u8>, RepoError> {
        let name = names::pack(&loc.pack);
        let sealed = match self.get_object_range(&name, loc.offset as u64, loc.stored_len as u64, cancel).await {
            Ok(b) => b,
            Err(RepoError::Storage(e)) if e.is_not_found() => {
                self.saw_damage(id, &loc.pack, "pack is missing");
                return Err(RepoError::BadChunk { chunk: *id, pack: loc.pack, location: self.location().into(), what: "pack is missing".into() });
            }
            Err(RepoError::Storage(e)) if e.kind == crate::storage::ErrorKind::Permanent => {
                return Err(RepoError::BadChunk {
                    chunk: *id,
                    pack: loc.pack,
                    location: self.location().into(),
                    what: format!("pack is truncated or unreadable: {}", e.message),
                })
            }
            Err(e) => return Err(e),
        };
        self.decode_blob(id, loc, &sealed)
    }

    /// Decodes a blob already fetched (e.g. from a larger ranged read of its pack).
    pub fn decode_blob(&self, id: &ChunkId, loc: &BlobLocation, sealed: &[u8]) -> Result<Vec<u8>, RepoError> {
        blob::decode(self.keys(), id, sealed, loc.raw_len).map_err(|e| self.bad_chunk(id, loc, e))
    }

    /// [`Repository::decode_blob`] into `out` (exactly `loc.raw_len` bytes), opening the
    /// blob where it lies: `sealed` is overwritten.
    pub fn decode_blob_into(&self, id: &ChunkId, loc: &BlobLocation, sealed: &mut [u8], out: &mut [u8]) -> Result<(), RepoError> {
        blob::decode_in_place(self.keys(), id, sealed, out).map_err(|e| self.bad_chunk(id, loc, e))
    }

    fn bad_chunk(&self, id: &ChunkId, loc: &BlobLocation, e: FormatError) -> RepoError {
        self.saw_damage(id, &loc.pack, &e.to_string());
        RepoError::BadChunk { chunk: *id, pack: loc.pack, location: self.location().into(), what: e.to_string() }
    }

    /// Notes a blob location found damaged, for the next [`Repository::take_damage_seen`].
    fn saw_damage(&self, id: &ChunkId, pack: &crate::PackId, what: &str) {
        let mut seen = self.inner.damage_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() < crate::quarantine::MAX_ENTRIES && !seen.iter().any(|d| d.chunk == *id && d.pack == *pack) {
            seen.push(crate::quarantine::Damaged { chunk: *id, pack: *pack, problem: what.to_string() });
        }
    }

    /// The blob locations this handle (and its clones) found damaged since the last call:
    /// blobs that failed authentication or decoding, blobs in packs that are missing.
    /// Transport errors are not damage and are not listed.
    pub fn take_damage_seen(&self) -> Vec<crate::quarantine::Damaged> {
        std::mem::take(&mut *self.inner.damage_seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    // ---- quarantine ----

    /// Writes a quarantine record; returns its object name.
    pub async fn write_quarantine(&self, q: &crate::quarantine::Quarantine, cancel: &CancellationToken) -> Result<String, RepoError> {
        let name = names::quarantine(q.time_unix_ms, rand::random());
        self.put_sealed(&name, self.keys().seal_json(&crate::file_formats::QUARANTINE_MAGIC, q, "quarantine record"), cancel).await?;
        Ok(name)
    }

    /// Protects snapshot `id` from `forget` (`docs/repo-format.md`); `false` when it already
    /// was (the first protection stays).
    pub async fn write_protection(&self, id: &SnapshotId, p: &Protection, cancel: &CancellationToken) -> Result<bool, RepoError> {
        let name = names::protection(id);
        let bytes = self.keys().seal_json(&crate::file_formats::PROTECTION_MAGIC, p, "protection").map_err(|e| self.err(&name, e))?;
        Ok(self.put_object(&name, Bytes::from(bytes), cancel).await? == crate::storage::PutOutcome::Created)
    }

    /// The protection of snapshot `id`, if it has one.
    pub async fn read_protection(&self, id: &SnapshotId, cancel: &CancellationToken) -> Result<Option<Protection>, RepoError> {
        let name = names::protection(id);
        match self.get_object(&name, cancel).await {
            Ok(bytes) => Ok(Some(self.keys().open_json(&crate::file_formats::PROTECTION_MAGIC, &bytes, "protection").map_err(|e| self.err(&name, e))?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes snapshot `id`'s protection (a missing one is not an error).
    pub async fn delete_protection(&self, id: &SnapshotId, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.delete_object(&names::protection(id), cancel).await
    }

    /// The protected snapshots (names only: a protection is its name).
    pub async fn list_protected(&self, cancel: &CancellationToken) -> Result<std::collections::HashSet<SnapshotId>, RepoError> {
        Ok(self.list_objects(names::PROTECTED_PREFIX, cancel).await?.into_iter().filter_map(|o| names::parse_id(&o.name)).collect())
    }

    /// Quarantine record names, oldest first.
    pub async fn list_quarantine(&self, cancel: &CancellationToken) -> Result<Vec<String>, RepoError> {
        let mut out: Vec<String> = self.list_objects(names::QUARANTINE_PREFIX, cancel).await?.into_iter().map(|o| o.name).collect();
        out.sort();
        Ok(out)
    }

    pub async fn read_quarantine(&self, name: &str, cancel: &CancellationToken) -> Result<crate::quarantine::Quarantine, RepoError> {
        let bytes = self.get_object(name, cancel).await?;
        self.keys().open_json(&crate::file_formats::QUARANTINE_MAGIC, &bytes, "quarantine record").map_err(|e| self.err(name, e))
    }

    // ---- index segments ----

    /// Writes an index segment. Call only after every pack it names is durable.
    pub async fn write_index(&self, entries: &[IndexEntry], cancel: &CancellationToken) -> Result<IndexId, RepoError> {
        let bytes = index::seal(self.keys(), entries).map_err(|e| self.err("new index segment", e))?;
        let id = IndexId::timed(crate::now_unix_ms(), &bytes);
        self.put_object(&names::index(&id), Bytes::from(bytes), cancel).await?;
        Ok(id)
    }

    /// The index segments sealed at `ms` or later by their writers' clocks (and the few
    /// first-format segments whose random names sort after that): one listing page for
    /// what was added since then, however many segments the store holds.
    pub async fn list_index_since(&self, ms: u64, cancel: &CancellationToken) -> Result<Vec<(IndexId, u64)>, RepoError> {
        let after = names::index(&IndexId::timed_floor(ms));
        let s = &self.inner.storage;
        let objs = retry(&self.inner.retry, cancel, || crate::storage::list_all_after(&**s, names::INDEX_PREFIX, Some(&after), cancel)).await?;
        Ok(objs.into_iter().filter_map(|o| names::parse_id(&o.name).map(|id| (id, o.size))).collect())
    }

    pub async fn list_index(&self, cancel: &CancellationToken) -> Result<Vec<IndexId>, RepoError> {
        Ok(self.list_index_sized(cancel).await?.into_iter().map(|(id, _)| id).collect())
    }

    /// The index segments with their stored sizes.
    pub async fn list_index_sized(&self, cancel: &CancellationToken) -> Result<Vec<(IndexId, u64)>, RepoError> {
        let objs = self.list_objects(names::INDEX_PREFIX, cancel).await?;
        Ok(objs.into_iter().filter_map(|o| names::parse_id(&o.name).map(|id| (id, o.size))).collect())
    }

    pub async fn read_index(&self, id: &IndexId, cancel: &CancellationToken) -> Result<Vec<IndexEntry>, RepoError> {
        let name = names::index(id);
        let bytes = self.get_object(&name, cancel).await?;
        if !id.names(&bytes) {
            return Err(self.err(&name, FormatError::Corrupt("content does not hash to its name".into())));
        }
        index::open(self.keys(), &bytes).map_err(|e| self.err(&name, e))
    }

    // ---- locks and gc records ----

    /// Writes a lock as of its `refreshed_ms` (a new object per refresh).
    /// Stores a sealed object under `name` (a sealing error is named after the object).
    async fn put_sealed(&self, name: &str, sealed: Result<Vec<u8>, FormatError>, cancel: &CancellationToken) -> Result<(), RepoError> {
        let bytes = sealed.map_err(|e| self.err(name, e))?;
        self.put_object(name, Bytes::from(bytes), cancel).await?;
        Ok(())
    }

    /// Reads the object `name` and opens it with `open`.
    async fn get_opened<T>(&self, name: &str, open: fn(&Keys, &[u8]) -> Result<T, FormatError>, cancel: &CancellationToken) -> Result<T, RepoError> {
        let bytes = self.get_object(name, cancel).await?;
        open(self.keys(), &bytes).map_err(|e| self.err(name, e))
    }

    pub async fn write_lock(&self, lock: &crate::lock::LockInfo, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.put_sealed(&lock.object_name(), lock.seal(self.keys()), cancel).await
    }

    pub async fn read_lock(&self, name: &str, cancel: &CancellationToken) -> Result<crate::lock::LockInfo, RepoError> {
        self.get_opened(name, crate::lock::LockInfo::open, cancel).await
    }

    /// Writes a GC record's entries (`gc/<record>.entries`).
    pub async fn write_pending(&self, record: &str, p: &crate::pending::PendingDeletion, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.put_sealed(&names::gc_entries(record), p.seal(self.keys()), cancel).await
    }

    pub async fn read_pending(&self, record: &str, cancel: &CancellationToken) -> Result<crate::pending::PendingDeletion, RepoError> {
        self.get_opened(&names::gc_entries(record), crate::pending::PendingDeletion::open, cancel).await
    }

    pub async fn write_ready(&self, record: &str, r: &crate::pending::Ready, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.put_sealed(&names::gc_ready(record), r.seal(self.keys()), cancel).await
    }

    pub async fn read_ready(&self, record: &str, cancel: &CancellationToken) -> Result<crate::pending::Ready, RepoError> {
        self.get_opened(&names::gc_ready(record), crate::pending::Ready::open, cancel).await
    }

    /// Writes a report (a verify or drill result: JSON, sealed) of `kind` (lowercase
    /// letters); returns its object name.
    pub async fn write_report<T: serde::Serialize>(&self, kind: &str, report: &T, cancel: &CancellationToken) -> Result<String, RepoError> {
        if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(RepoError::Invalid(format!("report kind '{kind}' must be lowercase letters")));
        }
        let name = names::report(crate::now_unix_ms(), kind, rand::random());
        self.put_sealed(&name, self.keys().seal_json(&crate::file_formats::REPORT_MAGIC, report, "report"), cancel).await?;
        Ok(name)
    }

    /// Report objects: `(name, created ms, kind)`, oldest first.
    pub async fn list_reports(&self, cancel: &CancellationToken) -> Result<Vec<(String, u64, String)>, RepoError> {
        let mut out: Vec<(String, u64, String)> = self
            .list_objects(names::REPORTS_PREFIX, cancel)
            .await?
            .into_iter()
            .filter_map(|o| names::parse_report(&o.name).map(|(ms, k)| (o.name, ms, k)))
            .collect();
        out.sort();
        Ok(out)
    }

    pub async fn read_report<T: serde::de::DeserializeOwned>(&self, name: &str, cancel: &CancellationToken) -> Result<T, RepoError> {
        let bytes = self.get_object(name, cancel).await?;
        self.keys().open_json(&crate::file_formats::REPORT_MAGIC, &bytes, "report").map_err(|e| self.err(name, e))
    }

    /// GC records in the store: `(record, has .entries, has .ready)`, in name order.
    pub async fn list_gc_records(&self, cancel: &CancellationToken) -> Result<Vec<(String, bool, bool)>, RepoError> {
        Ok(self.list_gc(cancel).await?.records)
    }

    /// One listing of `gc/`: the records and the newest generation marker.
    pub async fn list_gc(&self, cancel: &CancellationToken) -> Result<GcListing, RepoError> {
        let mut out: std::collections::BTreeMap<String, (bool, bool)> = Default::default();
        let mut generations = Vec::new();
        for o in self.list_objects(names::GC_PREFIX, cancel).await? {
            let base = &o.name[names::GC_PREFIX.len()..];
            if let Some(r) = base.strip_suffix(".entries") {
                out.entry(r.to_string()).or_default().0 = true;
            } else if let Some(r) = base.strip_suffix(".ready") {
                out.entry(r.to_string()).or_default().1 = true;
            } else if names::parse_generation(&o.name).is_some() {
                generations.push(o.name);
            }
        }
        generations.sort();
        Ok(GcListing { records: out.into_iter().map(|(r, (e, d))| (r, e, d)).collect(), generations })
    }

    /// Writes the next generation marker (`docs/gc.md`: after a gc deletes index segments
    /// and before it lists the locks for a record's `.ready`), and removes all but the
    /// newest few. Only under the `gc` lock: the counter is the newest marker's plus one.
    pub async fn write_generation(&self, cancel: &CancellationToken) -> Result<String, RepoError> {
        let had = self.list_gc(cancel).await?.generations;
        let next = had.last().and_then(|n| names::parse_generation(n)).map_or(1, |g| g + 1);
        let name = names::generation(next, rand::random());
        self.put_object(&name, Bytes::from_static(b"gc generation\n"), cancel).await?;
        for old in had.iter().rev().skip(2) {
            self.delete_object(old, cancel).await?;
        }
        Ok(name)
    }

    // ---- journal ----

    /// Appends `event` to the journal as its next entry; returns its number. Concurrent
    /// appenders race for each number with create-only writes; the loser looks again.
    pub async fn journal_append(&self, event: crate::journal::JournalEvent, cancel: &CancellationToken) -> Result<u64, RepoError> {
        use crate::journal::{link, Head, JournalEntry};
        let mut known = self.inner.journal_head.lock().ok().and_then(|h| h.clone());
        for attempt in 0..64u32 {
            // The newest entry after the one known (one LIST page after the first append).
            let after = known.as_ref().map(|h| names::journal(h.seq));
            let s = &self.inner.storage;
            let listed = retry(&self.inner.retry, cancel, || crate::storage::list_all_after(&**s, names::JOURNAL_PREFIX, after.as_deref(), cancel)).await?;
            if let Some(newest) = listed.iter().filter_map(|o| names::parse_journal(&o.name)).max() {
                let bytes = self.get_object(&names::journal(newest), cancel).await?;
                known = Some(Head { seq: newest, hash: link(&bytes) });
            }
            let seq = known.as_ref().map_or(1, |h| h.seq + 1);
            let entry = JournalEntry {
                seq,
                prev: known.as_ref().map(|h| h.hash.clone()).unwrap_or_default(),
                time_unix_ms: crate::now_unix_ms(),
                hostname: crate::hostname(),
                event: event.clone(),
            };
            let bytes = self.keys().seal_json(&crate::file_formats::JOURNAL_MAGIC, &entry, "journal entry").map_err(|e| self.err("journal entry", e))?;
            let hash = link(&bytes);
            if self.put_object(&names::journal(seq), Bytes::from(bytes), cancel).await? == PutOutcome::Created {
                if let Ok(mut h) = self.inner.journal_head.lock() {
                    *h = Some(Head { seq, hash });
                }
                return Ok(seq);
            }
            // Another writer took `seq`: look again after a short, random pause.
            let pause = std::time::Duration::from_millis(5 + rand::random::<u64>() % (10 + 10 * attempt.min(20) as u64));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = cancel.cancelled() => return Err(RepoError::Cancelled),
            }
        }
        Err(RepoError::Invalid(format!("journal of repository {}: could not take a number in 64 attempts (too many writers at once)", self.location())))
    }

    /// Every journal entry, in order: its number and what reading it gave (the entry and the
    /// hash the next one must name), read 16 at a time.
    #[allow(clippy::type_complexity)]
    pub async fn read_journal(&self, cancel: &CancellationToken) -> Result<Vec<(u64, Result<(crate::journal::JournalEntry, String), RepoError>)>, RepoError> {
        use futures::StreamExt;
        let mut seqs: Vec<u64> = self.list_objects(names::JOURNAL_PREFIX, cancel).await?.iter().filter_map(|o| names::parse_journal(&o.name)).collect();
        seqs.sort_unstable();
        let out = futures::stream::iter(seqs)
            .map(|seq| async move {
                let name = names::journal(seq);
                let r = match self.get_object(&name, cancel).await {
                    Ok(bytes) => self
                        .keys()
                        .open_json::<crate::journal::JournalEntry>(&crate::file_formats::JOURNAL_MAGIC, &bytes, "journal entry")
                        .map_err(|e| self.err(&name, e))
                        .map(|e| (e, crate::journal::link(&bytes))),
                    Err(e) => Err(e),
                };
                (seq, r)
            })
            .buffered(16)
            .collect::<Vec<_>>()
            .await;
        Ok(out)
    }

    /// The journal entries after entry `seq` that open (a second look, for `check`).
    pub async fn read_journal_after(&self, seq: u64, cancel: &CancellationToken) -> Result<Vec<crate::journal::JournalEntry>, RepoError> {
        let after = names::journal(seq);
        let s = &self.inner.storage;
        let listed = retry(&self.inner.retry, cancel, || crate::storage::list_all_after(&**s, names::JOURNAL_PREFIX, Some(&after), cancel)).await?;
        let mut out = Vec::new();
        for o in listed {
            if names::parse_journal(&o.name).is_none() {
                continue;
            }
            let bytes = self.get_object(&o.name, cancel).await?;
            if let Ok(e) = self.keys().open_json(&crate::file_formats::JOURNAL_MAGIC, &bytes, "journal entry") {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// The journal head this node verified last (`check`), kept beside the manifests
    /// ([`Repository::cache_manifests_in`]); `None` without a cache or a check before.
    pub fn remembered_journal_head(&self) -> Option<crate::journal::Head> {
        let f = self.inner.manifest_cache.get()?.parent()?.join("journal-head.json");
        serde_json::from_slice(&std::fs::read(f).ok()?).ok()
    }

    /// Keeps `head` as the journal head this node verified.
    pub fn remember_journal_head(&self, head: &crate::journal::Head) -> std::io::Result<()> {
        let Some(dir) = self.inner.manifest_cache.get().and_then(|d| d.parent()) else { return Ok(()) };
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("journal-head.json.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(head).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, dir.join("journal-head.json"))
    }

    // ---- snapshots ----

    /// Writes a manifest: the last step of a backup.
    pub async fn write_snapshot(&self, m: &Manifest, cancel: &CancellationToken) -> Result<SnapshotId, RepoError> {
        let bytes = m.seal(self.keys()).map_err(|e| self.err("new snapshot", e))?;
        let id = SnapshotId(content_id(&bytes));
        self.put_object(&names::snapshot(&id), Bytes::from(bytes), cancel).await?;
        Ok(id)
    }

    pub async fn list_snapshot_ids(&self, cancel: &CancellationToken) -> Result<Vec<SnapshotId>, RepoError> {
        let objs = self.list_objects(names::SNAPSHOTS_PREFIX, cancel).await?;
        Ok(objs.into_iter().filter_map(|o| names::parse_id(&o.name)).collect())
    }

    /// Keeps the snapshot manifests [`Repository::snapshots`] reads in `dir` (set once;
    /// later calls change nothing). A manifest is named by the hash of its sealed bytes and
    /// never changes, so a kept copy of a snapshot the store lists is as good as the store's:
    /// it is checked against its name and opened with the repository's keys like a read from
    /// the store, and one that fails either is read from the store again. Resolving `latest`
    /// reads every manifest; on a node that did it before, only the new ones cost a request.
    /// Only listings use kept copies (a snapshot named by id is read from the store, so one
    /// forgotten elsewhere is not found), and a listing removes the copies of snapshots the
    /// store no longer lists. Best effort: a directory that cannot be written only costs the
    /// requests.
    pub fn cache_manifests_in(&self, dir: std::path::PathBuf) {
        let _ = self.inner.manifest_cache.set(dir);
    }

    /// The manifest of a snapshot the store has just listed: the kept copy when there is a
    /// good one, else the store's (then kept).
    async fn read_listed_snapshot(&self, id: &SnapshotId, cancel: &CancellationToken) -> Result<Manifest, RepoError> {
        let Some(dir) = self.inner.manifest_cache.get() else {
            return self.read_snapshot(id, cancel).await;
        };
        let path = dir.join(id.to_hex());
        let fits = tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() <= names::max_len(&names::snapshot(id)));
        if let (true, Ok(bytes)) = (fits, tokio::fs::read(&path).await) {
            if SnapshotId(content_id(&bytes)) == *id {
                if let Ok(m) = Manifest::open(self.keys(), &bytes) {
                    return Ok(m);
                }
            }
            tracing::debug!("kept copy of snapshot {id} at {} is damaged; reading the store's", path.display());
        }
        let (m, bytes) = self.read_snapshot_sealed(id, cancel).await?;
        // Written under a temporary name, then renamed: a reader never sees half a file.
        let tmp = dir.join(format!(".{}.{}", id.to_hex(), rand::random::<u64>()));
        let kept = async {
            tokio::fs::create_dir_all(dir).await?;
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = kept {
            let _ = tokio::fs::remove_file(&tmp).await;
            tracing::debug!("keeping snapshot {id} in {}: {e}", dir.display());
        }
        Ok(m)
    }

    /// A snapshot's manifest, read from the store.
    pub async fn read_snapshot(&self, id: &SnapshotId, cancel: &CancellationToken) -> Result<Manifest, RepoError> {
        Ok(self.read_snapshot_sealed(id, cancel).await?.0)
    }

    async fn read_snapshot_sealed(&self, id: &SnapshotId, cancel: &CancellationToken) -> Result<(Manifest, Bytes), RepoError> {
        let name = names::snapshot(id);
        let bytes = match self.get_object(&name, cancel).await {
            Ok(b) => b,
            Err(RepoError::Storage(e)) if e.is_not_found() => {
                return Err(RepoError::NotFound { what: format!("snapshot {id}"), location: self.location().into() })
            }
            Err(e) => return Err(e),
        };
        if SnapshotId(content_id(&bytes)) != *id {
            return Err(self.err(&name, FormatError::Corrupt("content does not hash to its name".into())));
        }
        let m = Manifest::open(self.keys(), &bytes).map_err(|e| self.err(&name, e))?;
        Ok((m, bytes))
    }

    /// Every snapshot, oldest first.
    pub async fn snapshots(&self, cancel: &CancellationToken) -> Result<Vec<(SnapshotId, Manifest)>, RepoError> {
        let ids = self.list_snapshot_ids(cancel).await?;
        self.prune_kept_manifests(&ids).await;
        self.read_listed_snapshots(ids, cancel).await
    }

    /// The manifests of snapshots just listed (a kept copy where there is one), sorted by
    /// time. Several are read at once: against a distant store reading costs round trips,
    /// one per snapshot when read one after another. One forgotten since the listing, or one that is not a snapshot
    /// of this repository (said, skipped), is left out.
    pub async fn read_listed_snapshots(&self, ids: Vec<SnapshotId>, cancel: &CancellationToken) -> Result<Vec<(SnapshotId, Manifest)>, RepoError> {
        use futures::StreamExt;
        let mut reads = futures::stream::iter(ids).map(|id| async move { (id, self.read_listed_snapshot(&id, cancel).await) }).buffer_unordered(64);
        let mut out = Vec::new();
        while let Some((id, r)) = reads.next().await {
            match r {
                Ok(m) => out.push((id, m)),
                // Forgotten between listing and reading.
                Err(RepoError::NotFound { .. }) => continue,
                // An object that does not hash to its name or does not authenticate is not
                // a snapshot of this repository: one junk object must not take down every
                // listing, `latest` and status. Skipped, said; `check` reports it.
                Err(e @ RepoError::Format { .. }) => {
                    tracing::warn!("skipping {e:#}");
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|(id, m)| (m.time_unix_ms, *id));
        Ok(out)
    }

    /// Every snapshot's group, time and size, oldest first, and how many manifests were
    /// read for it: one listing, and only the manifests this handle has not read before (a
    /// backup's `latest` parent and a status refresh cost what was added since, not every
    /// manifest of the repository). Kept copies of snapshots found gone are dropped.
    pub async fn snapshot_rows(&self, cancel: &CancellationToken) -> Result<(Vec<SnapshotRow>, usize), RepoError> {
        let ids = self.list_snapshot_ids(cancel).await?;
        let new: Vec<SnapshotId> = {
            let known = self.inner.rows.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter().filter(|id| !known.contains_key(id)).copied().collect()
        };
        let read = self.read_listed_snapshots(new, cancel).await?;
        let listed: std::collections::HashSet<&SnapshotId> = ids.iter().collect();
        let (mut out, gone) = {
            let mut known = self.inner.rows.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<SnapshotId> = known.keys().filter(|id| !listed.contains(id)).copied().collect();
            for id in &gone {
                known.remove(id);
            }
            for (id, m) in &read {
                known.insert(*id, SnapshotRow::of(*id, m));
            }
            (known.values().cloned().collect::<Vec<_>>(), gone)
        };
        self.drop_kept_manifests(&gone).await;
        out.sort_by_key(|r| (r.time_unix_ms, r.id));
        Ok((out, read.len()))
    }

    /// The ids and times of `group`'s snapshots, oldest first ([`Repository::snapshot_rows`]).
    pub async fn group_snapshots(&self, group: &str, cancel: &CancellationToken) -> Result<Vec<(SnapshotId, u64)>, RepoError> {
        Ok(self.snapshot_rows(cancel).await?.0.into_iter().filter(|r| r.group == group).map(|r| (r.id, r.time_unix_ms)).collect())
    }

    /// Removes the kept manifests of snapshots found forgotten. Best effort.
    pub async fn drop_kept_manifests(&self, ids: &[SnapshotId]) {
        let Some(dir) = self.inner.manifest_cache.get() else { return };
        for id in ids {
            let _ = tokio::fs::remove_file(dir.join(id.to_hex())).await;
        }
    }

    /// Removes kept manifests of snapshots the store no longer lists (forgotten), so the
    /// directory holds no more than the store. Best effort.
    async fn prune_kept_manifests(&self, listed: &[SnapshotId]) {
        let Some(dir) = self.inner.manifest_cache.get() else {
            return;
        };
        let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
            return;
        };
        let listed: std::collections::HashSet<&SnapshotId> = listed.iter().collect();
        while let Ok(Some(e)) = rd.next_entry().await {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(id) = name.parse::<SnapshotId>() {
                if !listed.contains(&id) {
                    let _ = tokio::fs::remove_file(e.path()).await;
                }
            }
        }
    }

    /// A snapshot named by its full id or a unique prefix of at least 4 hex digits.
    pub async fn resolve_snapshot(&self, s: &str, cancel: &CancellationToken) -> Result<SnapshotId, RepoError> {
        if let Ok(id) = s.parse::<SnapshotId>() {
            return Ok(id);
        }
        if s.len() < 4 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(RepoError::Invalid(format!("'{s}' is not a snapshot id (at least 4 hex digits)")));
        }
        let lower = s.to_ascii_lowercase();
        let matches: Vec<SnapshotId> = self.list_snapshot_ids(cancel).await?.into_iter().filter(|id| id.to_hex().starts_with(&lower)).collect();
        match matches.len() {
            1 => Ok(matches[0]),
            0 => Err(RepoError::NotFound { what: format!("snapshot {s}"), location: self.location().into() }),
            n => Err(RepoError::Ambiguous { what: format!("snapshot {s}"), location: self.location().into(), count: n }),
        }
    }

    // ---- keys ----

    pub async fn list_keys(&self, cancel: &CancellationToken) -> Result<Vec<(KeyId, KeyFile)>, RepoError> {
        let mut out = Vec::new();
        for o in self.list_objects(names::KEYS_PREFIX, cancel).await? {
            let b = self.get_object(&o.name, cancel).await?;
            let kf = KeyFile::from_bytes(&b).map_err(|e| self.err(&o.name, e))?;
            if let Some(id) = names::parse_id(&o.name) {
                out.push((id, kf));
            }
        }
        Ok(out)
    }

    /// Adds a key file wrapping the same master key under another password.
    pub async fn add_key(&self, current_password: &[u8], new_password: &[u8], kdf: KdfParams, cancel: &CancellationToken) -> Result<KeyId, RepoError> {
        if new_password.is_empty() {
            return Err(RepoError::Invalid(format!("repository {}: the new password is empty", self.location())));
        }
        let kname = names::key(&self.inner.key_id);
        let kb = self.get_object(&kname, cancel).await?;
        let kf = KeyFile::from_bytes(&kb).map_err(|e| self.err(&kname, e))?;
        let master =
            kf.unwrap_key(current_password).map_err(|e| self.err(&kname, e))?.ok_or_else(|| RepoError::WrongPassword { location: self.location().into() })?;
        let new = KeyFile::wrap(&master, new_password, kdf).map_err(|e| self.err("new key file", e))?;
        let bytes = Zeroizing::new(new.to_bytes().map_err(|e| self.err("new key file", e))?);
        let id = KeyId(content_id(&bytes));
        self.put_object(&names::key(&id), Bytes::from(bytes.to_vec()), cancel).await?;
        Ok(id)
    }

    /// Removes a key file; refuses the key this session opened with and the last key.
    pub async fn remove_key(&self, id: &KeyId, cancel: &CancellationToken) -> Result<(), RepoError> {
        if *id == self.inner.key_id {
            return Err(RepoError::Invalid(format!("key {id} in repository {}: it is the key in use; open with another key to remove it", self.location())));
        }
        let keys = self.list_keys(cancel).await?;
        if !keys.iter().any(|(k, _)| k == id) {
            return Err(RepoError::NotFound { what: format!("key {id}"), location: self.location().into() });
        }
        self.delete_object(&names::key(id), cancel).await
    }
}

fn fmt_err(location: &str, object: &str, source: FormatError) -> RepoError {
    RepoError::Format { object: object.to_string(), location: location.to_string(), cause: source }
}
