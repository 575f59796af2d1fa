//! Thin, errno-preserving wrappers over the bpf(2) map commands.
//!
//! libbpf-rs folds errnos into coarse kinds; the library needs the exact
//! answer (E2BIG means "map full", ENOENT "no such key") to report typed
//! errors, so map operations go through libbpf's low-level API here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use plain::Plain;

fn ret(code: i32) -> io::Result<()> {
    if code < 0 {
        // libbpf >= 1.0 returns -errno directly.
        Err(io::Error::from_raw_os_error(-code))
    } else {
        Ok(())
    }
}

/// Looks up `key`; `Ok(None)` when absent.
pub(crate) fn lookup<K: Plain, V: Plain + Default>(
    fd: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::default();
    // SAFETY: `key` and `value` are valid for the map's key and value
    // sizes, which the typed wrappers check against the map at open.
    let r = unsafe {
        libbpf_sys::bpf_map_lookup_elem(
            fd.as_raw_fd(),
            (key as *const K).cast(),
            (&mut value as *mut V).cast(),
        )
    };
    match ret(r) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Looks up `key` in a per-CPU map: one value per possible CPU.
pub(crate) fn lookup_percpu_u64<K: Plain>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Vec<u64>> {
    let ncpu = possible_cpus()?;
    let mut values = vec![0u64; ncpu];
    // SAFETY: per-CPU values of 8 bytes are laid out one per possible CPU,
    // which is exactly the buffer's length.
    let r = unsafe {
        libbpf_sys::bpf_map_lookup_elem(
            fd.as_raw_fd(),
            (key as *const K).cast(),
            values.as_mut_ptr().cast(),
        )
    };
    ret(r)?;
    Ok(values)
}

/// Inserts or replaces `key` according to `flags` (BPF_ANY, BPF_NOEXIST, ...).
pub(crate) fn update<K: Plain, V: Plain>(
    fd: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    // SAFETY: pointers to live values of the map's key and value sizes.
    ret(unsafe {
        libbpf_sys::bpf_map_update_elem(
            fd.as_raw_fd(),
            (key as *const K).cast(),
            (value as *const V).cast(),
            flags,
        )
    })
}

/// Deletes `key`; `Ok(false)` when it was absent.
pub(crate) fn delete<K: Plain>(fd: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    // SAFETY: pointer to a live value of the map's key size.
    let r = unsafe { libbpf_sys::bpf_map_delete_elem(fd.as_raw_fd(), (key as *const K).cast()) };
    match ret(r) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// All keys of a hash-like map (a snapshot; concurrent changes may be
/// missed or seen, never duplicated within one walk of a stable map).
pub(crate) fn keys<K: Plain + Default + Copy>(fd: BorrowedFd<'_>) -> io::Result<Vec<K>> {
    let mut out = Vec::new();
    let mut cur: Option<K> = None;
    loop {
        let mut next = K::default();
        let prev_ptr = cur
            .as_ref()
            .map_or(std::ptr::null(), |k| (k as *const K).cast());
        // SAFETY: `prev_ptr` is null or points to a key; `next` has room
        // for one key.
        let r = unsafe {
            libbpf_sys::bpf_map_get_next_key(fd.as_raw_fd(), prev_ptr, (&mut next as *mut K).cast())
        };
        match ret(r) {
            Ok(()) => {
                out.push(next);
                cur = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Elements per batch command: large enough that a 100,000-entry map is a
/// few dozen syscalls, small enough that the buffers stay small.
const BATCH: usize = 8192;

fn batch_opts(elem_flags: u64) -> libbpf_sys::bpf_map_batch_opts {
    libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags,
        flags: 0,
    }
}

/// The kernel has no batch command for this map (or none at all).
fn batch_unsupported(e: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524; // the kernel's internal "not supported"
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP)
    )
}

/// Every (key, value) of a hash-like map, read with BPF_MAP_LOOKUP_BATCH
/// (a few syscalls for the whole map) where the kernel has it for the
/// map, key by key otherwise.
pub(crate) fn entries<K: Plain + Default + Copy, V: Plain + Default + Copy>(
    fd: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The batch cursor is opaque: a key for most maps, a 4-byte bucket
    // index for hash maps.
    let cursor_len = std::mem::size_of::<K>().max(8);
    let (mut cursor_in, mut cursor_out) = (vec![0u8; cursor_len], vec![0u8; cursor_len]);
    let opts = batch_opts(0);
    let mut first = true;
    loop {
        let mut count = BATCH as u32;
        let in_ptr = if first {
            std::ptr::null_mut()
        } else {
            cursor_in.as_mut_ptr().cast()
        };
        // SAFETY: the key and value buffers hold `count` elements of the
        // map's key and value sizes (checked by the typed wrappers), the
        // cursors are at least as large as a key, `opts` is initialised.
        let r = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                fd.as_raw_fd(),
                in_ptr,
                cursor_out.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let n = (count as usize).min(BATCH);
        let got = keys[..n].iter().copied().zip(values[..n].iter().copied());
        match ret(r) {
            Ok(()) => {
                out.extend(got);
                cursor_in.copy_from_slice(&cursor_out);
                first = false;
            }
            // The last batch (possibly empty).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(got);
                return Ok(out);
            }
            Err(e) if first && batch_unsupported(&e) => return entries_one_by_one(fd),
            Err(e) => return Err(e),
        }
    }
}

fn entries_one_by_one<K: Plain + Default + Copy, V: Plain + Default + Copy>(
    fd: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for k in keys::<K>(fd)? {
        if let Some(v) = lookup::<K, V>(fd, &k)? {
            out.push((k, v));
        }
    }
    Ok(out)
}

/// Runs a batch command over `len` elements, `BATCH` at a time: `op(start,
/// end, count)` issues it for elements `start..end` and returns libbpf's
/// code, with `count` set to how many it processed. Where the kernel has
/// no such command for the map (the first call says so), `one_by_one`
/// does the whole job instead. On error: the failing element's index.
fn in_batches(
    len: usize,
    mut op: impl FnMut(usize, usize, &mut u32) -> i32,
    one_by_one: impl FnOnce() -> Result<(), (usize, io::Error)>,
) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < len {
        let end = (done + BATCH).min(len);
        let mut count = (end - done) as u32;
        match ret(op(done, end, &mut count)) {
            Ok(()) => done = end,
            Err(e) if done == 0 && count == 0 && batch_unsupported(&e) => return one_by_one(),
            Err(e) => return Err((done + count as usize, e)),
        }
    }
    Ok(())
}

/// Inserts or replaces every element, in order, with BPF_MAP_UPDATE_BATCH
/// where the kernel has it (one by one otherwise). On error, says which
/// element failed (its index) and why; the ones before it are written.
pub(crate) fn update_many<K: Plain, V: Plain>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let opts = batch_opts(u64::from(libbpf_sys::BPF_ANY));
    in_batches(
        keys.len(),
        |start, end, count| {
            // SAFETY: `count` (= end - start) keys and values of the map's
            // sizes follow the pointers; the kernel only reads them.
            unsafe {
                libbpf_sys::bpf_map_update_batch(
                    fd.as_raw_fd(),
                    keys[start..end].as_ptr().cast(),
                    values[start..end].as_ptr().cast(),
                    count,
                    &opts,
                )
            }
        },
        || {
            for (i, (k, v)) in keys.iter().zip(values).enumerate() {
                update(fd, k, v, u64::from(libbpf_sys::BPF_ANY)).map_err(|e| (i, e))?;
            }
            Ok(())
        },
    )
}

/// Deletes every key, with BPF_MAP_DELETE_BATCH where the kernel has it
/// (one by one otherwise). A key already absent is an error (ENOENT) in
/// a batch: callers delete keys they have just read.
pub(crate) fn delete_many<K: Plain>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let opts = batch_opts(0);
    in_batches(
        keys.len(),
        |start, end, count| {
            // SAFETY: `count` (= end - start) keys of the map's key size
            // follow the pointer.
            unsafe {
                libbpf_sys::bpf_map_delete_batch(
                    fd.as_raw_fd(),
                    keys[start..end].as_ptr().cast(),
                    count,
                    &opts,
                )
            }
        },
        || {
            for (i, k) in keys.iter().enumerate() {
                delete(fd, k).map_err(|e| (i, e))?;
            }
            Ok(())
        },
    )
    .map_err(|(_, e)| e)
}

/// Basic facts about a map, read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapFacts {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub id: u32,
}

pub(crate) fn map_facts(fd: BorrowedFd<'_>) -> io::Result<MapFacts> {
    let mut info = libbpf_sys::bpf_map_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_map_info>() as u32;
    // SAFETY: `info` is a zeroed bpf_map_info and `len` its size.
    ret(unsafe { libbpf_sys::bpf_map_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) })?;
    Ok(MapFacts {
        map_type: info.type_,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        map_flags: info.map_flags,
        id: info.id,
    })
}

/// Number of possible CPUs (the stride of per-CPU map values).
pub(crate) fn possible_cpus() -> io::Result<usize> {
    // SAFETY: no arguments; returns a count or -errno.
    let n = unsafe { libbpf_sys::libbpf_num_possible_cpus() };
    if n < 0 {
        Err(io::Error::from_raw_os_error(-n))
    } else {
        Ok(n as usize)
    }
}
