//! Production broker setups: quorum queues, exchanges and bindings, rate
//! limits, single active consumer, and several instances sharing a queue.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn queue_types(prefix: &str) -> Vec<(String, String)> {
    list_queues("type")
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .collect()
}

/// Config of quorum queue `q` whose worker records its run, fails on its
/// first attempt and succeeds on the retry (after 200 ms).
fn fails_once_on_quorum(work: &Workdir, q: &str) -> String {
    let w = work.script(
        "w.sh",
        "#!/bin/sh\ncat >/dev/null\necho \"$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT 0 0 $$\" >> \"$RECORD_DIR/ledger\"\n[ \"$AMQP_EXEC_ATTEMPT\" -ge 2 ]\n",
    );
    format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nqueue_type = \"quorum\"\nbackoff = [\"200ms\"]\n",
        w.display()
    )
}

fn unacked(queue: &str) -> u32 {
    list_queues("messages_unacknowledged")
        .into_iter()
        .find_map(|(n, v)| (n == queue).then(|| v.parse().ok())?)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_and_their_retry_path() {
    let mut broker = Broker::connect().await;
    let q = unique("quorum");
    broker.owns(&q);
    let work = Workdir::new();
    let config = fails_once_on_quorum(&work, &q);
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(30)).await;
    let types = queue_types(&q);
    assert_eq!(types.len(), 3, "{types:?}");
    assert!(types.iter().all(|(_, t)| t == "quorum"), "{types:?}");
    broker.publish_id(&q, "m1", b"x").await;
    work.wait_ledger(2, Duration::from_secs(20)).await;
    let attempts: Vec<u32> = work.ledger().iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [1, 2]);
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

/// Classic queues are declared with `x-queue-type = "classic"`: without it,
/// RabbitMQ 3.13 and later give a queue the virtual host's default type. A
/// queue declared earlier without the argument (by an earlier version, or
/// another client) still matches, and so does `publish --declare`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_are_declared_with_their_type() {
    let mut broker = Broker::connect().await;
    let typed = unique("classic-typed");
    let untyped = unique("classic-untyped");
    let cli = unique("classic-cli");
    broker.owns(&typed);
    broker.declare(&untyped).await;
    broker.owns(&cli);
    let work = Workdir::new();
    let (status, _, err) = common::cli(
        &["publish", "--queue", &cli, "--declare", "--body", "x"],
        None,
    );
    assert!(status.success(), "{err}");
    let config: String = [&typed, &untyped, &cli]
        .iter()
        .map(|q| {
            format!("[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/cat\"]\nbackoff = [\"1s\"]\n")
        })
        .collect();
    let mut sup = Supervisor::start(&work, &config, &[]);
    let start = Instant::now();
    while sup.log_text().matches("consuming").count() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            tail(&sup.log_text(), 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.publish_id(&typed, "m1", b"x").await;
    broker.publish_id(&untyped, "m2", b"x").await;
    for q in [&typed, &untyped, &cli] {
        broker.wait_count(q, 0, Duration::from_secs(30)).await;
    }
    let args = list_queues("arguments");
    for q in [
        typed.clone(),
        format!("{typed}.dead"),
        format!("{typed}.retry.1s"),
        cli.clone(),
    ] {
        let (_, a) = args
            .iter()
            .find(|(n, _)| *n == q)
            .unwrap_or_else(|| panic!("no queue {q}: {args:?}"));
        assert!(a.contains(r#"{"x-queue-type","classic"}"#), "{q}: {a}");
    }
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // The untyped queue matches as classic, with nothing refused.
    let log = sup.log_text();
    assert!(!log.contains("PRECONDITION_FAILED"), "{}", tail(&log, 20));
    assert!(!log.contains("exists without"), "{}", tail(&log, 20));
    broker.cleanup().await;
}

/// A work queue that exists as a quorum queue while the config says classic
/// (what an earlier version's untyped declaration gets on a virtual host
/// whose default type is quorum, on RabbitMQ 3.13 and later) is declared
/// again without `x-queue-type`; where the broker refuses that too (before
/// 3.13, as here), the error says which key to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_that_exists_as_quorum_is_named_with_the_key_to_set() {
    let mut broker = Broker::connect().await;
    let q = unique("typed-quorum");
    broker.declare_quorum(&q).await;
    let work = Workdir::new();
    let config = format!("[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/cat\"]\n");
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("set queue_type to its type", Duration::from_secs(30))
        .await;
    assert!(
        sup.log_text()
            .contains(&format!("queue \"{q}\" already exists")),
        "{}",
        tail(&sup.log_text(), 20)
    );
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

/// A quorum retry queue declared the way earlier versions did (without
/// at-least-once dead-lettering) cannot be declared again with it: it is
/// used as it is, with a warning, and the queue keeps consuming.
/// A work queue and a quorum dead-letter queue declared by an earlier
/// version, without the dead-letter exchange and without the delivery
/// limit of today's, are used as they are, with warnings that say what they
/// lack; the queue is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_and_dead_queues_of_an_earlier_version_are_used_as_they_are() {
    let mut broker = Broker::connect().await;
    let q = unique("old-work");
    let quorum = amqp_exec::broker::type_args(amqp_exec::config::QueueType::Quorum);
    broker.declare_with(&q, quorum.clone()).await;
    broker.declare_with(&format!("{q}.dead"), quorum).await;
    let work = Workdir::new();
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nqueue_type = \"quorum\"\nbackoff = [\"1s\"]\n",
        repo("workers/testing/record.sh")
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(30)).await;
    let log = sup.log_text();
    assert!(
        log.contains("exists without a dead-letter exchange"),
        "{}",
        tail(&log, 20)
    );
    assert!(
        log.contains("exists with the broker's delivery limit"),
        "{}",
        tail(&log, 20)
    );
    broker.publish_id(&q, "m1", b"x").await;
    work.wait_ledger(1, Duration::from_secs(20)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_retry_queue_of_an_earlier_version_is_used_as_it_is() {
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let mut broker = Broker::connect().await;
    let q = unique("quorum-old");
    broker.owns(&q);
    let mut args = FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", q.as_str()),
    ] {
        args.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(200));
    // As earlier versions declared it.
    broker.declare_with(&format!("{q}.retry.200ms"), args).await;
    let work = Workdir::new();
    let config = fails_once_on_quorum(&work, &q);
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(30)).await;
    assert!(
        sup.log_text()
            .contains("exists without at-least-once dead-lettering"),
        "{}",
        tail(&sup.log_text(), 20)
    );
    broker.publish_id(&q, "m1", b"x").await;
    work.wait_ledger(2, Duration::from_secs(20)).await;
    let attempts: Vec<u32> = work.ledger().iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [1, 2]);
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // Ledger: 1 published = 1 done.
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

/// On a quorum dead-letter queue, `dead list` hands the messages back, which
/// the broker counts in `x-delivery-count`; a replayed message still starts
/// again at attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_quorum_dead_queue_starts_at_attempt_one() {
    let mut broker = Broker::connect().await;
    let q = unique("quorum-replay");
    broker.owns(&q);
    let work = Workdir::new();
    // Dead-letters at once (exit 65) until the file "pass" exists.
    let w = work.script(
        "w.sh",
        "#!/bin/sh\ncat >/dev/null\necho \"$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT 0 0 $$\" >> \"$RECORD_DIR/ledger\"\n[ -e \"$RECORD_DIR/pass\" ] || exit 65\n",
    );
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nqueue_type = \"quorum\"\n",
        w.display()
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "1"]);
    sup.wait_log("consuming", Duration::from_secs(30)).await;
    broker.publish_id(&q, "m1", b"x").await;
    sup.wait_success(Duration::from_secs(30)).await;
    let dead = format!("{q}.dead");
    assert_eq!(broker.count(&dead).await, Some(1));
    for _ in 0..2 {
        let (status, stdout, stderr) = cli(&["dead", "list", "--queue", &q], None);
        assert!(status.success(), "{stderr}");
        assert!(stdout.contains("m1"), "{stdout}");
    }
    let (status, _, stderr) = cli(&["dead", "replay", "--queue", &q], None);
    assert!(status.success(), "{stderr}");
    work.write("pass", "");
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "1"]);
    sup.wait_success(Duration::from_secs(30)).await;
    let attempts: Vec<u32> = work.ledger().iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [1, 1], "the replayed run is attempt 1 again");
    // Ledger: 1 published = 1 done, nothing waiting, nothing dead.
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&dead).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_exchange_binding_routes_matching_keys_only() {
    let mut broker = Broker::connect().await;
    let q = unique("topic");
    broker.owns(&q);
    let exchange = format!("{q}-events");
    let work = Workdir::new();
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\n[[queue.bind]]\nexchange = \"{exchange}\"\ntype = \"topic\"\nrouting_key = \"order.*\"\n",
        repo("workers/testing/record.sh")
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("consuming", Duration::from_secs(30)).await;
    let (status, _, stderr) = cli(
        &[
            "publish",
            "--exchange",
            &exchange,
            "--routing-key",
            "order.created",
            "--message-id",
            "match",
            "--body",
            "x",
        ],
        None,
    );
    assert!(status.success(), "{stderr}");
    let (status, _, stderr) = cli(
        &[
            "publish",
            "--exchange",
            &exchange,
            "--routing-key",
            "invoice.created",
            "--message-id",
            "other",
            "--body",
            "x",
        ],
        None,
    );
    assert!(
        !status.success() && stderr.contains("unroutable"),
        "a non-matching key must not route: {stderr}"
    );
    work.wait_ledger(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = work.ledger().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["match"]);
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let ch = broker.conn.create_channel().await.unwrap();
    let _ = ch
        .exchange_delete(
            exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_spaces_the_jobs() {
    let mut broker = Broker::connect().await;
    let q = unique("rate");
    broker.declare(&q).await;
    let work = Workdir::new();
    let messages: Vec<(String, Vec<u8>)> =
        (0..200).map(|i| (format!("r{i}"), b"x".to_vec())).collect();
    broker.publish_many(&q, &messages).await;
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 4\nmax_rate = \"20/s\"\n",
        repo("workers/testing/record.sh")
    );
    let t = Instant::now();
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "200"]);
    // Sample the unacked deliveries while it runs (10 s, time for a few
    // samples where each rabbitmqctl call takes seconds): the rate limit
    // must hold messages back in the broker, not in our hands.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, q) = (done.clone(), q.clone());
        tokio::task::spawn_blocking(move || {
            let mut max = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(unacked(&q));
                // Each rabbitmqctl starts an Erlang VM: sample sparingly.
                std::thread::sleep(Duration::from_millis(500));
            }
            max
        })
    };
    sup.wait_success(Duration::from_secs(40)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_unacked = sampler.await.unwrap();
    // The prefetch is min(concurrency, ceil(rate)) = 4: a delivery waits at
    // most 4 turns of 50 ms before its worker starts, and never more than
    // ceil(rate) turns (one second) whatever the prefetch.
    println!("max unacked while rate-limited: {max_unacked}");
    assert!(
        (1..=20).contains(&max_unacked),
        "{max_unacked} unacked deliveries"
    );
    let runs = work.ledger();
    assert_eq!(runs.len(), 200);
    let first = runs.iter().map(|r| r.start).min().unwrap();
    let last = runs.iter().map(|r| r.start).max().unwrap();
    let span = (last - first) as f64 / 1e9;
    println!(
        "200 jobs at max_rate 20/s: starts spread over {span:.2}s (total {:.2}s)",
        t.elapsed().as_secs_f64()
    );
    // 200 starts at 20/s: 199 intervals of 50 ms. Never faster; slower only
    // by the stalls of a busy machine (the next turn counts from a late one).
    assert!(
        (9.45..=13.0).contains(&span),
        "starts spread over {span:.2}s, expected ~10s"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_keeps_order_across_two_instances() {
    let mut broker = Broker::connect().await;
    let q = unique("sac");
    broker.owns(&q);
    let work = Workdir::new();
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nsingle_active_consumer = true\n",
        repo("workers/testing/record.sh")
    );
    let mut a = Supervisor::start(&work, &config, &[]);
    a.wait_log("consuming", Duration::from_secs(30)).await;
    let work_b = Workdir::new();
    let mut b = Supervisor::start_with_env(
        &work_b,
        &config,
        &[],
        &[("RECORD_DIR", work.path().to_str().unwrap())],
    );
    b.wait_log("consuming", Duration::from_secs(30)).await;
    let messages: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("{i:03}"), b"x".to_vec()))
        .collect();
    broker.publish_many(&q, &messages).await;
    work.wait_ledger(200, Duration::from_secs(60)).await;
    let ids: Vec<String> = work.ledger().into_iter().map(|r| r.id).collect();
    let expected: Vec<String> = (0..200).map(|i| format!("{i:03}")).collect();
    assert_eq!(ids, expected, "processed in publish order");
    for s in [&mut a, &mut b] {
        s.signal(nix::sys::signal::Signal::SIGTERM);
        s.wait_success(Duration::from_secs(20)).await;
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_queue_and_one_can_leave() {
    let mut broker = Broker::connect().await;
    let q = unique("shared");
    broker.declare(&q).await;
    let work = Workdir::new();
    let w = work.script(
        "w.sh",
        "#!/bin/sh\ncat >/dev/null\nsleep 0.01\necho \"$AMQP_EXEC_MESSAGE_ID $INSTANCE\" >> \"$RECORD_DIR/seen\"\n",
    );
    let config = |instance: &str| {
        format!(
            "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 4\nenv = {{ INSTANCE = \"{instance}\" }}\n",
            w.display()
        )
    };
    let n = 2000;
    let messages: Vec<(String, Vec<u8>)> =
        (0..n).map(|i| (format!("s{i}"), b"x".to_vec())).collect();
    broker.publish_many(&q, &messages).await;
    let work_b = Workdir::new();
    let mut a = Supervisor::start(&work, &config("a"), &[]);
    let mut b = Supervisor::start_with_env(
        &work_b,
        &config("b"),
        &[],
        &[("RECORD_DIR", work.path().to_str().unwrap())],
    );
    let seen = || -> Vec<(String, String)> {
        std::fs::read_to_string(work.file("seen"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect()
    };
    let start = Instant::now();
    while seen().len() < n / 2 {
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One instance leaves mid-run; the other finishes the rest.
    b.signal(nix::sys::signal::Signal::SIGTERM);
    b.wait_success(Duration::from_secs(30)).await;
    let start = Instant::now();
    while BTreeSet::from_iter(seen().into_iter().map(|(id, _)| id)).len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} done",
            seen().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.signal(nix::sys::signal::Signal::SIGTERM);
    a.wait_success(Duration::from_secs(30)).await;
    let all = seen();
    let ids: BTreeSet<&String> = all.iter().map(|(id, _)| id).collect();
    let by_a = all.iter().filter(|(_, i)| i == "a").count();
    let by_b = all.iter().filter(|(_, i)| i == "b").count();
    println!(
        "two instances: {by_a} jobs by a, {by_b} by b, {} duplicates",
        all.len() - ids.len()
    );
    assert_eq!(ids.len(), n, "nothing lost");
    assert_eq!(all.len(), n, "no duplicates");
    assert!(
        by_a > n / 10 && by_b > n / 10,
        "both took a share: a {by_a}, b {by_b}"
    );
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}
