//! Running as a service: graceful drain on SIGTERM, grace expiry, second
//! signal, connection cuts and black-holed connections through a TCP proxy,
//! and sd_notify messages.

mod common;

use common::proxy::{Proxy, broker_addr, url_via};
use common::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Config of a queue whose worker notes its start in `starts`, then runs the
/// recording worker (which sleeps `SLEEP`).
fn starting_queue(q: &str, concurrency: usize, sleep: &str, extra: &str) -> String {
    format!(
        r#"
{extra}
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "echo \"$AMQP_EXEC_MESSAGE_ID $(date +%s%N)\" >> \"$RECORD_DIR/starts\"; exec \"$0\"", "{w}"]
concurrency = {concurrency}
env = {{ SLEEP = "{sleep}" }}
"#,
        w = repo("workers/testing/record.sh")
    )
}

fn starts(work: &Workdir) -> Vec<(String, u128)> {
    std::fs::read_to_string(work.file("starts"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (id, t) = l.split_once(' ').unwrap();
            (id.to_owned(), t.parse().unwrap())
        })
        .collect()
}

async fn wait_starts(work: &Workdir, n: usize, timeout: Duration) {
    let start = Instant::now();
    while starts(work).len() < n {
        assert!(
            start.elapsed() < timeout,
            "only {} jobs started",
            starts(work).len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_jobs_and_starts_no_new_ones() {
    let mut broker = Broker::connect().await;
    let q = unique("drain");
    broker.declare(&q).await;
    let work = Workdir::new();
    for i in 0..16 {
        broker.publish_id(&q, &format!("m{i}"), b"x").await;
    }
    let mut sup = Supervisor::start(&work, &starting_queue(&q, 8, "3", ""), &[]);
    wait_starts(&work, 8, Duration::from_secs(20)).await;
    let signalled = now_ns();
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}");
    let runs = work.ledger();
    assert_eq!(runs.len(), 8, "all 8 running jobs finished");
    assert!(
        starts(&work).iter().all(|(_, t)| *t < signalled),
        "a job started after SIGTERM"
    );
    // Ledger: 16 published = 8 done + 8 back in the queue.
    assert_eq!(broker.count(&q).await, Some(8));
    let left = broker.drain(&q).await;
    let done: std::collections::BTreeSet<String> = runs.iter().map(|r| r.id.clone()).collect();
    assert!(
        left.iter().all(|d| !done.contains(&message_id(d))),
        "a finished job was not acked"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_expiry_kills_workers_and_requeues() {
    let mut broker = Broker::connect().await;
    let q = unique("grace");
    broker.declare(&q).await;
    let work = Workdir::new();
    for i in 0..4 {
        broker.publish_id(&q, &format!("m{i}"), b"x").await;
    }
    let mut sup = Supervisor::start(
        &work,
        &starting_queue(&q, 2, "30", "shutdown_grace = \"1s\""),
        &[],
    );
    wait_starts(&work, 2, Duration::from_secs(20)).await;
    let t = Instant::now();
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(20)).await;
    let took = t.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(6),
        "stopping took {took:?} with shutdown_grace = 1s"
    );
    assert!(
        took >= Duration::from_millis(900),
        "stopped before the grace period: {took:?}"
    );
    assert!(work.ledger().is_empty(), "no job finished");
    // Ledger: all 4 back in the queue, none acked, none dead.
    broker.wait_count(&q, 4, Duration::from_secs(5)).await;
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    let log = sup.log_text();
    assert!(log.contains("shutdown_grace expired"), "{}", tail(&log, 20));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_stops_at_once_without_acking() {
    let mut broker = Broker::connect().await;
    let q = unique("twice");
    broker.declare(&q).await;
    let work = Workdir::new();
    for i in 0..2 {
        broker.publish_id(&q, &format!("m{i}"), b"x").await;
    }
    let mut sup = Supervisor::start(&work, &starting_queue(&q, 2, "30", ""), &[]);
    wait_starts(&work, 2, Duration::from_secs(20)).await;
    let t = Instant::now();
    sup.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sup.signal(Signal::SIGINT);
    let status = sup.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    broker.wait_count(&q, 2, Duration::from_secs(5)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cuts_lose_nothing() {
    let mut broker = Broker::connect().await;
    let q = unique("cut");
    broker.declare(&q).await;
    let proxy = Proxy::start(&broker_addr()).await;
    let work = Workdir::new();
    let n = 300;
    for i in 0..n {
        broker.publish_id(&q, &format!("m{i}"), b"x").await;
    }
    let config = format!(
        "[broker]\nurl = \"{}\"\nheartbeat = \"5s\"\n[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 4\nenv = {{ SLEEP = \"0.02\" }}\n",
        url_via(proxy.port),
        repo("workers/testing/record.sh")
    );
    // No --max-jobs here: an ack sent just before a cut may be lost and the
    // message redelivered, so acks can outnumber messages.
    let mut sup = Supervisor::start_with_env(&work, &config, &[], &[("AMQP_URL", "")]);
    for cut in 1..=3 {
        let start = Instant::now();
        while work.ledger().len() < cut * n / 4 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "stalled before cut {cut}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.cut();
    }
    let start = Instant::now();
    while runs_by_id(&work.ledger()).len() < n || broker.count(&q).await != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "messages missing after the cuts"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let in-flight redeliveries settle, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(30)).await;
    let runs = work.ledger();
    let by_id = runs_by_id(&runs);
    let duplicates = runs.len() - by_id.len();
    println!(
        "connection cuts: {} runs for {n} messages, {duplicates} duplicate(s), {} connections",
        runs.len(),
        proxy.accepted()
    );
    assert_eq!(by_id.len(), n, "every message was processed");
    assert!(
        duplicates <= 3 * 4,
        "duplicates only for jobs in flight at a cut"
    );
    assert!(
        proxy.accepted() >= 4,
        "the supervisor reconnected after each cut"
    );
    // Ledger: published = processed; nothing waiting, nothing dead.
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    let log = sup.log_text();
    assert!(log.contains("connection lost"), "{}", tail(&log, 20));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_connection_is_noticed_within_two_heartbeats() {
    let mut broker = Broker::connect().await;
    let q = unique("blackhole");
    broker.declare(&q).await;
    let proxy = Proxy::start(&broker_addr()).await;
    let work = Workdir::new();
    let config = format!(
        "[broker]\nurl = \"{}\"\nheartbeat = \"2s\"\n[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\n",
        url_via(proxy.port),
        repo("workers/testing/record.sh")
    );
    let mut sup = Supervisor::start_with_env(&work, &config, &[], &[("AMQP_URL", "")]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    let t = Instant::now();
    proxy.blackhole(true);
    sup.wait_log("connection lost", Duration::from_secs(15))
        .await;
    let noticed = t.elapsed();
    println!("black hole noticed after {noticed:?} (heartbeat 2s)");
    assert!(noticed <= Duration::from_secs(7), "took {noticed:?}");
    // It comes back once the network does.
    proxy.blackhole(false);
    proxy.cut();
    broker.publish_id(&q, "after", b"x").await;
    let start = Instant::now();
    while work.ledger().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no processing after the black hole"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_is_retried_until_it_answers() {
    let mut broker = Broker::connect().await;
    let q = unique("down");
    broker.declare(&q).await;
    let proxy = Proxy::start(&broker_addr()).await;
    proxy.refuse(true);
    let work = Workdir::new();
    broker.publish_id(&q, "m", b"x").await;
    let config = format!(
        "[broker]\nurl = \"{}\"\n[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\n",
        url_via(proxy.port),
        repo("workers/testing/record.sh")
    );
    let mut sup =
        Supervisor::start_with_env(&work, &config, &["--max-jobs", "1"], &[("AMQP_URL", "")]);
    sup.wait_log("broker unreachable", Duration::from_secs(20))
        .await;
    assert!(
        sup.child.try_wait().unwrap().is_none(),
        "it must keep trying, not exit"
    );
    proxy.refuse(false);
    sup.wait_success(Duration::from_secs(60)).await;
    assert!(
        !sup.log_text().contains("guest:guest@"),
        "credentials in the log"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_status_watchdog_stopping() {
    let mut broker = Broker::connect().await;
    let q = unique("notify");
    broker.declare(&q).await;
    let work = Workdir::new();
    let sock_path = work.file("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    broker.publish_id(&q, "m", b"x").await;
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/sh\", \"-c\", \"env > \\\"$RECORD_DIR/env\\\"\"]\n"
    );
    let mut sup = Supervisor::start_with_env(
        &work,
        &config,
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut seen = String::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let mut stopped = false;
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
        if !stopped
            && seen.contains("READY=1")
            && seen.contains("WATCHDOG=1")
            && seen.contains("1 ok")
        {
            sup.signal(Signal::SIGTERM);
            stopped = true;
        }
        if seen.contains("STOPPING=1") {
            break;
        }
    }
    sup.wait_success(Duration::from_secs(20)).await;
    for needle in [
        "READY=1",
        "WATCHDOG=1",
        "STOPPING=1",
        "STATUS=",
        "busy",
        "1 ok",
    ] {
        assert!(
            seen.contains(needle),
            "missing {needle} in notifications:\n{seen}"
        );
    }
    let env = std::fs::read_to_string(work.file("env")).unwrap();
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "AMQP_URL"] {
        assert!(!env.contains(&format!("{var}=")), "worker inherited {var}");
    }
    broker.cleanup().await;
}
