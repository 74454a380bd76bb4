//! Protections of the unauthenticated bootstrap service: single-use expiring nonces, and a
//! per-source limit on failed registration attempts so the passphrase cannot be guessed online
//! and a flood of failures cannot flood the Raft log with audit entries.
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A challenge nonce is valid this long.
pub const NONCE_TTL: Duration = Duration::from_secs(60);
/// At most this many outstanding nonces; the oldest are dropped first.
const MAX_NONCES: usize = 10_000;
/// Failed attempts allowed per source within `FAILURE_WINDOW` before refusing it.
pub const MAX_FAILURES: usize = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct NonceStore {
    inner: Mutex<VecDeque<(Vec<u8>, Instant)>>,
}

impl NonceStore {
    pub fn issue(&self) -> Vec<u8> {
        let nonce = lifeboat_common::passphrase::nonce();
        if let Ok(mut q) = self.inner.lock() {
            let now = Instant::now();
            while q
                .front()
                .is_some_and(|(_, t)| now.duration_since(*t) > NONCE_TTL)
                || q.len() >= MAX_NONCES
            {
                q.pop_front();
            }
            q.push_back((nonce.clone(), now));
        }
        nonce
    }

    /// True once per issued, unexpired nonce.
    pub fn consume(&self, nonce: &[u8]) -> bool {
        let Ok(mut q) = self.inner.lock() else {
            return false;
        };
        let now = Instant::now();
        match q.iter().position(|(n, _)| n == nonce) {
            Some(i) => q
                .remove(i)
                .is_some_and(|(_, issued)| now.duration_since(issued) <= NONCE_TTL),
            None => false,
        }
    }
}

#[derive(Default)]
pub struct FailureLimiter {
    inner: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

/// Verdict for a source about to attempt a registration.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Refused; `first` is true for the first refusal of this window (worth an audit entry).
    Limited {
        retry_after: Duration,
        first: bool,
    },
}

impl FailureLimiter {
    pub fn check(&self, source: IpAddr) -> Admission {
        let Ok(mut map) = self.inner.lock() else {
            return Admission::Allowed;
        };
        let now = Instant::now();
        let Some(failures) = map.get_mut(&source) else {
            return Admission::Allowed;
        };
        while failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > FAILURE_WINDOW)
        {
            failures.pop_front();
        }
        if failures.len() < MAX_FAILURES {
            return Admission::Allowed;
        }
        let oldest = failures.front().copied().unwrap_or(now);
        let retry_after = FAILURE_WINDOW.saturating_sub(now.duration_since(oldest));
        // Count the refused attempt too, capped, to learn whether this is the first refusal.
        let first = failures.len() == MAX_FAILURES;
        if first {
            failures.push_back(now);
        }
        Admission::Limited { retry_after, first }
    }

    pub fn record_failure(&self, source: IpAddr) {
        if let Ok(mut map) = self.inner.lock() {
            if map.len() > 100_000 {
                map.clear(); // bounded memory under a distributed flood
            }
            map.entry(source).or_default().push_back(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_single_use() {
        let store = NonceStore::default();
        let n = store.issue();
        assert!(store.consume(&n));
        assert!(!store.consume(&n));
        assert!(!store.consume(b"never issued"));
    }

    #[test]
    fn limits_after_repeated_failures_per_source() {
        let limiter = FailureLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert_eq!(limiter.check(a), Admission::Allowed);
            limiter.record_failure(a);
        }
        assert!(matches!(
            limiter.check(a),
            Admission::Limited { first: true, .. }
        ));
        assert!(matches!(
            limiter.check(a),
            Admission::Limited { first: false, .. }
        ));
        assert_eq!(limiter.check(b), Admission::Allowed);
    }
}
