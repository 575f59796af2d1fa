//! XDP on a real device: two network namespaces, "client" (198.18.0.1)
//! and "server" (198.18.0.2), joined by a veth pair, the datapath's XDP
//! program on the server's end. Real TCP, UDP and ICMP, allowed and
//! denied; the policy swapped under live traffic; attach modes and
//! refusals. Root only (fails loudly otherwise).
//!
//! Only these namespaces carry traffic, and only between 198.18.0.1 and
//! 198.18.0.2 (IPv6 is off in them, so no neighbour discovery either).
//! Namespaces are deleted on drop (even on panic), which removes the veth
//! pair; XDP attachments are BPF links, closed on drop.

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{pattern, require_root, run, Netns, PinDir};
use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
use meshpath::{Datapath, DatapathOptions, Error, Point, Verdict, Verdicts, XdpMode};

const CLIENT_IP: &str = "198.18.0.1";
const SERVER_IP: &str = "198.18.0.2";
const CLIENT_IF: &str = "mpc0";
const SERVER_IF: &str = "mps0";

const CLIENT: &str = "spiffe://mesh.local/ns/test/sa/client";
const SERVER: &str = "spiffe://mesh.local/ns/test/sa/server";

/// Traffic tests measure exact counts and timing: one at a time.
static TRAFFIC: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    TRAFFIC.lock().unwrap_or_else(|p| p.into_inner())
}

/// The two namespaces and the veth pair between them (removed with the
/// namespaces).
struct Veth {
    client: Netns,
    server: Netns,
}

impl Veth {
    fn new(test: &str) -> Veth {
        require_root();
        let client = Netns::new(&format!("xc-{test}"));
        let server = Netns::new(&format!("xs-{test}"));
        for ns in [&client, &server] {
            // No IPv6: no router solicitations or neighbour discovery
            // to other addresses, and exact packet counts.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        }
        // Ping sockets for root in the client namespace (ICMP echo).
        client.sysctl("net.ipv4.ping_group_range", "0 0");
        run(
            "ip",
            &[
                "-n",
                &client.name,
                "link",
                "add",
                CLIENT_IF,
                "type",
                "veth",
                "peer",
                "name",
                SERVER_IF,
                "netns",
                &server.name,
            ],
        );
        for (ns, ifname, addr) in [
            (&client, CLIENT_IF, CLIENT_IP),
            (&server, SERVER_IF, SERVER_IP),
        ] {
            let cidr = format!("{addr}/24");
            run("ip", &["-n", &ns.name, "addr", "add", &cidr, "dev", ifname]);
            run("ip", &["-n", &ns.name, "link", "set", ifname, "up"]);
        }
        Veth { client, server }
    }

    /// Attaches `dp`'s XDP program to the server's end, from a thread in
    /// the server namespace.
    fn attach(&self, dp: &Datapath, mode: XdpMode) -> meshpath::Result<meshpath::XdpAttachment> {
        self.attach_to(&self.server, SERVER_IF, dp, mode)
    }

    fn attach_to(
        &self,
        ns: &Netns,
        ifname: &'static str,
        dp: &Datapath,
        mode: XdpMode,
    ) -> meshpath::Result<meshpath::XdpAttachment> {
        let dp = dp.clone();
        ns.run(move || dp.attach_xdp(ifname, mode))
    }

    /// `ip -d link show` of the server's end.
    fn server_link(&self) -> String {
        link_show(&self.server, SERVER_IF)
    }
}

fn link_show(ns: &Netns, ifname: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-d", "link", "show", "dev", ifname])
        .output()
        .expect("running ip link show");
    assert!(out.status.success(), "ip link show {ifname} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn load() -> Datapath {
    Datapath::load(&DatapathOptions::default().probe_quirks(false)).expect("loading the datapath")
}

fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new(CLIENT_IP, CLIENT).unwrap(),
        Endpoint::new(SERVER_IP, SERVER).unwrap(),
    ]
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The XDP verdicts counted since `before`, as a map with zeroes left out.
fn xdp_since(dp: &Datapath, before: &Verdicts) -> Vec<(Verdict, u64)> {
    dp.verdicts()
        .unwrap()
        .since(before)
        .iter()
        .filter(|(p, _, n)| *p == Point::Xdp && *n > 0)
        .map(|(_, v, n)| (v, n))
        .collect()
}

fn count(v: &[(Verdict, u64)], verdict: Verdict) -> u64 {
    v.iter().find(|(x, _)| *x == verdict).map_or(0, |(_, n)| *n)
}

/// Only verdicts in `allowed` were counted (ARP is `NotIp`).
fn assert_only(v: &[(Verdict, u64)], allowed: &[Verdict], what: &str) {
    for (verdict, n) in v {
        assert!(
            allowed.contains(verdict) || *verdict == Verdict::NotIp,
            "{what}: {n} packets counted {verdict:?}: {v:?}"
        );
    }
}

/// A UDP socket bound in `ns`, with a large receive buffer.
fn udp_in(ns: &Netns, bind: SocketAddr) -> UdpSocket {
    ns.run(move || {
        let s = UdpSocket::bind(bind).expect("bind udp");
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20))
            .expect("SO_RCVBUFFORCE");
        s
    })
}

/// Sends `n` datagrams carrying their sequence number, `gap` apart.
fn send_seq(s: &UdpSocket, to: SocketAddr, n: u32, gap: Duration) {
    for i in 0..n {
        s.send_to(&i.to_be_bytes(), to).expect("send udp");
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
}

/// Receives sequence numbers on `s` until nothing arrived for `quiet`.
fn recv_until_quiet(s: &UdpSocket, quiet: Duration) -> Vec<u32> {
    s.set_read_timeout(Some(quiet)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match s.recv_from(&mut buf) {
            Ok((4, _)) => got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])),
            Ok((n, _)) => panic!("unexpected datagram of {n} bytes"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return got
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Echo request from the client namespace to the server (a ping
/// socket); true when the reply came within `timeout`.
fn ping(v: &Veth, timeout: Duration) -> bool {
    v.client.run(move || {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
        let fd: OwnedFd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
        .expect("ping socket (net.ipv4.ping_group_range)");
        // A datagram socket: UdpSocket's send/recv work on it.
        let s = UdpSocket::from(fd);
        s.set_read_timeout(Some(timeout)).unwrap();
        // Echo request: type 8, code 0, checksum and id filled by the
        // kernel, sequence 1, then a payload.
        let req = [8u8, 0, 0, 0, 0, 0, 0, 1, b'm', b'p'];
        s.send_to(&req, addr(SERVER_IP, 0)).expect("send echo");
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match s.recv_from(&mut buf) {
                Ok((n, from)) if n >= 8 && buf[0] == 0 && from.ip() == addr(SERVER_IP, 0).ip() => {
                    return true
                }
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
        false
    })
}

/// TCP connect from the client namespace, giving up after `timeout`.
fn connect(v: &Veth, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    v.client
        .run(move || TcpStream::connect_timeout(&addr(SERVER_IP, port), timeout))
}

fn tcp_listen(v: &Veth) -> TcpListener {
    v.server
        .run(|| TcpListener::bind(addr(SERVER_IP, 0)).expect("listen"))
}

/// Allowed and denied TCP, UDP and ICMP through the XDP program in `mode`.
fn traffic_as_policy_says(test: &str, mode: XdpMode) {
    let _serial = serial();
    let v = Veth::new(test);
    let dp = load();
    let att = v.attach(&dp, mode).expect("attaching XDP");
    assert_eq!(att.mode(), mode);
    let tcp_ok = tcp_listen(&v);
    let tcp_no = tcp_listen(&v);
    let (tcp_ok_port, tcp_no_port) = (
        tcp_ok.local_addr().unwrap().port(),
        tcp_no.local_addr().unwrap().port(),
    );
    let udp_ok = udp_in(&v.server, addr(SERVER_IP, 0));
    let udp_no = udp_in(&v.server, addr(SERVER_IP, 0));
    let (udp_ok_addr, udp_no_addr) = (udp_ok.local_addr().unwrap(), udp_no.local_addr().unwrap());
    let state = |icmp: bool| {
        let mut policies = vec![
            Rule::new(CLIENT, SERVER, "tcp", &[tcp_ok_port], "allow").unwrap(),
            Rule::new(CLIENT, SERVER, "udp", &[udp_ok_addr.port()], "allow").unwrap(),
        ];
        if icmp {
            policies.push(Rule::new(CLIENT, SERVER, "icmp", &[], "allow").unwrap());
        }
        PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: endpoints(),
            policies,
        }
    };
    dp.replace_policy(&state(true)).unwrap();

    // TCP, allowed: 64 KiB echoed byte for byte.
    let before = dp.verdicts().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = tcp_ok.accept().expect("accept");
        let mut buf = vec![0u8; 16384];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return peer,
                Ok(n) => s.write_all(&buf[..n]).expect("echo"),
                Err(e) => panic!("server read: {e}"),
            }
        }
    });
    let mut c = connect(&v, tcp_ok_port, Duration::from_secs(5)).expect("allowed TCP connect");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = vec![0u8; 64 * 1024];
    pattern(7, 0, &mut out);
    let writer = {
        let mut c = c.try_clone().unwrap();
        let out = out.clone();
        std::thread::spawn(move || c.write_all(&out).expect("write"))
    };
    let mut back = vec![0u8; out.len()];
    c.read_exact(&mut back).expect("echo back");
    writer.join().unwrap();
    assert!(back == out, "TCP bytes differ after XDP");
    drop(c);
    let peer = server.join().unwrap();
    assert_eq!(peer.ip().to_string(), CLIENT_IP);
    std::thread::sleep(Duration::from_millis(300)); // FIN/ACK settle
    let tcp = xdp_since(&dp, &before);
    assert!(count(&tcp, Verdict::Allow) >= 3, "SYN, ACK, data: {tcp:?}");
    assert_only(&tcp, &[Verdict::Allow], "allowed TCP");

    // TCP, denied: the SYNs are dropped, the connect times out.
    let before = dp.verdicts().unwrap();
    let r = connect(&v, tcp_no_port, Duration::from_millis(1500));
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::TimedOut),
        "a denied TCP connect must time out: {r:?}"
    );
    tcp_no.set_nonblocking(true).unwrap();
    assert!(
        tcp_no.accept().is_err(),
        "the denied connection reached the server"
    );
    std::thread::sleep(Duration::from_millis(300));
    let denied = xdp_since(&dp, &before);
    assert!(count(&denied, Verdict::Deny) >= 1, "{denied:?}");
    assert_only(&denied, &[Verdict::Deny], "denied TCP");

    // UDP, allowed and denied: exact counts.
    const N: u32 = 200;
    let client_udp = udp_in(&v.client, addr(CLIENT_IP, 0));
    let before = dp.verdicts().unwrap();
    send_seq(&client_udp, udp_ok_addr, N, Duration::from_micros(200));
    send_seq(&client_udp, udp_no_addr, N, Duration::from_micros(200));
    let got_ok = recv_until_quiet(&udp_ok, Duration::from_millis(500));
    let got_no = recv_until_quiet(&udp_no, Duration::from_millis(200));
    assert_eq!(got_ok, (0..N).collect::<Vec<_>>(), "allowed datagrams");
    assert!(
        got_no.is_empty(),
        "{} denied datagrams arrived",
        got_no.len()
    );
    let udp = xdp_since(&dp, &before);
    assert_eq!(count(&udp, Verdict::Allow), u64::from(N), "{udp:?}");
    assert_eq!(count(&udp, Verdict::Deny), u64::from(N), "{udp:?}");
    assert_only(&udp, &[Verdict::Allow, Verdict::Deny], "UDP");

    // ICMP echo: allowed, then denied by a policy without the rule.
    let before = dp.verdicts().unwrap();
    assert!(
        ping(&v, Duration::from_secs(2)),
        "allowed ping got no reply"
    );
    let icmp = xdp_since(&dp, &before);
    assert_eq!(count(&icmp, Verdict::Allow), 1, "{icmp:?}");
    assert_only(&icmp, &[Verdict::Allow], "allowed ICMP");
    dp.replace_policy(&state(false)).unwrap();
    let before = dp.verdicts().unwrap();
    assert!(!ping(&v, Duration::from_secs(1)), "denied ping got a reply");
    let icmp = xdp_since(&dp, &before);
    assert_eq!(count(&icmp, Verdict::Deny), 1, "{icmp:?}");
    assert_only(&icmp, &[Verdict::Deny], "denied ICMP");

    // Policy off: everything passes, nothing is counted.
    dp.disable_policy().unwrap();
    let before = dp.verdicts().unwrap();
    assert!(ping(&v, Duration::from_secs(2)), "ping with policy off");
    send_seq(&client_udp, udp_no_addr, 10, Duration::ZERO);
    assert_eq!(
        recv_until_quiet(&udp_no, Duration::from_millis(300)).len(),
        10
    );
    assert!(xdp_since(&dp, &before).is_empty());

    att.detach().expect("detach");
    assert!(!v.server_link().contains("prog/xdp"), "{}", v.server_link());
}

#[test]
fn native_xdp_passes_and_drops_real_traffic_as_policy_says() {
    traffic_as_policy_says("native", XdpMode::Native);
}

#[test]
fn generic_xdp_passes_and_drops_real_traffic_as_policy_says() {
    traffic_as_policy_says("generic", XdpMode::Generic);
}

/// A paced UDP sender in the client namespace: `n` datagrams, odd ones to
/// `odd`, even ones to `even` (or all to `even` when `odd` is None).
/// Returns how many went to each.
fn paced_sender(
    v: &Veth,
    even: SocketAddr,
    odd: Option<SocketAddr>,
    n: u32,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    let s = udp_in(&v.client, addr(CLIENT_IP, 0));
    std::thread::spawn(move || {
        let (mut to_even, mut to_odd) = (0u64, 0u64);
        for i in 0..n {
            let to = match odd {
                Some(o) if i % 2 == 1 => {
                    to_odd += 1;
                    o
                }
                _ => {
                    to_even += 1;
                    even
                }
            };
            s.send_to(&i.to_be_bytes(), to).expect("send udp");
            // ~10,000 datagrams a second: no queue overflows anywhere.
            if i % 4 == 3 {
                std::thread::sleep(Duration::from_micros(300));
            }
        }
        done.store(true, Ordering::SeqCst);
        (to_even, to_odd)
    })
}

/// Receives on `s` until `stop`, then until quiet; the sequence numbers.
fn receiver(s: UdpSocket, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u32>> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 64];
        let mut quiet_since: Option<Instant> = None;
        loop {
            match s.recv_from(&mut buf) {
                Ok((4, _)) => {
                    got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    quiet_since = None;
                }
                Ok((n, _)) => panic!("unexpected datagram of {n} bytes"),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if stop.load(Ordering::SeqCst) {
                        let q = *quiet_since.get_or_insert_with(Instant::now);
                        if q.elapsed() > Duration::from_millis(300) {
                            return got;
                        }
                    }
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    })
}

/// Replaces the policy with `states[i % 2]` until `done`; the number of
/// replaces made while the sender ran.
fn flip_until(dp: &Datapath, states: [&PolicyState; 2], done: &AtomicBool) -> u64 {
    let mut flips = 0u64;
    while !done.load(Ordering::SeqCst) {
        dp.replace_policy(states[(flips % 2) as usize])
            .expect("replace under traffic");
        flips += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    flips
}

#[test]
fn a_policy_swap_under_live_traffic_never_allows_a_denied_datagram() {
    let _serial = serial();
    let v = Veth::new("swap");
    let dp = load();
    let _att = v.attach(&dp, XdpMode::Auto).expect("attaching XDP");
    let rx_p = udp_in(&v.server, addr(SERVER_IP, 0));
    let rx_q = udp_in(&v.server, addr(SERVER_IP, 0));
    let (p, q) = (rx_p.local_addr().unwrap(), rx_q.local_addr().unwrap());

    // Phase 1. Two states that both deny port P and both allow port Q,
    // built so that any decision mixing them (endpoints of one, rules of
    // the other) would allow P and deny Q: the client is A in s1 and B
    // in s2; s1 allows P only for B, s2 only for A.
    let (a, b) = (
        "spiffe://mesh.local/ns/test/sa/a",
        "spiffe://mesh.local/ns/test/sa/b",
    );
    let adversarial = |me: &str, other: &str| PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new(CLIENT_IP, me).unwrap(),
            Endpoint::new(SERVER_IP, SERVER).unwrap(),
        ],
        policies: vec![
            Rule::new(me, SERVER, "udp", &[q.port()], "allow").unwrap(),
            Rule::new(other, SERVER, "udp", &[p.port()], "allow").unwrap(),
        ],
    };
    let (s1, s2) = (adversarial(a, b), adversarial(b, a));
    dp.replace_policy(&s1).unwrap();
    const N1: u32 = 20_000;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let recv_p = receiver(rx_p.try_clone().unwrap(), stop.clone());
    let recv_q = receiver(rx_q.try_clone().unwrap(), stop.clone());
    let before = dp.verdicts().unwrap();
    let start = Instant::now();
    let sender = paced_sender(&v, q, Some(p), N1, done.clone());
    let flips = flip_until(&dp, [&s2, &s1], &done);
    let (sent_q, sent_p) = sender.join().unwrap();
    let elapsed = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (got_p, got_q) = (recv_p.join().unwrap(), recv_q.join().unwrap());
    let verdicts = xdp_since(&dp, &before);
    eprintln!(
        "phase 1: {sent_p} datagrams to P (denied by both states), {sent_q} to Q (allowed by \
         both), {flips} policy swaps in {elapsed:?}; received {} on P, {} on Q; XDP {verdicts:?}",
        got_p.len(),
        got_q.len()
    );
    assert!(flips >= 20, "too few swaps to mean anything: {flips}");
    assert!(
        got_p.is_empty(),
        "{} denied datagrams were delivered: {:?}",
        got_p.len(),
        &got_p[..got_p.len().min(10)]
    );
    let unique: HashSet<u32> = got_q.iter().copied().collect();
    assert_eq!(unique.len(), got_q.len(), "duplicates on Q");
    assert_eq!(
        got_q.len() as u64,
        sent_q,
        "allowed datagrams lost or wrongly dropped"
    );
    assert_eq!(count(&verdicts, Verdict::Allow), sent_q, "{verdicts:?}");
    assert_eq!(count(&verdicts, Verdict::Deny), sent_p, "{verdicts:?}");
    assert_only(&verdicts, &[Verdict::Allow, Verdict::Deny], "phase 1");

    // Phase 2. Flip between allowing and denying port P itself: which
    // datagram falls in which state is a race, but every datagram is
    // judged exactly once and exactly the allowed ones arrive.
    let allow_p = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: endpoints(),
        policies: vec![Rule::new(CLIENT, SERVER, "udp", &[p.port()], "allow").unwrap()],
    };
    let deny_p = PolicyState {
        policies: vec![],
        ..allow_p.clone()
    };
    dp.replace_policy(&deny_p).unwrap();
    const N2: u32 = 10_000;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let recv_p = receiver(rx_p, stop.clone());
    let before = dp.verdicts().unwrap();
    let sender = paced_sender(&v, p, None, N2, done.clone());
    let flips = flip_until(&dp, [&allow_p, &deny_p], &done);
    let (sent, _) = sender.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    let got = recv_p.join().unwrap();
    let verdicts = xdp_since(&dp, &before);
    let (allowed, denied) = (
        count(&verdicts, Verdict::Allow),
        count(&verdicts, Verdict::Deny),
    );
    eprintln!(
        "phase 2: {sent} datagrams to P, {flips} swaps between allow and deny; XDP allowed \
         {allowed}, denied {denied}; received {}",
        got.len()
    );
    assert_only(&verdicts, &[Verdict::Allow, Verdict::Deny], "phase 2");
    assert_eq!(allowed + denied, sent, "every datagram judged once");
    assert_eq!(
        got.len() as u64,
        allowed,
        "exactly the allowed datagrams arrive"
    );
    assert!(allowed > 0 && denied > 0, "the swaps took effect both ways");
    let unique: HashSet<u32> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "duplicates");
    drop(rx_q);
}

#[test]
fn modes_refusals_and_detach() {
    let v = Veth::new("modes");
    let dp = load();
    let id = dp.xdp_program_id().unwrap();

    // Native on a veth; the interface index is the namespace's.
    let att = v.attach(&dp, XdpMode::Native).expect("native XDP on veth");
    assert_eq!(att.mode(), XdpMode::Native);
    assert_eq!(att.interface(), SERVER_IF);
    let link = v.server_link();
    assert!(link.contains(&format!("prog/xdp id {id}")), "{link}");
    assert!(!link.contains("xdpgeneric"), "native, not generic: {link}");
    let ifindex: u32 = link.split(':').next().unwrap().trim().parse().unwrap();
    assert_eq!(att.ifindex(), ifindex);

    // Twice through this datapath: refused by the datapath.
    let e = v.attach(&dp, XdpMode::Auto).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid { field, reason } if field == "xdp interface" && reason.contains(SERVER_IF) && reason.contains("already attached to this datapath")),
        "{e}"
    );
    // Another datapath, any mode: refused by the kernel, and named.
    let dp2 = load();
    for mode in [XdpMode::Auto, XdpMode::Native, XdpMode::Generic] {
        let e = v.attach(&dp2, mode).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Attach { .. }), "{mode}: {msg}");
        assert!(
            msg.contains(SERVER_IF)
                && msg.contains("already has an XDP program")
                && msg.contains(&format!("id {id}")),
            "{mode}: {msg}"
        );
    }
    // Someone attaching through netlink cannot replace ours.
    let foreign = ForeignProg::load();
    let r = v.server.run({
        let fd = foreign.fd();
        move || {
            // SAFETY: plain syscall wrapper; the fd stays open (owned by
            // `foreign`) until after this thread is joined.
            unsafe {
                libbpf_sys::bpf_xdp_attach(
                    ifindex as i32,
                    fd,
                    libbpf_sys::XDP_FLAGS_DRV_MODE,
                    std::ptr::null(),
                )
            }
        }
    });
    assert!(r < 0, "a netlink attach replaced meshpath's XDP link");
    assert!(v.server_link().contains(&format!("prog/xdp id {id}")));

    // Dropping the guard on a thread outside the namespace detaches.
    drop(att);
    let link = v.server_link();
    assert!(
        !link.contains("prog/xdp"),
        "still attached after drop: {link}"
    );

    // Generic, then detach() explicitly.
    let att = v
        .attach(&dp, XdpMode::Generic)
        .expect("generic XDP on veth");
    assert_eq!(att.mode(), XdpMode::Generic);
    let link = v.server_link();
    assert!(
        link.contains("xdpgeneric") && link.contains(&format!("id {id}")),
        "{link}"
    );
    att.detach().unwrap();
    assert!(!v.server_link().contains("prog/xdp"));

    // A program attached by someone else (netlink, generic): refused
    // with its id, and left in place.
    let foreign_id = foreign.id();
    let r = v.server.run({
        let fd = foreign.fd();
        move || {
            // SAFETY: as above.
            unsafe {
                libbpf_sys::bpf_xdp_attach(
                    ifindex as i32,
                    fd,
                    libbpf_sys::XDP_FLAGS_SKB_MODE | libbpf_sys::XDP_FLAGS_UPDATE_IF_NOEXIST,
                    std::ptr::null(),
                )
            }
        }
    });
    assert_eq!(r, 0, "attaching the foreign program");
    for mode in [XdpMode::Auto, XdpMode::Generic, XdpMode::Native] {
        let e = v.attach(&dp, mode).unwrap_err().to_string();
        assert!(
            e.contains("already has an XDP program")
                && e.contains(&format!("id {foreign_id}, generic")),
            "{mode}: {e}"
        );
    }
    assert!(v.server_link().contains(&format!("id {foreign_id}")));
    let r = v.server.run(move || {
        // SAFETY: plain syscall wrapper.
        unsafe {
            libbpf_sys::bpf_xdp_detach(
                ifindex as i32,
                libbpf_sys::XDP_FLAGS_SKB_MODE,
                std::ptr::null(),
            )
        }
    });
    assert_eq!(r, 0, "detaching the foreign program");

    // A device without native XDP (the namespace's loopback).
    let e = v
        .attach_to(&v.server, "lo", &dp, XdpMode::Native)
        .unwrap_err();
    assert!(
        matches!(&e, Error::KernelFeature { feature, detail } if *feature == "native XDP" && detail.contains("lo")),
        "{e}"
    );
    let lo = v
        .attach_to(&v.server, "lo", &dp, XdpMode::Auto)
        .expect("auto on loopback");
    assert_eq!(lo.mode(), XdpMode::Generic, "auto falls back to generic");
    drop(lo);

    // The same interface index in two namespaces: two attachments.
    let s = v.attach(&dp, XdpMode::Auto).unwrap();
    let c = v
        .attach_to(&v.client, CLIENT_IF, &dp, XdpMode::Auto)
        .unwrap();
    assert_eq!(s.ifindex(), c.ifindex(), "veth ends are both index 2");
    drop((s, c));

    // An unknown interface, in the namespace where the name is looked up.
    let e = v
        .attach_to(&v.client, SERVER_IF, &dp, XdpMode::Auto)
        .unwrap_err();
    assert!(
        matches!(&e, Error::Invalid { field, reason } if field == "xdp interface" && reason.contains("no interface mps0")),
        "{e}"
    );
}

#[test]
fn detach_after_the_device_is_gone() {
    let v = Veth::new("gone");
    let dp = load();
    let att = v.attach(&dp, XdpMode::Native).unwrap();
    let Veth { client, server } = v;
    drop(client); // deletes the veth pair with it
    drop(server);
    att.detach().expect("detach after the device went away");
    // The datapath attaches elsewhere afterwards.
    let v = Veth::new("gone2");
    let att = v.attach(&dp, XdpMode::Native).unwrap();
    drop(att);
}

/// A minimal XDP program (return XDP_PASS) loaded outside meshpath, as
/// another tool's would be.
struct ForeignProg {
    fd: OwnedFd,
}

impl ForeignProg {
    fn load() -> ForeignProg {
        // r0 = XDP_PASS (2); exit
        let insns = [
            libbpf_sys::bpf_insn {
                code: (libbpf_sys::BPF_ALU64 | libbpf_sys::BPF_MOV | libbpf_sys::BPF_K) as u8,
                _bitfield_align_1: [],
                _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(0, 0),
                off: 0,
                imm: 2,
            },
            libbpf_sys::bpf_insn {
                code: (libbpf_sys::BPF_JMP | libbpf_sys::BPF_EXIT) as u8,
                _bitfield_align_1: [],
                _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(0, 0),
                off: 0,
                imm: 0,
            },
        ];
        let name = c"foreign_xdp";
        let license = c"GPL";
        // SAFETY: plain syscall wrapper; the instruction array and the
        // strings outlive the call; no options.
        let fd = unsafe {
            libbpf_sys::bpf_prog_load(
                libbpf_sys::BPF_PROG_TYPE_XDP,
                name.as_ptr(),
                license.as_ptr(),
                insns.as_ptr(),
                insns.len() as _,
                std::ptr::null_mut(),
            )
        };
        assert!(fd >= 0, "loading the foreign program: {fd}");
        // SAFETY: a fresh fd from the kernel, owned by nobody else.
        ForeignProg {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        }
    }

    fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn id(&self) -> u32 {
        let mut info = libbpf_sys::bpf_prog_info::default();
        let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
        // SAFETY: `info` is writable for `len` bytes during the call.
        let r = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(self.fd(), &mut info, &mut len) };
        assert_eq!(r, 0);
        info.id
    }
}

#[test]
fn a_pinned_xdp_link_outlives_its_datapath_and_is_adopted() {
    let _s = serial();
    let v = Veth::new("xdppin");
    let pins = PinDir::new("xdppin");
    let opts = DatapathOptions::default()
        .probe_quirks(false)
        .pin_dir(&pins.0);
    let dp = Datapath::load(&opts).unwrap();
    let id1 = dp.xdp_program_id().unwrap();
    let att = v.attach(&dp, XdpMode::Native).unwrap();
    assert!(att.is_pinned());
    // The guard and the datapath go: the pinned link keeps the program.
    drop(att);
    drop(dp);
    assert!(v.server_link().contains(&format!("prog/xdp id {id1}")));
    // A pinned link in native mode refuses a generic request, named.
    let dp2 = Datapath::load(&opts).unwrap();
    let e = v.attach(&dp2, XdpMode::Generic).unwrap_err();
    assert!(
        matches!(&e, Error::Pinned { reason, .. } if reason.contains("native")),
        "{e}"
    );
    // The next datapath adopts it: its own program, the same link.
    let id2 = dp2.xdp_program_id().unwrap();
    assert_ne!(id1, id2);
    let att = v.attach(&dp2, XdpMode::Auto).unwrap();
    assert_eq!(att.mode(), XdpMode::Native);
    assert!(v.server_link().contains(&format!("prog/xdp id {id2}")));
    // A removed pin is put back from the guard's link.
    let pinned: Vec<_> = std::fs::read_dir(&pins.0)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("meshpath_link_xdp_"))
        .collect();
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    std::fs::remove_file(&pinned[0]).unwrap();
    assert_eq!(att.missing_pin().as_ref(), Some(&pinned[0]));
    assert_eq!(att.repin().unwrap().as_ref(), Some(&pinned[0]));
    assert!(pinned[0].exists());
    // detach() detaches and unpins.
    att.detach().unwrap();
    assert!(!v.server_link().contains("prog/xdp"));
    assert!(!pinned[0].exists());
}
