//! Worker slots: the global `max_workers` cap shared by every queue, and the
//! per-queue `concurrency` semaphores, kept by queue name across reloads so
//! that a queue removed and added again, or changed, never runs more
//! workers than its limit while its old jobs finish.
//!
//! A consumer takes its global slot before it takes a delivery off its
//! stream, so that a delivery does not wait unacked for a slot. An idle
//! consumer holding a slot gives it up as soon as another one waits
//! ([`GlobalSlots::contended`]), and then waits for its delivery without
//! one: a queue with nothing to do never starves the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The `max_workers` slots.
pub struct GlobalSlots {
    sem: Arc<Semaphore>,
    /// `max_workers`.
    max: Option<usize>,
    waiting: AtomicUsize,
    wake: Notify,
}

impl GlobalSlots {
    /// `max` slots, or no cap.
    pub fn new(max: Option<usize>) -> GlobalSlots {
        GlobalSlots {
            sem: Arc::new(Semaphore::new(max.unwrap_or(Semaphore::MAX_PERMITS))),
            max,
            waiting: AtomicUsize::new(0),
            wake: Notify::new(),
        }
    }

    /// The slots as the metrics page reads them.
    pub fn metrics_view(&self) -> crate::metrics::WorkerSlots {
        crate::metrics::WorkerSlots {
            free: self.sem.clone(),
            limit: self.max,
        }
    }

    /// Whether `max_workers` is set.
    pub fn capped(&self) -> bool {
        self.max.is_some()
    }

    /// Waits for a slot, in turn.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return p;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_waiters();
        let p = self.sem.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        p.expect("the global semaphore is never closed")
    }

    /// Resolves while another consumer waits for a slot.
    pub async fn contended(&self) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.waiting.load(Ordering::SeqCst) > 0 {
                return;
            }
            woken.await;
        }
    }
}

/// The `concurrency` semaphores of the queues, by name.
#[derive(Default)]
pub struct QueueSlots {
    by_name: Mutex<HashMap<String, (Arc<Semaphore>, usize)>>,
}

impl QueueSlots {
    /// The semaphore of queue `name`, sized for `concurrency`: the one its
    /// earlier configurations used, resized, so that jobs still running
    /// from before a reload count against the new limit.
    pub fn for_queue(&self, name: &str, concurrency: usize) -> Arc<Semaphore> {
        let mut map = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(name) {
            Some((sem, was)) => {
                resize(sem, *was, concurrency);
                *was = concurrency;
                sem.clone()
            }
            None => {
                let sem = Arc::new(Semaphore::new(concurrency));
                map.insert(name.to_owned(), (sem.clone(), concurrency));
                sem
            }
        }
    }
}

/// Resizes a semaphore of `was` permits to `now`. Of fewer permits, the
/// free ones are taken at once, the rest as running jobs give theirs back,
/// ahead of the consumer (the semaphore serves waiters in turn): the lower
/// limit holds from the reload on, and the consumer gets a slot as soon as
/// the running jobs are below it.
fn resize(slots: &Arc<Semaphore>, was: usize, now: usize) {
    if now > was {
        slots.add_permits(now - was);
    } else if now < was {
        let surplus = was - now;
        let taken_now = slots.forget_permits(surplus);
        let rest = surplus - taken_now;
        if rest > 0 {
            let slots = slots.clone();
            // At most 65535 (the highest concurrency).
            let rest = u32::try_from(rest).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(rest).await {
                    p.forget();
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_queue_keeps_its_semaphore_across_configurations() {
        let slots = QueueSlots::default();
        let a = slots.for_queue("a", 2);
        let held = a.clone().acquire_many_owned(2).await.unwrap();
        // Removed and added again: the same semaphore, still full.
        let again = slots.for_queue("a", 2);
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(again.available_permits(), 0);
        drop(held);
        assert_eq!(again.available_permits(), 2);
    }

    #[tokio::test]
    async fn lowering_concurrency_takes_effect_as_jobs_finish() {
        let slots = QueueSlots::default();
        let sem = slots.for_queue("a", 4);
        let mut running: Vec<_> = (0..4)
            .map(|_| sem.clone().try_acquire_owned().unwrap())
            .collect();
        slots.for_queue("a", 2);
        tokio::task::yield_now().await;
        // A consumer waiting meanwhile does not get ahead of the surplus.
        let consumer = tokio::spawn({
            let sem = sem.clone();
            async move { sem.acquire_owned().await.unwrap() }
        });
        // Two of the four running jobs end: their slots are the surplus.
        running.pop();
        running.pop();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(sem.available_permits(), 0);
        assert!(!consumer.is_finished());
        // The third frees a slot for the consumer.
        running.pop();
        let got = tokio::time::timeout(Duration::from_secs(5), consumer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sem.available_permits(), 0);
        drop(got);
        // Raising it again adds permits.
        slots.for_queue("a", 3);
        assert_eq!(sem.available_permits(), 2);
    }

    #[tokio::test]
    async fn free_surplus_is_taken_at_once() {
        let slots = QueueSlots::default();
        let sem = slots.for_queue("a", 5);
        slots.for_queue("a", 1);
        assert_eq!(sem.available_permits(), 1);
    }

    #[tokio::test]
    async fn contention_is_seen_by_the_holder() {
        let g = Arc::new(GlobalSlots::new(Some(1)));
        let held = g.acquire().await;
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.acquire().await });
        tokio::time::timeout(Duration::from_secs(5), g.contended())
            .await
            .expect("contention is seen");
        drop(held);
        let _slot = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter gets the slot")
            .unwrap();
        assert!(!GlobalSlots::new(None).capped());
    }
}
