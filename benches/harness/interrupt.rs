//! Ctrl-C and SIGTERM. Guards do not run when a signal ends the process,
//! so a watcher thread undoes what would outlive it: the process goes back
//! to the cgroup it came from, the benchmark cgroup is removed, haproxy
//! processes are killed and their directory removed. (BPF programs and
//! links are file descriptors: they go away with the process.)
//!
//! `install` blocks the signals in the calling thread, so it must run
//! before any other thread is spawned: threads inherit the mask, and only
//! the watcher receives the signals (child processes get a clean mask from
//! `std::process::Command`).

use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};

#[derive(Default)]
struct Cleanup {
    /// The cgroup the process came from.
    home: Option<PathBuf>,
    /// The benchmark cgroups.
    cgroups: Vec<PathBuf>,
    children: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static STATE: Mutex<Option<Cleanup>> = Mutex::new(None);
static INSTALL: Once = Once::new();

fn with_state(f: impl FnOnce(&mut Cleanup)) {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Cleanup::default));
}

/// Starts the watcher (once per process).
pub fn install() -> Result<()> {
    let mut r = Ok(());
    INSTALL.call_once(|| {
        r = (|| -> Result<()> {
            let mut set = SigSet::empty();
            set.add(Signal::SIGINT);
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGHUP);
            set.thread_block()
                .context("blocking SIGINT/SIGTERM/SIGHUP")?;
            std::thread::Builder::new()
                .name("signal-watcher".into())
                .spawn(move || {
                    if let Ok(sig) = set.wait() {
                        clean_up(sig);
                    }
                })
                .context("spawning the signal watcher")?;
            Ok(())
        })();
    });
    r
}

/// Remembers a benchmark cgroup and where the process came from.
pub fn register_cgroup(home: PathBuf, cgroup: PathBuf) {
    with_state(|s| {
        s.home = Some(home);
        s.cgroups.push(cgroup);
    });
}

/// Remembers a child process (and its directory) to kill on a signal.
pub fn register_child(pid: u32, dir: PathBuf) {
    with_state(|s| {
        s.children.push(pid);
        if !s.dirs.contains(&dir) {
            s.dirs.push(dir);
        }
    });
}

/// Forgets children that were reaped.
pub fn forget_children(pids: &[u32]) {
    with_state(|s| s.children.retain(|p| !pids.contains(p)));
}

fn clean_up(sig: Signal) {
    eprintln!("\ninterrupted by {sig}: cleaning up");
    let state = STATE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    for pid in &state.children {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    for d in &state.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    if let Some(home) = &state.home {
        let _ = meshpath::cgroup::move_process(home, std::process::id());
    }
    for cg in &state.cgroups {
        let deadline = Instant::now() + Duration::from_secs(3);
        while std::fs::remove_dir(cg).is_err() && cg.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if cg.exists() {
            eprintln!("could not remove {}", cg.display());
        }
    }
    std::process::exit(130);
}
