//! Command logic on in-memory storage: each command's effect and refusals.
use super::apply;
use crate::state::kv::MemoryKv;
use crate::state::model::{CaMaterial, ClusterMeta, IdentityRecord};
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
        },
    );
    assert!(matches!(stale, CommandResult::Refused(_)));
    assert!(StateReader(&kv).identity("ps-1").unwrap().is_none());

    let first = run(
        &mut kv,
        Command::Register {
            record: record("ps-1", Role::ProcessServer, "ps", 1),
            source: "t".into(),
        },
    );
    assert!(matches!(first, CommandResult::Registered { .. }));
    run(
        &mut kv,
        Command::Register {
            record: record("ps-2", Role::ProcessServer, "ps", 1),
            source: "t".into(),
        },
    );
    let reader = StateReader(&kv);
    assert!(reader.identity("ps-1").unwrap().unwrap().revoked.is_some());
    assert!(reader.identity("ps-2").unwrap().unwrap().revoked.is_none());
}

#[test]
fn joining_config_servers_get_fresh_node_ids() {
    let mut kv = bootstrapped();
    let a = run(
        &mut kv,
        Command::Register {
            record: record("cs-2", Role::ConfigServer, "node2", 1),
            source: "t".into(),
        },
    );
    let b = run(
        &mut kv,
        Command::Register {
            record: record("cs-3", Role::ConfigServer, "node3", 1),
            source: "t".into(),
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
