//! A flood of one million denied packets through XDP on a veth pair:
//! two private network namespaces, "client" (198.18.0.1) and "server"
//! (198.18.0.2), the datapath's XDP program (native) on the server's end.
//! The client injects UDP frames to a denied port (AF_PACKET, sendmmsg(2))
//! until the XDP program has judged exactly 1,000,000 of them. Root only
//! (fails loudly otherwise).
//!
//! What is checked (see `bpf/lib/events.h`): every denied packet either
//! emits a flow event, which the reader then reads or the ring buffer had
//! no room for (`events_lost`), or is folded into a later event of the
//! same flow key (`events_aggregated`); so, once the flood has settled,
//!
//! ```text
//! XDP deny verdicts == events read + events_aggregated + events_lost
//! ```
//!
//! with aggregation on (few events, a reader draining them, allowed TCP
//! still flowing byte for byte during the flood) and with aggregation off
//! and a one-page ring nobody reads during the flood (almost every event
//! lost, and counted).
//!
//! Only these namespaces carry traffic, only between 198.18.0.1 and
//! 198.18.0.2 (IPv6 off). Namespaces are deleted on drop, even on panic,
//! which removes the veth pair; the XDP attachment is a BPF link, closed
//! on drop. Every load is bounded: the flood gives up after 30 s.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{pattern, require_root, run, Netns};
use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
use meshpath::{
    Counters, Datapath, DatapathOptions, Flow, FlowKind, FlowReader, Point, Verdict, XdpMode,
};

const CLIENT_IP: &str = "198.18.0.1";
const SERVER_IP: &str = "198.18.0.2";
const CLIENT_IF: &str = "mfc0";
const SERVER_IF: &str = "mfs0";

const CLIENT: &str = "spiffe://mesh.local/ns/flood/sa/client";
const SERVER: &str = "spiffe://mesh.local/ns/flood/sa/server";

/// Denied packets the XDP program must judge in each flood.
const TARGET: u64 = 1_000_000;
/// The flood fails the test if it has not reached `TARGET` by then.
const FLOOD_LIMIT: Duration = Duration::from_secs(30);
/// Frames per sendmmsg(2) call (the kernel's limit, UIO_MAXIOV).
const BATCH: usize = 1024;
/// Aggregation interval of the first test: a few events a second.
const INTERVAL: Duration = Duration::from_millis(200);
/// One ring buffer record: an 8-byte header and the event (144 bytes
/// with 64-bit identities), rounded up to 8 bytes as the ring does.
const RECORD_BYTES: u64 =
    (8 + std::mem::size_of::<meshpath::abi::FlowEvent>() as u64).div_ceil(8) * 8;

/// The floods compete for the same two CPUs: one at a time.
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
        let client = Netns::new(&format!("fc-{test}"));
        let server = Netns::new(&format!("fs-{test}"));
        for ns in [&client, &server] {
            // No IPv6: no router solicitations or neighbour discovery,
            // and exact packet counts.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        }
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
        // A queue on the client's end. Without one (veth's default is
        // noqueue) the veth drops whatever finds the peer's XDP ring
        // full, the allowed TCP echo's segments among the flood's frames,
        // and each lost segment stalls the echo for a 200 ms
        // retransmission timeout. With a qdisc the veth (since Linux
        // 6.16) stops the queue instead and the segment waits in it: the
        // flood, which bypasses the qdisc, is refused (ENOBUFS) and sent
        // again, while TCP is only delayed.
        run(
            "tc",
            &[
                "-n",
                &client.name,
                "qdisc",
                "replace",
                "dev",
                CLIENT_IF,
                "root",
                "pfifo_fast",
            ],
        );
        Veth { client, server }
    }

    /// Attaches `dp`'s XDP program (native) to the server's end, from a
    /// thread in the server namespace.
    fn attach(&self, dp: &Datapath) -> meshpath::XdpAttachment {
        let dp = dp.clone();
        let att = self
            .server
            .run(move || dp.attach_xdp(SERVER_IF, XdpMode::Native))
            .expect("attaching XDP (native) to the server's veth");
        assert_eq!(att.mode(), XdpMode::Native);
        att
    }

    /// Packets the client's veth end dropped on transmit: never judged.
    /// The flood's frames refused at a stopped queue are not among them
    /// (the flooder counts those, see `Flooder::refused`).
    fn client_tx_dropped(&self) -> u64 {
        let out = Command::new("ip")
            .args(["-n", &self.client.name, "-j", "-s", "link", "show", "dev"])
            .arg(CLIENT_IF)
            .output()
            .expect("running ip -s link show");
        assert!(out.status.success(), "ip -s link show {CLIENT_IF} failed");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        v[0]["stats64"]["tx"]["dropped"]
            .as_u64()
            .expect("stats64.tx.dropped")
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn load(opts: DatapathOptions) -> Datapath {
    Datapath::load(&opts.probe_quirks(false)).expect("loading the datapath")
}

/// Default deny; the client may reach the server on TCP `allowed_port`.
fn policy(allowed_port: u16) -> PolicyState {
    PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new(CLIENT_IP, CLIENT).unwrap(),
            Endpoint::new(SERVER_IP, SERVER).unwrap(),
        ],
        policies: vec![Rule::new(CLIENT, SERVER, "tcp", &[allowed_port], "allow").unwrap()],
    }
}

/// A UDP socket bound in `ns`.
fn udp_in(ns: &Netns, bind: SocketAddr) -> UdpSocket {
    ns.run(move || UdpSocket::bind(bind).expect("bind udp"))
}

fn xdp(dp: &Datapath, verdict: Verdict) -> u64 {
    dp.verdicts()
        .expect("reading verdicts")
        .get(Point::Xdp, verdict)
}

/// The XDP deny count once it has stopped moving (no packet of the flood
/// left in flight) for 50 ms.
fn settled_denies(dp: &Datapath) -> u64 {
    let mut last = xdp(dp, Verdict::Deny);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = xdp(dp, Verdict::Deny);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// The event counters (`Counters::since` leaves these out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EventCounts {
    lost: u64,
    aggregated: u64,
}

impl EventCounts {
    fn of(c: &Counters) -> EventCounts {
        EventCounts {
            lost: c.events_lost,
            aggregated: c.events_aggregated,
        }
    }

    fn read(dp: &Datapath) -> EventCounts {
        EventCounts::of(&dp.counters().expect("reading counters"))
    }

    fn since(self, earlier: EventCounts) -> EventCounts {
        EventCounts {
            lost: self.lost - earlier.lost,
            aggregated: self.aggregated - earlier.aggregated,
        }
    }
}

/// Injects crafted Ethernet frames (IPv4, UDP, 18 bytes of payload: the
/// 60-byte minimum frame) on the client's veth end through an AF_PACKET
/// socket with PACKET_QDISC_BYPASS, `BATCH` per sendmmsg(2) call: the
/// client's IP stack and qdisc are skipped, the frames go straight to
/// the veth's transmit, which hands them to the server end's XDP program.
/// About 1.6 times the rate of UDP sendmmsg(2) on a connected socket.
struct Flooder {
    sock: OwnedFd,
    frame: [u8; 60],
    /// Times the kernel refused frames (ENOBUFS, or a batch cut short:
    /// the veth's queue stopped while the peer's ring was full); the
    /// frames are sent again.
    refused: std::cell::Cell<u64>,
}

impl Flooder {
    /// A packet socket bound to the client's veth end, sending frames
    /// from the client to `to`.
    fn new(v: &Veth, to: SocketAddr) -> Flooder {
        let sock = v.client.run(|| {
            // SAFETY: plain syscall wrapper; the result is checked.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh fd from the kernel, owned by nobody else.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let one: libc::c_int = 1;
            // SAFETY: `one` is a c_int that outlives the call; its size
            // is passed.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(
                r,
                0,
                "PACKET_QDISC_BYPASS: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(CLIENT_IF).unwrap();
            // SAFETY: a NUL-terminated name, valid for the call.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex > 0, "no {CLIENT_IF} in the client namespace");
            // SAFETY: sockaddr_ll is a plain C struct; all zeroes is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as libc::c_ushort;
            // Protocol 0: bound for sending only, receives nothing.
            sll.sll_ifindex = ifindex as libc::c_int;
            // SAFETY: `sll` is a valid sockaddr_ll for the call, its size
            // is passed.
            let r = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(
                r,
                0,
                "binding the packet socket: {}",
                std::io::Error::last_os_error()
            );
            sock
        });
        let client_mac = mac_of(&v.client, CLIENT_IF);
        let server_mac = mac_of(&v.server, SERVER_IF);
        let (src, dst) = match (addr(CLIENT_IP, 0).ip(), to.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets(), d.octets()),
            _ => unreachable!("IPv4 only"),
        };
        let mut frame = [0u8; 60];
        frame[0..6].copy_from_slice(&server_mac);
        frame[6..12].copy_from_slice(&client_mac);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut frame[14..34];
        ip[0] = 0x45; // IPv4, 20-byte header
        ip[2..4].copy_from_slice(&46u16.to_be_bytes()); // 20 + 8 + 18
        ip[6] = 0x40; // don't fragment
        ip[8] = 64; // TTL
        ip[9] = 17; // UDP
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let sum = ip_checksum(ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let udp = &mut frame[34..42];
        udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&to.port().to_be_bytes());
        udp[4..6].copy_from_slice(&26u16.to_be_bytes()); // 8 + 18
                                                         // Checksum 0: none (IPv4 allows it).
        frame[42..60].copy_from_slice(b"meshpath xdp flood");
        Flooder {
            sock,
            frame,
            refused: std::cell::Cell::new(0),
        }
    }

    /// Sends `n` frames; returns when the kernel has taken them all.
    fn send(&self, n: u64) {
        let mut iov = libc::iovec {
            iov_base: self.frame.as_ptr() as *mut libc::c_void,
            iov_len: self.frame.len(),
        };
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|_| {
                // SAFETY: mmsghdr is a plain C struct; all zeroes (null
                // pointers, zero lengths) is a valid value.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let fd = self.sock.as_raw_fd();
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < n {
            let k = (n - sent).min(BATCH as u64) as libc::c_uint;
            // SAFETY: `msgs` holds BATCH >= k headers, each pointing to
            // `iov`, which points to `self.frame`; all of them outlive the
            // call, and the kernel only reads them (the socket is bound to
            // the device: no msg_name; no control data).
            let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), k, 0) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // The device's queue is full for a moment: again, but
                    // not forever.
                    Some(libc::EINTR) | Some(libc::ENOBUFS) | Some(libc::EAGAIN)
                        if t0.elapsed() < FLOOD_LIMIT =>
                    {
                        self.refused.set(self.refused.get() + 1);
                        std::thread::yield_now();
                        continue;
                    }
                    _ => panic!("sendmmsg: {e} (after {sent} frames)"),
                }
            }
            if (r as libc::c_uint) < k {
                self.refused.set(self.refused.get() + 1);
            }
            sent += r as u64;
        }
    }
}

/// The MAC address of `ifname` in `ns`.
fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-j", "link", "show", "dev", ifname])
        .output()
        .expect("running ip link show");
    assert!(out.status.success(), "ip link show {ifname} failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let s = v[0]["address"].as_str().expect("address");
    let mut mac = [0u8; 6];
    for (i, b) in s.split(':').enumerate() {
        mac[i] = u8::from_str_radix(b, 16).expect("hex MAC");
    }
    mac
}

/// The IPv4 header checksum (RFC 791) of `hdr`, its checksum field zero.
fn ip_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One flood: how many frames were sent and judged, and how long it took.
#[derive(Debug)]
struct Flood {
    sent: u64,
    judged: u64,
    /// Times the veth refused frames (the XDP side's receive ring full);
    /// they were sent again.
    refused: u64,
    elapsed: Duration,
}

impl Flood {
    fn report(&self, what: &str, dropped: u64) {
        let secs = self.elapsed.as_secs_f64();
        eprintln!(
            "{what}: {} frames sent, {} judged (denied) by XDP in {:.2} s: {:.0} packets/s \
             judged, {:.0} sent; the veth refused frames {} times while the XDP side's receive \
             ring was full (sent again); {dropped} packets dropped by the client's veth",
            self.sent,
            self.judged,
            secs,
            self.judged as f64 / secs,
            self.sent as f64 / secs,
            self.refused
        );
    }
}

/// Floods until XDP has judged exactly `TARGET` denied packets more than
/// `start`: sends what is missing, waits for the count to settle, again.
/// A frame the veth refuses (the XDP side's receive ring full) fails
/// with ENOBUFS and is sent again; should one be dropped silently, the
/// next round sends it again. None is judged twice.
fn flood(dp: &Datapath, f: &Flooder, start: u64) -> Flood {
    let t0 = Instant::now();
    let refused0 = f.refused.get();
    let mut sent = 0u64;
    let mut judged = 0u64;
    while judged < TARGET {
        assert!(
            t0.elapsed() < FLOOD_LIMIT,
            "the flood did not reach {TARGET} judged packets in {FLOOD_LIMIT:?}: {sent} sent, \
             {judged} judged"
        );
        let missing = TARGET - judged;
        f.send(missing);
        sent += missing;
        judged = settled_denies(dp) - start;
        assert!(judged <= sent, "{judged} judged but only {sent} sent");
    }
    assert_eq!(judged, TARGET, "overshoot: {judged} judged");
    Flood {
        sent,
        judged,
        refused: f.refused.get() - refused0,
        elapsed: t0.elapsed(),
    }
}

/// A TCP echo client in the client namespace, making 4 KiB round trips
/// with position-dependent bytes until `stop`, checking every echo.
struct Echo {
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    client: Option<JoinHandle<u64>>,
    server: Option<JoinHandle<u64>>,
}

impl Echo {
    fn start(v: &Veth, l: TcpListener) -> Echo {
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = vec![0u8; 16384];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return total,
                    Ok(n) => {
                        s.write_all(&buf[..n]).expect("echo");
                        total += n as u64;
                    }
                    Err(e) => panic!("echo server: {e}"),
                }
            }
        });
        let mut c = v.client.run(move || {
            TcpStream::connect_timeout(&addr(SERVER_IP, port), Duration::from_secs(5))
                .expect("allowed TCP connect")
        });
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let client = {
            let (rounds, stop) = (rounds.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut out = vec![0u8; 4096];
                let mut back = vec![0u8; 4096];
                let mut r = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    pattern(r, 0, &mut out);
                    c.write_all(&out).expect("echo request");
                    c.read_exact(&mut back).expect("echo response");
                    assert!(back == out, "round {r}: the echo differs");
                    r += 1;
                    rounds.store(r, Ordering::Relaxed);
                }
                r
            })
        };
        Echo {
            rounds,
            stop,
            client: Some(client),
            server: Some(server),
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Stops; the round trips made and the bytes the server echoed.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self.client.take().unwrap().join();
        let rounds = rounds.expect("echo client panicked");
        // The client's socket is closed: the server sees EOF.
        let echoed = self.server.take().unwrap().join();
        (rounds, echoed.expect("echo server panicked"))
    }
}

impl Drop for Echo {
    /// A test that fails early stops the client (the server ends with
    /// the namespaces).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads events on its own thread until told to stop, then until the ring
/// is empty.
struct Drain {
    read: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Flow>>>,
}

impl Drain {
    fn start(mut reader: FlowReader) -> Drain {
        let read = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (read, stop) = (read.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                loop {
                    match reader
                        .poll(Duration::from_millis(50))
                        .expect("polling events")
                    {
                        Some(f) => {
                            out.push(f);
                            read.fetch_add(1, Ordering::Relaxed);
                        }
                        // Nothing within 50 ms: the ring is empty.
                        None if stop.load(Ordering::SeqCst) => return out,
                        None => {}
                    }
                }
            })
        };
        Drain {
            read,
            stop,
            thread: Some(thread),
        }
    }

    fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    fn finish(mut self) -> Vec<Flow> {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.take().unwrap();
        t.join().expect("event reader panicked")
    }
}

impl Drop for Drain {
    /// A test that fails early stops the reader (which closes it).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads every event already in the ring.
fn drain_now(r: &mut FlowReader) -> Vec<Flow> {
    let mut out = Vec::new();
    while let Some(f) = r.poll(Duration::from_millis(200)).expect("polling events") {
        out.push(f);
    }
    out
}

/// Every event is a packet drop of the flood at XDP on the server's end.
fn assert_flood_events(flows: &[Flow], ifindex: u32, to: SocketAddr) {
    for f in flows {
        assert!(
            f.kind == FlowKind::Packet
                && f.point == Point::Xdp
                && f.verdict == Verdict::Deny
                && f.protocol == 17
                && f.source == addr(CLIENT_IP, 0).ip()
                && f.destination == to.ip()
                && f.destination_port == to.port()
                && f.ifindex == ifindex
                && f.count >= 1,
            "an event that is not the flood's: {f:#?}"
        );
    }
}

/// Nothing denied reached the server's socket.
fn assert_nothing_delivered(s: &UdpSocket) {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        s.recv_from(&mut buf).is_err(),
        "a denied datagram was delivered"
    );
}

#[test]
fn a_million_denied_packets_are_aggregated_exactly_accounted_and_allowed_tcp_flows() {
    let _serial = serial();
    let v = Veth::new("agg");
    let dp = load(DatapathOptions::default().event_interval(INTERVAL));
    let att = v.attach(&dp);
    let echo_l = v
        .server
        .run(|| TcpListener::bind(addr(SERVER_IP, 0)).expect("listen"));
    let denied = udp_in(&v.server, addr(SERVER_IP, 0));
    let to = denied.local_addr().unwrap();
    dp.replace_policy(&policy(echo_l.local_addr().unwrap().port()))
        .unwrap();

    let echo = Echo::start(&v, echo_l);
    let flooder = Flooder::new(&v, to);
    let drain = Drain::start(dp.flows().expect("opening the flow reader"));
    let events0 = EventCounts::read(&dp);
    let deny0 = xdp(&dp, Verdict::Deny);
    let allow0 = xdp(&dp, Verdict::Allow);
    let dropped0 = v.client_tx_dropped();

    // Allowed TCP before the flood, for comparison.
    let r0 = echo.rounds();
    std::thread::sleep(Duration::from_millis(500));
    let quiet_rate = (echo.rounds() - r0) as f64 / 0.5;

    let t0 = Instant::now();
    let r1 = echo.rounds();
    let f = flood(&dp, &flooder, deny0);
    let rounds_during = echo.rounds() - r1;
    let read_during = drain.read();
    let flood_secs = f.elapsed.as_secs_f64();
    let dropped = v.client_tx_dropped() - dropped0;
    f.report("aggregated flood (native XDP, reader draining)", dropped);
    eprintln!(
        "allowed TCP echo (4 KiB round trips): {quiet_rate:.0}/s before the flood, {:.0}/s \
         during it ({rounds_during} round trips); {read_during} events read during the flood",
        rounds_during as f64 / flood_secs
    );

    // One more denied frame after an interval of quiet: it emits the
    // event that carries the packets folded since the last one, so the
    // events' counts add up to every packet.
    std::thread::sleep(INTERVAL + Duration::from_millis(100));
    flooder.send(1);
    let denies = settled_denies(&dp) - deny0;
    assert_eq!(denies, TARGET + 1);
    let elapsed = t0.elapsed();
    let flows = drain.finish();
    let (rounds, echoed) = echo.finish();
    let ev = EventCounts::read(&dp).since(events0);
    let allowed = xdp(&dp, Verdict::Allow) - allow0;
    let read = flows.len() as u64;
    let counted: u64 = flows.iter().map(|f| u64::from(f.count)).sum();
    eprintln!(
        "{denies} denied packets: {read} events read (their counts add up to {counted}), \
         events_aggregated +{}, events_lost +{}; {allowed} allowed packets at XDP; {rounds} \
         echo round trips, {echoed} bytes echoed",
        ev.aggregated, ev.lost
    );

    // (a) The datapath kept working: allowed TCP flowed, byte for byte
    // (checked per round trip), during the flood.
    assert!(
        rounds_during >= 20,
        "allowed TCP starved during the flood: {rounds_during} round trips ({dropped} packets \
         dropped by the client's veth: each lost segment costs a retransmission timeout)"
    );
    assert!(allowed >= rounds, "every request judged at XDP");
    assert_eq!(
        echoed,
        rounds * 4096,
        "the server echoed every request byte"
    );
    assert_nothing_delivered(&denied);

    // (b) Few events, read while flooding, and exact accounting.
    assert_flood_events(&flows, att.ifindex(), to);
    assert!(read_during >= 1, "the reader read nothing during the flood");
    let bound = (elapsed.as_secs_f64() / INTERVAL.as_secs_f64()).ceil() as u64 + 1;
    assert!(
        read >= 2 && read <= bound,
        "one event per interval at most: {read} events in {elapsed:?} (bound {bound})"
    );
    assert_eq!(ev.lost, 0, "a draining reader loses nothing");
    assert_eq!(
        denies,
        read + ev.aggregated + ev.lost,
        "every denied packet emitted an event (read or lost) or was folded into one"
    );
    // The counts carried by the events: one NAPI instance (the veth's
    // single receive queue) runs the program, so no fold is lost to a
    // concurrent reset of the aggregation entry.
    assert_eq!(
        counted, denies,
        "the events' counts add up to every denied packet"
    );
    drop(att);
}

#[test]
fn with_a_one_page_ring_and_no_aggregation_every_event_is_read_or_counted_lost() {
    let _serial = serial();
    let v = Veth::new("loss");
    let ring = 4096u32;
    let dp = load(
        DatapathOptions::default()
            .event_ring_bytes(ring)
            .event_interval(Duration::ZERO),
    );
    let att = v.attach(&dp);
    let denied = udp_in(&v.server, addr(SERVER_IP, 0));
    let to = denied.local_addr().unwrap();
    dp.replace_policy(&policy(1)).unwrap();
    let flooder = Flooder::new(&v, to);

    // Events on (the reader is open), nothing read during the flood.
    let mut reader = dp.flows().expect("opening the flow reader");
    let events0 = EventCounts::read(&dp);
    let deny0 = xdp(&dp, Verdict::Deny);
    let dropped0 = v.client_tx_dropped();
    let f = flood(&dp, &flooder, deny0);
    f.report(
        "unaggregated flood (native XDP, every packet an event, one-page ring, not read)",
        v.client_tx_dropped() - dropped0,
    );
    let flows = drain_now(&mut reader);
    let ev = EventCounts::read(&dp).since(events0);
    let denies = xdp(&dp, Verdict::Deny) - deny0;
    let read = flows.len() as u64;
    eprintln!(
        "{denies} denied packets, each an event: {read} read after the flood, events_lost +{}, \
         events_aggregated +{}",
        ev.lost, ev.aggregated
    );

    assert_eq!(denies, TARGET);
    assert_flood_events(&flows, att.ifindex(), to);
    assert!(
        flows.iter().all(|f| f.count == 1),
        "no aggregation: one packet per event"
    );
    assert_eq!(ev.aggregated, 0, "aggregation is off");
    assert_eq!(
        read + ev.lost,
        denies,
        "every event was read or counted lost"
    );
    // The ring held what fits in one page and lost the rest.
    assert_eq!(
        read,
        u64::from(ring) / RECORD_BYTES,
        "a full one-page ring holds 4096 / {RECORD_BYTES} events"
    );
    assert_nothing_delivered(&denied);
    drop(reader);
    drop(att);
}

#[test]
fn with_events_off_nothing_is_reported_and_aggregated_events_read_afterwards_add_up() {
    let _serial = serial();
    let v = Veth::new("off");
    let dp = load(DatapathOptions::default().event_interval(INTERVAL));
    let att = v.attach(&dp);
    let denied = udp_in(&v.server, addr(SERVER_IP, 0));
    let to = denied.local_addr().unwrap();
    dp.replace_policy(&policy(1)).unwrap();
    let flooder = Flooder::new(&v, to);

    // Events off (no reader was ever opened): nothing built, nothing
    // counted, nothing in the ring.
    let events0 = EventCounts::read(&dp);
    let deny0 = xdp(&dp, Verdict::Deny);
    let dropped0 = v.client_tx_dropped();
    let f = flood(&dp, &flooder, deny0);
    f.report(
        "flood with events off (native XDP)",
        v.client_tx_dropped() - dropped0,
    );
    let ev = EventCounts::read(&dp).since(events0);
    assert_eq!(
        ev,
        EventCounts {
            lost: 0,
            aggregated: 0
        },
        "events off"
    );
    let mut reader = dp.flows().expect("opening the flow reader");
    let stale = drain_now(&mut reader);
    assert!(stale.is_empty(), "events off, yet in the ring: {stale:#?}");

    // Events on (the reader is open), aggregated, nothing read until the
    // flood is over: the few events wait in the ring.
    let events0 = EventCounts::read(&dp);
    let deny0 = xdp(&dp, Verdict::Deny);
    let dropped0 = v.client_tx_dropped();
    let f = flood(&dp, &flooder, deny0);
    f.report(
        "flood with events on, aggregated, read afterwards (native XDP)",
        v.client_tx_dropped() - dropped0,
    );
    std::thread::sleep(INTERVAL + Duration::from_millis(100));
    flooder.send(1);
    let denies = settled_denies(&dp) - deny0;
    let flows = drain_now(&mut reader);
    let ev = EventCounts::read(&dp).since(events0);
    let read = flows.len() as u64;
    let counted: u64 = flows.iter().map(|f| u64::from(f.count)).sum();
    eprintln!(
        "{denies} denied packets: {read} events read afterwards (counts add up to {counted}), \
         events_aggregated +{}, events_lost +{}",
        ev.aggregated, ev.lost
    );
    assert_eq!(denies, TARGET + 1);
    assert_flood_events(&flows, att.ifindex(), to);
    assert_eq!(ev.lost, 0, "a few events fit in the ring");
    assert_eq!(denies, read + ev.aggregated + ev.lost);
    assert_eq!(counted, denies);
    assert_nothing_delivered(&denied);
    drop(reader);
    drop(att);
}
