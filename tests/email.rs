//! The send-email unit worker against a real MariaDB and an SMTP sink: the
//! architecture amqp-exec exists for. Each test gets its own database, user
//! and queue.

mod common;

use common::mariadb::{TestDb, root};
use common::smtp::SmtpSink;
use common::*;
use mysql::prelude::Queryable;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn send_email_bin() -> String {
    workspace_bin("send-email")
}

fn setup_db(tag: &str) -> TestDb {
    let db = TestDb::create(tag);
    db.load(&std::fs::read_to_string(repo("workers/send-email/schema.sql")).unwrap());
    db
}

/// Inserts `n` emails; recipients come from `to(i)`. Returns their ids.
fn insert_emails(db: &TestDb, n: usize, to: impl Fn(usize) -> String) -> Vec<u64> {
    let mut c = db.conn();
    let first: u64 = c
        .query_first("SELECT COALESCE(MAX(id), 0) FROM emails")
        .unwrap()
        .unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| {
                format!(
                    "('app@example.test', '{}', 'Hello {i}', 'Body of email {i}')",
                    to(*i)
                )
            })
            .collect();
        c.query_drop(format!(
            "INSERT INTO emails (sender, recipient, subject, body) VALUES {}",
            values.join(",")
        ))
        .unwrap();
    }
    (first + 1..=first + n as u64).collect()
}

fn config(q: &str, db: &TestDb, sink: &SmtpSink, concurrency: usize, extra: &str) -> String {
    format!(
        r#"
[[queue]]
name = "{q}"
command = ["{bin}"]
concurrency = {concurrency}
backoff = ["200ms", "1s"]
max_attempts = 10
{extra}
[queue.env]
DATABASE_URL = "{db}"
SMTP_URL = "{smtp}"
"#,
        bin = send_email_bin(),
        db = db.url(),
        smtp = sink.url()
    )
}

async fn publish_ids(broker: &Broker, q: &str, ids: &[u64]) {
    for id in ids {
        broker
            .publish_id(
                q,
                &format!("email-{id}"),
                format!("{{\"email_id\": {id}}}").as_bytes(),
            )
            .await;
    }
}

fn unsent(db: &TestDb) -> u64 {
    db.conn()
        .query_first("SELECT COUNT(*) FROM emails WHERE sent_at IS NULL")
        .unwrap()
        .unwrap()
}

/// True if the process holds a TCP connection to port 3306.
fn holds_mysql_socket(pid: i32) -> bool {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().into_owned();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(n.to_owned());
                }
            }
        }
    }
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && inodes.contains(f[9]) && f[2].ends_with(":0CEA") {
                return true;
            }
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_emails_sent_exactly_once_with_bounded_connections() {
    let db = setup_db("bulk");
    let sink = SmtpSink::start(Duration::ZERO).await;
    let mut broker = Broker::connect().await;
    let q = unique("email-bulk");
    broker.declare(&q).await;
    let work = Workdir::new();
    let n = 2000;
    let ids = insert_emails(&db, n, |i| format!("user{i}@example.test"));
    publish_ids(&broker, &q, &ids).await;

    let mut sup = Supervisor::start(
        &work,
        &config(&q, &db, &sink, 8, ""),
        &["--max-jobs", &n.to_string()],
    );
    let pid = sup.pid();
    // Sample the test user's connections and the supervisor's sockets meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let max_conns = Arc::new(AtomicU64::new(0));
    let supervisor_db_sockets = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, max_conns, sockets, samples) = (
            stop.clone(),
            max_conns.clone(),
            supervisor_db_sockets.clone(),
            samples.clone(),
        );
        let user = db.user.clone();
        std::thread::spawn(move || {
            let mut root = root();
            while !stop.load(Ordering::SeqCst) {
                let mut count = || -> u64 {
                    root.exec_first(
                        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ?",
                        (&user,),
                    )
                    .unwrap()
                    .unwrap_or(0)
                };
                let mut c = count();
                // The server drops a connection a moment after its client quit
                // (longer on a loaded machine): look again a few times before
                // counting a ninth.
                for _ in 0..20 {
                    if c <= 8 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(25));
                    c = c.min(count());
                }
                max_conns.fetch_max(c, Ordering::SeqCst);
                if holds_mysql_socket(pid) {
                    sockets.fetch_add(1, Ordering::SeqCst);
                }
                samples.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let t = Instant::now();
    sup.wait_success(Duration::from_secs(300)).await;
    let wall = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();

    let got = sink.message_ids();
    let distinct: BTreeSet<&String> = got.iter().collect();
    println!(
        "{n} emails at concurrency 8 in {:.1}s ({:.0}/s); peak worker DB connections {} over {} samples",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        max_conns.load(Ordering::SeqCst),
        samples.load(Ordering::SeqCst)
    );
    assert_eq!(got.len(), n, "each email sent once");
    assert_eq!(distinct.len(), n, "{n} distinct messages");
    assert_eq!(unsent(&db), 0, "every row marked sent");
    let peak = max_conns.load(Ordering::SeqCst);
    assert!(
        (1..=8).contains(&peak),
        "peak connections {peak} exceeds concurrency 8"
    );
    // The server lets go of a connection a moment after its client exits.
    let mut left = db.user_connections(&mut root());
    let since = Instant::now();
    while left > 0 && since.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        left = db.user_connections(&mut root());
    }
    assert_eq!(left, 0, "no connection left after the run");
    assert_eq!(
        supervisor_db_sockets.load(Ordering::SeqCst),
        0,
        "the supervisor held a DB socket"
    );
    assert_eq!(broker.count(&q).await, Some(0));
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

/// Restores `init_connect` when dropped.
struct InitConnect(String);

impl Drop for InitConnect {
    fn drop(&mut self) {
        let _ = root().exec_drop("SET GLOBAL init_connect = ?", (&self.0,));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_does_not_hurt_workers_that_connect_fresh() {
    let db = setup_db("idle");
    let sink = SmtpSink::start(Duration::ZERO).await;
    let mut broker = Broker::connect().await;
    let q = unique("email-idle");
    broker.declare(&q).await;
    let work = Workdir::new();
    // Sessions of non-root users get wait_timeout = 2 s.
    let mut r = root();
    let old: String = r
        .query_first("SELECT @@GLOBAL.init_connect")
        .unwrap()
        .unwrap_or_default();
    let _restore = InitConnect(old);
    r.query_drop("SET GLOBAL init_connect = 'SET SESSION wait_timeout = 2'")
        .unwrap();

    // A long-lived connection of that user dies of it ("server has gone away").
    let mut long_lived = mysql::Conn::new(mysql::Opts::from_url(&db.url()).unwrap()).unwrap();
    let wt: u64 = long_lived
        .query_first("SELECT @@SESSION.wait_timeout")
        .unwrap()
        .unwrap();
    assert_eq!(wt, 2);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        long_lived.query_drop("SELECT 1").is_err(),
        "an idle connection should be gone"
    );

    let ids = insert_emails(&db, 3, |i| format!("idle{i}@example.test"));
    let mut sup = Supervisor::start(&work, &config(&q, &db, &sink, 1, ""), &[]);
    sup.wait_log("consuming", Duration::from_secs(20)).await;
    for id in &ids {
        publish_ids(&broker, &q, &[*id]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let start = Instant::now();
    while sink.message_ids().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "not all sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    let log = sup.log_text();
    assert!(
        !log.contains("job failed"),
        "a worker failed:\n{}",
        tail(&log, 20)
    );
    assert_eq!(unsent(&db), 0);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_retried_and_every_email_is_sent_once() {
    let db = setup_db("kill");
    let sink = SmtpSink::start(Duration::from_millis(15)).await;
    let mut broker = Broker::connect().await;
    let q = unique("email-kill");
    broker.declare(&q).await;
    let work = Workdir::new();
    let n = 300;
    let ids = insert_emails(&db, n, |i| format!("k{i}@example.test"));
    publish_ids(&broker, &q, &ids).await;
    // No --max-jobs: retries are acked jobs too; wait for every row instead.
    let mut sup = Supervisor::start(&work, &config(&q, &db, &sink, 8, "timeout = \"20s\""), &[]);
    // Kill the workers' connections for three seconds.
    let user = db.user.clone();
    let killed = std::thread::spawn(move || {
        let mut r = root();
        let mut killed = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            let ids: Vec<u64> = r
                .exec(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
                    (&user,),
                )
                .unwrap();
            for id in ids {
                if r.query_drop(format!("KILL CONNECTION {id}")).is_ok() {
                    killed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        killed
    })
    .join()
    .unwrap();
    let start = Instant::now();
    while unsent(&db) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{} emails never sent",
            unsent(&db)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.wait_count(&q, 0, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(60)).await;
    let got = sink.message_ids();
    let distinct: BTreeSet<&String> = got.iter().collect();
    let log = sup.log_text();
    let retried = log.matches("job failed; retry").count();
    println!(
        "killed {killed} connections; {retried} jobs exited 75 and were retried; {} sends for {n} emails",
        got.len()
    );
    assert!(killed > 0, "no connection was killed");
    assert!(retried > 0, "no job was affected by the kills");
    assert!(log.contains("exit=75"), "affected jobs exit 75");
    assert_eq!(distinct.len(), n, "every email sent");
    assert_eq!(got.len(), n, "no email sent twice");
    assert_eq!(unsent(&db), 0);
    assert_eq!(broker.count(&format!("{q}.dead")).await, Some(0));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_and_rejected_recipients_are_dead_lettered_after_one_attempt() {
    let db = setup_db("bad");
    let sink = SmtpSink::start(Duration::ZERO).await;
    let mut broker = Broker::connect().await;
    let q = unique("email-bad");
    broker.declare(&q).await;
    let work = Workdir::new();
    let ids = insert_emails(&db, 2, |i| {
        if i == 0 {
            "reject@example.test".into()
        } else {
            "fine@example.test".into()
        }
    });
    broker
        .publish_id(&q, "unknown", b"{\"email_id\": 999999}")
        .await;
    broker.publish_id(&q, "malformed", b"not json at all").await;
    broker
        .publish_id(&q, "wrong-type", b"{\"email_id\": \"seven\"}")
        .await;
    broker.publish_id(&q, "empty", b"").await;
    publish_ids(&broker, &q, &ids).await;
    // The same email in a second message, racing the first: it goes out once.
    broker
        .publish_id(
            &q,
            "dup",
            format!("{{\"email_id\": {}}}", ids[1]).as_bytes(),
        )
        .await;
    let mut sup = Supervisor::start(&work, &config(&q, &db, &sink, 4, ""), &[]);
    let dead_q = format!("{q}.dead");
    broker.wait_count(&dead_q, 5, Duration::from_secs(30)).await;
    sup.wait_log("was already sent", Duration::from_secs(30))
        .await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(30)).await;

    let dead = broker.drain(&dead_q).await;
    let mut dead_ids: Vec<String> = dead.iter().map(message_id).collect();
    dead_ids.sort();
    assert_eq!(
        dead_ids,
        ["email-1", "empty", "malformed", "unknown", "wrong-type"],
        "unknown, malformed and rejected messages are dead"
    );
    for d in &dead {
        assert_eq!(header(d, "x-amqp-exec-exit").as_deref(), Some("65"));
        assert_eq!(header(d, "x-amqp-exec-attempts").as_deref(), Some("1"));
        let stderr = header(d, "x-amqp-exec-stderr").unwrap();
        assert!(
            stderr.starts_with("send-email: permanent failure"),
            "{stderr}"
        );
        assert!(
            !stderr.contains(&db.password),
            "the DB password leaked: {stderr}"
        );
    }
    let sent = sink.message_ids();
    assert_eq!(
        sent,
        [format!("<email-{}@amqp-exec>", ids[1])],
        "the raced email went out once"
    );
    assert_eq!(broker.count(&q).await, Some(0));
    assert!(
        !sup.log_text().contains(&db.password),
        "the DB password leaked into the log"
    );
    broker.cleanup().await;
}

#[test]
fn worker_errors_are_one_line_without_the_password() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let run = |body: &[u8], db_url: &str| {
        let mut child = Command::new(send_email_bin())
            .env("DATABASE_URL", db_url)
            .env("SMTP_URL", "smtp://127.0.0.1:1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(body).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Database unreachable: temporary.
    let (code, err) = run(
        b"{\"email_id\": 1}",
        "mysql://u:hunter2secret@127.0.0.1:1/db",
    );
    assert_eq!(code, Some(75), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("database unreachable") && !err.contains("hunter2secret"),
        "{err}"
    );
    // Malformed body: permanent, before any connection.
    let (code, err) = run(b"{\"id\": 1}", "mysql://u:hunter2secret@127.0.0.1:1/db");
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("malformed body"), "{err}");
    // Missing configuration.
    let (code, err) = run(b"{\"email_id\": 1}", "");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("DATABASE_URL"), "{err}");
}
