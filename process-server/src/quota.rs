//! The cache quota and flow control. The process server holds at most `quota` bytes of cache
//! (and never fills its file system past a reserve). Above `SLOW_FROM` of the quota each
//! incoming group is delayed in proportion to how full the cache is, which slows the agents'
//! streams (they keep unacknowledged batches, and their capture queues throttle writes); at
//! the limit a stream is held until the master targets drain the cache. An agent held too
//! long falls back to its dirty map and resyncs later: the writes are never dropped silently.
//! It also keeps the fill and drain rates the configuration server forecasts from.
use lifeboat_common::rate::Rate;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Fraction of the quota from which incoming batches are slowed.
pub const SLOW_FROM: f64 = 0.75;
/// Longest delay added to one incoming group just below the limit.
const MAX_DELAY: Duration = Duration::from_millis(250);
/// Free space always left on the cache file system.
pub const FS_RESERVE: u64 = 256 * 1024 * 1024;
/// Default quota: this share of the cache file system's size.
pub const DEFAULT_SHARE: f64 = 0.8;
/// Rates are measured over this window (short, so a drain that just started counts).
const RATE_WINDOW: Duration = Duration::from_secs(15);

pub struct Quota {
    pub quota_bytes: u64,
    /// Bytes stored into the cache and released from it, since start (compressed, sealed).
    pub stored_total: AtomicU64,
    pub released_total: AtomicU64,
    rates: Mutex<(Rate, Rate)>,
}

/// What the quota says about an incoming group.
#[derive(Debug, PartialEq)]
pub enum Admission {
    Accept,
    /// Accept after this delay (the cache is filling up).
    Slow(Duration),
    /// No room: wait for the cache to drain.
    Full,
}

impl Quota {
    /// `quota_mib` 0 means the default share of the file system.
    pub fn new(dir: &Path, quota_mib: u64) -> Quota {
        let quota_bytes = if quota_mib > 0 {
            quota_mib << 20
        } else {
            let (_, total) = lifeboat_common::facts::space(dir);
            (total as f64 * DEFAULT_SHARE) as u64
        };
        Quota {
            quota_bytes,
            stored_total: AtomicU64::new(0),
            released_total: AtomicU64::new(0),
            // Drained at the pace of a drain that started within the window, not averaged with
            // the idle time before it.
            rates: Mutex::new((Rate::new(RATE_WINDOW), Rate::while_busy(RATE_WINDOW))),
        }
    }

    /// The most the cache may hold when it holds `used` bytes and its file system has `free`
    /// bytes available: the quota, unless the file system (less its reserve) holds less.
    pub fn limit(&self, used: u64, free: u64) -> u64 {
        self.quota_bytes
            .min(used.saturating_add(free.saturating_sub(FS_RESERVE)))
    }

    /// Decides on a group of about `incoming` bytes when the cache holds `used` bytes and its
    /// file system has `free` bytes available.
    pub fn admit(&self, used: u64, incoming: u64, free: u64) -> Admission {
        // An empty cache always takes one group, however small the quota: a batch larger
        // than the quota must not block forever.
        if used == 0 {
            return Admission::Accept;
        }
        if used + incoming > self.limit(used, free) {
            return Admission::Full;
        }
        let fill = used as f64 / self.quota_bytes.max(1) as f64;
        if fill > SLOW_FROM {
            let share = ((fill - SLOW_FROM) / (1.0 - SLOW_FROM)).min(1.0);
            return Admission::Slow(MAX_DELAY.mul_f64(share));
        }
        Admission::Accept
    }

    pub fn fill_percent(&self, used: u64) -> u32 {
        ((used as f64 * 100.0 / self.quota_bytes.max(1) as f64).round() as u64).min(u32::MAX as u64)
            as u32
    }

    /// Samples the counters; returns (fill, drain) in bytes per second over the window.
    pub fn rates(&self) -> (f64, f64) {
        let Ok(mut rates) = self.rates.lock() else {
            return (0.0, 0.0);
        };
        (
            rates.0.sample(self.stored_total.load(Ordering::Relaxed)),
            rates.1.sample(self.released_total.load(Ordering::Relaxed)),
        )
    }
}

/// Bytes the files under `dir` take on disk: what a restarted cache already holds (its
/// segments and spares), room it has rather than room it lacks.
pub fn allocated_under(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_under(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(mib: u64) -> Quota {
        Quota::new(Path::new("/"), mib)
    }

    #[test]
    fn admission_slows_then_holds_as_the_cache_fills() {
        let q = quota(100);
        let mib = 1 << 20;
        let free = 10 << 30;
        assert_eq!(q.admit(0, 500 * mib, free), Admission::Accept);
        assert_eq!(q.admit(10 * mib, mib, free), Admission::Accept);
        match q.admit(90 * mib, mib, free) {
            Admission::Slow(d) => assert!(d > Duration::ZERO && d < MAX_DELAY),
            other => panic!("{other:?}"),
        }
        assert_eq!(q.admit(99 * mib, 2 * mib, free), Admission::Full);
        // A nearly full file system holds the stream whatever the quota says.
        assert_eq!(q.admit(mib, mib, FS_RESERVE + mib / 2), Admission::Full);
        assert_eq!(q.fill_percent(50 * mib), 50);
    }
}
