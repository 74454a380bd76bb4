//! The crate's error type.

use std::io;

/// Errors from the server's public API and from individual connections.
///
/// Connection errors are logged by [`Server::serve`](crate::Server::serve) and never stop the
/// server; they are returned to callers of
/// [`Server::serve_connection`](crate::Server::serve_connection).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket (or another I/O resource) failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol; the connection was closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The client did not finish the handshake within the configured time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// An export name the protocol cannot carry (longer than 4096 bytes or containing NUL).
    #[error("invalid export name {0:?}: {1}")]
    InvalidExportName(String, &'static str),
    /// An export with this name is already being served.
    #[error("export {0:?} already exists")]
    DuplicateExport(String),
}

impl Error {
    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        Error::Protocol(msg.into())
    }
}
