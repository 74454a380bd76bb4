//! The record layer against itself and against rustls's own streams (tokio-rustls), which
//! speak standard TLS 1.3: bytes arrive intact and in order whatever the read and write sizes,
//! keys are updated in both directions, close_notify ends a stream, and a tampered record
//! breaks the connection instead of being read.
use super::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Certs {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn certs() -> Certs {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap().pem();
    let issuer = Issuer::new(params, key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Certs {
        server: leaf("server.lifeboat"),
        client: leaf("client.lifeboat"),
        ca,
    }
}

fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()]
}

/// Lifeboat's own servers' configuration (`tls::server_config`).
fn server_config(c: &Certs) -> Arc<rustls::ServerConfig> {
    let identity = crate::identity::Identity {
        info: crate::identity::IdentityInfo {
            id: "server".into(),
            role: crate::role::Role::ProcessServer,
            name: "server".into(),
            cs_addresses: Vec::new(),
            node_id: 0,
            heartbeat_interval_secs: 5,
        },
        cert_pem: c.server.0.clone(),
        key_pem: c.server.1.clone(),
        ca_pem: c.ca.clone(),
    };
    Arc::new(crate::tls::server_config(&identity).unwrap())
}

/// A stock rustls server's configuration, which sends session tickets after the handshake.
fn stock_server_config(c: &Certs) -> Arc<rustls::ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(chain(&c.ca).remove(0)).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            chain(&c.server.0),
            PrivateKeyDer::from_pem_slice(c.server.1.as_bytes()).unwrap(),
        )
        .unwrap();
    Arc::new(config)
}

fn client_config(c: &Certs) -> Arc<rustls::ClientConfig> {
    let config = crate::tls_connect::mutual_tls_config(&c.ca, &c.client.0, &c.client.1).unwrap();
    Arc::new(config)
}

fn name() -> ServerName<'static> {
    ServerName::try_from("server.lifeboat").unwrap()
}

/// A connected pair: (client, server), both record-layer connections.
async fn pair(c: &Certs) -> (TlsConnection, TlsConnection) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = server_config(c);
    let server = tokio::spawn(async move {
        let (tcp, remote) = listener.accept().await.unwrap();
        TlsConnection::accept(tcp, Some(remote), config)
            .await
            .unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = TlsConnection::connect(tcp, name(), client_config(c))
        .await
        .unwrap();
    (client, server.await.unwrap())
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// Writes `data` in pieces of `write` bytes (vectored, several per call), then shuts down.
async fn send(mut w: impl AsyncWrite + Unpin, data: Vec<u8>, write: usize) {
    for piece in data.chunks(write * 3) {
        let slices: Vec<IoSlice> = piece.chunks(write).map(IoSlice::new).collect();
        let mut sent = 0;
        while sent < piece.len() {
            // Skip what earlier calls took: rebuild the slices past `sent`.
            let mut skip = sent;
            let rest: Vec<IoSlice> = slices
                .iter()
                .filter_map(|s| {
                    if skip >= s.len() {
                        skip -= s.len();
                        None
                    } else {
                        let r = IoSlice::new(&s[skip..]);
                        skip = 0;
                        Some(r)
                    }
                })
                .collect();
            sent += w.write_vectored(&rest).await.unwrap();
        }
    }
    w.shutdown().await.unwrap();
}

/// Reads to the end in reads of at most `read` bytes.
async fn receive(mut r: impl AsyncRead + Unpin, read: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut piece = vec![0u8; read];
    loop {
        let n = r.read(&mut piece).await.unwrap();
        if n == 0 {
            return got;
        }
        got.extend_from_slice(&piece[..n]);
    }
}

#[tokio::test]
async fn bytes_cross_intact_whatever_the_read_and_write_sizes() {
    let c = certs();
    // Small writes are gathered, large ones sealed in place; small reads take records opened
    // in place, large ones records opened into the reader's buffer.
    for (write, read) in [
        (1, 100_000),
        (100, 7),
        (5000, 1 << 20),
        (70_000, 16_384),
        (1 << 20, 3000),
    ] {
        let (client, server) = pair(&c).await;
        let data = pattern(3_000_000);
        let up = tokio::spawn(send(client, data.clone(), write));
        let got = receive(server, read).await;
        up.await.unwrap();
        assert!(got == data, "write {write}, read {read}: bytes differ");
    }
}

#[tokio::test]
async fn the_server_sees_the_client_certificate_and_address() {
    let c = certs();
    let (client, server) = pair(&c).await;
    let peer = server.connect_info();
    assert_eq!(peer.remote, client.tcp.local_addr().ok());
    let certs = peer.certs.expect("the client presented a certificate");
    assert_eq!(certs[0], chain(&c.client.0)[0]);
    assert!(client.connect_info().certs.is_none());
}

#[tokio::test]
async fn keys_are_updated_in_both_directions_and_both_sides_follow() {
    let c = certs();
    let (mut client, mut server) = pair(&c).await;
    // A new key every 10 records from the client.
    client.tx_limit = 10;
    let data = pattern(1_000_000);
    client.write_all(&data).await.unwrap();
    client.flush().await.unwrap();
    let mut got = vec![0u8; data.len()];
    server.read_exact(&mut got).await.unwrap();
    assert!(got == data, "bytes differ after key updates");
    assert!(client.tx.seq() <= 10, "the client never updated its key");
    // The client asks the server for an update too: the server answers with its own before
    // its next record, and the client reads that record under the server's new key.
    server.write_all(b"before").await.unwrap();
    server.flush().await.unwrap();
    let mut before = [0u8; 6];
    client.read_exact(&mut before).await.unwrap();
    assert_eq!(server.tx.seq(), 1);
    client.update_tx_key(true).unwrap();
    client.write_all(b"ask").await.unwrap();
    client.flush().await.unwrap();
    let mut asked = [0u8; 3];
    server.read_exact(&mut asked).await.unwrap();
    server.write_all(b"after").await.unwrap();
    server.flush().await.unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"after");
    // Under the old key "after" would have been its record 1 (seq now 2); under the new key
    // it is record 0.
    assert_eq!(
        server.tx.seq(),
        1,
        "the server did not answer with a new key"
    );
}

#[tokio::test]
async fn talks_to_rustls_streams_both_ways() {
    let c = certs();
    let data = pattern(2_000_000);
    // Record-layer client, tokio-rustls server (which sends session tickets after the
    // handshake: the client hands them to rustls).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(stock_server_config(&c));
    let expected = data.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let got = receive(&mut tls, 65_536).await;
        tls.write_all(b"done").await.unwrap();
        tls.shutdown().await.unwrap();
        got
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut client = TlsConnection::connect(tcp, name(), client_config(&c))
        .await
        .unwrap();
    send(&mut client, data.clone(), 50_000).await;
    assert_eq!(receive(&mut client, 100).await, b"done");
    assert!(server.await.unwrap() == expected);

    // tokio-rustls client, record-layer server.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = server_config(&c);
    let server = tokio::spawn(async move {
        let (tcp, remote) = listener.accept().await.unwrap();
        let mut tls = TlsConnection::accept(tcp, Some(remote), config)
            .await
            .unwrap();
        let got = receive(&mut tls, 1 << 20).await;
        tls.write_all(b"done").await.unwrap();
        tls.shutdown().await.unwrap();
        got
    });
    let connector = tokio_rustls::TlsConnector::from(client_config(&c));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(name(), tcp).await.unwrap();
    tls.write_all(&data).await.unwrap();
    tls.shutdown().await.unwrap();
    assert_eq!(receive(&mut tls, 100).await, b"done");
    assert!(server.await.unwrap() == data);
}

#[tokio::test]
async fn a_tampered_record_breaks_the_connection_unread() {
    let c = certs();
    // A relay between client and server flips one bit of the first application record.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = listener.local_addr().unwrap();
    let server_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server_listener.local_addr().unwrap();
    let config = server_config(&c);
    // The record arrives either with the client's Finished (rustls opens it, finishing the
    // handshake) or after it (the record layer opens it): refused either way.
    let server = tokio::spawn(async move {
        let (tcp, remote) = server_listener.accept().await.unwrap();
        let mut got = Vec::new();
        let result = match TlsConnection::accept(tcp, Some(remote), config).await {
            Ok(mut tls) => tls.read_to_end(&mut got).await.map(drop),
            Err(e) => Err(e),
        };
        (result, got)
    });
    tokio::spawn(async move {
        let (mut from_client, _) = listener.accept().await.unwrap();
        let mut to_server = TcpStream::connect(server_addr).await.unwrap();
        let (mut cr, mut cw) = from_client.split();
        let (mut sr, mut sw) = to_server.split();
        let down = tokio::io::copy(&mut sr, &mut cw);
        let up = async {
            // Records are forwarded whole as they arrive; the first long one (application
            // data: the handshake's records are short) gets a bit flipped.
            let mut held = Vec::new();
            let mut piece = [0u8; 65536];
            let mut flipped = false;
            loop {
                let n = cr.read(&mut piece).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                held.extend_from_slice(&piece[..n]);
                while held.len() >= HEADER {
                    let len = HEADER + u16::from_be_bytes([held[3], held[4]]) as usize;
                    if held.len() < len {
                        break;
                    }
                    let mut record: Vec<u8> = held.drain(..len).collect();
                    if !flipped && len > 5000 {
                        record[len / 2] ^= 1;
                        flipped = true;
                    }
                    sw.write_all(&record).await.unwrap();
                }
            }
            sw.write_all(&held).await.unwrap();
            let _ = sw.shutdown().await;
        };
        let _ = tokio::join!(down, up);
    });
    let tcp = TcpStream::connect(relay_addr).await.unwrap();
    let mut client = TlsConnection::connect(tcp, name(), client_config(&c))
        .await
        .unwrap();
    client.write_all(&pattern(10_000)).await.unwrap();
    client.shutdown().await.unwrap();
    let (result, got) = server.await.unwrap();
    let err = result.expect_err("a tampered record was read");
    assert!(
        err.to_string().contains("bad_record_mac") || err.to_string().contains("decrypt"),
        "{err}"
    );
    assert!(
        got.is_empty(),
        "{} bytes of the tampered record were read",
        got.len()
    );
}
