//! Many connections: 1,000 at once, 10,000 opened and closed with no
//! stale entry left, and 50,000 while the policy is replaced every 100 ms.
//! Root only (fails loudly otherwise).

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
    assert_every_socket_left(&d, 2 * n);
    assert_eq!(d.msgs_redirected, n, "{d:?}");
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

// ---------------------------------------------------------------------
// Churn under policy replacement.

const CHURN_API: &str = "127.0.0.42";
const CHURN_SECRET: &str = "127.0.0.43";
/// One source address per client thread (all in 127.0.0.40/29, outside
/// the /32s of the two servers).
const CHURN_CLIENTS: [&str; 4] = ["127.0.0.41", "127.0.0.44", "127.0.0.45", "127.0.0.46"];

/// A TCP connection from `src` (bound, port 0) to `dst`. A SYN that is
/// dropped gives up after about 3 s (TCP_SYNCNT 1) instead of hanging.
fn connect_bound(src: &str, dst: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let fd = bound_tcp(src)?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let s = connect_tcp(fd, dst)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap();
    pages * page as u64
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Kernel memory charged to this process's BPF maps, each map counted
/// once (`memlock` of /proc/self/fdinfo): (SOCKHASH maps, all maps). A
/// SOCKHASH's figure grows with its element count, so an entry leaked per
/// connection shows here.
fn bpf_map_memlock() -> (u64, u64) {
    const BPF_MAP_TYPE_SOCKHASH: u64 = 18;
    let mut seen = std::collections::HashSet::new();
    let (mut sockhash, mut all) = (0, 0);
    for e in std::fs::read_dir("/proc/self/fdinfo").unwrap() {
        let Ok(text) = std::fs::read_to_string(e.unwrap().path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(ty), Some(mem)) =
            (field("map_id"), field("map_type"), field("memlock"))
        else {
            continue;
        };
        if seen.insert(id) {
            all += mem;
            if ty == BPF_MAP_TYPE_SOCKHASH {
                sockhash += mem;
            }
        }
    }
    (sockhash, all)
}

/// One allowed connection, opened and closed: `seq` picks its bytes.
/// Returns the bytes that crossed it (both directions).
fn churn_allowed_once(
    src: &str,
    l: &TcpListener,
    to: std::net::SocketAddr,
    seq: u64,
    buf: &mut [Vec<u8>; 2],
) -> Result<u64, String> {
    let mut c = connect_bound(src, to)
        .map_err(|e| format!("connection {seq}: allowed connect failed: {e}"))?;
    let (mut s, peer) = l
        .accept()
        .map_err(|e| format!("connection {seq}: accept: {e}"))?;
    if Some(peer) != c.local_addr().ok() {
        return Err(format!("connection {seq}: accepted {peer}, not ours"));
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let [out, got] = buf;
    // Request: 1..=1500 bytes, reply: 1..=64, both position-dependent.
    for (dir, len, seed) in [
        (0, 1 + (seq * 7919 % 1500) as usize, seq),
        (1, 1 + (seq % 64) as usize, seq ^ 0x5eed_5eed_5eed_5eed),
    ] {
        let (w, r): (&mut TcpStream, &mut TcpStream) = if dir == 0 {
            (&mut c, &mut s)
        } else {
            (&mut s, &mut c)
        };
        pattern(seed, 0, &mut out[..len]);
        w.write_all(&out[..len])
            .map_err(|e| format!("connection {seq}: write ({dir}): {e}"))?;
        r.read_exact(&mut got[..len])
            .map_err(|e| format!("connection {seq}: read ({dir}): {e}"))?;
        if got[..len] != out[..len] {
            return Err(format!("connection {seq}: {len} bytes ({dir}) differ"));
        }
    }
    let total = 2 + (seq * 7919 % 1500) + (seq % 64);
    // The server closes first; the client sees the EOF, then closes: with
    // a FIN (the server's end takes the TIME_WAIT) or, every other time,
    // with a RST (nothing left in TIME_WAIT).
    drop(s);
    match c.read(&mut got[..1]) {
        Ok(0) => {}
        Ok(n) => return Err(format!("connection {seq}: {n} bytes after close")),
        Err(e) => return Err(format!("connection {seq}: reading the EOF: {e}")),
    }
    if seq % 2 == 1 {
        let reset = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::Linger, &reset)
            .map_err(|e| format!("connection {seq}: SO_LINGER: {e}"))?;
    }
    Ok(total)
}

#[test]
fn fifty_thousand_connections_while_policy_is_replaced_every_100ms() {
    use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
    use meshpath::{Point, Verdict};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::Mutex;

    const THREADS: usize = 2;
    const ALLOWED: u64 = 50_000;
    const PER_THREAD: u64 = ALLOWED / THREADS as u64;
    /// One denied attempt before every DENY_EVERY-th allowed connection.
    const DENY_EVERY: u64 = 4;
    const TICK: Duration = Duration::from_millis(100);
    /// The churn is spread over at least this long (in bursts), so that
    /// it meets about 50 replacements even on a fast machine.
    const MIN_SPAN: Duration = Duration::from_secs(5);
    const RSS_SLACK: u64 = 20 << 20;
    /// Sockets in the maps at any one time: a client and a server end per
    /// thread, plus a few closing; a per-connection leak is thousands.
    const OCCUPANCY_MAX: usize = 4 * THREADS + 16;

    raise_nofile();
    let env = Env::new("policy_churn");
    let (apis, secrets): (Vec<TcpListener>, Vec<TcpListener>) = env.inside(|| {
        (0..THREADS)
            .map(|_| {
                (
                    TcpListener::bind((CHURN_API, 0)).unwrap(),
                    TcpListener::bind((CHURN_SECRET, 0)).unwrap(),
                )
            })
            .unzip()
    });
    let api_ports: Vec<u16> = apis
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let secret_ports: Vec<u16> = secrets
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();

    // Three states that allow every client -> api port and deny every
    // client -> secret port, each under other names, rule shapes, endpoint
    // prefixes and default actions: a decision that mixed two states
    // (new endpoints with old rules, new default with old maps) would
    // deny an allowed flow or allow a denied one.
    let id = |s: &str| format!("spiffe://churn.local/ns/churn/sa/{s}");
    let a = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: CHURN_CLIENTS
            .iter()
            .map(|ip| Endpoint::new(ip, &id("client-a")).unwrap())
            .chain([
                Endpoint::new(CHURN_API, &id("api-a")).unwrap(),
                Endpoint::new(CHURN_SECRET, &id("secret-a")).unwrap(),
            ])
            .collect(),
        policies: vec![
            Rule::new(&id("client-a"), &id("api-a"), "tcp", &api_ports, "allow").unwrap(),
            Rule::new(
                &id("client-a"),
                &id("secret-a"),
                "tcp",
                &secret_ports,
                "deny",
            )
            .unwrap(),
        ],
    };
    let b = PolicyState {
        default_action: DefaultAction::Allow,
        endpoints: vec![
            Endpoint::new("127.0.0.40/29", &id("client-b")).unwrap(),
            Endpoint::new(CHURN_API, &id("api-b")).unwrap(),
            Endpoint::new(CHURN_SECRET, &id("secret-b")).unwrap(),
        ],
        policies: vec![
            Rule::new(&id("client-b"), &id("api-b"), "tcp", &api_ports, "allow").unwrap(),
            Rule::new("*", &id("secret-b"), "any", &[], "deny").unwrap(),
            Rule::new(&id("secret-b"), &id("api-b"), "tcp", &[1], "audit").unwrap(),
        ],
    };
    let c = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: CHURN_CLIENTS
            .iter()
            .enumerate()
            .map(|(i, ip)| Endpoint::new(ip, &id(&format!("client-c{}", i % 2))).unwrap())
            .chain([
                Endpoint::new("127.0.0.42/31", &id("api-c")).unwrap(),
                Endpoint::new(CHURN_SECRET, &id("secret-c")).unwrap(),
            ])
            .collect(),
        policies: vec![
            Rule::new(&id("client-c0"), &id("api-c"), "tcp", &api_ports, "allow").unwrap(),
            Rule::new("*", &id("api-c"), "tcp", &[], "allow").unwrap(),
            Rule::new(&id("client-c1"), &id("secret-c"), "tcp", &[], "deny").unwrap(),
        ],
    };
    let states = [a, b, c];
    // A warm-up cycle, then the baselines: state 0 live, nothing enrolled.
    for st in states.iter().chain([&states[0]]) {
        env.dp.replace_policy(st).unwrap();
    }
    let (sockhash_mem0, maps_mem0) = bpf_map_memlock();
    let fds0 = open_fds();
    let before = env.counters();
    let verdicts0 = env.dp.verdicts().unwrap();

    let failures = Mutex::new(Vec::<String>::new());
    let fail = |e: String| {
        let mut f = failures.lock().unwrap();
        if f.len() < 20 {
            f.push(e);
        }
    };
    let stop = AtomicBool::new(false);
    let churn_done = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let rss_10k = Mutex::new(None::<u64>);
    let start = Instant::now();
    let (allowed, denied, bytes, churn_time, samples) = env.inside(|| {
        std::thread::scope(|scope| {
            // Replaces the policy every 100 ms, and samples map occupancy
            // and RSS at every tick.
            let replacer = scope.spawn(|| {
                let mut n = 0usize;
                let (mut max_replace, mut all_replace) = (Duration::ZERO, Duration::ZERO);
                let (mut max_socks, mut max_index, mut max_rss_after_10k) = (0, 0, 0u64);
                let mut next = Instant::now();
                while !churn_done.load(Relaxed) && !stop.load(Relaxed) {
                    n += 1;
                    let t0 = Instant::now();
                    match env.dp.replace_policy(&states[n % states.len()]) {
                        Ok(ch) if ch.flows_reset == 0 && ch.reset_error.is_none() => {}
                        Ok(ch) => fail(format!("replace {n} reset flows: {ch:?}")),
                        Err(e) => fail(format!("replace {n}: {e}")),
                    }
                    max_replace = max_replace.max(t0.elapsed());
                    all_replace += t0.elapsed();
                    let socks = env.dp.sockhash_len().unwrap();
                    let index = env.dp.sockets().unwrap().len();
                    max_socks = max_socks.max(socks);
                    max_index = max_index.max(index);
                    if socks > OCCUPANCY_MAX || index > OCCUPANCY_MAX {
                        fail(format!(
                            "after {} connections: {socks} in the SOCKHASH, {index} in the index",
                            done.load(Relaxed)
                        ));
                        stop.store(true, Relaxed);
                    }
                    if rss_10k.lock().unwrap().is_some() {
                        max_rss_after_10k = max_rss_after_10k.max(rss_bytes());
                    }
                    next += TICK;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                let mean_replace = all_replace / n.max(1) as u32;
                (
                    n,
                    mean_replace,
                    max_replace,
                    max_socks,
                    max_index,
                    max_rss_after_10k,
                )
            });
            let clients: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (api, secret) = (&apis[t], &secrets[t]);
                    let (api_addr, secret_addr) =
                        (api.local_addr().unwrap(), secret.local_addr().unwrap());
                    let (stop, done, rss_10k, fail) = (&stop, &done, &rss_10k, &fail);
                    scope.spawn(move || {
                        let src = CHURN_CLIENTS[t];
                        let mut buf = [vec![0u8; 1500], vec![0u8; 1500]];
                        let (mut allowed, mut denied, mut bytes) = (0u64, 0u64, 0u64);
                        for i in 0..PER_THREAD {
                            if stop.load(Relaxed) {
                                break;
                            }
                            if i % DENY_EVERY == 0 {
                                match connect_bound(src, secret_addr) {
                                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => denied += 1,
                                    Err(e) => {
                                        fail(format!("denied connect {i}: {e}, not EPERM"));
                                        stop.store(true, Relaxed);
                                        break;
                                    }
                                    Ok(s) => {
                                        fail(format!(
                                            "denied connect {i} from {:?} succeeded",
                                            s.local_addr()
                                        ));
                                        stop.store(true, Relaxed);
                                        break;
                                    }
                                }
                            }
                            let seq = t as u64 * PER_THREAD + i;
                            match churn_allowed_once(src, api, api_addr, seq, &mut buf) {
                                Ok(n) => {
                                    allowed += 1;
                                    bytes += n;
                                }
                                Err(e) => {
                                    fail(e);
                                    stop.store(true, Relaxed);
                                    break;
                                }
                            }
                            if done.fetch_add(1, Relaxed) + 1 == 10_000 {
                                *rss_10k.lock().unwrap() = Some(rss_bytes());
                            }
                            if (i + 1) % 250 == 0 {
                                let due =
                                    start + MIN_SPAN.mul_f64((i + 1) as f64 / PER_THREAD as f64);
                                let now = Instant::now();
                                if due > now {
                                    std::thread::sleep(due - now);
                                }
                            }
                        }
                        (allowed, denied, bytes)
                    })
                })
                .collect();
            let (mut allowed, mut denied, mut bytes) = (0, 0, 0);
            for h in clients {
                let (a, d, b) = h.join().unwrap();
                allowed += a;
                denied += d;
                bytes += b;
            }
            let churn_time = start.elapsed();
            churn_done.store(true, Relaxed);
            let samples = replacer.join().unwrap();
            (allowed, denied, bytes, churn_time, samples)
        })
    });
    let rss_end = rss_bytes();
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "after {allowed} allowed connections: {failures:#?}"
    );
    let (replaced, mean_replace, max_replace, max_socks, max_index, max_rss_after_10k) = samples;
    let rss_10k = rss_10k
        .into_inner()
        .unwrap()
        .expect("RSS at 10,000 connections");
    eprintln!(
        "policy churn: {allowed} allowed + {denied} denied connections in {churn_time:?} \
         ({THREADS} threads), {replaced} policy replacements \
         (mean {mean_replace:?}, slowest {max_replace:?}); \
         at most {max_socks} sockets in the SOCKHASH and {max_index} in the index; \
         RSS {} KiB at 10,000, at most {} KiB after, {} KiB at the end",
        rss_10k >> 10,
        max_rss_after_10k >> 10,
        rss_end >> 10
    );

    // Every allowed connection worked, every denied one got EPERM.
    assert_eq!(allowed, ALLOWED);
    assert_eq!(denied, ALLOWED / DENY_EVERY);
    // Nothing ever reached the denied servers.
    for (i, l) in secrets.iter().enumerate() {
        l.set_nonblocking(true).unwrap();
        match l.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("secret server {i} accepted a connection: {other:?}"),
        }
    }
    // The policy really was replaced every 100 ms throughout (or as often
    // as a replace allows, on a slow machine: an emulated guest's RCU grace
    // periods make one take longer than a tick).
    let period = TICK + mean_replace;
    let ticks = churn_time.as_millis() as usize / period.as_millis().max(1) as usize;
    assert!(
        replaced >= ticks / 2 && replaced >= 25,
        "{replaced} replacements in {churn_time:?}"
    );

    // Back to the baseline state: nothing stale, memory flat.
    env.dp.replace_policy(&states[0]).unwrap();
    env.wait_empty(Duration::from_secs(20));
    let d = env.counters().since(&before);
    assert_every_socket_left(&d, 2 * ALLOWED);
    assert_eq!(d.policy_resets, 0, "no allowed flow was reset: {d:?}");
    // Every message of every allowed connection was short-circuited.
    assert_eq!(d.msgs_redirected, 2 * ALLOWED, "{d:?}");
    assert_eq!(d.bytes_redirected, bytes, "{d:?}");
    assert_eq!(d.msgs_fallback, 0, "{d:?}");
    let v = env.dp.verdicts().unwrap().since(&verdicts0);
    assert_eq!(v.get(Point::Connect, Verdict::Allow), ALLOWED, "{v:?}");
    assert_eq!(v.get(Point::Connect, Verdict::Deny), denied, "{v:?}");
    eprintln!(
        "policy churn: verdicts: connect allow {} deny {}, short-circuit allow {}, \
         ingress allow {}, egress allow {}",
        v.get(Point::Connect, Verdict::Allow),
        v.get(Point::Connect, Verdict::Deny),
        v.get(Point::ShortCircuit, Verdict::Allow),
        v.get(Point::Ingress, Verdict::Allow),
        v.get(Point::Egress, Verdict::Allow)
    );
    let dropped: Vec<_> = v
        .iter()
        .filter(|&(p, verdict, n)| !verdict.passes() && n > 0 && p != Point::Connect)
        .collect();
    assert!(
        dropped.is_empty(),
        "an allowed flow was dropped: {dropped:?}"
    );
    assert!(
        max_socks <= OCCUPANCY_MAX && max_index <= OCCUPANCY_MAX,
        "{max_socks} {max_index}"
    );
    let (sockhash_mem, maps_mem) = bpf_map_memlock();
    assert_eq!(
        (sockhash_mem, maps_mem),
        (sockhash_mem0, maps_mem0),
        "BPF map memory (SOCKHASH, all) is back where it started"
    );
    assert_eq!(open_fds(), fds0, "no descriptor leaked");
    assert!(
        max_rss_after_10k.max(rss_end) <= rss_10k + RSS_SLACK,
        "RSS grew from {} KiB at 10,000 connections to {} KiB",
        rss_10k >> 10,
        max_rss_after_10k.max(rss_end) >> 10
    );
    let total = start.elapsed();
    eprintln!("policy churn: done in {total:?}, BPF maps {maps_mem} bytes");
    assert!(total < Duration::from_secs(120), "took {total:?}");
}

/// Exactly `sockets` were enrolled, each left the short-circuit (closed or
/// evicted), none is still tracked, and no enrollment failed.
fn assert_every_socket_left(d: &meshpath::Counters, sockets: u64) {
    assert_eq!(d.sockets_enrolled, sockets, "{d:?}");
    assert_eq!(
        d.sockets_removed + d.sockets_evicted,
        sockets,
        "every socket accounted for: {d:?}"
    );
    assert_eq!(d.sockets_tracked(), 0, "{d:?}");
    assert_eq!(d.enroll_errors, 0, "{d:?}");
}
