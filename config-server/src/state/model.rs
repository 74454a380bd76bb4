//! Records the configuration server keeps in its replicated state. Plain serde structs: the
//! state machine stores them as JSON values under string keys (see `keys`).
use lifeboat_common::Role;
use lifeboat_proto::v1;
use serde::{Deserialize, Serialize};

/// Created once by `config-server init`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub created_at_ms: i64,
}

/// The cluster CA. Replicated so that whichever node leads can sign; it never leaves the
/// configuration servers (Raft traffic is mutual TLS between config-server identities only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The current connection passphrase and how many times it has been regenerated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PassphraseState {
    pub passphrase: String,
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Revocation {
    pub at_ms: i64,
    pub reason: String,
}

/// Component facts as last summarised into Raft (the leader holds fresher ones in memory).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Facts {
    pub version: String,
    pub address: String,
    pub hostname: String,
    pub os: String,
    pub data_dir: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub disk_slots_total: u32,
    pub disk_slots_free: u32,
    pub disks: Vec<DiskFacts>,
    /// Process servers: cache quota and use, and fill/drain rates (bytes/s, last 15 s).
    #[serde(default)]
    pub cache_quota_bytes: u64,
    #[serde(default)]
    pub cache_used_bytes: u64,
    #[serde(default)]
    pub cache_fill_bytes_per_sec: f64,
    #[serde(default)]
    pub cache_drain_bytes_per_sec: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskFacts {
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
}

/// One issued identity: a configuration server node, process server, master target, agent
/// or admin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdentityRecord {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub registered_at_ms: i64,
    /// Passphrase generation the registration proved; 0 for identities made by `init`.
    pub passphrase_generation: u64,
    /// Raft node id (configuration servers only).
    #[serde(default)]
    pub node_id: u64,
    #[serde(default)]
    pub revoked: Option<Revocation>,
    #[serde(default)]
    pub facts: Facts,
    /// Last heartbeat as summarised into Raft; 0 if none yet.
    #[serde(default)]
    pub last_heartbeat_ms: i64,
    /// That heartbeat was the component's last: it stopped cleanly (shown disconnected).
    #[serde(default)]
    pub signed_off: bool,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub source: String,
    pub subject: String,
    pub detail: String,
}

impl Facts {
    pub fn from_proto(f: &v1::ComponentFacts) -> Facts {
        Facts {
            version: f.version.clone(),
            address: f.address.clone(),
            hostname: f.hostname.clone(),
            os: f.os.clone(),
            data_dir: f.data_dir.clone(),
            free_bytes: f.free_bytes,
            total_bytes: f.total_bytes,
            disk_slots_total: f.disk_slots_total,
            disk_slots_free: f.disk_slots_free,
            disks: f
                .disks
                .iter()
                .map(|d| DiskFacts {
                    name: d.name.clone(),
                    path: d.path.clone(),
                    size_bytes: d.size_bytes,
                })
                .collect(),
            cache_quota_bytes: f.cache_quota_bytes,
            cache_used_bytes: f.cache_used_bytes,
            cache_fill_bytes_per_sec: f.cache_fill_bytes_per_sec,
            cache_drain_bytes_per_sec: f.cache_drain_bytes_per_sec,
        }
    }

    pub fn to_proto(&self) -> v1::ComponentFacts {
        v1::ComponentFacts {
            version: self.version.clone(),
            address: self.address.clone(),
            hostname: self.hostname.clone(),
            os: self.os.clone(),
            data_dir: self.data_dir.clone(),
            free_bytes: self.free_bytes,
            total_bytes: self.total_bytes,
            disk_slots_total: self.disk_slots_total,
            disk_slots_free: self.disk_slots_free,
            disks: self
                .disks
                .iter()
                .map(|d| v1::DiskFacts {
                    name: d.name.clone(),
                    path: d.path.clone(),
                    size_bytes: d.size_bytes,
                })
                .collect(),
            cache_quota_bytes: self.cache_quota_bytes,
            cache_used_bytes: self.cache_used_bytes,
            cache_fill_bytes_per_sec: self.cache_fill_bytes_per_sec,
            cache_drain_bytes_per_sec: self.cache_drain_bytes_per_sec,
        }
    }
}

/// Milliseconds since the Unix epoch, as stored in records.
pub use lifeboat_common::now_ms;
