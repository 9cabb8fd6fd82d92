//! The one conformance suite on every backend: a local directory, the fault injector in
//! front of it, and S3 against a real server (SeaweedFS, started on 127.0.0.1 by
//! `scripts/test.sh`).

use bytes::Bytes;
use mover_backends::fault::FaultyStorage;
use mover_backends::{conformance, LocalStorage};
use mover_format::storage::Storage;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn local(dir: &tempfile::TempDir) -> Arc<dyn Storage> {
    Arc::new(LocalStorage::new(dir.path().join("repo")))
}

/// `init` over a store whose replies to the key file's and the config's writes are lost
/// after the writes landed: it succeeds, and the repository opens with the password.
async fn init_survives_lost_replies(real: Arc<dyn Storage>) {
    use mover_format::crypto::KdfParams;
    use mover_format::{InitOptions, Repository};
    let c = CancellationToken::new();
    let f = Arc::new(FaultyStorage::new(real.clone(), 0, 0.0, 1));
    f.lose_put_replies("config", 1);
    f.lose_put_replies("keys/", 1);
    let opts = InitOptions { kdf: KdfParams::insecure_for_tests(), ..Default::default() };
    let made = Repository::init(f.clone(), b"pw", opts, &c).await.unwrap();
    assert_eq!(f.injected(), 2, "both replies were lost");
    let opened = Repository::open(real.clone(), b"pw", &c).await.unwrap();
    assert_eq!(opened.config().id, made.config().id);
    assert_eq!(mover_format::storage::list_all(&*real, "keys/", &c).await.unwrap().len(), 1, "one key file, kept");
}

mod local {
    use super::*;

    #[tokio::test]
    async fn local_directory_conformance() {
        let d = tempfile::tempdir().unwrap();
        conformance::run_all(local(&d), "c/").await.unwrap();
    }

    /// Long objects and ranges go through O_DIRECT where the data and filesystem allow it
    /// (aligned buffers, as packs have), buffered otherwise; both read back exactly, at
    /// unaligned offsets and up to the object's unaligned end.
    #[tokio::test]
    async fn long_objects_and_ranges_read_back_exactly() {
        let d = tempfile::tempdir().unwrap();
        let s = local(&d);
        let c = CancellationToken::new();
        let len = (1 << 20) + 4095;
        let mut backing = vec![0u8; len + 8192];
        blake3::Hasher::new().finalize_xof().fill(&mut backing);
        let pad = backing.as_ptr().align_offset(4096);
        let all = Bytes::from(backing);
        let aligned = all.slice(pad..pad + len);
        let unaligned = all.slice(pad + 1..pad + 1 + len);
        assert_eq!(aligned.as_ptr() as usize % 4096, 0);
        for (name, data) in [("x/aligned", aligned), ("x/unaligned", unaligned)] {
            s.put(name, data.clone(), &c).await.unwrap();
            assert_eq!(s.get(name, u64::MAX, &c).await.unwrap(), data, "{name}");
            for (off, n) in [(0, len), (1, 300_000), (4095, len - 4095), (len - (256 << 10) - 1, (256 << 10) + 1), (8192, 256 << 10), (3, 10)] {
                let got = s.get_range(name, off as u64, n as u64, &c).await.unwrap();
                assert_eq!(got, data.slice(off..off + n), "{name} {off}+{n}");
            }
            assert!(s.get_range(name, 4096, len as u64, &c).await.is_err(), "{name}: range past the end");
        }
    }

    #[tokio::test]
    async fn a_store_that_overwrites_is_refused_and_a_conforming_one_passes() {
        let d = tempfile::tempdir().unwrap();
        let c = CancellationToken::new();
        mover_backends::verify_create_only(&*local(&d), &c).await.unwrap();
        let bad = FaultyStorage::new(local(&d), 0, 0.0, 1);
        bad.ignore_create_only();
        let e = mover_backends::verify_create_only(&bad, &c).await.unwrap_err();
        assert!(e.to_string().contains("does not honour create-only writes"), "{e}");
        // The probe leaves nothing behind.
        assert!(mover_format::storage::list_all(&*local(&d), "probe/", &c).await.unwrap().is_empty());
    }

    /// `init` whose config write landed but whose reply was lost: the retry finds the
    /// object, compares its bytes, and the repository opens.
    #[tokio::test]
    async fn init_whose_write_landed_but_reply_was_lost_opens() {
        let d = tempfile::tempdir().unwrap();
        super::init_survives_lost_replies(local(&d)).await;
    }

    #[tokio::test]
    async fn fault_wrapper_fails_calls_without_retry() {
        let d = tempfile::tempdir().unwrap();
        let s = FaultyStorage::new(local(&d), 2, 0.0, 1);
        let c = CancellationToken::new();
        assert!(s.put("a/b", Bytes::from_static(b"x"), &c).await.unwrap_err().is_transient());
        assert!(s.get("a/b", u64::MAX, &c).await.unwrap_err().is_transient());
        s.put("a/b", Bytes::from_static(b"x"), &c).await.unwrap();
        assert_eq!(&s.get("a/b", u64::MAX, &c).await.unwrap()[..], b"x");
    }
}

mod s3 {
    use super::*;
    use mover_backends::{S3Options, S3Storage};

    fn rand_suffix() -> String {
        format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
    }

    fn s3_env() -> (String, String) {
        let endpoint = std::env::var("MOVER_TEST_S3_ENDPOINT")
            .expect("MOVER_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts a SeaweedFS S3 server on 127.0.0.1");
        let bucket = std::env::var("MOVER_TEST_S3_BUCKET").unwrap_or_else(|_| "mover-test".into());
        (endpoint, bucket)
    }

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.finalize_xof().fill(&mut v);
        v
    }

    fn store(prefix: &str) -> S3Options {
        let (endpoint, bucket) = s3_env();
        let mut o = S3Options::from_url(&format!("s3://{bucket}/{prefix}-{}", rand_suffix())).unwrap();
        o.endpoint = Some(endpoint);
        o
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn create_only_is_verified_at_open_and_an_overwriting_store_is_refused() {
        let c = CancellationToken::new();
        let o = store("probe");
        let url = format!("s3://{}/{}", o.bucket, o.prefix);
        let ep = mover_backends::S3Endpoint { endpoint: o.endpoint.clone(), region: None };
        mover_backends::open_verified(&url, &ep, &c).await.unwrap();
        let real: Arc<dyn Storage> = Arc::new(S3Storage::new(o).await);
        let bad = FaultyStorage::new(real.clone(), 0, 0.0, 1);
        bad.ignore_create_only();
        let e = mover_backends::verify_create_only(&bad, &c).await.unwrap_err();
        assert!(e.to_string().contains("does not honour create-only writes") && e.to_string().contains(&url), "{e}");
        assert!(mover_format::storage::list_all(&*real, "probe/", &c).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn init_whose_write_landed_but_reply_was_lost_opens() {
        super::init_survives_lost_replies(Arc::new(S3Storage::new(store("init")).await)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn conformance_against_a_real_server() {
        let (endpoint, bucket) = s3_env();
        let mut o = S3Options::from_url(&format!("s3://{bucket}/conf-{}", rand_suffix())).unwrap();
        o.endpoint = Some(endpoint.clone());
        let s: Arc<dyn Storage> = Arc::new(S3Storage::new(o).await);
        conformance::run_all(s, "c/").await.unwrap();
        // Multipart: a small threshold forces it; create-only holds for it too.
        let mut o = S3Options::from_url(&format!("s3://{bucket}/mp-{}", rand_suffix())).unwrap();
        o.endpoint = Some(endpoint);
        o.multipart_threshold = 6 << 20;
        o.part_size = 5 << 20;
        let s = S3Storage::new(o).await;
        let c = CancellationToken::new();
        let data = Bytes::from(noise(3, 13 << 20));
        assert_eq!(s.put("big", data.clone(), &c).await.unwrap(), mover_format::storage::PutOutcome::Created);
        assert_eq!(s.get("big", u64::MAX, &c).await.unwrap(), data);
        assert_eq!(s.put("big", Bytes::from(noise(4, 13 << 20)), &c).await.unwrap(), mover_format::storage::PutOutcome::Existed);
        assert_eq!(s.get("big", u64::MAX, &c).await.unwrap(), data);
    }
}
