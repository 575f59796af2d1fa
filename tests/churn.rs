//! Many connections: 1,000 at once, and 10,000 opened and closed with no
//! stale entry left. Root only (fails loudly otherwise).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_thousand_concurrent_connections() {
    raise_nofile();
    let env = Env::new("thousand_concurrent");
    let before = env.counters();
    let n = 1000usize;
    let (clients, servers) = env.inside(|| {
        let l = TcpListener::bind("127.0.0.2:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut clients = Vec::with_capacity(n);
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            // Accept as we go: the backlog is bounded.
            let c = TcpStream::connect(addr).unwrap();
            let (s, _) = l.accept().unwrap();
            clients.push(c);
            servers.push(s);
        }
        (clients, servers)
    });
    assert_eq!(env.dp.sockhash_len().unwrap(), 2 * n, "every end enrolled");
    // Every connection carries its own bytes, all open at the same time,
    // from four threads.
    let mut pairs: Vec<(usize, TcpStream, TcpStream)> = clients
        .into_iter()
        .zip(servers)
        .enumerate()
        .map(|(i, (c, s))| (i, c, s))
        .collect();
    let mut handles = Vec::new();
    for t in 0..4 {
        let mine: Vec<_> = pairs.drain(..(n / 4).min(pairs.len())).collect();
        handles.push(std::thread::spawn(move || {
            for (i, mut c, mut s) in mine.iter().map(|(i, c, s)| (*i, c, s)) {
                let mut out = vec![0u8; 512 + i % 700];
                pattern(i as u64, 0, &mut out);
                c.write_all(&out).unwrap();
                let mut got = vec![0u8; out.len()];
                s.read_exact(&mut got).unwrap();
                assert_eq!(got, out, "connection {i}");
                s.write_all(&got[..16]).unwrap();
                let mut back = [0u8; 16];
                c.read_exact(&mut back).unwrap();
                assert_eq!(back[..], out[..16], "connection {i} reply");
            }
            (t, mine)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.push(h.join().unwrap());
    }
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 2 * n as u64, "{d:?}");
    assert_eq!(d.msgs_redirected, 2 * n as u64, "{d:?}");
    assert_eq!(d.msgs_fallback, 0, "{d:?}");
    drop(all);
    env.wait_empty(Duration::from_secs(10));
}

#[test]
fn ten_thousand_connections_leave_no_stale_entries() {
    let env = Env::new("ten_thousand_churn");
    let before = env.counters();
    let n = 10_000u64;
    let start = Instant::now();
    env.inside(|| {
        let l = TcpListener::bind("127.0.0.3:0").unwrap();
        let addr = l.local_addr().unwrap();
        for i in 0..n {
            let mut c = TcpStream::connect(addr).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let msg = i.to_le_bytes();
            c.write_all(&msg).unwrap();
            let mut got = [0u8; 8];
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, msg);
            // Alternate which end closes first.
            if i % 2 == 0 {
                drop(c);
                drop(s);
            } else {
                drop(s);
                drop(c);
            }
        }
    });
    env.wait_empty(Duration::from_secs(20));
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 2 * n, "{d:?}");
    assert_eq!(
        d.sockets_removed + d.sockets_evicted,
        2 * n,
        "every socket accounted for: {d:?}"
    );
    assert_eq!(d.sockets_tracked(), 0, "{d:?}");
    assert_eq!(d.msgs_redirected, n, "{d:?}");
    assert_eq!(d.enroll_errors, 0, "{d:?}");
    eprintln!("10,000 connections in {:?}", start.elapsed());
}

#[test]
fn a_full_socket_map_refuses_new_sockets_and_keeps_the_rest() {
    // max_sockets 8: the ninth socket is not enrolled (counted), and the
    // connections already short-circuited keep working.
    let env = Env::with(
        "full_map",
        meshpath::DatapathOptions::default().max_sockets(8),
        meshpath::AttachOptions::default(),
    );
    let before = env.counters();
    let pairs: Vec<_> = (0..6).map(|_| env.pair("127.0.0.4:0")).collect();
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 8, "{d:?}");
    assert!(d.enroll_errors >= 1, "the map was full: {d:?}");
    for (i, (c, s)) in pairs.into_iter().enumerate() {
        let mut c = c;
        let srv = echo_server(s);
        echo_rounds(&mut c, 100 + i, 20);
        drop(c);
        srv.join().unwrap();
    }
    env.wait_empty(Duration::from_secs(5));
}
