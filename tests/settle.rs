//! The settle path against the real broker: nothing amqp-exec or the broker
//! does with a message after its run may lose it, run it again, or cost the
//! connection. A queue whose command is missing is declared and keeps its
//! messages; a retry or dead letter that would not fit `frame_max` drops the
//! publisher's headers instead of the connection; a deleted retry queue is
//! declared again instead of running the job again; what the broker itself
//! drops (a quorum queue's delivery limit, from an argument or a policy)
//! lands in `<queue>.dead`; a job that panics is requeued. Every test ends
//! with a ledger: published = done + waiting + dead.

mod common;

use common::*;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use nix::sys::signal::Signal;
use std::future::Future;
use std::time::{Duration, Instant};

fn record_worker() -> String {
    repo("workers/testing/record.sh")
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes; whether it held.
async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages ready in `queue`, 0 when it does not exist.
async fn depth(broker: &Broker, queue: &str) -> u32 {
    broker.count(queue).await.unwrap_or(0)
}

/// The broker's major version, from `rabbitmqctl version` ("3.10.8" → 3).
fn broker_major() -> u32 {
    let version = rabbitmqctl(&["version"]);
    version
        .trim()
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the broker's version from {version:?}"))
}

/// (messages_ready, messages_unacknowledged) of `queue`, from `rabbitmqctl`.
fn ready_and_unacked(queue: &str) -> Option<(u32, u32)> {
    let out = rabbitmqctl(&[
        "-q",
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            [name, ready, unacked] if *name == queue => {
                Some((ready.parse().ok()?, unacked.parse().ok()?))
            }
            _ => None,
        }
    })
}

/// A broker policy of the test's own; cleared when dropped, also when the
/// test fails.
struct PolicyGuard {
    name: String,
}

impl PolicyGuard {
    fn set(name: &str, pattern: &str, definition: &str) -> PolicyGuard {
        // Guard first: a policy set by a call that then fails is cleared too.
        let guard = PolicyGuard {
            name: name.to_owned(),
        };
        rabbitmqctl(&[
            "set_policy",
            "--apply-to",
            "queues",
            "--priority",
            "100",
            name,
            pattern,
            definition,
        ]);
        guard
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl_command()
            .args(["clear_policy", &self.name])
            .stdin(std::process::Stdio::null())
            .output();
    }
}

/// Lines of the supervisor's log that contain `needle`.
fn log_lines(sup: &Supervisor, needle: &str) -> usize {
    sup.log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Publishes without `mandatory`, as most applications do: a message for a
/// queue that does not exist is acked by the broker and dropped.
async fn publish_plain(broker: &Broker, queue: &str, id: &str) {
    let confirm = broker
        .channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default()
                .with_message_id(id.into())
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "publish to {queue}: {confirm:?}");
}

/// A queue whose command does not exist yet is declared, with its retry and
/// dead queues, when the supervisor starts: what is published to it
/// meanwhile waits there (instead of being dropped as unroutable), and runs
/// once the command appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_a_missing_command_is_declared_and_keeps_its_messages() {
    let mut broker = Broker::connect().await;
    let q = unique("missing-cmd");
    broker.owns(&q);
    let work = Workdir::new();
    let later = work.file("later.sh");
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nbackoff = [\"1s\"]\n",
        later.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("queue paused", Duration::from_secs(20)).await;
    // The declaration may come just after the first "queue paused".
    wait_until(Duration::from_secs(5), || async {
        broker.count(&q).await.is_some()
    })
    .await;
    for i in 0..5 {
        publish_plain(&broker, &q, &format!("m{i}")).await;
    }
    // The issue waited 20 s. 10 s spans three more checks of the paused
    // queue (its pause doubles from 1 s), each of which could have taken
    // or dropped the messages, and keeps the test short.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        broker.count(&q).await,
        Some(5),
        "the 5 messages published while the command was missing wait in {q} \
         (None: the queue was never declared, and they were dropped); log:\n{}",
        tail(&sup.log_text(), 60)
    );
    for q in [format!("{q}.dead"), format!("{q}.retry.1s")] {
        assert_eq!(
            broker.count(&q).await,
            Some(0),
            "{q} was declared at start; log:\n{}",
            tail(&sup.log_text(), 60)
        );
    }

    // The command appears (whole, by a rename): the queue resumes.
    let partial = work.file("later.sh.partial");
    std::fs::copy(record_worker(), &partial).unwrap();
    std::fs::rename(&partial, &later).unwrap();
    let all_ran = wait_until(Duration::from_secs(45), || async {
        work.ledger().len() >= 5
    })
    .await;
    assert!(
        all_ran,
        "{} of 5 messages ran after the command appeared: {:?}; log:\n{}",
        work.ledger().len(),
        work.ledger(),
        tail(&sup.log_text(), 60)
    );
    broker.wait_count(&q, 0, Duration::from_secs(10)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let by_id = runs_by_id(&work.ledger());
    assert_eq!(by_id.len(), 5, "{by_id:?}");
    for (id, runs) in &by_id {
        assert_eq!(
            runs.iter().map(|r| r.attempt).collect::<Vec<_>>(),
            [1],
            "{id} ran once, as attempt 1"
        );
    }
    // Ledger: 5 published = 5 done + 0 waiting + 0 dead.
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

/// RabbitMQ's default `frame_max`, which amqp-exec asks for too.
const FRAME_MAX: usize = 131_072;
/// The publisher's own header that fills the frame.
const PADDING_HEADER: &str = "app-padding";

/// The size of the header table that brings the content-header frame of a
/// message with id `id` to `slack` bytes short of [`FRAME_MAX`].
fn header_table_size(id: &str, slack: usize) -> usize {
    // Frame header 7; class, weight, body size and property flags 14;
    // frame end 1.
    let frame_overhead = 7 + 14 + 1;
    // message_id (a short string) and delivery_mode (one byte).
    let other_properties = (1 + id.len()) + 1;
    FRAME_MAX - slack - frame_overhead - other_properties
}

/// The length of the padding header's value in that table.
fn padding_len(id: &str, slack: usize) -> usize {
    // Table length, key, type tag and the long string's length.
    let entry_overhead = 4 + (1 + PADDING_HEADER.len()) + 1 + 4;
    header_table_size(id, slack) - entry_overhead
}

/// Properties whose content-header frame is `slack` bytes short of
/// [`FRAME_MAX`]: `message_id`, `delivery_mode` (which `Broker::publish`
/// sets) and one long-string header padded to size.
fn frame_filling(id: &str, slack: usize) -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(
        PADDING_HEADER.into(),
        AMQPValue::LongString(LongString::from("p".repeat(padding_len(id, slack)))),
    );
    assert_eq!(
        amqp_exec::headers::encoded_size(&table),
        header_table_size(id, slack)
    );
    BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
        .with_headers(table)
}

/// A message whose headers come within a few bytes of `frame_max` is retried
/// and dead-lettered with the publisher's headers dropped (and named in
/// `x-amqp-exec-dropped-headers`) where they would not fit, rather than as a
/// header frame beyond `frame_max`: RabbitMQ 3.10 takes such a publish, but
/// the client that gets it delivered (the supervisor itself, for a retry)
/// loses its connection, again on every redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_filling_the_frame_never_cost_the_connection() {
    let mut broker = Broker::connect().await;
    let q = unique("frame");
    broker.declare(&q).await;
    let work = Workdir::new();
    // Fails with a retry on attempt 1, for good (65) after.
    let worker = work.script(
        "worker.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT $(date +%s%N) $(date +%s%N) $$" >> "$RECORD_DIR/ledger"
if [ "$AMQP_EXEC_ATTEMPT" = 1 ]; then exit 1; fi
exit 65
"#,
    );
    let slacks = [16usize, 50, 500];
    for slack in slacks {
        let id = format!("slack-{slack}");
        broker.publish(&q, b"x", frame_filling(&id, slack)).await;
    }
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 3\nmax_attempts = 3\nbackoff = [\"100ms\"]\n",
        worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    let dead_q = format!("{q}.dead");
    let all_dead = wait_until(Duration::from_secs(30), || async {
        depth(&broker, &dead_q).await >= 3
    })
    .await;
    assert!(
        all_dead,
        "{} of 3 frame-filling messages reached {dead_q} in 30 s; {} connection(s) lost, \
         {} runs; log:\n{}",
        depth(&broker, &dead_q).await,
        log_lines(&sup, "connection lost"),
        work.ledger().len(),
        tail(&sup.log_text(), 60)
    );
    // The last acks.
    broker.wait_count(&q, 0, Duration::from_secs(10)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;

    let log = sup.log_text();
    assert_eq!(
        log_lines(&sup, "connected to "),
        1,
        "one connection for the whole run; log:\n{}",
        tail(&log, 60)
    );
    assert_eq!(
        log_lines(&sup, "connection lost"),
        0,
        "no connection lost; log:\n{}",
        tail(&log, 60)
    );
    let by_id = runs_by_id(&work.ledger());
    // A dead letter larger than frame_max would cost this connection too,
    // and leave basic.get unanswered.
    let dead = tokio::time::timeout(Duration::from_secs(20), broker.drain(&dead_q))
        .await
        .unwrap_or_else(|_| panic!("{dead_q} could not be read: a dead letter beyond frame_max?"));
    assert_eq!(dead.len(), 3);
    for slack in slacks {
        let id = format!("slack-{slack}");
        let attempts: Vec<u32> = by_id
            .get(&id)
            .map(|runs| runs.iter().map(|r| r.attempt).collect())
            .unwrap_or_default();
        assert_eq!(attempts, [1, 2], "{id}: runs; log:\n{}", tail(&log, 60));
        let d = dead
            .iter()
            .find(|d| message_id(d) == id)
            .unwrap_or_else(|| panic!("{id} is not in {dead_q}"));
        let h = |key: &str| header(d, key);
        assert_eq!(h("x-amqp-exec-exit").as_deref(), Some("65"), "{id}");
        assert_eq!(h("x-amqp-exec-attempts").as_deref(), Some("2"), "{id}");
        assert_eq!(h("x-amqp-exec-queue").as_deref(), Some(q.as_str()), "{id}");
        // With 16 or 50 bytes to spare, the retry cannot keep the padding:
        // 16 is less than our retry headers take, and 50 leaves no room for
        // the headers the broker adds when the retry queue hands it back
        // (x-death and x-first-death-*, some 320 bytes here), which would
        // make a frame no client may take within frame_max. With 500 bytes
        // to spare, whether the dead letter still fits depends on the
        // length of the queue names and on the room amqp-exec keeps: it
        // either keeps the padding whole, or drops it and says so.
        match h("x-amqp-exec-dropped-headers") {
            Some(dropped) => {
                assert!(
                    dropped.split(", ").any(|name| name == PADDING_HEADER),
                    "{id}: x-amqp-exec-dropped-headers = {dropped:?} names {PADDING_HEADER}"
                );
                assert_eq!(h(PADDING_HEADER), None, "{id}: the dropped header is gone");
            }
            None => {
                assert!(
                    slack >= 500,
                    "{id}: no x-amqp-exec-dropped-headers; headers: {:?}",
                    d.properties.headers().as_ref().map(|t| t
                        .inner()
                        .keys()
                        .map(|k| k.as_str().to_owned())
                        .collect::<Vec<_>>())
                );
                assert_eq!(
                    h(PADDING_HEADER).map(|v| v.len()),
                    Some(padding_len(&id, slack)),
                    "{id}: the publisher's header is kept whole when nothing was dropped"
                );
            }
        }
        assert_eq!(d.data, b"x", "{id}: the body is kept");
    }
    // Ledger: 3 published = 0 done + 0 waiting + 3 dead.
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.retry.100ms")).await, Some(0));
    broker.cleanup().await;
}

/// A retry queue deleted while a job runs makes its republish come back
/// unroutable: the supervisor declares the topology again and republishes,
/// and never runs the job again because of it. The message takes its
/// `max_attempts` runs and ends in `<queue>.dead`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_retry_queue_never_makes_a_job_run_again() {
    let mut broker = Broker::connect().await;
    let q = unique("deleted-retry");
    broker.owns(&q);
    let work = Workdir::new();
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nmax_attempts = 3\nbackoff = [\"1s\"]\n\
         env = {{ SLEEP = \"2\", EXIT_CODE = \"1\" }}\n",
        record_worker()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    let published = Instant::now();
    broker.publish_id(&q, "once", b"x").await;
    // record.sh keeps the body as soon as it starts, then sleeps 2 s.
    let started = wait_until(Duration::from_secs(10), || async {
        work.file("body.once").exists()
    })
    .await;
    assert!(
        started,
        "the first run never started; log:\n{}",
        tail(&sup.log_text(), 60)
    );
    let retry_q = format!("{q}.retry.1s");
    broker
        .channel
        .queue_delete(retry_q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the retry queue");
    assert!(
        work.ledger().is_empty(),
        "the retry queue was deleted while the first run was still going"
    );

    let dead_q = format!("{q}.dead");
    wait_until(Duration::from_secs(30), || async {
        depth(&broker, &dead_q).await == 1
    })
    .await;
    // Count the runs over 25 s at least: a job run again would show.
    let window = Duration::from_secs(25);
    if let Some(rest) = window.checked_sub(published.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let runs = work.ledger();
    assert!(
        runs.len() <= 3,
        "the job ran {} times in {:?} with max_attempts = 3: attempts {:?}; log:\n{}",
        runs.len(),
        published.elapsed(),
        runs.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        tail(&sup.log_text(), 60)
    );
    // Stopped, the supervisor has settled whatever was running.
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let (dead, waiting) = (
        depth(&broker, &dead_q).await,
        depth(&broker, &q).await + depth(&broker, &retry_q).await,
    );
    assert_eq!(
        dead + waiting,
        1,
        "published 1 = dead {dead} + waiting {waiting}; log:\n{}",
        tail(&sup.log_text(), 60)
    );
    if dead == 1 {
        let d = broker.drain(&dead_q).await;
        assert_eq!(header(&d[0], "x-amqp-exec-exit").as_deref(), Some("1"));
        assert_eq!(header(&d[0], "x-amqp-exec-attempts").as_deref(), Some("3"));
        assert_eq!(
            runs.iter().map(|r| r.attempt).collect::<Vec<_>>(),
            [1, 2, 3],
            "one run per attempt"
        );
    }
    broker.cleanup().await;
}

/// `x-delivery-limit = -1` is "unlimited" to amqp-exec. RabbitMQ 4 agrees;
/// RabbitMQ 3 takes it as a limit it has already passed and dead-letters
/// the message on its first return. Either way nothing is lost: the work
/// queue dead-letters what the broker drops to `<queue>.dead`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_delivery_limit_is_unlimited_and_nothing_the_broker_drops_is_lost() {
    let major = broker_major();
    let mut broker = Broker::connect().await;
    let q = unique("neg-limit");
    // Declared by the supervisor, so that it gets its dead-letter arguments.
    broker.owns(&q);
    let work = Workdir::new();
    // Asks for a requeue (75) on its first run only; fails (1) after.
    let worker = work.script(
        "worker.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT $(date +%s%N) $(date +%s%N) $$" >> "$RECORD_DIR/ledger"
if [ -e "$RECORD_DIR/requeued" ]; then exit 1; fi
touch "$RECORD_DIR/requeued"
exit 75
"#,
    );
    let config = format!(
        r#"
[[queue]]
name = "{q}"
queue_type = "quorum"
command = ["{}"]
max_attempts = 3
backoff = ["100ms"]
arguments = {{ "x-delivery-limit" = -1 }}
[queue.exit_codes]
75 = "requeue"
"#,
        worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(30)).await;
    broker.publish_id(&q, "m", b"x").await;
    let dead_q = format!("{q}.dead");
    let arrived = wait_until(Duration::from_secs(30), || async {
        depth(&broker, &dead_q).await == 1
    })
    .await;
    assert!(
        arrived,
        "RabbitMQ {major}: the message never reached {dead_q} (work queue: {:?}, runs: {:?}); \
         log:\n{}",
        broker.count(&q).await,
        work.ledger(),
        tail(&sup.log_text(), 60)
    );
    // A run that should not happen would start at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let runs = work.ledger();
    let dead = broker.drain(&dead_q).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    if major >= 4 {
        // Unlimited: the message gets its max_attempts runs, the requeued
        // first one counted by the quorum queue's x-delivery-count.
        assert_eq!(
            runs.len(),
            3,
            "runs: {runs:?}; log:\n{}",
            tail(&sup.log_text(), 60)
        );
        assert_eq!(header(d, "x-amqp-exec-exit").as_deref(), Some("1"));
        assert_eq!(header(d, "x-amqp-exec-attempts").as_deref(), Some("3"));
    } else {
        // The broker dead-lettered it on its first return.
        assert_eq!(
            runs.len(),
            1,
            "runs: {runs:?}; log:\n{}",
            tail(&sup.log_text(), 60)
        );
        assert!(
            header(d, "x-death").is_some(),
            "the broker dead-lettered it: {:?}",
            d.properties.headers()
        );
    }
    // Ledger: 1 published = 0 done + 0 waiting + 1 dead.
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.retry.100ms")).await, Some(0));
    broker.cleanup().await;
}

/// A `delivery-limit` from a policy, which amqp-exec does not see: the broker
/// drops the message after its third return, and the work queue's
/// dead-letter arguments send it to `<queue>.dead`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_delivery_limit_drop_lands_in_the_dead_queue() {
    let mut broker = Broker::connect().await;
    let q = unique("policy-limit");
    broker.owns(&q);
    let _policy = PolicyGuard::set(
        &format!("{q}-policy"),
        &format!("^{q}$"),
        r#"{"delivery-limit":2}"#,
    );
    let work = Workdir::new();
    let worker = work.script(
        "worker.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT $(date +%s%N) $(date +%s%N) $$" >> "$RECORD_DIR/ledger"
exit 75
"#,
    );
    let config = format!(
        "[[queue]]\nname = \"{q}\"\nqueue_type = \"quorum\"\ncommand = [\"{}\"]\nmax_attempts = 3\n\
         backoff = [\"100ms\"]\n[queue.exit_codes]\n75 = \"requeue\"\n",
        worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(30)).await;
    broker.publish_id(&q, "m", b"x").await;
    let dead_q = format!("{q}.dead");
    let arrived = wait_until(Duration::from_secs(30), || async {
        depth(&broker, &dead_q).await == 1
    })
    .await;
    assert!(
        arrived,
        "the message never reached {dead_q} (work queue: {:?}, runs: {:?}); log:\n{}",
        broker.count(&q).await,
        work.ledger(),
        tail(&sup.log_text(), 60)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let runs = work.ledger();
    assert!(
        (1..=3).contains(&runs.len()),
        "at most 1 + delivery-limit runs: {runs:?}; log:\n{}",
        tail(&sup.log_text(), 60)
    );
    let dead = broker.drain(&dead_q).await;
    assert_eq!(dead.len(), 1);
    assert!(
        header(&dead[0], "x-death").is_some() || header(&dead[0], "x-amqp-exec-exit").is_some(),
        "a dead letter of the broker's or of amqp-exec's: {:?}",
        dead[0].properties.headers()
    );
    // Ledger: 1 published = 0 done + 0 waiting + 1 dead.
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

/// A job that panics after its worker ran and before it is settled (debug
/// builds: `AMQP_EXEC_TEST_PANIC_ID`, once) hands its delivery back: the
/// message runs again and is acked, the others are not disturbed, and the
/// supervisor keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_is_requeued() {
    let mut broker = Broker::connect().await;
    let q = unique("panic");
    broker.declare(&q).await;
    let ids = ["boom", "m1", "m2", "m3"];
    for id in ids {
        broker.publish_id(&q, id, b"x").await;
    }
    let work = Workdir::new();
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 2\nbackoff = [\"100ms\"]\n",
        record_worker()
    );
    let mut sup =
        Supervisor::start_with_env(&work, &config, &[], &[("AMQP_EXEC_TEST_PANIC_ID", "boom")]);
    let runs_of = |id: &str| runs_by_id(&work.ledger()).get(id).map_or(0, |r| r.len());
    let all_ran = wait_until(Duration::from_secs(30), || async {
        runs_of("boom") >= 2 && ["m1", "m2", "m3"].iter().all(|id| runs_of(id) >= 1)
    })
    .await;
    assert!(
        all_ran,
        "boom ran {} time(s), expected 2 (before and after its panic); runs: {:?}; log:\n{}",
        runs_of("boom"),
        work.ledger(),
        tail(&sup.log_text(), 60)
    );
    let settled = wait_until(Duration::from_secs(15), || async {
        ready_and_unacked(&q) == Some((0, 0))
    })
    .await;
    assert!(
        settled,
        "{q}: (ready, unacked) = {:?}; log:\n{}",
        ready_and_unacked(&q),
        tail(&sup.log_text(), 60)
    );
    assert!(
        running(sup.pid()),
        "the supervisor survived the panic; log:\n{}",
        tail(&sup.log_text(), 60)
    );
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let by_id = runs_by_id(&work.ledger());
    for id in ids {
        let runs = by_id.get(id).map_or(0, |r| r.len());
        let expected = if id == "boom" { 2 } else { 1 };
        assert_eq!(runs, expected, "{id}: runs: {by_id:?}");
    }
    // Ledger: 4 published = 4 done + 0 waiting + 0 dead.
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

/// A message whose properties fill the frame to within a few bytes on a
/// quorum queue comes back to the client larger than `frame_max` once it
/// was returned (the broker adds `x-delivery-count` to a redelivery), and
/// the client must close the connection. It comes
/// back on every connection: the supervisor says what it is and reconnects
/// ever more slowly instead of in a tight loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_to_deliver_slows_reconnects_and_says_why() {
    let mut broker = Broker::connect().await;
    let q = unique("frame-quorum");
    broker.declare_quorum(&q).await;
    let work = Workdir::new();
    broker.publish(&q, b"x", frame_filling("too-full", 4)).await;
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nqueue_type = \"quorum\"\nexit_codes = {{ \"0\" = \"requeue\" }}\n",
        record_worker()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("cannot be read", Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let log = sup.log_text();
    let connects = log_lines(&sup, "connected to");
    assert!(
        log.contains("frame_max"),
        "the error names the cause:\n{}",
        tail(&log, 20)
    );
    // 0.5 s doubling: about 5 connections in 10 s, not a tight loop.
    assert!(
        connects <= 6,
        "{connects} connections in ~10 s:\n{}",
        tail(&log, 20)
    );
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_eq!(
        work.ledger().len(),
        1,
        "only the first delivery could be read"
    );
    // Nothing lost: the message is still in its queue.
    assert_eq!(depth(&broker, &q).await, 1);
    broker.cleanup().await;
}
