//! The agent's protected disks and its NBD server. Assignments arrive with every heartbeat: a
//! newly protected disk gets its capture started and is exported over NBD (export name = the
//! disk's name) so the workload can write through the splitter; a disk no longer protected is
//! stopped, unexported and its local state dropped. A disk whose capture cannot start (its
//! source moved, changed size or cannot be opened) is reported with the reason, so `status`
//! and the alerts say why nothing replicates, and is tried again at every heartbeat.
use crate::disk::{DiskAgent, DiskStart};
use crate::settings::{CaptureMode, DiskConfig, Tuning};
use crate::splitter::Splitter;
use lifeboat_common::assigned::Assigned;
use lifeboat_common::component::EarlyReports;
use lifeboat_common::Identity;
use lifeboat_proto::v1::{DiskAssignment, DiskReport};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

pub struct Agent {
    pub identity: Arc<Identity>,
    pub state_dir: PathBuf,
    pub nbd: nbd::Server,
    pub cancel: CancellationToken,
    pub tuning: Tuning,
    /// Each configured disk (by name): its path and how it is captured.
    configured: HashMap<String, DiskConfig>,
    /// Protected disks whose capture could not start, by disk id: why.
    not_started: Mutex<HashMap<String, String>>,
    /// This machine's answer to a group barrier ("held:<id>", ...), reported with every disk.
    pub barrier_answer: std::sync::Mutex<String>,
    /// Notified when a disk changes phase: the configuration server hears of it at once.
    pub early_reports: Arc<EarlyReports>,
    disks: Assigned<DiskAgent>,
}

impl Agent {
    pub fn new(
        identity: Arc<Identity>,
        tuning: Tuning,
        disks: &[DiskConfig],
        state_dir: PathBuf,
        cancel: CancellationToken,
    ) -> Arc<Agent> {
        Arc::new(Agent {
            identity,
            tuning,
            configured: disks.iter().map(|d| (d.name.clone(), d.clone())).collect(),
            not_started: Mutex::default(),
            barrier_answer: Default::default(),
            early_reports: Default::default(),
            state_dir,
            nbd: nbd::Server::new(nbd::ServerConfig::default()),
            cancel,
            disks: Assigned::default(),
        })
    }

    pub fn disks(&self) -> Vec<Arc<DiskAgent>> {
        let mut disks = self.disks.all();
        // One lock order for every multi-disk tag.
        disks.sort_by(|a, b| a.disk_id.cmp(&b.disk_id));
        disks
    }

    pub fn reports(&self) -> Vec<DiskReport> {
        let barrier = self.barrier_answer();
        let mut reports: Vec<DiskReport> = self
            .disks
            .all()
            .iter()
            .filter_map(|d| d.report())
            .map(|r| DiskReport {
                barrier: barrier.clone(),
                ..r
            })
            .collect();
        if let Ok(failed) = self.not_started.lock() {
            reports.extend(failed.iter().map(|(id, why)| DiskReport {
                disk_id: id.clone(),
                phase: lifeboat_common::facts::CANNOT_CAPTURE_PHASE.into(),
                error: why.clone(),
                ..Default::default()
            }));
        }
        reports
    }

    /// Records why disk `id`'s capture could not start (`None`: it started, or is gone), and
    /// logs it when the reason is new.
    fn set_not_started(&self, id: &str, why: Option<String>) {
        let Ok(mut failed) = self.not_started.lock() else {
            return;
        };
        match why {
            Some(why) => {
                if failed.get(id) != Some(&why) {
                    tracing::error!(disk = %id, "cannot start capture: {why}");
                    failed.insert(id.to_string(), why);
                }
            }
            None => {
                failed.remove(id);
            }
        }
    }

    pub fn barrier_answer(&self) -> String {
        self.barrier_answer
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// A group barrier concerns this machine (it is told one, or still answers one).
    pub fn in_barrier(&self) -> bool {
        !self.barrier_answer().is_empty()
            || self
                .disks
                .all()
                .iter()
                .any(|d| !d.assignment().barrier.is_empty())
    }

    pub fn assign(&self, assignments: Vec<DiskAssignment>) {
        self.disks.follow(
            assignments,
            |id, disk| {
                self.set_not_started(id, None);
                disk.stop.cancel();
                self.nbd.remove_export(&disk.assignment().disk_name);
                let _ = std::fs::remove_dir_all(self.state_dir.join(id));
                tracing::info!(disk = %id, "disk no longer protected: capture stopped, export removed");
            },
            |disk, assignment| disk.set_assignment(assignment),
            |assignment| {
                let (id, name) = (assignment.disk_id.clone(), assignment.disk_name.clone());
                let config = self.configured.get(&name);
                if let Err(why) = check_source(config, &assignment) {
                    self.set_not_started(&id, Some(why));
                    return None;
                }
                let mode = config.map(|c| c.mode).unwrap_or_default();
                let start = DiskStart {
                    identity: self.identity.clone(),
                    assignment,
                    state_dir: self.state_dir.join(&id),
                    tuning: self.tuning.clone(),
                    mode,
                    stop: self.cancel.child_token(),
                    early_reports: self.early_reports.clone(),
                };
                let disk = match DiskAgent::start(start) {
                    Ok(disk) => disk,
                    Err(e) => {
                        self.set_not_started(&id, Some(format!("{e:#}")));
                        return None;
                    }
                };
                self.set_not_started(&id, None);
                if mode == CaptureMode::Scan {
                    tracing::info!(disk = %id, "disk protected: capturing changes by periodic scans");
                    return Some(disk);
                }
                let export = nbd::Export::new(name.clone(), Splitter(disk.capture.clone()))
                    .with_description(format!("Lifeboat-protected disk {id}"));
                if let Err(e) = self.nbd.add_export(export) {
                    tracing::error!(disk = %id, "cannot export {name} over NBD: {e}");
                }
                tracing::info!(disk = %id, export = %name, "disk protected: capturing writes through NBD");
                Some(disk)
            },
        );
    }
}

/// Whether the disk an assignment protects is still the one this agent is configured with:
/// the same path (the protected one is what the replica holds; replicating another file
/// into it, or capturing writes for a path the workload no longer uses, would be silent
/// damage) and the same size (the replica's size is fixed at protection).
fn check_source(config: Option<&DiskConfig>, assignment: &DiskAssignment) -> Result<(), String> {
    let protected = Path::new(&assignment.source_path);
    let name = &assignment.disk_name;
    if let Some(config) = config {
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        if !same(&config.path, protected) {
            return Err(format!(
                "disk {name} is protected from {}, but this agent is configured with {} for \
                 it; configure {name} with {} again, or unprotect {} and protect it again to \
                 replicate the new path (a new initial sync)",
                protected.display(),
                config.path.display(),
                protected.display(),
                assignment.machine
            ));
        }
    }
    let size = crate::settings::disk_size(protected)
        .map_err(|e| format!("cannot open disk {name} ({}): {e}", protected.display()))?;
    if size != assignment.size_bytes {
        return Err(format!(
            "disk {name} ({}) is {size} bytes now, but was protected at {} bytes; its replica \
             keeps the protected size: restore that size, or unprotect {} and protect it \
             again (a new initial sync)",
            protected.display(),
            assignment.size_bytes,
            assignment.machine
        ));
    }
    Ok(())
}
