//! Commands: every change to the replicated state is one of these, proposed through Raft and
//! applied identically on every node. Non-deterministic inputs (time, ids, signatures) are made
//! by the proposer and carried in the command.
use super::groups::{Barrier, ProtectionGroup};
use super::model::{AuditRecord, CaMaterial, ClusterMeta, Facts, IdentityRecord};
use super::plans::RecoveryPlan;
use super::protection::{
    Alert, Job, JobControl, MachineRecovery, Policy, ProtectedMachine, ReplicationState,
};
use serde::{Deserialize, Serialize};

// A command lives only until it is serialised into a Raft entry: the size of its largest
// variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Command {
    /// First entry of a new cluster, written by the node that ran `init`.
    Bootstrap {
        meta: ClusterMeta,
        ca: CaMaterial,
        passphrase: String,
        /// The initial configuration server node and the admin identity.
        identities: Vec<IdentityRecord>,
    },
    /// A component proved the passphrase of `record.passphrase_generation` and got a
    /// certificate. Refused if the passphrase changed since. An older identity of the same role
    /// and name is revoked (superseded).
    Register {
        record: IdentityRecord,
        source: String,
        /// The identity this one replaces (`register --force`): references to it move here.
        #[serde(default)]
        replaces: String,
    },
    Revoke {
        id: String,
        reason: String,
        at_ms: i64,
        by: String,
    },
    /// New passphrase; revokes every identity bound to the passphrase.
    RegeneratePassphrase {
        passphrase: String,
        at_ms: i64,
        by: String,
    },
    /// Low-rate summary of component liveness and facts (the leader keeps the live copy).
    RecordLiveness {
        updates: Vec<LivenessUpdate>,
    },
    /// An event worth keeping that changes nothing else (refused registrations, ...).
    Audit {
        entry: AuditDraft,
    },
    /// Creates the policy and its `-failback` twin.
    CreatePolicy {
        policy: Policy,
    },
    UpdatePolicy {
        policy: Policy,
    },
    /// Deletes the policy and its twin; refused while a machine uses either.
    DeletePolicy {
        name: String,
    },
    /// Moves a protected machine to another existing policy.
    AssignPolicy {
        machine: String,
        policy: String,
    },
    /// Starts protecting a machine (placement already chosen) and records its job.
    Protect {
        machine: ProtectedMachine,
        job: Job,
    },
    /// Refused for a failed-over machine unless `delete_recovered_disks`: its replicas are
    /// then the recovered machine's disks.
    Unprotect {
        name: String,
        job: Job,
        #[serde(default)]
        delete_recovered_disks: bool,
    },
    /// Starts moving a machine to another process server (`force`: at once, no drain).
    StartSwitch {
        machine: String,
        to_ps: String,
        force: bool,
        job: Job,
    },
    /// Ends a switch: moves the machine to `move_to` (its drain finished) or, if `None`,
    /// leaves it where it was (the drain did not finish); records the job.
    EndSwitch {
        machine: String,
        job: Job,
        move_to: Option<String>,
    },
    SetDiskState {
        machine: String,
        disk_id: String,
        state: ReplicationState,
        reason: String,
        at_ms: i64,
    },
    UpdateJob {
        job: Job,
    },
    /// Records a job started outside protect/unprotect (recovery operations).
    CreateJob {
        job: Job,
    },
    CreateGroup {
        group: ProtectionGroup,
    },
    DeleteGroup {
        name: String,
    },
    /// Moves a group's barrier to a new phase (or ends it, noting when).
    PutBarrier {
        group: String,
        barrier: Option<Barrier>,
        last_point_ms: Option<i64>,
    },
    CreatePlan {
        plan: RecoveryPlan,
    },
    DeletePlan {
        name: String,
    },
    /// An operator's word to a waiting job: resume, retry or skip.
    ControlJob {
        id: String,
        control: JobControl,
    },
    /// Replaces a machine's recovery settings and records.
    PutRecovery {
        name: String,
        recovery: MachineRecovery,
    },
    /// Raises an alert unless one with the same key is active.
    RaiseAlert {
        alert: Alert,
    },
    ClearAlert {
        key: String,
        at_ms: i64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LivenessUpdate {
    pub id: String,
    pub last_heartbeat_ms: i64,
    pub facts: Facts,
    /// That heartbeat was the component's last: it stopped cleanly.
    #[serde(default)]
    pub signed_off: bool,
}

/// An audit record before the state machine gives it a sequence number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditDraft {
    pub at_ms: i64,
    pub kind: String,
    pub source: String,
    pub subject: String,
    pub detail: String,
}

impl AuditDraft {
    pub fn numbered(self, seq: u64) -> AuditRecord {
        AuditRecord {
            seq,
            at_ms: self.at_ms,
            kind: self.kind,
            source: self.source,
            subject: self.subject,
            detail: self.detail,
        }
    }
}

/// What applying a command produced. Refusals are results, not errors: the entry is committed
/// either way and every node reaches the same verdict.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub enum CommandResult {
    #[default]
    Done,
    Registered {
        id: String,
        node_id: u64,
    },
    PassphraseChanged {
        generation: u64,
        revoked: u32,
    },
    Refused(String),
    NotFound(String),
}
