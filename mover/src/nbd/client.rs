//! A small NBD client: fixed newstyle handshake, `NBD_OPT_GO` with block size
//! constraints, structured replies when the server has them (simple replies otherwise),
//! `NBD_OPT_SET_META_CONTEXT`, then `NBD_CMD_READ` and `NBD_CMD_BLOCK_STATUS` with
//! `base:allocation` and `qemu:dirty-bitmap:NAME` — what QEMU exports for KubeVirt's
//! incremental backups, and what any conforming server (qemu-nbd, nbdkit, libvirt) speaks.
//!
//! Blocking I/O on one connection, used from the backup's reader thread. Every wait is
//! bounded (`NbdOptions`): a silent server fails the read instead of hanging the job, and a
//! server that trickles (a byte now and then, each within the socket timeout) fails too —
//! the handshake and each reply must *complete* within a deadline ([`NbdClient::budget`]).
//! Every size and count read from the server is bounded before it is used (option replies,
//! meta contexts, block status chunks and extents), so a hostile server costs bounded
//! memory and time. A cancelled job shuts the socket down, which ends a blocked read at once.

use super::proto::*;
use mover_engine::source::BlockRead;
use mover_engine::{Error, ErrorKind, Result, ResultExt};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Largest single read we send (the protocol document's portable limit).
const MAX_REQUEST: u32 = 32 << 20;
/// Block status is asked for in windows of this size.
const STATUS_WINDOW: u64 = 1 << 30;
/// Largest option reply accepted.
const MAX_OPTION_REPLY: usize = 1 << 20;
/// Largest structured reply chunk besides read data.
const MAX_CHUNK: usize = 16 << 20;
/// Replies to one option (`NBD_REP_INFO`s to `NBD_OPT_GO`) before its final one.
const MAX_OPTION_REPLIES: usize = 64;
/// Chunks in one reply to a block status request (one per context asked for, in practice).
const MAX_STATUS_CHUNKS: usize = 16;
/// Extent descriptors read over a whole export's block status (as the CSI and KubeVirt
/// sources bound theirs), and ranges kept: a server describing more is "too fragmented".
const MAX_STATUS_EXTENTS: u64 = 16 << 20;
const MAX_RANGES: usize = 4 << 20;
/// The slowest a reply may arrive, past the I/O timeout: 1 MiB/s.
const MIN_RATE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(String),
    Tcp(String),
}

/// `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT` (the NBD URI standard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub target: Target,
    pub export: String,
    pub text: String,
}

impl NbdUri {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::invalid(format!("NBD URI '{s}' is not nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT"));
        if s.len() > 4096 {
            return Err(bad());
        }
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(bad)?;
            let export = path.strip_prefix('/').unwrap_or(path).to_string();
            let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket=")).ok_or_else(bad)?;
            if socket.is_empty() {
                return Err(bad());
            }
            return Ok(NbdUri { target: Target::Unix(socket.to_string()), export, text: s.to_string() });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err(bad());
            }
            let hostport = if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !host.ends_with(']') {
                host.to_string()
            } else {
                format!("{host}:10809")
            };
            return Ok(NbdUri { target: Target::Tcp(hostport), export: export.to_string(), text: s.to_string() });
        }
        Err(bad())
    }
}

/// Bounds on every wait, and how often a failed read is tried again.
#[derive(Debug, Clone, Copy)]
pub struct NbdOptions {
    pub connect_timeout: Duration,
    /// Each read or write on the socket.
    pub io_timeout: Duration,
    /// A read the server answers with an I/O error is tried this many more times.
    pub read_retries: u32,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(10), io_timeout: Duration::from_secs(60), read_retries: 3 }
    }
}

/// The server's block size constraints (`NBD_INFO_BLOCK_SIZE`), or the protocol's
/// defaults when it gives none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// The socket, and the deadline the current exchange must complete by.
struct Conn {
    sock: Sock,
    deadline: Option<Instant>,
    io_timeout: Duration,
    /// The socket's read timeout as last set: set again only when it must change.
    set_to: Duration,
    /// Bytes arrived in the current exchange: a timeout then means too slow, not silent.
    progressed: bool,
}

impl Conn {
    /// Starts an exchange that must complete within `budget`.
    fn begin(&mut self, budget: Duration) {
        self.deadline = Some(Instant::now() + budget);
        self.progressed = false;
    }
}

enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(Some(t)),
            Sock::Tcp(s) => s.set_read_timeout(Some(t)),
        }
    }
    /// A second handle on the same socket, to shut it down from another thread.
    fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// The error a read past the exchange's deadline returns.
const DEADLINE: &str = "the exchange did not complete by its deadline";

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let wait = match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, DEADLINE));
                }
                left.min(self.io_timeout)
            }
            None => self.io_timeout,
        };
        // Far from the deadline the wait is the I/O timeout, already set: no system call
        // per read on the data path.
        if wait != self.set_to {
            self.sock.set_read_timeout(wait)?;
            self.set_to = wait;
        }
        let r = match &mut self.sock {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        };
        match r {
            Ok(n) => {
                self.progressed |= n > 0;
                Ok(n)
            }
            // A server that sent something, then ran out the deadline, trickles: too slow
            // (one that sent nothing stays "no answer").
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) && self.progressed && wait < self.io_timeout => {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, DEADLINE))
            }
            Err(e) => Err(e),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match &mut self.sock {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct NbdClient {
    s: Conn,
    uri: String,
    size: u64,
    /// Structured replies were negotiated (needed for block status).
    structured: bool,
    block: BlockSize,
    /// Meta context name → id the server gave it.
    contexts: HashMap<String, u32>,
    cookie: u64,
    opts: NbdOptions,
    /// The job's cancellation: checked before each request, and watched by a task that
    /// shuts the socket down (ending a blocked read) — see [`NbdClient::cancel_with`].
    cancel: Option<CancellationToken>,
    /// Cancelled when the client is dropped: the watcher ends.
    closed: CancellationToken,
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// An error of the server's making.
fn protocol(uri: &str, msg: impl std::fmt::Display) -> Error {
    Error::permanent(format!("NBD server {uri}: {msg}"))
}

/// A socket error: a timeout says so.
fn io_err(uri: &str, what: &str, e: std::io::Error, timeout: Duration) -> Error {
    match e.kind() {
        std::io::ErrorKind::TimedOut if e.to_string() == DEADLINE => Error::transient(format!(
            "NBD server {uri}: too slow while {what}: the exchange must complete within {} s plus a second per MiB (a server that trickles is dropped)",
            timeout.as_secs()
        )),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Error::transient(format!("NBD server {uri}: no answer within {} s while {what}", timeout.as_secs()))
        }
        _ => Error::with_source(mover_engine::error::io_kind(&e), format!("NBD server {uri}: {what}"), e),
    }
}

impl NbdClient {
    /// Connects, negotiates structured replies (when offered) and those of the `meta`
    /// contexts the server has, and selects the export. Which contexts were granted:
    /// [`NbdClient::has_context`].
    pub fn connect(uri: &NbdUri, meta: &[String], opts: NbdOptions) -> Result<Self> {
        let t = opts.io_timeout;
        let sock = match &uri.target {
            Target::Unix(p) => {
                let s = UnixStream::connect(p).with_context(|| format!("connecting to NBD server {} (socket {p})", uri.text))?;
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
                Sock::Unix(s)
            }
            Target::Tcp(a) => {
                let addr = a
                    .to_socket_addrs()
                    .with_context(|| format!("resolving NBD server {} ({a})", uri.text))?
                    .next()
                    .ok_or_else(|| Error::not_found(format!("NBD server {} ({a}): no address", uri.text)))?;
                let s = TcpStream::connect_timeout(&addr, opts.connect_timeout)
                    .map_err(|e| io_err(&uri.text, &format!("connecting to {a}"), e, opts.connect_timeout))?;
                s.set_nodelay(true).ok();
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
                Sock::Tcp(s)
            }
        };
        let mut c = Self {
            s: Conn { sock, deadline: None, io_timeout: t, set_to: t, progressed: false },
            uri: uri.text.clone(),
            size: 0,
            structured: false,
            block: BlockSize { minimum: 1, preferred: 4096, maximum: MAX_REQUEST },
            contexts: HashMap::new(),
            cookie: 0,
            opts,
            cancel: None,
            closed: CancellationToken::new(),
        };
        // The whole handshake, however many replies, within one budget.
        let b = c.budget(0);
        c.s.begin(b);
        c.handshake(&uri.export, meta).map_err(|e| e.context(format!("NBD handshake with {}", uri.text)))?;
        c.s.deadline = None;
        Ok(c)
    }

    /// How long an exchange moving `bytes` may take, whole: the I/O timeout, plus a second
    /// per MiB (a reply must arrive at 1 MiB/s at least).
    fn budget(&self, bytes: u64) -> Duration {
        self.opts.io_timeout + Duration::from_secs(bytes / MIN_RATE)
    }

    /// Ties the connection to a job's cancellation: once `cancel` fires, the socket is
    /// shut down (a read blocked in the kernel returns at once) and no request is sent.
    /// Needs a tokio runtime (the backup's); without one only the check before each
    /// request applies.
    pub fn cancel_with(&mut self, cancel: CancellationToken) {
        if let (Ok(rt), Ok(sock)) = (tokio::runtime::Handle::try_current(), self.s.sock.try_clone()) {
            let (c, closed) = (cancel.clone(), self.closed.clone());
            rt.spawn(async move {
                tokio::select! {
                    _ = c.cancelled() => sock.shutdown(),
                    _ = closed.cancelled() => {}
                }
            });
        }
        self.cancel = Some(cancel);
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }

    /// `e`, or a cancellation when the job was cancelled (the socket was shut under it).
    fn or_cancelled(&self, e: Error, what: &str) -> Error {
        if self.cancelled() {
            Error::cancelled(format!("{what} from NBD export {}", self.uri))
        } else {
            e
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn structured(&self) -> bool {
        self.structured
    }

    pub fn block_size(&self) -> BlockSize {
        self.block
    }

    /// Whether the server granted meta context `ctx`.
    pub fn has_context(&self, ctx: &str) -> bool {
        self.contexts.contains_key(ctx)
    }

    /// The contexts the server granted, for messages.
    pub fn contexts(&self) -> Vec<String> {
        let mut v: Vec<String> = self.contexts.keys().cloned().collect();
        v.sort();
        v
    }

    fn rd<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.s.read_exact(&mut b).map_err(|e| io_err(&self.uri, what, e, self.opts.io_timeout))?;
        Ok(b)
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.rd::<2>(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.rd::<4>(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.rd::<8>(what)?))
    }
    fn take(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).map_err(|e| io_err(&self.uri, what, e, self.opts.io_timeout))?;
        Ok(v)
    }
    fn send(&mut self, b: &[u8], what: &str) -> Result<()> {
        self.s.write_all(b).map_err(|e| io_err(&self.uri, what, e, self.opts.io_timeout))
    }

    fn handshake(&mut self, export: &str, meta: &[String]) -> Result<()> {
        if self.u64("greeting")? != NBDMAGIC {
            return Err(protocol(&self.uri, "not an NBD server (bad magic)"));
        }
        if self.u64("greeting")? != IHAVEOPT {
            return Err(protocol(&self.uri, "the server speaks oldstyle NBD; newstyle is required"));
        }
        let hflags = self.u16("greeting")?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol(&self.uri, "the server does not support fixed newstyle negotiation"));
        }
        let cflags = (FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)) as u32;
        self.send(&cflags.to_be_bytes(), "negotiating")?;

        // Structured replies: needed for block status; without them everything is read.
        self.send_opt(OPT_STRUCTURED_REPLY, &[])?;
        let (t, _) = self.opt_reply(OPT_STRUCTURED_REPLY)?;
        self.structured = t == REP_ACK;
        if !self.structured && t & REP_FLAG_ERROR == 0 {
            return Err(protocol(&self.uri, format!("unexpected reply {t:#x} to NBD_OPT_STRUCTURED_REPLY")));
        }
        if self.structured && !meta.is_empty() {
            let mut d = Vec::new();
            put_str(&mut d, export);
            d.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            for q in meta {
                put_str(&mut d, q);
            }
            self.send_opt(OPT_SET_META_CONTEXT, &d)?;
            let mut granted = 0usize;
            loop {
                let (t, data) = self.opt_reply(OPT_SET_META_CONTEXT)?;
                match t {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        // One reply per context asked for, at most, and only those.
                        granted += 1;
                        if granted > meta.len() {
                            return Err(protocol(&self.uri, format!("granted more meta contexts than the {} asked for", meta.len())));
                        }
                        let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                        let name = String::from_utf8_lossy(&data[4..]).into_owned();
                        if !meta.contains(&name) {
                            return Err(protocol(
                                &self.uri,
                                format!("granted meta context '{}', which was not asked for", name.chars().take(80).collect::<String>()),
                            ));
                        }
                        self.contexts.insert(name, id);
                    }
                    REP_ACK => break,
                    // A server without meta contexts: no block status; everything is read.
                    t if t & REP_FLAG_ERROR != 0 => break,
                    t => return Err(protocol(&self.uri, format!("unexpected reply {t:#x} to NBD_OPT_SET_META_CONTEXT"))),
                }
            }
        }
        let mut d = Vec::new();
        put_str(&mut d, export);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_opt(OPT_GO, &d)?;
        let mut have_size = false;
        for n in 0.. {
            if n > MAX_OPTION_REPLIES {
                return Err(protocol(&self.uri, format!("more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO")));
            }
            let (t, data) = self.opt_reply(OPT_GO)?;
            match t {
                REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    self.size = u64::from_be_bytes([data[2], data[3], data[4], data[5], data[6], data[7], data[8], data[9]]);
                    have_size = true;
                }
                REP_INFO if data.len() >= 14 && u16::from_be_bytes([data[0], data[1]]) == INFO_BLOCK_SIZE => {
                    let g = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
                    let b = BlockSize { minimum: g(2), preferred: g(6), maximum: g(10) };
                    if b.minimum == 0 || !b.minimum.is_power_of_two() || b.minimum > 64 << 10 || b.maximum < b.minimum || b.preferred < b.minimum {
                        return Err(protocol(&self.uri, format!("invalid block size constraints {b:?}")));
                    }
                    self.block = b;
                }
                REP_INFO => {}
                REP_ACK => break,
                t => return Err(Error::not_found(format!("NBD server {}: export '{export}' refused (reply {t:#x})", self.uri))),
            }
        }
        if !have_size {
            return Err(protocol(&self.uri, format!("export '{export}': the server sent no size")));
        }
        if self.size > mover_engine::pipeline::backup::MAX_VOLUME_SIZE {
            return Err(protocol(
                &self.uri,
                format!(
                    "export '{export}' claims {} bytes, more than the largest volume Mover backs up ({} bytes)",
                    self.size,
                    mover_engine::pipeline::backup::MAX_VOLUME_SIZE
                ),
            ));
        }
        Ok(())
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b, "negotiating")
    }

    fn opt_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        if self.u64("negotiating")? != OPT_REPLY_MAGIC {
            return Err(protocol(&self.uri, "bad option reply magic"));
        }
        let o = self.u32("negotiating")?;
        if o != opt {
            return Err(protocol(&self.uri, format!("option reply for {o}, expected {opt}")));
        }
        let t = self.u32("negotiating")?;
        let len = self.u32("negotiating")? as usize;
        if len > MAX_OPTION_REPLY {
            return Err(protocol(&self.uri, format!("option reply of {len} bytes")));
        }
        Ok((t, self.take(len, "negotiating")?))
    }

    /// Sends a request; its reply must complete within [`NbdClient::budget`] of `reply_bytes`.
    fn request(&mut self, cmd: u16, offset: u64, len: u32, reply_bytes: u64) -> Result<u64> {
        if self.cancelled() {
            return Err(Error::cancelled(format!("reading NBD export {}", self.uri)));
        }
        let b = self.budget(reply_bytes);
        self.s.begin(b);
        self.cookie += 1;
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        self.send(&b, "sending a request")?;
        Ok(self.cookie)
    }

    /// One request's reply: for a read, its bytes land in `buf` (which must be covered
    /// exactly); for block status, `status(payload)` is called per chunk. A server error
    /// comes back as `Err(Ok(code))`, so the caller may retry; anything else that went wrong
    /// as `Err(Err(e))` (the connection is then unusable).
    fn reply(
        &mut self,
        cookie: u64,
        base: u64,
        mut buf: Option<&mut [u8]>,
        status: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> std::result::Result<(), std::result::Result<(u32, String), Error>> {
        let mut covered = 0u64;
        let mut server_err: Option<(u32, String)> = None;
        loop {
            let magic = self.u32("waiting for a reply").map_err(Err)?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let err = self.u32("reading a reply").map_err(Err)?;
                    let c = self.u64("reading a reply").map_err(Err)?;
                    if c != cookie {
                        return Err(Err(protocol(&self.uri, format!("reply for request {c}, expected {cookie}"))));
                    }
                    if err != 0 {
                        return Err(Ok((err, String::new())));
                    }
                    if let Some(b) = buf.as_deref_mut() {
                        self.s.read_exact(b).map_err(|e| Err(io_err(&self.uri, "reading data", e, self.opts.io_timeout)))?;
                    }
                    return Ok(());
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = self.u16("reading a reply").map_err(Err)?;
                    let typ = self.u16("reading a reply").map_err(Err)?;
                    let c = self.u64("reading a reply").map_err(Err)?;
                    let len = self.u32("reading a reply").map_err(Err)? as usize;
                    if c != cookie {
                        return Err(Err(protocol(&self.uri, format!("reply for request {c}, expected {cookie}"))));
                    }
                    let want = buf.as_ref().map(|b| b.len()).unwrap_or(0);
                    if len > MAX_CHUNK.max(want + 8) {
                        return Err(Err(protocol(&self.uri, format!("reply chunk of {len} bytes"))));
                    }
                    match typ {
                        REPLY_TYPE_OFFSET_DATA => {
                            let b = buf.as_deref_mut().ok_or_else(|| Err(protocol(&self.uri, "read data in a reply to block status")))?;
                            if len < 8 {
                                return Err(Err(protocol(&self.uri, "short data chunk")));
                            }
                            let o = self.u64("reading data").map_err(Err)?;
                            let n = len - 8;
                            let at = o
                                .checked_sub(base)
                                .filter(|&a| a.checked_add(n as u64).is_some_and(|e| e <= b.len() as u64))
                                .ok_or_else(|| Err(protocol(&self.uri, "data chunk outside the request")))? as usize;
                            self.s.read_exact(&mut b[at..at + n]).map_err(|e| Err(io_err(&self.uri, "reading data", e, self.opts.io_timeout)))?;
                            covered += n as u64;
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            let b = buf.as_deref_mut().ok_or_else(|| Err(protocol(&self.uri, "a hole in a reply to block status")))?;
                            if len != 12 {
                                return Err(Err(protocol(&self.uri, "bad hole chunk")));
                            }
                            let o = self.u64("reading a hole").map_err(Err)?;
                            let n = self.u32("reading a hole").map_err(Err)? as usize;
                            let at = o
                                .checked_sub(base)
                                .filter(|&a| a.checked_add(n as u64).is_some_and(|e| e <= b.len() as u64))
                                .ok_or_else(|| Err(protocol(&self.uri, "hole chunk outside the request")))? as usize;
                            b[at..at + n].fill(0);
                            covered += n as u64;
                        }
                        REPLY_TYPE_NONE => {
                            if len != 0 {
                                self.take(len, "reading a reply").map_err(Err)?;
                            }
                        }
                        t if t & 0x8000 != 0 => {
                            let payload = self.take(len, "reading an error").map_err(Err)?;
                            let code = payload.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(EIO);
                            let mlen = payload.get(4..6).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize).unwrap_or(0);
                            let msg = payload.get(6..6 + mlen).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                            // The rest of the reply is read (in this loop, not by recursion:
                            // a server sending error chunks without end must not exhaust the
                            // stack) so the connection stays usable; the first error counts.
                            server_err.get_or_insert((code, msg));
                        }
                        _ => {
                            let payload = self.take(len, "reading a reply").map_err(Err)?;
                            status(&payload).map_err(Err)?;
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        if let Some(e) = server_err {
                            return Err(Ok(e));
                        }
                        if let Some(b) = &buf {
                            if covered != b.len() as u64 {
                                return Err(Err(protocol(&self.uri, format!("a read of {} bytes was answered with {covered}", b.len()))));
                            }
                        }
                        return Ok(());
                    }
                }
                m => return Err(Err(protocol(&self.uri, format!("bad reply magic {m:#x}")))),
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset`, in requests the server's maximum block size
    /// allows; a request the server fails with an error is tried again a few times.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > self.size) {
            return Err(Error::invalid(format!("read of {} bytes at {offset} past the end of NBD export {} ({} bytes)", buf.len(), self.uri, self.size)));
        }
        let max = self.block.maximum.min(MAX_REQUEST) as usize;
        // Pieces are multiples of the minimum block size (the export's end excepted).
        let step = (max / self.block.minimum as usize).max(1) * self.block.minimum as usize;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(step);
            let base = offset + done as u64;
            let mut attempt = 0;
            loop {
                let cookie = self.request(CMD_READ, base, n as u32, n as u64)?;
                match self.reply(cookie, base, Some(&mut buf[done..done + n]), &mut |_| Ok(())) {
                    Ok(()) => break,
                    Err(Ok((code, msg))) if attempt < self.opts.read_retries && matches!(code, EIO | ENOMEM | ESHUTDOWN) => {
                        attempt += 1;
                        let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
                        tracing::warn!("NBD server {}: read of {n} bytes at {base} failed ({}{msg}); trying again ({attempt})", self.uri, error_name(code));
                        std::thread::sleep(Duration::from_millis(50 << attempt));
                    }
                    Err(Ok((code, msg))) => {
                        let kind = if matches!(code, EIO | ENOMEM | ESHUTDOWN) { ErrorKind::Transient } else { ErrorKind::Permanent };
                        return Err(Error::new(
                            kind,
                            format!(
                                "reading {n} bytes at offset {base} from NBD export {}: server error {} ({code}){}",
                                self.uri,
                                error_name(code),
                                if msg.is_empty() { String::new() } else { format!(": {msg}") }
                            ),
                        ));
                    }
                    Err(Err(e)) => {
                        let e = self.or_cancelled(e, "reading");
                        return Err(e.context(format!("reading {n} bytes at offset {base} from NBD export {}", self.uri)));
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The ranges of meta context `ctx` over `[0, size)` whose flags satisfy `pred`, merged,
    /// as `(offset, length)`. Bounded whatever the server sends: at most
    /// [`MAX_STATUS_CHUNKS`] chunks per reply, [`MAX_STATUS_EXTENTS`] descriptors read and
    /// [`MAX_RANGES`] ranges kept (more: `None`, too fragmented to be worth keeping — the
    /// caller reads as if it had no block status); descriptors past the window asked for
    /// are not kept; every reply must make progress.
    pub fn ranges_where(&mut self, ctx: &str, pred: impl Fn(u32) -> bool) -> Result<Option<Vec<(u64, u64)>>> {
        let id = *self.contexts.get(ctx).ok_or_else(|| Error::invalid(format!("meta context '{ctx}' was not negotiated with {}", self.uri)))?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0u64;
        let mut seen = 0u64;
        let uri = self.uri.clone();
        while pos < self.size {
            let len = (self.size - pos).min(STATUS_WINDOW) as u32;
            let cookie = self.request(CMD_BLOCK_STATUS, pos, len, 0)?;
            // The window's extents, clamped to it: (start, length) runs that satisfy `pred`.
            let (mut at, end) = (pos, pos + len as u64);
            let mut chunks = 0usize;
            let mut fragmented = false;
            let r = self.reply(cookie, pos, None, &mut |p| {
                chunks += 1;
                if chunks > MAX_STATUS_CHUNKS {
                    return Err(protocol(&uri, format!("more than {MAX_STATUS_CHUNKS} chunks in one block status reply")));
                }
                if p.len() < 4 || (p.len() - 4) % 8 != 0 {
                    return Err(protocol(&uri, format!("bad block status chunk of {} bytes", p.len())));
                }
                if u32::from_be_bytes([p[0], p[1], p[2], p[3]]) != id {
                    return Ok(());
                }
                for d in p[4..].chunks(8) {
                    seen += 1;
                    if seen > MAX_STATUS_EXTENTS {
                        fragmented = true;
                        return Ok(());
                    }
                    let l = (u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64).min(end - at);
                    if l == 0 {
                        // Past the window (ignored), or a zero-length extent (no progress).
                        if at < end {
                            return Err(protocol(&uri, format!("block status of '{ctx}': a zero-length extent at offset {at}")));
                        }
                        continue;
                    }
                    if pred(u32::from_be_bytes([d[4], d[5], d[6], d[7]])) {
                        let full = out.len() >= MAX_RANGES;
                        match out.last_mut() {
                            Some(last) if last.0 + last.1 == at => last.1 += l,
                            _ if full => {
                                fragmented = true;
                                return Ok(());
                            }
                            _ => out.push((at, l)),
                        }
                    }
                    at += l;
                }
                Ok(())
            });
            match r {
                Ok(()) => {}
                Err(Ok((code, msg))) => {
                    return Err(protocol(&self.uri, format!("block status of '{ctx}' at offset {pos}: server error {} ({code}) {msg}", error_name(code))))
                }
                Err(Err(e)) => {
                    let e = self.or_cancelled(e, "block status");
                    return Err(e.context(format!("block status of '{ctx}' at offset {pos} from NBD export {}", self.uri)));
                }
            }
            if fragmented {
                tracing::info!(
                    "NBD server {}: block status of '{ctx}' is too fragmented to keep (more than {MAX_STATUS_EXTENTS} extents or {MAX_RANGES} ranges)",
                    self.uri
                );
                return Ok(None);
            }
            tracing::debug!(ctx, pos, to = at, "block status reply");
            if at == pos {
                return Err(protocol(&self.uri, format!("block status of '{ctx}' at offset {pos} made no progress")));
            }
            pos = at;
        }
        Ok(Some(out))
    }

    /// Tells the server goodbye (best effort).
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0);
    }
}

fn put_str(d: &mut Vec<u8>, s: &str) {
    d.extend_from_slice(&(s.len() as u32).to_be_bytes());
    d.extend_from_slice(s.as_bytes());
}

impl BlockRead for NbdClient {
    fn name(&self) -> &'static str {
        "nbd"
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, buf)
    }
    fn close(self: Box<Self>) {
        self.disconnect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn uris_parse_and_bad_ones_are_named() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/nbd.sock").unwrap();
        assert_eq!(u.target, Target::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd://127.0.0.1/x").unwrap();
        assert_eq!(u.target, Target::Tcp("127.0.0.1:10809".into()));
        let u = NbdUri::parse("nbd://127.0.0.1:1234").unwrap();
        assert_eq!((u.target, u.export), (Target::Tcp("127.0.0.1:1234".into()), String::new()));
        for bad in ["nbd+unix:///x", "http://x", "nbd://", "nbd+unix:///x?socket="] {
            assert!(NbdUri::parse(bad).unwrap_err().to_string().contains(bad));
        }
    }
}
