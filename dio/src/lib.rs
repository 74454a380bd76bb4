//! Writes that bypass the page cache.
//!
//! The process server writes every cached byte once and (in the normal course) never reads it
//! back through the page cache: its cache segments are forwarded from memory. Writing them
//! through the page cache would cost a copy into freshly allocated kernel pages and the work
//! of reclaiming those pages later, and push the host's other data out of memory. With
//! `O_DIRECT` the disk reads the data straight out of the process's buffer, which the caller
//! stages in an [`AlignedBuf`] and writes in large pieces (a direct write waits for its I/O,
//! so small ones would leave the disk idle between them).
//!
//! `O_DIRECT` has rules: the file offset, the length and the buffer's address must be
//! multiples of what the file system reports (`statx` `STATX_DIOALIGN`; 512 or 4096 bytes on
//! common disks), and some file systems (tmpfs, some FUSE and network file systems) refuse it.
//! [`DirectFile`] follows the rules it can learn and falls back to ordinary buffered writes,
//! for good, the first time the kernel refuses a direct write: a write never fails because of
//! how it was issued. Durability is unchanged: the caller's `fdatasync` on the file (through
//! any of its descriptors) also flushes the disk's cache for direct writes.
//!
//! Gathered writes ([`DirectFile::gather`]) and [`DirectFile::submit_aligned`] are handed to
//! writer threads and land while the caller goes on (see `flight`): the caller waits for them
//! ([`DirectFile::wait`], [`DirectFile::sync_data`], [`DirectFile::end_gather`]) before it
//! reads, syncs or truncates the file.
mod flight;

use flight::Flight;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// Alignment of [`AlignedBuf`]'s memory: enough for every device's direct I/O.
pub const MEM_ALIGN: usize = 4096;

/// Shortest write [`DirectFile::write_at`] sends direct. A direct write waits for its I/O:
/// for a run of small writes (a workload's 4 KiB random writes, replicated) that wait costs
/// far more than the page cache's copy, which lets the kernel write them back together.
pub const MIN_COPIED_DIRECT: usize = 128 * 1024;

/// Most bytes [`DirectFile::gather`] joins into one direct write. One large write lets the
/// disk work on its parts at once, where writes issued one after the other each wait for the
/// last: on the benchmark VM, 1 MiB direct writes reached 1.7 GB/s, 4 MiB ones 2.7 GB/s and
/// 16 MiB ones 2.8 GB/s (fio, one write in flight).
pub const GATHER_MAX: usize = 8 * 1024 * 1024;

/// A growable byte buffer whose start is [`MEM_ALIGN`]-aligned. Safe code only: it lives at an
/// aligned offset inside an ordinary `Vec`, and moves to a bigger one when it grows.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new() -> AlignedBuf {
        AlignedBuf::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// Bytes it can hold without growing.
    pub fn capacity(&self) -> usize {
        self.raw.len() - self.start
    }

    /// Makes room for `len` bytes in all, keeping the content.
    fn reserve_total(&mut self, len: usize) {
        if len <= self.capacity() {
            return;
        }
        let cap = len.max(self.capacity() * 2).max(MEM_ALIGN);
        let raw = vec![0u8; cap + MEM_ALIGN];
        let start = raw.as_ptr().align_offset(MEM_ALIGN);
        let mut grown = AlignedBuf {
            raw,
            start,
            len: self.len,
        };
        grown.raw[start..start + self.len].copy_from_slice(self.as_slice());
        *self = grown;
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    /// Appends `n` bytes and returns them for the caller to overwrite entirely. Their content
    /// is unspecified (whatever the buffer held there before, or zeros): nothing is zeroed
    /// that is about to be written anyway.
    pub fn grow(&mut self, n: usize) -> &mut [u8] {
        let from = self.len;
        self.reserve_total(from + n);
        let at = self.start + from;
        self.len += n;
        &mut self.raw[at..at + n]
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.reserve_total(self.len + data.len());
        let at = self.start + self.len;
        self.raw[at..at + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    /// Appends zeros up to the next multiple of `align`.
    pub fn pad_to(&mut self, align: usize) {
        let padded = self.len.next_multiple_of(align);
        self.reserve_total(padded);
        let from = self.start + self.len;
        self.raw[from..self.start + padded].fill(0);
        self.len = padded;
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// How a file takes direct writes: the offset and length multiple (`offset_align`), or none.
fn direct_alignment(file: &File) -> Option<u64> {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    let st = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
    if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN) {
        // A kernel before 6.1 does not say; 4096 suits every common disk, and a refusal
        // switches the file to buffered writes.
        return Some(MEM_ALIGN as u64);
    }
    let (offset, mem) = (st.stx_dio_offset_align, st.stx_dio_mem_align);
    // 0: this file system does not do direct I/O for this file. Alignments beyond a page
    // are left alone: callers pad to the alignment, and more than a page of padding is not
    // worth it (nor expected by their readers).
    let fits = |a: u32| a != 0 && a as usize <= MEM_ALIGN && MEM_ALIGN % a as usize == 0;
    (fits(offset) && fits(mem)).then_some(offset as u64)
}

/// Writing a file's data: direct where the file system allows, buffered otherwise. Holds two
/// descriptors of the file: an `O_DIRECT` one for aligned writes and an ordinary one for
/// the rest, reads, `fdatasync` and length changes.
#[derive(Debug)]
pub struct DirectFile {
    buffered: Arc<File>,
    /// The `O_DIRECT` descriptor and the offset and length multiple it needs; `None` when the
    /// file system does not take direct writes, or once it refused one.
    direct: Option<(Arc<File>, u64)>,
    /// Direct writes handed to the writer threads and not yet waited for.
    flight: Arc<Flight>,
    /// Where [`DirectFile::write_at`] copies data that is not in aligned memory; while
    /// gathering, the pieces not yet written.
    staging: AlignedBuf,
    /// Whether direct writes are being gathered ([`DirectFile::gather`]).
    gathering: bool,
    /// File offset of the gathered bytes in `staging`, while there are some.
    pending_at: Option<u64>,
    /// Direct writes still to fail (`fail_direct_writes`, for tests).
    failing: u32,
}

impl DirectFile {
    /// Adds a direct descriptor to `buffered`, an open descriptor of `path` (opened for
    /// writing, and for reading if the caller reads through [`DirectFile::file`]).
    pub fn new(buffered: File, path: &Path) -> DirectFile {
        let direct = direct_alignment(&buffered).and_then(|align| {
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(path)
                .ok()?;
            Some((Arc::new(file), align))
        });
        DirectFile {
            buffered: Arc::new(buffered),
            direct,
            flight: Arc::default(),
            staging: AlignedBuf::new(),
            gathering: false,
            pending_at: None,
            failing: 0,
        }
    }

    /// Wraps `buffered` without a direct descriptor: every write goes through the page cache.
    pub fn buffered(buffered: File) -> DirectFile {
        DirectFile {
            buffered: Arc::new(buffered),
            direct: None,
            flight: Arc::default(),
            staging: AlignedBuf::new(),
            gathering: false,
            pending_at: None,
            failing: 0,
        }
    }

    /// The offset and length multiple direct writes need, while they are in use.
    pub fn alignment(&self) -> Option<u64> {
        if self.direct.is_some() && self.flight.refused() {
            return None;
        }
        self.direct.as_ref().map(|(_, a)| *a)
    }

    /// The ordinary descriptor: for reads, `fdatasync`, `set_len` and advice. It does not see
    /// writes in flight: [`DirectFile::wait`] first.
    pub fn file(&self) -> &File {
        &self.buffered
    }

    /// Waits until every write handed to the writer threads has landed in the file; returns
    /// the first error among them (the caller then takes everything it wrote since its last
    /// successful wait as not written).
    pub fn wait(&mut self) -> io::Result<()> {
        self.flight.wait()
    }

    /// Makes every write so far durable: writes what is gathered, waits for the writes in
    /// flight, then `fdatasync`.
    pub fn sync_data(&mut self) -> io::Result<()> {
        self.end_gather()?;
        self.buffered.sync_data()
    }

    /// Whether a write of `len` bytes at `offset` can go direct.
    fn fits(&self, offset: u64, len: usize) -> bool {
        self.alignment()
            .is_some_and(|a| offset % a == 0 && len as u64 % a == 0 && len > 0)
    }

    /// From now on, until [`DirectFile::end_gather`], writes that would go direct are held
    /// back and joined with the next ones that continue them in the file, into writes of up
    /// to [`GATHER_MAX`] bytes. Any other write first writes what is held back, so writes
    /// still reach the file in the order they were made. Data held back is not in the file:
    /// nothing may read the file (nor sync it) before `end_gather`.
    pub fn gather(&mut self) {
        self.gathering = true;
    }

    /// Writes what [`DirectFile::gather`] held back, waits for every write in flight, and
    /// stops gathering.
    pub fn end_gather(&mut self) -> io::Result<()> {
        self.gathering = false;
        let pending = self.write_pending();
        let landed = self.flight.wait();
        pending.and(landed)
    }

    /// Sends the gathered bytes, if any, on their way (in flight when direct).
    fn write_pending(&mut self) -> io::Result<()> {
        let Some(at) = self.pending_at.take() else {
            return Ok(());
        };
        let staging = std::mem::take(&mut self.staging);
        self.staging = self.write_owned(staging, at)?;
        Ok(())
    }

    /// Holds `parts` back to be written with the gathered bytes they continue (or starts a
    /// new run after writing those).
    fn hold(&mut self, parts: &[&[u8]], offset: u64, len: usize) -> io::Result<()> {
        let continues = self
            .pending_at
            .is_some_and(|at| at + self.staging.len() as u64 == offset)
            && self.staging.len() + len <= GATHER_MAX;
        if !continues {
            self.write_pending()?;
            self.staging.clear();
            self.pending_at = Some(offset);
        }
        for part in parts {
            self.staging.extend_from_slice(part);
        }
        Ok(())
    }

    /// Writes an aligned buffer at `offset` without copying it: direct when offset and
    /// length fit, handed to a writer thread (in the file once [`DirectFile::wait`]
    /// returns); buffered otherwise, before this returns. Returns an empty buffer for the
    /// caller's next data (one a landed write left, or `buf` itself).
    pub fn submit_aligned(&mut self, buf: AlignedBuf, offset: u64) -> io::Result<AlignedBuf> {
        self.write_pending()?;
        self.write_owned(buf, offset)
    }

    /// Test hook: the next `n` direct writes fail with EIO, as on a failing disk.
    #[doc(hidden)]
    pub fn fail_direct_writes(&mut self, n: u32) {
        self.failing = n;
    }

    /// Writes `buf` at `offset`: handed to a writer thread when it can go direct, written
    /// buffered now otherwise (after any write in flight over the same bytes). Returns an
    /// empty buffer for the caller's next data.
    fn write_owned(&mut self, mut buf: AlignedBuf, offset: u64) -> io::Result<AlignedBuf> {
        if self.failing > 0 && self.fits(offset, buf.len()) {
            self.failing -= 1;
            return Err(io::Error::from_raw_os_error(5));
        }
        match &self.direct {
            Some((file, _)) if self.fits(offset, buf.len()) => {
                self.flight.submit(file, &self.buffered, buf, offset)?;
                Ok(flight::spare())
            }
            _ => {
                self.write_buffered(&[buf.as_slice()], offset)?;
                buf.clear();
                Ok(buf)
            }
        }
    }

    /// Writes `parts` one after the other from `offset` through the page cache, once no
    /// write in flight covers those bytes.
    fn write_buffered(&mut self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.flight.wait_for_range(offset, len as u64);
        let mut at = offset;
        for part in parts {
            self.buffered.write_all_at(part, at)?;
            at += part.len() as u64;
        }
        Ok(())
    }

    /// Writes `data`, wherever it lies in memory, at `offset`: when offset and length fit and
    /// it is at least [`MIN_COPIED_DIRECT`] bytes, it is copied into an aligned staging
    /// buffer (kept for the next call) and written direct; otherwise it is written buffered.
    /// The copy costs less than the page cache's own copy plus the work of writing back and
    /// reclaiming its pages.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_parts_at(&[data], offset)
    }

    /// Writes `parts`, one after the other, from `offset`, as [`DirectFile::write_at`] writes
    /// their concatenation: one direct write when the whole fits, so a small piece that
    /// belongs before large data (a block's header) costs no I/O of its own.
    pub fn write_parts_at(&mut self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let direct = len >= MIN_COPIED_DIRECT && self.fits(offset, len);
        if self.gathering && direct {
            return self.hold(parts, offset, len);
        }
        self.write_pending()?;
        if !direct {
            return self.write_buffered(parts, offset);
        }
        let mut staging = std::mem::take(&mut self.staging);
        staging.clear();
        for part in parts {
            staging.extend_from_slice(part);
        }
        self.staging = self.write_owned(staging, offset)?;
        // Not gathering: the write is in the file when this returns, as a buffered one is.
        self.flight.wait()
    }
}

impl Drop for DirectFile {
    /// Gathered bytes are written, and writes in flight waited for, even if the owner forgot
    /// [`DirectFile::end_gather`] (an error then has nowhere to go; the owner's next sync would
    /// not cover them anyway).
    fn drop(&mut self) {
        let _ = self.write_pending();
        let _ = self.flight.wait();
    }
}

/// Asks the kernel to start writing `file`'s dirty pages in `[offset, offset + len)` back now
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`; `len` 0 means to the end of the file):
/// asynchronous, no durability promised. A writer that makes a group durable with one
/// `fdatasync` at its end calls this as it goes, so the disk works while the rest of the group
/// is written and the `fdatasync` has little left to wait for. A hint: failure is ignored (the
/// `fdatasync` reports real I/O errors).
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; `file` owns the descriptor
    // for the duration of the call.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests;
