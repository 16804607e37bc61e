//! Request/reply and fan-out: workers' replies to `reply_to`, and
//! `amqp-exec publish --reply` gathering them, against the real broker (and
//! MariaDB for the parallel report).

mod common;

use common::mariadb::TestDb;
use common::*;
use lapin::BasicProperties;
use mysql::prelude::Queryable;
use std::time::{Duration, Instant};

/// A worker that answers `{"echo": <body>}`, or fails with exit 3 when the
/// body is "fail".
const ECHO: &str = r#"#!/bin/sh
body=$(cat)
if [ "$body" = fail ]; then echo "cannot do $body" >&2; exit 3; fi
printf '{"echo":"%s","attempt":%s}' "$body" "$AMQP_EXEC_ATTEMPT"
"#;

/// A queue whose worker echoes its body as JSON; replies may go to the
/// tests' named reply queues and to direct reply-to.
fn echo_config(work: &Workdir, q: &str, concurrency: usize) -> String {
    let w = work.script("echo.sh", ECHO);
    format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = {concurrency}\nmax_attempts = 2\nbackoff = [\"200ms\"]\nreplies = [\"test-repl*\", \"amq.rabbitmq.reply-to*\"]\n",
        w.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_gets_its_reply_on_a_named_queue_and_through_the_cli() {
    let mut broker = Broker::connect().await;
    let q = unique("reply");
    let replies = unique("replies");
    broker.declare(&q).await;
    broker.declare(&replies).await;
    let work = Workdir::new();
    let mut sup = Supervisor::start(&work, &echo_config(&work, &q, 2), &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;

    // An ordinary reply queue.
    broker
        .publish(
            &q,
            b"ping",
            BasicProperties::default()
                .with_reply_to(replies.as_str().into())
                .with_correlation_id("corr-42".into()),
        )
        .await;
    let d = first_delivery(&broker.channel, &replies).await;
    assert_eq!(d.data, br#"{"echo":"ping","attempt":1}"#);
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-42")
    );
    assert_eq!(header(&d, "x-amqp-exec-exit").as_deref(), Some("0"));
    assert_eq!(header(&d, "x-amqp-exec-attempt").as_deref(), Some("1"));

    // RabbitMQ's direct reply-to, through the CLI.
    let (status, stdout, stderr) = cli(
        &["publish", "--queue", &q, "--reply", "--body", "pong"],
        None,
    );
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, r#"{"echo":"pong","attempt":1}"#);
    assert!(
        !sup.log_text().contains("not delivered"),
        "{}",
        tail(&sup.log_text(), 20)
    );
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

/// With worker lines at `info` filtered out of the log (`RUST_LOG=warn`), a
/// job with no `reply_to` writes its stdout to /dev/null, and a task still
/// gets its stdout back as its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_warn_a_task_still_gets_its_stdout_as_its_reply() {
    let mut broker = Broker::connect().await;
    let q = unique("reply-warn");
    let replies = unique("replies");
    broker.declare(&q).await;
    broker.declare(&replies).await;
    let work = Workdir::new();
    let w = work.script(
        "where.sh",
        "#!/bin/sh\ncat >/dev/null\nout=$(readlink /proc/$$/fd/1)\nprintf 'stdout is %s' \"$out\"\necho \"$out\" >&2\n",
    );
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nreplies = [\"test-repl*\"]\n",
        w.display()
    );
    let mut sup = Supervisor::start_with_env(
        &work,
        &config,
        &["--max-jobs", "2"],
        &[("RUST_LOG", "warn")],
    );
    broker.publish_id(&q, "plain", b"x").await;
    broker
        .publish(
            &q,
            b"task",
            BasicProperties::default()
                .with_message_id("task".into())
                .with_reply_to(replies.as_str().into()),
        )
        .await;
    let d = first_delivery(&broker.channel, &replies).await;
    assert!(
        String::from_utf8_lossy(&d.data).starts_with("stdout is pipe:"),
        "{:?}",
        String::from_utf8_lossy(&d.data)
    );
    sup.wait_success(Duration::from_secs(30)).await;
    let log = sup.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("/dev/null") && l.contains("message_id=plain")),
        "the job with no reply_to wrote to /dev/null: {}",
        tail(&log, 20)
    );
    assert_eq!(broker.count(&q).await, Some(0), "both jobs were acked");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_gets_one_failure_reply_after_its_last_attempt() {
    let mut broker = Broker::connect().await;
    let q = unique("replyfail");
    let replies = unique("replyfail-to");
    broker.declare(&q).await;
    broker.declare(&replies).await;
    let work = Workdir::new();
    let mut sup = Supervisor::start(&work, &echo_config(&work, &q, 1), &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    broker
        .publish(
            &q,
            b"fail",
            BasicProperties::default()
                .with_reply_to(replies.as_str().into())
                .with_correlation_id("c-fail".into()),
        )
        .await;
    broker
        .wait_count(&format!("{q}.dead"), 1, Duration::from_secs(20))
        .await;
    // The reply follows the dead letter's confirm; a second one would follow it.
    broker
        .wait_count(&replies, 1, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = broker.drain(&replies).await;
    assert_eq!(got.len(), 1, "no reply on retry, one on the final failure");
    let d = &got[0];
    assert_eq!(header(d, "x-amqp-exec-exit").as_deref(), Some("3"));
    assert_eq!(header(d, "x-amqp-exec-attempt").as_deref(), Some("2"));
    assert!(
        header(d, "x-amqp-exec-stderr")
            .unwrap()
            .contains("cannot do fail")
    );
    assert_eq!(String::from_utf8_lossy(&d.data), "cannot do fail\n");
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("c-fail")
    );

    // The CLI reports the failure and exits non-zero.
    let (status, stdout, stderr) = cli(
        &[
            "publish",
            "--queue",
            &q,
            "--reply",
            "--timeout",
            "20s",
            "--body",
            "fail",
        ],
        None,
    );
    assert!(!status.success());
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("exit 3"), "{stderr}");
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_worker_the_timeout_ends_with_a_clear_error_and_nothing_left() {
    let mut broker = Broker::connect().await;
    let q = unique("noworker");
    broker.declare(&q).await;
    let t = Instant::now();
    let (status, _, stderr) = cli(
        &[
            "publish",
            "--queue",
            &q,
            "--reply",
            "--timeout",
            "1s",
            "--body",
            "hello?",
        ],
        None,
    );
    let took = t.elapsed();
    assert!(!status.success());
    assert!(stderr.contains("no reply within 1s"), "{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The unanswered task expires from the queue: nothing is left behind.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_keeps_input_order() {
    let mut broker = Broker::connect().await;
    let q = unique("fanout");
    broker.declare(&q).await;
    let work = Workdir::new();
    // Random short sleeps shuffle the completion order.
    let w = work.script(
        "w.sh",
        "#!/bin/sh\nbody=$(cat)\nsleep 0.0$(( $(od -An -N1 -tu1 /dev/urandom) % 10 ))\nprintf '{\"n\":%s}' \"$body\"\n",
    );
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 8\n",
        w.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    let input: String = (1..=100).map(|i| format!("{i}\n")).collect();
    let (status, stdout, stderr) = cli(
        &[
            "publish",
            "--queue",
            &q,
            "--reply",
            "--lines",
            "--timeout",
            "60s",
        ],
        Some(input.as_bytes()),
    );
    assert!(status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 100);
    for (i, v) in lines.iter().enumerate() {
        let n = i as i64 + 1;
        assert_eq!(v["line"], n.to_string());
        assert_eq!(v["exit"], 0);
        assert_eq!(v["reply"]["n"], n, "the reply is embedded as JSON");
        assert!(v["ms"].as_u64().is_some());
    }
    let keys: Vec<&str> = stdout
        .lines()
        .next()
        .unwrap()
        .split('"')
        .skip(1)
        .step_by(2)
        .take(1)
        .collect();
    assert_eq!(keys, ["line"], "fields in the documented order");
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

fn db_report_bin() -> String {
    workspace_bin("db-report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_report_over_eight_databases_is_faster() {
    let dbs: Vec<TestDb> = (0..8).map(|_| TestDb::create("rep")).collect();
    for (i, db) in dbs.iter().enumerate() {
        db.load(&format!(
            "CREATE TABLE orders (id INT PRIMARY KEY AUTO_INCREMENT, amount INT NOT NULL);\
             INSERT INTO orders (amount) VALUES ({}), ({})",
            i + 1,
            10 * (i + 1)
        ));
    }
    // One user that can read all eight.
    let reader = &dbs[0];
    let mut root = common::mariadb::root();
    for db in &dbs[1..] {
        for host in ["%", "localhost"] {
            root.query_drop(format!(
                "GRANT SELECT ON `{}`.* TO '{}'@'{host}'",
                db.name, reader.user
            ))
            .unwrap();
        }
    }
    let server_url = format!(
        "mysql://{}:{}@127.0.0.1:3306/",
        reader.user, reader.password
    );
    let mut broker = Broker::connect().await;
    let work = Workdir::new();
    let input: String = dbs.iter().map(|d| format!("{}\n", d.name)).collect();
    let mut times = Vec::new();
    for concurrency in [8, 1] {
        let q = unique(&format!("report{concurrency}"));
        broker.declare(&q).await;
        let config = format!(
            r#"
[[queue]]
name = "{q}"
command = ["{bin}"]
concurrency = {concurrency}
[queue.env]
DATABASE_URL = "{server_url}"
REPORT_QUERY = "SELECT SLEEP(1) + COALESCE(SUM(amount), 0) FROM orders"
"#,
            bin = db_report_bin()
        );
        let mut sup = Supervisor::start(&work, &config, &[]);
        sup.wait_log("consuming", Duration::from_secs(20)).await;
        let t = Instant::now();
        let (status, stdout, stderr) = cli(
            &[
                "publish",
                "--queue",
                &q,
                "--reply",
                "--lines",
                "--timeout",
                "60s",
            ],
            Some(input.as_bytes()),
        );
        let wall = t.elapsed();
        assert!(status.success(), "{stderr}");
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for (i, v) in lines.iter().enumerate() {
            assert_eq!(v["reply"]["database"], dbs[i].name.as_str());
            assert_eq!(v["reply"]["total"], 11 * (i as i64 + 1));
        }
        times.push(wall);
        sup.signal(nix::sys::signal::Signal::SIGTERM);
        sup.wait_success(Duration::from_secs(30)).await;
    }
    println!(
        "8 report queries of ~1 s: {:.2} s at concurrency 8, {:.2} s at concurrency 1",
        times[0].as_secs_f64(),
        times[1].as_secs_f64()
    );
    assert!(
        times[0] < Duration::from_millis(2500),
        "concurrency 8 took {:?}",
        times[0]
    );
    assert!(
        times[1] >= Duration::from_secs(7),
        "concurrency 1 took {:?}",
        times[1]
    );
    broker.cleanup().await;
}
