//! The BPF file system, where pinned state lives.

use std::fs;
use std::path::{Path, PathBuf};

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

/// Removes meshpath's pins (`meshpath_*`) from `dir`, then `dir` itself if
/// it is left empty. Returns how many pins were removed. Pinned links
/// (`meshpath_link_*`) are detached first, whoever else holds them; pinned
/// maps are freed once no program or process uses them. Live
/// short-circuited connections keep working until they close.
pub fn remove_pins(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("reading pin directory", dir, e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("reading pin directory", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("meshpath_link_") {
            crate::datapath::detach_pinned(&entry.path())?;
            removed += 1;
        } else if name.starts_with("meshpath_") {
            let p = entry.path();
            fs::remove_file(&p).map_err(|e| Error::io("unpinning", &p, e))?;
            removed += 1;
        }
    }
    if fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
    {
        fs::remove_dir(dir).map_err(|e| Error::io("removing pin directory", dir, e))?;
    }
    Ok(removed)
}
