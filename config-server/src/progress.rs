//! Replication progress: soft state. Agents, process servers and master targets report each
//! disk's progress with their heartbeats; the leader keeps the latest report per (disk, role)
//! in memory. Status, RPO and state transitions are derived from it (see `reconcile`); only
//! transitions and job progress go into Raft.
//!
//! An agent that cannot capture a disk (its source moved or changed size) reports it with
//! phase [`CANNOT_CAPTURE_PHASE`] and the reason: that is kept apart (see `capture_errors`), so the
//! disk's last real report goes on ageing and its RPO keeps growing.
use lifeboat_common::facts::CANNOT_CAPTURE_PHASE;
use lifeboat_common::Role;
use lifeboat_proto::v1::DiskReport;
use std::collections::HashMap;
use std::sync::Mutex;

/// A report, when it arrived and from which component (during a process-server switch two
/// of them may report the same disk).
#[derive(Debug, Clone)]
pub struct Received {
    pub at_ms: i64,
    pub from: String,
    pub report: DiskReport,
}

#[derive(Debug, Default)]
pub struct Progress {
    inner: Mutex<HashMap<(String, Role), Received>>,
    /// Counts the reports recorded: long polls of status wait on it (see `status_wait`).
    changes: tokio::sync::watch::Sender<u64>,
    /// Notified when a disk's reported phase changed: the reconciler turns it into a state
    /// transition at once rather than on its next tick.
    pub phase_changed: tokio::sync::Notify,
    /// Per switch job: the most its draining process server held for the machine, as this
    /// leader saw it (the base of the drain step's percentage; see `switching`).
    pub drain_base: Mutex<HashMap<String, u64>>,
    /// Per disk: why its agent cannot capture it, as last said (cleared by the agent's next
    /// real report of the disk).
    capture_errors: Mutex<HashMap<String, Received>>,
}

impl Progress {
    pub fn record(&self, role: Role, from: &str, at_ms: i64, reports: Vec<DiskReport>) {
        let Ok(mut map) = self.inner.lock() else {
            return;
        };
        let mut changed = false;
        let mut errors = self.capture_errors.lock().ok();
        for report in reports {
            if role == Role::Agent {
                if let Some(errors) = errors.as_mut() {
                    if report.phase == CANNOT_CAPTURE_PHASE {
                        let received = Received {
                            at_ms,
                            from: from.to_string(),
                            report,
                        };
                        errors.insert(received.report.disk_id.clone(), received);
                        continue;
                    }
                    errors.remove(&report.disk_id);
                }
            }
            let key = (report.disk_id.clone(), role);
            changed |= map
                .get(&key)
                .is_none_or(|old| old.report.phase != report.phase);
            map.insert(
                key,
                Received {
                    at_ms,
                    from: from.to_string(),
                    report,
                },
            );
        }
        drop(map);
        drop(errors);
        self.changes.send_modify(|n| *n += 1);
        if changed {
            self.phase_changed.notify_one();
        }
    }

    /// The number of reports recorded so far, changing with each.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The number of reports recorded so far.
    pub fn change_count(&self) -> u64 {
        *self.changes.borrow()
    }

    pub fn get(&self, disk_id: &str, role: Role) -> Option<Received> {
        let map = self.inner.lock().ok()?;
        map.get(&(disk_id.to_string(), role)).cloned()
    }

    /// Drops reports of disks no longer protected.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut map) = self.inner.lock() {
            map.retain(|(disk, _), _| keep(disk));
        }
        if let Ok(mut errors) = self.capture_errors.lock() {
            errors.retain(|disk, _| keep(disk));
        }
    }

    /// Why the disk's agent cannot capture it, as it last said, with when and who said it.
    pub fn capture_error(&self, disk_id: &str) -> Option<Received> {
        self.capture_errors.lock().ok()?.get(disk_id).cloned()
    }

    /// Disks a component of `role` reported at or after `since_ms`.
    pub fn reported_by(&self, role: Role, since_ms: i64) -> Vec<String> {
        let Ok(map) = self.inner.lock() else {
            return Vec::new();
        };
        map.iter()
            .filter(|((_, r), rec)| *r == role && rec.at_ms >= since_ms)
            .map(|((d, _), _)| d.clone())
            .collect()
    }
}

/// Why a disk's replication does not move, as the component that is stuck said.
#[derive(Debug, Clone, PartialEq)]
pub enum Stall {
    /// The agent cannot capture the disk.
    Capture(String),
    /// The process server cannot forward the disk's batches to its master target.
    Forward(String),
}

impl Stall {
    /// The reason, as `status` shows it after "replication waits: ".
    pub fn reason(&self) -> String {
        match self {
            Stall::Capture(why) => format!("the agent cannot capture the disk: {why}"),
            Stall::Forward(why) => why.clone(),
        }
    }

    /// The alert's message.
    pub fn alert_message(&self) -> String {
        match self {
            Stall::Capture(_) => format!(
                "replication waits: {}; nothing is captured or replicated meanwhile",
                self.reason()
            ),
            Stall::Forward(_) => format!(
                "replication waits: {}; the batches stay in the process server's cache meanwhile",
                self.reason()
            ),
        }
    }
}

/// What an operator sees about a disk's lag, derived from the agent's last report.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    pub rpo_secs: f64,
    pub pending_bytes: u64,
    pub sync_progress_pct: f64,
    /// -1 when unknown.
    pub eta_secs: i64,
    pub last_report_ms: i64,
}

/// Derives the lag of a disk at `now_ms`. A report that found the disk caught up is taken as
/// it is while fresh (the agent reports within a second when a backlog starts). One that found
/// it behind is aged: the write it found oldest, if still unapplied, is older by the report's
/// age, and any other is younger, so the RPO shown is never less than the true one (the
/// catch-up report follows within a second of the catch-up). A stale report means the agent
/// cannot tell us, so the RPO keeps growing from what it last said; a disk never reported
/// has been unprotected since `protected_at_ms`.
pub fn lag(agent: Option<&Received>, now_ms: i64, fresh_ms: i64, protected_at_ms: i64) -> Lag {
    let Some(received) = agent else {
        return Lag {
            rpo_secs: ((now_ms - protected_at_ms).max(0)) as f64 / 1000.0,
            pending_bytes: 0,
            sync_progress_pct: 0.0,
            eta_secs: -1,
            last_report_ms: 0,
        };
    };
    let r = &received.report;
    let age = (now_ms - received.at_ms).max(0);
    let behind = r.pending_bytes > 0 || r.rpo_secs > 0.0;
    let rpo_secs = if age <= fresh_ms && !behind {
        r.rpo_secs
    } else {
        r.rpo_secs + age as f64 / 1000.0
    };
    let syncing = r.phase == "initial_sync" || r.phase == "resync";
    let unread = r.sync_total_bytes.saturating_sub(r.sync_done_bytes);
    let unapplied = unapplied_bytes(r);
    let sync_progress_pct = if r.phase == "streaming" {
        // The sync is over: the session's sync figures less today's backlog would read as a
        // sync going backwards during a burst.
        100.0
    } else if r.sync_total_bytes == 0 {
        if syncing {
            0.0
        } else {
            100.0
        }
    } else {
        (synced_bytes(r) as f64 * 100.0 / r.sync_total_bytes as f64).min(100.0)
    };
    let remaining = if syncing {
        unread + unapplied
    } else {
        r.pending_bytes
    };
    // Reading: what is left at the sync rate; read to the end (or streaming): the backlog
    // at the rate the master target has recently been applying.
    let rate = if syncing && unread > 0 {
        r.sync_bytes_per_sec
    } else {
        r.drain_bytes_per_sec
    };
    let eta_secs = if remaining == 0 {
        0
    } else if rate > 0.0 {
        (remaining as f64 / rate).ceil() as i64
    } else {
        -1
    };
    Lag {
        rpo_secs,
        pending_bytes: r.pending_bytes,
        sync_progress_pct,
        eta_secs,
        last_report_ms: received.at_ms,
    }
}

/// What an agent shipped and the master target has not applied yet. Its pending bytes are
/// that; during a resync they also hold what it has not read yet.
fn unapplied_bytes(r: &DiskReport) -> u64 {
    if r.phase == "resync" {
        let unread = r.sync_total_bytes.saturating_sub(r.sync_done_bytes);
        r.pending_bytes.saturating_sub(unread)
    } else {
        r.pending_bytes
    }
}

/// How far a sync (initial or resync) has come: as far as the master target has applied,
/// not as far as the agent has read (a master target out of space, say, leaves a sync read
/// to the end but applied nowhere near it). Status's percentage and the protect job's count
/// this.
pub fn synced_bytes(r: &DiskReport) -> u64 {
    r.sync_done_bytes.saturating_sub(unapplied_bytes(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(phase: &str, rpo: f64, done: u64, total: u64, rate: f64) -> Received {
        Received {
            at_ms: 10_000,
            from: "agent".into(),
            report: DiskReport {
                disk_id: "d".into(),
                phase: phase.into(),
                rpo_secs: rpo,
                sync_done_bytes: done,
                sync_total_bytes: total,
                sync_bytes_per_sec: rate,
                ..Default::default()
            },
        }
    }

    #[test]
    fn fresh_reports_are_taken_as_they_are_when_caught_up_and_aged_when_behind() {
        let caught_up = lag(
            Some(&report("streaming", 0.0, 0, 0, 0.0)),
            11_000,
            15_000,
            0,
        );
        assert_eq!(caught_up.rpo_secs, 0.0);
        let l = lag(
            Some(&report("initial_sync", 3.0, 25, 100, 5.0)),
            11_000,
            15_000,
            0,
        );
        // Its oldest write, if still unapplied, is a second older now.
        assert_eq!(l.rpo_secs, 4.0);
        assert_eq!(l.sync_progress_pct, 25.0);
        assert_eq!(l.eta_secs, 15);
        // Pending writes captured the very moment the report was made: behind all the same.
        let mut just_captured = report("streaming", 0.0, 0, 0, 0.0);
        just_captured.report.pending_bytes = 1 << 20;
        let l = lag(Some(&just_captured), 12_500, 15_000, 0);
        assert_eq!(l.rpo_secs, 2.5);
    }

    #[test]
    fn a_sync_counts_what_is_applied_not_what_is_read() {
        // Read to the end, 40 of 100 bytes shipped but not applied, nothing draining.
        let mut r = report("initial_sync", 9.0, 100, 100, 5.0);
        r.report.pending_bytes = 40;
        let l = lag(Some(&r), 10_000, 15_000, 0);
        assert_eq!(l.sync_progress_pct, 60.0);
        assert_eq!(l.eta_secs, -1);
        r.report.drain_bytes_per_sec = 10.0;
        assert_eq!(lag(Some(&r), 10_000, 15_000, 0).eta_secs, 4);
        // Still reading: 30 read, 10 of them not applied.
        let mut r = report("initial_sync", 9.0, 30, 100, 5.0);
        r.report.pending_bytes = 10;
        let l = lag(Some(&r), 10_000, 15_000, 0);
        assert_eq!(l.sync_progress_pct, 20.0);
        assert_eq!(l.eta_secs, 16);
        // A resync's pending bytes hold its unread part too.
        r.report.phase = "resync".into();
        r.report.pending_bytes = 70 + 10;
        let l = lag(Some(&r), 10_000, 15_000, 0);
        assert_eq!(l.sync_progress_pct, 20.0);
        assert_eq!(l.eta_secs, 16);
        // Streaming, the sync is over: a burst's backlog does not take it back.
        let mut r = report("streaming", 0.5, 100, 100, 0.0);
        r.report.pending_bytes = 53;
        assert_eq!(lag(Some(&r), 10_000, 15_000, 0).sync_progress_pct, 100.0);
    }

    #[test]
    fn silence_makes_the_rpo_grow() {
        let l = lag(
            Some(&report("streaming", 1.0, 0, 0, 0.0)),
            70_000,
            15_000,
            0,
        );
        assert_eq!(l.rpo_secs, 61.0);
        assert_eq!(l.sync_progress_pct, 100.0);
    }

    #[test]
    fn never_reported_disks_are_behind_since_protection() {
        let l = lag(None, 50_000, 15_000, 20_000);
        assert_eq!(l.rpo_secs, 30.0);
        assert_eq!(l.eta_secs, -1);
    }

    #[test]
    fn every_recorded_report_counts_as_a_change() {
        let progress = Progress::default();
        let changes = progress.changes();
        assert_eq!(*changes.borrow(), 0);
        let r = report("streaming", 0.0, 0, 0, 0.0).report;
        progress.record(Role::Agent, "agent", 1, vec![r.clone()]);
        // The same report again: nothing a status shows but its time changed; still a change.
        progress.record(Role::Agent, "agent", 2, vec![r]);
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow(), 2);
    }

    #[test]
    fn a_disk_the_agent_cannot_capture_keeps_its_last_report_ageing() {
        let progress = Progress::default();
        let mut r = report("streaming", 0.0, 0, 0, 0.0).report;
        r.disk_id = "d-1".into();
        progress.record(Role::Agent, "agent", 1_000, vec![r.clone()]);
        let refused = DiskReport {
            disk_id: "d-1".into(),
            phase: CANNOT_CAPTURE_PHASE.into(),
            error: "disk disk0 is protected from /a".into(),
            ..Default::default()
        };
        progress.record(Role::Agent, "agent", 60_000, vec![refused]);
        // The error is kept apart; the report it came with does not count as news.
        let error = progress.capture_error("d-1").unwrap();
        assert_eq!(error.report.error, "disk disk0 is protected from /a");
        assert_eq!(error.at_ms, 60_000);
        let last = progress.get("d-1", Role::Agent).unwrap();
        assert_eq!(
            (last.at_ms, last.report.phase.as_str()),
            (1_000, "streaming")
        );
        assert_eq!(lag(Some(&last), 60_000, 15_000, 0).rpo_secs, 59.0);
        // Capturing again clears it.
        progress.record(Role::Agent, "agent", 61_000, vec![r]);
        assert!(progress.capture_error("d-1").is_none());
    }
}
