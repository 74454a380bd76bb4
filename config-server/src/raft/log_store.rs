//! The Raft log in sled. Durability: `append`, `save_vote`, `truncate` and `purge` flush the
//! sled database (fsync) before reporting success, because Raft's safety rests on a node never
//! forgetting a vote or an acknowledged entry. `save_committed` is not flushed: losing it only
//! delays re-application after a restart.
use super::{io_error, NodeId, StorageError, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageIOError, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last-purged";

#[derive(Clone)]
pub struct SledLogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// Highest committed index seen, for status reports.
    committed_index: Arc<AtomicU64>,
}

impl SledLogStore {
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(SledLogStore {
            db: db.clone(),
            log: db.open_tree("raft-log")?,
            meta: db.open_tree("raft-meta")?,
            committed_index: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Shared handle on the committed index (0 before anything is committed).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self
            .meta
            .get(key)
            .map_err(|e| io_error(StorageIOError::read, e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io_error(StorageIOError::read, e))
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| io_error(StorageIOError::write, e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| io_error(StorageIOError::write, e))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.db
            .flush_async()
            .await
            .map_err(|e| io_error(StorageIOError::write, e))?;
        Ok(())
    }

    fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, StorageError> {
        serde_json::from_slice(bytes).map_err(|e| io_error(StorageIOError::read_logs, e))
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        for item in self.log.range(start.to_be_bytes()..) {
            let (key, value) = item.map_err(|e| io_error(StorageIOError::read_logs, e))?;
            let index = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|e| io_error(StorageIOError::read_logs, e))?,
            );
            if !range.contains(&index) {
                break;
            }
            entries.push(Self::decode_entry(&value)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta(LAST_PURGED)?;
        let last = match self
            .log
            .last()
            .map_err(|e| io_error(StorageIOError::read_logs, e))?
        {
            Some((_, value)) => Some(Self::decode_entry(&value)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        if let Some(id) = committed {
            self.committed_index.fetch_max(id.index, Ordering::Relaxed);
        }
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        let committed: Option<Option<LogId<NodeId>>> = self.get_meta(COMMITTED)?;
        let committed = committed.flatten();
        if let Some(id) = committed {
            self.committed_index.fetch_max(id.index, Ordering::Relaxed);
        }
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes =
                serde_json::to_vec(&entry).map_err(|e| io_error(StorageIOError::write_logs, e))?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_error(StorageIOError::write_logs, e))?;
        // Entries are readable now; they are acknowledged only once on disk.
        let flushed = self.db.flush_async().await;
        match flushed {
            Ok(_) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_error(StorageIOError::write_logs, e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(log_id.index.to_be_bytes()..).keys() {
            batch.remove(key.map_err(|e| io_error(StorageIOError::write_logs, e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_error(StorageIOError::write_logs, e))?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // Record the purge point first: a crash in between leaves extra entries, never a hole.
        self.put_meta(LAST_PURGED, &log_id)?;
        self.flush().await?;
        let mut batch = sled::Batch::default();
        for key in self.log.range(..=log_id.index.to_be_bytes()).keys() {
            batch.remove(key.map_err(|e| io_error(StorageIOError::write_logs, e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_error(StorageIOError::write_logs, e))?;
        self.flush().await
    }
}
