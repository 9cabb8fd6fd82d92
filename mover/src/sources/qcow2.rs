//! A KubeVirt push-mode backup output — one sparse qcow2 image per disk — as a backup
//! source. A full backup's image is read as the disk (clusters it does not hold read as
//! zeros); an incremental's image holds only the clusters that changed since the previous
//! checkpoint, so only those are read and every other segment is taken from the parent.
//!
//! Only what QEMU's backup job writes is supported: qcow2 version 2 or 3, uncompressed
//! clusters, no encryption, no external data file, no extended L2 entries. Everything read
//! from the file (cluster size, table sizes and offsets) is bounded before it is used.
//! Format: <https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/qcow2.txt>.

use mover_engine::source::{BlockRead, Changes, Opened, ParentVolume, Reader, VolumeSource};
use mover_engine::{Error, Result, ResultExt};
use mover_format::manifest::ChangeSource;
use std::fs::File;
use std::os::unix::fs::FileExt;
use tokio_util::sync::CancellationToken;

const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// Incompatible feature bits Mover understands: dirty (0) and compression type (3, only
/// matters for compressed clusters, which are refused anyway).
const KNOWN_INCOMPATIBLE: u64 = 1 | (1 << 3);
/// L2 tables kept in memory while reading (reads are mostly sequential).
const L2_CACHE: usize = 4;

/// What a range of the image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not in this image (for an incremental: unchanged).
    Absent,
    /// Reads as zeros (a zero cluster: the guest wrote zeros there).
    Zero,
    /// Data at this offset of the file.
    Data(u64),
}

/// An opened qcow2 image: its header and a small cache of L2 tables.
pub struct Qcow2 {
    file: File,
    label: String,
    file_len: u64,
    cluster_bits: u32,
    size: u64,
    l1: Vec<u64>,
    cache: Vec<(usize, Vec<u64>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5], b[at + 6], b[at + 7]])
}

impl Qcow2 {
    pub fn open(file: File, label: String) -> Result<Self> {
        let bad = |m: String| Error::invalid(format!("qcow2 image {label}: {m}"));
        let file_len = file.metadata().with_context(|| format!("inspecting {label}"))?.len();
        let mut h = [0u8; 104];
        file.read_exact_at(&mut h[..72], 0).map_err(|e| bad(format!("reading the header: {e}")))?;
        if be32(&h, 0) != MAGIC {
            return Err(bad("not a qcow2 image (bad magic)".into()));
        }
        let version = be32(&h, 4);
        if !(2..=3).contains(&version) {
            return Err(bad(format!("qcow2 version {version} is not supported")));
        }
        if version == 3 {
            file.read_exact_at(&mut h[72..104], 72).map_err(|e| bad(format!("reading the header: {e}")))?;
            let incompatible = be64(&h, 72);
            if incompatible & (1 << 1) != 0 {
                return Err(bad("marked corrupt by QEMU".into()));
            }
            if incompatible & (1 << 2) != 0 {
                return Err(bad("uses an external data file, which Mover does not read".into()));
            }
            if incompatible & (1 << 4) != 0 {
                return Err(bad("uses extended L2 entries (subclusters), which Mover does not read".into()));
            }
            if incompatible & !KNOWN_INCOMPATIBLE & !((1 << 2) | (1 << 4)) != 0 {
                return Err(bad(format!("has incompatible features {incompatible:#x} Mover does not know")));
            }
        }
        // A backing file holds what this image does not: its absent clusters are not holes,
        // and reading them as zeros would store a different disk.
        if be64(&h, 8) != 0 || be32(&h, 16) != 0 {
            return Err(bad(
                "has a backing file: clusters it does not hold come from that file, not zeros; convert it first (qemu-img convert) or back up the disk itself"
                    .into(),
            ));
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster size 2^{cluster_bits} is out of range")));
        }
        let size = be64(&h, 24);
        if size > mover_engine::pipeline::backup::MAX_VOLUME_SIZE {
            return Err(bad(format!("virtual size {size} is more than the largest volume Mover backs up")));
        }
        if be32(&h, 32) != 0 {
            return Err(bad("is encrypted".into()));
        }
        let l1_size = be32(&h, 36) as u64;
        let l1_offset = be64(&h, 40);
        let cluster = 1u64 << cluster_bits;
        let per_l2 = cluster / 8;
        let needed = size.div_ceil(cluster * per_l2);
        if l1_size < needed || l1_size > needed + 1024 {
            return Err(bad(format!("L1 table of {l1_size} entries for a {size}-byte disk (needs {needed})")));
        }
        if !l1_offset.is_multiple_of(512) || l1_offset.checked_add(l1_size * 8).is_none_or(|e| e > file_len) {
            return Err(bad(format!("L1 table at {l1_offset} lies outside the file")));
        }
        let mut raw = vec![0u8; (l1_size * 8) as usize];
        file.read_exact_at(&mut raw, l1_offset).map_err(|e| bad(format!("reading the L1 table: {e}")))?;
        let l1 = raw.chunks(8).map(|c| be64(c, 0)).collect();
        Ok(Self { file, label, file_len, cluster_bits, size, l1, cache: Vec::new() })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The L2 table `i` (empty when unallocated), through the cache.
    fn l2(&mut self, i: usize) -> Result<Option<&[u64]>> {
        let entry = self.l1.get(i).copied().unwrap_or(0);
        let off = entry & L1_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if let Some(pos) = self.cache.iter().position(|(k, _)| *k == i) {
            let hit = self.cache.remove(pos);
            self.cache.push(hit);
        } else {
            let cs = self.cluster_size();
            if !off.is_multiple_of(cs) || off + cs > self.file_len {
                return Err(Error::corrupt(format!("qcow2 image {}: L2 table {i} at {off} lies outside the file", self.label)));
            }
            let mut raw = vec![0u8; cs as usize];
            self.file.read_exact_at(&mut raw, off).with_context(|| format!("reading L2 table {i} of {}", self.label))?;
            if self.cache.len() >= L2_CACHE {
                self.cache.remove(0);
            }
            self.cache.push((i, raw.chunks(8).map(|c| be64(c, 0)).collect()));
        }
        Ok(self.cache.last().map(|(_, t)| t.as_slice()))
    }

    /// What the cluster holding guest offset `off` is.
    pub fn cluster(&mut self, off: u64) -> Result<Cluster> {
        let cb = self.cluster_bits;
        let per_l2 = 1u64 << (cb - 3);
        let ci = off >> cb;
        let (l1i, l2i) = ((ci / per_l2) as usize, (ci % per_l2) as usize);
        let label = self.label.clone();
        let file_len = self.file_len;
        let cs = self.cluster_size();
        let Some(t) = self.l2(l1i)? else { return Ok(Cluster::Absent) };
        let e = t[l2i];
        if e & L2_COMPRESSED != 0 {
            return Err(Error::invalid(format!("qcow2 image {label}: compressed cluster at guest offset {off}; Mover reads only uncompressed images")));
        }
        let host = e & L2_OFFSET_MASK;
        if e & L2_ZERO != 0 {
            return Ok(Cluster::Zero);
        }
        if host == 0 {
            return Ok(Cluster::Absent);
        }
        if !host.is_multiple_of(cs) || host + cs > file_len.div_ceil(cs) * cs {
            return Err(Error::corrupt(format!("qcow2 image {label}: cluster at guest offset {off} points to {host}, outside the file")));
        }
        Ok(Cluster::Data(host))
    }

    /// Merged ranges `[start, end)` of the guest disk by what the image holds there:
    /// `(data, zero)`.
    pub fn map(&mut self) -> Result<(Vec<(u64, u64)>, Vec<(u64, u64)>)> {
        let cs = self.cluster_size();
        let (mut data, mut zero): (Vec<(u64, u64)>, Vec<(u64, u64)>) = (Vec::new(), Vec::new());
        let push = |v: &mut Vec<(u64, u64)>, a: u64, b: u64| match v.last_mut() {
            Some(l) if l.1 == a => l.1 = b,
            _ => v.push((a, b)),
        };
        let per_l2_bytes = cs * (cs / 8);
        // Every L2 table and data cluster lies in the file, once (QEMU's backup output
        // shares none): more of them than the file has clusters means tables pointing at
        // the same clusters again and again — a small file claiming a large disk of data,
        // which would be read (and chunked) without end.
        let file_clusters = self.file_len.div_ceil(cs);
        let tables = self.l1.iter().filter(|e| *e & L1_OFFSET_MASK != 0).count() as u64;
        if tables > file_clusters {
            return Err(Error::invalid(format!(
                "qcow2 image {}: {tables} L2 tables in a file of {file_clusters} clusters: tables are aliased; this is not an image QEMU's backup wrote",
                self.label
            )));
        }
        let mut data_clusters = 0u64;
        let mut off = 0u64;
        while off < self.size {
            // Skip whole unallocated L2 tables at once.
            if self.l1.get((off / per_l2_bytes) as usize).copied().unwrap_or(0) & L1_OFFSET_MASK == 0 {
                off = (off / per_l2_bytes + 1) * per_l2_bytes;
                continue;
            }
            let end = (off + cs).min(self.size);
            match self.cluster(off)? {
                Cluster::Data(_) => {
                    data_clusters += 1;
                    if data_clusters + tables > file_clusters {
                        return Err(Error::invalid(format!(
                            "qcow2 image {}: more data clusters than its file of {file_clusters} clusters holds (by guest offset {off}): clusters are aliased; this is not an image QEMU's backup wrote",
                            self.label
                        )));
                    }
                    push(&mut data, off, end)
                }
                Cluster::Zero => push(&mut zero, off, end),
                Cluster::Absent => {}
            }
            off = end;
        }
        Ok((data, zero))
    }

    /// Reads guest bytes at `off` (absent and zero clusters read as zeros).
    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > self.size) {
            return Err(Error::invalid(format!("read past the end of qcow2 image {} ({} bytes)", self.label, self.size)));
        }
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let in_cluster = pos % cs;
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            match self.cluster(pos)? {
                Cluster::Data(host) => self
                    .file
                    .read_exact_at(&mut buf[done..done + n], host + in_cluster)
                    .with_context(|| format!("reading {} at guest offset {pos}", self.label))?,
                Cluster::Zero | Cluster::Absent => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

impl BlockRead for Qcow2 {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, buf)
    }
}

/// Whether a push-mode image is a full backup or an incremental one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Qcow2Kind {
    Full,
    /// Holds the changes since this checkpoint.
    Incremental {
        since: String,
    },
}

/// A push-mode qcow2 output as a backup source.
pub struct Qcow2Source {
    pub file: File,
    pub label: String,
    pub kind: Qcow2Kind,
}

#[async_trait::async_trait]
impl VolumeSource for Qcow2Source {
    fn describe(&self) -> String {
        self.label.clone()
    }
    async fn open(self: Box<Self>, _parent: Option<ParentVolume<'_>>, _cancel: &CancellationToken) -> Result<Opened> {
        let kind = self.kind.clone();
        tokio::task::spawn_blocking(move || {
            let mut q = Qcow2::open(self.file, self.label)?;
            let (data, zero) = q.map()?;
            let size = q.size();
            let (allocated, changes) = match kind {
                // Everything the image does not hold as data reads as zeros: holes.
                Qcow2Kind::Full => (Some(data), Changes::default()),
                // Changed: every cluster the image holds, data or zeros.
                Qcow2Kind::Incremental { since } => {
                    let mut all: Vec<(u64, u64)> = data.iter().chain(zero.iter()).copied().collect();
                    all.sort_unstable();
                    let changed = all.into_iter().map(|(a, b)| (a, b - a)).collect();
                    (
                        None,
                        Changes {
                            source: Some(ChangeSource::Qcow2),
                            changed: Some(changed),
                            since: Some(since),
                            fallback: None,
                            sparse: true,
                            ..Default::default()
                        },
                    )
                }
            };
            Ok(Opened { size, reader: Reader::Blocks(Box::new(q)), allocated, changes })
        })
        .await?
    }
}
