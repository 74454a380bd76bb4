//! A recovery job as it runs: its steps move Pending → Running → Succeeded or Failed, and
//! every change is written through Raft so `lifeboat jobs` shows it from any node.
use crate::node::Node;
use crate::services::protection::new_job;
use crate::state::model::now_ms;
use crate::state::protection::{Job, JobState};
use crate::state::Command;
use std::sync::Arc;
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
    pub async fn record(node: Arc<Node>, job: Job) -> Result<JobRun, Status> {
        crate::services::protection::result_status(
            node.write(Command::CreateJob { job: job.clone() }).await?,
        )?;
        Ok(JobRun { node, job })
    }

    /// Takes over a recorded job (a plan run continued after the operator's word).
    pub fn resume(node: Arc<Node>, job: Job) -> JobRun {
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
