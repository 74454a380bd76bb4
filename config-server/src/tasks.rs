//! Background tasks of a node: Raft metrics for Prometheus, the liveness summary (leader only),
//! and keeping `DATA/private/connection.passphrase` equal to the replicated passphrase.
use crate::node::Node;
use crate::state::model::now_ms;
use crate::state::Command;
use lifeboat_common::Role;
use openraft::ServerState;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub async fn raft_metrics(node: Arc<Node>, cancel: CancellationToken) {
    metrics::describe_gauge!("lifeboat_raft_leader", "1 if this node is the Raft leader");
    metrics::describe_gauge!("lifeboat_raft_term", "Current Raft term");
    metrics::describe_gauge!(
        "lifeboat_raft_commit_index",
        "Highest committed Raft log index"
    );
    metrics::describe_gauge!(
        "lifeboat_raft_last_applied",
        "Last Raft log index applied to the state"
    );
    metrics::describe_gauge!("lifeboat_raft_voters", "Voting members of the cluster");
    metrics::describe_gauge!(
        "lifeboat_components",
        "Registered, unrevoked components by role"
    );
    loop {
        let m = node.raft.metrics().borrow().clone();
        metrics::gauge!("lifeboat_raft_leader").set(if leads_a_quorum(&m) { 1.0 } else { 0.0 });
        metrics::gauge!("lifeboat_raft_term").set(m.current_term as f64);
        metrics::gauge!("lifeboat_raft_commit_index")
            .set(node.committed_index.load(Ordering::Relaxed) as f64);
        metrics::gauge!("lifeboat_raft_last_applied")
            .set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
        metrics::gauge!("lifeboat_raft_voters")
            .set(m.membership_config.membership().voter_ids().count() as f64);
        if let Ok(identities) = node.state().identities() {
            for role in Role::ALL {
                let n = identities
                    .iter()
                    .filter(|r| r.role == role && r.revoked.is_none())
                    .count();
                metrics::gauge!("lifeboat_components", "role" => role.as_str()).set(n as f64);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

pub async fn summarise_liveness(node: Arc<Node>, cancel: CancellationToken) {
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = cancel.cancelled() => return,
        }
        let leader = node.is_leader();
        if was_leader && !leader {
            node.liveness.reset_summaries();
        }
        was_leader = leader;
        if !leader {
            continue;
        }
        let updates = node.liveness.due(now_ms());
        if updates.is_empty() {
            continue;
        }
        if let Err(e) = node.write(Command::RecordLiveness { updates }).await {
            tracing::debug!("liveness summary not written: {}", e.message());
            node.liveness.reset_summaries();
        }
    }
}

/// Rewrites the passphrase file when the replicated passphrase changes, so every node's file is
/// the current one (operators read it there).
pub async fn sync_passphrase_file(
    node: Arc<Node>,
    mut applied: watch::Receiver<u64>,
    path: PathBuf,
    cancel: CancellationToken,
) {
    let mut written = None;
    loop {
        if let Ok(Some(state)) = node.state().passphrase() {
            if written != Some(state.generation) {
                let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
                if on_disk.trim() != state.passphrase {
                    match lifeboat_common::fsutil::write_private(
                        &path,
                        format!("{}\n", state.passphrase).as_bytes(),
                    ) {
                        Ok(()) => {
                            tracing::info!(generation = state.generation, "passphrase file updated")
                        }
                        Err(e) => tracing::error!("cannot write {}: {e}", path.display()),
                    }
                }
                written = Some(state.generation);
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = cancel.cancelled() => return,
        }
    }
}

/// A configuration server node reports its own liveness like any component, so
/// `servers list` shows every node with its address, version and last heartbeat.
pub async fn self_heartbeat(
    node: Arc<Node>,
    advertise: String,
    data_dir: PathBuf,
    cancel: CancellationToken,
) {
    let id = node.identity.info.id.clone();
    loop {
        let request = lifeboat_proto::v1::HeartbeatRequest {
            facts: Some(lifeboat_common::facts::base_facts(&advertise, &data_dir)),
            disks: Vec::new(),
            signing_off: false,
        };
        crate::services::component::accept_heartbeat(
            &node,
            &id,
            Role::ConfigServer,
            &request,
            true,
        )
        .await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(node.settings.heartbeat_interval_secs as u64)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Whether this node is a leader a majority still follows. openraft keeps a leader cut off
/// from its peers in the Leader state (it cannot commit, and its alert counts freeze), so
/// `lifeboat_raft_leader` also needs a quorum acknowledgement within an election timeout; a
/// single-voter cluster is its own quorum.
pub(crate) fn leads_a_quorum(m: &openraft::RaftMetrics<u64, openraft::BasicNode>) -> bool {
    let alone = m.membership_config.membership().voter_ids().count() <= 1;
    m.state == ServerState::Leader
        && (alone
            || m.millis_since_quorum_ack
                .is_some_and(|ms| ms <= QUORUM_ACK_MAX_MS))
}

/// Longest a leader may go without hearing from a majority and still count as leading: the
/// longest election timeout, by when the others elect a new leader.
const QUORUM_ACK_MAX_MS: u64 = 2_000;

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{BasicNode, Membership, RaftMetrics, StoredMembership};
    use std::collections::BTreeSet;

    fn metrics(
        voters: &[u64],
        state: ServerState,
        ack_ms: Option<u64>,
    ) -> RaftMetrics<u64, BasicNode> {
        let mut m = RaftMetrics::new_initial(1);
        let ids: BTreeSet<u64> = voters.iter().copied().collect();
        m.membership_config = Arc::new(StoredMembership::new(
            None,
            Membership::<u64, BasicNode>::new(vec![ids], None),
        ));
        m.state = state;
        m.millis_since_quorum_ack = ack_ms;
        m
    }

    #[test]
    fn a_leader_counts_only_while_a_majority_acknowledges_it() {
        assert!(leads_a_quorum(&metrics(
            &[1, 2, 3],
            ServerState::Leader,
            Some(120)
        )));
        assert!(!leads_a_quorum(&metrics(
            &[1, 2, 3],
            ServerState::Leader,
            Some(9_000)
        )));
        assert!(!leads_a_quorum(&metrics(
            &[1, 2, 3],
            ServerState::Leader,
            None
        )));
        assert!(!leads_a_quorum(&metrics(
            &[1, 2, 3],
            ServerState::Follower,
            Some(10)
        )));
        // A single voter is its own majority, whatever openraft says of acknowledgements.
        assert!(leads_a_quorum(&metrics(&[1], ServerState::Leader, None)));
    }
}
