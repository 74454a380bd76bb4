//! One direction's traffic keys of a TLS 1.3 connection: the AEAD key, the IV and the record
//! sequence number, which together give each record's nonce (RFC 8446 §5.3). Records are
//! sealed from the sender's memory into the outgoing buffer, and opened from the incoming
//! buffer into the reader's memory: the AEAD pass is the only pass over the bytes.
use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;
use std::io;

/// Bytes of the AEAD tag at the end of every record (all TLS 1.3 suites).
pub const TAG_LEN: usize = 16;

pub struct TrafficKeys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

fn bad_record() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a TLS record failed authentication (bad_record_mac): the connection is broken",
    )
}

impl TrafficKeys {
    /// The keys rustls derived, starting at record number `seq`.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<TrafficKeys> {
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(io::Error::other("unsupported TLS cipher suite")),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| io::Error::other("unusable TLS traffic key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("unusable TLS traffic IV"))?;
        Ok(TrafficKeys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// Records sealed or opened with these keys so far (the next record's number).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The next record's nonce: the IV XORed with its sequence number (RFC 8446 §5.3).
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(nonce)
    }

    /// Seals `content` followed by its `content_type` byte into `out`, which must be
    /// `content.len() + 1 + TAG_LEN` bytes, authenticating the record `header`.
    pub fn seal(
        &mut self,
        header: &[u8; 5],
        content: &[u8],
        content_type: u8,
        out: &mut [u8],
    ) -> io::Result<()> {
        let nonce = self.next_nonce();
        let (ciphertext, type_and_tag) = out.split_at_mut(content.len());
        self.key
            .seal_out_of_place_scatter(
                nonce,
                Aad::from(header),
                content,
                ciphertext,
                &[content_type],
                type_and_tag,
            )
            .map_err(|_| io::Error::other("sealing a TLS record failed"))
    }

    /// Opens a record's `body` (ciphertext and tag) into `out`, which must be
    /// `body.len() - TAG_LEN` bytes. On failure `out` holds garbage; the caller must not use it.
    pub fn open_into(&mut self, header: &[u8; 5], body: &[u8], out: &mut [u8]) -> io::Result<()> {
        let nonce = self.next_nonce();
        let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
        self.key
            .open_separate_gather(nonce, Aad::from(header), ciphertext, tag, out)
            .map_err(|_| bad_record())
    }

    /// Opens a record's `body` in place; its first `body.len() - TAG_LEN` bytes are then the
    /// inner plaintext.
    pub fn open_in_place(&mut self, header: &[u8; 5], body: &mut [u8]) -> io::Result<()> {
        let nonce = self.next_nonce();
        self.key
            .open_in_place(nonce, Aad::from(header), body)
            .map(|_| ())
            .map_err(|_| bad_record())
    }
}
