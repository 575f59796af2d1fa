//! One-direction streaming over a persistent connection.
//!
//! The writer (the calling thread, pinned by the caller to the client CPU)
//! writes fixed-size blocks; a reader thread on the other CPU reads into a
//! 256 KiB buffer. A batch ends when the reader has received every byte
//! written. The byte count and a cheap checksum are verified after every
//! batch: each block carries its sequence number in its first 8 bytes and
//! the reader sums the stream as little-endian 64-bit words (every block
//! size is a multiple of 8, so the writer knows the expected sum without
//! reading its own data).

use std::io::Read;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{sys, PathKind, Sock, World, SIZES};

const READ_BUF: usize = 256 << 10;
const MAX_WRITE: usize = SIZES[SIZES.len() - 1];
const STALL: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Progress {
    received: AtomicU64,
    sum: AtomicU64,
    target: AtomicU64,
    failed: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Progress {
    fn wake(&self) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }
}

/// Sum of the little-endian u64 words of a byte stream fed in pieces.
#[derive(Default)]
struct WordSum {
    sum: u64,
    carry: [u8; 8],
    carry_len: usize,
}

impl WordSum {
    fn update(&mut self, mut d: &[u8]) {
        if self.carry_len > 0 {
            let take = (8 - self.carry_len).min(d.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&d[..take]);
            self.carry_len += take;
            d = &d[take..];
            if self.carry_len < 8 {
                return;
            }
            self.sum = self.sum.wrapping_add(u64::from_le_bytes(self.carry));
            self.carry_len = 0;
        }
        let chunks = d.chunks_exact(8);
        let rem = chunks.remainder();
        let mut s = 0u64;
        for c in chunks {
            s = s.wrapping_add(u64::from_le_bytes(c.try_into().expect("8-byte chunk")));
        }
        self.sum = self.sum.wrapping_add(s);
        self.carry[..rem.len()].copy_from_slice(rem);
        self.carry_len = rem.len();
    }

    fn finish(&self) -> u64 {
        let mut last = [0u8; 8];
        last[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
        self.sum.wrapping_add(u64::from_le_bytes(last))
    }
}

fn word_sum(d: &[u8]) -> u64 {
    let mut w = WordSum::default();
    w.update(d);
    w.finish()
}

/// A persistent one-way stream with a reader thread.
pub struct StreamConn {
    pub path: PathKind,
    writer: Option<Sock>,
    reader_ctl: Sock,
    reader: Option<JoinHandle<Result<(u64, u64)>>>,
    progress: Arc<Progress>,
    block: Vec<u8>,
    /// Word sum of `block[..size]` (first word zero) per size in SIZES.
    base: Vec<(usize, u64)>,
    seq: u64,
    sent: u64,
    expected_sum: u64,
}

impl StreamConn {
    pub fn new(world: &World, path: PathKind) -> Result<StreamConn> {
        let (c, mut s) = world.pair(path)?;
        c.set_timeouts(Some(STALL)).context("SO_SNDTIMEO")?;
        let reader_ctl = s.try_clone().context("dup of the reader socket")?;
        let progress = Arc::new(Progress::default());
        let p = progress.clone();
        let cpu = world.cpus.1;
        let reader = std::thread::Builder::new()
            .name(format!("stream-{}", path.name()))
            .spawn(move || -> Result<(u64, u64)> {
                let r = (|| -> Result<(u64, u64)> {
                    sys::pin_to(cpu)?;
                    let mut buf = vec![0u8; READ_BUF];
                    let mut ws = WordSum::default();
                    let mut total = 0u64;
                    loop {
                        let n = match s.read(&mut buf) {
                            Ok(0) => return Ok((total, ws.finish())),
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e).context("stream reader"),
                        };
                        ws.update(&buf[..n]);
                        total += n as u64;
                        p.sum.store(ws.sum, Ordering::Relaxed);
                        p.received.store(total, Ordering::Release);
                        if total >= p.target.load(Ordering::Acquire) {
                            p.wake();
                        }
                    }
                })();
                if r.is_err() {
                    p.failed.store(true, Ordering::Release);
                    p.wake();
                }
                r
            })
            .context("spawning a stream reader")?;
        let mut block = vec![0u8; MAX_WRITE];
        for (i, b) in block.iter_mut().enumerate().skip(8) {
            *b = (i.wrapping_mul(0x9E37_79B1) >> 11) as u8;
        }
        let base = SIZES.iter().map(|&n| (n, word_sum(&block[..n]))).collect();
        Ok(StreamConn {
            path,
            writer: Some(c),
            reader_ctl,
            reader: Some(reader),
            progress,
            block,
            base,
            seq: 0,
            sent: 0,
            expected_sum: 0,
        })
    }

    /// Streams 64 MiB in 64 KiB writes: lets TCP's receive buffer
    /// autotuning reach its steady state, so that the first size measured
    /// does not see a younger connection than the others.
    pub fn warm_up(&mut self) -> Result<()> {
        self.run(64 << 10, 1024).map(|_| ())
    }

    /// Writes `n` blocks of `size` bytes and waits until the reader has
    /// them all; returns the time from the first write to the last byte
    /// read. Verifies the byte count and the checksum.
    pub fn run(&mut self, size: usize, n: u64) -> Result<Duration> {
        let base = match self.base.iter().find(|(s, _)| *s == size) {
            Some(&(_, b)) => b,
            None => bail!("write size {size} is not one of {SIZES:?}"),
        };
        let w = self.writer.as_mut().context("the stream was finished")?;
        let target = self.sent + size as u64 * n;
        self.progress.target.store(target, Ordering::Release);
        let t0 = Instant::now();
        for _ in 0..n {
            self.block[..8].copy_from_slice(&self.seq.to_le_bytes());
            w.write_all(&self.block[..size])
                .with_context(|| format!("writing {size} B blocks over {}", self.path.name()))?;
            self.expected_sum = self.expected_sum.wrapping_add(base).wrapping_add(self.seq);
            self.seq += 1;
        }
        {
            let p = &self.progress;
            let mut g = p.lock.lock().unwrap_or_else(|e| e.into_inner());
            while p.received.load(Ordering::Acquire) < target {
                if p.failed.load(Ordering::Acquire) {
                    drop(g);
                    return Err(self
                        .join_reader()
                        .err()
                        .unwrap_or_else(|| anyhow::anyhow!("the stream reader stopped early")));
                }
                if t0.elapsed() > STALL {
                    bail!(
                        "the reader got {} of {target} bytes in {STALL:?}",
                        p.received.load(Ordering::Acquire)
                    );
                }
                g =
                    p.cv.wait_timeout(g, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
            }
        }
        let el = t0.elapsed();
        self.sent = target;
        let got = self.progress.received.load(Ordering::Acquire);
        let sum = self.progress.sum.load(Ordering::Relaxed);
        if got != target || sum != self.expected_sum {
            bail!(
                "{}: the reader got {got} bytes with checksum {sum:#x}, {target} bytes with \
                 checksum {:#x} were written",
                self.path.name(),
                self.expected_sum
            );
        }
        Ok(el)
    }

    fn join_reader(&mut self) -> Result<(u64, u64)> {
        match self.reader.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the stream reader panicked"))?,
            None => bail!("the stream reader was already joined"),
        }
    }

    /// Closes the stream and checks the reader's final count and checksum:
    /// returns the bytes moved.
    pub fn finish(&mut self) -> Result<u64> {
        let w = self.writer.take().context("the stream was finished")?;
        w.shutdown_write().context("shutdown(SHUT_WR)")?;
        drop(w);
        let (total, sum) = self.join_reader()?;
        if total != self.sent || sum != self.expected_sum {
            bail!(
                "{}: at EOF the reader had {total} bytes (checksum {sum:#x}), {} bytes (checksum \
                 {:#x}) were written",
                self.path.name(),
                self.sent,
                self.expected_sum
            );
        }
        Ok(total)
    }
}

impl Drop for StreamConn {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            w.shutdown();
        }
        self.reader_ctl.shutdown();
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}
