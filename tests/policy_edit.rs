//! Endpoint upserts and deletes are applied as one-key edits (no
//! whole-state compile): both copies of the endpoint maps and the identity
//! names must hold exactly what the desired state says after every kind
//! of edit, including the ones the library leaves to a full compile, a
//! refused one, and one that fails on a full map. Read from the pinned
//! maps, not through the library.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use common::{require_root, PinDir};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use meshpath::policy::{DefaultAction, Endpoint, EndpointChange, NodeName, PolicyState, Rule};
use meshpath::{Datapath, DatapathOptions, Error};

const IDS: [&str; 6] = [
    "spiffe://mesh.local/ns/a/sa/one",
    "spiffe://mesh.local/ns/a/sa/two",
    "spiffe://mesh.local/ns/b/sa/three",
    "spiffe://mesh.local/ns/b/sa/four",
    "spiffe://mesh.local/ns/c/sa/five",
    "spiffe://mesh.local/ns/c/sa/six",
];

/// Key bytes (prefix length over 128 bits, then the v4-mapped or IPv6
/// address) -> (identity number, node number).
type Entries = BTreeMap<(u32, [u8; 16]), (u64, u32)>;

fn octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// What the maps must hold for `endpoints`.
fn expected(dp: &Datapath, endpoints: &[Endpoint]) -> Entries {
    endpoints
        .iter()
        .map(|e| {
            let plen = u32::from(e.ip.prefix_len()) + if e.ip.addr().is_ipv4() { 96 } else { 0 };
            let node = e.node.as_ref().map_or(0, NodeName::number);
            (
                (plen, octets(e.ip.addr())),
                (dp.identity_number(&e.identity), node),
            )
        })
        .collect()
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes(b[i..i + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i..i + 8].try_into().unwrap())
}

/// A `struct mp_endpoint`: identity (u64) at 0, node at 8, zero padding.
fn value(m: &MapHandle, k: &[u8]) -> (u64, u32) {
    let v = m
        .lookup(k, MapFlags::ANY)
        .expect("lookup")
        .expect("a listed key has a value");
    assert_eq!(v.len(), 16);
    assert_eq!(u32_at(&v, 12), 0, "padding");
    (u64_at(&v, 0), u32_at(&v, 8))
}

/// What one copy holds: its host hash and its prefix trie together.
fn copy(pins: &PinDir, epoch: u32) -> Entries {
    let mut out = Entries::new();
    let hosts = pins.map(&format!("meshpath_hosts_v2_{epoch}"));
    for k in hosts.keys() {
        out.insert((128, k[..16].try_into().unwrap()), value(&hosts, &k));
    }
    let trie = pins.map(&format!("meshpath_endpoints_v2_{epoch}"));
    for k in trie.keys() {
        let plen = u32_at(&k, 0);
        assert_ne!(plen, 128, "a single address in the trie of copy {epoch}");
        out.insert((plen, k[4..20].try_into().unwrap()), value(&trie, &k));
    }
    out
}

/// The identity names in the kernel: number -> name.
fn names(pins: &PinDir) -> BTreeMap<u64, String> {
    let m = pins.map("meshpath_identities_v2");
    m.keys()
        .map(|k| {
            let v = m.lookup(&k, MapFlags::ANY).unwrap().unwrap();
            let len = u32_at(&v, 0) as usize;
            (
                u64_at(&k, 0),
                String::from_utf8(v[4..4 + len].to_vec()).unwrap(),
            )
        })
        .collect()
}

/// Both copies hold exactly the desired endpoints, and the names are
/// exactly the identities in use.
fn check(dp: &Datapath, pins: &PinDir, when: &str) {
    let state = dp.policy().expect("a policy is set");
    let want = expected(dp, &state.endpoints);
    for epoch in 0..2 {
        assert_eq!(copy(pins, epoch), want, "copy {epoch} {when}");
    }
    let mut used: BTreeMap<u64, String> = state
        .endpoints
        .iter()
        .map(|e| (dp.identity_number(&e.identity), e.identity.to_string()))
        .collect();
    for r in &state.policies {
        for p in [&r.from, &r.to] {
            if let meshpath::policy::Peer::Is(id) = p {
                used.insert(dp.identity_number(id), id.to_string());
            }
        }
    }
    assert_eq!(names(pins), used, "identity names {when}");
    let listed: BTreeMap<u64, String> = dp
        .identities()
        .unwrap()
        .iter()
        .map(|(n, id)| (n, id.to_string()))
        .collect();
    assert_eq!(listed, used, "Datapath::identities {when}");
}

/// xorshift64*: the same sequence every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Addresses from a small pool: IPv4 and IPv6 hosts, the v4-mapped IPv6
/// spelling of the IPv4 ones, IPv4 and IPv6 prefixes.
fn address(r: &mut Rng) -> String {
    let i = r.below(10);
    match r.below(10) {
        0 => format!("::ffff:198.18.0.{i}/128"),
        1 | 2 => format!("2001:db8::{i:x}"),
        3 => format!("198.19.{i}.0/24"),
        4 => format!("2001:db8:{i:x}::/48"),
        _ => format!("198.18.0.{i}"),
    }
}

/// A random change: an upsert (two in three; a node now and then), or a
/// delete of an endpoint of `endpoints` (`odds - 1` in `odds`) or of an
/// address from the pool, maybe not an endpoint.
fn change(r: &mut Rng, endpoints: &[Endpoint], odds: u64) -> EndpointChange {
    if r.below(3) == 0 {
        let ip = if r.below(odds) > 0 && !endpoints.is_empty() {
            endpoints[r.below(endpoints.len() as u64) as usize].ip
        } else {
            address(r).parse().unwrap()
        };
        return EndpointChange::Delete(ip);
    }
    let mut e = Endpoint::new(&address(r), IDS[r.below(6) as usize]).unwrap();
    if r.below(4) == 0 {
        e.node = Some(format!("node-{}", r.below(3)).parse().unwrap());
    }
    EndpointChange::Upsert(e)
}

fn start() -> PolicyState {
    PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: (0..5)
            .map(|i| Endpoint::new(&format!("198.18.0.{i}"), IDS[i % 2]).unwrap())
            .collect(),
        policies: vec![
            Rule::new(IDS[0], IDS[1], "tcp", &[80], "allow").unwrap(),
            Rule::new("*", IDS[2], "any", &[], "deny").unwrap(),
        ],
    }
}

#[test]
fn every_endpoint_edit_leaves_both_copies_and_the_names_exact() {
    require_root();
    let pins = PinDir::new("edit");
    let dp = Datapath::load(&DatapathOptions::default().pin_dir(&pins.0)).expect("load");
    let mut gen = dp.replace_policy(&start()).unwrap().generation;
    check(&dp, &pins, "at the start");
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let (mut upserts, mut deletes, mut refused, mut incremental) = (0, 0, 0, 0);
    for step in 0..400 {
        let before = dp.policy().unwrap();
        let (what, result) = match change(&mut r, &before.endpoints, 4) {
            EndpointChange::Delete(ip) => (format!("delete {ip}"), dp.delete_endpoint(ip)),
            EndpointChange::Upsert(e) => (format!("upsert {e:?}"), dp.upsert_endpoint(e)),
        };
        let when = format!("after step {step}: {what}");
        match result {
            Ok(change) => {
                assert!(
                    change.endpoints_written + change.endpoints_removed <= 1,
                    "{when}: {change:?}"
                );
                assert_eq!(change.generation, gen.wrapping_add(1), "{when}");
                gen = change.generation;
                incremental += usize::from(change.incremental);
                if what.starts_with("delete") {
                    deletes += 1;
                } else {
                    upserts += 1;
                }
            }
            Err(e) => {
                // A delete of nothing, or an address already there in its
                // other spelling with another identity: nothing changes.
                let msg = e.to_string();
                assert!(
                    msg.contains("is not an endpoint") || msg.contains("is already endpoints["),
                    "{when}: {msg}"
                );
                assert_eq!(dp.policy().unwrap(), before, "{when}: refused, yet changed");
                refused += 1;
            }
        }
        check(&dp, &pins, &when);
    }
    eprintln!(
        "{upserts} upserts, {deletes} deletes ({incremental} of them one-key edits), \
         {refused} refused"
    );
    assert!(upserts > 150 && deletes > 50 && refused > 5);
    // Most are edits; the others (the same address in its other
    // spelling) took the full compile.
    assert!(
        incremental > 250 && incremental < upserts + deletes,
        "{incremental} of {} by edit",
        upserts + deletes
    );
}

#[test]
fn an_edit_that_finds_the_map_full_changes_nothing_and_the_next_repairs() {
    require_root();
    let pins = PinDir::new("edit-full");
    let dp = Datapath::load(&DatapathOptions::default().pin_dir(&pins.0).max_endpoints(6))
        .expect("load");
    dp.replace_policy(&start()).unwrap();
    let change = dp
        .upsert_endpoint(Endpoint::new("198.18.0.5", IDS[3]).unwrap())
        .unwrap();
    assert!(change.incremental, "{change:?}");
    check(&dp, &pins, "with the host hash full");
    let before = dp.policy().unwrap();
    let e = dp
        .upsert_endpoint(Endpoint::new("198.18.0.6", IDS[4]).unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::MapFull { .. }), "{e}");
    assert!(
        e.to_string().contains("198.18.0.6"),
        "names the endpoint: {e}"
    );
    assert_eq!(dp.policy().unwrap(), before, "the desired state stays");
    check(&dp, &pins, "after the refused upsert");
    // Room again. The first change after the failure compiles in full
    // (what the idle copy holds is read back), the next is an edit
    // again; both copies are exact after each.
    let change = dp.delete_endpoint("198.18.0.0".parse().unwrap()).unwrap();
    assert!(!change.incremental, "{change:?}");
    check(&dp, &pins, "after a delete");
    let change = dp
        .upsert_endpoint(Endpoint::new("198.18.0.6", IDS[4]).unwrap())
        .unwrap();
    assert!(change.incremental, "{change:?}");
    check(&dp, &pins, "after the upsert that fits");
}

#[test]
fn batches_of_changes_apply_as_one_and_leave_both_copies_exact() {
    require_root();
    let pins = PinDir::new("edit-batch");
    let dp = Datapath::load(&DatapathOptions::default().pin_dir(&pins.0)).expect("load");
    let mut gen = dp.replace_policy(&start()).unwrap().generation;
    let mut r = Rng(0x0123_4567_89ab_cdef);
    let (mut applied, mut incremental, mut refused) = (0, 0, 0);
    for step in 0..120 {
        let before = dp.policy().unwrap();
        let changes: Vec<EndpointChange> = (0..1 + r.below(10))
            .map(|_| change(&mut r, &before.endpoints, 10))
            .collect();
        let when = format!("after batch {step}: {changes:?}");
        // What applying them one by one to the desired state gives.
        let mut want = before.clone();
        let mut bad = None;
        for (i, c) in changes.iter().enumerate() {
            let ip = c.ip();
            let found = want.endpoints.iter().any(|e| e.ip == ip);
            want.endpoints.retain(|e| e.ip != ip);
            match c {
                EndpointChange::Upsert(e) => want.endpoints.push(e.clone()),
                EndpointChange::Delete(_) if !found => {
                    bad.get_or_insert(i);
                }
                EndpointChange::Delete(_) => {}
            }
        }
        match dp.change_endpoints(&changes) {
            Ok(change) => {
                assert_eq!(bad, None, "{when}: a delete of nothing was applied");
                assert_eq!(dp.policy().unwrap(), want, "{when}");
                assert_eq!(
                    change.generation,
                    gen.wrapping_add(1),
                    "{when}: one generation"
                );
                gen = change.generation;
                applied += 1;
                incremental += usize::from(change.incremental);
            }
            Err(e) => {
                let msg = e.to_string();
                match bad {
                    Some(i) => assert!(
                        msg.contains(&format!("changes[{i}]"))
                            && msg.contains("is not an endpoint"),
                        "{when}: {msg}"
                    ),
                    None => assert!(msg.contains("is already endpoints["), "{when}: {msg}"),
                }
                assert_eq!(dp.policy().unwrap(), before, "{when}: refused, yet changed");
                refused += 1;
            }
        }
        check(&dp, &pins, &when);
    }
    eprintln!("{applied} batches applied ({incremental} as key edits), {refused} refused");
    assert!(applied > 50 && refused > 5 && incremental > 30);
}
