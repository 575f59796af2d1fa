//! Per-CPU counters, summed over CPUs.

use std::collections::BTreeMap;

use crate::abi::{CounterId, PointId, VerdictId};
use crate::error::{Error, Result};
use crate::maps::MapSet;
use crate::sys;

/// Datapath counters since the maps were created (they survive agent
/// restarts when the maps are pinned). Every field is a sum over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Sockets enrolled into the short-circuit.
    pub sockets_enrolled: u64,
    /// Enrolled sockets that have since closed.
    pub sockets_removed: u64,
    /// Enrollments the kernel refused (map full, no memory).
    pub enroll_errors: u64,
    /// Connecting sockets whose peer cannot be on this host.
    pub skipped_nonlocal: u64,
    /// Sockets left on TCP because of a bypassed port.
    pub skipped_bypass: u64,
    /// Sockets of a family other than IPv4/IPv6.
    pub skipped_family: u64,
    /// Messages delivered straight into the peer socket.
    pub msgs_redirected: u64,
    /// Bytes delivered straight into the peer socket.
    pub bytes_redirected: u64,
    /// Messages of enrolled sockets that took the TCP path.
    pub msgs_fallback: u64,
    /// Bytes of enrolled sockets that took the TCP path.
    pub bytes_fallback: u64,
    /// Fallbacks because the peer was not enrolled when data was sent.
    pub fallback_no_peer: u64,
    /// Fallbacks because the direction had already taken TCP.
    pub fallback_sticky: u64,
    /// Fallbacks because the peer asked for TCP (SO_RCVLOWAT).
    pub fallback_peer_optout: u64,
    /// Fallbacks because the datapath was draining.
    pub fallback_draining: u64,
    /// Fallbacks because the socket had no meshpath state.
    pub fallback_no_state: u64,
    /// Sockets kept on TCP because bytes went through TCP before they
    /// were enrolled (TCP Fast Open data).
    pub fallback_sent_before: u64,
    /// Sockets that set SO_RCVLOWAT and were kept on TCP.
    pub rcvlowat_optouts: u64,
    /// Fallbacks because the peer's socket lock was held (a receiver
    /// busy-polling with non-blocking reads).
    pub fallback_peer_busy: u64,
    /// Fallbacks because the peer's direction had gone TCP.
    pub fallback_peer_tcp: u64,
    /// Sockets that left the short-circuit before closing (both
    /// directions on TCP, queues empty).
    pub sockets_evicted: u64,
    /// Established flows reset because policy came to deny them.
    pub policy_resets: u64,
    /// Sockets established before their cgroup was attached, taken over.
    pub sockets_adopted: u64,
    /// Flow events the ring buffer had no room for (the reader was slow).
    pub events_lost: u64,
    /// Packets folded into an earlier flow event (aggregation).
    pub events_aggregated: u64,
    /// `auth` flows that found a live authentication.
    pub auth_ok: u64,
    /// Auth-required signals sent to the agent.
    pub auth_signals: u64,
    /// Signals not sent: one for the same pair went out recently.
    pub auth_signals_deduplicated: u64,
    /// Signals not sent: the rate limit, or a full ring.
    pub auth_signals_dropped: u64,
}

impl Counters {
    /// Sockets currently in the short-circuit (enrolled minus those that
    /// closed or were evicted).
    pub fn sockets_tracked(&self) -> u64 {
        self.sockets_enrolled
            .saturating_sub(self.sockets_removed)
            .saturating_sub(self.sockets_evicted)
    }

    /// Every counter with a stable snake_case name, for exporters
    /// (`sockets_tracked` first, derived).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("sockets_tracked", self.sockets_tracked()),
            ("sockets_enrolled", self.sockets_enrolled),
            ("sockets_removed", self.sockets_removed),
            ("enroll_errors", self.enroll_errors),
            ("skipped_nonlocal", self.skipped_nonlocal),
            ("skipped_bypass", self.skipped_bypass),
            ("skipped_family", self.skipped_family),
            ("msgs_redirected", self.msgs_redirected),
            ("bytes_redirected", self.bytes_redirected),
            ("msgs_fallback", self.msgs_fallback),
            ("bytes_fallback", self.bytes_fallback),
            ("fallback_no_peer", self.fallback_no_peer),
            ("fallback_sticky", self.fallback_sticky),
            ("fallback_peer_optout", self.fallback_peer_optout),
            ("fallback_draining", self.fallback_draining),
            ("fallback_no_state", self.fallback_no_state),
            ("fallback_sent_before", self.fallback_sent_before),
            ("rcvlowat_optouts", self.rcvlowat_optouts),
            ("fallback_peer_busy", self.fallback_peer_busy),
            ("fallback_peer_tcp", self.fallback_peer_tcp),
            ("sockets_evicted", self.sockets_evicted),
            ("policy_resets", self.policy_resets),
            ("sockets_adopted", self.sockets_adopted),
            ("events_lost", self.events_lost),
            ("events_aggregated", self.events_aggregated),
            ("auth_ok", self.auth_ok),
            ("auth_signals", self.auth_signals),
            ("auth_signals_deduplicated", self.auth_signals_deduplicated),
            ("auth_signals_dropped", self.auth_signals_dropped),
        ]
        .into_iter()
    }

    /// The change from `earlier` to `self` (for measuring one run).
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut out = *self;
        macro_rules! sub {
            ($($f:ident),*) => { $( out.$f = self.$f.saturating_sub(earlier.$f); )* };
        }
        sub!(
            sockets_enrolled,
            sockets_removed,
            enroll_errors,
            skipped_nonlocal,
            skipped_bypass,
            skipped_family,
            msgs_redirected,
            bytes_redirected,
            msgs_fallback,
            bytes_fallback,
            fallback_no_peer,
            fallback_sticky,
            fallback_peer_optout,
            fallback_draining,
            fallback_no_state,
            fallback_sent_before,
            rcvlowat_optouts,
            fallback_peer_busy,
            fallback_peer_tcp,
            sockets_evicted
        );
        out
    }
}

/// One line: `name=value` pairs separated by spaces.
impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={v}")?;
        }
        Ok(())
    }
}

/// Where a policy verdict was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Point {
    /// connect() of TCP or connected UDP (cgroup connect4/6).
    Connect,
    /// sendmsg() of unconnected UDP (cgroup sendmsg4/6).
    Sendmsg,
    /// A packet a workload receives (cgroup_skb ingress).
    Ingress,
    /// A packet a workload sends (cgroup_skb egress).
    Egress,
    /// The short-circuit: at enrollment and per message after a change.
    ShortCircuit,
    /// XDP on a device.
    Xdp,
}

/// What a verdict was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Allowed by a rule or the default.
    Allow,
    /// Denied by a rule or the default.
    Deny,
    /// Allowed by an `audit` rule: a would-be drop.
    Audit,
    /// An `auth` rule, not authenticated: dropped.
    AuthRequired,
    /// A truncated or invalid header: dropped.
    Malformed,
    /// A non-first IP fragment: passed (its first fragment is judged).
    Fragment,
    /// Not IPv4 or IPv6: passed.
    NotIp,
    /// connect/sendmsg before the source address was known: judged on
    /// the packets instead.
    NoSource,
}

impl Point {
    /// Every point, in index order.
    pub const ALL: [Point; 6] = [
        Point::Connect,
        Point::Sendmsg,
        Point::Ingress,
        Point::Egress,
        Point::ShortCircuit,
        Point::Xdp,
    ];

    pub(crate) fn index(self) -> u32 {
        (match self {
            Point::Connect => PointId::MP_POINT_CONNECT,
            Point::Sendmsg => PointId::MP_POINT_SENDMSG,
            Point::Ingress => PointId::MP_POINT_INGRESS,
            Point::Egress => PointId::MP_POINT_EGRESS,
            Point::ShortCircuit => PointId::MP_POINT_SHORTCIRCUIT,
            Point::Xdp => PointId::MP_POINT_XDP,
        })
        .0
    }

    /// A stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Point::Connect => "connect",
            Point::Sendmsg => "sendmsg",
            Point::Ingress => "ingress",
            Point::Egress => "egress",
            Point::ShortCircuit => "short_circuit",
            Point::Xdp => "xdp",
        }
    }
}

impl Verdict {
    /// Every verdict, in index order.
    pub const ALL: [Verdict; 8] = [
        Verdict::Allow,
        Verdict::Deny,
        Verdict::Audit,
        Verdict::AuthRequired,
        Verdict::Malformed,
        Verdict::Fragment,
        Verdict::NotIp,
        Verdict::NoSource,
    ];

    fn index(self) -> u32 {
        (match self {
            Verdict::Allow => VerdictId::MP_V_ALLOW,
            Verdict::Deny => VerdictId::MP_V_DENY,
            Verdict::Audit => VerdictId::MP_V_AUDIT,
            Verdict::AuthRequired => VerdictId::MP_V_AUTH_REQUIRED,
            Verdict::Malformed => VerdictId::MP_V_MALFORMED,
            Verdict::Fragment => VerdictId::MP_V_FRAGMENT,
            Verdict::NotIp => VerdictId::MP_V_NOT_IP,
            Verdict::NoSource => VerdictId::MP_V_NO_SOURCE,
        })
        .0
    }

    /// A stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Audit => "audit",
            Verdict::AuthRequired => "auth_required",
            Verdict::Malformed => "malformed",
            Verdict::Fragment => "fragment",
            Verdict::NotIp => "not_ip",
            Verdict::NoSource => "no_source",
        }
    }

    /// Whether traffic with this verdict passes.
    pub fn passes(self) -> bool {
        matches!(
            self,
            Verdict::Allow
                | Verdict::Audit
                | Verdict::Fragment
                | Verdict::NotIp
                | Verdict::NoSource
        )
    }
}

/// Policy verdict counters per point, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdicts {
    counts: BTreeMap<(Point, Verdict), u64>,
}

impl Verdicts {
    /// The count of `verdict` at `point`.
    pub fn get(&self, point: Point, verdict: Verdict) -> u64 {
        self.counts.get(&(point, verdict)).copied().unwrap_or(0)
    }

    /// Everything dropped at `point`.
    pub fn dropped(&self, point: Point) -> u64 {
        Verdict::ALL
            .iter()
            .filter(|v| !v.passes())
            .map(|v| self.get(point, *v))
            .sum()
    }

    /// Every (point, verdict, count).
    pub fn iter(&self) -> impl Iterator<Item = (Point, Verdict, u64)> + '_ {
        self.counts.iter().map(|((p, v), n)| (*p, *v, *n))
    }

    /// The change from `earlier` to `self`.
    pub fn since(&self, earlier: &Verdicts) -> Verdicts {
        Verdicts {
            counts: self
                .counts
                .iter()
                .map(|(k, v)| {
                    (
                        *k,
                        v.saturating_sub(earlier.counts.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        }
    }
}

pub(crate) fn read_verdicts(maps: &MapSet) -> Result<Verdicts> {
    let m = maps
        .get("meshpath_verdicts")
        .ok_or_else(|| Error::invalid("datapath", "verdicts map missing"))?;
    let fd = std::os::fd::AsFd::as_fd(&m.fd);
    let mut out = Verdicts::default();
    for p in Point::ALL {
        for v in Verdict::ALL {
            let idx = p.index() * VerdictId::MP_V_MAX.0 + v.index();
            let per_cpu = sys::lookup_percpu_u64(fd, &idx).map_err(|source| Error::Map {
                map: "meshpath_verdicts",
                op: "reading a verdict counter",
                source,
            })?;
            out.counts.insert(
                (p, v),
                per_cpu.iter().copied().fold(0u64, u64::wrapping_add),
            );
        }
    }
    Ok(out)
}

pub(crate) fn read(maps: &MapSet) -> Result<Counters> {
    let m = maps
        .get("meshpath_counters")
        .ok_or_else(|| Error::invalid("datapath", "counters map missing"))?;
    let fd = std::os::fd::AsFd::as_fd(&m.fd);
    let get = |id: CounterId| -> Result<u64> {
        let v = sys::lookup_percpu_u64(fd, &id.0).map_err(|source| Error::Map {
            map: "meshpath_counters",
            op: "reading a counter",
            source,
        })?;
        Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
    };
    Ok(Counters {
        sockets_enrolled: get(CounterId::MP_C_SOCK_ENROLLED)?,
        sockets_removed: get(CounterId::MP_C_SOCK_REMOVED)?,
        enroll_errors: get(CounterId::MP_C_SOCK_ENROLL_ERR)?,
        skipped_nonlocal: get(CounterId::MP_C_SOCK_SKIP_NONLOCAL)?,
        skipped_bypass: get(CounterId::MP_C_SOCK_SKIP_BYPASS)?,
        skipped_family: get(CounterId::MP_C_SOCK_SKIP_FAMILY)?,
        msgs_redirected: get(CounterId::MP_C_MSG_REDIRECT)?,
        bytes_redirected: get(CounterId::MP_C_BYTES_REDIRECT)?,
        msgs_fallback: get(CounterId::MP_C_MSG_FALLBACK)?,
        bytes_fallback: get(CounterId::MP_C_BYTES_FALLBACK)?,
        fallback_no_peer: get(CounterId::MP_C_FALLBACK_NO_PEER)?,
        fallback_sticky: get(CounterId::MP_C_FALLBACK_STICKY)?,
        fallback_peer_optout: get(CounterId::MP_C_FALLBACK_PEER_OPTOUT)?,
        fallback_draining: get(CounterId::MP_C_FALLBACK_DRAINING)?,
        fallback_no_state: get(CounterId::MP_C_FALLBACK_NO_STATE)?,
        fallback_sent_before: get(CounterId::MP_C_FALLBACK_SENT_BEFORE)?,
        rcvlowat_optouts: get(CounterId::MP_C_SOCKOPT_OPTOUT)?,
        fallback_peer_busy: get(CounterId::MP_C_FALLBACK_PEER_BUSY)?,
        fallback_peer_tcp: get(CounterId::MP_C_FALLBACK_PEER_TCP)?,
        sockets_evicted: get(CounterId::MP_C_SOCK_EVICTED)?,
        policy_resets: get(CounterId::MP_C_POLICY_RESET)?,
        sockets_adopted: get(CounterId::MP_C_SOCK_ADOPTED)?,
        events_lost: get(CounterId::MP_C_EVENTS_LOST)?,
        events_aggregated: get(CounterId::MP_C_EVENTS_AGGREGATED)?,
        auth_ok: get(CounterId::MP_C_AUTH_OK)?,
        auth_signals: get(CounterId::MP_C_AUTH_SIGNALS)?,
        auth_signals_deduplicated: get(CounterId::MP_C_AUTH_SIGNALS_DEDUP)?,
        auth_signals_dropped: get(CounterId::MP_C_AUTH_SIGNALS_DROPPED)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_counter_has_a_field() {
        // iter() lists the derived sockets_tracked plus one per counter.
        assert_eq!(
            Counters::default().iter().count() as u32,
            CounterId::MP_C_MAX.0 + 1
        );
    }

    #[test]
    fn every_point_and_verdict_has_a_variant() {
        assert_eq!(Point::ALL.len() as u32, PointId::MP_POINT_MAX.0);
        assert_eq!(Verdict::ALL.len() as u32, VerdictId::MP_V_MAX.0);
        for (i, p) in Point::ALL.iter().enumerate() {
            assert_eq!(p.index(), i as u32);
        }
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(v.index(), i as u32);
        }
    }

    #[test]
    fn display_is_one_line_of_pairs() {
        let c = Counters {
            sockets_enrolled: 3,
            sockets_removed: 1,
            ..Default::default()
        };
        let s = c.to_string();
        assert!(!s.contains('\n'));
        assert!(s.starts_with("sockets_tracked=2 sockets_enrolled=3 sockets_removed=1 "));
    }

    #[test]
    fn since_subtracts_every_field() {
        let a = Counters {
            msgs_redirected: 10,
            sockets_evicted: 4,
            ..Default::default()
        };
        let b = Counters {
            msgs_redirected: 25,
            sockets_evicted: 5,
            ..Default::default()
        };
        let d = b.since(&a);
        assert_eq!((d.msgs_redirected, d.sockets_evicted), (15, 1));
    }
}
