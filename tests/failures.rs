//! Failure handling against the real broker: every exit path, exit-code
//! mappings, delayed retries, dead-letter headers, timeouts that kill the
//! process group, spawn failures that pause a queue, oversized bodies,
//! topology conflicts, and the dead-letter CLI. Every test ends with a
//! ledger: published = done + waiting + dead.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn record_worker() -> String {
    repo("workers/testing/record.sh")
}

/// A worker that records its run, then exits with the code in its body
/// ("kill" makes it SIGKILL itself).
const EXIT_BY_BODY: &str = r#"#!/bin/sh
body=$(cat)
echo "$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT $(date +%s%N) $(date +%s%N) $$" >> "$RECORD_DIR/ledger"
echo "failing with $body on attempt $AMQP_EXEC_ATTEMPT" >&2
if [ "$body" = kill ]; then kill -9 $$; fi
exit "$body"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_default_exit_path() {
    let mut broker = Broker::connect().await;
    let q = unique("exits");
    broker.declare(&q).await;
    let work = Workdir::new();
    let worker = work.script("worker.sh", EXIT_BY_BODY);
    let cases = [
        ("ok", "0"),
        ("data", "65"),
        ("temp", "75"),
        ("other", "3"),
        ("signal", "kill"),
    ];
    for (id, body) in cases {
        broker.publish_id(&q, id, body.as_bytes()).await;
    }
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 2\nmax_attempts = 2\nbackoff = [\"200ms\"]\n",
        worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    let dead_q = format!("{q}.dead");
    broker.wait_count(&dead_q, 4, Duration::from_secs(30)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;

    let by_id = runs_by_id(&work.ledger());
    let attempts = |id: &str| -> Vec<u32> { by_id[id].iter().map(|r| r.attempt).collect() };
    assert_eq!(attempts("ok"), [1], "0 → ack");
    assert_eq!(attempts("data"), [1], "65 → dead-letter at once");
    assert_eq!(
        attempts("temp"),
        [1, 2],
        "75 → retry, then dead after max_attempts"
    );
    assert_eq!(attempts("other"), [1, 2], "other codes → retry, then dead");
    assert_eq!(
        attempts("signal"),
        [1, 2],
        "death by signal → retry, then dead"
    );

    let dead = broker.drain(&dead_q).await;
    let exit_of = |id: &str| {
        let d = dead
            .iter()
            .find(|d| message_id(d) == id)
            .unwrap_or_else(|| panic!("{id} not dead"));
        (
            header(d, "x-amqp-exec-exit").unwrap(),
            header(d, "x-amqp-exec-attempts").unwrap(),
        )
    };
    assert_eq!(exit_of("data"), ("65".into(), "1".into()));
    assert_eq!(exit_of("temp"), ("75".into(), "2".into()));
    assert_eq!(exit_of("other"), ("3".into(), "2".into()));
    assert_eq!(exit_of("signal"), ("SIGKILL".into(), "2".into()));
    // Ledger: 5 published = 1 done + 0 waiting + 4 dead.
    assert_eq!(dead.len(), 4);
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.retry.200ms")).await, Some(0));
    broker.cleanup().await;
}

/// A message published by another broker user carries that user in
/// `user_id`, and the broker refuses a publish whose `user_id` is not the
/// connection's user: the retry and the dead letter keep it in a header
/// instead, and the other jobs on the channel are acked as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_another_broker_user_is_retried_and_dead_lettered() {
    let mut broker = Broker::connect().await;
    let q = unique("user-id");
    broker.declare(&q).await;
    let user = BrokerUser::add("app-user");
    let app = lapin::Connection::connect(&user.url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect as the test's broker user");
    let ch = app.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id("from-app".into())
        .with_user_id(user.name.as_str().into());
    let confirm = ch
        .basic_publish(
            "".into(),
            q.as_str().into(),
            Default::default(),
            b"3",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let _ = app.close(200, "ok".into()).await;
    for id in ["ok-1", "ok-2"] {
        broker.publish_id(&q, id, b"0").await;
    }

    let work = Workdir::new();
    let worker = work.script("worker.sh", EXIT_BY_BODY);
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 3\nmax_attempts = 2\nbackoff = [\"200ms\"]\n",
        worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    let dead_q = format!("{q}.dead");
    broker.wait_count(&dead_q, 1, Duration::from_secs(30)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;

    let by_id = runs_by_id(&work.ledger());
    let attempts = |id: &str| -> Vec<u32> { by_id[id].iter().map(|r| r.attempt).collect() };
    assert_eq!(attempts("from-app"), [1, 2], "{}", sup.log_text());
    assert_eq!(
        attempts("ok-1"),
        [1],
        "ran once: acked on a healthy channel"
    );
    assert_eq!(attempts("ok-2"), [1]);
    let dead = broker.drain(&dead_q).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].properties.user_id(), &None);
    assert_eq!(
        header(&dead[0], "x-amqp-exec-user-id"),
        Some(user.name.clone())
    );
    assert_eq!(
        header(&dead[0], "x-amqp-exec-attempts").as_deref(),
        Some("2")
    );
    assert!(
        !sup.log_text().contains("channel error"),
        "{}",
        sup.log_text()
    );
    // Ledger: 3 published = 2 done + 0 waiting + 1 dead.
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.retry.200ms")).await, Some(0));
    broker.cleanup().await;
}

/// Takes the only message of quorum queue `q` and hands it back, `n` times:
/// its next delivery carries `x-delivery-count` = `n`.
async fn return_times(broker: &Broker, q: &str, n: usize) {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    for i in 0..n {
        let start = Instant::now();
        let m = loop {
            if let Some(m) = broker
                .channel
                .basic_get(q.into(), BasicGetOptions::default())
                .await
                .expect("basic.get")
            {
                break m;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no message in {q} after {i} returns"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        m.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .expect("nack");
    }
}

/// A delivery that a quorum queue returned 18 times without a run
/// finishing (a message that kills the supervisor, say) is dead-lettered
/// without running, two returns before RabbitMQ 4's default delivery-limit
/// of 20 would drop it; one returned 17 times runs as attempt 18. An
/// `x-delivery-count` that is only a publisher's header does not count: on a
/// quorum queue's first delivery (which the broker leaves as published), or
/// on a classic queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_returned_too_often_is_dead_lettered_without_running() {
    use lapin::types::{AMQPValue, FieldTable};
    let mut broker = Broker::connect().await;
    let (looped, almost, classic) = (
        unique("redelivered-q"),
        unique("redelivered-q2"),
        unique("redelivered-c"),
    );
    for q in [&looped, &almost] {
        broker.declare_quorum(q).await;
    }
    broker.owns(&classic);
    let counted = |id: &str, delivery_count: i64| {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-delivery-count".into(),
            AMQPValue::LongLongInt(delivery_count),
        );
        lapin::BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(headers)
    };
    broker.publish_id(&looped, "looped", b"0").await;
    return_times(&broker, &looped, 18).await;
    broker.publish_id(&almost, "almost", b"0").await;
    return_times(&broker, &almost, 17).await;
    broker.publish(&almost, b"0", counted("forged", 25)).await;

    let work = Workdir::new();
    let worker = work.script("worker.sh", EXIT_BY_BODY);
    let config = format!(
        "[[queue]]\nname = \"{looped}\"\nqueue_type = \"quorum\"\ncommand = [\"{w}\"]\nmax_attempts = 2\n\
         [[queue]]\nname = \"{almost}\"\nqueue_type = \"quorum\"\ncommand = [\"{w}\"]\nmax_attempts = 2\n\
         [[queue]]\nname = \"{classic}\"\ncommand = [\"{w}\"]\nmax_attempts = 2\n",
        w = worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("all queues started", Duration::from_secs(20))
        .await;
    broker
        .publish(&classic, b"0", counted("forwarded", 25))
        .await;
    let dead_q = format!("{looped}.dead");
    broker.wait_count(&dead_q, 1, Duration::from_secs(30)).await;
    work.wait_ledger(3, Duration::from_secs(10)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;

    let by_id = runs_by_id(&work.ledger());
    let attempts = |id: &str| -> Vec<u32> { by_id[id].iter().map(|r| r.attempt).collect() };
    assert!(!by_id.contains_key("looped"), "ran after 18 returns");
    assert_eq!(attempts("almost"), [18], "1 + 17 returns; succeeds");
    assert_eq!(
        attempts("forged"),
        [1],
        "a first delivery's header does not count"
    );
    assert_eq!(
        attempts("forwarded"),
        [1],
        "a classic queue's header does not count"
    );
    let dead = broker.drain(&dead_q).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(message_id(&dead[0]), "looped");
    assert_eq!(
        header(&dead[0], "x-amqp-exec-exit").as_deref(),
        Some("redelivered")
    );
    assert_eq!(
        header(&dead[0], "x-amqp-exec-attempts").as_deref(),
        Some("19")
    );
    // Ledger: 4 published = 3 done + 0 waiting + 1 dead.
    for q in [&looped, &almost, &classic] {
        assert_eq!(broker.count(q).await, Some(0));
    }
    assert_eq!(broker.count(&format!("{almost}.dead")).await, Some(0));
    assert_eq!(broker.count(&format!("{classic}.dead")).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_mappings() {
    let mut broker = Broker::connect().await;
    let q = unique("mapped");
    broker.declare(&q).await;
    let work = Workdir::new();
    // "requeue" exits 7 on its first run only (a marker file remembers it).
    let worker = work.script(
        "worker.sh",
        r#"#!/bin/sh
body=$(cat)
echo "$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT $(date +%s%N) $(date +%s%N) $$" >> "$RECORD_DIR/ledger"
case "$body" in
  requeue) if [ -e "$RECORD_DIR/requeued" ]; then exit 3; fi; touch "$RECORD_DIR/requeued"; exit 7;;
  *) exit "$body";;
esac
"#,
    );
    let config = format!(
        r#"
[[queue]]
name = "{q}"
command = ["{}"]
max_attempts = 2
backoff = ["200ms"]
[queue.exit_codes]
0 = "dead-letter"
3 = "ack"
4 = "drop"
5 = "dead-letter"
6 = "retry"
7 = "requeue"
65 = "retry"
"#,
        worker.display()
    );
    for (id, body) in [
        ("zero", "0"),
        ("ack", "3"),
        ("drop", "4"),
        ("dead", "5"),
        ("retry", "6"),
        ("requeue", "requeue"),
        ("data", "65"),
    ] {
        broker.publish_id(&q, id, body.as_bytes()).await;
    }
    let mut sup = Supervisor::start(&work, &config, &[]);
    let dead_q = format!("{q}.dead");
    broker.wait_count(&dead_q, 4, Duration::from_secs(30)).await;
    // Wait for the requeued one to finish too.
    let start = std::time::Instant::now();
    while runs_by_id(&work.ledger())
        .get("requeue")
        .map_or(0, |r| r.len())
        < 2
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "requeued message never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.wait_count(&q, 0, Duration::from_secs(10)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;

    let by_id = runs_by_id(&work.ledger());
    let attempts = |id: &str| -> Vec<u32> { by_id[id].iter().map(|r| r.attempt).collect() };
    assert_eq!(attempts("zero"), [1]);
    assert_eq!(attempts("ack"), [1]);
    assert_eq!(attempts("drop"), [1]);
    assert_eq!(attempts("dead"), [1]);
    assert_eq!(attempts("retry"), [1, 2]);
    assert_eq!(attempts("data"), [1, 2], "65 mapped to retry");
    assert_eq!(
        attempts("requeue"),
        [1, 1],
        "requeue does not count an attempt"
    );
    let dead = broker.drain(&dead_q).await;
    let mut dead_ids: Vec<String> = dead.iter().map(message_id).collect();
    dead_ids.sort();
    assert_eq!(dead_ids, ["data", "dead", "retry", "zero"]);
    assert!(sup.log_text().contains("dropping the message"));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_count_attempts_wait_their_delay_and_dead_letter_with_headers() {
    let mut broker = Broker::connect().await;
    let q = unique("retry");
    broker.declare(&q).await;
    let work = Workdir::new();
    let config = format!(
        r#"
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "echo first line >&2; echo \"boom on attempt $AMQP_EXEC_ATTEMPT of $AMQP_EXEC_MAX_ATTEMPTS\" >&2; exec \"$0\"", "{}"]
max_attempts = 3
backoff = ["300ms", "600ms"]
env = {{ EXIT_CODE = "1" }}
"#,
        record_worker()
    );
    broker
        .publish(
            &q,
            b"payload",
            lapin::BasicProperties::default()
                .with_message_id("r1".into())
                .with_headers({
                    let mut h = lapin::types::FieldTable::default();
                    h.insert(
                        "tenant".into(),
                        lapin::types::AMQPValue::LongString("acme".into()),
                    );
                    h
                }),
        )
        .await;
    let mut sup = Supervisor::start(&work, &config, &[]);
    let dead_q = format!("{q}.dead");
    broker.wait_count(&dead_q, 1, Duration::from_secs(30)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;

    let runs = work.ledger();
    let attempts: Vec<u32> = runs.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    let gap1 = (runs[1].start - runs[0].end) / 1_000_000;
    let gap2 = (runs[2].start - runs[1].end) / 1_000_000;
    assert!(
        gap1 >= 300,
        "first retry came after {gap1} ms, before its 300 ms delay"
    );
    assert!(
        gap2 >= 600,
        "second retry came after {gap2} ms, before its 600 ms delay"
    );
    println!("retry gaps: {gap1} ms (delay 300), {gap2} ms (delay 600)");

    let dead = broker.drain(&dead_q).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.data, b"payload", "the body is kept");
    assert_eq!(message_id(d), "r1", "the properties are kept");
    assert_eq!(
        header(d, "tenant").as_deref(),
        Some("acme"),
        "the original headers are kept"
    );
    assert_eq!(header(d, "x-amqp-exec-exit").as_deref(), Some("1"));
    assert_eq!(header(d, "x-amqp-exec-attempts").as_deref(), Some("3"));
    assert_eq!(header(d, "x-amqp-exec-queue").as_deref(), Some(q.as_str()));
    let stderr = header(d, "x-amqp-exec-stderr").unwrap();
    assert!(
        stderr.contains("boom on attempt 3 of 3"),
        "stderr tail: {stderr:?}"
    );
    let failed_at = header(d, "x-amqp-exec-failed-at").unwrap();
    let t = humantime::parse_rfc3339(&failed_at).expect("failed-at is RFC 3339");
    assert!(t.elapsed().unwrap() < Duration::from_secs(120));
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_worker_and_grandchild_then_retries_and_dead_letters() {
    let mut broker = Broker::connect().await;
    let q = unique("timeout");
    broker.declare(&q).await;
    let work = Workdir::new();
    let config = format!(
        r#"
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "sleep 1000 & echo $$ $! >> \"$RECORD_DIR/pids\"; wait"]
timeout = "500ms"
kill_grace = "300ms"
max_attempts = 2
backoff = ["200ms"]
"#
    );
    broker.publish_id(&q, "hang", b"").await;
    let mut sup = Supervisor::start(&work, &config, &[]);
    let dead_q = format!("{q}.dead");
    broker.wait_count(&dead_q, 1, Duration::from_secs(30)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;

    let pids = std::fs::read_to_string(work.file("pids")).unwrap();
    let pids: Vec<i32> = pids
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        pids.len(),
        4,
        "two attempts, each a worker and a grandchild"
    );
    for pid in pids {
        assert!(!running(pid), "process {pid} survived the timeout");
    }
    let dead = broker.drain(&dead_q).await;
    assert_eq!(
        header(&dead[0], "x-amqp-exec-exit").as_deref(),
        Some("timeout")
    );
    assert_eq!(
        header(&dead[0], "x-amqp-exec-attempts").as_deref(),
        Some("2")
    );
    assert!(sup.log_text().contains("timed out"));
    broker.cleanup().await;
}

/// A stopped worker (SIGSTOP) that times out is continued after SIGTERM, so
/// that its handler runs instead of waiting for SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_gets_to_handle_sigterm_on_timeout() {
    let mut broker = Broker::connect().await;
    let q = unique("stopped");
    broker.declare(&q).await;
    let work = Workdir::new();
    let worker = work.script(
        "worker.sh",
        r#"#!/bin/sh
trap 'echo got-TERM >> "$RECORD_DIR/term"; exit 143' TERM
kill -STOP $$
"#,
    );
    broker.publish_id(&q, "m0", b"x").await;
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\ntimeout = \"1s\"\nkill_grace = \"20s\"\nmax_attempts = 1\n",
        worker.display()
    );
    let t = Instant::now();
    let mut sup = Supervisor::start(&work, &config, &[]);
    let dead_q = format!("{q}.dead");
    broker.wait_count(&dead_q, 1, Duration::from_secs(15)).await;
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "waited for kill_grace"
    );
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_eq!(
        std::fs::read_to_string(work.file("term")).unwrap_or_default(),
        "got-TERM\n",
        "{}",
        tail(&sup.log_text(), 20)
    );
    let dead = broker.drain(&dead_q).await;
    assert_eq!(
        header(&dead[0], "x-amqp-exec-exit").as_deref(),
        Some("timeout")
    );
    // Ledger: 1 published = 0 done + 0 waiting + 1 dead.
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_command_pauses_its_queue_without_burning_attempts() {
    let mut broker = Broker::connect().await;
    let broken = unique("broken");
    let healthy = unique("healthy");
    broker.declare(&broken).await;
    broker.declare(&healthy).await;
    let work = Workdir::new();
    // Exists and is executable, but its interpreter does not: exec fails every time.
    let bad = work.script("bad-interpreter.sh", "#!/nonexistent/interpreter\n");
    // Does not exist at startup; created later.
    let later = work.file("later.sh");
    let config = format!(
        r#"
[[queue]]
name = "{broken}"
command = ["{bad}"]
concurrency = 2
[[queue]]
name = "{healthy}"
command = ["{later}"]
[[queue]]
name = "{healthy}-2"
command = ["{w}"]
concurrency = 2
"#,
        bad = bad.display(),
        later = later.display(),
        w = record_worker()
    );
    let healthy2 = format!("{healthy}-2");
    broker.owns(&healthy2);
    for i in 0..4 {
        broker.publish_id(&broken, &format!("b{i}"), b"x").await;
        broker.publish_id(&healthy, &format!("l{i}"), b"x").await;
    }
    // Debug lines of amqp_exec::job show each spawn attempt.
    let mut sup = Supervisor::start_with_env(
        &work,
        &config,
        &[],
        &[("RUST_LOG", "info,amqp_exec::job=debug")],
    );
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    for i in 0..20 {
        broker.publish_id(&healthy2, &format!("h{i}"), b"x").await;
    }
    // Another queue keeps flowing meanwhile.
    broker
        .wait_count(&healthy2, 0, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = sup.log_text();
    let spawn_failures = log
        .matches("requeueing the message without counting an attempt")
        .count();
    let pauses = log.matches("queue paused for").count();
    println!("spawn attempts of the broken queue in ~5 s: {spawn_failures}");
    assert!(
        spawn_failures >= 1,
        "the broken command was tried:\n{}",
        tail(&log, 30)
    );
    assert!(
        spawn_failures <= 8,
        "{spawn_failures} spawn attempts in ~5 s: a hot loop"
    );
    assert!(log.contains("queue paused"), "{}", tail(&log, 30));
    assert!(
        pauses <= spawn_failures,
        "one error per pause, not per message"
    );
    assert!(
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains("cannot start"))
            .count()
            == pauses,
        "spawn errors are logged once per pause:\n{}",
        tail(&log, 30)
    );
    // Nothing was burned: all still waiting, none dead, none with an attempt header.
    assert_eq!(broker.count(&broken).await, Some(4));
    assert_eq!(broker.count(&format!("{broken}.dead")).await, Some(0));
    assert_eq!(
        broker.count(&healthy).await,
        Some(4),
        "queue with a missing command waits"
    );

    // The command appears: its queue resumes, with attempt 1.
    std::fs::copy(record_worker(), &later).unwrap();
    let start = std::time::Instant::now();
    while work
        .ledger()
        .iter()
        .filter(|r| r.id.starts_with('l'))
        .count()
        < 4
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the resumed queue did not run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runs = work.ledger();
    let late: Vec<&Run> = runs.iter().filter(|r| r.id.starts_with('l')).collect();
    assert_eq!(late.len(), 4);
    assert!(
        late.iter().all(|r| r.attempt == 1),
        "no attempt was burned: {late:?}"
    );
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // Ledger: broken 4 waiting; healthy 4 + 20 done.
    assert_eq!(broker.count(&broken).await, Some(4));
    let first = broker.drain(&broken).await;
    assert!(
        first
            .iter()
            .all(|d| header(d, "x-amqp-exec-attempt").is_none())
    );
    assert_eq!(runs.iter().filter(|r| r.id.starts_with('h')).count(), 20);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_dead_lettered_without_a_worker() {
    let mut broker = Broker::connect().await;
    let q = unique("large");
    broker.declare(&q).await;
    let work = Workdir::new();
    broker.publish_id(&q, "fits", &[b'x'; 10]).await;
    broker.publish_id(&q, "too-big", &[b'x'; 11]).await;
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nmax_body_bytes = 10\n",
        record_worker()
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "2"]);
    sup.wait_success(Duration::from_secs(30)).await;
    let runs = work.ledger();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].id, "fits");
    let dead = broker.drain(&format!("{q}.dead")).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(message_id(&dead[0]), "too-big");
    assert_eq!(
        header(&dead[0], "x-amqp-exec-exit").as_deref(),
        Some("too-large")
    );
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

/// Declares `<queue>.retry.1s` with another TTL than `backoff = ["1s"]`
/// asks for, so that declaring the queue's topology fails.
async fn conflicting_retry_queue(broker: &Broker, queue: &str) {
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        lapin::types::AMQPValue::LongLongInt(5000),
    );
    broker
        .channel
        .queue_declare(
            format!("{queue}.retry.1s").as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_topology_is_named_and_declare_false_uses_queues_as_they_are() {
    let mut broker = Broker::connect().await;
    let q = unique("conflict");
    broker.owns(&q);
    conflicting_retry_queue(&broker, &q).await;
    let work = Workdir::new();
    let config =
        format!("[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/true\"]\nbackoff = [\"1s\"]\n");
    let sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log(
        "already exists with other arguments",
        Duration::from_secs(20),
    )
    .await;
    let log = sup.log_text();
    assert!(log.contains(&format!("{q}.retry.1s")), "{log}");
    assert!(
        log.contains("x-message-ttl"),
        "the argument is named: {log}"
    );
    drop(sup);

    // declare = false: no declaration at all; the existing queue is used as it is.
    let q2 = unique("undeclared");
    broker.declare(&q2).await;
    broker.publish_id(&q2, "m", b"x").await;
    let config = format!(
        "[[queue]]\nname = \"{q2}\"\ncommand = [\"{}\"]\nbackoff = [\"1s\"]\ndeclare = false\n",
        record_worker()
    );
    let work2 = Workdir::new();
    let mut sup = Supervisor::start(&work2, &config, &["--max-jobs", "1"]);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_eq!(work2.ledger().len(), 1);
    assert_eq!(
        broker.count(&format!("{q2}.dead")).await,
        None,
        "nothing was declared"
    );
    broker.cleanup().await;
}

/// A channel error on one queue (here its retry queue exists with other
/// arguments, so declaring it fails) is that queue's alone: the other queues
/// keep their connection, and a job running meanwhile is acked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_error_on_one_queue_leaves_the_others_running() {
    let mut broker = Broker::connect().await;
    let bad = unique("chan-err-bad");
    let good = unique("chan-err-good");
    broker.owns(&bad);
    broker.declare(&good).await;
    conflicting_retry_queue(&broker, &bad).await;
    broker.publish_id(&good, "slow", b"x").await;
    let work = Workdir::new();
    // The good queue's job outlasts several failed attempts of the bad one.
    let config = format!(
        "[[queue]]\nname = \"{bad}\"\ncommand = [\"/bin/true\"]\nbackoff = [\"1s\"]\n\n\
         [[queue]]\nname = \"{good}\"\ncommand = [\"{}\"]\nenv = {{ SLEEP = \"4\" }}\n",
        record_worker()
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "1"]);
    sup.wait_success(Duration::from_secs(30)).await;
    let log = sup.log_text();
    assert!(
        log.contains("already exists with other arguments"),
        "the bad queue's error is logged: {log}"
    );
    assert!(
        !log.contains("connection lost"),
        "a channel error is not a lost connection: {log}"
    );
    assert!(
        log.contains("1 queue(s) not consuming yet"),
        "readiness says which queues wait: {log}"
    );
    assert_eq!(work.ledger().len(), 1, "the job ran once: {log}");
    assert_eq!(broker.count(&good).await, Some(0), "and was acked");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_replay_and_purge() {
    let mut broker = Broker::connect().await;
    let q = unique("replay");
    broker.declare(&q).await;
    let work = Workdir::new();
    // Fails for good (65) until the "fixed" marker exists.
    let worker = work.script(
        "worker.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT $(date +%s%N) $(date +%s%N) $$" >> "$RECORD_DIR/ledger"
if [ -e "$RECORD_DIR/fixed" ]; then exit 0; fi
echo "bad data in $AMQP_EXEC_MESSAGE_ID" >&2
exit 65
"#,
    );
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\n",
        worker.display()
    );
    for i in 0..3 {
        broker.publish_id(&q, &format!("d{i}"), b"x").await;
    }
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "3"]);
    sup.wait_success(Duration::from_secs(30)).await;
    let dead_q = format!("{q}.dead");
    assert_eq!(broker.count(&dead_q).await, Some(3));

    let (status, stdout, stderr) = cli(&["dead", "list", "--queue", &q], None);
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].contains("d0") && lines[0].contains("exit=65") && lines[0].contains("attempts=1")
    );
    assert!(
        lines[0].contains("bad data in d0"),
        "first stderr line shown: {stdout}"
    );
    let (status, stdout, _) = cli(
        &["dead", "list", "--queue", &q, "--json", "--limit", "2"],
        None,
    );
    assert!(status.success());
    let entries: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["exit"], "65");
    assert_eq!(
        broker.count(&dead_q).await,
        Some(3),
        "listing leaves them in place"
    );

    // Fix the worker, replay, and they succeed with attempts reset.
    std::fs::write(work.file("fixed"), "").unwrap();
    let (status, stdout, stderr) = cli(&["dead", "replay", "--queue", &q, "--limit", "2"], None);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("replayed 2"), "{stdout}");
    assert_eq!(broker.count(&dead_q).await, Some(1));
    assert_eq!(broker.count(&q).await, Some(2));
    let replayed = broker.drain(&q).await;
    assert!(
        replayed
            .iter()
            .all(|d| header(d, "x-amqp-exec-exit").is_none())
    );
    for d in &replayed {
        broker.publish_id(&q, &message_id(d), &d.data).await;
    }
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "2"]);
    sup.wait_success(Duration::from_secs(30)).await;
    let runs = work.ledger();
    let second: Vec<&Run> = runs.iter().skip(3).collect();
    assert_eq!(second.len(), 2);
    assert!(second.iter().all(|r| r.attempt == 1));

    let (status, _, stderr) = cli(&["dead", "purge", "--queue", &q], None);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("1 message(s)") && stderr.contains("--yes"),
        "{stderr}"
    );
    // A usage error even when the broker cannot be reached.
    let (status, _, stderr) = cli(
        &[
            "dead",
            "purge",
            "--queue",
            &q,
            "--url",
            "amqp://127.0.0.1:1/%2f",
        ],
        None,
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    let (status, stdout, _) = cli(&["dead", "purge", "--queue", &q, "--yes"], None);
    assert!(status.success() && stdout.contains("purged 1"), "{stdout}");
    // Ledger: 3 published = 2 done after replay + 1 purged from dead.
    assert_eq!(broker.count(&dead_q).await, Some(0));
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_missing_command() {
    let work = Workdir::new();
    let q = unique("check");
    let cfg = work.write(
        "c.toml",
        &format!("[[queue]]\nname = \"{q}\"\ncommand = [\"/nonexistent/worker\"]\n"),
    );
    let (status, stdout, _) = cli(&["--config", cfg.to_str().unwrap(), "check"], None);
    assert!(!status.success());
    assert!(
        stdout.contains("/nonexistent/worker") && stdout.contains("error"),
        "{stdout}"
    );
    assert!(stdout.contains("broker: connected"), "{stdout}");
    let cfg = work.write(
        "ok.toml",
        &format!("[[queue]]\nname = \"{q}\"\ncommand = [\"cat\"]\n"),
    );
    let (status, stdout, _) = cli(&["--config", cfg.to_str().unwrap(), "check"], None);
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("all good"));

    // declare = false: the work queue exists, its retry and dead queues not.
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let cfg = work.write(
        "undeclared.toml",
        &format!(
            "[[queue]]\nname = \"{q}\"\ncommand = [\"cat\"]\ndeclare = false\nmax_attempts = 2\nbackoff = [\"1s\"]\n"
        ),
    );
    let (status, stdout, _) = cli(&["--config", cfg.to_str().unwrap(), "check"], None);
    assert!(!status.success(), "{stdout}");
    for missing in [format!("{q}.dead"), format!("{q}.retry.1s")] {
        assert!(
            stdout.contains(&format!("\"{missing}\" is not usable")),
            "{stdout}"
        );
    }
    assert!(
        !stdout.contains(&format!("\"{q}\" is not usable")),
        "{stdout}"
    );
    broker.cleanup().await;
}
