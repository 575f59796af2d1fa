//! Connection setup rate: connect + accept + first byte, one connection
//! at a time, with the programs attached (sockets inside the cgroup) or
//! not (outside). Each connection is closed right after its first byte;
//! the close is timed separately, so both the setup rate and the churn
//! rate (setup + close) come out of one loop.
//!
//! Both ends run on the calling thread: on loopback, connect() returns
//! once the handshake is done and the accepted socket is queued, so the
//! loop measures what setting a connection up costs the host (the
//! sockops enrollment, the setsockopt hook, the first redirected byte,
//! the removal at close) without cross-CPU wakeups. The server end
//! closes first, so TIME_WAIT sockets never hold the client's ephemeral
//! ports.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::World;

pub struct SetupBench {
    plain: TcpListener,
    attached: TcpListener,
    sc_only: TcpListener,
}

/// Where the sockets of a setup batch live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupKind {
    /// Outside any attached cgroup: no programs run.
    Plain,
    /// In the `sc` cgroup: every program attached by default.
    Attached,
    /// In the cgroup with the short-circuit only (no policy programs).
    ShortCircuitOnly,
}

impl SetupBench {
    pub fn new(world: &World) -> Result<SetupBench> {
        let plain = TcpListener::bind("127.0.0.10:0").context("bind 127.0.0.10")?;
        let attached = {
            let _in = world
                .cgroup
                .enter()
                .context("entering the benchmark cgroup")?;
            TcpListener::bind("127.0.0.11:0").context("bind 127.0.0.11")?
        };
        let sc_only = {
            let _in = world
                .sc_only_cgroup
                .enter()
                .context("entering the short-circuit-only cgroup")?;
            TcpListener::bind("127.0.0.12:0").context("bind 127.0.0.12")?
        };
        Ok(SetupBench {
            plain,
            attached,
            sc_only,
        })
    }

    /// Sets up and tears down `n` connections. Inside a cgroup, the
    /// process is in it meanwhile (the move in and out is not timed).
    pub fn run(&self, world: &World, kind: SetupKind, n: u64) -> Result<SetupTimes> {
        let (_in, l) = match kind {
            SetupKind::Plain => (None, &self.plain),
            SetupKind::Attached => (
                Some(
                    world
                        .cgroup
                        .enter()
                        .context("entering the benchmark cgroup")?,
                ),
                &self.attached,
            ),
            SetupKind::ShortCircuitOnly => (
                Some(
                    world
                        .sc_only_cgroup
                        .enter()
                        .context("entering the short-circuit-only cgroup")?,
                ),
                &self.sc_only,
            ),
        };
        let to = l.local_addr()?;
        let mut setup = Duration::ZERO;
        let t0 = Instant::now();
        for i in 0..n {
            let t = Instant::now();
            let mut c =
                TcpStream::connect(to).with_context(|| format!("connection {i}: connect"))?;
            c.set_nodelay(true).context("TCP_NODELAY")?;
            let (mut s, _) = l
                .accept()
                .with_context(|| format!("connection {i}: accept"))?;
            s.set_nodelay(true).context("TCP_NODELAY")?;
            c.write_all(&[1])
                .with_context(|| format!("connection {i}: first byte"))?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
                .with_context(|| format!("connection {i}: reading the first byte"))?;
            setup += t.elapsed();
            drop(s);
            drop(c);
        }
        Ok(SetupTimes {
            setup,
            total: t0.elapsed(),
        })
    }
}

/// Times of one batch of connections.
#[derive(Debug, Clone, Copy)]
pub struct SetupTimes {
    /// connect + accept + first byte, summed over the connections.
    pub setup: Duration,
    /// The whole loop: setup and close.
    pub total: Duration,
}
