//! Metrics: per-queue job outcomes, exit statuses, running workers, job
//! durations and connection events, kept as atomic counters; rendered in the
//! Prometheus text format on `/metrics` (with `/healthz` beside it) when
//! `[metrics] listen` is set. They also feed the systemd STATUS line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bounds (seconds) of the job-duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Per-queue counters. All updates are relaxed atomics: they are figures, not
/// synchronisation.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Workers running now: the one count of them, kept by
    /// [`RunningWorker`]s (the supervisor's total is the sum over queues).
    pub running: AtomicU64,
    /// Jobs whose worker succeeded and whose message was acked.
    pub ok: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub requeued: AtomicU64,
    pub dropped: AtomicU64,
    pub spawn_failures: AtomicU64,
    /// Jobs whose outcome could not be recorded (ack or republish failed); the
    /// broker redelivers them.
    pub unsettled: AtomicU64,
    /// Messages whose `reply_to` got no reply: refused by `replies`.
    pub refused_replies: AtomicU64,
    /// Messages with control headers whose signature did not verify.
    pub forged_headers: AtomicU64,
    /// Finished runs by exit label ("0", "75", "SIGKILL", "timeout", ...).
    exits: Mutex<BTreeMap<String, u64>>,
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    duration_count: AtomicU64,
    duration_micros: AtomicU64,
}

/// A worker counted as running in its queue's [`QueueStats::running`], from
/// before its job is spawned until the worker is gone (or was never
/// started); dropping it ends the count.
#[derive(Debug)]
pub struct RunningWorker(Arc<QueueStats>);

impl Drop for RunningWorker {
    fn drop(&mut self) {
        dec(&self.0.running);
    }
}

impl QueueStats {
    /// Counts a worker as running until the returned guard is dropped.
    pub fn worker_starting(self: &Arc<Self>) -> RunningWorker {
        inc(&self.running);
        RunningWorker(self.clone())
    }

    pub fn count_exit(&self, label: String) {
        *self
            .exits
            .lock()
            .expect("not poisoned")
            .entry(label)
            .or_default() += 1;
    }

    pub fn exits(&self) -> BTreeMap<String, u64> {
        self.exits.lock().expect("not poisoned").clone()
    }

    pub fn observe_duration(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Relaxed);
                break;
            }
        }
        self.duration_count.fetch_add(1, Relaxed);
        self.duration_micros
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Cumulative bucket counts, total count and sum in seconds.
    pub fn durations(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Relaxed);
                acc
            })
            .collect();
        (
            cumulative,
            self.duration_count.load(Relaxed),
            self.duration_micros.load(Relaxed) as f64 / 1e6,
        )
    }
}

/// One configured queue, as the metrics page and systemd's status line see
/// it.
pub struct QueueView {
    pub name: std::sync::Arc<str>,
    pub concurrency: usize,
    pub stats: std::sync::Arc<QueueStats>,
}

/// The queues configured now, read on every request.
pub type Queues = std::sync::Arc<dyn Fn() -> Vec<QueueView> + Send + Sync>;

/// Supervisor-wide counters.
#[derive(Debug, Default)]
pub struct GlobalStats {
    pub reconnects: AtomicU64,
    pub connected: AtomicU64,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Relaxed);
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `/metrics` page.
pub fn render(queues: &[QueueView], global: &GlobalStats) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_queue = |f: &dyn Fn(&QueueStats) -> u64| -> Vec<(String, String)> {
        queues
            .iter()
            .map(|q| {
                (
                    format!("{{queue=\"{}\"}}", label(&q.name)),
                    f(&q.stats).to_string(),
                )
            })
            .collect()
    };
    let mut jobs = Vec::new();
    for q in queues {
        for (outcome, c) in [
            ("ok", &q.stats.ok),
            ("retried", &q.stats.retried),
            ("dead", &q.stats.dead),
            ("requeued", &q.stats.requeued),
            ("dropped", &q.stats.dropped),
            ("unsettled", &q.stats.unsettled),
        ] {
            jobs.push((
                format!("{{queue=\"{}\",outcome=\"{outcome}\"}}", label(&q.name)),
                get(c).to_string(),
            ));
        }
    }
    family(
        "amqp_exec_jobs_total",
        "counter",
        "Jobs by queue and outcome.",
        jobs,
    );
    let mut exits = Vec::new();
    for q in queues {
        for (code, n) in q.stats.exits() {
            exits.push((
                format!("{{queue=\"{}\",exit=\"{}\"}}", label(&q.name), label(&code)),
                n.to_string(),
            ));
        }
    }
    family(
        "amqp_exec_worker_exits_total",
        "counter",
        "Finished workers by exit status, signal, or timeout.",
        exits,
    );
    family(
        "amqp_exec_running_workers",
        "gauge",
        "Workers running now.",
        per_queue(&|s| get(&s.running)),
    );
    family(
        "amqp_exec_spawn_failures_total",
        "counter",
        "Workers that could not be started.",
        per_queue(&|s| get(&s.spawn_failures)),
    );
    family(
        "amqp_exec_refused_replies_total",
        "counter",
        "Messages whose reply_to got no reply: not allowed by the queue's replies setting.",
        per_queue(&|s| get(&s.refused_replies)),
    );
    family(
        "amqp_exec_forged_headers_total",
        "counter",
        "Messages whose amqp-exec control headers had no valid signature, and were ignored.",
        per_queue(&|s| get(&s.forged_headers)),
    );
    family(
        "amqp_exec_retries_total",
        "counter",
        "Messages republished to a retry queue.",
        per_queue(&|s| get(&s.retried)),
    );
    family(
        "amqp_exec_dead_letters_total",
        "counter",
        "Messages republished to the dead-letter queue.",
        per_queue(&|s| get(&s.dead)),
    );
    let mut hist = Vec::new();
    for q in queues {
        let (buckets, count, sum) = q.stats.durations();
        let name = label(&q.name);
        for (bound, n) in DURATION_BUCKETS.iter().zip(buckets) {
            hist.push((
                format!("_bucket{{queue=\"{name}\",le=\"{bound}\"}}"),
                n.to_string(),
            ));
        }
        hist.push((
            format!("_bucket{{queue=\"{name}\",le=\"+Inf\"}}"),
            count.to_string(),
        ));
        hist.push((format!("_sum{{queue=\"{name}\"}}"), format!("{sum}")));
        hist.push((format!("_count{{queue=\"{name}\"}}"), count.to_string()));
    }
    family(
        "amqp_exec_job_duration_seconds",
        "histogram",
        "Wall time of worker runs.",
        hist,
    );
    family(
        "amqp_exec_reconnects_total",
        "counter",
        "Broker reconnections after a lost connection.",
        vec![(String::new(), get(&global.reconnects).to_string())],
    );
    family(
        "amqp_exec_connected",
        "gauge",
        "1 while connected to the broker.",
        vec![(String::new(), get(&global.connected).to_string())],
    );
    out
}

/// Most scrapes answered at once; further connections wait in the kernel's
/// backlog.
const CONNECTIONS_MAX: usize = 64;
/// Time allowed for reading a request and writing its answer.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves `/metrics` and `/healthz` until the process ends.
pub async fn serve(
    addr: std::net::SocketAddr,
    queues: Queues,
    global: Arc<GlobalStats>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("[metrics] cannot listen on {addr}: {e}"))?;
    tracing::info!("metrics on http://{addr}/metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: do not spin on it.
                    tracing::debug!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (queues, global) = (queues.clone(), global.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let answering = answer(&mut stream, &queues, &global);
                let _ = tokio::time::timeout(REQUEST_LIMIT, answering).await;
            });
        }
    });
    Ok(())
}

/// True once `request` holds the blank line that ends its headers, with
/// CRLF line ends or bare LF ones (which HTTP lets a server accept, and
/// which `printf 'GET /metrics\n\n' | nc` sends).
fn headers_end(request: &[u8]) -> bool {
    request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n")
}

/// Reads one request and writes its answer.
async fn answer(stream: &mut tokio::net::TcpStream, queues: &Queues, global: &GlobalStats) {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
        if headers_end(&buf[..len]) {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, kind, body) = match path.split('?').next().unwrap_or("") {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            render(&queues(), global),
        ),
        "/healthz" if get(&global.connected) == 1 => ("200 OK", "text/plain", "ok\n".to_owned()),
        "/healthz" => (
            "503 Service Unavailable",
            "text/plain",
            "not connected to the broker\n".to_owned(),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_end_at_a_blank_line_with_either_line_end() {
        assert!(headers_end(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(headers_end(b"GET /metrics HTTP/1.1\nHost: x\n\n"));
        assert!(headers_end(b"GET /metrics\n\n"));
        assert!(!headers_end(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"));
        assert!(!headers_end(b"GET /metrics HTTP/1.1\n"));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histogram_is_cumulative() {
        let s = QueueStats::default();
        s.observe_duration(Duration::from_millis(1));
        s.observe_duration(Duration::from_millis(300));
        s.observe_duration(Duration::from_secs(100));
        let (b, n, sum) = s.durations();
        assert_eq!(b[0], 1);
        assert_eq!(b[6], 2);
        assert_eq!(*b.last().unwrap(), 2);
        assert_eq!(n, 3);
        assert!((sum - 100.301).abs() < 1e-6);
    }
}
