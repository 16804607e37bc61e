//! amqp-exec: a RabbitMQ consumer supervisor that holds only the AMQP
//! connection and runs one short-lived unit-worker process per message.
//!
//! # Module map
//!
//! A stack, top to bottom: each module imports only modules listed below it
//! (`main.rs` stands on top of them all). `tests/layout.rs` checks the code
//! against this list.
//!
//! - [`cli`] — the `publish`, `check`, `dead` and `status` commands;
//! - [`supervisor`] — the connection loop, signals, reloads, shutdown;
//! - [`status`] — the status page (`/status`, `/status.json`): a report of
//!   the shared state, rendered;
//! - [`consumer`] — one queue's consumer loop on one connection;
//! - [`job`] — one delivery from start to ack: carries out the settlement
//!   plan;
//!   - [`state`] — the state consumers and jobs share, in parts: drain, job
//!     budget, readiness, queue registry, activity (what runs now, and what
//!     happened lately);
//!   - [`memory`] — outcomes and connection losses remembered per message;
//!   - [`settlement`] — delivery + job result → settlement plan (pure);
//!   - [`runner`] — spawning a worker and collecting its output;
//!   - [`publish`] — confirmed publishing, and acks;
//! - below those, used by several:
//!   - [`trace`] — W3C trace context of jobs, their OpenTelemetry spans
//!     and the OTLP export;
//!   - [`broker`] — connecting, queue topology;
//!   - [`config`] — the TOML file, validated into typed structs;
//!   - [`policy`] — exit code + attempt → decision (pure);
//!   - [`prefetch`] — recent job durations → adaptive prefetch (pure, with
//!     its holder);
//!   - [`signing`] — HMAC signatures of the control headers amqp-exec reads;
//!   - [`slots`] — the global and per-queue worker slots;
//!   - [`headers`] — AMQP headers: JSON, sizes, filters;
//!   - [`systemd`] — sd_notify;
//!   - [`metrics`] — counters, gauges and histograms, and the Prometheus
//!     endpoint;
//!   - [`reaper`] — reaping orphans when running as PID 1;
//!   - [`tls`] — `amqps://` connections and `[broker.tls]`;
//!   - [`uri`] — broker URLs, parsed and redacted;
//!   - [`random`] — random numbers for jitter and ids;
//!   - [`logwriter`] — the log's queue to stderr, written by a thread of its
//!     own.

pub mod broker;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod headers;
pub mod job;
pub mod logwriter;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod prefetch;
pub mod publish;
pub mod random;
pub mod reaper;
pub mod runner;
pub mod settlement;
pub mod signing;
pub mod slots;
pub mod state;
pub mod status;
pub mod supervisor;
pub mod systemd;
pub mod tls;
pub mod trace;
pub mod uri;
