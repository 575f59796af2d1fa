//! The library's error type: one enum, structured fields, the cause kept.
//!
//! Following the Rust API guidelines, a variant with a cause returns it
//! from `source()` and does not repeat it in its own message: print the
//! chain (`{:#}` with anyhow, or walk `source()`) to see everything.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in meshpath.
///
/// Each variant names what was being done and on what (a field, a path, a
/// map, a kernel feature), so the message alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller lacks the privileges to load BPF programs.
    #[error("meshpath needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to {action}")]
    NotPermitted {
        /// What was refused.
        action: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// The running kernel lacks something the datapath needs.
    #[error("the kernel lacks {feature}: {detail}")]
    KernelFeature {
        /// The feature, named as in kernel config or docs.
        feature: &'static str,
        /// What was observed and what to do about it.
        detail: String,
    },

    /// No cgroup v2 hierarchy is mounted.
    #[error("no cgroup v2 hierarchy is mounted (no `cgroup2` line in /proc/self/mountinfo)")]
    NoCgroup2,

    /// The root of the cgroup hierarchy, refused without
    /// `AttachOptions::allow_root` (it would affect every process).
    #[error("cgroup {path} is the root of the cgroup hierarchy: attaching there affects every process on the host")]
    RootCgroup {
        /// The path given.
        path: PathBuf,
    },

    /// A cgroup path that is not usable.
    #[error("cgroup {path}: {reason}")]
    Cgroup {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },

    /// Input that does not validate: names the field and why.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, option or argument at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// libbpf or the kernel's verifier refused a BPF object.
    #[error("loading BPF object `{object}`{}", if log.is_empty() { String::new() } else { format!(" (libbpf's log ends with: {})", log.replace('\n', " | ")) })]
    Load {
        /// The object (bpf/<object>.bpf.c).
        object: &'static str,
        /// libbpf's error.
        #[source]
        source: libbpf_rs::Error,
        /// The last lines libbpf logged (the verifier's verdict), if any.
        log: String,
    },

    /// Attaching or detaching a program failed.
    #[error("attaching `{program}` to {target}")]
    Attach {
        /// The program.
        program: &'static str,
        /// Where it was being attached.
        target: String,
        /// libbpf's error.
        #[source]
        source: libbpf_rs::Error,
    },

    /// A map operation failed.
    #[error("map `{map}`: {op}")]
    Map {
        /// The map.
        map: &'static str,
        /// What was being done.
        op: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// A map is full: the new entry was not added, the old ones are intact.
    #[error("map `{map}` is full ({max_entries} entries): {what} was not added")]
    MapFull {
        /// The map.
        map: &'static str,
        /// Its capacity.
        max_entries: u32,
        /// What could not be added.
        what: String,
    },

    /// Two identity names derive the same number.
    #[error("identities {first} and {second} both derive the number {number}: rename one of them")]
    IdentityCollision {
        /// The shared number.
        number: u64,
        /// The name known first.
        first: String,
        /// The name refused.
        second: String,
    },

    /// Pinned state that cannot be reused.
    #[error("pinned state in {path}: {reason}")]
    Pinned {
        /// The pin directory or file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },

    /// Another datapath owns the pin directory (it holds the directory's
    /// lock, see [`crate::bpffs::PinLock`]): one owner at a time, so that
    /// what one reports is what is enforced.
    #[error("pin directory {path} is in use by another meshpath datapath{}: one owner at a time; stop it first (or use another pin directory)", match pid { Some(p) => format!(" (process {p})"), None => String::new() })]
    PinDirBusy {
        /// The pin directory.
        path: PathBuf,
        /// The process holding it, when /proc/locks shows it.
        pid: Option<u32>,
    },

    /// An I/O error on a path.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// `Result` with meshpath's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Maps the kernel's answer to a map operation, turning E2BIG/ENOSPC
    /// (a full map) into [`Error::MapFull`].
    pub(crate) fn map(
        map: &'static str,
        op: &'static str,
        max_entries: u32,
        what: impl FnOnce() -> String,
        source: io::Error,
    ) -> Self {
        match source.raw_os_error() {
            Some(libc::E2BIG) | Some(libc::ENOSPC) => Error::MapFull {
                map,
                max_entries,
                what: what(),
            },
            _ => Error::Map { map, op, source },
        }
    }

    /// Re-aims an `Invalid` error at `field` (e.g. a config path such as
    /// `endpoints[1].ip`), keeping what it said: `invalid CIDR: 10.0.0.1/8
    /// has host bits set` becomes `invalid endpoints[1].ip: CIDR 10.0.0.1/8
    /// has host bits set`. Other errors are returned unchanged.
    pub fn at(self, field: impl Into<String>) -> Error {
        match self {
            Error::Invalid { field: old, reason } => Error::Invalid {
                field: field.into(),
                reason: format!("{old} {reason}"),
            },
            other => other,
        }
    }

    /// The errno behind this error, when there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::NotPermitted { source, .. }
            | Error::Io { source, .. }
            | Error::Map { source, .. } => source.raw_os_error(),
            Error::Load { source, .. } | Error::Attach { source, .. } => errno_of(source),
            _ => None,
        }
    }
}

/// The errno class of a libbpf-rs error (libbpf-rs keeps only the kind).
pub(crate) fn errno_of(e: &libbpf_rs::Error) -> Option<i32> {
    match e.kind() {
        libbpf_rs::ErrorKind::PermissionDenied => Some(libc::EPERM),
        libbpf_rs::ErrorKind::NotFound => Some(libc::ENOENT),
        libbpf_rs::ErrorKind::AlreadyExists => Some(libc::EEXIST),
        libbpf_rs::ErrorKind::InvalidInput => Some(libc::EINVAL),
        libbpf_rs::ErrorKind::TooBig => Some(libc::E2BIG),
        libbpf_rs::ErrorKind::Unsupported => Some(libc::EOPNOTSUPP),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_re_aims_invalid_errors_and_keeps_what_they_said() {
        let e = "10.0.0.1/8"
            .parse::<crate::IpNet>()
            .unwrap_err()
            .at("endpoints[1].ip");
        assert_eq!(
            e.to_string(),
            "invalid endpoints[1].ip: CIDR 10.0.0.1/8 has host bits set; the network is 10.0.0.0/8"
        );
        let other = Error::NoCgroup2.at("x");
        assert!(matches!(other, Error::NoCgroup2));
    }
}
