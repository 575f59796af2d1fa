//! Setting the datapath up: checking the cgroups, loading, configuring,
//! attaching (cgroups and XDP), sweeping stale socket entries, and
//! watching that what the agent attached and pinned stays so.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use meshpath::cgroup::{self, CgroupDir};
use meshpath::policy::IdentityKey;
use meshpath::{
    AttachOptions, CgroupAttachment, Datapath, DatapathOptions, PortSide, XdpAttachment,
};

use crate::cli::Args;
use crate::observe::AgentStats;
use crate::output::{one_line, warn};

/// Opens every `--cgroup` before anything is loaded, so that a bad path
/// fails fast and nothing is attached anywhere.
pub(crate) fn validate_cgroups(args: &Args) -> anyhow::Result<Vec<PathBuf>> {
    // Fails with "no cgroup v2 hierarchy is mounted" when there is none.
    let mount = cgroup::cgroup2_mount()?;
    let mut seen: Vec<(u64, PathBuf)> = Vec::new();
    let mut out = Vec::new();
    for path in &args.cgroups {
        let dir = CgroupDir::open(path)?;
        if dir.is_root() && !args.allow_root_cgroup {
            bail!(
                "cgroup {}: is the root of the cgroup v2 hierarchy (mounted at {}); attaching \
                 there affects every process on the host: pass --allow-root-cgroup to do so",
                path.display(),
                mount.display()
            );
        }
        if let Some((_, first)) = seen.iter().find(|(id, _)| *id == dir.id()) {
            warn(&format!(
                "cgroup {} is the same cgroup as {}: attaching once",
                path.display(),
                first.display()
            ));
            continue;
        }
        seen.push((dir.id(), path.clone()));
        out.push(path.clone());
    }
    // A cgroup inside another given one would run the programs twice.
    let canon: Vec<PathBuf> = out
        .iter()
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .collect();
    for (i, inner) in canon.iter().enumerate() {
        for (j, outer) in canon.iter().enumerate() {
            if i != j && inner.starts_with(outer) {
                warn(&format!(
                    "cgroup {} is inside {}: its sockets see both attachments",
                    out[i].display(),
                    out[j].display()
                ));
            }
        }
    }
    Ok(out)
}

/// The identity key of `--identity-key FILE`, or the default one (public:
/// see [`warn_default_identity_key`]).
pub(crate) fn identity_key(args: &Args) -> anyhow::Result<IdentityKey> {
    let Some(path) = &args.identity_key else {
        return Ok(IdentityKey::default());
    };
    let bytes = crate::files::read_file("--identity-key", path, crate::files::SMALL_LIMIT)
        .with_context(|| format!("--identity-key {}", path.display()))?;
    IdentityKey::from_file_contents(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "--identity-key {}: {e} (the file holds 32 or more hex digits, or 16 or more raw \
             bytes)",
            path.display()
        )
    })
}

/// The warning of an agent that runs with the default identity key
/// (printed once it runs, so that a failed start stays one line).
pub(crate) fn warn_default_identity_key(key: &IdentityKey) {
    if key.is_default() {
        warn(
            "running with the default identity key (no --identity-key FILE): it is public, so \
             anyone who can name a workload can search offline for two names with one identity \
             number and have one of them refused; give every node of the cluster the same \
             secret key",
        );
    }
}

pub(crate) fn load_datapath(args: &Args, key: &IdentityKey) -> anyhow::Result<Datapath> {
    let mut opts = DatapathOptions::default().identity_key(key.clone());
    if let Some(dir) = &args.pin {
        opts = opts.pin_dir(dir);
    }
    if let Some(n) = args.max_sockets {
        opts = opts.max_sockets(n);
    }
    if let Some(n) = args.max_conntrack {
        opts = opts.max_conntrack(n);
    }
    if args.no_short_circuit {
        opts = opts.short_circuit(false);
    }
    let dp = Datapath::load(&opts).context("loading the datapath")?;
    for problem in dp.quirks().problems() {
        warn(&problem);
    }
    // Pinned maps keep the size they were made with.
    for m in dp.adopted_size_mismatches() {
        let asked = match m.map.as_str() {
            "meshpath_sockets" | "meshpath_sock_index" if args.max_sockets.is_some() => {
                "--max-sockets asks for"
            }
            ct if ct.starts_with("meshpath_ct") && args.max_conntrack.is_some() => {
                "--max-conntrack asks for"
            }
            _ => "this agent asks for",
        };
        warn(&format!(
            "adopted map {} in {} has {} entries as pinned, {asked} {}: it keeps its pinned \
             size (to resize, stop the agent and run --cleanup, which drops the pinned state)",
            m.map,
            args.pin
                .as_deref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            m.pinned,
            m.requested
        ));
    }
    Ok(dp)
}

pub(crate) fn configure(dp: &Datapath, args: &Args) -> anyhow::Result<()> {
    for &port in &args.bypass_ports {
        dp.bypass_port(port, PortSide::Both)?;
    }
    for &net in &args.local_nets {
        dp.add_local_net(net)?;
    }
    Ok(())
}

/// Attaches the XDP program to every `--xdp` interface (once each). On
/// error the attachments made so far are dropped, i.e. detached.
pub(crate) fn attach_xdp(dp: &Datapath, args: &Args) -> anyhow::Result<Vec<XdpAttachment>> {
    let mut out: Vec<XdpAttachment> = Vec::new();
    for iface in &args.xdp {
        if out.iter().any(|x| x.interface() == iface) {
            warn(&format!("--xdp {iface} given twice: attaching once"));
            continue;
        }
        let x = dp
            .attach_xdp(iface, args.xdp_mode)
            .with_context(|| format!("--xdp {iface} ({} mode)", args.xdp_mode))?;
        out.push(x);
    }
    Ok(out)
}

pub(crate) fn attach(
    dp: &Datapath,
    targets: &[PathBuf],
    args: &Args,
) -> anyhow::Result<Vec<CgroupAttachment>> {
    let opts = AttachOptions::default().allow_root(args.allow_root_cgroup);
    // On error the attachments made so far are dropped, i.e. detached.
    targets
        .iter()
        .map(|p| dp.attach_cgroup_with(p, &opts).map_err(Into::into))
        .collect()
}

/// Removes stale socket-index entries; a failure is a warning.
pub(crate) fn sweep(dp: &Datapath) {
    if let Err(e) = dp.sweep_stale() {
        warn(&format!(
            "sweeping stale socket entries: {}",
            one_line(&e.into())
        ));
    }
}

/// Watches the programs attached to the cgroups: a program detached from
/// under the agent (`bpftool link detach`, `BPF_LINK_DETACH` on a pin, a
/// link switched to another program) is reported and attached again, and
/// counted (`meshpath_agent_reattach_total`).
pub(crate) struct LinkWatch {
    stats: Arc<AgentStats>,
    /// The last failure reported, to report each once.
    last_error: Option<String>,
}

impl LinkWatch {
    pub(crate) fn new(stats: Arc<AgentStats>) -> LinkWatch {
        LinkWatch {
            stats,
            last_error: None,
        }
    }

    pub(crate) fn check(&mut self, attachments: &mut [CgroupAttachment]) {
        let mut failed = None;
        for a in attachments.iter_mut() {
            let cgroup = a.cgroup().display().to_string();
            let severed = match a.severed() {
                Ok(s) if s.is_empty() => continue,
                Ok(s) => s,
                Err(e) => {
                    failed.get_or_insert(format!(
                        "checking the programs attached to cgroup {cgroup}: {}",
                        one_line(&e.into())
                    ));
                    continue;
                }
            };
            let what: Vec<String> = severed
                .iter()
                .map(|s| format!("{} ({})", s.hook, s.reason))
                .collect();
            match a.reattach() {
                Ok(done) => {
                    self.stats
                        .reattached
                        .fetch_add(done.len() as u64, Ordering::Relaxed);
                    warn(&format!(
                        "cgroup {cgroup}: programs detached from under the agent: {}; attached \
                         again",
                        what.join(", ")
                    ));
                }
                Err(e) => {
                    failed.get_or_insert(format!(
                        "cgroup {cgroup}: programs detached from under the agent: {}; attaching \
                         them again failed ({}): they are not enforced there",
                        what.join(", "),
                        one_line(&e.into())
                    ));
                }
            }
        }
        if failed != self.last_error {
            if let Some(msg) = &failed {
                warn(msg);
            }
            self.last_error = failed;
        }
    }
}

/// Watches the pins (with --pin): pins removed from under the agent are
/// reported once and pinned again (the objects never went away: the agent
/// holds them), so the datapath still survives the agent's exit.
#[derive(Default)]
pub(crate) struct PinWatch {
    /// What was missing at the last check, to report each change once.
    last: Vec<PathBuf>,
}

impl PinWatch {
    pub(crate) fn check(
        &mut self,
        dp: &Datapath,
        attachments: &[CgroupAttachment],
        xdp: &[XdpAttachment],
    ) {
        let mut missing = dp.missing_pins();
        for a in attachments {
            missing.extend(a.missing_pins());
        }
        missing.extend(xdp.iter().filter_map(XdpAttachment::missing_pin));
        if missing.is_empty() {
            self.last.clear();
            return;
        }
        let mut failed = None;
        if let Err(e) = dp.repin() {
            failed = Some(e);
        }
        for a in attachments {
            if let Err(e) = a.repin() {
                failed.get_or_insert(e);
            }
        }
        for x in xdp {
            if let Err(e) = x.repin() {
                failed.get_or_insert(e);
            }
        }
        if missing == self.last {
            return;
        }
        let names: Vec<String> = missing
            .iter()
            .map(|p| {
                p.file_name().map_or_else(
                    || p.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let dir = dp
            .pin_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        match failed {
            None => warn(&format!(
                "pins removed from under the agent in {dir}: {}; the datapath kept working \
                 (the agent holds it) and they are pinned again",
                names.join(", ")
            )),
            Some(e) => warn(&format!(
                "pins removed from under the agent in {dir}: {}; the datapath keeps working \
                 while the agent runs, but pinning them again failed ({}): it will not survive \
                 the agent's exit",
                names.join(", "),
                one_line(&e.into())
            )),
        }
        self.last = missing;
    }
}
