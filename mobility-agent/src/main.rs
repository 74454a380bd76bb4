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
                let identity = register_command(
                    Role::Agent,
                    &register,
                    &settings.common.data_dir,
                    settings.facts(),
                )
                .await?;
                println!(
                    "Registered machine {} as {}; start the agent with `mobility-agent run`",
                    identity.info.name, identity.info.id
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
