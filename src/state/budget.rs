//! The job budget: `--max-jobs` (jobs claimed and finished; the last one
//! stops the supervisor) and `--exit-when-idle` (deliveries held, and when
//! the last one arrived).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// See the module's doc.
pub struct JobBudget {
    max_jobs: Option<u64>,
    claimed: AtomicU64,
    finished: AtomicU64,
    /// A claim was given back (a job ended without an ack).
    unclaimed: Notify,
    last_delivery: Mutex<Instant>,
    /// Deliveries taken from a consumer and not yet started as a job nor
    /// handed back (waiting for `max_rate` or a `max_workers` slot).
    held: AtomicUsize,
    /// Cancelled when the last job under `--max-jobs` is done.
    stop: CancellationToken,
}

impl JobBudget {
    pub fn new(max_jobs: Option<u64>, stop: CancellationToken) -> JobBudget {
        JobBudget {
            max_jobs,
            claimed: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            unclaimed: Notify::new(),
            last_delivery: Mutex::new(Instant::now()),
            held: AtomicUsize::new(0),
            stop,
        }
    }

    /// Reserves a job under `--max-jobs`; false once the limit is reached.
    pub fn claim_job(&self) -> bool {
        let Some(max) = self.max_jobs else {
            return true;
        };
        if self.claimed.fetch_add(1, Ordering::SeqCst) < max {
            true
        } else {
            self.claimed.fetch_sub(1, Ordering::SeqCst);
            false
        }
    }

    pub fn unclaim_job(&self) {
        if self.max_jobs.is_some() {
            self.claimed.fetch_sub(1, Ordering::SeqCst);
            self.unclaimed.notify_waiters();
        }
    }

    /// Waits until a job can be claimed again under `--max-jobs`: a claimed
    /// job ended without an ack, so its message must still run.
    pub async fn claim_freed(&self) {
        loop {
            let freed = self.unclaimed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self
                .max_jobs
                .is_none_or(|max| self.claimed.load(Ordering::SeqCst) < max)
            {
                return;
            }
            freed.await;
        }
    }

    /// A job ended; `acked` if its delivery was acked (success, drop, retry or
    /// dead letter). Under `--max-jobs`, the last one stops the supervisor.
    pub fn job_finished(&self, acked: bool) {
        let Some(max) = self.max_jobs else { return };
        if acked {
            if self.finished.fetch_add(1, Ordering::SeqCst) + 1 >= max {
                tracing::info!("{max} jobs done (--max-jobs); stopping");
                self.stop.cancel();
            }
        } else {
            self.unclaim_job();
        }
    }

    /// A delivery arrived; it counts as held (keeping `--exit-when-idle`
    /// from stopping) until the returned guard is dropped.
    pub fn delivery_arrived(&self) -> DeliveryInHand<'_> {
        self.held.fetch_add(1, Ordering::SeqCst);
        DeliveryInHand(self)
    }

    /// Deliveries held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// How long since a delivery was last started or handed back.
    pub fn idle_for(&self) -> Duration {
        self.last_delivery.lock().expect("not poisoned").elapsed()
    }
}

/// A delivery the consumer holds, from its arrival until it is started or
/// handed back; see [`JobBudget::delivery_arrived`]. While one is held the
/// supervisor is not idle; when it is dropped, the idle clock starts over.
pub struct DeliveryInHand<'a>(&'a JobBudget);

impl Drop for DeliveryInHand<'_> {
    fn drop(&mut self) {
        // The idle time counts from when the delivery was started or returned.
        *self.0.last_delivery.lock().expect("not poisoned") = Instant::now();
        self.0.held.fetch_sub(1, Ordering::SeqCst);
    }
}
