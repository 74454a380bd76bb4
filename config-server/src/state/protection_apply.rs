//! Applying the replication commands: policies with their failback twins, protecting and
//! unprotecting machines, disk state transitions and job updates.
use super::command::CommandResult;
use super::keys;
use super::kv::{KvError, KvRead, Overlay};
use super::protection::{
    Job, JobControl, JobState, MachineRecovery, Policy, ProtectedMachine, ReplicationState,
    FAILBACK_SUFFIX,
};
use super::query::StateReader;

type Tx<'a, K> = Overlay<'a, K>;

pub(super) fn create_policy(
    tx: &mut Tx<'_, impl KvRead>,
    policy: &Policy,
) -> Result<CommandResult, KvError> {
    if policy.name.ends_with(FAILBACK_SUFFIX) {
        return Ok(CommandResult::Refused(format!(
            "names ending in {FAILBACK_SUFFIX} are reserved for the failback twin every policy gets"
        )));
    }
    let twin_name = format!("{}{FAILBACK_SUFFIX}", policy.name);
    let reader = StateReader(&*tx);
    if reader.policy(&policy.name)?.is_some() || reader.policy(&twin_name)?.is_some() {
        return Ok(CommandResult::Refused(format!(
            "policy {} already exists",
            policy.name
        )));
    }
    let twin = Policy {
        name: twin_name,
        failback_of: Some(policy.name.clone()),
        ..policy.clone()
    };
    tx.writes.put(keys::policy(&policy.name), policy);
    tx.writes.put(keys::policy(&twin.name), &twin);
    Ok(CommandResult::Done)
}

pub(super) fn update_policy(
    tx: &mut Tx<'_, impl KvRead>,
    policy: &Policy,
) -> Result<CommandResult, KvError> {
    let Some(existing) = StateReader(&*tx).policy(&policy.name)? else {
        return Ok(no_policy(&policy.name));
    };
    let updated = Policy {
        failback_of: existing.failback_of,
        created_at_ms: existing.created_at_ms,
        ..policy.clone()
    };
    tx.writes.put(keys::policy(&policy.name), &updated);
    Ok(CommandResult::Done)
}

pub(super) fn delete_policy(
    tx: &mut Tx<'_, impl KvRead>,
    name: &str,
) -> Result<CommandResult, KvError> {
    let reader = StateReader(&*tx);
    let Some(policy) = reader.policy(name)? else {
        return Ok(no_policy(name));
    };
    if policy.failback_of.is_some() {
        return Ok(CommandResult::Refused(format!(
            "{name} is a failback twin; delete {} instead",
            policy.failback_of.unwrap_or_default()
        )));
    }
    let twin = format!("{name}{FAILBACK_SUFFIX}");
    if let Some(m) = reader
        .machines()?
        .into_iter()
        .find(|m| m.policy == name || m.policy == twin)
    {
        return Ok(CommandResult::Refused(format!(
            "policy {name} is used by machine {}; move it to another policy first \
             (`lifeboat policy assign OTHER {}`) or unprotect it",
            m.name, m.name
        )));
    }
    tx.writes.delete(keys::policy(name));
    tx.writes.delete(keys::policy(&twin));
    Ok(CommandResult::Done)
}

fn no_policy(name: &str) -> CommandResult {
    CommandResult::NotFound(format!("no policy {name:?}; see `lifeboat policy list`"))
}

pub(super) fn assign_policy(
    tx: &mut Tx<'_, impl KvRead>,
    machine: &str,
    policy: &str,
) -> Result<CommandResult, KvError> {
    let reader = StateReader(&*tx);
    if reader.policy(policy)?.is_none() {
        return Ok(no_policy(policy));
    }
    let Some(mut record) = reader.machine(machine)? else {
        return Ok(CommandResult::NotFound(format!(
            "{machine} is not protected"
        )));
    };
    record.policy = policy.to_string();
    tx.writes.put(keys::machine(machine), &record);
    Ok(CommandResult::Done)
}

pub(super) fn protect(
    tx: &mut Tx<'_, impl KvRead>,
    machine: &ProtectedMachine,
    job: &Job,
) -> Result<CommandResult, KvError> {
    let reader = StateReader(&*tx);
    if reader.machine(&machine.name)?.is_some() {
        return Ok(CommandResult::Refused(format!(
            "{} is already protected",
            machine.name
        )));
    }
    if reader.policy(&machine.policy)?.is_none() {
        return Ok(no_policy(&machine.policy));
    }
    for id in [&machine.agent_id, &machine.ps_id, &machine.mt_id] {
        match reader.identity(id)? {
            Some(r) if r.revoked.is_none() => {}
            _ => {
                return Ok(CommandResult::Refused(format!(
                    "{id} is not a registered, unrevoked component"
                )))
            }
        }
    }
    tx.writes.put(keys::machine(&machine.name), machine);
    tx.writes.put(keys::job(&job.id), job);
    Ok(CommandResult::Done)
}

pub(super) fn unprotect(
    tx: &mut Tx<'_, impl KvRead>,
    name: &str,
    job: &Job,
    delete_recovered_disks: bool,
) -> Result<CommandResult, KvError> {
    let Some(machine) = StateReader(&*tx).machine(name)? else {
        return Ok(CommandResult::NotFound(format!("{name} is not protected")));
    };
    if let Some(failover) = &machine.recovery.failover {
        if !delete_recovered_disks {
            let how = if failover.committed {
                "failed over and committed"
            } else {
                "failed over"
            };
            return Ok(CommandResult::Refused(format!(
                "{name} is {how}: its disks on the master target are the recovered machine's, \
                 and unprotecting deletes them. Copy them off first (each is served as \
                 nbd://…/failover-<disk>; `lifeboat status {name}` names the master target), then \
                 run `lifeboat unprotect {name} --delete-recovered-disks`"
            )));
        }
    }
    tx.writes.delete(keys::machine(name));
    // It leaves its consistency group: a group point needs every member's agent, so a member
    // no longer protected would keep the others from getting any. A barrier under way is
    // dropped (the next interval starts one without it); a group left empty goes.
    let groups = StateReader(&*tx).groups()?;
    for mut group in groups
        .into_iter()
        .filter(|g| g.machines.iter().any(|m| m == name))
    {
        group.machines.retain(|m| m != name);
        if group.machines.is_empty() {
            tx.writes.delete(keys::group(&group.name));
        } else {
            group.barrier = None;
            tx.writes.put(keys::group(&group.name), &group);
        }
    }
    tx.writes.put(keys::job(&job.id), job);
    Ok(CommandResult::Done)
}

pub(super) fn set_disk_state(
    tx: &mut Tx<'_, impl KvRead>,
    machine: &str,
    disk_id: &str,
    state: ReplicationState,
    reason: &str,
    at_ms: i64,
) -> Result<CommandResult, KvError> {
    let Some(mut record) = StateReader(&*tx).machine(machine)? else {
        return Ok(CommandResult::NotFound(format!(
            "{machine} is not protected"
        )));
    };
    let Some(disk) = record.disks.iter_mut().find(|d| d.disk_id == disk_id) else {
        return Ok(CommandResult::NotFound(format!(
            "{machine} has no disk {disk_id}"
        )));
    };
    if !disk.state.can_become(state) {
        return Ok(CommandResult::Refused(format!(
            "disk {disk_id} cannot go from {} to {}",
            disk.state.as_str(),
            state.as_str()
        )));
    }
    if disk.state != state || disk.state_reason != reason {
        disk.state = state;
        disk.state_reason = reason.to_string();
        disk.state_changed_at_ms = at_ms;
        tx.writes.put(keys::machine(machine), &record);
    }
    Ok(CommandResult::Done)
}

pub(super) fn update_job(
    tx: &mut Tx<'_, impl KvRead>,
    job: &Job,
) -> Result<CommandResult, KvError> {
    if StateReader(&*tx).job(&job.id)?.is_none() {
        return Ok(CommandResult::NotFound(format!("no job {}", job.id)));
    }
    tx.writes.put(keys::job(&job.id), job);
    Ok(CommandResult::Done)
}

pub(super) fn create_job(
    tx: &mut Tx<'_, impl KvRead>,
    job: &Job,
) -> Result<CommandResult, KvError> {
    if StateReader(&*tx).job(&job.id)?.is_some() {
        return Ok(CommandResult::Refused(format!("job {} exists", job.id)));
    }
    tx.writes.put(keys::job(&job.id), job);
    Ok(CommandResult::Done)
}

pub(super) fn put_recovery(
    tx: &mut Tx<'_, impl KvRead>,
    name: &str,
    recovery: &MachineRecovery,
) -> Result<CommandResult, KvError> {
    let Some(mut machine) = StateReader(&*tx).machine(name)? else {
        return Ok(CommandResult::NotFound(format!("{name} is not protected")));
    };
    machine.recovery = recovery.clone();
    tx.writes.put(keys::machine(name), &machine);
    Ok(CommandResult::Done)
}

pub(super) fn control_job(
    tx: &mut Tx<'_, impl KvRead>,
    id: &str,
    control: JobControl,
) -> Result<CommandResult, KvError> {
    let Some(mut job) = StateReader(&*tx).job(id)? else {
        return Ok(CommandResult::NotFound(format!("no job {id}")));
    };
    if job.state != JobState::Waiting {
        return Ok(CommandResult::Refused(format!(
            "job {id} is {}, not waiting for the operator",
            job.state.as_str()
        )));
    }
    job.control = Some(control);
    // Running again from now on (the step itself changes when the run takes the word).
    job.state = JobState::Running;
    job.error.clear();
    tx.writes.put(keys::job(id), &job);
    Ok(CommandResult::Done)
}
