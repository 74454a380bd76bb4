//! Building a Lifeboat gRPC server: TLS from the component's identity, the request-metrics
//! layer, the standard `grpc.health.v1` service, and a listener bound before serving so the
//! caller learns of a busy port at once.
use crate::identity::Identity;
use crate::read_ahead::ReadAheadTcp;
use crate::telemetry::GrpcMetricsLayer;
use std::net::SocketAddr;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Server;

/// A server builder with TLS and request metrics.
pub fn grpc_server(
    identity: &Identity,
) -> anyhow::Result<Server<tower::layer::util::Stack<GrpcMetricsLayer, tower::layer::util::Identity>>>
{
    Ok(Server::builder()
        .tls_config(crate::tls::server_tls(identity))?
        // Large HTTP/2 windows let a data stream run well ahead of the receiver's fsyncs
        // (the 1 MiB default turns replication into small groups and many fsyncs).
        .initial_stream_window_size(crate::tls::STREAM_WINDOW)
        .initial_connection_window_size(crate::tls::CONNECTION_WINDOW)
        // Senders may use HTTP/2 DATA frames up to this size instead of the 16 KiB default:
        // a batch then crosses in a few frames, not a hundred per MiB.
        .max_frame_size(crate::tls::MAX_FRAME)
        .layer(GrpcMetricsLayer))
}

/// Binds `addr` now (port 0 picks a free port) and returns the stream of connections, each
/// without Nagle's delay and read through a read-ahead buffer (see `read_ahead`). tonic sets
/// `TCP_NODELAY` only on listeners it binds itself; without it a server's small writes (TLS
/// handshake messages, acknowledgements) could wait for the peer's delayed ACK, up to 40 ms.
pub async fn bind(
    addr: SocketAddr,
) -> anyhow::Result<(
    SocketAddr,
    impl Stream<Item = std::io::Result<ReadAheadTcp>> + Send + 'static,
)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.map(|tcp| {
            // A socket that refuses the option still works, only slower.
            let _ = tcp.set_nodelay(true);
            ReadAheadTcp::new(tcp)
        })
    });
    Ok((local, incoming))
}

/// How long a stopping server waits for calls in progress to finish.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits for a server whose shutdown signal has fired. Its graceful shutdown refuses new calls
/// and waits for open ones, but a replication stream or an assignment long-poll ends only when
/// its client ends it: after `SHUTDOWN_GRACE` the rest are cut, as a crash would cut them.
/// That loses nothing: every acknowledged batch is durable before its ack, and clients resume
/// from what was acknowledged.
pub async fn stop_server(
    mut server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(ended) => Ok(ended??),
        Err(_) => {
            tracing::info!("open streams still running after {:?}: cut", SHUTDOWN_GRACE);
            server.abort();
            Ok(())
        }
    }
}
