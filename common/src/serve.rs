//! Building a Lifeboat gRPC server: a listener bound before serving (so the caller learns of
//! a busy port at once) whose connections complete their TLS handshakes concurrently, under
//! the component's identity, before tonic sees them; the request-metrics layer; the standard
//! `grpc.health.v1` service.
use crate::identity::Identity;
use crate::record_layer::TlsConnection;
use crate::telemetry::GrpcMetricsLayer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::transport::Server;

/// How long a new connection may take over its TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait to be accepted (each holds up to
/// 256 KiB of handshake messages, and nobody needs a certificate to start one).
const MAX_HANDSHAKES: usize = 128;

/// A server builder with request metrics (TLS is done by `bind`'s connections).
pub fn grpc_server(
) -> Server<tower::layer::util::Stack<GrpcMetricsLayer, tower::layer::util::Identity>> {
    Server::builder()
        // Large HTTP/2 windows let a data stream run well ahead of the receiver's fsyncs
        // (the 1 MiB default turns replication into small groups and many fsyncs).
        .initial_stream_window_size(crate::tls::STREAM_WINDOW)
        .initial_connection_window_size(crate::tls::CONNECTION_WINDOW)
        // Senders may use HTTP/2 DATA frames up to this size instead of the 16 KiB default:
        // a batch then crosses in a few frames, not a hundred per MiB.
        .max_frame_size(crate::tls::MAX_FRAME)
        .layer(GrpcMetricsLayer)
}

/// Binds `addr` now (port 0 picks a free port) and returns the stream of connections that
/// completed a TLS handshake under `identity`. Each handshake runs in a task of its own, so a
/// slow or silent client holds up nobody else; one that takes over [`HANDSHAKE_TIMEOUT`] or
/// fails (a wrong CA, no HTTP/2) is dropped. Sockets go without Nagle's delay: tonic sets
/// `TCP_NODELAY` only on listeners it binds itself, and without it a server's small writes
/// (acknowledgements) could wait for the peer's delayed ACK, up to 40 ms.
pub async fn bind(
    addr: SocketAddr,
    identity: &Identity,
) -> anyhow::Result<(
    SocketAddr,
    impl Stream<Item = std::io::Result<TlsConnection>> + Send + 'static,
)> {
    let config = Arc::new(crate::tls::server_config(identity)?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept(listener, config, tx));
    Ok((local, ReceiverStream::new(rx)))
}

/// Accepts until the server stops reading the connections.
async fn accept(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    ready: mpsc::Sender<std::io::Result<TlsConnection>>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            permit = handshakes.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = ready.closed() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = ready.closed() => return,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: wait for some to be freed.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A socket that refuses the option still works, only slower.
        let _ = tcp.set_nodelay(true);
        let config = config.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let handshake = TlsConnection::accept(tcp, Some(remote), config);
            let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await;
            drop(permit);
            match done {
                Ok(Ok(connection)) => {
                    let _ = ready.send(Ok(connection)).await;
                }
                Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
            }
        });
    }
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
