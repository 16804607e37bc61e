//! A resource alarm on the broker. While the broker blocks the supervisor's
//! connection nothing it sends gets through, acks and nacks included; a
//! shutdown must still end, and every message must still be there after.
//!
//! The test raises the broker's memory alarm, which blocks every publisher
//! on the broker, so it lives in a test binary of its own: test binaries run
//! one after another. It needs `rabbitmqctl` for the broker under test.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

fn alarms() -> String {
    rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."])
}

/// The broker's memory alarm, raised by lowering its memory watermark;
/// cleared again when dropped, by a failed test too.
struct MemoryAlarm {
    restore: Vec<String>,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        // A fraction such as 0.4, or {absolute,Bytes}.
        let restore = match current.strip_prefix("{absolute,") {
            Some(rest) => vec!["absolute".to_owned(), rest.trim_end_matches('}').to_owned()],
            None => vec![current],
        };
        // From here on, dropping it restores the watermark.
        let alarm = MemoryAlarm { restore };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
        let start = Instant::now();
        while !alarms().contains("memory") {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the memory alarm did not go off"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        alarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        // No panics here (a failed test unwinds through it): try for a while.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let restored = rabbitmqctl_command()
                .arg("set_vm_memory_high_watermark")
                .args(&self.restore)
                .status()
                .is_ok_and(|s| s.success());
            let cleared = rabbitmqctl_command()
                .args(["eval", "rabbit_alarm:get_alarms()."])
                .output()
                .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("memory"));
            if restored && cleared {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "could not clear the broker's memory alarm: run rabbitmqctl set_vm_memory_high_watermark {}",
            self.restore.join(" ")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_while_the_broker_blocks_the_connection_and_loses_nothing() {
    let mut broker = Broker::connect().await;
    let q = unique("alarm");
    broker.declare(&q).await;
    for id in ["a", "b", "c"] {
        broker.publish_id(&q, id, b"x").await;
    }
    let work = Workdir::new();
    // One worker, three deliveries: the first job fails and its retry is a
    // publish, which makes the broker block the connection; the other two
    // wait, prefetched.
    let config = format!(
        r#"shutdown_grace = "1s"
[[queue]]
name = "{q}"
command = ["/bin/sh", "-c", "echo \"$AMQP_EXEC_MESSAGE_ID\" >> \"$RECORD_DIR/starts\"; exit 75"]
prefetch = 3
backoff = ["30m"]
"#
    );
    let alarm = MemoryAlarm::raise();
    let mut sup = Supervisor::start(&work, &config, &[]);
    sup.wait_log("the broker blocked publishing", Duration::from_secs(20))
        .await;
    let t = Instant::now();
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(40)).await;
    let took = t.elapsed();
    assert!(status.success(), "exit status {status}");
    // About 10 s: 5 s to hand back the prefetched messages, then 5 s for
    // the job stuck settling once the 1 s grace ran out.
    assert!(
        took < Duration::from_secs(20),
        "stopping took {took:?}; log:\n{}",
        tail(&sup.log_text(), 30)
    );
    drop(alarm);

    // Ledger: the unacked deliveries are back in the queue. The retry of the
    // first may have reached the broker before it blocked the connection: then
    // that message is there twice (at least once, never lost).
    // The broker reads the closed socket only once the alarm is over, so the
    // deliveries come back a moment later.
    let retry = format!("{q}.retry.30m");
    let mut ids: Vec<String> = Vec::new();
    let start = Instant::now();
    while ids.len() < 3 && start.elapsed() < Duration::from_secs(20) {
        ids.extend(broker.drain(&q).await.iter().map(message_id));
        ids.extend(broker.drain(&retry).await.iter().map(message_id));
        ids.sort();
        ids.dedup();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ids, ["a", "b", "c"], "every message is still there");
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}
