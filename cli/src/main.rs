//! `lifeboat`: the operator's command. Runs a whole Lifeboat on one host (`up`) and administers
//! a deployment through the configuration server's admin API.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod commands;
mod context;
mod format;
mod up;

use commands::{audit, cluster, passphrase, servers};
use context::ContextArgs;

#[derive(Parser)]
#[command(name = "lifeboat", version, about = "Lifeboat site recovery")]
struct Cli {
    #[command(flatten)]
    context: ContextArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a configuration server, process server and master target on this host.
    Up(up::UpArgs),
    /// Registered components: list, show, revoke.
    #[command(subcommand)]
    Servers(servers::ServersCommand),
    /// The configuration server cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The connection passphrase components register with.
    #[command(subcommand)]
    Passphrase(passphrase::PassphraseCommand),
    /// The audit log.
    Audit(audit::AuditArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Leader, term, commit index and members.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lifeboat_common::component::main_with(async move {
        match cli.command {
            Command::Up(args) => up::run(args, &cli.context).await,
            Command::Servers(command) => servers::run(&cli.context, command).await,
            Command::Cluster(ClusterCommand::Status { json }) => {
                cluster::status(&cli.context, json).await
            }
            Command::Passphrase(command) => passphrase::run(&cli.context, command).await,
            Command::Audit(args) => audit::run(&cli.context, args).await,
        }
    })
}
