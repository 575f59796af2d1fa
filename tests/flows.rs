//! Flow events: known traffic produces exactly the expected events; floods
//! are aggregated; ring losses are counted. Root only.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
use meshpath::{
    AttachOptions, DatapathOptions, Flow, FlowKind, FlowReader, Point, TrafficDirection, Verdict,
};

const FE: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
const DB: &str = "spiffe://mesh.local/ns/db/sa/postgres";
const CACHE: &str = "spiffe://mesh.local/ns/shop/sa/cache";

fn connect_from(src: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
    connect_tcp(bound_tcp(src)?, dst)
}

/// Every event within `quiet` of the last one.
fn drain(r: &mut FlowReader, quiet: Duration) -> Vec<Flow> {
    let mut out = Vec::new();
    while let Some(f) = r.poll(quiet).unwrap() {
        out.push(f);
    }
    out
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn known_traffic_produces_exactly_the_expected_flows() {
    let env = Env::new("flows_exact");
    let db = env.inside(|| TcpListener::bind("127.0.0.3:0").unwrap());
    let db_addr = db.local_addr().unwrap();
    let cache = env.inside(|| TcpListener::bind("127.0.0.4:0").unwrap());
    let cache_addr = cache.local_addr().unwrap();
    env.dp
        .replace_policy(&PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: vec![
                Endpoint::new("127.0.0.2", FE).unwrap(),
                Endpoint::new("127.0.0.3", DB).unwrap(),
                Endpoint::new("127.0.0.4", CACHE).unwrap(),
            ],
            policies: vec![
                Rule::new(FE, DB, "tcp", &[db_addr.port()], "allow").unwrap(),
                Rule::new(CACHE, DB, "tcp", &[], "deny").unwrap(),
                Rule::new(FE, CACHE, "tcp", &[cache_addr.port()], "audit").unwrap(),
            ],
        })
        .unwrap();
    let mut reader = env.dp.flows().unwrap();
    assert!(env.dp.flows().is_err(), "one reader at a time");

    // 1. frontend -> db, allowed, short-circuited, 10 round trips of 100 B.
    let (mut c, mut s) = env.inside(|| {
        let c = connect_from("127.0.0.2", db_addr).unwrap();
        let (s, _) = db.accept().unwrap();
        (c, s)
    });
    let client_port = c.local_addr().unwrap().port();
    for _ in 0..10 {
        c.write_all(&[1u8; 100]).unwrap();
        let mut b = [0u8; 100];
        s.read_exact(&mut b).unwrap();
        s.write_all(&[2u8; 60]).unwrap();
        let mut b = [0u8; 60];
        c.read_exact(&mut b).unwrap();
    }
    drop(c);
    drop(s);
    // 2. cache -> db: a deny rule, EPERM.
    env.inside(|| assert!(connect_from("127.0.0.4", db_addr).is_err()));
    // 3. frontend -> cache: audit.
    let audited = env.inside(|| connect_from("127.0.0.2", cache_addr).unwrap());
    drop(audited);

    let flows = drain(&mut reader, Duration::from_millis(500));
    let of = |k: FlowKind, v: Verdict| {
        flows
            .iter()
            .filter(|f| f.kind == k && f.verdict == v)
            .collect::<Vec<_>>()
    };

    let allowed = of(FlowKind::Policy, Verdict::Allow);
    assert_eq!(allowed.len(), 1, "{flows:#?}");
    let a = allowed[0];
    assert_eq!(
        (a.point, a.source, a.destination),
        (Point::Connect, ip("127.0.0.2"), ip("127.0.0.3"))
    );
    assert_eq!(a.destination_port, db_addr.port());
    assert_eq!(a.source_name.as_deref(), Some(FE));
    assert_eq!(a.destination_name.as_deref(), Some(DB));
    assert_eq!(a.rule, Some(0));
    assert_eq!(a.direction, TrafficDirection::Egress);
    assert!(a.socket_cookie != 0 && a.cgroup_id != 0);

    let opened = of(FlowKind::ShortCircuitOpen, Verdict::Allow);
    assert_eq!(opened.len(), 1, "{flows:#?}");
    assert_eq!(
        (opened[0].source_port, opened[0].destination_port),
        (client_port, db_addr.port())
    );
    let closed = of(FlowKind::ShortCircuitClose, Verdict::Allow);
    assert_eq!(closed.len(), 1, "{flows:#?}");
    let t = closed[0].short_circuit.unwrap();
    assert_eq!(
        (t.tx_messages, t.tx_bytes, t.rx_messages, t.rx_bytes),
        (10, 1000, 10, 600)
    );

    let denied = of(FlowKind::Policy, Verdict::Deny);
    assert_eq!(denied.len(), 1, "{flows:#?}");
    assert_eq!(
        (denied[0].source, denied[0].rule),
        (ip("127.0.0.4"), Some(1))
    );
    assert_eq!(denied[0].count, 1);

    let audit = of(FlowKind::Policy, Verdict::Audit);
    assert_eq!(audit.len(), 1, "{flows:#?}");
    assert_eq!(
        (audit[0].destination_port, audit[0].rule),
        (cache_addr.port(), Some(2))
    );
    // The audited flow's first packet is reported where it leaves and
    // where it arrives (both ends are in the cgroup), once each.
    let audit_pkts = of(FlowKind::Packet, Verdict::Audit);
    let mut points: Vec<Point> = audit_pkts.iter().map(|f| f.point).collect();
    points.sort();
    assert_eq!(points, vec![Point::Ingress, Point::Egress], "{flows:#?}");
    assert!(
        audit_pkts.iter().all(|f| f.tcp_flags & 0x12 == 0x02),
        "the SYN"
    );

    // Audit passes: that connection is short-circuited too.
    assert_eq!(
        of(FlowKind::ShortCircuitOpen, Verdict::Audit).len(),
        1,
        "{flows:#?}"
    );
    assert_eq!(
        of(FlowKind::ShortCircuitClose, Verdict::Audit).len(),
        1,
        "{flows:#?}"
    );

    assert_eq!(flows.len(), 9, "nothing else: {flows:#?}");
    // The protobuf carries the same facts.
    let p = denied[0].to_proto("node-a");
    assert_eq!(p.drop_reason_desc, 181);
    assert_eq!(p.ip.as_ref().unwrap().source, "127.0.0.4");
}

#[test]
fn a_flood_of_denied_datagrams_is_aggregated_and_accounted_for() {
    let env = Env::new("flows_flood");
    let db = env.inside(|| UdpSocket::bind("127.0.0.3:0").unwrap());
    let db_addr = db.local_addr().unwrap();
    env.dp
        .replace_policy(&PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: vec![Endpoint::new("127.0.0.3", DB).unwrap()],
            policies: vec![],
        })
        .unwrap();
    let mut reader = env.dp.flows().unwrap();
    let before = env.counters();
    let vbefore = env.dp.verdicts().unwrap();
    // From outside the cgroup (nothing judges the send): the workload's
    // ingress hook drops every datagram.
    let outside = UdpSocket::bind("127.0.0.4:0").unwrap();
    let n = 20_000u64;
    for i in 0..n {
        outside.send_to(&i.to_le_bytes(), db_addr).unwrap();
    }
    let flows = drain(&mut reader, Duration::from_millis(300));
    let d = env.counters().since(&before);
    let v = env.dp.verdicts().unwrap().since(&vbefore);
    assert_eq!(
        v.get(Point::Ingress, Verdict::Deny),
        n,
        "every datagram judged and dropped"
    );
    let drops: Vec<_> = flows
        .iter()
        .filter(|f| f.kind == FlowKind::Packet)
        .collect();
    assert!(
        !drops.is_empty() && drops.len() < 50,
        "aggregated: {} events",
        drops.len()
    );
    // Each datagram either sent an event or was folded into a later one.
    assert_eq!(drops.len() as u64 + d.events_aggregated, n, "{d:?}");
    let reported: u64 = drops.iter().map(|f| u64::from(f.count)).sum();
    assert!(reported <= n);
    assert_eq!(d.events_lost, 0);
    db.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(
        db.recv_from(&mut [0u8; 8]).is_err(),
        "nothing was delivered"
    );
}

#[test]
fn events_the_ring_has_no_room_for_are_counted() {
    // A one-page ring (32 events) and 400 allowed connects nobody reads.
    let env = Env::with(
        "flows_loss",
        DatapathOptions::default().event_ring_bytes(4096),
        AttachOptions::default(),
    );
    let l = env.inside(|| TcpListener::bind("127.0.0.3:0").unwrap());
    let addr = l.local_addr().unwrap();
    env.dp
        .replace_policy(&PolicyState {
            default_action: DefaultAction::Allow,
            endpoints: vec![],
            policies: vec![],
        })
        .unwrap();
    let mut reader = env.dp.flows().unwrap();
    let before = env.counters();
    let n = 400;
    env.inside(|| {
        for _ in 0..n {
            let c = connect_from("127.0.0.2", addr).unwrap();
            let (s, _) = l.accept().unwrap();
            drop((c, s));
        }
    });
    let flows = drain(&mut reader, Duration::from_millis(300));
    let d = env.counters().since(&before);
    let connects = flows
        .iter()
        .filter(|f| f.kind == FlowKind::Policy && f.point == Point::Connect)
        .count() as u64;
    assert!(d.events_lost > 0, "a 32-event ring overflowed: {d:?}");
    // Every event was either read or counted as lost: nothing vanished.
    let all_events = flows.len() as u64 + d.events_lost;
    assert!(
        all_events >= n as u64 * 3,
        "connect + open + close per connection: {all_events}"
    );
    assert!(connects <= n as u64);
}

#[test]
fn flows_arrive_as_a_tokio_stream() {
    let env = Env::new("flows_tokio");
    let l = env.inside(|| TcpListener::bind("127.0.0.3:0").unwrap());
    let addr = l.local_addr().unwrap();
    env.dp.replace_policy(&PolicyState::default()).unwrap();
    let reader = env.dp.flows().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pair = env.inside(|| {
        let c = connect_from("127.0.0.2", addr).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    });
    let got: Vec<Flow> = rt.block_on(async move {
        let mut stream = meshpath::FlowStream::new(reader).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < 2 && Instant::now() < deadline {
            let next = std::future::poll_fn(|cx| {
                futures_core::Stream::poll_next(std::pin::Pin::new(&mut stream), cx)
            });
            match tokio::time::timeout(Duration::from_secs(5), next).await {
                Ok(Some(f)) => out.push(f.unwrap()),
                _ => break,
            }
        }
        out
    });
    drop(pair);
    let kinds: Vec<FlowKind> = got.iter().map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        vec![FlowKind::Policy, FlowKind::ShortCircuitOpen],
        "{got:#?}"
    );
}
