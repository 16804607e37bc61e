//! Exit-code policy: a pure function from how a worker ended and which
//! attempt it was to what happens to the message. No I/O lives here.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// sysexits.h `EX_DATAERR`: the message itself is bad; dead-letter at once.
pub const EX_DATAERR: i32 = 65;

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The worker exited with this status.
    Exit(i32),
    /// The worker was killed by this signal (not by us).
    Signal(i32),
    /// The worker ran past its `timeout` and was killed.
    Timeout,
    /// The worker could not be started (missing, not executable, ...).
    SpawnFailed,
    /// The body exceeds `max_body_bytes`; no worker was started.
    TooLarge,
    /// A quorum queue returned the delivery nearly as often as its
    /// `delivery-limit` allows (`x-delivery-count`, see
    /// [`redelivered_too_often`]): runs cut short (a message that kills the
    /// supervisor, say) or deliveries handed back. No worker was started.
    Redelivered,
    /// The supervisor lost its broker connection while handling this
    /// message `max_connection_losses` times in a row: a message that takes
    /// the connection down. No worker was started.
    ConnectionLosses,
    /// The supervisor stopped the worker (shutdown grace expired, or the
    /// connection was lost): not the message's fault.
    Interrupted,
}

impl Outcome {
    /// The label used in the `x-amqp-exec-exit` header and in logs: the exit
    /// code, the signal name, or "timeout", "spawn", "too-large",
    /// "redelivered", "connection-losses", "interrupted".
    pub fn label(&self) -> String {
        match self {
            Outcome::Exit(c) => c.to_string(),
            Outcome::Signal(s) => signal_name(*s),
            Outcome::Timeout => "timeout".into(),
            Outcome::SpawnFailed => "spawn".into(),
            Outcome::TooLarge => "too-large".into(),
            Outcome::Redelivered => "redelivered".into(),
            Outcome::ConnectionLosses => "connection-losses".into(),
            Outcome::Interrupted => "interrupted".into(),
        }
    }
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// What a queue's `[queue.exit_codes]` table may map an exit code to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Ack,
    Retry,
    DeadLetter,
    Requeue,
    Drop,
}

/// The per-queue settings the policy reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub max_attempts: u32,
    /// Retry delays; the last one repeats.
    pub backoff: Vec<Duration>,
    pub exit_codes: BTreeMap<i32, Action>,
}

/// What to do with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Success: ack.
    Ack,
    /// Ack and log: the message is deliberately discarded.
    Drop,
    /// Put it back at once without counting an attempt.
    Requeue,
    /// Republish to the retry queue for `delay`; the next run is `next_attempt`.
    Retry { delay: Duration, next_attempt: u32 },
    /// Republish to `<queue>.dead`.
    DeadLetter,
}

/// Decides the fate of a message whose `attempt`-th run ended with `outcome`.
pub fn decide(outcome: Outcome, attempt: u32, policy: &Policy) -> Decision {
    let action = match outcome {
        Outcome::Exit(code) => policy.exit_codes.get(&code).copied().unwrap_or(match code {
            0 => Action::Ack,
            EX_DATAERR => Action::DeadLetter,
            _ => Action::Retry,
        }),
        Outcome::Signal(_) | Outcome::Timeout => Action::Retry,
        Outcome::TooLarge | Outcome::Redelivered | Outcome::ConnectionLosses => Action::DeadLetter,
        Outcome::SpawnFailed | Outcome::Interrupted => Action::Requeue,
    };
    match action {
        Action::Ack => Decision::Ack,
        Action::Drop => Decision::Drop,
        Action::Requeue => Decision::Requeue,
        Action::DeadLetter => Decision::DeadLetter,
        Action::Retry if attempt >= policy.max_attempts => Decision::DeadLetter,
        Action::Retry => Decision::Retry {
            delay: backoff_delay(&policy.backoff, attempt),
            next_attempt: attempt.saturating_add(1),
        },
    }
}

/// RabbitMQ 4's default `delivery-limit` of quorum queues: past it, the
/// broker dead-letters the message (to `<queue>.dead`, as amqp-exec declares
/// work queues).
pub const DEFAULT_DELIVERY_LIMIT: i64 = 20;

/// Whether a quorum queue's count of returns (`x-delivery-count`) says the
/// delivery keeps coming back without a run finishing; then it is
/// dead-lettered without running ([`Outcome::Redelivered`]). A run that
/// fails is counted by `max_attempts`; this catches what never gets that far.
/// It fires two returns before `delivery_limit` (the queue's
/// `x-delivery-limit`, else RabbitMQ 4's default), so that amqp-exec, not
/// the broker, dead-letters it, with its headers. A negative limit means
/// unlimited, as RabbitMQ 4 reads it: it never fires.
pub fn redelivered_too_often(delivery_count: Option<i64>, delivery_limit: Option<i64>) -> bool {
    let limit = delivery_limit.unwrap_or(DEFAULT_DELIVERY_LIMIT);
    limit >= 0 && delivery_count.is_some_and(|n| n >= (limit - 2).max(1))
}

/// The delay after the `attempt`-th run failed: `backoff[attempt - 1]`,
/// the last entry repeating.
pub fn backoff_delay(backoff: &[Duration], attempt: u32) -> Duration {
    let i = (attempt.max(1) - 1) as usize;
    backoff
        .get(i)
        .or(backoff.last())
        .copied()
        .unwrap_or(Duration::from_secs(1))
}

/// The attempt number of a delivery: our own `x-amqp-exec-attempt` header
/// (absent on a first delivery), plus the quorum queue's `x-delivery-count`
/// so that a message that keeps killing the run is not retried forever.
pub fn attempt_number(own_header: Option<i64>, delivery_count: Option<i64>) -> u32 {
    let own = own_header.unwrap_or(1).clamp(1, i64::from(u32::MAX / 2));
    let redeliveries = delivery_count
        .unwrap_or(0)
        .clamp(0, i64::from(u32::MAX / 2));
    (own + redeliveries) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            max_attempts: 3,
            backoff: vec![Duration::from_secs(1), Duration::from_secs(10)],
            exit_codes: BTreeMap::new(),
        }
    }

    #[test]
    fn defaults() {
        let p = policy();
        assert_eq!(decide(Outcome::Exit(0), 1, &p), Decision::Ack);
        assert_eq!(decide(Outcome::Exit(65), 1, &p), Decision::DeadLetter);
        assert_eq!(
            decide(Outcome::Exit(75), 1, &p),
            Decision::Retry {
                delay: Duration::from_secs(1),
                next_attempt: 2
            }
        );
        assert_eq!(
            decide(Outcome::Exit(1), 2, &p),
            Decision::Retry {
                delay: Duration::from_secs(10),
                next_attempt: 3
            }
        );
        assert_eq!(decide(Outcome::Exit(1), 3, &p), Decision::DeadLetter);
        assert_eq!(decide(Outcome::Exit(75), 3, &p), Decision::DeadLetter);
        assert!(matches!(
            decide(Outcome::Signal(9), 1, &p),
            Decision::Retry { .. }
        ));
        assert_eq!(decide(Outcome::Signal(9), 3, &p), Decision::DeadLetter);
        assert!(matches!(
            decide(Outcome::Timeout, 2, &p),
            Decision::Retry { .. }
        ));
        assert_eq!(decide(Outcome::Timeout, 3, &p), Decision::DeadLetter);
        assert_eq!(decide(Outcome::TooLarge, 1, &p), Decision::DeadLetter);
        assert_eq!(decide(Outcome::Redelivered, 4, &p), Decision::DeadLetter);
        assert_eq!(decide(Outcome::SpawnFailed, 1, &p), Decision::Requeue);
        assert_eq!(decide(Outcome::SpawnFailed, 99, &p), Decision::Requeue);
        assert_eq!(decide(Outcome::Interrupted, 3, &p), Decision::Requeue);
    }

    #[test]
    fn mappings_override_defaults() {
        let mut p = policy();
        p.exit_codes.insert(0, Action::DeadLetter);
        p.exit_codes.insert(3, Action::Ack);
        p.exit_codes.insert(4, Action::Drop);
        p.exit_codes.insert(5, Action::Requeue);
        p.exit_codes.insert(65, Action::Retry);
        p.exit_codes.insert(75, Action::DeadLetter);
        assert_eq!(decide(Outcome::Exit(0), 1, &p), Decision::DeadLetter);
        assert_eq!(decide(Outcome::Exit(3), 1, &p), Decision::Ack);
        assert_eq!(decide(Outcome::Exit(4), 1, &p), Decision::Drop);
        assert_eq!(decide(Outcome::Exit(5), 3, &p), Decision::Requeue);
        assert!(matches!(
            decide(Outcome::Exit(65), 1, &p),
            Decision::Retry { .. }
        ));
        assert_eq!(decide(Outcome::Exit(65), 3, &p), Decision::DeadLetter);
        assert_eq!(decide(Outcome::Exit(75), 1, &p), Decision::DeadLetter);
    }

    #[test]
    fn backoff_repeats_last() {
        let b = [Duration::from_secs(1), Duration::from_secs(5)];
        assert_eq!(backoff_delay(&b, 1), Duration::from_secs(1));
        assert_eq!(backoff_delay(&b, 2), Duration::from_secs(5));
        assert_eq!(backoff_delay(&b, 9), Duration::from_secs(5));
        assert_eq!(backoff_delay(&b, 0), Duration::from_secs(1));
    }

    #[test]
    fn a_delivery_returned_too_often_is_not_run() {
        assert!(!redelivered_too_often(None, None));
        assert!(!redelivered_too_often(Some(17), None));
        assert!(redelivered_too_often(Some(18), None));
        assert!(redelivered_too_often(Some(i64::MAX), None));
        assert!(!redelivered_too_often(Some(97), Some(100)));
        assert!(redelivered_too_often(Some(98), Some(100)));
        // A limit of 1 or 2 leaves no room for the margin: the first return.
        assert!(!redelivered_too_often(Some(0), Some(2)));
        assert!(redelivered_too_often(Some(1), Some(1)));
        // Negative: unlimited.
        assert!(!redelivered_too_often(Some(1), Some(-1)));
        assert!(!redelivered_too_often(Some(i64::MAX), Some(-5)));
    }

    #[test]
    fn attempts() {
        assert_eq!(attempt_number(None, None), 1);
        assert_eq!(attempt_number(Some(3), None), 3);
        assert_eq!(attempt_number(Some(2), Some(2)), 4);
        assert_eq!(attempt_number(None, Some(1)), 2);
        assert_eq!(attempt_number(Some(-5), Some(-1)), 1);
        assert_eq!(attempt_number(Some(i64::MAX), Some(i64::MAX)), u32::MAX - 1);
    }

    #[test]
    fn labels() {
        assert_eq!(Outcome::Exit(3).label(), "3");
        assert_eq!(Outcome::Signal(9).label(), "SIGKILL");
        assert_eq!(Outcome::Timeout.label(), "timeout");
        assert_eq!(Outcome::SpawnFailed.label(), "spawn");
        assert_eq!(Outcome::TooLarge.label(), "too-large");
        assert_eq!(Outcome::Redelivered.label(), "redelivered");
        assert_eq!(Outcome::ConnectionLosses.label(), "connection-losses");
    }
}
