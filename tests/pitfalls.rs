//! The known pitfalls of socket short-circuits, each against real sockets
//! in a private cgroup: readiness (epoll, tokio, poll, FIONREAD),
//! SO_RCVLOWAT, MSG_PEEK, half-close, writes larger than the socket
//! buffers, sendfile, busy-polling receivers, and the redirect-to-TCP
//! transition. Root only (fails loudly otherwise).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use common::*;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, setsockopt, sockopt, MsgFlags};

fn readable_within(s: &TcpStream, ms: u16) -> bool {
    let mut pfd = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    poll(&mut pfd, PollTimeout::from(ms)).unwrap() == 1
}

fn set_rcvlowat(s: &impl AsRawFd, v: libc::c_int) {
    // SAFETY: setsockopt with a valid int option.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(r, 0, "SO_RCVLOWAT");
}

/// What FIONREAD should say with `n` short-circuited bytes queued: `n`
/// where the kernel counts them (its fix, `tcp_bpf_ioctl`, is in 6.12 and
/// later), 0 on older kernels (6.1), where the load-time probe reports it.
fn fionread_of(env: &Env, n: i32) -> i32 {
    if env.dp.quirks().fionread_exact {
        n
    } else {
        0
    }
}

fn fionread(s: &TcpStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer.
    assert_eq!(
        unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) },
        0
    );
    n
}

#[test]
fn poll_and_fionread_see_redirected_bytes() {
    let env = Env::new("poll_fionread");
    let q = *env.dp.quirks();
    assert!(q.probed, "the load-time probe ran");
    assert!(
        q.redirect_works && q.epoll_wakeup && q.poll_readable,
        "every supported kernel passes the readiness probe: {q:?}"
    );
    // FIONREAD counts short-circuited bytes from 6.12 on; before, the
    // probe notices and says so (degraded, not hidden).
    if common::kernel_at_least(6, 12) {
        assert!(q.fionread_exact, "{q:?}");
    }
    assert_eq!(
        q.problems().iter().any(|p| p.contains("FIONREAD")),
        !q.fionread_exact,
        "{:?}",
        q.problems()
    );
    let before = env.counters();
    let (mut c, s) = env.pair("127.0.0.2:0");
    assert!(!readable_within(&s, 50), "nothing sent yet");
    c.write_all(&[7u8; 1234]).unwrap();
    assert!(
        readable_within(&s, 2000),
        "poll must report redirected data"
    );
    assert_eq!(
        fionread(&s),
        fionread_of(&env, 1234),
        "FIONREAD counts redirected bytes"
    );
    c.write_all(&[8u8; 766]).unwrap();
    assert_eq!(fionread(&s), fionread_of(&env, 2000));
    let mut buf = vec![0u8; 2000];
    (&s).read_exact(&mut buf).unwrap();
    assert!(buf[..1234].iter().all(|&b| b == 7) && buf[1234..].iter().all(|&b| b == 8));
    assert_eq!(fionread(&s), 0);
    assert!(env.counters().since(&before).msgs_redirected >= 2);
}

#[test]
fn epoll_edge_triggered_server_does_not_stall() {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    let env = Env::new("epoll_et");
    let before = env.counters();
    let (mut c, s) = env.pair("127.0.0.3:0");
    s.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        ep.add(
            &s,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 1),
        )
        .unwrap();
        let mut events = [EpollEvent::empty(); 4];
        let mut buf = vec![0u8; 64 * 1024];
        let mut echoed = 0usize;
        loop {
            let n = ep.wait(&mut events, EpollTimeout::from(5000u16)).unwrap();
            assert!(
                n > 0,
                "epoll stalled after {echoed} bytes: a wakeup was lost"
            );
            // Edge-triggered: drain until EAGAIN.
            loop {
                match (&s).read(&mut buf) {
                    Ok(0) => return echoed,
                    Ok(n) => {
                        let mut off = 0;
                        while off < n {
                            match (&s).write(&buf[off..n]) {
                                Ok(w) => off += w,
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                    std::thread::yield_now()
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                        echoed += n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    });
    for size in [1usize, 100, 4096, 60_000] {
        echo_rounds(&mut c, size, 300);
    }
    drop(c);
    assert_eq!(server.join().unwrap(), 300 * (1 + 100 + 4096 + 60_000));
    let d = env.counters().since(&before);
    assert!(d.msgs_redirected >= 2400, "{d:?}");
}

#[test]
fn tokio_echo_over_many_connections() {
    let env = Env::new("tokio_echo");
    let before = env.counters();
    let l = env.inside(|| TcpListener::bind("127.0.0.4:0").unwrap());
    let addr = l.local_addr().unwrap();
    let conns = 32usize;
    let clients: Vec<TcpStream> = env.inside(|| {
        (0..conns)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let server = tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let (mut s, _) = l.accept().await.unwrap();
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    loop {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        s.write_all(&buf[..n]).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let mut tasks = Vec::new();
        for (i, c) in clients.into_iter().enumerate() {
            c.set_nonblocking(true).unwrap();
            c.set_nodelay(true).unwrap();
            let mut c = tokio::net::TcpStream::from_std(c).unwrap();
            tasks.push(tokio::spawn(async move {
                let mut out = vec![0u8; 1000 + i];
                let mut back = vec![0u8; out.len()];
                for r in 0..200u64 {
                    pattern(r * 31 + i as u64, 0, &mut out);
                    c.write_all(&out).await.unwrap();
                    c.read_exact(&mut back).await.unwrap();
                    assert_eq!(out, back, "conn {i} round {r}");
                }
            }));
        }
        tokio::time::timeout(Duration::from_secs(60), async {
            for t in tasks {
                t.await.unwrap();
            }
        })
        .await
        .expect("tokio echo stalled: a readiness notification was lost");
        server.await.unwrap();
    });
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 2 * conns as u64, "{d:?}");
    assert!(d.msgs_redirected >= (2 * conns * 200) as u64, "{d:?}");
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn so_rcvlowat_is_honoured() {
    let env = Env::new("rcvlowat");
    let before = env.counters();
    let (mut c, s) = env.pair("127.0.0.5:0");
    set_rcvlowat(&s, 100);
    c.write_all(&[1u8; 10]).unwrap();
    assert!(
        !readable_within(&s, 300),
        "10 bytes < SO_RCVLOWAT 100: not readable yet"
    );
    c.write_all(&[2u8; 90]).unwrap();
    assert!(readable_within(&s, 2000));
    let mut buf = [0u8; 200];
    let n = (&s).read(&mut buf).unwrap();
    assert_eq!(n, 100, "one read returns the low-water mark's worth");
    assert!(buf[..10].iter().all(|&b| b == 1) && buf[10..100].iter().all(|&b| b == 2));
    let d = env.counters().since(&before);
    assert_eq!(d.rcvlowat_optouts, 1, "{d:?}");
    assert!(d.fallback_peer_optout >= 1, "{d:?}");
}

#[test]
fn so_rcvlowat_inherited_from_the_listener() {
    let env = Env::new("rcvlowat_listener");
    let before = env.counters();
    let (mut c, s) = env.inside(|| {
        let l = TcpListener::bind("127.0.0.5:0").unwrap();
        set_rcvlowat(&l, 64);
        let a = l.local_addr().unwrap();
        tcp_pair_on(&l, a)
    });
    c.write_all(&[1u8; 63]).unwrap();
    assert!(!readable_within(&s, 300));
    c.write_all(&[1u8; 1]).unwrap();
    assert!(readable_within(&s, 2000));
    let mut buf = [0u8; 100];
    assert_eq!((&s).read(&mut buf).unwrap(), 64);
    let d = env.counters().since(&before);
    assert_eq!(d.rcvlowat_optouts, 1, "flagged at enrollment: {d:?}");
    assert_eq!(d.msgs_redirected, 0, "{d:?}");
}

#[test]
fn redirected_then_tcp_bytes_stay_in_order() {
    // Bytes redirected and still unread, then the direction moves to TCP
    // (the reader sets SO_RCVLOWAT): the reader must see them first.
    let env = Env::new("redirect_then_tcp");
    let before = env.counters();
    let (mut c, mut s) = env.pair("127.0.0.6:0");
    c.write_all(b"redirected-").unwrap();
    assert_eq!(fionread(&s), fionread_of(&env, 11));
    set_rcvlowat(&s, 2);
    c.write_all(b"through-tcp").unwrap();
    let mut got = [0u8; 22];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"redirected-through-tcp");
    // Keep talking both ways: the connection leaves the short-circuit.
    let srv = echo_server(s);
    echo_rounds(&mut c, 2000, 200);
    let d = env.counters().since(&before);
    assert!(
        d.msgs_redirected >= 1 && d.fallback_peer_optout >= 1,
        "{d:?}"
    );
    assert_eq!(d.sockets_evicted, 2, "both ends left once drained: {d:?}");
    assert_eq!(env.dp.sockhash_len().unwrap(), 0);
    drop(c);
    srv.join().unwrap();
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn msg_peek_does_not_consume() {
    let env = Env::new("msg_peek");
    let before = env.counters();
    let (mut c, s) = env.pair("127.0.0.7:0");
    c.write_all(b"hello ").unwrap();
    c.write_all(b"world").unwrap();
    assert!(readable_within(&s, 2000));
    let mut peek = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(5);
    let n = loop {
        let n = recv(s.as_raw_fd(), &mut peek, MsgFlags::MSG_PEEK).unwrap();
        if n == 11 || Instant::now() > deadline {
            break n;
        }
    };
    assert_eq!(&peek[..n], b"hello world", "peek sees both messages");
    let mut small = [0u8; 3];
    assert_eq!(
        recv(s.as_raw_fd(), &mut small, MsgFlags::MSG_PEEK).unwrap(),
        3
    );
    assert_eq!(&small, b"hel");
    let mut all = [0u8; 11];
    (&s).read_exact(&mut all).unwrap();
    assert_eq!(&all, b"hello world", "peeked bytes are still there, once");
    assert_eq!(fionread(&s), 0);
    assert!(env.counters().since(&before).msgs_redirected >= 2);
}

#[test]
fn half_close_delivers_eof_and_the_other_way_keeps_working() {
    let env = Env::new("half_close");
    let before = env.counters();
    let (mut c, mut s) = env.pair("127.0.0.8:0");
    let sent = write_pattern(&mut c, 1, 300_000, 7_000);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let got = read_pattern(&mut s, 1, 300_000);
    assert_eq!(sent, got);
    let mut one = [0u8; 1];
    assert_eq!(s.read(&mut one).unwrap(), 0, "EOF after the data");
    assert_eq!(s.read(&mut one).unwrap(), 0, "EOF again");
    // The other direction still works after the client's FIN.
    let back = write_pattern(&mut s, 2, 200_000, 9_000);
    assert_eq!(read_pattern(&mut c, 2, 200_000), back);
    drop(s);
    assert_eq!(c.read(&mut one).unwrap(), 0, "EOF at the client too");
    let d = env.counters().since(&before);
    assert!(d.bytes_redirected >= 500_000, "{d:?}");
}

#[test]
fn writes_larger_than_the_socket_buffers_are_byte_exact() {
    let env = Env::new("big_writes");
    for (i, size) in [1usize, 1000, 64 << 10, 1 << 20, 16 << 20]
        .into_iter()
        .enumerate()
    {
        let before = env.counters();
        let (c, s) = env.inside(|| {
            let l = TcpListener::bind("127.0.0.9:0").unwrap();
            let a = l.local_addr().unwrap();
            let (c, s) = tcp_pair_on(&l, a);
            // Small buffers: every large write needs backpressure.
            setsockopt(&c, sockopt::SndBuf, &16384).unwrap();
            setsockopt(&s, sockopt::RcvBuf, &16384).unwrap();
            (c, s)
        });
        let total = size * 3;
        let (mut c, mut s) = (c, s);
        let writer = std::thread::spawn(move || {
            let h = write_pattern(&mut c, i as u64, total, size);
            drop(c);
            h
        });
        let reader = std::thread::spawn(move || {
            // Read slowly at first so the writer hits backpressure.
            std::thread::sleep(Duration::from_millis(50));
            let h = read_pattern(&mut s, i as u64, total);
            let mut one = [0u8; 1];
            assert_eq!(
                s.read(&mut one).unwrap(),
                0,
                "nothing duplicated after the end"
            );
            h
        });
        assert_eq!(
            writer.join().unwrap(),
            reader.join().unwrap(),
            "size {size}"
        );
        let d = env.counters().since(&before);
        assert_eq!(
            d.bytes_redirected + d.bytes_fallback,
            total as u64,
            "size {size}: {d:?}"
        );
        assert!(d.bytes_redirected > 0, "size {size}: {d:?}");
    }
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn sendfile_into_a_short_circuited_socket() {
    let env = Env::new("sendfile");
    let total = 8usize << 20;
    let path = std::env::temp_dir().join(format!("meshpath-sendfile-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&path).unwrap();
        write_pattern(&mut f, 99, total, 1 << 20);
    }
    let file = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let before = env.counters();
    let (c, mut s) = env.pair("127.0.0.10:0");
    let reader = std::thread::spawn(move || read_pattern(&mut s, 99, total));
    let mut off: i64 = 0;
    while (off as usize) < total {
        let left = total - off as usize;
        let n = nix::sys::sendfile::sendfile(c.as_fd(), file.as_fd(), Some(&mut off), left)
            .expect("sendfile");
        assert!(n > 0);
    }
    reader.join().expect("reader");
    let d = env.counters().since(&before);
    assert_eq!(
        d.bytes_redirected, total as u64,
        "sendfile bytes went through sk_msg: {d:?}"
    );
}

#[test]
fn busy_polling_receiver_moves_the_connection_to_tcp() {
    let env = Env::new("busy_poll");
    let before = env.counters();
    let (c, s) = env.pair("127.0.0.11:0");
    fn spin_recv(s: &TcpStream, buf: &mut [u8]) {
        let mut off = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while off < buf.len() {
            match recv(s.as_raw_fd(), &mut buf[off..], MsgFlags::MSG_DONTWAIT) {
                Ok(0) => panic!("EOF"),
                Ok(n) => off += n,
                Err(nix::errno::Errno::EAGAIN) => assert!(Instant::now() < deadline, "stalled"),
                Err(e) => panic!("{e}"),
            }
        }
    }
    let rounds = 6000;
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..rounds {
            spin_recv(&s, &mut buf);
            (&s).write_all(&buf).unwrap();
        }
        s
    });
    let mut out = [0u8; 64];
    let mut back = [0u8; 64];
    for r in 0..rounds {
        pattern(r as u64, 0, &mut out);
        (&c).write_all(&out).unwrap();
        spin_recv(&c, &mut back);
        assert_eq!(out, back, "round {r}");
    }
    let s = server.join().unwrap();
    let d = env.counters().since(&before);
    for sock in [&c, &s] {
        let st = env.dp.socket_state(sock).unwrap().expect("was enrolled");
        assert!(st.evicted && !st.is_short_circuited(), "{st:?}");
        assert_eq!(st.direction, meshpath::Direction::Tcp);
    }
    assert!(
        d.fallback_peer_busy >= 1,
        "the spinner was recognised: {d:?}"
    );
    assert_eq!(d.sockets_evicted, 2, "both ends back on plain TCP: {d:?}");
    // Typically a few tens of messages on an idle machine; a loaded one
    // (other jobs on the same two CPUs) lets the spinner run less often.
    assert!(
        d.msgs_redirected < rounds as u64,
        "recognised within the first half of the run, not after {} messages",
        d.msgs_redirected
    );
    assert_eq!(
        env.dp.sockhash_len().unwrap(),
        0,
        "the live connection left the SOCKHASH"
    );
    drop((c, s));
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn blocking_ping_pong_keeps_the_short_circuit() {
    // The busy-poll detector must not fire for ordinary blocking readers.
    let env = Env::new("blocking_keeps");
    let before = env.counters();
    let (mut c, s) = env.pair("127.0.0.12:0");
    let srv = echo_server(s);
    echo_rounds(&mut c, 64, 3000);
    let d = env.counters().since(&before);
    assert_eq!(d.fallback_peer_busy, 0, "{d:?}");
    assert_eq!(d.msgs_fallback, 0, "{d:?}");
    assert_eq!(env.dp.sockhash_len().unwrap(), 2);
    drop(c);
    srv.join().unwrap();
}

#[test]
fn streaming_small_writes_keeps_the_short_circuit() {
    let env = Env::new("streaming_keeps");
    let before = env.counters();
    let (mut c, mut s) = env.pair("127.0.0.13:0");
    let total = 8 << 20;
    let reader = std::thread::spawn(move || read_pattern(&mut s, 5, total));
    let w = write_pattern(&mut c, 5, total, 64);
    assert_eq!(reader.join().unwrap(), w);
    let d = env.counters().since(&before);
    assert_eq!(d.msgs_fallback, 0, "{d:?}");
    assert_eq!(d.bytes_redirected, total as u64);
}
