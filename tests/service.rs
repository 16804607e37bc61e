//! Running as a service: graceful drain on SIGTERM, grace expiry, second
//! signal, connection cuts and black-holed connections through a TCP proxy,
//! and sd_notify messages.

mod common;

use common::proxy::{Proxy, broker_addr, url_via};
use common::scrape::free_port;
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
    assert_no_error_logged(&sup);
    broker.cleanup().await;
}

/// A stop that went as planned says nothing at ERROR level: operators alert
/// on those lines.
fn assert_no_error_logged(sup: &Supervisor) {
    let log = sup.log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "a clean stop logged errors:\n{}",
        errors.join("\n")
    );
}

/// Idle on SIGTERM, and at the end of `--max-jobs`, the supervisor closes
/// its channels and its connection without an error line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_logs_no_error() {
    let mut broker = Broker::connect().await;
    let q = unique("clean-stop");
    broker.declare(&q).await;
    for i in 0..3 {
        broker.publish_id(&q, &format!("m{i}"), b"x").await;
    }
    let config = starting_queue(&q, 2, "0", "");

    let work = Workdir::new();
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "3"]);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_eq!(work.ledger().len(), 3);
    assert_no_error_logged(&sup);

    let work = Workdir::new();
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("all queues started", Duration::from_secs(20))
        .await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_no_error_logged(&sup);
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

/// A queue that a reload removed keeps its channel until its running job
/// has settled on it; a shutdown meanwhile waits for that job, and closes
/// the channel and then the connection without an error line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_after_a_reload_closes_the_removed_queues_channel_cleanly() {
    let mut broker = Broker::connect().await;
    let old = unique("clean-stop-removed");
    let kept = unique("clean-stop-kept");
    broker.declare(&old).await;
    broker.declare(&kept).await;
    let work = Workdir::new();
    let mut sup = Supervisor::start(
        &work,
        &format!(
            "{}{}",
            starting_queue(&old, 1, "1", ""),
            starting_queue(&kept, 1, "0", "")
        ),
        &[],
    );
    sup.wait_log("all queues started", Duration::from_secs(20))
        .await;
    broker.publish_id(&old, "slow", b"x").await;
    wait_starts(&work, 1, Duration::from_secs(10)).await;
    work.write("config.toml", &starting_queue(&kept, 1, "0", ""));
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload done", Duration::from_secs(10)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let ids: Vec<String> = work.ledger().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["slow"], "the removed queue's running job finished");
    assert_eq!(broker.count(&old).await, Some(0), "and was acked");
    assert_no_error_logged(&sup);
    broker.cleanup().await;
}

/// With its stderr closed (journald restarted, or the reader of a pipe gone),
/// the supervisor loses its log lines but nothing else: it keeps running
/// jobs, and stops on SIGTERM. A failed log write used to panic the task
/// that logged (tracing-subscriber reported it with `eprintln!`), so the
/// consumer stopped taking messages and the signal handler never stopped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_stops_neither_jobs_nor_shutdown() {
    let mut broker = Broker::connect().await;
    let q = unique("closed-stderr");
    broker.declare(&q).await;
    let work = Workdir::new();
    let cfg = work.write(
        "config.toml",
        &format!(
            "[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/sh\", \"-c\", \"echo to the log; echo and more >&2; exec \\\"$0\\\"\", \"{}\"]\n",
            repo("workers/testing/record.sh")
        ),
    );
    let mut child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("AMQP_URL", amqp_url())
        .env("RECORD_DIR", work.path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start amqp-exec");
    // Close the reading ends before the supervisor writes its first line.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let mut sup = Supervisor {
        child,
        log: work.file("no-log"),
    };
    for i in 0..3 {
        broker.publish_id(&q, &format!("m{i}"), b"x").await;
    }
    work.wait_ledger(3, Duration::from_secs(20)).await;
    broker.wait_count(&q, 0, Duration::from_secs(10)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(15)).await;
    broker.cleanup().await;
}

/// With `max_workers` below the queues' concurrency, a queue can hold a
/// delivery while it waits for a free worker. On SIGTERM that delivery goes
/// back to its queue; it does not start when the running job frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_returns_a_delivery_waiting_for_a_max_workers_slot() {
    let mut broker = Broker::connect().await;
    let busy = unique("slot-busy");
    let waiting = unique("slot-waiting");
    broker.declare(&busy).await;
    broker.declare(&waiting).await;
    let work = Workdir::new();
    broker.publish_id(&busy, "long", b"x").await;
    let config = format!(
        "{}{}",
        starting_queue(&busy, 1, "3", "max_workers = 1"),
        starting_queue(&waiting, 1, "0", "")
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    wait_starts(&work, 1, Duration::from_secs(20)).await;
    broker.publish_id(&waiting, "held", b"x").await;
    // The delivery reaches the supervisor, which waits for the one slot.
    broker
        .wait_count(&waiting, 0, Duration::from_secs(10))
        .await;
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}");
    let ids: Vec<String> = starts(&work).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["long"], "only the running job ran");
    // Ledger: the running job done, the held one back in its queue.
    assert_eq!(work.ledger().len(), 1);
    assert_eq!(broker.count(&busy).await, Some(0));
    assert_eq!(broker.count(&waiting).await, Some(1));
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

/// A worker that ignores SIGTERM gets its full `kill_grace` after the
/// shutdown grace, then SIGKILL for its whole process group: nothing of it
/// outlives the supervisor, even with `kill_grace` longer than the few
/// seconds jobs get to settle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stubborn_worker_and_its_children_do_not_outlive_shutdown() {
    let mut broker = Broker::connect().await;
    let q = unique("stubborn");
    broker.declare(&q).await;
    let work = Workdir::new();
    broker.publish_id(&q, "m0", b"x").await;
    let worker = work.script(
        "worker.sh",
        r#"#!/bin/sh
trap '' TERM
sleep 1000 &
echo "$!" > "$RECORD_DIR/child"
echo "$$" > "$RECORD_DIR/leader"
sleep 1000
"#,
    );
    let config = format!(
        "shutdown_grace = \"1s\"\n[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nkill_grace = \"7s\"\n",
        worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    let pid_in = |name: &str| -> Option<i32> {
        std::fs::read_to_string(work.file(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let started = Instant::now();
    while pid_in("leader").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the worker did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (leader, child) = (pid_in("leader").unwrap(), pid_in("child").unwrap());
    let t = Instant::now();
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(30)).await;
    let took = t.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took >= Duration::from_secs(7),
        "stopped before shutdown_grace + kill_grace: {took:?}\n{}",
        tail(&sup.log_text(), 20)
    );
    for (what, pid) in [("leader", leader), ("child", child)] {
        let gone = Instant::now();
        while running(pid) {
            assert!(
                gone.elapsed() < Duration::from_secs(2),
                "the worker's {what} ({pid}) outlived the supervisor\n{}",
                tail(&sup.log_text(), 20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        sup.log_text().contains("sending SIGKILL"),
        "{}",
        tail(&sup.log_text(), 20)
    );
    // Ledger: the message is back in its queue.
    broker.wait_count(&q, 1, Duration::from_secs(5)).await;
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

/// Under `--max-jobs`, a claimed job that ends without an ack (here
/// requeued by its exit code) frees its claim, and the consumer, which had
/// handed back a delivery over the limit, takes deliveries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_jobs_still_ends_when_a_claimed_job_is_requeued() {
    let mut broker = Broker::connect().await;
    let q = unique("maxjobs-requeue");
    broker.declare(&q).await;
    let work = Workdir::new();
    // "req" is requeued on its first run, then succeeds.
    let worker = work.script(
        "worker.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT $(date +%s%N) $(date +%s%N) $$" >> "$RECORD_DIR/ledger"
if [ "$AMQP_EXEC_MESSAGE_ID" = req ] && [ "$AMQP_EXEC_REDELIVERED" = 0 ]; then sleep 0.3; exit 3; fi
sleep 0.3
"#,
    );
    for id in ["req", "ok2", "ok3"] {
        broker.publish_id(&q, id, b"x").await;
    }
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nconcurrency = 3\n[queue.exit_codes]\n3 = \"requeue\"\n",
        worker.display()
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "2"]);
    sup.wait_success(Duration::from_secs(20)).await;
    // Ledger: 3 published = 2 done + 1 waiting + 0 dead.
    broker.wait_count(&q, 1, Duration::from_secs(5)).await;
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

/// `--exit-when-idle` counts a delivery held back by `max_rate` as work:
/// the supervisor exits only once every message ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_when_idle_waits_for_deliveries_held_by_max_rate() {
    let mut broker = Broker::connect().await;
    let q = unique("idle-rate");
    broker.declare(&q).await;
    let work = Workdir::new();
    for i in 0..3 {
        broker.publish_id(&q, &format!("m{i}"), b"x").await;
    }
    let config = format!(
        "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nmax_rate = \"0.5/s\"\nenv = {{ SLEEP = \"0\" }}\n",
        repo("workers/testing/record.sh")
    );
    let mut sup = Supervisor::start(&work, &config, &["--exit-when-idle", "1s"]);
    sup.wait_success(Duration::from_secs(30)).await;
    assert_eq!(work.ledger().len(), 3, "{}", tail(&sup.log_text(), 20));
    // Ledger: 3 published = 3 done + 0 waiting + 0 dead.
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

/// A SIGHUP before the service is ready (the broker does not answer yet)
/// reloads without telling systemd READY=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_before_ready_does_not_signal_ready() {
    let work = Workdir::new();
    let sock_path = work.file("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = format!(
        "[[queue]]\nname = \"{}\"\ncommand = [\"/bin/cat\"]\n",
        unique("never")
    );
    let mut sup = Supervisor::start_with_env(
        &work,
        &config,
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            // Nothing listens on port 1.
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ],
    );
    sup.wait_log("cannot connect", Duration::from_secs(20))
        .await;
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload done", Duration::from_secs(20)).await;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    assert!(!seen.contains("READY=1"), "{seen}");
    assert!(!seen.contains("RELOADING=1"), "{seen}");
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
    sup.wait_log("SIGTERM: stopping", Duration::from_secs(10))
        .await;
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
        work.wait_ledger(cut * n / 4, Duration::from_secs(60)).await;
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
    // At most the unacked messages at each cut run again: the prefetch,
    // which the adaptive prefetch raises to 4 + 2 for these short jobs.
    assert!(
        duplicates <= 3 * (4 + 2),
        "duplicates only for messages unacked at a cut"
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

/// A message being handled at `max_connection_losses` connection losses in
/// a row (one that takes the connection down, say) is dead-lettered
/// without running again, and the supervisor carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_present_at_three_connection_losses_is_dead_lettered() {
    let mut broker = Broker::connect().await;
    let q = unique("losses");
    broker.declare(&q).await;
    let proxy = Proxy::start(&broker_addr()).await;
    let work = Workdir::new();
    let config = format!(
        "shutdown_grace = \"1s\"\n[broker]\nurl = \"{}\"\n{}on_connection_loss = \"kill\"\nkill_grace = \"1s\"\n",
        url_via(proxy.port),
        starting_queue(&q, 1, "10", "")
    );
    let mut sup = Supervisor::start_with_env(&work, &config, &[], &[("AMQP_URL", "")]);
    broker.publish_id(&q, "poison", b"x").await;
    for cut in 1..=3 {
        wait_starts(&work, cut, Duration::from_secs(30)).await;
        proxy.cut();
    }
    broker
        .wait_count(&format!("{q}.dead"), 1, Duration::from_secs(30))
        .await;
    let dead = broker.drain(&format!("{q}.dead")).await;
    assert_eq!(
        header(&dead[0], "x-amqp-exec-exit").as_deref(),
        Some("connection-losses")
    );
    assert_eq!(starts(&work).len(), 3, "no fourth run");
    // The supervisor carries on with other messages.
    broker.publish_id(&q, "next", b"x").await;
    wait_starts(&work, 4, Duration::from_secs(30)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // Ledger: 2 published = 1 dead + 1 requeued by the stop or done.
    assert_eq!(
        broker.count(&q).await.unwrap() + work.ledger().len() as u32,
        1
    );
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
    work.wait_ledger(1, Duration::from_secs(30)).await;
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

fn metric(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_jobs_run() {
    let mut broker = Broker::connect().await;
    let q = unique("metrics");
    broker.declare(&q).await;
    let work = Workdir::new();
    let port = free_port();
    for i in 0..5 {
        broker.publish_id(&q, &format!("ok{i}"), b"0").await;
    }
    for i in 0..2 {
        broker.publish_id(&q, &format!("bad{i}"), b"65").await;
    }
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/sh\", \"-c\", \"exit $(cat)\"]\nconcurrency = 2\n"
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    broker
        .wait_count(&format!("{q}.dead"), 2, Duration::from_secs(20))
        .await;
    // The dead letters are in their queue before the jobs that sent them are
    // counted (that happens after the ack): wait until all 7 are counted.
    let start = Instant::now();
    let page = loop {
        let (code, page) = http_get(port, "/metrics");
        assert_eq!(code, 200);
        let ok = format!("amqp_exec_jobs_total{{queue=\"{q}\",outcome=\"ok\"}}");
        let dead = format!("amqp_exec_jobs_total{{queue=\"{q}\",outcome=\"dead\"}}");
        if metric(&page, &ok) == Some(5.0) && metric(&page, &dead) == Some(2.0) {
            break page;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "metrics never showed 5 ok and 2 dead:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let l = |s: &str| format!("{{queue=\"{q}\"{s}}}");
    assert_eq!(
        metric(
            &page,
            &format!("amqp_exec_jobs_total{}", l(",outcome=\"dead\""))
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &page,
            &format!("amqp_exec_jobs_total{}", l(",outcome=\"retried\""))
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &page,
            &format!("amqp_exec_worker_exits_total{}", l(",exit=\"0\""))
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &page,
            &format!("amqp_exec_worker_exits_total{}", l(",exit=\"65\""))
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&page, &format!("amqp_exec_dead_letters_total{}", l(""))),
        Some(2.0)
    );
    assert_eq!(
        metric(&page, &format!("amqp_exec_running_workers{}", l(""))),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &page,
            &format!("amqp_exec_job_duration_seconds_count{}", l(""))
        ),
        Some(7.0)
    );
    assert_eq!(
        metric(
            &page,
            &format!("amqp_exec_job_duration_seconds_bucket{}", l(",le=\"+Inf\""))
        ),
        Some(7.0)
    );
    assert_eq!(metric(&page, "amqp_exec_connected"), Some(1.0));
    assert_eq!(metric(&page, "amqp_exec_reconnects_total"), Some(0.0));
    let (code, body) = http_get(port, "/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    assert_eq!(http_get(port, "/nope").0, 404);
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_queues_while_running_workers_finish() {
    let mut broker = Broker::connect().await;
    let old = unique("reload-old");
    let kept = unique("reload-kept");
    let new = unique("reload-new");
    for q in [&old, &kept, &new] {
        broker.declare(q).await;
    }
    let work = Workdir::new();
    let w = repo("workers/testing/record.sh");
    let queue = |name: &str, sleep: &str| {
        format!(
            "[[queue]]\nname = \"{name}\"\ncommand = [\"/bin/sh\", \"-c\", \"echo \\\"$AMQP_EXEC_MESSAGE_ID $(date +%s%N)\\\" >> \\\"$RECORD_DIR/starts\\\"; exec \\\"$0\\\"\", \"{w}\"]\nenv = {{ SLEEP = \"{sleep}\" }}\n"
        )
    };
    let first = format!("{}{}", queue(&old, "2"), queue(&kept, "0"));
    let mut sup = Supervisor::start(&work, &first, &[]);
    sup.wait_log("all queues started", Duration::from_secs(20))
        .await;
    broker.publish_id(&old, "slow", b"x").await;
    wait_starts(&work, 1, Duration::from_secs(10)).await;

    // Reload: `old` removed while its worker runs, `new` added, `kept` unchanged.
    work.write(
        "config.toml",
        &format!("{}{}", queue(&kept, "0"), queue(&new, "0")),
    );
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload done", Duration::from_secs(10)).await;
    broker.publish_id(&new, "fresh", b"x").await;
    broker.publish_id(&kept, "steady", b"x").await;
    broker.publish_id(&old, "orphan", b"x").await;
    work.wait_ledger(3, Duration::from_secs(20)).await;
    let ids: std::collections::BTreeSet<String> = work.ledger().into_iter().map(|r| r.id).collect();
    assert!(
        ids.contains("slow"),
        "the removed queue's running worker finished"
    );
    assert!(ids.contains("fresh") && ids.contains("steady"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !work.ledger().iter().any(|r| r.id == "orphan"),
        "a removed queue must not be consumed"
    );
    assert_eq!(
        broker.count(&old).await,
        Some(1),
        "the slow job was acked; the orphan waits"
    );

    // An invalid config is rejected and the running one stays.
    work.write("config.toml", "[[queue]]\nname = \"broken\"\n");
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload rejected", Duration::from_secs(10))
        .await;
    broker.publish_id(&new, "still", b"x").await;
    let start = Instant::now();
    while !work.ledger().iter().any(|r| r.id == "still") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the old config stopped working"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

/// Without a `max_workers` key the cap is the sum of all `concurrency`,
/// which the queues keep to by themselves: a reload that adds a queue, or
/// removes one whose worker still runs, never makes the others wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adding_or_removing_a_queue_never_waits_on_the_default_max_workers() {
    let mut broker = Broker::connect().await;
    let (a, b) = (unique("cap-a"), unique("cap-b"));
    broker.declare(&a).await;
    broker.declare(&b).await;
    let work = Workdir::new();
    let first = starting_queue(&a, 1, "8", "");
    let mut sup = Supervisor::start(&work, &first, &[]);
    broker.publish_id(&a, "slow", b"x").await;
    wait_starts(&work, 1, Duration::from_secs(20)).await;
    let t = Instant::now();
    work.write(
        "config.toml",
        &format!("{first}{}", starting_queue(&b, 2, "0", "")),
    );
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload done", Duration::from_secs(10)).await;
    broker.publish_id(&b, "b1", b"x").await;
    broker.publish_id(&b, "b2", b"x").await;
    wait_starts(&work, 3, Duration::from_secs(20)).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the added queue waited for the running job: {:?}",
        t.elapsed()
    );
    // `a` removed while its worker runs: `b` keeps both its slots.
    work.wait_ledger(2, Duration::from_secs(10)).await;
    work.write("config.toml", &starting_queue(&b, 2, "2", ""));
    sup.signal(Signal::SIGHUP);
    sup.wait_log("queue removed", Duration::from_secs(10)).await;
    let t = Instant::now();
    broker.publish_id(&b, "b3", b"x").await;
    broker.publish_id(&b, "b4", b"x").await;
    wait_starts(&work, 5, Duration::from_secs(20)).await;
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the remaining queue's two jobs did not start side by side: {:?}",
        t.elapsed()
    );
    assert!(
        !work.ledger().iter().any(|r| r.id == "slow"),
        "the removed queue's job was still running"
    );
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // Ledger: 5 published = 5 done.
    assert_eq!(work.ledger().len(), 5);
    broker.cleanup().await;
}

/// A reload that lowers a queue's concurrency holds while the workers it
/// already runs finish: new jobs start only below the new limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_lowering_concurrency_waits_for_running_workers() {
    let mut broker = Broker::connect().await;
    let q = unique("reload-conc");
    broker.declare(&q).await;
    let work = Workdir::new();
    // max_workers above both, so that only the queue's own limit counts.
    let extra = "max_workers = 10";
    let mut sup = Supervisor::start(&work, &starting_queue(&q, 4, "2", extra), &[]);
    for i in 0..4 {
        broker.publish_id(&q, &format!("old{i}"), b"x").await;
    }
    wait_starts(&work, 4, Duration::from_secs(20)).await;
    work.write("config.toml", &starting_queue(&q, 2, "0", extra));
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload done", Duration::from_secs(10)).await;
    for i in 0..2 {
        broker.publish_id(&q, &format!("new{i}"), b"x").await;
    }
    work.wait_ledger(6, Duration::from_secs(20)).await;
    let runs = work.ledger();
    let mut old_ends: Vec<u128> = runs
        .iter()
        .filter(|r| r.id.starts_with("old"))
        .map(|r| r.end)
        .collect();
    old_ends.sort();
    // With 4 old workers running, concurrency 2 allows a new one only once
    // three of them have ended.
    for r in runs.iter().filter(|r| r.id.starts_with("new")) {
        assert!(
            r.start >= old_ends[2],
            "{} started while 2 or more old workers still ran",
            r.id
        );
    }
    assert_eq!(max_overlap(&runs), 4);
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // Ledger: 6 published = 6 done.
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

/// A queue removed by one reload and added again by the next, while its
/// worker still runs, keeps to its `concurrency`: the running job holds the
/// queue's slot across both reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_removed_and_added_again_keeps_its_concurrency() {
    let mut broker = Broker::connect().await;
    let (q, other) = (unique("readd"), unique("readd-other"));
    broker.declare(&q).await;
    broker.declare(&other).await;
    let work = Workdir::new();
    let with_q = starting_queue(&q, 1, "4", "");
    let without_q = starting_queue(&other, 1, "0", "");
    let mut sup = Supervisor::start(&work, &with_q, &[]);
    broker.publish_id(&q, "first", b"x").await;
    wait_starts(&work, 1, Duration::from_secs(20)).await;
    work.write("config.toml", &without_q);
    sup.signal(Signal::SIGHUP);
    sup.wait_log("queue removed", Duration::from_secs(10)).await;
    work.write("config.toml", &with_q);
    sup.signal(Signal::SIGHUP);
    sup.wait_log("queue added", Duration::from_secs(10)).await;
    broker.publish_id(&q, "second", b"x").await;
    work.wait_ledger(2, Duration::from_secs(30)).await;
    let runs = work.ledger();
    assert_eq!(
        max_overlap(&runs),
        1,
        "concurrency = 1 held across the reloads: {runs:?}"
    );
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // Ledger: 2 published = 2 done.
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

/// A reload that changes a queue's `arguments` in a way the broker refuses
/// for the existing queue keeps the consumer of the running settings, and
/// says which key to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_the_broker_refuses_keeps_the_old_consumer() {
    let mut broker = Broker::connect().await;
    let q = unique("reload-args");
    broker.declare(&q).await;
    let work = Workdir::new();
    let before = starting_queue(&q, 1, "0", "");
    let mut sup = Supervisor::start(&work, &before, &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    broker.publish_id(&q, "m1", b"x").await;
    work.wait_ledger(1, Duration::from_secs(20)).await;
    work.write(
        "config.toml",
        &format!("{before}[queue.arguments]\nx-max-length = 10\n"),
    );
    sup.signal(Signal::SIGHUP);
    sup.wait_log("keeps running", Duration::from_secs(20)).await;
    let log = sup.log_text();
    assert!(log.contains("key `arguments`"), "{}", tail(&log, 20));
    // The queue is still consumed.
    broker.publish_id(&q, "m2", b"x").await;
    work.wait_ledger(2, Duration::from_secs(20)).await;
    // A later reload back to the running settings changes nothing.
    work.write("config.toml", &before);
    sup.signal(Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.publish_id(&q, "m3", b"x").await;
    work.wait_ledger(3, Duration::from_secs(20)).await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // Ledger: 3 published = 3 done.
    assert_eq!(broker.count(&q).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_as_the_configured_user_with_limits() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches users and must run as root (CI does)"
    );
    let mut broker = Broker::connect().await;
    let q = unique("sandbox");
    broker.declare(&q).await;
    let work = Workdir::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    broker.publish_id(&q, "m", b"x").await;
    let config = format!(
        r#"
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "{{ id -un; id -u; ulimit -n; ulimit -v; nice; echo \"home=$HOME\"; id -G; env; }} > \"$RECORD_DIR/who\""]
user = "nobody"
max_open_files = 77
memory_limit = "1G"
nice = -3
"#
    );
    let mut sup = Supervisor::start(&work, &config, &["--max-jobs", "1"]);
    sup.wait_success(Duration::from_secs(20)).await;
    let who = std::fs::read_to_string(work.file("who")).unwrap();
    let lines: Vec<&str> = who.lines().collect();
    assert_eq!(lines[0], "nobody", "{who}");
    assert_eq!(lines[2], "77", "max_open_files: {who}");
    assert_eq!(
        lines[3],
        (1u64 << 20).to_string(),
        "memory_limit in KiB: {who}"
    );
    assert_eq!(
        lines[4], "-3",
        "nice below 0 works together with user: {who}"
    );
    assert!(
        !who.contains("AMQP_URL=") && !who.contains("guest:guest"),
        "{who}"
    );
    assert!(who.contains("USER=nobody"), "{who}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_error_rebuilds_only_that_queue() {
    let mut broker = Broker::connect().await;
    let a = unique("chan-a");
    let b = unique("chan-b");
    broker.owns(&a);
    broker.owns(&b);
    let work = Workdir::new();
    let w = repo("workers/testing/record.sh");
    let config = format!(
        "[[queue]]\nname = \"{a}\"\ncommand = [\"{w}\"]\n[[queue]]\nname = \"{b}\"\ncommand = [\"{w}\"]\n"
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("all queues started", Duration::from_secs(20))
        .await;
    // Deleting a queue under its consumer: the broker cancels that consumer.
    broker
        .channel
        .queue_delete(
            a.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    broker.publish_id(&b, "b1", b"x").await;
    sup.wait_log("reopening the channel", Duration::from_secs(10))
        .await;
    // The queue is declared again and consumed again.
    let start = Instant::now();
    while broker.count(&a).await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "queue {a} was not declared again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.publish_id(&a, "a1", b"x").await;
    work.wait_ledger(2, Duration::from_secs(20)).await;
    assert!(
        !sup.log_text().contains("connection lost"),
        "only the channel was rebuilt"
    );
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_connection_loss_kill_stops_running_workers() {
    let mut broker = Broker::connect().await;
    let q = unique("losskill");
    broker.declare(&q).await;
    let proxy = Proxy::start(&broker_addr()).await;
    let work = Workdir::new();
    let config = format!(
        "[broker]\nurl = \"{}\"\n[[queue]]\nname = \"{q}\"\non_connection_loss = \"kill\"\ncommand = [\"/bin/sh\", \"-c\", \"echo $$ >> \\\"$RECORD_DIR/pids\\\"; sleep 30\"]\n",
        url_via(proxy.port)
    );
    broker.publish_id(&q, "m", b"x").await;
    let mut sup = Supervisor::start_with_env(&work, &config, &[], &[("AMQP_URL", "")]);
    let start = Instant::now();
    while !work.file("pids").exists() {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first: i32 = std::fs::read_to_string(work.file("pids"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // A reload that changes the queue replaces its state while the worker
    // runs; the worker must still be stopped.
    work.write("config.toml", &format!("{config}kill_grace = \"2s\"\n"));
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload done", Duration::from_secs(10)).await;
    proxy.cut();
    let t = Instant::now();
    while running(first) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "worker not killed on connection loss"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The message is redelivered after the reconnect and runs again.
    let start = Instant::now();
    while std::fs::read_to_string(work.file("pids"))
        .unwrap()
        .lines()
        .count()
        < 2
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "message not redelivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The second signal stops the running worker at once; it must come after
    // the first was handled (signals sent back to back merge into one).
    sup.signal(Signal::SIGTERM);
    sup.wait_log("SIGTERM: stopping", Duration::from_secs(10))
        .await;
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.wait_count(&q, 1, Duration::from_secs(10)).await;
    broker.cleanup().await;
}
