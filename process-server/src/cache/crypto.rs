//! Encryption at rest of the process server cache: AES-256-GCM with a key only this process
//! server holds (`DATA/private/cache.key`, 0600, made on first use). Each record's nonce is the
//! segment's random 64-bit salt followed by the record's 32-bit index in the segment, so a
//! nonce is never reused under the key (segments never exceed 2^32 records). The record's
//! disk id, sequence number and flags are authenticated with it, so a record cannot be moved
//! to another disk or position unnoticed.
use super::gcm_stream::{self, GcmStream};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use prost::Message;
use std::io;
use std::path::Path;

pub const TAG_LEN: usize = gcm_stream::TAG_LEN;

pub struct CacheKey {
    aead: LessSafeKey,
    /// The same key for `gcm_stream`, which seals records as they are encoded.
    raw: [u8; gcm_stream::KEY_LEN],
}

impl CacheKey {
    /// Loads the key, or makes one if the file does not exist.
    pub fn load_or_create(path: &Path) -> io::Result<CacheKey> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| io::Error::other("no random source"))?;
                if let Some(dir) = path.parent() {
                    lifeboat_common::fsutil::create_private_dir(dir)?;
                }
                lifeboat_common::fsutil::write_private(path, &key)?;
                key.to_vec()
            }
            Err(e) => return Err(e),
        };
        Self::from_bytes(&bytes).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a 32-byte key", path.display()),
            )
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<CacheKey> {
        let raw = bytes.try_into().ok()?;
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).ok()?);
        Some(CacheKey { aead, raw })
    }

    fn nonce_bytes(salt: u64, index: u32) -> [u8; gcm_stream::NONCE_LEN] {
        let mut n = [0u8; gcm_stream::NONCE_LEN];
        n[..8].copy_from_slice(&salt.to_be_bytes());
        n[8..].copy_from_slice(&index.to_be_bytes());
        n
    }

    fn nonce(salt: u64, index: u32) -> Nonce {
        Nonce::assume_unique_for_key(Self::nonce_bytes(salt, index))
    }

    /// Encodes `message` sealed into `out` (exactly its encoded length); returns the tag.
    /// The same bytes as encoding it and then `seal`, without the copy in between.
    pub fn seal_encoding(
        &self,
        salt: u64,
        index: u32,
        aad: &[u8],
        message: &impl Message,
        out: &mut [u8],
    ) -> io::Result<[u8; TAG_LEN]> {
        let nonce = Self::nonce_bytes(salt, index);
        let mut stream = GcmStream::new(&self.raw, &nonce, aad, out)?;
        message
            .encode(&mut stream)
            .map_err(|e| io::Error::other(format!("encoding a batch: {e}")))?;
        stream.finish()
    }

    /// Encrypts `plain` in place; returns the tag, which follows the ciphertext on disk.
    pub fn seal(
        &self,
        salt: u64,
        index: u32,
        aad: &[u8],
        plain: &mut [u8],
    ) -> io::Result<[u8; TAG_LEN]> {
        let tag = self
            .aead
            .seal_in_place_separate_tag(Self::nonce(salt, index), Aad::from(aad), plain)
            .map_err(|_| io::Error::other("encryption failed"))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts and authenticates; `None` if the record was altered.
    pub fn open(&self, salt: u64, index: u32, aad: &[u8], mut sealed: Vec<u8>) -> Option<Vec<u8>> {
        let len = self
            .aead
            .open_in_place(Self::nonce(salt, index), Aad::from(aad), &mut sealed)
            .ok()?
            .len();
        sealed.truncate(len);
        Some(sealed)
    }
}

/// A random salt for a new segment.
pub fn new_salt() -> io::Result<u64> {
    let mut s = [0u8; 8];
    SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| io::Error::other("no random source"))?;
    Ok(u64::from_be_bytes(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private").join("cache.key");
        let key = CacheKey::load_or_create(&path).unwrap();
        let again = CacheKey::load_or_create(&path).unwrap();
        let mut data = b"hello".to_vec();
        let tag = key.seal(1, 2, b"aad", &mut data).unwrap();
        data.extend_from_slice(&tag);
        assert_ne!(&data[..5], b"hello");
        assert_eq!(again.open(1, 2, b"aad", data.clone()).unwrap(), b"hello");
        assert!(
            again.open(1, 3, b"aad", data.clone()).is_none(),
            "wrong position"
        );
        assert!(
            again.open(1, 2, b"other", data.clone()).is_none(),
            "wrong disk/seq"
        );
        let mut flipped = data.clone();
        flipped[0] ^= 1;
        assert!(again.open(1, 2, b"aad", flipped).is_none());
        std::fs::write(&path, b"short").unwrap();
        assert!(CacheKey::load_or_create(&path).is_err());
    }
}
