//! `process-server`: `register` joins it to a configuration server with the connection
//! passphrase; `run` serves.
use clap::Parser;
use lifeboat_common::component::main_with;
use lifeboat_common::component_cli::{run_cli, ComponentCommand, NoFlags};
use lifeboat_process_server::{run, Settings};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "process-server", version, about = "Lifeboat process server")]
struct Cli {
    #[command(subcommand)]
    command: ComponentCommand<NoFlags>,
}

fn main() -> ExitCode {
    main_with(run_cli::<Settings, _, _>(Cli::parse().command, run))
}
