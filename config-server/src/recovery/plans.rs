//! Running a recovery plan (DESIGN §7) as one job: its groups in order, each with its
//! `before` actions, then its machines (each a test failover, cleanup or failover of its
//! own, recorded as a job and named in the plan's step), then its `after` actions. A manual
//! action makes the job wait (`Waiting`) until `lifeboat job resume`; a step that fails makes
//! it wait too, with the error, until `lifeboat job retry` (run it again) or `lifeboat job
//! skip` (go on without it). The run continues from the job record, so the node that takes
//! the operator's word can pick it up even if the one that started it is gone.
use super::hook;
use super::jobs::JobRun;
use super::points;
use super::{failover_steps, flows, test_failover_steps, CLEANUP_STEPS};
use crate::node::Node;
use crate::services::protection::new_job;
use crate::state::plans::{PlanAction, RecoveryPlan};
use crate::state::protection::{Job, JobControl, JobState, PlanRun, PlanStep};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tonic::Status;

/// How often a waiting plan looks for the operator's word.
const POLL: Duration = Duration::from_millis(300);

/// Plan jobs with a runner in this process (one runner per job).
fn running() -> &'static Mutex<HashSet<String>> {
    static RUNNING: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    RUNNING.get_or_init(Default::default)
}

fn verb(mode: &str) -> &'static str {
    match mode {
        "failover" => "fail over",
        "test-failover-cleanup" => "clean up the test failover of",
        _ => "test failover",
    }
}

/// The job of one run of `plan`.
pub fn plan_job(plan: &RecoveryPlan, mode: &str, point: &str, planned: bool) -> Job {
    let mut names = Vec::new();
    let mut steps = Vec::new();
    let manual_ok = mode != "test-failover-cleanup";
    for g in &plan.groups {
        let actions = |list: &Vec<PlanAction>,
                       when: &str,
                       names: &mut Vec<String>,
                       steps: &mut Vec<PlanStep>| {
            for a in list {
                if matches!(a, PlanAction::Manual(_)) && !manual_ok {
                    continue;
                }
                names.push(format!("Group {} {when}: {}", g.number, a.describe()));
                steps.push(PlanStep::Action(a.clone()));
            }
        };
        if mode != "test-failover-cleanup" {
            actions(&g.before, "before", &mut names, &mut steps);
        }
        for m in &g.machines {
            names.push(format!("Group {}: {} {m}", g.number, verb(mode)));
            steps.push(PlanStep::Machine(m.clone()));
        }
        if mode != "test-failover-cleanup" {
            actions(&g.after, "after", &mut names, &mut steps);
        }
    }
    let list: Vec<(&str, JobState, String)> = names
        .iter()
        .map(|n| (n.as_str(), JobState::Pending, String::new()))
        .collect();
    let mut job = new_job(&format!("plan-{mode}"), &plan.name, &list);
    job.plan = Some(PlanRun {
        plan: plan.name.clone(),
        mode: mode.to_string(),
        point: point.to_string(),
        planned,
        steps,
        points: Default::default(),
    });
    job
}

/// Fixes `latest-group` once for the whole run: for each consistency group among the plan's
/// machines, the newest group point that every one of them (in the plan) holds. Resolved at
/// each machine's turn instead, a plan waiting at a manual step between two groups would
/// bring them up at different instants — the inconsistency group points exist to prevent.
pub async fn fix_group_points(node: &Node, job: &mut Job) -> Result<(), String> {
    let Some(plan) = job.plan.as_mut() else {
        return Ok(());
    };
    if plan.point != "latest-group" || plan.planned || plan.mode == "test-failover-cleanup" {
        return Ok(());
    }
    let mut held = Vec::new();
    for step in &plan.steps {
        let PlanStep::Machine(name) = step else {
            continue;
        };
        let machine = node
            .state()
            .machine(name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{name} is not protected"))?;
        let mut mt = flows::master_target(node, &machine)?;
        let disks = flows::disk_points(node, &mut mt, &machine).await?;
        held.push((name.clone(), points::machine_points(&disks)));
    }
    plan.points = common_group_points(&held);
    Ok(())
}

/// Machine → the newest group point of its group that all the listed machines of that group
/// hold. A machine without group points gets none (its own job then says why).
fn common_group_points(held: &[(String, Vec<points::MachinePoint>)]) -> BTreeMap<String, String> {
    // Group → its machines, and each of its point ids → (time, how many of them hold it).
    type Ids<'a> = BTreeMap<&'a str, (i64, usize)>;
    let mut groups: BTreeMap<&str, (Vec<&str>, Ids)> = BTreeMap::new();
    for (machine, list) in held {
        for p in list.iter().filter(|p| p.kind == "group") {
            let Some((_, group)) = p.id.rsplit_once(':') else {
                continue;
            };
            let (machines, ids) = groups.entry(group).or_default();
            if machines.last() != Some(&machine.as_str()) {
                machines.push(machine);
            }
            ids.entry(&p.id).or_insert((p.time_ms, 0)).1 += 1;
        }
    }
    let mut chosen = BTreeMap::new();
    for (machines, ids) in groups.values() {
        let newest = ids
            .iter()
            .filter(|(_, (_, holders))| *holders == machines.len())
            .max_by_key(|(_, (time, _))| *time);
        if let Some((id, _)) = newest {
            for m in machines {
                chosen.insert(m.to_string(), id.to_string());
            }
        }
    }
    chosen
}

/// Records the run and starts it.
pub async fn start(node: Arc<Node>, job: Job) -> Result<Job, Status> {
    let run = JobRun::record(node.clone(), job).await?;
    let job = run.job.clone();
    spawn(node, job.id.clone());
    Ok(job)
}

/// Runs (or continues) plan job `id` unless this process already does.
pub fn spawn(node: Arc<Node>, id: String) {
    if let Ok(mut set) = running().lock() {
        if !set.insert(id.clone()) {
            return;
        }
    }
    tokio::spawn(async move {
        if let Err(e) = run(node, &id).await {
            tracing::warn!(job = %id, "plan run stopped: {e}");
        }
        if let Ok(mut set) = running().lock() {
            set.remove(&id);
        }
    });
}

fn load(node: &Node, id: &str) -> Result<Job, String> {
    node.state()
        .job(id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("job {id} is gone"))
}

/// Waits for the operator's word on a waiting job; returns it (and clears it).
async fn word(node: &Node, run: &mut JobRun) -> Result<JobControl, String> {
    loop {
        let stored = load(node, &run.job.id)?;
        if let Some(control) = stored.control {
            run.job.control = None;
            run.job.state = JobState::Running;
            run.job.error.clear();
            run.save().await;
            return Ok(control);
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn run(node: Arc<Node>, id: &str) -> Result<(), String> {
    let job = load(&node, id)?;
    let plan = job.plan.clone().ok_or("not a plan job")?;
    let mut run = JobRun::resume(node.clone(), job);
    let mut i = 0;
    while i < plan.steps.len() {
        let state = run.job.steps[i].state;
        if matches!(state, JobState::Succeeded | JobState::Skipped) {
            i += 1;
            continue;
        }
        if state == JobState::Waiting
            || (state == JobState::Failed && run.job.state == JobState::Waiting)
        {
            // Picked up after a restart, or by another node: the operator's word decides.
            match word(&node, &mut run).await? {
                JobControl::Skip => {
                    run.set(i, JobState::Skipped, "skipped by the operator")
                        .await;
                    i += 1;
                    continue;
                }
                JobControl::Resume
                    if matches!(plan.steps[i], PlanStep::Action(PlanAction::Manual(_))) =>
                {
                    run.set(i, JobState::Succeeded, "done (resumed by the operator)")
                        .await;
                    i += 1;
                    continue;
                }
                _ => {} // retry (or resume of a failed step): run it again
            }
        }
        run.set(i, JobState::Running, "").await;
        match &plan.steps[i] {
            PlanStep::Action(PlanAction::Manual(text)) => {
                let detail = format!("{text} — when done: lifeboat job resume {id}");
                run.job.state = JobState::Waiting;
                run.set(i, JobState::Waiting, detail).await;
                continue; // the loop waits for the word
            }
            step => match execute(&node, &plan, step).await {
                Ok(detail) => {
                    run.set(i, JobState::Succeeded, detail).await;
                    i += 1;
                }
                Err(e) => {
                    run.job.state = JobState::Waiting;
                    run.job.error = format!(
                        "step {} failed: {e}; fix the cause, then `lifeboat job retry {id}` or \
                         `lifeboat job skip {id}`",
                        i + 1
                    );
                    run.set(i, JobState::Failed, e).await;
                }
            },
        }
    }
    run.finish(Ok(())).await;
    Ok(())
}

/// Runs a script action or one machine's operation; returns the step's detail.
async fn execute(node: &Arc<Node>, plan: &PlanRun, step: &PlanStep) -> Result<String, String> {
    match step {
        PlanStep::Action(PlanAction::Script(command)) => {
            // The point chosen for the run, when it is one for every machine.
            let point = match plan.points.values().next() {
                Some(first) if plan.points.values().all(|p| p == first) => first,
                _ => &plan.point,
            };
            let input = hook::HookInput {
                machine: "",
                mode: &plan.mode,
                point,
                point_time: "",
                network: "",
                disks: &[],
            };
            hook::run("plan script", command, &input).await
        }
        PlanStep::Action(PlanAction::Manual(_)) => Ok(String::new()),
        PlanStep::Machine(name) => machine(node, plan, name).await,
    }
}

/// One machine's operation, as a job of its own.
async fn machine(node: &Arc<Node>, plan: &PlanRun, name: &str) -> Result<String, String> {
    // A cleanup run again (after a retry, or a second `plan cleanup`) passes over machines
    // already clean rather than stopping at them.
    if plan.mode == "test-failover-cleanup" && !has_test_failover(node, name)? {
        return Ok(format!("{name} has no test failover: nothing to clean up"));
    }
    let steps: Vec<&str> = match plan.mode.as_str() {
        "failover" => failover_steps(plan.planned),
        "test-failover-cleanup" => CLEANUP_STEPS.to_vec(),
        _ => test_failover_steps(false),
    };
    let mut run = JobRun::start(node.clone(), &plan.mode, name, &steps)
        .await
        .map_err(|s| s.message().to_string())?;
    let id = run.job.id.clone();
    let point = plan.points.get(name).unwrap_or(&plan.point);
    let result = match plan.mode.as_str() {
        "failover" => {
            // A plan never discards a recovered machine's writes: that step fails, saying so.
            flows::failover(node.clone(), &mut run, name, point, plan.planned, false).await
        }
        "test-failover-cleanup" => flows::cleanup_test_failover(node.clone(), &mut run, name).await,
        _ => flows::test_failover(node.clone(), &mut run, name, point, false).await,
    };
    let detail = run
        .job
        .steps
        .iter()
        .filter(|s| s.state == JobState::Succeeded && !s.detail.is_empty())
        .map(|s| s.detail.clone())
        .collect::<Vec<_>>()
        .join("\n");
    run.finish(result.clone()).await;
    match result {
        Ok(()) => Ok(format!("job {id}:\n{detail}")),
        Err(e) => Err(format!("job {id}: {e}")),
    }
}

fn has_test_failover(node: &Node, name: &str) -> Result<bool, String> {
    Ok(node
        .state()
        .machine(name)
        .map_err(|e| e.to_string())?
        .is_some_and(|m| m.recovery.test_failover.is_some()))
}

/// A plan's cleanup with nothing to clean up is refused at once rather than run as a job.
pub fn check_cleanup(node: &Node, plan: &RecoveryPlan) -> Result<(), String> {
    for m in plan.groups.iter().flat_map(|g| g.machines.iter()) {
        if has_test_failover(node, m)? {
            return Ok(());
        }
    }
    Err(format!(
        "no machine of plan {} is in a test failover: nothing to clean up",
        plan.name
    ))
}

#[cfg(test)]
mod tests {
    use super::common_group_points;
    use crate::recovery::points::MachinePoint;

    fn point(id: &str) -> MachinePoint {
        let kind = id.split(':').next().unwrap_or("").to_string();
        let time_ms = id
            .split(':')
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        MachinePoint {
            id: id.into(),
            kind,
            time_ms,
            fuzzy: false,
            seqs: Default::default(),
        }
    }

    #[test]
    fn latest_group_is_the_newest_point_every_machine_of_the_group_holds() {
        let held = vec![
            // db01 already holds the group point at 3000; web01 does not yet.
            (
                "db01".to_string(),
                vec![
                    point("group:1000:erp"),
                    point("group:2000:erp"),
                    point("group:3000:erp"),
                ],
            ),
            (
                "web01".to_string(),
                vec![
                    point("group:1000:erp"),
                    point("group:2000:erp"),
                    point("crash:2500"),
                ],
            ),
            ("mail01".to_string(), vec![point("group:1500:mail")]),
            ("lone01".to_string(), vec![point("crash:1000")]),
        ];
        let chosen = common_group_points(&held);
        assert_eq!(chosen["db01"], "group:2000:erp");
        assert_eq!(chosen["web01"], "group:2000:erp");
        assert_eq!(chosen["mail01"], "group:1500:mail");
        assert!(!chosen.contains_key("lone01"));
    }
}
