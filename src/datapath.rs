//! Loading the datapath: every object, one set of maps, the sk_msg
//! program on the SOCKHASH, and attachments to cgroups.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore};

use crate::abi::{self, BypassFlags, CgroupFlags, LpmKey, Settings, ABI_VERSION};
use crate::attach::{CgroupAttachment, SockmapAttachment};
use crate::cgroup::CgroupDir;
use crate::error::{Error, Result};
use crate::maps::{self, MapSet};
use crate::net::IpNet;
use crate::probe::{self, KernelQuirks};
use crate::skel::{self, Loaded};
use crate::stats::{self, Counters};

/// Every cgroup hook the datapath may attach to, by the name its pinned
/// link carries.
pub(crate) const CGROUP_HOOKS: &[&str] = &[
    "sockops",
    "setsockopt",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "ingress",
    "egress",
    "sock_create",
    "socket_create",
];

/// The pin of a cgroup link: `meshpath_link_cg<cgroup id>_<hook>`.
pub(crate) fn link_pin_name(cgroup_id: u64, hook: &str) -> String {
    format!("meshpath_link_cg{cgroup_id}_{hook}")
}

/// Detaches and unpins the link pinned at `path`, if there is one.
pub(crate) fn detach_pinned(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let link = Link::open(path).map_err(|source| Error::Attach {
        program: "pinned link",
        target: path.display().to_string(),
        source,
    })?;
    // BPF_LINK_DETACH: detaches even while other references remain.
    let _ = link.detach();
    std::fs::remove_file(path).map_err(|e| Error::io("unpinning", path, e))
}

/// Every map the datapath shares between its objects.
pub(crate) const KNOWN_MAPS: &[&str] = &[
    "meshpath_sockets",
    "meshpath_sock_index",
    "meshpath_sock_state",
    "meshpath_bypass_ports",
    "meshpath_local_nets",
    "meshpath_settings",
    "meshpath_counters",
    "meshpath_endpoints_v2_0",
    "meshpath_endpoints_v2_1",
    "meshpath_hosts_v2_0",
    "meshpath_hosts_v2_1",
    "meshpath_policy_v2_0",
    "meshpath_policy_v2_1",
    "meshpath_policy_shapes",
    "meshpath_verdict_cache_v2",
    "meshpath_ct_v2",
    "meshpath_identities_v2",
    "meshpath_verdicts",
    "meshpath_events_v2",
    "meshpath_event_agg",
    "meshpath_auth_v2",
    "meshpath_auth_signals_v2",
    "meshpath_auth_pending_v2",
    "meshpath_auth_rate",
    "meshpath_certs_v2",
    "meshpath_cgroups",
];

/// How to load the datapath.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DatapathOptions {
    /// Capacity of the socket maps: established local TCP sockets (two per
    /// connection). Default 65,536.
    pub max_sockets: u32,
    /// A bpffs directory to pin the maps in, so that state outlives the
    /// process and a restarted agent adopts it. `None`: nothing is pinned.
    pub pin_dir: Option<PathBuf>,
    /// Enroll sockets into the short-circuit (default true). When false,
    /// attached cgroups get the other features but every socket uses TCP.
    pub short_circuit: bool,
    /// Keep sockets that set `SO_RCVLOWAT > 1` on TCP, where the option is
    /// honoured (default true).
    pub rcvlowat_optout: bool,
    /// Check at load that readiness (poll/epoll, FIONREAD) works on
    /// short-circuited sockets with this kernel (default true).
    pub probe_quirks: bool,
    /// Move connections whose receiver busy-polls (spins on non-blocking
    /// reads) to plain TCP, where this kernel serves them faster (default
    /// true; see ARCHITECTURE.md, "Busy-polling receivers").
    pub busy_poll_detect: bool,
    /// Capacity of each endpoint map (single addresses and prefixes are
    /// kept apart, each up to this many) and of the identity names map.
    /// Default 16,384.
    pub max_endpoints: u32,
    /// Capacity of the policy maps (one entry per rule and port).
    /// Default 16,384.
    pub max_policies: u32,
    /// Remember each flow's verdict at the packet hooks (XDP, cgroup_skb)
    /// until the policy changes, so that later packets cost one hash
    /// lookup instead of the full decision (default true; ARCHITECTURE.md,
    /// "The verdict cache").
    pub verdict_cache: bool,
    /// Capacity of the verdict cache in flows (LRU: the least recently
    /// seen flows make room). Default 16,384.
    pub max_verdict_cache: u32,
    /// Capacity of the connection-tracking map in flows (LRU: the least
    /// recently seen flows make room; an evicted flow's next packet is
    /// judged as a new flow in its own direction). Default 65,536.
    pub max_conntrack: u32,
    /// Report flow events from the start (default false: reading them
    /// with `Datapath::flows` turns them on).
    pub flow_events: bool,
    /// Per-packet events (drops, audits) are aggregated: at most one per
    /// flow key and verdict per interval, with a count. Default 1 s.
    pub event_interval: std::time::Duration,
    /// Size of the flow event ring buffer in bytes (a power of two, at
    /// least a page). Default 4 MiB (32,768 events).
    pub event_ring_bytes: u32,
    /// Capacity of the auth map (authenticated identity pairs). Default
    /// 16,384.
    pub max_auth: u32,
    /// At most one auth-required signal per pair per interval (default
    /// 1 s): a flood of held packets asks the agent once.
    pub auth_signal_interval: std::time::Duration,
    /// At most this many auth-required signals per second and CPU (default
    /// 1,000); the rest are counted as dropped.
    pub auth_signal_rate: u32,
    /// Redirects into a socket taken over by [`Datapath::enroll_existing`]
    /// start no sooner than this after the takeover (default 1 s): a read
    /// already inside the kernel's plain TCP code when the socket was
    /// taken over must have gone to sleep or returned first (ARCHITECTURE.md,
    /// "Taking over existing sockets"). At most 60 s.
    pub adopt_settle: std::time::Duration,
    /// Reset established flows that policy comes to deny from user space
    /// (sock_diag `SOCK_DESTROY`) even where the kernel has the
    /// `bpf_sock_destroy` kfunc that the socket iterators use otherwise
    /// (default false). Kernels before 6.5 always take this path
    /// ([`KernelQuirks::sock_destroy_kfunc`]).
    pub reset_by_sock_diag: bool,
    /// The key identity numbers are derived with
    /// ([`crate::policy::IdentityKey`]): every node of a cluster must use
    /// the same one, and keep it secret. Default: the public default key,
    /// which is **not secure** (anyone can search two workload names with
    /// one number offline).
    pub identity_key: crate::policy::IdentityKey,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions {
            max_sockets: 65_536,
            pin_dir: None,
            short_circuit: true,
            rcvlowat_optout: true,
            probe_quirks: true,
            busy_poll_detect: true,
            max_endpoints: 16_384,
            max_policies: 16_384,
            verdict_cache: true,
            max_verdict_cache: 16_384,
            max_conntrack: 65_536,
            flow_events: false,
            event_interval: std::time::Duration::from_secs(1),
            event_ring_bytes: 4 << 20,
            max_auth: 16_384,
            auth_signal_interval: std::time::Duration::from_secs(1),
            auth_signal_rate: 1000,
            adopt_settle: std::time::Duration::from_secs(1),
            reset_by_sock_diag: false,
            identity_key: crate::policy::IdentityKey::default(),
        }
    }
}

impl DatapathOptions {
    /// Sets the flow event ring buffer size (bytes, a power of two).
    pub fn event_ring_bytes(mut self, n: u32) -> Self {
        self.event_ring_bytes = n;
        self
    }

    /// Sets the aggregation interval of per-packet flow events.
    pub fn event_interval(mut self, d: std::time::Duration) -> Self {
        self.event_interval = d;
        self
    }

    /// Reports flow events from the start.
    pub fn flow_events(mut self, on: bool) -> Self {
        self.flow_events = on;
        self
    }

    /// Sets the auth signal de-duplication interval.
    pub fn auth_signal_interval(mut self, d: std::time::Duration) -> Self {
        self.auth_signal_interval = d;
        self
    }

    /// Sets the auth signal rate limit (per second and CPU).
    pub fn auth_signal_rate(mut self, n: u32) -> Self {
        self.auth_signal_rate = n;
        self
    }

    /// Sets how long redirects into a socket taken over wait.
    pub fn adopt_settle(mut self, d: std::time::Duration) -> Self {
        self.adopt_settle = d;
        self
    }

    /// Resets denied established flows through sock_diag even where the
    /// kernel has `bpf_sock_destroy`.
    pub fn reset_by_sock_diag(mut self, on: bool) -> Self {
        self.reset_by_sock_diag = on;
        self
    }

    /// Sets the endpoint map capacity.
    pub fn max_endpoints(mut self, n: u32) -> Self {
        self.max_endpoints = n;
        self
    }

    /// Sets the policy map capacity.
    pub fn max_policies(mut self, n: u32) -> Self {
        self.max_policies = n;
        self
    }

    /// Turns the packet hooks' verdict cache on or off.
    pub fn verdict_cache(mut self, on: bool) -> Self {
        self.verdict_cache = on;
        self
    }

    /// Sets the connection-tracking map's capacity (flows).
    pub fn max_conntrack(mut self, n: u32) -> Self {
        self.max_conntrack = n;
        self
    }

    /// Sets the verdict cache's capacity (flows).
    pub fn max_verdict_cache(mut self, n: u32) -> Self {
        self.max_verdict_cache = n;
        self
    }

    /// Sets the socket map capacity.
    pub fn max_sockets(mut self, n: u32) -> Self {
        self.max_sockets = n;
        self
    }

    /// Sets the key identity numbers are derived with (see
    /// [`DatapathOptions::identity_key`]).
    pub fn identity_key(mut self, key: crate::policy::IdentityKey) -> Self {
        self.identity_key = key;
        self
    }

    /// Pins the maps under `dir` (on bpffs).
    pub fn pin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pin_dir = Some(dir.into());
        self
    }

    /// Turns the short-circuit on or off.
    pub fn short_circuit(mut self, on: bool) -> Self {
        self.short_circuit = on;
        self
    }

    /// Turns busy-polling detection on or off.
    pub fn busy_poll_detect(mut self, on: bool) -> Self {
        self.busy_poll_detect = on;
        self
    }

    /// Turns the load-time readiness probe on or off.
    pub fn probe_quirks(mut self, on: bool) -> Self {
        self.probe_quirks = on;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.adopt_settle > std::time::Duration::from_secs(60) {
            return Err(Error::invalid(
                "adopt_settle",
                format!("{:?} is longer than 60 s", self.adopt_settle),
            ));
        }
        let ring = self.event_ring_bytes;
        if ring < 4096 || !ring.is_power_of_two() || ring > 1 << 30 {
            return Err(Error::invalid(
                "event_ring_bytes",
                format!("{ring} must be a power of two between 4096 and 1 GiB"),
            ));
        }
        for (field, v) in [
            ("max_sockets", self.max_sockets),
            ("max_endpoints", self.max_endpoints),
            ("max_policies", self.max_policies),
            ("max_verdict_cache", self.max_verdict_cache),
            ("max_conntrack", self.max_conntrack),
            ("max_auth", self.max_auth),
        ] {
            if !(2..=1 << 24).contains(&v) {
                return Err(Error::invalid(
                    field,
                    format!("{v} is outside 2..=16777216"),
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn max_entries_for(&self, map: &str) -> Option<u32> {
        match map {
            "meshpath_sockets" | "meshpath_sock_index" => Some(self.max_sockets),
            "meshpath_endpoints_v2_0"
            | "meshpath_endpoints_v2_1"
            | "meshpath_hosts_v2_0"
            | "meshpath_hosts_v2_1"
            | "meshpath_identities_v2" => Some(self.max_endpoints),
            "meshpath_policy_v2_0" | "meshpath_policy_v2_1" => Some(self.max_policies),
            "meshpath_verdict_cache_v2" => Some(self.max_verdict_cache),
            "meshpath_ct_v2" => Some(self.max_conntrack),
            "meshpath_events_v2" => Some(self.event_ring_bytes),
            "meshpath_auth_v2" => Some(self.max_auth),
            _ => None,
        }
    }
}

/// Which end of a connection a bypassed port is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSide {
    /// The socket's own port (servers listening on it).
    Local,
    /// The peer's port (clients connecting to it).
    Remote,
    /// Either: both ends of connections to or from the port stay on TCP.
    Both,
}

/// The loaded datapath. Cheap to clone; the kernel objects live until the
/// last clone and the last [`CgroupAttachment`] are dropped.
#[derive(Clone)]
pub struct Datapath {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    // Field order is drop order: detach sk_msg first, then the objects.
    // Held only to be dropped (detaching sk_msg from the SOCKHASH).
    pub(crate) _msg_attach: SockmapAttachment,
    pub(crate) sockops: Loaded<skel::sockops::SockopsSkel<'static>>,
    pub(crate) sockopt: Loaded<skel::sockopt::SockoptSkel<'static>>,
    pub(crate) connect: Loaded<skel::connect::ConnectSkel<'static>>,
    pub(crate) skb: Loaded<skel::skb::SkbSkel<'static>>,
    pub(crate) reset: Loaded<skel::reset::ResetSkel<'static>>,
    pub(crate) enroll: Loaded<skel::enroll::EnrollSkel<'static>>,
    pub(crate) socket: Loaded<skel::socket::SocketSkel<'static>>,
    pub(crate) xdp: crate::xdp::XdpObject,
    pub(crate) _sk_msg: Loaded<skel::sk_msg::SkMsgSkel<'static>>,
    pub(crate) maps: MapSet,
    pub(crate) quirks: KernelQuirks,
    pub(crate) pin_dir: Option<PathBuf>,
    /// Cgroup ids attached through this datapath (one attachment each).
    pub(crate) attached: std::sync::Mutex<std::collections::HashMap<u64, std::path::PathBuf>>,
    /// Serialises read-modify-write of meshpath_settings.
    pub(crate) settings_lock: std::sync::Mutex<()>,
    /// The desired policy state and its compiled form (policy.rs).
    pub(crate) policy: std::sync::Mutex<crate::policy::PolicySlot>,
    /// The key identity numbers are derived with.
    pub(crate) identity_key: crate::policy::IdentityKey,
    /// Whether a flow reader is open (the ring buffer has one consumer).
    pub(crate) flow_reader: std::sync::atomic::AtomicBool,
    /// Whether an auth signal reader is open.
    pub(crate) auth_reader: std::sync::atomic::AtomicBool,
    /// Flows reset from user space (sock_diag), added to the counters'
    /// `policy_resets`.
    pub(crate) diag_resets: std::sync::atomic::AtomicU64,
    /// Adopted maps whose capacity is not the one asked for.
    pub(crate) resized: Vec<crate::bpffs::MapSizeMismatch>,
    /// Ownership of the pin directory; last, so released last.
    pub(crate) pin_lock: Option<crate::bpffs::PinLock>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("maps", &self.inner.maps.names().collect::<Vec<_>>())
            .field("pin_dir", &self.inner.pin_dir)
            .field("quirks", &self.inner.quirks)
            .finish()
    }
}

impl Datapath {
    /// Loads every program and map into the kernel, ready to attach.
    ///
    /// Checks the kernel first (BTF, SOCKHASH, sk_msg, privileges) and
    /// fails with an error naming what is missing.
    pub fn load(opts: &DatapathOptions) -> Result<Datapath> {
        opts.validate()?;
        probe::check_kernel()?;
        let pin_dir = match &opts.pin_dir {
            Some(d) => Some(crate::bpffs::prepare_pin_dir(d)?),
            None => None,
        };
        // One owner per pin directory, before anything pinned is opened.
        let pin_lock = pin_dir
            .as_deref()
            .map(crate::bpffs::PinLock::acquire)
            .transpose()?;

        let mut maps = MapSet::default();
        let pin = pin_dir.as_deref();
        let sockops = load_object(
            "sockops",
            skel::sockops::SockopsSkelBuilder::default(),
            &mut maps,
            opts,
            pin,
        )?;
        let sk_msg = load_object(
            "sk_msg",
            skel::sk_msg::SkMsgSkelBuilder::default(),
            &mut maps,
            opts,
            pin,
        )?;
        let sockopt = load_object(
            "sockopt",
            skel::sockopt::SockoptSkelBuilder::default(),
            &mut maps,
            opts,
            pin,
        )?;
        let connect = load_object(
            "connect",
            skel::connect::ConnectSkelBuilder::default(),
            &mut maps,
            opts,
            pin,
        )?;
        let skb = load_object(
            "skb",
            skel::skb::SkbSkelBuilder::default(),
            &mut maps,
            opts,
            pin,
        )?;
        let reset = load_object(
            "reset",
            skel::reset::ResetSkelBuilder::default(),
            &mut maps,
            opts,
            pin,
        )?;
        let enroll = load_object(
            "enroll",
            skel::enroll::EnrollSkelBuilder::default(),
            &mut maps,
            opts,
            pin,
        )?;
        let xdp = load_object(
            "xdp",
            skel::xdp::XdpSkelBuilder::default(),
            &mut maps,
            opts,
            pin,
        )?;
        let (socket, lsm_cgroup) = load_socket_object(&mut maps, opts, pin)?;

        // An adopted datapath keeps enforcing its policy until the new
        // owner replaces it: no gap.
        let adopted_policy = read_settings(&maps)?.policy;
        let sock_destroy_kfunc = probe::has_kernel_func("bpf_sock_destroy");
        write_settings(
            &maps,
            &Settings {
                abi_version: ABI_VERSION,
                draining: 0,
                shortcircuit: u8::from(opts.short_circuit),
                optout_rcvlowat: u8::from(opts.rcvlowat_optout),
                busy_detect: u8::from(opts.busy_poll_detect),
                policy: adopted_policy,
                events: u8::from(opts.flow_events),
                verdict_cache: u8::from(opts.verdict_cache),
                reset_by_diag: u8::from(opts.reset_by_sock_diag || !sock_destroy_kfunc),
                event_interval_ms: opts.event_interval.as_millis().min(u128::from(u32::MAX)) as u32,
                auth_signal_interval_ms: opts
                    .auth_signal_interval
                    .as_millis()
                    .min(u128::from(u32::MAX)) as u32,
                auth_signal_rate: opts.auth_signal_rate,
                woken_wake_fn: probe::kernel_symbol("woken_wake_function").unwrap_or(0),
                adopt_settle_ms: opts.adopt_settle.as_millis() as u32,
                ..Default::default()
            },
        )?;

        let sockets = maps
            .get("meshpath_sockets")
            .ok_or_else(|| Error::invalid("datapath", "meshpath_sockets missing"))?;
        let msg_attach = SockmapAttachment::attach(
            &sk_msg.progs.meshpath_sk_msg,
            sockets.fd.as_fd(),
            pin.map(|d| (d, sockets.adopted)),
        )?;

        if let Some(dir) = pin {
            maps.pin_all(dir)?;
        }

        let resized = crate::bpffs::size_mismatches(&maps, opts);
        let mut inner = Inner {
            _msg_attach: msg_attach,
            sockops,
            sockopt,
            connect,
            skb,
            reset,
            enroll,
            socket,
            xdp: crate::xdp::XdpObject::new(xdp),
            _sk_msg: sk_msg,
            maps,
            quirks: KernelQuirks {
                sock_destroy_kfunc,
                lsm_cgroup,
                ..KernelQuirks::default()
            },
            pin_dir,
            attached: Default::default(),
            settings_lock: Default::default(),
            policy: Default::default(),
            identity_key: opts.identity_key.clone(),
            flow_reader: Default::default(),
            auth_reader: Default::default(),
            diag_resets: Default::default(),
            resized,
            pin_lock,
        };
        if opts.probe_quirks {
            inner.quirks = KernelQuirks {
                sock_destroy_kfunc,
                lsm_cgroup,
                ..probe::probe_readiness(&inner.maps)?
            };
        }
        Ok(Datapath {
            inner: Arc::new(inner),
        })
    }

    /// Attaches the datapath to the cgroup v2 directory `path` with the
    /// default [`AttachOptions`].
    pub fn attach_cgroup(&self, path: impl AsRef<Path>) -> Result<CgroupAttachment> {
        self.attach_cgroup_with(path, &AttachOptions::default())
    }

    /// Attaches the datapath to the cgroup v2 directory `path`: sockets
    /// created by processes in it (and its descendants) are enrolled.
    /// Either every program attaches or none does.
    pub fn attach_cgroup_with(
        &self,
        path: impl AsRef<Path>,
        opts: &AttachOptions,
    ) -> Result<CgroupAttachment> {
        let cg = CgroupDir::open(path.as_ref())?;
        if cg.is_root() && !opts.allow_root {
            return Err(Error::RootCgroup {
                path: cg.path().to_path_buf(),
            });
        }
        if self
            .inner
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cg.id(), cg.path().to_path_buf())
            .is_some()
        {
            return Err(Error::Cgroup {
                path: cg.path().to_path_buf(),
                reason: "is already attached to this datapath".into(),
            });
        }
        let flags = (if opts.short_circuit {
            CgroupFlags::MP_CG_SHORTCIRCUIT.0
        } else {
            0
        }) | (if opts.policy {
            CgroupFlags::MP_CG_POLICY.0
        } else {
            0
        });
        let links = self.cgroup_links(&cg, opts).and_then(|links| {
            self.maps()
                .typed::<u64, u32>("meshpath_cgroups")?
                .update(&cg.id(), &flags, || {
                    format!("cgroup {}", cg.path().display())
                })?;
            Ok(links)
        });
        let att = match links {
            Ok(links) => {
                CgroupAttachment::new(self.inner.clone(), cg, links, self.inner.pin_dir.is_some())
            }
            Err(e) => {
                // Links attached so far were dropped (detached) already.
                Datapath::forget_cgroup(&self.inner, cg.id());
                return Err(e);
            }
        };
        if opts.enroll_existing {
            self.enroll_existing()?;
        }
        Ok(att)
    }

    /// Attaches every program `opts` asks for to `cg`; all or nothing
    /// (a failure drops, so detaches, the links made before it).
    ///
    /// With a pin directory each link is pinned there under its hook's
    /// name (`meshpath_link_cg<id>_<hook>`); a link already pinned for that
    /// hook (left by a previous agent) is adopted and switched to this
    /// datapath's program in one step, so enforcement has no gap. Pinned
    /// hooks this attachment no longer wants are detached afterwards.
    fn cgroup_links(
        &self,
        cg: &CgroupDir,
        opts: &AttachOptions,
    ) -> Result<Vec<(&'static str, Link)>> {
        let fd = cg.as_fd().as_raw_fd();
        let i = &self.inner;
        let mut wanted: Vec<(&'static str, &libbpf_rs::ProgramMut<'_>)> = Vec::new();
        // One sockops program per cgroup: with the short-circuit, or the
        // one that only tracks flows for policy (the same hook).
        if opts.short_circuit {
            wanted.push(("sockops", &i.sockops.progs.meshpath_sockops));
            wanted.push(("setsockopt", &i.sockopt.progs.meshpath_setsockopt));
        } else if opts.policy {
            wanted.push(("sockops", &i.sockops.progs.meshpath_sockops_track));
        }
        if opts.policy {
            let c = &i.connect.progs;
            wanted.push(("connect4", &c.meshpath_connect4));
            wanted.push(("connect6", &c.meshpath_connect6));
            wanted.push(("sendmsg4", &c.meshpath_sendmsg4));
            wanted.push(("sendmsg6", &c.meshpath_sendmsg6));
            wanted.push(("ingress", &i.skb.progs.meshpath_ingress));
            wanted.push(("egress", &i.skb.progs.meshpath_egress));
            if !opts.raw_sockets {
                wanted.push(("sock_create", &i.socket.progs.meshpath_sock_create));
                if i.quirks.lsm_cgroup {
                    wanted.push(("socket_create", &i.socket.progs.meshpath_socket_create));
                }
            }
        }
        let target = || format!("cgroup {}", cg.path().display());
        let mut links = Vec::new();
        for (hook, prog) in &wanted {
            let err = |source| Error::Attach {
                program: hook,
                target: target(),
                source,
            };
            let pin = self
                .inner
                .pin_dir
                .as_ref()
                .map(|d| d.join(link_pin_name(cg.id(), hook)));
            let link = match &pin {
                Some(path) if path.exists() => {
                    let mut l = Link::open(path).map_err(err)?;
                    l.update_prog(prog).map_err(err)?;
                    l
                }
                _ => {
                    let mut l = prog.attach_cgroup(fd).map_err(err)?;
                    if let Some(path) = &pin {
                        l.pin(path).map_err(err)?;
                    }
                    l
                }
            };
            links.push((*hook, link));
        }
        if let Some(dir) = &self.inner.pin_dir {
            for hook in CGROUP_HOOKS {
                if !wanted.iter().any(|(h, _)| h == hook) {
                    detach_pinned(&dir.join(link_pin_name(cg.id(), hook)))?;
                }
            }
        }
        Ok(links)
    }

    /// Takes over TCP connections of attached cgroups established before
    /// they were attached (a late start, a restart without pins): each is
    /// judged by policy (a denied one is reset), tracked, and enrolled
    /// into the short-circuit unless a task sleeps in a read or write on
    /// it. A socket taken over keeps sending through TCP until redirecting
    /// can neither overtake its earlier bytes nor strand them behind a
    /// read from before (ARCHITECTURE.md, "Taking over existing sockets").
    /// Covers the caller's network namespace and every namespace a
    /// process of an attached cgroup is in. Attaching does this by default
    /// ([`AttachOptions::enroll_existing`]); sockets already tracked are
    /// left alone, so running it again is harmless.
    pub fn enroll_existing(&self) -> Result<EnrollReport> {
        let mut report = EnrollReport::default();
        for ns in crate::netns::namespaces_of(&self.attached_cgroups())? {
            let part = ns.run(|| self.enroll_here())?;
            report.merge(part);
        }
        Ok(report)
    }

    /// Like [`Datapath::enroll_existing`], in the network namespace at
    /// `netns` only (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`).
    pub fn enroll_existing_in(&self, netns: impl AsRef<Path>) -> Result<EnrollReport> {
        let ns = crate::netns::Netns::open(netns.as_ref())?;
        ns.run(|| self.enroll_here())
    }

    /// The paths of the cgroups attached through this datapath.
    pub fn attached_cgroups(&self) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = self
            .inner
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Runs the enroll iterator in the calling thread's namespace.
    fn enroll_here(&self) -> Result<EnrollReport> {
        let out = self.run_iterator("meshpath_enroll", &self.inner.enroll.progs.meshpath_enroll)?;
        let mut report = EnrollReport {
            namespaces: 1,
            ..EnrollReport::default()
        };
        for mut rec in crate::diag::records(&out)? {
            if rec.outcome == abi::EnrollOutcomeId::MP_ENROLL_DENIED.0
                && self.destroy_reported(&rec).is_ok()
            {
                rec.outcome = abi::EnrollOutcomeId::MP_ENROLL_RESET.0;
            }
            report.push(&rec);
        }
        Ok(report)
    }

    /// Resets, through sock_diag, a socket that an iterator judged denied
    /// but left alone (lib/destroy.h); counted in `policy_resets`. A
    /// socket that closed meanwhile (`ENOENT`) counts as done.
    pub(crate) fn destroy_reported(&self, rec: &abi::EnrollRecord) -> std::io::Result<()> {
        match crate::diag::destroy_tcp(&rec.key, rec.cookie) {
            Ok(()) => {
                self.inner
                    .diag_resets
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates a TCP socket iterator of `prog` in the calling thread's
    /// network namespace, runs it to the end and returns what it wrote.
    pub(crate) fn run_iterator(
        &self,
        program: &'static str,
        prog: &libbpf_rs::ProgramMut<'_>,
    ) -> Result<Vec<u8>> {
        let link = prog.attach().map_err(|source| Error::Attach {
            program,
            target: "a TCP socket iterator".into(),
            source,
        })?;
        let mut it = libbpf_rs::Iter::new(&link).map_err(|source| Error::Attach {
            program,
            target: "a TCP socket iterator (open)".into(),
            source,
        })?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut it, &mut out)
            .map_err(|e| Error::io("running the TCP socket iterator", program, e))?;
        Ok(out)
    }

    pub(crate) fn forget_cgroup(inner: &Inner, id: u64) {
        inner
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// The datapath's counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let mut c = stats::read(&self.inner.maps)?;
        c.policy_resets += self
            .inner
            .diag_resets
            .load(std::sync::atomic::Ordering::Relaxed);
        Ok(c)
    }

    /// Policy verdicts per enforcement point, summed over CPUs.
    pub fn verdicts(&self) -> Result<stats::Verdicts> {
        stats::read_verdicts(&self.inner.maps)
    }

    /// What the load-time probe found about this kernel.
    pub fn quirks(&self) -> &KernelQuirks {
        &self.inner.quirks
    }

    /// Whether this datapath adopted pinned state (maps, and with them the
    /// policy and the sockets of a previous datapath) rather than creating
    /// it.
    pub fn adopted_pins(&self) -> bool {
        self.inner
            .maps
            .get("meshpath_settings")
            .is_some_and(|m| m.adopted)
    }

    /// The datapath's own pins (maps and the sk_msg link) that are missing
    /// from the pin directory: removed from under it. Empty without a pin
    /// directory. Cgroup and XDP links: `CgroupAttachment::missing_pins`,
    /// `XdpAttachment::missing_pin`.
    pub fn missing_pins(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.inner.pin_dir else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = self
            .inner
            .maps
            .names()
            .map(|n| dir.join(n))
            .filter(|p| !p.exists())
            .collect();
        if matches!(self.inner._msg_attach, SockmapAttachment::Link(_)) {
            let p = dir.join(crate::attach::SK_MSG_LINK_PIN);
            if !p.exists() {
                out.push(p);
            }
        }
        out
    }

    /// Pins again what [`Datapath::missing_pins`] lists (recreating the
    /// directory if it went too): the maps and links never went away, this
    /// datapath holds them, so nothing is lost and a later datapath can
    /// adopt them again. Returns the paths pinned.
    pub fn repin(&self) -> Result<Vec<PathBuf>> {
        let Some(dir) = &self.inner.pin_dir else {
            return Ok(Vec::new());
        };
        let missing = self.missing_pins();
        if missing.is_empty() {
            return Ok(missing);
        }
        crate::bpffs::prepare_pin_dir(dir)?;
        // A directory made anew is owned again first.
        if let Some(lock) = &self.inner.pin_lock {
            lock.refresh()?;
        }
        for path in &missing {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name == crate::attach::SK_MSG_LINK_PIN {
                if let SockmapAttachment::Link(link) = &self.inner._msg_attach {
                    maps::pin_fd(link.as_fd(), path)?;
                }
            } else if let Some(m) = self.inner.maps.get(name) {
                maps::pin_fd(m.fd.as_fd(), path)?;
            }
        }
        Ok(missing)
    }

    /// The pin directory, when the maps are pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.inner.pin_dir.as_deref()
    }

    /// Turns enrollment of new sockets on or off at run time. Sockets
    /// already short-circuited stay so until they close.
    pub fn set_short_circuit(&self, on: bool) -> Result<()> {
        self.update_settings(|s| s.shortcircuit = u8::from(on))
    }

    /// Turns the packet hooks' verdict cache on or off at run time
    /// ([`DatapathOptions::verdict_cache`]). Entries stay, but are used
    /// again only while the policy generation they were made under is
    /// live.
    pub fn set_verdict_cache(&self, on: bool) -> Result<()> {
        self.update_settings(|s| s.verdict_cache = u8::from(on))
    }

    /// Read-modify-write of the settings, serialised with every other.
    pub(crate) fn update_settings(&self, f: impl FnOnce(&mut Settings)) -> Result<()> {
        let _g = self
            .inner
            .settings_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut s = read_settings(&self.inner.maps)?;
        f(&mut s);
        write_settings(&self.inner.maps, &s)
    }

    /// Drains the short-circuit: new sockets are not enrolled, every
    /// message from now on takes TCP, and each connection leaves the
    /// SOCKHASH once its queued bytes are read (as soon as TCP segments
    /// flow on it; idle connections leave when they next send or close).
    /// Waits up to `timeout` and returns how many sockets are still in the
    /// SOCKHASH. Nothing is lost or reordered. [`Datapath::undrain`]
    /// resumes.
    pub fn drain(&self, timeout: std::time::Duration) -> Result<usize> {
        self.update_settings(|s| s.draining = 1)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = self.sockhash_len()?;
            if left == 0 || std::time::Instant::now() >= deadline {
                return Ok(left);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Ends a [`Datapath::drain`]: new connections are enrolled again.
    pub fn undrain(&self) -> Result<()> {
        self.update_settings(|s| s.draining = 0)
    }

    /// Keeps connections on `port` off the short-circuit (plain TCP, no
    /// sk_msg cost): for workloads that busy-poll with non-blocking
    /// reads, which the kernel's sk_msg receive path serves slowly (see
    /// ARCHITECTURE.md). Applies to connections established from now on.
    pub fn bypass_port(&self, port: u16, side: PortSide) -> Result<()> {
        if port == 0 {
            return Err(Error::invalid("bypass port", "0 is not a port"));
        }
        let flags = match side {
            PortSide::Local => BypassFlags::MP_BYPASS_F_LOCAL.0,
            PortSide::Remote => BypassFlags::MP_BYPASS_F_REMOTE.0,
            PortSide::Both => BypassFlags::MP_BYPASS_F_LOCAL.0 | BypassFlags::MP_BYPASS_F_REMOTE.0,
        };
        self.inner
            .maps
            .typed::<u32, u32>("meshpath_bypass_ports")?
            .update(&u32::from(port), &flags, || format!("bypass port {port}"))
    }

    /// Puts `port` back on the short-circuit. Returns whether it was bypassed.
    pub fn remove_bypass_port(&self, port: u16) -> Result<bool> {
        self.inner
            .maps
            .typed::<u32, u32>("meshpath_bypass_ports")?
            .delete(&u32::from(port))
    }

    /// The bypassed ports and their sides.
    pub fn bypassed_ports(&self) -> Result<Vec<(u16, PortSide)>> {
        let m = self.inner.maps.typed::<u32, u32>("meshpath_bypass_ports")?;
        let mut out = Vec::new();
        for port in m.keys()? {
            if let Some(f) = m.lookup(&port)? {
                let l = f & BypassFlags::MP_BYPASS_F_LOCAL.0 != 0;
                let r = f & BypassFlags::MP_BYPASS_F_REMOTE.0 != 0;
                let side = match (l, r) {
                    (true, true) => PortSide::Both,
                    (true, false) => PortSide::Local,
                    _ => PortSide::Remote,
                };
                out.push((port as u16, side));
            }
        }
        out.sort_by_key(|(p, _)| *p);
        Ok(out)
    }

    /// Declares `net` as addresses of workloads on this host in other
    /// network namespaces, so that connections to them are short-circuited
    /// (loopback always is).
    pub fn add_local_net(&self, net: IpNet) -> Result<()> {
        let key = lpm_key(net);
        self.inner
            .maps
            .typed::<LpmKey, u32>("meshpath_local_nets")?
            .update(&key, &1, || format!("local net {net}"))
    }

    /// Removes a prefix added with [`Datapath::add_local_net`].
    pub fn remove_local_net(&self, net: IpNet) -> Result<bool> {
        self.inner
            .maps
            .typed::<LpmKey, u32>("meshpath_local_nets")?
            .delete(&lpm_key(net))
    }

    pub(crate) fn maps(&self) -> &MapSet {
        &self.inner.maps
    }
}

fn lpm_key(net: IpNet) -> LpmKey {
    LpmKey {
        prefixlen: net.mapped_prefix_len(),
        addr: abi::ip_to_words(net.addr()),
    }
}

/// What [`Datapath::enroll_existing`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EnrollReport {
    /// Sockets taken over (tracked), whatever happened to them next.
    pub adopted: u64,
    /// Of those, enrolled into the short-circuit.
    pub enrolled: u64,
    /// Reset because policy denies their flow.
    pub reset: u64,
    /// Denied by policy, but the kernel refused to reset them (their
    /// packets are still dropped by the packet hooks).
    pub denied: u64,
    /// The short-circuit map refused them (full): they stay on TCP.
    pub errors: u64,
    /// Left on TCP: a thread was asleep in a read or write on them.
    pub blocked: u64,
    /// Of the enrolled, those whose sockops callbacks the kernel did not
    /// let the iterator turn on (kernels before 6.12 refuse
    /// `TCP_BPF_SOCK_OPS_CB_FLAGS` from a socket iterator): nothing tells
    /// the datapath when they close, so their index entries stay until
    /// [`Datapath::sweep_stale`] (the reference agent sweeps periodically).
    pub no_close_callback: u64,
    /// Network namespaces searched.
    pub namespaces: usize,
    /// Every socket taken over, with what happened to it.
    pub sockets: Vec<AdoptedSocket>,
}

/// One socket [`Datapath::enroll_existing`] took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdoptedSocket {
    /// Its local address.
    pub local: std::net::SocketAddr,
    /// Its peer's address.
    pub remote: std::net::SocketAddr,
    /// What was done with it.
    pub outcome: EnrollOutcome,
}

/// What happened to a socket taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnrollOutcome {
    /// Tracked for policy; both directions stay on TCP.
    Tracked,
    /// In the short-circuit. Its sends take TCP until the peer's
    /// application has read every byte it sent before and no read from
    /// before the takeover can still be waiting inside the plain TCP code
    /// (at least [`DatapathOptions::adopt_settle`]).
    Enrolled,
    /// Policy denies the flow: reset.
    Reset,
    /// Policy denies the flow; the reset failed.
    Denied,
    /// The short-circuit map refused it.
    Error,
    /// A thread was asleep in a read or write on it, inside the kernel's
    /// plain TCP code (which would never see redirected bytes): tracked,
    /// stays on TCP. Also every socket when the kernel hides the address
    /// of `woken_wake_function` (kptr_restrict).
    Blocked,
}

impl EnrollReport {
    fn push(&mut self, rec: &abi::EnrollRecord) {
        use abi::EnrollOutcomeId as O;
        let outcome = match rec.outcome {
            x if x == O::MP_ENROLL_ENROLLED.0 => {
                self.enrolled += 1;
                EnrollOutcome::Enrolled
            }
            x if x == O::MP_ENROLL_RESET.0 => {
                self.reset += 1;
                EnrollOutcome::Reset
            }
            x if x == O::MP_ENROLL_DENIED.0 => {
                self.denied += 1;
                EnrollOutcome::Denied
            }
            x if x == O::MP_ENROLL_ERROR.0 => {
                self.errors += 1;
                EnrollOutcome::Error
            }
            x if x == O::MP_ENROLL_BLOCKED.0 => {
                self.blocked += 1;
                EnrollOutcome::Blocked
            }
            _ => EnrollOutcome::Tracked,
        };
        self.adopted += 1;
        if rec.flags & abi::EnrollFlags::MP_ENROLL_F_NO_CLOSE_CB.0 as u16 != 0 {
            self.no_close_callback += 1;
        }
        self.sockets.push(AdoptedSocket {
            local: rec.key.local(),
            remote: rec.key.remote(),
            outcome,
        });
    }

    fn merge(&mut self, other: EnrollReport) {
        self.adopted += other.adopted;
        self.enrolled += other.enrolled;
        self.reset += other.reset;
        self.denied += other.denied;
        self.errors += other.errors;
        self.blocked += other.blocked;
        self.no_close_callback += other.no_close_callback;
        self.namespaces += other.namespaces;
        self.sockets.extend(other.sockets);
    }
}

/// How to attach to a cgroup.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AttachOptions {
    /// Enroll this cgroup's sockets into the short-circuit (default true).
    /// False keeps the cgroup's workloads on plain TCP.
    pub short_circuit: bool,
    /// Allow attaching to the root of the cgroup hierarchy (default false).
    pub allow_root: bool,
    /// Enforce policy on this cgroup's workloads: at connect/sendmsg and on
    /// every packet they send or receive (default true). While no policy
    /// is set (`Datapath::replace_policy`), everything passes unchecked.
    pub policy: bool,
    /// Take over the cgroup's TCP connections established before this
    /// attach (in the caller's network namespace): judge them, track them,
    /// enroll them when safe (default true; `Datapath::enroll_existing`).
    pub enroll_existing: bool,
    /// Let the cgroup's workloads open raw IP, packet (`AF_PACKET`) and
    /// `AF_XDP` sockets while a policy is in force (default false: such a
    /// `socket()` fails with EPERM). Packet and XDP frames pass no cgroup
    /// hook, and raw IP packets carry whatever source address the workload
    /// writes, so policy could not judge them by the workload's identity.
    /// Packet and XDP sockets are refused where the bpf LSM is active
    /// (`KernelQuirks::lsm_cgroup`); raw IP sockets everywhere.
    pub raw_sockets: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            short_circuit: true,
            allow_root: false,
            policy: true,
            enroll_existing: true,
            raw_sockets: false,
        }
    }
}

impl AttachOptions {
    /// Sets whether the cgroup's sockets are short-circuited.
    pub fn short_circuit(mut self, on: bool) -> Self {
        self.short_circuit = on;
        self
    }

    /// Lets the cgroup's workloads open raw IP, packet and AF_XDP sockets.
    pub fn raw_sockets(mut self, on: bool) -> Self {
        self.raw_sockets = on;
        self
    }

    /// Allows the root cgroup.
    pub fn allow_root(mut self, on: bool) -> Self {
        self.allow_root = on;
        self
    }

    /// Sets whether connections established before the attach are taken
    /// over.
    pub fn enroll_existing(mut self, on: bool) -> Self {
        self.enroll_existing = on;
        self
    }

    /// Sets whether policy is enforced on the cgroup.
    pub fn policy(mut self, on: bool) -> Self {
        self.policy = on;
        self
    }
}

pub(crate) fn read_settings(maps: &MapSet) -> Result<Settings> {
    Ok(maps
        .typed::<u32, Settings>("meshpath_settings")?
        .lookup(&0)?
        .unwrap_or_default())
}

pub(crate) fn write_settings(maps: &MapSet, s: &Settings) -> Result<()> {
    maps.typed::<u32, Settings>("meshpath_settings")?
        .update(&0, s, || "settings".into())
}

/// Opens one object, wires its maps to the shared set (adopting pins or
/// sizing new maps), loads it, and adds the maps it created to the set.
fn load_object<B, O>(
    object: &'static str,
    builder: B,
    maps: &mut MapSet,
    opts: &DatapathOptions,
    pin: Option<&Path>,
) -> Result<Loaded<O::Output>>
where
    B: SkelBuilder<'static, Output = O>,
    O: OpenSkel<'static>,
    O::Output: Skel<'static>,
{
    load_object_with(object, builder, maps, opts, pin, |_| {})
}

/// Loads `bpf/socket.bpf.c`. Its `lsm_cgroup/socket_create` program is
/// left out where the bpf LSM is not active or the kernel refuses the
/// program (before Linux 6.0, or a sandbox that forbids LSM programs):
/// the second result says whether it loaded.
fn load_socket_object(
    maps: &mut MapSet,
    opts: &DatapathOptions,
    pin: Option<&Path>,
) -> Result<(Loaded<skel::socket::SocketSkel<'static>>, bool)> {
    let builder = skel::socket::SocketSkelBuilder::default;
    if probe::bpf_lsm_active() {
        let with_lsm = load_object_with("socket", builder(), maps, opts, pin, |_| {});
        if let Ok(loaded) = with_lsm {
            return Ok((loaded, true));
        }
    }
    let loaded = load_object_with(
        "socket",
        builder(),
        maps,
        opts,
        pin,
        |open: &mut skel::socket::OpenSocketSkel<'static>| {
            open.progs.meshpath_socket_create.set_autoload(false);
        },
    )?;
    Ok((loaded, false))
}

/// [`load_object`], with `prepare` run on the opened object before load
/// (e.g. to leave out a program the kernel cannot take).
fn load_object_with<B, O>(
    object: &'static str,
    builder: B,
    maps: &mut MapSet,
    opts: &DatapathOptions,
    pin: Option<&Path>,
    prepare: impl FnOnce(&mut O),
) -> Result<Loaded<O::Output>>
where
    B: SkelBuilder<'static, Output = O>,
    O: OpenSkel<'static>,
    O::Output: Skel<'static>,
{
    let loaded = skel::open_and_load(object, builder, |open: &mut O| {
        prepare(open);
        for mut m in open.open_object_mut().maps_mut() {
            let name = m.name().to_string_lossy().into_owned();
            if !name.starts_with("meshpath_") {
                continue;
            }
            let reuse = |m: &mut libbpf_rs::OpenMapMut<'_>, fd| {
                m.reuse_fd(fd).map_err(|source| Error::Load {
                    object,
                    source,
                    log: format!("reusing map {name}"),
                })
            };
            if let Some(shared) = maps.get(&name) {
                reuse(&mut m, shared.fd.as_fd())?;
                continue;
            }
            if let Some(dir) = pin {
                let path = dir.join(&name);
                if let Some(fd) = maps::open_pinned(&path)? {
                    check_pinned(&path, &m, fd.as_fd())?;
                    reuse(&mut m, fd.as_fd())?;
                    maps.insert(&name, fd, true)?;
                    if name == "meshpath_settings" {
                        check_pinned_version(&path, maps)?;
                    }
                    continue;
                }
            }
            if let Some(n) = opts.max_entries_for(&name) {
                m.set_max_entries(n).map_err(|source| Error::Load {
                    object,
                    source,
                    log: format!("sizing map {name}"),
                })?;
            }
        }
        Ok(())
    })?;
    for m in loaded.object().maps() {
        let name = m.name().to_string_lossy().into_owned();
        if !name.starts_with("meshpath_") || maps.get(&name).is_some() {
            continue;
        }
        let fd = m
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating the fd of map", &name, e))?;
        maps.insert(&name, fd, false)?;
    }
    Ok(loaded)
}

/// A pinned map is reused only when its layout is the one this build uses.
fn check_pinned(
    path: &Path,
    m: &libbpf_rs::OpenMapMut<'_>,
    fd: std::os::fd::BorrowedFd<'_>,
) -> Result<()> {
    let facts = crate::sys::map_facts(fd).map_err(|e| Error::io("reading map info of", path, e))?;
    let want = (m.map_type() as u32, m.key_size(), m.value_size());
    let have = (facts.map_type, facts.key_size, facts.value_size);
    if want != have {
        return Err(Error::Pinned {
            path: path.to_path_buf(),
            reason: format!(
                "layout (type, key size, value size) is {have:?}, this build of meshpath \
                 uses {want:?}: the pin comes from an incompatible version; remove it \
                 (agent --cleanup) or use another pin directory"
            ),
        });
    }
    Ok(())
}

/// Layout versions of pinned state this build adopts besides its own,
/// and migrates with its first policy change. None: versions 2 and 3
/// (and their programs, which may still run from pinned links) keyed
/// identities on 32-bit numbers.
const MIGRATED_ABI_VERSIONS: &[u32] = &[];

fn check_pinned_version(path: &Path, maps: &MapSet) -> Result<()> {
    let s = read_settings(maps)?;
    if s.abi_version != 0
        && s.abi_version != ABI_VERSION
        && !MIGRATED_ABI_VERSIONS.contains(&s.abi_version)
    {
        let why = if s.abi_version < 4 {
            " (32-bit identity numbers; this build's are 64-bit, in maps of other names)"
        } else {
            ""
        };
        return Err(Error::Pinned {
            path: path.to_path_buf(),
            reason: format!(
                "written by layout version {}{why}, this build uses {ABI_VERSION}: the pins \
                 come from an incompatible version; remove them (agent --cleanup) or use \
                 another pin directory",
                s.abi_version
            ),
        });
    }
    Ok(())
}
