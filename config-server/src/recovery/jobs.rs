//! A recovery job as it runs: its steps move Pending → Running → Succeeded or Failed, and
//! every change is written through Raft so `lifeboat jobs` shows it from any node.
use crate::node::Node;
use crate::services::protection::new_job;
use crate::state::model::now_ms;
use crate::state::protection::{Job, JobState};
use crate::state::Command;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub struct JobRun {
    node: Arc<Node>,
    pub job: Job,
}

impl JobRun {
    /// Records a new job with `steps`, all pending.
    pub async fn start(
        node: Arc<Node>,
        kind: &str,
        target: &str,
        steps: &[&str],
    ) -> Result<JobRun, Status> {
        let steps: Vec<(&str, JobState, String)> = steps
            .iter()
            .map(|s| (*s, JobState::Pending, String::new()))
            .collect();
        let job = new_job(kind, target, &steps);
        Self::record(node, job).await
    }

    /// Records `job` (made by the caller) and returns its run.
    pub async fn record(node: Arc<Node>, mut job: Job) -> Result<JobRun, Status> {
        job.runner = Some(node.id);
        crate::services::protection::result_status(
            node.write(Command::CreateJob { job: job.clone() }).await?,
        )?;
        Ok(JobRun { node, job })
    }

    /// Takes over a recorded job (a plan run continued after the operator's word).
    pub fn resume(node: Arc<Node>, mut job: Job) -> JobRun {
        job.runner = Some(node.id);
        JobRun { node, job }
    }

    /// Sets step `i` (finished steps are at 100%).
    pub async fn set(&mut self, i: usize, state: JobState, detail: impl Into<String>) {
        self.update(i, state, detail.into(), 0.0).await
    }

    async fn update(&mut self, i: usize, state: JobState, detail: String, pct: f64) {
        let step = &mut self.job.steps[i];
        step.state = state;
        step.detail = detail;
        step.progress_pct = match state {
            JobState::Succeeded | JobState::Skipped => 100.0,
            _ => pct,
        };
        self.save().await;
    }

    pub async fn save(&mut self) {
        self.job.updated_at_ms = now_ms();
        if let Err(e) = self
            .node
            .write(Command::UpdateJob {
                job: self.job.clone(),
            })
            .await
        {
            tracing::warn!(job = %self.job.id, "job progress not recorded: {}", e.message());
        }
    }

    fn index(&self, name: &str) -> usize {
        self.job
            .steps
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("job {} has no step {name}", self.job.kind))
    }

    /// Marks step `name` running (or updates its progress).
    pub async fn running(&mut self, name: &str, detail: impl Into<String>, pct: f64) {
        let i = self.index(name);
        self.update(i, JobState::Running, detail.into(), pct).await
    }

    pub async fn done(&mut self, name: &str, detail: impl Into<String>) {
        let i = self.index(name);
        self.update(i, JobState::Succeeded, detail.into(), 100.0)
            .await
    }

    /// Ends the job: succeeded, or failed at its running step with `error`.
    pub async fn finish(mut self, result: Result<(), String>) {
        match result {
            Ok(()) => self.job.state = JobState::Succeeded,
            Err(error) => {
                if let Some(step) = self
                    .job
                    .steps
                    .iter_mut()
                    .find(|s| s.state == JobState::Running)
                {
                    step.state = JobState::Failed;
                    if step.detail.is_empty() {
                        step.detail = error.clone();
                    }
                }
                tracing::warn!(job = %self.job.id, kind = %self.job.kind, "job failed: {error}");
                self.job.state = JobState::Failed;
                self.job.error = error;
            }
        }
        self.save().await;
    }
}

/// Ends the jobs this node's previous process was running when it stopped (a crash, a
/// restart): nothing runs them any more, and `lifeboat jobs` must not show them as running.
/// A machine's job fails; a plan's waits at the interrupted step for `job retry` or `job skip`
/// (and this process takes the operator's word). Runs once, as soon as a leader is known.
pub async fn end_interrupted(node: Arc<Node>, started_ms: i64, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = cancel.cancelled() => return,
        }
        if node.leader().is_none() {
            continue;
        }
        let Ok(jobs) = node.state().jobs() else {
            continue;
        };
        let mut all_recorded = true;
        for mut job in jobs.into_iter().filter(|j| {
            j.state == JobState::Running
                && j.runner == Some(node.id)
                && j.updated_at_ms < started_ms
        }) {
            let id = job.id.clone();
            interrupt(&mut job, node.id);
            let plan = job.plan.is_some();
            match node.write(Command::UpdateJob { job }).await {
                Ok(_) => {
                    tracing::warn!(job = %id, "job interrupted by this server's restart");
                    if plan {
                        crate::recovery::plans::spawn(node.clone(), id);
                    }
                }
                Err(e) => {
                    tracing::debug!(job = %id, "interrupted job not recorded yet: {}", e.message());
                    all_recorded = false;
                }
            }
        }
        if all_recorded {
            return;
        }
    }
}

/// Marks `job` interrupted: its running step failed, and the job failed (or, for a plan,
/// waiting for the operator).
fn interrupt(job: &mut Job, node_id: u64) {
    let why = format!("interrupted: configuration server {node_id} restarted while it ran");
    if let Some(step) = job.steps.iter_mut().find(|s| s.state == JobState::Running) {
        step.state = JobState::Failed;
        step.detail = why.clone();
    }
    job.updated_at_ms = now_ms();
    if job.plan.is_some() {
        job.state = JobState::Waiting;
        job.error = format!(
            "{why}; `lifeboat job retry {0}` runs the step again (each is safe to repeat), \
             `lifeboat job skip {0}` goes on without it",
            job.id
        );
    } else {
        job.state = JobState::Failed;
        job.error = format!("{why}; run the operation again (each step is safe to repeat)");
    }
}
