//! The newest durable batches of each disk, kept in memory so the forwarder sends them to the
//! master target as they are, without reading them back from the cache file (a disk read,
//! then decryption and decoding, all on the process server's busiest path).
//!
//! Memory is bounded twice: each disk keeps at most [`PER_DISK_MAX`], and all disks together
//! at most the process server's budget (`forward_memory_mib`), except that every disk may keep
//! [`PER_DISK_FLOOR`] (so the true bound is the larger of the budget and the floor times the
//! disks). Over the budget, a disk that adds batches drops its own oldest down to the floor.
//! A disk whose master target keeps up holds almost nothing (its forwarder takes batches as
//! soon as they are stored), and a disk whose forwarder is not taking from memory (it fell
//! further behind than what is kept and reads the cache file, or its master target cannot be
//! reached) shrinks to the floor; so the budget goes to the disks being synchronised, whose
//! master targets trail by whole groups. `lifeboat_ps_cache_read_back_bytes_total` counts
//! what forwarders read back from the file.
//!
//! Initial-sync batches are not in the cache file at all (see `ingest`): they are *held*
//! here, outside the budget, until the master target has applied them. A held batch is never
//! dropped for memory and is copied (not taken) when forwarded, so a forwarding session that
//! fails sends it again from memory.
use crate::cache::Cursor;
use lifeboat_common::batch::payload_bytes;
use lifeboat_proto::v1::ChangeBatch;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Most payload bytes one disk keeps.
const PER_DISK_MAX: usize = 256 * 1024 * 1024;
/// What a disk may keep even when the process server's budget is spent.
const PER_DISK_FLOOR: usize = 32 * 1024 * 1024;
/// The default budget over all disks, in MiB.
pub const DEFAULT_BUDGET_MIB: u64 = 1024;

/// The process server's memory budget for kept batches, shared by every disk.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit_bytes: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit: limit_bytes,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes kept now, over all disks.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.limit
    }
}

/// One disk's newest durable batches, in seq order.
pub struct Recent {
    budget: Arc<Budget>,
    /// Each batch with the cache-file cursor just after it.
    batches: VecDeque<(ChangeBatch, Cursor)>,
    bytes: usize,
    /// Initial-sync batches not in the cache file, in seq order, until applied.
    held: VecDeque<ChangeBatch>,
    held_bytes: usize,
}

impl Recent {
    pub fn new(budget: Arc<Budget>) -> Recent {
        Recent {
            budget,
            batches: VecDeque::new(),
            bytes: 0,
            held: VecDeque::new(),
            held_bytes: 0,
        }
    }

    /// Holds initial-sync batches that are not written to the cache file (consecutive, after
    /// everything held or stored), until [`Recent::release_held`] says they are applied.
    pub fn hold(&mut self, batches: Vec<ChangeBatch>) {
        for b in batches {
            self.held_bytes += payload_bytes(&b);
            self.held.push_back(b);
        }
    }

    /// Drops the held batches the master target has applied (seq up to `applied`).
    pub fn release_held(&mut self, applied: u64) {
        while self.held.front().is_some_and(|b| b.seq <= applied) {
            if let Some(b) = self.held.pop_front() {
                self.held_bytes -= payload_bytes(&b);
            }
        }
    }

    /// Copies of the held batches after `seq`: to be cached (see `held`).
    pub fn held_after(&self, seq: u64) -> Vec<ChangeBatch> {
        self.held.iter().filter(|b| b.seq > seq).cloned().collect()
    }

    /// Drops every held batch: they are cached now, or applied.
    pub fn clear_held(&mut self) {
        self.held.clear();
        self.held_bytes = 0;
    }

    /// Payload bytes held (not in the cache file) and not yet applied.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Adds batches just made durable (consecutive, after everything held), then drops the
    /// oldest while over this disk's bound or, above the floor, over the shared budget.
    pub fn push(&mut self, batches: Vec<(ChangeBatch, Cursor)>) {
        for b in batches {
            self.account_added(payload_bytes(&b.0));
            self.batches.push_back(b);
        }
        while self.bytes > PER_DISK_MAX || (self.bytes > PER_DISK_FLOOR && self.budget.over()) {
            if self.pop_front().is_none() {
                break;
            }
        }
    }

    /// Takes the batches that follow `sent` (up to `max_bytes`, at least one), if the next one
    /// is held, with the cache cursor after the last; drops what is older.
    pub fn take_after(
        &mut self,
        sent: u64,
        max_bytes: usize,
    ) -> (Vec<ChangeBatch>, Option<Cursor>) {
        if let Some(first) = self.held.front().map(|b| b.seq) {
            if (first..first + self.held.len() as u64).contains(&(sent + 1)) {
                // Copies: a held batch stays until applied (it is nowhere else to read from).
                let mut out = Vec::new();
                let mut size = 0;
                for b in self.held.range((sent + 1 - first) as usize..) {
                    if !out.is_empty() && size >= max_bytes {
                        break;
                    }
                    size += payload_bytes(b);
                    out.push(b.clone());
                }
                return (out, None);
            }
        }
        while self.batches.front().is_some_and(|b| b.0.seq <= sent) {
            self.pop_front();
        }
        if self.batches.front().is_some_and(|b| b.0.seq > sent + 1) {
            // The forwarder is further behind than what is kept and reads the file; it may
            // not reach these soon (new batches push them out as fast as it reads), so they
            // give their memory back to the shared budget.
            self.shrink_to_floor();
            return (Vec::new(), None);
        }
        let (mut out, mut cursor) = (Vec::new(), None);
        let mut size = 0;
        let mut expected = sent + 1;
        while let Some(front) = self.batches.front() {
            if front.0.seq != expected || (!out.is_empty() && size >= max_bytes) {
                break;
            }
            let Some((b, c)) = self.pop_front() else {
                break;
            };
            size += payload_bytes(&b);
            expected += 1;
            out.push(b);
            cursor = Some(c);
        }
        (out, cursor)
    }

    /// Drops the oldest batches down to [`PER_DISK_FLOOR`]: for a disk whose forwarder is
    /// not taking from memory (it reads the file, or its master target is unreachable).
    pub fn shrink_to_floor(&mut self) {
        while self.bytes > PER_DISK_FLOOR {
            if self.pop_front().is_none() {
                break;
            }
        }
    }

    /// Payload bytes this disk keeps.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    fn pop_front(&mut self) -> Option<(ChangeBatch, Cursor)> {
        let b = self.batches.pop_front()?;
        self.account_removed(payload_bytes(&b.0));
        Some(b)
    }

    fn account_added(&mut self, n: usize) {
        self.bytes += n;
        self.budget.used.fetch_add(n, Ordering::Relaxed);
    }

    fn account_removed(&mut self, n: usize) {
        self.bytes -= n;
        self.budget.used.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Recent {
    /// A disk leaving the process server gives its share back.
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, len: usize) -> (ChangeBatch, Cursor) {
        let b = ChangeBatch {
            seq,
            extents: vec![lifeboat_proto::v1::Extent {
                offset: 0,
                data: vec![1; len].into(),
                zero_length: 0,
            }],
            ..Default::default()
        };
        (b, Cursor::default())
    }

    const MIB: usize = 1024 * 1024;

    #[test]
    fn batches_are_taken_in_order_and_only_when_contiguous() {
        let mut r = Recent::new(Budget::new(usize::MAX));
        r.push((1..=4).map(|s| batch(s, 10)).collect());
        let (got, cursor) = r.take_after(0, 25);
        assert_eq!(got.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(cursor.is_some());
        // A forwarder that restarted after 1 finds 2 gone: it must read the file.
        assert!(r.take_after(1, 100).0.is_empty());
        assert_eq!(r.take_after(3, 100).0[0].seq, 4);
        // Over the disk's bound, the oldest go first.
        r.push(vec![batch(5, PER_DISK_MAX), batch(6, 10)]);
        assert_eq!(r.take_after(4, usize::MAX).0.len(), 0);
        assert_eq!(r.take_after(5, usize::MAX).0[0].seq, 6);
    }

    #[test]
    fn a_forwarder_behind_what_is_kept_gives_the_memory_back() {
        let budget = Budget::new(usize::MAX);
        let mut r = Recent::new(budget.clone());
        r.push((10..=30).map(|s| batch(s, 4 * MIB)).collect());
        assert_eq!(r.bytes(), 84 * MIB);
        // The forwarder is at 5: 6 to 9 are only in the file.
        assert!(r.take_after(5, usize::MAX).0.is_empty());
        assert_eq!(r.bytes(), PER_DISK_FLOOR);
        assert_eq!(budget.used(), PER_DISK_FLOOR);
        // The newest are the ones kept.
        assert_eq!(r.take_after(22, usize::MAX).0[0].seq, 23);
    }

    #[test]
    fn disks_share_the_budget_down_to_their_floor() {
        let budget = Budget::new(100 * MIB);
        let mut a = Recent::new(budget.clone());
        let mut b = Recent::new(budget.clone());
        a.push((1..=20).map(|s| batch(s, 4 * MIB)).collect());
        assert_eq!(a.bytes(), 80 * MIB, "under the budget everything is kept");
        b.push((1..=20).map(|s| batch(s, 4 * MIB)).collect());
        // b went over the budget and dropped its own oldest, but never below its floor.
        assert_eq!(b.bytes(), PER_DISK_FLOOR);
        assert_eq!(budget.used(), 80 * MIB + PER_DISK_FLOOR);
        // What a holds still comes out in order; taking it frees the budget.
        assert_eq!(a.take_after(0, usize::MAX).0.len(), 20);
        assert_eq!(budget.used(), PER_DISK_FLOOR);
        drop(b);
        assert_eq!(budget.used(), 0, "a disk that leaves gives its share back");
        assert_eq!(a.bytes(), 0);
    }

    #[test]
    fn held_batches_stay_until_applied_and_outside_the_budget() {
        let budget = Budget::new(MIB);
        let mut r = Recent::new(budget.clone());
        r.push((1..=2).map(|s| batch(s, 10)).collect());
        r.hold((3..=40).map(|s| batch(s, 4 * MIB).0).collect());
        assert_eq!(r.held_bytes(), 38 * 4 * MIB, "never dropped for memory");
        assert_eq!(budget.used(), 20, "nor counted in the shared budget");
        let seqs = |v: Vec<ChangeBatch>| v.iter().map(|b| b.seq).collect::<Vec<_>>();
        // Stored batches first, then the held ones, in order.
        assert_eq!(seqs(r.take_after(0, usize::MAX).0), vec![1, 2]);
        let (got, cursor) = r.take_after(2, 8 * MIB);
        assert_eq!(seqs(got), vec![3, 4]);
        assert!(cursor.is_none(), "held batches are not in the file");
        // A forwarding session that failed after sending 3 to 10 starts over from memory.
        assert_eq!(seqs(r.take_after(10, 4 * MIB).0), vec![11]);
        assert_eq!(seqs(r.take_after(2, 4 * MIB).0), vec![3]);
        r.release_held(39);
        assert_eq!(r.held_bytes(), 4 * MIB);
        assert_eq!(seqs(r.take_after(39, usize::MAX).0), vec![40]);
        assert!(r.take_after(40, usize::MAX).0.is_empty());
        r.hold((41..=43).map(|s| batch(s, 10).0).collect());
        assert_eq!(seqs(r.held_after(41)), vec![42, 43]);
        assert_eq!(
            r.held_bytes(),
            4 * MIB + 30,
            "copies: still held until cached"
        );
        r.clear_held();
        assert_eq!(r.held_bytes(), 0);
        assert!(r.take_after(40, usize::MAX).0.is_empty());
    }
}
