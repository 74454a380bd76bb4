//! Recovery plans (DESIGN §7): machines in ordered groups, with scripts and manual steps
//! before and after each group. A plan is run as one job whose steps come from it (see
//! `crate::recovery::plans`); what each step does is kept with the job (`PlanRun`), so the
//! run survives edits of the plan.
use super::command::CommandResult;
use super::keys;
use super::kv::{KvError, KvRead, Overlay};
use super::query::StateReader;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecoveryPlan {
    pub name: String,
    /// Groups in the order they are recovered.
    pub groups: Vec<PlanGroup>,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanGroup {
    pub number: u32,
    pub machines: Vec<String>,
    #[serde(default)]
    pub before: Vec<PlanAction>,
    #[serde(default)]
    pub after: Vec<PlanAction>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum PlanAction {
    /// A command run on the configuration server (no shell); it must exit 0.
    Script(String),
    /// An instruction for the operator; the plan waits for `lifeboat job resume`.
    Manual(String),
}

impl PlanAction {
    /// `script:CMD` or `manual:TEXT`.
    pub fn parse(text: &str) -> Result<PlanAction, String> {
        match text.split_once(':') {
            Some(("script", cmd)) if !cmd.trim().is_empty() => {
                Ok(PlanAction::Script(cmd.trim().to_string()))
            }
            Some(("manual", what)) if !what.trim().is_empty() => {
                Ok(PlanAction::Manual(what.trim().to_string()))
            }
            _ => Err(format!(
                "{text:?}: an action is 'script:COMMAND' or 'manual:INSTRUCTION'"
            )),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PlanAction::Script(c) => format!("script:{c}"),
            PlanAction::Manual(t) => format!("manual:{t}"),
        }
    }
}

type Tx<'a, K> = Overlay<'a, K>;

pub(super) fn create_plan(
    tx: &mut Tx<'_, impl KvRead>,
    plan: &RecoveryPlan,
) -> Result<CommandResult, KvError> {
    let reader = StateReader(&*tx);
    if reader.plan(&plan.name)?.is_some() {
        return Ok(CommandResult::Refused(format!("plan {} exists", plan.name)));
    }
    for name in plan.groups.iter().flat_map(|g| g.machines.iter()) {
        if reader.machine(name)?.is_none() {
            return Ok(CommandResult::NotFound(format!(
                "{name} is not protected; a plan can only recover protected machines"
            )));
        }
    }
    tx.writes.put(keys::plan(&plan.name), plan);
    Ok(CommandResult::Done)
}

pub(super) fn delete_plan(
    tx: &mut Tx<'_, impl KvRead>,
    name: &str,
) -> Result<CommandResult, KvError> {
    if StateReader(&*tx).plan(name)?.is_none() {
        return Ok(CommandResult::NotFound(format!("no plan {name}")));
    }
    tx.writes.delete(keys::plan(name));
    Ok(CommandResult::Done)
}
