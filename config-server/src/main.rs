//! `config-server`: the Lifeboat configuration server. `init` creates a cluster, `join` adds
//! this node to one, `run` serves.
use clap::{Parser, Subcommand};
use lifeboat_common::{shutdown, telemetry};
use lifeboat_config_server::{init, server, settings::ServeArgs};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "config-server",
    version,
    about = "Lifeboat configuration server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new cluster in the data directory: CA, connection passphrase (printed once),
    /// this node's identity and an admin identity for the `lifeboat` CLI.
    Init {
        #[command(flatten)]
        serve: ServeArgs,
        /// If the data directory already holds a configuration server, keep it and succeed
        /// (for provisioning that runs the same steps on every start).
        #[arg(long)]
        keep_existing: bool,
        /// Do not print the connection passphrase (it is in DATA/private/connection.passphrase
        /// either way): for runs whose output is logged, as in containers.
        #[arg(long)]
        no_print_passphrase: bool,
    },
    /// Serve (after `init` or `join`).
    Run(ServeArgs),
    /// Register this node with an existing cluster, then serve; it joins as a learner and is
    /// promoted to voter once caught up.
    Join {
        #[command(flatten)]
        serve: ServeArgs,
        /// Address of a node of the existing cluster (repeat or comma-separate).
        #[arg(long = "cs", required = true, value_delimiter = ',')]
        cs: Vec<String>,
        /// File holding the connection passphrase.
        #[arg(long)]
        passphrase_file: PathBuf,
        /// Name of this node (default: its advertised address).
        #[arg(long)]
        name: Option<String>,
        /// If this node already joined (its data directory holds its identity), serve
        /// without joining again, as `run` does.
        #[arg(long)]
        keep_existing: bool,
    },
}

fn main() -> ExitCode {
    lifeboat_common::component::main_with(run(Cli::parse()))
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let settings = args.resolve()?;
    telemetry::init_logging(settings.log_format);
    telemetry::init_metrics(settings.metrics_listen)?;
    server::run(settings, shutdown::on_signal()).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            serve: args,
            keep_existing,
            no_print_passphrase,
        } => {
            let settings = args.resolve()?;
            if keep_existing && init::holds_node(&settings.data_dir) {
                println!(
                    "{} already holds a configuration server; kept",
                    settings.data_dir.display()
                );
                return Ok(());
            }
            let outcome = init::init(&settings)?;
            let pass_file = init::passphrase_file(&settings.data_dir);
            println!(
                "Created Lifeboat cluster {} in {}",
                outcome.cluster_id,
                settings.data_dir.display()
            );
            println!();
            if no_print_passphrase {
                println!("Connection passphrase: in {}", pass_file.display());
            } else {
                println!(
                    "Connection passphrase (shown once; also in {}):",
                    pass_file.display()
                );
                println!();
                println!("    {}", outcome.passphrase);
            }
            println!();
            println!("Process servers, master targets, agents and new configuration server nodes");
            println!(
                "need it to register. Admin CLI context: {}",
                outcome.admin_context.display()
            );
            println!(
                "  export LIFEBOAT_CONTEXT={}",
                outcome.admin_context.display()
            );
            // The same flags as this init: a run without them would advertise another address.
            let mut start = String::from("config-server run");
            if let Some(file) = &args.config {
                start.push_str(&format!(" --config {}", file.display()));
            }
            start.push_str(&format!(" --data-dir {}", settings.data_dir.display()));
            for (flag, given) in [
                ("--listen", args.listen.map(|l| l.to_string())),
                ("--advertise", args.advertise.clone()),
                (
                    "--metrics-listen",
                    args.metrics_listen.map(|l| l.to_string()),
                ),
            ] {
                if let Some(value) = given {
                    start.push_str(&format!(" {flag} {value}"));
                }
            }
            println!("Start this node with: {start}");
            Ok(())
        }
        Command::Run(args) => serve(&args).await,
        Command::Join {
            serve: args,
            cs,
            passphrase_file,
            name,
            keep_existing,
        } => {
            let settings = args.resolve()?;
            if keep_existing && init::holds_node(&settings.data_dir) {
                println!("Already joined; serving");
                return serve(&args).await;
            }
            let identity = init::join(&settings, &cs, &passphrase_file, name).await?;
            println!(
                "Registered as configuration server node {} ({}); joining the cluster",
                identity.info.node_id, identity.info.id
            );
            serve(&args).await
        }
    }
}
