//! Test helpers: the real broker, the real binary, unique queue names,
//! ledgers kept by test workers, and process checks.
#![allow(dead_code)]

pub mod mariadb;
pub mod proxy;
pub mod raw;
pub mod scrape;
pub mod smtp;

use futures_lite::StreamExt;
use lapin::options::{
    BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, message::Delivery};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_amqp-exec");

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `rabbitmqctl` for the broker under test: the program `RABBITMQCTL`
/// names (`deploy/test-brokers.sh env` sets it for its brokers), else the
/// host's `rabbitmqctl`. Every test reaches its broker's `rabbitmqctl`
/// through this.
pub fn rabbitmqctl_command() -> Command {
    let program = std::env::var_os("RABBITMQCTL")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "rabbitmqctl".into());
    Command::new(program)
}

/// Runs `rabbitmqctl` against the broker under test; its output.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = rabbitmqctl_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("this test needs rabbitmqctl for the broker under test: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Every queue's name and `column`, from `rabbitmqctl list_queues`.
pub fn list_queues(column: &str) -> Vec<(String, String)> {
    rabbitmqctl(&["-q", "list_queues", "name", column])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
}

/// A broker user of the test's own, with all rights on the default vhost;
/// deleted when dropped.
pub struct BrokerUser {
    pub name: String,
    pub password: String,
}

impl BrokerUser {
    pub fn add(tag: &str) -> BrokerUser {
        let name = unique(tag);
        let password = format!("pw-{name}");
        rabbitmqctl(&["add_user", &name, &password]);
        let user = BrokerUser { name, password };
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    /// `amqp_url()` with this user's credentials.
    pub fn url(&self) -> String {
        let url = amqp_url();
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{}:{}@{host}", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl_command()
            .args(["delete_user", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// Path of a file under the repository root.
pub fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// A binary of another workspace package (a unit worker), built on first
/// use: `cargo test` builds only the test targets of those packages.
pub fn workspace_bin(package: &str) -> String {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let bin = profile_dir.join(package);
    if !bin.exists() {
        let target_dir = profile_dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                package,
                "--bin",
                package,
                "--target-dir",
            ])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p {package} failed");
    }
    assert!(
        bin.exists(),
        "{} is missing after cargo build",
        bin.display()
    );
    bin.display().to_string()
}

/// A queue name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "test-{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A connection to the real broker, for publishing and inspecting queues.
/// Deletes the queues it was given when dropped.
pub struct Broker {
    pub conn: Connection,
    pub channel: Channel,
    cleanup: Vec<String>,
}

impl Broker {
    /// Connects, or fails the test with a message saying what to start.
    pub async fn connect() -> Broker {
        let url = amqp_url();
        let conn = match tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!(
                "RabbitMQ is not reachable at {url}: {e}. These tests need a real broker: \
                 run deploy/ensure-rabbitmq.sh or set AMQP_URL."
            ),
            Err(_) => panic!(
                "RabbitMQ at {url} did not answer within 10s. These tests need a real broker: \
                 run deploy/ensure-rabbitmq.sh or set AMQP_URL."
            ),
        };
        let channel = conn.create_channel().await.expect("open channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Broker {
            conn,
            channel,
            cleanup: Vec::new(),
        }
    }

    /// Registers a work queue (and its retry and dead queues, by prefix) for
    /// deletion at the end of the test.
    pub fn owns(&mut self, queue: &str) {
        self.cleanup.push(queue.to_owned());
    }

    /// Declares a durable work queue with the dead-letter arguments that
    /// `run` declares it with.
    pub async fn declare(&mut self, queue: &str) {
        let mut args = FieldTable::default();
        amqp_exec::broker::insert_dead_letter_args(&mut args, queue);
        self.declare_with(queue, args).await;
    }

    /// Declares a durable quorum work queue, as `run` does.
    pub async fn declare_quorum(&mut self, queue: &str) {
        let mut args = amqp_exec::broker::type_args(amqp_exec::config::QueueType::Quorum);
        amqp_exec::broker::insert_dead_letter_args(&mut args, queue);
        self.declare_with(queue, args).await;
    }

    /// Declares a durable queue with `args`.
    pub async fn declare_with(&mut self, queue: &str, args: FieldTable) {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap_or_else(|e| panic!("declare queue {queue}: {e}"));
        self.owns(queue);
    }

    /// Messages ready in `queue`, or None if it does not exist.
    pub async fn count(&self, queue: &str) -> Option<u32> {
        let ch = self.conn.create_channel().await.expect("channel");
        let r = amqp_exec::broker::queue_depth(&ch, queue).await.ok();
        let _ = ch.close(200, "ok".into()).await;
        r
    }

    pub async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        let confirm = self.send(queue, body, props).await;
        check_confirm(queue, confirm).await;
    }

    /// A mandatory, persistent publish; returns its pending confirm.
    async fn send(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> lapin::PublisherConfirm {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props.with_delivery_mode(2),
            )
            .await
            .expect("publish")
    }

    /// Publishes many messages with ids, 500 confirms in flight at most.
    pub async fn publish_many(&self, queue: &str, messages: &[(String, Vec<u8>)]) {
        for chunk in messages.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (id, body) in chunk {
                let props = BasicProperties::default().with_message_id(id.as_str().into());
                confirms.push(self.send(queue, body, props).await);
            }
            for c in confirms {
                check_confirm(queue, c).await;
            }
        }
    }

    pub async fn publish_id(&self, queue: &str, id: &str, body: &[u8]) {
        self.publish(
            queue,
            body,
            BasicProperties::default().with_message_id(id.into()),
        )
        .await
    }

    /// Takes every message out of `queue` (acked: they are removed).
    pub async fn drain(&self, queue: &str) -> Vec<Delivery> {
        let mut out = Vec::new();
        while let Ok(Some(m)) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
        {
            out.push(m.delivery);
        }
        out
    }

    /// Waits until `queue` holds `n` messages.
    pub async fn wait_count(&self, queue: &str, n: u32, timeout: Duration) {
        let start = Instant::now();
        loop {
            let c = self.count(queue).await;
            if c == Some(n) {
                return;
            }
            if start.elapsed() > timeout {
                panic!("queue {queue} holds {c:?} messages, expected {n}, after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes the owned queues and their retry and dead queues now.
    pub async fn cleanup(&mut self) {
        let names = std::mem::take(&mut self.cleanup);
        delete_queues(&self.conn, &names).await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.cleanup);
        if names.is_empty() {
            return;
        }
        // A failed test still removes its queues, from a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(conn) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                {
                    delete_queues(&conn, &names).await;
                }
            });
        })
        .join();
    }
}

async fn delete_queues(conn: &Connection, names: &[String]) {
    let mut all = Vec::new();
    for n in names {
        all.push(n.clone());
        all.push(format!("{n}.dead"));
        for d in [
            "100ms", "200ms", "300ms", "500ms", "600ms", "1s", "2s", "10s", "1m", "5m", "30m",
        ] {
            all.push(format!("{n}.retry.{d}"));
        }
    }
    for q in all {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "ok".into()).await;
        }
    }
}

async fn check_confirm(queue: &str, confirm: lapin::PublisherConfirm) {
    let confirm = confirm.await.expect("confirm");
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "publish to {queue} not confirmed: {confirm:?}"
    );
}

/// A header of a delivery as a string, for assertions.
pub fn header(d: &Delivery, key: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    match d.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

pub fn message_id(d: &Delivery) -> String {
    d.properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default()
}

/// A temporary directory with a config file in it.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        Workdir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.file(name);
        std::fs::write(&p, text).expect("write file");
        p
    }

    /// Writes an executable script.
    pub fn script(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.write(name, text);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Waits until the ledger holds at least `n` runs; fails the test after
    /// `timeout` with what it holds.
    pub async fn wait_ledger(&self, n: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            let runs = self.ledger();
            if runs.len() >= n {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "the ledger holds {} of {n} runs after {timeout:?}: {runs:?}",
                runs.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lines of the ledger kept by `workers/testing/record.sh`:
    /// (message id, attempt, start ns, end ns, pid).
    pub fn ledger(&self) -> Vec<Run> {
        let text = std::fs::read_to_string(self.file("ledger")).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Run {
                    id: f[0].to_owned(),
                    attempt: f[1].parse().unwrap_or(0),
                    start: f[2].parse().unwrap_or(0),
                    end: f[3].parse().unwrap_or(0),
                    pid: f.get(4).and_then(|p| p.parse().ok()).unwrap_or(0),
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    pub attempt: u32,
    pub start: u128,
    pub end: u128,
    pub pid: i32,
}

/// Most runs that overlapped in time.
pub fn max_overlap(runs: &[Run]) -> usize {
    let mut events: Vec<(u128, i32)> = Vec::new();
    for r in runs {
        events.push((r.start, 1));
        events.push((r.end, -1));
    }
    // Ends sort before starts at the same instant.
    events.sort();
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in events {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

/// Runs per message id.
pub fn runs_by_id(runs: &[Run]) -> BTreeMap<String, Vec<Run>> {
    let mut m: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for r in runs {
        m.entry(r.id.clone()).or_default().push(r.clone());
    }
    m
}

/// The real `amqp-exec run`, with its log in a file.
pub struct Supervisor {
    pub child: Child,
    pub log: PathBuf,
}

impl Supervisor {
    pub fn start(work: &Workdir, config: &str, args: &[&str]) -> Supervisor {
        Self::start_with_env(work, config, args, &[])
    }

    pub fn start_with_env(
        work: &Workdir,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Supervisor {
        let cfg = work.write("config.toml", config);
        let log = work.file("supervisor.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&cfg)
            .arg("run")
            .args(args)
            .env("AMQP_URL", amqp_url())
            .env("RECORD_DIR", work.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start amqp-exec");
        Supervisor { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Waits for the supervisor to exit; fails the test with its log after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > timeout {
                // What it still runs and its own last lines (without the
                // workers' output) come first, on one line: a long panic
                // message may be cut in the middle.
                let children = children_of(self.pid());
                let log = self.log_text();
                let own: Vec<&str> = log
                    .lines()
                    .filter(|l| !l.contains("amqp_exec::worker:"))
                    .collect();
                let last = own[own.len().saturating_sub(4)..].join(" | ");
                let connections = log.matches("connected to").count();
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "amqp-exec did not exit within {timeout:?}; connections: {connections}; \
                     children: {children:?}; last own lines: {last}\nown lines:\n{}\nlog:\n{}",
                    own[own.len().saturating_sub(25)..].join("\n"),
                    tail(&log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for exit status 0.
    pub async fn wait_success(&mut self, timeout: Duration) {
        let status = self.wait_exit(timeout).await;
        assert!(
            status.success(),
            "amqp-exec exited with {status}; log:\n{}",
            tail(&self.log_text(), 60)
        );
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log_text().contains(needle) {
            if start.elapsed() > timeout {
                panic!(
                    "log never showed {needle:?} within {timeout:?}:\n{}",
                    tail(&self.log_text(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Peak resident memory in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The command lines of `pid`'s children.
pub fn children_of(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()
                })
                == Some(pid)
        })
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            format!("{p}: {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect()
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Alive and not a zombie, allowing a second for a signal already sent to
/// take effect.
pub fn running(pid: i32) -> bool {
    let alive = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    };
    for _ in 0..100 {
        if !alive() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Runs the CLI and returns (status, stdout, stderr).
pub fn cli(args: &[&str], stdin: Option<&[u8]>) -> (ExitStatus, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("AMQP_URL", amqp_url())
        .env_remove("AMQP_EXEC_CONFIG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run amqp-exec");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        s.write_all(input).unwrap();
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Consumes a stream of deliveries from `queue` for tests that need one.
pub async fn first_delivery(channel: &Channel, queue: &str) -> Delivery {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("a delivery within 30s")
        .expect("stream open")
        .expect("delivery")
}

/// GETs `path` on the listener at `port`: (status code, body); code 0
/// when nothing listens (yet).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (code, body)
}
