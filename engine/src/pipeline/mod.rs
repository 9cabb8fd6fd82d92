//! The transfer pipelines, one file per stage. Backup: [`reader`] → [`chunk`] → [`packer`],
//! orchestrated (and committed) by [`backup`]. Restore: [`restore`] fetches, verifies and
//! assembles segments, [`writer`] writes them.
pub mod backup;
pub mod chunk;
pub mod copy;
pub mod packer;
pub mod reader;
pub mod restore;
pub mod splice;
pub mod writer;
