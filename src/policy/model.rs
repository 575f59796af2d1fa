//! The desired policy state, its validation, and its compilation into the
//! datapath's keys.
//!
//! Field names follow the agent's JSON config (`default_action`,
//! `endpoints[].ip/identity`, `policies[].from/to/protocol/ports/action`),
//! and validation errors name the field the way the config spells it, e.g.
//! `invalid policies[2].ports[0]: 0 is not a port`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use super::identity::{Identity, IdentityCollision, IdentityKey, IdentityMap, IdentityNumber};
use crate::abi::{Action as RawAction, IdentityReserved, Proto, ShapeBits};
use crate::error::{Error, Result};
use crate::net::IpNet;

/// What a rule does with the flows it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Pass.
    Allow,
    /// Drop (EPERM at connect).
    Deny,
    /// Pass, and report a would-be drop.
    Audit,
    /// Pass only while the pair is authenticated (mutual TLS between node
    /// agents); until then it behaves as deny, counted "auth required".
    Auth,
}

impl Action {
    fn raw(self) -> u8 {
        (match self {
            Action::Allow => RawAction::MP_ACTION_ALLOW,
            Action::Deny => RawAction::MP_ACTION_DENY,
            Action::Audit => RawAction::MP_ACTION_AUDIT,
            Action::Auth => RawAction::MP_ACTION_AUTH,
        })
        .0 as u8
    }

    pub(crate) fn from_raw(v: u8) -> Option<Action> {
        match u32::from(v) {
            x if x == RawAction::MP_ACTION_ALLOW.0 => Some(Action::Allow),
            x if x == RawAction::MP_ACTION_DENY.0 => Some(Action::Deny),
            x if x == RawAction::MP_ACTION_AUDIT.0 => Some(Action::Audit),
            x if x == RawAction::MP_ACTION_AUTH.0 => Some(Action::Auth),
            _ => None,
        }
    }

    /// Most restrictive first: deny > auth > audit > allow. Two rules with
    /// the same key keep the most restrictive action.
    fn restrictiveness(self) -> u8 {
        match self {
            Action::Deny => 3,
            Action::Auth => 2,
            Action::Audit => 1,
            Action::Allow => 0,
        }
    }
}

impl FromStr for Action {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            "audit" => Ok(Action::Audit),
            "auth" => Ok(Action::Auth),
            _ => Err(Error::invalid(
                "action",
                format!("{s:?} is not one of allow, deny, audit, auth"),
            )),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Audit => "audit",
            Action::Auth => "auth",
        })
    }
}

/// What applies where no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultAction {
    /// Everything not denied passes.
    #[default]
    Allow,
    /// Only what a rule allows passes.
    Deny,
}

impl FromStr for DefaultAction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "allow" => Ok(DefaultAction::Allow),
            "deny" => Ok(DefaultAction::Deny),
            _ => Err(Error::invalid(
                "default_action",
                format!("{s:?} is not allow or deny"),
            )),
        }
    }
}

/// A rule's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Any protocol.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6 (no ports).
    Icmp,
}

impl Protocol {
    fn raw(self) -> u8 {
        (match self {
            Protocol::Any => Proto::MP_PROTO_ANY,
            Protocol::Tcp => Proto::MP_PROTO_TCP,
            Protocol::Udp => Proto::MP_PROTO_UDP,
            Protocol::Icmp => Proto::MP_PROTO_ICMP,
        })
        .0 as u8
    }
}

impl FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "any" => Ok(Protocol::Any),
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            _ => Err(Error::invalid(
                "protocol",
                format!("{s:?} is not one of tcp, udp, icmp, any"),
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        })
    }
}

/// One side of a rule: any identity (`*`) or one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// `*`: any identity, `world` and `host` included.
    Any,
    /// One identity.
    Is(Identity),
}

impl FromStr for Peer {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "*" {
            Ok(Peer::Any)
        } else {
            Ok(Peer::Is(s.parse()?))
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Any => f.write_str("*"),
            Peer::Is(i) => i.fmt(f),
        }
    }
}

/// An address or prefix and the identity of the workload behind it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The address (a /32 or /128) or prefix.
    pub ip: IpNet,
    /// Its identity.
    pub identity: Identity,
    /// The node it runs on (`None`: this node). Mutual authentication of
    /// `auth` flows is between node agents.
    pub node: Option<NodeName>,
}

impl Endpoint {
    /// Parses an endpoint on this node from its config strings.
    pub fn new(ip: &str, identity: &str) -> Result<Endpoint> {
        Ok(Endpoint {
            ip: ip.parse()?,
            identity: identity.parse()?,
            node: None,
        })
    }

    /// The same endpoint on node `node`.
    pub fn on_node(mut self, node: NodeName) -> Endpoint {
        self.node = Some(node);
        self
    }
}

/// A node's name: 1 to 63 characters of lowercase letters, digits, `.`
/// and `-` (a DNS label or name). Its number, used in auth keys, is
/// derived from it the same way on every node (see [`NodeName::number`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The node's number: FNV-1a (64-bit) over `meshpath-node:<name>`,
    /// folded to 32 bits (high xor low), mapped into `[256, 2^32)`, so
    /// never 0 (0 means "this node"). Unkeyed: node names are chosen by
    /// the cluster's operators, not by whoever can name a workload.
    pub fn number(&self) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("meshpath-node:{}", self.0).as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let folded = ((h >> 32) ^ (h & 0xffff_ffff)) as u32;
        let first = IdentityReserved::MP_ID_FIRST_DERIVED.0;
        first + folded % (u32::MAX - first + 1)
    }
}

impl FromStr for NodeName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
        if !ok {
            return Err(Error::invalid(
                "node",
                format!("{s:?} must be 1-63 lowercase letters, digits, '.' or '-'"),
            ));
        }
        Ok(NodeName(s.to_string()))
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A policy rule: flows from `from` to `to` with `protocol` to one of
/// `ports` (empty: any port) get `action`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Source identity or `*`.
    pub from: Peer,
    /// Destination identity or `*`.
    pub to: Peer,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination ports; empty means any port.
    pub ports: Vec<u16>,
    /// What happens to matching flows.
    pub action: Action,
}

impl Rule {
    /// Parses a rule from its config strings.
    pub fn new(from: &str, to: &str, protocol: &str, ports: &[u16], action: &str) -> Result<Rule> {
        Ok(Rule {
            from: from.parse()?,
            to: to.parse()?,
            protocol: protocol.parse()?,
            ports: ports.to_vec(),
            action: action.parse()?,
        })
    }
}

/// The whole desired policy state of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyState {
    /// What applies where no rule matches.
    pub default_action: DefaultAction,
    /// Addresses and prefixes with their identities.
    pub endpoints: Vec<Endpoint>,
    /// The rules (the config calls them `policies`).
    pub policies: Vec<Rule>,
}

/// A policy state as the datapath keys it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Compiled {
    /// (prefix length over 128 bits, address words) -> (identity number,
    /// node number).
    pub endpoints: BTreeMap<(u32, [u32; 4]), (IdentityNumber, u32)>,
    /// Policy key bytes -> (action, rule number).
    pub rules: BTreeMap<PolicyKeyBytes, (u8, u32)>,
    /// Bit set of the key shapes in use.
    pub shapes: u32,
    pub default_action: DefaultAction,
    pub identities: IdentityMap,
    /// How many endpoints have each identity number.
    pub endpoint_uses: BTreeMap<IdentityNumber, usize>,
    /// The identity numbers the rules name.
    pub rule_identities: BTreeSet<IdentityNumber>,
    /// Names refused because another had their number first (in name
    /// order), with the endpoints and rules left out for them.
    pub collisions: Vec<IdentityCollision>,
}

/// The bytes of a `struct mp_policy_key`.
pub(crate) type PolicyKeyBytes = [u8; POLICY_KEY_LEN];
/// The size of a `struct mp_policy_key`.
pub(crate) const POLICY_KEY_LEN: usize = 24;

impl PolicyState {
    /// Checks the state and compiles it; errors name the field. (Two
    /// names with one identity number are not an error: see
    /// [`IdentityCollision`].)
    pub fn validate(&self) -> Result<()> {
        self.compile(&IdentityKey::default()).map(|_| ())
    }

    /// Every identity the state names, in name order.
    fn named_identities(&self) -> BTreeSet<&Identity> {
        let mut all: BTreeSet<&Identity> = self.endpoints.iter().map(|e| &e.identity).collect();
        for r in &self.policies {
            for p in [&r.from, &r.to] {
                if let Peer::Is(id) = p {
                    all.insert(id);
                }
            }
        }
        all
    }

    /// Compiles the state with identity numbers derived under `key`. A
    /// name whose number an earlier name (in name order, so every node
    /// decides alike whatever the order of the config) already has is
    /// refused with its endpoints and rules (`Compiled::collisions`); the
    /// rest compiles.
    pub(crate) fn compile(&self, key: &IdentityKey) -> Result<Compiled> {
        let mut c = Compiled {
            default_action: self.default_action,
            identities: IdentityMap::new(key.clone()),
            ..Default::default()
        };
        let mut refused: BTreeMap<&Identity, usize> = BTreeMap::new();
        for id in self.named_identities() {
            if c.identities.insert(id).is_err() {
                let number = c.identities.number_of(id);
                let kept = c
                    .identities
                    .name(number)
                    .cloned()
                    .unwrap_or(Identity::World);
                refused.insert(id, c.collisions.len());
                c.collisions.push(IdentityCollision {
                    number,
                    kept,
                    refused: id.clone(),
                    endpoints: Vec::new(),
                    rules: Vec::new(),
                });
            }
        }
        for (i, ep) in self.endpoints.iter().enumerate() {
            if let Some(&k) = refused.get(&ep.identity) {
                c.collisions[k].endpoints.push(i);
                continue;
            }
            let id = c.identities.number_of(&ep.identity);
            *c.endpoint_uses.entry(id).or_default() += 1;
            let key = super::edit::key_of(&ep.ip);
            let value = super::edit::value_of(ep, id);
            match c.endpoints.entry(key) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(value);
                }
                // The same prefix twice is fine when it says the same.
                std::collections::btree_map::Entry::Occupied(o) if *o.get() == value => {}
                std::collections::btree_map::Entry::Occupied(_) => {
                    let j = self.endpoints[..i]
                        .iter()
                        .position(|e| {
                            super::edit::key_of(&e.ip) == key && !refused.contains_key(&e.identity)
                        })
                        .unwrap_or(i);
                    return Err(Error::invalid(
                        format!("endpoints[{i}].ip"),
                        format!(
                            "{} is already endpoints[{j}] with another identity or node",
                            ep.ip
                        ),
                    ));
                }
            }
        }
        for (i, r) in self.policies.iter().enumerate() {
            let lost = [&r.from, &r.to].into_iter().find_map(|p| match p {
                Peer::Is(id) => refused.get(id).copied(),
                Peer::Any => None,
            });
            let side = |p: &Peer| match p {
                Peer::Any => u64::from(IdentityReserved::MP_ID_ANY.0),
                Peer::Is(id) => c.identities.number_of(id),
            };
            let src = side(&r.from);
            let dst = side(&r.to);
            if lost.is_none() {
                for n in [src, dst] {
                    if n != u64::from(IdentityReserved::MP_ID_ANY.0) {
                        c.rule_identities.insert(n);
                    }
                }
            }
            if r.protocol == Protocol::Icmp && !r.ports.is_empty() {
                return Err(Error::invalid(
                    format!("policies[{i}].ports"),
                    "ICMP has no ports: leave the list empty",
                ));
            }
            for (j, p) in r.ports.iter().enumerate() {
                if *p == 0 {
                    return Err(Error::invalid(
                        format!("policies[{i}].ports[{j}]"),
                        "0 is not a port (an empty list means any port)",
                    ));
                }
            }
            // Checked above like any rule; left out when it names a
            // refused identity (both refused: counted for the first).
            if let Some(k) = lost {
                c.collisions[k].rules.push(i);
                continue;
            }
            let ports: Vec<u16> = if r.ports.is_empty() {
                vec![0]
            } else {
                r.ports.clone()
            };
            for port in ports {
                let k = key_bytes(src, dst, port, r.protocol.raw());
                let mut shape = 0;
                if src != 0 {
                    shape |= ShapeBits::MP_SHAPE_SRC.0;
                }
                if dst != 0 {
                    shape |= ShapeBits::MP_SHAPE_DST.0;
                }
                if port != 0 {
                    shape |= ShapeBits::MP_SHAPE_PORT.0;
                }
                if r.protocol != Protocol::Any {
                    shape |= ShapeBits::MP_SHAPE_PROTO.0;
                }
                c.shapes |= 1 << shape;
                let entry = (r.action.raw(), i as u32);
                match c.rules.get(&k) {
                    Some((a, _))
                        if Action::from_raw(*a).map_or(0, Action::restrictiveness)
                            >= r.action.restrictiveness() => {}
                    _ => {
                        c.rules.insert(k, entry);
                    }
                }
            }
        }
        Ok(c)
    }
}

/// The bytes of a `struct mp_policy_key` (checked against the generated
/// type by a unit test): ids at 0 and 8, port at 16, protocol at 18, the
/// padding zero.
pub(crate) fn key_bytes(
    src: IdentityNumber,
    dst: IdentityNumber,
    dport: u16,
    proto: u8,
) -> PolicyKeyBytes {
    let mut k = [0u8; POLICY_KEY_LEN];
    k[0..8].copy_from_slice(&src.to_ne_bytes());
    k[8..16].copy_from_slice(&dst.to_ne_bytes());
    k[16..18].copy_from_slice(&dport.to_ne_bytes());
    k[18] = proto;
    k
}

/// The `struct mp_policy_key` for key bytes from [`key_bytes`].
pub(crate) fn key_of_bytes(b: &PolicyKeyBytes) -> crate::abi::PolicyKey {
    let mut k = crate::abi::PolicyKey::default();
    // SAFETY: PolicyKey is Plain (abi.rs) and exactly POLICY_KEY_LEN bytes
    // (checked by key_bytes_match_the_generated_struct).
    unsafe { plain::as_mut_bytes(&mut k) }.copy_from_slice(b);
    k
}

/// The key bytes of a `struct mp_policy_key`.
pub(crate) fn bytes_of_key(k: &crate::abi::PolicyKey) -> PolicyKeyBytes {
    let mut b = [0u8; POLICY_KEY_LEN];
    // SAFETY: PolicyKey is Plain (abi.rs) and exactly POLICY_KEY_LEN bytes.
    b.copy_from_slice(unsafe { plain::as_bytes(k) });
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const FE: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
    const DB: &str = "spiffe://mesh.local/ns/db/sa/postgres";

    fn state() -> PolicyState {
        PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: vec![
                Endpoint::new("127.0.0.2", FE).unwrap(),
                Endpoint::new("198.18.0.0/16", DB).unwrap(),
            ],
            policies: vec![Rule::new(FE, DB, "tcp", &[5432], "allow").unwrap()],
        }
    }

    #[test]
    fn key_bytes_match_the_generated_struct() {
        let k = crate::abi::PolicyKey {
            src_id: 7 << 40,
            dst_id: 9,
            dport: 5432,
            proto: 6,
            pad: 0,
            pad1: 0,
        };
        assert_eq!(std::mem::size_of::<crate::abi::PolicyKey>(), POLICY_KEY_LEN);
        // SAFETY: PolicyKey is Plain (abi.rs).
        let raw = unsafe { plain::as_bytes(&k) };
        assert_eq!(raw, &key_bytes(7 << 40, 9, 5432, 6)[..]);
        assert_eq!(
            bytes_of_key(&key_of_bytes(&key_bytes(1, 2, 3, 4))),
            key_bytes(1, 2, 3, 4)
        );
    }

    #[test]
    fn compiles_endpoints_rules_and_shapes() {
        let c = state().compile(&IdentityKey::default()).unwrap();
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.rules.len(), 1);
        let all = ShapeBits::MP_SHAPE_SRC.0
            | ShapeBits::MP_SHAPE_DST.0
            | ShapeBits::MP_SHAPE_PORT.0
            | ShapeBits::MP_SHAPE_PROTO.0;
        assert_eq!(c.shapes, 1 << all);
        assert_eq!(c.identities.len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = state();
        s.policies.push(Rule {
            ports: vec![80, 0],
            ..s.policies[0].clone()
        });
        let e = s.compile(&IdentityKey::default()).unwrap_err().to_string();
        assert!(e.starts_with("invalid policies[1].ports[1]"), "{e}");

        let mut s = state();
        s.policies[0].protocol = Protocol::Icmp;
        let e = s.compile(&IdentityKey::default()).unwrap_err().to_string();
        assert!(e.starts_with("invalid policies[0].ports"), "{e}");

        let mut s = state();
        s.endpoints.push(Endpoint::new("127.0.0.2/32", DB).unwrap());
        let e = s.compile(&IdentityKey::default()).unwrap_err().to_string();
        assert!(e.starts_with("invalid endpoints[2].ip"), "{e}");
        assert!(e.contains("already endpoints[0]"), "{e}");
        // The same address in its v4-mapped spelling is the same key.
        let mut s = state();
        s.endpoints
            .push(Endpoint::new("::ffff:127.0.0.2", DB).unwrap());
        let e = s.compile(&IdentityKey::default()).unwrap_err().to_string();
        assert!(e.starts_with("invalid endpoints[2].ip"), "{e}");
        assert!(e.contains("already endpoints[0]"), "{e}");
        // Saying the same thing twice is not an error.
        let mut s = state();
        s.endpoints.push(s.endpoints[0].clone());
        assert_eq!(
            s.compile(&IdentityKey::default()).unwrap().endpoints.len(),
            2
        );
    }

    #[test]
    fn the_same_key_keeps_the_most_restrictive_action() {
        let mut s = state();
        s.policies
            .push(Rule::new(FE, DB, "tcp", &[5432], "audit").unwrap());
        s.policies
            .push(Rule::new(FE, DB, "tcp", &[5432], "deny").unwrap());
        s.policies
            .push(Rule::new(FE, DB, "tcp", &[5432], "allow").unwrap());
        let c = s.compile(&IdentityKey::default()).unwrap();
        let (a, rule) = c.rules.values().next().copied().unwrap();
        assert_eq!(Action::from_raw(a), Some(Action::Deny));
        assert_eq!(rule, 2);
    }

    #[test]
    fn strings_parse_like_the_config() {
        assert_eq!("*".parse::<Peer>().unwrap(), Peer::Any);
        assert_eq!("world".parse::<Peer>().unwrap(), Peer::Is(Identity::World));
        assert!("nope"
            .parse::<Protocol>()
            .unwrap_err()
            .to_string()
            .contains("tcp, udp, icmp, any"));
        assert!("maybe"
            .parse::<Action>()
            .unwrap_err()
            .to_string()
            .contains("allow, deny, audit, auth"));
        assert!("sometimes"
            .parse::<DefaultAction>()
            .unwrap_err()
            .to_string()
            .contains("default_action"));
    }

    /// Two names with one number (a tiny number space, unit tests only):
    /// the one that sorts later is refused with its endpoints and rules,
    /// whatever the order of the config; everything else compiles.
    #[test]
    fn a_collision_refuses_the_later_name_only() {
        let key = IdentityKey::tiny(3);
        let name = |i: usize| format!("spiffe://mesh.local/ns/t/sa/w{i}");
        let mut s = PolicyState {
            default_action: DefaultAction::Deny,
            endpoints: (0..8)
                .map(|i| Endpoint::new(&format!("198.18.0.{i}"), &name(i)).unwrap())
                .collect(),
            policies: (0..8)
                .map(|i| Rule::new(&name(i), "*", "tcp", &[80], "allow").unwrap())
                .collect(),
        };
        s.policies
            .push(Rule::new("*", "world", "any", &[], "deny").unwrap());
        let c = s.compile(&key).unwrap();
        // 8 names in 3 numbers: 5 refused.
        assert_eq!(c.collisions.len(), 5, "{:?}", c.collisions);
        assert_eq!(c.identities.len(), 3 + 1, "three numbers and world");
        for col in &c.collisions {
            assert!(col.kept < col.refused, "{col}");
            assert_eq!(col.number, col.kept.number(&key));
            assert_eq!(col.number, col.refused.number(&key));
            assert_eq!(c.identities.name(col.number), Some(&col.kept));
            assert_eq!(col.endpoints.len(), 1);
            assert_eq!(col.rules.len(), 1);
            let i = col.endpoints[0];
            assert_eq!(s.endpoints[i].identity, col.refused);
            assert!(!c
                .endpoints
                .contains_key(&super::super::edit::key_of(&s.endpoints[i].ip)));
            assert!(col.to_string().contains("refused"), "{col}");
        }
        // Everything not refused is there: 3 endpoints, 3 rules + 1.
        assert_eq!(c.endpoints.len(), 3);
        assert_eq!(c.rules.len(), 4);
        // The same decision whatever the order.
        let mut r = s.clone();
        r.endpoints.reverse();
        r.policies.reverse();
        let rc = r.compile(&key).unwrap();
        assert_eq!(rc.endpoints, c.endpoints);
        assert_eq!(rc.identities, c.identities);
        let refused = |c: &Compiled| -> Vec<Identity> {
            c.collisions.iter().map(|x| x.refused.clone()).collect()
        };
        assert_eq!(refused(&rc), refused(&c));
        // With the real derivation nothing collides.
        let c = s.compile(&IdentityKey::default()).unwrap();
        assert!(c.collisions.is_empty());
        assert_eq!(c.endpoints.len(), 8);
    }

    /// An endpoint of a refused name leaves its address free: another
    /// endpoint of the same address is no duplicate.
    #[test]
    fn a_refused_endpoint_is_no_duplicate() {
        let key = IdentityKey::tiny(1);
        let s = PolicyState {
            endpoints: vec![
                Endpoint::new("198.18.0.1", "spiffe://t/b").unwrap(),
                Endpoint::new("198.18.0.1", "spiffe://t/a").unwrap(),
            ],
            ..PolicyState::default()
        };
        let c = s.compile(&key).unwrap();
        assert_eq!(c.collisions.len(), 1);
        assert_eq!(c.collisions[0].refused.to_string(), "spiffe://t/b");
        assert_eq!(c.collisions[0].endpoints, vec![0]);
        assert_eq!(c.endpoints.len(), 1);
    }
}
