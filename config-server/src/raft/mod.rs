//! Raft for the configuration server: openraft 0.9 type configuration, sled-backed log and
//! state-machine storage, and the gRPC network between nodes.

// openraft's traits fix the error type (`StorageError`, over 200 bytes); our helpers return it
// too rather than converting at every call.
#![allow(clippy::result_large_err)]
use std::io::Cursor;

use crate::state::{Command, CommandResult};

pub mod log_store;
pub mod network;
pub mod state_machine;

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Lifeboat's Raft types: commands in, command results out, nodes addressed by host:port.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Opens (or creates) the sled database holding both the Raft log and the state machine.
pub fn open_db(dir: &std::path::Path) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(dir)
        // sled flushes every 500 ms by default; we flush explicitly where durability matters
        // (log append, vote) and leave the background flush for the state machine, which is
        // rebuilt from the log after a crash.
        .flush_every_ms(Some(500))
        .open()
}

/// Raft timing and snapshot settings. Elections are slower than openraft's defaults because
/// every RPC is a TLS call and a loaded 2-core host must not cause spurious elections.
pub fn raft_config(cluster_name: &str) -> anyhow::Result<std::sync::Arc<openraft::Config>> {
    let config = openraft::Config {
        cluster_name: cluster_name.to_string(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        install_snapshot_timeout: 10_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(2000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    Ok(std::sync::Arc::new(config.validate()?))
}

pub(crate) fn io_error<E: std::error::Error + 'static>(
    make: impl FnOnce(openraft::AnyError) -> openraft::StorageIOError<NodeId>,
    e: E,
) -> StorageError {
    StorageError::IO {
        source: make(openraft::AnyError::new(&e)),
    }
}

#[cfg(test)]
mod storage_suite;
