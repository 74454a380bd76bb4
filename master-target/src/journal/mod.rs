//! The retention journal of one replica disk (DESIGN §6): for every applied batch, an undo
//! record holding what the replica had in the ranges the batch overwrote. The replica itself
//! is the latest point; the disk as it was after batch `s` is the replica with the records of
//! the batches after `s` undone, newest first (or, equivalently, each byte taken from the
//! oldest record after `s` that covers it — see `view`).
//!
//! Records live in segment files (`journal/<n>.jnl`, 256 MiB each) in batch order, one record
//! per batch, contiguous in `seq`. This module owns the files and an in-memory index of the
//! records (seq, time, tags, place); record bodies stay on disk.
//!
//! Durability: `append` writes records and fdatasyncs before returning, and the caller writes
//! the replica only after that — a crash can leave the journal ahead of the replica (the
//! records are right, the batches are applied again), never behind it. A segment is fsynced
//! before the next one is started, so only the last segment can end in a torn record; opening
//! verifies the last segment's records and cuts it after the last whole one.
pub mod record;

use lifeboat_common::fsutil;
use record::{RecordHeader, HASH, PREFIX};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A segment file is closed for appends once it reaches this size.
pub const SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Where one record is, and what the index keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub seq: u64,
    pub time_ms: i64,
    pub tags: Vec<String>,
    pub segment: u64,
    pub pos: u64,
    pub header_len: u32,
    pub data_len: u64,
}

impl RecordMeta {
    /// File position of the record's first data byte.
    pub fn data_pos(&self) -> u64 {
        self.pos + PREFIX as u64 + self.header_len as u64
    }

    /// Bytes the record takes in its segment.
    pub fn encoded_len(&self) -> u64 {
        record::record_len(self.header_len as usize, self.data_len)
    }
}

struct Segment {
    file: File,
    len: u64,
}

pub struct Journal {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    records: VecDeque<RecordMeta>,
    /// Seqs of the records that carry tags (recovery points): few among many records, and
    /// listed with every heartbeat.
    tagged: VecDeque<u64>,
    bytes: u64,
    /// `SEGMENT_BYTES` (smaller in tests).
    pub(crate) segment_bytes: u64,
    /// Lowest number a new segment may take.
    next_segment: u64,
}

fn damaged(path: &Path, pos: u64, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "retention journal {} is damaged at byte {pos}: {why}; move the file away to \
             drop the history it holds (the replica itself is intact)",
            path.display()
        ),
    )
}

impl Journal {
    fn segment_path(dir: &Path, n: u64) -> PathBuf {
        dir.join(format!("{n:016x}.jnl"))
    }

    /// Opens (or creates) the journal in `dir`, cutting a torn record off the last segment.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        lifeboat_common::fsutil::create_private_dir(dir)?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_suffix(".jnl") {
                if let Ok(n) = u64::from_str_radix(hex, 16) {
                    numbers.push(n);
                }
            }
        }
        numbers.sort_unstable();
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            records: VecDeque::new(),
            tagged: VecDeque::new(),
            bytes: 0,
            segment_bytes: SEGMENT_BYTES,
            next_segment: 1,
        };
        let last = numbers.last().copied();
        for n in numbers {
            let path = Self::segment_path(dir, n);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let len = journal.scan_segment(n, &file, &path, Some(n) == last)?;
            journal.bytes += len;
            journal.segments.insert(n, Segment { file, len });
        }
        Ok(journal)
    }

    /// Indexes one segment's records; returns the length kept. The last segment's records
    /// are verified whole and a torn tail is cut off; earlier ones were fsynced complete.
    fn scan_segment(&mut self, n: u64, file: &File, path: &Path, last: bool) -> io::Result<u64> {
        let file_len = file.metadata()?.len();
        let mut pos = 0u64;
        while pos < file_len {
            match self.read_record_meta(n, file, pos, file_len, last) {
                Ok(meta) => {
                    if let Some(prev) = self.records.back() {
                        if meta.seq != prev.seq + 1 {
                            return Err(damaged(
                                path,
                                pos,
                                format!("record {} follows record {}", meta.seq, prev.seq),
                            ));
                        }
                    }
                    pos += meta.encoded_len();
                    self.push(meta);
                }
                Err(why) if last => {
                    tracing::warn!(journal = %path.display(), pos, "torn journal record cut off: {why}");
                    file.set_len(pos)?;
                    file.sync_all()?;
                    return Ok(pos);
                }
                Err(why) => return Err(damaged(path, pos, why)),
            }
        }
        Ok(pos)
    }

    fn read_record_meta(
        &self,
        segment: u64,
        file: &File,
        pos: u64,
        file_len: u64,
        verify: bool,
    ) -> Result<RecordMeta, String> {
        if file_len - pos < PREFIX as u64 {
            return Err("record prefix cut short".into());
        }
        let mut prefix = [0u8; PREFIX];
        file.read_exact_at(&mut prefix, pos)
            .map_err(|e| e.to_string())?;
        let (header_len, data_len) = record::parse_prefix(&prefix)?;
        let total = record::record_len(header_len, data_len);
        if file_len - pos < total {
            return Err("record cut short".into());
        }
        let mut header_bytes = vec![0u8; header_len];
        file.read_exact_at(&mut header_bytes, pos + PREFIX as u64)
            .map_err(|e| e.to_string())?;
        let header = record::parse_header(&header_bytes, data_len)?;
        if verify {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&prefix);
            hasher.update(&header_bytes);
            let mut at = pos + (PREFIX + header_len) as u64;
            let end = at + data_len;
            let mut buf = vec![0u8; (data_len as usize).min(4 << 20)];
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], at)
                    .map_err(|e| e.to_string())?;
                hasher.update(&buf[..n]);
                at += n as u64;
            }
            let mut stored = [0u8; HASH];
            file.read_exact_at(&mut stored, end)
                .map_err(|e| e.to_string())?;
            if hasher.finalize().as_bytes() != &stored {
                return Err("checksum mismatch".into());
            }
        }
        Ok(RecordMeta {
            seq: header.seq,
            time_ms: header.time_ms,
            tags: header.tags,
            segment,
            pos,
            header_len: header_len as u32,
            data_len,
        })
    }

    pub fn records(&self) -> &VecDeque<RecordMeta> {
        &self.records
    }

    /// Seq of the newest record (0: none).
    pub fn last_seq(&self) -> u64 {
        self.records.back().map(|r| r.seq).unwrap_or(0)
    }

    pub fn first_seq(&self) -> Option<u64> {
        self.records.front().map(|r| r.seq)
    }

    fn push(&mut self, meta: RecordMeta) {
        if !meta.tags.is_empty() {
            self.tagged.push_back(meta.seq);
        }
        self.records.push_back(meta);
    }

    /// The records that carry tags, oldest first.
    pub fn tagged(&self) -> impl Iterator<Item = &RecordMeta> {
        let first = self.first_seq().unwrap_or(0);
        self.tagged
            .iter()
            .filter_map(move |&seq| self.records.get((seq - first) as usize))
    }

    /// The records of the batches after `seq`, oldest first. Records are contiguous in seq,
    /// so this is a position, not a scan (it runs for every open view on every apply).
    pub fn records_after(&self, seq: u64) -> impl Iterator<Item = &RecordMeta> {
        let skip = match self.first_seq() {
            Some(first) if seq >= first => (seq - first + 1) as usize,
            _ => 0,
        };
        self.records.range(skip.min(self.records.len())..)
    }

    /// Bytes the segment files hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends records (seq order, each following the last) and makes them durable. The index
    /// shows them only once they are; on any failure the segments are cut back to where they
    /// were, so the same records are written again on the next try.
    pub fn append(&mut self, records: &[(RecordHeader, Vec<u8>)]) -> io::Result<()> {
        let lengths: Vec<(u64, u64)> = self.segments.iter().map(|(&n, s)| (n, s.len)).collect();
        let bytes_before = self.bytes;
        let mut added = Vec::new();
        let result = self.write_records(records, &mut added);
        if let Err(e) = result {
            for (n, segment) in self.segments.iter_mut() {
                let len = lengths
                    .iter()
                    .find(|(m, _)| m == n)
                    .map_or(0, |(_, len)| *len);
                if segment.len != len {
                    segment.len = len;
                    let _ = segment.file.set_len(len);
                }
            }
            self.bytes = bytes_before;
            return Err(e);
        }
        // Durable now; records are read back only to build views, so their pages need not
        // stay cached.
        for (n, segment) in &self.segments {
            let before = lengths.iter().find(|(m, _)| m == n).map_or(0, |(_, l)| *l);
            fsutil::drop_cached(&segment.file, before, segment.len.saturating_sub(before));
        }
        for meta in added {
            self.push(meta);
        }
        Ok(())
    }

    fn write_records(
        &mut self,
        records: &[(RecordHeader, Vec<u8>)],
        added: &mut Vec<RecordMeta>,
    ) -> io::Result<()> {
        let mut dirty = None;
        let mut last_seq = self.records.back().map(|r| r.seq);
        for (header, data) in records {
            if let Some(last) = last_seq {
                if header.seq != last + 1 {
                    return Err(io::Error::other(format!(
                        "journal record {} cannot follow {last}",
                        header.seq
                    )));
                }
            }
            let bytes = record::encode(header, data).map_err(io::Error::other)?;
            let n = self.writable_segment(bytes.len() as u64, &mut dirty)?;
            let segment = self.segments.get_mut(&n).expect("writable segment exists");
            let pos = segment.len;
            segment.len += bytes.len() as u64;
            self.bytes += bytes.len() as u64;
            dirty = Some(n);
            segment.file.write_all_at(&bytes, pos)?;
            last_seq = Some(header.seq);
            added.push(RecordMeta {
                seq: header.seq,
                time_ms: header.time_ms,
                tags: header.tags.clone(),
                segment: n,
                pos,
                header_len: (bytes.len() - PREFIX - HASH - data.len()) as u32,
                data_len: data.len() as u64,
            });
        }
        if let Some(n) = dirty {
            self.segments[&n].file.sync_data()?;
        }
        Ok(())
    }

    /// The segment to append `len` bytes to: the last one, or a new one once it is full (the
    /// full one is made durable first, so only the last segment can end torn).
    fn writable_segment(&mut self, len: u64, dirty: &mut Option<u64>) -> io::Result<u64> {
        if let Some((&n, segment)) = self.segments.iter().next_back() {
            if segment.len == 0 || segment.len + len <= self.segment_bytes {
                return Ok(n);
            }
            if dirty.take().is_some() {
                segment.file.sync_data()?;
            }
        }
        // Numbers are never reused in a process (a cleared journal's views are gone, but a
        // segment number must never name two different files while anything might hold it).
        let n = self
            .segments
            .keys()
            .next_back()
            .map(|n| n + 1)
            .unwrap_or(1)
            .max(self.next_segment);
        self.next_segment = n + 1;
        let path = Self::segment_path(&self.dir, n);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        lifeboat_common::fsutil::fsync_dir(&self.dir)?;
        self.segments.insert(n, Segment { file, len: 0 });
        Ok(n)
    }

    /// Reads a record's header (its extents).
    pub fn header(&self, meta: &RecordMeta) -> io::Result<RecordHeader> {
        let mut bytes = vec![0u8; meta.header_len as usize];
        self.read(meta.segment, meta.pos + PREFIX as u64, &mut bytes)?;
        record::parse_header(&bytes, meta.data_len)
            .map_err(|why| damaged(&Self::segment_path(&self.dir, meta.segment), meta.pos, why))
    }

    /// Reads `buf.len()` bytes of segment `segment` at `pos`.
    pub fn read(&self, segment: u64, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.segments.get(&segment).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("journal segment {segment} was pruned"),
            )
        })?;
        s.file.read_exact_at(buf, pos)
    }

    /// Deletes whole segments whose records all precede `seq` (the last segment stays).
    /// Returns the bytes freed.
    pub fn prune_before(&mut self, seq: u64) -> io::Result<u64> {
        let last_segment = self.segments.keys().next_back().copied();
        let mut freed = 0;
        while let Some(front) = self.records.front() {
            let n = front.segment;
            if Some(n) == last_segment {
                break;
            }
            let newest_in_segment = self
                .records
                .iter()
                .take_while(|r| r.segment == n)
                .map(|r| r.seq)
                .last()
                .unwrap_or(0);
            if newest_in_segment >= seq {
                break;
            }
            freed += self.delete_oldest_segment(n)?;
        }
        Ok(freed)
    }

    /// Deletes segment `n`, the oldest, and forgets its records. Returns its size.
    fn delete_oldest_segment(&mut self, n: u64) -> io::Result<u64> {
        match std::fs::remove_file(Self::segment_path(&self.dir, n)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let len = self.segments.remove(&n).map_or(0, |s| s.len);
        self.bytes -= len;
        while self.records.front().is_some_and(|r| r.segment == n) {
            self.records.pop_front();
        }
        let first = self.first_seq().unwrap_or(u64::MAX);
        while self.tagged.front().is_some_and(|&s| s < first) {
            self.tagged.pop_front();
        }
        Ok(len)
    }

    /// Drops every record (after a failover commit: the history no longer applies).
    pub fn clear(&mut self) -> io::Result<()> {
        // Oldest first, so a failure leaves a journal that is still contiguous.
        let numbers: Vec<u64> = self.segments.keys().copied().collect();
        for n in numbers {
            self.delete_oldest_segment(n)?;
        }
        lifeboat_common::fsutil::fsync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests;
