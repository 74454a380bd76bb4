//! The persistent dirty map of one disk: a bit per region (1 MiB) that may hold writes not yet
//! on the replica. A bit is set, and the map made durable, *before* a write to a clean region
//! reaches the source, so a crash can never hide a write: after a restart every set bit is
//! resynced. Bits are cleared lazily once everything written to the region is applied on the
//! master target (not merely held by the process server: if that one loses its cache, the set
//! bits are exactly what a resync must compare); a stale set bit only costs a little extra
//! resync.
//!
//! Next to the bits the file keeps, per region, when it last went from clean to dirty (Unix
//! seconds): the oldest of those over the set bits bounds the age of the oldest write that may
//! not have reached the replica, which is the RPO reported while a resync is pending.
//! Layout: the bits, padded to a page, then one little-endian u32 per region.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes covered by one bit.
pub const REGION: u64 = 1 << 20;
/// Regions set together when writes run sequentially: a write to a clean region right after a
/// set one also sets the next clean regions up to this many in all, so a sequential stream
/// makes the map durable once per 64 MiB instead of once per MiB (each time inside the write
/// path, under the capture lock, where every write waits for it: with 16, while the process
/// server and master target wrote on the same disk, those syncs cost the NBD client 10–25% of
/// its write rate in the benchmark). A write whose preceding region is clean sets only its own
/// regions, so writes scattered over clean space do not inflate what a resync must compare
/// after a crash; writes next to set regions (including ones set ahead) can extend it by up
/// to 63 MiB each. Regions set ahead clear on the same acknowledgement as the write that set
/// them unless written meanwhile.
const GROUP: usize = 64;
/// The map is written back in pages of this many bytes.
const PAGE: usize = 4096;

pub struct DirtyMap {
    file: File,
    /// How many times `mark` made the map durable.
    syncs: u64,
    bits: Vec<u8>,
    /// For each region, the capture index of the last write to it (0: none since start).
    last_write: Vec<u64>,
    /// Pages changed in memory since the last write-back.
    dirty_pages: Vec<bool>,
    /// Per region: Unix seconds when it went dirty (meaningful while its bit is set).
    since: Vec<u32>,
}

fn now_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
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
        let since_at = Self::since_offset(len);
        let mut raw = vec![0u8; regions * 4];
        if on_disk > since_at {
            let n = (on_disk - since_at).min(raw.len());
            file.read_exact_at(&mut raw[..n], since_at as u64)?;
        }
        let since = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        file.set_len((since_at + regions * 4) as u64)?;
        file.sync_all()?;
        // Bits set before this start stand for writes whose fate is unknown: only a resync
        // of the region (`resynced`, then `clear_through`) may clear them.
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
            syncs: 0,
            bits,
            last_write,
            dirty_pages: vec![false; len.div_ceil(PAGE)],
            since,
        })
    }

    fn since_offset(bits_len: usize) -> usize {
        bits_len.div_ceil(PAGE) * PAGE
    }

    fn write_since(&self, r: usize) -> io::Result<()> {
        let at = Self::since_offset(self.bits.len()) + r * 4;
        self.file
            .write_all_at(&self.since[r].to_le_bytes(), at as u64)
    }

    /// Unix seconds when the longest-dirty region went dirty (`None`: all clean). Regions
    /// marked by a version that kept no time count as dirty since `fallback`.
    pub fn oldest_dirty_secs(&self, fallback: u32) -> Option<u32> {
        (0..self.last_write.len())
            .filter(|r| self.is_set(*r))
            .map(|r| match self.since[r] {
                0 => fallback,
                t => t,
            })
            .min()
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
        let mut regions = Vec::new();
        let now = now_secs();
        let written = Self::regions(offset, len);
        let mut any_clean = false;
        for r in written.clone() {
            if r >= self.last_write.len() {
                break;
            }
            // A pinned region (fate unknown) stays pinned until a resync compares it.
            if self.last_write[r] != u64::MAX {
                self.last_write[r] = index;
            }
            any_clean |= !self.is_set(r);
        }
        if !any_clean {
            return Ok(());
        }
        // A write that continues a set region sets the regions ahead of it too, in the same
        // durable update.
        let sequential = written.start > 0 && self.is_set(written.start - 1);
        let end = if sequential {
            written.end.max(written.start + GROUP)
        } else {
            written.end
        }
        .min(self.last_write.len());
        for r in written.start..end {
            if !self.is_set(r) {
                if !written.contains(&r) {
                    self.last_write[r] = index;
                }
                self.bits[r / 8] |= 1 << (r % 8);
                self.since[r] = now;
                newly.push(r / 8 / PAGE);
                regions.push(r);
            }
        }
        newly.dedup();
        for page in newly {
            self.write_page(page)?;
        }
        for r in regions {
            self.write_since(r)?;
        }
        self.syncs += 1;
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

    /// Clears regions whose every write (capture index ≤ `applied_index`) is applied on the
    /// master target. In memory only; `write_back` persists it.
    pub fn clear_through(&mut self, applied_index: u64) {
        for r in 0..self.last_write.len() {
            if self.is_set(r) && self.last_write[r] <= applied_index {
                self.bits[r / 8] &= !(1 << (r % 8));
                self.dirty_pages[r / 8 / PAGE] = true;
            }
        }
    }

    /// A resync queued the regions inside `offset..offset+len` (whatever differed from the
    /// replica) as of capture index `index`: their bits clear once that index is applied
    /// (`clear_through`), unless a later write keeps them set.
    pub fn resynced(&mut self, offset: u64, len: u64, index: u64) {
        for r in Self::regions(offset, len) {
            // Writes made while the map stood in for the stream (never queued) have indices
            // below `index`: the region must wait for the resync's data, not for theirs.
            if r < self.last_write.len()
                && self.is_set(r)
                && (self.last_write[r] == u64::MAX || self.last_write[r] < index)
            {
                self.last_write[r] = index;
            }
        }
    }

    /// Pins every set region: their writes will not all reach the stream, so only a resync's
    /// compare (`resynced`) may release them.
    pub fn pin_all(&mut self) {
        for r in 0..self.last_write.len() {
            if self.is_set(r) {
                self.last_write[r] = u64::MAX;
            }
        }
    }

    /// Marks every region dirty (the whole disk must be resynced: the replica's stream lost
    /// data the dirty map had already let go of).
    pub fn mark_all(&mut self) -> io::Result<()> {
        let now = now_secs();
        for r in 0..self.last_write.len() {
            if !self.is_set(r) {
                self.bits[r / 8] |= 1 << (r % 8);
                self.since[r] = now;
            }
            self.last_write[r] = u64::MAX;
        }
        for page in 0..self.dirty_pages.len() {
            self.write_page(page)?;
        }
        let mut raw = Vec::with_capacity(self.since.len() * 4);
        for t in &self.since {
            raw.extend_from_slice(&t.to_le_bytes());
        }
        self.file
            .write_all_at(&raw, Self::since_offset(self.bits.len()) as u64)?;
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
        // Capture indices are not persisted: after a reopen every set region is pinned. A
        // new write does not release it, durable acknowledgements do not clear it; only a
        // resync's compare does, once what it queued is durable.
        m.mark(0, 1, 5).unwrap();
        m.clear_through(100);
        assert_eq!(m.dirty_ranges(size).len(), 3);
        m.resynced(0, REGION, 6);
        m.clear_through(5);
        assert_eq!(m.dirty_ranges(size)[0], (0, REGION));
        m.clear_through(6);
        m.write_back().unwrap();
        drop(m);
        let mut m = DirtyMap::open(&path, size).unwrap();
        assert!(m.any_dirty());
        assert_eq!(m.dirty_ranges(size).len(), 2);
        // Pinning (the stream was given up) holds regions marked with real indices too.
        m.resynced(0, size, 7);
        m.clear_through(7);
        assert!(!m.any_dirty());
        m.mark(REGION, 10, 8).unwrap();
        m.pin_all();
        m.clear_through(100);
        assert_eq!(m.dirty_ranges(size), vec![(REGION, 2 * REGION)]);
        // Dirty since when: the oldest set region's time.
        assert!(m.oldest_dirty_secs(0).is_some_and(|t| t > 0));
    }

    #[test]
    fn a_sequential_stream_makes_the_map_durable_once_per_group_of_regions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dirty");
        let group = GROUP as u64;
        let regions = 2 * group + 40;
        let size = regions * REGION;
        let mut m = DirtyMap::open(&path, size).unwrap();
        for i in 0..regions {
            m.mark(i * REGION, REGION, i + 1).unwrap();
        }
        assert_eq!(
            m.syncs, 4,
            "in order: region 0, then three groups set ahead (the last one cut at the end)"
        );
        // Scattered writes set only their own regions; one that continues a set region sets
        // the ones ahead too, and those clear with the write that set them.
        let mut m = DirtyMap::open(&path, size).unwrap();
        m.resynced(0, size, 1);
        m.clear_through(1);
        assert!(!m.any_dirty());
        let far = 20 + group + 10;
        m.mark(20 * REGION, 10, 2).unwrap();
        m.mark(far * REGION + 5, 10, 3).unwrap();
        assert_eq!(
            m.dirty_ranges(size),
            vec![
                (20 * REGION, 21 * REGION),
                (far * REGION, (far + 1) * REGION)
            ]
        );
        m.mark(21 * REGION, 10, 4).unwrap();
        assert_eq!(
            m.dirty_ranges(size),
            vec![
                (20 * REGION, (21 + group) * REGION),
                (far * REGION, (far + 1) * REGION)
            ],
            "a group of regions set ahead from 21"
        );
        m.mark(25 * REGION, 10, 5).unwrap(); // already set: no new durable update
        assert_eq!(m.syncs, 3);
        m.clear_through(4);
        assert_eq!(m.dirty_ranges(size), vec![(25 * REGION, 26 * REGION)]);
        m.clear_through(5);
        assert!(!m.any_dirty());
    }
}
