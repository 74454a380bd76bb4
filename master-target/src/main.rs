//! `master-target`: `register` joins it to a configuration server with the connection
//! passphrase; `run` serves.
use clap::{Parser, Subcommand};
use lifeboat_common::component::{main_with, register_command, RegisterArgs};
use lifeboat_common::component_cli::ComponentSettings;
use lifeboat_common::service_args::CommonArgs;
use lifeboat_common::{shutdown, telemetry, Role};
use lifeboat_master_target::{run, MtArgs, Settings};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "master-target", version, about = "Lifeboat master target")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register with a configuration server using the connection passphrase.
    Register {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        mt: MtArgs,
        #[command(flatten)]
        register: RegisterArgs,
    },
    /// Serve.
    Run {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        mt: MtArgs,
    },
}

fn main() -> ExitCode {
    main_with(async {
        match Cli::parse().command {
            Command::Register {
                common,
                mt,
                register,
            } => {
                let settings = Settings::resolve_with(&common, &mt)?;
                settings.prepare()?;
                let identity = register_command(
                    Role::MasterTarget,
                    &register,
                    &settings.common.data_dir,
                    settings.facts(),
                )
                .await?;
                println!(
                    "Registered master target {} as {}; start it with `master-target run`",
                    identity.info.name, identity.info.id
                );
                Ok(())
            }
            Command::Run { common, mt } => {
                let settings = Settings::resolve_with(&common, &mt)?;
                telemetry::init_logging(settings.common.log_format);
                telemetry::init_metrics(settings.common.metrics_listen)?;
                run(settings, shutdown::on_signal()).await
            }
        }
    })
}
