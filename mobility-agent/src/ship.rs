//! The shipper of one disk: turns captured items into sealed change batches, pushes them to
//! the process server, keeps them until they are durable there, resends them after a
//! reconnect, follows what the master target has applied (the dirty map lets regions go
//! then), and follows the disk's route (a process-server switch ends the stream).
use crate::capture::Captured;
use crate::disk::{check_sync_complete, DiskAgent};
use crate::progress::{InFlight, Phase};
use crate::settings::CaptureMode;
use lifeboat_common::batch::{self, KIND_STREAM, KIND_SYNC};
use lifeboat_common::{tls, Role};
use lifeboat_proto::batch_stream;
use lifeboat_proto::v1::{
    ingest_client::IngestClient, ChangeBatch, Extent, IngestAck, ResumeRequest, ResumeResponse,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Largest batch the agent builds (payload bytes) and most extents in it.
const BATCH_BYTES: u64 = 4 * 1024 * 1024;
const BATCH_EXTENTS: usize = 1024;
/// Payload bytes sent but not yet acknowledged before the agent waits.
const WINDOW_BYTES: u64 = 64 * 1024 * 1024;
/// The same during an initial sync or a resync: batches of data read from the disk are
/// acknowledged only once the master target has applied them (the process server does not
/// cache them), so the window spans that whole trip; 64 MiB left the initial-sync benchmark
/// 5-8% slower. Streaming keeps the smaller window: unacknowledged batches are memory on top
/// of the capture queue, which a burst of workload writes should overflow into the dirty map.
const SYNC_WINDOW_BYTES: u64 = 128 * 1024 * 1024;

/// The window for the disk's phase.
fn window(phase: &Phase) -> u64 {
    match phase {
        Phase::InitialSync | Phase::Resyncing => SYNC_WINDOW_BYTES,
        _ => WINDOW_BYTES,
    }
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
                data: i.data,
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

pub(crate) async fn ship(agent: Arc<DiskAgent>) {
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
/// `take_stream`: the caller pushes the disk's batches on this connection next (see
/// `ResumeRequest.take_stream`).
pub(crate) async fn ask_position(
    agent: &DiskAgent,
    client: &mut IngestClient<Channel>,
    take_stream: bool,
) -> anyhow::Result<ResumeResponse> {
    let r = client
        .resume(ResumeRequest {
            disk_id: agent.disk_id.clone(),
            take_stream,
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
    let last = agent.capture.last_index()?;
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
    let resume = ask_position(agent, &mut client, true).await?;
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
                p.unacked.iter().map(batch::payload_bytes).sum::<usize>() as u64 >= window(&p.phase)
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
            let r = ask_position(agent, &mut client, false).await?;
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
            if unacked >= window(&p.phase) {
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
        if had_backlog {
            // Caught up: report it now (status and `lifeboat wait --caught-up` wait on it).
            // Still behind: report within a second all the same, since the configuration
            // server ages a report that found a backlog (its RPO must never read low), and
            // a steady backlog would otherwise show an RPO a heartbeat interval too old.
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
