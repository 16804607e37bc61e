//! Starting a worker with a vfork-style `clone` directly, and waiting for it
//! through a pidfd on the runtime, for the workers that need no hook between
//! fork and exec (no `user`, limits or `nice`) and whose command is a path.
//!
//! `std::process::Command` copies every environment variable twice into
//! maps and once more into C strings on each spawn: about five allocations
//! per variable, most of a job's allocations. Here a queue's environment is
//! turned into C strings once ([`BaseEnv`]), and a job adds only its own
//! variables, in one buffer. What the child gets is what `Command` gives it:
//! its own process group, an empty signal mask, `SIGPIPE` back to its
//! default action (the supervisor ignores it), the other signals as the
//! supervisor has them (handled ones at their default, ignored ones still
//! ignored), stdin, stdout and stderr from the given descriptors, and the
//! working directory.
//!
//! glibc's `posix_spawn` does the same in its child, but sets the action of
//! nearly every signal there, handled or not, about 125 system calls while
//! the supervisor's thread waits, and checks the descriptor limit six
//! times. The child here only asks for each action and sets the handled
//! ones (about 70 calls, a few of them sets), and `CLONE_PIDFD` hands over the
//! worker's pidfd with its pid, so that a worker is never started without
//! one. Unlike `posix_spawn`, it leaves glibc's two internal signals (32
//! and 33) as the supervisor has them rather than ignored, as fork and exec
//! would.

use nix::libc;
use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A queue's worker environment, as pairs and as `KEY=VALUE` C strings.
#[derive(Debug)]
pub struct BaseEnv {
    pairs: Vec<(OsString, OsString)>,
    /// Each with the length of its name. None when a name or value holds a
    /// NUL byte (`Command` then reports the error).
    entries: Option<Vec<(CString, usize)>>,
}

impl BaseEnv {
    /// A name given twice keeps its last value, as with `Command`.
    pub fn new(mut pairs: Vec<(OsString, OsString)>) -> BaseEnv {
        let mut i = 0;
        while i < pairs.len() {
            if pairs[i + 1..].iter().any(|(k, _)| *k == pairs[i].0) {
                pairs.remove(i);
            } else {
                i += 1;
            }
        }
        let entries = pairs
            .iter()
            .map(|(k, v)| {
                let mut e = Vec::with_capacity(k.len() + v.len() + 1);
                e.extend_from_slice(k.as_bytes());
                e.push(b'=');
                e.extend_from_slice(v.as_bytes());
                CString::new(e).ok().map(|e| (e, k.len()))
            })
            .collect();
        BaseEnv { pairs, entries }
    }

    pub fn pairs(&self) -> &[(OsString, OsString)] {
        &self.pairs
    }
}

impl Default for BaseEnv {
    /// No variables.
    fn default() -> BaseEnv {
        BaseEnv::new(Vec::new())
    }
}

/// A worker started by [`spawn`]: waited for through its pidfd, killed and
/// reaped when dropped before its exit was collected.
pub struct Child {
    pid: libc::pid_t,
    /// The pidfd registered with the runtime, only once [`Child::wait`]
    /// first waits: a worker reaped by [`Child::try_wait`] once its output
    /// has ended (the usual end of a job) never is, which spares two
    /// `epoll_ctl` calls and a wake-up of the runtime per job. Declared
    /// before `pidfd`, so dropped before the descriptor closes.
    watched: Option<AsyncFd<RawFd>>,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// The worker's exit status if it has exited (and reaps it), without
    /// waiting; again after the exit gives the same status.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        loop {
            let mut raw = 0;
            // SAFETY: waitpid on our own child, not yet reaped.
            let r = unsafe { libc::waitpid(self.pid, &mut raw, libc::WNOHANG) };
            match r {
                0 => return Ok(None),
                -1 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                _ => {
                    let s = ExitStatus::from_raw(raw);
                    self.status = Some(s);
                    return Ok(Some(s));
                }
            }
        }
    }

    /// Waits for the worker's exit and reaps it; cancel-safe, and again
    /// after the exit gives the same status.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            let watched = match &mut self.watched {
                Some(w) => w,
                // SAFETY: `pidfd` stays open while the AsyncFd lives: it is
                // dropped first (field order).
                None => self.watched.insert(unsafe {
                    AsyncFd::register_with_interest(self.pidfd.as_raw_fd(), Interest::READABLE)
                        .map_err(io::Error::from)?
                }),
            };
            watched.readable().await?.clear_ready();
        }
    }
}

impl Drop for Child {
    /// Kills and reaps a worker whose exit was not collected (its job was
    /// dropped: a panic, the runtime shutting down), through its pidfd, so
    /// that a pid the PID-1 reaper took and the kernel gave to another
    /// process is never signalled or waited for.
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let fd = self.pidfd.as_raw_fd();
        // SAFETY: pidfd_send_signal and waitid on a pidfd we own; the
        // siginfo is written by the kernel only.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
            let mut info: libc::siginfo_t = std::mem::zeroed();
            if libc::waitid(
                libc::P_PIDFD,
                fd as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            ) == 0
                && info.si_pid() == 0
            {
                // Not dead yet: reaped off the runtime once it is, if a
                // thread can be had (else it stays a zombie until exit).
                if let Ok(dup) = self.pidfd.try_clone() {
                    let _ = std::thread::Builder::new().spawn(move || reap(&dup));
                }
            }
        }
    }
}

/// Whether [`spawn`] can start this worker: a command that is a path (no
/// search of `PATH`), standard descriptors that are not 0, 1 or 2, and a
/// kernel (or seccomp policy) that gives pidfds.
pub fn usable(program: &str, fds: [RawFd; 3]) -> bool {
    program.contains('/') && fds.iter().all(|&fd| fd > 2) && pidfds()
}

/// Whether this kernel (and seccomp policy) gives pidfds from `clone` and
/// waits on them: tried once on this process, with a child that exits at
/// once.
fn pidfds() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let works = clone_works();
        if !works {
            tracing::debug!("no pidfds here: workers are started through std's Command");
        }
        works
    })
}

/// Starts a child that exits at once, as [`spawn`] starts workers, checks
/// that its pidfd can be watched with epoll (as the runtime watches it),
/// and reaps it through the pidfd, as [`Child`]'s drop does.
fn clone_works() -> bool {
    extern "C" fn exit_now(_: *mut libc::c_void) -> libc::c_int {
        // SAFETY: ends the child without touching the parent's memory.
        unsafe { libc::_exit(0) }
    }
    // SAFETY: the child only exits.
    match unsafe { clone_vfork(exit_now, std::ptr::null_mut()) } {
        Ok((_, pidfd)) => {
            let pollable = epoll_takes(&pidfd);
            reap(&pidfd) && pollable
        }
        Err(_) => false,
    }
}

/// Whether an epoll instance accepts `fd` (a pidfd, on kernels from 5.3).
fn epoll_takes(fd: &OwnedFd) -> bool {
    // SAFETY: a new epoll descriptor, owned here and closed on return.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return false;
    }
    // SAFETY: as above.
    let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: both descriptors are open; the kernel reads `event`.
    unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            &mut event,
        ) == 0
    }
}

/// Waits for the child of `pidfd` to exit, and reaps it: whether that
/// worked. A pidfd from `clone` blocks, so `waitid` waits.
fn reap(pidfd: &OwnedFd) -> bool {
    loop {
        // SAFETY: waitid on a pidfd we own; the kernel writes `info`.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        if r == 0 {
            return true;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Starts `argv` with the queue's environment plus `vars` (which win over
/// the queue's on a shared name), `fds` as its stdin, stdout and stderr, in
/// `dir`, as the leader of a new process group. The caller closes its copies
/// of `fds` afterwards.
pub fn spawn<K: AsRef<str>, V: AsRef<str>>(
    argv: &[String],
    base: &BaseEnv,
    vars: &[(K, V)],
    dir: Option<&Path>,
    fds: [RawFd; 3],
) -> io::Result<Child> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte found in provided data",
        )
    };
    let Some(base_entries) = &base.entries else {
        return Err(invalid());
    };
    let args: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| invalid()))
        .collect::<io::Result<_>>()?;
    let mut argp: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());

    // The job's variables, each `KEY=VALUE\0`, in one buffer.
    let mut own = Vec::with_capacity(
        vars.iter()
            .map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2)
            .sum(),
    );
    let mut ends = Vec::with_capacity(vars.len());
    for (k, v) in vars {
        let (k, v) = (k.as_ref(), v.as_ref());
        if k.contains('\0') || v.contains('\0') {
            return Err(invalid());
        }
        own.extend_from_slice(k.as_bytes());
        own.push(b'=');
        own.extend_from_slice(v.as_bytes());
        own.push(0);
        ends.push(own.len());
    }
    let mut envp: Vec<*const libc::c_char> =
        Vec::with_capacity(vars.len() + base_entries.len() + 1);
    let mut start = 0;
    for end in ends {
        envp.push(own[start..end].as_ptr().cast());
        start = end;
    }
    for (e, name_len) in base_entries {
        let name = &e.as_bytes()[..*name_len];
        if !vars.iter().any(|(k, _)| k.as_ref().as_bytes() == name) {
            envp.push(e.as_ptr());
        }
    }
    envp.push(std::ptr::null());

    let dir = dir
        .map(|d| CString::new(d.as_os_str().as_bytes()).map_err(|_| invalid()))
        .transpose()?;
    // SAFETY: every pointer handed to the child points into `args`, `own`,
    // `base_entries` or `dir`, which outlive the call.
    let (pid, pidfd) = unsafe { clone_exec(&args[0], &argp, &envp, dir.as_deref(), fds)? };
    Ok(Child {
        pid,
        watched: None,
        pidfd,
        status: None,
    })
}

/// What the child of [`clone_exec`] reads, and where it leaves the error
/// that stopped it before `execve`.
struct ChildPlan<'a> {
    program: &'a CStr,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    dir: Option<&'a CStr>,
    fds: [RawFd; 3],
    /// The real-time signals (glibc keeps the few below them for itself).
    rt: std::ops::RangeInclusive<libc::c_int>,
    /// An `errno`, written by the child; 0 when it reached `execve`.
    err: libc::c_int,
}

/// The child's stack: the children here call a few libc functions only.
const CHILD_STACK: usize = 32 * 1024;

/// Runs `f(arg)` as a `CLONE_VM | CLONE_VFORK` child, which shares the
/// supervisor's memory until it execs or exits (this thread waits until
/// then), and returns its pid and pidfd (`CLONE_PIDFD`).
///
/// # Safety
/// `f` may only make async-signal-safe calls, must not allocate, panic or
/// use more than [`CHILD_STACK`] bytes of stack, and must exec or `_exit`;
/// `arg` must stay valid until it has.
unsafe fn clone_vfork(
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> io::Result<(libc::pid_t, OwnedFd)> {
    let mut stack = Box::<[u8]>::new_uninit_slice(CHILD_STACK);
    let mut pidfd: libc::c_int = -1;
    // SAFETY: the child runs on its own stack, which outlives it (this
    // thread waits for its exec or exit). With every signal blocked around
    // the clone, no handler of the supervisor runs in the child unless the
    // child unblocks signals itself.
    unsafe {
        let top = stack.as_mut_ptr().add(stack.len()).cast::<libc::c_void>();
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            f,
            top.map_addr(|a| a & !15),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            arg,
            &raw mut pidfd,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::pid_t>(),
        );
        let clone_err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(clone_err);
        }
        if pidfd < 0 {
            // A kernel before 5.2 ignores CLONE_PIDFD.
            libc::waitpid(pid, &mut 0, 0);
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        Ok((pid, OwnedFd::from_raw_fd(pidfd)))
    }
}

/// Starts the worker through [`clone_vfork`] and [`child`], and returns its
/// pid and pidfd.
///
/// # Safety
/// `argv` and `envp` are NULL-terminated arrays of pointers to C strings
/// that live through the call.
unsafe fn clone_exec(
    program: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    dir: Option<&CStr>,
    fds: [RawFd; 3],
) -> io::Result<(libc::pid_t, OwnedFd)> {
    let mut plan = ChildPlan {
        program,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        dir,
        fds,
        rt: libc::SIGRTMIN()..=libc::SIGRTMAX(),
        err: 0,
    };
    // SAFETY: `child` keeps to clone_vfork's rules; `plan` and what it
    // points to live through the call.
    unsafe {
        let (pid, pidfd) = clone_vfork(child, (&raw mut plan).cast())?;
        let err = std::ptr::read_volatile(&raw const plan.err);
        if err != 0 {
            // The child has exited without exec'ing: reap it.
            libc::waitpid(pid, &mut 0, 0);
            return Err(io::Error::from_raw_os_error(err));
        }
        Ok((pid, pidfd))
    }
}

/// The child of [`clone_exec`], until `execve`: only async-signal-safe
/// libc calls, no allocation, nothing that can panic.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildPlan`, alive while this runs.
    unsafe {
        let plan = &mut *arg.cast::<ChildPlan>();
        // Handled signals go back to their default before any is unblocked;
        // ignored ones stay ignored, except SIGPIPE. glibc's own signals,
        // between the standard and the real-time ones, are left as they are:
        // glibc sends them only to the supervisor's threads.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in (1..32).chain(plan.rt.clone()) {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            if sig != libc::SIGPIPE {
                let mut now: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut now) != 0
                    || now.sa_sigaction == libc::SIG_DFL
                    || now.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
            }
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        let ok = libc::setpgid(0, 0) == 0
            && libc::dup2(plan.fds[0], 0) == 0
            && libc::dup2(plan.fds[1], 1) == 1
            && libc::dup2(plan.fds[2], 2) == 2
            && plan.dir.is_none_or(|d| libc::chdir(d.as_ptr()) == 0);
        if ok {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::execve(plan.program.as_ptr(), plan.argv, plan.envp);
        }
        let err = *libc::__errno_location();
        std::ptr::write_volatile(&raw mut plan.err, if err == 0 { libc::ECHILD } else { err });
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The raw descriptors of the three child ends.
    fn raw(fds: [&OwnedFd; 3]) -> [RawFd; 3] {
        fds.map(|f| f.as_raw_fd())
    }

    const NONE: &[(&str, &str)] = &[];

    fn base(pairs: &[(&str, &str)]) -> BaseEnv {
        BaseEnv::new(
            pairs
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
        )
    }

    fn dev_null() -> OwnedFd {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap()
            .into()
    }

    /// Runs `sh -c script` with the environment, and returns its stdout.
    async fn output(
        script: &str,
        env: &BaseEnv,
        vars: &[(&str, &str)],
        dir: Option<&Path>,
    ) -> (String, ExitStatus) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let null = dev_null();
        let argv = ["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let mut child = spawn(&argv, env, vars, dir, raw([&null, &w, &null])).unwrap();
        drop(w);
        let status = child.wait().await.unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        (out, status)
    }

    #[tokio::test]
    async fn the_job_s_variables_win_over_the_queue_s() {
        let env = base(&[
            ("PATH", "/usr/bin:/bin"),
            ("A", "queue"),
            ("B", "first"),
            ("B", "queue"),
        ]);
        let (out, status) = output(
            "echo \"$A $B $C\"; pwd",
            &env,
            &[("A", "job"), ("C", "job")],
            Some(Path::new("/tmp")),
        )
        .await;
        assert!(status.success());
        assert_eq!(out, "job queue job\n/tmp\n");
    }

    #[tokio::test]
    async fn the_worker_leads_its_own_group_with_sigpipe_at_its_default() {
        let env = base(&[]);
        // Field 5 of /proc/self/stat is the process group; SigIgn is the
        // mask of ignored signals (SIGPIPE is bit 13).
        let (out, status) = output(
            "cut -d' ' -f5 /proc/$$/stat; echo $$; grep SigIgn /proc/$$/status; exit 3",
            &env,
            NONE,
            None,
        )
        .await;
        assert_eq!(status.code(), Some(3));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], lines[1], "group id = pid: {out}");
        let ignored = u64::from_str_radix(lines[2].split_whitespace().nth(1).unwrap(), 16).unwrap();
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    }

    #[tokio::test]
    async fn the_worker_keeps_ignored_signals_and_gets_an_empty_mask() {
        // SAFETY: SIGUSR2 ignored by this test process (nothing else here
        // uses it), SIGUSR1 blocked on this test's thread only.
        unsafe {
            libc::signal(libc::SIGUSR2, libc::SIG_IGN);
            let mut usr1: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut usr1);
            libc::sigaddset(&mut usr1, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &usr1, std::ptr::null_mut());
        }
        let (out, status) = output(
            "exec grep -E '^Sig(Ign|Blk)' /proc/self/status",
            &base(&[]),
            NONE,
            None,
        )
        .await;
        assert!(status.success(), "{out}");
        let mask = |name: &str| {
            let line = out.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_ne!(mask("SigIgn") & (1 << (libc::SIGUSR2 - 1)), 0, "{out}");
        assert_eq!(mask("SigBlk"), 0, "{out}");
    }

    #[tokio::test]
    async fn a_missing_program_or_directory_is_an_error() {
        let null = dev_null();
        let fds = raw([&null, &null, &null]);
        let fails = |program: &str, dir: Option<&str>, vars: &[(&str, &str)]| {
            spawn(&[program.into()], &base(&[]), vars, dir.map(Path::new), fds)
                .err()
                .map(|e| e.kind())
        };
        assert_eq!(
            fails("/nonexistent/worker", None, NONE),
            Some(io::ErrorKind::NotFound)
        );
        assert_eq!(
            fails("/bin/true", Some("/nonexistent"), NONE),
            Some(io::ErrorKind::NotFound)
        );
        assert_eq!(
            fails("/bin/true", None, &[("A", "x\0y")]),
            Some(io::ErrorKind::InvalidInput)
        );
    }

    #[tokio::test]
    async fn a_child_dropped_unreaped_is_killed_and_reaped() {
        let null = dev_null();
        let child = spawn(
            &["/bin/sleep".into(), "30".into()],
            &base(&[]),
            NONE,
            None,
            raw([&null, &null, &null]),
        )
        .unwrap();
        let pid = child.id() as i32;
        drop(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // Gone from the process table once reaped.
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(std::time::Instant::now() < deadline, "{pid} still there");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
