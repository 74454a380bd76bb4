//! `lifeboat switch`: moves protected machines to another process server, keeping their
//! change streams (DESIGN §8). Each machine's move is a job: its current process server
//! forwards what it holds first, so nothing is resynced.
use crate::commands::jobs;
use crate::context::{status_error, ContextArgs};
use lifeboat_proto::v1::SwitchRequest;

#[derive(Debug, clap::Args)]
pub struct SwitchArgs {
    /// The machines to move.
    #[arg(required = true)]
    machines: Vec<String>,
    /// The process server to move them to (name or id).
    #[arg(long)]
    to: String,
    /// Move at once, without waiting for the current process server to forward what it holds
    /// (for one that is down): the regions written since the replicas' position are then
    /// compared with them and whatever only its cache held is shipped again.
    #[arg(long)]
    force: bool,
    /// Follow the jobs until they finish.
    #[arg(long)]
    wait: bool,
}

pub async fn run(ctx: &ContextArgs, args: SwitchArgs) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let mut started = Vec::new();
    let mut refused = Vec::new();
    for machine in &args.machines {
        let request = SwitchRequest {
            machine: machine.clone(),
            to: args.to.clone(),
            force: args.force,
        };
        match client.switch_process_server(request).await {
            Ok(job) => {
                let job = job.into_inner();
                println!("Moving {machine} to {}: job {}", args.to, job.id);
                started.push(job.id);
            }
            Err(status) => {
                let e = status_error(status);
                eprintln!("{machine}: {e}");
                refused.push(machine.clone());
            }
        }
    }
    if args.wait && !started.is_empty() {
        jobs::watch(&mut client, Some(started)).await?;
    } else if !started.is_empty() {
        println!("Follow the moves with `lifeboat jobs --watch`.");
    }
    if !refused.is_empty() {
        anyhow::bail!("not moved: {}", refused.join(", "));
    }
    Ok(())
}
