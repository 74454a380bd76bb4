//! Lifeboat's TLS connections after the handshake: rustls negotiates (certificates, keys,
//! ALPN: see `handshake`), then the records are sealed and opened here, with aws-lc's AEAD.
//!
//! Why not rustls's own streams: every replicated byte crosses two TLS connections, and
//! rustls, buffered, moves each byte more often than the cipher needs. Sending, it copies the
//! plaintext into a record buffer and encrypts that in place; receiving, it opens a record in
//! its buffer, copies the plaintext into a queue, and the reader copies it out again (and a
//! read-ahead buffer in front of it copied it once more, to spare rustls's 4 KiB reads).
//! Those copies were 12% of all CPU time of an initial sync (perf, benchmark (b)). Here a
//! record is sealed straight from the writer's buffer into the outgoing buffer, and opened
//! straight from the incoming buffer into the reader's buffer whenever the reader has room
//! for the whole record; the socket is read 256 KiB at a time.
//!
//! It speaks TLS 1.3 only (RFC 8446 §5): records of up to 16 KiB of content, key updates in
//! both directions (rustls's `kernel` API derives the new secrets), close_notify on both
//! ends, session tickets handed back to rustls. Lifeboat's client and server configurations
//! offer nothing older, so every Lifeboat connection is one of these.
mod handshake;
mod keys;

use handshake::{handshake, Established};
use keys::{TrafficKeys, TAG_LEN};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ServerConnectionData;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;
/// Most content bytes in one record (RFC 8446 §5.1).
const MAX_CONTENT: usize = 16 * 1024;
/// Most bytes of a record after its header (RFC 8446 §5.2).
const MAX_BODY: usize = MAX_CONTENT + 256;
const HEADER: usize = 5;
/// Bytes one read from the socket may take: whatever the socket holds, up to this. A
/// connection starts with room for two records and grows to this once a read fills it: only
/// busy connections hold the large buffer.
const READ_AHEAD: usize = 256 * 1024;
const SMALL_INBUF: usize = 2 * (HEADER + MAX_BODY);
/// Sealed bytes held before a write must wait for the socket: an HTTP/2 DATA frame of up to
/// 1 MiB then leaves in one `write` (small writes cost loopback TCP far more CPU per byte).
const SEND_BUFFER: usize = 1024 * 1024;
/// Writes at least this long are sealed straight from the writer's memory; shorter ones
/// (HTTP/2 frame headers, small messages) are gathered into one record first.
const SEAL_DIRECT_FROM: usize = 2048;

/// Who is at the other end of an accepted connection: what a server's calls see in their
/// request extensions (see `peer`).
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, if it presented one (verified against the cluster CA).
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// The rustls connection kept for what only it can do after the handshake.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    /// The next traffic keys of one direction (`send`: ours, else the peer's), after a key
    /// update.
    fn next_keys(&mut self, send: bool) -> io::Result<TrafficKeys> {
        let (seq, secrets) = match (self, send) {
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
        }
        .map_err(io::Error::other)?;
        TrafficKeys::new(seq, secrets)
    }
}

/// A TLS 1.3 connection over TCP, after its handshake.
pub struct TlsConnection {
    tcp: TcpStream,
    kernel: Kernel,
    rx: TrafficKeys,
    tx: TrafficKeys,
    /// Records sealed with one key before it is replaced (the suite's confidentiality limit,
    /// with a margin).
    tx_limit: u64,
    peer: TlsPeer,
    alpn: Option<Vec<u8>>,
    /// Received bytes: `in_start..in_end` are records not yet opened.
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Plaintext not yet read: `opened` (from the handshake), then `plain` (a record opened
    /// in place in `inbuf`).
    opened: Vec<u8>,
    plain: std::ops::Range<usize>,
    /// The peer sent close_notify: reads end.
    read_closed: bool,
    /// A read failed (a record that did not authenticate, an alert): every later read fails
    /// too, rather than going on with the records after it.
    read_failed: bool,
    /// The peer asked for a key update: ours goes out before the next record.
    update_requested: bool,
    /// Sealed records: `out_start..out_len` not yet written to the socket. Grown (zeroed) as
    /// needed up to about `SEND_BUFFER` and never shrunk, so sealing does not zero bytes it
    /// is about to overwrite; idle connections that never sent much stay small.
    outbuf: Vec<u8>,
    out_start: usize,
    out_len: usize,
    /// Small writes gathered into one record.
    gather: Vec<u8>,
    close_sent: bool,
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl TlsConnection {
    /// The server side: a handshake under `config` on an accepted connection.
    pub async fn accept(
        mut tcp: TcpStream,
        remote: Option<SocketAddr>,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<TlsConnection> {
        let conn = rustls::server::UnbufferedServerConnection::new(config).map_err(invalid_tls)?;
        let mut done = handshake(conn, &mut tcp).await?;
        let peer_certs = done.peer_certs.take().map(Arc::new);
        TlsConnection::new(tcp, done, Kernel::Server, remote, peer_certs)
    }

    /// The client side: a handshake under `config` with the server named `name`.
    pub async fn connect(
        mut tcp: TcpStream,
        name: ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<TlsConnection> {
        let conn =
            rustls::client::UnbufferedClientConnection::new(config, name).map_err(invalid_tls)?;
        let done = handshake(conn, &mut tcp).await?;
        let remote = tcp.peer_addr().ok();
        TlsConnection::new(tcp, done, Kernel::Client, remote, None)
    }

    fn new<D>(
        tcp: TcpStream,
        done: Established<D>,
        kernel: impl FnOnce(KernelConnection<D>) -> Kernel,
        remote: Option<SocketAddr>,
        certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    ) -> io::Result<TlsConnection> {
        let suite = done
            .suite
            .tls13()
            .ok_or_else(|| invalid("the peer negotiated TLS 1.2; Lifeboat speaks TLS 1.3"))?;
        let limit = suite.common.confidentiality_limit;
        let (rx_seq, rx) = done.secrets.rx;
        let (tx_seq, tx) = done.secrets.tx;
        let unread = done.unread.len();
        if unread > READ_AHEAD + HEADER + MAX_BODY {
            return Err(invalid("too much data arrived with the TLS handshake"));
        }
        let mut inbuf = done.unread;
        inbuf.resize(SMALL_INBUF.max(unread + HEADER + MAX_BODY), 0);
        Ok(TlsConnection {
            tcp,
            kernel: kernel(done.kernel),
            rx: TrafficKeys::new(rx_seq, rx)?,
            tx: TrafficKeys::new(tx_seq, tx)?,
            tx_limit: limit - limit / 8,
            peer: TlsPeer { remote, certs },
            alpn: done.alpn,
            inbuf,
            in_start: 0,
            in_end: unread,
            opened: done.opened,
            plain: 0..0,
            read_closed: false,
            read_failed: false,
            update_requested: false,
            outbuf: Vec::new(),
            out_start: 0,
            out_len: 0,
            gather: Vec::with_capacity(MAX_CONTENT),
            close_sent: false,
        })
    }

    /// The protocol agreed by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The length of the record body at `in_start`, once all of it has arrived.
    fn complete_record(&self) -> io::Result<Option<usize>> {
        let held = &self.inbuf[self.in_start..self.in_end];
        if held.len() < HEADER {
            return Ok(None);
        }
        match held[0] {
            APPLICATION_DATA => {}
            CHANGE_CIPHER_SPEC | ALERT | HANDSHAKE => {
                return Err(invalid(format!(
                    "the peer sent an unprotected TLS record (type {}) after the handshake",
                    held[0]
                )))
            }
            other => return Err(invalid(format!("not a TLS record (type {other})"))),
        }
        let len = u16::from_be_bytes([held[3], held[4]]) as usize;
        if !(TAG_LEN + 1..=MAX_BODY).contains(&len) {
            return Err(invalid(format!(
                "a TLS record of {len} bytes (record_overflow)"
            )));
        }
        Ok((held.len() >= HEADER + len).then_some(len))
    }

    /// Opens the record at `in_start` (body of `len` bytes): into `buf` when the whole record
    /// fits there, else in place, leaving its content in `plain`.
    fn open_record(&mut self, buf: &mut ReadBuf<'_>, len: usize) -> io::Result<()> {
        let at = self.in_start;
        let header: [u8; HEADER] = self.inbuf[at..at + HEADER]
            .try_into()
            .map_err(|_| invalid("short TLS record header"))?;
        let body = at + HEADER..at + HEADER + len;
        let inner_len = len - TAG_LEN;
        self.in_start = body.end;
        if buf.remaining() >= inner_len {
            // The reader's memory is zeroed first (aws-lc-rs writes only into `&mut [u8]`).
            // Opening through aws-lc's C API into the uninitialised memory instead was tried:
            // the zeroing's 3% of an initial sync's CPU moved into the AEAD (it then takes the
            // cache misses of writing cold memory), for no gain.
            let out = &mut buf.initialize_unfilled_to(inner_len)[..inner_len];
            self.rx.open_into(&header, &self.inbuf[body], out)?;
            let (content_type, content_len) = inner_type(out)?;
            if content_type == APPLICATION_DATA {
                buf.advance(content_len);
            } else {
                let content = out[..content_len].to_vec();
                self.control(content_type, &content)?;
            }
        } else {
            self.rx
                .open_in_place(&header, &mut self.inbuf[body.clone()])?;
            let inner = body.start..body.start + inner_len;
            let (content_type, content_len) = inner_type(&self.inbuf[inner.clone()])?;
            if content_type == APPLICATION_DATA {
                self.plain = inner.start..inner.start + content_len;
            } else {
                let content = self.inbuf[inner.start..inner.start + content_len].to_vec();
                self.control(content_type, &content)?;
            }
        }
        Ok(())
    }

    /// A record that is not application data: an alert or a post-handshake message.
    fn control(&mut self, content_type: u8, content: &[u8]) -> io::Result<()> {
        match content_type {
            ALERT => match content {
                [_, 0] => {
                    self.read_closed = true;
                    Ok(())
                }
                [_, description] => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the peer sent TLS alert {description}"),
                )),
                _ => Err(invalid("a malformed TLS alert")),
            },
            HANDSHAKE => {
                if content.is_empty() {
                    return Err(invalid("an empty TLS handshake record"));
                }
                let mut rest = content;
                while !rest.is_empty() {
                    let [message_type, a, b, c, body @ ..] = rest else {
                        return Err(invalid("a truncated TLS handshake message"));
                    };
                    let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                    if body.len() < len {
                        return Err(invalid("a TLS handshake message split across records"));
                    }
                    let (message, after) = body.split_at(len);
                    rest = after;
                    match (*message_type, message) {
                        // A KeyUpdate must end its record: what follows it was sealed under
                        // the next key (RFC 8446 §5.1).
                        (KEY_UPDATE, [request]) if *request <= 1 && rest.is_empty() => {
                            self.rx = self.kernel.next_keys(false)?;
                            self.update_requested |= *request == 1;
                        }
                        (NEW_SESSION_TICKET, ticket) => match &mut self.kernel {
                            Kernel::Client(k) => {
                                k.handle_new_session_ticket(ticket).map_err(invalid_tls)?
                            }
                            Kernel::Server(_) => {
                                return Err(invalid("a TLS client sent a session ticket"))
                            }
                        },
                        (other, _) => {
                            return Err(invalid(format!(
                                "an unexpected TLS handshake message (type {other}) after the handshake"
                            )))
                        }
                    }
                }
                Ok(())
            }
            other => Err(invalid(format!("an unexpected TLS record (type {other})"))),
        }
    }

    /// Room for at least one more whole record after `in_end`.
    fn make_room(&mut self) {
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        } else if self.inbuf.len() - self.in_end < HEADER + MAX_BODY {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
    }

    /// Seals one record of `content` into `outbuf`, updating the key first when it is due.
    fn seal(&mut self, content_type: u8, content: &[u8]) -> io::Result<()> {
        if self.update_requested || self.tx.seq() >= self.tx_limit {
            self.update_tx_key(false)?;
        }
        self.seal_record(content_type, content)
    }

    /// Sends a KeyUpdate under the current key, then seals with the next one. `ask_peer`: the
    /// peer is asked to update its own key too.
    fn update_tx_key(&mut self, ask_peer: bool) -> io::Result<()> {
        self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, u8::from(ask_peer)])?;
        self.tx = self.kernel.next_keys(true)?;
        self.update_requested = false;
        Ok(())
    }

    fn seal_record(&mut self, content_type: u8, content: &[u8]) -> io::Result<()> {
        let body = content.len() + 1 + TAG_LEN;
        let [hi, lo] = (body as u16).to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        let mut at = self.out_len;
        if at + HEADER + body > self.outbuf.len() && self.out_start > 0 {
            // What the socket took is at the front: move the rest there before growing.
            self.outbuf.copy_within(self.out_start..self.out_len, 0);
            self.out_len -= self.out_start;
            self.out_start = 0;
            at = self.out_len;
        }
        let end = at + HEADER + body;
        if end > self.outbuf.len() {
            self.outbuf.resize(end, 0);
        }
        self.outbuf[at..at + HEADER].copy_from_slice(&header);
        let out = &mut self.outbuf[at + HEADER..end];
        self.tx.seal(&header, content, content_type, out)?;
        self.out_len = end;
        Ok(())
    }

    fn seal_gathered(&mut self) -> io::Result<()> {
        if self.gather.is_empty() {
            return Ok(());
        }
        let gathered = std::mem::take(&mut self.gather);
        let sealed = self.seal(APPLICATION_DATA, &gathered);
        self.gather = gathered;
        self.gather.clear();
        sealed
    }

    /// Seals up to `budget` bytes of `bufs`; returns how many.
    fn seal_slices(&mut self, bufs: &[IoSlice<'_>], budget: usize) -> io::Result<usize> {
        let mut taken = 0;
        for buf in bufs {
            let mut rest: &[u8] = buf;
            while !rest.is_empty() && taken < budget {
                let room = budget - taken;
                if rest.len() >= SEAL_DIRECT_FROM {
                    self.seal_gathered()?;
                    let n = rest.len().min(MAX_CONTENT).min(room);
                    self.seal(APPLICATION_DATA, &rest[..n])?;
                    rest = &rest[n..];
                    taken += n;
                } else {
                    let n = rest.len().min(MAX_CONTENT - self.gather.len()).min(room);
                    self.gather.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    taken += n;
                    if self.gather.len() == MAX_CONTENT {
                        self.seal_gathered()?;
                    }
                }
            }
            if taken >= budget {
                break;
            }
        }
        self.seal_gathered()?;
        Ok(taken)
    }

    /// Writes sealed records to the socket until none are left.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_start < self.out_len {
            let n =
                ready!(Pin::new(&mut self.tcp)
                    .poll_write(cx, &self.outbuf[self.out_start..self.out_len]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_start += n;
        }
        self.out_start = 0;
        self.out_len = 0;
        Poll::Ready(Ok(()))
    }

    fn unsent(&self) -> usize {
        self.out_len - self.out_start
    }
}

fn invalid_tls(e: rustls::Error) -> io::Error {
    invalid(format!("TLS: {e}"))
}

/// The content type and content length of a record's inner plaintext: content, type byte,
/// then any zero padding (RFC 8446 §5.2, §5.4). `inner` is at most `MAX_BODY - TAG_LEN`
/// bytes (`complete_record` refuses longer records), so only the content can be too long.
fn inner_type(inner: &[u8]) -> io::Result<(u8, usize)> {
    let end = inner
        .iter()
        .rposition(|&b| b != 0)
        .ok_or_else(|| invalid("a TLS record without a content type"))?;
    if end > MAX_CONTENT {
        return Err(invalid("a TLS record over 2^14 bytes (record_overflow)"));
    }
    Ok((inner[end], end))
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read_failed {
            return Poll::Ready(Err(invalid("the TLS connection already failed")));
        }
        let read = this.poll_read_records(cx, buf);
        if let Poll::Ready(Err(_)) = &read {
            this.read_failed = true;
        }
        read
    }
}

impl TlsConnection {
    fn poll_read_records(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        let filled_before = buf.filled().len();
        loop {
            if !this.opened.is_empty() {
                let n = this.opened.len().min(buf.remaining());
                buf.put_slice(&this.opened[..n]);
                this.opened.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.inbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some(len) = this.complete_record()? {
                this.open_record(buf, len)?;
                continue;
            }
            if buf.filled().len() > filled_before {
                return Poll::Ready(Ok(()));
            }
            this.make_room();
            let mut space = ReadBuf::new(&mut this.inbuf[this.in_end..]);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut space))?;
            let n = space.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without a TLS close_notify",
                )));
            }
            let filled_all = this.in_end + n == this.inbuf.len();
            this.in_end += n;
            if filled_all && this.inbuf.len() < READ_AHEAD + HEADER + MAX_BODY {
                this.inbuf.resize(READ_AHEAD + HEADER + MAX_BODY, 0);
            }
        }
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.unsent() >= SEND_BUFFER {
            ready!(this.poll_write_out(cx))?;
        }
        let budget = SEND_BUFFER - this.unsent().min(SEND_BUFFER - MAX_CONTENT);
        let taken = this.seal_slices(bufs, budget)?;
        // Start sending now; what the socket does not take yet goes on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.seal(ALERT, &[1, 0])?;
            this.close_sent = true;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

#[cfg(test)]
mod tests;
