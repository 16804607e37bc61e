//! The settle step as pure decisions, no I/O.
//!
//! - [`admit`]: from a delivery's metadata and what this instance remembers
//!   of it, whether its worker runs, and as which attempt.
//! - [`plan`]: from the delivery and how its job ended, a [`Plan`]: the
//!   republish (retry or dead letter) and the reply to send, with their
//!   properties, then whether to ack or requeue the delivery.
//!
//! Every publish a plan makes fits the connection's `frame_max`: a larger
//! header frame would make the broker close the whole connection, and with
//! it every job's ack. A retry or dead letter leaves room besides for the
//! headers the broker adds when it dead-letters the message on
//! ([`broker_reserve`]): the retry comes back to the work queue with an
//! `x-death` entry, and a delivery larger than `frame_max` is refused by the
//! client, which closes the connection just the same. A dead letter's stderr tail is cut to the room left;
//! headers copied from the publisher are dropped, largest first, only until
//! ours (and the last `STDERR_KEPT` bytes of stderr) fit, and the names
//! dropped are recorded in [`DROPPED_HEADER`]. The retry, dead letter and
//! reply carry the job span's trace context ([`TraceHeaders`]) in place of
//! the publisher's. `job.rs` carries plans out.

use crate::config::{QueueConfig, QueueType, Replies};
use crate::headers;
use crate::policy::{self, Decision, Outcome};
use crate::signing::{SIGNATURE_HEADER, Signed, SigningKey};
use crate::trace::{TRACEPARENT, TRACESTATE};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::collections::HashSet;
use std::time::SystemTime;

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
/// A reply cut at `max_reply_bytes`.
pub const TRUNCATED_HEADER: &str = "x-amqp-exec-truncated";
/// Marks a reply, with the queue whose job sent it.
pub const REPLY_HEADER: &str = "x-amqp-exec-reply";
/// The names of the publisher's headers dropped so that a republish fits
/// the connection's `frame_max`.
pub const DROPPED_HEADER: &str = "x-amqp-exec-dropped-headers";
/// The longest [`DROPPED_HEADER`] value, in bytes.
const DROPPED_MAX: usize = 512;
/// The end of the stderr tail a dead letter keeps even when the publisher's
/// headers must be dropped for it; a longer tail is cut to the room left.
const STDERR_KEPT: usize = 512;

/// What the settle step reads of a delivery.
#[derive(Clone, Copy)]
pub struct Delivered<'a> {
    pub properties: &'a BasicProperties,
    pub redelivered: bool,
    pub body: &'a [u8],
}

/// What the settle step needs besides the delivery and its queue.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// The largest frame the connection takes.
    pub frame_max: usize,
    pub now: SystemTime,
    /// The key of signed control headers.
    pub key: &'a SigningKey,
    /// Every queue this supervisor consumes, retries to or dead-letters to:
    /// never a reply's destination.
    pub own_queues: &'a HashSet<String>,
    /// The job span's trace context, for the headers of every publish.
    pub trace: Option<TraceHeaders<'a>>,
}

/// A job span's W3C trace context, as header values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceHeaders<'a> {
    pub traceparent: &'a str,
    pub tracestate: Option<&'a str>,
}

impl TraceHeaders<'_> {
    fn entries(this: Option<Self>) -> impl Iterator<Item = (&'static str, AMQPValue)> {
        this.into_iter().flat_map(|t| {
            [
                Some((TRACEPARENT, long_string(t.traceparent))),
                t.tracestate.map(|s| (TRACESTATE, long_string(s))),
            ]
            .into_iter()
            .flatten()
        })
    }
}

impl Delivered<'_> {
    /// The `reply_to` property, when set and not empty.
    pub fn reply_to(&self) -> Option<&str> {
        self.properties
            .reply_to()
            .as_ref()
            .map(|r| r.as_str())
            .filter(|r| !r.is_empty())
    }

    fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    fn message_id(&self) -> &str {
        self.properties
            .message_id()
            .as_ref()
            .map_or("", |s| s.as_str())
    }
}

/// How a job ended, as far as settling it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub outcome: Outcome,
    /// The end of the worker's stderr, or why no worker ran.
    pub stderr_or_reason: Vec<u8>,
    /// The worker's stdout, kept when a reply is due.
    pub stdout: Vec<u8>,
    pub stdout_truncated: bool,
}

impl Ended {
    /// A job whose worker was not started, for `reason`.
    pub fn not_run(outcome: Outcome, reason: String) -> Ended {
        Ended {
            outcome,
            stderr_or_reason: reason.into_bytes(),
            stdout: Vec::new(),
            stdout_truncated: false,
        }
    }
}

/// The outcome of an earlier run of a message whose settlement could not be
/// carried out (its republish failed): the next delivery of the message is
/// settled with it, without running the worker again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub attempt: u32,
    pub ended: Ended,
}

/// What this instance knows of a delivery beyond its metadata.
#[derive(Default, Clone, Copy)]
pub struct Known<'a> {
    /// The supervisor is stopping and the shutdown grace ran out.
    pub stopping: bool,
    /// Connection losses in a row at which the message was being handled.
    pub connection_losses: u32,
    /// The outcome of a run of the message that is not settled yet.
    pub recorded: Option<&'a Recorded>,
}

/// Whether a delivery's worker runs, and what it is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub attempt: u32,
    /// The broker-checked user that published the message: its `user_id`
    /// property, else a signed `x-amqp-exec-user-id` of a republish.
    pub user_id: Option<String>,
    /// The message carried control headers without a valid signature
    /// (a publisher's): they were ignored.
    pub forged: bool,
    /// No worker runs: the job ended as this.
    pub skip: Option<Ended>,
}

/// The control headers of a delivery that verify against `key`: the
/// attempt and user-id headers, both or neither; and whether any were there
/// without a valid signature.
fn control_headers(
    d: Delivered<'_>,
    cfg: &QueueConfig,
    key: &SigningKey,
) -> (Option<i64>, Option<String>, bool) {
    let h = d.headers();
    let attempt = headers::int(h, ATTEMPT_HEADER);
    let user_id = headers::string(h, USER_ID_HEADER);
    if attempt.is_none() && user_id.is_none() {
        return (None, None, false);
    }
    let fields = Signed {
        queue: &cfg.name,
        message_id: d.message_id(),
        body: d.body,
        attempt,
        user_id: user_id.as_deref(),
    };
    match headers::string(h, SIGNATURE_HEADER) {
        Some(sig) if key.verify(&fields, &sig) => (attempt, user_id, false),
        _ => (None, None, true),
    }
}

/// Decides whether the delivery's worker runs, and its attempt number: our
/// own (signed) attempt header plus, on a quorum queue's redelivery, the
/// broker's count of returns.
pub fn admit(d: Delivered<'_>, cfg: &QueueConfig, known: Known<'_>, key: &SigningKey) -> Admission {
    let (own_attempt, signed_user, forged) = control_headers(d, cfg, key);
    let user_id = d
        .properties
        .user_id()
        .as_ref()
        .map(|u| u.as_str().to_owned())
        .or(signed_user);
    if let Some(r) = known.recorded {
        return Admission {
            attempt: r.attempt,
            user_id,
            forged,
            skip: Some(r.ended.clone()),
        };
    }
    // Only a quorum queue counts returns, and only a redelivery can have
    // been counted: elsewhere the header can only come from a publisher.
    let delivery_count = match cfg.queue_type {
        QueueType::Quorum if d.redelivered => headers::int(d.headers(), DELIVERY_COUNT_HEADER),
        _ => None,
    };
    let attempt = policy::attempt_number(own_attempt, delivery_count);
    let admission = Admission {
        attempt,
        user_id,
        forged,
        skip: None,
    };
    let skip = |outcome, reason: String| Admission {
        skip: Some(Ended::not_run(outcome, reason)),
        ..admission.clone()
    };
    if policy::redelivered_too_often(delivery_count, cfg.delivery_limit) {
        let n = delivery_count.unwrap_or_default();
        return skip(
            Outcome::Redelivered,
            format!(
                "returned to its queue {n} times (x-delivery-count) without a run finishing: runs \
                 cut short (the supervisor stopped or lost its connection while they ran), or \
                 deliveries handed back unstarted"
            ),
        );
    }
    if cfg.max_connection_losses > 0 && known.connection_losses >= cfg.max_connection_losses {
        return skip(
            Outcome::ConnectionLosses,
            format!(
                "the supervisor lost its broker connection {} times in a row while handling this \
                 message (max_connection_losses = {})",
                known.connection_losses, cfg.max_connection_losses
            ),
        );
    }
    if known.stopping {
        return skip(Outcome::Interrupted, "the supervisor was stopping".into());
    }
    if d.body.len() > cfg.max_body_bytes {
        return skip(
            Outcome::TooLarge,
            format!(
                "body of {} bytes exceeds max_body_bytes = {}",
                d.body.len(),
                cfg.max_body_bytes
            ),
        );
    }
    admission
}

/// Checks that a reply may go to `to`: never to a queue of this
/// supervisor's, and only where the queue's `replies` allows.
pub fn reply_allowed(
    to: &str,
    cfg: &QueueConfig,
    own_queues: &HashSet<String>,
) -> Result<(), String> {
    if own_queues.contains(to) {
        return Err("it is a queue amqp-exec consumes, retries to or dead-letters to".into());
    }
    match &cfg.replies {
        Replies::Off => Err("replies = \"off\"".into()),
        Replies::Direct
            if to.starts_with("amq.rabbitmq.reply-to") || to.starts_with("amq.gen-") =>
        {
            Ok(())
        }
        Replies::Direct => Err(
            "replies = \"direct\" allows only RabbitMQ's direct reply-to and server-named \
             (amq.gen-…) queues"
                .into(),
        ),
        Replies::Allow(names) => {
            let matches = |n: &String| match n.strip_suffix('*') {
                Some(prefix) => to.starts_with(prefix),
                None => to == n,
            };
            if names.iter().any(matches) {
                Ok(())
            } else {
                Err("it is not one of the queues `replies` names".into())
            }
        }
    }
}

/// What to do to settle one delivery, in order: the republish, then the
/// reply, then `settle`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub decision: Decision,
    /// The retry or dead letter; the delivery is acked only once the broker
    /// has confirmed it.
    pub republish: Option<Republish>,
    pub reply: Option<Reply>,
    /// Why the message's `reply_to` gets no reply, when it is refused.
    pub refused_reply: Option<String>,
    pub settle: Settle,
}

/// How the delivery itself is settled once the publishes are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    /// Back to its queue, not counted as an attempt.
    Requeue,
}

/// A copy of the message for the retry or dead-letter queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Republish {
    pub queue: String,
    pub properties: BasicProperties,
    /// The publisher's headers dropped to fit the frame.
    pub dropped: Vec<String>,
}

/// The reply to the message's `reply_to`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub to: String,
    pub properties: BasicProperties,
    pub body: ReplyBody,
    /// Returned as unroutable when no queue takes it. Not for direct
    /// reply-to, which the broker reports as unroutable when it delivers.
    pub mandatory: bool,
    /// The reply is the job's result: when it cannot be sent, the delivery
    /// goes back to its queue instead of being acked. A failure reply after
    /// a dead letter is not required.
    pub required: bool,
}

/// Which of the job's output a reply carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyBody {
    Stdout,
    /// The last this many bytes of the stderr tail.
    StderrTail(usize),
}

/// The settlement plan of a delivery admitted as `admission` whose job
/// ended as `ended`.
pub fn plan(
    d: Delivered<'_>,
    cfg: &QueueConfig,
    admission: &Admission,
    ended: &Ended,
    ctx: Context<'_>,
) -> Plan {
    let attempt = admission.attempt;
    let user_id = admission.user_id.as_deref();
    let decision = policy::decide(ended.outcome, attempt, &cfg.policy);
    // For the republish of a retry or dead letter only.
    let budget = || ctx.frame_max.saturating_sub(broker_reserve(cfg));
    // For the republish of a retry or dead letter only.
    let label = || long_string(&ended.outcome.label());
    let (reply, refused_reply) = match d.reply_to() {
        None => (None, None),
        Some(to) => match reply_allowed(to, cfg, ctx.own_queues) {
            Ok(()) => (Some(to), None),
            Err(why) => (None, Some(why)),
        },
    };
    let sign = |attempt: Option<u32>| {
        ctx.key.sign(&Signed {
            queue: &cfg.name,
            message_id: d.message_id(),
            body: d.body,
            attempt: attempt.map(i64::from),
            user_id,
        })
    };
    match decision {
        Decision::Ack | Decision::Drop => Plan {
            decision,
            republish: None,
            reply: reply.map(|to| make_reply(d, cfg, to, ended, attempt, false, ctx)),
            refused_reply,
            settle: Settle::Ack,
        },
        Decision::Requeue => Plan {
            decision,
            republish: None,
            reply: None,
            refused_reply: None,
            settle: Settle::Requeue,
        },
        Decision::Retry {
            delay,
            next_attempt,
        } => {
            let mut ours = vec![
                (ATTEMPT_HEADER, AMQPValue::LongInt(clamp_i32(next_attempt))),
                (EXIT_HEADER, label()),
                (SIGNATURE_HEADER, long_string(&sign(Some(next_attempt)))),
            ];
            ours.extend(TraceHeaders::entries(ctx.trace));
            Plan {
                decision,
                republish: Some(republish(
                    d,
                    cfg.retry_queue(delay),
                    ours,
                    user_id,
                    None,
                    budget(),
                )),
                reply: None,
                refused_reply: None,
                settle: Settle::Ack,
            }
        }
        Decision::DeadLetter => {
            let failed_at = humantime::format_rfc3339_seconds(ctx.now).to_string();
            let mut ours = vec![
                (EXIT_HEADER, label()),
                (ATTEMPTS_HEADER, AMQPValue::LongInt(clamp_i32(attempt))),
                (FAILED_AT_HEADER, long_string(&failed_at)),
                (QUEUE_HEADER, long_string(&cfg.name)),
                (SIGNATURE_HEADER, long_string(&sign(None))),
            ];
            ours.extend(TraceHeaders::entries(ctx.trace));
            let tail = String::from_utf8_lossy(&ended.stderr_or_reason);
            Plan {
                decision,
                republish: Some(republish(
                    d,
                    cfg.dead_queue(),
                    ours,
                    user_id,
                    Some(&tail),
                    budget(),
                )),
                reply: reply.map(|to| make_reply(d, cfg, to, ended, attempt, true, ctx)),
                refused_reply,
                settle: Settle::Ack,
            }
        }
    }
}

fn clamp_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Room a retry or dead letter of `cfg` leaves in the frame for the headers
/// the broker adds when it dead-letters it (from a retry queue back to the
/// work queue, or past a delivery limit): an `x-death` entry per queue and
/// reason, each naming the queue and routing key, and the
/// `x-first-death-*` and `x-last-death-*` headers; on quorum queues
/// `x-delivery-count` too.
pub fn broker_reserve(cfg: &QueueConfig) -> usize {
    let delays: std::collections::BTreeSet<_> = cfg.policy.backoff.iter().collect();
    let longest = delays
        .iter()
        .map(|d| cfg.retry_queue(**d).len())
        .chain([cfg.dead_queue().len()])
        .max()
        .unwrap_or(0);
    let entries = delays.len() + 2;
    512 + entries * (160 + 2 * longest) + 6 * (40 + longest)
}

/// The size of a long-string header entry named `key` holding `len` bytes.
fn entry_size(key: &str, len: usize) -> usize {
    1 + key.len() + 1 + 4 + len
}

/// The end of `text`, at most `max` bytes, cut at a character boundary.
pub fn last_bytes(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The start of `text`, at most `max` bytes, cut at a character boundary.
fn first_bytes(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A republish of the delivery to `queue` with our headers `ours` (and the
/// stderr tail, cut to the room left), the publisher's headers copied as far
/// as they fit in `frame_max`.
fn republish(
    d: Delivered<'_>,
    queue: String,
    mut ours: Vec<(&'static str, AMQPValue)>,
    user_id: Option<&str>,
    stderr: Option<&str>,
    frame_max: usize,
) -> Republish {
    let original = d.properties;
    if let Some(v) = user_id {
        ours.push((USER_ID_HEADER, long_string(v)));
    }
    // The old message's delivery count, our control headers (whether they
    // verified or not), its trace context (the job's replaces it, or none
    // goes on) and our other headers are replaced; the rest is the
    // publisher's, and may be dropped.
    let mut replaced: Vec<&str> = vec![
        TRACEPARENT,
        TRACESTATE,
        DELIVERY_COUNT_HEADER,
        ATTEMPT_HEADER,
        USER_ID_HEADER,
        SIGNATURE_HEADER,
        STDERR_HEADER,
        DROPPED_HEADER,
    ];
    replaced.extend(ours.iter().map(|(k, _)| *k));
    let earlier_drops = headers::string(d.headers(), DROPPED_HEADER);
    let mut table = d
        .headers()
        .map(|t| headers::without(t, &replaced))
        .unwrap_or_default();
    for (k, v) in ours {
        table.insert(k.into(), v);
    }
    let base = republished_properties(original);
    // The header frame without the table, which adds its encoded size.
    let base_size = headers::header_frame_size(&base);
    let stderr_len = stderr.map_or(0, |s| entry_size(STDERR_HEADER, s.len().min(STDERR_KEPT)));
    let size = |table: &FieldTable, dropped: &str| {
        let extra = if dropped.is_empty() {
            0
        } else {
            entry_size(DROPPED_HEADER, dropped.len())
        };
        base_size + headers::encoded_size(table) + extra
    };
    let mut dropped: Vec<String> = Vec::new();
    // The publisher's value is theirs to make as long as they like: cut
    // like any other.
    let mut dropped_value = dropped_list(earlier_drops.as_deref(), &[]);
    if size(&table, &dropped_value) + stderr_len > frame_max {
        // The publisher's headers, largest first.
        let mut copied: Vec<(usize, String)> = table
            .inner()
            .iter()
            .filter(|(k, _)| !replaced.contains(&k.as_str()))
            .map(|(k, v)| {
                let mut one = FieldTable::default();
                one.insert(k.clone(), v.clone());
                (headers::encoded_size(&one), k.as_str().to_owned())
            })
            .collect();
        copied.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, key) in copied {
            table = headers::without(&table, &[&key]);
            dropped.push(key);
            dropped_value = dropped_list(earlier_drops.as_deref(), &dropped);
            if size(&table, &dropped_value) + stderr_len <= frame_max {
                break;
            }
        }
    }
    if !dropped_value.is_empty() {
        table.insert(DROPPED_HEADER.into(), long_string(&dropped_value));
    }
    if let Some(tail) = stderr {
        let used = size(&table, "") + entry_size(STDERR_HEADER, 0);
        let room = frame_max.saturating_sub(used);
        table.insert(STDERR_HEADER.into(), long_string(last_bytes(tail, room)));
    }
    Republish {
        queue,
        properties: base.with_headers(table),
        dropped,
    }
}

/// The value of [`DROPPED_HEADER`]: earlier drops, then these, cut at
/// [`DROPPED_MAX`] bytes.
fn dropped_list(earlier: Option<&str>, now: &[String]) -> String {
    let mut all: Vec<&str> = earlier.into_iter().filter(|s| !s.is_empty()).collect();
    all.extend(now.iter().map(String::as_str));
    let joined = all.join(", ");
    if joined.len() <= DROPPED_MAX {
        joined
    } else {
        format!("{}…", first_bytes(&joined, DROPPED_MAX - '…'.len_utf8()))
    }
}

/// The properties of a retry or dead letter, its headers aside: the
/// original ones without a per-message TTL (`expiration`, which would let
/// the broker drop the message from the retry or dead-letter queue) and
/// without `user_id` (the broker closes the channel of a publish whose
/// `user_id` is not the connection's user; it moves to [`USER_ID_HEADER`]).
pub fn republished_properties(original: &BasicProperties) -> BasicProperties {
    let mut props =
        BasicProperties::default().with_delivery_mode(original.delivery_mode().unwrap_or(2));
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

/// The reply to `to`, the delivery's `reply_to`: stdout on success; on a
/// final failure (`failure`), the end of the stderr tail, at most
/// `reply_stderr_bytes`, also in the [`STDERR_HEADER`] header as far as it
/// fits the frame. [`REPLY_HEADER`] marks it as a reply.
fn make_reply(
    d: Delivered<'_>,
    cfg: &QueueConfig,
    to: &str,
    ended: &Ended,
    attempt: u32,
    failure: bool,
    ctx: Context<'_>,
) -> Reply {
    let frame_max = ctx.frame_max;
    let mut h = FieldTable::default();
    for (k, v) in TraceHeaders::entries(ctx.trace) {
        h.insert(k.into(), v);
    }
    h.insert(EXIT_HEADER.into(), long_string(&ended.outcome.label()));
    h.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongInt(clamp_i32(attempt)),
    );
    h.insert(REPLY_HEADER.into(), long_string(&cfg.name));
    if ended.stdout_truncated && !failure {
        h.insert(TRUNCATED_HEADER.into(), AMQPValue::Boolean(true));
    }
    let direct = to.starts_with("amq.rabbitmq.reply-to");
    let mut props = BasicProperties::default().with_delivery_mode(if direct { 1 } else { 2 });
    if let Some(c) = d.properties.correlation_id() {
        props = props.with_correlation_id(c.clone());
    }
    if failure && cfg.reply_stderr_bytes > 0 {
        let tail = String::from_utf8_lossy(&ended.stderr_or_reason);
        let used = headers::header_frame_size(&props.clone().with_headers(h.clone()))
            + entry_size(STDERR_HEADER, 0);
        let room = frame_max.saturating_sub(used).min(cfg.reply_stderr_bytes);
        h.insert(STDERR_HEADER.into(), long_string(last_bytes(&tail, room)));
    }
    Reply {
        to: to.to_owned(),
        properties: props.with_headers(h),
        body: if failure {
            ReplyBody::StderrTail(cfg.reply_stderr_bytes)
        } else {
            ReplyBody::Stdout
        },
        mandatory: !direct,
        required: !failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use proptest::prelude::*;
    use std::sync::LazyLock;

    static KEY: LazyLock<SigningKey> =
        LazyLock::new(|| SigningKey::from_secret(&[b'k'; 32], std::path::Path::new("k")).unwrap());
    static OWN: LazyLock<HashSet<String>> = LazyLock::new(|| {
        ["q", "q.dead", "q.retry.1s", "other"]
            .map(String::from)
            .into()
    });

    fn queue(extra: &str) -> QueueConfig {
        let text = format!(
            "[[queue]]\nname = \"q\"\ncommand = [\"/bin/true\"]\nmax_attempts = 3\nbackoff = [\"1s\"]\n{extra}"
        );
        config::parse(&text, std::path::Path::new("t.toml"), None)
            .unwrap()
            .queues
            .remove(0)
    }

    fn ended(outcome: Outcome) -> Ended {
        Ended {
            outcome,
            stderr_or_reason: b"oops\n".to_vec(),
            stdout: b"out".to_vec(),
            stdout_truncated: false,
        }
    }

    fn delivered(props: &BasicProperties) -> Delivered<'_> {
        Delivered {
            properties: props,
            redelivered: false,
            body: b"x",
        }
    }

    fn ctx(frame_max: usize) -> Context<'static> {
        Context {
            frame_max,
            now: SystemTime::UNIX_EPOCH,
            key: &KEY,
            own_queues: &OWN,
            trace: None,
        }
    }

    fn admitted(attempt: u32) -> Admission {
        Admission {
            attempt,
            user_id: None,
            forged: false,
            skip: None,
        }
    }

    /// The plan of the `attempt`-th run, admitted with no user.
    fn plan_of(d: Delivered<'_>, cfg: &QueueConfig, attempt: u32, e: &Ended, frame: usize) -> Plan {
        plan(d, cfg, &admitted(attempt), e, ctx(frame))
    }

    fn header<'a>(p: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
        p.headers().as_ref()?.inner().get(key)
    }

    fn skipped(a: &Admission) -> Option<Outcome> {
        a.skip.as_ref().map(|e| e.outcome)
    }

    const FRAME: usize = 131_072;

    #[test]
    fn admission_order_and_attempts() {
        let cfg = queue("queue_type = \"quorum\"");
        let mut h = FieldTable::default();
        h.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(1));
        let props = BasicProperties::default().with_headers(h);
        let mut d = delivered(&props);
        let none = Known::default();
        // The count is a publisher's on a first delivery.
        assert_eq!(admit(d, &cfg, none, &KEY), admitted(1));
        d.redelivered = true;
        assert_eq!(admit(d, &cfg, none, &KEY), admitted(2));
        let recorded = Recorded {
            attempt: 7,
            ended: ended(Outcome::Exit(1)),
        };
        let known = Known {
            recorded: Some(&recorded),
            ..none
        };
        let a = admit(d, &cfg, known, &KEY);
        assert_eq!((a.attempt, a.skip), (7, Some(ended(Outcome::Exit(1)))));
        let lost = Known {
            connection_losses: 3,
            ..none
        };
        assert_eq!(
            skipped(&admit(d, &cfg, lost, &KEY)),
            Some(Outcome::ConnectionLosses)
        );
        let off = queue("max_connection_losses = 0");
        assert_eq!(skipped(&admit(d, &off, lost, &KEY)), None);
        let stopping = Known {
            stopping: true,
            ..none
        };
        assert_eq!(
            skipped(&admit(d, &cfg, stopping, &KEY)),
            Some(Outcome::Interrupted)
        );
        let big = vec![b'x'; cfg.max_body_bytes + 1];
        d.body = &big;
        assert_eq!(
            skipped(&admit(d, &cfg, none, &KEY)),
            Some(Outcome::TooLarge)
        );
    }

    #[test]
    fn a_negative_delivery_limit_is_unlimited() {
        let cfg = queue("queue_type = \"quorum\"\n[queue.arguments]\nx-delivery-limit = -1\n");
        let mut h = FieldTable::default();
        h.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(500));
        let props = BasicProperties::default().with_headers(h);
        let d = Delivered {
            properties: &props,
            redelivered: true,
            body: b"x",
        };
        assert_eq!(admit(d, &cfg, Known::default(), &KEY), admitted(501));
        let limited = queue("queue_type = \"quorum\"\n[queue.arguments]\nx-delivery-limit = 5\n");
        assert_eq!(
            skipped(&admit(d, &limited, Known::default(), &KEY)),
            Some(Outcome::Redelivered)
        );
    }

    #[test]
    fn control_headers_count_only_when_signed_by_our_key() {
        let cfg = queue("");
        // A publisher's attempt and user id: ignored.
        let mut h = FieldTable::default();
        h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongInt(3));
        h.insert(USER_ID_HEADER.into(), long_string("admin"));
        let forged = BasicProperties::default()
            .with_message_id("m".into())
            .with_headers(h.clone());
        let a = admit(delivered(&forged), &cfg, Known::default(), &KEY);
        assert_eq!((a.attempt, a.user_id.as_deref(), a.forged), (1, None, true));
        h.insert(SIGNATURE_HEADER.into(), long_string("AAAA"));
        let badly = BasicProperties::default()
            .with_message_id("m".into())
            .with_headers(h);
        assert!(admit(delivered(&badly), &cfg, Known::default(), &KEY).forged);

        // Our own retry of a message from broker user "app": trusted.
        let original = BasicProperties::default()
            .with_message_id("m".into())
            .with_user_id("app".into());
        let first = admit(delivered(&original), &cfg, Known::default(), &KEY);
        assert_eq!(first.user_id.as_deref(), Some("app"));
        let retry = plan(
            delivered(&original),
            &cfg,
            &first,
            &ended(Outcome::Exit(1)),
            ctx(FRAME),
        );
        let rp = retry.republish.unwrap();
        let again = admit(delivered(&rp.properties), &cfg, Known::default(), &KEY);
        assert_eq!(
            (again.attempt, again.user_id.as_deref(), again.forged),
            (2, Some("app"), false)
        );
        // The same headers on another message, queue or key: not trusted.
        let other_body = Delivered {
            body: b"other",
            ..delivered(&rp.properties)
        };
        assert!(admit(other_body, &cfg, Known::default(), &KEY).forged);
        let mut other_queue = cfg.clone();
        other_queue.name = "r".into();
        assert!(
            admit(
                delivered(&rp.properties),
                &other_queue,
                Known::default(),
                &KEY
            )
            .forged
        );
        let other_key = SigningKey::random();
        assert!(
            admit(
                delivered(&rp.properties),
                &cfg,
                Known::default(),
                &other_key
            )
            .forged
        );
        // A forged header is not carried on.
        let f = admit(delivered(&forged), &cfg, Known::default(), &KEY);
        let fp = plan(
            delivered(&forged),
            &cfg,
            &f,
            &ended(Outcome::Exit(1)),
            ctx(FRAME),
        );
        let fr = fp.republish.unwrap();
        assert_eq!(header(&fr.properties, USER_ID_HEADER), None);
        assert_eq!(
            header(&fr.properties, ATTEMPT_HEADER),
            Some(&AMQPValue::LongInt(2))
        );
    }

    #[test]
    fn plans_for_each_decision() {
        let cfg = queue("");
        let props = BasicProperties::default()
            .with_message_id("m".into())
            .with_reply_to("amq.rabbitmq.reply-to.x".into())
            .with_user_id("app".into())
            .with_expiration("5000".into());
        let d = delivered(&props);
        let a = admit(d, &cfg, Known::default(), &KEY);

        let ok = plan(d, &cfg, &a, &ended(Outcome::Exit(0)), ctx(FRAME));
        assert_eq!(ok.settle, Settle::Ack);
        assert!(ok.republish.is_none());
        let r = ok.reply.unwrap();
        assert!(r.required && !r.mandatory);
        assert_eq!(r.body, ReplyBody::Stdout);
        assert_eq!(header(&r.properties, REPLY_HEADER), Some(&long_string("q")));

        let retry = plan(d, &cfg, &a, &ended(Outcome::Exit(1)), ctx(FRAME));
        let rp = retry.republish.unwrap();
        assert_eq!(rp.queue, "q.retry.1s");
        assert_eq!(
            header(&rp.properties, ATTEMPT_HEADER),
            Some(&AMQPValue::LongInt(2))
        );
        assert_eq!(
            header(&rp.properties, USER_ID_HEADER),
            Some(&long_string("app"))
        );
        assert!(header(&rp.properties, SIGNATURE_HEADER).is_some());
        assert_eq!(rp.properties.user_id(), &None);
        assert_eq!(rp.properties.expiration(), &None);
        assert!(retry.reply.is_none());

        let last = Admission {
            attempt: 3,
            ..a.clone()
        };
        let dead = plan(d, &cfg, &last, &ended(Outcome::Exit(1)), ctx(FRAME));
        let dp = dead.republish.unwrap();
        assert_eq!(dp.queue, "q.dead");
        assert_eq!(header(&dp.properties, ATTEMPT_HEADER), None);
        assert_eq!(
            header(&dp.properties, ATTEMPTS_HEADER),
            Some(&AMQPValue::LongInt(3))
        );
        assert_eq!(
            header(&dp.properties, STDERR_HEADER),
            Some(&long_string("oops\n"))
        );
        assert_eq!(
            header(&dp.properties, FAILED_AT_HEADER),
            Some(&long_string("1970-01-01T00:00:00Z"))
        );
        // A direct requester gets no stderr by default.
        let fr = dead.reply.unwrap();
        assert!(!fr.required);
        assert_eq!(fr.body, ReplyBody::StderrTail(0));
        assert_eq!(header(&fr.properties, STDERR_HEADER), None);

        let requeue = plan(d, &cfg, &a, &ended(Outcome::SpawnFailed), ctx(FRAME));
        assert_eq!(requeue.settle, Settle::Requeue);
        assert!(requeue.republish.is_none() && requeue.reply.is_none());
    }

    #[test]
    fn replies_go_only_where_allowed() {
        let direct = queue("");
        let off = queue("replies = \"off\"");
        let listed = queue("replies = [\"results\", \"reply.*\", \"q.dead\"]");
        for (to, cfg, ok) in [
            ("amq.rabbitmq.reply-to.g1h2", &direct, true),
            ("amq.gen-abc", &direct, true),
            ("results", &direct, false),
            ("other", &direct, false),
            ("amq.gen-abc", &off, false),
            ("results", &listed, true),
            ("reply.42", &listed, true),
            ("replyx", &listed, false),
            ("amq.gen-abc", &listed, false),
            // Never one of ours, whatever the list says.
            ("q.dead", &listed, false),
            ("q", &listed, false),
        ] {
            assert_eq!(reply_allowed(to, cfg, &OWN).is_ok(), ok, "{to}");
        }
        let props = BasicProperties::default().with_reply_to("other".into());
        let p = plan_of(
            delivered(&props),
            &direct,
            1,
            &ended(Outcome::Exit(0)),
            FRAME,
        );
        assert!(p.reply.is_none());
        assert!(p.refused_reply.unwrap().contains("consumes"));
        assert_eq!(p.settle, Settle::Ack);
        // A listed queue gets 4 KiB of stderr on failure by default.
        let props = BasicProperties::default().with_reply_to("results".into());
        let p = plan_of(
            delivered(&props),
            &listed,
            3,
            &ended(Outcome::Exit(1)),
            FRAME,
        );
        let r = p.reply.unwrap();
        assert_eq!(r.body, ReplyBody::StderrTail(4096));
        assert!(r.mandatory);
        assert_eq!(
            header(&r.properties, STDERR_HEADER),
            Some(&long_string("oops\n"))
        );
    }

    #[test]
    fn headers_that_fill_the_frame_are_dropped_and_named() {
        let cfg = queue("");
        for slack in [0usize, 16, 50, 500] {
            let mut h = FieldTable::default();
            h.insert("small".into(), long_string("keep me"));
            let base = BasicProperties::default().with_message_id("m".into());
            let probe = base.clone().with_headers({
                let mut t = h.clone();
                t.insert("big".into(), long_string(""));
                t
            });
            let pad = FRAME - slack - headers::header_frame_size(&probe);
            h.insert("big".into(), long_string(&"b".repeat(pad)));
            let props = base.with_headers(h);
            assert_eq!(headers::header_frame_size(&props), FRAME - slack);
            let d = delivered(&props);
            let retry = plan_of(d, &cfg, 1, &ended(Outcome::Exit(1)), FRAME);
            let rp = retry.republish.unwrap();
            // Our three headers, and the broker's need room.
            let room = broker_reserve(&cfg) + 120;
            assert_eq!(rp.dropped.is_empty(), slack >= room, "slack {slack}");
            // The dead letter of the retried message.
            let d2 = delivered(&rp.properties);
            let dead = plan_of(d2, &cfg, 3, &ended(Outcome::Exit(65)), FRAME);
            let dp = dead.republish.unwrap();
            for p in [&rp.properties, &dp.properties] {
                let limit = FRAME - broker_reserve(&cfg);
                assert!(headers::header_frame_size(p) <= limit, "slack {slack}");
                assert_eq!(header(p, "small"), Some(&long_string("keep me")));
                // "big" is either kept or named as dropped, never lost unsaid.
                let named = header(p, DROPPED_HEADER) == Some(&long_string("big"));
                assert!(header(p, "big").is_some() != named, "slack {slack}");
            }
            assert_eq!(
                header(&dp.properties, STDERR_HEADER),
                Some(&long_string("oops\n"))
            );
            if slack < 500 {
                assert!(header(&dp.properties, "big").is_none());
            }
        }
        // Room for our headers beside the broker's: nothing dropped.
        let reserve = broker_reserve(&cfg);
        assert!((1_000..8_000).contains(&reserve), "{reserve}");
        let mut h = FieldTable::default();
        h.insert(
            "big".into(),
            long_string(&"b".repeat(FRAME - reserve - 500)),
        );
        let props = BasicProperties::default().with_headers(h);
        let retry = plan_of(delivered(&props), &cfg, 1, &ended(Outcome::Exit(1)), FRAME);
        assert!(retry.republish.unwrap().dropped.is_empty());
    }

    const JOB_SPAN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn publishes_carry_the_job_span_not_the_publishers() {
        let cfg = queue("");
        let mut h = FieldTable::default();
        let publishers = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert(TRACEPARENT.into(), long_string(publishers));
        h.insert(TRACESTATE.into(), long_string("theirs=1"));
        h.insert("baggage".into(), long_string("k=v"));
        let props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to.x".into())
            .with_headers(h);
        let d = delivered(&props);
        let traced = Context {
            trace: Some(TraceHeaders {
                traceparent: JOB_SPAN,
                tracestate: Some("ours=2"),
            }),
            ..ctx(FRAME)
        };
        let retry = plan(d, &cfg, &admitted(1), &ended(Outcome::Exit(1)), traced);
        let dead = plan(d, &cfg, &admitted(3), &ended(Outcome::Exit(1)), traced);
        let ok = plan(d, &cfg, &admitted(1), &ended(Outcome::Exit(0)), traced);
        for p in [
            &retry.republish.unwrap().properties,
            &dead.republish.unwrap().properties,
            &dead.reply.unwrap().properties,
            &ok.reply.unwrap().properties,
        ] {
            assert_eq!(header(p, TRACEPARENT), Some(&long_string(JOB_SPAN)));
            assert_eq!(header(p, TRACESTATE), Some(&long_string("ours=2")));
        }
        // Without a job span (new_traces = false), the publisher's context
        // is not passed on as if it were the job's; baggage is theirs.
        let untraced = plan_of(d, &cfg, 1, &ended(Outcome::Exit(1)), FRAME);
        let rp = untraced.republish.unwrap().properties;
        assert_eq!(header(&rp, TRACEPARENT), None);
        assert_eq!(header(&rp, TRACESTATE), None);
        assert_eq!(header(&rp, "baggage"), Some(&long_string("k=v")));
    }

    #[test]
    fn trace_context_fits_the_frame_beside_full_headers() {
        let cfg = queue("");
        let state = (0..32)
            .map(|i| format!("k{i:02}={}", "v".repeat(10)))
            .collect::<Vec<_>>()
            .join(",");
        let trace = Some(TraceHeaders {
            traceparent: JOB_SPAN,
            tracestate: Some(&state),
        });
        for slack in [0usize, 100, 1000] {
            let base = BasicProperties::default().with_message_id("m".into());
            let mut h = FieldTable::default();
            h.insert("big".into(), long_string(""));
            let pad =
                FRAME - slack - headers::header_frame_size(&base.clone().with_headers(h.clone()));
            h.insert("big".into(), long_string(&"b".repeat(pad)));
            let props = base.with_headers(h);
            let d = delivered(&props);
            for attempt in [1, 3] {
                let p = plan(
                    d,
                    &cfg,
                    &admitted(attempt),
                    &ended(Outcome::Exit(1)),
                    Context {
                        trace,
                        ..ctx(FRAME)
                    },
                );
                let r = p.republish.unwrap();
                assert!(headers::header_frame_size(&r.properties) <= FRAME - broker_reserve(&cfg));
                assert_eq!(
                    header(&r.properties, TRACEPARENT),
                    Some(&long_string(JOB_SPAN))
                );
                assert_eq!(
                    header(&r.properties, TRACESTATE),
                    Some(&long_string(&state))
                );
                assert_eq!(r.dropped, ["big"]);
            }
        }
    }

    /// A publisher's own dropped-headers header longer than a frame: the
    /// dead letter still fits, with the value cut.
    #[test]
    fn a_huge_dropped_headers_header_from_the_publisher_is_cut() {
        let cfg = queue("");
        let mut h = FieldTable::default();
        h.insert(DROPPED_HEADER.into(), long_string(&"v".repeat(20_000)));
        let props = BasicProperties::default().with_headers(h);
        for outcome in [Outcome::Redelivered, Outcome::Exit(1), Outcome::Exit(65)] {
            let p = plan_of(delivered(&props), &cfg, 1, &ended(outcome), 8_192);
            let r = p.republish.expect("a retry or dead letter");
            assert!(headers::header_frame_size(&r.properties) <= 8_192 - broker_reserve(&cfg));
            let Some(AMQPValue::LongString(v)) = header(&r.properties, DROPPED_HEADER) else {
                panic!("no {DROPPED_HEADER}");
            };
            assert!(v.as_bytes().len() <= DROPPED_MAX);
        }
    }

    #[test]
    fn dropped_list_is_bounded() {
        let many: Vec<String> = (0..200).map(|i| format!("header-{i}")).collect();
        let v = dropped_list(Some("earlier"), &many);
        assert!(v.len() <= DROPPED_MAX && v.starts_with("earlier, header-0") && v.ends_with('…'));
    }

    fn any_value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            (0usize..40_000).prop_map(|n| AMQPValue::LongString(LongString::from("v".repeat(n)))),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            proptest::collection::vec(inner, 0..4).prop_map(|v| AMQPValue::FieldArray(v.into()))
        })
    }

    fn any_table() -> impl Strategy<Value = FieldTable> {
        let keys = prop_oneof![
            "[a-z-]{1,20}".prop_map(|s| s),
            Just(ATTEMPT_HEADER.to_owned()),
            Just(DELIVERY_COUNT_HEADER.to_owned()),
            Just(STDERR_HEADER.to_owned()),
            Just(DROPPED_HEADER.to_owned()),
            Just(EXIT_HEADER.to_owned()),
            Just(TRACEPARENT.to_owned()),
            Just(TRACESTATE.to_owned()),
        ];
        proptest::collection::vec((keys, any_value()), 0..12).prop_map(|entries| {
            let mut t = FieldTable::default();
            for (k, v) in entries {
                t.insert(k.as_str().into(), v);
            }
            t
        })
    }

    fn any_outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            (0i32..256).prop_map(Outcome::Exit),
            (1i32..32).prop_map(Outcome::Signal),
            Just(Outcome::Timeout),
            Just(Outcome::SpawnFailed),
            Just(Outcome::TooLarge),
            Just(Outcome::Redelivered),
            Just(Outcome::ConnectionLosses),
            Just(Outcome::Interrupted),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the publisher's headers and however the job ended,
        /// every publish of the plan fits the frame, keeps our headers, and
        /// a retry or dead letter is followed by an ack.
        #[test]
        fn every_publish_fits_the_frame(
            table in any_table(),
            outcome in any_outcome(),
            attempt in 1u32..5,
            frame_max in prop_oneof![Just(131_072usize), 8_192usize..200_000],
            stderr_len in 0usize..5000,
            user in proptest::option::of("[a-z]{1,255}"),
            reply_to in proptest::option::of("[a-z.]{1,255}"),
            traced in any::<bool>(),
            tracestate in proptest::option::of(1usize..128),
        ) {
            let cfg = queue("");
            let mut props = BasicProperties::default()
                .with_message_id("m".repeat(255).as_str().into())
                .with_correlation_id("c".repeat(255).as_str().into())
                .with_headers(table);
            if let Some(u) = user {
                props = props.with_user_id(u.as_str().into());
            }
            if let Some(r) = reply_to {
                props = props.with_reply_to(r.as_str().into());
            }
            let e = Ended {
                outcome,
                stderr_or_reason: vec![b'e'; stderr_len],
                stdout: Vec::new(),
                stdout_truncated: true,
            };
            let a = admit(delivered(&props), &cfg, Known::default(), &KEY);
            let a = Admission { attempt, ..a };
            let state = tracestate.map(|n| "k=v,".repeat(n).trim_end_matches(',').to_owned());
            let trace = traced.then_some(TraceHeaders {
                traceparent: JOB_SPAN,
                tracestate: state.as_deref(),
            });
            let p = plan(delivered(&props), &cfg, &a, &e, Context { trace, ..ctx(frame_max) });
            if let Some(r) = &p.republish {
                let limit = frame_max - broker_reserve(&cfg);
                prop_assert!(headers::header_frame_size(&r.properties) <= limit);
                let ours = traced.then(|| long_string(JOB_SPAN));
                prop_assert_eq!(header(&r.properties, TRACEPARENT), ours.as_ref());
                prop_assert!(header(&r.properties, EXIT_HEADER).is_some());
                prop_assert!(header(&r.properties, DELIVERY_COUNT_HEADER).is_none());
                prop_assert_eq!(p.settle, Settle::Ack);
                if r.queue.ends_with(".dead") {
                    prop_assert!(header(&r.properties, STDERR_HEADER).is_some());
                    prop_assert!(header(&r.properties, ATTEMPT_HEADER).is_none());
                } else {
                    prop_assert_eq!(
                        header(&r.properties, ATTEMPT_HEADER),
                        Some(&AMQPValue::LongInt(attempt as i32 + 1))
                    );
                }
            }
            if let Some(r) = &p.reply {
                prop_assert!(headers::header_frame_size(&r.properties) <= frame_max);
                prop_assert_eq!(header(&r.properties, TRACEPARENT).is_some(), traced);
            }
            if p.settle == Settle::Requeue {
                prop_assert!(p.republish.is_none() && p.reply.is_none());
            }
        }
    }
}
