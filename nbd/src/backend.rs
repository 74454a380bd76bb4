//! The [`Backend`] trait the server calls for each request, and its type-erased form.
//!
//! The server validates every request (range, flags, read-only) before calling the backend,
//! so implementations only ever see in-range offsets and lengths no larger than the server's
//! request limit. A reply is sent only after the backend's future resolves: a backend that
//! wants "acknowledged" to mean "durably recorded" (the agent's write splitter) simply does not
//! resolve `write` until it has recorded the write.

use std::future::Future;
use std::io;
use std::pin::Pin;

/// Storage behind one export.
///
/// Futures must be `Send`: the server runs each request on its own tokio task so that
/// requests on one connection proceed concurrently. Requests on the same or different
/// connections may overlap in any way the client chooses; the NBD client, not the server,
/// is responsible for ordering overlapping writes.
pub trait Backend: Send + Sync + 'static {
    /// Export size in bytes, fixed for the lifetime of the export.
    fn size(&self) -> u64;

    /// Whether the export refuses writes (advertised as `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool {
        false
    }

    /// Whether clients may spread one workload over several connections and rely on a
    /// flush on any connection covering writes completed on all of them
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// Reads exactly `len` bytes at `offset`. Returning a buffer of any other length is an
    /// error (the client is told EIO).
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Vec<u8>>> + Send;

    /// Writes `data` at `offset`. With `fua`, the data must be on stable storage before the
    /// future resolves.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every write that has already completed durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Hint that `len` bytes at `offset` are no longer needed. The default does nothing,
    /// which the protocol allows (the content of trimmed ranges is unspecified, and keeping
    /// it is the safest unspecified choice).
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len, fua);
        async { Ok(()) }
    }

    /// Makes `len` bytes at `offset` read as zeros. With `no_hole` the range must stay
    /// allocated (no hole punched). The default writes a buffer of zeros through
    /// [`Backend::write`].
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = no_hole;
        self.write(offset, vec![0; len as usize], fua)
    }
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Object-safe mirror of [`Backend`], so one server can hold exports of different backend
/// types. One allocation per request is negligible next to the I/O it stands for.
pub(crate) trait DynBackend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn can_multi_conn(&self) -> bool;
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Vec<u8>>;
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, ()>;
    fn flush(&self) -> BoxFuture<'_, ()>;
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, ()>;
    fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool, fua: bool) -> BoxFuture<'_, ()>;
}

impl<B: Backend> DynBackend for B {
    fn size(&self) -> u64 {
        Backend::size(self)
    }
    fn read_only(&self) -> bool {
        Backend::read_only(self)
    }
    fn can_multi_conn(&self) -> bool {
        Backend::can_multi_conn(self)
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Vec<u8>> {
        Box::pin(Backend::read(self, offset, len))
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, ()> {
        Box::pin(Backend::write(self, offset, data, fua))
    }
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(Backend::flush(self))
    }
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, ()> {
        Box::pin(Backend::trim(self, offset, len, fua))
    }
    fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool, fua: bool) -> BoxFuture<'_, ()> {
        Box::pin(Backend::write_zeroes(self, offset, len, no_hole, fua))
    }
}
