//! `master-target`: `register` joins it to a configuration server with the connection
//! passphrase; `run` serves.
use clap::Parser;
use lifeboat_common::component::main_with;
use lifeboat_common::component_cli::{run_cli, ComponentCommand};
use lifeboat_master_target::{run, MtArgs, Settings};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "master-target", version, about = "Lifeboat master target")]
struct Cli {
    #[command(subcommand)]
    command: ComponentCommand<MtArgs>,
}

fn main() -> ExitCode {
    main_with(run_cli::<Settings, _, _>(Cli::parse().command, run))
}
