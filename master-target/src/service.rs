//! Replica service: process servers send change batches; each is checked (the caller is the
//! disk's process server, checksum, extents inside the disk, next in sequence), applied, and
//! acknowledged once durable. Batches that arrive together are applied with one flush. A
//! replayed batch is acknowledged without being applied again; a gap or a bad batch ends the
//! stream with an error and nothing from it on is applied.
use crate::replicas::{ReplicaEntry, Replicas};
use lifeboat_common::batch;
use lifeboat_common::blockhash;
use lifeboat_common::facts::MT_SPACE_RESERVE;
use lifeboat_common::group::Groups;
use lifeboat_common::peer::{require_role, Peer};
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, replica_server::Replica as ReplicaRpc, ApplyAck, ChangeBatch};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Most payload bytes applied with one flush.
const GROUP_BYTES: usize = 32 * 1024 * 1024;

pub struct ReplicaService {
    replicas: Arc<Replicas>,
}

impl ReplicaService {
    pub fn new(replicas: Arc<Replicas>) -> Self {
        ReplicaService { replicas }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        let peer = require_role(request, &[Role::ProcessServer])?;
        if self.replicas.revocations.is_revoked(&peer.id) {
            return Err(Status::unauthenticated(format!(
                "identity {} was revoked",
                peer.id
            )));
        }
        Ok(peer)
    }
}

fn owned(replicas: &Replicas, peer: &Peer, disk_id: &str) -> Result<Arc<ReplicaEntry>, Status> {
    let entry = replicas.get(disk_id).ok_or_else(|| {
        Status::not_found(format!(
            "disk {disk_id} is not assigned to this master target"
        ))
    })?;
    replicated_through(&entry, &peer.id)?;
    Ok(entry)
}

/// Refuses a process server other than the one `entry`'s disk is replicated through.
fn replicated_through(entry: &ReplicaEntry, process_server: &str) -> Result<(), Status> {
    if entry.assignment().process_server_id != process_server {
        return Err(Status::permission_denied(format!(
            "disk {} is replicated through another process server",
            entry.disk_id
        )));
    }
    Ok(())
}

/// Checks and applies a group of one disk's batches; returns the ack.
/// `remote`: the stream's connection (see [`ReplicaEntry::stream_owner`]).
async fn apply_group(
    entry: Arc<ReplicaEntry>,
    peer: &Peer,
    remote: Option<std::net::SocketAddr>,
    batches: Vec<ChangeBatch>,
    replicas_dir: std::path::PathBuf,
) -> Result<ApplyAck, Status> {
    let size = entry.assignment().size_bytes;
    let sender = peer.id.clone();
    tokio::task::spawn_blocking(move || {
        let mut replica = entry
            .replica
            .lock()
            .map_err(|_| Status::internal("replica lock poisoned"))?;
        // Checked again under the lock: the disk may have moved to another process server
        // since (a switch), whose `Status` reads the applied seq under this lock. Either this
        // group is applied before that read, or it is refused.
        replicated_through(&entry, &sender)?;
        entry.stream_owner.check(remote, || {
            format!(
                "disk {}: a newer stream of the process server owns the disk; resume",
                entry.disk_id
            )
        })?;
        let mut expected = replica.state().applied_seq + 1;
        let mut fresh = Vec::new();
        let mut error = None;
        let disk_id = replica.state().disk_id.clone();
        for b in batches {
            if b.disk_id != disk_id {
                error = Some(Status::invalid_argument(format!(
                    "a batch for disk {} arrived in a group for disk {disk_id}",
                    b.disk_id
                )));
                break;
            }
            // The checksum was checked as the batch arrived (`Groups`).
            if let Err(e) = batch::verify_fields(&b, size) {
                error = Some(e.status());
                break;
            }
            if b.seq < expected {
                continue; // replayed: already applied
            }
            if b.seq > expected {
                error = Some(Status::failed_precondition(format!(
                    "disk {}: batch {} arrived but {expected} is next",
                    b.disk_id, b.seq
                )));
                break;
            }
            expected += 1;
            fresh.push(b);
        }
        if !fresh.is_empty() {
            let bytes: u64 = fresh.iter().map(batch::covered_bytes).sum();
            // The group may need its size in the replica and again in the journal.
            let (free, _) = lifeboat_common::facts::space(&replicas_dir);
            if free < MT_SPACE_RESERVE + 2 * bytes {
                return Err(Status::resource_exhausted(format!(
                    "master target is out of space for disk {disk_id}: {} MiB free, and it \
                     keeps {} MiB free plus twice the {} MiB of the batches waiting (replica \
                     and retention journal); add space or shorten the policy's retention \
                     (the batches stay in the process server's cache)",
                    free >> 20,
                    MT_SPACE_RESERVE >> 20,
                    (bytes + (1 << 20) - 1) >> 20
                )));
            }
            let started = Instant::now();
            replica.apply(&fresh).map_err(crate::pit::replica_status)?;
            metrics::histogram!("lifeboat_mt_apply_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("lifeboat_mt_apply_bytes_total").increment(bytes);
        }
        if let Some(status) = error {
            return Err(status);
        }
        let state = replica.state();
        Ok(ApplyAck {
            disk_id: state.disk_id.clone(),
            applied_seq: state.applied_seq,
            applied_write_unix_ms: state.applied_write_unix_ms,
        })
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
}

#[tonic::async_trait]
impl ReplicaRpc for ReplicaService {
    async fn status(
        &self,
        request: Request<v1::ResumeRequest>,
    ) -> Result<Response<v1::ReplicaStatus>, Status> {
        let peer = self.authorize(&request)?;
        let remote = lifeboat_common::peer::remote_addr(&request);
        let entry = owned(&self.replicas, &peer, &request.get_ref().disk_id)?;
        let replica = entry
            .replica
            .lock()
            .map_err(|_| Status::internal("replica lock poisoned"))?;
        if request.get_ref().take_stream {
            // Under the replica lock: a group of an older stream being applied now is in the
            // answer, and none applies after it.
            entry.stream_owner.take(remote)?;
        }
        let state = replica.state();
        Ok(Response::new(v1::ReplicaStatus {
            disk_id: state.disk_id.clone(),
            applied_seq: state.applied_seq,
            applied_write_unix_ms: state.applied_write_unix_ms,
            size_bytes: state.size_bytes,
        }))
    }

    async fn hashes(
        &self,
        request: Request<v1::HashRequest>,
    ) -> Result<Response<v1::HashResponse>, Status> {
        let peer = self.authorize(&request)?;
        let r = request.into_inner();
        let entry = owned(&self.replicas, &peer, &r.disk_id)?;
        let size = entry.assignment().size_bytes;
        blockhash::check_span(r.offset, r.length, r.block_size, size)
            .map_err(|e| Status::invalid_argument(format!("disk {}: {e}", r.disk_id)))?;
        tokio::task::spawn_blocking(move || {
            let replica = entry
                .replica
                .lock()
                .map_err(|_| Status::internal("replica lock poisoned"))?;
            let hashes = replica
                .hashes(r.offset, r.length, r.block_size as u64)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(Response::new(v1::HashResponse {
                disk_id: r.disk_id,
                applied_seq: replica.state().applied_seq,
                hashes: hashes.iter().map(|h| h.to_vec()).collect(),
            }))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    type ApplyStream = ReceiverStream<Result<ApplyAck, Status>>;

    async fn apply(
        &self,
        request: Request<Streaming<ChangeBatch>>,
    ) -> Result<Response<Self::ApplyStream>, Status> {
        let peer = self.authorize(&request)?;
        let remote = lifeboat_common::peer::remote_addr(&request);
        let mut groups = Groups::of_call(request);
        let replicas = self.replicas.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            // Groups are read ahead while the previous one is applied: transfer and flush overlap.
            while let Some(group) = groups.next(GROUP_BYTES).await {
                let disk_id = group.first().map(|b| b.disk_id.clone()).unwrap_or_default();
                let result = match owned(&replicas, &peer, &disk_id) {
                    Ok(entry) => {
                        apply_group(entry, &peer, remote, group, replicas.dir.clone()).await
                    }
                    Err(e) => Err(e),
                };
                if let Err(status) = &result {
                    tracing::warn!(disk = %disk_id, "batches refused: {}", status.message());
                }
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
            }
            // A batch that failed its checksum on arrival ends the stream: say so. (Other
            // errors are the process server going away: nobody to tell.)
            if let Some(status) = groups.error() {
                if status.code() == tonic::Code::DataLoss {
                    tracing::warn!("batches refused: {}", status.message());
                } else {
                    tracing::debug!("apply stream ended: {}", status.message());
                }
                let _ = tx.send(Err(status.clone())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
