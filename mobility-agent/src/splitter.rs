//! The NBD backend of a protected disk: the workload's reads go straight to the source, its
//! writes and zero-fills through the capture (see `capture`), each on a blocking thread.
use crate::capture::Capture;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// The NBD backend of a protected disk.
pub struct Splitter(pub Arc<Capture>);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

impl nbd::Backend for Splitter {
    fn size(&self) -> u64 {
        self.0.size
    }

    fn can_multi_conn(&self) -> bool {
        // Every connection writes through the same file and flush is an fdatasync of it.
        true
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let c = self.0.clone();
        blocking(move || {
            let mut buf = vec![0u8; len as usize];
            c.source.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let c = self.0.clone();
        blocking(move || {
            c.write(offset, data)?;
            if fua {
                c.source.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        let c = self.0.clone();
        blocking(move || c.source.sync_data()).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _no_hole: bool,
        fua: bool,
    ) -> io::Result<()> {
        let c = self.0.clone();
        blocking(move || {
            c.write_zeroes(offset, len as u64)?;
            if fua {
                c.source.sync_data()?;
            }
            Ok(())
        })
        .await
    }
}
