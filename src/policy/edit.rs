//! One endpoint added, replaced or removed, worked out against the desired
//! state without compiling it again.
//!
//! A whole-state compile of 100,000 endpoints takes tens of milliseconds;
//! an endpoint change touches one map key and at most two identity names.
//! [`plan`] finds them from the desired state and an [`Index`] of it (who
//! uses which identity), or says `None` where only a full compile gives
//! the right answer (and the right error): an address that another
//! endpoint spells differently (IPv4 and its v4-mapped IPv6 form), an
//! identity number that collides, a delete of something that is not
//! there. The unit tests check every plan against a full compile.

use std::collections::{BTreeMap, BTreeSet};

use super::identity::{Identity, IdentityMap};
use super::model::{Compiled, Endpoint, NodeName, PolicyState};
use crate::abi;
use crate::net::IpNet;

/// (prefix length over 128 bits, address words), as the maps key it.
pub(crate) type EndpointKey = (u32, [u32; 4]);
/// (identity number, node number).
pub(crate) type EndpointVal = (u32, u32);

/// The key of an endpoint address or prefix.
pub(crate) fn key_of(ip: &IpNet) -> EndpointKey {
    (ip.mapped_prefix_len(), abi::ip_to_words(ip.addr()))
}

/// The value of an endpoint.
pub(crate) fn value_of(e: &Endpoint, identity: u32) -> EndpointVal {
    (identity, e.node.as_ref().map_or(0, NodeName::number))
}

/// Who uses which identity in a desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Index {
    /// The identities of the endpoints and rules.
    pub identities: IdentityMap,
    /// How many endpoints have each identity number.
    pub endpoint_uses: BTreeMap<u32, usize>,
    /// The identity numbers the rules name.
    pub rule_identities: BTreeSet<u32>,
}

impl Index {
    /// The index of a compiled state.
    pub(crate) fn of(c: &Compiled) -> Index {
        Index {
            identities: c.identities.clone(),
            endpoint_uses: c.endpoint_uses.clone(),
            rule_identities: c.rule_identities.clone(),
        }
    }

    /// The index once `edit` is applied.
    pub(crate) fn apply(&mut self, edit: &EndpointEdit) {
        for n in &edit.removed_identities {
            if let Some(u) = self.endpoint_uses.get_mut(n) {
                *u -= 1;
                if *u == 0 {
                    self.endpoint_uses.remove(n);
                }
            }
        }
        if let Some((n, id)) = &edit.added_identity {
            *self.endpoint_uses.entry(*n).or_default() += 1;
            // Cannot collide: `plan` checked.
            let _ = self.identities.insert(id);
        }
        for n in &edit.dropped {
            self.identities.remove(*n);
        }
    }
}

/// What one endpoint change does to the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointEdit {
    pub key: EndpointKey,
    /// What the key maps to afterwards; `None`: removed.
    pub value: Option<EndpointVal>,
    /// The identity of the new endpoint (its number, and the identity).
    pub added_identity: Option<(u32, Identity)>,
    /// The identity numbers of the endpoints removed (one per endpoint).
    pub removed_identities: Vec<u32>,
    /// Identity numbers the state no longer uses.
    pub dropped: Vec<u32>,
    /// Identity names to write (used now, not before, not registered).
    pub named: Option<(u32, Identity)>,
    /// Identity names to remove (dropped, not registered: registered
    /// identities keep theirs).
    pub unnamed: Vec<u32>,
}

/// The edit that replaces every endpoint at `ip` with `new` (upsert), or
/// removes them (`new` is `None`: delete). `None` where a full compile
/// must decide (see the module docs).
pub(crate) fn plan(
    state: &PolicyState,
    index: &Index,
    extra: &BTreeSet<Identity>,
    ip: IpNet,
    new: Option<&Endpoint>,
) -> Option<EndpointEdit> {
    let key = key_of(&ip);
    let mut removed_identities = Vec::new();
    for e in &state.endpoints {
        if e.ip == ip {
            removed_identities.push(e.identity.number());
        } else if key_of(&e.ip) == key {
            // The same address spelled another way: leave it to compile.
            return None;
        }
    }
    if new.is_none() && removed_identities.is_empty() {
        return None;
    }
    let mut added_identity = None;
    let mut named = None;
    let mut value = None;
    if let Some(e) = new {
        debug_assert_eq!(e.ip, ip);
        let n = e.identity.number();
        match index.identities.name(n) {
            Some(known) if known != &e.identity => return None,
            Some(_) => {}
            None => match extra.iter().find(|x| x.number() == n) {
                Some(x) if x != &e.identity => return None,
                Some(_) => {}
                None => named = Some((n, e.identity.clone())),
            },
        }
        added_identity = Some((n, e.identity.clone()));
        value = Some(value_of(e, n));
    }
    let mut left: BTreeMap<u32, usize> = BTreeMap::new();
    for n in &removed_identities {
        *left
            .entry(*n)
            .or_insert_with(|| index.endpoint_uses.get(n).copied().unwrap_or(0)) -= 1;
    }
    let dropped: Vec<u32> = left
        .into_iter()
        .filter(|&(n, uses)| {
            uses == 0
                && added_identity.as_ref().map(|(a, _)| *a) != Some(n)
                && !index.rule_identities.contains(&n)
        })
        .map(|(n, _)| n)
        .collect();
    let unnamed = dropped
        .iter()
        .copied()
        .filter(|n| !extra.iter().any(|x| x.number() == *n))
        .collect();
    Some(EndpointEdit {
        key,
        value,
        added_identity,
        removed_identities,
        dropped,
        named,
        unnamed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{DefaultAction, Rule};

    /// A small deterministic generator (xorshift64*): the same sequence
    /// every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn identity(i: u64) -> String {
        format!("spiffe://mesh.local/ns/t/sa/w{i}")
    }

    /// Addresses from a small pool, so that upserts replace and deletes
    /// hit: IPv4 hosts, IPv6 hosts, v4-mapped IPv6 forms of the IPv4
    /// hosts (same key, other spelling), and prefixes.
    fn address(r: &mut Rng) -> String {
        let i = r.below(12);
        match r.below(8) {
            0 => format!("::ffff:198.18.0.{i}/128"),
            1 => format!("2001:db8::{i:x}"),
            2 => format!("198.19.{i}.0/24"),
            _ => format!("198.18.0.{i}"),
        }
    }

    fn endpoint(r: &mut Rng) -> Endpoint {
        let mut e = Endpoint::new(&address(r), &identity(r.below(6))).unwrap();
        if r.below(4) == 0 {
            e.node = Some(format!("node-{}", r.below(3)).parse().unwrap());
        }
        e
    }

    /// The names the kernel holds for a state: its identities and the
    /// registered ones.
    fn names(c: &Compiled, extra: &BTreeSet<Identity>) -> BTreeSet<u32> {
        c.identities
            .iter()
            .map(|(n, _)| n)
            .chain(extra.iter().map(Identity::number))
            .collect()
    }

    /// Random upserts and deletes; each plan, applied to the compiled
    /// entries and the index, must equal a full compile of the edited
    /// state, and its identity names the difference in names.
    #[test]
    fn every_plan_matches_a_full_compile() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut planned, mut declined) = (0, 0);
        for _round in 0..40 {
            let mut state = PolicyState {
                default_action: DefaultAction::Deny,
                endpoints: Vec::new(),
                policies: vec![
                    Rule::new(&identity(0), &identity(1), "tcp", &[80], "allow").unwrap(),
                    Rule::new("*", &identity(2), "any", &[], "deny").unwrap(),
                ],
            };
            let extra: BTreeSet<Identity> = [identity(3).parse().unwrap()].into();
            for _ in 0..r.below(8) {
                let e = endpoint(&mut r);
                state.endpoints.retain(|x| x.ip != e.ip);
                if state.compile().is_ok() {
                    state.endpoints.push(e);
                }
            }
            let Ok(mut compiled) = state.compile() else {
                continue;
            };
            let mut index = Index::of(&compiled);
            for _ in 0..60 {
                let (ip, new) = if r.below(3) == 0 {
                    let ip = match state.endpoints.len() {
                        0 => endpoint(&mut r).ip,
                        n if r.below(4) > 0 => state.endpoints[r.below(n as u64) as usize].ip,
                        _ => endpoint(&mut r).ip,
                    };
                    (ip, None)
                } else {
                    let e = endpoint(&mut r);
                    (e.ip, Some(e))
                };
                let mut next = state.clone();
                next.endpoints.retain(|x| x.ip != ip);
                let deleted = next.endpoints.len() < state.endpoints.len();
                next.endpoints.extend(new.clone());
                let full = next.compile();
                let Some(edit) = plan(&state, &index, &extra, ip, new.as_ref()) else {
                    // Declined: a full compile decides (an error, a
                    // delete of nothing, or another spelling).
                    declined += 1;
                    if full.is_ok() && (new.is_some() || deleted) {
                        let other_spelling = state
                            .endpoints
                            .iter()
                            .any(|x| x.ip != ip && key_of(&x.ip) == key_of(&ip));
                        assert!(other_spelling, "declined a plain edit at {ip}");
                    }
                    if let Ok(c) = full {
                        state = next;
                        compiled = c;
                        index = Index::of(&compiled);
                    }
                    continue;
                };
                planned += 1;
                let want = full.expect("a planned edit compiles");
                let mut entries = compiled.endpoints.clone();
                match edit.value {
                    Some(v) => entries.insert(edit.key, v),
                    None => entries.remove(&edit.key),
                };
                assert_eq!(entries, want.endpoints, "entries after {edit:?}");
                index.apply(&edit);
                assert_eq!(index, Index::of(&want), "index after {edit:?}");
                let (before, after) = (names(&compiled, &extra), names(&want, &extra));
                let named: BTreeSet<u32> = edit.named.iter().map(|(n, _)| *n).collect();
                let added: BTreeSet<u32> = after.difference(&before).copied().collect();
                assert_eq!(named, added, "names written by {edit:?}");
                let gone: BTreeSet<u32> = before.difference(&after).copied().collect();
                let unnamed: BTreeSet<u32> = edit.unnamed.iter().copied().collect();
                assert_eq!(unnamed, gone, "names removed by {edit:?}");
                state = next;
                compiled = want;
            }
        }
        assert!(
            planned > 1000 && declined > 50,
            "{planned} planned, {declined} declined"
        );
    }

    #[test]
    fn an_identity_number_collision_is_left_to_compile() {
        let state = PolicyState {
            endpoints: vec![Endpoint::new("198.18.0.1", &identity(1)).unwrap()],
            ..PolicyState::default()
        };
        let mut index = Index::of(&state.compile().unwrap());
        let e = Endpoint::new("198.18.0.2", &identity(1)).unwrap();
        assert!(plan(&state, &index, &BTreeSet::new(), e.ip, Some(&e)).is_some());
        // Another identity under w1's number, as if the two collided.
        let w1: Identity = identity(1).parse().unwrap();
        index.identities.remove(w1.number());
        index
            .identities
            .force(w1.number(), identity(2).parse().unwrap());
        assert_eq!(plan(&state, &index, &BTreeSet::new(), e.ip, Some(&e)), None);
    }
}
