//! The agent's mutual-TLS authentication of `auth` flows (issue 4, the
//! agent half): two "nodes" as network namespaces joined by a veth pair
//! (198.18.0.1 and 198.18.0.2), each with its own agent, pod cgroup and
//! pinned maps, certificates made here from a test CA.
//!
//! The first tests need no root: file parsing, SPIFFE extraction, expiry
//! arithmetic and the TLS verifiers (`examples/agent/auth_{certs,files,tls}.rs`
//! are included with `#[path]`). The others need root and fail without it.

mod common;

#[path = "../examples/agent/auth_certs.rs"]
#[allow(dead_code)]
mod auth_certs;
#[path = "../examples/agent/auth_files.rs"]
#[allow(dead_code)]
mod auth_files;
#[path = "../examples/agent/auth_tls.rs"]
#[allow(dead_code)]
mod auth_tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use common::agent::{run_failing, setup, stop, Agent, TempDir};
use common::{read_pattern, scaled, write_pattern, Netns, PinDir};
use libbpf_rs::MapCore;
use meshpath::cgroup::ScopedCgroup;
use meshpath::policy::{Identity, IdentityKey, NodeName, SpiffeId};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

const FE: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
const DB: &str = "spiffe://mesh.local/ns/db/sa/postgres";
const IMPOSTOR: &str = "spiffe://mesh.local/ns/db/sa/impostor";
const A_IP: &str = "198.18.0.1";
const B_IP: &str = "198.18.0.2";
const AUTH_PORT: u16 = 7443;
const DB_PORT: u16 = 5432;

/// The identity number under the default key (the agents here run
/// without --identity-key).
fn id(spiffe: &str) -> u64 {
    spiffe
        .parse::<Identity>()
        .expect("a SPIFFE ID")
        .number(&IdentityKey::default())
}

fn node_number(name: &str) -> u32 {
    name.parse::<NodeName>().expect("a node name").number()
}

// ---------------------------------------------------------------------------
// A test PKI.

struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

/// A leaf certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&key).expect("self-signing the CA");
        Pki {
            ca_pem: ca.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A workload certificate: URI SANs `uris`, serial, valid from a year
    /// ago until `not_after` (default: in 2040).
    fn leaf_with(&self, uris: &[&str], serial: u64, not_after: Option<SystemTime>) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "workload");
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("an IA5 URI")))
            .collect();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.serial_number = Some(SerialNumber::from(serial));
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        p.not_before = epoch + unix(SystemTime::now() - Duration::from_secs(365 * 86_400));
        p.not_after = match not_after {
            Some(t) => epoch + unix(t),
            None => rcgen::date_time_ymd(2040, 1, 1),
        };
        let cert = p.signed_by(&key, &self.issuer).expect("signing a leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn leaf(&self, spiffe: &str, serial: u64) -> Leaf {
        self.leaf_with(&[spiffe], serial, None)
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}

/// (cert path, key path) of a leaf written to `dir`.
fn write_leaf(dir: &Path, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    (
        write(dir, &format!("{name}.pem"), &leaf.cert),
        write(dir, &format!("{name}.key"), &leaf.key),
    )
}

// ---------------------------------------------------------------------------
// Pure logic, no root.

#[test]
fn peers_files_parse_and_errors_name_the_key() {
    let p = auth_files::parse_peers(
        r#"{"peers": {"node-a": "198.18.0.1:7443", "node-b": "[fd00::2]:7443"}}"#,
    )
    .unwrap();
    let b: NodeName = "node-b".parse().unwrap();
    assert_eq!(p.get(&b), Some("[fd00::2]:7443".parse().unwrap()));
    let (name, addr) = p.by_number(b.number()).expect("found by number");
    assert_eq!((name.as_str(), addr.port()), ("node-b", 7443));
    assert!(p.by_number(node_number("node-c")).is_none());

    let err = |text: &str| auth_files::parse_peers(text).unwrap_err();
    let e = err(r#"{"peers": {"Node_B": "198.18.0.2:7443"}}"#);
    assert!(
        e.contains("peers.\"Node_B\"") && e.contains("lowercase"),
        "{e}"
    );
    let e = err(r#"{"peers": {"node-b": "198.18.0.2"}}"#);
    assert!(
        e.contains("peers.\"node-b\"") && e.contains("ADDR:PORT"),
        "{e}"
    );
    let e = err(r#"{"peers": {"node-b": "198.18.0.2:0"}}"#);
    assert!(e.contains("port 0"), "{e}");
    let e = err(r#"{"peers": {}, "nodes": {}}"#);
    assert!(e.contains("unknown field \"nodes\""), "{e}");
    let e = err(r#"["node-b"]"#);
    assert!(e.contains("JSON object"), "{e}");
    let e = err(r#"{"peers": {"node-b": "198.18.0.2:7443",}}"#);
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn revoked_files_parse_serials_in_any_hex_spelling() {
    let r = auth_files::parse_revoked(
        r#"{"serials": ["00:01:A3", "0x2b", "ff00"], "identities": ["spiffe://mesh.local/ns/shop/sa/frontend"]}"#,
    )
    .unwrap();
    assert!(r.serials.contains(&vec![0x01, 0xa3]));
    assert!(r.serials.contains(&vec![0x2b]));
    assert!(r.serials.contains(&vec![0xff, 0x00]));
    let fe: SpiffeId = FE.parse().unwrap();
    assert!(r.why(&[0x01, 0xa3], None).unwrap().contains("01:a3"));
    assert!(r.why(&[0x99], Some(&fe)).unwrap().contains(FE));
    assert!(r.why(&[0x99], None).is_none());
    assert_eq!(auth_files::parse_revoked("{}").unwrap(), Default::default());
    let e = auth_files::parse_revoked(r#"{"serials": ["01", "xyz"]}"#).unwrap_err();
    assert!(e.contains("serials[1]") && e.contains("hex"), "{e}");
    let e = auth_files::parse_revoked(r#"{"identities": ["spiffe://x"]}"#).unwrap_err();
    assert!(e.contains("identities[0]"), "{e}");
    let long = "01".repeat(21);
    let e = auth_files::parse_revoked(&format!(r#"{{"serials": ["{long}"]}}"#)).unwrap_err();
    assert!(e.contains("20 bytes"), "{e}");
}

#[test]
fn spiffe_ids_come_from_exactly_one_uri_san() {
    let pki = Pki::new("unit CA");
    let der = |leaf: &Leaf| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()
    };
    let good = auth_certs::cert_facts(&der(&pki.leaf(FE, 0x1234))).unwrap();
    assert_eq!(good.spiffe_id().unwrap().as_str(), FE);
    assert_eq!(good.serial, vec![0x12, 0x34]);
    assert_eq!(auth_certs::serial_hex(&good.serial), "12:34");

    let none = auth_certs::cert_facts(&der(&pki.leaf_with(&[], 1, None))).unwrap();
    assert!(none.spiffe_id().unwrap_err().contains("subjectAltName"));
    let http = auth_certs::cert_facts(&der(&pki.leaf_with(&["https://x.example/"], 1, None)));
    assert!(http
        .unwrap()
        .spiffe_id()
        .unwrap_err()
        .contains("no SPIFFE ID"));
    let two = auth_certs::cert_facts(&der(&pki.leaf_with(&[FE, DB], 1, None))).unwrap();
    assert!(two.spiffe_id().unwrap_err().contains("exactly one"));
    let bad = auth_certs::cert_facts(&der(&pki.leaf_with(&["spiffe://Mesh/x"], 1, None)));
    assert!(bad
        .unwrap()
        .spiffe_id()
        .unwrap_err()
        .contains("not a valid SPIFFE ID"));
    assert!(auth_certs::cert_facts(b"not der").is_err());
    assert_eq!(auth_certs::normalize_serial(&[0, 0, 0x80]), vec![0x80]);
    assert_eq!(auth_certs::normalize_serial(&[0]), vec![0]);
}

#[test]
fn local_certificates_load_with_errors_naming_the_flag() {
    let pki = Pki::new("unit CA");
    let dir = TempDir::new();
    let provider = auth_tls::provider();
    let (fe_cert, fe_key) = write_leaf(&dir.0, "fe", &pki.leaf(FE, 7));
    let (_, db_key) = write_leaf(&dir.0, "db", &pki.leaf(DB, 8));
    let c =
        auth_certs::load_local_cert(&fe_cert, &fe_key, &provider, &IdentityKey::default()).unwrap();
    assert_eq!((c.spiffe.as_str(), c.identity), (FE, id(FE)));
    let e = |r: anyhow::Result<auth_certs::LocalCert>| format!("{:#}", r.unwrap_err());
    let msg = e(auth_certs::load_local_cert(
        &fe_cert,
        &db_key,
        &provider,
        &IdentityKey::default(),
    ));
    assert!(
        msg.contains("--key") && msg.contains("does not match"),
        "{msg}"
    );
    let missing = dir.0.join("missing.pem");
    let msg = e(auth_certs::load_local_cert(
        &missing,
        &fe_key,
        &provider,
        &IdentityKey::default(),
    ));
    assert!(
        msg.contains("--cert") && msg.contains("cannot read"),
        "{msg}"
    );
    let (nosan, nosan_key) = write_leaf(&dir.0, "nosan", &pki.leaf_with(&[], 9, None));
    let msg = e(auth_certs::load_local_cert(
        &nosan,
        &nosan_key,
        &provider,
        &IdentityKey::default(),
    ));
    assert!(msg.contains("--cert") && msg.contains("SPIFFE"), "{msg}");
    let msg = e(auth_certs::load_local_cert(
        &fe_key,
        &fe_key,
        &provider,
        &IdentityKey::default(),
    ));
    assert!(msg.contains("holds no certificate"), "{msg}");
    let msg = e(auth_certs::load_local_cert(
        &fe_cert,
        &fe_cert,
        &provider,
        &IdentityKey::default(),
    ));
    assert!(
        msg.contains("--key") && msg.contains("no private key"),
        "{msg}"
    );
    let ca = write(&dir.0, "ca.pem", &pki.ca_pem);
    assert_eq!(auth_certs::load_ca(&ca).unwrap().len(), 1);
    let msg = format!("{:#}", auth_certs::load_ca(&fe_key).unwrap_err());
    assert!(msg.contains("--ca"), "{msg}");
}

#[test]
fn entries_last_until_the_earliest_not_after_capped_by_the_ttl() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let s = Duration::from_secs;
    let u = auth_certs::entry_until(now, s(3600), [now + s(7200), now + s(100_000)]);
    assert_eq!(u, now + s(3600), "the TTL caps it");
    let u = auth_certs::entry_until(now, s(3600), [now + s(100_000), now + s(600)]);
    assert_eq!(u, now + s(600), "the earliest certificate caps it");
    // Renewal: `before` ahead, at most a third of the life; 0 is off.
    let r = auth_certs::renew_at(now, now + s(3600), s(60));
    assert_eq!(r, Some(now + s(3540)));
    let r = auth_certs::renew_at(now, now + s(3), s(60));
    assert_eq!(r, Some(now + s(2)));
    assert_eq!(auth_certs::renew_at(now, now + s(3600), s(0)), None);
    assert_eq!(
        auth_certs::utc(SystemTime::UNIX_EPOCH + s(1_790_000_000)),
        "2026-09-21T14:13:20Z"
    );
}

/// The verifiers over a real TLS 1.3 handshake in memory: the server
/// demands FE's SPIFFE ID, the client DB's.
#[test]
fn verifiers_demand_the_spiffe_id_the_ca_and_validity() {
    let pki = Pki::new("unit CA");
    let other = Pki::new("other CA");
    let dir = TempDir::new();
    let provider = auth_tls::provider();
    let ca = write(&dir.0, "ca.pem", &pki.ca_pem);
    let roots = Arc::new(auth_certs::load_ca(&ca).unwrap());
    let load = |name: &str, leaf: Leaf| {
        let (c, k) = write_leaf(&dir.0, name, &leaf);
        auth_certs::load_local_cert(&c, &k, &provider, &IdentityKey::default()).unwrap()
    };
    let fe = load("fe", pki.leaf(FE, 1));
    let db = load("db", pki.leaf(DB, 2));
    let impostor = load("imp", pki.leaf(IMPOSTOR, 3));
    let foreign = load("foreign", other.leaf(DB, 4));
    let yesterday = SystemTime::now() - Duration::from_secs(86_400);
    let expired = load("expired", pki.leaf_with(&[DB], 5, Some(yesterday)));
    let revoked = auth_files::parse_revoked(r#"{"serials": ["02"]}"#).unwrap();

    // Runs a handshake; Ok or (client error, server error).
    let handshake = |client: &auth_certs::LocalCert,
                     server: &auth_certs::LocalCert,
                     revoked: Option<&auth_files::Revoked>|
     -> Result<(), String> {
        let revoked = revoked.map(|r| Arc::new(r.clone()));
        let cc = auth_tls::client_config(
            &provider,
            &roots,
            &client.key,
            auth_tls::Expect {
                role: "server",
                spiffe: Some(DB.parse().unwrap()),
                revoked: revoked.clone(),
            },
        )
        .unwrap();
        let sc = auth_tls::server_config(
            &provider,
            &roots,
            &server.key,
            auth_tls::Expect {
                role: "client",
                spiffe: Some(FE.parse().unwrap()),
                revoked,
            },
        )
        .unwrap();
        let mut c =
            rustls::ClientConnection::new(Arc::new(cc), auth_tls::placeholder_name()).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(sc)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets()
                    .map_err(|e| format!("server: {e}"))?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets()
                    .map_err(|e| format!("client: {e}"))?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err("the handshake did not finish".into())
    };
    handshake(&fe, &db, None).expect("FE and DB prove themselves");
    let e = handshake(&fe, &impostor, None).unwrap_err();
    assert!(
        e.starts_with("client:") && e.contains(&format!("names {IMPOSTOR}, expected {DB}")),
        "{e}"
    );
    let e = handshake(&impostor, &db, None).unwrap_err();
    assert!(
        e.starts_with("server:") && e.contains(&format!("names {IMPOSTOR}, expected {FE}")),
        "{e}"
    );
    let e = handshake(&fe, &foreign, None).unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    let e = handshake(&fe, &expired, None).unwrap_err();
    assert!(e.contains("expired"), "{e}");
    let e = handshake(&fe, &db, Some(&revoked)).unwrap_err();
    assert!(e.contains("serial 02 is revoked"), "{e}");
}

// ---------------------------------------------------------------------------
// Two nodes.

/// A bpffs pin directory, removed (with its pins) on drop.
struct Node {
    name: &'static str,
    ip: &'static str,
    netns: Netns,
    cg: ScopedCgroup,
    pin: PinDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Node {
    /// The entries of this node's auth map: (local, remote, remote node),
    /// read from the agent's pinned map.
    fn entries(&self) -> Vec<(u64, u64, u32)> {
        let path = self.pin.0.join("meshpath_auth_v2");
        let Ok(m) = libbpf_rs::MapHandle::from_pinned_path(&path) else {
            return Vec::new();
        };
        let (real, mono) = clocks();
        let _ = real;
        let mut out: Vec<(u64, u64, u32)> = m
            .keys()
            .filter(|k| {
                m.lookup(k, libbpf_rs::MapFlags::ANY)
                    .ok()
                    .flatten()
                    .is_some_and(|v| u64::from_ne_bytes(v[..8].try_into().unwrap()) > mono)
            })
            .map(|k| {
                // struct mp_auth_key: u64 local, u64 remote, u32 node, pad.
                let q = |i: usize| u64::from_ne_bytes(k[i..i + 8].try_into().unwrap());
                let w = |i: usize| u32::from_ne_bytes(k[i..i + 4].try_into().unwrap());
                (q(0), q(8), w(16))
            })
            .collect();
        out.sort();
        out
    }
}

fn clocks() -> (u64, u64) {
    let ns = |c| {
        let t = nix::time::clock_gettime(c).unwrap();
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    };
    (
        ns(nix::time::ClockId::CLOCK_REALTIME),
        ns(nix::time::ClockId::CLOCK_MONOTONIC),
    )
}

/// Two nodes: `node-a` (198.18.0.1, the frontend) and `node-b`
/// (198.18.0.2, the db), one config and one peers file for both.
struct World {
    // Drop order: agents, then the nodes (netns, cgroup, pins), then files.
    a_agent: Option<Agent>,
    b_agent: Option<Agent>,
    a: Node,
    b: Node,
    pki: Pki,
    dir: TempDir,
    ca: PathBuf,
    peers: PathBuf,
    config: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

fn auth_config() -> serde_json::Value {
    serde_json::json!({
        "default_action": "deny",
        "endpoints": [
            {"ip": A_IP, "identity": FE, "node": "node-a"},
            {"ip": B_IP, "identity": DB, "node": "node-b"}
        ],
        "policies": [
            {"from": FE, "to": DB, "protocol": "tcp", "ports": [DB_PORT], "action": "auth"}
        ]
    })
}

impl World {
    fn new(test: &str) -> World {
        let serial = setup();
        let pki = Pki::new("meshpath test CA");
        let dir = TempDir::new();
        let node = |n: &'static str, ip: &'static str, spiffe: &str, serial: u64| {
            let netns = Netns::new(&format!("{test}-{n}"));
            let cg = ScopedCgroup::new(&format!("mp-auth-{test}-{n}")).expect("a pod cgroup");
            let pin = PinDir::new(&format!("auth-{test}-{n}"));
            let (cert, key) = write_leaf(&dir.0, n, &pki.leaf(spiffe, serial));
            Node {
                name: if n == "a" { "node-a" } else { "node-b" },
                ip,
                netns,
                cg,
                pin,
                cert,
                key,
            }
        };
        let a = node("a", A_IP, FE, 0xa1);
        let b = node("b", B_IP, DB, 0xb1);
        common::run(
            "ip",
            &[
                "-n",
                &a.netns.name,
                "link",
                "add",
                "va",
                "type",
                "veth",
                "peer",
                "name",
                "vb",
                "netns",
                &b.netns.name,
            ],
        );
        for (n, dev, ip) in [(&a, "va", A_IP), (&b, "vb", B_IP)] {
            let ns = n.netns.name.as_str();
            common::run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev],
            );
            common::run("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        let ca = write(&dir.0, "ca.pem", &pki.ca_pem);
        let peers = write(
            &dir.0,
            "peers.json",
            &serde_json::json!({"peers": {
                "node-a": format!("{A_IP}:{AUTH_PORT}"),
                "node-b": format!("{B_IP}:{AUTH_PORT}"),
            }})
            .to_string(),
        );
        let config = write(&dir.0, "policy.json", &auth_config().to_string());
        World {
            a_agent: None,
            b_agent: None,
            a,
            b,
            pki,
            dir,
            ca,
            peers,
            config,
            _serial: serial,
        }
    }

    fn node(&self, which: char) -> &Node {
        if which == 'a' {
            &self.a
        } else {
            &self.b
        }
    }

    /// The agent arguments of node `which` ('a' or 'b').
    fn args(&self, which: char, extra: &[&str]) -> Vec<String> {
        let n = self.node(which);
        let mut args: Vec<String> = [
            "--cgroup",
            &n.cg.path().to_string_lossy(),
            "--pin",
            &n.pin.0.to_string_lossy(),
            "--config",
            &self.config.to_string_lossy(),
            "--node",
            n.name,
            "--auth-listen",
            &format!("{}:{AUTH_PORT}", n.ip),
            "--peers",
            &self.peers.to_string_lossy(),
            "--cert",
            &n.cert.to_string_lossy(),
            "--key",
            &n.key.to_string_lossy(),
            "--ca",
            &self.ca.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts node `which`'s agent in its namespace and waits for ready.
    fn start(&mut self, which: char, extra: &[&str]) -> String {
        let n = self.node(which);
        let mut agent = Agent::spawn_in_netns(&n.netns.name, &self.args(which, extra));
        let ready = agent.wait_ready();
        assert!(
            ready.contains(&format!(
                "; auth on {}:{AUTH_PORT} (node {}, 1 identity)",
                n.ip, n.name
            )),
            "{ready}"
        );
        if which == 'a' {
            self.a_agent = Some(agent);
        } else {
            self.b_agent = Some(agent);
        }
        ready
    }

    fn agent(&mut self, which: char) -> &mut Agent {
        let a = if which == 'a' {
            &mut self.a_agent
        } else {
            &mut self.b_agent
        };
        a.as_mut().expect("the agent is running")
    }

    /// The db's listener on node b (in its namespace and pod cgroup).
    fn db_listener(&self) -> TcpListener {
        let _in = self.b.cg.enter().expect("entering node b's pod cgroup");
        self.b
            .netns
            .run(|| TcpListener::bind(format!("{B_IP}:{DB_PORT}")).expect("binding the db"))
    }

    /// Unconnected TCP sockets of the frontend on node a (its namespace
    /// and pod cgroup), bound to 198.18.0.1.
    fn fe_sockets(&self, n: usize, send_timeout: Duration) -> Vec<TcpStream> {
        let _in = self.a.cg.enter().expect("entering node a's pod cgroup");
        self.a.netns.run(move || {
            (0..n)
                .map(|_| {
                    use nix::sys::socket::*;
                    let fd = socket(
                        AddressFamily::Inet,
                        SockType::Stream,
                        SockFlag::SOCK_CLOEXEC,
                        None,
                    )
                    .unwrap();
                    let src: SocketAddr = format!("{A_IP}:0").parse().unwrap();
                    bind(fd.as_raw_fd(), &SockaddrStorage::from(src)).unwrap();
                    let s = TcpStream::from(fd);
                    // SO_SNDTIMEO bounds connect() too.
                    s.set_write_timeout(Some(send_timeout)).unwrap();
                    s.set_nodelay(true).unwrap();
                    s
                })
                .collect()
        })
    }
}

fn db_addr() -> SocketAddr {
    format!("{B_IP}:{DB_PORT}").parse().unwrap()
}

fn connect(s: TcpStream, to: SocketAddr) -> std::io::Result<TcpStream> {
    nix::sys::socket::connect(s.as_raw_fd(), &nix::sys::socket::SockaddrStorage::from(to))?;
    Ok(s)
}

/// Accepts the next connection on `l` within `within`.
fn accept(l: &TcpListener, within: Duration) -> Option<TcpStream> {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + within;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                return Some(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => return None,
        }
    }
}

/// Waits for a stdout line of `agent` starting with `prefix` and holding
/// every one of `parts`; other lines are skipped.
fn wait_for(agent: &mut Agent, prefix: &str, parts: &[&str], within: Duration) -> String {
    let deadline = Instant::now() + scaled(within);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match agent.stdout.recv_timeout(left) {
            Ok(l) => l,
            Err(e) => panic!(
                "no line {prefix:?} with {parts:?} within {within:?} ({e}); stdout so far: {:#?}",
                agent.seen
            ),
        };
        agent.seen.push(line.clone());
        if line.starts_with(prefix) && parts.iter().all(|p| line.contains(p)) {
            return line;
        }
    }
}

/// The stdout lines `agent` prints within `d`.
fn lines_within(agent: &mut Agent, d: Duration) -> Vec<String> {
    let deadline = Instant::now() + d;
    let mut out = Vec::new();
    while let Ok(l) = agent
        .stdout
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        agent.seen.push(l.clone());
        out.push(l);
    }
    out
}

/// One echo round: `n` bytes of a pattern out, back byte-exact.
fn echo(c: &mut TcpStream, n: usize, seed: u64) -> std::io::Result<()> {
    let mut out = vec![0u8; n];
    common::pattern(seed, 0, &mut out);
    c.write_all(&out)?;
    let mut back = vec![0u8; n];
    c.read_exact(&mut back)?;
    assert!(back == out, "the echo differs");
    Ok(())
}

fn echo_server(mut s: TcpStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    })
}

/// An authenticated frontend -> db connection: held until the handshake,
/// then connected. Returns it, the db's end, and connect's duration.
fn held_connect(w: &World, db: &TcpListener) -> (TcpStream, TcpStream, Duration) {
    let s = w.fe_sockets(1, Duration::from_secs(8)).pop().unwrap();
    let t = Instant::now();
    let c = connect(s, db_addr()).expect("held, then connected after the handshake");
    let took = t.elapsed();
    let srv = accept(db, Duration::from_secs(5)).expect("the db accepts");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (c, srv, took)
}

// ---------------------------------------------------------------------------
// Root tests.

#[test]
fn auth_flags_and_files_fail_in_one_line_naming_them() {
    let _serial = setup();
    let pki = Pki::new("flags CA");
    let dir = TempDir::new();
    let cg = ScopedCgroup::new("mp-auth-flags").expect("a cgroup");
    let cgs = cg.path().to_string_lossy().into_owned();
    let (fe_cert, fe_key) = write_leaf(&dir.0, "fe", &pki.leaf(FE, 1));
    let (_, db_key) = write_leaf(&dir.0, "db", &pki.leaf(DB, 2));
    let (nosan, nosan_key) = write_leaf(&dir.0, "nosan", &pki.leaf_with(&[], 3, None));
    let ca = write(&dir.0, "ca.pem", &pki.ca_pem);
    let peers = write(
        &dir.0,
        "peers.json",
        r#"{"peers": {"node-a": "127.0.0.1:7443"}}"#,
    );
    let badpeers = write(
        &dir.0,
        "bad-peers.json",
        r#"{"peers": {"node-a": "nowhere"}}"#,
    );
    let config = write(&dir.0, "policy.json", &auth_config().to_string());
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let base = |cert: &Path, key: &Path| -> Vec<String> {
        [
            "--cgroup",
            &cgs,
            "--node",
            "node-a",
            "--auth-listen",
            "127.0.0.1:0",
            "--ca",
            &p(&ca),
            "--cert",
            &p(cert),
            "--key",
            &p(key),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let missing = dir.0.join("missing.pem");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            base(&missing, &fe_key),
            vec!["--cert", "missing.pem", "cannot read it"],
        ),
        (
            base(&fe_cert, &db_key),
            vec!["--key", "db.key", "does not match", "fe.pem"],
        ),
        (
            base(&nosan, &nosan_key),
            vec!["--cert", "nosan.pem", "SPIFFE"],
        ),
        (
            [
                base(&fe_cert, &fe_key),
                vec!["--peers".into(), p(&badpeers)],
            ]
            .concat(),
            vec!["--peers", "peers.\"node-a\"", "ADDR:PORT"],
        ),
        (
            [
                base(&fe_cert, &fe_key),
                vec!["--peers".into(), p(&peers), "--config".into(), p(&config)],
            ]
            .concat(),
            vec!["endpoints[1].node", "\"node-b\"", "not in --peers"],
        ),
        (
            vec![
                "--cgroup".into(),
                cgs.clone(),
                "--cert".into(),
                p(&fe_cert),
                "--key".into(),
                p(&fe_key),
            ],
            vec!["--cert, --key given without --auth-listen"],
        ),
        (
            [base(&fe_cert, &fe_key), vec!["--cert".into(), p(&fe_cert)]].concat(),
            vec!["--cert is given 2 times and --key 1"],
        ),
        (
            vec![
                "--cgroup".into(),
                cgs.clone(),
                "--auth-listen".into(),
                "127.0.0.1:0".into(),
                "--node".into(),
                "node-a".into(),
                "--cert".into(),
                p(&fe_cert),
                "--key".into(),
                p(&fe_key),
            ],
            vec!["--ca"],
        ),
        (
            base(&fe_cert, &fe_key)
                .into_iter()
                .map(|a| if a == "node-a" { "Node_A".into() } else { a })
                .collect(),
            vec!["--node Node_A", "lowercase"],
        ),
        (
            [
                base(&fe_cert, &fe_key),
                vec!["--auth-ttl".into(), "0".into()],
            ]
            .concat(),
            vec!["--auth-ttl"],
        ),
    ];
    // The flags are part of the command-line contract.
    let mut help = Agent::spawn(&["--help"]);
    assert_eq!(help.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let text = help.stdout_lines().join("\n");
    for flag in [
        "--node",
        "--auth-listen",
        "--peers",
        "--cert",
        "--key",
        "--ca",
        "--auth-ttl",
        "--auth-renew-before",
        "--revoked",
    ] {
        assert!(text.contains(flag), "--help does not name {flag}: {text}");
    }
    for (args, want) in cases {
        let f = run_failing(&args);
        let line = f.one_line_error();
        assert!(line.starts_with("agent: error: "), "{line}");
        for w in want {
            assert!(line.contains(w), "{args:?}: {line:?} should contain {w:?}");
        }
    }
}

/// (1) The first connection of an `auth` flow is held until the agents'
/// handshake completes, then data flows byte-exact; an authenticated pair
/// connects at once. Prints the latencies the README quotes.
#[test]
fn an_auth_flow_is_held_until_the_handshake_then_flows() {
    let mut w = World::new("held");
    w.start('b', &[]);
    w.start('a', &[]);
    let db = w.db_listener();
    // Time from the first SYN (connect) to the first byte from the db.
    let s = w.fe_sockets(1, Duration::from_secs(8)).pop().unwrap();
    let t = Instant::now();
    let greeter = std::thread::spawn(move || {
        let mut srv = accept(&db, Duration::from_secs(8)).expect("the db accepts");
        srv.write_all(b"!").unwrap();
        (db, srv)
    });
    let mut c = connect(s, db_addr()).expect("held, then connected");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).unwrap();
    let first = t.elapsed();
    let (db, mut srv) = greeter.join().unwrap();
    assert!(first >= Duration::from_millis(900), "held for {first:?}");
    let a_ok = wait_for(
        w.agent('a'),
        "agent: auth: ok: ",
        &[&format!("{FE} -> {DB} on node node-b"), "asked at connect"],
        Duration::from_secs(2),
    );
    wait_for(
        w.agent('b'),
        "agent: auth: ok: ",
        &[&format!("{DB} <- {FE} on node node-a")],
        Duration::from_secs(2),
    );
    // Byte-exact both ways (1 MiB and 256 KiB, hashed).
    srv.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut c2, mut s2) = (c.try_clone().unwrap(), srv.try_clone().unwrap());
    let wr = std::thread::spawn(move || write_pattern(&mut c2, 11, 1 << 20, 16 * 1024));
    let got = read_pattern(&mut s2, 11, 1 << 20);
    assert_eq!(got, wr.join().unwrap(), "client -> db");
    let wr = std::thread::spawn(move || write_pattern(&mut srv, 12, 256 * 1024, 4096));
    let got = read_pattern(&mut c, 12, 256 * 1024);
    assert_eq!(got, wr.join().unwrap(), "db -> client");
    // Each node holds its own orientation of the pair.
    assert_eq!(w.a.entries(), vec![(id(FE), id(DB), node_number("node-b"))]);
    assert_eq!(w.b.entries(), vec![(id(DB), id(FE), node_number("node-a"))]);
    // Authenticated: first byte at once, five times.
    let mut again = Vec::new();
    for _ in 0..5 {
        let s = w.fe_sockets(1, Duration::from_secs(3)).pop().unwrap();
        let t = Instant::now();
        let mut c = connect(s, db_addr()).expect("connects at once");
        let mut srv = accept(&db, Duration::from_secs(3)).expect("accepted");
        srv.write_all(b"!").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.read_exact(&mut one).unwrap();
        again.push(t.elapsed());
    }
    again.sort();
    assert!(again[4] < Duration::from_millis(500), "{again:?}");
    let lines = lines_within(w.agent('a'), Duration::from_millis(200));
    assert!(
        !lines.iter().any(|l| l.starts_with("agent: auth: ok")),
        "no second handshake: {lines:?}"
    );
    eprintln!(
        "latency: auth flow, first SYN to first byte (handshake included): {:.1} ms; \
         authenticated flow: median {:.3} ms (min {:.3}, max {:.3}); agent: {a_ok}",
        first.as_secs_f64() * 1e3,
        again[2].as_secs_f64() * 1e3,
        again[0].as_secs_f64() * 1e3,
        again[4].as_secs_f64() * 1e3
    );
    for which in ['a', 'b'] {
        let agent = if which == 'a' {
            w.a_agent.take()
        } else {
            w.b_agent.take()
        };
        stop(agent.unwrap());
    }
}

/// A fake peer agent's TLS credentials, from a leaf.
fn fake_cert(w: &World, name: &str, leaf: &Leaf) -> Arc<auth_certs::LocalCert> {
    let (c, k) = write_leaf(&w.dir.0, name, leaf);
    Arc::new(
        auth_certs::load_local_cert(&c, &k, &auth_tls::provider(), &IdentityKey::default())
            .expect("a fake cert"),
    )
}

fn roots(w: &World) -> Arc<rustls::RootCertStore> {
    Arc::new(auth_certs::load_ca(&w.ca).unwrap())
}

/// Reads one line (the protocol's plain part), byte by byte so that no
/// TLS byte is taken.
fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Drives a TLS connection until its handshake ends; the error if any.
fn complete<C, D>(conn: &mut C, s: &mut TcpStream) -> Result<(), String>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    while conn.is_handshaking() {
        conn.complete_io(s).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// (2) Peers whose certificate names another SPIFFE ID, is signed by
/// another CA, or has expired are refused, by the client's verifier (a
/// fake node b presents them to agent a) and by the server's (a fake node
/// a presents them to agent b); the flow stays denied, the log says why.
#[test]
fn peers_with_bad_certificates_stay_denied() {
    let mut w = World::new("badcert");
    let other = Pki::new("another CA");
    let yesterday = SystemTime::now() - Duration::from_secs(86_400);
    let bad_servers = [
        (
            fake_cert(&w, "s-imp", &w.pki.leaf(IMPOSTOR, 0x51)),
            format!("names {IMPOSTOR}, expected {DB}"),
        ),
        (
            fake_cert(&w, "s-ca", &other.leaf(DB, 0x52)),
            "UnknownIssuer".to_string(),
        ),
        (
            fake_cert(&w, "s-exp", &w.pki.leaf_with(&[DB], 0x53, Some(yesterday))),
            "expired".to_string(),
        ),
    ];
    // Part 1: agent a against a fake node b (the db itself has no agent).
    w.start('a', &[]);
    let db = w.db_listener();
    let fake = {
        let certs: Vec<_> = bad_servers.iter().map(|(c, _)| c.clone()).collect();
        let roots = roots(&w);
        let l = w.b.netns.run(move || {
            let l = TcpListener::bind(format!("{B_IP}:{AUTH_PORT}")).expect("fake node b");
            l.set_nonblocking(true).unwrap();
            l
        });
        std::thread::spawn(move || {
            let mut hellos = Vec::new();
            for cert in certs {
                let Some(mut s) = accept(&l, Duration::from_secs(15)) else {
                    break;
                };
                hellos.push(read_line(&mut s));
                s.write_all(b"{\"ok\":true}\n").unwrap();
                let cfg = auth_tls::server_config(
                    &auth_tls::provider(),
                    &roots,
                    &cert.key,
                    auth_tls::Expect {
                        role: "client",
                        spiffe: Some(FE.parse().unwrap()),
                        revoked: None,
                    },
                )
                .unwrap();
                let mut conn = rustls::ServerConnection::new(Arc::new(cfg)).unwrap();
                let r = complete(&mut conn, &mut s);
                assert!(r.is_err(), "agent a accepted a bad server certificate");
            }
            hellos
        })
    };
    // New connections every 200 ms: their SYNs keep asking.
    let socks = w.fe_sockets(40, Duration::from_millis(150));
    let prod = std::thread::spawn(move || {
        let mut connected = 0;
        for s in socks {
            if connect(s, db_addr()).is_ok() {
                connected += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        connected
    });
    for (_, why) in &bad_servers {
        wait_for(
            w.agent('a'),
            "agent: auth: failed: ",
            &[&format!("{FE} -> {DB} on node node-b"), why],
            Duration::from_secs(10),
        );
    }
    let hellos = fake.join().expect("the fake node b");
    assert_eq!(hellos.len(), 3);
    let hello: serde_json::Value = serde_json::from_str(&hellos[0]).unwrap();
    assert_eq!(
        hello,
        serde_json::json!({"meshpath_auth": 2, "op": "auth", "client": FE, "server": DB, "node": "node-a"})
    );
    assert_eq!(prod.join().unwrap(), 0, "no connection got through");
    assert!(accept(&db, Duration::from_millis(10)).is_none());
    assert!(w.a.entries().is_empty());

    // Part 2: agent b against a fake node a.
    w.start('b', &[]);
    let bad_clients = [
        (
            fake_cert(&w, "c-imp", &w.pki.leaf(IMPOSTOR, 0x61)),
            format!("names {IMPOSTOR}, expected {FE}"),
        ),
        (
            fake_cert(&w, "c-ca", &other.leaf(FE, 0x62)),
            "UnknownIssuer".to_string(),
        ),
        (
            fake_cert(&w, "c-exp", &w.pki.leaf_with(&[FE], 0x63, Some(yesterday))),
            "xpired".to_string(),
        ),
    ];
    for (cert, why) in &bad_clients {
        let cert = cert.clone();
        let roots = roots(&w);
        let outcome = w.a.netns.run(move || {
            let mut s = TcpStream::connect(format!("{B_IP}:{AUTH_PORT}")).expect("agent b");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let hello = serde_json::json!({"meshpath_auth": 2, "op": "auth", "client": FE,
                                           "server": DB, "node": "node-a"});
            s.write_all(format!("{hello}\n").as_bytes()).unwrap();
            let answer = read_line(&mut s);
            assert_eq!(answer, "{\"ok\":true}", "agent b answers the hello");
            let cfg = auth_tls::client_config(
                &auth_tls::provider(),
                &roots,
                &cert.key,
                auth_tls::Expect {
                    role: "server",
                    spiffe: Some(DB.parse().unwrap()),
                    revoked: None,
                },
            )
            .unwrap();
            let mut conn =
                rustls::ClientConnection::new(Arc::new(cfg), auth_tls::placeholder_name()).unwrap();
            complete(&mut conn, &mut s)?;
            // TLS 1.3: the client is done first; the server's verdict
            // comes with the reply.
            let mut tls = rustls::Stream::new(&mut conn, &mut s);
            tls.write_all(b"{\"until_ms\":4102444800000}\n")
                .map_err(|e| e.to_string())?;
            let mut reply = String::new();
            BufReader::new(tls)
                .read_line(&mut reply)
                .map_err(|e| e.to_string())?;
            Ok::<String, String>(reply)
        });
        assert!(
            outcome.is_err(),
            "agent b accepted a bad client: {outcome:?}"
        );
        wait_for(
            w.agent('b'),
            "agent: auth: failed: handshake from 198.18.0.1:",
            &[&format!("node node-a, {FE} -> {DB}"), why],
            Duration::from_secs(5),
        );
    }
    assert!(w.b.entries().is_empty(), "{:?}", w.b.entries());
    // A hello from an address that is not node a's is refused before TLS.
    let refused = w.b.netns.run(|| {
        let mut s = TcpStream::connect(format!("{B_IP}:{AUTH_PORT}")).expect("agent b");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let hello = serde_json::json!({"meshpath_auth": 2, "op": "auth", "client": FE,
                                       "server": DB, "node": "node-a"});
        s.write_all(format!("{hello}\n").as_bytes()).unwrap();
        read_line(&mut s)
    });
    assert!(
        refused.contains("\"ok\":false") && refused.contains("comes from 198.18.0.2"),
        "{refused}"
    );
    drop(db);
}

/// (3) Node a renews before expiry (traffic flows across the first
/// expiry); restarted with `--pin` it restores its view from the auth map
/// without a handshake; with renewal off the entry expires and the next
/// packet asks again, after which traffic continues.
#[test]
fn entries_are_renewed_restored_and_reauthenticated_after_expiry() {
    let mut w = World::new("expiry");
    w.start('b', &["--auth-ttl", "6"]);
    w.start('a', &["--auth-ttl", "6"]);
    let db = w.db_listener();
    let (mut c, srv, _) = held_connect(&w, &db);
    let _echo = echo_server(srv);
    let pair = format!("{FE} -> {DB} on node node-b");
    wait_for(
        w.agent('a'),
        "agent: auth: ok: ",
        &[&pair],
        Duration::from_secs(2),
    );
    // Renewed at 2/3 of the 6 s: rounds every 100 ms for 6.5 s, past the
    // first expiry, all pass.
    let t = Instant::now();
    let mut round = 0;
    while t.elapsed() < Duration::from_millis(6500) {
        echo(&mut c, 1000, round).unwrap_or_else(|e| panic!("round {round}: {e}"));
        round += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(
        w.agent('a'),
        "agent: auth: renewed: ",
        &[&pair, "until"],
        Duration::from_secs(1),
    );
    wait_for(
        w.agent('b'),
        "agent: auth: ok: ",
        &[&format!("{DB} <- {FE} on node node-a")],
        Duration::from_secs(1),
    );
    let a_renewals = w
        .agent('a')
        .seen
        .iter()
        .filter(|l| l.contains("renewed"))
        .count();
    assert!(a_renewals >= 1);
    let b_lines = lines_within(w.agent('b'), Duration::from_millis(10));
    assert!(
        !w.agent('b').seen.iter().any(|l| l.contains("renewed")),
        "only one node of a pair renews: {b_lines:?}"
    );

    // Restart node a with renewal off: the entry is restored, no handshake.
    stop(w.a_agent.take().unwrap());
    w.start('a', &["--auth-ttl", "6", "--auth-renew-before", "0"]);
    assert!(
        w.agent('a')
            .seen
            .iter()
            .any(|l| l == "agent: auth: restored 1 entry from the auth map"),
        "{:?}",
        w.agent('a').seen
    );
    echo(&mut c, 1000, 100).expect("still authenticated after the restart");
    let quiet = lines_within(w.agent('a'), Duration::from_millis(800));
    assert!(
        !quiet
            .iter()
            .any(|l| l.starts_with("agent: auth: ok") || l.contains("renewed")),
        "no handshake after the restart: {quiet:?}"
    );
    // Let it expire (node a's view of its map), then talk again.
    let deadline = Instant::now() + Duration::from_secs(8);
    while !w.a.entries().is_empty() {
        assert!(Instant::now() < deadline, "the entry did not expire");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    echo(&mut c, 1000, 101).expect("traffic continues after re-authentication");
    let gap = t.elapsed();
    wait_for(
        w.agent('a'),
        "agent: auth: ok: ",
        &[&pair, "asked at egress"],
        Duration::from_secs(2),
    );
    echo(&mut c, 1000, 102).unwrap();
    eprintln!("after expiry, the next round trip took {gap:?} (re-authentication included)");
    assert_eq!(w.a.entries(), vec![(id(FE), id(DB), node_number("node-b"))]);
}

/// (4) Revoking node a's certificate (by serial, `--revoked` + SIGHUP)
/// removes the entries on both nodes and cuts the flow; new connections
/// stay held. Lifting it lets the pair authenticate again; an identity
/// removed from node b's config loses its entries on both nodes too.
#[test]
fn revocation_cuts_the_flow_on_both_nodes() {
    let mut w = World::new("revoke");
    let revoked = write(&w.dir.0, "revoked.json", "{}");
    w.start('b', &[]);
    w.start('a', &["--revoked", &revoked.to_string_lossy()]);
    let db = w.db_listener();
    let (mut c, srv, _) = held_connect(&w, &db);
    let _echo = echo_server(srv);
    echo(&mut c, 1000, 1).unwrap();
    assert_eq!(w.a.entries().len(), 1);
    assert_eq!(w.b.entries().len(), 1);

    common::agent::write_config(&revoked, r#"{"serials": ["a1"]}"#);
    w.agent('a').signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        w.agent('a'),
        "agent: auth: revoked: ",
        &[FE, "serial a1 is revoked", "1 entry removed here"],
        Duration::from_secs(3),
    );
    wait_for(
        w.agent('a'),
        "agent: auth: revoked: told node node-b",
        &["1 entry removed there"],
        Duration::from_secs(3),
    );
    wait_for(
        w.agent('b'),
        "agent: auth: revoked: node node-a revoked ",
        &[FE, "1 entry removed here"],
        Duration::from_secs(3),
    );
    assert!(w.a.entries().is_empty() && w.b.entries().is_empty());
    // The established flow is cut (reset, or its packets dropped).
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let r = echo(&mut c, 1000, 2);
    assert!(r.is_err(), "the flow survived the revocation");
    // New connections are held; the agent says why it cannot prove FE.
    let s = w.fe_sockets(1, Duration::from_secs(3)).pop().unwrap();
    assert!(
        connect(s, db_addr()).is_err(),
        "a new connection got through"
    );
    wait_for(
        w.agent('a'),
        "agent: auth: failed: ",
        &[&format!("{FE} -> {DB}"), "revoked"],
        Duration::from_secs(3),
    );
    assert!(w.a.entries().is_empty() && w.b.entries().is_empty());

    // Lifted: the pair authenticates again.
    common::agent::write_config(&revoked, "{}");
    w.agent('a').signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    let (mut c, srv, _) = held_connect(&w, &db);
    let _echo = echo_server(srv);
    echo(&mut c, 1000, 3).unwrap();
    // Node b's config drops the frontend: both nodes drop the pair.
    let mut config = auth_config();
    config["endpoints"].as_array_mut().unwrap().remove(0);
    let b_config = write(&w.dir.0, "policy.json", &config.to_string());
    assert_eq!(b_config, w.config);
    w.agent('b').signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        w.agent('b'),
        "agent: auth: revoked: ",
        &[FE, "no longer in --config", "1 entry removed here"],
        Duration::from_secs(3),
    );
    wait_for(
        w.agent('a'),
        "agent: auth: revoked: node node-b revoked ",
        &[FE, "1 entry removed here"],
        Duration::from_secs(3),
    );
    assert!(w.a.entries().is_empty() && w.b.entries().is_empty());
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(echo(&mut c, 1000, 4).is_err(), "the flow survived");
}

/// A pair on one node (remote node 0) authenticates through a real
/// handshake with its own agent, which installs both orientations.
#[test]
fn a_pair_on_one_node_authenticates_through_its_own_agent() {
    let mut w = World::new("local");
    let (db_cert, db_key) = write_leaf(&w.dir.0, "local-db", &w.pki.leaf(DB, 0xd1));
    let config = serde_json::json!({
        "default_action": "deny",
        "endpoints": [
            {"ip": "127.0.0.2", "identity": FE},
            {"ip": "127.0.0.3", "identity": DB, "node": "node-a"}
        ],
        "policies": [
            {"from": FE, "to": DB, "protocol": "tcp", "ports": [DB_PORT], "action": "auth"}
        ]
    });
    write(&w.dir.0, "policy.json", &config.to_string());
    let mut agent = Agent::spawn_in_netns(
        &w.a.netns.name,
        &[
            w.args('a', &[]),
            vec![
                "--cert".into(),
                db_cert.to_string_lossy().into_owned(),
                "--key".into(),
                db_key.to_string_lossy().into_owned(),
            ],
        ]
        .concat(),
    );
    let ready = agent.wait_ready();
    assert!(ready.contains("(node node-a, 2 identities)"), "{ready}");
    w.a_agent = Some(agent);
    let (db, s) = {
        let _in = w.a.cg.enter().expect("entering node a's pod cgroup");
        w.a.netns.run(|| {
            let db = TcpListener::bind(format!("127.0.0.3:{DB_PORT}")).unwrap();
            let s = connect_socket("127.0.0.2");
            (db, s)
        })
    };
    let t = Instant::now();
    let mut c =
        connect(s, format!("127.0.0.3:{DB_PORT}").parse().unwrap()).expect("held, then connected");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let mut srv = accept(&db, Duration::from_secs(3)).expect("accepted");
    // The server side installs and says so before it replies.
    wait_for(
        w.agent('a'),
        "agent: auth: ok: ",
        &[&format!("{DB} <- {FE} on node node-a")],
        Duration::from_secs(2),
    );
    let line = wait_for(
        w.agent('a'),
        "agent: auth: ok: ",
        &[&format!("{FE} -> {DB} on node node-a"), "asked at connect"],
        Duration::from_secs(2),
    );
    assert!(line.contains("handshake"), "{line}");
    assert_eq!(
        w.a.entries(),
        {
            let mut v = vec![(id(FE), id(DB), 0), (id(DB), id(FE), 0)];
            v.sort();
            v
        },
        "both orientations, remote node 0"
    );
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    srv.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
}

/// A TCP socket bound to `src`:0, not connected (SO_SNDTIMEO 5 s).
fn connect_socket(src: &str) -> TcpStream {
    use nix::sys::socket::*;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let a: SocketAddr = format!("{src}:0").parse().unwrap();
    bind(fd.as_raw_fd(), &SockaddrStorage::from(a)).unwrap();
    let s = TcpStream::from(fd);
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}
