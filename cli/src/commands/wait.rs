//! `lifeboat wait`: blocks until a machine's disks reach a replication state, for scripts
//! (and benchmarks) that must not poll `lifeboat status` themselves — one connection, one
//! process, a status request every 100 ms.
use crate::context::{status_error, ContextArgs};
use crate::format::bytes;
use lifeboat_proto::v1::{DiskStatus, StatusRequest};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// The machine (the name its agent registered with).
    machine: String,
    /// Also wait until nothing is pending: every write made before the wait began is applied
    /// on the master target (RPO 0, as of a report the agent sent after the wait began).
    #[arg(long)]
    caught_up: bool,
    /// Give up after this many seconds (exit status 1).
    #[arg(long, default_value_t = 3600)]
    timeout_secs: u64,
}

const POLL: Duration = Duration::from_millis(100);

/// Why a disk is not there yet (`None`: it is). `reported_before`: the time of the disk's
/// last report when the wait began — "caught up" must come from a later report, so it covers
/// every write made before `lifeboat wait` ran.
fn not_yet(d: &DiskStatus, caught_up: bool, reported_before: i64) -> Option<String> {
    if d.state != "Protected" {
        let why = if d.state_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", d.state_reason)
        };
        return Some(format!(
            "disk {} is {}{why}, sync {:.0}%",
            d.name, d.state, d.sync_progress_pct
        ));
    }
    if caught_up && d.last_report_unix_ms <= reported_before {
        return Some(format!(
            "disk {} has not reported since the wait began",
            d.name
        ));
    }
    if caught_up && (d.pending_bytes > 0 || d.rpo_secs > 0.0) {
        return Some(format!(
            "disk {} has {} pending (RPO {:.1}s)",
            d.name,
            bytes(d.pending_bytes),
            d.rpo_secs
        ));
    }
    None
}

pub async fn run(ctx: &ContextArgs, args: WaitArgs) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    // Last report time per disk at the start (the configuration server's clock, so clock
    // skew between hosts does not matter).
    let mut reported_before: Option<std::collections::HashMap<String, i64>> = None;
    loop {
        let reply = client
            .status(StatusRequest {
                machine: args.machine.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let machine = reply
            .machines
            .iter()
            .find(|m| m.name == args.machine)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "machine {} is not protected; protect it with `lifeboat protect {} --policy POLICY`",
                    args.machine,
                    args.machine
                )
            })?;
        let before = reported_before.get_or_insert_with(|| {
            machine
                .disks
                .iter()
                .map(|d| (d.disk_id.clone(), d.last_report_unix_ms))
                .collect()
        });
        let waiting: Vec<String> = machine
            .disks
            .iter()
            .filter_map(|d| {
                let since = before.get(&d.disk_id).copied().unwrap_or(i64::MIN);
                not_yet(d, args.caught_up, since)
            })
            .collect();
        if waiting.is_empty() && !machine.disks.is_empty() {
            let what = if args.caught_up {
                "Protected, nothing pending"
            } else {
                "Protected"
            };
            println!(
                "{}: every disk {what} (waited {:.1}s)",
                args.machine,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "gave up after {}s: {}; see `lifeboat status {}` and `lifeboat alerts`",
                args.timeout_secs,
                if waiting.is_empty() {
                    "the machine has no disks yet".to_string()
                } else {
                    waiting.join("; ")
                },
                args.machine
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
