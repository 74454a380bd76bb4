//! Records of replication: policies, protected machines and their disks with the replication
//! state machine of DESIGN §4, and jobs (every long operation, with steps and progress).
use serde::{Deserialize, Serialize};

/// Suffix of the failback twin every policy gets.
pub const FAILBACK_SUFFIX: &str = "-failback";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Policy {
    pub name: String,
    /// An alert is raised when a disk's RPO exceeds this.
    pub rpo_threshold_secs: u64,
    /// How far back recovery points are kept.
    pub retention_secs: u64,
    /// 0: no app-consistent points.
    pub app_consistent_every_secs: u64,
    pub crash_consistent_every_secs: u64,
    /// Compress cached and shipped data (zstd).
    pub compression: bool,
    /// For a `-failback` twin: the policy it was made with.
    #[serde(default)]
    pub failback_of: Option<String>,
    pub created_at_ms: i64,
}

/// Replication state of one protected disk (DESIGN §4).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ReplicationState {
    Enabling,
    InitialSync,
    Protected,
    ResyncRequired,
    Resyncing,
    FailedOver,
    Reprotecting,
    FailbackSync,
    Disabled,
}

impl ReplicationState {
    /// Every state, in the order of the state machine (for tests that walk all of them).
    #[cfg(test)]
    pub const ALL: [ReplicationState; 9] = {
        use ReplicationState::*;
        [
            Enabling,
            InitialSync,
            Protected,
            ResyncRequired,
            Resyncing,
            FailedOver,
            Reprotecting,
            FailbackSync,
            Disabled,
        ]
    };

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationState::Enabling => "Enabling",
            ReplicationState::InitialSync => "InitialSync",
            ReplicationState::Protected => "Protected",
            ReplicationState::ResyncRequired => "ResyncRequired",
            ReplicationState::Resyncing => "Resyncing",
            ReplicationState::FailedOver => "FailedOver",
            ReplicationState::Reprotecting => "Reprotecting",
            ReplicationState::FailbackSync => "FailbackSync",
            ReplicationState::Disabled => "Disabled",
        }
    }

    /// Transitions the replication state machine allows; anything else is a bug or a stale
    /// report and is refused.
    pub fn can_become(self, next: ReplicationState) -> bool {
        use ReplicationState::*;
        if self == next {
            return true;
        }
        matches!(
            (self, next),
            (Enabling, InitialSync)
                | (InitialSync, Protected)
                | (Protected, ResyncRequired)
                | (Enabling | InitialSync, ResyncRequired)
                | (ResyncRequired, Resyncing)
                | (Resyncing, Protected)
                | (Resyncing, ResyncRequired)
                | (Protected | ResyncRequired | Resyncing, FailedOver)
                | (FailedOver, Reprotecting)
                | (Reprotecting, FailbackSync)
                | (FailbackSync, Protected)
                | (_, Disabled)
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProtectedDisk {
    /// Stable id used on the data path (batches, replica files).
    pub disk_id: String,
    pub name: String,
    pub source_path: String,
    pub size_bytes: u64,
    pub state: ReplicationState,
    pub state_reason: String,
    pub state_changed_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProtectedMachine {
    pub name: String,
    pub agent_id: String,
    pub policy: String,
    pub ps_id: String,
    pub mt_id: String,
    pub disks: Vec<ProtectedDisk>,
    pub protected_at_ms: i64,
    #[serde(default)]
    pub recovery: MachineRecovery,
    /// A move to another process server under way: `ps_id` drains first (DESIGN §8).
    #[serde(default)]
    pub switching: Option<Switching>,
}

/// A process-server switch waiting for the current process server to drain: until then it
/// stores nothing more for the machine's disks and the agent ships nothing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Switching {
    pub to_ps: String,
    pub job_id: String,
    pub started_at_ms: i64,
}

/// How the machine is recovered, and the recovery under way (DESIGN §7).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineRecovery {
    /// Command template run after a (test) failover; see `recovery::hook`.
    #[serde(default)]
    pub hook: String,
    /// Network mapping handed to the hook, e.g. "lan=recovery-lan".
    #[serde(default)]
    pub network_map: String,
    #[serde(default)]
    pub test_failover: Option<RecoveryRecord>,
    #[serde(default)]
    pub failover: Option<RecoveryRecord>,
    /// A planned failover asked the agent to refuse writes and place a final point.
    #[serde(default)]
    pub stop_writes: bool,
    /// When writes were first stopped (Unix ms; 0: not recorded). A planned failover run
    /// again takes any final point placed since: none of the source's writes can follow it.
    #[serde(default)]
    pub stop_writes_since_ms: i64,
}

/// A test failover or failover: which point, and the views its disks run on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RecoveryRecord {
    pub job_id: String,
    pub point: String,
    pub point_time_ms: i64,
    pub views: Vec<ViewRecord>,
    #[serde(default)]
    pub committed: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ViewRecord {
    pub disk_id: String,
    pub disk_name: String,
    pub view_id: String,
    pub nbd_uri: String,
    /// A standalone copy on the master target (test failover with --materialize).
    #[serde(default)]
    pub materialized_path: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    /// A step not started yet.
    Pending,
    /// Waiting for the operator: a manual step, or a failed step to retry or skip.
    Waiting,
    /// A step the operator chose to skip.
    Skipped,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "Running",
            JobState::Succeeded => "Succeeded",
            JobState::Failed => "Failed",
            JobState::Pending => "Pending",
            JobState::Waiting => "Waiting",
            JobState::Skipped => "Skipped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobStep {
    pub name: String,
    pub state: JobState,
    pub detail: String,
    /// 0-100; meaningful for long steps such as initial sync.
    pub progress_pct: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    /// "protect", "unprotect", ...
    pub kind: String,
    /// What it acts on (a machine name).
    pub target: String,
    pub state: JobState,
    pub steps: Vec<JobStep>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub error: String,
    /// The operator's answer to a waiting job, until the job takes it.
    #[serde(default)]
    pub control: Option<JobControl>,
    /// For a recovery-plan job: what each step does.
    #[serde(default)]
    pub plan: Option<PlanRun>,
    /// The configuration server node whose process runs the job (recovery and plan jobs; the
    /// leader's reconciler drives the others): when that process restarts, the job is over.
    #[serde(default)]
    pub runner: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JobControl {
    /// Go on after a manual step.
    Resume,
    /// Run the failed step again.
    Retry,
    /// Leave the failed (or manual) step and go on.
    Skip,
}

/// A recovery plan as one run of it does it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanRun {
    pub plan: String,
    /// "test-failover", "test-failover-cleanup" or "failover".
    pub mode: String,
    pub point: String,
    #[serde(default)]
    pub planned: bool,
    /// One per job step, in order.
    pub steps: Vec<PlanStep>,
    /// Machine → the point chosen for it when the run began (`latest-group`: one group
    /// point shared by the machines of each group, not each machine's newest at its turn).
    #[serde(default)]
    pub points: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum PlanStep {
    Machine(String),
    Action(crate::state::plans::PlanAction),
}

impl Job {
    /// This job as failed at `now` for `why`: every step not done fails with it.
    pub fn failed(&self, now: i64, why: String) -> Job {
        let mut next = self.clone();
        next.state = JobState::Failed;
        next.updated_at_ms = now;
        for step in &mut next.steps {
            if matches!(step.state, JobState::Running | JobState::Pending) {
                step.state = JobState::Failed;
            }
        }
        next.error = why;
        next
    }

    pub fn progress_pct(&self) -> f64 {
        if self.steps.is_empty() {
            return 0.0;
        }
        let done: f64 = self
            .steps
            .iter()
            .map(|s| match s.state {
                JobState::Succeeded | JobState::Skipped => 100.0,
                _ => s.progress_pct,
            })
            .sum();
        done / self.steps.len() as f64
    }
}

/// A condition an operator must look at (RPO over threshold, ...). Raised and cleared by the
/// leader's reconciler; the key says what it is about, so it is raised once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Alert {
    /// e.g. "rpo/d-1a2b3c".
    pub key: String,
    /// "warning" or "critical".
    pub severity: String,
    pub subject: String,
    pub message: String,
    pub raised_at_ms: i64,
}
