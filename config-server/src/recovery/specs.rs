//! Groups and plans as the admin API carries them, checked and turned into records (and
//! back).
use crate::state::groups::ProtectionGroup;
use crate::state::plans::{PlanAction, PlanGroup, RecoveryPlan};
use lifeboat_proto::v1;
use tonic::Status;

/// Group and plan names: 1-64 letters, digits, '-' or '_'.
pub fn check_name(what: &str, name: &str) -> Result<(), Status> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{what} names are 1-64 letters, digits, '-' or '_'"
        )))
    }
}

pub fn group_info(g: ProtectionGroup) -> v1::GroupInfo {
    v1::GroupInfo {
        barrier: g.barrier_signal(),
        last_point_unix_ms: g.last_point_ms,
        spec: Some(v1::GroupSpec {
            name: g.name,
            machines: g.machines,
            every_secs: g.every_secs,
        }),
    }
}

pub fn plan_from_spec(spec: v1::PlanSpec) -> Result<RecoveryPlan, Status> {
    check_name("plan", &spec.name)?;
    if spec.groups.iter().all(|g| g.machines.is_empty()) {
        return Err(Status::invalid_argument(
            "a plan needs at least one machine",
        ));
    }
    let mut groups = Vec::new();
    for g in spec.groups {
        let parse = |list: Vec<String>| -> Result<Vec<PlanAction>, Status> {
            list.iter()
                .map(|a| PlanAction::parse(a).map_err(Status::invalid_argument))
                .collect()
        };
        groups.push(PlanGroup {
            number: g.number,
            machines: g.machines,
            before: parse(g.before)?,
            after: parse(g.after)?,
        });
    }
    groups.sort_by_key(|g| g.number);
    if let Some(w) = groups.windows(2).find(|w| w[0].number == w[1].number) {
        return Err(Status::invalid_argument(format!(
            "group {} is in the plan twice",
            w[0].number
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for m in groups.iter().flat_map(|g| g.machines.iter()) {
        if !seen.insert(m.clone()) {
            return Err(Status::invalid_argument(format!(
                "{m} is in the plan twice"
            )));
        }
    }
    Ok(RecoveryPlan {
        name: spec.name,
        groups,
        created_at_ms: crate::state::model::now_ms(),
    })
}

pub fn plan_spec(plan: RecoveryPlan) -> v1::PlanSpec {
    v1::PlanSpec {
        name: plan.name,
        groups: plan
            .groups
            .into_iter()
            .map(|g| v1::PlanGroupSpec {
                number: g.number,
                machines: g.machines,
                before: g.before.iter().map(PlanAction::describe).collect(),
                after: g.after.iter().map(PlanAction::describe).collect(),
            })
            .collect(),
    }
}
