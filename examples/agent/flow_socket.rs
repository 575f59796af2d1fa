//! `--flow-socket PATH`: flow events for other programs, on a Unix stream
//! socket, as length-delimited protobuf `meshpath.flow.Flow` messages
//! (prost's `encode_length_delimited`: a varint length, then the
//! message), from the moment a client connects until it disconnects.
//!
//! Up to [`MAX_CLIENTS`] (64) clients at once; a client beyond that is
//! accepted and closed at once, and counted
//! (`meshpath_flow_socket_refused_total`; only the first refusal is a
//! warning line, so a flood of clients cannot flood the log). Each has its own
//! writer thread and a queue of [`QUEUE`] messages: the agent only ever
//! queues without waiting, so a client that reads slowly or not at all
//! never holds up the agent or the other clients. When its queue is full
//! the message is dropped for that client alone and counted (the
//! client's count is printed when it leaves; the total is the metric
//! `meshpath_flow_socket_dropped_total`).
//!
//! The socket file is created mode 0600 (flows tell who talks to whom), a
//! stale one left by a dead agent is replaced, a live one (another agent
//! serving there) is an error, and the file is removed on exit.

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::cli::DEFAULT_FLOW_SOCKET;
use crate::flows::FlowStats;
use crate::output::{say, warn};

/// Messages queued per client before they are dropped for it (about
/// 200 bytes each).
pub(crate) const QUEUE: usize = 4096;

/// Clients served at once; more are refused (connected, then closed).
pub(crate) const MAX_CLIENTS: usize = 64;

/// How often the threads look at the stop flag, and a writer with
/// nothing to send checks whether its client is still there.
const TICK: Duration = Duration::from_millis(200);

/// One encoded message, shared by every client's queue.
pub(crate) type Message = Arc<[u8]>;

/// The socket being served. Dropping it stops serving, disconnects every
/// client and removes the socket file.
pub(crate) struct FlowSocket {
    path: PathBuf,
    /// (device, inode) of the socket file we made: only that is removed.
    file_id: (u64, u64),
    hub: Arc<Hub>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    listener: Option<UnixListener>,
}

/// The connected clients.
pub(crate) struct Hub {
    clients: Mutex<HashMap<u64, Client>>,
    next_id: AtomicU64,
    closing: AtomicBool,
    stats: Arc<FlowStats>,
}

struct Client {
    queue: SyncSender<Message>,
    /// A second handle on the socket: shutting it down wakes the writer
    /// out of a blocked write.
    stream: UnixStream,
    dropped: Arc<AtomicU64>,
    /// Returns how many messages it wrote.
    writer: Option<JoinHandle<u64>>,
}

impl FlowSocket {
    /// Binds the socket (before anything is loaded, so that a bad path
    /// fails fast); clients are accepted once [`FlowSocket::start`] runs.
    pub(crate) fn bind(path: &Path, stats: Arc<FlowStats>) -> anyhow::Result<FlowSocket> {
        let ctx = || format!("--flow-socket {}", path.display());
        if path == Path::new(DEFAULT_FLOW_SOCKET) {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))
                    .with_context(ctx)?;
            }
        }
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                replace_stale(path).with_context(ctx)?;
                UnixListener::bind(path).with_context(ctx)?
            }
            Err(e) => return Err(e).with_context(ctx),
        };
        let meta = std::fs::metadata(path).with_context(ctx)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .context("making it mode 0600")
            .with_context(ctx)?;
        listener
            .set_nonblocking(true)
            .context("making the listener non-blocking")
            .with_context(ctx)?;
        Ok(FlowSocket {
            path: path.to_path_buf(),
            file_id: (meta.dev(), meta.ino()),
            hub: Arc::new(Hub {
                clients: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                closing: AtomicBool::new(false),
                stats,
            }),
            stop: Arc::new(AtomicBool::new(false)),
            acceptor: None,
            listener: Some(listener),
        })
    }

    /// Starts accepting clients.
    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let (hub, stop) = (self.hub.clone(), self.stop.clone());
        let handle = std::thread::Builder::new()
            .name("flow-socket".into())
            .spawn(move || accept_loop(&listener, &hub, &stop))
            .context("starting the flow socket thread")?;
        self.acceptor = Some(handle);
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Where the flow pump sends every event.
    pub(crate) fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }
}

impl Drop for FlowSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        self.hub.close();
        // Remove the file only if it is still ours.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn(&format!("removing {}: {e}", self.path.display()));
                }
            }
        }
    }
}

/// `path` is taken: a socket nobody serves any more is removed; a live
/// one, or anything that is not a socket, is an error.
fn replace_stale(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path).context("it is in use")?;
    if !meta.file_type().is_socket() {
        bail!("it exists and is not a socket");
    }
    match UnixStream::connect(path) {
        Ok(_) => bail!("another process is serving there (is another agent running?)"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).context("removing the stale socket")
        }
        Err(e) => Err(e).context("it exists and cannot be checked"),
    }
}

fn accept_loop(listener: &UnixListener, hub: &Arc<Hub>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(TICK.as_millis() as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn(&format!("flow socket: waiting for clients: {e}"));
                std::thread::sleep(TICK);
                continue;
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => hub.add(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: say so and wait a little.
                    warn(&format!("flow socket: accepting a client: {e}"));
                    std::thread::sleep(TICK);
                    break;
                }
            }
        }
    }
}

impl Hub {
    /// Queues `msg` for every client, without waiting: a client whose
    /// queue is full misses it (counted).
    pub(crate) fn broadcast(&self, msg: &Message) {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        for c in clients.values() {
            match c.queue.try_send(msg.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    self.stats.socket_dropped.fetch_add(1, Ordering::Relaxed);
                }
                // Its writer is gone; it removes itself.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    /// Whether anyone is listening (the pump skips encoding otherwise).
    pub(crate) fn has_clients(&self) -> bool {
        self.stats.socket_clients.load(Ordering::Relaxed) > 0
    }

    fn add(self: &Arc<Self>, stream: UnixStream) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients.len() >= MAX_CLIENTS || self.closing.load(Ordering::Acquire) {
            drop(clients);
            let before = self.stats.socket_refused.fetch_add(1, Ordering::Relaxed);
            if before == 0 {
                warn(&format!(
                    "flow socket: refusing a client: {MAX_CLIENTS} are connected already (this \
                     and later refusals are counted in meshpath_flow_socket_refused_total, not \
                     reported one by one)"
                ));
            }
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let setup = || -> io::Result<(UnixStream, UnixStream)> {
            stream.set_nonblocking(false)?;
            let second = stream.try_clone()?;
            Ok((stream, second))
        };
        let (stream, second) = match setup() {
            Ok(s) => s,
            Err(e) => {
                warn(&format!("flow socket: setting up client {id}: {e}"));
                return;
            }
        };
        let (tx, rx) = mpsc::sync_channel::<Message>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let hub = Arc::clone(self);
        let writer = std::thread::Builder::new()
            .name(format!("flow-client-{id}"))
            .spawn(move || {
                let sent = write_loop(&rx, stream);
                hub.remove(id, sent);
                sent
            });
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                warn(&format!(
                    "flow socket: starting a thread for client {id}: {e}"
                ));
                return;
            }
        };
        clients.insert(
            id,
            Client {
                queue: tx,
                stream: second,
                dropped,
                writer: Some(writer),
            },
        );
        let n = clients.len();
        self.stats.socket_clients.store(n as u64, Ordering::Relaxed);
        self.stats
            .socket_connections
            .fetch_add(1, Ordering::Relaxed);
        drop(clients);
        let _ = say(&format!(
            "agent: flow socket: client {id} connected ({n} connected)"
        ));
    }

    /// A writer ended (its client left or broke the connection).
    fn remove(&self, id: u64, sent: u64) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = clients.remove(&id) else {
            return; // closing: close() took it
        };
        let n = clients.len();
        self.stats.socket_clients.store(n as u64, Ordering::Relaxed);
        drop(clients);
        let _ = say(&format!(
            "agent: flow socket: client {id} disconnected after {sent} flows, {} dropped \
             ({n} connected)",
            c.dropped.load(Ordering::Relaxed)
        ));
        // Its writer is this thread: nothing to join.
    }

    /// Disconnects every client and waits for their writers.
    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let mut all: Vec<(u64, Client)> = {
            let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            clients.drain().collect()
        };
        all.sort_by_key(|(id, _)| *id);
        self.stats.socket_clients.store(0, Ordering::Relaxed);
        for (id, mut c) in all {
            // Wakes a writer blocked on a client that does not read.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            drop(c.queue);
            let sent = c.writer.take().and_then(|w| w.join().ok()).unwrap_or(0);
            let _ = say(&format!(
                "agent: flow socket: client {id} disconnected (exiting) after {sent} flows, {} \
                 dropped",
                c.dropped.load(Ordering::Relaxed)
            ));
        }
    }
}

/// Writes queued messages to the client until it goes away or the queue
/// is closed; returns how many were written.
fn write_loop(rx: &mpsc::Receiver<Message>, stream: UnixStream) -> u64 {
    let mut sent = 0u64;
    let mut out = BufWriter::with_capacity(64 * 1024, &stream);
    loop {
        let first = match rx.recv_timeout(TICK) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                if peer_gone(&stream) {
                    return sent;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return sent,
        };
        if out.write_all(&first).is_err() {
            return sent;
        }
        sent += 1;
        // Batch what is already queued into as few writes as possible.
        while let Ok(m) = rx.try_recv() {
            if out.write_all(&m).is_err() {
                return sent;
            }
            sent += 1;
        }
        if out.flush().is_err() {
            return sent;
        }
    }
}

/// Whether the client closed its end (it never sends anything; whatever
/// it does send is discarded).
fn peer_gone(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => false,
        Ok(_) => {
            let ev = fds[0].revents().unwrap_or(PollFlags::empty());
            if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return true;
            }
            let mut buf = [0u8; 512];
            matches!(
                nix::sys::socket::recv(
                    std::os::fd::AsRawFd::as_raw_fd(stream),
                    &mut buf,
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT
                ),
                Ok(0)
            )
        }
        Err(_) => false,
    }
}
