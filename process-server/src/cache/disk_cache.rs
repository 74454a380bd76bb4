//! One disk's cache: its segments in sequence order, the segment being written, and the
//! highest sequence number that is durable. Appends are group-committed: the caller passes
//! every batch it has, they are written, and one fdatasync makes them all durable before any
//! is acknowledged. A restart starts a new segment; recovery truncates a torn tail. Released
//! segments are kept as zeroed spares that new segments reuse (see `spares`).
use super::crypto::CacheKey;
use super::segment::{SegmentReader, SegmentWriter, Tail};
use super::spares::Spares;
use lifeboat_proto::v1::ChangeBatch;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// A fully forwarded segment being written is retired once it is at least this big (smaller
/// ones keep being appended to, to avoid a file create and directory fsync per batch).
const RETIRE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O error in {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cached data of disk {disk} is damaged in {path}: {detail}; the disk needs a resync")]
    Corrupt {
        disk: String,
        path: PathBuf,
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a sequential reader stopped: after record `index - 1` (seq `seq`) of `path`, at
/// byte `offset`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cursor {
    path: Option<PathBuf>,
    offset: u64,
    index: u32,
    seq: u64,
}

#[derive(Debug, Clone)]
struct Closed {
    path: PathBuf,
    last_seq: u64,
    len: u64,
}

pub struct DiskCache {
    dir: PathBuf,
    disk_id: String,
    key: Arc<CacheKey>,
    closed: VecDeque<Closed>,
    writer: Option<SegmentWriter>,
    /// Highest sequence number durable here. Shared (see [`DiskCache::durable_counter`]) so
    /// that forwarders and flow control read it without the lock, which a group commit holds
    /// through its writes and fdatasync (tens of milliseconds in which a forwarder would
    /// stall a runtime thread).
    durable: Arc<AtomicU64>,
    /// Bytes the cache occupies on disk. Shared (see [`DiskCache::bytes_counter`]) so that
    /// flow control and acks can sum every disk's cache without taking their locks, which
    /// are held through fsyncs.
    bytes: Arc<AtomicU64>,
    /// Segments are written with `O_DIRECT` (see `segment`); off unless `with_direct_io`.
    direct_io: bool,
    /// Released segment files that the next segments reuse (not counted in `bytes`, which
    /// is what the cache holds).
    spares: Spares,
}

impl DiskCache {
    /// Opens (or creates) the cache of `disk_id` in `dir`, recovering from a crash.
    pub fn open(dir: &Path, disk_id: &str, key: Arc<CacheKey>) -> Result<DiskCache, CacheError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let spares = Spares::open(dir).map_err(io_err(dir))?;
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "lbc"))
            .collect();
        paths.sort();
        let mut cache = DiskCache {
            dir: dir.to_path_buf(),
            disk_id: disk_id.to_string(),
            key,
            closed: VecDeque::new(),
            writer: None,
            durable: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
            direct_io: false,
            spares,
        };
        let count = paths.len();
        for (i, path) in paths.into_iter().enumerate() {
            let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            let mut reader = match SegmentReader::open(&path, len) {
                Ok(r) => r,
                // A segment whose header never became durable holds nothing acknowledged.
                Err(_) if i + 1 == count => {
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                    continue;
                }
                Err(e) => return Err(io_err(&path)(e)),
            };
            let mut last = None;
            while let Some(batch) = reader.next_batch(&cache.key) {
                let durable = cache.durable_seq();
                if batch.seq != durable + 1 && durable != 0 {
                    return Err(CacheError::Corrupt {
                        disk: disk_id.into(),
                        path,
                        detail: format!("seq {} follows {durable}", batch.seq),
                    });
                }
                cache.durable.store(batch.seq, Ordering::Release);
                last = Some(batch.seq);
            }
            match reader.tail {
                Tail::Clean => {}
                Tail::Torn if i + 1 == count => {
                    // Written but never synced: never acknowledged. Cut it off.
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&path))?;
                    file.set_len(reader.valid_len).map_err(io_err(&path))?;
                    file.sync_all().map_err(io_err(&path))?;
                    tracing::info!(disk = disk_id, path = %path.display(), "truncated a torn cache tail");
                }
                Tail::Torn => {
                    return Err(CacheError::Corrupt {
                        disk: disk_id.into(),
                        path,
                        detail: "a segment other than the last ends in a torn record".into(),
                    })
                }
                Tail::Corrupt(detail) => {
                    return Err(CacheError::Corrupt {
                        disk: disk_id.into(),
                        path,
                        detail,
                    })
                }
            }
            match last {
                Some(last_seq) => {
                    cache.bytes.fetch_add(reader.valid_len, Ordering::Relaxed);
                    cache.closed.push_back(Closed {
                        path,
                        last_seq,
                        len: reader.valid_len,
                    });
                }
                None => std::fs::remove_file(&path).map_err(io_err(&path))?,
            }
        }
        Ok(cache)
    }

    /// Highest sequence number durable in this cache (0: none ever).
    pub fn durable_seq(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The live value of [`DiskCache::durable_seq`], readable without this cache's lock.
    pub fn durable_counter(&self) -> Arc<AtomicU64> {
        self.durable.clone()
    }

    /// Raises the durable position without data, to `seq`, which the master target already
    /// holds: batches this cache never saw (after a cache loss, a switch of process server,
    /// or initial-sync batches passed through without the cache). Everything cached is older,
    /// so applied too: it is released, and the next batch starts a segment of its own. (A
    /// segment that went on after a gap would read back as damaged: a reopened cache takes a
    /// gap in its seqs for a lost segment.)
    pub fn skip_to(&mut self, seq: u64) -> Result<(), CacheError> {
        let durable = self.durable_seq();
        if seq <= durable {
            return Ok(());
        }
        self.close_writer()?;
        self.release_through(durable)?;
        self.durable.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Writes the segments created from now on with `O_DIRECT` (`cache_direct_io`).
    pub fn with_direct_io(mut self, direct: bool) -> DiskCache {
        self.direct_io = direct;
        self
    }

    /// The live count of [`DiskCache::bytes`], readable without this cache's lock.
    pub fn bytes_counter(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }

    /// Writes `batches` (consecutive, starting at `durable_seq + 1`) and makes them durable.
    /// Returns the new durable sequence number and the (plain, stored) byte counts.
    pub fn append(
        &mut self,
        batches: &[ChangeBatch],
        compress: bool,
    ) -> Result<(u64, u64, u64), CacheError> {
        self.append_tracked(batches, compress)
            .map(|(seq, plain, stored, _)| (seq, plain, stored))
    }

    /// Like `append`, also returning for each batch the read cursor just after it, so a reader
    /// that got the batches some other way (from memory) can continue in the file after them.
    pub fn append_tracked(
        &mut self,
        batches: &[ChangeBatch],
        compress: bool,
    ) -> Result<(u64, u64, u64, Vec<Cursor>), CacheError> {
        let (mut plain, mut stored) = (0u64, 0u64);
        let mut cursors = Vec::with_capacity(batches.len());
        for batch in batches {
            if self.writer.as_ref().is_none_or(|w| w.len >= SEGMENT_BYTES) {
                self.close_writer()?;
                let w = self.new_segment(batch.seq)?;
                self.bytes.fetch_add(w.len, Ordering::Relaxed);
                self.writer = Some(w);
            }
            let writer = self.writer.as_mut().expect("writer created above");
            let (p, s) = match writer.append(&self.key, batch, compress) {
                Ok(sizes) => sizes,
                Err(e) => return Err(self.abandon_writer(e)),
            };
            plain += p as u64;
            stored += s as u64;
            self.bytes.fetch_add(s as u64, Ordering::Relaxed);
            cursors.push(Cursor {
                path: Some(writer.path.clone()),
                offset: writer.len,
                index: writer.records(),
                seq: batch.seq,
            });
        }
        if let (Some(writer), Some(last)) = (self.writer.as_mut(), batches.last()) {
            if let Err(e) = writer.sync() {
                return Err(self.abandon_writer(e));
            }
            self.durable.store(last.seq, Ordering::Release);
        }
        Ok((self.durable_seq(), plain, stored, cursors))
    }

    /// Starts the segment whose first record is `first_seq`, in a spare file if there is one.
    fn new_segment(&mut self, first_seq: u64) -> Result<SegmentWriter, CacheError> {
        let (dir, disk, direct) = (&self.dir, &self.disk_id, self.direct_io);
        if let Some(spare) = self.spares.take() {
            match SegmentWriter::create(dir, disk, first_seq, direct, Some(&spare)) {
                Ok(w) => return Ok(w),
                Err(e) => {
                    tracing::warn!(disk = %disk, "cannot reuse {}: {e}", spare.display());
                    let _ = std::fs::remove_file(&spare);
                }
            }
        }
        SegmentWriter::create(dir, disk, first_seq, direct, None).map_err(io_err(dir))
    }

    /// After a failed write or fsync: cuts the segment back to what was synced (those batches
    /// were not acknowledged) and closes it, so the next append starts a fresh segment rather
    /// than write after a failure.
    fn abandon_writer(&mut self, e: std::io::Error) -> CacheError {
        let Some(writer) = self.writer.as_mut() else {
            return io_err(&self.dir)(e);
        };
        let err = io_err(&writer.path)(e);
        take_bytes(&self.bytes, writer.rollback());
        if let Err(close) = self.close_writer() {
            tracing::warn!(disk = %self.disk_id, "closing a failed cache segment: {close}");
        }
        err
    }

    /// Closes the segment being written. A segment closed in the middle of a group holds
    /// records of that group, which must be durable before the group is acknowledged: it is
    /// synced here (`append_tracked` syncs only the segment it ends in). If that fails, its
    /// records since the last sync are dropped (not acknowledged) and the error returned.
    fn close_writer(&mut self) -> Result<(), CacheError> {
        let Some(mut w) = self.writer.take() else {
            return Ok(());
        };
        let synced = w.sync();
        if synced.is_err() {
            take_bytes(&self.bytes, w.rollback());
        }
        if w.records() == 0 {
            take_bytes(&self.bytes, w.len);
            std::fs::remove_file(&w.path).map_err(io_err(&w.path))?;
        } else {
            // Whatever the segment holds now is durable (synced, or rolled back to what
            // was): if the rest of the group fails, the sender resumes after it, not before.
            self.durable.fetch_max(w.last_seq, Ordering::AcqRel);
            self.closed.push_back(Closed {
                path: w.path.clone(),
                last_seq: w.last_seq,
                len: w.len,
            });
        }
        synced.map_err(io_err(&w.path))
    }

    /// Segments (path, readable length) that may hold batches after `seq`, oldest first.
    pub fn segments_after(&self, seq: u64) -> Vec<(PathBuf, u64)> {
        let mut out: Vec<(PathBuf, u64)> = self
            .closed
            .iter()
            .filter(|c| c.last_seq > seq)
            .map(|c| (c.path.clone(), c.len))
            .collect();
        if let Some(w) = &self.writer {
            if w.last_seq > seq {
                out.push((w.path.clone(), w.len));
            }
        }
        out
    }

    /// Deletes what the master target has durably applied (everything through `seq`).
    pub fn release_through(&mut self, seq: u64) -> Result<(), CacheError> {
        while self.closed.front().is_some_and(|c| c.last_seq <= seq) {
            if let Some(c) = self.closed.pop_front() {
                take_bytes(&self.bytes, c.len);
                self.spares
                    .keep_or_delete(&c.path)
                    .map_err(io_err(&c.path))?;
            }
        }
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.last_seq <= seq && w.records() > 0 && w.len >= RETIRE_BYTES)
        {
            self.close_writer()?;
            return self.release_through(seq);
        }
        Ok(())
    }

    /// Reads the cached batches after `seq`, in order, at most `max_bytes` of payload (at
    /// least one batch), continuing from `cursor` (where the previous read stopped) when it is
    /// still valid, so a forwarder does not re-read and re-decrypt what it already sent.
    pub fn read_from(
        &self,
        cursor: &Cursor,
        seq: u64,
        max_bytes: usize,
    ) -> Result<(Vec<ChangeBatch>, Cursor), CacheError> {
        let mut out = Vec::new();
        let mut size = 0;
        let mut next = cursor.clone();
        let corrupt = |path: &Path, detail: String| CacheError::Corrupt {
            disk: self.disk_id.clone(),
            path: path.to_path_buf(),
            detail,
        };
        for (path, limit) in self.segments_after(seq) {
            let resumable = cursor.path.as_ref() == Some(&path) && cursor.seq == seq;
            let mut reader = if resumable {
                SegmentReader::resume(&path, cursor.offset, cursor.index, limit)
            } else {
                SegmentReader::open(&path, limit)
            }
            .map_err(io_err(&path))?;
            while let Some(batch) = reader.next_batch(&self.key) {
                next = Cursor {
                    path: Some(path.clone()),
                    offset: reader.valid_len,
                    index: reader.index(),
                    seq: batch.seq,
                };
                if batch.seq <= seq {
                    continue;
                }
                // Never skip a batch: the master target would refuse the gap anyway.
                let expected = out.last().map_or(seq + 1, |b: &ChangeBatch| b.seq + 1);
                if batch.seq != expected {
                    return Err(corrupt(
                        &path,
                        format!("batch {} found where {expected} belongs", batch.seq),
                    ));
                }
                size += lifeboat_common::batch::payload_bytes(&batch);
                out.push(batch);
                if size >= max_bytes {
                    return Ok((out, next));
                }
            }
            match reader.tail {
                // Every byte up to the readable length was written and synced.
                Tail::Clean if reader.valid_len < limit => {
                    return Err(corrupt(
                        &path,
                        format!(
                            "the file ends at {} of {limit} written bytes",
                            reader.valid_len
                        ),
                    ))
                }
                Tail::Clean => {}
                Tail::Torn => {
                    return Err(corrupt(
                        &path,
                        "a torn record inside the written part of the segment".into(),
                    ))
                }
                Tail::Corrupt(detail) => return Err(corrupt(&path, detail)),
            }
        }
        Ok((out, next))
    }
}

/// Lowers a byte count, never below zero.
fn take_bytes(bytes: &AtomicU64, n: u64) {
    let _ = bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

#[cfg(test)]
#[path = "disk_cache_tests.rs"]
mod tests;
