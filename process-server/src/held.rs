//! Initial-sync batches (and any batch of data the agent read from its disk: resyncs, scans):
//! forwarded from memory and acknowledged once the master target has applied them, not
//! written to the cache.
//!
//! Every other batch is acknowledged once durable in the cache, which lets the agent forget it
//! while the master target is slow or away. An initial sync gains nothing from that (it is
//! over only once the master target holds the whole disk) and pays for it twice over: sealing
//! and writing each byte to the cache, and the disk time the replica's writes then share.
//! Measured in the initial-sync benchmark on two cores, that was 0.6 CPU-seconds per GiB of
//! data, a fifth of the whole pipeline's. So a batch the agent built only of initial-sync
//! reads is *held* (see `recent`) and forwarded like the rest; the agent keeps every batch
//! until it is acknowledged, and the acknowledgement of a held batch comes once it is applied
//! (`IngestAck.durable_seq` counts what the master target applied). Nothing acknowledged is
//! ever only in memory: a process server that dies loses held batches the agent still has.
//!
//! The cache holds the stream contiguously from the master target's position. So when a
//! stream batch follows held ones (a workload write during the sync), the held batches not
//! yet applied are cached first, in the same group commit, and held no more; the same when a
//! new stream takes the disk (`Ingest.Resume` with `take_stream`: an agent that reconnected,
//! or restarted and numbers anew), since held batches may already be on their way to the
//! master target and their seqs must not be reused for other contents.
use crate::cache::DiskCache;
use crate::disks::DiskEntry;
use crate::ingest::may_store;
use lifeboat_common::batch::{self, KIND_SYNC};
use lifeboat_proto::v1::ChangeBatch;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

/// Most payload bytes of one disk held and not yet applied; past it the stream waits for the
/// master target. (The agent keeps at most 128 MiB unacknowledged, so it never waits here.)
pub const HELD_MAX: usize = 256 * 1024 * 1024;
/// How long a stream waits for the master target to apply held batches before it is told to
/// retry (the master target is unreachable, or far behind).
const HELD_WAIT: Duration = Duration::from_secs(30);

/// Whether `b` is held rather than cached: a batch of data the agent read from its disk
/// (initial sync, resync, scans; tags may ride along), never of captured workload writes.
pub fn holds(b: &ChangeBatch) -> bool {
    b.kind == KIND_SYNC
}

/// Holds `batches` (checked, consecutive, initial-sync ones) for the forwarder, once there is
/// room. They are acknowledged as the master target applies them.
pub async fn hold(
    entry: &Arc<DiskEntry>,
    remote: Option<std::net::SocketAddr>,
    batches: Vec<ChangeBatch>,
) -> Result<(), Status> {
    wait_for(entry, "room for more initial-sync data", |e| {
        e.recent.lock().map(|r| r.held_bytes()).unwrap_or(0) < HELD_MAX
    })
    .await?;
    let payload: u64 = batches.iter().map(|b| batch::payload_bytes(b) as u64).sum();
    let entry2 = entry.clone();
    tokio::task::spawn_blocking(move || {
        // Under the cache lock, as stores: one order for the disk's stream, the same draining
        // and stream-owner rules, and reports that read the held position with the cache's.
        let cache = entry2
            .cache
            .lock()
            .map_err(|_| Status::internal("cache lock poisoned"))?;
        may_store(&entry2, remote)?;
        let received = cache
            .durable_seq()
            .max(entry2.held_through.load(Ordering::Acquire));
        let batches: Vec<ChangeBatch> = batches.into_iter().filter(|b| b.seq > received).collect();
        let Some(last) = batches.last().map(|b| b.seq) else {
            return Ok(());
        };
        if batches[0].seq != received + 1 {
            return Err(Status::failed_precondition(format!(
                "disk {}: batch {} arrived but {} is next",
                entry2.disk_id,
                batches[0].seq,
                received + 1
            )));
        }
        entry2
            .recent
            .lock()
            .map_err(|_| Status::internal("held batches lock poisoned"))?
            .hold(batches);
        entry2.held_through.store(last, Ordering::Release);
        Ok(())
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))??;
    metrics::counter!("lifeboat_ps_ingest_bytes_total").increment(payload);
    metrics::counter!("lifeboat_ps_held_bytes_total").increment(payload);
    entry.appended.notify_one();
    Ok(())
}

/// Stores `batches` (stream batches, or none) in the cache under its lock, after the held
/// batches the master target has not applied yet: the cache holds the stream contiguously
/// from the master target's position, so those are cached first (in the same group commit)
/// and held no more. Replays (seq already received) are dropped. Returns the durable seq.
pub fn store_after_held(
    cache: &mut DiskCache,
    entry: &DiskEntry,
    compress: bool,
    batches: Vec<ChangeBatch>,
) -> Result<u64, Status> {
    let held_through = entry.held_through.load(Ordering::Acquire);
    let received = cache.durable_seq().max(held_through);
    // Copies: the held batches stay held until the append below is durable (a failed write
    // must leave them where the forwarder and the next store find them).
    let mut chunk = Vec::new();
    if cache.durable_seq() < held_through {
        // Applied ones need no cache: the position moves past them.
        let applied = entry.applied().0.min(held_through);
        if cache.durable_seq() < applied {
            cache
                .skip_to(applied)
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        let recent = entry
            .recent
            .lock()
            .map_err(|_| Status::internal("held batches lock poisoned"))?;
        chunk = recent.held_after(cache.durable_seq());
    }
    let caching_held = !chunk.is_empty();
    chunk.extend(batches.into_iter().filter(|b| b.seq > received));
    let durable = cache.durable_seq();
    if chunk.first().is_some_and(|b| b.seq != durable + 1) {
        return Err(Status::failed_precondition(format!(
            "disk {}: batch {} arrived but {} is next",
            entry.disk_id,
            chunk[0].seq,
            durable + 1
        )));
    }
    if chunk.is_empty() {
        return Ok(durable);
    }
    let (seq, plain, stored, cursors) = cache
        .append_tracked(&chunk, compress)
        .map_err(|e| Status::unavailable(e.to_string()))?;
    entry.plain_bytes.fetch_add(plain, Ordering::Relaxed);
    entry.stored_bytes.fetch_add(stored, Ordering::Relaxed);
    entry
        .quota
        .stored_total
        .fetch_add(stored, Ordering::Relaxed);
    // Durable now: the forwarder may send them from memory, and none is held any more.
    if let Ok(mut recent) = entry.recent.lock() {
        if caching_held {
            recent.clear_held();
        }
        recent.push(chunk.into_iter().zip(cursors).collect());
    }
    Ok(seq)
}

/// Polls `ready` until it holds, for at most [`HELD_WAIT`]; `what` names what is awaited.
/// Only a stream ahead of its master target waits here, so a short poll costs nothing.
async fn wait_for(
    entry: &DiskEntry,
    what: &str,
    ready: impl Fn(&DiskEntry) -> bool,
) -> Result<(), Status> {
    let deadline = tokio::time::Instant::now() + HELD_WAIT;
    while !ready(entry) {
        if tokio::time::Instant::now() >= deadline {
            return Err(Status::unavailable(format!(
                "disk {}: waited {} s for {what}: the master target has not applied them (is \
                 it reachable? see `lifeboat status`); retry shortly",
                entry.disk_id,
                HELD_WAIT.as_secs()
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = entry.stop.cancelled() => {
                return Err(Status::unavailable(format!(
                    "disk {} is no longer assigned to this process server",
                    entry.disk_id
                )));
            }
        }
    }
    Ok(())
}
