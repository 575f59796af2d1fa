//! The reference node agent.
//!
//! ```text
//! agent --cgroup DIR [--cgroup DIR2 ...] [--pin DIR] [--config FILE.json] [--xdp IFACE ...] [options]
//! ```
//!
//! Loads the meshpath datapath, applies the policy of `--config` (if any),
//! attaches to every `--cgroup` (and its XDP program to every `--xdp`
//! interface), prints one line containing `ready` on
//! stdout, and runs until SIGINT or SIGTERM, when it detaches and exits 0.
//! Any error is one line on stderr (`agent: error: ...`) and exit status 1;
//! problems the load-time probe found are `agent: warning: ...` lines on
//! stderr.
//!
//! # Policy
//!
//! Without `--config` there is no policy: everything passes. With it, the
//! agent enforces the JSON file's identity policy:
//!
//! ```json
//! {
//!   "default_action": "deny",
//!   "endpoints": [ {"ip": "127.0.0.2", "identity": "spiffe://mesh.local/ns/shop/sa/frontend"},
//!                  {"ip": "198.18.0.0/16", "identity": "spiffe://mesh.local/ns/db/sa/postgres"} ],
//!   "policies": [ {"from": "spiffe://mesh.local/ns/shop/sa/frontend",
//!                  "to": "spiffe://mesh.local/ns/db/sa/postgres",
//!                  "protocol": "tcp", "ports": [5432], "action": "allow"} ]
//! }
//! ```
//!
//! `default_action` (`allow` or `deny`) is required; `endpoints` and
//! `policies` may be left out (empty). An endpoint needs `ip` (an address
//! or CIDR) and `identity` (a SPIFFE ID, `host` or `world`). A rule needs
//! `from` and `to` (a SPIFFE ID, `*`, `host` or `world`), `protocol`
//! (`tcp`, `udp`, `icmp` or `any`) and `action` (`allow`, `deny`, `audit`
//! or `auth`); `ports` (1-65535) may be left out or empty: any port. Any
//! other key is an error.
//!
//! On SIGHUP the agent re-reads the file and applies the difference
//! atomically; established flows the new policy denies are reset (also in
//! every `--policy-reset-netns`). After each successful (re)load it prints
//! `agent: policy applied: generation N, E endpoints, R rules
//! (+written/-removed entries), F flows reset` on stdout. A file that does
//! not parse or validate is one `agent: error: config FILE: ...` line on
//! stderr naming the field (e.g. `invalid policies[0].ports[1]: ...`): at
//! startup the agent exits 1, on SIGHUP it keeps running and the policy in
//! force stays exactly as it was.
//!
//! The command line is a contract other tools depend on: flag names are
//! stable, and new flags are added as new fields of [`Args`].

use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::error::ErrorKind;
use clap::{ColorChoice, Parser};
use meshpath::cgroup::{self, CgroupDir};
use meshpath::policy::{
    Action, DefaultAction, Endpoint, Identity, Peer, PolicyChange, PolicyState, Protocol, Rule,
};
use meshpath::{
    AttachOptions, CgroupAttachment, Datapath, DatapathOptions, IpNet, PortSide, XdpAttachment,
    XdpMode,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// How often stale socket-index entries are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

// The agent's command line.
//
// Flags planned for later (`--node`,
// `--auth-listen`, `--peers`, `--cert`, `--key`, `--ca`,
// `--metrics ADDR:PORT`, `--flows[=json]`, `--cleanup`) are added here as
// fields; everything downstream reads this struct only.
#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "meshpath node agent: short-circuits same-host TCP for processes in the given cgroup v2 directories",
    long_about = None,
    override_usage = "agent --cgroup DIR [--cgroup DIR ...] [--pin DIR] [--config FILE.json] [--xdp IFACE ...] [OPTIONS]",
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

    /// Identity policy to enforce (JSON; re-read on SIGHUP). Without it
    /// everything is allowed.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// After every policy (re)load also reset the flows it denies in the
    /// network namespace at PATH, e.g. /run/netns/NAME (repeatable).
    #[arg(long = "policy-reset-netns", value_name = "PATH", requires = "config")]
    policy_reset_netns: Vec<PathBuf>,

    /// Also judge every packet network interface IFACE receives, in XDP,
    /// by the policy (repeatable).
    #[arg(long = "xdp", value_name = "IFACE")]
    xdp: Vec<String>,

    /// How to attach --xdp: auto (native where the driver supports it,
    /// generic otherwise), native or generic.
    #[arg(
        long = "xdp-mode",
        value_name = "MODE",
        default_value = "auto",
        value_parser = parse_xdp_mode,
        requires = "xdp"
    )]
    xdp_mode: XdpMode,
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) => Err("0 is not a port (use 1-65535)".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{s:?} is not a port number (use 1-65535)")),
    }
}

fn parse_xdp_mode(s: &str) -> Result<XdpMode, String> {
    match s {
        "auto" => Ok(XdpMode::Auto),
        "native" => Ok(XdpMode::Native),
        "generic" => Ok(XdpMode::Generic),
        _ => Err(format!("{s:?} is not one of auto, native, generic")),
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
    let signals = handled_signals();
    signals
        .thread_block()
        .context("blocking SIGINT, SIGTERM and SIGHUP")?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("creating a signalfd")?;

    let targets = validate_cgroups(args)?;
    // A config that does not parse or validate fails before anything is
    // loaded.
    let state = args.config.as_deref().map(load_config).transpose()?;
    for ns in &args.policy_reset_netns {
        std::fs::File::open(ns)
            .with_context(|| format!("--policy-reset-netns {}", ns.display()))?;
    }
    let dp = load_datapath(args)?;
    configure(&dp, args)?;
    // The policy is in force before any cgroup is attached: no workload
    // runs unchecked for a moment.
    match (&args.config, state) {
        (Some(path), Some(state)) => apply_policy(&dp, path, &state, args, true)?,
        _ => {
            // No policy; a datapath adopted from --pin may still hold one.
            dp.disable_policy().context("turning policy off")?;
        }
    }
    let attachments = attach(&dp, &targets, args)?;
    // Kept alive like the cgroup attachments: dropping one detaches it.
    let xdp = attach_xdp(&dp, args)?;

    let names: Vec<String> = attachments
        .iter()
        .map(|a| a.cgroup().display().to_string())
        .collect();
    let mut ready = format!(
        "agent: ready: attached to {} cgroup{}: {}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names.join(", ")
    );
    if !xdp.is_empty() {
        let ifaces: Vec<String> = xdp
            .iter()
            .map(|x| format!("{} ({})", x.interface(), x.mode()))
            .collect();
        let _ = write!(ready, "; xdp on {}", ifaces.join(", "));
    }
    say(&ready).context("writing the ready line to stdout")?;

    let signal = serve(&sigfd, &dp, args)?;

    for x in xdp {
        let iface = x.interface().to_string();
        if let Err(e) = x.detach() {
            warn(&format!(
                "detaching XDP from {iface}: {}",
                one_line(&e.into())
            ));
        }
    }
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
    // Sockets of a detached cgroup get no close callback: drop their
    // index entries now.
    sweep(&dp);
    let _ = say(&format!(
        "agent: {} received: detached from {n} cgroup{}, exiting",
        signal.as_str(),
        if n == 1 { "" } else { "s" }
    ));
    Ok(())
}

fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
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

/// Attaches the XDP program to every `--xdp` interface (once each). On
/// error the attachments made so far are dropped, i.e. detached.
fn attach_xdp(dp: &Datapath, args: &Args) -> anyhow::Result<Vec<XdpAttachment>> {
    let mut out: Vec<XdpAttachment> = Vec::new();
    for iface in &args.xdp {
        if out.iter().any(|x| x.interface() == iface) {
            warn(&format!("--xdp {iface} given twice: attaching once"));
            continue;
        }
        let x = dp
            .attach_xdp(iface, args.xdp_mode)
            .with_context(|| format!("--xdp {iface} ({} mode)", args.xdp_mode))?;
        out.push(x);
    }
    Ok(out)
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

/// Runs until SIGINT or SIGTERM (returned): reloads the config on SIGHUP,
/// sweeps stale index entries every [`SWEEP_INTERVAL`] and prints the
/// counters every `--stats-interval`.
fn serve(sigfd: &SignalFd, dp: &Datapath, args: &Args) -> anyhow::Result<Signal> {
    let stats_every = args.stats_interval.map(Duration::from_secs);
    let mut next_stats = stats_every.map(|i| Instant::now() + i);
    let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
    loop {
        let wake = next_stats.map_or(next_sweep, |s| s.min(next_sweep));
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
                    } else {
                        return Ok(sig);
                    }
                }
            }
            Err(e) => return Err(e).context("waiting for signals"),
        }
        let now = Instant::now();
        if now >= next_sweep {
            sweep(dp);
            next_sweep = now + SWEEP_INTERVAL;
        }
        if let (Some(at), Some(every)) = (next_stats, stats_every) {
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

/// SIGHUP: re-reads `--config` and applies it. Every failure is one
/// `agent: error:` line and leaves the policy in force as it was.
fn reload(dp: &Datapath, args: &Args) {
    let Some(path) = &args.config else {
        warn("SIGHUP received without --config: there is no policy to reload");
        return;
    };
    let result = load_config(path).and_then(|state| apply_policy(dp, path, &state, args, false));
    if let Err(e) = result {
        eprintln!("agent: error: {}", one_line(&e));
    }
}

/// Removes stale socket-index entries; a failure is a warning.
fn sweep(dp: &Datapath) {
    if let Err(e) = dp.sweep_stale() {
        warn(&format!(
            "sweeping stale socket entries: {}",
            one_line(&e.into())
        ));
    }
}

// ---------------------------------------------------------------------------
// The policy config.

/// The config file as written. Every struct refuses unknown keys, so a
/// misspelt key is an error naming it rather than silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_action: String,
    #[serde(default)]
    endpoints: Vec<ConfigEndpoint>,
    #[serde(default)]
    policies: Vec<ConfigRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigEndpoint {
    ip: String,
    identity: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigRule {
    from: String,
    to: String,
    protocol: String,
    #[serde(default)]
    ports: Vec<ConfigPort>,
    action: String,
}

/// A port as written: any JSON integer 0-65535 (0 is refused, naming the
/// field, by the library's validation); anything else is an error here.
#[derive(Debug, Clone, Copy)]
struct ConfigPort(u16);

impl<'de> Deserialize<'de> for ConfigPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = ConfigPort;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port number (1-65535)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ConfigPort, E> {
                u16::try_from(v)
                    .map(ConfigPort)
                    .map_err(|_| E::custom(format!("{v} is not a port (ports are 1-65535)")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ConfigPort, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a port (ports are 1-65535)")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ConfigPort, E> {
                Err(E::custom(format!(
                    "{v} is not a port (ports are integers 1-65535)"
                )))
            }
        }
        d.deserialize_any(PortVisitor)
    }
}

/// Reads, parses and validates the config file. Errors are
/// `config FILE: ...` naming the field (and, for JSON errors, the line and
/// column).
fn load_config(path: &Path) -> anyhow::Result<PolicyState> {
    let ctx = || format!("config {}", path.display());
    let text = std::fs::read_to_string(path)
        .context("cannot read it")
        .with_context(ctx)?;
    let file = parse_config(&text).with_context(ctx)?;
    build_state(file).with_context(ctx)
}

fn parse_config(text: &str) -> anyhow::Result<ConfigFile> {
    let mut de = serde_json::Deserializer::from_str(text);
    let file: ConfigFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path: Vec<String> = e.path().iter().map(ToString::to_string).collect();
        json_error(text, &path, e.into_inner())
    })?;
    // Nothing but whitespace may follow the object.
    de.end().map_err(|e| json_error(text, &[], e))?;
    Ok(file)
}

/// A serde_json error as one line naming the field (`invalid
/// policies[0].ports[0]: ...`) where it is known; serde_json appends
/// `at line L column C`.
fn json_error(text: &str, path: &[String], e: serde_json::Error) -> anyhow::Error {
    use serde_json::error::Category;
    let raw = e.to_string();
    if matches!(
        e.classify(),
        Category::Syntax | Category::Eof | Category::Io
    ) {
        return anyhow::anyhow!("not valid JSON: {raw}");
    }
    if !text.trim_start().starts_with('{') {
        return anyhow::anyhow!(
            "the config must be a JSON object {{\"default_action\": ..., \"endpoints\": [...], \
             \"policies\": [...]}}"
        );
    }
    let join = |segs: &[String]| {
        segs.iter().fold(String::new(), |mut out, s| {
            if !out.is_empty() && !s.starts_with('[') {
                out.push('.');
            }
            out.push_str(s);
            out
        })
    };
    // serde quotes names and values in backticks.
    let quoted = |s: &str| s.replace('`', "\"");
    if let Some(rest) = raw.strip_prefix("missing field `") {
        // `missing field `action` at line ..`: name the key in full.
        if let Some((name, tail)) = rest.split_once('`') {
            let mut full = path.to_vec();
            full.push(name.to_string());
            return anyhow::anyhow!(
                "invalid {}: the key is missing (it is required){tail}",
                join(&full)
            );
        }
    }
    if raw.starts_with("unknown field `") || raw.starts_with("duplicate field `") {
        // The path ends with the offending key itself; say where it is.
        let parent = match path.split_last() {
            Some((last, parent)) if raw.contains(&format!("`{last}`")) => parent,
            _ => path,
        };
        return if parent.is_empty() {
            anyhow::anyhow!("{}", quoted(&raw))
        } else {
            anyhow::anyhow!("invalid {}: {}", join(parent), quoted(&raw))
        };
    }
    let msg = raw.replace('`', "");
    if path.is_empty() {
        anyhow::anyhow!("{msg}")
    } else {
        anyhow::anyhow!("invalid {}: {msg}", join(path))
    }
}

/// The library's state from the file's strings. Each string is parsed on
/// its own so that an error names its field (`endpoints[1].ip`,
/// `policies[0].from`, ...); the whole state is then validated by the
/// library, whose errors name fields the same way.
fn build_state(file: ConfigFile) -> anyhow::Result<PolicyState> {
    let default_action: DefaultAction = file
        .default_action
        .parse()
        .map_err(|e| at("default_action", e))?;
    let mut endpoints = Vec::with_capacity(file.endpoints.len());
    for (i, e) in file.endpoints.iter().enumerate() {
        let ip: IpNet =
            e.ip.parse()
                .map_err(|err| at(&format!("endpoints[{i}].ip"), err))?;
        let identity: Identity = e
            .identity
            .parse()
            .map_err(|err| at(&format!("endpoints[{i}].identity"), err))?;
        endpoints.push(Endpoint { ip, identity, node: None });
    }
    let mut policies = Vec::with_capacity(file.policies.len());
    for (i, r) in file.policies.iter().enumerate() {
        let peer = |s: &str, side: &str| -> anyhow::Result<Peer> {
            s.parse().map_err(|err| {
                let e = at(&format!("policies[{i}].{side}"), err);
                anyhow::anyhow!("{e:#} ({side} is a SPIFFE ID, \"*\", \"host\" or \"world\")")
            })
        };
        let from = peer(&r.from, "from")?;
        let to = peer(&r.to, "to")?;
        let protocol: Protocol = r
            .protocol
            .parse()
            .map_err(|err| at(&format!("policies[{i}].protocol"), err))?;
        let action: Action = r
            .action
            .parse()
            .map_err(|err| at(&format!("policies[{i}].action"), err))?;
        policies.push(Rule {
            from,
            to,
            protocol,
            ports: r.ports.iter().map(|p| p.0).collect(),
            action,
        });
    }
    let state = PolicyState {
        default_action,
        endpoints,
        policies,
    };
    // Errors name the field: `invalid policies[0].ports[1]: ...`.
    state.validate()?;
    Ok(state)
}

/// A library parse error re-aimed at the config field `path`: the
/// library names what it parsed (`SPIFFE ID`, `CIDR`, ...), the config
/// user needs the key.
fn at(path: &str, e: meshpath::Error) -> anyhow::Error {
    match e {
        meshpath::Error::Invalid { field, reason } => {
            let what = match field.as_str() {
                // The reason alone does not say what was expected.
                "SPIFFE ID" | "CIDR prefix length" => format!("{field} "),
                _ => String::new(),
            };
            anyhow::anyhow!("invalid {path}: {what}{reason}")
        }
        other => anyhow::Error::new(other).context(format!("invalid {path}")),
    }
}

/// Applies `state`, resets the flows it denies in every
/// `--policy-reset-netns`, and prints the `policy applied` line. At
/// startup a failed namespace reset is an error; on reload a warning (the
/// policy is in force either way).
fn apply_policy(
    dp: &Datapath,
    path: &Path,
    state: &PolicyState,
    args: &Args,
    startup: bool,
) -> anyhow::Result<()> {
    let change: PolicyChange = match dp.replace_policy(state) {
        Ok(c) => c,
        Err(e) if dp.policy().as_ref() == Some(state) => {
            // The switch happened; resetting the denied flows failed.
            return Err(anyhow::Error::new(e).context(format!(
                "config {}: the policy is applied, but resetting the flows it denies failed",
                path.display()
            )));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "config {}: applying it (the policy in force is unchanged)",
                path.display()
            )))
        }
    };
    let mut reset = change.flows_reset;
    for ns in &args.policy_reset_netns {
        match dp.reset_denied_flows_in(ns) {
            Ok(n) => reset += n,
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!(
                    "--policy-reset-netns {}: resetting denied flows",
                    ns.display()
                ));
                if startup {
                    return Err(e);
                }
                warn(&one_line(&e));
            }
        }
    }
    say(&format!(
        "agent: policy applied: generation {}, {} endpoints, {} rules (+{}/-{} entries), {} flows reset",
        change.generation,
        state.endpoints.len(),
        state.policies.len(),
        change.endpoints_written + change.rules_written,
        change.endpoints_removed + change.rules_removed,
        reset
    ))
    .context("writing to stdout")
}

fn print_stats(dp: &Datapath) {
    match dp.counters() {
        Ok(c) => {
            // iter() starts with the derived sockets_tracked.
            let mut line = String::from("agent: counters:");
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
