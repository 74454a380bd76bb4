//! The `PointInTime` service: what configuration servers ask of a master target for recovery —
//! the recovery points of its disks, views of them (exported over NBD), a view written out as
//! a standalone VHD, and a failover's commit. Configuration-server certificates only.
use crate::replica::{Replica, ReplicaError};
use crate::replicas::{ReplicaEntry, Replicas};
use crate::views::{ViewKind, ViewSpec};
use lifeboat_common::peer::require_role;
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, point_in_time_server::PointInTime};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Materialising reads and writes this much per step (and takes the replica lock only for
/// the read, so replication goes on).
const MATERIALIZE_CHUNK: u64 = 4 * 1024 * 1024;
/// Blocks of this size that read as zeros are not written to a materialised VHD.
const ZERO_BLOCK: usize = 64 * 1024;

pub struct PitService {
    replicas: Arc<Replicas>,
}

impl PitService {
    pub fn new(replicas: Arc<Replicas>) -> Self {
        PitService { replicas }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let peer = require_role(request, &[Role::ConfigServer])?;
        if self.replicas.revocations.is_revoked(&peer.id) {
            return Err(Status::unauthenticated(format!(
                "identity {} was revoked",
                peer.id
            )));
        }
        Ok(())
    }

    fn entry(&self, disk_id: &str) -> Result<Arc<ReplicaEntry>, Status> {
        self.replicas.get(disk_id).ok_or_else(|| {
            Status::not_found(format!(
                "disk {disk_id} is not assigned to this master target"
            ))
        })
    }
}

pub fn replica_status(e: ReplicaError) -> Status {
    match e {
        ReplicaError::Refused(m) => Status::failed_precondition(m),
        other => Status::unavailable(other.to_string()),
    }
}

/// Runs `f` on the locked replica on a blocking thread.
async fn locked<T: Send + 'static>(
    entry: Arc<ReplicaEntry>,
    f: impl FnOnce(&mut Replica) -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || {
        let mut replica = entry
            .replica
            .lock()
            .map_err(|_| Status::internal("replica lock poisoned"))?;
        f(&mut replica).map_err(replica_status)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
}

pub fn disk_points(replica: &Replica) -> v1::DiskPoints {
    let state = replica.state();
    v1::DiskPoints {
        disk_id: state.disk_id.clone(),
        applied_seq: state.applied_seq,
        applied_write_unix_ms: state.applied_write_unix_ms,
        journal_bytes: replica.journal_bytes(),
        points: replica
            .points()
            .into_iter()
            .map(|p| v1::DiskPoint {
                seq: p.seq,
                tag: p.tag,
                time_unix_ms: p.time_ms,
            })
            .collect(),
        failover_view: state
            .failover
            .as_ref()
            .map(|f| f.view_id.clone())
            .unwrap_or_default(),
        failover_committed: state.failover.as_ref().is_some_and(|f| f.committed),
        failover_written_bytes: state
            .failover
            .as_ref()
            .filter(|f| !f.committed)
            .map_or(0, |f| replica.view_written_bytes(&f.view_id)),
        failover_seq: state.failover.as_ref().map_or(0, |f| f.point_seq),
    }
}

#[tonic::async_trait]
impl PointInTime for PitService {
    async fn list_points(
        &self,
        request: Request<v1::DiskPointsRequest>,
    ) -> Result<Response<v1::DiskPointsResponse>, Status> {
        self.authorize(&request)?;
        let mut disks = Vec::new();
        for id in &request.get_ref().disk_ids {
            let entry = self.entry(id)?;
            disks.push(locked(entry, |r| Ok(disk_points(r))).await?);
        }
        Ok(Response::new(v1::DiskPointsResponse { disks }))
    }

    async fn open_view(
        &self,
        request: Request<v1::OpenViewRequest>,
    ) -> Result<Response<v1::ViewInfo>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let entry = self.entry(&r.disk_id)?;
        let size = entry.assignment().size_bytes;
        let view_id = r.view_id.clone();
        let started = std::time::Instant::now();
        let (point_seq, read_bytes) = locked(entry.clone(), move |replica| {
            let point_seq = if r.latest {
                replica.state().applied_seq
            } else {
                r.point_seq
            };
            let read_bytes = replica.open_view(ViewSpec {
                view_id: r.view_id,
                kind: if r.failover {
                    ViewKind::Failover
                } else {
                    ViewKind::Test
                },
                point_seq,
                created_ms: lifeboat_common::now_ms(),
            })?;
            Ok((point_seq, read_bytes))
        })
        .await?;
        self.replicas.exports.export(&entry, &view_id);
        metrics::counter!("lifeboat_mt_view_open_read_bytes_total", "disk" => entry.disk_id.clone())
            .increment(read_bytes);
        metrics::histogram!("lifeboat_mt_view_open_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(disk = %entry.disk_id, view = %view_id, point_seq, read_bytes,
            "view opened");
        Ok(Response::new(v1::ViewInfo {
            nbd_uri: self.replicas.exports.uri(&view_id),
            view_id,
            disk_id: entry.disk_id.clone(),
            point_seq,
            size_bytes: size,
        }))
    }

    async fn close_view(
        &self,
        request: Request<v1::ViewRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let entry = self.entry(&r.disk_id)?;
        let id = r.view_id.clone();
        locked(entry, move |replica| replica.close_view(&id)).await?;
        // Only once closed: a refused close (a committed failover) keeps serving the disk.
        self.replicas.exports.unexport(&r.view_id);
        tracing::info!(disk = %r.disk_id, view = %r.view_id, "view closed");
        Ok(Response::new(v1::Empty {}))
    }

    type MaterializeStream = ReceiverStream<Result<v1::MaterializeProgress, Status>>;

    async fn materialize(
        &self,
        request: Request<v1::ViewRequest>,
    ) -> Result<Response<Self::MaterializeStream>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let entry = self.entry(&r.disk_id)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            if let Err(status) = materialize(&entry, &r.view_id, &tx) {
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn commit_failover(
        &self,
        request: Request<v1::ViewRequest>,
    ) -> Result<Response<v1::ViewInfo>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let entry = self.entry(&r.disk_id)?;
        let id = r.view_id.clone();
        let point_seq = locked(entry.clone(), move |replica| {
            replica.commit_failover(&id)?;
            Ok(replica.state().failover.as_ref().map_or(0, |f| f.point_seq))
        })
        .await?;
        // Same export name, now backed by the replica itself.
        self.replicas.exports.export(&entry, &r.view_id);
        tracing::info!(disk = %r.disk_id, view = %r.view_id, "failover committed");
        Ok(Response::new(v1::ViewInfo {
            nbd_uri: self.replicas.exports.uri(&r.view_id),
            view_id: r.view_id,
            disk_id: r.disk_id,
            point_seq,
            size_bytes: entry.assignment().size_bytes,
        }))
    }
}

/// Writes the view to a new dynamic VHD next to it (`disk.vhd`), through `disk.vhd.partial`,
/// which is deleted if the copy fails or its caller goes away.
fn materialize(
    entry: &ReplicaEntry,
    view_id: &str,
    tx: &mpsc::Sender<Result<v1::MaterializeProgress, Status>>,
) -> Result<(), Status> {
    let dir = entry
        .replica
        .lock()
        .map_err(|_| Status::internal("replica lock poisoned"))?
        .view_dir_path(view_id);
    let tmp = dir.join(crate::views::PARTIAL_COPY_FILE);
    let result = copy_view(entry, view_id, &dir.join(crate::views::COPY_FILE), &tmp, tx);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Progress goes to the caller; one that went away (its job interrupted) stops the copy.
fn progress(
    tx: &mpsc::Sender<Result<v1::MaterializeProgress, Status>>,
    p: v1::MaterializeProgress,
) -> Result<(), Status> {
    tx.blocking_send(Ok(p))
        .map_err(|_| Status::cancelled("the caller went away; the copy was stopped"))
}

fn copy_view(
    entry: &ReplicaEntry,
    view_id: &str,
    path: &std::path::Path,
    tmp: &std::path::Path,
    tx: &mpsc::Sender<Result<v1::MaterializeProgress, Status>>,
) -> Result<(), Status> {
    let lock = || {
        entry
            .replica
            .lock()
            .map_err(|_| Status::internal("replica lock poisoned"))
    };
    let (ranges, size) = {
        let replica = lock()?;
        let ranges = replica.view_extent(view_id).map_err(replica_status)?;
        (ranges, replica.image.size())
    };
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let _ = std::fs::remove_file(tmp);
    let mut out = vhd::Image::create(tmp, &vhd::CreateOptions::dynamic(size))
        .map_err(|e| Status::unavailable(format!("cannot create {}: {e}", tmp.display())))?;
    let mut done = 0u64;
    let mut buf = Vec::new();
    for (offset, len) in ranges {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(MATERIALIZE_CHUNK);
            buf.resize(n as usize, 0);
            lock()?
                .read_view(view_id, &mut buf, at)
                .map_err(replica_status)?;
            for (i, block) in buf.chunks(ZERO_BLOCK).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    out.write_at(block, at + (i * ZERO_BLOCK) as u64)
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                }
            }
            at += n;
            done += n;
            progress(
                tx,
                v1::MaterializeProgress {
                    done_bytes: done,
                    total_bytes: total,
                    path: String::new(),
                },
            )?;
        }
    }
    out.close()
        .map_err(|e| Status::unavailable(e.to_string()))?;
    std::fs::rename(tmp, path).map_err(|e| Status::unavailable(e.to_string()))?;
    if let Some(dir) = path.parent() {
        lifeboat_common::fsutil::fsync_dir(dir).map_err(|e| Status::unavailable(e.to_string()))?;
    }
    // Absolute: a path relative to the master target's working directory means nothing to
    // the operator reading it in the job.
    let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let _ = tx.blocking_send(Ok(v1::MaterializeProgress {
        done_bytes: done,
        total_bytes: total,
        path: shown.display().to_string(),
    }));
    Ok(())
}
