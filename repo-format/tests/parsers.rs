//! Every parser of bytes that come from the store must reject garbage with an error, never
//! panic: random bytes, and valid objects with random mutations (bit flips, truncation,
//! extension). The cargo-fuzz targets in `repo-format/fuzz/` explore the same parsers
//! deeper (see docs/testing.md).

use mover_format::crypto::{KdfParams, KeyFile, Keys, MasterKey};
use mover_format::index::{self, BlobLocation, IndexEntry};
use mover_format::manifest::{Manifest, VolumeStats, MANIFEST_VERSION};
use mover_format::pack::{self, PackBuilder};
use mover_format::tree::{MapEntry, SegmentGroup, SegmentMap, SegmentRef};
use mover_format::{config::RepoConfig, ChunkId, PackId, SegmentDigest};
use proptest::prelude::*;

fn keys() -> Keys {
    Keys::derive(&MasterKey::generate())
}

fn all_parsers(k: &Keys, b: &[u8]) {
    let _ = pack::decode_trailer(b, b.len() as u64);
    let _ = pack::read_pack(k, b);
    if b.len() >= pack::FOOTER_LEN {
        let _ = pack::parse_footer(&b[b.len() - pack::FOOTER_LEN..], b.len() as u64);
    }
    let _ = index::decode_plain(b);
    let _ = index::open(k, b);
    let _ = Manifest::open(k, b);
    let _ = SegmentMap::decode(b);
    let _ = SegmentGroup::decode(b);
    let _ = KeyFile::from_bytes(b);
    let _ = RepoConfig::parse_unverified(b);
    let _ = BlobLocation::from_bytes(b);
}

/// Valid encodings of every object kind, in plaintext and sealed forms.
fn samples(k: &Keys) -> Vec<Vec<u8>> {
    let e = IndexEntry {
        id: ChunkId([1; 32]),
        loc: BlobLocation { pack: PackId([2; 32]), kind: mover_format::blob::BlobKind::Data, offset: 8, stored_len: 50, raw_len: 9 },
    };
    let map = SegmentMap { entries: vec![MapEntry::Chunk { id: ChunkId([3; 32]), len: 100 }, MapEntry::Hole { len: 4096 }] };
    let group = SegmentGroup { first_segment: 5, segments: vec![SegmentRef::Hole, SegmentRef::Map { map: ChunkId([4; 32]), digest: SegmentDigest([5; 32]) }] };
    let m = Manifest {
        version: MANIFEST_VERSION,
        group: Some("ns/vm".into()),
        time_unix_ms: 1,
        hostname: "h".into(),
        tags: Default::default(),
        parent: None,
        volumes: vec![],
        metadata: vec![],
        stats: VolumeStats::default(),
        duration_ms: 0,
        origin: None,
    };
    let mut pb = PackBuilder::new(1024);
    let mut enc = mover_format::blob::BlobEncoder::new(1);
    pb.add(&enc.encode(k, k.chunk_id(b"abc"), mover_format::blob::BlobKind::Data, b"abc").unwrap()).unwrap();
    let (_, packb, entries) = pb.finish(k).unwrap();
    vec![
        index::encode_plain(&[e]),
        index::seal(k, &[e]).unwrap(),
        map.encode(),
        group.encode(),
        m.seal(k).unwrap(),
        packb.to_vec(),
        pack::encode_trailer(&entries),
        KeyFile::wrap(&MasterKey::generate(), b"pw", KdfParams::insecure_for_tests()).unwrap().to_bytes().unwrap(),
        RepoConfig::new(Default::default(), Default::default(), 1 << 20).to_bytes(k).unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        all_parsers(&keys(), &b);
    }

    #[test]
    fn mutated_objects_never_panic(which in 0usize..9, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6), cut in any::<usize>(), extend in proptest::collection::vec(any::<u8>(), 0..8)) {
        let k = keys();
        let mut b = samples(&k)[which].clone();
        for (pos, x) in flips {
            if !b.is_empty() {
                let n = b.len();
                b[pos % n] ^= x;
            }
        }
        if cut % 3 == 0 && !b.is_empty() {
            let n = b.len();
            b.truncate(cut % n);
        }
        b.extend(extend);
        all_parsers(&k, &b);
    }
}

#[test]
fn decoders_reject_huge_counts_without_allocating() {
    // count = u32::MAX with no records: an error, not an allocation of 4 G records.
    let mut b = vec![1u8];
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(index::decode_plain(&b).is_err());
    assert!(pack::decode_trailer(&b, 100).is_err());
    let mut m = vec![1u8, 1];
    m.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(SegmentMap::decode(&m).is_err());
}

/// A manifest is written by anyone holding the key: a volume every reader would divide by,
/// name files after or size by is refused when it is opened, naming what is wrong, instead
/// of panicking (division by zero) or writing outside a restore's directory.
#[test]
fn manifests_with_unusable_volumes_are_refused_when_opened() {
    use mover_format::manifest::{ChangeSource, VolumeEntry};
    let k = keys();
    let vol = |name: &str, size: u64, segment_size: u32, groups: usize| VolumeEntry {
        name: name.into(),
        size,
        segment_size,
        groups: vec![ChunkId([7; 32]); groups],
        source: "/dev/x".into(),
        change_source: ChangeSource::Full,
        change_base: None,
        change_fallback: None,
        trusted_run: 0,
        stats: VolumeStats::default(),
    };
    let open = |v: VolumeEntry| {
        let m = Manifest {
            version: MANIFEST_VERSION,
            group: Some("g".into()),
            time_unix_ms: 1,
            hostname: "h".into(),
            tags: Default::default(),
            parent: None,
            volumes: vec![v],
            metadata: vec![],
            stats: VolumeStats::default(),
            duration_ms: 0,
            origin: None,
        };
        Manifest::open(&k, &m.seal(&k).unwrap()).map(|_| ()).map_err(|e| e.to_string())
    };
    assert_eq!(open(vol("disk", 8 << 20, 4 << 20, 1)), Ok(()));
    for (v, says) in [
        (vol("disk", 8 << 20, 0, 1), "segment size 0"),
        (vol("disk", 8 << 20, 4097, 1), "segment size 4097"),
        (vol("../../../escaped", 8 << 20, 4 << 20, 1), "escaped"),
        (vol("..", 8 << 20, 4 << 20, 1), "\"..\""),
        (vol("disk", 8 << 20, 4 << 20, 0), "0 segment groups"),
        (vol("disk", 1 << 50, 4 << 20, 256), "larger than"),
    ] {
        let err = open(v).expect_err(says);
        assert!(err.contains(says), "{says}: {err}");
    }
}
