//! The short-circuit's socket maps, seen from user space.

use std::net::SocketAddr;

use crate::abi::{SockEntry, SockFlags, SockKey};
use crate::datapath::Datapath;
use crate::error::Result;

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
        let index = self.maps().typed::<SockKey, SockEntry>("meshpath_sock_index")?;
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
