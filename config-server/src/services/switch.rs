//! `Protection.SwitchProcessServer`: moves a protected machine to another process server
//! (DESIGN §8). The move itself is a job the reconciler carries out (`crate::switching`):
//! the current process server drains first, so the new one picks up at the next seq and
//! nothing is resynced. `force` moves at once, for a process server that is down: the agent
//! then finds acknowledged batches missing and resyncs what only that cache held.
use super::protection::{job_info, new_job, result_status, ProtectionService};
use crate::node::storage_status;
use crate::placement;
use crate::state::protection::JobState;
use crate::state::Command;
use lifeboat_common::Role;
use lifeboat_proto::v1;
use tonic::Status;

impl ProtectionService {
    pub(super) async fn switch(&self, req: v1::SwitchRequest) -> Result<v1::JobInfo, Status> {
        let state = self.node.state();
        let machine = state
            .machine(&req.machine)
            .map_err(storage_status)?
            .ok_or_else(|| self.not_protected(&req.machine))?;
        if machine.recovery.failover.is_some() {
            return Err(Status::failed_precondition(format!(
                "{} is failed over: nothing replicates through a process server",
                req.machine
            )));
        }
        if req.to.is_empty() {
            return Err(Status::invalid_argument(
                "name the process server to move to (--to NAME)",
            ));
        }
        let machines = state.machines().map_err(storage_status)?;
        let to = placement::choose(
            Role::ProcessServer,
            &req.to,
            &self.candidates()?,
            &machines,
            machine.disks.len() as u32,
        )
        .map_err(Status::failed_precondition)?;
        let from = state
            .identity(&machine.ps_id)
            .map_err(storage_status)?
            .ok_or_else(|| Status::internal("the machine's process server is not registered"))?;
        if to.id == from.id {
            return Err(Status::failed_precondition(format!(
                "{} already replicates through {}",
                req.machine, to.name
            )));
        }
        let (_, _, from_connected) = self.node.live_view(&from);
        if !from_connected && !req.force {
            return Err(Status::failed_precondition(format!(
                "{} is not connected, so it cannot forward what it holds for {}: start it again \
                 and retry, or move now with --force (the regions written since the replicas' \
                 position are then compared with them and whatever only its cache held is \
                 shipped again)",
                from.name, req.machine
            )));
        }
        // With --force the machine moves as the job starts: only "resume" is left to watch.
        let (drain, moved, resume, drain_detail) = if req.force {
            let detail = format!("--force: {} not waited for", from.name);
            (
                JobState::Skipped,
                JobState::Succeeded,
                JobState::Running,
                detail,
            )
        } else {
            let detail = format!(
                "{} forwards what it holds for {} to the master target",
                from.name, req.machine
            );
            (
                JobState::Running,
                JobState::Pending,
                JobState::Pending,
                detail,
            )
        };
        let steps = [
            ("drain", drain, drain_detail),
            ("switch", moved, format!("{} → {}", from.name, to.name)),
            (
                "resume",
                resume,
                format!("the agent ships through {}", to.name),
            ),
        ];
        let job = new_job("switch", &req.machine, &steps);
        result_status(
            self.node
                .write(Command::StartSwitch {
                    machine: req.machine.clone(),
                    to_ps: to.id.clone(),
                    force: req.force,
                    job: job.clone(),
                })
                .await?,
        )?;
        tracing::info!(machine = %req.machine, from = %from.name, to = %to.name, force = req.force,
            job = %job.id, "process server switch started");
        Ok(job_info(&job))
    }
}
