//! The hot paths allocate nothing after warm-up. A counting global
//! allocator attributes every allocation to the thread that made it; a
//! worker runs in-process (the library's own `Worker`) against real
//! loopback sockets, and its thread's count must not move while an
//! established connection relays traffic. Each test counts in its own slot,
//! so tests running in parallel never see each other's allocations.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use lb::backend;
use lb::balancer;
use lb::config::{BackendSpec, SpliceMode};
use lb::pipe::PipePool;
use lb::pool::BufferPool;
use lb::session::Pools;
use lb::shared::Shared;
use lb::worker::{WAKER, Worker, WorkerSettings};
use mio::{Poll, Waker};

const NOT_COUNTED: usize = usize::MAX;
const SLOT_RELAY_COPY: usize = 0;
const SLOT_PICK: usize = 1;
const SLOT_SELF_CHECK: usize = 2;
const SLOT_ACCEPT: usize = 3;
const SLOT_RELAY_SPLICE: usize = 4;
const SLOT_RELAY_AUTO: usize = 5;
const SLOT_KERNEL_RELAY: usize = 6;

static COUNTS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

thread_local! {
    // Const-initialised and without a destructor: reading it never
    // allocates, so the allocator itself can consult it.
    static SLOT: Cell<usize> = const { Cell::new(NOT_COUNTED) };
}

struct Counting;

impl Counting {
    fn note() {
        let _ = SLOT.try_with(|s| {
            if let Some(c) = COUNTS.get(s.get()) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Counting::note();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Counting::note();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Counting::note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn count(slot: usize) -> u64 {
    COUNTS[slot].load(Ordering::SeqCst)
}

/// Counts this thread's allocations in `slot` from now on.
fn count_this_thread(slot: usize) {
    SLOT.with(|s| s.set(slot));
}

fn spec(addr: SocketAddr, weight: u32) -> BackendSpec {
    BackendSpec { name: addr.to_string(), addr, weight }
}

/// One lb worker on its own thread, counted in `slot`, listening on a
/// loopback port 0 and relaying to `backends`.
struct InProcess {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl InProcess {
    fn start(backends: &[SocketAddr], slot: usize, splice: SpliceMode) -> InProcess {
        InProcess::start_with(backends, slot, splice, false)
    }

    /// As `start`; with `kernel_relay` the worker also has the kernel
    /// relay (`--kernel-relay auto`), loaded on its own thread so that the
    /// loading counts as start-up.
    fn start_with(backends: &[SocketAddr], slot: usize, splice: SpliceMode, kernel_relay: bool) -> InProcess {
        let listeners = lb::listener::bind("127.0.0.1:0".parse().expect("literal"), 1).expect("bind a loopback port");
        // Accepted sockets inherit these, which bounds what `saturate` must write.
        small_buffers(&listeners[0]);
        let addr = lb::listener::local_addr(&listeners[0]).expect("bound address");
        let poll = Poll::new().expect("poll");
        let waker = Waker::new(poll.registry(), WAKER).expect("waker");
        let specs: Vec<BackendSpec> = backends.iter().map(|a| spec(*a, 1)).collect();
        // As lb runs by default where it may load the program: the worker
        // then also keeps its count in the steering table.
        let steering = common::bpf_allowed()
            .then(|| lb::steer::Steering::attach(&[listeners[0].as_raw_fd()]).expect("load the steering program"));
        let shared = Arc::new(Shared::new(backend::table(&specs), 64, vec![waker]).steered_by(steering));
        let settings =
            WorkerSettings { connect_timeout: common::WAIT, idle_timeout: None, retries: 1, fall: 0, splice };
        let s = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("lb-worker-under-test".into())
            .spawn(move || {
                count_this_thread(slot);
                let buffers = BufferPool::new(16 * 1024, 128);
                let pipes = PipePool::new(16 * 1024, 16, 16, &s.counters.pipes_open);
                // Two directions for each of the 64 clients the worker may hold.
                let relay = kernel_relay
                    .then(|| lb::redirect::Redirector::new(128, lb::redirect::BUDGET).expect("load the kernel relay"));
                let pools = Pools { buffers: &buffers, pipes: &pipes, relay: relay.as_ref() };
                let worker = Worker::new(0, poll, listeners, &s, pools, settings, 64).expect("worker starts");
                worker.run().expect("the worker's event loop ran");
            })
            .expect("spawn worker");
        InProcess { addr, shared, thread: Some(thread) }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shared.stop_now();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `out` and reads back its echo into `back`, checking the bytes.
fn round_trip(s: &mut TcpStream, out: &[u8], back: &mut [u8]) {
    s.write_all(out).expect("write to lb");
    let back = &mut back[..out.len()];
    s.read_exact(back).expect("read the echo through lb");
    assert!(back == out, "echo differs");
}

/// Pushes `chunks` chunks of `chunk` bytes through while another thread
/// drains the echo, so both directions keep lb's buffers busy. The reader
/// thread is not counted; only the worker is.
fn bulk(s: &TcpStream, chunk: &[u8], chunks: usize) {
    let mut r = s.try_clone().expect("clone stream");
    let want = chunk.len() * chunks;
    let reader = thread::spawn(move || drain(&mut r, want));
    let mut w = s;
    for _ in 0..chunks {
        w.write_all(chunk).expect("write bulk");
    }
    let got = reader.join().expect("bulk reader");
    check_pattern(&got, chunk, want);
}

/// Reads exactly `want` bytes into a fresh vector (on the calling thread).
fn drain(r: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut got = vec![0u8; want];
    r.read_exact(&mut got).expect("read the echo through lb");
    got
}

fn check_pattern(got: &[u8], chunk: &[u8], want: usize) {
    assert_eq!(got.len(), want);
    // Every chunk-sized piece starts at a multiple of the chunk length.
    for (k, piece) in got.chunks(chunk.len()).enumerate() {
        assert!(piece == &chunk[..piece.len()], "echoed chunk {k} differs");
    }
}

/// Caps a socket's kernel buffers (and turns off their autotuning), so
/// that filling the path takes megabytes, not tens of them.
fn small_buffers(s: &impl std::os::fd::AsFd) {
    let s = socket2::SockRef::from(s);
    s.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    s.set_send_buffer_size(64 * 1024).expect("SO_SNDBUF");
}

/// Writes without reading until the client's writes stall: then every
/// socket buffer on the path is full, and so are both of lb's relay
/// buffers for this pair (each direction holds bytes it cannot pass on).
/// Reads everything back and checks it. Returns the bytes moved.
fn saturate(s: &mut TcpStream, chunk: &[u8]) -> usize {
    small_buffers(s);
    // Short only for the writes: a write that makes no progress for this
    // long means everything downstream is full.
    s.set_write_timeout(Some(Duration::from_millis(300))).expect("write timeout");
    let limit = 256 << 20;
    let mut sent = 0;
    while sent < limit {
        let off = sent % chunk.len();
        match s.write(&chunk[off..]) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("write to lb: {e}"),
        }
    }
    assert!(sent < limit, "writes never stalled after {sent} bytes");
    s.set_write_timeout(Some(common::WAIT)).expect("write timeout");
    let got = drain(s, sent);
    check_pattern(&got, chunk, sent);
    sent
}

#[test]
fn relaying_an_established_connection_allocates_nothing_on_the_copy_path() {
    relay_allocates_nothing(SLOT_RELAY_COPY, SpliceMode::Never);
}

#[test]
fn relaying_an_established_connection_allocates_nothing_through_pipes() {
    relay_allocates_nothing(SLOT_RELAY_SPLICE, SpliceMode::Always);
}

#[test]
fn relaying_an_established_connection_allocates_nothing_while_switching_paths() {
    relay_allocates_nothing(SLOT_RELAY_AUTO, SpliceMode::Auto);
}

fn relay_allocates_nothing(slot: usize, splice: SpliceMode) {
    let echo = common::backend(|mut s| {
        small_buffers(&s.stream);
        common::echo_until_eof(&mut s);
    });
    // Worker start-up allocates (its slab, its event list) on the counted
    // thread, so the count must move by the end of warm-up: proof that the
    // counter sees the worker at all.
    let before_start = count(slot);
    let lb = InProcess::start(&[echo.addr], slot, splice);
    let small = common::random_bytes(64, 1);
    let large = common::random_bytes(48 * 1024, 2);
    let chunk = common::random_bytes(16 * 1024 + 7, 3);
    let mut back = vec![0u8; 64 * 1024];

    // Warm-up, up to the most this pair can hold: both directions' buffers
    // or pipes full at once.
    let mut c = common::connect(lb.addr);
    for _ in 0..50 {
        round_trip(&mut c, &small, &mut back);
        round_trip(&mut c, &large, &mut back);
    }
    bulk(&c, &chunk, 64);
    saturate(&mut c, &chunk);
    let warm_up = count(slot) - before_start;
    assert!(warm_up > 0, "the counter saw no allocation by the worker thread, not even at start-up");
    // The mode took effect: pipes exist exactly when splicing is allowed
    // (bulk traffic above moves `auto` onto them).
    let pipes = lb.shared.counters.pipes_open.load(Ordering::SeqCst);
    assert_eq!(pipes > 0, splice != SpliceMode::Never, "{pipes} pipes open in mode {splice:?}");

    let before = count(slot);
    for _ in 0..2000 {
        round_trip(&mut c, &small, &mut back);
    }
    for _ in 0..100 {
        round_trip(&mut c, &large, &mut back);
    }
    bulk(&c, &chunk, 256);
    let stalled = saturate(&mut c, &chunk);
    let during = count(slot) - before;
    assert_eq!(
        during, 0,
        "the worker allocated {during} times while relaying (warm-up: {warm_up}; stalled at {stalled} bytes)"
    );
}

#[test]
fn a_new_connection_after_warm_up_allocates_nothing() {
    // Accept, pick, connect, register, relay one exchange and close: the
    // per-connection path reuses slab slots, lists and buffers.
    let echo = common::echo_backend();
    let lb = InProcess::start(&[echo.addr], SLOT_ACCEPT, SpliceMode::Auto);
    let small = common::random_bytes(512, 4);
    let mut back = vec![0u8; 512];
    let one = |back: &mut [u8]| {
        let mut c = common::connect(lb.addr);
        round_trip(&mut c, &small, back);
    };
    for _ in 0..50 {
        one(&mut back);
    }
    let before = count(SLOT_ACCEPT);
    for _ in 0..300 {
        one(&mut back);
    }
    let during = count(SLOT_ACCEPT) - before;
    assert_eq!(during, 0, "the worker allocated {during} times for 300 new connections");
}

#[test]
fn a_connection_that_joins_the_kernel_relay_after_warm_up_allocates_nothing() {
    if !common::bpf_allowed() {
        eprintln!("skipped: bpf(2) refused here, so lb cannot load the kernel relay");
        return;
    }
    if !lb::worker::EVENTS_ARE_THE_SESSIONS_OWN {
        // A 32-bit build's tokens cannot tell a pair's events from those
        // of the pair before it, which a joined pair relies on, so lb
        // never gives its workers the relay there; this worker would get
        // one all the same, and its joined pairs would miss their ends.
        eprintln!("skipped: a 32-bit build keeps every pair with lb");
        return;
    }
    // Each connection trades small messages until both directions have
    // made their short reads, joins the relay (its state comes from the
    // worker's spare list), trades more in the kernel and closes, which
    // hands the state back.
    let echo = common::echo_backend();
    let lb = InProcess::start_with(&[echo.addr], SLOT_KERNEL_RELAY, SpliceMode::Auto, true);
    let small = common::random_bytes(64, 5);
    let mut back = vec![0u8; 64];
    let one = |back: &mut [u8]| {
        let mut c = common::connect(lb.addr);
        for _ in 0..8 {
            round_trip(&mut c, &small, back);
        }
    };
    for _ in 0..50 {
        one(&mut back);
    }
    let kernel = || lb.shared.counters.bytes_kernel.load(Ordering::SeqCst);
    // The worker closes a pair (and counts its bytes) after the client has
    // gone: wait for it, so that the closes are measured too.
    let settled = || common::wait_until(common::WAIT, || lb.shared.active_clients() == 0);
    assert!(
        settled(),
        "the warm-up's pairs were never closed: {} clients still held, {} bytes moved in the kernel",
        lb.shared.active_clients(),
        kernel()
    );
    assert!(kernel() > 0, "no pair of the warm-up joined the kernel relay");
    let (before, moved) = (count(SLOT_KERNEL_RELAY), kernel());
    for i in 0..300 {
        one(&mut back);
        // Each pair is closed before the next joins: on a loaded machine
        // closes can lag, and more pairs in the relay at once than ever
        // before would need a state of their own, as in lb.
        assert!(settled(), "measured pair {i} was never closed: {} clients still held", lb.shared.active_clients());
    }
    assert!(kernel() > moved, "the measured pairs did not join the kernel relay");
    let during = count(SLOT_KERNEL_RELAY) - before;
    assert_eq!(during, 0, "the worker allocated {during} times for 300 connections that joined the kernel relay");
}

#[test]
fn selecting_a_backend_allocates_nothing() {
    let specs: Vec<BackendSpec> =
        (0..16u16).map(|i| spec(SocketAddr::from(([127, 0, 0, 1], 1000 + i)), 1 + u32::from(i % 3))).collect();
    let table = backend::table(&specs);
    for (i, b) in table.iter().enumerate() {
        b.active.store(i * 7 % 11, Ordering::Relaxed);
    }
    let excludes: [&[u32]; 3] = [&[], &[3], &[0, 5, 9]];

    count_this_thread(SLOT_PICK);
    let before = count(SLOT_PICK);
    let mut picked = 0usize;
    for cursor in 0..10_000usize {
        for exclude in excludes {
            if let Some(i) = balancer::pick(black_box(&table), cursor, exclude) {
                // Taking and releasing the lease is part of choosing.
                let lease = table[i].lease();
                picked += usize::from(!std::ptr::eq(lease.backend(), &table[0]));
            }
        }
    }
    let during = count(SLOT_PICK) - before;
    count_this_thread(NOT_COUNTED);
    assert!(picked > 0);
    assert_eq!(during, 0, "selection allocated {during} times");
}

#[test]
fn the_counter_sees_a_deliberate_allocation() {
    count_this_thread(SLOT_SELF_CHECK);
    let before = count(SLOT_SELF_CHECK);
    let v = black_box(vec![0u8; 100]);
    let after = count(SLOT_SELF_CHECK);
    count_this_thread(NOT_COUNTED);
    drop(v);
    assert_eq!(after - before, 1, "one Vec, one allocation");
}
