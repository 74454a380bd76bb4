//! One protected disk on the agent: its capture (see `capture`), where it stands (phase,
//! reports, the persisted initial-sync state) and the route its batches take (assignment);
//! the shipper that moves its batches is `ship`.
use crate::capture::{now_ms, Capture};
use crate::dirty::DirtyMap;
use crate::progress::{Phase, Progress};
use crate::settings::{CaptureMode, Tuning};
use lifeboat_common::component::EarlyReports;
use lifeboat_common::{fsutil, Identity};
use lifeboat_proto::v1::{DiskAssignment, DiskReport};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Initial sync reads this much at a time, and pauses while this much is queued.
pub(crate) const SYNC_CHUNK: u64 = 1024 * 1024;
pub(crate) const SYNC_QUEUE_LIMIT: u64 = 32 * 1024 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
struct DiskState {
    initial_sync_done: bool,
}

/// What starting a disk's capture needs.
pub struct DiskStart {
    pub identity: Arc<Identity>,
    pub assignment: DiskAssignment,
    pub state_dir: PathBuf,
    pub tuning: Tuning,
    pub mode: CaptureMode,
    pub stop: CancellationToken,
    pub early_reports: Arc<EarlyReports>,
}

pub struct DiskAgent {
    pub disk_id: String,
    pub assignment: RwLock<DiskAssignment>,
    pub capture: Arc<Capture>,
    pub progress: Mutex<Progress>,
    state_dir: PathBuf,
    pub(crate) identity: Arc<Identity>,
    pub stop: CancellationToken,
    pub tuning: Tuning,
    pub mode: CaptureMode,
    pub(crate) sync_started: AtomicBool,
    /// A resync task is running (at most one per disk).
    pub resync_running: AtomicBool,
    /// The process server's cache fill (percent of its quota) as last reported.
    pub cache_fill_percent: AtomicU32,
    /// Scan mode: start time (Unix ms) of the newest scan wholly applied on the master target
    /// (0: none yet); the disk's RPO is its age.
    pub scan_point_ms: AtomicI64,
    started_ms: i64,
    pub(crate) early_reports: Arc<EarlyReports>,
    /// Counts changes of where batches go (process server, its address, a switch draining
    /// it); `rerouted` wakes the shipper on each, so its stream follows at once.
    pub(crate) route: AtomicU64,
    pub(crate) rerouted: Notify,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

impl DiskAgent {
    /// Opens the source and the dirty map, decides where replication stands, and starts
    /// shipping.
    pub fn start(start: DiskStart) -> anyhow::Result<Arc<DiskAgent>> {
        let DiskStart {
            identity,
            assignment,
            state_dir,
            tuning,
            mode,
            stop,
            early_reports,
        } = start;
        fsutil::create_private_dir(&state_dir)?;
        let source = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&assignment.source_path)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open disk {} ({}): {e}",
                    assignment.disk_name,
                    assignment.source_path
                )
            })?;
        let size = assignment.size_bytes;
        let mut dirty = DirtyMap::open(&state_dir.join("dirty.map"), size)?;
        let state: DiskState = std::fs::read(state_path(&state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let marker = state_dir.join(crate::resync::RESYNC_ALL_MARKER);
        let full = state.initial_sync_done && marker.exists();
        if full {
            // The operator says the disk changed behind the agent's back: compare all of it.
            dirty.mark_all()?;
        }
        if marker.exists() {
            std::fs::remove_file(&marker)?;
        }
        let phase = if !state.initial_sync_done {
            Phase::InitialSync
        } else if full {
            Phase::ResyncRequired("a full resync was requested (mark-for-resync)".into())
        } else if dirty.any_dirty() {
            Phase::ResyncRequired("the agent stopped with writes not confirmed shipped".into())
        } else {
            Phase::Streaming
        };
        let capture = Capture::new(
            source,
            size,
            dirty,
            tuning.limits,
            state_dir.join("capture.spill"),
        );
        if let Phase::ResyncRequired(why) = &phase {
            tracing::warn!(disk = %assignment.disk_id, "{why}: tracking changes in the dirty map until a resync");
            if let Ok(mut q) = capture.queue.lock() {
                q.overflowed = true;
            }
        }
        let agent = Arc::new(DiskAgent {
            disk_id: assignment.disk_id.clone(),
            assignment: RwLock::new(assignment),
            capture,
            progress: Mutex::new(Progress::new(phase)),
            state_dir,
            identity,
            stop,
            tuning,
            mode,
            sync_started: AtomicBool::new(false),
            resync_running: AtomicBool::new(false),
            cache_fill_percent: AtomicU32::new(0),
            scan_point_ms: AtomicI64::new(0),
            started_ms: now_ms(),
            early_reports,
            route: AtomicU64::new(0),
            rerouted: Notify::new(),
        });
        crate::background::spawn(crate::ship::ship(agent.clone()));
        if mode == CaptureMode::Scan {
            crate::background::spawn(crate::scan::run(agent.clone()));
        }
        Ok(agent)
    }

    pub fn assignment(&self) -> DiskAssignment {
        self.assignment
            .read()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Takes a new assignment; the shipper reconnects if the batches' route changed.
    pub fn set_assignment(&self, new: DiskAssignment) {
        let Ok(mut a) = self.assignment.write() else {
            return;
        };
        let rerouted = a.process_server_id != new.process_server_id
            || a.process_server_address != new.process_server_address
            || a.draining != new.draining;
        *a = new;
        drop(a);
        if rerouted {
            self.route.fetch_add(1, Ordering::SeqCst);
            self.rerouted.notify_waiters();
        }
    }

    /// Moves to ResyncRequired if the capture queue gave up on the stream. Called by the
    /// shipper and by every report, since the shipper may be blocked sending to a process
    /// server that holds its stream.
    pub(crate) fn note_overflow(&self) {
        if !self.capture.overflowed() {
            return;
        }
        let phase = match self.progress.lock() {
            Ok(p) => p.phase.clone(),
            Err(_) => return,
        };
        match phase {
            Phase::ResyncRequired(_) => {}
            Phase::InitialSync => self.interrupt_initial_sync(
                "the initial sync was interrupted: replication could not keep up with the writes",
            ),
            _ => self.set_phase(Phase::ResyncRequired(
                "replication could not keep up with the writes (process server slow, full or unreachable)".into(),
            )),
        }
    }

    /// The initial sync cannot go on as a copy (its reads were dropped, or failed): the whole
    /// disk is compared with the replica instead, which ships only what the replica lacks.
    pub(crate) fn interrupt_initial_sync(&self, why: &str) {
        if let Ok(mut q) = self.capture.queue.lock() {
            if let Err(e) = q.dirty.mark_all() {
                tracing::error!(disk = %self.disk_id, "cannot mark the disk for a resync: {e}");
            }
        }
        if let Err(e) = self.capture.break_stream() {
            tracing::error!(disk = %self.disk_id, "{e}");
        }
        if let Ok(mut p) = self.progress.lock() {
            p.sync_last_index = None;
        }
        self.set_phase(Phase::ResyncRequired(why.into()));
    }

    pub fn report(&self) -> Option<DiskReport> {
        self.note_overflow();
        let oldest = self.capture.oldest_queued_ms();
        let queued = self.capture.queued_bytes();
        let now = now_ms();
        let phase = self.progress.lock().ok()?.phase.clone();
        let (since, dirty) = match phase {
            Phase::ResyncRequired(_) | Phase::Resyncing => {
                let q = self.capture.queue.lock().ok()?;
                let since = q
                    .dirty
                    .oldest_dirty_secs((now / 1000) as u32)
                    .map(|s| s as i64 * 1000);
                let dirty = if phase == Phase::Resyncing {
                    None
                } else {
                    Some(
                        q.dirty
                            .dirty_ranges(self.capture.size)
                            .iter()
                            .map(|(a, b)| b - a)
                            .sum::<u64>(),
                    )
                };
                (since, dirty)
            }
            _ => (None, Some(0)),
        };
        let mut p = self.progress.lock().ok()?;
        let dirty = dirty.unwrap_or(p.sync_total.saturating_sub(p.sync_done));
        let mut report = p.report(&self.disk_id, now, oldest, queued, since, dirty);
        report.change_bytes_per_sec = p.change.sample(self.capture.changed_bytes());
        report.scan = self.mode == CaptureMode::Scan;
        if report.scan {
            // Changes since the newest applied scan are not captured anywhere yet.
            let point = match self.scan_point_ms.load(Ordering::Relaxed) {
                0 => self.started_ms,
                t => t,
            };
            report.rpo_secs = report.rpo_secs.max((now - point).max(0) as f64 / 1000.0);
        }
        Some(report)
    }

    pub fn set_phase(&self, phase: Phase) {
        if let Ok(mut p) = self.progress.lock() {
            if p.phase != phase {
                tracing::info!(disk = %self.disk_id, "replication phase: {}", phase.name());
                p.phase = phase;
                self.early_reports.now.notify_one();
            }
        }
    }
}

/// Whether every captured item up to capture index `last` is applied on the master target.
pub(crate) fn applied_through(agent: &DiskAgent, last: u64) -> anyhow::Result<bool> {
    // The shipper takes items from the queue while holding the progress lock, so looking at
    // both under it sees each item in exactly one place.
    let p = agent
        .progress
        .lock()
        .map_err(|_| anyhow::anyhow!("progress poisoned"))?;
    Ok(p.in_flight.front().is_none_or(|f| f.first_index > last)
        && agent
            .capture
            .queue
            .lock()
            .map(|q| q.items.front().is_none_or(|i| i.index > last))
            .unwrap_or(false))
}

/// An initial sync or a resync is complete when everything up to its last read is applied.
pub(crate) fn check_sync_complete(agent: &DiskAgent) -> anyhow::Result<()> {
    let (phase, last) = {
        let p = agent
            .progress
            .lock()
            .map_err(|_| anyhow::anyhow!("progress poisoned"))?;
        let Some(last) = p.sync_last_index else {
            return Ok(());
        };
        (p.phase.clone(), last)
    };
    // Dropped reads (an overflow) mean the pass did not cover what it read.
    if !matches!(phase, Phase::InitialSync | Phase::Resyncing) || agent.capture.overflowed() {
        return Ok(());
    }
    let done = applied_through(agent, last)?;
    if !done {
        return Ok(());
    }
    if phase == Phase::Resyncing {
        // Everything the resync read is applied: the regions it settled are clean unless
        // written since (their newer writes are in the stream).
        let mut q = agent
            .capture
            .queue
            .lock()
            .map_err(|_| anyhow::anyhow!("capture poisoned"))?;
        q.dirty.clear_through(last);
        q.dirty.write_back()?;
        tracing::info!(disk = %agent.disk_id, "resync complete: the replica matches the source");
    }
    // A resync may stand in for an interrupted initial sync: either way the replica is whole.
    let bytes = serde_json::to_vec(&DiskState {
        initial_sync_done: true,
    })?;
    fsutil::durable_write(&state_path(&agent.state_dir), &bytes, 0o600)?;
    if let Ok(mut p) = agent.progress.lock() {
        p.sync_last_index = None;
    }
    agent.set_phase(Phase::Streaming);
    Ok(())
}
