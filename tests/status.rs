//! The status page (`/status`, `/status.json`) and `amqp-exec status`,
//! against the real broker and the real binary; the page is also loaded in
//! headless Chromium.

mod common;

use common::scrape::free_port;
use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Reads `/status.json` until `ready` holds for it; fails the test with
/// the last report after `timeout`.
async fn wait_report(
    port: u16,
    timeout: Duration,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (code, body) = http_get(port, "/status.json");
        if code == 200 {
            let report: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("/status.json is not JSON ({e}):\n{body}"));
            if ready(&report) {
                return report;
            }
            assert!(
                start.elapsed() < timeout,
                "/status.json never showed {what} within {timeout:?}:\n{body}"
            );
        } else {
            assert!(
                start.elapsed() < timeout,
                "/status.json answered {code} for {timeout:?}:\n{body}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn queue<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == name)
        .unwrap_or_else(|| panic!("no queue {name} in {report:#}"))
}

fn running_ids(report: &serde_json::Value) -> Vec<String> {
    report["running"]
        .as_array()
        .expect("running")
        .iter()
        .filter(|j| j["pid"].is_u64() && j["phase"] == "running")
        .map(|j| j["message_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Stops the supervisor: its sleeping workers are killed after the
/// shutdown grace.
async fn stop(sup: &mut Supervisor) {
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_exit(Duration::from_secs(30)).await;
}

/// Where the screenshot goes: `$CARGO_TARGET_DIR`, else `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(repo("target")))
}

/// Runs headless Chromium with `args` and then `url`; its stdout. Fails
/// the test when Chromium is missing, fails, or takes over a minute.
fn chromium(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().expect("tempdir");
    let child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "this test needs Chromium to load the status page: cannot run `chromium` ({e}); \
             install the Debian packages chromium and chromium-driver"
        ),
    };
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} {url} did not finish within 60s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("chromium output");
    assert!(
        out.status.success(),
        "chromium {args:?} {url} failed with {}: {}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 20)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_jobs_pauses_failures_and_dead_letters() {
    let mut broker = Broker::connect().await;
    let (slow, failing, paused) = (unique("st-slow"), unique("st-fail"), unique("st-paused"));
    for q in [&slow, &failing, &paused] {
        broker.declare(q).await;
    }
    let work = Workdir::new();
    let port = free_port();
    broker.publish_id(&slow, "slow-1", b"").await;
    broker.publish_id(&slow, "slow-2", b"").await;
    broker.publish_id(&failing, "fail-1", b"").await;
    let config = format!(
        "shutdown_grace = \"1s\"\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\nstatus_stderr = \"tail\"\n\
         [[queue]]\nname = \"{slow}\"\ncommand = [\"/bin/sleep\", \"60\"]\nconcurrency = 3\ntimeout = \"2m\"\n\
         [[queue]]\nname = \"{failing}\"\n\
         command = [\"/bin/sh\", \"-c\", \"echo 'first line' >&2; echo 'boom: disk full' >&2; exit 3\"]\n\
         max_attempts = 1\n\
         [[queue]]\nname = \"{paused}\"\ncommand = [\"/nonexistent/status-worker\"]\n"
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    let report = wait_report(
        port,
        Duration::from_secs(20),
        "two running jobs, a failure and a dead letter",
        |r| {
            running_ids(r).len() == 2
                && queue(r, &failing)["dead_letters"]["count"] == 1
                && queue(r, &paused)["state"] == "paused"
        },
    )
    .await;
    assert_eq!(report["connected"], true);

    // Running jobs: queue, id, attempt, pid, time and timeout.
    let mut ids = running_ids(&report);
    ids.sort();
    assert_eq!(ids, ["slow-1", "slow-2"]);
    for j in report["running"].as_array().unwrap() {
        assert_eq!(j["queue"], slow.as_str());
        assert_eq!(j["attempt"], 1);
        assert_eq!(j["timeout_secs"], 120.0);
        assert!(j["running_secs"].as_f64().unwrap() >= 0.0);
        let pid = j["pid"].as_u64().unwrap() as i32;
        assert!(running(pid), "worker pid {pid} is not running");
    }
    let s = queue(&report, &slow);
    assert_eq!(s["state"], "consuming");
    assert_eq!(
        (s["busy"].as_u64(), s["concurrency"].as_u64()),
        (Some(2), Some(3))
    );

    // The paused queue and why.
    let p = queue(&report, &paused);
    let why = p["reason"].as_str().unwrap();
    assert!(why.contains("/nonexistent/status-worker"), "{why}");

    // The last failure: exit code, when, stderr's tail; the dead letter.
    let f = queue(&report, &failing);
    let failure = &f["last_failure"];
    assert_eq!(failure["exit"], "3");
    assert_eq!(failure["message_id"], "fail-1");
    assert_eq!(failure["stderr"], "first line\nboom: disk full\n");
    assert!(failure["ago_secs"].as_f64().unwrap() < 30.0);
    assert!(failure["at"].as_str().unwrap().ends_with('Z'));
    let newest = &f["dead_letters"]["recent"][0];
    assert_eq!(newest["message_id"], "fail-1");
    assert_eq!(newest["why"], "exit 3");
    assert_eq!(f["totals"]["dead"], 1);
    assert!(f["rates"]["dead"].as_f64().is_some());
    // The rates count whole seconds: the dead letter shows within one.
    wait_report(port, Duration::from_secs(5), "a dead-letter rate", |r| {
        queue(r, &failing)["rates"]["dead"].as_f64().unwrap() > 0.0
    })
    .await;

    // amqp-exec status: tables, from --url or from the config's listener.
    let (code, out, err) = cli(&["status", "--url", &format!("127.0.0.1:{port}")], None);
    assert!(code.success(), "amqp-exec status failed: {err}");
    for needle in [
        "RUNNING JOBS: 2",
        "slow-1",
        "slow-2",
        "consuming",
        "paused",
        "/nonexistent/status-worker",
        "LAST FAILURES",
        "exit 3",
        "  | boom: disk full",
        "RECENT DEAD LETTERS",
        "fail-1",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    let cfg = work.file("config.toml");
    let (code, out, err) = cli(
        &["--config", cfg.to_str().unwrap(), "status", "--json"],
        None,
    );
    assert!(code.success(), "amqp-exec status --json failed: {err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(json["running_count"], 2);

    stop(&mut sup).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_in_chromium_and_escapes_hostile_ids() {
    let mut broker = Broker::connect().await;
    let (slow, failing) = (unique("st-browser"), unique("st-browser-fail"));
    broker.declare(&slow).await;
    broker.declare(&failing).await;
    let work = Workdir::new();
    let port = free_port();
    let hostile =
        "<script>document.title='owned'</script><img src=x onerror=alert(1)>\"'&\u{1b}[31m";
    for id in ["browser-job-1", "browser-job-2", hostile] {
        broker.publish_id(&slow, id, b"").await;
    }
    broker.publish_id(&failing, "invoice-7731", b"").await;
    let config = format!(
        "shutdown_grace = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[queue]]\nname = \"{slow}\"\ncommand = [\"/bin/sleep\", \"60\"]\nconcurrency = 4\ntimeout = \"5m\"\n\
         [[queue]]\nname = \"{failing}\"\n\
         command = [\"/bin/sh\", \"-c\", \"echo 'smtp: connection refused <b>x</b>' >&2; exit 75\"]\n\
         max_attempts = 1\n"
    );
    let mut sup = Supervisor::start(&work, &config, &[]);
    wait_report(
        port,
        Duration::from_secs(20),
        "three running jobs and a dead letter",
        |r| running_ids(r).len() == 3 && queue(r, &failing)["dead_letters"]["count"] == 1,
    )
    .await;

    // The HTML itself: escaped, no script.
    let (code, html) = http_get(port, "/status");
    assert_eq!(code, 200);
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<b>x"), "{html}");
    assert!(!html.contains('\u{1b}'));
    assert!(
        html.contains("&lt;script&gt;document.title=&#39;owned&#39;&lt;/script&gt;"),
        "{html}"
    );

    // In a browser: the running jobs are in the rendered page, the hostile
    // id as text, and the default status_stderr shows stderr's last line.
    let url = format!("http://127.0.0.1:{port}/status");
    let dom = chromium(&["--dump-dom"], &url);
    let running_table = dom
        .split("<table id=\"running\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_else(|| panic!("no running-jobs table in the rendered page:\n{dom}"));
    for id in ["browser-job-1", "browser-job-2"] {
        assert!(running_table.contains(id), "{id} not in:\n{running_table}");
    }
    assert!(
        running_table.contains("&lt;script&gt;document.title"),
        "{running_table}"
    );
    assert!(
        !dom.contains("<script"),
        "a script element in the page:\n{dom}"
    );
    assert!(!dom.contains("<img"), "an img element in the page:\n{dom}");
    assert!(dom.contains("<title>amqp-exec status</title>"), "{dom}");
    assert!(
        dom.contains("smtp: connection refused &lt;b&gt;x&lt;/b&gt;"),
        "{dom}"
    );
    assert!(dom.contains("invoice-7731"), "{dom}");

    let shot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,800",
            "--hide-scrollbars",
        ],
        &url,
    );
    let png =
        std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        shot.display()
    );

    // The terminal gets no escape sequence from the hostile id.
    let (code, out, err) = cli(
        &["status", "--url", &format!("http://127.0.0.1:{port}")],
        None,
    );
    assert!(code.success(), "{err}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    assert!(
        out.contains("<script>document.title='owned'</script>"),
        "{out}"
    );

    stop(&mut sup).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_what_the_page_shows_of_a_queue() {
    let mut broker = Broker::connect().await;
    let q = unique("st-reload");
    broker.declare(&q).await;
    let work = Workdir::new();
    let port = free_port();
    broker.publish_id(&q, "before-reload", b"").await;
    let config = |concurrency: u32| {
        format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[[queue]]\nname = \"{q}\"\n\
             command = [\"/bin/sh\", \"-c\", \"echo nope >&2; exit 4\"]\nmax_attempts = 1\n\
             concurrency = {concurrency}\n"
        )
    };
    let mut sup = Supervisor::start(&work, &config(1), &[]);
    wait_report(port, Duration::from_secs(20), "a dead letter", |r| {
        queue(r, &q)["dead_letters"]["count"] == 1
    })
    .await;
    work.write("config.toml", &config(3));
    sup.signal(nix::sys::signal::Signal::SIGHUP);
    sup.wait_log("reload done", Duration::from_secs(10)).await;
    let report = wait_report(
        port,
        Duration::from_secs(10),
        "the new concurrency, consuming",
        |r| queue(r, &q)["concurrency"] == 3 && queue(r, &q)["state"] == "consuming",
    )
    .await;
    let s = queue(&report, &q);
    assert_eq!(
        s["dead_letters"]["recent"][0]["message_id"],
        "before-reload"
    );
    assert_eq!(s["last_failure"]["exit"], "4");
    assert_eq!(s["last_failure"]["stderr"], "nope");
    assert_eq!(report["queues"].as_array().unwrap().len(), 1);
    stop(&mut sup).await;
    broker.cleanup().await;
}

#[test]
fn status_says_when_nothing_answers() {
    let port = free_port();
    let (code, _, err) = cli(&["status", "--url", &format!("127.0.0.1:{port}")], None);
    assert_eq!(code.code(), Some(69), "{err}");
    assert!(
        err.contains(&format!(
            "nothing answers at http://127.0.0.1:{port}/status.json"
        )),
        "{err}"
    );

    // --watch keeps trying, and says so each time.
    let watch = Command::new(BIN)
        .args([
            "status",
            "--watch",
            "0.2",
            "--url",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run amqp-exec status --watch");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        running(watch.id() as i32),
        "status --watch ended when nothing answered"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = watch.wait_with_output().expect("status --watch output");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.matches("\u{1b}[H\u{1b}[2J").count() >= 3
            && screen.matches("nothing answers").count() >= 3
            && screen.contains("(trying again)"),
        "{screen:?}"
    );

    let (code, _, err) = cli(&["status", "--url", "https://127.0.0.1:1"], None);
    assert_eq!(code.code(), Some(2), "{err}");
    assert!(err.contains("--url") && err.contains("plain http"), "{err}");

    let work = Workdir::new();
    let cfg = work.write(
        "config.toml",
        "[[queue]]\nname = \"a\"\ncommand = [\"x\"]\n",
    );
    let (code, _, err) = cli(&["--config", cfg.to_str().unwrap(), "status"], None);
    assert_eq!(code.code(), Some(78), "{err}");
    assert!(
        err.contains("[metrics] listen") && err.contains("--url"),
        "{err}"
    );
    let missing = work.file("missing.toml");
    let (code, _, err) = cli(&["--config", missing.to_str().unwrap(), "status"], None);
    assert_eq!(code.code(), Some(78), "{err}");
    assert!(
        err.contains("missing.toml") && err.contains("--url"),
        "{err}"
    );
}
