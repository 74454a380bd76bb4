//! An async NBD (Network Block Device) server.
//!
//! Lifeboat's mobility agent serves a protected disk through it as a *write splitter*: the
//! workload writes through the export, and a [`Backend`] wrapping [`FileBackend`] applies each
//! write to the source disk and records it for replication before the client is told the
//! write is done. The master target uses it to export point-in-time views.
//!
//! ```
//! use nbd::{CancellationToken, Export, FileBackend, MemBackend, Server, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.img");
//! # std::fs::write(&path, vec![0u8; 1 << 20])?;
//! let server = Server::new(ServerConfig::default());
//! server.add_export(Export::new("disk0", FileBackend::open(&path)?).with_description("C:"))?;
//! server.add_export(Export::new("scratch", MemBackend::new(64 << 20)))?;
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("nbd://{}/disk0", listener.local_addr()?); // for qemu-io, nbdcopy, …
//! let stop = CancellationToken::new();
//! let serving = tokio::spawn({
//!     let (server, stop) = (server.clone(), stop.clone());
//!     async move { server.serve(listener, stop).await }
//! });
//!
//! // … clients connect to `url` …
//!
//! stop.cancel(); // stop accepting; requests in flight complete and are answered
//! serving.await?;
//! let stats = server.export("disk0").map(|e| e.stats()).unwrap_or_default();
//! assert_eq!(stats.bytes_written, 0);
//! # let _ = url;
//! # Ok(())
//! # }
//! ```
//!
//! # A write splitter
//! Implement [`Backend`] around a [`FileBackend`]; the server replies to a WRITE only after
//! `write` resolves, so resolving after the write is both applied and recorded makes
//! "acknowledged" mean "recorded":
//!
//! ```
//! use std::io;
//! use nbd::{Backend, FileBackend};
//!
//! struct Splitter { disk: FileBackend, log: tokio::sync::mpsc::Sender<(u64, Vec<u8>)> }
//!
//! impl Backend for Splitter {
//!     fn size(&self) -> u64 { self.disk.size() }
//!     async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
//!         self.disk.read(offset, len).await
//!     }
//!     async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
//!         self.disk.write(offset, data.clone(), fua).await?;
//!         self.log.send((offset, data)).await.map_err(io::Error::other)
//!     }
//!     async fn flush(&self) -> io::Result<()> { self.disk.flush().await }
//!     // trim and write_zeroes default to no-op / zeros through `write`, so the log
//!     // sees every change to the disk.
//! }
//! ```
//!
//! # Protocol
//! Fixed-newstyle handshake with `EXPORT_NAME`, `INFO`, `GO`, `LIST` and `ABORT`; every other
//! option (including structured replies and TLS) is refused with `NBD_REP_ERR_UNSUP`.
//! Transmission uses simple replies and supports READ, WRITE (with FUA), FLUSH, TRIM,
//! WRITE_ZEROES (with NO_HOLE) and DISC. Requests on one connection run concurrently and are
//! answered as they complete; see [`ServerConfig`] for the limits. The raw constants and
//! message layouts are in [`protocol`].

mod backend;
mod error;
mod export;
mod file_backend;
mod handshake;
mod mem_backend;
pub mod protocol;
mod server;
mod stats;
mod transmission;
mod wire;

pub use backend::Backend;
pub use error::Error;
pub use export::Export;
pub use file_backend::FileBackend;
pub use mem_backend::MemBackend;
pub use server::{Server, ServerConfig};
pub use stats::{ExportStats, ServerStats};
/// Re-exported so callers need not depend on `tokio-util` to stop a server.
pub use tokio_util::sync::CancellationToken;
