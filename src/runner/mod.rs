//! Job runner: starts one unit-worker process for one message, feeds it the
//! body on stdin, drains stdout and stderr concurrently (logging them line by
//! line with bounded memory), enforces the timeout by signalling the worker's
//! whole process group, and reports how the worker ended.
//!
//! Every worker is the leader of its own process group. When the worker
//! exits, anything it left behind in that group (background children holding
//! its pipes, say) is killed, so no stray process outlives its job.
//!
//! A worker's exit closes its output, so the runner looks for the exit
//! when the output ends, and waits on the runtime for it only when the
//! worker has not exited by then, or is still running 100 ms
//! after its start (its output may stay open after its exit).

use crate::config::Sandbox;
use crate::policy::Outcome;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use nix::unistd::pipe2;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

mod spawn;
pub use spawn::BaseEnv;

/// How much of stderr is kept for dead-letter headers and failure replies.
pub const STDERR_TAIL_BYTES: usize = 4096;
/// Longest worker output line that is logged whole; the rest is cut.
pub const MAX_LOG_LINE: usize = 8192;
/// How long pipes may stay open after the worker's process group was killed
/// (only a process that left the group can hold them) before reading stops.
pub const PIPE_DRAIN_LIMIT: Duration = Duration::from_secs(1);
/// A worker's exit ends its output, and a job is reaped when its output
/// ends. A worker that keeps running with its output closed, or that
/// exits while a process it started holds its output, is watched for its
/// exit from this long after its start.
const WATCH_EXIT_AFTER: Duration = Duration::from_millis(100);

/// Fields attached to every log line of a job.
#[derive(Debug, Clone)]
pub struct LogContext {
    pub queue: std::sync::Arc<str>,
    pub message_id: String,
    pub attempt: u32,
}

/// One run of a worker.
pub struct Job<'a> {
    pub command: &'a [String],
    /// The environment every worker of the queue gets.
    pub base_env: &'a BaseEnv,
    /// The variables describing this message.
    pub message_env: &'a [(&'static str, std::borrow::Cow<'a, str>)],
    pub working_dir: Option<&'a Path>,
    pub sandbox: &'a Sandbox,
    pub body: &'a [u8],
    pub timeout: Duration,
    pub kill_grace: Duration,
    /// Keep up to this many bytes of stdout (for replies); 0 keeps none.
    pub capture_stdout: usize,
    /// Log at most this many lines of output, stdout and stderr together.
    pub max_log_lines: usize,
    pub log: &'a LogContext,
    /// Given the worker's pid once it has started (the status page shows
    /// it).
    pub pid_to: Option<&'a std::sync::atomic::AtomicU32>,
}

/// How a run ended, with what it wrote.
#[derive(Debug)]
pub struct JobResult {
    pub outcome: Outcome,
    pub pid: Option<u32>,
    /// The last [`STDERR_TAIL_BYTES`] of stderr, or the spawn error text.
    pub stderr_or_reason: Vec<u8>,
    /// Up to `capture_stdout` bytes of stdout.
    pub stdout: Vec<u8>,
    pub stdout_truncated: bool,
    pub elapsed: Duration,
    /// Why the worker could not be started, when it could not.
    pub spawn_error: Option<std::io::ErrorKind>,
}

/// Runs the job. `interrupt` (shutdown grace expired, second signal) stops
/// the worker early, and so does `connection_lost` when given (the queue's
/// `on_connection_loss = "kill"`): it is terminated like a timed-out worker
/// and the result is [`Outcome::Interrupted`].
pub async fn run(
    job: Job<'_>,
    interrupt: &CancellationToken,
    connection_lost: Option<&CancellationToken>,
) -> JobResult {
    let started = Instant::now();
    let spawn_failed = |text: String, kind: std::io::ErrorKind| JobResult {
        spawn_error: Some(kind),
        outcome: Outcome::SpawnFailed,
        pid: None,
        stderr_or_reason: text.into_bytes(),
        stdout: Vec::new(),
        stdout_truncated: false,
        elapsed: started.elapsed(),
    };
    // Whether the log takes the worker's lines of each stream: stdout at
    // `info`, stderr at `warn`, and none with `max_log_lines = 0`.
    let logs = job.max_log_lines > 0;
    let stdout_logged =
        logs && tracing::enabled!(target: "amqp_exec::worker", tracing::Level::INFO);
    let stderr_logged =
        logs && tracing::enabled!(target: "amqp_exec::worker", tracing::Level::WARN);
    // Worker stdout that would be neither logged nor kept goes to /dev/null:
    // no pipe to create, register with the runtime, read and close.
    let pipes = match Pipes::new(job.body, stdout_logged || job.capture_stdout > 0) {
        Ok(p) => p,
        Err(e) => {
            return spawn_failed(
                format!(
                    "cannot start {:?}: cannot create its pipes: {e}",
                    job.command[0]
                ),
                e.kind(),
            );
        }
    };
    let Pipes {
        child_stdin,
        child_stdout,
        child_stderr,
        stdin_rest,
        stdout,
        stderr,
    } = pipes;
    let spawning = crate::reaper::spawning();
    let child_fds = [
        child_stdin.as_raw_fd(),
        child_stdout.as_raw_fd(),
        child_stderr.as_raw_fd(),
    ];
    // Straight through a vfork-style clone when no hook between fork and
    // exec is needed; else through Command, which runs the sandbox's hook.
    let spawned = if job.sandbox.is_unset() && spawn::usable(&job.command[0], child_fds) {
        let spawned = spawn::spawn(
            job.command,
            job.base_env,
            job.message_env,
            job.working_dir,
            child_fds,
        );
        // The child's ends, closed here, so that the worker's exit gives
        // end-of-file and a broken stdin pipe.
        drop((child_stdin, child_stdout, child_stderr));
        spawned.map(Child::Direct)
    } else {
        let mut cmd = Command::new(&job.command[0]);
        cmd.args(&job.command[1..])
            .env_clear()
            .envs(job.base_env.pairs().iter().map(|(k, v)| (k, v)))
            .envs(job.message_env.iter().map(|(k, v)| (k, v.as_ref())))
            .stdin(Stdio::from(child_stdin))
            .stdout(match child_stdout {
                ChildStdout::Pipe(fd) => Stdio::from(fd),
                ChildStdout::Null(_) => Stdio::null(),
            })
            .stderr(Stdio::from(child_stderr))
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = job.working_dir {
            cmd.current_dir(dir);
        }
        apply_sandbox(&mut cmd, job.sandbox);
        let spawned = cmd.spawn();
        // The command holds the child's ends of the pipes: closed here.
        drop(cmd);
        spawned.map(Child::Tokio)
    };
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            drop(spawning);
            return spawn_failed(spawn_error_text(job.command, job.working_dir, &e), e.kind());
        }
    };
    let pid = child.id();
    if let (Some(to), Some(pid)) = (job.pid_to, pid) {
        to.store(pid, Ordering::Relaxed);
    }
    // Known to the reaper (as PID 1) until tokio has its status.
    let _worker = spawning.started(pid);
    let pgid = pid.map(|p| p as i32).unwrap_or(0);
    // Declared after `child`, so dropped before it: if this future is
    // dropped with the worker running (the runtime shutting down), its
    // whole group is killed, not only the leader (`kill_on_drop`).
    let group = KillGroupOnDrop(pgid);

    let mut out = Sink::capture(job.capture_stdout);
    let mut err = Sink::tail(STDERR_TAIL_BYTES);
    let stdin = stdin_rest;
    let log = job.log;
    let budget = LogBudget::new(job.max_log_lines);
    // The pipes borrow the sinks until this block ends.
    let outcome = {
        let io = async {
            tokio::join!(
                feed(stdin, job.body),
                pump(
                    stdout,
                    &mut out,
                    Stream::Stdout,
                    stdout_logged,
                    log,
                    pid,
                    &budget
                ),
                pump(
                    Some(stderr),
                    &mut err,
                    Stream::Stderr,
                    stderr_logged,
                    log,
                    pid,
                    &budget
                ),
            );
        };
        tokio::pin!(io);
        let mut io_done = false;

        enum Stop {
            Exited(std::io::Result<std::process::ExitStatus>),
            Timeout,
            Interrupted,
        }
        let deadline = tokio::time::sleep(job.timeout);
        tokio::pin!(deadline);
        let watch_after = tokio::time::sleep(WATCH_EXIT_AFTER);
        tokio::pin!(watch_after);
        let mut watch_exit = false;
        let interrupted = async {
            match connection_lost {
                Some(lost) => tokio::select! {
                    _ = interrupt.cancelled() => {}
                    _ = lost.cancelled() => {}
                },
                None => interrupt.cancelled().await,
            }
        };
        tokio::pin!(interrupted);
        let stop = loop {
            tokio::select! {
                _ = &mut io, if !io_done => {
                    io_done = true;
                    match child.try_wait() {
                        Ok(Some(status)) => break Stop::Exited(Ok(status)),
                        Ok(None) => watch_exit = true,
                        Err(e) => break Stop::Exited(Err(e)),
                    }
                }
                status = child.wait(), if watch_exit => break Stop::Exited(status),
                _ = &mut watch_after, if !watch_exit => watch_exit = true,
                _ = &mut deadline => break Stop::Timeout,
                _ = &mut interrupted => break Stop::Interrupted,
            }
        };

        let outcome = match stop {
            Stop::Exited(status) => status_outcome(status),
            Stop::Timeout | Stop::Interrupted => {
                let why = if matches!(stop, Stop::Timeout) {
                    "timed out"
                } else {
                    "interrupted"
                };
                tracing::warn!(
                    queue = %log.queue, message_id = %log.message_id, attempt = log.attempt, pid = pgid,
                    "worker {why} after {:.1}s; sending SIGTERM to its process group",
                    started.elapsed().as_secs_f64()
                );
                terminate(pgid, Signal::SIGTERM);
                let grace = tokio::time::sleep(job.kill_grace);
                tokio::pin!(grace);
                let exited = loop {
                    tokio::select! {
                        _ = &mut io, if !io_done => io_done = true,
                        _ = child.wait() => break true,
                        _ = &mut grace => break false,
                    }
                };
                if !exited {
                    tracing::warn!(
                        queue = %log.queue, message_id = %log.message_id, pid = pgid,
                        "worker still running after kill_grace; sending SIGKILL"
                    );
                    terminate(pgid, Signal::SIGKILL);
                    let _ = child.wait().await;
                }
                if matches!(stop, Stop::Timeout) {
                    Outcome::Timeout
                } else {
                    Outcome::Interrupted
                }
            }
        };
        // Kill whatever the worker left in its process group; it may hold the pipes.
        drop(group);
        if !io_done
            && tokio::time::timeout(PIPE_DRAIN_LIMIT, &mut io)
                .await
                .is_err()
        {
            tracing::warn!(
                queue = %log.queue, message_id = %log.message_id, pid = pgid,
                "a process that left the worker's process group still holds its output; no longer reading it"
            );
        }
        outcome
    };
    let skipped = budget.skipped.load(Ordering::Relaxed);
    if skipped > 0 && job.max_log_lines > 0 {
        tracing::warn!(
            queue = %log.queue, message_id = %log.message_id, attempt = log.attempt, pid = pgid,
            "the worker wrote {skipped} more line(s) of output than max_log_lines ({}); they were not logged",
            job.max_log_lines
        );
    }
    JobResult {
        outcome,
        pid,
        stderr_or_reason: err.into_bytes(),
        stdout_truncated: out.truncated,
        stdout: out.into_bytes(),
        elapsed: started.elapsed(),
        spawn_error: None,
    }
}

/// A running worker, started by [`spawn`] or through `Command`.
enum Child {
    Direct(spawn::Child),
    Tokio(tokio::process::Child),
}

impl Child {
    fn id(&self) -> Option<u32> {
        match self {
            Child::Direct(c) => Some(c.id()),
            Child::Tokio(c) => c.id(),
        }
    }

    /// The exit status if the worker has exited, without waiting.
    fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        match self {
            Child::Direct(c) => c.try_wait(),
            Child::Tokio(c) => c.try_wait(),
        }
    }

    /// Waits for the exit; cancel-safe.
    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Child::Direct(c) => c.wait().await,
            Child::Tokio(c) => c.wait().await,
        }
    }
}

/// Sets the user, groups, resource limits and niceness of the worker in a
/// hook between fork and exec, for queues that set any of them: limits and
/// niceness first, while still privileged, then the identity switch
/// (supplementary groups, group, user).
fn apply_sandbox(cmd: &mut Command, sandbox: &Sandbox) {
    if sandbox.is_unset() {
        return;
    }
    let (memory, files, cpu, nice, core) = (
        sandbox.memory_limit,
        sandbox.max_open_files,
        sandbox.cpu_time,
        sandbox.nice,
        sandbox.core_size,
    );
    let user = sandbox.user.as_ref().map(|u| {
        let groups: Vec<nix::unistd::Gid> = u
            .groups
            .iter()
            .map(|g| nix::unistd::Gid::from_raw(*g))
            .collect();
        (u.uid, u.gid, groups)
    });
    let group = sandbox.group.as_ref().map(|(_, gid)| *gid);
    // SAFETY: the hook runs in the child between fork and exec. It makes only
    // async-signal-safe system calls (getrlimit, setrlimit, setpriority,
    // setgroups, setgid, setuid) on values prepared before the fork, and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            use nix::sys::resource::{Resource, setrlimit};
            use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
            let io = std::io::Error::from;
            let limit = |r: Resource, v: Option<u64>| match v {
                Some(v) => setrlimit(r, v, v).map_err(io),
                None => Ok(()),
            };
            limit(Resource::RLIMIT_AS, memory)?;
            limit(Resource::RLIMIT_NOFILE, files)?;
            if let Some(bytes) = core {
                // Up to the hard limit, which only root may raise.
                let (_, hard) = nix::sys::resource::getrlimit(Resource::RLIMIT_CORE).map_err(io)?;
                setrlimit(Resource::RLIMIT_CORE, bytes.min(hard), hard).map_err(io)?;
            }
            if let Some(secs) = cpu {
                // Soft limit: SIGXCPU at the limit; hard limit a second later: SIGKILL.
                setrlimit(Resource::RLIMIT_CPU, secs, secs + 1).map_err(io)?;
            }
            if let Some(n) = nice
                && nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, n) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            match (&user, group) {
                (Some((uid, gid, groups)), group) => {
                    // The supervisor's supplementary groups are not the
                    // user's: replace them wherever the process may
                    // (root, or CAP_SETGID).
                    match setgroups(groups) {
                        Ok(()) => {}
                        Err(nix::errno::Errno::EPERM) if !Uid::effective().is_root() => {}
                        Err(e) => return Err(io(e)),
                    }
                    setgid(Gid::from_raw(group.unwrap_or(*gid))).map_err(io)?;
                    setuid(Uid::from_raw(*uid)).map_err(io)?;
                }
                (None, Some(gid)) => setgid(Gid::from_raw(gid)).map_err(io)?,
                (None, None) => {}
            }
            Ok(())
        });
    }
}

fn status_outcome(status: std::io::Result<std::process::ExitStatus>) -> Outcome {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Outcome::Exit(code),
            (None, Some(sig)) => Outcome::Signal(sig),
            (None, None) => Outcome::Exit(255),
        },
        // Waiting failed (should not happen): count it as a crash so it is retried.
        Err(_) => Outcome::Signal(Signal::SIGKILL as i32),
    }
}

fn spawn_error_text(command: &[String], dir: Option<&Path>, e: &std::io::Error) -> String {
    match dir {
        Some(d) if e.kind() == std::io::ErrorKind::NotFound && !d.is_dir() => {
            format!(
                "cannot start {:?}: working_dir {} does not exist",
                command[0],
                d.display()
            )
        }
        _ => format!("cannot start {:?}: {e}", command[0]),
    }
}

/// Signals the worker and its process group. Never signals a group id ≤ 1.
/// SIGTERM is followed by SIGCONT, so that a stopped worker (SIGSTOP,
/// SIGTSTP) gets to handle it rather than wait for SIGKILL.
fn terminate(pgid: i32, sig: Signal) {
    let send = |sig| {
        if pgid > 1 {
            // The leader may have moved itself to another group; reach it directly too.
            let _ = kill(Pid::from_raw(pgid), sig);
        }
        signal_group(pgid, sig);
    };
    send(sig);
    if sig == Signal::SIGTERM {
        send(Signal::SIGCONT);
    }
}

/// SIGKILLs a worker's process group when dropped.
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        signal_group(self.0, Signal::SIGKILL);
    }
}

/// `killpg`, refusing group ids ≤ 1 (0 is our own group, 1 almost everything).
pub fn signal_group(pgid: i32, sig: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

/// The worker's pipes. The body is written into the stdin pipe before the
/// worker starts, as much as the pipe holds (all of it for bodies up to the
/// pipe's capacity, 64 KiB by default), so a typical job needs no task to
/// feed stdin; only the rest of a larger body is written while the worker runs.
struct Pipes {
    child_stdin: OwnedFd,
    child_stdout: ChildStdout,
    child_stderr: OwnedFd,
    /// The write end and how much of the body it already holds, when the
    /// body did not fit whole.
    stdin_rest: Option<(pipe::Sender, usize)>,
    /// None when the worker's stdout goes to `/dev/null`.
    stdout: Option<pipe::Receiver>,
    stderr: pipe::Receiver,
}

impl Pipes {
    fn new(body: &[u8], stdout_wanted: bool) -> std::io::Result<Pipes> {
        let (child_stdin, stdin_w) = pipe2(OFlag::O_CLOEXEC)?;
        let written = prefill(&stdin_w, body)?;
        let stdin_rest = if written == body.len() {
            // Closing the write end now gives the worker end-of-file after the body.
            drop(stdin_w);
            None
        } else {
            Some((pipe::Sender::from_owned_fd_unchecked(stdin_w)?, written))
        };
        let (stdout, child_stdout) = match (stdout_wanted, dev_null()) {
            (false, Some(null)) => (None, ChildStdout::Null(null)),
            _ => {
                let (r, w) = Self::output()?;
                (Some(r), ChildStdout::Pipe(w))
            }
        };
        let (stderr, child_stderr) = Self::output()?;
        Ok(Pipes {
            child_stdin,
            child_stdout,
            child_stderr,
            stdin_rest,
            stdout,
            stderr,
        })
    }

    /// A pipe for the worker to write to: our non-blocking read end, registered
    /// with the runtime, and the worker's (blocking) write end.
    fn output() -> std::io::Result<(pipe::Receiver, OwnedFd)> {
        let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
        fcntl(&r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        Ok((pipe::Receiver::from_owned_fd_unchecked(r)?, w))
    }
}

/// The worker's stdout: a pipe's write end, or the supervisor's one
/// `/dev/null`, shared by every worker (the clone start dup2s it; no copy
/// per job).
enum ChildStdout {
    Pipe(OwnedFd),
    Null(BorrowedFd<'static>),
}

impl AsRawFd for ChildStdout {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            ChildStdout::Pipe(fd) => fd.as_raw_fd(),
            ChildStdout::Null(fd) => fd.as_raw_fd(),
        }
    }
}

/// `/dev/null`, opened once, as a descriptor above 2 (the clone start takes
/// only those); None when it cannot be opened (then stdout gets a pipe,
/// read and discarded).
fn dev_null() -> Option<BorrowedFd<'static>> {
    use std::os::fd::AsFd;
    static NULL: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| {
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .ok()
            .map(OwnedFd::from)?;
        if null.as_raw_fd() > 2 {
            return Some(null);
        }
        // Started with a standard descriptor closed: move it out of the way.
        null.as_fd().try_clone_to_owned().ok()
    })
    .as_ref()
    .map(|fd| fd.as_fd())
}

/// Writes as much of `body` as the empty pipe takes without blocking; returns
/// how much. Up to `PIPE_BUF` bytes always fit whole in an empty pipe, so a
/// small body takes one blocking `write` and no mode change.
fn prefill(w: &OwnedFd, body: &[u8]) -> std::io::Result<usize> {
    const PIPE_BUF: usize = 4096;
    if body.is_empty() {
        return Ok(0);
    }
    if body.len() > PIPE_BUF {
        fcntl(w, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    let mut done = 0;
    while done < body.len() {
        match nix::unistd::write(w, &body[done..]) {
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Writes the rest of a large body while the worker runs.
async fn feed(rest: Option<(pipe::Sender, usize)>, body: &[u8]) {
    if let Some((mut stdin, written)) = rest {
        // A worker that exits without reading stdin gives EPIPE here: normal.
        let _ = stdin.write_all(&body[written..]).await;
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Where a stream's bytes go besides the log: a bounded capture (stdout for
/// replies) or a rolling tail (stderr).
struct Sink {
    buf: Vec<u8>,
    limit: usize,
    tail: bool,
    truncated: bool,
}

impl Sink {
    fn capture(limit: usize) -> Self {
        Sink {
            buf: Vec::new(),
            limit,
            tail: false,
            truncated: false,
        }
    }

    fn tail(limit: usize) -> Self {
        Sink {
            buf: Vec::new(),
            limit,
            tail: true,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if self.limit == 0 {
            return;
        }
        if self.tail {
            self.buf
                .extend_from_slice(&data[data.len().saturating_sub(self.limit)..]);
            if self.buf.len() > 2 * self.limit {
                let cut = self.buf.len() - self.limit;
                self.buf.drain(..cut);
            }
        } else {
            let room = self.limit - self.buf.len();
            if data.len() > room {
                self.truncated = true;
            }
            self.buf.extend_from_slice(&data[..data.len().min(room)]);
        }
    }

    fn into_bytes(mut self) -> Vec<u8> {
        if self.tail && self.buf.len() > self.limit {
            let cut = self.buf.len() - self.limit;
            self.buf.drain(..cut);
        }
        self.buf
    }
}

/// The lines of one job's output that may still be logged, shared by its
/// stdout and stderr, and how many were not.
struct LogBudget {
    left: AtomicUsize,
    skipped: AtomicUsize,
}

impl LogBudget {
    fn new(lines: usize) -> Self {
        LogBudget {
            left: AtomicUsize::new(lines),
            skipped: AtomicUsize::new(0),
        }
    }

    /// Whether no line is left.
    fn spent(&self) -> bool {
        self.left.load(Ordering::Relaxed) == 0
    }

    /// Takes `lines` from the budget at once, none of them logged; those
    /// beyond it are counted.
    fn take_unlogged(&self, lines: usize) {
        if lines == 0 {
            return;
        }
        let left = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(lines))
            })
            .unwrap_or(0);
        let beyond = lines.saturating_sub(left);
        if beyond > 0 {
            self.skipped.fetch_add(beyond, Ordering::Relaxed);
        }
    }

    /// Takes one line from the budget; false (and counted) when none is left.
    fn take(&self) -> bool {
        let took = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !took {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        took
    }
}

/// Reads one of the worker's streams to its end into `sink`, and logs its
/// lines when `logged`; lines count against the budget either way.
async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    sink: &mut Sink,
    stream: Stream,
    logged: bool,
    log: &LogContext,
    pid: Option<u32>,
    budget: &LogBudget,
) {
    let Some(mut reader) = reader else {
        return;
    };
    // On the heap and not zeroed: an array here would be part of every job's
    // future, which is copied when the job's task is spawned. Small at
    // first; a worker that fills it gets the pipe's whole capacity at a time.
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // The line being read (kept only when logged), how many of its bytes
    // were cut, and whether the last chunk ended inside a line.
    let mut line: Vec<u8> = Vec::new();
    let mut dropped = 0usize;
    let mut partial = false;
    loop {
        if buf.len() == buf.capacity() && buf.capacity() < READ_CHUNK_MAX {
            buf.reserve_exact(READ_CHUNK_MAX - buf.capacity());
        }
        buf.clear();
        // Into the spare capacity: the whole buffer after the clear.
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        sink.push(&buf);
        partial = buf.last() != Some(&b'\n');
        if !logged || budget.spent() {
            // Only counted: none of these lines is logged.
            budget.take_unlogged(memchr::memchr_iter(b'\n', &buf).count());
            continue;
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &buf) {
            take_bounded(&mut line, &mut dropped, &buf[start..end]);
            if budget.take() {
                log_line(&line, dropped, stream, log, pid);
            }
            line.clear();
            dropped = 0;
            start = end + 1;
        }
        take_bounded(&mut line, &mut dropped, &buf[start..]);
    }
    if partial && budget.take() && logged {
        log_line(&line, dropped, stream, log, pid);
    }
}

/// Bytes read from a worker's pipe at a time, at first.
const READ_CHUNK: usize = 8 * 1024;

/// Bytes read at a time from a worker that filled [`READ_CHUNK`]: a pipe's
/// default capacity.
const READ_CHUNK_MAX: usize = 64 * 1024;

fn take_bounded(line: &mut Vec<u8>, dropped: &mut usize, data: &[u8]) {
    let room = MAX_LOG_LINE.saturating_sub(line.len());
    let keep = data.len().min(room);
    line.extend_from_slice(&data[..keep]);
    *dropped += data.len() - keep;
}

fn log_line(line: &[u8], dropped: usize, stream: Stream, log: &LogContext, pid: Option<u32>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = String::from_utf8_lossy(line);
    let pid = pid.unwrap_or(0);
    let cut = if dropped > 0 {
        format!(" [{dropped} more bytes not logged]")
    } else {
        String::new()
    };
    match stream {
        Stream::Stdout => tracing::info!(
            target: "amqp_exec::worker",
            queue = %log.queue, message_id = %log.message_id, attempt = log.attempt, pid,
            stream = "stdout", "{text}{cut}"
        ),
        Stream::Stderr => tracing::warn!(
            target: "amqp_exec::worker",
            queue = %log.queue, message_id = %log.message_id, attempt = log.attempt, pid,
            stream = "stderr", "{text}{cut}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> LogContext {
        LogContext {
            queue: "q".into(),
            message_id: "m".into(),
            attempt: 1,
        }
    }

    fn job<'a>(cmd: &'a [String], body: &'a [u8], log: &'a LogContext) -> Job<'a> {
        Job {
            command: cmd,
            base_env: Box::leak(Box::default()),
            message_env: &[],
            working_dir: None,
            sandbox: Box::leak(Box::default()),
            body,
            timeout: Duration::from_secs(5),
            kill_grace: Duration::from_millis(200),
            capture_stdout: 1 << 20,
            max_log_lines: 1000,
            log,
            pid_to: None,
        }
    }

    #[test]
    fn the_log_budget_is_shared_and_counts_what_it_refuses() {
        let budget = LogBudget::new(2);
        assert!(budget.take());
        assert!(budget.take());
        assert!(!budget.take());
        assert!(!budget.take());
        assert_eq!(budget.skipped.load(Ordering::Relaxed), 2);
        let none = LogBudget::new(0);
        assert!(!none.take());
        let bulk = LogBudget::new(3);
        bulk.take_unlogged(2);
        assert!(!bulk.spent());
        bulk.take_unlogged(5);
        assert!(bulk.spent());
        assert_eq!(bulk.skipped.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn output_lines_are_counted_across_reads_logged_or_not() {
        let log = ctx();
        let mut text = Vec::new();
        for i in 0..100 {
            text.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        // A line longer than the largest read, then one without a newline.
        text.extend(std::iter::repeat_n(b'x', 3 * READ_CHUNK_MAX));
        text.extend_from_slice(b"\nno newline at the end");
        for logged in [false, true] {
            let budget = LogBudget::new(40);
            let mut sink = Sink::tail(16);
            let stream = Stream::Stderr;
            pump(
                Some(&text[..]),
                &mut sink,
                stream,
                logged,
                &log,
                None,
                &budget,
            )
            .await;
            // 102 lines, the last one cut short by the end.
            assert_eq!(
                budget.skipped.load(Ordering::Relaxed),
                62,
                "logged: {logged}"
            );
            assert_eq!(sink.into_bytes(), &text[text.len() - 16..]);
        }
    }

    /// Alive and not a zombie, allowing a second for a signal already sent
    /// to take effect.
    fn running(pid: i32) -> bool {
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

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn echoes_body_and_reports_exit() {
        let log = ctx();
        let cmd = argv(&["/bin/cat"]);
        let r = run(
            job(&cmd, b"a\0b\xff", &log),
            &CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(r.outcome, Outcome::Exit(0));
        assert_eq!(r.stdout, b"a\0b\xff");

        let cmd = argv(&["/bin/sh", "-c", "echo oops >&2; exit 3"]);
        let r = run(job(&cmd, b"", &log), &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::Exit(3));
        assert_eq!(r.stderr_or_reason, b"oops\n");
    }

    /// Stdout that nothing reads (not kept for a reply, and not logged:
    /// `max_log_lines = 0` here, or worker lines at `info` filtered out)
    /// goes to /dev/null; kept for a reply, it is a pipe; stderr is always a
    /// pipe.
    #[tokio::test]
    async fn stdout_nobody_reads_goes_to_dev_null() {
        let log = ctx();
        let cmd = argv(&[
            "/bin/sh",
            "-c",
            // The shell's own fds, read from a subshell: dash applies a
            // command's redirections to itself while the command runs.
            "o=$(readlink /proc/$$/fd/1); e=$(readlink /proc/$$/fd/2); echo \"$o\" >&2; echo \"$e\" >&2; echo out",
        ]);
        let mut j = job(&cmd, b"", &log);
        j.capture_stdout = 0;
        j.max_log_lines = 0;
        let r = run(j, &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::Exit(0));
        let err = String::from_utf8_lossy(&r.stderr_or_reason).into_owned();
        let mut lines = err.lines();
        assert_eq!(lines.next(), Some("/dev/null"), "{err}");
        assert!(lines.next().unwrap_or("").starts_with("pipe:"), "{err}");
        assert!(r.stdout.is_empty());

        let r = run(job(&cmd, b"", &log), &CancellationToken::new(), None).await;
        let err = String::from_utf8_lossy(&r.stderr_or_reason).into_owned();
        assert!(err.lines().all(|l| l.starts_with("pipe:")), "{err}");
        assert_eq!(r.stdout, b"out\n");
    }

    #[tokio::test]
    async fn bodies_larger_than_the_pipe() {
        let log = ctx();
        // 3 MiB: part is written before the worker starts, the rest while it runs.
        let body: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let cmd = argv(&["/bin/cat"]);
        let mut j = job(&cmd, &body, &log);
        j.capture_stdout = 4 << 20;
        let r = run(j, &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::Exit(0));
        assert!(r.stdout == body, "stdout differs from the body");

        // A worker that never reads a large stdin still ends the job at once.
        let cmd = argv(&["/bin/true"]);
        let r = run(job(&cmd, &body, &log), &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::Exit(0));
        assert!(r.elapsed < Duration::from_secs(2));

        // Exactly PIPE_BUF, and empty.
        let cmd = argv(&["/bin/cat"]);
        for size in [4096, 4097, 0] {
            let r = run(
                job(&cmd, &body[..size], &log),
                &CancellationToken::new(),
                None,
            )
            .await;
            assert_eq!(r.stdout, &body[..size]);
        }
    }

    #[tokio::test]
    async fn spawn_failure() {
        let log = ctx();
        let cmd = argv(&["/nonexistent/worker"]);
        let r = run(job(&cmd, b"x", &log), &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::SpawnFailed);
        assert!(String::from_utf8_lossy(&r.stderr_or_reason).contains("/nonexistent/worker"));
    }

    #[tokio::test]
    async fn timeout_kills_group_including_grandchild() {
        let log = ctx();
        let cmd = argv(&["/bin/sh", "-c", "sleep 1000 & echo $!; wait"]);
        let mut j = job(&cmd, b"", &log);
        j.timeout = Duration::from_millis(300);
        let r = run(j, &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::Timeout);
        let grandchild: i32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
        assert!(!running(grandchild), "grandchild survived");
    }

    /// A worker that closes its output and runs on is reaped at its exit,
    /// with its status, not when its output ends.
    #[tokio::test]
    async fn a_worker_that_closes_its_output_is_waited_for() {
        let log = ctx();
        let cmd = argv(&["/bin/sh", "-c", "exec >&- 2>&-; sleep 0.3; exit 3"]);
        let r = run(job(&cmd, b"", &log), &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::Exit(3));
        assert!(r.elapsed >= Duration::from_millis(300), "{:?}", r.elapsed);
    }

    /// A worker whose output stays open after its exit (a process it
    /// started holds it, outside its group) still ends its job at once,
    /// not at the job's timeout.
    #[tokio::test]
    async fn an_exit_with_output_held_elsewhere_ends_the_job() {
        let log = ctx();
        let cmd = argv(&["/bin/sh", "-c", "setsid sleep 2 & echo $!; exit 4"]);
        let mut j = job(&cmd, b"", &log);
        j.timeout = Duration::from_secs(30);
        let r = run(j, &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::Exit(4));
        let outside: i32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
        // SAFETY: a signal to the process the test started.
        unsafe { nix::libc::kill(outside, nix::libc::SIGKILL) };
        // The exit is seen within WATCH_EXIT_AFTER; the rest is the pipe
        // drain, which ends at PIPE_DRAIN_LIMIT.
        assert!(
            r.elapsed < PIPE_DRAIN_LIMIT + Duration::from_millis(900),
            "{:?}",
            r.elapsed
        );
    }

    #[tokio::test]
    async fn background_child_holding_stdout_does_not_hang() {
        let log = ctx();
        let cmd = argv(&["/bin/sh", "-c", "sleep 1000 & echo $!; exit 0"]);
        let r = run(job(&cmd, b"", &log), &CancellationToken::new(), None).await;
        assert_eq!(r.outcome, Outcome::Exit(0));
        assert!(r.elapsed < Duration::from_secs(3));
        let grandchild: i32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
        assert!(!running(grandchild), "background child survived");
    }

    #[test]
    fn sinks_are_bounded() {
        let mut t = Sink::tail(4);
        t.push(b"abcdef");
        t.push(b"gh");
        assert_eq!(t.into_bytes(), b"efgh");
        let mut c = Sink::capture(3);
        c.push(b"ab");
        c.push(b"cd");
        assert!(c.truncated);
        assert_eq!(c.into_bytes(), b"abc");
    }
}
