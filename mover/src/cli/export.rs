//! `mover export`: serve one volume of a snapshot read-only over NBD, straight from the
//! repository, until interrupted. For file-level restore (`nbdfuse`, then a read-only loop
//! mount), instant access (`qemu-img convert`, `nbdcopy`), or booting a VM from a backup
//! through a local overlay (docs/export.md).

use mover::nbd::server::{run_export, ExportListen, ExportTls};
use mover::plan::export::{self, ExportRequest};
use mover::repo::RepoArgs;
use mover_engine::export::ImageOptions;
use mover_engine::ops::{self, RepoHandle};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// SNAPSHOT or SNAPSHOT:VOLUME (id, unique prefix, or `latest`).
    snapshot: String,
    /// The group `latest` is looked up in.
    #[arg(long)]
    group: Option<String>,
    /// Unix socket to serve on (mode 0600). Default: /run/mover/export-<snapshot>-<volume>.sock
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Serve on TCP instead: a loopback HOST:PORT (NBD has no authentication).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Decoded 4 MiB segments kept in memory.
    #[arg(long, default_value_t = 32)]
    cache_segments: usize,
    /// Segments fetched ahead of a sequential reader.
    #[arg(long, default_value_t = 4)]
    read_ahead: usize,
    /// The fetch window: MiB of packs being fetched at once (default: 64 against S3, 32 for
    /// a local directory). More covers a more distant store, at about a MiB of memory per
    /// MiB.
    #[arg(long)]
    window_mib: Option<u64>,
    /// Print the NBD URI as JSON once serving.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    let req = ExportRequest {
        group: a.group.clone(),
        options: ImageOptions { cache_segments: a.cache_segments, read_ahead: a.read_ahead, window: a.window_mib.map(|m| m << 20) },
        ..export::parse(&a.snapshot)
    };
    let req = export::prepare(req)?;
    let h = RepoHandle::local(ra.open(cancel).await?, &ra.cache_root());
    ops::with_image(&h, req, cancel, |img| async move {
        let (snap, vol) = (img.snapshot, img.volume);
        let listen = match (a.listen, &a.socket) {
            (Some(addr), _) => ExportListen::Tcp(addr),
            (None, Some(p)) => ExportListen::unix(p),
            (None, None) => ExportListen::unix(PathBuf::from("/run/mover").join(format!("export-{}-{}.sock", &snap.to_string()[..12], vol.name))),
        };
        let json = a.json;
        let (sid, vname, size) = (snap.to_string(), vol.name.clone(), vol.size);
        run_export(img.image, listen, String::new(), ExportTls::None, cancel.clone(), move |uri| {
            if json {
                println!("{}", serde_json::json!({"uri": uri, "snapshot_id": sid, "volume": vname, "size": size}));
            } else {
                println!("serving volume '{vname}' of snapshot {sid} ({}) read-only at {uri}; Ctrl-C stops", super::size(size));
            }
        })
        .await
    })
    .await?;
    Ok(())
}
