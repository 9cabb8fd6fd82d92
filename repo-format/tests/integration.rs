//! Integration tests of the format library against a real local directory (the backend
//! itself is tested in `mover-backends`).

use mover_backends::fault::FaultyStorage;
use mover_backends::LocalStorage;
use mover_format::blob::BlobEncoder;
use mover_format::blob::BlobKind;
use mover_format::crypto::KdfParams;
use mover_format::local_index::{self, ChunkIndex, MemIndex};
use mover_format::manifest::{Manifest, VolumeEntry, VolumeStats, MANIFEST_VERSION};
use mover_format::names;
use mover_format::pack::PackBuilder;
use mover_format::storage::Storage;
use mover_format::{ChunkId, InitOptions, RepoError, Repository};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn opts() -> InitOptions {
    InitOptions { kdf: KdfParams::insecure_for_tests(), ..Default::default() }
}

fn local(dir: &tempfile::TempDir) -> Arc<dyn Storage> {
    Arc::new(LocalStorage::new(dir.path().join("repo")))
}

/// Stores `n` chunks in one pack plus an index segment; returns them and a synced index.
async fn store_chunks(repo: &Repository, n: usize) -> (Vec<(ChunkId, Vec<u8>)>, MemIndex) {
    let c = CancellationToken::new();
    let mut enc = BlobEncoder::new(1);
    let mut b = PackBuilder::new(1 << 20);
    let mut out = Vec::new();
    for i in 0..n {
        let data: Vec<u8> = (0..5000 + i * 13).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
        let id = repo.keys().chunk_id(&data);
        b.add(&enc.encode(repo.keys(), id, BlobKind::Data, &data).unwrap()).unwrap();
        out.push((id, data));
    }
    let (_pack, entries, _) = repo.write_pack(b, &c).await.unwrap();
    repo.write_index(&entries, &c).await.unwrap();
    let index = MemIndex::default();
    local_index::sync(repo, &index, &c).await.unwrap();
    (out, index)
}

fn manifest(groups: Vec<ChunkId>) -> Manifest {
    Manifest {
        version: MANIFEST_VERSION,
        group: None,
        time_unix_ms: mover_format::now_unix_ms(),
        hostname: "test".into(),
        tags: [("vm".to_string(), "web-1".to_string())].into(),
        parent: None,
        volumes: vec![VolumeEntry {
            name: "disk".into(),
            size: if groups.is_empty() { 0 } else { 4096 },
            segment_size: 4 << 20,
            groups,
            source: "/dev/null".into(),
            change_source: mover_format::manifest::ChangeSource::Full,
            change_base: None,
            change_fallback: None,
            trusted_run: 0,
            stats: VolumeStats::default(),
        }],
        metadata: vec![],
        stats: VolumeStats::default(),
        duration_ms: 1,
        origin: None,
    }
}

mod repository {
    use super::*;

    #[tokio::test]
    async fn fault_injection_is_absorbed_by_retries() {
        // The wrapper fails the first 3 calls and 20 % of the rest; the repository layer
        // retries transient errors, so init/write/read succeed and faults were injected.
        let d = tempfile::tempdir().unwrap();
        let faulty = Arc::new(FaultyStorage::new(local(&d), 3, 0.2, 7));
        let s: Arc<dyn Storage> = faulty.clone();
        let c = CancellationToken::new();
        let repo = Repository::init(s.clone(), b"pw", opts(), &c).await.unwrap();
        let (ids, index) = store_chunks(&repo, 30).await;
        let repo2 = Repository::open(s, b"pw", &c).await.unwrap();
        for (id, data) in &ids {
            let loc = index.lookup(id).unwrap().unwrap();
            assert_eq!(&repo2.read_blob(id, &loc, &c).await.unwrap(), data);
        }
        assert!(faulty.injected() >= 3, "no faults were injected");
    }

    #[tokio::test]
    async fn init_open_and_store_read_back() {
        let d = tempfile::tempdir().unwrap();
        let c = CancellationToken::new();
        let repo = Repository::init(local(&d), b"pw", opts(), &c).await.unwrap();
        let (ids, index) = store_chunks(&repo, 10).await;
        let m = manifest(vec![ids[0].0]);
        let sid = repo.write_snapshot(&m, &c).await.unwrap();

        let repo = Repository::open(local(&d), b"pw", &c).await.unwrap();
        assert_eq!(repo.read_snapshot(&sid, &c).await.unwrap(), m);
        assert_eq!(repo.resolve_snapshot(&sid.to_hex()[..8], &c).await.unwrap(), sid);
        for (id, data) in &ids {
            let loc = index.lookup(id).unwrap().unwrap();
            assert_eq!(&repo.read_blob(id, &loc, &c).await.unwrap(), data);
        }
    }

    #[tokio::test]
    async fn init_twice_and_uninitialised_and_wrong_password() {
        let d = tempfile::tempdir().unwrap();
        let c = CancellationToken::new();
        let e = Repository::open(local(&d), b"pw", &c).await.unwrap_err();
        assert!(matches!(e, RepoError::NotInitialised { .. }), "{e}");
        assert!(e.to_string().contains("repo"), "error names the repository: {e}");
        Repository::init(local(&d), b"pw", opts(), &c).await.unwrap();
        let e = Repository::init(local(&d), b"pw", opts(), &c).await.unwrap_err();
        assert!(matches!(e, RepoError::AlreadyInitialised { .. }), "{e}");
        let e = Repository::open(local(&d), b"nope", &c).await.unwrap_err();
        assert!(matches!(e, RepoError::WrongPassword { .. }), "{e}");
        assert!(e.to_string().starts_with("wrong password for repository"), "{e}");
    }

    #[tokio::test]
    async fn unknown_version_and_tampered_config() {
        let d = tempfile::tempdir().unwrap();
        let c = CancellationToken::new();
        Repository::init(local(&d), b"pw", opts(), &c).await.unwrap();
        let path = d.path().join("repo").join(names::CONFIG);
        let orig = std::fs::read(&path).unwrap();
        fn replace(b: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
            assert_eq!(from.len(), to.len());
            let i = b.windows(from.len()).position(|w| w == from).expect("pattern present");
            let mut out = b.to_vec();
            out[i..i + to.len()].copy_from_slice(to);
            out
        }
        // Same length: "version": 1 -> "version": 7.
        std::fs::write(&path, replace(&orig, b"\"version\": 1", b"\"version\": 7")).unwrap();
        let e = Repository::open(local(&d), b"pw", &c).await.unwrap_err();
        assert!(matches!(e, RepoError::UnsupportedVersion { found: 7, .. }), "{e}");
        // Change the pack size: the MAC check fails.
        std::fs::write(&path, replace(&orig, b"\"pack_size\": 1", b"\"pack_size\": 2")).unwrap();
        let e = Repository::open(local(&d), b"pw", &c).await.unwrap_err();
        assert!(matches!(e, RepoError::ConfigMismatch { .. }), "{e}");
    }

    #[tokio::test]
    async fn keys_add_remove_passwd() {
        let d = tempfile::tempdir().unwrap();
        let c = CancellationToken::new();
        let repo = Repository::init(local(&d), b"one", opts(), &c).await.unwrap();
        let k2 = repo.add_key(b"one", b"two", KdfParams::insecure_for_tests(), &c).await.unwrap();
        assert_eq!(repo.list_keys(&c).await.unwrap().len(), 2);
        let r2 = Repository::open(local(&d), b"two", &c).await.unwrap();
        assert_eq!(r2.key_id(), k2);
        assert_eq!(r2.config().id, repo.config().id);
        // The key in use cannot be removed; the other can.
        assert!(repo.remove_key(&repo.key_id(), &c).await.is_err());
        r2.remove_key(&repo.key_id(), &c).await.unwrap();
        assert!(matches!(Repository::open(local(&d), b"one", &c).await.unwrap_err(), RepoError::WrongPassword { .. }));
        Repository::open(local(&d), b"two", &c).await.unwrap();
    }

    #[tokio::test]
    async fn cancelled_calls_stop() {
        let d = tempfile::tempdir().unwrap();
        let c = CancellationToken::new();
        let repo = Repository::init(local(&d), b"pw", opts(), &c).await.unwrap();
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        let e = repo.list_snapshot_ids(&cancelled).await.unwrap_err();
        assert!(e.is_cancelled(), "{e}");
    }
}

/// Broken repositories: each corruption is caught and named.
mod corruption {
    use super::*;

    async fn setup() -> (tempfile::TempDir, Repository, Vec<(ChunkId, Vec<u8>)>, MemIndex) {
        let d = tempfile::tempdir().unwrap();
        let c = CancellationToken::new();
        let repo = Repository::init(local(&d), b"pw", opts(), &c).await.unwrap();
        let (ids, idx) = store_chunks(&repo, 5).await;
        (d, repo, ids, idx)
    }

    fn only_file(dir: &std::path::Path) -> std::path::PathBuf {
        let mut found = Vec::new();
        for e in walk(dir) {
            found.push(e);
        }
        assert_eq!(found.len(), 1, "{found:?}");
        found.pop().unwrap()
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p))
            } else {
                out.push(p)
            }
        }
        out
    }

    #[tokio::test]
    async fn flipped_bit_in_pack_names_chunk_and_pack() {
        let (d, repo, ids, idx) = setup().await;
        let c = CancellationToken::new();
        let pack = only_file(&d.path().join("repo/packs"));
        let loc = idx.lookup(&ids[2].0).unwrap().unwrap();
        let mut b = std::fs::read(&pack).unwrap();
        b[loc.offset as usize + 30] ^= 0x01;
        std::fs::write(&pack, b).unwrap();
        let e = repo.read_blob(&ids[2].0, &loc, &c).await.unwrap_err().to_string();
        assert!(e.contains(&ids[2].0.to_hex()) && e.contains(&loc.pack.to_hex()) && e.contains("authentication failed"), "{e}");
        // Neighbours still read.
        let l1 = idx.lookup(&ids[1].0).unwrap().unwrap();
        assert_eq!(repo.read_blob(&ids[1].0, &l1, &c).await.unwrap(), ids[1].1);
    }

    #[tokio::test]
    async fn truncated_and_missing_pack() {
        let (d, repo, ids, idx) = setup().await;
        let c = CancellationToken::new();
        let pack = only_file(&d.path().join("repo/packs"));
        let loc = idx.lookup(&ids[4].0).unwrap().unwrap();
        let b = std::fs::read(&pack).unwrap();
        std::fs::write(&pack, &b[..loc.offset as usize + 10]).unwrap();
        let e = repo.read_blob(&ids[4].0, &loc, &c).await.unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains(&loc.pack.to_hex()), "{e}");
        let e = repo.read_pack_trailer(&loc.pack, &c).await.unwrap_err().to_string();
        assert!(e.contains(&loc.pack.to_hex()), "{e}");
        std::fs::remove_file(&pack).unwrap();
        let e = repo.read_blob(&ids[4].0, &loc, &c).await.unwrap_err().to_string();
        assert!(e.contains("pack is missing") && e.contains(&ids[4].0.to_hex()), "{e}");
    }

    #[tokio::test]
    async fn flipped_bit_in_index_segment_and_manifest() {
        let (d, repo, _ids, _idx) = setup().await;
        let c = CancellationToken::new();
        let seg = only_file(&d.path().join("repo/index"));
        let mut b = std::fs::read(&seg).unwrap();
        let n = b.len();
        b[n / 2] ^= 0x80;
        std::fs::write(&seg, b).unwrap();
        let e = local_index::sync(&repo, &MemIndex::default(), &c).await.unwrap_err().to_string();
        assert!(e.contains("index/") && e.contains("does not hash to its name"), "{e}");

        let sid = repo.write_snapshot(&manifest(vec![]), &c).await.unwrap();
        let p = d.path().join("repo").join(names::snapshot(&sid));
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 0x01;
        std::fs::write(&p, b).unwrap();
        let e = repo.read_snapshot(&sid, &c).await.unwrap_err().to_string();
        assert!(e.contains(&format!("snapshots/{sid}")), "{e}");
    }

    #[tokio::test]
    async fn kept_manifests_spare_reads_but_never_hide_the_store() {
        let c = CancellationToken::new();
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::init(local(&d), b"pw", opts(), &c).await.unwrap();
        let (mut ma, mut mb) = (manifest(vec![]), manifest(vec![]));
        ma.time_unix_ms = 1_000;
        mb.time_unix_ms = 2_000;
        let (a, b) = (repo.write_snapshot(&ma, &c).await.unwrap(), repo.write_snapshot(&mb, &c).await.unwrap());
        let kept = d.path().join("cache/snapshots-v1");
        let repo = Repository::open(local(&d), b"pw", &c).await.unwrap();
        repo.cache_manifests_in(kept.clone());
        let stored = |id: &mover_format::SnapshotId| std::fs::read(d.path().join("repo").join(names::snapshot(id))).unwrap();
        let listed = |v: Vec<(mover_format::SnapshotId, Manifest)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();

        // A listing keeps each manifest exactly as stored.
        assert_eq!(listed(repo.snapshots(&c).await.unwrap()), vec![a, b]);
        assert_eq!(std::fs::read(kept.join(a.to_hex())).unwrap(), stored(&a));
        assert_eq!(std::fs::read(kept.join(b.to_hex())).unwrap(), stored(&b));

        // The kept copy spares the read: the store's copy of `a` damaged, the listing still
        // has `a` as it was. A read by id (what `check` does) reads the store's copy and
        // sees the damage.
        let pa = d.path().join("repo").join(names::snapshot(&a));
        let good_a = stored(&a);
        let mut bad = good_a.clone();
        bad[20] ^= 0x01;
        std::fs::write(&pa, &bad).unwrap();
        assert_eq!(repo.snapshots(&c).await.unwrap()[0], (a, ma.clone()));
        let e = repo.read_snapshot(&a, &c).await.unwrap_err().to_string();
        assert!(e.contains(&format!("snapshots/{a}")) && e.contains("does not hash to its name"), "{e}");
        std::fs::write(&pa, &good_a).unwrap();

        // A damaged kept copy is never used: read from the store and kept again.
        let kb = kept.join(b.to_hex());
        let mut bad = std::fs::read(&kb).unwrap();
        bad[20] ^= 0x01;
        std::fs::write(&kb, &bad).unwrap();
        assert_eq!(repo.snapshots(&c).await.unwrap()[1], (b, mb.clone()));
        assert_eq!(std::fs::read(&kb).unwrap(), stored(&b));
        // So is one that is not this snapshot at all (another's bytes under its name).
        std::fs::write(&kb, &good_a).unwrap();
        assert_eq!(repo.snapshots(&c).await.unwrap()[1], (b, mb.clone()));
        assert_eq!(std::fs::read(&kb).unwrap(), stored(&b));

        // A snapshot gone from the store is gone from the listing and from the kept copies.
        std::fs::remove_file(&pa).unwrap();
        assert_eq!(listed(repo.snapshots(&c).await.unwrap()), vec![b]);
        assert!(!kept.join(a.to_hex()).exists());
        assert!(matches!(repo.read_snapshot(&a, &c).await, Err(RepoError::NotFound { .. })));

        // A directory that cannot be written costs only the requests.
        let blocked = Repository::open(local(&d), b"pw", &c).await.unwrap();
        std::fs::write(d.path().join("cache/file"), b"x").unwrap();
        blocked.cache_manifests_in(d.path().join("cache/file/snapshots-v1"));
        assert_eq!(listed(blocked.snapshots(&c).await.unwrap()), vec![b]);
    }

    #[tokio::test]
    async fn wrong_key_cannot_read_another_repository() {
        let (d, _repo, ids, idx) = setup().await;
        let c = CancellationToken::new();
        let d2 = tempfile::tempdir().unwrap();
        let other = Repository::init(local(&d2), b"pw", opts(), &c).await.unwrap();
        // Point the other repository's reader at this repository's pack.
        let loc = idx.lookup(&ids[0].0).unwrap().unwrap();
        std::fs::create_dir_all(d2.path().join("repo/packs")).unwrap();
        let src = d.path().join("repo").join(names::pack(&loc.pack));
        let dst = d2.path().join("repo").join(names::pack(&loc.pack));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, dst).unwrap();
        let e = other.read_blob(&ids[0].0, &loc, &c).await.unwrap_err().to_string();
        assert!(e.contains("authentication failed"), "{e}");
    }

    #[tokio::test]
    async fn missing_index_segment_is_rebuilt_from_pack_trailers() {
        let (d, repo, ids, _idx) = setup().await;
        let c = CancellationToken::new();
        let seg = only_file(&d.path().join("repo/index"));
        std::fs::remove_file(&seg).unwrap();
        let idx = MemIndex::default();
        local_index::sync(&repo, &idx, &c).await.unwrap();
        assert_eq!(idx.entry_count().unwrap(), 0);
        let rep = local_index::rebuild_from_packs(&repo, &idx, true, &c).await.unwrap();
        assert_eq!(rep.packs_from_trailers, 1);
        assert_eq!(rep.segments_written.len(), 1);
        for (id, data) in &ids {
            let loc = idx.lookup(id).unwrap().unwrap();
            assert_eq!(&repo.read_blob(id, &loc, &c).await.unwrap(), data);
        }
        // The written segment makes a fresh cache complete again.
        let fresh = MemIndex::default();
        local_index::sync(&repo, &fresh, &c).await.unwrap();
        assert_eq!(fresh.entry_count().unwrap(), ids.len() as u64);
    }

    #[tokio::test]
    async fn tree_blob_kind_roundtrips() {
        let (_d, repo, _ids, _idx) = setup().await;
        let c = CancellationToken::new();
        let mut enc = BlobEncoder::new(3);
        let mut b = PackBuilder::new(1 << 16);
        let t = mover_format::tree::SegmentMap { entries: vec![mover_format::tree::MapEntry::Hole { len: 4096 }] }.encode();
        let id = repo.keys().chunk_id(&t);
        b.add(&enc.encode(repo.keys(), id, BlobKind::Tree, &t).unwrap()).unwrap();
        let (_p, entries, _) = repo.write_pack(b, &c).await.unwrap();
        assert_eq!(entries[0].loc.kind, BlobKind::Tree);
        assert_eq!(repo.read_blob(&id, &entries[0].loc, &c).await.unwrap(), t);
    }
}
