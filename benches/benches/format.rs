//! Throughput of the CPU stages on mixed data (⅓ random, ⅓ text, ⅓ structured):
//! chunking, keyed hashing, chunk+hash, compress+encrypt, packing. Compare with this
//! machine's `b3sum --num-threads 1` and `zstd -1 -T1` (printed by scripts/bench.sh).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mover_format::blob::BlobEncoder;
use mover_format::blob::BlobKind;
use mover_format::chunker::{split_segment, Chunker, ChunkerParams};
use mover_format::crypto::{Keys, MasterKey};
use mover_format::pack::PackBuilder;
use std::hint::black_box;

fn mixed(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let third = len / 3;
    blake3::Hasher::new().finalize_xof().fill(&mut v[..third]);
    let text = b"2026-11-22T05:00:00Z INFO request id=42 path=/api/v1/volumes status=200 took=12ms\n";
    for (i, b) in v[third..2 * third].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
    for (i, b) in v[2 * third..].iter_mut().enumerate() {
        *b = ((i / 64) as u8).wrapping_mul(17) ^ (i as u8 & 0x0f);
    }
    v
}

fn bench(c: &mut Criterion) {
    let keys = Keys::derive(&MasterKey::generate());
    let params = ChunkerParams::default();
    let chunker = Chunker::new(&params, keys.gear());
    let data = mixed(64 << 20);
    let seg = params.segment_size as usize;

    let mut g = c.benchmark_group("cpu");
    g.sample_size(10).measurement_time(std::time::Duration::from_secs(4)).throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("chunk (gear cut)", |b| {
        b.iter(|| {
            let mut n = 0;
            for s in data.chunks(seg) {
                n += chunker.split(s).len();
            }
            black_box(n)
        })
    });
    g.bench_function("keyed blake3 (1 thread)", |b| b.iter(|| black_box(keys.chunk_id(&data))));
    g.bench_function("chunk + hash (segment pipeline)", |b| {
        b.iter(|| {
            let mut n = 0u8;
            for s in data.chunks(seg) {
                for p in split_segment(&params, &chunker, s) {
                    if let mover_format::chunker::Piece::Data { offset, len } = p {
                        n ^= keys.chunk_id(&s[offset..offset + len]).0[0];
                    }
                }
            }
            black_box(n)
        })
    });
    let chunks: Vec<&[u8]> = data.chunks(128 << 10).collect();
    let ids: Vec<_> = chunks.iter().map(|c| keys.chunk_id(c)).collect();
    g.bench_function("compress zstd-1 + encrypt", |b| {
        let mut enc = BlobEncoder::new(1);
        b.iter(|| {
            let mut n = 0;
            for (c, id) in chunks.iter().zip(&ids) {
                n += enc.encode(&keys, *id, BlobKind::Data, c).map(|b| b.sealed.len()).unwrap_or(0);
            }
            black_box(n)
        })
    });
    let mut enc = BlobEncoder::new(1);
    let blobs: Vec<_> = chunks.iter().zip(&ids).filter_map(|(c, id)| enc.encode(&keys, *id, BlobKind::Data, c).ok()).collect();
    g.bench_function("pack (add + seal trailer + pack id)", |b| {
        b.iter(|| {
            let mut p = PackBuilder::new(16 << 20);
            let mut packs = 0;
            for bl in &blobs {
                let _ = p.add(bl);
                if p.len() >= 16 << 20 {
                    let full = std::mem::replace(&mut p, PackBuilder::new(16 << 20));
                    packs += full.finish(&keys).map(|r| r.1.len()).unwrap_or(0);
                }
            }
            black_box(packs + p.finish(&keys).map(|r| r.1.len()).unwrap_or(0))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
