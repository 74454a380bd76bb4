//! A view's private writes: what a test-failover or failed-over machine wrote to its disk,
//! kept apart from the replica so replication (and the journal) never see it.
//!
//! The bytes go to a sparse file at their disk offsets (`writes.raw`); the ranges written are
//! logged in `writes.log` as fixed 24-byte entries (offset, length, check). A flush makes the
//! data durable first, then appends and syncs the entries of the writes it covers — so after a
//! crash every logged range holds its data, and writes not yet flushed may be lost, as NBD
//! allows. A torn last entry fails its check and is cut off when the log is reopened.
use crate::rangemap::RangeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const ENTRY: usize = 24;
/// Zero-fills are written in pieces of this size.
const ZERO_PIECE: u64 = 1024 * 1024;

pub struct PrivateWrites {
    data: File,
    log: File,
    log_len: u64,
    map: RangeMap<()>,
    pending: Vec<(u64, u64)>,
}

fn check(offset: u64, len: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&offset.to_le_bytes());
    bytes[8..].copy_from_slice(&len.to_le_bytes());
    let hash = blake3::hash(&bytes);
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

impl PrivateWrites {
    /// Opens (or creates) the private writes kept in `dir`.
    pub fn open(dir: &Path) -> io::Result<PrivateWrites> {
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
        };
        let data = open("writes.raw")?;
        let log = open("writes.log")?;
        let bytes = std::fs::read(dir.join("writes.log"))?;
        let mut map = RangeMap::default();
        let mut log_len = 0u64;
        for entry in bytes.chunks_exact(ENTRY) {
            let offset = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(entry[8..16].try_into().expect("8 bytes"));
            let sum = u64::from_le_bytes(entry[16..].try_into().expect("8 bytes"));
            if sum != check(offset, len) {
                break;
            }
            map.insert(offset, len, (), offset);
            log_len += ENTRY as u64;
        }
        if log_len != bytes.len() as u64 {
            log.set_len(log_len)?;
            log.sync_all()?;
        }
        Ok(PrivateWrites {
            data,
            log,
            log_len,
            map,
            pending: Vec::new(),
        })
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.data.write_all_at(data, offset)?;
        self.map.insert(offset, data.len() as u64, (), offset);
        self.pending.push((offset, data.len() as u64));
        Ok(())
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(ZERO_PIECE) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_PIECE) as usize;
            self.data.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.map.insert(offset, len, (), offset);
        self.pending.push((offset, len));
        Ok(())
    }

    /// Makes every write so far durable (data, then the log entries naming it).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.data.sync_data()?;
        let mut entries = Vec::with_capacity(self.pending.len() * ENTRY);
        for &(offset, len) in &self.pending {
            entries.extend_from_slice(&offset.to_le_bytes());
            entries.extend_from_slice(&len.to_le_bytes());
            entries.extend_from_slice(&check(offset, len).to_le_bytes());
        }
        self.log.write_all_at(&entries, self.log_len)?;
        self.log.sync_data()?;
        self.log_len += entries.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Replaces, in `buf` (the point's content at `offset`), what was written privately.
    pub fn patch(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for piece in self.map.lookup(offset, buf.len() as u64) {
            if piece.source.is_some() {
                let dst = &mut buf[(piece.offset - offset) as usize..][..piece.len as usize];
                self.data.read_exact_at(dst, piece.offset)?;
            }
        }
        Ok(())
    }

    /// The ranges written (offset, length).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(o, l, _, _)| (o, l)).collect()
    }

    /// How many bytes of the disk were written privately (each byte once, however often).
    pub fn written_bytes(&self) -> u64 {
        self.map.iter().map(|(_, len, _, _)| len).sum()
    }

    /// Reads privately written bytes (a range from `ranges`).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.data.read_exact_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_writes_survive_and_unflushed_ones_do_not_show_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PrivateWrites::open(dir.path()).unwrap();
        w.write(4096, b"hello").unwrap();
        w.write_zeroes(4098, 2).unwrap();
        w.flush().unwrap();
        w.write(0, b"lost").unwrap();
        drop(w);
        // A torn entry at the end of the log is cut off.
        let log = dir.path().join("writes.log");
        let mut bytes = std::fs::read(&log).unwrap();
        bytes.extend_from_slice(&[7u8; 10]);
        std::fs::write(&log, &bytes).unwrap();
        let w = PrivateWrites::open(dir.path()).unwrap();
        assert_eq!(w.ranges(), vec![(4096, 2), (4098, 2), (4100, 1)]);
        let mut buf = *b"..........";
        w.patch(&mut buf, 4094).unwrap();
        assert_eq!(&buf, b"..he\0\0o...");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 48);
    }
}
