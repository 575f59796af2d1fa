//! Observability, wired from the command line: `--flows[=json]`,
//! `--flow-socket [PATH]` and `--metrics ADDR:PORT` (with `--node`).
//!
//! Sockets and ports are bound before the datapath is loaded (a taken
//! port or a bad path fails fast); the flow reader opens and the threads
//! start before any policy is applied or cgroup attached, so no event of
//! the agent's run is missed.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use meshpath::Datapath;

use crate::cli::{Args, FlowFormat};
use crate::flow_socket::FlowSocket;
use crate::flows::{FlowPump, FlowStats, Sinks};
use crate::metrics::MetricsServer;

/// What the agent itself counts (beyond the flows), for the metrics and
/// the counters line.
#[derive(Debug, Default)]
pub(crate) struct AgentStats {
    /// Programs attached again after they were detached from under the
    /// agent.
    pub(crate) reattached: AtomicU64,
    /// Metrics connections closed at their deadline (slow or idle
    /// clients).
    pub(crate) metrics_deadline: AtomicU64,
    /// Metrics connections closed to make room for new ones (the oldest
    /// unanswered first).
    pub(crate) metrics_evicted: AtomicU64,
}

/// Everything `--flows`, `--flow-socket` and `--metrics` run. Dropping it
/// stops them all and removes the flow socket file.
pub(crate) struct Observability {
    // Field order is drop order: the pump first (it feeds the socket).
    pump: Option<FlowPump>,
    socket: Option<FlowSocket>,
    metrics: Option<MetricsServer>,
    stats: Arc<FlowStats>,
    agent: Arc<AgentStats>,
    print: Option<FlowFormat>,
}

impl Observability {
    /// Binds the flow socket and the metrics port.
    pub(crate) fn bind(args: &Args) -> anyhow::Result<Observability> {
        let stats = Arc::new(FlowStats::default());
        let socket = args
            .flow_socket
            .as_deref()
            .map(|p| FlowSocket::bind(p, stats.clone()))
            .transpose()?;
        let metrics = args.metrics.map(MetricsServer::bind).transpose()?;
        Ok(Observability {
            pump: None,
            socket,
            metrics,
            stats,
            agent: Arc::new(AgentStats::default()),
            print: args.flows,
        })
    }

    /// The agent's own counters.
    pub(crate) fn agent_stats(&self) -> Arc<AgentStats> {
        self.agent.clone()
    }

    /// The flows' counters.
    pub(crate) fn flow_stats(&self) -> &FlowStats {
        &self.stats
    }

    /// Opens the flow reader (when flows are printed or served) and
    /// starts serving.
    pub(crate) fn start(&mut self, dp: &Datapath, args: &Args) -> anyhow::Result<()> {
        if let Some(m) = &mut self.metrics {
            m.start(dp, self.stats.clone(), self.agent.clone())?;
        }
        if self.print.is_some() || self.socket.is_some() {
            let sinks = Sinks {
                print: self.print,
                socket: self.socket.as_ref().map(FlowSocket::hub),
                node: args.node.clone().unwrap_or_else(hostname),
            };
            self.pump = Some(FlowPump::start(dp, sinks, self.stats.clone())?);
        }
        if let Some(s) = &mut self.socket {
            s.start()?;
        }
        Ok(())
    }

    /// What the ready line adds: `; flows on stdout (json); flow socket
    /// PATH; metrics on http://ADDR/metrics`.
    pub(crate) fn describe(&self) -> String {
        let mut out = String::new();
        match self.print {
            Some(FlowFormat::Text) => out.push_str("; flows on stdout"),
            Some(FlowFormat::Json) => out.push_str("; flows on stdout (json)"),
            None => {}
        }
        if let Some(s) = &self.socket {
            let _ = write!(out, "; flow socket {}", s.path().display());
        }
        if let Some(m) = &self.metrics {
            let _ = write!(out, "; metrics on http://{}/metrics", m.addr());
        }
        out
    }

    /// Prints what is left in the flow ring, then stops everything.
    pub(crate) fn stop(mut self) {
        if let Some(p) = self.pump.take() {
            p.stop();
        }
        drop(self);
    }
}

/// The node name when `--node` is not given: the hostname.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
