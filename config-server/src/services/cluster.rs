//! Cluster service: traffic between configuration server nodes only — Raft RPCs, writes and
//! heartbeats forwarded by followers to the leader, and membership requests of joining nodes.
use crate::node::{storage_status, Node};
use crate::services::component::accept_heartbeat;
use crate::state::Command;
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, cluster_server::Cluster, RaftMessage};
use openraft::{BasicNode, ChangeMembers};
use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>) -> Self {
        ClusterService { node }
    }
}

fn decode<T: DeserializeOwned>(message: &RaftMessage) -> Result<T, Status> {
    serde_json::from_slice(&message.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable cluster message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    let data = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { data }))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.node.authorize_raft_peer(&request)?;
        let rpc = decode(request.get_ref())?;
        encode(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.node.authorize_raft_peer(&request)?;
        let rpc = decode(request.get_ref())?;
        encode(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.node.authorize_raft_peer(&request)?;
        let rpc = decode(request.get_ref())?;
        encode(&self.node.raft.install_snapshot(rpc).await)
    }

    async fn forward_write(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.node.authorize(&request, &[Role::ConfigServer])?;
        let command: Command = decode(request.get_ref())?;
        let (result, index) = match self.node.write_local(command).await {
            Ok((result, index)) => (Ok(result), Some(index)),
            Err(status) => (Err(status.message().to_string()), None),
        };
        let mut response = encode(&result)?;
        // In metadata, so a follower of an older version still reads the body as it did.
        if let Some(index) = index {
            response
                .metadata_mut()
                .insert(crate::node::FORWARDED_INDEX, index.into());
        }
        Ok(response)
    }

    async fn forward_heartbeat(
        &self,
        request: Request<v1::ForwardedHeartbeat>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.node.authorize(&request, &[Role::ConfigServer])?;
        let forwarded = request.into_inner();
        let heartbeat = v1::HeartbeatRequest::decode(forwarded.data.as_slice())
            .map_err(|e| Status::invalid_argument(format!("undecodable heartbeat: {e}")))?;
        let role = self
            .node
            .state()
            .identity(&forwarded.identity_id)
            .map_err(storage_status)?
            .map(|r| r.role)
            .ok_or_else(|| Status::not_found("heartbeat of an unknown identity"))?;
        accept_heartbeat(&self.node, &forwarded.identity_id, role, &heartbeat, false).await;
        encode(&())
    }

    async fn join_cluster(
        &self,
        request: Request<v1::JoinClusterRequest>,
    ) -> Result<Response<v1::JoinClusterResponse>, Status> {
        self.node.authorize(&request, &[Role::ConfigServer])?;
        let join = request.into_inner();
        if !self.node.is_leader() {
            let (_, leader) = self
                .node
                .leader()
                .ok_or_else(|| Status::unavailable("no leader elected; retry"))?;
            let mut client = self.node.peer_client(&leader)?;
            return client.join_cluster(join).await;
        }
        // Only a registered, unrevoked configuration server identity may own this node id.
        let known = self
            .node
            .state()
            .identities()
            .map_err(storage_status)?
            .into_iter()
            .any(|r| {
                r.role == Role::ConfigServer && r.node_id == join.node_id && r.revoked.is_none()
            });
        if !known || join.address.is_empty() {
            return Err(Status::not_found(format!(
                "node id {} is not a registered configuration server",
                join.node_id
            )));
        }
        let _serial = self.node.membership_lock.lock().await;
        let raft = &self.node.raft;
        let voters: BTreeSet<u64> = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if !voters.contains(&join.node_id) {
            tracing::info!(node = join.node_id, address = %join.address, "adding learner");
            raft.add_learner(join.node_id, BasicNode::new(&join.address), true)
                .await
                .map_err(|e| Status::unavailable(format!("cannot add learner: {e}")))?;
            tracing::info!(node = join.node_id, "promoting to voter");
            raft.change_membership(
                ChangeMembers::AddVoterIds(BTreeSet::from([join.node_id])),
                false,
            )
            .await
            .map_err(|e| Status::unavailable(format!("cannot promote to voter: {e}")))?;
        }
        let voters = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        Ok(Response::new(v1::JoinClusterResponse { voters }))
    }
}
