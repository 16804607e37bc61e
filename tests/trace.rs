//! Trace context end to end, against the real broker: a message's W3C
//! `traceparent` reaches the worker's `TRACEPARENT`, the job's spans reach
//! an OTLP/HTTP receiver (a small one in this file, decoding the
//! protobuf), retries link to the attempt before, and hostile trace
//! headers are ignored without harm.

mod common;

use common::*;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const PUBLISHER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER_SPAN: &str = "00f067aa0ba902b7";

fn publisher_traceparent() -> String {
    format!("00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01")
}

/// Writes the trace variables it got to `env-<message id>-<attempt>` in
/// RECORD_DIR; fails with exit 1 when the message id starts with "fail".
const WORKER: &str = r#"#!/bin/sh
cat >/dev/null
out="$RECORD_DIR/env-$AMQP_EXEC_MESSAGE_ID-$AMQP_EXEC_ATTEMPT"
{
  echo "TRACEPARENT=${TRACEPARENT-unset}"
  echo "TRACESTATE=${TRACESTATE-unset}"
  echo "BAGGAGE=${BAGGAGE-unset}"
} > "$out.tmp"
mv "$out.tmp" "$out"
case "$AMQP_EXEC_MESSAGE_ID" in fail*) exit 1;; esac
exit 0
"#;

fn config(work: &Workdir, q: &str, tracing: &str) -> String {
    let w = work.script("worker.sh", WORKER);
    format!(
        "{tracing}\n[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nmax_attempts = 2\nbackoff = [\"200ms\"]\n",
        w.display()
    )
}

/// The trace variables the worker of `id`'s `attempt` got.
async fn worker_env(work: &Workdir, id: &str, attempt: u32) -> BTreeMap<String, String> {
    let path = work.file(&format!("env-{id}-{attempt}"));
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the worker of {id} (attempt {attempt}) did not run within 20s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn with_headers(id: &str, headers: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert((*k).into(), v.clone());
    }
    BasicProperties::default()
        .with_message_id(id.into())
        .with_headers(t)
}

/// The (trace id, span id) of a traceparent, checked for format.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len(), parts[3].len()),
        ("00", 32, 16, 2),
        "{traceparent}"
    );
    assert!(
        traceparent[3..]
            .chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "{traceparent}"
    );
    (parts[1].to_owned(), parts[2].to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver on 127.0.0.1: keeps the spans posted to
/// `/v1/traces`, with the service name of their resource.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, kept).await;
                });
            }
        });
        Receiver { port, spans }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits for `n` spans named `name`; they are returned in start order.
    async fn wait_spans(&self, name: &str, n: usize, timeout: Duration) -> Vec<Span> {
        let start = Instant::now();
        loop {
            let mut found: Vec<Span> = self
                .spans()
                .into_iter()
                .map(|(_, s)| s)
                .filter(|s| s.name == name)
                .collect();
            if found.len() >= n {
                found.sort_by_key(|s| s.start_time_unix_nano);
                return found;
            }
            assert!(
                start.elapsed() < timeout,
                "{} span(s) {name:?} of {n} after {timeout:?}; got: {:?}",
                found.len(),
                self.spans()
                    .iter()
                    .map(|(_, s)| &s.name)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Serves one connection: HTTP/1.1 requests with a Content-Length body.
async fn serve(
    stream: tokio::net::TcpStream,
    kept: Arc<Mutex<Vec<(String, Span)>>>,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut length = 0usize;
        let mut content_type = String::new();
        loop {
            let mut h = String::new();
            stream.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "content-type" => content_type = v.trim().to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;
        assert_eq!(path, "/v1/traces");
        assert_eq!(content_type, "application/x-protobuf");
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.clone())
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    kept.lock().unwrap().push((service.clone(), s));
                }
            }
        }
        stream
            .get_mut()
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
            )
            .await?;
    }
}

/// A span attribute, as text.
fn attr(s: &Span, key: &str) -> Option<String> {
    let v = s.attributes.iter().find(|kv| kv.key == key)?;
    Some(match v.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(n) => n.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

const CONSUMER: i32 = 5;
const PRODUCER: i32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_trace_reaches_the_worker_and_the_collector() {
    let receiver = Receiver::start().await;
    let mut broker = Broker::connect().await;
    let q = unique("trace");
    let work = Workdir::new();
    let tracing = format!(
        "[tracing]\nendpoint = \"http://127.0.0.1:{}\"\nservice_name = \"billing-worker\"\n",
        receiver.port
    );
    broker.owns(&q);
    // The default batch delay (5 s): the spans are flushed at shutdown.
    let mut sup = Supervisor::start_with_env(
        &work,
        &config(&work, &q, &tracing),
        &[],
        &[(
            "TRACEPARENT",
            "00-11111111111111111111111111111111-2222222222222222-01",
        )],
    );
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    assert!(sup.log_text().contains(&format!(
        "exporting spans to http://127.0.0.1:{}/v1/traces",
        receiver.port
    )));
    broker
        .publish(
            &q,
            b"hello",
            with_headers(
                "ok-1",
                &[
                    ("traceparent", text(&publisher_traceparent())),
                    ("tracestate", text("vendor=abc,other=1")),
                    ("baggage", text("tenant=acme,region=eu")),
                ],
            )
            .with_correlation_id("conv-7".into()),
        )
        .await;
    let env = worker_env(&work, "ok-1", 1).await;
    let (trace_id, job_span) = ids(&env["TRACEPARENT"]);
    assert_eq!(trace_id, PUBLISHER_TRACE);
    assert_ne!(job_span, PUBLISHER_SPAN);
    assert!(env["TRACEPARENT"].ends_with("-01"));
    assert_eq!(env["TRACESTATE"], "vendor=abc,other=1");
    assert_eq!(env["BAGGAGE"], "tenant=acme,region=eu");
    broker.wait_count(&q, 0, Duration::from_secs(10)).await;

    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let process = receiver
        .wait_spans(&format!("process {q}"), 1, Duration::from_secs(5))
        .await;
    let p = &process[0];
    assert_eq!(hex(&p.trace_id), PUBLISHER_TRACE);
    assert_eq!(hex(&p.parent_span_id), PUBLISHER_SPAN);
    assert_eq!(
        hex(&p.span_id),
        job_span,
        "the worker's parent is the job span"
    );
    assert_eq!(p.kind, CONSUMER);
    assert_eq!(p.trace_state, "vendor=abc,other=1");
    for (key, value) in [
        ("messaging.system", "rabbitmq"),
        ("messaging.operation.type", "process"),
        ("messaging.operation.name", "process"),
        ("messaging.destination.name", &format!("{q}:{q}")),
        ("messaging.rabbitmq.destination.routing_key", &q),
        ("messaging.rabbitmq.message.delivery_tag", "1"),
        ("messaging.message.id", "ok-1"),
        ("messaging.message.conversation_id", "conv-7"),
        ("messaging.message.body.size", "5"),
        ("process.exit.code", "0"),
        ("amqp_exec.outcome", "ack"),
        ("amqp_exec.attempt", "1"),
    ] {
        assert_eq!(attr(p, key).as_deref(), Some(value), "{key}");
    }
    assert!(attr(p, "process.pid").unwrap().parse::<u32>().unwrap() > 1);
    assert_eq!(attr(p, "error.type"), None);
    let all = receiver.spans();
    assert!(all.iter().all(|(service, _)| service == "billing-worker"));
    for child in ["spawn", "settle"] {
        let c = all
            .iter()
            .map(|(_, s)| s)
            .find(|s| s.name == child)
            .unwrap_or_else(|| panic!("no {child} span"));
        assert_eq!(c.parent_span_id, p.span_id, "{child}");
        assert_eq!(c.trace_id, p.trace_id, "{child}");
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_links_to_the_attempt_before_and_the_dead_letter_carries_the_trace() {
    let receiver = Receiver::start().await;
    let mut broker = Broker::connect().await;
    let q = unique("traceretry");
    let work = Workdir::new();
    broker.owns(&q);
    let endpoint = format!("http://127.0.0.1:{}/v1/traces", receiver.port);
    let mut sup = Supervisor::start_with_env(
        &work,
        &config(&work, &q, ""),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    broker
        .publish(
            &q,
            b"x",
            with_headers("fail-1", &[("traceparent", text(&publisher_traceparent()))]),
        )
        .await;
    let first = worker_env(&work, "fail-1", 1).await;
    let second = worker_env(&work, "fail-1", 2).await;
    let (t1, s1) = ids(&first["TRACEPARENT"]);
    let (t2, s2) = ids(&second["TRACEPARENT"]);
    assert_eq!(
        (t1.as_str(), t2.as_str()),
        (PUBLISHER_TRACE, PUBLISHER_TRACE)
    );
    assert_ne!(s1, s2);

    let dead = format!("{q}.dead");
    broker.wait_count(&dead, 1, Duration::from_secs(20)).await;
    let letters = broker.drain(&dead).await;
    let (dt, ds) = ids(&header(&letters[0], "traceparent").unwrap());
    assert_eq!((dt.as_str(), ds.as_str()), (PUBLISHER_TRACE, s2.as_str()));

    let process = receiver
        .wait_spans(&format!("process {q}"), 2, Duration::from_secs(20))
        .await;
    let (a, b) = (&process[0], &process[1]);
    assert_eq!((hex(&a.span_id), hex(&b.span_id)), (s1.clone(), s2.clone()));
    assert_eq!(hex(&a.parent_span_id), PUBLISHER_SPAN);
    assert!(a.links.is_empty());
    // The retry carried the first job span: the second is its child and
    // links to it.
    assert_eq!(b.parent_span_id, a.span_id);
    assert_eq!(b.links.len(), 1);
    assert_eq!(b.links[0].span_id, a.span_id);
    assert_eq!(b.links[0].trace_id, a.trace_id);
    assert_eq!(attr(a, "amqp_exec.outcome").as_deref(), Some("retry"));
    assert_eq!(attr(b, "amqp_exec.outcome").as_deref(), Some("dead"));
    assert_eq!(attr(b, "amqp_exec.attempt").as_deref(), Some("2"));
    for s in [a, b] {
        assert_eq!(attr(s, "error.type").as_deref(), Some("1"));
        assert_eq!(attr(s, "process.exit.code").as_deref(), Some("1"));
    }
    let retry = receiver
        .wait_spans(&format!("send {q}.retry.200ms"), 1, Duration::from_secs(5))
        .await;
    assert_eq!(retry[0].kind, PRODUCER);
    assert_eq!(retry[0].parent_span_id, a.span_id);
    let sent_dead = receiver
        .wait_spans(&format!("send {dead}"), 1, Duration::from_secs(5))
        .await;
    assert_eq!(sent_dead[0].parent_span_id, b.span_id);
    assert!(receiver.spans().iter().all(|(svc, _)| svc == "from-env"));

    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_carries_the_job_span() {
    let receiver = Receiver::start().await;
    let mut broker = Broker::connect().await;
    let q = unique("tracereply");
    let replies = unique("tracereply-to");
    broker.owns(&q);
    broker.declare(&replies).await;
    let work = Workdir::new();
    let tracing = format!(
        "[tracing]\nendpoint = \"http://127.0.0.1:{}/\"\n",
        receiver.port
    );
    let cfg = config(&work, &q, &tracing) + "replies = [\"test-tracereply-to*\"]\n";
    let mut sup =
        Supervisor::start_with_env(&work, &cfg, &[], &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    broker
        .publish(
            &q,
            b"x",
            with_headers("ok-r", &[("traceparent", text(&publisher_traceparent()))])
                .with_reply_to(replies.as_str().into()),
        )
        .await;
    let (_, job_span) = ids(&worker_env(&work, "ok-r", 1).await["TRACEPARENT"]);
    let reply = first_delivery(&broker.channel, &replies).await;
    let (t, s) = ids(&header(&reply, "traceparent").expect("the reply's traceparent"));
    assert_eq!(
        (t.as_str(), s.as_str()),
        (PUBLISHER_TRACE, job_span.as_str())
    );
    let sent = receiver
        .wait_spans(&format!("send {replies}"), 1, Duration::from_secs(20))
        .await;
    assert_eq!(hex(&sent[0].parent_span_id), job_span);
    assert_eq!(sent[0].kind, PRODUCER);
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_trace_headers_are_ignored_and_the_jobs_run() {
    let mut broker = Broker::connect().await;
    let q = unique("tracebad");
    let work = Workdir::new();
    broker.owns(&q);
    let mut sup = Supervisor::start(&work, &config(&work, &q, ""), &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    let good = publisher_traceparent();
    let zero_trace = format!("00-{}-{PUBLISHER_SPAN}-01", "0".repeat(32));
    let zero_span = format!("00-{PUBLISHER_TRACE}-{}-01", "0".repeat(16));
    let bad_hex = format!("00-{}-{PUBLISHER_SPAN}-01", "g".repeat(32));
    let upper = good.to_uppercase();
    let long = format!("{good}{}", "-a".repeat(50_000));
    let binary = AMQPValue::ByteArray(ByteArray::from(
        [good.as_bytes(), b"\0\xff\xfe"].concat().as_slice(),
    ));
    let bad_parents: Vec<(&str, AMQPValue)> = vec![
        ("zero-trace", text(&zero_trace)),
        ("zero-span", text(&zero_span)),
        ("bad-hex", text(&bad_hex)),
        ("upper", text(&upper)),
        ("long", text(&long)),
        ("binary", binary),
        ("number", AMQPValue::LongLongInt(42)),
        ("empty", text("")),
    ];
    for (id, v) in &bad_parents {
        broker
            .publish(
                &q,
                b"x",
                with_headers(
                    id,
                    &[("traceparent", v.clone()), ("tracestate", text("a=b"))],
                ),
            )
            .await;
    }
    // A good parent with a hostile tracestate and baggage: the parent stays.
    let huge_state = (0..40)
        .map(|i| format!("k{i}=v"))
        .collect::<Vec<_>>()
        .join(",");
    broker
        .publish(
            &q,
            b"x",
            with_headers(
                "bad-state",
                &[
                    ("traceparent", text(&good)),
                    ("tracestate", text(&huge_state)),
                    ("baggage", text("k=v\u{1}\nEVIL=1")),
                ],
            ),
        )
        .await;
    for (id, _) in &bad_parents {
        let env = worker_env(&work, id, 1).await;
        let (trace, _) = ids(&env["TRACEPARENT"]);
        assert_ne!(trace, PUBLISHER_TRACE, "{id}: a new trace");
        assert_ne!(trace, "0".repeat(32), "{id}");
        assert_eq!(
            env["TRACESTATE"], "unset",
            "{id}: no tracestate without a parent"
        );
    }
    let env = worker_env(&work, "bad-state", 1).await;
    assert_eq!(ids(&env["TRACEPARENT"]).0, PUBLISHER_TRACE);
    assert_eq!(env["TRACESTATE"], "unset");
    assert_eq!(env["BAGGAGE"], "unset");
    broker.wait_count(&q, 0, Duration::from_secs(10)).await;
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    let log = sup.log_text();
    assert_eq!(
        log.matches("is ignored, and the job runs as usual").count(),
        1,
        "logged once, then counted:\n{}",
        tail(&log, 30)
    );
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_trace_starts_one_unless_new_traces_is_off() {
    let mut broker = Broker::connect().await;
    let q = unique("tracenew");
    let work = Workdir::new();
    broker.owns(&q);
    let mut sup = Supervisor::start(&work, &config(&work, &q, ""), &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    broker.publish_id(&q, "new-1", b"x").await;
    broker.publish_id(&q, "new-2", b"x").await;
    let a = ids(&worker_env(&work, "new-1", 1).await["TRACEPARENT"]);
    let b = ids(&worker_env(&work, "new-2", 1).await["TRACEPARENT"]);
    assert_ne!(a.0, b.0, "a new trace per message");
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;

    // Off: no TRACEPARENT, not even the supervisor's own.
    let work = Workdir::new();
    let mut sup = Supervisor::start_with_env(
        &work,
        &config(&work, &q, "[tracing]\nnew_traces = false\n"),
        &[],
        &[
            (
                "TRACEPARENT",
                "00-11111111111111111111111111111111-2222222222222222-01",
            ),
            ("BAGGAGE", "inherited=1"),
        ],
    );
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    broker.publish_id(&q, "off-1", b"x").await;
    broker
        .publish(
            &q,
            b"x",
            with_headers("off-2", &[("traceparent", text(&publisher_traceparent()))]),
        )
        .await;
    let env = worker_env(&work, "off-1", 1).await;
    assert_eq!(env["TRACEPARENT"], "unset");
    assert_eq!(env["BAGGAGE"], "unset");
    // A message with a trace is still continued.
    let env = worker_env(&work, "off-2", 1).await;
    assert_eq!(ids(&env["TRACEPARENT"]).0, PUBLISHER_TRACE);
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

#[test]
fn tracing_config_errors_name_the_key_or_variable() {
    let work = Workdir::new();
    let q = "unused";
    let cfg = work.write(
        "bad.toml",
        &config(&work, q, "[tracing]\nprotocol = \"grpc\"\n"),
    );
    let (status, _, stderr) = cli(&["--config", cfg.to_str().unwrap(), "run"], None);
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("bad.toml") && stderr.contains("[tracing] key `protocol`"),
        "{stderr}"
    );

    let good = work.write("good.toml", &config(&work, q, ""));
    let out = std::process::Command::new(BIN)
        .args(["--config", good.to_str().unwrap(), "run"])
        .env("AMQP_URL", amqp_url())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{stderr}");

    // `check` reports it too, and names where spans go when all is well.
    let check = |var: &str, value: &str| {
        let out = std::process::Command::new(BIN)
            .args(["--config", good.to_str().unwrap(), "check"])
            .env("AMQP_URL", amqp_url())
            .env(var, value)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = check("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("tracing: error: OTEL_EXPORTER_OTLP_PROTOCOL"),
        "{stdout}"
    );
    let (code, stdout) = check("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("tracing: spans go to http://collector:4318/v1/traces"),
        "{stdout}"
    );
}
