//! The replica's position — the last batch applied, its newest write time and the newest
//! tag — written after every applied group in place, with one `fdatasync`.
//!
//! `state.json` is replaced atomically (temp file, fsync, rename, directory fsync): two
//! flushes and a file-system journal commit, for a few numbers that change with every group.
//! On a virtual disk each flush waits for whatever the other processes have queued, so
//! during an initial sync that one write took about a sixth of a group's apply time. The
//! position file instead holds two fixed slots, written alternately in place (the file never
//! changes size, so `fdatasync` commits no metadata):
//!
//! ```text
//! slot (512 bytes, at 0 and 512):
//!   "LBPOS001" | generation u64 | applied_seq u64 | applied_write_unix_ms i64
//!   | last_tag_seq u64 | tag_len u16 | tag | zeros | crc64 u64 (of all before it)
//! ```
//!
//! A torn write damages only the slot being written, whose checksum then fails; the other
//! slot still holds the previous position, whose batches the process server keeps until
//! the new one is acknowledged. On open the valid slot with the higher generation counts,
//! and only if it is ahead of `state.json`, which is still written whole for every other
//! change (views, failover) and carries the position as of then. A tag too long for a slot
//! is written to `state.json` instead.
use lifeboat_common::crc::crc64;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SLOT: usize = 512;
const MAGIC: &[u8; 8] = b"LBPOS001";
/// Magic, generation, three numbers and the tag length.
const FIXED: usize = 8 + 8 + 8 + 8 + 8 + 2;
/// The longest tag a slot holds.
pub const MAX_TAG: usize = SLOT - FIXED - 8;

/// What a slot records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub applied_seq: u64,
    pub applied_write_unix_ms: i64,
    pub last_tag: String,
    pub last_tag_seq: u64,
}

/// The open position file.
pub struct PositionFile {
    file: File,
    /// Generation of the newest slot written (0: none yet).
    generation: u64,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join("position")
}

impl PositionFile {
    /// Creates an empty position file (two empty slots), replacing any there is, durably
    /// (temp file, fsync, rename, directory fsync).
    pub fn create(dir: &Path) -> io::Result<PositionFile> {
        lifeboat_common::fsutil::durable_write(&path(dir), &[0u8; 2 * SLOT], 0o600)?;
        Ok(PositionFile {
            file: OpenOptions::new().write(true).open(path(dir))?,
            generation: 0,
        })
    }

    /// Opens the replica's position file, creating an empty one if there is none (a replica
    /// from before position files); returns it with the newest valid position it holds.
    pub fn open(dir: &Path) -> io::Result<(PositionFile, Option<Position>)> {
        let Some(newest) = newest_in(dir)? else {
            return Ok((PositionFile::create(dir)?, None));
        };
        let generation = newest.as_ref().map_or(0, |(g, _)| *g);
        let file = OpenOptions::new().write(true).open(path(dir))?;
        Ok((
            PositionFile { file, generation },
            newest.map(|(_, position)| position),
        ))
    }

    /// Writes `position` into the older slot and makes it durable. `Ok(false)`: its tag is
    /// too long for a slot, nothing was written (write `state.json` instead).
    pub fn save(&mut self, position: &Position) -> io::Result<bool> {
        if position.last_tag.len() > MAX_TAG {
            return Ok(false);
        }
        let generation = self.generation + 1;
        let slot = encode(generation, position);
        self.file
            .write_all_at(&slot, (generation % 2) * SLOT as u64)?;
        self.file.sync_data()?;
        self.generation = generation;
        Ok(true)
    }
}

/// The valid slot with the highest generation in the replica's position file: `None` if
/// there is no file, `Some(None)` if no slot is valid.
fn newest_in(dir: &Path) -> io::Result<Option<Option<(u64, Position)>>> {
    match std::fs::read(path(dir)) {
        Ok(bytes) => Ok(Some(newest(&bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The valid slot with the highest generation.
fn newest(bytes: &[u8]) -> Option<(u64, Position)> {
    bytes
        .chunks_exact(SLOT)
        .filter_map(decode)
        .max_by_key(|(generation, _)| *generation)
}

fn encode(generation: u64, p: &Position) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    let tag = p.last_tag.as_bytes();
    slot[..8].copy_from_slice(MAGIC);
    slot[8..16].copy_from_slice(&generation.to_be_bytes());
    slot[16..24].copy_from_slice(&p.applied_seq.to_be_bytes());
    slot[24..32].copy_from_slice(&p.applied_write_unix_ms.to_be_bytes());
    slot[32..40].copy_from_slice(&p.last_tag_seq.to_be_bytes());
    slot[40..42].copy_from_slice(&(tag.len() as u16).to_be_bytes());
    slot[FIXED..FIXED + tag.len()].copy_from_slice(tag);
    let crc = crc64(&slot[..SLOT - 8]);
    slot[SLOT - 8..].copy_from_slice(&crc.to_be_bytes());
    slot
}

/// A slot's generation and position; `None` if it is empty, torn or damaged.
fn decode(slot: &[u8]) -> Option<(u64, Position)> {
    let number = |at: usize| u64::from_be_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
    if &slot[..8] != MAGIC || crc64(&slot[..SLOT - 8]) != number(SLOT - 8) {
        return None;
    }
    let tag_len = u16::from_be_bytes([slot[40], slot[41]]) as usize;
    let tag = slot.get(FIXED..FIXED + tag_len.min(MAX_TAG))?;
    Some((
        number(8),
        Position {
            applied_seq: number(16),
            applied_write_unix_ms: number(24) as i64,
            last_tag: String::from_utf8(tag.to_vec()).ok()?,
            last_tag_seq: number(32),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64) -> Position {
        Position {
            applied_seq: seq,
            applied_write_unix_ms: 1_700_000_000_000 + seq as i64,
            last_tag: format!("crash:{seq}"),
            last_tag_seq: seq,
        }
    }

    #[test]
    fn the_newest_position_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut file, none) = PositionFile::open(dir.path()).unwrap();
        assert_eq!(none, None, "a new file holds no position");
        for seq in 1..=5 {
            assert!(file.save(&at(seq)).unwrap());
        }
        drop(file);
        let (mut file, newest) = PositionFile::open(dir.path()).unwrap();
        assert_eq!(newest, Some(at(5)));
        // Generations go on from the newest slot: the next write replaces the older one.
        assert!(file.save(&at(6)).unwrap());
        assert_eq!(PositionFile::open(dir.path()).unwrap().1, Some(at(6)));
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_previous_position() {
        let dir = tempfile::tempdir().unwrap();
        let (mut file, _) = PositionFile::open(dir.path()).unwrap();
        file.save(&at(7)).unwrap(); // generation 1: slot 1
        file.save(&at(8)).unwrap(); // generation 2: slot 0
        drop(file);
        // Half of slot 0 written, as a crash in the middle of the write would leave it.
        let f = OpenOptions::new()
            .write(true)
            .open(path(dir.path()))
            .unwrap();
        f.write_all_at(&[0xAB; SLOT / 2], SLOT as u64 / 2).unwrap();
        assert_eq!(PositionFile::open(dir.path()).unwrap().1, Some(at(7)));
    }

    #[test]
    fn a_tag_too_long_for_a_slot_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut file, _) = PositionFile::open(dir.path()).unwrap();
        file.save(&at(1)).unwrap();
        let mut long = at(2);
        long.last_tag = "x".repeat(MAX_TAG + 1);
        assert!(!file.save(&long).unwrap());
        long.last_tag.truncate(MAX_TAG);
        assert!(file.save(&long).unwrap(), "the longest tag that fits");
        assert_eq!(PositionFile::open(dir.path()).unwrap().1, Some(long));
    }
}
