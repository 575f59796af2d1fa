//! The packet hooks' connection tracking (`bpf/lib/ct.h`), read back:
//! which flows policy allowed and that replies may answer.

use std::net::SocketAddr;
use std::time::Duration;

use crate::abi::{self, CtFlags, CtKey, CtValue};
use crate::datapath::Datapath;
use crate::error::Result;

/// One tracked flow, as the packet that started it had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrackedFlow {
    /// Where its first packet came from (ICMP echo: port = identifier).
    pub source: SocketAddr,
    /// Where it went (ICMP: port 0).
    pub destination: SocketAddr,
    /// IANA protocol number (6 TCP, 17 UDP, 1 ICMP for ICMP and ICMPv6).
    pub protocol: u8,
    /// How long it lives without another packet (zero: expired, waiting to
    /// be replaced or evicted).
    pub expires_in: Duration,
    /// A reply was seen.
    pub replied: bool,
    /// TCP FIN or RST seen.
    pub closing: bool,
}

impl TrackedFlow {
    fn of(k: &CtKey, v: &CtValue, now_ns: u64) -> TrackedFlow {
        let flag = |f: CtFlags| v.flags & f.0 as u8 != 0;
        TrackedFlow {
            source: SocketAddr::new(abi::words_to_ip(k.saddr), k.sport),
            destination: SocketAddr::new(abi::words_to_ip(k.daddr), k.dport),
            protocol: k.proto,
            expires_in: Duration::from_nanos(v.expires_ns.saturating_sub(now_ns)),
            replied: flag(CtFlags::MP_CT_F_REPLIED),
            closing: flag(CtFlags::MP_CT_F_CLOSING),
        }
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
    t.unwrap_or(0)
}

impl Datapath {
    /// Every flow in the connection-tracking map, expired ones included
    /// (until the LRU evicts them or their flow starts again).
    pub fn conntrack(&self) -> Result<Vec<TrackedFlow>> {
        let now = monotonic_ns();
        Ok(self
            .maps()
            .typed::<CtKey, CtValue>("meshpath_ct_v2")?
            .entries()?
            .iter()
            .map(|(k, v)| TrackedFlow::of(k, v, now))
            .collect())
    }
}
