//! systemd integration: `READY=1` once every queue consumes, a `STATUS=`
//! line with live counters, `WATCHDOG=1` pings while the supervisor is
//! healthy, and `STOPPING=1` on shutdown. Without `NOTIFY_SOCKET` all of it
//! is a no-op.

use crate::metrics::get;
use crate::supervisor::{QueueState, Shared};
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

pub fn notify_ready() {
    tracing::info!("all queues started");
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

/// The `STATUS=` text: per queue "name busy/concurrency busy", then totals.
pub fn status_line(queues: &[Arc<QueueState>]) -> String {
    let mut parts = Vec::with_capacity(queues.len() + 3);
    let (mut ok, mut retried, mut dead) = (0, 0, 0);
    for q in queues {
        parts.push(format!(
            "{} {}/{} busy",
            q.name,
            get(&q.stats.running),
            q.cfg.concurrency
        ));
        ok += get(&q.stats.ok);
        retried += get(&q.stats.retried);
        dead += get(&q.stats.dead);
    }
    parts.push(format!("{ok} ok"));
    parts.push(format!("{retried} retried"));
    parts.push(format!("{dead} dead"));
    parts.join(" · ")
}

/// Sends STATUS every 2 s and WATCHDOG at half the watchdog interval while
/// the supervisor is connected, or disconnected for less than five minutes.
pub fn spawn_status(shared: Arc<Shared>) {
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
            if shared.stop.is_cancelled() && shared.tracker.is_empty() {
                return;
            }
            let connected = shared.stats.connected.load(Ordering::Relaxed) == 1;
            if connected {
                disconnected_since = None;
            } else if disconnected_since.is_none() {
                disconnected_since = Some(Instant::now());
            }
            let healthy = disconnected_since.is_none_or(|t| t.elapsed() < UNHEALTHY_AFTER);
            let status = status_line(&shared.queues());
            if watchdog.is_some() && healthy {
                notify(&[NotifyState::Status(&status), NotifyState::Watchdog]);
            } else {
                notify(&[NotifyState::Status(&status)]);
            }
        }
    });
}
