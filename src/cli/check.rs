//! `amqp-exec check`: the config is valid, every command can be started,
//! the `OTEL_*` variables are, and the broker answers, with the queues that
//! `declare = false` needs.

use super::session::*;
use super::{EX_UNAVAILABLE, Failure};
use crate::config::{self, Config};
use crate::{broker, consumer};
use std::time::Duration;

/// `amqp-exec check`: the config is valid, every command can be started, and
/// the broker answers. Prints one line per finding.
/// The queues a queue's jobs use: the work queue, its dead-letter queue, and
/// the retry queues of the delays its attempts can reach.
fn queues_used(q: &config::QueueConfig) -> Vec<String> {
    let retries = (q.policy.max_attempts as usize - 1).min(q.policy.backoff.len());
    let delays: std::collections::BTreeSet<Duration> =
        q.policy.backoff[..retries].iter().copied().collect();
    [q.name.clone(), q.dead_queue()]
        .into_iter()
        .chain(delays.into_iter().map(|d| q.retry_queue(d)))
        .collect()
}

pub async fn check(cfg: &Config) -> Result<(), Failure> {
    let mut problems = 0;
    println!(
        "config {}: ok ({} queue(s))",
        cfg.file.display(),
        cfg.queues.len()
    );
    for q in &cfg.queues {
        match consumer::command_available(q) {
            Ok(p) => println!("queue \"{}\": command {} ok", q.name, p.display()),
            Err(e) => {
                println!("queue \"{}\": error: {e}", q.name);
                problems += 1;
            }
        }
    }
    match crate::trace::export::resolve(&cfg.tracing, |k| std::env::var(k).ok()) {
        Ok(Some(s)) => println!("tracing: spans go to {}", s.url),
        Ok(None) => {}
        Err(e) => {
            println!("tracing: error: {e}");
            problems += 1;
        }
    }
    let mut broker_ok = true;
    match open(&cfg.broker, "check").await {
        Ok(session) => {
            println!("broker: connected");
            for q in cfg.queues.iter().filter(|q| !q.declare) {
                for name in queues_used(q) {
                    // Each on a channel of its own: a missing queue closes it.
                    let ch = match session.lost.race(channel_on(&session.conn)).await? {
                        Ok(ch) => ch,
                        Err(_) => session.channel.clone(),
                    };
                    if let Err(e) = session.lost.race(broker::queue_depth(&ch, &name)).await? {
                        println!(
                            "queue \"{}\": error: declare = false but \"{name}\" is not usable: {e}",
                            q.name
                        );
                        problems += 1;
                    }
                }
            }
            session.close().await;
        }
        Err(e) => {
            println!("broker: error: {}", e.message);
            problems += 1;
            broker_ok = false;
        }
    }
    if problems == 0 {
        println!("all good");
        Ok(())
    } else if problems == 1 && !broker_ok {
        Err(Failure::new(EX_UNAVAILABLE, "the broker is unreachable"))
    } else {
        Err(Failure::new(1, format!("{problems} problem(s) found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_looks_at_the_retry_queues_attempts_can_reach() {
        let cfg = config::parse(
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nmax_attempts = 3\nbackoff = [\"1s\", \"5s\", \"1m\"]\n\
             [[queue]]\nname = \"b\"\ncommand = [\"x\"]\nmax_attempts = 1\n\
             [[queue]]\nname = \"c\"\ncommand = [\"x\"]\nmax_attempts = 9\nbackoff = [\"2s\"]\n",
            std::path::Path::new("c.toml"),
            None,
        )
        .unwrap();
        assert_eq!(
            queues_used(&cfg.queues[0]),
            ["a", "a.dead", "a.retry.1s", "a.retry.5s"]
        );
        assert_eq!(queues_used(&cfg.queues[1]), ["b", "b.dead"]);
        assert_eq!(queues_used(&cfg.queues[2]), ["c", "c.dead", "c.retry.2s"]);
    }
}
