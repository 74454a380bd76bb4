//! The leader's reconciler: turns what components report into replication state transitions
//! and job progress, and publishes per-disk lag metrics. Runs every second on the leader only;
//! it writes to Raft only when something changed (a transition, a job step, a percent of
//! progress), so reports at heartbeat rate never reach the log.
use crate::node::Node;
use crate::state::model::now_ms;
use crate::state::protection::{Alert, Job, JobState, ProtectedMachine, ReplicationState};
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
        if let Err(e) = reconcile_alerts(&node, judge_liveness).await {
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

/// Every kind of alert, each published as `lifeboat_alerts{kind}` (0 when none is active).
const ALERT_KINDS: [&str; 9] = [
    "rpo",
    "stall",
    "resync",
    "down",
    "cache",
    "cache-critical",
    "drain",
    "retention-space",
    "retention-space-critical",
];

/// An alert's kind: its key up to the first `/`.
fn alert_kind(key: &str) -> String {
    key.split('/').next().unwrap_or("").to_string()
}

/// Raises and clears alerts: a protected disk's RPO over its policy's threshold, a disk that
/// needs a resync, a component that stopped heartbeating.
async fn reconcile_alerts(node: &Node, judge_liveness: bool) -> anyhow::Result<()> {
    let state = node.state();
    let now = now_ms();
    let mut wanted: Vec<Alert> = Vec::new();
    // RPO alerts of disks not yet judged (see below): neither raised nor cleared this pass.
    let mut unjudged: Vec<String> = Vec::new();
    let machines = state.machines()?;
    for machine in &machines {
        let threshold = state
            .policy(&machine.policy)?
            .map(|p| p.rpo_threshold_secs)
            .unwrap_or(0);
        for disk in &machine.disks {
            let subject = format!("{}/{}", machine.name, disk.name);
            let (report, lag) = node.disk_lag(machine, disk, now);
            // A leader that has not yet heard from an agent (it just took over, or restarted)
            // does not know its disks' RPO: it judges them once agents have had time to report.
            let known = report.is_some() || judge_liveness;
            if !known {
                unjudged.push(format!("rpo/{}", disk.disk_id));
            }
            if disk.state == ReplicationState::Protected
                && known
                && threshold > 0
                && lag.rpo_secs > threshold as f64
            {
                wanted.push(Alert {
                    key: format!("rpo/{}", disk.disk_id),
                    severity: "critical".into(),
                    subject: subject.clone(),
                    message: format!(
                        // Raised once and kept as it is: the figure is the one at raising,
                        // said so, with where to see the current one.
                        "RPO over the threshold of {threshold}s of policy {} ({:.0}s when \
                         raised; `lifeboat status` shows it now)",
                        machine.policy, lag.rpo_secs
                    ),
                    raised_at_ms: now,
                });
            }
            let stall = node.stall(machine, disk);
            if !stall.is_empty() {
                wanted.push(Alert {
                    key: format!("stall/{}", disk.disk_id),
                    severity: "critical".into(),
                    subject: subject.clone(),
                    message: format!(
                        "replication waits: {stall}; the batches stay in the process \
                         server's cache meanwhile"
                    ),
                    raised_at_ms: now,
                });
            }
            if disk.state == ReplicationState::ResyncRequired {
                wanted.push(Alert {
                    key: format!("resync/{}", disk.disk_id),
                    severity: "warning".into(),
                    subject,
                    message: format!("needs a resync: {}", disk.state_reason),
                    raised_at_ms: now,
                });
            }
        }
    }
    wanted.extend(cache_alerts(node, now)?);
    wanted.extend(crate::retention::retention_alerts(node, now)?);
    if judge_liveness {
        for r in state.identities()? {
            if r.revoked.is_some()
                || !matches!(
                    r.role,
                    Role::ProcessServer | Role::MasterTarget | Role::Agent | Role::ConfigServer
                )
            {
                continue;
            }
            let (last, _, connected) = node.live_view(&r);
            if !connected {
                let mut message = if last == 0 {
                    "has never sent a heartbeat".to_string()
                } else {
                    // A time, not an age: the alert is raised once and keeps its message.
                    let at = std::time::UNIX_EPOCH + Duration::from_millis(last as u64);
                    format!(
                        "no heartbeat since {}",
                        humantime::format_rfc3339_seconds(at)
                    )
                };
                // A failed-over machine no longer replicates: it runs from views on its
                // master target, and needs nothing of its process server.
                let failed_over = |m: &&ProtectedMachine| m.recovery.failover.is_some();
                let served: Vec<&str> = machines
                    .iter()
                    .filter(|m| (m.ps_id == r.id || m.mt_id == r.id) && !failed_over(m))
                    .map(|m| m.name.as_str())
                    .collect();
                let running_from: Vec<&str> = machines
                    .iter()
                    .filter(|m| m.mt_id == r.id && failed_over(m))
                    .map(|m| m.name.as_str())
                    .collect();
                // An agent whose machine is not protected puts no replica at risk.
                let idle_agent =
                    r.role == Role::Agent && !machines.iter().any(|m| m.agent_id == r.id);
                let removable = matches!(r.role, Role::ProcessServer | Role::MasterTarget);
                if !running_from.is_empty() {
                    message.push_str(&format!(
                        "; failed-over machine(s) {} run from its disks and cannot read or write them \
                         until it is back: start it again",
                        running_from.join(", ")
                    ));
                }
                if served.is_empty() && running_from.is_empty() && (removable || idle_agent) {
                    message.push_str(&format!(
                        "; if it was taken out of service, `lifeboat servers revoke {}` \
                         removes it and this alert",
                        r.id
                    ));
                }
                if !served.is_empty() {
                    message.push_str(&format!(
                        "; replication of {} waits for it: start it again",
                        served.join(", ")
                    ));
                    if r.role == Role::ProcessServer {
                        // DESIGN §8: its machines can move to another process server.
                        message.push_str(
                            ", or move its machines with `lifeboat switch MACHINE --to OTHER \
                             --force` (what only its cache held is resynced)",
                        );
                    }
                }
                wanted.push(Alert {
                    key: format!("down/{}", r.id),
                    severity: if idle_agent { "warning" } else { "critical" }.into(),
                    subject: format!("{} {}", r.role, r.name),
                    message,
                    raised_at_ms: now,
                });
            }
        }
    }
    let active = state.alerts()?;
    let mut kinds: HashMap<String, u64> = HashMap::new();
    for alert in &wanted {
        *kinds.entry(alert_kind(&alert.key)).or_default() += 1;
        if !active.iter().any(|a| a.key == alert.key) {
            node.write(Command::RaiseAlert {
                alert: alert.clone(),
            })
            .await?;
        }
    }
    for alert in active {
        let kind_judged =
            (judge_liveness || !alert.key.starts_with("down/")) && !unjudged.contains(&alert.key);
        if kind_judged && !wanted.iter().any(|w| w.key == alert.key) {
            node.write(Command::ClearAlert {
                key: alert.key,
                at_ms: now,
            })
            .await?;
        } else if !kind_judged {
            // Kept until judged (a new leader): still active, so still counted.
            *kinds.entry(alert_kind(&alert.key)).or_default() += 1;
        }
    }
    for kind in ALERT_KINDS {
        metrics::gauge!("lifeboat_alerts", "kind" => kind)
            .set(*kinds.get(kind).unwrap_or(&0) as f64);
    }
    Ok(())
}

/// Process-server cache alerts: over 75% (warning) and 90% (critical) of its quota, and a
/// forecast time to drain the cache longer than the strictest RPO threshold of the machines
/// it serves (cache bytes over the drain rate; data arriving with nothing draining counts as
/// never).
fn cache_alerts(node: &Node, now: i64) -> anyhow::Result<Vec<Alert>> {
    let state = node.state();
    let machines = state.machines()?;
    let mut out = Vec::new();
    for r in state.identities()? {
        if r.role != Role::ProcessServer || r.revoked.is_some() {
            continue;
        }
        let (_, facts, connected) = node.live_view(&r);
        if !connected || facts.cache_quota_bytes == 0 {
            continue;
        }
        let subject = format!("process server {}", r.name);
        let fill = facts.cache_used_bytes as f64 / facts.cache_quota_bytes as f64;
        let usage = format!(
            "cache {} MiB of the {} MiB it may hold ({:.0}%; its quota, or its file \
             system's room when that is less)",
            facts.cache_used_bytes >> 20,
            facts.cache_quota_bytes >> 20,
            fill * 100.0
        );
        for (level, key, severity) in [
            (0.75, "cache", "warning"),
            (0.9, "cache-critical", "critical"),
        ] {
            if fill > level {
                out.push(Alert {
                    key: format!("{key}/{}", r.id),
                    severity: severity.into(),
                    subject: subject.clone(),
                    message: format!(
                        "{usage}: master targets are not keeping up; agents are slowed and fall back to resync at the limit"
                    ),
                    raised_at_ms: now,
                });
            }
        }
        let mut threshold = u64::MAX;
        for m in machines.iter().filter(|m| m.ps_id == r.id) {
            if let Some(p) = state.policy(&m.policy)? {
                if p.rpo_threshold_secs > 0 {
                    threshold = threshold.min(p.rpo_threshold_secs);
                }
            }
        }
        let drain = facts.cache_drain_bytes_per_sec;
        let forecast = drain_forecast(
            facts.cache_used_bytes,
            facts.cache_fill_bytes_per_sec,
            drain,
        );
        if threshold != u64::MAX && forecast > threshold as f64 {
            let when = if forecast.is_finite() {
                format!("{forecast:.0}s at {:.1} MB/s", drain / 1e6)
            } else {
                "never: nothing is draining while data arrives".into()
            };
            out.push(Alert {
                key: format!("drain/{}", r.id),
                severity: "warning".into(),
                subject,
                message: format!(
                    "{usage} drains in {when}, longer than the RPO threshold of {threshold}s"
                ),
                raised_at_ms: now,
            });
        }
    }
    Ok(out)
}

/// A cache smaller than this has no drain forecast: the process server frees its cache a
/// segment (64 MiB) at a time, so over one report interval a nearly empty cache can show
/// data arriving and nothing freed although it keeps up; a small backlog that really does not
/// drain shows as its disks' RPO alerts.
const DRAIN_FORECAST_FROM_BYTES: u64 = 64 << 20;

/// Seconds until a cache holding `used` bytes is empty at the measured rates (infinite when
/// data arrives and nothing drains; 0 for a cache too small to forecast).
fn drain_forecast(used: u64, fill_per_sec: f64, drain_per_sec: f64) -> f64 {
    if used < DRAIN_FORECAST_FROM_BYTES {
        0.0
    } else if drain_per_sec > 0.0 {
        used as f64 / drain_per_sec
    } else if fill_per_sec > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
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
            // What is applied, as `status` counts it (see `progress::lag`).
            Some(r) if r.report.phase == "initial_sync" => {
                done += r
                    .report
                    .sync_done_bytes
                    .saturating_sub(r.report.pending_bytes);
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
    if let Some(step) = next.steps.get_mut(1) {
        step.progress_pct = pct;
        step.detail = format!("{} of {} MiB", done >> 20, total >> 20);
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
    fn only_a_real_backlog_has_a_drain_forecast() {
        let mib = 1u64 << 20;
        // Nearly empty, data arriving, no segment freed in this interval: keeping up.
        assert_eq!(drain_forecast(26_384, 5e6, 0.0), 0.0);
        assert_eq!(drain_forecast(63 * mib, 5e6, 0.0), 0.0);
        // A backlog with nothing draining never empties; one draining has a time.
        assert_eq!(drain_forecast(100 * mib, 5e6, 0.0), f64::INFINITY);
        assert_eq!(drain_forecast(100 * mib, 0.0, 0.0), 0.0);
        assert_eq!(drain_forecast(100 * mib, 5e6, mib as f64), 100.0);
    }

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
