//! Configuration: reads the TOML file, applies `[defaults]` and environment
//! overrides, and validates everything into typed structs.
//!
//! Every error names the file, the queue (where there is one) and the key, so
//! that an operator can fix it without reading the source. A config error makes
//! the binary exit with [`EX_CONFIG`].

mod command;
mod raw;
mod validate;
mod values;

pub use command::{executable_by, resolve_command};
pub use validate::has_capability;
pub use values::{format_duration, parse_duration, parse_rate, parse_size};

use crate::policy::Policy;
use raw::*;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use validate::*;
use values::one_line;

/// Exit status for configuration errors (sysexits.h `EX_CONFIG`).
pub const EX_CONFIG: i32 = 78;

/// Where the config is read from when neither `--config` nor
/// `AMQP_EXEC_CONFIG` names a file.
pub const DEFAULT_PATH: &str = "/etc/amqp-exec/config.toml";

/// The broker URL used when neither the config nor `AMQP_URL` gives one.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Highest `concurrency`: the most unacked deliveries (`prefetch`) a
/// consumer can have.
const MAX_CONCURRENCY: usize = 65535;
/// Highest `max_workers`.
const MAX_WORKERS: usize = 1_000_000;

/// A configuration mistake, with the file it was found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.as_os_str().is_empty() {
            // Not from a file: the message names its source (AMQP_URL).
            return f.write_str(&self.message);
        }
        write!(
            f,
            "config error in {}: {}",
            self.file.display(),
            self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub broker: BrokerConfig,
    /// Cap on running workers across all queues; `None` without the key,
    /// when the queues' own `concurrency` is the only bound.
    pub max_workers: Option<usize>,
    /// How long running workers may finish after SIGTERM before they are killed.
    pub shutdown_grace: Duration,
    /// Address of the Prometheus endpoint, if any.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How much of a failed worker's stderr the status page shows.
    pub status_stderr: StatusStderr,
    /// The `[tracing]` table.
    pub tracing: TracingConfig,
    /// The key of signed control headers: `key_file`'s, else a random one
    /// for this process.
    pub signing_key: crate::signing::SigningKey,
    pub queues: Vec<QueueConfig>,
}

impl Config {
    /// Every queue the configured queues consume, retry to and dead-letter
    /// to.
    pub fn own_queues(&self) -> std::collections::HashSet<String> {
        let mut own = std::collections::HashSet::new();
        for q in &self.queues {
            own.insert(q.name.clone());
            own.insert(q.dead_queue());
            for d in &q.policy.backoff {
                own.insert(q.retry_queue(*d));
            }
        }
        own
    }

    /// The most jobs that can run at once: `max_workers`, bounded by the sum
    /// of the queues' `concurrency`.
    pub fn jobs_at_once(&self) -> usize {
        let sum: usize = self.queues.iter().map(|q| q.concurrency).sum();
        self.max_workers.map_or(sum, |m| m.min(sum))
    }
}

/// The `[tracing]` table: OTLP span export (the `OTEL_*` environment
/// variables override it) and new traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracingConfig {
    /// OTLP/HTTP base URL; `/v1/traces` is appended.
    pub endpoint: Option<String>,
    /// OTLP/HTTP URL of traces, used as it is.
    pub traces_endpoint: Option<String>,
    pub service_name: Option<String>,
    /// `false` turns export off, as `OTEL_SDK_DISABLED=true` does.
    pub enabled: bool,
    /// Start a new trace for a message without a valid `traceparent`.
    pub new_traces: bool,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            endpoint: None,
            traces_endpoint: None,
            service_name: None,
            enabled: true,
            new_traces: true,
        }
    }
}

/// The only OTLP protocol amqp-exec exports with.
pub const OTLP_PROTOCOL: &str = "http/protobuf";

/// Checks an OTLP endpoint URL: `http://` or `https://`, with a host.
pub fn check_otlp_url(s: &str) -> Result<(), String> {
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(format!("{s:?} is not an http:// or https:// URL")),
        Err(e) => Err(format!("{s:?} is not a URL ({e})")),
    }
}

/// Checks an OTLP protocol name: only [`OTLP_PROTOCOL`] is supported.
pub fn check_otlp_protocol(s: &str) -> Result<(), String> {
    if s == OTLP_PROTOCOL {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not supported: amqp-exec exports spans over \"{OTLP_PROTOCOL}\" (OTLP/HTTP) only"
        ))
    }
}

fn parse_tracing(raw: Option<RawTracing>) -> Result<TracingConfig, String> {
    let raw = raw.unwrap_or_default();
    for (key, v) in [
        ("endpoint", &raw.endpoint),
        ("traces_endpoint", &raw.traces_endpoint),
    ] {
        if let Some(v) = v {
            check_otlp_url(v).map_err(|m| format!("[tracing] key `{key}`: {m}"))?;
        }
    }
    if let Some(p) = &raw.protocol {
        check_otlp_protocol(p).map_err(|m| format!("[tracing] key `protocol`: {m}"))?;
    }
    if raw
        .service_name
        .as_deref()
        .is_some_and(|s| s.trim().is_empty())
    {
        return Err("[tracing] key `service_name`: must not be empty".into());
    }
    let d = TracingConfig::default();
    Ok(TracingConfig {
        endpoint: raw.endpoint,
        traces_endpoint: raw.traces_endpoint,
        service_name: raw.service_name,
        enabled: raw.enabled.unwrap_or(d.enabled),
        new_traces: raw.new_traces.unwrap_or(d.new_traces),
    })
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Broker URLs, tried in turn (cluster nodes). Never logged unredacted.
    pub urls: Vec<String>,
    pub heartbeat: Duration,
    pub connect_timeout: Duration,
    /// For `amqps://` URLs: `[broker.tls]`, or the system's CAs when absent.
    pub tls: Option<crate::tls::Tls>,
}

/// Where a queue's replies may go: the `replies` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replies {
    /// RabbitMQ's direct reply-to, and server-named (`amq.gen-…`) queues.
    Direct,
    /// Never.
    Off,
    /// Queues named so: exact names, or prefixes written with a trailing `*`.
    Allow(Vec<String>),
}

/// What happens to running workers when the broker connection drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnConnectionLoss {
    /// Let them finish; their deliveries cannot be acked and will be redelivered.
    Finish,
    /// Kill their process groups at once.
    Kill,
}

/// A user looked up from the `user` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    pub name: String,
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups, as `initgroups` would set them.
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

/// Who a queue's workers run as, and with which limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// The `user` key.
    pub user: Option<UserIdentity>,
    /// The `group` key, overriding the user's primary group.
    pub group: Option<(String, u32)>,
    /// `memory_limit` in bytes (RLIMIT_AS).
    pub memory_limit: Option<u64>,
    /// `max_open_files` (RLIMIT_NOFILE).
    pub max_open_files: Option<u64>,
    /// `cpu_time` in seconds (RLIMIT_CPU).
    pub cpu_time: Option<u64>,
    /// `nice`, -20 to 19.
    pub nice: Option<i32>,
    /// `max_core_size` in bytes (RLIMIT_CORE); without it workers inherit
    /// the supervisor's soft limit, which it sets to 0.
    pub core_size: Option<u64>,
}

impl Sandbox {
    /// Whether the queue sets none of these: its workers need no hook
    /// between fork and exec.
    pub fn is_unset(&self) -> bool {
        *self == Sandbox::default()
    }
}

/// `queue_type`: RabbitMQ's queue types amqp-exec declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueType {
    Classic,
    Quorum,
}

/// A value of `[queue.arguments]` or of a binding's `arguments`.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

/// One `[[queue.bind]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub exchange: String,
    /// direct, topic, fanout or headers.
    pub kind: String,
    pub routing_key: String,
    pub arguments: BTreeMap<String, ArgValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    pub command: Vec<String>,
    pub concurrency: usize,
    pub prefetch: u16,
    /// No `prefetch` key: the prefetch adapts to the jobs' durations (see
    /// [`crate::prefetch`]).
    pub prefetch_adapts: bool,
    pub env: BTreeMap<String, String>,
    pub clear_env: bool,
    pub working_dir: Option<PathBuf>,
    pub declare: bool,
    pub queue_type: QueueType,
    /// Extra x-arguments of the work queue.
    pub arguments: BTreeMap<String, ArgValue>,
    pub bindings: Vec<Binding>,
    pub single_active_consumer: bool,
    /// Most jobs started per second, shared by the queue's workers.
    pub max_rate: Option<f64>,
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub max_body_bytes: usize,
    /// Most stdout bytes sent back as a reply to `reply_to`.
    pub max_reply_bytes: usize,
    /// Most lines of a job's output (stdout and stderr together) logged.
    pub max_log_lines: usize,
    pub on_connection_loss: OnConnectionLoss,
    /// `consumer_timeout`: passed to the broker per consumer; `None` leaves
    /// it to the default derived from the job's worst case.
    pub consumer_timeout: Option<Duration>,
    /// A message present at this many connection losses in a row is
    /// dead-lettered without running; 0 turns the check off.
    pub max_connection_losses: u32,
    /// Where replies may go.
    pub replies: Replies,
    /// Most bytes of stderr a failure reply carries.
    pub reply_stderr_bytes: usize,
    /// `x-delivery-limit` of `arguments`, if set (negative: unlimited).
    pub delivery_limit: Option<i64>,
    pub sandbox: Sandbox,
    pub policy: Policy,
}

impl QueueConfig {
    /// Name of the retry queue that holds messages for `delay`.
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}", self.name, format_duration(delay))
    }

    /// Name of the dead-letter queue.
    pub fn dead_queue(&self) -> String {
        dead_queue_name(&self.name)
    }
}

/// `[metrics] status_stderr`: how much of the last failed worker's stderr
/// the status page shows (it is the worker's output, and may quote the
/// message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatusStderr {
    /// None of it.
    Off,
    /// Its last non-empty line, cut to 200 characters: what the log line
    /// of a dead letter shows.
    #[default]
    Line,
    /// The last 4 KiB that amqp-exec keeps (what the dead letter's
    /// `x-amqp-exec-stderr` header carries).
    Tail,
}

/// Name of the dead-letter queue of `queue`.
pub fn dead_queue_name(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Lines of one job's output logged when `max_log_lines` is not set: enough
/// for any unit worker's messages, few enough that a worker printing in a
/// loop cannot bury the supervisor's own lines, nor use up journald's rate
/// limit for the whole service.
pub const DEFAULT_MAX_LOG_LINES: usize = 1000;

/// Reads and validates the config at `path`. `amqp_url`, when set (from the
/// `AMQP_URL` environment variable), replaces the broker URLs of the file.
pub fn load(path: &Path, amqp_url: Option<&str>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        message: format!("cannot read the file: {e}"),
    })?;
    parse(&text, path, amqp_url)
}

/// Parses and validates config text; `path` is only used in messages.
pub fn parse(text: &str, path: &Path, amqp_url: Option<&str>) -> Result<Config, ConfigError> {
    let err = |message: String| ConfigError {
        file: path.to_owned(),
        message,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| err(one_line(&e.to_string())))?;

    let broker = parse_broker(raw.broker, amqp_url, path)?;

    let defaults_table = raw.defaults.unwrap_or_default();
    if defaults_table.contains_key("name") {
        return Err(err(
            "[defaults]: key `name` cannot have a default; give each [[queue]] its own name".into(),
        ));
    }
    // Check [defaults] on its own so that a typo there is reported as such.
    RawQueue::deserialize(toml::Value::Table(defaults_table.clone()))
        .map_err(|e| err(format!("[defaults]: {}", one_line(&e.to_string()))))?;

    if raw.queues.is_empty() {
        return Err(err(
            "no [[queue]] table: add at least one queue with `name` and `command`".into(),
        ));
    }
    let mut queues = Vec::with_capacity(raw.queues.len());
    let mut seen = HashSet::new();
    for (index, table) in raw.queues.into_iter().enumerate() {
        let label = match table.get("name").and_then(|v| v.as_str()) {
            Some(name) => format!("queue \"{name}\""),
            None => format!("[[queue]] #{}", index + 1),
        };
        let mut merged = defaults_table.clone();
        merged.extend(table);
        let raw_queue = RawQueue::deserialize(toml::Value::Table(merged))
            .map_err(|e| err(format!("{label}: {}", one_line(&e.to_string()))))?;
        let queue = validate_queue(raw_queue).map_err(|m| err(format!("{label}: {m}")))?;
        if !seen.insert(queue.name.clone()) {
            return Err(err(format!(
                "{label}: duplicate queue name (key `name`); each queue may appear once"
            )));
        }
        queues.push(queue);
    }

    let max_workers = match raw.max_workers {
        Some(n) if !(1..=MAX_WORKERS).contains(&n) => {
            return Err(err(format!(
                "key `max_workers`: must be between 1 and {MAX_WORKERS}"
            )));
        }
        other => other,
    };
    let shutdown_grace = match raw.shutdown_grace {
        Some(s) => parse_duration(&s).map_err(|m| err(format!("key `shutdown_grace`: {m}")))?,
        None => Duration::from_secs(30),
    };

    let signing_key = match &raw.key_file {
        Some(file) => {
            // Relative paths are taken from the config file's folder.
            let file = path.parent().unwrap_or(Path::new(".")).join(file);
            let secret = std::fs::read(&file).map_err(|e| {
                err(format!(
                    "key `key_file`: cannot read {}: {e}",
                    file.display()
                ))
            })?;
            crate::signing::SigningKey::from_secret(&secret, &file)
                .map_err(|m| err(format!("key `key_file`: {m}")))?
        }
        None => crate::signing::SigningKey::random(),
    };

    let status_stderr = match raw
        .metrics
        .as_ref()
        .and_then(|m| m.status_stderr.as_deref())
    {
        None | Some("line") => StatusStderr::Line,
        Some("off") => StatusStderr::Off,
        Some("tail") => StatusStderr::Tail,
        Some(other) => {
            return Err(err(format!(
                "[metrics] key `status_stderr`: {other:?} is not one of \"off\", \"line\", \"tail\""
            )));
        }
    };
    let metrics_listen = match raw.metrics.and_then(|m| m.listen) {
        Some(addr) => Some(addr.parse().map_err(|_| {
            err(format!(
                "[metrics] key `listen`: {addr:?} is not an address:port such as \"127.0.0.1:9464\""
            ))
        })?),
        None => None,
    };

    let tracing = parse_tracing(raw.tracing).map_err(err)?;

    Ok(Config {
        file: path.to_owned(),
        broker,
        max_workers,
        shutdown_grace,
        metrics_listen,
        status_stderr,
        tracing,
        signing_key,
        queues,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/x.toml"), None)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = p("[[queue]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n").unwrap();
        let q = &c.queues[0];
        assert_eq!(q.concurrency, 1);
        assert_eq!(q.prefetch, 1);
        assert_eq!(q.timeout, Duration::from_secs(300));
        assert_eq!(q.policy.max_attempts, 5);
        assert_eq!(q.policy.backoff.len(), 5);
        assert_eq!(c.max_workers, None);
        assert_eq!(c.jobs_at_once(), 1);
        assert_eq!(q.max_connection_losses, 3);
        assert_eq!(q.consumer_timeout, None);
        assert_eq!(q.delivery_limit, None);
        assert_eq!(c.broker.urls, vec![DEFAULT_URL.to_string()]);
        assert_eq!(c.broker.heartbeat, Duration::from_secs(30));
        assert!(q.declare);
        assert_eq!(q.max_log_lines, DEFAULT_MAX_LOG_LINES);
    }

    #[test]
    fn defaults_are_inherited_and_overridden() {
        let c = p(r#"
            max_workers = 3
            [defaults]
            concurrency = 4
            timeout = "2s"
            max_log_lines = 0
            [[queue]]
            name = "a"
            command = ["x"]
            [[queue]]
            name = "b"
            command = ["y"]
            concurrency = 2
            max_log_lines = 20
        "#)
        .unwrap();
        assert_eq!(c.queues[0].max_log_lines, 0);
        assert_eq!(c.queues[1].max_log_lines, 20);
        assert_eq!(c.queues[0].concurrency, 4);
        assert_eq!(c.queues[0].prefetch, 4);
        assert_eq!(c.queues[1].concurrency, 2);
        assert_eq!(c.queues[1].timeout, Duration::from_secs(2));
        assert_eq!(c.max_workers, Some(3));
    }

    #[test]
    fn amqp_url_overrides_file() {
        let c = parse(
            "[broker]\nurl = \"amqp://a:b@h1/%2f\"\n[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n",
            Path::new("c.toml"),
            Some("amqp://u:p@h2/%2f"),
        )
        .unwrap();
        assert_eq!(c.broker.urls, vec!["amqp://u:p@h2/%2f".to_string()]);
    }

    #[test]
    fn password_file_sets_the_password_of_every_url() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cr/et:@\nignored\n").unwrap();
        let text = format!(
            "[broker]\nurls = [\"amqp://app@h1/%2f\", \"amqp://app:old@h2:5673/v\"]\npassword_file = \"{}\"\n[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n",
            pw.display()
        );
        let c = parse(&text, Path::new("c.toml"), None).unwrap();
        for (url, host) in c.broker.urls.iter().zip(["h1", "h2"]) {
            let uri = crate::uri::parse_uri(url).unwrap();
            assert_eq!(uri.authority.userinfo.password, "s3cr/et:@", "{url}");
            assert_eq!(uri.authority.host, host);
        }
        // AMQP_URL gets it too.
        let c = parse(&text, Path::new("c.toml"), Some("amqp://u@h3/%2f")).unwrap();
        let uri = crate::uri::parse_uri(&c.broker.urls[0]).unwrap();
        assert_eq!(uri.authority.userinfo.password, "s3cr/et:@");
        // A systemd credential, and the errors.
        // SAFETY: tests of this module do not read CREDENTIALS_DIRECTORY
        // elsewhere.
        unsafe { std::env::set_var("CREDENTIALS_DIRECTORY", dir.path()) };
        let cred = text.replace(&pw.display().to_string(), "${CREDENTIALS_DIRECTORY}/pw");
        let c = parse(&cred, Path::new("c.toml"), None).unwrap();
        assert!(c.broker.urls[0].contains("s3cr"));
        unsafe { std::env::remove_var("CREDENTIALS_DIRECTORY") };
        let e = parse(&cred, Path::new("c.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`password_file`") && e.contains("LoadCredential"),
            "{e}"
        );
        let missing = text.replace(&pw.display().to_string(), "/nonexistent/pw");
        let e = parse(&missing, Path::new("c.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`password_file`") && e.contains("/nonexistent/pw"),
            "{e}"
        );
        let userless = text.replace("amqp://app@h1/%2f", "amqp://h1/%2f");
        let e = parse(&userless, Path::new("c.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("names no user"), "{e}");
    }

    #[test]
    fn file_urls_are_checked_before_amqp_url_and_errors_name_their_source() {
        let q = "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n";
        let path = Path::new("c.toml");
        // A bad AMQP_URL is reported as AMQP_URL, not as the file's key.
        let e = parse(q, path, Some("amqp://u:topsecret@h:notaport/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("AMQP_URL"), "{e}");
        assert!(!e.contains("c.toml") && !e.contains("`url`"), "{e}");
        assert!(!e.contains("topsecret") && e.contains("u:***@"), "{e}");
        // A bad URL in the file is reported even with a good AMQP_URL.
        for (broker, key) in [
            ("url = \"amqp://u:hidden@h:bad/\"", "`url`"),
            (
                "urls = [\"amqp://h1/%2f\", \"amqp://u:hidden@h:bad/\"]",
                "`urls`",
            ),
        ] {
            let text = format!("[broker]\n{broker}\n{q}");
            let e = parse(&text, path, Some("amqp://u:p@h2/%2f"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("c.toml") && e.contains(key), "{e}");
            assert!(!e.contains("hidden") && !e.contains("AMQP_URL"), "{e}");
        }
        // Both bad: the file's error first.
        let e = parse(
            &format!("[broker]\nurl = \"nope\"\n{q}"),
            path,
            Some("also-nope"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.toml") && e.contains("`url`"), "{e}");
        // An amqp:// AMQP_URL over an amqps:// file URL needs no TLS.
        let c = parse(
            &format!("[broker]\nurl = \"amqps://h1/%2f\"\n{q}"),
            path,
            Some("amqp://h2/%2f"),
        )
        .unwrap();
        assert!(c.broker.tls.is_none());
    }

    fn error_of(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn jobs_at_once_is_max_workers_bounded_by_the_queues() {
        let q = |name: &str, c: usize| {
            format!("[[queue]]\nname = \"{name}\"\ncommand = [\"x\"]\nconcurrency = {c}\n")
        };
        assert_eq!(p(&q("a", 1)).unwrap().jobs_at_once(), 1);
        assert_eq!(p(&(q("a", 1) + &q("b", 3))).unwrap().jobs_at_once(), 4);
        let capped = format!("max_workers = 1\n{}{}", q("a", 2), q("b", 2));
        assert_eq!(p(&capped).unwrap().jobs_at_once(), 1);
        let loose = format!("max_workers = 10\n{}", q("a", 2));
        assert_eq!(p(&loose).unwrap().jobs_at_once(), 2);
    }

    #[test]
    fn errors_name_file_queue_and_key() {
        let e = error_of("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nconcurency = 2\n");
        assert!(e.contains("/etc/x.toml"), "{e}");
        assert!(e.contains("queue \"a\""), "{e}");
        assert!(e.contains("concurency"), "{e}");

        let e = error_of("[[queue]]\nname = \"a\"\ncommand = []\n");
        assert!(e.contains("`command`") && e.contains("queue \"a\""), "{e}");

        let e = error_of("[[queue]]\nname = \"a\"\n");
        assert!(e.contains("`command` is missing"), "{e}");

        let e = error_of("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\ntimeout = \"5 minutes\"\n");
        assert!(e.contains("`timeout`") && e.contains("5 minutes"), "{e}");

        let e = error_of(
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n[[queue]]\nname = \"a\"\ncommand = [\"y\"]\n",
        );
        assert!(e.contains("duplicate") && e.contains("queue \"a\""), "{e}");

        let e =
            error_of("[defaults]\nconcurrenty = 1\n[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n");
        assert!(e.contains("[defaults]") && e.contains("concurrenty"), "{e}");

        let e = error_of("[[queue]]\nname = \"a\"\ncommand = \"x y\"\n");
        assert!(e.contains("queue \"a\"") && e.contains("command"), "{e}");

        let e = error_of(
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n[queue.exit_codes]\n300 = \"ack\"\n",
        );
        assert!(e.contains("exit_codes") && e.contains("300"), "{e}");

        let e = error_of(
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n[queue.exit_codes]\n3 = \"maybe\"\n",
        );
        assert!(e.contains("maybe"), "{e}");

        let e = error_of("bogus = 1\n[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n");
        assert!(e.contains("bogus"), "{e}");

        let e = error_of("");
        assert!(e.contains("no [[queue]]"), "{e}");
    }

    #[test]
    fn values_out_of_range_are_named() {
        let q = "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n";
        for (text, key) in [
            (format!("{q}concurrency = 65536\n"), "`concurrency`"),
            (format!("{q}concurrency = 0\n"), "`concurrency`"),
            (format!("{q}max_attempts = 2147483648\n"), "`max_attempts`"),
            (format!("max_workers = 1000001\n{q}"), "`max_workers`"),
            (
                format!("[broker]\nheartbeat = \"500ms\"\n{q}"),
                "`heartbeat`",
            ),
            (format!("[broker]\nheartbeat = \"0s\"\n{q}"), "`heartbeat`"),
            (
                format!("[broker]\nheartbeat = \"1.5s\"\n{q}"),
                "`heartbeat`",
            ),
            (
                format!("[broker]\nconnect_timeout = \"0s\"\n{q}"),
                "`connect_timeout`",
            ),
            (format!("{q}env = {{ A = \"x\\u0000y\" }}\n"), "`env`"),
            (format!("{q}backoff = [\"0.4ms\"]\n"), "`backoff`"),
            (format!("{q}backoff = [\"1s\", \"1.5ms\"]\n"), "`backoff`"),
            (
                format!("{q}max_reply_bytes = \"17M\"\n"),
                "`max_reply_bytes`",
            ),
            (
                "[[queue]]\nname = \"a\"\ncommand = [\"x\", \"\\u0000\"]\n".to_owned(),
                "`command`",
            ),
            (
                "[[queue]]\nname = \"a\\nb\"\ncommand = [\"x\"]\n".to_owned(),
                "`name`",
            ),
        ] {
            let e = error_of(&text);
            assert!(e.contains(key) && e.contains("/etc/x.toml"), "{text}: {e}");
        }
        let c = p(&format!(
            "max_workers = 1000000\n{q}concurrency = 65535\nmax_attempts = 2147483647\n"
        ))
        .unwrap();
        assert_eq!(c.queues[0].prefetch, 65535);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "5", "s", "5 minutes", "-1s", "1e400s", "1x"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn sandbox_keys() {
        let c = p(r#"
            [metrics]
            listen = "127.0.0.1:9464"
            [[queue]]
            name = "a"
            command = ["x"]
            user = "root"
            group = "0"
            memory_limit = "512M"
            max_open_files = 256
            cpu_time = "1m"
            nice = 10
            max_body_bytes = "1K"
        "#)
        .unwrap();
        let s = &c.queues[0].sandbox;
        assert_eq!(s.user.as_ref().unwrap().uid, 0);
        assert!(s.user.as_ref().unwrap().groups.contains(&0));
        assert_eq!(s.group.as_ref().unwrap().1, 0);
        assert_eq!(s.memory_limit, Some(512 << 20));
        assert_eq!(s.max_open_files, Some(256));
        assert_eq!(s.cpu_time, Some(60));
        assert_eq!(s.nice, Some(10));
        assert_eq!(c.queues[0].max_body_bytes, 1024);
        assert_eq!(c.metrics_listen.unwrap().port(), 9464);

        let e =
            error_of("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nuser = \"no-such-user-here\"\n");
        assert!(
            e.contains("`user`") && e.contains("no-such-user-here"),
            "{e}"
        );
        let e = error_of("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nnice = 40\n");
        assert!(e.contains("`nice`"), "{e}");
        let e = error_of("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nmemory_limit = \"lots\"\n");
        assert!(e.contains("`memory_limit`") && e.contains("lots"), "{e}");
        let e = error_of(
            "[metrics]\nlisten = \"nowhere\"\n[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n",
        );
        assert!(e.contains("[metrics]") && e.contains("nowhere"), "{e}");
        assert_eq!(c.status_stderr, StatusStderr::Line);
        let c =
            p("[metrics]\nstatus_stderr = \"tail\"\n[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n");
        assert_eq!(c.unwrap().status_stderr, StatusStderr::Tail);
        let e = error_of(
            "[metrics]\nstatus_stderr = \"all\"\n[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n",
        );
        assert!(e.contains("`status_stderr`") && e.contains("all"), "{e}");
    }

    #[test]
    fn tracing_table() {
        let q = "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n";
        let c = p(q).unwrap();
        assert_eq!(c.tracing, TracingConfig::default());
        assert!(c.tracing.enabled && c.tracing.new_traces);
        let c = p(&format!(
            "[tracing]\nendpoint = \"http://127.0.0.1:4318\"\nprotocol = \"http/protobuf\"\n\
             service_name = \"billing\"\nnew_traces = false\n{q}"
        ))
        .unwrap();
        assert_eq!(c.tracing.endpoint.as_deref(), Some("http://127.0.0.1:4318"));
        assert_eq!(c.tracing.service_name.as_deref(), Some("billing"));
        assert!(!c.tracing.new_traces);
        for (bad, key) in [
            ("endpoint = \"127.0.0.1:4318\"", "`endpoint`"),
            ("traces_endpoint = \"grpc://x\"", "`traces_endpoint`"),
            ("protocol = \"grpc\"", "`protocol`"),
            ("service_name = \" \"", "`service_name`"),
            ("sampler = \"always_on\"", "sampler"),
        ] {
            let e = error_of(&format!("[tracing]\n{bad}\n{q}"));
            assert!(e.contains("/etc/x.toml") && e.contains(key), "{e}");
        }
    }

    #[test]
    fn topology_keys() {
        let c = p(r#"
            [[queue]]
            name = "a"
            command = ["x"]
            queue_type = "quorum"
            single_active_consumer = true
            max_rate = "14/s"
            [queue.arguments]
            x-max-length = 1000
            x-overflow = "reject-publish"
            [[queue.bind]]
            exchange = "events"
            type = "topic"
            routing_key = "order.*"
        "#)
        .unwrap();
        let q = &c.queues[0];
        assert_eq!(q.queue_type, QueueType::Quorum);
        assert!(q.single_active_consumer);
        assert_eq!(q.max_rate, Some(14.0));
        assert_eq!(q.arguments["x-max-length"], ArgValue::Int(1000));
        assert_eq!(q.bindings[0].kind, "topic");
        assert_eq!(parse_rate("120/m").unwrap(), 2.0);
        for bad in [
            "14", "0/s", "x/s", "1/y", "1e-20/s", "1e-7/s", "inf/s", "NaN/s", "1e309/s",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        // One per 49 days is the lowest rate.
        assert!(parse_rate("0.00086/h").is_ok());
        assert!(parse_rate("0.00084/h").is_err());
        let e = error_of("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nmax_rate = \"1e-20/s\"\n");
        assert!(e.contains("`max_rate`") && e.contains("49 days"), "{e}");
        let e = error_of(
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n[[queue.bind]]\nexchange = \"e\"\ntype = \"weird\"\n",
        );
        assert!(e.contains("bind.type"), "{e}");
        let e = error_of("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nqueue_type = \"stream\"\n");
        assert!(e.contains("stream"), "{e}");
        // Retried messages would be dropped by a full classic queue.
        let overflow = "[queue.arguments]\nx-overflow = \"reject-publish\"\n";
        let e = error_of(&format!(
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n{overflow}"
        ));
        assert!(e.contains("`arguments`") && e.contains("quorum"), "{e}");
        assert!(
            p(&format!(
                "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nmax_attempts = 1\n{overflow}"
            ))
            .is_ok()
        );
    }

    #[test]
    fn settle_keys() {
        let c = p(r#"
            [[queue]]
            name = "a"
            command = ["x"]
            queue_type = "quorum"
            consumer_timeout = "2h"
            max_connection_losses = 0
            [queue.arguments]
            x-delivery-limit = -1
        "#)
        .unwrap();
        let q = &c.queues[0];
        assert_eq!(q.consumer_timeout, Some(Duration::from_secs(7200)));
        assert_eq!(q.max_connection_losses, 0);
        assert_eq!(q.delivery_limit, Some(-1));
        let e =
            error_of("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\nconsumer_timeout = \"30s\"\n");
        assert!(e.contains("`consumer_timeout`") && e.contains("1m"), "{e}");
        let e = error_of(
            "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n[queue.arguments]\nx-delivery-limit = \"5\"\n",
        );
        assert!(e.contains("x-delivery-limit"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10").unwrap(), 10);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2kb").unwrap(), 2048);
        assert!(parse_size("1T").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn exit_codes_table() {
        let c = p("[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n[queue.exit_codes]\n3 = \"dead-letter\"\n4 = \"drop\"\n")
            .unwrap();
        assert_eq!(c.queues[0].policy.exit_codes[&3], Action::DeadLetter);
        assert_eq!(c.queues[0].policy.exit_codes[&4], Action::Drop);
    }
}
