//! Orphan reaping for a supervisor that runs as PID 1 (a container without
//! an init): processes that a worker left behind are re-parented to it, and
//! would stay zombies for ever. Only then does this module do anything: it
//! reaps, on SIGCHLD and every second, the zombie children that are not
//! workers (tokio reaps those, and waits for their status). Spawning a worker
//! holds the same lock as a sweep, so that a worker that exits at once is
//! never taken for an orphan.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

static ACTIVE: AtomicBool = AtomicBool::new(false);
static WORKERS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn workers() -> MutexGuard<'static, BTreeSet<i32>> {
    WORKERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts reaping orphans if this process is PID 1.
pub fn start() {
    if std::process::id() != 1 {
        return;
    }
    ACTIVE.store(true, Ordering::SeqCst);
    tracing::info!("running as PID 1: reaping the orphans that workers leave behind");
    tokio::spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut chld = signal(SignalKind::child()).ok();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            match chld.as_mut() {
                Some(s) => {
                    tokio::select! {
                        _ = s.recv() => {}
                        _ = tick.tick() => {}
                    }
                }
                None => {
                    tick.tick().await;
                }
            }
            sweep();
        }
    });
}

/// Held while a worker is spawned: see [`Spawning::started`].
pub struct Spawning(Option<MutexGuard<'static, BTreeSet<i32>>>);

/// Call before spawning a worker; then [`Spawning::started`] with its pid.
pub fn spawning() -> Spawning {
    Spawning(ACTIVE.load(Ordering::Relaxed).then(workers))
}

impl Spawning {
    /// The worker `pid` started; it is not an orphan until [`Worker`] drops.
    pub fn started(mut self, pid: Option<u32>) -> Worker {
        match (self.0.as_mut(), pid) {
            (Some(set), Some(pid)) => {
                set.insert(pid as i32);
                Worker(Some(pid as i32))
            }
            _ => Worker(None),
        }
    }
}

/// A worker known to the reaper; dropped once tokio has its status.
pub struct Worker(Option<i32>);

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            workers().remove(&pid);
        }
    }
}

/// Reaps the zombie children that are not workers.
fn sweep() {
    let workers = workers();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == 1 || workers.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let (state, ppid) = (rest.next(), rest.next());
        if state == Some("Z") && ppid == Some("1") {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}
