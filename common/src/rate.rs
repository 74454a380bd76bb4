//! A rate over a sliding window, from a cumulative counter sampled when the rate is asked for
//! (heartbeats and reports do it every few seconds). Used for ETAs and drain forecasts, which
//! measure from when the count started to grow ([`Rate::while_busy`]): a drain that began
//! three seconds ago, averaged with the twelve idle seconds before it, read as a fifth of its
//! speed, and a burst's ETA as five times too long.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Rate {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
    /// When the count last grew (or was first sampled).
    last_growth: Option<Instant>,
    /// Whether the time before the count started to grow is left out (`while_busy`).
    busy_only: bool,
}

impl Rate {
    /// The average over the window: for a workload's rate of change, idle time included.
    pub fn new(window: Duration) -> Rate {
        Rate {
            window,
            samples: VecDeque::new(),
            last_growth: None,
            busy_only: false,
        }
    }

    /// The rate since the count started to grow, within the window: for how fast something
    /// drains, which matters while it does (pauses after the start still count).
    pub fn while_busy(window: Duration) -> Rate {
        Rate {
            busy_only: true,
            ..Rate::new(window)
        }
    }

    /// How long the count had not grown as of the last sample: a rate over a window goes on
    /// showing the window's average for as long as the window after the count stops.
    pub fn unchanged_for(&self) -> Duration {
        match (self.samples.back(), self.last_growth) {
            (Some(&(at, _)), Some(grew)) => at.saturating_duration_since(grew),
            _ => Duration::ZERO,
        }
    }

    /// Records `total` (a cumulative count) now; returns units per second over the window, 0
    /// until there is half a second of history.
    pub fn sample(&mut self, total: u64) -> f64 {
        self.sample_at(Instant::now(), total)
    }

    fn sample_at(&mut self, now: Instant, total: u64) -> f64 {
        if self.samples.back().is_none_or(|&(_, last)| total > last) {
            self.last_growth = Some(now);
        }
        self.samples.push_back((now, total));
        while self.samples.len() > 2 && now - self.samples[1].0 >= self.window {
            self.samples.pop_front();
        }
        // The growth began after the last sample that still had the first count.
        while self.busy_only && self.samples.len() > 2 && self.samples[0].1 == self.samples[1].1 {
            self.samples.pop_front();
        }
        let (t0, first) = self.samples[0];
        let secs = (now - t0).as_secs_f64();
        if secs < 0.5 {
            return 0.0;
        }
        total.saturating_sub(first) as f64 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_follows_the_recent_window() {
        let mut r = Rate::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.sample_at(t, 0), 0.0);
        assert_eq!(r.sample_at(t + Duration::from_secs(5), 500), 100.0);
        // Old samples fall out of the window: only the last ~10 s count.
        r.sample_at(t + Duration::from_secs(20), 500);
        assert_eq!(r.sample_at(t + Duration::from_secs(30), 1500), 100.0);
    }

    #[test]
    fn a_busy_rate_starts_when_the_count_starts_to_grow() {
        let t = Instant::now();
        let at = |s: f64| t + Duration::from_secs_f64(s);
        let mut average = Rate::new(Duration::from_secs(15));
        let mut busy = Rate::while_busy(Duration::from_secs(15));
        for r in [&mut average, &mut busy] {
            // Twelve idle seconds, then 100 units a second.
            r.sample_at(at(0.0), 1000);
            r.sample_at(at(6.0), 1000);
            r.sample_at(at(12.0), 1000);
            r.sample_at(at(13.0), 1100);
        }
        assert_eq!(average.sample_at(at(15.0), 1300), 20.0);
        assert_eq!(busy.sample_at(at(15.0), 1300), 100.0);
        // A pause once it is busy counts.
        assert_eq!(busy.sample_at(at(17.0), 1300), 60.0);
        assert_eq!(busy.sample_at(at(18.0), 1600), 100.0);
        // Nothing grew: no rate.
        let mut idle = Rate::while_busy(Duration::from_secs(15));
        idle.sample_at(at(0.0), 5);
        idle.sample_at(at(1.0), 5);
        assert_eq!(idle.sample_at(at(2.0), 5), 0.0);
    }

    #[test]
    fn it_says_how_long_the_count_has_stood_still() {
        let mut r = Rate::new(Duration::from_secs(15));
        let t = Instant::now();
        r.sample_at(t, 100);
        assert_eq!(r.unchanged_for(), Duration::ZERO);
        r.sample_at(t + Duration::from_secs(2), 300);
        r.sample_at(t + Duration::from_secs(4), 300);
        r.sample_at(t + Duration::from_secs(9), 300);
        assert_eq!(r.unchanged_for(), Duration::from_secs(7));
        // The window's average still shows the earlier growth.
        assert!(r.sample_at(t + Duration::from_secs(10), 300) > 0.0);
        r.sample_at(t + Duration::from_secs(11), 301);
        assert_eq!(r.unchanged_for(), Duration::ZERO);
    }
}
