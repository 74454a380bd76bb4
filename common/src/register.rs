//! The component side of registration: prove the passphrase, get a certificate, check the
//! server's proof, pin the CA. See DESIGN §5 and `passphrase` for the proofs.
use crate::identity::{Identity, IdentityInfo};
use crate::passphrase::{self, PassphraseKey};
use crate::peer::peer_from_der;
use crate::role::Role;
use crate::tls;
use lifeboat_proto::v1::{self, bootstrap_client::BootstrapClient};
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("configuration server {server} rejected the passphrase: use the current connection passphrase (on the configuration server: `lifeboat passphrase show`, or DATA/private/connection.passphrase)")]
    PassphraseRejected { server: String },
    #[error("configuration server {server} is refusing registrations from this address for now after repeated failures: {detail}")]
    RateLimited { server: String, detail: String },
    #[error("configuration server {server} did not prove that it knows the passphrase; refusing to trust it (is the address right?)")]
    ServerNotProven { server: String },
    #[error("configuration server {server} refused the registration: {detail}")]
    Refused { server: String, detail: String },
    #[error("no configuration server reachable: {0}")]
    Unreachable(String),
    #[error("registration failed: {0}")]
    Other(String),
}

/// What a component asks for.
pub struct Registration<'a> {
    pub cs_addresses: &'a [String],
    pub passphrase: &'a str,
    pub role: Role,
    pub name: &'a str,
    pub facts: v1::ComponentFacts,
    /// The identity this one replaces (see `RegisterRequest.replaces`); empty if none.
    pub replaces: &'a str,
}

/// Registers with the first reachable configuration server and returns the new identity
/// (not yet saved).
pub async fn register(reg: Registration<'_>) -> Result<Identity, RegisterError> {
    let mut unreachable = Vec::new();
    for server in reg.cs_addresses {
        match register_with(server, &reg).await {
            Err(RegisterError::Unreachable(detail)) => unreachable.push(detail),
            other => return other,
        }
    }
    Err(RegisterError::Unreachable(unreachable.join("; ")))
}

async fn register_with(server: &str, reg: &Registration<'_>) -> Result<Identity, RegisterError> {
    let channel = tls::bootstrap_channel(server)
        .await
        .map_err(|e| RegisterError::Unreachable(format!("{server}: {e}")))?;
    let mut client = BootstrapClient::new(channel);
    let challenge = client
        .challenge(v1::ChallengeRequest {})
        .await
        .map_err(|s| status_error(server, s))?
        .into_inner();

    let key = rcgen::KeyPair::generate().map_err(|e| RegisterError::Other(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| RegisterError::Other(e.to_string()))?;
    let csr_der = csr.der().to_vec();
    let client_nonce = passphrase::nonce();
    let pkey = PassphraseKey::derive(reg.passphrase);
    let proof = pkey.registration_proof(
        &challenge.server_nonce,
        &client_nonce,
        reg.role.as_str(),
        &passphrase::proof_name(reg.name, reg.replaces),
        &csr_der,
    );
    let response = client
        .register(v1::RegisterRequest {
            role: reg.role.to_proto() as i32,
            name: reg.name.to_string(),
            csr_der,
            server_nonce: challenge.server_nonce,
            client_nonce: client_nonce.clone(),
            proof,
            facts: Some(reg.facts.clone()),
            replaces: reg.replaces.to_string(),
        })
        .await
        .map_err(|s| status_error(server, s))?
        .into_inner();

    if !pkey.verify_server_proof(
        &client_nonce,
        &response.ca_pem,
        &response.certificate_pem,
        &response.server_proof,
    ) {
        return Err(RegisterError::ServerNotProven {
            server: server.to_string(),
        });
    }
    check_certificate(&response, reg.role)?;
    let mut cs_addresses = response.cs_addresses.clone();
    if cs_addresses.is_empty() {
        cs_addresses = reg.cs_addresses.to_vec();
    }
    Ok(Identity {
        info: IdentityInfo {
            id: response.identity_id.clone(),
            role: reg.role,
            name: reg.name.to_string(),
            cs_addresses,
            node_id: response.node_id,
            heartbeat_interval_secs: response.heartbeat_interval_secs.max(1),
        },
        cert_pem: response.certificate_pem,
        key_pem: key.serialize_pem(),
        ca_pem: response.ca_pem,
    })
}

/// The issued certificate must say what we asked for.
fn check_certificate(response: &v1::RegisterResponse, role: Role) -> Result<(), RegisterError> {
    let pem = rustls_pemfile::certs(&mut response.certificate_pem.as_bytes())
        .next()
        .ok_or_else(|| RegisterError::Other("server returned no certificate".into()))?
        .map_err(|e| RegisterError::Other(format!("unreadable certificate: {e}")))?;
    let peer = peer_from_der(&pem).map_err(RegisterError::Other)?;
    if peer.role != role || peer.id != response.identity_id {
        return Err(RegisterError::Other(format!(
            "server issued a certificate for {} {} instead of {} {}",
            peer.role, peer.id, role, response.identity_id
        )));
    }
    Ok(())
}

fn status_error(server: &str, status: tonic::Status) -> RegisterError {
    let server = server.to_string();
    match status.code() {
        Code::PermissionDenied => RegisterError::PassphraseRejected { server },
        Code::ResourceExhausted => RegisterError::RateLimited {
            server,
            detail: status.message().to_string(),
        },
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown => {
            RegisterError::Unreachable(format!("{server}: {}", status.message()))
        }
        _ => RegisterError::Refused {
            server,
            detail: status.message().to_string(),
        },
    }
}
