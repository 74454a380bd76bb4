//! One protected disk on the agent: its capture (see `capture`), the initial sync that copies
//! the allocated data once, and the shipper that turns captured items into sealed change
//! batches, pushes them to the process server, keeps them until they are durable there,
//! resends them after a reconnect, and follows what the master target has applied.
use crate::capture::{now_ms, Capture, Captured};
use crate::dirty::DirtyMap;
use crate::progress::{InFlight, Phase, Progress};
use crate::settings::{CaptureMode, Tuning};
use lifeboat_common::batch::{self, KIND_STREAM, KIND_SYNC};
use lifeboat_common::component::EarlyReports;
use lifeboat_common::{fsutil, tls, Identity, Role};
use lifeboat_proto::batch_stream;
use lifeboat_proto::v1::{
    ingest_client::IngestClient, ChangeBatch, DiskAssignment, DiskReport, Extent, IngestAck,
    ResumeRequest, ResumeResponse,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Largest batch the agent builds (payload bytes) and most extents in it.
const BATCH_BYTES: u64 = 4 * 1024 * 1024;
const BATCH_EXTENTS: usize = 1024;
/// Payload bytes sent but not yet durable at the process server before the agent waits.
const WINDOW_BYTES: u64 = 64 * 1024 * 1024;
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
    sync_started: AtomicBool,
    /// A resync task is running (at most one per disk).
    pub resync_running: AtomicBool,
    /// The process server's cache fill (percent of its quota) as last reported.
    pub cache_fill_percent: AtomicU32,
    /// Scan mode: start time (Unix ms) of the newest scan wholly applied on the master target
    /// (0: none yet); the disk's RPO is its age.
    pub scan_point_ms: AtomicI64,
    started_ms: i64,
    early_reports: Arc<EarlyReports>,
    /// Counts changes of where batches go (process server, its address, a switch draining
    /// it); `rerouted` wakes the shipper on each, so its stream follows at once.
    route: AtomicU64,
    rerouted: Notify,
}

/// The shipper's stream ended because the disk's batches go elsewhere now (or nowhere while
/// its process server drains for a switch).
#[derive(Debug)]
struct Rerouted;

impl std::fmt::Display for Rerouted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the disk's process server changed")
    }
}

impl std::error::Error for Rerouted {}

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
        crate::background::spawn(ship(agent.clone()));
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
    fn note_overflow(&self) {
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
        if self.mode == CaptureMode::Scan {
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

/// Turns captured items into one sealed batch, moving their data (no copy).
fn build(disk_id: &str, seq: u64, items: Vec<Captured>) -> (ChangeBatch, InFlight) {
    let flight = InFlight {
        seq,
        first_write_ms: items.iter().map(|i| i.at_ms).min().unwrap_or(0),
        bytes: items.iter().map(|i| i.data.len() as u64).sum(),
        first_index: items.first().map(|i| i.index).unwrap_or(0),
        last_index: items.last().map(|i| i.index).unwrap_or(0),
    };
    let all_sync = items.iter().all(|i| i.sync);
    let last = items.iter().map(|i| i.at_ms).max().unwrap_or(0);
    let mut tags = Vec::new();
    let mut extents = Vec::with_capacity(items.len());
    for i in items {
        match i.tag {
            Some(tag) => tags.push(tag),
            None => extents.push(Extent {
                offset: i.offset,
                data: i.data.into(),
                zero_length: i.zero_length,
            }),
        }
    }
    let mut b = ChangeBatch {
        disk_id: disk_id.to_string(),
        seq,
        extents,
        tags,
        first_write_unix_ms: flight.first_write_ms,
        last_write_unix_ms: last,
        kind: if all_sync { KIND_SYNC } else { KIND_STREAM }.into(),
        checksum: Vec::new(),
    };
    batch::seal(&mut b);
    (b, flight)
}

/// Whether the process server may still be getting set up for the disk: it has not yet heard
/// of the assignment (NOT_FOUND) or not yet from the disk's master target (UNAVAILABLE, as
/// for a process server still starting). Both pass within a heartbeat, so the agent asks again
/// soon instead of backing off.
fn process_server_not_ready(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unavailable))
}

async fn ship(agent: Arc<DiskAgent>) {
    let mut backoff = Duration::from_millis(200);
    let mut last_error = String::new();
    let mut not_ready = 0u32;
    while !agent.stop.is_cancelled() {
        // The machine is moving to another process server: ship nothing until the move is
        // done (the current one is forwarding what it holds; writes stay queued here).
        if agent.assignment().draining {
            tokio::select! {
                _ = agent.rerouted.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = agent.stop.cancelled() => return,
            }
            continue;
        }
        // Where this session's batches go; it ends when that changes (see `set_assignment`).
        let route = agent.route.load(Ordering::SeqCst);
        match session(&agent, &mut last_error, route).await {
            Ok(()) => return,
            // Also a failure the move caused (the old process server refusing a push).
            Err(e) if e.is::<Rerouted>() || agent.route.load(Ordering::SeqCst) != route => {
                let a = agent.assignment();
                if a.draining {
                    tracing::info!(disk = %agent.disk_id, ps = %a.process_server_address,
                        "moving to another process server: shipping paused while this one forwards what it holds");
                } else {
                    tracing::info!(disk = %agent.disk_id, ps = %a.process_server_address,
                        "process server changed: shipping there");
                }
                backoff = Duration::from_millis(200);
                continue;
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(disk = %agent.disk_id,
                        ps = %agent.assignment().process_server_address,
                        "cannot ship to the process server, retrying (captured writes are kept): {text}");
                    last_error = text;
                }
                // Quick retries for the first few seconds only: a process server that stays
                // "not ready" is not catching up with its heartbeats.
                not_ready = if process_server_not_ready(&e) {
                    not_ready + 1
                } else {
                    0
                };
                backoff = if (1..=50).contains(&not_ready) {
                    Duration::from_millis(100)
                } else {
                    (backoff * 2).min(Duration::from_secs(5))
                };
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = agent.stop.cancelled() => return,
        }
    }
}

/// A client of the disk's process server (shipping, resync and scan each make their own).
pub(crate) fn ingest_client(agent: &DiskAgent) -> anyhow::Result<IngestClient<Channel>> {
    Ok(ingest_client_on(ingest_channel(agent)?))
}

/// An `Ingest` client on `channel`, with Lifeboat's message-size limits.
fn ingest_client_on(channel: Channel) -> IngestClient<Channel> {
    IngestClient::new(channel)
        .max_encoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES)
}

/// A channel to the disk's process server.
fn ingest_channel(agent: &DiskAgent) -> anyhow::Result<Channel> {
    let assignment = agent.assignment();
    if assignment.process_server_address.is_empty() {
        anyhow::bail!("the process server's address is not known yet");
    }
    tls::mtls_channel(
        &agent.identity,
        &assignment.process_server_address,
        Role::ProcessServer,
    )
}

/// Asks the process server where the disk's stream stands, noting how full its cache is.
pub(crate) async fn ask_position(
    agent: &DiskAgent,
    client: &mut IngestClient<Channel>,
) -> anyhow::Result<ResumeResponse> {
    let r = client
        .resume(ResumeRequest {
            disk_id: agent.disk_id.clone(),
        })
        .await?
        .into_inner();
    agent
        .cache_fill_percent
        .store(r.cache_fill_percent, Ordering::Relaxed);
    Ok(r)
}

/// Marks the end of a sync, resync or first scan: it is complete once everything queued so
/// far is applied (see `check_sync_complete`).
pub(crate) fn mark_pass_end(agent: &DiskAgent) -> anyhow::Result<()> {
    let last = agent
        .capture
        .queue
        .lock()
        .map(|q| q.last_index())
        .map_err(|_| anyhow::anyhow!("capture poisoned"))?;
    if let Ok(mut p) = agent.progress.lock() {
        p.sync_last_index = Some(last);
    }
    agent.capture.queued.notify_one();
    Ok(())
}

/// One connection to the process server, until it breaks or the route (`DiskAgent::route`,
/// as it was when the session began) changes. `last_error` is what the previous one broke on
/// (empty if none): once this one is up, the log says shipping goes on again.
async fn session(
    agent: &Arc<DiskAgent>,
    last_error: &mut String,
    route: u64,
) -> anyhow::Result<()> {
    // One connection for the position question and the push stream.
    let channel = ingest_channel(agent)?;
    let mut client = ingest_client_on(channel.clone());
    let resume = ask_position(agent, &mut client).await?;
    if !last_error.is_empty() {
        tracing::info!(disk = %agent.disk_id, durable = resume.durable_seq,
            "shipping to the process server again");
        last_error.clear();
    }
    let applied_through;
    let resend: Vec<ChangeBatch> = {
        let mut p = agent
            .progress
            .lock()
            .map_err(|_| anyhow::anyhow!("progress poisoned"))?;
        if p.next_seq == 0 || p.next_seq <= resume.durable_seq {
            p.next_seq = resume.durable_seq + 1;
        }
        p.durable(resume.durable_seq);
        // Applied while disconnected (always so after a switch): those regions may go.
        applied_through = p.applied(resume.applied_seq);
        let lost = p
            .unacked
            .front()
            .map_or(p.next_seq > resume.durable_seq + 1, |b| {
                b.seq > resume.durable_seq + 1
            });
        if lost {
            // Batches it had acknowledged are gone. The dirty map still holds the regions of
            // every write not yet on the replica (it lets a region go only once the master
            // target applied it), so a resync of those regions suffices — except for an
            // initial sync's copy, which is not in the map, and in scan mode, whose next scan
            // compares with the replica once the stream is given up: the whole disk then.
            let whole = agent.mode != CaptureMode::Nbd || p.phase == Phase::InitialSync;
            tracing::warn!(disk = %agent.disk_id, durable = resume.durable_seq, next = p.next_seq,
                "the process server lost acknowledged batches: resyncing {}",
                if whole { "the whole disk" } else { "the regions written since the replica's position" });
            p.unacked.clear();
            p.in_flight.clear();
            p.next_seq = resume.durable_seq + 1;
            p.phase = Phase::ResyncRequired("the process server lost acknowledged batches".into());
            if whole {
                if let Ok(mut q) = agent.capture.queue.lock() {
                    q.dirty.mark_all()?;
                }
            }
            // Gives the stream up: queued writes are dropped (their regions are set) and every
            // set region is pinned until the resync has compared it.
            agent.capture.break_stream()?;
        }
        p.unacked.iter().cloned().collect()
    };
    if let Some(index) = applied_through {
        clear_dirty(agent, index);
    }
    let in_initial_sync = matches!(
        agent.progress.lock().map(|p| p.phase.clone()),
        Ok(Phase::InitialSync)
    );
    // A scan-mode disk's first scan is its initial sync and its resync (see `scan`).
    let nbd_mode = agent.mode == CaptureMode::Nbd;
    if nbd_mode && in_initial_sync && !agent.sync_started.swap(true, Ordering::SeqCst) {
        let zeros_matter = resume.durable_seq > 0 || resume.applied_seq > 0;
        tokio::spawn(crate::initial_sync::run(agent.clone(), zeros_matter));
    }
    agent
        .cache_fill_percent
        .store(resume.cache_fill_percent, Ordering::Relaxed);

    let (tx, rx) = mpsc::channel::<ChangeBatch>(64);
    // Payloads go out without a copy into tonic's encode buffer (see batch_stream).
    let mut acks =
        batch_stream::call::<IngestAck, _>(channel, batch_stream::PUSH, ReceiverStream::new(rx))
            .await?;
    for b in resend {
        tx.send(b)
            .await
            .map_err(|_| anyhow::anyhow!("the process server closed the stream"))?;
    }
    let mut last_poll = Instant::now();
    loop {
        send_ready(agent, &tx).await?;
        check_sync_complete(agent)?;
        agent.note_overflow();
        let needs_resync = agent
            .progress
            .lock()
            .is_ok_and(|p| matches!(p.phase, Phase::ResyncRequired(_)));
        if nbd_mode && needs_resync && !agent.resync_running.swap(true, Ordering::SeqCst) {
            tokio::spawn(crate::resync::run(agent.clone()));
        }
        let window_full = agent
            .progress
            .lock()
            .map(|p| {
                p.unacked.iter().map(batch::payload_bytes).sum::<usize>() as u64 >= WINDOW_BYTES
            })
            .unwrap_or(true);
        tokio::select! {
            biased;
            ack = acks.message() => {
                let Some(ack) = ack? else { anyhow::bail!("the process server ended the stream") };
                agent.cache_fill_percent.store(ack.cache_fill_percent, Ordering::Relaxed);
                on_ack(agent, ack.durable_seq, ack.applied_seq)?;
            }
            _ = agent.capture.queued.notified(), if !window_full => {}
            _ = agent.rerouted.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = agent.stop.cancelled() => return Ok(()),
        }
        if agent.route.load(Ordering::SeqCst) != route {
            return Err(Rerouted.into());
        }
        // While batches await the master target, ask where it stands. A current process
        // server acks on this stream as the master target applies; an older one only acks
        // our own pushes, and this poll is what tells the agent then.
        let waiting = agent
            .progress
            .lock()
            .map(|p| !p.in_flight.is_empty())
            .unwrap_or(false);
        if waiting && last_poll.elapsed() >= Duration::from_millis(500) {
            last_poll = Instant::now();
            let r = ask_position(agent, &mut client).await?;
            on_ack(agent, r.durable_seq, r.applied_seq)?;
        }
    }
}

/// Builds and sends batches from the capture queue while the window allows.
async fn send_ready(agent: &Arc<DiskAgent>, tx: &mpsc::Sender<ChangeBatch>) -> anyhow::Result<()> {
    loop {
        let batch = {
            let mut p = agent
                .progress
                .lock()
                .map_err(|_| anyhow::anyhow!("progress poisoned"))?;
            if matches!(p.phase, Phase::ResyncRequired(_)) && agent.capture.overflowed() {
                return Ok(());
            }
            let unacked: u64 = p
                .unacked
                .iter()
                .map(|b| batch::payload_bytes(b) as u64)
                .sum();
            if unacked >= WINDOW_BYTES {
                return Ok(());
            }
            let items = agent.capture.take(BATCH_BYTES, BATCH_EXTENTS);
            if items.is_empty() {
                return Ok(());
            }
            let seq = p.next_seq;
            p.next_seq += 1;
            let (b, flight) = build(&agent.disk_id, seq, items);
            p.unacked.push_back(b.clone());
            if p.in_flight.is_empty() {
                // A backlog starts: the configuration server hears of it now, not at the next
                // heartbeat (until then it would show the disk caught up).
                agent.early_reports.soon.notify_one();
            }
            p.in_flight.push_back(flight);
            b
        };
        metrics::counter!("lifeboat_agent_shipped_bytes_total")
            .increment(batch::payload_bytes(&batch) as u64);
        tx.send(batch)
            .await
            .map_err(|_| anyhow::anyhow!("the process server closed the stream"))?;
    }
}

fn on_ack(agent: &DiskAgent, durable: u64, applied: u64) -> anyhow::Result<()> {
    let clear = {
        let mut p = agent
            .progress
            .lock()
            .map_err(|_| anyhow::anyhow!("progress poisoned"))?;
        p.durable(durable);
        let had_backlog = !p.in_flight.is_empty();
        let clear = p.applied(applied);
        if had_backlog && p.in_flight.is_empty() && agent.capture.queued_bytes() == 0 {
            // Caught up: report it now (status and `lifeboat wait --caught-up` wait on it).
            agent.early_reports.soon.notify_one();
        }
        clear
    };
    if let Some(index) = clear {
        clear_dirty(agent, index);
    }
    Ok(())
}

/// Lets the dirty map go of regions whose writes up to capture `index` are all applied.
fn clear_dirty(agent: &DiskAgent, index: u64) {
    if let Ok(mut q) = agent.capture.queue.lock() {
        q.dirty.clear_through(index);
        if let Err(e) = q.dirty.write_back() {
            tracing::warn!(disk = %agent.disk_id, "cannot write the dirty map back: {e}");
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
fn check_sync_complete(agent: &DiskAgent) -> anyhow::Result<()> {
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
