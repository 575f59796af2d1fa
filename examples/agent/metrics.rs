//! `--metrics ADDR:PORT`: Prometheus metrics (text exposition format
//! 0.0.4) on `GET /metrics`, from a small HTTP/1.1 server on its own
//! thread: non-blocking sockets under poll(2), every connection with one
//! deadline of 5 s from accept to the end of its response, at most
//! [`MAX_CONNECTIONS`] open (a newcomer closes the oldest unanswered
//! one), every response closing the connection. Idle connections,
//! requests sent a byte at a time and clients that never read cannot keep
//! a scrape waiting.
//!
//! Every value is read when scraped:
//!
//! * each datapath counter (`Counters::iter`) as `meshpath_<name>_total`,
//!   except `sockets_tracked`, a gauge `meshpath_sockets_tracked`; ring
//!   buffer losses are `meshpath_events_lost_total`;
//! * `meshpath_policy_verdicts_total{point,verdict}`: every policy
//!   verdict per enforcement point (`Datapath::verdicts`);
//! * `meshpath_map_entries{map}`: entries in the SOCKHASH
//!   (`meshpath_sockets`), in the socket index (`meshpath_sock_index`)
//!   and in the packet hooks' verdict cache (`meshpath_verdict_cache`,
//!   stale entries included);
//! * `meshpath_policy_enabled`, `meshpath_policy_endpoints`,
//!   `meshpath_policy_rules`, `meshpath_policy_identities`: the policy in
//!   force (the desired state the agent applied);
//! * `meshpath_policy_identity_collisions`: names the policy in force
//!   refused because another name has their identity number
//!   (`Datapath::identity_collisions`; 0 unless something is very wrong);
//! * the agent's own: `meshpath_flow_events_read_total`,
//!   `meshpath_flow_socket_clients`,
//!   `meshpath_flow_socket_connections_total`,
//!   `meshpath_flow_socket_refused_total`,
//!   `meshpath_flow_socket_dropped_total`,
//!   `meshpath_flow_stdout_dropped_total`,
//!   `meshpath_agent_reattach_total`,
//!   `meshpath_metrics_connections_dropped_total{reason}`.
//!
//! The datapath counters count since the maps were created: with `--pin`
//! they survive agent restarts (no counter reset for Prometheus).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use meshpath::Datapath;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::flows::FlowStats;
use crate::observe::AgentStats;
use crate::output::warn;

/// Connections served at once. When a new one arrives and this many are
/// open, the oldest one still unanswered is closed to make room (counted),
/// so idle or slow clients can never keep a scrape out.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// How long a connection may take, from accept to the last byte of the
/// response (request sent slowly, response read slowly, or neither).
const DEADLINE: Duration = Duration::from_secs(5);

/// The largest request head read (request line and headers).
const MAX_HEAD: usize = 8 * 1024;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics server; dropping it stops it.
pub(crate) struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    listener: Option<TcpListener>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (before anything is loaded, so that a taken port
    /// fails fast); requests are served once [`MetricsServer::start`]
    /// runs.
    pub(crate) fn bind(addr: SocketAddr) -> anyhow::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).with_context(|| format!("--metrics {addr}"))?;
        listener
            .set_nonblocking(true)
            .with_context(|| format!("--metrics {addr}: making the listener non-blocking"))?;
        Ok(MetricsServer {
            addr: listener.local_addr().unwrap_or(addr),
            stop: Arc::new(AtomicBool::new(false)),
            listener: Some(listener),
            thread: None,
        })
    }

    /// The bound address (the port chosen when `--metrics` gave port 0).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving.
    pub(crate) fn start(
        &mut self,
        dp: &Datapath,
        flows: Arc<FlowStats>,
        agent: Arc<AgentStats>,
    ) -> anyhow::Result<()> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let stop = self.stop.clone();
        let source = Source {
            dp: dp.clone(),
            flows,
            agent,
        };
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve_loop(&listener, &source, &stop))
            .context("starting the metrics thread")?;
        self.thread = Some(thread);
        Ok(())
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a scrape reads.
struct Source {
    dp: Datapath,
    flows: Arc<FlowStats>,
    agent: Arc<AgentStats>,
}

/// One client connection of the event loop.
struct Conn {
    stream: TcpStream,
    started: Instant,
    head: Vec<u8>,
    /// The response once the request is read, and how much is written.
    out: Option<(Vec<u8>, usize)>,
}

/// What became of a connection after it was served a little.
enum Progress {
    Open,
    Done,
}

/// The server: one thread, non-blocking sockets and poll(2). Each
/// connection has one overall [`DEADLINE`]; at most [`MAX_CONNECTIONS`]
/// are open, the oldest unanswered one making room for a newcomer. A
/// scrape therefore waits for nobody: not for idle connections, not for
/// clients that send their request a byte at a time (slowloris), not for
/// clients that never read their response.
fn serve_loop(listener: &TcpListener, source: &Source, stop: &AtomicBool) {
    let mut conns: Vec<Conn> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let next_deadline = conns
            .iter()
            .map(|c| c.started + DEADLINE)
            .min()
            .map_or(Duration::from_millis(200), |d| {
                d.saturating_duration_since(now)
            })
            .min(Duration::from_millis(200));
        let timeout = PollTimeout::try_from(next_deadline.as_millis().max(1) as i32)
            .unwrap_or(PollTimeout::MAX);
        let ready: Vec<bool> = {
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            for c in &conns {
                let want = if c.out.is_some() {
                    PollFlags::POLLOUT
                } else {
                    PollFlags::POLLIN
                };
                fds.push(PollFd::new(c.stream.as_fd(), want));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn(&format!("metrics: waiting for requests: {e}"));
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
            fds.iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        // Serve the ready connections (the listener's flag is first).
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            if !ready[i + 1] {
                continue;
            }
            if let Progress::Done = serve_some(&mut conns[i], source) {
                conns.swap_remove(i);
            }
        }
        // Past their deadline: closed, counted.
        let now = Instant::now();
        let before = conns.len();
        conns.retain(|c| now < c.started + DEADLINE);
        source
            .agent
            .metrics_deadline
            .fetch_add((before - conns.len()) as u64, Ordering::Relaxed);
        if ready[0] {
            accept_all(listener, &mut conns, source);
        }
    }
}

/// Accepts every pending connection, making room by closing the oldest
/// unanswered ones (else the oldest) when [`MAX_CONNECTIONS`] are open.
fn accept_all(listener: &TcpListener, conns: &mut Vec<Conn>, source: &Source) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and the like: make room, try again next round.
                if let Some(oldest) = oldest(conns) {
                    conns.swap_remove(oldest);
                    source.agent.metrics_evicted.fetch_add(1, Ordering::Relaxed);
                } else {
                    warn(&format!("metrics: accepting a connection: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        if conns.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = oldest(conns) {
                conns.swap_remove(oldest);
                source.agent.metrics_evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        conns.push(Conn {
            stream,
            started: Instant::now(),
            head: Vec::new(),
            out: None,
        });
    }
}

/// The connection to close first: the oldest still sending its request,
/// else the oldest.
fn oldest(conns: &[Conn]) -> Option<usize> {
    let by_age = |only_unanswered: bool| {
        conns
            .iter()
            .enumerate()
            .filter(|(_, c)| !only_unanswered || c.out.is_none())
            .min_by_key(|(_, c)| c.started)
            .map(|(i, _)| i)
    };
    by_age(true).or_else(|| by_age(false))
}

/// Reads what the client sent or writes what it can take, without
/// waiting.
fn serve_some(c: &mut Conn, source: &Source) -> Progress {
    if c.out.is_none() {
        let mut chunk = [0u8; 2048];
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => return Progress::Done, // gone before asking
                Ok(n) => {
                    c.head.extend_from_slice(&chunk[..n]);
                    let end = c
                        .head
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .or_else(|| c.head.windows(2).position(|w| w == b"\n\n"));
                    if let Some(end) = end {
                        let head = String::from_utf8(c.head[..end].to_vec()).ok();
                        c.out = Some((answer(head.as_deref(), source), 0));
                        break;
                    }
                    if c.head.len() > MAX_HEAD {
                        c.out = Some((answer(None, source), 0));
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Progress::Done,
            }
        }
    }
    let Some((out, written)) = &mut c.out else {
        return Progress::Open;
    };
    while *written < out.len() {
        match c.stream.write(&out[*written..]) {
            Ok(0) => return Progress::Done,
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Progress::Done,
        }
    }
    let _ = c.stream.shutdown(std::net::Shutdown::Write);
    Progress::Done
}

/// The response to a request head (`None`: too long or not text).
fn answer(head: Option<&str>, source: &Source) -> Vec<u8> {
    let Some(head) = head else {
        return response(400, "Bad Request", &[], "bad request\n", false);
    };
    let line = head.lines().next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return response(400, "Bad Request", &[], "bad request\n", false);
    };
    if !version.starts_with("HTTP/1.") {
        return response(
            505,
            "HTTP Version Not Supported",
            &[],
            "HTTP/1.0 or HTTP/1.1 only\n",
            false,
        );
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return response(
            405,
            "Method Not Allowed",
            &[("Allow", "GET, HEAD")],
            "only GET and HEAD\n",
            false,
        );
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => match render(&source.dp, &source.flows, &source.agent) {
            Ok(body) => response(
                200,
                "OK",
                &[("Content-Type", CONTENT_TYPE)],
                &body,
                head_only,
            ),
            Err(e) => {
                let msg = format!("reading the datapath: {e:#}\n");
                response(500, "Internal Server Error", &[], &msg, head_only)
            }
        },
        "/" => response(
            200,
            "OK",
            &[],
            "meshpath agent: metrics at /metrics\n",
            head_only,
        ),
        _ => response(404, "Not Found", &[], "not found\n", head_only),
    }
}

fn response(
    code: u16,
    reason: &str,
    headers: &[(&str, &str)],
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {code} {reason}\r\n");
    let mut has_type = false;
    for (k, v) in headers {
        has_type |= k.eq_ignore_ascii_case("content-type");
        let _ = write!(out, "{k}: {v}\r\n");
    }
    if !has_type {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    let _ = write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    out.into_bytes()
}

// ---------------------------------------------------------------------------
// The exposition.

/// Every metric, in the text exposition format 0.0.4.
fn render(dp: &Datapath, flows: &FlowStats, agent: &AgentStats) -> anyhow::Result<String> {
    let mut m = Exposition::default();
    let c = dp.counters().context("counters")?;
    for (name, v) in c.iter() {
        if name == "sockets_tracked" {
            m.family(
                "meshpath_sockets_tracked",
                "gauge",
                "Sockets in the short-circuit now (enrolled minus closed or evicted).",
            );
            m.sample("meshpath_sockets_tracked", &[], v);
        } else {
            let metric = format!("meshpath_{name}_total");
            let help = counter_help(name)
                .map(str::to_string)
                .unwrap_or_else(|| format!("The datapath counter {name}."));
            m.family(&metric, "counter", &help);
            m.sample(&metric, &[], v);
        }
    }

    let verdicts = dp.verdicts().context("policy verdicts")?;
    m.family(
        "meshpath_policy_verdicts_total",
        "counter",
        "Policy verdicts by enforcement point and verdict.",
    );
    for (point, verdict, n) in verdicts.iter() {
        m.sample(
            "meshpath_policy_verdicts_total",
            &[("point", point.name()), ("verdict", verdict.name())],
            n,
        );
    }

    let sockhash = dp.sockhash_len().context("the SOCKHASH")?;
    let index = dp.sockets().context("the socket index")?.len();
    m.family(
        "meshpath_map_entries",
        "gauge",
        "Entries in a datapath map now.",
    );
    m.sample(
        "meshpath_map_entries",
        &[("map", "meshpath_sockets")],
        sockhash as u64,
    );
    m.sample(
        "meshpath_map_entries",
        &[("map", "meshpath_sock_index")],
        index as u64,
    );
    let cached = dp.verdict_cache_len().context("the verdict cache")?;
    m.sample(
        "meshpath_map_entries",
        &[("map", "meshpath_verdict_cache")],
        cached as u64,
    );

    let policy = dp.policy();
    m.family(
        "meshpath_policy_enabled",
        "gauge",
        "1 while an identity policy is enforced, 0 while everything passes unchecked.",
    );
    m.sample("meshpath_policy_enabled", &[], u64::from(policy.is_some()));
    m.family(
        "meshpath_policy_endpoints",
        "gauge",
        "Endpoints (address or CIDR to identity) of the policy in force.",
    );
    m.sample(
        "meshpath_policy_endpoints",
        &[],
        policy.as_ref().map_or(0, |p| p.endpoints.len()) as u64,
    );
    m.family(
        "meshpath_policy_rules",
        "gauge",
        "Rules of the policy in force.",
    );
    m.sample(
        "meshpath_policy_rules",
        &[],
        policy.as_ref().map_or(0, |p| p.policies.len()) as u64,
    );
    let identities = dp.identities().context("identities")?.len();
    m.family(
        "meshpath_policy_identities",
        "gauge",
        "Identities (SPIFFE IDs with their numbers) the datapath knows.",
    );
    m.sample("meshpath_policy_identities", &[], identities as u64);
    m.family(
        "meshpath_policy_identity_collisions",
        "gauge",
        "Names the policy in force refused, with their endpoints and rules, because another \
         name has their identity number.",
    );
    m.sample(
        "meshpath_policy_identity_collisions",
        &[],
        dp.identity_collisions().len() as u64,
    );

    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "meshpath_flow_events_read_total",
            "counter",
            "Flow events the agent read from the ring buffer.",
            load(&flows.read),
        ),
        (
            "meshpath_flow_socket_clients",
            "gauge",
            "Clients connected to the flow socket now.",
            load(&flows.socket_clients),
        ),
        (
            "meshpath_flow_socket_connections_total",
            "counter",
            "Clients the flow socket accepted.",
            load(&flows.socket_connections),
        ),
        (
            "meshpath_flow_socket_refused_total",
            "counter",
            "Clients the flow socket refused because 64 were connected.",
            load(&flows.socket_refused),
        ),
        (
            "meshpath_flow_socket_dropped_total",
            "counter",
            "Flow messages dropped for flow socket clients that read too slowly (summed over clients).",
            load(&flows.socket_dropped),
        ),
        (
            "meshpath_flow_stdout_dropped_total",
            "counter",
            "Flow lines not printed on stdout (--flows) because its reader was behind by a full queue.",
            load(&flows.stdout_dropped),
        ),
        (
            "meshpath_agent_reattach_total",
            "counter",
            "Programs the agent attached again after they were detached from under it.",
            load(&agent.reattached),
        ),
    ] {
        m.family(name, kind, help);
        m.sample(name, &[], v);
    }
    m.family(
        "meshpath_metrics_connections_dropped_total",
        "counter",
        "Metrics connections closed before their response was delivered: at their deadline (reason=deadline) or to make room for new ones (reason=evicted).",
    );
    m.sample(
        "meshpath_metrics_connections_dropped_total",
        &[("reason", "deadline")],
        load(&agent.metrics_deadline),
    );
    m.sample(
        "meshpath_metrics_connections_dropped_total",
        &[("reason", "evicted")],
        load(&agent.metrics_evicted),
    );
    Ok(m.out)
}

/// The text of one scrape.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let val = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{val}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }
}

/// HELP text of a datapath counter (as `Counters` documents it).
fn counter_help(name: &str) -> Option<&'static str> {
    Some(match name {
        "sockets_enrolled" => "Sockets enrolled into the short-circuit.",
        "sockets_removed" => "Enrolled sockets that have since closed.",
        "enroll_errors" => "Enrollments the kernel refused (map full, no memory).",
        "skipped_nonlocal" => "Connecting sockets whose peer cannot be on this host.",
        "skipped_bypass" => "Sockets left on TCP because of a bypassed port.",
        "skipped_family" => "Sockets of a family other than IPv4/IPv6.",
        "msgs_redirected" => "Messages delivered straight into the peer socket.",
        "bytes_redirected" => "Bytes delivered straight into the peer socket.",
        "msgs_fallback" => "Messages of enrolled sockets that took the TCP path.",
        "bytes_fallback" => "Bytes of enrolled sockets that took the TCP path.",
        "fallback_no_peer" => "Fallbacks to TCP because the peer was not enrolled yet.",
        "fallback_sticky" => "Fallbacks to TCP because the direction had already taken TCP.",
        "fallback_peer_optout" => "Fallbacks to TCP because the peer asked for TCP (SO_RCVLOWAT).",
        "fallback_draining" => "Fallbacks to TCP because the datapath was draining.",
        "fallback_no_state" => "Fallbacks to TCP because the socket had no meshpath state.",
        "fallback_sent_before" => {
            "Sockets kept on TCP because bytes went through TCP before enrollment (TCP Fast Open)."
        }
        "rcvlowat_optouts" => "Sockets that set SO_RCVLOWAT and were kept on TCP.",
        "fallback_peer_busy" => {
            "Fallbacks to TCP because the peer's socket lock was held (a busy-polling receiver)."
        }
        "fallback_peer_tcp" => "Fallbacks to TCP because the peer's direction had gone TCP.",
        "sockets_evicted" => "Sockets that left the short-circuit before closing.",
        "policy_resets" => "Established flows reset because policy came to deny them.",
        "events_lost" => "Flow events the ring buffer had no room for (the reader was slow).",
        "events_aggregated" => "Packets folded into an earlier flow event (aggregation).",
        "auth_ok" => "Flows of auth rules that found a live authentication.",
        "auth_signals" => "Auth-required signals sent to the agent.",
        "auth_signals_deduplicated" => {
            "Auth-required signals not sent: one for the same pair went out recently."
        }
        "auth_signals_dropped" => "Auth-required signals not sent: the rate limit, or a full ring.",
        _ => return None,
    })
}
