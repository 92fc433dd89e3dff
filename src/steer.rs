//! Which worker a new client goes to. `SO_REUSEPORT` alone hashes each
//! client to a worker's listen queue whatever that worker has in hand, so
//! one worker can sit on a queue while another idles. Here an
//! `SK_REUSEPORT` eBPF program, run by the kernel for each SYN, sends it to
//! the worker holding the fewest clients, queued ones included. The
//! workers keep their counts in a table shared with the program (an
//! mmap'ed BPF array), so publishing a count is a plain store, never a
//! syscall. The program counts each SYN it steers; a worker takes its
//! closed clients off and, whenever accept() finds its queue empty (which
//! it checks at least once a second), resets its load to the clients it
//! holds, so a handshake that never completed is not counted for long.
//! Loading the program needs `CAP_BPF` (or root); without it lb keeps the
//! kernel's hash.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::bpf::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// One worker's row in the table. The program adds 1 to `steered` for
/// every client it sends there; the worker owns `base`, kept so that
/// `steered - base` is the clients it holds plus those in its queue.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Slot {
    steered: AtomicU64,
    base: AtomicU64,
}

/// The load of a worker that takes no more clients.
const RETIRED: i64 = 1 << 62;

const SLOT_SIZE: usize = std::mem::size_of::<Slot>();

impl Slot {
    /// The load the program sees: clients held and queued, plus
    /// [`RETIRED`] for a worker that takes no more.
    pub fn load(&self) -> i64 {
        self.steered.load(Ordering::Relaxed).wrapping_sub(self.base.load(Ordering::Relaxed)) as i64
    }

    /// Clients held and queued, retired or not.
    pub fn clients(&self) -> i64 {
        match self.load() {
            l if l >= RETIRED / 2 => l - RETIRED,
            l => l,
        }
    }
}

/// A worker's side of its slot: it counts its clients as they come and
/// go and stores the base only when that changes.
#[derive(Debug)]
pub struct Tracker<'a> {
    slot: &'a Slot,
    base: u64,
    /// Clients held as of the last call.
    held: usize,
}

impl<'a> Tracker<'a> {
    pub fn new(slot: &'a Slot) -> Tracker<'a> {
        let base = slot.base.load(Ordering::Relaxed);
        Tracker { slot, base, held: 0 }
    }

    /// accept() found the queue empty while the worker holds `held`
    /// clients: its load is exactly that. This also forgives the clients
    /// the program counted that never reached the queue (a handshake that
    /// failed), so a miscount lasts only until the queue next runs dry.
    pub fn queue_empty(&mut self, held: usize) {
        self.held = held;
        self.set_base(self.slot.steered.load(Ordering::Relaxed).wrapping_sub(held as u64));
    }

    /// A client left the queue for the worker: the load is unchanged.
    pub fn accepted(&mut self) {
        self.held += 1;
    }

    /// The worker now holds `held` clients; those gone since the last
    /// call lower its load.
    pub fn settle(&mut self, held: usize) {
        if held < self.held {
            self.set_base(self.base.wrapping_add((self.held - held) as u64));
        }
        self.held = held;
    }

    /// The worker takes no more clients (draining, or its loop failed):
    /// a load no live worker reaches keeps the program from choosing it.
    /// Were it chosen, its closed listener would leave the kernel to fall
    /// back to the hash for that client. `settle` goes on counting the
    /// clients it still holds.
    pub fn retire(&mut self, held: usize) {
        self.held = held;
        let load = (RETIRED as u64).wrapping_add(held as u64);
        self.set_base(self.slot.steered.load(Ordering::Relaxed).wrapping_sub(load));
    }

    fn set_base(&mut self, base: u64) {
        if base != self.base {
            self.base = base;
            self.slot.base.store(base, Ordering::Relaxed);
        }
    }
}

/// The program, its maps and the table mapped into lb's memory. Dropping
/// it unmaps the table; the kernel keeps the program while a listener of
/// the group is open, and falls back to the hash for a slot whose
/// listener closed.
#[derive(Debug)]
pub struct Steering {
    table: Mapping,
    workers: usize,
    _loads: OwnedFd,
    _sockets: OwnedFd,
    _program: OwnedFd,
}

impl Steering {
    /// Steers the clients of the `SO_REUSEPORT` group of `listeners` (one
    /// per worker, in worker order, all bound and listening).
    pub fn attach(listeners: &[RawFd]) -> io::Result<Steering> {
        let workers = listeners.len();
        if workers == 0 || workers > u32::MAX as usize / SLOT_SIZE {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let value_size = (workers * SLOT_SIZE) as u32;
        let loads = map_create(BPF_MAP_TYPE_ARRAY, 4, value_size, 1, BPF_F_MMAPABLE)?;
        let sockets = map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, workers as u32, 0)?;
        let program = prog_load(
            BPF_PROG_TYPE_SK_REUSEPORT,
            BPF_SK_REUSEPORT_SELECT,
            &program(workers, loads.as_raw_fd(), sockets.as_raw_fd()),
        )?;
        let table_len = (value_size as usize).next_multiple_of(page_size());
        let table = Mapping::new(loads.as_raw_fd(), table_len, 0, true)?;
        let steering = Steering { table, workers, _loads: loads, _program: program, _sockets: sockets };
        for (i, &fd) in listeners.iter().enumerate() {
            map_update(steering._sockets.as_raw_fd(), i as u32, fd as u64)?;
        }
        let prog = steering._program.as_raw_fd();
        // SAFETY: plain setsockopt with an int option value.
        let rc = unsafe {
            libc::setsockopt(
                listeners[0],
                libc::SOL_SOCKET,
                SO_ATTACH_REUSEPORT_EBPF,
                (&prog as *const RawFd).cast(),
                std::mem::size_of::<RawFd>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(steering)
    }

    /// Worker `i`'s row.
    pub fn slot(&self, i: usize) -> &Slot {
        assert!(i < self.workers, "one slot per worker");
        // SAFETY: in bounds of the mapping, which outlives `&self`; a Slot is
        // atomics only, so any bytes are a valid one.
        unsafe { &*self.table.ptr().cast::<Slot>().add(i) }
    }
}

const SK_SELECT_REUSEPORT: i32 = 82;

/// Offsets in `struct sk_reuseport_md`: `data` and `data_end` frame the
/// packet from its TCP header on.
const MD_DATA: i16 = 0;
const MD_DATA_END: i16 = 8;
/// The TCP header's flags byte, and the two flags looked at.
const TCP_FLAGS_AT: i16 = 13;
const TCP_SYN: i32 = 0x02;
const TCP_ACK: i32 = 0x10;

/// The program for `workers` slots. The kernel runs it for every packet
/// that finds no connection of its own and so looks up the listener: a
/// client's SYN, but also the ACK of a cookie or a segment that arrives
/// after its connection closed. Only a SYN is steered and counted; the
/// rest is left to the hash, counted nowhere. It picks the lowest load
/// (the first on a tie, so equal workers take turns), without branches:
/// with a branch per worker the verifier would walk every path,
/// 2^workers of them. It counts the client on that slot only once the
/// kernel took the choice; on any failure it returns `SK_PASS` with
/// nothing chosen, and the kernel falls back to its hash.
pub fn program(workers: usize, loads: RawFd, sockets: RawFd) -> Vec<Insn> {
    let mut p = Vec::with_capacity(40 + workers * 13);
    let mut to_pass = Vec::with_capacity(5);
    // A SYN without ACK, or pass.
    p.push(load64(R2, R1, MD_DATA));
    p.push(load64(R3, R1, MD_DATA_END));
    p.push(mov(R4, R2));
    p.push(add_imm(R4, i32::from(TCP_FLAGS_AT) + 1));
    to_pass.push(p.len());
    p.push(jump_if_beyond(R4, R3, 0));
    p.push(load8(R4, R2, TCP_FLAGS_AT));
    p.push(and_imm(R4, TCP_SYN | TCP_ACK));
    to_pass.push(p.len());
    p.push(jump_if_not(R4, TCP_SYN, 0));
    // r6 = ctx; r7 = the table (entry 0 of the loads map).
    p.push(mov(R6, R1));
    p.push(store32_imm(FP, -4, 0));
    p.push(mov(R2, FP));
    p.push(add_imm(R2, -4));
    p.extend(load_map(R1, loads));
    p.push(call(MAP_LOOKUP_ELEM));
    to_pass.push(p.len());
    p.push(jump_if_zero(R0, 0));
    p.push(mov(R7, R0));
    // r9 = the lowest load so far, r8 = its slot.
    p.push(load64(R9, R7, 0));
    p.push(load64(R1, R7, 8));
    p.push(sub(R9, R1));
    p.push(mov_imm(R8, 0));
    for i in 1..workers {
        let at = (i * SLOT_SIZE) as i16;
        p.push(load64(R2, R7, at));
        p.push(load64(R1, R7, at + 8));
        p.push(sub(R2, R1)); // r2 = load of slot i
        p.push(mov(R3, R2));
        p.push(sub(R3, R9)); // r3 = load - lowest
        p.push(mov(R4, R3));
        p.push(arsh_imm(R4, 63)); // r4 = all ones if lower, else 0
        p.push(and(R3, R4));
        p.push(add(R9, R3)); // lowest = min(lowest, load)
        p.push(mov(R5, R8));
        p.push(xor_imm(R5, i as i32));
        p.push(and(R5, R4));
        p.push(xor(R8, R5)); // slot = lower ? i : slot
    }
    // Bounds the slot for the verifier (it cannot see the masks' effect).
    to_pass.push(p.len());
    p.push(jump_if_above(R8, workers as i32 - 1, 0));
    p.push(mov(R1, R8));
    p.push(lsh_imm(R1, SLOT_SIZE.trailing_zeros() as i32));
    p.push(add(R7, R1)); // r7 = &table[slot]
    p.push(store32(FP, R8, -8));
    p.push(mov(R1, R6));
    p.extend(load_map(R2, sockets));
    p.push(mov(R3, FP));
    p.push(add_imm(R3, -8));
    p.push(mov_imm(R4, 0));
    p.push(call(SK_SELECT_REUSEPORT));
    to_pass.push(p.len());
    p.push(jump_if_not(R0, 0, 0));
    p.push(mov_imm(R1, 1));
    p.push(atomic_add64(R7, R1, 0)); // table[slot].steered += 1
    let pass = p.len();
    p.push(mov_imm(R0, SK_PASS));
    p.push(exit());
    for at in to_pass {
        p[at].off = (pass - at - 1) as i16;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    #[test]
    fn the_program_reads_every_slot_once() {
        let p = program(4, 3, 4);
        let loads = p.iter().filter(|i| i.code == 0x79).count();
        assert_eq!(loads, 2 + 8, "the packet's bounds, then steered and base of each of 4 slots");
        assert_eq!(p.last().map(|i| i.code), Some(0x95), "ends with exit");
    }

    #[test]
    fn every_jump_lands_on_the_pass_exit() {
        let p = program(3, 3, 4);
        let pass = p.len() - 2;
        for (at, i) in p.iter().enumerate() {
            if matches!(i.code, 0x15 | 0x55 | 0x25 | 0x2d) {
                assert_eq!(at + 1 + i.off as usize, pass, "jump at {at}");
            }
        }
    }

    #[test]
    fn a_tracker_counts_closed_clients_off_the_load() {
        let slot = Slot::default();
        let mut t = Tracker::new(&slot);
        slot.steered.store(3, Ordering::Relaxed); // three clients queued
        assert_eq!(slot.load(), 3);
        t.accepted();
        t.accepted();
        t.settle(2);
        assert_eq!(slot.load(), 3, "accepting moves a client from queue to worker");
        t.settle(1);
        assert_eq!(slot.load(), 2, "a closed client leaves");
    }

    #[test]
    fn a_retired_worker_looks_busier_than_any_other() {
        let slot = Slot::default();
        let mut t = Tracker::new(&slot);
        slot.steered.store(7, Ordering::Relaxed);
        t.retire(3);
        assert_eq!(slot.load(), RETIRED + 3);
        assert_eq!(slot.clients(), 3, "the clients it still holds");
        t.settle(1);
        assert_eq!((slot.load(), slot.clients()), (RETIRED + 1, 1));
        let other = Slot::default();
        other.steered.store(1 << 40, Ordering::Relaxed);
        assert!(slot.load() > other.load(), "busier than any live worker");
    }

    #[test]
    fn an_empty_queue_resets_the_load_to_the_clients_held() {
        let slot = Slot::default();
        let mut t = Tracker::new(&slot);
        // Ten counted clients, four of which never finished their handshake.
        slot.steered.store(10, Ordering::Relaxed);
        for _ in 0..6 {
            t.accepted();
        }
        t.settle(6);
        assert_eq!(slot.load(), 10);
        t.queue_empty(6);
        assert_eq!(slot.load(), 6);
        t.settle(0);
        assert_eq!(slot.load(), 0);
    }

    fn group(n: usize) -> Vec<TcpListener> {
        let first = crate::listener::bind("127.0.0.1:0".parse().expect("addr"), n).expect("bind");
        assert_eq!(first.len(), n);
        first
    }

    /// Which listener of `ls` the next client lands on.
    fn lands_on(ls: &[TcpListener], addr: SocketAddr) -> (usize, TcpStream) {
        let client = TcpStream::connect(addr).expect("connect");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for (i, l) in ls.iter().enumerate() {
                if let Ok((s, _)) = l.accept() {
                    drop(s);
                    return (i, client);
                }
            }
            assert!(Instant::now() < deadline, "no listener got the client");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_kernel_sends_each_client_to_the_least_loaded_listener() {
        if !crate::bpf::allowed() {
            eprintln!("skipped: loading an eBPF program needs root and bpf(2)");
            return;
        }
        let ls = group(3);
        let addr = ls[0].local_addr().expect("addr");
        let fds: Vec<RawFd> = ls.iter().map(|l| l.as_raw_fd()).collect();
        let steering = Steering::attach(&fds).expect("attach");
        // Loads 5, 2, 4: clients go to 1 until it is level with 2, then to
        // the first of the lowest each time.
        steering.slot(0).steered.store(5, Ordering::Relaxed);
        steering.slot(1).steered.store(2, Ordering::Relaxed);
        steering.slot(2).steered.store(4, Ordering::Relaxed);
        let mut held = Vec::new();
        let mut order = Vec::new();
        for _ in 0..6 {
            let (i, c) = lands_on(&ls, addr);
            order.push(i);
            held.push(c);
        }
        assert_eq!(order, [1, 1, 1, 2, 0, 1]);
        assert_eq!([0, 1, 2].map(|i| steering.slot(i).load()), [6, 6, 5]);
    }
}
