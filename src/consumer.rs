//! Consumer loop of one queue on one connection: declares the topology,
//! waits for the queue's command, sets the prefetch, takes deliveries only
//! when a worker slot is free, and starts a job for each. It pauses the
//! queue (cancelling its consumer, so other instances get the messages) when
//! its command cannot be started or a job's outcome cannot be recorded with
//! the broker, and rebuilds its channel after a channel error.

use crate::broker;
use crate::config::{QueueConfig, executable_by, resolve_command};
use crate::job::{self, Permits, Settler};
use crate::metrics;
use crate::publish::{CONFIRM_TIMEOUT, SettleChannel};
use crate::runner::PIPE_DRAIN_LIMIT;
use crate::state::activity::ConsumerState;
use crate::state::queues::max_prefetch;
use crate::state::{QueueState, Shared};
use futures_lite::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, Consumer, message::Delivery};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// First and longest pause of a queue whose command cannot be started.
const PAUSE_MIN: Duration = Duration::from_secs(1);
const PAUSE_MAX: Duration = Duration::from_secs(60);
/// Wait before rebuilding a channel after a channel error.
const CHANNEL_RETRY: Duration = Duration::from_secs(1);
const CHANNEL_RETRY_MAX: Duration = Duration::from_secs(30);
/// How long to wait for the broker to confirm cancelling a consumer, and
/// for handing back the deliveries that were not started. While the broker
/// blocks the connection (a resource alarm) nothing can be sent; the
/// deliveries then go back when the connection closes.
const CANCEL_LIMIT: Duration = Duration::from_secs(5);
/// RabbitMQ's default `consumer_timeout`.
const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The longest a delivery of the queue can stay unacked: the deliveries
/// prefetched ahead of it run first, then its own job runs to its timeout
/// and kill grace, its output drains, and its republish and reply wait for
/// their confirms.
pub fn worst_case_unacked(cfg: &QueueConfig) -> Duration {
    let rounds = u32::from(max_prefetch(cfg)).div_ceil(cfg.concurrency.max(1) as u32);
    let job = cfg.timeout + cfg.kill_grace + PIPE_DRAIN_LIMIT + CONFIRM_TIMEOUT * 2;
    let rate_wait = if cfg.max_rate.is_some() {
        Duration::from_secs(2)
    } else {
        Duration::ZERO
    };
    job * rounds + rate_wait
}

/// The `x-consumer-timeout` the queue's consumer asks for: its
/// `consumer_timeout` key, else the worst case with a minute to spare, and
/// never below RabbitMQ's default.
pub fn consumer_timeout(cfg: &QueueConfig) -> Duration {
    cfg.consumer_timeout.unwrap_or_else(|| {
        (worst_case_unacked(cfg) + Duration::from_secs(60)).max(BROKER_CONSUMER_TIMEOUT)
    })
}

enum End {
    /// Shutdown, max-jobs reached, or the connection is gone.
    Stopped,
    /// The command is missing (`requeued` false), or a worker could not be
    /// started or a job's outcome could not be recorded with the broker
    /// (its message was requeued): pause the queue, for `why`.
    Paused { why: String, requeued: bool },
    /// The channel failed; rebuild it.
    ChannelError(String),
}

/// Runs the queue on `conn` until shutdown or until the connection is lost.
pub async fn run_queue(
    queue: Arc<QueueState>,
    conn: Arc<Connection>,
    shared: Arc<Shared>,
    conn_lost: CancellationToken,
) {
    let mut pause = PAUSE_MIN;
    let mut channel_retry = CHANNEL_RETRY;
    let mut declared = !queue.cfg.declare;
    let mut reported_ready = false;
    // After a reload, the consumer this one replaces keeps the state
    // (shared with it) until this one consumes.
    if queue.takes_over().is_none_or(|p| p.stop.is_cancelled()) {
        queue.activity.set_state(ConsumerState::Starting);
    }
    loop {
        if queue.stop.is_cancelled() || conn_lost.is_cancelled() {
            break;
        }
        let started = std::time::Instant::now();
        // The topology first, whatever the command: the app's messages
        // wait in the queue rather than being dropped as unroutable.
        let declaring = if declared {
            Ok(())
        } else {
            broker::declare_topology(&conn, &queue.cfg).await
        };
        let end = match declaring {
            Err(e) if queue.takes_over().is_some() && e.contains("other arguments") => {
                // A reload changed the queue's arguments, and the broker
                // refuses them: the consumer of the running config stays.
                tracing::error!(
                    queue = %queue.name,
                    "reload: the new settings of the queue cannot be applied ({e}): key \
                     `arguments` (or `queue_type`) differs from the queue on the broker; the \
                     consumer of the previous settings keeps running"
                );
                shared.registry.keep_previous(&queue);
                return;
            }
            Err(e) => End::ChannelError(e),
            Ok(()) => {
                declared = true;
                // The settings of a reload are accepted: the consumer they
                // replace ends (its running jobs finish).
                if let Some(previous) = queue.takes_over() {
                    previous.stop.cancel();
                }
                match command_available(&queue.cfg) {
                    Err(why) => End::Paused {
                        why,
                        requeued: false,
                    },
                    Ok(_) => consume(&queue, &conn, &shared, &conn_lost, &mut reported_ready).await,
                }
            }
        };
        // A queue that ran well for a while starts its backoff over.
        if started.elapsed() > PAUSE_MAX {
            pause = PAUSE_MIN;
            channel_retry = CHANNEL_RETRY;
        }
        let wait = match end {
            End::Stopped => break,
            End::Paused { why, requeued } => {
                queue.stats.paused.store(1, Relaxed);
                queue.activity.set_state(ConsumerState::Paused(why.clone()));
                if requeued {
                    tracing::error!(
                        queue = %queue.name,
                        "queue paused for {}s: {why}; messages were requeued without counting an attempt",
                        pause.as_secs()
                    );
                } else {
                    tracing::error!(
                        queue = %queue.name,
                        "queue paused: {why}; checking again in {}s",
                        pause.as_secs()
                    );
                }
                let wait = pause;
                pause = (pause * 2).min(PAUSE_MAX);
                wait
            }
            End::ChannelError(e) => {
                if !conn.status().connected() {
                    break;
                }
                queue
                    .activity
                    .set_state(ConsumerState::ChannelError(e.clone()));
                tracing::error!(
                    queue = %queue.name,
                    "{e}; reopening the channel in {}s",
                    channel_retry.as_secs()
                );
                // A queue deleted meanwhile is declared again.
                declared = !queue.cfg.declare;
                let wait = channel_retry;
                channel_retry = (channel_retry * 2).min(CHANNEL_RETRY_MAX);
                wait
            }
        };
        // The service is up; this queue says in the log what it waits for.
        if !reported_ready {
            reported_ready = true;
            shared.readiness.queue_ready(false);
        }
        if !sleep_or_stop(wait, &queue, &conn_lost).await {
            break;
        }
    }
}

async fn sleep_or_stop(d: Duration, queue: &QueueState, conn_lost: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = queue.stop.cancelled() => false,
        _ = conn_lost.cancelled() => false,
    }
}

async fn consume(
    queue: &Arc<QueueState>,
    conn: &Arc<Connection>,
    shared: &Arc<Shared>,
    conn_lost: &CancellationToken,
    reported_ready: &mut bool,
) -> End {
    let cfg = &queue.cfg;
    let parts = Arc::new(job::Parts {
        memory: shared.memory.clone(),
        budget: shared.budget.clone(),
        registry: shared.registry.clone(),
        interrupt: shared.drain.interrupt.clone(),
        signing_key: shared.signing_key.clone(),
        activity: shared.activity.clone(),
    });
    let channel = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => return End::ChannelError(format!("cannot open a channel: {e}")),
    };
    if let Err(e) = channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
    {
        return End::ChannelError(format!("cannot enable publisher confirms: {e}"));
    }
    // The adaptive prefetch, as the queue's jobs last left it.
    let mut wanted = queue.adaptive.as_ref().map(|a| a.subscribe());
    let prefetch = match &mut wanted {
        Some(w) => *w.borrow_and_update(),
        None => queue.effective_prefetch(),
    };
    if let Err(e) = channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
    {
        return End::ChannelError(format!("cannot set prefetch: {e}"));
    }
    let timeout = consumer_timeout(cfg);
    let mut args = FieldTable::default();
    args.insert(
        "x-consumer-timeout".into(),
        AMQPValue::LongLongInt(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)),
    );
    let mut consumer = match channel
        .basic_consume(
            cfg.name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            args.clone(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) if e.to_string().contains("consumer-timeout") => {
            return End::ChannelError(format!(
                "cannot consume from \"{}\": the broker refuses x-consumer-timeout = {}ms \
                 (key `consumer_timeout`): {e}",
                cfg.name,
                timeout.as_millis()
            ));
        }
        Err(e) => {
            return End::ChannelError(format!("cannot consume from \"{}\": {e}", cfg.name));
        }
    };
    queue.stats.paused.store(0, Relaxed);
    tracing::info!(
        queue = %queue.name,
        concurrency = cfg.concurrency,
        prefetch,
        "consuming"
    );
    queue.activity.set_state(ConsumerState::Consuming);
    // The consumer replaced by a prefetch change: its deliveries come first.
    let mut draining: Option<Consumer> = None;
    if !*reported_ready {
        *reported_ready = true;
        shared.readiness.queue_ready(true);
    }

    // Jobs settle on the channel their delivery came from, and stop
    // waiting when it is lost (a consumer_timeout closes the channel alone).
    let lost = conn_lost.child_token();
    broker::watch_lost(lost.clone(), {
        let channel = channel.clone();
        move || channel.status().connected()
    });
    let settler = Settler {
        channel: SettleChannel::new(channel.clone(), conn),
        conn: conn.clone(),
        lost: lost.clone(),
    };
    // The jobs started on this channel, which must settle before it closes.
    let jobs = TaskTracker::new();
    let mut pauses = queue.pause.subscribe();
    pauses.borrow_and_update();
    let global = &shared.global;
    let end = loop {
        let slot = tokio::select! {
            biased;
            _ = queue.stop.cancelled() => break End::Stopped,
            _ = conn_lost.cancelled() => break End::Stopped,
            _ = pauses.changed() => break paused(queue),
            Some(n) = prefetch_change(&mut wanted), if draining.is_none() => {
                match switch_prefetch(&channel, &queue.name, &args, &mut consumer, &mut draining, n).await {
                    Ok(()) => continue,
                    Err(e) => break End::ChannelError(e),
                }
            }
            p = queue.slots.clone().acquire_owned() => p.expect("queue semaphore is never closed"),
        };
        // The global slot before the delivery, so that the delivery does
        // not wait for one unacked; given up while idle if another queue
        // waits for it.
        let mut global_slot = tokio::select! {
            biased;
            _ = queue.stop.cancelled() => break End::Stopped,
            _ = conn_lost.cancelled() => break End::Stopped,
            _ = pauses.changed() => break paused(queue),
            p = global.acquire() => Some(p),
        };
        let next = loop {
            tokio::select! {
                biased;
                _ = queue.stop.cancelled() => break None,
                _ = conn_lost.cancelled() => break None,
                _ = pauses.changed() => break Some(None),
                d = next_delivery(&mut draining, &mut consumer) => break Some(Some(d)),
                Some(n) = prefetch_change(&mut wanted), if draining.is_none() => {
                    if let Err(e) = switch_prefetch(&channel, &queue.name, &args, &mut consumer, &mut draining, n).await {
                        break Some(Some(Some(Err(e))));
                    }
                }
                _ = global.contended(), if global_slot.is_some() && global.capped() => {
                    global_slot = None;
                }
            }
        };
        let next = match next {
            None => break End::Stopped,
            Some(None) => break paused(queue),
            Some(Some(d)) => d,
        };
        let delivery = match next {
            None => break End::ChannelError("the broker cancelled the consumer".into()),
            Some(Err(e)) => break End::ChannelError(e),
            Some(Ok(d)) => d,
        };
        let _held = shared.budget.delivery_arrived();
        let _waiting = metrics::Raised::new(&queue.stats.held);
        if queue.cfg.max_rate.is_some() {
            tokio::select! {
                biased;
                _ = queue.stop.cancelled() => {
                    nack_requeue(&delivery, conn_lost).await;
                    break End::Stopped;
                }
                _ = conn_lost.cancelled() => break End::Stopped,
                _ = queue.rate_turn() => {}
            }
        }
        if !delivery.acker.usable() {
            // Buffered before its channel died: the broker has already requeued it.
            continue;
        }
        if !shared.budget.claim_job() {
            // Every job left under `--max-jobs` is running. Hand this one
            // back, and wait: one of them may still end without an ack.
            nack_requeue(&delivery, conn_lost).await;
            drop(slot);
            drop(global_slot);
            tokio::select! {
                biased;
                _ = queue.stop.cancelled() => break End::Stopped,
                _ = conn_lost.cancelled() => break End::Stopped,
                _ = shared.budget.claim_freed() => continue,
            }
        }
        // A slot given up while idle: the delivery waits for one, in turn.
        // On shutdown or reload it goes back instead.
        let global_slot = match global_slot {
            Some(p) => p,
            None => tokio::select! {
                biased;
                _ = queue.stop.cancelled() => {
                    nack_requeue(&delivery, conn_lost).await;
                    shared.budget.unclaim_job();
                    break End::Stopped;
                }
                _ = conn_lost.cancelled() => {
                    shared.budget.unclaim_job();
                    break End::Stopped;
                }
                p = global.acquire() => p,
            },
        };
        let permits = Permits {
            _queue: slot,
            _global: global_slot,
            // Counted before the job is spawned, so that a shutdown's
            // settle limit never sees it without its worker.
            worker: queue.stats.worker_starting(),
        };
        shared.drain.tracker.spawn(jobs.track_future(job::handle(
            delivery,
            settler.clone(),
            queue.clone(),
            parts.clone(),
            permits,
        )));
    };

    if matches!(end, End::Stopped | End::Paused { .. }) && channel.status().connected() {
        if let Some(mut old) = draining {
            stop_consumer(&channel, &mut old, &queue.name, conn_lost).await;
        }
        stop_consumer(&channel, &mut consumer, &queue.name, conn_lost).await;
    }
    if channel.status().connected() {
        shared.drain.close_channel_after(channel, jobs);
    } else {
        lost.cancel();
    }
    end
}

/// The next delivery: those of a consumer replaced by a prefetch change
/// first, until its end, then the current consumer's. A channel error comes
/// as its text.
async fn next_delivery(
    draining: &mut Option<Consumer>,
    consumer: &mut Consumer,
) -> Option<Result<Delivery, String>> {
    if let Some(old) = draining {
        match old.next().await {
            Some(d) => return Some(d.map_err(|e| format!("channel error: {e}"))),
            None => *draining = None,
        }
    }
    consumer
        .next()
        .await
        .map(|d| d.map_err(|e| format!("channel error: {e}")))
}

/// The prefetch the queue's jobs now want; never ready without an adaptive
/// prefetch.
async fn prefetch_change(wanted: &mut Option<tokio::sync::watch::Receiver<u16>>) -> Option<u16> {
    match wanted {
        Some(w) => {
            w.changed().await.ok()?;
            Some(*w.borrow_and_update())
        }
        None => std::future::pending().await,
    }
}

/// Applies a new prefetch. RabbitMQ applies a `basic.qos` to the consumers
/// started after it, so the consumer is cancelled and started again: the
/// deliveries the old one already has are started first (`draining`), and
/// no delivery is sent to both. Bounded by [`CANCEL_LIMIT`] (a blocked
/// connection answers nothing); an error rebuilds the channel.
async fn switch_prefetch(
    channel: &lapin::Channel,
    queue: &str,
    args: &FieldTable,
    consumer: &mut Consumer,
    draining: &mut Option<Consumer>,
    prefetch: u16,
) -> Result<(), String> {
    let switch = async {
        channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                args.clone(),
            )
            .await
    };
    let fresh = match tokio::time::timeout(CANCEL_LIMIT, switch).await {
        Ok(Ok(fresh)) => fresh,
        Ok(Err(e)) => {
            return Err(format!(
                "cannot consume from \"{queue}\" again with prefetch {prefetch}: {e}"
            ));
        }
        Err(_) => {
            return Err(format!(
                "the broker did not answer within {}s when the consumer of \"{queue}\" was \
                 started again with prefetch {prefetch}",
                CANCEL_LIMIT.as_secs()
            ));
        }
    };
    *draining = Some(std::mem::replace(consumer, fresh));
    tracing::debug!(queue = %queue, prefetch, "prefetch changed");
    Ok(())
}

/// A pause a job asked for, for the reason it gave.
fn paused(queue: &QueueState) -> End {
    End::Paused {
        why: queue.pause.borrow().clone(),
        requeued: true,
    }
}

/// Cancels the consumer and hands back the deliveries it had buffered but not
/// started, so that other consumers get them now.
async fn stop_consumer(
    channel: &lapin::Channel,
    consumer: &mut Consumer,
    name: &str,
    conn_lost: &CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + CANCEL_LIMIT;
    let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
    tokio::select! {
        _ = cancel => {}
        _ = conn_lost.cancelled() => return,
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!(queue = %name, "the broker did not confirm cancelling the consumer within {}s", CANCEL_LIMIT.as_secs());
        }
    }
    let (mut returned, mut pending) = (0, 0);
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(50), consumer.next()).await
    {
        if nack_requeue_by(&d, conn_lost, deadline).await {
            returned += 1;
        } else {
            pending += 1;
        }
    }
    if returned > 0 {
        tracing::debug!(queue = %name, returned, "returned prefetched messages to the queue");
    }
    if pending > 0 {
        tracing::warn!(
            queue = %name,
            "{pending} prefetched message(s) could not be handed back within {}s \
             (is the connection blocked?); they go back to the queue when the connection closes",
            CANCEL_LIMIT.as_secs()
        );
    }
}

/// Puts a delivery that was not started back in its queue. Does not wait on
/// a lost connection, nor longer than [`CANCEL_LIMIT`]: the broker requeues
/// the delivery itself when the connection closes.
async fn nack_requeue(d: &Delivery, conn_lost: &CancellationToken) {
    let deadline = tokio::time::Instant::now() + CANCEL_LIMIT;
    if !nack_requeue_by(d, conn_lost, deadline).await {
        tracing::warn!(
            "a message could not be handed back within {}s (is the connection blocked?); \
             it goes back to the queue when the connection closes",
            CANCEL_LIMIT.as_secs()
        );
    }
}

/// [`nack_requeue`] with a deadline: false if the deadline passed first.
/// (On a failed channel or connection the broker has requeued the delivery.)
async fn nack_requeue_by(
    d: &Delivery,
    conn_lost: &CancellationToken,
    deadline: tokio::time::Instant,
) -> bool {
    let nack = d.acker.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    });
    tokio::select! {
        _ = nack => true,
        _ = conn_lost.cancelled() => true,
        _ = tokio::time::sleep_until(deadline) => false,
    }
}

/// Checks that the queue's command can be started: it exists and is
/// executable (looked up in the worker's `PATH` when it has no slash), and
/// `working_dir` exists. Used before consuming and by `amqp-exec check`.
pub fn command_available(cfg: &QueueConfig) -> Result<PathBuf, String> {
    if let Some(dir) = &cfg.working_dir
        && !dir.is_dir()
    {
        return Err(format!("working_dir {} does not exist", dir.display()));
    }
    let program = resolve_command(
        &cfg.command[0],
        worker_path(cfg).as_deref(),
        cfg.working_dir.as_deref(),
    )?;
    if let Some(user) = &cfg.sandbox.user {
        let gid = cfg.sandbox.group.as_ref().map_or(user.gid, |(_, g)| *g);
        let mut gids = user.groups.clone();
        gids.push(gid);
        executable_by(&program, user.uid, &gids)
            .map_err(|e| format!("{e} by user {} (key `user`)", user.name))?;
    }
    Ok(program)
}

/// The `PATH` a queue's workers get: the queue's `env`, else the
/// supervisor's (which `clear_env` keeps).
pub fn worker_path(cfg: &QueueConfig) -> Option<std::ffi::OsString> {
    match cfg.env.get("PATH") {
        Some(p) => Some(p.into()),
        None => std::env::var_os("PATH"),
    }
}
