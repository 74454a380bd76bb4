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
use std::time::Duration;

/// How long one long-poll waits (below the channel's call timeout).
const WAIT_SECS: u32 = 10;

/// The applied index of the newest list handed to the reporter.
#[derive(Default)]
pub struct Latest {
    /// (index of the list last accepted, an older index seen since).
    state: Mutex<(u64, Option<u64>)>,
}

impl Latest {
    /// Hands `assignments` (as of log index `index`) to the reporter unless a newer list was
    /// already handed over. An older index seen twice in a row is accepted anyway: the
    /// configuration servers' log really went back (a cluster rebuilt from a backup), and
    /// following it beats holding on to a list nobody serves.
    pub fn offer(
        &self,
        index: u64,
        assignments: Vec<v1::DiskAssignment>,
        reporter: &impl Reporter,
    ) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (accepted, older) = *state;
        if index < accepted && older != Some(index) {
            state.1 = Some(index);
            return;
        }
        *state = (index, None);
        // Under the lock, so the two paths hand lists over one at a time, in index order.
        reporter.assignments(assignments);
    }
}

/// Long-polls the configuration server for assignment changes until the caller drops the
/// future. Returns only if the server does not offer the call (an older version): heartbeats
/// then remain the only path.
pub async fn follow(identity: &Identity, reporter: &impl Reporter, latest: &Latest) {
    let mut digest = Vec::new();
    let mut backoff = Duration::from_secs(1);
    loop {
        let channel =
            match tls::mtls_connect_any(identity, &identity.info.cs_addresses, Role::ConfigServer)
                .await
            {
                Ok((_, channel)) => channel,
                Err(_) => {
                    // The heartbeat loop reports connection trouble; just try again later.
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
                    tracing::debug!(
                        "configuration server has no AwaitAssignments: heartbeats only"
                    );
                    return;
                }
                Err(status) => {
                    tracing::debug!("waiting for assignments: {}", status.message());
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
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
    fn a_late_older_list_is_ignored_once_and_a_real_step_back_is_followed() {
        let (latest, seen) = (Latest::default(), Lists::default());
        latest.offer(5, list(1), &seen);
        latest.offer(7, list(2), &seen); // the long-poll saw a protect
        latest.offer(6, list(1), &seen); // a heartbeat reply from before it: ignored
        latest.offer(7, list(2), &seen); // same index: the same list
        latest.offer(3, list(0), &seen); // the log went back...
        latest.offer(3, list(0), &seen); // ...and stays there: followed
        latest.offer(4, list(4), &seen);
        assert_eq!(*seen.0.lock().unwrap(), vec![1, 2, 2, 0, 4]);
    }
}
