//! `--metrics ADDR:PORT`: Prometheus metrics (text exposition format
//! 0.0.4) on `GET /metrics`, from a small HTTP/1.1 server on its own
//! thread (one short-lived thread per request, at most
//! [`MAX_REQUESTS`] at once; every response closes the connection).
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
//!   `meshpath_flow_socket_dropped_total`.
//!
//! The datapath counters count since the maps were created: with `--pin`
//! they survive agent restarts (no counter reset for Prometheus).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use meshpath::Datapath;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::flows::FlowStats;
use crate::output::warn;

/// Requests served at once; more get 503.
pub(crate) const MAX_REQUESTS: usize = 8;

/// How long a client may take to send its request or read the response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub(crate) fn start(&mut self, dp: &Datapath, flows: Arc<FlowStats>) -> anyhow::Result<()> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let stop = self.stop.clone();
        let source = Arc::new(Source {
            dp: dp.clone(),
            flows,
        });
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_loop(&listener, &source, &stop))
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
}

fn accept_loop(listener: &TcpListener, source: &Arc<Source>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u8)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                warn(&format!("metrics: waiting for requests: {e}"));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn(&format!("metrics: accepting a connection: {e}"));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_REQUESTS {
            active.fetch_sub(1, Ordering::AcqRel);
            let mut s = stream;
            let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = respond(&mut s, 503, "Service Unavailable", &[], "busy\n", false);
            continue;
        }
        let (source, active2) = (source.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-request".into())
            .spawn(move || {
                handle(stream, &source);
                active2.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Serves one request on `stream`, then closes it.
fn handle(mut stream: TcpStream, source: &Source) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let head = match read_head(&mut stream) {
        Ok(Some(h)) => h,
        Ok(None) => {
            let _ = respond(&mut stream, 400, "Bad Request", &[], "bad request\n", false);
            return;
        }
        Err(_) => return, // timed out or reset: nobody to answer
    };
    let line = head.lines().next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        let _ = respond(&mut stream, 400, "Bad Request", &[], "bad request\n", false);
        return;
    };
    if !version.starts_with("HTTP/1.") {
        let _ = respond(
            &mut stream,
            505,
            "HTTP Version Not Supported",
            &[],
            "HTTP/1.0 or HTTP/1.1 only\n",
            false,
        );
        return;
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(
            &mut stream,
            405,
            "Method Not Allowed",
            &[("Allow", "GET, HEAD")],
            "only GET and HEAD\n",
            false,
        );
        return;
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => match render(&source.dp, &source.flows) {
            Ok(body) => {
                let _ = respond(
                    &mut stream,
                    200,
                    "OK",
                    &[("Content-Type", CONTENT_TYPE)],
                    &body,
                    head_only,
                );
            }
            Err(e) => {
                let msg = format!("reading the datapath: {e:#}\n");
                let _ = respond(
                    &mut stream,
                    500,
                    "Internal Server Error",
                    &[],
                    &msg,
                    head_only,
                );
            }
        },
        "/" => {
            let _ = respond(
                &mut stream,
                200,
                "OK",
                &[],
                "meshpath agent: metrics at /metrics\n",
                head_only,
            );
        }
        _ => {
            let _ = respond(&mut stream, 404, "Not Found", &[], "not found\n", head_only);
        }
    }
}

/// The request head (up to the blank line); `None` when it is too long
/// or not text.
fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .or_else(|| buf.windows(2).position(|w| w == b"\n\n"));
        if let Some(end) = end {
            buf.truncate(end);
            return Ok(String::from_utf8(buf).ok());
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    headers: &[(&str, &str)],
    body: &str,
    head_only: bool,
) -> io::Result<()> {
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
    stream.write_all(out.as_bytes())?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

// ---------------------------------------------------------------------------
// The exposition.

/// Every metric, in the text exposition format 0.0.4.
fn render(dp: &Datapath, flows: &FlowStats) -> anyhow::Result<String> {
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
            "Clients the flow socket refused because too many were connected.",
            load(&flows.socket_refused),
        ),
        (
            "meshpath_flow_socket_dropped_total",
            "counter",
            "Flow messages dropped for flow socket clients that read too slowly (summed over clients).",
            load(&flows.socket_dropped),
        ),
    ] {
        m.family(name, kind, help);
        m.sample(name, &[], v);
    }
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
