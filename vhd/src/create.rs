//! Creating new images: fixed, dynamic and differencing files, laid out and made durable.
//!
//! Layout of a new sparse image: footer copy (0), dynamic header (512), BAT (1536, padded to a
//! sector, all 0xFF), for a differencing image the parent locator data (one sector-padded
//! region each), then blocks as they are allocated, then the footer. A fixed image is the data
//! (a sparse file, so creating it is instant) followed by the footer.
//!
//! A new file is written completely, `fsync`ed, and then its directory is `fsync`ed, so that
//! after a crash the file either does not exist or is a complete image. Creation refuses to
//! overwrite an existing file.

use std::fs::File;
use std::path::Path;

use uuid::Uuid;

use crate::dynamic_header::{DynamicHeader, ParentLocator, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::footer::{DiskType, Footer};
use crate::wire::{self, round_up_sector, write_all_at};
use crate::{differencing, Image, DEFAULT_BLOCK_SIZE, FOOTER_SIZE, MAX_DISK_SIZE, SECTOR_SIZE};

/// Where new images put their BAT: right after the footer copy and the dynamic header.
const BAT_OFFSET: u64 = FOOTER_SIZE + 1024;

/// What to create with [`Image::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    disk_type: DiskType,
    size: u64,
    block_size: u32,
    uuid: Option<Uuid>,
}

impl CreateOptions {
    /// A fixed image of `size` bytes (a multiple of 512).
    pub fn fixed(size: u64) -> CreateOptions {
        CreateOptions {
            disk_type: DiskType::Fixed,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            uuid: None,
        }
    }

    /// A dynamic image of `size` bytes (a multiple of 512) with 2 MiB blocks.
    pub fn dynamic(size: u64) -> CreateOptions {
        CreateOptions {
            disk_type: DiskType::Dynamic,
            ..CreateOptions::fixed(size)
        }
    }

    /// Sets the block size of a dynamic image: a power of two from 64 KiB to 256 MiB. Other
    /// tools mostly expect the default, 2 MiB.
    pub fn block_size(mut self, block_size: u32) -> CreateOptions {
        self.block_size = block_size;
        self
    }

    /// Sets the image's UUID (random by default).
    pub fn uuid(mut self, uuid: Uuid) -> CreateOptions {
        self.uuid = Some(uuid);
        self
    }
}

impl Image {
    /// Creates a fixed or dynamic image at `path` (which must not exist) and opens it
    /// read-write. `qemu-img info` reports exactly the requested size.
    pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<Image> {
        let path = path.as_ref();
        let size = options.size;
        check_size(size)?;
        let uuid = options.uuid.unwrap_or_else(Uuid::new_v4);
        let footer = Footer::new(options.disk_type, size, uuid, wire::now());
        match options.disk_type {
            DiskType::Fixed => {
                let file = create_new(path)?;
                file.set_len(size).map_err(Error::io("size the image"))?;
                write_all_at(&file, &footer.to_bytes(), size, "write the footer")?;
                finish(&file, path)?;
            }
            DiskType::Dynamic => {
                check_block_size(options.block_size)?;
                let header = sparse_header(size, options.block_size)?;
                write_sparse(path, &footer, header, &[])?;
            }
            DiskType::Differencing => {
                return Err(Error::InvalidArgument(
                    "use Image::create_differencing for differencing images".into(),
                ))
            }
        }
        Image::open_rw(path)
    }

    /// Creates a differencing image at `path` (which must not exist) whose parent is the image
    /// at `parent`, and opens it read-write. The child has the parent's size and block size
    /// (2 MiB for a fixed parent) and records the parent's path as relative, absolute and URL
    /// parent locators.
    pub fn create_differencing(path: impl AsRef<Path>, parent: impl AsRef<Path>) -> Result<Image> {
        let path = path.as_ref();
        let parent_path = parent.as_ref();
        let parent = Image::open(parent_path)?;
        let size = parent.size();
        check_size(size)?;
        let block_size = parent
            .block_size()
            .and_then(|b| u32::try_from(b).ok())
            .unwrap_or(DEFAULT_BLOCK_SIZE);
        let mut header = sparse_header(size, block_size)?;
        header.parent_uuid = parent.footer().uuid;
        header.parent_timestamp = parent_path
            .metadata()
            .and_then(|m| m.modified())
            .map(wire::vhd_timestamp)
            .map_err(Error::io("stat the parent"))?;
        header.parent_name = parent_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let locators = differencing::locators_for(path, parent_path)?;
        let footer = Footer::new(DiskType::Differencing, size, Uuid::new_v4(), wire::now());
        drop(parent);
        write_sparse(path, &footer, header, &locators)?;
        Image::open_rw(path)
    }
}

fn check_size(size: u64) -> Result<()> {
    if size > MAX_DISK_SIZE {
        return Err(Error::TooLarge {
            size,
            max: MAX_DISK_SIZE,
        });
    }
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(Error::InvalidSize {
            size,
            reason: "must be a non-zero multiple of 512",
        });
    }
    Ok(())
}

fn check_block_size(block_size: u32) -> Result<()> {
    if block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )))
    }
}

/// A dynamic header for `size` bytes: exactly as many BAT entries as blocks (qemu refuses
/// more than 2040 GiB worth).
fn sparse_header(size: u64, block_size: u32) -> Result<DynamicHeader> {
    let entries =
        u32::try_from(size.div_ceil(u64::from(block_size))).map_err(|_| Error::TooLarge {
            size,
            max: MAX_DISK_SIZE,
        })?;
    Ok(DynamicHeader::new(BAT_OFFSET, entries, block_size))
}

/// Writes a complete sparse image: footer copy, header, empty BAT, locator data, footer.
fn write_sparse(
    path: &Path,
    footer: &Footer,
    mut header: DynamicHeader,
    locators: &[differencing::LocatorData],
) -> Result<()> {
    let bat_bytes = round_up_sector(u64::from(header.max_table_entries) * 4);
    let mut pos = BAT_OFFSET + bat_bytes;
    for (slot, loc) in header.locators.iter_mut().zip(locators) {
        let space = round_up_sector(loc.bytes.len() as u64).max(SECTOR_SIZE);
        *slot = ParentLocator {
            platform_code: loc.code,
            // The spec counts the reserved space in sectors.
            data_space: u32::try_from(space / SECTOR_SIZE)
                .map_err(|_| Error::InvalidArgument("parent path too long for a locator".into()))?,
            data_length: u32::try_from(loc.bytes.len())
                .map_err(|_| Error::InvalidArgument("parent path too long for a locator".into()))?,
            data_offset: pos,
        };
        pos += space;
    }
    let file = create_new(path)?;
    let footer_bytes = footer.to_bytes();
    write_all_at(&file, &footer_bytes, 0, "write the footer copy")?;
    write_all_at(
        &file,
        &header.to_bytes(),
        FOOTER_SIZE,
        "write the dynamic header",
    )?;
    let bat_len = usize::try_from(bat_bytes)
        .expect("a BAT of at most 128 MiB (2040 GiB in 64 KiB blocks) fits usize");
    write_all_at(&file, &vec![0xff; bat_len], BAT_OFFSET, "write the BAT")?;
    for (slot, loc) in header.locators.iter().zip(locators) {
        write_all_at(
            &file,
            &loc.bytes,
            slot.data_offset,
            "write a parent locator",
        )?;
    }
    write_all_at(&file, &footer_bytes, pos, "write the footer")?;
    finish(&file, path)
}

fn create_new(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io("create the image file"))
}

/// Makes a new file and its directory entry durable.
fn finish(file: &File, path: &Path) -> Result<()> {
    file.sync_all().map_err(Error::io("sync the new image"))?;
    let dir = differencing::dir_of(path);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("sync the image's directory"))
}
