//! One delivery from start to settlement: builds the worker's environment,
//! runs it, asks the policy what to do, and records the outcome with the
//! broker. A message is acked only after its outcome is safe: success, or a
//! confirmed republish to the retry or dead-letter queue. Anything else puts
//! it back in its queue.

use crate::config::{OnConnectionLoss, QueueType};
use crate::headers;
use crate::metrics::{self, QueueStats};
use crate::policy::{self, Decision, Outcome};
use crate::publish::{self, ConfirmChannel};
use crate::runner::{self, Job, LogContext};
use crate::supervisor::{QueueState, Shared};
use lapin::options::BasicNackOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, message::Delivery};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

/// Our attempt counter header: the attempt number the delivery will be.
pub const ATTEMPT_HEADER: &str = "x-amqp-exec-attempt";
/// Quorum queues count redeliveries here.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
pub const EXIT_HEADER: &str = "x-amqp-exec-exit";
pub const ATTEMPTS_HEADER: &str = "x-amqp-exec-attempts";
pub const STDERR_HEADER: &str = "x-amqp-exec-stderr";
pub const FAILED_AT_HEADER: &str = "x-amqp-exec-failed-at";
pub const QUEUE_HEADER: &str = "x-amqp-exec-queue";
/// The original `user_id` property of a republished message.
pub const USER_ID_HEADER: &str = "x-amqp-exec-user-id";

/// `AMQP_EXEC_HEADERS` larger than this is not passed (the kernel limits one
/// environment string to 128 KiB); `AMQP_EXEC_HEADERS_OMITTED` says so.
pub const MAX_HEADERS_ENV: usize = 64 * 1024;

/// Held for the life of a job: the queue's concurrency slot and the global one.
pub struct Permits {
    pub _queue: OwnedSemaphorePermit,
    pub _global: OwnedSemaphorePermit,
}

/// Runs the job for `delivery` and settles it on `channel`, the channel it
/// came from. `conn_lost` is cancelled when that channel's connection is
/// lost: settling then stops waiting, as an ack or publish caught in the
/// broken connection may never be answered.
pub async fn handle(
    delivery: Delivery,
    channel: ConfirmChannel,
    queue: Arc<QueueState>,
    shared: Arc<Shared>,
    permits: Permits,
    conn_lost: CancellationToken,
) {
    let cfg = &queue.cfg;
    let props = &delivery.properties;
    let hdrs = props.headers().as_ref();
    // Only a quorum queue counts redeliveries, and only a redelivery can
    // have been counted: on another queue, or on a quorum queue's first
    // delivery (which the broker passes on as published), the header can
    // only come from a publisher (a message forwarded from a quorum queue,
    // say), and would count runs that never happened here.
    let delivery_count = match cfg.queue_type {
        QueueType::Quorum if delivery.redelivered => headers::int(hdrs, DELIVERY_COUNT_HEADER),
        _ => None,
    };
    let attempt = policy::attempt_number(headers::int(hdrs, ATTEMPT_HEADER), delivery_count);
    let log = LogContext {
        queue: queue.name.clone(),
        message_id: props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        attempt,
    };

    metrics::inc(&queue.stats.running);
    let delivery_limit = match cfg.arguments.get("x-delivery-limit") {
        Some(crate::config::ArgValue::Int(n)) => Some(*n),
        _ => None,
    };
    let result = if policy::redelivered_too_often(delivery_count, delivery_limit) {
        let n = delivery_count.unwrap_or_default();
        tracing::warn!(
            queue = %log.queue, message_id = %log.message_id, attempt,
            "the queue returned the message {n} times without a run finishing; dead-lettering without running a worker"
        );
        not_run(
            Outcome::Redelivered,
            format!(
                "returned to its queue {n} times (x-delivery-count) without a run finishing: runs \
                 cut short (the supervisor stopped or lost its connection while they ran), or \
                 deliveries handed back unstarted"
            ),
        )
    } else if shared.interrupt.is_cancelled() {
        // The shutdown grace ran out before this job started.
        not_run(Outcome::Interrupted, "the supervisor was stopping".into())
    } else if delivery.data.len() > cfg.max_body_bytes {
        tracing::warn!(
            queue = %log.queue, message_id = %log.message_id,
            "body of {} bytes exceeds max_body_bytes ({}); dead-lettering without running a worker",
            delivery.data.len(), cfg.max_body_bytes
        );
        not_run(
            Outcome::TooLarge,
            format!(
                "body of {} bytes exceeds max_body_bytes = {}",
                delivery.data.len(),
                cfg.max_body_bytes
            ),
        )
    } else {
        let env = message_env(&delivery, &queue, attempt);
        let job = Job {
            command: &cfg.command,
            base_env: &queue.base_env,
            message_env: &env,
            working_dir: cfg.working_dir.as_deref(),
            sandbox: &cfg.sandbox,
            body: &delivery.data,
            timeout: cfg.timeout,
            kill_grace: cfg.kill_grace,
            capture_stdout: if reply_to(&delivery).is_some() {
                cfg.max_reply_bytes
            } else {
                0
            },
            max_log_lines: cfg.max_log_lines,
            log: &log,
        };
        let connection_lost =
            (cfg.on_connection_loss == OnConnectionLoss::Kill).then_some(&conn_lost);
        runner::run(job, &shared.interrupt, connection_lost).await
    };
    metrics::dec(&queue.stats.running);
    // Counted by the consumer before this job was spawned.
    shared.worker_ended();
    if result.pid.is_some() {
        queue.stats.observe_duration(result.elapsed);
        queue.stats.count_exit(result.outcome.label());
    }

    let decision = policy::decide(result.outcome, attempt, &cfg.policy);
    let settled = tokio::select! {
        biased;
        settled = settle(&delivery, &channel, &queue, &log, attempt, &result, decision) => settled,
        _ = conn_lost.cancelled() => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "the connection was lost while the job was being settled; the broker will redeliver the message");
            false
        }
    };
    drop(permits);
    if !settled && decision != Decision::Requeue {
        metrics::inc(&queue.stats.unsettled);
    }
    shared.job_finished(settled && decision != Decision::Requeue);
    if result.outcome == Outcome::SpawnFailed {
        let why = String::from_utf8_lossy(&result.stderr_tail).into_owned();
        queue.spawn_failed.send_modify(|last| *last = why);
    }
}

/// The result of a job whose worker was not started, for `reason`.
fn not_run(outcome: Outcome, reason: String) -> runner::JobResult {
    runner::JobResult {
        outcome,
        pid: None,
        stderr_tail: reason.into_bytes(),
        stdout: Vec::new(),
        stdout_truncated: false,
        elapsed: Duration::ZERO,
    }
}

/// Records the decision with the broker; true if the original was acked.
async fn settle(
    delivery: &Delivery,
    channel: &ConfirmChannel,
    queue: &QueueState,
    log: &LogContext,
    attempt: u32,
    result: &runner::JobResult,
    decision: Decision,
) -> bool {
    let stats: &QueueStats = &queue.stats;
    let label = result.outcome.label();
    let ms = result.elapsed.as_millis();
    match decision {
        Decision::Ack => {
            tracing::debug!(queue = %log.queue, message_id = %log.message_id, attempt, ms, "job done");
            if !send_reply(delivery, channel, result, attempt, log, false).await {
                requeue(delivery, log).await;
                return false;
            }
            let ok = ack(delivery, channel, log).await;
            if ok {
                metrics::inc(&stats.ok);
            }
            ok
        }
        Decision::Drop => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id, attempt, exit = %label, "dropping the message as exit_codes says");
            if !send_reply(delivery, channel, result, attempt, log, false).await {
                requeue(delivery, log).await;
                return false;
            }
            let ok = ack(delivery, channel, log).await;
            if ok {
                metrics::inc(&stats.dropped);
            }
            ok
        }
        Decision::Requeue => {
            if result.outcome == Outcome::SpawnFailed {
                metrics::inc(&stats.spawn_failures);
                // One error per pause is logged by the consumer loop.
                tracing::debug!(
                    queue = %log.queue, message_id = %log.message_id,
                    "{}; requeueing the message without counting an attempt",
                    String::from_utf8_lossy(&result.stderr_tail)
                );
            } else {
                tracing::info!(queue = %log.queue, message_id = %log.message_id, attempt, exit = %label, "requeueing the message");
            }
            metrics::inc(&stats.requeued);
            requeue(delivery, log).await;
            false
        }
        Decision::Retry {
            delay,
            next_attempt,
        } => {
            let target = queue.cfg.retry_queue(delay);
            let failure = None;
            tracing::warn!(
                queue = %log.queue, message_id = %log.message_id, attempt, exit = %label, ms,
                "job failed; retry {next_attempt}/{} in {}", queue.cfg.policy.max_attempts,
                crate::config::format_duration(delay)
            );
            let mut table = copy_headers(delivery.properties.headers().as_ref());
            table.insert(
                ATTEMPT_HEADER.into(),
                AMQPValue::LongInt(next_attempt as i32),
            );
            table.insert(EXIT_HEADER.into(), long_string(&label));
            let props = republished(&delivery.properties, table);
            republish_then_ack(
                delivery,
                channel,
                &target,
                props,
                log,
                &stats.retried,
                failure,
            )
            .await
        }
        Decision::DeadLetter => {
            let tail = String::from_utf8_lossy(&result.stderr_tail);
            tracing::error!(
                queue = %log.queue, message_id = %log.message_id, attempt, exit = %label, ms,
                "job failed for good; dead-lettering to {}{}", queue.cfg.dead_queue(),
                tail.lines().rfind(|l| !l.trim().is_empty()).map(|l| format!(": {l}")).unwrap_or_default()
            );
            let mut table = copy_headers(delivery.properties.headers().as_ref());
            table.insert(EXIT_HEADER.into(), long_string(&label));
            table.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(attempt as i32));
            table.insert(
                FAILED_AT_HEADER.into(),
                long_string(&humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
            );
            table.insert(QUEUE_HEADER.into(), long_string(&log.queue));
            if table.contains_key(ATTEMPT_HEADER) {
                table.inner_mut_remove(ATTEMPT_HEADER);
            }
            let room = stderr_room(&table, channel.frame_max());
            table.insert(STDERR_HEADER.into(), long_string(last_bytes(&tail, room)));
            let props = republished(&delivery.properties, table);
            let target = queue.cfg.dead_queue();
            let failure = Some((result, attempt));
            republish_then_ack(delivery, channel, &target, props, log, &stats.dead, failure).await
        }
    }
}

/// Republishes to `target` with confirms, sends the failure reply if
/// `failure` is given and the message has `reply_to`, then acks (also when
/// the failure reply could not be sent).
async fn republish_then_ack(
    delivery: &Delivery,
    channel: &ConfirmChannel,
    target: &str,
    props: BasicProperties,
    log: &LogContext,
    counter: &std::sync::atomic::AtomicU64,
    failure: Option<(&runner::JobResult, u32)>,
) -> bool {
    match publish::publish_confirmed(channel, "", target, &delivery.data, props).await {
        Ok(()) => {
            // The dead letter is safe: a failure reply that cannot be sent
            // does not run the job again (the caller's wait times out).
            if let Some((result, attempt)) = failure {
                send_reply(delivery, channel, result, attempt, log, true).await;
            }
            let ok = ack(delivery, channel, log).await;
            if ok {
                metrics::inc(counter);
            }
            ok
        }
        Err(e) => {
            tracing::error!(
                queue = %log.queue, message_id = %log.message_id,
                "could not republish to {target}: {e}; putting the message back in its queue"
            );
            // Slow down a loop on a broken retry or dead-letter queue.
            tokio::time::sleep(Duration::from_secs(1)).await;
            requeue(delivery, log).await;
            false
        }
    }
}

fn reply_to(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|r| r.as_str())
        .filter(|r| !r.is_empty())
}

/// Publishes the job's result to the message's `reply_to`, with its
/// `correlation_id`: stdout on success; on a final failure, the stderr tail
/// (also in the `x-amqp-exec-stderr` header). Returns false only if the
/// channel failed or the broker did not confirm: a request whose reply is
/// its result is then not acked, so that it runs again. A reply
/// that cannot be delivered (the caller is gone, the queue does not exist)
/// is logged and the request is acked all the same.
async fn send_reply(
    delivery: &Delivery,
    channel: &ConfirmChannel,
    result: &runner::JobResult,
    attempt: u32,
    log: &LogContext,
    failure: bool,
) -> bool {
    let Some(to) = reply_to(delivery) else {
        return true;
    };
    let mut h = FieldTable::default();
    h.insert(EXIT_HEADER.into(), long_string(&result.outcome.label()));
    h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongInt(attempt as i32));
    let body: &[u8] = if failure {
        h.insert(
            STDERR_HEADER.into(),
            long_string(&String::from_utf8_lossy(&result.stderr_tail)),
        );
        &result.stderr_tail
    } else {
        &result.stdout
    };
    if result.stdout_truncated && !failure {
        tracing::warn!(queue = %log.queue, message_id = %log.message_id,
            "worker output exceeds max_reply_bytes; the reply is cut");
        h.insert("x-amqp-exec-truncated".into(), AMQPValue::Boolean(true));
    }
    let direct = to.starts_with("amq.rabbitmq.reply-to");
    let mut props = BasicProperties::default()
        .with_headers(h)
        .with_delivery_mode(if direct { 1 } else { 2 });
    if let Some(c) = delivery.properties.correlation_id() {
        props = props.with_correlation_id(c.clone());
    }
    match publish::publish_reply(channel, to, body, props).await {
        Ok(()) => true,
        Err(e @ (publish::PublishError::Broker(_) | publish::PublishError::TimedOut)) => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "could not send the reply to {to}: {e}");
            false
        }
        Err(e) => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "reply to {to} not delivered ({e}): the caller is gone or the queue does not exist");
            true
        }
    }
}

async fn ack(delivery: &Delivery, channel: &ConfirmChannel, log: &LogContext) -> bool {
    match channel.ack(delivery).await {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "the channel closed before the job could be acked; the broker will redeliver the message");
            false
        }
        Err(e) => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "ack failed ({e}); the broker will redeliver the message");
            false
        }
    }
}

async fn requeue(delivery: &Delivery, log: &LogContext) {
    let opts = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    match delivery.acker.nack(opts).await {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            tracing::warn!(queue = %log.queue, message_id = %log.message_id,
                "the channel closed before the message could be requeued; the broker requeues it itself");
        }
    }
}

/// The properties of a retry or dead letter: the original ones with new
/// headers, and without a per-message TTL (`expiration`), which would let
/// the broker drop the message from the retry or dead-letter queue.
/// `user_id` moves to the `x-amqp-exec-user-id` header: the broker closes
/// the channel of a publish whose `user_id` is not the connection's user.
pub fn republished(original: &BasicProperties, mut headers: FieldTable) -> BasicProperties {
    if let Some(v) = original.user_id() {
        headers.insert(USER_ID_HEADER.into(), long_string(v.as_str()));
    }
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(original.delivery_mode().unwrap_or(2));
    if let Some(v) = original.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        props = props.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        props = props.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        props = props.with_cluster_id(v.clone());
    }
    props
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Room kept in a message's header frame for the properties besides the
/// headers (at most ten short strings and a few numbers) and the frame's own
/// bytes.
const PROPERTIES_RESERVE: usize = 3 * 1024;

/// How many bytes of stderr fit in the dead letter's `x-amqp-exec-stderr`
/// beside `table`: a header frame larger than the connection's `frame_max`
/// would make the broker close the connection.
fn stderr_room(table: &FieldTable, frame_max: usize) -> usize {
    // The header's key and its long string's type and length.
    let entry = 1 + STDERR_HEADER.len() + 1 + 4;
    frame_max.saturating_sub(PROPERTIES_RESERVE + headers::encoded_size(table) + entry)
}

/// The end of `text`, at most `max` bytes, cut at a character boundary.
fn last_bytes(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The headers to republish with: the original ones minus the quorum
/// queue's delivery count, which belongs to the old message.
fn copy_headers(table: Option<&FieldTable>) -> FieldTable {
    let mut t = table.cloned().unwrap_or_default();
    if t.contains_key(DELIVERY_COUNT_HEADER) {
        t.inner_mut_remove(DELIVERY_COUNT_HEADER);
    }
    t
}

trait RemoveKey {
    fn inner_mut_remove(&mut self, key: &str);
}

impl RemoveKey for FieldTable {
    fn inner_mut_remove(&mut self, key: &str) {
        let kept: std::collections::BTreeMap<ShortString, AMQPValue> = self
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        *self = FieldTable::from(kept);
    }
}

/// The `AMQP_EXEC_*` variables describing this delivery.
fn message_env(
    delivery: &Delivery,
    queue: &QueueState,
    attempt: u32,
) -> Vec<(&'static str, String)> {
    let p = &delivery.properties;
    let short = |v: &Option<ShortString>| v.as_ref().map(|s| clean(s.as_str())).unwrap_or_default();
    let mut env = Vec::with_capacity(16);
    env.push(("AMQP_EXEC_QUEUE", queue.name.to_string()));
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
        if delivery.redelivered { "1" } else { "0" }.to_owned(),
    ));
    env.push(("AMQP_EXEC_ATTEMPT", attempt.to_string()));
    env.push((
        "AMQP_EXEC_MAX_ATTEMPTS",
        queue.cfg.policy.max_attempts.to_string(),
    ));
    env.push(("AMQP_EXEC_CONTENT_TYPE", short(p.content_type())));
    if let Some(ts) = p.timestamp() {
        env.push(("AMQP_EXEC_TIMESTAMP", ts.to_string()));
    }
    let json = match p.headers() {
        Some(t) => serde_json::to_string(&headers::to_json(t)).unwrap_or_else(|_| "{}".into()),
        None => "{}".to_owned(),
    };
    if json.len() > MAX_HEADERS_ENV {
        env.push(("AMQP_EXEC_HEADERS_OMITTED", json.len().to_string()));
        env.push(("AMQP_EXEC_HEADERS", "{}".to_owned()));
    } else {
        env.push(("AMQP_EXEC_HEADERS", clean(&json)));
    }
    env
}

/// Environment values cannot hold NUL bytes; drop them.
fn clean(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn republishing_moves_user_id_to_a_header() {
        let original = BasicProperties::default()
            .with_user_id("app".into())
            .with_message_id("m1".into())
            .with_expiration("5000".into());
        let props = republished(&original, FieldTable::default());
        assert_eq!(props.user_id(), &None);
        assert_eq!(props.expiration(), &None);
        assert_eq!(props.message_id(), original.message_id());
        let h = props.headers().as_ref().unwrap();
        assert_eq!(h.inner().get(USER_ID_HEADER), Some(&long_string("app")));
        let plain = republished(&BasicProperties::default(), FieldTable::default());
        assert!(plain.headers().as_ref().unwrap().inner().is_empty());
    }

    #[test]
    fn last_bytes_cuts_at_a_character_boundary() {
        assert_eq!(last_bytes("héllo", 4), "llo");
        assert_eq!(last_bytes("héllo", 5), "éllo");
        assert_eq!(last_bytes("abc", 10), "abc");
        assert_eq!(last_bytes("abc", 0), "");
    }

    #[test]
    fn stderr_room_keeps_the_header_frame_within_frame_max() {
        let entry = 1 + STDERR_HEADER.len() + 1 + 4;
        let mut t = FieldTable::default();
        assert_eq!(
            stderr_room(&t, 131_072),
            131_072 - PROPERTIES_RESERVE - 4 - entry
        );
        t.insert("big".into(), long_string(&"v".repeat(130_000)));
        assert_eq!(stderr_room(&t, 131_072), 0);
        assert!(stderr_room(&t, usize::MAX) > 4096);
    }
}
