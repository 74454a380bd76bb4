//! Choosing where a newly protected machine replicates to: the process server with the most
//! free cache space, and a master target with enough free disk slots for all the machine's
//! disks (they must live on one) and the most free space. Only connected, unrevoked
//! components are candidates; an operator's explicit choice is checked the same way.
use crate::state::model::IdentityRecord;
use crate::state::protection::ProtectedMachine;
use lifeboat_common::Role;

/// Slots of a master target not usable for replica disks (the retention volume).
pub const RESERVED_SLOTS: u32 = 1;

/// A candidate with its live view.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub record: IdentityRecord,
    pub connected: bool,
    pub free_bytes: u64,
    pub slots_total: u32,
}

/// Free disk slots of master target `mt_id` as the configuration server allocates them.
pub fn free_slots(mt: &Candidate, machines: &[ProtectedMachine]) -> u32 {
    let used: u32 = machines
        .iter()
        .filter(|m| m.mt_id == mt.record.id)
        .map(|m| m.disks.len() as u32)
        .sum();
    mt.slots_total
        .saturating_sub(RESERVED_SLOTS)
        .saturating_sub(used)
}

fn matches(c: &Candidate, wanted: &str) -> bool {
    c.record.id == wanted || c.record.name == wanted
}

/// Picks a component of `role` for `disks` disks. `wanted` is the operator's choice (name or
/// id), empty for automatic. Returns the chosen record or why none fits.
pub fn choose(
    role: Role,
    wanted: &str,
    candidates: &[Candidate],
    machines: &[ProtectedMachine],
    disks: u32,
) -> Result<IdentityRecord, String> {
    let of_role: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.record.role == role && c.record.revoked.is_none())
        .collect();
    let fits = |c: &Candidate| -> Result<(), String> {
        if !c.connected {
            return Err(format!("{role} {} is not connected", c.record.name));
        }
        if role == Role::MasterTarget && free_slots(c, machines) < disks {
            return Err(format!(
                "master target {} has {} free disk slots, {disks} needed",
                c.record.name,
                free_slots(c, machines)
            ));
        }
        Ok(())
    };
    if !wanted.is_empty() {
        let c = of_role
            .iter()
            .find(|c| matches(c, wanted))
            .ok_or_else(|| format!("no registered {role} named {wanted}"))?;
        fits(c)?;
        return Ok(c.record.clone());
    }
    let mut reasons = Vec::new();
    let best = of_role
        .iter()
        .filter(|c| match fits(c) {
            Ok(()) => true,
            Err(why) => {
                reasons.push(why);
                false
            }
        })
        .max_by_key(|c| (c.free_bytes, std::cmp::Reverse(c.record.name.clone())));
    best.map(|c| c.record.clone()).ok_or_else(|| {
        if reasons.is_empty() {
            format!("no {role} is registered; register one first")
        } else {
            format!("no {role} can take this machine: {}", reasons.join("; "))
        }
    })
}

/// The protect job's first step detail: where the machine goes, and `note` if any.
pub fn detail(ps_name: &str, mt_name: &str, note: Option<String>) -> String {
    let chosen = format!("process server {ps_name}, master target {mt_name}");
    match note {
        Some(note) => format!("{chosen}; note: {note}"),
        None => chosen,
    }
}

/// A note for the operator when master target `mt_id` has less room than a machine's disks
/// of `disk_bytes` in all could need: replicas are sparse, so disks that hold less data fit,
/// and protection goes ahead; if they do not fit, replication waits (saying so) once the
/// master target runs short.
pub fn space_note(candidates: &[Candidate], mt_id: &str, disk_bytes: u64) -> Option<String> {
    let mt = candidates.iter().find(|c| c.record.id == mt_id)?;
    let room = mt
        .free_bytes
        .saturating_sub(lifeboat_common::facts::MT_SPACE_RESERVE);
    (disk_bytes > room).then(|| {
        format!(
            "master target {} has {} MiB free for replicas, and the machine's disks total {} \
             MiB: if they hold more data than fits, replication waits (`lifeboat status` says \
             so) until space is added",
            mt.record.name,
            room >> 20,
            disk_bytes.div_ceil(1 << 20)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::protection::{ProtectedDisk, ReplicationState};

    fn candidate(id: &str, role: Role, connected: bool, free: u64, slots: u32) -> Candidate {
        Candidate {
            record: IdentityRecord {
                id: id.into(),
                role,
                name: format!("{id}-name"),
                registered_at_ms: 0,
                passphrase_generation: 1,
                node_id: 0,
                revoked: None,
                facts: Default::default(),
                last_heartbeat_ms: 0,
                signed_off: false,
            },
            connected,
            free_bytes: free,
            slots_total: slots,
        }
    }

    fn machine_on(mt: &str, disks: usize) -> ProtectedMachine {
        ProtectedMachine {
            name: "m".into(),
            agent_id: "a".into(),
            policy: "p".into(),
            ps_id: "ps".into(),
            mt_id: mt.into(),
            disks: (0..disks)
                .map(|i| ProtectedDisk {
                    disk_id: format!("d{i}"),
                    name: format!("disk{i}"),
                    source_path: String::new(),
                    size_bytes: 1,
                    state: ReplicationState::Protected,
                    state_reason: String::new(),
                    state_changed_at_ms: 0,
                })
                .collect(),
            protected_at_ms: 0,
            recovery: Default::default(),
            switching: None,
        }
    }

    #[test]
    fn picks_the_connected_one_with_most_space() {
        let c = vec![
            candidate("ps1", Role::ProcessServer, true, 10, 0),
            candidate("ps2", Role::ProcessServer, true, 20, 0),
            candidate("ps3", Role::ProcessServer, false, 99, 0),
        ];
        assert_eq!(
            choose(Role::ProcessServer, "", &c, &[], 1).unwrap().id,
            "ps2"
        );
        assert!(choose(Role::ProcessServer, "ps3", &c, &[], 1)
            .unwrap_err()
            .contains("not connected"));
        assert_eq!(
            choose(Role::ProcessServer, "ps1-name", &c, &[], 1)
                .unwrap()
                .id,
            "ps1"
        );
        assert!(choose(Role::ProcessServer, "nope", &c, &[], 1).is_err());
    }

    #[test]
    fn master_targets_need_slots_for_every_disk() {
        let c = vec![
            candidate("mt1", Role::MasterTarget, true, 100, 4),
            candidate("mt2", Role::MasterTarget, true, 50, 31),
        ];
        let machines = vec![machine_on("mt1", 2)];
        // mt1: 4 slots - 1 reserved - 2 used = 1 free
        assert_eq!(free_slots(&c[0], &machines), 1);
        assert_eq!(
            choose(Role::MasterTarget, "", &c, &machines, 2).unwrap().id,
            "mt2"
        );
        assert_eq!(
            choose(Role::MasterTarget, "", &c, &machines, 1).unwrap().id,
            "mt1"
        );
        assert!(choose(Role::MasterTarget, "mt1", &c, &machines, 2)
            .unwrap_err()
            .contains("free disk slots"));
    }

    #[test]
    fn nothing_registered_says_so() {
        assert!(choose(Role::MasterTarget, "", &[], &[], 1)
            .unwrap_err()
            .contains("register one"));
    }

    #[test]
    fn a_master_target_short_of_room_for_the_disks_gets_a_note() {
        let reserve = lifeboat_common::facts::MT_SPACE_RESERVE;
        let mt = candidate("mt", Role::MasterTarget, true, reserve + (10 << 30), 8);
        let c = [mt];
        assert_eq!(space_note(&c, "mt", 10 << 30), None);
        let note = space_note(&c, "mt", 12 << 30).unwrap();
        assert!(note.contains("mt-name has 10240 MiB free"), "{note}");
        assert!(note.contains("total 12288 MiB"), "{note}");
        assert_eq!(space_note(&c, "other", 12 << 30), None);
    }
}
