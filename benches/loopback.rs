//! Loopback benchmarks: plain TCP, the meshpath short-circuit, a unix
//! socketpair and a two-proxy sidecar chain (plus haproxy when installed),
//! side by side in every criterion group.
//!
//! ```text
//! sudo -E cargo bench --bench loopback [-- FILTER]
//! ```
//!
//! Groups:
//! - `rtt/<mode>/<size>`: one request/response round trip per iteration,
//!   for the modes of `harness::Mode` and sizes 64 B .. 1 MiB;
//! - `stream/<size>`: one write per iteration, one direction, reader on
//!   the other core (throughput in bytes);
//! - `setup`: one connection (connect + accept + first byte, then close)
//!   per iteration, with the programs attached or not.
//!
//! Connections, servers and proxies are set up once and persist across
//! iterations. Busy-poll connections make 2,000 round trips before they
//! are measured, so the short-circuit has moved the spinning connection
//! to TCP by then (the counters are printed). Needs root: fails with a
//! message otherwise. `cargo run --release --example summary` runs a short
//! version of everything with ratios and targets.

mod harness;

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use harness::rtt::RttConn;
use harness::setup::{SetupBench, SetupKind};
use harness::stream::StreamConn;
use harness::{size_label, sys, Mode, World, SIZES};

fn main() {
    if let Err(e) = harness::require_root("cargo bench --bench loopback") {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    let world = match World::new() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    eprintln!("{}", world.haproxy_note);
    sys::pin_to(world.cpus.0).expect("pinning the benchmark thread to the client CPU");

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    for mode in Mode::ALL {
        rtt(&mut c, &world, mode);
    }
    stream(&mut c, &world);
    setup(&mut c, &world);
    c.final_summary();
}

fn rtt(c: &mut Criterion, world: &World, mode: Mode) {
    world
        .place_proxies_for(mode)
        .expect("setting the proxies' CPU affinity");
    let mut conns: Vec<RttConn> = world
        .paths()
        .into_iter()
        .map(|p| RttConn::new(world, p, mode).expect("setting up a round-trip connection"))
        .collect();
    if mode == Mode::BusyPoll {
        let before = world.counters().expect("reading counters");
        for conn in &mut conns {
            conn.run(64, 2000).expect("busy-poll warm-up");
        }
        let d = world.counters().expect("reading counters").since(&before);
        eprintln!(
            "busy-poll warm-up (2,000 × 64 B per path): sc msgs_redirected {}, msgs_fallback {}, \
             fallback_peer_busy {}, sockets_evicted {}",
            d.msgs_redirected, d.msgs_fallback, d.fallback_peer_busy, d.sockets_evicted
        );
    }
    let before = world.counters().expect("reading counters");
    for size in SIZES {
        let mut g = c.benchmark_group(format!(
            "rtt/{}/{}",
            mode.name(),
            size_label(size).replace(' ', "")
        ));
        if size >= 1 << 20 {
            g.sampling_mode(SamplingMode::Flat);
        }
        for conn in &mut conns {
            let id = BenchmarkId::from_parameter(conn.path.name());
            g.bench_function(id, |b| {
                b.iter_custom(|iters| conn.run(size, iters).expect("round trips"));
            });
        }
        g.finish();
    }
    let d = world.counters().expect("reading counters").since(&before);
    eprintln!(
        "rtt/{}: sc msgs_redirected {}, msgs_fallback {}, fallback_peer_busy {}, sockets_evicted {}",
        mode.name(),
        d.msgs_redirected,
        d.msgs_fallback,
        d.fallback_peer_busy,
        d.sockets_evicted
    );
}

fn stream(c: &mut Criterion, world: &World) {
    world
        .place_proxies(None)
        .expect("setting the proxies' CPU affinity");
    let mut conns: Vec<StreamConn> = world
        .paths()
        .into_iter()
        .map(|p| {
            let mut c = StreamConn::new(world, p).expect("setting up a stream");
            c.warm_up().expect("stream warm-up");
            c
        })
        .collect();
    let before = world.counters().expect("reading counters");
    for size in SIZES {
        let mut g = c.benchmark_group(format!("stream/{}", size_label(size).replace(' ', "")));
        g.throughput(Throughput::Bytes(size as u64));
        for conn in &mut conns {
            let id = BenchmarkId::from_parameter(conn.path.name());
            g.bench_function(id, |b| {
                b.iter_custom(|iters| conn.run(size, iters).expect("streaming"));
            });
        }
        g.finish();
    }
    for conn in &mut conns {
        conn.finish().expect("verifying the stream at EOF");
    }
    let d = world.counters().expect("reading counters").since(&before);
    eprintln!(
        "stream: sc msgs_redirected {}, bytes_redirected {}, msgs_fallback {}",
        d.msgs_redirected, d.bytes_redirected, d.msgs_fallback
    );
}

fn setup(c: &mut Criterion, world: &World) {
    let sb = SetupBench::new(world).expect("setting up the listeners");
    let mut g = c.benchmark_group("setup");
    g.throughput(Throughput::Elements(1));
    for (name, kind) in [
        ("without-programs", SetupKind::Plain),
        ("with-programs", SetupKind::Attached),
        ("short-circuit-only", SetupKind::ShortCircuitOnly),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| sb.run(world, kind, iters).expect("connection setup").setup);
        });
    }
    g.finish();
}
