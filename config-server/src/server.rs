//! Running a node: open storage, start Raft, serve gRPC, bootstrap or join the cluster, run
//! the background tasks, and shut down in order on SIGTERM — stop accepting calls, stop Raft,
//! flush sled.
use crate::init::{bootstrap_file, passphrase_file};
use crate::node::{Node, NodeSettings};
use crate::raft::log_store::SledLogStore;
use crate::raft::network::GrpcNetworkFactory;
use crate::raft::state_machine::SledStateMachine;
use crate::raft::{open_db, raft_config, Raft};
use crate::services::protection::ProtectionService;
use crate::services::{
    admin::AdminService, bootstrap::BootstrapService, cluster::ClusterService,
    component::ComponentService,
};
use crate::settings::Settings;
use crate::state::{Command, CommandResult};
use crate::tasks;
use lifeboat_common::identity::IdentityError;
use lifeboat_common::{serve, Identity, Role};
use lifeboat_proto::v1::recovery_server::RecoveryServer;
use lifeboat_proto::v1::{
    admin_server::AdminServer, bootstrap_server::BootstrapServer, cluster_server::ClusterServer,
    component_server::ComponentServer, protection_server::ProtectionServer, JoinClusterRequest,
};
use lifeboat_proto::MAX_MESSAGE_BYTES;
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub async fn run(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    let identity = match Identity::load(&settings.data_dir) {
        Err(IdentityError::Missing(dir)) => anyhow::bail!(
            "no node identity in {}: create a cluster with `config-server init` or join one \
             with `config-server join` first",
            dir.display()
        ),
        loaded => loaded?,
    };
    if identity.info.role != Role::ConfigServer || identity.info.node_id == 0 {
        anyhow::bail!(
            "{} does not hold a configuration server identity",
            settings.data_dir.display()
        );
    }
    let identity = Arc::new(identity);
    let node_id = identity.info.node_id;
    let db = open_db(&settings.data_dir.join("raft")).map_err(|e| {
        anyhow::anyhow!(
            "cannot open Raft storage in {}: {e}",
            settings.data_dir.display()
        )
    })?;
    let log = SledLogStore::open(&db)?;
    let sm = SledStateMachine::open(&db)?;
    let view = sm.view();
    let applied = sm.subscribe_applied();
    let assignments_changed = sm.subscribe_assignments();
    let committed = log.committed_index();
    let raft = Raft::new(
        node_id,
        raft_config("lifeboat")?,
        GrpcNetworkFactory::new(identity.clone()),
        log,
        sm,
    )
    .await?;
    let node = Arc::new(Node::new(
        node_id,
        raft.clone(),
        view,
        identity.clone(),
        NodeSettings {
            heartbeat_interval_secs: settings.heartbeat_interval_secs,
            disconnected_after_ms: 3 * settings.heartbeat_interval_secs as i64 * 1000,
        },
        committed,
        applied.clone(),
    ));

    let (bound, incoming) = serve::bind(settings.listen, &identity).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let router = serve::grpc_server()
        .add_service(health_service)
        .add_service(BootstrapServer::new(BootstrapService::new(node.clone())))
        .add_service(ComponentServer::new(ComponentService::new(
            node.clone(),
            assignments_changed,
        )))
        .add_service(AdminServer::new(AdminService::new(node.clone())))
        .add_service(ProtectionServer::new(ProtectionService::new(node.clone())))
        .add_service(RecoveryServer::new(crate::recovery::RecoveryService::new(
            node.clone(),
        )))
        .add_service(
            ClusterServer::new(ClusterService::new(node.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    let server_cancel = cancel.clone();
    let server = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, server_cancel.cancelled_owned())
            .await
    });
    tracing::info!(node = node_id, listen = %bound, advertise = %settings.advertise, "configuration server serving");
    let advertised_port = settings
        .advertise
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok());
    if advertised_port.is_some_and(|port| port != bound.port()) {
        // Right behind a port mapping (containers, NAT); otherwise nobody reaches the node.
        tracing::warn!(
            "this node advertises {} but listens on port {}: other nodes and components dial \
             the advertised address, so unless a port mapping forwards it here, start the node \
             with the --listen it was given at init (`config-server init` printed the command)",
            settings.advertise,
            bound.port()
        );
    }

    let background = tokio_util::task::TaskTracker::new();
    background.spawn(tasks::raft_metrics(node.clone(), cancel.clone()));
    background.spawn(tasks::summarise_liveness(node.clone(), cancel.clone()));
    background.spawn(crate::groups::coordinate(node.clone(), cancel.clone()));
    background.spawn(crate::reconcile::run(node.clone(), cancel.clone()));
    background.spawn(crate::recovery::jobs::end_interrupted(
        node.clone(),
        crate::state::model::now_ms(),
        cancel.clone(),
    ));
    background.spawn(tasks::self_heartbeat(
        node.clone(),
        settings.advertise.clone(),
        settings.data_dir.clone(),
        cancel.clone(),
    ));
    background.spawn(tasks::sync_passphrase_file(
        node.clone(),
        applied,
        passphrase_file(&settings.data_dir),
        cancel.clone(),
    ));

    let bootstrap = bootstrap_file(&settings.data_dir);
    if bootstrap.exists() {
        if let Err(e) = bootstrap_cluster(&node, &settings, &bootstrap).await {
            cancel.cancel();
            let _ = server.await;
            raft.shutdown().await.ok();
            return Err(e);
        }
    } else if !raft.is_initialized().await? {
        background.spawn(join_cluster(
            node.clone(),
            settings.advertise.clone(),
            cancel.clone(),
        ));
    }

    cancel.cancelled().await;
    tracing::info!("stopping: no new calls");
    if let Err(e) = serve::stop_server(server).await {
        tracing::warn!("gRPC server ended with an error: {e:#}");
    }
    background.close();
    background.wait().await;
    tracing::info!("stopping Raft");
    if let Err(e) = raft.shutdown().await {
        tracing::warn!("Raft shutdown: {e}");
    }
    db.flush_async().await?;
    tracing::info!("stopped");
    Ok(())
}

/// First start after `init`: form a single-node cluster and apply the bootstrap command.
async fn bootstrap_cluster(
    node: &Node,
    settings: &Settings,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let command: Command = serde_json::from_slice(&std::fs::read(path)?)
        .map_err(|e| anyhow::anyhow!("bootstrap file {} is corrupt: {e}", path.display()))?;
    if !node.raft.is_initialized().await? {
        let members = BTreeMap::from([(node.id, BasicNode::new(&settings.advertise))]);
        node.raft.initialize(members).await?;
    }
    if !node.wait_for_leader(Duration::from_secs(30)).await {
        anyhow::bail!("the new cluster elected no leader within 30s");
    }
    if node.state().cluster_meta()?.is_none() {
        match node.write(command).await {
            Ok(CommandResult::Done) => tracing::info!("cluster bootstrapped"),
            Ok(other) => anyhow::bail!("bootstrap refused: {other:?}"),
            Err(status) => anyhow::bail!("bootstrap failed: {}", status.message()),
        }
    }
    std::fs::remove_file(path)?;
    lifeboat_common::fsutil::fsync_dir(path.parent().unwrap_or(&settings.data_dir))?;
    Ok(())
}

/// A registered node that is not yet a member asks the cluster to add it, until it is.
async fn join_cluster(node: Arc<Node>, advertise: String, cancel: CancellationToken) {
    let addresses = node.identity.info.cs_addresses.clone();
    loop {
        for address in &addresses {
            let request = JoinClusterRequest {
                node_id: node.id,
                address: advertise.clone(),
            };
            let mut client = match node.peer_client(address) {
                Ok(c) => c,
                Err(_) => continue,
            };
            let mut call = tonic::Request::new(request);
            call.set_timeout(Duration::from_secs(120));
            match client.join_cluster(call).await {
                Ok(reply) => {
                    let voters = reply.into_inner().voters;
                    tracing::info!(voters = ?voters, "joined the cluster as a voter");
                    if voters.len() % 2 == 0 {
                        // A majority of an even count needs all but fewer than half: two
                        // voters stop taking changes when either is down.
                        tracing::warn!(
                            "the cluster has {} voters: it takes changes only while {} of them \
                             run, so it tolerates no more failures than {} would; join one more \
                             node (a cluster has 1, 3 or 5 nodes)",
                            voters.len(),
                            voters.len() / 2 + 1,
                            voters.len() - 1
                        );
                    }
                    return;
                }
                Err(status) => tracing::warn!("join via {address} failed: {}", status.message()),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}
