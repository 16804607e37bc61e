//! The supervisor core against the real broker: exactly-once processing of a
//! clean run, byte-identical bodies, concurrency caps, stdin and stdout
//! handling, headers, config errors, and the publish CLI.

mod common;

use common::*;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use std::collections::BTreeSet;
use std::time::Duration;

fn record_worker() -> String {
    repo("workers/testing/record.sh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_are_processed_exactly_once() {
    let mut broker = Broker::connect().await;
    let q = unique("thousand");
    broker.owns(&q);
    let work = Workdir::new();
    let out = work.file("ids");
    let config = format!(
        r#"
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "echo \"$AMQP_EXEC_MESSAGE_ID\" >> \"$OUT\""]
concurrency = 4
env = {{ OUT = "{}" }}
"#,
        out.display()
    );
    // Declare the topology first so that the messages have somewhere to go.
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "1000"]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;

    let (status, stdout, stderr) = cli(
        &["publish", "--queue", &q, "--count", "1000", "--body", "x"],
        None,
    );
    assert!(status.success(), "publish failed: {stdout}{stderr}");
    assert!(
        stdout.contains("published 1000 message(s)") && stdout.contains("1000 confirmed"),
        "{stdout}"
    );

    sup.wait_success(Duration::from_secs(120)).await;
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let distinct: BTreeSet<&str> = lines.iter().copied().collect();
    assert_eq!(lines.len(), 1000, "each message processed once");
    assert_eq!(distinct.len(), 1000, "ids are distinct");
    // Ledger: published = processed + waiting + dead.
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_arrive_byte_identical() {
    let mut broker = Broker::connect().await;
    let q = unique("bodies");
    broker.declare(&q).await;
    let work = Workdir::new();
    let mut big = vec![0u8; 10 * 1024 * 1024];
    let mut x: u32 = 12345;
    for b in big.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("nul", b"a\0b\0\0c".to_vec()),
        (
            "invalid-utf8",
            vec![0xff, 0xfe, b'x', 0xc3, 0x28, b'\n', 0x80],
        ),
        ("ten-mib", big),
    ];
    for (id, body) in &bodies {
        broker.publish_id(&q, id, body).await;
    }
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 2\n",
        record_worker()
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "4"]);
    sup.wait_success(Duration::from_secs(60)).await;
    for (id, body) in &bodies {
        let got = std::fs::read(work.file(&format!("body.{id}"))).unwrap();
        assert!(
            got == *body,
            "body {id} differs ({} vs {} bytes)",
            got.len(),
            body.len()
        );
    }
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_reached_and_never_exceeded() {
    let mut broker = Broker::connect().await;
    let q = unique("conc");
    broker.declare(&q).await;
    let work = Workdir::new();
    for i in 0..9 {
        broker.publish_id(&q, &format!("m{i}"), b"x").await;
    }
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 3\nenv = {{ SLEEP = \"0.6\" }}\n",
        record_worker()
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "9"]);
    sup.wait_success(Duration::from_secs(60)).await;
    let runs = work.ledger();
    assert_eq!(runs.len(), 9);
    assert_eq!(
        max_overlap(&runs),
        3,
        "overlap must reach concurrency and never exceed it"
    );
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_workers_caps_two_queues_that_run_at_once() {
    let mut broker = Broker::connect().await;
    let a = unique("capa");
    let b = unique("capb");
    broker.declare(&a).await;
    broker.declare(&b).await;
    let work = Workdir::new();
    for i in 0..8 {
        broker.publish_id(&a, &format!("a{i}"), b"x").await;
        broker.publish_id(&b, &format!("b{i}"), b"x").await;
    }
    // Two queues with different commands: a records with one sleep, b with another.
    let config = format!(
        r#"
max_workers = 4
[[queue]]
name = "{a}"
command = ["{w}"]
concurrency = 3
env = {{ SLEEP = "0.5" }}
[[queue]]
name = "{b}"
command = ["/bin/sh", "-c", "exec \"$0\"", "{w}"]
concurrency = 3
env = {{ SLEEP = "0.4" }}
"#,
        w = record_worker()
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "16"]);
    sup.wait_success(Duration::from_secs(60)).await;
    let runs = work.ledger();
    assert_eq!(runs.len(), 16);
    assert_eq!(
        max_overlap(&runs),
        4,
        "max_workers = 4 caps both queues together"
    );
    let (ra, rb): (Vec<Run>, Vec<Run>) = runs.into_iter().partition(|r| r.id.starts_with('a'));
    assert!(max_overlap(&ra) <= 3 && max_overlap(&rb) <= 3);
    let together = ra
        .iter()
        .any(|x| rb.iter().any(|y| x.start < y.end && y.start < x.end));
    assert!(together, "the two queues ran at the same time");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_that_never_reads_stdin_is_acked() {
    let mut broker = Broker::connect().await;
    let q = unique("true");
    broker.declare(&q).await;
    let work = Workdir::new();
    broker
        .publish_id(&q, "big", &vec![7u8; 4 * 1024 * 1024])
        .await;
    broker.publish_id(&q, "small", b"hi").await;
    let config = format!("[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/true\"]\n");
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "2"]);
    sup.wait_success(Duration::from_secs(30)).await;
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_writing_100_mib_keeps_supervisor_memory_bounded() {
    let mut broker = Broker::connect().await;
    let q = unique("flood");
    broker.declare(&q).await;
    let work = Workdir::new();
    // 100 MiB of stdout in lines of 1 KiB, plus 100 MiB of stderr with no newline at all.
    let config = format!(
        r#"
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "yes \"$(head -c 1023 /dev/zero | tr '\\0' a)\" | head -c 104857600; head -c 104857600 /dev/zero >&2; touch \"$RECORD_DIR/done\""]
"#
    );
    broker.publish_id(&q, "flood", b"").await;
    let sup = Supervisor::start(&work, &config, &[]);
    let start = std::time::Instant::now();
    while !work.file("done").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "worker did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.wait_count(&q, 0, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_mib = sup.peak_rss_kib() / 1024;
    println!("supervisor peak RSS after 200 MiB of worker output: {rss_mib} MiB");
    assert!(
        rss_mib > 0 && rss_mib < 64,
        "peak RSS {rss_mib} MiB exceeds the 64 MiB bound"
    );
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    drop(sup);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_of_every_type_reach_the_worker_as_json() {
    let mut broker = Broker::connect().await;
    let q = unique("headers");
    broker.declare(&q).await;
    let work = Workdir::new();
    let mut nested = FieldTable::default();
    nested.insert("deep".into(), AMQPValue::LongString("yes".into()));
    let mut h = FieldTable::default();
    h.insert("bool".into(), AMQPValue::Boolean(true));
    h.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    h.insert("u8".into(), AMQPValue::ShortShortUInt(8));
    h.insert("i16".into(), AMQPValue::ShortInt(-16));
    h.insert("u16".into(), AMQPValue::ShortUInt(16));
    h.insert("i32".into(), AMQPValue::LongInt(-32));
    h.insert("u32".into(), AMQPValue::LongUInt(32));
    h.insert("i64".into(), AMQPValue::LongLongInt(-64));
    h.insert("f32".into(), AMQPValue::Float(0.5));
    h.insert("f64".into(), AMQPValue::Double(2.5));
    h.insert(
        "dec".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 1999,
        }),
    );
    // RabbitMQ rejects short strings ('s' means a 16-bit int to it): not sent here.
    h.insert(
        "long".into(),
        AMQPValue::LongString(LongString::from("l \"quoted\"")),
    );
    h.insert(
        "binary".into(),
        AMQPValue::LongString(LongString::from(vec![0xffu8, 0x00, b'a'])),
    );
    h.insert(
        "array".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(1),
            AMQPValue::LongString("two".into()),
        ])),
    );
    h.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
    h.insert("table".into(), AMQPValue::FieldTable(nested));
    h.insert(
        "bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
    );
    h.insert("void".into(), AMQPValue::Void);
    broker
        .publish(
            &q,
            b"{}",
            BasicProperties::default()
                .with_message_id("h1".into())
                .with_correlation_id("corr-1".into())
                .with_content_type("application/json".into())
                .with_timestamp(1_700_000_123)
                .with_headers(h),
        )
        .await;
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/sh\", \"-c\", \"env > \\\"$RECORD_DIR/env\\\"; printf %s \\\"$AMQP_EXEC_HEADERS\\\" > \\\"$RECORD_DIR/headers.json\\\"\"]\n"
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "1"]);
    sup.wait_success(Duration::from_secs(30)).await;
    let json = std::fs::read_to_string(work.file("headers.json")).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&json).expect("AMQP_EXEC_HEADERS is valid JSON");
    assert_eq!(v["bool"], true);
    assert_eq!(v["i8"], -8);
    assert_eq!(v["u8"], 8);
    assert_eq!(v["i16"], -16);
    assert_eq!(v["u16"], 16);
    assert_eq!(v["i32"], -32);
    assert_eq!(v["u32"], 32);
    assert_eq!(v["i64"], -64);
    assert_eq!(v["f32"], 0.5);
    assert_eq!(v["f64"], 2.5);
    assert_eq!(v["dec"], 19.99);
    assert_eq!(v["long"], "l \"quoted\"");
    assert_eq!(v["binary"], "\u{fffd}\u{0}a");
    assert_eq!(v["array"], serde_json::json!([1, "two"]));
    assert_eq!(v["ts"], 1_700_000_000u64);
    assert_eq!(v["table"]["deep"], "yes");
    assert_eq!(v["bytes"]["base64"], "AQID");
    assert_eq!(v["void"], serde_json::Value::Null);

    let env = std::fs::read_to_string(work.file("env")).unwrap();
    for expected in [
        format!("AMQP_EXEC_QUEUE={q}"),
        "AMQP_EXEC_MESSAGE_ID=h1".into(),
        "AMQP_EXEC_CORRELATION_ID=corr-1".into(),
        format!("AMQP_EXEC_ROUTING_KEY={q}"),
        "AMQP_EXEC_EXCHANGE=".into(),
        "AMQP_EXEC_REDELIVERED=0".into(),
        "AMQP_EXEC_ATTEMPT=1".into(),
        "AMQP_EXEC_MAX_ATTEMPTS=5".into(),
        "AMQP_EXEC_CONTENT_TYPE=application/json".into(),
        "AMQP_EXEC_TIMESTAMP=1700000123".into(),
    ] {
        assert!(
            env.lines().any(|l| l == expected),
            "missing {expected} in worker env:\n{env}"
        );
    }
    assert!(
        !env.contains("AMQP_URL="),
        "the worker must not see AMQP_URL"
    );
    assert!(
        !env.contains("guest:guest"),
        "the worker must not see the broker password"
    );
    broker.cleanup().await;
}

fn run_config(text: &str) -> (i32, String) {
    let work = Workdir::new();
    let path = work.write("bad.toml", text);
    let (status, stdout, stderr) = cli(&["--config", path.to_str().unwrap(), "run"], None);
    (status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

#[test]
fn config_errors_exit_78_and_name_the_problem() {
    let cases = [
        (
            "[[queue]]\nname = \"a\"\ncommand = [\"/bin/true\"]\nconcurency = 3\n",
            vec!["queue \"a\"", "concurency", "bad.toml"],
        ),
        (
            "[[queue]]\nname = \"a\"\n",
            vec!["queue \"a\"", "`command` is missing"],
        ),
        (
            "[[queue]]\nname = \"a\"\ncommand = []\n",
            vec!["queue \"a\"", "`command`"],
        ),
        (
            "[[queue]]\nname = \"a\"\ncommand = [\"/bin/true\"]\ntimeout = \"ten\"\n",
            vec!["queue \"a\"", "`timeout`", "\"ten\""],
        ),
        (
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n[[queue]]\nname = \"a\"\ncommand = [\"y\"]\n",
            vec!["queue \"a\"", "duplicate"],
        ),
        ("[[queue]\nname = \"a\"\n", vec!["bad.toml"]),
    ];
    for (text, needles) in cases {
        let (code, out) = run_config(text);
        assert_eq!(code, 78, "config {text:?} gave {code}: {out}");
        for n in needles {
            assert!(out.contains(n), "message for {text:?} lacks {n:?}: {out}");
        }
    }
    let (status, _, stderr) = cli(&["--config", "/nonexistent/amqp-exec.toml", "run"], None);
    assert_eq!(status.code(), Some(78));
    assert!(stderr.contains("/nonexistent/amqp-exec.toml"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_cli_lines_headers_ids_and_unroutable() {
    let mut broker = Broker::connect().await;
    let q = unique("pub");
    broker.declare(&q).await;
    let (status, stdout, stderr) = cli(
        &[
            "publish",
            "--queue",
            &q,
            "--lines",
            "--message-id",
            "job",
            "--header",
            "tenant=acme",
            "--content-type",
            "text/plain",
            "-",
        ],
        Some(b"one\ntwo\n\nthree\n"),
    );
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("published 3 message(s)") && stdout.contains("3 confirmed"),
        "{stdout}"
    );
    let got = broker.drain(&q).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(bodies, ["one", "two", "three"]);
    let ids: Vec<String> = got.iter().map(message_id).collect();
    assert_eq!(ids, ["job-1", "job-2", "job-3"]);
    assert_eq!(header(&got[0], "tenant").as_deref(), Some("acme"));
    assert_eq!(got[0].properties.delivery_mode(), &Some(2));
    assert_eq!(
        got[0]
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("text/plain")
    );

    // An unroutable message is reported and fails the command.
    let missing = unique("missing");
    let (status, stdout, stderr) = cli(&["publish", "--queue", &missing, "--body", "x"], None);
    assert!(
        !status.success(),
        "publishing to a missing queue must fail: {stdout}"
    );
    assert!(stderr.contains("unroutable"), "{stderr}");
    broker.cleanup().await;
}
