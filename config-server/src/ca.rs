//! The cluster certificate authority: made by `init`, kept in the replicated state, used by
//! whichever node handles a registration to sign the component's certificate. The certificate
//! says who the holder is (common name = identity id) and what it may do (organizational
//! unit = role); the public key comes from the component's CSR, whose signature proves it holds
//! the private key.
use lifeboat_common::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Component certificates are valid this long.
const CERT_VALIDITY: Duration = Duration::days(5 * 365);
/// The CA is valid this long.
const CA_VALIDITY: Duration = Duration::days(20 * 365);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error("certificate authority error: {0}")]
    Internal(String),
}

fn internal(e: rcgen::Error) -> CaError {
    CaError::Internal(e.to_string())
}

pub struct CertificateAuthority {
    cert_pem: String,
    key: KeyPair,
}

impl CertificateAuthority {
    /// A new CA for `cluster_id`.
    pub fn generate(cluster_id: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(internal)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Lifeboat");
        dn.push(
            DnType::CommonName,
            format!("Lifeboat cluster CA {cluster_id}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(internal)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_string(),
            key: KeyPair::from_pem(key_pem).map_err(internal)?,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn params_for(role: Role, id: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Lifeboat");
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::CommonName, id);
        params.distinguished_name = dn;
        params.subject_alt_names = match rcgen::string::Ia5String::try_from(role.server_name()) {
            Ok(name) => vec![SanType::DnsName(name)],
            Err(_) => Vec::new(),
        };
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CERT_VALIDITY;
        params.serial_number = Some(random_serial());
        params
    }

    /// Signs a certificate for `role`/`id` with the public key of `csr_der`. Everything else in
    /// the CSR is ignored: the server, not the component, decides who it is.
    pub fn sign_csr(&self, csr_der: &[u8], role: Role, id: &str) -> Result<String, CaError> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
        let mut csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        csr.params = Self::params_for(role, id);
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(internal)?;
        Ok(csr.signed_by(&issuer).map_err(internal)?.pem())
    }

    /// Issues a certificate with a new key pair (for identities `init` makes itself).
    /// Returns (certificate PEM, private key PEM).
    pub fn issue(&self, role: Role, id: &str) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(internal)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(internal)?;
        let cert = Self::params_for(role, id)
            .signed_by(&key, &issuer)
            .map_err(internal)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// A new identity id for `role`: a short role prefix and 16 random hex digits.
pub fn new_identity_id(role: Role) -> String {
    let prefix = match role {
        Role::ConfigServer => "cs",
        Role::ProcessServer => "ps",
        Role::MasterTarget => "mt",
        Role::Agent => "ag",
        Role::Admin => "admin",
    };
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 8]>()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::peer::peer_from_der;

    fn der(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn signed_certificates_carry_role_and_id_not_what_the_csr_asked() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        asked
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "admin");
        let csr = asked.serialize_request(&key).unwrap();
        let pem = ca.sign_csr(csr.der(), Role::Agent, "ag-1").unwrap();
        let peer = peer_from_der(&der(&pem)).unwrap();
        assert_eq!(peer.role, Role::Agent);
        assert_eq!(peer.id, "ag-1");
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = CertificateAuthority::generate("test").unwrap();
        assert!(matches!(
            ca.sign_csr(b"not a csr", Role::Agent, "x"),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn reloaded_ca_still_signs() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let (cert, _key) = again.issue(Role::Admin, "admin-1").unwrap();
        assert_eq!(peer_from_der(&der(&cert)).unwrap().role, Role::Admin);
    }
}
