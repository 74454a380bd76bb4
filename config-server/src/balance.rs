//! Load balancing across process servers (DESIGN §8): which machines to move, by their
//! measured change rate and each process server's cache headroom.
//!
//! A process server's *pressure* is the rate its machines change at over the room left in its
//! cache quota: the inverse of how long its cache could hold their changes if its master
//! targets stopped draining it. The plan moves machines, one at a time, from the process
//! server under the most pressure to the one where the move lowers the highest pressure of
//! all the most, as long as each move lowers it by at least [`MIN_GAIN`] (so small differences
//! do not make machines move back and forth). Each machine moves at most once per plan;
//! machines that change nothing are never moved (it would gain nothing). Only process servers
//! that can take part (connected: a move drains the old one) are weighed and receive
//! machines; machines already moving count where they go, and do not move again.

/// A move must lower the highest pressure by at least this fraction.
pub const MIN_GAIN: f64 = 0.1;
/// Headroom counted for a full cache, so its pressure stays finite (and comparable).
const MIN_HEADROOM: u64 = 1 << 20;

/// A process server that may take machines.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub id: String,
    /// Cache quota minus what the cache holds; a server with none takes no machines.
    pub headroom_bytes: u64,
    /// Whether it may receive machines (connected, unrevoked).
    pub eligible: bool,
}

/// A protected machine that may be moved.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub name: String,
    pub ps_id: String,
    /// Its disks' change rates, summed.
    pub change_bytes_per_sec: f64,
    /// False for a machine already moving (`ps_id` is then where it goes).
    pub movable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub machine: String,
    pub from: String,
    pub to: String,
    pub change_bytes_per_sec: f64,
}

/// The load (bytes per second) on each of `servers` once `moves` are made.
pub fn loads(servers: &[Server], machines: &[Machine], moves: &[Move]) -> Vec<f64> {
    servers
        .iter()
        .map(|s| {
            machines
                .iter()
                .filter(|m| {
                    let ps = moves
                        .iter()
                        .find(|mv| mv.machine == m.name)
                        .map_or(m.ps_id.as_str(), |mv| mv.to.as_str());
                    ps == s.id
                })
                .map(|m| m.change_bytes_per_sec)
                .sum()
        })
        .collect()
}

/// Changes per second per byte of headroom.
fn pressure(load: f64, headroom: u64) -> f64 {
    if load <= 0.0 {
        return 0.0;
    }
    load / headroom.max(MIN_HEADROOM) as f64
}

/// The eligible server under the most pressure, and that pressure.
fn highest(servers: &[Server], loads: &[f64]) -> (usize, f64) {
    loads
        .iter()
        .enumerate()
        .filter(|(i, _)| servers[*i].eligible)
        .map(|(i, l)| (i, pressure(*l, servers[i].headroom_bytes)))
        .fold((0, 0.0), |best, x| if x.1 > best.1 { x } else { best })
}

/// The moves that balance `machines` over `servers` (see the module doc).
pub fn plan(servers: &[Server], machines: &[Machine]) -> Vec<Move> {
    let mut moves: Vec<Move> = Vec::new();
    for _ in 0..machines.len() {
        let current = loads(servers, machines, &moves);
        let (worst, top) = highest(servers, &current);
        if top <= 0.0 {
            break;
        }
        let mut best: Option<(f64, Move)> = None;
        let movable = machines.iter().filter(|m| {
            m.movable
                && m.change_bytes_per_sec > 0.0
                && m.ps_id == servers[worst].id
                && !moves.iter().any(|mv| mv.machine == m.name)
        });
        for m in movable {
            for (t, target) in servers.iter().enumerate() {
                if t == worst || !target.eligible || target.headroom_bytes == 0 {
                    continue;
                }
                let candidate = Move {
                    machine: m.name.clone(),
                    from: m.ps_id.clone(),
                    to: target.id.clone(),
                    change_bytes_per_sec: m.change_bytes_per_sec,
                };
                let mut tried = moves.clone();
                tried.push(candidate.clone());
                let (_, after) = highest(servers, &loads(servers, machines, &tried));
                if best.as_ref().is_none_or(|(b, _)| after < *b) {
                    best = Some((after, candidate));
                }
            }
        }
        match best {
            Some((after, mv)) if after <= top * (1.0 - MIN_GAIN) => moves.push(mv),
            _ => break,
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, headroom_gib: u64) -> Server {
        Server {
            id: id.into(),
            headroom_bytes: headroom_gib << 30,
            eligible: true,
        }
    }

    fn machine(name: &str, ps: &str, mib_per_sec: f64) -> Machine {
        Machine {
            name: name.into(),
            ps_id: ps.into(),
            change_bytes_per_sec: mib_per_sec * 1048576.0,
            movable: true,
        }
    }

    fn moved(moves: &[Move]) -> Vec<(&str, &str)> {
        moves
            .iter()
            .map(|m| (m.machine.as_str(), m.to.as_str()))
            .collect()
    }

    #[test]
    fn machines_spread_by_change_rate_over_equal_servers() {
        let servers = [server("ps1", 10), server("ps2", 10)];
        let machines = [
            machine("a", "ps1", 4.0),
            machine("b", "ps1", 3.0),
            machine("c", "ps1", 1.0),
        ];
        let moves = plan(&servers, &machines);
        // 8 MiB/s on ps1: moving a (4) leaves 4 | 4.
        assert_eq!(moved(&moves), vec![("a", "ps2")]);
        assert_eq!(loads(&servers, &machines, &moves), vec![4.0 * 1048576.0; 2]);
    }

    #[test]
    fn headroom_weighs_and_ineligible_or_full_servers_take_nothing() {
        // ps2 has three times ps1's room: it should carry about three times the load.
        let servers = [server("ps1", 10), server("ps2", 30)];
        let machines = [
            machine("a", "ps1", 2.0),
            machine("b", "ps1", 2.0),
            machine("c", "ps1", 2.0),
            machine("d", "ps1", 2.0),
        ];
        let moves = plan(&servers, &machines);
        assert_eq!(moves.len(), 3, "{moves:?}");
        assert!(moves.iter().all(|m| m.to == "ps2"));

        let mut down = server("ps2", 30);
        down.eligible = false;
        assert!(plan(&[server("ps1", 10), down], &machines).is_empty());
        assert!(plan(&[server("ps1", 10), server("ps2", 0)], &machines).is_empty());
    }

    #[test]
    fn idle_machines_and_small_gains_move_nothing() {
        let servers = [server("ps1", 10), server("ps2", 10)];
        // Nothing changes: nothing to gain.
        assert!(plan(
            &servers,
            &[machine("a", "ps1", 0.0), machine("b", "ps1", 0.0)]
        )
        .is_empty());
        // 5 | 4.5: moving the 0.5 one would make it 4.5 | 5, no better.
        let machines = [
            machine("a", "ps1", 4.5),
            machine("b", "ps1", 0.5),
            machine("c", "ps2", 4.5),
        ];
        assert!(plan(&servers, &machines).is_empty());
    }

    #[test]
    fn a_full_cache_sheds_load_only_while_it_helps_and_stuck_machines_stay() {
        // ps1 is full: moving the busy machine helps a lot, the idle-ish one then no more.
        let servers = [server("ps1", 0), server("ps2", 10)];
        let machines = [machine("a", "ps1", 4.0), machine("b", "ps1", 0.000001)];
        assert_eq!(moved(&plan(&servers, &machines)), vec![("a", "ps2")]);
        // A machine already moving (counted at ps2) does not move, and weighs there.
        let mut moving = machine("c", "ps2", 8.0);
        moving.movable = false;
        let servers = [server("ps1", 10), server("ps2", 10)];
        assert!(plan(&servers, &[moving.clone(), machine("a", "ps1", 4.0)]).is_empty());
        // Even where a move would help (8 | 0), machines that cannot move stay.
        let mut moving2 = machine("d", "ps2", 4.0);
        moving2.movable = false;
        let mut moving3 = moving2.clone();
        moving3.name = "e".into();
        assert!(plan(&servers, &[moving2, moving3]).is_empty());
        // Machines on a process server that cannot drain (down) stay, and it is not weighed.
        let mut down = server("ps1", 10);
        down.eligible = false;
        assert!(plan(
            &[down.clone(), server("ps2", 10)],
            &[machine("a", "ps1", 4.0)]
        )
        .is_empty());
        // Even where a move would help (8 | 0).
        let busy = [machine("a", "ps1", 4.0), machine("b", "ps1", 4.0)];
        assert!(plan(&[down, server("ps2", 10)], &busy).is_empty());
    }
}
