//! Taking over connections established before attach (a late start, or a
//! restart that left nothing pinned): the TCP socket iterator judges them
//! by policy, tracks them and enrolls them into the short-circuit when
//! that cannot reorder a byte. Root only (fails loudly otherwise).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
use meshpath::{AttachOptions, DatapathOptions, Direction, EnrollOutcome, EnrollReport, TcpReason};

/// How long redirects into a socket taken over wait, in these tests.
const SETTLE: Duration = Duration::from_millis(200);

/// An env whose cgroup is not attached yet.
fn detached(test: &str) -> Env {
    let mut env = Env::with(
        test,
        DatapathOptions::default().adopt_settle(SETTLE),
        AttachOptions::default(),
    );
    env.attachment = None;
    env
}

fn settle() {
    std::thread::sleep(SETTLE + Duration::from_millis(50));
}

fn attach(env: &mut Env) {
    env.attach_with(&AttachOptions::default());
}

fn outcome_of(r: &EnrollReport, local: SocketAddr) -> EnrollOutcome {
    r.sockets
        .iter()
        .find(|s| s.local == local)
        .unwrap_or_else(|| panic!("{local} not taken over: {r:?}"))
        .outcome
}

/// Streams `total` bytes each way at once, checking every byte.
fn stream_both_ways(c: &TcpStream, s: &TcpStream, total: usize) {
    let (mut c1, mut c2) = (c.try_clone().unwrap(), c.try_clone().unwrap());
    let (mut s1, mut s2) = (s.try_clone().unwrap(), s.try_clone().unwrap());
    let w1 = std::thread::spawn(move || write_pattern(&mut c1, 21, total, 16 * 1024));
    let w2 = std::thread::spawn(move || write_pattern(&mut s1, 22, total, 16 * 1024));
    let r1 = std::thread::spawn(move || read_pattern(&mut s2, 21, total));
    let r2 = std::thread::spawn(move || read_pattern(&mut c2, 22, total));
    assert_eq!(w1.join().unwrap(), r1.join().unwrap(), "client -> server");
    assert_eq!(w2.join().unwrap(), r2.join().unwrap(), "server -> client");
}

fn idle_pair_is_short_circuited(test: &str, bind: &str) {
    let mut env = detached(test);
    let (c, s) = env.pair(bind);
    let before = env.counters();
    let r = env.dp.enroll_existing().unwrap();
    assert_eq!(r.adopted, 0, "nothing is attached yet: {r:?}");
    attach(&mut env);
    // attach ran the iterator: both ends are in the short-circuit.
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_adopted, 2, "{d:?}");
    assert_eq!(d.sockets_enrolled, 2, "{d:?}");
    for x in [&c, &s] {
        let st = env.dp.socket_state(x).unwrap().expect("tracked");
        assert!(st.is_short_circuited(), "{st:?}");
    }
    settle();
    // The first message each way, one at a time: nothing is in flight and
    // nobody is reading, so each direction may start redirecting at once.
    // (Streamed both ways from the start instead, a direction can find
    // the peer's lock held by its reader or writer at 255 sends in a row
    // and settle on TCP, as designed: no byte is at risk either way.)
    let mut b = [0u8; 5];
    (&c).write_all(b"hello").unwrap();
    (&s).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    (&s).write_all(b"world").unwrap();
    (&c).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"world");
    let first = env.counters().since(&before);
    assert_eq!(
        first.msgs_redirected, 2,
        "both directions redirect: {first:?}"
    );
    assert_eq!(first.msgs_fallback, 0, "{first:?}");
    stream_both_ways(&c, &s, 8 << 20);
    let d = env.counters().since(&before);
    // Decided directions never go back to TCP.
    assert!(d.msgs_redirected > 2, "{d:?}");
    assert_eq!(d.msgs_fallback, 0, "{d:?}");
    // Closing leaves nothing behind: the enrolled sockets got their close
    // callbacks without sockops ever having seen them established (from
    // 6.12; before, a sweep removes their entries).
    drop((c, s));
    env.wait_empty_after_takeover(Duration::from_secs(5));
    // Running it again finds nothing new.
    assert_eq!(env.dp.enroll_existing().unwrap().adopted, 0);
}

#[test]
fn an_idle_connection_from_before_attach_is_short_circuited_ipv4() {
    idle_pair_is_short_circuited("takeover_idle_v4", "127.0.0.21:0");
}

#[test]
fn an_idle_connection_from_before_attach_is_short_circuited_ipv6() {
    idle_pair_is_short_circuited("takeover_idle_v6", "[::1]:0");
}

/// Request/response rounds driven from one thread (nobody sleeps in a
/// read while the socket is taken over, as with an epoll application).
fn ping_pong(c: &mut TcpStream, s: &mut TcpStream, size: usize, rounds: usize) {
    let mut out = vec![0u8; size];
    let mut got = vec![0u8; size];
    for r in 0..rounds {
        pattern(r as u64, 0, &mut out);
        c.write_all(&out).unwrap();
        s.read_exact(&mut got).unwrap();
        assert_eq!(out, got, "request {r}");
        s.write_all(&got).unwrap();
        c.read_exact(&mut got).unwrap();
        assert_eq!(out, got, "response {r}");
    }
}

/// A connection both sides already used through TCP (a restart without
/// pins, a late start) is short-circuited once each side's bytes have been
/// read: nothing redirected can overtake them.
#[test]
fn a_connection_used_both_ways_is_short_circuited_once_read() {
    let mut env = detached("takeover_used");
    let (mut c, mut s) = env.pair("127.0.0.22:0");
    ping_pong(&mut c, &mut s, 500, 20);
    // Bytes in flight at the takeover: the client's next request, unread.
    c.write_all(&[7u8; 300]).unwrap();
    let before = env.counters();
    attach(&mut env);
    let d = env.counters().since(&before);
    assert_eq!((d.sockets_adopted, d.sockets_enrolled), (2, 2), "{d:?}");
    settle();
    // The client's next bytes take TCP until the server read the 300.
    c.write_all(&[8u8; 200]).unwrap();
    let mut got = [0u8; 500];
    s.read_exact(&mut got).unwrap();
    assert!(got[..300].iter().all(|&b| b == 7) && got[300..].iter().all(|&b| b == 8));
    let mid = env.counters().since(&before);
    assert!(mid.fallback_adopted >= 1, "{mid:?}");
    ping_pong(&mut c, &mut s, 500, 200);
    let d = env.counters().since(&before);
    assert!(d.msgs_redirected >= 380, "{d:?}");
    for x in [&c, &s] {
        let st = env.dp.socket_state(x).unwrap().unwrap();
        assert!(st.is_short_circuited() && st.msgs_redirected > 0, "{st:?}");
    }
    drop((c, s));
    env.wait_empty_after_takeover(Duration::from_secs(5));
}

#[test]
fn attaching_without_enroll_existing_leaves_them_alone() {
    let mut env = detached("takeover_off");
    let (mut c, s) = env.pair("127.0.0.23:0");
    let srv = echo_server(s);
    let before = env.counters();
    env.attach_with(&AttachOptions::default().enroll_existing(false));
    echo_rounds(&mut c, 500, 50);
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_adopted + d.sockets_enrolled, 0, "{d:?}");
    assert!(env.dp.socket_state(&c).unwrap().is_none());
    drop(c);
    assert_eq!(srv.join().unwrap(), 500 * 50);
}

/// The client wrote bytes the server has not read yet: its sends stay on
/// TCP (redirected bytes would overtake them), the server's replies are
/// redirected, and every byte arrives in order.
#[test]
fn unread_bytes_from_before_attach_are_not_overtaken() {
    let mut env = detached("takeover_unread");
    let (mut c, s) = env.pair("127.0.0.24:0");
    let early = 200 * 1024;
    write_pattern(&mut c, 21, early, 4096);
    attach(&mut env);
    let before = env.counters();
    let cs = env.dp.socket_state(&c).unwrap().expect("client tracked");
    let ss = env.dp.socket_state(&s).unwrap().expect("server tracked");
    assert!(cs.is_short_circuited(), "{cs:?}");
    assert!(ss.is_short_circuited(), "{ss:?}");
    settle();
    // The client's next 64 KiB go while the server has read nothing: they
    // take TCP (redirected, they would overtake the early bytes).
    let next = 64 * 1024;
    let mut buf = vec![0u8; next];
    pattern(21, early, &mut buf);
    c.write_all(&buf).unwrap();
    let mid = env.counters().since(&before);
    assert!(
        mid.fallback_adopted >= 1 && mid.msgs_redirected == 0,
        "{mid:?}"
    );
    // The rest continues the same pattern, while the server reads.
    let rest = 4 << 20;
    let mut s2 = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || read_pattern(&mut s2, 21, early + next + rest));
    let mut c2 = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        let mut off = early + next;
        while off < early + next + rest {
            let n = buf.len().min(early + next + rest - off);
            pattern(21, off, &mut buf[..n]);
            c2.write_all(&buf[..n]).unwrap();
            off += n;
        }
    });
    // Meanwhile the server answers: redirected into the client.
    let mut s3 = s.try_clone().unwrap();
    let replies = std::thread::spawn(move || write_pattern(&mut s3, 22, 1 << 20, 8192));
    let mut c3 = c.try_clone().unwrap();
    let got = read_pattern(&mut c3, 22, 1 << 20);
    assert_eq!(replies.join().unwrap(), got);
    writer.join().unwrap();
    reader.join().unwrap();
    let d = env.counters().since(&before);
    assert!(d.msgs_redirected > 0, "{d:?}");
    let st = env.dp.socket_state(&s).unwrap().unwrap();
    assert!(st.msgs_redirected > 0, "the server's replies: {st:?}");
    drop((c, c3, s));
    env.wait_empty_after_takeover(Duration::from_secs(5));
}

const A: &str = "spiffe://mesh.local/ns/t/sa/a";
const B: &str = "spiffe://mesh.local/ns/t/sa/b";

#[test]
fn a_connection_policy_denies_is_reset_when_taken_over() {
    let mut env = detached("takeover_denied");
    let l = env.inside(|| TcpListener::bind("127.0.0.26:0").unwrap());
    let addr = l.local_addr().unwrap();
    let allowed = env.inside(|| TcpListener::bind("127.0.0.26:0").unwrap());
    let allowed_addr = allowed.local_addr().unwrap();
    let (mut c, _s) = env.inside(|| {
        let c = bind_connect("127.0.0.25", addr);
        (c, l.accept().unwrap().0)
    });
    let (mut ok, ok_s) = env.inside(|| {
        let c = bind_connect("127.0.0.25", allowed_addr);
        (c, allowed.accept().unwrap().0)
    });
    let srv = echo_server(ok_s);
    // Policy arrives while nothing is attached: nothing is tracked, so
    // nothing is reset yet.
    let state = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new("127.0.0.25", A).unwrap(),
            Endpoint::new("127.0.0.26", B).unwrap(),
        ],
        policies: vec![Rule::new(A, B, "tcp", &[allowed_addr.port()], "allow").unwrap()],
    };
    assert_eq!(env.dp.replace_policy(&state).unwrap().flows_reset, 0);
    attach(&mut env);
    // The denied connection is gone; the allowed one works, short-circuited.
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    match c.write_all(b"x").and_then(|_| c.read(&mut buf)) {
        Err(_) | Ok(0) => {}
        Ok(n) => panic!("{n} bytes over a denied flow"),
    }
    assert!(env.counters().policy_resets >= 1);
    // The allowed one works; its server was asleep in read() when it was
    // taken over, so it stays on TCP (tests below).
    echo_rounds(&mut ok, 1000, 50);
    assert!(!env
        .dp
        .socket_state(&ok)
        .unwrap()
        .unwrap()
        .is_short_circuited());
    drop(ok);
    assert_eq!(srv.join().unwrap(), 1000 * 50);
}

/// A thread asleep in read() when its socket is taken over stays inside
/// the kernel's plain TCP code, which never looks at the sk_msg queue: the
/// socket must stay on TCP, or the reader would wait forever.
#[test]
fn a_reader_asleep_in_read_keeps_its_socket_on_tcp() {
    let mut env = detached("takeover_blocked_reader");
    let (mut c, s) = env.pair("127.0.0.27:0");
    let srv = echo_server(s.try_clone().unwrap());
    // Let the echo server fall asleep in read().
    std::thread::sleep(Duration::from_millis(100));
    env.attach_with(&AttachOptions::default().enroll_existing(false));
    let r = env.dp.enroll_existing().unwrap();
    assert_eq!(
        outcome_of(&r, s.local_addr().unwrap()),
        EnrollOutcome::Blocked,
        "{r:?}"
    );
    // The client was idle: it is enrolled, its sends find no peer entry and
    // take TCP; every byte arrives.
    assert_eq!(
        outcome_of(&r, c.local_addr().unwrap()),
        EnrollOutcome::Enrolled
    );
    settle();
    echo_rounds(&mut c, 4000, 200);
    let st = env.dp.socket_state(&c).unwrap().unwrap();
    assert_eq!(st.tcp_reason, Some(TcpReason::NoPeer), "{st:?}");
    drop((c, s));
    assert_eq!(srv.join().unwrap(), 4000 * 200);
    env.sweep_and_wait_empty(Duration::from_secs(5));
}

/// Sends right after a takeover do not redirect: a read from before may
/// not have reached the socket lock yet. They take TCP, in order.
#[test]
fn sends_right_after_a_takeover_take_tcp() {
    let mut env = Env::with(
        "takeover_unsettled",
        DatapathOptions::default().adopt_settle(Duration::from_secs(30)),
        AttachOptions::default(),
    );
    env.attachment = None;
    let before = env.counters();
    let (c, s) = env.pair("127.0.0.28:0");
    attach(&mut env);
    assert!(env
        .dp
        .socket_state(&c)
        .unwrap()
        .unwrap()
        .is_short_circuited());
    stream_both_ways(&c, &s, 1 << 20);
    // Every send took TCP without deciding the direction.
    let d = env.counters().since(&before);
    assert_eq!(d.msgs_redirected, 0, "{d:?}");
    assert!(d.fallback_adopted >= 2, "{d:?}");
    for x in [&c, &s] {
        let st = env.dp.socket_state(x).unwrap().unwrap();
        assert_eq!(st.direction, Direction::Undecided, "{st:?}");
    }
    // A direction still unsafe after 255 sends settles on TCP.
    let (mut c, mut s) = (c, s);
    for i in 0..300u32 {
        c.write_all(&i.to_be_bytes()).unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_be_bytes(b), i);
    }
    let st = env.dp.socket_state(&c).unwrap().unwrap();
    assert_eq!(st.tcp_reason, Some(TcpReason::Adopted), "{st:?}");
    drop((c, s));
    env.wait_empty_after_takeover(Duration::from_secs(5));
}

fn bind_connect(src: &str, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::*;
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let src = SocketAddr::new(src.parse().unwrap(), 0);
    bind(fd.as_raw_fd(), &SockaddrStorage::from(src)).unwrap();
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to)).unwrap();
    TcpStream::from(fd)
}

/// A process of the cgroup living in `ns`, so the namespace is found
/// through the cgroup; killed on drop.
struct PodProcess(Child);

impl PodProcess {
    fn start(ns: &Netns, env: &Env) -> PodProcess {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sleep", "60"])
            .spawn()
            .unwrap();
        env.cgroup.add_process(child.id()).unwrap();
        // `ip netns exec` has entered the namespace once `sleep` runs.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let cmd = std::fs::read_to_string(format!("/proc/{}/cmdline", child.id()))
                .unwrap_or_default();
            if cmd.starts_with("sleep") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        PodProcess(child)
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn connections_in_a_pod_namespace_are_taken_over_and_judged() {
    let mut env = detached("takeover_netns");
    let ns = Netns::new("takeover");
    let pod = PodProcess::start(&ns, &env);
    // Sockets created in the pod's namespace, by a thread of ours in the
    // cgroup.
    let ((c, s), (d, t)) = env.inside(|| {
        ns.run(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = l.local_addr().unwrap();
            (tcp_pair_on(&l, a), tcp_pair_on(&l, a))
        })
    });
    attach(&mut env);
    let r = env.dp.enroll_existing().unwrap();
    assert!(r.namespaces >= 2, "{r:?}");
    assert_eq!(r.adopted, 0, "attach took them over already: {r:?}");
    for x in [&c, &s, &d, &t] {
        assert!(env
            .dp
            .socket_state(x)
            .unwrap()
            .unwrap()
            .is_short_circuited());
    }
    settle();
    let before = env.counters();
    stream_both_ways(&c, &s, 1 << 20);
    assert!(env.counters().since(&before).msgs_redirected > 0);
    // A policy that denies loopback-to-loopback in that namespace resets
    // the flows there too.
    let state = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![Endpoint::new("127.0.0.1", A).unwrap()],
        policies: vec![],
    };
    let change = env.dp.replace_policy(&state).unwrap();
    assert!(change.flows_reset >= 2, "{change:?}");
    let mut c = c;
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    match c.write_all(b"x").and_then(|_| c.read(&mut buf)) {
        Err(_) | Ok(0) => {}
        Ok(n) => panic!("{n} bytes over a denied flow"),
    }
    drop((c, s, d, t));
    drop(pod);
    env.wait_empty_after_takeover(Duration::from_secs(5));
}
