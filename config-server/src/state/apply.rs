//! Applying a command to the state: validation that must be identical on every node, then the
//! writes. Pure logic over `KvRead`; the storage makes the writes atomic.
use super::command::{AuditDraft, Command, CommandResult};
use super::groups;
use super::keys;
use super::kv::{KvError, KvOp, KvRead, Overlay};
use super::model::{IdentityRecord, PassphraseState, Revocation};
use super::plans;
use super::protection_apply;
use super::query::StateReader;
use super::switch_apply;

/// Applies `command` on top of `state` and returns the writes and the result.
pub fn apply(
    command: &Command,
    state: &impl KvRead,
) -> Result<(Vec<KvOp>, CommandResult), KvError> {
    let mut tx = Overlay::new(state);
    let result = match command {
        Command::Bootstrap {
            meta,
            ca,
            passphrase,
            identities,
        } => {
            if tx.get::<serde_json::Value>(keys::CLUSTER_META)?.is_some() {
                CommandResult::Refused("cluster is already bootstrapped".into())
            } else {
                tx.writes.put(keys::CLUSTER_META, meta);
                tx.writes.put(keys::CA, ca);
                tx.writes.put(
                    keys::PASSPHRASE,
                    &PassphraseState {
                        passphrase: passphrase.clone(),
                        generation: 1,
                    },
                );
                let mut next_node = 1;
                for record in identities {
                    next_node = next_node.max(record.node_id + 1);
                    put_identity(&mut tx, record);
                }
                tx.writes.put(keys::NEXT_NODE_ID, &next_node);
                audit(
                    &mut tx,
                    AuditDraft {
                        at_ms: meta.created_at_ms,
                        kind: "cluster_created".into(),
                        source: "init".into(),
                        subject: meta.cluster_id.clone(),
                        detail: format!("{} identities issued", identities.len()),
                    },
                )?;
                CommandResult::Done
            }
        }
        Command::Register {
            record,
            source,
            replaces,
        } => register(&mut tx, record, source, replaces)?,
        Command::Revoke {
            id,
            reason,
            at_ms,
            by,
        } => match StateReader(&tx).identity(id)? {
            None => CommandResult::NotFound(format!("no identity {id}")),
            Some(mut record) => {
                if record.revoked.is_none() {
                    record.revoked = Some(Revocation {
                        at_ms: *at_ms,
                        reason: reason.clone(),
                    });
                    put_identity(&mut tx, &record);
                    audit(
                        &mut tx,
                        AuditDraft {
                            at_ms: *at_ms,
                            kind: "revocation".into(),
                            source: by.clone(),
                            subject: format!("{} {} ({})", record.role, record.name, record.id),
                            detail: reason.clone(),
                        },
                    )?;
                }
                CommandResult::Done
            }
        },
        Command::RegeneratePassphrase {
            passphrase,
            at_ms,
            by,
        } => {
            let reader = StateReader(&tx);
            let generation = reader.passphrase()?.map(|p| p.generation).unwrap_or(0) + 1;
            let mut revoked = 0u32;
            for mut record in reader.identities()? {
                if record.role.bound_to_passphrase() && record.revoked.is_none() {
                    record.revoked = Some(Revocation {
                        at_ms: *at_ms,
                        reason: format!("passphrase regenerated (generation {generation})"),
                    });
                    put_identity(&mut tx, &record);
                    revoked += 1;
                }
            }
            tx.writes.put(
                keys::PASSPHRASE,
                &PassphraseState {
                    passphrase: passphrase.clone(),
                    generation,
                },
            );
            audit(
                &mut tx,
                AuditDraft {
                    at_ms: *at_ms,
                    kind: "passphrase_regenerated".into(),
                    source: by.clone(),
                    subject: format!("generation {generation}"),
                    detail: format!("{revoked} component identities revoked"),
                },
            )?;
            CommandResult::PassphraseChanged {
                generation,
                revoked,
            }
        }
        Command::RecordLiveness { updates } => {
            for update in updates {
                if let Some(mut record) = StateReader(&tx).identity(&update.id)? {
                    if update.last_heartbeat_ms >= record.last_heartbeat_ms {
                        record.signed_off = update.signed_off;
                    }
                    record.last_heartbeat_ms =
                        record.last_heartbeat_ms.max(update.last_heartbeat_ms);
                    record.facts = update.facts.clone();
                    put_identity(&mut tx, &record);
                }
            }
            CommandResult::Done
        }
        Command::Audit { entry } => {
            audit(&mut tx, entry.clone())?;
            CommandResult::Done
        }
        Command::CreatePolicy { policy } => protection_apply::create_policy(&mut tx, policy)?,
        Command::UpdatePolicy { policy } => protection_apply::update_policy(&mut tx, policy)?,
        Command::DeletePolicy { name } => protection_apply::delete_policy(&mut tx, name)?,
        Command::AssignPolicy { machine, policy } => {
            protection_apply::assign_policy(&mut tx, machine, policy)?
        }
        Command::Protect { machine, job } => protection_apply::protect(&mut tx, machine, job)?,
        Command::Unprotect {
            name,
            job,
            delete_recovered_disks,
        } => protection_apply::unprotect(&mut tx, name, job, *delete_recovered_disks)?,
        Command::StartSwitch {
            machine,
            to_ps,
            force,
            job,
        } => switch_apply::start_switch(&mut tx, machine, to_ps, *force, job)?,
        Command::EndSwitch {
            machine,
            job,
            move_to,
        } => switch_apply::end_switch(&mut tx, machine, job, move_to.as_deref())?,
        Command::SetDiskState {
            machine,
            disk_id,
            state,
            reason,
            at_ms,
        } => protection_apply::set_disk_state(&mut tx, machine, disk_id, *state, reason, *at_ms)?,
        Command::UpdateJob { job } => protection_apply::update_job(&mut tx, job)?,
        Command::CreateJob { job } => protection_apply::create_job(&mut tx, job)?,
        Command::CreatePlan { plan } => plans::create_plan(&mut tx, plan)?,
        Command::DeletePlan { name } => plans::delete_plan(&mut tx, name)?,
        Command::ControlJob { id, control } => {
            protection_apply::control_job(&mut tx, id, *control)?
        }
        Command::CreateGroup { group } => groups::create_group(&mut tx, group)?,
        Command::DeleteGroup { name } => groups::delete_group(&mut tx, name)?,
        Command::PutBarrier {
            group,
            barrier,
            last_point_ms,
        } => groups::put_barrier(&mut tx, group, barrier, *last_point_ms)?,
        Command::PutRecovery { name, recovery } => {
            protection_apply::put_recovery(&mut tx, name, recovery)?
        }
        Command::RaiseAlert { alert } => {
            if tx
                .get::<serde_json::Value>(&keys::alert(&alert.key))?
                .is_none()
            {
                tx.writes.put(keys::alert(&alert.key), alert);
                audit(
                    &mut tx,
                    AuditDraft {
                        at_ms: alert.raised_at_ms,
                        kind: "alert_raised".into(),
                        source: "reconciler".into(),
                        subject: alert.subject.clone(),
                        detail: alert.message.clone(),
                    },
                )?;
            }
            CommandResult::Done
        }
        Command::ClearAlert { key, at_ms } => {
            if let Some(alert) = tx.get::<super::protection::Alert>(&keys::alert(key))? {
                tx.writes.delete(keys::alert(key));
                audit(
                    &mut tx,
                    AuditDraft {
                        at_ms: *at_ms,
                        kind: "alert_cleared".into(),
                        source: "reconciler".into(),
                        subject: alert.subject,
                        detail: alert.message,
                    },
                )?;
            }
            CommandResult::Done
        }
    };
    Ok((tx.writes.into_ops(), result))
}

fn register(
    tx: &mut Overlay<'_, impl KvRead>,
    record: &IdentityRecord,
    source: &str,
    replaces: &str,
) -> Result<CommandResult, KvError> {
    let reader = StateReader(&*tx);
    let current = reader.passphrase()?.map(|p| p.generation).unwrap_or(0);
    if record.passphrase_generation != current {
        return Ok(CommandResult::Refused(
            "the passphrase changed during registration; register again with the current passphrase".into(),
        ));
    }
    if reader.identity(&record.id)?.is_some() {
        return Ok(CommandResult::Refused(format!(
            "identity {} exists",
            record.id
        )));
    }
    let superseded: Option<String> = tx.get(&keys::name(record.role, &record.name))?;
    // A name in use by a live component is taken only by that component registering again
    // (`register --force` in its data directory names the identity it replaces): another
    // one under the same name — a second host, a cloned VM — would silently stop it.
    if let Some(old_id) = &superseded {
        let live = StateReader(&*tx)
            .identity(old_id)?
            .is_some_and(|old| old.revoked.is_none());
        let takes_over = matches!(
            record.role,
            lifeboat_common::Role::Agent
                | lifeboat_common::Role::ProcessServer
                | lifeboat_common::Role::MasterTarget
        );
        if live && takes_over && old_id != replaces {
            return Ok(CommandResult::Refused(format!(
                "a {} named {} is already registered ({old_id}); choose another --name, or if \
                 it is gone for good, `lifeboat servers revoke {old_id}` first. To register \
                 the same component again, run `register --force` with its data directory",
                record.role, record.name
            )));
        }
    }
    let mut record = record.clone();
    if record.role == lifeboat_common::Role::ConfigServer {
        let next: u64 = tx.get(keys::NEXT_NODE_ID)?.unwrap_or(1);
        record.node_id = next;
        tx.writes.put(keys::NEXT_NODE_ID, &(next + 1));
    }
    if let Some(old_id) = superseded {
        if let Some(mut old) = StateReader(&*tx).identity(&old_id)? {
            if old.revoked.is_none() {
                old.revoked = Some(Revocation {
                    at_ms: record.registered_at_ms,
                    reason: format!("superseded by a new registration ({})", record.id),
                });
                put_identity(tx, &old);
            }
        }
    }
    put_identity(tx, &record);
    let moved = if replaces.is_empty() {
        0
    } else {
        move_references(tx, replaces, &record)?
    };
    audit(
        tx,
        AuditDraft {
            at_ms: record.registered_at_ms,
            kind: "registration".into(),
            source: source.to_string(),
            subject: format!("{} {} ({})", record.role, record.name, record.id),
            detail: if replaces.is_empty() {
                format!("passphrase generation {}", record.passphrase_generation)
            } else {
                format!(
                    "passphrase generation {}; replaces {replaces} ({moved} protected \
                     machine(s) moved to it)",
                    record.passphrase_generation
                )
            },
        },
    )?;
    Ok(CommandResult::Registered {
        id: record.id.clone(),
        node_id: record.node_id,
    })
}

/// A component registered again (same data directory, new identity) keeps its work:
/// protected machines naming the identity it replaces as their agent, process server (or the
/// one a switch moves to) or master target name the new one. Without this the master target
/// would take its replicas for unprotected disks and delete them. Only an identity of the
/// same role is replaced. Returns how many machines changed.
fn move_references(
    tx: &mut Overlay<'_, impl KvRead>,
    replaces: &str,
    record: &IdentityRecord,
) -> Result<usize, KvError> {
    let same_role = StateReader(&*tx)
        .identity(replaces)?
        .is_some_and(|old| old.role == record.role);
    if !same_role {
        return Ok(0);
    }
    let mut moved = 0;
    for mut machine in StateReader(&*tx).machines()? {
        let before = machine.clone();
        for id in [
            &mut machine.agent_id,
            &mut machine.ps_id,
            &mut machine.mt_id,
        ] {
            if id == replaces {
                *id = record.id.clone();
            }
        }
        if let Some(s) = machine.switching.as_mut().filter(|s| s.to_ps == replaces) {
            s.to_ps = record.id.clone();
        }
        if machine != before {
            tx.writes.put(keys::machine(&machine.name), &machine);
            moved += 1;
        }
    }
    Ok(moved)
}

fn put_identity(tx: &mut Overlay<'_, impl KvRead>, record: &IdentityRecord) {
    tx.writes.put(keys::identity(&record.id), record);
    tx.writes
        .put(keys::name(record.role, &record.name), &record.id);
}

fn audit(tx: &mut Overlay<'_, impl KvRead>, draft: AuditDraft) -> Result<(), KvError> {
    let seq: u64 = tx.get(keys::AUDIT_SEQ)?.unwrap_or(0) + 1;
    tx.writes.put(keys::AUDIT_SEQ, &seq);
    tx.writes.put(keys::audit(seq), &draft.numbered(seq));
    Ok(())
}

#[cfg(test)]
mod tests;
