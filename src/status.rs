//! The status page: what each queue is doing, the jobs running now and the
//! recent failures and dead letters, served on the metrics listener as
//! `/status` (HTML that refreshes itself) and `/status.json` (the same as
//! JSON, which `amqp-exec status` reads).
//!
//! The [`Report`] is built from the shared state ([`snapshot`]) and
//! rendered by pure functions. Message ids, reasons and stderr come from
//! publishers and workers: they are cut to bounded lengths, HTML-escaped on
//! the page, and the stderr shown follows `[metrics] status_stderr`.
//! Message bodies are never shown.

use crate::config::StatusStderr;
use crate::metrics::{self, Page, Pages};
use crate::state::Shared;
use crate::state::activity::{self, ConsumerState, JOB_ENDS, RATE_WINDOW_SECS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

/// Most running jobs listed; the report says how many there are in all.
pub const MAX_JOBS_LISTED: usize = 500;
/// Seconds between the page's own refreshes.
pub const REFRESH_SECS: u32 = 5;
/// Longest stderr line shown with `status_stderr = "line"`, in characters.
const STDERR_LINE_CHARS: usize = 200;

/// Everything the status page shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// amqp-exec's version.
    pub version: String,
    /// When the report was made (RFC 3339, UTC).
    pub generated_at: String,
    /// Whether the supervisor is connected to the broker.
    pub connected: bool,
    /// Whether it is shutting down.
    pub stopping: bool,
    /// The window of the rates, in seconds.
    pub rate_window_secs: u64,
    pub queues: Vec<QueueReport>,
    /// Jobs in progress, in all.
    pub running_count: usize,
    /// The oldest [`MAX_JOBS_LISTED`] of them, oldest first.
    pub running: Vec<RunningReport>,
}

/// One configured queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueReport {
    pub name: String,
    /// "consuming", "paused", "channel-error", "starting", "connecting" or
    /// "stopping".
    pub state: String,
    /// Why it is paused, or its channel error.
    pub reason: Option<String>,
    /// Since when it is in this state (RFC 3339), and for how long.
    pub since: String,
    pub since_secs: f64,
    /// Jobs in progress.
    pub busy: usize,
    /// Its `concurrency`.
    pub concurrency: usize,
    /// Jobs per second over the window, by how they ended ("ok", "retried",
    /// "dead", "requeued", "dropped", "unsettled").
    pub rates: BTreeMap<String, f64>,
    /// Jobs since the supervisor started, by how they ended.
    pub totals: BTreeMap<String, u64>,
    pub last_failure: Option<FailureReport>,
    pub dead_letters: DeadLetters,
}

/// A queue's last failed run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureReport {
    pub at: String,
    pub ago_secs: f64,
    pub message_id: String,
    pub attempt: u32,
    /// The exit code, signal name ("SIGKILL"), or "timeout", "spawn", ...
    pub exit: String,
    /// The end of its stderr as `status_stderr` allows (or why it could
    /// not start); None when not shown.
    pub stderr: Option<String>,
}

/// A queue's dead letters since the supervisor started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetters {
    pub count: u64,
    /// The newest few, newest first.
    pub recent: Vec<DeadLetterReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterReport {
    pub at: String,
    pub ago_secs: f64,
    pub message_id: String,
    pub attempt: u32,
    pub why: String,
}

/// One job in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningReport {
    pub queue: String,
    pub message_id: String,
    pub attempt: u32,
    /// Its worker's pid, once started.
    pub pid: Option<u32>,
    /// "starting", "running" (its worker runs) or "settling".
    pub phase: String,
    pub started_at: String,
    pub running_secs: f64,
    pub timeout_secs: f64,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ago(now: SystemTime, t: SystemTime) -> f64 {
    now.duration_since(t).unwrap_or_default().as_secs_f64()
}

/// The part of a failed worker's stderr that `policy` lets the page show.
pub fn shown_stderr(tail: &[u8], policy: StatusStderr) -> Option<String> {
    let text = String::from_utf8_lossy(tail);
    match policy {
        StatusStderr::Off => None,
        StatusStderr::Line => text
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .map(|l| activity::bounded(l.trim_end(), STDERR_LINE_CHARS)),
        StatusStderr::Tail => Some(text.into_owned()),
    }
}

/// The report of the supervisor's state now.
pub fn snapshot(shared: &Shared, stderr: StatusStderr) -> Report {
    let now = SystemTime::now();
    let connected = metrics::get(&shared.stats.connected) == 1;
    let stopping = shared.drain.stop.is_cancelled();
    let jobs = shared.activity.running();
    let mut busy: BTreeMap<&str, usize> = BTreeMap::new();
    for j in &jobs {
        *busy.entry(&j.queue).or_default() += 1;
    }
    let queues = shared
        .registry
        .queues()
        .iter()
        .map(|q| {
            let (recent, second) = q.activity.read();
            let (state, reason) = match recent.state {
                _ if stopping => ("stopping", None),
                _ if !connected => ("connecting", None),
                ConsumerState::Starting => ("starting", None),
                ConsumerState::Consuming => ("consuming", None),
                ConsumerState::Paused(why) => ("paused", Some(why)),
                ConsumerState::ChannelError(why) => ("channel-error", Some(why)),
            };
            let s = &q.stats;
            let counters = [
                &s.ok,
                &s.retried,
                &s.dead,
                &s.requeued,
                &s.dropped,
                &s.unsettled,
            ];
            QueueReport {
                name: q.name.to_string(),
                state: state.to_owned(),
                reason,
                since: rfc3339(recent.since),
                since_secs: ago(now, recent.since),
                busy: busy.get(&*q.name).copied().unwrap_or(0),
                concurrency: q.cfg.concurrency,
                rates: JOB_ENDS
                    .iter()
                    .zip(recent.rates.per_second(second))
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                totals: JOB_ENDS
                    .iter()
                    .zip(counters)
                    .map(|(k, c)| (k.to_string(), metrics::get(c)))
                    .collect(),
                last_failure: recent.last_failure.map(|f| FailureReport {
                    at: rfc3339(f.at),
                    ago_secs: ago(now, f.at),
                    message_id: f.message_id,
                    attempt: f.attempt,
                    exit: f.exit,
                    stderr: shown_stderr(&f.stderr_tail, stderr),
                }),
                dead_letters: DeadLetters {
                    count: metrics::get(&s.dead),
                    recent: recent
                        .dead
                        .into_iter()
                        .map(|d| DeadLetterReport {
                            at: rfc3339(d.at),
                            ago_secs: ago(now, d.at),
                            message_id: d.message_id,
                            attempt: d.attempt,
                            why: d.why,
                        })
                        .collect(),
                },
            }
        })
        .collect();
    Report {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        generated_at: rfc3339(now),
        connected,
        stopping,
        rate_window_secs: RATE_WINDOW_SECS,
        queues,
        running_count: jobs.len(),
        running: jobs
            .iter()
            .take(MAX_JOBS_LISTED)
            .map(|j| {
                let pid = j.pid.load(Ordering::Relaxed);
                RunningReport {
                    queue: j.queue.to_string(),
                    message_id: j.message_id.to_string(),
                    attempt: j.attempt,
                    pid: (pid != 0).then_some(pid),
                    phase: if j.settling.load(Ordering::Relaxed) {
                        "settling"
                    } else if pid != 0 {
                        "running"
                    } else {
                        "starting"
                    }
                    .to_owned(),
                    started_at: rfc3339(now.checked_sub(j.started.elapsed()).unwrap_or(now)),
                    running_secs: j.started.elapsed().as_secs_f64(),
                    timeout_secs: j.timeout.as_secs_f64(),
                }
            })
            .collect(),
    }
}

/// `/status` and `/status.json` for the metrics listener.
pub fn pages(shared: Arc<Shared>, stderr: StatusStderr) -> Pages {
    Arc::new(move |path| match path {
        "/status" => Some(Page {
            kind: "text/html; charset=utf-8",
            body: render_html(&snapshot(&shared, stderr)),
        }),
        "/status.json" => Some(Page {
            kind: "application/json",
            body: serde_json::to_string_pretty(&snapshot(&shared, stderr))
                .expect("a report serializes"),
        }),
        _ => None,
    })
}

/// `text` with the characters HTML gives a meaning escaped; control
/// characters other than line ends are shown as U+FFFD.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A message id for the page; a message without one says so.
fn message_id_html(id: &str) -> String {
    if id.is_empty() {
        "<span class=\"muted\">(no id)</span>".to_owned()
    } else {
        escape(id)
    }
}

/// A duration in seconds as "4.2s", "3m 12s", "2h 5m".
pub fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 && s % 60.0 < 1.0 {
        format!("{}m", (s / 60.0) as u64)
    } else if s < 3600.0 {
        format!("{}m {}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h {}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

/// A queue's rates as "0.50/s ok, 0.02/s dead", leaving out those at zero.
pub fn rates_text(rates: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = JOB_ENDS
        .iter()
        .filter_map(|k| {
            rates
                .get(*k)
                .filter(|r| **r > 0.0)
                .map(|r| format!("{r:.2}/s {k}"))
        })
        .collect();
    if parts.is_empty() {
        "idle".to_owned()
    } else {
        parts.join(", ")
    }
}

/// A queue's totals as "25 ok, 1 dead", leaving out those at zero; "none"
/// when all are.
pub fn totals_text(totals: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = JOB_ENDS
        .iter()
        .filter_map(|k| {
            totals
                .get(*k)
                .filter(|n| **n > 0)
                .map(|n| format!("{n} {k}"))
        })
        .collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin-bottom:1.5em}\
th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#eee}pre{margin:0;white-space:pre-wrap;max-width:60em}\
.consuming{color:#170}.paused,.channel-error,.connecting{color:#b00;font-weight:bold}\
.starting,.stopping{color:#a60}.muted{color:#777}";

/// The HTML page of `report`: no script, every text escaped.
pub fn render_html(report: &Report) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>amqp-exec status</title><style>{STYLE}</style></head><body>\n\
         <h1>amqp-exec status</h1>\n<p>amqp-exec {} &middot; {} &middot; {} &middot; refreshed every {REFRESH_SECS}s</p>\n",
        escape(&report.version),
        if report.stopping {
            "<span class=\"stopping\">stopping</span>"
        } else if report.connected {
            "<span class=\"consuming\">connected</span>"
        } else {
            "<span class=\"connecting\">not connected</span>"
        },
        escape(&report.generated_at),
    );

    h.push_str(
        "<h2>Queues</h2>\n<table id=\"queues\"><tr><th>Queue</th><th>State</th><th>Jobs / concurrency</th>",
    );
    let _ = writeln!(
        h,
        "<th>Rates (last {}s)</th><th>Totals since start</th><th>Last failure</th><th>Dead letters</th></tr>",
        report.rate_window_secs
    );
    for q in &report.queues {
        let mut state = format!(
            "<span class=\"{0}\">{0}</span> <span class=\"muted\" title=\"since {1}\">for {2}</span>",
            escape(&q.state),
            escape(&q.since),
            human_secs(q.since_secs)
        );
        if let Some(why) = &q.reason {
            let _ = write!(state, "<br><span class=\"reason\">{}</span>", escape(why));
        }
        let failure = match &q.last_failure {
            None => "<span class=\"muted\">none</span>".to_owned(),
            Some(f) => format!(
                "exit <b>{}</b>, <span title=\"{}\">{} ago</span><br>message {} attempt {}{}",
                escape(&f.exit),
                escape(&f.at),
                human_secs(f.ago_secs),
                message_id_html(&f.message_id),
                f.attempt,
                f.stderr
                    .as_deref()
                    .map(|s| format!("<pre class=\"stderr\">{}</pre>", escape(s)))
                    .unwrap_or_default()
            ),
        };
        let dead = match q.dead_letters.recent.first() {
            None => format!("{}", q.dead_letters.count),
            Some(d) => format!(
                "{} &middot; newest <span title=\"{}\">{} ago</span>:<br>message {} attempt {}: {}",
                q.dead_letters.count,
                escape(&d.at),
                human_secs(d.ago_secs),
                message_id_html(&d.message_id),
                d.attempt,
                escape(&d.why)
            ),
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{state}</td><td>{} / {}</td>\
             <td>{}</td><td>{}</td><td>{failure}</td><td>{dead}</td></tr>",
            escape(&q.name),
            q.busy,
            q.concurrency,
            rates_text(&q.rates),
            totals_text(&q.totals),
        );
    }
    h.push_str("</table>\n");

    let _ = writeln!(h, "<h2>Running jobs ({})</h2>", report.running_count);
    if report.running.is_empty() {
        h.push_str("<p class=\"muted\">No job is running.</p>\n");
    } else {
        h.push_str(
            "<table id=\"running\"><tr><th>Queue</th><th>Message id</th><th>Attempt</th>\
             <th>PID</th><th>Phase</th><th>Running for</th><th>Timeout</th></tr>\n",
        );
        for j in &report.running {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"message-id\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td></tr>",
                escape(&j.queue),
                message_id_html(&j.message_id),
                j.attempt,
                j.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                escape(&j.phase),
                human_secs(j.running_secs),
                human_secs(j.timeout_secs),
            );
        }
        h.push_str("</table>\n");
        if report.running_count > report.running.len() {
            let _ = writeln!(
                h,
                "<p class=\"muted\">and {} more</p>",
                report.running_count - report.running.len()
            );
        }
    }

    h.push_str("<h2>Recent dead letters</h2>\n");
    let any_dead = report
        .queues
        .iter()
        .any(|q| !q.dead_letters.recent.is_empty());
    if !any_dead {
        h.push_str("<p class=\"muted\">None since the supervisor started.</p>\n");
    } else {
        h.push_str(
            "<table id=\"dead\"><tr><th>Queue</th><th>When</th><th>Message id</th>\
             <th>Attempt</th><th>Why</th></tr>\n",
        );
        for q in &report.queues {
            for d in &q.dead_letters.recent {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td title=\"{}\">{} ago</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&q.name),
                    escape(&d.at),
                    human_secs(d.ago_secs),
                    message_id_html(&d.message_id),
                    d.attempt,
                    escape(&d.why)
                );
            }
        }
        h.push_str("</table>\n");
    }
    h.push_str(
        "<p class=\"muted\">Also: <a href=\"/status.json\">/status.json</a>, \
         <a href=\"/metrics\">/metrics</a>.</p>\n</body></html>\n",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(message_id: &str) -> Report {
        Report {
            version: "0.1.0".into(),
            generated_at: "2026-01-01T00:00:00Z".into(),
            connected: true,
            stopping: false,
            rate_window_secs: 60,
            queues: vec![QueueReport {
                name: "jobs<1>".into(),
                state: "paused".into(),
                reason: Some("cannot start \"<x>\"".into()),
                since: "2026-01-01T00:00:00Z".into(),
                since_secs: 12.0,
                busy: 1,
                concurrency: 4,
                rates: [("ok".to_owned(), 0.5), ("dead".to_owned(), 0.0)].into(),
                totals: [("ok".to_owned(), 30)].into(),
                last_failure: Some(FailureReport {
                    at: "2026-01-01T00:00:00Z".into(),
                    ago_secs: 3.0,
                    message_id: message_id.into(),
                    attempt: 2,
                    exit: "3".into(),
                    stderr: Some("<b>boom</b>".into()),
                }),
                dead_letters: DeadLetters {
                    count: 1,
                    recent: vec![DeadLetterReport {
                        at: "2026-01-01T00:00:00Z".into(),
                        ago_secs: 1.0,
                        message_id: message_id.into(),
                        attempt: 3,
                        why: "exit 3".into(),
                    }],
                },
            }],
            running_count: 1,
            running: vec![RunningReport {
                queue: "jobs<1>".into(),
                message_id: message_id.into(),
                attempt: 1,
                pid: Some(7),
                phase: "running".into(),
                started_at: "2026-01-01T00:00:00Z".into(),
                running_secs: 75.0,
                timeout_secs: 300.0,
            }],
        }
    }

    #[test]
    fn everything_shown_is_escaped() {
        let hostile = "<script>alert('x')</script>&\"\u{1b}[31m";
        let page = render_html(&report(hostile));
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<b>boom"), "{page}");
        assert!(!page.contains("jobs<1>"), "{page}");
        assert!(!page.contains('\u{1b}'));
        assert!(
            page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;\u{FFFD}[31m")
        );
        assert!(page.contains("&lt;b&gt;boom&lt;/b&gt;"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(page.contains("0.50/s ok"));
        assert!(page.contains("1m 15s"));
        assert!(render_html(&report("")).contains("(no id)"));
    }

    #[test]
    fn stderr_is_shown_as_the_setting_says() {
        let tail = b"first\nsecond line \n\n  \n";
        assert_eq!(shown_stderr(tail, StatusStderr::Off), None);
        assert_eq!(
            shown_stderr(tail, StatusStderr::Line).as_deref(),
            Some("second line")
        );
        assert_eq!(
            shown_stderr(tail, StatusStderr::Tail).as_deref(),
            Some("first\nsecond line \n\n  \n")
        );
        assert_eq!(shown_stderr(b"", StatusStderr::Line), None);
        let long = "x".repeat(1000);
        let line = shown_stderr(long.as_bytes(), StatusStderr::Line).unwrap();
        assert_eq!(line.chars().count(), STDERR_LINE_CHARS + 1);
    }

    #[test]
    fn reports_read_back_from_json() {
        let r = report("m-1");
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.running[0].message_id, "m-1");
        assert_eq!(back.queues[0].rates["ok"], 0.5);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_secs(4.24), "4.2s");
        assert_eq!(human_secs(192.0), "3m 12s");
        assert_eq!(human_secs(7500.0), "2h 5m");
        assert_eq!(human_secs(300.0), "5m");
        assert_eq!(rates_text(&BTreeMap::new()), "idle");
    }
}
