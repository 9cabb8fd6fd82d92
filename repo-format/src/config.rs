//! The `config` object: `magic[8] || json_len u32 || JSON || mac[32]`. The JSON is readable
//! without the key (format version, repository id); the MAC, keyed by a subkey of the
//! master key, is checked right after a key file opens.

use crate::bytes_io::{put_u32, Reader};
use crate::chunker::ChunkerParams;
use crate::crypto::Keys;
use crate::error::FormatError;
use crate::file_formats::{CONFIG_MAGIC, FORMAT_VERSION};
use crate::id::RepoId;
use serde::{Deserialize, Serialize};

/// Default pack size: 16 MiB. Big enough that S3 request costs and per-object overhead
/// vanish (one PUT per 16 MiB), small enough that a handful in flight per upload worker
/// keeps memory bounded and a failed upload costs little to redo.
pub const DEFAULT_PACK_SIZE: u32 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoConfig {
    pub version: u32,
    pub id: RepoId,
    pub created_unix: u64,
    pub chunker: ChunkerParams,
    pub compression: CompressionConfig,
    pub pack_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CompressionConfig {
    pub algorithm: String,
    pub level: i32,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self { algorithm: "zstd".into(), level: 1 }
    }
}

impl RepoConfig {
    pub fn new(chunker: ChunkerParams, compression: CompressionConfig, pack_size: u32) -> Self {
        Self { version: FORMAT_VERSION, id: RepoId(rand::random()), created_unix: crate::now_unix(), chunker, compression, pack_size }
    }

    pub fn to_bytes(&self, keys: &Keys) -> Result<Vec<u8>, FormatError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| FormatError::Corrupt(format!("encoding config: {e}")))?;
        let mut out = CONFIG_MAGIC.to_vec();
        put_u32(&mut out, json.len() as u32);
        out.extend_from_slice(&json);
        let mac = keys.config_mac(&out);
        out.extend_from_slice(&mac);
        Ok(out)
    }

    /// Parses without the key; returns the config and the MAC to check later.
    pub fn parse_unverified(b: &[u8]) -> Result<(Self, [u8; 32], usize), FormatError> {
        let mut r = Reader::new(b, "config");
        if r.take(8)? != CONFIG_MAGIC {
            return Err(FormatError::Corrupt("config magic missing (not a Mover repository?)".into()));
        }
        let n = r.u32()? as usize;
        let json = r.take(n)?;
        let mac = r.id()?;
        r.finish()?;
        #[derive(Deserialize)]
        struct V {
            version: u32,
        }
        let v: V = serde_json::from_slice(json).map_err(|e| FormatError::Corrupt(format!("config: {e}")))?;
        if v.version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(v.version));
        }
        let cfg: RepoConfig = serde_json::from_slice(json).map_err(|e| FormatError::Corrupt(format!("config: {e}")))?;
        cfg.chunker.validate().map_err(FormatError::Corrupt)?;
        Ok((cfg, mac, 12 + n))
    }
}
