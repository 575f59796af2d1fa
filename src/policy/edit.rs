//! Endpoints added, replaced or removed, worked out against the desired
//! state without compiling it again.
//!
//! A whole-state compile of 100,000 endpoints takes tens of milliseconds;
//! an endpoint change touches one map key and at most two identity names.
//! [`plan`] finds them from a [`View`] of the state at that key (one pass
//! over the endpoint list) and an [`Index`] of it (who uses which
//! identity), or says `None` where only a full compile gives the right
//! answer (and the right error): an address that another endpoint spells
//! differently (IPv4 and its v4-mapped IPv6 form), an identity number that
//! collides, a delete of something that is not there. [`plan_batch`]
//! plans a list of changes one after the other on one view, so a batch
//! costs one pass too. The unit tests check random plans and batches
//! against full compiles.

use std::collections::{BTreeMap, BTreeSet};

use super::identity::{Identity, IdentityMap, IdentityNumber};
use super::model::{Compiled, Endpoint, NodeName, PolicyState};
use crate::abi;
use crate::net::IpNet;

/// (prefix length over 128 bits, address words), as the maps key it.
pub(crate) type EndpointKey = (u32, [u32; 4]);
/// (identity number, node number).
pub(crate) type EndpointVal = (IdentityNumber, u32);

/// The key of an endpoint address or prefix.
pub(crate) fn key_of(ip: &IpNet) -> EndpointKey {
    (ip.mapped_prefix_len(), abi::ip_to_words(ip.addr()))
}

/// The value of an endpoint.
pub(crate) fn value_of(e: &Endpoint, identity: IdentityNumber) -> EndpointVal {
    (identity, e.node.as_ref().map_or(0, NodeName::number))
}

/// Who uses which identity in a desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Index {
    /// The identities of the endpoints and rules.
    pub identities: IdentityMap,
    /// How many endpoints have each identity number.
    pub endpoint_uses: BTreeMap<IdentityNumber, usize>,
    /// The identity numbers the rules name.
    pub rule_identities: BTreeSet<IdentityNumber>,
    /// Whether the state has names refused for a number collision: then
    /// only a full compile knows what an edit does (a refused name may
    /// win once the other goes).
    pub collisions: bool,
}

impl Index {
    /// The index of a compiled state.
    pub(crate) fn of(c: &Compiled) -> Index {
        Index {
            identities: c.identities.clone(),
            endpoint_uses: c.endpoint_uses.clone(),
            rule_identities: c.rule_identities.clone(),
            collisions: !c.collisions.is_empty(),
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
    pub added_identity: Option<(IdentityNumber, Identity)>,
    /// The identity numbers of the endpoints removed (one per endpoint).
    pub removed_identities: Vec<IdentityNumber>,
    /// Identity numbers the state no longer uses.
    pub dropped: Vec<IdentityNumber>,
}

/// The endpoints of a state at some keys, found in one pass over its
/// endpoint list: key -> address or prefix as spelled -> the identity
/// numbers of the endpoints there (one per endpoint).
#[derive(Debug, Clone, Default)]
pub(crate) struct View(BTreeMap<EndpointKey, BTreeMap<IpNet, Vec<IdentityNumber>>>);

impl View {
    pub(crate) fn of(state: &PolicyState, ids: &IdentityMap, keys: &BTreeSet<EndpointKey>) -> View {
        let mut v: BTreeMap<EndpointKey, BTreeMap<IpNet, Vec<IdentityNumber>>> =
            keys.iter().map(|k| (*k, BTreeMap::new())).collect();
        for e in &state.endpoints {
            if let Some(at) = v.get_mut(&key_of(&e.ip)) {
                at.entry(e.ip).or_default().push(ids.number_of(&e.identity));
            }
        }
        View(v)
    }

    /// The view once the endpoints at `ip` are replaced with `new`.
    fn apply(&mut self, ids: &IdentityMap, ip: IpNet, new: Option<&Endpoint>) {
        let at = self.0.entry(key_of(&ip)).or_default();
        at.remove(&ip);
        if let Some(e) = new {
            at.insert(ip, vec![ids.number_of(&e.identity)]);
        }
    }
}

/// The edit that replaces every endpoint at `ip` with `new` (upsert), or
/// removes them (`new` is `None`: delete), given a view that covers
/// `ip`'s key. `None` where a full compile must decide (see the module
/// docs).
pub(crate) fn plan(
    view: &View,
    index: &Index,
    extra: &BTreeSet<Identity>,
    ip: IpNet,
    new: Option<&Endpoint>,
) -> Option<EndpointEdit> {
    if index.collisions {
        return None;
    }
    let key = key_of(&ip);
    let mut removed_identities = Vec::new();
    for (spelled, ids) in view.0.get(&key)? {
        if *spelled != ip {
            // The same address spelled another way: leave it to compile.
            return None;
        }
        removed_identities.extend(ids);
    }
    if new.is_none() && removed_identities.is_empty() {
        return None;
    }
    let mut added_identity = None;
    let mut value = None;
    if let Some(e) = new {
        debug_assert_eq!(e.ip, ip);
        let n = index.identities.number_of(&e.identity);
        match index.identities.name(n) {
            Some(known) if known != &e.identity => return None,
            Some(_) => {}
            // A registered identity under the same number: a collision.
            None if extra
                .iter()
                .any(|x| index.identities.number_of(x) == n && x != &e.identity) =>
            {
                return None
            }
            None => {}
        }
        added_identity = Some((n, e.identity.clone()));
        value = Some(value_of(e, n));
    }
    let mut left: BTreeMap<IdentityNumber, usize> = BTreeMap::new();
    for n in &removed_identities {
        *left
            .entry(*n)
            .or_insert_with(|| index.endpoint_uses.get(n).copied().unwrap_or(0)) -= 1;
    }
    let dropped: Vec<IdentityNumber> = left
        .into_iter()
        .filter(|&(n, uses)| {
            uses == 0
                && added_identity.as_ref().map(|(a, _)| *a) != Some(n)
                && !index.rule_identities.contains(&n)
        })
        .map(|(n, _)| n)
        .collect();
    Some(EndpointEdit {
        key,
        value,
        added_identity,
        removed_identities,
        dropped,
    })
}

/// One change of a batch: an endpoint added or replaced (at its `ip`),
/// or the endpoints at an address or prefix removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointChange {
    /// Adds the endpoint, replacing any at the same `ip`.
    Upsert(Endpoint),
    /// Removes the endpoints at this address or prefix (an error if there
    /// are none).
    Delete(IpNet),
}

impl EndpointChange {
    /// The address or prefix it changes.
    pub fn ip(&self) -> IpNet {
        match self {
            EndpointChange::Upsert(e) => e.ip,
            EndpointChange::Delete(ip) => *ip,
        }
    }

    /// Applies it to a state's endpoint list; whether it found something
    /// to replace or remove.
    pub(crate) fn apply_to(&self, endpoints: &mut Vec<Endpoint>) -> bool {
        let ip = self.ip();
        let before = endpoints.len();
        endpoints.retain(|e| e.ip != ip);
        let found = endpoints.len() < before;
        if let EndpointChange::Upsert(e) = self {
            endpoints.push(e.clone());
        }
        found
    }
}

/// What a batch of changes does to the maps, worked out like [`plan`]
/// one change after the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchEdit {
    /// The addresses and prefixes the changes touched: their endpoints
    /// leave the list...
    pub touched: BTreeSet<IpNet>,
    /// ...and these join its end (the upserts that stand, in the order of
    /// their last change), as applying the changes one by one would.
    pub appended: Vec<Endpoint>,
    pub index: Index,
    /// Every key a change touched, with its final value (`None`:
    /// removed); keys whose value ends as it began are in it too.
    pub keys: BTreeMap<EndpointKey, Option<EndpointVal>>,
    /// Identity names to write: used afterwards, not before, not
    /// registered.
    pub named: Vec<(IdentityNumber, Identity)>,
    /// Identity names to remove: used before, not afterwards, not
    /// registered.
    pub unnamed: Vec<IdentityNumber>,
}

impl BatchEdit {
    /// Brings an endpoint list (the state the batch was planned on) along.
    pub(crate) fn apply_to(&self, endpoints: &mut Vec<Endpoint>) {
        endpoints.retain(|e| !self.touched.contains(&e.ip));
        endpoints.extend(self.appended.iter().cloned());
    }
}

/// The batch edit of `changes`, or `None` where any one of them must be
/// left to a full compile.
pub(crate) fn plan_batch(
    state: &PolicyState,
    index: &Index,
    extra: &BTreeSet<Identity>,
    changes: &[EndpointChange],
) -> Option<BatchEdit> {
    let ids = &index.identities;
    let mut view = View::of(
        state,
        ids,
        &changes.iter().map(|c| key_of(&c.ip())).collect(),
    );
    let mut after = index.clone();
    let mut keys = BTreeMap::new();
    // Per address: the position of its last change and what stands.
    let mut last: BTreeMap<IpNet, (usize, Option<&Endpoint>)> = BTreeMap::new();
    for (i, c) in changes.iter().enumerate() {
        let new = match c {
            EndpointChange::Upsert(e) => Some(e),
            EndpointChange::Delete(_) => None,
        };
        let edit = plan(&view, &after, extra, c.ip(), new)?;
        after.apply(&edit);
        keys.insert(edit.key, edit.value);
        view.apply(ids, c.ip(), new);
        last.insert(c.ip(), (i, new));
    }
    let mut standing: Vec<(usize, &Endpoint)> =
        last.values().filter_map(|&(i, e)| Some((i, e?))).collect();
    standing.sort_by_key(|&(i, _)| i);
    let registered = |n: &IdentityNumber| extra.iter().any(|x| ids.number_of(x) == *n);
    let named = after
        .identities
        .iter()
        .filter(|(n, _)| index.identities.name(*n).is_none() && !registered(n))
        .map(|(n, id)| (n, id.clone()))
        .collect();
    let unnamed = index
        .identities
        .iter()
        .map(|(n, _)| n)
        .filter(|n| after.identities.name(*n).is_none() && !registered(n))
        .collect();
    Some(BatchEdit {
        touched: last.keys().copied().collect(),
        appended: standing.into_iter().map(|(_, e)| e.clone()).collect(),
        index: after,
        keys,
        named,
        unnamed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::identity::IdentityKey;
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
    fn names(c: &Compiled, extra: &BTreeSet<Identity>) -> BTreeSet<IdentityNumber> {
        c.identities
            .iter()
            .map(|(n, _)| n)
            .chain(extra.iter().map(|x| c.identities.number_of(x)))
            .collect()
    }

    /// Random upserts and deletes; each plan, applied to the compiled
    /// entries and the index, must equal a full compile of the edited
    /// state.
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
                if state.compile(&IdentityKey::default()).is_ok() {
                    state.endpoints.push(e);
                }
            }
            let Ok(mut compiled) = state.compile(&IdentityKey::default()) else {
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
                let full = next.compile(&IdentityKey::default());
                let view = View::of(&state, &index.identities, &[key_of(&ip)].into());
                let Some(edit) = plan(&view, &index, &extra, ip, new.as_ref()) else {
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
                state = next;
                compiled = want;
            }
        }
        assert!(
            planned > 1000 && declined > 50,
            "{planned} planned, {declined} declined"
        );
    }

    /// Random batches; each, applied to the compiled entries, must equal
    /// a full compile of the state with the changes applied in order.
    #[test]
    fn every_batch_matches_a_full_compile() {
        let mut r = Rng(0x51_7cc1_b727_220a);
        let extra: BTreeSet<Identity> = [identity(3).parse().unwrap()].into();
        let (mut planned, mut declined) = (0, 0);
        for _round in 0..300 {
            let mut state = PolicyState {
                default_action: DefaultAction::Deny,
                endpoints: Vec::new(),
                policies: vec![
                    Rule::new(&identity(0), &identity(1), "tcp", &[80], "allow").unwrap()
                ],
            };
            for _ in 0..r.below(10) {
                let e = endpoint(&mut r);
                let mut next = state.clone();
                EndpointChange::Upsert(e).apply_to(&mut next.endpoints);
                if next.compile(&IdentityKey::default()).is_ok() {
                    state = next;
                }
            }
            let compiled = state.compile(&IdentityKey::default()).unwrap();
            let index = Index::of(&compiled);
            let changes: Vec<EndpointChange> = (0..1 + r.below(8))
                .map(|_| {
                    if r.below(3) == 0 && !state.endpoints.is_empty() {
                        let i = r.below(state.endpoints.len() as u64) as usize;
                        EndpointChange::Delete(state.endpoints[i].ip)
                    } else {
                        EndpointChange::Upsert(endpoint(&mut r))
                    }
                })
                .collect();
            let mut next = state.clone();
            let found: Vec<bool> = changes
                .iter()
                .map(|c| c.apply_to(&mut next.endpoints))
                .collect();
            let full = next.compile(&IdentityKey::default());
            let Some(batch) = plan_batch(&state, &index, &extra, &changes) else {
                declined += 1;
                continue;
            };
            planned += 1;
            assert!(
                changes
                    .iter()
                    .zip(&found)
                    .all(|(c, f)| *f || matches!(c, EndpointChange::Upsert(_))),
                "a delete of nothing was planned: {changes:?}"
            );
            let want = full.expect("a planned batch compiles");
            let mut endpoints = state.endpoints.clone();
            batch.apply_to(&mut endpoints);
            assert_eq!(endpoints, next.endpoints, "{changes:?}");
            let mut entries = compiled.endpoints.clone();
            for (k, v) in &batch.keys {
                match v {
                    Some(v) => entries.insert(*k, *v),
                    None => entries.remove(k),
                };
            }
            assert_eq!(entries, want.endpoints, "entries after {changes:?}");
            assert_eq!(batch.index, Index::of(&want), "index after {changes:?}");
            let (before, after) = (names(&compiled, &extra), names(&want, &extra));
            let named: BTreeSet<IdentityNumber> = batch.named.iter().map(|(n, _)| *n).collect();
            assert_eq!(named, after.difference(&before).copied().collect());
            let unnamed: BTreeSet<IdentityNumber> = batch.unnamed.iter().copied().collect();
            assert_eq!(unnamed, before.difference(&after).copied().collect());
        }
        assert!(
            planned > 150 && declined > 10,
            "{planned} planned, {declined} declined"
        );
    }

    #[test]
    fn an_identity_number_collision_is_left_to_compile() {
        let state = PolicyState {
            endpoints: vec![Endpoint::new("198.18.0.1", &identity(1)).unwrap()],
            ..PolicyState::default()
        };
        let mut index = Index::of(&state.compile(&IdentityKey::default()).unwrap());
        let e = Endpoint::new("198.18.0.2", &identity(1)).unwrap();
        let view = View::of(&state, &index.identities, &[key_of(&e.ip)].into());
        assert!(plan(&view, &index, &BTreeSet::new(), e.ip, Some(&e)).is_some());
        // Another identity under w1's number, as if the two collided.
        let w1: Identity = identity(1).parse().unwrap();
        let n = index.identities.number_of(&w1);
        index.identities.remove(n);
        index.identities.force(n, identity(2).parse().unwrap());
        assert_eq!(plan(&view, &index, &BTreeSet::new(), e.ip, Some(&e)), None);
    }

    /// A state with a refused name (a collision in a tiny number space)
    /// is only ever changed through a full compile, which decides again
    /// who wins.
    #[test]
    fn a_state_with_a_collision_is_left_to_compile() {
        let key = IdentityKey::tiny(2);
        let ids: Vec<String> = (0..8).map(identity).collect();
        let state = PolicyState {
            endpoints: ids
                .iter()
                .enumerate()
                .map(|(i, id)| Endpoint::new(&format!("198.18.0.{i}"), id).unwrap())
                .collect(),
            ..PolicyState::default()
        };
        let c = state.compile(&key).unwrap();
        assert!(!c.collisions.is_empty());
        let index = Index::of(&c);
        let e = Endpoint::new("198.18.1.1", &identity(0)).unwrap();
        let view = View::of(&state, &index.identities, &[key_of(&e.ip)].into());
        assert_eq!(plan(&view, &index, &BTreeSet::new(), e.ip, Some(&e)), None);
    }
}
