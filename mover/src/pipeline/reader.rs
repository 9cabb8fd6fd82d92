//! The reader stage: reads whole segments into aligned buffers taken from a fixed pool
//! (the pool size bounds the memory of the read side), in order, with `queue_depth`
//! reads in flight. io_uring with `O_DIRECT` first; when io_uring is refused (seccomp) it
//! falls back to `pread`, and when `O_DIRECT` is refused (tmpfs) to buffered reads. The
//! path taken is reported.

use crate::aligned::{AlignedBuf, ALIGN};
use anyhow::{anyhow, Context, Result};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IoChoice {
    /// io_uring when the kernel allows it, else pread.
    #[default]
    Auto,
    #[value(name = "io_uring")]
    IoUring,
    Pread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    IoUring,
    Pread,
    /// Read over the NBD protocol (`crate::nbd`).
    Nbd,
}

impl IoBackend {
    pub fn as_str(&self) -> &'static str {
        match self {
            IoBackend::IoUring => "io_uring",
            IoBackend::Pread => "pread",
            IoBackend::Nbd => "nbd",
        }
    }
}

/// One segment to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadJob {
    pub seg: u64,
    pub offset: u64,
    pub len: usize,
}

/// A segment read: `buf.len() == len`.
pub struct ReadDone {
    pub seg: u64,
    pub offset: u64,
    pub buf: AlignedBuf,
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

fn log_fallback(msg: &str) {
    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!("{msg}");
    }
}

/// Opens with `O_DIRECT`, or buffered when the filesystem refuses it.
pub fn open_direct(path: &Path) -> Result<(File, bool)> {
    match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log_fallback(&format!("{}: O_DIRECT refused by the filesystem, reading buffered", path.display()));
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            Ok((f, false))
        }
        Err(e) => Err(anyhow!(e).context(format!("opening {}", path.display()))),
    }
}

/// Runs the reader on its own thread. Results arrive on `tx` in job order; buffers come from
/// `pool` and must be returned to it by the consumer.
pub fn spawn(
    path: PathBuf,
    jobs: Vec<ReadJob>,
    choice: IoChoice,
    queue_depth: usize,
    pool: mpsc::Receiver<AlignedBuf>,
    tx: mpsc::Sender<Result<ReadDone>>,
    cancel: CancellationToken,
) -> Result<(std::thread::JoinHandle<()>, IoBackend)> {
    let (file, _direct) = open_direct(&path)?;
    let qd = queue_depth.max(1);
    // The io_uring runtime is not Send: it is built on the reader thread, which reports
    // back which path it took before reading.
    let (btx, brx) = std::sync::mpsc::channel::<Result<IoBackend>>();
    let handle = std::thread::Builder::new()
        .name("mover-reader".into())
        .spawn(move || {
            tracing::debug!(path = %path.display(), "reader thread started");
            let runtime = match choice {
                IoChoice::Pread => None,
                IoChoice::IoUring => match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                    Ok(rt) => Some(rt),
                    Err(e) => {
                        let _ = btx.send(Err(anyhow!(e).context("io_uring was requested but the kernel refused it")));
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
    let backend = brx.recv().map_err(|_| anyhow!("the reader thread exited before starting"))??;
    Ok((handle, backend))
}

fn check_len(path: &Path, job: &ReadJob, got: usize) -> Result<()> {
    if got < job.len {
        return Err(anyhow!("reading {} at offset {}: short read ({got} of {} bytes; did the source shrink?)", path.display(), job.offset, job.len));
    }
    Ok(())
}

async fn read_uring(
    path: &Path,
    file: File,
    jobs: Vec<ReadJob>,
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

#[allow(clippy::too_many_arguments)]
async fn feed(
    path: &Path,
    file: &std::rc::Rc<tokio_uring::fs::File>,
    jobs: Vec<ReadJob>,
    qd: usize,
    pool: &mut mpsc::Receiver<AlignedBuf>,
    tx: &mpsc::Sender<Result<ReadDone>>,
    cancel: &CancellationToken,
    inflight: &mut VecDeque<tokio::task::JoinHandle<Result<ReadDone>>>,
) -> Result<()> {
    for job in jobs {
        while inflight.len() >= qd {
            if let Some(h) = inflight.pop_front() {
                let r = h.await.map_err(|e| anyhow!("read task failed: {e}"))?;
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
        buf.set_len(0);
        let f = file.clone();
        let p = path.to_path_buf();
        inflight.push_back(tokio_uring::spawn(async move {
            let want = job.len.div_ceil(ALIGN) * ALIGN;
            let mut done = 0usize;
            let mut buf = buf;
            while done < job.len {
                let slice = tokio_uring::buf::BoundedBuf::slice(buf, done..want);
                let (res, slice) = f.read_at(slice, job.offset + done as u64).await;
                buf = slice.into_inner();
                let n = res.with_context(|| format!("reading {} at offset {}", p.display(), job.offset + done as u64))?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            check_len(&p, &job, done)?;
            buf.set_len(job.len);
            tracing::trace!(seg = job.seg, "read (io_uring)");
            Ok(ReadDone { seg: job.seg, offset: job.offset, buf })
        }));
    }
    while let Some(h) = inflight.pop_front() {
        let r = h.await.map_err(|e| anyhow!("read task failed: {e}"))?;
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

/// Runs an NBD reader on its own thread, on the connection `client` (already negotiated).
pub fn spawn_nbd(
    mut client: crate::nbd::NbdClient,
    jobs: Vec<ReadJob>,
    mut pool: mpsc::Receiver<AlignedBuf>,
    tx: mpsc::Sender<Result<ReadDone>>,
    cancel: CancellationToken,
) -> Result<(std::thread::JoinHandle<()>, IoBackend)> {
    let handle = std::thread::Builder::new()
        .name("mover-nbd-reader".into())
        .spawn(move || {
            for job in jobs {
                if cancel.is_cancelled() {
                    break;
                }
                let Some(mut buf) = pool.blocking_recv() else { break };
                let r = client.read(job.offset, &mut buf.as_mut_full()[..job.len]);
                buf.set_len(job.len);
                let msg = r.map(|()| ReadDone { seg: job.seg, offset: job.offset, buf });
                let failed = msg.is_err();
                if tx.blocking_send(msg).is_err() || failed {
                    break;
                }
            }
            client.disconnect();
        })
        .context("starting the NBD reader thread")?;
    Ok((handle, IoBackend::Nbd))
}

fn read_pread(
    path: &Path,
    file: &File,
    jobs: Vec<ReadJob>,
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
        let mut done = 0usize;
        while done < job.len {
            let n = file
                .read_at(&mut buf.as_mut_full()[done..want], job.offset + done as u64)
                .with_context(|| format!("reading {} at offset {}", path.display(), job.offset + done as u64))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        check_len(path, &job, done)?;
        buf.set_len(job.len);
        if tx.blocking_send(Ok(ReadDone { seg: job.seg, offset: job.offset, buf })).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
