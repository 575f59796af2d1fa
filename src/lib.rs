//! # meshpath
//!
//! The node-local eBPF datapath of a sidecar-less service mesh, as a
//! library. Load it, attach it to cgroup v2 directories, and TCP between
//! sockets of those cgroups on this host is short-circuited in the kernel:
//! sockops enrolls established sockets into a SOCKHASH and an sk_msg
//! program delivers each message straight into the peer socket.
//!
//! ```no_run
//! use meshpath::{Datapath, DatapathOptions};
//!
//! # fn main() -> meshpath::Result<()> {
//! let dp = Datapath::load(&DatapathOptions::default())?;
//! let _attached = dp.attach_cgroup("/sys/fs/cgroup/unified/pods")?; // detaches on drop
//! // ... workloads in that cgroup talk over loopback TCP ...
//! let c = dp.counters()?;
//! println!("{} messages, {} bytes short-circuited", c.msgs_redirected, c.bytes_redirected);
//! # Ok(()) }
//! ```
//!
//! See ARCHITECTURE.md for how it works and what the kernel does.

#![warn(missing_docs)]

pub mod abi;
mod attach;
pub mod auth;
pub mod bpffs;
pub mod cgroup;
mod conntrack;
mod datapath;
mod diag;
mod error;
pub mod events;
mod maps;
pub mod net;
mod netns;
pub mod policy;
mod probe;
mod ring;
mod skel;
mod stats;
mod sys;
mod xdp;

pub use attach::{CgroupAttachment, Severed};
#[cfg(feature = "tokio")]
pub use auth::AuthSignalStream;
pub use auth::{AuthKey, AuthSignal, AuthSignalReader, CertInfo};
pub use conntrack::TrackedFlow;
pub use datapath::{
    AdoptedSocket, AttachOptions, Datapath, DatapathOptions, EnrollOutcome, EnrollReport, PortSide,
};
pub use error::{Error, Result};
#[cfg(feature = "tokio")]
pub use events::FlowStream;
pub use events::{Flow, FlowKind, FlowReader, ShortCircuitTraffic, TrafficDirection};
pub use maps::sockets::{Direction, SocketEntry, SocketState, TcpReason};
pub use net::IpNet;
pub use probe::{netns_cookie, KernelQuirks};
pub use stats::{Counters, Point, Verdict, Verdicts};
pub use xdp::{XdpAttachment, XdpMode};
