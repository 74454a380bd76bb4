//! Alerts about master targets' retention space (DESIGN §6: history is never lost silently).
//! Each master target reports its file system's free space and each replica's journal size;
//! when the space runs low the operator is told how much the journals hold and what to do,
//! well before the master target has to refuse batches (it keeps 256 MiB free, and the
//! process servers hold what it refuses).
use crate::node::Node;
use crate::state::protection::Alert;
use lifeboat_common::facts::MT_SPACE_RESERVE;
use lifeboat_common::Role;

/// Free space below these fractions raises a warning, then a critical alert.
const WARN_FREE: f64 = 0.15;
const CRITICAL_FREE: f64 = 0.05;
/// The master target keeps `MT_SPACE_RESERVE` free and refuses a group that would take it
/// below: on a small file system the fractions above come too late, so free space under
/// twice the reserve warns, and under the reserve plus a 64 MiB group's room is critical (the
/// master target is refusing batches, or about to).
const WARN_BYTES: u64 = 2 * MT_SPACE_RESERVE;
const CRITICAL_BYTES: u64 = MT_SPACE_RESERVE + (128 << 20);

pub fn retention_alerts(node: &Node, now: i64) -> anyhow::Result<Vec<Alert>> {
    let state = node.state();
    let machines = state.machines()?;
    let mut out = Vec::new();
    for r in state.identities()? {
        if r.role != Role::MasterTarget || r.revoked.is_some() {
            continue;
        }
        let (_, facts, connected) = node.live_view(&r);
        if !connected || facts.total_bytes == 0 {
            continue;
        }
        let free = facts.free_bytes as f64 / facts.total_bytes as f64;
        let journals: u64 = machines
            .iter()
            .filter(|m| m.mt_id == r.id)
            .flat_map(|m| m.disks.iter())
            .filter_map(|d| node.progress.get(&d.disk_id, Role::MasterTarget))
            .map(|p| p.report.journal_bytes)
            .sum();
        for (level, bytes, key, severity) in [
            (WARN_FREE, WARN_BYTES, "retention-space", "warning"),
            (
                CRITICAL_FREE,
                CRITICAL_BYTES,
                "retention-space-critical",
                "critical",
            ),
        ] {
            if free < level || facts.free_bytes < bytes {
                out.push(Alert {
                    key: format!("{key}/{}", r.id),
                    severity: severity.into(),
                    subject: format!("{} {}", r.role.noun(), r.name),
                    message: format!(
                        "{} MiB free of {} MiB ({:.0}%); retention journals hold {} MiB. \
                         Shorten the policies' retention or add space: at 256 MiB free the \
                         master target stops applying and the process servers' caches fill",
                        facts.free_bytes >> 20,
                        facts.total_bytes >> 20,
                        free * 100.0,
                        journals >> 20
                    ),
                    raised_at_ms: now,
                });
            }
        }
    }
    Ok(out)
}
