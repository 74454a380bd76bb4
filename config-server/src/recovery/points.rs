//! A machine's recovery points, from what its master target reports per disk: a point of the
//! machine is a tag every one of its disks holds (tags are placed on all of a machine's disks
//! at one instant), and choosing one turns an operator's words — an id, a time, or "latest
//! of a kind" — into the batch each disk's view must show.
use lifeboat_proto::v1;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct MachinePoint {
    pub id: String,
    pub kind: String,
    pub time_ms: i64,
    pub fuzzy: bool,
    /// disk id → seq of the batch the point stands after.
    pub seqs: HashMap<String, u64>,
}

/// "crash", "app", "group", "planned" — the tag's prefix.
pub fn kind_of(tag: &str) -> &str {
    tag.split(':').next().unwrap_or("")
}

/// The points every disk holds, oldest first.
pub fn machine_points(disks: &[v1::DiskPoints]) -> Vec<MachinePoint> {
    let Some(first) = disks.first() else {
        return Vec::new();
    };
    let mut points = Vec::new();
    for p in &first.points {
        let mut seqs = HashMap::new();
        for d in disks {
            if let Some(found) = d.points.iter().find(|q| q.tag == p.tag) {
                seqs.insert(d.disk_id.clone(), found.seq);
            }
        }
        if seqs.len() == disks.len() {
            points.push(MachinePoint {
                id: p.tag.clone(),
                kind: kind_of(&p.tag).to_string(),
                time_ms: p.time_unix_ms,
                fuzzy: p.tag.ends_with(":fuzzy"),
                seqs,
            });
        }
    }
    points.sort_by_key(|p| p.time_ms);
    points
}

/// "latest": each replica as it is (the newest data, though not a point every disk agreed
/// on — for several disks prefer `latest-crash`).
pub fn latest(disks: &[v1::DiskPoints]) -> MachinePoint {
    MachinePoint {
        id: "latest".into(),
        kind: "latest".into(),
        time_ms: disks
            .iter()
            .map(|d| d.applied_write_unix_ms)
            .min()
            .unwrap_or(0),
        fuzzy: false,
        seqs: disks
            .iter()
            .map(|d| (d.disk_id.clone(), d.applied_seq))
            .collect(),
    }
}

/// Chooses the point `selector` names for a machine.
pub fn choose(
    machine: &str,
    disks: &[v1::DiskPoints],
    selector: &str,
) -> Result<MachinePoint, String> {
    let selector = selector.trim();
    if selector.is_empty() || selector == "latest" {
        return Ok(latest(disks));
    }
    let points = machine_points(disks);
    let hint = format!("list them with `lifeboat recovery-points {machine}`");
    if let Some(kind) = selector.strip_prefix("latest-") {
        if !["crash", "app", "group", "planned"].contains(&kind) {
            return Err(format!(
                "unknown point {selector:?}: use latest, latest-crash, latest-app, \
                 latest-group, a point id or a time"
            ));
        }
        // A crash-consistent point may be any point: app and group points are crash-consistent too.
        return points
            .iter()
            .rev()
            .find(|p| (kind == "crash" && !p.fuzzy) || p.kind == kind)
            .cloned()
            .ok_or_else(|| {
                // The kinds that need something the operator sets up say what.
                let needs = match kind {
                    "app" => {
                        " (app points need the agent's --freeze-hook and a policy with \
                         --app-consistent-every)"
                    }
                    "group" => " (group points need a consistency group: `lifeboat group create`)",
                    "crash" => " yet (the first comes one crash-consistent interval after protect)",
                    _ => "",
                };
                format!("{machine} has no {kind} point in its retention window{needs}; {hint}")
            });
    }
    if let Some(p) = points.iter().find(|p| p.id == selector) {
        return Ok(p.clone());
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(selector) {
        let ms = time
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        return points
            .iter()
            .rev()
            .find(|p| p.time_ms <= ms)
            .cloned()
            .ok_or_else(|| format!("{machine} has no point at or before {selector}; {hint}"));
    }
    Err(format!("{machine} has no point {selector:?}; {hint}"))
}

/// Failing over again to another point drops the view the recovered machine has been
/// writing to, and its writes with it: refused, saying how much, unless the operator said
/// to discard them. The same point keeps the view (and the writes) as it is.
pub fn check_refailover(
    machine: &str,
    disks: &[v1::DiskPoints],
    point: &MachinePoint,
    discard: bool,
) -> Result<(), String> {
    let moved = disks.iter().any(|d| {
        !d.failover_view.is_empty()
            && !d.failover_committed
            && point.seqs.get(&d.disk_id) != Some(&d.failover_seq)
    });
    let written: u64 = disks.iter().map(|d| d.failover_written_bytes).sum();
    if discard || !moved || written == 0 {
        return Ok(());
    }
    Err(format!(
        "{machine} runs failed over, and the recovered machine has written {:.1} MiB to its \
         disks since; failing over to {} would discard those writes. Keep them with \
         `lifeboat failover commit {machine}`, or run the failover again with \
         --discard-writes",
        written as f64 / 1048576.0,
        point.id
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(id: &str, tags: &[(&str, u64)]) -> v1::DiskPoints {
        v1::DiskPoints {
            disk_id: id.into(),
            applied_seq: 100,
            applied_write_unix_ms: 9_000,
            points: tags
                .iter()
                .map(|(t, s)| v1::DiskPoint {
                    seq: *s,
                    tag: t.to_string(),
                    time_unix_ms: t.split(':').nth(1).unwrap().parse().unwrap(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn points_are_the_tags_every_disk_holds() {
        let disks = [
            disk(
                "a",
                &[("crash:1000", 3), ("app:2000", 5), ("crash:3000", 8)],
            ),
            disk("b", &[("app:2000", 4), ("crash:3000", 9)]),
        ];
        let points = machine_points(&disks);
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].seqs["b"], 4);
        let app = choose("m", &disks, "latest-app").unwrap();
        assert_eq!(app.id, "app:2000");
        assert_eq!(
            choose("m", &disks, "latest-crash").unwrap().id,
            "crash:3000"
        );
        assert_eq!(choose("m", &disks, "crash:3000").unwrap().seqs["a"], 8);
        assert_eq!(choose("m", &disks, "latest").unwrap().seqs["a"], 100);
        let at = choose("m", &disks, "1970-01-01T00:00:02.500Z").unwrap();
        assert_eq!(at.id, "app:2000");
        assert!(choose("m", &disks, "latest-group")
            .unwrap_err()
            .contains("no group point"));
        assert!(choose("m", &disks, "crash:1000").is_err());
        assert!(choose("m", &disks, "latest-bogus").is_err());
    }

    #[test]
    fn failing_over_again_elsewhere_keeps_written_views_unless_told() {
        let mut disks = [disk("a", &[("crash:1000", 3), ("crash:3000", 8)])];
        disks[0].failover_view = "failover-a".into();
        disks[0].failover_seq = 8;
        let there = choose("m", &disks, "crash:3000").unwrap();
        let earlier = choose("m", &disks, "crash:1000").unwrap();
        // Nothing written yet: any point.
        assert!(check_refailover("m", &disks, &earlier, false).is_ok());
        disks[0].failover_written_bytes = 3 << 20;
        let refused = check_refailover("m", &disks, &earlier, false).unwrap_err();
        assert!(refused.contains("3.0 MiB") && refused.contains("--discard-writes"));
        assert!(check_refailover("m", &disks, &earlier, true).is_ok());
        // The same point keeps the view and its writes.
        assert!(check_refailover("m", &disks, &there, false).is_ok());
        // A committed failover is refused elsewhere, not here.
        disks[0].failover_committed = true;
        assert!(check_refailover("m", &disks, &earlier, false).is_ok());
    }
}
