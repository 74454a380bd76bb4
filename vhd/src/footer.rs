//! The 512-byte hard disk footer: parsing, validation and encoding.
//!
//! Every VHD ends with a footer; dynamic and differencing images also keep a copy at offset 0,
//! which is what lets an image whose last sector was torn or cut off still open. The footer is
//! written once, when the image is created, and never changed afterwards: both copies are
//! always byte-identical, so either can stand in for the other.

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::geometry::{self, Geometry};
use crate::wire::{be_u16, be_u32, be_u64, checksum, put_u16, put_u32, put_u64};
use crate::FOOTER_SIZE;

/// The footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// Data offset of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Creator application this crate writes. `win ` makes qemu size the image by its byte size
/// (see [`crate::geometry`]), and Windows does so regardless.
pub const CREATOR_APP: &[u8; 4] = b"win ";
/// Creator version this crate writes: 1.0, the version of its writer (readers ignore it).
pub const CREATOR_VERSION: u32 = 0x0001_0000;
/// Creator host OS this crate writes: "Wi2k", the only value besides "Mac " the spec defines.
pub const CREATOR_OS: u32 = 0x5769_326b;

const OFF_CHECKSUM: usize = 64;
/// Features field: bit 1 ("reserved") must always be set.
const FEATURES_RESERVED: u32 = 2;
const FORMAT_VERSION: u32 = 0x0001_0000;

/// Fixed, dynamic or differencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskType {
    /// Raw data followed by the footer.
    Fixed,
    /// Sparse: blocks allocated on first write.
    Dynamic,
    /// Sparse, with unwritten sectors read from a parent image.
    Differencing,
}

impl DiskType {
    /// The value stored in the footer.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    fn from_code(code: u32) -> Result<DiskType> {
        match code {
            2 => Ok(DiskType::Fixed),
            3 => Ok(DiskType::Dynamic),
            4 => Ok(DiskType::Differencing),
            other => Err(Error::UnsupportedDiskType(other)),
        }
    }

    /// Lower-case name: "fixed", "dynamic" or "differencing".
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

impl std::fmt::Display for DiskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Feature flags (bit 0: temporary disk; bit 1: reserved, always set).
    pub features: u32,
    /// File format version, 0x00010000.
    pub format_version: u32,
    /// Offset of the dynamic header; all ones for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Four-character creator application ("win ", "qemu", "vpc ", ...).
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS ("Wi2k", "Mac ").
    pub creator_os: u32,
    /// Size at creation, bytes.
    pub original_size: u64,
    /// Current size, bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Disk type.
    pub disk_type: DiskType,
    /// The image's unique id; a differencing child stores its parent's.
    pub uuid: Uuid,
    /// Saved-state flag (set by Virtual PC while a VM is saved).
    pub saved_state: bool,
}

impl Footer {
    /// A new footer for an image of `size` bytes, as this crate writes it.
    pub(crate) fn new(disk_type: DiskType, size: u64, uuid: Uuid, timestamp: u32) -> Footer {
        Footer {
            features: FEATURES_RESERVED,
            format_version: FORMAT_VERSION,
            data_offset: match disk_type {
                DiskType::Fixed => NO_DATA_OFFSET,
                DiskType::Dynamic | DiskType::Differencing => FOOTER_SIZE,
            },
            timestamp,
            creator_app: *CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_os: CREATOR_OS,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            uuid,
            saved_state: false,
        }
    }

    /// Decodes and validates a footer: cookie, checksum, disk type.
    pub fn parse(buf: &[u8; 512]) -> Result<Footer> {
        if &buf[0..8] != COOKIE {
            return Err(Error::NotVhd {
                detail: format!("cookie is {:?}", String::from_utf8_lossy(&buf[0..8])),
            });
        }
        let stored = be_u32(buf, OFF_CHECKSUM);
        let computed = checksum(buf, OFF_CHECKSUM);
        if stored != computed {
            return Err(Error::BadChecksum {
                structure: "footer",
                stored,
                computed,
            });
        }
        let format_version = be_u32(buf, 12);
        if format_version >> 16 != 1 {
            return Err(Error::Unsupported(format!(
                "footer format version {format_version:#010x}"
            )));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&buf[28..32]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[68..84]);
        Ok(Footer {
            features: be_u32(buf, 8),
            format_version,
            data_offset: be_u64(buf, 16),
            timestamp: be_u32(buf, 24),
            creator_app,
            creator_version: be_u32(buf, 32),
            creator_os: be_u32(buf, 36),
            original_size: be_u64(buf, 40),
            current_size: be_u64(buf, 48),
            geometry: Geometry {
                cylinders: be_u16(buf, 56),
                heads: buf[58],
                sectors_per_track: buf[59],
            },
            disk_type: DiskType::from_code(be_u32(buf, 60))?,
            uuid: Uuid::from_bytes(uuid),
            saved_state: buf[84] != 0,
        })
    }

    /// Encodes the footer with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(COOKIE);
        put_u32(&mut b, 8, self.features);
        put_u32(&mut b, 12, self.format_version);
        put_u64(&mut b, 16, self.data_offset);
        put_u32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put_u32(&mut b, 32, self.creator_version);
        put_u32(&mut b, 36, self.creator_os);
        put_u64(&mut b, 40, self.original_size);
        put_u64(&mut b, 48, self.current_size);
        put_u16(&mut b, 56, self.geometry.cylinders);
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors_per_track;
        put_u32(&mut b, 60, self.disk_type.code());
        b[68..84].copy_from_slice(self.uuid.as_bytes());
        b[84] = u8::from(self.saved_state);
        let sum = checksum(&b, OFF_CHECKSUM);
        put_u32(&mut b, OFF_CHECKSUM, sum);
        b
    }

    /// The disk's size in bytes by qemu's rule (see [`crate::geometry::visible_size`]).
    pub fn virtual_size(&self) -> u64 {
        geometry::visible_size(&self.creator_app, self.geometry, self.current_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_checksum() {
        let f = Footer::new(DiskType::Dynamic, 10 << 20, Uuid::from_u128(7), 1234);
        let b = f.to_bytes();
        assert_eq!(Footer::parse(&b).expect("valid footer"), f);
        let mut bad = b;
        bad[100] ^= 1;
        assert!(matches!(
            Footer::parse(&bad),
            Err(Error::BadChecksum { .. })
        ));
        let mut bad = b;
        bad[0] = b'x';
        assert!(matches!(Footer::parse(&bad), Err(Error::NotVhd { .. })));
    }

    #[test]
    fn disk_type_is_checked() {
        let mut f = Footer::new(DiskType::Fixed, 1 << 20, Uuid::nil(), 0).to_bytes();
        put_u32(&mut f, 60, 9);
        let sum = checksum(&f, OFF_CHECKSUM);
        put_u32(&mut f, OFF_CHECKSUM, sum);
        assert!(matches!(
            Footer::parse(&f),
            Err(Error::UnsupportedDiskType(9))
        ));
    }
}
