//! The zero-loss ledger run: 20,000 messages with unique ids through the real
//! supervisor while faults are injected — worker crashes and hangs, two
//! broker restarts, all connections cut, the supervisor SIGKILLed and
//! SIGTERMed — then a reconciliation: every id processed or, if built to
//! fail, dead-lettered; nothing lost; all queues empty; no stray process.
//!
//! The broker restarts use `rabbitmqctl stop_app`/`start_app` on the
//! machine's broker, so this file holds this one test only (cargo runs test
//! binaries one after another), and a guard starts the app again whatever
//! happens.

mod common;

use common::proxy::{Proxy, broker_addr, url_via};
use common::*;
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const MESSAGES: usize = 20_000;
/// Every id divisible by this is built to fail for good (exit 65).
const POISON_EVERY: usize = 997;
const MARK: &str = "AMQP_EXEC_LEDGER_TEST";

/// Runs the unit worker's faults: ~5% crash (random exit code or SIGKILL),
/// ~0.5% hang past the timeout, poison bodies exit 65; the others append
/// their id to the ledger (O_APPEND) and succeed. The pid stands in for a
/// random number, so a retried message gets a fresh draw.
const WORKER: &str = r#"#!/bin/sh
body=$(cat)
if [ "$body" = poison ]; then echo "poison message $AMQP_EXEC_MESSAGE_ID" >&2; exit 65; fi
r=$(( $$ % 1000 ))
if [ $r -lt 25 ]; then echo "crash" >&2; exit $(( r % 60 + 1 )); fi
if [ $r -lt 50 ]; then kill -9 $$; fi
if [ $r -lt 55 ]; then sleep 6; fi
echo "$AMQP_EXEC_MESSAGE_ID" >> "$LEDGER"
"#;

/// Starts the broker app again when dropped, so that a failed test leaves
/// the machine's broker running.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
    }
}

fn rabbitmqctl(args: &[&str]) -> bool {
    rabbitmqctl_command()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

async fn restart_broker() {
    assert!(rabbitmqctl(&["stop_app"]), "rabbitmqctl stop_app failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rabbitmqctl(&["start_app"]), "rabbitmqctl start_app failed");
    assert!(rabbitmqctl(&["await_startup"]));
}

fn ledger_ids(work: &Workdir) -> Vec<String> {
    std::fs::read_to_string(work.file("ledger"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Pids of live processes that carry the test's marker in their environment.
fn marked_processes() -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
            && env
                .split(|b| *b == 0)
                .any(|v| v.starts_with(MARK.as_bytes()))
            && running(pid)
        {
            out.push(pid);
        }
    }
    out
}

fn zombies_of(parent: i32) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let zombie = status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'));
            let child = status.lines().any(|l| {
                l.starts_with("PPid:") && l.split_whitespace().nth(1) == Some(&parent.to_string())
            });
            if zombie && child {
                n += 1;
            }
        }
    }
    n
}

async fn wait_progress(work: &Workdir, n: usize) {
    let start = Instant::now();
    while BTreeSet::from_iter(ledger_ids(work)).len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "stalled at {} of {n} processed",
            BTreeSet::from_iter(ledger_ids(work)).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_loss_under_faults() {
    let _guard = BrokerGuard;
    let t0 = Instant::now();
    let mut broker = Broker::connect().await;
    let q = unique("ledger");
    broker.declare(&q).await;
    let work = Workdir::new();
    let worker = work.script("worker.sh", WORKER);
    let proxy = Proxy::start(&broker_addr()).await;
    let config = format!(
        r#"
shutdown_grace = "3s"
[broker]
url = "{url}"
heartbeat = "5s"
[[queue]]
name = "{q}"
command = ["{worker}"]
concurrency = 8
timeout = "2s"
kill_grace = "500ms"
max_attempts = 12
backoff = ["100ms", "300ms"]
[queue.env]
LEDGER = "{ledger}"
{MARK} = "1"
"#,
        url = url_via(proxy.port),
        worker = worker.display(),
        ledger = work.file("ledger").display(),
    );

    // Publish the ids; every POISON_EVERY-th is built to fail.
    let mut poison = BTreeSet::new();
    let mut messages = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let id = format!("id-{i}");
        let body: &[u8] = if i % POISON_EVERY == POISON_EVERY - 1 {
            poison.insert(id.clone());
            b"poison"
        } else {
            b"work"
        };
        messages.push((id, body.to_vec()));
    }
    broker.publish_many(&q, &messages).await;
    println!(
        "published {MESSAGES} messages in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let env = [("AMQP_URL", ""), ("RUST_LOG", "warn")];
    let mut sup = Supervisor::start_with_env(&work, &config, &[], &env);
    let mut faults = Vec::new();

    wait_progress(&work, MESSAGES / 10).await;
    proxy.cut();
    faults.push("all connections cut");

    wait_progress(&work, MESSAGES * 2 / 10).await;
    restart_broker().await;
    faults.push("broker restart");

    wait_progress(&work, MESSAGES * 35 / 100).await;
    sup.signal(Signal::SIGKILL);
    sup.wait_exit(Duration::from_secs(10)).await;
    sup = Supervisor::start_with_env(&work, &config, &[], &env);
    faults.push("supervisor SIGKILL + restart");

    wait_progress(&work, MESSAGES / 2).await;
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "SIGTERM exit status {status}");
    sup = Supervisor::start_with_env(&work, &config, &[], &env);
    faults.push("supervisor SIGTERM + restart");

    wait_progress(&work, MESSAGES * 65 / 100).await;
    restart_broker().await;
    faults.push("broker restart");

    // Let it finish: every id processed or dead.
    let broker2 = Broker::connect().await;
    let dead_q = format!("{q}.dead");
    let start = Instant::now();
    loop {
        let done = BTreeSet::from_iter(ledger_ids(&work)).len();
        let dead = broker2.count(&dead_q).await.unwrap_or(0) as usize;
        if done + dead >= MESSAGES {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "only {done} processed + {dead} dead of {MESSAGES}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        zombies_of(sup.pid()),
        0,
        "zombie workers under the supervisor"
    );
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "final exit status {status}");

    // Reconcile.
    let lines = ledger_ids(&work);
    let processed: BTreeSet<String> = lines.iter().cloned().collect();
    let dead: BTreeSet<String> = broker2
        .drain(&dead_q)
        .await
        .iter()
        .map(message_id)
        .collect();
    let all: BTreeSet<String> = (0..MESSAGES).map(|i| format!("id-{i}")).collect();
    let missing: Vec<&String> = all
        .difference(&processed)
        .filter(|id| !dead.contains(*id))
        .collect();
    let duplicates = lines.len() - processed.len();
    let log = std::fs::read_to_string(&sup.log).unwrap_or_default();
    println!(
        "ledger run: {MESSAGES} messages, faults: {}; {} processed, {} dead, {} missing, {duplicates} duplicate run(s), {:.1}s",
        faults.join(", "),
        processed.len(),
        dead.len(),
        missing.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        missing.is_empty(),
        "missing ids: {:?}",
        &missing[..missing.len().min(20)]
    );
    assert_eq!(dead, poison, "exactly the poison ids are dead");
    assert!(processed.is_disjoint(&poison), "a poison id was processed");
    assert!(
        duplicates <= faults.len() * 2 * 8,
        "{duplicates} duplicates: more than the jobs in flight at the faults"
    );
    for name in [
        q.clone(),
        format!("{q}.retry.100ms"),
        format!("{q}.retry.300ms"),
    ] {
        assert_eq!(
            broker2.count(&name).await,
            Some(0),
            "queue {name} is not empty"
        );
    }
    // Workers orphaned by the SIGKILL finish within their own time.
    let start = Instant::now();
    while !marked_processes().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "stray worker processes: {:?}",
            marked_processes()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!log.contains("panicked"), "{}", tail(&log, 30));
    drop(broker2);
    // Its connection died with the broker restarts; dropping it deletes the
    // test's queues over a new one.
    drop(broker);
}
