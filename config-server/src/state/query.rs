//! Typed reads of the state, shared by the command logic and the API handlers.
use super::groups::ProtectionGroup;
use super::keys;
use super::kv::{KvError, KvRead};
use super::model::{AuditRecord, CaMaterial, ClusterMeta, IdentityRecord, PassphraseState};
use super::plans::RecoveryPlan;
use super::protection::{Alert, Job, Policy, ProtectedMachine};

/// A typed view over any `KvRead`.
pub struct StateReader<'a, K: KvRead>(pub &'a K);

impl<K: KvRead> StateReader<'_, K> {
    pub fn cluster_meta(&self) -> Result<Option<ClusterMeta>, KvError> {
        self.0.get(keys::CLUSTER_META)
    }

    pub fn ca(&self) -> Result<Option<CaMaterial>, KvError> {
        self.0.get(keys::CA)
    }

    pub fn passphrase(&self) -> Result<Option<PassphraseState>, KvError> {
        self.0.get(keys::PASSPHRASE)
    }

    pub fn identity(&self, id: &str) -> Result<Option<IdentityRecord>, KvError> {
        self.0.get(&keys::identity(id))
    }

    pub fn identities(&self) -> Result<Vec<IdentityRecord>, KvError> {
        self.0.scan(keys::IDENTITY_PREFIX)
    }

    /// The newest `limit` audit records at or after `since_ms`, oldest first.
    pub fn audit(&self, limit: usize, since_ms: i64) -> Result<Vec<AuditRecord>, KvError> {
        let all: Vec<AuditRecord> = self.0.scan(keys::AUDIT_PREFIX)?;
        let filtered: Vec<AuditRecord> = all.into_iter().filter(|a| a.at_ms >= since_ms).collect();
        let skip = filtered.len().saturating_sub(limit);
        Ok(filtered.into_iter().skip(skip).collect())
    }

    pub fn policy(&self, name: &str) -> Result<Option<Policy>, KvError> {
        self.0.get(&keys::policy(name))
    }

    pub fn policies(&self) -> Result<Vec<Policy>, KvError> {
        self.0.scan(keys::POLICY_PREFIX)
    }

    pub fn machine(&self, name: &str) -> Result<Option<ProtectedMachine>, KvError> {
        self.0.get(&keys::machine(name))
    }

    pub fn machines(&self) -> Result<Vec<ProtectedMachine>, KvError> {
        self.0.scan(keys::MACHINE_PREFIX)
    }

    pub fn group(&self, name: &str) -> Result<Option<ProtectionGroup>, KvError> {
        self.0.get(&keys::group(name))
    }

    pub fn groups(&self) -> Result<Vec<ProtectionGroup>, KvError> {
        self.0.scan(keys::GROUP_PREFIX)
    }

    pub fn plan(&self, name: &str) -> Result<Option<RecoveryPlan>, KvError> {
        self.0.get(&keys::plan(name))
    }

    pub fn plans(&self) -> Result<Vec<RecoveryPlan>, KvError> {
        self.0.scan(keys::PLAN_PREFIX)
    }

    pub fn job(&self, id: &str) -> Result<Option<Job>, KvError> {
        self.0.get(&keys::job(id))
    }

    pub fn jobs(&self) -> Result<Vec<Job>, KvError> {
        self.0.scan(keys::JOB_PREFIX)
    }

    pub fn alerts(&self) -> Result<Vec<Alert>, KvError> {
        self.0.scan(keys::ALERT_PREFIX)
    }
}
