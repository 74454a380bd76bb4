//! Who is calling: the identity id and role carried by a verified client certificate.
//! TLS has already checked the chain against the cluster CA; this reads the leaf's subject.
use crate::record_layer::TlsPeer;
use crate::role::Role;
use std::net::SocketAddr;
use tonic::{Request, Status};
use x509_parser::prelude::*;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    pub role: Role,
}

/// Reads id (common name) and role (organizational unit) from a DER certificate.
pub fn peer_from_der(der: &[u8]) -> Result<Peer, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let id = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("certificate has no common name")?
        .to_string();
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .ok_or("certificate has no role (organizational unit)")?
        .parse::<Role>()?;
    Ok(Peer { id, role })
}

/// The connection `request` came on, as `record_layer` describes it to the server.
fn connection<T>(request: &Request<T>) -> Option<&TlsPeer> {
    request.extensions().get::<TlsPeer>()
}

/// The address `request` came from.
pub fn remote_addr<T>(request: &Request<T>) -> Option<SocketAddr> {
    connection(request).and_then(|c| c.remote)
}

/// The caller of `request`, or UNAUTHENTICATED if it presented no certificate.
pub fn peer_of<T>(request: &Request<T>) -> Result<Peer, Status> {
    let certs = connection(request)
        .and_then(|c| c.certs.as_ref())
        .ok_or_else(|| {
            Status::unauthenticated(
                "this call needs a client certificate: register the component first",
            )
        })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    peer_from_der(leaf.as_ref()).map_err(Status::unauthenticated)
}

/// The caller, if it has one of the `allowed` roles; PERMISSION_DENIED otherwise.
pub fn require_role<T>(request: &Request<T>, allowed: &[Role]) -> Result<Peer, Status> {
    let peer = peer_of(request)?;
    if allowed.contains(&peer.role) {
        Ok(peer)
    } else {
        Err(Status::permission_denied(format!(
            "a {} may not make this call",
            peer.role
        )))
    }
}
