//! The connection passphrase: generating it, deriving the MAC key from it, and the two proofs of
//! the registration handshake. The passphrase itself never leaves the process that read it; only
//! keyed MACs over fresh nonces cross the wire.
use rand::Rng;

/// Characters of a generated passphrase: no look-alikes (0/O, 1/l/I), easy to read aloud.
const ALPHABET: &[u8] = b"23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ";
/// 32 characters of a 55-letter alphabet: about 185 bits of entropy.
const LENGTH: usize = 32;
/// Length of nonces used in the handshake.
pub const NONCE_LEN: usize = 32;

/// Generates a new passphrase from the operating system's random source.
pub fn generate() -> String {
    let mut rng = rand::rng();
    (0..LENGTH)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A fresh random nonce.
pub fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; NONCE_LEN];
    rand::rng().fill(&mut n[..]);
    n
}

/// Key derived from a passphrase; what both sides of the handshake MAC with.
#[derive(Clone)]
pub struct PassphraseKey([u8; 32]);

impl std::fmt::Debug for PassphraseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PassphraseKey(..)")
    }
}

/// Field separator that cannot be confused with content: every field is length-prefixed.
fn mac(key: &PassphraseKey, context: &str, fields: &[&[u8]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(&key.0);
    hasher.update(context.as_bytes());
    for field in fields {
        hasher.update(&(field.len() as u64).to_be_bytes());
        hasher.update(field);
    }
    *hasher.finalize().as_bytes()
}

fn constant_time_eq(expected: [u8; 32], got: &[u8]) -> bool {
    // blake3::Hash equality is constant time.
    match <[u8; 32]>::try_from(got) {
        Ok(got) => blake3::Hash::from(expected) == blake3::Hash::from(got),
        Err(_) => false,
    }
}

impl PassphraseKey {
    /// Derives the key; surrounding whitespace (a trailing newline in a file) is ignored.
    pub fn derive(passphrase: &str) -> Self {
        PassphraseKey(blake3::derive_key(
            "lifeboat 2026 connection passphrase v1",
            passphrase.trim().as_bytes(),
        ))
    }

    /// The component's proof, bound to the server's single-use nonce and to the exact request.
    pub fn registration_proof(
        &self,
        server_nonce: &[u8],
        client_nonce: &[u8],
        role: &str,
        name: &str,
        csr_der: &[u8],
    ) -> Vec<u8> {
        mac(
            self,
            "lifeboat registration proof",
            &[
                server_nonce,
                client_nonce,
                role.as_bytes(),
                name.as_bytes(),
                csr_der,
            ],
        )
        .to_vec()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn verify_registration_proof(
        &self,
        server_nonce: &[u8],
        client_nonce: &[u8],
        role: &str,
        name: &str,
        csr_der: &[u8],
        proof: &[u8],
    ) -> bool {
        let expected = mac(
            self,
            "lifeboat registration proof",
            &[
                server_nonce,
                client_nonce,
                role.as_bytes(),
                name.as_bytes(),
                csr_der,
            ],
        );
        constant_time_eq(expected, proof)
    }

    /// The server's proof that it knows the passphrase too, over what the component will trust.
    pub fn server_proof(&self, client_nonce: &[u8], ca_pem: &str, cert_pem: &str) -> Vec<u8> {
        mac(
            self,
            "lifeboat server proof",
            &[client_nonce, ca_pem.as_bytes(), cert_pem.as_bytes()],
        )
        .to_vec()
    }

    pub fn verify_server_proof(
        &self,
        client_nonce: &[u8],
        ca_pem: &str,
        cert_pem: &str,
        proof: &[u8],
    ) -> bool {
        let expected = mac(
            self,
            "lifeboat server proof",
            &[client_nonce, ca_pem.as_bytes(), cert_pem.as_bytes()],
        );
        constant_time_eq(expected, proof)
    }
}

/// What the registration proof covers as the name: the name, and the identity it replaces if
/// any (so that claim cannot be changed on the way). A new component's is its name alone.
pub fn proof_name(name: &str, replaces: &str) -> String {
    if replaces.is_empty() {
        name.to_string()
    } else {
        format!("{name}\0replaces {replaces}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passphrases_differ_and_use_the_alphabet() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), LENGTH);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
    }

    #[test]
    fn proofs_verify_only_with_the_same_passphrase_and_fields() {
        let key = PassphraseKey::derive("correct horse\n");
        let same = PassphraseKey::derive("correct horse");
        let other = PassphraseKey::derive("wrong horse");
        let proof = key.registration_proof(b"sn", b"cn", "agent", "web01", b"csr");
        assert!(same.verify_registration_proof(b"sn", b"cn", "agent", "web01", b"csr", &proof));
        assert!(!other.verify_registration_proof(b"sn", b"cn", "agent", "web01", b"csr", &proof));
        assert!(!key.verify_registration_proof(b"sn2", b"cn", "agent", "web01", b"csr", &proof));
        assert!(!key.verify_registration_proof(b"sn", b"cn", "admin", "web01", b"csr", &proof));
        assert!(!key.verify_registration_proof(
            b"sn",
            b"cn",
            "agent",
            "web01",
            b"csr",
            &proof[..5]
        ));
        let sp = key.server_proof(b"cn", "ca", "cert");
        assert!(same.verify_server_proof(b"cn", "ca", "cert", &sp));
        assert!(!other.verify_server_proof(b"cn", "ca", "cert", &sp));
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let key = PassphraseKey::derive("p");
        assert_ne!(
            key.registration_proof(b"ab", b"c", "r", "n", b""),
            key.registration_proof(b"a", b"bc", "r", "n", b"")
        );
    }
}
