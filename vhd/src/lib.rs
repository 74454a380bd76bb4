//! Microsoft Virtual Hard Disk (VHD, format specification 1.0) images: fixed, dynamic and
//! differencing, read and written through positioned I/O.
//!
//! Lifeboat's master target keeps every replicated disk as a dynamic VHD and applies change
//! batches to it; test failover views and failback use differencing images. This crate is the
//! only code that knows the format.
//!
//! ```
//! use vhd::{CreateOptions, Image};
//!
//! # fn main() -> Result<(), vhd::Error> {
//! let dir = tempfile::tempdir().expect("temp dir");
//! let path = dir.path().join("disk.vhd");
//! let mut disk = Image::create(&path, &CreateOptions::dynamic(64 << 20))?;
//! disk.write_at(b"hello", 10 << 20)?; // allocates one 2 MiB block
//! disk.write_at(&[0u8; 4096], 30 << 20)?; // zeros: allocates nothing
//! disk.flush()?; // durable from here on
//! assert_eq!(disk.allocated_ranges(), vec![(10 << 20)..(12 << 20)]);
//! drop(disk);
//!
//! let disk = Image::open(&path)?;
//! let mut buf = [0u8; 5];
//! disk.read_at(&mut buf, 10 << 20)?;
//! assert_eq!(&buf, b"hello");
//! assert_eq!(disk.size(), 64 << 20); // `qemu-img info -f vpc` says the same
//! # Ok(())
//! # }
//! ```
//!
//! # Sizes
//! Images are written with creator application `win ` so that qemu and Windows size them by the
//! footer's byte size: an image created with N bytes is N bytes everywhere (N must be a
//! multiple of 512, at most [`MAX_DISK_SIZE`] = 2040 GiB). Images from other tools are sized by
//! qemu's rule (CHS geometry unless the creator is a known size-based one), so
//! `qemu-img create -f vpc` / `convert -O vpc` images open with the size qemu reports. See
//! [`geometry`].
//!
//! # Crash safety
//! Write order (dynamic and differencing images):
//! 1. [`Image::write_at`] writes data only: in place for allocated blocks, or into a block
//!    appended past everything the on-disk BAT references. New BAT entries and new bitmap
//!    bits stay in memory. (With direct writes, a new dynamic block's bitmap, all ones, goes
//!    out with the data of a write that starts the block: it too lies in unreferenced space.)
//! 2. [`Image::flush`] then
//!    1. writes the sector bitmaps of blocks allocated since the last flush and the footer at
//!       the new end of the file (all in space nothing on disk references yet), and calls
//!       `fdatasync` — data and new blocks are durable;
//!    2. writes bitmaps that gained bits in blocks already referenced and the dirty BAT
//!       sectors, and calls `fdatasync` again — on-disk metadata now points at the new data,
//!       which was durable before the pointer was written;
//!    3. punches discarded blocks out of the file (the durable BAT no longer references them).
//! 3. The dynamic header and the footer copy at offset 0 are written at creation and never
//!    again (the copy only by a repair, with the same bytes), so a crash cannot tear them;
//!    the end footer moves with the end of the file but its bytes never change. Fixed images:
//!    `flush` is one `fdatasync`.
//!
//! `fdatasync` (not a full `fsync`) is enough everywhere: it persists the data and the file
//! length, and the crate never depends on timestamps. Creating an image syncs the file and its
//! directory, so a crash leaves either no file or a complete image.
//!
//! After a crash (power loss, `kill -9`) at any point:
//! * everything written before the last successful `flush` reads back exactly;
//! * a sector overwritten in place since then reads old or new; blocks allocated since then
//!   read as they did at the last flush (unallocated) unless the crash hit step 2.2, after
//!   which they read new;
//! * the image opens: a torn or missing end footer is replaced by the copy at offset 0 (sparse
//!   images; [`Notice::EndFooterUnusable`]); bytes past the last referenced block are ignored,
//!   and cut off by [`Image::open_rw`] so new blocks land on fresh space ([`Notice::Repaired`]).
//!
//! What cannot be produced by a crash under this order fails with a typed [`Error`]: a file
//! cut into a referenced block ([`Error::Truncated`]), a fixed image without its footer
//! ([`Error::NotVhd`]), bad checksums, overlapping or out-of-file regions, parent loops.
//!
//! # Threads
//! Reads take `&self`, writes `&mut self`; [`Image`] is `Send + Sync`. Share one image per
//! disk as `Arc<RwLock<Image>>` and call it from blocking threads (`spawn_blocking`).
//!
//! # Performance
//! The BAT is kept in memory (4 bytes per block) and written back one dirty 512-byte sector at
//! a time at flush. New blocks are appended over fresh file space, so no block is ever
//! read-modify-written and a dynamic image's bitmap is written once per block. Zero writes to
//! unallocated blocks are skipped. Only an unaligned write into a sector whose bitmap bit is
//! clear (differencing images, or blocks written by other tools) merges that one sector. Every
//! 32 MiB written, write-back of the file is started asynchronously (`sync_file_range`, no
//! durability implied), so the disk works while the caller writes and `flush` is short.
//! [`Image::write_direct`] sends long sector-aligned data writes of a sparse image past the
//! page cache (`O_DIRECT`, through the `dio` crate) for writers that stream data in; a write
//! that starts a new block of a dynamic image then carries the block's bitmap in front of its
//! data. Written alone at the flush, that 512-byte bitmap shares a page with data the direct
//! write left out of the page cache, so the kernel first read the page from the disk: a
//! third of a millisecond per new block, a sixth of the master target's time in writes and
//! flushes in the replication benchmark.
//!
//! # Limits
//! Reads honour sector bitmaps (a clear bit reads as zeros, or from the parent). Resizing,
//! Virtual PC's old 511-byte footers and Mac alias parent locators are not supported; a block
//! size must be a power of two from 64 KiB to 256 MiB.

#![warn(missing_docs)]

mod bat;
mod bitmap;
mod create;
mod differencing;
pub mod dynamic_header;
mod error;
pub mod footer;
pub mod geometry;
mod image;
mod layout;
mod sparse;
mod wire;

#[cfg(feature = "cli")]
pub mod cli;

pub use create::CreateOptions;
pub use dynamic_header::{DynamicHeader, ParentLocator};
pub use error::{Error, Result};
pub use footer::{DiskType, Footer};
pub use geometry::Geometry;
pub use image::{Image, Notice};
pub use uuid::Uuid;
pub use wire::is_zero;

/// Bytes per sector; VHD offsets and sizes are in these units.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the footer (and of its copy at offset 0).
pub const FOOTER_SIZE: u64 = 512;
/// The format's size limit: 0xff000000 sectors, 2040 GiB.
pub const MAX_DISK_SIZE: u64 = 0xff00_0000 * SECTOR_SIZE;
/// Block size of new dynamic images: 2 MiB, what every VHD writer uses.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Longest parent chain opened (a child and its ancestors).
pub const MAX_CHAIN_DEPTH: usize = 16;

#[cfg(test)]
mod tests {
    #[test]
    fn image_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Image>();
        check::<super::Error>();
    }
}
