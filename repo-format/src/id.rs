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
}
