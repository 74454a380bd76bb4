//! Component service: heartbeats of process servers, master targets and agents. Liveness and
//! disk progress are kept in memory (see `liveness`, `progress`); a follower also forwards the
//! heartbeat to the leader, which summarises liveness into Raft and drives state transitions.
//! The reply tells the component which disks it handles now.
use crate::node::{storage_status, Node};
use crate::state::model::{now_ms, Facts};
use crate::state::protection::ProtectedMachine;
use lifeboat_common::peer::Peer;
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, component_server::Component, ForwardedHeartbeat};
use prost::Message;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub struct ComponentService {
    node: Arc<Node>,
    /// Changes whenever an applied entry may have changed someone's assignments.
    assignments_changed: watch::Receiver<u64>,
}

impl ComponentService {
    pub fn new(node: Arc<Node>, assignments_changed: watch::Receiver<u64>) -> Self {
        ComponentService {
            node,
            assignments_changed,
        }
    }
}

/// Records a heartbeat locally and, on a follower, passes it on to the leader (best effort:
/// the component is answered either way).
pub async fn accept_heartbeat(
    node: &Node,
    id: &str,
    role: Role,
    request: &v1::HeartbeatRequest,
    forward: bool,
) {
    let now = now_ms();
    let facts = request
        .facts
        .as_ref()
        .map(Facts::from_proto)
        .unwrap_or_default();
    node.liveness.record(id, now, facts, request.signing_off);
    node.progress.record(role, id, now, request.disks.clone());
    if !forward || node.is_leader() {
        return;
    }
    let Some((_, leader)) = node.leader() else {
        return;
    };
    match node.peer_client(&leader) {
        Ok(mut client) => {
            let forwarded = ForwardedHeartbeat {
                identity_id: id.to_string(),
                data: request.encode_to_vec(),
            };
            if let Err(e) = client.forward_heartbeat(forwarded).await {
                tracing::debug!(
                    "cannot forward heartbeat to leader {leader}: {}",
                    e.message()
                );
            }
        }
        Err(e) => tracing::debug!("no client for leader {leader}: {}", e.message()),
    }
}

/// The disks `peer` handles, with where their data goes.
pub fn assignments_for(node: &Node, peer: &Peer) -> Result<Vec<v1::DiskAssignment>, Status> {
    let state = node.state();
    let mine = |m: &ProtectedMachine| match peer.role {
        Role::Agent => m.agent_id == peer.id,
        Role::ProcessServer => m.ps_id == peer.id,
        Role::MasterTarget => m.mt_id == peer.id,
        _ => false,
    };
    let address_of = |id: &str| -> Result<String, Status> {
        Ok(match state.identity(id).map_err(storage_status)? {
            Some(record) => node.live_view(&record).1.address,
            None => String::new(),
        })
    };
    let mut assignments = Vec::new();
    let groups = if peer.role == Role::Agent {
        state.groups().map_err(storage_status)?
    } else {
        Vec::new()
    };
    for machine in state
        .machines()
        .map_err(storage_status)?
        .into_iter()
        .filter(mine)
    {
        let policy = state.policy(&machine.policy).map_err(storage_status)?;
        let (ps_address, mt_address) = (address_of(&machine.ps_id)?, address_of(&machine.mt_id)?);
        let barrier = groups
            .iter()
            .find(|g| g.machines.contains(&machine.name))
            .map(|g| g.barrier_signal())
            .unwrap_or_default();
        for disk in &machine.disks {
            assignments.push(v1::DiskAssignment {
                disk_id: disk.disk_id.clone(),
                machine: machine.name.clone(),
                disk_name: disk.name.clone(),
                source_path: disk.source_path.clone(),
                size_bytes: disk.size_bytes,
                state: disk.state.as_str().into(),
                process_server_id: machine.ps_id.clone(),
                process_server_address: ps_address.clone(),
                master_target_id: machine.mt_id.clone(),
                master_target_address: mt_address.clone(),
                crash_consistent_every_secs: policy
                    .as_ref()
                    .map(|p| p.crash_consistent_every_secs)
                    .unwrap_or(0),
                app_consistent_every_secs: policy
                    .as_ref()
                    .map(|p| p.app_consistent_every_secs)
                    .unwrap_or(0),
                compression: policy.as_ref().map(|p| p.compression).unwrap_or(true),
                agent_id: machine.agent_id.clone(),
                retention_secs: policy.as_ref().map(|p| p.retention_secs).unwrap_or(0),
                stop_writes: machine.recovery.stop_writes,
                barrier: barrier.clone(),
                draining: machine.switching.is_some(),
            });
        }
    }
    Ok(assignments)
}

/// `peer`'s assignments as of one applied log index (computed again if the state moved on
/// while they were being put together), with that index.
fn versioned_assignments(
    node: &Node,
    peer: &Peer,
) -> Result<(Vec<v1::DiskAssignment>, u64), Status> {
    loop {
        let before = node.applied_index();
        let assignments = assignments_for(node, peer)?;
        if node.applied_index() == before {
            return Ok((assignments, before));
        }
    }
}

fn digest(assignments: &[v1::DiskAssignment]) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    for a in assignments {
        hasher.update(&a.encode_to_vec());
    }
    hasher.finalize().as_bytes().to_vec()
}

/// Longest wait of an `AwaitAssignments` call.
const MAX_AWAIT_SECS: u32 = 60;

#[tonic::async_trait]
impl Component for ComponentService {
    async fn await_assignments(
        &self,
        request: Request<v1::AwaitAssignmentsRequest>,
    ) -> Result<Response<v1::AssignmentsResponse>, Status> {
        let (peer, _record) = self.node.authorize(
            &request,
            &[Role::ProcessServer, Role::MasterTarget, Role::Agent],
        )?;
        let r = request.into_inner();
        let wait = std::time::Duration::from_secs(r.wait_secs.clamp(1, MAX_AWAIT_SECS) as u64);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = self.assignments_changed.clone();
        loop {
            // Marked seen before reading, so a change made while reading wakes the wait below.
            changed.borrow_and_update();
            let (assignments, applied_index) = versioned_assignments(&self.node, &peer)?;
            let digest = digest(&assignments);
            if digest != r.known_digest || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(v1::AssignmentsResponse {
                    assignments,
                    digest,
                    applied_index,
                }));
            }
            // Woken only by entries that touch machines, policies or groups (addresses come
            // from liveness and reach components with their heartbeats).
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        tokio::time::sleep_until(deadline).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let (peer, _record) = self.node.authorize(
            &request,
            &[
                Role::ProcessServer,
                Role::MasterTarget,
                Role::Agent,
                Role::ConfigServer,
            ],
        )?;
        accept_heartbeat(&self.node, &peer.id, peer.role, request.get_ref(), true).await;
        let revoked_identity_ids = self
            .node
            .state()
            .identities()
            .map_err(storage_status)?
            .into_iter()
            .filter(|r| r.revoked.is_some())
            .map(|r| r.id)
            .collect();
        let (assignments, applied_index) = versioned_assignments(&self.node, &peer)?;
        Ok(Response::new(v1::HeartbeatResponse {
            heartbeat_interval_secs: self.node.settings.heartbeat_interval_secs,
            cs_addresses: self.node.cs_addresses(),
            revoked_identity_ids,
            assignments,
            applied_index,
        }))
    }
}
