//! The datapath's maps: one kernel map per name, shared by every object.
//!
//! Each `bpf/*.bpf.c` declares the maps it uses (from `bpf/lib/*.h`), so
//! each object file carries its own definition. [`MapSet`] makes them one:
//! the first object that loads creates a map (or adopts a pinned one) and
//! every later object reuses its fd.
//!
//! [`TypedMap`] is the typed view the library uses: key and value sizes are
//! checked against the kernel's map once, at construction.

pub mod sockets;

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use plain::Plain;

use crate::error::{Error, Result};
use crate::sys::{self, MapFacts};

/// Every shared map by name, with its kernel facts.
#[derive(Debug, Default)]
pub(crate) struct MapSet {
    maps: BTreeMap<String, SharedMap>,
}

#[derive(Debug)]
pub(crate) struct SharedMap {
    pub fd: OwnedFd,
    pub facts: MapFacts,
    /// Whether it was adopted from a pin rather than created by us.
    pub adopted: bool,
}

impl MapSet {
    pub(crate) fn get(&self, name: &str) -> Option<&SharedMap> {
        self.maps.get(name)
    }

    pub(crate) fn insert(&mut self, name: &str, fd: OwnedFd, adopted: bool) -> Result<()> {
        let facts = sys::map_facts(fd.as_fd()).map_err(|source| Error::Map {
            map: leak_name(name),
            op: "reading map info",
            source,
        })?;
        self.maps
            .insert(name.to_string(), SharedMap { fd, facts, adopted });
        Ok(())
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.maps.keys().map(String::as_str)
    }

    /// A typed view of map `name`, checking key and value sizes.
    pub(crate) fn typed<K: Plain, V: Plain>(
        &self,
        name: &'static str,
    ) -> Result<TypedMap<'_, K, V>> {
        let m = self.maps.get(name).ok_or_else(|| Error::Map {
            map: name,
            op: "looking up the shared map",
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        })?;
        TypedMap::new(name, m.fd.as_fd(), m.facts)
    }

    /// Pins every map not adopted from `dir` as `<dir>/<name>`.
    pub(crate) fn pin_all(&self, dir: &Path) -> Result<()> {
        for (name, m) in &self.maps {
            if m.adopted {
                continue;
            }
            let path = dir.join(name);
            pin_fd(m.fd.as_fd(), &path)?;
        }
        Ok(())
    }
}

/// Pins `fd` at `path` in bpffs.
pub(crate) fn pin_fd(fd: BorrowedFd<'_>, path: &PathBuf) -> Result<()> {
    use std::os::fd::AsRawFd;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::invalid(
            "pin path",
            format!("{} contains a NUL byte", path.display()),
        )
    })?;
    // SAFETY: `c` is a valid C string and `fd` a live BPF object fd.
    let r = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) };
    if r < 0 {
        return Err(Error::io(
            "pinning at",
            path,
            std::io::Error::from_raw_os_error(-r),
        ));
    }
    Ok(())
}

/// Opens the BPF object pinned at `path`.
pub(crate) fn open_pinned(path: &Path) -> Result<Option<OwnedFd>> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::invalid(
            "pin path",
            format!("{} contains a NUL byte", path.display()),
        )
    })?;
    // SAFETY: `c` is a valid C string.
    let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    if fd < 0 {
        let err = std::io::Error::from_raw_os_error(-fd);
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(Error::io("opening pinned object", path, err));
    }
    // SAFETY: bpf_obj_get returned a fresh fd that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Map names are few and static in practice; errors want `&'static str`.
fn leak_name(name: &str) -> &'static str {
    for known in crate::datapath::KNOWN_MAPS {
        if *known == name {
            return known;
        }
    }
    "meshpath_(unknown)"
}

/// A map seen through key type `K` and value type `V`.
pub(crate) struct TypedMap<'a, K, V> {
    name: &'static str,
    fd: BorrowedFd<'a>,
    max_entries: u32,
    _t: PhantomData<(K, V)>,
}

impl<'a, K: Plain, V: Plain> TypedMap<'a, K, V> {
    fn new(name: &'static str, fd: BorrowedFd<'a>, facts: MapFacts) -> Result<Self> {
        let (ks, vs) = (
            std::mem::size_of::<K>() as u32,
            std::mem::size_of::<V>() as u32,
        );
        let percpu = matches!(
            facts.map_type,
            libbpf_sys::BPF_MAP_TYPE_PERCPU_ARRAY | libbpf_sys::BPF_MAP_TYPE_PERCPU_HASH
        );
        if facts.key_size != ks || (!percpu && facts.value_size != vs) {
            return Err(Error::Map {
                map: name,
                op: "checking key/value sizes",
                source: std::io::Error::other(format!(
                    "kernel map has key {} value {}, library expects key {ks} value {vs}",
                    facts.key_size, facts.value_size
                )),
            });
        }
        Ok(TypedMap {
            name,
            fd,
            max_entries: facts.max_entries,
            _t: PhantomData,
        })
    }

    pub(crate) fn lookup(&self, key: &K) -> Result<Option<V>>
    where
        V: Default,
    {
        sys::lookup(self.fd, key).map_err(|source| Error::Map {
            map: self.name,
            op: "lookup",
            source,
        })
    }

    pub(crate) fn update(&self, key: &K, value: &V, what: impl FnOnce() -> String) -> Result<()> {
        sys::update(self.fd, key, value, u64::from(libbpf_sys::BPF_ANY))
            .map_err(|source| Error::map(self.name, "update", self.max_entries, what, source))
    }

    pub(crate) fn delete(&self, key: &K) -> Result<bool> {
        sys::delete(self.fd, key).map_err(|source| Error::Map {
            map: self.name,
            op: "delete",
            source,
        })
    }

    /// Every (key, value), read in batches where the kernel can.
    pub(crate) fn entries(&self) -> Result<Vec<(K, V)>>
    where
        K: Default + Copy,
        V: Default + Copy,
    {
        sys::entries(self.fd).map_err(|source| Error::Map {
            map: self.name,
            op: "listing entries",
            source,
        })
    }

    /// Writes every (key, value), in batches where the kernel can. A
    /// failure names the element (`what`) and leaves the earlier ones
    /// written; a full map is `Error::MapFull`.
    pub(crate) fn update_many(
        &self,
        items: &[(K, V)],
        what: impl Fn(&K, &V) -> String,
    ) -> Result<()>
    where
        K: Copy,
        V: Copy,
    {
        let keys: Vec<K> = items.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = items.iter().map(|(_, v)| *v).collect();
        sys::update_many(self.fd, &keys, &values).map_err(|(i, source)| {
            let (k, v) = &items[i.min(items.len().saturating_sub(1))];
            Error::map(self.name, "update", self.max_entries, || what(k, v), source)
        })
    }

    /// Deletes every key (each must be present), in batches where the
    /// kernel can.
    pub(crate) fn delete_many(&self, keys: &[K]) -> Result<()> {
        sys::delete_many(self.fd, keys).map_err(|source| Error::Map {
            map: self.name,
            op: "delete",
            source,
        })
    }

    /// Makes the map hold exactly `want` given that it holds `have` (both
    /// in the library's own form): writes what differs or is new, deletes
    /// what is gone. Returns (written, removed).
    pub(crate) fn sync<MK: Ord, MV: PartialEq>(
        &self,
        have: &BTreeMap<MK, MV>,
        want: &BTreeMap<MK, MV>,
        raw: impl Fn(&MK, &MV) -> (K, V),
        raw_key: impl Fn(&MK) -> K,
        what: impl Fn(&K, &V) -> String,
    ) -> Result<(usize, usize)>
    where
        K: Copy,
        V: Copy,
    {
        let (changed, gone) = diff(have, want);
        let writes: Vec<(K, V)> = changed.into_iter().map(|(k, v)| raw(k, v)).collect();
        let removals: Vec<K> = gone.into_iter().map(raw_key).collect();
        self.update_many(&writes, what)?;
        self.delete_many(&removals)?;
        Ok((writes.len(), removals.len()))
    }

    pub(crate) fn keys(&self) -> Result<Vec<K>>
    where
        K: Default + Copy,
    {
        sys::keys(self.fd).map_err(|source| Error::Map {
            map: self.name,
            op: "listing keys",
            source,
        })
    }
}

/// What makes `have` into `want`: the entries of `want` that are new or
/// changed, and the keys of `have` that are gone. Both maps are sorted,
/// so one walk through the two finds it.
fn diff<'a, MK: Ord, MV: PartialEq>(
    have: &'a BTreeMap<MK, MV>,
    want: &'a BTreeMap<MK, MV>,
) -> (Vec<(&'a MK, &'a MV)>, Vec<&'a MK>) {
    use std::cmp::Ordering;
    let (mut changed, mut gone) = (Vec::new(), Vec::new());
    let (mut h, mut w) = (have.iter().peekable(), want.iter().peekable());
    loop {
        let order = match (h.peek(), w.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((hk, _)), Some((wk, _))) => hk.cmp(wk),
        };
        match order {
            Ordering::Less => gone.extend(h.next().map(|(k, _)| k)),
            Ordering::Greater => changed.extend(w.next()),
            Ordering::Equal => {
                if let (Some((_, hv)), Some((k, v))) = (h.next(), w.next()) {
                    if hv != v {
                        changed.push((k, v));
                    }
                }
            }
        }
    }
    (changed, gone)
}

#[cfg(test)]
mod tests {
    use super::diff;
    use std::collections::BTreeMap;

    #[test]
    fn diff_finds_new_changed_and_gone_entries() {
        let have: BTreeMap<u32, char> = [(1, 'a'), (2, 'b'), (4, 'd'), (6, 'f')].into();
        let want: BTreeMap<u32, char> = [(2, 'b'), (3, 'c'), (4, 'D'), (7, 'g')].into();
        let (changed, gone) = diff(&have, &want);
        assert_eq!(changed, vec![(&3, &'c'), (&4, &'D'), (&7, &'g')]);
        assert_eq!(gone, vec![&1, &6]);
        let (changed, gone) = diff(&want, &want);
        assert!(changed.is_empty() && gone.is_empty());
        let empty = BTreeMap::new();
        assert_eq!(diff(&empty, &want).0.len(), 4);
        assert_eq!(diff(&want, &empty).1.len(), 4);
    }
}
