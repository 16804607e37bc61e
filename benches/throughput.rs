//! Throughput benchmark: the real `amqp-exec run` binary against the local
//! broker, next to baselines measured in the same run.
//!
//! `cargo bench --bench throughput [-- --jobs N] [--rounds R] [--json PATH]`
//!
//! For each concurrency (1, 4, 16) it measures, with `/bin/cat` as the worker
//! and 1 KiB bodies:
//! - ours: jobs/s, supervisor CPU µs per job (its own user+system time, from
//!   /proc, children excluded), supervisor peak RSS;
//! - (a) a bare spawn-and-wait loop at the same concurrency: the fork/exec limit;
//! - (b) consume and ack with no spawn: the broker's limit;
//! - (c) `amqp-consume -p 1 -c N /bin/cat` (Debian package amqp-tools), serial
//!   as that tool is, when it is installed.
//!
//! Latency from publish to worker start (p50, p99) is measured apart, with
//! messages published one at a time below capacity and a worker that stamps
//! its start (a small C program built with `cc`, else this binary). Memory
//! modes run at concurrency 64 with 1 KiB and 1 MiB bodies.
//!
//! A worker's output: the supervisor's CPU per MiB of a worker's stdout,
//! logged at `info`, as one endless line and as empty lines, against this
//! process reading the same output from a pipe 64 KiB at a time.
//!
//! Then, with a realistic worker, an interpreter that does about 2 ms of
//! work (`php -r` and `python3 -c`, those installed), ours against (a)
//! starting the same interpreter, at concurrency 1 and 4; and the
//! allocations per job of this code, counted by `amqp-exec-count-alloc`
//! (cargo feature `count-alloc`, built beside this build's binary when
//! missing). The targets at the end are each printed with the figure
//! reached, the ceiling the run's own baselines put on it, and met or not.
//!
//! `--soak N` instead runs N jobs through one supervisor and samples its open
//! fds, threads and RSS every 10,000 jobs.
//!
//! `--compare PATH` instead runs this build's binary and another build of
//! `amqp-exec` at PATH in turns (`--rounds` pairs rounded up to even, the
//! order swapped every pair) at concurrency 1 and 4 (`--conc 1,4`), and
//! prints both with their ratio: a change to the hot path is judged against
//! the code before it, on the same machine at the same time.

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_amqp-exec");
/// Set in the worker's environment (the queue's `env`) for the stamping
/// worker. amqp-exec never passes its own `AMQP_EXEC_*` variables on.
const STAMP_ENV: &str = "BENCH_STAMP_FILE";

fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The stamping worker: records "<publish ns> <start ns>" and exits.
fn stamp_worker(file: &str) -> ! {
    let start = now_ns();
    let headers = std::env::var("AMQP_EXEC_HEADERS").unwrap_or_default();
    let published = serde_json::from_str::<serde_json::Value>(&headers)
        .ok()
        .and_then(|v| v["published-ns"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(file)
        .unwrap();
    let _ = writeln!(f, "{published} {start}");
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink()).ok();
    std::process::exit(0)
}

struct Args {
    jobs: usize,
    rounds: usize,
    json: Option<String>,
    soak: Option<usize>,
    compare: Option<String>,
    /// `--conc 1,4`: the concurrencies `--compare` runs.
    concs: Vec<usize>,
    /// `--worker php|python3`: `--compare` with a realistic worker instead
    /// of `/bin/cat`.
    worker: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        jobs: 3000,
        rounds: 3,
        json: None,
        soak: None,
        compare: None,
        concs: vec![1, 4],
        worker: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--jobs" => a.jobs = it.next().and_then(|n| n.parse().ok()).expect("--jobs N"),
            "--rounds" => {
                a.rounds = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--rounds N (at least 1)")
            }
            "--json" => a.json = it.next(),
            "--soak" => a.soak = it.next().and_then(|n| n.parse().ok()),
            "--compare" => a.compare = Some(it.next().expect("--compare PATH")),
            "--worker" => a.worker = Some(it.next().expect("--worker php|python3")),
            "--conc" => {
                a.concs = it
                    .next()
                    .and_then(|l| {
                        l.split(',')
                            .map(|c| c.parse().ok().filter(|&c| c > 0))
                            .collect()
                    })
                    .expect("--conc N[,N...] (each at least 1)")
            }
            _ => {} // cargo passes --bench
        }
    }
    a
}

struct Broker {
    conn: Connection,
    ch: Channel,
}

impl Broker {
    async fn connect() -> Broker {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ is not reachable at {}: {e}; start it first",
                    amqp_url()
                )
            });
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Broker { conn, ch }
    }

    /// Declares `name` as `amqp-exec run` does by default: durable, and
    /// classic whatever the virtual host's default type.
    async fn fresh_queue(&self, name: &str) {
        self.delete(name).await;
        let mut classic = FieldTable::default();
        classic.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        self.ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                classic,
            )
            .await
            .unwrap();
    }

    async fn delete(&self, name: &str) {
        for q in [name.to_owned(), format!("{name}.dead")].into_iter().chain(
            ["1s", "10s", "1m", "5m", "30m"]
                .iter()
                .map(|d| format!("{name}.retry.{d}")),
        ) {
            let ch = self.conn.create_channel().await.unwrap();
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }

    async fn publish(&self, queue: &str, n: usize, body: &[u8]) {
        let mut pending = Vec::with_capacity(n);
        for i in 0..n {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("m{i}").as_str().into());
            pending.push(
                self.ch
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        body,
                        props,
                    )
                    .await
                    .unwrap(),
            );
            if pending.len() >= 500 {
                for c in pending.drain(..) {
                    c.await.unwrap();
                }
            }
        }
        for c in pending {
            c.await.unwrap();
        }
    }
}

/// What one run of the supervisor cost.
#[derive(Default, Clone, Copy)]
struct Ours {
    rate: f64,
    cpu_us_per_job: f64,
    peak_rss_mib: f64,
    /// The local broker's CPU µs per job over the run; NaN when the broker
    /// is not a process of this machine.
    broker_cpu_us_per_job: f64,
}

/// The local broker's process (RabbitMQ's `beam.smp`), when it runs here.
fn broker_pid() -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// utime + stime of the process alone (clock ticks → µs), from /proc.
fn own_cpu_us(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit(')').next()?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some((utime + stime) / hz * 1e6)
}

fn peak_rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A service's environment, as systemd gives it, rather than this
/// benchmark's (cargo adds dozens of variables, `LD_LIBRARY_PATH` among
/// them). Every contender and its workers get it, so that they start the
/// same processes.
fn service_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LANG", "C.UTF-8")
}

/// Runs `amqp-exec run --max-jobs n` on a config and measures it.
fn run_supervisor(config: &str, n: usize, env: &[(&str, &str)]) -> Ours {
    run_binary(BIN, config, n, env)
}

/// [`run_supervisor`] with the `amqp-exec` binary at `bin`.
fn run_binary(bin: &str, config: &str, n: usize, env: &[(&str, &str)]) -> Ours {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bench.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = Command::new(bin);
    // The workers inherit it; building their environment is part of each
    // job's cost.
    service_env(&mut cmd)
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .arg("--max-jobs")
        .arg(n.to_string())
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let broker = broker_pid();
    let broker_cpu = broker.and_then(own_cpu_us);
    let start = Instant::now();
    let child = cmd.spawn().expect("start amqp-exec");
    let pid = child.id() as i32;
    let mut peak = 0;
    // Wait for the exit without reaping, so that /proc still has its times.
    // The exit's time is taken by the waiter, not at the next poll of the
    // memory below, which would add up to a polling period to the run.
    let waiter = std::thread::spawn(move || {
        use nix::sys::wait::{Id, WaitPidFlag, waitid};
        let _ = waitid(
            Id::Pid(nix::unistd::Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        );
        Instant::now()
    });
    while !waiter.is_finished() {
        if let Some(k) = peak_rss_kib(pid) {
            peak = peak.max(k);
        }
        // VmHWM is the peak so far: polled sparingly, so that reading it
        // takes little of the cores the run is measured on.
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = waiter.join().expect("waiter thread") - start;
    let cpu = own_cpu_us(pid).unwrap_or(f64::NAN);
    let broker_cpu = match (broker.and_then(own_cpu_us), broker_cpu) {
        (Some(after), Some(before)) => after - before,
        _ => f64::NAN,
    };
    let mut child = child;
    let status = child.wait().unwrap();
    assert!(status.success(), "amqp-exec exited with {status}");
    Ours {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu_us_per_job: cpu / n as f64,
        peak_rss_mib: peak as f64 / 1024.0,
        broker_cpu_us_per_job: broker_cpu / n as f64,
    }
}

fn queue_config(queue: &str, concurrency: usize, command: &str) -> String {
    queue_config_argv(queue, concurrency, &[command.to_owned()])
}

/// A queue running `argv` (each element a TOML basic string: Rust's
/// escapes of quotes, backslashes and newlines are TOML's too).
fn queue_config_argv(queue: &str, concurrency: usize, argv: &[String]) -> String {
    let command: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[[queue]]\nname = \"{queue}\"\ncommand = [{}]\nconcurrency = {concurrency}\n",
        command.join(", ")
    )
}

/// CPU time (user + system) of this process so far, children excluded, in µs.
fn self_cpu_us() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
    us(u.user_time()) + us(u.system_time())
}

/// A baseline's rate and its own CPU µs per job.
#[derive(Clone, Copy)]
struct Baseline {
    rate: f64,
    cpu_us_per_job: f64,
    /// The whole machine's busy CPU µs per job over the run: every process,
    /// the workers and the broker included.
    machine_us_per_job: f64,
    /// The local broker's CPU µs per job over the run; NaN when the broker
    /// is not a process of this machine.
    broker_us_per_job: f64,
}

/// Busy CPU time of the whole machine so far, all cores, in µs, from
/// /proc/stat: user, nice, system, irq and softirq (idle, iowait and the
/// time the hypervisor stole are left out).
fn machine_busy_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: f64 = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse::<f64>().ok())
                .enumerate()
                .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6))
                .map(|(_, t)| t)
                .sum()
        })
        .unwrap_or(f64::NAN);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz * 1e6
}

/// The local broker's CPU time so far in µs; NaN when it does not run here.
fn broker_cpu_us() -> f64 {
    broker_pid().and_then(own_cpu_us).unwrap_or(f64::NAN)
}

/// The clocks at the start of a baseline's run; [`Meter::finish`] turns
/// them into its rate and CPU per job.
struct Meter {
    cpu: f64,
    machine: f64,
    broker: f64,
    start: Instant,
}

impl Meter {
    fn start() -> Meter {
        Meter {
            cpu: self_cpu_us(),
            machine: machine_busy_us(),
            broker: broker_cpu_us(),
            start: Instant::now(),
        }
    }

    /// The run since [`Meter::start`] handled `n` jobs.
    fn finish(self, n: usize) -> Baseline {
        let per_job = |us: f64| us / n as f64;
        Baseline {
            rate: n as f64 / self.start.elapsed().as_secs_f64(),
            cpu_us_per_job: per_job(self_cpu_us() - self.cpu),
            machine_us_per_job: per_job(machine_busy_us() - self.machine),
            broker_us_per_job: per_job(broker_cpu_us() - self.broker),
        }
    }
}

/// (a) Spawn /bin/cat with a 1 KiB stdin and wait, from `c` threads.
fn bare_spawn(n: usize, c: usize, body: &[u8]) -> Baseline {
    bare_spawn_argv(n, c, body, &["/bin/cat".to_owned()])
}

/// (a) with the worker `argv`.
fn bare_spawn_argv(n: usize, c: usize, body: &[u8], argv: &[String]) -> Baseline {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let meter = Meter::start();
    std::thread::scope(|s| {
        for _ in 0..c {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let mut child = service_env(&mut Command::new(&argv[0]))
                        .args(&argv[1..])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .spawn()
                        .unwrap();
                    let mut stdin = child.stdin.take().unwrap();
                    // A worker that exits without reading its stdin breaks the pipe.
                    let _ = stdin.write_all(body);
                    drop(stdin);
                    child.wait_with_output().unwrap();
                }
            });
        }
    });
    meter.finish(n)
}

/// A new channel with prefetch `prefetch`, consuming `queue`.
async fn consume_from(conn: &Connection, queue: &str, prefetch: u16) -> (Channel, Consumer) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (ch, consumer)
}

/// (b) Consume and ack `n` messages with prefetch `c`, no spawn, on this
/// process's own runtime and lapin connection: the rate and this process's
/// CPU µs per message, the client stack's share of ours.
async fn consume_only(broker: &Broker, queue: &str, n: usize, c: usize) -> Baseline {
    let (ch, mut consumer) = consume_from(&broker.conn, queue, c as u16).await;
    let meter = Meter::start();
    for _ in 0..n {
        let d = consumer.next().await.unwrap().unwrap();
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let measured = meter.finish(n);
    let _ = ch.close(200, "ok".into()).await;
    measured
}

/// (c) `amqp-consume -p 1 -c n /bin/cat`, if installed.
fn amqp_consume(queue: &str, n: usize) -> Option<f64> {
    let which = Command::new("sh")
        .args(["-c", "command -v amqp-consume"])
        .output()
        .ok()?;
    if !which.status.success() {
        return None;
    }
    let start = Instant::now();
    let status = service_env(&mut Command::new("amqp-consume"))
        .args([
            "--url",
            &amqp_url().replace("%2f", "%2F"),
            "-q",
            queue,
            "-p",
            "1",
            "-c",
        ])
        .arg(n.to_string())
        .arg("/bin/cat")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    status
        .success()
        .then(|| n as f64 / start.elapsed().as_secs_f64())
}

/// A small C program that stamps its start as the first thing it does;
/// None when no C compiler is at hand (this binary stamps instead, but its
/// own start-up is slower, so the latency reads higher).
fn c_stamper(dir: &std::path::Path) -> Option<String> {
    let src = dir.join("stamp.c");
    let bin = dir.join("stamp");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
    const char *h = getenv("AMQP_EXEC_HEADERS"), *f = getenv("BENCH_STAMP_FILE");
    const char *p = h ? strstr(h, "\"published-ns\":\"") : NULL;
    FILE *out = f ? fopen(f, "a") : NULL;
    if (out && p) fprintf(out, "%lld %lld%09ld\n", atoll(p + 16), (long long)ts.tv_sec, ts.tv_nsec);
    if (out) fclose(out);
    char buf[4096]; while (read(0, buf, sizeof buf) > 0) {}
    return 0;
}
"#,
    )
    .ok()?;
    for flags in [&["-O2", "-static"][..], &["-O2"][..]] {
        let ok = Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(bin.display().to_string());
        }
    }
    None
}

/// Publishes `n` messages one at a time, 8 ms apart, each stamped with its
/// publish time, while the supervisor runs the stamping worker.
async fn latency(broker: &Broker, queue: &str, n: usize, c: usize) -> (f64, f64) {
    latency_of(BIN, broker, queue, n, c).await
}

/// [`latency`] with the `amqp-exec` binary at `bin`.
async fn latency_of(bin: &str, broker: &Broker, queue: &str, n: usize, c: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let stamps = dir.path().join("stamps");
    let worker = c_stamper(dir.path())
        .unwrap_or_else(|| std::env::current_exe().unwrap().display().to_string());
    let config = format!(
        "{}env = {{ {STAMP_ENV} = \"{}\" }}\n",
        queue_config(queue, c, &worker),
        stamps.display()
    );
    let bin = bin.to_owned();
    let run = std::thread::spawn(move || run_binary(&bin, &config, n, &[]));
    tokio::time::sleep(Duration::from_millis(700)).await;
    publish_stamped(broker, queue, n).await;
    run.join().unwrap();
    p50_p99(read_stamps(&stamps))
}

/// The broker's share of the latency: publish to delivery in a plain consumer
/// on its own connection, the same way as [`latency`] but with no process.
async fn broker_latency(broker: &Broker, queue: &str, n: usize) -> (f64, f64) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let (_ch, mut consumer) = consume_from(&conn, queue, 1).await;
    let receiver = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let d = consumer.next().await.unwrap().unwrap();
            let now = now_ns() as f64;
            let published = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("published-ns").cloned());
            if let Some(AMQPValue::LongString(p)) = published
                && let Ok(p) = p.to_string().parse::<f64>()
            {
                lat.push((now - p) / 1e6);
            }
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
        lat
    });
    publish_stamped(broker, queue, n).await;
    let lat = receiver.await.unwrap();
    let _ = conn.close(200, "ok".into()).await;
    p50_p99(lat)
}

/// The process start's share of the latency: a bare loop starts the same
/// stamping worker `n` times, 8 ms apart, each stamped with the time just
/// before its spawn, the way [`latency`] stamps the publish.
fn spawn_latency(n: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let stamps = dir.path().join("stamps");
    let worker = c_stamper(dir.path())
        .unwrap_or_else(|| std::env::current_exe().unwrap().display().to_string());
    for _ in 0..n {
        let headers = format!("{{\"published-ns\":\"{}\"}}", now_ns());
        // Pipes as the supervisor gives them, and the same 1-byte body.
        let mut child = service_env(&mut Command::new(&worker))
            .env("AMQP_EXEC_HEADERS", headers)
            .env(STAMP_ENV, &stamps)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the stamping worker");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"x").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "stamping worker: {}", out.status);
        std::thread::sleep(Duration::from_millis(8));
    }
    p50_p99(read_stamps(&stamps))
}

/// The latencies in ms from a stamp file of "<publish ns> <start ns>" lines.
fn read_stamps(path: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (p, s) = l.split_once(' ')?;
            Some((s.parse::<f64>().ok()? - p.parse::<f64>().ok()?) / 1e6)
        })
        .collect()
}

/// One of the performance targets, and what this run reached.
struct Target {
    what: String,
    reached: String,
    met: bool,
    /// What bounds it, from figures of the same run.
    note: String,
}

/// The targets the benchmark is held to, checked against this run; each
/// note gives the bound that the baselines of the same run put on it.
/// `latency_parts`: the p50 ms of a plain consumer's delivery and of a bare
/// spawn-to-start.
fn targets(
    rows: &[Row],
    memory: &[(&str, Ours)],
    latency_parts: (f64, f64),
    real: &[RealRow],
) -> Vec<Target> {
    let at = |c: usize| rows.iter().find(|r| r.c == c);
    let mut out = Vec::new();
    for r in rows.iter().filter(|r| r.c == 1 || r.c == 4) {
        let (ceiling, why) = if r.c == 1 {
            serial_ceiling(r)
        } else {
            cpu_ceiling(r)
        };
        out.push(Target {
            what: format!(
                "concurrency {}: ours/(a) at least 0.95 × ceiling ({:.2})",
                r.c,
                0.95 * ceiling
            ),
            reached: format!("{:.2}", r.over_spawn),
            met: r.over_spawn >= 0.95 * ceiling,
            note: format!("ceiling {ceiling:.2}: {why}"),
        });
    }
    if let Some(r) = at(1)
        && let Some(p) = r.over_peer
    {
        let peer_over_spawn = r.peer.unwrap_or(f64::NAN) / r.spawn.rate;
        out.push(Target {
            what: "concurrency 1, default settings: ours/(c) at least 1.05".into(),
            reached: format!("{p:.2}"),
            met: p >= 1.05,
            note: format!(
                "ceiling {:.2}: one job at a time runs no faster than (a), and (c) runs at {peer_over_spawn:.2} of (a)",
                1.0 / peer_over_spawn
            ),
        });
    }
    for r in rows.iter().filter(|r| r.c == 1 || r.c == 4) {
        let own = own_share(r);
        out.push(Target {
            what: format!(
                "concurrency {}: own CPU share at most 20 µs/job",
                r.c
            ),
            reached: format!("{own:.0} µs"),
            met: own <= 20.0,
            note: format!(
                "ours cpu {:.0} − ((a)cpu {:.0} + (b)cpu {:.0}): what amqp-exec adds to starting a process and to lapin",
                r.ours.cpu_us_per_job, r.spawn.cpu_us_per_job, r.consume.cpu_us_per_job
            ),
        });
    }
    for w in real {
        out.push(Target {
            what: format!("{}, concurrency {}: ours/(a) at least 0.97", w.worker, w.c),
            reached: format!("{:.2}", w.over_spawn),
            met: w.over_spawn >= 0.97,
            note: format!(
                "ceiling 1.00: (a) starts the same interpreter ({:.0} jobs/s against ours {:.0})",
                w.spawn_rate, w.ours_rate
            ),
        });
    }
    for r in rows {
        let floor = r.spawn.cpu_us_per_job + r.consume.cpu_us_per_job;
        out.push(Target {
            what: format!("concurrency {}: supervisor CPU at most 100 µs/job", r.c),
            reached: format!("{:.0} µs", r.ours.cpu_us_per_job),
            met: r.ours.cpu_us_per_job <= 100.0,
            note: format!(
                "(a)cpu + (b)cpu, starting a process plus receiving and acking through lapin: {floor:.0} µs ((b)cpu alone {:.0} µs)",
                r.consume.cpu_us_per_job
            ),
        });
    }
    if let Some(r) = at(1) {
        out.push(Target {
            what: "p50 latency publish to worker start at most 1 ms".into(),
            reached: format!("{:.2} ms", r.p50),
            met: r.p50 <= 1.0,
            note: format!(
                "plain consumer p50 {:.2} ms + bare spawn-to-start p50 {:.2} ms = {:.2} ms, the two parts measured apart",
                latency_parts.0,
                latency_parts.1,
                latency_parts.0 + latency_parts.1
            ),
        });
    }
    if let Some((_, o)) = memory.iter().find(|(label, _)| *label == "1 KiB") {
        out.push(Target {
            what: "concurrency 64, 1 KiB: peak RSS at most 30 MiB".into(),
            reached: format!("{:.1} MiB", o.peak_rss_mib),
            met: o.peak_rss_mib <= 30.0,
            note: String::new(),
        });
    }
    out
}

/// amqp-exec's own CPU µs per job: what it costs beyond starting a process
/// ((a)cpu) and receiving and acking a message through lapin ((b)cpu).
fn own_share(r: &Row) -> f64 {
    r.ours.cpu_us_per_job - (r.spawn.cpu_us_per_job + r.consume.cpu_us_per_job)
}

/// The bound on ours/(a) at concurrency 1, where the next delivery is
/// already buffered when a job ends (the adaptive prefetch): a job takes at
/// least (a)'s time for the process, plus the client's CPU for receiving
/// and acking its message ((b)cpu) on the one runtime thread.
fn serial_ceiling(r: &Row) -> (f64, String) {
    let period_us = 1e6 / r.spawn.rate;
    let ceiling = period_us / (period_us + r.consume.cpu_us_per_job);
    (
        ceiling,
        format!(
            "a job takes (a)'s {period_us:.0} µs plus the client's {:.0} µs of (b)cpu to receive and ack its message, (a)/((a)+(b)cpu)",
            r.consume.cpu_us_per_job
        ),
    )
}

/// The bound that the machine's cores put on ours/(a) at a concurrency
/// where (a) keeps them busy: a job of ours costs the machine at least what
/// one of (a) does (the process and its start), plus the client's and the
/// broker's CPU for a message as (b) measured them.
fn cpu_ceiling(r: &Row) -> (f64, String) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let a = r.spawn.machine_us_per_job;
    let busy = a * r.spawn.rate / 1e6;
    let per_job = a + r.consume.cpu_us_per_job + r.consume.broker_us_per_job;
    let ceiling = (cores * 1e6 / per_job / r.spawn.rate).min(1.0);
    (
        ceiling,
        format!(
            "(a) keeps {busy:.2} of {cores:.0} cores busy at {a:.0} µs/job machine-wide; \
             ours adds the client's {:.0} µs and the broker's {:.0} µs per message of (b)",
            r.consume.cpu_us_per_job, r.consume.broker_us_per_job
        ),
    )
}

/// One realistic worker at one concurrency: ours and (a) starting the same
/// interpreter, medians over the rounds, the ratio taken within each round.
struct RealRow {
    worker: &'static str,
    c: usize,
    ours_rate: f64,
    spawn_rate: f64,
    over_spawn: f64,
    cpu_us_per_job: f64,
}

/// The supervisor's CPU µs per MiB of a worker's stdout logged at `info`
/// (`script` writes `mib` MiB; a run of a worker that writes nothing is
/// taken off, so that start-up drops out), and this process's CPU µs per
/// MiB reading the same output from a pipe, 64 KiB at a time: medians over
/// `rounds`.
async fn output_cost(
    broker: &Broker,
    queue: &str,
    script: &str,
    mib: usize,
    rounds: usize,
) -> (f64, f64) {
    let sh = |s: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), s.to_owned()];
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let mut cpu = Vec::new();
        for s in [script, "cat >/dev/null"] {
            broker.fresh_queue(queue).await;
            broker.publish(queue, 1, b"x").await;
            let config = queue_config_argv(queue, 1, &sh(s));
            cpu.push(run_supervisor(&config, 1, &[("RUST_LOG", "info")]).cpu_us_per_job);
        }
        ours.push((cpu[0] - cpu[1]) / mib as f64);
        let meter = Meter::start();
        let mut child = Command::new("/bin/sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        while std::io::Read::read(&mut out, &mut buf).unwrap() > 0 {}
        child.wait().unwrap();
        bare.push(meter.finish(1).cpu_us_per_job / mib as f64);
    }
    broker.delete(queue).await;
    (
        median(ours).unwrap_or(f64::NAN),
        median(bare).unwrap_or(f64::NAN),
    )
}

/// Workers that do about 2 ms of work in an interpreter, as a PHP or
/// Python script would: (name, argv), for those installed.
fn realistic_workers() -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    if let Some(php) = find_program("php") {
        out.push((
            "php -r (2 ms loop)",
            vec![
                php,
                "-r".into(),
                "$e = microtime(true) + 0.002; while (microtime(true) < $e) {}".into(),
            ],
        ));
    }
    if let Some(py) = find_program("python3") {
        out.push((
            "python3 -c (2 ms loop)",
            vec![
                py,
                "-c".into(),
                "import time\nt = time.perf_counter() + 0.002\nwhile time.perf_counter() < t: pass"
                    .into(),
            ],
        ));
    }
    out
}

/// The system's `name` (/usr/bin first: a version manager's shim in `PATH`
/// would start a shell before the interpreter), else the one in `PATH`.
fn find_program(name: &str) -> Option<String> {
    let system = format!("/usr/bin/{name}");
    if std::path::Path::new(&system).is_file() {
        return Some(system);
    }
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !path.is_empty()).then_some(path)
}

/// Runs each realistic worker at concurrency 1 and 4, `rounds` rounds of
/// `n` jobs through amqp-exec and through (a).
async fn realistic(broker: &Broker, queue: &str, n: usize, rounds: usize) -> Vec<RealRow> {
    let body = vec![b'x'; 1024];
    let mut out = Vec::new();
    for (worker, argv) in realistic_workers() {
        for c in [1usize, 4] {
            let config = queue_config_argv(queue, c, &argv);
            let (mut ours, mut spawn, mut ratio, mut cpu) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                broker.fresh_queue(queue).await;
                broker.publish(queue, n, &body).await;
                let o = run_supervisor(&config, n, &[]);
                let a = bare_spawn_argv(n, c, &body, &argv);
                ours.push(o.rate);
                spawn.push(a.rate);
                ratio.push(o.rate / a.rate);
                cpu.push(o.cpu_us_per_job);
            }
            broker.delete(queue).await;
            out.push(RealRow {
                worker,
                c,
                ours_rate: median(ours).unwrap_or(f64::NAN),
                spawn_rate: median(spawn).unwrap_or(f64::NAN),
                over_spawn: median(ratio).unwrap_or(f64::NAN),
                cpu_us_per_job: median(cpu).unwrap_or(f64::NAN),
            });
        }
    }
    out
}

/// The `amqp-exec-count-alloc` binary of this build (cargo feature
/// `count-alloc`), built beside this build's binary when the benchmark was
/// not built with the feature; None when it cannot be built.
fn count_alloc_bin() -> Option<String> {
    // Cargo names it whether or not this build made it.
    if let Some(bin) = option_env!("CARGO_BIN_EXE_amqp-exec-count-alloc")
        && std::path::Path::new(bin).is_file()
    {
        return Some(bin.to_owned());
    }
    let profile_dir = std::path::Path::new(BIN).parent()?;
    let target_dir = profile_dir.parent()?;
    let release = profile_dir.file_name()? == "release";
    println!("building amqp-exec-count-alloc (cargo feature count-alloc) to count allocations");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--features",
        "count-alloc",
        "--bin",
        "amqp-exec-count-alloc",
    ])
    .arg("--target-dir")
    .arg(target_dir)
    .current_dir(env!("CARGO_MANIFEST_DIR"))
    .stdout(Stdio::null());
    if release {
        cmd.arg("--release");
    }
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    let bin = profile_dir.join("amqp-exec-count-alloc");
    (ok && bin.is_file()).then(|| bin.display().to_string())
}

/// Allocations per job of `bin` (the counting build) at concurrency `c`:
/// two runs of different job counts, their difference over the difference
/// in jobs, so that start-up's allocations drop out.
async fn allocations_per_job(bin: &str, broker: &Broker, queue: &str, c: usize, n: usize) -> f64 {
    let body = vec![b'x'; 1024];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("allocations");
    let file_s = file.display().to_string();
    let config = queue_config(queue, c, "/bin/cat");
    let mut counts = Vec::new();
    let small = 100;
    let large = small + n.max(100);
    for jobs in [small, large] {
        broker.fresh_queue(queue).await;
        broker.publish(queue, jobs, &body).await;
        let _ = std::fs::remove_file(&file);
        run_binary(
            bin,
            &config,
            jobs,
            &[("AMQP_EXEC_COUNT_ALLOC_FILE", &file_s)],
        );
        let count: f64 = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(f64::NAN);
        counts.push(count);
    }
    broker.delete(queue).await;
    (counts[1] - counts[0]) / (large - small) as f64
}

/// Publishes `n` messages one at a time, 8 ms apart, each with its publish
/// time in the `published-ns` header.
async fn publish_stamped(broker: &Broker, queue: &str, n: usize) {
    for i in 0..n {
        let mut h = FieldTable::default();
        h.insert(
            "published-ns".into(),
            AMQPValue::LongString(now_ns().to_string().into()),
        );
        let props = BasicProperties::default()
            .with_message_id(format!("l{i}").as_str().into())
            .with_headers(h);
        broker
            .ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"x",
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
}

fn p50_p99(mut lat: Vec<f64>) -> (f64, f64) {
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (pct(0.5), pct(0.99))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(file) = std::env::var(STAMP_ENV) {
        stamp_worker(&file);
    }
    if std::env::var_os("AMQP_EXEC_QUEUE").is_some() {
        // Started as a worker without the stamp file: never run the benchmark.
        eprintln!("throughput bench started as a worker without {STAMP_ENV}");
        std::process::exit(78);
    }
    let args = args();
    if let Some(total) = args.soak {
        soak(total).await;
        return;
    }
    if let Some(other) = &args.compare {
        compare(
            other,
            args.jobs,
            args.rounds,
            &args.concs,
            args.worker.as_deref(),
        )
        .await;
        return;
    }
    let n = args.jobs;
    let body = vec![b'x'; 1024];
    let broker = Broker::connect().await;
    let queue = format!("bench-throughput-{}", std::process::id());
    println!(
        "amqp-exec throughput benchmark: {n} jobs per run, /bin/cat, 1 KiB bodies, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let have_amqp_consume = amqp_consume_installed();
    if !have_amqp_consume {
        println!(
            "(c) amqp-consume is not installed (Debian package amqp-tools): column left empty"
        );
    }

    let rounds = args.rounds;
    println!(
        "each figure is the median of {rounds} rounds; a round runs ours, (a) and (c) back to back, and ratios are taken within a round"
    );
    let mut rows = Vec::new();
    for c in [1usize, 4, 16] {
        let config = queue_config(&queue, c, "/bin/cat");
        let mut round = Vec::new();
        for _ in 0..rounds {
            round.push(run_round(&broker, &queue, &config, n, c, have_amqp_consume).await);
        }
        broker.publish(&queue, n, &body).await;
        let consume = consume_only(&broker, &queue, n, c).await;
        broker.delete(&queue).await;
        broker.fresh_queue(&queue).await;
        let (p50, p99) = latency(&broker, &queue, 300.min(n), c).await;
        broker.delete(&queue).await;
        rows.push(Row::new(c, &round, consume, p50, p99));
    }

    println!();
    println!(
        "{:>4} {:>8} {:>10} {:>9} {:>9} {:>8} {:>8} {:>10} {:>9} {:>9} {:>10} {:>7} {:>7} {:>7}",
        "conc",
        "ours/s",
        "(a)spawn/s",
        "(b)ack/s",
        "(c)peer/s",
        "ours/(a)",
        "ours/(c)",
        "cpu µs/job",
        "(a)cpu µs",
        "(b)cpu µs",
        "broker µs",
        "rss MiB",
        "p50 ms",
        "p99 ms"
    );
    for r in &rows {
        println!(
            "{:>4} {:>8.0} {:>10.0} {:>9.0} {:>9} {:>8.2} {:>8} {:>10.1} {:>9.1} {:>9.1} {:>10.1} {:>7.1} {:>7.2} {:>7.2}",
            r.c,
            r.ours.rate,
            r.spawn.rate,
            r.consume.rate,
            r.peer.map_or("-".into(), |p| format!("{p:.0}")),
            r.over_spawn,
            r.over_peer.map_or("-".into(), |p| format!("{p:.2}")),
            r.ours.cpu_us_per_job,
            r.spawn.cpu_us_per_job,
            r.consume.cpu_us_per_job,
            r.ours.broker_cpu_us_per_job,
            r.ours.peak_rss_mib,
            r.p50,
            r.p99
        );
    }
    println!(
        "cpu µs/job: the supervisor's own user+system time per job; (a)cpu µs: the same for the spawn loop, \
         the process start's share; (b)cpu µs: the same for a plain lapin consumer acking without a process, \
         the AMQP client's share; broker µs: the local broker's CPU per job during our run"
    );

    // The broker's and client's share of the latency, without a process.
    broker.fresh_queue(&queue).await;
    let (bp50, bp99) = broker_latency(&broker, &queue, 300.min(n)).await;
    broker.delete(&queue).await;
    println!(
        "latency from publish to delivery in a plain consumer (no process): p50 {bp50:.2} ms, p99 {bp99:.2} ms"
    );
    let (sp50, sp99) = tokio::task::spawn_blocking(move || spawn_latency(300.min(n)))
        .await
        .unwrap();
    println!(
        "latency from spawn to worker start in a bare loop (no broker): p50 {sp50:.2} ms, p99 {sp99:.2} ms"
    );

    // Concurrency 1 with one message buffered ahead: the documented setting
    // for short jobs, so that the next delivery is there when a job ends.
    let config = format!("{}prefetch = 2\n", queue_config(&queue, 1, "/bin/cat"));
    let mut round = Vec::new();
    for _ in 0..rounds {
        round.push(run_round(&broker, &queue, &config, n, 1, have_amqp_consume).await);
    }
    broker.delete(&queue).await;
    let ahead = Row::new(1, &round, rows[0].consume, f64::NAN, f64::NAN);
    println!(
        "concurrency 1, prefetch 2: {:.0} jobs/s, ours/(a) {:.2}, ours/(c) {}, {:.1} µs CPU/job",
        ahead.ours.rate,
        ahead.over_spawn,
        ahead.over_peer.map_or("-".into(), |p| format!("{p:.2}")),
        ahead.ours.cpu_us_per_job
    );

    // Memory with many workers.
    let mut memory = Vec::new();
    for (label, size, jobs) in [("1 KiB", 1024usize, n.min(2000)), ("1 MiB", 1 << 20, 300)] {
        broker.fresh_queue(&queue).await;
        broker.publish(&queue, jobs, &vec![b'x'; size]).await;
        let o = run_supervisor(&queue_config(&queue, 64, "/bin/cat"), jobs, &[]);
        broker.delete(&queue).await;
        println!(
            "concurrency 64, {label} bodies: {:.0} jobs/s, supervisor peak RSS {:.1} MiB, {:.1} µs CPU/job",
            o.rate, o.peak_rss_mib, o.cpu_us_per_job
        );
        memory.push((label, o));
    }

    // A worker that writes a lot: what reading and logging it costs.
    for (label, script) in [
        ("one endless line", "head -c 1073741824 /dev/zero"),
        ("empty lines", "yes '' | head -c 1073741824"),
    ] {
        let (ours, bare) = output_cost(&broker, &queue, script, 1024, rounds).await;
        println!(
            "worker output, 1 GiB as {label}: {ours:.0} µs supervisor CPU per MiB, \
             {bare:.0} µs for a bare 64 KiB pipe reader, ratio {:.1}",
            ours / bare
        );
    }

    // Realistic workers: an interpreter doing about 2 ms of work.
    let real_jobs = (n / 10).clamp(50, 300);
    let workers = realistic_workers();
    if workers.len() < 2 {
        println!(
            "realistic workers: {} (install php-cli and python3 for both)",
            if workers.is_empty() {
                "neither php nor python3 is installed: skipped".to_owned()
            } else {
                format!("only {} is installed", workers[0].0)
            }
        );
    }
    // A connection of its own: the 1 MiB bodies above can set off the
    // broker's memory alarm, which blocks and may close the first one.
    let broker = Broker::connect().await;
    let real = realistic(&broker, &queue, real_jobs, rounds).await;
    if !real.is_empty() {
        println!();
        println!(
            "realistic workers, {real_jobs} jobs per run, 1 KiB bodies; (a) starts the same interpreter:"
        );
        println!(
            "{:<24} {:>4} {:>8} {:>10} {:>8} {:>10}",
            "worker", "conc", "ours/s", "(a)spawn/s", "ours/(a)", "cpu µs/job"
        );
        for w in &real {
            println!(
                "{:<24} {:>4} {:>8.1} {:>10.1} {:>8.2} {:>10.1}",
                w.worker, w.c, w.ours_rate, w.spawn_rate, w.over_spawn, w.cpu_us_per_job
            );
        }
    }

    // Allocations per job, by the counting build of this code.
    let mut allocations = Vec::new();
    match count_alloc_bin() {
        Some(bin) => {
            for c in [1usize, 4] {
                let per_job = allocations_per_job(&bin, &broker, &queue, c, n.min(1000)).await;
                println!("concurrency {c}: {per_job:.1} allocations per job");
                allocations.push((c, per_job));
            }
        }
        None => println!(
            "allocations per job: amqp-exec-count-alloc could not be built (cargo build --release --features count-alloc)"
        ),
    }

    let targets = targets(&rows, &memory, (bp50, sp50), &real);
    println!();
    println!("targets:");
    for t in &targets {
        println!(
            "  {:<58} {:>9}  {:<7} {}",
            t.what,
            t.reached,
            if t.met { "met" } else { "not met" },
            t.note
        );
    }

    if let Some(path) = args.json {
        let json = serde_json::json!({
            "targets": targets.iter().map(|t| serde_json::json!({
                "target": t.what,
                "reached": t.reached,
                "met": t.met,
                "note": t.note,
            })).collect::<Vec<_>>(),
            "jobs_per_run": n,
            "rounds": rounds,
            "worker": "/bin/cat",
            "body_bytes": 1024,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "runs": rows.iter().map(|r| serde_json::json!({
                "concurrency": r.c,
                "ours_jobs_per_s": r.ours.rate,
                "spawn_loop_jobs_per_s": r.spawn.rate,
                "spawn_loop_cpu_us_per_job": r.spawn.cpu_us_per_job,
                "spawn_loop_machine_cpu_us_per_job": r.spawn.machine_us_per_job,
                "consume_ack_per_s": r.consume.rate,
                "consume_ack_cpu_us_per_message": r.consume.cpu_us_per_job,
                "consume_ack_broker_cpu_us_per_message": r.consume.broker_us_per_job,
                "amqp_consume_jobs_per_s": r.peer,
                "ours_over_spawn": r.over_spawn,
                "ours_over_amqp_consume": r.over_peer,
                "supervisor_cpu_us_per_job": r.ours.cpu_us_per_job,
                "own_cpu_share_us_per_job": own_share(r),
                "supervisor_peak_rss_mib": r.ours.peak_rss_mib,
                "broker_cpu_us_per_job": r.ours.broker_cpu_us_per_job,
                "latency_p50_ms": r.p50,
                "latency_p99_ms": r.p99,
            })).collect::<Vec<_>>(),
            "delivery_latency_no_process_ms": { "p50": bp50, "p99": bp99 },
            "start_latency_no_broker_ms": { "p50": sp50, "p99": sp99 },
            "concurrency_1_prefetch_2": {
                "jobs_per_s": ahead.ours.rate,
                "spawn_loop_jobs_per_s": ahead.spawn.rate,
                "ours_over_spawn": ahead.over_spawn,
                "ours_over_amqp_consume": ahead.over_peer,
                "supervisor_cpu_us_per_job": ahead.ours.cpu_us_per_job,
            },
            "realistic_workers": real.iter().map(|w| serde_json::json!({
                "worker": w.worker,
                "concurrency": w.c,
                "jobs_per_s": w.ours_rate,
                "spawn_loop_jobs_per_s": w.spawn_rate,
                "ours_over_spawn": w.over_spawn,
                "supervisor_cpu_us_per_job": w.cpu_us_per_job,
            })).collect::<Vec<_>>(),
            "allocations_per_job": allocations.iter().map(|(c, a)| serde_json::json!({
                "concurrency": c,
                "allocations": a,
            })).collect::<Vec<_>>(),
            "memory_concurrency_64": memory.iter().map(|(label, o)| serde_json::json!({
                "body": label,
                "jobs_per_s": o.rate,
                "supervisor_cpu_us_per_job": o.cpu_us_per_job,
                "supervisor_peak_rss_mib": o.peak_rss_mib,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        println!("wrote {path}");
    }
}

/// One round's measures: ours, (a) and (c) when installed.
struct Round {
    ours: Ours,
    spawn: Baseline,
    peer: Option<f64>,
}

/// Runs amqp-exec on `config` (a queue at concurrency `c`), then (a) and
/// (c), each on `n` freshly published 1 KiB messages.
async fn run_round(
    broker: &Broker,
    queue: &str,
    config: &str,
    n: usize,
    c: usize,
    have_amqp_consume: bool,
) -> Round {
    let body = vec![b'x'; 1024];
    broker.fresh_queue(queue).await;
    broker.publish(queue, n, &body).await;
    let ours = run_supervisor(config, n, &[]);
    let spawn = bare_spawn(n, c, &body);
    let peer = if have_amqp_consume {
        broker.publish(queue, n, &body).await;
        amqp_consume(queue, n)
    } else {
        None
    };
    Round { ours, spawn, peer }
}

/// One concurrency's figures: the median of each measure over the rounds,
/// and the median of the ratios taken within each round (the contenders of
/// a round run back to back, so a slow spell of the host hits them alike).
struct Row {
    c: usize,
    ours: Ours,
    spawn: Baseline,
    consume: Baseline,
    peer: Option<f64>,
    over_spawn: f64,
    over_peer: Option<f64>,
    p50: f64,
    p99: f64,
}

impl Row {
    fn new(c: usize, rounds: &[Round], consume: Baseline, p50: f64, p99: f64) -> Row {
        let m = |f: &dyn Fn(&Round) -> Option<f64>| median(rounds.iter().filter_map(f).collect());
        Row {
            c,
            ours: Ours {
                rate: m(&|r| Some(r.ours.rate)).unwrap_or(f64::NAN),
                cpu_us_per_job: m(&|r| Some(r.ours.cpu_us_per_job)).unwrap_or(f64::NAN),
                peak_rss_mib: m(&|r| Some(r.ours.peak_rss_mib)).unwrap_or(f64::NAN),
                broker_cpu_us_per_job: m(&|r| Some(r.ours.broker_cpu_us_per_job))
                    .unwrap_or(f64::NAN),
            },
            spawn: Baseline {
                rate: m(&|r| Some(r.spawn.rate)).unwrap_or(f64::NAN),
                cpu_us_per_job: m(&|r| Some(r.spawn.cpu_us_per_job)).unwrap_or(f64::NAN),
                machine_us_per_job: m(&|r| Some(r.spawn.machine_us_per_job)).unwrap_or(f64::NAN),
                broker_us_per_job: f64::NAN,
            },
            consume,
            peer: m(&|r| r.peer),
            over_spawn: m(&|r| Some(r.ours.rate / r.spawn.rate)).unwrap_or(f64::NAN),
            over_peer: m(&|r| r.peer.map(|p| r.ours.rate / p)),
            p50,
            p99,
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Open fds, threads and RSS (KiB) of a process.
fn resources(pid: i32) -> (usize, u64, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (fds, field("Threads:"), field("VmRSS:"))
}

/// `--soak N`: N jobs at concurrency 8 through one supervisor, published in
/// batches of 10,000, sampling its open fds, threads and RSS after each
/// batch. They must stay flat.
async fn soak(total: usize) {
    let broker = Broker::connect().await;
    let queue = format!("bench-soak-{}", std::process::id());
    broker.fresh_queue(&queue).await;
    println!("soak: {total} jobs, /bin/cat, 1 KiB bodies, concurrency 8");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("soak.toml");
    std::fs::write(&cfg, queue_config(&queue, 8, "/bin/cat")).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start amqp-exec");
    let pid = child.id() as i32;
    let body = vec![b'x'; 1024];
    let step = 10_000;
    let start = Instant::now();
    let mut samples = Vec::new();
    println!(
        "{:>9} {:>8} {:>8} {:>9} {:>9}",
        "jobs", "fds", "threads", "rss KiB", "jobs/s"
    );
    for done in (step..=total).step_by(step) {
        broker.publish(&queue, step, &body).await;
        // Wait until this batch is drained.
        loop {
            let ch = broker.conn.create_channel().await.unwrap();
            let ready = ch
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|q| q.message_count())
                .unwrap_or(0);
            let _ = ch.close(200, "ok".into()).await;
            if ready == 0 || child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (fds, threads, rss) = resources(pid);
        println!(
            "{done:>9} {fds:>8} {threads:>8} {rss:>9} {:>9.0}",
            done as f64 / start.elapsed().as_secs_f64()
        );
        samples.push((fds, threads, rss));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    broker.delete(&queue).await;
    if let (Some(first), Some(last)) = (samples.get(1).or(samples.first()), samples.last()) {
        let rss_growth = last.2 as f64 / first.2.max(1) as f64;
        println!(
            "from {} to {} jobs: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB ({:+.1}%)",
            if samples.len() > 1 { 2 * step } else { step },
            total,
            first.0,
            last.0,
            first.1,
            last.1,
            first.2,
            last.2,
            (rss_growth - 1.0) * 100.0
        );
    }
}

/// `--compare PATH`: this build against the binary at `other`, in turns.
async fn compare(other: &str, n: usize, rounds: usize, concs: &[usize], worker: Option<&str>) {
    assert!(
        std::path::Path::new(other).is_file(),
        "--compare {other}: no such file"
    );
    let (worker, argv) = match worker {
        None => ("/bin/cat", vec!["/bin/cat".to_owned()]),
        Some(name) => realistic_workers()
            .into_iter()
            .find(|(label, _)| label.starts_with(name))
            .unwrap_or_else(|| panic!("--worker {name}: not installed (php or python3)")),
    };
    // Each binary goes first in half the pairs.
    let rounds = rounds.next_multiple_of(2);
    let broker = Broker::connect().await;
    let queue = format!("bench-compare-{}", std::process::id());
    let body = vec![b'x'; 1024];
    println!(
        "compare: {n} jobs per run, {worker}, 1 KiB bodies, {rounds} pairs\n  this: {BIN}\n  other: {other}"
    );
    println!(
        "{:>4} {:>9} {:>9} {:>7} {:>11} {:>12} {:>7} {:>11} {:>12}",
        "conc",
        "this/s",
        "other/s",
        "ratio",
        "this µs/job",
        "other µs/job",
        "ratio",
        "this p50 ms",
        "other p50 ms"
    );
    for &c in concs {
        let config = queue_config_argv(&queue, c, &argv);
        let (mut this, mut them) = (Vec::new(), Vec::new());
        let (mut this_p50, mut them_p50) = (Vec::new(), Vec::new());
        for pair in 0..rounds {
            let order = if pair % 2 == 0 {
                [(true, BIN), (false, other)]
            } else {
                [(false, other), (true, BIN)]
            };
            for (ours, bin) in order {
                broker.fresh_queue(&queue).await;
                broker.publish(&queue, n, &body).await;
                let o = run_binary(bin, &config, n, &[]);
                broker.fresh_queue(&queue).await;
                let (p50, _) = latency_of(bin, &broker, &queue, 300.min(n), c).await;
                if ours {
                    this.push(o);
                    this_p50.push(p50);
                } else {
                    them.push(o);
                    them_p50.push(p50);
                }
            }
        }
        broker.delete(&queue).await;
        let rate = |v: &[Ours]| median(v.iter().map(|o| o.rate).collect()).unwrap_or(f64::NAN);
        let cpu =
            |v: &[Ours]| median(v.iter().map(|o| o.cpu_us_per_job).collect()).unwrap_or(f64::NAN);
        println!(
            "{c:>4} {:>9.0} {:>9.0} {:>7.2} {:>11.0} {:>12.0} {:>7.2} {:>11.2} {:>12.2}",
            rate(&this),
            rate(&them),
            rate(&this) / rate(&them),
            cpu(&this),
            cpu(&them),
            cpu(&this) / cpu(&them),
            median(this_p50).unwrap_or(f64::NAN),
            median(them_p50).unwrap_or(f64::NAN),
        );
    }
}

fn amqp_consume_installed() -> bool {
    Command::new("sh")
        .args(["-c", "command -v amqp-consume"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
