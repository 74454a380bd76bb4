//! Forwarding one disk's cached batches, in order, to its master target, and releasing them
//! from the cache once the master target reports them durably applied. Reconnects with
//! backoff; on each connection it asks the master target where it stands, so nothing is
//! skipped and duplicates are harmless (the master target is idempotent on seq).
use crate::cache::Cursor;
use crate::disks::DiskEntry;
use lifeboat_common::{tls, Identity, Role};
use lifeboat_proto::batch_stream;
use lifeboat_proto::v1::{
    replica_client::ReplicaClient, ApplyAck, ChangeBatch, DiskAssignment, ResumeRequest,
};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Payload bytes read from the cache at a time.
const READ_BYTES: usize = 8 * 1024 * 1024;
/// Most batches sent but not yet acknowledged by the master target.
const WINDOW: u64 = 64;

pub async fn run(identity: Arc<Identity>, entry: Arc<DiskEntry>) {
    tokio::spawn(release_applied(entry.clone()));
    let mut backoff = Duration::from_millis(200);
    let mut last_error = String::new();
    let mut failing_since: Option<Instant> = None;
    while !entry.stop.is_cancelled() {
        match session(&identity, &entry).await {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                failing_since = None;
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                entry.forward_failed(format!("{e:#}"));
                // Nothing is being taken from memory until the next session catches up by
                // reading the file: leave the shared budget to the disks that are moving.
                if let Ok(mut recent) = entry.recent.lock() {
                    recent.shrink_to_floor();
                }
                let text = e.to_string();
                if text != last_error {
                    if not_told_yet(&e) && since.elapsed() < MT_TOLD_WITHIN {
                        // Just protected: the master target hears of the disk a moment after
                        // this process server does. Worth a warning only if it lasts.
                        tracing::debug!(disk = %entry.disk_id, "forwarding to the master target: {text}");
                    } else {
                        tracing::warn!(disk = %entry.disk_id, "forwarding to the master target: {text}");
                        last_error = text;
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = entry.stop.cancelled() => return,
        }
    }
}

/// How long a master target may take to hear of a newly assigned disk (it follows
/// assignments as this process server does) before being refused for it is worth a warning.
const MT_TOLD_WITHIN: Duration = Duration::from_secs(10);

/// Whether the master target refused the disk as not (yet) assigned to it.
fn not_told_yet(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tonic::Status>()
            .is_some_and(|s| s.code() == tonic::Code::NotFound)
    })
}

/// A client of the disk's master target.
pub fn replica_client(
    identity: &Identity,
    assignment: &DiskAssignment,
) -> anyhow::Result<ReplicaClient<Channel>> {
    Ok(replica_client_on(replica_channel(identity, assignment)?))
}

/// A `Replica` client on `channel`, with Lifeboat's message-size limits.
fn replica_client_on(channel: Channel) -> ReplicaClient<Channel> {
    ReplicaClient::new(channel)
        .max_decoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES)
}

/// A channel to the disk's master target.
fn replica_channel(identity: &Identity, assignment: &DiskAssignment) -> anyhow::Result<Channel> {
    if assignment.master_target_address.is_empty() {
        anyhow::bail!("the master target's address is not known yet");
    }
    tls::mtls_channel(
        identity,
        &assignment.master_target_address,
        Role::MasterTarget,
    )
}

async fn session(identity: &Identity, entry: &Arc<DiskEntry>) -> anyhow::Result<()> {
    let assignment = entry.assignment();
    // One connection for the status question and the apply stream.
    let channel = replica_channel(identity, &assignment)?;
    let mut client = replica_client_on(channel.clone());
    let status = client
        .status(ResumeRequest {
            disk_id: entry.disk_id.clone(),
            // The apply stream below goes on this connection: what the master target still
            // reads from an older one (this process before a restart) is refused from now on.
            take_stream: true,
        })
        .await?
        .into_inner();
    let mut applied = status.applied_seq;
    entry
        .applied
        .send_replace((applied, status.applied_write_unix_ms));
    release(entry, applied).await?;
    // After `applied` and the release (which moves an empty cache up to what the master
    // target holds): a caller that sees the status known finds both in place.
    entry.mt_status_known.send_replace(true);

    let (tx, rx) = mpsc::channel::<ChangeBatch>(WINDOW as usize);
    // Payloads go out without a copy into tonic's encode buffer (see batch_stream).
    let mut acks =
        batch_stream::call::<ApplyAck, _>(channel, batch_stream::APPLY, ReceiverStream::new(rx))
            .await?;
    let mut sent = applied;
    let mut cursor = Cursor::default();
    // Read from the cache but not yet sent (the window was full).
    let mut pending: VecDeque<ChangeBatch> = VecDeque::new();
    loop {
        let wanted = pending.is_empty() && sent.saturating_sub(applied) < WINDOW;
        // What the cache held before reading: batches stored after the reads below are not a
        // reason to worry that nothing was read.
        let durable_before = entry.durable_seq();
        if wanted {
            let (hot, after) = entry
                .recent
                .lock()
                .map(|mut r| r.take_after(sent, READ_BYTES))
                .unwrap_or_default();
            pending.extend(hot);
            if let Some(after) = after {
                cursor = after;
            }
        }
        if pending.is_empty() && sent.saturating_sub(applied) < WINDOW {
            let (e, from) = (entry.clone(), cursor.clone());
            let (batches, next, from_file) = tokio::task::spawn_blocking(move || {
                let cache = e
                    .cache
                    .lock()
                    .map_err(|_| anyhow::anyhow!("cache lock poisoned"))?;
                // Batches stored since `recent` was looked at above are in it now (they are
                // pushed under the cache lock): take them from memory, not from the file.
                let (hot, after) = e
                    .recent
                    .lock()
                    .map(|mut r| r.take_after(sent, READ_BYTES))
                    .unwrap_or_default();
                if !hot.is_empty() {
                    return Ok((hot, after.unwrap_or(from), false));
                }
                let (batches, next) = cache.read_from(&from, sent, READ_BYTES)?;
                Ok::<_, anyhow::Error>((batches, next, true))
            })
            .await??;
            cursor = next;
            if from_file {
                // Read back from disk and decrypted: after a reconnect, or because the master
                // target fell further behind than what is kept in memory.
                let read_back: usize = batches
                    .iter()
                    .map(lifeboat_common::batch::payload_bytes)
                    .sum();
                metrics::counter!("lifeboat_ps_cache_read_back_bytes_total")
                    .increment(read_back as u64);
            }
            pending.extend(batches);
        }
        let sent_before = sent;
        while sent.saturating_sub(applied) < WINDOW {
            let Some(b) = pending.pop_front() else { break };
            let seq = b.seq;
            let bytes = lifeboat_common::batch::payload_bytes(&b) as u64;
            if tx.send(b).await.is_err() {
                anyhow::bail!("the master target closed the stream");
            }
            metrics::counter!("lifeboat_ps_forwarded_bytes_total").increment(bytes);
            sent = seq;
        }
        // Held batches (initial sync, not in the cache) count: they wait to be sent too.
        let caught_up = pending.is_empty() && sent >= entry.received_seq();
        if caught_up && applied >= sent {
            entry.forward_ok();
        }
        let window_full = sent.saturating_sub(applied) >= WINDOW;
        if wanted && pending.is_empty() && sent == sent_before && sent < durable_before {
            // The cache says it holds more, but nothing could be read: start over (fresh
            // cursor, after a backoff) rather than spin.
            anyhow::bail!("the cache holds batches after {sent} that could not be read");
        }
        tokio::select! {
            biased;
            ack = acks.message() => {
                let Some(ack) = ack? else { anyhow::bail!("the master target ended the stream") };
                applied = ack.applied_seq;
                // A group from before this session may be acknowledged late: never count
                // batches as sent that this session has not sent, nor resend applied ones.
                if applied > sent {
                    sent = applied;
                    pending.retain(|b| b.seq > applied);
                    cursor = Cursor::default();
                }
                // `release_applied` frees what this covers.
                entry.applied.send_replace((applied, ack.applied_write_unix_ms));
                entry.forward_ok();
            }
            _ = entry.appended.notified(), if caught_up => {}
            _ = std::future::ready(()), if !caught_up && !window_full => {}
            _ = entry.stop.cancelled() => return Ok(()),
        }
    }
}

/// Frees the cache as the master target applies, in a task of its own: freeing takes the
/// cache lock, which a group commit holds through its writes and fdatasync, and a forwarder
/// that waited for it after each acknowledgement sent nothing meanwhile. While an initial sync
/// kept the cache busy, that held forwarding to a fraction of the ingest rate; the backlog
/// outgrew what is kept in memory and was read back from the file (up to 900 MiB of a 1 GiB
/// sync, and a third longer). Acknowledgements that arrive meanwhile are freed together.
async fn release_applied(entry: Arc<DiskEntry>) {
    let mut applied = entry.applied.subscribe();
    let mut last_error = String::new();
    // What the last successful release covered: a new forwarding session announces the
    // master target's position again, which frees nothing new.
    let mut released = 0;
    loop {
        // After a failure, tried again within a second even if nothing more is applied.
        let retry = !last_error.is_empty();
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            _ = entry.stop.cancelled() => return,
        }
        let seq = applied.borrow_and_update().0;
        if seq <= released && last_error.is_empty() {
            continue;
        }
        match release(&entry, seq).await {
            Ok(()) => {
                last_error.clear();
                released = released.max(seq);
            }
            Err(e) => {
                // A cache that cannot shrink fills, and its quota then slows the agents.
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(disk = %entry.disk_id, "freeing applied batches from the cache: {text}");
                    last_error = text;
                }
            }
        }
    }
}

async fn release(entry: &Arc<DiskEntry>, applied: u64) -> anyhow::Result<()> {
    let e = entry.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut cache = e
            .cache
            .lock()
            .map_err(|_| anyhow::anyhow!("cache lock poisoned"))?;
        if cache.durable_seq() < applied {
            // The master target holds more than this cache ever did (the cache was lost or
            // the disk moved here): continue after what it has.
            cache.skip_to(applied)?;
        }
        if let Ok(mut recent) = e.recent.lock() {
            recent.release_held(applied);
        }
        let before = cache.bytes();
        cache.release_through(applied)?;
        e.quota
            .released_total
            .fetch_add(before.saturating_sub(cache.bytes()), Ordering::Relaxed);
        Ok(())
    })
    .await?
}
