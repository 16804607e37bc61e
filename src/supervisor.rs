//! The supervisor: owns the broker connection and reconnects it, runs one
//! consumer loop per queue on it, handles signals and reloads, and drains on
//! shutdown. The state it shares with the consumers and jobs is in
//! [`crate::state`].

use crate::config::{self, Config, QueueConfig};
use crate::metrics::{self, QueueView};
use crate::state::{QueueState, Shared};
use crate::{broker, consumer, status, systemd};
use futures_lite::StreamExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Where a reload reads its config from.
struct Reloads {
    config_path: PathBuf,
    /// `AMQP_URL`, which replaces the config's broker URLs.
    url_override: Option<String>,
}

/// The queues now configured, as the metrics and systemd's status line
/// read them.
fn queue_views(shared: &Arc<Shared>) -> metrics::Queues {
    let shared = shared.clone();
    Arc::new(move || {
        shared
            .registry
            .queues()
            .iter()
            .map(|q| QueueView {
                name: q.name.clone(),
                concurrency: q.cfg.concurrency,
                timeout: q.cfg.timeout,
                stats: q.stats.clone(),
            })
            .collect()
    })
}

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
    let shared = Arc::new(Shared::new(&cfg, opts.max_jobs));
    let reloads = Reloads {
        config_path: cfg.file.clone(),
        url_override: opts.url_override.clone(),
    };
    for q in &cfg.queues {
        warn_about(q);
    }
    shared.registry.replace(
        cfg.queues
            .iter()
            .cloned()
            .map(|q| {
                Arc::new(QueueState::new(
                    q,
                    &shared.registry,
                    &shared.drain.stop,
                    None,
                ))
            })
            .collect(),
    );

    let (reload_tx, mut reload_rx) = mpsc::channel(4);
    spawn_signal_handler(shared.clone(), reloads.config_path.clone(), reload_tx);
    if let Some(idle) = opts.exit_when_idle {
        spawn_idle_watch(shared.clone(), idle);
    }
    systemd::spawn_status(queue_views(&shared), shared.stats.clone(), {
        let shared = shared.clone();
        Arc::new(move || shared.drain.stop.is_cancelled() && shared.drain.tracker.is_empty())
    });
    if let Some(addr) = cfg.metrics_listen {
        let pages = status::pages(shared.clone(), cfg.status_stderr);
        metrics::serve(addr, queue_views(&shared), shared.stats.clone(), pages).await?;
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
    while !shared.drain.stop.is_cancelled() {
        let attempt = tokio::select! {
            r = broker::connect_any(&cfg.broker, url_index, &name) => r,
            _ = shared.drain.stop.cancelled() => break,
        };
        let (conn, index) = match attempt {
            Ok(ok) => ok,
            Err(e) => {
                metrics::inc(&shared.stats.connect_failures);
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
                        _ = shared.drain.stop.cancelled() => break,
                        Some(()) = reload_rx.recv() => { reload(&shared, &reloads); }
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
        let end = session(Arc::new(conn), &shared, &reloads, &mut reload_rx).await;
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
                _ = shared.drain.stop.cancelled() => {}
            }
        }
    }

    systemd::notify_stopping();
    let running = shared.drain.tracker.len();
    if running > 0 && !shared.drain.interrupt.is_cancelled() {
        tracing::info!("waiting for {running} running job(s) to finish");
    }
    shared
        .drain
        .wait_for_jobs(shared.kill_grace(), || shared.registry.workers_running())
        .await;
    tracing::info!("stopped");
    Ok(())
}

/// How long to wait for the broker to confirm closing the connection.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

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
    reloads: &Reloads,
    reload_rx: &mut mpsc::Receiver<()>,
) -> SessionEnd {
    let conn_lost = CancellationToken::new();
    let watcher = watch_connection(conn.clone(), shared.clone(), conn_lost.clone());
    let mut consumers = tokio::task::JoinSet::new();
    for q in shared.registry.queues() {
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
            _ = shared.drain.stop.cancelled() => break,
            Some(()) = reload_rx.recv() => {
                for q in reload(shared, reloads) {
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
        let running = shared.drain.tracker.len();
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
    shared
        .drain
        .wait_for_jobs(shared.kill_grace(), || shared.registry.workers_running())
        .await;
    watcher.abort();
    if conn.status().blocked() {
        // Nothing can be sent, the close included: the socket closes on exit.
        tracing::warn!("the broker still blocks the connection; closing it without waiting");
        return SessionEnd::Shutdown;
    }
    let deadline = tokio::time::Instant::now() + CLOSE_LIMIT;
    if shared.drain.tracker.is_empty() {
        // Every job has ended: the consumers' channels close now. (Jobs
        // still running were given up; their messages go back with the
        // connection.)
        let _ = tokio::time::timeout_at(deadline, shared.drain.channels_closed()).await;
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

fn spawn_signal_handler(shared: Arc<Shared>, config_path: PathBuf, reload_tx: mpsc::Sender<()>) {
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
                    tracing::info!("SIGHUP: reloading {}", config_path.display());
                    let _ = reload_tx.try_send(());
                }
            }
        };
        let grace = shared.drain.shutdown_grace();
        tracing::info!(
            "{name}: stopping; {} running job(s) get up to {}s to finish",
            shared.drain.tracker.len(),
            grace.as_secs_f64()
        );
        shared.drain.stop.cancel();
        let interrupt = shared.drain.interrupt.clone();
        let tracker = shared.drain.tracker.clone();
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
        shared.drain.interrupt.cancel();
    });
}

/// Re-reads the config. Added queues and queues whose settings changed get a
/// new consumer (returned, to be started on the live connection); removed and
/// changed queues stop consuming while their running workers finish. An
/// invalid config is rejected and the running one stays.
fn reload(shared: &Shared, reloads: &Reloads) -> Vec<Arc<QueueState>> {
    let cfg = match config::load(&reloads.config_path, reloads.url_override.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::error!("reload rejected, the running config stays: {e}");
            return Vec::new();
        }
    };
    // Before the service is ready, systemd is still waiting for READY=1.
    let notify = shared.readiness.ready_sent();
    if notify {
        systemd::notify_reloading();
    }
    shared.drain.set_shutdown_grace(cfg.shutdown_grace);
    shared.registry.add_own_queues(cfg.own_queues());
    let current = shared.registry.queues();
    let mut next = Vec::with_capacity(cfg.queues.len());
    let mut started = Vec::new();
    for qc in cfg.queues {
        match current.iter().find(|q| q.cfg.name == qc.name) {
            Some(old) if old.cfg == qc => next.push(old.clone()),
            Some(old) => {
                tracing::info!(queue = %qc.name, "reload: queue changed; restarting its consumer");
                warn_about(&qc);
                // The old consumer stops once the broker took the new settings.
                let q = Arc::new(QueueState::new(
                    qc,
                    &shared.registry,
                    &shared.drain.stop,
                    Some(old),
                ));
                next.push(q.clone());
                started.push(q);
            }
            None => {
                tracing::info!(queue = %qc.name, "reload: queue added");
                warn_about(&qc);
                let q = Arc::new(QueueState::new(
                    qc,
                    &shared.registry,
                    &shared.drain.stop,
                    None,
                ));
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
    let count = next.len();
    shared.registry.replace(next);
    tracing::info!(
        "reload done: {count} queue(s); [broker], a max_workers key, [metrics] and [tracing] change only on restart"
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
            if shared.drain.stop.is_cancelled() {
                return;
            }
            if shared.drain.tracker.is_empty()
                && shared.budget.held() == 0
                && shared.budget.idle_for() >= idle
            {
                tracing::info!(
                    "no delivery for {:.1}s (--exit-when-idle); stopping",
                    idle.as_secs_f64()
                );
                shared.drain.stop.cancel();
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
