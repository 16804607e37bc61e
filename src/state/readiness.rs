//! Readiness: what systemd is told. The service is ready once every queue
//! has either started consuming or said in the log what it waits for.

use crate::systemd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// See the module's doc.
pub struct Readiness {
    ready: AtomicUsize,
    /// READY=1 was sent: reloads may say RELOADING=1.
    ready_sent: AtomicBool,
    /// Of those, queues that were not consuming when they counted.
    waiting: AtomicUsize,
    queue_count: usize,
}

impl Readiness {
    pub fn new(queue_count: usize) -> Readiness {
        Readiness {
            ready: AtomicUsize::new(0),
            ready_sent: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            queue_count,
        }
    }

    /// A queue is consuming, or else (`consuming` false) waiting to try
    /// again: its command is missing, or its channel failed. The last one
    /// makes the service ready.
    pub fn queue_ready(&self, consuming: bool) {
        if !consuming {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        }
        if self.ready.fetch_add(1, Ordering::SeqCst) + 1 == self.queue_count {
            systemd::notify_ready(self.waiting.load(Ordering::SeqCst));
            self.ready_sent.store(true, Ordering::SeqCst);
        }
    }

    /// Whether READY=1 was sent.
    pub fn ready_sent(&self) -> bool {
        self.ready_sent.load(Ordering::SeqCst)
    }
}
