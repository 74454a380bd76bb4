//! Applying process-server switches (DESIGN §8): starting one (the machine's current process
//! server drains, or with `force` the machine moves at once) and ending one (moving the
//! machine, or giving up and staying).
use super::command::CommandResult;
use super::keys;
use super::kv::{KvError, KvRead, Overlay};
use super::protection::{Job, Switching};
use super::query::StateReader;
use lifeboat_common::Role;

type Tx<'a, K> = Overlay<'a, K>;

pub(super) fn start_switch(
    tx: &mut Tx<'_, impl KvRead>,
    name: &str,
    to_ps: &str,
    force: bool,
    job: &Job,
) -> Result<CommandResult, KvError> {
    let reader = StateReader(&*tx);
    let Some(mut machine) = reader.machine(name)? else {
        return Ok(CommandResult::NotFound(format!("{name} is not protected")));
    };
    // A forced move replaces a drain that cannot finish (its process server died).
    let mut replaced = None;
    if let Some(s) = &machine.switching {
        if !force {
            return Ok(CommandResult::Refused(format!(
                "{name} is already moving to another process server (job {}); wait for it \
                 with `lifeboat jobs --watch`, or move it at once with --force if its process \
                 server is down",
                s.job_id
            )));
        }
        replaced = reader.job(&s.job_id)?;
    }
    match reader.identity(to_ps)? {
        Some(r) if r.role == Role::ProcessServer && r.revoked.is_none() => {}
        _ => {
            return Ok(CommandResult::Refused(format!(
                "{to_ps} is not a registered, unrevoked process server"
            )))
        }
    }
    if machine.ps_id == to_ps {
        return Ok(CommandResult::Refused(format!(
            "{name} already replicates through that process server"
        )));
    }
    if force {
        machine.ps_id = to_ps.to_string();
        machine.switching = None;
    } else {
        machine.switching = Some(Switching {
            to_ps: to_ps.to_string(),
            job_id: job.id.clone(),
            started_at_ms: job.created_at_ms,
        });
    }
    if let Some(old) = replaced {
        let why = format!("replaced by a forced move (job {})", job.id);
        tx.writes
            .put(keys::job(&old.id), &old.failed(job.created_at_ms, why));
    }
    tx.writes.put(keys::machine(name), &machine);
    tx.writes.put(keys::job(&job.id), job);
    Ok(CommandResult::Done)
}

/// Ends the switch `job` of machine `name`: moves it to the new process server if `to_ps` is
/// given, else leaves it where it is. Either way its current process server stores again.
pub(super) fn end_switch(
    tx: &mut Tx<'_, impl KvRead>,
    name: &str,
    job: &Job,
    move_to: Option<&str>,
) -> Result<CommandResult, KvError> {
    let reader = StateReader(&*tx);
    if let Some(mut machine) = reader.machine(name)? {
        if machine
            .switching
            .as_ref()
            .is_some_and(|s| s.job_id == job.id)
        {
            if let Some(ps) = move_to {
                machine.ps_id = ps.to_string();
            }
            machine.switching = None;
            tx.writes.put(keys::machine(name), &machine);
        }
    }
    tx.writes.put(keys::job(&job.id), job);
    Ok(CommandResult::Done)
}
