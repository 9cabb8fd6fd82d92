//! Quarantine records (`quarantine/<created ms>-<8 hex>`): blob locations found damaged. A
//! location named here is never deduplicated against again, so the next backup that
//! produces the content stores it anew, and every reader prefers another location of the
//! same chunk when the index has one (the healed copy). Written by whatever finds the
//! damage (check, restore, drill, copy, export, repair); removed by gc once the pack they
//! name is gone. Sealed JSON like reports (`docs/repo-format.md`).

use crate::id::{ChunkId, PackId};
use serde::{Deserialize, Serialize};

/// One damaged blob location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damaged {
    pub chunk: ChunkId,
    pub pack: PackId,
    /// What is wrong with it (the reader's error).
    pub problem: String,
}

/// One quarantine record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quarantine {
    pub time_unix_ms: u64,
    pub hostname: String,
    /// What found the damage: `check`, `restore`, `drill`, `copy`, `export`, `backup`, `repair`.
    pub found_by: String,
    pub entries: Vec<Damaged>,
}

/// Locations a record may hold: a record is read whole, and a check that finds a whole
/// repository damaged writes several.
pub const MAX_ENTRIES: usize = 10_000;
