//! Cache segment files: an append-only sequence of sealed change batches of one disk.
//!
//! ```text
//! header : "LBCSEG01" | salt u64 | first_seq u64 | disk_id_len u16 | disk_id
//! record : "LBRC" | seq u64 | flags u8 | plain_len u32 | sealed_len u32 | sealed bytes
//! ```
//! `sealed` is AES-256-GCM (see `crypto`) of the prost-encoded batch, zstd-compressed when
//! flag bit 0 is set. A batch that is not compressed is sealed as it is encoded, without
//! an encoded copy in between (see `gcm_stream`); the record's bytes are the same. Records
//! are written unsynced and made durable together by `sync` (fdatasync); a crash can
//! therefore leave a torn or missing tail, which `scan` detects and the owner truncates —
//! those batches were never acknowledged.
//!
//! A segment file may be a reused one, longer than its records: `DiskCache` zeroes released
//! segments in place and renames them into service. The records therefore end at the end of
//! the file or at the first record header that is all zeros (space not written since). A
//! page of a record that was never written back, or the end of a record a stage left to the
//! next write, reads as zeros either way: from a sector's start (see `has_unwritten_part`).
//!
//! A cached batch is forwarded from memory and read back from the file only after a restart
//! or a long backlog, so by default records bypass the page cache (`O_DIRECT`, where the file
//! system allows; see the `dio` crate): that saves the page cache's copy, write-back and
//! reclaim (7–10% of an initial sync's CPU on the benchmark VM). Each 4 MiB stage is handed
//! to `dio`'s writer threads while the next batches are sealed, several in flight, as the
//! kernel's write-back would keep them (one direct write at a time made initial syncs 2–4
//! times slower on two VMs whose virtual disks want several large requests in flight); the
//! sync waits for them before its fdatasync. `cache_direct_io = false` writes through the
//! page cache instead: each stage's write-back is started at once, so a group's fdatasync
//! waits for its last stage only, and the pages are dropped from the cache once synced.
//!
//! Direct writes must cover whole aligned blocks, so the writer stages records in an aligned
//! buffer and writes whole blocks; at a sync the last, partly filled block is written too,
//! padded, and rewritten with the records that follow (the bytes already in it are
//! rewritten unchanged, so a torn rewrite cannot damage them). A segment's file can
//! therefore end in up to one block of zeros after its last record, which readers take as
//! its end.
use super::compress_probe::{probe_shrinks, probe_window, worth_compressing};
use super::crypto::{new_salt, CacheKey, TAG_LEN};
use dio::{AlignedBuf, DirectFile};
use lifeboat_common::batch::MAX_BATCH_BYTES;
use lifeboat_proto::v1::ChangeBatch;
use prost::Message;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use zstd::bulk::Compressor;

const SEGMENT_MAGIC: &[u8; 8] = b"LBCSEG01";
const RECORD_MAGIC: &[u8; 4] = b"LBRC";
const RECORD_HEADER: usize = 4 + 8 + 1 + 4 + 4;
const FLAG_ZSTD: u8 = 1;
/// Largest encoded batch accepted when reading back (payload plus framing).
const MAX_PLAIN: usize = MAX_BATCH_BYTES + 1024 * 1024;

pub fn file_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.lbc")
}

fn aad(disk_id: &str, seq: u64, flags: u8, plain_len: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(disk_id.len() + 13);
    a.extend_from_slice(disk_id.as_bytes());
    a.extend_from_slice(&seq.to_be_bytes());
    a.push(flags);
    a.extend_from_slice(&plain_len.to_be_bytes());
    a
}

/// The page size the kernel writes buffered data back in (the smallest on Linux).
const PAGE: u64 = 4096;

/// The smallest piece direct writes are made of: `dio` aligns them to the file system's
/// direct-I/O unit, 512 bytes or a multiple of it.
const SECTOR: u64 = 512;

/// Whether a record whose header starts at file offset `at` has sealed bytes that read as
/// zeros from a sector's start: the mark of a crash before that part was written. Buffered
/// writes reach the disk page by page, in any order, until the fdatasync; direct writes in
/// whole sectors, and each 4 MiB stage leaves the partly filled last sector of its last
/// record to the next write (or the sync). Sealed bytes look random: 32 zeros from a sector's
/// start are not chance, nor are a record's last bytes from a sector's start (at least 4,
/// part of the tag every record ends with), while a flipped bit (real damage) leaves none.
fn has_unwritten_part(at: u64, sealed: &[u8]) -> bool {
    let start = at + RECORD_HEADER as u64;
    let end = start + sealed.len() as u64;
    let mut sector = start.next_multiple_of(SECTOR);
    while sector < end {
        let upto = (sector + SECTOR).min(end);
        let part = &sealed[(sector - start) as usize..(upto - start) as usize];
        let telling = part.len() >= 32 || (upto == end && part.len() >= 4);
        if telling && part.iter().all(|&b| b == 0) {
            return true;
        }
        sector += SECTOR;
    }
    false
}

/// Staged bytes written out (whole blocks) once this many are held, bounding the buffer.
const STAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest staging buffer kept between groups. Batches of up to 4 MiB (the agent's) grow it by
/// doubling to twice a record and the partly filled block before it: a little over 8 MiB,
/// which a bound of exactly `2 * STAGE_BYTES` took for a big batch, dropping and growing the
/// buffer again (zeroing it: 1% of the CPU of an initial sync) at every group.
const KEEP_STAGED_CAPACITY: usize = 2 * (STAGE_BYTES + 64 * 1024);
/// Most zero bytes after a segment's last record (the padding of its last direct write).
const MAX_PADDING: usize = 4096;

/// The segment being appended to.
pub struct SegmentWriter {
    pub path: PathBuf,
    file: DirectFile,
    /// Records not yet written to the file, from file offset `staged_at` (block-aligned
    /// when writes are direct) up to `len`.
    staged: AlignedBuf,
    staged_at: u64,
    salt: u64,
    next_index: u32,
    pub len: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Reused between batches (making a zstd context is not free).
    zstd: Compressor<'static>,
    /// (len, next_index, last_seq) as of the last successful `sync`.
    synced: (u64, u32, u64),
    /// `staged_at` and the staged bytes (the part of the last block in use) as of that `sync`.
    synced_tail: (u64, Vec<u8>),
}

impl SegmentWriter {
    /// Creates a segment whose first record will be `first_seq`; header durable on return.
    /// `direct`: write records with `O_DIRECT` where the file system allows.
    /// `spare`: a file to reuse (renamed into place) instead of creating one; it must read as
    /// zeros (see `DiskCache` for how spares are made).
    pub fn create(
        dir: &Path,
        disk_id: &str,
        first_seq: u64,
        direct: bool,
        spare: Option<&Path>,
    ) -> io::Result<SegmentWriter> {
        let path = dir.join(file_name(first_seq));
        let salt = new_salt()?;
        let mut header = Vec::new();
        header.extend_from_slice(SEGMENT_MAGIC);
        header.extend_from_slice(&salt.to_be_bytes());
        header.extend_from_slice(&first_seq.to_be_bytes());
        header.extend_from_slice(&(disk_id.len() as u16).to_be_bytes());
        header.extend_from_slice(disk_id.as_bytes());
        let made = match spare {
            Some(spare) => std::fs::rename(spare, &path)
                .and_then(|()| OpenOptions::new().write(true).open(&path)),
            None => OpenOptions::new().write(true).create_new(true).open(&path),
        };
        let mut file = made?;
        // fsync, not fdatasync: a reused file's zeroing (an extent change) must be durable
        // before its new header is, or stale records could reappear after a crash.
        let durable = file
            .write_all(&header)
            .and_then(|()| file.sync_all())
            .and_then(|()| lifeboat_common::fsutil::fsync_dir(dir));
        if let Err(e) = durable {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let file = if direct {
            DirectFile::new(file, &path)
        } else {
            DirectFile::buffered(file)
        };
        // The header's block is rewritten (unchanged) with the first records.
        let mut staged = AlignedBuf::new();
        staged.extend_from_slice(&header);
        Ok(SegmentWriter {
            zstd: Compressor::new(1)?,
            path,
            file,
            staged,
            staged_at: 0,
            synced_tail: (0, header.clone()),
            salt,
            next_index: 0,
            len: header.len() as u64,
            first_seq,
            last_seq: first_seq.saturating_sub(1),
            synced: (header.len() as u64, 0, first_seq.saturating_sub(1)),
        })
    }

    /// Encodes, compresses, seals and stages one batch (not yet durable). Returns the
    /// (plain, stored) sizes. After an error, `rollback` before anything else.
    pub fn append(
        &mut self,
        key: &CacheKey,
        batch: &ChangeBatch,
        compress: bool,
    ) -> io::Result<(usize, usize)> {
        let sizes = self.append_record(key, batch, compress)?;
        if self.staged.len() >= STAGE_BYTES {
            self.write_staged(false)?;
        }
        Ok(sizes)
    }

    fn append_record(
        &mut self,
        key: &CacheKey,
        batch: &ChangeBatch,
        compress: bool,
    ) -> io::Result<(usize, usize)> {
        // Straight into the staging buffer: a header to fill in, the encoded batch, sealed in
        // place (no copy of the batch besides the encoding itself). Cut back on any error.
        let start = self.staged.len();
        let result = self.stage_record(key, batch, compress);
        if result.is_err() {
            self.staged.truncate(start);
        }
        let (plain_len, stored) = result?;
        self.next_index += 1;
        self.len += stored as u64;
        self.last_seq = batch.seq;
        Ok((plain_len, stored))
    }

    /// Appends one record to the staging buffer; returns its (plain, stored) sizes.
    fn stage_record(
        &mut self,
        key: &CacheKey,
        batch: &ChangeBatch,
        compress: bool,
    ) -> io::Result<(usize, usize)> {
        let start = self.staged.len();
        let body_at = start + RECORD_HEADER;
        // Filled in below, every byte, once the sealed length is known.
        self.staged.grow(RECORD_HEADER);
        let plain_len = batch.encoded_len();
        // Whether to compress: judged on the largest extent's data where it holds a probe,
        // else on the encoding (below). Batches that will not shrink (disk data already
        // compressed or encrypted; the benchmark's random data) are sealed as they are
        // encoded, the others encoded, compressed and sealed in place.
        let compress = match (compress, probe_window(batch)) {
            (false, _) => Some(false),
            (true, Some(window)) => Some(probe_shrinks(&mut self.zstd, window)?),
            (true, None) => None,
        };
        let flags = if compress == Some(false) {
            let aad = aad(&batch.disk_id, batch.seq, 0, plain_len as u32);
            let body = self.staged.grow(plain_len);
            let tag = key.seal_encoding(self.salt, self.next_index, &aad, batch, body)?;
            self.staged.extend_from_slice(&tag);
            0
        } else {
            self.stage_encoded(key, batch, plain_len, body_at, compress)?
        };
        let sealed_len = self.staged.len() - body_at;
        let header = &mut self.staged.as_mut_slice()[start..body_at];
        header[..4].copy_from_slice(RECORD_MAGIC);
        header[4..12].copy_from_slice(&batch.seq.to_be_bytes());
        header[12] = flags;
        header[13..17].copy_from_slice(&(plain_len as u32).to_be_bytes());
        header[17..21].copy_from_slice(&(sealed_len as u32).to_be_bytes());
        Ok((plain_len, RECORD_HEADER + sealed_len))
    }

    /// Encodes the batch at `body_at`, compresses it (if `compress`; if `None`, if its
    /// encoding is worth it), and seals it in place; returns the record's flags.
    fn stage_encoded(
        &mut self,
        key: &CacheKey,
        batch: &ChangeBatch,
        plain_len: usize,
        body_at: usize,
        compress: Option<bool>,
    ) -> io::Result<u8> {
        // Every byte of it is written by the encoding (exactly `encoded_len` bytes).
        let mut plain = self.staged.grow(plain_len);
        batch
            .encode(&mut plain)
            .map_err(|e| io::Error::other(format!("encoding a batch: {e}")))?;
        if !plain.is_empty() {
            return Err(io::Error::other("a batch encoded shorter than its length"));
        }
        let body = &self.staged.as_slice()[body_at..];
        let compress = match compress {
            Some(decided) => decided,
            None => worth_compressing(&mut self.zstd, body)?,
        };
        let flags = if compress {
            let compressed = self.zstd.compress(body)?;
            self.staged.truncate(body_at);
            self.staged.extend_from_slice(&compressed);
            FLAG_ZSTD
        } else {
            0
        };
        let aad = aad(&batch.disk_id, batch.seq, flags, plain_len as u32);
        let tag = key.seal(
            self.salt,
            self.next_index,
            &aad,
            &mut self.staged.as_mut_slice()[body_at..],
        )?;
        self.staged.extend_from_slice(&tag);
        Ok(flags)
    }

    /// Sends the staged records on their way to the file. Direct writes take whole blocks:
    /// before a sync (`to_sync`) the last, partly filled block goes too, padded with zeros,
    /// and stays staged as well, to be rewritten with what follows; between syncs it only
    /// stays staged. Direct writes are in flight when this returns (see `dio`), so the
    /// staging buffer is handed over and the partly filled block copied into a new one.
    fn write_staged(&mut self, to_sync: bool) -> io::Result<()> {
        let logical = self.staged.len();
        match self.file.alignment() {
            Some(align) => {
                let whole = logical - logical % align as usize;
                let tail = self.staged.as_slice()[whole..].to_vec();
                let mut out = std::mem::take(&mut self.staged);
                if to_sync {
                    out.pad_to(align as usize);
                } else {
                    out.truncate(whole);
                }
                // On failure nothing stays staged: `rollback` restages from the last sync.
                let mut next = match out.is_empty() {
                    true => out,
                    false => self.file.submit_aligned(out, self.staged_at)?,
                };
                next.extend_from_slice(&tail);
                self.staged = next;
                self.staged_at += whole as u64;
            }
            None => {
                let out = std::mem::take(&mut self.staged);
                self.staged = self.file.submit_aligned(out, self.staged_at)?;
                // Through the page cache: start these pages' write-back now, so the group's
                // fdatasync waits for the last stage only.
                dio::start_writeback(self.file.file(), self.staged_at, logical as u64);
                self.staged_at += logical as u64;
            }
        }
        Ok(())
    }

    /// Makes every record appended so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.write_staged(true)?;
        // Waits for the direct writes in flight, then fdatasync.
        self.file.sync_data()?;
        if self.file.alignment().is_none() {
            // Written through the page cache (no direct writes here): forwarding reads fresh
            // records from memory and the file only after a restart or a long backlog, so
            // its pages need not stay cached. From the page the last sync ended in (advice
            // covers whole pages only); the partly filled last page stays for the next append.
            let from = self.synced.0 - self.synced.0 % PAGE;
            let written = self.len.saturating_sub(from);
            lifeboat_common::fsutil::drop_cached(self.file.file(), from, written);
        }
        self.synced = (self.len, self.next_index, self.last_seq);
        self.synced_tail = (self.staged_at, self.staged.as_slice().to_vec());
        if self.staged.capacity() > KEEP_STAGED_CAPACITY {
            // A big batch grew the buffer; it is kept per disk, so do not keep it big.
            self.staged = AlignedBuf::new();
            self.staged.extend_from_slice(&self.synced_tail.1);
        }
        Ok(())
    }

    /// Drops every record appended since the last successful `sync` (after a failed write or
    /// fsync: they were never acknowledged, and will be sent again). Returns the bytes dropped.
    pub fn rollback(&mut self) -> u64 {
        let (len, index, seq) = self.synced;
        let dropped = self.len - len;
        // No write in flight may land after the cut.
        let _ = self.file.wait();
        let _ = self.file.file().set_len(len);
        let (at, tail) = &self.synced_tail;
        self.staged_at = *at;
        self.staged.clear();
        self.staged.extend_from_slice(tail);
        self.len = len;
        self.next_index = index;
        self.last_seq = seq;
        dropped
    }

    pub fn records(&self) -> u32 {
        self.next_index
    }
}

/// Why reading a segment stopped before its end.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// Every byte up to the limit was a whole, authentic record.
    Clean,
    /// The last record is incomplete: a write torn by a crash.
    Torn,
    /// A whole record failed authentication or decoding: stored data was damaged.
    Corrupt(String),
}

/// Reads a segment's records in order, up to `limit` bytes of file.
pub struct SegmentReader {
    reader: BufReader<std::io::Take<File>>,
    pub disk_id: String,
    salt: u64,
    index: u32,
    pub first_seq: u64,
    /// Bytes of whole, authentic records read so far (including the header).
    pub valid_len: u64,
    pub tail: Tail,
}

impl SegmentReader {
    pub fn open(path: &Path, limit: u64) -> io::Result<SegmentReader> {
        let file = File::open(path)?;
        let mut reader = BufReader::with_capacity(1 << 20, file.take(limit));
        let mut fixed = [0u8; 8 + 8 + 8 + 2];
        reader.read_exact(&mut fixed).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no segment header ({e})", path.display()),
            )
        })?;
        if &fixed[..8] != SEGMENT_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a cache segment", path.display()),
            ));
        }
        let salt = u64::from_be_bytes(fixed[8..16].try_into().expect("8 bytes"));
        let first_seq = u64::from_be_bytes(fixed[16..24].try_into().expect("8 bytes"));
        let id_len = u16::from_be_bytes(fixed[24..26].try_into().expect("2 bytes")) as usize;
        let mut id = vec![0u8; id_len];
        reader.read_exact(&mut id)?;
        let disk_id = String::from_utf8(id).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, "segment disk id is not UTF-8")
        })?;
        Ok(SegmentReader {
            reader,
            disk_id,
            salt,
            index: 0,
            first_seq,
            valid_len: (fixed.len() + id_len) as u64,
            tail: Tail::Clean,
        })
    }

    /// Continues reading at a record boundary found earlier (`offset` bytes into the file,
    /// record number `index`).
    pub fn resume(path: &Path, offset: u64, index: u32, limit: u64) -> io::Result<SegmentReader> {
        use std::io::{Seek, SeekFrom};
        let header = Self::open(path, limit)?;
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(SegmentReader {
            reader: BufReader::with_capacity(1 << 20, file.take(limit.saturating_sub(offset))),
            index,
            valid_len: offset,
            ..header
        })
    }

    /// Number of whole records read so far.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Reads `buf.len()` bytes; `Ok(false)` on a clean end of data before the first byte.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut read = 0;
        while read < buf.len() {
            match self.reader.read(&mut buf[read..])? {
                0 if read == 0 => return Ok(false),
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "torn")),
                n => read += n,
            }
        }
        Ok(true)
    }

    /// Reads up to `buf.len()` bytes, fewer only at the end of the data; returns how many.
    fn fill_upto(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut read = 0;
        while read < buf.len() {
            match self.reader.read(&mut buf[read..])? {
                0 => break,
                n => read += n,
            }
        }
        Ok(read)
    }

    /// Whether `seen` (read where a record should start) and everything after it are zeros,
    /// fewer than a block of them: the padding of the segment's last direct write.
    fn rest_is_padding(&mut self, seen: &[u8]) -> bool {
        if seen.iter().any(|&b| b != 0) {
            return false;
        }
        let mut rest = [0u8; MAX_PADDING];
        match self.fill_upto(&mut rest) {
            Ok(n) => seen.len() + n < MAX_PADDING && rest[..n].iter().all(|&b| b == 0),
            Err(_) => false,
        }
    }

    /// The next batch, or `None` at the end (see `tail` for why).
    pub fn next_batch(&mut self, key: &CacheKey) -> Option<ChangeBatch> {
        if self.tail != Tail::Clean {
            return None;
        }
        let mut header = [0u8; RECORD_HEADER];
        let got = match self.fill_upto(&mut header) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(_) => {
                self.tail = Tail::Torn;
                return None;
            }
        };
        if got == RECORD_HEADER && header.iter().all(|&b| b == 0) {
            // Space not written since the file was created or reused: its records end here.
            return None;
        }
        if got < RECORD_HEADER || &header[..4] != RECORD_MAGIC {
            if !self.rest_is_padding(&header[..got]) {
                self.tail = Tail::Torn;
            }
            return None;
        }
        let seq = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
        let flags = header[12];
        let plain_len = u32::from_be_bytes(header[13..17].try_into().expect("4 bytes"));
        let sealed_len = u32::from_be_bytes(header[17..21].try_into().expect("4 bytes")) as usize;
        if !(TAG_LEN..=MAX_PLAIN + TAG_LEN).contains(&sealed_len) || plain_len as usize > MAX_PLAIN
        {
            self.tail = Tail::Torn;
            return None;
        }
        let mut sealed = vec![0u8; sealed_len];
        if self.fill(&mut sealed).map(|whole| !whole).unwrap_or(true) {
            self.tail = Tail::Torn;
            return None;
        }
        let unwritten = has_unwritten_part(self.valid_len, &sealed);
        let Some(body) = key.open(
            self.salt,
            self.index,
            &aad(&self.disk_id, seq, flags, plain_len),
            sealed,
        ) else {
            self.tail = if unwritten {
                // Written but not yet synced when the process stopped: never acknowledged.
                Tail::Torn
            } else {
                Tail::Corrupt(format!(
                    "record {} (seq {seq}) fails authentication",
                    self.index
                ))
            };
            return None;
        };
        let plain = if flags & FLAG_ZSTD != 0 {
            match zstd::bulk::decompress(&body, plain_len as usize) {
                Ok(p) => p,
                Err(e) => {
                    self.tail = Tail::Corrupt(format!("seq {seq}: {e}"));
                    return None;
                }
            }
        } else {
            body
        };
        match ChangeBatch::decode(plain.as_slice()) {
            Ok(batch) if batch.seq == seq && batch.disk_id == self.disk_id => {
                self.index += 1;
                self.valid_len += (RECORD_HEADER + sealed_len) as u64;
                Some(batch)
            }
            Ok(_) => {
                self.tail = Tail::Corrupt(format!("seq {seq}: record does not match its header"));
                None
            }
            Err(e) => {
                self.tail = Tail::Corrupt(format!("seq {seq}: {e}"));
                None
            }
        }
    }
}

#[cfg(test)]
#[path = "segment_tests.rs"]
mod tests;
