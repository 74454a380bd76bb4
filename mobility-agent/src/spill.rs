//! The capture queue's overflow file. When a burst of workload writes outruns replication and
//! the queue's memory is full, the data of further writes is appended here instead of making
//! the workload wait; the queue keeps their place in the order, and the shipper reads the data
//! back when it gets to them. The file is never fsynced, on purpose: every spilled write is
//! also marked in the persistent dirty map (see `dirty`), so after a crash the regions are
//! resynced from the source and the spill file is simply discarded.
//!
//! Space: data read back is punched out of the file at once (blocks freed, pages dropped
//! without being written back), so the disk space used stays at what is held, which the
//! caller bounds; the file's apparent size resets when the backlog drains. Integrity: a page
//! the kernel failed to write back could be read back stale without any error (nothing
//! fsyncs this file to report it), so each piece carries a CRC-64 checked on the way
//! back; a mismatch is an error, and the caller falls back to the dirty map.
use lifeboat_common::crc::crc64;
use rustix::fs::{fallocate, FallocateFlags};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

/// Where a spilled piece is and what it must read back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spilled {
    pub at: u64,
    pub len: u64,
    pub crc: u64,
}

pub struct Spill {
    path: PathBuf,
    file: Option<File>,
    /// End of the data written so far (where the next append goes).
    end: u64,
    /// Start of the data not yet read back (everything before it was shipped).
    start: u64,
}

impl Spill {
    /// A spill at `path`; a file left there by an earlier run is removed (its writes are
    /// covered by the dirty map).
    pub fn new(path: PathBuf) -> Spill {
        let _ = std::fs::remove_file(&path);
        Spill {
            path,
            file: None,
            end: 0,
            start: 0,
        }
    }

    /// Bytes written and not yet read back.
    pub fn held(&self) -> u64 {
        self.end - self.start
    }

    /// Appends `data`; returns where it is.
    pub fn append(&mut self, data: &[u8]) -> io::Result<Spilled> {
        if self.file.is_none() {
            // Workload data: readable by the agent only.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&self.path)?;
            self.file = Some(file);
        }
        let file = self.file.as_ref().expect("spill file just opened");
        let at = self.end;
        // On failure, whatever part reached the file lies past `end`: overwritten next time.
        file.write_all_at(data, at)?;
        self.end += data.len() as u64;
        Ok(Spilled {
            at,
            len: data.len() as u64,
            crc: crc64(data),
        })
    }

    /// Reads back a piece (in the order they were written) and frees its space.
    pub fn take(&mut self, piece: &Spilled) -> io::Result<Vec<u8>> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("the spill file is not open"))?;
        let mut data = vec![0u8; piece.len as usize];
        file.read_exact_at(&mut data, piece.at)?;
        if crc64(&data) != piece.crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "spilled data read back differs from what was written",
            ));
        }
        self.start = self.start.max(piece.at + piece.len);
        if self.start >= self.end {
            self.clear();
        } else {
            // Best effort: a file system without hole punching keeps the blocks until the
            // backlog drains and the file is emptied.
            let _ = fallocate(
                file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                piece.at,
                piece.len,
            );
        }
        Ok(data)
    }

    /// Forgets everything spilled (the stream was given up, or all of it was read back).
    pub fn clear(&mut self) {
        if let Some(file) = &self.file {
            let _ = file.set_len(0);
        }
        self.start = 0;
        self.end = 0;
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn data_comes_back_in_order_its_space_is_freed_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        std::fs::write(&path, b"left over from a crash").unwrap();
        let mut spill = Spill::new(path.clone());
        assert!(!path.exists(), "a stale spill file is removed");
        let big = vec![7u8; 1 << 20];
        let a = spill.append(&big).unwrap();
        let b = spill.append(b"second!").unwrap();
        assert_eq!(spill.held(), (1 << 20) + 7);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let allocated = meta.blocks() * 512;
        assert_eq!(spill.take(&a).unwrap(), big);
        assert_eq!(spill.held(), 7);
        let after = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            after < allocated,
            "the piece read back was not punched out ({allocated} -> {after} bytes)"
        );
        assert_eq!(spill.take(&b).unwrap(), b"second!");
        assert_eq!(spill.held(), 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Appends start again at the beginning; damage on disk is an error, not data.
        let c = spill.append(b"again").unwrap();
        assert_eq!(c.at, 0);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"X", 0)
            .unwrap();
        let err = spill.take(&c).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(spill);
        assert!(!path.exists());
    }
}
