//! `Protection.BalanceProcessServers`: shows (and with `apply` starts) the moves that balance
//! protected machines over the process servers (`crate::balance` plans them). The change
//! rates are the agents' last reports (5-minute averages); cache headroom is each process
//! server's quota minus what its cache holds, from its last heartbeat. Machines failed over
//! are left out; machines already moving count where they go.
use super::protection::ProtectionService;
use crate::balance::{self, Machine, Server};
use crate::node::storage_status;
use lifeboat_common::Role;
use lifeboat_proto::v1;
use tonic::Status;

impl ProtectionService {
    pub(super) async fn balance(&self, req: v1::BalanceRequest) -> Result<v1::BalancePlan, Status> {
        let state = self.node.state();
        let records: Vec<_> = state
            .identities()
            .map_err(storage_status)?
            .into_iter()
            .filter(|r| r.role == Role::ProcessServer && r.revoked.is_none())
            .collect();
        let views: Vec<_> = records.iter().map(|r| self.node.live_view(r)).collect();
        let servers: Vec<Server> = records
            .iter()
            .zip(&views)
            .map(|(r, (_, facts, connected))| Server {
                id: r.id.clone(),
                headroom_bytes: facts
                    .cache_quota_bytes
                    .saturating_sub(facts.cache_used_bytes),
                eligible: *connected,
            })
            .collect();
        let machines: Vec<Machine> = state
            .machines()
            .map_err(storage_status)?
            .into_iter()
            .filter(|m| m.recovery.failover.is_none())
            .map(|m| Machine {
                change_bytes_per_sec: m
                    .disks
                    .iter()
                    .filter_map(|d| self.node.progress.get(&d.disk_id, Role::Agent))
                    .map(|r| r.report.change_bytes_per_sec)
                    .sum(),
                name: m.name,
                // A machine already moving weighs where it goes, and stays out of the plan.
                movable: m.switching.is_none(),
                ps_id: m.switching.map_or(m.ps_id, |s| s.to_ps),
            })
            .collect();
        let moves = balance::plan(&servers, &machines);
        let (before, after) = (
            balance::loads(&servers, &machines, &[]),
            balance::loads(&servers, &machines, &moves),
        );
        let count = |id: &str, moved: bool| {
            machines
                .iter()
                .filter(|m| {
                    let mv = moves.iter().find(|mv| mv.machine == m.name);
                    match (moved, mv) {
                        (true, Some(mv)) => mv.to == id,
                        _ => m.ps_id == id,
                    }
                })
                .count() as u32
        };
        let name_of = |id: &str| {
            records
                .iter()
                .find(|r| r.id == id)
                .map_or_else(|| id.to_string(), |r| r.name.clone())
        };
        let plan_servers = records
            .iter()
            .zip(&views)
            .enumerate()
            .map(|(i, (r, (_, facts, connected)))| v1::BalanceServer {
                name: r.name.clone(),
                connected: *connected,
                cache_quota_bytes: facts.cache_quota_bytes,
                cache_used_bytes: facts.cache_used_bytes,
                change_bytes_per_sec: before[i],
                change_bytes_per_sec_after: after[i],
                machines: count(&r.id, false),
                machines_after: count(&r.id, true),
            })
            .collect();
        let mut plan_moves = Vec::new();
        for mv in moves {
            let mut out = v1::BalanceMove {
                machine: mv.machine.clone(),
                from: name_of(&mv.from),
                to: name_of(&mv.to),
                change_bytes_per_sec: mv.change_bytes_per_sec,
                ..Default::default()
            };
            if req.apply {
                let request = v1::SwitchRequest {
                    machine: mv.machine,
                    to: mv.to,
                    force: false,
                };
                match self.switch(request).await {
                    Ok(job) => out.job_id = job.id,
                    Err(status) => out.error = status.message().to_string(),
                }
            }
            plan_moves.push(out);
        }
        Ok(v1::BalancePlan {
            servers: plan_servers,
            moves: plan_moves,
        })
    }
}
