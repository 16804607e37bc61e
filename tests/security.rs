//! What a publisher, or a worker, can make the supervisor do: replies aimed
//! at other queues, forged control headers, the broker password in
//! `/proc`, identities the supervisor cannot take, and orphans when it runs
//! as PID 1. Real broker, real processes; some tests run the supervisor as
//! an unprivileged user of their own.

mod common;

use common::scrape::free_port;
use common::*;
use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use nix::sys::signal::Signal;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The value of a metric line `name{labels}` on the metrics page at `port`.
fn metric(port: u16, name_and_labels: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut page = String::new();
    s.read_to_string(&mut page).ok()?;
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
}

/// A worker that records each run in the ledger (with its attempt) and its
/// environment under `$RECORD_DIR/env.<message id>`, then exits `code`.
fn recording(work: &Workdir, code: i32) -> String {
    let w = work.script(
        &format!("record-{code}.sh"),
        &format!(
            "#!/bin/sh\ncat > /dev/null\nenv > \"$RECORD_DIR/env.$AMQP_EXEC_MESSAGE_ID\"\n\
             echo \"$AMQP_EXEC_MESSAGE_ID $AMQP_EXEC_ATTEMPT $(date +%s%N) $(date +%s%N) $$\" >> \"$RECORD_DIR/ledger\"\n\
             echo \"INJECTED? $AMQP_EXEC_QUEUE\"\nexit {code}\n"
        ),
    );
    w.display().to_string()
}

/// A publisher sets `reply_to` to queues it may not publish to itself: the
/// supervisor's other work queue, its dead-letter and retry queues, and an
/// unrelated named queue. None of them gets anything, the other queue's
/// worker never runs, and each refusal is counted; a direct reply-to
/// requester, `publish --reply` and a server-named reply queue still get
/// their replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_cannot_aim_replies_at_other_queues() {
    let mut broker = Broker::connect().await;
    let (a, b, victim) = (unique("sec-a"), unique("sec-b"), unique("sec-victim"));
    broker.declare(&a).await;
    broker.declare(&b).await;
    broker.declare(&victim).await;
    let work = Workdir::new();
    let port = free_port();
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[queue]]\nname = \"{a}\"\ncommand = [\"/bin/cat\"]\nbackoff = [\"1s\"]\n\
         [[queue]]\nname = \"{b}\"\ncommand = [\"{}\"]\nbackoff = [\"1s\"]\n",
        recording(&work, 0)
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    while sup.log_text().matches("consuming").count() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let targets = [
        b.clone(),
        format!("{b}.dead"),
        format!("{b}.retry.1s"),
        victim.clone(),
    ];
    for (i, to) in targets.iter().enumerate() {
        broker
            .publish(
                &a,
                b"INJECTED JOB",
                BasicProperties::default()
                    .with_message_id(format!("inject-{i}").as_str().into())
                    .with_reply_to(to.as_str().into()),
            )
            .await;
    }
    broker.wait_count(&a, 0, Duration::from_secs(20)).await;
    let label = format!("amqp_exec_refused_replies_total{{queue=\"{a}\"}}");
    let start = Instant::now();
    while metric(port, &label) != Some(4.0) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "refusals counted: {:?}\n{}",
            metric(port, &label),
            tail(&sup.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A direct reply-to requester, through the CLI.
    let (status, stdout, stderr) = cli(
        &["publish", "--queue", &a, "--reply", "--body", "pong"],
        None,
    );
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "pong");
    // A server-named exclusive reply queue.
    let channel = broker.conn.create_channel().await.unwrap();
    let own = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(own.name().as_str().starts_with("amq.gen-"));
    broker
        .publish(
            &a,
            b"ping",
            BasicProperties::default().with_reply_to(own.name().as_str().into()),
        )
        .await;
    let reply = first_delivery(&channel, own.name().as_str()).await;
    assert_eq!(reply.data, b"ping");
    assert_eq!(
        header(&reply, "x-amqp-exec-reply").as_deref(),
        Some(a.as_str())
    );

    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    // Nothing reached the other queues, and B's worker never ran.
    for q in &targets {
        assert_eq!(broker.count(q).await.unwrap_or(0), 0, "{q} got a reply");
    }
    assert!(
        work.ledger().is_empty(),
        "B's worker ran: {:?}",
        work.ledger()
    );
    let log = sup.log_text();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("no reply to")).collect();
    assert_eq!(refusals.len(), 4, "{}", tail(&log, 30));
    assert!(
        refusals.iter().all(|l| !l.contains("INJECTED")),
        "a refusal shows no body: {refusals:?}"
    );
    broker.cleanup().await;
}

/// A publisher's `x-amqp-exec-attempt` cannot skip the retries, and its
/// `x-amqp-exec-user-id` never reaches the worker as a user id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_control_headers_are_ignored() {
    let mut broker = Broker::connect().await;
    let q = unique("forged");
    broker.declare(&q).await;
    let work = Workdir::new();
    let port = free_port();
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nmax_attempts = 3\nbackoff = [\"100ms\"]\n",
        recording(&work, 1)
    );
    let mut skip = FieldTable::default();
    skip.insert("x-amqp-exec-attempt".into(), AMQPValue::LongInt(3));
    broker
        .publish(
            &q,
            b"x",
            BasicProperties::default()
                .with_message_id("skip".into())
                .with_headers(skip),
        )
        .await;
    let mut pose = FieldTable::default();
    pose.insert(
        "x-amqp-exec-user-id".into(),
        AMQPValue::LongString(LongString::from("admin")),
    );
    broker
        .publish(
            &q,
            b"x",
            BasicProperties::default()
                .with_message_id("pose".into())
                .with_headers(pose),
        )
        .await;
    let mut sup = Supervisor::start(&work, &config, &[]);
    broker
        .wait_count(&format!("{q}.dead"), 2, Duration::from_secs(30))
        .await;
    let runs = runs_by_id(&work.ledger());
    for id in ["skip", "pose"] {
        let attempts: Vec<u32> = runs[id].iter().map(|r| r.attempt).collect();
        assert_eq!(attempts, [1, 2, 3], "{id}: all of max_attempts");
    }
    let env = std::fs::read_to_string(work.file("env.pose")).unwrap();
    assert!(!env.contains("admin"), "{env}");
    assert!(!env.contains("AMQP_EXEC_USER_ID="), "{env}");
    assert_eq!(
        metric(
            port,
            &format!("amqp_exec_forged_headers_total{{queue=\"{q}\"}}")
        ),
        Some(2.0)
    );
    let dead = broker.drain(&format!("{q}.dead")).await;
    assert!(
        dead.iter()
            .all(|d| header(d, "x-amqp-exec-user-id").is_none()),
        "the forged user id is not carried on"
    );
    sup.signal(Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

/// Two instances that share a key file count each other's attempts: every
/// message gets exactly `max_attempts` runs, whichever instance runs them,
/// and a broker-checked `user_id` reaches the worker on every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_a_key_file_retry_each_others_messages() {
    let mut broker = Broker::connect().await;
    let q = unique("shared-key");
    broker.declare(&q).await;
    let work = Workdir::new();
    work.write("signing.key", "0123456789abcdef0123456789abcdef-shared\n");
    let config = format!(
        "key_file = \"signing.key\"\n[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\nmax_attempts = 3\nbackoff = [\"100ms\"]\n",
        recording(&work, 1)
    );
    let mut first = Supervisor::start(&work, &config, &[]);
    let mut second = Supervisor::start(&work, &config, &[]);
    let n = 6;
    for i in 0..n {
        broker
            .publish(
                &q,
                b"x",
                BasicProperties::default()
                    .with_message_id(format!("m{i}").as_str().into())
                    .with_user_id("guest".into()),
            )
            .await;
    }
    broker
        .wait_count(&format!("{q}.dead"), n, Duration::from_secs(60))
        .await;
    let runs = work.ledger();
    let by_id = runs_by_id(&runs);
    let pids: std::collections::BTreeSet<i32> = [first.pid(), second.pid()].into();
    assert_eq!(pids.len(), 2);
    for (id, r) in &by_id {
        let mut attempts: Vec<u32> = r.iter().map(|r| r.attempt).collect();
        attempts.sort();
        assert_eq!(attempts, [1, 2, 3], "{id}");
        let env = std::fs::read_to_string(work.file(&format!("env.{id}"))).unwrap();
        assert!(env.contains("AMQP_EXEC_USER_ID=guest"), "{env}");
    }
    assert_eq!(runs.len(), 3 * n as usize);
    let log = first.log_text();
    assert!(
        !log.contains("without a valid signature"),
        "{}",
        tail(&log, 20)
    );
    first.signal(Signal::SIGTERM);
    second.signal(Signal::SIGTERM);
    first.wait_success(Duration::from_secs(20)).await;
    second.wait_success(Duration::from_secs(20)).await;
    broker.cleanup().await;
}

/// The unprivileged user the tests run the supervisor as, created when
/// missing: (uid, gid).
fn test_user() -> (u32, u32) {
    const NAME: &str = "amqp-exec-test";
    if nix::unistd::User::from_name(NAME).unwrap().is_none() {
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group", NAME])
            .status()
            .expect("useradd (these tests run as root)");
        assert!(status.success(), "useradd {NAME}");
    }
    let u = nix::unistd::User::from_name(NAME).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

/// `setpriv` arguments that drop to the test user.
fn as_test_user() -> Vec<String> {
    let (uid, gid) = test_user();
    vec![
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        "--".into(),
    ]
}

/// A copy of the binary that the test user can execute wherever the
/// checkout is (a home folder may be closed to other users).
fn public_bin() -> String {
    use std::os::unix::fs::PermissionsExt;
    static COPY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        // Copies of earlier runs whose process is gone.
        for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("amqp-exec-bin-")
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = std::env::temp_dir().join(format!("amqp-exec-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("amqp-exec");
        std::fs::copy(BIN, &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin.display().to_string()
    })
    .clone()
}

fn open_up(work: &Workdir) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// A worker running as the supervisor's own user cannot read the broker
/// password from the supervisor's `/proc/<pid>/environ` or `cmdline`, and
/// dumps no core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_cannot_read_the_broker_password() {
    let mut broker = Broker::connect().await;
    let q = unique("secret");
    broker.declare(&q).await;
    let user = BrokerUser::add("secret");
    let work = Workdir::new();
    open_up(&work);
    let worker = work.script(
        "peek.sh",
        "#!/bin/sh\ncat > /dev/null\n{ id -u; cat /proc/$PPID/environ; echo; cat /proc/$PPID/cmdline; echo; echo \"core $(ulimit -c)\"; } > \"$RECORD_DIR/seen\" 2>&1\nexit 0\n",
    );
    let config = work.write(
        "config.toml",
        &format!(
            "[[queue]]\nname = \"{q}\"\ncommand = [\"{}\"]\n",
            worker.display()
        ),
    );
    let child = Command::new("setpriv")
        .args(as_test_user())
        .arg(public_bin())
        .arg("--config")
        .arg(&config)
        .args(["run", "--max-jobs", "1"])
        .env("AMQP_URL", user.url())
        .env("RECORD_DIR", work.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    broker.publish_id(&q, "peek", b"x").await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let seen = std::fs::read_to_string(work.file("seen")).unwrap();
    let (uid, _) = test_user();
    assert!(
        seen.starts_with(&format!("{uid}\n")),
        "the worker ran as the supervisor's user: {seen}"
    );
    assert!(
        !seen.contains(&user.password),
        "the worker read the password: {seen}"
    );
    assert!(seen.contains("Permission denied"), "{seen}");
    // Nor does it dump a core that could hold a message body.
    assert!(seen.contains("core 0\n"), "{seen}");
    broker.cleanup().await;
}

/// `amqp-exec check` as the test user, with `config` in a folder of its own;
/// (status, stdout + stderr).
fn check_as_test_user(config: &str) -> (i32, String) {
    let work = Workdir::new();
    open_up(&work);
    let path = work.write("config.toml", config);
    let out = Command::new("setpriv")
        .args(as_test_user())
        .arg(public_bin())
        .arg("--config")
        .arg(&path)
        .arg("check")
        .env("AMQP_URL", amqp_url())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Identities the supervisor cannot give its workers are config errors
/// that name the queue and the key, with status 78, not queues paused for
/// ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_the_supervisor_cannot_give_are_config_errors() {
    let q = "[[queue]]\nname = \"ids\"\ncommand = [\"/bin/cat\"]\n";
    let (code, out) = check_as_test_user(&format!("{q}user = \"root\"\n"));
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("queue \"ids\"") && out.contains("key `user`"),
        "{out}"
    );
    let (code, out) = check_as_test_user(&format!("{q}group = \"root\"\n"));
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("queue \"ids\"") && out.contains("key `group`"),
        "{out}"
    );
    // As root: a command the worker's user cannot execute.
    let work = Workdir::new();
    let only_root = work.script("only-root.sh", "#!/bin/sh\nexit 0\n");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&only_root, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let path = work.write(
        "config.toml",
        &format!(
            "[[queue]]\nname = \"ids\"\ncommand = [\"{}\"]\nuser = \"nobody\"\n",
            only_root.display()
        ),
    );
    let (status, stdout, stderr) = cli(&["--config", path.to_str().unwrap(), "check"], None);
    let out = format!("{stdout}{stderr}");
    assert_eq!(status.code(), Some(78), "{out}");
    assert!(
        out.contains("queue \"ids\"") && out.contains("key `command`") && out.contains("nobody"),
        "{out}"
    );
    // `run` refuses it the same way, before it connects.
    let (status, stdout, stderr) = cli(&["--config", path.to_str().unwrap(), "run"], None);
    assert_eq!(status.code(), Some(78), "{stdout}{stderr}");
}

/// As PID 1 (a container without an init), the supervisor reaps the
/// processes its workers leave behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_the_supervisor_reaps_orphans() {
    let mut broker = Broker::connect().await;
    let q = unique("pid1");
    broker.declare(&q).await;
    let work = Workdir::new();
    // Leaves a child behind that ends a moment later, re-parented to PID 1.
    let config = work.write(
        "config.toml",
        &format!(
            "[[queue]]\nname = \"{q}\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 0.3 & exit 0\"]\n"
        ),
    );
    let log = work.file("supervisor.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("unshare (util-linux)");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = Instant::now();
    while !read_log().contains("consuming") {
        assert!(start.elapsed() < Duration::from_secs(20), "{}", read_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(read_log().contains("running as PID 1"), "{}", read_log());
    for i in 0..5 {
        broker.publish_id(&q, &format!("o{i}"), b"x").await;
    }
    broker.wait_count(&q, 0, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The supervisor is unshare's child; its zombie children, if any.
    let sup = children(child.id() as i32);
    assert_eq!(sup.len(), 1, "unshare's child");
    let zombies: Vec<i32> = children(sup[0])
        .into_iter()
        .filter(|p| state(*p) == Some('Z'))
        .collect();
    assert!(
        zombies.is_empty(),
        "zombies left: {zombies:?}\n{}",
        read_log()
    );
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup[0]), Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{}", read_log());
    broker.cleanup().await;
}

fn stat_fields(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = stat.rsplit(')').next()?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}

fn state(pid: i32) -> Option<char> {
    stat_fields(pid).map(|(s, _)| s)
}

fn children(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| stat_fields(*p).is_some_and(|(_, pp)| pp == parent))
        .collect()
}

/// The README says what a publisher can and cannot make amqp-exec do, and
/// the units show how to keep the broker password in a systemd credential.
#[test]
fn the_security_setup_is_documented() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let section = readme
        .split("\n## Security\n")
        .nth(1)
        .expect("a Security section")
        .split("\n## ")
        .next()
        .unwrap();
    for needle in [
        "A publisher can",
        "A publisher cannot",
        "replies",
        "x-amqp-exec-signature",
        "key_file",
        "LoadCredential=",
        "password_file",
        "PID 1",
    ] {
        assert!(
            section.contains(needle),
            "the Security section names {needle}"
        );
    }
    for unit in ["deploy/amqp-exec.service", "deploy/amqp-exec@.service"] {
        let text = std::fs::read_to_string(repo(unit)).unwrap();
        assert!(
            text.contains("LoadCredential=") && text.contains("password_file"),
            "{unit} shows the credential setup"
        );
    }
    let packaged = std::fs::read_to_string(repo("deploy/example-packaged.toml")).unwrap();
    assert!(packaged.contains("key_file = \"/etc/amqp-exec/signing.key\""));
    let postinst = std::fs::read_to_string(repo("deploy/debian/postinst")).unwrap();
    assert!(postinst.contains("signing.key") && postinst.contains("0640"));
}
