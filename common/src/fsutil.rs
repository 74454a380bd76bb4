//! Durable file operations. Every file Lifeboat must find intact after a crash is written here:
//! to a temporary file in the same directory, fsynced, renamed over the target, and the directory
//! fsynced, so a reader sees either the old or the new content, never a torn one.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and parents) with mode 0700: it will hold keys or replicated state.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    // The error names the directory: "Operation not permitted" alone does not say which.
    let named = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("cannot {what} {}: {e}", dir.display()))
    };
    fs::create_dir_all(dir).map_err(|e| named("create", e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| named("make private (mode 0700, needs its owner)", e))
}

/// fsync a directory so a rename or create inside it survives a crash.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `contents` to `path` atomically and durably with the given mode.
pub fn durable_write(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Drops the page-cache copy of `file`'s bytes `[offset, offset + len)` once they are durable
/// (call after `sync_data`). For write-once logs (the process server's cache, the retention
/// journal) whose data is not read back from the file in the normal course: keeping it cached
/// would only push the workload's own pages out of memory. Advice only: failure is ignored.
pub fn drop_cached(file: &File, offset: u64, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
    }
}

/// Makes `file`'s first `len` bytes read as zeros while keeping their blocks allocated
/// (`FALLOC_FL_ZERO_RANGE`: on ext4 and XFS the extents become "unwritten", a metadata change
/// with no data written and nothing freed). For files reused instead of deleted: freeing
/// blocks costs a discard on file systems mounted with `discard`, and writing into blocks
/// that are already allocated spares the block allocator. Fails where the file system has
/// no such operation (tmpfs, for one); callers then delete the file.
pub fn zero_range(file: &File, len: u64) -> io::Result<()> {
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::ZERO_RANGE, 0, len)
        .map_err(io::Error::from)
}

/// Durable write readable only by the owner (keys, passphrase).
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    durable_write(path, contents, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
