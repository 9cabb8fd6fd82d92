//! Newtypes for every id that crosses a module. `Display` prints the whole id in hex.

use crate::file_formats::ID_LEN;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Error for a string that is not a 64-digit hex id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not an id (64 hex digits)")]
pub struct ParseIdError(pub String);

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; ID_LEN]);

        impl $name {
            pub fn from_bytes(b: [u8; ID_LEN]) -> Self { Self(b) }
            pub fn as_bytes(&self) -> &[u8; ID_LEN] { &self.0 }
            pub fn to_hex(&self) -> String { hex::encode(self.0) }
            /// Reads an id from the first `ID_LEN` bytes of `b`.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                let arr: [u8; ID_LEN] = b.get(..ID_LEN)?.try_into().ok()?;
                Some(Self(arr))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.to_hex()) }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }
        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, ParseIdError> {
                let mut out = [0u8; ID_LEN];
                hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError(s.to_string()))?;
                Ok(Self(out))
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> { s.serialize_str(&self.to_hex()) }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// Keyed BLAKE3-256 of a blob's plaintext (data chunk, tree or metadata blob).
    ChunkId
);
id_type!(
    /// BLAKE3-256 of a pack object's bytes.
    PackId
);
id_type!(
    /// BLAKE3-256 of an index segment object's bytes.
    IndexId
);
id_type!(
    /// BLAKE3-256 of a snapshot manifest object's bytes.
    SnapshotId
);
id_type!(
    /// BLAKE3-256 of a key file's bytes.
    KeyId
);
id_type!(
    /// Random id of a repository, chosen at `init`.
    RepoId
);
id_type!(
    /// Keyed BLAKE3-256 of a segment's raw bytes (the parent-reuse digest).
    SegmentDigest
);

/// Unkeyed BLAKE3 of stored bytes: the name of packs, index segments, manifests and keys.
pub fn content_id(bytes: &[u8]) -> [u8; ID_LEN] {
    *blake3::hash(bytes).as_bytes()
}

/// The first two bytes of a time-ordered index segment id.
const TIMED_MARK: [u8; 2] = [0xff, 0xff];

impl IndexId {
    /// A time-ordered segment id: `ff ff ‖ ms (48-bit big-endian) ‖ the first 24 bytes of
    /// BLAKE3(bytes)`. Names sort by the time they were sealed, so a node lists only the
    /// segments added since its last sync (`StartAfter`), not all of them.
    pub fn timed(ms: u64, bytes: &[u8]) -> Self {
        let mut id = [0u8; ID_LEN];
        id[..2].copy_from_slice(&TIMED_MARK);
        id[2..8].copy_from_slice(&ms.min((1 << 48) - 1).to_be_bytes()[2..]);
        id[8..].copy_from_slice(&blake3::hash(bytes).as_bytes()[..ID_LEN - 8]);
        Self(id)
    }

    /// The sealing time of a time-ordered id.
    pub fn time_ms(&self) -> Option<u64> {
        (self.0[..2] == TIMED_MARK).then(|| {
            let mut b = [0u8; 8];
            b[2..].copy_from_slice(&self.0[2..8]);
            u64::from_be_bytes(b)
        })
    }

    /// Whether `bytes` are this segment's: their whole BLAKE3 (the first format's names),
    /// or, for a time-ordered id, its hash part.
    pub fn names(&self, bytes: &[u8]) -> bool {
        let h = blake3::hash(bytes);
        h.as_bytes() == &self.0 || (self.0[..2] == TIMED_MARK && h.as_bytes()[..ID_LEN - 8] == self.0[8..])
    }

    /// The smallest time-ordered id sealed at `ms` or later, less one: listing after it
    /// returns every segment sealed from `ms` on.
    pub fn timed_floor(ms: u64) -> Self {
        let mut id = Self::timed(ms, b"");
        id.0[8..].fill(0);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn display_is_full_hex_and_parses_back() {
        let id = ChunkId([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ChunkId>().unwrap(), id);
        assert!("abc".parse::<ChunkId>().is_err());
    }

    #[test]
    fn timed_index_ids_sort_by_time_and_name_only_their_bytes() {
        let a = IndexId::timed(1_700_000_000_000, b"one");
        let b = IndexId::timed(1_700_000_000_001, b"two");
        assert!(a < b && a.to_hex() < b.to_hex());
        assert_eq!(a.time_ms(), Some(1_700_000_000_000));
        assert!(a.names(b"one") && !a.names(b"two"));
        assert!(IndexId::timed_floor(1_700_000_000_000) < a && IndexId::timed_floor(1_700_000_000_001) > a);
        // The first format's ids: the whole hash.
        let old = IndexId(content_id(b"one"));
        assert!(old.names(b"one") && !old.names(b"two") && old.time_ms().is_none());
    }
}
