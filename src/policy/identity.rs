//! Workload identities: SPIFFE IDs, and the numbers the datapath keys on.
//!
//! A workload's number is derived from its SPIFFE ID the same way on every
//! node that shares the cluster's [`IdentityKey`], so nodes agree without
//! an allocator: SipHash-2-4 keyed with the 128-bit key over
//! `meshpath-identity\0` followed by the ID's bytes, a 64-bit value mapped
//! into the derived range `[MP_ID_FIRST_DERIVED, 2^64)`. This is part of
//! meshpath's contract: changing it (or the key) renames every identity on
//! every node.
//!
//! With 64 bits, two of a million names share a number by chance with
//! probability ~3e-8; with a secret key nobody can search for a colliding
//! pair offline (SipHash is a PRF: without the key its outputs look
//! random). The default key is public, so with it collisions *can* be
//! searched (2^32 work): clusters set their own key.
//!
//! Should two names ever share a number, a policy change keeps the one
//! that sorts first and refuses the other's endpoints and rules
//! ([`IdentityCollision`]); everything else applies.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hasher;
use std::str::FromStr;

use siphasher::sip::SipHasher24;

use crate::abi::{IdentityLimits, IdentityReserved};
use crate::error::{Error, Result};

/// A datapath identity number: 64 bits, reserved numbers below
/// `MP_ID_FIRST_DERIVED` (256), the others derived from SPIFFE IDs.
pub type IdentityNumber = u64;

/// The key identity numbers are derived with: 128 bits every node of a
/// cluster shares (and keeps secret, so that nobody can search for two
/// names with one number).
///
/// [`IdentityKey::default`] is a fixed, published key: **not secure**
/// (anyone can search collisions offline); use it only for tests and
/// single-node experiments.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityKey {
    k: [u8; 16],
    /// Unit tests only: numbers in a space this small (collisions on
    /// demand). Never in a real build.
    #[cfg(test)]
    space: Option<u64>,
}

/// The default key's bytes: public, hence not secure.
const DEFAULT_KEY: [u8; 16] = *b"meshpath-default";

impl Default for IdentityKey {
    fn default() -> Self {
        IdentityKey::from_array(DEFAULT_KEY)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        if self.is_default() {
            f.write_str("IdentityKey(default, not secure)")
        } else {
            f.write_str("IdentityKey(<secret>)")
        }
    }
}

impl IdentityKey {
    /// The minimum length of key material.
    pub const MIN_LEN: usize = 16;

    fn from_array(k: [u8; 16]) -> IdentityKey {
        IdentityKey {
            k,
            #[cfg(test)]
            space: None,
        }
    }

    /// A key from 16 or more bytes of (secret, random) key material:
    /// exactly 16 bytes are the key; longer material is condensed to 128
    /// bits (SipHash-2-4-128 under a fixed key). Shorter is refused.
    pub fn from_bytes(material: &[u8]) -> Result<IdentityKey> {
        if material.len() < Self::MIN_LEN {
            return Err(Error::invalid(
                "identity key",
                format!(
                    "{} bytes: at least {} are needed",
                    material.len(),
                    Self::MIN_LEN
                ),
            ));
        }
        if let Ok(k) = <[u8; 16]>::try_from(material) {
            return Ok(IdentityKey::from_array(k));
        }
        let mut h = siphasher::sip128::SipHasher24::new_with_key(&[0; 16]);
        h.write(b"meshpath-identity-key\0");
        h.write(material);
        let k = siphasher::sip128::Hasher128::finish128(&h).as_bytes();
        Ok(IdentityKey::from_array(k))
    }

    /// A key from the contents of a key file: hex (32 or more hex digits,
    /// surrounding whitespace ignored) or else raw bytes (16 or more).
    pub fn from_file_contents(contents: &[u8]) -> Result<IdentityKey> {
        let text = std::str::from_utf8(contents).map(str::trim).ok();
        if let Some(t) = text.filter(|t| {
            !t.is_empty() && t.len() % 2 == 0 && t.bytes().all(|b| b.is_ascii_hexdigit())
        }) {
            let bytes: Vec<u8> = (0..t.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&t[i..i + 2], 16).expect("hex digits"))
                .collect();
            if bytes.len() >= Self::MIN_LEN {
                return IdentityKey::from_bytes(&bytes);
            }
        }
        IdentityKey::from_bytes(contents)
    }

    /// Whether this is the default (public, not secure) key.
    pub fn is_default(&self) -> bool {
        self.k == DEFAULT_KEY
    }

    /// A key whose numbers fall in `[256, 256 + space)`: collisions on
    /// demand for unit tests.
    #[cfg(test)]
    pub(crate) fn tiny(space: u64) -> IdentityKey {
        IdentityKey {
            k: DEFAULT_KEY,
            space: Some(space),
        }
    }

    /// The number of a SPIFFE ID under this key (see the module
    /// documentation).
    pub fn number_of(&self, spiffe_id: &str) -> IdentityNumber {
        let mut h = SipHasher24::new_with_key(&self.k);
        h.write(b"meshpath-identity\0");
        h.write(spiffe_id.as_bytes());
        let v = h.finish();
        let first = u64::from(IdentityReserved::MP_ID_FIRST_DERIVED.0);
        #[cfg(test)]
        if let Some(space) = self.space {
            return first + v % space;
        }
        first + v % (u64::MAX - first + 1)
    }
}

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
    /// The number the datapath keys this identity on, under `key`.
    pub fn number(&self, key: &IdentityKey) -> IdentityNumber {
        match self {
            Identity::Host => u64::from(IdentityReserved::MP_ID_HOST.0),
            Identity::World => u64::from(IdentityReserved::MP_ID_WORLD.0),
            Identity::Workload(id) => key.number_of(id.as_str()),
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

/// The derived number of a SPIFFE ID under `key` (see the module
/// documentation).
pub fn derive_number(key: &IdentityKey, spiffe_id: &str) -> IdentityNumber {
    key.number_of(spiffe_id)
}

/// Two names with one number: the first (in name order) is kept, the
/// other refused, with its endpoints and rules. Never expected by chance
/// (64 bits), never searchable without the key; counted and reported
/// where it happens ([`crate::policy::PolicyChange::identity_collisions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityCollision {
    /// The shared number.
    pub number: IdentityNumber,
    /// The name that keeps the number (sorts first).
    pub kept: Identity,
    /// The name refused.
    pub refused: Identity,
    /// The endpoints refused (indices into the state's `endpoints`).
    pub endpoints: Vec<usize>,
    /// The rules refused (indices into the state's `policies`).
    pub rules: Vec<usize>,
}

impl fmt::Display for IdentityCollision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identities {} and {} share number {}: {} refused ({} endpoints, {} rules)",
            self.kept,
            self.refused,
            self.number,
            self.refused,
            self.endpoints.len(),
            self.rules.len()
        )
    }
}

/// Numbers to names under one key, refusing two names for one number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityMap {
    key: IdentityKey,
    by_number: BTreeMap<IdentityNumber, Identity>,
}

impl IdentityMap {
    /// An empty map whose numbers are derived with `key`.
    pub fn new(key: IdentityKey) -> IdentityMap {
        IdentityMap {
            key,
            by_number: BTreeMap::new(),
        }
    }

    /// The key numbers are derived with.
    pub fn key(&self) -> &IdentityKey {
        &self.key
    }

    /// The number of `identity` under this map's key.
    pub fn number_of(&self, identity: &Identity) -> IdentityNumber {
        identity.number(&self.key)
    }

    /// Adds `identity`; its number. Fails when another name already has
    /// that number (a hash collision): the error names both.
    pub fn insert(&mut self, identity: &Identity) -> Result<IdentityNumber> {
        let n = self.number_of(identity);
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
    pub(crate) fn remove(&mut self, number: IdentityNumber) {
        self.by_number.remove(&number);
    }

    /// Puts `identity` under `number` whatever its own number (tests
    /// only: a collision on demand).
    #[cfg(test)]
    pub(crate) fn force(&mut self, number: IdentityNumber, identity: Identity) {
        self.by_number.insert(number, identity);
    }

    /// The name of a number.
    pub fn name(&self, number: IdentityNumber) -> Option<&Identity> {
        self.by_number.get(&number)
    }

    /// Every (number, name), by number.
    pub fn iter(&self) -> impl Iterator<Item = (IdentityNumber, &Identity)> {
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
    fn numbers_are_stable_keyed_and_outside_the_reserved_range() {
        // The derivation is a contract across nodes and versions: golden
        // values (SipHash-2-4 of "meshpath-identity\0" + the ID).
        let d = IdentityKey::default();
        let fe = "spiffe://mesh.local/ns/shop/sa/frontend";
        assert_eq!(derive_number(&d, fe), derive_number(&d, fe));
        let golden = derive_number(&d, fe);
        assert_eq!(golden, GOLDEN_FRONTEND_DEFAULT_KEY, "{golden:#x}");
        for i in 0..10_000 {
            assert!(derive_number(&d, &format!("spiffe://t/{i}")) >= 256);
        }
        let host: Identity = "host".parse().unwrap();
        let world: Identity = "world".parse().unwrap();
        assert_eq!(host.number(&d), 1);
        assert_eq!(world.number(&d), 2);
        // Another key: other numbers (reserved ones stay).
        let k = IdentityKey::from_bytes(&[7; 16]).unwrap();
        assert!(!k.is_default() && d.is_default());
        assert_ne!(derive_number(&k, fe), golden);
        assert_eq!(host.number(&k), 1);
        // Numbers use the whole 64 bits (a few of 1,000 above 2^32
        // would be a broken derivation).
        let high = (0..1000)
            .filter(|i| derive_number(&k, &format!("spiffe://t/{i}")) > u64::from(u32::MAX))
            .count();
        assert!(high > 990, "{high}");
    }

    const GOLDEN_FRONTEND_DEFAULT_KEY: u64 = 0xbd08_8bf4_1d03_0fa3;

    #[test]
    fn keys_come_from_16_or_more_bytes_hex_or_raw() {
        let e = IdentityKey::from_bytes(&[1; 15]).unwrap_err().to_string();
        assert!(e.contains("15 bytes") && e.contains("16"), "{e}");
        let raw = IdentityKey::from_bytes(b"0123456789abcdef").unwrap();
        let long = IdentityKey::from_bytes(b"0123456789abcdef0").unwrap();
        assert_ne!(raw, long, "longer material is condensed, not cut");
        let hex = "000102030405060708090a0b0c0d0e0f";
        let from_hex = IdentityKey::from_file_contents(format!("{hex}\n").as_bytes()).unwrap();
        let bytes: Vec<u8> = (0..16).collect();
        assert_eq!(from_hex, IdentityKey::from_bytes(&bytes).unwrap());
        // Too few hex digits: taken as raw bytes, then refused if short.
        assert!(IdentityKey::from_file_contents(b"00112233").is_err());
        assert_eq!(
            IdentityKey::from_file_contents(b"not hex, but long enough").unwrap(),
            IdentityKey::from_bytes(b"not hex, but long enough").unwrap()
        );
        // The key is never printed.
        assert_eq!(format!("{raw:?}"), "IdentityKey(<secret>)");
        assert!(format!("{:?}", IdentityKey::default()).contains("not secure"));
    }

    #[test]
    fn a_collision_is_refused_naming_both() {
        // A tiny number space (unit tests only) gives collisions on
        // demand; the real derivation is never weakened.
        let key = IdentityKey::tiny(4);
        let mut map = IdentityMap::new(key.clone());
        let a: Identity = "spiffe://t/a".parse().unwrap();
        let n = map.insert(&a).unwrap();
        assert_eq!(map.insert(&a).unwrap(), n, "same name twice is fine");
        let other = (0u64..)
            .map(|i| format!("spiffe://t/{i}").parse::<Identity>().unwrap())
            .find(|x| x.number(&key) == n)
            .unwrap();
        let e = map.insert(&other).unwrap_err().to_string();
        assert!(
            e.contains("spiffe://t/a") && e.contains(&other.to_string()),
            "{e}"
        );
    }
}
