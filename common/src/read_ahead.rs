//! Accepted connections that read ahead: a TCP stream behind a large read buffer, for servers
//! whose clients stream bulk data at them.
//!
//! rustls reads its TLS records from the socket at most 4 KiB at a time (its deframer asks for
//! no more), so a server receiving replication data made a `recv` system call for every 4 KiB:
//! a quarter of a million per GiB, each taking the socket lock, walking the receive queue and
//! often sending a window update back. Behind this buffer one `recv` takes whatever the socket
//! holds (up to [`READ_AHEAD`]) and rustls's small reads are served from memory: one extra
//! copy of hot bytes instead of the system calls. Writes pass straight through.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes one read from the socket may take.
pub const READ_AHEAD: usize = 256 * 1024;

/// An accepted TCP connection read through a [`READ_AHEAD`]-byte buffer.
#[derive(Debug)]
pub struct ReadAheadTcp(BufReader<TcpStream>);

impl ReadAheadTcp {
    pub fn new(stream: TcpStream) -> ReadAheadTcp {
        ReadAheadTcp(BufReader::with_capacity(READ_AHEAD, stream))
    }
}

impl AsyncRead for ReadAheadTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadAheadTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The peer's address, as for a plain `TcpStream` (and so, under TLS, with the peer's
/// certificates where tonic looks for them).
impl Connected for ReadAheadTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_writes_pass_through() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let sent = data.clone();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&sent).await.unwrap();
            let mut reply = [0u8; 5];
            s.read_exact(&mut reply).await.unwrap();
            reply
        });
        let (stream, _) = listener.accept().await.unwrap();
        let mut server = ReadAheadTcp::new(stream);
        let peer = server.0.get_ref().peer_addr().ok();
        assert_eq!(server.connect_info().remote_addr(), peer);
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        while got.len() < data.len() {
            let n = server.read(&mut piece).await.unwrap();
            assert!(n > 0, "the stream ended early");
            got.extend_from_slice(&piece[..n]);
        }
        assert!(got == data, "bytes differ");
        server.write_all(b"hello").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(&client.await.unwrap(), b"hello");
    }
}
