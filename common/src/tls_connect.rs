//! The client end of Lifeboat's TLS connections: rustls client configurations (mutual TLS
//! against the cluster CA; the unverified one registration uses) and the connector that opens
//! TCP, runs the handshake and hands the stream to a tonic channel.
//!
//! tonic could do the TLS itself (`ClientTlsConfig`), but its records would go through
//! rustls's buffered streams; after the handshake Lifeboat's connections seal and open their
//! records in `record_layer`, which moves each byte fewer times.
use crate::record_layer::TlsConnection;
use crate::role::Role;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::ClientConfig;
use std::io;
use std::sync::Arc;
use tokio::net::TcpStream;
use tonic::transport::Uri;

/// A client configuration that trusts only `ca_pem` and presents `cert_pem`/`key_pem`.
pub fn mutual_tls_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<ClientConfig> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(cluster_roots(ca_pem)?)
        .with_client_auth_cert(pem_certs(cert_pem, "certificate")?, pem_key(key_pem)?)?;
    Ok(with_h2(config))
}

/// The process-wide crypto provider if one was installed, aws-lc-rs otherwise (as tonic does),
/// preferring AES-128-GCM. Every byte of replicated data crosses two TLS connections, each
/// encrypting and decrypting it once, so the cipher is a large part of the data path's CPU:
/// AES-128-GCM took 15% less time than AES-256-GCM on the benchmark VM (`openssl speed`,
/// 16 KiB records: 6.7 against 5.7 GB/s), and its 128-bit key is what TLS 1.3 requires every
/// implementation to support. Lifeboat's servers (`tls::server_config`) use this provider
/// too, and a rustls server follows the client's order, so the client's preference decides.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::CryptoProvider::get_default()
        .map(|p| p.as_ref().clone())
        .unwrap_or_else(rustls::crypto::aws_lc_rs::default_provider);
    // A stable sort: the other suites keep their order.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The trust anchors of a cluster: its CA certificate(s), as PEM. Servers verify client
/// certificates against them, clients server certificates.
pub(crate) fn cluster_roots(ca_pem: &str) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certs(ca_pem, "CA certificate")? {
        roots
            .add(ca)
            .map_err(|e| anyhow::anyhow!("the cluster CA certificate is not usable: {e}"))?;
    }
    Ok(roots)
}

/// The TLS versions Lifeboat speaks: 1.3 only, the one `record_layer` implements.
pub const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// `config` offering HTTP/2 by ALPN, which gRPC servers expect, and handing its traffic keys
/// to `record_layer` after the handshake.
pub fn with_h2(mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_secret_extraction = true;
    config
}

pub(crate) fn pem_certs(pem: &str, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("reading the identity's {what}: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("the identity holds no {what}");
    }
    Ok(certs)
}

/// A tower service a tonic `Endpoint` connects through: TCP to `address` (no Nagle delay), the
/// TLS handshake under `config` expecting the certificate name of `server_role`, then the
/// record layer. The endpoint's URI is ignored (its scheme must be `http`, since TLS is done
/// here).
pub fn connector(
    config: Arc<ClientConfig>,
    address: &str,
    server_role: Role,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<TlsConnection>,
    Error = io::Error,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    let address = address.to_string();
    tower::service_fn(move |_: Uri| {
        let config = config.clone();
        let address = address.clone();
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server_role.server_name())
                .map_err(io::Error::other)?
                .to_owned();
            let tls = TlsConnection::connect(tcp, name, config).await?;
            if tls.alpn_protocol() != Some(b"h2") {
                return Err(io::Error::other(format!(
                    "{address} did not agree to HTTP/2: is it a Lifeboat {server_role}?"
                )));
            }
            Ok(TokioIo::new(tls))
        }
    })
}

pub(crate) fn pem_key(key_pem: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("reading the identity's private key: {e}"))?
        .ok_or_else(|| anyhow::anyhow!("the identity holds no private key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::pem::PemObject;
    use tower::ServiceExt;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `name` signed by `ca`, and its key, as PEM.
    fn leaf(ca: &Ca, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A TLS server presenting `cert`, offering HTTP/2 by ALPN if `h2`, with rustls's stock
    /// aws-lc-rs provider (as tonic's servers have); handshakes until the test ends. Returns
    /// its address and the cipher suite of the last handshake.
    async fn server(
        cert: (String, String),
        h2: bool,
    ) -> (String, Arc<std::sync::Mutex<Option<rustls::CipherSuite>>>) {
        let chain = vec![CertificateDer::from_pem_slice(cert.0.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap();
        let stock = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(stock)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        if h2 {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let suite = Arc::new(std::sync::Mutex::new(None));
        let seen = suite.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        *seen.lock().unwrap() = stream
                            .get_ref()
                            .1
                            .negotiated_cipher_suite()
                            .map(|s| s.suite());
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        drop(stream);
                    }
                });
            }
        });
        (address, suite)
    }

    /// Connects as a client of the cluster whose CA is `ca`, expecting a `role` server.
    async fn connect(ca: &Ca, address: &str, role: Role) -> io::Result<()> {
        let (cert, key) = leaf(ca, Role::Agent.server_name());
        let config = Arc::new(mutual_tls_config(&ca.pem, &cert, &key).unwrap());
        let uri = Uri::from_static("http://ignored");
        connector(config, address, role)
            .oneshot(uri)
            .await
            .map(drop)
    }

    #[tokio::test]
    async fn only_a_server_of_the_expected_role_under_the_cluster_ca_is_accepted() {
        let cluster = ca();
        let (ps, _) = server(leaf(&cluster, Role::ProcessServer.server_name()), true).await;
        connect(&cluster, &ps, Role::ProcessServer).await.unwrap();
        // Another role's certificate from the same CA: not the server that was asked for.
        let err = connect(&cluster, &ps, Role::MasterTarget)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        // The right name, signed by another cluster's CA.
        let other = ca();
        let (foreign, _) = server(leaf(&other, Role::ProcessServer.server_name()), true).await;
        let err = connect(&cluster, &foreign, Role::ProcessServer)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        // A TLS server that does not speak HTTP/2.
        let (plain, _) = server(leaf(&cluster, Role::ProcessServer.server_name()), false).await;
        let err = connect(&cluster, &plain, Role::ProcessServer)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("HTTP/2"), "{err}");
    }

    #[tokio::test]
    async fn connections_use_aes_128_gcm_even_with_a_server_preferring_aes_256() {
        let cluster = ca();
        let (ps, suite) = server(leaf(&cluster, Role::ProcessServer.server_name()), true).await;
        connect(&cluster, &ps, Role::ProcessServer).await.unwrap();
        // The server records the suite just after its side of the handshake.
        for _ in 0..100 {
            if suite.lock().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            *suite.lock().unwrap(),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }

    #[test]
    fn an_identity_without_a_key_or_certificate_is_refused() {
        let cluster = ca();
        let (cert, key) = leaf(&cluster, Role::Agent.server_name());
        assert!(mutual_tls_config(&cluster.pem, &cert, "").is_err());
        assert!(mutual_tls_config(&cluster.pem, "", &key).is_err());
        assert!(mutual_tls_config("", &cert, &key).is_err());
    }
}
