//! A restore request → a validated [`RestorePlan`]: the snapshot resolved (`latest` within
//! a group), the volumes chosen, every target opened — a block device exclusively (never
//! a mounted or held one), a file no other process has open — and checked to be large
//! enough. Nothing is written until every target passed.

use super::Env;
use mover_engine::pipeline::restore::{check_target_size, HoleMode, Target};
use mover_engine::{snapshots, Error, Result};
use mover_format::manifest::{Manifest, VolumeEntry};
use mover_format::{Repository, SnapshotId};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Where a volume is restored to, as a request names it.
#[derive(Debug, Clone)]
pub enum TargetRef {
    Path(PathBuf),
    PodVolume { uid: String, volume: String },
}

#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// An id, a unique prefix, or `latest`.
    pub snapshot: String,
    /// The group `latest` is looked up in (needed when the repository holds several).
    pub group: Option<String>,
    /// One volume; `None`: the only one, or — when `into_directory` — all of them.
    pub volume: Option<String>,
    pub target: TargetRef,
    /// With several volumes and no volume named, `target` is a directory that receives
    /// `<volume>.img` for each (the CLI).
    pub into_directory: bool,
    pub holes: HoleMode,
    /// Write over a target that already holds data (without it such a target is refused).
    pub overwrite: bool,
}

/// A validated restore: the snapshot and, per volume, its opened target.
pub struct RestorePlan {
    pub snapshot: SnapshotId,
    pub manifest: Manifest,
    pub volumes: Vec<(VolumeEntry, Target)>,
    pub holes: HoleMode,
}

pub async fn prepare(req: RestoreRequest, env: &Env, repo: &Repository, cancel: &CancellationToken) -> Result<RestorePlan> {
    let (id, m) = snapshots::resolve(repo, &req.snapshot, req.group.as_deref(), cancel).await?;
    let vols: Vec<VolumeEntry> = match &req.volume {
        Some(v) if !v.is_empty() => vec![snapshots::volume(&id, &m, v)?.clone()],
        _ if m.volumes.len() == 1 || req.into_directory => m.volumes.clone(),
        _ => return Err(Error::invalid(format!("snapshot {id} has {} volumes: name one", m.volumes.len()))),
    };
    let what = "restore target";
    let mut out = Vec::new();
    if vols.len() == 1 {
        let t = open_target(env, &req.target, what)?;
        check_target_size(&t.label, &t.file, &vols[0], &id)?;
        refuse_unless_overwrite(&t, req.overwrite)?;
        out.push((vols[0].clone(), t));
    } else {
        let TargetRef::Path(dir) = &req.target else {
            return Err(Error::invalid(format!("snapshot {id} has {} volumes: name one", vols.len())));
        };
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "snapshot {id} has {} volumes: the target {} must be a directory (or name one volume as SNAPSHOT:VOLUME)",
                vols.len(),
                dir.display()
            )));
        }
        for v in vols {
            let t = open_target(env, &TargetRef::Path(dir.join(format!("{}.img", v.name))), what)?;
            check_target_size(&t.label, &t.file, &v, &id)?;
            refuse_unless_overwrite(&t, req.overwrite)?;
            out.push((v, t));
        }
    }
    Ok(RestorePlan { snapshot: id, manifest: m, volumes: out, holes: req.holes })
}

/// How much of each end of a device is read to tell whether it holds data.
const PROBE_BYTES: u64 = 1 << 20;

/// Refuses a target that already holds data unless the request says to overwrite it: a
/// regular file of non-zero size, or a device whose first or last MiB is not all zeros (a
/// partition table, a filesystem's superblock, a backup GPT). Nothing is written here.
fn refuse_unless_overwrite(t: &Target, overwrite: bool) -> Result<()> {
    use mover_engine::device::{self, Kind};
    use mover_engine::ResultExt;
    use std::os::unix::fs::FileExt;
    if overwrite || t.fresh {
        return Ok(());
    }
    let holds = match t.kind {
        Kind::File => Some("a file that is not empty"),
        Kind::BlockDevice => {
            let (_, size) = device::inspect(&t.label, &t.file)?;
            let mut buf = vec![0u8; PROBE_BYTES.min(size) as usize];
            let mut nonzero = false;
            for at in [0, size.saturating_sub(PROBE_BYTES)] {
                t.file.read_exact_at(&mut buf, at).with_context(|| format!("restore target {}: reading at {at} to see whether it holds data", t.label))?;
                nonzero |= !mover_format::chunker::is_zero(&buf);
            }
            nonzero.then_some("its first or last MiB is not all zeros")
        }
    };
    match holds {
        Some(what) => Err(Error::precondition(format!(
            "restore target {} already holds data ({what}); give --overwrite (overwrite in StartRestore) to replace it; nothing was written",
            t.label
        ))),
        None => Ok(()),
    }
}

fn open_target(env: &Env, t: &TargetRef, what: &str) -> Result<Target> {
    let o = match t {
        TargetRef::Path(p) => env.paths.open_target(p, what)?,
        TargetRef::PodVolume { uid, volume } => {
            let crate::sources::file::PathPolicy::Confined(c) = &env.paths else {
                return Err(Error::invalid(format!("{what}: pod volumes are resolved by the daemon only")));
            };
            crate::sources::file::PathPolicy::open_resolved_target(c.pod_volume(uid, volume, what)?, what)?
        }
    };
    let finish = o.pending.map(|p| Box::new(move || p.commit()) as Box<dyn FnOnce() -> Result<()> + Send>);
    Ok(Target { file: o.file, label: o.label, kind: o.kind, fresh: o.fresh, finish })
}
