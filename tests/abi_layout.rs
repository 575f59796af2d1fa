//! The C/Rust boundary, checked without privileges: every object's BTF
//! agrees with the Rust types generated from it, and no struct shared with
//! Rust has an implicit hole (hash keys must never carry uninitialised
//! bytes). Cilium's alignchecker idea, on meshpath's own objects.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;

use libbpf_rs::btf::types::{MemberAttr, Struct};
use libbpf_rs::btf::Btf;
use libbpf_rs::{AsRawLibbpf, HasSize};
use meshpath::abi::{LpmKey, Settings, SockEntry, SockKey, SockState};

fn objects() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("MESHPATH_BPF_OBJ_DIR"));
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.o"))
        .collect();
    out.sort();
    assert!(
        out.len() >= 3,
        "expected the compiled objects in {}",
        dir.display()
    );
    out
}

/// (name, offset in bytes, size in bytes) of a member.
type Member = (String, usize, usize);

/// The struct's size and its members, in BTF order.
fn layout(btf: &Btf<'_>, name: &str) -> Option<(usize, Vec<Member>)> {
    let s: Struct<'_> = btf.type_by_name(name)?;
    let size = s.size();
    let mut members = Vec::new();
    for m in s.iter() {
        let off_bits = match m.attr {
            MemberAttr::Normal { offset } => offset,
            MemberAttr::BitField { .. } => panic!("{name} has a bitfield: not allowed in the ABI"),
        };
        assert_eq!(off_bits % 8, 0, "{name}: member not byte aligned");
        // SAFETY: the raw btf pointer is valid for the life of `btf`.
        let msize =
            unsafe { libbpf_sys::btf__resolve_size(btf.as_libbpf_object().as_ptr(), m.ty.into()) };
        assert!(msize > 0, "{name}: cannot size a member");
        let mname = m
            .name
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        members.push((mname, off_bits as usize / 8, msize as usize));
    }
    Some((size, members))
}

macro_rules! rust_layout {
    ($t:ty, [$($f:ident),* $(,)?]) => {{
        let mut m = BTreeMap::new();
        $( m.insert(stringify!($f).trim_start_matches("r#").to_string(), offset_of!($t, $f)); )*
        (size_of::<$t>(), m)
    }};
}

fn check(c_name: &str, rust: (usize, BTreeMap<String, usize>)) {
    let mut seen = 0;
    for obj in objects() {
        let btf = Btf::from_path(&obj).unwrap_or_else(|e| panic!("BTF of {}: {e}", obj.display()));
        let Some((size, members)) = layout(&btf, c_name) else {
            continue;
        };
        seen += 1;
        let o = obj.file_name().unwrap().to_string_lossy();
        assert_eq!(
            size, rust.0,
            "{c_name} in {o}: C size {size}, Rust size {}",
            rust.0
        );
        // No implicit padding: members tile the struct exactly.
        let mut end = 0;
        for (name, off, msize) in &members {
            assert_eq!(
                *off, end,
                "{c_name} in {o}: implicit hole before `{name}` ({end}..{off})"
            );
            end = off + msize;
            let r = rust
                .1
                .get(name)
                .unwrap_or_else(|| panic!("{c_name}.{name} missing in Rust"));
            assert_eq!(
                r, off,
                "{c_name}.{name} in {o}: C offset {off}, Rust offset {r}"
            );
        }
        assert_eq!(
            end, size,
            "{c_name} in {o}: implicit tail padding ({end}..{size})"
        );
        assert_eq!(
            members.len(),
            rust.1.len(),
            "{c_name} in {o}: member count differs"
        );
    }
    assert!(seen > 0, "{c_name} is in no object's BTF");
}

#[test]
fn sock_key_layout() {
    check(
        "mp_sock_key",
        rust_layout!(
            SockKey,
            [local_ip, remote_ip, local_port, remote_port, netns]
        ),
    );
}

#[test]
fn sock_entry_layout() {
    check(
        "mp_sock_entry",
        rust_layout!(
            SockEntry,
            [cookie, kaddr, flags, pad, rx_msgs, rx_bytes, adopted_ns]
        ),
    );
}

#[test]
fn sock_state_layout() {
    check(
        "mp_sock_state",
        rust_layout!(
            SockState,
            [
                cookie,
                msgs_redir,
                bytes_redir,
                msgs_tcp,
                bytes_tcp,
                enrolled,
                mode,
                reason,
                busy_score,
                evicted,
                client,
                verdict,
                tracked,
                rcv_nxt0,
                policy_gen,
                auth_expiry_ns,
                adopted,
                adopt_tries,
                pad0,
                pad1
            ]
        ),
    );
}

#[test]
fn settings_layout() {
    check(
        "mp_settings",
        rust_layout!(
            Settings,
            [
                abi_version,
                draining,
                shortcircuit,
                optout_rcvlowat,
                busy_detect,
                policy,
                events,
                verdict_cache,
                reset_by_diag,
                pad1,
                event_interval_ms,
                auth_signal_interval_ms,
                auth_signal_rate,
                woken_wake_fn,
                adopt_settle_ms,
                pad2
            ]
        ),
    );
}

#[test]
fn enroll_record_layout() {
    check(
        "mp_enroll_record",
        rust_layout!(
            meshpath::abi::EnrollRecord,
            [key, outcome, mode, flags, cookie]
        ),
    );
}

#[test]
fn lpm_key_layout() {
    check("mp_lpm_key", rust_layout!(LpmKey, [prefixlen, addr]));
}

#[test]
fn host_key_layout() {
    check("mp_host_key", rust_layout!(meshpath::abi::HostKey, [addr]));
}

#[test]
fn endpoint_layout() {
    check(
        "mp_endpoint",
        rust_layout!(meshpath::abi::EndpointValue, [identity, node, pad]),
    );
}

#[test]
fn policy_key_layout() {
    check(
        "mp_policy_key",
        rust_layout!(
            meshpath::abi::PolicyKey,
            [src_id, dst_id, dport, proto, pad, pad1]
        ),
    );
}

#[test]
fn policy_value_layout() {
    check(
        "mp_policy_value",
        rust_layout!(meshpath::abi::PolicyValue, [action, pad, rule]),
    );
}

#[test]
fn verdict_cache_layouts() {
    check(
        "mp_vcache_key",
        rust_layout!(
            meshpath::abi::VcacheKey,
            [saddr, daddr, sport, dport, proto, starts_only, pad]
        ),
    );
    check(
        "mp_vcache_value",
        rust_layout!(
            meshpath::abi::VcacheValue,
            [gen, rule, src_id, dst_id, verdict, matched, is_reply, pad, pad1]
        ),
    );
}

#[test]
fn conntrack_layouts() {
    check(
        "mp_ct_key",
        rust_layout!(
            meshpath::abi::CtKey,
            [saddr, daddr, sport, dport, proto, pad]
        ),
    );
    check(
        "mp_ct_value",
        rust_layout!(meshpath::abi::CtValue, [expires_ns, judged, flags, pad]),
    );
}

#[test]
fn identity_name_layout() {
    check(
        "mp_identity_name",
        rust_layout!(meshpath::abi::IdentityName, [len, name]),
    );
}

#[test]
fn flow_event_layout() {
    check(
        "mp_flow_event",
        rust_layout!(
            meshpath::abi::FlowEvent,
            [
                time_ns,
                cookie,
                cgroup_id,
                saddr,
                daddr,
                sport,
                dport,
                ifindex,
                src_identity,
                dst_identity,
                count,
                rule,
                tx_msgs,
                tx_bytes,
                rx_msgs,
                rx_bytes,
                r#type,
                verdict,
                point,
                proto,
                tcp_flags,
                ipv6,
                direction,
                is_reply,
                matched,
                pad0
            ]
        ),
    );
}

#[test]
fn auth_layouts() {
    check(
        "mp_auth_key",
        rust_layout!(
            meshpath::abi::AuthKey,
            [local_id, remote_id, remote_node, pad]
        ),
    );
    check(
        "mp_auth_value",
        rust_layout!(meshpath::abi::AuthValue, [expiry_ns]),
    );
    check(
        "mp_auth_signal",
        rust_layout!(meshpath::abi::AuthSignal, [time_ns, key, point, pad]),
    );
    check(
        "mp_cert_info",
        rust_layout!(meshpath::abi::CertInfo, [not_after, serial_len, serial]),
    );
}

#[test]
fn every_object_carries_the_same_abi_version() {
    for obj in objects() {
        let btf = Btf::from_path(&obj).unwrap();
        let e: libbpf_rs::btf::types::Enum<'_> = btf
            .type_by_name("mp_abi")
            .unwrap_or_else(|| panic!("mp_abi missing in {}", obj.display()));
        let v = e.iter().next().expect("MP_ABI_VERSION").value;
        assert_eq!(v as u32, meshpath::abi::ABI_VERSION, "{}", obj.display());
    }
}

/// Identity numbers are 64-bit wherever the ABI carries one.
#[test]
fn identity_fields_are_64_bit() {
    let fields = [
        ("mp_endpoint", "identity"),
        ("mp_policy_key", "src_id"),
        ("mp_policy_key", "dst_id"),
        ("mp_vcache_value", "src_id"),
        ("mp_vcache_value", "dst_id"),
        ("mp_auth_key", "local_id"),
        ("mp_auth_key", "remote_id"),
        ("mp_flow_event", "src_identity"),
        ("mp_flow_event", "dst_identity"),
    ];
    for (st, field) in fields {
        let mut seen = 0;
        for obj in objects() {
            let btf = Btf::from_path(&obj).unwrap();
            let Some((_, members)) = layout(&btf, st) else {
                continue;
            };
            let (_, off, size) = members
                .iter()
                .find(|(n, _, _)| n == field)
                .unwrap_or_else(|| panic!("{st}.{field} missing"));
            assert_eq!(*size, 8, "{st}.{field} in {}", obj.display());
            assert_eq!(off % 8, 0, "{st}.{field} aligned");
            seen += 1;
        }
        assert!(seen > 0, "{st} in no object");
    }
}

/// Every map whose key or value carries an identity number has the `_v2`
/// name of the 64-bit layout (a pin of the 32-bit layout is never
/// reused), with the sizes of that layout; no object defines one of the
/// old names.
#[test]
fn maps_carrying_identities_have_v2_names_and_64_bit_layouts() {
    // (name, key size, value size); 0: not checked (ring buffers).
    let want: &[(&str, u32, u32)] = &[
        ("meshpath_endpoints_v2_0", 20, 16),
        ("meshpath_endpoints_v2_1", 20, 16),
        ("meshpath_hosts_v2_0", 16, 16),
        ("meshpath_hosts_v2_1", 16, 16),
        ("meshpath_policy_v2_0", 24, 8),
        ("meshpath_policy_v2_1", 24, 8),
        ("meshpath_verdict_cache_v2", 40, 32),
        ("meshpath_ct_v2", 40, 48),
        ("meshpath_identities_v2", 8, 256),
        ("meshpath_auth_v2", 24, 8),
        ("meshpath_auth_pending_v2", 24, 8),
        ("meshpath_certs_v2", 8, 32),
        ("meshpath_events_v2", 0, 0),
        ("meshpath_auth_signals_v2", 0, 0),
    ];
    let old = [
        "meshpath_endpoints_0",
        "meshpath_endpoints_1",
        "meshpath_hosts_0",
        "meshpath_hosts_1",
        "meshpath_policy_0",
        "meshpath_policy_1",
        "meshpath_verdict_cache",
        "meshpath_ct",
        "meshpath_identities",
        "meshpath_auth",
        "meshpath_auth_pending",
        "meshpath_certs",
        "meshpath_events",
        "meshpath_auth_signals",
    ];
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for obj in objects() {
        let open = libbpf_rs::ObjectBuilder::default()
            .open_file(&obj)
            .unwrap_or_else(|e| panic!("opening {}: {e}", obj.display()));
        for m in open.maps() {
            let name = m.name().to_string_lossy().into_owned();
            assert!(
                !old.contains(&name.as_str()),
                "{} defines {name}: a 32-bit-era name",
                obj.display()
            );
            if let Some((n, k, v)) = want.iter().find(|(n, _, _)| *n == name) {
                *seen.entry(n).or_default() += 1;
                if *k != 0 {
                    assert_eq!(
                        (m.key_size(), m.value_size()),
                        (*k, *v),
                        "{name} in {}",
                        obj.display()
                    );
                }
            }
        }
    }
    for (n, _, _) in want {
        assert!(seen.contains_key(n), "{n} is in no object");
    }
}
