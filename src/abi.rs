//! The C/Rust boundary: the skeleton's generated twins of
//! `include/meshpath/abi.h`, and conversions to idiomatic Rust types.
//!
//! Nothing here is a hand copy of a C struct: every type comes from the
//! BTF of the compiled objects through libbpf-cargo. `tests/abi_layout.rs`
//! checks that every object agrees on sizes and offsets and that no key
//! has an implicit hole.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::skel::sockops::types;

pub use types::{
    mp_abi as Abi, mp_action as Action, mp_auth_key as AuthKey, mp_auth_signal as AuthSignal,
    mp_auth_value as AuthValue, mp_bypass_flags as BypassFlags, mp_cert_info as CertInfo,
    mp_cgroup_flags as CgroupFlags, mp_counter as CounterId, mp_ct_flags as CtFlags,
    mp_ct_key as CtKey, mp_ct_value as CtValue, mp_dir_mode as DirMode,
    mp_endpoint as EndpointValue, mp_enroll_flags as EnrollFlags,
    mp_enroll_outcome as EnrollOutcomeId, mp_enroll_record as EnrollRecord,
    mp_event_type as EventType, mp_flow_event as FlowEvent, mp_host_key as HostKey,
    mp_identity_limits as IdentityLimits, mp_identity_name as IdentityName,
    mp_identity_reserved as IdentityReserved, mp_lpm_key as LpmKey, mp_point as PointId,
    mp_policy_key as PolicyKey, mp_policy_value as PolicyValue, mp_policy_word as PolicyWord,
    mp_proto as Proto, mp_settings as Settings, mp_shape_bits as ShapeBits,
    mp_sock_entry as SockEntry, mp_sock_flags as SockFlags, mp_sock_key as SockKey,
    mp_sock_reason as SockReason, mp_sock_state as SockState,
    mp_traffic_direction as TrafficDirection, mp_vcache_key as VcacheKey,
    mp_vcache_value as VcacheValue, mp_verdict as VerdictId,
};

/// The layout version this build of the library writes and accepts.
pub const ABI_VERSION: u32 = Abi::MP_ABI_VERSION.0;

// SAFETY (for every impl below): the types are `#[repr(C)]` structs of
// fixed-width integers and integer arrays generated from BTF; every byte
// pattern is a valid value and the layout test proves there is no implicit
// padding, so they may be viewed as and built from raw bytes.
unsafe impl plain::Plain for SockKey {}
// SAFETY: see above.
unsafe impl plain::Plain for SockEntry {}
// SAFETY: see above.
unsafe impl plain::Plain for SockState {}
// SAFETY: see above.
unsafe impl plain::Plain for Settings {}
// SAFETY: see above.
unsafe impl plain::Plain for LpmKey {}
// SAFETY: see above.
unsafe impl plain::Plain for HostKey {}
// SAFETY: see above.
unsafe impl plain::Plain for PolicyKey {}
// SAFETY: see above.
unsafe impl plain::Plain for PolicyValue {}
// SAFETY: see above.
unsafe impl plain::Plain for EndpointValue {}
// SAFETY: see above.
unsafe impl plain::Plain for IdentityName {}
// SAFETY: see above.
unsafe impl plain::Plain for VcacheKey {}
// SAFETY: see above.
unsafe impl plain::Plain for VcacheValue {}
// SAFETY: see above.
unsafe impl plain::Plain for FlowEvent {}
// SAFETY: see above.
unsafe impl plain::Plain for AuthKey {}
// SAFETY: see above.
unsafe impl plain::Plain for AuthValue {}
// SAFETY: see above.
unsafe impl plain::Plain for AuthSignal {}
// SAFETY: see above.
unsafe impl plain::Plain for CertInfo {}
// SAFETY: see above.
unsafe impl plain::Plain for EnrollRecord {}
// SAFETY: see above.
unsafe impl plain::Plain for CtKey {}
// SAFETY: see above.
unsafe impl plain::Plain for CtValue {}

/// Packs the policy word (see `enum mp_policy_word` in abi.h).
pub(crate) fn policy_word(gen: u32, on: bool, default_action: u8, epoch: u32) -> u64 {
    (u64::from(gen) << PolicyWord::MP_POLICY_GEN_SHIFT.0)
        | (u64::from(default_action & 0xf) << PolicyWord::MP_POLICY_DEFAULT_SHIFT.0)
        | if on {
            u64::from(PolicyWord::MP_POLICY_ON_BIT.0)
        } else {
            0
        }
        | u64::from(epoch & PolicyWord::MP_POLICY_EPOCH_BIT.0)
}

/// The policy word's fields: (generation, on, default action, epoch).
pub(crate) fn policy_word_parts(w: u64) -> (u32, bool, u8, u32) {
    (
        (w >> PolicyWord::MP_POLICY_GEN_SHIFT.0) as u32,
        w & u64::from(PolicyWord::MP_POLICY_ON_BIT.0) != 0,
        ((w >> PolicyWord::MP_POLICY_DEFAULT_SHIFT.0) & 0xf) as u8,
        (w & u64::from(PolicyWord::MP_POLICY_EPOCH_BIT.0)) as u32,
    )
}

/// An address as the maps store it: 16 bytes, network order, IPv4 mapped.
pub(crate) fn ip_to_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let b = v6.octets();
    let mut out = [0u32; 4];
    for (i, w) in out.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    }
    out
}

/// The inverse of [`ip_to_words`]; v4-mapped addresses come back as IPv4.
pub(crate) fn words_to_ip(w: [u32; 4]) -> IpAddr {
    let mut b = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Whether the datapath treats `ip` as loopback (its keys then carry the
/// network namespace cookie).
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl SockKey {
    /// The key of a socket with these local and remote addresses, in the
    /// network namespace with cookie `netns` (only used for loopback).
    pub fn new(local: SocketAddr, remote: SocketAddr, netns: u64) -> Self {
        let loopback = is_loopback(local.ip()) || is_loopback(remote.ip());
        SockKey {
            local_ip: ip_to_words(local.ip()),
            remote_ip: ip_to_words(remote.ip()),
            local_port: u32::from(local.port()),
            remote_port: u32::from(remote.port()),
            netns: if loopback { netns } else { 0 },
        }
    }

    /// The local address and port.
    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(words_to_ip(self.local_ip), self.local_port as u16)
    }

    /// The remote address and port.
    pub fn remote(&self) -> SocketAddr {
        SocketAddr::new(words_to_ip(self.remote_ip), self.remote_port as u16)
    }

    /// The key the peer socket is enrolled under.
    pub fn peer(&self) -> SockKey {
        SockKey {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            netns: self.netns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_word_round_trips() {
        for (gen, on, d, e) in [(0, false, 0, 0), (1, true, 2, 1), (u32::MAX, true, 15, 0)] {
            assert_eq!(
                policy_word_parts(policy_word(gen, on, d, e)),
                (gen, on, d, e)
            );
        }
    }

    #[test]
    fn v4_is_stored_mapped_and_comes_back_v4() {
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let w = ip_to_words(ip);
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(w, ip_to_words(mapped));
        assert_eq!(words_to_ip(w), ip);
    }

    #[test]
    fn words_are_network_order_in_memory() {
        let w = ip_to_words("1.2.3.4".parse().unwrap());
        assert_eq!(w[3].to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(w[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn loopback_covers_v4_v6_and_mapped() {
        for s in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.5"] {
            assert!(is_loopback(s.parse().unwrap()), "{s}");
        }
        for s in ["198.18.0.1", "::2", "::ffff:10.0.0.1"] {
            assert!(!is_loopback(s.parse().unwrap()), "{s}");
        }
    }

    fn bytes(k: &SockKey) -> Vec<u8> {
        // SAFETY: SockKey is Plain (see the impls above).
        unsafe { plain::as_bytes(k) }.to_vec()
    }

    #[test]
    fn peer_key_swaps_ends_and_keeps_netns() {
        let a: SocketAddr = "127.0.0.2:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:2000".parse().unwrap();
        let k = SockKey::new(a, b, 42);
        assert_eq!(k.netns, 42);
        assert_eq!(bytes(&k.peer()), bytes(&SockKey::new(b, a, 42)));
        assert_eq!(bytes(&k.peer().peer()), bytes(&k));
        assert_eq!(k.local(), a);
        assert_eq!(k.remote(), b);
        let far = SockKey::new(
            "198.18.0.1:1".parse().unwrap(),
            "198.18.0.2:2".parse().unwrap(),
            42,
        );
        assert_eq!(far.netns, 0, "non-loopback keys ignore the namespace");
    }
}
