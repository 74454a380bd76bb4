//! The state machine in sled: the domain state (see `crate::state`) in one tree, with the last
//! applied log id and membership stored in the same atomic batch as each entry's writes, so
//! after a crash the state and its position always agree. Snapshots are a JSON copy of the
//! tree; the latest one is kept in its own tree so a lagging or new node can be sent it.
use super::{io_error, NodeId, StorageError, TypeConfig};
use crate::state::apply::apply;
use crate::state::{CommandResult, KvError, KvOp, KvRead};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use tokio::sync::watch;

const LAST_APPLIED: &str = "sm/last-applied";
const MEMBERSHIP: &str = "sm/membership";
const CURRENT_SNAPSHOT: &str = "current";

type Membership = StoredMembership<NodeId, BasicNode>;

/// Read-only view of the applied state, cheap to clone, used by API handlers.
#[derive(Clone)]
pub struct StateView {
    tree: sled::Tree,
}

impl KvRead for StateView {
    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.tree
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| KvError::Storage(e.to_string()))
    }

    fn scan_raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        self.tree
            .scan_prefix(prefix)
            .map(|item| {
                let (k, v) = item.map_err(|e| KvError::Storage(e.to_string()))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }
}

impl StateView {
    /// Index of the last entry applied to this state. Written in the same atomic batch as
    /// the entry's changes, so two equal readings around other reads mean they saw one state.
    pub fn applied_index(&self) -> u64 {
        self.get_raw(LAST_APPLIED)
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice::<Option<LogId<NodeId>>>(&bytes).ok())
            .flatten()
            .map_or(0, |id| id.index)
    }
}

/// Whether a change to `key` can change some component's disk assignments (machines and
/// their disks, policies, protection groups).
fn affects_assignments(key: &str) -> bool {
    use crate::state::keys::{GROUP_PREFIX, MACHINE_PREFIX, POLICY_PREFIX};
    [MACHINE_PREFIX, POLICY_PREFIX, GROUP_PREFIX]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

pub struct SledStateMachine {
    view: StateView,
    snapshots: sled::Tree,
    applied: watch::Sender<u64>,
    /// Bumped after each apply that changed something assignments are made of.
    assignments: watch::Sender<u64>,
    snapshot_counter: u64,
}

/// What a snapshot holds: every key of the state tree.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    entries: Vec<(String, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

impl SledStateMachine {
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let tree = db.open_tree("state")?;
        let snapshots = db.open_tree("snapshots")?;
        let view = StateView { tree };
        // From the stored position: status versions (see `status_wait`) start where they were.
        let (applied, _) = watch::channel(view.applied_index());
        let (assignments, _) = watch::channel(0);
        Ok(SledStateMachine {
            view,
            snapshots,
            applied,
            assignments,
            snapshot_counter: 0,
        })
    }

    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    /// Receives the index of the last applied entry after each apply.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Changes after each apply that may have changed some component's assignments.
    pub fn subscribe_assignments(&self) -> watch::Receiver<u64> {
        self.assignments.subscribe()
    }

    fn read_position(&self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError> {
        let last: Option<LogId<NodeId>> = self
            .view
            .get(LAST_APPLIED)
            .map_err(|e| io_error(StorageIOError::read_state_machine, e))?;
        let membership: Option<Membership> = self
            .view
            .get(MEMBERSHIP)
            .map_err(|e| io_error(StorageIOError::read_state_machine, e))?;
        Ok((last, membership.unwrap_or_default()))
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("openraft ids and memberships serialise to JSON")
}

impl RaftStateMachine<TypeConfig> for SledStateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError> {
        self.read_position()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut last_index = None;
        let mut assignments_changed = false;
        for entry in entries {
            let mut batch = sled::Batch::default();
            let result = match &entry.payload {
                EntryPayload::Blank => CommandResult::Done,
                EntryPayload::Normal(command) => {
                    let (ops, result) = apply(command, &self.view)
                        .map_err(|e| io_error(|a| StorageIOError::apply(entry.log_id, a), e))?;
                    for op in ops {
                        let (KvOp::Put(key, _) | KvOp::Delete(key)) = &op;
                        assignments_changed |= affects_assignments(key);
                        match op {
                            KvOp::Put(k, v) => batch.insert(k.as_bytes(), v),
                            KvOp::Delete(k) => batch.remove(k.as_bytes()),
                        }
                    }
                    result
                }
                EntryPayload::Membership(membership) => {
                    let stored = Membership::new(Some(entry.log_id), membership.clone());
                    batch.insert(MEMBERSHIP, json(&stored));
                    CommandResult::Done
                }
            };
            batch.insert(LAST_APPLIED, json(&Some(entry.log_id)));
            self.view
                .tree
                .apply_batch(batch)
                .map_err(|e| io_error(StorageIOError::write_state_machine, e))?;
            last_index = Some(entry.log_id.index);
            results.push(result);
        }
        if let Some(index) = last_index {
            self.applied.send_replace(index);
        }
        if assignments_changed {
            self.assignments.send_modify(|generation| *generation += 1);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Copy now, while no entry is being applied, so the snapshot is consistent with the
        // position it records. The state is small (registry, policies, jobs).
        self.snapshot_counter += 1;
        SnapshotBuilder {
            copy: self.view.scan_raw(""),
            snapshots: self.snapshots.clone(),
            counter: self.snapshot_counter,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = serde_json::from_slice(&bytes).map_err(|e| {
            io_error(
                |a| StorageIOError::read_snapshot(Some(meta.signature()), a),
                e,
            )
        })?;
        let mut batch = sled::Batch::default();
        for key in self.view.tree.iter().keys() {
            batch.remove(key.map_err(|e| io_error(StorageIOError::write_state_machine, e))?);
        }
        for (key, value) in data.entries {
            batch.insert(key.as_bytes(), value);
        }
        batch.insert(LAST_APPLIED, json(&meta.last_log_id));
        batch.insert(MEMBERSHIP, json(&meta.last_membership));
        self.view
            .tree
            .apply_batch(batch)
            .map_err(|e| io_error(StorageIOError::write_state_machine, e))?;
        save_snapshot(&self.snapshots, meta, bytes)?;
        if let Some(id) = meta.last_log_id {
            self.applied.send_replace(id.index);
        }
        self.assignments.send_modify(|generation| *generation += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(bytes) = self
            .snapshots
            .get(CURRENT_SNAPSHOT)
            .map_err(|e| io_error(|a| StorageIOError::read_snapshot(None, a), e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot = serde_json::from_slice(&bytes)
            .map_err(|e| io_error(|a| StorageIOError::read_snapshot(None, a), e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

fn save_snapshot(
    tree: &sled::Tree,
    meta: &SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
) -> Result<(), StorageError> {
    let stored = StoredSnapshot {
        meta: meta.clone(),
        data,
    };
    tree.insert(CURRENT_SNAPSHOT, json(&stored)).map_err(|e| {
        io_error(
            |a| StorageIOError::write_snapshot(Some(meta.signature()), a),
            e,
        )
    })?;
    // The snapshot lets the leader purge its log: it must be on disk before that happens.
    tree.flush().map_err(|e| {
        io_error(
            |a| StorageIOError::write_snapshot(Some(meta.signature()), a),
            e,
        )
    })?;
    Ok(())
}

pub struct SnapshotBuilder {
    copy: Result<Vec<(String, Vec<u8>)>, KvError>,
    snapshots: sled::Tree,
    counter: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let entries = std::mem::replace(&mut self.copy, Ok(Vec::new()))
            .map_err(|e| io_error(|a| StorageIOError::read_snapshot(None, a), e))?;
        let find = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let last_log_id: Option<LogId<NodeId>> = match find(LAST_APPLIED) {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| io_error(|a| StorageIOError::read_snapshot(None, a), e))?,
            None => None,
        };
        let last_membership: Membership = match find(MEMBERSHIP) {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| io_error(|a| StorageIOError::read_snapshot(None, a), e))?,
            None => Membership::default(),
        };
        let snapshot_id = match last_log_id {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.counter),
            None => format!("empty-{}", self.counter),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let data = json(&SnapshotData { entries });
        save_snapshot(&self.snapshots, &meta, data.clone())?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
