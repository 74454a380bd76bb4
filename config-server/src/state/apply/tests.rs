//! Command logic on in-memory storage: each command's effect and refusals.
use super::apply;
use crate::state::kv::MemoryKv;
use crate::state::model::{CaMaterial, ClusterMeta, IdentityRecord};
use crate::state::protection::{Job, JobState, Policy, ProtectedMachine};
use crate::state::{Command, CommandResult, StateReader};
use lifeboat_common::Role;

fn record(id: &str, role: Role, name: &str, generation: u64) -> IdentityRecord {
    IdentityRecord {
        id: id.into(),
        role,
        name: name.into(),
        registered_at_ms: 1,
        passphrase_generation: generation,
        node_id: if role == Role::ConfigServer { 1 } else { 0 },
        revoked: None,
        facts: Default::default(),
        last_heartbeat_ms: 0,
        signed_off: false,
    }
}

fn run(kv: &mut MemoryKv, command: Command) -> CommandResult {
    let (ops, result) = apply(&command, kv).unwrap();
    kv.apply(ops);
    result
}

fn bootstrapped() -> MemoryKv {
    let mut kv = MemoryKv::default();
    let result = run(
        &mut kv,
        Command::Bootstrap {
            meta: ClusterMeta {
                cluster_id: "c1".into(),
                created_at_ms: 1,
            },
            ca: CaMaterial {
                cert_pem: "cert".into(),
                key_pem: "key".into(),
            },
            passphrase: "p1".into(),
            identities: vec![
                record("cs-1", Role::ConfigServer, "node1", 0),
                record("admin-1", Role::Admin, "admin", 0),
            ],
        },
    );
    assert_eq!(result, CommandResult::Done);
    kv
}

#[test]
fn bootstrap_happens_once() {
    let mut kv = bootstrapped();
    let again = run(
        &mut kv,
        Command::Bootstrap {
            meta: ClusterMeta {
                cluster_id: "c2".into(),
                created_at_ms: 2,
            },
            ca: CaMaterial {
                cert_pem: "x".into(),
                key_pem: "y".into(),
            },
            passphrase: "p2".into(),
            identities: vec![],
        },
    );
    assert!(matches!(again, CommandResult::Refused(_)));
    assert_eq!(
        StateReader(&kv).cluster_meta().unwrap().unwrap().cluster_id,
        "c1"
    );
}

#[test]
fn registration_checks_generation_and_supersedes_same_name() {
    let mut kv = bootstrapped();
    let stale = run(
        &mut kv,
        Command::Register {
            record: record("ps-1", Role::ProcessServer, "ps", 0),
            source: "t".into(),
            replaces: String::new(),
        },
    );
    assert!(matches!(stale, CommandResult::Refused(_)));
    assert!(StateReader(&kv).identity("ps-1").unwrap().is_none());

    let first = run(
        &mut kv,
        Command::Register {
            record: record("ps-1", Role::ProcessServer, "ps", 1),
            source: "t".into(),
            replaces: String::new(),
        },
    );
    assert!(matches!(first, CommandResult::Registered { .. }));
    // Another component under the live one's name is refused...
    let other = run(
        &mut kv,
        Command::Register {
            record: record("ps-2", Role::ProcessServer, "ps", 1),
            source: "t".into(),
            replaces: String::new(),
        },
    );
    assert!(
        matches!(&other, CommandResult::Refused(why) if why.contains("servers revoke ps-1")),
        "{other:?}"
    );
    assert!(StateReader(&kv).identity("ps-2").unwrap().is_none());
    // ...the same one registering again supersedes it.
    run(
        &mut kv,
        Command::Register {
            record: record("ps-2", Role::ProcessServer, "ps", 1),
            source: "t".into(),
            replaces: "ps-1".into(),
        },
    );
    let reader = StateReader(&kv);
    assert!(reader.identity("ps-1").unwrap().unwrap().revoked.is_some());
    assert!(reader.identity("ps-2").unwrap().unwrap().revoked.is_none());
    // A third component is refused as well: ps-2 is live.
    let fresh = run(
        &mut kv,
        Command::Register {
            record: record("ps-3", Role::ProcessServer, "ps", 1),
            source: "t".into(),
            replaces: String::new(),
        },
    );
    assert!(
        matches!(fresh, CommandResult::Refused(_)),
        "ps-2 is live: {fresh:?}"
    );
}

#[test]
fn registering_again_moves_protected_machines_to_the_new_identity() {
    // web01's agent is agent-1, its master target mt1 (each named as its id).
    let mut kv = protected();
    let again = |kv: &mut MemoryKv, id: &str, role: Role, name: &str, replaces: &str| {
        run(
            kv,
            Command::Register {
                record: record(id, role, name, 1),
                source: "t".into(),
                replaces: replaces.into(),
            },
        )
    };
    let r = again(&mut kv, "mt9", Role::MasterTarget, "mt1", "mt1");
    assert!(matches!(r, CommandResult::Registered { .. }), "{r:?}");
    let r = again(&mut kv, "agent-9", Role::Agent, "agent-1", "agent-1");
    assert!(matches!(r, CommandResult::Registered { .. }), "{r:?}");
    let m = machine(&kv);
    assert_eq!((m.mt_id.as_str(), m.agent_id.as_str()), ("mt9", "agent-9"));
    assert_eq!(m.ps_id, "ps1", "the process server did not register again");
    // An identity of another role is never taken for the one replaced.
    let r = again(&mut kv, "ps9", Role::ProcessServer, "ps9", "mt9");
    assert!(matches!(r, CommandResult::Registered { .. }), "{r:?}");
    assert_eq!(machine(&kv).mt_id, "mt9");
}

#[test]
fn joining_config_servers_get_fresh_node_ids() {
    let mut kv = bootstrapped();
    let a = run(
        &mut kv,
        Command::Register {
            record: record("cs-2", Role::ConfigServer, "node2", 1),
            source: "t".into(),
            replaces: String::new(),
        },
    );
    let b = run(
        &mut kv,
        Command::Register {
            record: record("cs-3", Role::ConfigServer, "node3", 1),
            source: "t".into(),
            replaces: String::new(),
        },
    );
    assert_eq!(
        a,
        CommandResult::Registered {
            id: "cs-2".into(),
            node_id: 2
        }
    );
    assert_eq!(
        b,
        CommandResult::Registered {
            id: "cs-3".into(),
            node_id: 3
        }
    );
}

#[test]
fn regenerating_the_passphrase_revokes_only_component_identities() {
    let mut kv = bootstrapped();
    for (id, role) in [
        ("ps-1", Role::ProcessServer),
        ("mt-1", Role::MasterTarget),
        ("ag-1", Role::Agent),
    ] {
        run(
            &mut kv,
            Command::Register {
                record: record(id, role, id, 1),
                source: "t".into(),
                replaces: String::new(),
            },
        );
    }
    let result = run(
        &mut kv,
        Command::RegeneratePassphrase {
            passphrase: "p2".into(),
            at_ms: 5,
            by: "admin-1".into(),
        },
    );
    assert_eq!(
        result,
        CommandResult::PassphraseChanged {
            generation: 2,
            revoked: 3
        }
    );
    let reader = StateReader(&kv);
    assert!(reader.identity("cs-1").unwrap().unwrap().revoked.is_none());
    assert!(reader
        .identity("admin-1")
        .unwrap()
        .unwrap()
        .revoked
        .is_none());
    assert!(reader.identity("ag-1").unwrap().unwrap().revoked.is_some());
    assert_eq!(reader.passphrase().unwrap().unwrap().passphrase, "p2");
    let kinds: Vec<String> = reader
        .audit(100, 0)
        .unwrap()
        .into_iter()
        .map(|a| a.kind)
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("cluster_created"));
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("passphrase_regenerated")
    );
}

#[test]
fn revoking_an_unknown_id_changes_nothing() {
    let mut kv = bootstrapped();
    let before = kv.0.clone();
    let result = run(
        &mut kv,
        Command::Revoke {
            id: "nope".into(),
            reason: "x".into(),
            at_ms: 1,
            by: "admin".into(),
        },
    );
    assert!(matches!(result, CommandResult::NotFound(_)));
    assert_eq!(kv.0, before);
}

// Process-server switches (`switch_apply`).

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
        runner: None,
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
        identities: ids
            .iter()
            .map(|(id, role)| record(id, *role, id, 0))
            .collect(),
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

#[test]
fn a_forced_switch_replaces_a_drain_that_cannot_finish() {
    let mut kv = protected();
    assert_eq!(start(&mut kv, "ps2", false, "job-a"), CommandResult::Done);
    // ps1 died while draining: move to ps2 at once.
    assert_eq!(start(&mut kv, "ps2", true, "job-b"), CommandResult::Done);
    let m = machine(&kv);
    assert_eq!((m.ps_id.as_str(), m.switching), ("ps2", None));
    let old = StateReader(&kv).job("job-a").unwrap().unwrap();
    assert_eq!(old.state, JobState::Failed);
    assert!(old.error.contains("job-b"), "{}", old.error);
}

#[test]
fn unprotecting_a_machine_takes_it_out_of_its_group() {
    use crate::state::groups::{Barrier, BarrierPhase, ProtectionGroup};
    let mut kv = protected();
    let mut other = machine(&kv);
    other.name = "web02".into();
    let protect = Command::Protect {
        machine: other,
        job: job("job-protect-2"),
    };
    assert_eq!(run(&mut kv, protect), CommandResult::Done);
    let group = ProtectionGroup {
        name: "erp".into(),
        machines: vec!["web01".into(), "web02".into()],
        every_secs: 60,
        created_at_ms: 1,
        last_point_ms: 0,
        barrier: None,
    };
    assert_eq!(
        run(&mut kv, Command::CreateGroup { group }),
        CommandResult::Done
    );
    let barrier = Some(Barrier {
        id: 5,
        phase: BarrierPhase::Hold,
        phase_since_ms: 5,
    });
    let put = Command::PutBarrier {
        group: "erp".into(),
        barrier,
        last_point_ms: None,
    };
    assert_eq!(run(&mut kv, put), CommandResult::Done);
    let unprotect = |name: &str, id: &str| Command::Unprotect {
        name: name.into(),
        job: job(id),
        delete_recovered_disks: false,
    };
    assert_eq!(
        run(&mut kv, unprotect("web01", "job-u1")),
        CommandResult::Done
    );
    let g = StateReader(&kv).group("erp").unwrap().unwrap();
    assert_eq!(g.machines, ["web02"]);
    assert!(
        g.barrier.is_none(),
        "a barrier with the machine in it is dropped"
    );
    assert_eq!(
        run(&mut kv, unprotect("web02", "job-u2")),
        CommandResult::Done
    );
    assert!(StateReader(&kv).group("erp").unwrap().is_none());
}
