//! The bad-input table: odd bodies, odd properties and headers, odd reply
//! targets and odd workers. Every case must end with a clear outcome (done
//! or dead-lettered with a reason), with no crash, no hang, and nothing lost.

mod common;

use common::*;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// The worker ran and the message was acked.
    Done,
    /// Dead-lettered with this `x-amqp-exec-exit`.
    Dead(&'static str),
}

struct Case {
    name: &'static str,
    /// The worker; it gets the body on stdin.
    command: String,
    extra: &'static str,
    body: Vec<u8>,
    props: BasicProperties,
    expect: Expect,
}

/// A worker that keeps the body and environment of each message under
/// $RECORD_DIR/<case>.
fn recorder(case: &str) -> String {
    format!(
        "[\"/bin/sh\", \"-c\", \"cat > \\\"$RECORD_DIR/{case}.body\\\"; env > \\\"$RECORD_DIR/{case}.env\\\"; printf %s \\\"$AMQP_EXEC_HEADERS\\\" > \\\"$RECORD_DIR/{case}.headers\\\"\"]"
    )
}

fn nested(depth: usize) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("leaf".into(), AMQPValue::LongInt(1));
    for _ in 0..depth {
        let mut outer = FieldTable::default();
        outer.insert("n".into(), AMQPValue::FieldTable(t));
        t = outer;
    }
    t
}

/// A header holding arrays nested `depth` deep.
fn nested_arrays(depth: usize) -> FieldTable {
    let mut v = AMQPValue::LongInt(1);
    for _ in 0..depth {
        v = AMQPValue::FieldArray(FieldArray::from(vec![v]));
    }
    let mut t = FieldTable::default();
    t.insert("deep".into(), v);
    t
}

fn headers(n: usize, value: impl Fn(usize) -> AMQPValue) -> FieldTable {
    let mut t = FieldTable::default();
    for i in 0..n {
        t.insert(format!("h{i}").into(), value(i));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_clear_outcome() {
    let mut broker = Broker::connect().await;
    let work = Workdir::new();
    let missing_reply_queue = unique("no-such-reply-queue");
    let replies = unique("bad-replies");
    broker.declare(&replies).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let cases = vec![
        Case { name: "empty", command: recorder("empty"), extra: "max_body_bytes = 1024", body: vec![], props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "one-byte", command: recorder("one-byte"), extra: "max_body_bytes = 1024", body: vec![b'x'], props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "at-limit", command: recorder("at-limit"), extra: "max_body_bytes = 1024", body: vec![7; 1024], props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "over-limit", command: recorder("over-limit"), extra: "max_body_bytes = 1024", body: vec![7; 1025], props: BasicProperties::default(), expect: Expect::Dead("too-large") },
        Case { name: "binary", command: recorder("binary"), extra: "", body: binary.clone(), props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "bare-properties", command: recorder("bare-properties"), extra: "", body: b"x".to_vec(), props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "thousand-headers", command: recorder("thousand-headers"), extra: "", body: b"x".to_vec(),
            props: BasicProperties::default().with_headers(headers(1000, |i| AMQPValue::LongInt(i as i32))), expect: Expect::Done },
        Case { name: "huge-headers", command: recorder("huge-headers"), extra: "", body: b"x".to_vec(),
            props: BasicProperties::default().with_headers(headers(100, |_| AMQPValue::LongString(LongString::from("v".repeat(1000))))), expect: Expect::Done },
        Case { name: "deep-headers", command: recorder("deep-headers"), extra: "", body: b"x".to_vec(),
            props: BasicProperties::default().with_headers(nested(100)), expect: Expect::Done },
        // Near the broker's frame_max (128 KiB): the dead letter's stderr
        // header must shrink to fit, or the broker closes the connection.
        Case { name: "frame-filling-headers", command: "[\"/bin/sh\", \"-c\", \"cat >/dev/null; yes e | head -c 5000 >&2; echo last-line >&2; exit 65\"]".into(), extra: "", body: b"x".to_vec(),
            props: BasicProperties::default().with_headers(headers(1, |_| AMQPValue::LongString(LongString::from("v".repeat(127_500))))), expect: Expect::Dead("65") },
        // A publisher's own dropped-headers header filling the frame: the
        // dead letter carries the value on, and with our headers beside it
        // the broker would close the connection (and redeliver, for ever)
        // unless the value is cut like the dead letter's other headers.
        Case { name: "frame-filling-dropped-header", command: "[\"/bin/sh\", \"-c\", \"cat >/dev/null; exit 65\"]".into(), extra: "", body: b"x".to_vec(),
            props: BasicProperties::default().with_headers({
                let mut t = FieldTable::default();
                t.insert("x-amqp-exec-dropped-headers".into(), AMQPValue::LongString(LongString::from("v".repeat(130_800))));
                t
            }), expect: Expect::Dead("65") },
        // lapin parses headers recursively on its own thread: with the
        // default 2 MiB stack this depth aborted the (debug) supervisor.
        Case { name: "very-deep-headers", command: recorder("very-deep-headers"), extra: "", body: b"x".to_vec(),
            props: BasicProperties::default().with_headers(nested_arrays(1000)), expect: Expect::Done },
        Case { name: "non-utf8-headers", command: recorder("non-utf8-headers"), extra: "", body: b"x".to_vec(),
            props: BasicProperties::default().with_headers(headers(3, |i| match i {
                0 => AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0xfe, 0x00])),
                1 => AMQPValue::LongString(LongString::from(vec![0xc3, 0x28, 0xa0])),
                _ => AMQPValue::Void,
            })), expect: Expect::Done },
        Case { name: "reply-to-missing-queue", command: "[\"/bin/echo\", \"answer\"]".into(), extra: "replies = [\"test-no-such-reply-queue-*\"]", body: b"x".to_vec(),
            props: BasicProperties::default().with_reply_to(missing_reply_queue.as_str().into()).with_correlation_id("c".into()), expect: Expect::Done },
        Case { name: "long-correlation-id", command: "[\"/bin/echo\", \"answer\"]".into(), extra: "replies = [\"test-bad-replies-*\"]", body: b"x".to_vec(),
            props: BasicProperties::default().with_reply_to(replies.as_str().into()).with_correlation_id("c".repeat(255).as_str().into()), expect: Expect::Done },
        Case { name: "closes-stdout", command: "[\"/bin/sh\", \"-c\", \"exec >&- 2>&-; cat > /dev/null; exit 0\"]".into(), extra: "", body: vec![1; 100_000], props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "forks-into-background", command: "[\"/bin/sh\", \"-c\", \"sleep 300 & echo $! > \\\"$RECORD_DIR/background.pid\\\"; exit 0\"]".into(), extra: "", body: b"x".to_vec(), props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "prints-1-gib", command: "[\"/bin/sh\", \"-c\", \"head -c 1073741824 /dev/zero\"]".into(), extra: "", body: b"x".to_vec(), props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "leaves-its-process-group", command: "[\"/bin/sh\", \"-c\", \"setsid -f sh -c 'sleep 3' ; exit 0\"]".into(), extra: "", body: b"x".to_vec(), props: BasicProperties::default(), expect: Expect::Done },
        Case { name: "leaves-its-group-and-hangs", command: "[\"/usr/bin/setsid\", \"-w\", \"/bin/sh\", \"-c\", \"echo $$ > \\\"$RECORD_DIR/escaped.pid\\\"; exec sleep 300\"]".into(), extra: "timeout = \"1s\"\nkill_grace = \"200ms\"\nmax_attempts = 1", body: b"x".to_vec(), props: BasicProperties::default(), expect: Expect::Dead("timeout") },
    ];

    let mut config = String::new();
    let mut queues = Vec::new();
    for case in &cases {
        let q = unique(case.name);
        broker.declare(&q).await;
        config.push_str(&format!(
            "[[queue]]\nname = \"{q}\"\ncommand = {}\nbackoff = [\"100ms\"]\n{}\n",
            case.command, case.extra
        ));
        queues.push(q);
    }
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("all queues started", Duration::from_secs(30))
        .await;
    for (case, q) in cases.iter().zip(&queues) {
        broker.publish(q, &case.body, case.props.clone()).await;
    }

    // Every case settles: its queue empties, and dead ones reach `.dead`.
    let start = Instant::now();
    for (case, q) in cases.iter().zip(&queues) {
        let dead_expected = matches!(case.expect, Expect::Dead(_)) as u32;
        loop {
            let waiting = broker.count(q).await;
            let dead = broker.count(&format!("{q}.dead")).await;
            if waiting == Some(0) && dead == Some(dead_expected) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "case {} did not settle (waiting {waiting:?}, dead {dead:?}):\n{}",
                case.name,
                tail(&sup.log_text(), 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every job has ended (the 1 GiB one last): none of the messages is
    // still unacked. The stop below then has nothing to wait for; a message
    // it left unacked would return to its queue, which is checked below.
    loop {
        let unacked: Vec<(String, String)> = list_queues("messages_unacknowledged")
            .into_iter()
            .filter(|(n, v)| queues.contains(n) && v != "0")
            .collect();
        if unacked.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "jobs still running: {unacked:?}\n{}",
            tail(&sup.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss = sup.peak_rss_kib() / 1024;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(30)).await;
    let log = sup.log_text();
    assert!(!log.contains("panicked"), "{}", tail(&log, 30));
    println!(
        "supervisor peak RSS through the bad-input table (1 GiB of output included): {rss} MiB"
    );
    assert!(rss < 64, "peak RSS {rss} MiB");

    for (case, q) in cases.iter().zip(&queues) {
        assert_eq!(
            broker.count(q).await,
            Some(0),
            "case {}: left in its queue",
            case.name
        );
        if let Expect::Dead(label) = case.expect {
            let dead = broker.drain(&format!("{q}.dead")).await;
            assert_eq!(dead.len(), 1, "case {}", case.name);
            assert_eq!(
                header(&dead[0], "x-amqp-exec-exit").as_deref(),
                Some(label),
                "case {}",
                case.name
            );
            if case.name == "frame-filling-headers" {
                let stderr = header(&dead[0], "x-amqp-exec-stderr").unwrap_or_default();
                assert!(
                    stderr.len() < 4096 && stderr.ends_with("last-line\n"),
                    "the stderr tail is cut to fit: {} bytes",
                    stderr.len()
                );
            }
        }
    }
    let read =
        |name: &str| std::fs::read(work.file(name)).unwrap_or_else(|_| panic!("{name} missing"));
    let text = |name: &str| String::from_utf8(read(name)).unwrap();
    assert_eq!(read("empty.body"), b"");
    assert_eq!(read("one-byte.body"), b"x");
    assert_eq!(read("at-limit.body"), vec![7; 1024]);
    assert!(
        !work.file("over-limit.body").exists(),
        "no worker for an oversized body"
    );
    assert_eq!(read("binary.body"), binary);
    let env = text("bare-properties.env");
    assert!(env.lines().any(|l| l == "AMQP_EXEC_MESSAGE_ID="), "{env}");
    assert!(env.lines().any(|l| l == "AMQP_EXEC_CONTENT_TYPE="), "{env}");
    assert!(!env.contains("AMQP_EXEC_TIMESTAMP="), "{env}");
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        assert!(
            !env.contains("RUST_MIN_STACK="),
            "the supervisor's own stack setting is not passed on: {env}"
        );
    }
    let h: serde_json::Value = serde_json::from_str(&text("thousand-headers.headers")).unwrap();
    assert_eq!(h.as_object().unwrap().len(), 1000);
    assert_eq!(h["h999"], 999);
    assert_eq!(text("huge-headers.headers"), "{}");
    assert!(text("huge-headers.env").contains("AMQP_EXEC_HEADERS_OMITTED="));
    let h: serde_json::Value = serde_json::from_str(&text("deep-headers.headers")).unwrap();
    assert!(h["n"]["n"]["n"].is_object(), "nesting kept up to the limit");
    let h: serde_json::Value = serde_json::from_str(&text("non-utf8-headers.headers")).unwrap();
    assert_eq!(h["h0"]["base64"], "//4A");
    assert_eq!(h["h1"], "\u{fffd}(\u{fffd}");
    assert!(
        log.contains(&format!("reply to {missing_reply_queue} not delivered")),
        "{}",
        tail(&log, 30)
    );
    let reply = broker.drain(&replies).await;
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0].data, b"answer\n");
    assert_eq!(
        reply[0]
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().len()),
        Some(255)
    );
    let bg: i32 = text("background.pid").trim().parse().unwrap();
    assert!(
        !running(bg),
        "the background child of a finished worker was killed"
    );
    assert!(
        log.contains("left the worker's process group"),
        "{}",
        tail(&log, 30)
    );
    // A process that made itself a new session is out of reach of the
    // process-group kill (documented); the test cleans it up itself.
    if let Ok(pid) = text("escaped.pid").trim().parse::<i32>() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    broker.cleanup().await;
}

/// A message the client library cannot read (a `message_id` that is not
/// UTF-8) costs the connection every time it is delivered. The supervisor
/// says what to do about it and reconnects ever more slowly instead of
/// twice a second; the message stays in its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_slows_reconnection_and_is_named() {
    let mut broker = Broker::connect().await;
    let q = unique("unreadable");
    broker.declare(&q).await;
    raw::publish_with_raw_message_id(&q, b"id\xff-x", b"body");
    let work = Workdir::new();
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\n",
        repo("workers/testing/record.sh")
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("cannot be read", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let log = sup.log_text();
    let connections = log.matches("connected to").count();
    // Waits of about 1, 2, 4 s (±25%) in 6 s: at most 4 connections; a
    // reconnect every 0.5 s would make a dozen.
    assert!(
        connections <= 4,
        "{connections} connections\n{}",
        tail(&log, 30)
    );
    assert!(work.ledger().is_empty());
    // Ledger: 1 published = 0 done + 1 waiting + 0 dead.
    broker.wait_count(&q, 1, Duration::from_secs(5)).await;
    broker.cleanup().await;
}
