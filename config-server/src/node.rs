//! One configuration server node at run time: its Raft handle, a view of the applied state,
//! its identity, and the shared services' plumbing — writes (forwarded to the leader when this
//! node is a follower), caller authorization against the registry, and cluster addresses.
use crate::guard::{FailureLimiter, NonceStore};
use crate::liveness::{Liveness, Seen};
use crate::progress::{self, Lag, Progress, Received, Stall};
use crate::raft::state_machine::StateView;
use crate::raft::{NodeId, Raft};
use crate::state::model::{now_ms, Facts, IdentityRecord};
use crate::state::protection::{ProtectedDisk, ProtectedMachine, ReplicationState};
use crate::state::{Command, CommandResult, KvError, StateReader};
use lifeboat_common::peer::{require_role, Peer};
use lifeboat_common::{tls, Identity, Role};
use lifeboat_proto::v1::{cluster_client::ClusterClient, RaftMessage};
use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Settings the services need at run time.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub heartbeat_interval_secs: u32,
    /// A component is shown Disconnected after this long without a heartbeat.
    pub disconnected_after_ms: i64,
}

impl NodeSettings {
    /// An agent's disk report is overdue after one and a half heartbeat intervals: from then
    /// on its disks' RPO grows with the report's age (the replica is known good only up to
    /// it), well before the agent counts as disconnected.
    pub fn report_overdue_ms(&self) -> i64 {
        self.heartbeat_interval_secs as i64 * 1500
    }
}

/// A registered identity's liveness as this node judges it (see [`Node::live`]).
pub struct LiveView {
    pub seen: Seen,
    pub connected: bool,
}

pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    pub view: StateView,
    pub identity: Arc<Identity>,
    pub settings: NodeSettings,
    pub liveness: Liveness,
    pub progress: Progress,
    pub committed_index: Arc<AtomicU64>,
    /// The index of the last entry applied to this node's state machine, as it changes.
    pub applied: tokio::sync::watch::Receiver<u64>,
    pub nonces: NonceStore,
    pub failures: FailureLimiter,
    /// Serialises membership changes requested by joining nodes.
    pub membership_lock: tokio::sync::Mutex<()>,
    peers: Mutex<HashMap<String, Channel>>,
}

pub fn storage_status(e: KvError) -> Status {
    tracing::error!("state storage: {e}");
    Status::internal(format!("configuration server storage error: {e}"))
}

/// Response metadata of a forwarded write: the log index the leader applied it at.
pub const FORWARDED_INDEX: &str = "lifeboat-log-index";
/// How long a follower waits to apply a write it forwarded before answering its caller.
const FORWARDED_APPLY_WAIT: Duration = Duration::from_secs(5);

impl Node {
    /// A disk's last agent report on this node (if any) and the lag status, metrics and
    /// alerts show for it. A failed-over disk no longer replicates: it has no RPO (0, not a
    /// growing age).
    pub fn disk_lag(
        &self,
        machine: &ProtectedMachine,
        disk: &ProtectedDisk,
        now_ms: i64,
    ) -> (Option<Received>, Lag) {
        let report = self.progress.get(&disk.disk_id, Role::Agent);
        // An agent that signed off captures nothing more: its last report is final, and the
        // RPO grows from it at once.
        let fresh_ms = if self.liveness.signed_off(&machine.agent_id) {
            0
        } else {
            self.settings.report_overdue_ms()
        };
        let mut lag = progress::lag(report.as_ref(), now_ms, fresh_ms, machine.protected_at_ms);
        if disk.state == ReplicationState::FailedOver {
            lag.rpo_secs = 0.0;
        }
        (report, lag)
    }

    /// Why the disk's replication does not move, as its agent (it cannot capture the disk)
    /// or its process server (it cannot forward) last said. `None` when it moves, when the
    /// report is old — a component gone quiet has its own alert — or when the disk no longer
    /// replicates.
    pub fn stall(&self, machine: &ProtectedMachine, disk: &ProtectedDisk) -> Option<Stall> {
        if disk.state == ReplicationState::FailedOver {
            return None;
        }
        let fresh = |r: &Received, from: &str| {
            r.from == from && now_ms() - r.at_ms <= self.settings.report_overdue_ms()
        };
        if let Some(r) = self.progress.capture_error(&disk.disk_id) {
            if fresh(&r, &machine.agent_id) && !r.report.error.is_empty() {
                return Some(Stall::Capture(r.report.error));
            }
        }
        match self.progress.get(&disk.disk_id, Role::ProcessServer) {
            Some(r) if fresh(&r, &machine.ps_id) && !r.report.error.is_empty() => {
                Some(Stall::Forward(r.report.error))
            }
            _ => None,
        }
    }

    pub fn new(
        id: NodeId,
        raft: Raft,
        view: StateView,
        identity: Arc<Identity>,
        settings: NodeSettings,
        committed_index: Arc<AtomicU64>,
        applied: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        Node {
            id,
            raft,
            view,
            identity,
            settings,
            liveness: Liveness::default(),
            progress: Progress::default(),
            committed_index,
            applied,
            nonces: NonceStore::default(),
            failures: FailureLimiter::default(),
            membership_lock: tokio::sync::Mutex::new(()),
            peers: Mutex::new(HashMap::new()),
        }
    }

    pub fn state(&self) -> StateReader<'_, StateView> {
        StateReader(&self.view)
    }

    /// Index of the last log entry applied to this node's state machine.
    pub fn applied_index(&self) -> u64 {
        self.view.applied_index()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// (leader id, leader address) if a leader is known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let address = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())?;
        Some((leader, address))
    }

    /// Every member's address (voters and learners), for components to fail over between.
    pub fn cs_addresses(&self) -> Vec<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let mut addresses: Vec<String> = metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(_, n)| n.addr.clone())
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }

    /// The caller, if its certificate has one of `roles` and its identity is registered and
    /// not revoked. Revocation thus takes effect on the next call.
    pub fn authorize<T>(
        &self,
        request: &Request<T>,
        roles: &[Role],
    ) -> Result<(Peer, IdentityRecord), Status> {
        let peer = require_role(request, roles)?;
        let record = self
            .state()
            .identity(&peer.id)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "identity {} is not registered with this cluster",
                    peer.id
                ))
            })?;
        if let Some(revoked) = &record.revoked {
            return Err(Status::unauthenticated(format!(
                "identity {} was revoked: {}",
                peer.id, revoked.reason
            )));
        }
        if record.role != peer.role {
            return Err(Status::unauthenticated(
                "certificate role does not match the registry",
            ));
        }
        Ok((peer, record))
    }

    /// Authorization of Raft traffic: a config-server certificate from our CA, not revoked.
    /// Unlike `authorize`, an identity this node has not seen yet is accepted: a new or
    /// lagging node learns of its peers' registrations only through the very log entries
    /// those peers are sending it.
    pub fn authorize_raft_peer<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        let peer = require_role(request, &[Role::ConfigServer])?;
        if let Some(record) = self.state().identity(&peer.id).map_err(storage_status)? {
            if let Some(revoked) = record.revoked {
                return Err(Status::unauthenticated(format!(
                    "identity {} was revoked: {}",
                    peer.id, revoked.reason
                )));
            }
        }
        Ok(peer)
    }

    /// (last heartbeat, facts, connected) of a registered identity: see [`Node::live`].
    pub fn live_view(&self, record: &IdentityRecord) -> (i64, Facts, bool) {
        let live = self.live(record);
        (live.seen.last_ms, live.seen.facts, live.connected)
    }

    /// What is known of a registered identity's liveness: the live heartbeat this node holds
    /// if it is newer than the summary in Raft, and whether that makes it connected (a
    /// heartbeat within `disconnected_after_ms`, not its last: a sign-off).
    pub fn live(&self, record: &IdentityRecord) -> LiveView {
        let seen = match self.liveness.get(&record.id) {
            Some(seen) if seen.last_ms >= record.last_heartbeat_ms => seen,
            _ => Seen {
                last_ms: record.last_heartbeat_ms,
                facts: record.facts.clone(),
                signed_off: record.signed_off,
            },
        };
        let connected = record.revoked.is_none()
            && seen.last_ms > 0
            && !seen.signed_off
            && now_ms() - seen.last_ms <= self.settings.disconnected_after_ms;
        LiveView { seen, connected }
    }

    /// Proposes `command` and waits until it is committed and applied. On a follower the
    /// command is forwarded to the leader.
    pub async fn write(&self, command: Command) -> Result<CommandResult, Status> {
        match self.raft.client_write(command.clone()).await {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                let Some(leader) = forward.leader_node else {
                    return Err(Status::unavailable(
                        "no configuration server leader is elected right now; retry in a few seconds",
                    ));
                };
                self.forward_write(&leader.addr, &command).await
            }
            Err(e) => Err(Status::unavailable(format!("write failed: {e}"))),
        }
    }

    /// Leader-side write for a forwarded command: never forwards again (no loops). Returns
    /// the result and the log index it was applied at.
    pub async fn write_local(&self, command: Command) -> Result<(CommandResult, u64), Status> {
        match self.raft.client_write(command).await {
            Ok(response) => Ok((response.data, response.log_id.index)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(
                Status::unavailable("leadership changed while forwarding; retry"),
            ),
            Err(e) => Err(Status::unavailable(format!("write failed: {e}"))),
        }
    }

    async fn forward_write(
        &self,
        leader: &str,
        command: &Command,
    ) -> Result<CommandResult, Status> {
        let data = serde_json::to_vec(command).map_err(|e| Status::internal(e.to_string()))?;
        let mut client = self.peer_client(leader)?;
        let reply = client.forward_write(RaftMessage { data }).await?;
        let applied_at: Option<u64> = reply
            .metadata()
            .get(FORWARDED_INDEX)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let result: Result<CommandResult, String> = serde_json::from_slice(&reply.get_ref().data)
            .map_err(|e| Status::internal(e.to_string()))?;
        let result = result.map_err(Status::unavailable)?;
        // The caller reads this node's state next (the record it just created, say): wait
        // until this node has applied the write too, or it would answer as if it never was.
        if let Some(index) = applied_at {
            let applied = self
                .raft
                .wait(Some(FORWARDED_APPLY_WAIT))
                .applied_index_at_least(Some(index), "forwarded write applied here")
                .await;
            if applied.is_err() {
                tracing::warn!(
                    index,
                    "a forwarded write is not applied here yet; answering anyway"
                );
            }
        }
        Ok(result)
    }

    /// A client to another configuration server node, with this node's identity.
    pub fn peer_client(&self, address: &str) -> Result<ClusterClient<Channel>, Status> {
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| Status::internal("peer cache poisoned"))?;
        let channel = match peers.get(address) {
            Some(c) => c.clone(),
            None => {
                let c = tls::mtls_channel(&self.identity, address, Role::ConfigServer)
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                peers.insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(ClusterClient::new(channel))
    }

    /// Waits until this node knows a leader (used at startup).
    pub async fn wait_for_leader(&self, timeout: Duration) -> bool {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "leader known")
            .await
            .is_ok()
    }
}
