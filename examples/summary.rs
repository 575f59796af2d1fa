//! One command for the whole loopback comparison:
//!
//! ```text
//! cargo run --release --example summary [-- --quick] [-- --json PATH]
//! ```
//!
//! Runs a short version of every benchmark of `benches/loopback.rs` in one
//! process (round trips in four modes and four sizes, streaming, connection
//! setup, CPU cost) over plain loopback TCP, the meshpath short-circuit, a
//! unix socketpair and a two-proxy sidecar chain, with the paths
//! interleaved in rotating order and repeated; prints medians, ratios and
//! the project's targets as one Markdown report. Needs root.

#[path = "../benches/harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use harness::rtt::RttConn;
use harness::setup::{SetupBench, SetupKind};
use harness::stream::StreamConn;
use harness::sys::{self, Machine};
use harness::{median, rotated, size_label, Mode, PathKind, World, SIZES};
use meshpath::Counters;

/// Loopback comparison: plain TCP, meshpath short-circuit, unix socketpair, sidecar proxies.
#[derive(Debug, Parser)]
#[command(name = "summary")]
struct Args {
    /// Fewer repetitions and shorter batches (about a third of the time).
    #[arg(long)]
    quick: bool,
    /// Also write every median (and the samples behind it) to PATH as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

/// How much to measure.
struct Plan {
    name: &'static str,
    /// Repetitions of every measurement (paths interleaved in each).
    reps: usize,
    /// Target duration of one batch.
    batch: Duration,
    /// Round trips (64 B) each busy-poll connection makes before measuring.
    busy_warmup: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                name: "quick",
                reps: 3,
                batch: Duration::from_millis(30),
                busy_warmup: 2000,
            }
        } else {
            Plan {
                name: "full",
                reps: 9,
                batch: Duration::from_millis(120),
                busy_warmup: 2000,
            }
        }
    }
}

/// Samples of one path in one cell.
#[derive(Default, Clone)]
struct Samples {
    /// The figure (µs per round trip, MB/s, connections/s).
    value: Vec<f64>,
    /// CPU cost (s per 100k round trips, s per GiB, µs per connection).
    cpu: Vec<f64>,
    /// Units per batch.
    n: u64,
}

impl Samples {
    fn med(&self) -> f64 {
        median(&self.value)
    }
    fn cpu_med(&self) -> f64 {
        median(&self.cpu)
    }
}

struct RttCell {
    mode: Mode,
    size: usize,
    paths: BTreeMap<PathKind, Samples>,
    /// Counter deltas over the cell (calibration and repetitions).
    sc: Counters,
}

impl RttCell {
    /// Which path the `sc` connection took while this cell was measured.
    fn sc_path(&self) -> String {
        let d = &self.sc;
        match (d.msgs_redirected, d.msgs_fallback) {
            (r, 0) if r > 0 => "redirect".into(),
            (0, 0) => "TCP (evicted)".into(),
            (0, _) => "TCP (fallback)".into(),
            (r, f) => format!("mixed: {r} redirected, {f} TCP"),
        }
    }
}

struct StreamCell {
    size: usize,
    paths: BTreeMap<PathKind, Samples>,
}

#[derive(Default)]
struct Results {
    rtt: Vec<RttCell>,
    stream: Vec<StreamCell>,
    stream_verified: BTreeMap<PathKind, u64>,
    /// Setup rate (value) and CPU per connection, setup and close (cpu).
    /// Indexed like `SETUP_KINDS`.
    setup: [Samples; 3],
    /// Churn rate: setup and close.
    churn: [Samples; 3],
    counters: Vec<(String, Counters)>,
}

/// One target: a ratio and a bound.
struct Target {
    what: String,
    ratio: f64,
    bound: f64,
    /// true: ratio <= bound; false: ratio >= bound.
    at_most: bool,
}

impl Target {
    fn pass(&self) -> bool {
        if self.at_most {
            self.ratio <= self.bound
        } else {
            self.ratio >= self.bound
        }
    }
    fn cell(&self) -> String {
        // Two decimals, or three where two would print the bound itself.
        let shown = if ratio(self.ratio) == format!("{:.2}", self.bound) {
            format!("{:.3}", self.ratio)
        } else {
            ratio(self.ratio)
        };
        format!(
            "{} {}{} {}",
            shown,
            if self.at_most { "≤" } else { "≥" },
            self.bound,
            if self.pass() { "PASS" } else { "MISS" }
        )
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("summary: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    harness::require_root("the summary")?;
    let plan = Plan::new(args.quick);
    let machine = Machine::describe();
    let started = Instant::now();
    let world = World::new()?;
    sys::pin_to(world.cpus.0)?;
    let paths = world.paths();
    let mut res = Results::default();

    for mode in Mode::ALL {
        eprintln!("summary: round trips, {} ...", mode.label());
        measure_rtt(&world, &paths, mode, &plan, &mut res)?;
    }
    eprintln!("summary: streaming ...");
    measure_stream(&world, &paths, &plan, &mut res)?;
    eprintln!("summary: connection setup ...");
    measure_setup(&world, &plan, &mut res)?;
    let elapsed = started.elapsed();
    let load_after = sys::loadavg();

    let (report, targets) = render(&world, &machine, &load_after, &plan, elapsed, &paths, &res);
    print!("{report}");
    if let Some(path) = &args.json {
        let json = to_json(&machine, &plan, &paths, &res, &targets, &world.haproxy_note);
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("summary: wrote {}", path.display());
    }
    Ok(())
}

/// Runs `pilot` units through `f` and returns how many make a batch of
/// about `target`.
fn calibrate(
    f: &mut dyn FnMut(u64) -> Result<Duration>,
    pilot: u64,
    target: Duration,
    (min, max): (u64, u64),
) -> Result<u64> {
    let t = f(pilot)?;
    let per = t.as_secs_f64().max(1e-9) / pilot as f64;
    Ok(((target.as_secs_f64() / per) as u64).clamp(min, max))
}

fn measure_rtt(
    world: &World,
    paths: &[PathKind],
    mode: Mode,
    plan: &Plan,
    res: &mut Results,
) -> Result<()> {
    world.place_proxies_for(mode)?;
    let c0 = world.counters()?;
    let mut conns = Vec::new();
    for &p in paths {
        conns.push(RttConn::new(world, p, mode)?);
    }
    let warm = if mode == Mode::BusyPoll {
        plan.busy_warmup
    } else {
        200
    };
    for c in &mut conns {
        c.run(64, warm)?;
    }
    let c1 = world.counters()?;
    if mode == Mode::BusyPoll {
        res.counters.push((
            format!("{}: warm-up, {warm} × 64 B", mode.label()),
            c1.since(&c0),
        ));
    }
    for size in SIZES {
        let pilot = match size {
            s if s <= 4096 => 200,
            s if s <= 65536 => 50,
            _ => 8,
        };
        let cell_c0 = world.counters()?;
        let mut n = Vec::new();
        for c in &mut conns {
            n.push(calibrate(
                &mut |k| c.run(size, k),
                pilot,
                plan.batch,
                (5, 200_000),
            )?);
        }
        let mut cell: BTreeMap<PathKind, Samples> = BTreeMap::new();
        for rep in 0..plan.reps {
            for i in rotated(&(0..conns.len()).collect::<Vec<_>>(), rep) {
                let cpu0 = sys::cpu_time()?;
                let t = conns[i].run(size, n[i])?;
                let cpu = sys::cpu_time()? - cpu0;
                let s = cell.entry(conns[i].path).or_default();
                s.n = n[i];
                s.value.push(t.as_secs_f64() * 1e6 / n[i] as f64);
                s.cpu.push(cpu.as_secs_f64() * 1e5 / n[i] as f64);
            }
        }
        res.rtt.push(RttCell {
            mode,
            size,
            paths: cell,
            sc: world.counters()?.since(&cell_c0),
        });
    }
    let c2 = world.counters()?;
    if mode == Mode::BusyPoll {
        res.counters
            .push((format!("{}: measured", mode.label()), c2.since(&c1)));
    } else {
        res.counters.push((mode.label().to_string(), c2.since(&c0)));
    }
    Ok(())
}

fn measure_stream(world: &World, paths: &[PathKind], plan: &Plan, res: &mut Results) -> Result<()> {
    world.place_proxies(None)?;
    let c0 = world.counters()?;
    let mut conns = Vec::new();
    for &p in paths {
        let mut c = StreamConn::new(world, p)?;
        c.warm_up()?;
        conns.push(c);
    }
    for size in SIZES {
        let pilot = ((4u64 << 20) / size as u64).max(8);
        let mut n = Vec::new();
        for c in &mut conns {
            n.push(calibrate(
                &mut |k| c.run(size, k),
                pilot,
                plan.batch,
                (4, 50_000_000),
            )?);
        }
        let mut cell: BTreeMap<PathKind, Samples> = BTreeMap::new();
        for rep in 0..plan.reps {
            for i in rotated(&(0..conns.len()).collect::<Vec<_>>(), rep) {
                let cpu0 = sys::cpu_time()?;
                let t = conns[i].run(size, n[i])?;
                let cpu = sys::cpu_time()? - cpu0;
                let bytes = (size as u64 * n[i]) as f64;
                let s = cell.entry(conns[i].path).or_default();
                s.n = n[i];
                s.value.push(bytes / t.as_secs_f64() / 1e6);
                s.cpu
                    .push(cpu.as_secs_f64() / (bytes / (1u64 << 30) as f64));
            }
        }
        res.stream.push(StreamCell { size, paths: cell });
    }
    for c in &mut conns {
        let total = c.finish()?;
        res.stream_verified.insert(c.path, total);
    }
    res.counters
        .push(("streaming".into(), world.counters()?.since(&c0)));
    Ok(())
}

/// Plain, every program (default attach), short-circuit only.
const SETUP_KINDS: [SetupKind; 3] = [
    SetupKind::Plain,
    SetupKind::Attached,
    SetupKind::ShortCircuitOnly,
];

fn measure_setup(world: &World, plan: &Plan, res: &mut Results) -> Result<()> {
    let sb = SetupBench::new(world)?;
    let mut n = [0u64; 3];
    for (i, kind) in SETUP_KINDS.into_iter().enumerate() {
        n[i] = calibrate(
            &mut |k| Ok(sb.run(world, kind, k)?.total),
            200,
            plan.batch * 2,
            (50, 100_000),
        )?;
    }
    let c0 = world.counters()?;
    for rep in 0..plan.reps {
        for i in rotated(&[0, 1, 2], rep) {
            let cpu0 = sys::cpu_time()?;
            let t = sb.run(world, SETUP_KINDS[i], n[i])?;
            let cpu = sys::cpu_time()? - cpu0;
            let k = n[i] as f64;
            let s = &mut res.setup[i];
            s.n = n[i];
            s.value.push(k / t.setup.as_secs_f64());
            s.cpu.push(cpu.as_secs_f64() * 1e6 / k);
            let c = &mut res.churn[i];
            c.n = n[i];
            c.value.push(k / t.total.as_secs_f64());
        }
    }
    res.counters.push((
        "connection setup, both cgroups".into(),
        world.counters()?.since(&c0),
    ));
    Ok(())
}

fn ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "n/a".into()
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn med(cell: &BTreeMap<PathKind, Samples>, p: PathKind) -> f64 {
    cell.get(&p).map_or(f64::NAN, Samples::med)
}

fn cpu_med(cell: &BTreeMap<PathKind, Samples>, p: PathKind) -> f64 {
    cell.get(&p).map_or(f64::NAN, Samples::cpu_med)
}

fn rtt_targets(c: &RttCell, paths: &[PathKind]) -> Vec<Target> {
    let sc = med(&c.paths, PathKind::Sc);
    let what = |r: &str| {
        format!(
            "round trip, {}, {}: {r}",
            c.mode.label(),
            size_label(c.size)
        )
    };
    let mut t = vec![
        Target {
            what: what("sc/tcp"),
            ratio: sc / med(&c.paths, PathKind::Tcp),
            bound: if c.mode == Mode::BlockOneCore {
                0.75
            } else {
                1.0
            },
            at_most: true,
        },
        Target {
            what: what("sc/unix"),
            ratio: sc / med(&c.paths, PathKind::Unix),
            bound: 1.2,
            at_most: true,
        },
        Target {
            what: what("sc/sidecar"),
            ratio: sc / med(&c.paths, PathKind::Sidecar),
            bound: 0.3,
            at_most: true,
        },
    ];
    if paths.contains(&PathKind::Haproxy) {
        t.push(Target {
            what: what("sc/haproxy"),
            ratio: sc / med(&c.paths, PathKind::Haproxy),
            bound: 0.3,
            at_most: true,
        });
    }
    t
}

fn counter_row(name: &str, d: &Counters) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
        d.sockets_enrolled,
        d.msgs_redirected,
        num(d.bytes_redirected as f64 / 1e6),
        d.msgs_fallback,
        d.fallback_peer_busy,
        d.sockets_evicted,
        d.enroll_errors,
    )
}

fn render(
    world: &World,
    m: &Machine,
    load_after: &str,
    plan: &Plan,
    elapsed: Duration,
    paths: &[PathKind],
    res: &Results,
) -> (String, Vec<Target>) {
    let mut o = String::new();
    let mut targets: Vec<Target> = Vec::new();
    let names: Vec<&str> = paths.iter().map(|p| p.name()).collect();
    let _ = writeln!(
        o,
        "## Loopback: plain TCP vs meshpath short-circuit vs unix socket vs sidecar\n"
    );
    let _ = writeln!(o, "- kernel: {}", m.kernel);
    let _ = writeln!(o, "- CPU: {}, nproc {}", m.cpu_model, m.nproc);
    let _ = writeln!(
        o,
        "- client/writer on CPU {}, server/reader on CPU {}; in \"one core\" both ends and the \
         proxies share the client's CPU, otherwise the proxies run wherever the scheduler puts them",
        world.cpus.0, world.cpus.1
    );
    let _ = writeln!(
        o,
        "- load average before / after: {} / {}",
        m.loadavg, load_after
    );
    let _ = writeln!(
        o,
        "- run: {} ({} repetitions, ~{} ms batches, paths interleaved in rotating order; medians), {:.0} s",
        plan.name,
        plan.reps,
        plan.batch.as_millis(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "- paths: tcp = loopback TCP; sc = loopback TCP in a cgroup with meshpath attached; \
         unix = socketpair; sidecar = client → proxy A → proxy B → server, two tokio proxies \
         (current_thread runtime each, 64 KiB copy buffers); TCP_NODELAY everywhere"
    );
    let _ = writeln!(
        o,
        "- programs attached to the `sc` cgroup: {}",
        world.attachment.programs().join(", ")
    );
    let _ = writeln!(o, "- {}", world.haproxy_note);
    let _ = writeln!(o);

    // Round trips.
    let _ = writeln!(
        o,
        "### Request/response round trip (median µs per round trip)\n"
    );
    let mut head = "| mode | size |".to_string();
    for n in &names {
        let _ = write!(head, " {n} |");
    }
    head.push_str(" sc/tcp | sc/unix | sc/sidecar |");
    if paths.contains(&PathKind::Haproxy) {
        head.push_str(" sc/haproxy |");
    }
    head.push_str(" sc went by |");
    let cols = head.matches('|').count() - 1;
    let _ = writeln!(o, "{head}\n|{}", "---|".repeat(cols));
    for c in &res.rtt {
        let mut row = format!("| {} | {} |", c.mode.label(), size_label(c.size));
        for &p in paths {
            let _ = write!(row, " {} |", num(med(&c.paths, p)));
        }
        for t in rtt_targets(c, paths) {
            let _ = write!(row, " {} |", t.cell());
            targets.push(t);
        }
        let _ = writeln!(o, "{row} {} |", c.sc_path());
    }
    let _ = writeln!(
        o,
        "\n\"sc went by\": what the `sc` connection's messages took while the cell was measured \
         (datapath counters). A busy-polling receiver is recognised during the 2,000-round-trip \
         warm-up and the connection moves to plain TCP (\"evicted\", see the counters below), so \
         busy-poll `sc` figures are plain TCP by design.\n"
    );

    let _ = writeln!(
        o,
        "### CPU cost of round trips (median CPU seconds per 100k round trips, user+sys of the \
         whole process: both ends and the proxies; busy-poll spins on both cores)\n"
    );
    let mut head = "| mode | size |".to_string();
    for n in &names {
        let _ = write!(head, " {n} |");
    }
    head.push_str(" sc/tcp |");
    let cols = head.matches('|').count() - 1;
    let _ = writeln!(o, "{head}\n|{}", "---|".repeat(cols));
    for c in &res.rtt {
        let mut row = format!("| {} | {} |", c.mode.label(), size_label(c.size));
        for &p in paths {
            let _ = write!(row, " {} |", num(cpu_med(&c.paths, p)));
        }
        let _ = write!(
            row,
            " {} |",
            ratio(cpu_med(&c.paths, PathKind::Sc) / cpu_med(&c.paths, PathKind::Tcp))
        );
        let _ = writeln!(o, "{row}");
    }
    let _ = writeln!(o);

    // Streaming.
    let _ = writeln!(
        o,
        "### Streaming, one direction (median MB/s after a 64 MiB warm-up per connection; \
         writer on one core, reader on the other reading 256 KiB at a time; CPU seconds per \
         GiB moved, whole process)\n"
    );
    let mut head = "| write size |".to_string();
    for n in &names {
        let _ = write!(head, " {n} MB/s |");
    }
    head.push_str(" sc/tcp |");
    for n in &names {
        let _ = write!(head, " {n} CPU s/GiB |");
    }
    let cols = head.matches('|').count() - 1;
    let _ = writeln!(o, "{head}\n|{}", "---|".repeat(cols));
    for c in &res.stream {
        let mut row = format!("| {} |", size_label(c.size));
        for &p in paths {
            let _ = write!(row, " {} |", num(med(&c.paths, p)));
        }
        let t = Target {
            what: format!("streaming, {} writes: sc/tcp", size_label(c.size)),
            ratio: med(&c.paths, PathKind::Sc) / med(&c.paths, PathKind::Tcp),
            bound: 1.0,
            at_most: false,
        };
        let _ = write!(row, " {} |", t.cell());
        targets.push(t);
        for &p in paths {
            let _ = write!(row, " {} |", num(cpu_med(&c.paths, p)));
        }
        let _ = writeln!(o, "{row}");
    }
    let verified: Vec<String> = res
        .stream_verified
        .iter()
        .map(|(p, b)| format!("{} {:.0} MB", p.name(), *b as f64 / 1e6))
        .collect();
    let _ = writeln!(
        o,
        "\nByte counts and checksums verified after every batch and at EOF: {}.\n",
        verified.join(", ")
    );

    // Setup.
    let _ = writeln!(
        o,
        "### Connection setup (one connection at a time, both ends on one thread; each closed \
         right after its first byte)\n"
    );
    let _ = writeln!(
        o,
        "| | without programs | with programs | short-circuit only | with/without | \
         short-circuit only/without |\n|---|---|---|---|---|---|"
    );
    let (su, ch) = (&res.setup, &res.churn);
    let t = Target {
        what: "connection setup rate: with/without programs".into(),
        ratio: su[1].med() / su[0].med(),
        bound: 0.9,
        at_most: false,
    };
    let _ = writeln!(
        o,
        "| connect + accept + first byte, connections/s | {} | {} | {} | {} | {} |",
        num(su[0].med()),
        num(su[1].med()),
        num(su[2].med()),
        t.cell(),
        ratio(su[2].med() / su[0].med())
    );
    targets.push(t);
    let _ = writeln!(
        o,
        "| same + close (churn), connections/s | {} | {} | {} | {} | {} |",
        num(ch[0].med()),
        num(ch[1].med()),
        num(ch[2].med()),
        ratio(ch[1].med() / ch[0].med()),
        ratio(ch[2].med() / ch[0].med())
    );
    let _ = writeln!(
        o,
        "| CPU µs per connection (setup + close, this process) | {} | {} | {} | {} | {} |\n",
        num(su[0].cpu_med()),
        num(su[1].cpu_med()),
        num(su[2].cpu_med()),
        ratio(su[1].cpu_med() / su[0].cpu_med()),
        ratio(su[2].cpu_med() / su[0].cpu_med())
    );
    let _ = writeln!(
        o,
        "\"with programs\" is the `sc` cgroup (every program `Datapath::attach_cgroup` attaches \
         by default); \"short-circuit only\" is a second cgroup attached with \
         `AttachOptions::policy(false)`.\n"
    );

    // Counters.
    let _ = writeln!(
        o,
        "### Datapath counters (deltas per section; only `sc` sockets are in the cgroup)\n"
    );
    let _ = writeln!(
        o,
        "| section | sockets enrolled | msgs redirected | MB redirected | msgs fallback | \
         fallback_peer_busy | sockets_evicted | enroll_errors |\n|---|---|---|---|---|---|---|---|"
    );
    for (name, d) in &res.counters {
        o.push_str(&counter_row(name, d));
    }
    let _ = writeln!(o);

    // Targets.
    let missed: Vec<&Target> = targets.iter().filter(|t| !t.pass()).collect();
    let _ = writeln!(
        o,
        "### Targets: {} of {} met\n",
        targets.len() - missed.len(),
        targets.len()
    );
    let _ = writeln!(
        o,
        "Targets: sc/tcp round trip ≤ 0.75 blocking one core, ≤ 1.0 in every other mode and size; \
         sc/unix ≤ 1.2; sc/sidecar ≤ 0.3; streaming sc/tcp ≥ 1.0 at every write size; setup rate \
         with programs ≥ 0.9 of without.\n"
    );
    if missed.is_empty() {
        let _ = writeln!(o, "No target missed.");
    } else {
        let _ = writeln!(o, "Missed:\n");
        for t in &missed {
            let _ = writeln!(o, "- {}: {}", t.what, t.cell());
        }
    }
    (o, targets)
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn json_samples(s: &Samples, value: &str, cpu: Option<&str>) -> String {
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| json_num(*x))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpu = match cpu {
        Some(name) => format!(
            ", \"{name}\": {}, \"cpu_samples\": [{}]",
            json_num(s.cpu_med()),
            list(&s.cpu)
        ),
        None => String::new(),
    };
    format!(
        "{{\"{value}\": {}, \"batch\": {}, \"samples\": [{}]{cpu}}}",
        json_num(s.med()),
        s.n,
        list(&s.value),
    )
}

fn json_paths(cell: &BTreeMap<PathKind, Samples>, value: &str, cpu: &str) -> String {
    let parts: Vec<String> = cell
        .iter()
        .map(|(p, s)| {
            format!(
                "{}: {}",
                json_str(p.name()),
                json_samples(s, value, Some(cpu))
            )
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

fn to_json(
    m: &Machine,
    plan: &Plan,
    paths: &[PathKind],
    res: &Results,
    targets: &[Target],
    haproxy: &str,
) -> String {
    let mut o = String::from("{\n");
    let _ = writeln!(
        o,
        "  \"machine\": {{\"kernel\": {}, \"cpu\": {}, \"nproc\": {}, \"loadavg\": {}}},",
        json_str(&m.kernel),
        json_str(&m.cpu_model),
        m.nproc,
        json_str(&m.loadavg)
    );
    let _ = writeln!(
        o,
        "  \"plan\": {{\"name\": {}, \"reps\": {}, \"batch_ms\": {}}},",
        json_str(plan.name),
        plan.reps,
        plan.batch.as_millis()
    );
    let names: Vec<String> = paths.iter().map(|p| json_str(p.name())).collect();
    let _ = writeln!(o, "  \"paths\": [{}],", names.join(", "));
    let _ = writeln!(o, "  \"haproxy\": {},", json_str(haproxy));
    let rtt: Vec<String> = res
        .rtt
        .iter()
        .map(|c| {
            format!(
                "    {{\"mode\": {}, \"size\": {}, \"sc_path\": {}, \"sc_msgs_redirected\": {}, \
                 \"sc_msgs_fallback\": {}, \"paths\": {}}}",
                json_str(c.mode.name()),
                c.size,
                json_str(&c.sc_path()),
                c.sc.msgs_redirected,
                c.sc.msgs_fallback,
                json_paths(&c.paths, "median_us", "median_cpu_s_per_100k")
            )
        })
        .collect();
    let _ = writeln!(o, "  \"rtt\": [\n{}\n  ],", rtt.join(",\n"));
    let stream: Vec<String> = res
        .stream
        .iter()
        .map(|c| {
            format!(
                "    {{\"write_size\": {}, \"paths\": {}}}",
                c.size,
                json_paths(&c.paths, "median_mb_s", "median_cpu_s_per_gib")
            )
        })
        .collect();
    let _ = writeln!(o, "  \"stream\": [\n{}\n  ],", stream.join(",\n"));
    let kinds = ["without_programs", "with_programs", "short_circuit_only"];
    let setup: Vec<String> = kinds
        .iter()
        .zip(&res.setup)
        .map(|(k, s)| {
            format!(
                "{}: {}",
                json_str(k),
                json_samples(s, "median_conn_s", Some("median_cpu_us_per_conn"))
            )
        })
        .collect();
    let _ = writeln!(o, "  \"setup\": {{{}}},", setup.join(", "));
    let churn: Vec<String> = kinds
        .iter()
        .zip(&res.churn)
        .map(|(k, s)| {
            format!(
                "{}: {}",
                json_str(k),
                json_samples(s, "median_conn_s", None)
            )
        })
        .collect();
    let _ = writeln!(o, "  \"churn\": {{{}}},", churn.join(", "));
    let counters: Vec<String> = res
        .counters
        .iter()
        .map(|(name, d)| {
            let f: Vec<String> = d
                .iter()
                .map(|(k, v)| format!("{}: {v}", json_str(k)))
                .collect();
            format!("    {}: {{{}}}", json_str(name), f.join(", "))
        })
        .collect();
    let _ = writeln!(o, "  \"counters\": {{\n{}\n  }},", counters.join(",\n"));
    let t: Vec<String> = targets
        .iter()
        .map(|t| {
            format!(
                "    {{\"what\": {}, \"ratio\": {}, \"bound\": {}, \"at_most\": {}, \"pass\": {}}}",
                json_str(&t.what),
                json_num(t.ratio),
                t.bound,
                t.at_most,
                t.pass()
            )
        })
        .collect();
    let _ = writeln!(o, "  \"targets\": [\n{}\n  ]", t.join(",\n"));
    o.push_str("}\n");
    o
}
