//! The leader's reconciler: turns what components report into replication state transitions
//! and job progress, and publishes per-disk lag metrics. Runs every second on the leader only;
//! it writes to Raft only when something changed (a transition, a job step, a percent of
//! progress), so reports at heartbeat rate never reach the log.
use crate::node::Node;
use crate::state::model::now_ms;
use crate::state::protection::{Job, JobState, ProtectedMachine, ReplicationState};
use crate::state::{Command, CommandResult};
use lifeboat_common::Role;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// An unprotect job stops waiting for a master target that stays away this long.
const UNREACHABLE_MT_GIVE_UP_MS: i64 = 5 * 60 * 1000;

pub async fn run(node: Arc<Node>, cancel: CancellationToken) {
    metrics::describe_gauge!("lifeboat_alerts", "Active alerts by kind");
    metrics::describe_gauge!(
        "lifeboat_disk_rpo_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest captured write not yet applied on the master target"
    );
    metrics::describe_gauge!(
        "lifeboat_disk_pending_bytes",
        metrics::Unit::Bytes,
        "Bytes captured but not yet applied on the master target"
    );
    metrics::describe_gauge!(
        "lifeboat_disk_sync_progress_ratio",
        "Initial sync or resync progress, 0 to 1"
    );
    metrics::describe_gauge!(
        "lifeboat_disk_eta_seconds",
        metrics::Unit::Seconds,
        "Expected time until the sync, resync or backlog is done (-1: unknown)"
    );
    metrics::describe_gauge!("lifeboat_jobs", "Jobs by state");
    let mut leader_since: Option<i64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = node.progress.phase_changed.notified() => {}
            _ = cancel.cancelled() => return,
        }
        if !node.is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(now_ms);
        // A new leader knows liveness only from the summary in Raft until components
        // heartbeat again: judge them only after that.
        let judge_liveness = now_ms() - since > 2 * node.settings.disconnected_after_ms;
        if let Err(e) = crate::alerts::reconcile(&node, judge_liveness).await {
            tracing::debug!("alerts: {e}");
        }
        if let Err(e) = reconcile_once(&node).await {
            tracing::debug!("reconcile: {e}");
        }
    }
}

/// What the agent's phase says the disk's state should be, if it should change.
fn next_state(current: ReplicationState, phase: &str) -> Option<(ReplicationState, &'static str)> {
    use ReplicationState::*;
    let next = match (current, phase) {
        // A short initial sync may finish between two reports: step through InitialSync.
        (Enabling, "initial_sync" | "streaming") => (InitialSync, "initial sync started"),
        (InitialSync, "streaming") => (Protected, "initial sync complete"),
        (Protected | Enabling | InitialSync | Resyncing, "resync_required") => {
            (ResyncRequired, "the change stream was interrupted")
        }
        // Likewise a short resync: step through Resyncing (ResyncRequired cannot become
        // Protected directly, and a refused step would leave the disk ResyncRequired).
        (ResyncRequired, "resync" | "streaming") => (Resyncing, "resync started"),
        (Resyncing, "streaming") => (Protected, "resync complete"),
        _ => return None,
    };
    (next.0 != current).then_some(next)
}

async fn reconcile_once(node: &Node) -> anyhow::Result<()> {
    let state = node.state();
    let machines = state.machines()?;
    let now = now_ms();
    let mut moved = false;
    node.progress.retain(|disk| {
        machines
            .iter()
            .any(|m| m.disks.iter().any(|d| d.disk_id == disk))
    });
    for machine in &machines {
        for disk in &machine.disks {
            let (report, lag) = node.disk_lag(machine, disk, now);
            let labels = [
                ("machine", machine.name.clone()),
                ("disk", disk.name.clone()),
            ];
            metrics::gauge!("lifeboat_disk_rpo_seconds", &labels).set(lag.rpo_secs);
            metrics::gauge!("lifeboat_disk_pending_bytes", &labels).set(lag.pending_bytes as f64);
            metrics::gauge!("lifeboat_disk_sync_progress_ratio", &labels)
                .set(lag.sync_progress_pct / 100.0);
            metrics::gauge!("lifeboat_disk_eta_seconds", &labels).set(lag.eta_secs as f64);
            let Some(received) = report else { continue };
            // Every step the report calls for, in this pass: a sync shorter than the agent's
            // report interval goes from Enabling through InitialSync to Protected on one
            // report, and waiting a pass for the second step kept `lifeboat wait` (and the
            // job) waiting up to a second for nothing. Each step moves on (`next_state`
            // never returns the current state) and no phase leads back: this ends.
            let mut current = disk.state;
            while let Some((next, why)) = next_state(current, &received.report.phase) {
                let reason = if received.report.error.is_empty() {
                    why.to_string()
                } else {
                    received.report.error.clone()
                };
                let result = node
                    .write(Command::SetDiskState {
                        machine: machine.name.clone(),
                        disk_id: disk.disk_id.clone(),
                        state: next,
                        reason,
                        at_ms: now,
                    })
                    .await?;
                if !matches!(result, CommandResult::Done) {
                    tracing::warn!(disk = %disk.disk_id, "state change refused: {result:?}");
                    break;
                }
                current = next;
                moved = true;
            }
        }
    }
    // Jobs follow the states just written, not the ones this pass started from: a protect
    // job ends in the pass its last disk became Protected.
    let machines = if moved {
        node.state().machines()?
    } else {
        machines
    };
    let jobs = state.jobs()?;
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    for job in &jobs {
        *counts.entry(job.state.as_str()).or_default() += 1;
    }
    for s in [JobState::Running, JobState::Succeeded, JobState::Failed] {
        metrics::gauge!("lifeboat_jobs", "state" => s.as_str())
            .set(*counts.get(s.as_str()).unwrap_or(&0) as f64);
    }
    let draining: std::collections::HashSet<&str> = jobs
        .iter()
        .filter(|j| j.state == JobState::Running && j.kind == "switch")
        .filter(|j| {
            j.steps
                .first()
                .is_some_and(|s| s.state == JobState::Running)
        })
        .map(|j| j.id.as_str())
        .collect();
    crate::switching::keep_drain_bases(node, &draining);
    for job in jobs.iter().filter(|j| j.state == JobState::Running) {
        let machine = machines.iter().find(|m| m.name == job.target);
        let update = |job: Option<Job>| job.map(|job| Command::UpdateJob { job });
        let command = match job.kind.as_str() {
            "protect" => update(protect_progress(node, job, machine, now)),
            "unprotect" => update(unprotect_progress(node, job, now)?),
            "switch" => crate::switching::progress(node, job, machine, now),
            _ => None,
        };
        if let Some(command) = command {
            node.write(command).await?;
        }
    }
    Ok(())
}

fn protect_progress(
    node: &Node,
    job: &Job,
    machine: Option<&ProtectedMachine>,
    now: i64,
) -> Option<Job> {
    let Some(machine) = machine else {
        // Its steps end too: a failed job showing a step still running misleads.
        return Some(job.failed(
            now,
            "the machine was unprotected before replication started".into(),
        ));
    };
    let mut next = job.clone();
    let (mut done, mut total) = (0u64, 0u64);
    for disk in &machine.disks {
        match node.progress.get(&disk.disk_id, Role::Agent) {
            // What is applied, as `status` counts it.
            Some(r) if r.report.phase == "initial_sync" => {
                done += crate::progress::synced_bytes(&r.report);
                total += r.report.sync_total_bytes;
            }
            // Streaming: the copy is over, though the disk's state may say so only at the
            // next pass (a sync shorter than the agent's report interval is never seen
            // in progress).
            Some(r) if r.report.phase == "streaming" => {
                done += disk.size_bytes;
                total += disk.size_bytes;
            }
            _ if disk.state == ReplicationState::Protected => {
                done += disk.size_bytes;
                total += disk.size_bytes;
            }
            _ => total += disk.size_bytes,
        }
    }
    let all_protected = machine
        .disks
        .iter()
        .all(|d| d.state == ReplicationState::Protected);
    let pct = if all_protected {
        100.0
    } else if total == 0 {
        0.0
    } else {
        (done as f64 * 100.0 / total as f64).floor()
    };
    // An agent that is not running replicates nothing: the step says what it waits for.
    let agent_away = !all_protected
        && node
            .state()
            .identity(&machine.agent_id)
            .ok()
            .flatten()
            .is_some_and(|r| !node.live(&r).connected);
    if let Some(step) = next.steps.get_mut(1) {
        step.progress_pct = pct;
        step.detail = format!("{} of {} MiB", done >> 20, total >> 20);
        if agent_away {
            step.detail += &format!(
                "; waiting for the agent of {} to connect (is `mobility-agent run` running there?)",
                machine.name
            );
        }
        if all_protected {
            step.state = JobState::Succeeded;
        }
    }
    if all_protected {
        if let Some(step) = next.steps.get_mut(2) {
            step.state = JobState::Succeeded;
            step.progress_pct = 100.0;
            step.detail = "all disks Protected".into();
        }
        next.state = JobState::Succeeded;
    }
    if next.steps == job.steps && next.state == job.state {
        return None;
    }
    next.updated_at_ms = now;
    Some(next)
}

fn unprotect_progress(node: &Node, job: &Job, now: i64) -> anyhow::Result<Option<Job>> {
    let Some(step) = job.steps.get(1) else {
        return Ok(None);
    };
    // "DISK,DISK on MT" (jobs recorded before the master target was named: the disks only).
    let (list, holder) = step
        .detail
        .split_once(" on ")
        .unwrap_or((step.detail.as_str(), ""));
    let disks: Vec<&str> = list.split(',').filter(|d| !d.is_empty()).collect();
    let state = node.state();
    let since = job.created_at_ms;
    let still_held = node
        .progress
        .reported_by(Role::MasterTarget, since)
        .iter()
        .any(|d| disks.contains(&d.as_str()));
    // The slots are free once the master target that held the disks has reported since
    // without them: another one heartbeating says nothing about it.
    let heard_since = state
        .identities()?
        .into_iter()
        .filter(|r| r.role == Role::MasterTarget && (holder.is_empty() || r.id == holder))
        .any(|r| {
            let (last, _, connected) = node.live_view(&r);
            connected && last > since
        });
    let detail = if !still_held && heard_since {
        "disk slots freed"
    } else if now - since > UNREACHABLE_MT_GIVE_UP_MS {
        "master target not heard from; it frees the slots when it returns"
    } else {
        return Ok(None);
    };
    let mut next = job.clone();
    next.state = JobState::Succeeded;
    next.updated_at_ms = now;
    if let Some(step) = next.steps.get_mut(1) {
        step.state = JobState::Succeeded;
        step.progress_pct = 100.0;
        step.detail = detail.into();
    }
    Ok(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState::*;

    #[test]
    fn agent_phases_drive_the_state_machine() {
        assert_eq!(
            next_state(Enabling, "initial_sync").map(|n| n.0),
            Some(InitialSync)
        );
        assert_eq!(
            next_state(InitialSync, "streaming").map(|n| n.0),
            Some(Protected)
        );
        assert_eq!(
            next_state(Protected, "resync_required").map(|n| n.0),
            Some(ResyncRequired)
        );
        assert_eq!(
            next_state(ResyncRequired, "resync").map(|n| n.0),
            Some(Resyncing)
        );
        assert_eq!(
            next_state(Resyncing, "streaming").map(|n| n.0),
            Some(Protected)
        );
        assert_eq!(next_state(Protected, "streaming"), None);
        assert_eq!(next_state(FailedOver, "streaming"), None);
        for (from, phase) in [
            (Enabling, "initial_sync"),
            (Protected, "resync_required"),
            (ResyncRequired, "resync"),
        ] {
            let (to, _) = next_state(from, phase).unwrap();
            assert!(from.can_become(to), "{from:?} -> {to:?} must be allowed");
        }
    }

    /// A pass takes every step one report calls for (`reconcile_once`): from any state, a
    /// phase leads through allowed steps to a state it leaves alone, in a few steps.
    #[test]
    fn every_phase_settles_in_a_few_allowed_steps() {
        let phases = [
            "initial_sync",
            "streaming",
            "resync_required",
            "resync",
            "other",
        ];
        for from in ReplicationState::ALL {
            for phase in phases {
                let (mut current, mut steps) = (from, 0);
                while let Some((next, _)) = next_state(current, phase) {
                    assert!(
                        current.can_become(next),
                        "{current:?} -> {next:?} ({phase})"
                    );
                    current = next;
                    steps += 1;
                    assert!(steps <= 3, "{from:?} does not settle on {phase}");
                }
            }
        }
        // The short sync: one report of "streaming" while the disk is still Enabling.
        let mut current = Enabling;
        while let Some((next, _)) = next_state(current, "streaming") {
            current = next;
        }
        assert_eq!(current, Protected);
    }
}
