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
    /// The last heartbeat said the component was stopping cleanly.
    signed_off: bool,
    summarised_ms: Option<i64>,
}

/// What this node last heard from a component.
#[derive(Debug, Clone)]
pub struct Seen {
    pub last_ms: i64,
    pub facts: Facts,
    /// It signed off (stopped cleanly) and has not been heard from since.
    pub signed_off: bool,
}

#[derive(Debug, Default)]
pub struct Liveness {
    inner: Mutex<HashMap<String, Live>>,
}

impl Liveness {
    /// Records a heartbeat; `signing_off` when it was the component's last (a clean stop).
    pub fn record(&self, id: &str, at_ms: i64, facts: Facts, signing_off: bool) {
        let Ok(mut map) = self.inner.lock() else {
            return;
        };
        let entry = map.entry(id.to_string()).or_insert(Live {
            last_ms: at_ms,
            facts: facts.clone(),
            signed_off: false,
            summarised_ms: None,
        });
        entry.last_ms = entry.last_ms.max(at_ms);
        entry.facts = facts;
        if entry.signed_off != signing_off {
            // A stop (or a return after one) reaches Raft at once, not at the low summary
            // rate: another node leading next must not show a stopped component connected.
            entry.signed_off = signing_off;
            entry.summarised_ms = None;
        }
    }

    /// Latest heartbeat seen by this node.
    pub fn get(&self, id: &str) -> Option<Seen> {
        let map = self.inner.lock().ok()?;
        map.get(id).map(|l| Seen {
            last_ms: l.last_ms,
            facts: l.facts.clone(),
            signed_off: l.signed_off,
        })
    }

    /// Whether the component signed off and has not been heard from since.
    pub fn signed_off(&self, id: &str) -> bool {
        let Ok(map) = self.inner.lock() else {
            return false;
        };
        map.get(id).is_some_and(|l| l.signed_off)
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
                    signed_off: live.signed_off,
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
        l.record("a", 1_000, Facts::default(), false);
        assert_eq!(l.due(1_000).len(), 1);
        l.record("a", 6_000, Facts::default(), false);
        assert!(
            l.due(6_000).is_empty(),
            "not again within the summary period"
        );
        l.record("a", 70_000, Facts::default(), false);
        let due = l.due(70_000);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].last_heartbeat_ms, 70_000);
        assert!(
            l.due(200_000).is_empty(),
            "no heartbeat since: nothing new to say"
        );
    }

    #[test]
    fn a_sign_off_and_the_return_after_it_are_summarised_at_once() {
        let l = Liveness::default();
        l.record("a", 1_000, Facts::default(), false);
        l.due(1_000);
        assert!(!l.signed_off("a"));
        l.record("a", 2_000, Facts::default(), true);
        assert!(l.signed_off("a"));
        let due = l.due(2_000);
        assert_eq!(due.len(), 1, "within the summary period all the same");
        assert!(due[0].signed_off);
        l.record("a", 3_000, Facts::default(), false);
        assert!(!l.signed_off("a"), "an ordinary heartbeat undoes it");
        let due = l.due(3_000);
        assert_eq!(due.len(), 1);
        assert!(!due[0].signed_off);
        assert!(!l.signed_off("b"), "never heard of");
    }
}
