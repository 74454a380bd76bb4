//! Where one disk's replication stands, as the agent knows it: phase, sequence numbers at each
//! hop, initial-sync progress, and the batches still in flight — from which the RPO (age of
//! the oldest captured write not yet applied on the master target) and the backlog follow.
use lifeboat_common::rate::Rate;
use lifeboat_proto::v1::{ChangeBatch, DiskReport};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    InitialSync,
    Streaming,
    ResyncRequired(String),
    /// Comparing dirty regions with the replica and shipping what differs.
    Resyncing,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::InitialSync => "initial_sync",
            Phase::Streaming => "streaming",
            Phase::ResyncRequired(_) => "resync_required",
            Phase::Resyncing => "resync",
        }
    }

    /// The stream alone does not describe the replica: dirty regions must be compared.
    pub fn needs_resync(&self) -> bool {
        matches!(self, Phase::ResyncRequired(_) | Phase::Resyncing)
    }
}

/// A batch sent but not yet applied on the master target.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub seq: u64,
    pub first_write_ms: i64,
    pub bytes: u64,
    pub first_index: u64,
    /// Capture index of the batch's last item (for clearing the dirty map once durable).
    pub last_index: u64,
}

/// Window of the change rate the agent reports: long enough that a burst does not make a
/// machine look busy to the load balancer, short enough to follow a workload that changed.
pub const CHANGE_RATE_WINDOW: Duration = Duration::from_secs(300);
/// With bytes pending and nothing applied for this long, the drain rate reported is 0: a
/// master target applies a group in well under a second, so 5 s without one is a stop, not a
/// slow patch.
const DRAIN_STOPPED: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Progress {
    pub phase: Phase,
    /// Next sequence number to assign (known after the first Resume).
    pub next_seq: u64,
    pub durable_seq: u64,
    pub applied_seq: u64,
    /// Batches not yet durable at the process server, kept to send again after a reconnect.
    pub unacked: VecDeque<ChangeBatch>,
    pub in_flight: VecDeque<InFlight>,
    pub sync_total: u64,
    pub sync_done: u64,
    pub sync_started: Option<Instant>,
    /// Capture index of the last initial-sync read, once the scan has finished: the initial
    /// sync is complete when everything up to it is applied.
    pub sync_last_index: Option<u64>,
    /// Payload bytes applied on the master target since start, and their recent rate.
    pub applied_bytes: u64,
    drain: Rate,
    /// Changes captured per second (`Capture::changed_bytes`), reported for load balancing.
    pub change: Rate,
}

impl Progress {
    pub fn new(phase: Phase) -> Progress {
        Progress {
            phase,
            next_seq: 0,
            durable_seq: 0,
            applied_seq: 0,
            unacked: VecDeque::new(),
            in_flight: VecDeque::new(),
            sync_total: 0,
            sync_done: 0,
            sync_started: None,
            sync_last_index: None,
            applied_bytes: 0,
            drain: Rate::while_busy(Duration::from_secs(15)),
            change: Rate::new(CHANGE_RATE_WINDOW),
        }
    }

    /// Records the process server's durable position: the batches up to it need not be kept
    /// for resending.
    pub fn durable(&mut self, seq: u64) {
        self.durable_seq = self.durable_seq.max(seq);
        while self
            .unacked
            .front()
            .is_some_and(|b| b.seq <= self.durable_seq)
        {
            self.unacked.pop_front();
        }
    }

    /// Records what the master target applied; returns the capture index up to which every
    /// write is on the replica (the dirty map may let those regions go), if it advanced. The
    /// map keeps a region until then, not only until the process server holds its writes, so
    /// a process server that loses its cache (it died, and the machine moved to another with
    /// `--force`) costs a resync of those regions only.
    pub fn applied(&mut self, seq: u64) -> Option<u64> {
        self.applied_seq = self.applied_seq.max(seq);
        let mut clear = None;
        while self
            .in_flight
            .front()
            .is_some_and(|f| f.seq <= self.applied_seq)
        {
            if let Some(f) = self.in_flight.pop_front() {
                self.applied_bytes += f.bytes;
                clear = Some(f.last_index);
            }
        }
        clear
    }

    /// Age in seconds of the oldest write captured but not applied; `oldest_queued_ms` is the
    /// capture queue's oldest item (not yet in a batch).
    pub fn rpo_secs(&self, now_ms: i64, oldest_queued_ms: Option<i64>) -> f64 {
        let oldest = self
            .in_flight
            .iter()
            .map(|f| f.first_write_ms)
            .chain(oldest_queued_ms)
            .min();
        match oldest {
            Some(t) => ((now_ms - t).max(0)) as f64 / 1000.0,
            None => 0.0,
        }
    }

    /// `oldest_queued_ms`: capture time of the capture queue's oldest item; `dirty_since_ms`:
    /// while a resync is pending, when the longest-dirty region went dirty (its writes may not
    /// have reached the replica); `dirty_bytes`: bytes of dirty regions a resync still has to
    /// compare (counted as pending).
    pub fn report(
        &mut self,
        disk_id: &str,
        now_ms: i64,
        oldest_queued_ms: Option<i64>,
        queued_bytes: u64,
        dirty_since_ms: Option<i64>,
        dirty_bytes: u64,
    ) -> DiskReport {
        let pending: u64 = self.in_flight.iter().map(|f| f.bytes).sum::<u64>() + queued_bytes;
        let syncing = matches!(self.phase, Phase::InitialSync | Phase::Resyncing);
        let rate = match self.sync_started {
            Some(t) if syncing && t.elapsed().as_secs_f64() > 0.5 => {
                self.sync_done as f64 / t.elapsed().as_secs_f64()
            }
            _ => 0.0,
        };
        let mut rpo = self.rpo_secs(now_ms, oldest_queued_ms);
        if let (true, Some(since)) = (self.phase.needs_resync(), dirty_since_ms) {
            rpo = rpo.max((now_ms - since).max(0) as f64 / 1000.0);
        }
        let pending = pending + dirty_bytes;
        let mut drain = self.drain.sample(self.applied_bytes);
        if pending > 0 && self.drain.unchanged_for() >= DRAIN_STOPPED {
            // Nothing applied for a while with work waiting: the master target (or the way
            // to it) is not draining now, whatever the window's average says. Reported as 0,
            // so the ETA says unknown instead of counting up for the rest of the window.
            drain = 0.0;
        }
        DiskReport {
            disk_id: disk_id.to_string(),
            phase: self.phase.name().into(),
            seq: self.next_seq.saturating_sub(1),
            durable_seq: self.durable_seq,
            applied_seq: self.applied_seq,
            pending_bytes: pending,
            rpo_secs: rpo,
            drain_bytes_per_sec: drain,
            sync_total_bytes: self.sync_total,
            sync_done_bytes: self.sync_done,
            sync_bytes_per_sec: rate,
            stored_bytes: 0,
            error: match &self.phase {
                Phase::ResyncRequired(why) => why.clone(),
                _ => String::new(),
            },
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpo_is_the_age_of_the_oldest_unapplied_write() {
        let mut p = Progress::new(Phase::Streaming);
        assert_eq!(p.rpo_secs(10_000, None), 0.0);
        p.in_flight.push_back(InFlight {
            seq: 1,
            first_write_ms: 4_000,
            bytes: 10,
            first_index: 1,
            last_index: 3,
        });
        p.in_flight.push_back(InFlight {
            seq: 2,
            first_write_ms: 7_000,
            bytes: 10,
            first_index: 4,
            last_index: 5,
        });
        assert_eq!(p.rpo_secs(10_000, Some(9_000)), 6.0);
        p.applied(1);
        assert_eq!(p.rpo_secs(10_000, Some(9_000)), 3.0);
        p.applied(2);
        assert_eq!(p.rpo_secs(10_000, Some(9_000)), 1.0);
        assert_eq!(p.rpo_secs(10_000, None), 0.0);
    }

    #[test]
    fn durable_acks_release_resend_copies_and_applied_ones_name_the_clearable_index() {
        let mut p = Progress::new(Phase::Streaming);
        for seq in 1..=3 {
            p.unacked.push_back(ChangeBatch {
                seq,
                ..Default::default()
            });
            p.in_flight.push_back(InFlight {
                seq,
                first_write_ms: 0,
                bytes: 1,
                first_index: seq * 10 - 9,
                last_index: seq * 10,
            });
        }
        p.durable(2);
        assert_eq!(p.unacked.len(), 1);
        // Durable at the process server is not enough for the dirty map.
        assert_eq!(p.applied(1), Some(10));
        assert_eq!(p.applied(1), None);
        assert_eq!(p.applied(3), Some(30));
        assert!(p.in_flight.is_empty());
    }
}
