//! `lifeboat recovery-points|test-failover|failover`: choosing a point, proving recovery with
//! a drill, and failing over. Each operation is a job on the configuration server; the
//! command follows it and prints its steps (the NBD URIs of the disks are in them).
use crate::commands::jobs;
use crate::context::{status_error, ContextArgs};
use crate::format::{age, bytes, table, time};
use lifeboat_proto::v1::{self, NameRequest, PointsRequest, RecoverRequest};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct PointsArgs {
    machine: String,
    /// Only points newer than this (e.g. 30m, 2h, 1d).
    #[arg(long, value_parser = crate::durations::whole_seconds)]
    since: Option<u64>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct TestFailoverArgs {
    /// `MACHINE`, or `cleanup MACHINE` to delete the views and what was written into them.
    #[arg(num_args = 1..=2, required = true, value_names = ["MACHINE"])]
    words: Vec<String>,
    /// An id from `lifeboat recovery-points`, a time (RFC 3339: the newest point at or before
    /// it), latest, latest-crash, latest-app, latest-group or latest-planned.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Also write each disk's view to a standalone VHD file on the master target.
    #[arg(long)]
    materialize: bool,
}

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// `MACHINE`, or `commit MACHINE` to make the failover final (older points are discarded).
    #[arg(num_args = 1..=2, required = true, value_names = ["MACHINE"])]
    words: Vec<String>,
    /// Stop writes at the source, ship everything, then fail over: nothing is lost.
    #[arg(long, conflicts_with = "point")]
    planned: bool,
    /// The point to fail over to (as for test-failover).
    #[arg(long)]
    point: Option<String>,
    /// Failing over again to another point: discard what the recovered machine wrote to its
    /// disks since the first failover (refused without it).
    #[arg(long, requires = "point")]
    discard_writes: bool,
}

/// `[verb] MACHINE`: the machine and whether the verb was given.
fn split(words: &[String], verb: &str) -> anyhow::Result<(String, bool)> {
    match words {
        [machine] => Ok((machine.clone(), false)),
        [v, machine] if v == verb => Ok((machine.clone(), true)),
        _ => anyhow::bail!("expected MACHINE or `{verb} MACHINE`"),
    }
}

pub async fn points(ctx: &ContextArgs, args: PointsArgs) -> anyhow::Result<()> {
    let (mut client, _) = ctx.recovery().await?;
    let list = client
        .list_points(PointsRequest {
            machine: args.machine,
            since_secs: args.since.unwrap_or(0),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        let points: Vec<_> = list
            .points
            .iter()
            .map(|p| json!({"id": p.id, "kind": p.kind, "time_unix_ms": p.time_unix_ms, "fuzzy": p.fuzzy}))
            .collect();
        let out = json!({
            "machine": list.machine,
            "points": points,
            "latest_unix_ms": list.latest_unix_ms,
            "journal_bytes": list.journal_bytes,
            "retention_secs": list.retention_secs,
            "failed_over_to": list.failed_over_to,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut t = table(&["POINT", "TYPE", "TIME", "AGE"]);
    for p in list.points.iter().rev() {
        let kind = if p.fuzzy {
            format!("{} (fuzzy)", p.kind)
        } else {
            p.kind.clone()
        };
        t.add_row(vec![
            p.id.clone(),
            kind,
            time(p.time_unix_ms),
            age(p.time_unix_ms),
        ]);
    }
    println!("{t}");
    if !list.failed_over_to.is_empty() {
        println!(
            "{} failed over to {}: replication stopped there; `lifeboat failover {} --point P` \
             moves the failover to another point, `lifeboat failover commit {}` makes it final",
            list.machine, list.failed_over_to, list.machine, list.machine
        );
    }
    println!(
        "latest: replicas hold writes up to {} ({}); retention {}, journal {}",
        time(list.latest_unix_ms),
        age(list.latest_unix_ms),
        humantime::format_duration(std::time::Duration::from_secs(list.retention_secs)),
        bytes(list.journal_bytes)
    );
    Ok(())
}

/// Follows a job until it ends or waits for the operator, and prints its steps.
pub async fn follow(ctx: &ContextArgs, job: v1::JobInfo) -> anyhow::Result<()> {
    let (_, mut protection) = ctx.recovery().await?;
    println!("{} {}: job {}", job.kind, job.target, job.id);
    let watched = jobs::watch(&mut protection, Some(vec![job.id.clone()])).await;
    jobs::show(ctx, job.id.clone(), false).await?;
    let now = protection
        .get_job(NameRequest {
            name: job.id.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if now.state == "Waiting" {
        // A run stopped by a failure is not a success, even though it can go on: scripts
        // following a plan must see it.
        if let Some(failed) = now.steps.iter().find(|s| s.state == "Failed") {
            anyhow::bail!(
                "job {id} waits at a failed step ({}): fix the cause, then `lifeboat job \
                 retry {id}`, or `lifeboat job skip {id}` to go on without it",
                failed.name,
                id = now.id
            );
        }
        println!(
            "Waiting for you: `lifeboat job resume {id}` once the manual step is done",
            id = now.id
        );
    }
    watched
}

pub async fn test_failover(ctx: &ContextArgs, args: TestFailoverArgs) -> anyhow::Result<()> {
    let (machine, cleanup) = split(&args.words, "cleanup")?;
    let (mut client, _) = ctx.recovery().await?;
    let job = if cleanup {
        client
            .cleanup_test_failover(NameRequest { name: machine })
            .await
    } else {
        client
            .test_failover(RecoverRequest {
                machine,
                point: args.point,
                materialize: args.materialize,
                planned: false,
                discard_writes: false,
            })
            .await
    }
    .map_err(status_error)?
    .into_inner();
    follow(ctx, job).await
}

pub async fn failover(ctx: &ContextArgs, args: FailoverArgs) -> anyhow::Result<()> {
    let (machine, commit) = split(&args.words, "commit")?;
    let (mut client, _) = ctx.recovery().await?;
    let job = if commit {
        client.commit_failover(NameRequest { name: machine }).await
    } else {
        if !args.planned && args.point.is_none() {
            anyhow::bail!("say how: --planned (no data loss, the source must be up) or --point P");
        }
        client
            .failover(RecoverRequest {
                machine,
                point: args.point.unwrap_or_default(),
                materialize: false,
                planned: args.planned,
                discard_writes: args.discard_writes,
            })
            .await
    }
    .map_err(status_error)?
    .into_inner();
    follow(ctx, job).await
}
