//! A read-only NBD server for one snapshot volume ([`VolumeImage`]): fixed newstyle
//! negotiation, `NBD_OPT_GO`/`INFO` with `NBD_INFO_BLOCK_SIZE`, structured replies,
//! `base:allocation` block status reporting the volume's holes, and simple replies for
//! clients that do not ask for structured ones. Any NBD client reads it: `nbdcopy`,
//! `qemu-img`, `nbdinfo`, `nbdfuse`, QEMU itself.
//!
//! Requests of a connection are served concurrently (replies are written whole, one at a
//! time); every size a client sends is bounded before it is used. A failed read answers
//! `EIO` with the error's text (which names snapshot, volume, offset, chunk and pack).

use super::proto::*;
use mover_engine::export::VolumeImage;
use mover_engine::{Error, Result, ResultExt};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Largest read a client may ask for (the protocol document's portable maximum).
pub const MAX_READ: u32 = 32 << 20;
/// Requests one connection may have in flight; the next is read only once one is done
/// (the client waits, through TCP's flow control). Bounds a connection's memory whatever
/// it sends: at most [`MAX_BYTES_IN_FLIGHT`] of reply buffers.
pub const MAX_IN_FLIGHT: usize = 64;
/// Bytes of reads one connection may have in flight (each read holds its reply buffer).
pub const MAX_BYTES_IN_FLIGHT: u32 = 64 << 20;
/// Largest option payload accepted during negotiation.
const MAX_OPTION: u32 = 64 << 10;
/// Options one negotiation may send before it is dropped.
const MAX_OPTIONS: usize = 256;
/// Client connections one export serves at once; more are closed as they arrive (with a
/// warning), so idle or stuck clients cannot exhaust the daemon's descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// The handshake (negotiation, and TLS when required) must be done within this.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Block status answers at most this much of the volume per request.
const STATUS_WINDOW: u64 = 1 << 30;
/// The context id of `base:allocation` on every connection.
const CTX_ALLOCATION: u32 = 1;

/// What a connection negotiated.
#[derive(Default)]
struct Session {
    structured: bool,
    allocation: bool,
}

fn proto_err(what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("NBD client: {what}"))
}

async fn read_u32<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<u32> {
    r.read_u32().await
}

/// Sends an option reply.
async fn opt_reply<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, typ: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    // A TLS stream may keep accepted bytes in its buffer until flushed.
    w.flush().await
}

/// Parses `u32 len ‖ name` at the start of `d`; returns the name and the rest.
fn take_name(d: &[u8]) -> Option<(String, &[u8])> {
    let n = u32::from_be_bytes(d.get(..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4 + n)?;
    Some((String::from_utf8_lossy(name).into_owned(), &d[4 + n..]))
}

/// Transport security of an export.
#[derive(Clone, Default)]
pub enum ExportTls {
    /// Plaintext: a unix socket, or TCP on loopback.
    #[default]
    None,
    /// Clients must `NBD_OPT_STARTTLS` before anything else and present a certificate that
    /// chains to the configured CA; `admit` then decides on the certificate's identities
    /// (the same rule as the daemon's gRPC API).
    Required { config: Arc<rustls::ServerConfig>, admit: Arc<dyn Fn(&[u8]) -> std::result::Result<(), String> + Send + Sync> },
}

/// What one round of option haggling ended with.
enum Outcome {
    Go(Session),
    Abort,
    StartTls,
}

/// Serves one connection until the client disconnects or `stop` fires. The handshake must
/// be done within [`HANDSHAKE_TIMEOUT`].
pub async fn serve(stream: Box<dyn Stream>, image: Arc<VolumeImage>, export: String, tls: ExportTls, stop: CancellationToken) -> Result<()> {
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, &image, &export, &tls, &stop));
    let (io, session) = match handshake.await {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(proto_err(format!("the handshake was not done within {} s", HANDSHAKE_TIMEOUT.as_secs()))),
    };
    transmission(io, image, session, stop).await
}

/// Negotiation (and TLS): the stream to serve and what was negotiated; `None` when the
/// client aborted or `stop` fired.
async fn handshake(
    stream: Box<dyn Stream>,
    image: &VolumeImage,
    export: &str,
    tls: &ExportTls,
    stop: &CancellationToken,
) -> Result<Option<(Box<dyn Stream>, Session)>> {
    let mut io = stream;
    let mut hello = true;
    let mut no_zeroes = true;
    let mut tls_pending = matches!(tls, ExportTls::Required { .. });
    let session = loop {
        let outcome = tokio::select! {
            o = negotiate(&mut io, image, export, hello, tls_pending, &mut no_zeroes) => o?,
            _ = stop.cancelled() => return Ok(None),
        };
        hello = false;
        match outcome {
            Outcome::Go(s) => break s,
            Outcome::Abort => return Ok(None),
            Outcome::StartTls => {
                let ExportTls::Required { config, admit } = &tls else { unreachable!("STARTTLS is only accepted when TLS is required") };
                let t = tokio_rustls::TlsAcceptor::from(config.clone()).accept(io).await.context("NBD TLS handshake")?;
                let cert = t.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec()).unwrap_or_default();
                if let Err(why) = admit(&cert) {
                    tracing::warn!("NBD export: refused a TLS client: {why}");
                    return Err(Error::precondition(format!("NBD client: {why}")));
                }
                io = Box::new(t);
                tls_pending = false;
            }
        }
    };
    Ok(Some((io, session)))
}

/// The transmission phase: requests served concurrently, within the connection's bounds.
async fn transmission(io: Box<dyn Stream>, image: Arc<VolumeImage>, session: Session, stop: CancellationToken) -> Result<()> {
    let (mut r, w) = tokio::io::split(io);
    let w = Arc::new(Mutex::new(w));
    let session = Arc::new(session);
    let mut tasks = tokio::task::JoinSet::new();
    // Reply buffers in flight, in KiB.
    let budget = Arc::new(tokio::sync::Semaphore::new((MAX_BYTES_IN_FLIGHT >> 10) as usize));
    loop {
        let mut head = [0u8; 28];
        tokio::select! {
            r = r.read_exact(&mut head) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(Error::from(e).context("reading an NBD request")),
            },
            _ = stop.cancelled() => break,
        }
        let magic = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(proto_err(format!("bad request magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes([head[4], head[5]]);
        let typ = u16::from_be_bytes([head[6], head[7]]);
        let cookie = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
        let offset = u64::from_be_bytes(head[16..24].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(head[24..28].try_into().expect("4 bytes"));
        match typ {
            CMD_DISC => break,
            CMD_WRITE => {
                // Read-only: the payload is drained, the write refused.
                if len > MAX_READ {
                    return Err(proto_err(format!("write of {len} bytes")));
                }
                let mut sink = vec![0u8; len as usize];
                r.read_exact(&mut sink).await.context("reading an NBD write payload")?;
                reply_error(&w, &session, cookie, EPERM, "the export is read-only").await?;
            }
            CMD_READ | CMD_BLOCK_STATUS | CMD_FLUSH | CMD_CACHE => {
                // Room first: a client that floods requests without reading replies waits
                // here, and its connection's memory stays bounded.
                while tasks.len() >= MAX_IN_FLIGHT {
                    tokio::select! {
                        done = tasks.join_next() => if let Some(done) = done {
                            done.map_err(Error::from)??;
                        },
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
                let kib = if typ == CMD_READ { (len.min(MAX_READ) >> 10).max(1) } else { 1 };
                let held = tokio::select! {
                    p = budget.clone().acquire_many_owned(kib) => p.map_err(|_| Error::cancelled("an NBD connection"))?,
                    _ = stop.cancelled() => return Ok(()),
                };
                let (w, image, session) = (w.clone(), image.clone(), session.clone());
                tasks.spawn(async move {
                    let r = request(w, image, session, typ, flags, cookie, offset, len).await;
                    drop(held);
                    r
                });
            }
            _ => reply_error(&w, &session, cookie, EPERM, "the export is read-only").await?,
        }
        while let Some(done) = tasks.try_join_next() {
            done.map_err(Error::from)??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(Error::from)??;
    }
    Ok(())
}

/// The option haggling; `None` when the client aborted.
/// `hello`: this is the start of the connection (after STARTTLS the haggling goes on
/// without one). `tls_pending`: every option but STARTTLS and ABORT is refused.
async fn negotiate<S>(io: &mut S, image: &VolumeImage, export: &str, hello: bool, tls_pending: bool, no_zeroes: &mut bool) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if hello {
        let mut b = Vec::new();
        b.extend_from_slice(&NBDMAGIC.to_be_bytes());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        io.write_all(&b).await.context("NBD handshake")?;
        io.flush().await.context("NBD handshake")?;
        let client_flags = read_u32(io).await.context("NBD handshake")?;
        *no_zeroes = client_flags & FLAG_NO_ZEROES as u32 != 0;
    }
    let mut s = Session::default();
    let tflags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN;
    for n in 0.. {
        if n >= MAX_OPTIONS {
            return Err(proto_err(format!("more than {MAX_OPTIONS} options in one negotiation")));
        }
        let magic = io.read_u64().await.context("NBD negotiation")?;
        if magic != IHAVEOPT {
            return Err(proto_err(format!("bad option magic {magic:#x}")));
        }
        let opt = read_u32(io).await?;
        let len = read_u32(io).await?;
        if len > MAX_OPTION {
            return Err(proto_err(format!("option {opt} of {len} bytes")));
        }
        let mut d = vec![0u8; len as usize];
        io.read_exact(&mut d).await?;
        if tls_pending && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Err(proto_err("NBD_OPT_EXPORT_NAME before STARTTLS on an export that requires TLS"));
            }
            opt_reply(io, opt, REP_ERR_TLS_REQD, b"this export requires TLS (NBD_OPT_STARTTLS)").await?;
            continue;
        }
        match opt {
            OPT_STARTTLS => {
                if !tls_pending {
                    opt_reply(io, opt, REP_ERR_INVALID, b"TLS is not offered here, or already on").await?;
                    continue;
                }
                opt_reply(io, opt, REP_ACK, &[]).await?;
                return Ok(Outcome::StartTls);
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&d).into_owned();
                if !name.is_empty() && name != export {
                    return Err(proto_err(format!("no export named '{name}'")));
                }
                let mut b = Vec::new();
                b.extend_from_slice(&image.size().to_be_bytes());
                b.extend_from_slice(&tflags.to_be_bytes());
                if !*no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                io.write_all(&b).await?;
                io.flush().await?;
                return Ok(Outcome::Go(s));
            }
            OPT_ABORT => {
                let _ = opt_reply(io, opt, REP_ACK, &[]).await;
                return Ok(Outcome::Abort);
            }
            OPT_LIST => {
                let mut b = (export.len() as u32).to_be_bytes().to_vec();
                b.extend_from_slice(export.as_bytes());
                opt_reply(io, opt, REP_SERVER, &b).await?;
                opt_reply(io, opt, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !d.is_empty() {
                    opt_reply(io, opt, REP_ERR_INVALID, b"no payload expected").await?;
                    continue;
                }
                s.structured = true;
                opt_reply(io, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let Some((name, rest)) = take_name(&d) else {
                    opt_reply(io, opt, REP_ERR_INVALID, b"malformed meta context request").await?;
                    continue;
                };
                if opt == OPT_SET_META_CONTEXT && !s.structured {
                    opt_reply(io, opt, REP_ERR_INVALID, b"structured replies first").await?;
                    continue;
                }
                if !name.is_empty() && name != export {
                    opt_reply(io, opt, REP_ERR_UNKNOWN, format!("no export named '{name}'").as_bytes()).await?;
                    continue;
                }
                let n = rest.get(..4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes"))).unwrap_or(0);
                let mut q = &rest[4.min(rest.len())..];
                let mut wants_alloc = n == 0 && opt == OPT_LIST_META_CONTEXT;
                for _ in 0..n {
                    let Some((query, next)) = take_name(q) else { break };
                    if query == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && (query == "base:" || query.is_empty())) {
                        wants_alloc = true;
                    }
                    q = next;
                }
                if wants_alloc {
                    let mut b = CTX_ALLOCATION.to_be_bytes().to_vec();
                    b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    opt_reply(io, opt, REP_META_CONTEXT, &b).await?;
                }
                if opt == OPT_SET_META_CONTEXT {
                    s.allocation = wants_alloc;
                }
                opt_reply(io, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, rest)) = take_name(&d) else {
                    opt_reply(io, opt, REP_ERR_INVALID, b"malformed").await?;
                    continue;
                };
                if !name.is_empty() && name != export {
                    opt_reply(io, opt, REP_ERR_UNKNOWN, format!("no export named '{name}' (this server has '{export}')").as_bytes()).await?;
                    continue;
                }
                let _ = rest;
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&image.size().to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(io, opt, REP_INFO, &info).await?;
                // Any alignment works; 64 KiB requests are efficient; at most MAX_READ.
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&(64u32 << 10).to_be_bytes());
                bs.extend_from_slice(&MAX_READ.to_be_bytes());
                opt_reply(io, opt, REP_INFO, &bs).await?;
                opt_reply(io, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Outcome::Go(s));
                }
            }
            _ => opt_reply(io, opt, REP_ERR_UNSUP, b"not supported").await?,
        }
    }
    unreachable!("the option loop returns or fails")
}

async fn write_all<W: AsyncWrite + Unpin>(w: &Arc<Mutex<W>>, b: &[u8]) -> Result<()> {
    let mut w = w.lock().await;
    w.write_all(b).await.context("writing an NBD reply")?;
    // Replies are written whole and then flushed: a TLS stream may otherwise hold the end
    // of one back until the next.
    w.flush().await.context("writing an NBD reply")
}

fn chunk_head(flags: u16, typ: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

fn simple_head(error: u32, cookie: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

async fn reply_error<W: AsyncWrite + Unpin>(w: &Arc<Mutex<W>>, s: &Session, cookie: u64, error: u32, msg: &str) -> Result<()> {
    if s.structured {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        let mut b = chunk_head(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
        b.extend_from_slice(&error.to_be_bytes());
        b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        b.extend_from_slice(msg);
        write_all(w, &b).await
    } else {
        write_all(w, &simple_head(error, cookie)).await
    }
}

async fn reply_done<W: AsyncWrite + Unpin>(w: &Arc<Mutex<W>>, s: &Session, cookie: u64) -> Result<()> {
    if s.structured {
        write_all(w, &chunk_head(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)).await
    } else {
        write_all(w, &simple_head(0, cookie)).await
    }
}

async fn request<W: AsyncWrite + Unpin + Send>(
    w: Arc<Mutex<W>>,
    image: Arc<VolumeImage>,
    s: Arc<Session>,
    typ: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> Result<()> {
    let in_range = offset.checked_add(len as u64).is_some_and(|e| e <= image.size());
    match typ {
        CMD_FLUSH => reply_done(&w, &s, cookie).await,
        CMD_CACHE => {
            if !in_range {
                return reply_error(&w, &s, cookie, EINVAL, "past the end of the export").await;
            }
            reply_done(&w, &s, cookie).await
        }
        CMD_READ => {
            if len > MAX_READ {
                return reply_error(&w, &s, cookie, EOVERFLOW, "read larger than the maximum block size").await;
            }
            if !in_range {
                return reply_error(&w, &s, cookie, EINVAL, "read past the end of the export").await;
            }
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = image.read(offset, &mut buf).await {
                let msg = format!("{e:#}");
                tracing::warn!("NBD read of {len} bytes at offset {offset}: {msg}");
                return reply_error(&w, &s, cookie, EIO, &msg).await;
            }
            let head = if s.structured {
                let mut b = chunk_head(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len);
                b.extend_from_slice(&offset.to_be_bytes());
                b
            } else {
                simple_head(0, cookie)
            };
            // Header and data under one hold of the writer: no copy of the data.
            let mut wg = w.lock().await;
            wg.write_all(&head).await.context("writing an NBD reply")?;
            wg.write_all(&buf).await.context("writing an NBD reply")?;
            wg.flush().await.context("writing an NBD reply")
        }
        CMD_BLOCK_STATUS => {
            if !s.structured || !s.allocation {
                return reply_error(&w, &s, cookie, EINVAL, "no meta context was negotiated").await;
            }
            if !in_range || len == 0 {
                return reply_error(&w, &s, cookie, EINVAL, "block status past the end of the export").await;
            }
            let ext = match image.extents(offset, (len as u64).min(STATUS_WINDOW)).await {
                Ok(x) => x,
                Err(e) => return reply_error(&w, &s, cookie, EIO, &format!("{e:#}")).await,
            };
            let mut body = CTX_ALLOCATION.to_be_bytes().to_vec();
            'all: for (n, hole) in ext {
                let mut left = n;
                while left > 0 {
                    let piece = left.min(u32::MAX as u64 & !0xfff) as u32;
                    body.extend_from_slice(&piece.to_be_bytes());
                    body.extend_from_slice(&(if hole { STATE_HOLE | STATE_ZERO } else { 0 }).to_be_bytes());
                    left -= piece as u64;
                    if flags & CMD_FLAG_REQ_ONE != 0 {
                        break 'all;
                    }
                }
            }
            let mut b = chunk_head(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, body.len() as u32);
            b.extend_from_slice(&body);
            write_all(&w, &b).await
        }
        _ => reply_error(&w, &s, cookie, EINVAL, "unknown command").await,
    }
}

/// Who may connect to a unix-socket export, by the peer's credentials (`SO_PEERCRED`):
/// `Err(why)` refuses the connection before a byte is exchanged.
#[derive(Clone)]
pub struct PeerCheck(pub Arc<dyn Fn(u32, u32) -> std::result::Result<(), String> + Send + Sync>);

impl std::fmt::Debug for PeerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCheck")
    }
}

/// Where an export listens.
#[derive(Debug, Clone)]
pub enum ExportListen {
    /// A unix socket, created with `mode` (0600 by default) and owned by `group`; with
    /// `peers`, each connecting process's uid and gid are checked too.
    Unix { path: std::path::PathBuf, mode: u32, group: Option<u32>, peers: Option<PeerCheck> },
    /// TCP: on a loopback address, or anywhere with [`ExportTls::Required`] (NBD has no
    /// authentication of its own). Port 0 picks a free port.
    Tcp(std::net::SocketAddr),
}

impl ExportListen {
    pub fn unix(path: impl Into<std::path::PathBuf>) -> Self {
        ExportListen::Unix { path: path.into(), mode: 0o600, group: None, peers: None }
    }
}

/// The NBD URI of an export on a unix socket.
pub fn unix_uri(path: &std::path::Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", path.display())
}

/// The NBD URI of an export on TCP (`nbds` when TLS is required).
pub fn tcp_uri(addr: std::net::SocketAddr, export: &str, tls: bool) -> String {
    format!("{}://{addr}/{export}", if tls { "nbds" } else { "nbd" })
}

/// Serves `image` on `listen` to any number of clients until `stop` fires; then every
/// connection is closed (a client sees the export go away, it is not left hanging) and the
/// socket file removed. `ready` is called with the URI once the server accepts connections.
pub async fn run_export(
    image: Arc<VolumeImage>,
    listen: ExportListen,
    export: String,
    tls: ExportTls,
    stop: CancellationToken,
    ready: impl FnOnce(String),
) -> Result<()> {
    let mut conns = tokio::task::JoinSet::new();
    // Serves a connection, unless the export already serves as many as it may.
    let mut refused = 0u64;
    let mut serve_one = |conns: &mut tokio::task::JoinSet<()>, s: Box<dyn Stream>, from: &str| {
        while conns.try_join_next().is_some() {}
        if conns.len() >= MAX_CONNECTIONS {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!("NBD export: refused a connection from {from}: {MAX_CONNECTIONS} are open ({refused} refused so far)");
            }
            return;
        }
        let (image, export, tls, stop) = (image.clone(), export.clone(), tls.clone(), stop.clone());
        conns.spawn(async move {
            if let Err(e) = serve(s, image, export, tls, stop).await {
                tracing::warn!("NBD connection: {e:#}");
            }
        });
    };
    match &listen {
        ExportListen::Unix { path, mode, group, peers } => {
            let l = crate::socket::bind_unix(path, *mode, *group, "NBD export socket")?;
            ready(unix_uri(path, &export));
            loop {
                tokio::select! {
                    a = l.accept() => {
                        let s = match a {
                            Ok((s, _)) => s,
                            Err(e) => { accept_failed(&e, &path.display().to_string()).await; continue }
                        };
                        let (uid, gid) = match s.peer_cred() {
                            Ok(c) => (c.uid(), c.gid()),
                            Err(e) => { tracing::warn!("NBD export {}: a client whose credentials are unknown was refused: {e}", path.display()); continue }
                        };
                        if let Some(PeerCheck(check)) = peers {
                            if let Err(why) = check(uid, gid) {
                                tracing::warn!("NBD export {}: refused uid {uid} gid {gid}: {why}", path.display());
                                continue;
                            }
                        }
                        serve_one(&mut conns, Box::new(s), &format!("uid {uid}"));
                    }
                    _ = stop.cancelled() => break,
                }
            }
            let _ = std::fs::remove_file(path);
        }
        ExportListen::Tcp(addr) => {
            let with_tls = matches!(tls, ExportTls::Required { .. });
            if !addr.ip().is_loopback() && !with_tls {
                return Err(Error::invalid(format!(
                    "NBD export on {addr}: NBD has no authentication, so a plaintext export listens on loopback or a unix socket only (configure TLS, or reach it through an SSH tunnel)"
                )));
            }
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
            let bound = l.local_addr().with_context(|| format!("listening on {addr}"))?;
            ready(tcp_uri(bound, &export, with_tls));
            loop {
                tokio::select! {
                    a = l.accept() => {
                        let (s, peer) = match a {
                            Ok(x) => x,
                            Err(e) => { accept_failed(&e, &bound.to_string()).await; continue }
                        };
                        let _ = s.set_nodelay(true);
                        serve_one(&mut conns, Box::new(s), &peer.to_string());
                    }
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    image.close();
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// An accept that failed (out of descriptors, a connection reset before it was taken):
/// the export goes on after a pause, instead of failing for good.
async fn accept_failed(e: &std::io::Error, on: &str) {
    tracing::warn!("NBD export {on}: accepting a connection failed: {e}; going on");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// A connection's stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}
