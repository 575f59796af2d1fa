//! 64-bit identity numbers from a keyed hash, against the kernel: a
//! policy with many identities applies and enforces, the key decides the
//! numbers (the same on two datapaths, other with another key), and the
//! names map is keyed by the 64-bit numbers. Root only (fails loudly
//! otherwise). Collisions cannot be made with the real derivation: their
//! handling is unit-tested (src/policy/model.rs) in a tiny number space.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use meshpath::policy::{DefaultAction, Endpoint, Identity, IdentityKey, PolicyState, Rule};
use meshpath::{AttachOptions, Datapath, DatapathOptions};

/// Workload `i`'s SPIFFE ID.
fn name(i: usize) -> String {
    format!("spiffe://mesh.local/ns/n{}/sa/w{i}", i % 37)
}

/// Workload `i`'s loopback address: 127.1.x.y.
fn addr(i: usize) -> String {
    format!("127.1.{}.{}", i / 250, 1 + i % 250)
}

/// `n` workloads, each allowed to reach the next on TCP `port`; default
/// deny.
fn chain(n: usize, port: u16) -> PolicyState {
    PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: (0..n)
            .map(|i| Endpoint::new(&addr(i), &name(i)).unwrap())
            .collect(),
        policies: (0..n - 1)
            .map(|i| Rule::new(&name(i), &name(i + 1), "tcp", &[port], "allow").unwrap())
            .collect(),
    }
}

fn connect_from(src: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = bound_tcp(src)?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    connect_tcp(s, dst)
}

fn is_eperm(r: &std::io::Result<TcpStream>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

fn key(byte: u8) -> IdentityKey {
    IdentityKey::from_bytes(&[byte; 32]).unwrap()
}

#[test]
fn a_policy_with_many_identities_applies_and_enforces() {
    const N: usize = 3000;
    const PORT: u16 = 18_443;
    let opts = DatapathOptions::default()
        .identity_key(key(1))
        .max_endpoints(8192)
        .max_policies(8192);
    let env = Env::with("identity_many", opts, AttachOptions::default());
    let state = chain(N, PORT);
    let change = env.dp.replace_policy(&state).unwrap();
    assert!(change.identity_collisions.is_empty(), "{change:?}");
    assert!(env.dp.identity_collisions().is_empty());
    assert_eq!(change.endpoints_written, N);
    assert_eq!(change.rules_written, N - 1);
    // Every name is known under its 64-bit number, in the kernel too.
    let ids = env.dp.identities().unwrap();
    assert_eq!(ids.len(), N);
    let mut high = 0;
    for i in 0..N {
        let id: Identity = name(i).parse().unwrap();
        let n = env.dp.identity_number(&id);
        assert!(n >= 256);
        high += usize::from(n > u64::from(u32::MAX));
        assert_eq!(ids.name(n), Some(&id));
        if i % 97 == 0 {
            assert_eq!(
                env.dp.identity_name(n).unwrap().as_deref(),
                Some(name(i).as_str())
            );
        }
    }
    assert!(high > N * 99 / 100, "{high} of {N} above 2^32");
    // Enforced: i -> i+1 connects, i -> i+2 and i+1 -> i are refused.
    for i in [0, 1, 777, 1500, N - 3] {
        let l: TcpListener = env.inside(|| TcpListener::bind((addr(i + 1), PORT)).unwrap());
        let dst = l.local_addr().unwrap();
        let ok = env.inside(|| connect_from(&addr(i), dst));
        assert!(ok.is_ok(), "{} -> {}: {ok:?}", name(i), name(i + 1));
        drop(ok);
        let _ = l.accept().unwrap();
        let back = env.inside(|| connect_from(&addr(i + 2), dst));
        assert!(
            is_eperm(&back),
            "{} -> {}: {back:?}",
            name(i + 2),
            name(i + 1)
        );
        drop(l);
        let l = env.inside(|| TcpListener::bind((addr(i + 2), PORT)).unwrap());
        let skip = env.inside(|| connect_from(&addr(i), l.local_addr().unwrap()));
        assert!(is_eperm(&skip), "{} -> {}: {skip:?}", name(i), name(i + 2));
    }
}

#[test]
fn the_key_decides_the_numbers() {
    require_root();
    let state = chain(20, 80);
    let load = |k: IdentityKey| {
        let dp = Datapath::load(&DatapathOptions::default().identity_key(k)).unwrap();
        dp.replace_policy(&state).unwrap();
        let numbers: Vec<u64> = (0..20)
            .map(|i| dp.identity_number(&name(i).parse().unwrap()))
            .collect();
        // What the kernel's names map holds (observers' view).
        for (i, n) in numbers.iter().enumerate() {
            assert_eq!(
                dp.identity_name(*n).unwrap().as_deref(),
                Some(name(i).as_str())
            );
        }
        (dp, numbers)
    };
    let (a, na) = load(key(1));
    let (b, nb) = load(key(1));
    let (c, nc) = load(key(2));
    assert_eq!(na, nb, "one key: the same numbers on two datapaths");
    for (x, y) in na.iter().zip(&nc) {
        assert_ne!(x, y, "another key: other numbers");
    }
    assert!(!a.identity_key_is_default());
    assert!(!c.identity_key_is_default());
    // Reserved numbers do not depend on the key.
    for dp in [&a, &b, &c] {
        assert_eq!(dp.identity_number(&Identity::Host), 1);
        assert_eq!(dp.identity_number(&Identity::World), 2);
    }
    let d = Datapath::load(&DatapathOptions::default()).unwrap();
    assert!(d.identity_key_is_default());
    assert_eq!(
        d.identity_number(&name(0).parse().unwrap()),
        meshpath::policy::derive_number(&IdentityKey::default(), &name(0))
    );
}
