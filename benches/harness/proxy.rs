//! The sidecar path: two userspace TCP proxies between client and server.
//!
//! `ProxyPair` is two tokio proxies, each a current_thread runtime on its
//! own background thread (like two single-worker sidecars), free to run on
//! any CPU. Each accepted connection opens an upstream connection and the
//! bytes are copied both ways with `copy_bidirectional_with_sizes` (64 KiB
//! buffers). `Haproxy` is the same chain through two haproxy processes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::oneshot;

use super::{accept_within, sys};

/// Copy buffer per direction and connection.
const PROXY_BUF: usize = 64 << 10;

/// One proxy: its thread and the way to stop it.
struct Proxy {
    /// The proxy thread's id, for sched_setaffinity.
    tid: nix::unistd::Pid,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy listening on `listen` that forwards to `upstream`;
    /// returns it and the address it listens on.
    fn start(name: &str, listen: SocketAddr, upstream: SocketAddr) -> Result<(Proxy, SocketAddr)> {
        let l = TcpListener::bind(listen).with_context(|| format!("{name}: bind {listen}"))?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true).context("listener O_NONBLOCK")?;
        let cpus = sys::allowed_cpus()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<nix::unistd::Pid>>();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let setup = || -> Result<(tokio::runtime::Runtime, tokio::net::TcpListener)> {
                    // Not pinned: a sidecar runs wherever the scheduler puts it.
                    sys::unpin(&cpus)?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building the proxy runtime")?;
                    let l = {
                        let _g = rt.enter();
                        tokio::net::TcpListener::from_std(l).context("registering the listener")?
                    };
                    Ok((rt, l))
                };
                let (rt, l) = match setup() {
                    Ok(x) => {
                        let _ = ready_tx.send(Ok(nix::unistd::gettid()));
                        x
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(serve(thread_name, l, upstream, stop_rx));
                // Dropping the runtime cancels every copying task: their
                // sockets close and the ends see EOF.
            })
            .context("spawning a proxy thread")?;
        let tid = ready_rx
            .recv()
            .context("the proxy thread died while starting")?
            .with_context(|| format!("starting {name}"))?;
        Ok((
            Proxy {
                tid,
                stop: Some(stop_tx),
                thread: Some(thread),
            },
            addr,
        ))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("a proxy thread panicked");
            }
        }
    }
}

async fn serve(
    name: String,
    l: tokio::net::TcpListener,
    upstream: SocketAddr,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = l.accept() => match r {
                Ok((down, _)) => {
                    let name = name.clone();
                    tokio::spawn(async move {
                        if let Err(e) = forward(down, upstream).await {
                            // Resets at teardown are expected; anything else is worth a line.
                            if !matches!(
                                e.kind(),
                                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                            ) {
                                eprintln!("{name}: {e}");
                            }
                        }
                    });
                }
                Err(e) => {
                    eprintln!("{name}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn forward(mut down: tokio::net::TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    down.set_nodelay(true)?;
    let mut up = tokio::net::TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, PROXY_BUF, PROXY_BUF).await?;
    Ok(())
}

/// client -> A (`front`) -> B -> server: two tokio proxies, stopped and
/// joined on drop.
pub struct ProxyPair {
    /// Where clients connect (proxy A).
    pub front: SocketAddr,
    /// Proxy B's address.
    pub back: SocketAddr,
    // Drop A before B.
    a: Proxy,
    b: Proxy,
}

impl ProxyPair {
    /// Starts B on `b_listen` forwarding to `server`, then A on `a_listen`
    /// forwarding to B.
    pub fn start(
        a_listen: SocketAddr,
        b_listen: SocketAddr,
        server: SocketAddr,
    ) -> Result<ProxyPair> {
        let (b, back) = Proxy::start("proxy-b", b_listen, server)?;
        let (a, front) = Proxy::start("proxy-a", a_listen, back)?;
        Ok(ProxyPair { front, back, a, b })
    }

    /// Lets both proxy threads run on `cpus` only.
    pub fn set_affinity(&self, cpus: &[usize]) -> Result<()> {
        sys::set_affinity(self.a.tid, cpus).context("proxy A")?;
        sys::set_affinity(self.b.tid, cpus).context("proxy B")
    }
}

/// Two haproxy processes in TCP mode, client -> A -> B -> server, with a
/// generated configuration in a temporary directory; killed on drop.
pub struct Haproxy {
    /// `haproxy -v`, first line.
    pub version: String,
    front: SocketAddr,
    server: TcpListener,
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    dir: PathBuf,
}

impl Haproxy {
    /// The haproxy binary on PATH (`which haproxy`), if any.
    pub fn find() -> Option<PathBuf> {
        let out = Command::new("which").arg("haproxy").output().ok()?;
        if !out.status.success() {
            return None;
        }
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!p.is_empty()).then(|| PathBuf::from(p))
    }

    /// Starts B (forwarding to a server listener on 127.0.0.7), then A
    /// (forwarding to B), each checked with one byte through the chain.
    pub fn start(bin: &Path) -> Result<Haproxy> {
        let version = Command::new(bin)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("meshpath-bench-haproxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let server = TcpListener::bind("127.0.0.7:0").context("bind 127.0.0.7")?;
        let mut h = Haproxy {
            version,
            front: server.local_addr()?,
            server,
            children: Vec::new(),
            logs: Vec::new(),
            dir,
        };
        let b_addr = free_port("127.0.0.9")?;
        let server_addr = h.server.local_addr()?;
        h.spawn(bin, "b", b_addr, server_addr)?;
        h.probe(b_addr).context("haproxy B does not forward")?;
        let a_addr = free_port("127.0.0.8")?;
        h.spawn(bin, "a", a_addr, b_addr)?;
        h.probe(a_addr).context("haproxy A does not forward")?;
        h.front = a_addr;
        Ok(h)
    }

    fn spawn(
        &mut self,
        bin: &Path,
        name: &str,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> Result<()> {
        // haproxy sets TCP_NODELAY on its sockets itself.
        let cfg = format!(
            "global\n    nbthread 1\n    maxconn 1024\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n\
             frontend f_{name}\n    bind {listen}\n    default_backend b_{name}\n\n\
             backend b_{name}\n    server s_{name} {upstream}\n"
        );
        let cfg_path = self.dir.join(format!("{name}.cfg"));
        std::fs::write(&cfg_path, cfg)
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("running {} -db -f {}", bin.display(), cfg_path.display()))?;
        super::interrupt::register_child(child.id(), self.dir.clone());
        self.children.push(child);
        self.logs.push(log_path);
        Ok(())
    }

    /// Waits until the newest process forwards: sends one byte through
    /// the chain starting at `front` and reads it at the server listener.
    fn probe(&mut self, front: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = loop {
            let n = self.children.len() - 1;
            if let Ok(Some(st)) = self.children[n].try_wait() {
                let log = std::fs::read_to_string(&self.logs[n]).unwrap_or_default();
                bail!("haproxy exited with {st}: {log}");
            }
            match TcpStream::connect(front) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => bail!("haproxy does not listen on {front}: {e}"),
            }
        };
        c.write_all(b"p").context("probe write")?;
        let mut s = accept_within(&self.server, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .context("the probe byte never arrived")?;
        if &b != b"p" {
            bail!("the probe byte arrived as {b:?}");
        }
        Ok(())
    }

    /// Lets both haproxy processes (one thread each) run on `cpus` only.
    pub fn set_affinity(&self, cpus: &[usize]) -> Result<()> {
        for c in &self.children {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            sys::set_affinity(pid, cpus).context("haproxy")?;
        }
        Ok(())
    }

    /// A (client, server) pair through both processes.
    pub fn pair(&self, within: Duration) -> Result<(TcpStream, TcpStream)> {
        let c = TcpStream::connect(self.front).context("connect (haproxy A)")?;
        let s = accept_within(&self.server, within)
            .context("waiting for the connection through haproxy")?;
        Ok((c, s))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let pids: Vec<u32> = self.children.iter().map(|c| c.id()).collect();
        super::interrupt::forget_children(&pids);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An address with a port that was free a moment ago.
fn free_port(ip: &str) -> Result<SocketAddr> {
    let l = TcpListener::bind((ip, 0)).with_context(|| format!("bind {ip}"))?;
    Ok(l.local_addr()?)
}
