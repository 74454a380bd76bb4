//! Component liveness: soft state. Heartbeats arrive every few seconds; the leader keeps the
//! latest per identity in memory and writes a summary into Raft at a low rate (first sight of a
//! component, then at most once per `SUMMARY_EVERY`), so liveness survives a leader change
//! without making Raft carry every heartbeat.
use crate::state::model::Facts;
use crate::state::LivenessUpdate;
use std::collections::HashMap;
use std::sync::Mutex;

/// How often a component's liveness is summarised into Raft.
pub const SUMMARY_EVERY_MS: i64 = 60_000;

#[derive(Debug, Clone)]
struct Live {
    last_ms: i64,
    facts: Facts,
    summarised_ms: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Liveness {
    inner: Mutex<HashMap<String, Live>>,
}

impl Liveness {
    pub fn record(&self, id: &str, at_ms: i64, facts: Facts) {
        let Ok(mut map) = self.inner.lock() else {
            return;
        };
        let entry = map.entry(id.to_string()).or_insert(Live {
            last_ms: at_ms,
            facts: facts.clone(),
            summarised_ms: None,
        });
        entry.last_ms = entry.last_ms.max(at_ms);
        entry.facts = facts;
    }

    /// Latest heartbeat time and facts seen by this node.
    pub fn get(&self, id: &str) -> Option<(i64, Facts)> {
        let map = self.inner.lock().ok()?;
        map.get(id).map(|l| (l.last_ms, l.facts.clone()))
    }

    /// Updates to summarise into Raft now; marks them summarised.
    pub fn due(&self, now_ms: i64) -> Vec<LivenessUpdate> {
        let Ok(mut map) = self.inner.lock() else {
            return Vec::new();
        };
        let mut updates = Vec::new();
        for (id, live) in map.iter_mut() {
            let due = match live.summarised_ms {
                None => true,
                Some(at) => now_ms - at >= SUMMARY_EVERY_MS && live.last_ms > at,
            };
            if due {
                live.summarised_ms = Some(now_ms);
                updates.push(LivenessUpdate {
                    id: id.clone(),
                    last_heartbeat_ms: live.last_ms,
                    facts: live.facts.clone(),
                });
            }
        }
        updates
    }

    /// Forget summaries after losing leadership, so a later term summarises afresh.
    pub fn reset_summaries(&self) {
        if let Ok(mut map) = self.inner.lock() {
            for live in map.values_mut() {
                live.summarised_ms = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_first_sight_then_at_low_rate() {
        let l = Liveness::default();
        l.record("a", 1_000, Facts::default());
        assert_eq!(l.due(1_000).len(), 1);
        l.record("a", 6_000, Facts::default());
        assert!(
            l.due(6_000).is_empty(),
            "not again within the summary period"
        );
        l.record("a", 70_000, Facts::default());
        let due = l.due(70_000);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].last_heartbeat_ms, 70_000);
        assert!(
            l.due(200_000).is_empty(),
            "no heartbeat since: nothing new to say"
        );
    }
}
