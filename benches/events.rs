//! Flow events: what reporting them costs, and how many a consumer gets.
//!
//! ```text
//! sudo -E cargo bench --bench events [-- FILTER]
//! ```
//!
//! Criterion groups:
//! - `events/rtt/<placement>/<off|on>`: one 64 B request/response round
//!   trip over a short-circuited loopback connection (blocking reads,
//!   client and server on one core or two), with flow events off, or on
//!   with a reader draining them on a thread of its own (messages on the
//!   redirect path report nothing: this measures that nothing is paid);
//! - `events/setup/<off|on-reader-draining|on-read-after>`: one
//!   connection (connect + accept + first byte; the close is not timed)
//!   inside the attached cgroup: events off; on, a reader thread on the
//!   other CPU reading them as they come; on, read after the batch. Each
//!   connection reports three: its connect verdict, entering and leaving
//!   the short-circuit;
//! - `events/xdp/<case>`: one run of the XDP program on a 60-byte UDP
//!   frame (BPF_PROG_TEST_RUN with `repeat`, the kernel's time per run):
//!   an allowed packet; a denied one with events off; on, aggregated (the
//!   default 1 s interval: one event a second, the other runs fold); not
//!   aggregated (every run an event, the ring has room) with a reader
//!   draining concurrently, or read between runs of 20,000; not
//!   aggregated with the ring full (every run a lost event);
//! - `events/deliver/<blocking|tokio|batched-1ms>`: one event delivered
//!   to a [`FlowReader`] (`poll`, or drained every millisecond) or to a
//!   [`FlowStream`] on a tokio current-thread runtime, while the XDP
//!   program (aggregation off) generates events as fast as it can on the
//!   other CPU.
//!
//! Then a summary, measured again with the variants interleaved (rounds
//! that rotate their order, medians), as one table: the figures of
//! README.md ("Flow events: cost and throughput"). It runs unless a
//! filter is given that does not contain "summary".
//!
//! Nothing is attached to a device (XDP runs through BPF_PROG_TEST_RUN);
//! the sockets live in a private cgroup, removed on exit, on panic and on
//! Ctrl-C (the harness's signal watcher). Needs root and two CPUs.

mod harness;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use criterion::{Criterion, Throughput};
use harness::rtt::RttConn;
use harness::{interrupt, median, rotated, sys, Mode, PathKind, Sock};
use meshpath::cgroup::ScopedCgroup;
use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
use meshpath::{CgroupAttachment, Datapath, DatapathOptions, FlowReader, FlowStream};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const CLIENT: &str = "spiffe://mesh.local/ns/bench/sa/client";
const SERVER: &str = "spiffe://mesh.local/ns/bench/sa/server";
const LOCAL: &str = "spiffe://mesh.local/ns/bench/sa/local";

/// Runs per BPF_PROG_TEST_RUN call: 20,000 events fit in the 4 MiB ring
/// (30,840), so "not aggregated, ring has room" loses none.
const CHUNK: u32 = 20_000;
/// Round trips per measurement in the summary.
const RTT_ROUNDS: u64 = 2_000;
/// Connections per measurement in the summary.
const SETUP_CONNS: u64 = 500;
/// How long a consumer is measured in the summary.
const DELIVER_WINDOW: Duration = Duration::from_secs(1);
/// A consumer that gets nothing for this long while events are generated
/// has hung.
const STALL: Duration = Duration::from_secs(5);
/// Interleaved rounds in the summary (medians over them).
const ROUNDS: usize = 9;

fn main() {
    harness::exit_on_error(run());
}

fn run() -> Result<()> {
    harness::require_root("cargo bench --bench events")?;
    // Before any thread exists: the watcher cleans up on Ctrl-C.
    interrupt::install()?;
    let b = Bench::new()?;
    sys::pin_to(b.cpus.0).context("pinning the benchmark thread")?;
    let mut c = harness::short_criterion();
    let mut rtt = b.rtt_conns()?;
    criterion_rtt(&mut c, &b, &mut rtt)?;
    criterion_setup(&mut c, &b)?;
    criterion_xdp(&mut c, &b)?;
    criterion_deliver(&mut c, &b)?;
    c.final_summary();
    if harness::summary_requested() {
        let s = summary(&b, &mut rtt)?;
        s.print();
    }
    Ok(())
}

/// Everything the measurements share. Fields drop in order: listeners,
/// detach, cgroup, then the datapaths.
struct Bench {
    rtt_listener: TcpListener,
    setup_listener: TcpListener,
    _attachment: CgroupAttachment,
    cgroup: ScopedCgroup,
    /// Default options (1 s aggregation, 4 MiB ring), attached to
    /// `cgroup`.
    dp: Datapath,
    /// Aggregation off (every denied packet an event), 4 MiB ring.
    dp_every: Datapath,
    /// Aggregation off, a one-page ring, events on, never read: full.
    dp_full: Datapath,
    /// (client side and the benchmark thread, server side and readers).
    cpus: (usize, usize),
    /// Described before any thread is pinned (the CPU count follows the
    /// affinity).
    machine: sys::Machine,
    allowed: Vec<u8>,
    denied: Vec<u8>,
}

/// Default deny. The crafted frames: 198.18.0.1 (client) to 198.18.0.2
/// (server), UDP 53 allowed, UDP 9 denied by the default. Loopback (one
/// identity) may use TCP, so that each bench connection is judged at
/// connect (one event) and short-circuited.
fn policy() -> Result<PolicyState> {
    Ok(PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new("198.18.0.1", CLIENT)?,
            Endpoint::new("198.18.0.2", SERVER)?,
            Endpoint::new("127.0.0.0/8", LOCAL)?,
        ],
        policies: vec![
            Rule::new(CLIENT, SERVER, "udp", &[53], "allow")?,
            Rule::new(LOCAL, LOCAL, "tcp", &[], "allow")?,
        ],
    })
}

/// A 60-byte Ethernet frame: IPv4, UDP 198.18.0.1:40000 -> 198.18.0.2:`dport`.
fn udp_frame(dport: u16) -> Vec<u8> {
    harness::frame::udp4([198, 18, 0, 1], 40000, [198, 18, 0, 2], dport)
}

impl Bench {
    fn new() -> Result<Bench> {
        let cpus = sys::two_cpus()?;
        let load = |o: DatapathOptions| Datapath::load(&o).context("loading a datapath");
        let dp = load(DatapathOptions::default())?;
        let dp_every = load(DatapathOptions::default().event_interval(Duration::ZERO))?;
        let dp_full = load(
            DatapathOptions::default()
                .event_interval(Duration::ZERO)
                .event_ring_bytes(4096),
        )?;
        for d in [&dp, &dp_every, &dp_full] {
            d.replace_policy(&policy()?).context("setting the policy")?;
        }
        dp_full.set_flow_events(true)?;
        let home = meshpath::cgroup::current_cgroup().context("finding this process's cgroup")?;
        let cgroup =
            ScopedCgroup::new("meshpath-bench-events").context("creating the benchmark cgroup")?;
        interrupt::register_cgroup(home, cgroup.path().to_path_buf());
        let attachment = dp
            .attach_cgroup(cgroup.path())
            .with_context(|| format!("attaching to {}", cgroup.path().display()))?;
        let (rtt_listener, setup_listener) = {
            let _in = cgroup.enter().context("entering the benchmark cgroup")?;
            (
                TcpListener::bind("127.0.0.21:0").context("bind 127.0.0.21")?,
                TcpListener::bind("127.0.0.22:0").context("bind 127.0.0.22")?,
            )
        };
        let b = Bench {
            _attachment: attachment,
            cgroup,
            dp,
            dp_every,
            dp_full,
            rtt_listener,
            setup_listener,
            cpus,
            machine: sys::Machine::describe(),
            allowed: udp_frame(53),
            denied: udp_frame(9),
        };
        // The crafted frames are judged as intended.
        b.xdp_run(&b.dp, &b.allowed, 1, XDP_PASS)?;
        b.xdp_run(&b.dp, &b.denied, 1, XDP_DROP)?;
        Ok(b)
    }

    /// Two short-circuited connections with echo servers: one core
    /// (client and server on `cpus.0`), two cores.
    fn rtt_conns(&self) -> Result<Vec<RttConn>> {
        [Mode::BlockOneCore, Mode::BlockTwoCores]
            .into_iter()
            .map(|mode| {
                let before = self.dp.counters()?;
                let (c, s) = {
                    let _in = self.cgroup.enter().context("entering the cgroup")?;
                    let c =
                        TcpStream::connect(self.rtt_listener.local_addr()?).context("connect")?;
                    let (s, _) = self.rtt_listener.accept().context("accept")?;
                    (c, s)
                };
                let enrolled = self.dp.counters()?.sockets_enrolled - before.sockets_enrolled;
                if enrolled < 2 {
                    bail!("the connection was not short-circuited ({enrolled} sockets enrolled)");
                }
                for x in [&c, &s] {
                    x.set_nodelay(true)?;
                }
                let mut conn =
                    RttConn::with_pair(PathKind::Sc, mode, self.cpus, Sock::Tcp(c), Sock::Tcp(s))?;
                conn.run(64, 2_000).context("warming up")?;
                Ok(conn)
            })
            .collect()
    }

    /// Sets up `n` connections in the cgroup, one at a time (both ends on
    /// this thread); the time of connect + accept + first byte, summed.
    fn setup(&self, n: u64) -> Result<Duration> {
        let _in = self.cgroup.enter().context("entering the cgroup")?;
        let l = &self.setup_listener;
        let to = l.local_addr()?;
        let mut total = Duration::ZERO;
        for i in 0..n {
            let t = Instant::now();
            let mut c = TcpStream::connect(to).with_context(|| format!("connection {i}"))?;
            c.set_nodelay(true)?;
            let (mut s, _) = l.accept().with_context(|| format!("accept {i}"))?;
            c.write_all(&[1])?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            total += t.elapsed();
            // The server end first: TIME_WAIT stays off the client's ports.
            drop(s);
            drop(c);
        }
        Ok(total)
    }

    /// `repeat` runs of the XDP program of `dp` on `frame`; the kernel's
    /// time per run. Fails unless the action is `want`.
    fn xdp_run(&self, dp: &Datapath, frame: &[u8], repeat: u32, want: u32) -> Result<Duration> {
        let (action, per_run) = dp.test_run_xdp_repeat(frame, repeat)?;
        if action != want {
            bail!("XDP returned {action}, expected {want}");
        }
        Ok(per_run)
    }
}

/// A reader of `dp`'s events, with whatever a previous reader left in
/// the ring read and thrown away (the ring keeps unread events across
/// readers). Opening it turns events on; dropping it turns them off.
fn fresh_reader(dp: &Datapath) -> Result<FlowReader> {
    let mut r = dp.flows().context("opening the flow reader")?;
    while r.try_next()?.is_some() {}
    Ok(r)
}

/// Reads every event already in the ring; how many.
fn read_all(r: &mut FlowReader) -> Result<u64> {
    let mut n = 0u64;
    while r.try_next()?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// A flow reader on its own thread (pinned to `cpu`), reading and
/// counting events until stopped, then until the ring is empty: events
/// on, read as they come (the ring mostly empty, so the kernel wakes the
/// reader for nearly every event).
struct Drain {
    read: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64>>>,
}

impl Drain {
    fn start(dp: &Datapath, cpu: usize) -> Result<Drain> {
        let mut reader = fresh_reader(dp)?;
        let read = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (read, stop) = (read.clone(), stop.clone());
            std::thread::Builder::new()
                .name("flow-drain".into())
                .spawn(move || -> Result<u64> {
                    sys::pin_to(cpu)?;
                    let mut n = 0u64;
                    loop {
                        match reader.poll(Duration::from_millis(20))? {
                            Some(_) => {
                                n += 1;
                                read.store(n, Ordering::Relaxed);
                            }
                            None if stop.load(Ordering::SeqCst) => return Ok(n),
                            None => {}
                        }
                    }
                })
                .context("spawning the reader")?
        };
        Ok(Drain {
            read,
            stop,
            thread: Some(thread),
        })
    }

    fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Stops; how many events were read.
    fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => bail!("the flow reader thread panicked"),
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How events are read while they are produced.
enum Reading {
    /// A reader thread on the other CPU, reading as they come.
    Concurrent(Drain),
    /// This thread reads them between runs: during a run the ring fills
    /// and nobody reads (the kernel wakes the reader once per run).
    Between { reader: FlowReader, read: u64 },
}

/// `dp_every`: every denied run is an event; before each `CHUNK` of runs
/// every earlier event was read (or counted lost), so the ring has room.
struct EveryEvent<'a> {
    b: &'a Bench,
    reading: Reading,
    runs: u64,
    lost0: u64,
}

impl<'a> EveryEvent<'a> {
    fn start(b: &'a Bench, concurrent: bool) -> Result<EveryEvent<'a>> {
        let lost0 = b.dp_every.counters()?.events_lost;
        let reading = if concurrent {
            Reading::Concurrent(Drain::start(&b.dp_every, b.cpus.1)?)
        } else {
            Reading::Between {
                reader: fresh_reader(&b.dp_every)?,
                read: 0,
            }
        };
        Ok(EveryEvent {
            b,
            reading,
            runs: 0,
            lost0,
        })
    }

    fn lost(&self) -> Result<u64> {
        Ok(self.b.dp_every.counters()?.events_lost - self.lost0)
    }

    fn read(&mut self) -> Result<u64> {
        match &mut self.reading {
            Reading::Concurrent(d) => Ok(d.read()),
            Reading::Between { reader, read } => {
                *read += read_all(reader)?;
                Ok(*read)
            }
        }
    }

    /// Waits until every event so far was read or counted lost.
    fn wait_drained(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (read, lost) = (self.read()?, self.lost()?);
            if read + lost >= self.runs {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the reader fell behind: {} runs, {read} read, {lost} lost",
                    self.runs
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// `n` runs in chunks the ring holds; the kernel's time for them.
    fn run(&mut self, n: u64) -> Result<Duration> {
        let mut total = Duration::ZERO;
        let mut left = n;
        while left > 0 {
            let k = left.min(u64::from(CHUNK)) as u32;
            self.wait_drained()?;
            let per = self
                .b
                .xdp_run(&self.b.dp_every, &self.b.denied, k, XDP_DROP)?;
            self.runs += u64::from(k);
            total += per * k;
            left -= u64::from(k);
        }
        Ok(total)
    }

    /// Stops; (read, lost) over the whole life, which must add up to the
    /// runs.
    fn finish(mut self) -> Result<(u64, u64)> {
        self.wait_drained()?;
        let lost = self.lost()?;
        let read = match self.reading {
            Reading::Concurrent(d) => d.finish()?,
            Reading::Between { read, .. } => read,
        };
        if read + lost != self.runs {
            bail!("{} runs but {read} events read and {lost} lost", self.runs);
        }
        Ok((read, lost))
    }
}

/// The XDP cases, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XdpCase {
    Allowed,
    DeniedOff,
    DeniedAggregated,
    DeniedEveryEvent,
    DeniedEveryEventReadBetween,
    DeniedRingFull,
}

impl XdpCase {
    const ALL: [XdpCase; 6] = [
        XdpCase::Allowed,
        XdpCase::DeniedOff,
        XdpCase::DeniedAggregated,
        XdpCase::DeniedEveryEvent,
        XdpCase::DeniedEveryEventReadBetween,
        XdpCase::DeniedRingFull,
    ];

    fn id(self) -> &'static str {
        match self {
            XdpCase::Allowed => "allowed",
            XdpCase::DeniedOff => "denied-events-off",
            XdpCase::DeniedAggregated => "denied-events-aggregated",
            XdpCase::DeniedEveryEvent => "denied-every-event",
            XdpCase::DeniedEveryEventReadBetween => "denied-every-event-read-between-runs",
            XdpCase::DeniedRingFull => "denied-every-event-ring-full",
        }
    }

    fn label(self) -> &'static str {
        match self {
            XdpCase::Allowed => "allowed packet (no event)",
            XdpCase::DeniedOff => "denied, events off",
            XdpCase::DeniedAggregated => "denied, events on, aggregated (1 s)",
            XdpCase::DeniedEveryEvent => {
                "denied, every packet an event, reader draining (woken for most events)"
            }
            XdpCase::DeniedEveryEventReadBetween => {
                "denied, every packet an event, read after each 20,000 (one wakeup each)"
            }
            XdpCase::DeniedRingFull => "denied, every packet an event, ring full (lost)",
        }
    }
}

/// Measures `n` runs of `case`; the kernel's time for them (its time per
/// run, whole nanoseconds, times the runs). Opens and closes what the
/// case needs (reader, events on).
fn xdp_case(b: &Bench, case: XdpCase, n: u64) -> Result<Duration> {
    let chunks = |dp: &Datapath, frame: &[u8], want: u32| -> Result<Duration> {
        let mut total = Duration::ZERO;
        let mut left = n;
        while left > 0 {
            let k = left.min(u64::from(CHUNK)) as u32;
            total += b.xdp_run(dp, frame, k, want)? * k;
            left -= u64::from(k);
        }
        Ok(total)
    };
    match case {
        XdpCase::Allowed => chunks(&b.dp, &b.allowed, XDP_PASS),
        XdpCase::DeniedOff => chunks(&b.dp, &b.denied, XDP_DROP),
        XdpCase::DeniedAggregated => {
            let d = Drain::start(&b.dp, b.cpus.1)?;
            let t = chunks(&b.dp, &b.denied, XDP_DROP);
            d.finish()?;
            t
        }
        XdpCase::DeniedEveryEvent | XdpCase::DeniedEveryEventReadBetween => {
            let mut e = EveryEvent::start(b, case == XdpCase::DeniedEveryEvent)?;
            let t = e.run(n)?;
            let (_, lost) = e.finish()?;
            if lost != 0 {
                bail!("every event: {lost} lost although the ring had room");
            }
            Ok(t)
        }
        XdpCase::DeniedRingFull => {
            // Events on, nobody reads: after its first 30 events the
            // one-page ring is full; fill it first.
            b.xdp_run(&b.dp_full, &b.denied, 64, XDP_DROP)?;
            let lost0 = b.dp_full.counters()?.events_lost;
            let t = chunks(&b.dp_full, &b.denied, XDP_DROP)?;
            let lost = b.dp_full.counters()?.events_lost - lost0;
            if lost != n {
                bail!("ring full: {n} runs, {lost} events lost");
            }
            Ok(t)
        }
    }
}

fn criterion_rtt(c: &mut Criterion, b: &Bench, conns: &mut [RttConn]) -> Result<()> {
    for conn in conns.iter_mut() {
        let mut g = c.benchmark_group(format!("events/rtt/{}", conn.mode.name()));
        g.bench_function("off", |bn| {
            bn.iter_custom(|n| conn.run(64, n).expect("round trips"))
        });
        let d = Drain::start(&b.dp, b.cpus.1)?;
        g.bench_function("on", |bn| {
            bn.iter_custom(|n| conn.run(64, n).expect("round trips"))
        });
        d.finish()?;
        g.finish();
    }
    Ok(())
}

/// How flow events are handled while connections are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetupCase {
    /// Events off.
    Off,
    /// On, a reader thread on the other CPU reading them as they come.
    Draining,
    /// On, read after the batch of connections (none read meanwhile).
    ReadAfter,
}

impl SetupCase {
    const ALL: [SetupCase; 3] = [SetupCase::Off, SetupCase::Draining, SetupCase::ReadAfter];

    fn id(self) -> &'static str {
        match self {
            SetupCase::Off => "off",
            SetupCase::Draining => "on-reader-draining",
            SetupCase::ReadAfter => "on-read-after",
        }
    }
}

/// Sets up `n` connections in `case`; the time (connect + accept + first
/// byte, summed) and the events read.
fn setup_case(b: &Bench, case: SetupCase, n: u64) -> Result<(Duration, u64)> {
    match case {
        SetupCase::Off => Ok((b.setup(n)?, 0)),
        SetupCase::Draining => {
            let d = Drain::start(&b.dp, b.cpus.1)?;
            let t = b.setup(n)?;
            Ok((t, d.finish()?))
        }
        SetupCase::ReadAfter => {
            let mut r = fresh_reader(&b.dp)?;
            let t = b.setup(n)?;
            let mut read = 0u64;
            while r.poll(Duration::from_millis(50))?.is_some() {
                read += 1;
            }
            Ok((t, read))
        }
    }
}

fn criterion_setup(c: &mut Criterion, b: &Bench) -> Result<()> {
    let mut g = c.benchmark_group("events/setup");
    g.throughput(Throughput::Elements(1));
    for case in SetupCase::ALL {
        g.bench_function(case.id(), |bn| {
            bn.iter_custom(|n| setup_case(b, case, n).expect("connection setup").0)
        });
    }
    g.finish();
    Ok(())
}

fn criterion_xdp(c: &mut Criterion, b: &Bench) -> Result<()> {
    let mut g = c.benchmark_group("events/xdp");
    for case in XdpCase::ALL {
        g.bench_function(case.id(), |bn| {
            bn.iter_custom(|n| xdp_case(b, case, n).expect("XDP test run"))
        });
    }
    g.finish();
    Ok(())
}

/// Runs the XDP program of `dp_every` on the denied frame, `CHUNK` runs
/// per call, on `cpu` until stopped: every run one event, as fast as the
/// program goes. Counts the runs.
struct Generator {
    runs: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Generator {
    fn start(b: &Bench, cpu: usize) -> Result<Generator> {
        let runs = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let dp = b.dp_every.clone();
        let frame = b.denied.clone();
        let thread = {
            let (runs, stop) = (runs.clone(), stop.clone());
            std::thread::Builder::new()
                .name("event-generator".into())
                .spawn(move || -> Result<()> {
                    sys::pin_to(cpu)?;
                    while !stop.load(Ordering::Relaxed) {
                        let (action, _) = dp.test_run_xdp_repeat(&frame, CHUNK)?;
                        if action != XDP_DROP {
                            bail!("XDP returned {action}");
                        }
                        runs.fetch_add(u64::from(CHUNK), Ordering::Relaxed);
                    }
                    Ok(())
                })
                .context("spawning the generator")?
        };
        Ok(Generator {
            runs,
            stop,
            thread: Some(thread),
        })
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Stops; every run made.
    fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r?,
            _ => bail!("the generator thread panicked"),
        }
        Ok(self.runs())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The next event of a tokio stream.
async fn next_flow(s: &mut FlowStream) -> Option<meshpath::Result<meshpath::Flow>> {
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *s), cx))
        .await
}

fn criterion_deliver(c: &mut Criterion, b: &Bench) -> Result<()> {
    // The consumer is this thread (on `cpus.0`); the generator runs on
    // the other CPU.
    let mut g = c.benchmark_group("events/deliver");
    g.throughput(Throughput::Elements(1));
    {
        let mut reader = fresh_reader(&b.dp_every)?;
        let gen = Generator::start(b, b.cpus.1)?;
        g.bench_function("blocking", |bn| {
            bn.iter_custom(|n| {
                let t = Instant::now();
                for _ in 0..n {
                    // poll() may return None early: the ring reports
                    // data while a record is reserved but not committed.
                    let mut deadline = None;
                    while reader.poll(STALL).expect("polling").is_none() {
                        let d = *deadline.get_or_insert_with(|| Instant::now() + STALL);
                        assert!(
                            Instant::now() < d,
                            "no event within 5 s ({} generated)",
                            gen.runs()
                        );
                    }
                }
                t.elapsed()
            })
        });
        gen.finish()?;
        drop(reader);
    }
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut stream = {
            let _g = rt.enter();
            FlowStream::new(fresh_reader(&b.dp_every)?)?
        };
        let gen = Generator::start(b, b.cpus.1)?;
        g.bench_function("tokio", |bn| {
            bn.iter_custom(|n| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..n {
                        next_flow(&mut stream)
                            .await
                            .expect("the stream ended")
                            .expect("an event");
                    }
                    t.elapsed()
                })
            })
        });
        gen.finish()?;
        drop(stream);
    }
    {
        let mut reader = fresh_reader(&b.dp_every)?;
        let gen = Generator::start(b, b.cpus.1)?;
        // Events read beyond what one call asked for count for the next.
        let mut carry = 0u64;
        g.bench_function("batched-1ms", |bn| {
            bn.iter_custom(|n| {
                let t = Instant::now();
                while carry < n {
                    carry += read_all(&mut reader).expect("reading");
                    if carry < n {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                carry -= n;
                t.elapsed()
            })
        });
        gen.finish()?;
        drop(reader);
    }
    g.finish();
    Ok(())
}

/// How a consumer is driven in the delivery measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumer {
    /// `FlowReader::poll`: waits for each event, woken as they come.
    Blocking,
    /// `FlowStream` on a current-thread runtime.
    Tokio,
    /// `FlowReader::try_next` until empty, then 1 ms of sleep: the ring
    /// is rarely empty when an event is committed, so the kernel rarely
    /// wakes anyone.
    Batched,
    /// Events on, nobody reading: the ring is full, every event is lost.
    /// What the generator makes on its own.
    Nobody,
}

impl Consumer {
    const ALL: [Consumer; 4] = [
        Consumer::Blocking,
        Consumer::Tokio,
        Consumer::Batched,
        Consumer::Nobody,
    ];

    fn label(self) -> &'static str {
        match self {
            Consumer::Blocking => "FlowReader, blocking poll (woken per event)",
            Consumer::Tokio => "FlowStream, tokio current_thread",
            Consumer::Batched => "FlowReader, drained every 1 ms (batches)",
            Consumer::Nobody => "nobody reading (ring full, every event lost)",
        }
    }
}

/// One delivery measurement.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    generated_per_s: f64,
    delivered_per_s: f64,
    /// Of the events generated, the share the ring had no room for.
    lost_share: f64,
    /// Events per second read from a ring filled beforehand (nothing
    /// produced meanwhile): what the consumer alone can take.
    backlog_per_s: f64,
}

/// IRQ-work and rescheduling interrupts so far, summed over CPUs
/// (/proc/interrupts, rows IWI and RES). The ring buffer wakes its reader
/// through IRQ work; the wakeup of a thread on another CPU is a
/// rescheduling interrupt. System-wide, so other activity adds to them.
fn interrupts() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    let row = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .map_while(|w| w.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    };
    (row("IWI:"), row("RES:"))
}

/// Fills the ring with `CHUNK` events nobody reads, then times the
/// consumer reading them all; events per second.
fn deliver_backlog(b: &Bench, consumer: Consumer) -> Result<f64> {
    let n = u64::from(CHUNK);
    let secs = match consumer {
        Consumer::Nobody => return Ok(f64::NAN),
        Consumer::Blocking | Consumer::Batched => {
            let mut r = fresh_reader(&b.dp_every)?;
            b.xdp_run(&b.dp_every, &b.denied, CHUNK, XDP_DROP)?;
            let t0 = Instant::now();
            if consumer == Consumer::Batched {
                let got = read_all(&mut r)?;
                if got != n {
                    bail!("the backlog held {got} events, not {n}");
                }
            } else {
                for _ in 0..n {
                    r.poll(Duration::from_secs(1))?
                        .context("the backlog ended early")?;
                }
            }
            t0.elapsed().as_secs_f64()
        }
        Consumer::Tokio => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut stream = {
                let _g = rt.enter();
                FlowStream::new(fresh_reader(&b.dp_every)?)?
            };
            b.xdp_run(&b.dp_every, &b.denied, CHUNK, XDP_DROP)?;
            rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..n {
                    next_flow(&mut stream).await.context("the stream ended")??;
                }
                Ok::<_, anyhow::Error>(t0.elapsed().as_secs_f64())
            })?
        }
    };
    Ok(n as f64 / secs)
}

/// Generates events flat out on `cpus.1` for `DELIVER_WINDOW` while the
/// consumer reads on this thread (`cpus.0`); then drains what is left and
/// checks that every event was delivered or counted lost.
fn deliver(b: &Bench, consumer: Consumer) -> Result<Delivery> {
    let lost0 = b.dp_every.counters()?.events_lost;
    let (delivered_in_window, generated_in_window, window, total_delivered, runs) = match consumer {
        Consumer::Nobody => {
            // Start from an empty ring.
            drop(fresh_reader(&b.dp_every)?);
            b.dp_every.set_flow_events(true)?;
            let gen = Generator::start(b, b.cpus.1)?;
            std::thread::sleep(Duration::from_millis(20));
            let g0 = gen.runs();
            let t0 = Instant::now();
            std::thread::sleep(DELIVER_WINDOW);
            let window = t0.elapsed();
            let g1 = gen.runs();
            let runs = gen.finish()?;
            b.dp_every.set_flow_events(false)?;
            // What the ring held when it filled up: stored, not lost.
            let mut r = b.dp_every.flows()?;
            let stored = read_all(&mut r)?;
            (0, g1 - g0, window, stored, runs)
        }
        Consumer::Blocking | Consumer::Batched => {
            let mut r = fresh_reader(&b.dp_every)?;
            let gen = Generator::start(b, b.cpus.1)?;
            // Let the generator start before the window opens.
            std::thread::sleep(Duration::from_millis(20));
            let g0 = gen.runs();
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < DELIVER_WINDOW {
                if consumer == Consumer::Batched {
                    n += read_all(&mut r)?;
                    std::thread::sleep(Duration::from_millis(1));
                } else if r.poll(Duration::from_millis(100))?.is_some() {
                    n += 1;
                }
            }
            let window = t0.elapsed();
            let g1 = gen.runs();
            let runs = gen.finish()?;
            let mut total = n;
            while r.poll(Duration::from_millis(100))?.is_some() {
                total += 1;
            }
            (n, g1 - g0, window, total, runs)
        }
        Consumer::Tokio => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut stream = {
                let _g = rt.enter();
                FlowStream::new(fresh_reader(&b.dp_every)?)?
            };
            let gen = Generator::start(b, b.cpus.1)?;
            std::thread::sleep(Duration::from_millis(20));
            let g0 = gen.runs();
            let (n, window) = rt.block_on(async {
                let t0 = Instant::now();
                let sleep = tokio::time::sleep(DELIVER_WINDOW);
                tokio::pin!(sleep);
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        biased;
                        _ = &mut sleep => break,
                        f = next_flow(&mut stream) => {
                            f.context("the stream ended")??;
                            n += 1;
                        }
                    }
                }
                Ok::<_, anyhow::Error>((n, t0.elapsed()))
            })?;
            let g1 = gen.runs();
            let runs = gen.finish()?;
            let rest = rt.block_on(async {
                let mut k = 0u64;
                while let Ok(Some(f)) =
                    tokio::time::timeout(Duration::from_millis(100), next_flow(&mut stream)).await
                {
                    f?;
                    k += 1;
                }
                Ok::<_, anyhow::Error>(k)
            })?;
            (n, g1 - g0, window, n + rest, runs)
        }
    };
    let lost = b.dp_every.counters()?.events_lost - lost0;
    if total_delivered + lost != runs {
        bail!(
            "{}: {runs} events generated, {total_delivered} delivered, {lost} lost: {} unaccounted",
            consumer.label(),
            runs as i64 - (total_delivered + lost) as i64
        );
    }
    let secs = window.as_secs_f64();
    Ok(Delivery {
        generated_per_s: generated_in_window as f64 / secs,
        delivered_per_s: delivered_in_window as f64 / secs,
        lost_share: lost as f64 / runs.max(1) as f64,
        backlog_per_s: deliver_backlog(b, consumer)?,
    })
}

/// Connection setup, per connection.
#[derive(Debug, Clone, Copy)]
struct SetupFigures {
    us: f64,
    events: f64,
    irq_work: f64,
    resched: f64,
}

/// The summary's figures (medians over interleaved rounds).
struct Summary {
    machine: sys::Machine,
    /// (placement, off µs, on µs) per round trip.
    rtt: Vec<(&'static str, f64, f64)>,
    setup: Vec<(SetupCase, SetupFigures)>,
    /// ns per run and IRQ-work interrupts per run, per case.
    xdp: Vec<(XdpCase, f64, f64)>,
    deliver: Vec<(Consumer, Delivery)>,
}

fn summary(b: &Bench, rtt: &mut [RttConn]) -> Result<Summary> {
    eprintln!("\nsummary: {ROUNDS} interleaved rounds per figure, medians");
    let machine = b.machine.clone();

    // Round trips: events off and on alternate, in rotating order.
    let mut rtt_out = Vec::new();
    for conn in rtt.iter_mut() {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for r in 0..ROUNDS {
            for events in rotated(&[false, true], r) {
                let d = if events {
                    Some(Drain::start(&b.dp, b.cpus.1)?)
                } else {
                    None
                };
                let t = conn.run(64, RTT_ROUNDS)?;
                let us = t.as_secs_f64() * 1e6 / RTT_ROUNDS as f64;
                if let Some(d) = d {
                    d.finish()?;
                    on.push(us);
                } else {
                    off.push(us);
                }
            }
        }
        let label = match conn.mode {
            Mode::BlockOneCore => "one core",
            _ => "two cores",
        };
        rtt_out.push((label, median(&off), median(&on)));
    }

    // Connection setup.
    let mut setup: Vec<(SetupCase, [Vec<f64>; 4])> = SetupCase::ALL
        .iter()
        .map(|c| (*c, Default::default()))
        .collect();
    for r in 0..ROUNDS {
        for case in rotated(&SetupCase::ALL, r) {
            let (iwi0, res0) = interrupts();
            let (t, read) = setup_case(b, case, SETUP_CONNS)?;
            let (iwi1, res1) = interrupts();
            let slot = setup.iter_mut().find(|(c, _)| *c == case).expect("a case");
            let per = |x: f64| x / SETUP_CONNS as f64;
            slot.1[0].push(per(t.as_secs_f64() * 1e6));
            slot.1[1].push(per(read as f64));
            slot.1[2].push(per((iwi1 - iwi0) as f64));
            slot.1[3].push(per((res1 - res0) as f64));
        }
    }
    let setup = setup
        .into_iter()
        .map(|(c, v)| {
            (
                c,
                SetupFigures {
                    us: median(&v[0]),
                    events: median(&v[1]),
                    irq_work: median(&v[2]),
                    resched: median(&v[3]),
                },
            )
        })
        .collect();

    // XDP: 200,000 runs per case and round.
    const XDP_RUNS: u64 = 200_000;
    let mut xdp: Vec<(XdpCase, Vec<f64>, Vec<f64>)> =
        XdpCase::ALL.iter().map(|c| (*c, vec![], vec![])).collect();
    for r in 0..ROUNDS {
        for case in rotated(&XdpCase::ALL, r) {
            let (iwi0, _) = interrupts();
            let t = xdp_case(b, case, XDP_RUNS)?;
            let (iwi1, _) = interrupts();
            let slot = xdp.iter_mut().find(|(c, _, _)| *c == case).expect("a case");
            slot.1.push(t.as_nanos() as f64 / XDP_RUNS as f64);
            slot.2.push((iwi1 - iwi0) as f64 / XDP_RUNS as f64);
        }
    }
    let xdp = xdp
        .into_iter()
        .map(|(c, ns, iwi)| (c, median(&ns), median(&iwi)))
        .collect();

    // Delivery: five rounds of one second per consumer.
    let consumers = Consumer::ALL;
    let mut runs: Vec<(Consumer, Vec<Delivery>)> = consumers.iter().map(|c| (*c, vec![])).collect();
    for r in 0..5 {
        for consumer in rotated(&consumers, r) {
            let d = deliver(b, consumer)?;
            let slot = runs
                .iter_mut()
                .find(|(c, _)| *c == consumer)
                .expect("a consumer");
            slot.1.push(d);
        }
    }
    let deliver = runs
        .into_iter()
        .map(|(c, v)| {
            let m = |f: fn(&Delivery) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
            (
                c,
                Delivery {
                    generated_per_s: m(|d| d.generated_per_s),
                    delivered_per_s: m(|d| d.delivered_per_s),
                    lost_share: m(|d| d.lost_share),
                    backlog_per_s: m(|d| d.backlog_per_s),
                },
            )
        })
        .collect();
    Ok(Summary {
        machine,
        rtt: rtt_out,
        setup,
        xdp,
        deliver,
    })
}

impl Summary {
    fn print(&self) {
        let m = &self.machine;
        println!();
        println!(
            "Flow events: cost and throughput ({}; {}; {} vCPUs; load {})",
            m.kernel, m.cpu_model, m.nproc, m.loadavg
        );
        println!("medians of {ROUNDS} interleaved rounds (delivery: 5 rounds)");
        println!();
        println!(
            "| short-circuit, loopback | events off | on, reader draining | on, read afterwards |"
        );
        println!("|---|---:|---:|---:|");
        for (label, off, on) in &self.rtt {
            println!(
                "| round trip, 64 B, blocking, {label} (µs) | {off:.2} | {on:.2} ({:+.0} %) | |",
                (on / off - 1.0) * 100.0
            );
        }
        let get = |c: SetupCase| {
            self.setup
                .iter()
                .find(|(x, _)| *x == c)
                .map(|(_, f)| *f)
                .expect("every setup case")
        };
        let (off, dr, af) = (
            get(SetupCase::Off),
            get(SetupCase::Draining),
            get(SetupCase::ReadAfter),
        );
        println!(
            "| connection setup: connect + accept + first byte (µs) | {:.2} | {:.2} ({:+.0} %) | \
             {:.2} ({:+.0} %) |",
            off.us,
            dr.us,
            (dr.us / off.us - 1.0) * 100.0,
            af.us,
            (af.us / off.us - 1.0) * 100.0
        );
        println!(
            "| events read per connection | {:.2} | {:.2} | {:.2} |",
            off.events, dr.events, af.events
        );
        println!(
            "| IRQ-work / rescheduling interrupts per connection (system-wide) | {:.2} / {:.2} | \
             {:.2} / {:.2} | {:.2} / {:.2} |",
            off.irq_work, off.resched, dr.irq_work, dr.resched, af.irq_work, af.resched
        );
        println!();
        println!(
            "| XDP program, 60-byte UDP frame (BPF_PROG_TEST_RUN) | ns per packet | IRQ-work \
             interrupts per packet |"
        );
        println!("|---|---:|---:|");
        for (case, ns, iwi) in &self.xdp {
            println!("| {} | {ns:.0} | {iwi:.3} |", case.label());
        }
        println!();
        println!(
            "| consumer | generator flat out on the other CPU: generated/s | delivered/s | lost | \
             from a full ring: delivered/s |"
        );
        println!("|---|---:|---:|---:|---:|");
        for (c, d) in &self.deliver {
            let backlog = if d.backlog_per_s.is_nan() {
                "–".to_string()
            } else {
                format!("{:.2} M", d.backlog_per_s / 1e6)
            };
            println!(
                "| {} | {:.2} M | {:.2} M | {:.0} % | {backlog} |",
                c.label(),
                d.generated_per_s / 1e6,
                d.delivered_per_s / 1e6,
                d.lost_share * 100.0,
            );
        }
    }
}
