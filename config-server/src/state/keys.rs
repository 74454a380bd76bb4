//! Where each record lives in the state's key space. Keys are ordered strings; numbers are
//! zero-padded so that byte order is numeric order.
use lifeboat_common::Role;

pub const CLUSTER_META: &str = "meta/cluster";
pub const CA: &str = "secret/ca";
pub const PASSPHRASE: &str = "secret/passphrase";
pub const AUDIT_SEQ: &str = "meta/audit-seq";
pub const NEXT_NODE_ID: &str = "meta/next-node-id";
pub const IDENTITY_PREFIX: &str = "identity/";
pub const AUDIT_PREFIX: &str = "audit/";

pub fn identity(id: &str) -> String {
    format!("{IDENTITY_PREFIX}{id}")
}

/// Index from (role, name) to the identity currently holding that name.
pub fn name(role: Role, name: &str) -> String {
    format!("name/{}/{name}", role.as_str())
}

pub fn audit(seq: u64) -> String {
    format!("{AUDIT_PREFIX}{seq:020}")
}

pub const POLICY_PREFIX: &str = "policy/";
pub const MACHINE_PREFIX: &str = "machine/";
pub const GROUP_PREFIX: &str = "group/";
pub const PLAN_PREFIX: &str = "plan/";

pub fn plan(name: &str) -> String {
    format!("{PLAN_PREFIX}{name}")
}

pub fn group(name: &str) -> String {
    format!("{GROUP_PREFIX}{name}")
}
pub const JOB_PREFIX: &str = "job/";

pub fn policy(name: &str) -> String {
    format!("{POLICY_PREFIX}{name}")
}

pub fn machine(name: &str) -> String {
    format!("{MACHINE_PREFIX}{name}")
}

/// Job ids start with their creation time, so key order is creation order.
pub fn job(id: &str) -> String {
    format!("{JOB_PREFIX}{id}")
}

pub const ALERT_PREFIX: &str = "alert/";

pub fn alert(key: &str) -> String {
    format!("{ALERT_PREFIX}{key}")
}
