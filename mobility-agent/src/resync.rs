//! Resync: bringing a disk whose stream broke (agent restart, queue overflow, process server
//! cache full or lost) back to Protected without copying it whole. The dirty map says which
//! regions may differ from the replica; for each, the agent asks the replica's block hashes
//! (through the process server, from the master target), reads the region in order with
//! workload writes, and ships only the blocks whose hashes differ.
//!
//! Why this is exact: the pass starts by re-enabling the stream (`Capture::resume_stream`), so
//! every write from then on is queued in order; it first waits until the master target has
//! applied every batch sent before that point, so the replica holds no older batch still to
//! come. A region read at queue position P then equals the source at P; where the replica's
//! hash already matches it, replaying the queued writes before P onto it yields the same bytes,
//! and where it differs the shipped blocks overwrite it. Either way, after the queue up to P is
//! applied the region equals the source at P, and the stream carries it on from there.
//!
//! Pace: workload writes keep priority (the pass waits while the capture queue is busy), but
//! never below the configured floor rate, so a resync always finishes.
use crate::disk::DiskAgent;
use crate::progress::Phase;
use lifeboat_common::blockhash::{self, BlockHash, HASH_LEN};
use lifeboat_proto::v1::{ingest_client::IngestClient, HashRequest};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Bytes compared per hash request.
const CHUNK: u64 = 8 * 1024 * 1024;
/// While more than this is queued for shipping, the resync yields to workload writes.
const BUSY_QUEUE: u64 = 32 * 1024 * 1024;
/// Hash requests in flight ahead of the compare.
const PREFETCH: usize = 4;
/// The resync waits until the process server's cache is below this fill.
const CACHE_FILL_START: u32 = 50;

/// A request for the replica's hashes of one span, running ahead of the compare.
type HashFetch = JoinHandle<anyhow::Result<Vec<BlockHash>>>;

/// Runs resync passes until the disk no longer needs one (or the agent stops).
pub async fn run(agent: Arc<DiskAgent>) {
    let mut backoff = Duration::from_millis(500);
    while !agent.stop.is_cancelled() {
        match pass(&agent).await {
            Ok(true) => break,
            Ok(false) => backoff = Duration::from_millis(500),
            Err(e) => {
                tracing::warn!(disk = %agent.disk_id, "resync: {e:#}; retrying");
                // Give the stream up again: the next pass must start from a settled point,
                // which sustained writes on a live stream might never offer.
                if let Err(e) = agent.capture.break_stream() {
                    tracing::error!(disk = %agent.disk_id, "{e}");
                }
                agent.set_phase(Phase::ResyncRequired(format!("resync interrupted: {e}")));
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = agent.stop.cancelled() => break,
        }
    }
    agent.resync_running.store(false, Ordering::SeqCst);
}

/// Waits until everything sent is applied on the master target and the process server's
/// cache has room; `false` if the agent stopped.
pub async fn settle(agent: &DiskAgent, client: &mut IngestClient<Channel>) -> anyhow::Result<bool> {
    let mut said = false;
    loop {
        let r = crate::ship::ask_position(agent, client, false).await?;
        let settled = agent.progress.lock().is_ok_and(|p| {
            p.next_seq > 0
                && p.unacked.is_empty()
                && r.applied_seq >= p.next_seq - 1
                && r.applied_seq >= r.durable_seq
        });
        if settled && r.cache_fill_percent < CACHE_FILL_START {
            return Ok(true);
        }
        if !said {
            tracing::info!(disk = %agent.disk_id, cache_fill = r.cache_fill_percent,
                "resync waits for the batches in flight to be applied and the process server's cache to drain");
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = agent.stop.cancelled() => return Ok(false),
        }
    }
}

/// One pass over the dirty regions; `true` when it completed.
async fn pass(agent: &Arc<DiskAgent>) -> anyhow::Result<bool> {
    let mut client = crate::ship::ingest_client(agent)?;
    if !settle(agent, &mut client).await? {
        return Ok(false);
    }
    let ranges = agent.capture.resume_stream()?;
    let total: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    tracing::info!(disk = %agent.disk_id, dirty_bytes = total, "resync started");
    if let Ok(mut p) = agent.progress.lock() {
        p.sync_total = total;
        p.sync_done = 0;
        p.sync_started = Some(Instant::now());
        p.sync_last_index = None;
    }
    agent.set_phase(Phase::Resyncing);
    let started = Instant::now();
    let floor = agent.tuning.resync_floor_bytes_per_sec as f64;
    let (mut done, mut shipped) = (0u64, 0u64);
    // Where the time goes: waiting for the replica's hashes (beyond the prefetch), reading
    // and comparing locally.
    let (mut remote, mut local) = (Duration::ZERO, Duration::ZERO);
    // The replica's hashes are fetched a few spans ahead: any replica state from after the
    // settle point is good to compare with (see the module doc), so they need not wait for
    // the local compare, and the master target's flushes overlap the agent's reads.
    let spans: Vec<(u64, u64)> = ranges
        .iter()
        .flat_map(|&(start, end)| {
            (start..end)
                .step_by(CHUNK as usize)
                .map(move |o| (o, CHUNK.min(end - o)))
        })
        .collect();
    let mut ahead: VecDeque<(u64, u64, HashFetch)> = VecDeque::new();
    let mut next = 0;
    loop {
        while ahead.len() < PREFETCH && next < spans.len() {
            let (offset, len) = spans[next];
            next += 1;
            let (a, mut c) = (agent.clone(), client.clone());
            let fetch = tokio::spawn(async move { replica_hashes(&a, &mut c, offset, len).await });
            ahead.push_back((offset, len, fetch));
        }
        let Some((offset, len, fetch)) = ahead.pop_front() else {
            break;
        };
        // Yield to workload writes while they fill the queue, unless behind the floor.
        while agent.capture.queued_bytes() > BUSY_QUEUE
            && done as f64 >= floor * started.elapsed().as_secs_f64()
        {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = agent.stop.cancelled() => return Ok(false),
            }
        }
        if agent.capture.overflowed() {
            anyhow::bail!("the stream broke again during the resync");
        }
        let t = Instant::now();
        let replica = fetch.await??;
        remote += t.elapsed();
        let t = Instant::now();
        let c = agent.capture.clone();
        let (sent, _) =
            tokio::task::spawn_blocking(move || c.compare_read(offset, len, &replica)).await??;
        local += t.elapsed();
        metrics::counter!("lifeboat_agent_resync_compared_bytes_total").increment(len);
        metrics::counter!("lifeboat_agent_resync_shipped_bytes_total").increment(sent);
        done += len;
        shipped += sent;
        if let Ok(mut p) = agent.progress.lock() {
            p.sync_done = done;
        }
    }
    crate::ship::mark_pass_end(agent)?;
    tracing::info!(disk = %agent.disk_id, compared = done, shipped,
        secs = started.elapsed().as_secs_f64(), replica_hash_secs = remote.as_secs_f64(),
        local_secs = local.as_secs_f64(), "resync pass finished; completes once applied");
    Ok(true)
}

/// The replica's hashes of `len` bytes at `offset`, checked for shape.
pub async fn replica_hashes(
    agent: &DiskAgent,
    client: &mut IngestClient<Channel>,
    offset: u64,
    len: u64,
) -> anyhow::Result<Vec<BlockHash>> {
    let r = client
        .hashes(HashRequest {
            disk_id: agent.disk_id.clone(),
            offset,
            length: len,
            block_size: blockhash::BLOCK as u32,
        })
        .await?
        .into_inner();
    let expected = len.div_ceil(blockhash::BLOCK) as usize;
    if r.hashes.len() != expected || r.hashes.iter().any(|h| h.len() != HASH_LEN) {
        anyhow::bail!(
            "the replica answered {} hashes for {expected} blocks",
            r.hashes.len()
        );
    }
    Ok(r.hashes
        .iter()
        .map(|h| {
            let mut a = [0u8; HASH_LEN];
            a.copy_from_slice(h);
            a
        })
        .collect())
}

/// A file in a disk's state directory asking the next start to compare the whole disk with
/// the replica (written by `mobility-agent mark-for-resync`).
pub const RESYNC_ALL_MARKER: &str = "resync-all";

/// Asks the next agent start to resync every protected disk (or only `disk_id`) in full;
/// returns the disk ids marked.
pub fn mark_for_resync(
    data_dir: &std::path::Path,
    disk_id: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let disks = data_dir.join("disks");
    let mut marked = Vec::new();
    if !disks.exists() {
        anyhow::bail!(
            "no protected disk has state in {} (is --data-dir the agent's?)",
            disks.display()
        );
    }
    let entries = std::fs::read_dir(&disks)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", disks.display()))?;
    for entry in entries {
        let entry = entry?;
        let id = entry.file_name().to_string_lossy().to_string();
        if disk_id.is_some_and(|want| want != id) || !entry.path().is_dir() {
            continue;
        }
        lifeboat_common::fsutil::durable_write(&entry.path().join(RESYNC_ALL_MARKER), b"", 0o600)?;
        marked.push(id);
    }
    if marked.is_empty() {
        match disk_id {
            Some(id) => anyhow::bail!(
                "disk {id} is not protected on this agent ({} has no state for it)",
                disks.display()
            ),
            None => anyhow::bail!("no protected disk has state in {}", disks.display()),
        }
    }
    Ok(marked)
}
