//! `lifeboat jobs [--watch] [--all]` and `lifeboat job show ID`: long operations with their
//! steps, progress bars while they run.
use crate::context::{status_error, ContextArgs};
use crate::format::{age, table};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lifeboat_proto::v1::{self, protection_client::ProtectionClient, ListJobsRequest, NameRequest};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    /// Include finished jobs.
    #[arg(long)]
    all: bool,
    /// Follow running jobs with progress bars until they finish.
    #[arg(long)]
    watch: bool,
    #[arg(long)]
    json: bool,
}

pub fn to_json(j: &v1::JobInfo) -> serde_json::Value {
    json!({
        "id": j.id, "kind": j.kind, "target": j.target, "state": j.state,
        "progress_pct": j.progress_pct, "error": j.error,
        "created_at_unix_ms": j.created_at_unix_ms, "updated_at_unix_ms": j.updated_at_unix_ms,
        "steps": j.steps.iter().map(|s| json!({"name": s.name, "state": s.state, "detail": s.detail, "progress_pct": s.progress_pct})).collect::<Vec<_>>(),
    })
}

/// The step a job is at: the one running, or the one a waiting plan run stopped at (a manual
/// step, or a failed one waiting for retry or skip).
fn current_step(j: &v1::JobInfo) -> Option<&v1::JobStep> {
    j.steps.iter().find(|s| s.state == "Running").or_else(|| {
        (j.state == "Waiting")
            .then(|| {
                j.steps
                    .iter()
                    .find(|s| s.state == "Waiting" || s.state == "Failed")
            })
            .flatten()
    })
}

pub async fn list(ctx: &ContextArgs, args: JobsArgs) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    if args.watch {
        return watch(&mut client, None).await;
    }
    let jobs = client
        .list_jobs(ListJobsRequest {
            all: args.all,
            limit: 50,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .jobs;
    if args.json {
        let rows: Vec<_> = jobs.iter().map(to_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "jobs": rows }))?
        );
        return Ok(());
    }
    if jobs.is_empty() {
        println!(
            "No {}jobs.",
            if args.all { "" } else { "running or waiting " }
        );
        return Ok(());
    }
    let mut t = table(&[
        "ID",
        "KIND",
        "TARGET",
        "STATE",
        "PROGRESS",
        "CURRENT STEP",
        "UPDATED",
    ]);
    for j in &jobs {
        let current = current_step(j).map(|s| s.name.clone()).unwrap_or_default();
        t.add_row(vec![
            j.id.clone(),
            j.kind.clone(),
            j.target.clone(),
            j.state.clone(),
            format!("{:.0}%", j.progress_pct),
            current,
            age(j.updated_at_unix_ms),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn show(ctx: &ContextArgs, id: String, as_json: bool) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let j = client
        .get_job(NameRequest { name: id })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&to_json(&j))?);
        return Ok(());
    }
    println!(
        "Job {} ({} {}): {} {:.0}%",
        j.id, j.kind, j.target, j.state, j.progress_pct
    );
    if !j.error.is_empty() {
        println!("Error: {}", j.error);
    }
    for (i, s) in j.steps.iter().enumerate() {
        let head = format!(
            "  {}. {:<40} {:<10} {:>4.0}%  ",
            i + 1,
            s.name,
            s.state,
            s.progress_pct
        );
        // A detail of several lines (one URI per disk, say) continues under its first line.
        let detail = s.detail.replace(
            '\n',
            &format!("\n{:width$}", "", width = head.chars().count()),
        );
        println!("{head}{detail}");
    }
    Ok(())
}

/// Shows a progress bar per running job (or per job in `only`) until all have finished.
/// Returns an error if any of them failed.
pub async fn watch(
    client: &mut ProtectionClient<Channel>,
    only: Option<Vec<String>>,
) -> anyhow::Result<()> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:40} [{bar:30}] {pos:>3}% {msg}")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> ");
    let mut shown: HashMap<String, ProgressBar> = HashMap::new();
    let mut failed = Vec::new();
    // Without a terminal no bars are drawn: a log or a pipe gets a line whenever a job's
    // progress or step changes instead.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line: HashMap<String, String> = HashMap::new();
    loop {
        let jobs: Vec<v1::JobInfo> = match &only {
            Some(ids) => {
                let mut jobs = Vec::new();
                for id in ids {
                    jobs.push(
                        client
                            .get_job(NameRequest { name: id.clone() })
                            .await
                            .map_err(status_error)?
                            .into_inner(),
                    );
                }
                jobs
            }
            None => {
                let running = client
                    .list_jobs(ListJobsRequest {
                        all: false,
                        limit: 50,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .jobs;
                let mut jobs = running;
                // Jobs we were showing that finished since: fetch their final state.
                for id in shown.keys() {
                    if !jobs.iter().any(|j| &j.id == id) {
                        jobs.push(
                            client
                                .get_job(NameRequest { name: id.clone() })
                                .await
                                .map_err(status_error)?
                                .into_inner(),
                        );
                    }
                }
                jobs
            }
        };
        let mut running = 0;
        for j in &jobs {
            let bar = shown.entry(j.id.clone()).or_insert_with(|| {
                let bar = bars.add(ProgressBar::new(100));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{} {}", j.kind, j.target));
                bar
            });
            bar.set_position(j.progress_pct.round() as u64);
            let current = j.steps.iter().find(|s| s.state == "Running");
            match j.state.as_str() {
                "Running" => {
                    running += 1;
                    bar.set_message(
                        current
                            .map(|s| format!("{}: {}", s.name, s.detail.replace('\n', " ")))
                            .unwrap_or_default(),
                    );
                    if plain {
                        let line = format!(
                            "job {} {} {}: {:.0}% {}",
                            j.id,
                            j.kind,
                            j.target,
                            j.progress_pct,
                            bar.message()
                        );
                        if last_line.get(&j.id) != Some(&line) {
                            println!("{line}");
                            last_line.insert(j.id.clone(), line);
                        }
                    }
                }
                "Failed" => {
                    if !bar.is_finished() {
                        bar.abandon_with_message(format!("FAILED: {}", j.error));
                        failed.push(j.id.clone());
                    }
                }
                _ => {
                    if !bar.is_finished() {
                        bar.finish_with_message(j.state.clone());
                    }
                }
            }
        }
        if running == 0 {
            if shown.is_empty() {
                println!("No running jobs.");
            }
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if plain {
        // No progress bars were drawn: say how each job ended.
        for (id, bar) in &shown {
            println!("job {id}: {}", bar.message());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "job(s) failed: {}; see `lifeboat job show ID`",
            failed.join(", ")
        )
    }
}
