//! The auth files the agent re-reads on SIGHUP: `--peers` (which node's
//! agent answers at which address) and `--revoked` (certificates and
//! identities no longer trusted).
//!
//! ```json
//! {"peers": {"node-a": "198.18.0.1:7443", "node-b": "198.18.0.2:7443"}}
//! ```
//!
//! `peers` maps node names (as endpoints' `"node"` in `--config` and
//! `--node` name them: 1-63 lowercase letters, digits, `.`, `-`) to the
//! `ADDR:PORT` their agent's `--auth-listen` is reachable at. The same file
//! can serve every node: this node's own entry is allowed.
//!
//! ```json
//! {"serials": ["01:a3:ff", "4f2e9c"], "identities": ["spiffe://mesh.local/ns/shop/sa/frontend"]}
//! ```
//!
//! `serials` are certificate serial numbers in hex (colons optional,
//! leading zeros ignored), `identities` SPIFFE IDs; both may be left out.
//!
//! Pure: `tests/agent_auth.rs` includes this file with `#[path]`. Any
//! other key is an error naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use meshpath::policy::{NodeName, SpiffeId};
use serde::Deserialize;

/// `--peers`: node name -> auth address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Peers {
    nodes: BTreeMap<NodeName, SocketAddr>,
}

impl Peers {
    /// The node whose number (`NodeName::number`) is `n`, and its address.
    pub(crate) fn by_number(&self, n: u32) -> Option<(&NodeName, SocketAddr)> {
        self.nodes
            .iter()
            .find(|(name, _)| name.number() == n)
            .map(|(name, a)| (name, *a))
    }

    pub(crate) fn get(&self, name: &NodeName) -> Option<SocketAddr> {
        self.nodes.get(name).copied()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersFile {
    peers: BTreeMap<String, String>,
}

/// Parses the text of a `--peers` file. Errors name the key
/// (`peers."node-b"`).
pub(crate) fn parse_peers(text: &str) -> Result<Peers, String> {
    let file: PeersFile = parse_json(text, "{\"peers\": {\"NODE\": \"ADDR:PORT\", ...}}")?;
    let mut nodes = BTreeMap::new();
    let mut numbers: BTreeMap<u32, NodeName> = BTreeMap::new();
    for (name, addr) in &file.peers {
        let at = format!("invalid peers.{name:?}");
        let node: NodeName = name
            .parse()
            .map_err(|e: meshpath::Error| format!("{at}: {}", reason(&e)))?;
        let addr: SocketAddr = addr.parse().map_err(|_| {
            format!("{at}: {addr:?} is not ADDR:PORT (e.g. 198.18.0.2:7443 or [fd00::2]:7443)")
        })?;
        if addr.port() == 0 {
            return Err(format!("{at}: port 0 is not an address to connect to"));
        }
        if let Some(other) = numbers.insert(node.number(), node.clone()) {
            return Err(format!(
                "{at}: node names {other:?} and {name:?} have the same number; rename one"
            ));
        }
        nodes.insert(node, addr);
    }
    Ok(Peers { nodes })
}

/// `--revoked`: serials and SPIFFE IDs no certificate may have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Revoked {
    pub(crate) serials: BTreeSet<Vec<u8>>,
    pub(crate) identities: BTreeSet<SpiffeId>,
}

impl Revoked {
    /// Why a certificate with this serial and SPIFFE ID is revoked, if it
    /// is.
    pub(crate) fn why(&self, serial: &[u8], spiffe: Option<&SpiffeId>) -> Option<String> {
        if self.serials.contains(serial) {
            return Some(format!(
                "certificate serial {} is revoked",
                crate::auth_certs::serial_hex(serial)
            ));
        }
        match spiffe {
            Some(id) if self.identities.contains(id) => Some(format!("identity {id} is revoked")),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedFile {
    #[serde(default)]
    serials: Vec<String>,
    #[serde(default)]
    identities: Vec<String>,
}

/// Parses the text of a `--revoked` file. Errors name the entry
/// (`serials[2]`).
pub(crate) fn parse_revoked(text: &str) -> Result<Revoked, String> {
    let file: RevokedFile = parse_json(
        text,
        "{\"serials\": [\"HEX\", ...], \"identities\": [\"spiffe://...\", ...]}",
    )?;
    let mut out = Revoked::default();
    for (i, s) in file.serials.iter().enumerate() {
        out.serials
            .insert(parse_serial(s).map_err(|e| format!("invalid serials[{i}]: {s:?} {e}"))?);
    }
    for (i, s) in file.identities.iter().enumerate() {
        let id: SpiffeId = s
            .parse()
            .map_err(|e: meshpath::Error| format!("invalid identities[{i}]: {}", reason(&e)))?;
        out.identities.insert(id);
    }
    Ok(out)
}

/// A serial in hex (`01:A3:ff`, `01a3ff`, `0x1a3ff`), as normalized
/// bytes (no leading zero bytes).
pub(crate) fn parse_serial(s: &str) -> Result<Vec<u8>, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let hex: String = t.chars().filter(|&c| c != ':').collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("is not a serial number in hex (e.g. \"01:a3:ff\")".into());
    }
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    let bytes: Vec<u8> = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).unwrap_or(0))
        .collect();
    let bytes = crate::auth_certs::normalize_serial(&bytes);
    if bytes.len() > 20 {
        return Err("is longer than 20 bytes, the most a serial can have".into());
    }
    Ok(bytes)
}

/// A library error's reason without its field prefix.
fn reason(e: &meshpath::Error) -> String {
    match e {
        meshpath::Error::Invalid { field, reason } => format!("{field} {reason}"),
        other => other.to_string(),
    }
}

/// JSON with errors that name the field and never quote serde's
/// backticks.
fn parse_json<T: serde::de::DeserializeOwned>(text: &str, shape: &str) -> Result<T, String> {
    if !text.trim_start().starts_with('{') {
        return Err(format!("must be a JSON object {shape}"));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string().replace('`', "\"");
        if inner.is_syntax() || inner.is_eof() || path == "." {
            format!("not valid here: {msg} (expected {shape})")
        } else {
            format!("invalid {path}: {msg}")
        }
    })?;
    de.end()
        .map_err(|e| format!("not valid JSON after the object: {e}"))?;
    Ok(v)
}
