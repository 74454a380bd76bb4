//! The capture queue's overflow file. When a burst of workload writes outruns replication and
//! the queue's memory is full, the data of further writes is appended here instead of making
//! the workload wait; the queue keeps their place in the order, and the shipper reads the data
//! back when it gets to them. The file is never fsynced, on purpose: every spilled write is
//! also marked in the persistent dirty map (see `dirty`), so after a crash the regions are
//! resynced from the source and the spill file is simply discarded.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

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

    /// Appends `data`; returns where it starts.
    pub fn append(&mut self, data: &[u8]) -> io::Result<u64> {
        if self.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path)?;
            self.file = Some(file);
        }
        let file = self.file.as_ref().expect("spill file just opened");
        let at = self.end;
        // On failure, whatever part reached the file lies past `end`: overwritten next time.
        file.write_all_at(data, at)?;
        self.end += data.len() as u64;
        Ok(at)
    }

    /// Reads back `len` bytes written at `at`. Reads come in the order the data was written:
    /// once everything is read back the file is emptied, so it only grows while a backlog
    /// lasts.
    pub fn take(&mut self, at: u64, len: u64) -> io::Result<Vec<u8>> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("the spill file is not open"))?;
        let mut data = vec![0u8; len as usize];
        file.read_exact_at(&mut data, at)?;
        self.start = self.start.max(at + len);
        if self.start >= self.end {
            self.clear();
        } else {
            // Read once: its pages are of no further use.
            lifeboat_common::fsutil::drop_cached(file, at, len);
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

    #[test]
    fn data_comes_back_in_order_and_the_file_empties() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        std::fs::write(&path, b"left over from a crash").unwrap();
        let mut spill = Spill::new(path.clone());
        assert!(!path.exists(), "a stale spill file is removed");
        let a = spill.append(b"first").unwrap();
        let b = spill.append(b"second!").unwrap();
        assert_eq!(spill.held(), 12);
        assert_eq!(spill.take(a, 5).unwrap(), b"first");
        assert_eq!(spill.held(), 7);
        assert_eq!(spill.take(b, 7).unwrap(), b"second!");
        assert_eq!(spill.held(), 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Appends start again at the beginning.
        assert_eq!(spill.append(b"again").unwrap(), 0);
        drop(spill);
        assert!(!path.exists());
    }
}
