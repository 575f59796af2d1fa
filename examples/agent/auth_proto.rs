//! The wire protocol between node agents (`--auth-listen`), one exchange
//! per TCP connection, every message one JSON line:
//!
//! ```text
//! client                                   server
//!   hello (plain) ------------------------->   which certificate to present,
//!                                              which SPIFFE ID to demand
//!   <------------------------- answer (plain)  {"ok":true} or why not
//!   ======== TLS 1.3, mutual, both sides verify the other's SPIFFE ID ========
//!   request (in TLS) ---------------------->   {"until_ms":...} or {"revoke":[...]}
//!   <------------------------ reply (in TLS)   {"ok":true,"until_ms":...} / {"removed":N}
//! ```
//!
//! The plain part only chooses certificates: whatever it claims is proven
//! by the handshake or the exchange fails. `hello.node` (the client's node
//! name) is checked against `--peers`: the connection must come from that
//! node's address.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// The protocol version in every hello. 2: identity numbers (`revoke`)
/// are 64-bit, derived with the cluster's identity key.
pub(crate) const VERSION: u32 = 2;

/// The longest line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Op {
    /// Prove `client` (on node `node`) and `server` to each other and
    /// install the pair's auth entries on both nodes.
    Auth,
    /// Remove the server node's entries of the listed identities with the
    /// client's node (revocation, or an identity gone from the config).
    Revoke,
}

/// The client's first line, before TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Hello {
    pub(crate) meshpath_auth: u32,
    pub(crate) op: Op,
    /// The SPIFFE ID of the certificate the client presents.
    pub(crate) client: String,
    /// `auth`: the SPIFFE ID the server must present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) server: Option<String>,
    /// The client's node name.
    pub(crate) node: String,
}

/// The server's plain answer to a hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub(crate) ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// The client's request, inside TLS.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Request {
    /// `auth`: the expiry the client proposes (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) until_ms: Option<u64>,
    /// `revoke`: identity numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoke: Option<Vec<u64>>,
}

/// The server's reply, inside TLS.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    /// `auth`: the expiry both install (the earlier of the two
    /// proposals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) until_ms: Option<u64>,
    /// `revoke`: entries removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) removed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// Writes `msg` as one JSON line and flushes.
pub(crate) async fn send<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// Reads one JSON line. `exact`: nothing may follow it yet (the plain
/// part: the next bytes belong to TLS, and a buffered reader must not
/// have taken any).
pub(crate) async fn recv<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
    exact: bool,
) -> Result<T, String> {
    let mut reader = BufReader::with_capacity(MAX_LINE, r);
    let mut line = Vec::new();
    let n = (&mut reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading: {e}"))?;
    if n == 0 {
        return Err("the peer closed the connection".into());
    }
    if line.last() != Some(&b'\n') {
        return Err(format!("a line longer than {MAX_LINE} bytes, or cut short"));
    }
    if exact && !reader.buffer().is_empty() {
        return Err("the peer sent more than one line before its answer".into());
    }
    serde_json::from_slice(&line).map_err(|e| format!("not a protocol message: {e}"))
}
