//! The flow pump: the one reader of the datapath's flow events
//! (`Datapath::flows`), on its own thread, fanning each event out to
//! stdout (`--flows`) and to the clients of `--flow-socket`.
//!
//! Reading never waits for a consumer: the socket's clients each have a
//! bounded queue (see `flow_socket`), and stdout is written by its own
//! thread from a bounded queue (see `output`): flow lines that do not fit
//! because stdout's reader is slow or stopped are dropped and counted
//! (`stdout_dropped`). If writing stdout fails (closed pipe) the agent
//! stops printing flows, says so, and keeps serving the socket.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use meshpath::{Datapath, FlowReader};
use prost::Message as _;

use crate::cli::FlowFormat;
use crate::flow_socket::{Hub, Message};
use crate::flowfmt;
use crate::output::{flow_lines, warn, Flowed};

/// How long one wait for events lasts (and so how soon the pump stops).
const POLL: Duration = Duration::from_millis(100);

/// Events handled per batch (one stdout write, one flush).
const BATCH: usize = 512;

/// What the pump and the flow socket count, for the metrics.
#[derive(Debug, Default)]
pub(crate) struct FlowStats {
    /// Flow events read from the ring buffer.
    pub(crate) read: AtomicU64,
    /// Flow lines not printed on stdout (`--flows`) because its reader
    /// was behind by a full queue.
    pub(crate) stdout_dropped: AtomicU64,
    /// Flow socket clients connected now.
    pub(crate) socket_clients: AtomicU64,
    /// Flow socket clients accepted since start.
    pub(crate) socket_connections: AtomicU64,
    /// Clients refused because [`crate::flow_socket::MAX_CLIENTS`] were
    /// connected.
    pub(crate) socket_refused: AtomicU64,
    /// Messages dropped for a client whose queue was full (summed over
    /// clients).
    pub(crate) socket_dropped: AtomicU64,
}

/// The running pump; [`FlowPump::stop`] ends it after reading what is
/// left in the ring.
pub(crate) struct FlowPump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Where the pump sends events.
pub(crate) struct Sinks {
    /// Print on stdout, in this format.
    pub(crate) print: Option<FlowFormat>,
    /// Serve to the flow socket's clients.
    pub(crate) socket: Option<Arc<Hub>>,
    /// `node_name` of the protobuf messages.
    pub(crate) node: String,
}

impl FlowPump {
    /// Opens the datapath's flow reader (which turns flow events on) and
    /// starts the pump thread.
    pub(crate) fn start(
        dp: &Datapath,
        sinks: Sinks,
        stats: Arc<FlowStats>,
    ) -> anyhow::Result<Self> {
        let reader = dp.flows().context("opening the flow event reader")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("flows".into())
            .spawn(move || pump(reader, &sinks, &stats, &flag))
            .context("starting the flow thread")?;
        Ok(FlowPump {
            stop,
            thread: Some(thread),
        })
    }

    /// Reads what is left, then stops (and closes the reader, which turns
    /// flow events off).
    pub(crate) fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FlowPump {
    fn drop(&mut self) {
        self.halt();
    }
}

fn pump(mut reader: FlowReader, sinks: &Sinks, stats: &FlowStats, stop: &AtomicBool) {
    let mut print = sinks.print;
    let mut lines = String::new();
    let mut printed = 0u64;
    let mut warned_drop = false;
    let mut failures = 0u32;
    // Batches read after stop: bounded, should traffic not stop.
    let mut drained = 0;
    loop {
        // Checked before waiting: after stop, one more pass drains the ring.
        let stopping = stop.load(Ordering::Acquire);
        let first = if stopping {
            reader.try_next()
        } else {
            reader.poll(POLL)
        };
        let mut next = match first {
            Ok(f) => f,
            Err(e) => {
                failures += 1;
                if failures <= 3 {
                    warn(&format!("reading flow events: {e}"));
                }
                if stopping {
                    return;
                }
                std::thread::sleep(POLL);
                continue;
            }
        };
        let mut n = 0;
        while let Some(flow) = next {
            stats.read.fetch_add(1, Ordering::Relaxed);
            let want_socket = sinks.socket.as_ref().filter(|h| h.has_clients());
            if print.is_some() || want_socket.is_some() {
                let msg = flow.to_proto(&sinks.node);
                match print {
                    Some(FlowFormat::Text) => lines.push_str(&flowfmt::text(&msg)),
                    Some(FlowFormat::Json) => lines.push_str(&flowfmt::json(&msg)),
                    None => {}
                }
                if print.is_some() {
                    lines.push('\n');
                    printed += 1;
                }
                if let Some(hub) = want_socket {
                    let bytes: Message = msg.encode_length_delimited_to_vec().into();
                    hub.broadcast(&bytes);
                }
            }
            n += 1;
            if n >= BATCH {
                break;
            }
            next = reader.try_next().unwrap_or(None);
        }
        if !lines.is_empty() {
            match flow_lines(std::mem::take(&mut lines)) {
                Flowed::Queued => {}
                Flowed::Dropped => {
                    stats.stdout_dropped.fetch_add(printed, Ordering::Relaxed);
                    if !warned_drop {
                        warned_drop = true;
                        warn(&format!(
                            "flows: stdout is not being read fast enough: flow lines beyond a \
                             {} MiB queue are dropped and counted \
                             (meshpath_flow_stdout_dropped_total, flows_stdout_dropped in the \
                             counters line)",
                            crate::output::FLOW_QUEUE_BYTES >> 20
                        ));
                    }
                }
                Flowed::Failed(e) => {
                    warn(&format!(
                        "writing flows to stdout: {e}: no longer printing them"
                    ));
                    print = None;
                }
            }
            printed = 0;
        }
        if stopping {
            drained += 1;
            if n == 0 || drained >= 64 {
                return;
            }
        }
    }
}
