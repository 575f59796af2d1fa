//! CPU pinning, CPU-time accounting and a description of the machine.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::resource::{getrusage, UsageWho};
use nix::unistd::Pid;

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// The first two CPUs this process may run on: (client side, server side).
pub fn two_cpus() -> Result<(usize, usize)> {
    let cpus = allowed_cpus()?;
    if cpus.len() < 2 {
        bail!(
            "the benchmark needs two CPUs (it pins the two ends of a connection to different \
             cores); this process may only run on {cpus:?}"
        );
    }
    Ok((cpus[0], cpus[1]))
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} out of range"))?;
    sched_setaffinity(Pid::from_raw(0), &set)
        .with_context(|| format!("pinning a thread to CPU {cpu}"))
}

/// Lets the calling thread run on any of `cpus` (threads inherit the
/// affinity of the thread that spawned them).
pub fn unpin(cpus: &[usize]) -> Result<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)
            .with_context(|| format!("CPU {c} out of range"))?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).context("unpinning a thread")
}

/// Lets thread (or single-threaded process) `tid` run on `cpus` only.
pub fn set_affinity(tid: Pid, cpus: &[usize]) -> Result<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)
            .with_context(|| format!("CPU {c} out of range"))?;
    }
    sched_setaffinity(tid, &set).with_context(|| format!("sched_setaffinity({tid}, {cpus:?})"))
}

/// User + system CPU time of the whole process so far.
pub fn cpu_time() -> Result<Duration> {
    let u = getrusage(UsageWho::RUSAGE_SELF).context("getrusage(RUSAGE_SELF)")?;
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    Ok(tv(u.user_time()) + tv(u.system_time()))
}

/// The machine: kernel, CPU model, CPU count.
#[derive(Debug, Clone)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
    pub loadavg: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let kernel = match nix::sys::utsname::uname() {
            Ok(u) => format!(
                "{} {} {} ({})",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy(),
                u.machine().to_string_lossy(),
                u.version().to_string_lossy()
            ),
            Err(e) => format!("unknown (uname: {e})"),
        };
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        Machine {
            kernel,
            cpu_model,
            nproc,
            loadavg: loadavg(),
        }
    }
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
