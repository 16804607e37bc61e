//! Validation: the raw config, checked key by key, into the typed
//! structs, with errors that name the key. Also the checks that need the
//! system: users and groups, capabilities, the broker password file.

use super::command::{executable_by, resolve_existing};
use super::raw::*;
use super::values::*;
use super::*;
use crate::policy::Policy;

/// The `[broker]` table, its URLs replaced by `amqp_url` (AMQP_URL) when
/// set. The file's URLs are checked first, so that a mistake there shows
/// even while AMQP_URL replaces them; a bad AMQP_URL is reported as such.
pub(super) fn parse_broker(
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
pub(super) enum UrlSource {
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

pub(super) fn parse_broker_table(
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
pub(super) fn read_password(file: &Path) -> Result<String, String> {
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
pub(super) fn with_password(url: &str, password: &str) -> Result<String, String> {
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
pub(super) fn parse_replies(v: Option<toml::Value>) -> Result<Replies, String> {
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

pub(super) const CAP_SETGID: u32 = 6;
pub(super) const CAP_SETUID: u32 = 7;

pub(super) fn validate_queue(raw: RawQueue) -> Result<QueueConfig, String> {
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
        prefetch_adapts: raw.prefetch.is_none(),
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

pub(super) fn arg_table(t: &toml::Table) -> Result<BTreeMap<String, ArgValue>, String> {
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

pub(super) fn lookup_user(name: &str) -> Result<UserIdentity, String> {
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

pub(super) fn lookup_group(name: &str) -> Result<(String, u32), String> {
    let group = match name.parse::<u32>() {
        Ok(gid) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)),
        Err(_) => nix::unistd::Group::from_name(name),
    }
    .map_err(|e| format!("cannot look up group {name:?}: {e}"))?
    .ok_or_else(|| format!("no such group {name:?}"))?;
    Ok((group.name, group.gid.as_raw()))
}
