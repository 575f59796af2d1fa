//! What the agent prints: status lines on stdout, warnings and errors on
//! stderr, each exactly one line, and the flow lines of `--flows`.
//!
//! Nothing here waits for a reader. Each stream has its own writer thread
//! fed through a bounded queue, so a supervisor or pipe that stops reading
//! never stalls the agent's control loop (reloads, revocations, shutdown)
//! or the flow pump: flow lines that do not fit ([`FLOW_QUEUE_BYTES`]) are
//! dropped and counted by the caller; the agent's own lines get a queue of
//! their own ([`LINE_QUEUE_BYTES`]), and beyond that are dropped too.
//! [`finish`] gives the writers a bounded time to empty their queues
//! before the process exits.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Flow lines queued for stdout at most (bytes); more are dropped.
pub(crate) const FLOW_QUEUE_BYTES: usize = 4 << 20;

/// The agent's own lines queued per stream at most (bytes).
pub(crate) const LINE_QUEUE_BYTES: usize = 1 << 20;

/// How long [`finish`] waits for a stream to be written out.
pub(crate) const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

/// One output stream and its writer thread.
struct Stream {
    state: Mutex<State>,
    /// Signalled when work is queued and when the queue empties.
    cv: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Chunk>,
    line_bytes: usize,
    flow_bytes: usize,
    /// The writer holds a chunk it has not finished writing.
    busy: bool,
    /// The first write error; nothing is written after it.
    failed: Option<(io::ErrorKind, String)>,
    started: bool,
}

struct Chunk {
    text: String,
    flow: bool,
}

#[derive(Clone, Copy)]
enum Fd {
    Stdout,
    Stderr,
}

fn stream(fd: Fd) -> &'static Arc<Stream> {
    static OUT: OnceLock<Arc<Stream>> = OnceLock::new();
    static ERR: OnceLock<Arc<Stream>> = OnceLock::new();
    let cell = match fd {
        Fd::Stdout => &OUT,
        Fd::Stderr => &ERR,
    };
    cell.get_or_init(|| {
        Arc::new(Stream {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        })
    })
}

impl Stream {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `text`; false when it did not fit (or the stream failed).
    fn push(self: &Arc<Self>, fd: Fd, text: String, flow: bool) -> Result<bool, io::Error> {
        let mut st = self.lock();
        if let Some((kind, msg)) = &st.failed {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        let (used, cap) = if flow {
            (st.flow_bytes, FLOW_QUEUE_BYTES)
        } else {
            (st.line_bytes, LINE_QUEUE_BYTES)
        };
        if used + text.len() > cap {
            return Ok(false);
        }
        if flow {
            st.flow_bytes += text.len();
        } else {
            st.line_bytes += text.len();
        }
        st.queue.push_back(Chunk { text, flow });
        if !st.started {
            st.started = true;
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(match fd {
                    Fd::Stdout => "stdout".into(),
                    Fd::Stderr => "stderr".into(),
                })
                .spawn(move || me.write_loop(fd));
            if let Err(e) = spawned {
                // No thread: write this once, synchronously, and give up.
                st.started = false;
                let chunk = st.queue.pop_back().map(|c| c.text).unwrap_or_default();
                drop(st);
                return write_to(fd, chunk.as_bytes()).map(|()| true).map_err(|_| e);
            }
        }
        drop(st);
        self.cv.notify_all();
        Ok(true)
    }

    fn write_loop(&self, fd: Fd) {
        let mut buf = String::new();
        loop {
            {
                let mut st = self.lock();
                st.busy = false;
                while st.queue.is_empty() {
                    self.cv.notify_all();
                    st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                // Coalesce what is queued into one write (up to 64 KiB).
                buf.clear();
                while let Some(c) = st.queue.front() {
                    if !buf.is_empty() && buf.len() + c.text.len() > 64 * 1024 {
                        break;
                    }
                    let c = st.queue.pop_front().expect("front exists");
                    if c.flow {
                        st.flow_bytes -= c.text.len();
                    } else {
                        st.line_bytes -= c.text.len();
                    }
                    buf.push_str(&c.text);
                }
                st.busy = true;
            }
            if let Err(e) = write_to(fd, buf.as_bytes()) {
                let mut st = self.lock();
                st.failed = Some((e.kind(), e.to_string()));
                st.queue.clear();
                st.flow_bytes = 0;
                st.line_bytes = 0;
                st.busy = false;
                drop(st);
                self.cv.notify_all();
                return;
            }
        }
    }

    /// Waits until everything queued is written, at most until `deadline`.
    fn drain(&self, deadline: Instant) {
        let mut st = self.lock();
        while st.started && st.failed.is_none() && (!st.queue.is_empty() || st.busy) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

fn write_to(fd: Fd, bytes: &[u8]) -> io::Result<()> {
    match fd {
        Fd::Stdout => {
            let mut out = io::stdout().lock();
            out.write_all(bytes)?;
            out.flush()
        }
        Fd::Stderr => {
            let mut err = io::stderr().lock();
            err.write_all(bytes)?;
            err.flush()
        }
    }
}

/// One line on stdout. Fails once stdout has failed (a closed pipe); a
/// line that finds the queue full is dropped.
pub(crate) fn say(line: &str) -> io::Result<()> {
    stream(Fd::Stdout)
        .push(Fd::Stdout, format!("{line}\n"), false)
        .map(|_| ())
}

/// What became of flow lines handed to [`flow_lines`].
pub(crate) enum Flowed {
    /// Queued for stdout.
    Queued,
    /// Dropped: stdout's reader is behind by [`FLOW_QUEUE_BYTES`].
    Dropped,
    /// Stdout failed (closed): nothing more will be printed.
    Failed(io::Error),
}

/// Queues flow lines (`text`, newline-terminated) for stdout.
pub(crate) fn flow_lines(text: String) -> Flowed {
    match stream(Fd::Stdout).push(Fd::Stdout, text, true) {
        Ok(true) => Flowed::Queued,
        Ok(false) => Flowed::Dropped,
        Err(e) => Flowed::Failed(e),
    }
}

pub(crate) fn warn(msg: &str) {
    let _ = stream(Fd::Stderr).push(
        Fd::Stderr,
        format!("agent: warning: {}\n", flatten(msg)),
        false,
    );
}

/// An `agent: error: ...` line on stderr.
pub(crate) fn error(msg: &str) {
    let _ = stream(Fd::Stderr).push(
        Fd::Stderr,
        format!("agent: error: {}\n", flatten(msg)),
        false,
    );
}

/// Gives stdout and stderr up to [`FINISH_TIMEOUT`] to be written out
/// (call before exiting; a reader that stopped is not waited for).
pub(crate) fn finish() {
    let deadline = Instant::now() + FINISH_TIMEOUT;
    stream(Fd::Stdout).drain(deadline);
    stream(Fd::Stderr).drain(deadline);
}

/// An error and its causes as one line: `outer: cause: root cause`,
/// skipping causes the outer messages already quote.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let msg = flatten(&cause.to_string());
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// Multi-line text (a verifier log, say) folded onto one line.
fn flatten(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}
