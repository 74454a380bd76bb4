//! Spare segment files of one disk's cache: released segments kept, zeroed in place, for the
//! next segments to reuse instead of creating and deleting 64 MiB files at the rate the
//! cache fills.
//!
//! Deleting a segment costs the disk a discard of every byte on file systems mounted with
//! `discard`, and a new file costs the block allocator. A spare is renamed out of the
//! segments' namespace, then zeroed with `FALLOC_FL_ZERO_RANGE` (its blocks stay allocated
//! and read as zeros, which is how the segment reader finds the end of a reused file's new
//! records). On one 2-core VM whose root file system was mounted with `discard`, the
//! initial-sync benchmark ran 15–20% faster reusing segments.
//!
//! Neither the rename nor the zeroing is synced: a crash before they are durable leaves
//! either the released segment under its old name (its batches are on the master target and
//! are released again) or a spare whose zeroing may be lost, so spares found at start are
//! deleted. A reused file's zeroing is made durable by the fsync of its new header (see
//! `SegmentWriter::create`).
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};

/// Most spares kept per disk.
pub const MAX_SPARES: usize = 2;
/// File name extension of a spare.
const EXT: &str = "lbs";
/// Free space a spare must leave on the cache file system, besides the quota's reserve.
const HEADROOM: u64 = 256 * 1024 * 1024;

pub struct Spares {
    dir: PathBuf,
    /// Oldest first: usually whole segments (closed when full), not short ones.
    files: VecDeque<PathBuf>,
    /// Numbers the files' names.
    named: u64,
    /// Cleared once the file system cannot zero a file in place: segments are then deleted.
    reuse: bool,
}

impl Spares {
    /// Deletes the spares a previous run left in `dir` (their zeroing may not be durable).
    pub fn open(dir: &Path) -> io::Result<Spares> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if is_spare(&path) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Spares {
            dir: dir.to_path_buf(),
            files: VecDeque::new(),
            named: 0,
            reuse: true,
        })
    }

    /// A spare to reuse (it reads as zeros), if there is one.
    pub fn take(&mut self) -> Option<PathBuf> {
        self.files.pop_front()
    }

    /// Disposes of a segment file no longer needed: kept as a spare while there are fewer
    /// than `MAX_SPARES` and the file system has room, deleted otherwise.
    pub fn keep_or_delete(&mut self, path: &Path) -> io::Result<()> {
        if !(self.reuse && self.files.len() < MAX_SPARES && self.room()) {
            return std::fs::remove_file(path);
        }
        self.named += 1;
        let spare = self.dir.join(format!("spare-{}.{EXT}", self.named));
        // Renamed first: a file named as a segment never reads as zeros.
        std::fs::rename(path, &spare)?;
        let zeroed = std::fs::OpenOptions::new()
            .write(true)
            .open(&spare)
            .and_then(|f| {
                let len = f.metadata()?.len();
                lifeboat_common::fsutil::zero_range(&f, len)
            });
        match zeroed {
            Ok(()) => {
                self.files.push_back(spare);
                Ok(())
            }
            Err(e) => {
                // Mostly a file system without the operation; any failure ends the reuse.
                self.reuse = false;
                tracing::info!(dir = %self.dir.display(),
                    "released cache segments will be deleted, not reused: {e}");
                std::fs::remove_file(&spare)
            }
        }
    }

    fn room(&self) -> bool {
        let (free, _) = lifeboat_common::facts::space(&self.dir);
        free > crate::quota::FS_RESERVE + HEADROOM
    }
}

pub fn is_spare(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == EXT)
}
