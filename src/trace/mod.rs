//! Tracing of jobs with OpenTelemetry: each delivery's trace context, its
//! job span, and the span export.
//!
//! A job continues the trace of its message's W3C `traceparent` header
//! (or starts a new one, unless `new_traces = false`). Its worker gets the
//! environment-variable carrier (`TRACEPARENT` naming the job span,
//! `TRACESTATE`, `BAGGAGE`), and the job's retry, dead letter and reply
//! carry the job span in their `traceparent`. When spans are exported
//! ([`export`]), each job is a CONSUMER span `process <queue>` with child
//! spans for the worker (`spawn`), each publish (`send <destination>`) and
//! the ack (`settle`). Without an endpoint no SDK runs: a job then costs
//! the parsing of its headers and one random span id, and no span object.
//!
//! - [`w3c`] — the header formats, parsed strictly (publishers are not
//!   trusted) and bounded;
//! - [`export`] — OTLP/HTTP export settings and the SDK.

pub mod export;
pub mod w3c;

use crate::config::TracingConfig;
use crate::policy::Outcome;
use lapin::types::FieldTable;
use opentelemetry::trace::{
    Link, Span as _, SpanContext as OtelContext, SpanId, SpanKind, Status, TraceContextExt,
    TraceFlags, TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::borrow::Cow;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use w3c::{BAGGAGE, Invalid, TRACEPARENT, TRACESTATE};

/// The SDK, when spans are exported.
struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static EXPORT: OnceLock<Exporting> = OnceLock::new();
/// `[tracing] new_traces`.
static NEW_TRACES: AtomicBool = AtomicBool::new(true);
/// An invalid trace header has been logged: later ones are only counted.
static INVALID_LOGGED: AtomicBool = AtomicBool::new(false);

/// Sets tracing up from the `[tracing]` table and the `OTEL_*` environment
/// variables: starts the SDK when an endpoint is configured. Returns the
/// URL spans go to. Once per process; later calls change nothing.
pub fn init(cfg: &TracingConfig) -> Result<Option<String>, String> {
    NEW_TRACES.store(cfg.new_traces, Ordering::Relaxed);
    let Some(settings) = export::resolve(cfg, |k| std::env::var(k).ok())? else {
        return Ok(None);
    };
    if EXPORT.get().is_none() {
        let provider = export::provider(&settings)?;
        let scope = InstrumentationScope::builder("amqp-exec")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = provider.tracer_with_scope(scope);
        let _ = EXPORT.set(Exporting { provider, tracer });
    }
    Ok(Some(settings.url))
}

/// Exports the spans still queued, waiting at most `timeout`, and stops
/// the SDK.
pub fn shutdown(timeout: Duration) {
    if let Some(e) = EXPORT.get()
        && let Err(err) = e.provider.shutdown_with_timeout(timeout)
    {
        tracing::warn!("exporting the last spans: {err}");
    }
}

/// What a job span records of its delivery.
pub struct Delivery<'a> {
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub delivery_tag: u64,
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub body_size: usize,
    pub attempt: u32,
    pub headers: Option<&'a FieldTable>,
    /// A retry republished by amqp-exec: its `traceparent` names the
    /// previous attempt's job span, which the span links to.
    pub retried: bool,
}

/// One job's trace context, and its span when spans are exported.
pub struct JobTrace {
    /// The job span's `traceparent`: none for a message without trace
    /// context when `new_traces = false`.
    traceparent: Option<String>,
    tracestate: Option<String>,
    baggage: Option<String>,
    /// The job span in a context, when exporting.
    cx: Option<Context>,
    /// The first trace header of the message that was refused, and why.
    pub invalid: Option<(&'static str, Invalid)>,
}

impl JobTrace {
    /// The trace context of a job for `d`: continues the message's trace,
    /// or starts one.
    pub fn start(d: &Delivery<'_>) -> JobTrace {
        let e = w3c::extract(d.headers);
        if let Some((header, why)) = e.invalid {
            log_invalid(d, header, why);
        }
        let new_traces = NEW_TRACES.load(Ordering::Relaxed);
        let mut t = JobTrace {
            traceparent: None,
            tracestate: None,
            baggage: e.baggage,
            cx: None,
            invalid: e.invalid,
        };
        if e.parent.is_none() && !new_traces {
            return t;
        }
        let job = match EXPORT.get() {
            None => match e.parent {
                Some(p) => w3c::SpanContext {
                    span_id: random_id(),
                    ..p
                },
                None => w3c::SpanContext {
                    trace_id: {
                        let mut id = [0; 16];
                        id[..8].copy_from_slice(&random_id());
                        id[8..].copy_from_slice(&random_id());
                        id
                    },
                    span_id: random_id(),
                    flags: w3c::SAMPLED,
                },
            },
            Some(x) => {
                let parent = e.parent.map(|p| remote(p, e.tracestate.as_deref()));
                let links = match &parent {
                    Some(p) if d.retried => vec![Link::new(
                        p.clone(),
                        vec![KeyValue::new("amqp_exec.link", "previous_attempt")],
                        0,
                    )],
                    _ => Vec::new(),
                };
                let parent_cx = match parent {
                    Some(p) => Context::new().with_remote_span_context(p),
                    None => Context::new(),
                };
                let span = x
                    .tracer
                    .span_builder(format!("process {}", d.queue))
                    .with_kind(SpanKind::Consumer)
                    .with_attributes(delivery_attributes(d))
                    .with_links(links)
                    .start_with_context(&x.tracer, &parent_cx);
                let sc = span.span_context();
                let job = w3c::SpanContext {
                    trace_id: sc.trace_id().to_bytes(),
                    span_id: sc.span_id().to_bytes(),
                    flags: sc.trace_flags().to_u8(),
                };
                t.cx = Some(parent_cx.with_span(span));
                job
            }
        };
        t.traceparent = Some(job.traceparent());
        t.tracestate = e.tracestate;
        t
    }

    /// The job span's `traceparent`, for the worker and the publishes.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The worker's environment-variable carrier: `TRACEPARENT`,
    /// `TRACESTATE`, `BAGGAGE`, those there are.
    pub fn worker_env(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        [
            ("TRACEPARENT", &self.traceparent),
            ("TRACESTATE", &self.tracestate),
            ("BAGGAGE", &self.baggage),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
    }

    /// Whether a job span is exported.
    pub fn recording(&self) -> bool {
        self.cx.is_some()
    }

    fn child(
        &self,
        name: impl FnOnce() -> Cow<'static, str>,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> ChildSpan {
        match (&self.cx, EXPORT.get()) {
            (Some(cx), Some(x)) => ChildSpan(Some(
                x.tracer
                    .span_builder(name())
                    .with_kind(kind)
                    .with_attributes(attributes())
                    .start_with_context(&x.tracer, cx),
            )),
            _ => ChildSpan(None),
        }
    }

    /// The span of the worker's run, from its start to its exit.
    pub fn spawn(&self, program: &str) -> ChildSpan {
        self.child(
            || "spawn".into(),
            SpanKind::Internal,
            || vec![KeyValue::new("process.executable.path", program.to_owned())],
        )
    }

    /// The span of a publish to `destination` (a retry, dead-letter or
    /// reply queue), sent through the default exchange.
    pub fn send(&self, destination: &str) -> ChildSpan {
        let temporary =
            destination.starts_with("amq.rabbitmq.reply-to") || destination.starts_with("amq.gen-");
        self.child(
            || {
                if temporary {
                    "send (temporary)".into()
                } else {
                    format!("send {destination}").into()
                }
            },
            SpanKind::Producer,
            || {
                let mut a = vec![
                    KeyValue::new("messaging.system", "rabbitmq"),
                    KeyValue::new("messaging.operation.type", "send"),
                    KeyValue::new("messaging.operation.name", "publish"),
                    KeyValue::new("messaging.destination.name", destination.to_owned()),
                    KeyValue::new(
                        "messaging.rabbitmq.destination.routing_key",
                        destination.to_owned(),
                    ),
                ];
                if temporary {
                    a.push(KeyValue::new("messaging.destination.temporary", true));
                }
                a
            },
        )
    }

    /// The span of settling the delivery: `operation` is "ack" or "nack".
    pub fn settle(&self, operation: &'static str) -> ChildSpan {
        self.child(
            || "settle".into(),
            SpanKind::Client,
            || {
                vec![
                    KeyValue::new("messaging.system", "rabbitmq"),
                    KeyValue::new("messaging.operation.type", "settle"),
                    KeyValue::new("messaging.operation.name", operation),
                ]
            },
        )
    }

    /// Ends the job span with how the job went.
    pub fn finish(self, end: &JobEnd<'_>) {
        let Some(cx) = self.cx else { return };
        let span = cx.span();
        if let Some(pid) = end.pid {
            span.set_attribute(KeyValue::new("process.pid", i64::from(pid)));
        }
        if let Some(outcome) = end.outcome {
            if let Outcome::Exit(code) = outcome {
                span.set_attribute(KeyValue::new("process.exit.code", i64::from(*code)));
            }
            span.set_attribute(KeyValue::new("amqp_exec.exit", outcome.label()));
        }
        span.set_attribute(KeyValue::new("amqp_exec.outcome", end.settled));
        let error = match end.outcome {
            Some(o) if *o != Outcome::Exit(0) => Some(o.label()),
            _ if end.settled == "lost" => Some("settle_failed".to_owned()),
            _ => None,
        };
        if let Some(e) = error {
            span.set_status(Status::error(format!("job ended as {e}")));
            span.set_attribute(KeyValue::new("error.type", e));
        }
        span.end();
    }
}

/// How a job ended, for its span.
pub struct JobEnd<'a> {
    /// The worker's, when one ran.
    pub pid: Option<u32>,
    /// How the worker ended, or why none ran.
    pub outcome: Option<&'a Outcome>,
    /// "ack", "retry", "dead", "drop", "requeue", or "lost" (the channel
    /// went before the delivery was settled).
    pub settled: &'static str,
}

/// A child span of a job span, ended when dropped or by its methods; empty
/// when spans are not exported.
pub struct ChildSpan(Option<opentelemetry_sdk::trace::Span>);

impl ChildSpan {
    /// Ends the span of a worker's run.
    pub fn exited(mut self, pid: Option<u32>, outcome: &Outcome) {
        if let Some(s) = &mut self.0 {
            if let Some(pid) = pid {
                s.set_attribute(KeyValue::new("process.pid", i64::from(pid)));
            }
            match outcome {
                Outcome::Exit(code) => {
                    s.set_attribute(KeyValue::new("process.exit.code", i64::from(*code)));
                    if *code != 0 {
                        s.set_attribute(KeyValue::new("error.type", outcome.label()));
                    }
                }
                other => {
                    s.set_attribute(KeyValue::new("error.type", other.label()));
                    s.set_status(Status::error(other.label()));
                }
            }
            s.end();
        }
    }

    /// Awaits `f` within the span, and ends it, failed when `f` returns an
    /// error.
    pub async fn around<T, E: std::fmt::Display>(
        self,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let result = f.await;
        self.end(result.as_ref().err());
        result
    }

    /// Ends the span, failed with `error` when given.
    pub fn end(mut self, error: Option<&impl std::fmt::Display>) {
        if let Some(s) = &mut self.0 {
            if let Some(e) = error {
                s.set_status(Status::error(e.to_string()));
                s.set_attribute(KeyValue::new("error.type", "failed"));
            }
            s.end();
        }
    }
}

/// The attributes of a job span from its delivery (OpenTelemetry messaging
/// conventions for RabbitMQ).
fn delivery_attributes(d: &Delivery<'_>) -> Vec<KeyValue> {
    let destination: Vec<&str> = [d.exchange, d.routing_key, d.queue]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    let mut a = vec![
        KeyValue::new("messaging.system", "rabbitmq"),
        KeyValue::new("messaging.operation.type", "process"),
        KeyValue::new("messaging.operation.name", "process"),
        KeyValue::new("messaging.destination.name", destination.join(":")),
        KeyValue::new(
            "messaging.rabbitmq.destination.routing_key",
            d.routing_key.to_owned(),
        ),
        KeyValue::new(
            "messaging.rabbitmq.message.delivery_tag",
            i64::try_from(d.delivery_tag).unwrap_or(i64::MAX),
        ),
        KeyValue::new(
            "messaging.message.body.size",
            i64::try_from(d.body_size).unwrap_or(i64::MAX),
        ),
        KeyValue::new("amqp_exec.attempt", i64::from(d.attempt)),
    ];
    if let Some(id) = d.message_id.filter(|s| !s.is_empty()) {
        a.push(KeyValue::new("messaging.message.id", id.to_owned()));
    }
    if let Some(id) = d.correlation_id.filter(|s| !s.is_empty()) {
        a.push(KeyValue::new(
            "messaging.message.conversation_id",
            id.to_owned(),
        ));
    }
    a
}

/// A remote parent for the SDK.
fn remote(p: w3c::SpanContext, tracestate: Option<&str>) -> OtelContext {
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    OtelContext::new(
        TraceId::from_bytes(p.trace_id),
        SpanId::from_bytes(p.span_id),
        TraceFlags::new(p.flags & w3c::SAMPLED),
        true,
        state,
    )
}

/// A random, non-zero 8-byte id.
fn random_id() -> [u8; 8] {
    loop {
        let n = crate::random::u64();
        if n != 0 {
            return n.to_be_bytes();
        }
    }
}

/// Logs the first refused trace header of the process; the rest are
/// counted (`amqp_exec_invalid_trace_context_total`).
fn log_invalid(d: &Delivery<'_>, header: &str, why: Invalid) {
    if !INVALID_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            queue = %d.queue, message_id = d.message_id.unwrap_or_default(),
            "the message's {header} header is {}: it is ignored, and the job runs as usual \
             (further invalid trace headers are only counted, in \
             amqp_exec_invalid_trace_context_total)",
            why.as_str()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    fn delivery(h: Option<&FieldTable>) -> Delivery<'_> {
        Delivery {
            queue: "q",
            exchange: "",
            routing_key: "q",
            delivery_tag: 1,
            message_id: Some("m"),
            correlation_id: None,
            body_size: 3,
            attempt: 1,
            headers: h,
            retried: false,
        }
    }

    #[test]
    fn without_export_the_trace_is_continued_with_a_new_span_id() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = FieldTable::default();
        h.insert(TRACEPARENT.into(), AMQPValue::LongString(tp.into()));
        h.insert(TRACESTATE.into(), AMQPValue::LongString("a=b".into()));
        h.insert(BAGGAGE.into(), AMQPValue::LongString("k=v".into()));
        let t = JobTrace::start(&delivery(Some(&h)));
        let mine = t.traceparent().unwrap();
        assert_eq!(&mine[..36], &tp[..36]);
        assert_ne!(&mine[36..52], &tp[36..52]);
        assert!(mine.ends_with("-01"));
        assert!(!t.recording());
        let env: Vec<_> = t.worker_env().collect();
        assert_eq!(
            env.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["TRACEPARENT", "TRACESTATE", "BAGGAGE"]
        );
        assert_eq!(env[1].1, "a=b");
        // No context: a new trace, each time another.
        let a = JobTrace::start(&delivery(None));
        let b = JobTrace::start(&delivery(None));
        let (a, b) = (a.traceparent().unwrap(), b.traceparent().unwrap());
        assert_eq!(a.len(), 55);
        assert_ne!(&a[3..35], &b[3..35]);
        assert!(w3c::parse_traceparent(a.as_bytes()).is_ok());
    }
}
