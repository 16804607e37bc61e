//! The Grafana dashboard (`deploy/grafana/amqp-exec.json`) and the
//! Prometheus alert rules (`deploy/prometheus/amqp-exec-alerts.yml`) name
//! only metrics that exist: those the real binary exports on `/metrics`
//! after jobs succeeded, were retried and were dead-lettered, and the
//! broker's own `rabbitmq_prometheus` metrics listed in
//! [`BROKER_METRICS`]. The rules pass `promtool check rules` and their unit
//! tests (`promtool test rules`).

mod common;

use common::scrape::{free_port, metric_names, metrics_page, sample, wait_page};
use common::*;
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

const DASHBOARD: &str = "deploy/grafana/amqp-exec.json";
const RULES: &str = "deploy/prometheus/amqp-exec-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/amqp-exec-alerts.test.yml";

/// The broker's metrics the dashboard and rules read, as RabbitMQ's
/// `rabbitmq_prometheus` plugin names them on `/metrics/detailed`
/// (families `queue_coarse_metrics` and `queue_consumer_count`); the
/// README lists them too.
const BROKER_METRICS: &[&str] = &[
    "rabbitmq_detailed_queue_messages_ready",
    "rabbitmq_detailed_queue_messages_unacked",
    "rabbitmq_detailed_queue_messages",
    "rabbitmq_detailed_queue_consumers",
];

/// PromQL words that are not metric names.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
];

/// PromQL aggregation operators, which a `by (...)` may part from their
/// `(`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The PromQL expressions of the dashboard: each target's `expr` and each
/// template variable's query.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(series_of(s))
                        }
                        ("query", serde_json::Value::Object(q)) => {
                            if let Some(s) = q.get("query").and_then(|s| s.as_str()) {
                                out.push(series_of(s));
                            }
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

/// A Grafana variable query `label_values(SERIES, label)` as its PromQL
/// SERIES; other expressions as they are.
fn series_of(query: &str) -> String {
    match query
        .strip_prefix("label_values(")
        .and_then(|rest| rest.rsplit_once(','))
    {
        Some((series, _)) => series.to_owned(),
        None => query.to_owned(),
    }
}

/// The `expr:` values of the rules file, inline or as indented blocks.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some((indent, value)) = line
            .find("expr:")
            .filter(|at| line[..*at].trim().is_empty())
            .map(|at| (at, line[at + 5..].trim()))
        else {
            continue;
        };
        if !value.starts_with('|') && !value.starts_with('>') {
            out.push(value.to_owned());
            continue;
        }
        let mut block = String::new();
        while i < lines.len() {
            let l = lines[i];
            let deeper = l.len() - l.trim_start().len() > indent;
            if !deeper && !l.trim().is_empty() {
                break;
            }
            block.push_str(l.trim());
            block.push('\n');
            i += 1;
        }
        out.push(block);
    }
    out
}

/// The metric names in a PromQL expression: identifiers outside strings,
/// label matchers (`{...}`), ranges (`[...]`) and grouping lists, that
/// are neither functions (followed by `(`) nor keywords.
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        let close = match c {
            '"' | '\'' | '`' => Some(c),
            '{' => Some('}'),
            '[' => Some(']'),
            '(' if skip_group => Some(')'),
            _ => None,
        };
        if let Some(close) = close {
            skip_group = false;
            i += 1;
            while i < chars.len() && chars[i] != close {
                if chars[i] == '\\' {
                    i += 1;
                }
                // Strings inside label matchers.
                if close == '}' && chars[i] == '"' {
                    i += 1;
                    while i < chars.len() && chars[i] != '"' {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            // A number or a duration: 0.95, 1e3, 5m.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:$".contains(chars[i]))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = chars.get(j) == Some(&'(');
            if KEYWORDS.contains(&word.as_str()) {
                skip_group = call;
            } else if !call
                && !AGGREGATIONS.contains(&word.as_str())
                && !word.starts_with('$')
                && !is_number(&word)
            {
                names.insert(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

fn is_number(word: &str) -> bool {
    matches!(word, "Inf" | "NaN" | "inf" | "nan")
}

/// Runs the binary with a queue whose jobs succeed, are retried and are
/// dead-lettered, and returns its metrics page.
async fn exported_page() -> String {
    let mut broker = Broker::connect().await;
    let q = unique("dashboard");
    broker.declare(&q).await;
    let work = Workdir::new();
    let port = free_port();
    let config = format!(
        "max_workers = 4\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[queue]]\nname = \"{q}\"\ncommand = [\"/bin/sh\", \"-c\", \"exit $(cat)\"]\n\
         concurrency = 2\nmax_attempts = 2\nbackoff = [\"100ms\"]\n"
    );
    for (i, code) in ["0", "0", "0", "75", "65"].iter().enumerate() {
        broker
            .publish_id(&q, &format!("m{i}"), code.as_bytes())
            .await;
    }
    let mut sup = Supervisor::start(&work, &config, &[]);
    let counted =
        |outcome: &str| format!("amqp_exec_jobs_total{{queue=\"{q}\",outcome=\"{outcome}\"}}");
    wait_page(
        port,
        "3 ok, 1 retried, 2 dead",
        Duration::from_secs(30),
        |p| {
            sample(p, &counted("ok")) == Some(3.0)
                && sample(p, &counted("retried")) == Some(1.0)
                && sample(p, &counted("dead")) == Some(2.0)
        },
    )
    .await;
    let page = metrics_page(port).expect("the metrics page");
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_rules_name_only_exported_metrics() {
    let dash_text = std::fs::read_to_string(repo(DASHBOARD)).expect(DASHBOARD);
    let dash: serde_json::Value =
        serde_json::from_str(&dash_text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let rules = std::fs::read_to_string(repo(RULES)).expect(RULES);

    // The datasource and the queue are variables; every panel uses the
    // datasource variable.
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        vars.contains(&"datasource") && vars.contains(&"queue"),
        "{vars:?}"
    );
    let panels = dash["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {:?} has a fixed datasource",
            p["title"]
        );
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{:?}", p["title"]);
        }
    }

    let mut exprs = dashboard_exprs(&dash);
    let dash_exprs = exprs.len();
    exprs.extend(rule_exprs(&rules));
    assert!(dash_exprs >= 20, "{dash_exprs} dashboard expressions");
    assert!(exprs.len() >= dash_exprs + 8, "rule expressions: {exprs:?}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = metric_names_in(e);
        assert!(!names.is_empty(), "no metric in {e:?}");
        used.extend(names);
    }
    // Metric names in the descriptions and summaries too (a histogram by
    // its family's name).
    let mut prose = BTreeSet::new();
    for text in [&dash_text, &rules] {
        for (at, _) in text.match_indices("amqp_exec_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            prose.insert(name);
        }
    }

    let page = exported_page().await;
    let exported = metric_names(&page);
    let unknown: Vec<&String> = used
        .iter()
        .filter(|n| !exported.contains(*n) && !BROKER_METRICS.contains(&n.as_str()))
        .chain(
            prose
                .iter()
                .filter(|n| !exported.contains(*n) && !exported.contains(&format!("{n}_bucket"))),
        )
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard or rules name metrics that neither amqp-exec exports nor the broker \
         plugin list has: {unknown:?}\nexported: {exported:?}"
    );
    // What the dashboard is for: each of these is on it.
    for needed in [
        "amqp_exec_jobs_total",
        "amqp_exec_retries_total",
        "amqp_exec_dead_letters_total",
        "amqp_exec_job_duration_seconds_bucket",
        "amqp_exec_queue_timeout_seconds",
        "amqp_exec_running_workers",
        "amqp_exec_queue_concurrency",
        "amqp_exec_queue_wait_seconds_bucket",
        "amqp_exec_worker_exit_codes_total",
        "amqp_exec_worker_signals_total",
        "amqp_exec_connected",
        "amqp_exec_reconnects_total",
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_messages_unacked",
        "rabbitmq_detailed_queue_consumers",
    ] {
        assert!(
            dashboard_exprs(&dash)
                .iter()
                .any(|e| metric_names_in(e).contains(needed)),
            "the dashboard does not show {needed}"
        );
    }
}

#[test]
fn promql_names_are_found() {
    let names = metric_names_in(
        "histogram_quantile(0.95, sum by (queue, le) (rate(a_bucket{queue=~\"$queue\",x=\"}\"}[$__rate_interval])))\n\
         > 0.8 * on (queue) group_left max by (queue) (b) and ignoring(x) c offset 5m + 1e3",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["a_bucket", "b", "c"]
    );
    assert_eq!(
        series_of("label_values(d{x=\"a,b\"}, queue)"),
        "d{x=\"a,b\"}"
    );
    assert_eq!(
        rule_exprs(
            "- alert: X\n  expr: up == 0\n- alert: Y\n  expr: |\n    a\n    > b\n  for: 5m\n"
        ),
        ["up == 0", "a\n> b\n"]
    );
}

/// promtool, from the `prometheus` Debian package (or `PROMTOOL`).
fn promtool() -> Command {
    let path = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let found = Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "promtool not found (as {path:?}): these tests check the alert rules with it. \
         Install it with `apt-get install prometheus` (Debian), or set PROMTOOL"
    );
    Command::new(path)
}

#[test]
fn the_alert_rules_pass_promtool() {
    let out = promtool()
        .args(["check", "rules"])
        .arg(repo(RULES))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");

    let out = promtool()
        .args(["test", "rules"])
        .arg(repo(RULE_TESTS))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every rule says what is wrong and what to do.
    let rules = std::fs::read_to_string(repo(RULES)).unwrap();
    let alerts = rules.matches("- alert: ").count();
    assert!(alerts >= 5, "{alerts} alerts");
    assert_eq!(
        rules.matches("summary: ").count(),
        alerts,
        "a summary per rule"
    );
    assert_eq!(
        rules.matches("description: ").count(),
        alerts,
        "a description per rule"
    );
    for name in [
        "AmqpExecNotConnected",
        "AmqpExecQueuePaused",
        "AmqpExecDeadLettersGrowing",
        "AmqpExecBacklogWithoutSuccess",
        "AmqpExecJobsNearTimeout",
    ] {
        assert!(rules.contains(&format!("- alert: {name}\n")), "no {name}");
    }
}
