//! `mobility-agent`: `register` joins this machine to a configuration server with the
//! connection passphrase; `run` runs the agent.
use clap::{Parser, Subcommand};
use lifeboat_common::component::{main_with, register_command, RegisterArgs};
use lifeboat_common::service_args::CommonArgs;
use lifeboat_common::{shutdown, telemetry, Role};
use lifeboat_mobility_agent::{run, DiskArgs, Settings};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mobility-agent", version, about = "Lifeboat mobility agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register this machine with a configuration server using the connection passphrase.
    Register {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        disks: DiskArgs,
        #[command(flatten)]
        register: RegisterArgs,
    },
    /// Ask for a full resync of the protected disks (or one) at the next start: use it after a
    /// disk was written while the agent was stopped. The agent then compares every block with
    /// the replica and ships only what differs.
    MarkForResync {
        #[command(flatten)]
        common: CommonArgs,
        /// Only this disk (its id, as `lifeboat status` shows it).
        #[arg(long)]
        disk_id: Option<String>,
    },
    /// Run.
    Run {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        disks: DiskArgs,
    },
}

fn main() -> ExitCode {
    main_with(async {
        match Cli::parse().command {
            Command::Register {
                common,
                disks,
                register,
            } => {
                let settings = Settings::resolve(&common, &disks)?;
                settings.prepare()?;
                let registered = register_command(
                    Role::Agent,
                    &register,
                    &settings.common.data_dir,
                    settings.facts(),
                )
                .await?;
                registered.report(
                    "machine",
                    &format!(
                        "start the agent with `{}`",
                        lifeboat_common::component_cli::run_command_after_register()
                    ),
                );
                Ok(())
            }
            Command::MarkForResync { common, disk_id } => {
                let settings = Settings::resolve(&common, &DiskArgs::default())?;
                let marked = lifeboat_mobility_agent::resync::mark_for_resync(
                    &settings.common.data_dir,
                    disk_id.as_deref(),
                )?;
                println!(
                    "Marked {} for a full resync at the next agent start: {}",
                    if marked.len() == 1 { "disk" } else { "disks" },
                    marked.join(", ")
                );
                Ok(())
            }
            Command::Run { common, disks } => {
                let settings = Settings::resolve(&common, &disks)?;
                telemetry::init_logging(settings.common.log_format);
                telemetry::init_metrics(settings.common.metrics_listen)?;
                run(settings, shutdown::on_signal()).await
            }
        }
    })
}
