//! The storage interface the state machine's logic is written against: string keys, JSON
//! values, reads plus a list of writes applied atomically by the storage. `sled` implements it
//! in `raft::state_machine`; `MemoryKv` implements it for unit tests.
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("state storage failed: {0}")]
    Storage(String),
    #[error("state value under {key} is unreadable: {detail}")]
    Corrupt { key: String, detail: String },
}

/// Read access to the state.
pub trait KvRead {
    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Every (key, value) whose key starts with `prefix`, in key order.
    fn scan_raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError>;

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, KvError> {
        match self.get_raw(key)? {
            None => Ok(None),
            Some(bytes) => decode(key, &bytes).map(Some),
        }
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, KvError> {
        self.scan_raw(prefix)?
            .into_iter()
            .map(|(key, bytes)| decode(&key, &bytes))
            .collect()
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, KvError> {
    serde_json::from_slice(bytes).map_err(|e| KvError::Corrupt {
        key: key.to_string(),
        detail: e.to_string(),
    })
}

/// One write of an applied command.
#[derive(Debug, Clone, PartialEq)]
pub enum KvOp {
    Put(String, Vec<u8>),
    Delete(String),
}

/// Writes a command makes, readable by the rest of the same command before they are stored.
#[derive(Debug, Default)]
pub struct WriteSet {
    ops: BTreeMap<String, Option<Vec<u8>>>,
}

impl WriteSet {
    pub fn put<T: Serialize>(&mut self, key: impl Into<String>, value: &T) {
        // Serialising our own plain structs to JSON cannot fail.
        let bytes = serde_json::to_vec(value).expect("state records serialise to JSON");
        self.ops.insert(key.into(), Some(bytes));
    }

    pub fn delete(&mut self, key: impl Into<String>) {
        self.ops.insert(key.into(), None);
    }

    pub fn into_ops(self) -> Vec<KvOp> {
        self.ops
            .into_iter()
            .map(|(k, v)| match v {
                Some(bytes) => KvOp::Put(k, bytes),
                None => KvOp::Delete(k),
            })
            .collect()
    }
}

/// The state as seen by a command being applied: its own writes over the stored state.
pub struct Overlay<'a, K: KvRead> {
    pub base: &'a K,
    pub writes: WriteSet,
}

impl<'a, K: KvRead> Overlay<'a, K> {
    pub fn new(base: &'a K) -> Self {
        Overlay {
            base,
            writes: WriteSet::default(),
        }
    }
}

impl<K: KvRead> KvRead for Overlay<'_, K> {
    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match self.writes.ops.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get_raw(key),
        }
    }

    fn scan_raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        let mut merged: BTreeMap<String, Vec<u8>> =
            self.base.scan_raw(prefix)?.into_iter().collect();
        for (k, v) in self.writes.ops.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(bytes) => merged.insert(k.clone(), bytes.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }
}

/// In-memory storage for tests of the command logic.
#[derive(Debug, Default)]
pub struct MemoryKv(pub BTreeMap<String, Vec<u8>>);

impl MemoryKv {
    pub fn apply(&mut self, ops: Vec<KvOp>) {
        for op in ops {
            match op {
                KvOp::Put(k, v) => self.0.insert(k, v),
                KvOp::Delete(k) => self.0.remove(&k),
            };
        }
    }
}

impl KvRead for MemoryKv {
    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.0.get(key).cloned())
    }

    fn scan_raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        Ok(self
            .0
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
