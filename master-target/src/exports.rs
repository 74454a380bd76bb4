//! NBD exports of recovery-point views: one export per view, named after it, served by the
//! master target's NBD server (`nbd_listen`). Every request runs on a blocking thread under
//! the replica's lock, the same lock batches are applied under, so a view never sees half a
//! group.
use crate::replica::ReplicaError;
use crate::replicas::ReplicaEntry;
use std::io;
use std::sync::Arc;

pub struct ViewBackend {
    pub entry: Arc<ReplicaEntry>,
    pub view_id: String,
    pub size: u64,
    /// The opening of the view this export serves (see `Replica::view_generation`).
    pub generation: Option<i64>,
}

fn io_error(e: ReplicaError) -> io::Error {
    match e {
        ReplicaError::Refused(m) => io::Error::new(io::ErrorKind::PermissionDenied, m),
        other => io::Error::other(other.to_string()),
    }
}

impl ViewBackend {
    async fn with_replica<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::replica::Replica, &str) -> Result<T, ReplicaError> + Send + 'static,
    ) -> io::Result<T> {
        let entry = self.entry.clone();
        let id = self.view_id.clone();
        let generation = self.generation;
        tokio::task::spawn_blocking(move || {
            let mut replica = entry
                .replica
                .lock()
                .map_err(|_| io::Error::other("replica lock poisoned"))?;
            if replica.view_generation(&id) != generation {
                return Err(io::Error::other(format!(
                    "view {id} was closed or opened again at another point; reconnect"
                )));
            }
            f(&mut replica, &id).map_err(io_error)
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl nbd::Backend for ViewBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn can_multi_conn(&self) -> bool {
        // Every connection goes through the same replica lock and flush covers all writes.
        true
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.with_replica(move |r, id| {
            let mut buf = vec![0u8; len as usize];
            r.read_view(id, &mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.with_replica(move |r, id| {
            r.write_view(id, offset, Some(&data), data.len() as u64)?;
            if fua {
                r.flush_view(id)?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _no_hole: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.with_replica(move |r, id| {
            r.write_view(id, offset, None, len as u64)?;
            if fua {
                r.flush_view(id)?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.with_replica(|r, id| r.flush_view(id)).await
    }
}

/// The NBD server of views and how clients reach it.
pub struct Exports {
    pub server: nbd::Server,
    /// `host:port` put in the URIs handed out.
    pub advertise: String,
}

impl Exports {
    pub fn uri(&self, view_id: &str) -> String {
        format!("nbd://{}/{view_id}", self.advertise)
    }

    /// Exports a view of `entry` (again: an existing export of that name is replaced).
    pub fn export(&self, entry: &Arc<ReplicaEntry>, view_id: &str) {
        self.server.remove_export(view_id);
        let size = entry.assignment().size_bytes;
        let generation = entry
            .replica
            .lock()
            .ok()
            .and_then(|r| r.view_generation(view_id));
        let backend = ViewBackend {
            entry: entry.clone(),
            view_id: view_id.to_string(),
            size,
            generation,
        };
        let export = nbd::Export::new(view_id, backend)
            .with_description(format!("Lifeboat view of disk {}", entry.disk_id));
        if let Err(e) = self.server.add_export(export) {
            tracing::error!(view = view_id, "cannot export view: {e}");
        }
    }

    pub fn unexport(&self, view_id: &str) {
        self.server.remove_export(view_id);
    }

    /// Exports every view of a replica just opened (views and a failed-over disk outlive
    /// restarts).
    pub fn export_all(&self, entry: &Arc<ReplicaEntry>) {
        let Ok(replica) = entry.replica.lock() else {
            return;
        };
        let mut ids: Vec<String> = replica.views().map(|v| v.view_id.clone()).collect();
        if let Some(f) = &replica.state().failover {
            ids.push(f.view_id.clone());
        }
        drop(replica);
        ids.dedup();
        for id in ids {
            self.export(entry, &id);
        }
    }
}
