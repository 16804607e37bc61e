//! Failover on a three-node RabbitMQ 4.0 cluster: nodes killed, stopped and
//! frozen under load, with the supervisor given all three URLs. These tests
//! need the cluster of `deploy/test-brokers.sh up cluster` and the
//! environment of `deploy/test-brokers.sh env cluster`; they are marked
//! ignored for a plain `cargo test` and run with `--ignored` (as `.ci/run`
//! does). Without the cluster they fail with a message saying so.

mod common;

use common::*;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: [&str; 3] = ["rabbit81", "rabbit82", "rabbit83"];

/// The cluster's URLs, one per node in [`NODES`] order.
fn cluster_urls() -> Vec<String> {
    let urls: Vec<String> = std::env::var("AMQP_EXEC_CLUSTER_URLS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        urls.len(),
        3,
        "AMQP_EXEC_CLUSTER_URLS must name the three nodes of the test cluster: run \
         `deploy/test-brokers.sh up cluster` and `eval \"$(deploy/test-brokers.sh env cluster)\"`"
    );
    urls
}

/// Runs `deploy/test-brokers.sh ARGS`.
fn brokers(args: &[&str]) {
    let out = Command::new(repo("deploy/test-brokers.sh"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run deploy/test-brokers.sh");
    assert!(
        out.status.success(),
        "deploy/test-brokers.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts again and thaws every node of the cluster when dropped, so that a
/// failed test leaves the cluster whole for the next.
struct Whole;

impl Drop for Whole {
    fn drop(&mut self) {
        for node in NODES {
            let script = repo("deploy/test-brokers.sh");
            let _ = Command::new(&script).args(["thaw", node]).status();
            let _ = Command::new(&script).args(["start", node]).status();
        }
    }
}

/// The node the supervisor is connected to now, from its last "connected
/// to" line.
fn connected_node(sup: &Supervisor) -> usize {
    let log = sup.log_text();
    let line = log
        .lines()
        .rfind(|l| l.contains("connected to"))
        .expect("the supervisor connected");
    (0..3)
        .find(|i| line.contains(&format!(":{}/", 5681 + i)))
        .unwrap_or_else(|| panic!("which node? {line}"))
}

async fn connect_any(urls: &[String], from: usize) -> (Connection, usize) {
    for i in 0..urls.len() * 20 {
        let n = (from + i) % urls.len();
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&urls[n], ConnectionProperties::default()),
        )
        .await
        {
            return (c, n);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("no node of the cluster answers: {urls:?}");
}

/// Publishes `ids` to `queue` with confirms through whichever node answers,
/// again after a failure, until each is confirmed; returns those confirmed.
async fn publish_all(urls: Vec<String>, queue: String, ids: Vec<String>) -> BTreeSet<String> {
    let mut confirmed = BTreeSet::new();
    let mut node = 0;
    let mut pending: Vec<String> = ids;
    while !pending.is_empty() {
        let (conn, n) = connect_any(&urls, node).await;
        node = n;
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        if ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        let mut failed = Vec::new();
        for chunk in pending.chunks(100) {
            let mut waiting = Vec::new();
            for id in chunk {
                let sent = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        id.as_bytes(),
                        BasicProperties::default()
                            .with_message_id(id.as_str().into())
                            .with_delivery_mode(2),
                    )
                    .await;
                waiting.push((id.clone(), sent));
            }
            for (id, sent) in waiting {
                let ok = match sent {
                    Ok(confirm) => matches!(
                        tokio::time::timeout(Duration::from_secs(10), confirm).await,
                        Ok(Ok(lapin::Confirmation::Ack(None)))
                    ),
                    Err(_) => false,
                };
                if ok {
                    confirmed.insert(id);
                } else {
                    failed.push(id);
                }
            }
            // Pace the publisher a little, so that faults meet a backlog.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pending = failed;
        node += 1;
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "ok".into())).await;
    }
    confirmed
}

/// Takes every message out of `queue`; their ids. None if the queue is
/// not there.
async fn drain_ids(urls: &[String], queue: &str) -> Option<Vec<String>> {
    let (conn, _) = connect_any(urls, 0).await;
    let ch = conn.create_channel().await.ok()?;
    amqp_exec::broker::queue_depth(&ch, queue).await.ok()?;
    let mut ids = Vec::new();
    while let Ok(Some(m)) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
    {
        ids.push(message_id(&m.delivery));
    }
    let _ = conn.close(200, "ok".into()).await;
    Some(ids)
}

async fn depth(urls: &[String], queue: &str) -> Option<u32> {
    let (conn, _) = connect_any(urls, 0).await;
    let ch = conn.create_channel().await.ok()?;
    let d = amqp_exec::broker::queue_depth(&ch, queue).await.ok();
    let _ = conn.close(200, "ok".into()).await;
    d
}

async fn delete_queues(urls: &[String], names: &[String]) {
    let (conn, _) = connect_any(urls, 0).await;
    for q in names {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "ok".into()).await;
}

/// The longest pause between job completions in the `window` after `at`
/// (ns since the epoch).
fn longest_gap(ends: &[u128], at: u128, window: Duration) -> Duration {
    let until = at + window.as_nanos();
    let mut points: Vec<u128> = vec![at];
    points.extend(ends.iter().copied().filter(|e| *e > at && *e <= until));
    points
        .windows(2)
        .map(|w| Duration::from_nanos((w[1] - w[0]) as u64))
        .max()
        .unwrap_or_default()
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Quorum work, retry and dead queues on the cluster, and the supervisor
/// given all three URLs: 5,000 confirmed messages while the node it is
/// connected to is killed (then started again), another is stopped with
/// `stop_app` (and started), and the third is frozen for 20 s. Every
/// confirmed id ends in the ledger, or in `.dead` for the ids built to
/// fail; nothing stays in any queue; the supervisor never exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster of deploy/test-brokers.sh up cluster (.ci/run runs it)"]
async fn quorum_queues_lose_nothing_when_nodes_fail() {
    let urls = cluster_urls();
    let _whole = Whole;
    let q = unique("cluster");
    let work = Workdir::new();
    let worker = work.script(
        "worker.sh",
        &format!(
            "#!/bin/sh\ncase \"$AMQP_EXEC_MESSAGE_ID\" in fail-*) cat >/dev/null; exit 65;; esac\nexec {}\n",
            repo("workers/testing/record.sh")
        ),
    );
    let url_list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let config = format!(
        "[broker]\nurls = [{}]\nheartbeat = \"5s\"\nconnect_timeout = \"5s\"\n\
         [[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nqueue_type = \"quorum\"\nconcurrency = 4\n\
         max_attempts = 3\nbackoff = [\"1s\"]\n",
        url_list.join(", "),
        worker.display()
    );
    let mut sup = Supervisor::start_with_env(&work, &config, &[], &[("AMQP_URL", "")]);
    sup.wait_log("consuming", Duration::from_secs(60)).await;

    let n = 5000;
    let ids: Vec<String> = (0..n)
        .map(|i| {
            if i % 100 == 7 {
                format!("fail-{i}")
            } else {
                format!("m{i}")
            }
        })
        .collect();
    let publisher = tokio::spawn(publish_all(urls.clone(), q.clone(), ids.clone()));

    let faults: Arc<Mutex<Vec<(String, u128)>>> = Arc::default();
    let note = |what: String| {
        println!("fault: {what}");
        faults.lock().unwrap().push((what, now_ns()));
    };
    // 1. The node the supervisor is connected to: killed, then started.
    work.wait_ledger(800, Duration::from_secs(180)).await;
    let a = connected_node(&sup);
    note(format!("kill -9 {}", NODES[a]));
    brokers(&["kill", NODES[a]]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    brokers(&["start", NODES[a]]);
    // 2. Another node: stop_app, then start_app.
    work.wait_ledger(1800, Duration::from_secs(180)).await;
    let b = (a + 1) % 3;
    note(format!("stop_app {}", NODES[b]));
    brokers(&["ctl", NODES[b], "stop_app"]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    brokers(&["ctl", NODES[b], "start_app"]);
    // 3. The third: frozen for 20 s.
    work.wait_ledger(2800, Duration::from_secs(180)).await;
    let c = (a + 2) % 3;
    note(format!("SIGSTOP {} for 20s", NODES[c]));
    brokers(&["freeze", NODES[c]]);
    tokio::time::sleep(Duration::from_secs(20)).await;
    brokers(&["thaw", NODES[c]]);

    let confirmed = publisher.await.unwrap();
    assert_eq!(confirmed.len(), n, "every message was confirmed in the end");
    // Every confirmed id ends in the ledger or, for those built to fail, in
    // .dead; nothing is left waiting.
    let dead_q = format!("{q}.dead");
    let mut dead: BTreeSet<String> = BTreeSet::new();
    let start = Instant::now();
    loop {
        if let Some(ids) = drain_ids(&urls, &dead_q).await {
            dead.extend(ids);
        }
        let done: BTreeSet<String> = work.ledger().into_iter().map(|r| r.id).collect();
        let missing: Vec<&String> = confirmed
            .iter()
            .filter(|id| !done.contains(*id) && !dead.contains(*id))
            .collect();
        let waiting = depth(&urls, &q).await.unwrap_or(0)
            + depth(&urls, &format!("{q}.retry.1s")).await.unwrap_or(0);
        if missing.is_empty() && waiting == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "{} confirmed id(s) missing (e.g. {:?}), {waiting} waiting\n{}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            tail(&sup.log_text(), 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        sup.child.try_wait().unwrap().is_none(),
        "the supervisor never exited"
    );
    let runs = work.ledger();
    let by_id: BTreeMap<String, Vec<Run>> = runs_by_id(&runs);
    let fails: BTreeSet<&String> = ids.iter().filter(|i| i.starts_with("fail-")).collect();
    assert!(
        dead.iter().all(|d| fails.contains(d)),
        "only ids built to fail are dead: {:?}",
        dead.iter()
            .filter(|d| !fails.contains(d))
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(dead.len(), fails.len(), "every id built to fail is dead");
    let duplicates = runs.len() - by_id.len();
    let ends: Vec<u128> = {
        let mut e: Vec<u128> = runs.iter().map(|r| r.end).collect();
        e.sort();
        e
    };
    println!(
        "cluster failover: {n} confirmed, {} processed, {} dead, {duplicates} duplicate run(s)",
        by_id.len(),
        dead.len()
    );
    let faults = faults.lock().unwrap().clone();
    for (i, (what, at)) in faults.iter().enumerate() {
        // Up to the next fault, or a minute.
        let window = faults
            .get(i + 1)
            .map(|(_, next)| Duration::from_nanos((next - at) as u64))
            .unwrap_or(Duration::from_secs(60));
        println!(
            "  after {what}: longest gap in processing {:.1}s",
            longest_gap(&ends, *at, window).as_secs_f64()
        );
    }
    let log = sup.log_text();
    println!(
        "  connections: {}, losses logged: {}",
        log.matches("connected to").count(),
        log.matches("connection lost").count()
    );
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(60)).await;
    delete_queues(&urls, &[q.clone(), dead_q, format!("{q}.retry.1s")]).await;
}

/// A classic queue lives on one node. While that node is down the
/// supervisor, reconnected to another node, cannot consume it and says so in
/// its log; once the node is back it declares the queue again and consumes
/// it, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster of deploy/test-brokers.sh up cluster (.ci/run runs it)"]
async fn a_classic_queue_comes_back_with_its_node() {
    let urls = cluster_urls();
    let _whole = Whole;
    let q = unique("cluster-classic");
    let work = Workdir::new();
    // First declared through the first node, which is its home.
    let url_list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let config = format!(
        "[broker]\nurls = [{}]\nheartbeat = \"5s\"\nconnect_timeout = \"5s\"\n\
         [[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nbackoff = [\"1s\"]\n",
        url_list.join(", "),
        repo("workers/testing/record.sh")
    );
    let mut sup = Supervisor::start_with_env(&work, &config, &[], &[("AMQP_URL", "")]);
    sup.wait_log("consuming", Duration::from_secs(60)).await;
    assert_eq!(connected_node(&sup), 0, "the first URL first");
    let ids: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    brokers(&["kill", NODES[0]]);
    let t = Instant::now();
    // It reconnects to another node and cannot consume the queue there.
    let start = Instant::now();
    while sup.log_text().matches("connected to").count() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            tail(&sup.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    loop {
        let log = sup.log_text();
        let after = &log[log.rfind("connected to").unwrap()..];
        if after.contains("reopening the channel in") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "says while it cannot consume:\n{}",
            tail(&log, 60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    brokers(&["start", NODES[0]]);
    println!("home node down for {:.1}s", t.elapsed().as_secs_f64());
    // Back: the queue is consumed again.
    let confirmed = publish_all(urls.clone(), q.clone(), ids.clone()).await;
    assert_eq!(confirmed.len(), ids.len());
    work.wait_ledger(ids.len(), Duration::from_secs(120)).await;
    let done: BTreeSet<String> = work.ledger().into_iter().map(|r| r.id).collect();
    assert!(ids.iter().all(|i| done.contains(i)));
    assert!(sup.child.try_wait().unwrap().is_none());
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(30)).await;
    delete_queues(
        &urls,
        &[q.clone(), format!("{q}.dead"), format!("{q}.retry.1s")],
    )
    .await;
}
