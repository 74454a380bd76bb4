//! `lifeboat plan …` and `lifeboat job resume|retry|skip`: recovery plans — machines in ordered
//! groups with scripts and manual steps around them — run as jobs that wait for the operator
//! at manual steps and failed steps.
use crate::commands::recovery::follow;
use crate::context::{status_error, ContextArgs};
use crate::format::table;
use lifeboat_proto::v1::{
    Empty, JobControlRequest, NameRequest, PlanGroupSpec, PlanRunRequest, PlanSpec,
};
use std::collections::BTreeMap;

#[derive(Debug, clap::Subcommand)]
pub enum PlanCommand {
    /// Create a plan: `--group 1=db01 --group 2=app01,web01 --after 1 'script:CMD'
    /// --before 2 'manual:Switch DNS'`.
    Create {
        name: String,
        /// NUMBER=MACHINE[,MACHINE…]; groups are recovered in increasing number.
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
        /// GROUP ACTION: run before the group's machines ('script:CMD' or 'manual:TEXT').
        #[arg(long, num_args = 2, value_names = ["GROUP", "ACTION"])]
        before: Vec<String>,
        /// GROUP ACTION: run after the group's machines.
        #[arg(long, num_args = 2, value_names = ["GROUP", "ACTION"])]
        after: Vec<String>,
    },
    /// Plans with their groups and steps.
    List,
    Delete {
        name: String,
    },
    /// Test failover of every machine of the plan, group by group.
    TestFailover {
        name: String,
        #[arg(long, default_value = "latest")]
        point: String,
    },
    /// Clean up the plan's test failover (every machine).
    Cleanup {
        name: String,
    },
    /// Fail over every machine of the plan, group by group.
    Failover {
        name: String,
        #[arg(long, conflicts_with = "point")]
        planned: bool,
        #[arg(long)]
        point: Option<String>,
    },
}

fn group_number(text: &str) -> anyhow::Result<u32> {
    text.parse()
        .map_err(|_| anyhow::anyhow!("{text:?} is not a group number"))
}

fn spec(
    name: String,
    groups: Vec<String>,
    before: Vec<String>,
    after: Vec<String>,
) -> anyhow::Result<PlanSpec> {
    let mut by_number: BTreeMap<u32, PlanGroupSpec> = BTreeMap::new();
    for g in groups {
        let (n, machines) = g
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--group {g:?}: expected NUMBER=MACHINE[,MACHINE…]"))?;
        let number = group_number(n)?;
        // Twice the same number is more likely a typo for another group than two halves of
        // one: said, not merged.
        if by_number.contains_key(&number) {
            anyhow::bail!(
                "--group {number} is given twice; list a group's machines once \
                 (--group {number}=A,B)"
            );
        }
        let entry = by_number.entry(number).or_insert_with(|| PlanGroupSpec {
            number,
            ..Default::default()
        });
        entry.machines.extend(
            machines
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from),
        );
    }
    for (list, is_before) in [(before, true), (after, false)] {
        for pair in list.chunks(2) {
            let [g, action] = pair else {
                anyhow::bail!("--before/--after take GROUP ACTION");
            };
            let number = group_number(g)?;
            let entry = by_number
                .get_mut(&number)
                .ok_or_else(|| anyhow::anyhow!("no --group {number} for action {action:?}"))?;
            if is_before {
                entry.before.push(action.clone());
            } else {
                entry.after.push(action.clone());
            }
        }
    }
    Ok(PlanSpec {
        name,
        groups: by_number.into_values().collect(),
    })
}

pub async fn run(ctx: &ContextArgs, command: PlanCommand) -> anyhow::Result<()> {
    let (mut client, _) = ctx.recovery().await?;
    let request = |plan: String, mode: &str, point: String, planned: bool| PlanRunRequest {
        plan,
        mode: mode.into(),
        point,
        planned,
    };
    let job = match command {
        PlanCommand::Create {
            name,
            groups,
            before,
            after,
        } => {
            let plan = client
                .create_plan(spec(name, groups, before, after)?)
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "Plan {} created with {} group(s)",
                plan.name,
                plan.groups.len()
            );
            return Ok(());
        }
        PlanCommand::List => {
            let plans = client
                .list_plans(Empty {})
                .await
                .map_err(status_error)?
                .into_inner()
                .plans;
            let mut t = table(&["PLAN", "GROUP", "MACHINES", "BEFORE", "AFTER"]);
            for p in plans {
                for g in p.groups {
                    t.add_row(vec![
                        p.name.clone(),
                        g.number.to_string(),
                        g.machines.join(","),
                        g.before.join("; "),
                        g.after.join("; "),
                    ]);
                }
            }
            println!("{t}");
            return Ok(());
        }
        PlanCommand::Delete { name } => {
            client
                .delete_plan(NameRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            println!("Plan {name} deleted");
            return Ok(());
        }
        PlanCommand::TestFailover { name, point } => {
            client
                .run_plan(request(name, "test-failover", point, false))
                .await
        }
        PlanCommand::Cleanup { name } => {
            client
                .run_plan(request(name, "test-failover-cleanup", String::new(), false))
                .await
        }
        PlanCommand::Failover {
            name,
            planned,
            point,
        } => {
            client
                .run_plan(request(
                    name,
                    "failover",
                    point.unwrap_or_default(),
                    planned,
                ))
                .await
        }
    }
    .map_err(status_error)?
    .into_inner();
    follow(ctx, job).await
}

/// `lifeboat job resume|retry|skip JOB`.
pub async fn control(ctx: &ContextArgs, id: String, action: &str) -> anyhow::Result<()> {
    let (mut client, _) = ctx.recovery().await?;
    let job = client
        .control_job(JobControlRequest {
            id,
            action: action.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    follow(ctx, job).await
}
