//! Identity-based policy: endpoints (addresses to identities), identities
//! (SPIFFE IDs to numbers), rules, and applying a desired state to the
//! datapath atomically.
//!
//! Every change is a whole-state replace under the hood: the new state is
//! validated and compiled first (nothing changes when it does not
//! validate), written into the idle copy of the endpoint and policy maps
//! as a diff, made live by one store of the policy word (epoch, default
//! action, generation), and then copied into the other copy. A decision
//! sees the old state or the new one, never a mix. Established TCP flows
//! the new state denies are then reset (`reset_denied_flows`).
//!
//! Endpoint upserts and deletes take the same steps with one key instead
//! of a diff of the compiled state (`edit`), where that gives the same
//! result as a full compile.

mod edit;
pub mod identity;
pub mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use edit::EndpointChange;
pub use identity::{
    derive_number, Identity, IdentityCollision, IdentityKey, IdentityMap, IdentityNumber, SpiffeId,
};
pub use model::{Action, DefaultAction, Endpoint, NodeName, Peer, PolicyState, Protocol, Rule};

use crate::abi::{self, EndpointValue, HostKey, IdentityName, LpmKey, PolicyKey, PolicyValue};
use crate::datapath::{read_settings, Datapath};
use crate::error::{Error, Result};
use crate::maps::MapSet;
use crate::net::IpNet;
use edit::{EndpointKey, EndpointVal};
use model::{Compiled, PolicyKeyBytes};

/// The library's copy of the desired state.
#[derive(Debug, Default)]
pub(crate) struct PolicySlot {
    state: Option<PolicyState>,
    /// Identities registered without being used (upsert_identity).
    extra: BTreeSet<Identity>,
    /// What each copy (epoch) of the endpoint and policy maps holds, as
    /// this datapath last wrote it.
    copies: [Known; 2],
    /// Who uses which identity in `state` (for endpoint edits).
    index: Option<edit::Index>,
    /// The names the last change refused for a number collision.
    collisions: Vec<IdentityCollision>,
}

/// The entries of one copy of the endpoint and policy maps, as last
/// written: the next change diffs against them instead of reading the
/// maps back. `None` (at load, pinned maps adopted included, and after a
/// write that failed part-way): read the maps.
type Known = Option<CopyEntries>;

#[derive(Debug, Clone)]
struct CopyEntries {
    /// The endpoint trie: prefixes.
    prefixes: Arc<EndpointEntries>,
    /// The host hash: single addresses, keyed (HOST_PREFIX, address).
    hosts: Arc<EndpointEntries>,
    rules: Arc<RuleEntries>,
}

impl CopyEntries {
    /// What a copy holds for a compiled state. Shared (`Arc`) between
    /// the two copies and what is known of them.
    fn of(c: &Compiled) -> CopyEntries {
        let (hosts, prefixes): (EndpointEntries, EndpointEntries) = c
            .endpoints
            .iter()
            .map(|(k, v)| (*k, *v))
            .partition(|((plen, _), _)| *plen == HOST_PREFIX);
        CopyEntries {
            prefixes: Arc::new(prefixes),
            hosts: Arc::new(hosts),
            rules: Arc::new(c.rules.clone()),
        }
    }
}

/// (prefix length over 128 bits, address words) -> (identity, node).
type EndpointEntries = BTreeMap<(u32, [u32; 4]), (IdentityNumber, u32)>;
type RuleEntries = BTreeMap<PolicyKeyBytes, (u8, u32)>;

/// The prefix length of a single address (v4-mapped IPv4 included).
const HOST_PREFIX: u32 = 128;

/// What a policy change did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolicyChange {
    /// Endpoint entries written (added or changed).
    pub endpoints_written: usize,
    /// Endpoint entries removed.
    pub endpoints_removed: usize,
    /// Policy entries written (added or changed).
    pub rules_written: usize,
    /// Policy entries removed.
    pub rules_removed: usize,
    /// The policy generation now live.
    pub generation: u32,
    /// Established flows reset because the new state denies them (in the
    /// caller's network namespace).
    pub flows_reset: u64,
    /// Why resetting denied flows failed, if it did. The new state is live
    /// either way (the packet hooks drop the denied flows' packets).
    pub reset_error: Option<String>,
    /// Applied as key edits (`upsert_endpoint`, `delete_endpoint`,
    /// `change_endpoints`) without compiling the whole state again.
    pub incremental: bool,
    /// Names refused because another name has their identity number (a
    /// collision: never by chance in practice, never searchable without
    /// the identity key). Each refused name's endpoints and rules were
    /// left out; everything else applied. Also in
    /// [`Datapath::identity_collisions`] until the next change.
    pub identity_collisions: Vec<IdentityCollision>,
}

impl Datapath {
    /// The desired policy state, or `None` while no policy is set (then
    /// everything passes unchecked).
    pub fn policy(&self) -> Option<PolicyState> {
        self.lock_policy().state.clone()
    }

    /// Replaces the whole policy state. Validates first: on error nothing
    /// changes. Applies the difference atomically (see the module docs),
    /// then resets established TCP flows the new state denies (a failure
    /// of that last step is reported in `PolicyChange::reset_error`: the
    /// state is live once this returns `Ok`).
    pub fn replace_policy(&self, state: &PolicyState) -> Result<PolicyChange> {
        let mut slot = self.lock_policy();
        self.apply_locked(&mut slot, state.clone())
    }

    /// Turns policy off: everything passes unchecked, at every point.
    pub fn disable_policy(&self) -> Result<()> {
        let mut slot = self.lock_policy();
        let (gen, _, _, epoch) = abi::policy_word_parts(read_settings(self.maps())?.policy);
        self.update_settings(|s| {
            s.policy = abi::policy_word(gen.wrapping_add(1), false, 0, epoch)
        })?;
        slot.state = None;
        slot.index = None;
        slot.collisions.clear();
        Ok(())
    }

    /// Starts a new policy generation without changing the rules:
    /// short-circuited flows judge themselves again at their next message
    /// (after an authentication was revoked, for instance).
    pub(crate) fn bump_policy_generation(&self) -> Result<()> {
        let _slot = self.lock_policy();
        self.update_settings(|s| {
            let (gen, on, default, epoch) = abi::policy_word_parts(s.policy);
            s.policy = abi::policy_word(gen.wrapping_add(1), on, default, epoch);
        })
    }

    /// Adds or replaces the endpoint for `endpoint.ip` (starting from an
    /// allow-by-default state when no policy is set). Applied as a
    /// one-key edit where it can be (`PolicyChange::incremental`).
    pub fn upsert_endpoint(&self, endpoint: Endpoint) -> Result<PolicyChange> {
        self.apply_endpoint_changes(&[EndpointChange::Upsert(endpoint)], |_| "endpoint".into())
    }

    /// Removes the endpoint for `ip`; its addresses become `world`.
    pub fn delete_endpoint(&self, ip: IpNet) -> Result<PolicyChange> {
        self.apply_endpoint_changes(&[EndpointChange::Delete(ip)], |_| "endpoint".into())
    }

    /// The endpoints of the desired state.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.policy().map(|s| s.endpoints).unwrap_or_default()
    }

    /// Adds a rule, or replaces the action of the rule with the same
    /// from, to, protocol and ports.
    pub fn upsert_rule(&self, rule: Rule) -> Result<PolicyChange> {
        self.modify(|s| {
            let same = |r: &Rule| {
                r.from == rule.from
                    && r.to == rule.to
                    && r.protocol == rule.protocol
                    && r.ports == rule.ports
            };
            s.policies.retain(|r| !same(r));
            s.policies.push(rule);
            Ok(())
        })
    }

    /// Removes the rule with these from, to, protocol and ports.
    pub fn delete_rule(
        &self,
        from: &Peer,
        to: &Peer,
        protocol: Protocol,
        ports: &[u16],
    ) -> Result<PolicyChange> {
        self.modify(|s| {
            let before = s.policies.len();
            s.policies.retain(|r| {
                !(&r.from == from && &r.to == to && r.protocol == protocol && r.ports == ports)
            });
            if s.policies.len() == before {
                return Err(Error::invalid(
                    "rule",
                    format!("no rule {from} -> {to} {protocol} {ports:?}"),
                ));
            }
            Ok(())
        })
    }

    /// The rules of the desired state.
    pub fn rules(&self) -> Vec<Rule> {
        self.policy().map(|s| s.policies).unwrap_or_default()
    }

    /// Sets the action where no rule matches.
    pub fn set_default_action(&self, action: DefaultAction) -> Result<PolicyChange> {
        self.modify(|s| {
            s.default_action = action;
            Ok(())
        })
    }

    /// The number of `identity` under this datapath's identity key
    /// ([`crate::DatapathOptions::identity_key`]).
    pub fn identity_number(&self, identity: &Identity) -> IdentityNumber {
        identity.number(&self.inner.identity_key)
    }

    /// Whether identity numbers are derived with the default key (public:
    /// collisions can be searched offline, see [`IdentityKey`]).
    pub fn identity_key_is_default(&self) -> bool {
        self.inner.identity_key.is_default()
    }

    /// The names the live state refused because another name has their
    /// number (see [`PolicyChange::identity_collisions`]); empty when
    /// there are none, which is what to expect.
    pub fn identity_collisions(&self) -> Vec<IdentityCollision> {
        self.lock_policy().collisions.clone()
    }

    /// Registers an identity (before any endpoint or rule uses it), so
    /// that a collision with another name is found now (refused, naming
    /// both). Its number.
    pub fn upsert_identity(&self, identity: Identity) -> Result<IdentityNumber> {
        let mut slot = self.lock_policy();
        let mut all = self.identities_of(&slot)?;
        let n = all.insert(&identity)?;
        slot.extra.insert(identity.clone());
        self.write_identity(n, &identity)?;
        Ok(n)
    }

    /// Forgets a registered identity; refused while an endpoint or a rule
    /// uses it (the error names the field).
    pub fn delete_identity(&self, identity: &Identity) -> Result<()> {
        let mut slot = self.lock_policy();
        if let Some(s) = &slot.state {
            for (i, e) in s.endpoints.iter().enumerate() {
                if &e.identity == identity {
                    return Err(Error::invalid(
                        format!("endpoints[{i}].identity"),
                        format!("{identity} is used here"),
                    ));
                }
            }
            for (i, r) in s.policies.iter().enumerate() {
                for (side, p) in [("from", &r.from), ("to", &r.to)] {
                    if p == &Peer::Is(identity.clone()) {
                        return Err(Error::invalid(
                            format!("policies[{i}].{side}"),
                            format!("{identity} is used here"),
                        ));
                    }
                }
            }
        }
        if !slot.extra.remove(identity) {
            return Err(Error::invalid(
                "identity",
                format!("{identity} is not registered"),
            ));
        }
        self.maps()
            .typed::<u64, IdentityName>(IDENTITIES_MAP)?
            .delete(&self.identity_number(identity))?;
        Ok(())
    }

    /// Every identity known: used by the state or registered.
    pub fn identities(&self) -> Result<IdentityMap> {
        let slot = self.lock_policy();
        self.identities_of(&slot)
    }

    /// The name the datapath has for a number (from the identity map the
    /// library keeps in the kernel: works for observers of pinned state).
    pub fn identity_name(&self, number: IdentityNumber) -> Result<Option<String>> {
        let m = self.maps().typed::<u64, IdentityName>(IDENTITIES_MAP)?;
        Ok(m.lookup(&number)?.map(|n| {
            let len = (n.len as usize).min(n.name.len());
            String::from_utf8_lossy(&n.name[..len]).into_owned()
        }))
    }

    /// Resets every established TCP flow that meshpath tracks
    /// (established in an attached cgroup) and that the live policy
    /// denies: the peer gets a RST, the application ECONNABORTED. Covers
    /// the caller's network namespace and every namespace a process of an
    /// attached cgroup is in. Returns how many. `replace_policy` runs it.
    pub fn reset_denied_flows(&self) -> Result<u64> {
        let mut n = 0;
        for ns in crate::netns::namespaces_of(&self.attached_cgroups())? {
            n += ns.run(|| self.reset_here())?;
        }
        Ok(n)
    }

    /// Like [`Datapath::reset_denied_flows`], in the network namespace at
    /// `netns` only (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`).
    pub fn reset_denied_flows_in(&self, netns: &std::path::Path) -> Result<u64> {
        crate::netns::Netns::open(netns)?.run(|| self.reset_here())
    }

    /// Flows in the packet hooks' verdict cache, stale ones included
    /// (those made under an earlier policy generation, which are never
    /// used again and are replaced as their flows come back or evicted
    /// as new flows need room).
    pub fn verdict_cache_len(&self) -> Result<usize> {
        Ok(self
            .maps()
            .typed::<abi::VcacheKey, abi::VcacheValue>("meshpath_verdict_cache_v2")?
            .entries()?
            .len())
    }

    /// Runs the reset iterator in the calling thread's namespace; the
    /// sockets it judged denied but could not reset itself (no
    /// `bpf_sock_destroy`) are reset here through sock_diag.
    fn reset_here(&self) -> Result<u64> {
        let out = self.run_iterator("meshpath_reset", &self.inner.reset.progs.meshpath_reset)?;
        let mut n = 0;
        for rec in crate::diag::records(&out)? {
            if rec.outcome == abi::EnrollOutcomeId::MP_ENROLL_DENIED.0 {
                self.destroy_reported(&rec).map_err(|e| Error::KernelFeature {
                    feature: "resetting established flows (bpf_sock_destroy, Linux 6.5+, or sock_diag SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY)",
                    detail: format!("destroying {} -> {}: {e}", rec.key.local(), rec.key.remote()),
                })?;
            }
            n += 1;
        }
        Ok(n)
    }

    fn lock_policy(&self) -> std::sync::MutexGuard<'_, PolicySlot> {
        self.inner.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn modify(&self, f: impl FnOnce(&mut PolicyState) -> Result<()>) -> Result<PolicyChange> {
        let mut slot = self.lock_policy();
        self.modify_locked(&mut slot, f)
    }

    fn modify_locked(
        &self,
        slot: &mut PolicySlot,
        f: impl FnOnce(&mut PolicyState) -> Result<()>,
    ) -> Result<PolicyChange> {
        let mut state = slot.state.clone().unwrap_or_default();
        f(&mut state)?;
        self.apply_locked(slot, state)
    }

    /// What an endpoint edit starts from: the desired state and its
    /// index, both copies known to hold it, and the live policy word.
    /// `None` where the full path must do it: no policy yet, a copy not
    /// known to hold the desired state (after a failed write, or pins
    /// adopted), or policy off.
    fn edit_base(slot: &PolicySlot, maps: &MapSet) -> Option<Result<EditBase>> {
        let (Some(_), Some(_), [Some(a), Some(b)]) = (&slot.state, &slot.index, &slot.copies)
        else {
            return None;
        };
        // Who wins a collision is decided by a full compile.
        if !slot.collisions.is_empty() {
            return None;
        }
        if !(Arc::ptr_eq(&a.hosts, &b.hosts)
            && Arc::ptr_eq(&a.prefixes, &b.prefixes)
            && Arc::ptr_eq(&a.rules, &b.rules))
        {
            return None;
        }
        let word = match read_settings(maps) {
            Ok(s) => s.policy,
            Err(e) => return Some(Err(e)),
        };
        let (gen, on, default, live) = abi::policy_word_parts(word);
        on.then_some(Ok(EditBase { gen, default, live }))
    }

    /// Applies `changes` in order, as one change (one new generation):
    /// as key edits where every one of them can be (`edit::plan_batch`),
    /// else through the full path. All or nothing: on error (which names
    /// the change at fault as `changes[i]`) nothing changes.
    pub fn change_endpoints(&self, changes: &[EndpointChange]) -> Result<PolicyChange> {
        self.apply_endpoint_changes(changes, |i| format!("changes[{i}]"))
    }

    /// `changes` as key edits where they can be, else through the full
    /// path; a delete of nothing is an error naming `field(i)`.
    fn apply_endpoint_changes(
        &self,
        changes: &[EndpointChange],
        field: impl Fn(usize) -> String,
    ) -> Result<PolicyChange> {
        let mut slot = self.lock_policy();
        if let Some(r) = self.edit_endpoints(&mut slot, changes) {
            return r;
        }
        self.modify_locked(&mut slot, |s| {
            for (i, c) in changes.iter().enumerate() {
                if !c.apply_to(&mut s.endpoints) && matches!(c, EndpointChange::Delete(_)) {
                    return Err(Error::invalid(
                        field(i),
                        format!("{} is not an endpoint", c.ip()),
                    ));
                }
            }
            Ok(())
        })
    }

    /// Applies `changes` as key edits (`edit::plan_batch`), without
    /// compiling the whole state; `None` where the full path must.
    fn edit_endpoints(
        &self,
        slot: &mut PolicySlot,
        changes: &[EndpointChange],
    ) -> Option<Result<PolicyChange>> {
        let base = match Self::edit_base(slot, self.maps())? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let (Some(state), Some(index)) = (&slot.state, &slot.index) else {
            return None;
        };
        let mut batch = edit::plan_batch(state, index, &slot.extra, changes)?;
        let keys = std::mem::take(&mut batch.keys);
        let named = std::mem::take(&mut batch.named);
        let unnamed = std::mem::take(&mut batch.unnamed);
        Some(
            self.apply_key_edits(slot, base, keys, named, &unnamed, move |slot| {
                if let Some(state) = slot.state.as_mut() {
                    batch.apply_to(&mut state.endpoints);
                }
                slot.index = Some(batch.index);
            }),
        )
    }

    /// Writes endpoint keys (`None`: removed) around the same switch of
    /// the policy word as a full apply: the idle copy, the new identity
    /// names, the word (new generation, idle copy live), an RCU grace
    /// period, the other copy, the names no longer used. Then `commit`
    /// brings the desired state and its index along, the known copies are
    /// edited in place, and the reset iterator runs.
    fn apply_key_edits(
        &self,
        slot: &mut PolicySlot,
        EditBase { gen, default, live }: EditBase,
        keys: BTreeMap<EndpointKey, Option<EndpointVal>>,
        named: Vec<(IdentityNumber, Identity)>,
        unnamed: &[IdentityNumber],
        commit: impl FnOnce(&mut PolicySlot),
    ) -> Result<PolicyChange> {
        let maps = self.maps();
        let idle = live ^ 1;
        let gen = gen.wrapping_add(1);
        // Only the keys whose value changes are written.
        let keys: Vec<(EndpointKey, Option<EndpointVal>)> = {
            let known = slot.copies[idle as usize].as_ref();
            keys.into_iter()
                .filter(|(k, v)| {
                    let map = known.map(|c| {
                        if k.0 == HOST_PREFIX {
                            &c.hosts
                        } else {
                            &c.prefixes
                        }
                    });
                    map.and_then(|m| m.get(k)) != v.as_ref()
                })
                .collect()
        };
        let names = maps.typed::<u64, IdentityName>(IDENTITIES_MAP)?;
        let written = write_endpoints(maps, idle, &keys)
            .and_then(|()| {
                let v: Vec<(u64, IdentityName)> = named
                    .iter()
                    .map(|(n, id)| (*n, identity_name(id)))
                    .collect();
                names.update_many(&v, |n, _| format!("identity {n}"))
            })
            .and_then(|()| {
                self.update_settings(|s| s.policy = abi::policy_word(gen, true, default, idle))
            });
        if let Err(e) = written {
            // What the idle copy holds is unsure now: the next change
            // reads it back.
            slot.copies[idle as usize] = None;
            return Err(e);
        }
        rcu_grace_period();
        let other_ok = write_endpoints(maps, idle ^ 1, &keys).is_ok();
        let _ = names.delete_many(unnamed);
        commit(slot);
        // Only one holder left, so the maps are edited, not cloned.
        slot.copies[(idle ^ 1) as usize] = None;
        if let Some(mut copy) = slot.copies[idle as usize].take() {
            for (k, v) in &keys {
                let entries = if k.0 == HOST_PREFIX {
                    Arc::make_mut(&mut copy.hosts)
                } else {
                    Arc::make_mut(&mut copy.prefixes)
                };
                match v {
                    Some(v) => entries.insert(*k, *v),
                    None => entries.remove(k),
                };
            }
            if other_ok {
                slot.copies[(idle ^ 1) as usize] = Some(copy.clone());
            }
            slot.copies[idle as usize] = Some(copy);
        }
        let removed = keys.iter().filter(|(_, v)| v.is_none()).count();
        let mut change = PolicyChange {
            endpoints_written: keys.len() - removed,
            endpoints_removed: removed,
            generation: gen,
            incremental: true,
            ..PolicyChange::default()
        };
        match self.reset_denied_flows() {
            Ok(n) => change.flows_reset = n,
            Err(e) => change.reset_error = Some(format!("{e}")),
        }
        Ok(change)
    }

    fn identities_of(&self, slot: &PolicySlot) -> Result<IdentityMap> {
        // The index has the state's identities (kept by every change);
        // compiling 100,000 endpoints again would take tens of ms.
        let mut all = match (&slot.index, &slot.state) {
            (Some(index), Some(_)) => index.identities.clone(),
            (None, Some(s)) => s.compile(&self.inner.identity_key)?.identities,
            (_, None) => IdentityMap::new(self.inner.identity_key.clone()),
        };
        for id in &slot.extra {
            // One refused for a collision is not named (see apply_locked).
            let _ = all.insert(id);
        }
        Ok(all)
    }

    fn write_identity(&self, n: IdentityNumber, identity: &Identity) -> Result<()> {
        self.maps()
            .typed::<u64, IdentityName>(IDENTITIES_MAP)?
            .update(&n, &identity_name(identity), || {
                format!("identity {identity}")
            })
    }

    fn apply_locked(&self, slot: &mut PolicySlot, state: PolicyState) -> Result<PolicyChange> {
        let mut compiled = state.compile(&self.inner.identity_key)?;
        let mut ids = compiled.identities.clone();
        // A registered name that collides with one in use (or another
        // registered one, in name order) is refused like any other.
        for id in &slot.extra {
            if ids.insert(id).is_err() {
                let number = ids.number_of(id);
                compiled.collisions.push(IdentityCollision {
                    number,
                    kept: ids.name(number).cloned().unwrap_or(Identity::World),
                    refused: id.clone(),
                    endpoints: Vec::new(),
                    rules: Vec::new(),
                });
            }
        }
        let maps = self.maps();
        let (gen, on, _, live) = abi::policy_word_parts(read_settings(maps)?.policy);
        // With policy off both copies may be stale: fill epoch 0's twin.
        let idle = if on { live ^ 1 } else { 1 };
        let want = CopyEntries::of(&compiled);
        let shapes = compiled.shapes;
        let mut change = sync_epoch(maps, idle, &want, shapes, &mut slot.copies[idle as usize])?;
        // Identity names: written before the state goes live (observers
        // name what they see), the ones no longer used removed after.
        let names = maps.typed::<u64, IdentityName>(IDENTITIES_MAP)?;
        let have: BTreeMap<u64, IdentityName> = names.entries()?.into_iter().collect();
        let writes: Vec<(u64, IdentityName)> = ids
            .iter()
            .map(|(n, id)| (n, identity_name(id)))
            .filter(|(n, v)| have.get(n).map(|h| (h.len, h.name)) != Some((v.len, v.name)))
            .collect();
        names.update_many(&writes, |n, _| match ids.name(*n) {
            Some(id) => format!("identity {id}"),
            None => format!("identity {n}"),
        })?;
        let gen = gen.wrapping_add(1);
        let default = match compiled.default_action {
            DefaultAction::Allow => abi::Action::MP_ACTION_ALLOW.0,
            DefaultAction::Deny => abi::Action::MP_ACTION_DENY.0,
        } as u8;
        self.update_settings(|s| s.policy = abi::policy_word(gen, true, default, idle))?;
        // The state is live. A program that loaded the word just before
        // the store may still be looking up the old copy: wait until every
        // such program has finished before rewriting it.
        rcu_grace_period();
        // Bring the other copy up to date; a failure here leaves it stale,
        // which the next change repairs (it diffs against what the kernel
        // holds).
        let other = &mut slot.copies[(idle ^ 1) as usize];
        let _ = sync_epoch(maps, idle ^ 1, &want, shapes, other);
        let gone: Vec<u64> = have
            .keys()
            .copied()
            .filter(|n| ids.name(*n).is_none())
            .collect();
        let _ = names.delete_many(&gone);
        slot.index = Some(edit::Index::of(&compiled));
        slot.state = Some(state);
        slot.collisions = compiled.collisions;
        change.identity_collisions = slot.collisions.clone();
        change.generation = gen;
        match self.reset_denied_flows() {
            Ok(n) => change.flows_reset = n,
            Err(e) => change.reset_error = Some(format!("{e}")),
        }
        Ok(change)
    }
}

/// The identity names map's value for `identity`.
fn identity_name(identity: &Identity) -> IdentityName {
    let name = identity.to_string();
    let mut v = IdentityName {
        len: name.len() as u32,
        name: [0; 252],
    };
    v.name[..name.len()].copy_from_slice(name.as_bytes());
    v
}

/// Waits for an RCU grace period: every BPF program running now (they run
/// inside RCU read-side sections) has returned when this does.
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` is implemented with
/// `synchronize_rcu()`; where it is unavailable (nohz_full CPUs) a sleep far
/// longer than any program runs stands in.
fn rcu_grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integer arguments and touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Writes endpoint keys (`None`: removed) into epoch `epoch`'s host
/// hash and prefix trie.
fn write_endpoints(
    maps: &MapSet,
    epoch: u32,
    keys: &[(EndpointKey, Option<EndpointVal>)],
) -> Result<()> {
    let (lpm_name, hosts_name, _) = COPY_MAPS[epoch as usize & 1];
    let value = |&(identity, node): &EndpointVal| EndpointValue {
        identity,
        node,
        pad: 0,
    };
    let what = |addr: [u32; 4], plen: u32| format!("endpoint {}/{plen}", abi::words_to_ip(addr));
    let (hosts, prefixes): (Vec<_>, Vec<_>) = keys.iter().partition(|(k, _)| k.0 == HOST_PREFIX);
    let host_map = maps.typed::<HostKey, EndpointValue>(hosts_name)?;
    let writes: Vec<(HostKey, EndpointValue)> = hosts
        .iter()
        .filter_map(|((_, addr), v)| v.as_ref().map(|v| (HostKey { addr: *addr }, value(v))))
        .collect();
    let gone: Vec<HostKey> = hosts
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|((_, addr), _)| HostKey { addr: *addr })
        .collect();
    host_map.update_many(&writes, |k, _| what(k.addr, HOST_PREFIX))?;
    host_map.delete_many(&gone)?;
    let lpm = maps.typed::<LpmKey, EndpointValue>(lpm_name)?;
    let lpm_key = |&(prefixlen, addr): &EndpointKey| LpmKey { prefixlen, addr };
    let writes: Vec<(LpmKey, EndpointValue)> = prefixes
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (lpm_key(k), value(v))))
        .collect();
    let gone: Vec<LpmKey> = prefixes
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| lpm_key(k))
        .collect();
    lpm.update_many(&writes, |k, _| what(k.addr, k.prefixlen))?;
    lpm.delete_many(&gone)
}

/// Where an endpoint edit starts: the live policy word's parts.
struct EditBase {
    gen: u32,
    default: u8,
    live: u32,
}

/// The maps of each copy: (endpoint prefixes, host addresses, rules).
pub(crate) const COPY_MAPS: [(&str, &str, &str); 2] = [
    (
        "meshpath_endpoints_v2_0",
        "meshpath_hosts_v2_0",
        "meshpath_policy_v2_0",
    ),
    (
        "meshpath_endpoints_v2_1",
        "meshpath_hosts_v2_1",
        "meshpath_policy_v2_1",
    ),
];

/// Numbers to names (`struct mp_identity_name`), keyed by 64-bit number.
pub(crate) const IDENTITIES_MAP: &str = "meshpath_identities_v2";

/// Makes epoch `epoch`'s maps hold exactly `want` (and `shapes`): writes
/// the difference between `want` and what they hold (`known`, or else
/// read back from the kernel), in batches (a 100,000-entry map is a few
/// dozen syscalls). Single addresses go to the host hash, prefixes to
/// the trie. Used on the idle copy, so partial failure affects no
/// decision; it leaves `known` empty, so the next change reads the maps.
fn sync_epoch(
    maps: &MapSet,
    epoch: u32,
    want: &CopyEntries,
    shapes: u32,
    known: &mut Known,
) -> Result<PolicyChange> {
    let (lpm_name, hosts_name, pol_name) = COPY_MAPS[epoch as usize & 1];
    let lpm = maps.typed::<LpmKey, EndpointValue>(lpm_name)?;
    let hosts = maps.typed::<HostKey, EndpointValue>(hosts_name)?;
    let pol = maps.typed::<PolicyKey, PolicyValue>(pol_name)?;
    let have = match known.take() {
        Some(k) => k,
        None => CopyEntries {
            prefixes: Arc::new(
                lpm.entries()?
                    .into_iter()
                    .map(|(k, v)| ((k.prefixlen, k.addr), (v.identity, v.node)))
                    .collect(),
            ),
            hosts: Arc::new(
                hosts
                    .entries()?
                    .into_iter()
                    .map(|(k, v)| ((HOST_PREFIX, k.addr), (v.identity, v.node)))
                    .collect(),
            ),
            rules: Arc::new(
                pol.entries()?
                    .into_iter()
                    .map(|(k, v)| (model::bytes_of_key(&k), (v.action, v.rule)))
                    .collect(),
            ),
        },
    };
    let value = |&(identity, node): &EndpointVal| EndpointValue {
        identity,
        node,
        pad: 0,
    };
    let what = |addr: [u32; 4], plen: u32| format!("endpoint {}/{plen}", abi::words_to_ip(addr));
    let (hw, hr) = hosts.sync(
        &have.hosts,
        &want.hosts,
        |&(_, addr), v| (HostKey { addr }, value(v)),
        |&(_, addr)| HostKey { addr },
        |k, _| what(k.addr, HOST_PREFIX),
    )?;
    let lpm_key = |&(prefixlen, addr): &(u32, [u32; 4])| LpmKey { prefixlen, addr };
    let (pw, pr) = lpm.sync(
        &have.prefixes,
        &want.prefixes,
        |k, v| (lpm_key(k), value(v)),
        lpm_key,
        |k, _| what(k.addr, k.prefixlen),
    )?;
    let (rw, rr) = pol.sync(
        &have.rules,
        &want.rules,
        |k, &(action, rule)| {
            let v = PolicyValue {
                action,
                pad: [0; 3],
                rule,
            };
            (model::key_of_bytes(k), v)
        },
        model::key_of_bytes,
        |_, v| format!("policy rule {}", v.rule),
    )?;
    maps.typed::<u32, u32>("meshpath_policy_shapes")?
        .update(&epoch, &shapes, || "policy shapes".into())?;
    *known = Some(want.clone());
    Ok(PolicyChange {
        endpoints_written: hw + pw,
        endpoints_removed: hr + pr,
        rules_written: rw,
        rules_removed: rr,
        ..PolicyChange::default()
    })
}
