//! Protection service: policies, protect/unprotect (as jobs), replication status and jobs.
//! Admin certificates only. Placement and lag are computed here from the registry and the
//! leader's soft state; every change goes through Raft.
use super::policy_rules::policy_from_spec;
use crate::node::{storage_status, Node};
use crate::placement::{self, Candidate};
use crate::state::model::{now_ms, IdentityRecord};
use crate::state::protection::{
    Job, JobState, JobStep, MachineRecovery, Policy, ProtectedDisk, ProtectedMachine,
    ReplicationState,
};
use crate::state::{Command, CommandResult};
use crate::status_wait;
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, protection_server::Protection};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

pub struct ProtectionService {
    pub(super) node: Arc<Node>,
}

impl ProtectionService {
    pub fn new(node: Arc<Node>) -> Self {
        ProtectionService { node }
    }

    fn policy_info(&self, policy: Policy) -> Result<v1::PolicyInfo, Status> {
        let machines = self
            .node
            .state()
            .machines()
            .map_err(storage_status)?
            .into_iter()
            .filter(|m| m.policy == policy.name)
            .map(|m| m.name)
            .collect();
        Ok(v1::PolicyInfo {
            spec: Some(v1::PolicySpec {
                name: policy.name,
                rpo_threshold_secs: policy.rpo_threshold_secs,
                retention_secs: policy.retention_secs,
                app_consistent_every_secs: policy.app_consistent_every_secs,
                crash_consistent_every_secs: policy.crash_consistent_every_secs,
                compression: policy.compression,
            }),
            failback_of: policy.failback_of.unwrap_or_default(),
            created_at_unix_ms: policy.created_at_ms,
            machines,
        })
    }

    /// NOT_FOUND for a machine that is not protected, saying whether an agent of that name
    /// is registered at all (a typo) or the machine is known and just not protected.
    pub(super) fn not_protected(&self, name: &str) -> Status {
        let identities = self.node.state().identities().unwrap_or_default();
        let known = agent_named(&identities, name).is_some();
        let revoked = identities
            .iter()
            .any(|r| r.role == Role::Agent && r.name == name && r.revoked.is_some());
        if !known && revoked {
            Status::not_found(format!(
                "{name} is not protected, and its agent's identity is revoked: register the \
                 agent again (`mobility-agent register --force`), then protect it"
            ))
        } else if known {
            Status::not_found(format!(
                "{name} is not protected; protect it with `lifeboat protect {name} --policy POLICY`"
            ))
        } else {
            Status::not_found(format!(
                "no machine named {name}: no agent of that name is registered (see `lifeboat servers list`)"
            ))
        }
    }

    fn find_policy(&self, name: &str) -> Result<Policy, Status> {
        self.node
            .state()
            .policy(name)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::not_found(format!("no policy {name:?}; see `lifeboat policy list`"))
            })
    }

    /// A policy a machine may be protected with: not a failback twin, which is the reverse
    /// direction's (reprotect and failback choose it; an operator never does).
    fn replication_policy(&self, name: &str) -> Result<Policy, Status> {
        let policy = self.find_policy(name)?;
        match &policy.failback_of {
            Some(forward) => Err(Status::invalid_argument(format!(
                "{name} is the failback twin of {forward}, for replication back to the \
                 original site after a failover; protect with {forward} (or another policy)"
            ))),
            None => Ok(policy),
        }
    }

    pub(super) fn candidates(&self) -> Result<Vec<Candidate>, Status> {
        Ok(self
            .node
            .state()
            .identities()
            .map_err(storage_status)?
            .into_iter()
            .filter(|r| matches!(r.role, Role::ProcessServer | Role::MasterTarget))
            .map(|record| {
                let (_, facts, connected) = self.node.live_view(&record);
                Candidate {
                    connected,
                    free_bytes: facts.free_bytes,
                    slots_total: facts.disk_slots_total,
                    record,
                }
            })
            .collect())
    }
}

/// The registered, unrevoked agent of machine `name` (machines are named after their agent).
fn agent_named<'a>(identities: &'a [IdentityRecord], name: &str) -> Option<&'a IdentityRecord> {
    identities
        .iter()
        .find(|r| r.role == Role::Agent && r.name == name && r.revoked.is_none())
}

/// Turns a refusal or a missing record into the matching gRPC status.
pub fn result_status(result: CommandResult) -> Result<(), Status> {
    match result {
        CommandResult::Refused(why) => Err(Status::failed_precondition(why)),
        CommandResult::NotFound(why) => Err(Status::not_found(why)),
        _ => Ok(()),
    }
}

pub fn new_job(kind: &str, target: &str, steps: &[(&str, JobState, String)]) -> Job {
    let now = now_ms();
    Job {
        id: format!("job-{now:013}-{}", hex::encode(rand::random::<[u8; 3]>())),
        kind: kind.into(),
        target: target.into(),
        state: JobState::Running,
        steps: steps
            .iter()
            .map(|(name, state, detail)| JobStep {
                name: name.to_string(),
                state: *state,
                detail: detail.clone(),
                progress_pct: if *state == JobState::Succeeded {
                    100.0
                } else {
                    0.0
                },
            })
            .collect(),
        created_at_ms: now,
        updated_at_ms: now,
        error: String::new(),
        control: None,
        plan: None,
        runner: None,
    }
}

pub fn job_info(job: &Job) -> v1::JobInfo {
    v1::JobInfo {
        id: job.id.clone(),
        kind: job.kind.clone(),
        target: job.target.clone(),
        state: job.state.as_str().into(),
        steps: job
            .steps
            .iter()
            .map(|s| v1::JobStep {
                name: s.name.clone(),
                state: s.state.as_str().into(),
                detail: s.detail.clone(),
                progress_pct: s.progress_pct,
            })
            .collect(),
        created_at_unix_ms: job.created_at_ms,
        updated_at_unix_ms: job.updated_at_ms,
        error: job.error.clone(),
        progress_pct: job.progress_pct(),
    }
}

#[tonic::async_trait]
impl Protection for ProtectionService {
    async fn create_policy(
        &self,
        request: Request<v1::PolicySpec>,
    ) -> Result<Response<v1::PolicyList>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let policy = policy_from_spec(request.into_inner())?;
        let name = policy.name.clone();
        result_status(self.node.write(Command::CreatePolicy { policy }).await?)?;
        let twin = format!("{name}{}", crate::state::protection::FAILBACK_SUFFIX);
        let policies = vec![
            self.policy_info(self.find_policy(&name)?)?,
            self.policy_info(self.find_policy(&twin)?)?,
        ];
        Ok(Response::new(v1::PolicyList { policies }))
    }

    async fn update_policy(
        &self,
        request: Request<v1::PolicySpec>,
    ) -> Result<Response<v1::PolicyInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let policy = policy_from_spec(request.into_inner())?;
        let name = policy.name.clone();
        result_status(self.node.write(Command::UpdatePolicy { policy }).await?)?;
        Ok(Response::new(self.policy_info(self.find_policy(&name)?)?))
    }

    async fn list_policies(
        &self,
        request: Request<v1::Empty>,
    ) -> Result<Response<v1::PolicyList>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let policies = self
            .node
            .state()
            .policies()
            .map_err(storage_status)?
            .into_iter()
            .map(|p| self.policy_info(p))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(v1::PolicyList { policies }))
    }

    async fn get_policy(
        &self,
        request: Request<v1::NameRequest>,
    ) -> Result<Response<v1::PolicyInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let policy = self.find_policy(&request.get_ref().name)?;
        Ok(Response::new(self.policy_info(policy)?))
    }

    async fn delete_policy(
        &self,
        request: Request<v1::NameRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let name = request.into_inner().name;
        result_status(self.node.write(Command::DeletePolicy { name }).await?)?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn assign_policy(
        &self,
        request: Request<v1::AssignPolicyRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let v1::AssignPolicyRequest { machine, policy } = request.into_inner();
        let protected = self
            .node
            .state()
            .machine(&machine)
            .map_err(storage_status)?;
        if protected.is_none() {
            return Err(self.not_protected(&machine));
        }
        self.replication_policy(&policy)?;
        result_status(
            self.node
                .write(Command::AssignPolicy { machine, policy })
                .await?,
        )?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn protect(
        &self,
        request: Request<v1::ProtectRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let req = request.into_inner();
        let state = self.node.state();
        self.replication_policy(&req.policy)?;
        if let Some(m) = state.machine(&req.machine).map_err(storage_status)? {
            if m.recovery.failover.is_some() {
                return Err(Status::failed_precondition(format!(
                    "{} is failed over; reprotecting a failed-over machine is not built yet: \
                     to protect it again under its name, `lifeboat unprotect {} \
                     --delete-recovered-disks` first (this deletes its recovered disks)",
                    req.machine, req.machine
                )));
            }
            return Err(Status::already_exists(format!(
                "{} is already protected (policy {}); to change its policy: `lifeboat policy \
                 assign POLICY {}`",
                req.machine, m.policy, req.machine
            )));
        }
        let identities = state.identities().map_err(storage_status)?;
        let agent = agent_named(&identities, &req.machine).ok_or_else(|| {
            Status::not_found(format!(
                "no registered agent for machine {:?}; run `mobility-agent register` on it first",
                req.machine
            ))
        })?;
        // An agent registered with its disks may be protected before it first runs (its
        // protect job says it waits for the agent).
        let (_, facts, _) = self.node.live_view(agent);
        if facts.disks.is_empty() {
            return Err(Status::failed_precondition(format!(
                "the agent of {} reports no disks; start it with --disk NAME=PATH",
                req.machine
            )));
        }
        let machines = state.machines().map_err(storage_status)?;
        let candidates = self.candidates()?;
        let disks = facts.disks.len() as u32;
        let ps = placement::choose(
            Role::ProcessServer,
            &req.process_server,
            &candidates,
            &machines,
            disks,
        )
        .map_err(Status::failed_precondition)?;
        let mt = placement::choose(
            Role::MasterTarget,
            &req.master_target,
            &candidates,
            &machines,
            disks,
        )
        .map_err(Status::failed_precondition)?;
        let disk_bytes = facts.disks.iter().map(|d| d.size_bytes).sum();
        let space_note = placement::space_note(&candidates, &mt.id, disk_bytes);
        let now = now_ms();
        let machine = ProtectedMachine {
            name: req.machine.clone(),
            agent_id: agent.id.clone(),
            policy: req.policy.clone(),
            ps_id: ps.id.clone(),
            mt_id: mt.id.clone(),
            disks: facts
                .disks
                .iter()
                .map(|d| ProtectedDisk {
                    disk_id: format!("d-{}", hex::encode(rand::random::<[u8; 6]>())),
                    name: d.name.clone(),
                    source_path: d.path.clone(),
                    size_bytes: d.size_bytes,
                    state: ReplicationState::Enabling,
                    state_reason: "protection enabled".into(),
                    state_changed_at_ms: now,
                })
                .collect(),
            protected_at_ms: now,
            recovery: MachineRecovery {
                hook: req.recovery_hook.clone(),
                network_map: req.network_map.clone(),
                ..Default::default()
            },
            switching: None,
        };
        let job = new_job(
            "protect",
            &req.machine,
            &[
                (
                    "Choose process server and master target",
                    JobState::Succeeded,
                    placement::detail(&ps.name, &mt.name, space_note),
                ),
                (
                    "Initial sync",
                    JobState::Running,
                    "waiting for the agent".into(),
                ),
                (
                    "Start continuous replication",
                    JobState::Running,
                    String::new(),
                ),
            ],
        );
        result_status(
            self.node
                .write(Command::Protect {
                    machine,
                    job: job.clone(),
                })
                .await?,
        )?;
        Ok(Response::new(job_info(&job)))
    }

    async fn unprotect(
        &self,
        request: Request<v1::UnprotectRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let v1::UnprotectRequest {
            name,
            delete_recovered_disks,
        } = request.into_inner();
        let machine = self
            .node
            .state()
            .machine(&name)
            .map_err(storage_status)?
            .ok_or_else(|| self.not_protected(&name))?;
        let disks: Vec<String> = machine.disks.iter().map(|d| d.disk_id.clone()).collect();
        let notes = crate::recovery::unprotect_notes(&self.node, &name)?;
        let job = new_job(
            "unprotect",
            &name,
            &[
                ("Disable replication", JobState::Succeeded, notes),
                (
                    "Free disk slots on the master target",
                    JobState::Running,
                    // Read back by `reconcile::unprotect_progress`: which disks, on which
                    // master target (only that one's word frees them).
                    format!("{} on {}", disks.join(","), machine.mt_id),
                ),
            ],
        );
        result_status(
            self.node
                .write(Command::Unprotect {
                    name,
                    job: job.clone(),
                    delete_recovered_disks,
                })
                .await?,
        )?;
        Ok(Response::new(job_info(&job)))
    }

    async fn switch_process_server(
        &self,
        request: Request<v1::SwitchRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        Ok(Response::new(self.switch(request.into_inner()).await?))
    }

    async fn balance_process_servers(
        &self,
        request: Request<v1::BalanceRequest>,
    ) -> Result<Response<v1::BalancePlan>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        Ok(Response::new(self.balance(request.into_inner()).await?))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let request = request.into_inner();
        if request.wait_ms > 0 {
            let limit = Duration::from_millis(request.wait_ms.into());
            status_wait::changed_since(&self.node, request.after_version, limit).await;
        }
        // Read before the status is put together: a change in between shows in this answer
        // and also makes the caller's next long poll return at once.
        let version = status_wait::version(&self.node);
        let wanted = request.machine;
        let state = self.node.state();
        let mut machines = Vec::new();
        for m in state.machines().map_err(storage_status)? {
            if !wanted.is_empty() && m.name != wanted {
                continue;
            }
            machines.push(self.machine_status(&m)?);
        }
        if !wanted.is_empty() && machines.is_empty() {
            return Err(self.not_protected(&wanted));
        }
        Ok(Response::new(v1::StatusResponse { machines, version }))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::JobList>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit as usize
        };
        let all = self.node.state().jobs().map_err(storage_status)?;
        let selected: Vec<&Job> = all
            .iter()
            .filter(|j| req.all || matches!(j.state, JobState::Running | JobState::Waiting))
            .collect();
        let skip = selected.len().saturating_sub(limit);
        let jobs = selected.into_iter().skip(skip).map(job_info).collect();
        Ok(Response::new(v1::JobList { jobs }))
    }

    async fn list_alerts(
        &self,
        request: Request<v1::Empty>,
    ) -> Result<Response<v1::AlertList>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        Ok(Response::new(self.alerts().await?))
    }

    async fn get_job(
        &self,
        request: Request<v1::NameRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let id = request.into_inner().name;
        let job = self
            .node
            .state()
            .job(&id)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::not_found(format!("no job {id:?}; see `lifeboat jobs --all`"))
            })?;
        Ok(Response::new(job_info(&job)))
    }
}

impl ProtectionService {
    async fn alerts(&self) -> Result<v1::AlertList, Status> {
        let alerts = self
            .node
            .state()
            .alerts()
            .map_err(storage_status)?
            .into_iter()
            .map(|a| v1::AlertInfo {
                key: a.key,
                severity: a.severity,
                subject: a.subject,
                message: a.message,
                raised_at_unix_ms: a.raised_at_ms,
            })
            .collect();
        Ok(v1::AlertList { alerts })
    }

    fn machine_status(&self, m: &ProtectedMachine) -> Result<v1::MachineStatus, Status> {
        let state = self.node.state();
        let name_of = |id: &str| -> Result<String, Status> {
            Ok(state
                .identity(id)
                .map_err(storage_status)?
                .map(|r| r.name)
                .unwrap_or_else(|| id.to_string()))
        };
        let threshold = state
            .policy(&m.policy)
            .map_err(storage_status)?
            .map(|p| p.rpo_threshold_secs)
            .unwrap_or(0);
        let connected = |id: &str| -> Result<bool, Status> {
            Ok(state
                .identity(id)
                .map_err(storage_status)?
                .map(|r| self.node.live_view(&r).2)
                .unwrap_or(false))
        };
        let agent_connected = connected(&m.agent_id)?;
        let now = now_ms();
        let disks = m
            .disks
            .iter()
            .map(|d| {
                let (report, lag) = self.node.disk_lag(m, d, now);
                let capture = match report {
                    Some(r) if r.report.scan => "scan",
                    Some(_) => "nbd",
                    None => "",
                };
                v1::DiskStatus {
                    disk_id: d.disk_id.clone(),
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    state: d.state.as_str().into(),
                    state_reason: d.state_reason.clone(),
                    state_changed_at_unix_ms: d.state_changed_at_ms,
                    sync_progress_pct: lag.sync_progress_pct,
                    eta_secs: lag.eta_secs,
                    rpo_secs: lag.rpo_secs,
                    pending_bytes: lag.pending_bytes,
                    rpo_threshold_secs: threshold,
                    rpo_exceeded: threshold > 0 && lag.rpo_secs > threshold as f64,
                    last_report_unix_ms: lag.last_report_ms,
                    capture: capture.into(),
                    stall: self
                        .node
                        .stall(m, d)
                        .map(|s| s.reason())
                        .unwrap_or_default(),
                }
            })
            .collect();
        Ok(v1::MachineStatus {
            name: m.name.clone(),
            policy: m.policy.clone(),
            process_server: name_of(&m.ps_id)?,
            master_target: name_of(&m.mt_id)?,
            agent_connected,
            disks,
            process_server_connected: connected(&m.ps_id)?,
            master_target_connected: connected(&m.mt_id)?,
            switching_to: match &m.switching {
                Some(s) => name_of(&s.to_ps)?,
                None => String::new(),
            },
            test_failover: m.recovery.test_failover.as_ref().map(under_way),
            failover: m.recovery.failover.as_ref().map(under_way),
            writes_stopped: m.recovery.stop_writes,
        })
    }
}

/// What status tells of a (test) failover.
fn under_way(record: &crate::state::protection::RecoveryRecord) -> v1::RecoveryUnderWay {
    v1::RecoveryUnderWay {
        point: record.point.clone(),
        point_time_unix_ms: record.point_time_ms,
        nbd_uris: record.views.iter().map(|v| v.nbd_uri.clone()).collect(),
        committed: record.committed,
    }
}
