//! TLS for every connection: server configuration with optional client certificates (so the
//! bootstrap service works before a component has one), mutual-TLS client channels that verify
//! the server's role name against the pinned cluster CA, and the one unverified channel used to
//! register — whose server is authenticated afterwards by its passphrase proof instead. The
//! clients' TLS is done by `tls_connect`, not by tonic.
use crate::identity::Identity;
use crate::role::Role;
use crate::tls_connect;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long to wait for a TCP + TLS connection before trying the next address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 flow-control windows of every Lifeboat connection (see `serve::grpc_server`).
pub const STREAM_WINDOW: u32 = 32 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Largest HTTP/2 frame a Lifeboat server accepts (the protocol allows up to 16 MiB - 1).
pub const MAX_FRAME: u32 = 1024 * 1024;

/// Default deadline of one unary call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Server side: our certificate, and client certificates verified against the cluster CA when
/// presented. Calls that need one check for it (see `peer`). HTTP/2 by ALPN; no session
/// tickets (clients do not resume, and none need to be sent after the handshake); the traffic
/// keys go to `record_layer` after the handshake.
pub fn server_config(identity: &Identity) -> anyhow::Result<rustls::ServerConfig> {
    let provider = tls_connect::provider();
    let roots = Arc::new(tls_connect::cluster_roots(&identity.ca_pem)?);
    let clients = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| anyhow::anyhow!("verifying client certificates: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(tls_connect::PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(clients)
        .with_single_cert(
            tls_connect::pem_certs(&identity.cert_pem, "certificate")?,
            tls_connect::pem_key(&identity.key_pem)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.send_tls13_tickets = 0;
    config.enable_secret_extraction = true;
    Ok(config)
}

/// The endpoint settings of every client channel. The scheme is `http` because TLS is done by
/// the connector (`tls_connect`), not by tonic.
fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

/// A lazily connected mutual-TLS channel to a server of role `server_role`.
pub fn mtls_channel(
    identity: &Identity,
    address: &str,
    server_role: Role,
) -> anyhow::Result<Channel> {
    let config = mtls_config(identity)?;
    Ok(
        endpoint(address)?.connect_with_connector_lazy(tls_connect::connector(
            config,
            address,
            server_role,
        )),
    )
}

/// The client configuration of mutual TLS with this identity (see `tls_connect`).
fn mtls_config(identity: &Identity) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(tls_connect::mutual_tls_config(
        &identity.ca_pem,
        &identity.cert_pem,
        &identity.key_pem,
    )?))
}

/// Connects (eagerly: TCP and TLS now, not at the first call) to the first reachable address
/// among `addresses`, so a node that is down is skipped for the next one.
pub async fn mtls_connect_any(
    identity: &Identity,
    addresses: &[String],
    server_role: Role,
) -> anyhow::Result<(String, Channel)> {
    let config = mtls_config(identity)?;
    let mut errors = Vec::new();
    for address in addresses {
        let connector = tls_connect::connector(config.clone(), address, server_role);
        let endpoint = endpoint(address)?;
        match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect_with_connector(connector))
            .await
        {
            Ok(Ok(channel)) => return Ok((address.clone(), channel)),
            Ok(Err(e)) => errors.push(format!("{address}: {}", crate::error_chain(&e))),
            Err(_) => errors.push(format!("{address}: timed out")),
        }
    }
    anyhow::bail!(
        "no {server_role} reachable ({}); check the addresses and that the service runs",
        errors.join("; ")
    )
}

/// Registration channel: TLS without certificate verification. It carries only the nonce
/// exchange and the CSR; the CA it returns is trusted only after the server's passphrase proof
/// checks out, so an impostor learns nothing usable and gains nothing.
pub async fn bootstrap_channel(address: &str) -> anyhow::Result<Channel> {
    let provider = tls_connect::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(tls_connect::PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ProofChecksServer(provider)))
        .with_no_client_auth();
    let connect = tls_connect::connector(
        Arc::new(tls_connect::with_h2(config)),
        address,
        Role::ConfigServer,
    );
    let channel = endpoint(address)?
        .connect_with_connector(connect)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to configuration server {address}: {}",
                crate::error_chain(&e)
            )
        })?;
    Ok(channel)
}

/// Accepts any server certificate but still verifies handshake signatures, so the session key is
/// bound to whatever key the server showed.
#[derive(Debug)]
struct ProofChecksServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for ProofChecksServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
