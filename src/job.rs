//! One delivery from start to settlement, the executor of the pure settle
//! step: asks [`settlement::admit`] whether the worker runs, runs it, and
//! carries out the [`settlement::plan`]: sends its republish and reply with
//! confirms, then acks or requeues. A message is acked only after its
//! outcome is safe: success, or a confirmed republish to the retry or
//! dead-letter queue. Anything else puts it back in its queue.
//!
//! A republish that the broker returns (its queue is missing) makes the job
//! declare the queue's topology again and retry once. If it still fails,
//! the run's outcome is kept in the instance's [`Memory`], the delivery goes
//! back, and the queue pauses: the next delivery of the message is settled
//! with that outcome, without running the worker again.
//!
//! A `JobGuard` does the end-of-job bookkeeping on every path, a panic
//! included; a job that panics before settling puts its delivery back.

use crate::broker;
use crate::config::OnConnectionLoss;
use crate::config::Replies;
use crate::headers;
use crate::memory::{Memory, MessageKey};
use crate::metrics::{self, RunningWorker, SpawnCause};
use crate::policy::{Decision, Outcome};
use crate::publish::{self, PublishError, SettleChannel};
use crate::runner::{self, Job, LogContext};
use crate::settlement::{
    self, Admission, Context, Delivered, Ended, Known, Plan, Recorded, ReplyBody, Settle,
    TraceHeaders,
};
use crate::signing::SigningKey;
use crate::state::activity::{self, Activity, JobEnd, RunningJob};
use crate::state::{JobBudget, QueueState, Registry};
use crate::trace::{self, JobTrace};
use lapin::options::BasicNackOptions;
use lapin::types::ShortString;
use lapin::{Connection, message::Delivery};
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

pub use crate::settlement::{
    ATTEMPT_HEADER, ATTEMPTS_HEADER, DELIVERY_COUNT_HEADER, DROPPED_HEADER, EXIT_HEADER,
    FAILED_AT_HEADER, QUEUE_HEADER, STDERR_HEADER, USER_ID_HEADER,
};

/// `AMQP_EXEC_HEADERS` larger than this is not passed (the kernel limits one
/// environment string to 128 KiB); `AMQP_EXEC_HEADERS_OMITTED` says so.
pub const MAX_HEADERS_ENV: usize = 64 * 1024;

/// Held for a job: the queue's concurrency slot and the global one (until
/// its worker is gone), and its worker's count in the running workers.
pub struct Permits {
    pub _queue: OwnedSemaphorePermit,
    pub _global: OwnedSemaphorePermit,
    pub worker: RunningWorker,
}

/// The parts of the supervisor's shared state that jobs use.
pub struct Parts {
    /// What the instance remembers of messages across deliveries.
    pub memory: Arc<Memory>,
    /// `--max-jobs` and the idle clock.
    pub budget: Arc<JobBudget>,
    /// For the queues no reply may go to.
    pub registry: Arc<Registry>,
    /// Kills running workers (the shutdown grace expired).
    pub interrupt: CancellationToken,
    pub signing_key: SigningKey,
    /// The jobs in progress, for the status page.
    pub activity: Arc<Activity>,
}

/// The channel a delivery came from, and what a job needs to settle on it.
#[derive(Clone)]
pub struct Settler {
    pub channel: SettleChannel,
    /// For declaring the topology again when a republish finds it missing.
    pub conn: Arc<Connection>,
    /// Cancelled when the channel or its connection is lost: settling then
    /// stops waiting, as an ack or publish caught in it may never be
    /// answered, and `on_connection_loss = "kill"` stops the worker.
    pub lost: CancellationToken,
}

/// How a job's settlement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// The delivery was acked (success, drop, retry or dead letter).
    Acked,
    /// Put back in its queue.
    Requeued,
    /// The channel or connection was lost first: the broker requeues it.
    Lost,
}

/// Runs the job for `delivery` and settles it on the channel it came from.
pub async fn handle(
    delivery: Delivery,
    settler: Settler,
    queue: Arc<QueueState>,
    parts: Arc<Parts>,
    permits: Permits,
) {
    let worker = permits.worker;
    // Given back when the worker is gone (see below).
    let mut slots = Some((permits._queue, permits._global));
    let cfg = &queue.cfg;
    let props = &delivery.properties;
    let key = MessageKey::of(&queue.name, props, &delivery.data);
    let (recorded, connection_losses) = parts.memory.begin(&key);
    let mut guard = JobGuard::new(&delivery, &queue, &parts, key, worker);
    let d = Delivered {
        properties: props,
        redelivered: delivery.redelivered,
        body: &delivery.data,
    };
    let known = Known {
        stopping: parts.interrupt.is_cancelled(),
        connection_losses,
        recorded: recorded.as_ref(),
    };
    let mut admission = settlement::admit(d, cfg, known, &parts.signing_key);
    let attempt = admission.attempt;
    let log = LogContext {
        queue: queue.name.clone(),
        message_id: props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        attempt,
    };
    let running = parts.activity.register(RunningJob::new(
        queue.name.clone(),
        &log.message_id,
        attempt,
        cfg.timeout,
    ));
    if admission.forged {
        metrics::inc(&queue.stats.forged_headers);
        tracing::warn!(
            queue = %log.queue, message_id = %log.message_id,
            "the message carries {ATTEMPT_HEADER} or {USER_ID_HEADER} without a valid signature \
             (set by its publisher, or signed with another key_file): they are ignored"
        );
    }
    let trace = start_trace(&delivery, &queue, &admission);
    let own_queues = parts.registry.own_queues();
    let reply_to = d.reply_to();
    let reply_allowed =
        reply_to.is_some_and(|to| settlement::reply_allowed(to, cfg, &own_queues).is_ok());
    let mut pid = None;
    let (ended, ran) = match admission.skip.take() {
        None => {
            let mut env = message_env(&delivery, &queue, attempt, admission.user_id.as_deref());
            env.extend(trace.worker_env().map(|(k, v)| (k, Cow::Owned(v))));
            let job = Job {
                command: &cfg.command,
                base_env: &queue.base_env,
                message_env: &env,
                working_dir: cfg.working_dir.as_deref(),
                sandbox: &cfg.sandbox,
                body: &delivery.data,
                timeout: cfg.timeout,
                kill_grace: cfg.kill_grace,
                capture_stdout: if reply_allowed {
                    cfg.max_reply_bytes
                } else {
                    0
                },
                max_log_lines: cfg.max_log_lines,
                log: &log,
                pid_to: Some(&running.job.pid),
            };
            let lost = (cfg.on_connection_loss == OnConnectionLoss::Kill).then_some(&settler.lost);
            // A retry carries the first publish's timestamp: not a wait.
            if let (1, Some(ts)) = (attempt, props.timestamp()) {
                queue.stats.observe_queue_wait(*ts, SystemTime::now());
            }
            let span = trace.spawn(&cfg.command[0]);
            let run = runner::run(job, &parts.interrupt, lost);
            let (result, long_job) = match &queue.adaptive {
                // While the prefetch is raised, a job that runs long lowers
                // it at once, not only when it ends.
                Some(adaptive) if adaptive.raised() => {
                    tokio::pin!(run);
                    tokio::select! {
                        biased;
                        r = &mut run => (r, None),
                        _ = tokio::time::sleep(crate::prefetch::LONG) => {
                            let long = LongJob::started(adaptive);
                            (run.await, Some(long))
                        }
                    }
                }
                _ => (run.await, None),
            };
            span.exited(result.pid, &result.outcome);
            pid = result.pid;
            if let Some(kind) = result.spawn_error {
                queue.stats.count_spawn_failure(SpawnCause::of(Some(kind)));
            }
            let ran = result.pid.map(|_| result.elapsed);
            if let (Some(adaptive), Some(elapsed)) = (&queue.adaptive, ran) {
                adaptive.job_ended(elapsed);
            }
            drop(long_job);
            let ended = Ended {
                outcome: result.outcome,
                stderr_or_reason: result.stderr_or_reason,
                stdout: result.stdout,
                stdout_truncated: result.stdout_truncated,
            };
            (ended, ran)
        }
        Some(ended) => {
            log_skip(&log, &ended, recorded.is_some());
            (ended, None)
        }
    };
    guard.worker_done();
    // The worker is gone: its slots go back now, and the next job starts
    // before this one settles (a confirmed republish waits a round trip),
    // unless the command could not be started, whose pause must come first.
    if ended.outcome != Outcome::SpawnFailed {
        slots = None;
        tokio::task::yield_now().await;
    }
    running.job.settling.store(true, Ordering::Relaxed);
    if let Some(elapsed) = ran {
        queue.stats.observe_duration(elapsed);
        // Exit codes are counted by count_status, without a label.
        if !matches!(ended.outcome, Outcome::Exit(_)) {
            queue.stats.count_exit(ended.outcome.label());
        }
        count_status(&queue, &ended.outcome);
    }
    #[cfg(debug_assertions)]
    test_fault::panic_once_if_asked(&log.message_id);

    let ctx = Context {
        frame_max: settler.channel.frame_max(),
        now: SystemTime::now(),
        key: &parts.signing_key,
        own_queues: &own_queues,
        trace: trace.traceparent().map(|traceparent| TraceHeaders {
            traceparent,
            tracestate: trace.tracestate(),
        }),
    };
    let plan = settlement::plan(d, cfg, &admission, &ended, ctx);
    if let (Some(why), Some(to)) = (&plan.refused_reply, reply_to) {
        metrics::inc(&queue.stats.refused_replies);
        if cfg.replies == Replies::Off {
            if !queue
                .replies_off_noted
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::info!(queue = %log.queue, "replies = \"off\": messages with reply_to get no reply");
            }
        } else {
            tracing::warn!(
                queue = %log.queue, message_id = %log.message_id,
                "no reply to {to:?}: {why}; the job is settled as usual"
            );
        }
    }
    log_plan(
        &queue,
        &log,
        &plan,
        &ended,
        ran,
        settler.channel.frame_max(),
    );
    guard.settling();
    let settled = tokio::select! {
        biased;
        settled = execute(&plan, &delivery, &settler, &queue, &parts.memory, &guard.key, attempt, &ended, &log, &trace) => settled,
        _ = settler.lost.cancelled() => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "the channel or connection was lost while the job was being settled; the broker will redeliver the message");
            Settled::Lost
        }
    };
    drop(slots);
    let acked = settled == Settled::Acked;
    if acked {
        count(&queue, plan.decision);
    } else if plan.decision != Decision::Requeue && settled == Settled::Lost {
        metrics::inc(&queue.stats.unsettled);
    }
    guard.finish(acked);
    note_activity(
        &queue,
        plan.decision,
        settled,
        &ended,
        ran.is_some(),
        &running.job,
    );
    trace.finish(&trace::JobEnd {
        pid,
        outcome: Some(&ended.outcome),
        settled: match (settled, plan.decision) {
            (Settled::Lost, _) => "lost",
            (Settled::Requeued, _) => "requeue",
            (Settled::Acked, d) => decision_label(d),
        },
    });
    if ended.outcome == Outcome::SpawnFailed {
        let why = String::from_utf8_lossy(&ended.stderr_or_reason).into_owned();
        queue.pause.send_modify(|last| *last = why);
    }
}

/// A running job past [`crate::prefetch::LONG`], until dropped.
struct LongJob<'a>(&'a crate::prefetch::Adaptive);

impl<'a> LongJob<'a> {
    fn started(adaptive: &'a crate::prefetch::Adaptive) -> Self {
        adaptive.long_job_started();
        LongJob(adaptive)
    }
}

impl Drop for LongJob<'_> {
    fn drop(&mut self) {
        self.0.long_job_ended();
    }
}

/// Counts a worker's exit code, signal or timeout.
fn count_status(queue: &QueueState, outcome: &Outcome) {
    match *outcome {
        Outcome::Exit(code) => queue.stats.count_exit_code(code),
        Outcome::Signal(sig) => queue.stats.count_signal(sig),
        Outcome::Timeout => metrics::inc(&queue.stats.timeouts),
        _ => {}
    }
}

/// Counts a settled job under its decision; a success ends the queue's
/// failure streak, a retry or dead letter adds to it.
fn count(queue: &QueueState, decision: Decision) {
    let stats = &queue.stats;
    match decision {
        Decision::Ack => stats.job_succeeded(SystemTime::now()),
        Decision::Retry { .. } | Decision::DeadLetter => stats.job_failed(),
        Decision::Drop | Decision::Requeue => {}
    }
    metrics::inc(match decision {
        Decision::Ack => &stats.ok,
        Decision::Drop => &stats.dropped,
        Decision::Retry { .. } => &stats.retried,
        Decision::DeadLetter => &stats.dead,
        Decision::Requeue => &stats.requeued,
    });
}

/// Tells the status page how the job ended: its rates, and its failure and
/// dead letter if any.
fn note_activity(
    queue: &QueueState,
    decision: Decision,
    settled: Settled,
    ended: &Ended,
    ran: bool,
    job: &RunningJob,
) {
    let end = match (settled, decision) {
        (Settled::Acked, Decision::Ack) => JobEnd::Ok,
        (Settled::Acked, Decision::Drop) => JobEnd::Dropped,
        (Settled::Acked, Decision::Retry { .. }) => JobEnd::Retried,
        (Settled::Acked, Decision::DeadLetter) => JobEnd::Dead,
        (Settled::Acked | Settled::Requeued, _) | (Settled::Lost, Decision::Requeue) => {
            JobEnd::Requeued
        }
        (Settled::Lost, _) => JobEnd::Unsettled,
    };
    let failed = !matches!(ended.outcome, Outcome::Exit(0) | Outcome::Interrupted)
        && (ran || ended.outcome == Outcome::SpawnFailed);
    let failure = failed.then(|| activity::Failure {
        at: SystemTime::now(),
        message_id: job.message_id.to_string(),
        attempt: job.attempt,
        exit: ended.outcome.label(),
        stderr_tail: ended.stderr_or_reason.clone(),
    });
    let dead = (end == JobEnd::Dead).then(|| activity::DeadLetter {
        at: SystemTime::now(),
        message_id: job.message_id.to_string(),
        attempt: job.attempt,
        why: match ended.outcome {
            Outcome::Exit(code) => format!("exit {code}"),
            Outcome::Signal(_) => format!("killed by {}", ended.outcome.label()),
            Outcome::Timeout => "timed out".to_owned(),
            // No worker ran: the supervisor's own reason.
            _ => activity::bounded(
                &String::from_utf8_lossy(&ended.stderr_or_reason),
                activity::MAX_REASON_CHARS,
            ),
        },
    });
    queue.activity.job_ended(end, failure, dead);
}

fn decision_label(d: Decision) -> &'static str {
    match d {
        Decision::Ack => "ack",
        Decision::Drop => "drop",
        Decision::Retry { .. } => "retry",
        Decision::DeadLetter => "dead",
        Decision::Requeue => "requeue",
    }
}

/// The job's trace context: the message's, continued; counts an invalid
/// one.
fn start_trace(delivery: &Delivery, queue: &QueueState, admission: &Admission) -> JobTrace {
    let props = &delivery.properties;
    let h = props.headers().as_ref();
    let trace = JobTrace::start(&trace::Delivery {
        queue: &queue.name,
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        delivery_tag: delivery.delivery_tag,
        message_id: props.message_id().as_ref().map(|s| s.as_str()),
        correlation_id: props.correlation_id().as_ref().map(|s| s.as_str()),
        body_size: delivery.data.len(),
        attempt: admission.attempt,
        headers: h,
        // Our own signed retry: its traceparent is the previous attempt's.
        retried: !admission.forged && headers::int(h, ATTEMPT_HEADER).is_some(),
    });
    if trace.invalid.is_some() {
        metrics::inc(&queue.stats.invalid_trace_context);
    }
    trace
}

/// Says why a worker was not started.
fn log_skip(log: &LogContext, ended: &Ended, recorded: bool) {
    let why = String::from_utf8_lossy(&ended.stderr_or_reason);
    match ended.outcome {
        Outcome::Interrupted => {}
        _ if recorded => tracing::info!(
            queue = %log.queue, message_id = %log.message_id, attempt = log.attempt,
            "the outcome of an earlier run is known (exit {}); settling the message without running a worker",
            ended.outcome.label()
        ),
        _ => tracing::warn!(
            queue = %log.queue, message_id = %log.message_id, attempt = log.attempt,
            "{why}; dead-lettering without running a worker"
        ),
    }
}

/// Logs what the plan is about to do.
fn log_plan(
    queue: &QueueState,
    log: &LogContext,
    plan: &Plan,
    ended: &Ended,
    ran: Option<std::time::Duration>,
    frame_max: usize,
) {
    // Built only for the lines that print it.
    let label = || ended.outcome.label();
    let attempt = log.attempt;
    let ms = ran.unwrap_or_default().as_millis();
    match plan.decision {
        Decision::Ack => {
            tracing::debug!(queue = %log.queue, message_id = %log.message_id, attempt, ms, "job done");
        }
        Decision::Drop => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id, attempt, exit = %label(), "dropping the message as exit_codes says");
        }
        Decision::Requeue if ended.outcome == Outcome::SpawnFailed => {
            // One error per pause is logged by the consumer loop.
            tracing::debug!(
                queue = %log.queue, message_id = %log.message_id,
                "{}; requeueing the message without counting an attempt",
                String::from_utf8_lossy(&ended.stderr_or_reason)
            );
        }
        Decision::Requeue => {
            tracing::info!(queue = %log.queue, message_id = %log.message_id, attempt, exit = %label(), "requeueing the message");
        }
        Decision::Retry {
            delay,
            next_attempt,
        } => {
            tracing::warn!(
                queue = %log.queue, message_id = %log.message_id, attempt, exit = %label(), ms,
                "job failed; retry {next_attempt}/{} in {}", queue.cfg.policy.max_attempts,
                crate::config::format_duration(delay)
            );
        }
        Decision::DeadLetter => {
            let tail = String::from_utf8_lossy(&ended.stderr_or_reason);
            tracing::error!(
                queue = %log.queue, message_id = %log.message_id, attempt, exit = %label(), ms,
                "job failed for good; dead-lettering to {}{}", queue.cfg.dead_queue(),
                tail.lines().rfind(|l| !l.trim().is_empty()).map(|l| format!(": {l}")).unwrap_or_default()
            );
        }
    }
    if let Some(r) = &plan.republish
        && !r.dropped.is_empty()
    {
        tracing::warn!(
            queue = %log.queue, message_id = %log.message_id,
            "the message's headers do not fit the connection's frame_max ({} bytes) beside amqp-exec's: \
             dropped {} of them from the copy sent to {} ({}: {})",
            frame_max, r.dropped.len(), r.queue, DROPPED_HEADER, r.dropped.join(", ")
        );
    }
}

/// Carries out `plan` for `delivery`.
#[allow(clippy::too_many_arguments)]
async fn execute(
    plan: &Plan,
    delivery: &Delivery,
    settler: &Settler,
    queue: &QueueState,
    memory: &Memory,
    key: &MessageKey,
    attempt: u32,
    ended: &Ended,
    log: &LogContext,
    trace: &JobTrace,
) -> Settled {
    // The republish and the reply are boxed: their futures are large, and
    // inline they would make every job's future (moved whole when its task
    // is spawned) as large, though most jobs only ack.
    if let Some(r) = &plan.republish
        && let Err(e) = trace
            .send(&r.queue)
            .around(Box::pin(republish(
                settler,
                queue,
                &r.queue,
                &delivery.data,
                &r.properties,
                log,
            )))
            .await
    {
        tracing::error!(
            queue = %log.queue, message_id = %log.message_id,
            "could not republish to {}: {e}; the message goes back to its queue, and its outcome is \
             kept so that it is settled without running again",
            r.queue
        );
        memory.record(
            key.clone(),
            Recorded {
                attempt,
                ended: ended.clone(),
            },
        );
        let requeued = requeue(delivery, log).await;
        queue
            .pause
            .send_modify(|why| *why = format!("could not republish to {}: {e}", r.queue));
        return requeued;
    }
    if let Some(reply) = &plan.reply {
        let body: &[u8] = match reply.body {
            ReplyBody::Stdout => &ended.stdout,
            ReplyBody::StderrTail(max) => {
                &ended.stderr_or_reason[ended.stderr_or_reason.len().saturating_sub(max)..]
            }
        };
        if ended.stdout_truncated && reply.body == ReplyBody::Stdout {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "worker output exceeds max_reply_bytes; the reply is cut");
        }
        let to = reply.to.as_str();
        let sent = Box::pin(publish::publish_reply(
            &settler.channel,
            to,
            body,
            reply.properties.clone(),
            reply.mandatory,
        ));
        match trace.send(to).around(sent).await {
            Ok(()) => {}
            Err(e @ (PublishError::Broker(_) | PublishError::TimedOut)) => {
                tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                    "could not send the reply to {to}: {e}");
                if reply.required {
                    return requeue(delivery, log).await;
                }
            }
            Err(e) => {
                // The dead letter is safe, or the result is not deliverable
                // anyway: the caller is gone or the queue does not exist.
                tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                    "reply to {to} not delivered ({e}): the caller is gone or the queue does not exist");
            }
        }
    }
    let span = trace.settle(match plan.settle {
        Settle::Ack => "ack",
        Settle::Requeue => "nack",
    });
    let settled = match plan.settle {
        Settle::Ack => ack(delivery, &settler.channel, log).await,
        Settle::Requeue => requeue(delivery, log).await,
    };
    span.end((settled == Settled::Lost).then_some(&"the channel closed first"));
    settled
}

/// Publishes a retry or dead letter to `target` with confirms. When the
/// broker returns it (the queue is missing) and the queue's topology is
/// ours to declare, declares it again and retries once.
async fn republish(
    settler: &Settler,
    queue: &QueueState,
    target: &str,
    body: &[u8],
    props: &lapin::BasicProperties,
    log: &LogContext,
) -> Result<(), PublishError> {
    let send = || publish::publish_confirmed(&settler.channel, "", target, body, props.clone());
    match send().await {
        Err(PublishError::Returned(why)) if queue.cfg.declare => {
            tracing::warn!(
                queue = %log.queue, message_id = %log.message_id,
                "{target} is missing ({why}): declaring the queue's topology again"
            );
            if let Err(e) = broker::declare_topology(&settler.conn, &queue.cfg).await {
                tracing::error!(queue = %log.queue, "{e}");
                return Err(PublishError::Returned(why));
            }
            send().await
        }
        other => other,
    }
}

/// Acks `delivery`.
async fn ack(delivery: &Delivery, channel: &SettleChannel, log: &LogContext) -> Settled {
    let acked = channel.ack(delivery).await;
    match acked {
        Ok(true) => Settled::Acked,
        Ok(false) => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "the channel closed before the job could be acked; the broker will redeliver the message");
            Settled::Lost
        }
        Err(e) => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "ack failed ({e}); the broker will redeliver the message");
            Settled::Lost
        }
    }
}

async fn requeue(delivery: &Delivery, log: &LogContext) -> Settled {
    let opts = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    match delivery.acker.nack(opts).await {
        Ok(true) => Settled::Requeued,
        Ok(false) | Err(_) => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "the channel closed before the message could be requeued; the broker requeues it itself");
            Settled::Lost
        }
    }
}

/// The end-of-job bookkeeping, done on every path: the worker and running
/// counts, the instance's memory of messages in hand, `--max-jobs`. A job
/// dropped before it began settling (a panic) puts its delivery back.
struct JobGuard<'a> {
    acker: lapin::Acker,
    queue: &'a QueueState,
    parts: &'a Parts,
    key: MessageKey,
    worker: Option<RunningWorker>,
    /// Whether the delivery still needs settling by the guard.
    unsettled: bool,
    acked: Option<bool>,
}

impl<'a> JobGuard<'a> {
    fn new(
        delivery: &Delivery,
        queue: &'a QueueState,
        parts: &'a Parts,
        key: MessageKey,
        worker: RunningWorker,
    ) -> Self {
        // The memory counts the job as begun (see `Memory::begin`).
        JobGuard {
            acker: delivery.acker.clone(),
            queue,
            parts,
            key,
            worker: Some(worker),
            unsettled: true,
            acked: None,
        }
    }

    /// The worker has ended (or was never started).
    fn worker_done(&mut self) {
        // Counted by the consumer before this job was spawned.
        self.worker = None;
    }

    /// Settling begins: from here on the executor settles the delivery.
    fn settling(&mut self) {
        self.unsettled = false;
    }

    fn finish(mut self, acked: bool) {
        self.acked = Some(acked);
    }
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        self.worker_done();
        let acked = self.acked.unwrap_or(false);
        self.parts.memory.ended(&self.key, acked);
        if self.unsettled {
            tracing::error!(
                queue = %self.queue.name,
                "a job ended abnormally before its message was settled; putting the message back in its queue"
            );
            let acker = self.acker.clone();
            tokio::spawn(async move {
                let _ = acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await;
            });
        }
        self.parts.budget.job_finished(acked);
    }
}

/// The `AMQP_EXEC_*` variables describing this delivery. Values are
/// borrowed from the delivery where they need no change.
fn message_env<'a>(
    delivery: &'a Delivery,
    queue: &'a QueueState,
    attempt: u32,
    user_id: Option<&'a str>,
) -> Vec<(&'static str, Cow<'a, str>)> {
    let p = &delivery.properties;
    let short =
        |v: &'a Option<ShortString>| v.as_ref().map_or(Cow::Borrowed(""), |s| clean(s.as_str()));
    // Room for the trace variables the job adds.
    let mut env = Vec::with_capacity(20);
    env.push(("AMQP_EXEC_QUEUE", Cow::Borrowed(&*queue.name)));
    env.push(("AMQP_EXEC_MESSAGE_ID", short(p.message_id())));
    env.push(("AMQP_EXEC_CORRELATION_ID", short(p.correlation_id())));
    env.push(("AMQP_EXEC_REPLY_TO", short(p.reply_to())));
    env.push((
        "AMQP_EXEC_ROUTING_KEY",
        clean(delivery.routing_key.as_str()),
    ));
    env.push(("AMQP_EXEC_EXCHANGE", clean(delivery.exchange.as_str())));
    env.push((
        "AMQP_EXEC_REDELIVERED",
        Cow::Borrowed(if delivery.redelivered { "1" } else { "0" }),
    ));
    env.push(("AMQP_EXEC_ATTEMPT", Cow::Owned(attempt.to_string())));
    env.push((
        "AMQP_EXEC_MAX_ATTEMPTS",
        Cow::Owned(queue.cfg.policy.max_attempts.to_string()),
    ));
    env.push(("AMQP_EXEC_CONTENT_TYPE", short(p.content_type())));
    if let Some(ts) = p.timestamp() {
        env.push(("AMQP_EXEC_TIMESTAMP", Cow::Owned(ts.to_string())));
    }
    // Only the broker-checked user: the property, or a signed header.
    if let Some(u) = user_id {
        env.push(("AMQP_EXEC_USER_ID", clean(u)));
    }
    let json = match p.headers() {
        Some(t) if !t.inner().is_empty() => {
            serde_json::to_string(&headers::to_json(t)).unwrap_or_else(|_| "{}".into())
        }
        _ => String::new(),
    };
    if json.len() > MAX_HEADERS_ENV {
        env.push((
            "AMQP_EXEC_HEADERS_OMITTED",
            Cow::Owned(json.len().to_string()),
        ));
        env.push(("AMQP_EXEC_HEADERS", Cow::Borrowed("{}")));
    } else if json.is_empty() {
        env.push(("AMQP_EXEC_HEADERS", Cow::Borrowed("{}")));
    } else {
        // JSON escapes control characters: it holds no NUL byte.
        env.push(("AMQP_EXEC_HEADERS", Cow::Owned(json)));
    }
    env
}

/// Environment values cannot hold NUL bytes; drop them.
fn clean(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', ""))
    } else {
        Cow::Borrowed(s)
    }
}

/// A fault for the tests, in debug builds only: the job of the message whose
/// id is `AMQP_EXEC_TEST_PANIC_ID` panics once, after its worker ran and
/// before it is settled.
#[cfg(debug_assertions)]
mod test_fault {
    use std::sync::atomic::{AtomicBool, Ordering};

    static FIRED: AtomicBool = AtomicBool::new(false);

    pub fn panic_once_if_asked(message_id: &str) {
        if message_id.is_empty() {
            return;
        }
        if std::env::var("AMQP_EXEC_TEST_PANIC_ID").is_ok_and(|id| id == message_id)
            && !FIRED.swap(true, Ordering::SeqCst)
        {
            panic!("test fault: AMQP_EXEC_TEST_PANIC_ID = {message_id}");
        }
    }
}
