//! The queues now configured: each one's settings and live state (worker
//! slots, counters, recent activity, pause signal, stop token), and the
//! registry that reloads replace entries of.

use super::activity::QueueActivity;
use crate::config::QueueConfig;
use crate::metrics::QueueStats;
use crate::prefetch::{self, Adaptive};
use crate::slots::QueueSlots;
use std::collections::HashSet;
use std::ffi::OsString;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

/// Variables a worker never inherits from the supervisor.
const WITHHELD_ENV: &[&str] = &[
    "AMQP_URL",
    "AMQP_EXEC_CONFIG",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    // The trace context is each message's own.
    "TRACEPARENT",
    "TRACESTATE",
    "BAGGAGE",
];

/// One configured queue and its live state, kept across reconnects.
pub struct QueueState {
    pub cfg: QueueConfig,
    pub name: Arc<str>,
    /// One permit per worker the queue may run.
    pub slots: Arc<Semaphore>,
    /// The environment every worker of the queue starts with.
    pub base_env: crate::runner::BaseEnv,
    pub stats: Arc<QueueStats>,
    /// Its consumer's state and recent outcomes, for the status page.
    pub activity: Arc<QueueActivity>,
    /// Set (and so signalled) by a job when the queue must pause: its
    /// worker could not be started, or its outcome could not be recorded
    /// with the broker. Why.
    pub pause: watch::Sender<String>,
    /// Ends this queue's consumer (shutdown, or the queue was removed or
    /// changed by a reload). Running jobs are not affected.
    pub stop: CancellationToken,
    /// The state this one replaces after a reload changed the queue: its
    /// consumer runs until this one's settings are accepted by the broker.
    previous: Mutex<Option<Arc<QueueState>>>,
    /// `max_rate`: when the next job may start.
    next_start: tokio::sync::Mutex<tokio::time::Instant>,
    /// The log said once that `replies = "off"` ignores `reply_to`.
    pub replies_off_noted: AtomicBool,
    /// The prefetch adapting to the jobs' durations, when the queue sets no
    /// `prefetch` (see [`crate::prefetch`]).
    pub adaptive: Option<Adaptive>,
}

impl QueueState {
    /// The state of `cfg`, or its new state after a reload changed its
    /// config (`old`): it keeps the counters, and the queue's worker slots
    /// (see [`QueueSlots`]), whose number follows the new concurrency. Its
    /// consumer stops with `stop`.
    pub fn new(
        cfg: QueueConfig,
        registry: &Registry,
        stop: &CancellationToken,
        old: Option<&Arc<QueueState>>,
    ) -> Self {
        QueueState {
            name: Arc::from(cfg.name.as_str()),
            slots: registry.slots.for_queue(&cfg.name, cfg.concurrency),
            base_env: crate::runner::BaseEnv::new(worker_env(&cfg)),
            stats: old.map_or_else(|| registry.new_stats(), |o| o.stats.clone()),
            activity: old.map_or_else(Default::default, |o| o.activity.clone()),
            pause: watch::Sender::new(String::new()),
            stop: stop.child_token(),
            previous: Mutex::new(old.cloned()),
            replies_off_noted: AtomicBool::new(false),
            next_start: tokio::sync::Mutex::new(tokio::time::Instant::now()),
            adaptive: adaptive_prefetch(&cfg),
            cfg,
        }
    }

    /// The state this one replaces, until its settings are accepted.
    pub fn takes_over(&self) -> Option<Arc<QueueState>> {
        self.previous.lock().expect("not poisoned").clone()
    }

    /// Waits for this queue's turn under `max_rate` (shared by its workers).
    pub async fn rate_turn(&self) {
        let Some(rate) = self.cfg.max_rate else {
            return;
        };
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut next = self.next_start.lock().await;
        let now = tokio::time::Instant::now();
        if *next > now {
            tokio::time::sleep_until(*next).await;
        }
        *next = (*next).max(now) + interval;
    }

    /// The prefetch actually used: `prefetch`, but under `max_rate` no more
    /// than about one second of deliveries, so that none waits long unacked.
    pub fn effective_prefetch(&self) -> u16 {
        rate_capped(&self.cfg, self.cfg.prefetch)
    }

    /// The most the prefetch can be: raised while jobs are short.
    pub fn max_prefetch(&self) -> u16 {
        self.adaptive
            .as_ref()
            .map_or_else(|| self.effective_prefetch(), Adaptive::high)
    }
}

/// `prefetch`, capped under `max_rate` to about one second of deliveries.
fn rate_capped(cfg: &QueueConfig, prefetch: u16) -> u16 {
    match cfg.max_rate {
        Some(rate) => prefetch.min(rate.ceil().clamp(1.0, 65535.0) as u16),
        None => prefetch,
    }
}

/// The most deliveries a queue's consumer may have unacked: its prefetch,
/// or with an adaptive prefetch the raised one.
pub fn max_prefetch(cfg: &QueueConfig) -> u16 {
    adaptive_bounds(cfg).map_or_else(|| rate_capped(cfg, cfg.prefetch), |(_, high)| high)
}

/// The bounds an adaptive prefetch moves between: none when the queue sets
/// `prefetch`, or has a single active consumer (switching consumers would
/// hand the queue to another instance), or a `max_rate` (its deliveries
/// wait for the limiter anyway, and its prefetch is capped to a second's).
fn adaptive_bounds(cfg: &QueueConfig) -> Option<(u16, u16)> {
    if !cfg.prefetch_adapts || cfg.single_active_consumer || cfg.max_rate.is_some() {
        return None;
    }
    let high = cfg
        .prefetch
        .saturating_add(prefetch::extra(cfg.concurrency));
    (high > cfg.prefetch).then_some((cfg.prefetch, high))
}

fn adaptive_prefetch(cfg: &QueueConfig) -> Option<Adaptive> {
    adaptive_bounds(cfg).and_then(|(low, high)| Adaptive::new(low, high))
}

/// The queues now configured, with what outlives a reload.
pub struct Registry {
    queues: RwLock<Vec<Arc<QueueState>>>,
    /// Every queue the configured queues consume, retry to and dead-letter
    /// to; see [`Registry::own_queues`].
    own_queues: RwLock<Arc<HashSet<String>>>,
    /// The queues' `concurrency` slots, by name, across reloads.
    slots: QueueSlots,
    /// The counters of every queue state made, including those a reload
    /// removed whose jobs may still run: see [`Registry::workers_running`].
    stats: Mutex<Vec<Arc<QueueStats>>>,
}

impl Registry {
    pub fn new(own_queues: HashSet<String>) -> Registry {
        Registry {
            queues: RwLock::new(Vec::new()),
            own_queues: RwLock::new(Arc::new(own_queues)),
            slots: QueueSlots::default(),
            stats: Mutex::new(Vec::new()),
        }
    }

    /// New counters for a queue, counted in [`Registry::workers_running`].
    fn new_stats(&self) -> Arc<QueueStats> {
        let stats = Arc::<QueueStats>::default();
        self.stats.lock().expect("not poisoned").push(stats.clone());
        stats
    }

    /// Workers running now, in every queue (removed ones included).
    pub fn workers_running(&self) -> u64 {
        self.stats
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|s| crate::metrics::get(&s.running))
            .sum()
    }

    /// A snapshot of the configured queues.
    pub fn queues(&self) -> Vec<Arc<QueueState>> {
        self.queues.read().expect("not poisoned").clone()
    }

    /// Configures `queues` instead of those now configured.
    pub fn replace(&self, queues: Vec<Arc<QueueState>>) {
        *self.queues.write().expect("not poisoned") = queues;
    }

    /// Every queue the configured queues consume, retry to and dead-letter
    /// to: no reply goes there.
    pub fn own_queues(&self) -> Arc<HashSet<String>> {
        self.own_queues.read().expect("not poisoned").clone()
    }

    /// Adds the queues of a reloaded config; those a reload removes stay,
    /// as their messages may still come back.
    pub fn add_own_queues(&self, more: HashSet<String>) {
        let mut own = (*self.own_queues()).clone();
        own.extend(more);
        *self.own_queues.write().expect("not poisoned") = Arc::new(own);
    }

    /// A reload's new settings for `queue` were refused by the broker: the
    /// state they replace is configured again, its consumer still running.
    pub fn keep_previous(&self, queue: &QueueState) {
        let Some(previous) = queue.previous.lock().expect("not poisoned").take() else {
            return;
        };
        let mut queues = self.queues.write().expect("not poisoned");
        for q in queues.iter_mut() {
            if std::ptr::eq(Arc::as_ptr(q), queue) {
                *q = previous.clone();
            }
        }
    }
}

/// The environment a queue's workers start from: the supervisor's own minus
/// what they must not see (broker URL, systemd sockets), or only `PATH` with
/// `clear_env`; then the queue's `env`.
fn worker_env(cfg: &QueueConfig) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = if cfg.clear_env {
        vec![(
            "PATH".into(),
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )]
    } else {
        std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.to_string_lossy();
                !WITHHELD_ENV.contains(&k.as_ref())
                    && !k.starts_with("AMQP_EXEC_")
                    && !crate::broker::is_own_stack_setting(&k)
            })
            .collect()
    };
    let mut set = |k: &str, v: OsString| {
        env.retain(|(existing, _)| existing != k);
        env.push((k.into(), v));
    };
    if let Some(user) = &cfg.sandbox.user {
        set("USER", user.name.as_str().into());
        set("LOGNAME", user.name.as_str().into());
        set("HOME", user.home.as_os_str().into());
    }
    for (k, v) in &cfg.env {
        set(k, v.into());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(extra: &str) -> QueueConfig {
        let text = format!("[[queue]]\nname = \"q\"\ncommand = [\"/bin/true\"]\n{extra}");
        crate::config::parse(&text, std::path::Path::new("t.toml"), Some("amqp://h"))
            .unwrap()
            .queues
            .remove(0)
    }

    #[test]
    fn the_prefetch_adapts_only_when_nothing_fixes_it() {
        assert_eq!(adaptive_bounds(&queue("")), Some((1, 3)));
        assert_eq!(adaptive_bounds(&queue("concurrency = 8\n")), Some((8, 12)));
        assert_eq!(max_prefetch(&queue("concurrency = 8\n")), 12);
        for fixed in [
            "prefetch = 1\n",
            "single_active_consumer = true\n",
            "max_rate = \"100/s\"\n",
        ] {
            assert_eq!(adaptive_bounds(&queue(fixed)), None, "{fixed}");
        }
        assert_eq!(max_prefetch(&queue("prefetch = 3\n")), 3);
        assert_eq!(
            max_prefetch(&queue("max_rate = \"2/s\"\nconcurrency = 4\n")),
            2
        );
    }
}
