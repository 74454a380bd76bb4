//! The set of disks a component handles, kept equal to the configuration server's list of
//! assignments (sent with every heartbeat reply). Process servers, master targets and agents
//! each keep one, with their own per-disk state `T`; this module owns the bookkeeping — what
//! is new, what changed, what is gone — and they supply what to do in each case.
use lifeboat_proto::v1::DiskAssignment;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub struct Assigned<T> {
    disks: RwLock<HashMap<String, Arc<T>>>,
}

impl<T> Default for Assigned<T> {
    fn default() -> Self {
        Assigned {
            disks: RwLock::new(HashMap::new()),
        }
    }
}

impl<T> Assigned<T> {
    pub fn get(&self, disk_id: &str) -> Option<Arc<T>> {
        self.disks.read().ok()?.get(disk_id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<T>> {
        self.disks
            .read()
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.disks.read().map(|d| d.len()).unwrap_or(0)
    }

    /// Makes the set match `assignments`: `removed` is called for each disk no longer
    /// assigned (then dropped), `updated` for each still assigned (with its current
    /// assignment), `created` for each new one (`None` leaves it out, to be tried again at the
    /// next heartbeat).
    pub fn follow(
        &self,
        assignments: Vec<DiskAssignment>,
        mut removed: impl FnMut(&str, &T),
        mut updated: impl FnMut(&T, DiskAssignment),
        mut created: impl FnMut(DiskAssignment) -> Option<Arc<T>>,
    ) {
        let mut wanted: HashMap<String, DiskAssignment> = assignments
            .into_iter()
            .map(|a| (a.disk_id.clone(), a))
            .collect();
        let Ok(mut disks) = self.disks.write() else {
            return;
        };
        disks.retain(|id, disk| {
            if wanted.contains_key(id) {
                return true;
            }
            removed(id, disk);
            false
        });
        for (id, disk) in disks.iter() {
            if let Some(assignment) = wanted.remove(id) {
                updated(disk, assignment);
            }
        }
        for (id, assignment) in wanted {
            if let Some(disk) = created(assignment) {
                disks.insert(id, disk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(id: &str, size: u64) -> DiskAssignment {
        DiskAssignment {
            disk_id: id.into(),
            size_bytes: size,
            ..Default::default()
        }
    }

    #[test]
    fn follows_additions_updates_and_removals() {
        let set: Assigned<RwLock<u64>> = Assigned::default();
        let mut log = Vec::new();
        set.follow(
            vec![a("d1", 1), a("d2", 2)],
            |_, _| {},
            |_, _| {},
            |x| Some(Arc::new(RwLock::new(x.size_bytes))),
        );
        assert_eq!(set.count(), 2);
        set.follow(
            vec![a("d2", 20), a("d3", 3)],
            |id, _| log.push(format!("removed {id}")),
            |d, x| *d.write().unwrap() = x.size_bytes,
            |x| (x.disk_id != "d3").then(|| Arc::new(RwLock::new(0))),
        );
        assert_eq!(log, ["removed d1"]);
        assert_eq!(*set.get("d2").unwrap().read().unwrap(), 20);
        assert!(
            set.get("d3").is_none(),
            "creation refused: tried again next time"
        );
        assert_eq!(set.count(), 1);
    }
}
