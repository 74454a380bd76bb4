//! [`Image`]: opening an image (with validation, parent resolution and tail repair) and the
//! public read / write / discard / flush API.
//!
//! Opening never trusts the file: the footer is looked for at the end and, for sparse images,
//! at offset 0; the dynamic header, the BAT and every block are checked against the file
//! length and each other ([`crate::layout`]) before anything is read through them; parent
//! chains are followed with loop and depth checks.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::bat::Bat;
use crate::differencing;
use crate::dynamic_header::{DynamicHeader, HEADER_SIZE};
use crate::error::{Error, Result};
use crate::footer::{DiskType, Footer};
use crate::layout::{self, Kind, Metadata};
use crate::sparse::{Sparse, SparseParts};
use crate::wire::{read_exact_at, round_up_sector, write_all_at, DataOut};
use crate::{FOOTER_SIZE, MAX_CHAIN_DEPTH, MAX_DISK_SIZE};

/// Something [`Image::open`] noticed and worked around (see [`Image::notices`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// The footer at the end of the file was missing or damaged (a torn or cut-off last
    /// write); the copy at offset 0 was used.
    EndFooterUnusable(String),
    /// The footer copy at offset 0 of a sparse image was damaged; the end footer was used.
    FooterCopyUnusable(String),
    /// `len` bytes at `offset`, past every region the BAT references, belong to nothing: blocks
    /// allocated by writes that were never flushed.
    UnreferencedTail {
        /// Start of the unreferenced bytes.
        offset: u64,
        /// Their length.
        len: u64,
    },
    /// Opened read-write: the file was cut to its last referenced byte and the footer (and
    /// footer copy, if damaged) rewritten, then synced. The file is now `file_len` bytes.
    Repaired {
        /// File length after the repair.
        file_len: u64,
    },
}

/// An open VHD image.
///
/// Reads take `&self`, writes, discards and flushes take `&mut self`: share an image between
/// threads as `Arc<RwLock<Image>>` (or `Mutex`) and run calls on blocking threads (e.g.
/// `tokio::task::spawn_blocking`). `Image` is `Send + Sync`; the only interior mutability is
/// a mutex-protected cache of sector bitmaps that reads fill lazily.
///
/// Writes are not durable until [`Image::flush`] returns; dropping a writable image flushes
/// on a best-effort basis, so call [`Image::flush`] or [`Image::close`] to see errors.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    file: File,
    writable: bool,
    footer: Footer,
    size: u64,
    sparse: Option<Sparse>,
    parent: Option<Box<Image>>,
    notices: Vec<Notice>,
    /// Data writes since the last flush (fixed images need an fsync for them).
    unflushed: bool,
    /// Bytes written since write-back was last started (see [`Image::write_at`]).
    since_writeback: u64,
    /// Data writes of a sparse image go here, bypassing the page cache where the file system
    /// allows (see [`Image::write_direct`]).
    direct: Option<dio::DirectFile>,
    flush_on_drop: bool,
}

impl Image {
    /// Opens an image read-only, with its parent chain.
    pub fn open(path: impl AsRef<Path>) -> Result<Image> {
        Image::open_in_chain(path.as_ref(), false, &mut Vec::new())
    }

    /// Opens an image for reading and writing (parents are always read-only). If the file
    /// carries leftovers of an interrupted write (no valid end footer, unreferenced bytes at
    /// the end), they are repaired first; see [`Notice::Repaired`].
    pub fn open_rw(path: impl AsRef<Path>) -> Result<Image> {
        Image::open_in_chain(path.as_ref(), true, &mut Vec::new())
    }

    /// Opens `path`, whose descendants (canonical paths) are in `chain`.
    fn open_in_chain(path: &Path, writable: bool, chain: &mut Vec<PathBuf>) -> Result<Image> {
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::ParentChainTooDeep(MAX_CHAIN_DEPTH));
        }
        let canonical = path
            .canonicalize()
            .map_err(Error::io("resolve the image path"))?;
        if chain.contains(&canonical) {
            return Err(Error::ParentLoop(canonical));
        }
        chain.push(canonical);
        let result = Image::open_file(path, writable, chain);
        chain.pop();
        result
    }

    fn open_file(path: &Path, writable: bool, chain: &mut Vec<PathBuf>) -> Result<Image> {
        let file = File::options()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(Error::io("open the image"))?;
        let file_len = file.metadata().map_err(Error::io("stat the image"))?.len();
        if file_len < FOOTER_SIZE {
            return Err(Error::NotVhd {
                detail: format!("the file is {file_len} bytes, shorter than a footer"),
            });
        }
        let mut notices = Vec::new();
        let mut end = [0u8; 512];
        read_exact_at(&file, &mut end, file_len - FOOTER_SIZE, "read the footer")?;
        let mut first = [0u8; 512];
        read_exact_at(&file, &mut first, 0, "read the footer copy")?;
        let copy = Footer::parse(&first);
        let (footer, footer_bytes, end_valid) = match Footer::parse(&end) {
            Ok(f) => (f, end, true),
            Err(end_err) => match copy {
                // Only sparse images have a copy at offset 0.
                Ok(ref f) if f.disk_type != DiskType::Fixed => {
                    notices.push(Notice::EndFooterUnusable(end_err.to_string()));
                    (f.clone(), first, false)
                }
                _ => return Err(end_err),
            },
        };
        let size = footer.virtual_size();
        if size > MAX_DISK_SIZE {
            return Err(Error::TooLarge {
                size,
                max: MAX_DISK_SIZE,
            });
        }
        let mut image = Image {
            path: path.to_path_buf(),
            file,
            writable,
            footer,
            size,
            sparse: None,
            parent: None,
            notices,
            unflushed: false,
            since_writeback: 0,
            direct: None,
            flush_on_drop: writable,
        };
        if image.footer.disk_type == DiskType::Fixed {
            if size > file_len - FOOTER_SIZE {
                return Err(Error::InvalidSize {
                    size,
                    reason: "a fixed image's data area is shorter than its virtual size",
                });
            }
            return Ok(image);
        }
        let copy_damaged = match copy {
            Err(e) if end_valid => {
                image
                    .notices
                    .push(Notice::FooterCopyUnusable(e.to_string()));
                true
            }
            _ => false,
        };
        image.open_sparse(file_len, end_valid, footer_bytes, copy_damaged, chain)?;
        Ok(image)
    }

    /// Reads and validates the dynamic header, BAT and layout; resolves the parent; repairs
    /// the tail when writable.
    fn open_sparse(
        &mut self,
        file_len: u64,
        end_valid: bool,
        footer_bytes: [u8; 512],
        copy_damaged: bool,
        chain: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let limit = if end_valid {
            file_len - FOOTER_SIZE
        } else {
            file_len
        };
        let header_offset = self.footer.data_offset;
        layout::check_in_file(Kind::Header, header_offset, HEADER_SIZE, limit)?;
        let mut raw = [0u8; 1024];
        read_exact_at(
            &self.file,
            &mut raw,
            header_offset,
            "read the dynamic header",
        )?;
        let header = DynamicHeader::parse(&raw, header_offset)?;
        let block_size = u64::from(header.block_size);
        let needed = self.size.div_ceil(block_size);
        if u64::from(header.max_table_entries) < needed {
            return Err(Error::TableTooSmall {
                entries: header.max_table_entries,
                needed,
            });
        }
        let bat_bytes = round_up_sector(u64::from(header.max_table_entries) * 4);
        layout::check_in_file(Kind::Bat, header.table_offset, bat_bytes, limit)?;
        // `needed` ≤ max_table_entries, whose table was just checked to lie in the file.
        let count = usize::try_from(needed).map_err(|_| Error::TooLarge {
            size: self.size,
            max: MAX_DISK_SIZE,
        })?;
        let bat = Bat::read(&self.file, header.table_offset, count)?;
        let differencing = self.footer.disk_type == DiskType::Differencing;
        let locators = if differencing {
            header
                .locators
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_used())
                .map(|(i, l)| (i, l.data_offset, u64::from(l.data_length)))
                .collect()
        } else {
            Vec::new()
        };
        let meta = Metadata {
            header_offset,
            bat_offset: header.table_offset,
            bat_bytes,
            locators,
        };
        let span = header.bitmap_size() + block_size;
        let next_free = layout::check(&meta, &bat, span, limit)?;

        if differencing {
            self.parent = Some(Box::new(self.open_parent(&header, chain)?));
        }

        let used_end = if end_valid { limit } else { file_len };
        if used_end > next_free {
            self.notices.push(Notice::UnreferencedTail {
                offset: next_free,
                len: used_end - next_free,
            });
        }
        let mut footer_at = if end_valid { limit } else { u64::MAX };
        if self.writable
            && (footer_at != next_free || file_len != next_free + FOOTER_SIZE || copy_damaged)
        {
            // Everything past `next_free` is unreferenced, so cutting it is safe; it also
            // guarantees that new blocks are appended over fresh (zero) space.
            self.file
                .set_len(next_free)
                .map_err(Error::io("truncate unreferenced bytes"))?;
            write_all_at(&self.file, &footer_bytes, next_free, "write the footer")?;
            if copy_damaged {
                write_all_at(&self.file, &footer_bytes, 0, "write the footer copy")?;
            }
            self.file
                .sync_data()
                .map_err(Error::io("sync the repair"))?;
            footer_at = next_free;
            self.notices.push(Notice::Repaired {
                file_len: next_free + FOOTER_SIZE,
            });
        }
        self.sparse = Some(Sparse::new(SparseParts {
            header,
            differencing,
            size: self.size,
            bat,
            next_free,
            footer_at,
            footer: footer_bytes,
        }));
        Ok(())
    }

    /// Finds and opens the parent named by `header`, checking its UUID.
    fn open_parent(&self, header: &DynamicHeader, chain: &mut Vec<PathBuf>) -> Result<Image> {
        let candidates = differencing::candidates(&self.path, &self.file, header)?;
        let mut first_error = None;
        for candidate in &candidates {
            if !candidate.is_file() {
                continue;
            }
            match Image::open_in_chain(candidate, false, chain) {
                Ok(parent) if parent.footer.uuid == header.parent_uuid => return Ok(parent),
                Ok(parent) => {
                    first_error.get_or_insert(Error::ParentMismatch {
                        child: self.path.clone(),
                        parent: candidate.clone(),
                        expected: header.parent_uuid,
                        found: parent.footer.uuid,
                    });
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Error::ParentNotFound {
            child: self.path.clone(),
            tried: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }))
    }

    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The dynamic header (sparse images only).
    pub fn dynamic_header(&self) -> Option<&DynamicHeader> {
        self.sparse.as_ref().map(Sparse::header)
    }

    /// Block size in bytes (sparse images only).
    pub fn block_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(Sparse::block_size)
    }

    /// Number of allocated blocks (sparse images only).
    pub fn allocated_blocks(&self) -> Option<usize> {
        self.sparse.as_ref().map(Sparse::allocated_count)
    }

    /// The parent of a differencing image.
    pub fn parent(&self) -> Option<&Image> {
        self.parent.as_deref()
    }

    /// True when opened with [`Image::open_rw`] (or created).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// What opening noticed or repaired.
    pub fn notices(&self) -> &[Notice] {
        &self.notices
    }

    /// Length the file will have after the next flush: for sparse images the end of the last
    /// block plus the footer.
    pub fn file_len(&self) -> u64 {
        match &self.sparse {
            Some(s) => s.next_free() + FOOTER_SIZE,
            None => self.size + FOOTER_SIZE,
        }
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Unallocated blocks read as zeros (or, in a
    /// differencing image, as the parent's data).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_bounds(offset, buf.len() as u64)?;
        match &self.sparse {
            None => read_exact_at(&self.file, buf, offset, "read data"),
            Some(s) => s.read(&self.file, self.parent.as_deref(), buf, offset),
        }
    }

    /// Like [`Image::read_at`], but bytes past the virtual size read as zeros (a parent may be
    /// smaller than its child).
    pub(crate) fn read_clamped(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail > 0 {
            self.read_at(&mut buf[..avail], offset)?;
        }
        Ok(())
    }

    /// False only when no image in the chain has data anywhere in `offset..offset + len`
    /// (so the range reads as zeros without reading anything).
    pub fn may_have_data(&self, offset: u64, len: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        match &self.sparse {
            None => true,
            Some(s) => {
                s.any_allocated(offset, len)
                    || self
                        .parent
                        .as_ref()
                        .is_some_and(|p| p.may_have_data(offset, len))
            }
        }
    }

    /// Writes `buf` at `offset`. Any alignment works; all-zero data over an unallocated block
    /// (whose content is already zero) allocates nothing. Not durable until [`Image::flush`].
    ///
    /// Every 4 MiB written through the page cache, the kernel is asked to start writing the
    /// file's dirty pages (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: asynchronous, no
    /// durability promised), so the disk works while the caller keeps writing and the next
    /// flush has little left to do. Without it nothing reaches the disk before the flush of a
    /// batch smaller than the kernel's dirty threshold, and writing and flushing happen one
    /// after the other.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.check_bounds(offset, buf.len() as u64)?;
        self.unflushed = true;
        match &mut self.sparse {
            None => write_all_at(&self.file, buf, offset, "write data")?,
            Some(s) => {
                let mut out = match &mut self.direct {
                    Some(direct) => DataOut::Direct(direct),
                    None => DataOut::Buffered(&self.file),
                };
                s.write(&self.file, &mut out, self.parent.as_deref(), buf, offset)?
            }
        }
        self.since_writeback += buf.len() as u64;
        // Direct data writes leave next to nothing in the page cache to start on (the flush's
        // `fdatasync` takes the few pieces that went buffered).
        if self.since_writeback >= EARLY_WRITEBACK && !self.writes_direct() {
            self.since_writeback = 0;
            dio::start_writeback(&self.file, 0, 0);
        }
        Ok(())
    }

    /// From now on, writes the data of this sparse image's blocks with `O_DIRECT` wherever
    /// the file system takes it and a write covers whole sectors and at least
    /// `dio::MIN_COPIED_DIRECT` bytes (copied into an aligned buffer first); metadata and
    /// other writes still go through the page cache. For writers that stream data in and
    /// rarely read it back: it saves the page cache's copy and the work of writing back and
    /// reclaiming its pages. Durability is unchanged ([`Image::flush`]'s `fdatasync` covers
    /// direct writes too). Returns whether direct writes are in use.
    pub fn write_direct(&mut self) -> Result<bool> {
        if !self.writable || self.sparse.is_none() {
            return Ok(false);
        }
        if self.direct.is_none() {
            let file = self
                .file
                .try_clone()
                .map_err(Error::io("open the image for direct writes"))?;
            self.direct = Some(dio::DirectFile::new(file, &self.path));
        }
        Ok(self.writes_direct())
    }

    /// Whether data writes go direct (set up, and not refused by the file system since).
    fn writes_direct(&self) -> bool {
        self.direct
            .as_ref()
            .is_some_and(|d| d.alignment().is_some())
    }

    /// Runs `writes`, which only writes, zeroes and discards (no reads, no flush), with the
    /// direct data writes it makes gathered ([`Image::write_direct`], `dio::DirectFile::gather`):
    /// pieces that follow each other in the file, like a sequential stream's data in the new
    /// blocks it allocates one after the other, go out as one write of up to
    /// `dio::GATHER_MAX` bytes instead of one per block or extent. Everything is in the file
    /// when this returns (not durable until [`Image::flush`]).
    pub fn gathered<T>(&mut self, writes: impl FnOnce(&mut Image) -> Result<T>) -> Result<T> {
        if let Some(direct) = &mut self.direct {
            direct.gather();
        }
        let result = writes(self);
        let ended = self.end_gather();
        let value = result.inspect_err(|_| self.after_failed_write())?;
        ended?;
        Ok(value)
    }

    /// Writes what is gathered, if anything.
    fn end_gather(&mut self) -> Result<()> {
        let ended = match &mut self.direct {
            Some(direct) => direct.end_gather().map_err(Error::io("write data")),
            None => Ok(()),
        };
        ended.inspect_err(|_| self.after_failed_write())
    }

    /// A write failed: bytes that were gathered may have been dropped, a new block's bitmap
    /// among them, so the next flush writes every new block's bitmap again.
    fn after_failed_write(&mut self) {
        if let Some(sparse) = &mut self.sparse {
            sparse.rewrite_new_bitmaps();
        }
    }

    /// Test hook: the next `n` direct writes fail as on a failing disk.
    #[doc(hidden)]
    pub fn fail_direct_writes(&mut self, n: u32) {
        if let Some(direct) = &mut self.direct {
            direct.fail_direct_writes(n);
        }
    }

    /// Unmaps the blocks of a dynamic image that lie wholly inside `offset..offset + len`
    /// (they then read as zeros and their space is punched out of the file after the next
    /// flush). Partial blocks, fixed and differencing images are left unchanged: discard is a
    /// hint. Returns the number of bytes unmapped.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<u64> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.check_bounds(offset, len)?;
        Ok(match &mut self.sparse {
            Some(s) => s.discard(offset, len),
            None => 0,
        })
    }

    /// Makes `offset..offset + len` read as zeros: whole blocks of a dynamic image are
    /// unmapped; elsewhere zeros are written only where some image in the chain may hold data,
    /// so zeroing a mostly empty range costs little.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)?;
        let end = offset + len;
        let step = self.block_size().unwrap_or(1 << 20);
        let zeros = vec![0u8; step.min(len) as usize];
        let mut pos = offset;
        while pos < end {
            let n = (step - pos % step).min(end - pos);
            if self.may_have_data(pos, n) {
                self.write_at(&zeros[..n as usize], pos)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Makes every write, discard and allocation made before this call durable (data first,
    /// then metadata, each followed by `fdatasync`; see the crate docs). A no-op on read-only
    /// images.
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.end_gather()?;
        match &mut self.sparse {
            Some(s) => s.flush(&self.file)?,
            None => {
                if self.unflushed {
                    self.file.sync_data().map_err(Error::io("sync data"))?;
                }
            }
        }
        self.unflushed = false;
        Ok(())
    }

    /// Asks the kernel to drop the file's clean cached pages (call after [`Image::flush`]):
    /// for writers that stream data into the image and rarely read it back, so the page
    /// cache is left to readers that need it. A hint: nothing changes on disk.
    pub fn drop_cached_pages(&self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: posix_fadvise only reads its integer arguments; `file` owns the descriptor
        // for the duration of the call.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }

    /// Flushes and closes the image.
    pub fn close(mut self) -> Result<()> {
        self.flush()
    }

    /// Runs only the first step of [`Image::flush`] (new blocks and data made durable, nothing
    /// published), as a crash between the two `fdatasync`s would leave it. For crash-safety
    /// tests.
    #[doc(hidden)]
    pub fn flush_data_only(&mut self) -> Result<()> {
        match &mut self.sparse {
            Some(s) if self.writable => s.flush_new_blocks(&self.file),
            _ => Ok(()),
        }
    }

    /// Closes the image without flushing, as a crash would leave it: writes reach the file
    /// (page cache) but nothing is published. For crash-safety tests.
    #[doc(hidden)]
    pub fn drop_without_flush(mut self) {
        self.flush_on_drop = false;
    }

    /// Virtual byte ranges that may hold data, merged and in order: allocated blocks of this
    /// image and (for differencing images) of its parents; the whole disk for fixed images.
    /// Everything outside reads as zeros, so copying only these ranges copies the disk.
    pub fn allocated_ranges(&self) -> Vec<Range<u64>> {
        let Some(sparse) = &self.sparse else {
            return if self.size == 0 {
                Vec::new()
            } else {
                std::iter::once(0..self.size).collect()
            };
        };
        let mut ranges = sparse.allocated_ranges();
        if let Some(parent) = &self.parent {
            ranges.extend(
                parent
                    .allocated_ranges()
                    .into_iter()
                    .filter(|r| r.start < self.size)
                    .map(|r| (r.start, r.end.min(self.size))),
            );
            ranges.sort_unstable();
        }
        let mut merged: Vec<Range<u64>> = Vec::new();
        for (from, to) in ranges {
            match merged.last_mut() {
                Some(last) if last.end >= from => last.end = last.end.max(to),
                _ => merged.push(from..to),
            }
        }
        merged
    }

    fn is_dirty(&self) -> bool {
        self.unflushed || self.sparse.as_ref().is_some_and(Sparse::is_dirty)
    }
}

/// Bytes written between two write-back starts: small enough that the disk writes a group's
/// first pieces while the rest is being copied (at 32 MiB it sat idle through most of a
/// master target's group, whose apply then took about a fifth longer).
const EARLY_WRITEBACK: u64 = 4 << 20;

impl Drop for Image {
    fn drop(&mut self) {
        if self.flush_on_drop && self.writable && self.is_dirty() {
            // Best effort: errors cannot be reported from drop; `close` reports them.
            let _ = self.flush();
        }
    }
}
