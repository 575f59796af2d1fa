//! Identity policy: what a verdict costs, and how fast a state is applied.
//!
//! ```text
//! sudo -E cargo bench --bench policy [-- FILTER]
//! ```
//!
//! The state measured is a large one: 1,000 identities, 100,000 endpoints
//! (IPv4 /32 addresses in 198.18.0.0/15) and 10,000 rules of three key
//! shapes (specific, any port, any source), default deny.
//!
//! Criterion groups:
//! - `policy/xdp/<case>`: one run of the XDP program on a 60-byte frame
//!   (BPF_PROG_TEST_RUN with `repeat`, the kernel's time per run): policy
//!   off (the floor: nothing is looked up), ARP (not IP), UDP allowed by a
//!   rule (hit, pass), denied by a rule (hit, drop), no rule under a
//!   default deny (miss, drop: the flow and its reply are both looked up)
//!   and no rule under a default allow (miss, pass);
//! - `policy/connect/<udp|tcp>/<none|policy|policy+sc>`: one `connect()`
//!   call from a socket of a cgroup with nothing attached, with the policy
//!   programs only, and with every program (policy and short-circuit).
//!   UDP's connect sends nothing, so it is the hook and a route lookup;
//!   TCP's includes the loopback handshake (and, with the short-circuit,
//!   the client's enrollment);
//! - `policy/apply/<case>`: one `replace_policy` (or `upsert_endpoint`):
//!   100,000 endpoints, 10,000 rules, both, the same state again (nothing
//!   to write) and one endpoint changed in the large state.
//!
//! Then a summary measured again with the cases interleaved (medians of
//! rounds that rotate their order), with the issue's targets: an XDP
//! verdict under 60 ns per packet, 100,000 endpoints applied in under
//! 0.5 s. It runs unless a filter is given that does not contain
//! "summary". Traffic stays on loopback; the cgroups are private and
//! removed on exit, on panic and on Ctrl-C. Needs root.

mod harness;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use criterion::Criterion;
use harness::{frame, interrupt, median, rotated, sys};
use meshpath::cgroup::ScopedCgroup;
use meshpath::policy::{DefaultAction, Endpoint, EndpointChange, PolicyState, Rule};
use meshpath::{AttachOptions, CgroupAttachment, Datapath, DatapathOptions};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const IDENTITIES: usize = 1_000;
const ENDPOINTS: usize = 100_000;
const RULES: usize = 10_000;
/// Rules of the "any port" shape and of the "any source" shape, among
/// `RULES` (the rest name all four fields).
const ANY_PORT_RULES: usize = 500;
const ANY_SOURCE_RULES: usize = 100;

const CLIENT: &str = "spiffe://mesh.local/ns/bench/sa/client";
const SERVER: &str = "spiffe://mesh.local/ns/bench/sa/server";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 51);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 52);

/// XDP runs per BPF_PROG_TEST_RUN call in the summary.
const XDP_REPEAT: u32 = 200_000;
/// connect() calls per measurement in the summary.
const CONNECTS: usize = 500;
/// Interleaved rounds in the summary for XDP and connect; applies of a
/// large state take long, so they get fewer.
const ROUNDS: usize = 9;
const APPLY_ROUNDS: usize = 5;

/// Which identity the one-endpoint case gives 198.18.0.7 next.
static NEXT_IDENTITY: AtomicUsize = AtomicUsize::new(1);

/// The n-th workload identity.
fn workload(n: usize) -> String {
    format!("spiffe://mesh.local/ns/bench/sa/w{n}")
}

/// The i-th endpoint address: 198.18.0.0 + i (inside 198.18.0.0/15).
fn endpoint_ip(i: usize) -> [u8; 4] {
    (u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32).to_be_bytes()
}

/// What the large state is made of.
struct Sizes {
    endpoints: usize,
    rules: usize,
}

/// Endpoint i has identity w(i % 1000), so the frames' 198.18.0.1 is w1
/// and 198.18.0.2 is w2. Rules: w1 -> w2 UDP 53 allow and UDP 9 deny (the
/// frames), loopback client -> server TCP and UDP (the connect cases),
/// then filler rules up to `rules`, none matching the frames.
fn state(sizes: &Sizes, default: DefaultAction) -> Result<PolicyState> {
    let mut endpoints = Vec::with_capacity(sizes.endpoints + 2);
    for i in 0..sizes.endpoints {
        let ip = Ipv4Addr::from(endpoint_ip(i));
        endpoints.push(Endpoint::new(&ip.to_string(), &workload(i % IDENTITIES))?);
    }
    endpoints.push(Endpoint::new(&CLIENT_IP.to_string(), CLIENT)?);
    endpoints.push(Endpoint::new(&SERVER_IP.to_string(), SERVER)?);
    let mut policies = Vec::with_capacity(sizes.rules + 4);
    if sizes.rules > 0 {
        policies.push(Rule::new(
            &workload(1),
            &workload(2),
            "udp",
            &[53],
            "allow",
        )?);
        policies.push(Rule::new(&workload(1), &workload(2), "udp", &[9], "deny")?);
        policies.push(Rule::new(CLIENT, SERVER, "any", &[], "allow")?);
    }
    let filler = sizes.rules.saturating_sub(policies.len());
    for i in 0..filler {
        // Pairs (from, to) never (1, 2): to = from + 3 + i / 1000.
        let from = i % IDENTITIES;
        let to = (from + 3 + i / IDENTITIES) % IDENTITIES;
        let (src, dst) = (workload(from), workload(to));
        let port = 1000 + (i % 50_000) as u16;
        let rule = if i < ANY_SOURCE_RULES {
            Rule::new("*", &dst, "tcp", &[port], "allow")?
        } else if i < ANY_SOURCE_RULES + ANY_PORT_RULES {
            Rule::new(&src, &dst, "udp", &[], "allow")?
        } else {
            Rule::new(&src, &dst, "tcp", &[port], "allow")?
        };
        policies.push(rule);
    }
    Ok(PolicyState {
        default_action: default,
        endpoints,
        policies,
    })
}

fn large() -> Sizes {
    Sizes {
        endpoints: ENDPOINTS,
        rules: RULES,
    }
}

/// The XDP cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XdpCase {
    Off,
    NotIp,
    AllowHit,
    DenyHit,
    MissDeny,
    MissAllow,
    Reply,
}

impl XdpCase {
    const ALL: [XdpCase; 7] = [
        XdpCase::Off,
        XdpCase::NotIp,
        XdpCase::AllowHit,
        XdpCase::Reply,
        XdpCase::DenyHit,
        XdpCase::MissDeny,
        XdpCase::MissAllow,
    ];

    fn id(self) -> &'static str {
        match self {
            XdpCase::Off => "policy-off",
            XdpCase::NotIp => "not-ip",
            XdpCase::AllowHit => "hit-pass",
            XdpCase::DenyHit => "hit-drop",
            XdpCase::MissDeny => "miss-drop",
            XdpCase::MissAllow => "miss-pass",
            XdpCase::Reply => "reply-pass",
        }
    }

    /// Whether the verdict cache plays a part (the policy is looked up).
    fn judged(self) -> bool {
        !matches!(self, XdpCase::Off | XdpCase::NotIp)
    }

    fn label(self) -> &'static str {
        match self {
            XdpCase::Off => "policy off (pass, nothing looked up)",
            XdpCase::NotIp => "ARP, not IP (pass)",
            XdpCase::AllowHit => {
                "UDP allowed by a rule (hit, pass; a tracked flow after the first)"
            }
            XdpCase::Reply => "UDP reply in that tracked flow (pass)",
            XdpCase::DenyHit => "UDP denied by a rule (hit, drop)",
            XdpCase::MissDeny => "UDP, no rule, default deny (miss, drop)",
            XdpCase::MissAllow => "UDP, no rule, default allow (miss, pass)",
        }
    }
}

/// Every XDP measurement: each case, and each judged case with the
/// verdict cache on and off.
fn xdp_points() -> Vec<(XdpCase, bool)> {
    XdpCase::ALL
        .into_iter()
        .flat_map(|c| {
            let both: &[bool] = if c.judged() { &[false, true] } else { &[true] };
            both.iter().map(move |&cached| (c, cached))
        })
        .collect()
}

/// The connect cases: which cgroup the socket lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hooks {
    None,
    Policy,
    PolicyAndSc,
}

impl Hooks {
    const ALL: [Hooks; 3] = [Hooks::None, Hooks::Policy, Hooks::PolicyAndSc];

    fn id(self) -> &'static str {
        match self {
            Hooks::None => "none",
            Hooks::Policy => "policy",
            Hooks::PolicyAndSc => "policy+sc",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    fn id(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// The apply cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApplyCase {
    Endpoints,
    Rules,
    Both,
    Unchanged,
    OneEndpoint,
    HundredEndpoints,
}

impl ApplyCase {
    const ALL: [ApplyCase; 6] = [
        ApplyCase::Endpoints,
        ApplyCase::Rules,
        ApplyCase::Both,
        ApplyCase::Unchanged,
        ApplyCase::OneEndpoint,
        ApplyCase::HundredEndpoints,
    ];

    fn id(self) -> &'static str {
        match self {
            ApplyCase::Endpoints => "endpoints-100k",
            ApplyCase::Rules => "rules-10k",
            ApplyCase::Both => "both",
            ApplyCase::Unchanged => "unchanged",
            ApplyCase::OneEndpoint => "one-endpoint",
            ApplyCase::HundredEndpoints => "hundred-endpoints",
        }
    }

    fn label(self) -> &'static str {
        match self {
            ApplyCase::Endpoints => "100,000 endpoints (no rules), from an empty state",
            ApplyCase::Rules => "10,000 rules (1,000 identities), from an empty state",
            ApplyCase::Both => "100,000 endpoints and 10,000 rules, from an empty state",
            ApplyCase::Unchanged => "the large state again (nothing to write)",
            ApplyCase::OneEndpoint => "one endpoint changed in the large state (upsert)",
            ApplyCase::HundredEndpoints => {
                "100 endpoints changed in the large state, one batch (`change_endpoints`)"
            }
        }
    }
}

/// Everything the measurements share. Fields drop in order: attachments,
/// cgroups, datapaths.
struct Bench {
    _policy_attachment: CgroupAttachment,
    _full_attachment: CgroupAttachment,
    plain: ScopedCgroup,
    policy: ScopedCgroup,
    full: ScopedCgroup,
    /// The large state, default deny; attached to `policy` and `full`.
    dp: Datapath,
    /// No policy set: XDP passes everything unlooked-up.
    dp_off: Datapath,
    /// The large state with a default allow (the miss-pass case).
    dp_allow: Datapath,
    /// For the apply cases: its state is replaced over and over.
    dp_apply: Datapath,
    tcp_server: TcpListener,
    udp_server: UdpSocket,
    cpus: (usize, usize),
    machine: sys::Machine,
    frames: Frames,
}

struct Frames {
    allowed: Vec<u8>,
    denied: Vec<u8>,
    unmatched: Vec<u8>,
    reply: Vec<u8>,
    arp: Vec<u8>,
}

fn options() -> DatapathOptions {
    // Room for the endpoints (and the identity names, sized alike) and
    // the compiled rules (one entry per rule and port).
    DatapathOptions::default()
        .max_endpoints(131_072)
        .max_policies(16_384)
}

impl Bench {
    fn new() -> Result<Bench> {
        let cpus = sys::two_cpus()?;
        let machine = sys::Machine::describe();
        let load = |o: DatapathOptions| Datapath::load(&o).context("loading a datapath");
        let dp = load(options())?;
        let dp_off = load(DatapathOptions::default())?;
        let dp_allow = load(options())?;
        let dp_apply = load(options())?;
        eprintln!("policy bench: building and applying the large state twice ...");
        let t = Instant::now();
        dp.replace_policy(&state(&large(), DefaultAction::Deny)?)
            .context("applying the large state")?;
        dp_allow
            .replace_policy(&state(&large(), DefaultAction::Allow)?)
            .context("applying the large state (default allow)")?;
        eprintln!("policy bench: ready in {:.1?}", t.elapsed());

        let home = meshpath::cgroup::current_cgroup().context("finding this process's cgroup")?;
        let mk = |name: &str| -> Result<ScopedCgroup> {
            let c = ScopedCgroup::new(name).with_context(|| format!("creating cgroup {name}"))?;
            interrupt::register_cgroup(home.clone(), c.path().to_path_buf());
            Ok(c)
        };
        let plain = mk("meshpath-bench-policy-plain")?;
        let policy = mk("meshpath-bench-policy")?;
        let full = mk("meshpath-bench-policy-full")?;
        let policy_attachment = dp
            .attach_cgroup_with(
                policy.path(),
                &AttachOptions::default().short_circuit(false),
            )
            .context("attaching the policy programs")?;
        let full_attachment = dp
            .attach_cgroup(full.path())
            .context("attaching every program")?;
        let (tcp_server, udp_server) = {
            let _in = full.enter().context("entering the cgroup")?;
            (
                TcpListener::bind(SocketAddrV4::new(SERVER_IP, 0)).context("bind tcp server")?,
                UdpSocket::bind(SocketAddrV4::new(SERVER_IP, 0)).context("bind udp server")?,
            )
        };
        let b = Bench {
            _policy_attachment: policy_attachment,
            _full_attachment: full_attachment,
            plain,
            policy,
            full,
            dp,
            dp_off,
            dp_allow,
            dp_apply,
            tcp_server,
            udp_server,
            cpus,
            machine,
            frames: Frames {
                allowed: frame::udp4([198, 18, 0, 1], 40000, [198, 18, 0, 2], 53),
                denied: frame::udp4([198, 18, 0, 1], 40000, [198, 18, 0, 2], 9),
                unmatched: frame::udp4([198, 18, 0, 1], 40000, [198, 18, 0, 2], 7777),
                reply: frame::udp4([198, 18, 0, 2], 53, [198, 18, 0, 1], 40000),
                arp: frame::arp(),
            },
        };
        // Every case is judged as intended before anything is measured.
        for (case, cached) in xdp_points() {
            b.xdp(case, cached, 2)?;
        }
        for hooks in Hooks::ALL {
            for proto in [Proto::Udp, Proto::Tcp] {
                b.connects(hooks, proto, 2)?;
            }
        }
        Ok(b)
    }

    /// `repeat` runs of an XDP case, with the verdict cache on (every run
    /// after the first a hit) or off (every run judged in full); the
    /// kernel's time per run. Fails unless the program gives the case's
    /// action.
    fn xdp(&self, case: XdpCase, cached: bool, repeat: u32) -> Result<Duration> {
        let f = &self.frames;
        let (dp, frame, want) = match case {
            XdpCase::Off => (&self.dp_off, &f.allowed, XDP_PASS),
            XdpCase::NotIp => (&self.dp, &f.arp, XDP_PASS),
            XdpCase::AllowHit => (&self.dp, &f.allowed, XDP_PASS),
            XdpCase::DenyHit => (&self.dp, &f.denied, XDP_DROP),
            XdpCase::MissDeny => (&self.dp, &f.unmatched, XDP_DROP),
            XdpCase::MissAllow => (&self.dp_allow, &f.unmatched, XDP_PASS),
            XdpCase::Reply => (&self.dp, &f.reply, XDP_PASS),
        };
        dp.set_verdict_cache(cached)?;
        if case == XdpCase::Reply {
            // The flow it answers, tracked (meshpath_ct_v2).
            dp.test_run_xdp(&f.allowed)?;
        }
        let (action, per_run) = dp.test_run_xdp_repeat(frame, repeat)?;
        if action != want {
            bail!("XDP case {} returned {action}, expected {want}", case.id());
        }
        Ok(per_run)
    }

    fn cgroup(&self, hooks: Hooks) -> &ScopedCgroup {
        match hooks {
            Hooks::None => &self.plain,
            Hooks::Policy => &self.policy,
            Hooks::PolicyAndSc => &self.full,
        }
    }

    /// `n` sockets of `proto` bound to the client address, created in the
    /// cgroup of `hooks` (a socket belongs to its creator's cgroup).
    fn sockets(&self, hooks: Hooks, proto: Proto, n: usize) -> Result<Vec<OwnedFd>> {
        let _in = self.cgroup(hooks).enter().context("entering the cgroup")?;
        let ty = match proto {
            Proto::Udp => SockType::Datagram,
            Proto::Tcp => SockType::Stream,
        };
        let from = SockaddrIn::from(SocketAddrV4::new(CLIENT_IP, 0));
        (0..n)
            .map(|_| {
                let s = socket::socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None)
                    .context("socket")?;
                socket::bind(s.as_raw_fd(), &from).context("bind to the client address")?;
                Ok(s)
            })
            .collect()
    }

    /// `n` connect() calls (sockets made beforehand, accepted and closed
    /// afterwards); their total time. Fails if one is refused.
    fn connects(&self, hooks: Hooks, proto: Proto, n: usize) -> Result<Duration> {
        let socks = self.sockets(hooks, proto, n)?;
        let to = SockaddrIn::from(match proto {
            Proto::Udp => sock_v4(self.udp_server.local_addr()?)?,
            Proto::Tcp => sock_v4(self.tcp_server.local_addr()?)?,
        });
        let mut total = Duration::ZERO;
        for (i, s) in socks.iter().enumerate() {
            let t = Instant::now();
            let r = socket::connect(s.as_raw_fd(), &to);
            total += t.elapsed();
            r.with_context(|| {
                format!(
                    "connect {i} ({} from the {} cgroup)",
                    proto.id(),
                    hooks.id()
                )
            })?;
            if proto == Proto::Tcp {
                // One at a time: the backlog stays short.
                let (_s, _) = self.tcp_server.accept().context("accept")?;
            }
        }
        Ok(total)
    }

    /// One apply case on `dp_apply`; the time of the measured call alone.
    fn apply(&self, case: ApplyCase) -> Result<Duration> {
        let dp = &self.dp_apply;
        let empty = PolicyState::default();
        let big = || state(&large(), DefaultAction::Deny);
        let (before, target) = match case {
            ApplyCase::Endpoints => (
                empty,
                state(
                    &Sizes {
                        endpoints: ENDPOINTS,
                        rules: 0,
                    },
                    DefaultAction::Deny,
                )?,
            ),
            ApplyCase::Rules => (
                empty,
                state(
                    &Sizes {
                        endpoints: IDENTITIES,
                        rules: RULES,
                    },
                    DefaultAction::Deny,
                )?,
            ),
            ApplyCase::Both => (empty, big()?),
            ApplyCase::Unchanged | ApplyCase::OneEndpoint | ApplyCase::HundredEndpoints => {
                (big()?, big()?)
            }
        };
        if dp.policy().as_ref() != Some(&before) {
            dp.replace_policy(&before)
                .context("setting the starting state")?;
        }
        if case == ApplyCase::OneEndpoint {
            // A different identity each time, so something is written.
            let n = NEXT_IDENTITY.fetch_add(1, Ordering::Relaxed) % IDENTITIES;
            let e = Endpoint::new("198.18.0.7", &workload(n))?;
            let t = Instant::now();
            let change = dp.upsert_endpoint(e).context("upsert_endpoint")?;
            let took = t.elapsed();
            if change.endpoints_written > 2 {
                bail!("one endpoint changed, {change:?} written");
            }
            // Back to the large state for the next round (untimed).
            dp.replace_policy(&target)
                .context("restoring the large state")?;
            return Ok(took);
        }
        if case == ApplyCase::HundredEndpoints {
            // 100 addresses of the large state, each to another identity.
            let n = NEXT_IDENTITY.fetch_add(1, Ordering::Relaxed);
            let changes = (0..100)
                .map(|i| {
                    let ip = Ipv4Addr::from(endpoint_ip(i * 997));
                    Endpoint::new(&ip.to_string(), &workload((n + i) % IDENTITIES))
                        .map(EndpointChange::Upsert)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let t = Instant::now();
            let change = dp.change_endpoints(&changes).context("change_endpoints")?;
            let took = t.elapsed();
            if !change.incremental || change.endpoints_written > 100 {
                bail!("100 endpoints changed: {change:?}");
            }
            dp.replace_policy(&target)
                .context("restoring the large state")?;
            return Ok(took);
        }
        let t = Instant::now();
        let change = dp.replace_policy(&target).context("replace_policy")?;
        let took = t.elapsed();
        let want_written = match case {
            ApplyCase::Unchanged => 0,
            _ => target.endpoints.len(),
        };
        if change.endpoints_written != want_written {
            bail!(
                "{}: {} endpoints written, expected {want_written}",
                case.id(),
                change.endpoints_written
            );
        }
        Ok(took)
    }
}

fn sock_v4(a: std::net::SocketAddr) -> Result<SocketAddrV4> {
    match a {
        std::net::SocketAddr::V4(v4) => Ok(v4),
        other => bail!("expected an IPv4 address, got {other}"),
    }
}

fn main() {
    harness::exit_on_error(run());
}

fn run() -> Result<()> {
    harness::require_root("cargo bench --bench policy")?;
    // Before any thread exists: the watcher cleans up on Ctrl-C.
    interrupt::install()?;
    let b = Bench::new()?;
    sys::pin_to(b.cpus.0).context("pinning the benchmark thread")?;
    let mut c = harness::short_criterion();
    criterion_xdp(&mut c, &b)?;
    criterion_connect(&mut c, &b)?;
    criterion_apply(&mut c, &b)?;
    c.final_summary();
    if harness::summary_requested() {
        summary(&b)?.print(&b);
    }
    Ok(())
}

/// Runs `f` in criterion's `iter_custom`, stopping at the first error
/// (criterion's closures cannot return one).
fn checked(err: &mut Option<anyhow::Error>, f: impl FnOnce() -> Result<Duration>) -> Duration {
    if err.is_some() {
        return Duration::from_nanos(1);
    }
    f().unwrap_or_else(|e| {
        *err = Some(e);
        Duration::from_nanos(1)
    })
}

fn criterion_xdp(c: &mut Criterion, b: &Bench) -> Result<()> {
    let mut err = None;
    let mut g = c.benchmark_group("policy/xdp");
    for (case, cached) in xdp_points() {
        let id = match (case.judged(), cached) {
            (false, _) => case.id().to_string(),
            (true, true) => format!("{}/cached", case.id()),
            (true, false) => format!("{}/full", case.id()),
        };
        g.bench_function(id, |bn| {
            bn.iter_custom(|iters| {
                checked(&mut err, || {
                    let mut left = iters;
                    let mut total = Duration::ZERO;
                    while left > 0 {
                        let k = left.min(1_000_000) as u32;
                        total += b.xdp(case, cached, k)? * k;
                        left -= u64::from(k);
                    }
                    Ok(total)
                })
            })
        });
    }
    g.finish();
    err.map_or(Ok(()), Err)
}

fn criterion_connect(c: &mut Criterion, b: &Bench) -> Result<()> {
    let mut err = None;
    for proto in [Proto::Udp, Proto::Tcp] {
        let mut g = c.benchmark_group(format!("policy/connect/{}", proto.id()));
        for hooks in Hooks::ALL {
            g.bench_function(hooks.id(), |bn| {
                bn.iter_custom(|iters| {
                    checked(&mut err, || b.connects(hooks, proto, iters as usize))
                })
            });
        }
        g.finish();
    }
    err.map_or(Ok(()), Err)
}

fn criterion_apply(c: &mut Criterion, b: &Bench) -> Result<()> {
    let mut err = None;
    let mut g = c.benchmark_group("policy/apply");
    g.sampling_mode(criterion::SamplingMode::Flat);
    for case in ApplyCase::ALL {
        g.bench_function(case.id(), |bn| {
            bn.iter_custom(|iters| {
                checked(&mut err, || {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += b.apply(case)?;
                    }
                    Ok(total)
                })
            })
        });
    }
    g.finish();
    err.map_or(Ok(()), Err)
}

struct Summary {
    /// (case, cached, ns per packet).
    xdp: Vec<(XdpCase, bool, f64)>,
    connect: Vec<(Proto, Hooks, f64)>,
    apply: Vec<(ApplyCase, f64)>,
}

fn summary(b: &Bench) -> Result<Summary> {
    eprintln!("policy bench: summary ({ROUNDS} interleaved rounds) ...");
    let mut xdp: Vec<(XdpCase, bool, Vec<f64>)> = xdp_points()
        .into_iter()
        .map(|(c, k)| (c, k, vec![]))
        .collect();
    let mut connect: Vec<(Proto, Hooks, Vec<f64>)> = [Proto::Udp, Proto::Tcp]
        .into_iter()
        .flat_map(|p| Hooks::ALL.into_iter().map(move |h| (p, h, vec![])))
        .collect();
    for round in 0..ROUNDS {
        for i in rotated(&(0..xdp.len()).collect::<Vec<_>>(), round) {
            let ns = b.xdp(xdp[i].0, xdp[i].1, XDP_REPEAT)?.as_nanos() as f64;
            xdp[i].2.push(ns);
        }
        for i in rotated(&(0..connect.len()).collect::<Vec<_>>(), round) {
            let (p, h, _) = connect[i];
            let t = b.connects(h, p, CONNECTS)?;
            connect[i]
                .2
                .push(t.as_nanos() as f64 / CONNECTS as f64 / 1e3);
        }
    }
    let mut apply: Vec<(ApplyCase, Vec<f64>)> =
        ApplyCase::ALL.iter().map(|&c| (c, vec![])).collect();
    for round in 0..APPLY_ROUNDS {
        for i in rotated(&(0..apply.len()).collect::<Vec<_>>(), round) {
            let t = b.apply(apply[i].0)?;
            apply[i].1.push(t.as_secs_f64() * 1e3);
        }
    }
    Ok(Summary {
        xdp: xdp
            .into_iter()
            .map(|(c, k, v)| (c, k, median(&v)))
            .collect(),
        connect: connect
            .into_iter()
            .map(|(p, h, v)| (p, h, median(&v)))
            .collect(),
        apply: apply.into_iter().map(|(c, v)| (c, median(&v))).collect(),
    })
}

impl Summary {
    fn print(&self, b: &Bench) {
        println!();
        let m = &b.machine;
        println!(
            "Policy: medians of {ROUNDS} interleaved rounds ({APPLY_ROUNDS} for applies). \
             Machine: {}, {}, {} CPUs, load {} at start.",
            m.kernel, m.cpu_model, m.nproc, m.loadavg
        );
        println!(
            "Large state: {IDENTITIES} identities, {ENDPOINTS} endpoints, {RULES} rules \
             (three key shapes), default deny."
        );
        println!();
        println!(
            "| XDP program, 60-byte frame (BPF_PROG_TEST_RUN, kernel time per run), ns per packet \
             | judged in full (verdict cache off; a flow's first packet) | cached: verdict cache \
             or tracked flow (the flow's later packets) |"
        );
        println!("|---|---:|---:|");
        for case in XdpCase::ALL {
            let get = |cached: bool| {
                self.xdp
                    .iter()
                    .find(|(c, k, _)| *c == case && *k == cached)
                    .map_or("".to_string(), |x| format!("{:.0}", x.2))
            };
            if case.judged() {
                println!("| {} | {} | {} |", case.label(), get(false), get(true));
            } else {
                println!("| {} | {} | |", case.label(), get(true));
            }
        }
        println!();
        println!("| connect() from a socket of a cgroup with ... (µs per call) | none | policy programs | policy + short-circuit |");
        println!("|---|---:|---:|---:|");
        for proto in [Proto::Udp, Proto::Tcp] {
            let get = |h: Hooks| {
                self.connect
                    .iter()
                    .find(|(p, hh, _)| *p == proto && *hh == h)
                    .map_or(f64::NAN, |x| x.2)
            };
            let what = match proto {
                Proto::Udp => "UDP (the hook and a route lookup)",
                Proto::Tcp => "TCP (with the loopback handshake)",
            };
            println!(
                "| {what} | {:.2} | {:.2} | {:.2} |",
                get(Hooks::None),
                get(Hooks::Policy),
                get(Hooks::PolicyAndSc)
            );
        }
        println!();
        println!("| applying a state (`replace_policy`, `upsert_endpoint`) | ms |");
        println!("|---|---:|");
        for (c, ms) in &self.apply {
            println!("| {} | {ms:.1} |", c.label());
        }
        println!();
        let worst = |cached: bool| {
            self.xdp
                .iter()
                .filter(|(c, k, _)| c.judged() && *k == cached)
                .map(|x| x.2)
                .fold(0.0, f64::max)
        };
        let (worst_hit, worst_full) = (worst(true), worst(false));
        let endpoints = self
            .apply
            .iter()
            .find(|(c, _)| *c == ApplyCase::Endpoints)
            .map_or(f64::NAN, |x| x.1);
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "Targets: XDP verdict under 60 ns per packet: worst {worst_hit:.0} ns from the \
             verdict cache, {} (judged in full: worst {worst_full:.0} ns); 100,000 endpoints \
             applied in under 0.5 s: {:.3} s, {}",
            met(worst_hit < 60.0),
            endpoints / 1e3,
            met(endpoints < 500.0)
        );
    }
}
