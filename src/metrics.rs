//! Counters kept by the supervisor: per-queue job outcomes, running workers,
//! job durations, and connection events. They feed the log summary, the
//! systemd STATUS line and the Prometheus endpoint.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the job-duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Per-queue counters. All updates are relaxed atomics: they are figures, not
/// synchronisation.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub running: AtomicU64,
    /// Jobs whose worker succeeded and whose message was acked.
    pub ok: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub requeued: AtomicU64,
    pub dropped: AtomicU64,
    pub spawn_failures: AtomicU64,
    /// Jobs whose outcome could not be recorded (ack or republish failed); the
    /// broker redelivers them.
    pub unsettled: AtomicU64,
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    duration_count: AtomicU64,
    duration_micros: AtomicU64,
}

impl QueueStats {
    pub fn observe_duration(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Relaxed);
                break;
            }
        }
        self.duration_count.fetch_add(1, Relaxed);
        self.duration_micros
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Cumulative bucket counts, total count and sum in seconds.
    pub fn durations(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Relaxed);
                acc
            })
            .collect();
        (
            cumulative,
            self.duration_count.load(Relaxed),
            self.duration_micros.load(Relaxed) as f64 / 1e6,
        )
    }
}

/// Supervisor-wide counters.
#[derive(Debug, Default)]
pub struct GlobalStats {
    pub reconnects: AtomicU64,
    pub connected: AtomicU64,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Relaxed);
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let s = QueueStats::default();
        s.observe_duration(Duration::from_millis(1));
        s.observe_duration(Duration::from_millis(300));
        s.observe_duration(Duration::from_secs(100));
        let (b, n, sum) = s.durations();
        assert_eq!(b[0], 1);
        assert_eq!(b[6], 2);
        assert_eq!(*b.last().unwrap(), 2);
        assert_eq!(n, 3);
        assert!((sum - 100.301).abs() < 1e-6);
    }
}
