//! cgroup v2 directories: finding the hierarchy, validating a directory
//! before anything is attached to it, and scoped cgroups that remove
//! themselves (for tests, demos and per-workload isolation).
//!
//! The cgroup2 mount is read from `/proc/self/mountinfo`, never assumed:
//! on hybrid hosts it is `/sys/fs/cgroup/unified`, on pure v2 hosts
//! `/sys/fs/cgroup`.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading", "/proc/self/mountinfo", e))?;
    parse_cgroup2_mount(&text).ok_or(Error::NoCgroup2)
}

/// Finds the first `cgroup2` mount in mountinfo text.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mountpoint> <opts> [optional...] - <fstype> <src> <superopts>"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mountpoint = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// The cgroup v2 directory the calling process belongs to.
pub fn current_cgroup() -> Result<PathBuf> {
    let mount = cgroup2_mount()?;
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Error::io("reading", "/proc/self/cgroup", e))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(Error::NoCgroup2)?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// A validated, open cgroup v2 directory.
#[derive(Debug)]
pub struct CgroupDir {
    path: PathBuf,
    fd: OwnedFd,
    id: u64,
    is_root: bool,
}

impl CgroupDir {
    /// Opens `path`, checking that it exists, is a directory and lives on
    /// a cgroup v2 file system.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let cg_err = |reason: String| Error::Cgroup {
            path: path.clone(),
            reason,
        };
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(cg_err("does not exist".into()))
            }
            Err(e) => return Err(cg_err(format!("cannot be read: {e}"))),
        };
        if !meta.is_dir() {
            return Err(cg_err("is not a directory".into()));
        }
        let fd = nix::fcntl::open(
            &path,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| cg_err(format!("cannot be opened: {e}")))?;
        let st =
            nix::sys::statfs::fstatfs(&fd).map_err(|e| cg_err(format!("statfs failed: {e}")))?;
        #[allow(clippy::useless_conversion)]
        let magic = i64::from(st.filesystem_type().0);
        if magic != CGROUP2_SUPER_MAGIC {
            let hint = cgroup2_mount()
                .map(|m| format!(" (the cgroup v2 hierarchy is mounted at {})", m.display()))
                .unwrap_or_default();
            return Err(cg_err(format!("is not a cgroup v2 directory{hint}")));
        }
        // The root of a cgroup2 mount has no cgroup.type file.
        let is_root = !path.join("cgroup.type").exists();
        Ok(CgroupDir {
            id: meta.ino(),
            path,
            fd,
            is_root,
        })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id (what `bpf_get_current_cgroup_id()` returns).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this is the root of the cgroup v2 hierarchy.
    pub fn is_root(&self) -> bool {
        self.is_root
    }
}

impl AsFd for CgroupDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Moves the process `pid` into the cgroup directory `dir`.
pub fn move_process(dir: &Path, pid: u32) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| Error::io("opening", &procs, e))?;
    f.write_all(format!("{pid}\n").as_bytes())
        .map_err(|e| Error::io("writing a pid to", &procs, e))
}

/// A cgroup created for a scope and removed when it ends.
///
/// Created under the cgroup v2 mount (or a given parent). On drop, any
/// process still inside is moved to the parent and the directory removed,
/// so nothing is left behind even when a test panics.
#[must_use = "the cgroup is removed when this guard is dropped"]
#[derive(Debug)]
pub struct ScopedCgroup {
    path: PathBuf,
    parent: PathBuf,
}

static SCOPE_SEQ: AtomicU64 = AtomicU64::new(0);

impl ScopedCgroup {
    /// Creates `<cgroup2 mount>/<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::new_in(&cgroup2_mount()?, prefix)
    }

    /// Creates `<parent>/<prefix>-<pid>-<n>`.
    pub fn new_in(parent: &Path, prefix: &str) -> Result<Self> {
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid(
                "cgroup name prefix",
                format!("{prefix:?} must be non-empty ASCII letters, digits, '-' or '_'"),
            ));
        }
        CgroupDir::open(parent)?;
        let n = SCOPE_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("{prefix}-{}-{n}", std::process::id()));
        fs::create_dir(&path).map_err(|e| Error::io("creating cgroup", &path, e))?;
        Ok(ScopedCgroup {
            path,
            parent: parent.to_path_buf(),
        })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        move_process(&self.path, pid)
    }

    /// Moves the calling process into this cgroup until the returned guard
    /// drops, when it goes back to where it was. Sockets created meanwhile
    /// belong to this cgroup for their whole life.
    pub fn enter(&self) -> Result<EnteredCgroup> {
        let back = current_cgroup()?;
        move_process(&self.path, std::process::id())?;
        Ok(EnteredCgroup { back })
    }

    /// The pids currently in the cgroup.
    pub fn processes(&self) -> Result<Vec<u32>> {
        let procs = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&procs).map_err(|e| Error::io("reading", &procs, e))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}

impl Drop for ScopedCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(pids) = self.processes() {
                for pid in pids {
                    let _ = move_process(&self.parent, pid);
                }
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                // EBUSY while exiting tasks are still accounted.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    eprintln!(
                        "meshpath: could not remove cgroup {}: {e}",
                        self.path.display()
                    );
                    return;
                }
            }
        }
    }
}

/// The calling process's stay in a [`ScopedCgroup`]; dropping it moves
/// the process back to the cgroup it came from.
#[must_use = "the process leaves the cgroup when this guard is dropped"]
#[derive(Debug)]
pub struct EnteredCgroup {
    back: PathBuf,
}

impl Drop for EnteredCgroup {
    fn drop(&mut self) {
        if let Err(e) = move_process(&self.back, std::process::id()) {
            eprintln!(
                "meshpath: could not move back to {}: {e}",
                self.back.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_line_is_none() {
        let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(text), None);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let text = "41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(text), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn rejects_bad_prefixes_without_touching_the_fs() {
        let err = ScopedCgroup::new_in(Path::new("/nonexistent"), "../x").unwrap_err();
        assert!(err.to_string().contains("cgroup name prefix"), "{err}");
    }
}
