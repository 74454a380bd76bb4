//! The persistent dirty map of one disk: a bit per region (1 MiB) that may hold writes not yet
//! durable at the process server. A bit is set, and the map made durable, *before* a write to
//! a clean region reaches the source, so a crash can never hide a write: after a restart every
//! set bit is resynced. Bits are cleared lazily once everything written to the region is
//! durable downstream; a stale set bit only costs a little extra resync.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes covered by one bit.
pub const REGION: u64 = 1 << 20;
/// The map is written back in pages of this many bytes.
const PAGE: usize = 4096;

pub struct DirtyMap {
    file: File,
    bits: Vec<u8>,
    /// For each region, the capture index of the last write to it (0: none since start).
    last_write: Vec<u64>,
    /// Pages changed in memory since the last write-back.
    dirty_pages: Vec<bool>,
}

impl DirtyMap {
    /// Opens the map of a disk of `size` bytes, creating a clean one if missing.
    pub fn open(path: &Path, size: u64) -> io::Result<DirtyMap> {
        let regions = size.div_ceil(REGION) as usize;
        let len = regions.div_ceil(8);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bits = vec![0u8; len];
        let on_disk = file.metadata()?.len() as usize;
        if on_disk > 0 {
            let n = on_disk.min(len);
            file.read_exact_at(&mut bits[..n], 0)?;
        }
        file.set_len(len as u64)?;
        file.sync_all()?;
        // Bits set before this start stand for writes whose fate is unknown: only a resync
        // of the region (`clear_range`) may clear them.
        let last_write = (0..regions)
            .map(|r| {
                if bits[r / 8] & (1 << (r % 8)) != 0 {
                    u64::MAX
                } else {
                    0
                }
            })
            .collect();
        Ok(DirtyMap {
            file,
            bits,
            last_write,
            dirty_pages: vec![false; len.div_ceil(PAGE)],
        })
    }

    fn regions(offset: u64, len: u64) -> std::ops::Range<usize> {
        let first = (offset / REGION) as usize;
        let last = if len == 0 {
            first
        } else {
            ((offset + len - 1) / REGION) as usize
        };
        first..last + 1
    }

    fn is_set(&self, r: usize) -> bool {
        self.bits
            .get(r / 8)
            .is_some_and(|b| b & (1 << (r % 8)) != 0)
    }

    /// Marks the regions of a write with capture index `index`; makes the map durable first if
    /// a region was clean. Call before the write reaches the source.
    pub fn mark(&mut self, offset: u64, len: u64, index: u64) -> io::Result<()> {
        let mut newly = Vec::new();
        for r in Self::regions(offset, len) {
            if r >= self.last_write.len() {
                break;
            }
            self.last_write[r] = index;
            if !self.is_set(r) {
                self.bits[r / 8] |= 1 << (r % 8);
                newly.push(r / 8 / PAGE);
            }
        }
        if newly.is_empty() {
            return Ok(());
        }
        newly.dedup();
        for page in newly {
            self.write_page(page)?;
        }
        self.file.sync_data()
    }

    fn write_page(&mut self, page: usize) -> io::Result<()> {
        let start = page * PAGE;
        let end = (start + PAGE).min(self.bits.len());
        self.file
            .write_all_at(&self.bits[start..end], start as u64)?;
        if let Some(p) = self.dirty_pages.get_mut(page) {
            *p = false;
        }
        Ok(())
    }

    /// Clears regions whose every write (capture index ≤ `durable_index`) is durable
    /// downstream. In memory only; `write_back` persists it.
    pub fn clear_through(&mut self, durable_index: u64) {
        for r in 0..self.last_write.len() {
            if self.is_set(r) && self.last_write[r] <= durable_index {
                self.bits[r / 8] &= !(1 << (r % 8));
                self.dirty_pages[r / 8 / PAGE] = true;
            }
        }
    }

    /// Clears the regions wholly inside `offset..offset+len` that have not been written since
    /// capture index `since` (a resync shipped them as of that point).
    pub fn clear_range(&mut self, offset: u64, len: u64, since: u64) {
        for r in Self::regions(offset, len) {
            let start = r as u64 * REGION;
            if start < offset || start + REGION > offset + len {
                continue;
            }
            if self.is_set(r) && (self.last_write[r] == u64::MAX || self.last_write[r] <= since) {
                self.bits[r / 8] &= !(1 << (r % 8));
                self.last_write[r] = 0;
                self.dirty_pages[r / 8 / PAGE] = true;
            }
        }
    }

    /// Marks every region dirty (the whole disk must be resynced).
    pub fn mark_all(&mut self) -> io::Result<()> {
        let regions = self.last_write.len();
        for r in 0..regions {
            self.bits[r / 8] |= 1 << (r % 8);
        }
        for page in 0..self.dirty_pages.len() {
            self.write_page(page)?;
        }
        self.file.sync_data()
    }

    /// Persists cleared bits (no fsync needed: losing a clear is harmless).
    pub fn write_back(&mut self) -> io::Result<()> {
        for page in 0..self.dirty_pages.len() {
            if self.dirty_pages[page] {
                self.write_page(page)?;
            }
        }
        Ok(())
    }

    /// Byte ranges of dirty regions.
    pub fn dirty_ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in 0..self.last_write.len() {
            if !self.is_set(r) {
                continue;
            }
            let start = r as u64 * REGION;
            let end = (start + REGION).min(size);
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => out.push((start, end)),
            }
        }
        out
    }

    pub fn any_dirty(&self) -> bool {
        self.bits.iter().any(|b| *b != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen_and_clear_by_capture_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dirty");
        let size = 10 * REGION + 5;
        let mut m = DirtyMap::open(&path, size).unwrap();
        m.mark(0, 10, 1).unwrap();
        m.mark(3 * REGION - 1, 2, 2).unwrap(); // spans regions 2 and 3
        m.mark(10 * REGION, 5, 3).unwrap(); // the partial last region
        drop(m);
        let mut m = DirtyMap::open(&path, size).unwrap();
        assert_eq!(
            m.dirty_ranges(size),
            vec![(0, REGION), (2 * REGION, 4 * REGION), (10 * REGION, size)]
        );
        // Capture indices are not persisted: after a reopen everything set stays set until
        // written again and made durable.
        m.mark(0, 1, 5).unwrap();
        m.clear_through(4);
        assert_eq!(m.dirty_ranges(size)[0], (0, REGION));
        m.clear_through(5);
        m.write_back().unwrap();
        drop(m);
        let m = DirtyMap::open(&path, size).unwrap();
        assert!(m.any_dirty());
        assert_eq!(m.dirty_ranges(size).len(), 2);
    }
}
