//! The kernel relay (`--kernel-relay auto`, off by default): a pair's
//! bytes moved from socket to socket by an `sk_skb` verdict program,
//! without waking lb. Sessions join it and leave it (`session`); see
//! docs/sockmap-relay.md for the measurements behind it.
//!
//! Each direction of a joined pair has a [`Slot`] in a table shared with
//! the program (an mmap'ed BPF array). The program redirects a received
//! skb to the peer's send side while the direction's budget lasts; once it
//! runs out, it passes every later skb to the socket's own receive side
//! (`SK_PASS`, where TCP flow control holds the sender back) and lb
//! relays that direction by copy for the rest of the pair's life. A ring
//! buffer carries the slot number to lb when the budget runs low (lb tops
//! it up if the peer keeps draining) and when it runs out.
//!
//! Kernel behaviours this works around (6.18), each found by a byte-exact
//! test: a FIN in an skb of its own reaches the program as 0 bytes, and
//! redirected it breaks the peer's transmit (the program drops it); a
//! socket joins a sockhash only while ESTABLISHED (a failed join leaves
//! its direction on copy); the FIN's wakeup comes before the program has
//! seen the data ahead of it (see [`fin_drained`]); once passed bytes
//! have been read, `recv` may report the end while more passed bytes wait
//! in the kernel (see [`end_is_real`]); and a socket leaving the maps
//! strands or drops bytes, so a joined socket stays until it closes.
//!
//! Bounded only if redirected bytes never wait in a psock: a socket's
//! passed skbs queue behind those uncharged, and then nothing bounds them
//! (a client and a backend that both send and never read pushed 300 MB in
//! 2 s through a prototype that granted 1 MiB at a time regardless). So
//! [`Redirector::refill`] grants no more than the peer's send queue can
//! take, in a send buffer fixed at join.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::bpf::*;

/// One direction's budget, shared with the program. lb writes `granted`
/// and `notified` (back to 0 after a top-up); the program writes `used`,
/// `passing` and `notified` (to 1).
#[repr(C)]
#[derive(Debug, Default)]
pub struct Slot {
    granted: AtomicU64,
    used: AtomicU64,
    passing: AtomicU32,
    notified: AtomicU32,
}

const SLOT_SIZE: usize = std::mem::size_of::<Slot>();
const GRANTED: i16 = 0;
const USED: i16 = 8;
const PASSING: i16 = 16;
const NOTIFIED: i16 = 20;

impl Slot {
    /// Bytes the program redirected so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Whether the budget ran out: the direction is lb's to copy from now on.
    pub fn passing(&self) -> bool {
        self.passing.load(Ordering::Acquire) != 0
    }

    /// Raises the bytes granted so far to `total` (never lowers them) and
    /// allows the next low-budget notice.
    fn grant(&self, total: u64) {
        self.granted.fetch_max(total, Ordering::Release);
        self.notified.store(0, Ordering::Release);
    }

    fn reset(&self, budget: u64) {
        self.used.store(0, Ordering::Relaxed);
        self.passing.store(0, Ordering::Relaxed);
        self.notified.store(0, Ordering::Relaxed);
        self.granted.store(budget, Ordering::Release);
    }
}

/// Which directions of a pair the program relays after [`Redirector::join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    pub client_to_backend: bool,
    pub backend_to_client: bool,
}

impl Joined {
    const NONE: Joined = Joined { client_to_backend: false, backend_to_client: false };
}

/// Bytes a direction may have in flight towards its peer at a time: small
/// messages never come near it, and each top-up costs lb one wakeup.
pub const BUDGET: u32 = 128 * 1024;

/// Top-ups asked for closer together than this mean a bulk flow, which the
/// kernel relays slower than lb copies it: it is let run out and goes back
/// to lb. In the kernel a bulk flow asks every 130 us or so (64 KiB at
/// 4-5 Gbit/s); a single connection trading 1 KiB messages as fast as
/// loopback allows (30k round trips a second) every 2 ms.
pub const BULK_TOP_UP_INTERVAL: std::time::Duration = std::time::Duration::from_micros(500);

/// Whether a direction that asked for a top-up at `now`, and last at
/// `last`, still looks like request/response traffic that the kernel
/// relay serves better than lb.
pub fn worth_topping_up(last: Option<std::time::Instant>, now: std::time::Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= BULK_TOP_UP_INTERVAL)
}

/// One worker's program, maps, slot table and ring buffer.
#[derive(Debug)]
pub struct Redirector {
    /// Map A: the sockets whose received bytes the program sees.
    verdict: OwnedFd,
    /// Map B: a socket's cookie to its peer, where the program sends.
    targets: OwnedFd,
    /// A socket's cookie to its direction's slot.
    slot_of: OwnedFd,
    table: Mapping,
    slots: u32,
    ring: Ring,
    budget: u64,
    _program: OwnedFd,
}

const GET_SOCKET_COOKIE: i32 = 46;
const SK_REDIRECT_HASH: i32 = 72;
const RINGBUF_OUTPUT: i32 = 130;

/// The verdict for a budget of `budget` bytes at a time, noticing lb when
/// less than half is left. Stack: the cookie at -8, the slot at -16.
pub(crate) fn program(budget: u32, targets: RawFd, slot_of: RawFd, table: RawFd, ring: RawFd) -> Vec<Insn> {
    let low = i32::try_from(budget / 2).unwrap_or(i32::MAX);
    let mut a = Asm::default();
    let (pass, drop, exhausted, redirect) = (a.label(), a.label(), a.label(), a.label());
    a.push(mov(R6, R1)); // r6 = skb
    a.push(load32(R2, R6, 0)); // skb->len
    a.jump(jump_if_zero(R2, 0), drop);
    a.push(call(GET_SOCKET_COOKIE));
    a.push(store64(FP, R0, -8));
    a.extend(load_map(R1, slot_of));
    a.push(mov(R2, FP));
    a.push(add_imm(R2, -8));
    a.push(call(MAP_LOOKUP_ELEM));
    a.jump(jump_if_zero(R0, 0), pass); // not a joined socket
    a.push(load32(R1, R0, 0)); // zero-extended: the notice sends all 8 bytes
    a.push(store64(FP, R1, -16));
    a.extend(load_map(R1, table));
    a.push(mov(R2, FP));
    a.push(add_imm(R2, -16));
    a.push(call(MAP_LOOKUP_ELEM));
    a.jump(jump_if_zero(R0, 0), pass);
    a.push(mov(R7, R0)); // r7 = &slot
    a.push(load32(R1, R7, PASSING));
    a.jump(jump_if_not(R1, 0, 0), pass); // sticky
    a.push(load32(R2, R6, 0));
    a.push(load64(R3, R7, USED));
    a.push(add(R3, R2));
    a.push(load64(R4, R7, GRANTED));
    a.jump(jump_if_beyond(R3, R4, 0), exhausted);
    a.push(store64(R7, R3, USED));
    a.push(sub(R4, R3)); // budget left
    a.jump(jump_if_at_least(R4, low, 0), redirect);
    a.push(load32(R1, R7, NOTIFIED));
    a.jump(jump_if_not(R1, 0, 0), redirect);
    a.push(store32_imm(R7, NOTIFIED, 1));
    notify(&mut a, ring);
    // A full ring lost the notice: let the next skb send it again.
    a.jump(jump_if_zero(R0, 0), redirect);
    a.push(store32_imm(R7, NOTIFIED, 0));
    a.bind(redirect);
    a.push(mov(R1, R6));
    a.extend(load_map(R2, targets));
    a.push(mov(R3, FP));
    a.push(add_imm(R3, -8));
    a.push(mov_imm(R4, 0));
    a.push(call(SK_REDIRECT_HASH));
    a.push(exit());
    a.bind(exhausted);
    // A lost notice of this one is found by lb's scan of `passing`.
    a.push(store32_imm(R7, PASSING, 1));
    notify(&mut a, ring);
    a.bind(pass);
    a.push(mov_imm(R0, SK_PASS));
    a.push(exit());
    a.bind(drop);
    a.push(mov_imm(R0, SK_DROP));
    a.push(exit());
    a.finish()
}

/// `BPF_RB_FORCE_WAKEUP`: without it the kernel wakes the reader only
/// when the reader has caught up with the record, and a record committed
/// while lb drains the ring would wait for the next wakeup (helper-65's
/// review). Notices are rare enough to wake for each.
const RINGBUF_FORCE_WAKEUP: i32 = 2;

/// Sends the slot number at -16 to lb through the ring buffer.
fn notify(a: &mut Asm, ring: RawFd) {
    a.extend(load_map(R1, ring));
    a.push(mov(R2, FP));
    a.push(add_imm(R2, -16));
    a.push(mov_imm(R3, 8));
    a.push(mov_imm(R4, RINGBUF_FORCE_WAKEUP));
    a.push(call(RINGBUF_OUTPUT));
}

/// The consumer side of a BPF ring buffer: its position page (written by
/// lb) and the producer page followed by the data, mapped twice over so a
/// record never wraps.
#[derive(Debug)]
struct Ring {
    map: OwnedFd,
    consumer: Mapping,
    producer: Mapping,
    size: usize,
    page: usize,
}

const RINGBUF_BUSY: u32 = 1 << 31;
const RINGBUF_DISCARD: u32 = 1 << 30;
const RINGBUF_HEADER: usize = 8;

impl Ring {
    fn new(size: usize) -> io::Result<Ring> {
        let map = map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, size as u32, 0)?;
        let page = page_size();
        let consumer = Mapping::new(map.as_raw_fd(), page, 0, true)?;
        let producer = Mapping::new(map.as_raw_fd(), page + 2 * size, page, false)?;
        Ok(Ring { map, consumer, producer, size, page })
    }

    fn position(m: &Mapping) -> &AtomicU64 {
        // SAFETY: a position is the first 8 bytes of its page, aligned.
        unsafe { &*m.ptr().cast::<AtomicU64>() }
    }

    /// Calls `f` with each slot number waiting, oldest first, until the
    /// producer stops moving: a record committed during a pass is taken in
    /// the next, as the ring is edge-triggered for lb.
    fn drain(&self, mut f: impl FnMut(u32)) {
        let cons = Self::position(&self.consumer);
        loop {
            let prod = Self::position(&self.producer).load(Ordering::SeqCst);
            let at = cons.load(Ordering::Relaxed);
            if at >= prod || !self.drain_to(prod, &mut f) {
                return;
            }
        }
    }

    /// One pass up to `prod`; false if a record there is still being
    /// written (the commit wakes lb again).
    fn drain_to(&self, prod: u64, f: &mut impl FnMut(u32)) -> bool {
        let cons = Self::position(&self.consumer);
        let mut at = cons.load(Ordering::Relaxed);
        while at < prod {
            let offset = self.page + (at as usize & (self.size - 1));
            // SAFETY: within the producer mapping (data is mapped twice).
            let header = unsafe { &*self.producer.ptr().add(offset).cast::<AtomicU32>() };
            let len = header.load(Ordering::Acquire);
            if len & RINGBUF_BUSY != 0 {
                return false;
            }
            if len & RINGBUF_DISCARD == 0 {
                // SAFETY: the record's 8-byte payload follows its header.
                let slot =
                    unsafe { std::ptr::read_volatile(self.producer.ptr().add(offset + RINGBUF_HEADER).cast::<u32>()) };
                f(slot);
            }
            let len = (len & !(RINGBUF_BUSY | RINGBUF_DISCARD)) as usize;
            at += ((RINGBUF_HEADER + len + 7) & !7) as u64;
            // SeqCst, so the producer position read next is not read ahead
            // of this store: a record committed in between sees the reader
            // caught up (or is read by the next pass).
            cons.store(at, Ordering::SeqCst);
        }
        true
    }
}

impl Redirector {
    /// Loads the program for `slots` directions (two per pair) with a
    /// budget of `budget` bytes at a time. Needs CAP_BPF and CAP_NET_ADMIN.
    pub fn new(slots: u32, budget: u32) -> io::Result<Redirector> {
        let verdict = map_create(BPF_MAP_TYPE_SOCKHASH, 8, 4, slots, 0)?;
        let targets = map_create(BPF_MAP_TYPE_SOCKHASH, 8, 4, slots, 0)?;
        let slot_of = map_create(BPF_MAP_TYPE_HASH, 8, 4, slots, 0)?;
        let table_map = map_create(BPF_MAP_TYPE_ARRAY, 4, SLOT_SIZE as u32, slots, BPF_F_MMAPABLE)?;
        let table =
            Mapping::new(table_map.as_raw_fd(), (slots as usize * SLOT_SIZE).next_multiple_of(page_size()), 0, true)?;
        // Room for every direction's two notices (16 bytes each with the
        // header), so none is lost while lb is slow to read them.
        let ring = Ring::new((slots as usize * 2 * 16).next_power_of_two().max(page_size()))?;
        let code =
            program(budget, targets.as_raw_fd(), slot_of.as_raw_fd(), table_map.as_raw_fd(), ring.map.as_raw_fd());
        let prog = prog_load(BPF_PROG_TYPE_SK_SKB, 0, &code)?;
        prog_attach(verdict.as_raw_fd(), prog.as_raw_fd(), BPF_SK_SKB_VERDICT)?;
        Ok(Redirector { verdict, targets, slot_of, table, slots, ring, budget: u64::from(budget), _program: prog })
    }

    /// How many directions the table has room for.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Direction `i`'s slot.
    pub fn slot(&self, i: u32) -> &Slot {
        assert!(i < self.slots, "a slot of the table");
        // SAFETY: in bounds of the mapping, which outlives `&self`; a Slot is
        // atomics only.
        unsafe { &*self.table.ptr().cast::<Slot>().add(i as usize) }
    }

    /// The ring buffer's descriptor, readable when a notice waits.
    pub fn events_fd(&self) -> RawFd {
        self.ring.map.as_raw_fd()
    }

    /// Calls `f` with the slot of each notice waiting.
    pub fn events(&self, f: impl FnMut(u32)) {
        self.ring.drain(f);
    }

    /// Hands the pair to the program, client to backend on slot
    /// `slots[0]` and back on `slots[1]`. lb must hold none of its bytes.
    /// A direction the kernel refuses (its source saw a FIN already) stays
    /// lb's to copy; nothing of it was read by the program.
    pub fn join(&self, client: RawFd, backend: RawFd, slots: [u32; 2]) -> io::Result<Joined> {
        let (c, b) = (cookie(client)?, cookie(backend)?);
        // Never more in flight than the peer's send queue can take: the
        // first grant leaves out what already waits there.
        self.slot(slots[0]).reset(self.budget.saturating_sub(unacked(backend)?));
        self.slot(slots[1]).reset(self.budget.saturating_sub(unacked(client)?));
        // Targets first: once a socket is in the verdict map its bytes are
        // redirected, and a missing target drops them.
        if put_fd(&self.targets, c, backend).and_then(|()| put_fd(&self.targets, b, client)).is_err() {
            self.forget(c, b);
            return Ok(Joined::NONE);
        }
        if map_put(self.slot_of.as_raw_fd(), &c.to_ne_bytes(), &slots[0].to_ne_bytes())
            .and_then(|()| map_put(self.slot_of.as_raw_fd(), &b.to_ne_bytes(), &slots[1].to_ne_bytes()))
            .is_err()
        {
            self.forget(c, b);
            return Ok(Joined::NONE);
        }
        // A fixed send buffer twice the budget (the kernel doubles what it
        // is given), so a peer always has room for what is granted. Set
        // only once the pair is surely joining: it stays for good.
        for fd in [client, backend] {
            set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, self.budget as libc::c_int)?;
        }
        if put_fd(&self.verdict, c, client).is_err() {
            self.forget(c, b);
            return Ok(Joined::NONE);
        }
        let joined = Joined { client_to_backend: true, backend_to_client: put_fd(&self.verdict, b, backend).is_ok() };
        // Bytes that arrived before the join wait for a wakeup that already
        // happened; setting SO_RCVLOWAT runs the program over them. The pair
        // is joined either way, so a failure here is not the caller's to
        // act on: the next bytes run the program too.
        let _ = kick(client);
        if joined.backend_to_client {
            let _ = kick(backend);
        }
        Ok(joined)
    }

    /// Answers a low-budget notice for direction `slot`, whose bytes go to
    /// `peer` (`connected`: the peer made the connect; `wrote`: what lb
    /// wrote to it itself). Grants only what the peer's send queue can
    /// still take: bytes the program redirects must never wait in the
    /// peer's psock queue, where the peer's own passed bytes would queue
    /// behind them uncharged and nothing would bound them. A peer that is
    /// not draining gets nothing: the budget runs out and the direction
    /// falls back to lb. Returns whether it granted more.
    pub fn refill(&self, slot: u32, peer: RawFd, connected: bool, wrote: u64) -> io::Result<bool> {
        let s = self.slot(slot);
        let used = s.used();
        let handed = handed(peer)?;
        let delivered = handed.saturating_sub(u64::from(connected)).saturating_sub(wrote);
        let queued = unacked(peer)? + used.saturating_sub(delivered);
        if queued >= self.budget / 2 {
            return Ok(false);
        }
        s.grant(used + (self.budget - queued));
        Ok(true)
    }

    /// Forgets a pair whose sockets are closing (the sockhashes drop a
    /// socket by themselves when it closes; the slot index does not).
    pub fn leave(&self, client_cookie: u64, backend_cookie: u64) {
        let _ = map_delete(self.slot_of.as_raw_fd(), &client_cookie.to_ne_bytes());
        let _ = map_delete(self.slot_of.as_raw_fd(), &backend_cookie.to_ne_bytes());
    }

    /// Undoes a join that failed before any socket reached the verdict map.
    fn forget(&self, c: u64, b: u64) {
        let _ = map_delete(self.targets.as_raw_fd(), &c.to_ne_bytes());
        let _ = map_delete(self.targets.as_raw_fd(), &b.to_ne_bytes());
        self.leave(c, b);
    }
}

fn put_fd(map: &OwnedFd, key: u64, fd: RawFd) -> io::Result<()> {
    map_put(map.as_raw_fd(), &key.to_ne_bytes(), &(fd as u32).to_ne_bytes())
}

const SO_COOKIE: libc::c_int = 57;

/// The kernel's 64-bit id of a socket, the program's key for it.
pub fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut c = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the length given.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_COOKIE, (&mut c as *mut u64).cast(), &mut len) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(c) }
}

fn kick(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with an int option value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `tcpi_bytes_acked` and `tcpi_bytes_received` of a socket. The first
/// counts the SYN of a socket that connected and a FIN once acked; the
/// second counts a received FIN as one byte.
pub fn tcp_counts(fd: RawFd) -> io::Result<(u64, u64)> {
    let info = tcp_info(fd)?;
    let at = |i: usize| u64::from_ne_bytes(info[i..i + 8].try_into().expect("8 bytes"));
    Ok((at(120), at(128)))
}

/// Whether the socket's peer has ended its stream, by its FIN or a reset,
/// from its TCP state: a check that takes nothing from the socket, for
/// when its events could not tell. Which of the two it was is for
/// [`source_end`] to say.
pub fn stream_ended(fd: RawFd) -> io::Result<bool> {
    Ok(matches!(tcp_info(fd)?[0], TIME_WAIT | CLOSE_WAIT | LAST_ACK | CLOSING | CLOSE))
}

/// Whether the connection is over, by a reset, or by the peer's FIN once
/// lb had sent its own (FIN_WAIT2 hands over to a time-wait socket and
/// leaves the one lb holds in TCP's CLOSE state too). A reset's error
/// may already have been taken by a write, so the socket need not report
/// it.
pub fn was_closed(fd: RawFd) -> io::Result<bool> {
    Ok(tcp_info(fd)?[0] == CLOSE)
}

/// What a source whose end TCP reported has come to, by its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEnd {
    /// A FIN, with every byte ahead of it seen ([`fin_drained`]).
    Fin,
    /// A reset: the socket is closed ([`was_closed`]) and its received
    /// count holds no FIN byte beyond what the program and lb took.
    Reset,
    /// Bytes ahead of the end the program has yet to see: they keep the
    /// count above that sum for a FIN and a reset alike, so wait. (A
    /// reset with exactly one byte unseen would read as a FIN, but the
    /// program runs over a segment's bytes before a later reset is
    /// taken in.)
    Unseen,
}

/// How a source ended: `received` counts its FIN; `used` is what the
/// program redirected, `read` what lb took itself; `closed` whether the
/// socket is in TCP's CLOSE state ([`was_closed`]).
pub fn source_end(received: u64, used: u64, read: u64, closed: bool) -> SourceEnd {
    if fin_drained(received, used, read) {
        SourceEnd::Fin
    } else if closed && received <= used + read {
        SourceEnd::Reset
    } else {
        SourceEnd::Unseen
    }
}

const TIME_WAIT: u8 = 6;
const CLOSE: u8 = 7;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// A socket's `struct tcp_info`, as far as the byte counts (kernel 4.19+).
fn tcp_info(fd: RawFd) -> io::Result<[u8; 232]> {
    let mut info = [0u8; 232];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of the length given.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < 136 {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    Ok(info)
}

/// Bytes in a socket's send queue not yet acknowledged (SIOCOUTQ).
fn unacked(fd: RawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(n.max(0) as u64) }
}

/// Bytes ever handed to `fd`'s send queue, its SYN included when `fd`
/// connected. Acked is read first, so an ACK landing in between can only
/// make this short: a barrier that waits on it never passes early.
pub fn handed(fd: RawFd) -> io::Result<u64> {
    let (acked, _) = tcp_counts(fd)?;
    Ok(acked + unacked(fd)?)
}

/// Whether every byte the program redirected to the peer is in the peer's
/// send queue: `handed` is [`handed`] of the peer, `connected` whether the
/// peer made the connect (its SYN is counted), `wrote` what lb wrote to
/// the peer itself.
pub fn drained(used: u64, handed: u64, connected: bool, wrote: u64) -> bool {
    handed.saturating_sub(u64::from(connected)).saturating_sub(wrote) >= used
}

/// Whether the program has seen every byte ahead of a FIN the source
/// received: its wakeup comes from TCP before the program runs on the
/// same segment's data. `received` counts the FIN; `read` is what lb read
/// from the source itself.
pub fn fin_drained(received: u64, used: u64, read: u64) -> bool {
    received == used + read + 1
}

/// Whether a 0 from `recv` on a source that fell back is its real end:
/// passed bytes may still wait in the kernel on their way to the socket,
/// and `recv` does not see them. Same sums as [`fin_drained`].
pub fn end_is_real(received: u64, used: u64, read: u64) -> bool {
    fin_drained(received, used, read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::FromRawFd;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    #[test]
    fn a_barrier_waits_for_the_peers_syn_and_lbs_own_bytes_to_be_discounted() {
        assert!(!drained(100, 100, true, 0), "one of the 100 is the SYN");
        assert!(drained(100, 101, true, 0));
        assert!(drained(100, 150, false, 50), "50 were lb's own");
        assert!(!drained(100, 149, false, 50));
    }

    #[test]
    fn a_fin_is_relayed_only_once_the_program_saw_every_byte_before_it() {
        assert!(fin_drained(1001, 1000, 0));
        assert!(!fin_drained(1001, 900, 0), "100 bytes not seen by the program yet");
        assert!(fin_drained(1001, 600, 400), "400 read by lb after a fallback");
    }

    #[test]
    fn a_reset_is_told_from_a_fin_by_the_byte_the_fin_counts() {
        use SourceEnd::*;
        assert_eq!(source_end(1001, 1000, 0, true), Fin, "a FIN after lb's own closes the socket too");
        assert_eq!(source_end(1001, 1000, 0, false), Fin);
        assert_eq!(source_end(1000, 1000, 0, true), Reset);
        assert_eq!(source_end(1000, 600, 400, true), Reset, "400 read by lb after a fallback");
        assert_eq!(source_end(1004, 1000, 0, true), Unseen, "3 bytes and a FIN not seen by the program yet");
        assert_eq!(source_end(1500, 1000, 0, true), Unseen, "500 bytes not seen by the program yet");
        assert_eq!(source_end(1000, 1000, 0, false), Unseen, "open: the FIN's byte is still to come");
    }

    #[test]
    fn a_fin_after_lb_sent_its_own_closes_the_socket_and_is_told_from_a_reset() {
        // No program here: `read` is every byte, as for a direction that
        // went back to lb. Each connection gets lb's FIN first; the peer
        // then ends with its own FIN, or with a reset after the same bytes.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        for reset in [false, true] {
            let s = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (mut p, _) = l.accept().expect("accept");
            for end in [&s, &p] {
                end.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            }
            s.shutdown(Shutdown::Write).expect("lb's FIN");
            assert_eq!(p.read(&mut [0u8; 8]).expect("the FIN"), 0);
            p.write_all(b"abc").expect("the peer's last bytes");
            if reset {
                socket2::SockRef::from(&p).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
            }
            drop(p);
            // CLOSE either way, once a FIN has been through CLOSING or the
            // time-wait handoff.
            wait_until("the close", || was_closed(s.as_raw_fd()).expect("TCP_INFO"));
            assert!(stream_ended(s.as_raw_fd()).expect("TCP_INFO"));
            let mut got = Vec::new();
            let _ = (&s).read_to_end(&mut got);
            assert_eq!(got, b"abc", "reset: {reset}");
            let (_, received) = tcp_counts(s.as_raw_fd()).expect("TCP_INFO");
            let end = if reset { SourceEnd::Reset } else { SourceEnd::Fin };
            assert_eq!(source_end(received, 0, 3, true), end, "received {received}");
        }
    }

    #[test]
    fn every_jump_of_the_program_lands_inside_it() {
        let p = program(1 << 20, 4, 5, 6, 7);
        for (at, i) in p.iter().enumerate() {
            if i.code & 0x07 == 0x05 && i.code != 0x85 && i.code != 0x95 {
                let to = at as i64 + 1 + i64::from(i.off);
                assert!(to > at as i64 && (to as usize) < p.len(), "jump at {at} to {to}");
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(0x95));
    }

    fn root() -> bool {
        let yes = crate::bpf::allowed();
        if !yes {
            eprintln!("skipped: loading an sk_skb program needs root and bpf(2)");
        }
        yes
    }

    /// Two connected pairs: (client app, lb's client socket) and (lb's
    /// backend socket, backend app).
    fn pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let app = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (client, _) = l.accept().expect("accept");
        let backend = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (be, _) = l.accept().expect("accept");
        for s in [&app, &client, &backend, &be] {
            s.set_nodelay(true).expect("nodelay");
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        }
        (app, client, backend, be)
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        s.read_exact(&mut got).expect("read");
        got
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// lb's side of a source it copies from after a fallback, read as lb
    /// reads it: non-blocking, and waiting for an edge-triggered epoll
    /// event for input or the end (mio's READABLE). Not a blocking
    /// `recv`: on a socket in the verdict's map the kernel's receive hook
    /// (6.18) returns EAGAIN from a blocking wait that ends with no passed
    /// bytes to take, as when the FIN is what woke it, instead of the end.
    struct LbSource {
        src: TcpStream,
        epoll: OwnedFd,
    }

    impl LbSource {
        fn new(src: TcpStream) -> LbSource {
            src.set_nonblocking(true).expect("nonblocking");
            // SAFETY: no arguments to check; the result is checked below.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            assert!(fd >= 0, "epoll_create1: {}", io::Error::last_os_error());
            // SAFETY: a new epoll instance that nothing else owns; OwnedFd
            // must not be given -1, hence the check above.
            let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
            let events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET;
            let mut ev = libc::epoll_event { events: events as u32, u64: 0 };
            // SAFETY: both descriptors are open.
            let rc = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, src.as_raw_fd(), &mut ev) };
            assert_eq!(rc, 0, "epoll_ctl");
            LbSource { src, epoll }
        }

        /// The next bytes (0: a read of 0), waiting for an event when
        /// there are none; an event that never comes by `deadline` fails.
        fn read(&mut self, buf: &mut [u8], deadline: Instant) -> usize {
            loop {
                match self.src.read(buf) {
                    Ok(n) => return n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
                        let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 1];
                        // SAFETY: epoll_wait into a buffer of 1 event.
                        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ev.as_mut_ptr(), 1, ms) };
                        assert!(n != 0, "no wakeup for the source's bytes or end");
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }

        /// Copies what the source has to `dst` until its real end, as lb
        /// does once a direction fell back: a read of 0 while the kernel
        /// still owes bytes is looked at again a millisecond later (lb's
        /// `Owed`). `used` is what the program redirected, read what lb
        /// read before; returns what lb read in all.
        fn copy_to_end(&mut self, dst: &mut TcpStream, used: &Slot, mut read: u64) -> u64 {
            let mut buf = vec![0; 32 * 1024];
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "the copy never reached the end");
                let n = self.read(&mut buf, deadline);
                if n == 0 {
                    let (_, received) = tcp_counts(self.src.as_raw_fd()).expect("counts");
                    if end_is_real(received, used.used(), read) {
                        return read;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                read += n as u64;
                dst.write_all(&buf[..n]).expect("send");
            }
        }
    }

    #[test]
    fn the_program_relays_both_ways_without_lb_reading_a_byte() {
        if !root() {
            return;
        }
        let r = Redirector::new(64, 1 << 20).expect("load");
        let (mut app, client, backend, mut be) = pairs();
        let joined = r.join(client.as_raw_fd(), backend.as_raw_fd(), [0, 1]).expect("join");
        assert_eq!(joined, Joined { client_to_backend: true, backend_to_client: true });
        let up = random(200_000, 1);
        let down = random(150_000, 2);
        let writer = {
            let mut app = app.try_clone().expect("clone");
            let up = up.clone();
            std::thread::spawn(move || app.write_all(&up).expect("write"))
        };
        assert!(read_n(&mut be, up.len()) == up, "the backend got the client's bytes, in order");
        writer.join().expect("writer");
        be.write_all(&down).expect("write");
        assert!(read_n(&mut app, down.len()) == down, "the client got the backend's bytes");
        assert_eq!((r.slot(0).used(), r.slot(1).used()), (up.len() as u64, down.len() as u64));
        assert!(drained(r.slot(0).used(), handed(backend.as_raw_fd()).expect("handed"), true, 0));
    }

    #[test]
    fn bytes_sent_before_the_join_are_relayed_by_it() {
        if !root() {
            return;
        }
        let r = Redirector::new(64, 1 << 20).expect("load");
        let (mut app, client, backend, mut be) = pairs();
        app.write_all(b"early").expect("write");
        wait_until("the bytes to arrive", || tcp_counts(client.as_raw_fd()).map(|c| c.1).unwrap_or(0) == 5);
        r.join(client.as_raw_fd(), backend.as_raw_fd(), [2, 3]).expect("join");
        assert_eq!(read_n(&mut be, 5), b"early");
    }

    #[test]
    fn a_direction_out_of_budget_is_passed_to_lb_in_order_and_noticed() {
        if !root() {
            return;
        }
        let r = Redirector::new(64, 64 * 1024).expect("load");
        let (app, client, mut backend, mut be) = pairs();
        r.join(client.as_raw_fd(), backend.as_raw_fd(), [4, 5]).expect("join");
        let up = random(2_000_000, 3);
        let writer = {
            let mut app = app.try_clone().expect("clone");
            let up = up.clone();
            std::thread::spawn(move || {
                app.write_all(&up).expect("write");
                app.shutdown(Shutdown::Write).expect("shutdown");
            })
        };
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            be.read_to_end(&mut got).expect("read");
            got
        });
        wait_until("the budget to run out", || r.slot(4).passing());
        let mut notices = Vec::new();
        wait_until("the notice", || {
            r.events(|s| notices.push(s));
            notices.contains(&4)
        });
        // lb's side of the fallback: wait for the redirected bytes to
        // reach the backend, then copy until the real end.
        wait_until("the drain", || drained(r.slot(4).used(), handed(backend.as_raw_fd()).unwrap_or(0), true, 0));
        let read = LbSource::new(client).copy_to_end(&mut backend, r.slot(4), 0);
        backend.shutdown(Shutdown::Write).expect("shutdown");
        writer.join().expect("writer");
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), up.len());
        assert!(got == up, "redirected bytes, then lb's copies, in order");
        assert!(r.slot(4).used() <= 64 * 1024 && read > 0, "both paths carried bytes");
    }

    /// The ending the test above meets only when the CPU is short: lb has
    /// read every byte passed to it and waits when the FIN comes, on its
    /// own. A blocking `recv` returned EAGAIN there in 8 runs of 8; lb's
    /// reads see the end.
    #[test]
    fn a_fin_after_lb_has_read_every_passed_byte_ends_its_copy() {
        if !root() {
            return;
        }
        let r = Redirector::new(64, 64 * 1024).expect("load");
        let (app, client, mut backend, mut be) = pairs();
        r.join(client.as_raw_fd(), backend.as_raw_fd(), [4, 5]).expect("join");
        let up = random(200_000, 6);
        let writer = {
            let (mut app, up) = (app, up.clone());
            std::thread::spawn(move || {
                app.write_all(&up).expect("write");
                app
            })
        };
        wait_until("the budget to run out", || r.slot(4).passing());
        wait_until("the drain", || drained(r.slot(4).used(), handed(backend.as_raw_fd()).unwrap_or(0), true, 0));
        let mut src = LbSource::new(client);
        let mut buf = vec![0; 32 * 1024];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut read = 0u64;
        while r.slot(4).used() + read < up.len() as u64 {
            let n = src.read(&mut buf, deadline);
            assert!(n > 0, "bytes owed, not the end");
            read += n as u64;
            backend.write_all(&buf[..n]).expect("send");
        }
        let app = writer.join().expect("writer");
        let fin = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            app.shutdown(Shutdown::Write).expect("shutdown");
            app
        });
        assert_eq!(src.copy_to_end(&mut backend, r.slot(4), read), read, "nothing after the last byte but the end");
        backend.shutdown(Shutdown::Write).expect("shutdown");
        fin.join().expect("app");
        let mut got = Vec::new();
        be.read_to_end(&mut got).expect("read");
        assert!(got == up, "redirected bytes, then lb's copies, in order");
    }

    #[test]
    fn a_backend_that_does_not_read_stops_the_client() {
        if !root() {
            return;
        }
        let r = Redirector::new(64, 64 * 1024).expect("load");
        let (mut app, client, backend, _be) = pairs();
        r.join(client.as_raw_fd(), backend.as_raw_fd(), [6, 7]).expect("join");
        app.set_nonblocking(true).expect("nonblocking");
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && sent < 256 << 20 {
            match app.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("write: {e}"),
            }
        }
        assert!(sent < 64 << 20, "{sent} bytes taken in: the kernel held far more than the budget");
        assert!(r.slot(6).passing(), "the budget ran out and the rest waits for lb");
    }

    #[test]
    fn a_fin_waits_until_the_program_has_moved_every_byte_before_it() {
        if !root() {
            return;
        }
        let r = Redirector::new(64, 1 << 20).expect("load");
        let (mut app, client, backend, mut be) = pairs();
        r.join(client.as_raw_fd(), backend.as_raw_fd(), [8, 9]).expect("join");
        let up = random(300_000, 4);
        app.write_all(&up).expect("write");
        app.shutdown(Shutdown::Write).expect("shutdown");
        wait_until("the FIN and its bytes", || {
            let received = tcp_counts(client.as_raw_fd()).map(|c| c.1).unwrap_or(0);
            fin_drained(received, r.slot(8).used(), 0)
                && drained(r.slot(8).used(), handed(backend.as_raw_fd()).unwrap_or(0), true, 0)
        });
        backend.shutdown(Shutdown::Write).expect("shutdown");
        let mut got = Vec::new();
        be.read_to_end(&mut got).expect("read");
        assert!(got == up, "every byte, then the FIN");
    }

    /// The notices' thread: it hands back how many top-ups it granted.
    type Served = std::thread::JoinHandle<usize>;

    /// A pair joined with a 64 KiB budget, lb's side of its notices
    /// answered on a thread until the returned flag is set.
    #[allow(clippy::type_complexity)]
    fn joined_and_served(
        slots: [u32; 2],
    ) -> (TcpStream, TcpStream, TcpStream, TcpStream, Arc<AtomicBool>, Arc<Redirector>, Served) {
        let r = Arc::new(Redirector::new(64, 64 * 1024).expect("load"));
        let (app, client, backend, be) = pairs();
        r.join(client.as_raw_fd(), backend.as_raw_fd(), slots).expect("join");
        let stop = Arc::new(AtomicBool::new(false));
        let (c, b, until, r2) = (client.as_raw_fd(), backend.as_raw_fd(), stop.clone(), Arc::clone(&r));
        let lb = std::thread::spawn(move || {
            let mut granted = 0;
            while !until.load(Ordering::Relaxed) {
                let mut due = Vec::new();
                r2.events(|s| due.push(s));
                for s in due {
                    let (peer, connected) = if s == slots[0] { (b, true) } else { (c, false) };
                    if r2.refill(s, peer, connected, 0).expect("refill") {
                        granted += 1;
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            granted
        });
        (app, client, backend, be, stop, r, lb)
    }

    /// Bytes direction `s` may still have redirected before it runs out.
    fn left(s: &Slot) -> u64 {
        s.granted.load(Ordering::Acquire).saturating_sub(s.used())
    }

    #[test]
    fn a_pair_that_keeps_draining_stays_in_the_kernel_past_its_first_budget() {
        if !root() {
            return;
        }
        let (mut app, _client, _backend, mut be, stop, r, lb) = joined_and_served([10, 11]);
        // 2,000 request/response rounds of 1 KiB: 2 MiB each way, 32 budgets.
        let msg = random(1024, 5);
        for _ in 0..2000 {
            // The top-ups come from another thread, as in lb they come from
            // its event loop. Sending on into a spent budget while the
            // scheduler keeps that thread off the CPU would test the
            // scheduler: the direction would fall back to a copy this
            // test's lb does not make.
            for s in [10, 11] {
                wait_until("a top-up", || left(r.slot(s)) >= msg.len() as u64);
            }
            app.write_all(&msg).expect("request");
            assert!(read_n(&mut be, msg.len()) == msg);
            be.write_all(&msg).expect("response");
            assert!(read_n(&mut app, msg.len()) == msg);
        }
        stop.store(true, Ordering::Relaxed);
        let granted = lb.join().expect("lb");
        assert!(!r.slot(10).passing() && !r.slot(11).passing(), "no direction fell back");
        assert_eq!((r.slot(10).used(), r.slot(11).used()), (2000 * 1024, 2000 * 1024));
        assert!(granted >= 2 * 30, "topped up as it went: {granted}");
    }

    #[test]
    fn a_pair_stuck_both_ways_is_held_to_its_budget() {
        if !root() {
            return;
        }
        let (mut app, _client, _backend, mut be, stop, _r, lb) = joined_and_served([12, 13]);
        // Both ends send and neither reads. The backend starts first and
        // slowly, so its bytes are redirected and then wait on the client's
        // reader; then the client floods, runs out of budget and falls back.
        let push = |s: &mut TcpStream, pace: Duration| {
            s.set_nonblocking(true).expect("nonblocking");
            let chunk = vec![9u8; 16 * 1024];
            let mut sent = 0usize;
            let deadline = Instant::now() + Duration::from_secs(4);
            while Instant::now() < deadline && sent < 256 << 20 {
                match s.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                    Err(e) => panic!("write: {e}"),
                }
                std::thread::sleep(pace);
            }
            sent
        };
        let down = std::thread::spawn(move || push(&mut be, Duration::from_millis(1)));
        std::thread::sleep(Duration::from_secs(1));
        let up = push(&mut app, Duration::ZERO);
        let down = down.join().expect("backend");
        stop.store(true, Ordering::Relaxed);
        lb.join().expect("lb");
        assert!(
            up < 16 << 20 && down < 16 << 20,
            "taken in: {up} up, {down} down; the kernel held far more than the budgets"
        );
    }

    #[test]
    fn a_fin_alone_in_its_segment_does_not_break_the_peer() {
        if !root() {
            return;
        }
        let r = Redirector::new(64, 1 << 20).expect("load");
        let (mut app, client, backend, mut be) = pairs();
        r.join(client.as_raw_fd(), backend.as_raw_fd(), [14, 15]).expect("join");
        app.write_all(b"req").expect("request");
        assert_eq!(read_n(&mut be, 3), b"req");
        // The FIN now comes on its own: the program sees a 0-byte skb.
        app.shutdown(Shutdown::Write).expect("shutdown");
        wait_until("the FIN", || {
            fin_drained(tcp_counts(client.as_raw_fd()).map(|c| c.1).unwrap_or(0), r.slot(14).used(), 0)
        });
        std::thread::sleep(Duration::from_millis(50));
        let error = backend.take_error().expect("SO_ERROR");
        assert!(error.is_none(), "lb's backend socket broke: {error:?}");
        be.write_all(b"resp").expect("response");
        assert_eq!(read_n(&mut app, 4), b"resp", "the other way still relays");
    }

    /// lb's side of one direction in the soak below.
    struct Leg {
        src: TcpStream,
        dst: RawFd,
        slot: u32,
        connected: bool,
        kernel: bool,
        read: u64,
        held: Vec<u8>,
        done: bool,
    }

    impl Leg {
        /// One non-blocking step; true once the direction has ended.
        fn step(&mut self, r: &Redirector) -> bool {
            if self.done {
                return true;
            }
            let s = r.slot(self.slot);
            let dst_handed = || handed(self.dst).unwrap_or(0);
            if self.kernel {
                let received = tcp_counts(self.src.as_raw_fd()).map(|c| c.1).unwrap_or(0);
                if s.passing() && drained(s.used(), dst_handed(), self.connected, 0) {
                    self.kernel = false; // lb copies the rest
                } else if fin_drained(received, s.used(), 0) && drained(s.used(), dst_handed(), self.connected, 0) {
                    self.finish();
                }
                return self.done;
            }
            let mut buf = [0u8; 32 * 1024];
            for _ in 0..16 {
                if !self.held.is_empty() {
                    // SAFETY: dst is lb's socket, open for the whole soak.
                    let n =
                        unsafe { libc::send(self.dst, self.held.as_ptr().cast(), self.held.len(), libc::MSG_NOSIGNAL) };
                    if n < 0 {
                        assert_eq!(io::Error::last_os_error().kind(), io::ErrorKind::WouldBlock, "send");
                        return false;
                    }
                    self.held.drain(..n as usize);
                    continue;
                }
                match self.src.read(&mut buf) {
                    Ok(0) => {
                        let received = tcp_counts(self.src.as_raw_fd()).map(|c| c.1).unwrap_or(0);
                        if end_is_real(received, s.used(), self.read) {
                            self.finish();
                        }
                        return self.done;
                    }
                    Ok(n) => {
                        self.read += n as u64;
                        self.held.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(e) => panic!("recv: {e}"),
                }
            }
            false
        }

        fn finish(&mut self) {
            // SAFETY: shutting down the write side of lb's own socket.
            unsafe { libc::shutdown(self.dst, libc::SHUT_WR) };
            self.done = true;
        }
    }

    #[test]
    fn many_pairs_relay_byte_exact_through_budgets_fallbacks_and_fins() {
        if !root() {
            return;
        }
        const PAIRS: u32 = 40;
        let r = Redirector::new(2 * PAIRS, 64 * 1024).expect("load");
        let mut legs = Vec::new();
        let mut apps = Vec::new();
        for i in 0..PAIRS {
            let (mut app, client, backend, mut be) = pairs();
            let slots = [2 * i, 2 * i + 1];
            let joined = r.join(client.as_raw_fd(), backend.as_raw_fd(), slots).expect("join");
            client.set_nonblocking(true).expect("nonblocking");
            backend.set_nonblocking(true).expect("nonblocking");
            // Sizes from 0 to ~1.5 MB: some stay within the budget, most
            // fall back to copy part way.
            let (up, down) = ((i as usize * 37_813) % 1_500_000, (i as usize * 52_361) % 1_500_000);
            let (c, b) = (client.as_raw_fd(), backend.as_raw_fd());
            legs.push(Leg {
                src: client,
                dst: b,
                slot: slots[0],
                connected: true,
                kernel: joined.client_to_backend,
                read: 0,
                held: Vec::new(),
                done: false,
            });
            legs.push(Leg {
                src: backend,
                dst: c,
                slot: slots[1],
                connected: false,
                kernel: joined.backend_to_client,
                read: 0,
                held: Vec::new(),
                done: false,
            });
            apps.push(std::thread::spawn(move || {
                let sent = random(up, u64::from(i) * 2 + 1);
                let writer = {
                    let mut app = app.try_clone().expect("clone");
                    std::thread::spawn(move || {
                        app.write_all(&sent).expect("client write");
                        app.shutdown(Shutdown::Write).expect("client shutdown");
                    })
                };
                let mut got = Vec::new();
                app.read_to_end(&mut got).expect("client read");
                writer.join().expect("client writer");
                assert!(got == random(down, u64::from(i) * 2 + 2), "pair {i}: the backend's {down} bytes");
            }));
            apps.push(std::thread::spawn(move || {
                let mut got = Vec::new();
                be.read_to_end(&mut got).expect("backend read");
                assert!(got == random(up, u64::from(i) * 2 + 1), "pair {i}: the client's {up} bytes");
                be.write_all(&random(down, u64::from(i) * 2 + 2)).expect("backend write");
                be.shutdown(Shutdown::Write).expect("backend shutdown");
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut due = Vec::new();
            r.events(|s| due.push(s));
            for s in due {
                let leg = &legs[s as usize];
                r.refill(s, leg.dst, leg.connected, 0).expect("refill");
            }
            let mut all_done = true;
            for leg in &mut legs {
                all_done &= leg.step(&r);
            }
            if all_done {
                break;
            }
            assert!(Instant::now() < deadline, "the soak did not finish");
            std::thread::sleep(Duration::from_micros(100));
        }
        for a in apps {
            a.join().expect("an app saw wrong bytes");
        }
        let fell_back = legs.iter().filter(|l| l.read > 0).count();
        assert!(
            fell_back > 0 && fell_back < legs.len(),
            "both paths were used: {fell_back} of {} fell back",
            legs.len()
        );
    }

    fn epoll_wait_ms(ep: RawFd, ms: i32) -> i32 {
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: epoll_wait into a buffer of 4 events.
        unsafe { libc::epoll_wait(ep, ev.as_mut_ptr(), 4, ms) }
    }

    /// helper-65's case: lb drains the ring edge-triggered, so a notice
    /// committed while it handles another must be read in the same drain
    /// or wake it again; before the fix it sat in the ring for good.
    #[test]
    fn a_notice_committed_during_a_drain_is_not_left_in_the_ring() {
        if !root() {
            return;
        }
        let r = Redirector::new(64, 64 * 1024).expect("load");
        let (mut app_a, ca, ba, mut be_a) = pairs();
        let (mut app_b, cb, bb, mut be_b) = pairs();
        r.join(ca.as_raw_fd(), ba.as_raw_fd(), [0, 1]).expect("join a");
        r.join(cb.as_raw_fd(), bb.as_raw_fd(), [2, 3]).expect("join b");
        // SAFETY: a new epoll instance, closed by the OwnedFd.
        let ep = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 1 };
        // SAFETY: both descriptors are open.
        assert_eq!(unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, r.events_fd(), &mut ev) }, 0);
        let chunk = vec![1u8; 40 * 1024];
        app_a.write_all(&chunk).expect("write a");
        assert_eq!(read_n(&mut be_a, chunk.len()), chunk);
        assert_eq!(epoll_wait_ms(ep.as_raw_fd(), 5000), 1, "the first notice wakes lb");
        let mut seen = Vec::new();
        r.events(|s| {
            seen.push(s);
            if s == 0 {
                // While lb handles A's notice, pair B crosses half its budget.
                app_b.write_all(&chunk).expect("write b");
                assert_eq!(read_n(&mut be_b, chunk.len()), chunk);
            }
        });
        if !seen.contains(&2) {
            assert_eq!(epoll_wait_ms(ep.as_raw_fd(), 5000), 1, "B's notice wakes lb");
            r.events(|s| seen.push(s));
        }
        assert_eq!(seen, vec![0, 2]);
    }
}
