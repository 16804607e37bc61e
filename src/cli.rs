//! The command-line tools beside `run`: `publish` (test messages with
//! confirms), `check` (config, commands, broker), and `dead` (list, replay and
//! purge dead letters).

use crate::config::{self, Config, dead_queue_name};
use crate::job::{
    ATTEMPT_HEADER, ATTEMPTS_HEADER, DELIVERY_COUNT_HEADER, EXIT_HEADER, FAILED_AT_HEADER,
    QUEUE_HEADER, STDERR_HEADER,
};
use crate::{broker, consumer, headers, job, publish};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
            Err(e) if url.is_some() => {
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

async fn open(broker: &config::BrokerConfig, what: &str) -> Result<(Connection, Channel), Failure> {
    let (conn, _) = broker::connect_any(broker, 0, &format!("amqp-exec {what}"))
        .await
        .map_err(|e| Failure::new(EX_UNAVAILABLE, e))?;
    let channel = channel_on(&conn).await?;
    // While the broker blocks the connection nothing gets through, and the
    // command waits: say why.
    let mut events = conn.events_listener();
    tokio::spawn(async move {
        use futures_lite::StreamExt;
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::ConnectionBlocked(reason) => tracing::warn!(
                    "the broker blocks publishing ({reason}); waiting until it unblocks"
                ),
                lapin::Event::ConnectionUnblocked => {
                    tracing::info!("the broker unblocked publishing")
                }
                _ => {}
            }
        }
    });
    Ok((conn, channel))
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

/// Properties shared by all messages of one command, and the id prefix.
fn base_properties(args: &PublishArgs) -> (BasicProperties, String) {
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
    (base, args.message_id.clone().unwrap_or_else(random_id))
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
    let (exchange, routing_key) = match (&args.queue, &args.exchange) {
        (Some(q), None) => (String::new(), q.clone()),
        (None, Some(e)) => (e.clone(), args.routing_key.clone().unwrap_or_default()),
        _ => {
            return Err(Failure::new(
                2,
                "give either --queue Q or --exchange E [--routing-key K]",
            ));
        }
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
    let (conn, channel) = open(broker, "publish").await?;
    if args.declare
        && let Some(q) = &args.queue
    {
        declare_if_missing(&conn, q).await?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Failure::new(1, format!("cannot enable publisher confirms: {e}")))?;
    let result = match args.reply_timeout {
        Some(timeout) => request(&channel, &args, &exchange, &routing_key, &bodies, timeout).await,
        None => fire(&channel, &args, &exchange, &routing_key, &bodies).await,
    };
    let _ = conn.close(200, "done".into()).await;
    result
}

/// Publishes every message, 1,000 confirms in flight at most.
async fn fire(
    channel: &Channel,
    args: &PublishArgs,
    exchange: &str,
    routing_key: &str,
    bodies: &[&[u8]],
) -> Result<(), Failure> {
    let total = bodies.len() as u64 * args.count;
    let (base, id_prefix) = base_properties(args);
    let mut pending = VecDeque::new();
    let (mut confirmed, mut failed) = (0u64, Vec::new());
    let mut n = 0u64;
    for _ in 0..args.count {
        for body in bodies {
            n += 1;
            let id = message_id(args, &id_prefix, n, total);
            let props = base.clone().with_message_id(id.as_str().into());
            let confirm = publish::send(channel, exchange, routing_key, body, props)
                .await
                .map_err(|e| {
                    Failure::new(
                        1,
                        format!("publish failed after {confirmed} confirmed: {e}"),
                    )
                })?;
            pending.push_back((id, confirm));
            if pending.len() >= 1000 {
                let (id, c) = pending.pop_front().expect("not empty");
                settle_confirm(id, c, &mut confirmed, &mut failed).await?;
            }
        }
    }
    while let Some((id, c)) = pending.pop_front() {
        settle_confirm(id, c, &mut confirmed, &mut failed).await?;
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
    channel: &Channel,
    args: &PublishArgs,
    exchange: &str,
    routing_key: &str,
    bodies: &[&[u8]],
    timeout: Duration,
) -> Result<(), Failure> {
    use futures_lite::StreamExt;
    let mut replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| Failure::new(1, format!("cannot consume replies: {e}")))?;
    let total = bodies.len() as u64 * args.count;
    let (base, id_prefix) = base_properties(args);
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
                .with_message_id(message_id(args, &id_prefix, n, total).as_str().into())
                .with_correlation_id(format!("{correlation}-{n}").as_str().into());
            let confirm = publish::send(channel, exchange, routing_key, body, props)
                .await
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
        let checked = confirm
            .await
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

/// Declares `queue` durable unless it exists (with whatever arguments it has).
async fn declare_if_missing(conn: &Connection, queue: &str) -> Result<(), Failure> {
    if broker::queue_depth(&channel_on(conn).await?, queue)
        .await
        .is_ok()
    {
        return Ok(());
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel_on(conn)
        .await?
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .map_err(|e| Failure::new(1, format!("cannot declare queue \"{queue}\": {e}")))?;
    Ok(())
}

async fn channel_on(conn: &Connection) -> Result<Channel, Failure> {
    conn.create_channel()
        .await
        .map_err(|e| Failure::new(EX_UNAVAILABLE, format!("cannot open a channel: {e}")))
}

async fn settle_confirm(
    id: String,
    confirm: lapin::PublisherConfirm,
    confirmed: &mut u64,
    failed: &mut Vec<(String, String)>,
) -> Result<(), Failure> {
    let c = confirm.await.map_err(|e| {
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
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// `amqp-exec check`: the config is valid, every command can be started, and
/// the broker answers. Prints one line per finding.
pub async fn check(cfg: &Config) -> Result<(), Failure> {
    let mut problems = 0;
    println!(
        "config {}: ok ({} queue(s))",
        cfg.file.display(),
        cfg.queues.len()
    );
    for q in &cfg.queues {
        let mut path = std::env::var_os("PATH");
        if let Some(p) = q.env.get("PATH") {
            path = Some(p.into());
        }
        let dir_ok = match &q.working_dir {
            Some(d) if !d.is_dir() => {
                println!(
                    "queue \"{}\": error: working_dir {} does not exist",
                    q.name,
                    d.display()
                );
                problems += 1;
                false
            }
            _ => true,
        };
        if !dir_ok {
            continue;
        }
        match consumer::resolve_command(&q.command[0], path.as_deref(), q.working_dir.as_deref()) {
            Ok(p) => println!("queue \"{}\": command {} ok", q.name, p.display()),
            Err(e) => {
                println!("queue \"{}\": error: {e}", q.name);
                problems += 1;
            }
        }
    }
    let mut broker_ok = true;
    match open(&cfg.broker, "check").await {
        Ok((conn, channel)) => {
            println!("broker: connected");
            for q in cfg.queues.iter().filter(|q| !q.declare) {
                let ch = channel_on(&conn).await.unwrap_or_else(|_| channel.clone());
                if let Err(e) = broker::queue_depth(&ch, &q.name).await {
                    println!(
                        "queue \"{}\": error: declare = false but the queue is not usable: {e}",
                        q.name
                    );
                    problems += 1;
                }
            }
            let _ = conn.close(200, "done".into()).await;
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

async fn dead_count(channel: &Channel, dead: &str) -> Result<u32, Failure> {
    broker::queue_depth(channel, dead)
        .await
        .map_err(|e| Failure::new(1, format!("queue \"{dead}\" is not there: {e}")))
}

/// `dead list`: prints up to `limit` dead letters and leaves them in place.
pub async fn dead_list(
    broker: &config::BrokerConfig,
    queue: &str,
    limit: Option<u32>,
    json: bool,
) -> Result<(), Failure> {
    let dead = dead_queue_name(queue);
    let (conn, channel) = open(broker, "dead list").await?;
    let available = dead_count(&channel, &dead).await?;
    let n = limit.map_or(available, |l| l.min(available));
    // Only the last delivery's acker is kept: one nack with `multiple` hands
    // them all back, and the bodies need not stay in memory.
    let mut shown = 0usize;
    let mut last = None;
    for _ in 0..n {
        match channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
            .await
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
        let _ = last
            .nack(BasicNackOptions {
                multiple: true,
                requeue: true,
            })
            .await;
    }
    if !json {
        eprintln!("{shown} of {available} dead letter(s) in \"{dead}\" shown");
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// `dead replay`: republishes dead letters to their queue with the attempt
/// count reset, each acked from the dead queue only after its confirm.
pub async fn dead_replay(
    broker: &config::BrokerConfig,
    queue: &str,
    limit: Option<u32>,
) -> Result<(), Failure> {
    let dead = dead_queue_name(queue);
    let (conn, channel) = open(broker, "dead replay").await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Failure::new(1, format!("cannot enable publisher confirms: {e}")))?;
    let publisher = publish::ConfirmChannel::new(channel.clone(), &conn);
    let available = dead_count(&channel, &dead).await?;
    // Bounded by what is there now, so that messages failing again are not replayed in a loop.
    let n = limit.map_or(available, |l| l.min(available));
    let mut replayed = 0u32;
    for _ in 0..n {
        let m = match channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
            .await
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
                    // Our own headers but the original `user_id`, and the
                    // count of a quorum dead queue's returns (`dead list`
                    // adds to it): the attempts start over.
                    .filter(|(k, _)| {
                        (!k.as_str().starts_with("x-amqp-exec-")
                            || k.as_str() == job::USER_ID_HEADER)
                            && k.as_str() != ATTEMPT_HEADER
                            && k.as_str() != DELIVERY_COUNT_HEADER
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let props = job::republished(&d.properties, FieldTable::from(kept));
        if let Err(e) = publish::publish_confirmed(&publisher, "", queue, &d.data, props).await {
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
            return Err(Failure::new(
                1,
                format!("replay stopped after {replayed}: cannot publish to \"{queue}\": {e}"),
            ));
        }
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| Failure::new(1, format!("replayed but could not ack from {dead}: {e}")))?;
        replayed += 1;
    }
    let _ = conn.close(200, "done".into()).await;
    println!("replayed {replayed} message(s) from \"{dead}\" to \"{queue}\"");
    Ok(())
}

/// `dead purge`: deletes every dead letter of `queue`.
pub async fn dead_purge(
    broker: &config::BrokerConfig,
    queue: &str,
    yes: bool,
) -> Result<(), Failure> {
    let dead = dead_queue_name(queue);
    if !yes {
        // A usage error whatever the broker says; the count only informs.
        let available = match open(broker, "dead purge").await {
            Ok((conn, channel)) => {
                let n = dead_count(&channel, &dead).await.ok();
                let _ = conn.close(200, "done".into()).await;
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
    let (conn, channel) = open(broker, "dead purge").await?;
    let purged = channel
        .queue_purge(dead.as_str().into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| Failure::new(1, format!("cannot purge {dead}: {e}")))?;
    let _ = conn.close(200, "done".into()).await;
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
