//! Carries out process-server switches (DESIGN §8) on the leader's reconcile tick. A switch
//! job has three steps:
//!
//! 1. **drain** — the machine's assignments say `draining`: its process server stores nothing
//!    more for the machine's disks and forwards what it holds; the agent ships nothing and
//!    keeps its writes queued. Done once that process server reports every disk `draining`
//!    with everything it acknowledged applied on the master target (`applied_seq >=
//!    durable_seq`). It reads the flag before its cache and stores only after checking it
//!    under the cache lock, so that seq can no longer grow.
//! 2. **switch** — one Raft write moves the machine to the new process server. Its master
//!    target accepts batches from the new one only from then on; the new one answers the
//!    agent's `Resume` with what the master target applied — exactly where the old stream
//!    ended — so nothing is resynced.
//! 3. **resume** — done once the new process server reports the disks.
//!
//! A switch with `--force` (the old process server is down) skips the drain; batches only its
//! cache held are then missing, and the agent resyncs the regions written since the
//! replica's position (its dirty map keeps them until applied), as it does for any process
//! server that lost acknowledged batches.
use crate::node::Node;
use crate::state::protection::{Job, JobState, ProtectedMachine};
use crate::state::Command;
use lifeboat_common::Role;

/// How long the current process server may take to forward what it holds.
pub const DRAIN_TIMEOUT_MS: i64 = 15 * 60 * 1000;
/// How long the new process server may take to report the machine's disks.
pub const RESUME_TIMEOUT_MS: i64 = 5 * 60 * 1000;

const DRAIN: usize = 0;
const SWITCH: usize = 1;
const RESUME: usize = 2;

/// What to write for switch `job` now, if anything.
pub fn progress(
    node: &Node,
    job: &Job,
    machine: Option<&ProtectedMachine>,
    now: i64,
) -> Option<Command> {
    let Some(machine) = machine else {
        return Some(Command::UpdateJob {
            job: job.failed(now, "the machine was unprotected during the move".into()),
        });
    };
    let step = |i: usize| job.steps.get(i).map(|s| s.state);
    if step(DRAIN) == Some(JobState::Running) {
        return drain_progress(node, job, machine, now);
    }
    if step(RESUME) == Some(JobState::Running) {
        return resume_progress(node, job, machine, now);
    }
    None
}

fn drain_progress(node: &Node, job: &Job, machine: &ProtectedMachine, now: i64) -> Option<Command> {
    let Some(switching) = machine.switching.as_ref().filter(|s| s.job_id == job.id) else {
        return Some(Command::UpdateJob {
            job: job.failed(now, "the switch was replaced or cancelled".into()),
        });
    };
    let drained = machine.disks.iter().all(|disk| {
        node.progress
            .get(&disk.disk_id, Role::ProcessServer)
            .is_some_and(|r| {
                r.from == machine.ps_id
                    && r.at_ms > switching.started_at_ms
                    && r.report.draining
                    && r.report.applied_seq >= r.report.durable_seq
            })
    });
    if drained {
        let mut next = job.clone();
        next.updated_at_ms = now;
        set_step(
            &mut next,
            DRAIN,
            JobState::Succeeded,
            "everything it acknowledged is on the master target",
        );
        set_step(&mut next, SWITCH, JobState::Succeeded, "");
        set_step(&mut next, RESUME, JobState::Running, "");
        return Some(Command::EndSwitch {
            machine: machine.name.clone(),
            job: next,
            move_to: Some(switching.to_ps.clone()),
        });
    }
    if let Some(progressed) = drain_percentage(node, job, machine, now) {
        return Some(Command::UpdateJob { job: progressed });
    }
    if now - switching.started_at_ms > DRAIN_TIMEOUT_MS {
        let why = format!(
            "the process server did not forward everything it holds for {} within {} minutes, \
             so the machine stays on it; check it (`lifeboat servers list`, its log) and retry, \
             or move with --force (what only its cache holds is then resynced)",
            machine.name,
            DRAIN_TIMEOUT_MS / 60_000
        );
        return Some(Command::EndSwitch {
            machine: machine.name.clone(),
            job: job.failed(now, why),
            move_to: None,
        });
    }
    None
}

fn resume_progress(
    node: &Node,
    job: &Job,
    machine: &ProtectedMachine,
    now: i64,
) -> Option<Command> {
    // The switch step's time is when the machine moved (for --force, when the job began).
    let moved_at = job.updated_at_ms;
    let resumed = machine.disks.iter().all(|disk| {
        node.progress
            .get(&disk.disk_id, Role::ProcessServer)
            .is_some_and(|r| r.from == machine.ps_id && r.at_ms >= moved_at)
    });
    if resumed {
        let resyncing = machine.disks.iter().any(|disk| {
            node.progress
                .get(&disk.disk_id, Role::Agent)
                .is_some_and(|r| r.report.phase.starts_with("resync"))
        });
        let mut next = job.clone();
        next.updated_at_ms = now;
        next.state = JobState::Succeeded;
        let detail = if resyncing {
            "shipping through the new process server; resyncing what only the old one held"
        } else {
            "shipping through the new process server"
        };
        set_step(&mut next, RESUME, JobState::Succeeded, detail);
        return Some(Command::UpdateJob { job: next });
    }
    if now - moved_at > RESUME_TIMEOUT_MS {
        let why = format!(
            "the machine moved, but its new process server has not reported its disks within \
             {} minutes: is it running? (`lifeboat servers list`)",
            RESUME_TIMEOUT_MS / 60_000
        );
        return Some(Command::UpdateJob {
            job: job.failed(now, why),
        });
    }
    None
}

/// The drain step's progress, when it moved by at least [`PROGRESS_STEP`] points: how much of
/// what the process server held for the machine (its cache bytes, the most seen) is gone.
fn drain_percentage(node: &Node, job: &Job, machine: &ProtectedMachine, now: i64) -> Option<Job> {
    let held: u64 = machine
        .disks
        .iter()
        .filter_map(|d| node.progress.get(&d.disk_id, Role::ProcessServer))
        .filter(|r| r.from == machine.ps_id && r.report.draining)
        .map(|r| r.report.stored_bytes)
        .sum();
    let base = {
        let mut bases = node.progress.drain_base.lock().ok()?;
        let base = bases.entry(job.id.clone()).or_insert(held);
        *base = (*base).max(held);
        *base
    };
    if base == 0 {
        return None;
    }
    let pct = 100.0 * (base - held) as f64 / base as f64;
    let step = job.steps.get(DRAIN)?;
    if pct < step.progress_pct + PROGRESS_STEP || pct >= 100.0 {
        return None;
    }
    let mut next = job.clone();
    next.updated_at_ms = now;
    if let Some(step) = next.steps.get_mut(DRAIN) {
        step.progress_pct = pct.floor();
    }
    Some(next)
}

/// Keeps the bases of drain percentages only for `draining` switch jobs: however a drain
/// ended (drained, timed out, the machine unprotected, the switch replaced by a forced move
/// that failed the job in the same write), its base goes at the next reconcile tick.
pub fn keep_drain_bases(node: &Node, draining: &std::collections::HashSet<&str>) {
    if let Ok(mut bases) = node.progress.drain_base.lock() {
        bases.retain(|id, _| draining.contains(id.as_str()));
    }
}

/// Points by which the drain's percentage must move before the job is written again.
const PROGRESS_STEP: f64 = 5.0;

/// Sets step `i`'s state (and detail, unless empty).
fn set_step(job: &mut Job, i: usize, state: JobState, detail: &str) {
    if let Some(step) = job.steps.get_mut(i) {
        step.state = state;
        if state == JobState::Succeeded {
            step.progress_pct = 100.0;
        }
        if !detail.is_empty() {
            step.detail = detail.to_string();
        }
    }
}
