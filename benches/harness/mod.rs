//! Shared harness for `benches/loopback.rs` and `examples/summary.rs`:
//! the same four paths measured the same way, in one process.
//!
//! Paths:
//! - `tcp`: plain loopback TCP (sockets created outside the cgroup);
//! - `sc`: loopback TCP short-circuited by meshpath (listener and
//!   connecting socket created inside an attached cgroup);
//! - `unix`: a unix socketpair;
//! - `sidecar`: client -> proxy A -> proxy B -> server over loopback TCP,
//!   the proxies written with tokio, each on its own background thread;
//! - `haproxy` (only when `haproxy` is installed): the same chain through
//!   two haproxy processes in TCP mode.
//!
//! Every TCP socket has TCP_NODELAY and lives on 127.0.0.0/8.
//!
//! Entering a cgroup moves the whole process (every thread), and a socket
//! belongs for life to the cgroup its creator was in. So sockets of the
//! `sc` path are created by the main thread inside a short `enter()`
//! window while no other thread creates sockets: the proxies only create
//! sockets when a sidecar connection is set up, and every sidecar setup
//! waits until the whole chain exists (the server end is accepted) before
//! returning.

#![allow(dead_code)]

pub mod frame;
pub mod interrupt;
pub mod proxy;
pub mod rtt;
pub mod setup;
pub mod stream;
pub mod sys;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meshpath::cgroup::ScopedCgroup;
use meshpath::{AttachOptions, CgroupAttachment, Counters, Datapath, DatapathOptions};

/// One way of moving bytes between two sockets of this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathKind {
    /// Plain loopback TCP.
    Tcp,
    /// Loopback TCP with the meshpath short-circuit.
    Sc,
    /// A unix socketpair.
    Unix,
    /// Two tokio TCP proxies between client and server.
    Sidecar,
    /// Two haproxy processes (TCP mode) between client and server.
    Haproxy,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Tcp => "tcp",
            PathKind::Sc => "sc",
            PathKind::Unix => "unix",
            PathKind::Sidecar => "sidecar",
            PathKind::Haproxy => "haproxy",
        }
    }
}

/// How the two ends of a request/response connection wait for data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Blocking reads, client and server pinned to the same CPU.
    BlockOneCore,
    /// Blocking reads, client and server on two CPUs.
    BlockTwoCores,
    /// A tokio current_thread runtime (epoll) per side, on two CPUs.
    Tokio,
    /// Both sides spin on recv(MSG_DONTWAIT), on two CPUs.
    BusyPoll,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::BlockOneCore,
        Mode::BlockTwoCores,
        Mode::Tokio,
        Mode::BusyPoll,
    ];

    /// Short name, used in criterion ids and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::BlockOneCore => "block-1core",
            Mode::BlockTwoCores => "block-2cores",
            Mode::Tokio => "tokio-2cores",
            Mode::BusyPoll => "busypoll-2cores",
        }
    }

    /// Description for tables.
    pub fn label(self) -> &'static str {
        match self {
            Mode::BlockOneCore => "blocking, one core",
            Mode::BlockTwoCores => "blocking, two cores",
            Mode::Tokio => "tokio (epoll), two cores",
            Mode::BusyPoll => "busy-poll, two cores",
        }
    }
}

/// The message and write sizes measured.
pub const SIZES: [usize; 4] = [64, 4 << 10, 64 << 10, 1 << 20];

/// "64 B", "4 KiB", "64 KiB", "1 MiB".
pub fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// Prints a bench's error and exits 1 (its `main`).
pub fn exit_on_error(r: Result<()>) {
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Criterion as the short benches (events, policy) use it: 10 samples,
/// 0.3 s warm-up, 1 s of measurement, filters from the command line.
pub fn short_criterion() -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args()
}

/// Whether a bench's closing summary runs: no criterion filter was given,
/// or one that mentions "summary".
pub fn summary_requested() -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    filters.is_empty() || filters.iter().any(|f| f.contains("summary"))
}

/// Fails with a clear message unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "{what} needs root: it loads eBPF programs (CAP_BPF, CAP_NET_ADMIN), creates a \
             cgroup v2 directory and moves itself into it. Run it as root, e.g. \
             `sudo -E cargo bench --bench loopback` or `sudo -E cargo run --release --example summary`"
        );
    }
    Ok(())
}

/// A connected stream socket of either family.
#[derive(Debug)]
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down: wakes a peer or a thread blocked on it.
    pub fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Write),
            Sock::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }

    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Sock::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// Accepts one connection on `l`, giving up after `within`.
pub fn accept_within(l: &TcpListener, within: Duration) -> Result<TcpStream> {
    l.set_nonblocking(true).context("listener O_NONBLOCK")?;
    let deadline = Instant::now() + within;
    let r = loop {
        match l.accept() {
            Ok((s, _)) => break Ok(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    break Err(anyhow::anyhow!(
                        "no connection arrived on {:?} within {within:?}",
                        l.local_addr().ok()
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => break Err(e).context("accept"),
        }
    };
    l.set_nonblocking(false)
        .context("listener O_NONBLOCK off")?;
    let s = r?;
    s.set_nonblocking(false)
        .context("accepted socket blocking")?;
    Ok(s)
}

/// Everything the measurements share: the datapath attached to a private
/// cgroup, the listeners, and the proxies. Fields drop in order:
/// proxies and haproxy first, then listeners, detach, cgroup, datapath.
pub struct World {
    pub sidecar: proxy::ProxyPair,
    pub haproxy: Option<proxy::Haproxy>,
    /// Why there is no haproxy path (when there is none).
    pub haproxy_note: String,
    tcp_listener: TcpListener,
    sc_listener: TcpListener,
    sidecar_server: TcpListener,
    /// The `sc` cgroup's attachment: every program, as
    /// `Datapath::attach_cgroup` attaches them by default.
    pub attachment: CgroupAttachment,
    pub cgroup: ScopedCgroup,
    /// A second cgroup with the short-circuit only (no policy programs),
    /// for the connection setup comparison.
    pub sc_only_attachment: CgroupAttachment,
    pub sc_only_cgroup: ScopedCgroup,
    pub dp: Datapath,
    /// The two CPUs used: client side on `cpus.0`, server/reader on `cpus.1`.
    pub cpus: (usize, usize),
    /// Every CPU the process could run on when it started.
    pub all_cpus: Vec<usize>,
}

/// How long to wait for a connection through the proxies.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

impl World {
    /// Loads the datapath, attaches it to a fresh cgroup and starts the
    /// proxies (and haproxy when installed). Needs root and two CPUs.
    pub fn new() -> Result<World> {
        require_root("this benchmark")?;
        interrupt::install()?;
        let all_cpus = sys::allowed_cpus()?;
        let cpus = sys::two_cpus()?;
        let dp =
            Datapath::load(&DatapathOptions::default()).context("loading the meshpath datapath")?;
        let home = meshpath::cgroup::current_cgroup().context("finding this process's cgroup")?;
        let cgroup =
            ScopedCgroup::new("meshpath-bench").context("creating the benchmark cgroup")?;
        interrupt::register_cgroup(home.clone(), cgroup.path().to_path_buf());
        let attachment = dp
            .attach_cgroup(cgroup.path())
            .with_context(|| format!("attaching to {}", cgroup.path().display()))?;
        let sc_only_cgroup = ScopedCgroup::new("meshpath-bench-sconly")
            .context("creating the short-circuit-only cgroup")?;
        interrupt::register_cgroup(home, sc_only_cgroup.path().to_path_buf());
        let sc_only_attachment = dp
            .attach_cgroup_with(
                sc_only_cgroup.path(),
                &AttachOptions::default().policy(false),
            )
            .with_context(|| format!("attaching to {}", sc_only_cgroup.path().display()))?;

        let tcp_listener = TcpListener::bind("127.0.0.2:0").context("bind 127.0.0.2")?;
        let sc_listener = {
            let _in = cgroup.enter().context("entering the benchmark cgroup")?;
            TcpListener::bind("127.0.0.3:0").context("bind 127.0.0.3")?
        };
        let sidecar_server = TcpListener::bind("127.0.0.4:0").context("bind 127.0.0.4")?;
        let sidecar = proxy::ProxyPair::start(
            "127.0.0.5:0".parse()?,
            "127.0.0.6:0".parse()?,
            sidecar_server.local_addr()?,
        )
        .context("starting the tokio proxies")?;
        let (haproxy, haproxy_note) = match proxy::Haproxy::find() {
            None => (
                None,
                "haproxy: not installed (`which haproxy` found nothing), haproxy path not measured"
                    .to_string(),
            ),
            Some(bin) => {
                let h = proxy::Haproxy::start(&bin).context("starting haproxy")?;
                let note = format!("haproxy: {} ({})", bin.display(), h.version);
                (Some(h), note)
            }
        };
        Ok(World {
            sidecar,
            haproxy,
            haproxy_note,
            tcp_listener,
            sc_listener,
            sidecar_server,
            attachment,
            cgroup,
            sc_only_attachment,
            sc_only_cgroup,
            dp,
            cpus,
            all_cpus,
        })
    }

    /// Where the proxies (tokio and haproxy) may run: `Some(cpu)` pins
    /// them to one CPU (for the one-core mode, where everything shares a
    /// CPU), `None` lets them run on every CPU this process may use.
    pub fn place_proxies(&self, cpu: Option<usize>) -> Result<()> {
        let cpus = match cpu {
            Some(c) => vec![c],
            None => self.all_cpus.clone(),
        };
        self.sidecar.set_affinity(&cpus)?;
        if let Some(h) = &self.haproxy {
            h.set_affinity(&cpus)?;
        }
        Ok(())
    }

    /// Where the proxies run in `mode`: on the client's CPU in the
    /// one-core mode, anywhere otherwise.
    pub fn place_proxies_for(&self, mode: Mode) -> Result<()> {
        match mode {
            Mode::BlockOneCore => self.place_proxies(Some(self.cpus.0)),
            _ => self.place_proxies(None),
        }
    }

    /// The paths measured, in table order.
    pub fn paths(&self) -> Vec<PathKind> {
        let mut v = vec![
            PathKind::Tcp,
            PathKind::Sc,
            PathKind::Unix,
            PathKind::Sidecar,
        ];
        if self.haproxy.is_some() {
            v.push(PathKind::Haproxy);
        }
        v
    }

    pub fn counters(&self) -> Result<Counters> {
        self.dp.counters().context("reading the datapath counters")
    }

    /// A connected (client, server) pair over `path`, both ends blocking,
    /// TCP_NODELAY on every TCP socket.
    pub fn pair(&self, path: PathKind) -> Result<(Sock, Sock)> {
        let tcp = |c: TcpStream, s: TcpStream| -> Result<(Sock, Sock)> {
            c.set_nodelay(true).context("TCP_NODELAY")?;
            s.set_nodelay(true).context("TCP_NODELAY")?;
            Ok((Sock::Tcp(c), Sock::Tcp(s)))
        };
        match path {
            PathKind::Tcp => {
                let c =
                    TcpStream::connect(self.tcp_listener.local_addr()?).context("connect (tcp)")?;
                let s = accept_within(&self.tcp_listener, CONNECT_WAIT)?;
                tcp(c, s)
            }
            PathKind::Sc => {
                let before = self.counters()?;
                let (c, s) = {
                    let _in = self
                        .cgroup
                        .enter()
                        .context("entering the benchmark cgroup")?;
                    let c = TcpStream::connect(self.sc_listener.local_addr()?)
                        .context("connect (sc)")?;
                    let s = accept_within(&self.sc_listener, CONNECT_WAIT)?;
                    (c, s)
                };
                let d = self.counters()?.since(&before);
                if d.sockets_enrolled < 2 {
                    bail!("the short-circuit did not enroll both ends of a new connection: {d:?}");
                }
                tcp(c, s)
            }
            PathKind::Unix => {
                let (c, s) = UnixStream::pair().context("socketpair")?;
                Ok((Sock::Unix(c), Sock::Unix(s)))
            }
            PathKind::Sidecar => {
                let c = TcpStream::connect(self.sidecar.front).context("connect (proxy A)")?;
                let s = accept_within(&self.sidecar_server, CONNECT_WAIT)
                    .context("waiting for the connection through both proxies")?;
                tcp(c, s)
            }
            PathKind::Haproxy => {
                let h = self.haproxy.as_ref().context("haproxy is not running")?;
                let (c, s) = h.pair(CONNECT_WAIT)?;
                tcp(c, s)
            }
        }
    }
}

/// Median of `v` (mean of the middle two for even lengths); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// `paths` rotated left by `k`: for interleaving repetitions.
pub fn rotated<T: Copy>(paths: &[T], k: usize) -> Vec<T> {
    let n = paths.len();
    (0..n).map(|i| paths[(i + k) % n]).collect()
}
