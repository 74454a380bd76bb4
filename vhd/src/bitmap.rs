//! Sector bitmaps: which sectors of an allocated block hold data.
//!
//! Each block starts with a bitmap, one bit per sector, most significant bit first. A clear bit
//! means "never written": the sector reads as zeros in a dynamic image and from the parent in a
//! differencing one. This module owns the bit arithmetic and an in-memory cache of bitmaps.
//!
//! The cache keeps one state byte per block (unknown, full, partial) and the bytes of partial
//! bitmaps only. Blocks this crate allocates in dynamic images are full from the start (their
//! data area is fresh file space, so zeros are the right content), which means the common case
//! costs one byte per block and no bitmap I/O after allocation. Bitmaps of blocks already in the
//! file are read lazily, on first access.

use std::collections::HashMap;

use crate::SECTOR_SIZE;

/// The cached knowledge about one block's bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not read yet (or the block is unallocated).
    Unknown,
    /// Every sector of the block is marked present.
    Full,
    /// Some sectors are clear; the bytes are in `partial`.
    Partial,
}

/// A block's bitmap as the cache knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Bits {
    /// All sectors present.
    Full,
    /// Bitmap bytes (length = the image's bitmap size).
    Partial(Box<[u8]>),
}

/// Bitmap cache for all blocks of one image.
#[derive(Debug)]
pub(crate) struct BitmapCache {
    state: Vec<State>,
    partial: HashMap<u64, Box<[u8]>>,
    sectors_per_block: u32,
}

impl BitmapCache {
    /// A cache for `blocks` blocks of `sectors_per_block` sectors, all unknown.
    pub(crate) fn new(blocks: usize, sectors_per_block: u32) -> BitmapCache {
        BitmapCache {
            state: vec![State::Unknown; blocks],
            partial: HashMap::new(),
            sectors_per_block,
        }
    }

    /// The cached bitmap of `block`, or `None` if it has not been loaded.
    pub(crate) fn get(&self, block: u64) -> Option<Bits> {
        match self.state[index(block)] {
            State::Unknown => None,
            State::Full => Some(Bits::Full),
            State::Partial => Some(match self.partial.get(&block) {
                Some(b) => Bits::Partial(b.clone()),
                None => Bits::Full,
            }),
        }
    }

    /// True when `block`'s bitmap is known to be full (the fast path for writes).
    pub(crate) fn is_full(&self, block: u64) -> bool {
        self.state[index(block)] == State::Full
    }

    /// True when `block`'s bitmap is in the cache.
    pub(crate) fn is_known(&self, block: u64) -> bool {
        self.state[index(block)] != State::Unknown
    }

    /// Records `block`'s bitmap as read from disk or created; a bitmap with every sector set is
    /// stored as full.
    pub(crate) fn insert(&mut self, block: u64, bytes: Box<[u8]>) {
        if all_set(&bytes, self.sectors_per_block) {
            self.set_full(block);
        } else {
            self.state[index(block)] = State::Partial;
            self.partial.insert(block, bytes);
        }
    }

    /// Marks `block` as fully present.
    pub(crate) fn set_full(&mut self, block: u64) {
        self.state[index(block)] = State::Full;
        self.partial.remove(&block);
    }

    /// Forgets `block` (after a discard).
    pub(crate) fn forget(&mut self, block: u64) {
        self.state[index(block)] = State::Unknown;
        self.partial.remove(&block);
    }

    /// Sets the bits of sectors `first..first + count` of a block whose bitmap is cached.
    /// Returns true when a bit changed (the on-disk bitmap must be rewritten).
    pub(crate) fn set_range(&mut self, block: u64, first: u32, count: u32) -> bool {
        if self.state[index(block)] != State::Partial {
            return false;
        }
        let Some(bytes) = self.partial.get_mut(&block) else {
            return false;
        };
        let changed = set_bits(bytes, first, count);
        if changed && all_set(bytes, self.sectors_per_block) {
            self.set_full(block);
        }
        changed
    }

    /// The bitmap bytes to write for `block`: all ones when full, the cached bytes otherwise.
    pub(crate) fn encode(&self, block: u64, bitmap_size: usize) -> Vec<u8> {
        match self.partial.get(&block) {
            Some(b) if self.state[index(block)] == State::Partial => b.to_vec(),
            _ => vec![0xff; bitmap_size],
        }
    }
}

/// Block indices come from the BAT, whose length is bounded by a `Vec`, so they fit `usize`.
fn index(block: u64) -> usize {
    usize::try_from(block).expect("block index bounded by the BAT length")
}

/// True when sector `i`'s bit is set.
pub(crate) fn bit(bits: &[u8], i: u32) -> bool {
    bits[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
}

/// Sets bits `first..first + count`; returns true if any was clear.
fn set_bits(bits: &mut [u8], first: u32, count: u32) -> bool {
    let mut changed = false;
    for i in first..first + count {
        let mask = 0x80u8 >> (i % 8);
        let byte = &mut bits[(i / 8) as usize];
        changed |= *byte & mask == 0;
        *byte |= mask;
    }
    changed
}

/// True when the first `n` bits are all set.
fn all_set(bits: &[u8], n: u32) -> bool {
    let whole = (n / 8) as usize;
    bits[..whole].iter().all(|&b| b == 0xff) && (whole as u32 * 8..n).all(|i| bit(bits, i))
}

/// Splits the byte range `start..end` of a block into runs whose sectors are all present or
/// all absent: `(present, from, to)`. Offsets are bytes within the block.
pub(crate) fn runs(bits: &[u8], start: u64, end: u64) -> Vec<(bool, u64, u64)> {
    let mut out: Vec<(bool, u64, u64)> = Vec::new();
    let mut pos = start;
    while pos < end {
        let sector = u32::try_from(pos / SECTOR_SIZE).expect("offset within a block");
        let present = bit(bits, sector);
        let to = ((u64::from(sector) + 1) * SECTOR_SIZE).min(end);
        match out.last_mut() {
            Some(last) if last.0 == present => last.2 = to,
            _ => out.push((present, pos, to)),
        }
        pos = to;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_first() {
        let mut b = vec![0u8; 512];
        assert!(set_bits(&mut b, 0, 1));
        assert_eq!(b[0], 0x80);
        assert!(set_bits(&mut b, 9, 2));
        assert_eq!(b[1], 0x60);
        assert!(!set_bits(&mut b, 9, 1));
    }

    #[test]
    fn cache_promotes_to_full() {
        let mut c = BitmapCache::new(2, 16);
        c.insert(1, vec![0u8; 512].into_boxed_slice());
        assert!(matches!(c.get(1), Some(Bits::Partial(_))));
        assert!(c.set_range(1, 0, 8));
        assert!(c.set_range(1, 8, 8));
        assert_eq!(c.get(1), Some(Bits::Full));
        assert_eq!(c.encode(1, 512), vec![0xff; 512]);
        assert_eq!(c.get(0), None);
    }

    #[test]
    fn run_splitting() {
        let mut b = vec![0u8; 512];
        set_bits(&mut b, 1, 2);
        let r = runs(&b, 100, 2000);
        assert_eq!(
            r,
            vec![(false, 100, 512), (true, 512, 1536), (false, 1536, 2000)]
        );
    }
}
