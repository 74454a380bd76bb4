//! Ingest service: agents push change batches. A batch is checked (caller owns the disk,
//! checksum, extents inside the disk, next in sequence), written to the cache, and
//! acknowledged only after the cache's fdatasync. Batches that arrive together are
//! group-committed: one fsync for all of them. A replayed batch is acknowledged without being
//! written again; a gap, a bad checksum or a foreign disk ends the stream with an error and
//! nothing from the bad batch on is stored.
use crate::disks::{DiskEntry, Disks};
use crate::held;
use crate::quota::Admission;
use lifeboat_common::batch;
use lifeboat_common::blockhash;
use lifeboat_common::group::Groups;
use lifeboat_common::peer::{require_role, Peer};
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, ingest_server::Ingest, ChangeBatch, IngestAck};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Most payload bytes group-committed at once.
const GROUP_BYTES: usize = 32 * 1024 * 1024;

pub struct IngestService {
    disks: Arc<Disks>,
}

impl IngestService {
    pub fn new(disks: Arc<Disks>) -> Self {
        IngestService { disks }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        let peer = require_role(request, &[Role::Agent])?;
        if self.disks.revocations.is_revoked(&peer.id) {
            return Err(Status::unauthenticated(format!(
                "identity {} was revoked",
                peer.id
            )));
        }
        Ok(peer)
    }
}

/// The disk `disk_id`, if it is assigned here and belongs to `peer`'s machine.
fn owned_disk(disks: &Disks, peer: &Peer, disk_id: &str) -> Result<Arc<DiskEntry>, Status> {
    let entry = disks.get(disk_id).ok_or_else(|| {
        Status::not_found(format!(
            "disk {disk_id} is not assigned to this process server"
        ))
    })?;
    if entry.assignment().agent_id != peer.id {
        return Err(Status::permission_denied(format!(
            "disk {disk_id} belongs to another machine; an agent may only send its own disks"
        )));
    }
    Ok(entry)
}

fn ack(disks: &Disks, entry: &DiskEntry, durable: u64) -> IngestAck {
    let (applied_seq, applied_write_unix_ms) = entry.applied();
    IngestAck {
        disk_id: entry.disk_id.clone(),
        // Applied on the master target is durable too: held batches count once applied.
        durable_seq: durable.max(applied_seq),
        applied_seq,
        applied_write_unix_ms,
        cache_fill_percent: disks.cache.quota.fill_percent(disks.cache_used()),
    }
}

/// How long a call waits for the disk's forwarder to hear from the master target before
/// telling the agent to retry.
const POSITION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The highest seq durable here. An empty cache (a disk just assigned, or everything
/// released before a restart) does not know where the disk's stream stands until the master
/// target has said what it applied: answering 0 before that would make the agent believe
/// batches were lost, or restart its sequence. The forwarder is asking right now, so the
/// call waits for it a moment, which saves the agent a retry when a disk is first protected.
async fn durable_position(entry: &DiskEntry) -> Result<u64, Status> {
    let now = entry.durable_seq();
    if now > 0 {
        return Ok(now);
    }
    let mut known = entry.mt_status_known.subscribe();
    let heard = tokio::time::timeout(POSITION_WAIT, known.wait_for(|k| *k))
        .await
        .is_ok_and(|r| r.is_ok());
    match heard {
        true => Ok(entry.durable_seq()),
        false => Err(Status::unavailable(format!(
            "disk {}: this process server has not yet reached the disk's master target; retry shortly",
            entry.disk_id
        ))),
    }
}

/// Flow control: waits until the cache quota admits at least the first of `batches`, slowing
/// the stream as the cache fills (see `quota`); returns how many of them it admits.
async fn admitted(disks: &Disks, entry: &DiskEntry, batches: &[ChangeBatch]) -> usize {
    let mut held_since: Option<std::time::Instant> = None;
    let taken = loop {
        // A disk with nothing waiting for its master target always gets one group in: what it
        // holds is being released, and it must not starve behind other disks' backlogs.
        let idle = entry.durable_seq() <= entry.applied().0;
        let used = if idle { 0 } else { disks.cache_used() };
        let (free, _) = lifeboat_common::facts::space(&disks.cache.dir);
        let mut incoming = 0u64;
        let mut fits = 0;
        let mut delay = std::time::Duration::ZERO;
        for b in batches {
            incoming += batch::payload_bytes(b) as u64;
            match disks.cache.quota.admit(used, incoming, free) {
                Admission::Accept => {}
                Admission::Slow(d) => delay = d,
                Admission::Full => break,
            }
            fits += 1;
        }
        if fits > 0 {
            if !delay.is_zero() {
                metrics::counter!("lifeboat_ps_flow_control_delays_total").increment(1);
                tokio::time::sleep(delay).await;
            }
            break fits;
        }
        if held_since.is_none() {
            tracing::warn!(
                used,
                quota = disks.cache.quota.quota_bytes,
                "cache full: holding agent streams until the master targets drain it"
            );
            held_since = Some(std::time::Instant::now());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    if let Some(t) = held_since {
        metrics::counter!("lifeboat_ps_cache_full_seconds_total")
            .increment(t.elapsed().as_secs().max(1));
    }
    taken
}

/// Checks and stores a group of batches; returns one ack per disk touched.
/// `remote`: the stream's connection (see [`DiskEntry::stream_owner`]).
async fn store(
    disks: &Disks,
    peer: &Peer,
    remote: Option<SocketAddr>,
    group: Vec<ChangeBatch>,
) -> Result<Vec<IngestAck>, Status> {
    let mut by_disk: BTreeMap<String, Vec<ChangeBatch>> = BTreeMap::new();
    for b in group {
        by_disk.entry(b.disk_id.clone()).or_default().push(b);
    }
    let mut acks = Vec::new();
    for (disk_id, batches) in by_disk {
        let entry = owned_disk(disks, peer, &disk_id)?;
        let assignment = entry.assignment();
        let mut fresh = Vec::new();
        let durable_now = durable_position(&entry).await?.max(entry.received_seq());
        let mut expected = durable_now + 1;
        let mut error = None;
        for b in batches {
            // The checksum was checked as the batch arrived (`Groups`).
            if let Err(e) = batch::verify_fields(&b, assignment.size_bytes) {
                error = Some(e.status());
                break;
            }
            if b.seq < expected {
                continue; // replayed: already durable (or held) here
            }
            if b.seq > expected {
                error = Some(Status::failed_precondition(format!(
                    "disk {disk_id}: batch {} arrived but {expected} is next; resume from {}",
                    b.seq,
                    expected - 1
                )));
                break;
            }
            expected += 1;
            fresh.push(b);
        }
        // Store the good prefix even if a later batch was bad: it is acknowledged below only
        // if there is no error, and kept either way (the agent resumes after it).
        let compress = assignment.compression;
        let mut durable = entry.durable_seq();
        let mut rest = fresh;
        while !rest.is_empty() {
            // Initial-sync batches are held in memory until applied, not cached (see `held`).
            let sync_run = rest.iter().take_while(|b| held::holds(b)).count();
            if sync_run > 0 {
                held::hold(&entry, remote, rest.drain(..sync_run).collect()).await?;
                continue;
            }
            let stream_run = rest.iter().take_while(|b| !held::holds(b)).count();
            // As much of the group as the quota admits, with one fsync for it.
            let take = admitted(disks, &entry, &rest[..stream_run]).await;
            let chunk: Vec<ChangeBatch> = rest.drain(..take).collect();
            let payload: u64 = chunk.iter().map(|b| batch::payload_bytes(b) as u64).sum();
            let entry2 = entry.clone();
            let now_durable = tokio::task::spawn_blocking(move || {
                let mut cache = entry2
                    .cache
                    .lock()
                    .map_err(|_| Status::internal("cache lock poisoned"))?;
                may_store(&entry2, remote)?;
                held::store_after_held(&mut cache, &entry2, compress, chunk)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
            durable = now_durable;
            metrics::counter!("lifeboat_ps_ingest_bytes_total").increment(payload);
            entry.appended.notify_one();
        }
        if let Some(status) = error {
            tracing::warn!(disk = %disk_id, agent = %peer.id, "batch refused: {}", status.message());
            return Err(status);
        }
        acks.push(ack(disks, &entry, durable));
    }
    Ok(acks)
}

/// Whether a push stream from `remote` may store (or hold) batches of the disk now: not while
/// the disk drains for a switch, and only on the connection that owns the disk's stream.
/// Called under the cache lock, as `disk_reports` reads it: once a report says "draining"
/// with its durable seq, no store adds to that seq (see `draining_refusal`).
pub(crate) fn may_store(entry: &DiskEntry, remote: Option<SocketAddr>) -> Result<(), Status> {
    if let Some(refusal) = draining_refusal(entry) {
        return Err(refusal);
    }
    entry.stream_owner.check(remote, || {
        format!(
            "disk {}: the agent resumed on another connection, which now owns the disk's \
             stream; resume",
            entry.disk_id
        )
    })
}

/// A disk whose machine moves to another process server (a switch) is drained: nothing more
/// is stored here, what the cache holds is forwarded, and the configuration server moves the
/// machine once everything acknowledged here is applied. The agent holds its batches
/// meanwhile and sends them to the new process server (it stops shipping when its own
/// assignment says so; this refusal covers a push already under way).
fn draining_refusal(entry: &DiskEntry) -> Option<Status> {
    entry.assignment().draining.then(|| {
        Status::unavailable(format!(
            "disk {} is moving to another process server; its batches go there once the move \
             is done",
            entry.disk_id
        ))
    })
}

/// What a push stream last acknowledged for a disk, and a subscription to what the master
/// target applies of it. One disk per stream: the agent opens a stream per disk (on a stream
/// carrying several, the one stored last is watched).
struct AppliedWatch {
    entry: Arc<DiskEntry>,
    applied: tokio::sync::watch::Receiver<crate::disks::Applied>,
    durable: u64,
    reported: u64,
}

/// Resolves with a fresh ack once the master target has applied batches beyond the last ack's;
/// never resolves while nothing is watched. A disk that leaves this server is no longer
/// watched (the stream must not keep its cache open). Cancel-safe: the only await is the
/// wait for a change, and the applied value is compared before every wait, so a change
/// between the store's ack and the subscription is not missed either.
async fn applied_since(disks: &Disks, last: &mut Option<AppliedWatch>) -> IngestAck {
    let Some(w) = last.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        let (applied, _) = *w.applied.borrow();
        if applied > w.reported {
            w.reported = applied;
            return ack(disks, &w.entry, w.durable);
        }
        tokio::select! {
            changed = w.applied.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = w.entry.stop.cancelled() => break,
        }
    }
    *last = None;
    std::future::pending().await
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn resume(
        &self,
        request: Request<v1::ResumeRequest>,
    ) -> Result<Response<v1::ResumeResponse>, Status> {
        let peer = self.authorize(&request)?;
        let remote = lifeboat_common::peer::remote_addr(&request);
        let entry = owned_disk(&self.disks, &peer, &request.get_ref().disk_id)?;
        let mut durable = durable_position(&entry).await?;
        if request.get_ref().take_stream {
            // Under the cache lock: a group of an older stream that is being stored now is
            // counted in the answer, and none stores after it (`DiskEntry::stream_owner`). A
            // position question needs no lock (it would wait out a store's fsync).
            let owned = entry.clone();
            let compress = entry.assignment().compression;
            durable = tokio::task::spawn_blocking(move || -> Result<u64, Status> {
                let mut cache = owned
                    .cache
                    .lock()
                    .map_err(|_| Status::internal("cache lock poisoned"))?;
                owned.stream_owner.take(remote)?;
                // What the older stream left held may already be on its way to the master
                // target: it is cached now, and the new stream numbers on after it (a
                // restarted agent would otherwise reuse its seqs for other contents).
                held::store_after_held(&mut cache, &owned, compress, Vec::new())
            })
            .await
            .map_err(|e| Status::internal(format!("resume: {e}")))??;
        }
        let (applied, _) = entry.applied();
        Ok(Response::new(v1::ResumeResponse {
            durable_seq: durable.max(applied),
            applied_seq: applied,
            cache_fill_percent: self.disks.cache.quota.fill_percent(self.disks.cache_used()),
        }))
    }

    /// Asks the disk's master target; the agent cannot reach it directly.
    async fn hashes(
        &self,
        request: Request<v1::HashRequest>,
    ) -> Result<Response<v1::HashResponse>, Status> {
        let peer = self.authorize(&request)?;
        let r = request.into_inner();
        let entry = owned_disk(&self.disks, &peer, &r.disk_id)?;
        let assignment = entry.assignment();
        blockhash::check_span(r.offset, r.length, r.block_size, assignment.size_bytes)
            .map_err(|e| Status::invalid_argument(format!("disk {}: {e}", r.disk_id)))?;
        let mut client = entry.replica_client(&self.disks.identity).map_err(|e| {
            Status::unavailable(format!("master target of disk {}: {e}", r.disk_id))
        })?;
        client.hashes(r).await
    }

    type PushStream = ReceiverStream<Result<IngestAck, Status>>;

    async fn push(
        &self,
        request: Request<Streaming<ChangeBatch>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let peer = self.authorize(&request)?;
        let remote = lifeboat_common::peer::remote_addr(&request);
        let mut groups = Groups::of_call(request);
        let disks = self.disks.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            // The disk this stream last stored for, to tell the agent as soon as the master
            // target has applied more of it (the end of an initial sync waits on that).
            let mut last: Option<AppliedWatch> = None;
            loop {
                // Groups are read ahead while the previous one is stored: transfer and fsync
                // overlap. `Groups::next` is cancel-safe.
                let group = tokio::select! {
                    group = groups.next(GROUP_BYTES) => group,
                    a = applied_since(&disks, &mut last) => {
                        if tx.send(Ok(a)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                let Some(group) = group else { break };
                match store(&disks, &peer, remote, group).await {
                    Ok(acks) => {
                        for a in acks {
                            last = disks.get(&a.disk_id).map(|entry| AppliedWatch {
                                applied: entry.applied.subscribe(),
                                durable: a.durable_seq,
                                reported: a.applied_seq,
                                entry,
                            });
                            if tx.send(Ok(a)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
            if let Some(status) = groups.error() {
                tracing::debug!(agent = %peer.id, "ingest stream ended: {}", status.message());
                // A batch that failed its checksum on arrival: the agent learns why.
                let _ = tx.send(Err(status.clone())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
