//! Identity-based policy against real sockets: loopback "pods" bound to
//! 127.0.0.2/.3/.4 in a private cgroup. Root only (fails loudly otherwise).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
use meshpath::{AttachOptions, DatapathOptions, Error, Point, Verdict};

const FE: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
const DB: &str = "spiffe://mesh.local/ns/db/sa/postgres";
const CACHE: &str = "spiffe://mesh.local/ns/shop/sa/cache";

fn pods() -> Vec<Endpoint> {
    vec![
        Endpoint::new("127.0.0.2", FE).unwrap(),
        Endpoint::new("127.0.0.3", DB).unwrap(),
        Endpoint::new("127.0.0.4", CACHE).unwrap(),
    ]
}

/// A TCP connection from `src` (bound, port 0) to `dst`.
fn connect_from(src: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = bound_tcp(src)?;
    // connect with a timeout: a dropped SYN must not hang the test.
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    connect_tcp(s, dst)
}

/// Like `connect_from`, but gives up after `timeout` (the SYN may be
/// dropped): Err(TimedOut) then.
fn connect_from_within(
    src: &str,
    dst: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let src = src.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(connect_from(&src, dst));
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "connect timed out",
        ))
    })
}

fn is_eperm(r: &std::io::Result<TcpStream>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

fn listen(env: &Env, addr: &str) -> TcpListener {
    env.inside(|| TcpListener::bind(addr).unwrap())
}

fn serve_echo(l: TcpListener, n: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..n {
            let (s, _) = l.accept().unwrap();
            std::thread::spawn(move || {
                let _ = echo_server(s).join();
            });
        }
    })
}

fn roundtrip(mut c: TcpStream) {
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = vec![0u8; 3000];
    pattern(11, 0, &mut out);
    c.write_all(&out).unwrap();
    let mut back = vec![0u8; out.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(out, back);
}

#[test]
fn allowed_pairs_talk_and_denied_pairs_get_eperm() {
    let env = Env::new("policy_pairs");
    let db = listen(&env, "127.0.0.3:0");
    let db_addr = db.local_addr().unwrap();
    let other = listen(&env, "127.0.0.3:0");
    let other_addr = other.local_addr().unwrap();
    let fe_l = listen(&env, "127.0.0.2:0");
    let fe_addr = fe_l.local_addr().unwrap();
    let cache_l = listen(&env, "127.0.0.4:0");
    let cache_addr = cache_l.local_addr().unwrap();
    let state = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: pods(),
        policies: vec![
            Rule::new(FE, DB, "tcp", &[db_addr.port()], "allow").unwrap(),
            Rule::new(CACHE, FE, "tcp", &[fe_addr.port()], "audit").unwrap(),
            Rule::new(FE, CACHE, "tcp", &[cache_addr.port()], "auth").unwrap(),
        ],
    };
    let change = env.dp.replace_policy(&state).unwrap();
    assert!(
        change.rules_written >= 3 && change.endpoints_written == 3,
        "{change:?}"
    );
    let srv = serve_echo(db, 1);
    let fe_srv = serve_echo(fe_l, 1);
    let before = env.dp.verdicts().unwrap();
    let c0 = env.counters();
    env.inside(|| {
        // Allowed: byte-exact, and short-circuited.
        let c = connect_from("127.0.0.2", db_addr).expect("frontend -> db:port is allowed");
        roundtrip(c);
        // Another port of the same workload: denied at connect.
        assert!(
            is_eperm(&connect_from("127.0.0.2", other_addr)),
            "other port"
        );
        // No rule: denied.
        assert!(is_eperm(&connect_from("127.0.0.4", db_addr)), "cache -> db");
        // Audit: passes, counted as a would-be drop.
        roundtrip(connect_from("127.0.0.4", fe_addr).expect("audit passes"));
        // Auth: no authentication yet: held back (the SYN is dropped until
        // the agent authenticates the pair; tests/auth.rs), not refused.
        let held = connect_from_within("127.0.0.2", cache_addr, Duration::from_millis(700));
        assert!(
            matches!(&held, Err(e) if e.kind() == ErrorKind::TimedOut),
            "auth: {held:?}"
        );
    });
    srv.join().unwrap();
    fe_srv.join().unwrap();
    let v = env.dp.verdicts().unwrap().since(&before);
    assert!(v.get(Point::Connect, Verdict::Allow) >= 1, "{v:?}");
    assert_eq!(v.get(Point::Connect, Verdict::Deny), 2, "{v:?}");
    assert!(v.get(Point::Connect, Verdict::Audit) >= 1, "{v:?}");
    assert_eq!(v.get(Point::Connect, Verdict::AuthRequired), 1, "{v:?}");
    assert!(
        v.get(Point::Egress, Verdict::AuthRequired) >= 1,
        "the SYN is held: {v:?}"
    );
    assert!(
        env.counters().since(&c0).msgs_redirected >= 2,
        "allowed flows are short-circuited"
    );
    drop(other);
}

#[test]
fn precedence_deny_beats_allow_and_specific_beats_wildcard() {
    let env = Env::new("policy_precedence");
    let db = listen(&env, "127.0.0.3:0");
    let db_addr = db.local_addr().unwrap();
    let cache = listen(&env, "127.0.0.4:0");
    let cache_addr = cache.local_addr().unwrap();
    let fe = listen(&env, "127.0.0.2:0");
    let fe_addr = fe.local_addr().unwrap();
    let state = PolicyState {
        default_action: DefaultAction::Allow,
        endpoints: pods(),
        policies: vec![
            // A specific allow and a wildcard deny: deny wins.
            Rule::new(FE, DB, "tcp", &[db_addr.port()], "allow").unwrap(),
            Rule::new("*", DB, "any", &[], "deny").unwrap(),
            // A wildcard allow and a specific audit: the specific wins.
            Rule::new("*", CACHE, "tcp", &[], "allow").unwrap(),
            Rule::new(FE, CACHE, "tcp", &[cache_addr.port()], "audit").unwrap(),
        ],
    };
    env.dp.replace_policy(&state).unwrap();
    let srv_c = serve_echo(cache, 2);
    let srv_f = serve_echo(fe, 1);
    let before = env.dp.verdicts().unwrap();
    env.inside(|| {
        assert!(
            is_eperm(&connect_from("127.0.0.2", db_addr)),
            "deny beats allow"
        );
        roundtrip(connect_from("127.0.0.2", cache_addr).unwrap());
        roundtrip(connect_from("127.0.0.3", cache_addr).unwrap());
        // No rule matches db -> frontend: the default (allow) applies.
        roundtrip(connect_from("127.0.0.3", fe_addr).unwrap());
    });
    srv_c.join().unwrap();
    srv_f.join().unwrap();
    let v = env.dp.verdicts().unwrap().since(&before);
    assert_eq!(v.get(Point::Connect, Verdict::Deny), 1, "{v:?}");
    assert_eq!(
        v.get(Point::Connect, Verdict::Audit),
        1,
        "specific audit wins: {v:?}"
    );
    assert_eq!(
        v.get(Point::Connect, Verdict::Allow),
        2,
        "wildcard allow, default: {v:?}"
    );
    drop(db);
}

#[test]
fn a_process_outside_the_cgroup_cannot_reach_a_protected_workload() {
    let env = Env::new("policy_outside");
    let db = listen(&env, "127.0.0.3:0");
    let db_addr = db.local_addr().unwrap();
    env.dp
        .replace_policy(&PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: pods(),
            policies: vec![Rule::new(FE, DB, "tcp", &[db_addr.port()], "allow").unwrap()],
        })
        .unwrap();
    let before = env.dp.verdicts().unwrap();
    // Outside the cgroup nothing judges the connect: the server's ingress
    // hook drops the SYN from the cache pod's address.
    let r = connect_from_within("127.0.0.4", db_addr, Duration::from_millis(1500));
    assert!(r.is_err(), "cache (outside the cgroup) must not reach db");
    let v = env.dp.verdicts().unwrap().since(&before);
    assert!(v.get(Point::Ingress, Verdict::Deny) >= 1, "{v:?}");
    // An allowed identity from outside gets through.
    let srv = serve_echo(db, 1);
    roundtrip(connect_from_within("127.0.0.2", db_addr, Duration::from_secs(5)).unwrap());
    srv.join().unwrap();
}

#[test]
fn udp_is_judged_at_sendmsg_connect_and_ingress() {
    let env = Env::new("policy_udp");
    let db = env.inside(|| UdpSocket::bind("127.0.0.3:0").unwrap());
    let db_addr = db.local_addr().unwrap();
    env.dp
        .replace_policy(&PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: pods(),
            policies: vec![
                Rule::new(FE, DB, "udp", &[db_addr.port()], "allow").unwrap(),
                // Replies from db to the frontend's ephemeral port pass as
                // replies of the allowed flow.
            ],
        })
        .unwrap();
    let before = env.dp.verdicts().unwrap();
    env.inside(|| {
        let fe = UdpSocket::bind("127.0.0.2:0").unwrap();
        fe.send_to(b"ping", db_addr).expect("allowed datagram");
        let cache = UdpSocket::bind("127.0.0.4:0").unwrap();
        let e = cache.send_to(b"ping", db_addr).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "unconnected UDP: sendmsg"
        );
        let e = cache.connect(db_addr).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "connected UDP: connect"
        );
        db.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = db.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"ping"[..], fe.local_addr().unwrap()));
        db.send_to(b"pong", from)
            .expect("a reply in an allowed flow");
        fe.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (n, _) = fe.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong", "a reply in an allowed flow passes");
    });
    // A datagram from outside the cgroup from a denied identity is dropped
    // at the workload's ingress.
    let outside = UdpSocket::bind("127.0.0.4:0").unwrap();
    outside.send_to(b"sneak", db_addr).unwrap();
    db.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(
        db.recv_from(&mut buf).is_err(),
        "the denied datagram was delivered"
    );
    let v = env.dp.verdicts().unwrap().since(&before);
    assert_eq!(v.get(Point::Sendmsg, Verdict::Deny), 1, "{v:?}");
    assert_eq!(v.get(Point::Connect, Verdict::Deny), 1, "{v:?}");
    assert!(v.get(Point::Ingress, Verdict::Deny) >= 1, "{v:?}");
}

#[test]
fn ipv6_and_v4_mapped_are_judged_by_the_same_endpoints() {
    let env = Env::new("policy_v6");
    let l6 = listen(&env, "[::1]:0");
    let a6 = l6.local_addr().unwrap();
    let dual = listen(&env, "[::]:0");
    let port = dual.local_addr().unwrap().port();
    env.dp
        .replace_policy(&PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: vec![
                Endpoint::new("::1", DB).unwrap(),
                Endpoint::new("127.0.0.2", FE).unwrap(),
                Endpoint::new("127.0.0.3", DB).unwrap(),
            ],
            policies: vec![
                Rule::new(DB, DB, "tcp", &[a6.port()], "allow").unwrap(),
                Rule::new(FE, DB, "tcp", &[port], "allow").unwrap(),
            ],
        })
        .unwrap();
    let s6 = serve_echo(l6, 1);
    let sd = serve_echo(dual, 1);
    env.inside(|| {
        roundtrip(connect_from("::1", a6).unwrap());
        // AF_INET6 socket to a v4-mapped address: the IPv4 endpoints apply.
        let mapped: SocketAddr = format!("[::ffff:127.0.0.3]:{port}").parse().unwrap();
        roundtrip(connect_from("::ffff:127.0.0.2", mapped).unwrap());
        assert!(
            is_eperm(&connect_from("::ffff:127.0.0.4", mapped)),
            "world -> db"
        );
    });
    s6.join().unwrap();
    sd.join().unwrap();
}

#[test]
fn a_replace_under_live_traffic_never_judges_by_a_mix() {
    // Two states that both allow 127.0.0.2 -> 127.0.0.3, under different
    // names: a decision with the new endpoints and the old rules (or the
    // reverse) would deny. Connect continuously while flipping.
    let env = Env::new("policy_atomic");
    let db = listen(&env, "127.0.0.3:0");
    let db_addr = db.local_addr().unwrap();
    let fe2 = "spiffe://mesh.local/ns/shop/sa/frontend-v2";
    let state = |name: &str| PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new("127.0.0.2", name).unwrap(),
            Endpoint::new("127.0.0.3", DB).unwrap(),
        ],
        policies: vec![Rule::new(name, DB, "tcp", &[db_addr.port()], "allow").unwrap()],
    };
    let a = state(FE);
    let b = state(fe2);
    env.dp.replace_policy(&a).unwrap();
    connect_while_flipping(&env, db, |flip| {
        env.dp
            .replace_policy(if flip % 2 == 0 { &b } else { &a })
            .unwrap();
    });
}

#[test]
fn an_endpoint_edit_under_live_traffic_never_judges_by_a_mix() {
    // One prefix holds both ends, and its identity flips between two that
    // may each talk only to themselves: a decision that read the source
    // before an edit and the destination after it would deny. The edit
    // is one key; the two copies and the grace period keep it whole.
    let env = Env::new("policy_edit_atomic");
    let db = listen(&env, "127.0.0.3:0");
    let port = db.local_addr().unwrap().port();
    let fe2 = "spiffe://mesh.local/ns/shop/sa/frontend-v2";
    env.dp
        .replace_policy(&PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: vec![Endpoint::new("127.0.0.0/29", FE).unwrap()],
            policies: vec![
                Rule::new(FE, FE, "tcp", &[port], "allow").unwrap(),
                Rule::new(fe2, fe2, "tcp", &[port], "allow").unwrap(),
            ],
        })
        .unwrap();
    let mut edits = 0;
    connect_while_flipping(&env, db, |flip| {
        let name = if flip % 2 == 0 { fe2 } else { FE };
        let change = env
            .dp
            .upsert_endpoint(Endpoint::new("127.0.0.0/29", name).unwrap())
            .unwrap();
        edits += u64::from(change.incremental);
        assert_eq!(change.endpoints_written, 1, "{change:?}");
    });
    assert!(edits >= 200, "{edits} one-key edits");
}

/// Connects 127.0.0.2 -> `db` continuously while `flip` changes the
/// policy (at least 200 times and for 2 s), between states that each
/// allow the pair: no connect may fail and no hook may deny.
fn connect_while_flipping(env: &Env, db: TcpListener, mut flip: impl FnMut(u64)) {
    let db_addr = db.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_accepting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepter = {
        let stop = stop_accepting.clone();
        db.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match db.accept() {
                    Ok(_) => n += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(50))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            n
        })
    };
    let before = env.dp.verdicts().unwrap();
    let (connects, failures) = env.inside(|| {
        let stop2 = stop.clone();
        let client = std::thread::spawn(move || {
            // A mixed judgement shows as EPERM at connect, or as a deny
            // verdict at a packet hook (checked below).
            let (mut ok, mut bad) = (0u64, Vec::new());
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                match connect_from("127.0.0.2", db_addr) {
                    Ok(s) => {
                        // Close with a RST: no TIME_WAIT to collide with.
                        nix::sys::socket::setsockopt(
                            &s,
                            nix::sys::socket::sockopt::Linger,
                            &libc::linger {
                                l_onoff: 1,
                                l_linger: 0,
                            },
                        )
                        .unwrap();
                        ok += 1;
                    }
                    Err(e) => bad.push(e.to_string()),
                }
            }
            (ok, bad)
        });
        let start = Instant::now();
        let mut flips = 0;
        while flips < 200 || start.elapsed() < Duration::from_secs(2) {
            flip(flips);
            flips += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        client.join().unwrap()
    });
    // Only now close the listener: a connect in flight must not be refused.
    stop_accepting.store(true, std::sync::atomic::Ordering::Relaxed);
    let accepted = accepter.join().unwrap();
    let v = env.dp.verdicts().unwrap().since(&before);
    let denied: Vec<_> = v
        .iter()
        .filter(|(_, verdict, n)| !verdict.passes() && *n > 0)
        .collect();
    assert!(denied.is_empty(), "denied mid-change: {denied:?}");
    assert!(
        connects > 100,
        "too few connects to mean anything: {connects}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} connects failed mid-change: {failures:?}",
        failures.len(),
        connects + failures.len() as u64
    );
    assert!(accepted > 0);
}

#[test]
fn a_policy_change_resets_established_flows_it_denies() {
    resets_established_flows("policy_reset", DatapathOptions::default());
}

/// The same through sock_diag from user space: the path every kernel
/// without the `bpf_sock_destroy` kfunc (before 6.5) takes.
#[test]
fn a_policy_change_resets_established_flows_through_sock_diag() {
    resets_established_flows(
        "policy_reset_diag",
        DatapathOptions::default().reset_by_sock_diag(true),
    );
}

/// The load-time probe finds `bpf_sock_destroy` exactly where the kernel
/// has it (6.5+), and says so when it is missing.
#[test]
fn the_sock_destroy_kfunc_is_found_where_the_kernel_has_it() {
    let env = Env::new("policy_kfunc_probe");
    let q = env.dp.quirks();
    assert_eq!(q.sock_destroy_kfunc, common::kernel_at_least(6, 5), "{q:?}");
    let mentioned = q.problems().iter().any(|p| p.contains("bpf_sock_destroy"));
    assert_eq!(mentioned, !q.sock_destroy_kfunc, "{:?}", q.problems());
}

fn resets_established_flows(test: &str, opts: DatapathOptions) {
    let env = Env::with(test, opts, AttachOptions::default());
    let db = listen(&env, "127.0.0.3:0");
    let db_addr = db.local_addr().unwrap();
    let allow = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: pods(),
        policies: vec![Rule::new(FE, DB, "tcp", &[db_addr.port()], "allow").unwrap()],
    };
    env.dp.replace_policy(&allow).unwrap();
    let (mut c, s) = env.inside(|| {
        let c = connect_from("127.0.0.2", db_addr).unwrap();
        let (s, _) = db.accept().unwrap();
        (c, s)
    });
    let srv = std::thread::spawn(move || {
        // Echo until the flow dies; report how it ended.
        let mut s = s;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => s.write_all(&buf[..n])?,
                Err(e) => return Err(e),
            }
        }
    });
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_rounds(&mut c, 100, 10);
    assert!(env
        .dp
        .socket_state(&c)
        .unwrap()
        .unwrap()
        .is_short_circuited());
    let deny = PolicyState {
        policies: vec![],
        ..allow.clone()
    };
    let change = env.dp.replace_policy(&deny).unwrap();
    assert_eq!(change.flows_reset, 2, "both ends of the flow: {change:?}");
    // The flow is gone: the client sees an error, not more bytes.
    let mut buf = [0u8; 16];
    let r = c.write_all(b"after").and_then(|_| c.read(&mut buf));
    match r {
        Err(_) | Ok(0) => {}
        Ok(n) => panic!("{n} bytes came back over a denied flow"),
    }
    let server_end = srv.join().unwrap();
    assert!(
        server_end.is_err(),
        "the server's read failed: {server_end:?}"
    );
    assert_eq!(env.counters().policy_resets, 2);
    // An aborted socket leaves the SOCKHASH when its application closes it.
    drop(c);
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn an_invalid_state_changes_nothing() {
    let env = Env::new("policy_invalid");
    let db = listen(&env, "127.0.0.3:0");
    let db_addr = db.local_addr().unwrap();
    let good = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: pods(),
        policies: vec![Rule::new(FE, DB, "tcp", &[db_addr.port()], "allow").unwrap()],
    };
    let g1 = env.dp.replace_policy(&good).unwrap().generation;
    let mut bad = good.clone();
    bad.policies
        .push(Rule::new(FE, DB, "tcp", &[0], "allow").unwrap());
    let e = env.dp.replace_policy(&bad).unwrap_err();
    assert!(
        e.to_string().starts_with("invalid policies[1].ports[0]"),
        "{e}"
    );
    assert_eq!(
        env.dp.policy(),
        Some(good.clone()),
        "the desired state is unchanged"
    );
    // The datapath still enforces the good state, at the same generation.
    let g2 = env
        .dp
        .set_default_action(DefaultAction::Deny)
        .unwrap()
        .generation;
    assert_eq!(g2, g1 + 1, "the failed replace did not bump the generation");
    env.inside(|| {
        assert!(connect_from("127.0.0.2", db_addr).is_ok());
        assert!(is_eperm(&connect_from("127.0.0.4", db_addr)));
    });
}

#[test]
fn a_full_policy_map_is_refused_and_the_live_state_stays() {
    let env = Env::with(
        "policy_full",
        DatapathOptions::default().max_policies(4),
        AttachOptions::default(),
    );
    let db = listen(&env, "127.0.0.3:0");
    let db_addr = db.local_addr().unwrap();
    let small = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: pods(),
        policies: vec![Rule::new(FE, DB, "tcp", &[db_addr.port()], "allow").unwrap()],
    };
    env.dp.replace_policy(&small).unwrap();
    // The cache may reach the database on six more ports: they do not fit.
    let extra: Vec<TcpListener> = (0..6).map(|_| listen(&env, "127.0.0.3:0")).collect();
    let extra_ports: Vec<u16> = extra
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let mut big = small.clone();
    big.policies
        .push(Rule::new(CACHE, DB, "tcp", &extra_ports, "allow").unwrap());
    let e = env.dp.replace_policy(&big).unwrap_err();
    assert!(matches!(e, Error::MapFull { .. }), "{e}");
    assert_eq!(env.dp.policy(), Some(small.clone()));
    let cache_denied_everywhere = |when: &str| {
        for l in &extra {
            let r = connect_from("127.0.0.4", l.local_addr().unwrap());
            assert!(is_eperm(&r), "{when}: the cache reached {l:?}: {r:?}");
        }
    };
    env.inside(|| {
        assert!(
            connect_from("127.0.0.2", db_addr).is_ok(),
            "the old state still allows"
        );
        assert!(
            is_eperm(&connect_from("127.0.0.4", db_addr)),
            "and still denies"
        );
        cache_denied_everywhere("after the failed replace");
    });
    // The failed replace left part of `big` in the idle copy. The next
    // change makes that copy live: it must hold exactly the new state
    // (the library reads the copy back instead of trusting what it meant
    // to write), twice so that both copies are checked.
    for round in 0..2 {
        env.dp.replace_policy(&small).unwrap();
        env.inside(|| {
            assert!(connect_from("127.0.0.2", db_addr).is_ok());
            cache_denied_everywhere(&format!("replace {round} after the failure"));
        });
    }
}

#[test]
fn upserts_deletes_and_lists() {
    let env = Env::new("policy_crud");
    let db = listen(&env, "127.0.0.3:0");
    let db_addr = db.local_addr().unwrap();
    let dp = &env.dp;
    assert_eq!(dp.policy(), None, "no policy until one is set");
    for e in pods() {
        dp.upsert_endpoint(e).unwrap();
    }
    dp.set_default_action(DefaultAction::Deny).unwrap();
    env.inside(|| assert!(is_eperm(&connect_from("127.0.0.2", db_addr))));
    let rule = Rule::new(FE, DB, "tcp", &[db_addr.port()], "allow").unwrap();
    dp.upsert_rule(rule.clone()).unwrap();
    env.inside(|| assert!(connect_from("127.0.0.2", db_addr).is_ok()));
    assert_eq!(dp.rules(), vec![rule.clone()]);
    assert_eq!(dp.endpoints().len(), 3);
    // Rename the frontend's address: the rule no longer matches it.
    dp.upsert_endpoint(Endpoint::new("127.0.0.2", CACHE).unwrap())
        .unwrap();
    env.inside(|| assert!(is_eperm(&connect_from("127.0.0.2", db_addr))));
    dp.delete_rule(&rule.from, &rule.to, rule.protocol, &rule.ports)
        .unwrap();
    assert!(dp.rules().is_empty());
    assert!(dp
        .delete_rule(&rule.from, &rule.to, rule.protocol, &rule.ports)
        .is_err());
    // Identities: numbers and names, known to the kernel map too.
    let ids = dp.identities().unwrap();
    let db_id: meshpath::policy::Identity = DB.parse().unwrap();
    let db_n = dp.identity_number(&db_id);
    assert_eq!(
        db_n,
        db_id.number(&meshpath::policy::IdentityKey::default())
    );
    assert!(db_n > u64::from(u32::MAX), "64-bit numbers (this one is)");
    assert_eq!(ids.name(db_n), Some(&db_id));
    assert_eq!(dp.identity_name(db_n).unwrap().as_deref(), Some(DB));
    let extra: meshpath::policy::Identity = "spiffe://mesh.local/ns/x/sa/y".parse().unwrap();
    let n = dp.upsert_identity(extra.clone()).unwrap();
    assert_eq!(
        dp.identity_name(n).unwrap().as_deref(),
        Some("spiffe://mesh.local/ns/x/sa/y")
    );
    let e = dp.delete_identity(&db_id).unwrap_err().to_string();
    assert!(
        e.contains("endpoints[") && e.contains("].identity") && e.contains("used"),
        "{e}"
    );
    dp.delete_identity(&extra).unwrap();
    assert_eq!(dp.identity_name(n).unwrap(), None);
    // Off: everything passes, nothing is counted.
    dp.disable_policy().unwrap();
    env.inside(|| assert!(connect_from("127.0.0.4", db_addr).is_ok()));
    assert_eq!(dp.policy(), None);
}
