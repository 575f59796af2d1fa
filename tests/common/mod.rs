//! Shared harness for the root integration tests.
//!
//! Every test gets its own datapath and its own cgroup, named after the
//! test, removed on drop even when the test panics. Tests that need root
//! fail loudly without it: they never pass silently.
//!
//! Moving a process into a cgroup moves all its threads, and sockets
//! belong to the cgroup of the thread that created them; so tests that
//! create sockets inside their cgroup hold a process-wide lock for their
//! whole run (`Env` does it). Under cargo-nextest each test is its own
//! process and the lock is uncontended.

#![allow(dead_code)]

pub mod agent;
pub mod packets;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshpath::cgroup::ScopedCgroup;
use meshpath::{AttachOptions, CgroupAttachment, Counters, Datapath, DatapathOptions};

static SERIAL: Mutex<()> = Mutex::new(());

/// Panics unless running as root: root tests must run, never skip.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (CAP_BPF, CAP_NET_ADMIN, cgroup v2): run the suite as root, \
             as CI does; it is not skipped"
        );
    }
}

/// How much slower than this project's development VM the machine may be:
/// `MESHPATH_TEST_TIME_SCALE` (default 1; scripts/kernels-guest.sh sets it
/// for guests under software emulation, tens of times slower). Scales how
/// long tests *wait* for something (an agent's ready line, its exit), never
/// what they assert about how fast the datapath is.
pub fn time_scale() -> u32 {
    std::env::var("MESHPATH_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// `d` times [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts
        .next()
        .and_then(|p| p.parse().ok())
        .expect("kernel major");
    let minor = parts
        .next()
        .and_then(|p| p.parse().ok())
        .expect("kernel minor");
    (major, minor)
}

/// Whether the running kernel is `major.minor` or newer: tests assert the
/// degraded behaviour of older kernels with it, they never skip.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    kernel_version() >= (major, minor)
}

/// One test's world: a datapath, a private cgroup and the attachment.
pub struct Env {
    // Drop order: detach, then the cgroup, then the datapath, then the lock.
    pub attachment: Option<CgroupAttachment>,
    pub cgroup: ScopedCgroup,
    pub dp: Datapath,
    pub _serial: MutexGuard<'static, ()>,
}

impl Env {
    /// Loads a datapath with default options and attaches it to a fresh
    /// cgroup named after `test`.
    pub fn new(test: &str) -> Env {
        Env::with(test, DatapathOptions::default(), AttachOptions::default())
    }

    pub fn with(test: &str, opts: DatapathOptions, attach: AttachOptions) -> Env {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dp = Datapath::load(&opts).expect("loading the datapath");
        let cgroup = ScopedCgroup::new(&sanitize(test)).expect("creating the test cgroup");
        let attachment = Some(
            dp.attach_cgroup_with(cgroup.path(), &attach)
                .expect("attaching to the test cgroup"),
        );
        Env {
            attachment,
            cgroup,
            dp,
            _serial: serial,
        }
    }

    /// (Re)attaches the datapath to the test cgroup with `opts` (the
    /// previous attachment, if any, is dropped first).
    pub fn attach_with(&mut self, opts: &AttachOptions) {
        self.attachment = None;
        self.attachment = Some(
            self.dp
                .attach_cgroup_with(self.cgroup.path(), opts)
                .expect("attaching to the test cgroup"),
        );
    }

    /// Runs `f` with the process inside the test cgroup: sockets it
    /// creates are the cgroup's for life.
    pub fn inside<T>(&self, f: impl FnOnce() -> T) -> T {
        let _in = self.cgroup.enter().expect("entering the test cgroup");
        f()
    }

    pub fn counters(&self) -> Counters {
        self.dp.counters().expect("reading counters")
    }

    /// A connected TCP pair (client, accepted server) on `bind`, created
    /// inside the cgroup.
    pub fn pair(&self, bind: &str) -> (TcpStream, TcpStream) {
        self.inside(|| tcp_pair(bind))
    }

    /// Waits until the short-circuit holds no sockets (closed sockets
    /// leave the SOCKHASH at once, the index at TCP_CLOSE), with no help
    /// from user space.
    pub fn wait_empty(&self, within: Duration) {
        self.wait_empty_inner(within, false)
    }

    /// Like `wait_empty`, sweeping stale entries as an agent does
    /// periodically: sockets that close after their cgroup was detached
    /// get no TCP_CLOSE callback.
    pub fn sweep_and_wait_empty(&self, within: Duration) {
        self.wait_empty_inner(within, true)
    }

    /// Like `wait_empty`, once sockets that the enroll iterator took over
    /// and enrolled have closed. From Linux 6.12 the iterator turns on
    /// their close callback and they leave by themselves; older kernels
    /// refuse it (`EnrollReport::no_close_callback`), so their index
    /// entries outlive them until a sweep: asserted here, then swept.
    pub fn wait_empty_after_takeover(&self, within: Duration) {
        if kernel_at_least(6, 12) {
            return self.wait_empty(within);
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !self.dp.sockets().unwrap().is_empty(),
            "before 6.12 the entries of sockets taken over outlive them until a sweep"
        );
        self.sweep_and_wait_empty(within)
    }

    fn wait_empty_inner(&self, within: Duration, sweep: bool) {
        let deadline = Instant::now() + within;
        loop {
            if sweep {
                self.dp.sweep_stale().unwrap();
            }
            let socks = self.dp.sockhash_len().unwrap();
            let index = self.dp.sockets().unwrap().len();
            if socks == 0 && index == 0 {
                return;
            }
            if Instant::now() > deadline {
                panic!("stale entries: {socks} in the SOCKHASH, {index} in the index");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sanitize(test: &str) -> String {
    let s: String = test
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("mp-test-{}", &s[..s.len().min(40)])
}

/// A connected TCP pair on `bind` (e.g. "127.0.0.2:0", "[::1]:0").
pub fn tcp_pair(bind: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(bind).expect("bind");
    tcp_pair_on(&l, l.local_addr().unwrap())
}

/// Connects to `to` and accepts on `l`.
pub fn tcp_pair_on(l: &TcpListener, to: SocketAddr) -> (TcpStream, TcpStream) {
    let c = TcpStream::connect(to).expect("connect");
    let (s, _) = l.accept().expect("accept");
    for x in [&c, &s] {
        x.set_nodelay(true).unwrap();
        x.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        x.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    (c, s)
}

/// A deterministic, position-dependent byte pattern: a reordered,
/// duplicated or dropped chunk changes what the reader sees.
pub fn pattern(seed: u64, off: usize, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let x = (off + i) as u64;
        *b = (x.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(seed) >> 29) as u8;
    }
}

/// FNV-1a over a stream, for byte-exact checks of large transfers.
#[derive(Clone, Copy)]
pub struct Hash(pub u64);

impl Hash {
    pub fn new() -> Hash {
        Hash(0xcbf2_9ce4_8422_2325)
    }
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Writes `total` bytes of `pattern(seed)` in `chunk`-sized writes;
/// returns the hash of what was written.
pub fn write_pattern(s: &mut impl Write, seed: u64, total: usize, chunk: usize) -> u64 {
    let mut buf = vec![0u8; chunk.max(1)];
    let mut h = Hash::new();
    let mut off = 0;
    while off < total {
        let n = chunk.min(total - off);
        pattern(seed, off, &mut buf[..n]);
        s.write_all(&buf[..n]).expect("write");
        h.update(&buf[..n]);
        off += n;
    }
    h.0
}

/// Reads exactly `total` bytes, checking them against `pattern(seed)`;
/// returns their hash.
pub fn read_pattern(s: &mut impl Read, seed: u64, total: usize) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut h = Hash::new();
    let mut off = 0;
    while off < total {
        let cap = buf.len().min(total - off);
        let n = s.read(&mut buf[..cap]).expect("read");
        assert!(n > 0, "EOF after {off} of {total} bytes");
        pattern(seed, off, &mut want[..n]);
        if buf[..n] != want[..n] {
            let i = (0..n).find(|&i| buf[i] != want[i]).unwrap();
            panic!(
                "byte {} of {total} differs: reordered, duplicated or lost data",
                off + i
            );
        }
        h.update(&buf[..n]);
        off += n;
    }
    h.0
}

/// Echo round trips: writes `size` bytes, reads them back, `rounds` times.
pub fn echo_rounds(client: &mut TcpStream, size: usize, rounds: usize) {
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    for r in 0..rounds {
        pattern(r as u64, 0, &mut out);
        client.write_all(&out).unwrap();
        client.read_exact(&mut back).unwrap();
        assert_eq!(out, back, "round {r}: echo differs");
    }
}

/// Serves echo on `s` until EOF, in a thread.
pub fn echo_server(mut s: TcpStream) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => {
                    s.write_all(&buf[..n]).unwrap();
                    total += n as u64;
                }
                Err(e) => panic!("echo server: {e}"),
            }
        }
    })
}

/// A network namespace made with iproute2, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(test: &str) -> Netns {
        require_root();
        let name = format!("{}-{}", sanitize(test), std::process::id());
        let name = name[name.len().saturating_sub(60)..].to_string();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Runs `f` on a thread that has joined the namespace: sockets it
    /// creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// Sets a per-namespace sysctl, e.g. ("net.ipv4.tcp_fastopen", "3").
    pub fn sysctl(&self, key: &str, value: &str) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ],
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(st.success(), "{cmd} {args:?} failed: {st}");
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit (for many sockets).
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// A TCP socket bound to `src` (any port), not connected yet: a connection
/// whose source address (and so identity) the test chooses. Its family
/// follows `src`.
pub fn bound_tcp(src: &str) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let src = SocketAddr::new(src.parse().expect("a source address"), 0);
    let family = if src.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(src))?;
    Ok(TcpStream::from(fd))
}

/// Connects a socket of [`bound_tcp`] to `dst`.
pub fn connect_tcp(s: TcpStream, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    nix::sys::socket::connect(s.as_raw_fd(), &nix::sys::socket::SockaddrStorage::from(dst))?;
    Ok(s)
}

/// A pin directory on bpffs for one test (`/sys/fs/bpf/meshpath-test-
/// <name>-<pid>`), cleared of leftovers at creation; on drop its pins are
/// removed (links detached first) and then the directory.
pub struct PinDir(pub std::path::PathBuf);

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        let p = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/meshpath-test-{name}-{}",
            std::process::id()
        ));
        let _ = meshpath::bpffs::remove_pins(&p);
        PinDir(p)
    }

    /// The directory as a command-line argument.
    pub fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }

    /// The names in the directory, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A pinned map of the datapath, opened from its pin.
    pub fn map(&self, name: &str) -> libbpf_rs::MapHandle {
        libbpf_rs::MapHandle::from_pinned_path(self.0.join(name))
            .unwrap_or_else(|e| panic!("opening the pinned {name}: {e}"))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = meshpath::bpffs::remove_pins(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}
