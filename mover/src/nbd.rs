//! A small NBD client (this kernel has no NBD block device, so Mover speaks the protocol
//! itself): fixed newstyle handshake, structured replies, `NBD_OPT_SET_META_CONTEXT`,
//! `NBD_OPT_GO`, then `NBD_CMD_READ` and `NBD_CMD_BLOCK_STATUS` with `base:allocation` and
//! `qemu:dirty-bitmap:NAME` — what QEMU exports for KubeVirt's incremental backups.
//! Reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//!
//! Blocking I/O on one connection, used from the backup's reader thread.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
/// Internal: the payload of a simple (non-structured) reply.
const SIMPLE_DATA: u16 = 0x7fff;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag.
pub const STATE_DIRTY: u32 = 1;

pub const BASE_ALLOCATION: &str = "base:allocation";

/// Largest single read or status request we send.
const MAX_REQUEST: u64 = 32 << 20;
const STATUS_WINDOW: u64 = 1 << 30;

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

pub fn parse_uri(s: &str) -> Result<NbdUri> {
    let bad = || anyhow!("NBD URI '{s}' is not nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT");
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

trait Stream: Read + Write + Send + Sync {}
impl<T: Read + Write + Send + Sync> Stream for T {}

pub struct NbdClient {
    s: Box<dyn Stream>,
    uri: String,
    size: u64,
    /// Meta context name → id the server gave it.
    contexts: HashMap<String, u32>,
    cookie: u64,
}

fn rd<const N: usize>(s: &mut dyn Stream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}
fn u16_(s: &mut dyn Stream) -> std::io::Result<u16> {
    Ok(u16::from_be_bytes(rd::<2>(s)?))
}
fn u32_(s: &mut dyn Stream) -> std::io::Result<u32> {
    Ok(u32::from_be_bytes(rd::<4>(s)?))
}
fn u64_(s: &mut dyn Stream) -> std::io::Result<u64> {
    Ok(u64::from_be_bytes(rd::<8>(s)?))
}
fn take(s: &mut dyn Stream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

impl NbdClient {
    /// Connects, negotiates structured replies and the given meta contexts, and selects the
    /// export. A context the server does not offer is an error naming it.
    pub fn connect(uri: &NbdUri, meta: &[String]) -> Result<Self> {
        let s: Box<dyn Stream> = match &uri.target {
            Target::Unix(p) => Box::new(UnixStream::connect(p).with_context(|| format!("connecting to NBD server {} (socket {p})", uri.text))?),
            Target::Tcp(a) => {
                let t = TcpStream::connect(a).with_context(|| format!("connecting to NBD server {} ({a})", uri.text))?;
                t.set_nodelay(true).ok();
                Box::new(t)
            }
        };
        let mut c = Self { s, uri: uri.text.clone(), size: 0, contexts: HashMap::new(), cookie: 0 };
        c.handshake(&uri.export, meta).with_context(|| format!("NBD handshake with {}", uri.text))?;
        Ok(c)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn handshake(&mut self, export: &str, meta: &[String]) -> Result<()> {
        let s = &mut *self.s;
        if u64_(s)? != NBDMAGIC {
            bail!("not an NBD server (bad magic)");
        }
        if u64_(s)? != IHAVEOPT {
            bail!("the server speaks oldstyle NBD; newstyle is required");
        }
        let hflags = u16_(s)?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("the server does not support fixed newstyle negotiation");
        }
        let cflags = (FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)) as u32;
        s.write_all(&cflags.to_be_bytes())?;

        // Structured replies: needed for block status.
        self.send_opt(OPT_STRUCTURED_REPLY, &[])?;
        let (t, data) = self.opt_reply(OPT_STRUCTURED_REPLY)?;
        if t != REP_ACK {
            bail!("the server refused structured replies (reply {t:#x}: {})", String::from_utf8_lossy(&data));
        }
        if !meta.is_empty() {
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            for q in meta {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            self.send_opt(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (t, data) = self.opt_reply(OPT_SET_META_CONTEXT)?;
                match t {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes(data[..4].try_into()?);
                        self.contexts.insert(String::from_utf8_lossy(&data[4..]).into_owned(), id);
                    }
                    REP_ACK => break,
                    t => bail!("setting meta contexts failed (reply {t:#x}: {})", String::from_utf8_lossy(&data)),
                }
            }
            for q in meta {
                if !self.contexts.contains_key(q) {
                    bail!(
                        "the server does not offer meta context '{q}' on export '{export}' (it offered: {})",
                        self.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
            }
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_opt(OPT_GO, &d)?;
        loop {
            let (t, data) = self.opt_reply(OPT_GO)?;
            match t {
                REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    self.size = u64::from_be_bytes(data[2..10].try_into()?);
                }
                REP_INFO => {}
                REP_ACK => break,
                t => bail!("export '{export}' refused (reply {t:#x}: {})", String::from_utf8_lossy(&data)),
            }
        }
        Ok(())
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)?;
        Ok(())
    }

    fn opt_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        let s = &mut *self.s;
        if u64_(s)? != OPT_REPLY_MAGIC {
            bail!("bad option reply magic");
        }
        let o = u32_(s)?;
        if o != opt {
            bail!("option reply for {o}, expected {opt}");
        }
        let t = u32_(s)?;
        let len = u32_(s)? as usize;
        if len > 1 << 20 {
            bail!("option reply of {len} bytes");
        }
        Ok((t, take(s, len)?))
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32) -> Result<u64> {
        self.cookie += 1;
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        self.s.write_all(&b)?;
        Ok(self.cookie)
    }

    /// Reads one reply chunk; `on_chunk(type, payload)` for structured ones. Returns true
    /// when it was the last chunk of the reply.
    fn reply_chunk(&mut self, cookie: u64, simple_len: usize, out: &mut dyn FnMut(u16, Vec<u8>) -> Result<()>) -> Result<bool> {
        let s = &mut *self.s;
        match u32_(s)? {
            SIMPLE_REPLY_MAGIC => {
                let err = u32_(s)?;
                let c = u64_(s)?;
                if c != cookie {
                    bail!("reply for request {c}, expected {cookie}");
                }
                if err != 0 {
                    bail!("server error {err}");
                }
                let data = take(s, simple_len)?;
                out(SIMPLE_DATA, data)?;
                Ok(true)
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = u16_(s)?;
                let typ = u16_(s)?;
                let c = u64_(s)?;
                let len = u32_(s)? as usize;
                if c != cookie {
                    bail!("reply for request {c}, expected {cookie}");
                }
                if len > (MAX_REQUEST as usize) + 64 {
                    bail!("reply chunk of {len} bytes");
                }
                let payload = take(s, len)?;
                if typ & 0x8000 != 0 {
                    let code = payload.get(..4).map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default())).unwrap_or(0);
                    let mlen = payload.get(4..6).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize).unwrap_or(0);
                    let msg = payload.get(6..6 + mlen).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                    bail!("server error {code}: {msg}");
                }
                if typ != REPLY_NONE {
                    out(typ, payload)?;
                }
                Ok(flags & REPLY_FLAG_DONE != 0)
            }
            m => bail!("bad reply magic {m:#x}"),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset + buf.len() as u64 > self.size {
            bail!("read of {} bytes at {offset} past the end of NBD export {} ({} bytes)", buf.len(), self.uri, self.size);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST as usize);
            let base = offset + done as u64;
            let cookie = self.request(CMD_READ, base, n as u32)?;
            let part = &mut buf[done..done + n];
            loop {
                let last = self.reply_chunk(cookie, n, &mut |typ, p| {
                    match typ {
                        SIMPLE_DATA => part.copy_from_slice(&p),
                        REPLY_OFFSET_DATA => {
                            if p.len() < 8 {
                                bail!("short data chunk");
                            }
                            let o = u64::from_be_bytes(p[..8].try_into()?);
                            let at = o.checked_sub(base).ok_or_else(|| anyhow!("data chunk before the request"))? as usize;
                            let d = &p[8..];
                            part.get_mut(at..at + d.len()).ok_or_else(|| anyhow!("data chunk past the request"))?.copy_from_slice(d);
                        }
                        REPLY_OFFSET_HOLE => {
                            if p.len() != 12 {
                                bail!("bad hole chunk");
                            }
                            let o = u64::from_be_bytes(p[..8].try_into()?);
                            let l = u32::from_be_bytes(p[8..12].try_into()?) as usize;
                            let at = o.checked_sub(base).ok_or_else(|| anyhow!("hole chunk before the request"))? as usize;
                            part.get_mut(at..at + l).ok_or_else(|| anyhow!("hole chunk past the request"))?.fill(0);
                        }
                        t => bail!("unexpected reply chunk type {t} to a read"),
                    }
                    Ok(())
                });
                if last.with_context(|| format!("reading {n} bytes at offset {base} from NBD export {}", self.uri))? {
                    break;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Extents of meta context `ctx` over `[0, size)`: `(offset, length, flags)`, in order,
    /// contiguous, covering the export.
    pub fn block_status(&mut self, ctx: &str) -> Result<Vec<(u64, u64, u32)>> {
        let id = *self.contexts.get(ctx).ok_or_else(|| anyhow!("meta context '{ctx}' was not negotiated with {}", self.uri))?;
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let len = (self.size - pos).min(STATUS_WINDOW) as u32;
            let cookie = self.request(CMD_BLOCK_STATUS, pos, len)?;
            let mut got: Vec<(u64, u32)> = Vec::new();
            loop {
                let last = self.reply_chunk(cookie, 0, &mut |typ, p| {
                    if typ != REPLY_BLOCK_STATUS {
                        bail!("unexpected reply chunk type {typ} to block status");
                    }
                    if p.len() < 4 || (p.len() - 4) % 8 != 0 {
                        bail!("bad block status chunk of {} bytes", p.len());
                    }
                    if u32::from_be_bytes(p[..4].try_into()?) == id {
                        for d in p[4..].chunks(8) {
                            got.push((u32::from_be_bytes(d[..4].try_into()?) as u64, u32::from_be_bytes(d[4..].try_into()?)));
                        }
                    }
                    Ok(())
                });
                if last.with_context(|| format!("block status of '{ctx}' at offset {pos} from NBD export {}", self.uri))? {
                    break;
                }
            }
            tracing::debug!(ctx, pos, ?got, "block status reply");
            if got.is_empty() || got.iter().any(|&(l, _)| l == 0) {
                bail!("NBD export {}: block status of '{ctx}' at offset {pos} made no progress", self.uri);
            }
            for (l, f) in got {
                let l = l.min(self.size - pos);
                if l == 0 {
                    break;
                }
                match out.last_mut() {
                    Some(last) if last.2 == f && last.0 + last.1 == pos => last.1 += l,
                    _ => out.push((pos, l, f)),
                }
                pos += l;
            }
        }
        Ok(out)
    }

    /// The ranges of `ctx` whose flags satisfy `pred`, merged.
    pub fn ranges_where(&mut self, ctx: &str, pred: impl Fn(u32) -> bool) -> Result<Vec<(u64, u64)>> {
        Ok(self.block_status(ctx)?.into_iter().filter(|e| pred(e.2)).map(|e| (e.0, e.1)).collect())
    }

    /// Tells the server goodbye (best effort).
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0);
    }
}

pub fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn uris_parse_and_bad_ones_are_named() {
        let u = parse_uri("nbd+unix:///disk?socket=/run/nbd.sock").unwrap();
        assert_eq!(u.target, Target::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "disk");
        let u = parse_uri("nbd://127.0.0.1/x").unwrap();
        assert_eq!(u.target, Target::Tcp("127.0.0.1:10809".into()));
        let u = parse_uri("nbd://127.0.0.1:1234").unwrap();
        assert_eq!((u.target, u.export), (Target::Tcp("127.0.0.1:1234".into()), String::new()));
        for bad in ["nbd+unix:///x", "http://x", "nbd://", "nbd+unix:///x?socket="] {
            assert!(parse_uri(bad).unwrap_err().to_string().contains(bad));
        }
    }
}
