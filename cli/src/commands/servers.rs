//! `lifeboat servers list|show|revoke`: the registry of components with their liveness.
use crate::context::{status_error, ContextArgs};
use crate::format::{age, bytes, role_name, table, time};
use lifeboat_common::Role;
use lifeboat_proto::v1::{self, GetServerRequest, ListServersRequest};
use serde_json::json;

#[derive(Debug, clap::Subcommand)]
pub enum ServersCommand {
    /// Every registered component: role, name, address, version, last heartbeat, status.
    List {
        /// Only this role (config-server, process-server, master-target, agent, admin).
        #[arg(long)]
        role: Option<Role>,
        /// Include revoked identities.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything known about one component (by id, or by name when one has it).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a component's identity: it is refused from its next call on.
    Revoke { id: String },
}

/// Admin identities (the CLI's) call in; they never heartbeat.
fn heartbeats(s: &v1::ServerInfo) -> bool {
    s.role != v1::Role::Admin as i32
}

fn status(s: &v1::ServerInfo) -> &'static str {
    if s.revoked {
        "Revoked"
    } else if !heartbeats(s) {
        "Valid"
    } else if s.connected {
        "Connected"
    } else {
        "Disconnected"
    }
}

fn details(s: &v1::ServerInfo) -> String {
    let Some(f) = &s.facts else {
        return String::new();
    };
    match Role::from_proto(s.role) {
        Some(Role::ProcessServer) => format!("cache {} free", bytes(f.free_bytes)),
        // Some slots are the retention volume's: counted among the total without saying so,
        // an empty master target would seem to have lost them.
        Some(Role::MasterTarget) => format!(
            "{}/{} disk slots free ({} more for the retention volume), {} free",
            f.disk_slots_free,
            f.disk_slots_total
                .saturating_sub(lifeboat_master_target::RESERVED_SLOTS),
            lifeboat_master_target::RESERVED_SLOTS,
            bytes(f.free_bytes)
        ),
        Some(Role::Agent) => {
            let total: u64 = f.disks.iter().map(|d| d.size_bytes).sum();
            let n = f.disks.len();
            format!(
                "{} ({}), {n} disk{}, {}",
                f.hostname,
                f.os,
                if n == 1 { "" } else { "s" },
                bytes(total)
            )
        }
        _ => String::new(),
    }
}

fn to_json(s: &v1::ServerInfo) -> serde_json::Value {
    let f = s.facts.clone().unwrap_or_default();
    json!({
        "id": s.id,
        "name": s.name,
        "role": role_name(s.role),
        "address": s.address,
        "version": s.version,
        "registered_at_unix_ms": s.registered_at_unix_ms,
        "last_heartbeat_unix_ms": s.last_heartbeat_unix_ms,
        "status": status(s),
        "revoked_reason": s.revoked_reason,
        "passphrase_generation": s.passphrase_generation,
        "hostname": f.hostname,
        "os": f.os,
        "data_dir": f.data_dir,
        "free_bytes": f.free_bytes,
        "total_bytes": f.total_bytes,
        "disk_slots_total": f.disk_slots_total,
        "disk_slots_free": f.disk_slots_free,
        "disks": f.disks.iter().map(|d| json!({"name": d.name, "path": d.path, "size_bytes": d.size_bytes})).collect::<Vec<_>>(),
    })
}

pub async fn run(ctx: &ContextArgs, command: ServersCommand) -> anyhow::Result<()> {
    let mut admin = ctx.admin().await?;
    match command {
        ServersCommand::List { role, all, json } => {
            let reply = admin
                .list_servers(ListServersRequest {
                    role: role.map(|r| r.to_proto() as i32).unwrap_or(0),
                    include_revoked: all,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let rows: Vec<_> = reply.servers.iter().map(to_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"servers": rows, "stale": reply.stale}))?
                );
                return Ok(());
            }
            let mut t = table(&[
                "ROLE",
                "NAME",
                "ID",
                "ADDRESS",
                "VERSION",
                "LAST HEARTBEAT",
                "STATUS",
                "DETAILS",
            ]);
            for s in &reply.servers {
                t.add_row(vec![
                    role_name(s.role).to_string(),
                    s.name.clone(),
                    s.id.clone(),
                    if s.address.is_empty() {
                        "-".into()
                    } else {
                        s.address.clone()
                    },
                    if s.version.is_empty() {
                        "-".into()
                    } else {
                        s.version.clone()
                    },
                    if heartbeats(s) {
                        age(s.last_heartbeat_unix_ms)
                    } else {
                        "-".into()
                    },
                    status(s).to_string(),
                    details(s),
                ]);
            }
            println!("{t}");
            if reply.stale {
                println!("(answered by a follower: heartbeats may lag)");
            }
        }
        ServersCommand::Show { id, json } => {
            let s = admin
                .get_server(GetServerRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&to_json(&s))?);
                return Ok(());
            }
            print_server(&s);
        }
        ServersCommand::Revoke { id } => {
            let s = admin
                .revoke_server(GetServerRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "Revoked {} {} ({}): it is refused from its next call on.",
                role_name(s.role),
                s.name,
                s.id
            );
        }
    }
    Ok(())
}

fn print_server(s: &v1::ServerInfo) {
    let f = s.facts.clone().unwrap_or_default();
    println!("ID:              {}", s.id);
    println!("Name:            {}", s.name);
    println!("Role:            {}", role_name(s.role));
    println!("Status:          {}", status(s));
    if s.revoked {
        println!("Revoked:         {}", s.revoked_reason);
    }
    println!(
        "Address:         {}",
        if s.address.is_empty() {
            "-"
        } else {
            &s.address
        }
    );
    println!("Version:         {}", s.version);
    println!("Host:            {} ({})", f.hostname, f.os);
    println!("Registered:      {}", time(s.registered_at_unix_ms));
    println!(
        "Last heartbeat:  {} ({})",
        time(s.last_heartbeat_unix_ms),
        age(s.last_heartbeat_unix_ms)
    );
    if !f.data_dir.is_empty() {
        println!(
            "Data directory:  {} ({} free of {})",
            f.data_dir,
            bytes(f.free_bytes),
            bytes(f.total_bytes)
        );
    }
    if f.disk_slots_total > 0 {
        println!(
            "Disk slots:      {} free of {}",
            f.disk_slots_free, f.disk_slots_total
        );
    }
    for d in &f.disks {
        println!(
            "Disk:            {} {} ({})",
            d.name,
            d.path,
            bytes(d.size_bytes)
        );
    }
}
