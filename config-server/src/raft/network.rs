//! Raft messages between configuration server nodes: openraft's requests and results, JSON
//! encoded, carried by the `Cluster` gRPC service over mutual TLS with this node's
//! config-server identity. Connection failures are reported as `Unreachable` so openraft
//! backs off instead of hammering a dead node.
use super::{NodeId, TypeConfig};
use lifeboat_common::{tls, Identity, Role};
use lifeboat_proto::v1::{cluster_client::ClusterClient, RaftMessage};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct GrpcNetworkFactory {
    identity: Arc<Identity>,
}

impl GrpcNetworkFactory {
    pub fn new(identity: Arc<Identity>) -> Self {
        GrpcNetworkFactory { identity }
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GrpcNetwork {
            target,
            address: node.addr.clone(),
            identity: self.identity.clone(),
            client: None,
        }
    }
}

pub struct GrpcNetwork {
    target: NodeId,
    address: String,
    identity: Arc<Identity>,
    client: Option<ClusterClient<Channel>>,
}

#[derive(Clone, Copy)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl GrpcNetwork {
    fn client(&mut self) -> Result<ClusterClient<Channel>, Unreachable> {
        if self.client.is_none() {
            let channel = tls::mtls_channel(&self.identity, &self.address, Role::ConfigServer)
                .map_err(|e| Unreachable::new(&std::io::Error::other(e.to_string())))?;
            self.client = Some(
                ClusterClient::new(channel)
                    .max_decoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES),
            );
        }
        self.client
            .clone()
            .ok_or_else(|| Unreachable::new(&std::io::Error::other("no client")))
    }

    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        request: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self.client()?;
        let mut message = tonic::Request::new(RaftMessage { data });
        message.set_timeout(option.hard_ttl());
        let reply = match method {
            Method::AppendEntries => client.append_entries(message).await,
            Method::Vote => client.vote(message).await,
            Method::InstallSnapshot => client.install_snapshot(message).await,
        };
        let reply = match reply {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                // Drop the channel: the next call reconnects (the node may have restarted).
                self.client = None;
                return Err(match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                        RPCError::Unreachable(Unreachable::new(&status))
                    }
                    _ => RPCError::Network(NetworkError::new(&status)),
                });
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for GrpcNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(Method::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Method::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Method::Vote, &rpc, &option).await
    }
}
