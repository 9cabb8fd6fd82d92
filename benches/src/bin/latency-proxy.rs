//! A TCP proxy that adds a fixed one-way delay in each direction, without limiting
//! bandwidth: every chunk read is forwarded DELAY_MS after it arrived while later chunks
//! keep flowing (a pipe, not stop-and-wait). This kernel has no netem; this stands in for
//! an object store 5–50 ms away. One thread, so it takes at most one core from the tools
//! it measures.
//!
//!     latency-proxy LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS
//!
//! Listens on 127.0.0.1 only.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn usage() -> ! {
    eprintln!("usage: latency-proxy LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        usage();
    }
    let port: u16 = args[1].parse().unwrap_or_else(|_| usage());
    let target = args[2].clone();
    let delay_ms: f64 = args[3].parse().unwrap_or_else(|_| usage());
    let delay = Duration::from_secs_f64(delay_ms / 1000.0);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("proxy 127.0.0.1:{port} -> {target}, +{delay_ms} ms each way");
    loop {
        let (client, _) = listener.accept().await?;
        let target = target.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pipe(cr, sw, delay), pipe(sr, cw, delay));
        });
    }
}

/// Reader → queue (each chunk with the time it is due) → writer after the delay; the reader
/// never waits for the writer. End of stream is forwarded the same way.
async fn pipe(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        loop {
            let mut buf = Vec::with_capacity(256 << 10);
            let n = r.read_buf(&mut buf).await.unwrap_or(0);
            if tx.send((Instant::now() + delay, buf)).is_err() || n == 0 {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if data.is_empty() {
                let _ = w.shutdown().await;
                return;
            }
            if w.write_all(&data).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}
