//! A BPF ring buffer of fixed-size records, read into a queue: the
//! plumbing shared by flow events (events.rs) and auth signals (auth.rs).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::time::Duration;

use plain::Plain;

use crate::error::{Error, Result};

/// Records waiting to be taken; filled by libbpf's callback.
pub(crate) struct Ring<T: Plain + Default> {
    rb: NonNull<libbpf_sys::ring_buffer>,
    // Boxed: its address is the callback's context and must not move
    // when the Ring does (the VecDeque's own buffer is not the context).
    #[allow(clippy::box_collection)]
    queue: Box<VecDeque<T>>,
    map: &'static str,
}

// SAFETY: the ring buffer and its callback context are only touched
// through `&mut self`; libbpf's ring_buffer has no thread affinity, and
// the records are plain data.
unsafe impl<T: Plain + Default + Send> Send for Ring<T> {}

unsafe extern "C" fn on_record<T: Plain + Default>(
    ctx: *mut libc::c_void,
    data: *mut libc::c_void,
    size: libbpf_sys::size_t,
) -> i32 {
    if ctx.is_null() || data.is_null() || (size as usize) < std::mem::size_of::<T>() {
        return 0;
    }
    // SAFETY: `ctx` is the Box<VecDeque<T>> the Ring handed to
    // ring_buffer__new; it is only reached from the Ring's own `&mut self`
    // methods (poll/consume), so no other reference to it is live.
    let q = unsafe { &mut *ctx.cast::<VecDeque<T>>() };
    let mut rec = T::default();
    // SAFETY: `data` holds at least size_of::<T>() bytes of a ring buffer
    // record, and T is Plain: any bytes are a valid T.
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.cast::<u8>(),
            (&mut rec as *mut T).cast::<u8>(),
            std::mem::size_of::<T>(),
        );
    }
    q.push_back(rec);
    0
}

impl<T: Plain + Default> Ring<T> {
    /// Opens the ring buffer map `fd` (named `map` in errors).
    pub(crate) fn new(map: &'static str, fd: BorrowedFd<'_>) -> Result<Self> {
        let mut queue: Box<VecDeque<T>> = Box::default();
        let ctx = (&mut *queue as *mut VecDeque<T>).cast::<libc::c_void>();
        // SAFETY: a live ring buffer map fd, a callback with the C ABI for
        // records of T, and a context that outlives the ring buffer (both
        // owned by the Ring, the ring buffer freed first in Drop).
        let rb = unsafe {
            libbpf_sys::ring_buffer__new(
                fd.as_raw_fd(),
                Some(on_record::<T>),
                ctx,
                std::ptr::null(),
            )
        };
        let rb = NonNull::new(rb).ok_or_else(|| Error::Map {
            map,
            op: "opening the ring buffer",
            source: std::io::Error::last_os_error(),
        })?;
        Ok(Ring { rb, queue, map })
    }

    /// The next record, waiting up to `timeout` when none is queued.
    ///
    /// The ring reports data as soon as a producer has reserved a record,
    /// and libbpf stops at a record not yet committed: a wake-up can bring
    /// nothing. Polls again until the timeout has passed.
    pub(crate) fn poll(&mut self, timeout: Duration) -> Result<Option<T>> {
        let deadline = std::time::Instant::now() + timeout;
        while self.queue.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // Round up: a 0 ms poll would spin until the deadline.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: `rb` is a live ring buffer owned by self.
            let r = unsafe { libbpf_sys::ring_buffer__poll(self.rb.as_ptr(), ms) };
            if r < 0 && -r != libc::EINTR {
                return Err(Error::Map {
                    map: self.map,
                    op: "polling the ring buffer",
                    source: std::io::Error::from_raw_os_error(-r),
                });
            }
            if self.queue.is_empty() && std::time::Instant::now() >= deadline {
                break;
            }
        }
        Ok(self.queue.pop_front())
    }

    /// Drops every record waiting in the ring and in the queue (left by an
    /// earlier reader, for instance); returns how many.
    pub(crate) fn discard(&mut self) -> Result<usize> {
        let mut n = self.queue.len();
        self.queue.clear();
        loop {
            self.consume()?;
            if self.queue.is_empty() {
                return Ok(n);
            }
            n += self.queue.len();
            self.queue.clear();
        }
    }

    /// Moves every committed record of the ring into the queue.
    fn consume(&mut self) -> Result<()> {
        // SAFETY: `rb` is a live ring buffer owned by self.
        let r = unsafe { libbpf_sys::ring_buffer__consume(self.rb.as_ptr()) };
        if r < 0 {
            return Err(Error::Map {
                map: self.map,
                op: "reading the ring buffer",
                source: std::io::Error::from_raw_os_error(-r),
            });
        }
        Ok(())
    }

    /// The next record already in the ring, without waiting.
    pub(crate) fn try_next(&mut self) -> Result<Option<T>> {
        if self.queue.is_empty() {
            self.consume()?;
        }
        Ok(self.queue.pop_front())
    }

    /// Records queued in user space.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The epoll fd that becomes readable when records arrive.
    pub(crate) fn as_raw_fd(&self) -> RawFd {
        // SAFETY: `rb` is a live ring buffer owned by self.
        unsafe { libbpf_sys::ring_buffer__epoll_fd(self.rb.as_ptr()) }
    }
}

impl<T: Plain + Default> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: `rb` was made by ring_buffer__new and is freed once,
        // before `queue` (its callback context) is dropped.
        unsafe { libbpf_sys::ring_buffer__free(self.rb.as_ptr()) };
    }
}

/// Polls a ring's epoll fd from tokio and takes records as they come.
#[cfg(feature = "tokio")]
pub(crate) fn poll_ring<T: Plain + Default>(
    ring: &mut Ring<T>,
    fd: &tokio::io::unix::AsyncFd<RawFd>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Option<Result<T>>> {
    use std::task::Poll;
    loop {
        match ring.try_next() {
            Ok(Some(r)) => return Poll::Ready(Some(Ok(r))),
            Ok(None) => {}
            Err(e) => return Poll::Ready(Some(Err(e))),
        }
        match fd.poll_read_ready(cx) {
            // Drained above; epoll reports again when new records arrive.
            Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
            Poll::Ready(Err(e)) => {
                return Poll::Ready(Some(Err(Error::io("waiting on", "a ring buffer", e))))
            }
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// Registers a ring's epoll fd with tokio.
#[cfg(feature = "tokio")]
pub(crate) fn register<T: Plain + Default>(
    ring: &Ring<T>,
) -> Result<tokio::io::unix::AsyncFd<RawFd>> {
    let raw = ring.as_raw_fd();
    // SAFETY: the fd belongs to the ring, which the caller keeps in the
    // same struct and drops only after this AsyncFd (declared before it)
    // has deregistered the fd.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(raw, tokio::io::Interest::READABLE) }
        .map_err(|e| Error::io("registering with tokio", "a ring buffer", e.into()))
}
