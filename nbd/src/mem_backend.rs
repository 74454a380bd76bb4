//! [`MemBackend`]: an export held in memory, for tests, examples and small scratch disks.

use std::io;
use std::sync::RwLock;

use crate::Backend;

/// A fixed-size in-memory disk. Flush is a no-op (there is nothing to make durable).
#[derive(Debug)]
pub struct MemBackend {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemBackend {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }

    /// A disk holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemBackend {
            data: RwLock::new(data),
            read_only: false,
        }
    }

    /// Makes the export read-only.
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let size = self.data.read().unwrap_or_else(|p| p.into_inner()).len();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(io::ErrorKind::InvalidInput.into()),
        }
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // One shared buffer: a write is visible to every connection as soon as it completes.
        true
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let r = self.range(offset, len as usize)?;
        Ok(self.data.read().unwrap_or_else(|p| p.into_inner())[r].to_vec())
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len())?;
        self.data.write().unwrap_or_else(|p| p.into_inner())[r].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        // Like a punched hole: trimmed ranges read back as zeros.
        self.write_zeroes(offset, len, false, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _no_hole: bool,
        _fua: bool,
    ) -> io::Result<()> {
        let r = self.range(offset, len as usize)?;
        self.data.write().unwrap_or_else(|p| p.into_inner())[r].fill(0);
        Ok(())
    }
}
