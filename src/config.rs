//! Configuration: reads the TOML file, applies `[defaults]` and environment
//! overrides, and validates everything into typed structs.
//!
//! Every error names the file, the queue (where there is one) and the key, so
//! that an operator can fix it without reading the source. A config error makes
//! the binary exit with [`EX_CONFIG`].

use crate::policy::{Action, Policy};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    exchange: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    routing_key: Option<String>,
    arguments: Option<toml::Table>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    pub command: Vec<String>,
    pub concurrency: usize,
    pub prefetch: u16,
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

/// Name of the dead-letter queue of `queue`.
pub fn dead_queue_name(queue: &str) -> String {
    format!("{queue}.dead")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    broker: Option<RawBroker>,
    defaults: Option<toml::Table>,
    max_workers: Option<usize>,
    shutdown_grace: Option<String>,
    key_file: Option<PathBuf>,
    metrics: Option<RawMetrics>,
    #[serde(default, rename = "queue")]
    queues: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Option<String>,
    urls: Option<Vec<String>>,
    heartbeat: Option<String>,
    connect_timeout: Option<String>,
    password_file: Option<PathBuf>,
    tls: Option<RawTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

/// A size: a number of bytes, or a string with a unit ("512K", "64M", "1G").
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// Lines of one job's output logged when `max_log_lines` is not set: enough
/// for any unit worker's messages, few enough that a worker printing in a
/// loop cannot bury the supervisor's own lines, nor use up journald's rate
/// limit for the whole service.
pub const DEFAULT_MAX_LOG_LINES: usize = 1000;

/// One `[[queue]]` table, or `[defaults]`: every key is optional here and
/// checked after the defaults are merged in.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    name: Option<String>,
    command: Option<Vec<String>>,
    concurrency: Option<usize>,
    prefetch: Option<u32>,
    env: Option<BTreeMap<String, String>>,
    clear_env: Option<bool>,
    working_dir: Option<PathBuf>,
    declare: Option<bool>,
    queue_type: Option<QueueType>,
    arguments: Option<toml::Table>,
    bind: Option<Vec<RawBinding>>,
    single_active_consumer: Option<bool>,
    max_rate: Option<String>,
    timeout: Option<String>,
    kill_grace: Option<String>,
    max_attempts: Option<u32>,
    backoff: Option<Vec<String>>,
    exit_codes: Option<BTreeMap<String, Action>>,
    max_body_bytes: Option<RawSize>,
    max_reply_bytes: Option<RawSize>,
    max_log_lines: Option<usize>,
    on_connection_loss: Option<OnConnectionLoss>,
    consumer_timeout: Option<String>,
    max_connection_losses: Option<u32>,
    replies: Option<toml::Value>,
    reply_stderr_bytes: Option<RawSize>,
    max_core_size: Option<RawSize>,
    user: Option<String>,
    group: Option<String>,
    memory_limit: Option<RawSize>,
    max_open_files: Option<u64>,
    cpu_time: Option<String>,
    nice: Option<i32>,
}

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

    let metrics_listen = match raw.metrics.and_then(|m| m.listen) {
        Some(addr) => Some(addr.parse().map_err(|_| {
            err(format!(
                "[metrics] key `listen`: {addr:?} is not an address:port such as \"127.0.0.1:9464\""
            ))
        })?),
        None => None,
    };

    Ok(Config {
        file: path.to_owned(),
        broker,
        max_workers,
        shutdown_grace,
        metrics_listen,
        signing_key,
        queues,
    })
}

/// The `[broker]` table, its URLs replaced by `amqp_url` (AMQP_URL) when
/// set. The file's URLs are checked first, so that a mistake there shows
/// even while AMQP_URL replaces them; a bad AMQP_URL is reported as such.
fn parse_broker(
    raw: Option<RawBroker>,
    amqp_url: Option<&str>,
    path: &Path,
) -> Result<BrokerConfig, ConfigError> {
    let err = |message: String| ConfigError {
        file: path.to_owned(),
        message,
    };
    parse_broker_table(raw, amqp_url, path).map_err(|e| match e {
        UrlSource::File(m) => err(m),
        UrlSource::Env(m) => ConfigError {
            file: PathBuf::new(),
            message: m,
        },
    })
}

/// Where a broker setting error comes from.
enum UrlSource {
    File(String),
    Env(String),
}

impl From<String> for UrlSource {
    fn from(m: String) -> Self {
        UrlSource::File(m)
    }
}

impl From<&str> for UrlSource {
    fn from(m: &str) -> Self {
        UrlSource::File(m.to_owned())
    }
}

fn parse_broker_table(
    raw: Option<RawBroker>,
    amqp_url: Option<&str>,
    path: &Path,
) -> Result<BrokerConfig, UrlSource> {
    let raw = raw.unwrap_or(RawBroker {
        url: None,
        urls: None,
        heartbeat: None,
        connect_timeout: None,
        password_file: None,
        tls: None,
    });
    let (urls, key) = match (raw.url, raw.urls) {
        (Some(_), Some(_)) => {
            return Err("[broker]: give either `url` or `urls`, not both".into());
        }
        (Some(u), None) => (vec![u], "url"),
        (None, Some(list)) => (list, "urls"),
        (None, None) => (vec![DEFAULT_URL.to_owned()], "url"),
    };
    if urls.is_empty() {
        return Err("[broker] key `urls`: the list is empty".into());
    }
    let mut tls_wanted = false;
    for u in &urls {
        let uri = crate::uri::parse_uri(u).map_err(|e| format!("[broker] key `{key}`: {e}"))?;
        tls_wanted |= uri.scheme == lapin::uri::AMQPScheme::AMQPS;
    }
    let urls = match amqp_url.filter(|u| !u.is_empty()) {
        Some(u) => {
            let uri = crate::uri::parse_uri(u).map_err(|e| {
                UrlSource::Env(format!(
                    "the AMQP_URL environment variable (it replaces the config's broker URLs): {e}"
                ))
            })?;
            tls_wanted = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
            vec![u.to_owned()]
        }
        None => urls,
    };
    let urls = match &raw.password_file {
        Some(file) => {
            let password = read_password(file)?;
            urls.iter()
                .map(|u| with_password(u, &password))
                .collect::<Result<Vec<_>, _>>()?
        }
        None => urls,
    };
    let heartbeat = match raw.heartbeat {
        Some(s) => parse_duration(&s).map_err(|m| format!("[broker] key `heartbeat`: {m}"))?,
        None => Duration::from_secs(30),
    };
    // AMQP negotiates whole seconds, and 0 would leave the choice to the broker.
    if heartbeat < Duration::from_secs(1)
        || heartbeat.as_secs() > u64::from(u16::MAX)
        || heartbeat.subsec_nanos() != 0
    {
        return Err("[broker] key `heartbeat`: must be whole seconds between 1s and 65535s".into());
    }
    let connect_timeout = match raw.connect_timeout {
        Some(s) => {
            parse_duration(&s).map_err(|m| format!("[broker] key `connect_timeout`: {m}"))?
        }
        None => Duration::from_secs(10),
    };
    if connect_timeout.is_zero() {
        return Err("[broker] key `connect_timeout`: must be greater than 0".into());
    }
    let tls = match (raw.tls, tls_wanted) {
        (Some(t), _) => {
            // Relative paths are taken from the config file's folder.
            let dir = path.parent().unwrap_or(Path::new("."));
            let resolve = |p: Option<PathBuf>| p.map(|p| dir.join(p));
            Some(crate::tls::build(crate::tls::TlsSettings {
                ca_file: resolve(t.ca_file),
                cert_file: resolve(t.cert_file),
                key_file: resolve(t.key_file),
                server_name: t.server_name,
                insecure_skip_verify: t.insecure_skip_verify,
            })?)
        }
        (None, true) => Some(crate::tls::build(crate::tls::TlsSettings::default())?),
        (None, false) => None,
    };
    Ok(BrokerConfig {
        urls,
        heartbeat,
        connect_timeout,
        tls,
    })
}

/// The broker password in `password_file`: its first line. A path that
/// starts with `${CREDENTIALS_DIRECTORY}/` is taken from the directory where
/// systemd puts the service's credentials (`LoadCredential=`).
fn read_password(file: &Path) -> Result<String, String> {
    let text = file.to_string_lossy();
    let path = match text.strip_prefix("${CREDENTIALS_DIRECTORY}/") {
        Some(name) => match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => PathBuf::from(dir).join(name),
            None => {
                return Err(format!(
                    "[broker] key `password_file`: {text} names a systemd credential, but \
                     CREDENTIALS_DIRECTORY is not set (the unit's LoadCredential= sets it)"
                ));
            }
        },
        None => file.to_owned(),
    };
    let content = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "[broker] key `password_file`: cannot read {}: {e}",
            path.display()
        )
    })?;
    let password = content.lines().next().unwrap_or("").to_owned();
    if password.is_empty() {
        return Err(format!(
            "[broker] key `password_file`: {} is empty",
            path.display()
        ));
    }
    Ok(password)
}

/// `url` with `password` as its password; it must name a user.
fn with_password(url: &str, password: &str) -> Result<String, String> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        format!(
            "[broker] key `password_file`: {}: {e}",
            crate::uri::redact(url)
        )
    })?;
    if parsed.username().is_empty() {
        return Err(format!(
            "[broker] key `password_file`: the URL {} names no user to give the password to",
            crate::uri::redact(url)
        ));
    }
    parsed.set_password(Some(password)).map_err(|()| {
        format!(
            "[broker] key `password_file`: cannot set a password in {}",
            crate::uri::redact(url)
        )
    })?;
    Ok(parsed.to_string())
}

/// The `replies` key: `"direct"`, `"off"`, or a list of queue names (a
/// trailing `*` matches any rest).
fn parse_replies(v: Option<toml::Value>) -> Result<Replies, String> {
    let bad = || {
        "key `replies`: \"direct\", \"off\", or a list of queue names (a trailing `*` \
         matches any rest)"
            .to_owned()
    };
    match v {
        None => Ok(Replies::Direct),
        Some(toml::Value::String(s)) => match s.as_str() {
            "direct" => Ok(Replies::Direct),
            "off" => Ok(Replies::Off),
            _ => Err(bad()),
        },
        Some(toml::Value::Array(items)) => {
            let mut names = Vec::with_capacity(items.len());
            for item in items {
                let name = item.as_str().ok_or_else(bad)?;
                let stem = name.strip_suffix('*').unwrap_or(name);
                if name.is_empty() || name == "*" || stem.contains('*') || name.len() > 255 {
                    return Err(format!(
                        "key `replies`: {name:?} is not a queue name or a prefix with a trailing `*`"
                    ));
                }
                names.push(name.to_owned());
            }
            if names.is_empty() {
                return Err("key `replies`: the list is empty; use \"off\" for no replies".into());
            }
            Ok(Replies::Allow(names))
        }
        Some(_) => Err(bad()),
    }
}

/// Whether this process may run processes as another user or group: root,
/// or the capability (`CAP_SETUID` 7, `CAP_SETGID` 6) in its effective set.
pub fn has_capability(bit: u32) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

fn validate_queue(raw: RawQueue) -> Result<QueueConfig, String> {
    let name = raw.name.ok_or("key `name` is missing")?;
    if name.is_empty() {
        return Err("key `name`: must not be empty".into());
    }
    // Leave room for the ".retry.<delay>" suffix within AMQP's 255-byte limit.
    if name.len() > 200 {
        return Err("key `name`: at most 200 bytes".into());
    }
    if name.chars().any(char::is_control) {
        return Err(format!("key `name`: {name:?} contains a control character"));
    }
    let command = raw.command.ok_or(
        "key `command` is missing (an argv array, e.g. [\"/usr/bin/php\", \"worker.php\"])",
    )?;
    if command.is_empty() || command[0].is_empty() {
        return Err("key `command`: must not be empty; it is an argv array whose first element is the program".into());
    }
    // No process can be started with a NUL byte in its arguments.
    if let Some(arg) = command.iter().find(|a| a.contains('\0')) {
        return Err(format!("key `command`: {arg:?} contains a NUL byte"));
    }
    let concurrency = raw.concurrency.unwrap_or(1);
    // More workers than the broker may send unacked deliveries could never run.
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        return Err(format!(
            "key `concurrency`: must be between 1 and {MAX_CONCURRENCY}"
        ));
    }
    let prefetch = raw.prefetch.unwrap_or(concurrency as u32);
    if prefetch == 0 || prefetch > 65535 {
        return Err("key `prefetch`: must be between 1 and 65535".into());
    }
    for (key, value) in raw.env.iter().flatten() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(format!("key `env`: invalid variable name {key:?}"));
        }
        if value.contains('\0') {
            return Err(format!("key `env`: the value of {key} contains a NUL byte"));
        }
    }
    let duration = |key: &str, value: Option<String>, default: Duration| match value {
        Some(s) => parse_duration(&s).map_err(|m| format!("key `{key}`: {m}")),
        None => Ok(default),
    };
    let timeout = duration("timeout", raw.timeout, Duration::from_secs(300))?;
    if timeout.is_zero() {
        return Err("key `timeout`: must be greater than 0".into());
    }
    let kill_grace = duration("kill_grace", raw.kill_grace, Duration::from_secs(10))?;
    let max_attempts = raw.max_attempts.unwrap_or(5);
    // The attempt number travels as a signed 32-bit header.
    if max_attempts == 0 || max_attempts > i32::MAX as u32 {
        return Err(format!(
            "key `max_attempts`: must be between 1 and {}",
            i32::MAX
        ));
    }
    let backoff = match raw.backoff {
        Some(list) => {
            if list.is_empty() {
                return Err("key `backoff`: give at least one delay".into());
            }
            let mut out = Vec::with_capacity(list.len());
            for s in list {
                let d = parse_duration(&s).map_err(|m| format!("key `backoff`: {m}"))?;
                // Whole milliseconds: the retry queue's name and TTL are in ms.
                if d.is_zero()
                    || !d.subsec_nanos().is_multiple_of(1_000_000)
                    || d.as_millis() > u128::from(u32::MAX)
                {
                    return Err(format!(
                        "key `backoff`: {s:?} must be whole milliseconds, between 1ms and 49 days"
                    ));
                }
                out.push(d);
            }
            out
        }
        None => ["1s", "10s", "1m", "5m", "30m"]
            .iter()
            .map(|s| parse_duration(s).expect("valid default"))
            .collect(),
    };
    let mut exit_codes = BTreeMap::new();
    for (code, action) in raw.exit_codes.unwrap_or_default() {
        let n: i32 = code
            .parse()
            .ok()
            .filter(|n| (0..=255).contains(n))
            .ok_or_else(|| format!("key `exit_codes`: {code:?} is not an exit code (0 to 255)"))?;
        exit_codes.insert(n, action);
    }
    let max_body_bytes = match raw.max_body_bytes {
        Some(v) => size_of(v).map_err(|m| format!("key `max_body_bytes`: {m}"))? as usize,
        None => 64 * 1024 * 1024,
    };
    let arguments = match raw.arguments {
        Some(t) => arg_table(&t).map_err(|m| format!("key `arguments`: {m}"))?,
        None => BTreeMap::new(),
    };
    for (reserved, key) in [
        ("x-queue-type", "queue_type"),
        ("x-single-active-consumer", "single_active_consumer"),
    ] {
        if arguments.contains_key(reserved) {
            return Err(format!(
                "key `arguments`: set {reserved} with the `{key}` key instead, so that the retry \
                 and dead-letter queues match"
            ));
        }
    }
    // A classic queue drops what its retry queues dead-letter back to it
    // while it is full with reject-publish (dead-lettering into it is
    // at-most-once); a quorum queue takes those messages in.
    if raw.queue_type.unwrap_or(QueueType::Classic) == QueueType::Classic
        && max_attempts > 1
        && matches!(arguments.get("x-overflow"), Some(ArgValue::Str(v)) if v.starts_with("reject-publish"))
    {
        return Err(
            "key `arguments`: x-overflow = \"reject-publish\" on a classic queue loses retried \
             messages (the broker drops a message coming back from a retry queue while the queue \
             is full); set queue_type = \"quorum\", or max_attempts = 1"
                .into(),
        );
    }
    let delivery_limit = match arguments.get("x-delivery-limit") {
        None => None,
        Some(ArgValue::Int(n)) => Some(*n),
        Some(_) => {
            return Err(
                "key `arguments`: x-delivery-limit must be an integer (negative: unlimited)".into(),
            );
        }
    };
    // RabbitMQ checks a consumer's timeout about once a minute, and takes
    // none below one minute.
    let consumer_timeout = match raw.consumer_timeout {
        Some(s) => {
            let d = parse_duration(&s).map_err(|m| format!("key `consumer_timeout`: {m}"))?;
            if d < Duration::from_secs(60) {
                return Err(format!(
                    "key `consumer_timeout`: {s:?} is below RabbitMQ's minimum of 1m"
                ));
            }
            Some(d)
        }
        None => None,
    };
    let mut bindings = Vec::new();
    for b in raw.bind.unwrap_or_default() {
        let kind = b.kind.unwrap_or_else(|| "direct".into());
        if !["direct", "topic", "fanout", "headers"].contains(&kind.as_str()) {
            return Err(format!(
                "key `bind.type`: {kind:?} is not one of direct, topic, fanout, headers"
            ));
        }
        if b.exchange.is_empty() || b.exchange.starts_with("amq.") {
            return Err(format!(
                "key `bind.exchange`: {:?} cannot be declared (empty or reserved amq.*)",
                b.exchange
            ));
        }
        bindings.push(Binding {
            exchange: b.exchange,
            kind,
            routing_key: b.routing_key.unwrap_or_default(),
            arguments: match b.arguments {
                Some(t) => arg_table(&t).map_err(|m| format!("key `bind.arguments`: {m}"))?,
                None => BTreeMap::new(),
            },
        });
    }
    let max_rate = match raw.max_rate {
        Some(s) => Some(parse_rate(&s).map_err(|m| format!("key `max_rate`: {m}"))?),
        None => None,
    };
    // RabbitMQ (from 4.0 on, by default) closes the channel of a larger
    // message: the reply would fail, and the request run again, for ever.
    const MAX_REPLY: u64 = 16 * 1024 * 1024;
    let max_reply_bytes = match raw.max_reply_bytes {
        Some(v) => match size_of(v).map_err(|m| format!("key `max_reply_bytes`: {m}"))? {
            n if n > MAX_REPLY => {
                return Err(
                    "key `max_reply_bytes`: at most 16M, RabbitMQ's default max_message_size"
                        .into(),
                );
            }
            n => n as usize,
        },
        None => MAX_REPLY as usize,
    };
    let sandbox = Sandbox {
        user: match raw.user {
            Some(name) => Some(lookup_user(&name).map_err(|m| format!("key `user`: {m}"))?),
            None => None,
        },
        group: match raw.group {
            Some(name) => Some(lookup_group(&name).map_err(|m| format!("key `group`: {m}"))?),
            None => None,
        },
        memory_limit: match raw.memory_limit {
            Some(v) => Some(size_of(v).map_err(|m| format!("key `memory_limit`: {m}"))?),
            None => None,
        },
        max_open_files: match raw.max_open_files {
            Some(0) => return Err("key `max_open_files`: must be at least 1".into()),
            other => other,
        },
        cpu_time: match raw.cpu_time {
            Some(s) => {
                let d = parse_duration(&s).map_err(|m| format!("key `cpu_time`: {m}"))?;
                if d.subsec_nanos() != 0 || d.is_zero() {
                    return Err(format!(
                        "key `cpu_time`: {s:?} must be a whole number of seconds, at least 1s"
                    ));
                }
                Some(d.as_secs())
            }
            None => None,
        },
        nice: match raw.nice {
            Some(n) if !(-20..=19).contains(&n) => {
                return Err(format!("key `nice`: {n} is outside -20..19"));
            }
            other => other,
        },
        core_size: match raw.max_core_size {
            Some(v) => Some(size_of(v).map_err(|m| format!("key `max_core_size`: {m}"))?),
            None => None,
        },
    };
    // A user or group the supervisor cannot switch to would pause the
    // queue for ever: say so now.
    let euid = nix::unistd::geteuid().as_raw();
    if let Some(user) = &sandbox.user
        && user.uid != euid
        && !has_capability(CAP_SETUID)
    {
        return Err(format!(
            "key `user`: the supervisor runs as uid {euid} and cannot run workers as {} (uid {}): \
             that needs root or CAP_SETUID; remove `user`, or run the supervisor as root",
            user.name, user.uid
        ));
    }
    if let (None, Some((name, gid))) = (&sandbox.user, &sandbox.group)
        && !has_capability(CAP_SETGID)
        && *gid != nix::unistd::getegid().as_raw()
    {
        return Err(format!(
            "key `group`: the supervisor cannot run workers with group {name} (gid {gid}) \
             without root or CAP_SETGID; set `user` too and run the supervisor as root, or \
             remove `group`"
        ));
    }
    if let Some(user) = &sandbox.user {
        let gid = sandbox.group.as_ref().map_or(user.gid, |(_, g)| *g);
        let mut gids = user.groups.clone();
        gids.push(gid);
        if let Some(program) = resolve_existing(&command[0], &raw.env, raw.working_dir.as_deref())
            && let Err(e) = executable_by(&program, user.uid, &gids)
        {
            return Err(format!(
                "key `command`: {e} by user {} (key `user`)",
                user.name
            ));
        }
    }
    let replies = parse_replies(raw.replies)?;
    let reply_stderr_bytes = match raw.reply_stderr_bytes {
        Some(v) => match size_of(v).map_err(|m| format!("key `reply_stderr_bytes`: {m}"))? {
            n if n > 4096 => {
                return Err(
                    "key `reply_stderr_bytes`: at most 4K, the stderr tail amqp-exec keeps".into(),
                );
            }
            n => n as usize,
        },
        None => match replies {
            Replies::Allow(_) => 4096,
            Replies::Direct | Replies::Off => 0,
        },
    };
    Ok(QueueConfig {
        name,
        command,
        concurrency,
        prefetch: prefetch as u16,
        env: raw.env.unwrap_or_default(),
        clear_env: raw.clear_env.unwrap_or(false),
        working_dir: raw.working_dir,
        declare: raw.declare.unwrap_or(true),
        queue_type: raw.queue_type.unwrap_or(QueueType::Classic),
        arguments,
        bindings,
        single_active_consumer: raw.single_active_consumer.unwrap_or(false),
        max_rate,
        timeout,
        kill_grace,
        max_body_bytes,
        max_reply_bytes,
        max_log_lines: raw.max_log_lines.unwrap_or(DEFAULT_MAX_LOG_LINES),
        on_connection_loss: raw.on_connection_loss.unwrap_or(OnConnectionLoss::Finish),
        consumer_timeout,
        max_connection_losses: raw.max_connection_losses.unwrap_or(3),
        replies,
        reply_stderr_bytes,
        delivery_limit,
        sandbox,
        policy: Policy {
            max_attempts,
            backoff,
            exit_codes,
        },
    })
}

fn arg_table(t: &toml::Table) -> Result<BTreeMap<String, ArgValue>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in t {
        let value = match v {
            toml::Value::Integer(n) => ArgValue::Int(*n),
            toml::Value::Float(f) => ArgValue::Float(*f),
            toml::Value::Boolean(b) => ArgValue::Bool(*b),
            toml::Value::String(s) => ArgValue::Str(s.clone()),
            _ => {
                return Err(format!(
                    "{k}: only numbers, booleans and strings are supported"
                ));
            }
        };
        out.insert(k.clone(), value);
    }
    Ok(out)
}

/// Parses a rate: "14/s", "100/m", "3600/h".
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let bad =
        || format!("bad rate {s:?}: write a count per unit, e.g. \"14/s\", \"100/m\", \"500/h\"");
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let n: f64 = n.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(bad());
    }
    let rate = n / per;
    // Starts are spaced 1/rate apart: keep that within what a timer holds.
    if !(rate.is_finite() && rate >= MIN_RATE) {
        return Err(format!(
            "rate {s:?} is out of range: at least one per 49 days, e.g. \"1/h\""
        ));
    }
    Ok(rate)
}

/// Lowest `max_rate`, per second: one start per 49 days.
const MIN_RATE: f64 = 1.0 / (49.0 * 86_400.0);

fn size_of(raw: RawSize) -> Result<u64, String> {
    match raw {
        RawSize::Bytes(n) => Ok(n),
        RawSize::Text(s) => parse_size(&s),
    }
}

/// Parses sizes: a number of bytes with an optional unit K, M, G (powers of
/// 1024, with or without a trailing "B" or "iB").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || format!("bad size {s:?}: write bytes or a number with K, M or G, e.g. \"64M\"");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

fn lookup_user(name: &str) -> Result<UserIdentity, String> {
    let user = match name.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(name),
    }
    .map_err(|e| format!("cannot look up user {name:?}: {e}"))?
    .ok_or_else(|| format!("no such user {name:?}"))?;
    let cname = std::ffi::CString::new(user.name.clone())
        .map_err(|_| format!("user name {name:?} contains a NUL byte"))?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|_| vec![user.gid.as_raw()]);
    Ok(UserIdentity {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
        home: user.dir,
    })
}

fn lookup_group(name: &str) -> Result<(String, u32), String> {
    let group = match name.parse::<u32>() {
        Ok(gid) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)),
        Err(_) => nix::unistd::Group::from_name(name),
    }
    .map_err(|e| format!("cannot look up group {name:?}: {e}"))?
    .ok_or_else(|| format!("no such group {name:?}"))?;
    Ok((group.name, group.gid.as_raw()))
}

/// Parses durations written as a number and a unit: `500ms`, `30s`, `5m`,
/// `1h`, `1d`, or `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || {
        format!(
            "bad duration {s:?}: write a number and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"1h\""
        )
    };
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    const MAX_MS: u64 = 1_000_000_000_000; // about 31 years
    if !number.contains('.') {
        // Whole numbers are exact.
        let n: u64 = number.parse().map_err(|_| bad())?;
        return match n.checked_mul(unit_ms) {
            Some(ms) if ms <= MAX_MS => Ok(Duration::from_millis(ms)),
            _ => Err(bad()),
        };
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let ms = value * unit_ms as f64;
    if !ms.is_finite() || ms > MAX_MS as f64 {
        return Err(bad());
    }
    // Fractions are kept to the microsecond.
    Ok(Duration::from_micros((ms * 1000.0).round() as u64))
}

/// Formats a duration in the shortest unit that keeps it whole: `500ms`,
/// `10s`, `5m`, `1h`. Used in retry queue names.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Finds `program` as the worker's `execvp` will: as a path when it has a
/// slash (relative to `working_dir` when one is set), else in `path`.
pub fn resolve_command(
    program: &str,
    path: Option<&std::ffi::OsStr>,
    working_dir: Option<&Path>,
) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = match working_dir {
            Some(dir) if Path::new(program).is_relative() => dir.join(program),
            _ => PathBuf::from(program),
        };
        return executable(&p).map(|_| p);
    }
    let default_path = std::ffi::OsString::from("/usr/local/bin:/usr/bin:/bin");
    let search = path.unwrap_or(&default_path);
    for dir in std::env::split_paths(search) {
        let candidate = dir.join(program);
        if executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!("command \"{program}\" not found in PATH"))
}

/// Checks that `path` is an executable file for this process.
fn executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("command {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("command {} is not a file", path.display()));
    }
    if meta.permissions().mode() & 0o111 == 0
        || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err()
    {
        return Err(format!("command {} is not executable", path.display()));
    }
    Ok(())
}

/// `program` as [`resolve_command`] finds it for a queue with `env` and
/// `working_dir`, if it is there (a missing command pauses its queue, and
/// is no config error).
fn resolve_existing(
    program: &str,
    env: &Option<BTreeMap<String, String>>,
    working_dir: Option<&Path>,
) -> Option<PathBuf> {
    let path = match env.as_ref().and_then(|e| e.get("PATH")) {
        Some(p) => Some(std::ffi::OsString::from(p)),
        None => std::env::var_os("PATH"),
    };
    resolve_command(program, path.as_deref(), working_dir).ok()
}

/// Checks that the file at `path` may be executed by user `uid` with the
/// groups `gids`, by its mode bits (root needs any execute bit).
pub fn executable_by(path: &Path, uid: u32, gids: &[u32]) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("command {}: {e}", path.display()))?;
    let mode = meta.mode();
    let allowed = if uid == 0 {
        mode & 0o111 != 0
    } else if meta.uid() == uid {
        mode & 0o100 != 0
    } else if gids.contains(&meta.gid()) {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    };
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "command {} (mode {:o}, owner {}:{}) cannot be executed",
            path.display(),
            mode & 0o7777,
            meta.uid(),
            meta.gid()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
