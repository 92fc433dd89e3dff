//! Per-worker pool of relay buffers. A direction borrows a buffer only while
//! it holds bytes in flight and gives it back, through `Drop`, once drained,
//! so idle connections hold none. Buffers are allocated lazily up to a limit
//! and then reused forever: after warm-up the relay allocates nothing.

use std::cell::{Cell, RefCell};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

/// How long a pool whose allocation failed waits before it tries again.
pub const ALLOC_RETRY: Duration = Duration::from_secs(1);

/// Single-threaded: each worker owns one, so no lock or atomic is needed.
///
/// Buffers travel as thin pointers: every buffer is `size` bytes, so the
/// length is kept here once. As boxed slices (two words) a return was
/// written as two 8-byte stores and the next checkout read them back as one
/// 16-byte load, which the CPU cannot forward from the stores and waits
/// for instead (criterion, checkout + return: 14.3 -> 8.8 ns).
#[derive(Debug)]
pub struct BufferPool {
    /// Each pointer owns an allocation of exactly `size` bytes, laid out
    /// as a `Box<[u8]>`.
    free: RefCell<Vec<NonNull<u8>>>,
    size: usize,
    limit: usize,
    /// Set when the allocator refused a buffer: no new one is tried before
    /// then, so waiting sessions are not retried in a loop meanwhile.
    retry_at: Cell<Option<Instant>>,
    allocated: Cell<usize>,
    exhausted: Cell<u64>,
}

impl BufferPool {
    /// `limit` bounds the buffers that may exist at once; `size` is at
    /// least 1 (the configuration sees to it).
    pub fn new(size: usize, limit: usize) -> BufferPool {
        assert!(size > 0, "relay buffers hold at least one byte");
        BufferPool {
            // Reserve the free list up front so returning a buffer never grows it.
            free: RefCell::new(Vec::with_capacity(limit.min(1 << 16))),
            size,
            limit,
            retry_at: Cell::new(None),
            allocated: Cell::new(0),
            exhausted: Cell::new(0),
        }
    }

    /// Takes a buffer, allocating one only while under the limit. `None`
    /// means the pool is exhausted; that is counted, never a failure.
    #[inline]
    pub fn get(&self) -> Option<Buffer<'_>> {
        if let Some(data) = self.free.borrow_mut().pop() {
            return Some(Buffer { data, pool: self });
        }
        self.allocate()
    }

    /// The first checkouts, up to `limit`; kept out of line so the reuse
    /// path above stays short.
    #[cold]
    #[inline(never)]
    fn allocate(&self) -> Option<Buffer<'_>> {
        let now = Instant::now();
        if !self.may_allocate(|| now) {
            self.exhausted.set(self.exhausted.get() + 1);
            return None;
        }
        let layout = std::alloc::Layout::array::<u8>(self.size).ok();
        // SAFETY: the layout has a non-zero size (checked in `new`).
        let data = layout.and_then(|l| NonNull::new(unsafe { std::alloc::alloc_zeroed(l) }));
        let Some(data) = data else {
            // Out of memory (a huge --buffer-size, a memory limit): an
            // exhausted pool for a while, not an abort.
            if self.retry_at.get().is_none() {
                log::warn!(
                    "cannot allocate a relay buffer of {} bytes; this worker has {} and tries again every {:?}",
                    self.size,
                    self.allocated.get(),
                    ALLOC_RETRY
                );
            }
            self.retry_at.set(Some(now + ALLOC_RETRY));
            self.exhausted.set(self.exhausted.get() + 1);
            return None;
        };
        self.retry_at.set(None);
        self.allocated.set(self.allocated.get() + 1);
        Some(Buffer { data, pool: self })
    }

    /// Whether a new buffer may be allocated now. The clock is read only
    /// after a failed allocation, as `has_free` runs on every loop.
    fn may_allocate(&self, now: impl FnOnce() -> Instant) -> bool {
        self.allocated.get() < self.limit && self.retry_at.get().is_none_or(|t| now() >= t)
    }

    /// When an allocation that failed may be tried again, if one did.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at.get()
    }

    pub fn buffer_size(&self) -> usize {
        self.size
    }

    /// Buffers allocated, lent or free: the memory the pool holds is this
    /// many times the buffer size (never returned to the allocator).
    pub fn allocated(&self) -> usize {
        self.allocated.get()
    }

    /// Buffers currently lent out.
    pub fn in_use(&self) -> usize {
        self.allocated.get() - self.free.borrow().len()
    }

    pub fn has_free(&self) -> bool {
        self.has_free_at(Instant::now)
    }

    fn has_free_at(&self, now: impl FnOnce() -> Instant) -> bool {
        !self.free.borrow().is_empty() || self.may_allocate(now)
    }

    /// Times `get` found the pool exhausted.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.get()
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // Every buffer is back: a `Buffer` borrows its pool, so none outlives it.
        for p in self.free.get_mut().drain(..) {
            // SAFETY: `p` came from `alloc_zeroed` with the layout of a
            // `size`-byte slice of u8 in `allocate`, which is that of a
            // `Box<[u8]>` of that length; leaving the free list gives up
            // its ownership.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p.as_ptr(), self.size)) });
        }
    }
}

/// A borrowed buffer; dropping it returns the memory to its pool.
#[derive(Debug)]
pub struct Buffer<'p> {
    /// `pool.size` bytes owned by this buffer alone until it is dropped.
    data: NonNull<u8>,
    pool: &'p BufferPool,
}

impl Deref for Buffer<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `data` points to `pool.size` initialised bytes that only
        // this buffer can reach while it lives (see `BufferPool::free`).
        unsafe { std::slice::from_raw_parts(self.data.as_ptr(), self.pool.size) }
    }
}

impl DerefMut for Buffer<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr(), self.pool.size) }
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        self.pool.free.borrow_mut().push(self.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_reused_not_reallocated() {
        let pool = BufferPool::new(1024, 4);
        let ptr = {
            let b = pool.get().expect("pool has room");
            assert_eq!(b.len(), 1024);
            b.as_ptr()
        };
        assert_eq!(pool.in_use(), 0);
        let b = pool.get().expect("buffer came back");
        assert_eq!(b.as_ptr(), ptr);
    }

    #[test]
    fn buffers_are_the_configured_size_and_keep_their_bytes() {
        let pool = BufferPool::new(100, 2);
        {
            let mut b = pool.get().expect("room");
            assert_eq!(b.len(), 100);
            b[99] = 7;
        }
        let b = pool.get().expect("reused");
        assert_eq!((b.len(), b[99]), (100, 7));
        // The pool is dropped after `b` and `_second` are returned: each
        // buffer must be freed exactly once (a double free aborts).
        let _second = pool.get().expect("room for a second");
    }

    #[test]
    fn a_buffer_the_allocator_refuses_is_exhaustion_for_a_while_not_an_abort() {
        // No machine maps 2^62 bytes, so the allocator refuses. A 32-bit
        // target cannot ask for that much; its layout is refused instead.
        let size = usize::try_from(1u64 << 62).unwrap_or(isize::MAX as usize + 1);
        let pool = BufferPool::new(size, 4);
        assert!(pool.get().is_none());
        assert_eq!(pool.exhausted(), 1);
        let retry = pool.retry_at().expect("a retry is due");
        assert!(!pool.has_free(), "waiting sessions must not be retried in a loop");
        assert!(pool.get().is_none());
        assert_eq!(pool.exhausted(), 2);
        // Memory may come back: the pool tries again, rather than starving
        // its sessions for good.
        assert!(pool.has_free_at(|| retry), "no buffer is ever tried again");
    }

    #[test]
    fn exhaustion_returns_none_and_is_counted() {
        let pool = BufferPool::new(16, 2);
        let a = pool.get().unwrap();
        let _b = pool.get().unwrap();
        assert!(pool.get().is_none());
        assert_eq!(pool.exhausted(), 1);
        assert!(!pool.has_free());
        drop(a);
        assert!(pool.has_free());
        assert!(pool.get().is_some());
    }
}
