//! Bootstrap service: the registration handshake (DESIGN §5). The only service callable without
//! a client certificate, so every input is checked before anything is stored, failures are
//! audited, and repeated failures from one source are refused for a while.
use crate::ca::{new_identity_id, CertificateAuthority};
use crate::guard::Admission;
use crate::node::{storage_status, Node};
use crate::state::model::{now_ms, Facts, IdentityRecord};
use crate::state::{AuditDraft, Command, CommandResult};
use lifeboat_common::passphrase::{PassphraseKey, NONCE_LEN};
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, bootstrap_server::Bootstrap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct BootstrapService {
    node: Arc<Node>,
}

impl BootstrapService {
    pub fn new(node: Arc<Node>) -> Self {
        BootstrapService { node }
    }

    async fn audit(&self, kind: &str, source: &str, subject: String, detail: String) {
        let entry = AuditDraft {
            at_ms: now_ms(),
            kind: kind.into(),
            source: source.into(),
            subject,
            detail,
        };
        if let Err(e) = self.node.write(Command::Audit { entry }).await {
            tracing::warn!("cannot audit {kind} from {source}: {}", e.message());
        }
    }
}

/// Names are shown in tables and used as keys: keep them printable and short.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
}

#[tonic::async_trait]
impl Bootstrap for BootstrapService {
    async fn challenge(
        &self,
        _request: Request<v1::ChallengeRequest>,
    ) -> Result<Response<v1::ChallengeResponse>, Status> {
        let cluster_id = self
            .node
            .state()
            .cluster_meta()
            .map_err(storage_status)?
            .map(|m| m.cluster_id)
            .unwrap_or_default();
        Ok(Response::new(v1::ChallengeResponse {
            server_nonce: self.node.nonces.issue(),
            cluster_id,
        }))
    }

    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let remote = lifeboat_common::peer::remote_addr(&request);
        let source_ip = remote
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let source = remote
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let req = request.into_inner();

        if let Admission::Limited { retry_after, first } = self.node.failures.check(source_ip) {
            if first {
                self.audit(
                    "registration_rate_limited",
                    &source,
                    match Role::from_proto(req.role) {
                        Some(role) => format!("{role} {}", req.name),
                        None => format!("(no role) {}", req.name),
                    },
                    format!(
                        "too many failed attempts; refused for {}s",
                        retry_after.as_secs()
                    ),
                )
                .await;
            }
            return Err(Status::resource_exhausted(format!(
                "too many failed registration attempts from {source_ip}; retry in {}s",
                retry_after.as_secs().max(1)
            )));
        }

        let role = Role::from_proto(req.role)
            .ok_or_else(|| Status::invalid_argument("role is missing or unknown"))?;
        if role == Role::Admin {
            return Err(Status::invalid_argument(
                "admin identities are not issued by registration; use the admin identity made by `config-server init`",
            ));
        }
        if !valid_name(&req.name) {
            return Err(Status::invalid_argument(
                "name must be 1-128 characters of letters, digits, '.', '-', '_' or ':'",
            ));
        }
        if req.client_nonce.len() != NONCE_LEN
            || req.csr_der.is_empty()
            || req.csr_der.len() > 16 * 1024
        {
            return Err(Status::invalid_argument("malformed registration request"));
        }
        if !self.node.nonces.consume(&req.server_nonce) {
            return Err(Status::failed_precondition(
                "the challenge nonce is unknown, used or expired; start the registration again",
            ));
        }

        let state = self.node.state();
        let passphrase = state.passphrase().map_err(storage_status)?.ok_or_else(|| {
            Status::unavailable("this configuration server is not initialised yet")
        })?;
        let key = PassphraseKey::derive(&passphrase.passphrase);
        if !key.verify_registration_proof(
            &req.server_nonce,
            &req.client_nonce,
            role.as_str(),
            &lifeboat_common::passphrase::proof_name(&req.name, &req.replaces),
            &req.csr_der,
            &req.proof,
        ) {
            self.node.failures.record_failure(source_ip);
            tracing::warn!(%source, %role, name = %req.name, "registration refused: passphrase proof did not verify");
            self.audit(
                "registration_refused",
                &source,
                format!("{role} {}", req.name),
                "passphrase proof did not verify".into(),
            )
            .await;
            return Err(Status::permission_denied(
                "registration refused: the passphrase proof did not verify (wrong passphrase?)",
            ));
        }

        let ca_material = state.ca().map_err(storage_status)?.ok_or_else(|| {
            Status::unavailable("this configuration server is not initialised yet")
        })?;
        let ca = CertificateAuthority::from_pem(&ca_material.cert_pem, &ca_material.key_pem)
            .map_err(|e| Status::internal(e.to_string()))?;
        let id = new_identity_id(role);
        let certificate_pem = ca
            .sign_csr(&req.csr_der, role, &id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let facts = req
            .facts
            .as_ref()
            .map(Facts::from_proto)
            .unwrap_or_default();
        let record = IdentityRecord {
            id: id.clone(),
            role,
            name: req.name.clone(),
            registered_at_ms: now_ms(),
            passphrase_generation: passphrase.generation,
            node_id: 0,
            revoked: None,
            facts,
            last_heartbeat_ms: 0,
            signed_off: false,
        };
        let node_id = match self
            .node
            .write(Command::Register {
                record,
                source: source.clone(),
                replaces: req.replaces.clone(),
            })
            .await?
        {
            CommandResult::Registered { node_id, .. } => node_id,
            CommandResult::Refused(why) => return Err(Status::failed_precondition(why)),
            other => return Err(Status::internal(format!("unexpected result {other:?}"))),
        };
        tracing::info!(%source, %role, name = %req.name, %id, "registered");
        let server_proof =
            key.server_proof(&req.client_nonce, &ca_material.cert_pem, &certificate_pem);
        Ok(Response::new(v1::RegisterResponse {
            identity_id: id,
            certificate_pem,
            ca_pem: ca_material.cert_pem,
            server_proof,
            cs_addresses: self.node.cs_addresses(),
            node_id,
            heartbeat_interval_secs: self.node.settings.heartbeat_interval_secs,
        }))
    }
}
