//! Reading the files the agent's flags name (`--config`, `--peers`,
//! `--revoked`, `--cert`, `--key`, `--ca`, `--identity-key`) so that no
//! file can stall it:
//!
//! * only regular files are read: a FIFO (whose `open` waits for a writer
//!   and whose reads wait for data), a device (`/dev/zero` never ends), a
//!   socket or a directory is refused, naming the flag and what it is;
//! * at most a limit per flag ([`CONFIG_LIMIT`], [`REVOKED_LIMIT`],
//!   [`SMALL_LIMIT`]): a larger (or growing) file is refused;
//! * within [`READ_TIMEOUT`]: the open and the read run on a thread of
//!   their own, and a file system that does not answer (a hung network or
//!   FUSE mount, a procfs file that blocks) is given up on; the thread is
//!   left to finish whenever the read returns.
//!
//! Pure (std, libc and anyhow): `tests/agent_auth.rs` includes
//! `auth_certs.rs`, which includes this file.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};

/// `--config` (a policy of 100,000 endpoints is about 10 MiB of JSON).
pub(crate) const CONFIG_LIMIT: u64 = 16 << 20;

/// `--revoked`.
pub(crate) const REVOKED_LIMIT: u64 = 4 << 20;

/// `--peers`, `--cert`, `--key`, `--ca`, `--identity-key`.
pub(crate) const SMALL_LIMIT: u64 = 1 << 20;

/// How long opening and reading one file may take.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the regular file `path` that `flag` names, at most `limit`
/// bytes, within [`READ_TIMEOUT`]. Errors say why without naming the
/// file (callers put `FLAG FILE: ` in front), and name `flag`.
pub(crate) fn read_file(flag: &str, path: &Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let (flag_owned, path_owned) = (flag.to_string(), path.to_path_buf());
    std::thread::Builder::new()
        .name("read-file".into())
        .spawn(move || {
            let _ = tx.send(read_now(&flag_owned, &path_owned, limit));
        })
        .context("starting a thread to read it")?;
    match rx.recv_timeout(READ_TIMEOUT) {
        Ok(r) => r,
        Err(_) => Err(anyhow!(
            "cannot read it: reading it did not finish within {} s (a file system that does \
             not answer?); {flag} takes a regular file",
            READ_TIMEOUT.as_secs()
        )),
    }
}

/// [`read_file`] as UTF-8 text.
pub(crate) fn read_text(flag: &str, path: &Path, limit: u64) -> anyhow::Result<String> {
    String::from_utf8(read_file(flag, path, limit)?)
        .map_err(|e| anyhow!("cannot read it: it is not UTF-8 text ({e})"))
}

fn read_now(flag: &str, path: &Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO does not wait for a writer (it is then
    // refused below); regular files ignore the flag.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .context("cannot read it")?;
    let meta = file.metadata().context("cannot read it")?;
    let ft = meta.file_type();
    let what = if ft.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if ft.is_char_device() {
        Some("a character device")
    } else if ft.is_block_device() {
        Some("a block device")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_dir() {
        Some("a directory")
    } else if !ft.is_file() {
        Some("not a regular file")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(anyhow!(
            "refused: it is {what}, and {flag} takes a regular file"
        ));
    }
    let too_big = || {
        anyhow!(
            "refused: it is larger than {}, the most {flag} takes",
            human(limit)
        )
    };
    if meta.len() > limit {
        return Err(too_big());
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut out)
        .context("cannot read it")?;
    if out.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(out)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}
