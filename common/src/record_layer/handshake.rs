//! The TLS handshake, done by rustls's unbuffered API over a TCP stream: every byte read and
//! written passes through buffers owned here, so when the handshake is over the connection
//! can be handed to the record layer with nothing left inside rustls — the traffic keys, the
//! bytes of records that already arrived, and any application data rustls already opened.
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ExtractedSecrets, SupportedCipherSuite};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes of handshake messages held at once (certificate chains are a few KiB).
const MAX_HANDSHAKE_BUFFER: usize = 256 * 1024;

/// A finished handshake, ready for the record layer.
pub struct Established<Data> {
    pub secrets: ExtractedSecrets,
    pub kernel: KernelConnection<Data>,
    pub suite: SupportedCipherSuite,
    /// Bytes that arrived after the handshake's last record: the start of the first records.
    pub unread: Vec<u8>,
    /// Application data rustls opened while finishing the handshake (a client's first
    /// records can arrive with its Finished).
    pub opened: Vec<u8>,
    pub peer_certs: Option<Vec<CertificateDer<'static>>>,
    pub alpn: Option<Vec<u8>>,
}

/// What the handshake needs of rustls's unbuffered client and server connections.
pub trait Unbuffered: Send {
    type Data: Send;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn peer_certs(&self) -> Option<Vec<CertificateDer<'static>>>;
    fn alpn(&self) -> Option<Vec<u8>>;
    fn suite(&self) -> Option<SupportedCipherSuite>;
    fn into_kernel(self)
        -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
}

macro_rules! unbuffered {
    ($connection:ty, $data:ty) => {
        impl Unbuffered for $connection {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, $data> {
                self.process_tls_records(incoming)
            }
            fn peer_certs(&self) -> Option<Vec<CertificateDer<'static>>> {
                self.peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            }
            fn alpn(&self) -> Option<Vec<u8>> {
                self.alpn_protocol().map(<[u8]>::to_vec)
            }
            fn suite(&self) -> Option<SupportedCipherSuite> {
                self.negotiated_cipher_suite()
            }
            fn into_kernel(
                self,
            ) -> Result<(ExtractedSecrets, KernelConnection<$data>), rustls::Error> {
                self.dangerous_into_kernel_connection()
            }
        }
    };
}
unbuffered!(UnbufferedClientConnection, ClientConnectionData);
unbuffered!(UnbufferedServerConnection, ServerConnectionData);

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS handshake: {e}"))
}

/// Runs the handshake of `conn` over `tcp` to its end. The caller bounds it in time.
pub async fn handshake<C: Unbuffered>(
    mut conn: C,
    tcp: &mut TcpStream,
) -> io::Result<Established<C::Data>> {
    let mut incoming = vec![0u8; 16 * 1024];
    let mut used = 0;
    let mut outgoing: Vec<u8> = Vec::new();
    let mut opened = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..used]);
        let mut finished = false;
        let mut wants_bytes = false;
        match state.map_err(tls_error)? {
            ConnectionState::EncodeTlsData(mut data) => {
                let at = outgoing.len();
                let need = match data.encode(&mut []) {
                    Ok(n) => n,
                    Err(EncodeError::InsufficientSize(e)) => e.required_size,
                    Err(e) => return Err(tls_error(e)),
                };
                outgoing.resize(at + need, 0);
                if need > 0 {
                    data.encode(&mut outgoing[at..]).map_err(tls_error)?;
                }
            }
            ConnectionState::TransmitTlsData(data) => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
                data.done();
            }
            ConnectionState::BlockedHandshake => wants_bytes = true,
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    opened.extend_from_slice(record.payload);
                }
            }
            ConnectionState::WriteTraffic(_) => finished = true,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(tls_error("the peer closed the connection"))
            }
            _ => return Err(tls_error("unexpected state")),
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        if finished {
            break;
        }
        if wants_bytes {
            if used == incoming.len() {
                if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                    return Err(tls_error("handshake messages too large"));
                }
                incoming.resize(incoming.len() * 2, 0);
            }
            let n = tcp.read(&mut incoming[used..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS handshake: the peer closed the connection",
                ));
            }
            used += n;
        }
    }
    let peer_certs = conn.peer_certs();
    let alpn = conn.alpn();
    let suite = conn
        .suite()
        .ok_or_else(|| tls_error("no cipher suite was agreed"))?;
    let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
    incoming.truncate(used);
    Ok(Established {
        secrets,
        kernel,
        suite,
        unread: incoming,
        opened,
        peer_certs,
        alpn,
    })
}
