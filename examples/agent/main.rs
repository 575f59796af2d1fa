//! The reference node agent.
//!
//! ```text
//! agent --cgroup DIR [--cgroup DIR2 ...] [--pin DIR] [--config FILE.json] [--xdp IFACE ...]
//!       [--flows[=json]] [--flow-socket [PATH]] [--metrics ADDR:PORT] [--node NAME] [options]
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
//! or CIDR) and `identity` (a SPIFFE ID, `host` or `world`), and may name
//! the `node` it runs on (for `auth` rules; left out or this node's
//! `--node`: this node). A rule needs
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
//! # Flows and metrics
//!
//! `--flows` prints every flow event on stdout, one line each (`--flows`
//! or `--flows=text`: human-readable; `--flows=json`: one JSON object per
//! line, the protobuf JSON mapping with Hubble's field names); the lines
//! are described in `flowfmt.rs`. The agent's own lines on stdout start
//! with `agent: `, flow lines never do.
//!
//! `--flow-socket [PATH]` serves the same events on a Unix socket
//! (default `/run/meshpath/flows.sock`, mode 0600, removed on exit) as
//! length-delimited protobuf `meshpath.flow.Flow` messages, to any number
//! of clients (the `flows` example); a client that reads too slowly
//! misses messages (counted), it never slows the agent or other clients.
//! `--node NAME` is the flows' `node_name` (default: the hostname).
//!
//! `--metrics ADDR:PORT` serves Prometheus metrics on
//! `http://ADDR:PORT/metrics` (see `metrics.rs` for the list). The ready
//! line ends with where each is served, e.g. `; flows on stdout (json);
//! flow socket /run/meshpath/flows.sock; metrics on
//! http://127.0.0.1:9090/metrics`.
//!
//! # Mutual-TLS authentication
//!
//! `--auth-listen ADDR:PORT --cert CERT --key KEY [--cert ... --key ...]
//! --ca CA [--peers FILE] [--revoked FILE] [--auth-ttl SECS]
//! [--auth-renew-before SECS]` makes the agent prove the identities of
//! `auth` flows with mutual TLS against the remote node's agent and fill
//! the auth map; see `auth.rs`. The ready line then ends with `; auth on
//! ADDR:PORT (node NAME, N identities)`.
//!
//! # Ownership, and what cannot wedge the agent
//!
//! With `--pin DIR` the agent owns DIR for its life (the library's
//! `PinLock`, a `flock` on the directory released when the process dies):
//! a second agent on DIR, and `--cleanup` of DIR, are refused with one
//! `agent: error:` line naming the owner's pid, exit 1. `--cleanup` only
//! removes meshpath's own pins (the maps and links the library names) and
//! lists what it left alone; a directory off bpffs is refused. Every
//! second the agent checks that its programs are still attached to each
//! cgroup (`CgroupAttachment::severed`): programs detached from under it
//! are reported, attached again and counted. Adopted maps whose sizes
//! differ from the flags are warnings naming the map and both sizes.
//!
//! Nothing the agent reads or writes can stall its loop: stdout and stderr
//! are written by threads of their own from bounded queues (`output`;
//! `--flows` lines that do not fit are dropped and counted), file flags
//! are read as regular files only, with a size limit and a timeout
//! (`files`), and the metrics server serves every connection under one
//! deadline without a thread per client.
//!
//! The command line is a contract other tools depend on: flag names are
//! stable, and new flags are added as new fields of [`cli::Args`].
//!
//! # Layout
//!
//! This file only wires the modules together, one job each:
//!
//! * `cli`: the command line ([`cli::Args`]) and its parsers;
//! * `config`: the JSON policy file and its translation to a
//!   `PolicyState`, with errors naming the field;
//! * `policy`: applying that state at startup and on SIGHUP;
//! * `setup`: checking the cgroups, loading, attaching, sweeping;
//! * `serve`: the main loop (signals, sweeps, `--stats-interval`);
//! * `observe`: `--flows`, `--flow-socket` and `--metrics` together,
//!   built from `flows` (the one flow reader, fanning out), `flow_socket`
//!   (the Unix socket and its clients), `flowfmt` (a flow as a text or
//!   JSON line; shared with the `flows` example) and `metrics` (the
//!   Prometheus endpoint);
//! * `auth`: mutual-TLS authentication of `auth` flows, built from
//!   `auth_certs` (PEM, SPIFFE IDs, expiry), `auth_files` (`--peers`,
//!   `--revoked`), `auth_tls` (rustls configurations and verifiers),
//!   `auth_proto` (the exchange between agents), `auth_manager` (signals,
//!   handshakes, renewals, revocations) and `auth_server` (the
//!   `--auth-listen` side);
//! * `files`: bounded reads of the files flags name (included through
//!   `auth_certs`, so that `tests/agent_auth.rs` gets it too);
//! * `output`: one-line stdout/stderr messages and the flow lines, each
//!   stream written by its own thread from a bounded queue.

mod auth;
mod auth_certs;
use auth_certs::files;
mod auth_files;
mod auth_manager;
mod auth_proto;
mod auth_server;
mod auth_tls;
mod cli;
mod config;
mod flow_socket;
mod flowfmt;
mod flows;
mod metrics;
mod observe;
mod output;
mod policy;
mod serve;
mod setup;

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::error::ErrorKind;
use clap::Parser;
use nix::sys::signalfd::{SfdFlags, SignalFd};

use cli::{clap_one_line, Args};
use output::{one_line, say, warn};

fn main() -> ExitCode {
    let code = match Args::try_parse() {
        Ok(args) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                output::error(&one_line(&e));
                ExitCode::from(1)
            }
        },
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            // --help and --version go to stdout and succeed.
            let _ = say(e.render().to_string().trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            output::error(&format!("{}; see agent --help", clap_one_line(&e)));
            ExitCode::from(1)
        }
    };
    // What is queued for stdout and stderr is written, unless their
    // readers stopped: then the agent does not wait for them.
    output::finish();
    code
}

fn run(args: &Args) -> anyhow::Result<()> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!(
            "must run as root (effective uid is {euid}): loading eBPF programs needs \
             CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        );
    }

    if args.cleanup {
        return cleanup(args);
    }
    if args.cgroups.is_empty() {
        bail!("no cgroup given: pass --cgroup DIR (repeatable)");
    }

    // Block the signals we wait for before anything else can start a
    // thread, so that every thread inherits the mask and a signal arriving
    // at any point (even during load) is queued for the signalfd.
    let signals = serve::handled_signals();
    signals
        .thread_block()
        .context("blocking SIGINT, SIGTERM and SIGHUP")?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("creating a signalfd")?;

    let targets = setup::validate_cgroups(args)?;
    // Endpoints on this node may name it.
    if let Ok(node) = auth::node_name(args) {
        config::set_this_node(node);
    }
    // Auth flags and files are checked, and --auth-listen bound, before
    // anything is loaded.
    // The identity key is read (or its absence warned about) first: auth
    // and the datapath derive identity numbers with it.
    let identity_key = setup::identity_key(args)?;
    let auth = auth::prepare(args, &identity_key)?;
    // A config that does not parse or validate fails before anything is
    // loaded.
    let state = args
        .config
        .as_deref()
        .map(config::load_config)
        .transpose()?;
    if let (Some(a), Some(s), Some(path)) = (&auth, &state, &args.config) {
        a.check_config(s, path)?;
    }
    for ns in &args.policy_reset_netns {
        check_netns_file(ns).with_context(|| format!("--policy-reset-netns {}", ns.display()))?;
    }
    // Ports and sockets are taken before anything is loaded.
    let mut observe = observe::Observability::bind(args)?;
    let dp = setup::load_datapath(args, &identity_key)?;
    if let (Some(dir), true) = (&args.pin, dp.adopted_pins()) {
        say(&format!(
            "agent: adopted the datapath pinned in {}: it kept working meanwhile",
            dir.display()
        ))
        .context("writing to stdout")?;
    }
    setup::configure(&dp, args)?;
    // Flows are read from before the policy and the attachments.
    observe.start(&dp, args)?;
    // The policy is in force before any cgroup is attached: no workload
    // runs unchecked for a moment.
    match (&args.config, state) {
        (Some(path), Some(state)) => policy::apply_policy(&dp, path, &state, args, true)?,
        _ => {
            // No policy; a datapath adopted from --pin may still hold one.
            dp.disable_policy().context("turning policy off")?;
        }
    }
    // Signals are read before any workload can ask.
    let auth = auth.map(|a| a.start(&dp)).transpose()?;
    let attachments = setup::attach(&dp, &targets, args)?;
    // Kept alive like the cgroup attachments: dropping one detaches it.
    let xdp = setup::attach_xdp(&dp, args)?;

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
    ready.push_str(&observe.describe());
    if let Some(a) = &auth {
        ready.push_str(a.describe());
    }
    setup::warn_default_identity_key(&identity_key);
    say(&ready).context("writing the ready line to stdout")?;

    let mut attachments = attachments;
    let mut links = setup::LinkWatch::new(observe.agent_stats());
    let mut pins = setup::PinWatch::default();
    let signal = serve::serve(&sigfd, &dp, args, auth.as_ref(), &observe, &mut || {
        // Programs first: one attached again is pinned where it was.
        links.check(&mut attachments);
        if args.pin.is_some() {
            pins.check(&dp, &attachments, &xdp);
        }
    })?;
    if let Some(a) = auth {
        a.stop();
    }

    if let Some(dir) = &args.pin {
        // Pinned: the programs stay attached and the maps stay, for the
        // next agent to adopt (or `--cleanup`).
        let n = attachments.len();
        drop(xdp);
        drop(attachments);
        observe.stop();
        let _ = say(&format!(
            "agent: {} received: the datapath stays attached to {n} cgroup{} and pinned in {}, \
             exiting",
            signal.as_str(),
            if n == 1 { "" } else { "s" },
            dir.display()
        ));
        return Ok(());
    }

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
            warn(&format!(
                "detaching from {}: {}",
                path.display(),
                one_line(&e.into())
            ));
        }
    }
    // Sockets of a detached cgroup get no close callback: drop their
    // index entries now.
    setup::sweep(&dp);
    // The last flows (up to the detach) are printed and served.
    observe.stop();
    let _ = say(&format!(
        "agent: {} received: detached from {n} cgroup{}, exiting",
        signal.as_str(),
        if n == 1 { "" } else { "s" }
    ));
    Ok(())
}

/// A network namespace file (nsfs: `/run/netns/NAME`, `/proc/PID/ns/net`),
/// opened without waiting: anything else (a FIFO would block every reload
/// that opens it) is refused.
fn check_netns_file(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .context("cannot open it")?;
    let st = nix::sys::statfs::fstatfs(&f).context("cannot read it")?;
    #[allow(clippy::useless_conversion)]
    let magic = i64::from(st.filesystem_type().0);
    if magic != NSFS_MAGIC {
        bail!("not a network namespace file (e.g. /run/netns/NAME or /proc/PID/ns/net)");
    }
    Ok(())
}

/// `--cleanup`: detaches and unpins everything meshpath pinned in the
/// pin directory. Refused while an agent (any datapath) owns it; entries
/// that are not meshpath's pins are left alone and listed.
fn cleanup(args: &Args) -> anyhow::Result<()> {
    let Some(dir) = &args.pin else {
        bail!("--cleanup needs --pin DIR");
    };
    let done = meshpath::bpffs::cleanup(dir)
        .with_context(|| format!("--cleanup of --pin {}", dir.display()))?;
    if !done.left.is_empty() {
        let left: Vec<String> = done
            .left
            .iter()
            .map(|(name, why)| format!("{name} ({why})"))
            .collect();
        warn(&format!(
            "cleanup: left alone in {}, not meshpath's to remove: {}",
            dir.display(),
            left.join(", ")
        ));
    }
    let n = done.removed.len();
    say(&format!(
        "agent: cleanup: detached and unpinned {n} object{} in {}",
        if n == 1 { "" } else { "s" },
        dir.display()
    ))
    .context("writing to stdout")?;
    Ok(())
}
