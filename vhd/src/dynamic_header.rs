//! The 1024-byte dynamic disk header (`cxsparse`) of dynamic and differencing images, with its
//! parent locator table.
//!
//! The header says where the block allocation table is, how many entries it has and how large a
//! block is; for a differencing image it also identifies the parent (UUID, name, locators). Like
//! the footer it is written once at creation and never rewritten, so a crash can never tear it.

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::wire::{be_u32, be_u64, checksum, put_u32, put_u64};
use crate::SECTOR_SIZE;

/// The header cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Size of the header on disk.
pub const HEADER_SIZE: u64 = 1024;
/// Number of parent locator entries.
pub const LOCATOR_COUNT: usize = 8;

const OFF_CHECKSUM: usize = 36;
const HEADER_VERSION: u32 = 0x0001_0000;
const OFF_PARENT_NAME: usize = 64;
const PARENT_NAME_LEN: usize = 512;
const OFF_LOCATORS: usize = 576;
const LOCATOR_ENTRY_SIZE: usize = 24;

/// Smallest block size accepted. Real writers use 2 MiB (some old ones 512 KiB); the floor keeps
/// a hostile header from making the in-memory BAT huge (2040 GiB / 64 KiB = 32 Mi entries).
pub const MIN_BLOCK_SIZE: u32 = 64 * 1024;
/// Largest block size accepted (VHDX's maximum; VHD writers all use 2 MiB).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// One parent locator entry: where the child keeps one encoding of its parent's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code: `W2ru` (relative, UTF-16LE), `W2ku` (absolute, UTF-16LE), `MacX` (file
    /// URL, UTF-8), ...; zero when the entry is unused.
    pub platform_code: [u8; 4],
    /// Space reserved for the data. The spec says sectors; some writers store bytes.
    pub data_space: u32,
    /// Length of the locator data in bytes.
    pub data_length: u32,
    /// Absolute file offset of the locator data.
    pub data_offset: u64,
}

impl ParentLocator {
    /// True when the entry describes a locator.
    pub fn is_used(&self) -> bool {
        self.platform_code != [0; 4]
    }
}

/// A decoded dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Offset of the next structure; unused, all ones.
    pub data_offset: u64,
    /// Absolute offset of the block allocation table.
    pub table_offset: u64,
    /// Header version, 0x00010000.
    pub header_version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Bytes of data per block (2 MiB by default), a power of two.
    pub block_size: u32,
    /// Differencing only: the parent footer's UUID.
    pub parent_uuid: Uuid,
    /// Differencing only: the parent's modification time, seconds since 2000.
    pub parent_timestamp: u32,
    /// Differencing only: the parent's file name (UTF-16BE on disk).
    pub parent_name: String,
    /// Parent locator entries.
    pub locators: [ParentLocator; LOCATOR_COUNT],
}

impl DynamicHeader {
    /// A header for a new image with `entries` BAT entries at `table_offset`.
    pub(crate) fn new(table_offset: u64, entries: u32, block_size: u32) -> DynamicHeader {
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset,
            header_version: HEADER_VERSION,
            max_table_entries: entries,
            block_size,
            parent_uuid: Uuid::nil(),
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: [ParentLocator::default(); LOCATOR_COUNT],
        }
    }

    /// Decodes and validates a header read from `offset`: cookie, checksum, version, block
    /// size. Layout checks (does the BAT fit the file?) happen when an image is opened.
    pub fn parse(buf: &[u8; 1024], offset: u64) -> Result<DynamicHeader> {
        if &buf[0..8] != COOKIE {
            return Err(Error::BadHeaderCookie { offset });
        }
        let stored = be_u32(buf, OFF_CHECKSUM);
        let computed = checksum(buf, OFF_CHECKSUM);
        if stored != computed {
            return Err(Error::BadChecksum {
                structure: "dynamic header",
                stored,
                computed,
            });
        }
        let header_version = be_u32(buf, 24);
        if header_version >> 16 != 1 {
            return Err(Error::Unsupported(format!(
                "dynamic header version {header_version:#010x}"
            )));
        }
        let block_size = be_u32(buf, 32);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::Unsupported(format!("block size {block_size}")));
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&buf[40..56]);
        let mut locators = [ParentLocator::default(); LOCATOR_COUNT];
        for (i, loc) in locators.iter_mut().enumerate() {
            let at = OFF_LOCATORS + i * LOCATOR_ENTRY_SIZE;
            loc.platform_code.copy_from_slice(&buf[at..at + 4]);
            loc.data_space = be_u32(buf, at + 4);
            loc.data_length = be_u32(buf, at + 8);
            loc.data_offset = be_u64(buf, at + 16);
        }
        Ok(DynamicHeader {
            data_offset: be_u64(buf, 8),
            table_offset: be_u64(buf, 16),
            header_version,
            max_table_entries: be_u32(buf, 28),
            block_size,
            parent_uuid: Uuid::from_bytes(parent_uuid),
            parent_timestamp: be_u32(buf, 56),
            parent_name: decode_utf16(
                &buf[OFF_PARENT_NAME..OFF_PARENT_NAME + PARENT_NAME_LEN],
                u16::from_be_bytes,
            ),
            locators,
        })
    }

    /// Encodes the header with a fresh checksum. A parent name longer than 256 UTF-16 units is
    /// cut (it is informational; the locators carry the full path).
    pub fn to_bytes(&self) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[0..8].copy_from_slice(COOKIE);
        put_u64(&mut b, 8, self.data_offset);
        put_u64(&mut b, 16, self.table_offset);
        put_u32(&mut b, 24, self.header_version);
        put_u32(&mut b, 28, self.max_table_entries);
        put_u32(&mut b, 32, self.block_size);
        b[40..56].copy_from_slice(self.parent_uuid.as_bytes());
        put_u32(&mut b, 56, self.parent_timestamp);
        for (i, unit) in self
            .parent_name
            .encode_utf16()
            .take(PARENT_NAME_LEN / 2)
            .enumerate()
        {
            let at = OFF_PARENT_NAME + 2 * i;
            b[at..at + 2].copy_from_slice(&unit.to_be_bytes());
        }
        for (i, loc) in self.locators.iter().enumerate() {
            let at = OFF_LOCATORS + i * LOCATOR_ENTRY_SIZE;
            b[at..at + 4].copy_from_slice(&loc.platform_code);
            put_u32(&mut b, at + 4, loc.data_space);
            put_u32(&mut b, at + 8, loc.data_length);
            put_u64(&mut b, at + 16, loc.data_offset);
        }
        let sum = checksum(&b, OFF_CHECKSUM);
        put_u32(&mut b, OFF_CHECKSUM, sum);
        b
    }

    /// Size of each block's sector bitmap: one bit per sector, padded to whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        (u64::from(self.block_size) / SECTOR_SIZE)
            .div_ceil(8)
            .next_multiple_of(SECTOR_SIZE)
    }
}

/// Decodes UTF-16 code units (stopping at the first NUL), replacing invalid sequences.
pub(crate) fn decode_utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| unit([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut h = DynamicHeader::new(1536, 5, 2 << 20);
        h.parent_uuid = Uuid::from_u128(42);
        h.parent_name = "päréñt.vhd".into();
        h.locators[0] = ParentLocator {
            platform_code: *b"W2ru",
            data_space: 1,
            data_length: 20,
            data_offset: 2048,
        };
        let b = h.to_bytes();
        assert_eq!(DynamicHeader::parse(&b, 512).expect("valid header"), h);
        assert_eq!(h.bitmap_size(), 512);
        let mut bad = b;
        bad[900] = 1;
        assert!(matches!(
            DynamicHeader::parse(&bad, 512),
            Err(Error::BadChecksum { .. })
        ));
    }

    #[test]
    fn bitmap_sizes() {
        let h = DynamicHeader::new(1536, 1, 64 * 1024);
        assert_eq!(h.bitmap_size(), 512);
        let h = DynamicHeader::new(1536, 1, 16 << 20);
        assert_eq!(h.bitmap_size(), 4096);
    }
}
