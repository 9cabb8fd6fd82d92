//! Keys: a random master key, wrapped by a password-derived key (argon2id) in key files;
//! subkeys derived from it with BLAKE3 `derive_key` for chunk ids, the gear table, blob
//! AEAD (XChaCha20-Poly1305, random 192-bit nonces) and the config MAC.
//! Secrets are zeroized on drop and never printed.

use crate::error::FormatError;
use crate::file_formats::*;
use crate::id::{ChunkId, SegmentDigest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The repository's master key. Never leaves memory unwrapped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<secret>)")
    }
}

impl MasterKey {
    pub fn generate() -> Self {
        Self(rand::random())
    }
}

/// Argon2id parameters, recorded in each key file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes: about 0.2 s on one core of a current server.
    fn default() -> Self {
        Self { m_cost_kib: 64 * 1024, t_cost: 3, p_cost: 1 }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only; never for a real repository.
    pub fn insecure_for_tests() -> Self {
        Self { m_cost_kib: 64, t_cost: 1, p_cost: 1 }
    }
}

/// A key file (`keys/<id>`), JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub version: u32,
    pub kdf: String,
    pub params: KdfParams,
    #[serde(with = "hex_bytes")]
    pub salt: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub wrapped: Vec<u8>,
    pub created_unix: u64,
    pub hostname: String,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

fn derive_kek(password: &[u8], salt: &[u8], p: &KdfParams) -> Result<Zeroizing<[u8; 32]>, FormatError> {
    let params =
        argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32)).map_err(|e| FormatError::InvalidParameter(format!("argon2 parameters {p:?}: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(password, salt, &mut *out).map_err(|e| FormatError::InvalidParameter(format!("argon2: {e}")))?;
    Ok(out)
}

impl KeyFile {
    /// Wraps `master` under `password`.
    pub fn wrap(master: &MasterKey, password: &[u8], params: KdfParams) -> Result<Self, FormatError> {
        let salt: [u8; 32] = rand::random();
        let kek = derive_kek(password, &salt, &params)?;
        let cipher = XChaCha20Poly1305::new((&*kek).into());
        let nonce: [u8; NONCE_LEN] = rand::random();
        let wrapped = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: &master.0, aad: KEY_WRAP_AAD })
            .map_err(|_| FormatError::InvalidParameter("key wrapping failed".into()))?;
        Ok(Self {
            version: 1,
            kdf: "argon2id".into(),
            params,
            salt: salt.to_vec(),
            nonce: nonce.to_vec(),
            wrapped,
            created_unix: crate::now_unix(),
            hostname: crate::hostname(),
        })
    }

    /// Unwraps the master key; `None` when the password does not open this key file.
    pub fn unwrap_key(&self, password: &[u8]) -> Result<Option<MasterKey>, FormatError> {
        if self.version != 1 || self.kdf != "argon2id" || self.nonce.len() != NONCE_LEN {
            return Err(FormatError::Unsupported(format!("key file version {} kdf {}", self.version, self.kdf)));
        }
        let kek = derive_kek(password, &self.salt, &self.params)?;
        let cipher = XChaCha20Poly1305::new((&*kek).into());
        match cipher.decrypt(XNonce::from_slice(&self.nonce), Payload { msg: &self.wrapped, aad: KEY_WRAP_AAD }) {
            Ok(pt) => {
                let pt = Zeroizing::new(pt);
                let arr: [u8; 32] = pt.as_slice().try_into().map_err(|_| FormatError::Corrupt("wrapped key has the wrong length".into()))?;
                Ok(Some(MasterKey(arr)))
            }
            Err(_) => Ok(None),
        }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        serde_json::to_vec_pretty(self).map_err(|e| FormatError::Corrupt(format!("encoding key file: {e}")))
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, FormatError> {
        serde_json::from_slice(b).map_err(|e| FormatError::Corrupt(format!("key file is not valid JSON: {e}")))
    }
}

/// Subkeys derived from the master key; what every other module uses.
pub struct Keys {
    chunk_id: Zeroizing<[u8; 32]>,
    segment_digest: Zeroizing<[u8; 32]>,
    config_mac: Zeroizing<[u8; 32]>,
    aead: XChaCha20Poly1305,
    gear: Box<[u64; 256]>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(<secret>)")
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.gear.zeroize();
    }
}

impl Keys {
    pub fn derive(master: &MasterKey) -> Self {
        let aead_key = Zeroizing::new(blake3::derive_key(CTX_AEAD, &master.0));
        let mut gear_bytes = Zeroizing::new([0u8; 256 * 8]);
        let mut xof = blake3::Hasher::new_derive_key(CTX_GEAR);
        xof.update(&master.0);
        xof.finalize_xof().fill(&mut *gear_bytes);
        let mut gear = Box::new([0u64; 256]);
        for (i, g) in gear.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&gear_bytes[i * 8..i * 8 + 8]);
            *g = u64::from_le_bytes(b);
        }
        Self {
            chunk_id: Zeroizing::new(blake3::derive_key(CTX_CHUNK_ID, &master.0)),
            segment_digest: Zeroizing::new(blake3::derive_key(CTX_SEGMENT_DIGEST, &master.0)),
            config_mac: Zeroizing::new(blake3::derive_key(CTX_CONFIG_MAC, &master.0)),
            aead: XChaCha20Poly1305::new((&*aead_key).into()),
            gear,
        }
    }

    /// Keyed BLAKE3 of a blob's plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.chunk_id, data).as_bytes())
    }

    /// Keyed BLAKE3 of a whole segment, for parent reuse.
    pub fn segment_digest(&self, data: &[u8]) -> SegmentDigest {
        SegmentDigest(*blake3::keyed_hash(&self.segment_digest, data).as_bytes())
    }

    pub fn config_mac(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.config_mac, data).as_bytes()
    }

    pub fn gear(&self) -> &[u64; 256] {
        &self.gear
    }

    /// `nonce || ciphertext || tag` of `plaintext`, authenticated with `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, FormatError> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ct = self
            .aead
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .map_err(|_| FormatError::InvalidParameter("encryption failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// A sealed object: `magic || seal(plain, aad = magic)` (manifests, locks, GC records).
    pub fn seal_object(&self, magic: &[u8; 8], plain: &[u8]) -> Result<Vec<u8>, FormatError> {
        let mut out = magic.to_vec();
        out.extend_from_slice(&self.seal(plain, magic)?);
        Ok(out)
    }

    /// Opens what [`Keys::seal_object`] produced; `what` names the object kind in errors.
    pub fn open_object(&self, magic: &[u8; 8], bytes: &[u8], what: &str) -> Result<Vec<u8>, FormatError> {
        if bytes.len() < 8 || bytes[..8] != magic[..] {
            return Err(FormatError::Corrupt(format!("{what} magic missing")));
        }
        self.open(&bytes[8..], magic).ok_or_else(|| FormatError::Corrupt(format!("{what} fails authentication")))
    }

    /// Opens what [`Keys::seal`] produced; `None` when it fails authentication.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.aead.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad }).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let m = MasterKey::generate();
        let kf = KeyFile::wrap(&m, b"pw", KdfParams::insecure_for_tests()).unwrap();
        let bytes = kf.to_bytes().unwrap();
        let kf2 = KeyFile::from_bytes(&bytes).unwrap();
        assert_eq!(kf2.unwrap_key(b"pw").unwrap().unwrap().0, m.0);
        assert!(kf2.unwrap_key(b"wrong").unwrap().is_none());
        assert!(!format!("{m:?}").contains(&hex::encode(m.0)));
    }

    #[test]
    fn seal_open_detects_every_flipped_bit_position() {
        let k = Keys::derive(&MasterKey::generate());
        let s = k.seal(b"hello world", b"aad").unwrap();
        assert_eq!(k.open(&s, b"aad").unwrap(), b"hello world");
        assert!(k.open(&s, b"other").is_none());
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 0x10;
            assert!(k.open(&t, b"aad").is_none(), "flip at {i} not detected");
        }
    }
}
