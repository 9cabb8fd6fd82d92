//! The restore writer: an io_uring runtime on its own thread takes (offset, bytes) writes
//! from any task and answers each when it is complete. When io_uring is refused the caller
//! falls back to `pwrite`. Given an `O_DIRECT` descriptor it writes aligned buffers
//! straight to the device, bypassing the page cache. Like the reader, it never lets its runtime (and so the buffers)
//! go while a write is in flight.

use crate::aligned::AlignedBuf;
use std::fs::File;
use std::io;
use tokio::sync::{mpsc, oneshot};

struct Req {
    offset: u64,
    /// `data.as_slice()[range]` is written (aligned, so it also suits `O_DIRECT`).
    data: AlignedBuf,
    range: std::ops::Range<usize>,
    done: oneshot::Sender<(io::Result<()>, AlignedBuf)>,
}

pub struct UringWriter {
    tx: Option<mpsc::Sender<Req>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UringWriter {
    /// Starts the writer over `file`; `None` when io_uring is not available here.
    pub fn spawn(file: File) -> Option<Self> {
        let (tx, mut rx) = mpsc::channel::<Req>(64);
        let (ok_tx, ok_rx) = std::sync::mpsc::channel::<bool>();
        let thread = std::thread::Builder::new()
            .name("mover-writer".into())
            .spawn(move || {
                let rt = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                    Ok(rt) => rt,
                    Err(_) => {
                        let _ = ok_tx.send(false);
                        return;
                    }
                };
                let _ = ok_tx.send(true);
                rt.block_on(async move {
                    let f = std::rc::Rc::new(tokio_uring::fs::File::from_std(file));
                    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
                    while let Some(req) = rx.recv().await {
                        let f = f.clone();
                        tasks.push(tokio_uring::spawn(async move {
                            use tokio_uring::buf::BoundedBuf;
                            let (res, buf) = f.write_all_at(req.data.slice(req.range), req.offset).await;
                            let _ = req.done.send((res, buf.into_inner()));
                        }));
                        tasks.retain(|t| !t.is_finished());
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            })
            .ok()?;
        if ok_rx.recv().unwrap_or(false) {
            Some(Self { tx: Some(tx), thread: Some(thread) })
        } else {
            let _ = thread.join();
            None
        }
    }

    /// Writes `data.as_slice()[range]` at `offset`; returns the buffer (for reuse) when
    /// the kernel has it.
    pub async fn write(&self, offset: u64, data: AlignedBuf, range: std::ops::Range<usize>) -> io::Result<AlignedBuf> {
        if range.end > data.len() || range.start > range.end {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "write range outside the buffer"));
        }
        let (done, wait) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or_else(|| io::Error::other("writer closed"))?;
        tx.send(Req { offset, data, range, done }).await.map_err(|_| io::Error::other("writer stopped"))?;
        let (res, buf) = wait.await.map_err(|_| io::Error::other("writer stopped"))?;
        res.map(|()| buf)
    }

    /// Waits until every write is complete and the thread has ended.
    pub async fn close(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for UringWriter {
    fn drop(&mut self) {
        // Closing the channel lets the thread drain its writes and exit on its own; the
        // buffers belong to its tasks until then.
        self.tx.take();
    }
}
