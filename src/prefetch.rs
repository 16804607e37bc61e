//! Adaptive prefetch: while a queue's recent jobs are short, the broker may
//! send a few deliveries ahead of the free worker slots, so that the next
//! delivery is already here when a job ends instead of a round trip later;
//! as soon as a job runs long, the prefetch goes back to `concurrency`, so
//! that no new delivery waits behind it.
//!
//! The rule (the decision is [`wanted_raised`], pure):
//!
//! - **raise** to `concurrency + extra` ([`extra`]) when at least
//!   [`RECENT`] jobs ran since the last change, the median of the last
//!   [`WINDOW`] jobs is under [`SHORT`], and none of the last [`RECENT`]
//!   took [`LONG`] or more;
//! - **lower** back to `concurrency` when the median reaches [`LONG`], when
//!   one of the last [`RECENT`] jobs took [`LONG`] or more, or as soon as a
//!   running job passes [`LONG`];
//! - between [`SHORT`] and [`LONG`] it stays as it is (hysteresis).
//!
//! Only queues without a `prefetch` key adapt, and neither those with a
//! single active consumer nor those under `max_rate`. [`Adaptive`] holds the
//! recent durations a queue's jobs report and publishes the prefetch its
//! consumer should use.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// How many recent jobs the median is taken over.
pub const WINDOW: usize = 64;
/// How many of the most recent jobs must all be shorter than [`LONG`], and
/// how many jobs must have run since the last change, before a raise.
pub const RECENT: usize = 16;
/// Jobs whose median is under this are short: the prefetch is raised.
pub const SHORT: Duration = Duration::from_millis(50);
/// A job this long, or a median this long, lowers the prefetch.
pub const LONG: Duration = Duration::from_millis(100);

/// How many deliveries a queue at `concurrency` may have ahead of its
/// workers while its jobs are short: half its concurrency, at least two and
/// at most 16. Two rather than one, so that an ack the connection has not
/// yet written (the broker counts it unacked until it arrives) does not
/// leave a short job's successor a round trip away.
pub fn extra(concurrency: usize) -> u16 {
    (concurrency / 2).clamp(2, 16) as u16
}

/// The recent job durations of a queue, in microseconds, oldest first
/// overwritten.
#[derive(Debug, Clone)]
pub struct Recent {
    micros: [u32; WINDOW],
    /// How many slots hold a duration (at most [`WINDOW`]).
    len: usize,
    /// Where the next duration goes.
    next: usize,
    /// Jobs recorded since the prefetch last changed.
    since_change: usize,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            micros: [0; WINDOW],
            len: 0,
            next: 0,
            since_change: 0,
        }
    }
}

impl Recent {
    pub fn push(&mut self, d: Duration) {
        self.micros[self.next] = d.as_micros().min(u128::from(u32::MAX)) as u32;
        self.next = (self.next + 1) % WINDOW;
        self.len = (self.len + 1).min(WINDOW);
        self.since_change = self.since_change.saturating_add(1);
    }

    /// The prefetch changed: a raise waits for [`RECENT`] more jobs.
    pub fn changed(&mut self) {
        self.since_change = 0;
    }

    /// The median of the window (the upper one of an even count).
    pub fn median(&self) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let mut v = self.micros;
        let v = &mut v[..self.len];
        let mid = self.len / 2;
        let (_, m, _) = v.select_nth_unstable(mid);
        Some(Duration::from_micros(u64::from(*m)))
    }

    /// The longest of the last `n` durations.
    pub fn longest_of_last(&self, n: usize) -> Duration {
        let n = n.min(self.len);
        let longest = (1..=n)
            .map(|back| self.micros[(self.next + WINDOW - back) % WINDOW])
            .max()
            .unwrap_or(0);
        Duration::from_micros(u64::from(longest))
    }
}

/// Whether the prefetch should be raised, given the recent durations,
/// whether it is raised now, and whether a running job has passed [`LONG`].
pub fn wanted_raised(recent: &Recent, raised: bool, long_job_running: bool) -> bool {
    if long_job_running || recent.longest_of_last(RECENT) >= LONG {
        return false;
    }
    let Some(median) = recent.median() else {
        return false;
    };
    if median >= LONG {
        false
    } else if median < SHORT {
        raised || recent.since_change >= RECENT
    } else {
        raised
    }
}

/// A queue's adaptive prefetch: the durations its jobs report, and the
/// prefetch its consumer should ask for.
#[derive(Debug)]
pub struct Adaptive {
    low: u16,
    high: u16,
    recent: Mutex<Recent>,
    /// Running jobs that have passed [`LONG`].
    long_running: AtomicUsize,
    wanted: watch::Sender<u16>,
}

impl Adaptive {
    /// Adapts between `low` (the prefetch the queue's settings give) and
    /// `high`; None when there is no room between them.
    pub fn new(low: u16, high: u16) -> Option<Adaptive> {
        (high > low).then(|| Adaptive {
            low,
            high,
            recent: Mutex::new(Recent::default()),
            long_running: AtomicUsize::new(0),
            wanted: watch::Sender::new(low),
        })
    }

    /// The highest prefetch it may ask for.
    pub fn high(&self) -> u16 {
        self.high
    }

    /// Whether the prefetch is raised now.
    pub fn raised(&self) -> bool {
        *self.wanted.borrow() == self.high
    }

    /// The prefetch to ask for, changed by the jobs' reports.
    pub fn subscribe(&self) -> watch::Receiver<u16> {
        self.wanted.subscribe()
    }

    /// A job's worker ran for `d`.
    pub fn job_ended(&self, d: Duration) {
        let mut recent = self.recent.lock().expect("not poisoned");
        recent.push(d);
        self.decide(&mut recent);
    }

    /// A running job has passed [`LONG`]; `long_job_ended` follows when it
    /// ends.
    pub fn long_job_started(&self) {
        self.long_running.fetch_add(1, Ordering::Relaxed);
        let mut recent = self.recent.lock().expect("not poisoned");
        self.decide(&mut recent);
    }

    pub fn long_job_ended(&self) {
        self.long_running.fetch_sub(1, Ordering::Relaxed);
    }

    fn decide(&self, recent: &mut Recent) {
        let raised = self.raised();
        let long = self.long_running.load(Ordering::Relaxed) > 0;
        let want = wanted_raised(recent, raised, long);
        if want != raised {
            recent.changed();
            self.wanted
                .send_replace(if want { self.high } else { self.low });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn with(durations: &[u64]) -> Recent {
        let mut r = Recent::default();
        for &d in durations {
            r.push(ms(d));
        }
        r
    }

    #[test]
    fn extra_is_half_the_concurrency_within_bounds() {
        assert_eq!(extra(1), 2);
        assert_eq!(extra(3), 2);
        assert_eq!(extra(4), 2);
        assert_eq!(extra(6), 3);
        assert_eq!(extra(16), 8);
        assert_eq!(extra(1000), 16);
    }

    #[test]
    fn the_window_keeps_the_last_64() {
        let mut r = with(&[500; 10]);
        for _ in 0..WINDOW {
            r.push(ms(2));
        }
        assert_eq!(r.median(), Some(ms(2)));
        assert_eq!(r.longest_of_last(WINDOW), ms(2));
        r.push(ms(7));
        assert_eq!(r.longest_of_last(1), ms(7));
        assert_eq!(Recent::default().median(), None);
    }

    #[test]
    fn short_jobs_raise_after_enough_of_them() {
        assert!(!wanted_raised(&with(&[2; RECENT - 1]), false, false));
        assert!(wanted_raised(&with(&[2; RECENT]), false, false));
    }

    #[test]
    fn a_long_job_lowers_and_holds_off_the_next_raise() {
        let mut r = with(&[2; 40]);
        assert!(wanted_raised(&r, true, false));
        // Running past LONG: lowered at once.
        assert!(!wanted_raised(&r, true, true));
        r.push(ms(150));
        assert!(!wanted_raised(&r, true, false));
        r.changed();
        for _ in 0..RECENT - 1 {
            r.push(ms(2));
            assert!(!wanted_raised(&r, false, false));
        }
        r.push(ms(2));
        assert!(wanted_raised(&r, false, false));
    }

    #[test]
    fn between_short_and_long_it_stays_as_it_is() {
        let r = with(&[70; 40]);
        assert!(wanted_raised(&r, true, false));
        assert!(!wanted_raised(&r, false, false));
        let r = with(&[99; 40]);
        assert!(wanted_raised(&r, true, false));
    }

    #[test]
    fn a_long_median_lowers() {
        // The last RECENT jobs are short, but the median is long.
        let mut d = vec![120; 40];
        d.extend([40; RECENT]);
        assert!(!wanted_raised(&with(&d), true, false));
    }

    #[test]
    fn adaptive_publishes_its_changes() {
        assert!(Adaptive::new(2, 2).is_none());
        let a = Adaptive::new(1, 2).unwrap();
        let rx = a.subscribe();
        for _ in 0..RECENT {
            a.job_ended(ms(1));
        }
        assert_eq!(*rx.borrow(), 2);
        assert!(a.raised());
        a.long_job_started();
        assert_eq!(*rx.borrow(), 1);
        a.job_ended(ms(300));
        a.long_job_ended();
        for _ in 0..RECENT - 1 {
            a.job_ended(ms(1));
        }
        assert_eq!(*rx.borrow(), 1);
        a.job_ended(ms(1));
        assert_eq!(*rx.borrow(), 2);
    }
}
