//! The XDP policy program on crafted packets, through BPF_PROG_TEST_RUN
//! (nothing is attached, no packet is sent): a table of packets, well
//! formed and malformed, each with the action and the one verdict counter
//! it must produce. Root only (fails loudly otherwise).

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use common::packets::*;
use common::require_root;
use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
use meshpath::{
    Datapath, DatapathOptions, Error, FlowKind, Point, TrafficDirection, Verdict, Verdicts, XdpMode,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const CLIENT: &str = "spiffe://mesh.local/ns/test/sa/client";
const SERVER: &str = "spiffe://mesh.local/ns/test/sa/server";
const GATEWAY: &str = "spiffe://mesh.local/ns/test/sa/gateway";

// Crafted packets only: these addresses never reach a wire.
const C4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const S4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const W4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3); // no endpoint: world
const G4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const S6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const AUDIT_PORT: u16 = 8080;
const AUTH_PORT: u16 = 8443;
const EPHEMERAL: u16 = 40000;

/// Default deny; the client may reach the server on TCP 80, UDP 53 and
/// ICMP, audited on TCP 8080, auth on TCP 8443; anything to the gateway.
fn standard_state() -> PolicyState {
    PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new(&C4.to_string(), CLIENT).unwrap(),
            Endpoint::new(&S4.to_string(), SERVER).unwrap(),
            Endpoint::new(&G4.to_string(), GATEWAY).unwrap(),
            Endpoint::new(&C6.to_string(), CLIENT).unwrap(),
            Endpoint::new(&S6.to_string(), SERVER).unwrap(),
        ],
        policies: vec![
            Rule::new(CLIENT, SERVER, "tcp", &[TCP_PORT], "allow").unwrap(),
            Rule::new(CLIENT, SERVER, "udp", &[UDP_PORT], "allow").unwrap(),
            Rule::new(CLIENT, SERVER, "icmp", &[], "allow").unwrap(),
            Rule::new(CLIENT, SERVER, "tcp", &[AUDIT_PORT], "audit").unwrap(),
            Rule::new(CLIENT, SERVER, "tcp", &[AUTH_PORT], "auth").unwrap(),
            Rule::new(CLIENT, GATEWAY, "any", &[], "allow").unwrap(),
        ],
    }
}

/// Default allow, no rule: only parsing can drop.
fn allow_all_state() -> PolicyState {
    PolicyState {
        default_action: DefaultAction::Allow,
        endpoints: standard_state().endpoints,
        policies: vec![],
    }
}

// ---------------------------------------------------------------------
// Packet builder. Checksums are left zero: XDP does not verify them.
// ---------------------------------------------------------------------

/// A hop-by-hop or destination options header of `len` bytes (a
/// multiple of 8), padded with PadN.
fn opts_hdr(next: u8, len: usize) -> Vec<u8> {
    assert!(len >= 8 && len % 8 == 0);
    let mut h = vec![next, (len / 8 - 1) as u8, 1, (len - 4) as u8];
    h.resize(len, 0);
    h
}

/// A routing header (type 4, segment routing) with one address,
/// segments left 0.
fn routing_hdr(next: u8) -> Vec<u8> {
    let mut h = vec![next, 2, 4, 0, 0, 0, 0, 0];
    h.extend_from_slice(&S6.octets());
    h
}

/// An authentication header with a 12-byte ICV (24 bytes in all).
fn ah_hdr(next: u8) -> Vec<u8> {
    let mut h = vec![next, 4, 0, 0];
    h.extend_from_slice(&0x100u32.to_be_bytes()); // SPI
    h.extend_from_slice(&1u32.to_be_bytes()); // sequence
    h.resize(24, 0);
    h
}

/// A fragment header: `offset` in 8-byte units, `more` fragments.
fn frag_hdr(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&0xabcd_0001u32.to_be_bytes());
    h
}

fn arp() -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4, 0, 1]; // Ethernet/IPv4, request
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    a.extend_from_slice(&C4.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&S4.octets());
    a
}

fn v4_tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_P_IP, &ipv4(src, dst, P_TCP, &tcp(sport, dport, flags)))
}

fn v6_tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_P_IPV6, &ipv6(C6, S6, P_TCP, &tcp(sport, dport, flags)))
}

/// IPv6 from the client to the server with extension headers `exts`
/// (each built with `next` set by the caller) and TCP to `dport`.
fn v6_chain(first: u8, exts: &[Vec<u8>], l4: &[u8]) -> Vec<u8> {
    let mut rest = Vec::new();
    for e in exts {
        rest.extend_from_slice(e);
    }
    rest.extend_from_slice(l4);
    eth(ETH_P_IPV6, &ipv6(C6, S6, first, &rest))
}

/// `n` destination options headers, then TCP to `dport`.
fn v6_many_exts(n: usize, dport: u16) -> Vec<u8> {
    let exts: Vec<Vec<u8>> = (0..n)
        .map(|i| opts_hdr(if i + 1 == n { P_TCP } else { P_DSTOPTS }, 8))
        .collect();
    v6_chain(P_DSTOPTS, &exts, &tcp(EPHEMERAL, dport, SYN))
}

fn truncate(mut p: Vec<u8>, len: usize) -> Vec<u8> {
    assert!(len < p.len(), "truncating to {len} of {}", p.len());
    p.truncate(len);
    p
}

fn set(mut p: Vec<u8>, at: usize, byte: u8) -> Vec<u8> {
    p[at] = byte;
    p
}

// ---------------------------------------------------------------------
// The table.
// ---------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Standard,
    AllowAll,
}

struct Case {
    name: &'static str,
    packet: Vec<u8>,
    state: State,
    action: u32,
    verdict: Verdict,
}

fn case(name: &'static str, packet: Vec<u8>, action: u32, verdict: Verdict) -> Case {
    Case {
        name,
        packet,
        state: State::Standard,
        action,
        verdict,
    }
}

fn table() -> Vec<Case> {
    use Verdict::*;
    const L3: usize = 14; // IP header offset behind plain Ethernet
    let eph = EPHEMERAL;
    let v4_udp = |src, sport, dst, dport| {
        eth(
            ETH_P_IP,
            &ipv4(src, dst, P_UDP, &udp(sport, dport, b"hello")),
        )
    };
    let v4_icmp = |src, dst, ty| eth(ETH_P_IP, &ipv4(src, dst, P_ICMP, &icmp(ty)));
    let syn80 = || ipv4(C4, S4, P_TCP, &tcp(eph, TCP_PORT, SYN));
    let syn81 = || ipv4(C4, S4, P_TCP, &tcp(eph, 81, SYN));
    // IPv4 options: NOP, NOP, EOL, padding. Read as a TCP header (as a
    // parser ignoring ihl would), their bytes say destination port 80.
    let opts = [1u8, 1, 0, 80, 0, 0, 0, 0];
    let mut rows = vec![
        // TCP, forward and reply.
        case(
            "tcp syn allowed",
            v4_tcp(C4, eph, S4, TCP_PORT, SYN),
            XDP_PASS,
            Allow,
        ),
        case(
            "tcp syn to another port denied",
            v4_tcp(C4, eph, S4, 81, SYN),
            XDP_DROP,
            Deny,
        ),
        case(
            "tcp syn from world denied",
            v4_tcp(W4, eph, S4, TCP_PORT, SYN),
            XDP_DROP,
            Deny,
        ),
        case(
            "tcp ack forward allowed",
            v4_tcp(C4, eph, S4, TCP_PORT, ACK),
            XDP_PASS,
            Allow,
        ),
        case(
            "tcp syn-ack reply passes",
            v4_tcp(S4, TCP_PORT, C4, eph, SYN | ACK),
            XDP_PASS,
            Allow,
        ),
        case(
            "tcp ack reply passes",
            v4_tcp(S4, TCP_PORT, C4, eph, ACK),
            XDP_PASS,
            Allow,
        ),
        case(
            "tcp syn from the reply side denied (syn only starts)",
            v4_tcp(S4, TCP_PORT, C4, eph, SYN),
            XDP_DROP,
            Deny,
        ),
        case(
            "tcp ack of no allowed flow denied",
            v4_tcp(S4, 1234, C4, eph, ACK),
            XDP_DROP,
            Deny,
        ),
        case(
            "tcp audit rule passes, counted audit",
            v4_tcp(C4, eph, S4, AUDIT_PORT, SYN),
            XDP_PASS,
            Audit,
        ),
        case(
            "tcp auth rule drops, auth required",
            v4_tcp(C4, eph, S4, AUTH_PORT, SYN),
            XDP_DROP,
            AuthRequired,
        ),
        // UDP.
        case(
            "udp allowed",
            v4_udp(C4, eph, S4, UDP_PORT),
            XDP_PASS,
            Allow,
        ),
        case(
            "udp reply passes",
            v4_udp(S4, UDP_PORT, C4, eph),
            XDP_PASS,
            Allow,
        ),
        case(
            "udp to another port denied",
            v4_udp(C4, eph, S4, 54),
            XDP_DROP,
            Deny,
        ),
        case(
            "udp from world denied",
            v4_udp(W4, eph, S4, UDP_PORT),
            XDP_DROP,
            Deny,
        ),
        // ICMP.
        case("icmp echo allowed", v4_icmp(C4, S4, 8), XDP_PASS, Allow),
        case(
            "icmp echo reply passes",
            v4_icmp(S4, C4, 0),
            XDP_PASS,
            Allow,
        ),
        case(
            "icmp echo from world denied",
            v4_icmp(W4, S4, 8),
            XDP_DROP,
            Deny,
        ),
        // Other protocols: judged port-less.
        case(
            "gre to a port-less any rule allowed",
            eth(ETH_P_IP, &ipv4(C4, G4, P_GRE, &[0; 4])),
            XDP_PASS,
            Allow,
        ),
        case(
            "gre without a rule denied",
            eth(ETH_P_IP, &ipv4(C4, S4, P_GRE, &[0; 4])),
            XDP_DROP,
            Deny,
        ),
        // IPv4 options are skipped by ihl.
        case(
            "ipv4 options, tcp allowed",
            eth(
                ETH_P_IP,
                &ipv4_full(C4, S4, P_TCP, &opts, 0, &tcp(eph, TCP_PORT, SYN)),
            ),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv4 options, tcp denied (not read as tcp)",
            eth(
                ETH_P_IP,
                &ipv4_full(C4, S4, P_TCP, &opts, 0, &tcp(eph, 81, SYN)),
            ),
            XDP_DROP,
            Deny,
        ),
        case(
            "ipv4 40 bytes of options, udp allowed",
            eth(
                ETH_P_IP,
                &ipv4_full(C4, S4, P_UDP, &[1; 40], 0, &udp(eph, UDP_PORT, b"x")),
            ),
            XDP_PASS,
            Allow,
        ),
        // VLAN and QinQ.
        case(
            "vlan tcp allowed",
            eth_tagged(&[(ETH_P_8021Q, 10)], ETH_P_IP, &syn80()),
            XDP_PASS,
            Allow,
        ),
        case(
            "vlan tcp denied",
            eth_tagged(&[(ETH_P_8021Q, 10)], ETH_P_IP, &syn81()),
            XDP_DROP,
            Deny,
        ),
        case(
            "qinq tcp allowed",
            eth_tagged(
                &[(ETH_P_8021AD, 100), (ETH_P_8021Q, 10)],
                ETH_P_IP,
                &syn80(),
            ),
            XDP_PASS,
            Allow,
        ),
        case(
            "qinq tcp denied",
            eth_tagged(
                &[(ETH_P_8021AD, 100), (ETH_P_8021Q, 10)],
                ETH_P_IP,
                &syn81(),
            ),
            XDP_DROP,
            Deny,
        ),
        case(
            "double 802.1q tcp denied",
            eth_tagged(&[(ETH_P_8021Q, 100), (ETH_P_8021Q, 10)], ETH_P_IP, &syn81()),
            XDP_DROP,
            Deny,
        ),
        case(
            "qinq ipv6 tcp allowed",
            eth_tagged(
                &[(ETH_P_8021AD, 100), (ETH_P_8021Q, 10)],
                ETH_P_IPV6,
                &ipv6(C6, S6, P_TCP, &tcp(eph, TCP_PORT, SYN)),
            ),
            XDP_PASS,
            Allow,
        ),
        case(
            "vlan arp passes, not ip",
            eth_tagged(&[(ETH_P_8021Q, 10)], ETH_P_ARP, &arp()),
            XDP_PASS,
            NotIp,
        ),
        // Not IP.
        case(
            "arp passes, not ip",
            eth(ETH_P_ARP, &arp()),
            XDP_PASS,
            NotIp,
        ),
        case(
            "unknown ethertype passes, not ip",
            eth(0x88B5, &[0; 46]),
            XDP_PASS,
            NotIp,
        ),
        // IPv6 and its extension headers.
        case(
            "ipv6 tcp allowed",
            v6_tcp(eph, TCP_PORT, SYN),
            XDP_PASS,
            Allow,
        ),
        case("ipv6 tcp denied", v6_tcp(eph, 81, SYN), XDP_DROP, Deny),
        case(
            "ipv6 tcp reply passes",
            eth(ETH_P_IPV6, &ipv6(S6, C6, P_TCP, &tcp(TCP_PORT, eph, ACK))),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv6 udp allowed",
            eth(ETH_P_IPV6, &ipv6(C6, S6, P_UDP, &udp(eph, UDP_PORT, b"q"))),
            XDP_PASS,
            Allow,
        ),
        case(
            "icmpv6 echo allowed",
            eth(ETH_P_IPV6, &ipv6(C6, S6, P_ICMPV6, &icmp(128))),
            XDP_PASS,
            Allow,
        ),
        case(
            "icmpv6 echo reply passes",
            eth(ETH_P_IPV6, &ipv6(S6, C6, P_ICMPV6, &icmp(129))),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv6 hop-by-hop, tcp allowed",
            v6_chain(P_HOPOPTS, &[opts_hdr(P_TCP, 8)], &tcp(eph, TCP_PORT, SYN)),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv6 hop-by-hop, tcp denied",
            v6_chain(P_HOPOPTS, &[opts_hdr(P_TCP, 16)], &tcp(eph, 81, SYN)),
            XDP_DROP,
            Deny,
        ),
        case(
            "ipv6 hop-by-hop, routing, dest options, tcp allowed",
            v6_chain(
                P_HOPOPTS,
                &[
                    opts_hdr(P_ROUTING, 8),
                    routing_hdr(P_DSTOPTS),
                    opts_hdr(P_TCP, 24),
                ],
                &tcp(eph, TCP_PORT, SYN),
            ),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv6 hop-by-hop, routing, dest options, udp denied",
            v6_chain(
                P_HOPOPTS,
                &[
                    opts_hdr(P_ROUTING, 8),
                    routing_hdr(P_DSTOPTS),
                    opts_hdr(P_UDP, 8),
                ],
                &udp(eph, 54, b"q"),
            ),
            XDP_DROP,
            Deny,
        ),
        case(
            "ipv6 auth header, tcp allowed",
            v6_chain(P_AH, &[ah_hdr(P_TCP)], &tcp(eph, TCP_PORT, SYN)),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv6 8 extension headers (the most followed), tcp allowed",
            v6_many_exts(8, TCP_PORT),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv6 8 extension headers, tcp denied",
            v6_many_exts(8, 81),
            XDP_DROP,
            Deny,
        ),
        case(
            "ipv6 no next header, judged port-less",
            v6_chain(P_HOPOPTS, &[opts_hdr(P_NONE, 8)], &[]),
            XDP_DROP,
            Deny,
        ),
        // Fragments: the first is judged, the others pass.
        case(
            "ipv6 first fragment, tcp allowed",
            v6_chain(
                P_FRAGMENT,
                &[frag_hdr(P_TCP, 0, true)],
                &tcp(eph, TCP_PORT, SYN),
            ),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv6 first fragment, tcp denied",
            v6_chain(P_FRAGMENT, &[frag_hdr(P_TCP, 0, true)], &tcp(eph, 81, SYN)),
            XDP_DROP,
            Deny,
        ),
        case(
            "ipv6 atomic fragment, udp denied",
            v6_chain(
                P_FRAGMENT,
                &[frag_hdr(P_UDP, 0, false)],
                &udp(eph, 54, b"q"),
            ),
            XDP_DROP,
            Deny,
        ),
        case(
            "ipv6 non-first fragment passes",
            v6_chain(P_FRAGMENT, &[frag_hdr(P_TCP, 185, true)], &[0xAA; 64]),
            XDP_PASS,
            Fragment,
        ),
        case(
            "ipv6 last fragment passes",
            v6_chain(P_FRAGMENT, &[frag_hdr(P_UDP, 3, false)], &[0xAA; 16]),
            XDP_PASS,
            Fragment,
        ),
        case(
            "ipv6 hop-by-hop then non-first fragment passes",
            v6_chain(
                P_HOPOPTS,
                &[opts_hdr(P_FRAGMENT, 8), frag_hdr(P_TCP, 1, false)],
                &[0xAA; 8],
            ),
            XDP_PASS,
            Fragment,
        ),
        case(
            "ipv4 first fragment, tcp allowed",
            eth(
                ETH_P_IP,
                &ipv4_full(C4, S4, P_TCP, &[], 0x2000, &tcp(eph, TCP_PORT, SYN)),
            ),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv4 first fragment, tcp denied",
            eth(
                ETH_P_IP,
                &ipv4_full(C4, S4, P_TCP, &[], 0x2000, &tcp(eph, 81, SYN)),
            ),
            XDP_DROP,
            Deny,
        ),
        case(
            "ipv4 dont-fragment bit, udp allowed",
            eth(
                ETH_P_IP,
                &ipv4_full(C4, S4, P_UDP, &[], 0x4000, &udp(eph, UDP_PORT, b"x")),
            ),
            XDP_PASS,
            Allow,
        ),
        case(
            "ipv4 non-first fragment passes",
            eth(
                ETH_P_IP,
                &ipv4_full(W4, S4, P_TCP, &[], 0x2000 | 100, &[0xAA; 64]),
            ),
            XDP_PASS,
            Fragment,
        ),
        case(
            "ipv4 last fragment passes",
            eth(ETH_P_IP, &ipv4_full(W4, S4, P_UDP, &[], 1, &[0xAA; 8])),
            XDP_PASS,
            Fragment,
        ),
        // Malformed: dropped whatever the policy.
        case("empty packet", vec![], XDP_DROP, Malformed),
        case("1 byte", vec![0x02], XDP_DROP, Malformed),
        case(
            "truncated ethernet (13 bytes)",
            truncate(eth(ETH_P_IP, &[]), 13),
            XDP_DROP,
            Malformed,
        ),
        case(
            "truncated vlan tag",
            truncate(eth_tagged(&[(ETH_P_8021Q, 10)], ETH_P_IP, &[]), 16),
            XDP_DROP,
            Malformed,
        ),
        case(
            "vlan tag without ethertype",
            truncate(eth_tagged(&[(ETH_P_8021Q, 10)], ETH_P_IP, &[]), 17),
            XDP_DROP,
            Malformed,
        ),
        case(
            "truncated inner qinq tag",
            truncate(
                eth_tagged(&[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)], ETH_P_IP, &[]),
                20,
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "three vlan tags",
            eth_tagged(
                &[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)],
                ETH_P_IP,
                &syn80(),
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "truncated ipv4 header",
            truncate(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3 + 19),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ethertype ipv4, nothing after",
            eth(ETH_P_IP, &[]),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv4 ihl 4",
            set(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3, 0x44),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv4 ihl 0",
            set(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3, 0x40),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv4 ihl 15 beyond the packet",
            set(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3, 0x4f),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv4 options cut short",
            truncate(
                eth(ETH_P_IP, &ipv4_full(C4, S4, P_TCP, &opts, 0, &[])),
                L3 + 24,
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ethertype ipv4, version 6",
            set(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3, 0x65),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ethertype ipv6, version 4",
            eth(
                ETH_P_IPV6,
                &set(ipv6(C6, S6, P_TCP, &tcp(eph, TCP_PORT, SYN)), 0, 0x45),
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "truncated tcp header (19 bytes)",
            truncate(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3 + 20 + 19),
            XDP_DROP,
            Malformed,
        ),
        case(
            "tcp ports only (4 bytes)",
            truncate(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3 + 20 + 4),
            XDP_DROP,
            Malformed,
        ),
        case(
            "tcp doff 4",
            set(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3 + 20 + 12, 4 << 4),
            XDP_DROP,
            Malformed,
        ),
        case(
            "tcp doff 0",
            set(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3 + 20 + 12, 0),
            XDP_DROP,
            Malformed,
        ),
        case(
            "truncated udp header (7 bytes)",
            truncate(v4_udp(C4, eph, S4, UDP_PORT), L3 + 20 + 7),
            XDP_DROP,
            Malformed,
        ),
        case(
            "truncated icmp header (3 bytes)",
            truncate(v4_icmp(C4, S4, 8), L3 + 20 + 3),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv4 first fragment with a truncated tcp header",
            eth(ETH_P_IP, &ipv4_full(C4, S4, P_TCP, &[], 0x2000, &[0; 8])),
            XDP_DROP,
            Malformed,
        ),
        case(
            "truncated ipv6 header (39 bytes)",
            truncate(v6_tcp(eph, TCP_PORT, SYN), L3 + 39),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ethertype ipv6, nothing after",
            eth(ETH_P_IPV6, &[]),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 truncated tcp header",
            truncate(v6_tcp(eph, TCP_PORT, SYN), L3 + 40 + 12),
            XDP_DROP,
            Malformed,
        ),
        case(
            "truncated icmpv6 header",
            truncate(
                eth(ETH_P_IPV6, &ipv6(C6, S6, P_ICMPV6, &icmp(128))),
                L3 + 40 + 2,
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 extension header of 1 byte",
            truncate(v6_chain(P_HOPOPTS, &[opts_hdr(P_TCP, 8)], &[]), L3 + 40 + 1),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 extension header past the end, then tcp",
            truncate(
                v6_chain(P_HOPOPTS, &[opts_hdr(P_TCP, 88)], &tcp(eph, TCP_PORT, SYN)),
                L3 + 40 + 40,
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 extension header past the end, then no next header",
            truncate(
                v6_chain(P_HOPOPTS, &[opts_hdr(P_NONE, 2048)], &[]),
                L3 + 40 + 64,
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 routing header past the end, then unknown protocol",
            truncate(v6_chain(P_ROUTING, &[routing_hdr(132)], &[]), L3 + 40 + 16),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 truncated fragment header",
            truncate(
                v6_chain(P_FRAGMENT, &[frag_hdr(P_TCP, 0, true)], &[]),
                L3 + 40 + 7,
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 truncated auth header",
            truncate(
                v6_chain(P_AH, &[ah_hdr(P_TCP)], &tcp(eph, TCP_PORT, SYN)),
                L3 + 40 + 20,
            ),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 first fragment with a truncated tcp header",
            v6_chain(P_FRAGMENT, &[frag_hdr(P_TCP, 0, true)], &[0; 8]),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 9 extension headers (more than followed)",
            v6_many_exts(9, TCP_PORT),
            XDP_DROP,
            Malformed,
        ),
        case(
            "ipv6 20 extension headers",
            v6_many_exts(20, TCP_PORT),
            XDP_DROP,
            Malformed,
        ),
    ];
    // With everything allowed, parsing alone decides.
    let allow_all = vec![
        (
            "allow-all: tcp syn passes",
            v4_tcp(W4, eph, S4, 81, SYN),
            XDP_PASS,
            Allow,
        ),
        (
            "allow-all: ipv6 fragment passes",
            v6_chain(P_FRAGMENT, &[frag_hdr(P_TCP, 1, true)], &[0xAA; 8]),
            XDP_PASS,
            Fragment,
        ),
        (
            "allow-all: arp passes",
            eth(ETH_P_ARP, &arp()),
            XDP_PASS,
            NotIp,
        ),
        (
            "allow-all: truncated tcp dropped",
            truncate(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3 + 30),
            XDP_DROP,
            Malformed,
        ),
        (
            "allow-all: ipv4 ihl 4 dropped",
            set(v4_tcp(C4, eph, S4, TCP_PORT, SYN), L3, 0x44),
            XDP_DROP,
            Malformed,
        ),
        (
            "allow-all: empty packet dropped",
            vec![],
            XDP_DROP,
            Malformed,
        ),
        (
            "allow-all: 9 extension headers dropped",
            v6_many_exts(9, TCP_PORT),
            XDP_DROP,
            Malformed,
        ),
    ];
    for (name, packet, action, verdict) in allow_all {
        rows.push(Case {
            name,
            packet,
            state: State::AllowAll,
            action,
            verdict,
        });
    }
    rows
}

fn load() -> Datapath {
    require_root();
    Datapath::load(&DatapathOptions::default().probe_quirks(false)).expect("loading the datapath")
}

/// What changed between two snapshots, as (point, verdict, count) with
/// count > 0.
fn changes(after: &Verdicts, before: &Verdicts) -> Vec<(Point, Verdict, u64)> {
    after
        .since(before)
        .iter()
        .filter(|(_, _, n)| *n > 0)
        .collect()
}

#[test]
fn every_packet_gets_its_documented_action_and_one_counted_verdict() {
    let dp = load();
    let mut failures = Vec::new();
    let rows = table();
    let mut current = None;
    for c in &rows {
        if current != Some(c.state) {
            let state = match c.state {
                State::Standard => standard_state(),
                State::AllowAll => allow_all_state(),
            };
            dp.replace_policy(&state).expect("setting the policy");
            current = Some(c.state);
        }
        // Twice: judged in full, then (where it may be cached) from the
        // verdict cache; both must give the row's action and count it.
        for run in ["first", "second"] {
            let before = dp.verdicts().unwrap();
            let action = dp.test_run_xdp(&c.packet).expect("BPF_PROG_TEST_RUN");
            let changed = changes(&dp.verdicts().unwrap(), &before);
            let want = vec![(Point::Xdp, c.verdict, 1)];
            if action != c.action || changed != want {
                failures.push(format!(
                    "{:?} ({} bytes, {run} run): action {action}, want {}; counted {changed:?}, \
                     want {want:?}",
                    c.name,
                    c.packet.len(),
                    c.action
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    eprintln!("{} packet cases checked", rows.len());
}

#[test]
fn with_policy_off_every_packet_passes_uncounted() {
    let dp = load();
    let rows = table();
    // Never set, then set and disabled: both are "off".
    for phase in ["never set", "disabled"] {
        if phase == "disabled" {
            dp.replace_policy(&standard_state()).unwrap();
            dp.disable_policy().unwrap();
        }
        let before = dp.verdicts().unwrap();
        for c in &rows {
            let action = dp.test_run_xdp(&c.packet).expect("BPF_PROG_TEST_RUN");
            assert_eq!(action, XDP_PASS, "{phase}: {:?}", c.name);
        }
        let changed = changes(&dp.verdicts().unwrap(), &before);
        assert!(changed.is_empty(), "{phase}: counted {changed:?}");
    }
}

#[test]
fn a_policy_change_applies_to_the_next_packet() {
    let dp = load();
    let syn = v4_tcp(C4, EPHEMERAL, S4, TCP_PORT, SYN);
    dp.replace_policy(&standard_state()).unwrap();
    assert_eq!(dp.test_run_xdp(&syn).unwrap(), XDP_PASS);
    let mut deny = standard_state();
    deny.policies.retain(|r| r.ports != [TCP_PORT]);
    dp.replace_policy(&deny).unwrap();
    assert_eq!(dp.test_run_xdp(&syn).unwrap(), XDP_DROP);
    // The endpoint renamed: the rule no longer names the source.
    let mut renamed = standard_state();
    renamed.endpoints[0] = Endpoint::new(&C4.to_string(), GATEWAY).unwrap();
    dp.replace_policy(&renamed).unwrap();
    assert_eq!(dp.test_run_xdp(&syn).unwrap(), XDP_DROP);
    dp.replace_policy(&standard_state()).unwrap();
    assert_eq!(dp.test_run_xdp(&syn).unwrap(), XDP_PASS);
}

#[test]
fn the_verdict_cache_never_serves_a_stale_or_auth_verdict() {
    let dp = load();
    dp.replace_policy(&standard_state()).unwrap();
    assert_eq!(dp.verdict_cache_len().unwrap(), 0);

    // An allowed flow: judged once, then served from the cache, every
    // packet still counted.
    let syn = v4_tcp(C4, EPHEMERAL, S4, TCP_PORT, SYN);
    let before = dp.verdicts().unwrap();
    for _ in 0..100 {
        assert_eq!(dp.test_run_xdp(&syn).unwrap(), XDP_PASS);
    }
    assert_eq!(
        changes(&dp.verdicts().unwrap(), &before),
        vec![(Point::Xdp, Verdict::Allow, 100)]
    );
    assert_eq!(dp.verdict_cache_len().unwrap(), 1, "one flow, one entry");

    // A policy change applies to the very next packet.
    let mut deny = standard_state();
    deny.policies.retain(|r| r.ports != [TCP_PORT]);
    dp.replace_policy(&deny).unwrap();
    assert_eq!(dp.test_run_xdp(&syn).unwrap(), XDP_DROP);
    dp.replace_policy(&standard_state()).unwrap();
    assert_eq!(dp.test_run_xdp(&syn).unwrap(), XDP_PASS);

    // An auth flow is never cached: it passes as soon as the pair is
    // authenticated and stops as soon as the entry expires, with no
    // policy change in between.
    let entries = dp.verdict_cache_len().unwrap();
    let auth = v4_tcp(C4, EPHEMERAL, S4, AUTH_PORT, SYN);
    for _ in 0..3 {
        assert_eq!(dp.test_run_xdp(&auth).unwrap(), XDP_DROP);
    }
    let key = meshpath::AuthKey {
        local: meshpath::policy::derive_number(&meshpath::policy::IdentityKey::default(), SERVER),
        remote: meshpath::policy::derive_number(&meshpath::policy::IdentityKey::default(), CLIENT),
        remote_node: 0,
    };
    let lifetime = Duration::from_millis(1500);
    let until = std::time::SystemTime::now() + lifetime;
    dp.auth_insert(key, until).unwrap();
    assert_eq!(dp.test_run_xdp(&auth).unwrap(), XDP_PASS);
    assert_eq!(dp.test_run_xdp(&auth).unwrap(), XDP_PASS);
    std::thread::sleep(lifetime + Duration::from_millis(100));
    assert_eq!(dp.test_run_xdp(&auth).unwrap(), XDP_DROP, "expired");
    // A reply in an auth flow (server -> client): not cached either.
    let reply = v4_tcp(S4, AUTH_PORT, C4, EPHEMERAL, ACK);
    assert_eq!(dp.test_run_xdp(&reply).unwrap(), XDP_DROP);
    assert_eq!(
        dp.verdict_cache_len().unwrap(),
        entries,
        "no auth verdict was cached"
    );

    // Off: nothing new is cached, verdicts stay right.
    dp.set_verdict_cache(false).unwrap();
    let other = v4_tcp(C4, EPHEMERAL + 1, S4, TCP_PORT, SYN);
    assert_eq!(dp.test_run_xdp(&other).unwrap(), XDP_PASS);
    assert_eq!(dp.verdict_cache_len().unwrap(), entries);
    dp.set_verdict_cache(true).unwrap();
    assert_eq!(dp.test_run_xdp(&other).unwrap(), XDP_PASS);
    // `other` is a tracked flow now: its entry in meshpath_ct_v2 holds its
    // judgement. A new flow is cached again.
    let third = v4_tcp(C4, EPHEMERAL + 2, S4, TCP_PORT, SYN);
    assert_eq!(dp.test_run_xdp(&third).unwrap(), XDP_PASS);
    assert_eq!(dp.verdict_cache_len().unwrap(), entries + 1);
}

#[test]
fn attach_errors_name_the_interface() {
    let dp = load();
    for (name, why) in [
        ("mp-nosuchif0", "no interface"),
        ("", "not an interface name"),
        ("a-name-longer-than-15", "not an interface name"),
        ("bad/name", "not an interface name"),
    ] {
        let e = dp.attach_xdp(name, XdpMode::Auto).unwrap_err();
        match &e {
            Error::Invalid { field, reason } => {
                assert_eq!(field, "xdp interface", "{e}");
                assert!(reason.contains(why), "{e}");
                assert!(name.is_empty() || reason.contains(name), "{e}");
            }
            other => panic!("{name:?}: {other}"),
        }
    }
}

#[test]
fn drops_are_reported_as_flow_events() {
    let dp = load();
    dp.replace_policy(&standard_state()).unwrap();
    let mut flows = dp.flows().expect("flow reader");
    let allowed = v4_tcp(C4, EPHEMERAL, S4, TCP_PORT, SYN);
    let denied = v4_tcp(W4, EPHEMERAL, S4, 81, SYN);
    let malformed = truncate(v4_tcp(C4, EPHEMERAL, S4, TCP_PORT, SYN), 14 + 30);
    assert_eq!(dp.test_run_xdp(&allowed).unwrap(), XDP_PASS);
    // Twice: the second is folded into the first event (aggregation).
    assert_eq!(dp.test_run_xdp(&denied).unwrap(), XDP_DROP);
    assert_eq!(dp.test_run_xdp(&denied).unwrap(), XDP_DROP);
    assert_eq!(dp.test_run_xdp(&malformed).unwrap(), XDP_DROP);
    let mut got = Vec::new();
    while let Some(f) = flows.poll(Duration::from_millis(300)).unwrap() {
        got.push(f);
    }
    assert_eq!(got.len(), 2, "one deny and one malformed event: {got:#?}");
    let deny = &got[0];
    assert_eq!(
        (deny.kind, deny.point, deny.verdict, deny.direction),
        (
            FlowKind::Packet,
            Point::Xdp,
            Verdict::Deny,
            TrafficDirection::Ingress
        ),
        "{deny:#?}"
    );
    assert_eq!(
        (deny.source, deny.destination, deny.destination_port),
        (IpAddr::V4(W4), IpAddr::V4(S4), 81),
        "{deny:#?}"
    );
    assert_eq!(deny.count, 1, "{deny:#?}");
    assert!(deny.ifindex > 0, "the receiving interface: {deny:#?}");
    assert_eq!(
        (got[1].point, got[1].verdict),
        (Point::Xdp, Verdict::Malformed),
        "{:#?}",
        got[1]
    );
}
