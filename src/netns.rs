//! Network namespaces of attached workloads.
//!
//! Socket iterators (`iter/tcp`) see the sockets of one network namespace:
//! the one of the thread that opens the iterator. Pods usually live in
//! their own namespaces, so the library runs its iterators once per
//! namespace of the processes in the attached cgroups (and the caller's),
//! each from a short-lived thread that entered that namespace.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One network namespace, held open.
#[derive(Debug)]
pub(crate) struct Netns {
    /// Where it was found (`/proc/<pid>/ns/net`, or a path the caller gave).
    pub(crate) path: PathBuf,
    pub(crate) file: File,
}

impl Netns {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening network namespace", path, e))?;
        Ok(Netns {
            path: path.to_path_buf(),
            file,
        })
    }

    fn identity(&self) -> Result<(u64, u64)> {
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::io("reading network namespace", &self.path, e))?;
        Ok((m.dev(), m.ino()))
    }

    /// Runs `f` on a thread that entered this namespace; the caller's
    /// thread stays where it is.
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| {
                            Error::io("entering network namespace", &self.path, e.into())
                        })?;
                    f()
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::io(
                        "working in network namespace",
                        &self.path,
                        std::io::Error::other("the thread panicked"),
                    ))
                })
        })
    }
}

/// The caller's namespace first, then every other namespace a process of
/// `cgroups` (or of their descendants) is in, each once. Processes that
/// exit meanwhile are skipped.
pub(crate) fn namespaces_of(cgroups: &[PathBuf]) -> Result<Vec<Netns>> {
    let own = Netns::open(Path::new("/proc/thread-self/ns/net"))?;
    let mut seen = HashSet::from([own.identity()?]);
    let mut out = vec![own];
    let mut dirs: Vec<PathBuf> = cgroups.to_vec();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue; // removed meanwhile
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let Ok(ns) = Netns::open(Path::new(&format!("/proc/{pid}/ns/net"))) else {
                continue; // exited
            };
            if let Ok(id) = ns.identity() {
                if seen.insert(id) {
                    out.push(ns);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_comes_first_and_once() {
        let me = std::process::id();
        let cg = crate::cgroup::current_cgroup();
        // Without a cgroup list only the caller's namespace is returned.
        let ns = namespaces_of(&[]).unwrap();
        assert_eq!(ns.len(), 1);
        assert_eq!(ns[0].path, Path::new("/proc/thread-self/ns/net"));
        // Our own cgroup holds us: our namespace is not listed twice.
        if let Ok(cg) = cg {
            let ns = namespaces_of(&[cg]).unwrap();
            let ours = ns
                .iter()
                .filter(|n| n.path == Path::new(&format!("/proc/{me}/ns/net")))
                .count();
            assert_eq!(ours, 0, "{ns:?}");
        }
    }

    #[test]
    fn a_missing_namespace_names_its_path() {
        let e = Netns::open(Path::new("/proc/0/ns/net")).unwrap_err();
        assert!(e.to_string().contains("/proc/0/ns/net"), "{e}");
    }
}
