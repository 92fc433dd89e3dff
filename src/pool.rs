//! Per-worker pool of relay buffers. A direction borrows a buffer only while
//! it holds bytes in flight and gives it back, through `Drop`, once drained,
//! so idle connections hold none. Buffers are allocated lazily up to a limit
//! and then reused forever: after warm-up the relay allocates nothing.

use std::cell::{Cell, RefCell};
use std::ops::{Deref, DerefMut};

/// Single-threaded: each worker owns one, so no lock or atomic is needed.
#[derive(Debug)]
pub struct BufferPool {
    free: RefCell<Vec<Box<[u8]>>>,
    size: usize,
    limit: usize,
    allocated: Cell<usize>,
    exhausted: Cell<u64>,
}

impl BufferPool {
    /// `limit` bounds the buffers that may exist at once.
    pub fn new(size: usize, limit: usize) -> BufferPool {
        BufferPool {
            // Reserve the free list up front so returning a buffer never grows it.
            free: RefCell::new(Vec::with_capacity(limit.min(1 << 16))),
            size,
            limit,
            allocated: Cell::new(0),
            exhausted: Cell::new(0),
        }
    }

    /// Takes a buffer, allocating one only while under the limit. `None`
    /// means the pool is exhausted; that is counted, never a failure.
    pub fn get(&self) -> Option<Buffer<'_>> {
        if let Some(data) = self.free.borrow_mut().pop() {
            return Some(Buffer { data, pool: self });
        }
        if self.allocated.get() >= self.limit {
            self.exhausted.set(self.exhausted.get() + 1);
            return None;
        }
        self.allocated.set(self.allocated.get() + 1);
        Some(Buffer { data: vec![0u8; self.size].into_boxed_slice(), pool: self })
    }

    pub fn buffer_size(&self) -> usize {
        self.size
    }

    /// Buffers currently lent out.
    pub fn in_use(&self) -> usize {
        self.allocated.get() - self.free.borrow().len()
    }

    pub fn has_free(&self) -> bool {
        !self.free.borrow().is_empty() || self.allocated.get() < self.limit
    }

    /// Times `get` found the pool exhausted.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.get()
    }
}

/// A borrowed buffer; dropping it returns the memory to its pool.
#[derive(Debug)]
pub struct Buffer<'p> {
    data: Box<[u8]>,
    pool: &'p BufferPool,
}

impl Deref for Buffer<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl DerefMut for Buffer<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        // An empty boxed slice does not allocate.
        let data = std::mem::take(&mut self.data);
        self.pool.free.borrow_mut().push(data);
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
