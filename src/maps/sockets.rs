//! The short-circuit's socket maps, seen from user space.

use std::net::SocketAddr;

use crate::abi::{SockEntry, SockFlags, SockKey};
use crate::datapath::Datapath;
use crate::error::Result;

fn key_bytes(k: &SockKey) -> Vec<u8> {
    // SAFETY: SockKey is Plain (abi.rs): any byte view of it is valid.
    unsafe { plain::as_bytes(k) }.to_vec()
}

/// One socket in the short-circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SocketEntry {
    /// Its local address.
    pub local: SocketAddr,
    /// Its peer's address.
    pub remote: SocketAddr,
    /// Network namespace cookie (loopback sockets only, else 0).
    pub netns: u64,
    /// Socket cookie.
    pub cookie: u64,
    /// Whether it asked its peer to deliver through TCP.
    pub no_redirect: bool,
}

impl Datapath {
    /// Every socket in the short-circuit index (a snapshot).
    pub fn sockets(&self) -> Result<Vec<SocketEntry>> {
        let index = self
            .maps()
            .typed::<SockKey, SockEntry>("meshpath_sock_index")?;
        let mut out = Vec::new();
        for key in index.keys()? {
            if let Some(e) = index.lookup(&key)? {
                out.push(SocketEntry {
                    local: key.local(),
                    remote: key.remote(),
                    netns: key.netns,
                    cookie: e.cookie,
                    no_redirect: e.flags & SockFlags::MP_SOCK_F_NO_REDIRECT.0 != 0,
                });
            }
        }
        Ok(out)
    }

    /// Removes index entries whose socket has left the short-circuit
    /// without telling sockops: sockets of a cgroup that was detached
    /// before they closed get no TCP_CLOSE callback. Returns how many
    /// entries were removed. Cheap (two map walks); an agent runs it
    /// periodically and after detaching.
    ///
    /// An entry is stale when its socket is not in the SOCKHASH and it is
    /// either not an evicted socket's, or its peer's entry is gone too
    /// (an evicted socket's entry only serves its peer's own decision to
    /// leave). Removing an entry never changes a live connection's bytes:
    /// a peer that finds no entry sends through TCP.
    pub fn sweep_stale(&self) -> Result<usize> {
        let index = self
            .maps()
            .typed::<SockKey, SockEntry>("meshpath_sock_index")?;
        let sockets = self.maps().typed::<SockKey, u64>("meshpath_sockets")?;
        let live: std::collections::HashSet<Vec<u8>> =
            sockets.keys()?.iter().map(key_bytes).collect();
        let keys = index.keys()?;
        let present: std::collections::HashSet<Vec<u8>> = keys.iter().map(key_bytes).collect();
        let mut removed = 0;
        for key in keys {
            if live.contains(&key_bytes(&key)) {
                continue;
            }
            let Some(e) = index.lookup(&key)? else {
                continue;
            };
            let evicted = e.flags & SockFlags::MP_SOCK_F_EVICTED.0 != 0;
            if evicted && present.contains(&key_bytes(&key.peer())) {
                continue;
            }
            if index.delete(&key)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of sockets in the SOCKHASH itself (what the kernel redirects
    /// into). Closed sockets leave it at once.
    pub fn sockhash_len(&self) -> Result<usize> {
        Ok(self
            .maps()
            .typed::<SockKey, u64>("meshpath_sockets")?
            .keys()?
            .len())
    }
}
