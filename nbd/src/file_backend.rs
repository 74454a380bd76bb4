//! [`FileBackend`]: an export backed by a raw image file or a block device.
//!
//! Every operation is positioned I/O (`pread`/`pwrite`, `fallocate`, `fdatasync`) on one
//! shared descriptor, run on tokio's blocking pool so a slow disk never stalls the reactor.
//! Positioned calls need no seek lock, so requests from all connections run in parallel.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use crate::Backend;

/// Zero-fill fallback writes this much at a time.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw image file or block device served as-is.
///
/// * flush = `fdatasync`; FUA = the write followed by `fdatasync`;
/// * trim = `fallocate(PUNCH_HOLE | KEEP_SIZE)`, falling back to writing zeros, so trimmed
///   ranges always read back as zeros (callers replicating writes can treat a trim exactly
///   like write-zeroes);
/// * write-zeroes = punch a hole (unless the client asked for no hole), else
///   `fallocate(ZERO_RANGE | KEEP_SIZE)`, else writing zeros.
///
/// The size is read once when the backend is created.
#[derive(Clone, Debug)]
pub struct FileBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    size: u64,
    read_only: bool,
    // Cleared the first time the filesystem says a mode is unsupported, so later requests go
    // straight to the fallback.
    can_punch: AtomicBool,
    can_zero_range: AtomicBool,
}

impl FileBackend {
    /// Opens `path` (file or block device) for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file, false)
    }

    /// Opens `path` read-only; the export is advertised read-only.
    pub fn open_read_only(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_file(File::open(path)?, true)
    }

    /// Wraps an open file. `read_only` must be true if `file` was not opened for writing.
    pub fn from_file(mut file: File, read_only: bool) -> io::Result<Self> {
        // Seeking to the end gives the size of regular files and block devices alike
        // (metadata().len() is 0 for a block device).
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileBackend {
            inner: Arc::new(Inner {
                file,
                size,
                read_only,
                can_punch: AtomicBool::new(true),
                can_zero_range: AtomicBool::new(true),
            }),
        })
    }

    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(io::Error::other)?
    }
}

impl Inner {
    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Tries one fallocate mode; `Ok(false)` means "not supported here, use a fallback".
    fn try_fallocate(
        &self,
        flag: &AtomicBool,
        mode: libc::c_int,
        offset: u64,
        len: u32,
    ) -> io::Result<bool> {
        if !flag.load(Relaxed) {
            return Ok(false);
        }
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: fallocate only reads its integer arguments; the descriptor stays open for
        // the lifetime of `self`.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode | libc::FALLOC_FL_KEEP_SIZE,
                off,
                libc::off_t::from(len),
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                flag.store(false, Relaxed);
                Ok(false)
            }
            // Block devices refuse ranges not aligned to their logical block size.
            Some(libc::EINVAL) => Ok(false),
            _ => Err(err),
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u32) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(zeros.len());
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u32) -> io::Result<bool> {
        self.try_fallocate(&self.can_punch, libc::FALLOC_FL_PUNCH_HOLE, offset, len)
    }

    fn zero_range(&self, offset: u64, len: u32) -> io::Result<bool> {
        self.try_fallocate(
            &self.can_zero_range,
            libc::FALLOC_FL_ZERO_RANGE,
            offset,
            len,
        )
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read_only(&self) -> bool {
        self.inner.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // All connections share one descriptor and the page cache, and fdatasync covers
        // every completed write whichever connection made it.
        true
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.blocking(move |f| {
            let mut buf = vec![0u8; len as usize];
            f.file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.blocking(move |f| {
            f.file.write_all_at(&data, offset)?;
            f.sync_if(fua)
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.blocking(|f| f.file.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.blocking(move |f| {
            if !f.punch(offset, len)? {
                f.write_zero_bytes(offset, len)?;
            }
            f.sync_if(fua)
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.blocking(move |f| {
            let done = (!no_hole && f.punch(offset, len)?) || f.zero_range(offset, len)?;
            if !done {
                f.write_zero_bytes(offset, len)?;
            }
            f.sync_if(fua)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_writes_zeroes_and_trims_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0x5au8; 3 << 20]).expect("write image");
        let b = FileBackend::open(&path).expect("open");
        assert_eq!(b.size(), 3 << 20);
        assert!(!Backend::read_only(&b));

        b.write(100, vec![1, 2, 3], true).await.expect("write");
        assert_eq!(
            b.read(99, 5).await.expect("read"),
            vec![0x5a, 1, 2, 3, 0x5a]
        );
        b.write_zeroes(4096, 8192, true, false)
            .await
            .expect("zero, no hole");
        b.write_zeroes(65536 + 7, 5000, false, false)
            .await
            .expect("zero, may punch");
        b.trim(1 << 20, (1 << 20) + 3, true).await.expect("trim");
        b.flush().await.expect("flush");

        let mut want = vec![0x5au8; 3 << 20];
        want[100..103].copy_from_slice(&[1, 2, 3]);
        want[4096..4096 + 8192].fill(0);
        want[65536 + 7..65536 + 7 + 5000].fill(0);
        want[1 << 20..(2 << 20) + 3].fill(0);
        assert!(
            std::fs::read(&path).expect("read back") == want,
            "file content differs"
        );
    }

    #[tokio::test]
    async fn read_only_and_short_reads_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ro.img");
        std::fs::write(&path, vec![7u8; 4096]).expect("write image");
        let b = FileBackend::open_read_only(&path).expect("open");
        assert!(Backend::read_only(&b));
        assert!(b.write(0, vec![1], false).await.is_err());
        // Past the end of the file: the server never asks this, but a file truncated behind
        // the server's back must give an error rather than short data.
        assert!(b.read(4000, 200).await.is_err());
    }
}
