//! The agent's command-line contract (`examples/agent/`):
//!
//! * `agent --cgroup DIR` prints one line containing `ready`, short-circuits
//!   TCP of that cgroup while it runs, and exits 0 on SIGTERM or SIGINT;
//! * every error is exactly one line on stderr and exit status 1;
//! * `--config FILE.json` enforces an identity policy, re-read on SIGHUP;
//!   an invalid file is one stderr line naming the field (exit 1 at
//!   startup; on SIGHUP the agent keeps running and the old policy stays);
//! * `--xdp IFACE` (with `--xdp-mode`) attaches the XDP program while the
//!   agent runs.
//!
//! These tests load eBPF programs and create cgroups: they must run as
//! root, and fail (never pass) otherwise. They never attach to the root
//! cgroup. Run: `cargo test --test agent -- --test-threads=1`.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
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
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agent");
        let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        let stale = match mtime(&bin) {
            None => true,
            Some(built) => {
                let newer = |p: &Path| mtime(p).is_some_and(|t: SystemTime| t > built);
                newer(&exe)
                    || fs::read_dir(&sources)
                        .map(|d| d.flatten().any(|e| newer(&e.path())))
                        .unwrap_or(true)
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
    /// stderr line by line, as it comes (also kept whole in `stderr`).
    stderr_lines: Receiver<String>,
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

    /// Waits for the next stderr line that is not a warning.
    fn wait_stderr_line(&mut self, timeout: Duration) -> String {
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
    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
        "--config",
        "--policy-reset-netns",
        "--xdp",
        "--xdp-mode",
    ] {
        assert!(
            text.contains(flag),
            "--help does not mention {flag}:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// --config: identity policy, SIGHUP reload. Loopback "pods": frontend at
// 127.0.0.2, db at 127.0.0.3 (listening in the private cgroup), and an
// address no endpoint covers (world) at 127.0.0.4.

const FE: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
const DB: &str = "spiffe://mesh.local/ns/db/sa/postgres";

/// Default deny; frontend -> db:`port` over TCP gets `action`.
fn policy_config(port: u16, action: &str) -> serde_json::Value {
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

/// Invalid variants of `good` (a `policy_config`): (what, file text,
/// strings the one error line must contain).
fn invalid_configs(good: &serde_json::Value) -> Vec<(&'static str, String, Vec<&'static str>)> {
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_string_pretty(&v).expect("serialising a config")
    };
    let pretty = serde_json::to_string_pretty(good).expect("serialising a config");
    vec![
        (
            "bad JSON",
            pretty[..pretty.len() / 2].to_string(),
            vec!["not valid JSON", "line ", "column "],
        ),
        (
            "unknown key",
            pretty.replacen("\"policies\"", "\"polices\"", 1),
            vec!["unknown field", "\"polices\"", "line "],
        ),
        (
            "port 0",
            edit(&|v| {
                v["policies"][0]["ports"]
                    .as_array_mut()
                    .unwrap()
                    .push(0.into())
            }),
            vec!["policies[0].ports[1]", "0 is not a port"],
        ),
        (
            "port 70000",
            edit(&|v| v["policies"][0]["ports"][0] = 70000.into()),
            vec!["policies[0].ports[0]", "70000"],
        ),
        (
            "port -1",
            edit(&|v| v["policies"][0]["ports"][0] = (-1).into()),
            vec!["policies[0].ports[0]", "-1"],
        ),
        (
            "bad CIDR",
            edit(&|v| v["endpoints"][1]["ip"] = "127.0.0.3/8".into()),
            vec!["endpoints[1].ip", "127.0.0.3/8"],
        ),
        (
            "bad SPIFFE ID (endpoint)",
            edit(&|v| v["endpoints"][0]["identity"] = "spiffe://Mesh.local/frontend".into()),
            vec!["endpoints[0].identity", "SPIFFE ID"],
        ),
        (
            "bad SPIFFE ID (rule)",
            edit(&|v| v["policies"][0]["from"] = "frontend".into()),
            vec!["policies[0].from", "SPIFFE ID"],
        ),
        (
            "bad protocol",
            edit(&|v| v["policies"][0]["protocol"] = "sctp".into()),
            vec!["policies[0].protocol", "sctp"],
        ),
        (
            "bad action",
            edit(&|v| v["policies"][0]["action"] = "permit".into()),
            vec!["policies[0].action", "permit"],
        ),
        (
            "bad default action",
            edit(&|v| v["default_action"] = "maybe".into()),
            vec!["default_action", "maybe"],
        ),
        (
            "missing key",
            edit(&|v| {
                v["policies"][0].as_object_mut().unwrap().remove("action");
            }),
            vec!["policies[0].action", "missing"],
        ),
    ]
}

/// Writes `text` to `path` atomically (a reader never sees half a file).
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// A TCP connection from `src` (bound, port 0) to `dst`.
fn connect_from(src: &str, dst: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let src = SocketAddr::new(src.parse().expect("a source address"), 0);
    bind(fd.as_raw_fd(), &SockaddrStorage::from(src))?;
    let s = TcpStream::from(fd);
    nix::sys::socket::connect(s.as_raw_fd(), &SockaddrStorage::from(dst))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn is_eperm(r: &io::Result<TcpStream>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

fn describe(r: &io::Result<TcpStream>) -> String {
    match r {
        Ok(s) => format!("connected ({:?})", s.local_addr()),
        Err(e) => format!("{e}"),
    }
}

/// A policy test's world: a private cgroup with the db listening in it,
/// and a config file.
struct PolicyWorld {
    cg: ScopedCgroup,
    db: TcpListener,
    db_addr: SocketAddr,
    _dir: TempDir,
    config: PathBuf,
}

impl PolicyWorld {
    fn new() -> PolicyWorld {
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
            _dir: dir,
            config,
        }
    }

    fn write(&self, config: &serde_json::Value) {
        write_config(&self.config, &config.to_string());
    }

    /// Starts the agent on the cgroup (with `--config` when `with_config`)
    /// and waits for `ready`.
    fn agent(&self, with_config: bool, extra: &[&str]) -> Agent {
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
    fn connect(&self, src: &str) -> io::Result<TcpStream> {
        let _inside = self.cg.enter().expect("entering the private cgroup");
        connect_from(src, self.db_addr)
    }

    /// The db's side of the next connection.
    fn accept(&self) -> TcpStream {
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
    fn assert_allowed(&self, src: &str, when: &str) -> (TcpStream, TcpStream) {
        let r = self.connect(src);
        let mut c = r.unwrap_or_else(|e| panic!("{when}: {src} -> db should connect: {e}"));
        let mut s = self.accept();
        exchange(&mut c, &mut s);
        (c, s)
    }

    fn assert_denied(&self, src: &str, when: &str) {
        let r = self.connect(src);
        assert!(
            is_eperm(&r),
            "{when}: {src} -> db should get EPERM, got: {}",
            describe(&r)
        );
    }
}

/// The numbers of an `agent: policy applied: generation N, E endpoints,
/// R rules (+W/-D entries), F flows reset` line: (N, E, R, W, D, F).
fn parse_applied(line: &str) -> (u32, usize, usize, usize, usize, u64) {
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("a number"))
        .collect();
    assert!(
        line.starts_with("agent: policy applied: generation ")
            && line.contains(" endpoints, ")
            && line.contains(" rules (+")
            && line.contains(" entries), ")
            && line.ends_with(" flows reset")
            && nums.len() == 6,
        "malformed policy line: {line:?}"
    );
    (
        nums[0] as u32,
        nums[1] as usize,
        nums[2] as usize,
        nums[3] as usize,
        nums[4] as usize,
        nums[5],
    )
}

/// The `policy applied` line printed before `ready`.
fn startup_policy_line(agent: &Agent) -> String {
    let lines: Vec<&String> = agent
        .seen
        .iter()
        .filter(|l| l.starts_with("agent: policy applied:"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one `policy applied` line before `ready` expected: {:?}",
        agent.seen
    );
    lines[0].clone()
}

/// Stops the agent with SIGTERM, expects exit 0; returns (stdout, stderr).
fn stop(mut agent: Agent) -> (Vec<String>, String) {
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(EXIT_TIMEOUT);
    let stderr = agent.stderr_text();
    assert_eq!(status.code(), Some(0), "{status}; stderr: {stderr:?}");
    (agent.stdout_lines(), stderr)
}

#[test]
fn config_allows_the_listed_pair_and_sighup_applies_a_deny() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let port = w.db_addr.port();
    w.write(&policy_config(port, "allow"));
    let agent = w.agent(true, &["--policy-reset-netns", "/proc/self/ns/net"]);
    let (gen, endpoints, rules, written, removed, reset) =
        parse_applied(&startup_policy_line(&agent));
    assert_eq!((endpoints, rules), (2, 1), "{:?}", agent.seen);
    assert_eq!((written, removed, reset), (3, 0, 0), "{:?}", agent.seen);

    // (a) frontend -> db:port passes byte-exact; world -> db is denied.
    let (mut c, mut s) = w.assert_allowed("127.0.0.2", "allow policy");
    w.assert_denied("127.0.0.4", "allow policy");
    w.assert_denied("127.0.0.3", "allow policy (db -> db has no rule)");

    // (b) The same pair denied: SIGHUP applies it, the established flow is
    // reset, and the next connect gets EPERM.
    let mut agent = agent;
    w.write(&policy_config(port, "deny"));
    agent.signal(Signal::SIGHUP);
    let line = agent.wait_line("agent: policy applied:", Duration::from_secs(10));
    let (gen2, endpoints, rules, written, removed, reset) = parse_applied(&line);
    assert_eq!(gen2, gen + 1, "{line}");
    assert_eq!((endpoints, rules), (2, 1), "{line}");
    assert_eq!(
        (written, removed),
        (1, 0),
        "only the rule's action changed: {line}"
    );
    assert_eq!(
        reset, 2,
        "both ends of the established flow are reset: {line}"
    );
    // The client sees an error, not the server's bytes.
    let r = c.write_all(b"after").and_then(|()| {
        let mut buf = [0u8; 16];
        c.read(&mut buf)
    });
    assert!(
        matches!(r, Err(_) | Ok(0)),
        "a reset flow carried bytes: {r:?}"
    );
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    assert!(matches!(r, Err(_) | Ok(0)), "the server end: {r:?}");
    w.assert_denied("127.0.0.2", "after SIGHUP to deny");
    w.assert_denied("127.0.0.4", "after SIGHUP to deny");

    // And back: allowed again.
    w.write(&policy_config(port, "allow"));
    agent.signal(Signal::SIGHUP);
    let line = agent.wait_line("agent: policy applied:", Duration::from_secs(10));
    assert_eq!(parse_applied(&line).0, gen + 2, "{line}");
    w.assert_allowed("127.0.0.2", "after SIGHUP back to allow");

    let (_, stderr) = stop(agent);
    assert!(!stderr.contains("error"), "{stderr:?}");
}

#[test]
fn sighup_with_an_invalid_config_keeps_the_old_policy() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let good = policy_config(w.db_addr.port(), "allow");
    w.write(&good);
    let mut agent = w.agent(true, &[]);
    let (gen, ..) = parse_applied(&startup_policy_line(&agent));
    // A flow established under the good policy must survive every
    // rejected reload.
    let (mut c0, mut s0) = w.assert_allowed("127.0.0.2", "good policy");

    let variants = invalid_configs(&good);
    let config = w.config.to_string_lossy().into_owned();
    for (what, text, needles) in &variants {
        write_config(&w.config, text);
        agent.signal(Signal::SIGHUP);
        let line = agent.wait_stderr_line(Duration::from_secs(10));
        assert!(
            line.starts_with(&format!("agent: error: config {config}: ")),
            "{what}: the error should start with `agent: error: config {config}: `: {line}"
        );
        for needle in needles {
            assert!(
                line.contains(needle),
                "{what}: the error should contain {needle:?}: {line}"
            );
        }
        // Still running, and the old policy is enforced, unchanged.
        std::thread::sleep(Duration::from_millis(50));
        assert!(agent.is_running(), "{what}: the agent exited");
        w.assert_allowed("127.0.0.2", what);
        w.assert_denied("127.0.0.4", what);
        exchange(&mut c0, &mut s0);
    }

    // No rejected reload bumped the generation.
    w.write(&good);
    agent.signal(Signal::SIGHUP);
    let line = agent.wait_line("agent: policy applied:", Duration::from_secs(10));
    let (gen2, _, _, written, removed, reset) = parse_applied(&line);
    assert_eq!(gen2, gen + 1, "{line}");
    assert_eq!((written, removed, reset), (0, 0, 0), "{line}");

    let (stdout, stderr) = stop(agent);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("agent: warning:"))
        .collect();
    assert_eq!(
        errors.len(),
        variants.len(),
        "one stderr line per rejected reload, nothing else: {errors:#?}"
    );
    let applied = stdout
        .iter()
        .filter(|l| l.starts_with("agent: policy applied:"))
        .count();
    assert_eq!(
        applied, 2,
        "only the startup and the last reload applied: {stdout:?}"
    );
}

#[test]
fn an_invalid_config_at_startup_is_exit_1_and_one_line_naming_the_field() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let dir = TempDir::new();
    let path = dir.0.join("policy.json");
    let args = [
        "--cgroup".to_string(),
        cg.path().to_string_lossy().into_owned(),
        "--config".to_string(),
        path.to_string_lossy().into_owned(),
    ];
    let config = path.to_string_lossy().into_owned();
    for (what, text, needles) in invalid_configs(&policy_config(5432, "allow")) {
        write_config(&path, &text);
        let run = run_failing(&args);
        let line = run.one_line_error();
        assert!(
            line.starts_with(&format!("agent: error: config {config}: ")),
            "{what}: {line}"
        );
        for needle in needles {
            assert!(
                line.contains(needle),
                "{what}: the error should contain {needle:?}: {line}"
            );
        }
    }
    // A missing file names it.
    fs::remove_file(&path).expect("removing the config");
    let run = run_failing(&args);
    let line = run.one_line_error();
    assert!(line.contains(&config), "{line}");
    // So does a namespace that cannot be opened.
    write_config(&path, &policy_config(5432, "allow").to_string());
    let missing_ns = dir.0.join("no-such-netns");
    let mut with_ns = args.to_vec();
    with_ns.push("--policy-reset-netns".into());
    with_ns.push(missing_ns.to_string_lossy().into_owned());
    let run = run_failing(&with_ns);
    let line = run.one_line_error();
    assert!(
        line.contains("--policy-reset-netns") && line.contains(&*missing_ns.to_string_lossy()),
        "{line}"
    );
}

#[test]
fn without_config_everything_is_allowed_and_sighup_changes_nothing() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let mut agent = w.agent(false, &[]);
    assert!(
        !agent
            .seen
            .iter()
            .any(|l| l.starts_with("agent: policy applied:")),
        "no policy without --config: {:?}",
        agent.seen
    );
    w.assert_allowed("127.0.0.4", "no policy");
    w.assert_allowed("127.0.0.2", "no policy");
    agent.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        agent.is_running(),
        "SIGHUP without --config stopped the agent"
    );
    w.assert_allowed("127.0.0.4", "no policy, after SIGHUP");
    let (_, stderr) = stop(agent);
    assert!(!stderr.contains("error"), "{stderr:?}");
}

// ---------------------------------------------------------------------------
// --xdp IFACE and --xdp-mode, on a veth interface that is down (no traffic).

/// A veth pair, left down (so it carries no traffic), deleted on drop.
/// `.0` is the end the agent attaches to.
struct TestIface(String);

impl TestIface {
    fn new() -> TestIface {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // IFNAMSIZ: at most 15 characters.
        let name = format!("mpag{}x{n}", std::process::id() % 100_000);
        let peer = format!("{name}p");
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
        TestIface(name)
    }

    /// `ip -d link show dev NAME`.
    fn show(&self) -> String {
        ip(&["-d", "link", "show", "dev", &self.0])
    }
}

impl Drop for TestIface {
    fn drop(&mut self) {
        // Deleting one end deletes the pair.
        let _ = Command::new("ip")
            .args(["link", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?} (iproute2 is needed): {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn xdp_attaches_to_each_interface_and_detaches_on_exit() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let (a, b) = (TestIface::new(), TestIface::new());
    let dir = cg.path().to_string_lossy().into_owned();
    for (mode, shown) in [("generic", "xdpgeneric"), ("auto", "xdp")] {
        let mut agent = Agent::spawn(&[
            "--cgroup",
            &dir,
            "--xdp",
            &a.0,
            "--xdp",
            &b.0,
            "--xdp-mode",
            mode,
        ]);
        let ready = agent.wait_ready();
        for iface in [&a, &b] {
            assert!(ready.contains(&iface.0), "{mode}: {ready}");
            let link = iface.show();
            assert!(
                link.contains(shown) && link.contains("prog/xdp"),
                "{mode}: no XDP program on {} while the agent runs:\n{link}",
                iface.0
            );
        }
        if mode == "generic" {
            assert!(ready.contains("(generic)"), "{ready}");
        }
        let (_, stderr) = stop(agent);
        assert!(!stderr.contains("error"), "{stderr:?}");
        for iface in [&a, &b] {
            let link = iface.show();
            assert!(
                !link.contains("prog/xdp"),
                "{mode}: the XDP program is still on {} after the agent exited:\n{link}",
                iface.0
            );
        }
    }
}

#[test]
fn bad_xdp_interface_and_mode_are_one_line_naming_them() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let dir = cg.path().to_string_lossy().into_owned();
    let run = run_failing(&["--cgroup", &dir, "--xdp", "mp-no-such-if"]);
    let line = run.one_line_error();
    assert!(line.contains("mp-no-such-if"), "{line}");
    let iface = TestIface::new();
    let run = run_failing(&["--cgroup", &dir, "--xdp", &iface.0, "--xdp-mode", "turbo"]);
    let line = run.one_line_error();
    assert!(
        line.contains("--xdp-mode") && line.contains("turbo"),
        "{line}"
    );
    let run = run_failing(&["--cgroup", &dir, "--xdp-mode", "generic"]);
    let line = run.one_line_error();
    assert!(line.contains("--xdp"), "{line}");
    assert!(
        !iface.show().contains("prog/xdp"),
        "a failed start left XDP attached"
    );
}
