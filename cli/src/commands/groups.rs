//! `lifeboat group create|list|delete`: protection groups, whose machines get
//! group-consistent recovery points from one barrier across their agents.
use crate::context::{status_error, ContextArgs};
use crate::format::{age, table};
use lifeboat_proto::v1::{Empty, GroupSpec, NameRequest};

#[derive(Debug, clap::Subcommand)]
pub enum GroupCommand {
    /// Create a group of protected machines.
    Create {
        name: String,
        /// The machines, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        machines: Vec<String>,
        /// A group-consistent point this often.
        #[arg(long, default_value = "15m", value_parser = crate::durations::whole_seconds)]
        every: u64,
    },
    /// Groups, their machines and their last point.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a group (its points already taken stay).
    Delete { name: String },
}

pub async fn run(ctx: &ContextArgs, command: GroupCommand) -> anyhow::Result<()> {
    let (mut client, _) = ctx.recovery().await?;
    match command {
        GroupCommand::Create {
            name,
            machines,
            every,
        } => {
            let g = client
                .create_group(GroupSpec {
                    name,
                    machines,
                    every_secs: every,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let spec = g.spec.unwrap_or_default();
            println!(
                "Group {} created: {}; a group-consistent point every {}",
                spec.name,
                spec.machines.join(", "),
                humantime::format_duration(std::time::Duration::from_secs(spec.every_secs))
            );
        }
        GroupCommand::List { json } => {
            let groups = client
                .list_groups(Empty {})
                .await
                .map_err(status_error)?
                .into_inner()
                .groups;
            if json {
                let list: Vec<_> = groups
                    .iter()
                    .map(|g| {
                        let spec = g.spec.clone().unwrap_or_default();
                        serde_json::json!({
                            "name": spec.name,
                            "machines": spec.machines,
                            "every_secs": spec.every_secs,
                            "last_point_unix_ms": g.last_point_unix_ms,
                            "barrier": g.barrier,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "groups": list }))?
                );
                return Ok(());
            }
            let mut t = table(&["GROUP", "MACHINES", "EVERY", "LAST POINT", "BARRIER"]);
            for g in groups {
                let spec = g.spec.unwrap_or_default();
                t.add_row(vec![
                    spec.name,
                    spec.machines.join(","),
                    humantime::format_duration(std::time::Duration::from_secs(spec.every_secs))
                        .to_string(),
                    if g.last_point_unix_ms > 0 {
                        age(g.last_point_unix_ms)
                    } else {
                        "never".into()
                    },
                    g.barrier,
                ]);
            }
            println!("{t}");
        }
        GroupCommand::Delete { name } => {
            client
                .delete_group(NameRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            println!("Group {name} deleted");
        }
    }
    Ok(())
}
