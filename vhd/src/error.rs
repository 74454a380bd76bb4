//! The crate's error type.
//!
//! Every way a file can be malformed or hostile has its own variant, so callers (the master
//! target, the CLI) can tell "this is not a VHD" from "this VHD is damaged" from "the disk under
//! it failed". Nothing in the crate panics on file contents: parsing code returns these instead.

use std::io;
use std::path::PathBuf;

use uuid::Uuid;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong opening, creating, reading or writing an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system reported an error; `context` says what the crate was doing.
    #[error("{context}: {source}")]
    Io {
        /// What the crate was doing, e.g. "read the block allocation table".
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Neither the end of the file nor offset 0 holds a `conectix` footer.
    #[error("not a VHD image: no footer cookie at the end of the file or at offset 0 ({detail})")]
    NotVhd {
        /// Why no footer was found (file too short, wrong cookie).
        detail: String,
    },

    /// A structure's stored checksum does not match its contents.
    #[error("{structure} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// "footer" or "dynamic header".
        structure: &'static str,
        /// The checksum found in the file.
        stored: u32,
        /// The checksum of the bytes as read.
        computed: u32,
    },

    /// The dynamic header at the footer's data offset does not start with `cxsparse`.
    #[error("dynamic header at offset {offset} has no cxsparse cookie")]
    BadHeaderCookie {
        /// Byte offset the footer pointed at.
        offset: u64,
    },

    /// A disk type other than fixed (2), dynamic (3) or differencing (4).
    #[error("unsupported VHD disk type {0}")]
    UnsupportedDiskType(u32),

    /// A version, block size or other field the crate does not handle.
    #[error("unsupported VHD: {0}")]
    Unsupported(String),

    /// A size that is not a multiple of 512, zero where that is not allowed, or inconsistent.
    #[error("invalid size {size}: {reason}")]
    InvalidSize {
        /// The offending size in bytes.
        size: u64,
        /// Why it is rejected.
        reason: &'static str,
    },

    /// Larger than the format's limit of 0xff000000 sectors (2040 GiB).
    #[error("size {size} exceeds the VHD limit of {max} bytes (2040 GiB)")]
    TooLarge {
        /// The requested or stored size.
        size: u64,
        /// [`crate::MAX_DISK_SIZE`].
        max: u64,
    },

    /// The block allocation table has fewer entries than the disk size needs.
    #[error("block allocation table has {entries} entries, the disk needs {needed}")]
    TableTooSmall {
        /// Entries the header declares.
        entries: u32,
        /// Entries needed for the virtual size.
        needed: u64,
    },

    /// A metadata region (dynamic header, BAT, parent locator) does not fit in the file.
    #[error("{region} at {offset}..{end} lies outside the file ({file_len} bytes)")]
    RegionOutsideFile {
        /// Which structure.
        region: String,
        /// Where it starts.
        offset: u64,
        /// Where it ends (exclusive); saturates at `u64::MAX`.
        end: u64,
        /// The file length.
        file_len: u64,
    },

    /// A BAT entry points wholly past the end of the file.
    #[error("block {block} at offset {offset} lies outside the file ({file_len} bytes)")]
    BlockOutsideFile {
        /// Block index.
        block: u64,
        /// Byte offset the BAT gives for its sector bitmap.
        offset: u64,
        /// The file length.
        file_len: u64,
    },

    /// The file ends inside a block the BAT references: it was cut short.
    #[error(
        "image truncated: block {block} needs the file to be {needed} bytes, it is {file_len}"
    )]
    Truncated {
        /// The block that extends past the end.
        block: u64,
        /// File length the block needs.
        needed: u64,
        /// Actual file length.
        file_len: u64,
    },

    /// Two regions of the file (header, BAT, locator data, blocks) overlap.
    #[error("{first} overlaps {second}")]
    Overlap {
        /// The region that starts first.
        first: String,
        /// The region that starts inside it.
        second: String,
    },

    /// A BAT entry that is not the unallocated marker but cannot be a block.
    #[error("block {block}: {reason}")]
    BadBlockEntry {
        /// Block index.
        block: u64,
        /// Why it is rejected.
        reason: &'static str,
    },

    /// No parent locator and no parent name leads to an existing file.
    #[error("parent of {child} not found (tried: {tried})")]
    ParentNotFound {
        /// The differencing image.
        child: PathBuf,
        /// The candidate paths, comma-separated.
        tried: String,
    },

    /// The file the locators lead to is not the parent the child was made from.
    #[error("parent {parent} has id {found}, {child} expects {expected}")]
    ParentMismatch {
        /// The differencing image.
        child: PathBuf,
        /// The candidate parent.
        parent: PathBuf,
        /// The parent UUID stored in the child's dynamic header.
        expected: Uuid,
        /// The UUID in the candidate's footer.
        found: Uuid,
    },

    /// The parent chain returns to an image already in it.
    #[error("parent chain loops back to {0}")]
    ParentLoop(PathBuf),

    /// More than [`crate::MAX_CHAIN_DEPTH`] images in a parent chain.
    #[error("parent chain deeper than {0} images")]
    ParentChainTooDeep(usize),

    /// A read or write past the virtual size.
    #[error("access {offset}+{len} is beyond the virtual size {size}")]
    OutOfBounds {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },

    /// A write to an image opened read-only (or to a parent through its child).
    #[error("image is open read-only")]
    ReadOnly,

    /// A caller-supplied option is invalid (block size, parent type, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Wraps an I/O error with what the crate was doing.
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}
