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
