//! `amqp-exec publish`: test messages with publisher confirms, and with
//! `--reply`, tasks sent in parallel whose replies are gathered (the
//! "run these and give me the results" pattern).

use super::Failure;
use super::session::*;
use crate::config::{self};
use crate::settlement::EXIT_HEADER;
use crate::{broker, headers, publish};
use lapin::BasicProperties;
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Options of `amqp-exec publish`.
#[derive(Debug, Clone, Default)]
pub struct PublishArgs {
    pub queue: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub body: Option<String>,
    pub file: Option<PathBuf>,
    pub lines: bool,
    pub count: u64,
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    pub transient: bool,
    /// Declare the queue (durable) if it does not exist yet.
    pub declare: bool,
    /// Send the messages as tasks and wait this long for their replies.
    pub reply_timeout: Option<Duration>,
}

/// The message bodies: the whole input, or one per non-empty line.
fn split_bodies(input: &[u8], lines: bool) -> Vec<&[u8]> {
    if lines {
        input
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.is_empty())
            .collect()
    } else {
        vec![input]
    }
}

fn read_input(args: &PublishArgs) -> Result<Vec<u8>, Failure> {
    match (&args.body, &args.file) {
        (Some(b), None) => Ok(b.clone().into_bytes()),
        (None, Some(f)) => std::fs::read(f)
            .map_err(|e| Failure::new(66, format!("cannot read {}: {e}", f.display()))),
        (None, None) => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::new(66, format!("cannot read standard input: {e}")))?;
            Ok(buf)
        }
        (Some(_), Some(_)) => Err(Failure::new(2, "give only one of --body and --file")),
    }
}

/// Properties shared by all messages of one command.
fn base_properties(args: &PublishArgs) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in &args.headers {
        table.insert(
            k.as_str().into(),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut base = BasicProperties::default()
        .with_delivery_mode(if args.transient { 1 } else { 2 })
        .with_timestamp(now);
    if !table.inner().is_empty() {
        base = base.with_headers(table);
    }
    if let Some(ct) = &args.content_type {
        base = base.with_content_type(ct.as_str().into());
    }
    base
}

/// The id of message `n` (from 1) of `total`.
fn message_id(args: &PublishArgs, prefix: &str, n: u64, total: u64) -> String {
    if total == 1 && args.message_id.is_some() {
        prefix.to_owned()
    } else {
        format!("{prefix}-{n}")
    }
}

fn target(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!("queue \"{routing_key}\"")
    } else {
        format!("exchange \"{exchange}\" with routing key \"{routing_key}\"")
    }
}

/// Most tasks `publish --reply` sends and waits for.
const MAX_TASKS: u64 = 1_000_000;

/// Publishes the messages and waits for every confirm; with a reply
/// timeout, sends them as tasks and gathers their replies.
pub async fn publish(broker: &config::BrokerConfig, args: PublishArgs) -> Result<(), Failure> {
    check_publish_args(&args)?;
    let (exchange, routing_key) = match (&args.queue, &args.exchange) {
        (Some(q), None) => (String::new(), q.clone()),
        (None, Some(e)) => (e.clone(), args.routing_key.clone().unwrap_or_default()),
        _ => unreachable!("checked by check_publish_args"),
    };
    let input = read_input(&args)?;
    let bodies = split_bodies(&input, args.lines);
    let Some(total) = (bodies.len() as u64).checked_mul(args.count) else {
        return Err(Failure::new(2, "--count: too many messages"));
    };
    if args.reply_timeout.is_some() && total > MAX_TASKS {
        return Err(Failure::new(
            2,
            format!("--reply waits for at most {MAX_TASKS} tasks; this would send {total}"),
        ));
    }
    if total == 0 {
        return Err(Failure::new(
            65,
            "nothing to publish: the input has no lines",
        ));
    }
    // The id with the longest number must fit too, or the publish would
    // stop half-way.
    let id_prefix = args.message_id.clone().unwrap_or_else(random_id);
    let last_id = message_id(&args, &id_prefix, total, total);
    if last_id.len() > SHORT_MAX {
        return Err(Failure::new(
            2,
            format!(
                "--message-id: with {total} messages the ids run up to {} bytes \
                 (\"…-{total}\"); AMQP allows at most {SHORT_MAX}",
                last_id.len()
            ),
        ));
    }
    let session = open(broker, "publish").await?;
    let result = publish_on(
        &session,
        &args,
        &id_prefix,
        &exchange,
        &routing_key,
        &bodies,
    )
    .await;
    session.close().await;
    result
}

async fn publish_on(
    session: &Session,
    args: &PublishArgs,
    id_prefix: &str,
    exchange: &str,
    routing_key: &str,
    bodies: &[&[u8]],
) -> Result<(), Failure> {
    if args.declare
        && let Some(q) = &args.queue
    {
        declare_if_missing(session, q).await?;
    }
    session
        .lost
        .race(
            session
                .channel
                .confirm_select(ConfirmSelectOptions::default()),
        )
        .await?
        .map_err(|e| Failure::new(1, format!("cannot enable publisher confirms: {e}")))?;
    match args.reply_timeout {
        Some(timeout) => {
            request(
                session,
                args,
                id_prefix,
                exchange,
                routing_key,
                bodies,
                timeout,
            )
            .await
        }
        None => fire(session, args, id_prefix, exchange, routing_key, bodies).await,
    }
}

/// The checks of `publish`'s options that need neither the input nor the
/// broker: a usage error (status 2) for each mistake.
pub fn check_publish_args(args: &PublishArgs) -> Result<(), Failure> {
    match (&args.queue, &args.exchange) {
        (Some(_), None) | (None, Some(_)) => {}
        _ => {
            return Err(Failure::new(
                2,
                "give either --queue Q or --exchange E [--routing-key K]",
            ));
        }
    }
    if args.queue.is_some() && args.routing_key.is_some() {
        return Err(Failure::new(
            2,
            "--routing-key goes with --exchange; with --queue the queue name is the routing key",
        ));
    }
    if args.declare && args.queue.is_none() {
        return Err(Failure::new(
            2,
            "--declare goes with --queue; declare an exchange's queues and bindings with the \
             config's [[queue.bind]] or the broker's tools",
        ));
    }
    if let Some(q) = &args.queue {
        short("--queue", q)?;
    }
    if let Some(e) = &args.exchange {
        short("--exchange", e)?;
    }
    if let Some(k) = &args.routing_key {
        short("--routing-key", k)?;
    }
    for (k, _) in &args.headers {
        short("--header (the name before =)", k)?;
    }
    if let Some(id) = &args.message_id {
        short("--message-id", id)?;
    }
    if let Some(ct) = &args.content_type {
        short("--content-type", ct)?;
    }
    if let Some(t) = args.reply_timeout {
        check_reply_timeout(t).map_err(|e| Failure::new(2, format!("--timeout: {e}")))?;
    }
    Ok(())
}

/// Publishes every message, 1,000 confirms in flight at most.
async fn fire(
    session: &Session,
    args: &PublishArgs,
    id_prefix: &str,
    exchange: &str,
    routing_key: &str,
    bodies: &[&[u8]],
) -> Result<(), Failure> {
    let (channel, lost) = (&session.channel, &session.lost);
    let total = bodies.len() as u64 * args.count;
    let base = base_properties(args);
    let mut pending = VecDeque::new();
    let (mut confirmed, mut failed) = (0u64, Vec::new());
    let mut n = 0u64;
    for _ in 0..args.count {
        for body in bodies {
            n += 1;
            let id = message_id(args, id_prefix, n, total);
            let props = base.clone().with_message_id(id.as_str().into());
            let confirm = lost
                .race(publish::send(channel, exchange, routing_key, body, props))
                .await?
                .map_err(|e| {
                    Failure::new(
                        1,
                        format!("publish failed after {confirmed} confirmed: {e}"),
                    )
                })?;
            pending.push_back((id, confirm));
            if pending.len() >= 1000 {
                let (id, c) = pending.pop_front().expect("not empty");
                settle_confirm(lost, id, c, &mut confirmed, &mut failed).await?;
            }
        }
    }
    while let Some((id, c)) = pending.pop_front() {
        settle_confirm(lost, id, c, &mut confirmed, &mut failed).await?;
    }
    let to = target(exchange, routing_key);
    if failed.is_empty() {
        println!("published {total} message(s) to {to}: {confirmed} confirmed");
        return Ok(());
    }
    println!(
        "published {total} message(s) to {to}: {confirmed} confirmed, {} not accepted",
        failed.len()
    );
    for (id, why) in failed.iter().take(10) {
        eprintln!("message {id}: {why}");
    }
    Err(Failure::new(
        1,
        format!(
            "{} of {total} message(s) were not accepted by the broker",
            failed.len()
        ),
    ))
}

/// RabbitMQ's direct reply-to pseudo-queue: replies come straight back to
/// this channel's consumer, and nothing is left behind on the broker.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// One task of `publish --reply`.
struct Task<'a> {
    body: &'a [u8],
    sent: std::time::Instant,
    /// (exit label, reply body, milliseconds from publish to reply)
    reply: Option<(String, Vec<u8>, u128)>,
    /// Why it could not be sent.
    error: Option<String>,
}

/// Sends the bodies as tasks with `reply_to` and a correlation id each,
/// waits up to `timeout` for their replies, and prints them: the raw reply
/// of a single task, or JSON lines in input order. Fails if any task failed
/// or timed out. The tasks expire from their queue after `timeout`.
async fn request(
    session: &Session,
    args: &PublishArgs,
    id_prefix: &str,
    exchange: &str,
    routing_key: &str,
    bodies: &[&[u8]],
    timeout: Duration,
) -> Result<(), Failure> {
    use futures_lite::StreamExt;
    let (channel, lost) = (&session.channel, &session.lost);
    let mut replies = lost
        .race(channel.basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await?
        .map_err(|e| Failure::new(1, format!("cannot consume replies: {e}")))?;
    let total = bodies.len() as u64 * args.count;
    let base = base_properties(args);
    let correlation = random_id();
    let base = base
        .with_reply_to(DIRECT_REPLY_TO.into())
        .with_expiration(timeout.as_millis().to_string().into());
    let mut tasks: Vec<Task> = Vec::with_capacity(total.min(1024) as usize);
    let mut confirms = Vec::with_capacity(total.min(1024) as usize);
    for _ in 0..args.count {
        for body in bodies {
            let n = tasks.len() as u64 + 1;
            let props = base
                .clone()
                .with_message_id(message_id(args, id_prefix, n, total).as_str().into())
                .with_correlation_id(format!("{correlation}-{n}").as_str().into());
            let confirm = lost
                .race(publish::send(channel, exchange, routing_key, body, props))
                .await?
                .map_err(|e| Failure::new(1, format!("publish failed: {e}")))?;
            confirms.push(confirm);
            tasks.push(Task {
                body,
                sent: std::time::Instant::now(),
                reply: None,
                error: None,
            });
        }
    }
    let mut waiting = tasks.len();
    for (task, confirm) in tasks.iter_mut().zip(confirms) {
        let checked = lost
            .race(confirm)
            .await?
            .map_err(|e| Failure::new(1, format!("lost the broker while publishing: {e}")))
            .and_then(|c| publish::check(c).map_err(|e| Failure::new(1, e.to_string())));
        if let Err(e) = checked {
            task.error = Some(e.message);
            waiting -= 1;
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while waiting > 0 {
        let next = tokio::select! {
            d = replies.next() => d,
            _ = tokio::time::sleep_until(deadline) => break,
            // Reported below like the end of the replies.
            _ = lost.token.cancelled() => None,
        };
        let Some(Ok(d)) = next else {
            // Report the replies already in, and the rest as lost.
            for task in tasks.iter_mut() {
                if task.reply.is_none() && task.error.is_none() {
                    task.error = Some("lost the broker while waiting for the reply".into());
                }
            }
            break;
        };
        let Some(n) = d
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|c| c.as_str().strip_prefix(&format!("{correlation}-")))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=tasks.len()).contains(n))
        else {
            continue;
        };
        let task = &mut tasks[n - 1];
        if task.reply.is_none() && task.error.is_none() {
            let exit = headers::string(d.properties.headers().as_ref(), EXIT_HEADER)
                .unwrap_or_else(|| "?".into());
            task.reply = Some((exit, d.data, task.sent.elapsed().as_millis()));
            waiting -= 1;
        }
    }

    let single = tasks.len() == 1 && !args.lines;
    let mut problems = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        let what = match (&task.reply, &task.error) {
            (Some((exit, _, _)), _) if exit == "0" => None,
            (Some((exit, body, _)), _) => {
                let text = String::from_utf8_lossy(body);
                match text.lines().find(|l| !l.trim().is_empty()) {
                    Some(first) => Some(format!("exit {exit}: {first}")),
                    None => Some(format!("exit {exit}")),
                }
            }
            (None, Some(e)) => Some(e.clone()),
            (None, None) => Some(format!(
                "no reply within {}",
                config::format_duration(timeout)
            )),
        };
        if let Some(w) = what {
            problems.push(format!("task {} ({w})", i + 1));
        }
        if single {
            // A failure's reply (its stderr) goes into the error message instead.
            if let Some((exit, body, _)) = &task.reply
                && exit == "0"
            {
                use std::io::Write;
                let _ = std::io::stdout().write_all(body);
            }
        } else {
            println!("{}", reply_line(task));
        }
    }
    match problems.len() {
        0 => Ok(()),
        n => Err(Failure::new(
            1,
            format!(
                "{n} of {} task(s) failed or timed out: {}",
                tasks.len(),
                problems.join(", ")
            ),
        )),
    }
}

/// `{"line": …, "exit": …, "ms": …, "reply": …}` for one task: the reply
/// embedded as JSON when it parses, else as a string.
fn reply_line(task: &Task) -> String {
    use serde_json::{Value, json};
    let line = String::from_utf8_lossy(task.body);
    let v = match &task.reply {
        Some((exit, body, ms)) => {
            let exit: Value = exit
                .parse::<i64>()
                .map_or_else(|_| json!(exit), Value::from);
            let reply: Value = serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
            json!({"line": line, "exit": exit, "ms": ms, "reply": reply})
        }
        None => json!({
            "line": line,
            "exit": Value::Null,
            "ms": Value::Null,
            "reply": Value::Null,
            "error": task.error.clone().unwrap_or_else(|| "timeout".into()),
        }),
    };
    v.to_string()
}

/// Declares `queue` durable and classic, with its dead-letter queue as the
/// dead-letter target, as `run` declares a queue by default, unless it
/// exists (with whatever arguments it has). The type is explicit: without
/// it, RabbitMQ 3.13 and later use the virtual host's default type.
async fn declare_if_missing(session: &Session, queue: &str) -> Result<(), Failure> {
    let lost = &session.lost;
    let probe = session.channel().await?;
    if lost.race(broker::queue_depth(&probe, queue)).await?.is_ok() {
        return Ok(());
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let channel = session.channel().await?;
    let mut classic = broker::type_args(config::QueueType::Classic);
    broker::insert_dead_letter_args(&mut classic, queue);
    lost.race(channel.queue_declare(queue.into(), durable, classic))
        .await?
        .map_err(|e| Failure::new(1, format!("cannot declare queue \"{queue}\": {e}")))?;
    Ok(())
}

async fn settle_confirm(
    lost: &Lost,
    id: String,
    confirm: lapin::PublisherConfirm,
    confirmed: &mut u64,
    failed: &mut Vec<(String, String)>,
) -> Result<(), Failure> {
    let c = lost.race(confirm).await?.map_err(|e| {
        Failure::new(
            1,
            format!("lost the broker while waiting for confirms: {e}"),
        )
    })?;
    match publish::check(c) {
        Ok(()) => *confirmed += 1,
        Err(e) => failed.push((id, e.to_string())),
    }
    Ok(())
}

fn random_id() -> String {
    format!("{:016x}", crate::random::u64())
}

/// Parses `K=V` for `--header`.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Parses a duration flag.
pub fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

/// Longest `publish --reply --timeout`, in milliseconds: the tasks' message
/// TTL, which RabbitMQ takes up to 2^32-1 ms (about 49.7 days).
const MAX_REPLY_TIMEOUT_MS: u128 = u32::MAX as u128;

/// Parses `publish --timeout`: 1ms to `MAX_REPLY_TIMEOUT_MS`.
pub fn parse_reply_timeout(s: &str) -> Result<Duration, String> {
    let d = config::parse_duration(s)?;
    check_reply_timeout(d)?;
    Ok(d)
}

fn check_reply_timeout(d: Duration) -> Result<(), String> {
    let ms = d.as_millis();
    if (1..=MAX_REPLY_TIMEOUT_MS).contains(&ms) {
        Ok(())
    } else {
        Err(format!(
            "must be between 1ms and {MAX_REPLY_TIMEOUT_MS}ms (about 49 days), the longest \
             message TTL RabbitMQ takes"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::dead::dead_queue_arg;
    use super::*;

    #[test]
    fn reply_timeout_is_a_valid_message_ttl() {
        for ok in ["1ms", "30s", "49d", "4294967295ms"] {
            assert!(parse_reply_timeout(ok).is_ok(), "{ok}");
        }
        for bad in ["0s", "0.5ms", "50d", "4294967296ms", "10000d"] {
            assert!(parse_reply_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn publish_flags_are_checked_before_any_input() {
        let base = PublishArgs {
            queue: Some("q".into()),
            count: 1,
            ..PublishArgs::default()
        };
        assert!(check_publish_args(&base).is_ok());
        let long = "x".repeat(256);
        let cases = [
            (
                PublishArgs {
                    routing_key: Some("k".into()),
                    ..base.clone()
                },
                "--routing-key",
            ),
            (
                PublishArgs {
                    queue: None,
                    exchange: Some("e".into()),
                    declare: true,
                    ..base.clone()
                },
                "--declare",
            ),
            (
                PublishArgs {
                    queue: Some(long.clone()),
                    ..base.clone()
                },
                "--queue",
            ),
            (
                PublishArgs {
                    headers: vec![(long.clone(), "v".into())],
                    ..base.clone()
                },
                "--header",
            ),
            (
                PublishArgs {
                    reply_timeout: Some(Duration::ZERO),
                    ..base.clone()
                },
                "--timeout",
            ),
        ];
        for (args, flag) in cases {
            let f = check_publish_args(&args).unwrap_err();
            assert_eq!(f.code, 2, "{flag}: {}", f.message);
            assert!(f.message.contains(flag), "{flag}: {}", f.message);
        }
        assert!(dead_queue_arg(&"q".repeat(250)).is_ok());
        assert_eq!(dead_queue_arg(&"q".repeat(251)).unwrap_err().code, 2);
    }
}
