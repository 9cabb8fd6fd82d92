//! The reader stage: reads whole segments into aligned buffers taken from a fixed pool
//! (the pool size bounds the memory of the read side), in order, with `queue_depth`
//! reads in flight. It reads the descriptor the request was checked on, never a path:
//! io_uring with `O_DIRECT` first; when io_uring is refused (seccomp) it falls back to
//! `pread`, and when `O_DIRECT` is refused (tmpfs) to buffered reads. The path taken is
//! reported. Sources that are not descriptors (NBD, HTTP) are read by [`spawn_blocks`].

use crate::aligned::{AlignedBuf, ALIGN};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::source::BlockRead;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IoChoice {
    /// io_uring when the kernel allows it, else pread.
    #[default]
    Auto,
    #[serde(rename = "io_uring")]
    IoUring,
    Pread,
}

impl std::str::FromStr for IoChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(IoChoice::Auto),
            "io_uring" => Ok(IoChoice::IoUring),
            "pread" => Ok(IoChoice::Pread),
            _ => Err(Error::invalid(format!("I/O path '{s}': use auto, io_uring or pread"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    IoUring,
    Pread,
    /// Read by a [`BlockRead`] (an NBD export, an HTTP endpoint), named by it.
    Blocks(&'static str),
}

impl IoBackend {
    pub fn as_str(&self) -> &'static str {
        match self {
            IoBackend::IoUring => "io_uring",
            IoBackend::Pread => "pread",
            IoBackend::Blocks(name) => name,
        }
    }
}

/// One segment to read: all of it, or only `ranges` of it.
#[derive(Debug, Clone)]
pub struct ReadJob {
    pub seg: u64,
    pub offset: u64,
    pub len: usize,
    /// Only these byte ranges `[start, end)` of the segment (sorted, disjoint; for a file,
    /// 4096-aligned except at the volume's end); `None`: the whole segment. Bytes outside
    /// them are left as they were in the buffer.
    pub ranges: Option<Vec<(usize, usize)>>,
}

/// A volume's reads, in order, held compactly: a run of whole segments is one entry, so a
/// 64 TiB volume read in full costs a few bytes here, not 48 per segment (768 MiB, most
/// of the DaemonSet's memory limit). Yields the [`ReadJob`]s one by one.
#[derive(Debug, Default)]
pub struct ReadPlan {
    items: VecDeque<PlanItem>,
    seg_size: u64,
    size: u64,
    len: usize,
}

#[derive(Debug)]
enum PlanItem {
    /// Segments `first..first + count`, each read whole.
    Whole {
        first: u64,
        count: u64,
    },
    Job(ReadJob),
}

impl ReadPlan {
    pub fn new(seg_size: u64, size: u64) -> Self {
        Self { items: VecDeque::new(), seg_size, size, len: 0 }
    }
    /// Adds the next read (segments in increasing order).
    pub fn push(&mut self, job: ReadJob) {
        self.len += 1;
        if job.ranges.is_none() {
            if let Some(PlanItem::Whole { first, count }) = self.items.back_mut() {
                if *first + *count == job.seg {
                    *count += 1;
                    return;
                }
            }
            self.items.push_back(PlanItem::Whole { first: job.seg, count: 1 });
        } else {
            self.items.push_back(PlanItem::Job(job));
        }
    }
    /// Reads left.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Iterator for ReadPlan {
    type Item = ReadJob;
    fn next(&mut self) -> Option<ReadJob> {
        let job = match self.items.front_mut()? {
            PlanItem::Whole { first, count } => {
                let (seg, offset) = (*first, *first * self.seg_size);
                *first += 1;
                *count -= 1;
                if *count == 0 {
                    self.items.pop_front();
                }
                ReadJob { seg, offset, len: self.seg_size.min(self.size - offset) as usize, ranges: None }
            }
            PlanItem::Job(_) => match self.items.pop_front() {
                Some(PlanItem::Job(j)) => j,
                _ => unreachable!("the front item was a job"),
            },
        };
        self.len -= 1;
        Some(job)
    }
}

impl ReadJob {
    /// The ranges to read.
    pub fn pieces(&self) -> Vec<(usize, usize)> {
        self.ranges.clone().unwrap_or_else(|| vec![(0, self.len)])
    }

    /// The reads a block source is asked for: the pieces, with those closer than
    /// [`BLOCK_COALESCE_GAP`] merged into one. Each request costs a block source a round
    /// trip (a KubeVirt export a new NBD connection upstream), while the bytes in between
    /// cost little; they land in the segment's buffer outside `ranges`, where nothing
    /// looks.
    pub fn block_reads(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (a, b) in self.pieces() {
            match out.last_mut() {
                Some(last) if a <= last.1 + BLOCK_COALESCE_GAP => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out
    }
}

/// Pieces of a segment closer than this are read from a block source in one request.
pub const BLOCK_COALESCE_GAP: usize = 256 << 10;

/// A segment read: `buf.len() == len`; with `ranges`, only those bytes were read.
pub struct ReadDone {
    pub seg: u64,
    pub offset: u64,
    pub buf: AlignedBuf,
    pub ranges: Option<Vec<(usize, usize)>>,
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

fn log_fallback(msg: &str) {
    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!("{msg}");
    }
}

/// Which read path a backup would take here now: `io_uring`, or `pread` when the kernel
/// (or a seccomp profile) refuses io_uring.
pub fn probe_io_uring() -> &'static str {
    match std::thread::spawn(|| tokio_uring::Runtime::new(&tokio_uring::builder()).is_ok()).join() {
        Ok(true) => "io_uring",
        _ => "pread",
    }
}

/// Switches an open descriptor to `O_DIRECT` (`fcntl(F_SETFL)`: the same open file, no
/// path involved); false when the filesystem refuses it (then it is read buffered).
pub fn set_direct(f: &File, label: &str) -> bool {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take and return plain ints.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return false;
    }
    if flags & libc::O_DIRECT != 0 {
        return true;
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) } == 0 {
        true
    } else {
        log_fallback(&format!("{label}: O_DIRECT refused by the filesystem, reading buffered"));
        false
    }
}

/// Runs the reader on its own thread over `file` (`label` names it in messages). Results
/// arrive on `tx` in job order; buffers come from `pool` and must be returned to it by the
/// consumer.
pub fn spawn(
    file: File,
    label: String,
    jobs: ReadPlan,
    choice: IoChoice,
    queue_depth: usize,
    pool: mpsc::Receiver<AlignedBuf>,
    tx: mpsc::Sender<Result<ReadDone>>,
    cancel: CancellationToken,
) -> Result<(std::thread::JoinHandle<()>, IoBackend)> {
    set_direct(&file, &label);
    let path = label;
    let qd = queue_depth.max(1);
    // The io_uring runtime is not Send: it is built on the reader thread, which reports
    // back which path it took before reading.
    let (btx, brx) = std::sync::mpsc::channel::<Result<IoBackend>>();
    let handle = std::thread::Builder::new()
        .name("mover-reader".into())
        .spawn(move || {
            tracing::debug!(source = %path, "reader thread started");
            let runtime = match choice {
                IoChoice::Pread => None,
                IoChoice::IoUring => match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                    Ok(rt) => Some(rt),
                    Err(e) => {
                        let _ = btx.send(Err(Error::with_source(ErrorKind::Permanent, "io_uring was requested but the kernel refused it", e)));
                        return;
                    }
                },
                IoChoice::Auto => match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                    Ok(rt) => Some(rt),
                    Err(e) => {
                        log_fallback(&format!("io_uring unavailable ({e}); falling back to pread"));
                        None
                    }
                },
            };
            tracing::debug!(io_uring = runtime.is_some(), "reader runtime ready");
            let _ = btx.send(Ok(if runtime.is_some() { IoBackend::IoUring } else { IoBackend::Pread }));
            let r = match runtime {
                Some(rt) => rt.block_on(read_uring(&path, file, jobs, qd, pool, &tx, &cancel)),
                None => read_pread(&path, &file, jobs, pool, &tx, &cancel),
            };
            if let Err(e) = r {
                let _ = tx.blocking_send(Err(e));
            }
        })
        .context("starting the reader thread")?;
    let backend = brx.recv().map_err(|_| Error::permanent("the reader thread exited before starting"))??;
    Ok((handle, backend))
}

/// A read of the segment that stopped at `got` where `want` was needed.
fn check_len(path: &str, job: &ReadJob, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::precondition(format!(
            "reading {path} at offset {}: short read (up to {got} of {want} bytes of the segment; did the source shrink?)",
            job.offset
        )));
    }
    Ok(())
}

async fn read_uring(
    path: &str,
    file: File,
    jobs: ReadPlan,
    qd: usize,
    mut pool: mpsc::Receiver<AlignedBuf>,
    tx: &mpsc::Sender<Result<ReadDone>>,
    cancel: &CancellationToken,
) -> Result<()> {
    let file = std::rc::Rc::new(tokio_uring::fs::File::from_std(file));
    let mut inflight: VecDeque<tokio::task::JoinHandle<Result<ReadDone>>> = VecDeque::new();
    let result = feed(path, &file, jobs, qd, &mut pool, tx, cancel, &mut inflight).await;
    // Never leave a read in flight: the kernel writes into its buffer until it completes,
    // so the buffer (and the ring) must outlive it, whatever ended the loop.
    while let Some(h) = inflight.pop_front() {
        let _ = h.await;
    }
    result
}

async fn feed(
    path: &str,
    file: &std::rc::Rc<tokio_uring::fs::File>,
    jobs: ReadPlan,
    qd: usize,
    pool: &mut mpsc::Receiver<AlignedBuf>,
    tx: &mpsc::Sender<Result<ReadDone>>,
    cancel: &CancellationToken,
    inflight: &mut VecDeque<tokio::task::JoinHandle<Result<ReadDone>>>,
) -> Result<()> {
    for job in jobs {
        while inflight.len() >= qd {
            if let Some(h) = inflight.pop_front() {
                let r = h.await?;
                if !send(tx, r, cancel).await {
                    return Ok(());
                }
            }
        }
        if cancel.is_cancelled() {
            return Ok(());
        }
        let mut buf = tokio::select! {
            b = pool.recv() => match b { Some(b) => b, None => return Ok(()) },
            _ = cancel.cancelled() => return Ok(()),
        };
        // Every byte is initialised (zeroed at allocation): reads may start anywhere in it.
        let cap = buf.capacity();
        buf.set_len(cap);
        let f = file.clone();
        let p = path.to_string();
        inflight.push_back(tokio_uring::spawn(async move {
            let want = job.len.div_ceil(ALIGN) * ALIGN;
            let mut buf = buf;
            for (a, b) in job.pieces() {
                let stop = b.div_ceil(ALIGN).saturating_mul(ALIGN).min(want);
                let mut done = a;
                while done < b {
                    let slice = tokio_uring::buf::BoundedBuf::slice(buf, done..stop);
                    let (res, slice) = f.read_at(slice, job.offset + done as u64).await;
                    buf = slice.into_inner();
                    let n = res.with_context(|| format!("reading {p} at offset {}", job.offset + done as u64))?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                check_len(&p, &job, done, b)?;
            }
            buf.set_len(job.len);
            tracing::trace!(seg = job.seg, "read (io_uring)");
            Ok(ReadDone { seg: job.seg, offset: job.offset, buf, ranges: job.ranges })
        }));
    }
    while let Some(h) = inflight.pop_front() {
        let r = h.await?;
        if !send(tx, r, cancel).await {
            return Ok(());
        }
    }
    Ok(())
}

/// Sends a result downstream; false when the consumers are gone or the job is cancelled.
async fn send(tx: &mpsc::Sender<Result<ReadDone>>, r: Result<ReadDone>, cancel: &CancellationToken) -> bool {
    tokio::select! {
        res = tx.send(r) => res.is_ok(),
        _ = cancel.cancelled() => false,
    }
}

/// Runs a [`BlockRead`] reader on its own thread (its name is reported as the I/O path);
/// a reader that can be cloned (an HTTP endpoint) reads `parallel` segments at once.
pub fn spawn_blocks(
    client: Box<dyn BlockRead>,
    jobs: ReadPlan,
    parallel: usize,
    pool: mpsc::Receiver<AlignedBuf>,
    tx: mpsc::Sender<Result<ReadDone>>,
    cancel: CancellationToken,
) -> Result<(std::thread::JoinHandle<()>, IoBackend)> {
    let name = client.name();
    let mut readers = vec![client];
    while readers.len() < parallel.max(1) {
        match readers[0].try_clone() {
            Some(c) => readers.push(c),
            None => break,
        }
    }
    let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
    let pool = std::sync::Arc::new(std::sync::Mutex::new(pool));
    // Set by the first reader that fails: the others stop (the error is on its way).
    let failed_any = std::sync::Arc::new(AtomicBool::new(false));
    let handle = std::thread::Builder::new()
        .name("mover-block-reader".into())
        .spawn(move || {
            let mut threads = Vec::new();
            for mut client in readers {
                let (jobs, pool, tx, cancel, failed_any) = (jobs.clone(), pool.clone(), tx.clone(), cancel.clone(), failed_any.clone());
                threads.push(std::thread::spawn(move || {
                    loop {
                        if cancel.is_cancelled() || failed_any.load(Ordering::Acquire) {
                            break;
                        }
                        let Some(job) = jobs.lock().ok().and_then(|mut j| j.next()) else { break };
                        let Some(mut buf) = pool.lock().ok().and_then(|mut p| p.blocking_recv()) else { break };
                        let r = job.block_reads().into_iter().try_for_each(|(a, b)| client.read_at(job.offset + a as u64, &mut buf.as_mut_full()[a..b]));
                        buf.set_len(job.len);
                        let msg = r.map(|()| ReadDone { seg: job.seg, offset: job.offset, buf, ranges: job.ranges });
                        let failed = msg.is_err();
                        if tx.blocking_send(msg).is_err() || failed {
                            failed_any.store(true, Ordering::Release);
                            break;
                        }
                    }
                    client.close();
                }));
            }
            for t in threads {
                let _ = t.join();
            }
        })
        .context("starting the block reader thread")?;
    Ok((handle, IoBackend::Blocks(name)))
}

fn read_pread(
    path: &str,
    file: &File,
    jobs: ReadPlan,
    mut pool: mpsc::Receiver<AlignedBuf>,
    tx: &mpsc::Sender<Result<ReadDone>>,
    cancel: &CancellationToken,
) -> Result<()> {
    for job in jobs {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let Some(mut buf) = pool.blocking_recv() else { return Ok(()) };
        let want = job.len.div_ceil(ALIGN) * ALIGN;
        for (a, b) in job.pieces() {
            let stop = b.div_ceil(ALIGN).saturating_mul(ALIGN).min(want);
            let mut done = a;
            while done < b {
                let n = file
                    .read_at(&mut buf.as_mut_full()[done..stop], job.offset + done as u64)
                    .with_context(|| format!("reading {path} at offset {}", job.offset + done as u64))?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            check_len(path, &job, done, b)?;
        }
        buf.set_len(job.len);
        if tx.blocking_send(Ok(ReadDone { seg: job.seg, offset: job.offset, buf, ranges: job.ranges })).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_read_plan_keeps_runs_of_whole_segments_as_one_entry_and_yields_them_in_order() {
        let mut p = ReadPlan::new(4, 18);
        let whole = |seg: u64| ReadJob { seg, offset: seg * 4, len: 4.min(18 - seg as usize * 4), ranges: None };
        for seg in 0..3 {
            p.push(whole(seg));
        }
        p.push(ReadJob { seg: 3, offset: 12, len: 4, ranges: Some(vec![(1, 2)]) });
        p.push(whole(4));
        assert_eq!((p.items.len(), p.len()), (3, 5));
        let got: Vec<(u64, u64, usize, Option<Vec<(usize, usize)>>)> = p.map(|j| (j.seg, j.offset, j.len, j.ranges)).collect();
        assert_eq!(got, vec![(0, 0, 4, None), (1, 4, 4, None), (2, 8, 4, None), (3, 12, 4, Some(vec![(1, 2)])), (4, 16, 2, None)]);
        let mut big = ReadPlan::new(4 << 20, 64 << 40);
        for seg in 0..(16u64 << 20) {
            big.push(ReadJob { seg, offset: seg << 22, len: 4 << 20, ranges: None });
        }
        assert_eq!((big.items.len(), big.len()), (1, 16 << 20));
    }

    use super::*;

    #[test]
    fn block_reads_merge_pieces_closer_than_the_gap() {
        let job = |ranges: Vec<(usize, usize)>| ReadJob { seg: 0, offset: 0, len: 4 << 20, ranges: Some(ranges) };
        let k = 1024;
        assert_eq!(job(vec![(0, 4 * k), (192 * k, 196 * k), (900 * k, 904 * k)]).block_reads(), vec![(0, 196 * k), (900 * k, 904 * k)]);
        assert_eq!(job(vec![(0, k), (k + BLOCK_COALESCE_GAP, 2 * k + BLOCK_COALESCE_GAP)]).block_reads(), vec![(0, 2 * k + BLOCK_COALESCE_GAP)]);
        assert_eq!(ReadJob { seg: 0, offset: 0, len: 8, ranges: None }.block_reads(), vec![(0, 8)]);
    }
}
