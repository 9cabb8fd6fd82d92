//! Restore drills: prove a snapshot restores. Each volume is restored into scratch space
//! (a new file, removed afterwards whatever happens), then read back and compared, segment
//! by segment, with the keyed digests the backup recorded when it read the source — so the
//! check covers the whole way back: repository, decryption, reassembly and the writes. The
//! measured rate projects each volume's restore time (RTO).

use crate::aligned::AlignedBuf;
use crate::device::Kind;
use crate::error::{Error, Result, ResultExt};
use crate::pipeline::restore::{fetch_segment, restore_volume, RestoreOptions, SegmentAt, Target};
use crate::pipeline::splice::UNKNOWN_DIGEST;
use crate::progress::Progress;
use crate::snapshots::load_refs;
use mover_format::manifest::Manifest;
use mover_format::tree::{SegRefs, SegmentRef};
use mover_format::{Repository, SegmentDigest, SnapshotId};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VolumeDrill {
    pub name: String,
    pub size: u64,
    pub bytes_written: u64,
    pub restore_s: f64,
    pub verify_s: f64,
    /// Bytes of the volume restored per second.
    pub restore_bytes_per_s: f64,
    /// Segments compared with their recorded digests (holes: checked to read as zeros).
    pub segments_verified: u64,
    /// The restore time of this volume projected from the drill (its size at the measured
    /// rate): the RTO to expect from this repository on this node.
    pub projected_restore_s: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DrillReport {
    pub snapshot_id: SnapshotId,
    pub group: String,
    pub started_unix_ms: u64,
    pub duration_s: f64,
    pub volumes: Vec<VolumeDrill>,
}

/// Removes a scratch file when dropped (a failed or cancelled drill leaves nothing).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads back a restored volume and compares each segment with its recorded digest
/// (`digest` computes one; holes must read as zeros). A segment an incremental spliced has
/// no digest (only its changed bytes were read at backup): it is compared with the
/// segment as `fetch` reads it from the repository (every chunk verified by its id).
/// Returns the segments compared.
fn verify_segments(
    reader: &std::fs::File,
    refs: &SegRefs,
    seg_size: u64,
    size: u64,
    digest: impl Fn(&[u8]) -> SegmentDigest,
    fetch: impl Fn(u64, &mover_format::ChunkId, usize) -> Result<Vec<u8>>,
    cancel: &CancellationToken,
) -> Result<u64> {
    let mut buf = vec![0u8; seg_size as usize];
    let mut n = 0u64;
    for i in 0..refs.len() {
        let r = refs.at(i);
        if cancel.is_cancelled() {
            return Err(Error::cancelled("verifying the restored volume"));
        }
        let off = i as u64 * seg_size;
        let len = seg_size.min(size - off) as usize;
        reader.read_exact_at(&mut buf[..len], off).with_context(|| format!("reading back the restored volume at offset {off}"))?;
        let ok = match r {
            SegmentRef::Hole => buf[..len].iter().all(|b| *b == 0),
            SegmentRef::Map { digest: want, map } if want == UNKNOWN_DIGEST => fetch(off, &map, len)?[..] == buf[..len],
            SegmentRef::Map { digest: want, .. } => digest(&buf[..len]) == want,
        };
        if !ok {
            return Err(Error::corrupt(format!(
                "restored differently from what was backed up at offset {off} ({len} bytes: the digest recorded at backup does not match)"
            )));
        }
        n += 1;
    }
    Ok(n)
}

/// Restores every volume of `snap` into a new file under `scratch_dir`, verifies it
/// against the recorded segment digests, and removes it.
pub(crate) async fn drill(
    repo: &Repository,
    view: &crate::lock::ReadView,
    snap: &SnapshotId,
    m: &Manifest,
    scratch_dir: &Path,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<DrillReport> {
    let started = Instant::now();
    std::fs::create_dir_all(scratch_dir).with_context(|| format!("creating drill scratch directory {}", scratch_dir.display()))?;
    let mut volumes = Vec::new();
    for vol in &m.volumes {
        let path = scratch_dir.join(format!("drill-{}-{}-{}.img", &snap.to_string()[..12], vol.name, std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating drill scratch file {}", path.display()))?;
        let _scratch = Scratch(path.clone());
        let reader = file.try_clone().with_context(|| format!("opening {}", path.display()))?;
        let target = Target { file, label: path.display().to_string(), kind: Kind::File, fresh: true, finish: None };
        let t0 = Instant::now();
        let summary = restore_volume(repo, view, snap, vol, target, &RestoreOptions::default(), progress.clone(), cancel).await?;
        let restore_s = t0.elapsed().as_secs_f64();
        // Read back and compare with what the backup read from the source.
        let t1 = Instant::now();
        let index = view.index();
        let refs = load_refs(repo, &**index, snap, vol, cancel).await?;
        let (repo2, name, seg_size, size, snap2, cancel2) = (repo.clone(), vol.name.clone(), vol.segment_size as u64, vol.size, *snap, cancel.clone());
        let (rt, index2) = (tokio::runtime::Handle::current(), index.clone());
        let segments_verified = tokio::task::spawn_blocking(move || {
            let fetch = |off: u64, map: &mover_format::ChunkId, len: usize| -> Result<Vec<u8>> {
                let at = SegmentAt { repo: &repo2, index: &*index2, snap: &snap2, vol: &name, offset: off, len: len as u64 };
                let (buf, _holes) = rt.block_on(fetch_segment(&at, map, AlignedBuf::new(len), &cancel2))?;
                Ok(buf.as_slice()[..len].to_vec())
            };
            verify_segments(&reader, &refs, seg_size, size, |d| repo2.keys().segment_digest(d), fetch, &cancel2)
                .map_err(|e| e.context(format!("drill of snapshot {snap2}: volume '{name}'")))
        })
        .await??;
        let rate = vol.size as f64 / restore_s.max(1e-9);
        volumes.push(VolumeDrill {
            name: vol.name.clone(),
            size: vol.size,
            bytes_written: summary.bytes_written,
            restore_s,
            verify_s: t1.elapsed().as_secs_f64(),
            restore_bytes_per_s: rate,
            segments_verified,
            projected_restore_s: vol.size as f64 / rate,
        });
    }
    Ok(DrillReport {
        snapshot_id: *snap,
        group: m.group(),
        started_unix_ms: mover_format::now_unix_ms() - (started.elapsed().as_millis() as u64),
        duration_s: started.elapsed().as_secs_f64(),
        volumes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(d: &[u8]) -> SegmentDigest {
        SegmentDigest(*blake3::hash(d).as_bytes())
    }

    #[test]
    fn a_restored_byte_that_differs_from_the_backup_fails_naming_its_segment() {
        let seg = 4096u64;
        let mut data = vec![7u8; 3 * seg as usize + 100];
        data[seg as usize..2 * seg as usize].fill(0);
        let map = mover_format::ChunkId([0; 32]);
        let refs: SegRefs =
            data.chunks(seg as usize).map(|c| if c.iter().all(|b| *b == 0) { SegmentRef::Hole } else { SegmentRef::Map { map, digest: digest(c) } }).collect();
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&data, 0).unwrap();
        let c = CancellationToken::new();
        assert_eq!(verify_segments(&f, &refs, seg, data.len() as u64, digest, |_, _, _| unreachable!(), &c).unwrap(), 4);
        // One byte of the short last segment, then one in the hole.
        f.write_all_at(&[8], 3 * seg + 50).unwrap();
        let e = verify_segments(&f, &refs, seg, data.len() as u64, digest, |_, _, _| unreachable!(), &c).unwrap_err();
        assert!(e.to_string().contains(&format!("at offset {}", 3 * seg)), "{e}");
        f.write_all_at(&[7], 3 * seg + 50).unwrap();
        f.write_all_at(&[1], seg + 1).unwrap();
        let e = verify_segments(&f, &refs, seg, data.len() as u64, digest, |_, _, _| unreachable!(), &c).unwrap_err();
        assert!(e.to_string().contains(&format!("at offset {seg}")) && e.kind() == crate::ErrorKind::Corrupt, "{e}");
    }

    #[test]
    fn a_spliced_segment_without_a_digest_is_compared_with_the_repository() {
        let seg = 4096u64;
        let data = vec![9u8; 2 * seg as usize];
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&data, 0).unwrap();
        let map = mover_format::ChunkId([1; 32]);
        let refs: SegRefs =
            [SegmentRef::Map { map, digest: digest(&data[..seg as usize]) }, SegmentRef::Map { map, digest: UNKNOWN_DIGEST }].into_iter().collect();
        let c = CancellationToken::new();
        let asked = std::cell::Cell::new(0);
        let good = |off: u64, _: &mover_format::ChunkId, len: usize| {
            asked.set(asked.get() + 1);
            assert_eq!(off, seg);
            Ok(vec![9u8; len])
        };
        assert_eq!(verify_segments(&f, &refs, seg, 2 * seg, digest, good, &c).unwrap(), 2);
        assert_eq!(asked.get(), 1, "only the segment without a digest is fetched");
        let bad = |_: u64, _: &mover_format::ChunkId, len: usize| Ok(vec![8u8; len]);
        let e = verify_segments(&f, &refs, seg, 2 * seg, digest, bad, &c).unwrap_err();
        assert!(e.to_string().contains(&format!("at offset {seg}")), "{e}");
    }
}
