//! Reading amqp-exec's `/metrics` page in tests.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `/metrics` at `port`, or None while nothing answers there.
pub fn metrics_page(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The value of the sample `name{labels}` (exactly as the page writes
/// it, e.g. `amqp_exec_jobs_total{queue="q",outcome="ok"}`) on `page`.
pub fn sample(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Scrapes `port` until `ready` holds for the page, and returns that page;
/// fails the test after `timeout` with the last page and `what`.
pub async fn wait_page(
    port: u16,
    what: &str,
    timeout: Duration,
    ready: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let page = metrics_page(port).unwrap_or_default();
        if ready(&page) {
            return page;
        }
        assert!(
            start.elapsed() < timeout,
            "metrics never showed {what} within {timeout:?}:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every metric name the page exports: each family's name from its
/// `# TYPE` line (a histogram's `_bucket`, `_sum` and `_count` instead),
/// and the name of each sample.
pub fn metric_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            } else {
                names.insert(name.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}
