//! The log's way to stderr: each formatted line goes through a bounded
//! queue to a thread of its own, which writes it. A slow reader of stderr
//! (journald under back-pressure, a full pipe) then stalls that thread
//! only, never the runtime's threads that run the jobs. When the queue is
//! full, lines are dropped and counted, and the count is written with the
//! next line that gets through. [`flush`] waits, for a bounded time, until
//! the lines queued so far are written: before the process exits.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// How many lines may wait for the writer thread.
pub const QUEUE_LINES: usize = 4096;

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(SyncSender<()>),
}

struct Writer {
    tx: SyncSender<Msg>,
    dropped: &'static AtomicU64,
}

static WRITER: OnceLock<Option<Writer>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The writer thread, started on first use; None if it could not start
/// (lines are then written directly).
fn writer() -> Option<&'static Writer> {
    WRITER
        .get_or_init(|| {
            let (tx, rx) = sync_channel(QUEUE_LINES);
            std::thread::Builder::new()
                .name("amqp-exec-log".into())
                .spawn(move || write_lines(rx, &DROPPED))
                .ok()
                .map(|_| Writer {
                    tx,
                    dropped: &DROPPED,
                })
        })
        .as_ref()
}

fn write_lines(rx: Receiver<Msg>, dropped: &AtomicU64) {
    let mut err = std::io::stderr();
    for msg in rx {
        match msg {
            Msg::Line(line) => {
                let n = dropped.swap(0, Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        err,
                        "amqp-exec: {n} log line(s) dropped: stderr did not keep up"
                    );
                }
                // A failed write (stderr closed) loses the line.
                let _ = err.write_all(&line);
            }
            Msg::Flush(done) => {
                let _ = done.try_send(());
            }
        }
    }
}

/// Lines logged so far that the queue had no room for.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

fn send(line: Vec<u8>) {
    match writer() {
        Some(w) => match w.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                w.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(Msg::Line(line))) => {
                let _ = std::io::stderr().write_all(&line);
            }
            Err(TrySendError::Disconnected(_)) => {}
        },
        None => {
            let _ = std::io::stderr().write_all(&line);
        }
    }
}

/// Waits up to `limit` until the lines logged so far are written.
pub fn flush(limit: Duration) {
    let Some(w) = WRITER.get().and_then(Option::as_ref) else {
        return;
    };
    let deadline = Instant::now() + limit;
    let (done_tx, done_rx) = sync_channel(1);
    let mut msg = Msg::Flush(done_tx);
    loop {
        match w.tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
    let _ = done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// The `MakeWriter` of the log: each event is formatted into a [`Line`]
/// and queued whole when it is dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueuedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueuedStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

/// One formatted log event on its way to stderr.
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            send(std::mem::take(&mut self.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_queued_whole_and_flushed() {
        let mut line = QueuedStderr.make_writer_for_test();
        line.write_all(b"logwriter test: ").unwrap();
        line.write_all(b"one line\n").unwrap();
        drop(line);
        flush(Duration::from_secs(5));
        assert_eq!(dropped(), 0);
    }

    impl QueuedStderr {
        fn make_writer_for_test(&self) -> Line {
            tracing_subscriber::fmt::MakeWriter::make_writer(self)
        }
    }
}
