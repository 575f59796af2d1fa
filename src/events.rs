//! Flow events: the ring buffer every program reports through, read as a
//! blocking iterator ([`FlowReader`]) or a tokio stream ([`FlowStream`],
//! feature `tokio`), converted to protobuf ([`proto::Flow`], Hubble's
//! field names).
//!
//! The ring buffer has one consumer: one reader per datapath at a time
//! (an agent fans events out to its own clients). Events the ring had no
//! room for are counted in [`Counters::events_lost`](crate::Counters).

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::abi::{
    self, EventType, FlowEvent, PointId, TrafficDirection as RawDirection, VerdictId,
};
use crate::datapath::Datapath;
use crate::error::{Error, Result};
use crate::ring::Ring;
use crate::stats::{Point, Verdict};

/// The protobuf messages of `proto/flow.proto` (prost).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/meshpath.flow.rs"));
}

/// What a flow event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowKind {
    /// A connect or sendmsg verdict.
    Policy,
    /// Packets dropped, audited or needing auth (aggregated: `count`).
    Packet,
    /// A connection entered the short-circuit.
    ShortCircuitOpen,
    /// A connection left the short-circuit (closed or moved to TCP).
    ShortCircuitClose,
    /// An established flow reset because policy came to deny it.
    Reset,
}

/// Which way the traffic went, from the workload's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficDirection {
    /// Not known.
    Unknown,
    /// Into the workload.
    Ingress,
    /// Out of the workload.
    Egress,
}

/// A short-circuited connection's traffic, reported when it closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShortCircuitTraffic {
    /// Messages the connecting end sent straight into its peer.
    pub tx_messages: u64,
    /// Bytes the connecting end sent straight into its peer.
    pub tx_bytes: u64,
    /// Messages the accepting end sent back.
    pub rx_messages: u64,
    /// Bytes the accepting end sent back.
    pub rx_bytes: u64,
}

/// One flow event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Flow {
    /// When it happened.
    pub time: SystemTime,
    /// What it reports.
    pub kind: FlowKind,
    /// The verdict.
    pub verdict: Verdict,
    /// Where the verdict was reached.
    pub point: Point,
    /// Source address.
    pub source: IpAddr,
    /// Destination address.
    pub destination: IpAddr,
    /// Source port (0 for ICMP).
    pub source_port: u16,
    /// Destination port (0 for ICMP).
    pub destination_port: u16,
    /// IANA protocol number (6 TCP, 17 UDP, 1 ICMP and ICMPv6).
    pub protocol: u8,
    /// TCP flags of the (first) packet.
    pub tcp_flags: u8,
    /// Whether the addresses are IPv6 (v4-mapped addresses are not).
    pub ipv6: bool,
    /// Source identity number (0 while no policy is set).
    pub source_identity: u64,
    /// Destination identity number.
    pub destination_identity: u64,
    /// Source identity name, when the datapath knows it.
    pub source_name: Option<String>,
    /// Destination identity name.
    pub destination_name: Option<String>,
    /// Which way it went.
    pub direction: TrafficDirection,
    /// Whether it was judged as a reply in an allowed flow.
    pub is_reply: bool,
    /// Socket cookie (0 for packets).
    pub socket_cookie: u64,
    /// Cgroup id of the socket or process.
    pub cgroup_id: u64,
    /// Interface index for packets seen on a device.
    pub ifindex: u32,
    /// How many packets this event stands for (aggregation), at least 1.
    pub count: u32,
    /// The deciding rule's number in the desired state, when a rule decided.
    pub rule: Option<u32>,
    /// The short-circuit's traffic, on `ShortCircuitClose`.
    pub short_circuit: Option<ShortCircuitTraffic>,
}

fn point_of(raw: u8) -> Point {
    match u32::from(raw) {
        x if x == PointId::MP_POINT_SENDMSG.0 => Point::Sendmsg,
        x if x == PointId::MP_POINT_INGRESS.0 => Point::Ingress,
        x if x == PointId::MP_POINT_EGRESS.0 => Point::Egress,
        x if x == PointId::MP_POINT_SHORTCIRCUIT.0 => Point::ShortCircuit,
        x if x == PointId::MP_POINT_XDP.0 => Point::Xdp,
        _ => Point::Connect,
    }
}

fn verdict_of(raw: u8) -> Verdict {
    match u32::from(raw) {
        x if x == VerdictId::MP_V_DENY.0 => Verdict::Deny,
        x if x == VerdictId::MP_V_AUDIT.0 => Verdict::Audit,
        x if x == VerdictId::MP_V_AUTH_REQUIRED.0 => Verdict::AuthRequired,
        x if x == VerdictId::MP_V_MALFORMED.0 => Verdict::Malformed,
        x if x == VerdictId::MP_V_FRAGMENT.0 => Verdict::Fragment,
        x if x == VerdictId::MP_V_NOT_IP.0 => Verdict::NotIp,
        x if x == VerdictId::MP_V_NO_SOURCE.0 => Verdict::NoSource,
        _ => Verdict::Allow,
    }
}

fn kind_of(raw: u8) -> FlowKind {
    match u32::from(raw) {
        x if x == EventType::MP_EV_PACKET.0 => FlowKind::Packet,
        x if x == EventType::MP_EV_SC_OPEN.0 => FlowKind::ShortCircuitOpen,
        x if x == EventType::MP_EV_SC_CLOSE.0 => FlowKind::ShortCircuitClose,
        x if x == EventType::MP_EV_RESET.0 => FlowKind::Reset,
        _ => FlowKind::Policy,
    }
}

fn addr_of(words: [u32; 4], ipv6: bool) -> IpAddr {
    let ip = abi::words_to_ip(words);
    match (ip, ipv6) {
        // An AF_INET6 socket talking v4-mapped: keep the IPv6 form.
        (IpAddr::V4(v4), true) => IpAddr::V6(v4.to_ipv6_mapped()),
        (ip, _) => ip,
    }
}

impl Flow {
    fn from_raw(e: &FlowEvent, time: SystemTime) -> Flow {
        let kind = kind_of(e.r#type);
        let direction = match u32::from(e.direction) {
            x if x == RawDirection::MP_TRAFFIC_INGRESS.0 => TrafficDirection::Ingress,
            x if x == RawDirection::MP_TRAFFIC_EGRESS.0 => TrafficDirection::Egress,
            _ => TrafficDirection::Unknown,
        };
        Flow {
            time,
            kind,
            verdict: verdict_of(e.verdict),
            point: point_of(e.point),
            source: addr_of(e.saddr, e.ipv6 != 0),
            destination: addr_of(e.daddr, e.ipv6 != 0),
            source_port: e.sport,
            destination_port: e.dport,
            protocol: e.proto,
            tcp_flags: e.tcp_flags,
            ipv6: e.ipv6 != 0,
            source_identity: e.src_identity,
            destination_identity: e.dst_identity,
            source_name: None,
            destination_name: None,
            direction,
            is_reply: e.is_reply != 0,
            socket_cookie: e.cookie,
            cgroup_id: e.cgroup_id,
            ifindex: e.ifindex,
            count: e.count.max(1),
            rule: (e.matched != 0).then_some(e.rule),
            short_circuit: (kind == FlowKind::ShortCircuitClose).then_some(ShortCircuitTraffic {
                tx_messages: e.tx_msgs,
                tx_bytes: e.tx_bytes,
                rx_messages: e.rx_msgs,
                rx_bytes: e.rx_bytes,
            }),
        }
    }

    /// The protobuf form (Hubble's field names), for `node_name`.
    pub fn to_proto(&self, node_name: &str) -> proto::Flow {
        use crate::stats::Verdict as MV;
        use proto::*;
        let since = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let endpoint = |id: u64, name: &Option<String>| {
            let mut labels = Vec::new();
            match id {
                1 => labels.push("reserved:host".to_string()),
                2 => labels.push("reserved:world".to_string()),
                _ => {}
            }
            if let Some(n) = name {
                if id > 2 {
                    labels.push(format!("spiffe={n}"));
                }
            }
            Endpoint {
                identity: id,
                labels,
            }
        };
        let l4 = match self.protocol {
            6 => Some(layer4::Protocol::Tcp(Tcp {
                source_port: self.source_port.into(),
                destination_port: self.destination_port.into(),
                flags: Some(TcpFlags {
                    fin: self.tcp_flags & 0x01 != 0,
                    syn: self.tcp_flags & 0x02 != 0,
                    rst: self.tcp_flags & 0x04 != 0,
                    psh: self.tcp_flags & 0x08 != 0,
                    ack: self.tcp_flags & 0x10 != 0,
                    urg: self.tcp_flags & 0x20 != 0,
                    ece: self.tcp_flags & 0x40 != 0,
                    cwr: self.tcp_flags & 0x80 != 0,
                }),
            })),
            17 => Some(layer4::Protocol::Udp(Udp {
                source_port: self.source_port.into(),
                destination_port: self.destination_port.into(),
            })),
            1 if self.ipv6 => Some(layer4::Protocol::IcmPv6(IcmPv6::default())),
            1 => Some(layer4::Protocol::IcmPv4(IcmPv4::default())),
            _ => None,
        };
        let verdict = match self.verdict {
            MV::Allow | MV::Fragment | MV::NotIp | MV::NoSource => {
                if self.kind == FlowKind::ShortCircuitOpen
                    || self.kind == FlowKind::ShortCircuitClose
                {
                    proto::Verdict::Redirected
                } else {
                    proto::Verdict::Forwarded
                }
            }
            MV::Audit => proto::Verdict::Audit,
            MV::Deny | MV::AuthRequired | MV::Malformed => proto::Verdict::Dropped,
        };
        let verdict = if self.kind == FlowKind::Reset {
            proto::Verdict::Dropped
        } else {
            verdict
        };
        let drop_reason = match self.verdict {
            MV::Deny if self.rule.is_some() => DropReason::PolicyDeny,
            MV::Deny => DropReason::PolicyDenied,
            MV::AuthRequired => DropReason::AuthRequired,
            MV::Malformed => DropReason::InvalidPacketDropped,
            _ => DropReason::Unknown,
        };
        proto::Flow {
            time: Some(prost_types::Timestamp {
                seconds: since.as_secs() as i64,
                nanos: since.subsec_nanos() as i32,
            }),
            verdict: verdict as i32,
            ip: Some(Ip {
                source: self.source.to_string(),
                destination: self.destination.to_string(),
                ip_version: if self.ipv6 {
                    IpVersion::IPv6
                } else {
                    IpVersion::IPv4
                } as i32,
            }),
            l4: l4.map(|p| Layer4 { protocol: Some(p) }),
            source: Some(endpoint(self.source_identity, &self.source_name)),
            destination: Some(endpoint(self.destination_identity, &self.destination_name)),
            // Hubble's convention: a verdict on a packet is L3_L4 (even
            // when the receiving socket is known, as at cgroup ingress);
            // connect/sendmsg and short-circuit events are socket-level.
            r#type: if self.kind == FlowKind::Packet {
                FlowType::L3L4
            } else {
                FlowType::Sock
            } as i32,
            node_name: node_name.to_string(),
            traffic_direction: match self.direction {
                crate::events::TrafficDirection::Ingress => proto::TrafficDirection::Ingress,
                crate::events::TrafficDirection::Egress => proto::TrafficDirection::Egress,
                crate::events::TrafficDirection::Unknown => proto::TrafficDirection::Unknown,
            } as i32,
            drop_reason_desc: drop_reason as i32,
            is_reply: Some(self.is_reply),
            interface: (self.ifindex != 0).then(|| NetworkInterface {
                index: self.ifindex,
                name: interface_name(self.ifindex).unwrap_or_default(),
            }),
            socket_cookie: self.socket_cookie,
            cgroup_id: self.cgroup_id,
            event_kind: match self.kind {
                FlowKind::Policy => EventKind::PolicyVerdict,
                FlowKind::Packet => EventKind::PacketVerdict,
                FlowKind::ShortCircuitOpen => EventKind::ShortCircuitOpen,
                FlowKind::ShortCircuitClose => EventKind::ShortCircuitClose,
                FlowKind::Reset => EventKind::FlowReset,
            } as i32,
            point: match self.point {
                Point::Connect => EnforcementPoint::Connect,
                Point::Sendmsg => EnforcementPoint::Sendmsg,
                Point::Ingress => EnforcementPoint::CgroupIngress,
                Point::Egress => EnforcementPoint::CgroupEgress,
                Point::ShortCircuit => EnforcementPoint::ShortCircuit,
                Point::Xdp => EnforcementPoint::Xdp,
            } as i32,
            count: self.count,
            policy_rule: self.rule,
            short_circuit: self.short_circuit.map(|t| ShortCircuit {
                tx_messages: t.tx_messages,
                tx_bytes: t.tx_bytes,
                rx_messages: t.rx_messages,
                rx_bytes: t.rx_bytes,
            }),
        }
    }
}

fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Reads flow events. Created by [`Datapath::flows`]; iterating blocks
/// until an event arrives.
pub struct FlowReader {
    ring: Ring<FlowEvent>,
    dp: Datapath,
    names: HashMap<u64, Option<String>>,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, in ns, when the reader was made.
    wall_offset_ns: i128,
}

impl std::fmt::Debug for FlowReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowReader")
            .field("queued", &self.ring.queued())
            .finish()
    }
}

fn clock_ns(clock: nix::time::ClockId) -> i128 {
    nix::time::clock_gettime(clock)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
        .unwrap_or(0)
}

impl Datapath {
    /// Starts reading flow events (and turns their reporting on). One
    /// reader at a time: a second call fails until the first is dropped.
    pub fn flows(&self) -> Result<FlowReader> {
        if self.inner.flow_reader.swap(true, Ordering::AcqRel) {
            return Err(Error::invalid(
                "flow reader",
                "another reader is open on this datapath (the ring buffer has one consumer)",
            ));
        }
        let made = (|| {
            let m = self
                .maps()
                .get("meshpath_events_v2")
                .ok_or_else(|| Error::invalid("datapath", "events map missing"))?;
            let ring = Ring::new("meshpath_events_v2", m.fd.as_fd())?;
            let wall_offset_ns = clock_ns(nix::time::ClockId::CLOCK_REALTIME)
                - clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
            Ok(FlowReader {
                ring,
                dp: self.clone(),
                names: HashMap::new(),
                wall_offset_ns,
            })
        })();
        match made {
            Ok(r) => {
                self.set_flow_events(true)?;
                Ok(r)
            }
            Err(e) => {
                self.inner.flow_reader.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Turns the reporting of flow events on or off.
    pub fn set_flow_events(&self, on: bool) -> Result<()> {
        self.update_settings(|s| s.events = u8::from(on))
    }
}

impl FlowReader {
    /// The next event, waiting up to `timeout` (`None` when none came).
    pub fn poll(&mut self, timeout: Duration) -> Result<Option<Flow>> {
        Ok(self.ring.poll(timeout)?.map(|ev| self.flow_of(&ev)))
    }

    /// The next event already in the ring, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Flow>> {
        Ok(self.ring.try_next()?.map(|ev| self.flow_of(&ev)))
    }

    /// Drops the events waiting in the ring (written before this reader
    /// was made, for instance, or left unread by an earlier reader of a
    /// pinned ring); returns how many.
    pub fn discard_pending(&mut self) -> Result<usize> {
        self.ring.discard()
    }

    fn flow_of(&mut self, ev: &FlowEvent) -> Flow {
        let t = self.wall_offset_ns + i128::from(ev.time_ns);
        let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(t.max(0) as u64);
        let mut f = Flow::from_raw(ev, time);
        f.source_name = self.name(f.source_identity);
        f.destination_name = self.name(f.destination_identity);
        f
    }

    fn name(&mut self, id: u64) -> Option<String> {
        match id {
            0 => None,
            1 => Some("host".into()),
            2 => Some("world".into()),
            _ => {
                // A number's name never changes (it is derived from it).
                if let Some(Some(n)) = self.names.get(&id) {
                    return Some(n.clone());
                }
                let n = self.dp.identity_name(id).ok().flatten();
                self.names.insert(id, n.clone());
                n
            }
        }
    }

    /// The fd that becomes readable when events arrive (epoll).
    pub fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl Iterator for FlowReader {
    type Item = Result<Flow>;

    /// Blocks until the next event.
    fn next(&mut self) -> Option<Result<Flow>> {
        loop {
            match self.poll(Duration::from_secs(3600)) {
                Ok(Some(f)) => return Some(Ok(f)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Drop for FlowReader {
    fn drop(&mut self) {
        let _ = self.dp.set_flow_events(false);
        self.dp.inner.flow_reader.store(false, Ordering::Release);
    }
}

/// Flow events as a tokio `Stream` (feature `tokio`).
#[cfg(feature = "tokio")]
pub struct FlowStream {
    // Deregistered (dropped) before the reader closes the fd.
    fd: tokio::io::unix::AsyncFd<RawFd>,
    reader: FlowReader,
}

#[cfg(feature = "tokio")]
impl FlowStream {
    /// Wraps a reader; must be called inside a tokio runtime.
    pub fn new(reader: FlowReader) -> Result<FlowStream> {
        let fd = crate::ring::register(&reader.ring)?;
        Ok(FlowStream { fd, reader })
    }
}

#[cfg(feature = "tokio")]
impl futures_core::Stream for FlowStream {
    type Item = Result<Flow>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Flow>>> {
        let this = self.get_mut();
        crate::ring::poll_ring(&mut this.reader.ring, &this.fd, cx)
            .map(|o| o.map(|r| r.map(|ev| this.reader.flow_of(&ev))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> FlowEvent {
        let mut e = FlowEvent {
            saddr: abi::ip_to_words("127.0.0.2".parse().unwrap()),
            daddr: abi::ip_to_words("127.0.0.3".parse().unwrap()),
            sport: 40000,
            dport: 5432,
            proto: 6,
            tcp_flags: 0x02,
            src_identity: 300,
            dst_identity: 400,
            count: 3,
            rule: 7,
            matched: 1,
            r#type: EventType::MP_EV_PACKET.0 as u8,
            verdict: VerdictId::MP_V_DENY.0 as u8,
            point: PointId::MP_POINT_INGRESS.0 as u8,
            direction: RawDirection::MP_TRAFFIC_INGRESS.0 as u8,
            ..Default::default()
        };
        e.ifindex = 1;
        e
    }

    #[test]
    fn raw_events_become_flows() {
        let f = Flow::from_raw(&raw(), SystemTime::UNIX_EPOCH);
        assert_eq!(f.kind, FlowKind::Packet);
        assert_eq!(f.verdict, Verdict::Deny);
        assert_eq!(f.point, Point::Ingress);
        assert_eq!(f.source, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!((f.source_port, f.destination_port), (40000, 5432));
        assert_eq!(f.rule, Some(7));
        assert_eq!(f.count, 3);
        assert_eq!(f.direction, TrafficDirection::Ingress);
        assert!(f.short_circuit.is_none());
    }

    #[test]
    fn protobuf_uses_hubble_names_and_values() {
        use prost::Message;
        let mut f = Flow::from_raw(&raw(), SystemTime::UNIX_EPOCH + Duration::from_secs(5));
        f.source_name = Some("spiffe://mesh.local/a".into());
        let p = f.to_proto("node-a");
        assert_eq!(p.verdict, proto::Verdict::Dropped as i32);
        assert_eq!(p.drop_reason_desc, 181, "POLICY_DENY: a deny rule matched");
        assert_eq!(p.traffic_direction, 1, "INGRESS");
        assert_eq!(p.node_name, "node-a");
        assert_eq!(p.time.as_ref().unwrap().seconds, 5);
        assert_eq!(
            p.source.as_ref().unwrap().labels,
            vec!["spiffe=spiffe://mesh.local/a"]
        );
        match p.l4.as_ref().unwrap().protocol.as_ref().unwrap() {
            proto::layer4::Protocol::Tcp(t) => {
                assert_eq!(t.destination_port, 5432);
                assert!(t.flags.as_ref().unwrap().syn);
            }
            other => panic!("{other:?}"),
        }
        // Round trip through the length-delimited encoding the agent uses.
        let bytes = p.encode_length_delimited_to_vec();
        assert_eq!(proto::Flow::decode_length_delimited(&bytes[..]).unwrap(), p);
        let mut no_rule = f.clone();
        no_rule.rule = None;
        assert_eq!(
            no_rule.to_proto("n").drop_reason_desc,
            133,
            "POLICY_DENIED: the default"
        );
    }
}
