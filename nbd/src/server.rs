//! [`Server`]: owns the exports, accepts connections, runs each one through the handshake
//! and transmission, and stops gracefully on a [`CancellationToken`].
//!
//! Each connection is its own task; a failing connection is logged and counted, never
//! propagated, so one bad client cannot affect the others or the listener.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::export::{Export, Registry};
use crate::handshake::{self, Outcome};
use crate::stats::{ServerCounters, ServerStats};
use crate::{transmission, Error};

/// Limits and timeouts. The defaults suit a local write splitter serving qemu or the kernel
/// client.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest READ or WRITE accepted (advertised as the maximum block size). Larger reads
    /// get EINVAL; a larger write closes the connection, since its payload would have to be
    /// swallowed. Default 32 MiB, the limit qemu and the Linux client assume.
    pub max_request_size: u32,
    /// Requests one connection may have in flight before the server stops reading from it.
    pub max_in_flight_requests: usize,
    /// Write payload and read data one connection may hold in memory at once; one request of
    /// `max_request_size` is always admitted.
    pub max_in_flight_bytes: usize,
    /// Time a client gets to finish the handshake.
    pub handshake_timeout: Duration,
    /// On a graceful stop, how long to wait for a client to read its last replies before
    /// dropping the connection anyway.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_request_size: 32 << 20,
            max_in_flight_requests: 64,
            max_in_flight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// An NBD server. Cheap to clone; clones share exports and counters.
#[derive(Clone, Default)]
pub struct Server {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    config: ServerConfig,
    exports: Registry,
    counters: ServerCounters,
}

impl Server {
    /// A server with no exports yet.
    pub fn new(config: ServerConfig) -> Self {
        Server {
            inner: Arc::new(Inner {
                config,
                exports: Registry::default(),
                counters: ServerCounters::default(),
            }),
        }
    }

    /// Offers `export` to new connections. Fails if the name is taken or not representable.
    pub fn add_export(&self, export: Export) -> Result<(), Error> {
        self.inner.exports.add(export)
    }

    /// Stops offering an export. Connections already using it keep it until they close.
    pub fn remove_export(&self, name: &str) -> Option<Export> {
        self.inner.exports.remove(name)
    }

    /// The export called `name`, e.g. to read its [`Export::stats`].
    pub fn export(&self, name: &str) -> Option<Export> {
        self.inner.exports.get(name)
    }

    /// Names of all exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .exports
            .list()
            .iter()
            .map(|e| e.name().to_owned())
            .collect()
    }

    /// Server-wide counters.
    pub fn stats(&self) -> ServerStats {
        self.inner.counters.snapshot()
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Accepts connections on `listener` until `cancel` fires, then stops accepting, lets
    /// every connection finish its in-flight requests, and returns once all are closed.
    pub async fn serve(&self, listener: TcpListener, cancel: CancellationToken) {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE, ECONNABORTED and the like pass; back off so a descriptor
                    // shortage does not spin the loop.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Replies are small and latency-bound; never let Nagle hold one back.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
            let (r, w) = stream.into_split();
            let server = self.clone();
            let cancel = cancel.clone();
            let span = tracing::info_span!("nbd_conn", %peer);
            connections.spawn(
                async move {
                    if let Err(e) = server.run_connection(r, w, cancel).await {
                        log_connection_error(&e);
                    }
                }
                .instrument(span),
            );
        }
        connections.close();
        connections.wait().await;
    }

    /// Serves one already-connected stream (TCP, Unix socket, in-memory pipe) until the
    /// client leaves or `cancel` fires. Returns the connection's error, if any, instead of
    /// logging it.
    pub async fn serve_connection<S>(
        &self,
        stream: S,
        cancel: CancellationToken,
    ) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        self.run_connection(r, w, cancel).await
    }

    async fn run_connection<R, W>(&self, r: R, w: W, cancel: CancellationToken) -> Result<(), Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let counters = &self.inner.counters;
        counters.connections_accepted.fetch_add(1, Relaxed);
        counters.connections_active.fetch_add(1, Relaxed);
        let _active = ActiveGuard(counters);
        let result = self.handshake_and_transmit(r, w, cancel).await;
        if matches!(result, Err(Error::Protocol(_) | Error::HandshakeTimeout)) {
            counters.protocol_errors.fetch_add(1, Relaxed);
        }
        result
    }

    async fn handshake_and_transmit<R, W>(
        &self,
        mut r: R,
        mut w: W,
        cancel: CancellationToken,
    ) -> Result<(), Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let config = &self.inner.config;
        let negotiate =
            handshake::negotiate(&mut r, &mut w, &self.inner.exports, config.max_request_size);
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            outcome = tokio::time::timeout(config.handshake_timeout, negotiate) => outcome,
        };
        let export = match outcome {
            Err(_elapsed) => return Err(Error::HandshakeTimeout),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Outcome::Closed)) => return Ok(()),
            Ok(Ok(Outcome::UnknownExport(name))) => {
                tracing::info!(export = %name, "refused unknown export");
                return Ok(());
            }
            Ok(Ok(Outcome::Transmission(export))) => export,
        };
        self.inner
            .counters
            .handshakes_completed
            .fetch_add(1, Relaxed);
        export.counters.connection();
        tracing::debug!(export = export.name(), "transmission started");
        transmission::serve(r, w, export, config, cancel).await
    }
}

/// Decrements the active-connection gauge however the connection ends.
struct ActiveGuard<'a>(&'a ServerCounters);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Relaxed);
    }
}

fn log_connection_error(e: &Error) {
    match e {
        Error::Io(io) if is_disconnect(io) => tracing::debug!(error = %e, "client went away"),
        _ => tracing::warn!(error = %e, "connection closed with an error"),
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    )
}
