//! The figures a dashboard and alerts read, against the real broker and
//! real workers: queue waits from message timestamps, durations up to the
//! timeout, the last success and failure streaks, exits by code and by
//! signal, spawn failures by cause and pauses, held deliveries and the
//! `max_workers` slots in use.

mod common;

use common::scrape::{free_port, sample, wait_page};
use common::*;
use lapin::BasicProperties;
use nix::sys::signal::Signal;
use std::time::{Duration, SystemTime};

/// A worker that does what its body says: `ok` exits 0, `fail` 75 (retry),
/// `bad` 65 (dead letter), `sig` kills itself with SIGUSR1, `slow` sleeps
/// past any short timeout, `nap` sleeps 3 s and succeeds.
const WORKER: &str = r#"read -r what || true
case "$what" in
  ok) exit 0 ;;
  fail) exit 75 ;;
  bad) exit 65 ;;
  sig) kill -USR1 $$ ; sleep 5 ;;
  slow) exec sleep 30 ;;
  nap) sleep 3 ; exit 0 ;;
esac
exit 3
"#;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn publish_at(broker: &Broker, queue: &str, body: &str, timestamp: Option<u64>) {
    let mut props = BasicProperties::default().with_message_id(body.into());
    if let Some(ts) = timestamp {
        props = props.with_timestamp(ts);
    }
    broker.publish(queue, body.as_bytes(), props).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_successes_retries_dead_letters_and_failures() {
    let mut broker = Broker::connect().await;
    let q = unique("obs");
    let slow = format!("{q}-slow");
    broker.declare(&q).await;
    broker.declare(&slow).await;
    let work = Workdir::new();
    let worker = work.script("worker.sh", &format!("#!/bin/sh\n{WORKER}"));
    let port = free_port();
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[queue]]\nname = \"{q}\"\ncommand = [\"{w}\"]\nmax_attempts = 2\nbackoff = [\"100ms\"]\n\
         [[queue]]\nname = \"{slow}\"\ncommand = [\"{w}\"]\nmax_attempts = 2\nbackoff = [\"100ms\"]\n\
         timeout = \"1s\"\nkill_grace = \"1s\"\n",
        w = worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    let l = |queue: &str, more: &str| format!("{{queue=\"{queue}\"{more}}}");
    let m = |page: &str, name: &str, labels: &str| sample(page, &format!("{name}{labels}"));
    let jobs = |outcome: &str| l(&q, &format!(",outcome=\"{outcome}\""));

    // Successes: two with a timestamp 20 s old, one without, one from the
    // future and one from 1970: only the first two give a queue wait.
    let old = unix_now() - 20;
    publish_at(&broker, &q, "ok", Some(old)).await;
    publish_at(&broker, &q, "ok", Some(old)).await;
    publish_at(&broker, &q, "ok", None).await;
    publish_at(&broker, &q, "ok", Some(unix_now() + 3600)).await;
    publish_at(&broker, &q, "ok", Some(0)).await;
    let page = wait_page(port, "5 ok jobs", Duration::from_secs(30), |p| {
        m(p, "amqp_exec_jobs_total", &jobs("ok")) == Some(5.0)
    })
    .await;
    let wait = |p: &str, more: &str| m(p, "amqp_exec_queue_wait_seconds_bucket", &l(&q, more));
    assert_eq!(
        m(&page, "amqp_exec_queue_wait_seconds_count", &l(&q, "")),
        Some(2.0)
    );
    assert_eq!(wait(&page, ",le=\"10\""), Some(0.0), "{page}");
    assert_eq!(wait(&page, ",le=\"30\""), Some(2.0), "{page}");
    assert_eq!(wait(&page, ",le=\"+Inf\""), Some(2.0));
    let sum = m(&page, "amqp_exec_queue_wait_seconds_sum", &l(&q, "")).unwrap();
    assert!(
        (40.0..60.0).contains(&sum),
        "two waits of about 20 s: {sum}"
    );
    let bad_ts = |p: &str, reason: &str| {
        m(
            p,
            "amqp_exec_queue_wait_bad_timestamps_total",
            &l(&q, &format!(",reason=\"{reason}\"")),
        )
    };
    assert_eq!(bad_ts(&page, "future"), Some(1.0));
    assert_eq!(bad_ts(&page, "too_old"), Some(1.0));
    let code = |p: &str, c: &str| {
        m(
            p,
            "amqp_exec_worker_exit_codes_total",
            &l(&q, &format!(",code=\"{c}\"")),
        )
    };
    assert_eq!(code(&page, "0"), Some(5.0));
    let last = m(
        &page,
        "amqp_exec_last_success_timestamp_seconds",
        &l(&q, ""),
    )
    .unwrap();
    let now = unix_now() as f64;
    assert!(
        (now - 60.0..=now + 1.0).contains(&last),
        "last success {last}, now {now}"
    );
    assert_eq!(
        m(&page, "amqp_exec_consecutive_failures", &l(&q, "")),
        Some(0.0)
    );
    // The default timeout (5m) is a bucket bound; the buckets go on to a day.
    assert_eq!(
        m(&page, "amqp_exec_queue_timeout_seconds", &l(&q, "")),
        Some(300.0)
    );
    for le in ["300", "86400"] {
        assert_eq!(
            m(
                &page,
                "amqp_exec_job_duration_seconds_bucket",
                &l(&q, &format!(",le=\"{le}\""))
            ),
            Some(5.0)
        );
    }
    assert_eq!(
        m(&page, "amqp_exec_queue_concurrency", &l(&q, "")),
        Some(1.0)
    );
    assert_eq!(m(&page, "amqp_exec_queue_paused", &l(&q, "")), Some(0.0));

    // Failures: `fail` is retried once, then dead-lettered (2 failures);
    // its retry keeps the first timestamp and gives no second wait. `bad`
    // is dead-lettered at once (3), `sig` dies of SIGUSR1 twice (5).
    publish_at(&broker, &q, "fail", Some(old)).await;
    publish_at(&broker, &q, "bad", None).await;
    publish_at(&broker, &q, "sig", None).await;
    let page = wait_page(port, "3 dead letters", Duration::from_secs(30), |p| {
        m(p, "amqp_exec_jobs_total", &jobs("dead")) == Some(3.0)
    })
    .await;
    assert_eq!(
        m(&page, "amqp_exec_consecutive_failures", &l(&q, "")),
        Some(5.0)
    );
    assert_eq!(
        m(&page, "amqp_exec_jobs_total", &jobs("retried")),
        Some(2.0)
    );
    assert_eq!(code(&page, "75"), Some(2.0));
    assert_eq!(code(&page, "65"), Some(1.0));
    assert_eq!(
        m(
            &page,
            "amqp_exec_worker_signals_total",
            &l(&q, ",signal=\"SIGUSR1\"")
        ),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        m(&page, "amqp_exec_queue_wait_seconds_count", &l(&q, "")),
        Some(3.0)
    );
    // The existing families go on as before.
    assert_eq!(
        m(
            &page,
            "amqp_exec_worker_exits_total",
            &l(&q, ",exit=\"SIGUSR1\"")
        ),
        Some(2.0)
    );
    assert_eq!(
        m(&page, "amqp_exec_dead_letters_total", &l(&q, "")),
        Some(3.0)
    );

    // A success ends the streak and moves the last-success time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publish_at(&broker, &q, "ok", None).await;
    let page = wait_page(port, "the streak reset", Duration::from_secs(30), |p| {
        m(p, "amqp_exec_jobs_total", &jobs("ok")) == Some(6.0)
    })
    .await;
    assert_eq!(
        m(&page, "amqp_exec_consecutive_failures", &l(&q, "")),
        Some(0.0)
    );
    let later = m(
        &page,
        "amqp_exec_last_success_timestamp_seconds",
        &l(&q, ""),
    )
    .unwrap();
    assert!(later > last + 1.0, "{later} after {last}");

    // A worker past its timeout (1s) is killed: twice, then dead-lettered;
    // its runs end in the buckets above the timeout.
    publish_at(&broker, &slow, "slow", None).await;
    let page = wait_page(
        port,
        "a timed-out job dead-lettered",
        Duration::from_secs(30),
        |p| m(p, "amqp_exec_jobs_total", &l(&slow, ",outcome=\"dead\"")) == Some(1.0),
    )
    .await;
    assert_eq!(
        m(&page, "amqp_exec_worker_timeouts_total", &l(&slow, "")),
        Some(2.0)
    );
    assert_eq!(
        m(&page, "amqp_exec_queue_timeout_seconds", &l(&slow, "")),
        Some(1.0)
    );
    let bucket = |le: &str| {
        m(
            &page,
            "amqp_exec_job_duration_seconds_bucket",
            &l(&slow, &format!(",le=\"{le}\"")),
        )
    };
    assert_eq!(bucket("1"), Some(0.0), "{page}");
    assert_eq!(bucket("5"), Some(2.0), "{page}");
    assert_eq!(
        m(&page, "amqp_exec_consecutive_failures", &l(&slow, "")),
        Some(2.0)
    );
    assert_eq!(
        m(&page, "amqp_exec_consecutive_failures", &l(&q, "")),
        Some(0.0)
    );

    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

/// A command that goes missing after startup, and one whose interpreter
/// may not be executed: each spawn failure is counted under its cause, and
/// the queues show as paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_failures_are_counted_by_cause_and_pause_their_queue() {
    let mut broker = Broker::connect().await;
    let gone = unique("obs-gone");
    let denied = unique("obs-denied");
    broker.owns(&gone);
    broker.owns(&denied);
    let work = Workdir::new();
    let vanishing = work.script("vanishing.sh", "#!/bin/sh\nexit 0\n");
    // A regular file without the execute bit, named as the interpreter.
    let interp = work.write("not-executable", "");
    let script = work.script("denied.sh", &format!("#!{}\nexit 0\n", interp.display()));
    let port = free_port();
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[queue]]\nname = \"{gone}\"\ncommand = [\"{}\"]\n\
         [[queue]]\nname = \"{denied}\"\ncommand = [\"{}\"]\n",
        vanishing.display(),
        script.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    while sup.log_text().matches("consuming").count() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_file(&vanishing).unwrap();
    broker.publish_id(&gone, "g1", b"x").await;
    broker.publish_id(&denied, "d1", b"x").await;
    let l = |queue: &str, more: &str| format!("{{queue=\"{queue}\"{more}}}");
    let spawns = |p: &str, queue: &str, cause: &str| {
        sample(
            p,
            &format!(
                "amqp_exec_spawn_failures_total{}",
                l(queue, &format!(",cause=\"{cause}\""))
            ),
        )
        .unwrap_or(0.0)
    };
    let page = wait_page(port, "both spawn failures", Duration::from_secs(20), |p| {
        spawns(p, &gone, "not_found") >= 1.0 && spawns(p, &denied, "permission") >= 1.0
    })
    .await;
    assert_eq!(spawns(&page, &gone, "permission"), 0.0);
    assert_eq!(spawns(&page, &gone, "other"), 0.0);
    assert_eq!(spawns(&page, &denied, "not_found"), 0.0);
    for queue in [&gone, &denied] {
        let failures = sample(
            &page,
            &format!("amqp_exec_consecutive_failures{}", l(queue, "")),
        )
        .unwrap();
        assert!(failures >= 1.0, "{queue}: {failures}");
    }
    // Paused while it waits to try again (1 s, then 2 s, ...).
    wait_page(port, "both queues paused", Duration::from_secs(20), |p| {
        [&gone, &denied]
            .iter()
            .all(|queue| sample(p, &format!("amqp_exec_queue_paused{}", l(queue, ""))) == Some(1.0))
    })
    .await;
    // Nothing ran, nothing was burned.
    assert_eq!(broker.count(&gone).await, Some(1));
    assert_eq!(broker.count(&denied).await, Some(1));
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

/// With `max_workers = 1`, a delivery of one queue waits for the slot that
/// another queue's job holds: it shows as held, and the slot as in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_waiting_for_a_max_workers_slot_is_held() {
    let mut broker = Broker::connect().await;
    let a = unique("obs-a");
    let b = unique("obs-b");
    broker.owns(&a);
    broker.owns(&b);
    let work = Workdir::new();
    let worker = work.script("worker.sh", &format!("#!/bin/sh\n{WORKER}"));
    let port = free_port();
    let config = format!(
        "max_workers = 1\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[queue]]\nname = \"{a}\"\ncommand = [\"{w}\"]\n\
         [[queue]]\nname = \"{b}\"\ncommand = [\"{w}\"]\n",
        w = worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    while sup.log_text().matches("consuming").count() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let l = |queue: &str| format!("{{queue=\"{queue}\"}}");
    let page = wait_page(
        port,
        "the max_workers limit",
        Duration::from_secs(10),
        |p| sample(p, "amqp_exec_max_workers") == Some(1.0),
    )
    .await;
    assert_eq!(
        sample(&page, &format!("amqp_exec_held_deliveries{}", l(&a))),
        Some(0.0)
    );
    broker.publish_id(&a, "nap", b"nap").await;
    wait_page(port, "a's job running", Duration::from_secs(10), |p| {
        sample(p, &format!("amqp_exec_running_workers{}", l(&a))) == Some(1.0)
    })
    .await;
    broker.publish_id(&b, "ok", b"ok").await;
    let page = wait_page(port, "b's delivery held", Duration::from_secs(10), |p| {
        sample(p, &format!("amqp_exec_held_deliveries{}", l(&b))) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&page, "amqp_exec_max_workers_in_use"), Some(1.0));
    assert_eq!(
        sample(&page, &format!("amqp_exec_running_workers{}", l(&b))),
        Some(0.0)
    );
    // a's job ends: b's runs, and nothing is held any more.
    let ok = |queue: &str| format!("amqp_exec_jobs_total{{queue=\"{queue}\",outcome=\"ok\"}}");
    let page = wait_page(port, "both jobs done", Duration::from_secs(20), |p| {
        sample(p, &ok(&a)) == Some(1.0) && sample(p, &ok(&b)) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&page, &format!("amqp_exec_held_deliveries{}", l(&b))),
        Some(0.0)
    );
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}
