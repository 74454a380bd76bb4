//! Capture in `nbd` mode: the write splitter (its NBD side is `splitter`). The workload writes through an NBD export; each
//! write is, in one critical section, marked in the persistent dirty map (made durable first if
//! the region was clean), applied to the source, and appended to the capture queue, which the
//! shipper turns into change batches. Doing the three under one lock makes the queue's order
//! the order the source saw, so any prefix of the stream is a state the source was in. The
//! NBD client is answered only after that, so an acknowledged write is both on the source and
//! recorded for replication (in the queue, and durably in the dirty map until shipped).
use crate::dirty::DirtyMap;
use crate::spill::{Spill, Spilled};
use bytes::Bytes;
use lifeboat_common::blockhash::{self, BlockHash};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How much the capture queue may hold, and for how long a write may wait for room.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes the queue keeps in memory. Beyond them the data of workload writes goes to the
    /// spill file (see `spill`), and once that is full too a workload write waits for the
    /// shipper (flow control): a burst faster than replication is absorbed, then slowed to
    /// replication speed rather than breaking the stream.
    pub throttle_bytes: u64,
    /// Bytes the spill file may hold (0: no spill file; writes wait at `throttle_bytes`).
    pub spill_bytes: u64,
    /// How long one write may wait for room. When it is up the agent gives up on the stream
    /// and falls back to the dirty map (the disk then needs a resync) rather than stalling the
    /// workload further.
    pub throttle_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            throttle_bytes: 256 * 1024 * 1024,
            spill_bytes: 4 * 1024 * 1024 * 1024,
            throttle_wait: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Queued bytes beyond which the stream is given up at once (writes that were not made to
    /// wait, such as a resync's reads, can push the queue past the throttle mark).
    fn max_queued(&self) -> u64 {
        self.throttle_bytes.saturating_mul(2)
    }
}

/// Largest data item queued: a larger workload write is split (a batch holds at least one
/// item, and must stay under the batch size limit receivers enforce).
const MAX_ITEM: usize = 4 * 1024 * 1024;

/// One captured write or initial-sync read, in source order.
#[derive(Debug, Clone)]
pub struct Captured {
    pub index: u64,
    pub at_ms: i64,
    pub offset: u64,
    /// Empty for a zero-fill of `zero_length` bytes. The pieces of a large write are slices
    /// of the buffer it arrived in, not copies.
    pub data: Bytes,
    pub zero_length: u64,
    /// Initial-sync data rather than a workload write.
    pub sync: bool,
    /// A recovery-point tag placed after everything queued before it (no data).
    pub tag: Option<String>,
    /// Where the data waits in the spill file while `data` is empty.
    pub spilled: Option<Spilled>,
}

impl Captured {
    pub fn covered(&self) -> u64 {
        match &self.spilled {
            Some(piece) => piece.len,
            None if self.data.is_empty() => self.zero_length,
            None => self.data.len() as u64,
        }
    }
}

pub struct Queue {
    next_index: u64,
    pub items: VecDeque<Captured>,
    /// Data bytes of the items held in memory (spilled ones are counted by `spill`).
    pub bytes: u64,
    spill: Spill,
    pub dirty: DirtyMap,
    /// Set when the queue overflowed and was dropped: the stream is broken until a resync.
    pub overflowed: bool,
    /// Writes are refused (a planned failover is under way).
    pub writes_stopped: bool,
    /// New writes wait until then (a group barrier holds them; see `points`).
    pub held_until: Option<Instant>,
}

/// The capture state of one disk, shared by the NBD backend, the initial sync and the shipper.
pub struct Capture {
    pub source: File,
    pub size: u64,
    pub queue: Mutex<Queue>,
    /// Signalled when something was queued.
    pub queued: Notify,
    /// Signalled when the shipper took items (room for throttled writes).
    drained: Condvar,
    limits: Limits,
    /// Bytes of changes captured so far: workload writes (nbd mode), or blocks a scan found
    /// changed since the previous one (scan mode). Initial syncs and resyncs are not changes.
    changed_bytes: AtomicU64,
}

pub use lifeboat_common::now_ms;

fn poisoned() -> io::Error {
    io::Error::other("capture state poisoned")
}

fn refuse_if_stopped(q: &Queue) -> io::Result<()> {
    if q.writes_stopped {
        // NBD clients see EPERM: the disk is read-only while it fails over.
        return Err(io::Error::new(
            io::ErrorKind::ReadOnlyFilesystem,
            "writes are stopped: the machine is failing over",
        ));
    }
    Ok(())
}

/// A compare cannot release regions while the stream is given up (its blocks would be dropped
/// and never shipped): the pass fails and starts over from a settled point.
fn refuse_if_given_up(q: &Queue) -> io::Result<()> {
    if q.overflowed {
        return Err(io::Error::other(
            "the change stream was given up during the compare",
        ));
    }
    Ok(())
}

/// Places the same tag on one disk, or on several at one instant, after everything queued: every queue is locked (in the order
/// given) before any tag is placed, so a write acknowledged on one disk before a write on
/// another was issued cannot end up after the tag on the first and before it on the second.
pub fn tag_all(captures: &[Arc<Capture>], tag: &str) -> io::Result<()> {
    let mut locked = Vec::with_capacity(captures.len());
    for c in captures {
        locked.push(c.queue.lock().map_err(|_| poisoned())?);
    }
    for (c, q) in captures.iter().zip(locked.iter_mut()) {
        let item = Captured {
            index: 0,
            at_ms: now_ms(),
            offset: 0,
            data: Bytes::new(),
            zero_length: 0,
            sync: true,
            tag: Some(tag.to_string()),
            spilled: None,
        };
        c.push(q, item);
    }
    drop(locked);
    for c in captures {
        c.queued.notify_one();
    }
    Ok(())
}

impl Queue {
    /// Capture index of the newest item ever queued (0: none).
    pub fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    /// Drops every queued item, in memory and spilled.
    pub fn drop_items(&mut self) {
        self.items.clear();
        self.bytes = 0;
        self.spill.clear();
    }

    /// Data bytes queued, in memory and spilled.
    pub fn queued_bytes(&self) -> u64 {
        self.bytes + self.spill.held()
    }
}

impl Capture {
    /// `spill_path`: where the queue's overflow file goes (see `spill`).
    pub fn new(
        source: File,
        size: u64,
        dirty: DirtyMap,
        limits: Limits,
        spill_path: PathBuf,
    ) -> Arc<Capture> {
        Arc::new(Capture {
            source,
            size,
            queue: Mutex::new(Queue {
                next_index: 1,
                items: VecDeque::new(),
                bytes: 0,
                spill: Spill::new(spill_path),
                dirty,
                overflowed: false,
                writes_stopped: false,
                held_until: None,
            }),
            queued: Notify::new(),
            drained: Condvar::new(),
            limits,
            changed_bytes: AtomicU64::new(0),
        })
    }

    /// Whether a write's data must go to the spill file (memory is full; the spill has room).
    fn spills(&self, q: &Queue) -> bool {
        q.bytes > self.limits.throttle_bytes && q.spill.held() < self.limits.spill_bytes
    }

    /// Whether a write must wait for the shipper: memory and spill file are both full.
    fn full(&self, q: &Queue) -> bool {
        q.bytes > self.limits.throttle_bytes && !self.spills(q) && !q.overflowed
    }

    /// Locks the queue, first waiting (bounded) while it is full.
    fn lock_with_room(&self) -> io::Result<MutexGuard<'_, Queue>> {
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        let limits = self.limits;
        if !self.full(&q) {
            return Ok(q);
        }
        let started = Instant::now();
        metrics::counter!("lifeboat_agent_throttled_writes_total").increment(1);
        while self.full(&q) {
            let left = limits.throttle_wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                tracing::warn!(
                    "a write waited {:?} for the process server: falling back to dirty-region tracking; the disk needs a resync",
                    limits.throttle_wait
                );
                self.overflow(&mut q);
                break;
            }
            q = self
                .drained
                .wait_timeout(q, left)
                .map_err(|_| poisoned())?
                .0;
        }
        metrics::counter!("lifeboat_agent_throttled_milliseconds_total")
            .increment(started.elapsed().as_millis() as u64);
        Ok(q)
    }

    /// Gives up on the stream: the dirty map already holds every queued region, and from now
    /// on its set regions are pinned — only a resync's compare may release them.
    fn overflow(&self, q: &mut Queue) {
        if !q.overflowed {
            metrics::counter!("lifeboat_agent_stream_breaks_total").increment(1);
        }
        // Every time, not only the first: a region released since (a compare) may hold writes
        // the stream has dropped now.
        q.dirty.pin_all();
        q.overflowed = true;
        q.drop_items();
        // Writers waiting for room need not wait any longer.
        self.drained.notify_all();
    }

    /// Gives up on the stream (a resync pass failed, or the initial sync was cut short).
    pub fn break_stream(&self) -> io::Result<()> {
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        self.overflow(&mut q);
        Ok(())
    }

    fn push(&self, q: &mut Queue, mut item: Captured) {
        item.index = q.next_index;
        q.next_index += 1;
        q.bytes += item.data.len() as u64;
        q.items.push_back(item);
        let max = self.limits.max_queued();
        if q.bytes > max && !q.overflowed {
            tracing::warn!("capture queue over {max} bytes: falling back to dirty-region tracking; the disk needs a resync");
        }
        if q.bytes > max || q.overflowed {
            self.overflow(q);
        }
    }

    /// The capture index to mark a write's regions with, given how many items it will queue:
    /// the last of them (the regions are clean once it is durable), or pinned while the stream
    /// is given up.
    fn mark_index(q: &Queue, items: u64) -> u64 {
        if q.overflowed {
            u64::MAX
        } else {
            q.next_index + items.max(1) - 1
        }
    }

    /// The write splitter's write: dirty map, source, queue, in one critical section. A write
    /// larger than `MAX_ITEM` is queued in pieces, so every batch stays within the limit.
    pub fn write(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let mut q = self.wait_unheld(self.lock_with_room()?)?;
        refuse_if_stopped(&q)?;
        let pieces = data.len().div_ceil(MAX_ITEM).max(1);
        let index = Self::mark_index(&q, pieces as u64);
        q.dirty.mark(offset, data.len() as u64, index)?;
        self.source.write_all_at(&data, offset)?;
        let at_ms = now_ms();
        // Beyond the memory mark the pieces' data goes to the spill file. One that cannot be
        // written (disk full) ends the stream: the write is on the source and in the dirty
        // map, so a resync ships it; the workload never sees the error.
        let spill = self.spills(&q) && !q.overflowed;
        let data = Bytes::from(data);
        let len = data.len();
        for i in 0..pieces {
            let range = i * MAX_ITEM..((i + 1) * MAX_ITEM).min(len);
            let at = offset + range.start as u64;
            let (data, spilled) = if spill {
                match q.spill.append(&data[range]) {
                    Ok(spilled) => {
                        metrics::counter!("lifeboat_agent_spilled_bytes_total")
                            .increment(spilled.len);
                        (Bytes::new(), Some(spilled))
                    }
                    Err(e) => {
                        tracing::warn!("cannot write the capture spill file ({e}): falling back to dirty-region tracking; the disk needs a resync");
                        self.overflow(&mut q);
                        break;
                    }
                }
            } else {
                (data.slice(range), None)
            };
            let item = Captured {
                index: 0,
                at_ms,
                offset: at,
                data,
                zero_length: 0,
                sync: false,
                tag: None,
                spilled,
            };
            self.push(&mut q, item);
        }
        drop(q);
        self.count_changed(len as u64);
        self.queued.notify_one();
        Ok(())
    }

    /// Counts `bytes` of captured changes (see `changed_bytes`).
    pub fn count_changed(&self, bytes: u64) {
        self.changed_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes of changes captured since the agent started.
    pub fn changed_bytes(&self) -> u64 {
        self.changed_bytes.load(Ordering::Relaxed)
    }

    /// Zeroes a range on the source and captures it as a zero-fill.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut q = self.wait_unheld(self.lock_with_room()?)?;
        refuse_if_stopped(&q)?;
        let index = Self::mark_index(&q, 1);
        q.dirty.mark(offset, len, index)?;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.source.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        let item = Captured {
            index,
            at_ms: now_ms(),
            offset,
            data: Bytes::new(),
            zero_length: len,
            sync: false,
            tag: None,
            spilled: None,
        };
        self.push(&mut q, item);
        drop(q);
        self.queued.notify_one();
        Ok(())
    }

    /// Initial sync: reads `len` bytes at `offset` and queues them, in the same critical
    /// section as writes so the read is ordered with them. All-zero data is queued as a
    /// zero-fill when `zeros_matter`, and not at all otherwise (an empty replica is zeros).
    /// Returns the bytes queued as data.
    pub fn sync_read(&self, offset: u64, len: u64, zeros_matter: bool) -> io::Result<u64> {
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        let data = read_new_at(&self.source, offset, len as usize)?;
        let zero = vhd::is_zero(&data);
        if zero && !zeros_matter {
            return Ok(0);
        }
        let shipped = if zero { 0 } else { len };
        let item = Captured {
            index: 0,
            at_ms: now_ms(),
            offset,
            data: if zero { Bytes::new() } else { data },
            zero_length: if zero { len } else { 0 },
            sync: true,
            tag: None,
            spilled: None,
        };
        self.push(&mut q, item);
        drop(q);
        self.queued.notify_one();
        Ok(shipped)
    }

    /// Resync and scan: reads `len` bytes at `offset` (in the same critical section as writes,
    /// so the read is ordered with them), hashes its blocks, and queues those whose hash
    /// differs from `known` (the replica's, or the last shipped) — runs of differing blocks
    /// as one extent, all-zero runs as zero-fills. Returns the bytes queued and the blocks'
    /// hashes. The dirty regions read are settled as of this point (see `DirtyMap::resynced`).
    pub fn compare_read(
        &self,
        offset: u64,
        len: u64,
        known: &[BlockHash],
    ) -> io::Result<(u64, Vec<BlockHash>)> {
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        refuse_if_given_up(&q)?;
        let data = read_new_at(&self.source, offset, len as usize)?;
        let hashes = blockhash::hash_blocks(&data, blockhash::BLOCK);
        let block = blockhash::BLOCK as usize;
        let mut shipped = 0u64;
        let mut i = 0;
        while i < hashes.len() {
            if known.get(i) == Some(&hashes[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < hashes.len() && known.get(i) != Some(&hashes[i]) {
                i += 1;
            }
            let bytes = &data[start * block..(i * block).min(data.len())];
            let at = offset + (start * block) as u64;
            let item = if vhd::is_zero(bytes) {
                Captured {
                    index: 0,
                    at_ms: now_ms(),
                    offset: at,
                    data: Bytes::new(),
                    zero_length: bytes.len() as u64,
                    sync: true,
                    tag: None,
                    spilled: None,
                }
            } else {
                Captured {
                    index: 0,
                    at_ms: now_ms(),
                    offset: at,
                    // A copy: a slice would keep the whole read alive for a small run,
                    // memory the queue's limit does not count.
                    data: Bytes::copy_from_slice(bytes),
                    zero_length: 0,
                    sync: true,
                    tag: None,
                    spilled: None,
                }
            };
            shipped += bytes.len() as u64;
            self.push(&mut q, item);
        }
        // The queue may have overflowed on the way, dropping what was pushed: the regions
        // must then stay pinned, not wait for an index that will never be shipped.
        refuse_if_given_up(&q)?;
        let index = q.last_index();
        q.dirty.resynced(offset, len, index);
        drop(q);
        if shipped > 0 {
            self.queued.notify_one();
        }
        Ok((shipped, hashes))
    }

    /// Holds new workload writes until `until` (or releases them with `None`). A write that
    /// already entered the critical section is queued before this returns.
    pub fn hold_writes(&self, until: Option<Instant>) -> io::Result<()> {
        self.queue.lock().map_err(|_| poisoned())?.held_until = until;
        if until.is_none() {
            self.drained.notify_all();
        }
        Ok(())
    }

    /// Waits while writes are held (never past the hold's deadline).
    fn wait_unheld<'a>(&self, mut q: MutexGuard<'a, Queue>) -> io::Result<MutexGuard<'a, Queue>> {
        while let Some(until) = q.held_until {
            let now = Instant::now();
            if now >= until {
                q.held_until = None;
                break;
            }
            q = self
                .drained
                .wait_timeout(q, until - now)
                .map_err(|_| poisoned())?
                .0;
        }
        Ok(q)
    }

    /// Refuses (or accepts again) workload writes. Set under the queue lock, so every write
    /// acknowledged before is queued before anything placed after this returns.
    pub fn stop_writes(&self, stop: bool) -> io::Result<()> {
        self.queue.lock().map_err(|_| poisoned())?.writes_stopped = stop;
        Ok(())
    }

    /// Ends the stream's fallback to the dirty map (a resync starts); returns the dirty ranges
    /// to compare.
    pub fn resume_stream(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        q.overflowed = false;
        Ok(q.dirty.dirty_ranges(self.size))
    }

    /// Takes up to `max_bytes` (at least one item) from the head of the queue.
    pub fn take(&self, max_bytes: u64, max_items: usize) -> Vec<Captured> {
        let Ok(mut q) = self.queue.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(front) = q.items.front() {
            if !out.is_empty() && (bytes + front.covered() > max_bytes || out.len() >= max_items) {
                break;
            }
            bytes += front.covered();
            let mut item = q.items.pop_front().expect("front exists");
            q.bytes -= item.data.len() as u64;
            if let Some(piece) = item.spilled.take() {
                match q.spill.take(&piece) {
                    Ok(data) => item.data = data.into(),
                    Err(e) => {
                        // The write is in the dirty map: a resync ships it.
                        tracing::warn!("cannot read the capture spill file back ({e}): falling back to dirty-region tracking; the disk needs a resync");
                        self.overflow(&mut q);
                        return Vec::new();
                    }
                }
            }
            // A batch's tags stand after all of its writes: end the batch at a tag.
            let tagged = item.tag.is_some();
            out.push(item);
            if tagged {
                break;
            }
        }
        drop(q);
        if !out.is_empty() {
            self.drained.notify_all();
        }
        out
    }

    /// Capture time of the oldest item not yet taken by the shipper.
    pub fn oldest_queued_ms(&self) -> Option<i64> {
        self.queue.lock().ok()?.items.front().map(|i| i.at_ms)
    }

    pub fn queued_bytes(&self) -> u64 {
        self.queue.lock().map(|q| q.queued_bytes()).unwrap_or(0)
    }

    pub fn overflowed(&self) -> bool {
        self.queue.lock().map(|q| q.overflowed).unwrap_or(true)
    }

    /// Capture index of the newest queued item (of everything captured so far).
    pub fn last_index(&self) -> io::Result<u64> {
        self.queue
            .lock()
            .map(|q| q.last_index())
            .map_err(|_| poisoned())
    }
}

/// Reads exactly `len` bytes at `offset` into a new buffer, without zeroing it first (the
/// initial sync may read its whole disk through here: zeroing cost as much as its all-zero
/// check of what was read).
fn read_new_at(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let at = offset + data.len() as u64;
        // Fills (part of) the spare capacity and extends the length by what was read.
        let n = match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut data), at) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the source disk ends before byte {}", offset + len as u64),
            ));
        }
    }
    // The capacity may exceed `len`, and so may the last read.
    data.truncate(len);
    Ok(data.into())
}

#[cfg(test)]
#[path = "capture_tests.rs"]
mod tests;
