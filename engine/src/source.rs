//! What the backup pipeline reads, and what a change source said about it.
//!
//! A request names a volume; the `mover` crate's sources turn that into a [`VolumeSource`]
//! (a descriptor opened once and checked, an NBD export, a KubeVirt export, …). The engine
//! opens it when the backup runs — after it holds its lease and knows the parent — and gets
//! back a [`Reader`], the volume's size and allocation, and its [`Changes`]. Which changes
//! may be trusted is decided here, once, for every source ([`trust_changes`]).

use crate::error::{Error, Result};
use mover_format::manifest::{ChangeSource, VolumeEntry};
use mover_format::SnapshotId;
use tokio_util::sync::CancellationToken;

/// Byte ranges `(offset, length)` that may have changed.
pub type Extents = Vec<(u64, u64)>;

/// Byte ranges `[start, end)`.
pub type Ranges = Vec<(u64, u64)>;

/// A volume read by offset over something other than a local descriptor.
pub trait BlockRead: Send {
    /// The protocol, reported as the backup's I/O path (`nbd`, `kubevirt`).
    fn name(&self) -> &'static str;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Ends the session (best effort).
    fn close(self: Box<Self>) {}
    /// Another reader of the same volume, for reads in parallel; `None`: one at a time.
    fn try_clone(&self) -> Option<Box<dyn BlockRead>> {
        None
    }
}

/// How the pipeline reads a volume.
pub enum Reader {
    /// A regular file or block device, already opened and checked: read with io_uring
    /// (`O_DIRECT` where allowed) or `pread`. Never reopened by path.
    File(std::fs::File),
    /// A reader by offset (an NBD export, an HTTP data endpoint).
    Blocks(Box<dyn BlockRead>),
}

/// What a change source said about a volume.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Which source gave `changed`.
    pub source: Option<ChangeSource>,
    /// Only these ranges may differ from the parent; `None`: anything may.
    pub changed: Option<Extents>,
    /// The checkpoint `changed` is relative to (a bitmap, a CSI snapshot, a KubeVirt
    /// checkpoint). It must equal the parent's recorded checkpoint, or the changes are not
    /// used. `None` for extents given by the caller.
    pub since: Option<String>,
    /// Why the source could not be used: then everything is read (with parent reuse).
    pub fallback: Option<String>,
    /// The reader holds only the changed ranges (a KubeVirt push-mode incremental image):
    /// nothing else may be read from it, so its changes must be applied onto the parent.
    pub sparse: bool,
    /// Set when the data was not read through the source that owns the request's
    /// checkpoint (a KubeVirt export's PVC read instead): the checkpoint is then not
    /// recorded, so the next incremental cannot build on a base this snapshot may predate.
    pub drop_checkpoint: Option<String>,
}

impl Changes {
    /// No change information, because of `why`.
    pub fn fallback(why: impl Into<String>) -> Self {
        Self { fallback: Some(why.into()), ..Default::default() }
    }
}

/// A source, opened for reading.
pub struct Opened {
    pub size: u64,
    pub reader: Reader,
    /// Allocated ranges, when the source knows them (`None`: a file is asked with
    /// `SEEK_DATA`; anything else is read in full).
    pub allocated: Option<Ranges>,
    pub changes: Changes,
}

/// The parent snapshot's copy of a volume, as change sources see it.
#[derive(Debug, Clone, Copy)]
pub struct ParentVolume<'a> {
    pub snapshot: SnapshotId,
    pub volume: &'a VolumeEntry,
    /// The caller named the parent by id (rather than `latest`).
    pub named: bool,
}

impl ParentVolume<'_> {
    /// The checkpoint recorded for this volume, if any.
    pub fn checkpoint(&self) -> Option<&str> {
        self.volume.change_base.as_deref()
    }
}

/// A volume to back up.
#[async_trait::async_trait]
pub trait VolumeSource: Send + Sync {
    /// Where it is read from, for messages and the manifest (a path, an NBD URI).
    fn describe(&self) -> String;
    /// Opens it for reading. `parent` is the parent's copy of this volume, for sources that
    /// report changes relative to it. A source that cannot say what changed reports a
    /// fallback in [`Changes`]; an error here fails the backup.
    async fn open(self: Box<Self>, parent: Option<ParentVolume<'_>>, cancel: &CancellationToken) -> Result<Opened>;
}

/// Validates changed extents against the volume: non-empty, inside it.
pub fn validate_extents(name: &str, ext: &[(u64, u64)], size: u64) -> Result<()> {
    for &(o, l) in ext {
        if l == 0 || o.checked_add(l).is_none_or(|e| e > size) {
            return Err(Error::invalid(format!("changed extent {o}+{l} of volume '{name}' lies outside the volume ({size} bytes)")));
        }
    }
    Ok(())
}

/// Decides whether a source's changed extents may be used against `parent`: the one rule
/// for every change source. They may not when there is no parent copy of the volume, when
/// the parent used another segment size, when the source tracks changes since a checkpoint
/// other than the one the parent recorded, or — for extents the caller gave without a
/// checkpoint — when the parent was found as `latest` but was read from another source.
/// Then the changes are dropped and the reason recorded: the volume is read in full (with
/// parent reuse), never backed up incompletely.
pub fn trust_changes(ch: &mut Changes, name: &str, source: &str, parent: Option<ParentVolume<'_>>, segment_size: u32) {
    if ch.changed.is_none() {
        return;
    }
    let why = match parent {
        None => Some(format!("no parent snapshot of volume '{name}' to apply the changes to")),
        Some(p) if p.volume.segment_size != segment_size => {
            Some(format!("parent snapshot {} of volume '{name}' used {}-byte segments, this repository {segment_size}", p.snapshot, p.volume.segment_size))
        }
        Some(p) => match (&ch.since, p.checkpoint()) {
            (Some(since), Some(rec)) if since == rec => None,
            (Some(since), rec) => Some(format!(
                "the change source tracks changes since '{since}', but parent snapshot {} was taken at {}",
                p.snapshot,
                rec.map(|r| format!("'{r}'")).unwrap_or_else(|| "no recorded checkpoint".into())
            )),
            (None, _) if !p.named && p.volume.source != source => Some(format!(
                "the changed extents are relative to an unknown base: the latest snapshot of the group, {}, read volume '{name}' from {}, this backup reads {source} (name the parent explicitly)",
                p.snapshot, p.volume.source
            )),
            (None, _) => None,
        },
    };
    if let Some(w) = why {
        ch.changed = None;
        ch.source = None;
        ch.fallback.get_or_insert(w);
    }
}

/// A sparse source whose changes cannot be applied cannot be read at all.
pub fn check_sparse(ch: &Changes, name: &str, source: &str) -> Result<()> {
    if ch.sparse && ch.changed.is_none() {
        return Err(Error::precondition(format!(
            "volume '{name}': {source} holds only the changes since a checkpoint, and they cannot be applied: {}; back it up onto the snapshot taken at that checkpoint",
            ch.fallback.as_deref().unwrap_or("no parent")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::manifest::VolumeStats;

    fn vol(base: Option<&str>, source: &str) -> VolumeEntry {
        VolumeEntry {
            name: "d".into(),
            size: 1 << 20,
            segment_size: 4 << 20,
            groups: vec![],
            source: source.into(),
            change_source: ChangeSource::Full,
            change_base: base.map(String::from),
            change_fallback: None,
            trusted_run: 0,
            stats: VolumeStats::default(),
        }
    }

    fn changes(since: Option<&str>) -> Changes {
        Changes {
            source: Some(ChangeSource::Nbd),
            changed: Some(vec![(0, 4096)]),
            since: since.map(String::from),
            fallback: None,
            sparse: false,
            ..Default::default()
        }
    }

    #[test]
    fn only_matching_checkpoints_and_known_bases_are_trusted() {
        let s = SnapshotId([1; 32]);
        fn p(s: SnapshotId, v: &VolumeEntry, named: bool) -> Option<ParentVolume<'_>> {
            Some(ParentVolume { snapshot: s, volume: v, named })
        }
        let v = vol(Some("cp1"), "/dev/a");
        let mut c = changes(Some("cp1"));
        trust_changes(&mut c, "d", "/dev/a", p(s, &v, false), 4 << 20);
        assert!(c.changed.is_some() && c.fallback.is_none());

        let mut c = changes(Some("cp2"));
        trust_changes(&mut c, "d", "/dev/a", p(s, &v, true), 4 << 20);
        assert!(c.changed.is_none() && c.fallback.as_deref().unwrap().contains("'cp1'"), "{c:?}");

        let none = vol(None, "/dev/a");
        let mut c = changes(Some("cp1"));
        trust_changes(&mut c, "d", "/dev/a", p(s, &none, true), 4 << 20);
        assert!(c.fallback.as_deref().unwrap().contains("no recorded checkpoint"));

        let mut c = changes(Some("cp1"));
        trust_changes(&mut c, "d", "/dev/a", None, 4 << 20);
        assert!(c.fallback.as_deref().unwrap().contains("no parent"));

        // Caller extents: trusted against a named parent or the same source only.
        let mut c = changes(None);
        trust_changes(&mut c, "d", "/dev/b", p(s, &v, false), 4 << 20);
        assert!(c.fallback.as_deref().unwrap().contains("unknown base"));
        let mut c = changes(None);
        trust_changes(&mut c, "d", "/dev/b", p(s, &v, true), 4 << 20);
        assert!(c.changed.is_some());
        let mut c = changes(None);
        trust_changes(&mut c, "d", "/dev/a", p(s, &v, false), 4 << 20);
        assert!(c.changed.is_some());
        let mut c = changes(None);
        trust_changes(&mut c, "d", "/dev/a", p(s, &v, true), 1 << 20);
        assert!(c.fallback.as_deref().unwrap().contains("segments"));
    }
}
