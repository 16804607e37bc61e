//! The supervisor: owns the broker connection and reconnects it, runs one
//! consumer loop per queue on it, caps concurrency, and drains on shutdown.
//!
//! Shutdown is passed around as cancellation tokens: `stop` ends consuming
//! (signals, `--max-jobs`, `--exit-when-idle`); `interrupt` kills running
//! workers (shutdown grace expired, or a second signal).

use crate::config::{self, Config, QueueConfig};
use crate::memory::Memory;
use crate::metrics::{self, GlobalStats, QueueStats};
use crate::slots::{GlobalSlots, QueueSlots};
use crate::{broker, consumer, runner, systemd};
use futures_lite::StreamExt;
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
];

/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Options of `amqp-exec run` that are not in the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Exit after this many jobs finished and were acked.
    pub max_jobs: Option<u64>,
    /// Exit once no delivery arrived for this long and no job runs.
    pub exit_when_idle: Option<Duration>,
    /// `AMQP_URL`, which replaces the config's broker URLs (also on reload).
    pub url_override: Option<String>,
}

/// One configured queue and its live state, kept across reconnects.
pub struct QueueState {
    pub cfg: QueueConfig,
    pub name: Arc<str>,
    /// One permit per worker the queue may run.
    pub slots: Arc<Semaphore>,
    /// The environment every worker of the queue starts with.
    pub base_env: Vec<(OsString, OsString)>,
    pub stats: Arc<QueueStats>,
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
}

impl QueueState {
    pub fn new(cfg: QueueConfig, shared: &Shared) -> Self {
        Self::replacing(cfg, shared, None)
    }

    /// A queue's new state after a reload changed its config; it keeps the
    /// counters, and the queue's worker slots (see [`QueueSlots`]), whose
    /// number follows the new concurrency.
    fn replacing(cfg: QueueConfig, shared: &Shared, old: Option<&Arc<QueueState>>) -> Self {
        QueueState {
            name: Arc::from(cfg.name.as_str()),
            slots: shared.queue_slots.for_queue(&cfg.name, cfg.concurrency),
            base_env: worker_env(&cfg),
            stats: old.map_or_else(Default::default, |o| o.stats.clone()),
            pause: watch::Sender::new(String::new()),
            stop: shared.stop.child_token(),
            previous: Mutex::new(old.cloned()),
            replies_off_noted: AtomicBool::new(false),
            next_start: tokio::sync::Mutex::new(tokio::time::Instant::now()),
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
        match self.cfg.max_rate {
            Some(rate) => self
                .cfg
                .prefetch
                .min(rate.ceil().clamp(1.0, 65535.0) as u16),
            None => self.cfg.prefetch,
        }
    }
}

/// State shared by the connection loop, the consumer loops and the jobs.
pub struct Shared {
    /// `max_workers` slots. Without a `max_workers` key there is no cap
    /// beyond the queues' own `concurrency`, so reloads never wait on it.
    pub global: GlobalSlots,
    /// The queues' `concurrency` slots, by name, across reloads.
    queue_slots: QueueSlots,
    /// What the instance remembers of messages across deliveries.
    pub memory: Memory,
    /// The key of signed control headers (the first config's: a reload
    /// does not change it).
    pub signing_key: crate::signing::SigningKey,
    /// Every queue the configured queues consume, retry to and dead-letter
    /// to; see [`Shared::own_queues`].
    own_queues: RwLock<Arc<HashSet<String>>>,
    pub stop: CancellationToken,
    pub interrupt: CancellationToken,
    /// When jobs still settling after `interrupt` are given up; see
    /// [`Shared::settle_deadline`].
    settle_deadline: Mutex<Option<Settle>>,
    /// Workers running now (processes, not jobs: a job may still be
    /// settling after its worker ended).
    workers: AtomicUsize,
    /// Every running job.
    pub tracker: TaskTracker,
    pub stats: GlobalStats,
    max_jobs: Option<u64>,
    claimed: AtomicU64,
    finished: AtomicU64,
    /// A claim was given back (a job ended without an ack).
    unclaimed: Notify,
    last_delivery: Mutex<Instant>,
    /// Deliveries taken from a consumer and not yet started as a job nor
    /// handed back (waiting for `max_rate` or a `max_workers` slot).
    held: AtomicUsize,
    ready: AtomicUsize,
    /// READY=1 was sent: reloads may say RELOADING=1.
    ready_sent: AtomicBool,
    /// Of those, queues that were not consuming when they counted.
    waiting: AtomicUsize,
    queue_count: usize,
    /// The queues now configured (reloads replace entries).
    pub queues: RwLock<Vec<Arc<QueueState>>>,
    config_path: PathBuf,
    url_override: Option<String>,
    shutdown_grace: Mutex<Duration>,
    /// Closes the channels of ended consumers once their jobs have settled;
    /// see [`Shared::close_channel_after`].
    closers: TaskTracker,
}

impl Shared {
    fn new(cfg: &Config, opts: &RunOptions) -> Self {
        Shared {
            global: GlobalSlots::new(cfg.max_workers),
            queue_slots: QueueSlots::default(),
            memory: Memory::default(),
            signing_key: cfg.signing_key.clone(),
            own_queues: RwLock::new(Arc::new(cfg.own_queues())),
            stop: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            settle_deadline: Mutex::new(None),
            workers: AtomicUsize::new(0),
            tracker: TaskTracker::new(),
            stats: GlobalStats::default(),
            max_jobs: opts.max_jobs,
            claimed: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            unclaimed: Notify::new(),
            last_delivery: Mutex::new(Instant::now()),
            held: AtomicUsize::new(0),
            ready: AtomicUsize::new(0),
            ready_sent: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            queue_count: cfg.queues.len(),
            queues: RwLock::new(Vec::new()),
            config_path: cfg.file.clone(),
            url_override: opts.url_override.clone(),
            shutdown_grace: Mutex::new(cfg.shutdown_grace),
            closers: TaskTracker::new(),
        }
    }

    /// Closes the channel of a consumer that ended, once `jobs` (the jobs
    /// it started, which settle on it) have all ended. Left to its last
    /// clone's drop, lapin would close it in the background, which on
    /// shutdown races the connection's close and is logged as a connection
    /// error. On shutdown the session waits for these closes, then closes
    /// the connection.
    pub fn close_channel_after(&self, channel: lapin::Channel, jobs: TaskTracker) {
        jobs.close();
        self.closers.spawn(async move {
            jobs.wait().await;
            if channel.status().connected() {
                let _ = channel.close(200, "consumer stopped".into()).await;
            }
        });
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

    /// Every queue the configured queues consume, retry to and dead-letter
    /// to: no reply goes there.
    pub fn own_queues(&self) -> Arc<HashSet<String>> {
        self.own_queues.read().expect("not poisoned").clone()
    }

    /// A snapshot of the configured queues.
    pub fn queues(&self) -> Vec<Arc<QueueState>> {
        self.queues.read().expect("not poisoned").clone()
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
    pub fn delivery_arrived(&self) -> HeldDelivery<'_> {
        self.held.fetch_add(1, Ordering::SeqCst);
        HeldDelivery(self)
    }

    fn idle_for(&self) -> Duration {
        self.last_delivery.lock().expect("not poisoned").elapsed()
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
}

/// The settle limit after `interrupt`: the stopped workers' longest
/// `kill_grace` (then SIGKILL) and pipe drain, plus SETTLE_AFTER_INTERRUPT;
/// or SETTLE_AFTER_INTERRUPT from when the last worker was gone, if sooner.
struct Settle {
    deadline: tokio::time::Instant,
    workers_gone: bool,
}

impl Shared {
    /// A job's worker is about to start; [`Shared::worker_ended`] when it
    /// is gone (or was never started).
    pub fn worker_started(&self) {
        self.workers.fetch_add(1, Ordering::SeqCst);
    }

    pub fn worker_ended(&self) {
        self.workers.fetch_sub(1, Ordering::SeqCst);
    }

    /// When jobs still settling after `interrupt` are given up: one limit
    /// for every wait, so that a later wait does not add to it.
    fn settle_deadline(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let mut settle = self.settle_deadline.lock().expect("not poisoned");
        let s = settle.get_or_insert_with(|| {
            let kill_grace = self
                .queues()
                .iter()
                .map(|q| q.cfg.kill_grace)
                .max()
                .unwrap_or_default();
            Settle {
                deadline: now + kill_grace + runner::PIPE_DRAIN_LIMIT + SETTLE_AFTER_INTERRUPT,
                workers_gone: false,
            }
        });
        if !s.workers_gone && self.workers.load(Ordering::SeqCst) == 0 {
            s.workers_gone = true;
            s.deadline = s.deadline.min(now + SETTLE_AFTER_INTERRUPT);
        }
        s.deadline
    }
}

/// A delivery the consumer holds; see [`Shared::delivery_arrived`].
pub struct HeldDelivery<'a>(&'a Shared);

impl Drop for HeldDelivery<'_> {
    fn drop(&mut self) {
        // The idle time counts from when the delivery was started or returned.
        *self.0.last_delivery.lock().expect("not poisoned") = Instant::now();
        self.0.held.fetch_sub(1, Ordering::SeqCst);
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

/// Keeps the broker password and the signing key from the workers: the
/// process is made non-dumpable, so that its `/proc/<pid>/environ` and
/// memory are root's only, even to workers that run as the same user (it
/// resets on exec: workers are not affected). Workers inherit a soft
/// core-size limit of 0, so that a crashing worker's core dump carries no
/// message body (a queue's `max_core_size` raises it).
fn protect_secrets() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot make the process non-dumpable (prctl): {e}");
    }
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_CORE)
        && let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, hard)
    {
        tracing::warn!("cannot set the core-size limit of workers to 0: {e}");
    }
}

/// Startup warnings about a queue's settings.
fn warn_about(q: &QueueConfig) {
    if nix::unistd::geteuid().is_root() && q.sandbox.user.is_none() {
        tracing::warn!(
            queue = %q.name,
            "running as root and the queue has no `user`: its workers run as root"
        );
    }
    let worst = consumer::worst_case_unacked(q);
    if worst > Duration::from_secs(30 * 60) {
        tracing::warn!(
            queue = %q.name,
            "a delivery may stay unacked for up to {} (timeout, kill_grace, confirm waits and the \
             deliveries prefetched ahead of it), more than RabbitMQ's default consumer_timeout \
             (30m): amqp-exec asks for x-consumer-timeout = {} per consumer (key \
             `consumer_timeout`), which RabbitMQ 4.3 and later honour; on older brokers raise \
             consumer_timeout in rabbitmq.conf, or the broker closes the channel of long jobs",
            config::format_duration(worst),
            config::format_duration(consumer::consumer_timeout(q))
        );
    }
}

/// Runs the supervisor until it is told to stop and has drained.
pub async fn run(cfg: Config, opts: RunOptions) -> Result<(), String> {
    protect_secrets();
    crate::reaper::start();
    let shared = Arc::new(Shared::new(&cfg, &opts));
    for q in &cfg.queues {
        warn_about(q);
    }
    *shared.queues.write().expect("not poisoned") = cfg
        .queues
        .iter()
        .cloned()
        .map(|q| Arc::new(QueueState::new(q, &shared)))
        .collect();

    let (reload_tx, mut reload_rx) = mpsc::channel(4);
    spawn_signal_handler(shared.clone(), reload_tx);
    if let Some(idle) = opts.exit_when_idle {
        spawn_idle_watch(shared.clone(), idle);
    }
    systemd::spawn_status(shared.clone());
    if let Some(addr) = cfg.metrics_listen {
        metrics::serve(addr, shared.clone()).await?;
    }

    let name = format!(
        "amqp-exec {} pid {}",
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    );
    let mut url_index = 0;
    let mut backoff = RECONNECT_MIN;
    let mut unreadable_wait = RECONNECT_MIN;
    let mut first = true;
    while !shared.stop.is_cancelled() {
        let attempt = tokio::select! {
            r = broker::connect_any(&cfg.broker, url_index, &name) => r,
            _ = shared.stop.cancelled() => break,
        };
        let (conn, index) = match attempt {
            Ok(ok) => ok,
            Err(e) => {
                let wait = jittered(backoff);
                tracing::error!(
                    "broker unreachable ({e}); retrying in {:.1}s",
                    wait.as_secs_f64()
                );
                url_index += 1;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                let sleep = tokio::time::sleep(wait);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        _ = shared.stop.cancelled() => break,
                        Some(()) = reload_rx.recv() => { reload(&shared); }
                    }
                }
                continue;
            }
        };
        url_index = index;
        backoff = RECONNECT_MIN;
        if !first {
            metrics::inc(&shared.stats.reconnects);
        }
        first = false;
        shared.stats.connected.store(1, Ordering::Relaxed);
        tracing::info!(
            "connected to {}",
            crate::uri::redact(&cfg.broker.urls[index])
        );
        let end = session(Arc::new(conn), &shared, &mut reload_rx).await;
        shared.stats.connected.store(0, Ordering::Relaxed);
        if end != SessionEnd::Shutdown {
            url_index += 1;
            let wait = if end == SessionEnd::Unreadable {
                // The message comes back at once on the next connection:
                // reconnect ever more slowly, and say what to do.
                unreadable_wait = (unreadable_wait * 2).min(RECONNECT_MAX);
                tracing::error!(
                    "the broker sent a message that cannot be read (most likely a property such \
                     as message_id, type or a header name that is not UTF-8, or properties that \
                     do not fit the connection's frame_max once the broker added its own \
                     headers, such as a quorum queue's x-delivery-count); it stays at the \
                     head of its queue and is delivered again on every connection, so the \
                     queues make no progress: remove it from its queue (for instance with the \
                     management UI's \"Get messages\", ack mode \"Reject requeue false\", on a \
                     queue with a dead-letter exchange, or by purging the queue); reconnecting \
                     in {}s",
                    unreadable_wait.as_secs()
                );
                jittered(unreadable_wait)
            } else {
                unreadable_wait = RECONNECT_MIN;
                jittered(RECONNECT_MIN)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.stop.cancelled() => {}
            }
        }
    }

    systemd::notify_stopping();
    let running = shared.tracker.len();
    if running > 0 && !shared.interrupt.is_cancelled() {
        tracing::info!("waiting for {running} running job(s) to finish");
    }
    wait_for_jobs(&shared).await;
    tracing::info!("stopped");
    Ok(())
}

/// How long jobs may still take to settle once their stopped workers are gone.
const SETTLE_AFTER_INTERRUPT: Duration = Duration::from_secs(5);
/// How long to wait for the broker to confirm closing the connection.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Waits for the running jobs. Once they were told to stop (shutdown grace
/// expired, or a second signal), a job stuck settling (a confirm that never
/// comes) is given up after a few seconds: its message was not acked, so the
/// broker requeues it when the connection closes.
async fn wait_for_jobs(shared: &Shared) {
    shared.tracker.close();
    let given_up = async {
        shared.interrupt.cancelled().await;
        let passed = tokio::time::Instant::now() >= shared.settle_deadline();
        loop {
            let deadline = shared.settle_deadline();
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
        _ = shared.tracker.wait() => {}
        passed = given_up => if !passed {
            tracing::warn!(
                "{} job(s) did not settle after being stopped; their messages go back to the queue \
                 when the connection closes",
                shared.tracker.len()
            )
        },
    }
}

/// How a session on one connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// Shutdown: the running jobs finished and the connection was closed.
    Shutdown,
    /// The connection was lost.
    Lost,
    /// The connection was lost because the client could not parse what the
    /// broker sent: a message it cannot read, which comes back every time.
    Unreadable,
}

/// Watches the connection: logs its events (blocked, unblocked, errors),
/// and once it is lost (an error event, or its state seen by a check every
/// second), counts the messages in hand as present at a loss (see
/// [`Memory::connection_lost`]) and cancels `conn_lost`. Ends with whether
/// the loss came from a message the client could not read.
fn watch_connection(
    conn: Arc<lapin::Connection>,
    shared: Arc<Shared>,
    conn_lost: CancellationToken,
) -> tokio::task::JoinHandle<bool> {
    let mut events = conn.events_listener();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut events_open = true;
        let lost = loop {
            tokio::select! {
                event = events.next(), if events_open => match event {
                    // lapin reports here both a lost connection (its state is
                    // already set) and a channel the broker closed with an
                    // error. The latter is that queue's alone: its consumer
                    // logs the error and rebuilds the channel.
                    Some(lapin::Event::Error(e)) if !conn.status().connected() => break Some(e),
                    Some(lapin::Event::Error(e)) => tracing::debug!("the broker closed a channel: {e}"),
                    Some(lapin::Event::ConnectionBlocked(reason)) => tracing::warn!(
                        "the broker blocked publishing ({reason}): retries and dead letters wait until it unblocks"
                    ),
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!("the broker unblocked publishing")
                    }
                    Some(_) => {}
                    None => events_open = false,
                },
                _ = tick.tick() => {
                    if !conn.status().connected() {
                        // Read the error that says why, if it follows.
                        match tokio::time::timeout(Duration::from_millis(200), events.next()).await {
                            Ok(Some(lapin::Event::Error(e))) => break Some(e),
                            _ => break None,
                        }
                    }
                }
            }
        };
        let unreadable = match &lost {
            Some(e) => {
                tracing::error!("connection lost: {e}");
                // What the client cannot read comes back on every connection.
                matches!(e.kind(), lapin::ErrorKind::ParsingError(_))
                    || e.to_string().contains("frame too large")
            }
            None => {
                tracing::error!("connection lost");
                false
            }
        };
        shared.memory.connection_lost();
        conn_lost.cancel();
        unreadable
    })
}

/// Runs all consumers on one connection until shutdown or until the
/// connection is lost.
async fn session(
    conn: Arc<lapin::Connection>,
    shared: &Arc<Shared>,
    reload_rx: &mut mpsc::Receiver<()>,
) -> SessionEnd {
    let conn_lost = CancellationToken::new();
    let watcher = watch_connection(conn.clone(), shared.clone(), conn_lost.clone());
    let mut consumers = tokio::task::JoinSet::new();
    for q in shared.queues() {
        consumers.spawn(consumer::run_queue(
            q,
            conn.clone(),
            shared.clone(),
            conn_lost.clone(),
        ));
    }
    loop {
        tokio::select! {
            _ = conn_lost.cancelled() => break,
            _ = shared.stop.cancelled() => break,
            Some(()) = reload_rx.recv() => {
                for q in reload(shared) {
                    consumers.spawn(consumer::run_queue(
                        q,
                        conn.clone(),
                        shared.clone(),
                        conn_lost.clone(),
                    ));
                }
            }
            // Reap consumers that ended (queues a reload removed), so that
            // a long-lived connection does not keep one entry per reload.
            Some(ended) = consumers.join_next(), if !consumers.is_empty() => {
                if let Err(e) = ended {
                    tracing::error!("a queue's consumer ended abnormally: {e}");
                }
            }
        }
    }
    while consumers.join_next().await.is_some() {}
    if conn_lost.is_cancelled() {
        // Jobs of queues with `on_connection_loss = "kill"` watch `conn_lost`
        // themselves (job.rs), those of queues a reload replaced included.
        let running = shared.tracker.len();
        if running > 0 {
            tracing::warn!(
                "{running} job(s) were running when the connection was lost; \
                 they cannot be acked and the broker will redeliver their messages"
            );
        }
        // The watcher cancelled `conn_lost`, and has ended.
        return if watcher.await.unwrap_or(false) {
            SessionEnd::Unreadable
        } else {
            SessionEnd::Lost
        };
    }
    // Shutdown: jobs still need this connection to settle their messages.
    wait_for_jobs(shared).await;
    watcher.abort();
    if conn.status().blocked() {
        // Nothing can be sent, the close included: the socket closes on exit.
        tracing::warn!("the broker still blocks the connection; closing it without waiting");
        return SessionEnd::Shutdown;
    }
    let deadline = tokio::time::Instant::now() + CLOSE_LIMIT;
    if shared.tracker.is_empty() {
        // Every job has ended: the consumers' channels close now. (Jobs
        // still running were given up; their messages go back with the
        // connection.)
        shared.closers.close();
        let _ = tokio::time::timeout_at(deadline, shared.closers.wait()).await;
    }
    let closing = conn.close(200, "amqp-exec shutting down".into());
    if tokio::time::timeout_at(deadline, closing).await.is_err() {
        tracing::warn!(
            "the broker did not confirm closing the connection within {}s",
            CLOSE_LIMIT.as_secs()
        );
    }
    SessionEnd::Shutdown
}

fn spawn_signal_handler(shared: Arc<Shared>, reload_tx: mpsc::Sender<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let name = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading {}", shared.config_path.display());
                    let _ = reload_tx.try_send(());
                }
            }
        };
        let grace = *shared.shutdown_grace.lock().expect("not poisoned");
        tracing::info!(
            "{name}: stopping; {} running job(s) get up to {}s to finish",
            shared.tracker.len(),
            grace.as_secs_f64()
        );
        shared.stop.cancel();
        let interrupt = shared.interrupt.clone();
        let tracker = shared.tracker.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if !tracker.is_empty() {
                tracing::warn!(
                    "shutdown_grace expired: stopping {} running job(s); their messages go back to the queue",
                    tracker.len()
                );
                interrupt.cancel();
            }
        });
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(
            "second {name}: stopping running jobs now; their messages go back to the queue"
        );
        shared.interrupt.cancel();
    });
}

/// Re-reads the config. Added queues and queues whose settings changed get a
/// new consumer (returned, to be started on the live connection); removed and
/// changed queues stop consuming while their running workers finish. An
/// invalid config is rejected and the running one stays.
fn reload(shared: &Shared) -> Vec<Arc<QueueState>> {
    let cfg = match config::load(&shared.config_path, shared.url_override.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::error!("reload rejected, the running config stays: {e}");
            return Vec::new();
        }
    };
    // Before the service is ready, systemd is still waiting for READY=1.
    let notify = shared.ready_sent.load(Ordering::SeqCst);
    if notify {
        systemd::notify_reloading();
    }
    *shared.shutdown_grace.lock().expect("not poisoned") = cfg.shutdown_grace;
    // The queues a reload removes keep their names here: their messages may
    // still come back.
    let mut own = (*shared.own_queues()).clone();
    own.extend(cfg.own_queues());
    *shared.own_queues.write().expect("not poisoned") = Arc::new(own);
    let mut current = shared.queues.write().expect("not poisoned");
    let mut next = Vec::with_capacity(cfg.queues.len());
    let mut started = Vec::new();
    for qc in cfg.queues {
        match current.iter().find(|q| q.cfg.name == qc.name) {
            Some(old) if old.cfg == qc => next.push(old.clone()),
            Some(old) => {
                tracing::info!(queue = %qc.name, "reload: queue changed; restarting its consumer");
                warn_about(&qc);
                // The old consumer stops once the broker took the new settings.
                let q = Arc::new(QueueState::replacing(qc, shared, Some(old)));
                next.push(q.clone());
                started.push(q);
            }
            None => {
                tracing::info!(queue = %qc.name, "reload: queue added");
                warn_about(&qc);
                let q = Arc::new(QueueState::new(qc, shared));
                next.push(q.clone());
                started.push(q);
            }
        }
    }
    for old in current.iter() {
        if !next.iter().any(|q| q.cfg.name == old.cfg.name) {
            tracing::info!(
                queue = %old.name,
                "reload: queue removed; its running workers finish"
            );
            old.stop.cancel();
        }
    }
    *current = next;
    tracing::info!(
        "reload done: {} queue(s); [broker], a max_workers key and [metrics] change only on restart",
        current.len()
    );
    if notify {
        systemd::notify_reloaded();
    }
    started
}

fn spawn_idle_watch(shared: Arc<Shared>, idle: Duration) {
    tokio::spawn(async move {
        let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_millis(200));
        loop {
            tokio::time::sleep(tick).await;
            if shared.stop.is_cancelled() {
                return;
            }
            if shared.tracker.is_empty()
                && shared.held.load(Ordering::SeqCst) == 0
                && shared.idle_for() >= idle
            {
                tracing::info!(
                    "no delivery for {:.1}s (--exit-when-idle); stopping",
                    idle.as_secs_f64()
                );
                shared.stop.cancel();
                return;
            }
        }
    });
}

/// `d` scaled by a random factor in [0.75, 1.25).
fn jittered(d: Duration) -> Duration {
    let r = (crate::random::u64() % 10_000) as f64 / 10_000.0;
    d.mul_f64(0.75 + r * 0.5)
}
