//! systemd integration: `READY=1` once every queue consumes, a `STATUS=`
//! line with live counters, `WATCHDOG=1` pings while the supervisor is
//! healthy, and `STOPPING=1` on shutdown. Without `NOTIFY_SOCKET` all of it
//! is a no-op.

use crate::metrics::get;
use crate::metrics::{GlobalStats, QueueView, Queues};
use sd_notify::NotifyState;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long the supervisor may stay disconnected and still ping the watchdog.
const UNHEALTHY_AFTER: Duration = Duration::from_secs(300);

fn notify(state: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(state)
    {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// `waiting`: queues not consuming yet (their errors are logged).
pub fn notify_ready(waiting: usize) {
    if waiting == 0 {
        tracing::info!("all queues started");
    } else {
        tracing::warn!(
            "started; {waiting} queue(s) not consuming yet, retrying (see the errors above)"
        );
    }
    notify(&[NotifyState::Ready]);
}

pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

pub fn notify_reloaded() {
    notify(&[NotifyState::Ready]);
}

pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Longest list of queues in the `STATUS=` text. systemd ignores a notify
/// message over 4 KiB whole, so the line is kept well below that.
const STATUS_QUEUES_MAX: usize = 1024;

/// The `STATUS=` text of the running queues.
pub fn status_line(queues: &[QueueView]) -> String {
    let (mut ok, mut retried, mut dead) = (0, 0, 0);
    for q in queues {
        ok += get(&q.stats.ok);
        retried += get(&q.stats.retried);
        dead += get(&q.stats.dead);
    }
    let busy = queues
        .iter()
        .map(|q| (&*q.name, get(&q.stats.running), q.concurrency));
    status_text(busy, [ok, retried, dead])
}

/// Per queue "name busy/concurrency busy", as many as fit in
/// [`STATUS_QUEUES_MAX`] bytes and then "+N more queues", then the ok,
/// retried and dead totals.
fn status_text<'a>(
    busy: impl Iterator<Item = (&'a str, u64, usize)>,
    [ok, retried, dead]: [u64; 3],
) -> String {
    let mut line = String::new();
    let mut hidden = 0;
    for (name, running, concurrency) in busy {
        let part = format!("{name} {running}/{concurrency} busy · ");
        if hidden == 0 && line.len() + part.len() <= STATUS_QUEUES_MAX {
            line.push_str(&part);
        } else {
            hidden += 1;
        }
    }
    if hidden > 0 {
        line.push_str(&format!("+{hidden} more queues · "));
    }
    line.push_str(&format!("{ok} ok · {retried} retried · {dead} dead"));
    line
}

/// Sends STATUS every 2 s and WATCHDOG at half the watchdog interval while
/// the supervisor is connected, or disconnected for less than five minutes.
/// `finished` says when the supervisor has stopped and drained.
pub fn spawn_status(
    queues: Queues,
    global: Arc<GlobalStats>,
    finished: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog
        .map(|w| (w / 2).min(Duration::from_secs(2)))
        .unwrap_or(Duration::from_secs(2));
    tokio::spawn(async move {
        let mut disconnected_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(tick).await;
            if finished() {
                return;
            }
            let connected = global.connected.load(Ordering::Relaxed) == 1;
            if connected {
                disconnected_since = None;
            } else if disconnected_since.is_none() {
                disconnected_since = Some(Instant::now());
            }
            let healthy = disconnected_since.is_none_or(|t| t.elapsed() < UNHEALTHY_AFTER);
            let status = status_line(&queues());
            // Apart: a status line systemd refused must not cost the ping.
            notify(&[NotifyState::Status(&status)]);
            if watchdog.is_some() && healthy {
                notify(&[NotifyState::Watchdog]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_queues_that_fit_and_counts_the_rest() {
        let line = status_text([("a", 1, 2), ("b", 0, 4)].into_iter(), [5, 1, 0]);
        assert_eq!(line, "a 1/2 busy · b 0/4 busy · 5 ok · 1 retried · 0 dead");

        let names: Vec<String> = (0..100).map(|i| format!("{i:0>200}")).collect();
        let line = status_text(names.iter().map(|n| (n.as_str(), 0, 1)), [0; 3]);
        assert!(line.len() < 1200, "{} bytes", line.len());
        assert!(line.contains(" more queues · 0 ok"), "{line}");
        let shown = line.matches(" busy").count();
        assert!(
            line.contains(&format!("+{} more queues", 100 - shown)),
            "{line}"
        );
    }
}
