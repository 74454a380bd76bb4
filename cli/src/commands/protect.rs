//! `lifeboat protect|unprotect|status`: enabling replication of machines and seeing how far
//! behind each disk is.
use crate::commands::jobs;
use crate::context::{status_error, ContextArgs};
use crate::format::{age, bytes, table, time};
use lifeboat_proto::v1::{self, ProtectRequest, StatusRequest};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct ProtectArgs {
    /// The machine (the name its agent registered with).
    machine: String,
    /// Replication policy (see `lifeboat policy list`).
    #[arg(long)]
    policy: String,
    /// Process server (name or id); default: the one with the most free cache.
    #[arg(long)]
    ps: Option<String>,
    /// Master target (name or id); default: one with free slots and the most free space.
    #[arg(long)]
    mt: Option<String>,
    /// Follow the job until it finishes.
    #[arg(long)]
    wait: bool,
    /// Command template run after a test failover or failover, e.g.
    /// 'boot-vm --name {machine} --network {network} {disks}' (see docs/operate.md).
    #[arg(long)]
    recovery_hook: Option<String>,
    /// Network mapping handed to the recovery hook, e.g. "lan=recovery-lan".
    #[arg(long)]
    network_map: Option<String>,
}

pub async fn protect(ctx: &ContextArgs, args: ProtectArgs) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let job = client
        .protect(ProtectRequest {
            machine: args.machine.clone(),
            policy: args.policy,
            process_server: args.ps.unwrap_or_default(),
            master_target: args.mt.unwrap_or_default(),
            recovery_hook: args.recovery_hook.unwrap_or_default(),
            network_map: args.network_map.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("Protecting {}: job {}", args.machine, job.id);
    if let Some(step) = job.steps.first() {
        println!("  {}", step.detail);
    }
    if args.wait {
        jobs::watch(&mut client, Some(vec![job.id])).await?;
    } else {
        println!("Follow it with `lifeboat jobs --watch`; see the disks with `lifeboat status`.");
    }
    Ok(())
}

pub async fn unprotect(
    ctx: &ContextArgs,
    machine: String,
    wait: bool,
    delete_recovered_disks: bool,
) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let job = client
        .unprotect(v1::UnprotectRequest {
            name: machine.clone(),
            delete_recovered_disks,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("Replication of {machine} disabled: job {}", job.id);
    if let Some(notes) = job.steps.first().filter(|s| !s.detail.is_empty()) {
        println!("Note: {}", notes.detail);
    }
    if wait {
        jobs::watch(&mut client, Some(vec![job.id])).await?;
    }
    Ok(())
}

fn eta(secs: i64) -> String {
    match secs {
        s if s < 0 => "unknown".into(),
        0 => "-".into(),
        s => humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string(),
    }
}

/// A server's name, marked when it is not heartbeating (replication through it waits).
fn down_if(name: &str, connected: bool) -> String {
    if connected || name.is_empty() {
        name.to_string()
    } else {
        format!("{name} (down)")
    }
}

/// The process server, and the one the machine is moving to during a switch.
fn process_server_column(m: &v1::MachineStatus) -> String {
    let ps = down_if(&m.process_server, m.process_server_connected);
    if m.switching_to.is_empty() {
        ps
    } else {
        format!("{ps} → {} (draining)", m.switching_to)
    }
}

fn disk_json(m: &v1::MachineStatus, d: &v1::DiskStatus) -> serde_json::Value {
    json!({
        "machine": m.name, "policy": m.policy, "process_server": m.process_server,
        "master_target": m.master_target, "agent_connected": m.agent_connected,
        "process_server_connected": m.process_server_connected,
        "switching_to": m.switching_to,
        "master_target_connected": m.master_target_connected,
        "disk_id": d.disk_id, "disk": d.name, "size_bytes": d.size_bytes, "state": d.state,
        "state_reason": d.state_reason, "sync_progress_pct": d.sync_progress_pct, "eta_secs": d.eta_secs,
        "rpo_secs": d.rpo_secs, "rpo_threshold_secs": d.rpo_threshold_secs, "rpo_exceeded": d.rpo_exceeded,
        "pending_bytes": d.pending_bytes, "last_report_unix_ms": d.last_report_unix_ms,
        "capture": d.capture, "writes_stopped": m.writes_stopped, "stall": d.stall,
        "test_failover": m.test_failover.as_ref().map(under_way_json),
        "failover": m.failover.as_ref().map(under_way_json),
    })
}

fn under_way_json(r: &v1::RecoveryUnderWay) -> serde_json::Value {
    json!({
        "point": r.point, "point_time_unix_ms": r.point_time_unix_ms,
        "nbd_uris": r.nbd_uris, "committed": r.committed,
    })
}

/// The lines under the status table for machines with a drill or a failover standing: a
/// drill left running holds views (and their writes) on the master target until cleaned up,
/// and an uncommitted failover waits for a decision.
fn recovery_notes(m: &v1::MachineStatus) -> Vec<String> {
    let at = |r: &v1::RecoveryUnderWay| {
        let when = if r.point_time_unix_ms > 0 {
            format!(" ({})", time(r.point_time_unix_ms))
        } else {
            String::new()
        };
        format!("point {}{when}, disks at {}", r.point, r.nbd_uris.join(" "))
    };
    let mut notes = Vec::new();
    for d in m.disks.iter().filter(|d| !d.stall.is_empty()) {
        notes.push(format!(
            "{}/{}: replication waits: {}",
            m.name, d.name, d.stall
        ));
    }
    if let Some(r) = &m.test_failover {
        notes.push(format!(
            "{}: test failover running at {}; end it with `lifeboat test-failover cleanup {}`",
            m.name,
            at(r),
            m.name
        ));
    }
    if m.writes_stopped && m.failover.is_none() {
        notes.push(format!(
            "{}: the source refuses writes for a planned failover under way (they resume if \
             it fails; see `lifeboat jobs`)",
            m.name
        ));
    }
    if let Some(r) = &m.failover {
        notes.push(if r.committed {
            format!("{}: failed over (committed) at {}", m.name, at(r))
        } else {
            format!(
                "{}: failed over at {}; make it final with `lifeboat failover commit {}`",
                m.name,
                at(r),
                m.name
            )
        });
    }
    notes
}

pub async fn status(
    ctx: &ContextArgs,
    machine: Option<String>,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let reply = client
        .status(StatusRequest {
            machine: machine.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        let rows: Vec<_> = reply
            .machines
            .iter()
            .flat_map(|m| m.disks.iter().map(move |d| disk_json(m, d)))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "disks": rows }))?
        );
        return Ok(());
    }
    if reply.machines.is_empty() {
        println!(
            "No machine is protected. Protect one with `lifeboat protect MACHINE --policy POLICY`."
        );
        return Ok(());
    }
    let mut t = table(&[
        "MACHINE",
        "DISK",
        "SIZE",
        "STATE",
        "SYNC",
        "ETA",
        "RPO",
        "PENDING",
        "PS",
        "MT",
        "LAST REPORT",
    ]);
    for m in &reply.machines {
        for d in &m.disks {
            let rpo =
                crate::format::rpo_cell(&d.state, d.rpo_secs, d.pending_bytes, d.rpo_exceeded);
            t.add_row(vec![
                m.name.clone(),
                d.name.clone(),
                bytes(d.size_bytes),
                d.state.clone(),
                format!("{:.0}%", d.sync_progress_pct),
                eta(d.eta_secs),
                rpo,
                bytes(d.pending_bytes),
                process_server_column(m),
                down_if(&m.master_target, m.master_target_connected),
                if m.agent_connected {
                    age(d.last_report_unix_ms)
                } else {
                    "agent disconnected".into()
                },
            ]);
        }
    }
    println!("{t}");
    for note in reply.machines.iter().flat_map(recovery_notes) {
        println!("{note}");
    }
    Ok(())
}
