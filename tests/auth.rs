//! `auth` rules in the datapath: a flow passes only while its identities
//! are authenticated (the auth map), is held back until then, and asks
//! the agent through de-duplicated signals. The mutual-TLS handshake
//! itself is the agent's (tests/agent_auth.rs). Root only.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use meshpath::policy::{DefaultAction, Endpoint, Identity, IdentityKey, PolicyState, Rule};
use meshpath::{AuthKey, CertInfo, Point, Verdict};

const FE: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
const DB: &str = "spiffe://mesh.local/ns/db/sa/postgres";

/// Its number under the default key (the datapaths here use it).
fn number(name: &str) -> u64 {
    name.parse::<Identity>()
        .unwrap()
        .number(&IdentityKey::default())
}

/// A TCP socket bound to `src`; create it inside the cgroup.
fn bound(src: &str) -> TcpStream {
    let s = bound_tcp(src).unwrap();
    // SO_SNDTIMEO bounds connect() too: a held SYN is retried for minutes.
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn connect(s: TcpStream, dst: SocketAddr) -> std::io::Result<TcpStream> {
    connect_tcp(s, dst)
}

fn connect_from(src: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
    connect(bound(src), dst)
}

fn auth_state(port: u16) -> PolicyState {
    PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new("127.0.0.2", FE).unwrap(),
            Endpoint::new("127.0.0.3", DB).unwrap(),
        ],
        policies: vec![Rule::new(FE, DB, "tcp", &[port], "auth").unwrap()],
    }
}

/// The connecting end's key: frontend (local) with db on this node.
fn client_key() -> AuthKey {
    AuthKey {
        local: number(FE),
        remote: number(DB),
        remote_node: 0,
    }
}

/// The accepting end's key.
fn server_key() -> AuthKey {
    AuthKey {
        local: number(DB),
        remote: number(FE),
        remote_node: 0,
    }
}

#[test]
fn an_auth_flow_is_held_until_authenticated_then_flows() {
    let env = Env::new("auth_held");
    let db = env.inside(|| TcpListener::bind("127.0.0.3:0").unwrap());
    let addr = db.local_addr().unwrap();
    env.dp.replace_policy(&auth_state(addr.port())).unwrap();
    let mut signals = env.dp.auth_signals().unwrap();
    assert!(env.dp.auth_signals().is_err(), "one reader at a time");
    let start = Instant::now();
    let sock = env.inside(|| bound("127.0.0.2"));
    let client = std::thread::spawn(move || connect(sock, addr));
    // The agent's part, by hand: take the signal, authenticate the pair.
    // The SYN is held where it leaves, so the connecting end asks.
    let sig = signals
        .poll(Duration::from_secs(3))
        .unwrap()
        .expect("a signal");

    assert_eq!(sig.key, client_key());
    assert_eq!(
        sig.point,
        Point::Connect,
        "asked at connect, before any packet"
    );
    // A real agent takes milliseconds to authenticate; this one would
    // answer before the SYN leaves if it did not wait for the datapath to
    // hold it (dropped at egress, auth required).
    let waiting = Instant::now();
    while env
        .dp
        .verdicts()
        .unwrap()
        .get(Point::Egress, Verdict::AuthRequired)
        == 0
    {
        assert!(
            waiting.elapsed() < Duration::from_secs(3),
            "the SYN was never held"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let until = SystemTime::now() + Duration::from_secs(60);
    env.dp.auth_insert(client_key(), until).unwrap();
    env.dp.auth_insert(server_key(), until).unwrap();
    let mut c = client.join().unwrap().expect("held, then connected");
    let held = start.elapsed();
    let (mut s, _) = db.accept().unwrap();
    c.write_all(b"after the handshake").unwrap();
    let mut buf = [0u8; 19];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after the handshake");
    assert!(
        held >= Duration::from_millis(900),
        "the SYN was retransmitted: {held:?}"
    );
    let d = env.counters();
    assert!(
        d.auth_ok >= 2 && d.auth_signals == 1 && d.auth_signals_deduplicated >= 1,
        "{d:?}"
    );
    assert_eq!(env.dp.auth_entries().unwrap().len(), 2);
    // An already authenticated pair connects at once.
    let t = Instant::now();
    let c2 = env.inside(|| connect_from("127.0.0.2", addr)).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    drop((c, c2, s));
}

#[test]
fn an_expired_entry_makes_the_next_packet_ask_again() {
    let env = Env::new("auth_expiry");
    let db = env.inside(|| TcpListener::bind("127.0.0.3:0").unwrap());
    let addr = db.local_addr().unwrap();
    env.dp.replace_policy(&auth_state(addr.port())).unwrap();
    let mut signals = env.dp.auth_signals().unwrap();
    let soon = SystemTime::now() + Duration::from_millis(1500);
    env.dp.auth_insert(client_key(), soon).unwrap();
    env.dp.auth_insert(server_key(), soon).unwrap();
    let (mut c, mut s) = env.inside(|| {
        let c = connect_from("127.0.0.2", addr).unwrap();
        let (s, _) = db.accept().unwrap();
        (c, s)
    });
    c.write_all(b"x").unwrap();
    s.read_exact(&mut [0u8; 1]).unwrap();
    assert!(env
        .dp
        .socket_state(&c)
        .unwrap()
        .unwrap()
        .is_short_circuited());
    assert!(
        signals.poll(Duration::from_millis(100)).unwrap().is_none(),
        "no signal while valid"
    );
    std::thread::sleep(Duration::from_millis(1700));
    // Expired: the next message is judged again, dropped, and asks.
    let r = c.write(b"y");
    assert!(r.is_err(), "a message after expiry must not pass: {r:?}");
    let sig = signals
        .poll(Duration::from_secs(2))
        .unwrap()
        .expect("a signal after expiry");
    assert_eq!(sig.key, client_key());
    assert_eq!(sig.point, Point::ShortCircuit);
    // The sweep removes what expired.
    assert_eq!(env.dp.auth_sweep_expired().unwrap(), 2);
    assert!(env.dp.auth_entries().unwrap().is_empty());
}

#[test]
fn revoking_an_identity_cuts_its_flows() {
    let env = Env::new("auth_revoke");
    let db = env.inside(|| TcpListener::bind("127.0.0.3:0").unwrap());
    let addr = db.local_addr().unwrap();
    env.dp.replace_policy(&auth_state(addr.port())).unwrap();
    let later = SystemTime::now() + Duration::from_secs(600);
    env.dp.auth_insert(client_key(), later).unwrap();
    env.dp.auth_insert(server_key(), later).unwrap();
    let (mut c, s) = env.inside(|| {
        let c = connect_from("127.0.0.2", addr).unwrap();
        let (s, _) = db.accept().unwrap();
        (c, s)
    });
    let srv = echo_server(s);
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    echo_rounds(&mut c, 100, 5);
    let before = env.counters();
    assert_eq!(env.dp.auth_revoke_identity(number(FE)).unwrap(), 2);
    let d = env.counters().since(&before);
    assert_eq!(d.policy_resets, 2, "both ends reset: {d:?}");
    let r = c.write_all(b"after").and_then(|_| c.read(&mut [0u8; 8]));
    assert!(matches!(r, Err(_) | Ok(0)), "the flow is cut: {r:?}");
    let _ = srv.join();
    // New connections are held again.
    let v0 = env.dp.verdicts().unwrap();
    let sock = env.inside(|| bound("127.0.0.2"));
    let held = std::thread::spawn(move || connect(sock, addr));
    std::thread::sleep(Duration::from_millis(700));
    let v = env.dp.verdicts().unwrap().since(&v0);
    assert!(v.get(Point::Egress, Verdict::AuthRequired) >= 1, "{v:?}");
    assert!(held.join().unwrap().is_err(), "held until its timeout");
    drop(db);
}

#[test]
fn signals_are_deduplicated_and_rate_limited() {
    let env = Env::with(
        "auth_dedup",
        meshpath::DatapathOptions::default().auth_signal_rate(3),
        meshpath::AttachOptions::default(),
    );
    let dbs: Vec<TcpListener> = (0..8)
        .map(|_| env.inside(|| TcpListener::bind("127.0.0.3:0").unwrap()))
        .collect();
    let ports: Vec<u16> = dbs.iter().map(|l| l.local_addr().unwrap().port()).collect();
    // Eight remote identities, one auth rule each: eight distinct keys.
    let names: Vec<String> = (0..8)
        .map(|i| format!("spiffe://mesh.local/ns/db/sa/db{i}"))
        .collect();
    let mut state = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![Endpoint::new("127.0.0.2", FE).unwrap()],
        policies: vec![],
    };
    for (i, n) in names.iter().enumerate() {
        state
            .endpoints
            .push(Endpoint::new(&format!("127.0.1.{}", i + 1), n).unwrap());
        state
            .policies
            .push(Rule::new(FE, n, "udp", &[ports[i]], "auth").unwrap());
    }
    env.dp.replace_policy(&state).unwrap();
    let mut signals = env.dp.auth_signals().unwrap();
    let before = env.counters();
    env.inside(|| {
        let u = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        for round in 0..50 {
            for (i, p) in ports.iter().enumerate() {
                let to: SocketAddr = format!("127.0.1.{}:{p}", i + 1).parse().unwrap();
                let _ = u.send_to(&[round as u8], to);
            }
        }
    });
    let mut got = Vec::new();
    while let Some(s) = signals.poll(Duration::from_millis(200)).unwrap() {
        got.push(s);
    }
    let d = env.counters().since(&before);
    // 400 held datagrams (judged at sendmsg and at egress): at most
    // 3 signals per second and CPU; the rest de-duplicated or dropped.
    assert!(!got.is_empty() && got.len() <= 6, "{} signals", got.len());
    assert_eq!(got.len() as u64, d.auth_signals);
    assert!(d.auth_signals_dropped >= 1, "the rate limit bit: {d:?}");
    assert!(d.auth_signals_deduplicated >= 100, "{d:?}");
    drop(dbs);
}

#[test]
fn certificates_are_bound_to_local_identities() {
    let env = Env::new("auth_certs");
    let fe = number(FE);
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let cert = CertInfo {
        serial: vec![0x01, 0x23, 0x45],
        not_after,
    };
    env.dp.set_certificate(fe, &cert).unwrap();
    assert_eq!(env.dp.certificates().unwrap(), vec![(fe, cert)]);
    let bad = CertInfo {
        serial: vec![0; 21],
        not_after,
    };
    assert!(env
        .dp
        .set_certificate(fe, &bad)
        .unwrap_err()
        .to_string()
        .contains("serial"));
    assert!(env.dp.remove_certificate(fe).unwrap());
    assert!(env.dp.certificates().unwrap().is_empty());
    assert!(env
        .dp
        .auth_insert(client_key(), SystemTime::now() - Duration::from_secs(1))
        .is_err());
}
