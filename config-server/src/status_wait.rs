//! Long polls of `Status`: a caller that already holds the status of some version asks for
//! the next one, and the answer waits until something status is made of may have changed.
//!
//! Status is made of this node's applied state (machines, their states, jobs) and the leader's
//! soft progress reports. The version is the sum of two counters that only grow: the index of
//! the last applied log entry and the number of reports recorded. A `lifeboat wait` then asks
//! a few times per heartbeat instead of every 25 ms, and still hears of the change it waits
//! for as soon as it is applied. Things that change with time alone (an RPO's age, a component
//! going quiet) are not events: the caller's own timeout bounds how stale it gets.
use crate::node::Node;
use std::time::Duration;
use tokio::sync::watch;

/// Longest a status call is held.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// The status version of `node` now.
pub fn version(node: &Node) -> u64 {
    *node.applied.borrow() + node.progress.change_count()
}

fn version_of(applied: &watch::Receiver<u64>, reports: &watch::Receiver<u64>) -> u64 {
    *applied.borrow() + *reports.borrow()
}

/// Waits until `node`'s status version differs from `after` or `limit` (at most [`MAX_WAIT`])
/// passes; returns at once if it already differs.
pub async fn changed_since(node: &Node, after: u64, limit: Duration) {
    wait(node.applied.clone(), node.progress.changes(), after, limit).await
}

async fn wait(
    mut applied: watch::Receiver<u64>,
    mut reports: watch::Receiver<u64>,
    after: u64,
    limit: Duration,
) {
    // Marked seen before the comparison: a change made after it wakes the wait below.
    applied.borrow_and_update();
    reports.borrow_and_update();
    if version_of(&applied, &reports) != after {
        return;
    }
    let _ = tokio::time::timeout(limit.min(MAX_WAIT), async {
        tokio::select! {
            _ = applied.changed() => {}
            _ = reports.changed() => {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paused time: timers fire in order without real waiting, so "before the limit" below
    /// is exact (a wait that missed its event would end only at its limit).
    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_the_next_change_or_at_its_limit() {
        let start = tokio::time::Instant::now();
        let (applied_tx, applied) = watch::channel(7u64);
        let (reports_tx, reports) = watch::channel(3u64);
        let now = version_of(&applied, &reports);
        assert_eq!(now, 10);
        // A caller behind the current version gets an answer at once (a limit it would
        // otherwise wait out: the test would hang).
        wait(
            applied.clone(),
            reports.clone(),
            9,
            Duration::from_secs(3600),
        )
        .await;
        // A report recorded while the caller waits ends the wait, well before its limit.
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            reports_tx.send_modify(|n| *n += 1);
            reports_tx
        });
        wait(applied.clone(), reports.clone(), now, MAX_WAIT).await;
        assert_eq!(version_of(&applied, &reports), 11);
        assert!(
            start.elapsed() < MAX_WAIT,
            "woken by the report, not the limit"
        );
        let _reports_tx = sender.await.unwrap();
        // So does an applied log entry.
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            applied_tx.send_replace(8);
            applied_tx
        });
        let before = tokio::time::Instant::now();
        wait(applied.clone(), reports.clone(), 11, MAX_WAIT).await;
        assert_eq!(version_of(&applied, &reports), 12);
        assert!(
            before.elapsed() < MAX_WAIT,
            "woken by the apply, not the limit"
        );
        let _applied_tx = sender.await.unwrap();
        // Nothing changes: the wait ends at its limit with the version unchanged.
        wait(
            applied.clone(),
            reports.clone(),
            12,
            Duration::from_millis(20),
        )
        .await;
        assert_eq!(version_of(&applied, &reports), 12);
    }
}
