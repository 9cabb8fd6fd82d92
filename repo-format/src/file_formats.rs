//! Magic numbers, format version and key-derivation contexts.
//!
//! NEVER CHANGE THESE. Every repository written by a released Mover must stay readable;
//! a new layout gets a new constant and a new version, the old ones stay here.
//! `docs/repo-format.md` documents every object byte by byte.

/// Version of the repository format, recorded in `config`.
pub const FORMAT_VERSION: u32 = 1;

/// First bytes of the `config` object.
pub const CONFIG_MAGIC: [u8; 8] = *b"MOVRCFG1";
/// First bytes of every pack.
pub const PACK_HEADER_MAGIC: [u8; 8] = *b"MOVRPAK1";
/// Last bytes of every pack (after the trailer length).
pub const PACK_FOOTER_MAGIC: [u8; 8] = *b"MOVRPKT1";
/// First bytes of a sealed index segment.
pub const INDEX_MAGIC: [u8; 8] = *b"MOVRIDX1";
/// First bytes of a sealed snapshot manifest.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"MOVRSNP1";
/// First bytes of a lock object (`locks/`); also its AEAD associated data.
pub const LOCK_MAGIC: [u8; 8] = *b"MOVRLCK1";
/// First bytes of a GC pending-deletion record (`gc/<id>.entries`); also its AEAD data.
pub const PENDING_MAGIC: [u8; 8] = *b"MOVRGCP1";
/// First bytes of a GC record's completion marker (`gc/<id>.ready`); also its AEAD data.
pub const PENDING_READY_MAGIC: [u8; 8] = *b"MOVRGCR1";
/// First bytes of a verify or drill report (`reports/`); also its AEAD associated data.
pub const REPORT_MAGIC: [u8; 8] = *b"MOVRRPT1";
/// First bytes of a quarantine record (`quarantine/`); also its AEAD associated data.
pub const QUARANTINE_MAGIC: [u8; 8] = *b"MOVRQTN1";
/// First bytes of a snapshot's protection (`protected/`); also its AEAD associated data.
pub const PROTECTION_MAGIC: [u8; 8] = *b"MOVRPRT1";
/// First bytes of a journal entry (`journal/`); also its AEAD associated data.
pub const JOURNAL_MAGIC: [u8; 8] = *b"MOVRJNL1";
/// Associated data of a pack trailer's AEAD.
pub const PACK_TRAILER_AAD: &[u8] = b"mover pack trailer v1";
/// Associated data of a wrapped master key.
pub const KEY_WRAP_AAD: &[u8] = b"mover master key v1";

/// Version byte at the start of a pack trailer's plaintext.
pub const PACK_TRAILER_VERSION: u8 = 1;
/// Version byte at the start of an index segment's plaintext.
pub const INDEX_VERSION: u8 = 1;
/// Version byte at the start of a tree blob (segment map, segment group).
pub const TREE_VERSION: u8 = 1;
/// Version byte of a segment map that holds slices (entry tag 2); maps without slices keep
/// version 1.
pub const TREE_VERSION_SLICES: u8 = 2;
/// Tree blob type: the chunk list of one segment.
pub const TREE_SEGMENT_MAP: u8 = 1;
/// Tree blob type: a group of consecutive segments of one volume.
pub const TREE_SEGMENT_GROUP: u8 = 2;

/// Blob payload flag (first plaintext byte inside the AEAD): stored as is.
pub const BLOB_RAW: u8 = 0;
/// Blob payload flag: zstd frame.
pub const BLOB_ZSTD: u8 = 1;

/// Blob kinds as recorded in pack trailers and index segments.
pub const KIND_DATA: u8 = 0;
pub const KIND_TREE: u8 = 1;
pub const KIND_METADATA: u8 = 2;

/// BLAKE3 `derive_key` contexts for the subkeys of the master key.
pub const CTX_CHUNK_ID: &str = "mover 2026-11-22 chunk id v1";
pub const CTX_GEAR: &str = "mover 2026-11-22 gear table v1";
pub const CTX_AEAD: &str = "mover 2026-11-22 blob aead v1";
pub const CTX_CONFIG_MAC: &str = "mover 2026-11-22 config mac v1";
pub const CTX_SEGMENT_DIGEST: &str = "mover 2026-11-22 segment digest v1";

/// Size of every id (chunk, pack, index segment, snapshot, key), in bytes.
pub const ID_LEN: usize = 32;
/// XChaCha20-Poly1305 nonce and tag sizes.
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
