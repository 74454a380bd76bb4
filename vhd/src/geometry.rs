//! CHS disk geometry and the rule that decides an image's visible size.
//!
//! The footer stores both a byte size and a cylinder/head/sector geometry. Readers disagree on
//! which one is the disk size: Virtual PC (and qemu, for images it does not recognise) use
//! C×H×S×512, Hyper-V uses the byte size. Because the spec's geometry algorithm rounds down, a
//! size that is not a CHS multiple shrinks under the first rule. This crate therefore
//!
//! * writes images with creator application `win ` (as Hyper-V does), which qemu and Windows
//!   both read by the byte size, so an image created with N bytes is N bytes everywhere;
//! * reads images with exactly qemu's rule ([`visible_size`]), so images made by
//!   `qemu-img create`/`convert` open with the size qemu reports.

use crate::SECTOR_SIZE;

/// Cylinders, heads and sectors per track, as stored in the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Cylinders (big-endian u16 in the footer).
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

/// The largest geometry the spec's algorithm produces: 65535 cylinders, 16 heads, 255 sectors
/// (about 127 GiB). Images larger than that carry it and are sized by their byte size.
pub const MAX_GEOMETRY: Geometry = Geometry {
    cylinders: 65535,
    heads: 16,
    sectors_per_track: 255,
};

impl Geometry {
    /// The geometry the VHD spec (appendix "CHS calculation") gives for `size` bytes. It rounds
    /// down, so [`Geometry::capacity`] may be less than `size`; capped at [`MAX_GEOMETRY`].
    pub fn for_size(size: u64) -> Geometry {
        let max_sectors = MAX_GEOMETRY.sectors();
        let total = (size / SECTOR_SIZE).min(max_sectors);
        let (spt, heads, cyl_times_heads): (u64, u64, u64);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cyl_times_heads = total / spt;
        } else {
            let mut s = 17;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            spt = s;
            heads = h;
            cyl_times_heads = cth;
        }
        let cylinders = (cyl_times_heads / heads).min(65535);
        Geometry {
            cylinders: u16::try_from(cylinders).expect("capped at 65535 above"),
            heads: u8::try_from(heads).expect("heads is 4..=16"),
            sectors_per_track: u8::try_from(spt).expect("17, 31, 63 or 255"),
        }
    }

    /// C×H×S in sectors.
    pub fn sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// C×H×S×512 in bytes.
    pub fn capacity(&self) -> u64 {
        self.sectors() * SECTOR_SIZE
    }
}

/// Creator applications whose images qemu sizes by the footer's current size rather than CHS
/// (block/vpc.c): Hyper-V, qemu with `force_size`, Disk2vhd, XenConverter, XenServer.
const SIZE_BY_CURRENT_SIZE: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];

/// The virtual size qemu gives an image with this footer data, in bytes: the current size
/// (rounded down to a sector) for the creators in `SIZE_BY_CURRENT_SIZE` and for the maximum
/// geometry, C×H×S×512 otherwise.
pub fn visible_size(creator_app: &[u8; 4], geometry: Geometry, current_size: u64) -> u64 {
    let by_size =
        SIZE_BY_CURRENT_SIZE.contains(&creator_app) || geometry.sectors() == MAX_GEOMETRY.sectors();
    if by_size {
        current_size / SECTOR_SIZE * SECTOR_SIZE
    } else {
        geometry.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        // 10 MiB: 20480 sectors → 17 spt, 4 heads, 301 cylinders (qemu-img agrees:
        // `qemu-img create -f vpc x 10M` reports 10514432 bytes = 302×4×17×512 after its
        // round-up loop, i.e. one step above the rounded-down 301).
        let g = Geometry::for_size(10 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (301, 4, 17));
        assert!(g.capacity() <= 10 << 20);
        // Large disks get the maximum geometry.
        assert_eq!(Geometry::for_size(200 << 30), MAX_GEOMETRY);
        assert_eq!(Geometry::for_size(0).sectors(), 0);
    }

    #[test]
    fn geometry_never_exceeds_size() {
        let mut size = 512u64;
        while size < (1 << 41) {
            let g = Geometry::for_size(size);
            assert!(g.capacity() <= size, "{size}");
            size = size * 3 / 2 + 512;
            size -= size % 512;
        }
    }

    #[test]
    fn qemu_rule() {
        let g = Geometry::for_size(10 << 20);
        assert_eq!(visible_size(b"win ", g, 10 << 20), 10 << 20);
        assert_eq!(visible_size(b"qem2", g, 10 << 20), 10 << 20);
        assert_eq!(visible_size(b"qemu", g, 10 << 20), g.capacity());
        assert_eq!(visible_size(b"vpc ", MAX_GEOMETRY, 300 << 30), 300 << 30);
        assert_eq!(visible_size(b"win ", g, (10 << 20) + 100), 10 << 20);
    }
}
