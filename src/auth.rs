//! Authentication state for `auth` rules: the auth map (which identity
//! pairs have proven themselves with mutual TLS, until when), the signals
//! the datapath sends when an `auth` flow finds no live entry, and the
//! certificates that prove local identities.
//!
//! The datapath never does crypto: it asks (a signal), the node agent
//! proves (a mutual-TLS handshake with the remote node's agent), and the
//! datapath remembers until an expiry (CLOCK_MONOTONIC, converted here from
//! wall-clock times). Fail closed: no entry, or an expired one, drops.

use std::os::fd::{AsFd, RawFd};
use std::time::{Duration, SystemTime};

use crate::abi::{AuthKey as RawKey, AuthSignal as RawSignal, AuthValue, CertInfo as RawCert};
use crate::datapath::Datapath;
use crate::error::{Error, Result};
use crate::ring::Ring;
use crate::stats::Point;

/// An authenticated pair as the datapath keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthKey {
    /// The identity number of the workload on this node.
    pub local: u64,
    /// The identity number of the peer.
    pub remote: u64,
    /// The peer's node number (`NodeName::number`), 0 for this node.
    pub remote_node: u32,
}

impl AuthKey {
    fn raw(&self) -> RawKey {
        RawKey {
            local_id: self.local,
            remote_id: self.remote,
            remote_node: self.remote_node,
            pad: 0,
        }
    }

    fn from_raw(k: &RawKey) -> AuthKey {
        AuthKey {
            local: k.local_id,
            remote: k.remote_id,
            remote_node: k.remote_node,
        }
    }
}

/// An `auth` flow found no live entry for `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthSignal {
    /// The pair to authenticate.
    pub key: AuthKey,
    /// Where the flow was held.
    pub point: Point,
    /// When.
    pub time: SystemTime,
}

/// The certificate that proves a local identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, big-endian bytes as in the certificate (at most 20).
    pub serial: Vec<u8>,
    /// End of validity.
    pub not_after: SystemTime,
}

fn clocks() -> (i128, i128) {
    let ns = |c| {
        nix::time::clock_gettime(c)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .unwrap_or(0)
    };
    (
        ns(nix::time::ClockId::CLOCK_REALTIME),
        ns(nix::time::ClockId::CLOCK_MONOTONIC),
    )
}

/// A wall-clock time as the datapath's CLOCK_MONOTONIC nanoseconds.
fn to_monotonic(t: SystemTime) -> Result<u64> {
    let (real, mono) = clocks();
    let wall = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(_) => 0,
    };
    let m = mono + (wall - real);
    if m <= mono {
        return Err(Error::invalid("auth expiry", "is not in the future"));
    }
    Ok(m.min(i128::from(u64::MAX)) as u64)
}

fn to_wall(mono_ns: u64) -> SystemTime {
    let (real, mono) = clocks();
    let wall = real + (i128::from(mono_ns) - mono);
    SystemTime::UNIX_EPOCH + Duration::from_nanos(wall.max(0) as u64)
}

impl Datapath {
    /// Records that `key` is authenticated until `until` (the earliest
    /// certificate expiry, capped by the agent's TTL). Replaces an
    /// existing entry.
    pub fn auth_insert(&self, key: AuthKey, until: SystemTime) -> Result<()> {
        let v = AuthValue {
            expiry_ns: to_monotonic(until)?,
        };
        self.maps()
            .typed::<RawKey, AuthValue>("meshpath_auth_v2")?
            .update(&key.raw(), &v, || format!("auth entry {key:?}"))
    }

    /// Removes `key`; flows that relied on it stop (their connections are
    /// reset, their packets dropped until it is authenticated again).
    /// Returns whether it was there.
    pub fn auth_delete(&self, key: AuthKey) -> Result<bool> {
        let gone = self
            .maps()
            .typed::<RawKey, AuthValue>("meshpath_auth_v2")?
            .delete(&key.raw())?;
        if gone {
            self.auth_changed()?;
        }
        Ok(gone)
    }

    /// Every entry with its expiry (entries already expired included).
    pub fn auth_entries(&self) -> Result<Vec<(AuthKey, SystemTime)>> {
        let m = self.maps().typed::<RawKey, AuthValue>("meshpath_auth_v2")?;
        let mut out = Vec::new();
        for k in m.keys()? {
            if let Some(v) = m.lookup(&k)? {
                out.push((AuthKey::from_raw(&k), to_wall(v.expiry_ns)));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Revokes an identity: removes every entry it is in, locally or
    /// remotely, and cuts the flows that relied on them. How many.
    pub fn auth_revoke_identity(&self, identity: u64) -> Result<usize> {
        self.auth_remove_where(|k| k.local == identity || k.remote == identity)
    }

    /// Removes entries that have expired (the datapath already ignores
    /// them). How many.
    pub fn auth_sweep_expired(&self) -> Result<usize> {
        let m = self.maps().typed::<RawKey, AuthValue>("meshpath_auth_v2")?;
        let (_, now) = clocks();
        let mut n = 0;
        for k in m.keys()? {
            if let Some(v) = m.lookup(&k)? {
                if i128::from(v.expiry_ns) <= now && m.delete(&k)? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn auth_remove_where(&self, pred: impl Fn(&AuthKey) -> bool) -> Result<usize> {
        let m = self.maps().typed::<RawKey, AuthValue>("meshpath_auth_v2")?;
        let mut n = 0;
        for k in m.keys()? {
            if pred(&AuthKey::from_raw(&k)) && m.delete(&k)? {
                n += 1;
            }
        }
        if n > 0 {
            self.auth_changed()?;
        }
        Ok(n)
    }

    /// After a removal: short-circuited flows judge again (a new policy
    /// generation) and established TCP flows now denied are reset.
    fn auth_changed(&self) -> Result<()> {
        self.bump_policy_generation()?;
        self.reset_denied_flows()?;
        Ok(())
    }

    /// Starts reading auth-required signals. One reader at a time.
    pub fn auth_signals(&self) -> Result<AuthSignalReader> {
        use std::sync::atomic::Ordering;
        if self.inner.auth_reader.swap(true, Ordering::AcqRel) {
            return Err(Error::invalid(
                "auth signal reader",
                "another reader is open on this datapath (the ring buffer has one consumer)",
            ));
        }
        let ring = self
            .maps()
            .get("meshpath_auth_signals_v2")
            .ok_or_else(|| Error::invalid("datapath", "auth signal map missing"))
            .and_then(|m| Ring::new("meshpath_auth_signals_v2", m.fd.as_fd()));
        match ring {
            Ok(ring) => Ok(AuthSignalReader {
                ring,
                dp: self.clone(),
            }),
            Err(e) => {
                self.inner.auth_reader.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Binds a local identity to the certificate that proves it.
    pub fn set_certificate(&self, identity: u64, cert: &CertInfo) -> Result<()> {
        if cert.serial.is_empty() || cert.serial.len() > 20 {
            return Err(Error::invalid(
                "certificate serial",
                format!("{} bytes (1 to 20 allowed)", cert.serial.len()),
            ));
        }
        let mut raw = RawCert {
            not_after: cert
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            serial_len: cert.serial.len() as u32,
            serial: [0; 20],
        };
        raw.serial[..cert.serial.len()].copy_from_slice(&cert.serial);
        self.maps()
            .typed::<u64, RawCert>("meshpath_certs_v2")?
            .update(&identity, &raw, || {
                format!("certificate of identity {identity}")
            })
    }

    /// Unbinds a local identity's certificate. Whether it was bound.
    pub fn remove_certificate(&self, identity: u64) -> Result<bool> {
        self.maps()
            .typed::<u64, RawCert>("meshpath_certs_v2")?
            .delete(&identity)
    }

    /// Every local identity's certificate.
    pub fn certificates(&self) -> Result<Vec<(u64, CertInfo)>> {
        let m = self.maps().typed::<u64, RawCert>("meshpath_certs_v2")?;
        let mut out = Vec::new();
        for id in m.keys()? {
            if let Some(c) = m.lookup(&id)? {
                let len = (c.serial_len as usize).min(20);
                out.push((
                    id,
                    CertInfo {
                        serial: c.serial[..len].to_vec(),
                        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(c.not_after),
                    },
                ));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }
}

/// Reads auth-required signals (blocking). See [`Datapath::auth_signals`].
pub struct AuthSignalReader {
    ring: Ring<RawSignal>,
    dp: Datapath,
}

impl std::fmt::Debug for AuthSignalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSignalReader")
            .field("queued", &self.ring.queued())
            .finish()
    }
}

fn signal_of(s: &RawSignal) -> AuthSignal {
    let point = crate::stats::Point::ALL
        .iter()
        .copied()
        .find(|p| p.index() == s.point)
        .unwrap_or(Point::Connect);
    AuthSignal {
        key: AuthKey::from_raw(&s.key),
        point,
        time: to_wall(s.time_ns),
    }
}

impl AuthSignalReader {
    /// The next signal, waiting up to `timeout`.
    pub fn poll(&mut self, timeout: Duration) -> Result<Option<AuthSignal>> {
        Ok(self.ring.poll(timeout)?.map(|s| signal_of(&s)))
    }

    /// The next signal already in the ring, without waiting.
    pub fn try_next(&mut self) -> Result<Option<AuthSignal>> {
        Ok(self.ring.try_next()?.map(|s| signal_of(&s)))
    }

    /// The fd that becomes readable when signals arrive (epoll).
    pub fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl Drop for AuthSignalReader {
    fn drop(&mut self) {
        self.dp
            .inner
            .auth_reader
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Auth-required signals as a tokio `Stream` (feature `tokio`).
#[cfg(feature = "tokio")]
pub struct AuthSignalStream {
    // Deregistered (dropped) before the reader closes the fd.
    fd: tokio::io::unix::AsyncFd<RawFd>,
    reader: AuthSignalReader,
}

#[cfg(feature = "tokio")]
impl AuthSignalStream {
    /// Wraps a reader; must be called inside a tokio runtime.
    pub fn new(reader: AuthSignalReader) -> Result<AuthSignalStream> {
        let fd = crate::ring::register(&reader.ring)?;
        Ok(AuthSignalStream { fd, reader })
    }
}

#[cfg(feature = "tokio")]
impl futures_core::Stream for AuthSignalStream {
    type Item = Result<AuthSignal>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<AuthSignal>>> {
        let this = self.get_mut();
        crate::ring::poll_ring(&mut this.reader.ring, &this.fd, cx)
            .map(|o| o.map(|r| r.map(|s| signal_of(&s))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_and_monotonic_times_round_trip() {
        let t = SystemTime::now() + Duration::from_secs(3600);
        let back = to_wall(to_monotonic(t).unwrap());
        let d = back.duration_since(t).unwrap_or_else(|e| e.duration());
        assert!(d < Duration::from_millis(50), "{d:?}");
        assert!(to_monotonic(SystemTime::now() - Duration::from_secs(1)).is_err());
    }
}
