//! Destroying a TCP socket from user space through sock_diag
//! (`SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY): how established flows that
//! policy now denies are reset on kernels without the `bpf_sock_destroy`
//! kfunc (before Linux 6.5), which the socket iterators use where it
//! exists.
//!
//! Hand-written: the netlink crates of the ecosystem build sock_diag dump
//! requests but not `SOCK_DESTROY`, and the request is one fixed-size
//! message. The kernel looks the socket up by its 4-tuple in the calling
//! thread's network namespace and checks the socket cookie, so a socket
//! closed and replaced under the same addresses is never hit.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::abi::{EnrollRecord, SockKey};
use crate::error::{Error, Result};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;

/// `struct nlmsghdr` followed by `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DestroyRequest {
    // nlmsghdr
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // inet_diag_req_v2
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    // inet_diag_sockid
    sport: u16, // network byte order
    dport: u16, // network byte order
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// The request for the socket keyed `key` (its own view: local is the
/// source) whose cookie is `cookie`.
fn request(key: &SockKey, cookie: u64) -> DestroyRequest {
    DestroyRequest {
        len: std::mem::size_of::<DestroyRequest>() as u32,
        ty: SOCK_DESTROY,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        seq: 1,
        // AF_INET6 with v4-mapped addresses finds IPv4 sockets too
        // (inet_diag_find_one_icsk looks those up in the IPv4 table).
        family: libc::AF_INET6 as u8,
        protocol: libc::IPPROTO_TCP as u8,
        states: u32::MAX,
        sport: (key.local_port as u16).to_be(),
        dport: (key.remote_port as u16).to_be(),
        src: key.local_ip,
        dst: key.remote_ip,
        cookie: [cookie as u32, (cookie >> 32) as u32],
        ..Default::default()
    }
}

/// Aborts the TCP socket keyed `key` with cookie `cookie` in the calling
/// thread's network namespace: the peer gets a RST, the application
/// ECONNABORTED. `ENOENT` when no such socket exists (any more),
/// `EOPNOTSUPP` when the kernel was built without
/// CONFIG_INET_DIAG_DESTROY.
pub(crate) fn destroy_tcp(key: &SockKey, cookie: u64) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) returned a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = request(key, cookie);
    // SAFETY: `req` is a live repr(C) value of the given size; the kernel
    // only reads it. The destination is the kernel (a zeroed sockaddr_nl).
    let sent = unsafe {
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.as_raw_fd(),
            (&req as *const DestroyRequest).cast(),
            std::mem::size_of::<DestroyRequest>(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    ack_errno(&buf[..n as usize])
}

/// The records a socket iterator wrote (`struct mp_enroll_record` each).
pub(crate) fn records(out: &[u8]) -> Result<Vec<EnrollRecord>> {
    let size = std::mem::size_of::<EnrollRecord>();
    let bad = |what: String| {
        Error::io(
            "reading a socket iterator's records",
            "iter/tcp",
            io::Error::other(what),
        )
    };
    if out.len() % size != 0 {
        return Err(bad(format!(
            "{} bytes, not a multiple of {size}",
            out.len()
        )));
    }
    out.chunks_exact(size)
        .map(|chunk| {
            let mut rec = EnrollRecord::default();
            plain::copy_from_bytes(&mut rec, chunk).map_err(|_| bad("short record".into()))?;
            Ok(rec)
        })
        .collect()
}

/// The outcome carried by a netlink ack (`NLMSG_ERROR`, error 0 = done).
fn ack_errno(msg: &[u8]) -> io::Result<()> {
    if msg.len() < 20 {
        return Err(io::Error::other(format!(
            "sock_diag answered {} bytes, expected an ack",
            msg.len()
        )));
    }
    let ty = u16::from_ne_bytes([msg[4], msg[5]]);
    if ty != NLMSG_ERROR {
        return Err(io::Error::other(format!(
            "sock_diag answered message type {ty}, expected an ack"
        )));
    }
    let err = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
    match err {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_has_the_kernels_layout() {
        // nlmsghdr 16 + inet_diag_req_v2 56 (sockid 48).
        assert_eq!(std::mem::size_of::<DestroyRequest>(), 72);
        let key = SockKey::new(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.2:80".parse().unwrap(),
            7,
        );
        let r = request(&key, 0x1122_3344_5566_7788);
        assert_eq!(r.len, 72);
        assert_eq!(r.sport, 40000u16.to_be());
        assert_eq!(r.dport, 80u16.to_be());
        assert_eq!(r.cookie, [0x5566_7788, 0x1122_3344]);
        assert_eq!(r.family, libc::AF_INET6 as u8);
    }

    #[test]
    fn acks_are_read_as_errnos() {
        let mut ack = [0u8; 36];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(ack_errno(&ack).is_ok());
        ack[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(
            ack_errno(&ack).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        assert!(ack_errno(&ack[..8]).is_err());
    }
}
