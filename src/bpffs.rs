//! The BPF file system, where pinned state lives.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    #[allow(clippy::useless_conversion)]
    nix::sys::statfs::statfs(path)
        .map(|s| i64::from(s.filesystem_type().0) == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
pub fn ensure_default_mount() -> Result<()> {
    let p = Path::new(DEFAULT_BPFFS);
    if is_bpffs(p) {
        return Ok(());
    }
    fs::create_dir_all(p).map_err(|e| Error::io("creating", p, e))?;
    nix::mount::mount(
        Some("bpf"),
        p,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| Error::io("mounting bpffs at", p, std::io::Error::from(e)))
}

/// Makes sure `dir` is a directory on bpffs, creating it (and mounting
/// /sys/fs/bpf when needed). Returns the directory.
pub fn prepare_pin_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.is_absolute() {
        return Err(Error::invalid(
            "pin directory",
            format!("{} must be an absolute path on bpffs", dir.display()),
        ));
    }
    if dir.starts_with(DEFAULT_BPFFS) {
        ensure_default_mount()?;
    }
    // Find the nearest existing ancestor and check it is bpffs before
    // creating anything, so we never litter another file system.
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if !is_bpffs(&probe) {
        return Err(Error::invalid(
            "pin directory",
            format!(
                "{} is not on a BPF file system (mount one with `mount -t bpf bpf {}`)",
                dir.display(),
                DEFAULT_BPFFS
            ),
        ));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io("creating pin directory", dir, e))?;
    Ok(dir.to_path_buf())
}

/// The lock that makes one datapath the owner of a pin directory.
///
/// An exclusive `flock(2)` on a descriptor of the directory itself, held
/// for the owner's life: [`crate::Datapath::load`] takes it (a second load
/// on the same directory, in this process or another, fails with
/// [`Error::PinDirBusy`]) and the datapath holds it until its last clone
/// and attachment are dropped; [`cleanup`] takes it too, so nothing is
/// removed from under a live owner. The kernel releases it when the
/// owner's process dies, however it dies: a dead agent's lock is never
/// stale.
#[derive(Debug)]
pub struct PinLock {
    path: PathBuf,
    /// The locked directory and its (device, inode).
    held: Mutex<(OwnedFd, (u64, u64))>,
}

impl PinLock {
    /// Locks the directory `dir` (which must exist), failing with
    /// [`Error::PinDirBusy`] (naming the holder's pid when /proc/locks
    /// shows it) when another owner holds it.
    pub fn acquire(dir: &Path) -> Result<PinLock> {
        let held = lock_dir(dir)?;
        Ok(PinLock {
            path: dir.to_path_buf(),
            held: Mutex::new(held),
        })
    }

    /// The locked directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the lock is held on the directory now at [`PinLock::path`]
    /// (false when the directory was removed or replaced).
    pub fn is_current(&self) -> bool {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        dir_id(&self.path).is_ok_and(|id| id == held.1)
    }

    /// Locks the directory now at the path again when it was replaced
    /// (removed and created anew: the lock held the old one). Fails with
    /// [`Error::PinDirBusy`] when another owner took the new one.
    pub fn refresh(&self) -> Result<()> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if dir_id(&self.path).is_ok_and(|id| id == held.1) {
            return Ok(());
        }
        let new = lock_dir(&self.path)?;
        let old = std::mem::replace(&mut *held, new);
        unlock(&old.0);
        Ok(())
    }
}

impl Drop for PinLock {
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(|p| p.into_inner());
        // Explicitly: a child forked without exec shares the descriptor.
        unlock(&held.0);
    }
}

fn unlock(fd: &OwnedFd) {
    // SAFETY: flock on a descriptor this lock owns; it reads no memory.
    // A failure leaves nothing to do: closing the fd releases it too.
    unsafe {
        libc::flock(fd.as_raw_fd(), libc::LOCK_UN);
    }
}

fn dir_id(dir: &Path) -> std::io::Result<(u64, u64)> {
    fs::metadata(dir).map(|m| (m.dev(), m.ino()))
}

/// Opens and locks `dir`, making sure the lock is on the directory that
/// is at the path once it is held (a concurrent cleanup may remove it).
fn lock_dir(dir: &Path) -> Result<(OwnedFd, (u64, u64))> {
    for _ in 0..3 {
        let fd = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| Error::io("opening pin directory", dir, e.into()))?;
        // SAFETY: flock on a descriptor we own; it reads no memory.
        let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let st = nix::sys::stat::fstat(&fd)
                    .map_err(|e| Error::io("reading pin directory", dir, e.into()))?;
                return Err(Error::PinDirBusy {
                    path: dir.to_path_buf(),
                    pid: lock_holder(st.st_dev, st.st_ino),
                });
            }
            return Err(Error::io("locking pin directory", dir, err));
        }
        let st = nix::sys::stat::fstat(&fd)
            .map_err(|e| Error::io("reading pin directory", dir, e.into()))?;
        let id = (st.st_dev, st.st_ino);
        match dir_id(dir) {
            Ok(now) if now == id => return Ok((fd, id)),
            // Removed (and maybe made anew) meanwhile: lock what is there.
            _ => {
                unlock(&fd);
                fs::create_dir_all(dir).map_err(|e| Error::io("creating pin directory", dir, e))?;
            }
        }
    }
    Err(Error::io(
        "locking pin directory",
        dir,
        std::io::Error::other("it was removed and made anew three times while being locked"),
    ))
}

/// The pid holding a `flock` on the inode (`dev`, `ino`), from
/// /proc/locks (`1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`).
fn lock_holder(dev: u64, ino: u64) -> Option<u32> {
    let text = fs::read_to_string("/proc/locks").ok()?;
    let want = (
        u64::from(libc::major(dev)),
        u64::from(libc::minor(dev)),
        ino,
    );
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Waiters are listed as `1: -> FLOCK ...`; the holder first.
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let mut id = f.get(5)?.split(':');
        let maj = u64::from_str_radix(id.next()?, 16).ok()?;
        let min = u64::from_str_radix(id.next()?, 16).ok()?;
        let i = id.next()?.parse::<u64>().ok()?;
        ((maj, min, i) == want)
            .then(|| f.get(4)?.parse::<u32>().ok())
            .flatten()
            .filter(|&pid| pid != 0)
    })
}

/// What [`cleanup`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cleanup {
    /// The pins removed (links detached first), by name.
    pub removed: Vec<String>,
    /// What was left alone, by name, with why: not one of the names
    /// meshpath pins under, or not the kind of object that name holds.
    pub left: Vec<(String, String)>,
    /// Whether the directory itself was removed (it was left empty, and
    /// is not a mount point).
    pub removed_dir: bool,
}

/// What a pin name in a pin directory stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinKind {
    Map,
    Link,
}

/// The kind of pin `name` is when it is one of the names the library
/// pins under: the sk_msg link (`meshpath_sk_msg_link`), a cgroup link
/// (`meshpath_link_cg<id>_<hook>`), an XDP link
/// (`meshpath_link_xdp_<netns>_<ifindex>_<mode>`), or else a map
/// (`meshpath_*`: this build's, and those of earlier layouts, which this
/// build no longer opens but a cleanup removes).
fn pin_kind(name: &str) -> Option<PinKind> {
    if name == crate::attach::SK_MSG_LINK_PIN {
        return Some(PinKind::Link);
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = name.strip_prefix("meshpath_link_cg") {
        let (id, hook) = rest.split_once('_')?;
        return (digits(id) && crate::datapath::CGROUP_HOOKS.contains(&hook))
            .then_some(PinKind::Link);
    }
    if let Some(rest) = name.strip_prefix("meshpath_link_xdp_") {
        let mut parts = rest.splitn(3, '_');
        let (ns, ifindex, mode) = (parts.next()?, parts.next()?, parts.next()?);
        return (digits(ns) && digits(ifindex) && matches!(mode, "native" | "generic"))
            .then_some(PinKind::Link);
    }
    if name.starts_with("meshpath_link_") {
        return None;
    }
    (name.len() > "meshpath_".len() && name.starts_with("meshpath_")).then_some(PinKind::Map)
}

/// Removes meshpath's pins from `dir`, then `dir` itself if it is left
/// empty (and is not a mount point such as /sys/fs/bpf). Pinned links are
/// detached first (`BPF_LINK_DETACH`, whoever else holds them); pinned
/// maps are freed once no program or process uses them. Live
/// short-circuited connections keep working until they close.
///
/// Only what the library pins is touched: maps named `meshpath_*` (this
/// layout's and earlier ones') and links named as the library names them
/// (`meshpath_sk_msg_link`, `meshpath_link_cg<id>_<hook>`,
/// `meshpath_link_xdp_<netns>_<ifindex>_<mode>`), each only when the pin
/// holds that kind of object; anything else (another tool's pins, a
/// directory, a symlink, a map under a link's name) is left alone and
/// listed in [`Cleanup::left`]. Refused, removing nothing, while a datapath owns the
/// directory ([`Error::PinDirBusy`]) and when `dir` is not on bpffs.
/// A directory that does not exist is nothing to do.
pub fn cleanup(dir: &Path) -> Result<Cleanup> {
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cleanup::default()),
        Err(e) => return Err(Error::io("reading pin directory", dir, e)),
    };
    if !meta.is_dir() {
        return Err(Error::invalid(
            "pin directory",
            format!("{} is not a directory: nothing removed", dir.display()),
        ));
    }
    if !is_bpffs(dir) {
        return Err(Error::invalid(
            "pin directory",
            format!(
                "{} is not on a BPF file system: meshpath pins nothing there, nothing removed",
                dir.display()
            ),
        ));
    }
    let _lock = PinLock::acquire(dir)?;
    let entries = fs::read_dir(dir).map_err(|e| Error::io("reading pin directory", dir, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("reading pin directory", dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let mut out = Cleanup::default();
    for name in names {
        let path = dir.join(&name);
        let Some(kind) = pin_kind(&name) else {
            out.left
                .push((name, "not a name meshpath pins under".into()));
            continue;
        };
        // Pins are regular files on bpffs; a directory or a symlink of
        // that name is someone else's.
        let is_file = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
        if !is_file {
            out.left.push((name, "not a pinned object".into()));
            continue;
        }
        let fd = crate::maps::open_pinned(&path).ok().flatten();
        let object = fd.as_ref().and_then(object_kind);
        match kind {
            PinKind::Link => {
                let Some(fd) = fd.filter(|_| object == Some(BPF_LINK)) else {
                    out.left.push((name, "not a BPF link".into()));
                    continue;
                };
                // BPF_LINK_DETACH: detaches even while other references
                // remain. A link already detached is fine.
                // SAFETY: plain syscall wrapper on a link fd we own.
                let _ = unsafe { libbpf_sys::bpf_link_detach(fd.as_raw_fd()) };
            }
            PinKind::Map => {
                if object != Some(BPF_MAP) {
                    out.left.push((name, "not a BPF map".into()));
                    continue;
                }
            }
        }
        fs::remove_file(&path).map_err(|e| Error::io("unpinning", &path, e))?;
        out.removed.push(name);
    }
    let empty = fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    if empty && !is_mount_point(dir) {
        fs::remove_dir(dir).map_err(|e| Error::io("removing pin directory", dir, e))?;
        out.removed_dir = true;
    }
    Ok(out)
}

/// Removes meshpath's pins from `dir` ([`cleanup`]); returns how many.
pub fn remove_pins(dir: &Path) -> Result<usize> {
    cleanup(dir).map(|c| c.removed.len())
}

const BPF_LINK: &str = "anon_inode:bpf-link";
const BPF_MAP: &str = "anon_inode:bpf-map";

/// What kind of BPF object `fd` is, as the kernel names its file
/// (`anon_inode:bpf-link`, `anon_inode:bpf-map`, `anon_inode:bpf-prog`).
fn object_kind(fd: &OwnedFd) -> Option<&'static str> {
    let target = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    [BPF_LINK, BPF_MAP]
        .into_iter()
        .find(|k| target.as_os_str() == *k)
}

fn is_mount_point(dir: &Path) -> bool {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match (fs::metadata(dir), fs::metadata(parent)) {
        (Ok(d), Ok(p)) => d.dev() != p.dev() || d.ino() == p.ino(),
        _ => true,
    }
}

/// A map adopted from a pin whose capacity is not the one asked for: the
/// pinned map keeps its size (maps cannot be resized, and replacing it
/// would drop the state the pin exists to keep).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapSizeMismatch {
    /// The map's name (its pin's name).
    pub map: String,
    /// Its `max_entries` (bytes for the event ring).
    pub pinned: u32,
    /// What the options asked for.
    pub requested: u32,
}

impl std::fmt::Display for MapSizeMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} holds {} entries as pinned, {} were asked for",
            self.map, self.pinned, self.requested
        )
    }
}

/// The adopted maps of `maps` whose capacity differs from `opts`.
pub(crate) fn size_mismatches(
    maps: &crate::maps::MapSet,
    opts: &crate::DatapathOptions,
) -> Vec<MapSizeMismatch> {
    maps.names()
        .filter_map(|name| {
            let m = maps.get(name)?;
            let requested = opts.max_entries_for(name)?;
            (m.adopted && m.facts.max_entries != requested).then(|| MapSizeMismatch {
                map: name.to_string(),
                pinned: m.facts.max_entries,
                requested,
            })
        })
        .collect()
}

impl crate::Datapath {
    /// The maps adopted from the pin directory whose capacity differs
    /// from what [`crate::DatapathOptions`] asked for (`max_sockets`,
    /// `max_endpoints`, ...): they keep their pinned size. Empty when
    /// nothing was adopted. Remove the pins (losing their state) to
    /// resize.
    pub fn adopted_size_mismatches(&self) -> &[MapSizeMismatch] {
        &self.inner.resized
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_are_exactly_the_librarys() {
        for ours in [
            "meshpath_sockets",
            "meshpath_settings",
            "meshpath_policy_0",
            "meshpath_identities_v2",
            "meshpath_sk_msg_link",
            "meshpath_link_cg1234_sockops",
            "meshpath_link_cg1_egress",
            "meshpath_link_xdp_4026531840_2_native",
            "meshpath_link_xdp_1_10_generic",
        ] {
            assert!(pin_kind(ours).is_some(), "{ours}");
        }
        assert_eq!(pin_kind("meshpath_sockets"), Some(PinKind::Map));
        assert_eq!(pin_kind("meshpath_link_cg1_sockops"), Some(PinKind::Link));
        for theirs in [
            "",
            "meshpath_",
            "meshpath_link_",
            "meshpath_link_cg_sockops",
            "meshpath_link_cgx_sockops",
            "meshpath_link_cg12_sockopsx",
            "meshpath_link_cg12_",
            "meshpath_link_xdp_1_2_auto",
            "meshpath_link_xdp_1_x_native",
            "meshpath_link_xdp_1_2_native_",
            "cilium_calls",
            "tc",
        ] {
            assert_eq!(pin_kind(theirs), None, "{theirs}");
        }
    }
}
