//! Attachment guards: each detaches what it attached when dropped.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use libbpf_rs::{AsRawLibbpf, Link, Program};

use crate::cgroup::CgroupDir;
use crate::datapath::Inner;
use crate::error::{Error, Result};

/// The datapath attached to one cgroup. Dropping it detaches every
/// program it attached there; connections already short-circuited keep
/// working (their sockets stay in the map until they close).
#[must_use = "the programs are detached when this guard is dropped"]
pub struct CgroupAttachment {
    // Links first: they detach before the datapath reference goes.
    links: Vec<HookLink>,
    cgroup: CgroupDir,
    /// Pinned links persist when the guard drops (see `Datapath::load`
    /// with a pin directory); `detach` removes them.
    pinned: bool,
    _datapath: Arc<Inner>,
}

/// One program attached to the cgroup, by a BPF link.
struct HookLink {
    hook: &'static str,
    link: LinkFd,
    /// What the link was made to run, read from it when it was made: to
    /// tell when it no longer does, and to attach it again.
    program: Option<Attached>,
}

/// The program of a cgroup link and how it is attached.
struct Attached {
    prog: OwnedFd,
    prog_id: u32,
    attach_type: u32,
}

/// A link as libbpf-rs made it, or as [`CgroupAttachment::reattach`]
/// made it (`BPF_LINK_CREATE`). Dropping either closes the fd, which
/// detaches the program unless the link is pinned.
enum LinkFd {
    Lib(Link),
    Raw(OwnedFd),
}

impl LinkFd {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            LinkFd::Lib(l) => l.as_fd(),
            LinkFd::Raw(fd) => fd.as_fd(),
        }
    }
}

impl HookLink {
    fn new(hook: &'static str, link: Link) -> HookLink {
        let program = link_info(link.as_fd())
            .ok()
            .and_then(|(_, prog_id, attach_type)| {
                // SAFETY: plain syscall wrapper.
                let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(prog_id) };
                if fd < 0 {
                    return None;
                }
                // SAFETY: a fresh fd nothing else owns.
                let prog = unsafe { OwnedFd::from_raw_fd(fd) };
                Some(Attached {
                    prog,
                    prog_id,
                    attach_type,
                })
            });
        HookLink {
            hook,
            link: LinkFd::Lib(link),
            program,
        }
    }
}

impl std::fmt::Debug for CgroupAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupAttachment")
            .field("cgroup", &self.cgroup.path())
            .field("programs", &self.programs())
            .finish()
    }
}

impl Drop for CgroupAttachment {
    fn drop(&mut self) {
        // The links (if any are left) detach when dropped with `self`;
        // pinned ones stay, and so does the cgroup's entry for them.
        if !self.pinned || self.links.is_empty() {
            self.forget_in_maps();
        }
        crate::datapath::Datapath::forget_cgroup(&self._datapath, self.cgroup.id());
    }
}

impl CgroupAttachment {
    pub(crate) fn new(
        datapath: Arc<Inner>,
        cgroup: CgroupDir,
        links: Vec<(&'static str, Link)>,
        pinned: bool,
    ) -> Self {
        CgroupAttachment {
            links: links
                .into_iter()
                .map(|(hook, link)| HookLink::new(hook, link))
                .collect(),
            cgroup,
            pinned,
            _datapath: datapath,
        }
    }

    /// Whether the programs stay attached (pinned) when this guard drops.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    fn forget_in_maps(&self) {
        if let Some(m) = self._datapath.maps.get("meshpath_cgroups") {
            let _ = crate::sys::delete(std::os::fd::AsFd::as_fd(&m.fd), &self.cgroup.id());
        }
    }

    /// The cgroup directory.
    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    /// The cgroup id.
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup.id()
    }

    /// Names of the programs attached.
    pub fn programs(&self) -> Vec<&'static str> {
        self.links.iter().map(|l| l.hook).collect()
    }

    /// The pins of this attachment's links that are missing (removed from
    /// under the datapath); empty when it is not pinned.
    pub fn missing_pins(&self) -> Vec<std::path::PathBuf> {
        self.pin_paths()
            .into_iter()
            .filter(|(_, p)| !p.exists())
            .map(|(_, p)| p)
            .collect()
    }

    /// Pins again every link whose pin was removed (the links themselves
    /// never went away: this guard holds them); returns the paths pinned.
    pub fn repin(&self) -> Result<Vec<std::path::PathBuf>> {
        let mut done = Vec::new();
        for (i, path) in self.pin_paths() {
            if path.exists() {
                continue;
            }
            crate::maps::pin_fd(self.links[i].link.fd(), &path)?;
            done.push(path);
        }
        Ok(done)
    }

    fn pin_paths(&self) -> Vec<(usize, std::path::PathBuf)> {
        match (&self._datapath.pin_dir, self.pinned) {
            (Some(dir), true) => self
                .links
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    (
                        i,
                        dir.join(crate::datapath::link_pin_name(self.cgroup.id(), l.hook)),
                    )
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The programs of this attachment that are no longer attached to the
    /// cgroup: someone detached their link (`bpftool link detach`,
    /// `BPF_LINK_DETACH` on a pin), switched it to another program, or
    /// the cgroup no longer lists the program (`BPF_PROG_QUERY`). Empty
    /// while everything is in place. [`CgroupAttachment::reattach`] puts
    /// them back.
    pub fn severed(&self) -> Result<Vec<Severed>> {
        let mut out = Vec::new();
        for l in &self.links {
            if let Some(reason) = self.why_severed(l)? {
                out.push(Severed {
                    hook: l.hook,
                    reason,
                });
            }
        }
        Ok(out)
    }

    /// Attaches again every program [`CgroupAttachment::severed`] lists: a
    /// link still on the cgroup is switched back to this datapath's
    /// program (`BPF_LINK_UPDATE`), a detached one is replaced by a new
    /// link (pinned where the old one was, when pinned). Returns what was
    /// re-attached.
    pub fn reattach(&mut self) -> Result<Vec<Severed>> {
        let severed = self.severed()?;
        let cgroup_id = self.cgroup.id();
        let pin_dir = self._datapath.pin_dir.clone().filter(|_| self.pinned);
        let target = format!("cgroup {} (attaching again)", self.cgroup.path().display());
        for s in &severed {
            let Some(l) = self.links.iter_mut().find(|l| l.hook == s.hook) else {
                continue;
            };
            let err = |errno: i32| Error::Attach {
                program: s.hook,
                target: target.clone(),
                source: libbpf_rs::Error::from_raw_os_error(errno),
            };
            // `why_severed` found none for a link whose program is unknown.
            let Some(p) = &l.program else { continue };
            let on_cgroup = link_info(l.link.fd())
                .map_err(|e| err(e.raw_os_error().unwrap_or(libc::EIO)))?
                .0
                == cgroup_id;
            if on_cgroup {
                // SAFETY: plain syscall wrapper on live fds; null options
                // are allowed.
                let r = unsafe {
                    libbpf_sys::bpf_link_update(
                        l.link.fd().as_raw_fd(),
                        p.prog.as_raw_fd(),
                        std::ptr::null(),
                    )
                };
                if r < 0 {
                    return Err(err(-r));
                }
                continue;
            }
            // SAFETY: plain syscall wrapper on live fds; null options are
            // allowed.
            let fd = unsafe {
                libbpf_sys::bpf_link_create(
                    p.prog.as_raw_fd(),
                    self.cgroup.as_fd().as_raw_fd(),
                    p.attach_type,
                    std::ptr::null(),
                )
            };
            if fd < 0 {
                return Err(err(-fd));
            }
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            let link = unsafe { OwnedFd::from_raw_fd(fd) };
            if let Some(dir) = &pin_dir {
                let path = dir.join(crate::datapath::link_pin_name(cgroup_id, s.hook));
                // The old pin, if still there, holds the detached link.
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io("unpinning the detached link", &path, e));
                    }
                    _ => {}
                }
                crate::maps::pin_fd(link.as_fd(), &path)?;
            }
            // The detached link is closed here.
            l.link = LinkFd::Raw(link);
        }
        Ok(severed)
    }

    fn why_severed(&self, l: &HookLink) -> Result<Option<String>> {
        let Some(p) = &l.program else {
            return Err(Error::Attach {
                program: l.hook,
                target: format!(
                    "cgroup {} (the link's program was not known when it was made)",
                    self.cgroup.path().display()
                ),
                source: libbpf_rs::Error::from_raw_os_error(libc::ENOENT),
            });
        };
        let (link_cgroup, link_prog, _) = link_info(l.link.fd())
            .map_err(|e| Error::io("reading the link info of", self.cgroup.path(), e))?;
        if link_cgroup != self.cgroup.id() {
            return Ok(Some("its link was detached".into()));
        }
        if link_prog != p.prog_id {
            return Ok(Some(format!(
                "its link was switched to another program (id {link_prog})"
            )));
        }
        let attached = attached_programs(self.cgroup.as_fd(), p.attach_type)
            .map_err(|e| Error::io("querying the programs attached to", self.cgroup.path(), e))?;
        if !attached.contains(&p.prog_id) {
            return Ok(Some(format!(
                "the cgroup does not list it (programs attached there: {attached:?})"
            )));
        }
        Ok(None)
    }

    /// Detaches now, reporting failures. Dropping detaches too, silently,
    /// unless the links are pinned: then only this does (and unpins them).
    pub fn detach(mut self) -> Result<()> {
        if self.pinned {
            if let Some(dir) = &self._datapath.pin_dir {
                for l in &self.links {
                    let path = dir.join(crate::datapath::link_pin_name(self.cgroup.id(), l.hook));
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        for l in std::mem::take(&mut self.links) {
            // BPF_LINK_DETACH, so that other references (a pin being
            // removed concurrently, another process) cannot keep it.
            // SAFETY: plain syscall wrapper on a link fd this guard owns.
            let r = unsafe { libbpf_sys::bpf_link_detach(l.link.fd().as_raw_fd()) };
            if r < 0 {
                return Err(Error::Attach {
                    program: l.hook,
                    target: format!("cgroup {} (detach)", self.cgroup.path().display()),
                    source: libbpf_rs::Error::from_raw_os_error(-r),
                });
            }
        }
        Ok(())
    }
}

/// A program of a [`CgroupAttachment`] found no longer attached
/// ([`CgroupAttachment::severed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Severed {
    /// The hook (`sockops`, `connect4`, `ingress`, ...).
    pub hook: &'static str,
    /// What was found.
    pub reason: String,
}

/// (cgroup id, program id, attach type) of a cgroup link: the cgroup id
/// is 0 once the link is detached.
fn link_info(link: BorrowedFd<'_>) -> std::io::Result<(u64, u32, u32)> {
    let mut info = libbpf_sys::bpf_link_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_link_info>() as u32;
    // SAFETY: `info` is a zeroed bpf_link_info and `len` its size.
    let r = unsafe { libbpf_sys::bpf_link_get_info_by_fd(link.as_raw_fd(), &mut info, &mut len) };
    if r < 0 {
        return Err(std::io::Error::from_raw_os_error(-r));
    }
    if info.type_ != libbpf_sys::BPF_LINK_TYPE_CGROUP {
        return Ok((0, info.prog_id, 0));
    }
    // SAFETY: a cgroup link's info fills the union's cgroup member.
    let cg = unsafe { info.__bindgen_anon_1.cgroup };
    Ok((cg.cgroup_id, info.prog_id, cg.attach_type))
}

/// The ids of the programs attached directly to the cgroup `cg` for
/// `attach_type` (`BPF_PROG_QUERY`).
fn attached_programs(cg: BorrowedFd<'_>, attach_type: u32) -> std::io::Result<Vec<u32>> {
    // The kernel allows 64 programs per cgroup and hook.
    let mut ids = [0u32; 128];
    // Per-program attach flags: the kernel requires them for
    // BPF_LSM_CGROUP (one hook per attach BTF id; EINVAL without), and
    // kernels before 6.0 know no such field, so only there.
    let mut prog_flags = [0u32; 128];
    // SAFETY: bpf_prog_query_opts is plain data; zeroed is its empty value.
    let mut opts: libbpf_sys::bpf_prog_query_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_prog_query_opts>() as _;
    opts.prog_ids = ids.as_mut_ptr();
    opts.__bindgen_anon_1.prog_cnt = ids.len() as u32;
    if attach_type == libbpf_sys::BPF_LSM_CGROUP {
        opts.prog_attach_flags = prog_flags.as_mut_ptr();
    }
    // SAFETY: `opts` points at `ids` (and `prog_flags`), each of
    // `prog_cnt` u32s, all outliving the call, which writes at most
    // `prog_cnt` entries and updates the count.
    let r = unsafe { libbpf_sys::bpf_prog_query_opts(cg.as_raw_fd(), attach_type, &mut opts) };
    if r < 0 {
        return Err(std::io::Error::from_raw_os_error(-r));
    }
    // SAFETY: prog_cnt is the union member the kernel wrote back.
    let count = unsafe { opts.__bindgen_anon_1.prog_cnt } as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}

/// The sk_msg program attached to the SOCKHASH: a BPF link where the
/// kernel has sockmap links (6.10+), else a legacy attachment that this
/// guard detaches on drop (libbpf-rs's `attach_sockmap` returns none).
pub(crate) enum SockmapAttachment {
    Link(#[allow(dead_code)] Link),
    Legacy {
        prog: OwnedFd,
        map: OwnedFd,
        attach_type: u32,
    },
}

/// Where the sk_msg link is pinned, next to the maps.
pub(crate) const SK_MSG_LINK_PIN: &str = "meshpath_sk_msg_link";

impl SockmapAttachment {
    /// Attaches `prog` as the SOCKHASH's msg verdict program. With a pin
    /// directory whose maps were adopted, the pinned link of the previous
    /// datapath is updated to `prog` (a SOCKHASH takes one msg verdict
    /// program: a second attach would fail with EBUSY); a new link is
    /// pinned there otherwise.
    pub(crate) fn attach(
        prog: &Program<'_>,
        map: BorrowedFd<'_>,
        pin: Option<(&Path, bool)>,
    ) -> Result<Self> {
        let err = |target: String, source| Error::Attach {
            program: "meshpath_sk_msg",
            target,
            source,
        };
        if let Some((dir, adopted)) = pin {
            let path = dir.join(SK_MSG_LINK_PIN);
            if path.exists() {
                if adopted {
                    let mut link = Link::open(&path)
                        .map_err(|e| err(format!("pinned link {}", path.display()), e))?;
                    link.update_prog(prog)
                        .map_err(|e| err(format!("pinned link {} (update)", path.display()), e))?;
                    return Ok(SockmapAttachment::Link(link));
                }
                // A link left by another generation of maps: not ours.
                std::fs::remove_file(&path)
                    .map_err(|e| Error::io("removing stale pin", &path, e))?;
            }
        }
        // SAFETY: the program pointer comes from a loaded libbpf object
        // that outlives this call; `map` is a live map fd.
        let ptr = unsafe {
            libbpf_sys::bpf_program__attach_sockmap(
                prog.as_libbpf_object().as_ptr(),
                map.as_raw_fd(),
            )
        };
        if let Some(ptr) = NonNull::new(ptr) {
            // SAFETY: a non-null link pointer freshly returned by libbpf,
            // owned by nobody else.
            let mut link = unsafe { Link::from_ptr(ptr) };
            if let Some((dir, _)) = pin {
                let path = dir.join(SK_MSG_LINK_PIN);
                link.pin(&path)
                    .map_err(|e| err(format!("pin {}", path.display()), e))?;
            }
            return Ok(SockmapAttachment::Link(link));
        }
        let link_err = std::io::Error::last_os_error();
        // Kernels before sockmap links (< 6.10): the legacy attach, which
        // cannot be pinned.
        let attach_type = prog.attach_type() as u32;
        // SAFETY: plain syscall wrapper on live fds.
        let r = unsafe {
            libbpf_sys::bpf_prog_attach(prog.as_fd().as_raw_fd(), map.as_raw_fd(), attach_type, 0)
        };
        if r < 0 {
            return Err(err(
                format!("meshpath_sockets (link: {link_err})"),
                libbpf_rs::Error::from_raw_os_error(-r),
            ));
        }
        let dup = |fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(|e| Error::io("duplicating fd for", "sk_msg attachment", e))
        };
        Ok(SockmapAttachment::Legacy {
            prog: dup(prog.as_fd())?,
            map: dup(map)?,
            attach_type,
        })
    }
}

impl Drop for SockmapAttachment {
    fn drop(&mut self) {
        if let SockmapAttachment::Legacy {
            prog,
            map,
            attach_type,
        } = self
        {
            // SAFETY: plain syscall wrapper on fds this guard owns.
            unsafe {
                libbpf_sys::bpf_prog_detach2(prog.as_raw_fd(), map.as_raw_fd(), *attach_type);
            }
        }
    }
}
