//! amqp-exec: a RabbitMQ consumer supervisor that holds only the AMQP
//! connection and runs one short-lived unit-worker process per message.
//!
//! Module map:
//! - [`config`] — the TOML file, validated into typed structs;
//! - [`broker`] — connecting, queue topology;
//! - [`uri`] — broker URLs, parsed and redacted;
//! - [`supervisor`] — the connection loop, shared state, shutdown;
//! - [`consumer`] — one queue's consumer loop;
//! - [`job`] — one delivery from start to ack: carries out the settlement;
//! - [`settlement`] — delivery + job result → settlement plan (pure);
//! - [`memory`] — outcomes and connection losses remembered per message;
//! - [`signing`] — HMAC signatures of the control headers amqp-exec reads;
//! - [`slots`] — the global and per-queue worker slots;
//! - [`runner`] — spawning a worker and collecting its output;
//! - [`policy`] — exit code + attempt → decision (pure);
//! - [`headers`] — AMQP headers to JSON;
//! - [`publish`] — confirmed publishing;
//! - [`cli`] — the `publish`, `check` and `dead` commands;
//! - [`systemd`] — sd_notify;
//! - [`metrics`] — counters;
//! - [`tls`] — `amqps://` connections and `[broker.tls]`;
//! - [`random`] — random numbers for jitter and ids;
//! - [`reaper`] — reaping orphans when running as PID 1.

pub mod broker;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod headers;
pub mod job;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod publish;
pub mod random;
pub mod reaper;
pub mod runner;
pub mod settlement;
pub mod signing;
pub mod slots;
pub mod supervisor;
pub mod systemd;
pub mod tls;
pub mod uri;
