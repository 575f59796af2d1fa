//! The short-circuit end to end: real sockets in a private cgroup, real
//! programs in the kernel. Root only (fails loudly otherwise).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use meshpath::{AttachOptions, DatapathOptions, PortSide};

fn assert_redirected_echo(env: &Env, bind: &str, connect_to: Option<&str>) {
    let before = env.counters();
    let (mut c, s) = env.inside(|| {
        let l = TcpListener::bind(bind).unwrap();
        let port = l.local_addr().unwrap().port();
        let to: SocketAddr = match connect_to {
            Some(host) => format!("{host}:{port}").parse().unwrap(),
            None => l.local_addr().unwrap(),
        };
        tcp_pair_on(&l, to)
    });
    let srv = echo_server(s);
    echo_rounds(&mut c, 1000, 100);
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 2, "{bind}: both ends enrolled ({d:?})");
    assert!(
        d.msgs_redirected >= 200,
        "{bind}: redirected {} messages",
        d.msgs_redirected
    );
    assert_eq!(d.msgs_fallback, 0, "{bind}: nothing took TCP ({d:?})");
    assert_eq!(d.bytes_redirected, 200 * 1000);
    drop(c);
    assert_eq!(srv.join().unwrap(), 100 * 1000);
}

#[test]
fn redirects_ipv4() {
    let env = Env::new("redirects_ipv4");
    assert_redirected_echo(&env, "127.0.0.2:0", None);
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn redirects_ipv6() {
    let env = Env::new("redirects_ipv6");
    assert_redirected_echo(&env, "[::1]:0", None);
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn redirects_between_ipv4_client_and_dual_stack_server() {
    // AF_INET client, AF_INET6 accepted socket seeing ::ffff:127.0.0.1.
    let env = Env::new("redirects_v4_to_v4mapped");
    assert_redirected_echo(&env, "[::]:0", Some("127.0.0.1"));
    // AF_INET6 on both ends, v4-mapped addresses on both.
    assert_redirected_echo(&env, "[::]:0", Some("[::ffff:127.0.0.1]"));
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn sockets_are_listed_and_leave_on_close() {
    let env = Env::new("sockets_listed");
    let before = env.counters();
    let (c, s) = env.pair("127.0.0.3:0");
    let mut listed: Vec<_> = env
        .dp
        .sockets()
        .unwrap()
        .into_iter()
        .map(|e| (e.local, e.remote))
        .collect();
    listed.sort();
    let mut want = vec![
        (c.local_addr().unwrap(), c.peer_addr().unwrap()),
        (s.local_addr().unwrap(), s.peer_addr().unwrap()),
    ];
    want.sort();
    assert_eq!(listed, want);
    assert_eq!(env.dp.sockhash_len().unwrap(), 2);
    assert_eq!(env.counters().since(&before).sockets_tracked(), 2);
    drop((c, s));
    env.wait_empty(Duration::from_secs(5));
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_tracked(), 0, "{d:?}");
}

#[test]
fn peer_outside_attached_cgroups_takes_tcp_and_client_leaves() {
    let env = Env::new("peer_outside");
    let before = env.counters();
    // The server is created outside the cgroup: never enrolled.
    let l = TcpListener::bind("127.0.0.4:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (mut c, s) = env.inside(|| tcp_pair_on(&l, addr));
    let srv = echo_server(s);
    echo_rounds(&mut c, 300, 200);
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 1, "only the client is enrolled: {d:?}");
    assert!(d.fallback_no_peer >= 1, "{d:?}");
    assert_eq!(d.msgs_redirected, 0, "{d:?}");
    // With TCP flowing, the client leaves the short-circuit: plain TCP.
    assert_eq!(d.sockets_evicted, 1, "{d:?}");
    assert_eq!(env.dp.sockhash_len().unwrap(), 0);
    drop(c);
    srv.join().unwrap();
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn data_sent_before_enrollment_arrives_in_order() {
    // TCP Fast Open puts the first bytes in the SYN, through TCP, before
    // sockops enrolls the client: what follows must not overtake them.
    let env = Env::new("tfo_before_enroll");
    let ns = Netns::new("tfo_before_enroll");
    ns.sysctl("net.ipv4.tcp_fastopen", "519"); // client+server, no cookie needed
    let before = env.counters();
    let got = env.inside(|| {
        ns.run(|| {
            use nix::sys::socket::*;
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            // Enable TFO on the listener (queue length 16).
            let qlen: libc::c_int = 16;
            // SAFETY: setsockopt with a valid int option.
            let r = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&l),
                    libc::IPPROTO_TCP,
                    libc::TCP_FASTOPEN,
                    (&qlen as *const libc::c_int).cast(),
                    4,
                )
            };
            assert_eq!(r, 0, "TCP_FASTOPEN on the listener");
            let addr = SockaddrIn::from(match l.local_addr().unwrap() {
                SocketAddr::V4(a) => a,
                _ => unreachable!(),
            });
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
            .unwrap();
            let first = b"first-in-the-SYN|";
            sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                first,
                &addr,
                MsgFlags::from_bits_retain(libc::MSG_FASTOPEN),
            )
            .expect("sendto MSG_FASTOPEN");
            let mut c = TcpStream::from(fd);
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            for i in 0..50 {
                c.write_all(format!("msg{i:02}|").as_bytes()).unwrap();
            }
            drop(c);
            let mut got = String::new();
            s.read_to_string(&mut got).unwrap();
            got
        })
    });
    let mut want = String::from("first-in-the-SYN|");
    for i in 0..50 {
        want.push_str(&format!("msg{i:02}|"));
    }
    assert_eq!(got, want, "bytes reordered or lost");
    let d = env.counters().since(&before);
    assert!(d.sockets_enrolled >= 1, "the client was enrolled: {d:?}");
    assert!(d.fallback_sent_before >= 1, "the client kept TCP: {d:?}");
    assert_eq!(d.msgs_redirected, 0, "{d:?}");
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn bypassed_port_is_never_enrolled() {
    let env = Env::new("bypass_port");
    let l = env.inside(|| TcpListener::bind("127.0.0.5:0").unwrap());
    let addr = l.local_addr().unwrap();
    env.dp.bypass_port(addr.port(), PortSide::Both).unwrap();
    assert_eq!(
        env.dp.bypassed_ports().unwrap(),
        vec![(addr.port(), PortSide::Both)]
    );
    let before = env.counters();
    let (mut c, s) = env.inside(|| tcp_pair_on(&l, addr));
    let srv = echo_server(s);
    echo_rounds(&mut c, 100, 50);
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 0, "{d:?}");
    assert_eq!(d.skipped_bypass, 2, "both ends skipped: {d:?}");
    assert_eq!(env.dp.sockhash_len().unwrap(), 0);
    drop(c);
    srv.join().unwrap();
    // Taking the port back enrolls new connections again.
    assert!(env.dp.remove_bypass_port(addr.port()).unwrap());
    let before = env.counters();
    let (c, s) = env.inside(|| tcp_pair_on(&l, addr));
    assert_eq!(env.counters().since(&before).sockets_enrolled, 2);
    drop((c, s));
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn cgroup_attached_without_short_circuit_stays_on_tcp() {
    let env = Env::with(
        "no_short_circuit",
        DatapathOptions::default(),
        AttachOptions::default().short_circuit(false),
    );
    let before = env.counters();
    let (mut c, s) = env.pair("127.0.0.6:0");
    let srv = echo_server(s);
    echo_rounds(&mut c, 100, 20);
    assert_eq!(env.counters().since(&before).sockets_enrolled, 0);
    assert_eq!(env.dp.sockhash_len().unwrap(), 0);
    drop(c);
    srv.join().unwrap();
}

#[test]
fn connection_established_before_attach_keeps_working_unchanged() {
    let mut env = Env::new("established_before_attach");
    env.attachment = None; // detach: nothing attached now
    let (mut c, s) = env.pair("127.0.0.7:0");
    let srv = echo_server(s);
    echo_rounds(&mut c, 500, 20);
    let before = env.counters();
    // Taking over established connections is tests/takeover.rs; asked not
    // to, attaching leaves them alone.
    env.attach_with(&AttachOptions::default().enroll_existing(false));
    echo_rounds(&mut c, 500, 200);
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 0, "not enrolled behind its back: {d:?}");
    assert_eq!(d.msgs_redirected + d.msgs_fallback, 0, "{d:?}");
    drop(c);
    assert_eq!(srv.join().unwrap(), 500 * 220);
}

fn stream_while(env_action: impl FnOnce(), c: TcpStream, s: TcpStream, total: usize) {
    let mut c = c;
    let mut s = s;
    let writer = std::thread::spawn(move || write_pattern(&mut c, 7, total, 64 * 1024));
    let reader = std::thread::spawn(move || read_pattern(&mut s, 7, total));
    std::thread::sleep(Duration::from_millis(30));
    env_action();
    let w = writer.join().expect("writer");
    let r = reader.join().expect("reader");
    assert_eq!(w, r, "hash of what was written and what was read");
}

#[test]
fn detach_while_traffic_flows_loses_nothing() {
    let mut env = Env::new("detach_while_flowing");
    let before = env.counters();
    let (c, s) = env.pair("127.0.0.8:0");
    let att = env.attachment.take();
    stream_while(move || drop(att), c, s, 512 << 20);
    let d = env.counters().since(&before);
    assert!(d.msgs_redirected > 0, "{d:?}");
    // New connections after detach are not enrolled.
    let b2 = env.counters();
    let (c, s) = env.pair("127.0.0.8:0");
    assert_eq!(env.counters().since(&b2).sockets_enrolled, 0);
    drop((c, s));
    // The streamed pair closed after the detach: no TCP_CLOSE callback
    // reached the datapath, the sweep removes its entries.
    assert_eq!(env.dp.sockhash_len().unwrap(), 0);
    assert_eq!(env.dp.sockets().unwrap().len(), 2);
    env.sweep_and_wait_empty(Duration::from_secs(5));
}

#[test]
fn detach_and_reattach_while_traffic_flows_loses_nothing() {
    let mut env = Env::new("reattach_while_flowing");
    let before = env.counters();
    let (c, s) = env.pair("127.0.0.10:0");
    let echo = |env: &Env, size: usize| -> u64 {
        let b = env.counters();
        let (mut c2, s2) = env.pair("127.0.0.10:0");
        let srv = echo_server(s2);
        echo_rounds(&mut c2, size, 10);
        drop(c2);
        assert_eq!(srv.join().unwrap(), 10 * size as u64, "echo of {size} B");
        env.counters().since(&b).sockets_enrolled
    };
    let mut cycles = 0;
    stream_while(
        || {
            for round in 0..5 {
                env.attachment = None;
                assert_eq!(echo(&env, 300 + round), 0, "detached: plain TCP");
                env.attach_with(&AttachOptions::default());
                assert_eq!(echo(&env, 700 + round), 2, "re-attached: enrolled");
                cycles += 1;
            }
        },
        c,
        s,
        256 << 20,
    );
    assert_eq!(cycles, 5);
    let d = env.counters().since(&before);
    assert!(d.msgs_redirected > 0, "{d:?}");
    drop(env.attachment.take());
    env.sweep_and_wait_empty(Duration::from_secs(5));
}

#[test]
fn unloading_the_datapath_while_traffic_flows_loses_nothing() {
    let env = Env::new("unload_while_flowing");
    let (c, s) = env.pair("127.0.0.9:0");
    let Env {
        attachment,
        cgroup,
        dp,
        _serial,
    } = env;
    stream_while(
        move || {
            drop(attachment);
            drop(dp);
        },
        c,
        s,
        512 << 20,
    );
    drop(cgroup);
}
