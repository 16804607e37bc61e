//! Shutdown and drain: the stop and interrupt tokens, the running jobs, the
//! limit on settling after an interrupt, and the closing of
//! ended consumers' channels once their jobs have settled.
//!
//! `stop` ends consuming (signals, `--max-jobs`, `--exit-when-idle`);
//! `interrupt` kills running workers (shutdown grace expired, or a second
//! signal).

use crate::runner;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long jobs may still take to settle once their stopped workers are gone.
const SETTLE_AFTER_INTERRUPT: Duration = Duration::from_secs(5);

/// See the module's doc.
pub struct Drain {
    pub stop: CancellationToken,
    pub interrupt: CancellationToken,
    /// Every running job.
    pub tracker: TaskTracker,
    /// When jobs still settling after `interrupt` are given up; see
    /// [`Drain::settle_deadline`].
    settle_deadline: Mutex<Option<Settle>>,
    /// Closes the channels of ended consumers once their jobs have settled;
    /// see [`Drain::close_channel_after`].
    closers: TaskTracker,
    shutdown_grace: Mutex<Duration>,
}

/// The settle limit after `interrupt`: the stopped workers' longest
/// `kill_grace` (then SIGKILL) and pipe drain, plus SETTLE_AFTER_INTERRUPT;
/// or SETTLE_AFTER_INTERRUPT from when the last worker was gone, if sooner.
struct Settle {
    deadline: tokio::time::Instant,
    workers_gone: bool,
}

impl Drain {
    pub fn new(shutdown_grace: Duration) -> Drain {
        Drain {
            stop: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            tracker: TaskTracker::new(),
            settle_deadline: Mutex::new(None),
            closers: TaskTracker::new(),
            shutdown_grace: Mutex::new(shutdown_grace),
        }
    }

    /// How long running workers may finish after SIGTERM.
    pub fn shutdown_grace(&self) -> Duration {
        *self.shutdown_grace.lock().expect("not poisoned")
    }

    pub fn set_shutdown_grace(&self, grace: Duration) {
        *self.shutdown_grace.lock().expect("not poisoned") = grace;
    }

    /// Closes the channel of a consumer that ended, once `jobs` (the jobs
    /// it started, which settle on it) have all ended. Left to its last
    /// clone's drop, lapin would close it in the background, which on
    /// shutdown races the connection's close and is logged as a connection
    /// error. On shutdown the session waits for these closes
    /// ([`Drain::channels_closed`]), then closes the connection.
    pub fn close_channel_after(&self, channel: lapin::Channel, jobs: TaskTracker) {
        jobs.close();
        self.closers.spawn(async move {
            jobs.wait().await;
            if channel.status().connected() {
                let _ = channel.close(200, "consumer stopped".into()).await;
            }
        });
    }

    /// Waits until the channels of ended consumers are closed.
    pub async fn channels_closed(&self) {
        self.closers.close();
        self.closers.wait().await;
    }

    /// When jobs still settling after `interrupt` are given up: one limit
    /// for every wait, so that a later wait does not add to it.
    /// `kill_grace` is the longest of the queues'; `workers` the workers
    /// running now.
    fn settle_deadline(&self, kill_grace: Duration, workers: u64) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let mut settle = self.settle_deadline.lock().expect("not poisoned");
        let s = settle.get_or_insert_with(|| Settle {
            deadline: now + kill_grace + runner::PIPE_DRAIN_LIMIT + SETTLE_AFTER_INTERRUPT,
            workers_gone: false,
        });
        if !s.workers_gone && workers == 0 {
            s.workers_gone = true;
            s.deadline = s.deadline.min(now + SETTLE_AFTER_INTERRUPT);
        }
        s.deadline
    }

    /// Waits for the running jobs. Once they were told to stop (shutdown
    /// grace expired, or a second signal), a job stuck settling (a confirm
    /// that never comes) is given up after a few seconds: its message was
    /// not acked, so the broker requeues it when the connection closes.
    /// `kill_grace` is the longest of the queues'; `workers` counts the
    /// workers running now (processes, not jobs: a job may still be
    /// settling after its worker ended).
    pub async fn wait_for_jobs(&self, kill_grace: Duration, workers: impl Fn() -> u64) {
        self.tracker.close();
        let given_up = async {
            self.interrupt.cancelled().await;
            let passed = tokio::time::Instant::now() >= self.settle_deadline(kill_grace, workers());
            loop {
                let deadline = self.settle_deadline(kill_grace, workers());
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break;
                }
                // The deadline moves closer once the last worker is gone.
                tokio::time::sleep((deadline - now).min(Duration::from_millis(50))).await;
            }
            passed
        };
        tokio::select! {
            _ = self.tracker.wait() => {}
            passed = given_up => if !passed {
                tracing::warn!(
                    "{} job(s) did not settle after being stopped; their messages go back to the queue \
                     when the connection closes",
                    self.tracker.len()
                )
            },
        }
    }
}
