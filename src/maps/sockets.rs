//! The short-circuit's socket maps, seen from user space.

use std::net::SocketAddr;

use std::os::fd::{AsFd, AsRawFd};

use crate::abi::{DirMode, SockEntry, SockFlags, SockKey, SockReason, SockState};
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

/// How a socket's sends travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Nothing sent yet since enrollment.
    Undecided,
    /// Straight into the peer socket.
    Redirect,
    /// Through the TCP stack, for the rest of the connection.
    Tcp,
}

/// Why a socket's sends take TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TcpReason {
    /// The peer was not enrolled when data was sent.
    NoPeer,
    /// The peer asked for TCP (it set SO_RCVLOWAT).
    PeerOptOut,
    /// The datapath was draining.
    Draining,
    /// Bytes went through TCP before enrollment (TCP Fast Open).
    SentBefore,
    /// The peer busy-polls.
    PeerBusy,
    /// The peer's sends went TCP, or the connection left the short-circuit.
    PeerTcp,
    /// The connection was taken over after it was established
    /// (`Datapath::enroll_existing`) and redirecting never became safe:
    /// the peer kept unread TCP bytes of ours, or a read from before the
    /// takeover may still be inside the plain TCP code.
    Adopted,
    /// Something else (a newer datapath's reason).
    Other(u8),
}

/// What the datapath knows about one socket of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SocketState {
    /// Socket cookie.
    pub cookie: u64,
    /// Enrolled since its connection was established (until it closes).
    pub enrolled: bool,
    /// It left the short-circuit early (both directions on TCP).
    pub evicted: bool,
    /// How its sends travel.
    pub direction: Direction,
    /// Why its sends take TCP, when they do.
    pub tcp_reason: Option<TcpReason>,
    /// Messages and bytes it sent straight into its peer.
    pub msgs_redirected: u64,
    /// Bytes it sent straight into its peer.
    pub bytes_redirected: u64,
    /// Messages it sent through TCP while enrolled.
    pub msgs_tcp: u64,
    /// Bytes it sent through TCP while enrolled.
    pub bytes_tcp: u64,
}

impl SocketState {
    /// Whether its sends currently go straight into the peer.
    pub fn is_short_circuited(&self) -> bool {
        self.enrolled && !self.evicted && self.direction != Direction::Tcp
    }

    fn from_raw(s: &SockState) -> SocketState {
        let direction = match u32::from(s.mode) {
            m if m == DirMode::MP_DIR_REDIRECT.0 => Direction::Redirect,
            m if m == DirMode::MP_DIR_TCP.0 => Direction::Tcp,
            _ => Direction::Undecided,
        };
        let r = u32::from(s.reason);
        let tcp_reason = (direction == Direction::Tcp).then_some(match r {
            x if x == SockReason::MP_REASON_NO_PEER.0 => TcpReason::NoPeer,
            x if x == SockReason::MP_REASON_PEER_OPTOUT.0 => TcpReason::PeerOptOut,
            x if x == SockReason::MP_REASON_DRAINING.0 => TcpReason::Draining,
            x if x == SockReason::MP_REASON_SENT_BEFORE.0 => TcpReason::SentBefore,
            x if x == SockReason::MP_REASON_PEER_BUSY.0 => TcpReason::PeerBusy,
            x if x == SockReason::MP_REASON_PEER_TCP.0 => TcpReason::PeerTcp,
            x if x == SockReason::MP_REASON_ADOPTED.0 => TcpReason::Adopted,
            x => TcpReason::Other(x as u8),
        });
        SocketState {
            cookie: s.cookie,
            enrolled: s.enrolled != 0,
            evicted: s.evicted != 0,
            direction,
            tcp_reason,
            msgs_redirected: s.msgs_redir,
            bytes_redirected: s.bytes_redir,
            msgs_tcp: s.msgs_tcp,
            bytes_tcp: s.bytes_tcp,
        }
    }
}

impl Datapath {
    /// The datapath's state for a socket of this process (`None` if it was
    /// never enrolled).
    pub fn socket_state(&self, socket: &impl AsFd) -> Result<Option<SocketState>> {
        let state = self.maps().typed::<i32, SockState>("meshpath_sock_state")?;
        let fd = socket.as_fd().as_raw_fd();
        Ok(state.lookup(&fd)?.map(|s| SocketState::from_raw(&s)))
    }

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
