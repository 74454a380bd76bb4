//! `process-server`: `register` joins it to a configuration server with the connection
//! passphrase; `run` serves.
use clap::{Parser, Subcommand};
use lifeboat_common::component::{main_with, register_command, RegisterArgs};
use lifeboat_common::service_args::CommonArgs;
use lifeboat_common::{shutdown, telemetry, Role};
use lifeboat_process_server::{run, Settings};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "process-server", version, about = "Lifeboat process server")]
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
        register: RegisterArgs,
    },
    /// Serve.
    Run {
        #[command(flatten)]
        common: CommonArgs,
    },
}

fn main() -> ExitCode {
    main_with(async {
        match Cli::parse().command {
            Command::Register { common, register } => {
                let settings = Settings::resolve(&common)?;
                settings.prepare()?;
                let identity = register_command(
                    Role::ProcessServer,
                    &register,
                    &settings.common.data_dir,
                    settings.facts(),
                )
                .await?;
                println!(
                    "Registered process server {} as {}; start it with `process-server run`",
                    identity.info.name, identity.info.id
                );
                Ok(())
            }
            Command::Run { common } => {
                let settings = Settings::resolve(&common)?;
                telemetry::init_logging(settings.common.log_format);
                telemetry::init_metrics(settings.common.metrics_listen)?;
                run(settings, shutdown::on_signal()).await
            }
        }
    })
}
