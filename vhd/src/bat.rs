//! The block allocation table: the in-memory copy and its write-back.
//!
//! The BAT maps block index → sector offset of the block's bitmap in the file (0xFFFFFFFF for
//! unallocated). The whole table lives in memory (4 bytes per block: 2 MiB for a 2040 GiB disk)
//! and is authoritative while the image is open. Changes only mark the 512-byte BAT sector they
//! fall in as dirty; [`Bat::write_dirty`] writes those sectors, coalescing neighbours, and is
//! called only from `flush` after the blocks it points at are durable (see the crate-level
//! crash-safety notes). Each entry is a naturally aligned 4-byte value, so even a torn sector
//! write leaves every entry either old or new, and both are valid.

use std::collections::BTreeSet;
use std::fs::File;

use crate::error::Result;
use crate::wire::{read_exact_at, write_all_at};
use crate::SECTOR_SIZE;

/// The BAT value of an unallocated block.
pub const UNALLOCATED: u32 = u32::MAX;
/// Entries per 512-byte BAT sector.
const ENTRIES_PER_SECTOR: usize = 128;

/// In-memory BAT.
#[derive(Debug)]
pub(crate) struct Bat {
    /// File offset of the table.
    offset: u64,
    /// One entry per block of the virtual disk (entries past the disk size are not loaded and
    /// never written).
    entries: Vec<u32>,
    /// BAT sectors changed since the last [`Bat::write_dirty`].
    dirty: BTreeSet<usize>,
}

impl Bat {
    /// An all-unallocated table of `count` entries at `offset`.
    #[cfg(test)]
    pub(crate) fn empty(offset: u64, count: usize) -> Bat {
        Bat {
            offset,
            entries: vec![UNALLOCATED; count],
            dirty: BTreeSet::new(),
        }
    }

    /// Reads `count` entries at `offset`. The caller has checked that they lie inside the file,
    /// which also bounds the allocation.
    pub(crate) fn read(file: &File, offset: u64, count: usize) -> Result<Bat> {
        let mut raw = vec![0u8; count * 4];
        read_exact_at(file, &mut raw, offset, "read the block allocation table")?;
        let entries = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Bat {
            offset,
            entries,
            dirty: BTreeSet::new(),
        })
    }

    /// Number of entries (blocks of the virtual disk).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Byte offset of `block`'s bitmap, or `None` when unallocated.
    pub(crate) fn get(&self, block: u64) -> Option<u64> {
        let e = *self.entries.get(usize::try_from(block).ok()?)?;
        (e != UNALLOCATED).then_some(u64::from(e) * SECTOR_SIZE)
    }

    /// Sets `block`'s entry (a sector number, or [`UNALLOCATED`]).
    pub(crate) fn set(&mut self, block: u64, value: u32) {
        let i = usize::try_from(block).expect("block index bounded by the BAT length");
        self.entries[i] = value;
        self.dirty.insert(i / ENTRIES_PER_SECTOR);
    }

    /// True when entries changed since the last write.
    pub(crate) fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// `(block, byte offset)` of every allocated block, in block order.
    pub(crate) fn allocated(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != UNALLOCATED)
            .map(|(i, &e)| (i as u64, u64::from(e) * SECTOR_SIZE))
    }

    /// Writes every dirty BAT sector, merging runs of adjacent sectors into one write. Only the
    /// entries themselves are written, never the padding after the last one.
    pub(crate) fn write_dirty(&mut self, file: &File) -> Result<()> {
        let sectors: Vec<usize> = self.dirty.iter().copied().collect();
        let mut i = 0;
        while i < sectors.len() {
            let first = sectors[i];
            let mut last = first;
            while i + 1 < sectors.len() && sectors[i + 1] == last + 1 {
                i += 1;
                last = sectors[i];
            }
            i += 1;
            let from = first * ENTRIES_PER_SECTOR;
            let to = ((last + 1) * ENTRIES_PER_SECTOR).min(self.entries.len());
            let bytes: Vec<u8> = self.entries[from..to]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            write_all_at(
                file,
                &bytes,
                self.offset + from as u64 * 4,
                "write the block allocation table",
            )?;
        }
        self.dirty.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_sectors_coalesce() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("bat"))
            .expect("create");
        let mut bat = Bat::empty(512, 300);
        f.set_len(512 + 1200).expect("set_len");
        for b in [0u64, 127, 299] {
            bat.set(b, 10 + b as u32);
        }
        assert!(bat.is_dirty());
        bat.write_dirty(&f).expect("write");
        assert!(!bat.is_dirty());
        let back = Bat::read(&f, 512, 300).expect("read");
        assert_eq!(back.get(127), Some((10 + 127) * 512));
        assert_eq!(back.get(299), Some((10 + 299) * 512));
        assert_eq!(back.get(5), None);
        // BAT sector 1 (entries 128..256) was clean, so it still holds the file's zeros.
        assert_eq!(back.get(130), Some(0));
        assert_eq!(back.allocated().filter(|&(_, off)| off != 0).count(), 3);
    }
}
