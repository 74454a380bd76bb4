//! Recovery (DESIGN §7): the admin `Recovery` service — recovery points, test failover and its
//! cleanup, failover and commit. Each operation is a job: the call checks what it can at
//! once (unknown machine, a test failover already open, a committed failover), records the
//! job and returns it; the job then runs on this node (`flows`), its steps written through
//! Raft as they go, and `lifeboat` follows it.
pub mod flows;
pub mod hook;
pub mod jobs;
pub mod plans;
pub mod points;
mod specs;

use crate::node::{storage_status, Node};
use crate::services::protection::job_info;
use crate::services::protection::result_status;
use crate::state::groups::ProtectionGroup;
use crate::state::protection::JobControl;
use crate::state::protection::ProtectedMachine;
use crate::state::Command;
use jobs::JobRun;
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, recovery_server::Recovery};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct RecoveryService {
    node: Arc<Node>,
}

impl RecoveryService {
    pub fn new(node: Arc<Node>) -> Self {
        RecoveryService { node }
    }

    fn machine(&self, name: &str) -> Result<ProtectedMachine, Status> {
        self.node
            .state()
            .machine(name)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::not_found(format!("{name} is not protected; see `lifeboat status`"))
            })
    }

    /// Records the job and runs `flow` in the background.
    async fn spawn<F, Fut>(
        &self,
        kind: &str,
        machine: &str,
        steps: &[&str],
        flow: F,
    ) -> Result<Response<v1::JobInfo>, Status>
    where
        F: FnOnce(Arc<Node>, JobRun) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let run = JobRun::start(self.node.clone(), kind, machine, steps).await?;
        let info = job_info(&run.job);
        tokio::spawn(flow(self.node.clone(), run));
        Ok(Response::new(info))
    }
}

pub fn test_failover_steps(materialize: bool) -> Vec<&'static str> {
    let mut steps = vec!["Choose recovery point", "Open views"];
    if materialize {
        steps.push("Materialize");
    }
    steps.push("Run recovery hook");
    steps
}

pub fn failover_steps(planned: bool) -> Vec<&'static str> {
    let mut steps = Vec::new();
    if planned {
        steps.extend(["Stop writes at the source", "Final sync"]);
    }
    steps.extend([
        "Choose recovery point",
        "Fail over disks",
        "Run recovery hook",
    ]);
    steps
}

pub const CLEANUP_STEPS: &[&str] = &["Delete views"];

/// What unprotecting `machine` does beyond its replication, for the operator to read in the
/// job: it leaves its consistency groups, and plans naming it would fail at its step.
pub fn unprotect_notes(node: &Node, machine: &str) -> Result<String, Status> {
    let state = node.state();
    let mut notes = Vec::new();
    for g in state.groups().map_err(storage_status)? {
        if g.machines.iter().any(|m| m == machine) {
            notes.push(format!("{machine} left consistency group {}", g.name));
        }
    }
    for p in state.plans().map_err(storage_status)? {
        if p.groups
            .iter()
            .any(|g| g.machines.iter().any(|m| m == machine))
        {
            notes.push(format!(
                "recovery plan {} still names {machine}: runs of the plan stop at its step \
                 until the plan is created again without it (`lifeboat plan delete`, `plan \
                 create`)",
                p.name
            ));
        }
    }
    Ok(notes.join("; "))
}

#[tonic::async_trait]
impl Recovery for RecoveryService {
    async fn list_points(
        &self,
        request: Request<v1::PointsRequest>,
    ) -> Result<Response<v1::PointList>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let r = request.into_inner();
        let machine = self.machine(&r.machine)?;
        if let Some(f) = machine.recovery.failover.as_ref().filter(|f| f.committed) {
            return Err(Status::failed_precondition(format!(
                "{} failed over to {} and the failover was committed: it has no recovery \
                 points; its disks are the recovered machine's now",
                r.machine, f.point
            )));
        }
        let mut mt = flows::master_target(&self.node, &machine).map_err(Status::unavailable)?;
        let disks = flows::disk_points(&self.node, &mut mt, &machine)
            .await
            .map_err(Status::unavailable)?;
        let since = if r.since_secs > 0 {
            let since_ms = i64::try_from(r.since_secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            crate::state::model::now_ms().saturating_sub(since_ms)
        } else {
            i64::MIN
        };
        let retention_secs = self
            .node
            .state()
            .policy(&machine.policy)
            .map_err(storage_status)?
            .map_or(0, |p| p.retention_secs);
        Ok(Response::new(v1::PointList {
            machine: machine.name.clone(),
            points: points::machine_points(&disks)
                .into_iter()
                .filter(|p| p.time_ms >= since)
                .map(|p| v1::RecoveryPoint {
                    id: p.id,
                    kind: p.kind,
                    time_unix_ms: p.time_ms,
                    fuzzy: p.fuzzy,
                })
                .collect(),
            latest_unix_ms: points::latest(&disks).time_ms,
            journal_bytes: disks.iter().map(|d| d.journal_bytes).sum(),
            retention_secs,
            failed_over_to: machine
                .recovery
                .failover
                .map(|f| f.point)
                .unwrap_or_default(),
        }))
    }

    async fn test_failover(
        &self,
        request: Request<v1::RecoverRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let r = request.into_inner();
        let machine = self.machine(&r.machine)?;
        if machine.recovery.test_failover.is_some() {
            return Err(Status::failed_precondition(format!(
                "{} is already in a test failover; run `lifeboat test-failover cleanup {}` first",
                r.machine, r.machine
            )));
        }
        if machine
            .recovery
            .failover
            .as_ref()
            .is_some_and(|f| f.committed)
        {
            return Err(Status::failed_precondition(format!(
                "{} failed over and was committed: it has no recovery points",
                r.machine
            )));
        }
        flows::check_point(&self.node, &machine, &r.point)
            .await
            .map_err(Status::failed_precondition)?;
        let steps = test_failover_steps(r.materialize);
        self.spawn(
            "test-failover",
            &r.machine.clone(),
            &steps,
            move |node, mut run| async move {
                let result =
                    flows::test_failover(node, &mut run, &r.machine, &r.point, r.materialize).await;
                run.finish(result).await;
            },
        )
        .await
    }

    async fn cleanup_test_failover(
        &self,
        request: Request<v1::NameRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let name = request.into_inner().name;
        if self.machine(&name)?.recovery.test_failover.is_none() {
            return Err(Status::failed_precondition(format!(
                "{name} has no test failover to clean up"
            )));
        }
        self.spawn(
            "test-failover-cleanup",
            &name.clone(),
            CLEANUP_STEPS,
            move |node, mut run| async move {
                let result = flows::cleanup_test_failover(node, &mut run, &name).await;
                run.finish(result).await;
            },
        )
        .await
    }

    async fn failover(
        &self,
        request: Request<v1::RecoverRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let r = request.into_inner();
        let machine = self.machine(&r.machine)?;
        if let Some(f) = &machine.recovery.failover {
            if f.committed {
                return Err(Status::failed_precondition(format!(
                    "{} failed over and was committed: its replica is now the recovered \
                     machine's disk and there is no other point to fail over to",
                    r.machine
                )));
            }
            if r.planned {
                return Err(Status::failed_precondition(format!(
                    "{} already failed over: the source no longer replicates, so a planned \
                     failover is not possible; choose another point with --point, or commit",
                    r.machine
                )));
            }
        } else if machine.disks.iter().any(|d| {
            !matches!(
                d.state,
                crate::state::protection::ReplicationState::Protected
                    | crate::state::protection::ReplicationState::ResyncRequired
                    | crate::state::protection::ReplicationState::Resyncing
            )
        }) {
            return Err(Status::failed_precondition(format!(
                "{} cannot fail over before its initial sync is complete (see `lifeboat status`)",
                r.machine
            )));
        }
        if !r.planned {
            // A standing failover's writes are not dropped unless the operator said so.
            let (disks, point) = flows::check_point(&self.node, &machine, &r.point)
                .await
                .map_err(Status::failed_precondition)?;
            points::check_refailover(&machine.name, &disks, &point, r.discard_writes)
                .map_err(Status::failed_precondition)?;
        }
        let steps = failover_steps(r.planned);
        self.spawn(
            "failover",
            &r.machine.clone(),
            &steps,
            move |node, mut run| async move {
                let result = flows::failover(
                    node,
                    &mut run,
                    &r.machine,
                    &r.point,
                    r.planned,
                    r.discard_writes,
                )
                .await;
                run.finish(result).await;
            },
        )
        .await
    }

    async fn commit_failover(
        &self,
        request: Request<v1::NameRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let name = request.into_inner().name;
        let machine = self.machine(&name)?;
        match &machine.recovery.failover {
            None => {
                return Err(Status::failed_precondition(format!(
                    "{name} has not failed over; run `lifeboat failover {name}` first"
                )))
            }
            Some(f) if f.committed => {
                return Err(Status::failed_precondition(format!(
                    "{name}'s failover to {} is already committed; nothing to do",
                    f.point
                )))
            }
            Some(_) => {}
        }
        self.spawn(
            "failover-commit",
            &name.clone(),
            &["Commit disks"],
            move |node, mut run| async move {
                let result = flows::commit(node, &mut run, &name).await;
                run.finish(result).await;
            },
        )
        .await
    }

    async fn create_group(
        &self,
        request: Request<v1::GroupSpec>,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let spec = request.into_inner();
        specs::check_name("group", &spec.name)?;
        if spec.machines.is_empty() || spec.every_secs == 0 {
            return Err(Status::invalid_argument(
                "a group needs at least one machine and a positive point interval",
            ));
        }
        let group = ProtectionGroup {
            name: spec.name.clone(),
            machines: spec.machines,
            every_secs: spec.every_secs,
            created_at_ms: crate::state::model::now_ms(),
            last_point_ms: 0,
            barrier: None,
        };
        result_status(self.node.write(Command::CreateGroup { group }).await?)?;
        let created = self
            .node
            .state()
            .group(&spec.name)
            .map_err(storage_status)?
            .ok_or_else(|| Status::internal("group vanished after creation"))?;
        Ok(Response::new(specs::group_info(created)))
    }

    async fn list_groups(
        &self,
        request: Request<v1::Empty>,
    ) -> Result<Response<v1::GroupList>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let groups = self.node.state().groups().map_err(storage_status)?;
        Ok(Response::new(v1::GroupList {
            groups: groups.into_iter().map(specs::group_info).collect(),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<v1::NameRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let name = request.into_inner().name;
        result_status(self.node.write(Command::DeleteGroup { name }).await?)?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn create_plan(
        &self,
        request: Request<v1::PlanSpec>,
    ) -> Result<Response<v1::PlanSpec>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let plan = specs::plan_from_spec(request.into_inner())?;
        let name = plan.name.clone();
        result_status(self.node.write(Command::CreatePlan { plan }).await?)?;
        let plan = self
            .node
            .state()
            .plan(&name)
            .map_err(storage_status)?
            .ok_or_else(|| Status::internal("plan vanished after creation"))?;
        Ok(Response::new(specs::plan_spec(plan)))
    }

    async fn list_plans(
        &self,
        request: Request<v1::Empty>,
    ) -> Result<Response<v1::PlanList>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let plans = self.node.state().plans().map_err(storage_status)?;
        Ok(Response::new(v1::PlanList {
            plans: plans.into_iter().map(specs::plan_spec).collect(),
        }))
    }

    async fn delete_plan(
        &self,
        request: Request<v1::NameRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let name = request.into_inner().name;
        result_status(self.node.write(Command::DeletePlan { name }).await?)?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn run_plan(
        &self,
        request: Request<v1::PlanRunRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let r = request.into_inner();
        if !["test-failover", "test-failover-cleanup", "failover"].contains(&r.mode.as_str()) {
            return Err(Status::invalid_argument(format!(
                "unknown plan mode {:?}: test-failover, test-failover-cleanup or failover",
                r.mode
            )));
        }
        if r.mode == "failover" && !r.planned && r.point.is_empty() {
            return Err(Status::invalid_argument(
                "a plan failover needs --planned or --point",
            ));
        }
        let plan = self
            .node
            .state()
            .plan(&r.plan)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::not_found(format!("no plan {:?}; see `lifeboat plan list`", r.plan))
            })?;
        if r.mode == "test-failover-cleanup" {
            plans::check_cleanup(&self.node, &plan).map_err(Status::failed_precondition)?;
        }
        let point = if r.point.is_empty() {
            "latest".to_string()
        } else {
            r.point
        };
        let mut job = plans::plan_job(&plan, &r.mode, &point, r.planned);
        plans::fix_group_points(&self.node, &mut job)
            .await
            .map_err(|e| Status::unavailable(format!("cannot choose the group point: {e}")))?;
        let job = plans::start(self.node.clone(), job).await?;
        Ok(Response::new(job_info(&job)))
    }

    async fn control_job(
        &self,
        request: Request<v1::JobControlRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let r = request.into_inner();
        let control = match r.action.as_str() {
            "resume" => JobControl::Resume,
            "retry" => JobControl::Retry,
            "skip" => JobControl::Skip,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action {other:?}: resume, retry or skip"
                )))
            }
        };
        let job = self
            .node
            .state()
            .job(&r.id)
            .map_err(storage_status)?
            .ok_or_else(|| Status::not_found(format!("no job {}", r.id)))?;
        if job.plan.is_none() {
            return Err(Status::failed_precondition(format!(
                "job {} is not a recovery plan run; only plan runs wait for the operator",
                r.id
            )));
        }
        result_status(
            self.node
                .write(Command::ControlJob {
                    id: r.id.clone(),
                    control,
                })
                .await?,
        )?;
        // The run goes on here if no runner in this process has it (its node may be gone).
        plans::spawn(self.node.clone(), r.id.clone());
        let job = self
            .node
            .state()
            .job(&r.id)
            .map_err(storage_status)?
            .ok_or_else(|| Status::not_found(format!("no job {}", r.id)))?;
        Ok(Response::new(job_info(&job)))
    }
}
