//! The auth thread: a tokio runtime that reads auth-required signals,
//! runs handshakes as a client (de-duplicated, backed off), renews
//! entries, applies reloads (revocations, told to the peers) and serves
//! the other nodes' handshakes (`auth_server.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshpath::policy::{NodeName, SpiffeId};
use meshpath::{AuthKey, AuthSignalReader, AuthSignalStream, CertInfo, Point};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::auth::{Cmd, Entry, Material, Shared};
use crate::auth_certs::{cert_facts, entry_until, renew_at, serial_hex, utc};
use crate::auth_proto::{self, Answer, Hello, Op, Reply, Request, VERSION};
use crate::auth_tls::{self, Expect};
use crate::output::{say, warn};

/// One exchange (connect, handshake, request, reply) at most this long.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often renewals fall due and expired entries are swept.
const TICK: Duration = Duration::from_millis(200);
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Milliseconds since the epoch, and back.
pub(crate) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// The thread's body: starts the runtime, reports whether it started,
/// runs until [`Cmd::Stop`].
pub(crate) fn run(
    sh: Arc<Shared>,
    reader: AuthSignalReader,
    listener: std::net::TcpListener,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("tokio runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let stream = match AuthSignalStream::new(reader) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(format!("auth signals: {e}")));
                return;
            }
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("--auth-listen: {e}")));
                return;
            }
        };
        let server = tokio::spawn(crate::auth_server::serve(sh.clone(), listener));
        let _ = ready.send(Ok(()));
        Manager::new(sh).run(stream, cmds).await;
        server.abort();
    });
}

/// Why a handshake runs.
#[derive(Debug, Clone, Copy)]
enum Why {
    Signal(Point),
    /// Renewing an entry valid until then.
    Renew(SystemTime),
}

/// A handshake's outcome, as the manager learns it.
struct Done {
    key: AuthKey,
    why: Why,
    result: Result<Authenticated, String>,
    took: Duration,
}

struct Authenticated {
    until: SystemTime,
    local: SpiffeId,
    remote: SpiffeId,
    node: NodeName,
    peer_serial: Vec<u8>,
}

struct Manager {
    sh: Arc<Shared>,
    pending: HashSet<AuthKey>,
    /// Failed keys: not before, and the next delay.
    backoff: HashMap<AuthKey, (Instant, Duration)>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    next_sweep: Instant,
}

impl Manager {
    fn new(sh: Arc<Shared>) -> Manager {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Manager {
            sh,
            pending: HashSet::new(),
            backoff: HashMap::new(),
            done_tx,
            done_rx,
            next_sweep: Instant::now() + SWEEP_EVERY,
        }
    }

    async fn run(mut self, mut stream: AuthSignalStream, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        // Restored entries may name identities revoked meanwhile.
        self.reconcile(None);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                sig = next_signal(&mut stream) => match sig {
                    Some(Ok(s)) => self.start(s.key, Why::Signal(s.point)),
                    Some(Err(e)) => warn(&format!("auth: reading signals: {e}")),
                    None => return,
                },
                Some(done) = self.done_rx.recv() => self.finish(done),
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Reload(m)) => {
                        let old = std::mem::replace(
                            &mut *self.sh.material.write().unwrap_or_else(|p| p.into_inner()),
                            Arc::new(m),
                        );
                        for e in self.sh.view().values_mut() {
                            e.stuck = false;
                        }
                        self.backoff.clear();
                        self.reconcile(Some(&old));
                    }
                    Some(Cmd::Stop) | None => return,
                },
                _ = tick.tick() => self.tick(),
            }
        }
    }

    /// Starts a handshake for `key` unless one is under way, the key backs
    /// off, or it is already authenticated.
    fn start(&mut self, key: AuthKey, why: Why) {
        if self.pending.contains(&key) {
            return;
        }
        if let Some((not_before, _)) = self.backoff.get(&key) {
            if Instant::now() < *not_before {
                return;
            }
        }
        if let Why::Signal(_) = why {
            // A signal sent before the entry went in.
            let live = self
                .sh
                .view()
                .get(&key)
                .is_some_and(|e| e.until > SystemTime::now() + Duration::from_secs(1));
            if live {
                return;
            }
        }
        self.pending.insert(key);
        let sh = self.sh.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let result = match tokio::time::timeout(EXCHANGE_TIMEOUT, authenticate(&sh, key)).await
            {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {EXCHANGE_TIMEOUT:?}")),
            };
            let _ = tx.send(Done {
                key,
                why,
                result,
                took: t.elapsed(),
            });
        });
    }

    fn finish(&mut self, d: Done) {
        self.pending.remove(&d.key);
        let ms = d.took.as_secs_f64() * 1000.0;
        match d.result {
            Ok(a) => {
                self.backoff.remove(&d.key);
                let pair = format!("{} -> {} on node {}", a.local, a.remote, a.node);
                let renew = self.sh.renews(a.local.as_str(), a.remote.as_str(), &a.node);
                let mut stuck = false;
                let line = match d.why {
                    Why::Signal(p) => format!(
                        "agent: auth: ok: {pair}: authenticated until {} (handshake {ms:.1} ms, \
                         asked at {})",
                        utc(a.until),
                        p.name()
                    ),
                    Why::Renew(old) if a.until <= old + Duration::from_secs(1) => {
                        stuck = true;
                        format!(
                            "agent: auth: renewed: {pair}: cannot extend past {} (a certificate's \
                             not-after); it expires then unless a certificate is renewed",
                            utc(a.until)
                        )
                    }
                    Why::Renew(_) => format!(
                        "agent: auth: renewed: {pair}: until {} (handshake {ms:.1} ms)",
                        utc(a.until)
                    ),
                };
                self.sh.view().insert(
                    d.key,
                    Entry {
                        from: SystemTime::now(),
                        until: a.until,
                        peer_serial: Some(a.peer_serial),
                        renew,
                        stuck,
                    },
                );
                let _ = say(&line);
            }
            Err(e) => {
                let delay = self
                    .backoff
                    .get(&d.key)
                    .map_or(BACKOFF_FIRST, |(_, last)| (*last * 2).min(BACKOFF_MAX));
                self.backoff.insert(d.key, (Instant::now() + delay, delay));
                let what = match d.why {
                    Why::Signal(_) => "failed",
                    Why::Renew(_) => "renewal failed",
                };
                let node = self
                    .sh
                    .node_of(d.key.remote_node)
                    .map(|n| n.name.to_string())
                    .unwrap_or_else(|_| format!("number {}", d.key.remote_node));
                let _ = say(&format!(
                    "agent: auth: {what}: {} -> {} on node {node}: {e}; next attempt in {}s or \
                     later",
                    self.sh.name(d.key.local),
                    self.sh.name(d.key.remote),
                    delay.as_secs()
                ));
            }
        }
    }

    /// Renewals due; the periodic sweep of expired entries.
    fn tick(&mut self) {
        let now = SystemTime::now();
        let due: Vec<(AuthKey, SystemTime)> = self
            .sh
            .view()
            .iter()
            .filter(|(_, e)| e.renew && !e.stuck && e.until > now)
            .filter(|(_, e)| {
                renew_at(e.from, e.until, self.sh.renew_before).is_some_and(|t| t <= now)
            })
            .map(|(k, e)| (*k, e.until))
            .collect();
        for (key, until) in due {
            self.start(key, Why::Renew(until));
        }
        if Instant::now() >= self.next_sweep {
            self.next_sweep = Instant::now() + SWEEP_EVERY;
            if let Err(e) = self.sh.dp.auth_sweep_expired() {
                warn(&format!("auth: sweeping expired entries: {e}"));
            }
            self.sh.view().retain(|_, e| e.until > now);
            self.backoff
                .retain(|_, (not_before, _)| *not_before + BACKOFF_MAX > Instant::now());
        }
    }

    /// After a (re)load: registers certificates, removes the entries of
    /// identities revoked, unproven or gone from the config, and tells
    /// their peer nodes.
    fn reconcile(&mut self, old: Option<&Material>) {
        if let Err(e) = register_certificates(&self.sh, old) {
            warn(&format!("auth: {e}"));
        }
        for (node, addr, ids) in revoke_stale(&self.sh, old) {
            let sh = self.sh.clone();
            tokio::spawn(async move {
                let names: Vec<String> = ids.iter().map(|i| sh.name(*i)).collect();
                let r = tokio::time::timeout(EXCHANGE_TIMEOUT, notify(&sh, addr, &ids)).await;
                let line = match r {
                    Ok(Ok(n)) => format!(
                        "agent: auth: revoked: told node {node} to drop {}: {n} entr{} removed \
                         there",
                        names.join(", "),
                        if n == 1 { "y" } else { "ies" }
                    ),
                    Ok(Err(e)) => format!(
                        "agent: auth: revoked: telling node {node} to drop {} failed: {e}; its \
                         entries expire by themselves",
                        names.join(", ")
                    ),
                    Err(_) => format!(
                        "agent: auth: revoked: node {node} did not answer within \
                         {EXCHANGE_TIMEOUT:?}; its entries expire by themselves"
                    ),
                };
                let _ = say(&line);
            });
        }
    }
}

async fn next_signal(
    stream: &mut AuthSignalStream,
) -> Option<meshpath::Result<meshpath::AuthSignal>> {
    use futures_core::Stream;
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx)).await
}

/// Binds every local identity's certificate in the datapath
/// (`meshpath_certs_v2`) and unbinds identities no longer given.
pub(crate) fn register_certificates(sh: &Shared, _old: Option<&Material>) -> anyhow::Result<()> {
    let m = sh.material();
    for (id, c) in &m.certs {
        sh.dp.set_certificate(
            *id,
            &CertInfo {
                serial: c.facts.serial.clone(),
                not_after: c.facts.not_after,
            },
        )?;
    }
    for (id, _) in sh.dp.certificates()? {
        if !m.certs.contains_key(&id) {
            sh.dp.remove_certificate(id)?;
        }
    }
    Ok(())
}

/// Takes the entries already in the auth map as the view (a restart with
/// `--pin`): no handshake until they are due.
pub(crate) fn restore(sh: &Shared) -> anyhow::Result<()> {
    sh.dp.auth_sweep_expired()?;
    let now = SystemTime::now();
    let mut n = 0;
    for (key, until) in sh.dp.auth_entries()? {
        if until <= now {
            continue;
        }
        let renew = match (sh.node_of(key.remote_node), sh.spiffe_of(key.remote)) {
            (Ok(node), Ok(remote)) => sh.renews(&sh.name(key.local), remote.as_str(), &node.name),
            _ => false,
        };
        sh.view().insert(
            key,
            Entry {
                from: now,
                until,
                peer_serial: None,
                renew,
                stuck: false,
            },
        );
        n += 1;
    }
    say(&format!(
        "agent: auth: restored {n} entr{} from the auth map",
        if n == 1 { "y" } else { "ies" }
    ))?;
    Ok(())
}

/// Removes the entries of identities that are revoked, no longer proven
/// by a `--cert` (they were in `old`), or gone from the config; and
/// entries whose peer presented a revoked serial. Returns, per peer node,
/// the identities it must drop.
fn revoke_stale(sh: &Shared, old: Option<&Material>) -> Vec<(NodeName, SocketAddr, Vec<u64>)> {
    let m = sh.material();
    let mut why: BTreeMap<u64, String> = BTreeMap::new();
    let revoked_by = || {
        m.revoked_path
            .as_ref()
            .map_or("--revoked".to_string(), |p| {
                format!("--revoked {}", p.display())
            })
    };
    if let Some(old) = old {
        for (id, c) in &old.certs {
            if !m.certs.contains_key(id) {
                why.insert(*id, format!("{} is no longer proven by a --cert", c.spiffe));
            }
        }
    }
    for (id, c) in &m.certs {
        if let Some(r) = m.revoked.why(&c.facts.serial, Some(&c.spiffe)) {
            why.insert(*id, format!("{}: {r} ({})", c.spiffe, revoked_by()));
        }
    }
    for spiffe in &m.revoked.identities {
        let id = sh
            .dp
            .identity_number(&meshpath::policy::Identity::Workload(spiffe.clone()));
        why.entry(id)
            .or_insert_with(|| format!("{spiffe}: identity is revoked ({})", revoked_by()));
    }
    let configured: Option<BTreeSet<u64>> = sh.dp.policy().map(|p| {
        p.endpoints
            .iter()
            .map(|e| sh.dp.identity_number(&e.identity))
            .collect()
    });
    let entries = match sh.dp.auth_entries() {
        Ok(e) => e,
        Err(e) => {
            warn(&format!("auth: listing entries: {e}"));
            return Vec::new();
        }
    };
    // key -> the identity it is removed for.
    let mut remove: Vec<(AuthKey, u64)> = Vec::new();
    {
        let view = sh.view();
        for (key, _) in &entries {
            let gone = |id: u64| configured.as_ref().is_some_and(|c| !c.contains(&id));
            for id in [key.local, key.remote] {
                if !why.contains_key(&id) && gone(id) {
                    why.insert(id, format!("{} is no longer in --config", sh.name(id)));
                }
            }
            let revoked_serial = view
                .get(key)
                .and_then(|e| e.peer_serial.clone())
                .filter(|s| m.revoked.serials.contains(s));
            if why.contains_key(&key.local) {
                remove.push((*key, key.local));
            } else if let Some(serial) = revoked_serial {
                why.entry(key.remote).or_insert_with(|| {
                    format!(
                        "{}: the peer's certificate serial {} is revoked ({})",
                        sh.name(key.remote),
                        serial_hex(&serial),
                        revoked_by()
                    )
                });
                remove.push((*key, key.remote));
            } else if why.contains_key(&key.remote) {
                remove.push((*key, key.remote));
            }
        }
    }
    let mut removed: BTreeMap<u64, usize> = BTreeMap::new();
    let mut tell: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for (key, id) in remove {
        match sh.dp.auth_delete(key) {
            Ok(_) => {
                *removed.entry(id).or_default() += 1;
                sh.view().remove(&key);
                if key.remote_node != 0 && key.remote_node != sh.node.number() {
                    tell.entry(key.remote_node).or_default().insert(id);
                }
            }
            Err(e) => warn(&format!("auth: removing entry {key:?}: {e}")),
        }
    }
    for (id, n) in &removed {
        let _ = say(&format!(
            "agent: auth: revoked: {}: {n} entr{} removed here",
            why.get(id).map_or("?", String::as_str),
            if *n == 1 { "y" } else { "ies" }
        ));
    }
    let mut out = Vec::new();
    for (node_num, ids) in tell {
        match sh.node_of(node_num) {
            Ok(node) => out.push((node.name, node.addr, ids.into_iter().collect())),
            Err(e) => warn(&format!("auth: cannot tell a peer of a revocation: {e}")),
        }
    }
    out
}

/// A TCP connection to a peer agent, from the `--auth-listen` address when
/// it is a specific one (the peer checks that it comes from our address
/// in its `--peers`).
async fn connect(sh: &Shared, addr: SocketAddr) -> Result<TcpStream, String> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    let ip = sh.listen.ip();
    if !ip.is_unspecified()
        && ip.is_ipv4() == addr.is_ipv4()
        && !is_loopback_mismatch(ip, addr.ip())
    {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("binding to {ip}: {e}"))?;
    }
    let s = sock
        .connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A non-loopback source cannot reach a loopback destination.
fn is_loopback_mismatch(src: IpAddr, dst: IpAddr) -> bool {
    dst.is_loopback() && !src.is_loopback()
}

/// The client side of one `auth` exchange for `key`; installs this node's
/// entry.
async fn authenticate(sh: &Shared, key: AuthKey) -> Result<Authenticated, String> {
    let m = sh.material();
    let local = sh.usable_cert(&m, key.local)?;
    let remote = sh.spiffe_of(key.remote)?;
    let node = sh.node_of(key.remote_node)?;
    let mut tcp = connect(sh, node.addr).await?;
    let hello = Hello {
        meshpath_auth: VERSION,
        op: Op::Auth,
        client: local.spiffe.to_string(),
        server: Some(remote.to_string()),
        node: sh.node.to_string(),
    };
    auth_proto::send(&mut tcp, &hello)
        .await
        .map_err(|e| format!("sending to {}: {e}", node.addr))?;
    let answer: Answer = auth_proto::recv(&mut tcp, true)
        .await
        .map_err(|e| format!("node {}: {e}", node.name))?;
    if !answer.ok {
        return Err(format!(
            "node {} refused: {}",
            node.name,
            answer.error.unwrap_or_default()
        ));
    }
    let expect = Expect {
        role: "server",
        spiffe: Some(remote.clone()),
        revoked: Some(m.revoked.clone()),
    };
    let cfg = auth_tls::client_config(&sh.provider, &m.roots, &local.key, expect)
        .map_err(|e| format!("TLS configuration: {e}"))?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(auth_tls::placeholder_name(), tcp)
        .await
        .map_err(|e| format!("TLS handshake with node {}: {e}", node.name))?;
    let (peer_serial, peer_not_after) = peer_facts(tls.get_ref().1.peer_certificates())?;
    let proposal = entry_until(
        SystemTime::now(),
        sh.ttl,
        [local.chain_not_after, peer_not_after],
    );
    let req = Request {
        until_ms: Some(to_ms(proposal)),
        revoke: None,
    };
    auth_proto::send(&mut tls, &req)
        .await
        .map_err(|e| format!("node {}: {e}", node.name))?;
    let reply: Reply = auth_proto::recv(&mut tls, false).await.map_err(|e| {
        format!(
            "node {} ended the handshake: {e} (its log says why)",
            node.name
        )
    })?;
    if !reply.ok {
        return Err(format!(
            "node {}: {}",
            node.name,
            reply.error.unwrap_or_default()
        ));
    }
    let until = reply.until_ms.map_or(proposal, from_ms).min(proposal);
    let _ = tls.shutdown().await;
    sh.dp
        .auth_insert(key, until)
        .map_err(|e| format!("installing the entry: {e}"))?;
    Ok(Authenticated {
        until,
        local: local.spiffe.clone(),
        remote,
        node: node.name,
        peer_serial,
    })
}

/// The peer's leaf serial and the earliest not-after of the chain it
/// presented.
pub(crate) fn peer_facts(
    certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
) -> Result<(Vec<u8>, SystemTime), String> {
    let certs = certs
        .filter(|c| !c.is_empty())
        .ok_or("the peer presented no certificate")?;
    let mut serial = Vec::new();
    let mut not_after = None::<SystemTime>;
    for (i, c) in certs.iter().enumerate() {
        let f = cert_facts(c).map_err(|e| format!("the peer's certificate: {e}"))?;
        if i == 0 {
            serial = f.serial.clone();
        }
        not_after = Some(not_after.map_or(f.not_after, |t| t.min(f.not_after)));
    }
    Ok((serial, not_after.unwrap_or(SystemTime::UNIX_EPOCH)))
}

/// Tells the agent at `addr` to drop its entries of `ids` with this node.
/// Authenticated with a local certificate (one of `ids` if we hold it,
/// any otherwise): a revoked one still may, removal only closes.
async fn notify(sh: &Shared, addr: SocketAddr, ids: &[u64]) -> Result<u64, String> {
    let m = sh.material();
    let cert = ids
        .iter()
        .find_map(|i| m.certs.get(i))
        .or_else(|| m.certs.values().next())
        .cloned()
        .ok_or("no local certificate to authenticate with")?;
    let mut tcp = connect(sh, addr).await?;
    let hello = Hello {
        meshpath_auth: VERSION,
        op: Op::Revoke,
        client: cert.spiffe.to_string(),
        server: None,
        node: sh.node.to_string(),
    };
    auth_proto::send(&mut tcp, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let answer: Answer = auth_proto::recv(&mut tcp, true).await?;
    if !answer.ok {
        return Err(format!("refused: {}", answer.error.unwrap_or_default()));
    }
    let expect = Expect {
        role: "server",
        spiffe: None,
        revoked: None,
    };
    let cfg = auth_tls::client_config(&sh.provider, &m.roots, &cert.key, expect)
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(auth_tls::placeholder_name(), tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let req = Request {
        until_ms: None,
        revoke: Some(ids.to_vec()),
    };
    auth_proto::send(&mut tls, &req)
        .await
        .map_err(|e| e.to_string())?;
    let reply: Reply = auth_proto::recv(&mut tls, false).await?;
    let _ = tls.shutdown().await;
    if !reply.ok {
        return Err(reply.error.unwrap_or_default());
    }
    Ok(reply.removed.unwrap_or(0))
}
