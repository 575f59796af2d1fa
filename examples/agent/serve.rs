//! The main loop: signals (SIGHUP reloads, SIGINT/SIGTERM stop), the
//! periodic sweep and the `--stats-interval` counters line.

use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use meshpath::Datapath;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;

use crate::auth::AuthService;
use crate::cli::Args;
use crate::observe::Observability;
use crate::output::{one_line, say, warn};
use crate::policy::reload;
use crate::setup::sweep;

/// How often stale socket-index entries are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// How often the agent checks that its programs are still attached (and,
/// with --pin, that its pins are still there).
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Runs until SIGINT or SIGTERM (returned): reloads the config on SIGHUP,
/// sweeps stale index entries every [`SWEEP_INTERVAL`], prints the
/// counters every `--stats-interval`, and runs `check` (attachments and
/// pins) every [`CHECK_INTERVAL`].
///
/// Nothing in the loop waits on a reader or a file without a bound:
/// output is queued (`output`), files are read with a size limit and a
/// timeout (`files`).
pub(crate) fn serve(
    sigfd: &SignalFd,
    dp: &Datapath,
    args: &Args,
    auth: Option<&AuthService>,
    observe: &Observability,
    check: &mut dyn FnMut(),
) -> anyhow::Result<Signal> {
    let stats_every = args.stats_interval.map(Duration::from_secs);
    let mut next_stats = stats_every.map(|i| Instant::now() + i);
    let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
    let mut next_check = Instant::now() + CHECK_INTERVAL;
    loop {
        let wake = next_stats
            .map_or(next_sweep, |s| s.min(next_sweep))
            .min(next_check);
        let ms = wake
            .saturating_duration_since(Instant::now())
            .as_micros()
            .div_ceil(1000)
            .min(i32::MAX as u128) as i32;
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => {}
            Ok(_) => {
                // Drain every queued signal: a SIGTERM behind a SIGHUP
                // still stops the agent.
                while let Some(info) = sigfd.read_signal().context("reading the signalfd")? {
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                    let sig = Signal::try_from(signo)
                        .with_context(|| format!("unexpected signal number {signo}"))?;
                    if sig == Signal::SIGHUP {
                        reload(dp, args);
                        // After the config: identities gone from it lose
                        // their auth entries.
                        if let Some(a) = auth {
                            a.reload();
                        }
                    } else {
                        return Ok(sig);
                    }
                }
            }
            Err(e) => return Err(e).context("waiting for signals"),
        }
        let now = Instant::now();
        if now >= next_check {
            check();
            next_check = now + CHECK_INTERVAL;
        }
        if now >= next_sweep {
            sweep(dp);
            next_sweep = now + SWEEP_INTERVAL;
        }
        if let (Some(at), Some(every)) = (next_stats, stats_every) {
            if now >= at {
                print_stats(dp, observe);
                // Skip ticks missed while suspended rather than bursting.
                next_stats = Some(if at + every > now {
                    at + every
                } else {
                    now + every
                });
            }
        }
    }
}

fn print_stats(dp: &Datapath, observe: &Observability) {
    match dp.counters() {
        Ok(c) => {
            // iter() starts with the derived sockets_tracked.
            let mut line = String::from("agent: counters:");
            for (name, v) in c.iter() {
                let _ = write!(line, " {name}={v}");
            }
            // The agent's own, after the datapath's.
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let agent = observe.agent_stats();
            let _ = write!(
                line,
                " agent_reattach={} flows_stdout_dropped={}",
                load(&agent.reattached),
                load(&observe.flow_stats().stdout_dropped)
            );
            let _ = say(&line);
        }
        Err(e) => warn(&format!("reading counters: {}", one_line(&e.into()))),
    }
}
