//! Keys: a random master key, wrapped by a password-derived key (argon2id) in key files;
//! subkeys derived from it with BLAKE3 `derive_key` for chunk ids, the gear table, blob
//! AEAD (XChaCha20-Poly1305, random 192-bit nonces) and the config MAC.
//! Secrets are zeroized on drop and never printed.
//!
//! XChaCha20-Poly1305 is built from its two halves (draft-irtf-cfrg-xchacha): HChaCha20
//! (`chacha20`) derives a subkey from the key and the first 16 nonce bytes, then ring's
//! ChaCha20-Poly1305 (assembly, about twice RustCrypto's speed here) seals with the last 8
//! nonce bytes. The output is byte-identical to RustCrypto's `XChaCha20Poly1305` (a test
//! checks it against that crate), so repositories written before stay readable.

use crate::error::FormatError;
use crate::file_formats::*;
use crate::id::{ChunkId, SegmentDigest};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
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
    /// The most memory (512 MiB: eight times the default, half the DaemonSet's 1 GiB
    /// limit), passes (16) and lanes (8) a key file may ask for: key files are read before
    /// anything is authenticated, so a store writer without the key must not make opening
    /// a repository kill the daemon (and its restarts: a crash loop).
    pub const MAX_M_COST_KIB: u32 = 512 << 10;
    pub const MAX_T_COST: u32 = 16;
    pub const MAX_P_COST: u32 = 8;

    /// Refuses parameters beyond the bounds (and ones argon2 rejects).
    pub fn check(&self) -> Result<(), FormatError> {
        if self.m_cost_kib > Self::MAX_M_COST_KIB || self.t_cost > Self::MAX_T_COST || self.p_cost > Self::MAX_P_COST || self.t_cost == 0 || self.p_cost == 0 {
            return Err(FormatError::InvalidParameter(format!(
                "key derivation parameters {} KiB, {} passes, {} lanes are outside the bounds Mover accepts ({} KiB, {} passes, {} lanes)",
                self.m_cost_kib,
                self.t_cost,
                self.p_cost,
                Self::MAX_M_COST_KIB,
                Self::MAX_T_COST,
                Self::MAX_P_COST
            )));
        }
        Ok(())
    }

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
        params.check()?;
        let salt: [u8; 32] = rand::random();
        let kek = derive_kek(password, &salt, &params)?;
        // Holds the master key until sealed in place; zeroized on every path out.
        let mut sealed = Zeroizing::new(Vec::with_capacity(NONCE_LEN + 32 + TAG_LEN));
        sealed.resize(NONCE_LEN, 0);
        sealed.extend_from_slice(&master.0);
        xseal_in_place(&kek, &mut sealed, KEY_WRAP_AAD)?;
        let (nonce, wrapped) = (sealed[..NONCE_LEN].to_vec(), sealed[NONCE_LEN..].to_vec());
        Ok(Self {
            version: 1,
            kdf: "argon2id".into(),
            params,
            salt: salt.to_vec(),
            nonce,
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
        self.params.check()?;
        if self.salt.len() < 8 || self.salt.len() > 64 || self.wrapped.len() != 32 + TAG_LEN {
            return Err(FormatError::Corrupt(format!("key file salt of {} bytes, wrapped key of {} bytes", self.salt.len(), self.wrapped.len())));
        }
        let kek = derive_kek(password, &self.salt, &self.params)?;
        let mut buf = Zeroizing::new([&self.nonce[..], &self.wrapped[..]].concat());
        match xopen_in_place(&kek, &mut buf, KEY_WRAP_AAD) {
            Some(pt) => {
                let arr: [u8; 32] = pt.try_into().map_err(|_| FormatError::Corrupt("wrapped key has the wrong length".into()))?;
                Ok(Some(MasterKey(arr)))
            }
            None => Ok(None),
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
    aead: Zeroizing<[u8; 32]>,
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
            aead: Zeroizing::new(blake3::derive_key(CTX_AEAD, &master.0)),
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
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.resize(NONCE_LEN, 0);
        out.extend_from_slice(plaintext);
        self.seal_in_place(&mut out, aad)?;
        Ok(out)
    }

    /// Seals `buf[NONCE_LEN..]` in place: fills `buf[..NONCE_LEN]` with a fresh random
    /// nonce, encrypts the rest and appends the tag (`nonce || ciphertext || tag`).
    pub fn seal_in_place(&self, buf: &mut Vec<u8>, aad: &[u8]) -> Result<(), FormatError> {
        xseal_in_place(&self.aead, buf, aad)
    }

    /// A sealed object: `magic || seal(plain, aad = magic)` (manifests, locks, GC records).
    pub fn seal_object(&self, magic: &[u8; 8], plain: &[u8]) -> Result<Vec<u8>, FormatError> {
        let mut out = magic.to_vec();
        out.extend_from_slice(&self.seal(plain, magic)?);
        Ok(out)
    }

    /// [`Keys::seal_object`] of `value` as JSON; `what` names the object kind in errors.
    pub fn seal_json<T: Serialize>(&self, magic: &[u8; 8], value: &T, what: &str) -> Result<Vec<u8>, FormatError> {
        let json = serde_json::to_vec(value).map_err(|e| FormatError::Corrupt(format!("encoding {what}: {e}")))?;
        self.seal_object(magic, &json)
    }

    /// Opens what [`Keys::seal_json`] produced.
    pub fn open_json<T: serde::de::DeserializeOwned>(&self, magic: &[u8; 8], bytes: &[u8], what: &str) -> Result<T, FormatError> {
        let json = self.open_object(magic, bytes, what)?;
        serde_json::from_slice(&json).map_err(|e| FormatError::Corrupt(format!("{what}: {e}")))
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
        let mut buf = sealed.to_vec();
        let n = self.open_in_place(&mut buf, aad)?.len();
        buf.truncate(NONCE_LEN + n);
        buf.drain(..NONCE_LEN);
        Some(buf)
    }

    /// Opens `nonce || ciphertext || tag` in place; the plaintext, or `None` when it fails
    /// authentication (the buffer's contents are then unspecified).
    pub fn open_in_place<'a>(&self, buf: &'a mut [u8], aad: &[u8]) -> Option<&'a mut [u8]> {
        xopen_in_place(&self.aead, buf, aad)
    }
}

/// The ChaCha20-Poly1305 key and 96-bit nonce that XChaCha20-Poly1305 uses for `nonce`.
fn xchacha_parts(key: &[u8; 32], nonce: &[u8]) -> (LessSafeKey, Nonce) {
    use chacha20::cipher::consts::U10;
    let mut sub = chacha20::hchacha::<U10>(key.into(), nonce[..16].into());
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, sub.as_slice());
    sub.as_mut_slice().zeroize();
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&nonce[16..NONCE_LEN]);
    // UnboundKey::new only fails for a key of the wrong length; ours is 32 bytes.
    (LessSafeKey::new(unbound.unwrap_or_else(|_| unreachable!("ChaCha20 key is 32 bytes"))), Nonce::assume_unique_for_key(n))
}

/// XChaCha20-Poly1305 seal of `buf[NONCE_LEN..]` with a random nonce written to the front.
fn xseal_in_place(key: &[u8; 32], buf: &mut Vec<u8>, aad: &[u8]) -> Result<(), FormatError> {
    if buf.len() < NONCE_LEN {
        return Err(FormatError::InvalidParameter("seal buffer has no room for the nonce".into()));
    }
    let nonce: [u8; NONCE_LEN] = rand::random();
    buf[..NONCE_LEN].copy_from_slice(&nonce);
    let (k, n) = xchacha_parts(key, &nonce);
    let tag = k.seal_in_place_separate_tag(n, Aad::from(aad), &mut buf[NONCE_LEN..]).map_err(|_| FormatError::InvalidParameter("encryption failed".into()))?;
    buf.extend_from_slice(tag.as_ref());
    Ok(())
}

/// XChaCha20-Poly1305 open of `nonce || ciphertext || tag` in place.
fn xopen_in_place<'a>(key: &[u8; 32], buf: &'a mut [u8], aad: &[u8]) -> Option<&'a mut [u8]> {
    if buf.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
    let (ct, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
    let tag: [u8; TAG_LEN] = (&*tag).try_into().ok()?;
    let (k, n) = xchacha_parts(key, nonce);
    k.open_in_place_separate_tag(n, Aad::from(aad), Tag::from(tag), ct, 0..).ok()
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

    /// Ours is XChaCha20-Poly1305 exactly: the reference crate opens what we seal and we
    /// open what it seals, for every length around the ChaCha block and SIMD widths.
    #[test]
    fn matches_reference_xchacha20poly1305() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let k = Keys::derive(&MasterKey::generate());
        let reference = chacha20poly1305::XChaCha20Poly1305::new((&*k.aead).into());
        let mut data = vec![0u8; 2100];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        for len in (0..600).chain([1023, 1024, 1025, 2047, 2048, 2100]) {
            let pt = &data[..len];
            let ours = k.seal(pt, b"aad").unwrap();
            let (nonce, ct) = ours.split_at(NONCE_LEN);
            let theirs = reference.encrypt(nonce.into(), Payload { msg: pt, aad: b"aad" }).unwrap();
            assert_eq!(ct, &theirs[..], "length {len}");
            let nonce: [u8; NONCE_LEN] = rand::random();
            let theirs = reference.encrypt((&nonce).into(), Payload { msg: pt, aad: b"x" }).unwrap();
            assert_eq!(k.open(&[&nonce[..], &theirs[..]].concat(), b"x").unwrap(), pt, "length {len}");
        }
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
