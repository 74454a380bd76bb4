//! `lifeboat load-balance`: shows which machines to move between process servers, by their
//! change rates and the process servers' cache headroom, and the load each process server
//! would carry after; `--apply` starts those moves (switch jobs).
use crate::commands::jobs;
use crate::context::{status_error, ContextArgs};
use crate::format::{bytes, table};
use lifeboat_proto::v1::{self, BalanceRequest};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct BalanceArgs {
    /// Start the moves shown (each is a `switch` job).
    #[arg(long)]
    apply: bool,
    /// With --apply: follow the jobs until they finish.
    #[arg(long, requires = "apply")]
    wait: bool,
    #[arg(long)]
    json: bool,
}

fn rate(bytes_per_sec: f64) -> String {
    format!("{}/s", bytes(bytes_per_sec.round() as u64))
}

/// How long the headroom would hold `load` (the cache's buffer if its master targets stopped).
fn lasts(s: &v1::BalanceServer, load: f64) -> String {
    let headroom = s.cache_quota_bytes.saturating_sub(s.cache_used_bytes) as f64;
    if load <= 0.0 {
        return "-".into();
    }
    let secs = headroom / load;
    match secs {
        s if s >= 2.0 * 86400.0 => format!("{:.0} days", s / 86400.0),
        s if s >= 2.0 * 3600.0 => format!("{:.0} h", s / 3600.0),
        s => format!("{:.0} min", s / 60.0),
    }
}

pub async fn run(ctx: &ContextArgs, args: BalanceArgs) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let plan = client
        .balance_process_servers(BalanceRequest { apply: args.apply })
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        let servers: Vec<_> = plan.servers.iter().map(|s| json!({
            "name": s.name, "connected": s.connected, "cache_quota_bytes": s.cache_quota_bytes,
            "cache_used_bytes": s.cache_used_bytes, "change_bytes_per_sec": s.change_bytes_per_sec,
            "change_bytes_per_sec_after": s.change_bytes_per_sec_after, "machines": s.machines,
            "machines_after": s.machines_after,
        })).collect();
        let moves: Vec<_> = plan.moves.iter().map(|m| json!({
            "machine": m.machine, "from": m.from, "to": m.to,
            "change_bytes_per_sec": m.change_bytes_per_sec, "job_id": m.job_id, "error": m.error,
        })).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "servers": servers, "moves": moves }))?
        );
    } else {
        let mut t = table(&[
            "PROCESS SERVER",
            "CACHE USED / QUOTA",
            "MACHINES",
            "CHANGE RATE",
            "CACHE WOULD LAST",
        ]);
        for s in &plan.servers {
            let arrow = |now: String, after: String| {
                if now == after {
                    now
                } else {
                    format!("{now} → {after}")
                }
            };
            t.add_row(vec![
                if s.connected {
                    s.name.clone()
                } else {
                    format!("{} (down)", s.name)
                },
                format!(
                    "{} / {}",
                    bytes(s.cache_used_bytes),
                    bytes(s.cache_quota_bytes)
                ),
                arrow(s.machines.to_string(), s.machines_after.to_string()),
                arrow(
                    rate(s.change_bytes_per_sec),
                    rate(s.change_bytes_per_sec_after),
                ),
                arrow(
                    lasts(s, s.change_bytes_per_sec),
                    lasts(s, s.change_bytes_per_sec_after),
                ),
            ]);
        }
        println!("{t}");
        if plan.moves.is_empty() {
            println!("Balanced: no move would make the busiest cache last noticeably longer.");
        }
        for m in &plan.moves {
            let what = format!(
                "{} ({}): {} → {}",
                m.machine,
                rate(m.change_bytes_per_sec),
                m.from,
                m.to
            );
            match (args.apply, m.error.is_empty()) {
                (false, _) => println!("move {what}"),
                (true, true) => println!("moving {what}: job {}", m.job_id),
                (true, false) => println!("not moved {what}: {}", m.error),
            }
        }
        if !args.apply && !plan.moves.is_empty() {
            println!("Start these moves with `lifeboat load-balance --apply`.");
        }
    }
    let started: Vec<String> = plan
        .moves
        .iter()
        .filter(|m| !m.job_id.is_empty())
        .map(|m| m.job_id.clone())
        .collect();
    if args.wait && !started.is_empty() {
        jobs::watch(&mut client, Some(started)).await?;
    }
    if plan.moves.iter().any(|m| !m.error.is_empty()) {
        anyhow::bail!("some moves were refused");
    }
    Ok(())
}
