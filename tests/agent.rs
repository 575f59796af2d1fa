//! The agent's command-line contract (`examples/agent.rs`):
//!
//! * `agent --cgroup DIR` prints one line containing `ready`, short-circuits
//!   TCP of that cgroup while it runs, and exits 0 on SIGTERM or SIGINT;
//! * every error is exactly one line on stderr and exit status 1.
//!
//! These tests load eBPF programs and create cgroups: they must run as
//! root, and fail (never pass) otherwise. They never attach to the root
//! cgroup. Run: `cargo test --test agent -- --test-threads=1`.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use meshpath::cgroup::{self, ScopedCgroup};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// `ScopedCgroup::enter` moves the whole test process, and a child spawned
/// meanwhile would be born in that cgroup: every test holds this lock.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the serial lock and checks for root. Not being root is a failure:
/// these tests must never pass without having run.
fn setup() -> MutexGuard<'static, ()> {
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

fn scoped_cgroup() -> ScopedCgroup {
    ScopedCgroup::new("meshpath-agent-test").expect("creating a private cgroup")
}

// ---------------------------------------------------------------------------
// Finding (and if need be building) the agent binary.

/// `target/<profile>/examples/agent`, found from this test executable
/// (`target/<profile>/deps/agent-<hash>`).
///
/// `cargo test` builds examples, but `cargo test --test agent` does not:
/// when the binary is missing or older than its source or than this test
/// executable (the library changed), it is built with cargo first.
fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("locating the test executable");
        let deps = exe.parent().expect("test executable has a directory");
        let profile_dir = deps.parent().expect("deps/ has a parent");
        let bin = profile_dir.join("examples").join("agent");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agent.rs");
        let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        let stale = match mtime(&bin) {
            None => true,
            Some(built) => {
                let newer = |p: &Path| mtime(p).is_some_and(|t: SystemTime| t > built);
                newer(&exe) || newer(&source)
            }
        };
        if stale {
            build_agent(profile_dir);
        }
        assert!(
            bin.is_file(),
            "the agent binary {} is missing: build it with `cargo build --example agent` \
             (same profile as the tests)",
            bin.display()
        );
        bin
    })
}

fn build_agent(profile_dir: &Path) {
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
        .arg("agent")
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
    let out = cmd.output().expect("running cargo to build the agent");
    assert!(
        out.status.success(),
        "`cargo build --example agent` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Running the agent.

/// A running agent. Dropping it kills the process (SIGKILL) if it is still
/// running, so a failed test never leaves an agent behind.
struct Agent {
    child: Child,
    stdout: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
    seen: Vec<String>,
}

impl Agent {
    fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Agent {
        Agent::spawn_with(agent_bin(), args, |_| {})
    }

    fn spawn_with<S: AsRef<std::ffi::OsStr>>(
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
        let out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Agent {
            child,
            stdout: rx,
            stderr: Some(stderr),
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }

    /// Waits for the stdout line containing `ready`.
    fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + READY_TIMEOUT;
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
                        "the agent printed no `ready` line within {READY_TIMEOUT:?}; stdout so far: \
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
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
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

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("sending {sig} to the agent: {e}"));
    }

    /// Waits for the process to exit, at most `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
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
    fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The rest of stdout plus what was seen (call after the process exited).
    fn stdout_lines(&mut self) -> Vec<String> {
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
struct Failed {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Failed {
    /// Asserts exit status 1 and exactly one non-empty stderr line, and
    /// returns that line.
    fn one_line_error(&self) -> &str {
        assert_eq!(
            self.status.code(),
            Some(1),
            "expected exit status 1, got {}; stderr: {:?}",
            self.status,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "stderr must be exactly one line, got {}: {:?}",
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

/// Runs the agent to completion (it is expected to fail quickly).
fn run_failing<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Failed {
    run_failing_with(agent_bin(), args, |_| {})
}

fn run_failing_with<S: AsRef<std::ffi::OsStr>>(
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
// Observing the short-circuit from outside the library.

/// Bytes this socket received through TCP (`tcpi_bytes_received`).
/// Short-circuited data is delivered socket-to-socket and never counted
/// here, so it tells the two paths apart without the agent's counters.
fn tcp_bytes_received(s: &TcpStream) -> u64 {
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
fn pair_on(listener: &TcpListener) -> (TcpStream, TcpStream) {
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

fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    pair_on(&listener)
}

/// A pair whose three sockets (listener, client, accepted) belong to `cg`.
fn pair_in(cg: &ScopedCgroup) -> (TcpStream, TcpStream) {
    let _inside = cg.enter().expect("entering the private cgroup");
    pair()
}

/// Sends `len` patterned bytes from `tx` to `rx` (writer on its own
/// thread, so no buffer size can deadlock it) and checks them byte-exact.
fn send_checked(tx: &mut TcpStream, rx: &mut TcpStream, len: usize, seed: u8) {
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
fn exchange(client: &mut TcpStream, server: &mut TcpStream) -> (u64, u64) {
    send_checked(client, server, 64 * 1024, 1);
    send_checked(server, client, 1000, 2);
    send_checked(client, server, 10, 3);
    (tcp_bytes_received(client), tcp_bytes_received(server))
}

/// `bpftool cgroup show DIR`, when bpftool is installed.
fn bpftool_cgroup_show(dir: &Path) -> Option<String> {
    let out = Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------
// (a) ready, short-circuit, clean exit on a signal.

fn ready_short_circuit_then_exit_on(sig: Signal) {
    let _serial = setup();
    let cg = scoped_cgroup();
    let mut agent = Agent::spawn(&[Path::new("--cgroup"), cg.path()]);
    let ready = agent.wait_ready();
    assert!(ready.contains("ready"), "{ready}");

    if let Some(shown) = bpftool_cgroup_show(cg.path()) {
        assert!(
            shown.contains("sock_ops"),
            "bpftool lists no sock_ops program on {} while the agent runs:\n{shown}",
            cg.path().display()
        );
    } else {
        eprintln!("note: bpftool not available; not checking the attachment with it");
    }

    // Control: a connection outside the cgroup goes through TCP.
    let (mut c, mut s) = pair();
    let (c_tcp, s_tcp) = exchange(&mut c, &mut s);
    assert!(
        c_tcp > 0 && s_tcp > 0,
        "outside the cgroup TCP should carry the bytes (client {c_tcp}, server {s_tcp})"
    );

    // Inside the cgroup: the bytes arrive byte-exact and TCP carries none.
    let (mut c_in, mut s_in) = pair_in(&cg);
    let (c_tcp, s_tcp) = exchange(&mut c_in, &mut s_in);
    assert_eq!(
        (c_tcp, s_tcp),
        (0, 0),
        "inside the attached cgroup the bytes should bypass TCP (TCP-received: client \
         {c_tcp}, server {s_tcp})"
    );

    agent.signal(sig);
    let status = agent.wait_exit(EXIT_TIMEOUT);
    let stderr = agent.stderr_text();
    assert_eq!(
        status.code(),
        Some(0),
        "after {sig} the agent must exit 0, got {status}; stderr: {stderr:?}"
    );
    let lines = agent.stdout_lines();
    let readies = lines.iter().filter(|l| l.contains("ready")).count();
    assert_eq!(readies, 1, "exactly one `ready` line expected: {lines:?}");
    assert!(
        !stderr.contains("error"),
        "a clean shutdown printed an error: {stderr:?}"
    );

    // Detached: nothing left on the cgroup, new connections use TCP ...
    if let Some(shown) = bpftool_cgroup_show(cg.path()) {
        assert!(
            !shown.contains("meshpath"),
            "meshpath programs are still attached to {} after the agent exited:\n{shown}",
            cg.path().display()
        );
    }
    let (mut c2, mut s2) = pair_in(&cg);
    let (c_tcp, s_tcp) = exchange(&mut c2, &mut s2);
    assert!(
        c_tcp > 0 && s_tcp > 0,
        "after the agent exited, new connections in the cgroup should use TCP (client \
         {c_tcp}, server {s_tcp})"
    );
    // ... and a connection short-circuited while it ran still works.
    exchange(&mut c_in, &mut s_in);
}

#[test]
fn ready_short_circuits_and_sigterm_exits_zero() {
    ready_short_circuit_then_exit_on(Signal::SIGTERM);
}

#[test]
fn ready_short_circuits_and_sigint_exits_zero() {
    ready_short_circuit_then_exit_on(Signal::SIGINT);
}

// ---------------------------------------------------------------------------
// (b)-(f) errors: exit 1, one line.

#[test]
fn missing_cgroup_dir_is_one_line_naming_it() {
    let _serial = setup();
    let mount = cgroup::cgroup2_mount().expect("cgroup2 mounted");
    let missing = mount.join(format!(
        "meshpath-agent-test-missing-{}",
        std::process::id()
    ));
    assert!(!missing.exists());
    let run = run_failing(&[Path::new("--cgroup"), &missing]);
    let line = run.one_line_error();
    assert!(
        line.contains(&*missing.to_string_lossy()),
        "the error should name {}: {line}",
        missing.display()
    );
    assert!(line.contains("does not exist"), "{line}");
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
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

#[test]
fn non_cgroup2_dir_is_one_line() {
    let _serial = setup();
    let dir = TempDir::new();
    let run = run_failing(&[Path::new("--cgroup"), &dir.0]);
    let line = run.one_line_error();
    assert!(line.contains(&*dir.0.to_string_lossy()), "{line}");
    assert!(line.contains("cgroup v2"), "{line}");
}

#[test]
fn root_cgroup_is_refused_without_the_flag() {
    let _serial = setup();
    let root = cgroup::cgroup2_mount().expect("cgroup2 mounted");
    let run = run_failing(&[Path::new("--cgroup"), &root]);
    let line = run.one_line_error();
    assert!(line.contains(&*root.to_string_lossy()), "{line}");
    assert!(line.contains("root"), "{line}");
    assert!(line.contains("--allow-root-cgroup"), "{line}");
}

#[test]
fn unknown_flag_is_one_line() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let run = run_failing(&[
        Path::new("--cgroup"),
        cg.path(),
        Path::new("--no-such-flag"),
    ]);
    let line = run.one_line_error();
    assert!(line.contains("--no-such-flag"), "{line}");
}

#[test]
fn no_cgroup_is_one_line() {
    let _serial = setup();
    let run = run_failing::<&str>(&[]);
    let line = run.one_line_error();
    assert!(line.contains("--cgroup"), "{line}");
}

#[test]
fn not_root_is_one_line_mentioning_root() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let args = [Path::new("--cgroup"), cg.path()];
    // The binary may sit where uid 65534 cannot reach it (a target dir
    // under /root): then run a world-readable copy.
    let direct_ok = Command::new(agent_bin())
        .arg("--version")
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let copy = TempDir::new();
    let runnable = if direct_ok {
        agent_bin().to_path_buf()
    } else {
        let bin = copy.0.join("agent");
        fs::copy(agent_bin(), &bin).expect("copying the agent binary");
        fs::set_permissions(&copy.0, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod");
        bin
    };
    let run = run_failing_with(&runnable, &args, |cmd| {
        cmd.uid(65534).gid(65534);
    });
    let line = run.one_line_error();
    assert!(line.contains("root"), "{line}");
}

// ---------------------------------------------------------------------------
// (g) --bypass-port and --local-net.

#[test]
fn bypass_port_and_local_net_are_accepted_and_applied() {
    let _serial = setup();
    let cg = scoped_cgroup();
    // A listener in the cgroup whose port the agent will bypass.
    let bypassed = {
        let _inside = cg.enter().expect("entering the private cgroup");
        TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0")
    };
    let port = bypassed.local_addr().expect("address").port().to_string();
    let mut agent = Agent::spawn(&[
        "--cgroup",
        &cg.path().to_string_lossy(),
        "--bypass-port",
        &port,
        "--bypass-port",
        "65535",
        "--local-net",
        "198.18.0.0/15",
        "--local-net",
        "fd00::/8",
        "--local-net",
        "10.1.2.3",
    ]);
    agent.wait_ready();

    let (mut c, mut s) = {
        let _inside = cg.enter().expect("entering the private cgroup");
        pair_on(&bypassed)
    };
    let (c_tcp, s_tcp) = exchange(&mut c, &mut s);
    assert!(
        c_tcp > 0 && s_tcp > 0,
        "a connection to bypassed port {port} should stay on TCP (client {c_tcp}, server {s_tcp})"
    );
    let (mut c, mut s) = pair_in(&cg);
    let (c_tcp, s_tcp) = exchange(&mut c, &mut s);
    assert_eq!(
        (c_tcp, s_tcp),
        (0, 0),
        "a connection to another port should be short-circuited"
    );

    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "{status}; stderr: {:?}",
        agent.stderr_text()
    );
}

#[test]
fn bad_bypass_port_and_local_net_are_one_line_naming_the_field() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let dir = cg.path().to_string_lossy().into_owned();
    for (flag, value) in [
        ("--bypass-port", "0"),
        ("--bypass-port", "abc"),
        ("--bypass-port", "65536"),
        ("--local-net", "10.0.0.1/8"),
        ("--local-net", "abc"),
        ("--local-net", "10.0.0.0/33"),
    ] {
        let run = run_failing(&["--cgroup", &dir, flag, value]);
        let line = run.one_line_error();
        assert!(
            line.contains(flag),
            "the error for {flag} {value} should name {flag}: {line}"
        );
        assert!(
            line.contains(value),
            "the error should quote {value:?}: {line}"
        );
    }
}

// ---------------------------------------------------------------------------
// The rest of the command line.

#[test]
fn no_short_circuit_keeps_the_cgroup_on_tcp() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let mut agent = Agent::spawn(&[
        Path::new("--cgroup"),
        cg.path(),
        Path::new("--no-short-circuit"),
        Path::new("--max-sockets"),
        Path::new("1024"),
    ]);
    agent.wait_ready();
    let (mut c, mut s) = pair_in(&cg);
    let (c_tcp, s_tcp) = exchange(&mut c, &mut s);
    assert!(
        c_tcp > 0 && s_tcp > 0,
        "with --no-short-circuit TCP should carry the bytes (client {c_tcp}, server {s_tcp})"
    );
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "{status}; stderr: {:?}",
        agent.stderr_text()
    );
}

#[test]
fn stats_interval_prints_counters_and_still_stops_on_signal() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let mut agent = Agent::spawn(&[
        Path::new("--cgroup"),
        cg.path(),
        Path::new("--stats-interval"),
        Path::new("1"),
    ]);
    agent.wait_ready();
    let line = agent.wait_line("agent: counters:", Duration::from_secs(5));
    for field in ["sockets_enrolled=", "msgs_redirected=", "bytes_redirected="] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    agent.signal(Signal::SIGINT);
    let status = agent.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "{status}; stderr: {:?}",
        agent.stderr_text()
    );
}

#[test]
fn help_exits_zero_and_names_the_contract_flags() {
    let _serial = setup();
    let out = Command::new(agent_bin())
        .arg("--help")
        .output()
        .expect("running agent --help");
    assert!(out.status.success(), "{}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--cgroup",
        "--pin",
        "--bypass-port",
        "--local-net",
        "--max-sockets",
        "--no-short-circuit",
        "--allow-root-cgroup",
        "--stats-interval",
    ] {
        assert!(
            text.contains(flag),
            "--help does not mention {flag}:\n{text}"
        );
    }
}
