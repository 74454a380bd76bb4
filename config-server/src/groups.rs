//! Group-consistent recovery points (DESIGN §7): one barrier across every agent of a
//! protection group, coordinated by the leader. A barrier goes through phases the agents
//! learn from their heartbeat replies (they heartbeat every 200 ms while one is under way):
//! `prepare` (agents answer `prepared`), `hold` (each agent holds new writes on all its disks
//! and answers `held`), `tag` (each places `group:<id>:<group>` on all its disks at one
//! instant, releases the writes and answers `tagged`). Writes are held only from `hold` to
//! `tag`: two heartbeats of the slowest agent, well under a second. A barrier that does not
//! advance in time is aborted (`abort`: agents release without a tag); an agent also
//! releases on its own after `HOLD_MAX`, so a lost configuration server cannot freeze
//! writes. The barrier lives in Raft (a phase change is one write), so any node answers
//! heartbeats with it.
use crate::node::Node;
use crate::state::groups::{Barrier, BarrierPhase, ProtectionGroup};
use crate::state::model::now_ms;
use crate::state::protection::ReplicationState;
use crate::state::Command;
use lifeboat_common::Role;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the leader looks at barriers.
const TICK: Duration = Duration::from_millis(100);
/// Longest the agents get to answer `prepare` (they may be one heartbeat interval away).
const PREPARE_TIMEOUT_MS: i64 = 30_000;
/// Longest writes may be held, end to end; agents enforce it too.
pub const HOLD_MAX_MS: i64 = 5_000;

/// What every agent of the group must have answered for the barrier to advance.
fn answered(node: &Node, group: &ProtectionGroup, barrier: &Barrier, want: &str) -> bool {
    let Ok(state) = node.state().machines() else {
        return false;
    };
    let expect = format!("{want}:{}", barrier.id);
    group.machines.iter().all(|name| {
        state.iter().find(|m| &m.name == name).is_some_and(|m| {
            m.disks.iter().all(|d| {
                node.progress
                    .get(&d.disk_id, Role::Agent)
                    .is_some_and(|r| r.report.barrier == expect)
            })
        })
    })
}

/// Every machine of the group protected, streaming-ready (no failover under way).
fn ready(node: &Node, group: &ProtectionGroup) -> bool {
    let Ok(machines) = node.state().machines() else {
        return false;
    };
    !group.machines.is_empty()
        && group.machines.iter().all(|name| {
            machines.iter().find(|m| &m.name == name).is_some_and(|m| {
                m.recovery.failover.is_none()
                    && m.disks
                        .iter()
                        .all(|d| d.state == ReplicationState::Protected)
            })
        })
}

async fn put(node: &Node, group: &str, barrier: Option<Barrier>, last_point_ms: Option<i64>) {
    let command = Command::PutBarrier {
        group: group.to_string(),
        barrier,
        last_point_ms,
    };
    if let Err(e) = node.write(command).await {
        tracing::warn!(group, "barrier not recorded: {}", e.message());
    }
}

/// Runs on every node; acts only while this node leads.
pub async fn coordinate(node: Arc<Node>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = cancel.cancelled() => return,
        }
        if !node.is_leader() {
            continue;
        }
        let Ok(groups) = node.state().groups() else {
            continue;
        };
        let now = now_ms();
        for group in groups {
            step(&node, &group, now).await;
        }
    }
}

async fn step(node: &Node, group: &ProtectionGroup, now: i64) {
    let Some(barrier) = group.barrier.clone() else {
        let due = group.every_secs > 0
            && now - group.last_point_ms >= (group.every_secs as i64).saturating_mul(1000);
        if due && ready(node, group) {
            let barrier = Barrier {
                id: now,
                phase: BarrierPhase::Prepare,
                phase_since_ms: now,
            };
            put(node, &group.name, Some(barrier), None).await;
        }
        return;
    };
    let age = now - barrier.phase_since_ms;
    let next = |phase| Barrier {
        phase,
        phase_since_ms: now,
        ..barrier.clone()
    };
    match barrier.phase {
        BarrierPhase::Prepare if answered(node, group, &barrier, "prepared") => {
            put(node, &group.name, Some(next(BarrierPhase::Hold)), None).await
        }
        BarrierPhase::Prepare if age > PREPARE_TIMEOUT_MS => {
            tracing::warn!(group = %group.name, "group point abandoned: not every agent answered");
            put(node, &group.name, Some(next(BarrierPhase::Abort)), None).await
        }
        BarrierPhase::Hold if answered(node, group, &barrier, "held") => {
            put(node, &group.name, Some(next(BarrierPhase::Tag)), None).await
        }
        BarrierPhase::Hold if age > HOLD_MAX_MS => {
            tracing::warn!(group = %group.name, "group point abandoned: writes could not all be held in time");
            put(node, &group.name, Some(next(BarrierPhase::Abort)), None).await
        }
        BarrierPhase::Tag if answered(node, group, &barrier, "tagged") => {
            metrics::counter!("lifeboat_group_points_total", "group" => group.name.clone())
                .increment(1);
            put(node, &group.name, None, Some(barrier.id)).await
        }
        BarrierPhase::Tag if age > PREPARE_TIMEOUT_MS => {
            // An agent that never answered released its writes on its own after HOLD_MAX;
            // a point it did place is listed only if every disk holds it.
            tracing::warn!(group = %group.name, "group point: not every agent confirmed its tag");
            put(node, &group.name, None, Some(now)).await
        }
        BarrierPhase::Abort if age > HOLD_MAX_MS => {
            // Every agent has released by now, told or on its own.
            put(node, &group.name, None, Some(now)).await
        }
        _ => {}
    }
}
