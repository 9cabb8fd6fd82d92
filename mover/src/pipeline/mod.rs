//! The transfer pipeline, one file per stage.
pub mod backup;
pub mod packer;
pub mod reader;
pub mod restore;
pub mod writer;
