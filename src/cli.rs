//! The command-line tools beside `run`: `publish` (test messages with
//! confirms), `check` (config, commands, broker), and `dead` (list, replay and
//! purge dead letters).

use crate::config::{self, Config, dead_queue_name};
use crate::settlement::{
    ATTEMPT_HEADER, ATTEMPTS_HEADER, DELIVERY_COUNT_HEADER, EXIT_HEADER, FAILED_AT_HEADER,
    QUEUE_HEADER, STDERR_HEADER, USER_ID_HEADER,
};
use crate::{broker, consumer, headers, publish, settlement};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Exit status when the broker cannot be reached (sysexits.h `EX_UNAVAILABLE`).
pub const EX_UNAVAILABLE: i32 = 69;

/// A failed command: what to print and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<config::ConfigError> for Failure {
    fn from(e: config::ConfigError) -> Self {
        Failure::new(config::EX_CONFIG, e.to_string())
    }
}

/// Broker settings for the CLI tools: `--url`/`AMQP_URL`, else the config
/// file's when one is named or exists at the default path, else localhost.
pub fn broker_for_cli(
    url: Option<&str>,
    config_path: &std::path::Path,
    config_named: bool,
) -> Result<config::BrokerConfig, Failure> {
    let defaults = || {
        config::parse(
            "[[queue]]\nname = \"x\"\ncommand = [\"x\"]\n",
            std::path::Path::new("(defaults)"),
            url,
        )
        .map(|c| c.broker)
    };
    let base = if config_named {
        config::load(config_path, url)?.broker
    } else if config_path.exists() {
        match config::load(config_path, url) {
            Ok(c) => c.broker,
            // The service's config may be unreadable to this user; with a
            // URL given it is not needed.
            Err(e) if url.is_some() && !e.file.as_os_str().is_empty() => {
                tracing::warn!("not using {}: {e}", config_path.display());
                defaults()?
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        defaults()?
    };
    Ok(base)
}

/// Ends the command's waits on the broker once the connection is lost.
/// lapin may leave a request unanswered when it drops the connection (for
/// example on a frame it cannot parse): every wait of the CLI tools races
/// against this, so that none of them waits for ever.
#[derive(Clone)]
struct Lost {
    token: CancellationToken,
    why: Arc<Mutex<Option<String>>>,
}

impl Lost {
    /// Watches `conn`: its error event, or a state other than connected
    /// (checked every second, in case the event came before the watch).
    /// While the broker blocks the connection nothing gets through, and the
    /// command waits: it says why.
    fn watch(conn: &Connection) -> Lost {
        let lost = Lost {
            token: CancellationToken::new(),
            why: Arc::new(Mutex::new(None)),
        };
        let mut events = conn.events_listener();
        let status = conn.status().clone();
        let watcher = lost.clone();
        tokio::spawn(async move {
            use futures_lite::StreamExt;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let event = tokio::select! {
                    e = events.next() => e,
                    _ = tick.tick() => {
                        if status.errored() || status.closed() {
                            watcher.set("the connection was closed");
                            return;
                        }
                        continue;
                    }
                };
                match event {
                    Some(lapin::Event::ConnectionBlocked(reason)) => tracing::warn!(
                        "the broker blocks publishing ({reason}); waiting until it unblocks"
                    ),
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!("the broker unblocked publishing")
                    }
                    // Also sent when the broker closes one channel (a
                    // passive declare of a missing queue): only the
                    // connection's own error counts.
                    Some(lapin::Event::Error(e)) if status.errored() || status.closed() => {
                        watcher.set(&e.to_string());
                        return;
                    }
                    Some(_) => {}
                    None => {
                        watcher.set("the connection was closed");
                        return;
                    }
                }
            }
        });
        lost
    }

    fn set(&self, why: &str) {
        self.why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.to_owned());
        self.token.cancel();
    }

    fn failure(&self) -> Failure {
        let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Failure::new(
            1,
            format!(
                "lost the connection to the broker: {}",
                why.as_deref().unwrap_or("the connection was closed")
            ),
        )
    }

    /// `fut`'s output, or a failure once the connection is lost.
    async fn race<T>(&self, fut: impl std::future::Future<Output = T>) -> Result<T, Failure> {
        tokio::select! {
            biased;
            v = fut => Ok(v),
            _ = self.token.cancelled() => Err(self.failure()),
        }
    }
}

/// A connection of a CLI tool, its first channel, and its loss.
struct Session {
    conn: Connection,
    channel: Channel,
    lost: Lost,
}

impl Session {
    async fn close(&self) {
        let _ = self.conn.close(200, "done".into()).await;
    }

    /// A new channel on the connection.
    async fn channel(&self) -> Result<Channel, Failure> {
        self.lost.race(channel_on(&self.conn)).await?
    }
}

async fn open(broker: &config::BrokerConfig, what: &str) -> Result<Session, Failure> {
    let (conn, _) = broker::connect_any(broker, 0, &format!("amqp-exec {what}"))
        .await
        .map_err(|e| Failure::new(EX_UNAVAILABLE, e))?;
    let lost = Lost::watch(&conn);
    let channel = lost.race(channel_on(&conn)).await??;
    Ok(Session {
        conn,
        channel,
        lost,
    })
}

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

/// Longest AMQP short string: queue and exchange names, routing keys,
/// header names, and properties such as the message id.
const SHORT_MAX: usize = 255;

/// A usage error unless `value` fits in an AMQP short string.
fn short(flag: &str, value: &str) -> Result<(), Failure> {
    if value.len() <= SHORT_MAX {
        return Ok(());
    }
    Err(Failure::new(
        2,
        format!(
            "{flag}: {} bytes; AMQP allows at most {SHORT_MAX}",
            value.len()
        ),
    ))
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

async fn channel_on(conn: &Connection) -> Result<Channel, Failure> {
    conn.create_channel()
        .await
        .map_err(|e| Failure::new(EX_UNAVAILABLE, format!("cannot open a channel: {e}")))
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

/// `amqp-exec check`: the config is valid, every command can be started, and
/// the broker answers. Prints one line per finding.
/// The queues a queue's jobs use: the work queue, its dead-letter queue, and
/// the retry queues of the delays its attempts can reach.
fn queues_used(q: &config::QueueConfig) -> Vec<String> {
    let retries = (q.policy.max_attempts as usize - 1).min(q.policy.backoff.len());
    let delays: std::collections::BTreeSet<Duration> =
        q.policy.backoff[..retries].iter().copied().collect();
    [q.name.clone(), q.dead_queue()]
        .into_iter()
        .chain(delays.into_iter().map(|d| q.retry_queue(d)))
        .collect()
}

pub async fn check(cfg: &Config) -> Result<(), Failure> {
    let mut problems = 0;
    println!(
        "config {}: ok ({} queue(s))",
        cfg.file.display(),
        cfg.queues.len()
    );
    for q in &cfg.queues {
        match consumer::command_available(q) {
            Ok(p) => println!("queue \"{}\": command {} ok", q.name, p.display()),
            Err(e) => {
                println!("queue \"{}\": error: {e}", q.name);
                problems += 1;
            }
        }
    }
    let mut broker_ok = true;
    match open(&cfg.broker, "check").await {
        Ok(session) => {
            println!("broker: connected");
            for q in cfg.queues.iter().filter(|q| !q.declare) {
                for name in queues_used(q) {
                    // Each on a channel of its own: a missing queue closes it.
                    let ch = match session.lost.race(channel_on(&session.conn)).await? {
                        Ok(ch) => ch,
                        Err(_) => session.channel.clone(),
                    };
                    if let Err(e) = session.lost.race(broker::queue_depth(&ch, &name)).await? {
                        println!(
                            "queue \"{}\": error: declare = false but \"{name}\" is not usable: {e}",
                            q.name
                        );
                        problems += 1;
                    }
                }
            }
            session.close().await;
        }
        Err(e) => {
            println!("broker: error: {}", e.message);
            problems += 1;
            broker_ok = false;
        }
    }
    if problems == 0 {
        println!("all good");
        Ok(())
    } else if problems == 1 && !broker_ok {
        Err(Failure::new(EX_UNAVAILABLE, "the broker is unreachable"))
    } else {
        Err(Failure::new(1, format!("{problems} problem(s) found")))
    }
}

/// One dead letter, as `dead list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct DeadEntry {
    pub message_id: String,
    pub attempts: Option<i64>,
    pub exit: String,
    pub failed_at: String,
    pub queue: String,
    pub stderr: String,
    pub body_bytes: usize,
}

fn dead_entry(d: &lapin::message::Delivery) -> DeadEntry {
    let h = d.properties.headers().as_ref();
    DeadEntry {
        message_id: d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        attempts: headers::int(h, ATTEMPTS_HEADER),
        exit: headers::string(h, EXIT_HEADER).unwrap_or_default(),
        failed_at: headers::string(h, FAILED_AT_HEADER).unwrap_or_default(),
        queue: headers::string(h, QUEUE_HEADER).unwrap_or_default(),
        stderr: headers::string(h, STDERR_HEADER).unwrap_or_default(),
        body_bytes: d.data.len(),
    }
}

async fn dead_count(session: &Session, dead: &str) -> Result<u32, Failure> {
    session
        .lost
        .race(broker::queue_depth(&session.channel, dead))
        .await?
        .map_err(|e| Failure::new(1, format!("queue \"{dead}\" is not there: {e}")))
}

/// The dead-letter queue of `queue`, if its name fits in AMQP's limit.
fn dead_queue_arg(queue: &str) -> Result<String, Failure> {
    let dead = dead_queue_name(queue);
    if dead.len() > SHORT_MAX {
        return Err(Failure::new(
            2,
            format!(
                "--queue: {} bytes, and its dead-letter queue \"….dead\" {}; AMQP allows at \
                 most {SHORT_MAX}",
                queue.len(),
                dead.len()
            ),
        ));
    }
    Ok(dead)
}

/// `dead list`: prints up to `limit` dead letters and leaves them in place.
pub async fn dead_list(
    broker: &config::BrokerConfig,
    queue: &str,
    limit: Option<u32>,
    json: bool,
) -> Result<(), Failure> {
    let dead = dead_queue_arg(queue)?;
    let session = open(broker, "dead list").await?;
    let result = dead_list_on(&session, &dead, limit, json).await;
    session.close().await;
    result
}

async fn dead_list_on(
    session: &Session,
    dead: &str,
    limit: Option<u32>,
    json: bool,
) -> Result<(), Failure> {
    let (channel, lost) = (&session.channel, &session.lost);
    let available = dead_count(session, dead).await?;
    let n = limit.map_or(available, |l| l.min(available));
    // Only the last delivery's acker is kept: one nack with `multiple` hands
    // them all back, and the bodies need not stay in memory.
    let mut shown = 0usize;
    let mut last = None;
    for _ in 0..n {
        match lost
            .race(channel.basic_get(dead.into(), BasicGetOptions { no_ack: false }))
            .await?
        {
            Ok(Some(m)) => {
                let e = dead_entry(&m.delivery);
                if json {
                    println!("{}", serde_json::to_string(&e).unwrap_or_default());
                } else {
                    println!(
                        "{}\tattempts={}\texit={}\tfailed_at={}\t{}",
                        if e.message_id.is_empty() {
                            "-"
                        } else {
                            &e.message_id
                        },
                        e.attempts.map_or("-".to_string(), |a| a.to_string()),
                        e.exit,
                        e.failed_at,
                        e.stderr
                            .lines()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("")
                    );
                }
                shown += 1;
                last = Some(m.delivery.acker);
            }
            Ok(None) => break,
            Err(e) => return Err(Failure::new(1, format!("cannot read {dead}: {e}"))),
        }
    }
    // Put them back where they were.
    if let Some(last) = last {
        let _ = lost
            .race(last.nack(BasicNackOptions {
                multiple: true,
                requeue: true,
            }))
            .await;
    }
    if !json {
        eprintln!("{shown} of {available} dead letter(s) in \"{dead}\" shown");
    }
    Ok(())
}

/// `dead replay`: republishes dead letters to their queue with the attempt
/// count reset, each acked from the dead queue only after its confirm.
pub async fn dead_replay(
    broker: &config::BrokerConfig,
    queue: &str,
    limit: Option<u32>,
) -> Result<(), Failure> {
    let dead = dead_queue_arg(queue)?;
    let session = open(broker, "dead replay").await?;
    let result = dead_replay_on(&session, queue, &dead, limit).await;
    session.close().await;
    let replayed = result?;
    println!("replayed {replayed} message(s) from \"{dead}\" to \"{queue}\"");
    Ok(())
}

async fn dead_replay_on(
    session: &Session,
    queue: &str,
    dead: &str,
    limit: Option<u32>,
) -> Result<u32, Failure> {
    let (channel, lost) = (&session.channel, &session.lost);
    lost.race(channel.confirm_select(ConfirmSelectOptions::default()))
        .await?
        .map_err(|e| Failure::new(1, format!("cannot enable publisher confirms: {e}")))?;
    let publisher = publish::ConfirmChannel::new(channel.clone(), &session.conn);
    let available = dead_count(session, dead).await?;
    // Bounded by what is there now, so that messages failing again are not replayed in a loop.
    let n = limit.map_or(available, |l| l.min(available));
    let mut replayed = 0u32;
    for _ in 0..n {
        let m = match lost
            .race(channel.basic_get(dead.into(), BasicGetOptions { no_ack: false }))
            .await?
        {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => return Err(Failure::new(1, format!("cannot read {dead}: {e}"))),
        };
        let d = m.delivery;
        let kept: std::collections::BTreeMap<ShortString, AMQPValue> = d
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    // Our own headers but the original `user_id` and its
                    // signature (made for the work queue), and the
                    // count of a quorum dead queue's returns (`dead list`
                    // adds to it): the attempts start over.
                    .filter(|(k, _)| {
                        (!k.as_str().starts_with("x-amqp-exec-")
                            || k.as_str() == USER_ID_HEADER
                            || k.as_str() == crate::signing::SIGNATURE_HEADER)
                            && k.as_str() != ATTEMPT_HEADER
                            && k.as_str() != DELIVERY_COUNT_HEADER
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut kept = FieldTable::from(kept);
        if let Some(v) = d.properties.user_id() {
            kept.insert(
                USER_ID_HEADER.into(),
                AMQPValue::LongString(LongString::from(v.as_str())),
            );
        }
        let props = settlement::republished_properties(&d.properties).with_headers(kept);
        if let Err(e) = lost
            .race(publish::publish_confirmed(
                &publisher, "", queue, &d.data, props,
            ))
            .await?
        {
            let _ = lost
                .race(d.acker.nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                }))
                .await;
            return Err(Failure::new(
                1,
                format!("replay stopped after {replayed}: cannot publish to \"{queue}\": {e}"),
            ));
        }
        lost.race(d.acker.ack(BasicAckOptions::default()))
            .await?
            .map_err(|e| Failure::new(1, format!("replayed but could not ack from {dead}: {e}")))?;
        replayed += 1;
    }
    Ok(replayed)
}

/// `dead purge`: deletes every dead letter of `queue`.
pub async fn dead_purge(
    broker: &config::BrokerConfig,
    queue: &str,
    yes: bool,
) -> Result<(), Failure> {
    let dead = dead_queue_arg(queue)?;
    if !yes {
        // A usage error whatever the broker says; the count only informs.
        let available = match open(broker, "dead purge").await {
            Ok(session) => {
                let n = dead_count(&session, &dead).await.ok();
                session.close().await;
                n
            }
            Err(_) => None,
        };
        let what = match available {
            Some(n) => format!("{n} message(s)"),
            None => "the dead letters".to_owned(),
        };
        return Err(Failure::new(
            2,
            format!("refusing to delete {what} from \"{dead}\" without --yes"),
        ));
    }
    let session = open(broker, "dead purge").await?;
    let purged = session
        .lost
        .race(
            session
                .channel
                .queue_purge(dead.as_str().into(), QueuePurgeOptions::default()),
        )
        .await;
    session.close().await;
    let purged = purged?.map_err(|e| Failure::new(1, format!("cannot purge {dead}: {e}")))?;
    println!("purged {purged} message(s) from \"{dead}\"");
    Ok(())
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
    use super::*;

    #[test]
    fn check_looks_at_the_retry_queues_attempts_can_reach() {
        let cfg = config::parse(
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nmax_attempts = 3\nbackoff = [\"1s\", \"5s\", \"1m\"]\n\
             [[queue]]\nname = \"b\"\ncommand = [\"x\"]\nmax_attempts = 1\n\
             [[queue]]\nname = \"c\"\ncommand = [\"x\"]\nmax_attempts = 9\nbackoff = [\"2s\"]\n",
            std::path::Path::new("c.toml"),
            None,
        )
        .unwrap();
        assert_eq!(
            queues_used(&cfg.queues[0]),
            ["a", "a.dead", "a.retry.1s", "a.retry.5s"]
        );
        assert_eq!(queues_used(&cfg.queues[1]), ["b", "b.dead"]);
        assert_eq!(queues_used(&cfg.queues[2]), ["c", "c.dead", "c.retry.2s"]);
    }

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
