//! Per-worker pool of kernel pipes for the splice(2) relay, and the splice
//! calls themselves. A direction borrows a [`Pipe`] only while bytes sit in
//! it and gives it back, through `Drop`, once it is empty; a pipe still
//! holding bytes (an aborted pair) is closed instead, since its contents
//! belong to no one. How many pipes may be open at once is a process-wide
//! budget (`--max-pipes`), claimed only when a pipe is created or closed,
//! so the relay itself touches no shared state.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use log::debug;

/// Kernel default when F_SETPIPE_SZ is refused and F_GETPIPE_SZ fails too.
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;

/// An open pipe, without the bookkeeping of a lease.
#[derive(Debug)]
struct RawPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the kernel lets it hold (its size after F_SETPIPE_SZ).
    capacity: usize,
}

impl RawPipe {
    /// A non-blocking pipe, sized to `size` where the kernel allows it; the
    /// kernel rounds the size up to a power-of-two number of pages.
    fn open(size: usize) -> io::Result<RawPipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let requested = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        let set = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, requested) };
        let capacity = if set > 0 {
            set as usize
        } else {
            // Above /proc/sys/fs/pipe-max-size without privilege (EPERM), or
            // past the per-user pipe quota: the default size still works.
            debug!("F_SETPIPE_SZ({size}): {}; keeping the default size", io::Error::last_os_error());
            // SAFETY: as above.
            let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if got > 0 { got as usize } else { DEFAULT_PIPE_BYTES }
        };
        Ok(RawPipe { read, write, capacity })
    }
}

/// What a splice error means for the relay.
pub fn is_unsupported(e: &io::Error) -> bool {
    // EINVAL: a descriptor that cannot splice (a socket type without
    // splice support); ENOSYS: a kernel without splice.
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // No SPLICE_F_MORE: lb cannot know that another chunk follows without
    // an extra syscall, and a wrong guess holds the tail segment back until
    // the next write. The kernel already sets MSG_MORE between the buffers
    // of one call.
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    // SAFETY: both descriptors are open for the duration of the call; null
    // offsets mean "current position", as pipes and sockets require.
    let n = unsafe { libc::splice(from, ptr::null_mut(), to, ptr::null_mut(), len, flags) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Single-threaded: each worker owns one, so no lock is needed; only the
/// shared count of open pipes is atomic.
#[derive(Debug)]
pub struct PipePool<'a> {
    free: RefCell<Vec<RawPipe>>,
    /// Pipes kept for reuse at most; beyond this a returned pipe is closed.
    free_limit: usize,
    /// Requested pipe size, also the most a pipe is filled with, so a pipe
    /// never holds more than a relay buffer (see `Pipe::read_into`).
    size: usize,
    max_open: usize,
    /// Pipes open across all workers: the `--max-pipes` budget.
    open: &'a AtomicU64,
    in_use: Cell<usize>,
    exhausted: Cell<u64>,
    unsupported: Cell<u64>,
    /// A pipe was lent since the last `trim_idle`.
    lent: Cell<bool>,
}

impl<'a> PipePool<'a> {
    /// `max_open` bounds the pipes open at once across every pool sharing
    /// `open`; `free_limit` bounds the ones this pool keeps idle.
    pub fn new(size: usize, max_open: usize, free_limit: usize, open: &'a AtomicU64) -> PipePool<'a> {
        PipePool {
            // Reserved up front so returning a pipe never grows the list.
            free: RefCell::new(Vec::with_capacity(free_limit.min(1 << 16))),
            free_limit,
            size,
            max_open,
            open,
            in_use: Cell::new(0),
            exhausted: Cell::new(0),
            unsupported: Cell::new(0),
            lent: Cell::new(false),
        }
    }

    /// Lends an empty pipe, opening one while the budget allows. `None`
    /// means none is available; that is counted, never a failure.
    pub fn get(&self) -> Option<Pipe<'_>> {
        let raw = match self.free.borrow_mut().pop() {
            Some(raw) => raw,
            None => match self.open_new() {
                Some(raw) => raw,
                None => {
                    self.exhausted.set(self.exhausted.get() + 1);
                    return None;
                }
            },
        };
        self.in_use.set(self.in_use.get() + 1);
        self.lent.set(true);
        Some(Pipe { raw: Some(raw), held: 0, pool: self })
    }

    fn open_new(&self) -> Option<RawPipe> {
        let max = self.max_open as u64;
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        match RawPipe::open(self.size) {
            Ok(raw) => Some(raw),
            Err(e) => {
                // Out of descriptors or pipe quota: the relay copies instead.
                debug!("cannot open a pipe: {e}");
                self.open.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    fn put(&self, raw: RawPipe, empty: bool) {
        self.in_use.set(self.in_use.get() - 1);
        let mut free = self.free.borrow_mut();
        if empty && free.len() < self.free_limit {
            free.push(raw);
        } else {
            drop(free);
            self.close(raw);
        }
    }

    fn close(&self, raw: RawPipe) {
        drop(raw);
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Closes the idle pipes if none was lent since the previous call, so a
    /// worker whose bulk traffic ended gives its descriptors back.
    pub fn trim_idle(&self) {
        if self.lent.replace(false) {
            return;
        }
        let mut free = self.free.borrow_mut();
        while let Some(raw) = free.pop() {
            self.close(raw);
        }
    }

    /// Pipes currently lent out.
    pub fn in_use(&self) -> usize {
        self.in_use.get()
    }

    /// Pipes kept idle for reuse.
    pub fn idle(&self) -> usize {
        self.free.borrow().len()
    }

    /// Times `get` found no pipe.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.get()
    }

    /// Records a direction that found splice unsupported and copies instead.
    pub fn note_unsupported(&self) {
        self.unsupported.set(self.unsupported.get() + 1);
    }

    /// Directions recorded by `note_unsupported`.
    pub fn unsupported(&self) -> u64 {
        self.unsupported.get()
    }
}

impl Drop for PipePool<'_> {
    fn drop(&mut self) {
        for raw in self.free.get_mut().drain(..) {
            drop(raw);
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A borrowed pipe and the bytes it holds; dropping it returns an empty
/// pipe to its pool and closes one that still holds bytes.
#[derive(Debug)]
pub struct Pipe<'p> {
    /// Always `Some` until `Drop` takes it.
    raw: Option<RawPipe>,
    held: usize,
    pool: &'p PipePool<'p>,
}

impl Pipe<'_> {
    fn raw(&self) -> &RawPipe {
        self.raw.as_ref().expect("a lent pipe is open until dropped")
    }

    /// Bytes in the pipe, read from a source and not yet written out.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The most one fill may move: the pipe's size, capped at the relay
    /// buffer size.
    pub fn room(&self) -> usize {
        self.raw().capacity.min(self.pool.size) - self.held
    }

    /// Splices up to `room()` bytes from `src` into the pipe; `Ok(0)` is
    /// the source's EOF.
    pub fn fill_from(&mut self, src: &impl AsRawFd) -> io::Result<usize> {
        let room = self.room();
        let n = splice(src.as_raw_fd(), self.raw().write.as_raw_fd(), room)?;
        self.held += n;
        Ok(n)
    }

    /// Splices held bytes to `dst`; fewer than `held()` means `dst` is full.
    pub fn drain_to(&mut self, dst: &impl AsRawFd) -> io::Result<usize> {
        let n = splice(self.raw().read.as_raw_fd(), dst.as_raw_fd(), self.held)?;
        self.held -= n;
        Ok(n)
    }

    /// Moves the held bytes into `buf` with read(2), for a destination that
    /// turned out unable to take spliced data. `buf` must be at least the
    /// pool's buffer size, which bounds what a pipe holds.
    pub fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while self.held > 0 && got < buf.len() {
            let rest = &mut buf[got..];
            // SAFETY: reading into a live, writable slice of `rest.len()` bytes.
            let n = unsafe { libc::read(self.raw().read.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            got += n as usize;
            self.held -= n as usize;
        }
        Ok(got)
    }
}

impl Drop for Pipe<'_> {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.pool.put(raw, self.held == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (a, b)
    }

    #[test]
    fn an_empty_pipe_is_reused_and_a_full_one_is_closed() {
        let open = AtomicU64::new(0);
        let pool = PipePool::new(4096, 4, 4, &open);
        let (mut a, b) = pair();
        {
            let p = pool.get().expect("budget allows one");
            assert_eq!(pool.in_use(), 1);
            assert!(p.room() >= 4096);
        }
        assert_eq!((pool.in_use(), pool.idle(), open.load(Ordering::Relaxed)), (0, 1, 1));
        a.write_all(b"hello").unwrap();
        {
            let mut p = pool.get().expect("the idle pipe comes back");
            assert_eq!(open.load(Ordering::Relaxed), 1, "reused, not opened");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while p.held() < 5 && std::time::Instant::now() < deadline {
                let _ = p.fill_from(&b);
            }
            assert_eq!(p.held(), 5);
        }
        assert_eq!((pool.in_use(), pool.idle(), open.load(Ordering::Relaxed)), (0, 0, 0));
    }

    #[test]
    fn the_open_budget_is_shared_and_exhaustion_is_counted() {
        let open = AtomicU64::new(0);
        let one = PipePool::new(4096, 2, 2, &open);
        let two = PipePool::new(4096, 2, 2, &open);
        let _a = one.get().expect("first");
        let b = two.get().expect("second");
        assert!(one.get().is_none());
        assert!(two.get().is_none());
        assert_eq!(one.exhausted() + two.exhausted(), 2);
        drop(b);
        assert!(one.get().is_none(), "an idle pipe stays with the pool that owns it");
        assert!(two.get().is_some());
    }

    #[test]
    fn returned_pipes_beyond_the_free_limit_are_closed() {
        let open = AtomicU64::new(0);
        let pool = PipePool::new(4096, 8, 1, &open);
        let (a, b) = (pool.get().unwrap(), pool.get().unwrap());
        drop(a);
        drop(b);
        assert_eq!((pool.idle(), open.load(Ordering::Relaxed)), (1, 1));
    }

    #[test]
    fn idle_pipes_are_closed_after_a_quiet_interval() {
        let open = AtomicU64::new(0);
        let pool = PipePool::new(4096, 8, 8, &open);
        drop(pool.get().unwrap());
        pool.trim_idle();
        assert_eq!(pool.idle(), 1, "used during this interval: kept");
        pool.trim_idle();
        assert_eq!((pool.idle(), open.load(Ordering::Relaxed)), (0, 0));
    }

    #[test]
    fn a_pipe_is_sized_to_the_buffer_and_caps_a_fill_there() {
        let open = AtomicU64::new(0);
        let pool = PipePool::new(16 * 1024, 1, 1, &open);
        let mut p = pool.get().unwrap();
        assert_eq!(p.room(), 16 * 1024);
        let (mut a, b) = pair();
        a.write_all(&vec![7u8; 64 * 1024]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while p.held() < 16 * 1024 && std::time::Instant::now() < deadline {
            let _ = p.fill_from(&b);
        }
        assert_eq!(p.held(), 16 * 1024, "never more than the room");
        assert_eq!(p.room(), 0);
        let mut buf = vec![0u8; 16 * 1024];
        assert_eq!(p.read_into(&mut buf).unwrap(), 16 * 1024);
        assert_eq!(p.held(), 0);
        assert!(buf.iter().all(|&x| x == 7));
    }

    /// A descriptor splice(2) cannot handle, as an odd socket type would be.
    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd with valid flags; the descriptor is ours alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: just opened and owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn a_descriptor_that_cannot_splice_is_classified_unsupported_and_the_held_bytes_come_back() {
        let open = AtomicU64::new(0);
        let pool = PipePool::new(16 * 1024, 1, 1, &open);
        let mut p = pool.get().unwrap();
        let odd = eventfd();
        let e = p.fill_from(&odd).expect_err("an eventfd cannot be spliced from");
        assert!(is_unsupported(&e), "{e}");
        let (mut a, b) = pair();
        a.write_all(b"still mine").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while p.held() < 10 && std::time::Instant::now() < deadline {
            let _ = p.fill_from(&b);
        }
        let e = p.drain_to(&odd).expect_err("an eventfd cannot be spliced to");
        assert!(is_unsupported(&e), "{e}");
        assert_eq!(p.held(), 10, "a refused splice moves nothing");
        let mut buf = vec![0u8; 16 * 1024];
        assert_eq!(p.read_into(&mut buf).unwrap(), 10);
        assert_eq!(&buf[..10], b"still mine");
        assert_eq!(p.held(), 0);
    }

    #[test]
    fn spliced_bytes_arrive_unchanged() {
        let open = AtomicU64::new(0);
        let pool = PipePool::new(64 * 1024, 1, 1, &open);
        let (mut a, b) = pair();
        let (c, mut d) = pair();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 251) as u8).collect();
        a.write_all(&data).unwrap();
        drop(a);
        let mut p = pool.get().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            assert!(std::time::Instant::now() < deadline, "splice made no progress");
            match p.fill_from(&b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("fill: {e}"),
            }
            while p.held() > 0 {
                p.drain_to(&c).expect("drain");
            }
        }
        drop(c);
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        assert!(got == data);
    }
}
