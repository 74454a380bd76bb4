//! Byte-level encoding shared by the on-disk structures: big-endian fields, the VHD checksum,
//! VHD timestamps and positioned I/O helpers that turn short reads into errors.
//!
//! Everything in a VHD is big-endian. The footer and the dynamic header use the same checksum:
//! the one's complement of the byte sum of the structure with the checksum field taken as zero.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC.
const VHD_EPOCH_UNIX: u64 = 946_684_800;

/// Reads a big-endian `u16` at `at`. Callers pass fixed-size structure buffers, so `at` is in
/// bounds by construction.
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian `u32` at `at`.
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian `u64` at `at`.
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Writes a big-endian `u16` at `at`.
pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian `u32` at `at`.
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian `u64` at `at`.
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The VHD checksum of `bytes`, treating the four bytes at `field_at` (the checksum field
/// itself) as zero.
pub(crate) fn checksum(bytes: &[u8], field_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field_at..field_at + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// Seconds since the VHD epoch for `t`, saturating (a clock before 2000 gives 0, one after
/// 2136 gives `u32::MAX`).
pub(crate) fn vhd_timestamp(t: SystemTime) -> u32 {
    let unix = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

/// The current time as a VHD timestamp.
pub(crate) fn now() -> u32 {
    vhd_timestamp(SystemTime::now())
}

/// Rounds `x` up to a multiple of 512, saturating.
pub(crate) fn round_up_sector(x: u64) -> u64 {
    x.saturating_add(511) & !511
}

/// Reads exactly `buf.len()` bytes at `offset`; a short read (file shorter than expected) is an
/// `UnexpectedEof` I/O error with `context`.
pub(crate) fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    context: &'static str,
) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(Error::io(context))
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all_at(
    file: &File,
    buf: &[u8],
    offset: u64,
    context: &'static str,
) -> Result<()> {
    file.write_all_at(buf, offset).map_err(Error::io(context))
}

/// Where data writes go: the image's file, through the page cache, or its direct descriptor
/// (see [`crate::Image::write_direct`]). Metadata is always written through `file`.
pub(crate) enum DataOut<'a> {
    Buffered(&'a File),
    Direct(&'a mut dio::DirectFile),
}

impl DataOut<'_> {
    /// Writes all of `buf` at `offset`.
    pub(crate) fn write_all_at(
        &mut self,
        buf: &[u8],
        offset: u64,
        context: &'static str,
    ) -> Result<()> {
        match self {
            DataOut::Buffered(file) => write_all_at(file, buf, offset, context),
            DataOut::Direct(direct) => direct.write_at(buf, offset).map_err(Error::io(context)),
        }
    }

    /// Writes `head` and then `data` from `offset`: one write when the direct descriptor
    /// takes them, so `head` costs no I/O of its own. `None` when data writes go through the
    /// page cache: the caller writes `head` with the metadata instead.
    pub(crate) fn write_with_head(
        &mut self,
        head: &[u8],
        data: &[u8],
        offset: u64,
        context: &'static str,
    ) -> Option<Result<()>> {
        match self {
            DataOut::Buffered(_) => None,
            DataOut::Direct(direct) => Some(
                direct
                    .write_parts_at(&[head, data], offset)
                    .map_err(Error::io(context)),
            ),
        }
    }
}

/// True when every byte of `buf` is zero. Runs on every write to an unallocated block, so it
/// works in 64-byte chunks the compiler vectorises: cheap next to the write it may save.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    let whole = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
    whole && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_skips_its_own_field() {
        let mut b = [1u8; 16];
        let c = checksum(&b, 4);
        b[4..8].copy_from_slice(&[0xAA; 4]);
        assert_eq!(checksum(&b, 4), c);
        assert_eq!(c, !12u32);
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        for i in 0..v.len() {
            assert!(is_zero(&v[i..]));
            v[i] = 1;
            assert!(!is_zero(&v));
            assert!(!is_zero(&v[..=i]));
            v[i] = 0;
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(vhd_timestamp(UNIX_EPOCH), 0);
        let t = UNIX_EPOCH + std::time::Duration::from_secs(VHD_EPOCH_UNIX + 5);
        assert_eq!(vhd_timestamp(t), 5);
    }
}
