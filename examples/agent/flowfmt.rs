//! One flow event as one line: human-readable text, or JSON.
//!
//! Both are made from the protobuf message ([`proto::Flow`]), so the agent
//! (`--flows`) and the `flows` client (which includes this file with
//! `#[path]`) print the same lines for the same event.
//!
//! The text line, fields separated by spaces:
//!
//! ```text
//! TIME VERDICT POINT PROTO SRC -> DST [FLAGS] SRC_ID -> DST_ID [DETAILS...]
//! 2026-11-22T10:00:00.123Z DROPPED    ingress       tcp 127.0.0.4:40212 -> 127.0.0.3:5432 [SYN] world -> spiffe://mesh.local/ns/db/sa/postgres policy-denied on lo x3
//! 2026-11-22T10:00:01.004Z REDIRECTED short_circuit tcp 127.0.0.2:40214 -> 127.0.0.3:5432 spiffe://mesh.local/ns/shop/sa/frontend -> spiffe://mesh.local/ns/db/sa/postgres sc-close tx 10 msgs 1000 B, rx 10 msgs 600 B
//! ```
//!
//! TIME is UTC with milliseconds; VERDICT the protobuf verdict
//! (FORWARDED, DROPPED, AUDIT, REDIRECTED); POINT where it was reached
//! (connect, sendmsg, ingress, egress, short_circuit, xdp); FLAGS the TCP
//! flags of the packet, when it has any; an identity is its name (a SPIFFE
//! ID, `host`, `world`) when known, else its number, and both are left out
//! while no policy is set (identity 0). DETAILS, each when it applies:
//! `sc-open`, `sc-close tx M msgs B B, rx M msgs B B` (the short-circuit's
//! traffic), `reset` (a flow reset by policy), the drop reason
//! (`policy-denied`: the default; `policy-deny`: a deny rule;
//! `auth-required`; `invalid-packet`), `rule N` (the deciding rule's index
//! in the config's `policies`), `reply`, `on IFACE` (XDP) and `xN` (N
//! packets aggregated into this event).
//!
//! The JSON line is the protobuf JSON mapping with the proto field names
//! (as `hubble observe -o json` prints Hubble's flows): enums by name,
//! `time` in RFC 3339, 64-bit integers as strings, fields with their
//! default value (0, "", false, empty) left out, `is_reply` and
//! `policy_rule` (wrappers) present whenever set.

use std::fmt::Write as _;

use meshpath::events::proto::{
    self, layer4, DropReason, EnforcementPoint, EventKind, FlowType, IpVersion, TrafficDirection,
};
use prost_types::Timestamp;

/// The human-readable line (no newline).
pub(crate) fn text(f: &proto::Flow) -> String {
    let mut s = String::with_capacity(192);
    s.push_str(&rfc3339(f.time.as_ref(), Some(3)));
    let verdict = proto::Verdict::try_from(f.verdict)
        .map(|v| v.as_str_name())
        .unwrap_or("VERDICT_UNKNOWN");
    let _ = write!(s, " {verdict:<10} {:<13} ", point_name(f.point));
    let (proto_name, ports, flags) = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => (
            "tcp",
            Some((t.source_port, t.destination_port)),
            t.flags.as_ref().map(tcp_flags).unwrap_or_default(),
        ),
        Some(layer4::Protocol::Udp(u)) => (
            "udp",
            Some((u.source_port, u.destination_port)),
            String::new(),
        ),
        Some(layer4::Protocol::IcmPv4(_)) => ("icmp", None, String::new()),
        Some(layer4::Protocol::IcmPv6(_)) => ("icmpv6", None, String::new()),
        None => ("ip", None, String::new()),
    };
    let (src, dst) =
        f.ip.as_ref()
            .map(|ip| (ip.source.as_str(), ip.destination.as_str()))
            .unwrap_or(("?", "?"));
    let _ = match ports {
        Some((sp, dp)) => write!(
            s,
            "{proto_name} {} -> {}",
            host_port(src, sp),
            host_port(dst, dp)
        ),
        None => write!(s, "{proto_name} {src} -> {dst}"),
    };
    if !flags.is_empty() {
        let _ = write!(s, " [{flags}]");
    }
    let (si, di) = (f.source.as_ref(), f.destination.as_ref());
    let known = |e: Option<&proto::Endpoint>| e.is_some_and(|e| e.identity != 0);
    if known(si) || known(di) {
        let _ = write!(s, " {} -> {}", identity_name(si), identity_name(di));
    }
    match EventKind::try_from(f.event_kind) {
        Ok(EventKind::ShortCircuitOpen) => s.push_str(" sc-open"),
        Ok(EventKind::ShortCircuitClose) => {
            s.push_str(" sc-close");
            if let Some(t) = &f.short_circuit {
                let _ = write!(
                    s,
                    " tx {} msgs {} B, rx {} msgs {} B",
                    t.tx_messages, t.tx_bytes, t.rx_messages, t.rx_bytes
                );
            }
        }
        Ok(EventKind::FlowReset) => s.push_str(" reset"),
        _ => {}
    }
    match DropReason::try_from(f.drop_reason_desc) {
        Ok(DropReason::Unknown) => {}
        Ok(DropReason::PolicyDenied) => s.push_str(" policy-denied"),
        Ok(DropReason::PolicyDeny) => s.push_str(" policy-deny"),
        Ok(DropReason::AuthRequired) => s.push_str(" auth-required"),
        Ok(DropReason::InvalidPacketDropped) => s.push_str(" invalid-packet"),
        Err(_) => {
            let _ = write!(s, " drop-reason-{}", f.drop_reason_desc);
        }
    }
    if let Some(rule) = f.policy_rule {
        let _ = write!(s, " rule {rule}");
    }
    if f.is_reply == Some(true) {
        s.push_str(" reply");
    }
    if let Some(i) = &f.interface {
        if i.name.is_empty() {
            let _ = write!(s, " on if{}", i.index);
        } else {
            let _ = write!(s, " on {}", i.name);
        }
    }
    if f.count > 1 {
        let _ = write!(s, " x{}", f.count);
    }
    s
}

/// The name of an endpoint's identity: its SPIFFE ID, `host` or `world`
/// from the labels, else its number.
pub(crate) fn identity_name(e: Option<&proto::Endpoint>) -> String {
    let Some(e) = e else {
        return "0".into();
    };
    for l in &e.labels {
        if let Some(id) = l.strip_prefix("spiffe=") {
            return id.to_string();
        }
        if let Some(r) = l.strip_prefix("reserved:") {
            return r.to_string();
        }
    }
    e.identity.to_string()
}

/// The snake_case name of an enforcement point (as in the metrics'
/// `point` label).
pub(crate) fn point_name(point: i32) -> &'static str {
    match EnforcementPoint::try_from(point) {
        Ok(EnforcementPoint::Connect) => "connect",
        Ok(EnforcementPoint::Sendmsg) => "sendmsg",
        Ok(EnforcementPoint::CgroupIngress) => "ingress",
        Ok(EnforcementPoint::CgroupEgress) => "egress",
        Ok(EnforcementPoint::ShortCircuit) => "short_circuit",
        Ok(EnforcementPoint::Xdp) => "xdp",
        _ => "-",
    }
}

fn host_port(ip: &str, port: u32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn tcp_flags(f: &proto::TcpFlags) -> String {
    [
        (f.syn, "SYN"),
        (f.ack, "ACK"),
        (f.fin, "FIN"),
        (f.rst, "RST"),
        (f.psh, "PSH"),
        (f.urg, "URG"),
        (f.ece, "ECE"),
        (f.cwr, "CWR"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join(",")
}

/// RFC 3339 in UTC with `digits` fractional digits (0-9); with `None` as
/// many as the protobuf JSON mapping uses (0, 3, 6 or 9).
pub(crate) fn rfc3339(ts: Option<&Timestamp>, digits: Option<usize>) -> String {
    let (secs, nanos) = ts.map_or((0, 0), |t| {
        (t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
    });
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    let digits = match digits {
        Some(n) => n.min(9),
        None => match nanos {
            0 => 0,
            n if n % 1_000_000 == 0 => 3,
            n if n % 1_000 == 0 => 6,
            _ => 9,
        },
    };
    if digits > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(&frac[..digits]);
    }
    s.push('Z');
    s
}

/// (year, month, day) of a day number since 1970-01-01 (Howard
/// Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------
// JSON.

/// The JSON line (no newline): the protobuf JSON mapping with proto
/// field names.
pub(crate) fn json(f: &proto::Flow) -> String {
    let mut o = Obj::new();
    if f.time.is_some() {
        o.string("time", &rfc3339(f.time.as_ref(), None));
    }
    o.enumeration("verdict", f.verdict, |v| {
        proto::Verdict::try_from(v).ok().map(|v| v.as_str_name())
    });
    if let Some(ip) = &f.ip {
        let mut i = Obj::new();
        i.string("source", &ip.source);
        i.string("destination", &ip.destination);
        i.enumeration("ipVersion", ip.ip_version, |v| {
            IpVersion::try_from(v).ok().map(|v| v.as_str_name())
        });
        o.raw("IP", &i.finish());
    }
    if let Some(l4) = &f.l4 {
        let mut l = Obj::new();
        match &l4.protocol {
            Some(layer4::Protocol::Tcp(t)) => {
                let mut p = Obj::new();
                p.uint("source_port", t.source_port.into());
                p.uint("destination_port", t.destination_port.into());
                if let Some(fl) = &t.flags {
                    let mut x = Obj::new();
                    for (on, name) in [
                        (fl.fin, "FIN"),
                        (fl.syn, "SYN"),
                        (fl.rst, "RST"),
                        (fl.psh, "PSH"),
                        (fl.ack, "ACK"),
                        (fl.urg, "URG"),
                        (fl.ece, "ECE"),
                        (fl.cwr, "CWR"),
                    ] {
                        if on {
                            x.raw(name, "true");
                        }
                    }
                    p.raw("flags", &x.finish());
                }
                l.raw("TCP", &p.finish());
            }
            Some(layer4::Protocol::Udp(u)) => {
                let mut p = Obj::new();
                p.uint("source_port", u.source_port.into());
                p.uint("destination_port", u.destination_port.into());
                l.raw("UDP", &p.finish());
            }
            Some(layer4::Protocol::IcmPv4(i)) => {
                let mut p = Obj::new();
                p.uint("type", i.r#type.into());
                p.uint("code", i.code.into());
                l.raw("ICMPv4", &p.finish());
            }
            Some(layer4::Protocol::IcmPv6(i)) => {
                let mut p = Obj::new();
                p.uint("type", i.r#type.into());
                p.uint("code", i.code.into());
                l.raw("ICMPv6", &p.finish());
            }
            None => {}
        }
        o.raw("l4", &l.finish());
    }
    for (name, e) in [("source", &f.source), ("destination", &f.destination)] {
        if let Some(e) = e {
            let mut x = Obj::new();
            // uint64 (64-bit identity numbers): a string.
            x.uint64("identity", e.identity);
            if !e.labels.is_empty() {
                let labels: Vec<String> = e.labels.iter().map(|l| quote(l)).collect();
                x.raw("labels", &format!("[{}]", labels.join(",")));
            }
            o.raw(name, &x.finish());
        }
    }
    o.enumeration("Type", f.r#type, |v| {
        FlowType::try_from(v).ok().map(|v| v.as_str_name())
    });
    o.string("node_name", &f.node_name);
    o.enumeration("traffic_direction", f.traffic_direction, |v| {
        TrafficDirection::try_from(v).ok().map(|v| v.as_str_name())
    });
    o.enumeration("drop_reason_desc", f.drop_reason_desc, |v| {
        DropReason::try_from(v).ok().map(|v| v.as_str_name())
    });
    if let Some(r) = f.is_reply {
        o.raw("is_reply", if r { "true" } else { "false" });
    }
    if let Some(i) = &f.interface {
        let mut x = Obj::new();
        x.uint("index", i.index.into());
        x.string("name", &i.name);
        o.raw("interface", &x.finish());
    }
    o.uint64("socket_cookie", f.socket_cookie);
    o.uint64("cgroup_id", f.cgroup_id);
    o.enumeration("event_kind", f.event_kind, |v| {
        EventKind::try_from(v).ok().map(|v| v.as_str_name())
    });
    o.enumeration("point", f.point, |v| {
        EnforcementPoint::try_from(v).ok().map(|v| v.as_str_name())
    });
    o.uint("count", f.count.into());
    if let Some(r) = f.policy_rule {
        o.raw("policy_rule", &r.to_string());
    }
    if let Some(t) = &f.short_circuit {
        let mut x = Obj::new();
        x.uint64("tx_messages", t.tx_messages);
        x.uint64("tx_bytes", t.tx_bytes);
        x.uint64("rx_messages", t.rx_messages);
        x.uint64("rx_bytes", t.rx_bytes);
        o.raw("short_circuit", &x.finish());
    }
    o.finish()
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A JSON object written field by field, in order; fields holding their
/// default value are left out, as in the protobuf JSON mapping.
struct Obj {
    out: String,
    empty: bool,
}

impl Obj {
    fn new() -> Obj {
        Obj {
            out: String::from("{"),
            empty: true,
        }
    }

    fn raw(&mut self, key: &str, json: &str) {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        self.out.push_str(&quote(key));
        self.out.push(':');
        self.out.push_str(json);
    }

    fn string(&mut self, key: &str, v: &str) {
        if !v.is_empty() {
            self.raw(key, &quote(v));
        }
    }

    /// A 32-bit integer: a JSON number.
    fn uint(&mut self, key: &str, v: u64) {
        if v != 0 {
            self.raw(key, &v.to_string());
        }
    }

    /// A 64-bit integer: a string (JSON numbers lose precision past 2^53).
    fn uint64(&mut self, key: &str, v: u64) {
        if v != 0 {
            self.raw(key, &format!("\"{v}\""));
        }
    }

    /// An enum by name (by number when the value is not known).
    fn enumeration(&mut self, key: &str, v: i32, name: impl Fn(i32) -> Option<&'static str>) {
        if v != 0 {
            match name(v) {
                Some(n) => self.raw(key, &quote(n)),
                None => self.raw(key, &v.to_string()),
            }
        }
    }

    fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}
