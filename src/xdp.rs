//! Policy in XDP on a network device (`bpf/xdp.bpf.c`): every packet the
//! device receives is judged before the kernel's stack sees it.
//!
//! The program is attached through a BPF link (`BPF_LINK_CREATE` with
//! the XDP mode flags), not through netlink:
//!
//! - the kernel refuses a link on a device that already has an XDP
//!   program, and refuses anyone replacing the program of a link, so
//!   meshpath never replaces someone else's program and nobody silently
//!   replaces meshpath's;
//! - the program goes away with the link's last file descriptor, so a
//!   crashed agent or test leaves nothing attached behind; with a pin
//!   directory the link is pinned there instead
//!   (`meshpath_link_xdp_<netns inode>_<ifindex>_<mode>`), keeps judging
//!   packets while no agent runs, and the next datapath adopts it by
//!   switching the link to its own program in one step (no gap);
//! - detaching does not depend on the caller's network namespace (the
//!   link holds the device; a netlink detach looks the interface index
//!   up in whatever namespace the dropping thread is in).

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use libbpf_rs::ProgramInput as Input;

use crate::datapath::{Datapath, Inner};
use crate::error::{Error, Result};
use crate::skel::{self, Loaded};

/// How the XDP program is attached to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XdpMode {
    /// Native where the driver supports it, generic otherwise.
    Auto,
    /// In the driver, before any socket buffer is allocated
    /// (`XDP_FLAGS_DRV_MODE`). Fails when the driver has no XDP support.
    Native,
    /// In the kernel's receive path, after the socket buffer is built
    /// (`XDP_FLAGS_SKB_MODE`): works on every device, slower.
    Generic,
}

impl XdpMode {
    /// A stable lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an attachment is: the network namespace (device and inode of
/// its nsfs file) and the interface index in it.
type XdpTarget = (u64, u64, u32);

/// The loaded XDP object and the devices this datapath is attached to.
pub(crate) struct XdpObject {
    skel: Loaded<skel::xdp::XdpSkel<'static>>,
    attached: Mutex<HashSet<XdpTarget>>,
}

impl XdpObject {
    pub(crate) fn new(skel: Loaded<skel::xdp::XdpSkel<'static>>) -> Self {
        XdpObject {
            skel,
            attached: Mutex::new(HashSet::new()),
        }
    }

    fn attached(&self) -> std::sync::MutexGuard<'_, HashSet<XdpTarget>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The datapath's XDP program on one network device. Dropping it
/// detaches the program (so does the process exiting).
#[must_use = "the XDP program is detached when this guard is dropped"]
pub struct XdpAttachment {
    // The link first: it detaches before the datapath reference goes.
    link: Option<OwnedFd>,
    /// Where the link is pinned: it stays attached when this guard drops.
    pin: Option<std::path::PathBuf>,
    iface: String,
    target: XdpTarget,
    mode: XdpMode,
    datapath: Arc<Inner>,
}

impl std::fmt::Debug for XdpAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpAttachment")
            .field("interface", &self.iface)
            .field("ifindex", &self.ifindex())
            .field("mode", &self.mode)
            .finish()
    }
}

impl XdpAttachment {
    /// The mode actually used: [`XdpMode::Native`] or
    /// [`XdpMode::Generic`], never `Auto`.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// The interface index (in the network namespace it was attached in).
    pub fn ifindex(&self) -> u32 {
        self.target.2
    }

    /// The interface name given at attach time.
    pub fn interface(&self) -> &str {
        &self.iface
    }

    /// Whether the link is pinned (the datapath has a pin directory): it
    /// then stays attached when this guard drops, for the next datapath
    /// to adopt; [`XdpAttachment::detach`] detaches and unpins it.
    pub fn is_pinned(&self) -> bool {
        self.pin.is_some()
    }

    /// The link's pin, when it is pinned and the pin has been removed from
    /// under the datapath.
    pub fn missing_pin(&self) -> Option<std::path::PathBuf> {
        self.pin.as_ref().filter(|p| !p.exists()).cloned()
    }

    /// Pins the link again when its pin was removed (the link itself never
    /// went away: this guard holds it); returns the path pinned.
    pub fn repin(&self) -> Result<Option<std::path::PathBuf>> {
        match (self.missing_pin(), &self.link) {
            (Some(path), Some(link)) => {
                crate::maps::pin_fd(link.as_fd(), &path)?;
                Ok(Some(path))
            }
            _ => Ok(None),
        }
    }

    /// Detaches now (and unpins), reporting a failure (dropping an
    /// unpinned attachment detaches too, silently). Succeeds when the
    /// device has gone away meanwhile: its program went with it.
    pub fn detach(mut self) -> Result<()> {
        if let Some(pin) = self.pin.take() {
            if let Err(e) = std::fs::remove_file(&pin) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(Error::io("unpinning", &pin, e));
                }
            }
        }
        if let Some(link) = self.link.take() {
            // SAFETY: plain syscall wrapper on a link fd this guard owns.
            let r = unsafe { libbpf_sys::bpf_link_detach(link.as_raw_fd()) };
            if r < 0 {
                return Err(Error::Attach {
                    program: "meshpath_xdp",
                    target: format!("interface {} (detach)", self.iface),
                    source: libbpf_rs::Error::from_raw_os_error(-r),
                });
            }
        }
        Ok(())
    }
}

impl Drop for XdpAttachment {
    fn drop(&mut self) {
        // Closing the link's last fd detaches the program, unless it is
        // pinned (the pin holds it).
        drop(self.link.take());
        self.datapath.xdp.attached().remove(&self.target);
    }
}

const XDP_FLAGS_SKB_MODE: u32 = libbpf_sys::XDP_FLAGS_SKB_MODE;
const XDP_FLAGS_DRV_MODE: u32 = libbpf_sys::XDP_FLAGS_DRV_MODE;

impl Datapath {
    /// Attaches the XDP policy program to the network device `iface` (in
    /// the calling thread's network namespace): every packet it receives
    /// is judged by the live policy (see ARCHITECTURE.md, "Packets
    /// (XDP)"); with no policy set, everything passes.
    ///
    /// [`XdpMode::Auto`] tries native XDP and falls back to generic.
    /// Refused when the device already has an XDP program (this
    /// datapath's or anyone else's): nothing is ever replaced.
    pub fn attach_xdp(&self, iface: &str, mode: XdpMode) -> Result<XdpAttachment> {
        let ifindex = ifindex_of(iface)?;
        let (ns_dev, ns_ino) = current_netns()?;
        let target = (ns_dev, ns_ino, ifindex);
        let xdp = &self.inner.xdp;
        if !xdp.attached().insert(target) {
            return Err(Error::invalid(
                "xdp interface",
                format!("{iface} is already attached to this datapath"),
            ));
        }
        let result = match &self.inner.pin_dir {
            Some(dir) => self.xdp_link_pinned(dir, iface, ifindex, ns_ino, mode),
            None => self
                .xdp_link(iface, ifindex, mode)
                .map(|(l, m)| (l, m, None)),
        };
        match result {
            Ok((link, mode, pin)) => Ok(XdpAttachment {
                link: Some(link),
                pin,
                iface: iface.to_string(),
                target,
                mode,
                datapath: self.inner.clone(),
            }),
            Err(e) => {
                xdp.attached().remove(&target);
                Err(e)
            }
        }
    }

    /// Adopts the link pinned for this device (switching it to this
    /// datapath's program) or creates one and pins it.
    fn xdp_link_pinned(
        &self,
        dir: &std::path::Path,
        iface: &str,
        ifindex: u32,
        ns_ino: u64,
        mode: XdpMode,
    ) -> Result<(OwnedFd, XdpMode, Option<std::path::PathBuf>)> {
        let path_for =
            |m: XdpMode| dir.join(format!("meshpath_link_xdp_{ns_ino}_{ifindex}_{}", m.name()));
        let prog = &self.inner.xdp.skel.progs.meshpath_xdp;
        for pinned in [XdpMode::Native, XdpMode::Generic] {
            let path = path_for(pinned);
            if !path.exists() {
                continue;
            }
            if mode != XdpMode::Auto && mode != pinned {
                return Err(Error::Pinned {
                    path,
                    reason: format!(
                        "interface {iface} has meshpath's XDP program pinned in {pinned} mode,                          {mode} mode was asked for: detach it first (agent --cleanup),                          or ask for {pinned} or auto"
                    ),
                });
            }
            let fail = |source| Error::Attach {
                program: "meshpath_xdp",
                target: format!("interface {iface} (pinned link {})", path.display()),
                source,
            };
            let mut link = libbpf_rs::Link::open(&path).map_err(fail)?;
            link.update_prog(prog).map_err(fail)?;
            let fd = link
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io("duplicating the fd of", &path, e))?;
            return Ok((fd, pinned, Some(path)));
        }
        let (fd, used) = self.xdp_link(iface, ifindex, mode)?;
        let path = path_for(used);
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::invalid("pin directory", "contains a NUL byte"))?;
        // SAFETY: plain syscall wrapper; a live link fd and a C string
        // that outlives the call.
        let r = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) };
        if r < 0 {
            return Err(Error::io(
                "pinning the XDP link at",
                &path,
                std::io::Error::from_raw_os_error(-r),
            ));
        }
        Ok((fd, used, Some(path)))
    }

    /// Creates the XDP link in `mode`, falling back from native to
    /// generic for `Auto`.
    fn xdp_link(&self, iface: &str, ifindex: u32, mode: XdpMode) -> Result<(OwnedFd, XdpMode)> {
        let prog = &self.inner.xdp.skel.progs.meshpath_xdp;
        let prog_fd = prog.as_fd().as_raw_fd();
        let create = |flags: u32| -> std::result::Result<OwnedFd, i32> {
            let mut opts = libbpf_sys::bpf_link_create_opts {
                sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _,
                ..Default::default()
            };
            opts.flags = flags;
            // SAFETY: plain syscall wrapper; `opts` lives across the call
            // and its size field is set; the ifindex is the target.
            let fd = unsafe {
                libbpf_sys::bpf_link_create(prog_fd, ifindex as i32, libbpf_sys::BPF_XDP, &opts)
            };
            if fd < 0 {
                return Err(-fd);
            }
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let fail = |mode: XdpMode, errno: i32| -> Error {
            if errno == libc::EBUSY || errno == libc::EEXIST {
                let holder = xdp_holder(ifindex);
                return Error::Attach {
                    program: "meshpath_xdp",
                    target: format!(
                        "interface {iface} ({mode} mode): it already has an XDP program \
                         ({holder}) that this datapath did not attach; meshpath never \
                         replaces one, detach it first (`ip link set dev {iface} xdp off`)"
                    ),
                    source: libbpf_rs::Error::from_raw_os_error(errno),
                };
            }
            if mode == XdpMode::Native && errno == libc::EOPNOTSUPP {
                return Error::KernelFeature {
                    feature: "native XDP",
                    detail: format!(
                        "the driver of interface {iface} does not support native XDP \
                         (EOPNOTSUPP); use XdpMode::Auto or XdpMode::Generic"
                    ),
                };
            }
            Error::Attach {
                program: "meshpath_xdp",
                target: format!("interface {iface} ({mode} mode)"),
                source: libbpf_rs::Error::from_raw_os_error(errno),
            }
        };
        match mode {
            XdpMode::Native => create(XDP_FLAGS_DRV_MODE)
                .map(|l| (l, XdpMode::Native))
                .map_err(|e| fail(XdpMode::Native, e)),
            XdpMode::Generic => create(XDP_FLAGS_SKB_MODE)
                .map(|l| (l, XdpMode::Generic))
                .map_err(|e| fail(XdpMode::Generic, e)),
            XdpMode::Auto => match create(XDP_FLAGS_DRV_MODE) {
                Ok(l) => Ok((l, XdpMode::Native)),
                // Someone else's program, or no privilege: generic would
                // fail the same way; say so about native.
                Err(e) if [libc::EBUSY, libc::EEXIST, libc::EPERM].contains(&e) => {
                    Err(fail(XdpMode::Native, e))
                }
                // No driver support (EOPNOTSUPP) or the driver refuses
                // in its current configuration (MTU, queues): generic.
                Err(_) => create(XDP_FLAGS_SKB_MODE)
                    .map(|l| (l, XdpMode::Generic))
                    .map_err(|e| fail(XdpMode::Generic, e)),
            },
        }
    }

    /// Runs the XDP program once on `packet` (BPF_PROG_TEST_RUN, nothing
    /// attached) and returns its action (`XDP_DROP` = 1, `XDP_PASS` = 2).
    /// Verdicts are counted as for a real packet. For tests.
    ///
    /// The kernel wants at least an Ethernet header's worth of input.
    /// A shorter packet is padded to that and run with `data_end` at its
    /// end, so that the program sees exactly `packet`, down to an empty
    /// one (Linux 6.18 puts the padding in a fragment, which an XDP
    /// program without frags support never sees); kernels that want
    /// `data_end` at the end of the input get the packet behind XDP
    /// metadata instead.
    #[doc(hidden)]
    pub fn test_run_xdp(&self, packet: &[u8]) -> Result<u32> {
        const ETH_HLEN: usize = 14;
        let prog = &self.inner.xdp.skel.progs.meshpath_xdp;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex (u32 each, offsets into data_in).
        let run = |data: &[u8], bounds: Option<(usize, usize)>| {
            let mut ctx = [0u8; 24];
            if let Some((start, end)) = bounds {
                ctx[0..4].copy_from_slice(&(start as u32).to_ne_bytes());
                ctx[4..8].copy_from_slice(&(end as u32).to_ne_bytes());
            }
            prog.test_run(Input {
                data_in: Some(data),
                context_in: bounds.map(|_| &mut ctx[..]),
                ..Default::default()
            })
            .map(|out| out.return_value)
        };
        let err = |source: libbpf_rs::Error| {
            Error::io(
                "running BPF_PROG_TEST_RUN of",
                "meshpath_xdp",
                std::io::Error::other(source),
            )
        };
        if packet.len() >= ETH_HLEN {
            return run(packet, None).map_err(err);
        }
        let mut padded = packet.to_vec();
        padded.resize(ETH_HLEN, 0);
        match run(&padded, Some((0, packet.len()))) {
            Err(e) if e.kind() == libbpf_rs::ErrorKind::InvalidInput => {
                // Metadata: a multiple of 4 bytes, at most 32.
                let meta = (ETH_HLEN - packet.len()).div_ceil(4) * 4;
                let mut buf = vec![0u8; meta];
                buf.extend_from_slice(packet);
                run(&buf, Some((meta, buf.len()))).map_err(err)
            }
            r => r.map_err(err),
        }
    }

    /// Runs the XDP program `repeat` times on `packet` (BPF_PROG_TEST_RUN
    /// with `repeat`, nothing attached) and returns its action and the
    /// kernel's time per run (whole nanoseconds, rounded down; time spent
    /// preempted between runs is left out). Verdicts and flow events
    /// happen once per run, as for real packets. For benchmarks;
    /// `packet` must hold at least an Ethernet header.
    #[doc(hidden)]
    pub fn test_run_xdp_repeat(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration)> {
        let prog = &self.inner.xdp.skel.progs.meshpath_xdp;
        prog.test_run(Input {
            data_in: Some(packet),
            repeat: repeat.max(1),
            ..Default::default()
        })
        .map(|out| (out.return_value, out.duration))
        .map_err(|source| {
            Error::io(
                "running BPF_PROG_TEST_RUN (repeat) of",
                "meshpath_xdp",
                std::io::Error::other(source),
            )
        })
    }

    /// The XDP program's kernel id (as `bpftool prog` and `ip link` show).
    pub fn xdp_program_id(&self) -> Result<u32> {
        let prog = &self.inner.xdp.skel.progs.meshpath_xdp;
        prog_id(prog.as_fd().as_raw_fd())
    }
}

/// The interface index of `iface` in the calling thread's namespace.
fn ifindex_of(iface: &str) -> Result<u32> {
    let invalid = |reason: String| Error::invalid("xdp interface", reason);
    if iface.is_empty() || iface.len() >= libc::IFNAMSIZ || iface.contains('/') {
        return Err(invalid(format!(
            "{iface:?} is not an interface name (1 to {} bytes, no '/')",
            libc::IFNAMSIZ - 1
        )));
    }
    let name =
        CString::new(iface).map_err(|_| invalid(format!("{iface:?} contains a NUL byte")))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        let e = std::io::Error::last_os_error();
        return Err(invalid(format!(
            "no interface {iface} in this network namespace ({e})"
        )));
    }
    Ok(idx)
}

/// The calling thread's network namespace, as (device, inode) of its
/// nsfs file.
fn current_netns() -> Result<(u64, u64)> {
    let path = "/proc/thread-self/ns/net";
    let m = std::fs::metadata(path).map_err(|e| Error::io("reading", path, e))?;
    Ok((m.dev(), m.ino()))
}

/// Who holds the XDP hook of `ifindex`, for error messages.
fn xdp_holder(ifindex: u32) -> String {
    let mut q = libbpf_sys::bpf_xdp_query_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_xdp_query_opts>() as _,
        ..Default::default()
    };
    // SAFETY: plain netlink query; `q` lives across the call and its size
    // field is set.
    let r = unsafe { libbpf_sys::bpf_xdp_query(ifindex as i32, 0, &mut q) };
    if r < 0 {
        return "unknown id".into();
    }
    let mut parts = Vec::new();
    for (what, id) in [
        ("native", q.drv_prog_id),
        ("generic", q.skb_prog_id),
        ("offloaded", q.hw_prog_id),
    ] {
        if id != 0 {
            parts.push(format!("id {id}, {what}"));
        }
    }
    if parts.is_empty() {
        "unknown id".into()
    } else {
        parts.join("; ")
    }
}

/// The kernel id of the program behind `fd`.
fn prog_id(fd: i32) -> Result<u32> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: plain syscall wrapper; `info` is a writable buffer of `len`
    // bytes that lives across the call.
    let r = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
    if r < 0 {
        return Err(Error::io(
            "reading program info of",
            "meshpath_xdp",
            std::io::Error::from_raw_os_error(-r),
        ));
    }
    Ok(info.id)
}
