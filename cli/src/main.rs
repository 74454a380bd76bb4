//! `lifeboat`: the operator's command. Runs a whole Lifeboat on one host (`up`) and administers
//! a deployment through the configuration server's admin API.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod commands;
mod context;
mod demo;
mod durations;
mod format;
mod up;

use commands::{
    alerts, audit, balance, cluster, groups, jobs, passphrase, plans, policy, protect, recovery,
    servers, switch, wait,
};
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
    /// See Lifeboat work on this host: start a stack, protect a disk, write to it, check the replica.
    Demo(demo::DemoArgs),
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
    /// Replication policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Enable replication of a machine.
    Protect(protect::ProtectArgs),
    /// Disable replication of a machine; its master target frees the disk slots.
    Unprotect {
        machine: String,
        /// Follow the job until it finishes.
        #[arg(long)]
        wait: bool,
        /// For a failed-over machine: delete its recovered disks on the master target too
        /// (refused without it, as they are the recovered machine's disks).
        #[arg(long)]
        delete_recovered_disks: bool,
    },
    /// Move machines to another process server, keeping their change streams.
    Switch(switch::SwitchArgs),
    /// Show which machines to move between process servers to even out their load (and
    /// with --apply, move them).
    LoadBalance(balance::BalanceArgs),
    /// Per machine and disk: state, sync progress, ETA, RPO, pending bytes, PS, MT.
    Status {
        machine: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Wait until a machine's agent is connected and its disks are Protected, none stalled (and,
    /// with --caught-up, nothing is pending).
    Wait(wait::WaitArgs),
    /// Jobs with their steps and progress.
    Jobs(jobs::JobsArgs),
    /// Active alerts: RPO over threshold, resync needed, components down.
    Alerts {
        #[arg(long)]
        json: bool,
    },
    /// One job.
    #[command(subcommand)]
    Job(JobCommand),
    /// Recovery plans: machines in ordered groups with scripts and manual steps.
    #[command(subcommand)]
    Plan(plans::PlanCommand),
    /// Protection groups: machines with group-consistent recovery points.
    #[command(subcommand)]
    Group(groups::GroupCommand),
    /// A machine's recovery points (time, type, id) inside its retention window.
    RecoveryPoints(recovery::PointsArgs),
    /// Bring up a machine's disks at a point while replication goes on (a drill).
    TestFailover(recovery::TestFailoverArgs),
    /// Fail a machine over (planned or to a point), or commit a failover.
    Failover(recovery::FailoverArgs),
    /// VHD images: info, check, create, convert (raw <-> VHD).
    #[command(subcommand)]
    Vhd(vhd::cli::VhdCommand),
}

#[derive(Subcommand)]
enum JobCommand {
    /// A job's steps with their state, progress and details.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Go on with a plan waiting at a manual step.
    Resume { id: String },
    /// Run a plan's failed step again.
    Retry { id: String },
    /// Go on with a plan without its failed (or manual) step.
    Skip { id: String },
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
            Command::Demo(args) => demo::run(args).await,
            Command::Up(args) => up::run(args, &cli.context).await,
            Command::Servers(command) => servers::run(&cli.context, command).await,
            Command::Cluster(ClusterCommand::Status { json }) => {
                cluster::status(&cli.context, json).await
            }
            Command::Passphrase(command) => passphrase::run(&cli.context, command).await,
            Command::Audit(args) => audit::run(&cli.context, args).await,
            Command::Policy(command) => policy::run(&cli.context, command).await,
            Command::Protect(args) => protect::protect(&cli.context, args).await,
            Command::Unprotect {
                machine,
                wait,
                delete_recovered_disks,
            } => protect::unprotect(&cli.context, machine, wait, delete_recovered_disks).await,
            Command::Switch(args) => switch::run(&cli.context, args).await,
            Command::LoadBalance(args) => balance::run(&cli.context, args).await,
            Command::Status { machine, json } => protect::status(&cli.context, machine, json).await,
            Command::Wait(args) => wait::run(&cli.context, args).await,
            Command::Jobs(args) => jobs::list(&cli.context, args).await,
            Command::Alerts { json } => alerts::list(&cli.context, json).await,
            Command::Job(JobCommand::Show { id, json }) => jobs::show(&cli.context, id, json).await,
            Command::Job(JobCommand::Resume { id }) => {
                plans::control(&cli.context, id, "resume").await
            }
            Command::Job(JobCommand::Retry { id }) => {
                plans::control(&cli.context, id, "retry").await
            }
            Command::Job(JobCommand::Skip { id }) => plans::control(&cli.context, id, "skip").await,
            Command::Plan(command) => plans::run(&cli.context, command).await,
            Command::Group(command) => groups::run(&cli.context, command).await,
            Command::RecoveryPoints(args) => recovery::points(&cli.context, args).await,
            Command::TestFailover(args) => recovery::test_failover(&cli.context, args).await,
            Command::Failover(args) => recovery::failover(&cli.context, args).await,
            // Image work is blocking file I/O with its own progress bar.
            Command::Vhd(command) => {
                tokio::task::spawn_blocking(move || vhd::cli::run(command)).await?
            }
        }
    })
}
