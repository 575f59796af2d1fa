//! Request/response round trips over a persistent connection.
//!
//! The client writes N bytes, the server reads N and writes them back,
//! the client reads N. A batch starts with a 16-byte header (N, count)
//! sent before the clock starts, so one connection serves every size;
//! the server then echoes `count` messages of N bytes and waits for the
//! next header with a blocking read (a busy-polling server only spins
//! inside a batch, so an idle connection costs no CPU).
//!
//! The client runs on the calling thread, which the caller pins to the
//! client CPU (`World::cpus.0`); the server runs on its own thread, pinned
//! to the same CPU in `Mode::BlockOneCore` and to `World::cpus.1`
//! otherwise.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{sys, Mode, PathKind, Sock, World, SIZES};

/// Longest a batch may take before it counts as a hang.
const STALL: Duration = Duration::from_secs(120);

const MAX_SIZE: usize = SIZES[SIZES.len() - 1];

/// One persistent connection with an echo server in the given mode.
pub struct RttConn {
    pub path: PathKind,
    pub mode: Mode,
    // Field order is drop order: the client closes first.
    client: Client,
    server_ctl: Sock,
    server: Option<JoinHandle<Result<()>>>,
    out: Vec<u8>,
    back: Vec<u8>,
    rounds: u64,
}

enum Client {
    Blocking {
        s: Sock,
        spin: bool,
    },
    Tokio {
        s: TokioSock,
        rt: tokio::runtime::Runtime,
    },
}

enum TokioSock {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl TokioSock {
    /// Registers `s` with the runtime entered on this thread.
    fn from_std(s: Sock) -> io::Result<TokioSock> {
        Ok(match s {
            Sock::Tcp(s) => {
                s.set_nonblocking(true)?;
                TokioSock::Tcp(tokio::net::TcpStream::from_std(s)?)
            }
            Sock::Unix(s) => {
                s.set_nonblocking(true)?;
                TokioSock::Unix(tokio::net::UnixStream::from_std(s)?)
            }
        })
    }
}

impl RttConn {
    /// Connects over `path` and starts the server side of `mode`.
    pub fn new(world: &World, path: PathKind, mode: Mode) -> Result<RttConn> {
        let (c, s) = world.pair(path)?;
        RttConn::with_pair(path, mode, world.cpus, c, s)
    }

    /// Uses an existing (client, server) pair, labelled `path`; the server
    /// runs on `cpus.1` (`cpus.0` in `Mode::BlockOneCore`).
    pub fn with_pair(
        path: PathKind,
        mode: Mode,
        cpus: (usize, usize),
        c: Sock,
        s: Sock,
    ) -> Result<RttConn> {
        let server_ctl = s.try_clone().context("dup of the server socket")?;
        let server_cpu = match mode {
            Mode::BlockOneCore => cpus.0,
            _ => cpus.1,
        };
        let server = std::thread::Builder::new()
            .name(format!("rtt-{}-{}", path.name(), mode.name()))
            .spawn(move || -> Result<()> {
                sys::pin_to(server_cpu)?;
                match mode {
                    Mode::Tokio => serve_tokio(s),
                    Mode::BusyPoll => serve_blocking(s, true),
                    Mode::BlockOneCore | Mode::BlockTwoCores => serve_blocking(s, false),
                }
            })
            .context("spawning an echo server thread")?;
        let client = match mode {
            Mode::Tokio => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building the client runtime")?;
                let s = {
                    let _g = rt.enter();
                    TokioSock::from_std(c).context("registering the client socket")?
                };
                Client::Tokio { s, rt }
            }
            _ => {
                c.set_timeouts(Some(STALL))
                    .context("SO_RCVTIMEO/SO_SNDTIMEO")?;
                Client::Blocking {
                    s: c,
                    spin: mode == Mode::BusyPoll,
                }
            }
        };
        let mut out = vec![0u8; MAX_SIZE];
        for (i, b) in out.iter_mut().enumerate() {
            *b = (i.wrapping_mul(31) >> 3) as u8;
        }
        Ok(RttConn {
            path,
            mode,
            client,
            server_ctl,
            server: Some(server),
            out,
            back: vec![0u8; MAX_SIZE],
            rounds: 0,
        })
    }

    /// Runs `n` round trips of `size` bytes; returns the time they took
    /// (header excluded). The calling thread is the client.
    pub fn run(&mut self, size: usize, n: u64) -> Result<Duration> {
        if !(8..=MAX_SIZE).contains(&size) {
            bail!("message size {size} outside 8..={MAX_SIZE}");
        }
        let first = self.rounds;
        self.rounds += n;
        let hdr = header(size, n);
        let (out, back) = (&mut self.out[..size], &mut self.back[..size]);
        let r = match &mut self.client {
            Client::Blocking { s, spin } => client_blocking(s, *spin, &hdr, out, back, n, first),
            Client::Tokio { s, rt } => rt.block_on(async {
                match tokio::time::timeout(STALL, client_async(s, &hdr, out, back, n, first)).await
                {
                    Ok(r) => r,
                    Err(_) => bail!("no progress for {STALL:?}"),
                }
            }),
        };
        r.with_context(|| {
            format!(
                "{} round trips of {size} B over {} ({})",
                n,
                self.path.name(),
                self.mode.name()
            )
        })
    }
}

impl Drop for RttConn {
    fn drop(&mut self) {
        // EOF (or a reset) for a server blocked on a read or spinning.
        self.server_ctl.shutdown();
        if let Some(t) = self.server.take() {
            if t.join().is_err() {
                eprintln!(
                    "the {} echo server ({}) panicked",
                    self.path.name(),
                    self.mode.name()
                );
            }
        }
    }
}

fn header(size: usize, n: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&(size as u64).to_le_bytes());
    h[8..].copy_from_slice(&n.to_le_bytes());
    h
}

fn parse_header(h: &[u8; 16]) -> io::Result<(usize, u64)> {
    let size = u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) as usize;
    let n = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
    if !(8..=MAX_SIZE).contains(&size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad header: size {size}"),
        ));
    }
    Ok((size, n))
}

fn stamp(out: &mut [u8], round: u64) {
    out[..8].copy_from_slice(&round.to_le_bytes());
}

fn check(back: &[u8], round: u64) -> Result<()> {
    let got = u64::from_le_bytes(back[..8].try_into().expect("8 bytes"));
    if got != round {
        bail!("round {round}: the echo carries round {got}: bytes lost, duplicated or reordered");
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes spinning on recv(MSG_DONTWAIT).
pub fn spin_read_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut off = 0;
    let mut spins = 0u32;
    let mut deadline: Option<Instant> = None;
    while off < buf.len() {
        match recv(fd, &mut buf[off..], MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => off += n,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                spins = spins.wrapping_add(1);
                if spins % 4096 == 0 {
                    let d = *deadline.get_or_insert_with(|| Instant::now() + STALL);
                    if Instant::now() > d {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "spinning receiver stalled",
                        ));
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn client_blocking(
    s: &mut Sock,
    spin: bool,
    hdr: &[u8; 16],
    out: &mut [u8],
    back: &mut [u8],
    n: u64,
    first: u64,
) -> Result<Duration> {
    s.write_all(hdr).context("writing the batch header")?;
    let fd = s.as_raw_fd();
    let t0 = Instant::now();
    for r in first..first + n {
        stamp(out, r);
        s.write_all(out).context("request")?;
        if spin {
            spin_read_exact(fd, back).context("response (spinning)")?;
        } else {
            s.read_exact(back).context("response")?;
        }
        check(back, r)?;
    }
    Ok(t0.elapsed())
}

async fn client_async(
    s: &mut TokioSock,
    hdr: &[u8; 16],
    out: &mut [u8],
    back: &mut [u8],
    n: u64,
    first: u64,
) -> Result<Duration> {
    async fn go<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut S,
        hdr: &[u8; 16],
        out: &mut [u8],
        back: &mut [u8],
        n: u64,
        first: u64,
    ) -> Result<Duration> {
        s.write_all(hdr).await.context("writing the batch header")?;
        let t0 = Instant::now();
        for r in first..first + n {
            stamp(out, r);
            s.write_all(out).await.context("request")?;
            s.read_exact(back).await.context("response")?;
            check(back, r)?;
        }
        Ok(t0.elapsed())
    }
    match s {
        TokioSock::Tcp(s) => go(s, hdr, out, back, n, first).await,
        TokioSock::Unix(s) => go(s, hdr, out, back, n, first).await,
    }
}

/// Reads a batch header; `None` at a clean EOF (or a shutdown).
fn read_header(s: &mut Sock) -> io::Result<Option<(usize, u64)>> {
    let mut h = [0u8; 16];
    match s.read_exact(&mut h) {
        Ok(()) => parse_header(&h).map(Some),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn serve_blocking(mut s: Sock, spin: bool) -> Result<()> {
    let mut buf = vec![0u8; MAX_SIZE];
    let fd = s.as_raw_fd();
    while let Some((size, n)) = read_header(&mut s).context("echo server: header")? {
        let buf = &mut buf[..size];
        for _ in 0..n {
            if spin {
                spin_read_exact(fd, buf).context("echo server: request (spinning)")?;
            } else {
                s.read_exact(buf).context("echo server: request")?;
            }
            s.write_all(buf).context("echo server: response")?;
        }
    }
    Ok(())
}

fn serve_tokio(s: Sock) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the server runtime")?;
    async fn go<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<()> {
        let mut buf = vec![0u8; MAX_SIZE];
        let mut h = [0u8; 16];
        loop {
            match s.read_exact(&mut h).await {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e).context("echo server: header"),
            }
            let (size, n) = parse_header(&h)?;
            let buf = &mut buf[..size];
            for _ in 0..n {
                s.read_exact(buf).await.context("echo server: request")?;
                s.write_all(buf).await.context("echo server: response")?;
            }
        }
    }
    rt.block_on(async move {
        match TokioSock::from_std(s).context("registering the server socket")? {
            TokioSock::Tcp(s) => go(s).await,
            TokioSock::Unix(s) => go(s).await,
        }
    })
}
