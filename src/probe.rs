//! Kernel checks before load, and a readiness probe after it.
//!
//! FIONREAD and poll/epoll readiness on sockets in a SOCKHASH have
//! regressed in some kernels (the sk_msg queue was invisible to them), and
//! epoll-based servers then stall. At load the datapath short-circuits one
//! loopback connection of its own and checks that a redirected message
//! wakes epoll, makes poll report POLLIN and FIONREAD count its bytes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use crate::abi::{DirMode, SockEntry, SockKey, SockState};
use crate::error::{Error, Result};
use crate::maps::MapSet;

/// What the load-time probe found. `true` means it works as on plain TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KernelQuirks {
    /// Whether the probe ran at all.
    pub probed: bool,
    /// A message sent on the probe connection was redirected.
    pub redirect_works: bool,
    /// epoll woke up for a redirected message.
    pub epoll_wakeup: bool,
    /// poll() reported POLLIN for a redirected message.
    pub poll_readable: bool,
    /// FIONREAD counted the redirected bytes exactly.
    pub fionread_exact: bool,
    /// The kernel has the `bpf_sock_destroy` kfunc (Linux 6.5+), with
    /// which the socket iterators reset flows that policy comes to deny.
    /// Without it the library resets them from user space through
    /// sock_diag (`SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY), one netlink
    /// request per socket, and those resets make no flow event.
    pub sock_destroy_kfunc: bool,
    /// The bpf LSM is active and took meshpath's `lsm_cgroup` program
    /// (Linux 6.0+, `bpf` in the kernel's `lsm=` list, and no sandbox that
    /// forbids LSM programs): attached workloads
    /// are refused packet (`AF_PACKET`) and `AF_XDP` sockets while a policy
    /// is in force. Without it those sockets are not refused, and their
    /// frames are judged only by XDP on the devices they reach.
    pub lsm_cgroup: bool,
}

impl Default for KernelQuirks {
    fn default() -> Self {
        KernelQuirks {
            probed: false,
            redirect_works: true,
            epoll_wakeup: true,
            poll_readable: true,
            fionread_exact: true,
            sock_destroy_kfunc: true,
            lsm_cgroup: true,
        }
    }
}

impl KernelQuirks {
    /// One sentence per problem found (empty when all is well).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.redirect_works {
            out.push("sk_msg redirect did not happen on a loopback probe connection: short-circuited connections will use TCP".to_string());
        }
        if !self.epoll_wakeup {
            out.push("epoll is not woken by short-circuited data on this kernel: epoll/tokio servers may stall; keep them off the short-circuit".to_string());
        }
        if !self.poll_readable {
            out.push(
                "poll() does not report short-circuited data as readable on this kernel"
                    .to_string(),
            );
        }
        if !self.fionread_exact {
            out.push("FIONREAD does not count short-circuited bytes on this kernel (fixed in Linux 6.x: tcp_bpf_ioctl)".to_string());
        }
        if !self.lsm_cgroup {
            out.push("the bpf LSM is not active or refused meshpath's lsm_cgroup program (it needs Linux 6.0+ with bpf in the kernel's lsm= list): workloads of attached cgroups are not refused packet (AF_PACKET) and AF_XDP sockets, whose frames only XDP on a device judges".to_string());
        }
        if !self.sock_destroy_kfunc {
            out.push("no bpf_sock_destroy kfunc (Linux 6.5+): established flows a policy change denies are reset from user space through sock_diag, without a flow event".to_string());
        }
        out
    }
}

/// Checks what the datapath needs before loading anything.
pub(crate) fn check_kernel() -> Result<()> {
    check_kernel_with(
        Path::new("/sys/kernel/btf/vmlinux"),
        // SAFETY: plain probe call; NULL opts are allowed.
        |ty| unsafe { libbpf_sys::libbpf_probe_bpf_prog_type(ty, std::ptr::null()) },
        // SAFETY: plain probe call; NULL opts are allowed.
        |ty| unsafe { libbpf_sys::libbpf_probe_bpf_map_type(ty, std::ptr::null()) },
    )
}

/// [`check_kernel`] against a BTF path and probe functions (libbpf's
/// convention: 1 supported, 0 not, -errno when probing failed), so that
/// the answer to a kernel without a feature can be tested on one with it.
fn check_kernel_with(
    btf: &Path,
    probe_prog: impl Fn(u32) -> i32,
    probe_map: impl Fn(u32) -> i32,
) -> Result<()> {
    if !btf.exists() {
        return Err(Error::KernelFeature {
            feature: "BTF type information (CONFIG_DEBUG_INFO_BTF)",
            detail: format!(
                "{} is missing; meshpath's CO-RE programs need a kernel built with BTF",
                btf.display()
            ),
        });
    }
    let progs = [
        (
            libbpf_sys::BPF_PROG_TYPE_SOCK_OPS,
            "sock_ops programs (CONFIG_CGROUP_BPF)",
        ),
        (
            libbpf_sys::BPF_PROG_TYPE_SK_MSG,
            "sk_msg programs (CONFIG_NET_SOCK_MSG)",
        ),
        (
            libbpf_sys::BPF_PROG_TYPE_CGROUP_SOCKOPT,
            "cgroup sockopt programs (Linux 5.3+)",
        ),
    ];
    for (ty, feature) in progs {
        probe_result(probe_prog(ty), feature)?;
    }
    let maps = [
        (
            libbpf_sys::BPF_MAP_TYPE_SOCKHASH,
            "SOCKHASH maps (CONFIG_BPF_STREAM_PARSER / CONFIG_NET_SOCK_MSG)",
        ),
        (
            libbpf_sys::BPF_MAP_TYPE_SK_STORAGE,
            "socket local storage maps (Linux 5.2+)",
        ),
    ];
    for (ty, feature) in maps {
        probe_result(probe_map(ty), feature)?;
    }
    Ok(())
}

fn probe_result(r: i32, feature: &'static str) -> Result<()> {
    match r {
        1 => Ok(()),
        0 => Err(Error::KernelFeature {
            feature,
            detail: "the kernel does not support it".into(),
        }),
        e if -e == libc::EPERM || -e == libc::EACCES => Err(Error::NotPermitted {
            action: "load BPF programs",
            source: std::io::Error::from_raw_os_error(-e),
        }),
        e => Err(Error::KernelFeature {
            feature,
            detail: format!("probing failed: {}", std::io::Error::from_raw_os_error(-e)),
        }),
    }
}

/// The network namespace cookie of a socket (SO_NETNS_COOKIE, Linux 5.14+).
pub fn netns_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for getsockopt's out parameters.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Short-circuits one loopback connection of our own and checks readiness.
pub(crate) fn probe_readiness(maps: &MapSet) -> Result<KernelQuirks> {
    let io = |op: &'static str| move |e: std::io::Error| Error::io(op, "the readiness probe", e);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding"))?;
    let client = TcpStream::connect(listener.local_addr().map_err(io("reading address"))?)
        .map_err(io("connecting"))?;
    let (mut server, _) = listener.accept().map_err(io("accepting"))?;
    let netns = netns_cookie(client.as_fd()).map_err(io("reading SO_NETNS_COOKIE"))?;
    let ckey = SockKey::new(
        client.local_addr().map_err(io("reading address"))?,
        client.peer_addr().map_err(io("reading address"))?,
        netns,
    );
    let skey = ckey.peer();

    let sockets = maps.typed::<SockKey, u64>("meshpath_sockets")?;
    let index = maps.typed::<SockKey, SockEntry>("meshpath_sock_index")?;
    let state = maps.typed::<i32, SockState>("meshpath_sock_state")?;
    let enroll = |key: &SockKey, s: &TcpStream| -> Result<()> {
        let fd = s.as_raw_fd();
        let st = SockState {
            enrolled: 1,
            mode: DirMode::MP_DIR_UNDECIDED.0 as u8,
            ..Default::default()
        };
        state.update(&fd, &st, || "probe socket state".into())?;
        sockets.update(key, &(fd as u64), || "probe socket".into())?;
        index.update(key, &SockEntry::default(), || "probe socket index".into())
    };
    let result = (|| -> Result<KernelQuirks> {
        enroll(&skey, &server)?;
        enroll(&ckey, &client)?;
        let ep = nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| io("creating epoll")(e.into()))?;
        ep.add(
            &server,
            nix::sys::epoll::EpollEvent::new(
                nix::sys::epoll::EpollFlags::EPOLLIN | nix::sys::epoll::EpollFlags::EPOLLET,
                1,
            ),
        )
        .map_err(|e| io("registering with epoll")(e.into()))?;
        (&client).write_all(b"probe").map_err(io("sending"))?;
        let mut events = [nix::sys::epoll::EpollEvent::empty(); 1];
        let n = ep
            .wait(&mut events, nix::sys::epoll::EpollTimeout::from(1000u16))
            .map_err(|e| io("waiting on epoll")(e.into()))?;
        let epoll_wakeup = n == 1;
        let mut pfd = [nix::poll::PollFd::new(
            server.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let poll_readable = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(1000u16))
            .map(|n| n == 1)
            .unwrap_or(false);
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer.
        let r = unsafe { libc::ioctl(server.as_raw_fd(), libc::FIONREAD, &mut avail) };
        let fionread_exact = r == 0 && avail == 5;
        let sent = state.lookup(&client.as_raw_fd())?.unwrap_or_default();
        let redirect_works = sent.msgs_redir == 1;
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .map_err(io("setting a timeout"))?;
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).map_err(io("receiving"))?;
        if &buf != b"probe" {
            return Err(Error::io(
                "checking",
                "the readiness probe",
                std::io::Error::other("probe bytes arrived corrupted"),
            ));
        }
        Ok(KernelQuirks {
            probed: true,
            redirect_works,
            epoll_wakeup,
            poll_readable,
            fionread_exact,
            ..KernelQuirks::default()
        })
    })();
    // Leave nothing behind, whatever happened above.
    for key in [&ckey, &skey] {
        let _ = index.delete(key);
        let _ = sockets.delete(key);
    }
    result
}

/// Whether the bpf LSM is active (`bpf` in securityfs's `lsm` list);
/// false when that cannot be read (securityfs not mounted).
pub(crate) fn bpf_lsm_active() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|l| l.trim().split(',').any(|m| m == "bpf"))
        .unwrap_or(false)
}

/// Whether the running kernel's BTF has a function named `name` (a kfunc
/// the programs call only where it exists).
pub(crate) fn has_kernel_func(name: &str) -> bool {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: libbpf parses the kernel's BTF into a new object, or returns
    // an error pointer (checked with libbpf_get_error).
    let btf = unsafe { libbpf_sys::btf__load_vmlinux_btf() };
    // SAFETY: libbpf_get_error only inspects the pointer value.
    if btf.is_null() || unsafe { libbpf_sys::libbpf_get_error(btf.cast()) } != 0 {
        return false;
    }
    // SAFETY: `btf` is a valid BTF object and `cname` a C string.
    let id = unsafe {
        libbpf_sys::btf__find_by_name_kind(btf, cname.as_ptr(), libbpf_sys::BTF_KIND_FUNC)
    };
    // SAFETY: `btf` came from btf__load_vmlinux_btf and is freed once.
    unsafe { libbpf_sys::btf__free(btf) };
    id > 0
}

/// The address of kernel symbol `name` from /proc/kallsyms; None when it
/// is absent or hidden (kptr_restrict shows every address as 0).
pub(crate) fn kernel_symbol(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
    parse_kallsyms(&text, name)
}

fn parse_kallsyms(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let addr = f.next()?;
        let _kind = f.next()?;
        (f.next()? == name && f.next().is_none())
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::{check_kernel_with, parse_kallsyms, Error, Path, Result};

    fn feature_of(r: Result<()>) -> (&'static str, String) {
        match r {
            Err(Error::KernelFeature { feature, detail }) => (feature, detail),
            other => panic!("expected a missing kernel feature, got {other:?}"),
        }
    }

    #[test]
    fn a_kernel_without_a_feature_is_refused_naming_it() {
        let btf = Path::new("/proc/self/exe"); // any existing file
        let all = |_: u32| 1;
        assert!(check_kernel_with(btf, all, all).is_ok());

        let (f, d) = feature_of(check_kernel_with(
            Path::new("/nonexistent/btf/vmlinux"),
            all,
            all,
        ));
        assert!(f.contains("BTF"), "{f}");
        assert!(d.contains("/nonexistent/btf/vmlinux"), "{d}");

        let no_sockhash = |ty: u32| i32::from(ty != libbpf_sys::BPF_MAP_TYPE_SOCKHASH);
        let (f, d) = feature_of(check_kernel_with(btf, all, no_sockhash));
        assert!(f.contains("SOCKHASH"), "{f}");
        assert!(d.contains("does not support"), "{d}");

        let no_sk_msg = |ty: u32| i32::from(ty != libbpf_sys::BPF_PROG_TYPE_SK_MSG);
        let (f, _) = feature_of(check_kernel_with(btf, no_sk_msg, all));
        assert!(f.contains("sk_msg"), "{f}");

        let failing = |ty: u32| {
            if ty == libbpf_sys::BPF_MAP_TYPE_SK_STORAGE {
                -libc::EINVAL
            } else {
                1
            }
        };
        let (f, d) = feature_of(check_kernel_with(btf, all, failing));
        assert!(f.contains("socket local storage"), "{f}");
        assert!(d.contains("probing failed"), "{d}");

        // Not permitted is its own error, not a missing feature.
        let eperm = |_: u32| -libc::EPERM;
        match check_kernel_with(btf, eperm, all) {
            Err(Error::NotPermitted { .. }) => {}
            other => panic!("expected NotPermitted, got {other:?}"),
        }
    }

    #[test]
    fn finds_a_symbol_and_ignores_module_ones_and_hidden_addresses() {
        let text = "ffffffff81000000 T _text\n\
                    ffffffff8112a0b0 T woken_wake_function\n\
                    ffffffffc0001000 t woken_wake_function_x\t[mod]\n";
        assert_eq!(
            parse_kallsyms(text, "woken_wake_function"),
            Some(0xffff_ffff_8112_a0b0)
        );
        assert_eq!(parse_kallsyms(text, "missing"), None);
        let hidden = "0000000000000000 T woken_wake_function\n";
        assert_eq!(parse_kallsyms(hidden, "woken_wake_function"), None);
    }
}
