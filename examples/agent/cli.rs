//! The command line: [`Args`], its value parsers, and clap errors as one
//! line.
//!
//! The command line is a contract other tools depend on: flag names are
//! stable, and new flags are added as new fields of [`Args`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ColorChoice, Parser};
use meshpath::{IpNet, XdpMode};

// The agent's command line.
//
// New flags are added here as fields; everything downstream reads this
// struct only.
#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "meshpath node agent: short-circuits same-host TCP for processes in the given cgroup v2 directories",
    long_about = None,
    override_usage = "agent --cgroup DIR [--cgroup DIR ...] [--pin DIR] [--config FILE.json] [--xdp IFACE ...] [OPTIONS]",
    color = ColorChoice::Never
)]
pub(crate) struct Args {
    /// cgroup v2 directory to attach to (repeatable).
    #[arg(long = "cgroup", value_name = "DIR")]
    pub(crate) cgroups: Vec<PathBuf>,

    /// bpffs directory to pin the datapath in (maps, programs' links):
    /// it keeps working when the agent exits on a signal or is killed, and
    /// a restarted agent adopts it with no gap.
    #[arg(long, value_name = "DIR")]
    pub(crate) pin: Option<PathBuf>,

    /// Detach and unpin everything pinned in --pin DIR, then exit 0.
    #[arg(long, requires = "pin")]
    pub(crate) cleanup: bool,

    /// Keep connections to or from PORT on plain TCP (repeatable).
    #[arg(long = "bypass-port", value_name = "PORT", value_parser = parse_port)]
    pub(crate) bypass_ports: Vec<u16>,

    /// Addresses of workloads on this host in other network namespaces,
    /// as a CIDR (repeatable); loopback is always local.
    #[arg(long = "local-net", value_name = "CIDR", value_parser = parse_net)]
    pub(crate) local_nets: Vec<IpNet>,

    /// Capacity of the socket maps (two entries per connection).
    #[arg(
        long = "max-sockets",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(2..=16_777_216)
    )]
    pub(crate) max_sockets: Option<u32>,

    /// Capacity of the connection-tracking map (flows; least recently used
    /// evicted first). Default 65,536.
    #[arg(
        long = "max-conntrack",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(2..=16_777_216)
    )]
    pub(crate) max_conntrack: Option<u32>,

    /// Attach, but enroll no socket: every connection stays on TCP.
    #[arg(long = "no-short-circuit")]
    pub(crate) no_short_circuit: bool,

    /// Allow attaching to the root of the cgroup v2 hierarchy (every
    /// process on the host).
    #[arg(long = "allow-root-cgroup")]
    pub(crate) allow_root_cgroup: bool,

    /// Print the datapath counters as one line every SECS seconds.
    #[arg(
        long = "stats-interval",
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub(crate) stats_interval: Option<u64>,

    /// The cluster's identity key: identity numbers are a keyed hash of
    /// SPIFFE IDs, so every node must have the same key, and it must stay
    /// secret. FILE holds 32+ hex digits or 16+ raw bytes. Without it the
    /// public default key is used (a warning says so).
    #[arg(long = "identity-key", value_name = "FILE")]
    pub(crate) identity_key: Option<PathBuf>,

    /// Identity policy to enforce (JSON; re-read on SIGHUP). Without it
    /// everything is allowed.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// After every policy (re)load also reset the flows it denies in the
    /// network namespace at PATH, e.g. /run/netns/NAME (repeatable).
    #[arg(long = "policy-reset-netns", value_name = "PATH", requires = "config")]
    pub(crate) policy_reset_netns: Vec<PathBuf>,

    /// Also judge every packet network interface IFACE receives, in XDP,
    /// by the policy (repeatable).
    #[arg(long = "xdp", value_name = "IFACE")]
    pub(crate) xdp: Vec<String>,

    /// How to attach --xdp: auto (native where the driver supports it,
    /// generic otherwise), native or generic.
    #[arg(
        long = "xdp-mode",
        value_name = "MODE",
        default_value = "auto",
        value_parser = parse_xdp_mode,
        requires = "xdp"
    )]
    pub(crate) xdp_mode: XdpMode,

    /// Print every flow event on stdout, one line each: human-readable
    /// (`--flows` or `--flows=text`) or JSON (`--flows=json`).
    #[arg(
        long,
        value_name = "FORMAT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "text",
        value_parser = parse_flow_format
    )]
    pub(crate) flows: Option<FlowFormat>,

    /// Serve flow events on a Unix socket at PATH (default
    /// /run/meshpath/flows.sock), as length-delimited protobuf
    /// meshpath.flow.Flow messages, to any number of clients (e.g. the
    /// `flows` example).
    #[arg(
        long = "flow-socket",
        value_name = "PATH",
        num_args = 0..=1,
        default_missing_value = DEFAULT_FLOW_SOCKET,
        value_parser = parse_socket_path
    )]
    pub(crate) flow_socket: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (e.g.
    /// 127.0.0.1:9090; port 0 picks a free port, shown in the ready line).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub(crate) metrics: Option<SocketAddr>,

    /// This node's name, as flow events report it (default: the
    /// hostname).
    #[arg(long, value_name = "NAME", value_parser = parse_node)]
    pub(crate) node: Option<String>,

    /// Answer other nodes' mutual-TLS handshakes for `auth` rules on
    /// ADDR:PORT (and this node's own: pairs on one node authenticate
    /// through it too). Enables auth; needs --cert, --key and --ca.
    #[arg(long = "auth-listen", value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub(crate) auth_listen: Option<SocketAddr>,

    /// JSON file naming each node's auth address:
    /// {"peers": {"NODE": "ADDR:PORT", ...}} (re-read on SIGHUP).
    #[arg(long, value_name = "FILE")]
    pub(crate) peers: Option<PathBuf>,

    /// PEM certificate (chain, leaf first) of a local identity: its URI
    /// SAN is the SPIFFE ID (repeatable, one --key each, in order;
    /// re-read on SIGHUP).
    #[arg(long = "cert", value_name = "CERT")]
    pub(crate) certs: Vec<PathBuf>,

    /// PEM private key of the preceding --cert (repeatable).
    #[arg(long = "key", value_name = "KEY")]
    pub(crate) keys: Vec<PathBuf>,

    /// PEM bundle of the CA certificates that sign the mesh's identities
    /// (re-read on SIGHUP).
    #[arg(long, value_name = "CA")]
    pub(crate) ca: Option<PathBuf>,

    /// Cap on an auth entry's lifetime in seconds (default 3600); the
    /// earliest certificate not-after caps it too.
    #[arg(
        long = "auth-ttl",
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=31_536_000)
    )]
    pub(crate) auth_ttl: Option<u64>,

    /// Renew auth entries this many seconds before they expire (at most a
    /// third of their lifetime; default 60; 0: never renew, entries
    /// expire and the next packet asks again).
    #[arg(
        long = "auth-renew-before",
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(0..=31_536_000)
    )]
    pub(crate) auth_renew_before: Option<u64>,

    /// JSON file of revoked certificates and identities:
    /// {"serials": ["01:a3:ff"], "identities": ["spiffe://..."]}
    /// (re-read on SIGHUP; their entries are removed on both nodes).
    #[arg(long, value_name = "FILE")]
    pub(crate) revoked: Option<PathBuf>,
}

/// Where `--flow-socket` without a value serves.
pub(crate) const DEFAULT_FLOW_SOCKET: &str = "/run/meshpath/flows.sock";

/// How `--flows` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowFormat {
    /// One human-readable line per flow.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_flow_format(s: &str) -> Result<FlowFormat, String> {
    match s {
        "text" => Ok(FlowFormat::Text),
        "json" => Ok(FlowFormat::Json),
        _ => Err(format!("{s:?} is not one of text, json")),
    }
}

fn parse_socket_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the path is empty".into());
    }
    // sun_path holds 107 bytes and a NUL.
    if s.len() > 107 {
        return Err(format!(
            "{s:?} is {} bytes long; a Unix socket path holds at most 107",
            s.len()
        ));
    }
    Ok(PathBuf::from(s))
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not ADDR:PORT (e.g. 127.0.0.1:9090, [::1]:9090 or 0.0.0.0:9090)")
    })
}

fn parse_node(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 253 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{s:?} is not a node name (1-253 characters, no spaces or control characters)"
        ));
    }
    Ok(s.to_string())
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
/// clap's error without its usage block and tips: the first line, less
/// the `error: ` prefix.
pub(crate) fn clap_one_line(e: &clap::Error) -> String {
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
