//! Component service: heartbeats of process servers, master targets and agents. Liveness is
//! kept in memory (see `liveness`); a follower also forwards the heartbeat to the leader, which
//! is the node that summarises liveness into Raft and answers `servers list` freshest.
use crate::node::{storage_status, Node};
use crate::state::model::{now_ms, Facts};
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, component_server::Component, ForwardedHeartbeat};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ComponentService {
    node: Arc<Node>,
}

impl ComponentService {
    pub fn new(node: Arc<Node>) -> Self {
        ComponentService { node }
    }
}

/// Records a heartbeat locally and, on a follower, passes it on to the leader (best effort:
/// the component is answered either way).
pub async fn accept_heartbeat(node: &Node, id: &str, facts: Facts, forward: bool) {
    node.liveness.record(id, now_ms(), facts.clone());
    if !forward || node.is_leader() {
        return;
    }
    let Some((_, leader)) = node.leader() else {
        return;
    };
    let Ok(data) = serde_json::to_vec(&facts) else {
        return;
    };
    match node.peer_client(&leader) {
        Ok(mut client) => {
            let request = ForwardedHeartbeat {
                identity_id: id.to_string(),
                data,
            };
            if let Err(e) = client.forward_heartbeat(request).await {
                tracing::debug!(
                    "cannot forward heartbeat to leader {leader}: {}",
                    e.message()
                );
            }
        }
        Err(e) => tracing::debug!("no client for leader {leader}: {}", e.message()),
    }
}

#[tonic::async_trait]
impl Component for ComponentService {
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
        let facts = request
            .into_inner()
            .facts
            .as_ref()
            .map(Facts::from_proto)
            .unwrap_or_default();
        accept_heartbeat(&self.node, &peer.id, facts, true).await;
        let revoked_identity_ids = self
            .node
            .state()
            .identities()
            .map_err(storage_status)?
            .into_iter()
            .filter(|r| r.revoked.is_some())
            .map(|r| r.id)
            .collect();
        Ok(Response::new(v1::HeartbeatResponse {
            heartbeat_interval_secs: self.node.settings.heartbeat_interval_secs,
            cs_addresses: self.node.cs_addresses(),
            revoked_identity_ids,
        }))
    }
}
