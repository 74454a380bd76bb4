//! `lifeboat policy create|list|show|update|assign|delete`: replication policies. Creating `P`
//! also creates its failback twin `P-failback`.
use crate::context::{status_error, ContextArgs};
use crate::durations::whole_seconds;
use crate::format::{table, time};
use lifeboat_proto::v1::{self, Empty, NameRequest};
use serde_json::json;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct PolicySpecArgs {
    /// Alert when a disk's RPO exceeds this (e.g. 15m).
    #[arg(long, default_value = "15m", value_parser = whole_seconds)]
    rpo_threshold: u64,
    /// Keep recovery points this long (e.g. 24h).
    #[arg(long, default_value = "24h", value_parser = whole_seconds)]
    retention: u64,
    /// Take an app-consistent point this often (0 for none; only agents given a --freeze-hook
    /// make them).
    #[arg(long, default_value = "60m", value_parser = whole_seconds)]
    app_consistent_every: u64,
    /// Take a crash-consistent point this often.
    #[arg(long, default_value = "5m", value_parser = whole_seconds)]
    crash_consistent_every: u64,
    /// Do not compress cached and shipped data.
    #[arg(long)]
    no_compression: bool,
}

/// What `policy update` changes: only the settings given (at least one); the others keep
/// their values.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = true)]
pub struct PolicyChangeArgs {
    /// Alert when a disk's RPO exceeds this (e.g. 15m).
    #[arg(long, value_parser = whole_seconds)]
    rpo_threshold: Option<u64>,
    /// Keep recovery points this long (e.g. 24h).
    #[arg(long, value_parser = whole_seconds)]
    retention: Option<u64>,
    /// Take an app-consistent point this often (0 for none; only agents given a --freeze-hook
    /// make them).
    #[arg(long, value_parser = whole_seconds)]
    app_consistent_every: Option<u64>,
    /// Take a crash-consistent point this often.
    #[arg(long, value_parser = whole_seconds)]
    crash_consistent_every: Option<u64>,
    /// Compress cached and shipped data.
    #[arg(long, conflicts_with = "no_compression")]
    compression: bool,
    /// Do not compress cached and shipped data.
    #[arg(long)]
    no_compression: bool,
}

impl PolicyChangeArgs {
    /// `current` with the given settings changed.
    fn apply_to(&self, mut current: v1::PolicySpec) -> v1::PolicySpec {
        let set = |field: &mut u64, value: Option<u64>| *field = value.unwrap_or(*field);
        set(&mut current.rpo_threshold_secs, self.rpo_threshold);
        set(&mut current.retention_secs, self.retention);
        set(
            &mut current.app_consistent_every_secs,
            self.app_consistent_every,
        );
        set(
            &mut current.crash_consistent_every_secs,
            self.crash_consistent_every,
        );
        if self.compression || self.no_compression {
            current.compression = self.compression;
        }
        current
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Create a policy (and its `-failback` twin).
    Create {
        name: String,
        #[command(flatten)]
        spec: PolicySpecArgs,
    },
    /// Change some of a policy's settings (those not given keep their values; the
    /// `-failback` twin is changed by its own name).
    Update {
        name: String,
        #[command(flatten)]
        change: PolicyChangeArgs,
    },
    /// List policies with their settings and how many machines use each.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one policy: its settings, its twin and the machines using it.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a policy and its twin (refused while a machine uses either).
    Delete { name: String },
    /// Move a protected machine to this policy: replication goes on, no resync; the new
    /// RPO threshold, retention and point frequencies apply from now on.
    Assign {
        name: String,
        /// The protected machine.
        machine: String,
    },
}

fn spec(name: String, args: &PolicySpecArgs) -> v1::PolicySpec {
    v1::PolicySpec {
        name,
        rpo_threshold_secs: args.rpo_threshold,
        retention_secs: args.retention,
        app_consistent_every_secs: args.app_consistent_every,
        crash_consistent_every_secs: args.crash_consistent_every,
        compression: !args.no_compression,
    }
}

fn d(secs: u64) -> String {
    if secs == 0 {
        "off".into()
    } else {
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

fn to_json(p: &v1::PolicyInfo) -> serde_json::Value {
    let s = p.spec.clone().unwrap_or_default();
    json!({
        "name": s.name, "rpo_threshold_secs": s.rpo_threshold_secs, "retention_secs": s.retention_secs,
        "app_consistent_every_secs": s.app_consistent_every_secs,
        "crash_consistent_every_secs": s.crash_consistent_every_secs, "compression": s.compression,
        "failback_of": p.failback_of, "created_at_unix_ms": p.created_at_unix_ms, "machines": p.machines,
    })
}

fn print_table(policies: &[v1::PolicyInfo]) {
    let mut t = table(&[
        "NAME",
        "RPO THRESHOLD",
        "RETENTION",
        "APP-CONSISTENT",
        "CRASH-CONSISTENT",
        "COMPRESSION",
        "MACHINES",
    ]);
    for p in policies {
        let s = p.spec.clone().unwrap_or_default();
        t.add_row(vec![
            s.name,
            d(s.rpo_threshold_secs),
            d(s.retention_secs),
            d(s.app_consistent_every_secs),
            d(s.crash_consistent_every_secs),
            if s.compression { "zstd" } else { "off" }.to_string(),
            p.machines.len().to_string(),
        ]);
    }
    println!("{t}");
}

pub async fn run(ctx: &ContextArgs, command: PolicyCommand) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    match command {
        PolicyCommand::Create { name, spec: args } => {
            let list = client
                .create_policy(spec(name, &args))
                .await
                .map_err(status_error)?
                .into_inner();
            print_table(&list.policies);
        }
        PolicyCommand::Update { name, change } => {
            let current = client
                .get_policy(NameRequest { name })
                .await
                .map_err(status_error)?
                .into_inner()
                .spec
                .unwrap_or_default();
            let p = client
                .update_policy(change.apply_to(current))
                .await
                .map_err(status_error)?
                .into_inner();
            print_table(&[p]);
        }
        PolicyCommand::List { json } => {
            let list = client
                .list_policies(Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let rows: Vec<_> = list.policies.iter().map(to_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "policies": rows }))?
                );
            } else {
                print_table(&list.policies);
            }
        }
        PolicyCommand::Show { name, json } => {
            let p = client
                .get_policy(NameRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&to_json(&p))?);
                return Ok(());
            }
            let s = p.spec.clone().unwrap_or_default();
            println!("Name:                    {}", s.name);
            if p.failback_of.is_empty() {
                // Created and deleted with it (`policy create` made it); failback uses it.
                println!("Failback twin:           {}-failback", s.name);
            } else {
                println!("Failback twin of:        {}", p.failback_of);
            }
            println!("RPO threshold:           {}", d(s.rpo_threshold_secs));
            println!("Retention:               {}", d(s.retention_secs));
            println!(
                "App-consistent every:    {}",
                d(s.app_consistent_every_secs)
            );
            println!(
                "Crash-consistent every:  {}",
                d(s.crash_consistent_every_secs)
            );
            println!(
                "Compression:             {}",
                if s.compression { "zstd" } else { "off" }
            );
            println!("Created:                 {}", time(p.created_at_unix_ms));
            println!(
                "Machines:                {}",
                if p.machines.is_empty() {
                    "-".into()
                } else {
                    p.machines.join(", ")
                }
            );
        }
        PolicyCommand::Assign { name, machine } => {
            client
                .assign_policy(v1::AssignPolicyRequest {
                    machine: machine.clone(),
                    policy: name.clone(),
                })
                .await
                .map_err(status_error)?;
            println!("{machine} now uses policy {name}.");
        }
        PolicyCommand::Delete { name } => {
            client
                .delete_policy(NameRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            println!("Deleted policy {name} and {name}-failback.");
        }
    }
    Ok(())
}
