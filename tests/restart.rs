//! The agent can be restarted at any moment (`agent --pin DIR`): killed
//! with SIGKILL mid-transfer, the datapath keeps short-circuiting and
//! enforcing with no agent at all; the next agent adopts it with no gap in
//! enforcement; SIGTERM leaves it pinned; `--cleanup` removes everything.
//! Pins removed from under a running agent are reported and restored; a
//! pin of an incompatible layout is refused. Root only (fails otherwise).

mod common;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::agent::*;
use common::{read_pattern, write_pattern, PinDir};
use nix::sys::signal::Signal;

/// The cgroup the test process runs in (children are moved back there
/// when spawned while the process is inside the test cgroup).
fn home_cgroup() -> PathBuf {
    meshpath::cgroup::current_cgroup().expect("the test's own cgroup")
}

/// Starts an agent whose process leaves the test cgroup before exec, even
/// when the test process is inside it (probing during a restart).
fn spawn_outside(args: &[String], home: &Path) -> Agent {
    let procs = home.join("cgroup.procs");
    Agent::spawn_with(agent_bin(), args, move |cmd: &mut Command| {
        let procs = procs.clone();
        // SAFETY: the closure only writes to a file between fork and exec
        // (open/write/close are async-signal-safe syscalls here).
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
    })
}

fn agent_args(w: &PolicyWorld, pin: &PinDir) -> Vec<String> {
    vec![
        "--cgroup".into(),
        w.cg.path().to_string_lossy().into_owned(),
        "--config".into(),
        w.config.to_string_lossy().into_owned(),
        "--pin".into(),
        pin.arg(),
    ]
}

/// Connects from frontend (allowed) and from an address no endpoint has
/// (denied), over and over, until `stop`; the process must be inside the
/// test cgroup. Returns how many of each.
fn probe(w: &PolicyWorld, stop: &AtomicBool) -> (u64, u64) {
    let (mut allowed, mut denied) = (0u64, 0u64);
    let mut i = 0u8;
    while !stop.load(Ordering::Relaxed) {
        let mut c = connect_from("127.0.0.2", w.db_addr)
            .unwrap_or_else(|e| panic!("allowed connect #{allowed} failed: {e}"));
        let mut s = w.accept();
        i = i.wrapping_add(1);
        c.write_all(&[i; 64]).unwrap();
        let mut b = [0u8; 64];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b, [i; 64]);
        allowed += 1;
        let r = connect_from("127.0.0.4", w.db_addr);
        assert!(
            is_eperm(&r),
            "denied connect #{denied} got through: {}",
            describe(&r)
        );
        denied += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    (allowed, denied)
}

fn wait_exit_ok(agent: &mut Agent) -> String {
    let status = agent.wait_exit(EXIT_TIMEOUT);
    let stderr = agent.stderr_text();
    assert_eq!(status.code(), Some(0), "{status}; stderr: {stderr:?}");
    stderr
}

#[test]
fn a_killed_agent_leaves_the_datapath_working_and_the_next_one_adopts_it() {
    let _serial = setup();
    let home = home_cgroup();
    let w = PolicyWorld::new();
    let pin = PinDir::new("kill9");
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let args = agent_args(&w, &pin);
    let mut a1 = spawn_outside(&args, &home);
    a1.wait_ready();
    assert!(pin
        .entries()
        .iter()
        .any(|e| e.starts_with("meshpath_link_cg")));

    // A short-circuited connection streaming while the agent dies.
    let (mut c, mut s) = w.assert_allowed("127.0.0.2", "agent 1");
    let before = (tcp_bytes_received(&c), tcp_bytes_received(&s));
    let total = 256 << 20;
    let (wh, rh) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_pattern(&mut c, 42, total, 64 * 1024));
        let reader = scope.spawn(|| read_pattern(&mut s, 42, total));
        std::thread::sleep(Duration::from_millis(50));
        a1.signal(Signal::SIGKILL);
        let _ = a1.wait_exit(EXIT_TIMEOUT);
        (writer.join().unwrap(), reader.join().unwrap())
    });
    assert_eq!(wh, rh, "every byte of the stream across the kill");
    assert_eq!(
        (tcp_bytes_received(&c), tcp_bytes_received(&s)),
        before,
        "the stream stayed on the short-circuit"
    );

    // No agent: new connections are still judged and short-circuited.
    let (mut c2, mut s2) = w.assert_allowed("127.0.0.2", "no agent");
    assert_eq!(exchange(&mut c2, &mut s2), (0, 0), "short-circuited");
    w.assert_denied("127.0.0.4", "no agent");

    // A new agent adopts it while connections keep being made: every
    // allowed one works, no denied one gets through.
    let inside = w.cg.enter().expect("entering the test cgroup");
    let stop = AtomicBool::new(false);
    let (mut a2, (allowed, denied)) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| probe(&w, &stop));
        std::thread::sleep(Duration::from_millis(100));
        let mut a2 = spawn_outside(&args, &home);
        a2.wait_ready();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (
            a2,
            prober.join().expect("the prober saw a bypass or a failure"),
        )
    });
    drop(inside);
    assert!(allowed >= 10 && denied >= 10, "{allowed} {denied}");
    assert!(
        a2.seen
            .iter()
            .any(|l| l.contains("adopted the datapath pinned in")),
        "{:?}",
        a2.seen
    );
    // The old connection still works, on the short-circuit.
    assert_eq!(exchange(&mut c, &mut s), before);

    // SIGTERM leaves it pinned and enforcing.
    a2.signal(Signal::SIGTERM);
    wait_exit_ok(&mut a2);
    assert!(
        a2.stdout_lines()
            .iter()
            .any(|l| l.contains("stays attached") && l.contains(&pin.arg())),
        "{:?}",
        a2.seen
    );
    w.assert_denied("127.0.0.4", "after SIGTERM");

    // --cleanup removes everything: nothing judges the cgroup any more.
    let out = Command::new(agent_bin())
        .args([
            "--cgroup",
            &w.cg.path().to_string_lossy(),
            "--pin",
            &pin.arg(),
            "--cleanup",
        ])
        .output()
        .expect("running agent --cleanup");
    assert!(out.status.success(), "{:?}", out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("detached and unpinned"),
        "{out:?}"
    );
    assert!(!pin.0.exists(), "pin directory left: {:?}", pin.entries());
    let (mut c3, mut s3) = {
        let r = w.connect("127.0.0.4");
        (r.expect("nothing attached: world connects"), w.accept())
    };
    let (tc, ts) = exchange(&mut c3, &mut s3);
    assert!(tc > 0 && ts > 0, "plain TCP after cleanup");
    // The old connection outlives it all.
    let _ = exchange(&mut c, &mut s);
}

#[test]
fn pins_removed_under_a_running_agent_are_reported_and_restored() {
    let _serial = setup();
    let home = home_cgroup();
    let w = PolicyWorld::new();
    let pin = PinDir::new("rmpins");
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let args = agent_args(&w, &pin);
    let mut a1 = spawn_outside(&args, &home);
    a1.wait_ready();
    let pinned = pin.entries();
    assert!(pinned.len() > 10, "{pinned:?}");
    let (mut c, mut s) = w.assert_allowed("127.0.0.2", "before");
    let started = Instant::now();
    for e in &pinned {
        std::fs::remove_file(pin.0.join(e)).unwrap();
    }
    let line = loop {
        let left = Duration::from_secs(5).saturating_sub(started.elapsed());
        let l = a1
            .stderr_lines
            .recv_timeout(left)
            .expect("a warning about the removed pins within 5 s");
        if l.contains("pins removed from under the agent") {
            break l;
        }
    };
    assert!(line.contains("pinned again"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(pin.entries(), pinned, "every pin is back");
    // Nothing was lost meanwhile.
    assert_eq!(exchange(&mut c, &mut s), (0, 0));
    w.assert_denied("127.0.0.4", "after the pins came back");
    // Restored pins are adoptable: kill the agent, the next one adopts.
    a1.signal(Signal::SIGKILL);
    let _ = a1.wait_exit(EXIT_TIMEOUT);
    w.assert_denied("127.0.0.4", "no agent");
    let mut a2 = spawn_outside(&args, &home);
    a2.wait_ready();
    assert!(a2.seen.iter().any(|l| l.contains("adopted the datapath")));
    assert_eq!(exchange(&mut c, &mut s), (0, 0));
    a2.signal(Signal::SIGTERM);
    wait_exit_ok(&mut a2);
    let out = Command::new(agent_bin())
        .args(["--pin", &pin.arg(), "--cleanup"])
        .output()
        .expect("running agent --cleanup");
    assert!(out.status.success(), "{out:?}");
    assert!(!pin.0.exists());
}

#[test]
fn a_pin_of_an_incompatible_layout_is_refused_and_left_alone() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let pin = PinDir::new("badlayout");
    std::fs::create_dir_all(&pin.0).unwrap();
    // meshpath_settings as an ARRAY of 8-byte values: not this layout.
    // SAFETY: plain syscall wrappers; null options are allowed.
    let fd = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_ARRAY,
            std::ptr::null(),
            4,
            8,
            1,
            std::ptr::null(),
        )
    };
    assert!(fd >= 0, "bpf_map_create: {fd}");
    let path = pin.0.join("meshpath_settings");
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a live map fd and a valid C string.
    assert_eq!(unsafe { libbpf_sys::bpf_obj_pin(fd, c.as_ptr()) }, 0);
    // SAFETY: closing the fd we created (the pin keeps the map).
    unsafe { libc::close(fd) };
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let f = run_failing(&[
        "--cgroup",
        &w.cg.path().to_string_lossy(),
        "--pin",
        &pin.arg(),
        "--config",
        &w.config.to_string_lossy(),
    ]);
    let line = f.one_line_error();
    assert!(
        line.contains("meshpath_settings") && line.contains("incompatible"),
        "{line}"
    );
    // Nothing attached, the foreign pin untouched.
    let r = w.connect("127.0.0.4");
    assert!(r.is_ok(), "nothing judges the cgroup: {}", describe(&r));
    assert_eq!(pin.entries(), vec!["meshpath_settings".to_string()]);
}
