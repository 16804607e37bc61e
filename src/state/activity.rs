//! What runs now and what happened lately, for the status page: the jobs
//! in progress (registered when a job starts, removed when it ends: one
//! short lock each), and per queue its consumer's state, its outcomes over
//! the last minute, its last failure and its newest dead letters.
//!
//! Message ids come from publishers: they are kept cut to
//! [`MAX_ID_CHARS`]. What is shown of them, and of stderr, is the status
//! page's business.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Longest message id kept, in characters; longer ones are cut.
pub const MAX_ID_CHARS: usize = 200;
/// Longest reason kept for a pause or a dead letter, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Dead letters remembered per queue, newest first.
pub const RECENT_DEAD: usize = 5;
/// The window of the outcome rates, in seconds.
pub const RATE_WINDOW_SECS: u64 = 60;

/// `text` cut to `max` characters, with an ellipsis when it was cut.
pub fn bounded(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

/// One job in progress.
#[derive(Debug)]
pub struct RunningJob {
    pub queue: Arc<str>,
    /// Cut to [`MAX_ID_CHARS`].
    pub message_id: Box<str>,
    pub attempt: u32,
    pub started: Instant,
    pub timeout: Duration,
    /// The worker's pid once it has started; 0 before.
    pub pid: AtomicU32,
    /// The worker has ended and the job is settling with the broker.
    pub settling: AtomicBool,
}

impl RunningJob {
    pub fn new(queue: Arc<str>, message_id: &str, attempt: u32, timeout: Duration) -> RunningJob {
        let message_id = if message_id.len() <= MAX_ID_CHARS {
            Box::from(message_id)
        } else {
            bounded(message_id, MAX_ID_CHARS).into_boxed_str()
        };
        RunningJob {
            queue,
            message_id,
            attempt,
            started: Instant::now(),
            timeout,
            pid: AtomicU32::new(0),
            settling: AtomicBool::new(false),
        }
    }
}

/// The jobs in progress, by an id of their own.
#[derive(Default)]
pub struct Activity {
    next_id: AtomicU64,
    running: Mutex<HashMap<u64, Arc<RunningJob>>>,
}

impl Activity {
    /// Registers `job` until the returned handle is dropped.
    pub fn register(&self, job: RunningJob) -> Registered<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Arc::new(job);
        self.running
            .lock()
            .expect("not poisoned")
            .insert(id, job.clone());
        Registered {
            activity: self,
            id,
            job,
        }
    }

    /// The jobs in progress, oldest first.
    pub fn running(&self) -> Vec<Arc<RunningJob>> {
        let mut jobs: Vec<_> = self
            .running
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        jobs.sort_by_key(|j| j.started);
        jobs
    }
}

/// A registered job; removed from [`Activity`] when dropped.
pub struct Registered<'a> {
    activity: &'a Activity,
    id: u64,
    pub job: Arc<RunningJob>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.activity
            .running
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
    }
}

/// What a queue's consumer is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerState {
    /// Not consuming yet: connecting, or declaring the topology.
    Starting,
    Consuming,
    /// Paused: its command cannot be started, or a job's outcome could not
    /// be recorded with the broker.
    Paused(String),
    /// Its channel failed; it is reopened after a wait.
    ChannelError(String),
}

/// How a settled job ended, as counted in the rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Ok = 0,
    Retried,
    Dead,
    Requeued,
    Dropped,
    /// Its outcome could not be recorded: the broker redelivers it.
    Unsettled,
}

/// The names of [`JobEnd`]s, in their order (as the metrics name them).
pub const JOB_ENDS: [&str; 6] = ["ok", "retried", "dead", "requeued", "dropped", "unsettled"];

/// Counts of job ends per second over the last [`RATE_WINDOW_SECS`]; pure,
/// given the second of each event.
#[derive(Debug, Clone)]
pub struct Rates {
    /// (second, counts) per slot, a ring indexed by second.
    slots: [(u64, [u32; JOB_ENDS.len()]); RATE_WINDOW_SECS as usize + 1],
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            slots: [(u64::MAX, [0; JOB_ENDS.len()]); RATE_WINDOW_SECS as usize + 1],
        }
    }
}

impl Rates {
    pub fn record(&mut self, second: u64, end: JobEnd) {
        let slot = &mut self.slots[(second % self.slots.len() as u64) as usize];
        if slot.0 != second {
            *slot = (second, [0; JOB_ENDS.len()]);
        }
        slot.1[end as usize] = slot.1[end as usize].saturating_add(1);
    }

    /// Jobs per second by end, over the [`RATE_WINDOW_SECS`] whole seconds
    /// before `now` (the second under way is left out).
    pub fn per_second(&self, now: u64) -> [f64; JOB_ENDS.len()] {
        let mut sums = [0u64; JOB_ENDS.len()];
        for (second, counts) in &self.slots {
            if *second < now && now - *second <= RATE_WINDOW_SECS {
                for (sum, n) in sums.iter_mut().zip(counts) {
                    *sum += u64::from(*n);
                }
            }
        }
        sums.map(|n| n as f64 / RATE_WINDOW_SECS as f64)
    }
}

/// A failed run.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: SystemTime,
    pub message_id: String,
    pub attempt: u32,
    /// The exit code, signal name, or "timeout", "spawn", ...
    pub exit: String,
    /// The end of its stderr, or why it could not start.
    pub stderr_tail: Vec<u8>,
}

/// A message sent to the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub at: SystemTime,
    pub message_id: String,
    pub attempt: u32,
    pub why: String,
}

/// A queue's recent activity, as one record; see [`QueueActivity::read`].
#[derive(Debug, Clone)]
pub struct Recent {
    pub state: ConsumerState,
    pub since: SystemTime,
    pub rates: Rates,
    pub last_failure: Option<Failure>,
    /// Newest first, at most [`RECENT_DEAD`].
    pub dead: VecDeque<DeadLetter>,
}

/// One queue's recent activity; kept across reloads like its counters.
pub struct QueueActivity {
    /// The rates' seconds count from here.
    epoch: Instant,
    recent: Mutex<Recent>,
}

impl Default for QueueActivity {
    fn default() -> Self {
        QueueActivity {
            epoch: Instant::now(),
            recent: Mutex::new(Recent {
                state: ConsumerState::Starting,
                since: SystemTime::now(),
                rates: Rates::default(),
                last_failure: None,
                dead: VecDeque::new(),
            }),
        }
    }
}

impl QueueActivity {
    pub fn set_state(&self, state: ConsumerState) {
        let state = match state {
            ConsumerState::Paused(why) => ConsumerState::Paused(bounded(&why, MAX_REASON_CHARS)),
            ConsumerState::ChannelError(why) => {
                ConsumerState::ChannelError(bounded(&why, MAX_REASON_CHARS))
            }
            other => other,
        };
        let mut recent = self.recent.lock().expect("not poisoned");
        if recent.state != state {
            recent.state = state;
            recent.since = SystemTime::now();
        }
    }

    /// A job ended: counted under `end`, with its failure and dead letter
    /// if any.
    pub fn job_ended(&self, end: JobEnd, failure: Option<Failure>, dead: Option<DeadLetter>) {
        let second = self.second();
        let mut recent = self.recent.lock().expect("not poisoned");
        recent.rates.record(second, end);
        if let Some(f) = failure {
            recent.last_failure = Some(f);
        }
        if let Some(d) = dead {
            recent.dead.push_front(d);
            recent.dead.truncate(RECENT_DEAD);
        }
    }

    /// A copy of the record, and the second the rates are read at.
    pub fn read(&self) -> (Recent, u64) {
        let second = self.second();
        (self.recent.lock().expect("not poisoned").clone(), second)
    }

    fn second(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_count_the_last_whole_minute() {
        let mut r = Rates::default();
        for _ in 0..30 {
            r.record(100, JobEnd::Ok);
        }
        r.record(100, JobEnd::Dead);
        r.record(130, JobEnd::Ok);
        // The second under way is not counted yet.
        assert_eq!(r.per_second(100), [0.0; 6]);
        let at_131 = r.per_second(131);
        assert_eq!(at_131[JobEnd::Ok as usize], 31.0 / 60.0);
        assert_eq!(at_131[JobEnd::Dead as usize], 1.0 / 60.0);
        // A minute later, second 100 has left the window.
        assert_eq!(r.per_second(161)[JobEnd::Ok as usize], 1.0 / 60.0);
        assert_eq!(r.per_second(191), [0.0; 6]);
        // A slot reused a lap later starts from zero.
        r.record(100 + 61, JobEnd::Retried);
        let later = r.per_second(162);
        assert_eq!(later[JobEnd::Ok as usize], 1.0 / 60.0);
        assert_eq!(later[JobEnd::Retried as usize], 1.0 / 60.0);
    }

    #[test]
    fn jobs_are_listed_until_their_handle_drops() {
        let a = Activity::default();
        let first = a.register(RunningJob::new("q".into(), "m1", 1, Duration::from_secs(1)));
        let second = a.register(RunningJob::new("q".into(), "m2", 2, Duration::from_secs(1)));
        first.job.pid.store(42, Ordering::Relaxed);
        let ids: Vec<_> = a.running().iter().map(|j| j.message_id.clone()).collect();
        assert_eq!(ids, [Box::from("m1"), Box::from("m2")]);
        assert_eq!(a.running()[0].pid.load(Ordering::Relaxed), 42);
        drop(first);
        assert_eq!(a.running().len(), 1);
        drop(second);
        assert!(a.running().is_empty());
    }

    #[test]
    fn long_ids_and_reasons_are_cut() {
        let long = "é".repeat(MAX_ID_CHARS + 10);
        let job = RunningJob::new("q".into(), &long, 1, Duration::ZERO);
        assert_eq!(job.message_id.chars().count(), MAX_ID_CHARS + 1);
        assert!(job.message_id.ends_with('…'));
        assert_eq!(bounded("short", 10), "short");
        let q = QueueActivity::default();
        q.set_state(ConsumerState::Paused("x".repeat(10_000)));
        let (recent, _) = q.read();
        let ConsumerState::Paused(why) = recent.state else {
            panic!("paused")
        };
        assert_eq!(why.chars().count(), MAX_REASON_CHARS + 1);
    }

    #[test]
    fn the_newest_dead_letters_are_kept() {
        let q = QueueActivity::default();
        for i in 0..(RECENT_DEAD + 3) {
            q.job_ended(
                JobEnd::Dead,
                None,
                Some(DeadLetter {
                    at: SystemTime::now(),
                    message_id: format!("m{i}"),
                    attempt: 1,
                    why: "exit 3".into(),
                }),
            );
        }
        let (recent, _) = q.read();
        assert_eq!(recent.dead.len(), RECENT_DEAD);
        assert_eq!(recent.dead[0].message_id, format!("m{}", RECENT_DEAD + 2));
    }
}
