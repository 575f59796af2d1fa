//! Mutual-TLS authentication of `auth` flows between node agents.
//!
//! ```text
//! agent ... --node NAME --auth-listen ADDR:PORT --ca CA.pem
//!           --cert ID1.pem --key ID1.key [--cert ID2.pem --key ID2.key ...]
//!           [--peers PEERS.json] [--revoked REVOKED.json]
//!           [--auth-ttl SECONDS] [--auth-renew-before SECONDS]
//! ```
//!
//! The datapath holds an `auth` flow back and signals its key (local
//! identity, remote identity, remote node). The agent then connects to the
//! remote node's agent (`--peers`; remote node 0 is this node: it connects
//! to its own `--auth-listen`, a real handshake with itself), runs a
//! TLS 1.3 handshake in which each side presents the certificate of its
//! identity in the key and checks the other's (chain to `--ca`, URI SAN =
//! the SPIFFE ID in the key, not revoked), and both agents install their
//! own orientation of the key until the earliest certificate not-after,
//! capped at `--auth-ttl`. The datapath never does crypto.
//!
//! * Pending handshakes are de-duplicated per key; a failed key backs off
//!   (1 s doubling to 30 s) and ignores signals meanwhile.
//! * Entries are renewed `--auth-renew-before` ahead of expiry (at most a
//!   third of their life; 0 turns renewal off, entries then expire and the
//!   next packet asks again). Of the two nodes of a pair exactly one
//!   renews: the one whose (node name, SPIFFE ID) sorts first.
//! * On start the view is restored from the auth map (with `--pin` it
//!   survives restarts): nothing is re-authenticated before it is due.
//! * SIGHUP re-reads `--cert`/`--key`/`--ca`, `--peers` and `--revoked`
//!   (all or nothing). Identities revoked (by serial or SPIFFE ID), no
//!   longer proven by a `--cert`, or gone from `--config` lose their
//!   entries here, and the peer nodes are told to drop theirs.
//! * Log lines on stdout start with `agent: auth: ` (handshakes ok and
//!   failed with the reason, renewals, revocations).
//!
//! File formats: `auth_files.rs`. Wire protocol: `auth_proto.rs`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use meshpath::policy::{IdentityKey, NodeName, PolicyState, SpiffeId};
use meshpath::{AuthKey, Datapath};
use rustls::crypto::CryptoProvider;
use rustls::RootCertStore;
use tokio::sync::mpsc;

use crate::auth_certs::{load_ca, load_local_cert, serial_hex, LocalCert};
use crate::auth_files::{parse_peers, parse_revoked, Peers, Revoked};
use crate::cli::Args;
use crate::output::{one_line, warn};

/// `--auth-ttl` when not given.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// `--auth-renew-before` when not given.
const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(60);

/// The auth files as given on the command line.
#[derive(Debug, Clone)]
struct Files {
    pairs: Vec<(PathBuf, PathBuf)>,
    ca: PathBuf,
    peers: Option<PathBuf>,
    revoked: Option<PathBuf>,
    /// The cluster's identity key (`--identity-key`): local identities'
    /// numbers.
    identity_key: IdentityKey,
}

/// What the files hold; replaced whole on SIGHUP.
pub(crate) struct Material {
    /// Local identity number -> its credentials.
    pub(crate) certs: BTreeMap<u64, Arc<LocalCert>>,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) peers: Peers,
    pub(crate) revoked: Arc<Revoked>,
    /// Where `--revoked` was read from, for messages.
    pub(crate) revoked_path: Option<PathBuf>,
}

impl Files {
    fn from_args(args: &Args, identity_key: &IdentityKey) -> anyhow::Result<Files> {
        if args.certs.len() != args.keys.len() {
            bail!(
                "--cert is given {} time{} and --key {}: give one --key per --cert, in the same \
                 order",
                args.certs.len(),
                if args.certs.len() == 1 { "" } else { "s" },
                args.keys.len()
            );
        }
        if args.certs.is_empty() {
            bail!(
                "--auth-listen needs at least one --cert CERT --key KEY pair (the certificate of \
                 a local identity)"
            );
        }
        let ca = args.ca.clone().ok_or_else(|| {
            anyhow!(
                "--auth-listen needs --ca CA (the PEM bundle that signs the mesh's certificates)"
            )
        })?;
        Ok(Files {
            pairs: args
                .certs
                .iter()
                .cloned()
                .zip(args.keys.iter().cloned())
                .collect(),
            ca,
            peers: args.peers.clone(),
            revoked: args.revoked.clone(),
            identity_key: identity_key.clone(),
        })
    }

    /// Reads every file; the warnings are for certificates that load but
    /// will not get far (expired, revoked, not signed by `--ca`).
    fn load(&self, provider: &Arc<CryptoProvider>) -> anyhow::Result<(Material, Vec<String>)> {
        let roots = Arc::new(load_ca(&self.ca)?);
        let peers = match &self.peers {
            Some(p) => {
                let text = crate::files::read_text("--peers", p, crate::files::SMALL_LIMIT)
                    .with_context(|| format!("--peers {}", p.display()))?;
                parse_peers(&text).map_err(|e| anyhow!("--peers {}: {e}", p.display()))?
            }
            None => Peers::default(),
        };
        let revoked = match &self.revoked {
            Some(p) => {
                let text = crate::files::read_text("--revoked", p, crate::files::REVOKED_LIMIT)
                    .with_context(|| format!("--revoked {}", p.display()))?;
                parse_revoked(&text).map_err(|e| anyhow!("--revoked {}: {e}", p.display()))?
            }
            None => Revoked::default(),
        };
        let check = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| anyhow!("--ca {}: {e}", self.ca.display()))?;
        let mut certs: BTreeMap<u64, Arc<LocalCert>> = BTreeMap::new();
        let mut warnings = Vec::new();
        let now = SystemTime::now();
        for (cert, key) in &self.pairs {
            let c = load_local_cert(cert, key, provider, &self.identity_key)?;
            if let Some(other) = certs.get(&c.identity) {
                bail!(
                    "--cert {}: proves {}, like another --cert (serial {}): one certificate per \
                     identity",
                    cert.display(),
                    c.spiffe,
                    serial_hex(&other.facts.serial)
                );
            }
            let shown = format!("--cert {} ({})", cert.display(), c.spiffe);
            if c.facts.not_after <= now {
                warnings.push(format!(
                    "{shown}: expired at {}; handshakes of this identity fail until it is \
                     replaced (SIGHUP re-reads it)",
                    crate::auth_certs::utc(c.facts.not_after)
                ));
            } else if c.facts.not_before > now {
                warnings.push(format!(
                    "{shown}: not valid before {}",
                    crate::auth_certs::utc(c.facts.not_before)
                ));
            } else if let Err(e) = check.verify_client_cert(
                &c.key.cert[0],
                &c.key.cert[1..],
                rustls_pki_types::UnixTime::now(),
            ) {
                warnings.push(format!(
                    "{shown}: does not verify against --ca {} ({e}): peers that trust only it \
                     refuse it",
                    self.ca.display()
                ));
            }
            if let Some(why) = revoked.why(&c.facts.serial, Some(&c.spiffe)) {
                warnings.push(format!("{shown}: {why} by --revoked"));
            }
            certs.insert(c.identity, Arc::new(c));
        }
        Ok((
            Material {
                certs,
                roots,
                peers,
                revoked: Arc::new(revoked),
                revoked_path: self.revoked.clone(),
            },
            warnings,
        ))
    }
}

/// The node name `--node` gives (or the hostname), if it is a valid
/// [`NodeName`]: config endpoints on this node are local.
pub(crate) fn node_name(args: &Args) -> Result<NodeName, String> {
    let raw = args.node.clone().unwrap_or_else(hostname);
    raw.parse::<NodeName>().map_err(|e| match e {
        meshpath::Error::Invalid { reason, .. } => {
            let flag = if args.node.is_some() {
                format!("--node {raw}")
            } else {
                format!("the hostname {raw:?} (no --node given)")
            };
            format!("{flag}: a node name {reason}")
        }
        other => other.to_string(),
    })
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Auth as the command line asks for it, checked and bound before the
/// datapath is loaded.
pub(crate) struct Prepared {
    node: NodeName,
    listener: std::net::TcpListener,
    listen: SocketAddr,
    files: Files,
    material: Material,
    ttl: Duration,
    renew_before: Duration,
    provider: Arc<CryptoProvider>,
}

/// Checks the auth flags and files and binds `--auth-listen`; `None`
/// when no auth flag is given (the agent then never authenticates:
/// `auth` flows stay held).
pub(crate) fn prepare(args: &Args, identity_key: &IdentityKey) -> anyhow::Result<Option<Prepared>> {
    let given: Vec<&str> = [
        (!args.certs.is_empty(), "--cert"),
        (!args.keys.is_empty(), "--key"),
        (args.ca.is_some(), "--ca"),
        (args.peers.is_some(), "--peers"),
        (args.revoked.is_some(), "--revoked"),
        (args.auth_ttl.is_some(), "--auth-ttl"),
        (args.auth_renew_before.is_some(), "--auth-renew-before"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, f)| *f)
    .collect();
    let Some(listen) = args.auth_listen else {
        if given.is_empty() {
            return Ok(None);
        }
        bail!(
            "{} given without --auth-listen ADDR:PORT (where this node's agent answers \
             handshakes)",
            given.join(", ")
        );
    };
    let node = node_name(args).map_err(|e| anyhow!("{e} (needed for --auth-listen)"))?;
    let files = Files::from_args(args, identity_key)?;
    let provider = crate::auth_tls::provider();
    let (material, warnings) = files.load(&provider)?;
    for w in warnings {
        warn(&w);
    }
    if let Some(addr) = material.peers.get(&node) {
        if listen.port() != 0 && addr.port() != listen.port() {
            warn(&format!(
                "--peers: this node ({node}) is listed at {addr}, but --auth-listen is {listen}"
            ));
        }
    }
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("--auth-listen {listen}: cannot listen there"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("--auth-listen {listen}"))?;
    let listen = listener.local_addr().unwrap_or(listen);
    Ok(Some(Prepared {
        node,
        listener,
        listen,
        files,
        material,
        ttl: args.auth_ttl.map_or(DEFAULT_TTL, Duration::from_secs),
        renew_before: args
            .auth_renew_before
            .map_or(DEFAULT_RENEW_BEFORE, Duration::from_secs),
        provider,
    }))
}

/// Every endpoint `"node"` of the config (other than this node) must be in
/// `--peers`. Errors name the field.
fn check_nodes(state: &PolicyState, peers: &Peers, with_peers: bool) -> Result<(), String> {
    for (i, ep) in state.endpoints.iter().enumerate() {
        if let Some(node) = &ep.node {
            if peers.get(node).is_none() {
                return Err(format!(
                    "invalid endpoints[{i}].node: node {:?} is not in {}: its agent cannot be \
                     reached for auth",
                    node.as_str(),
                    if with_peers {
                        "--peers"
                    } else {
                        "--peers (none given)"
                    }
                ));
            }
        }
    }
    Ok(())
}

impl Prepared {
    /// Checks the config's endpoint nodes against `--peers`.
    pub(crate) fn check_config(
        &self,
        state: &PolicyState,
        path: &std::path::Path,
    ) -> anyhow::Result<()> {
        check_nodes(state, &self.material.peers, self.files.peers.is_some())
            .map_err(|e| anyhow!("config {}: {e}", path.display()))
    }

    /// Registers the certificates, restores the view from the auth map,
    /// opens the signal reader and starts the handshake thread.
    pub(crate) fn start(self, dp: &Datapath) -> anyhow::Result<AuthService> {
        let reader = dp
            .auth_signals()
            .context("opening the auth signal reader")?;
        let n_ids = self.material.certs.len();
        let shared = Arc::new(Shared {
            dp: dp.clone(),
            node: self.node.clone(),
            listen: self.listen,
            ttl: self.ttl,
            renew_before: self.renew_before,
            provider: self.provider.clone(),
            material: RwLock::new(Arc::new(self.material)),
            view: Mutex::new(BTreeMap::new()),
        });
        crate::auth_manager::register_certificates(&shared, None)?;
        crate::auth_manager::restore(&shared)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sh = shared.clone();
        let listener = self.listener;
        let thread = std::thread::Builder::new()
            .name("meshpath-auth".into())
            .spawn(move || crate::auth_manager::run(sh, reader, listener, rx, ready_tx))
            .context("starting the auth thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(anyhow!("starting auth: {e}"));
            }
            Err(_) => {
                let _ = thread.join();
                bail!("starting auth: the auth thread ended");
            }
        }
        Ok(AuthService {
            cmd: tx,
            thread: Some(thread),
            files: self.files,
            shared,
            describe: format!(
                "; auth on {} (node {}, {n_ids} identit{})",
                self.listen,
                self.node,
                if n_ids == 1 { "y" } else { "ies" }
            ),
        })
    }
}

/// What the manager is told from the main thread.
pub(crate) enum Cmd {
    /// New files (SIGHUP): swap them in and revoke what they revoke.
    Reload(Material),
    Stop,
}

/// The running auth side of the agent.
pub(crate) struct AuthService {
    cmd: mpsc::UnboundedSender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
    files: Files,
    shared: Arc<Shared>,
    describe: String,
}

impl AuthService {
    /// What the ready line adds: `; auth on ADDR (node NAME, N identities)`.
    pub(crate) fn describe(&self) -> &str {
        &self.describe
    }

    /// SIGHUP: re-reads the files (after the config was reloaded). A file
    /// that does not load is an `agent: error:` line and nothing changes.
    pub(crate) fn reload(&self) {
        let result = self
            .files
            .load(&self.shared.provider)
            .and_then(|(m, warnings)| {
                if let Some(state) = self.shared.dp.policy() {
                    check_nodes(&state, &m.peers, self.files.peers.is_some())
                        .map_err(|e| anyhow!("config: {e}"))?;
                }
                for w in warnings {
                    warn(&w);
                }
                Ok(m)
            });
        match result {
            Ok(m) => {
                let _ = self.cmd.send(Cmd::Reload(m));
            }
            Err(e) => crate::output::error(&format!(
                "auth: {}; the auth files in force are unchanged",
                one_line(&e)
            )),
        }
    }

    /// Stops the handshake thread. Entries stay in the auth map (a
    /// restarted agent with `--pin` restores them).
    pub(crate) fn stop(mut self) {
        let _ = self.cmd.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An entry as the agent knows it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// When it was (re)authenticated (restored entries: when restored).
    pub(crate) from: SystemTime,
    pub(crate) until: SystemTime,
    /// The serial of the peer's certificate (unknown for restored
    /// entries until their renewal).
    pub(crate) peer_serial: Option<Vec<u8>>,
    /// This node renews it.
    pub(crate) renew: bool,
    /// A renewal did not extend it (a certificate's not-after bounds it):
    /// not renewed again until the files change.
    pub(crate) stuck: bool,
}

/// State shared by the manager, the handshakes and the server.
pub(crate) struct Shared {
    pub(crate) dp: Datapath,
    pub(crate) node: NodeName,
    pub(crate) listen: SocketAddr,
    pub(crate) ttl: Duration,
    pub(crate) renew_before: Duration,
    pub(crate) provider: Arc<CryptoProvider>,
    pub(crate) material: RwLock<Arc<Material>>,
    pub(crate) view: Mutex<BTreeMap<AuthKey, Entry>>,
}

/// Where a key's peer agent is.
pub(crate) struct PeerNode {
    pub(crate) name: NodeName,
    pub(crate) addr: SocketAddr,
}

impl Shared {
    pub(crate) fn material(&self) -> Arc<Material> {
        self.material
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn view(&self) -> std::sync::MutexGuard<'_, BTreeMap<AuthKey, Entry>> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An identity number as a name for messages.
    pub(crate) fn name(&self, id: u64) -> String {
        if let Some(c) = self.material().certs.get(&id) {
            return c.spiffe.to_string();
        }
        match self.dp.identity_name(id) {
            Ok(Some(n)) => n,
            _ => format!("identity {id}"),
        }
    }

    /// The SPIFFE ID of a remote identity number, from the policy.
    pub(crate) fn spiffe_of(&self, id: u64) -> Result<SpiffeId, String> {
        let name = self
            .dp
            .identity_name(id)
            .map_err(|e| format!("looking up identity {id}: {e}"))?
            .ok_or_else(|| format!("identity {id} is not in the policy"))?;
        name.parse()
            .map_err(|_| format!("{name} is not a workload (only SPIFFE IDs authenticate)"))
    }

    /// This node's own auth address (the listen address, loopback when
    /// it listens on every address).
    pub(crate) fn self_addr(&self) -> SocketAddr {
        let ip = match self.listen.ip() {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.listen.port())
    }

    /// The node of a key's `remote_node`.
    pub(crate) fn node_of(&self, remote_node: u32) -> Result<PeerNode, String> {
        if remote_node == 0 || remote_node == self.node.number() {
            return Ok(PeerNode {
                name: self.node.clone(),
                addr: self.self_addr(),
            });
        }
        let m = self.material();
        let (name, addr) = m.peers.by_number(remote_node).ok_or_else(|| {
            format!("node number {remote_node} is not in --peers (which node does --config put the peer on?)")
        })?;
        Ok(PeerNode {
            name: name.clone(),
            addr,
        })
    }

    /// Whether this node renews the entry of (local, remote on
    /// `peer_node`): of the two orientations of a pair, the one whose
    /// (node name, SPIFFE ID) sorts first.
    pub(crate) fn renews(&self, local: &str, remote: &str, peer_node: &NodeName) -> bool {
        (self.node.as_str(), local) < (peer_node.as_str(), remote)
    }

    /// The key's local identity's certificate, if usable now.
    pub(crate) fn usable_cert(&self, m: &Material, id: u64) -> Result<Arc<LocalCert>, String> {
        let c = m
            .certs
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("no --cert proves local identity {}", self.name(id)))?;
        let now = SystemTime::now();
        if c.facts.not_after <= now {
            return Err(format!(
                "the certificate of {} expired at {}",
                c.spiffe,
                crate::auth_certs::utc(c.facts.not_after)
            ));
        }
        if let Some(why) = m.revoked.why(&c.facts.serial, Some(&c.spiffe)) {
            return Err(format!("our certificate of {}: {why}", c.spiffe));
        }
        Ok(c)
    }
}
