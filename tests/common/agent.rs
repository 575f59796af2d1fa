//! Running the example binaries (the agent, the `flows` client) from root
//! integration tests: locating (and if need be building) them, a running
//! process with its output line by line, failed runs, and a loopback
//! "pod" world for policy tests (a private cgroup with a db listening in
//! it, and a config file).
//!
//! Tests that use it hold [`setup`]'s lock for their whole run: entering a
//! cgroup moves the whole test process, and a child spawned meanwhile
//! would be born in it.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use meshpath::cgroup::ScopedCgroup;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// ---------------------------------------------------------------------------
// Finding (and if need be building) the example binaries.

/// `target/<profile>/examples/agent` (built from `examples/agent/`).
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_bin("agent", &["examples/agent"]))
}

/// `target/<profile>/examples/flows` (built from `examples/flows.rs`,
/// which shares `examples/agent/flowfmt.rs`).
pub fn flows_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_bin("flows", &["examples/flows.rs", "examples/agent"]))
}

/// `target/<profile>/examples/NAME`, found from this test executable
/// (`target/<profile>/deps/<test>-<hash>`).
///
/// `cargo test` builds examples, but `cargo test --test agent` does not:
/// when the binary is missing or older than one of its `sources` (files,
/// or directories whose files count) or than this test executable (the
/// library changed), it is built with cargo first.
fn example_bin(name: &str, sources: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("locating the test executable");
    let deps = exe.parent().expect("test executable has a directory");
    let profile_dir = deps.parent().expect("deps/ has a parent");
    let bin = profile_dir.join("examples").join(name);
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match mtime(&bin) {
        None => true,
        Some(built) => {
            let newer = |p: &Path| mtime(p).is_some_and(|t: SystemTime| t > built);
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            newer(&exe)
                || sources.iter().any(|s| {
                    let p = root.join(s);
                    if p.is_dir() {
                        fs::read_dir(&p)
                            .map(|d| d.flatten().any(|e| newer(&e.path())))
                            .unwrap_or(true)
                    } else {
                        newer(&p)
                    }
                })
        }
    };
    if stale {
        build_example(name, profile_dir);
    }
    assert!(
        bin.is_file(),
        "the {name} binary {} is missing: build it with `cargo build --example {name}` \
         (same profile as the tests)",
        bin.display()
    );
    bin
}

fn build_example(name: &str, profile_dir: &Path) {
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("cargo"));
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--quiet")
        .arg("--example")
        .arg(name)
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.arg("--profile").arg(other);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running cargo to build the {name} example: {e}"));
    assert!(
        out.status.success(),
        "`cargo build --example {name}` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The serial lock, root, a private cgroup.

pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// `ScopedCgroup::enter` moves the whole test process, and a child spawned
/// meanwhile would be born in that cgroup: every test holds this lock.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the serial lock and checks for root. Not being root is a failure:
/// these tests must never pass without having run.
pub fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let euid = nix::unistd::geteuid();
    assert!(
        euid.is_root(),
        "the agent tests load eBPF programs and create cgroups: run them as root \
         (effective uid is {euid}), e.g. `sudo -E cargo test --test agent`"
    );
    guard
}

pub fn scoped_cgroup() -> ScopedCgroup {
    ScopedCgroup::new("meshpath-agent-test").expect("creating a private cgroup")
}

// ---------------------------------------------------------------------------
// Running the agent.

/// A running agent. Dropping it kills the process (SIGKILL) if it is still
/// running, so a failed test never leaves an agent behind.
///
/// It runs any example binary (`Agent::spawn_with(flows_bin(), ...)` runs
/// a `flows` client): stdout and stderr are read line by line.
pub struct Agent {
    pub child: Child,
    pub stdout: Receiver<String>,
    /// stderr line by line, as it comes (also kept whole in `stderr`).
    pub stderr_lines: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
    /// The stdout lines consumed so far.
    pub seen: Vec<String>,
}

impl Agent {
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Agent {
        Agent::spawn_with(agent_bin(), args, |_| {})
    }

    pub fn spawn_with<S: AsRef<std::ffi::OsStr>>(
        bin: &Path,
        args: &[S],
        tweak: impl FnOnce(&mut Command),
    ) -> Agent {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        tweak(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut err = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        // stdout is read unless `tweak` sent it elsewhere (a pipe the test
        // reads, or not, itself).
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let (etx, erx) = mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let mut reader = BufReader::new(&mut err);
            loop {
                let mut raw = Vec::new();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&raw);
                        all.push_str(&line);
                        let _ = etx.send(line.trim_end_matches('\n').to_string());
                    }
                }
            }
            all
        });
        Agent {
            child,
            stdout: rx,
            stderr_lines: erx,
            stderr: Some(stderr),
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }

    /// Waits for the stdout line containing `ready`.
    pub fn wait_ready(&mut self) -> String {
        let ready_timeout = super::scaled(READY_TIMEOUT);
        let deadline = Instant::now() + ready_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains("ready") {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    let stderr = self.stderr_text();
                    panic!(
                        "the agent printed no `ready` line within {ready_timeout:?}; stdout so far: \
                         {:?}; stderr: {:?}",
                        self.seen, stderr
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    let stderr = self.stderr_text();
                    panic!(
                        "the agent closed stdout without a `ready` line (exit: {status:?}); \
                         stdout: {:?}; stderr: {:?}",
                        self.seen, stderr
                    );
                }
            }
        }
    }

    /// Waits for a stdout line starting with `prefix`.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + super::scaled(timeout);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no stdout line starting with {prefix:?} within {timeout:?} ({e}); \
                     stdout so far: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits for the next stderr line that is not a warning.
    pub fn wait_stderr_line(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.starts_with("agent: warning:") => continue,
                Ok(line) => return line,
                Err(e) => panic!(
                    "no stderr line within {timeout:?} ({e}); stdout so far: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("sending {sig} to the agent: {e}"));
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + super::scaled(timeout);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.stderr_text();
                panic!(
                    "the agent did not exit within {timeout:?}; stdout: {:?}; stderr: {:?}",
                    self.seen, stderr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// All of stderr (call after the process exited).
    pub fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The rest of stdout plus what was seen (call after the process exited).
    pub fn stdout_lines(&mut self) -> Vec<String> {
        while let Ok(line) = self.stdout.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a run that is expected to fail left behind.
pub struct Failed {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Failed {
    /// Asserts exit status 1 and exactly one non-empty stderr line besides
    /// `agent: warning:` lines (what the load-time probe found about this
    /// kernel, e.g. FIONREAD before 6.12), and returns that line.
    pub fn one_line_error(&self) -> &str {
        assert_eq!(
            self.status.code(),
            Some(1),
            "expected exit status 1, got {}; stderr: {:?}",
            self.status,
            self.stderr
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.starts_with("agent: warning: "))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "stderr must be exactly one line besides warnings, got {}: {:?}",
            lines.len(),
            self.stderr
        );
        assert!(!lines[0].trim().is_empty(), "the error line is empty");
        assert!(
            self.stderr.ends_with('\n'),
            "the error line is not newline-terminated: {:?}",
            self.stderr
        );
        assert!(
            !self.stdout.iter().any(|l| l.contains("ready")),
            "a failed agent claimed to be ready: {:?}",
            self.stdout
        );
        lines[0]
    }
}

/// Runs the agent expecting it to fail: it must exit (within 20 s)
/// without ever printing `ready`; a `ready` line is a failure of the test.
pub fn run_refused<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Failed {
    let mut agent = Agent::spawn(args);
    let deadline = Instant::now() + super::scaled(Duration::from_secs(20));
    loop {
        while let Ok(line) = agent.stdout.try_recv() {
            if line.contains("ready") {
                let _ = agent.child.kill();
                let _ = agent.child.wait();
                panic!(
                    "the agent started (`{line}`) where it had to be refused; stderr: {:?}",
                    agent.stderr_text()
                );
            }
            agent.seen.push(line);
        }
        if let Some(status) = agent.child.try_wait().expect("waiting for the agent") {
            return Failed {
                status,
                stdout: agent.stdout_lines(),
                stderr: agent.stderr_text(),
            };
        }
        assert!(
            Instant::now() < deadline,
            "the agent neither exited nor got ready within 20 s (scaled); stdout: {:?}",
            agent.seen
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the agent to completion (it is expected to fail quickly).
pub fn run_failing<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Failed {
    run_failing_with(agent_bin(), args, |_| {})
}

pub fn run_failing_with<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
    tweak: impl FnOnce(&mut Command),
) -> Failed {
    let mut agent = Agent::spawn_with(bin, args, tweak);
    let status = agent.wait_exit(Duration::from_secs(30));
    Failed {
        status,
        stdout: agent.stdout_lines(),
        stderr: agent.stderr_text(),
    }
}

// ---------------------------------------------------------------------------
// The metrics endpoint.

/// The address in a ready line's `; metrics on http://ADDR/metrics`.
pub fn metrics_addr(ready: &str) -> SocketAddr {
    ready
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in the ready line: {ready}"))
}

/// `GET /metrics` within `timeout` (connect to last byte); the body of a
/// 200 response, or an error saying what went wrong.
pub fn try_scrape(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete response within {timeout:?} ({} bytes so far)",
                out.len()
            ));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("reading the response: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no response head: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("not 200: {head:?}"));
    }
    Ok(body.to_string())
}

/// `GET /metrics` (5 s, scaled); panics unless it answers 200.
pub fn scrape(addr: SocketAddr) -> String {
    try_scrape(addr, super::scaled(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"))
}

/// The value of the sample `series` (name and labels exactly as written,
/// e.g. `meshpath_x_total{reason="deadline"}`) in a scrape.
pub fn sample(body: &str, series: &str) -> Option<u64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------------
// Observing the short-circuit from outside the library.

/// Bytes this socket received through TCP (`tcpi_bytes_received`).
/// Short-circuited data is delivered socket-to-socket and never counted
/// here, so it tells the two paths apart without the agent's counters.
pub fn tcp_bytes_received(s: &TcpStream) -> u64 {
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for getsockopt's out parameters.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info.tcpi_bytes_received
}

/// A connected pair on loopback: (client, accepted server socket).
pub fn pair_on(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().expect("listener address"))
        .expect("connecting on loopback");
    let (server, _) = listener.accept().expect("accepting");
    for s in [&client, &server] {
        s.set_nodelay(true).expect("TCP_NODELAY");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
    }
    (client, server)
}

pub fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    pair_on(&listener)
}

/// A pair whose three sockets (listener, client, accepted) belong to `cg`.
pub fn pair_in(cg: &ScopedCgroup) -> (TcpStream, TcpStream) {
    let _inside = cg.enter().expect("entering the private cgroup");
    pair()
}

/// Sends `len` patterned bytes from `tx` to `rx` (writer on its own
/// thread, so no buffer size can deadlock it) and checks them byte-exact.
pub fn send_checked(tx: &mut TcpStream, rx: &mut TcpStream, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut got = vec![0u8; len];
    std::thread::scope(|s| {
        let writer = s.spawn(|| tx.write_all(&data));
        rx.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("receiving {len} bytes: {e}"));
        writer
            .join()
            .expect("writer thread")
            .unwrap_or_else(|e| panic!("sending {len} bytes: {e}"));
    });
    assert!(got == data, "{len} bytes arrived corrupted");
}

/// Exchanges bytes both ways, byte-exact; returns the TCP-received byte
/// counts of (client, server).
pub fn exchange(client: &mut TcpStream, server: &mut TcpStream) -> (u64, u64) {
    send_checked(client, server, 64 * 1024, 1);
    send_checked(server, client, 1000, 2);
    send_checked(client, server, 10, 3);
    (tcp_bytes_received(client), tcp_bytes_received(server))
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("meshpath-agent-test-{}-{n}", std::process::id()));
        fs::create_dir(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub const FE: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
pub const DB: &str = "spiffe://mesh.local/ns/db/sa/postgres";

/// Default deny; frontend -> db:`port` over TCP gets `action`.
pub fn policy_config(port: u16, action: &str) -> serde_json::Value {
    serde_json::json!({
        "default_action": "deny",
        "endpoints": [
            {"ip": "127.0.0.2", "identity": FE},
            {"ip": "127.0.0.3", "identity": DB}
        ],
        "policies": [
            {"from": FE, "to": DB, "protocol": "tcp", "ports": [port], "action": action}
        ]
    })
}

/// Writes `text` to `path` atomically (a reader never sees half a file).
pub fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// A TCP connection from `src` (bound, port 0) to `dst`.
pub fn connect_from(src: &str, dst: SocketAddr) -> io::Result<TcpStream> {
    let s = super::connect_tcp(super::bound_tcp(src)?, dst)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

pub fn is_eperm(r: &io::Result<TcpStream>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

pub fn describe(r: &io::Result<TcpStream>) -> String {
    match r {
        Ok(s) => format!("connected ({:?})", s.local_addr()),
        Err(e) => format!("{e}"),
    }
}

/// A policy test's world: a private cgroup with the db listening in it,
/// and a config file.
pub struct PolicyWorld {
    pub cg: ScopedCgroup,
    pub db: TcpListener,
    pub db_addr: SocketAddr,
    pub dir: TempDir,
    pub config: PathBuf,
}

impl PolicyWorld {
    pub fn new() -> PolicyWorld {
        let cg = scoped_cgroup();
        let db = {
            let _inside = cg.enter().expect("entering the private cgroup");
            TcpListener::bind("127.0.0.3:0").expect("binding 127.0.0.3:0")
        };
        db.set_nonblocking(true).expect("non-blocking listener");
        let db_addr = db.local_addr().expect("db address");
        let dir = TempDir::new();
        let config = dir.0.join("policy.json");
        PolicyWorld {
            cg,
            db,
            db_addr,
            dir,
            config,
        }
    }

    pub fn write(&self, config: &serde_json::Value) {
        write_config(&self.config, &config.to_string());
    }

    /// Starts the agent on the cgroup (with `--config` when `with_config`)
    /// and waits for `ready`.
    pub fn agent(&self, with_config: bool, extra: &[&str]) -> Agent {
        let mut args = vec![
            "--cgroup".to_string(),
            self.cg.path().to_string_lossy().into_owned(),
        ];
        if with_config {
            args.push("--config".into());
            args.push(self.config.to_string_lossy().into_owned());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Agent::spawn(&args);
        agent.wait_ready();
        agent
    }

    /// A connection from `src` to the db, made inside the cgroup.
    pub fn connect(&self, src: &str) -> io::Result<TcpStream> {
        let _inside = self.cg.enter().expect("entering the private cgroup");
        connect_from(src, self.db_addr)
    }

    /// The db's side of the next connection.
    pub fn accept(&self) -> TcpStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.db.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).expect("blocking socket");
                    s.set_nodelay(true).expect("TCP_NODELAY");
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("read timeout");
                    return s;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accepting on the db listener: {e}"),
            }
        }
    }

    /// frontend -> db is allowed: connects, and bytes go both ways
    /// byte-exact. Returns the pair.
    pub fn assert_allowed(&self, src: &str, when: &str) -> (TcpStream, TcpStream) {
        let r = self.connect(src);
        let mut c = r.unwrap_or_else(|e| panic!("{when}: {src} -> db should connect: {e}"));
        let mut s = self.accept();
        exchange(&mut c, &mut s);
        (c, s)
    }

    pub fn assert_denied(&self, src: &str, when: &str) {
        let r = self.connect(src);
        assert!(
            is_eperm(&r),
            "{when}: {src} -> db should get EPERM, got: {}",
            describe(&r)
        );
    }
}

/// Stops the agent with SIGTERM, expects exit 0; returns (stdout, stderr).
pub fn stop(mut agent: Agent) -> (Vec<String>, String) {
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(EXIT_TIMEOUT);
    let stderr = agent.stderr_text();
    assert_eq!(status.code(), Some(0), "{status}; stderr: {stderr:?}");
    (agent.stdout_lines(), stderr)
}

// ---------------------------------------------------------------------------
// Agents in network namespaces.

impl Agent {
    /// Starts the agent inside the network namespace `/run/netns/NETNS`.
    ///
    /// Only the network namespace changes (a `setns` before exec): unlike
    /// `ip netns exec`, which remounts /sys and so hides the cgroup2 and
    /// bpffs mounts from the agent.
    pub fn spawn_in_netns<S: AsRef<std::ffi::OsStr>>(netns: &str, args: &[S]) -> Agent {
        use std::os::unix::process::CommandExt;
        let ns = fs::File::open(format!("/run/netns/{netns}"))
            .unwrap_or_else(|e| panic!("opening network namespace {netns}: {e}"));
        Agent::spawn_with(agent_bin(), args, move |cmd| {
            // SAFETY: between fork and exec only setns(2) runs, which is
            // async-signal-safe; `ns` is owned by the closure, which the
            // Command keeps until after the spawn.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }
}
