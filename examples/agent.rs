//! The reference node agent.
//!
//! ```text
//! agent --cgroup DIR [--cgroup DIR2 ...] [--pin DIR] [options]
//! ```
//!
//! Loads the meshpath datapath, attaches it to every `--cgroup`, prints one
//! line containing `ready` on stdout, and runs until SIGINT or SIGTERM, when
//! it detaches and exits 0. Any error is one line on stderr
//! (`agent: error: ...`) and exit status 1; problems the load-time probe
//! found are `agent: warning: ...` lines on stderr.
//!
//! The command line is a contract other tools depend on: flag names are
//! stable, and new flags are added as new fields of [`Args`].

use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::error::ErrorKind;
use clap::{ColorChoice, Parser};
use meshpath::cgroup::{self, CgroupDir};
use meshpath::{AttachOptions, CgroupAttachment, Datapath, DatapathOptions, IpNet, PortSide};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

// The agent's command line.
//
// Flags planned for later (`--config FILE`, `--xdp IFACE`, `--node`,
// `--auth-listen`, `--peers`, `--cert`, `--key`, `--ca`,
// `--metrics ADDR:PORT`, `--flows[=json]`, `--cleanup`) are added here as
// fields; everything downstream reads this struct only.
#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "meshpath node agent: short-circuits same-host TCP for processes in the given cgroup v2 directories",
    long_about = None,
    override_usage = "agent --cgroup DIR [--cgroup DIR ...] [--pin DIR] [OPTIONS]",
    color = ColorChoice::Never
)]
struct Args {
    /// cgroup v2 directory to attach to (repeatable).
    #[arg(long = "cgroup", value_name = "DIR")]
    cgroups: Vec<PathBuf>,

    /// bpffs directory to pin the maps in, so a restarted agent adopts them.
    #[arg(long, value_name = "DIR")]
    pin: Option<PathBuf>,

    /// Keep connections to or from PORT on plain TCP (repeatable).
    #[arg(long = "bypass-port", value_name = "PORT", value_parser = parse_port)]
    bypass_ports: Vec<u16>,

    /// Addresses of workloads on this host in other network namespaces,
    /// as a CIDR (repeatable); loopback is always local.
    #[arg(long = "local-net", value_name = "CIDR", value_parser = parse_net)]
    local_nets: Vec<IpNet>,

    /// Capacity of the socket maps (two entries per connection).
    #[arg(
        long = "max-sockets",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(2..=16_777_216)
    )]
    max_sockets: Option<u32>,

    /// Attach, but enroll no socket: every connection stays on TCP.
    #[arg(long = "no-short-circuit")]
    no_short_circuit: bool,

    /// Allow attaching to the root of the cgroup v2 hierarchy (every
    /// process on the host).
    #[arg(long = "allow-root-cgroup")]
    allow_root_cgroup: bool,

    /// Print the datapath counters as one line every SECS seconds.
    #[arg(
        long = "stats-interval",
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    stats_interval: Option<u64>,
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) => Err("0 is not a port (use 1-65535)".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{s:?} is not a port number (use 1-65535)")),
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            // --help and --version go to stdout and succeed.
            let _ = say(e.render().to_string().trim_end());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("agent: error: {}; see agent --help", clap_one_line(&e));
            return ExitCode::from(1);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.cgroups.is_empty() {
        bail!("no cgroup given: pass --cgroup DIR (repeatable)");
    }
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!(
            "must run as root (effective uid is {euid}): loading eBPF programs needs \
             CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        );
    }

    // Block the signals we wait for before anything else can start a
    // thread, so that every thread inherits the mask and a signal arriving
    // at any point (even during load) is queued for the signalfd.
    let signals = shutdown_signals();
    signals
        .thread_block()
        .context("blocking SIGINT and SIGTERM")?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("creating a signalfd")?;

    let targets = validate_cgroups(args)?;
    let dp = load_datapath(args)?;
    configure(&dp, args)?;
    let attachments = attach(&dp, &targets, args)?;

    let names: Vec<String> = attachments
        .iter()
        .map(|a| a.cgroup().display().to_string())
        .collect();
    say(&format!(
        "agent: ready: attached to {} cgroup{}: {}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names.join(", ")
    ))
    .context("writing the ready line to stdout")?;

    let signal = wait_for_signal(&sigfd, &dp, args.stats_interval.map(Duration::from_secs))?;

    let n = attachments.len();
    for a in attachments {
        let path = a.cgroup().to_path_buf();
        if let Err(e) = a.detach() {
            eprintln!(
                "agent: warning: detaching from {}: {}",
                path.display(),
                one_line(&e.into())
            );
        }
    }
    let _ = say(&format!(
        "agent: {} received: detached from {n} cgroup{}, exiting",
        signal.as_str(),
        if n == 1 { "" } else { "s" }
    ));
    Ok(())
}

fn shutdown_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

/// Opens every `--cgroup` before anything is loaded, so that a bad path
/// fails fast and nothing is attached anywhere.
fn validate_cgroups(args: &Args) -> anyhow::Result<Vec<PathBuf>> {
    // Fails with "no cgroup v2 hierarchy is mounted" when there is none.
    let mount = cgroup::cgroup2_mount()?;
    let mut seen: Vec<(u64, PathBuf)> = Vec::new();
    let mut out = Vec::new();
    for path in &args.cgroups {
        let dir = CgroupDir::open(path)?;
        if dir.is_root() && !args.allow_root_cgroup {
            bail!(
                "cgroup {}: is the root of the cgroup v2 hierarchy (mounted at {}); attaching \
                 there affects every process on the host: pass --allow-root-cgroup to do so",
                path.display(),
                mount.display()
            );
        }
        if let Some((_, first)) = seen.iter().find(|(id, _)| *id == dir.id()) {
            warn(&format!(
                "cgroup {} is the same cgroup as {}: attaching once",
                path.display(),
                first.display()
            ));
            continue;
        }
        seen.push((dir.id(), path.clone()));
        out.push(path.clone());
    }
    // A cgroup inside another given one would run the programs twice.
    let canon: Vec<PathBuf> = out
        .iter()
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .collect();
    for (i, inner) in canon.iter().enumerate() {
        for (j, outer) in canon.iter().enumerate() {
            if i != j && inner.starts_with(outer) {
                warn(&format!(
                    "cgroup {} is inside {}: its sockets see both attachments",
                    out[i].display(),
                    out[j].display()
                ));
            }
        }
    }
    Ok(out)
}

fn load_datapath(args: &Args) -> anyhow::Result<Datapath> {
    let mut opts = DatapathOptions::default();
    if let Some(dir) = &args.pin {
        opts = opts.pin_dir(dir);
    }
    if let Some(n) = args.max_sockets {
        opts = opts.max_sockets(n);
    }
    if args.no_short_circuit {
        opts = opts.short_circuit(false);
    }
    let dp = Datapath::load(&opts).context("loading the datapath")?;
    for problem in dp.quirks().problems() {
        warn(&problem);
    }
    Ok(dp)
}

fn configure(dp: &Datapath, args: &Args) -> anyhow::Result<()> {
    for &port in &args.bypass_ports {
        dp.bypass_port(port, PortSide::Both)?;
    }
    for &net in &args.local_nets {
        dp.add_local_net(net)?;
    }
    Ok(())
}

fn attach(
    dp: &Datapath,
    targets: &[PathBuf],
    args: &Args,
) -> anyhow::Result<Vec<CgroupAttachment>> {
    let opts = AttachOptions::default().allow_root(args.allow_root_cgroup);
    // On error the attachments made so far are dropped, i.e. detached.
    targets
        .iter()
        .map(|p| dp.attach_cgroup_with(p, &opts).map_err(Into::into))
        .collect()
}

/// Waits for SIGINT or SIGTERM, printing the counters every `interval`.
fn wait_for_signal(
    sigfd: &SignalFd,
    dp: &Datapath,
    interval: Option<Duration>,
) -> anyhow::Result<Signal> {
    let mut next_stats = interval.map(|i| Instant::now() + i);
    loop {
        let timeout = match next_stats {
            None => PollTimeout::NONE,
            Some(at) => {
                let ms = at
                    .saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000)
                    .min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => {}
            Ok(_) => {
                if let Some(info) = sigfd.read_signal().context("reading the signalfd")? {
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                    return Signal::try_from(signo)
                        .with_context(|| format!("unexpected signal number {signo}"));
                }
            }
            Err(e) => return Err(e).context("waiting for SIGINT or SIGTERM"),
        }
        if let (Some(at), Some(every)) = (next_stats, interval) {
            let now = Instant::now();
            if now >= at {
                print_stats(dp);
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

fn print_stats(dp: &Datapath) {
    match dp.counters() {
        Ok(c) => {
            let mut line = format!("agent: counters: sockets_tracked={}", c.sockets_tracked());
            for (name, v) in c.iter() {
                let _ = write!(line, " {name}={v}");
            }
            let _ = say(&line);
        }
        Err(e) => warn(&format!("reading counters: {}", one_line(&e.into()))),
    }
}

/// One line on stdout, flushed at once (stdout is a pipe under supervisors).
fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

fn warn(msg: &str) {
    eprintln!("agent: warning: {}", flatten(msg));
}

/// An error and its causes as one line: `outer: cause: root cause`,
/// skipping causes the outer messages already quote.
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let msg = flatten(&cause.to_string());
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// Multi-line text (a verifier log, say) folded onto one line.
fn flatten(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// clap's error without its usage block and tips: the first line, less
/// the `error: ` prefix.
fn clap_one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("invalid command line");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // "the following required arguments were not provided:" lists them on
    // the next lines; keep the list.
    if first.ends_with(':') {
        let rest: Vec<&str> = text
            .lines()
            .skip_while(|l| l.trim() != first && !l.contains(first))
            .skip(1)
            .map(str::trim)
            .take_while(|l| !l.is_empty())
            .collect();
        return format!("{first} {}", rest.join(" "));
    }
    first.to_string()
}
