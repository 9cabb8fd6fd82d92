//! An NBD export as a backup source: its data ranges from `base:allocation` (holes are not
//! read), its changes from a QEMU dirty bitmap (`qemu:dirty-bitmap:NAME`), reads over the
//! same connection. A server without structured replies or meta contexts is read in full
//! (zero runs still become holes); a bitmap the server does not offer is a fallback, never
//! a failure.

use crate::nbd::proto::{bitmap_context, BASE_ALLOCATION, STATE_DIRTY, STATE_ZERO};
use crate::nbd::{NbdClient, NbdOptions, NbdUri};
use mover_engine::source::{Changes, Opened, Reader};
use mover_engine::Result;
use mover_format::manifest::ChangeSource;
use tokio_util::sync::CancellationToken;

/// Connects and asks for allocation and, with `bitmap`, the dirty ranges. The connection
/// is tied to `cancel`: a cancelled job shuts its socket down.
pub fn open(uri: &NbdUri, bitmap: Option<&str>, options: NbdOptions, cancel: &CancellationToken) -> Result<Opened> {
    let mut meta = vec![BASE_ALLOCATION.to_string()];
    if let Some(b) = bitmap {
        meta.push(bitmap_context(b));
    }
    let connect = || -> Result<NbdClient> {
        let mut c = NbdClient::connect(uri, &meta, options)?;
        c.cancel_with(cancel.clone());
        Ok(c)
    };
    let mut client = connect()?;
    // As `[start, end)` pairs, like SEEK_DATA gives; too fragmented to keep: read it all.
    let allocated = if client.has_context(BASE_ALLOCATION) {
        client.ranges_where(BASE_ALLOCATION, |f| f & STATE_ZERO == 0)?.map(|r| r.into_iter().map(|(o, l)| (o, o + l)).collect())
    } else {
        None
    };
    let changes = match bitmap {
        None => Changes::default(),
        Some(b) if !client.structured() => {
            Changes::fallback(format!("dirty bitmap '{b}' unavailable: NBD server {} does not support structured replies (needed for block status)", uri.text))
        }
        Some(b) if !client.has_context(&bitmap_context(b)) => Changes::fallback(format!(
            "dirty bitmap '{b}' unavailable: the server does not offer meta context '{}' on export '{}' (it offered: {})",
            bitmap_context(b),
            uri.export,
            client.contexts().join(", ")
        )),
        Some(b) => match client.ranges_where(&bitmap_context(b), |f| f & STATE_DIRTY != 0) {
            Ok(None) => Changes::fallback(format!("dirty bitmap '{b}' is too fragmented to keep; reading everything allocated")),
            Ok(Some(d)) => {
                Changes { source: Some(ChangeSource::Nbd), changed: Some(d), since: Some(b.to_string()), fallback: None, sparse: false, ..Default::default() }
            }
            Err(e) => {
                // The connection may be unusable after a failed request: start afresh.
                client = connect()?;
                Changes::fallback(format!("reading dirty bitmap '{b}' failed: {e:#}"))
            }
        },
    };
    Ok(Opened { size: client.size(), reader: Reader::Blocks(Box::new(client)), allocated, changes })
}
