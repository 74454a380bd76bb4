//! Following this component's disk assignments as they change. Heartbeat replies carry the
//! full list every interval; besides them, a long-poll (`Component.AwaitAssignments`) returns
//! as soon as the configuration server's list differs from the one held, so protect,
//! unprotect and placement changes take effect at once rather than at the next heartbeat.
//! Both paths hand lists to [`Latest`], which keeps the newest by applied log index: a
//! heartbeat reply put together before a change cannot undo it by arriving after it.
use crate::component::Reporter;
use crate::{tls, Identity, Role};
use lifeboat_proto::v1::{self, component_client::ComponentClient};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long one long-poll waits (below the channel's call timeout).
const WAIT_SECS: u32 = 10;

/// How long only older lists must arrive before one is followed (see [`Latest::offer`]).
const STEP_BACK_AFTER: Duration = Duration::from_secs(30);

/// The applied index of the newest list handed to the reporter.
#[derive(Default)]
pub struct Latest {
    /// (index of the list last accepted, since when only older ones have arrived).
    state: Mutex<(u64, Option<Instant>)>,
}

impl Latest {
    /// Hands `assignments` (as of log index `index`) to the reporter unless a newer list was
    /// already handed over. Older lists are followed only once nothing but older lists has
    /// arrived for 30 s: the configuration servers' log really went back (a cluster rebuilt
    /// from a backup). A lagging server answering one path while another answers the other
    /// does not make the list flip back and forth: the long-poll brings the newer index at
    /// least every 10 s.
    pub fn offer(
        &self,
        index: u64,
        assignments: Vec<v1::DiskAssignment>,
        reporter: &impl Reporter,
    ) {
        self.offer_at(index, assignments, reporter, Instant::now());
    }

    fn offer_at(
        &self,
        index: u64,
        assignments: Vec<v1::DiskAssignment>,
        reporter: &impl Reporter,
        now: Instant,
    ) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (accepted, older_since) = *state;
        if index < accepted {
            match older_since {
                Some(since) if now.duration_since(since) >= STEP_BACK_AFTER => {}
                Some(_) => return,
                None => {
                    state.1 = Some(now);
                    return;
                }
            }
        }
        *state = (index, None);
        // Under the lock, so the two paths hand lists over one at a time, in index order.
        reporter.assignments(assignments);
    }
}

/// How long to wait before asking again a configuration server that did not offer the
/// long-poll (an older version, until it is upgraded); heartbeats carry the lists meanwhile.
const RETRY_UNIMPLEMENTED: Duration = Duration::from_secs(300);

/// Long-polls the configuration server for assignment changes until the caller drops the
/// future. `addresses` are the configuration servers as the heartbeats last learnt them
/// (read at every reconnect, so a changed cluster is followed). `reconnected` is notified
/// when a connection is made again after a failure: the server reached may not have heard
/// from this component yet (its node was lost), so the heartbeat goes out then rather than at
/// the end of its interval.
pub async fn follow(
    identity: &Identity,
    addresses: &watch::Receiver<Vec<String>>,
    reporter: &impl Reporter,
    latest: &Latest,
    reconnected: &tokio::sync::Notify,
) {
    let mut digest = Vec::new();
    let mut backoff = Duration::from_secs(1);
    let mut failed = false;
    loop {
        let servers = addresses.borrow().clone();
        let channel = match tls::mtls_connect_any(identity, &servers, Role::ConfigServer).await {
            Ok((_, channel)) => {
                if std::mem::take(&mut failed) {
                    reconnected.notify_one();
                }
                channel
            }
            Err(_) => {
                // The heartbeat loop reports connection trouble; just try again later.
                failed = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let mut client = ComponentClient::new(channel);
        loop {
            let request = v1::AwaitAssignmentsRequest {
                known_digest: digest.clone(),
                wait_secs: WAIT_SECS,
            };
            match client.await_assignments(request).await {
                Ok(response) => {
                    let r = response.into_inner();
                    latest.offer(r.applied_index, r.assignments, reporter);
                    digest = r.digest;
                    backoff = Duration::from_secs(1);
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(
                        "the configuration server does not offer AwaitAssignments (an older version): assignments follow heartbeats only; asking again in {} s",
                        RETRY_UNIMPLEMENTED.as_secs()
                    );
                    tokio::time::sleep(RETRY_UNIMPLEMENTED).await;
                    break;
                }
                Err(status) => {
                    tracing::debug!("waiting for assignments: {}", status.message());
                    failed = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Lists(StdMutex<Vec<usize>>);
    impl Reporter for Lists {
        fn facts(&self) -> v1::ComponentFacts {
            v1::ComponentFacts::default()
        }
        fn assignments(&self, assignments: Vec<v1::DiskAssignment>) {
            self.0.lock().unwrap().push(assignments.len());
        }
    }

    fn list(n: usize) -> Vec<v1::DiskAssignment> {
        vec![v1::DiskAssignment::default(); n]
    }

    #[test]
    fn a_late_older_list_is_ignored_and_a_lasting_step_back_is_followed() {
        let (latest, seen) = (Latest::default(), Lists::default());
        let t = Instant::now();
        let at = |secs: u64| t + Duration::from_secs(secs);
        latest.offer_at(5, list(1), &seen, at(0));
        latest.offer_at(7, list(2), &seen, at(1)); // the long-poll saw a protect
        latest.offer_at(6, list(1), &seen, at(2)); // a heartbeat reply from before it: ignored
        latest.offer_at(7, list(2), &seen, at(10)); // the long-poll's next answer
        latest.offer_at(6, list(1), &seen, at(20)); // a lagging server: ignored...
        latest.offer_at(7, list(2), &seen, at(30)); // ...while the newer index keeps coming
        latest.offer_at(6, list(1), &seen, at(45));
        latest.offer_at(3, list(0), &seen, at(60)); // the log went back...
        latest.offer_at(3, list(0), &seen, at(80)); // ...and stayed back for 30 s: followed
        latest.offer_at(4, list(4), &seen, at(81));
        assert_eq!(*seen.0.lock().unwrap(), vec![1, 2, 2, 2, 0, 4]);
    }
}
