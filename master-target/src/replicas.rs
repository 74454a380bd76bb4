//! The replica disks this master target holds, following the configuration server's
//! assignments: a newly assigned disk gets an empty replica (one disk slot), a disk no longer
//! assigned is deleted (its slot freed). Each replica is used from blocking threads behind a
//! mutex; batches of one disk are applied one group at a time, in order. A replica's views
//! are exported over NBD as soon as it is opened.
use crate::exports::Exports;
use crate::replica::{Replica, ReplicaError};
use lifeboat_common::assigned::Assigned;
use lifeboat_common::component::RevocationList;
use lifeboat_proto::v1::DiskAssignment;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

pub struct ReplicaEntry {
    pub disk_id: String,
    pub assignment: RwLock<DiskAssignment>,
    pub replica: Mutex<Replica>,
    /// The connection of the latest `Replica.Status` with `take_stream`: only apply streams
    /// on it may apply (see `lifeboat_common::stream_owner`). Taken and checked under the
    /// replica lock.
    pub stream_owner: lifeboat_common::stream_owner::StreamOwner,
}

impl ReplicaEntry {
    pub fn assignment(&self) -> DiskAssignment {
        self.assignment
            .read()
            .map(|a| a.clone())
            .unwrap_or_default()
    }
}

pub struct Replicas {
    pub dir: PathBuf,
    /// Replica data is written with `O_DIRECT` where possible (`replica_direct_io`).
    direct_io: bool,
    pub revocations: RevocationList,
    pub exports: Exports,
    disks: Assigned<ReplicaEntry>,
}

impl Replicas {
    pub fn new(
        dir: PathBuf,
        direct_io: bool,
        revocations: RevocationList,
        exports: Exports,
    ) -> Arc<Replicas> {
        Arc::new(Replicas {
            dir,
            direct_io,
            revocations,
            exports,
            disks: Assigned::default(),
        })
    }

    pub fn get(&self, disk_id: &str) -> Option<Arc<ReplicaEntry>> {
        self.disks.get(disk_id)
    }

    pub fn all(&self) -> Vec<Arc<ReplicaEntry>> {
        self.disks.all()
    }

    pub fn count(&self) -> usize {
        self.disks.count()
    }

    /// Opens (or creates) the replica of disk `id`, writing its data direct if so configured.
    fn open_replica(&self, id: &str, size_bytes: u64) -> Result<Replica, ReplicaError> {
        let mut replica = Replica::open_or_create(&self.dir.join(id), id, size_bytes)?;
        if self.direct_io && !replica.write_direct()? {
            tracing::info!(disk = %id, "the replica's file system takes no direct writes: writing through the page cache");
        }
        Ok(replica)
    }

    /// Applies the configuration server's list of disks placed on this master target.
    pub fn assign(&self, assignments: Vec<DiskAssignment>) {
        // Replica directories of disks nobody assigns any more (unprotected while we were down).
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("d-") && !assignments.iter().any(|a| a.disk_id == name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                    tracing::info!(disk = %name, "replica of an unprotected disk deleted");
                }
            }
        }
        self.disks.follow(
            assignments,
            |id, entry| {
                if let Ok(replica) = entry.replica.lock() {
                    for view in replica.views() {
                        self.exports.unexport(&view.view_id);
                    }
                    if let Some(f) = &replica.state().failover {
                        self.exports.unexport(&f.view_id);
                    }
                }
                let dir = self.dir.join(id);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => tracing::info!(disk = %id, "disk unprotected: replica deleted, slot freed"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(disk = %id, "cannot delete replica {}: {e}", dir.display()),
                }
            },
            |entry, assignment| {
                if let Ok(mut a) = entry.assignment.write() {
                    *a = assignment;
                }
            },
            |assignment| {
                let id = assignment.disk_id.clone();
                match self.open_replica(&id, assignment.size_bytes) {
                    Ok(replica) => {
                        tracing::info!(disk = %id, applied = replica.state().applied_seq, "replica ready");
                        let entry = Arc::new(ReplicaEntry {
                            disk_id: id,
                            assignment: RwLock::new(assignment),
                            replica: Mutex::new(replica),
                            stream_owner: Default::default(),
                        });
                        self.exports.export_all(&entry);
                        Some(entry)
                    }
                    Err(e) => {
                        tracing::error!(disk = %id, "cannot open replica: {e}");
                        None
                    }
                }
            },
        );
    }
}
