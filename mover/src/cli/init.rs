//! `mover init`: create a repository.

use mover::repo::RepoArgs;
use mover_format::config::CompressionConfig;
use mover_format::crypto::KdfParams;
use mover_format::{InitOptions, Repository};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// zstd level for new blobs (0 = no compression).
    #[arg(long, default_value_t = 1)]
    compression_level: i32,
    /// Target pack size in MiB.
    #[arg(long, default_value_t = 16)]
    pack_size_mib: u32,
    /// Average chunk size in KiB, a power of two from 4 to 1024 (chunks range from a
    /// quarter of it to four times it). Smaller chunks find more duplicates and cost more
    /// index: about 100 bytes per chunk.
    #[arg(long, default_value_t = 128)]
    chunk_avg_kib: u32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ra: &RepoArgs, a: Args, cancel: &CancellationToken) -> anyhow::Result<()> {
    if !(1..=256).contains(&a.pack_size_mib) {
        anyhow::bail!("--pack-size-mib {}: must be between 1 and 256", a.pack_size_mib);
    }
    if !(0..=22).contains(&a.compression_level) {
        anyhow::bail!("--compression-level {}: must be between 0 (none) and 22", a.compression_level);
    }
    if !(a.chunk_avg_kib.is_power_of_two() && (4..=1024).contains(&a.chunk_avg_kib)) {
        anyhow::bail!("--chunk-avg-kib {}: must be a power of two from 4 to 1024", a.chunk_avg_kib);
    }
    let avg = a.chunk_avg_kib * 1024;
    let chunker =
        mover_format::chunker::ChunkerParams { min_size: avg / 4, avg_size: avg, max_size: avg * 4, min_hole: (avg / 4).max(4096), ..Default::default() };
    let storage = ra.storage(cancel).await?;
    let pw = ra.password()?;
    let kdf = match std::env::var("MOVER_INSECURE_TEST_KDF") {
        Ok(v) if v == "1" => KdfParams::insecure_for_tests(),
        _ => KdfParams::default(),
    };
    let opts = InitOptions {
        compression: CompressionConfig { algorithm: "zstd".into(), level: a.compression_level },
        pack_size: a.pack_size_mib * 1024 * 1024,
        kdf,
        chunker,
    };
    let repo = Repository::init(storage, &pw, opts, cancel).await?;
    if a.json {
        println!("{}", serde_json::json!({"repository": repo.location(), "id": repo.config().id, "key": repo.key_id()}));
    } else {
        println!("created repository {} (id {})", repo.location(), repo.config().id);
    }
    Ok(())
}
