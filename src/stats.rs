//! Per-CPU counters, summed over CPUs.

use std::collections::BTreeMap;

use crate::abi::{CounterId, PointId, VerdictId};
use crate::error::{Error, Result};
use crate::maps::MapSet;
use crate::sys;

/// Declares the counters once: the struct, its names, `since` and the
/// reader all come from this list, so none can be forgotten in one place.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $field:ident = $id:ident,)*) => {
        /// Datapath counters since the maps were created (they survive agent
        /// restarts when the maps are pinned). Every field is a sum over CPUs.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Counters {
            $($(#[doc = $doc])* pub $field: u64,)*
        }

        impl Counters {
            /// Every counter with a stable snake_case name, for exporters
            /// (`sockets_tracked` first, derived).
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [("sockets_tracked", self.sockets_tracked()), $((stringify!($field), self.$field),)*]
                    .into_iter()
            }

            #[cfg(test)]
            fn filled(v: u64) -> Counters {
                Counters { $($field: v,)* }
            }

            /// The change from `earlier` to `self` (for measuring one run).
            pub fn since(&self, earlier: &Counters) -> Counters {
                Counters {
                    $($field: self.$field.saturating_sub(earlier.$field),)*
                }
            }
        }

        pub(crate) fn read(maps: &MapSet) -> Result<Counters> {
            let m = maps
                .get("meshpath_counters")
                .ok_or_else(|| Error::invalid("datapath", "counters map missing"))?;
            let fd = std::os::fd::AsFd::as_fd(&m.fd);
            let get = |id: CounterId| -> Result<u64> {
                // A counter added after the pinned map was made is past its
                // end: it reads 0 (arrays cannot grow in place).
                if id.0 >= m.facts.max_entries {
                    return Ok(0);
                }
                let v = sys::lookup_percpu_u64(fd, &id.0).map_err(|source| Error::Map {
                    map: "meshpath_counters",
                    op: "reading a counter",
                    source,
                })?;
                Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
            };
            Ok(Counters {
                $($field: get(CounterId::$id)?,)*
            })
        }
    };
}

counters! {
        /// Sockets enrolled into the short-circuit.
        sockets_enrolled = MP_C_SOCK_ENROLLED,
        /// Enrolled sockets that have since closed.
        sockets_removed = MP_C_SOCK_REMOVED,
        /// Enrollments the kernel refused (map full, no memory).
        enroll_errors = MP_C_SOCK_ENROLL_ERR,
        /// Connecting sockets whose peer cannot be on this host.
        skipped_nonlocal = MP_C_SOCK_SKIP_NONLOCAL,
        /// Sockets left on TCP because of a bypassed port.
        skipped_bypass = MP_C_SOCK_SKIP_BYPASS,
        /// Sockets of a family other than IPv4/IPv6.
        skipped_family = MP_C_SOCK_SKIP_FAMILY,
        /// Messages delivered straight into the peer socket.
        msgs_redirected = MP_C_MSG_REDIRECT,
        /// Bytes delivered straight into the peer socket.
        bytes_redirected = MP_C_BYTES_REDIRECT,
        /// Messages of enrolled sockets that took the TCP path.
        msgs_fallback = MP_C_MSG_FALLBACK,
        /// Bytes of enrolled sockets that took the TCP path.
        bytes_fallback = MP_C_BYTES_FALLBACK,
        /// Fallbacks because the peer was not enrolled when data was sent.
        fallback_no_peer = MP_C_FALLBACK_NO_PEER,
        /// Fallbacks because the direction had already taken TCP.
        fallback_sticky = MP_C_FALLBACK_STICKY,
        /// Fallbacks because the peer asked for TCP (SO_RCVLOWAT).
        fallback_peer_optout = MP_C_FALLBACK_PEER_OPTOUT,
        /// Fallbacks because the datapath was draining.
        fallback_draining = MP_C_FALLBACK_DRAINING,
        /// Fallbacks because the socket had no meshpath state.
        fallback_no_state = MP_C_FALLBACK_NO_STATE,
        /// Sockets kept on TCP because bytes went through TCP before they
        /// were enrolled (TCP Fast Open data).
        fallback_sent_before = MP_C_FALLBACK_SENT_BEFORE,
        /// Sockets that set SO_RCVLOWAT and were kept on TCP.
        rcvlowat_optouts = MP_C_SOCKOPT_OPTOUT,
        /// Fallbacks because the peer's socket lock was held (a receiver
        /// busy-polling with non-blocking reads).
        fallback_peer_busy = MP_C_FALLBACK_PEER_BUSY,
        /// Fallbacks because the peer's direction had gone TCP.
        fallback_peer_tcp = MP_C_FALLBACK_PEER_TCP,
        /// Sockets that left the short-circuit before closing (both
        /// directions on TCP, queues empty).
        sockets_evicted = MP_C_SOCK_EVICTED,
        /// Established flows reset because policy came to deny them.
        policy_resets = MP_C_POLICY_RESET,
        /// Sockets established before their cgroup was attached, taken over.
        sockets_adopted = MP_C_SOCK_ADOPTED,
        /// Sends of connections taken over after they were established
        /// that took TCP because redirecting was not yet safe.
        fallback_adopted = MP_C_FALLBACK_ADOPTED,
        /// Flow events the ring buffer had no room for (the reader was slow).
        events_lost = MP_C_EVENTS_LOST,
        /// Packets folded into an earlier flow event (aggregation).
        events_aggregated = MP_C_EVENTS_AGGREGATED,
        /// `auth` flows that found a live authentication.
        auth_ok = MP_C_AUTH_OK,
        /// Auth-required signals sent to the agent.
        auth_signals = MP_C_AUTH_SIGNALS,
        /// Signals not sent: one for the same pair went out recently.
        auth_signals_deduplicated = MP_C_AUTH_SIGNALS_DEDUP,
        /// Signals not sent: the rate limit, or a full ring.
        auth_signals_dropped = MP_C_AUTH_SIGNALS_DROPPED,
        /// `socket()` calls refused to workloads of attached cgroups: raw
        /// IP, packet and AF_XDP sockets (`AttachOptions::raw_sockets`).
        sockets_refused = MP_C_SOCK_REFUSED,
}

impl Counters {
    /// Sockets currently in the short-circuit (enrolled minus those that
    /// closed or were evicted).
    pub fn sockets_tracked(&self) -> u64 {
        self.sockets_enrolled
            .saturating_sub(self.sockets_removed)
            .saturating_sub(self.sockets_evicted)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_every_counter() {
        let d = Counters::filled(7).since(&Counters::filled(3));
        for (name, v) in d.iter().skip(1) {
            assert_eq!(v, 4, "{name}");
        }
    }

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
