//! Flow events and metrics through the reference agent
//! (`examples/agent/`) and the `flows` client (`examples/flows.rs`):
//!
//! * `--flows=json`: known loopback traffic (an allowed connect, a denied
//!   connect, a packet from a process outside the cgroup dropped at
//!   ingress) prints exactly the expected JSON lines;
//! * `--flow-socket`: concurrent `flows` clients with different filters
//!   each get exactly their flows, while a client that never reads holds
//!   up neither the agent nor them (its drops are counted);
//! * `--metrics`: the Prometheus endpoint, parsed (HELP/TYPE, names,
//!   types, labels), counts the traffic.
//!
//! The agent tests load eBPF programs and create cgroups: they must run
//! as root and fail (never pass) otherwise. The line-format tests at the
//! end need nothing. Only loopback addresses are used.
//! Run: `cargo test --test observability -- --test-threads=1`.

mod common;

// The agent's and the client's line format, tested on crafted flows.
#[path = "../examples/agent/flowfmt.rs"]
mod flowfmt;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::agent::*;
use meshpath::cgroup::CgroupDir;
use meshpath::events::proto;
use meshpath::policy::derive_number;
use meshpath::{Counters, Point, Verdict};
use prost::Message;
use serde_json::Value;

// ---------------------------------------------------------------------------
// Traffic.

/// A TCP connection from `src:port` (port 0: any) to `dst`, made by the
/// calling process (inside or outside a cgroup as it is).
fn connect_from_port(src: &str, port: u16, dst: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType};
    use nix::sys::socket::{setsockopt, sockopt, SockaddrStorage};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let src = SocketAddr::new(src.parse().expect("a source address"), port);
    bind(fd.as_raw_fd(), &SockaddrStorage::from(src))?;
    let s = TcpStream::from(fd);
    connect(s.as_raw_fd(), &SockaddrStorage::from(dst))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// From outside every cgroup: sends one SYN from 127.0.0.4 to `dst`
/// (the workload's ingress hook drops it), gives up before the first
/// retransmission, and returns the source port.
fn syn_from_outside(dst: SocketAddr) -> u16 {
    use nix::sys::socket::{bind, connect, getsockname, socket};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrStorage};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .expect("socket");
    let src: SocketAddr = "127.0.0.4:0".parse().unwrap();
    bind(fd.as_raw_fd(), &SockaddrStorage::from(src)).expect("binding 127.0.0.4:0");
    let port = getsockname::<SockaddrIn>(fd.as_raw_fd())
        .expect("getsockname")
        .port();
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Err(nix::errno::Errno::EINPROGRESS) => {}
        other => panic!("a SYN the workload drops should leave the connect in progress: {other:?}"),
    }
    // The first retransmission comes after 1 s: close well before.
    std::thread::sleep(Duration::from_millis(300));
    drop(fd);
    port
}

/// `rounds` round trips of 100 bytes out, 60 bytes back.
fn ping_pong(c: &mut TcpStream, s: &mut TcpStream, rounds: usize) {
    for _ in 0..rounds {
        c.write_all(&[1u8; 100]).unwrap();
        let mut b = [0u8; 100];
        s.read_exact(&mut b).unwrap();
        s.write_all(&[2u8; 60]).unwrap();
        let mut b = [0u8; 60];
        c.read_exact(&mut b).unwrap();
    }
}

/// The address in the ready line's `; metrics on http://ADDR/metrics`.
fn metrics_addr(agent: &Agent) -> SocketAddr {
    let ready = agent
        .seen
        .iter()
        .find(|l| l.contains("ready"))
        .expect("a ready line");
    let rest = ready
        .split("metrics on http://")
        .nth(1)
        .unwrap_or_else(|| panic!("the ready line names no metrics address: {ready}"));
    rest.split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("metrics address in {ready:?}: {e}"))
}

/// The next `n` stdout lines that are JSON objects (flow lines), within
/// `timeout`; the agent's own `agent: ` lines are skipped.
fn json_lines(agent: &mut Agent, n: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.stdout.recv_timeout(left) {
            Ok(line) => {
                agent.seen.push(line.clone());
                if line.starts_with('{') {
                    let v: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    out.push(v);
                } else {
                    assert!(
                        line.starts_with("agent: "),
                        "stdout holds flow lines and `agent: ` lines only: {line:?}"
                    );
                }
            }
            Err(e) => panic!(
                "{} of {n} JSON lines within {timeout:?} ({e}); got: {out:#?}",
                out.len()
            ),
        }
    }
    out
}

/// Seconds since the epoch of an RFC 3339 UTC time (`...Z`).
fn parse_rfc3339(s: &str) -> f64 {
    fn bad<T>(s: &str) -> T {
        panic!("not an RFC 3339 UTC time: {s:?}")
    }
    let (date, time) = s
        .strip_suffix('Z')
        .and_then(|t| t.split_once('T'))
        .unwrap_or_else(|| bad(s));
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().unwrap_or_else(|_| bad(s)))
        .collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().unwrap_or_else(|_| bad(s)))
        .collect();
    assert!(d.len() == 3 && t.len() == 3 && frac.len() <= 9, "{s:?}");
    // Days from civil (Howard Hinnant), independent of the code under test.
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    secs as f64 + format!("0.{frac}").parse::<f64>().unwrap()
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn spiffe(id: &str) -> Value {
    serde_json::json!([format!("spiffe={id}")])
}

// ---------------------------------------------------------------------------
// (a) --flows=json: exactly the expected lines.

#[test]
fn flows_json_prints_exactly_the_expected_lines() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let db_port = w.db_addr.port();
    w.write(&policy_config(db_port, "allow"));
    let t0 = now_secs();
    let mut agent = w.agent(true, &["--flows=json", "--node", "node-obs-a"]);
    assert!(
        agent
            .seen
            .iter()
            .any(|l| l.contains("flows on stdout (json)")),
        "the ready line says where flows go: {:?}",
        agent.seen
    );
    let cgroup_id = CgroupDir::open(w.cg.path()).unwrap().id().to_string();

    // 1. frontend -> db: allowed, short-circuited, 10 round trips.
    let (mut c, mut s) = {
        let _inside = w.cg.enter().unwrap();
        let c = connect_from_port("127.0.0.2", 0, w.db_addr).expect("frontend -> db");
        (c, w.accept())
    };
    let client_port = c.local_addr().unwrap().port();
    ping_pong(&mut c, &mut s, 10);
    drop((c, s));
    // 2. world (127.0.0.4) -> db inside the cgroup: EPERM at connect.
    w.assert_denied("127.0.0.4", "default deny");
    // 3. A process outside every cgroup: its SYN is dropped at ingress.
    let outside_port = syn_from_outside(w.db_addr);

    let flows = json_lines(&mut agent, 5, Duration::from_secs(15));
    // Nothing else comes: wait past one aggregation interval.
    std::thread::sleep(Duration::from_millis(1500));
    let (stdout, stderr) = stop(agent);
    let t1 = now_secs();
    let all: Vec<&String> = stdout.iter().filter(|l| l.starts_with('{')).collect();
    assert_eq!(all.len(), 5, "exactly five flow lines: {all:#?}");
    assert!(!stderr.contains("error"), "{stderr:?}");

    let kind = |k: &str, v: &str| -> &Value {
        let m: Vec<&Value> = flows
            .iter()
            .filter(|f| f["event_kind"] == k && f["verdict"] == v)
            .collect();
        assert_eq!(m.len(), 1, "one {k} {v}: {flows:#?}");
        m[0]
    };
    // Identity numbers are uint64: strings in the protobuf JSON mapping.
    let number = |id| derive_number(&meshpath::policy::IdentityKey::default(), id).to_string();
    let fe = serde_json::json!({"identity": number(FE), "labels": spiffe(FE)});
    let db = serde_json::json!({"identity": number(DB), "labels": spiffe(DB)});
    let world = serde_json::json!({"identity": "2", "labels": ["reserved:world"]});
    let ipv4 = |src: &str| serde_json::json!({"source": src, "destination": "127.0.0.3", "ipVersion": "IPv4"});

    for f in &flows {
        let t = parse_rfc3339(f["time"].as_str().expect("time"));
        assert!(
            t >= t0 - 1.0 && t <= t1 + 1.0,
            "time {} outside the run",
            f["time"]
        );
        assert_eq!(f["node_name"], "node-obs-a", "{f}");
        assert_eq!(f["count"], 1, "{f}");
        assert_eq!(f["destination"], db, "{f}");
    }

    let allowed = kind("POLICY_VERDICT", "FORWARDED");
    assert_eq!(allowed["point"], "CONNECT");
    assert_eq!(allowed["IP"], ipv4("127.0.0.2"));
    assert_eq!(allowed["l4"]["TCP"]["source_port"], client_port);
    assert_eq!(allowed["l4"]["TCP"]["destination_port"], db_port);
    assert_eq!(allowed["source"], fe);
    assert_eq!(allowed["Type"], "SOCK");
    assert_eq!(allowed["traffic_direction"], "EGRESS");
    assert_eq!(allowed["policy_rule"], 0, "rule 0 allowed it");
    assert_eq!(allowed["is_reply"], false);
    assert_eq!(allowed["cgroup_id"], cgroup_id.as_str());
    let cookie = allowed["socket_cookie"]
        .as_str()
        .expect("a cookie, as a string");
    assert!(cookie.parse::<u64>().unwrap() > 0);
    assert!(allowed.get("drop_reason_desc").is_none(), "{allowed}");

    let opened = kind("SHORT_CIRCUIT_OPEN", "REDIRECTED");
    assert_eq!(opened["point"], "SHORT_CIRCUIT");
    assert_eq!(opened["IP"], ipv4("127.0.0.2"));
    assert_eq!(opened["l4"]["TCP"]["source_port"], client_port);
    assert_eq!(opened["source"], fe);

    let closed = kind("SHORT_CIRCUIT_CLOSE", "REDIRECTED");
    assert_eq!(closed["l4"]["TCP"]["source_port"], client_port);
    assert_eq!(
        closed["short_circuit"],
        serde_json::json!({"tx_messages": "10", "tx_bytes": "1000", "rx_messages": "10", "rx_bytes": "600"})
    );

    let denied = kind("POLICY_VERDICT", "DROPPED");
    assert_eq!(denied["point"], "CONNECT");
    assert_eq!(denied["IP"], ipv4("127.0.0.4"));
    assert_eq!(denied["source"], world);
    assert_eq!(
        denied["drop_reason_desc"], "POLICY_DENIED",
        "the default denied it"
    );
    assert!(
        denied.get("policy_rule").is_none(),
        "no rule decided: {denied}"
    );
    assert_eq!(denied["l4"]["TCP"]["destination_port"], db_port);

    let dropped = kind("PACKET_VERDICT", "DROPPED");
    assert_eq!(dropped["point"], "CGROUP_INGRESS");
    assert_eq!(dropped["traffic_direction"], "INGRESS");
    assert_eq!(dropped["IP"], ipv4("127.0.0.4"));
    assert_eq!(dropped["source"], world);
    // The receiving socket is known at cgroup ingress: the event carries
    // its cookie; a packet verdict is still L3_L4 (as in Hubble).
    let cookie = dropped["socket_cookie"]
        .as_str()
        .expect("the listener's cookie");
    assert!(cookie.parse::<u64>().unwrap() > 0);
    assert_eq!(dropped["Type"], "L3_L4");
    assert_eq!(dropped["interface"]["name"], "lo");
    assert_eq!(dropped["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(
        dropped["l4"]["TCP"],
        serde_json::json!({"source_port": outside_port, "destination_port": db_port, "flags": {"SYN": true}})
    );
}

// ---------------------------------------------------------------------------
// (b) --flow-socket: concurrent clients, filters, a client that never reads.

/// Denied connects from world (127.0.0.4), each to its own db port: the
/// datapath aggregates denied connects per (source, destination, port)
/// and not per source port.
const DENIED: u16 = 12_000;
/// Allowed frontend -> db connections before the last one.
const ALLOWED: usize = 20;

#[test]
fn flow_socket_serves_each_client_its_flows_and_a_stalled_client_blocks_nobody() {
    let _serial = setup();
    let w = PolicyWorld::new();
    let db_port = w.db_addr.port();
    w.write(&policy_config(db_port, "allow"));
    let sock = w.dir.0.join("flows.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let agent = w.agent(
        true,
        &[
            "--flow-socket",
            &sock_s,
            "--metrics",
            "127.0.0.1:0",
            "--node",
            "node-obs-b",
        ],
    );
    let metrics = metrics_addr(&agent);
    assert!(sock.exists(), "the socket is there once the agent is ready");

    // A client that connects and never reads.
    let stalled = UnixStream::connect(&sock).expect("connecting the stalled client");
    // A: every drop, as JSON. B: frontend's flows to the db port, as text,
    // until it has them all.
    let b_count = 3 * (ALLOWED + 1);
    let mut a = Agent::spawn_with(
        flows_bin(),
        &["--socket", &sock_s, "--verdict", "dropped", "--json"],
        |_| {},
    );
    let mut b = Agent::spawn_with(
        flows_bin(),
        &[
            "--socket",
            &sock_s,
            "--from",
            FE,
            "--port",
            &db_port.to_string(),
            "--count",
            &b_count.to_string(),
        ],
        |_| {},
    );
    wait_metric(&metrics, "meshpath_flow_socket_clients", &[], |v| v == 3.0);

    // Allowed connections (3 flows each, for B), then the flood of denied
    // connects (for A and the stalled client), paced so that A, a debug
    // build reading a pipe, keeps up.
    let mut expected_b_ports = Vec::new();
    let mut denied_ports = BTreeSet::new();
    {
        let _inside = w.cg.enter().unwrap();
        for _ in 0..ALLOWED {
            let c = connect_from_port("127.0.0.2", 0, w.db_addr).expect("frontend -> db");
            expected_b_ports.push(c.local_addr().unwrap().port());
            drop((c, w.accept()));
        }
        for (i, port) in (10_000..10_000 + DENIED).enumerate() {
            let to = SocketAddr::new(w.db_addr.ip(), port);
            match connect_from_port("127.0.0.4", 0, to) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    denied_ports.insert(port);
                }
                other => panic!("world -> db:{port}: {other:?}"),
            }
            if i % 200 == 199 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert_eq!(denied_ports.len(), usize::from(DENIED));

    // The stalled client has long overflowed; A still gets every drop.
    let a_lines = json_lines(&mut a, denied_ports.len(), Duration::from_secs(90));
    let mut seen_ports = BTreeSet::new();
    for f in &a_lines {
        assert_eq!(f["verdict"], "DROPPED", "{f}");
        assert_eq!(f["event_kind"], "POLICY_VERDICT", "{f}");
        assert_eq!(f["IP"]["source"], "127.0.0.4", "{f}");
        assert_eq!(f["node_name"], "node-obs-b", "{f}");
        assert_eq!(f["count"], 1, "{f}");
        let p = f["l4"]["TCP"]["destination_port"].as_u64().unwrap() as u16;
        assert!(seen_ports.insert(p), "port {p} twice");
    }
    assert_eq!(
        seen_ports, denied_ports,
        "A got exactly the denied connects"
    );

    // The last allowed connection: B gets it after all that.
    {
        let _inside = w.cg.enter().unwrap();
        let c = connect_from_port("127.0.0.2", 0, w.db_addr).expect("frontend -> db");
        expected_b_ports.push(c.local_addr().unwrap().port());
        drop((c, w.accept()));
    }
    let status = b.wait_exit(Duration::from_secs(30));
    let b_stderr = b.stderr_text();
    assert_eq!(status.code(), Some(0), "B: {status}; {b_stderr:?}");
    let b_lines = b.stdout_lines();
    assert_eq!(b_lines.len(), b_count, "B: {b_lines:#?}");
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut b_ports = BTreeSet::new();
    for line in &b_lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        // TIME VERDICT POINT PROTO SRC -> DST SRC_ID -> DST_ID ...
        assert!(f.len() >= 10, "{line}");
        assert!(f[0].ends_with('Z') && f[0].len() == 24, "time: {line}");
        let t = parse_rfc3339(f[0]);
        assert!((t - now_secs()).abs() < 300.0, "{line}");
        assert_eq!(f[3], "tcp", "{line}");
        let (src, port) = f[4].split_once(':').unwrap();
        assert_eq!(src, "127.0.0.2", "{line}");
        b_ports.insert(port.parse::<u16>().unwrap());
        assert_eq!(f[6], format!("127.0.0.3:{db_port}"), "{line}");
        assert_eq!(&f[7..10], &[FE, "->", DB], "{line}");
        let what = match (f[1], f[2]) {
            ("FORWARDED", "connect") => {
                assert_eq!(&f[10..], &["rule", "0"], "{line}");
                "connect"
            }
            ("REDIRECTED", "short_circuit") if f[10] == "sc-open" => "open",
            ("REDIRECTED", "short_circuit") if f[10] == "sc-close" => "close",
            _ => panic!("B got a flow it should not: {line}"),
        };
        *kinds.entry(what).or_default() += 1;
    }
    let n = ALLOWED + 1;
    assert_eq!(
        kinds,
        BTreeMap::from([("close", n), ("connect", n), ("open", n)]),
        "{b_lines:#?}"
    );
    assert_eq!(
        b_ports,
        expected_b_ports.iter().copied().collect::<BTreeSet<_>>()
    );

    // Nothing more for A after a quiet while.
    std::thread::sleep(Duration::from_millis(500));
    if let Ok(line) = a.stdout.try_recv() {
        panic!("A got a flow it should not: {line}");
    }

    // The stalled client's drops are counted; the ring lost nothing (the
    // agent kept reading); B's leaving is seen.
    let m = wait_metric(&metrics, "meshpath_flow_socket_clients", &[], |v| v == 2.0);
    let dropped = m.value("meshpath_flow_socket_dropped_total", &[]);
    assert!(
        dropped > 0.0,
        "the stalled client must have missed messages"
    );
    assert_eq!(m.value("meshpath_events_lost_total", &[]), 0.0);
    assert!(m.value("meshpath_flow_events_read_total", &[]) >= (denied_ports.len() + 3 * n) as f64);
    assert_eq!(m.value("meshpath_flow_socket_connections_total", &[]), 3.0);

    // SIGTERM with the stalled client still connected: a prompt, clean
    // exit that says what it dropped, and the socket file is gone.
    drop(a);
    let (stdout, stderr) = stop(agent);
    assert!(!stderr.contains("error"), "{stderr:?}");
    assert!(!sock.exists(), "the socket file is removed on exit");
    let gone: Vec<&String> = stdout
        .iter()
        .filter(|l| l.contains("disconnected (exiting)"))
        .collect();
    assert!(
        gone.iter().any(|l| !l.ends_with(" 0 dropped")),
        "the stalled client's drops are reported: {gone:?}"
    );
    // What the stalled client was sent is whole messages (a last one may
    // be cut by the shutdown).
    let mut bytes = Vec::new();
    let mut stalled = stalled;
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stalled
        .read_to_end(&mut bytes)
        .expect("reading the stalled client's socket");
    let mut buf = &bytes[..];
    let mut whole = 0;
    while !buf.is_empty() {
        match proto::Flow::decode_length_delimited(&mut buf) {
            Ok(f) => {
                assert_eq!(f.node_name, "node-obs-b");
                whole += 1;
            }
            Err(_) => {
                assert!(buf.len() < 512, "garbage in the stream, not a cut message");
                break;
            }
        }
    }
    assert!(whole > 0, "the stalled client was sent something");
}

// ---------------------------------------------------------------------------
// (c) --metrics: parsed, and counting the traffic.

#[test]
fn metrics_parse_as_prometheus_text_and_count_the_traffic() {
    let _serial = setup();
    let w = PolicyWorld::new();
    w.write(&policy_config(w.db_addr.port(), "allow"));
    let agent = w.agent(true, &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&agent);

    let before = scrape(&addr);
    // Every datapath counter, every (point, verdict) pair, the maps.
    for (name, _) in Counters::default().iter() {
        let (metric, kind) = if name == "sockets_tracked" {
            ("meshpath_sockets_tracked".to_string(), "gauge")
        } else {
            (format!("meshpath_{name}_total"), "counter")
        };
        let fam = before
            .families
            .get(&metric)
            .unwrap_or_else(|| panic!("{metric} is missing"));
        assert_eq!(fam.kind, kind, "{metric}");
    }
    for p in Point::ALL {
        for v in Verdict::ALL {
            before.value(
                "meshpath_policy_verdicts_total",
                &[("point", p.name()), ("verdict", v.name())],
            );
        }
    }
    for (name, kind) in [
        ("meshpath_map_entries", "gauge"),
        ("meshpath_policy_endpoints", "gauge"),
        ("meshpath_policy_rules", "gauge"),
        ("meshpath_flow_socket_clients", "gauge"),
        ("meshpath_flow_socket_dropped_total", "counter"),
        ("meshpath_events_lost_total", "counter"),
    ] {
        assert_eq!(before.families[name].kind, kind, "{name}");
    }
    assert_eq!(before.value("meshpath_policy_endpoints", &[]), 2.0);
    assert_eq!(before.value("meshpath_policy_rules", &[]), 1.0);
    assert_eq!(before.value("meshpath_policy_enabled", &[]), 1.0);
    assert_eq!(before.value("meshpath_flow_socket_clients", &[]), 0.0);

    // An allowed, short-circuited connection (held open), a denied one.
    let (mut c, mut s) = w.assert_allowed("127.0.0.2", "allow policy");
    w.assert_denied("127.0.0.4", "default deny");
    ping_pong(&mut c, &mut s, 10);
    let during = scrape(&addr);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        during.value(name, labels) - before.value(name, labels)
    };
    assert_eq!(
        delta(
            "meshpath_policy_verdicts_total",
            &[("point", "connect"), ("verdict", "deny")]
        ),
        1.0
    );
    assert!(
        during.value(
            "meshpath_policy_verdicts_total",
            &[("point", "connect"), ("verdict", "deny")]
        ) >= 1.0
    );
    assert_eq!(
        delta(
            "meshpath_policy_verdicts_total",
            &[("point", "connect"), ("verdict", "allow")]
        ),
        1.0
    );
    assert_eq!(delta("meshpath_sockets_enrolled_total", &[]), 2.0);
    assert!(
        delta("meshpath_bytes_redirected_total", &[]) >= (10 * 160) as f64,
        "the ping-pong went through the short-circuit"
    );
    assert_eq!(during.value("meshpath_sockets_tracked", &[]), 2.0);
    assert_eq!(
        during.value("meshpath_map_entries", &[("map", "meshpath_sockets")]),
        2.0
    );
    assert_eq!(
        during.value("meshpath_map_entries", &[("map", "meshpath_sock_index")]),
        2.0
    );
    assert!(
        during.value("meshpath_map_entries", &[("map", "meshpath_verdict_cache")]) >= 1.0,
        "the handshake's packets were judged at cgroup_skb and cached"
    );
    assert_eq!(during.value("meshpath_events_lost_total", &[]), 0.0);

    // Closed: the maps empty again.
    drop((c, s));
    let after = wait_metric(
        &addr,
        "meshpath_map_entries",
        &[("map", "meshpath_sock_index")],
        |v| v == 0.0,
    );
    assert_eq!(
        after.value("meshpath_map_entries", &[("map", "meshpath_sockets")]),
        0.0
    );
    assert_eq!(after.value("meshpath_sockets_tracked", &[]), 0.0);

    // HTTP: HEAD, 404, 405.
    let (status, headers, body) = http(&addr, "HEAD /metrics HTTP/1.1");
    assert_eq!(status, 200);
    assert!(body.is_empty(), "HEAD has no body");
    assert!(headers.contains("text/plain; version=0.0.4"), "{headers}");
    assert_eq!(http(&addr, "GET /nope HTTP/1.1").0, 404);
    assert_eq!(http(&addr, "POST /metrics HTTP/1.1").0, 405);
    assert_eq!(http(&addr, "GET /metrics?x=1 HTTP/1.0").0, 200);

    let (_, stderr) = stop(agent);
    assert!(!stderr.contains("error"), "{stderr:?}");
}

// ---------------------------------------------------------------------------
// A scrape, and a parser of the text exposition format 0.0.4 that checks
// what Prometheus and the conventions require.

/// (status, head, body) of one request on a fresh connection.
fn http(addr: &SocketAddr, request_line: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connecting to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{request_line}\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading the response");
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    if !request_line.starts_with("HEAD") {
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .parse()
            .unwrap();
        assert_eq!(len, body.len(), "Content-Length matches the body");
    }
    (status, head.to_string(), body.to_string())
}

fn scrape(addr: &SocketAddr) -> Exposition {
    let (status, head, body) = http(addr, "GET /metrics HTTP/1.1");
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.lines()
            .any(|l| l == "Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    Exposition::parse(&body)
}

/// Scrapes until `name{labels}` satisfies `ok` (10 s at most).
fn wait_metric(
    addr: &SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(addr);
        let v = m.value(name, labels);
        if ok(v) {
            return m;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} stayed at {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Family {
    kind: String,
    samples: BTreeMap<Vec<(String, String)>, f64>,
}

struct Exposition {
    families: BTreeMap<String, Family>,
}

impl Exposition {
    /// Parses and checks: every family has `# HELP` then `# TYPE` before
    /// its samples, and its samples together; names are
    /// `meshpath_[a-z0-9_]+`; counters end in `_total` and gauges do not;
    /// labels are `name="value"` with escapes; values are numbers; no
    /// series twice.
    fn parse(text: &str) -> Exposition {
        assert!(text.ends_with('\n'), "the exposition ends with a newline");
        let name_ok = |n: &str| {
            n.strip_prefix("meshpath_").is_some_and(|r| {
                !r.is_empty()
                    && r.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
        };
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut helped: BTreeSet<String> = BTreeSet::new();
        let mut current: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let at = || format!("line {}: {line:?}", i + 1);
            assert!(!line.trim().is_empty(), "empty {}", at());
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
                assert!(name_ok(name), "name {}", at());
                assert!(!help.trim().is_empty(), "empty help {}", at());
                assert!(helped.insert(name.to_string()), "HELP twice {}", at());
                assert!(!families.contains_key(name), "HELP after TYPE {}", at());
                current = Some(name.to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
                assert_eq!(
                    current.as_deref(),
                    Some(name),
                    "TYPE without its HELP {}",
                    at()
                );
                assert!(!families.contains_key(name), "TYPE twice {}", at());
                match kind {
                    "counter" => assert!(name.ends_with("_total"), "counter {}", at()),
                    "gauge" => assert!(!name.ends_with("_total"), "gauge {}", at()),
                    _ => panic!("type {kind:?} {}", at()),
                }
                families.insert(
                    name.to_string(),
                    Family {
                        kind: kind.to_string(),
                        samples: BTreeMap::new(),
                    },
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment {}", at());
            // A sample: name[{labels}] value
            let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("{}", at()));
            let name = &line[..name_end];
            assert!(name_ok(name), "name {}", at());
            assert_eq!(
                current.as_deref(),
                Some(name),
                "a sample outside its family (HELP/TYPE first, samples together) {}",
                at()
            );
            let fam = families
                .get_mut(name)
                .unwrap_or_else(|| panic!("sample before TYPE {}", at()));
            let mut rest = &line[name_end..];
            let mut labels = Vec::new();
            if let Some(r) = rest.strip_prefix('{') {
                rest = r;
                loop {
                    if let Some(r) = rest.strip_prefix('}') {
                        rest = r;
                        break;
                    }
                    let eq = rest.find('=').unwrap_or_else(|| panic!("{}", at()));
                    let key = &rest[..eq];
                    assert!(
                        !key.is_empty()
                            && !key.starts_with("__")
                            && key.chars().next().unwrap().is_ascii_alphabetic()
                            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "label name {key:?} {}",
                        at()
                    );
                    rest = rest[eq + 1..]
                        .strip_prefix('"')
                        .unwrap_or_else(|| panic!("unquoted label value {}", at()));
                    let mut value = String::new();
                    let mut chars = rest.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((_, '\\')) => match chars.next() {
                                Some((_, '\\')) => value.push('\\'),
                                Some((_, '"')) => value.push('"'),
                                Some((_, 'n')) => value.push('\n'),
                                _ => panic!("bad escape {}", at()),
                            },
                            Some((j, '"')) => break j,
                            Some((_, c)) => value.push(c),
                            None => panic!("unterminated label value {}", at()),
                        }
                    };
                    labels.push((key.to_string(), value));
                    rest = &rest[end + 1..];
                    if let Some(r) = rest.strip_prefix(',') {
                        rest = r;
                    } else {
                        assert!(rest.starts_with('}'), "{}", at());
                    }
                }
            }
            let value = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("no value {}", at()));
            let mut parts = value.split(' ');
            let v: f64 = parts
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("value {}", at()));
            if let Some(ts) = parts.next() {
                ts.parse::<i64>()
                    .unwrap_or_else(|_| panic!("timestamp {}", at()));
            }
            assert!(parts.next().is_none(), "{}", at());
            if fam.kind == "counter" {
                assert!(v >= 0.0, "a negative counter {}", at());
            }
            labels.sort();
            assert!(
                fam.samples.insert(labels, v).is_none(),
                "the same series twice {}",
                at()
            );
        }
        for (name, f) in &families {
            assert!(!f.samples.is_empty(), "{name} has no samples");
        }
        assert!(!families.is_empty());
        Exposition { families }
    }

    /// The value of `name{labels}`; panics when there is no such series.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let fam = self
            .families
            .get(name)
            .unwrap_or_else(|| panic!("no metric {name}"));
        let mut key: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        key.sort();
        *fam.samples
            .get(&key)
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
    }
}

// ---------------------------------------------------------------------------
// Errors: one line, exit 1.

#[test]
fn bad_observability_flags_and_a_missing_socket_are_one_line_errors() {
    let _serial = setup();
    let cg = scoped_cgroup();
    let dir = cg.path().to_string_lossy().into_owned();
    let tmp = TempDir::new();
    let not_a_socket = tmp.0.join("file");
    std::fs::write(&not_a_socket, "x").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let nas = not_a_socket.to_string_lossy().into_owned();
    for (args, needles) in [
        (vec!["--flows=xml"], vec!["--flows", "xml"]),
        (vec!["--flows", "json"], vec!["json"]),
        (
            vec!["--metrics", "localhost"],
            vec!["--metrics", "localhost"],
        ),
        (
            vec!["--metrics", taken.as_str()],
            vec!["--metrics", taken.as_str(), "in use"],
        ),
        (
            vec!["--flow-socket", nas.as_str()],
            vec!["--flow-socket", nas.as_str(), "not a socket"],
        ),
        (vec!["--node="], vec!["--node"]),
    ] {
        let mut full = vec!["--cgroup", dir.as_str()];
        full.extend(&args);
        let run = run_failing(&full);
        let line = run.one_line_error();
        for n in needles {
            assert!(line.contains(n), "{args:?}: {n:?} missing from {line}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(&not_a_socket).unwrap(),
        "x",
        "left alone"
    );

    // The client: no socket, no agent behind it, bad flags.
    let missing = tmp.0.join("missing.sock");
    let dead = tmp.0.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    for (args, needle) in [
        (
            vec!["--socket".into(), missing.to_string_lossy().into_owned()],
            "no such socket",
        ),
        (
            vec!["--socket".into(), dead.to_string_lossy().into_owned()],
            "nobody is serving",
        ),
        (vec!["--verdict".into(), "maybe".into()], "maybe"),
        (vec!["--count".into(), "0".into()], "--count"),
    ] {
        let run = run_failing_with(flows_bin(), &args, |_| {});
        assert_eq!(run.status.code(), Some(1), "{args:?}: {}", run.stderr);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {:?}", run.stderr);
        assert!(
            lines[0].starts_with("flows: error: ") && lines[0].contains(needle),
            "{args:?}: {}",
            lines[0]
        );
    }
}

// ---------------------------------------------------------------------------
// The line format, on crafted flows (no root needed).

fn crafted() -> proto::Flow {
    use proto::*;
    proto::Flow {
        time: Some(prost_types::Timestamp {
            seconds: 1_709_251_199, // 2024-02-29T23:59:59Z
            nanos: 500_000_000,
        }),
        verdict: proto::Verdict::Dropped as i32,
        ip: Some(Ip {
            source: "::1".into(),
            destination: "fd00::\"2".into(),
            ip_version: IpVersion::IPv6 as i32,
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Udp(Udp {
                source_port: 5353,
                destination_port: 53,
            })),
        }),
        source: Some(Endpoint {
            identity: 77,
            labels: vec![],
        }),
        destination: Some(Endpoint {
            identity: 1,
            labels: vec!["reserved:host".into()],
        }),
        r#type: FlowType::L3L4 as i32,
        node_name: "n1".into(),
        traffic_direction: TrafficDirection::Ingress as i32,
        drop_reason_desc: DropReason::AuthRequired as i32,
        is_reply: Some(true),
        interface: Some(NetworkInterface {
            index: 7,
            name: "eth7".into(),
        }),
        socket_cookie: u64::MAX,
        cgroup_id: 0,
        event_kind: EventKind::PacketVerdict as i32,
        point: EnforcementPoint::Xdp as i32,
        count: 3,
        policy_rule: Some(4),
        short_circuit: None,
    }
}

#[test]
fn text_lines_carry_every_field() {
    let line = flowfmt::text(&crafted());
    assert_eq!(
        line,
        "2024-02-29T23:59:59.500Z DROPPED    xdp           udp [::1]:5353 -> [fd00::\"2]:53 \
         77 -> host auth-required rule 4 reply on eth7 x3"
    );
    let mut f = crafted();
    f.time = Some(prost_types::Timestamp {
        seconds: 0,
        nanos: 0,
    });
    f.source = None;
    f.destination = None;
    f.l4 = None;
    f.count = 1;
    f.policy_rule = None;
    f.is_reply = Some(false);
    f.interface = None;
    f.drop_reason_desc = 0;
    assert_eq!(
        flowfmt::text(&f),
        "1970-01-01T00:00:00.000Z DROPPED    xdp           ip ::1 -> fd00::\"2"
    );
}

#[test]
fn json_lines_follow_the_protobuf_json_mapping() {
    let v: Value = serde_json::from_str(&flowfmt::json(&crafted())).expect("valid JSON");
    assert_eq!(
        v,
        serde_json::json!({
            "time": "2024-02-29T23:59:59.500Z",
            "verdict": "DROPPED",
            "IP": {"source": "::1", "destination": "fd00::\"2", "ipVersion": "IPv6"},
            "l4": {"UDP": {"source_port": 5353, "destination_port": 53}},
            "source": {"identity": "77"},
            "destination": {"identity": "1", "labels": ["reserved:host"]},
            "Type": "L3_L4",
            "node_name": "n1",
            "traffic_direction": "INGRESS",
            "drop_reason_desc": "AUTH_REQUIRED",
            "is_reply": true,
            "interface": {"index": 7, "name": "eth7"},
            "socket_cookie": "18446744073709551615",
            "event_kind": "PACKET_VERDICT",
            "point": "XDP",
            "count": 3,
            "policy_rule": 4
        })
    );
    // Field order is the .proto's; unknown enum values are numbers;
    // fractional seconds take 0, 3, 6 or 9 digits.
    let mut f = crafted();
    f.verdict = 99;
    f.time = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: 1_000,
    });
    let text = flowfmt::json(&f);
    assert!(text.starts_with(r#"{"time":"1970-01-01T00:00:01.000001Z","verdict":99,"IP":"#));
    f.time = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: 0,
    });
    assert!(flowfmt::json(&f).starts_with(r#"{"time":"1970-01-01T00:00:01Z""#));
    f.time = Some(prost_types::Timestamp {
        seconds: 4_102_444_800 + 86_399, // 2100-01-01T23:59:59
        nanos: 123_456_789,
    });
    assert!(flowfmt::json(&f).starts_with(r#"{"time":"2100-01-01T23:59:59.123456789Z""#));
}

#[test]
fn the_time_parser_of_these_tests_agrees_with_the_clock() {
    // Guards parse_rfc3339, which checks the agent's times above.
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), 0.0);
    assert_eq!(parse_rfc3339("2024-02-29T23:59:59.5Z"), 1_709_251_199.5);
    assert_eq!(parse_rfc3339("2100-01-01T23:59:59Z"), 4_102_531_199.0);
}
