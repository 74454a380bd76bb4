//! The engine of dynamic and differencing images: block lookup, allocation, reads that fall
//! through to zeros or to the parent, writes, discard, and the ordered flush.
//!
//! Blocks are only ever appended at `next_free`, the first byte after every region the file
//! uses. Space freed by discard is returned to the file system with a hole punch, never reused,
//! so a block's data area is always fresh (zero) file space when it is allocated. That is what
//! lets a new block of a dynamic image carry an all-ones bitmap from the start and lets
//! partial writes avoid any read-modify-write of the block: only an unaligned write into a
//! sector whose bitmap bit is clear merges that one sector.
//!
//! Metadata (bitmaps of existing blocks, BAT, footer) is written only by [`Sparse::flush`], in
//! the order documented at the crate root.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Mutex, PoisonError};

use crate::bat::{Bat, UNALLOCATED};
use crate::bitmap::{self, BitmapCache, Bits};
use crate::dynamic_header::DynamicHeader;
use crate::error::{Error, Result};
use crate::wire::{is_zero, write_all_at, DataOut};
use crate::{Image, SECTOR_SIZE};

/// State of an open dynamic or differencing image.
#[derive(Debug)]
pub(crate) struct Sparse {
    header: DynamicHeader,
    differencing: bool,
    /// Virtual size, bytes.
    size: u64,
    block_size: u64,
    bitmap_size: u64,
    bat: Bat,
    /// Behind a mutex so reads (`&self`) can fill it lazily; writes use `get_mut`.
    bitmaps: Mutex<BitmapCache>,
    /// Where the next block goes; the end footer belongs here after a flush.
    next_free: u64,
    /// Where the end footer is on disk (as of the last flush or open).
    footer_at: u64,
    footer: [u8; 512],
    /// Blocks allocated since the last flush: the on-disk BAT does not reference them yet, so
    /// their bitmaps may be written before the data is durable.
    new_blocks: BTreeSet<u64>,
    /// New blocks whose bitmap is already written: it went out with their first data.
    bitmap_written: BTreeSet<u64>,
    /// Blocks referenced on disk whose bitmap gained bits since the last flush.
    grown: BTreeSet<u64>,
    /// File ranges of discarded blocks, punched out after the BAT no longer references them.
    punch: Vec<(u64, u64)>,
}

/// Everything [`Sparse::new`] needs, gathered by the opener or creator.
pub(crate) struct SparseParts {
    pub header: DynamicHeader,
    pub differencing: bool,
    pub size: u64,
    pub bat: Bat,
    pub next_free: u64,
    pub footer_at: u64,
    pub footer: [u8; 512],
}

impl Sparse {
    pub(crate) fn new(p: SparseParts) -> Sparse {
        let block_size = u64::from(p.header.block_size);
        let bitmap_size = p.header.bitmap_size();
        let sectors_per_block =
            u32::try_from(block_size / SECTOR_SIZE).expect("block size ≤ 256 MiB");
        Sparse {
            differencing: p.differencing,
            size: p.size,
            block_size,
            bitmap_size,
            bitmaps: Mutex::new(BitmapCache::new(p.bat.len(), sectors_per_block)),
            bat: p.bat,
            next_free: p.next_free,
            footer_at: p.footer_at,
            footer: p.footer,
            header: p.header,
            new_blocks: BTreeSet::new(),
            bitmap_written: BTreeSet::new(),
            grown: BTreeSet::new(),
            punch: Vec::new(),
        }
    }

    pub(crate) fn header(&self) -> &DynamicHeader {
        &self.header
    }

    pub(crate) fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of allocated blocks.
    pub(crate) fn allocated_count(&self) -> usize {
        self.bat.allocated().count()
    }

    /// Where the next block would be appended (the file's used length before the footer).
    pub(crate) fn next_free(&self) -> u64 {
        self.next_free
    }

    /// True when writes since the last flush have not been published yet.
    pub(crate) fn is_dirty(&self) -> bool {
        !self.new_blocks.is_empty()
            || !self.grown.is_empty()
            || self.bat.is_dirty()
            || !self.punch.is_empty()
            || self.footer_at != self.next_free
    }

    /// Virtual byte ranges of allocated blocks, merged, in order.
    pub(crate) fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (block, _) in self.bat.allocated() {
            let from = block * self.block_size;
            let to = (from + self.block_size).min(self.size);
            match out.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ => out.push((from, to)),
            }
        }
        out
    }

    /// True when some block overlapping `offset..offset + len` is allocated.
    pub(crate) fn any_allocated(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset / self.block_size;
        let last = (offset + len - 1) / self.block_size;
        (first..=last).any(|b| self.bat.get(b).is_some())
    }

    /// Reads `buf.len()` bytes at virtual `offset` (already bounds-checked).
    pub(crate) fn read(
        &self,
        file: &File,
        parent: Option<&Image>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / self.block_size;
            let in_block = pos % self.block_size;
            let n = (self.block_size - in_block).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + n];
            match self.bat.get(block) {
                None => self.fill_unwritten(parent, chunk, pos)?,
                Some(start) => {
                    let data = start + self.bitmap_size;
                    match self.bits(file, block, start)? {
                        Bits::Full => read_zero_padded(file, chunk, data + in_block)?,
                        Bits::Partial(bits) => {
                            let end = in_block + n as u64;
                            for (present, from, to) in bitmap::runs(&bits, in_block, end) {
                                let sub = &mut chunk
                                    [(from - in_block) as usize..(to - in_block) as usize];
                                if present {
                                    read_zero_padded(file, sub, data + from)?;
                                } else {
                                    let virt = block * self.block_size + from;
                                    self.fill_unwritten(parent, sub, virt)?;
                                }
                            }
                        }
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at virtual `offset` (already bounds-checked); its data goes to `out`.
    pub(crate) fn write(
        &mut self,
        file: &File,
        out: &mut DataOut,
        parent: Option<&Image>,
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / self.block_size;
            let in_block = pos % self.block_size;
            let n = (self.block_size - in_block).min((buf.len() - done) as u64) as usize;
            let chunk = &buf[done..done + n];
            self.write_block(file, out, parent, block, in_block, chunk)?;
            done += n;
        }
        Ok(())
    }

    fn write_block(
        &mut self,
        file: &File,
        out: &mut DataOut,
        parent: Option<&Image>,
        block: u64,
        in_block: u64,
        chunk: &[u8],
    ) -> Result<()> {
        let n = chunk.len() as u64;
        let virt = block * self.block_size + in_block;
        let (start, fresh) = match self.bat.get(block) {
            Some(start) => (start, false),
            None => {
                // Zeros over an unallocated block change nothing a reader sees, unless a
                // differencing image would otherwise show the parent's data there.
                if is_zero(chunk) && !self.parent_has_data(parent, virt, n) {
                    return Ok(());
                }
                (self.allocate(block)?, true)
            }
        };
        let data = start + self.bitmap_size;
        let bits = self.bits_mut(file, block, start)?;
        let Bits::Partial(bits) = bits else {
            if fresh && in_block == 0 {
                // A new block of a dynamic image: its bitmap (all ones, for good) sits just
                // before this data. Written with it, it costs no I/O of its own; written alone
                // at the flush, its sector shares a page the direct data write left uncached,
                // so the kernel would first read that page from the disk.
                let bitmap = self.cache().encode(block, self.bitmap_size as usize);
                if let Some(written) = out.write_with_head(&bitmap, chunk, start, "write data") {
                    written?;
                    self.bitmap_written.insert(block);
                    return Ok(());
                }
            }
            return out.write_all_at(chunk, data + in_block, "write data");
        };
        // Sectors whose bit is clear hold no data of their own: an unaligned write into one
        // must also write the rest of that sector (zeros or the parent's bytes) before the bit
        // is set. Only the first and last sector can be unaligned.
        let (mut lo, mut hi) = (in_block, in_block + n);
        let head = lo / SECTOR_SIZE;
        if lo % SECTOR_SIZE != 0 && !bitmap::bit(&bits, sector_u32(head)) {
            let s_start = head * SECTOR_SIZE;
            let upto = hi.min(s_start + SECTOR_SIZE);
            let mut sector = [0u8; SECTOR_SIZE as usize];
            self.fill_unwritten(parent, &mut sector, block * self.block_size + s_start)?;
            sector[(lo - s_start) as usize..(upto - s_start) as usize]
                .copy_from_slice(&chunk[(lo - in_block) as usize..(upto - in_block) as usize]);
            out.write_all_at(&sector, data + s_start, "write data")?;
            lo = upto;
        }
        if lo < hi && hi % SECTOR_SIZE != 0 {
            let tail = (hi - 1) / SECTOR_SIZE;
            if !bitmap::bit(&bits, sector_u32(tail)) {
                let s_start = tail * SECTOR_SIZE;
                let mut sector = [0u8; SECTOR_SIZE as usize];
                self.fill_unwritten(parent, &mut sector, block * self.block_size + s_start)?;
                sector[..(hi - s_start) as usize]
                    .copy_from_slice(&chunk[(s_start - in_block) as usize..]);
                out.write_all_at(&sector, data + s_start, "write data")?;
                hi = s_start;
            }
        }
        if lo < hi {
            let part = &chunk[(lo - in_block) as usize..(hi - in_block) as usize];
            out.write_all_at(part, data + lo, "write data")?;
        }
        let first = in_block / SECTOR_SIZE;
        let end = (in_block + n).div_ceil(SECTOR_SIZE);
        let changed = self
            .cache_mut()
            .set_range(block, sector_u32(first), sector_u32(end - first));
        if changed && !self.new_blocks.contains(&block) {
            self.grown.insert(block);
        }
        Ok(())
    }

    /// Appends a block for `block` at `next_free` and returns its offset. The BAT change stays
    /// in memory until the next flush.
    fn allocate(&mut self, block: u64) -> Result<u64> {
        let start = self.next_free;
        let sector = u32::try_from(start / SECTOR_SIZE)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| {
                Error::Unsupported("image file would outgrow the BAT's 2 TiB addressing".into())
            })?;
        self.bat.set(block, sector);
        self.next_free = start + self.bitmap_size + self.block_size;
        self.new_blocks.insert(block);
        let differencing = self.differencing;
        let bitmap_size = self.bitmap_size as usize;
        let cache = self.cache_mut();
        if differencing {
            // Nothing written yet: every sector still comes from the parent.
            cache.insert(block, vec![0u8; bitmap_size].into_boxed_slice());
        } else {
            // The data area is fresh file space (zeros), so every sector is validly present.
            cache.set_full(block);
        }
        Ok(start)
    }

    /// Unmaps every allocated block wholly inside `offset..offset + len` of a dynamic image
    /// (the last, partial block of the disk counts as whole when the range reaches the end).
    /// Returns the number of virtual bytes unmapped. Differencing images are left alone:
    /// unmapping there would expose the parent's data instead of zeros.
    pub(crate) fn discard(&mut self, offset: u64, len: u64) -> u64 {
        if self.differencing || len == 0 {
            return 0;
        }
        let end = offset + len;
        let first = offset.div_ceil(self.block_size);
        let last = if end >= self.size {
            self.size.div_ceil(self.block_size)
        } else {
            end / self.block_size
        };
        let span = self.bitmap_size + self.block_size;
        let mut unmapped = 0;
        for block in first..last {
            let Some(start) = self.bat.get(block) else {
                continue;
            };
            self.bat.set(block, UNALLOCATED);
            self.new_blocks.remove(&block);
            self.bitmap_written.remove(&block);
            self.grown.remove(&block);
            self.cache_mut().forget(block);
            self.punch.push((start, span));
            let from = block * self.block_size;
            unmapped += (from + self.block_size).min(self.size) - from;
        }
        unmapped
    }

    /// Forgets which new blocks' bitmaps went out with their first data, so the next flush
    /// writes them all: after a failed write, a bitmap counted as written may have been
    /// dropped with the gathered bytes it was held in.
    pub(crate) fn rewrite_new_bitmaps(&mut self) {
        self.bitmap_written.clear();
    }

    /// Makes every write so far durable, in the crash-safe order:
    /// 1. bitmaps of blocks allocated since the last flush, and the footer at the new end —
    ///    all in space the on-disk BAT does not reference yet; then `fdatasync`, which also
    ///    makes the caller's data writes durable;
    /// 2. bitmaps that gained bits in blocks the BAT already references, and the dirty BAT
    ///    sectors; then `fdatasync` again. Only now does on-disk metadata point at the new
    ///    data, and that data is already durable;
    /// 3. punch out discarded blocks, which the durable BAT no longer references.
    pub(crate) fn flush(&mut self, file: &File) -> Result<()> {
        self.flush_new_blocks(file)?;
        self.publish(file)
    }

    /// Step 1 of [`Sparse::flush`]: new blocks' bitmaps and the footer at the new end, then
    /// `fdatasync`. Nothing the on-disk BAT references changes.
    pub(crate) fn flush_new_blocks(&mut self, file: &File) -> Result<()> {
        let bitmap_size = self.bitmap_size as usize;
        for &block in self.new_blocks.difference(&self.bitmap_written) {
            if let Some(start) = self.bat.get(block) {
                let bytes = self.cache().encode(block, bitmap_size);
                write_all_at(file, &bytes, start, "write a sector bitmap")?;
            }
        }
        if self.footer_at != self.next_free {
            write_all_at(file, &self.footer, self.next_free, "write the footer")?;
        }
        file.sync_data().map_err(Error::io("sync data"))
    }

    /// Steps 2 and 3 of [`Sparse::flush`].
    fn publish(&mut self, file: &File) -> Result<()> {
        let bitmap_size = self.bitmap_size as usize;
        let publish = !self.grown.is_empty() || self.bat.is_dirty();
        for &block in &self.grown {
            if let Some(start) = self.bat.get(block) {
                let bytes = self.cache().encode(block, bitmap_size);
                write_all_at(file, &bytes, start, "write a sector bitmap")?;
            }
        }
        self.bat.write_dirty(file)?;
        if publish {
            file.sync_data().map_err(Error::io("sync metadata"))?;
        }
        self.new_blocks.clear();
        self.bitmap_written.clear();
        self.grown.clear();
        self.footer_at = self.next_free;

        for (offset, len) in self.punch.drain(..) {
            punch_hole(file, offset, len);
        }
        Ok(())
    }

    /// Content of never-written sectors at virtual `offset`: the parent's bytes for a
    /// differencing image, zeros otherwise.
    fn fill_unwritten(&self, parent: Option<&Image>, buf: &mut [u8], offset: u64) -> Result<()> {
        match parent {
            Some(p) if self.differencing => p.read_clamped(buf, offset),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn parent_has_data(&self, parent: Option<&Image>, offset: u64, len: u64) -> bool {
        self.differencing && parent.is_some_and(|p| p.may_have_data(offset, len))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BitmapCache> {
        // A panic elsewhere cannot leave the cache half-updated (each update is a single
        // assignment or insert), so a poisoned lock is still safe to use.
        self.bitmaps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cache_mut(&mut self) -> &mut BitmapCache {
        self.bitmaps
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `block`'s bitmap, read from the file on first use.
    fn bits(&self, file: &File, block: u64, start: u64) -> Result<Bits> {
        let mut cache = self.cache();
        if let Some(bits) = cache.get(block) {
            return Ok(bits);
        }
        let mut raw = vec![0u8; self.bitmap_size as usize];
        read_zero_padded(file, &mut raw, start)?;
        cache.insert(block, raw.into_boxed_slice());
        Ok(cache.get(block).unwrap_or(Bits::Full))
    }

    /// Like [`Sparse::bits`], without locking, for the write path.
    fn bits_mut(&mut self, file: &File, block: u64, start: u64) -> Result<Bits> {
        let bitmap_size = self.bitmap_size as usize;
        let cache = self.cache_mut();
        if cache.is_full(block) {
            return Ok(Bits::Full);
        }
        if !cache.is_known(block) {
            let mut raw = vec![0u8; bitmap_size];
            read_zero_padded(file, &mut raw, start)?;
            cache.insert(block, raw.into_boxed_slice());
        }
        Ok(cache.get(block).unwrap_or(Bits::Full))
    }
}

/// Sector index within a block as `u32` (a block has at most 2^19 sectors).
fn sector_u32(sector: u64) -> u32 {
    u32::try_from(sector).expect("sector index within a block fits u32")
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros. A block
/// allocated since the last flush may not be fully backed by the file yet (its tail is a
/// not-yet-written hole past the end), and that is what it must read as.
fn read_zero_padded(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read data")(e)),
        }
    }
    Ok(())
}

/// Returns a discarded block's space to the file system. Best effort: a file system without
/// hole punching just keeps the (unreferenced) bytes.
fn punch_hole(file: &File, offset: u64, len: u64) {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`,
    // which outlives the call.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        );
    }
}
