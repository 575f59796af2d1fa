//! The agent cannot be wedged or fooled (`examples/agent/`):
//!
//! * one pin directory has one owner: a second agent on it is refused
//!   (one `agent: error:` line naming the owner's pid, exit 1) and the
//!   first keeps enforcing its policy; a killed owner's lock goes with it;
//! * `--cleanup` is refused while an owner lives, and removes nothing that
//!   meshpath did not pin (another tool's pins, a directory off bpffs);
//! * programs detached from under a running agent are noticed, reported,
//!   attached again and counted (`meshpath_agent_reattach_total`);
//! * a stdout reader that stops reading `--flows` stalls neither reloads
//!   nor shutdown (lines dropped and counted); a FIFO, a device or an
//!   oversized file given as a file flag is refused, at startup and on
//!   SIGHUP, and SIGTERM still ends the agent at once;
//! * the metrics endpoint answers a scrape within 2 s among hundreds of
//!   idle and half-sent connections; flow socket clients beyond its limit
//!   are counted, not logged one line each;
//! * adopting pins made with other map sizes is a warning naming the map
//!   and both sizes.
//!
//! Root only: they load eBPF programs and make cgroups (never the root
//! one), fail (never skip) otherwise, and only use loopback. The bounds
//! (a scrape within 2 s, an exit within 5 s of SIGTERM) scale with
//! `MESHPATH_TEST_TIME_SCALE`, like every wait, for emulated guests.

mod common;

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use common::agent::*;
use common::{scaled, PinDir};
use nix::sys::signal::Signal;

// ---------------------------------------------------------------------------
// Helpers.

/// Waits for a stderr line containing `needle` (warnings included).
fn wait_stderr(agent: &mut Agent, needle: &str, timeout: Duration) -> String {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.stderr_lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(e) => panic!(
                "no stderr line containing {needle:?} within {timeout:?} ({e}); stderr so far: \
                 {seen:?}; stdout: {:?}",
                agent.seen
            ),
        }
    }
}

/// Every stderr line that arrives within `window`.
fn stderr_for(agent: &mut Agent, window: Duration) -> Vec<String> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.stderr_lines.recv_timeout(left) {
            Ok(line) => out.push(line),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return out,
        }
    }
}

/// `agent --pin DIR --cleanup` (plus `extra`), run to completion.
fn cleanup(pin: &str) -> std::process::Output {
    Command::new(agent_bin())
        .args(["--pin", pin, "--cleanup"])
        .output()
        .expect("running agent --cleanup")
}

/// A one-entry array map named `name`, pinned at `path` (what another
/// tool could have left on bpffs).
fn pin_array_map(path: &Path, name: &str) {
    let cname = CString::new(name).unwrap();
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    // SAFETY: plain syscall wrapper; the name and options outlive the call.
    let fd = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_ARRAY,
            cname.as_ptr(),
            4,
            4,
            1,
            &opts,
        )
    };
    assert!(fd >= 0, "bpf_map_create {name}: {fd}");
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let c = CString::new(path.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a live map fd and a valid C string.
    let r = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) };
    assert_eq!(r, 0, "pinning {}", path.display());
}

/// Detaches (`BPF_LINK_DETACH`, as `bpftool link detach id N` does) every
/// BPF link attached to the cgroup `cgroup_id`; returns how many.
fn detach_cgroup_links(cgroup_id: u64) -> usize {
    let mut id = 0u32;
    let mut n = 0;
    loop {
        let mut next = 0u32;
        // SAFETY: plain syscall wrapper with an out parameter.
        if unsafe { libbpf_sys::bpf_link_get_next_id(id, &mut next) } != 0 {
            return n;
        }
        id = next;
        // SAFETY: plain syscall wrapper.
        let fd = unsafe { libbpf_sys::bpf_link_get_fd_by_id(id) };
        if fd < 0 {
            continue; // gone meanwhile
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut info = libbpf_sys::bpf_link_info::default();
        let mut len = std::mem::size_of::<libbpf_sys::bpf_link_info>() as u32;
        // SAFETY: `info` is a zeroed bpf_link_info and `len` its size.
        let r = unsafe { libbpf_sys::bpf_link_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
        assert_eq!(r, 0, "link info of link {id}");
        if info.type_ != libbpf_sys::BPF_LINK_TYPE_CGROUP {
            continue;
        }
        // SAFETY: the cgroup member is the one a cgroup link fills.
        let cg = unsafe { info.__bindgen_anon_1.cgroup.cgroup_id };
        if cg == cgroup_id {
            // SAFETY: plain syscall wrapper on a live link fd.
            let r = unsafe { libbpf_sys::bpf_link_detach(fd.as_raw_fd()) };
            assert_eq!(r, 0, "detaching link {id}");
            n += 1;
        }
    }
}

/// Detaches the pinned link at `path` and removes the pin, as an older
/// `agent --cleanup` did to a running agent.
fn detach_and_unpin(path: &Path) {
    let c = CString::new(path.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    assert!(fd >= 0, "opening {}: {fd}", path.display());
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall wrapper on a live link fd.
    assert_eq!(unsafe { libbpf_sys::bpf_link_detach(fd.as_raw_fd()) }, 0);
    std::fs::remove_file(path).unwrap();
}

fn cgroup_id(cg: &Path) -> u64 {
    std::fs::metadata(cg).expect("the cgroup").ino()
}

/// Waits until `f` holds (checking every 50 ms), at most `timeout`.
fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// 1. One owner per pin directory.

#[test]
fn a_second_agent_on_one_pin_directory_is_refused_and_the_first_keeps_its_policy() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let pin = PinDir::new("owner");
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let mut a1 = w.agent(true, &["--pin", &pin.arg()]);
    let owner = a1.pid().as_raw();

    // A second agent on the same pins, another cgroup, no policy at all
    // (everything allowed): it must not start, nor touch the first's.
    let cg2 = scoped_cgroup();
    let f = run_refused(&[
        "--cgroup",
        &cg2.path().to_string_lossy(),
        "--pin",
        &pin.arg(),
    ]);
    let line = f.one_line_error();
    assert!(line.starts_with("agent: error:"), "{line}");
    assert!(
        line.contains(&pin.arg())
            && line.contains("in use")
            && line.contains(&format!("process {owner}")),
        "the error should name the directory and the owner's pid {owner}: {line}"
    );
    // The first agent's policy is the one enforced, and it still runs.
    w.assert_denied("127.0.0.4", "after the refused second agent");
    w.assert_allowed("127.0.0.2", "after the refused second agent");
    assert!(a1.is_running());

    // A killed owner's lock goes with it: the next agent adopts.
    a1.signal(Signal::SIGKILL);
    let _ = a1.wait_exit(EXIT_TIMEOUT);
    let a3 = w.agent(true, &["--pin", &pin.arg()]);
    assert!(
        a3.seen.iter().any(|l| l.contains("adopted the datapath")),
        "{:?}",
        a3.seen
    );
    w.assert_denied("127.0.0.4", "third agent");
    stop(a3);
}

// ---------------------------------------------------------------------------
// 2. --cleanup and severed links.

#[test]
fn cleanup_is_refused_while_an_agent_owns_the_pin_directory() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let pin = PinDir::new("busycleanup");
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let a1 = w.agent(true, &["--pin", &pin.arg()]);
    let owner = a1.pid().as_raw();
    let pinned = pin.entries();
    assert!(pinned.len() > 10, "{pinned:?}");

    let out = cleanup(&pin.arg());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with("agent: error:")
            && stderr.contains("in use")
            && stderr.contains(&format!("process {owner}")),
        "{stderr:?}"
    );
    // Nothing was removed or detached: the agent still enforces.
    assert_eq!(pin.entries(), pinned);
    w.assert_denied("127.0.0.4", "after the refused cleanup");
    w.assert_allowed("127.0.0.2", "after the refused cleanup");

    // Once the agent is gone (pinned, still enforcing), cleanup works.
    stop(a1);
    w.assert_denied("127.0.0.4", "no agent");
    let out = cleanup(&pin.arg());
    assert!(out.status.success(), "{out:?}");
    assert!(!pin.0.exists(), "{:?}", pin.entries());
}

#[test]
fn programs_detached_from_under_the_agent_are_noticed_and_attached_again() {
    let _serial = setup();
    let w = PolicyWorld::new();
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let id = cgroup_id(w.cg.path());

    // Unpinned links, detached by id (`bpftool link detach id N`).
    let mut a = w.agent(true, &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(a.seen.last().expect("the ready line"));
    w.assert_denied("127.0.0.4", "before");
    let n = detach_cgroup_links(id);
    assert!(
        n >= 8,
        "the agent attaches at least 8 programs to a cgroup: {n}"
    );
    let started = Instant::now();
    let line = wait_stderr(
        &mut a,
        "detached from under the agent",
        Duration::from_secs(5),
    );
    assert!(
        started.elapsed() < scaled(Duration::from_secs(3)),
        "noticed late"
    );
    assert!(
        line.starts_with("agent: warning:")
            && line.contains(&*w.cg.path().to_string_lossy())
            && line.contains("attached again")
            && line.contains("sockops")
            && line.contains("connect4"),
        "{line}"
    );
    w.assert_denied("127.0.0.4", "attached again");
    let (mut c, mut s) = w.assert_allowed("127.0.0.2", "attached again");
    assert_eq!(exchange(&mut c, &mut s), (0, 0), "short-circuited again");
    let body = scrape(addr);
    assert_eq!(
        sample(&body, "meshpath_agent_reattach_total"),
        Some(n as u64)
    );
    stop(a);

    // Pinned links, detached and unpinned (what an older `--cleanup` did
    // to a running agent): attached again and pinned where they were.
    let pin = PinDir::new("severed");
    let mut a = w.agent(true, &["--pin", &pin.arg()]);
    let pinned = pin.entries();
    let links: Vec<String> = pinned
        .iter()
        .filter(|e| e.starts_with("meshpath_link_cg"))
        .cloned()
        .collect();
    assert_eq!(links.len(), n, "{pinned:?}");
    for l in &links {
        detach_and_unpin(&pin.0.join(l));
    }
    let line = wait_stderr(
        &mut a,
        "detached from under the agent",
        Duration::from_secs(5),
    );
    assert!(line.contains("its link was detached"), "{line}");
    eventually(Duration::from_secs(3), "the pins are back", || {
        pin.entries() == pinned
    });
    w.assert_denied("127.0.0.4", "attached again (pinned)");
    // The new links are pinned: they outlive the agent.
    stop(a);
    w.assert_denied("127.0.0.4", "no agent, the new links pinned");
}

#[test]
fn cleanup_leaves_what_is_not_meshpaths_alone() {
    let _serial = setup();
    meshpath::bpffs::ensure_default_mount().unwrap();
    // A bpffs directory of another tool: its maps, a map under a link
    // name meshpath never pins, a map where meshpath would pin a link, and
    // a directory under the name of one of meshpath's maps.
    let dir = PinDir::new("foreign");
    std::fs::create_dir_all(&dir.0).unwrap();
    pin_array_map(&dir.0.join("their_map"), "their_map");
    pin_array_map(&dir.0.join("meshpath_link_notes"), "notes");
    pin_array_map(&dir.0.join("meshpath_link_cg1_sockops"), "not_a_link");
    std::fs::create_dir(dir.0.join("meshpath_sockets")).unwrap();
    let before = dir.entries();
    struct Tidy<'a>(&'a Path);
    impl Drop for Tidy<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(self.0.join("meshpath_sockets"));
            for e in [
                "their_map",
                "meshpath_link_notes",
                "meshpath_link_cg1_sockops",
            ] {
                let _ = std::fs::remove_file(self.0.join(e));
            }
            let _ = std::fs::remove_dir(self.0);
        }
    }
    let _tidy = Tidy(&dir.0);

    let out = cleanup(&dir.arg());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("detached and unpinned 0 objects"),
        "{stdout:?}"
    );
    assert_eq!(dir.entries(), before, "nothing of theirs removed");
    assert_eq!(stderr.lines().count(), 1, "one warning: {stderr:?}");
    for name in before {
        assert!(stderr.contains(&name), "{name} is not reported: {stderr:?}");
    }
    assert!(stderr.contains("not a BPF link"), "{stderr:?}");

    // A directory off bpffs: refused, its file kept.
    let tmp = TempDir::new();
    let file = tmp.0.join("meshpath_sockets");
    std::fs::write(&file, b"the user's file").unwrap();
    let out = cleanup(&tmp.0.to_string_lossy());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("not on a BPF file system"), "{stderr:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"the user's file");
}

// ---------------------------------------------------------------------------
// 3. Nothing the agent reads or writes stalls it.

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    (r, w)
}

/// Reads `fd` until a line containing `needle` has been read; returns
/// everything read.
fn read_until(fd: &OwnedFd, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.lines().any(|l| l.contains(needle)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {needle:?} within {timeout:?}: {text:?}"
        );
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(fd),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = left.as_millis().min(1000) as u16;
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap_or(0) == 0 {
            continue;
        }
        let n = nix::unistd::read(fd, &mut buf).expect("reading the pipe");
        assert!(n > 0, "the agent closed stdout: {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

#[test]
fn flows_into_a_stdout_nobody_reads_stall_neither_reloads_nor_shutdown() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let allow = policy_config(w.db_addr.port(), "allow");
    let deny = policy_config(w.db_addr.port(), "deny");
    w.write(&allow);
    let (rd, wr) = pipe();
    let args = [
        "--cgroup".to_string(),
        w.cg.path().to_string_lossy().into_owned(),
        "--config".into(),
        w.config.to_string_lossy().into_owned(),
        "--flows".into(),
        "--metrics".into(),
        "127.0.0.1:0".into(),
    ];
    let mut agent = Agent::spawn_with(agent_bin(), &args, move |cmd| {
        cmd.stdout(Stdio::from(wr));
    });
    let text = read_until(&rd, "ready", READY_TIMEOUT);
    let ready = text.lines().find(|l| l.contains("ready")).unwrap();
    let addr = metrics_addr(ready);
    // From now on nobody reads stdout. 12,000 connections make ~36,000
    // flow lines, ~6.5 MB: the pipe fills, then the agent's queue.
    {
        let _inside = w.cg.enter().expect("entering the test cgroup");
        for i in 0..12_000 {
            let c = connect_from("127.0.0.2", w.db_addr)
                .unwrap_or_else(|e| panic!("allowed connection #{i}: {e}"));
            drop(w.accept());
            drop(c);
        }
    }
    // Reloads still happen, one after the other (each prints a line).
    for (state, deny_now) in [(&deny, true), (&allow, false), (&deny, true)] {
        w.write(state);
        agent.signal(Signal::SIGHUP);
        eventually(Duration::from_secs(5), "the reload applied", || {
            let r = w.connect("127.0.0.2");
            if r.is_ok() {
                drop(w.accept());
            }
            is_eperm(&r) == deny_now
        });
    }
    assert!(agent.is_running());
    // What did not fit was dropped and counted.
    eventually(Duration::from_secs(10), "flow lines dropped", || {
        sample(&scrape(addr), "meshpath_flow_stdout_dropped_total").unwrap_or(0) > 0
    });
    wait_stderr(
        &mut agent,
        "stdout is not being read",
        Duration::from_secs(5),
    );
    // And SIGTERM ends it at once.
    let started = Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(5));
    assert!(started.elapsed() < scaled(Duration::from_secs(5)));
    assert_eq!(status.code(), Some(0), "{:?}", agent.stderr_text());
    drop(rd);
}

#[test]
fn a_fifo_config_on_sighup_is_refused_and_sigterm_still_ends_the_agent() {
    let _serial = setup();
    let w = PolicyWorld::new();
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let mut agent = w.agent(true, &[]);
    w.assert_denied("127.0.0.4", "before");
    // The config becomes a FIFO nobody writes to.
    std::fs::remove_file(&w.config).unwrap();
    nix::unistd::mkfifo(&w.config, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .expect("mkfifo");
    agent.signal(Signal::SIGHUP);
    let line = agent.wait_stderr_line(Duration::from_secs(5));
    assert!(
        line.starts_with("agent: error: config ")
            && line.contains("FIFO")
            && line.contains("--config takes a regular file"),
        "{line}"
    );
    // The policy in force is unchanged, the agent serves on.
    w.assert_denied("127.0.0.4", "after the refused FIFO");
    w.assert_allowed("127.0.0.2", "after the refused FIFO");
    let started = Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(5));
    assert!(started.elapsed() < scaled(Duration::from_secs(5)));
    assert_eq!(status.code(), Some(0), "{:?}", agent.stderr_text());
}

#[test]
fn file_flags_refuse_fifos_devices_and_oversized_files() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let cgs = cg.path().to_string_lossy().into_owned();
    let dir = TempDir::new();
    let fifo = dir.0.join("fifo.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let fifo = fifo.to_string_lossy().into_owned();
    let big = dir.0.join("big.json");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(17 << 20))
        .expect("a 17 MiB file");
    let big = big.to_string_lossy().into_owned();

    let cases: [(Vec<&str>, &[&str]); 4] = [
        (
            vec!["--config", "/dev/null"],
            &[
                "config /dev/null",
                "character device",
                "--config takes a regular file",
            ],
        ),
        (
            vec!["--config", &fifo],
            &["FIFO", "--config takes a regular file"],
        ),
        (vec!["--config", &big], &["larger than 16 MiB", "--config"]),
        (
            vec![
                "--auth-listen",
                "127.0.0.1:0",
                "--cert",
                "/nonexistent.pem",
                "--key",
                "/nonexistent.key",
                "--ca",
                &fifo,
            ],
            &["--ca", "FIFO", "--ca takes a regular file"],
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["--cgroup", &cgs];
        args.extend(&flags);
        let started = Instant::now();
        let f = run_refused(&args);
        let line = f.one_line_error();
        assert!(
            started.elapsed() < scaled(Duration::from_secs(10)),
            "{flags:?}: took {:?}",
            started.elapsed()
        );
        for w in want {
            assert!(line.contains(w), "{flags:?}: {w:?} missing from {line}");
        }
    }
}

// ---------------------------------------------------------------------------
// 4. The metrics endpoint and the flow socket under many clients.

#[test]
fn a_scrape_succeeds_among_idle_and_half_sent_connections() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let mut agent = Agent::spawn(&[
        "--cgroup",
        &cg.path().to_string_lossy(),
        "--metrics",
        "127.0.0.1:0",
    ]);
    let addr = metrics_addr(&agent.wait_ready());
    // 300 idle connections, 60 requests sent half (slowloris), 20 asking
    // and never reading: more than the server keeps open.
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..300 {
        held.push(TcpStream::connect(addr).expect("an idle connection"));
    }
    for _ in 0..60 {
        let mut s = TcpStream::connect(addr).expect("a slow connection");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: slo").unwrap();
        held.push(s);
    }
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).expect("a deaf connection");
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        held.push(s);
    }
    // A slowloris keeps trickling meanwhile.
    for s in held.iter_mut().skip(300).take(60) {
        let _ = s.write_all(b"w");
    }
    for round in 0..3 {
        let started = Instant::now();
        let body = try_scrape(addr, scaled(Duration::from_secs(2)))
            .unwrap_or_else(|e| panic!("scrape {round} among {} connections: {e}", held.len()));
        assert!(body.contains("meshpath_sockets_tracked"), "{body}");
        assert!(started.elapsed() < scaled(Duration::from_secs(2)));
    }
    // Each connection has a deadline; the oldest made room for the rest.
    std::thread::sleep(scaled(Duration::from_secs(6)));
    let body = scrape(addr);
    let dropped = |reason: &str| {
        sample(
            &body,
            &format!("meshpath_metrics_connections_dropped_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0)
    };
    assert!(dropped("evicted") > 0, "{body}");
    assert!(dropped("deadline") > 0, "{body}");
    drop(held);
    stop(agent);
}

#[test]
fn flow_socket_clients_beyond_the_limit_are_counted_not_logged_one_by_one() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let dir = TempDir::new();
    let sock = dir.0.join("flows.sock");
    let mut agent = Agent::spawn(&[
        "--cgroup",
        &cg.path().to_string_lossy(),
        "--flow-socket",
        &sock.to_string_lossy(),
        "--metrics",
        "127.0.0.1:0",
    ]);
    let addr = metrics_addr(&agent.wait_ready());
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(std::os::unix::net::UnixStream::connect(&sock).expect("a client"));
    }
    eventually(Duration::from_secs(5), "64 clients connected", || {
        sample(&scrape(addr), "meshpath_flow_socket_clients") == Some(64)
    });
    for _ in 0..30 {
        let mut extra = std::os::unix::net::UnixStream::connect(&sock).expect("a client");
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            extra.read(&mut b).unwrap_or(0),
            0,
            "refused: closed at once"
        );
    }
    eventually(Duration::from_secs(5), "30 refusals counted", || {
        sample(&scrape(addr), "meshpath_flow_socket_refused_total") == Some(30)
    });
    let lines = stderr_for(&mut agent, Duration::from_millis(500));
    let refusals = lines.iter().filter(|l| l.contains("refusing")).count();
    assert_eq!(refusals, 1, "one line for 30 refusals: {lines:?}");
    drop(clients);
    stop(agent);
}

// ---------------------------------------------------------------------------
// 5. Pins of other sizes.

#[test]
fn adopting_pins_of_other_map_sizes_is_a_warning_naming_map_and_sizes() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let pin = PinDir::new("sizes");
    let cgs = cg.path().to_string_lossy().into_owned();
    let a1 = Agent::spawn(&[
        "--cgroup",
        &cgs,
        "--pin",
        &pin.arg(),
        "--max-sockets",
        "4096",
    ]);
    let mut a1 = a1;
    a1.wait_ready();
    stop(a1);
    let mut a2 = Agent::spawn(&[
        "--cgroup",
        &cgs,
        "--pin",
        &pin.arg(),
        "--max-sockets",
        "1024",
    ]);
    a2.wait_ready();
    let (stdout, stderr) = stop(a2);
    assert!(
        stdout.iter().any(|l| l.contains("adopted the datapath")),
        "{stdout:?}"
    );
    for map in ["meshpath_sockets", "meshpath_sock_index"] {
        let line = stderr
            .lines()
            .find(|l| l.contains(map))
            .unwrap_or_else(|| panic!("no warning about {map}: {stderr:?}"));
        assert!(
            line.starts_with("agent: warning:")
                && line.contains("4096")
                && line.contains("1024")
                && line.contains("--max-sockets"),
            "{line}"
        );
    }
    // Same sizes: no warning.
    let mut a3 = Agent::spawn(&[
        "--cgroup",
        &cgs,
        "--pin",
        &pin.arg(),
        "--max-sockets",
        "4096",
    ]);
    a3.wait_ready();
    let (_, stderr) = stop(a3);
    assert!(!stderr.contains("as pinned"), "{stderr:?}");
    let out = cleanup(&pin.arg());
    assert!(out.status.success(), "{out:?}");
}
