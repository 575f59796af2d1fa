//! The server side of `--auth-listen`: other nodes' agents (and this
//! node's own, for pairs on one node) prove identities here, or tell us of
//! revocations. See `auth_proto.rs` for the exchange.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use meshpath::policy::{Identity, NodeName, SpiffeId};
use meshpath::AuthKey;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::auth::{Entry, Shared};
use crate::auth_certs::{entry_until, utc, LocalCert};
use crate::auth_manager::{from_ms, peer_facts, to_ms, EXCHANGE_TIMEOUT};
use crate::auth_proto::{self, Answer, Hello, Op, Reply, Request, VERSION};
use crate::auth_tls::{self, Expect};
use crate::output::{say, warn};

/// Accepts connections until the runtime stops; one task each.
pub(crate) async fn serve(sh: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, from)) => {
                let sh = sh.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let mut who = format!("{from}");
                    let r =
                        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(&sh, tcp, from, &mut who))
                            .await
                            .unwrap_or_else(|_| {
                                Err(format!("no exchange within {EXCHANGE_TIMEOUT:?}"))
                            });
                    if let Err(e) = r {
                        let _ = say(&format!("agent: auth: failed: handshake from {who}: {e}"));
                    }
                });
            }
            Err(e) => {
                warn(&format!("auth: accepting on --auth-listen: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a valid hello asks for.
struct Plan {
    op: Op,
    client: SpiffeId,
    /// The client's node as our keys name it (0: this node).
    client_node: u32,
    node_name: NodeName,
    /// The certificate we present.
    cert: Arc<LocalCert>,
}

/// Checks a hello: the node is known and the connection comes from its
/// address; the server identity is ours and usable.
fn plan(sh: &Shared, hello: &Hello, from: SocketAddr) -> Result<Plan, String> {
    if hello.meshpath_auth != VERSION {
        return Err(format!(
            "protocol version {} (this agent speaks {VERSION})",
            hello.meshpath_auth
        ));
    }
    let node: NodeName = hello
        .node
        .parse()
        .map_err(|_| format!("{:?} is not a node name", hello.node))?;
    let client: SpiffeId = hello
        .client
        .parse()
        .map_err(|_| format!("{:?} is not a SPIFFE ID", hello.client))?;
    let m = sh.material();
    let client_node = if node == sh.node {
        let ours = from.ip().is_loopback()
            || from.ip() == sh.listen.ip()
            || from.ip() == sh.self_addr().ip();
        if !ours {
            return Err(format!(
                "claims to be this node ({node}) but comes from {}",
                from.ip()
            ));
        }
        0
    } else {
        let addr = m
            .peers
            .get(&node)
            .ok_or_else(|| format!("node {node} is not in --peers"))?;
        if addr.ip() != from.ip() {
            return Err(format!(
                "claims to be node {node}, which --peers puts at {}, but comes from {}",
                addr.ip(),
                from.ip()
            ));
        }
        node.number()
    };
    let cert = match hello.op {
        Op::Auth => {
            let want: SpiffeId = hello
                .server
                .as_deref()
                .ok_or("an auth hello without \"server\"")?
                .parse()
                .map_err(|_| "\"server\" is not a SPIFFE ID".to_string())?;
            let id = sh.dp.identity_number(&Identity::Workload(want.clone()));
            if !m.certs.contains_key(&id) {
                return Err(format!("node {} has no certificate for {want}", sh.node));
            }
            sh.usable_cert(&m, id)?
        }
        // Any certificate of ours: a revocation notice only needs a
        // channel whose client is proven.
        Op::Revoke => m
            .certs
            .values()
            .next()
            .cloned()
            .ok_or("this node has no certificate")?,
    };
    Ok(Plan {
        op: hello.op,
        client,
        client_node,
        node_name: node,
        cert,
    })
}

async fn exchange(
    sh: &Shared,
    mut tcp: TcpStream,
    from: SocketAddr,
    who: &mut String,
) -> Result<(), String> {
    let hello: Hello = auth_proto::recv(&mut tcp, true).await?;
    *who = format!(
        "{from} (node {}, {}{})",
        hello.node,
        hello.client,
        hello
            .server
            .as_deref()
            .map(|s| format!(" -> {s}"))
            .unwrap_or_else(|| " revocation notice".into())
    );
    let plan = match plan(sh, &hello, from) {
        Ok(p) => p,
        Err(why) => {
            let _ = auth_proto::send(
                &mut tcp,
                &Answer {
                    ok: false,
                    error: Some(why.clone()),
                },
            )
            .await;
            return Err(why);
        }
    };
    auth_proto::send(
        &mut tcp,
        &Answer {
            ok: true,
            error: None,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let m = sh.material();
    let expect = Expect {
        role: "client",
        spiffe: Some(plan.client.clone()),
        // A revocation notice may come with a revoked certificate.
        revoked: (plan.op == Op::Auth).then(|| m.revoked.clone()),
    };
    let cfg = auth_tls::server_config(&sh.provider, &m.roots, &plan.cert.key, expect)
        .map_err(|e| format!("TLS configuration: {e}"))?;
    let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        .accept(tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let req: Request = auth_proto::recv(&mut tls, false).await?;
    let reply = match plan.op {
        Op::Auth => {
            let (peer_serial, peer_not_after) = peer_facts(tls.get_ref().1.peer_certificates())?;
            let own = entry_until(
                SystemTime::now(),
                sh.ttl,
                [plan.cert.chain_not_after, peer_not_after],
            );
            let until = req.until_ms.map_or(own, from_ms).min(own);
            let key = AuthKey {
                local: plan.cert.identity,
                remote: sh
                    .dp
                    .identity_number(&Identity::Workload(plan.client.clone())),
                remote_node: plan.client_node,
            };
            if let Err(e) = sh.dp.auth_insert(key, until) {
                let why = format!("installing the entry: {e}");
                let _ = auth_proto::send(
                    &mut tls,
                    &Reply {
                        ok: false,
                        error: Some(why.clone()),
                        ..Reply::default()
                    },
                )
                .await;
                return Err(why);
            }
            let renew = sh.renews(
                plan.cert.spiffe.as_str(),
                plan.client.as_str(),
                &plan.node_name,
            );
            sh.view().insert(
                key,
                Entry {
                    from: SystemTime::now(),
                    until,
                    peer_serial: Some(peer_serial),
                    renew,
                    stuck: false,
                },
            );
            let _ = say(&format!(
                "agent: auth: ok: {} <- {} on node {}: authenticated until {} (asked by node {})",
                plan.cert.spiffe,
                plan.client,
                plan.node_name,
                utc(until),
                plan.node_name
            ));
            Reply {
                ok: true,
                until_ms: Some(to_ms(until)),
                ..Reply::default()
            }
        }
        Op::Revoke => {
            let ids = req.revoke.unwrap_or_default();
            let n = drop_entries(sh, plan.client_node, &ids);
            let names: Vec<String> = ids.iter().map(|i| sh.name(*i)).collect();
            let _ = say(&format!(
                "agent: auth: revoked: node {} revoked {}: {n} entr{} removed here",
                plan.node_name,
                names.join(", "),
                if n == 1 { "y" } else { "ies" }
            ));
            Reply {
                ok: true,
                removed: Some(n),
                ..Reply::default()
            }
        }
    };
    auth_proto::send(&mut tls, &reply)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tls.shutdown().await;
    Ok(())
}

/// Removes the entries with node `node` that involve one of `ids`.
fn drop_entries(sh: &Shared, node: u32, ids: &[u64]) -> u64 {
    let entries = match sh.dp.auth_entries() {
        Ok(e) => e,
        Err(e) => {
            warn(&format!("auth: listing entries: {e}"));
            return 0;
        }
    };
    let mut n = 0;
    for (key, _) in entries {
        if key.remote_node == node && (ids.contains(&key.local) || ids.contains(&key.remote)) {
            match sh.dp.auth_delete(key) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => warn(&format!("auth: removing entry {key:?}: {e}")),
            }
            sh.view().remove(&key);
        }
    }
    n
}
