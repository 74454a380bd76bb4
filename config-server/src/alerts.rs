//! The alerts the leader raises and clears (DESIGN §4): a protected disk's RPO over its
//! policy's threshold, a disk whose process server cannot forward, a disk needing a resync, a
//! component that stopped heartbeating, a process server's cache filling or not draining, and
//! (from `retention`) a master target's file system running out of room. Each kind's count is
//! published as `lifeboat_alerts{kind}`; raising and clearing go through Raft (and the audit).
use crate::node::Node;
use crate::state::model::now_ms;
use crate::state::protection::{Alert, ProtectedMachine, ReplicationState};
use crate::state::Command;
use lifeboat_common::Role;
use std::collections::HashMap;
use std::time::Duration;

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
pub async fn reconcile(node: &Node, judge_liveness: bool) -> anyhow::Result<()> {
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
                        "RPO over the threshold of {threshold}s of policy {} ({:.1}s when \
                         raised; `lifeboat status` shows it now)",
                        machine.policy, lag.rpo_secs
                    ),
                    raised_at_ms: now,
                });
            }
            if let Some(stall) = node.stall(machine, disk) {
                wanted.push(Alert {
                    key: format!("stall/{}", disk.disk_id),
                    severity: "critical".into(),
                    subject: subject.clone(),
                    message: stall.alert_message(),
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
            let live = node.live(&r);
            let last = live.seen.last_ms;
            if !live.connected {
                let mut message = if last == 0 {
                    "has never sent a heartbeat".to_string()
                } else {
                    // A time, not an age: the alert is raised once and keeps its message.
                    let at = std::time::UNIX_EPOCH + Duration::from_millis(last as u64);
                    let at = humantime::format_rfc3339_seconds(at);
                    if live.seen.signed_off {
                        format!("stopped at {at} (signed off: a clean stop)")
                    } else {
                        format!("no heartbeat since {at}")
                    }
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
                    subject: format!("{} {}", r.role.noun(), r.name),
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
        let subject = format!("{} {}", r.role.noun(), r.name);
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
                format!("{forecast:.0}s at {:.1} MiB/s", drain / 1048576.0)
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
/// segment (64 MiB) at a time, and the segment being written and the one before it may both
/// wait for their last batches to be applied — so over one report interval a cache of up to
/// three segments can show data arriving and nothing freed although it keeps up (at 145 MiB
/// at the start of a burst that drained in 6 s, the forecast said "never"). A smaller backlog
/// that really does not drain shows as its disks' RPO alerts.
const DRAIN_FORECAST_FROM_BYTES: u64 = 3 * (64 << 20);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_real_backlog_has_a_drain_forecast() {
        let mib = 1u64 << 20;
        // Nearly empty, data arriving, no segment freed in this interval: keeping up.
        assert_eq!(drain_forecast(26_384, 5e6, 0.0), 0.0);
        assert_eq!(drain_forecast(191 * mib, 5e6, 0.0), 0.0);
        // A backlog with nothing draining never empties; one draining has a time.
        assert_eq!(drain_forecast(200 * mib, 5e6, 0.0), f64::INFINITY);
        assert_eq!(drain_forecast(200 * mib, 0.0, 0.0), 0.0);
        assert_eq!(drain_forecast(200 * mib, 5e6, mib as f64), 200.0);
    }
}
