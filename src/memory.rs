//! What this instance remembers of messages across their deliveries:
//!
//! - the outcomes of runs that could not be settled because their republish
//!   failed, so that the next delivery of the message is settled with the
//!   known outcome instead of running the worker again;
//! - the messages being handled at each connection loss, so that one that
//!   is there at several losses in a row (a message that takes the
//!   connection down) is dead-lettered without running.
//!
//! Messages are known by [`MessageKey`]: their queue and `message_id`, or a
//! digest of the body and properties when they have none. The memory is
//! bounded and local to the process: another instance sharing the queue does
//! not see it.

use crate::settlement::Recorded;
use lapin::BasicProperties;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

/// Most recorded outcomes kept; the oldest go first.
pub const MAX_RECORDED: usize = 10_000;

/// A message, as far as this instance can tell it from another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageKey {
    queue: Arc<str>,
    id: Id,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Id {
    MessageId(String),
    /// A digest of the body and properties (a fixed-key SipHash, the same
    /// in every run).
    Digest(u64),
}

impl MessageKey {
    pub fn of(queue: &Arc<str>, props: &BasicProperties, body: &[u8]) -> MessageKey {
        let id = match props.message_id().as_ref().map(|s| s.as_str()) {
            Some(id) if !id.is_empty() => Id::MessageId(id.to_owned()),
            _ => {
                let mut h = DefaultHasher::new();
                body.hash(&mut h);
                props
                    .correlation_id()
                    .as_ref()
                    .map(|s| s.as_str())
                    .hash(&mut h);
                props.timestamp().hash(&mut h);
                Id::Digest(h.finish())
            }
        };
        MessageKey {
            queue: queue.clone(),
            id,
        }
    }
}

/// The memory itself; see the module's doc.
#[derive(Default)]
pub struct Memory {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    recorded: HashMap<MessageKey, Recorded>,
    order: VecDeque<MessageKey>,
    /// Messages being handled now: how many deliveries of each, and the
    /// connection the latest came on.
    in_flight: HashMap<MessageKey, (u32, u64)>,
    /// The connection now, counted by losses.
    connection: u64,
    /// Connection losses in a row at which each message was being handled.
    losses: HashMap<MessageKey, u32>,
}

impl Memory {
    /// The outcome recorded for `key`, if any.
    pub fn recorded(&self, key: &MessageKey) -> Option<Recorded> {
        self.lock().recorded.get(key).cloned()
    }

    /// Records the outcome of a run of `key` whose settlement failed.
    pub fn record(&self, key: MessageKey, outcome: Recorded) {
        let mut inner = self.lock();
        if inner.recorded.insert(key.clone(), outcome).is_none() {
            inner.order.push_back(key);
        }
        while inner.recorded.len() > MAX_RECORDED {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.recorded.remove(&old);
                }
                None => break,
            }
        }
    }

    /// Connection losses in a row at which `key` was being handled.
    pub fn losses(&self, key: &MessageKey) -> u32 {
        self.lock().losses.get(key).copied().unwrap_or(0)
    }

    /// A job of `key` starts: it is being handled until [`Memory::ended`].
    /// What is known of it: its recorded outcome, and its connection
    /// losses in a row. One lock for the three.
    pub fn begin(&self, key: &MessageKey) -> (Option<Recorded>, u32) {
        let mut inner = self.lock();
        let connection = inner.connection;
        let entry = inner.in_flight.entry(key.clone()).or_default();
        entry.0 += 1;
        entry.1 = connection;
        let recorded = inner.recorded.get(key).cloned();
        let losses = inner.losses.get(key).copied().unwrap_or(0);
        (recorded, losses)
    }

    /// The job of `key` has ended; `settled` if its message was settled
    /// for good (then its recorded outcome and losses are forgotten).
    pub fn ended(&self, key: &MessageKey, settled: bool) {
        let mut inner = self.lock();
        if let Some((n, _)) = inner.in_flight.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                inner.in_flight.remove(key);
            }
        }
        if settled {
            if inner.recorded.remove(key).is_some() {
                inner.order.retain(|k| k != key);
            }
            inner.losses.remove(key);
        }
    }

    /// The connection was lost: every message being handled that came on
    /// it counts one more loss in a row; the others start over. (A job of
    /// an earlier connection still running is not counted again.)
    pub fn connection_lost(&self) {
        let mut inner = self.lock();
        let connection = inner.connection;
        inner.connection += 1;
        let present: HashSet<MessageKey> = inner
            .in_flight
            .iter()
            .filter(|(_, (_, c))| *c == connection)
            .map(|(k, _)| k.clone())
            .collect();
        let before = std::mem::take(&mut inner.losses);
        inner.losses = present
            .into_iter()
            .map(|k| {
                let n = before.get(&k).copied().unwrap_or(0) + 1;
                (k, n)
            })
            .collect();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Outcome;
    use crate::settlement::Ended;

    fn key(id: &str) -> MessageKey {
        let q: Arc<str> = Arc::from("q");
        MessageKey::of(
            &q,
            &BasicProperties::default().with_message_id(id.into()),
            b"",
        )
    }

    #[test]
    fn keys_use_the_message_id_or_a_stable_digest() {
        let q: Arc<str> = Arc::from("q");
        let plain = BasicProperties::default();
        assert_eq!(
            MessageKey::of(&q, &plain, b"a"),
            MessageKey::of(&q, &plain, b"a")
        );
        assert_ne!(
            MessageKey::of(&q, &plain, b"a"),
            MessageKey::of(&q, &plain, b"b")
        );
        assert_eq!(
            key("x"),
            MessageKey::of(
                &q,
                &BasicProperties::default().with_message_id("x".into()),
                b"other"
            )
        );
        let other: Arc<str> = Arc::from("r");
        assert_ne!(
            key("x"),
            MessageKey::of(
                &other,
                &BasicProperties::default().with_message_id("x".into()),
                b""
            )
        );
    }

    #[test]
    fn losses_count_in_a_row() {
        let m = Memory::default();
        let (a, b) = (key("a"), key("b"));
        m.begin(&a);
        m.begin(&b);
        m.connection_lost();
        m.ended(&a, false);
        m.ended(&b, false);
        assert_eq!((m.losses(&a), m.losses(&b)), (1, 1));
        // Only `a` is back at the next loss.
        m.begin(&a);
        m.connection_lost();
        m.ended(&a, false);
        assert_eq!((m.losses(&a), m.losses(&b)), (2, 0));
        m.begin(&a);
        m.connection_lost();
        assert_eq!(m.losses(&a), 3);
        // Still running on the lost connection: not counted again.
        m.connection_lost();
        assert_eq!(m.losses(&a), 0);
        m.ended(&a, true);
        assert_eq!(m.losses(&a), 0);
    }

    #[test]
    fn recorded_outcomes_are_bounded() {
        let m = Memory::default();
        let r = Recorded {
            attempt: 2,
            ended: Ended::not_run(Outcome::Exit(1), String::new()),
        };
        for i in 0..MAX_RECORDED + 5 {
            m.record(key(&i.to_string()), r.clone());
        }
        assert!(m.recorded(&key("0")).is_none());
        assert!(m.recorded(&key("4")).is_none());
        assert_eq!(m.recorded(&key("5")), Some(r.clone()));
        assert_eq!(
            m.recorded(&key(&(MAX_RECORDED + 4).to_string())),
            Some(r.clone())
        );
        let last = key(&(MAX_RECORDED + 4).to_string());
        assert_eq!(m.begin(&last), (Some(r.clone()), 0));
        m.ended(&last, true);
        assert!(m.recorded(&key(&(MAX_RECORDED + 4).to_string())).is_none());
    }
}
