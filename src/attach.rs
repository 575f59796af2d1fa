//! Attachment guards: each detaches what it attached when dropped.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
    links: Vec<(&'static str, Link)>,
    cgroup: CgroupDir,
    /// Pinned links persist when the guard drops (see `Datapath::load`
    /// with a pin directory); `detach` removes them.
    pinned: bool,
    _datapath: Arc<Inner>,
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
            links,
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
        self.links.iter().map(|(n, _)| *n).collect()
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
            let (_, link) = &self.links[i];
            crate::maps::pin_fd(link.as_fd(), &path)?;
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
                .map(|(i, (hook, _))| {
                    (
                        i,
                        dir.join(crate::datapath::link_pin_name(self.cgroup.id(), hook)),
                    )
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Detaches now, reporting failures. Dropping detaches too, silently,
    /// unless the links are pinned: then only this does (and unpins them).
    pub fn detach(mut self) -> Result<()> {
        if self.pinned {
            if let Some(dir) = &self._datapath.pin_dir {
                for (hook, _) in &self.links {
                    let path = dir.join(crate::datapath::link_pin_name(self.cgroup.id(), hook));
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        for (name, link) in std::mem::take(&mut self.links) {
            // BPF_LINK_DETACH, so that other references (a pin being
            // removed concurrently, another process) cannot keep it.
            link.detach().map_err(|source| Error::Attach {
                program: name,
                target: format!("cgroup {} (detach)", self.cgroup.path().display()),
                source,
            })?;
        }
        Ok(())
    }
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
