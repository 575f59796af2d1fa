//! The short-circuit, measured: plain loopback TCP against meshpath's
//! socket-to-socket delivery, on this machine, in about twenty seconds.
//!
//! ```text
//! sudo -E cargo run --release --example shortcircuit
//! ```
//!
//! Loads the datapath, creates a private cgroup (removed on exit, error,
//! panic or Ctrl-C) and attaches to it. Plain-TCP sockets are created
//! outside that cgroup, short-circuited ones inside it; everything else is
//! identical: blocking I/O, TCP_NODELAY, the same threads pinned to the
//! same CPUs. Measures request/response round trips (64 B, 4 KiB, 64 KiB
//! echoes, each verified byte for byte) and streaming throughput (checksummed),
//! on one core and on two, then shows the datapath counters and the
//! kernel's own TCP_INFO as proof of where the bytes went.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use meshpath::cgroup::{EnteredCgroup, ScopedCgroup};
use meshpath::{Counters, Datapath, DatapathOptions};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;

/// Message sizes of the round-trip test.
const SIZES: [(usize, &str); 3] = [(64, "64 B"), (4 << 10, "4 KiB"), (64 << 10, "64 KiB")];

/// How much work each figure is made of (smaller in debug builds, which
/// would otherwise take minutes and measure the checksum, not the path).
struct Plan {
    rounds: usize,
    echoes: usize,
    warmup: usize,
    stream_bytes: usize,
    stream_rounds: usize,
}

const RELEASE: Plan = Plan {
    rounds: 5,
    echoes: 2_000,
    warmup: 200,
    stream_bytes: 256 << 20,
    stream_rounds: 3,
};

const DEBUG: Plan = Plan {
    rounds: 5,
    echoes: 500,
    warmup: 50,
    stream_bytes: 32 << 20,
    stream_rounds: 3,
};

/// `MESHPATH_DEMO_QUICK=1`: a short run that still proves the redirect,
/// for machines tens of times slower than usual (scripts/kernels.sh runs
/// the demo in emulated guests with it).
const QUICK: Plan = Plan {
    rounds: 3,
    echoes: 200,
    warmup: 20,
    stream_bytes: 8 << 20,
    stream_rounds: 1,
};

const STREAM_WRITE: usize = 64 << 10;
/// The streamed data repeats with this period: prime, so a lost, doubled
/// or swapped write cannot line up with the pattern and go unnoticed.
const PATTERN_PERIOD: usize = 65_537;

/// The demo's cgroup, where the Ctrl-C handler can remove it too.
static CGROUP: Mutex<Option<ScopedCgroup>> = Mutex::new(None);

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("shortcircuit: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Removes the demo cgroup when dropped (normal return, error, panic).
struct RemoveCgroup;

impl Drop for RemoveCgroup {
    fn drop(&mut self) {
        let cg = CGROUP.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(cg);
    }
}

fn enter_cgroup() -> anyhow::Result<EnteredCgroup> {
    let guard = CGROUP.lock().unwrap_or_else(|p| p.into_inner());
    let cg = guard.as_ref().context("the demo cgroup is gone")?;
    cg.enter().context("entering the demo cgroup")
}

/// Ctrl-C (or SIGTERM, SIGHUP) removes the cgroup, then exits 130.
fn handle_signals() -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    // Blocked before any other thread exists, so all inherit the mask.
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                eprintln!("\nshortcircuit: {sig} received: removing the demo cgroup and exiting");
                drop(RemoveCgroup);
                std::process::exit(130);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn run() -> anyhow::Result<bool> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!(
            "must run as root (effective uid is {euid}): loading eBPF programs needs \
             CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; try `sudo -E cargo run --release \
             --example shortcircuit`"
        );
    }
    handle_signals()?;
    let plan = if std::env::var_os("MESHPATH_DEMO_QUICK").is_some_and(|v| v == "1") {
        &QUICK
    } else if cfg!(debug_assertions) {
        &DEBUG
    } else {
        &RELEASE
    };
    let placements = placements()?;

    let dp = Datapath::load(&DatapathOptions::default()).context("loading the datapath")?;
    for problem in dp.quirks().problems() {
        eprintln!("shortcircuit: warning: {problem}");
    }
    let _remove = RemoveCgroup;
    let cg = ScopedCgroup::new("meshpath-demo").context("creating the demo cgroup")?;
    let cg_path = cg.path().to_path_buf();
    *CGROUP.lock().unwrap_or_else(|p| p.into_inner()) = Some(cg);
    let attachment = dp
        .attach_cgroup(&cg_path)
        .context("attaching to the demo cgroup")?;

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("meshpath short-circuit demo");
    println!(
        "  Linux {}, {} CPUs, {} build",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if cfg!(debug_assertions) {
            "debug (reduced sizes; use --release for real figures)"
        } else {
            "release"
        }
    );
    println!(
        "  attached {} to {}",
        attachment.programs().join(" + "),
        cg_path.display()
    );
    println!(
        "  plain TCP = loopback sockets outside that cgroup; short-circuit = sockets created inside it"
    );
    println!("  blocking I/O, TCP_NODELAY, client and server threads pinned as shown");
    println!();

    let before = dp.counters().context("reading counters")?;
    let mut bench = Bench::default();

    println!(
        "Request/response round trip in µs, median of {} rounds x {} echoes (lower is better)",
        plan.rounds, plan.echoes
    );
    println!(
        "  {:<24} {:>7} {:>11} {:>15} {:>8}",
        "placement", "size", "plain TCP", "short-circuit", "sc/tcp"
    );
    for p in &placements {
        for (i, &(size, label)) in SIZES.iter().enumerate() {
            let (tcp, sc) = bench.round_trips(plan, p, size)?;
            println!(
                "  {:<24} {:>7} {:>11.2} {:>15.2} {:>7.2}x",
                if i == 0 { p.label.as_str() } else { "" },
                label,
                tcp,
                sc,
                sc / tcp
            );
        }
    }
    println!();

    println!(
        "Streaming {} MiB in {} KiB writes, GB/s, median of {} (higher is better)",
        plan.stream_bytes >> 20,
        STREAM_WRITE >> 10,
        plan.stream_rounds
    );
    println!(
        "  {:<24} {:>7} {:>11} {:>15} {:>8}",
        "placement", "", "plain TCP", "short-circuit", "sc/tcp"
    );
    let stream = Stream::new(plan.stream_bytes);
    for p in &placements {
        let (tcp, sc) = bench.streaming(plan, p, &stream)?;
        println!(
            "  {:<24} {:>7} {:>11.2} {:>15.2} {:>7.2}x",
            p.label,
            "",
            tcp,
            sc,
            sc / tcp
        );
    }
    println!();

    let delta = dp.counters().context("reading counters")?.since(&before);
    drop(attachment);
    Ok(report(&bench, &delta))
}

/// Prints the proof and says plainly whether the redirect happened.
fn report(bench: &Bench, d: &Counters) -> bool {
    let fallback_reasons: Vec<String> = d
        .iter()
        .filter(|(name, v)| name.starts_with("fallback_") && *v > 0)
        .map(|(name, v)| format!("{name}={v}"))
        .collect();
    println!("Datapath counters over the benchmark (Counters::since; only the short-circuit sockets are in the cgroup)");
    println!(
        "  sockets_enrolled  {:>14}   ({} short-circuit connections x 2 sockets = {})",
        d.sockets_enrolled,
        bench.sc_conns,
        bench.sc_conns * 2
    );
    println!("  msgs_redirected   {:>14}", d.msgs_redirected);
    println!(
        "  bytes_redirected  {:>14}   ({}; the short-circuit runs sent {})",
        d.bytes_redirected,
        human_bytes(d.bytes_redirected),
        human_bytes(bench.sc_bytes)
    );
    println!(
        "  fallbacks         {:>14}   (messages that took TCP; {} bytes{}{})",
        d.msgs_fallback,
        d.bytes_fallback,
        if fallback_reasons.is_empty() {
            ""
        } else {
            ": "
        },
        fallback_reasons.join(" ")
    );
    if d.enroll_errors > 0 {
        println!("  enroll_errors     {:>14}", d.enroll_errors);
    }
    println!(
        "Kernel TCP_INFO, bytes received through TCP: plain TCP sockets {}, short-circuit sockets {}",
        human_bytes(bench.tcp_tcpinfo),
        human_bytes(bench.sc_tcpinfo)
    );
    println!();

    let happened = d.msgs_redirected > 0 && d.bytes_redirected > 0;
    if !happened {
        println!(
            "RESULT: the redirect did NOT happen: every short-circuit byte went through TCP. \
             Check the warnings above and `bpftool cgroup tree`."
        );
    } else if d.bytes_redirected >= bench.sc_bytes && d.bytes_fallback == 0 {
        println!(
            "RESULT: the redirect happened: all {} of the short-circuit traffic went socket to \
             socket, none through TCP.",
            human_bytes(d.bytes_redirected)
        );
    } else {
        println!(
            "RESULT: the redirect happened for {} of {} ({:.1}%); {} took TCP (see fallbacks).",
            human_bytes(d.bytes_redirected),
            human_bytes(bench.sc_bytes),
            100.0 * d.bytes_redirected as f64 / bench.sc_bytes.max(1) as f64,
            human_bytes(d.bytes_fallback)
        );
    }
    happened
}

// ---------------------------------------------------------------------------
// Where threads run.

struct Placement {
    label: String,
    client_cpu: usize,
    server_cpu: usize,
}

/// One core (client and server on the first allowed CPU) and, when there
/// is a second CPU, two cores (client on the first, server on the second).
fn placements() -> anyhow::Result<Vec<Placement>> {
    let allowed = sched_getaffinity(Pid::from_raw(0)).context("reading the CPU affinity")?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .take(2)
        .collect();
    let first = *cpus
        .first()
        .context("no CPU in this process's affinity mask")?;
    let mut out = vec![Placement {
        label: format!("one core (CPU {first})"),
        client_cpu: first,
        server_cpu: first,
    }];
    match cpus.get(1) {
        Some(&second) => out.push(Placement {
            label: format!("two cores (CPU {first}+{second})"),
            client_cpu: first,
            server_cpu: second,
        }),
        None => println!("(only one CPU available: no two-core figures)"),
    }
    Ok(out)
}

fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    sched_setaffinity(Pid::from_raw(0), &set)
        .with_context(|| format!("pinning a thread to CPU {cpu}"))
}

// ---------------------------------------------------------------------------
// Connections.

/// A connected loopback pair. `inside`: the listener, the client and the
/// accepted socket are created in the demo cgroup (short-circuited);
/// otherwise outside it (plain TCP).
fn connect(inside: bool) -> anyhow::Result<(TcpStream, TcpStream)> {
    let _in = if inside { Some(enter_cgroup()?) } else { None };
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?).context("connecting on loopback")?;
    let (server, _) = listener.accept().context("accepting")?;
    client.set_nodelay(true).context("TCP_NODELAY")?;
    server.set_nodelay(true).context("TCP_NODELAY")?;
    Ok((client, server))
}

/// Bytes a socket received through TCP (`tcpi_bytes_received`):
/// short-circuited bytes never show up here.
fn tcp_bytes_received(s: &TcpStream) -> u64 {
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for getsockopt's out parameters.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r == 0 {
        info.tcpi_bytes_received
    } else {
        0
    }
}

// ---------------------------------------------------------------------------
// Measurements.

#[derive(Default)]
struct Bench {
    /// Short-circuit connections opened.
    sc_conns: u64,
    /// Bytes sent (both directions) on short-circuit connections.
    sc_bytes: u64,
    /// TCP_INFO bytes received, summed over each kind's sockets.
    tcp_tcpinfo: u64,
    sc_tcpinfo: u64,
}

impl Bench {
    /// Adds up what TCP carried for a connection whose client has sent
    /// its FIN (TCP_INFO counts the FIN as one byte: left out here).
    fn account(&mut self, sc: bool, socks: [&TcpStream; 2]) {
        let got: u64 = socks.iter().map(|s| tcp_bytes_received(s)).sum();
        let got = got.saturating_sub(1);
        if sc {
            self.sc_tcpinfo += got;
        } else {
            self.tcp_tcpinfo += got;
        }
    }

    /// Median round-trip time in µs of (plain TCP, short-circuit), rounds
    /// alternating between the two so drift affects both alike.
    fn round_trips(
        &mut self,
        plan: &Plan,
        p: &Placement,
        size: usize,
    ) -> anyhow::Result<(f64, f64)> {
        let (mut tcp_c, tcp_s) = connect(false)?;
        let (mut sc_c, sc_s) = connect(true)?;
        self.sc_conns += 1;
        let tcp_acct = tcp_s.try_clone()?;
        let sc_acct = sc_s.try_clone()?;

        let (tcp_us, sc_us) = std::thread::scope(|s| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
            let servers = [tcp_s, sc_s].map(|sock| {
                let cpu = p.server_cpu;
                s.spawn(move || -> anyhow::Result<()> {
                    pin_to(cpu)?;
                    echo_server(sock, size)
                })
            });
            let client = s.spawn(|| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
                pin_to(p.client_cpu)?;
                let mut buf = Echo::new(size);
                buf.run(&mut tcp_c, plan.warmup)?;
                buf.run(&mut sc_c, plan.warmup)?;
                let (mut tcp, mut sc) = (Vec::new(), Vec::new());
                for _ in 0..plan.rounds {
                    tcp.push(buf.run(&mut tcp_c, plan.echoes)?);
                    sc.push(buf.run(&mut sc_c, plan.echoes)?);
                }
                tcp_c.shutdown(Shutdown::Write)?;
                sc_c.shutdown(Shutdown::Write)?;
                Ok((tcp, sc))
            });
            let result = join(client);
            for server in servers {
                join(server)?;
            }
            result
        })?;
        self.sc_bytes += (2 * size * (plan.warmup + plan.rounds * plan.echoes)) as u64;
        self.account(false, [&tcp_c, &tcp_acct]);
        self.account(true, [&sc_c, &sc_acct]);
        let per_echo = |total_us: f64| total_us / plan.echoes as f64;
        Ok((per_echo(median(tcp_us)), per_echo(median(sc_us))))
    }

    /// Median throughput in GB/s of (plain TCP, short-circuit).
    fn streaming(
        &mut self,
        plan: &Plan,
        p: &Placement,
        stream: &Stream,
    ) -> anyhow::Result<(f64, f64)> {
        let (mut tcp, mut sc) = (Vec::new(), Vec::new());
        for _ in 0..plan.stream_rounds {
            for inside in [false, true] {
                let (client, server) = connect(inside)?;
                let secs = self.stream_once(p, stream, client, server, inside)?;
                let gbps = stream.len as f64 / secs / 1e9;
                if inside {
                    sc.push(gbps);
                } else {
                    tcp.push(gbps);
                }
            }
        }
        Ok((median(tcp), median(sc)))
    }

    fn stream_once(
        &mut self,
        p: &Placement,
        stream: &Stream,
        mut client: TcpStream,
        mut server: TcpStream,
        sc: bool,
    ) -> anyhow::Result<f64> {
        if sc {
            self.sc_conns += 1;
            self.sc_bytes += stream.len as u64;
        }
        let (secs, received, sum) = std::thread::scope(|s| -> anyhow::Result<(f64, u64, u64)> {
            let reader = s.spawn(|| -> anyhow::Result<(Instant, u64, u64)> {
                pin_to(p.server_cpu)?;
                let mut buf = vec![0u8; 256 << 10];
                let mut sum = Fletcher::default();
                let mut n = 0u64;
                loop {
                    match server.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => {
                            sum.update(&buf[..k]);
                            n += k as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e).context("streaming: reading"),
                    }
                }
                Ok((Instant::now(), n, sum.finish()))
            });
            let writer = s.spawn(|| -> anyhow::Result<Instant> {
                pin_to(p.client_cpu)?;
                let start = Instant::now();
                for chunk in stream.chunks() {
                    client.write_all(chunk).context("streaming: writing")?;
                }
                client.shutdown(Shutdown::Write)?;
                Ok(start)
            });
            let start = join(writer)?;
            let (end, n, sum) = join(reader)?;
            Ok((end.duration_since(start).as_secs_f64(), n, sum))
        })?;
        ensure!(
            received == stream.len as u64,
            "streaming over {}: received {received} bytes, sent {}",
            if sc { "the short-circuit" } else { "TCP" },
            stream.len
        );
        ensure!(
            sum == stream.checksum,
            "streaming over {}: checksum mismatch ({sum:#018x}, expected {:#018x})",
            if sc { "the short-circuit" } else { "TCP" },
            stream.checksum
        );
        self.account(sc, [&client, &server]);
        Ok(secs.max(1e-9))
    }
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, anyhow::Result<T>>) -> anyhow::Result<T> {
    match h.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Reads `size` bytes and writes them back until the client closes.
fn echo_server(mut sock: TcpStream, size: usize) -> anyhow::Result<()> {
    let mut buf = vec![0u8; size];
    loop {
        let mut got = 0;
        while got < size {
            match sock.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(()),
                Ok(0) => bail!("echo server: the client closed mid-message"),
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("echo server: reading"),
            }
        }
        sock.write_all(&buf).context("echo server: writing")?;
    }
}

/// The client side of the echo test: numbered messages, each checked.
struct Echo {
    out: Vec<u8>,
    back: Vec<u8>,
    seq: u64,
}

impl Echo {
    fn new(size: usize) -> Echo {
        let out = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        Echo {
            out,
            back: vec![0u8; size],
            seq: 0,
        }
    }

    /// `n` echoes; returns the total time in µs.
    fn run(&mut self, sock: &mut TcpStream, n: usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        for _ in 0..n {
            self.seq += 1;
            self.out[..8].copy_from_slice(&self.seq.to_le_bytes());
            sock.write_all(&self.out).context("echo client: writing")?;
            sock.read_exact(&mut self.back)
                .context("echo client: reading")?;
            ensure!(
                self.back == self.out,
                "echo {} of {} bytes came back different",
                self.seq,
                self.out.len()
            );
        }
        Ok(start.elapsed().as_secs_f64() * 1e6)
    }
}

/// The streamed data: a pseudo-random pattern of period
/// [`PATTERN_PERIOD`], written in [`STREAM_WRITE`]-byte slices.
struct Stream {
    pattern: Vec<u8>,
    len: usize,
    checksum: u64,
}

impl Stream {
    fn new(len: usize) -> Stream {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let period: Vec<u8> = (0..PATTERN_PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut pattern = period.clone();
        pattern.extend_from_slice(&period[..STREAM_WRITE]);
        let mut s = Stream {
            pattern,
            len: len / STREAM_WRITE * STREAM_WRITE,
            checksum: 0,
        };
        let mut sum = Fletcher::default();
        for chunk in s.chunks() {
            sum.update(chunk);
        }
        s.checksum = sum.finish();
        s
    }

    fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.len / STREAM_WRITE).map(move |k| {
            let at = (k * STREAM_WRITE) % PATTERN_PERIOD;
            &self.pattern[at..at + STREAM_WRITE]
        })
    }
}

/// Fletcher-style checksum over little-endian u64 words of a byte stream
/// that arrives in arbitrary pieces: position-sensitive and cheap enough
/// not to dominate the throughput figures.
#[derive(Default)]
struct Fletcher {
    a: u64,
    b: u64,
    pending: [u8; 8],
    npending: usize,
}

impl Fletcher {
    fn word(&mut self, w: u64) {
        self.a = self.a.wrapping_add(w);
        self.b = self.b.wrapping_add(self.a);
    }

    fn update(&mut self, mut data: &[u8]) {
        if self.npending > 0 {
            let take = (8 - self.npending).min(data.len());
            self.pending[self.npending..self.npending + take].copy_from_slice(&data[..take]);
            self.npending += take;
            data = &data[take..];
            if self.npending < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        let words = data.chunks_exact(8);
        let rest = words.remainder();
        for w in words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        self.pending[..rest.len()].copy_from_slice(rest);
        self.npending = rest.len();
    }

    fn finish(mut self) -> u64 {
        if self.npending > 0 {
            self.pending[self.npending..].fill(0);
            self.word(u64::from_le_bytes(self.pending));
            self.word(self.npending as u64);
        }
        self.a ^ self.b.rotate_left(32)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
