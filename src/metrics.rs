//! Metrics: per-queue job outcomes, exit statuses, running workers, job
//! durations, queue waits, saturation and connection events, kept as atomic
//! counters; rendered in the Prometheus text format on `/metrics` (with
//! `/healthz` beside it, and the pages of a layer above: the status page)
//! when `[metrics] listen` is set. They also feed the systemd STATUS line.
//!
//! Every update on a job's path is a relaxed atomic add or store on a fixed
//! slot (exit codes and signals have one each): no lock, no allocation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bounds (seconds) of the job-duration histogram buckets: up to a
/// day, beyond the default `timeout` (5m) and most configured ones; runs
/// longer than a day are in `+Inf` only.
pub const DURATION_BUCKETS: [f64; 24] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 240.0, 300.0,
    600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
];

/// Upper bounds (seconds) of the queue-wait histogram buckets. AMQP
/// timestamps have whole seconds, so the first bucket is one second.
pub const QUEUE_WAIT_BUCKETS: [f64; 15] = [
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0,
    86400.0,
];

/// A timestamp this far ahead of the clock is clock skew: the wait counts
/// as 0. Further ahead, it is not believed.
pub const TIMESTAMP_SKEW: Duration = Duration::from_secs(60);
/// A timestamp older than this is not believed (a wrong unit, a zero).
pub const TIMESTAMP_MAX_AGE: Duration = Duration::from_secs(365 * 86400);

/// Why a message's `timestamp` gave no queue wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTimestamp {
    /// More than [`TIMESTAMP_SKEW`] ahead of the clock.
    Future = 0,
    /// Older than [`TIMESTAMP_MAX_AGE`].
    TooOld = 1,
}

impl BadTimestamp {
    const ALL: [BadTimestamp; 2] = [BadTimestamp::Future, BadTimestamp::TooOld];

    fn label(self) -> &'static str {
        match self {
            BadTimestamp::Future => "future",
            BadTimestamp::TooOld => "too_old",
        }
    }
}

/// The time a message waited from its AMQP `timestamp` (unix seconds, set
/// by its publisher, so not trusted) to `now`: slightly ahead of the clock
/// (up to [`TIMESTAMP_SKEW`]) is clamped to 0; further ahead, or older than
/// [`TIMESTAMP_MAX_AGE`], gives no wait.
pub fn queue_wait(timestamp: u64, now: SystemTime) -> Result<Duration, BadTimestamp> {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let then = Duration::from_secs(timestamp.min(u64::MAX / 2));
    match now.checked_sub(then) {
        Some(wait) if wait > TIMESTAMP_MAX_AGE => Err(BadTimestamp::TooOld),
        Some(wait) => Ok(wait),
        None if then - now <= TIMESTAMP_SKEW => Ok(Duration::ZERO),
        None => Err(BadTimestamp::Future),
    }
}

/// Why a worker could not be started, from the error of `exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnCause {
    /// The command, its interpreter or `working_dir` does not exist.
    NotFound = 0,
    /// Not executable, or not by the worker's user.
    Permission = 1,
    Other = 2,
}

impl SpawnCause {
    const ALL: [SpawnCause; 3] = [
        SpawnCause::NotFound,
        SpawnCause::Permission,
        SpawnCause::Other,
    ];

    pub fn of(kind: Option<std::io::ErrorKind>) -> SpawnCause {
        match kind {
            Some(std::io::ErrorKind::NotFound) => SpawnCause::NotFound,
            Some(std::io::ErrorKind::PermissionDenied) => SpawnCause::Permission,
            _ => SpawnCause::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            SpawnCause::NotFound => "not_found",
            SpawnCause::Permission => "permission",
            SpawnCause::Other => "other",
        }
    }
}

/// A fixed number of counters.
#[derive(Debug)]
pub struct Counters<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Counters<N> {
    /// Adds one to counter `i`; an `i` out of range is not counted.
    pub fn inc(&self, i: usize) {
        if let Some(c) = self.0.get(i) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn get(&self, i: usize) -> u64 {
        self.0.get(i).map_or(0, |c| c.load(Relaxed))
    }

    /// The counters that are not zero, by index.
    fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.0
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
    }
}

/// A histogram over fixed bucket bounds (seconds): one observation is a
/// binary search and three atomic adds.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    buckets: Counters<N>,
    count: AtomicU64,
    micros: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    pub const fn new(bounds: &'static [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: Counters([const { AtomicU64::new(0) }; N]),
            count: AtomicU64::new(0),
            micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Past the last bound: in +Inf only (the count).
        self.buckets
            .inc(self.bounds.partition_point(|bound| *bound < secs));
        self.count.fetch_add(1, Relaxed);
        self.micros
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Cumulative bucket counts, total count and sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .0
            .iter()
            .map(|b| {
                acc += b.load(Relaxed);
                acc
            })
            .collect();
        (
            cumulative,
            self.count.load(Relaxed),
            self.micros.load(Relaxed) as f64 / 1e6,
        )
    }

    /// Its `_bucket`, `_sum` and `_count` rows for queue `name` (escaped).
    fn rows(&self, name: &str, rows: &mut Vec<(String, String)>) {
        let (buckets, count, sum) = self.snapshot();
        for (bound, n) in self.bounds.iter().zip(buckets) {
            rows.push((
                format!("_bucket{{queue=\"{name}\",le=\"{bound}\"}}"),
                n.to_string(),
            ));
        }
        rows.push((
            format!("_bucket{{queue=\"{name}\",le=\"+Inf\"}}"),
            count.to_string(),
        ));
        rows.push((format!("_sum{{queue=\"{name}\"}}"), format!("{sum}")));
        rows.push((format!("_count{{queue=\"{name}\"}}"), count.to_string()));
    }
}

// The two histograms, told apart by their number of buckets.
impl Default for Histogram<{ DURATION_BUCKETS.len() }> {
    fn default() -> Self {
        Histogram::new(&DURATION_BUCKETS)
    }
}

impl Default for Histogram<{ QUEUE_WAIT_BUCKETS.len() }> {
    fn default() -> Self {
        Histogram::new(&QUEUE_WAIT_BUCKETS)
    }
}

/// Highest signal number counted by its own name or number.
const SIGNALS: usize = 65;

/// Per-queue counters. All updates are relaxed atomics: they are figures, not
/// synchronisation.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Workers running now: the one count of them, kept by
    /// [`RunningWorker`]s (the supervisor's total is the sum over queues).
    pub running: AtomicU64,
    /// Jobs whose worker succeeded and whose message was acked.
    pub ok: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub requeued: AtomicU64,
    pub dropped: AtomicU64,
    pub spawn_failures: AtomicU64,
    /// Jobs whose outcome could not be recorded (ack or republish failed); the
    /// broker redelivers them.
    pub unsettled: AtomicU64,
    /// Messages whose `reply_to` got no reply: refused by `replies`.
    pub refused_replies: AtomicU64,
    /// Messages with control headers whose signature did not verify.
    pub forged_headers: AtomicU64,
    /// Messages with a `traceparent`, `tracestate` or `baggage` header
    /// that was not valid, and was ignored.
    pub invalid_trace_context: AtomicU64,
    /// Finished runs by exit label ("0", "75", "SIGKILL", "timeout", ...).
    exits: Mutex<BTreeMap<String, u64>>,
    duration: Histogram<{ DURATION_BUCKETS.len() }>,
    /// From the message's `timestamp` to its worker's start, first
    /// attempts only (a retry keeps the first publish's timestamp).
    queue_wait: Histogram<{ QUEUE_WAIT_BUCKETS.len() }>,
    /// Timestamps that gave no queue wait, by [`BadTimestamp`].
    bad_timestamps: Counters<2>,
    /// Exits by code, 0 to 255.
    exit_codes: Counters<256>,
    /// Runs ended by a signal not sent by amqp-exec, by number.
    signals: Counters<SIGNALS>,
    /// Runs killed at their `timeout`.
    pub timeouts: AtomicU64,
    /// Spawn failures by [`SpawnCause`].
    spawn_causes: Counters<3>,
    /// Deliveries taken from the broker and waiting to start: for a
    /// `max_workers` slot or their turn under `max_rate`.
    pub held: AtomicU64,
    /// 1 while the consumer is paused (its command cannot be started, or
    /// an outcome could not be recorded with the broker).
    pub paused: AtomicU64,
    /// When a job last succeeded (acked with the `ok` outcome), unix
    /// milliseconds; 0 before the first.
    last_success_ms: AtomicU64,
    /// Retries, dead letters and spawn failures since the last success.
    pub consecutive_failures: AtomicU64,
}

/// A worker counted as running in its queue's [`QueueStats::running`], from
/// before its job is spawned until the worker is gone (or was never
/// started); dropping it ends the count.
#[derive(Debug)]
pub struct RunningWorker(Arc<QueueStats>);

impl Drop for RunningWorker {
    fn drop(&mut self) {
        dec(&self.0.running);
    }
}

impl QueueStats {
    /// Counts a worker as running until the returned guard is dropped.
    pub fn worker_starting(self: &Arc<Self>) -> RunningWorker {
        inc(&self.running);
        RunningWorker(self.clone())
    }

    /// A run that ended otherwise than with an exit code, under its label.
    pub fn count_exit(&self, label: String) {
        *self
            .exits
            .lock()
            .expect("not poisoned")
            .entry(label)
            .or_default() += 1;
    }

    /// Finished runs by label: the exit codes (counted without a lock by
    /// [`QueueStats::count_exit_code`]) and the labels of
    /// [`QueueStats::count_exit`].
    pub fn exits(&self) -> BTreeMap<String, u64> {
        let mut exits = self.exits.lock().expect("not poisoned").clone();
        for (code, n) in self.exit_codes.nonzero() {
            *exits.entry(code.to_string()).or_default() += n;
        }
        exits
    }

    pub fn observe_duration(&self, d: Duration) {
        self.duration.observe(d);
    }

    /// Cumulative bucket counts, total count and sum in seconds.
    pub fn durations(&self) -> (Vec<u64>, u64, f64) {
        self.duration.snapshot()
    }

    /// A worker is about to start for a message first published at
    /// `timestamp` (its AMQP property, unix seconds).
    pub fn observe_queue_wait(&self, timestamp: u64, now: SystemTime) {
        match queue_wait(timestamp, now) {
            Ok(wait) => self.queue_wait.observe(wait),
            Err(bad) => self.bad_timestamps.inc(bad as usize),
        }
    }

    /// Cumulative queue-wait bucket counts, total count and sum in seconds.
    pub fn queue_waits(&self) -> (Vec<u64>, u64, f64) {
        self.queue_wait.snapshot()
    }

    /// A worker exited with `code`.
    pub fn count_exit_code(&self, code: i32) {
        self.exit_codes
            .inc(usize::try_from(code).unwrap_or(usize::MAX));
    }

    /// A worker was ended by signal `sig`, not sent by amqp-exec.
    pub fn count_signal(&self, sig: i32) {
        self.signals.inc(usize::try_from(sig).unwrap_or(usize::MAX));
    }

    /// A worker could not be started.
    pub fn count_spawn_failure(&self, cause: SpawnCause) {
        inc(&self.spawn_failures);
        self.spawn_causes.inc(cause as usize);
        self.job_failed();
    }

    /// A job succeeded at `now`: the failure streak ends.
    pub fn job_succeeded(&self, now: SystemTime) {
        let ms = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64);
        self.last_success_ms.store(ms, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
    }

    /// A job failed: retried, dead-lettered, or its worker not started.
    pub fn job_failed(&self) {
        inc(&self.consecutive_failures);
    }

    /// When a job last succeeded, unix seconds; 0 before the first.
    pub fn last_success(&self) -> f64 {
        self.last_success_ms.load(Relaxed) as f64 / 1e3
    }
}

/// One configured queue, as the metrics page and systemd's status line see
/// it.
pub struct QueueView {
    pub name: std::sync::Arc<str>,
    pub concurrency: usize,
    /// The queue's `timeout`.
    pub timeout: Duration,
    pub stats: std::sync::Arc<QueueStats>,
}

/// The queues configured now, read on every request.
pub type Queues = std::sync::Arc<dyn Fn() -> Vec<QueueView> + Send + Sync>;

/// Supervisor-wide counters.
#[derive(Debug, Default)]
pub struct GlobalStats {
    pub reconnects: AtomicU64,
    pub connected: AtomicU64,
    /// Connection attempts that failed (the broker unreachable, refused).
    pub connect_failures: AtomicU64,
    /// The `max_workers` slots, when the page shows them.
    pub workers: Option<WorkerSlots>,
}

/// The global worker slots as the metrics page reads them.
#[derive(Debug)]
pub struct WorkerSlots {
    /// One permit per free slot.
    pub free: Arc<tokio::sync::Semaphore>,
    /// Its size: `max_workers`, or `None` without that key.
    pub limit: Option<usize>,
}

impl WorkerSlots {
    /// Slots taken: by running jobs, and by consumers holding one while
    /// they wait for a delivery.
    pub fn in_use(&self) -> usize {
        self.limit
            .unwrap_or(tokio::sync::Semaphore::MAX_PERMITS)
            .saturating_sub(self.free.available_permits())
    }
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Relaxed);
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// Adds one to a gauge for as long as it lives.
pub struct Raised<'a>(&'a AtomicU64);

impl<'a> Raised<'a> {
    pub fn new(gauge: &'a AtomicU64) -> Raised<'a> {
        inc(gauge);
        Raised(gauge)
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        dec(self.0);
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `/metrics` page.
pub fn render(queues: &[QueueView], global: &GlobalStats) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_queue = |f: &dyn Fn(&QueueStats) -> u64| -> Vec<(String, String)> {
        queues
            .iter()
            .map(|q| {
                (
                    format!("{{queue=\"{}\"}}", label(&q.name)),
                    f(&q.stats).to_string(),
                )
            })
            .collect()
    };
    let of_queue = |f: &dyn Fn(&QueueView) -> String| -> Vec<(String, String)> {
        queues
            .iter()
            .map(|q| (format!("{{queue=\"{}\"}}", label(&q.name)), f(q)))
            .collect()
    };
    let mut jobs = Vec::new();
    for q in queues {
        for (outcome, c) in [
            ("ok", &q.stats.ok),
            ("retried", &q.stats.retried),
            ("dead", &q.stats.dead),
            ("requeued", &q.stats.requeued),
            ("dropped", &q.stats.dropped),
            ("unsettled", &q.stats.unsettled),
        ] {
            jobs.push((
                format!("{{queue=\"{}\",outcome=\"{outcome}\"}}", label(&q.name)),
                get(c).to_string(),
            ));
        }
    }
    family(
        "amqp_exec_jobs_total",
        "counter",
        "Jobs by queue and outcome.",
        jobs,
    );
    let mut exits = Vec::new();
    for q in queues {
        for (code, n) in q.stats.exits() {
            exits.push((
                format!("{{queue=\"{}\",exit=\"{}\"}}", label(&q.name), label(&code)),
                n.to_string(),
            ));
        }
    }
    family(
        "amqp_exec_worker_exits_total",
        "counter",
        "Finished workers by exit status, signal, or timeout.",
        exits,
    );
    family(
        "amqp_exec_running_workers",
        "gauge",
        "Workers running now.",
        per_queue(&|s| get(&s.running)),
    );
    let mut spawns = Vec::new();
    for q in queues {
        for cause in SpawnCause::ALL {
            spawns.push((
                format!(
                    "{{queue=\"{}\",cause=\"{}\"}}",
                    label(&q.name),
                    cause.label()
                ),
                q.stats.spawn_causes.get(cause as usize).to_string(),
            ));
        }
    }
    family(
        "amqp_exec_spawn_failures_total",
        "counter",
        "Workers that could not be started, by cause: not_found (command, interpreter or working_dir), permission, other.",
        spawns,
    );
    family(
        "amqp_exec_refused_replies_total",
        "counter",
        "Messages whose reply_to got no reply: not allowed by the queue's replies setting.",
        per_queue(&|s| get(&s.refused_replies)),
    );
    family(
        "amqp_exec_forged_headers_total",
        "counter",
        "Messages whose amqp-exec control headers had no valid signature, and were ignored.",
        per_queue(&|s| get(&s.forged_headers)),
    );
    family(
        "amqp_exec_invalid_trace_context_total",
        "counter",
        "Messages whose traceparent, tracestate or baggage header was not valid, and was ignored.",
        per_queue(&|s| get(&s.invalid_trace_context)),
    );
    family(
        "amqp_exec_retries_total",
        "counter",
        "Messages republished to a retry queue.",
        per_queue(&|s| get(&s.retried)),
    );
    family(
        "amqp_exec_dead_letters_total",
        "counter",
        "Messages republished to the dead-letter queue.",
        per_queue(&|s| get(&s.dead)),
    );
    let mut hist = Vec::new();
    for q in queues {
        q.stats.duration.rows(&label(&q.name), &mut hist);
    }
    family(
        "amqp_exec_job_duration_seconds",
        "histogram",
        "Wall time of worker runs.",
        hist,
    );
    family(
        "amqp_exec_reconnects_total",
        "counter",
        "Broker reconnections after a lost connection.",
        vec![(String::new(), get(&global.reconnects).to_string())],
    );
    family(
        "amqp_exec_connected",
        "gauge",
        "1 while connected to the broker.",
        vec![(String::new(), get(&global.connected).to_string())],
    );
    family(
        "amqp_exec_connect_failures_total",
        "counter",
        "Attempts to connect to the broker that failed.",
        vec![(String::new(), get(&global.connect_failures).to_string())],
    );
    let mut codes = Vec::new();
    let mut signals = Vec::new();
    for q in queues {
        let name = label(&q.name);
        for (code, n) in q.stats.exit_codes.nonzero() {
            codes.push((
                format!("{{queue=\"{name}\",code=\"{code}\"}}"),
                n.to_string(),
            ));
        }
        for (sig, n) in q.stats.signals.nonzero() {
            let sig = nix::sys::signal::Signal::try_from(sig as i32)
                .map_or_else(|_| sig.to_string(), |s| s.as_str().to_owned());
            signals.push((
                format!("{{queue=\"{name}\",signal=\"{sig}\"}}"),
                n.to_string(),
            ));
        }
    }
    family(
        "amqp_exec_worker_exit_codes_total",
        "counter",
        "Workers that exited, by exit code.",
        codes,
    );
    family(
        "amqp_exec_worker_signals_total",
        "counter",
        "Workers ended by a signal that amqp-exec did not send (a crash, the OOM killer), by signal.",
        signals,
    );
    family(
        "amqp_exec_worker_timeouts_total",
        "counter",
        "Workers killed for running past the queue's timeout.",
        per_queue(&|s| get(&s.timeouts)),
    );
    let mut waits = Vec::new();
    for q in queues {
        q.stats.queue_wait.rows(&label(&q.name), &mut waits);
    }
    family(
        "amqp_exec_queue_wait_seconds",
        "histogram",
        "Time from a message's AMQP timestamp (whole seconds, set by its publisher) to its worker's start; first attempts only.",
        waits,
    );
    let mut bad = Vec::new();
    for q in queues {
        for reason in BadTimestamp::ALL {
            bad.push((
                format!(
                    "{{queue=\"{}\",reason=\"{}\"}}",
                    label(&q.name),
                    reason.label()
                ),
                q.stats.bad_timestamps.get(reason as usize).to_string(),
            ));
        }
    }
    family(
        "amqp_exec_queue_wait_bad_timestamps_total",
        "counter",
        "Messages whose timestamp was not believed and gave no queue wait: future (over 60s ahead of the clock) or too_old (over a year).",
        bad,
    );
    family(
        "amqp_exec_queue_concurrency",
        "gauge",
        "The queue's configured concurrency: the most workers it runs at once.",
        of_queue(&|q| q.concurrency.to_string()),
    );
    family(
        "amqp_exec_queue_timeout_seconds",
        "gauge",
        "The queue's configured timeout.",
        of_queue(&|q| q.timeout.as_secs_f64().to_string()),
    );
    family(
        "amqp_exec_held_deliveries",
        "gauge",
        "Deliveries taken from the broker and waiting to start: for a max_workers slot or their turn under max_rate.",
        per_queue(&|s| get(&s.held)),
    );
    family(
        "amqp_exec_queue_paused",
        "gauge",
        "1 while the queue's consumer is paused: its command cannot be started, or an outcome could not be recorded with the broker.",
        per_queue(&|s| get(&s.paused)),
    );
    family(
        "amqp_exec_last_success_timestamp_seconds",
        "gauge",
        "When a job of the queue last succeeded, unix time; 0 before the first.",
        of_queue(&|q| q.stats.last_success().to_string()),
    );
    family(
        "amqp_exec_consecutive_failures",
        "gauge",
        "Jobs retried, dead-lettered or not started since the queue's last success.",
        per_queue(&|s| get(&s.consecutive_failures)),
    );
    if let Some(w) = &global.workers {
        family(
            "amqp_exec_max_workers_in_use",
            "gauge",
            "Global worker slots taken: by running jobs, and by consumers holding one while they wait for a delivery.",
            vec![(String::new(), w.in_use().to_string())],
        );
        if let Some(limit) = w.limit {
            family(
                "amqp_exec_max_workers",
                "gauge",
                "The max_workers limit: the most workers of all queues at once.",
                vec![(String::new(), limit.to_string())],
            );
        }
    }
    out
}

/// Most scrapes answered at once; further connections wait in the kernel's
/// backlog.
const CONNECTIONS_MAX: usize = 64;
/// Time allowed for reading a request and writing its answer.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// A page served beside `/metrics`.
pub struct Page {
    /// Its media type, such as `text/html; charset=utf-8`.
    pub kind: &'static str,
    pub body: String,
}

/// More pages, by path without its query: None for a path they do not
/// serve.
pub type Pages = Arc<dyn Fn(&str) -> Option<Page> + Send + Sync>;

/// Binds `addr` and serves `/metrics`, `/healthz` and `pages` until the
/// process ends.
pub async fn serve(
    addr: std::net::SocketAddr,
    queues: Queues,
    global: Arc<GlobalStats>,
    pages: Pages,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("[metrics] cannot listen on {addr}: {e}"))?;
    tracing::info!("metrics on http://{addr}/metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: do not spin on it.
                    tracing::debug!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (queues, global, pages) = (queues.clone(), global.clone(), pages.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let answering = answer(&mut stream, &queues, &global, &pages);
                let _ = tokio::time::timeout(REQUEST_LIMIT, answering).await;
            });
        }
    });
    Ok(())
}

/// True once `request` holds the blank line that ends its headers, with
/// CRLF line ends or bare LF ones (which HTTP lets a server accept, and
/// which `printf 'GET /metrics\n\n' | nc` sends).
fn headers_end(request: &[u8]) -> bool {
    request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n")
}

/// Reads one request and writes its answer.
async fn answer(
    stream: &mut tokio::net::TcpStream,
    queues: &Queues,
    global: &GlobalStats,
    pages: &Pages,
) {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
        if headers_end(&buf[..len]) {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let (status, kind, body) = match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            render(&queues(), global),
        ),
        "/healthz" if get(&global.connected) == 1 => ("200 OK", "text/plain", "ok\n".to_owned()),
        "/healthz" => (
            "503 Service Unavailable",
            "text/plain",
            "not connected to the broker\n".to_owned(),
        ),
        _ => match pages(path) {
            Some(page) => ("200 OK", page.kind, page.body),
            None => (
                "404 Not Found",
                "text/plain",
                "try /metrics, /healthz or /status\n".to_owned(),
            ),
        },
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_end_at_a_blank_line_with_either_line_end() {
        assert!(headers_end(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(headers_end(b"GET /metrics HTTP/1.1\nHost: x\n\n"));
        assert!(headers_end(b"GET /metrics\n\n"));
        assert!(!headers_end(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"));
        assert!(!headers_end(b"GET /metrics HTTP/1.1\n"));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histogram_is_cumulative() {
        let s = QueueStats::default();
        s.observe_duration(Duration::from_millis(1));
        s.observe_duration(Duration::from_millis(300));
        s.observe_duration(Duration::from_secs(100));
        s.observe_duration(Duration::from_secs(300));
        s.observe_duration(Duration::from_secs(2 * 86400));
        let (b, n, sum) = s.durations();
        assert_eq!(b[0], 1);
        assert_eq!(b[6], 2);
        // 100 s is in the 120 s bucket; 300 s (the default timeout) in its own.
        let at = |bound: f64| DURATION_BUCKETS.iter().position(|b| *b == bound).unwrap();
        assert_eq!(b[at(60.0)], 2);
        assert_eq!(b[at(120.0)], 3);
        assert_eq!(b[at(240.0)], 3);
        assert_eq!(b[at(300.0)], 4);
        // Two days: in +Inf (the count) only.
        assert_eq!(*b.last().unwrap(), 4);
        assert_eq!(n, 5);
        assert!((sum - (400.301 + 2.0 * 86400.0)).abs() < 1e-6);
    }

    #[test]
    fn bucket_bounds_rise() {
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(QUEUE_WAIT_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        // The default timeout is a bound of its own.
        assert!(DURATION_BUCKETS.contains(&300.0));
    }

    #[test]
    fn a_bound_holds_what_equals_it() {
        let h = Histogram::new(&DURATION_BUCKETS);
        h.observe(Duration::from_secs(1));
        h.observe(Duration::from_millis(1001));
        let (b, n, _) = h.snapshot();
        let at = |bound: f64| DURATION_BUCKETS.iter().position(|b| *b == bound).unwrap();
        assert_eq!((b[at(0.5)], b[at(1.0)], b[at(2.5)], n), (0, 1, 2, 2));
    }

    #[test]
    fn queue_wait_distrusts_odd_timestamps() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |secs: u64| queue_wait(secs, now);
        assert_eq!(at(1_800_000_000 - 42), Ok(Duration::from_secs(42)));
        assert_eq!(at(1_800_000_000), Ok(Duration::ZERO));
        // Clock skew: clamped to 0.
        assert_eq!(at(1_800_000_030), Ok(Duration::ZERO));
        assert_eq!(at(1_800_000_060), Ok(Duration::ZERO));
        assert_eq!(at(1_800_000_061), Err(BadTimestamp::Future));
        // Milliseconds written as seconds, and the largest value.
        assert_eq!(at(1_800_000_000_000), Err(BadTimestamp::Future));
        assert_eq!(at(u64::MAX), Err(BadTimestamp::Future));
        // Zero, and over a year old.
        assert_eq!(at(0), Err(BadTimestamp::TooOld));
        assert_eq!(at(1_800_000_000 - 366 * 86400), Err(BadTimestamp::TooOld));
        assert_eq!(
            at(1_800_000_000 - 364 * 86400),
            Ok(Duration::from_secs(364 * 86400))
        );
        // A clock before 1970 does not panic.
        assert_eq!(
            queue_wait(5, SystemTime::UNIX_EPOCH - Duration::from_secs(10)),
            Ok(Duration::ZERO)
        );

        let s = QueueStats::default();
        s.observe_queue_wait(1_800_000_000 - 3, now);
        s.observe_queue_wait(1_800_000_000 + 3600, now);
        s.observe_queue_wait(0, now);
        let (b, n, sum) = s.queue_waits();
        assert_eq!((b[0], b[1], b[2], n, sum), (0, 0, 1, 1, 3.0));
        assert_eq!(s.bad_timestamps.get(BadTimestamp::Future as usize), 1);
        assert_eq!(s.bad_timestamps.get(BadTimestamp::TooOld as usize), 1);
    }

    #[test]
    fn spawn_causes() {
        use std::io::ErrorKind;
        assert_eq!(
            SpawnCause::of(Some(ErrorKind::NotFound)),
            SpawnCause::NotFound
        );
        assert_eq!(
            SpawnCause::of(Some(ErrorKind::PermissionDenied)),
            SpawnCause::Permission
        );
        assert_eq!(
            SpawnCause::of(Some(ErrorKind::OutOfMemory)),
            SpawnCause::Other
        );
        assert_eq!(SpawnCause::of(None), SpawnCause::Other);
    }

    #[test]
    fn failures_count_until_a_success() {
        let s = QueueStats::default();
        assert_eq!(s.last_success(), 0.0);
        s.job_failed();
        s.count_spawn_failure(SpawnCause::NotFound);
        assert_eq!(get(&s.consecutive_failures), 2);
        assert_eq!(get(&s.spawn_failures), 1);
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_250);
        s.job_succeeded(now);
        assert_eq!(get(&s.consecutive_failures), 0);
        assert_eq!(s.last_success(), 1_800_000_000.25);
    }

    #[test]
    fn codes_and_signals_out_of_range_are_not_counted() {
        let s = QueueStats::default();
        s.count_exit_code(0);
        s.count_exit_code(255);
        s.count_exit_code(256);
        s.count_exit_code(-1);
        s.count_signal(9);
        s.count_signal(64);
        s.count_signal(65);
        s.count_signal(-9);
        let codes: Vec<_> = s.exit_codes.nonzero().collect();
        assert_eq!(codes, [(0, 1), (255, 1)]);
        let signals: Vec<_> = s.signals.nonzero().collect();
        assert_eq!(signals, [(9, 1), (64, 1)]);
    }

    #[test]
    fn the_page_has_each_family_once_with_help_and_type() {
        let stats = Arc::new(QueueStats::default());
        stats.count_exit_code(3);
        stats.count_signal(9);
        stats.observe_queue_wait(0, SystemTime::now());
        inc(&stats.held);
        let queues = [QueueView {
            name: "q\"1".into(),
            concurrency: 4,
            timeout: Duration::from_secs(300),
            stats,
        }];
        let global = GlobalStats {
            workers: Some(WorkerSlots {
                free: Arc::new(tokio::sync::Semaphore::new(7)),
                limit: Some(10),
            }),
            ..GlobalStats::default()
        };
        let page = render(&queues, &global);
        let q = "queue=\"q\\\"1\"";
        for line in [
            format!("amqp_exec_worker_exit_codes_total{{{q},code=\"3\"}} 1"),
            format!("amqp_exec_worker_signals_total{{{q},signal=\"SIGKILL\"}} 1"),
            format!("amqp_exec_queue_wait_bad_timestamps_total{{{q},reason=\"too_old\"}} 1"),
            format!("amqp_exec_queue_wait_seconds_count{{{q}}} 0"),
            format!("amqp_exec_spawn_failures_total{{{q},cause=\"not_found\"}} 0"),
            format!("amqp_exec_queue_concurrency{{{q}}} 4"),
            format!("amqp_exec_queue_timeout_seconds{{{q}}} 300"),
            format!("amqp_exec_held_deliveries{{{q}}} 1"),
            format!("amqp_exec_queue_paused{{{q}}} 0"),
            format!("amqp_exec_last_success_timestamp_seconds{{{q}}} 0"),
            format!("amqp_exec_job_duration_seconds_bucket{{{q},le=\"300\"}} 0"),
            "amqp_exec_max_workers 10".to_owned(),
            "amqp_exec_max_workers_in_use 3".to_owned(),
            "amqp_exec_connect_failures_total 0".to_owned(),
        ] {
            assert!(page.lines().any(|l| l == line), "no {line} in\n{page}");
        }
        let mut seen = std::collections::HashSet::new();
        for l in page.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = l.split_whitespace().nth(2).unwrap();
            assert!(seen.insert(name.to_owned()), "{name} twice");
            assert!(
                page.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
        // Without max_workers there is no limit to show.
        let global = GlobalStats {
            workers: Some(WorkerSlots {
                free: Arc::new(tokio::sync::Semaphore::new(
                    tokio::sync::Semaphore::MAX_PERMITS - 2,
                )),
                limit: None,
            }),
            ..GlobalStats::default()
        };
        let page = render(&queues, &global);
        assert!(page.contains("\namqp_exec_max_workers_in_use 2\n"));
        assert!(!page.contains("\namqp_exec_max_workers "));
    }
}
