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
    if let Some(s) = &machine.switching {
        return Ok(CommandResult::Refused(format!(
            "{name} is already moving to another process server (job {}); wait for it with \
             `lifeboat jobs --watch`",
            s.job_id
        )));
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
    } else {
        machine.switching = Some(Switching {
            to_ps: to_ps.to_string(),
            job_id: job.id.clone(),
            started_at_ms: job.created_at_ms,
        });
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

#[cfg(test)]
mod tests {
    use crate::state::apply::apply;
    use crate::state::kv::MemoryKv;
    use crate::state::model::{CaMaterial, ClusterMeta, IdentityRecord};
    use crate::state::protection::{Job, JobState, Policy, ProtectedMachine};
    use crate::state::{Command, CommandResult, StateReader};
    use lifeboat_common::Role;

    fn record(id: &str, role: Role) -> IdentityRecord {
        IdentityRecord {
            id: id.into(),
            role,
            name: id.into(),
            registered_at_ms: 1,
            passphrase_generation: 0,
            node_id: u64::from(role == Role::ConfigServer),
            revoked: None,
            facts: Default::default(),
            last_heartbeat_ms: 0,
        }
    }

    fn run(kv: &mut MemoryKv, command: Command) -> CommandResult {
        let (ops, result) = apply(&command, kv).unwrap();
        kv.apply(ops);
        result
    }

    fn job(id: &str) -> Job {
        Job {
            id: id.into(),
            kind: "switch".into(),
            target: "web01".into(),
            state: JobState::Running,
            steps: Vec::new(),
            created_at_ms: 5,
            updated_at_ms: 5,
            error: String::new(),
            control: None,
            plan: None,
        }
    }

    /// web01 protected through ps1; ps2 and an agent-role "agent-2" registered too.
    fn protected() -> MemoryKv {
        let mut kv = MemoryKv::default();
        let ids = [
            ("cs-1", Role::ConfigServer),
            ("agent-1", Role::Agent),
            ("agent-2", Role::Agent),
            ("ps1", Role::ProcessServer),
            ("ps2", Role::ProcessServer),
            ("mt1", Role::MasterTarget),
        ];
        let bootstrap = Command::Bootstrap {
            meta: ClusterMeta {
                cluster_id: "c".into(),
                created_at_ms: 1,
            },
            ca: CaMaterial {
                cert_pem: "cert".into(),
                key_pem: "key".into(),
            },
            passphrase: "p".into(),
            identities: ids.iter().map(|(id, role)| record(id, *role)).collect(),
        };
        assert_eq!(run(&mut kv, bootstrap), CommandResult::Done);
        let policy = Policy {
            name: "gold".into(),
            rpo_threshold_secs: 900,
            retention_secs: 3600,
            app_consistent_every_secs: 0,
            crash_consistent_every_secs: 300,
            compression: true,
            failback_of: None,
            created_at_ms: 1,
        };
        assert_eq!(
            run(&mut kv, Command::CreatePolicy { policy }),
            CommandResult::Done
        );
        let machine = ProtectedMachine {
            name: "web01".into(),
            agent_id: "agent-1".into(),
            policy: "gold".into(),
            ps_id: "ps1".into(),
            mt_id: "mt1".into(),
            disks: Vec::new(),
            protected_at_ms: 1,
            recovery: Default::default(),
            switching: None,
        };
        let protect = Command::Protect {
            machine,
            job: job("job-protect"),
        };
        assert_eq!(run(&mut kv, protect), CommandResult::Done);
        kv
    }

    fn start(kv: &mut MemoryKv, to: &str, force: bool, id: &str) -> CommandResult {
        run(
            kv,
            Command::StartSwitch {
                machine: "web01".into(),
                to_ps: to.into(),
                force,
                job: job(id),
            },
        )
    }

    fn machine(kv: &MemoryKv) -> ProtectedMachine {
        StateReader(kv).machine("web01").unwrap().unwrap()
    }

    #[test]
    fn a_switch_drains_then_moves_or_stays() {
        let mut kv = protected();
        assert_eq!(start(&mut kv, "ps2", false, "job-a"), CommandResult::Done);
        let m = machine(&kv);
        assert_eq!(m.ps_id, "ps1", "the machine stays until the drain ends");
        assert_eq!(m.switching.as_ref().map(|s| s.to_ps.as_str()), Some("ps2"));
        assert!(StateReader(&kv).job("job-a").unwrap().is_some());
        // One switch at a time.
        assert!(matches!(
            start(&mut kv, "ps2", false, "job-b"),
            CommandResult::Refused(_)
        ));
        // Another job's end changes nothing about the machine.
        let end = |job_id: &str, move_to: Option<&str>| Command::EndSwitch {
            machine: "web01".into(),
            job: job(job_id),
            move_to: move_to.map(str::to_string),
        };
        run(&mut kv, end("job-b", Some("ps2")));
        assert_eq!(machine(&kv).ps_id, "ps1");
        assert!(machine(&kv).switching.is_some());
        run(&mut kv, end("job-a", Some("ps2")));
        let m = machine(&kv);
        assert_eq!((m.ps_id.as_str(), m.switching), ("ps2", None));

        // A drain that gives up leaves the machine where it is.
        assert_eq!(start(&mut kv, "ps1", false, "job-c"), CommandResult::Done);
        run(&mut kv, end("job-c", None));
        let m = machine(&kv);
        assert_eq!((m.ps_id.as_str(), m.switching), ("ps2", None));
    }

    #[test]
    fn a_forced_switch_moves_at_once_and_bad_targets_are_refused() {
        let mut kv = protected();
        for (to, why) in [
            ("ps1", "already there"),
            ("agent-2", "not a process server"),
            ("nobody", "not registered"),
        ] {
            let result = start(&mut kv, to, false, "job-x");
            assert!(matches!(result, CommandResult::Refused(_)), "{why}");
            assert!(StateReader(&kv).job("job-x").unwrap().is_none(), "{why}");
        }
        assert!(machine(&kv).switching.is_none());
        assert_eq!(start(&mut kv, "ps2", true, "job-f"), CommandResult::Done);
        let m = machine(&kv);
        assert_eq!((m.ps_id.as_str(), m.switching), ("ps2", None));
        let missing = run(
            &mut kv,
            Command::StartSwitch {
                machine: "db01".into(),
                to_ps: "ps1".into(),
                force: false,
                job: job("job-y"),
            },
        );
        assert!(matches!(missing, CommandResult::NotFound(_)));
    }
}
