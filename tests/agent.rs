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

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::agent::*;
use meshpath::cgroup;
use nix::sys::signal::Signal;

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
        "--cleanup",
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
        "--flows",
        "--flow-socket",
        "--metrics",
        "--node",
        "--identity-key",
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

// ---------------------------------------------------------------------------
// --identity-key: identity numbers are a keyed hash of SPIFFE IDs.

/// Number -> name, from the agent's pinned names map (key: the 64-bit
/// number; value: struct mp_identity_name).
fn pinned_identities(pins: &common::PinDir) -> std::collections::BTreeMap<String, u64> {
    use libbpf_rs::{MapCore, MapFlags};
    let m = pins.map("meshpath_identities_v2");
    m.keys()
        .map(|k| {
            let v = m.lookup(&k, MapFlags::ANY).unwrap().unwrap();
            let len = u32::from_ne_bytes(v[..4].try_into().unwrap()) as usize;
            (
                String::from_utf8(v[4..4 + len].to_vec()).unwrap(),
                u64::from_ne_bytes(k[..8].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn identity_key_decides_the_numbers_and_the_default_key_is_warned_about() {
    use meshpath::policy::{Identity, IdentityKey};
    let _serial = setup();
    let w = PolicyWorld::new();
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let keys = TempDir::new();
    let hex_a = keys.0.join("a.hex");
    fs::write(&hex_a, "00112233445566778899aabbccddeeff\n").unwrap();
    let raw_b = keys.0.join("b.bin");
    fs::write(&raw_b, [0xb7u8; 24]).unwrap();
    let run = |key: Option<&Path>| {
        let pins = common::PinDir::new("agent-identity-key");
        let mut extra = vec!["--pin".to_string(), pins.arg()];
        if let Some(k) = key {
            extra.push("--identity-key".into());
            extra.push(k.to_string_lossy().into_owned());
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let agent = w.agent(true, &extra);
        let numbers = pinned_identities(&pins);
        // Enforced under any key.
        w.assert_allowed("127.0.0.2", "with an identity key");
        w.assert_denied("127.0.0.4", "with an identity key");
        let (_, stderr) = stop(agent);
        (numbers, stderr)
    };
    let (a1, stderr) = run(Some(&hex_a));
    assert!(!stderr.contains("default identity key"), "{stderr:?}");
    let (a2, _) = run(Some(&hex_a));
    let (b, _) = run(Some(&raw_b));
    let (d, stderr) = run(None);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("agent: warning:") && l.contains("default identity key")),
        "{stderr:?}"
    );
    assert_eq!(a1.len(), 2, "{a1:?}");
    assert_eq!(a1, a2, "one key: the same numbers");
    let key_a = IdentityKey::from_file_contents(&fs::read(&hex_a).unwrap()).unwrap();
    for (name, n) in &a1 {
        assert_eq!(
            *n,
            name.parse::<Identity>().unwrap().number(&key_a),
            "{name}"
        );
        assert_ne!(Some(n), b.get(name), "another key: another number ({name})");
        assert_ne!(Some(n), d.get(name), "the default key's number ({name})");
        assert_eq!(
            d[name],
            name.parse::<Identity>()
                .unwrap()
                .number(&IdentityKey::default())
        );
    }

    // A key file too short is refused, naming the flag and the minimum.
    let short = keys.0.join("short");
    fs::write(&short, "0123456789abcde").unwrap();
    let failed = run_failing(&[
        "--cgroup",
        w.cg.path().to_str().unwrap(),
        "--identity-key",
        short.to_str().unwrap(),
    ]);
    let line = failed.one_line_error();
    assert!(
        line.contains("--identity-key") && line.contains("16"),
        "{line}"
    );
    let missing = keys.0.join("missing");
    let failed = run_failing(&[
        "--cgroup",
        w.cg.path().to_str().unwrap(),
        "--identity-key",
        missing.to_str().unwrap(),
    ]);
    let line = failed.one_line_error();
    assert!(
        line.contains("--identity-key") && line.contains("cannot read"),
        "{line}"
    );
}
