//! Broker connection: connects with heartbeats and a timeout, cycles through
//! cluster nodes, and declares each queue's topology (work queue, one retry
//! queue per backoff delay, dead-letter queue).

use crate::config::{ArgValue, BrokerConfig, QueueConfig, QueueType};
use crate::headers;
use crate::uri::{parse_uri, redact, redact_text};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::AMQPScheme;
use lapin::{Channel, Connection, ConnectionProperties};
use std::collections::BTreeSet;
use std::time::Duration;

/// The largest frame asked for when the URL sets no `frame_max`: RabbitMQ's
/// default, and the bound on how large, and so how deeply nested, the
/// headers of a delivery can be.
pub const FRAME_MAX: u32 = 131_072;

/// Stack size for the threads that lapin and tokio start without a size of
/// their own (set through `RUST_MIN_STACK` before any thread starts). lapin
/// reads and writes message headers on its I/O thread, one level of
/// recursion per level of nesting: a delivery with headers nested some
/// thousands deep overflowed the default 2 MiB stack and aborted the process,
/// then again on every redelivery. 64 MiB holds the deepest nesting a
/// [`FRAME_MAX`] frame can carry (measured: 26,000 levels need more than
/// 16 MiB). It is address space; a thread's memory is only what it touches.
pub const THREAD_STACK: usize = 64 << 20;

/// Whether [`use_thread_stack`] set `RUST_MIN_STACK` (rather than the user).
static OWN_STACK_SETTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets `RUST_MIN_STACK` to [`THREAD_STACK`] unless it is set already.
/// Workers do not inherit it (see [`is_own_stack_setting`]).
///
/// # Safety
///
/// It changes the environment: call it before any other thread starts.
pub unsafe fn use_thread_stack() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: the caller guarantees that no other thread runs yet.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK.to_string()) };
        OWN_STACK_SETTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// True for the variable `RUST_MIN_STACK` when [`use_thread_stack`] set it.
pub fn is_own_stack_setting(key: &str) -> bool {
    key == "RUST_MIN_STACK" && OWN_STACK_SETTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Connects to one URL with the configured heartbeat and timeout.
pub async fn connect(url: &str, broker: &BrokerConfig, name: &str) -> Result<Connection, String> {
    let mut uri = parse_uri(url)?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(broker.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16);
    }
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let connecting = async {
        match (&broker.tls, &uri.scheme) {
            // The config always builds TLS settings for amqps:// URLs.
            (Some(tls), AMQPScheme::AMQPS) => crate::tls::connect(uri, tls.clone(), props).await,
            (tls, _) => {
                if tls.is_some() {
                    tracing::warn!(
                        "{}: [broker.tls] is set but the URL is amqp://, so the connection is not encrypted; use amqps://",
                        redact(url)
                    );
                }
                Connection::connect_uri(uri, props).await
            }
        }
    };
    match tokio::time::timeout(broker.connect_timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!(
            "cannot connect to {}: {}",
            redact(url),
            redact_text(&e.to_string(), url)
        )),
        Err(_) => Err(format!(
            "cannot connect to {}: no answer within {:?}",
            redact(url),
            broker.connect_timeout
        )),
    }
}

/// Tries each URL once, starting at `start`; returns the connection and the
/// index of the URL that answered, or the last error.
pub async fn connect_any(
    broker: &BrokerConfig,
    start: usize,
    name: &str,
) -> Result<(Connection, usize), String> {
    let n = broker.urls.len();
    let mut last = String::new();
    for i in 0..n {
        let index = (start + i) % n;
        match connect(&broker.urls[index], broker, name).await {
            Ok(conn) => return Ok((conn, index)),
            Err(e) => {
                tracing::warn!("{e}");
                last = e;
            }
        }
    }
    Err(last)
}

/// Messages ready in `queue`, by a passive declare. An error (the queue does
/// not exist) closes the channel, so give it a channel of its own.
pub async fn queue_depth(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map(|q| q.message_count())
}

fn arg_value(v: &ArgValue) -> AMQPValue {
    match v {
        ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
        ArgValue::Float(f) => AMQPValue::Double(*f),
        ArgValue::Bool(b) => AMQPValue::Boolean(*b),
        ArgValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
    }
}

fn insert_args(t: &mut FieldTable, args: &std::collections::BTreeMap<String, ArgValue>) {
    for (k, v) in args {
        t.insert(k.as_str().into(), arg_value(v));
    }
}

/// `x-queue-type` of a queue of type `kind`, always given: without it,
/// RabbitMQ 3.13 and later create a queue of the virtual host's default
/// type, which may be quorum. A classic queue declared earlier without the
/// argument still matches.
pub fn type_args(kind: QueueType) -> FieldTable {
    let name = match kind {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(name)),
    );
    t
}

fn typed(queue: &QueueConfig) -> FieldTable {
    type_args(queue.queue_type)
}

/// The `x-delivery-limit` of quorum dead-letter queues: in effect none
/// (RabbitMQ 4 sets 20 by default; 3.x reads -1 as "drop on the first
/// return"). `dead list` returns what it shows to the queue, which counts
/// as a return.
pub const DEAD_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// Starts a task that cancels `lost` once `up` says no, checking twice a
/// second; it ends with `lost`.
pub fn watch_lost(
    lost: tokio_util::sync::CancellationToken,
    up: impl Fn() -> bool + Send + 'static,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = lost.cancelled() => return,
                _ = tick.tick() => {
                    if !up() {
                        lost.cancel();
                        return;
                    }
                }
            }
        }
    });
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The arguments the work queue of `queue` is declared with: its type,
/// `[queue.arguments]`, `x-single-active-consumer`, and a dead-letter
/// exchange to its dead-letter queue (unless the arguments name one), so
/// that what the broker itself drops (past a delivery limit, say) is kept.
pub fn work_queue_args(queue: &QueueConfig) -> FieldTable {
    let mut args = typed(queue);
    insert_args(&mut args, &queue.arguments);
    if queue.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    if !queue.arguments.contains_key("x-dead-letter-exchange") {
        insert_dead_letter_args(&mut args, &queue.name);
    }
    args
}

/// Adds the arguments that make the broker dead-letter what it drops from
/// work queue `queue` to its dead-letter queue.
pub fn insert_dead_letter_args(args: &mut FieldTable, queue: &str) {
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    args.insert(
        "x-dead-letter-routing-key".into(),
        long_string(&crate::config::dead_queue_name(queue)),
    );
}

/// The arguments of the dead-letter queue of `queue`.
pub fn dead_queue_args(queue: &QueueConfig) -> FieldTable {
    let mut args = typed(queue);
    if queue.queue_type == QueueType::Quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DEAD_DELIVERY_LIMIT),
        );
    }
    args
}

/// How long declaring a queue's topology may take. A durable classic queue
/// whose node is down, in a cluster, can leave a declaration unanswered.
pub const DECLARE_LIMIT: Duration = Duration::from_secs(10);

/// Declares the queue (see [`work_queue_args`]), its retry queues and its
/// dead-letter queue, all durable, then the exchanges and bindings of
/// `[[queue.bind]]`, on a channel of its own (a refused declaration closes
/// its channel). Queues that exist as an earlier version declared them are
/// used as they are, with a warning that says what they lack. An error
/// after [`DECLARE_LIMIT`] without an answer.
pub async fn declare_topology(conn: &Connection, queue: &QueueConfig) -> Result<(), String> {
    match tokio::time::timeout(DECLARE_LIMIT, declare_all(conn, queue)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the broker did not answer the declaration of \"{}\" and its retry and dead-letter \
             queues within {}s (in a cluster: is the node of a classic queue down?)",
            queue.name,
            DECLARE_LIMIT.as_secs()
        )),
    }
}

async fn declare_all(conn: &Connection, queue: &QueueConfig) -> Result<(), String> {
    let open = || async {
        conn.create_channel()
            .await
            .map_err(|e| format!("cannot open a channel: {e}"))
    };
    let mut channel = open().await?;
    let work_args = work_queue_args(queue);
    let dead = queue.dead_queue();
    let mut before = vec![headers::without(
        &work_args,
        &["x-dead-letter-exchange", "x-dead-letter-routing-key"],
    )];
    before.retain(|b| b != &work_args);
    let used = declare_typed(conn, &mut channel, queue, &queue.name, work_args, before).await?;
    if used == 1 {
        tracing::warn!(
            queue = %queue.name,
            "queue \"{}\" exists without a dead-letter exchange (declared by an earlier version): \
             messages the broker drops from it (past a delivery limit, say) are lost; give it a \
             policy with dead-letter-exchange = \"\" and dead-letter-routing-key = \"{dead}\", or \
             delete it while it is empty to have it declared again",
            queue.name
        );
    }
    let dead_args = dead_queue_args(queue);
    let dead_before: Vec<FieldTable> = [headers::without(&dead_args, &["x-delivery-limit"])]
        .into_iter()
        .filter(|b| b != &dead_args)
        .collect();
    if declare_typed(conn, &mut channel, queue, &dead, dead_args, dead_before).await? == 1 {
        tracing::warn!(
            queue = %queue.name,
            "dead-letter queue \"{dead}\" exists with the broker's delivery limit (declared by an \
             earlier version): on RabbitMQ 4, a dead letter returned 20 times (each `dead list` \
             returns what it shows) is dropped; delete it while it is empty to have it declared again"
        );
    }
    let delays: BTreeSet<Duration> = queue.policy.backoff.iter().copied().collect();
    for delay in delays {
        let name = queue.retry_queue(delay);
        let mut args = typed(queue);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        args.insert("x-dead-letter-exchange".into(), long_string(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            long_string(queue.name.as_str()),
        );
        if queue.queue_type != QueueType::Quorum {
            declare_typed(conn, &mut channel, queue, &name, args, Vec::new()).await?;
            continue;
        }
        // Hand messages back only once the work queue has taken them
        // (at-most-once, the default, drops them if it has no quorum).
        let legacy = args.clone();
        args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        args.insert("x-overflow".into(), long_string("reject-publish"));
        if declare_or_as_before(conn, &mut channel, &name, args, vec![legacy]).await? == 1 {
            tracing::warn!(
                queue = %queue.name,
                "retry queue \"{name}\" exists without at-least-once dead-lettering (declared by \
                 an earlier version): its messages go back at most once, and are lost if the \
                 work queue has no quorum then; delete it while it is empty to have it declared again"
            );
        }
    }
    for b in &queue.bindings {
        let mut bind_args = FieldTable::default();
        insert_args(&mut bind_args, &b.arguments);
        let kind = match b.kind.as_str() {
            "topic" => lapin::ExchangeKind::Topic,
            "fanout" => lapin::ExchangeKind::Fanout,
            "headers" => lapin::ExchangeKind::Headers,
            _ => lapin::ExchangeKind::Direct,
        };
        channel
            .exchange_declare(
                b.exchange.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot declare exchange \"{}\" ({}): {e}",
                    b.exchange, b.kind
                )
            })?;
        channel
            .queue_bind(
                queue.name.as_str().into(),
                b.exchange.as_str().into(),
                b.routing_key.as_str().into(),
                QueueBindOptions::default(),
                bind_args,
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot bind queue \"{}\" to exchange \"{}\" with key \"{}\": {e}",
                    queue.name, b.exchange, b.routing_key
                )
            })?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Declares queue `name` of `queue`'s topology with `args`, which hold
/// `x-queue-type`, else with each of `before` in turn (how earlier versions
/// declared it); returns 0 for `args`, or which of `before` (from 1) the
/// queue matched. On RabbitMQ 3.13 and later, earlier versions, which
/// declared classic queues without `x-queue-type`, got queues of the virtual
/// host's default type: a classic queue that exists as another type is used
/// as it is, with a warning, rather than left unconsumed.
async fn declare_typed(
    conn: &Connection,
    channel: &mut Channel,
    queue: &QueueConfig,
    name: &str,
    args: FieldTable,
    mut before: Vec<FieldTable>,
) -> Result<usize, String> {
    let classic = queue.queue_type == QueueType::Classic;
    let tries = before.len() + 1;
    if classic {
        let untyped: Vec<FieldTable> = std::iter::once(&args)
            .chain(before.iter())
            .map(|t| headers::without(t, &["x-queue-type"]))
            .collect();
        before.extend(untyped);
    }
    match declare_or_as_before(conn, channel, name, args, before).await {
        Ok(n) if n < tries => Ok(n),
        Ok(n) => {
            tracing::warn!(
                queue = %queue.name,
                "queue \"{name}\" is not a classic queue (declared without x-queue-type, it took the \
                 virtual host's default type): using it as it is; set queue_type = \"quorum\" to match it"
            );
            Ok(n - tries)
        }
        Err(e) if classic && e.contains("x-queue-type") => Err(format!(
            "{e}; it is not a classic queue, as queue_type = \"classic\" (the default) says: \
             set queue_type to its type"
        )),
        Err(e) => Err(e),
    }
}

/// Declares queue `name` with `args`. Where it exists with other arguments,
/// declares it again with each of `before` (the arguments earlier versions
/// declared it with) in turn, each on a new channel, as a refusal closes
/// the channel: Ok(n) for the n-th of them (from 1), Ok(0) for `args`. An
/// error is the first refusal over the queue's type, else the last one.
async fn declare_or_as_before(
    conn: &Connection,
    channel: &mut Channel,
    name: &str,
    args: FieldTable,
    before: Vec<FieldTable>,
) -> Result<usize, String> {
    let mut e = match declare(channel, name, args).await {
        Ok(()) => return Ok(0),
        Err(e) => e,
    };
    if !e.contains("already exists with other arguments") {
        return Err(e);
    }
    for (i, args) in before.into_iter().enumerate() {
        *channel = conn
            .create_channel()
            .await
            .map_err(|o| format!("{e}; cannot open a channel: {o}"))?;
        match declare(channel, name, args).await {
            Ok(()) => return Ok(i + 1),
            // A refusal over the queue's type says the most.
            Err(other) if !e.contains("'x-queue-type'") => e = other,
            Err(_) => {}
        }
    }
    Err(e)
}

/// Declares queue `name`, durable, with `args`.
async fn declare(channel: &Channel, name: &str, args: FieldTable) -> Result<(), String> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), durable, args)
        .await
        .map(|_| ())
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
                format!(
                    "queue \"{name}\" already exists with other arguments ({text}); \
                     delete it, make the config match, or set declare = false to use it as it is"
                )
            } else {
                format!("cannot declare queue \"{name}\": {text}")
            }
        })
}
