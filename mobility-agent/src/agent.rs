//! The agent's protected disks and its NBD server. Assignments arrive with every heartbeat: a
//! newly protected disk gets its capture started and is exported over NBD (export name = the
//! disk's name) so the workload can write through the splitter; a disk no longer protected is
//! stopped, unexported and its local state dropped.
use crate::disk::{DiskAgent, DiskStart};
use crate::settings::{CaptureMode, DiskConfig, Tuning};
use crate::splitter::Splitter;
use lifeboat_common::assigned::Assigned;
use lifeboat_common::component::EarlyReports;
use lifeboat_common::Identity;
use lifeboat_proto::v1::{DiskAssignment, DiskReport};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub struct Agent {
    pub identity: Arc<Identity>,
    pub state_dir: PathBuf,
    pub nbd: nbd::Server,
    pub cancel: CancellationToken,
    pub tuning: Tuning,
    /// How each disk (by name) is captured.
    modes: HashMap<String, CaptureMode>,
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
            modes: disks.iter().map(|d| (d.name.clone(), d.mode)).collect(),
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
        self.disks
            .all()
            .iter()
            .filter_map(|d| d.report())
            .map(|r| DiskReport {
                barrier: barrier.clone(),
                ..r
            })
            .collect()
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
                disk.stop.cancel();
                self.nbd.remove_export(&disk.assignment().disk_name);
                let _ = std::fs::remove_dir_all(self.state_dir.join(id));
                tracing::info!(disk = %id, "disk no longer protected: capture stopped, export removed");
            },
            |disk, assignment| disk.set_assignment(assignment),
            |assignment| {
                let (id, name) = (assignment.disk_id.clone(), assignment.disk_name.clone());
                let mode = self.modes.get(&name).copied().unwrap_or_default();
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
                        tracing::error!(disk = %id, "cannot start capture: {e:#}");
                        return None;
                    }
                };
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
