//! The replica disks this master target holds, following the configuration server's
//! assignments: a newly assigned disk gets an empty replica (one disk slot), a disk no longer
//! assigned is deleted (its slot freed). Each replica is used from blocking threads behind a
//! mutex; batches of one disk are applied one group at a time, in order.
use crate::replica::Replica;
use lifeboat_common::component::RevocationList;
use lifeboat_proto::v1::DiskAssignment;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

pub struct ReplicaEntry {
    pub disk_id: String,
    pub assignment: RwLock<DiskAssignment>,
    pub replica: Mutex<Replica>,
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
    pub revocations: RevocationList,
    disks: RwLock<HashMap<String, Arc<ReplicaEntry>>>,
}

impl Replicas {
    pub fn new(dir: PathBuf, revocations: RevocationList) -> Arc<Replicas> {
        Arc::new(Replicas {
            dir,
            revocations,
            disks: RwLock::new(HashMap::new()),
        })
    }

    pub fn get(&self, disk_id: &str) -> Option<Arc<ReplicaEntry>> {
        self.disks.read().ok()?.get(disk_id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<ReplicaEntry>> {
        self.disks
            .read()
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.disks.read().map(|d| d.len()).unwrap_or(0)
    }

    /// Applies the configuration server's list of disks placed on this master target.
    pub fn assign(&self, assignments: Vec<DiskAssignment>) {
        let wanted: HashMap<String, DiskAssignment> = assignments
            .into_iter()
            .map(|a| (a.disk_id.clone(), a))
            .collect();
        let Ok(mut disks) = self.disks.write() else {
            return;
        };
        disks.retain(|id, _| {
            if wanted.contains_key(id) {
                return true;
            }
            let dir = self.dir.join(id);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(disk = %id, "disk unprotected: replica deleted, slot freed")
                }
                Err(e) => {
                    tracing::warn!(disk = %id, "cannot delete replica {}: {e}", dir.display())
                }
            }
            false
        });
        // Replica directories of disks nobody assigns any more (unprotected while we were down).
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("d-") && !wanted.contains_key(&name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                    tracing::info!(disk = %name, "replica of an unprotected disk deleted");
                }
            }
        }
        for (id, assignment) in wanted {
            if let Some(entry) = disks.get(&id) {
                if let Ok(mut a) = entry.assignment.write() {
                    *a = assignment;
                }
                continue;
            }
            match Replica::open_or_create(&self.dir.join(&id), &id, assignment.size_bytes) {
                Ok(replica) => {
                    tracing::info!(disk = %id, applied = replica.state().applied_seq, "replica ready");
                    disks.insert(
                        id.clone(),
                        Arc::new(ReplicaEntry {
                            disk_id: id,
                            assignment: RwLock::new(assignment),
                            replica: Mutex::new(replica),
                        }),
                    );
                }
                Err(e) => tracing::error!(disk = %id, "cannot open replica: {e}"),
            }
        }
    }
}
