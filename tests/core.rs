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

/// The prefetch of `queue`'s consumers, as the broker reports them.
fn consumer_prefetch(queue: &str) -> Vec<u32> {
    rabbitmqctl(&[
        "list_consumers",
        "-q",
        "--no-table-headers",
        "queue_name",
        "prefetch_count",
    ])
    .lines()
    .filter_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == queue).then(|| f.next()?.parse().ok())?
    })
    .collect()
}

/// Polls until `queue`'s one consumer has prefetch `n`; false after `limit`.
async fn prefetch_becomes(queue: &str, n: u32, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if consumer_prefetch(queue) == [n] {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Without a `prefetch` key, the prefetch follows the jobs: a run of short
/// jobs raises it above `concurrency`, and a job that runs long lowers it
/// back while it is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_rises_for_short_jobs_and_falls_for_a_long_one() {
    let mut broker = Broker::connect().await;
    let q = unique("adaptive");
    broker.declare(&q).await;
    let work = Workdir::new();
    // The job "long" runs until the test creates the file `go`; every job
    // writes its message id to `ran` when it ends.
    let go = work.file("go");
    let ran = work.file("ran");
    let config = format!(
        r#"
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "if [ \"$AMQP_EXEC_MESSAGE_ID\" = long ]; then while [ ! -e \"$GO\" ]; do sleep 0.05; done; fi; echo \"$AMQP_EXEC_MESSAGE_ID\" >> \"$RAN\""]
concurrency = 1
env = {{ GO = "{}", RAN = "{}" }}
"#,
        go.display(),
        ran.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    assert!(
        prefetch_becomes(&q, 1, Duration::from_secs(5)).await,
        "prefetch at start: {:?}",
        consumer_prefetch(&q)
    );

    for i in 0..40 {
        broker.publish_id(&q, &format!("short-{i}"), b"x").await;
    }
    broker.wait_count(&q, 0, Duration::from_secs(30)).await;
    assert!(
        prefetch_becomes(&q, 3, Duration::from_secs(10)).await,
        "after 40 short jobs the prefetch is {:?}, not concurrency + 2",
        consumer_prefetch(&q)
    );

    // Lowered while the long job still runs.
    broker.publish_id(&q, "long", b"x").await;
    assert!(
        prefetch_becomes(&q, 1, Duration::from_secs(20)).await,
        "a job running long left the prefetch at {:?}",
        consumer_prefetch(&q)
    );
    // Messages behind the long job, and after it: each consumer the
    // prefetch changes left behind hands on what it holds.
    broker.publish_id(&q, "behind-long", b"x").await;
    std::fs::write(&go, "").unwrap();
    for i in 0..10 {
        broker.publish_id(&q, &format!("after-{i}"), b"x").await;
    }
    let all_ran = || {
        std::fs::read_to_string(&ran)
            .map(|s| s.lines().count())
            .unwrap_or(0)
            == 40 + 2 + 10
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !all_ran() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        all_ran(),
        "not every job ran after the prefetch changes: {:?}",
        std::fs::read_to_string(&ran)
            .unwrap_or_default()
            .lines()
            .count()
    );

    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(30)).await;
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

/// A worker that prints in a loop cannot flood the log: after
/// `max_log_lines` lines of its output (stdout and stderr together), the
/// rest is counted in one line, and the job ends as it would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_worker_logs_at_most_max_log_lines() {
    let mut broker = Broker::connect().await;
    let q = unique("chatty");
    broker.declare(&q).await;
    let work = Workdir::new();
    let config = format!(
        r#"
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "i=0; while [ $i -lt 30 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"]
max_log_lines = 10
"#
    );
    broker.publish_id(&q, "chatty", b"").await;
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "1"]);
    sup.wait_success(Duration::from_secs(30)).await;
    assert_eq!(broker.count(&q).await, Some(0), "the job was acked");
    let log = sup.log_text();
    let worker_lines = log
        .lines()
        .filter(|l| l.contains("stream=\"stdout\"") || l.contains("stream=\"stderr\""))
        .count();
    assert_eq!(worker_lines, 10, "{}", tail(&log, 20));
    assert!(
        log.contains("the worker wrote 50 more line(s) of output than max_log_lines (10)"),
        "{}",
        tail(&log, 20)
    );
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

/// Runs the binary with `env` (name, value) set, in `dir` if given; kills it
/// and fails the test if it runs longer than `limit`.
fn cli_with(
    args: &[&str],
    env: &[(&str, &str)],
    dir: Option<&std::path::Path>,
    limit: Duration,
) -> (i32, String, String) {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("AMQP_URL", amqp_url())
        .env_remove("AMQP_EXEC_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().expect("run amqp-exec");
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "amqp-exec {args:?} still ran after {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_usage_errors_exit_2_name_the_flag_and_publish_nothing() {
    let mut broker = Broker::connect().await;
    let q = unique("usage");
    broker.declare(&q).await;
    let long = "x".repeat(256);
    let header = format!("{long}=v");
    // Fits alone; "-1000" makes the last of 1000 ids 256 bytes.
    let id = "i".repeat(251);
    let q251 = "q".repeat(251);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["publish", "--queue", &long, "--body", "x"], "--queue"),
        (
            vec!["publish", "--exchange", &long, "--body", "x"],
            "--exchange",
        ),
        (
            vec![
                "publish",
                "--exchange",
                "e",
                "--routing-key",
                &long,
                "--body",
                "x",
            ],
            "--routing-key",
        ),
        (
            vec!["publish", "--queue", &q, "--header", &header, "--body", "x"],
            "--header",
        ),
        (
            vec![
                "publish",
                "--queue",
                &q,
                "--message-id",
                &long,
                "--body",
                "x",
            ],
            "--message-id",
        ),
        (
            vec![
                "publish",
                "--queue",
                &q,
                "--message-id",
                &id,
                "--count",
                "1000",
                "--body",
                "x",
            ],
            "--message-id",
        ),
        (
            vec![
                "publish",
                "--queue",
                &q,
                "--message-id",
                &id,
                "--lines",
                "-",
            ],
            "--message-id",
        ),
        (
            vec![
                "publish",
                "--queue",
                &q,
                "--content-type",
                &long,
                "--body",
                "x",
            ],
            "--content-type",
        ),
        (
            vec![
                "publish",
                "--queue",
                &q,
                "--routing-key",
                "k",
                "--body",
                "x",
            ],
            "--routing-key",
        ),
        (
            vec![
                "publish",
                "--exchange",
                "amq.direct",
                "--declare",
                "--body",
                "x",
            ],
            "--declare",
        ),
        (
            vec![
                "publish",
                "--queue",
                &q,
                "--reply",
                "--timeout",
                "0s",
                "--body",
                "x",
            ],
            "--timeout",
        ),
        (
            vec![
                "publish",
                "--queue",
                &q,
                "--reply",
                "--timeout",
                "10000d",
                "--body",
                "x",
            ],
            "--timeout",
        ),
        (
            vec!["publish", "--queue", &q, "--url", "garbage", "--body", "x"],
            "--url",
        ),
        (vec!["dead", "list", "--queue", &q251], "--queue"),
        (vec!["dead", "replay", "--queue", &q251], "--queue"),
        (vec!["dead", "purge", "--queue", &q251, "--yes"], "--queue"),
        (
            vec!["--config", "/nonexistent.toml", "run", "--max-jobs", "0"],
            "--max-jobs",
        ),
    ];
    for (args, flag) in cases {
        // The --lines case: 1000 lines.
        let stdin = "line\n".repeat(1000);
        let out = std::process::Command::new(BIN)
            .args(&args)
            .env("AMQP_URL", amqp_url())
            .env_remove("AMQP_EXEC_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                let _ = c.stdin.take().unwrap().write_all(stdin.as_bytes());
                c.wait_with_output()
            })
            .expect("run amqp-exec");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert_eq!(broker.count(&q).await, Some(0), "nothing was published");
    // The longest ids that fit are taken.
    let id = "i".repeat(250);
    let (status, stdout, stderr) = cli(
        &[
            "publish",
            "--queue",
            &q,
            "--message-id",
            &id,
            "--count",
            "1000",
            "--body",
            "x",
        ],
        None,
    );
    assert!(status.success(), "{stdout}{stderr}");
    assert_eq!(broker.count(&q).await, Some(1000));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_amqp_exec_config_is_unset_and_urls_name_their_source() {
    let mut broker = Broker::connect().await;
    let q = unique("envcfg");
    broker.declare(&q).await;
    let work = Workdir::new();
    let limit = Duration::from_secs(30);
    // An empty AMQP_EXEC_CONFIG counts as unset.
    let (code, stdout, stderr) = cli_with(
        &["publish", "--queue", &q, "--body", "x"],
        &[("AMQP_EXEC_CONFIG", "")],
        None,
        limit,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(broker.count(&q).await, Some(1));

    let good = work.write(
        "good.toml",
        "[[queue]]\nname = \"a\"\ncommand = [\"/bin/true\"]\ndeclare = false\n",
    );
    let bad_file = work.write(
        "badurl.toml",
        "[broker]\nurl = \"amqp://u:filesecret@h:x/\"\n[[queue]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n",
    );
    let bad_env = "amqp://u:envsecret@h:y/";
    // A bad AMQP_URL names AMQP_URL, not the file's key.
    let (code, stdout, stderr) = cli_with(
        &["--config", good.to_str().unwrap(), "check"],
        &[("AMQP_URL", bad_env)],
        None,
        limit,
    );
    let out = format!("{stdout}{stderr}");
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("AMQP_URL") && !out.contains("`url`"), "{out}");
    assert!(!out.contains("envsecret"), "{out}");
    // A bad url in the file shows although AMQP_URL replaces it.
    let (code, stdout, stderr) = cli_with(
        &["--config", bad_file.to_str().unwrap(), "check"],
        &[],
        None,
        limit,
    );
    let out = format!("{stdout}{stderr}");
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("badurl.toml") && out.contains("`url`"),
        "{out}"
    );
    assert!(
        !out.contains("filesecret") && !out.contains("all good"),
        "{out}"
    );
    // publish: --url is a usage error, AMQP_URL a config error.
    let (code, _, stderr) = cli_with(
        &["publish", "--queue", &q, "--url", bad_env, "--body", "x"],
        &[],
        None,
        limit,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--url") && !stderr.contains("envsecret"),
        "{stderr}"
    );
    let (code, _, stderr) = cli_with(
        &["publish", "--queue", &q, "--body", "x"],
        &[("AMQP_URL", bad_env)],
        None,
        limit,
    );
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("AMQP_URL") && !stderr.contains("envsecret"),
        "{stderr}"
    );
    assert_eq!(broker.count(&q).await, Some(1));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_and_replay_end_when_the_connection_is_lost() {
    let mut broker = Broker::connect().await;
    let q = unique("lost");
    let dead = format!("{q}.dead");
    broker.declare(&q).await;
    broker.declare(&dead).await;
    broker.publish_id(&dead, "good-1", b"a").await;
    // lapin cannot parse a delivery whose message id is not UTF-8: it drops
    // the connection, and a pending basic.get is never answered.
    common::raw::publish_with_raw_message_id(&dead, &[0xff, 0x80, 0xfe], b"raw");
    broker.publish_id(&dead, "good-2", b"b").await;
    for action in ["list", "replay"] {
        let (code, stdout, stderr) = cli_with(
            &["dead", action, "--queue", &q],
            &[],
            None,
            Duration::from_secs(30),
        );
        assert_eq!(code, 1, "dead {action}: {stdout}{stderr}");
        assert!(
            stderr.contains("lost the connection to the broker"),
            "dead {action}: {stderr}"
        );
    }
    broker.cleanup().await;
}

/// The Cargo.toml assets of the Debian package: (source, destination, mode).
fn deb_assets() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|a| {
            let a = a
                .as_array()
                .expect("an asset is [source, destination, mode]");
            let s = |i: usize| a[i].as_str().unwrap().to_owned();
            (s(0), s(1), s(2))
        })
        .collect()
}

#[test]
fn packaged_example_names_installed_workers_and_passes_check() {
    const INSTALLED: &str = "/usr/share/amqp-exec/workers/";
    let assets = deb_assets();
    let (source, _, _) = assets
        .iter()
        .find(|(_, dest, _)| dest == "etc/amqp-exec/example.toml")
        .expect("the package installs /etc/amqp-exec/example.toml");
    let packaged = std::fs::read_to_string(repo(source)).unwrap();
    let quickstart = std::fs::read_to_string(repo("deploy/example.toml")).unwrap();
    // The same config as the quick start's, past the header comment, with
    // the workers at their installed paths.
    let body = |t: &str| t[t.find("\n\n").expect("a header comment")..].to_owned();
    // ...and the signing key the package creates.
    assert_eq!(
        body(&packaged),
        body(&quickstart)
            .replace("\"workers/", &format!("\"{INSTALLED}"))
            .replace(
                "# key_file = \"/etc/amqp-exec/signing.key\"",
                "key_file = \"/etc/amqp-exec/signing.key\"",
            ),
        "{source} must be deploy/example.toml with the installed worker paths"
    );
    // Every worker it names is installed there, executable.
    let mut named = 0;
    for piece in packaged.split(&format!("\"{INSTALLED}")).skip(1) {
        let name = &piece[..piece.find('"').unwrap()];
        named += 1;
        assert!(
            assets
                .iter()
                .any(|(src, dest, mode)| src == &format!("workers/{name}")
                    && dest == INSTALLED.trim_start_matches('/')
                    && mode == "755"),
            "{INSTALLED}{name} is not installed by the package"
        );
    }
    assert!(named >= 1);
    // `check` passes where the workers exist, run from another directory
    // like the service (WorkingDirectory=/var/lib/amqp-exec).
    // The key the package makes, here beside the config.
    let work = Workdir::new();
    work.write("signing.key", "0123456789abcdef0123456789abcdef0123\n");
    let config = work.write(
        "example.toml",
        &packaged
            .replace(INSTALLED, &format!("{}/", repo("workers")))
            .replace("\"/etc/amqp-exec/signing.key\"", "\"signing.key\""),
    );
    let (code, stdout, stderr) = cli_with(
        &["--config", config.to_str().unwrap(), "check"],
        &[],
        Some(work.path()),
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("all good"), "{stdout}");
    // The quick start's relative path would fail there.
    let relative = work.write("relative.toml", &quickstart);
    let (code, stdout, _) = cli_with(
        &["--config", relative.to_str().unwrap(), "check"],
        &[],
        Some(work.path()),
        Duration::from_secs(60),
    );
    assert_eq!(code, 1, "{stdout}");
}

/// Runs a maintainer script of deploy/debian with `systemctl`, `getent`,
/// `adduser` and `chown` replaced by stubs that log their arguments, systemd
/// taken to be running, and /etc/amqp-exec in `etc`; the calls it made.
fn run_maintainer_script(name: &str, args: &[&str]) -> String {
    let etc = Workdir::new();
    run_maintainer_script_in(name, args, etc.path())
}

fn run_maintainer_script_in(name: &str, args: &[&str], etc: &std::path::Path) -> String {
    let work = Workdir::new();
    let log = work.file("calls");
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for stub in ["systemctl", "getent", "adduser", "chown"] {
        let path = bin.join(stub);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"{stub} $*\" >> '{}'\n", log.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let running = work.path().join("run-systemd-system");
    std::fs::create_dir(&running).unwrap();
    let text = std::fs::read_to_string(repo(&format!("deploy/debian/{name}"))).unwrap();
    assert!(text.contains("/run/systemd/system"), "{name}");
    let script = work.write(
        name,
        &text
            .replace("/run/systemd/system", running.to_str().unwrap())
            .replace("/etc/amqp-exec", etc.to_str().unwrap()),
    );
    let status = std::process::Command::new("sh")
        .arg(&script)
        .args(args)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .status()
        .expect("run sh");
    assert!(status.success(), "{name} {args:?}: {status}");
    std::fs::read_to_string(&log).unwrap_or_default()
}

#[test]
fn maintainer_scripts_restart_on_upgrade_and_stop_and_disable_on_removal() {
    let etc = Workdir::new();
    let install = run_maintainer_script_in("postinst", &["configure", ""], etc.path());
    assert!(install.contains("systemctl daemon-reload"), "{install}");
    // The signing key: made once, readable by the service's group only.
    let key = etc.file("signing.key");
    let first = std::fs::read_to_string(&key).unwrap();
    assert!(first.trim().len() >= 32, "{first}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    assert!(
        install.contains(&format!("chown root:amqp-exec {}", key.display())),
        "{install}"
    );
    run_maintainer_script_in("postinst", &["configure", "0.0.9-1"], etc.path());
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        first,
        "kept on upgrade"
    );
    assert!(
        !install.contains("restart") && !install.contains("start "),
        "{install}"
    );
    let upgrade = run_maintainer_script("postinst", &["configure", "0.0.9-1"]);
    assert!(
        upgrade.contains("systemctl try-restart amqp-exec.service amqp-exec@*.service"),
        "{upgrade}"
    );
    let removal = run_maintainer_script("prerm", &["remove"]);
    assert!(
        removal.contains("systemctl stop amqp-exec.service amqp-exec@*.service"),
        "{removal}"
    );
    assert!(
        removal.contains("systemctl disable amqp-exec.service amqp-exec@.service"),
        "{removal}"
    );
    let upgrading = run_maintainer_script("prerm", &["upgrade", "0.2.0-1"]);
    assert!(upgrading.is_empty(), "{upgrading}");
    let purge = run_maintainer_script("postrm", &["purge"]);
    assert!(purge.contains("systemctl daemon-reload"), "{purge}");
}
