//! Admin service: what the `lifeboat` CLI asks of the cluster — the registry with liveness,
//! revocation, Raft status, the passphrase, and the audit log. Admin certificates only.
use crate::node::{storage_status, Node};
use crate::state::model::{now_ms, IdentityRecord};
use crate::state::{Command, CommandResult};
use lifeboat_common::{passphrase, Role};
use lifeboat_proto::v1::{self, admin_server::Admin};
use openraft::ServerState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        AdminService { node }
    }

    fn server_info(&self, record: IdentityRecord) -> v1::ServerInfo {
        let (last_heartbeat_ms, facts, connected) = self.node.live_view(&record);
        v1::ServerInfo {
            id: record.id,
            name: record.name,
            role: record.role.to_proto() as i32,
            address: facts.address.clone(),
            version: facts.version.clone(),
            registered_at_unix_ms: record.registered_at_ms,
            last_heartbeat_unix_ms: last_heartbeat_ms,
            connected,
            revoked: record.revoked.is_some(),
            revoked_reason: record.revoked.map(|r| r.reason).unwrap_or_default(),
            facts: Some(facts.to_proto()),
            passphrase_generation: record.passphrase_generation,
        }
    }

    fn find(&self, id: &str) -> Result<IdentityRecord, Status> {
        self.node
            .state()
            .identity(id)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no server with id {id:?}; see `lifeboat servers list`"
                ))
            })
    }

    /// The identity `key` names: its id, or else the name of exactly one identity that is
    /// not revoked (names are what operators type; `protect --ps NAME` takes them too).
    fn find_id_or_name(&self, key: &str) -> Result<IdentityRecord, Status> {
        let by_id = self.find(key);
        if by_id.is_ok() {
            return by_id;
        }
        let mut named: Vec<IdentityRecord> = self
            .node
            .state()
            .identities()
            .map_err(storage_status)?
            .into_iter()
            .filter(|r| r.name == key && r.revoked.is_none())
            .collect();
        match named.len() {
            1 => Ok(named.remove(0)),
            0 => Err(Status::not_found(format!(
                "no server with id or name {key:?}; see `lifeboat servers list`"
            ))),
            _ => Err(Status::invalid_argument(format!(
                "{} servers are named {key:?} ({}); give its id",
                named.len(),
                named
                    .iter()
                    .map(|r| format!("{} {}", r.role.as_str(), r.id))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_servers(
        &self,
        request: Request<v1::ListServersRequest>,
    ) -> Result<Response<v1::ListServersResponse>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let req = request.into_inner();
        let role = if req.role == 0 {
            None
        } else {
            Some(
                Role::from_proto(req.role)
                    .ok_or_else(|| Status::invalid_argument("unknown role"))?,
            )
        };
        let mut servers: Vec<v1::ServerInfo> = self
            .node
            .state()
            .identities()
            .map_err(storage_status)?
            .into_iter()
            // Admin identities are people's keys, not servers: listed only when asked for.
            .filter(|r| match role {
                Some(role) => r.role == role,
                None => r.role != Role::Admin,
            })
            .filter(|r| req.include_revoked || r.revoked.is_none())
            .map(|r| self.server_info(r))
            .collect();
        servers.sort_by(|a, b| (a.role, &a.name).cmp(&(b.role, &b.name)));
        Ok(Response::new(v1::ListServersResponse {
            servers,
            stale: !self.node.is_leader(),
        }))
    }

    async fn get_server(
        &self,
        request: Request<v1::GetServerRequest>,
    ) -> Result<Response<v1::ServerInfo>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let record = self.find_id_or_name(&request.get_ref().id)?;
        Ok(Response::new(self.server_info(record)))
    }

    async fn revoke_server(
        &self,
        request: Request<v1::GetServerRequest>,
    ) -> Result<Response<v1::ServerInfo>, Status> {
        let (admin, _) = self.node.authorize(&request, &[Role::Admin])?;
        let id = request.into_inner().id;
        let record = self.find(&id)?;
        if record.role == Role::ConfigServer || record.role == Role::Admin {
            return Err(Status::failed_precondition(
                "configuration server and admin identities cannot be revoked here",
            ));
        }
        let command = Command::Revoke {
            id: id.clone(),
            reason: format!("revoked by {}", admin.id),
            at_ms: now_ms(),
            by: admin.id,
        };
        match self.node.write(command).await? {
            CommandResult::NotFound(why) => Err(Status::not_found(why)),
            _ => Ok(Response::new(self.server_info(self.find(&id)?))),
        }
    }

    async fn cluster_status(
        &self,
        request: Request<v1::Empty>,
    ) -> Result<Response<v1::ClusterStatusResponse>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let metrics = self.node.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let matched = |id: u64| {
            metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|log_id| log_id.index)
                .unwrap_or(0)
        };
        let members = membership
            .nodes()
            .map(|(id, node)| v1::ClusterMember {
                node_id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched(*id),
            })
            .collect();
        let state = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let cluster_id = self
            .node
            .state()
            .cluster_meta()
            .map_err(storage_status)?
            .map(|m| m.cluster_id)
            .unwrap_or_default();
        let leader_address = self.node.leader().map(|(_, a)| a).unwrap_or_default();
        Ok(Response::new(v1::ClusterStatusResponse {
            cluster_id,
            node_id: self.node.id,
            leader_id: metrics.current_leader.unwrap_or(0),
            leader_address,
            term: metrics.current_term,
            commit_index: self.node.committed_index.load(Ordering::Relaxed),
            last_applied: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            state: state.into(),
            members,
            leader_without_quorum: metrics.state == ServerState::Leader
                && !crate::tasks::leads_a_quorum(&metrics),
        }))
    }

    async fn show_passphrase(
        &self,
        request: Request<v1::Empty>,
    ) -> Result<Response<v1::PassphraseResponse>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let current = self
            .node
            .state()
            .passphrase()
            .map_err(storage_status)?
            .ok_or_else(|| Status::unavailable("not initialised"))?;
        Ok(Response::new(v1::PassphraseResponse {
            passphrase: current.passphrase,
            generation: current.generation,
            revoked_identities: 0,
        }))
    }

    async fn regenerate_passphrase(
        &self,
        request: Request<v1::Empty>,
    ) -> Result<Response<v1::PassphraseResponse>, Status> {
        let (admin, _) = self.node.authorize(&request, &[Role::Admin])?;
        let new = passphrase::generate();
        let command = Command::RegeneratePassphrase {
            passphrase: new.clone(),
            at_ms: now_ms(),
            by: admin.id,
        };
        match self.node.write(command).await? {
            CommandResult::PassphraseChanged {
                generation,
                revoked,
            } => {
                tracing::info!(generation, revoked, "passphrase regenerated");
                Ok(Response::new(v1::PassphraseResponse {
                    passphrase: new,
                    generation,
                    revoked_identities: revoked,
                }))
            }
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn list_audit(
        &self,
        request: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        self.node.authorize(&request, &[Role::Admin])?;
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(10_000)
        } as usize;
        let entries = self
            .node
            .state()
            .audit(limit, req.since_unix_ms)
            .map_err(storage_status)?
            .into_iter()
            .map(|a| v1::AuditEntry {
                seq: a.seq,
                at_unix_ms: a.at_ms,
                kind: a.kind,
                source: a.source,
                subject: a.subject,
                detail: a.detail,
            })
            .collect();
        Ok(Response::new(v1::ListAuditResponse { entries }))
    }
}
