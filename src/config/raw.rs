//! The config file as serde reads it: every key optional, in the file's
//! own types, before validation.

use super::{OnConnectionLoss, QueueType};
use crate::policy::Action;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBinding {
    pub(super) exchange: String,
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    pub(super) routing_key: Option<String>,
    pub(super) arguments: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) broker: Option<RawBroker>,
    pub(super) defaults: Option<toml::Table>,
    pub(super) max_workers: Option<usize>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) metrics: Option<RawMetrics>,
    pub(super) tracing: Option<RawTracing>,
    #[serde(default, rename = "queue")]
    pub(super) queues: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    pub(super) url: Option<String>,
    pub(super) urls: Option<Vec<String>>,
    pub(super) heartbeat: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) tls: Option<RawTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: Option<PathBuf>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) server_name: Option<String>,
    #[serde(default)]
    pub(super) insecure_skip_verify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<String>,
    pub(super) status_stderr: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    pub(super) endpoint: Option<String>,
    pub(super) traces_endpoint: Option<String>,
    pub(super) protocol: Option<String>,
    pub(super) service_name: Option<String>,
    pub(super) enabled: Option<bool>,
    pub(super) new_traces: Option<bool>,
}

/// A size: a number of bytes, or a string with a unit ("512K", "64M", "1G").
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum RawSize {
    Bytes(u64),
    Text(String),
}

/// One `[[queue]]` table, or `[defaults]`: every key is optional here and
/// checked after the defaults are merged in.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) name: Option<String>,
    pub(super) command: Option<Vec<String>>,
    pub(super) concurrency: Option<usize>,
    pub(super) prefetch: Option<u32>,
    pub(super) env: Option<BTreeMap<String, String>>,
    pub(super) clear_env: Option<bool>,
    pub(super) working_dir: Option<PathBuf>,
    pub(super) declare: Option<bool>,
    pub(super) queue_type: Option<QueueType>,
    pub(super) arguments: Option<toml::Table>,
    pub(super) bind: Option<Vec<RawBinding>>,
    pub(super) single_active_consumer: Option<bool>,
    pub(super) max_rate: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) kill_grace: Option<String>,
    pub(super) max_attempts: Option<u32>,
    pub(super) backoff: Option<Vec<String>>,
    pub(super) exit_codes: Option<BTreeMap<String, Action>>,
    pub(super) max_body_bytes: Option<RawSize>,
    pub(super) max_reply_bytes: Option<RawSize>,
    pub(super) max_log_lines: Option<usize>,
    pub(super) on_connection_loss: Option<OnConnectionLoss>,
    pub(super) consumer_timeout: Option<String>,
    pub(super) max_connection_losses: Option<u32>,
    pub(super) replies: Option<toml::Value>,
    pub(super) reply_stderr_bytes: Option<RawSize>,
    pub(super) max_core_size: Option<RawSize>,
    pub(super) user: Option<String>,
    pub(super) group: Option<String>,
    pub(super) memory_limit: Option<RawSize>,
    pub(super) max_open_files: Option<u64>,
    pub(super) cpu_time: Option<String>,
    pub(super) nice: Option<i32>,
}
