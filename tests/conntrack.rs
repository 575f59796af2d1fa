//! Stateful packet verdicts, tried as an attacker would: a packet is a
//! reply only when a flow that policy allowed in the other direction
//! really exists. Crafted packets through the XDP program
//! (BPF_PROG_TEST_RUN, IPv4 and IPv6, TCP, UDP and ICMP), then real UDP
//! sockets through cgroup_skb. Root only (fails loudly otherwise).

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::time::Duration;

use common::packets::*;
use common::*;
use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
use meshpath::{Datapath, DatapathOptions};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const CART: &str = "spiffe://mesh.local/ns/shop/sa/cart";
const DB: &str = "spiffe://mesh.local/ns/shop/sa/db";

// Crafted packets only: these addresses never reach a wire.
const CART4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const DB4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const OUT4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3); // no endpoint: world
const CART6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const DB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
const OUT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 3);

/// The two families' addresses: (cart, db, outside).
fn families() -> [(IpAddr, IpAddr, IpAddr); 2] {
    [
        (CART4.into(), DB4.into(), OUT4.into()),
        (CART6.into(), DB6.into(), OUT6.into()),
    ]
}

fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new(&CART4.to_string(), CART).unwrap(),
        Endpoint::new(&DB4.to_string(), DB).unwrap(),
        Endpoint::new(&CART6.to_string(), CART).unwrap(),
        Endpoint::new(&DB6.to_string(), DB).unwrap(),
    ]
}

fn ip_packet(src: IpAddr, dst: IpAddr, l4_proto: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth(ETH_P_IP, &ipv4(s, d, l4_proto, l4)),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let p = if l4_proto == P_ICMP {
                P_ICMPV6
            } else {
                l4_proto
            };
            eth(ETH_P_IPV6, &ipv6(s, d, p, l4))
        }
        _ => unreachable!("one family per packet"),
    }
}

fn udp_pkt(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    ip_packet(src, dst, P_UDP, &udp(sport, dport, b"q"))
}

fn tcp_pkt(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    ip_packet(src, dst, P_TCP, &tcp(sport, dport, flags))
}

/// An echo request (`request`) or reply with identifier `id`.
fn echo(src: IpAddr, dst: IpAddr, request: bool, id: u16) -> Vec<u8> {
    let ty = match (src.is_ipv4(), request) {
        (true, true) => 8,
        (true, false) => 0,
        (false, true) => 128,
        (false, false) => 129,
    };
    ip_packet(src, dst, P_ICMP, &icmp_echo(ty, id))
}

/// An ICMP error (destination unreachable) from `src` to `dst`.
fn unreachable_from(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let ty = if src.is_ipv4() { 3 } else { 1 };
    ip_packet(src, dst, P_ICMP, &[ty, 0, 0, 0, 0, 0, 0, 0])
}

fn load() -> Datapath {
    require_root();
    Datapath::load(&DatapathOptions::default().probe_quirks(false)).expect("loading the datapath")
}

/// Runs `packet` through the XDP program and checks its action.
#[track_caller]
fn expect(dp: &Datapath, what: &str, packet: &[u8], action: u32) {
    let got = dp.test_run_xdp(packet).expect("BPF_PROG_TEST_RUN");
    let name = |a| if a == XDP_PASS { "PASS" } else { "DROP" };
    assert_eq!(got, action, "{what}: {}, want {}", name(got), name(action));
}

/// A DNS-style rule (`cart -> * udp 53`) no longer lets anyone who sends
/// from port 53 reach every UDP port of cart.
#[test]
fn sending_from_an_allowed_port_is_not_a_reply() {
    let dp = load();
    dp.replace_policy(&PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: endpoints(),
        policies: vec![Rule::new(CART, "*", "udp", &[53], "allow").unwrap()],
    })
    .unwrap();
    for (cart, db, out) in families() {
        // From outside the mesh and from a mesh identity, to any port.
        for from in [out, db] {
            for port in [5353, 40000, 22] {
                let p = udp_pkt(from, 53, cart, port);
                expect(&dp, &format!("{from}:53 -> {cart}:{port}"), &p, XDP_DROP);
            }
        }
        // cart asks: the answer to exactly that query passes, nothing else.
        expect(&dp, "query", &udp_pkt(cart, 40001, out, 53), XDP_PASS);
        expect(&dp, "answer", &udp_pkt(out, 53, cart, 40001), XDP_PASS);
        expect(
            &dp,
            "to another port",
            &udp_pkt(out, 53, cart, 40002),
            XDP_DROP,
        );
        expect(
            &dp,
            "from another host",
            &udp_pkt(db, 53, cart, 40001),
            XDP_DROP,
        );
        expect(
            &dp,
            "from another port",
            &udp_pkt(out, 54, cart, 40001),
            XDP_DROP,
        );
    }
}

/// With `default_action: allow`, a matching deny (or auth) wins for every
/// protocol: a denied datagram, echo or segment is never passed as a
/// "reply" because the reverse direction is allowed by default.
#[test]
fn a_deny_or_auth_rule_wins_under_default_allow() {
    let dp = load();
    dp.replace_policy(&PolicyState {
        default_action: DefaultAction::Allow,
        endpoints: endpoints(),
        policies: vec![
            Rule::new(CART, DB, "udp", &[53], "deny").unwrap(),
            Rule::new(CART, DB, "icmp", &[], "deny").unwrap(),
            Rule::new(CART, DB, "tcp", &[80], "deny").unwrap(),
            Rule::new(CART, DB, "udp", &[443], "auth").unwrap(),
        ],
    })
    .unwrap();
    for (cart, db, _) in families() {
        expect(&dp, "udp deny", &udp_pkt(cart, 40000, db, 53), XDP_DROP);
        expect(&dp, "icmp deny", &echo(cart, db, true, 7), XDP_DROP);
        expect(
            &dp,
            "icmp deny, as a reply",
            &echo(cart, db, false, 7),
            XDP_DROP,
        );
        for flags in [SYN, ACK, ACK | FIN, RST] {
            let p = tcp_pkt(cart, 40000, db, 80, flags);
            expect(&dp, &format!("tcp deny, flags {flags:#x}"), &p, XDP_DROP);
        }
        // auth fails closed: not authenticated, never a "reply".
        expect(&dp, "udp auth", &udp_pkt(cart, 40000, db, 443), XDP_DROP);
        // The other direction is allowed by default, as a flow of its own.
        expect(&dp, "db -> cart", &udp_pkt(db, 53, cart, 40000), XDP_PASS);
    }
}

/// (protocol, the packet that starts a flow, a later one, a reply)
type Flow = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>);

/// Allowed, then denied, then allowed again: the same for UDP, ICMP and
/// TCP, in both directions, at the next packet.
#[test]
fn policy_changes_apply_to_both_directions_of_every_protocol() {
    let dp = load();
    let allow = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: endpoints(),
        policies: vec![
            Rule::new(CART, DB, "udp", &[53], "allow").unwrap(),
            Rule::new(CART, DB, "icmp", &[], "allow").unwrap(),
            Rule::new(CART, DB, "tcp", &[80], "allow").unwrap(),
        ],
    };
    let deny = PolicyState {
        policies: vec![],
        ..allow.clone()
    };
    for (cart, db, _) in families() {
        let flows: [Flow; 3] = [
            (
                "udp",
                udp_pkt(cart, 41000, db, 53),
                udp_pkt(cart, 41000, db, 53),
                udp_pkt(db, 53, cart, 41000),
            ),
            (
                "icmp",
                echo(cart, db, true, 41),
                echo(cart, db, true, 41),
                echo(db, cart, false, 41),
            ),
            (
                "tcp",
                tcp_pkt(cart, 41000, db, 80, SYN),
                tcp_pkt(cart, 41000, db, 80, ACK),
                tcp_pkt(db, 80, cart, 41000, ACK),
            ),
        ];
        for (proto, start, more, reply) in &flows {
            // Denied first: nothing is tracked, no "reply" passes.
            dp.replace_policy(&deny).unwrap();
            expect(&dp, &format!("{proto} denied"), start, XDP_DROP);
            expect(&dp, &format!("{proto} reply, denied"), reply, XDP_DROP);
            // Allowed: a reply needs the flow to have started.
            dp.replace_policy(&allow).unwrap();
            expect(&dp, &format!("{proto} reply first"), reply, XDP_DROP);
            expect(&dp, &format!("{proto} starts"), start, XDP_PASS);
            expect(&dp, &format!("{proto} more"), more, XDP_PASS);
            expect(&dp, &format!("{proto} reply"), reply, XDP_PASS);
            // Denied again: both directions stop at once.
            dp.replace_policy(&deny).unwrap();
            expect(&dp, &format!("{proto} more, denied"), more, XDP_DROP);
            expect(&dp, &format!("{proto} reply, denied"), reply, XDP_DROP);
            // And allowed again: the tracked flow goes on.
            dp.replace_policy(&allow).unwrap();
            expect(&dp, &format!("{proto} more, allowed"), more, XDP_PASS);
            expect(&dp, &format!("{proto} reply, allowed"), reply, XDP_PASS);
        }
    }
}

/// What can never be a reply, and what never starts a flow.
#[test]
fn syns_echo_requests_and_icmp_errors_are_judged_on_their_own() {
    let dp = load();
    dp.replace_policy(&PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: endpoints(),
        policies: vec![
            Rule::new(CART, DB, "tcp", &[80], "allow").unwrap(),
            Rule::new(CART, DB, "icmp", &[], "allow").unwrap(),
        ],
    })
    .unwrap();
    for (cart, db, out) in families() {
        expect(&dp, "syn", &tcp_pkt(cart, 42000, db, 80, SYN), XDP_PASS);
        // A SYN from the other end is a new flow, denied.
        expect(
            &dp,
            "syn back",
            &tcp_pkt(db, 80, cart, 42000, SYN),
            XDP_DROP,
        );
        expect(
            &dp,
            "syn-ack",
            &tcp_pkt(db, 80, cart, 42000, SYN | ACK),
            XDP_PASS,
        );
        // An echo request from db is no reply to cart's echo flow.
        expect(&dp, "echo", &echo(cart, db, true, 9), XDP_PASS);
        expect(&dp, "echo back", &echo(db, cart, true, 9), XDP_DROP);
        expect(&dp, "echo reply", &echo(db, cart, false, 9), XDP_PASS);
        expect(
            &dp,
            "echo reply, other id",
            &echo(db, cart, false, 10),
            XDP_DROP,
        );
        // An unsolicited echo reply does not open a flow for requests.
        expect(&dp, "stray reply", &echo(out, cart, false, 11), XDP_DROP);
        // ICMP errors: judged as ICMP from their sender.
        expect(&dp, "error, allowed", &unreachable_from(cart, db), XDP_PASS);
        expect(&dp, "error, denied", &unreachable_from(db, cart), XDP_DROP);
    }
}

/// Entries live as long as their protocol and state say, and a full map
/// evicts the least recently used flows instead of failing packets.
#[test]
fn lifetimes_and_eviction() {
    require_root();
    let dp = Datapath::load(
        &DatapathOptions::default()
            .probe_quirks(false)
            .max_conntrack(64),
    )
    .expect("loading the datapath");
    dp.replace_policy(&PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: endpoints(),
        policies: vec![
            Rule::new(CART, DB, "tcp", &[80], "allow").unwrap(),
            Rule::new(CART, DB, "udp", &[53], "allow").unwrap(),
        ],
    })
    .unwrap();
    let (cart, db) = (IpAddr::from(CART4), IpAddr::from(DB4));
    expect(&dp, "udp", &udp_pkt(cart, 43000, db, 53), XDP_PASS);
    expect(&dp, "syn", &tcp_pkt(cart, 43001, db, 80, SYN), XDP_PASS);
    let flow = |port: u16| {
        dp.conntrack()
            .unwrap()
            .into_iter()
            .find(|f| f.source.port() == port)
            .unwrap_or_else(|| panic!("no flow from port {port}"))
    };
    let minute = Duration::from_secs(60);
    assert!(flow(43000).expires_in <= minute && flow(43000).expires_in > minute / 2);
    assert!(
        flow(43001).expires_in <= minute,
        "a TCP flow not yet answered"
    );
    expect(
        &dp,
        "syn-ack",
        &tcp_pkt(db, 80, cart, 43001, SYN | ACK),
        XDP_PASS,
    );
    assert!(flow(43001).replied);
    assert!(flow(43001).expires_in > Duration::from_secs(5 * 3600));
    expect(&dp, "rst", &tcp_pkt(cart, 43001, db, 80, RST), XDP_PASS);
    assert!(flow(43001).closing);
    assert!(flow(43001).expires_in <= Duration::from_secs(10));
    // A flood of new allowed flows: the map stays at its size, the newest
    // flows are tracked, every packet got its verdict.
    for port in 0..1000u16 {
        expect(&dp, "flood", &udp_pkt(cart, 20000 + port, db, 53), XDP_PASS);
    }
    let n = dp.conntrack().unwrap().len();
    assert!(n <= 64, "{n} entries in a map of 64");
    expect(
        &dp,
        "latest answer",
        &udp_pkt(db, 53, cart, 20999),
        XDP_PASS,
    );
}

/// The same attack with real sockets over loopback, judged by cgroup_skb
/// ingress: a workload of the attached cgroup allowed to query port 53
/// gets answers to its queries only; a process outside the cgroup sending
/// from port 53 to its other port is dropped before the socket sees it.
#[test]
fn real_udp_from_an_allowed_port_reaches_only_the_port_that_asked() {
    let env = Env::new("ct_udp");
    env.dp
        .replace_policy(&PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: vec![Endpoint::new("127.0.0.2", CART).unwrap()],
            policies: vec![Rule::new(CART, "*", "udp", &[53], "allow").unwrap()],
        })
        .unwrap();
    // The "DNS server" (and attacker) outside the cgroup, on port 53.
    let dns = UdpSocket::bind("127.0.0.9:53").expect("binding 127.0.0.9:53");
    let (asker, bystander) = env.inside(|| {
        (
            UdpSocket::bind("127.0.0.2:0").unwrap(),
            UdpSocket::bind("127.0.0.2:0").unwrap(),
        )
    });
    for s in [&asker, &bystander, &dns] {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
    }
    let mut buf = [0u8; 16];
    // Unsolicited, from port 53: dropped (the old stateless guess let it in).
    dns.send_to(b"unsolicited", bystander.local_addr().unwrap())
        .unwrap();
    assert!(
        bystander.recv_from(&mut buf).is_err(),
        "a datagram from port 53 reached a port that never asked"
    );
    // A query and its answer.
    asker.send_to(b"query", dns.local_addr().unwrap()).unwrap();
    let (n, from) = dns.recv_from(&mut buf).expect("the query arrives");
    assert_eq!(&buf[..n], b"query");
    dns.send_to(b"answer", from).unwrap();
    let (n, _) = asker.recv_from(&mut buf).expect("the answer arrives");
    assert_eq!(&buf[..n], b"answer");
    // The flow to the asker does not open the bystander.
    dns.send_to(b"again", bystander.local_addr().unwrap())
        .unwrap();
    assert!(bystander.recv_from(&mut buf).is_err());
    assert!(env
        .dp
        .conntrack()
        .unwrap()
        .iter()
        .any(|f| f.source == asker.local_addr().unwrap() && f.replied));
}
