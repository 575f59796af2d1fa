//! The datapath's life: pinned maps adopted by a new load, incompatible
//! pins refused, several cgroups on one datapath, draining. Root only.

mod common;

use std::time::Duration;

use common::*;
use meshpath::cgroup::ScopedCgroup;
use meshpath::{AttachOptions, Datapath, DatapathOptions, Error};

#[test]
fn pinned_maps_are_adopted_by_the_next_load() {
    let pins = PinDir::new("adopt");
    let env = Env::with(
        "pin_adopt",
        DatapathOptions::default().pin_dir(&pins.0),
        AttachOptions::default(),
    );
    assert!(pins.0.join("meshpath_sockets").exists(), "maps are pinned");
    let (mut c, s) = env.pair("127.0.0.2:0");
    let srv = echo_server(s);
    echo_rounds(&mut c, 100, 50);
    let first = env.counters();
    assert!(first.msgs_redirected >= 100);
    // The first datapath goes (its attachment stays pinned); the next one
    // on the same pins sees the same maps: the counters and the live
    // sockets.
    let Env {
        attachment,
        cgroup,
        dp,
        _serial,
    } = env;
    drop(attachment);
    drop(dp);
    let again = Datapath::load(
        &DatapathOptions::default()
            .pin_dir(&pins.0)
            .probe_quirks(false),
    )
    .unwrap();
    assert!(again.adopted_pins());
    let seen = again.counters().unwrap();
    assert_eq!(seen.msgs_redirected, first.msgs_redirected);
    assert_eq!(again.sockhash_len().unwrap(), 2);
    drop(c);
    srv.join().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while again.sockhash_len().unwrap() != 0 {
        assert!(std::time::Instant::now() < deadline, "sockets left");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(again);
    drop(cgroup);
    assert!(meshpath::bpffs::remove_pins(&pins.0).unwrap() >= 7);
    assert!(!pins.0.exists(), "the empty pin directory is removed");
}

#[test]
fn one_datapath_owns_a_pin_directory_at_a_time() {
    require_root();
    let pins = PinDir::new("owner");
    let opts = DatapathOptions::default()
        .pin_dir(&pins.0)
        .probe_quirks(false);
    let cg = ScopedCgroup::new("mp-test-pin-owner").unwrap();
    let dp = Datapath::load(&opts).unwrap();
    let att = dp.attach_cgroup(cg.path()).unwrap();
    let me = std::process::id();
    let busy = |what: &str, r: Result<(), Error>| match r {
        Err(Error::PinDirBusy { path, pid }) => {
            assert_eq!(path, pins.0, "{what}");
            assert_eq!(pid, Some(me), "{what}: the holder is this process");
        }
        Err(e) => panic!("{what}: expected PinDirBusy, got {e}"),
        Ok(()) => panic!("{what}: a second owner of {} was let in", pins.0.display()),
    };
    // A second load, a cleanup: refused while the first lives, in this
    // process as in any other (the lock is per open directory).
    busy("a second load", Datapath::load(&opts).map(|_| ()));
    busy(
        "remove_pins",
        meshpath::bpffs::remove_pins(&pins.0).map(|_| ()),
    );
    let entries = pins.entries();
    // An attachment keeps the datapath, and so the lock.
    drop(dp);
    busy("with an attachment left", Datapath::load(&opts).map(|_| ()));
    assert_eq!(pins.entries(), entries, "nothing was touched");
    drop(att);
    let again = Datapath::load(&opts).expect("the lock went with the datapath");
    assert!(again.adopted_pins());
    drop(again);
    assert!(meshpath::bpffs::remove_pins(&pins.0).unwrap() > 10);
    assert!(!pins.0.exists());
}

#[test]
fn adopted_maps_of_other_sizes_are_reported() {
    require_root();
    let pins = PinDir::new("sizes");
    let opts = DatapathOptions::default()
        .pin_dir(&pins.0)
        .probe_quirks(false);
    let dp = Datapath::load(&opts.clone().max_sockets(1024).max_endpoints(512)).unwrap();
    assert!(dp.adopted_size_mismatches().is_empty(), "nothing adopted");
    drop(dp);
    let dp = Datapath::load(&opts.clone().max_sockets(1024).max_endpoints(512)).unwrap();
    assert!(dp.adopted_pins());
    assert!(dp.adopted_size_mismatches().is_empty(), "the same sizes");
    drop(dp);
    let dp = Datapath::load(&opts).unwrap();
    let got: Vec<(String, u32, u32)> = dp
        .adopted_size_mismatches()
        .iter()
        .map(|m| (m.map.clone(), m.pinned, m.requested))
        .collect();
    // The socket maps (max_sockets) and the endpoint maps (both copies of
    // the prefixes and of the hosts, the identity names: max_endpoints).
    assert_eq!(got.len(), 7, "{got:?}");
    for (map, pinned, requested) in &got {
        let want = match map.as_str() {
            "meshpath_sockets" | "meshpath_sock_index" => (1024, 65_536),
            m if m.starts_with("meshpath_endpoints")
                || m.starts_with("meshpath_hosts")
                || m.starts_with("meshpath_identities") =>
            {
                (512, 16_384)
            }
            other => panic!("{other} is not resized: {got:?}"),
        };
        assert_eq!((*pinned, *requested), want, "{map}");
    }
    let text = dp.adopted_size_mismatches()[0].to_string();
    assert!(text.contains("as pinned"), "{text}");
    drop(dp);
    meshpath::bpffs::remove_pins(&pins.0).unwrap();
}

/// Every BPF link attached to the cgroup at `path`: (link fd, attach
/// type, program id).
fn cgroup_links(path: &std::path::Path) -> Vec<(std::os::fd::OwnedFd, u32, u32)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let cg = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut next = 0u32;
        // SAFETY: plain syscall wrapper with an out parameter.
        if unsafe { libbpf_sys::bpf_link_get_next_id(id, &mut next) } != 0 {
            return out;
        }
        id = next;
        // SAFETY: plain syscall wrapper.
        let fd = unsafe { libbpf_sys::bpf_link_get_fd_by_id(id) };
        if fd < 0 {
            continue;
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut info = libbpf_sys::bpf_link_info::default();
        let mut len = std::mem::size_of::<libbpf_sys::bpf_link_info>() as u32;
        // SAFETY: `info` is a zeroed bpf_link_info and `len` its size.
        let r = unsafe { libbpf_sys::bpf_link_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
        assert_eq!(r, 0);
        if info.type_ != libbpf_sys::BPF_LINK_TYPE_CGROUP {
            continue;
        }
        // SAFETY: the cgroup member is the one a cgroup link fills.
        let c = unsafe { info.__bindgen_anon_1.cgroup };
        if c.cgroup_id == cg {
            out.push((fd, c.attach_type, info.prog_id));
        }
    }
}

#[test]
fn severed_cgroup_links_are_found_and_attached_again() {
    use std::os::fd::AsRawFd;
    let mut env = Env::new("severed_links");
    let att = env.attachment.as_mut().unwrap();
    assert!(att.severed().unwrap().is_empty());
    let programs = att.programs().len();

    // BPF_LINK_DETACH on every link of the cgroup, by id (`bpftool link
    // detach id N`).
    let links = cgroup_links(env.cgroup.path());
    assert_eq!(links.len(), programs);
    for (fd, _, _) in &links {
        // SAFETY: plain syscall wrapper on a live link fd.
        assert_eq!(unsafe { libbpf_sys::bpf_link_detach(fd.as_raw_fd()) }, 0);
    }
    let att = env.attachment.as_mut().unwrap();
    let severed = att.severed().unwrap();
    assert_eq!(severed.len(), programs, "{severed:?}");
    assert!(
        severed.iter().all(|s| s.reason.contains("detached")),
        "{severed:?}"
    );
    // Nothing enrolls meanwhile.
    let before = env.counters();
    drop(env.pair("127.0.0.2:0"));
    assert_eq!(env.counters().since(&before).sockets_enrolled, 0);
    let att = env.attachment.as_mut().unwrap();
    let again = att.reattach().unwrap();
    assert_eq!(again.len(), programs);
    assert!(att.severed().unwrap().is_empty());
    assert_eq!(cgroup_links(env.cgroup.path()).len(), programs);
    let before = env.counters();
    let (mut c, s) = env.pair("127.0.0.2:0");
    let srv = echo_server(s);
    echo_rounds(&mut c, 100, 10);
    assert_eq!(env.counters().since(&before).sockets_enrolled, 2);
    drop(c);
    srv.join().unwrap();
    env.wait_empty(Duration::from_secs(5));

    // A link switched to another program (BPF_LINK_UPDATE with another
    // datapath's sockops program) is switched back.
    let other = Datapath::load(&DatapathOptions::default().probe_quirks(false)).unwrap();
    let other_cg = ScopedCgroup::new("mp-test-severed-other").unwrap();
    let other_att = other.attach_cgroup(other_cg.path()).unwrap();
    let sockops = libbpf_sys::BPF_CGROUP_SOCK_OPS;
    let foreign = cgroup_links(other_cg.path())
        .into_iter()
        .find(|(_, t, _)| *t == sockops)
        .expect("the other sockops link")
        .2;
    // SAFETY: plain syscall wrapper.
    let prog = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(foreign) };
    assert!(prog >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let prog = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(prog) };
    let (ours, _, ours_prog) = cgroup_links(env.cgroup.path())
        .into_iter()
        .find(|(_, t, _)| *t == sockops)
        .expect("our sockops link");
    // SAFETY: plain syscall wrapper on live fds; null options are allowed.
    let r = unsafe {
        libbpf_sys::bpf_link_update(ours.as_raw_fd(), prog.as_raw_fd(), std::ptr::null())
    };
    assert_eq!(r, 0, "BPF_LINK_UPDATE");
    let att = env.attachment.as_mut().unwrap();
    let severed = att.severed().unwrap();
    assert_eq!(severed.len(), 1, "{severed:?}");
    assert_eq!(severed[0].hook, "sockops");
    assert!(
        severed[0]
            .reason
            .contains(&format!("another program (id {foreign})")),
        "{severed:?}"
    );
    att.reattach().unwrap();
    assert!(att.severed().unwrap().is_empty());
    let (_, _, now) = cgroup_links(env.cgroup.path())
        .into_iter()
        .find(|(_, t, _)| *t == sockops)
        .unwrap();
    assert_eq!(now, ours_prog, "our program again, on the same link");
    drop(other_att);
    drop(other);
}

#[test]
fn an_incompatible_pin_is_refused_and_left_alone() {
    require_root();
    let pins = PinDir::new("incompatible");
    std::fs::create_dir_all(&pins.0).ok();
    meshpath::bpffs::ensure_default_mount().unwrap();
    // A map of the right name and the wrong layout, as an older version
    // could have left it.
    let out = std::process::Command::new("bpftool")
        .args([
            "map",
            "create",
            pins.0.join("meshpath_sock_index").to_str().unwrap(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "16",
            "name",
            "meshpath_sock_index",
        ])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool map create: {out:?}");
    let err = Datapath::load(&DatapathOptions::default().pin_dir(&pins.0)).unwrap_err();
    assert!(matches!(err, Error::Pinned { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("meshpath_sock_index") && msg.contains("incompatible"),
        "{msg}"
    );
    assert!(
        pins.0.join("meshpath_sock_index").exists(),
        "the foreign pin is not touched"
    );
}

#[test]
fn a_pin_dir_off_bpffs_is_refused() {
    require_root();
    let dir = std::env::temp_dir().join(format!("meshpath-not-bpffs-{}", std::process::id()));
    let err = Datapath::load(&DatapathOptions::default().pin_dir(&dir)).unwrap_err();
    assert!(
        err.to_string().contains("not on a BPF file system"),
        "{err}"
    );
    assert!(!dir.exists(), "nothing created off bpffs");
    let err = Datapath::load(&DatapathOptions::default().pin_dir("relative/pins")).unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");
}

#[test]
fn two_cgroups_on_one_datapath_talk_through_the_short_circuit() {
    let env = Env::new("two_cgroups_a");
    let other = ScopedCgroup::new("mp-test-two_cgroups_b").unwrap();
    let _att_b = env.dp.attach_cgroup(other.path()).unwrap();
    let before = env.counters();
    // Server in cgroup A, client in cgroup B.
    let l = env.inside(|| std::net::TcpListener::bind("127.0.0.3:0").unwrap());
    let addr = l.local_addr().unwrap();
    let c = {
        let _in = other.enter().unwrap();
        std::net::TcpStream::connect(addr).unwrap()
    };
    let (s, _) = l.accept().unwrap();
    c.set_nodelay(true).unwrap();
    let srv = echo_server(s);
    let mut c = c;
    echo_rounds(&mut c, 512, 100);
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 2, "{d:?}");
    assert!(d.msgs_redirected >= 200, "{d:?}");
    drop(c);
    srv.join().unwrap();
    env.wait_empty(Duration::from_secs(5));
}

#[test]
fn the_root_cgroup_is_refused_without_opt_in() {
    require_root();
    let dp = Datapath::load(&DatapathOptions::default().probe_quirks(false)).unwrap();
    let root = meshpath::cgroup::cgroup2_mount().unwrap();
    let err = dp.attach_cgroup(&root).unwrap_err();
    assert!(
        err.to_string().contains("root of the cgroup hierarchy"),
        "{err}"
    );
    let err = dp.attach_cgroup("/definitely/not/here").unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = dp.attach_cgroup(std::env::temp_dir()).unwrap_err();
    assert!(
        err.to_string().contains("not a cgroup v2 directory"),
        "{err}"
    );
}

#[test]
fn draining_moves_live_connections_to_tcp_without_losing_bytes() {
    let env = Env::new("drain");
    let before = env.counters();
    let (mut c, mut s) = env.pair("127.0.0.4:0");
    // Leave redirected bytes unread in both directions, then drain.
    c.write_all_checked(b"before-drain-c2s|");
    s.write_all_checked(b"before-drain-s2c|");
    let dp = env.dp.clone();
    let drainer = std::thread::spawn(move || dp.drain(Duration::from_secs(10)).unwrap());
    std::thread::sleep(Duration::from_millis(20));
    c.write_all_checked(b"after-drain-c2s");
    s.write_all_checked(b"after-drain-s2c");
    let mut got = [0u8; 32];
    std::io::Read::read_exact(&mut s, &mut got).unwrap();
    assert_eq!(&got, b"before-drain-c2s|after-drain-c2s");
    std::io::Read::read_exact(&mut c, &mut got).unwrap();
    assert_eq!(&got, b"before-drain-s2c|after-drain-s2c");
    // With TCP flowing, both ends leave the short-circuit.
    let srv = echo_server(s);
    echo_rounds(&mut c, 300, 100);
    assert_eq!(drainer.join().unwrap(), 0, "the SOCKHASH emptied");
    let d = env.counters().since(&before);
    assert!(d.fallback_draining >= 1 && d.sockets_evicted == 2, "{d:?}");
    // Nothing new is enrolled while draining; undrain resumes.
    let b2 = env.counters();
    let (c2, s2) = env.pair("127.0.0.4:0");
    assert_eq!(env.counters().since(&b2).sockets_enrolled, 0);
    drop((c2, s2));
    env.dp.undrain().unwrap();
    let (c3, s3) = env.pair("127.0.0.4:0");
    assert_eq!(env.counters().since(&b2).sockets_enrolled, 2);
    drop((c3, s3, c));
    srv.join().unwrap();
    env.wait_empty(Duration::from_secs(5));
}

trait WriteChecked {
    fn write_all_checked(&mut self, b: &[u8]);
}

impl WriteChecked for std::net::TcpStream {
    fn write_all_checked(&mut self, b: &[u8]) {
        std::io::Write::write_all(self, b).unwrap();
    }
}

#[test]
fn one_cgroup_attaches_once_and_nested_cgroups_enroll_once() {
    let env = Env::new("attach_once");
    let err = env.dp.attach_cgroup(env.cgroup.path()).unwrap_err();
    assert!(err.to_string().contains("already attached"), "{err}");
    // A child cgroup attached too: its sockets see both attachments' programs.
    let child = ScopedCgroup::new_in(env.cgroup.path(), "child").unwrap();
    let att = env.dp.attach_cgroup(child.path()).unwrap();
    let before = env.counters();
    let (c, s) = {
        let _in = child.enter().unwrap();
        tcp_pair("127.0.0.5:0")
    };
    let srv = echo_server(s);
    let mut c = c;
    echo_rounds(&mut c, 100, 10);
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_enrolled, 2, "enrolled once each: {d:?}");
    let st = env.dp.socket_state(&c).unwrap().expect("enrolled");
    assert!(st.is_short_circuited(), "{st:?}");
    assert_eq!(st.msgs_redirected, 10);
    drop(c);
    srv.join().unwrap();
    env.wait_empty(Duration::from_secs(5));
    let d = env.counters().since(&before);
    assert_eq!(d.sockets_tracked(), 0, "removed once each: {d:?}");
    // Detaching frees the cgroup for a new attachment.
    drop(att);
    let again = env.dp.attach_cgroup(child.path()).unwrap();
    drop(again);
}

#[test]
fn pinned_attachments_keep_enforcing_with_no_agent_and_are_adopted() {
    use meshpath::policy::{DefaultAction, Endpoint, Rule};
    require_root();
    let pins = PinDir::new("links");
    let cg = ScopedCgroup::new("mp-test-pinned-links").unwrap();
    let fe = "spiffe://mesh.local/ns/shop/sa/frontend";
    let db = "spiffe://mesh.local/ns/db/sa/postgres";
    let l = {
        let _in = cg.enter().unwrap();
        std::net::TcpListener::bind("127.0.0.3:0").unwrap()
    };
    let port = l.local_addr().unwrap().port();
    let state = meshpath::policy::PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new("127.0.0.2", fe).unwrap(),
            Endpoint::new("127.0.0.3", db).unwrap(),
        ],
        policies: vec![Rule::new(fe, db, "tcp", &[port], "allow").unwrap()],
    };
    let connect = |src: &str| -> std::io::Result<std::net::TcpStream> {
        use nix::sys::socket::*;
        let _in = cg.enter().unwrap();
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let src: std::net::SocketAddr = format!("{src}:0").parse().unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrStorage::from(src),
        )?;
        let s = std::net::TcpStream::from(fd);
        let dst: std::net::SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            &SockaddrStorage::from(dst),
        )?;
        Ok(s)
    };
    let eperm = |r: std::io::Result<std::net::TcpStream>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EPERM));
    {
        let dp = Datapath::load(&DatapathOptions::default().pin_dir(&pins.0)).unwrap();
        let att = dp.attach_cgroup(cg.path()).unwrap();
        assert!(att.is_pinned());
        dp.replace_policy(&state).unwrap();
        assert!(connect("127.0.0.2").is_ok());
        assert!(eperm(connect("127.0.0.4")));
        // The agent exits: guard and datapath dropped.
    }
    // No agent runs: the pinned links and maps keep enforcing.
    assert!(connect("127.0.0.2").is_ok(), "still allowed with no agent");
    assert!(eperm(connect("127.0.0.4")), "still denied with no agent");
    // A new agent adopts the pins: same cgroup, no gap, new policy works.
    let dp = Datapath::load(&DatapathOptions::default().pin_dir(&pins.0)).unwrap();
    let before = dp.counters().unwrap();
    let att = dp.attach_cgroup(cg.path()).unwrap();
    assert!(
        eperm(connect("127.0.0.4")),
        "the adopted policy still holds"
    );
    let (c, _s) = {
        let c = connect("127.0.0.2").unwrap();
        let s = l.accept().unwrap();
        (c, s)
    };
    assert!(
        dp.counters().unwrap().since(&before).sockets_enrolled >= 2,
        "the adopted sockops program enrolls"
    );
    drop(c);
    let mut open = state.clone();
    open.default_action = DefaultAction::Allow;
    open.policies.clear();
    dp.replace_policy(&open).unwrap();
    assert!(
        connect("127.0.0.4").is_ok(),
        "the new agent's policy applies"
    );
    // Cleanup detaches and unpins everything.
    drop(att);
    drop(dp);
    assert!(meshpath::bpffs::remove_pins(&pins.0).unwrap() >= 10);
    assert!(!pins.0.exists());
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show", cg.path().to_str().unwrap()])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        !shown.contains("meshpath"),
        "nothing left attached: {shown}"
    );
}

/// The pinned map `name` in `dir`, opened.
fn pinned_map(dir: &std::path::Path, name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(dir.join(name).to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    assert!(fd >= 0, "bpf_obj_get {name}: {fd}");
    // SAFETY: a fresh fd nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Writes `v` at `k` in map `fd` (sizes are the test's to get right).
fn raw_update<K, V>(fd: &std::os::fd::OwnedFd, k: &K, v: &V) {
    use std::os::fd::AsRawFd;
    // SAFETY: pointers to live values of the map's key and value sizes.
    let r = unsafe {
        libbpf_sys::bpf_map_update_elem(
            fd.as_raw_fd(),
            (k as *const K).cast(),
            (v as *const V).cast(),
            0,
        )
    };
    assert_eq!(r, 0, "bpf_map_update_elem");
}

/// Sets the layout version recorded in pinned settings.
fn set_pinned_abi_version(dir: &std::path::Path, version: u32) {
    use std::os::fd::AsRawFd;
    let fd = pinned_map(dir, "meshpath_settings");
    let mut s = meshpath::abi::Settings::default();
    // SAFETY: key 0 and a value buffer of the settings' size.
    let r = unsafe {
        libbpf_sys::bpf_map_lookup_elem(
            fd.as_raw_fd(),
            (&0u32 as *const u32).cast(),
            (&mut s as *mut meshpath::abi::Settings).cast(),
        )
    };
    assert_eq!(r, 0);
    s.abi_version = version;
    raw_update(&fd, &0u32, &s);
}

/// A 60-byte Ethernet frame, IPv4 UDP 198.18.0.1:40000 -> 198.18.0.2:`dport`.
fn udp_frame(dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&46u16.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[198, 18, 0, 1]);
    f[30..34].copy_from_slice(&[198, 18, 0, 2]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[38..40].copy_from_slice(&26u16.to_be_bytes());
    f
}

/// Creates and pins at `dir/name` a hash map with the given key and
/// value sizes (a map an older version left).
fn pin_old_map(dir: &std::path::Path, name: &str, key_size: u32, value_size: u32) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a null name and options are allowed; the fd is owned here.
    let fd = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_HASH,
            std::ptr::null(),
            key_size,
            value_size,
            16,
            std::ptr::null(),
        )
    };
    assert!(fd >= 0, "bpf_map_create: {fd}");
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = std::ffi::CString::new(dir.join(name).to_str().unwrap()).unwrap();
    // SAFETY: a live fd and a NUL-terminated path.
    let r = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), path.as_ptr()) };
    assert_eq!(r, 0, "bpf_obj_pin {name}");
}

#[test]
fn a_pin_of_the_32_bit_identity_era_is_refused_and_its_maps_never_reused() {
    use meshpath::policy::{DefaultAction, Endpoint, PolicyState, Rule};
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    const A: &str = "spiffe://mesh.local/ns/test/sa/a";
    const B: &str = "spiffe://mesh.local/ns/test/sa/b";
    require_root();
    meshpath::bpffs::ensure_default_mount().unwrap();
    let pins = PinDir::new("identity32");
    let opts = DatapathOptions::default()
        .pin_dir(&pins.0)
        .probe_quirks(false);
    let state = PolicyState {
        default_action: DefaultAction::Deny,
        endpoints: vec![
            Endpoint::new("198.18.0.1", A).unwrap(),
            Endpoint::new("198.18.0.2", B).unwrap(),
        ],
        policies: vec![Rule::new(A, B, "udp", &[53], "allow").unwrap()],
    };
    let judged = |dp: &Datapath| {
        (
            dp.test_run_xdp(&udp_frame(53)).unwrap(),
            dp.test_run_xdp(&udp_frame(9)).unwrap(),
        )
    };
    let dp1 = Datapath::load(&opts).unwrap();
    dp1.replace_policy(&state).unwrap();
    assert_eq!(judged(&dp1), (XDP_PASS, XDP_DROP));
    drop(dp1);

    // What version 3 left besides: its maps of 32-bit identities under
    // their old names (policy key 12 bytes, endpoint value 8, names keyed
    // by 4 bytes), and its version in the settings.
    let old = [
        ("meshpath_policy_0", 12, 8),
        ("meshpath_hosts_0", 16, 8),
        ("meshpath_identities", 4, 256),
        ("meshpath_auth", 16, 8),
    ];
    for (name, k, v) in old {
        pin_old_map(&pins.0, name, k, v);
    }
    for version in [2, 3] {
        set_pinned_abi_version(&pins.0, version);
        match Datapath::load(&opts) {
            Err(Error::Pinned { reason, .. }) => assert!(
                reason.contains(&format!("layout version {version}"))
                    && reason.contains("32-bit identity")
                    && reason.contains("--cleanup"),
                "{reason}"
            ),
            other => panic!("expected a refused pin, got {:?}", other.map(|_| ())),
        }
    }
    // Left alone.
    for (name, _, _) in old {
        assert!(pins.0.join(name).exists(), "{name}");
    }

    // Maps of the old names are never opened: with this build's version
    // the pins are adopted, the old maps ignored (their layouts would be
    // refused otherwise), and policy judges as before.
    set_pinned_abi_version(&pins.0, meshpath::abi::ABI_VERSION);
    let dp2 = Datapath::load(&opts).expect("adopted, the old names ignored");
    assert!(dp2.adopted_pins());
    dp2.set_verdict_cache(false).unwrap();
    assert_eq!(judged(&dp2), (XDP_PASS, XDP_DROP));
    dp2.replace_policy(&state).unwrap();
    assert_eq!(judged(&dp2), (XDP_PASS, XDP_DROP));
    drop(dp2);

    // An unknown version is refused, naming it, and left alone.
    set_pinned_abi_version(&pins.0, 99);
    match Datapath::load(&opts) {
        Err(Error::Pinned { reason, .. }) => assert!(reason.contains("99"), "{reason}"),
        other => panic!("expected a refused pin, got {:?}", other.map(|_| ())),
    }
    // --cleanup removes every meshpath pin, the old names included.
    meshpath::bpffs::remove_pins(&pins.0).unwrap();
    for (name, _, _) in old {
        assert!(!pins.0.join(name).exists(), "{name} removed");
    }
}
