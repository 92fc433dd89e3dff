//! One client/backend pair and the relay between them. A [`Session`] owns
//! both sockets, the backend [`Lease`], the client's slot under the global
//! cap and, while bytes are in flight, pooled buffers or pipes; dropping it
//! releases all of them. Each direction copies through a buffer or splices
//! through a pipe, as its [`SplicePolicy`] decides, or, once the pair joined
//! the kernel relay ([`redirect`]), leaves its bytes to the relay's program.
//! What the relay needs of a pair is held out of line, by the pairs that
//! tried to join only, and recycled ([`KernelPairs`]). Event handlers return
//! an [`Outcome`] that the worker acts on.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::debug;
use mio::Interest;
use mio::event::Event;
use mio::net::TcpStream;
use socket2::SockRef;

use crate::backend::Lease;
use crate::config::{MAX_RETRIES, SpliceMode};
use crate::net::{IoClass, classify, discard_received, has_pending_error, reset_on_close, send_queue, unacknowledged};
use crate::pipe::{self, Pipe, PipePool};
use crate::pool::{Buffer, BufferPool};
use crate::redirect::{self, Redirector, Slot, SourceEnd};
use crate::shared::ClientSlot;
use crate::splice::SplicePolicy;
use crate::worker::{EVENTS_ARE_THE_SESSIONS_OWN, WorkerSettings};

/// Chunks moved per direction per wakeup before yielding to other sessions;
/// the worker re-runs a session that stopped here.
const MAX_CHUNKS_PER_PUMP: usize = 16;

/// The longest a failed pair waits, without progress, for its client to
/// take the bytes lb wrote to it before the reset ([`Stage::Lingering`]).
pub const LINGER_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// What a session's sockets are registered for. PRIORITY reports TCP
/// urgent data: a read stops short at its mark with more bytes queued, so
/// a peer that sends it must be read until `WouldBlock`.
pub const SOCKET_INTEREST: Interest = Interest::READABLE.add(Interest::WRITABLE).add(Interest::PRIORITY);

/// What the worker must do after a session handled an event.
#[derive(Debug)]
pub enum Outcome {
    /// Waiting for readiness.
    Continue,
    /// Stopped at the per-wakeup bound with work left: run again soon.
    Again,
    /// A direction needs a buffer and the pool is empty: run again once one
    /// is returned.
    Starved,
    /// The kernel relay still moves bytes that must go ahead of what lb
    /// does next, and raises no event when it is done: run again shortly.
    Wait,
    /// The backend connect failed; the worker retries elsewhere or gives up.
    ConnectFailed(io::Error),
    /// The pair failed but waits to be closed until the client has taken
    /// what lb already wrote to it ([`Stage::Lingering`]); the worker
    /// checks it with [`Session::linger`].
    Linger,
    /// The pair is finished; drop it.
    Close(CloseReason),
}

/// Why lb ends a pair on its own ([`Session::expire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nothing moved for the idle timeout.
    Idle,
    /// lb is stopping: the drain timeout ran out or a second signal came.
    Shutdown,
    /// This worker's event loop failed; lb runs on without it, but the
    /// pairs it held cannot be served.
    LoopFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions reached EOF and were relayed.
    Done,
    /// A peer reset or errored; the other side is reset too.
    Aborted(Side),
    /// lb ended the pair on its own: idle timeout or shutdown.
    Expired,
}

/// Where the pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connecting {
        started: Instant,
        deadline: Instant,
    },
    Relaying,
    /// The pair failed on `side` and ends in a reset, which would discard
    /// what the client's send queue still holds: bytes the backend sent
    /// before it failed, that the client would have got without a proxy.
    /// Nothing is relayed any more; the pair closes once the client has
    /// acknowledged them. `queued` is how many were left at the last look.
    Lingering {
        side: Side,
        queued: usize,
    },
}

/// How far one direction has got towards its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Reading from the source and writing to the destination.
    Open,
    /// The source sent EOF; pending bytes are being flushed before the
    /// destination's write side is shut down.
    Draining,
    /// EOF relayed: the destination got `shutdown(Write)`.
    Done,
    /// Nothing moves this way any more. Either the destination failed
    /// while the other direction still has bytes to deliver (what the
    /// source sends is then read and dropped, so it never blocks), or the
    /// whole pair is being reset.
    Abandoned,
}

/// What the peer has reported about the end of its stream. Neither report
/// raises a new edge once the queued data is read, so both keep reads
/// going until the end shows up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hangup {
    /// Nothing reported: a short read means the queue is empty for now.
    None,
    /// The peer's FIN arrived. TCP queues it behind all the data sent
    /// before it, so a short read took the last bytes, unless urgent data
    /// cut it short.
    Fin,
    /// An error was reported that the socket no longer holds: a read took
    /// it and keeps it for the next fill. Or a FIN was reported on a
    /// 32-bit target, whose tokens cannot tell this pair's events from
    /// those of the closed pair that had its slab key. Whether a FIN came
    /// is not known, so short reads are followed by another, as after
    /// urgent data.
    Unsure,
    /// An error arrived; the next read or write surfaces it.
    Error,
}

/// A socket plus readiness hints. The hints let edge-triggered readiness be
/// remembered, so no syscall is made that is known to return `WouldBlock`.
#[derive(Debug)]
struct Peer {
    stream: TcpStream,
    readable: bool,
    writable: bool,
    hangup: Hangup,
    /// The peer has sent urgent data, where a read stops short with more
    /// bytes queued: a short read proves nothing, so reads go on to
    /// `WouldBlock`. Rare enough that it stays set for the connection.
    urgent: bool,
}

impl Peer {
    fn new(stream: TcpStream) -> Peer {
        Peer { stream, readable: false, writable: false, hangup: Hangup::None, urgent: false }
    }

    fn note(&mut self, ev: &Event) {
        // Errors and hang-ups are surfaced by the next read or write.
        let fault = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
        if !fault && !ev.is_readable() && !ev.is_writable() && self.hangup == Hangup::None {
            // EPOLLRDHUP alone, which mio reports as nothing: the peer's
            // FIN, on a socket registered for the ends of streams only
            // (in the kernel relay). `pump_kernel` checks the state.
            self.hangup = Hangup::Unsure;
        }
        if ev.is_error() {
            self.hangup = Hangup::Error;
        } else if ev.is_read_closed() && self.hangup == Hangup::None {
            self.hangup = if EVENTS_ARE_THE_SESSIONS_OWN { Hangup::Fin } else { Hangup::Unsure };
        }
        self.urgent |= ev.is_priority();
        self.readable |= ev.is_readable() || fault;
        self.writable |= ev.is_writable() || fault;
    }
}

/// The per-worker pools a relay draws on.
#[derive(Debug, Clone, Copy)]
pub struct Pools<'a> {
    pub buffers: &'a BufferPool,
    pub pipes: &'a PipePool<'a>,
    /// The kernel relay, when it loaded (`--kernel-relay`).
    pub relay: Option<&'a Redirector>,
}

/// Consecutive short reads each way before a pair moves to the kernel
/// relay: request/response traffic, which the kernel relays without
/// waking lb. A bulk flow never gets there (its reads fill the buffer).
pub const SHORT_READS_TO_JOIN: u8 = 2;

/// How many times a direction leaving the kernel relay, or ending there,
/// looks for the kernel to finish its last bytes before lb gives up on
/// the pair (about a second at the worker's 1 ms cadence). The kernel
/// takes microseconds: a wait this long means a count that never adds up.
const KERNEL_WAITS: u16 = 1000;

/// What follows once a direction has relayed its last bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The other direction goes on: shut down the destination's write side.
    Shutdown,
    /// The other direction is done, so the pair closes at once and the
    /// close sends the FIN.
    Close,
    /// The other direction failed and the pair is about to be reset. No
    /// FIN, and no MSG_MORE on the last bytes: the reset would discard
    /// bytes held back for a FIN that never comes.
    Reset,
}

/// Which end of a direction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// A direction's failure, with the end it came from.
#[derive(Debug)]
struct Broken {
    at: End,
    error: io::Error,
}

impl Broken {
    fn source(error: io::Error) -> Broken {
        Broken { at: End::Source, error }
    }

    fn destination(error: io::Error) -> Broken {
        Broken { at: End::Destination, error }
    }
}

/// How one direction moves its bytes right now. Each mechanism holds its
/// pooled resource only while bytes are pending in it.
#[derive(Debug)]
enum Transfer<'p> {
    /// Through user memory: `buf[start..end]` is still to be written.
    Copy { buf: Option<Buffer<'p>>, start: usize, end: usize },
    /// Through a kernel pipe with splice(2), never touching user memory.
    Splice { pipe: Option<Pipe<'p>> },
    /// By the kernel relay's program, without lb ([`KernelDirection::joined`]).
    Kernel,
}

impl Transfer<'_> {
    fn copy() -> Self {
        Transfer::Copy { buf: None, start: 0, end: 0 }
    }
}

/// Bytes travelling one way, source to destination.
#[derive(Debug)]
struct Direction<'p> {
    transfer: Transfer<'p>,
    flow: Flow,
    policy: SplicePolicy,
    /// Bytes written to the destination and not yet added to the backend's
    /// shared counters (flushed in batches to keep atomics off the hot path).
    unreported: u64,
    /// The part of `unreported` that was spliced.
    unreported_spliced: u64,
    /// An error the source reported after bytes that are still to be
    /// written: it ends the direction once they are (an OS error code,
    /// so holding it costs no allocation).
    deferred: Option<std::num::NonZeroI32>,
    /// lb took bytes from the source in this relay pass: the other
    /// direction's splice policy learns that this way is not silent.
    took: bool,
    /// Consecutive copy reads that did not fill the buffer (towards the
    /// kernel relay's [`SHORT_READS_TO_JOIN`]).
    short_reads: u8,
}

/// What a direction needs only once its pair tried to join the kernel
/// relay. Held out of line ([`KernelPair`]), so that the pairs that never
/// join, which with `--kernel-relay never` are all of them, carry none of
/// it.
#[derive(Debug, Default)]
struct KernelDirection<'p> {
    /// The direction's slot in the kernel relay once the pair joined it,
    /// kept after the direction fell back to lb: the program still counts
    /// what it redirected, and the end of the source is told from it.
    joined: Option<Joined<'p>>,
    /// Bytes lb itself wrote to the destination before the join, for the
    /// relay's sums (which count every byte the sockets saw). They are
    /// taken only while the program relays the direction, and lb writes
    /// nothing this way meanwhile, so the count at the join is the count.
    wrote: u64,
    /// Bytes lb itself took from the source, for the same sums: as many
    /// as it wrote by the join, as it held none then, and what it read
    /// once the direction went back to lb.
    read: u64,
    /// The destination made the connect (the backend socket), so its
    /// acknowledged count includes the SYN.
    dst_connected: bool,
    /// The part of the direction's `unreported` that the program moved.
    unreported: u64,
    /// Waits for the kernel so far, bounded by [`KERNEL_WAITS`].
    waits: u16,
    /// The direction went back to lb (logged once).
    left: bool,
    /// Top-ups lb granted, and why it turned down the last notice it
    /// did not grant: the log line of a direction that went back to lb
    /// tells a flow lb let go from one whose notice it answered too late.
    top_ups: u32,
    declined: Option<Declined>,
}

/// Why lb let a joined direction's budget run out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declined {
    /// Top-ups asked for closer together than [`redirect::BULK_TOP_UP_INTERVAL`].
    Bulk,
    /// The destination's send queue could not take more.
    NotDraining,
    /// Reading the destination's counts failed.
    Failed,
}

/// The reason in the log line of a direction that went back to lb.
struct LeftBecause(Option<Declined>);

impl std::fmt::Display for LeftBecause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Some(Declined::Bulk) => "lb let it run out: top-ups came too close together, as a bulk flow's do",
            Some(Declined::NotDraining) => "lb let it run out: the destination was not draining",
            Some(Declined::Failed) => "lb let it run out: a top-up failed",
            // The flow spent the second half of a budget before lb could
            // answer: a bulk flow does, and so does any when lb is short
            // of CPU.
            None => "lb came too late to its notice",
        })
    }
}

/// lb's side of a pair that tried to join the kernel relay: both sockets'
/// cookies, for [`Redirector::leave`], and each direction's state. Boxed
/// and recycled through [`KernelPairs`].
#[derive(Debug, Default)]
pub struct KernelPair<'p> {
    cookies: (u64, u64),
    up: KernelDirection<'p>,
    down: KernelDirection<'p>,
}

/// A worker's spare [`KernelPair`]s: a closed pair gives its state back
/// ([`Session::release_kernel_state`]) and the next pair to join takes it,
/// so after warm-up joining allocates nothing. Holds at most as many as
/// this worker ever had pairs in the relay at once. Single-threaded, like
/// the worker that owns it.
#[derive(Debug, Default)]
pub struct KernelPairs<'p> {
    // Boxed as the sessions hold them: a state moves between a session
    // and this list without being copied or allocated.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<KernelPair<'p>>>,
}

impl<'p> KernelPairs<'p> {
    /// A cleared state, reused if one is spare.
    fn take(&mut self) -> Box<KernelPair<'p>> {
        match self.spare.pop() {
            Some(mut k) => {
                *k = KernelPair::default();
                k
            }
            // Warm-up: more pairs in the relay at once than ever before.
            None => Box::default(),
        }
    }

    fn give_back(&mut self, k: Box<KernelPair<'p>>) {
        self.spare.push(k);
    }
}

/// A direction's place in the kernel relay.
#[derive(Debug, Clone, Copy)]
struct Joined<'p> {
    slot: &'p Slot,
    index: u32,
    /// Of `slot.used()`, what went into `unreported` already.
    counted: u64,
    /// `slot.used()` at the idle scan's last look.
    seen: u64,
    /// When lb last topped the budget up.
    topped_up: Option<Instant>,
}

/// How the stream of a backend that failed ended, which decides how the
/// client's ends: its FIN came before the failure (it refused bytes sent
/// after it closed), so the stream is whole and the client gets a FIN
/// ahead of the reset; or it was cut, and the client is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackendEnd {
    Fin,
    Cut,
    /// Told by the read that reaches the end: 0 after the FIN, the error
    /// (which resets the pair) otherwise.
    ByRead,
}

/// Why a pump stopped.
enum Pumped {
    Idle,
    Again,
    Starved,
    /// The kernel relay still moves bytes lb must let go ahead.
    Wait,
}

/// How a flush of pending bytes ended.
enum Flushed {
    /// Everything pending was written.
    All,
    /// The destination is full: wait until it is writable.
    Blocked,
    /// Interrupted, or the bytes changed mechanism: try again.
    Retry,
    /// A buffer is needed and the pool has none.
    Starved,
}

/// How a read from the source ended.
enum Filled {
    /// Bytes (or the EOF) are in; go on.
    Progress,
    /// The source has nothing more now.
    Drained,
    Starved,
    /// A read of 0 from a source that left the kernel relay, with bytes
    /// the kernel still owes it: not the end yet.
    Owed,
}

impl<'p> Direction<'p> {
    fn new(mode: SpliceMode) -> Direction<'p> {
        let policy = SplicePolicy::new(mode);
        let transfer = if policy.wants_splice() { Transfer::Splice { pipe: None } } else { Transfer::copy() };
        Direction {
            transfer,
            flow: Flow::Open,
            policy,
            unreported: 0,
            unreported_spliced: 0,
            deferred: None,
            took: false,
            short_reads: 0,
        }
    }

    /// Bytes read from the source and not yet written, in either mechanism.
    fn pending(&self) -> usize {
        match &self.transfer {
            Transfer::Copy { start, end, .. } => end - start,
            Transfer::Splice { pipe } => pipe.as_ref().map_or(0, Pipe::held),
            Transfer::Kernel => 0,
        }
    }

    /// Moves bytes from `src` to `dst` until nothing more can move now.
    /// Reads only into an empty buffer or pipe, so a full one stops reading
    /// from the source (backpressure) and neither ever grows.
    /// `ending` says what follows this direction's EOF; `kernel` is its
    /// state in the kernel relay, if the pair tried to join it.
    fn pump(
        &mut self,
        src: &mut Peer,
        dst: &mut Peer,
        pools: Pools<'p>,
        ending: Ending,
        mut kernel: Option<&mut KernelDirection<'p>>,
    ) -> Result<Pumped, Broken> {
        if matches!(self.transfer, Transfer::Kernel)
            && let Some(k) = kernel.as_deref_mut()
            && let Some(p) = self.pump_kernel(k, src, dst)?
        {
            return Ok(p);
        }
        for _ in 0..MAX_CHUNKS_PER_PUMP {
            if self.pending() > 0 {
                if !dst.writable {
                    return Ok(Pumped::Idle);
                }
                match self.flush(dst, pools, ending).map_err(Broken::destination)? {
                    Flushed::All => {}
                    Flushed::Blocked => {
                        dst.writable = false;
                        return Ok(Pumped::Idle);
                    }
                    Flushed::Retry => continue,
                    Flushed::Starved => return Ok(Pumped::Starved),
                }
            }
            if self.flow != Flow::Open {
                break;
            }
            if !src.readable {
                return Ok(Pumped::Idle);
            }
            if src.urgent && self.policy.wants_splice() {
                // splice(2) stops at TCP's urgent mark and keeps returning
                // EAGAIN there; read(2) steps over the urgent byte. Like a
                // socket that cannot splice at all: copy from now on.
                self.copy_for_good(pools);
            }
            self.settle();
            match self.fill(src, pools, kernel.as_deref_mut()).map_err(Broken::source)? {
                Filled::Progress => {}
                Filled::Drained => {
                    src.readable = false;
                    return Ok(Pumped::Idle);
                }
                Filled::Starved => return Ok(Pumped::Starved),
                Filled::Owed => {
                    // Owed only to a direction with a slot (`owed`).
                    return match kernel {
                        Some(k) => k.wait(),
                        None => Ok(Pumped::Wait),
                    };
                }
            }
        }
        if self.flow == Flow::Draining && self.pending() == 0 {
            if ending == Ending::Shutdown {
                match dst.stream.shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    // The destination already went away; nothing left to tell it.
                    Err(e) if classify(&e) == IoClass::Closed => {}
                    Err(e) => return Err(Broken::destination(e)),
                }
            }
            self.flow = Flow::Done;
            return Ok(Pumped::Idle);
        }
        if self.flow == Flow::Done {
            return Ok(Pumped::Idle);
        }
        Ok(Pumped::Again)
    }

    /// A direction the kernel relay moves: lb has work only once the
    /// program's budget ran out (lb relays the direction from then on) or
    /// the source ended. Either waits until every byte the program took
    /// is in the destination's send queue, as lb's own writes and FIN
    /// must come after them. `None`: the generic pump goes on.
    fn pump_kernel(
        &mut self,
        k: &mut KernelDirection<'p>,
        src: &mut Peer,
        dst: &mut Peer,
    ) -> Result<Option<Pumped>, Broken> {
        let Some(j) = k.joined else { return Ok(None) };
        self.count_kernel_bytes(k);
        if self.flow != Flow::Open {
            return Ok(None);
        }
        let leaving = j.slot.passing();
        if src.hangup == Hangup::Unsure && redirect::stream_ended(src.stream.as_raw_fd()).map_err(Broken::source)? {
            // Its event could not tell (a bare EPOLLRDHUP, or an error
            // report that proved empty). A FIN or a reset: the counts
            // below tell which.
            src.hangup = Hangup::Fin;
        }
        if !leaving && !matches!(src.hangup, Hangup::Fin | Hangup::Error) {
            // Nothing for lb: the program moves the bytes.
            src.readable = false;
            return Ok(Some(Pumped::Idle));
        }
        if !leaving && src.hangup == Hangup::Fin {
            // TCP reports the FIN before the program has run over the
            // bytes of the same segment.
            let (_, received) = redirect::tcp_counts(src.stream.as_raw_fd()).map_err(Broken::source)?;
            let used = j.slot.used();
            // The state is read only when the counts alone do not tell.
            let closed = !redirect::fin_drained(received, used, k.read)
                && redirect::was_closed(src.stream.as_raw_fd()).map_err(Broken::source)?;
            match redirect::source_end(received, used, k.read, closed) {
                SourceEnd::Fin => {}
                // Reported as a hang-up, its error taken by a write: no FIN
                // will ever be counted.
                SourceEnd::Reset => src.hangup = Hangup::Error,
                SourceEnd::Unseen => return k.wait().map(Some),
            }
        }
        let handed = redirect::handed(dst.stream.as_raw_fd()).map_err(Broken::destination)?;
        if !redirect::drained(j.slot.used(), handed, k.dst_connected, k.wrote) {
            // A reset destination dropped its queue: nothing more will
            // reach it, and the pair ends in a reset. (lb sent it no FIN
            // yet, this direction being open, so only a reset closes it.)
            if redirect::was_closed(dst.stream.as_raw_fd()).map_err(Broken::destination)? {
                return Err(Broken::destination(io::Error::from(io::ErrorKind::ConnectionReset)));
            }
            return k.wait().map(Some);
        }
        k.waits = 0;
        if leaving {
            // The bytes the program passes wait in the socket where splice
            // cannot reach them: lb copies them from now on.
            self.policy.copy_only();
            self.transfer = Transfer::copy();
            src.readable = true;
            return Ok(None);
        }
        if src.hangup == Hangup::Error {
            return Err(Broken::source(match src.stream.take_error() {
                Ok(Some(e)) | Err(e) => e,
                Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
            }));
        }
        self.flow = Flow::Draining;
        Ok(None)
    }

    /// Adds what the program relayed since the last look to `unreported`
    /// (and to `k.unreported`).
    fn count_kernel_bytes(&mut self, k: &mut KernelDirection<'p>) {
        if let Some(j) = &mut k.joined {
            let used = j.slot.used();
            let new = used.saturating_sub(j.counted);
            self.unreported += new;
            k.unreported += new;
            j.counted = used;
        }
    }

    /// In the kernel relay with the budget spent: lb must take over.
    fn kernel_spent(&self, k: &KernelDirection<'p>) -> bool {
        matches!(self.transfer, Transfer::Kernel) && k.joined.is_some_and(|j| j.slot.passing())
    }

    /// Switches mechanism if the policy asks. Called with nothing pending,
    /// so no byte can overtake another.
    fn settle(&mut self) {
        debug_assert_eq!(self.pending(), 0);
        match (&self.transfer, self.policy.wants_splice()) {
            (Transfer::Copy { .. }, true) => self.transfer = Transfer::Splice { pipe: None },
            (Transfer::Splice { .. }, false) => self.transfer = Transfer::copy(),
            // Left only by `pump_kernel`.
            (Transfer::Kernel, _) => {}
            _ => {}
        }
    }

    /// Writes pending bytes to `dst`, returning the buffer or pipe to its
    /// pool once empty.
    fn flush(&mut self, dst: &mut Peer, pools: Pools<'p>, ending: Ending) -> io::Result<Flushed> {
        let result = match &mut self.transfer {
            Transfer::Copy { buf, start, end } => {
                let b = buf.as_ref().expect("pending bytes live in a buffer");
                let written = if self.flow == Flow::Draining && ending != Ending::Reset {
                    // The last bytes of the stream: the shutdown or close
                    // that follows at once pushes them out with the FIN in
                    // the same segment, instead of one segment each.
                    SockRef::from(&dst.stream).send_with_flags(&b[*start..*end], libc::MSG_MORE | libc::MSG_NOSIGNAL)
                } else {
                    dst.stream.write(&b[*start..*end])
                };
                match written {
                    Ok(n) => {
                        *start += n;
                        self.unreported += n as u64;
                        if *start < *end {
                            // A short write means the socket buffer is full.
                            return Ok(Flushed::Blocked);
                        }
                        *start = 0;
                        *end = 0;
                        *buf = None;
                        return Ok(Flushed::All);
                    }
                    Err(e) => e,
                }
            }
            Transfer::Splice { pipe } => {
                let p = pipe.as_mut().expect("pending bytes live in a pipe");
                match p.drain_to(&dst.stream) {
                    Ok(n) => {
                        self.unreported += n as u64;
                        self.unreported_spliced += n as u64;
                        if p.held() > 0 {
                            // As with write: short means the socket is full.
                            return Ok(Flushed::Blocked);
                        }
                        *pipe = None;
                        return Ok(Flushed::All);
                    }
                    Err(e) if pipe::is_unsupported(&e) => return self.unsplice(pools),
                    Err(e) => e,
                }
            }
            // Nothing is pending in lb for the kernel relay.
            Transfer::Kernel => return Ok(Flushed::All),
        };
        match classify(&result) {
            IoClass::WouldBlock => Ok(Flushed::Blocked),
            IoClass::Interrupted => Ok(Flushed::Retry),
            _ => Err(result),
        }
    }

    /// This direction cannot splice: it copies from now on, and the pool
    /// counts the fallback the first time.
    fn copy_for_good(&mut self, pools: Pools<'p>) {
        if self.policy.unsupported() {
            pools.pipes.note_unsupported();
        }
    }

    /// The destination cannot take spliced bytes: move what the pipe holds
    /// into a buffer and copy from now on, without failing the pair.
    fn unsplice(&mut self, pools: Pools<'p>) -> io::Result<Flushed> {
        // Counted once even if this runs again (no buffer yet) or if auto
        // had already gone back to copying while the pipe still held bytes.
        self.copy_for_good(pools);
        let Some(mut buf) = pools.buffers.get() else { return Ok(Flushed::Starved) };
        let Transfer::Splice { pipe: Some(p) } = &mut self.transfer else {
            return Ok(Flushed::Retry);
        };
        let n = p.read_into(&mut buf)?;
        if p.held() > 0 {
            // Cannot happen while fills stay within the buffer size; if it
            // did, the stream is cut and the pair ends as on a reset.
            return Err(io::Error::other("a pipe kept bytes it was asked to give back"));
        }
        self.transfer = Transfer::Copy { buf: Some(buf), start: 0, end: n };
        Ok(Flushed::Retry)
    }

    /// Reads from `src` into an empty buffer or pipe; the EOF moves the
    /// direction to `Draining`.
    fn fill(
        &mut self,
        src: &mut Peer,
        pools: Pools<'p>,
        mut kernel: Option<&mut KernelDirection<'p>>,
    ) -> io::Result<Filled> {
        if let Some(code) = self.deferred.take() {
            return Err(io::Error::from_raw_os_error(code.get()));
        }
        let result = match &mut self.transfer {
            Transfer::Copy { buf, end, .. } => {
                if buf.is_none() {
                    match pools.buffers.get() {
                        Some(b) => *buf = Some(b),
                        None => return Ok(Filled::Starved),
                    }
                }
                let b = buf.as_mut().expect("buffer taken above");
                let room = b.len();
                match src.stream.read(&mut b[..]) {
                    Ok(0) => {
                        *buf = None;
                        if owed(kernel.as_deref(), src) {
                            return Ok(Filled::Owed);
                        }
                        self.flow = Flow::Draining;
                        return Ok(Filled::Progress);
                    }
                    Ok(n) => {
                        *end = n;
                        self.took = true;
                        if let Some(k) = kernel.as_deref_mut() {
                            k.read += n as u64;
                            k.waits = 0;
                        }
                        self.policy.copied(n, room);
                        self.short_reads = if n < room { self.short_reads.saturating_add(1) } else { 0 };
                        if n < room {
                            match src.hangup {
                                // The socket is drained; epoll reports the
                                // next arrival, so skip the read that would
                                // WouldBlock.
                                Hangup::None if !src.urgent => src.readable = false,
                                // Maybe stopped at an urgent mark: read on.
                                Hangup::None => {}
                                // The FIN is queued behind these bytes: a
                                // read stops short only at the end of the
                                // queue or at an urgent mark, which this
                                // peer never sent. So the read that would
                                // return 0 is skipped, and the bytes leave
                                // with the FIN (`flush`).
                                // (A source that left the kernel relay may
                                // have bytes on their way to it still.)
                                Hangup::Fin if !src.urgent && kernel.as_ref().is_none_or(|k| k.joined.is_none()) => {
                                    self.flow = Flow::Draining;
                                }
                                // Maybe at an urgent mark, maybe at the end:
                                // reading on into the rest of the buffer
                                // tells which.
                                Hangup::Fin | Hangup::Unsure => match src.stream.read(&mut b[n..]) {
                                    // Owed bytes: the next fill reads again.
                                    Ok(0) if owed(kernel.as_deref(), src) => {}
                                    Ok(0) => self.flow = Flow::Draining,
                                    Ok(more) => {
                                        *end += more;
                                        if let Some(k) = kernel.as_deref_mut() {
                                            k.read += more as u64;
                                        }
                                    }
                                    Err(e) => match classify(&e) {
                                        IoClass::WouldBlock | IoClass::Interrupted => {}
                                        // A reset behind the bytes: they go
                                        // out first, then the next fill
                                        // fails with it. (The socket
                                        // reports an error only once.)
                                        _ => match e.raw_os_error().and_then(std::num::NonZeroI32::new) {
                                            Some(code) => self.deferred = Some(code),
                                            None => return Err(e),
                                        },
                                    },
                                },
                                // Read on until the error surfaces.
                                Hangup::Error => {}
                            }
                        }
                        return Ok(Filled::Progress);
                    }
                    Err(e) => {
                        *buf = None;
                        e
                    }
                }
            }
            Transfer::Splice { pipe } => {
                if pipe.is_none() {
                    match pools.pipes.get() {
                        Some(p) => *pipe = Some(p),
                        None => {
                            // Counted by the pool; this direction copies.
                            self.policy.exhausted();
                            self.transfer = Transfer::copy();
                            return Ok(Filled::Progress);
                        }
                    }
                }
                let p = pipe.as_mut().expect("pipe taken above");
                let room = p.room();
                match p.fill_from(&src.stream) {
                    Ok(0) => {
                        *pipe = None;
                        // Once the FIN is in, splice(2) also returns 0 at
                        // an urgent mark that the event announcing it has
                        // not yet reported, with bytes queued behind it.
                        // A peek steps over the mark as read(2) does; bytes
                        // there mean urgent data, which `pump` moves to
                        // copying as when the event reports it.
                        match src.stream.peek(&mut [0u8; 1]).and_then(|queued| match queued {
                            // The end, maybe just behind an urgent byte the
                            // peek stepped over without taking: a read takes
                            // it (and finds the end too), or, left unread,
                            // it would turn the final close into a reset.
                            0 => (&src.stream).read(&mut [0u8; 1]),
                            n => Ok(n),
                        }) {
                            Ok(0) => {
                                self.flow = Flow::Draining;
                                return Ok(Filled::Progress);
                            }
                            Ok(_) => {
                                src.urgent = true;
                                return Ok(Filled::Progress);
                            }
                            Err(e) => e,
                        }
                    }
                    Ok(n) => {
                        // Unlike read, a short splice may mean the pipe ran
                        // out of slots with data still queued, so `readable`
                        // stays set until the source says WouldBlock.
                        self.took = true;
                        if let Some(k) = kernel {
                            k.read += n as u64;
                        }
                        self.short_reads = 0;
                        self.policy.spliced(n, room);
                        return Ok(Filled::Progress);
                    }
                    Err(e) => {
                        *pipe = None;
                        if pipe::is_unsupported(&e) {
                            self.copy_for_good(pools);
                            self.transfer = Transfer::copy();
                            return Ok(Filled::Progress);
                        }
                        e
                    }
                }
            }
            // lb reads no source the kernel relay moves (`pump_kernel`).
            Transfer::Kernel => return Ok(Filled::Drained),
        };
        match classify(&result) {
            IoClass::WouldBlock => Ok(Filled::Drained),
            IoClass::Interrupted => Ok(Filled::Progress),
            _ => Err(result),
        }
    }

    /// Gives up on this direction: what it holds is dropped (and its
    /// buffer or pipe returned), and nothing moves this way any more.
    fn abandon(&mut self) {
        self.transfer = Transfer::copy();
        self.flow = Flow::Abandoned;
    }

    fn holds_buffer(&self) -> bool {
        matches!(self.transfer, Transfer::Copy { buf: Some(_), .. })
    }

    /// Whether the direction is idle on the copy path after short reads:
    /// nothing held, no splice wanted, the source drained and open.
    fn ready_to_join(&self, src: &Peer) -> bool {
        matches!(self.transfer, Transfer::Copy { buf: None, .. })
            && self.flow == Flow::Open
            && self.short_reads >= SHORT_READS_TO_JOIN
            && !self.policy.wants_splice()
            && self.deferred.is_none()
            && !src.readable
            && src.hangup == Hangup::None
            && !src.urgent
    }

    /// Hands the direction to the program on `slot`. `wrote`: what lb
    /// wrote to the destination so far ([`KernelDirection::wrote`]), and
    /// so read from the source.
    fn enter_kernel(&mut self, k: &mut KernelDirection<'p>, slot: &'p Slot, index: u32, wrote: u64) {
        // The slot was reset by the join, and the program may have moved
        // bytes that were queued ahead of it already: they count too.
        k.joined = Some(Joined { slot, index, counted: 0, seen: 0, topped_up: None });
        k.wrote = wrote;
        k.read = wrote;
        self.transfer = Transfer::Kernel;
    }
}

impl KernelDirection<'_> {
    /// One more wait for the kernel to finish its bytes; too many fail
    /// the direction.
    fn wait(&mut self) -> Result<Pumped, Broken> {
        self.waits += 1;
        if self.waits > KERNEL_WAITS {
            return Err(Broken::source(io::Error::other("the kernel relay's byte counts never added up")));
        }
        Ok(Pumped::Wait)
    }

    /// Whether the program relayed bytes since the idle scan's last look.
    fn moved(&mut self) -> bool {
        let Some(j) = &mut self.joined else { return false };
        let used = j.slot.used();
        std::mem::replace(&mut j.seen, used) != used
    }
}

/// Whether a read of 0 from `src` came while the kernel relay still owes
/// it bytes: once it passed bytes to lb, `recv` may report the end while
/// more of them are on their way to the socket. A count lb cannot take is
/// no proof either way, so the read is believed.
fn owed(kernel: Option<&KernelDirection<'_>>, src: &Peer) -> bool {
    let Some(k) = kernel else { return false };
    let Some(j) = k.joined else { return false };
    match redirect::tcp_counts(src.stream.as_raw_fd()) {
        Ok((_, received)) => !redirect::end_is_real(received, j.slot.used(), k.read),
        Err(_) => false,
    }
}

/// Where a client connected from and when, for the per-connection log
/// lines, which would otherwise not tell concurrent clients apart.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub addr: SocketAddr,
    pub accepted: Instant,
}

/// A client as a worker pairs it with a backend and takes it back when
/// that backend's connect fails.
#[derive(Debug)]
pub struct Client<'a> {
    pub stream: TcpStream,
    /// Its place under `--max-connections`.
    pub slot: ClientSlot<'a>,
    pub tried: Tried,
    pub origin: Origin,
}

/// Backends already tried for one client, inline so a session never
/// allocates.
#[derive(Debug, Clone, Copy)]
pub struct Tried {
    list: [u32; MAX_RETRIES as usize + 1],
    len: usize,
}

impl Default for Tried {
    fn default() -> Self {
        Tried { list: [0; MAX_RETRIES as usize + 1], len: 0 }
    }
}

impl Tried {
    pub fn push(&mut self, i: usize) {
        if self.len < self.list.len() {
            self.list[self.len] = i as u32;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.list[..self.len]
    }

    /// Connect attempts made so far.
    pub fn attempts(&self) -> usize {
        self.len
    }
}

/// lb's send queues to both peers as the idle scan last read them, the
/// quiet spell (the `last_active` it began at) they belong to, and when
/// they were read.
#[derive(Debug, Clone, Copy)]
struct Queued {
    client: u32,
    backend: u32,
    quiet_since: Instant,
    at: Instant,
    /// Read again half a limit after `at`, without a move: the next read
    /// is the one a whole limit after `at`.
    rechecked: bool,
}

/// Bytes in lb's send queue on `s` that its peer has not acknowledged.
fn queued_bytes(s: &TcpStream) -> u32 {
    u32::try_from(unacknowledged(s)).unwrap_or(u32::MAX)
}

/// The kernel's count of lb's send queue on `s`, for the idle scan: one
/// syscall, and a closed socket's count stands still (no progress).
fn send_queue_bytes(s: &TcpStream) -> u32 {
    u32::try_from(send_queue(s)).unwrap_or(u32::MAX)
}

/// One client and the backend it was given.
#[derive(Debug)]
pub struct Session<'a> {
    // Fields drop in order. The lease goes first so that by the time the
    // backend sees its socket close, no worker counts the connection any
    // more; the slot goes last so the cap is only freed once both sockets
    // are closed, and a client let in at the cap never finds its backend
    // still holding the previous connection.
    lease: Lease<'a>,
    client: Peer,
    backend: Peer,
    stage: Stage,
    up: Direction<'a>,
    down: Direction<'a>,
    pub last_active: Instant,
    /// lb's send queues at the last look of the idle scan
    /// ([`Session::is_idle`]); none before the first.
    queued: Option<Queued>,
    /// How the backend's stream ended, once it failed.
    backend_end: BackendEnd,
    /// Carried in both sockets' tokens, so that an event the kernel
    /// reported for the pair that held this slab key before is told apart.
    generation: u32,
    /// The pair's state in the kernel relay, from the moment the relay
    /// may hold entries for its sockets ([`Session::join`]). Boxed, as
    /// most pairs never join: each would carry it for nothing.
    kernel: Option<Box<KernelPair<'a>>>,
    /// The pair tried to join the kernel relay (once only).
    join_tried: bool,
    /// The worker registered the sockets for the ends of the streams
    /// only ([`Session::interest`]).
    pub kernel_only_registered: bool,
    pub tried: Tried,
    origin: Origin,
    /// Bytes relayed up and down that the worker has published.
    reported: (u64, u64),
    _slot: ClientSlot<'a>,
}

impl<'a> Session<'a> {
    pub fn new(
        client: Client<'a>,
        backend: TcpStream,
        lease: Lease<'a>,
        now: Instant,
        settings: &WorkerSettings,
    ) -> Session<'a> {
        let Client { stream, slot, tried, origin } = client;
        Session {
            lease,
            client: Peer::new(stream),
            backend: Peer::new(backend),
            stage: Stage::Connecting { started: now, deadline: now + settings.connect_timeout },
            up: Direction::new(settings.splice),
            down: Direction::new(settings.splice),
            last_active: now,
            queued: None,
            backend_end: BackendEnd::Cut,
            generation: 0,
            kernel: None,
            join_tried: false,
            kernel_only_registered: false,
            tried,
            origin,
            reported: (0, 0),
            _slot: slot,
        }
    }

    /// The client, its place under the cap and the backends tried, for a
    /// pair whose backend connect failed. The failed socket closes here,
    /// before the next connect: at the descriptor limit, that one needs
    /// its descriptor. Only while connecting, when nothing has been read
    /// from the client.
    pub fn into_client(self) -> Client<'a> {
        debug_assert!(matches!(self.stage, Stage::Connecting { .. }), "the client's bytes are still in the kernel");
        let Session { client, _slot, tried, origin, .. } = self;
        Client { stream: client.stream, slot: _slot, tried, origin }
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Bytes relayed up (client to backend) and down, as far as published.
    pub fn reported(&self) -> (u64, u64) {
        self.reported
    }

    pub fn client_stream(&mut self) -> &mut TcpStream {
        &mut self.client.stream
    }

    pub fn backend_stream(&mut self) -> &mut TcpStream {
        &mut self.backend.stream
    }

    pub fn lease(&self) -> &Lease<'a> {
        &self.lease
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Tags the pair with the generation its sockets' tokens carry.
    pub fn in_generation(mut self, generation: u32) -> Session<'a> {
        self.generation = generation;
        self
    }

    /// Handles readiness on one of the two sockets.
    pub fn on_event(&mut self, side: Side, ev: &Event, pools: Pools<'a>, now: Instant) -> Outcome {
        match side {
            Side::Client => self.client.note(ev),
            Side::Backend => self.backend.note(ev),
        }
        if let Stage::Lingering { .. } = self.stage {
            return self.linger(now);
        }
        if let Stage::Connecting { started, .. } = self.stage {
            if side == Side::Client {
                // Client bytes wait in the kernel until the backend is up, so
                // a retry on another backend loses nothing. A client that
                // reset meanwhile has given up: its request must not be
                // relayed to a backend after all, nor its slot and lease
                // held through the connect (and its retries).
                if self.client.hangup != Hangup::Error {
                    return Outcome::Continue;
                }
                return match self.client.stream.take_error() {
                    Ok(Some(e)) | Err(e) => self.abort(Side::Client, &e),
                    // Nothing reads the client while connecting, so no
                    // read took the error; should the report prove empty
                    // all the same, reads go on to the end.
                    Ok(None) => {
                        self.client.hangup = Hangup::Unsure;
                        Outcome::Continue
                    }
                };
            }
            match self.finish_connect() {
                Ok(false) => return Outcome::Continue,
                Ok(true) => {
                    self.stage = Stage::Relaying;
                    let took = now.saturating_duration_since(started);
                    self.lease.backend().connect_succeeded(took);
                    debug!("client {}: connected to {} in {took:?}", self.origin.addr, self.lease.backend().name);
                    if let Err(e) = self.backend.stream.set_nodelay(true) {
                        debug!("client {}: TCP_NODELAY on the backend socket failed: {e}", self.origin.addr);
                    }
                    // Data may have arrived from the client while connecting.
                    self.client.readable = true;
                }
                Err(e) => return Outcome::ConnectFailed(e),
            }
        }
        self.relay_at(pools, now)
    }

    /// Runs the relay without a new event (after `Again` or `Starved`).
    pub fn resume(&mut self, pools: Pools<'a>, now: Instant) -> Outcome {
        if self.stage != Stage::Relaying {
            return Outcome::Continue;
        }
        self.relay_at(pools, now)
    }

    /// Whether the pair went without progress for its idle limit
    /// ([`Session::idle_limit`]); asked once per scan. Bytes the kernel
    /// delivers out of lb's send queues are progress too, although lb may
    /// see no event for a long while: a socket reports room only once much
    /// of a full queue has gone, and a slow reader draining a large one
    /// must not be cut as idle. Once a relaying pair has been quiet for
    /// half its limit its queues are read, then half a limit and a whole
    /// limit after that read; the pair is idle when they have not moved
    /// since a read a whole limit ago (so a stuck pair holding bytes goes
    /// after one and a half limits at most), or, with nothing queued, at
    /// the limit, as nothing can move then. A move starts a new spell.
    pub fn is_idle(&mut self, now: Instant, idle: Option<Duration>) -> bool {
        let Some(limit) = self.idle_limit(idle) else { return false };
        // lb sees no event for what the kernel relay moves.
        if let Some(k) = self.kernel.as_deref_mut()
            && (k.up.moved() | k.down.moved())
        {
            self.last_active = now;
        }
        if self.failed() {
            self.note_client_progress(now);
            return now.saturating_duration_since(self.last_active) >= limit;
        }
        let quiet = now.saturating_duration_since(self.last_active);
        if quiet < limit / 2 {
            return false;
        }
        let baseline = self.queued.filter(|q| q.quiet_since == self.last_active);
        if let Some(b) = baseline {
            // Nothing queued at the last read, and lb wrote nothing since
            // (that would have been an event): nothing can move.
            if b.client == 0 && b.backend == 0 {
                return quiet >= limit;
            }
            let wait = if b.rechecked { limit } else { limit / 2 };
            if now.saturating_duration_since(b.at) < wait {
                return false;
            }
        }
        let client = send_queue_bytes(&self.client.stream);
        let backend = send_queue_bytes(&self.backend.stream);
        match baseline {
            // Nothing moved since the read at `at`: without an event the
            // queues only shrink, so that one comparison covers the span.
            Some(b) if client >= b.client && backend >= b.backend => {
                if now.saturating_duration_since(b.at) >= limit {
                    return true;
                }
                self.queued = Some(Queued { rechecked: true, ..b });
                false
            }
            Some(_) => {
                self.last_active = now;
                self.queued = Some(Queued { client, backend, quiet_since: now, at: now, rechecked: false });
                false
            }
            // The first read of this quiet spell. Past the limit already
            // (one shorter than two scans), a pair with bytes queued is
            // told at the next.
            None => {
                self.queued =
                    Some(Queued { client, backend, quiet_since: self.last_active, at: now, rechecked: false });
                quiet >= limit && client == 0 && backend == 0
            }
        }
    }

    /// For a pair relaying a failed backend's last bytes, every scan: the
    /// client taking bytes out of lb's send queue is progress, although
    /// the pair may write nothing new for a long while.
    fn note_client_progress(&mut self, now: Instant) {
        // Lingering pairs are followed every few milliseconds (`linger`).
        if self.stage != Stage::Relaying {
            return;
        }
        let client = queued_bytes(&self.client.stream);
        if self.queued.is_some_and(|q| client < q.client) {
            self.last_active = now;
        }
        self.queued = Some(Queued { client, backend: 0, quiet_since: self.last_active, at: now, rechecked: false });
    }

    /// Relays, counting the pair as active. Once the backend has failed,
    /// only bytes delivered to the client count: what the client sends is
    /// discarded, and a client that uploads for ever without reading must
    /// still meet the idle limit, as without a proxy its writes would fail.
    fn relay_at(&mut self, pools: Pools<'a>, now: Instant) -> Outcome {
        if !self.failed() {
            self.last_active = now;
            return self.relay(pools);
        }
        let delivered = self.down.unreported;
        let outcome = self.relay(pools);
        if self.down.unreported != delivered {
            self.last_active = now;
        }
        outcome
    }

    fn finish_connect(&mut self) -> io::Result<bool> {
        if let Some(e) = self.backend.stream.take_error()? {
            return Err(e);
        }
        match self.backend.stream.peer_addr() {
            Ok(_) => Ok(true),
            // Spurious wakeup: still in progress.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn relay(&mut self, pools: Pools<'a>) -> Outcome {
        let outcome = self.relay_both(pools);
        if let Some(k) = self.kernel.as_deref_mut() {
            for (way, d, kd) in [("up", &self.up, &mut k.up), ("down", &self.down, &mut k.down)] {
                if kd.joined.is_some() && !kd.left && !matches!(d.transfer, Transfer::Kernel) && d.flow == Flow::Open {
                    kd.left = true;
                    debug!(
                        "client {}: the kernel relay's budget ran out after {} top-up{} ({}); lb relays {way} from now on",
                        self.origin.addr,
                        kd.top_ups,
                        if kd.top_ups == 1 { "" } else { "s" },
                        LeftBecause(kd.declined)
                    );
                }
            }
        }
        outcome
    }

    fn relay_both(&mut self, pools: Pools<'a>) -> Outcome {
        let ending = |other: &Direction| if other.flow == Flow::Done { Ending::Close } else { Ending::Shutdown };
        self.up.took = false;
        self.down.took = false;
        let up = if self.up.flow == Flow::Abandoned {
            discard_received(&self.client.stream);
            Ok(Pumped::Idle)
        } else {
            let kernel = self.kernel.as_deref_mut().map(|k| &mut k.up);
            self.up.pump(&mut self.client, &mut self.backend, pools, ending(&self.down), kernel)
        };
        let up = match up {
            Ok(p) => p,
            Err(Broken { at: End::Source, error }) => return self.abort(Side::Client, &error),
            // Not a reset or close: the backend may never end its stream.
            Err(Broken { at: End::Destination, error }) if classify(&error) != IoClass::Closed => {
                return self.abort(Side::Backend, &error);
            }
            Err(Broken { at: End::Destination, error }) => {
                // The backend failed while taking the upload. What it sent
                // before still goes to the client ahead of the reset, as it
                // would without a proxy (a server that refuses an upload
                // answers, then resets the rest), however long the client
                // takes to read it: the down direction runs on until the
                // backend's stream ends.
                log_failure(self.origin, Side::Backend, &error);
                // A reset that finds the socket in CLOSE_WAIT reports EPIPE,
                // not ECONNRESET: the backend's FIN came first. (lb writes
                // no more once it sent its own FIN, so no later state
                // reaches this.)
                let ended = if self.down.flow != Flow::Open || error.raw_os_error() == Some(libc::EPIPE) {
                    BackendEnd::Fin
                } else {
                    BackendEnd::Cut
                };
                self.backend_failed(ended);
                Pumped::Idle
            }
        };
        let down_ending = match (self.up.flow, self.backend_end) {
            // The FIN goes out by itself, as the reset follows.
            (Flow::Abandoned, BackendEnd::Fin | BackendEnd::ByRead) => Ending::Shutdown,
            (Flow::Abandoned, BackendEnd::Cut) => Ending::Reset,
            _ => ending(&self.up),
        };
        // Bytes one way mean the other is not a one-way (bulk) flow: told
        // before the down pump, so a request read now counts for the
        // response it pumps in this same pass.
        if self.up.took {
            self.down.policy.other_way_moved();
        }
        let kernel = self.kernel.as_deref_mut().map(|k| &mut k.down);
        let down = match self.down.pump(&mut self.backend, &mut self.client, pools, down_ending, kernel) {
            Ok(p) => p,
            Err(Broken { at: End::Source, error }) => return self.abort(Side::Backend, &error),
            Err(Broken { at: End::Destination, error }) => return self.abort(Side::Client, &error),
        };
        if self.down.took {
            self.up.policy.other_way_moved();
        }
        if self.down.flow == Flow::Done {
            match self.up.flow {
                Flow::Done => return Outcome::Close(CloseReason::Done),
                // After a failure, the end of the backend's stream (a read
                // of 0 from a reset socket) is the end of what it sent.
                Flow::Abandoned => return self.cut(Side::Backend),
                Flow::Open | Flow::Draining => {}
            }
        }
        match (up, down) {
            (Pumped::Again, _) | (_, Pumped::Again) => Outcome::Again,
            // Waiting first: its poll every millisecond also retries the
            // starved direction's buffer, while the starved list would
            // leave the wait unchecked until some buffer came back.
            (Pumped::Wait, _) | (_, Pumped::Wait) => Outcome::Wait,
            (Pumped::Starved, _) | (_, Pumped::Starved) => Outcome::Starved,
            _ => match self.unheard_error() {
                Some(side) => {
                    let peer = match side {
                        Side::Client => &mut self.client,
                        Side::Backend => &mut self.backend,
                    };
                    match peer.stream.take_error() {
                        Ok(Some(e)) | Err(e) => self.abort(side, &e),
                        // The socket has no error left: a read took it
                        // and keeps it for the next fill. Keep reading on
                        // after short reads, in case a FIN was noted
                        // before the error.
                        Ok(None) => {
                            peer.hangup = Hangup::Unsure;
                            Outcome::Continue
                        }
                    }
                }
                // The backend failed while bytes it sent wait for a client
                // that is not reading: no read of the backend surfaces the
                // error until they are delivered, nor any write while the
                // client sends nothing.
                None if self.backend.hangup == Hangup::Error && self.up.flow != Flow::Abandoned => {
                    match has_pending_error(&self.backend.stream) {
                        // Left in the socket, the error still tells how the
                        // backend's stream ended: reads deliver the rest,
                        // then 0 if its FIN came first, which ends the
                        // client's stream with a FIN too, or the error,
                        // which resets the client. Taken, both would read
                        // as 0, and the error alone cannot tell: past lb's
                        // own FIN a reset reports ECONNRESET even after the
                        // backend's FIN.
                        Ok(true) => {
                            debug!(
                                "client {}: the backend failed while bytes it sent wait for the client",
                                self.origin.addr
                            );
                            self.backend_failed(BackendEnd::ByRead);
                            Outcome::Continue
                        }
                        Err(e) => self.abort(Side::Backend, &e),
                        // Taken by a read, as above.
                        Ok(false) => {
                            self.backend.hangup = Hangup::Unsure;
                            Outcome::Continue
                        }
                    }
                }
                None => Outcome::Continue,
            },
        }
    }

    /// The backend's connection is over, while what it sent before still
    /// goes to the client ahead of a reset, however long the client takes
    /// to read it: the down direction runs on until the backend's stream
    /// ends. The client's upload has nowhere to go any more.
    fn backend_failed(&mut self, end: BackendEnd) {
        self.backend_end = end;
        // leastconn must not count the backend while the client reads
        // what is left.
        self.lease.release();
        self.up.abandon();
        discard_received(&self.client.stream);
        // The failure may have come before the event that reports the
        // backend's bytes.
        self.backend.readable = true;
    }

    /// A peer that reported an error which no read or write is going to
    /// surface. A failed client can take no more bytes, so what the pair
    /// still holds for either side is undeliverable or (to the backend)
    /// would end in a reset anyway. A failed backend waits while bytes it
    /// sent are still on their way to the client: they can be delivered,
    /// and the next read from it then surfaces the error.
    fn unheard_error(&self) -> Option<Side> {
        if self.client.hangup == Hangup::Error {
            Some(Side::Client)
        } else if self.backend.hangup == Hangup::Error && self.down.pending() == 0 {
            Some(Side::Backend)
        } else {
            None
        }
    }

    /// A reset or error on `side`. The stream was cut, so the survivor is
    /// reset too: a clean FIN would make a truncated stream look complete.
    fn abort(&mut self, side: Side, e: &io::Error) -> Outcome {
        log_failure(self.origin, side, e);
        self.cut(side)
    }

    /// Resets both sides of a pair that failed on `side`, closing it now or,
    /// while the client has yet to take bytes lb wrote to it, once it has.
    fn cut(&mut self, side: Side) -> Outcome {
        self.reset_both();
        // Nothing is relayed any more: what is held is dropped and the
        // buffers or pipes go back now, not when the client is done.
        self.up.abandon();
        self.down.abandon();
        // The client's reset or error already discarded its queue (and
        // `unacknowledged` then says 0). What the backend's queue holds is
        // not waited for: its client is gone or the backend failed.
        match unacknowledged(&self.client.stream) {
            0 => Outcome::Close(CloseReason::Aborted(side)),
            queued => {
                // The backend connection is over (failed, or about to be
                // reset with the pair): leastconn must not count it while
                // the client reads its last bytes.
                self.lease.release();
                self.stage = Stage::Lingering { side, queued };
                Outcome::Linger
            }
        }
    }

    /// Looks again at a lingering pair: `Close` once the client has
    /// acknowledged everything lb wrote to it (or its connection closed),
    /// `Continue` meanwhile. Progress counts as activity, so only a client
    /// that stops reading meets the idle timeout. What the client sends
    /// meanwhile is dropped: a client that writes its whole request before
    /// it reads would otherwise block on lb's full window and never read.
    pub fn linger(&mut self, now: Instant) -> Outcome {
        let Stage::Lingering { side, queued } = self.stage else { return Outcome::Continue };
        discard_received(&self.client.stream);
        match unacknowledged(&self.client.stream) {
            0 => Outcome::Close(CloseReason::Aborted(side)),
            left => {
                if left < queued {
                    self.last_active = now;
                }
                self.stage = Stage::Lingering { side, queued: left };
                Outcome::Continue
            }
        }
    }

    /// Readies a pair that lb ends on its own for its close. An idle pair
    /// with nothing in flight gets FINs, the usual end of an idle
    /// connection. Bytes still held for either side would be lost, so then
    /// the stream is cut and both sides get a reset, as on an abort: a FIN
    /// would make the shortened stream look complete. So does a shutdown
    /// or a failed event loop, which ends a pair at an arbitrary moment:
    /// whether or not lb holds bytes just then, neither stream has ended.
    pub fn expire(&mut self, cut: Cut) {
        // A failed pair ends in a reset in any case.
        if cut != Cut::Idle || self.failed() || self.up.pending() > 0 || self.down.pending() > 0 {
            self.reset_both();
        }
    }

    /// How long the pair may go without progress before lb closes it:
    /// `idle` (the idle timeout) while it relays. A failed pair that only
    /// delivers the backend's last bytes to its client is held no longer
    /// than [`LINGER_LIMIT`], even with no idle timeout.
    pub fn idle_limit(&self, idle: Option<Duration>) -> Option<Duration> {
        match self.stage {
            // --connection-timeout bounds it; expiring it here would skip
            // the retry on another backend.
            Stage::Connecting { .. } => None,
            _ if self.failed() => Some(idle.map_or(LINGER_LIMIT, |t| t.min(LINGER_LIMIT))),
            _ => idle,
        }
    }

    /// The pair failed: lb relays only what the backend sent before it went
    /// away, or lingers before the reset.
    fn failed(&self) -> bool {
        matches!(self.stage, Stage::Lingering { .. }) || self.up.flow == Flow::Abandoned
    }

    /// Makes the coming close send RST instead of FIN.
    pub fn reset_both(&mut self) {
        reset_on_close(&self.client.stream);
        reset_on_close(&self.backend.stream);
    }

    /// Bytes relayed since the last call, as (client→backend, backend→client).
    pub fn take_unreported(&mut self) -> (u64, u64) {
        if let Some(k) = self.kernel.as_deref_mut() {
            self.up.count_kernel_bytes(&mut k.up);
            self.down.count_kernel_bytes(&mut k.down);
        }
        let r = (self.up.unreported, self.down.unreported);
        self.up.unreported = 0;
        self.down.unreported = 0;
        self.reported = (self.reported.0 + r.0, self.reported.1 + r.1);
        r
    }

    /// Of the bytes relayed since the last call, how many were spliced.
    pub fn take_unreported_spliced(&mut self) -> u64 {
        let r = self.up.unreported_spliced + self.down.unreported_spliced;
        self.up.unreported_spliced = 0;
        self.down.unreported_spliced = 0;
        r
    }

    /// Of the bytes relayed since the last call, how many the kernel relay
    /// moved (counted by [`Session::take_unreported`]).
    pub fn take_unreported_kernel(&mut self) -> u64 {
        let Some(k) = self.kernel.as_deref_mut() else { return 0 };
        std::mem::take(&mut k.up.unreported) + std::mem::take(&mut k.down.unreported)
    }

    /// Whether the pair should move to the kernel relay now: it relays,
    /// both ways traded short messages, and lb holds none of its bytes.
    /// (A 32-bit build, whose tokens could not tell a joined pair's ends
    /// from the next pair's, never loads the relay: `kernel_relays`.)
    pub fn ready_to_join(&self) -> bool {
        !self.join_tried
            && self.stage == Stage::Relaying
            && self.up.ready_to_join(&self.client)
            && self.down.ready_to_join(&self.backend)
    }

    /// Hands the pair to the kernel relay, on the slots of slab key `key`,
    /// with its state taken from `spare`. Tried once: a pair the kernel
    /// refuses stays with lb.
    pub fn join(&mut self, relay: &'a Redirector, key: usize, spare: &mut KernelPairs<'a>) {
        self.join_tried = true;
        let Some(first) = u32::try_from(key).ok().and_then(|k| k.checked_mul(2)).filter(|&i| i + 1 < relay.slots())
        else {
            return;
        };
        let (client, backend) = (self.client.stream.as_raw_fd(), self.backend.stream.as_raw_fd());
        let (Ok(c), Ok(b)) = (redirect::cookie(client), redirect::cookie(backend)) else { return };
        // Whatever the outcome, the relay may hold entries for them now.
        let k = self.kernel.insert(spare.take());
        k.cookies = (c, b);
        // The backend socket made the connect.
        k.up.dst_connected = true;
        match relay.join(client, backend, [first, first + 1]) {
            Ok(joined) => {
                // Nothing is held (`ready_to_join`) and no byte was counted
                // from the program yet: lb wrote what it has reported.
                let wrote = (self.reported.0 + self.up.unreported, self.reported.1 + self.down.unreported);
                if joined.client_to_backend {
                    self.up.enter_kernel(&mut k.up, relay.slot(first), first, wrote.0);
                }
                if joined.backend_to_client {
                    self.down.enter_kernel(&mut k.down, relay.slot(first + 1), first + 1, wrote.1);
                }
                if joined.client_to_backend || joined.backend_to_client {
                    debug!("client {}: relayed in the kernel from now on ({joined:?})", self.origin.addr);
                }
            }
            Err(e) => debug!("client {}: the kernel relay refused the pair: {e}", self.origin.addr),
        }
    }

    /// What the pair's sockets should be registered for: while both
    /// directions are in the kernel relay only the end of either stream
    /// and errors (`None`). Readiness to read or write would wake lb for
    /// every message the program moves: it signals the sockets' waiters
    /// each time.
    pub fn interest(&self) -> Option<Interest> {
        if matches!(self.up.transfer, Transfer::Kernel) && matches!(self.down.transfer, Transfer::Kernel) {
            None
        } else {
            Some(SOCKET_INTEREST)
        }
    }

    /// A direction in the kernel relay spent its budget and lb has not
    /// taken over yet (its notice may have been lost in a full ring).
    pub fn kernel_spent(&self) -> bool {
        self.kernel.as_deref().is_some_and(|k| self.up.kernel_spent(&k.up) || self.down.kernel_spent(&k.down))
    }

    /// Both sockets' cookies, if the pair tried to join the kernel relay.
    pub fn cookies(&self) -> Option<(u64, u64)> {
        self.kernel.as_deref().map(|k| k.cookies)
    }

    /// Gives the pair's kernel relay state back to `spare`, for the next
    /// pair that joins. Once the pair is closing: its bytes are no longer
    /// counted from the relay after this.
    pub fn release_kernel_state(&mut self, spare: &mut KernelPairs<'a>) {
        if let Some(k) = self.kernel.take() {
            spare.give_back(k);
        }
    }

    /// The program asked, for direction slot `index`, for more budget:
    /// granted while the flow looks like request/response traffic and the
    /// destination takes what it is sent. Otherwise the budget runs out
    /// and the direction falls back to lb, which splits a bulk flow's
    /// bytes faster than the program does.
    pub fn on_kernel_notice(&mut self, index: u32, relay: &Redirector, now: Instant) {
        let Some(k) = self.kernel.as_deref_mut() else { return };
        let (dir, kd, dst) = match (k.up.joined, k.down.joined) {
            (Some(j), _) if j.index == index => (&self.up, &mut k.up, &self.backend),
            (_, Some(j)) if j.index == index => (&self.down, &mut k.down, &self.client),
            _ => return,
        };
        let Some(j) = kd.joined else { return };
        // Spent already: this is the notice that it ran out, or lb came
        // too late to the one that asked for more.
        if !matches!(dir.transfer, Transfer::Kernel) || j.slot.passing() {
            return;
        }
        if !redirect::worth_topping_up(j.topped_up, now) {
            kd.declined = Some(Declined::Bulk);
            return;
        }
        match relay.refill(index, dst.stream.as_raw_fd(), kd.dst_connected, kd.wrote) {
            Ok(true) => {
                if let Some(j) = &mut kd.joined {
                    j.topped_up = Some(now);
                }
                kd.top_ups = kd.top_ups.saturating_add(1);
                kd.declined = None;
            }
            Ok(false) => kd.declined = Some(Declined::NotDraining),
            Err(e) => {
                kd.declined = Some(Declined::Failed);
                debug!("client {}: a kernel relay top-up failed: {e}", self.origin.addr);
            }
        }
    }

    /// Buffers this session holds right now (0 when idle).
    pub fn buffers_held(&self) -> usize {
        usize::from(self.up.holds_buffer()) + usize::from(self.down.holds_buffer())
    }
}

/// Logs a failure on `side`: resets and refusals are routine, anything
/// else is worth a warning.
fn log_failure(origin: Origin, side: Side, e: &io::Error) {
    if classify(e) == IoClass::Error {
        log::warn!("client {}: relay error ({side:?} side): {e}", origin.addr);
    } else {
        debug!("client {}: relay closed ({side:?} side): {e}", origin.addr);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::backend;
    use crate::config::BackendSpec;
    use crate::shared::Shared;

    /// Both ends of a loopback connection: lb's (non-blocking, for mio)
    /// and the peer's.
    fn connected() -> (TcpStream, std::net::TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let far = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (near, _) = l.accept().expect("accept");
        near.set_nonblocking(true).expect("nonblocking");
        (TcpStream::from_std(near), far)
    }

    fn settings() -> WorkerSettings {
        WorkerSettings {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: None,
            retries: 0,
            fall: 0,
            splice: SpliceMode::Never,
        }
    }

    fn shared() -> Shared {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        Shared::new(backend::table(&[BackendSpec { name: "b".into(), addr, weight: 1 }]), 4, Vec::new())
    }

    /// Waits (up to 5 s) until `s` reports `what` (POLLERR: an error
    /// queued, POLLRDHUP: the peer's FIN in); poll(2), unlike a read,
    /// leaves both for lb to find.
    fn wait_for(s: &TcpStream, what: i16, never: &str) {
        let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: what, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert!(ready == 1 && pfd.revents & what != 0, "{never}");
    }

    fn wait_for_error(s: &TcpStream) {
        wait_for(s, libc::POLLERR, "the reset never arrived");
    }

    /// A buffer pool and a pipe pool (`max_pipes` of `pipe_size`) for one
    /// test, leaked so that they outlive whatever the test drops.
    fn test_pools(pipe_size: usize, max_pipes: usize) -> Pools<'static> {
        let buffers = Box::leak(Box::new(BufferPool::new(1024, 4)));
        let open = Box::leak(Box::new(AtomicU64::new(0)));
        let pipes = Box::leak(Box::new(PipePool::new(pipe_size, max_pipes, max_pipes, open)));
        Pools { buffers, pipes, relay: None }
    }

    /// A relaying session between two fresh loopback connections, with the
    /// peers' ends of the client's and the backend's connection.
    fn relaying(shared: &Shared) -> (Session<'_>, std::net::TcpStream, std::net::TcpStream) {
        relaying_to(shared, connected())
    }

    /// As [`relaying`], to the backend connection given (lb's end, the
    /// peer's end).
    fn relaying_to(
        shared: &Shared,
        (backend, backend_far): (TcpStream, std::net::TcpStream),
    ) -> (Session<'_>, std::net::TcpStream, std::net::TcpStream) {
        let (client, client_far) = connected();
        let slot = shared.try_acquire_client().expect("a slot");
        let lease = shared.backends[0].lease();
        let origin = Origin { addr: client_far.local_addr().expect("addr"), accepted: Instant::now() };
        let client = Client { stream: client, slot, tried: Tried::default(), origin };
        let mut s = Session::new(client, backend, lease, Instant::now(), &settings());
        s.stage = Stage::Relaying;
        (s, client_far, backend_far)
    }

    /// Closes `s` with a reset.
    fn reset(s: std::net::TcpStream) {
        reset_on_close(&s);
        drop(s);
    }

    /// Runs `s` as the worker would (a `Wait` is looked at again after a
    /// millisecond) until `done` says so, for at most 5 s.
    fn resume_until<'a>(s: &mut Session<'a>, pools: Pools<'a>, what: &str, mut done: impl FnMut(&Outcome) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let outcome = s.resume(pools, Instant::now());
            if done(&outcome) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: still {outcome:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_joined_pair_ends_on_a_backend_fin_after_lbs_own_that_its_event_could_not_tell() {
        if !crate::bpf::allowed() {
            eprintln!("skipped: the kernel relay needs root and bpf(2)");
            return;
        }
        // The barriers count the SYN of the backend socket, which lb
        // connects: so does this one.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let backend = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (backend_far, _) = l.accept().expect("accept");
        backend.set_nonblocking(true).expect("nonblocking");
        let shared = shared();
        let (mut s, mut client_far, mut backend_far) =
            relaying_to(&shared, (TcpStream::from_std(backend), backend_far));
        for far in [&backend_far, &client_far] {
            far.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        }
        let relay: &'static Redirector = Box::leak(Box::new(Redirector::new(2, redirect::BUDGET).expect("load")));
        let pools = Pools { relay: Some(relay), ..test_pools(1024, 0) };
        s.join(relay, 0, &mut KernelPairs::default());
        assert!(s.interest().is_none(), "both directions joined");
        let mut got = [0u8; 4];
        client_far.write_all(b"ping").expect("request");
        backend_far.read_exact(&mut got).expect("the request through the kernel");
        assert_eq!(&got, b"ping");
        backend_far.write_all(b"pong").expect("response");
        client_far.read_exact(&mut got).expect("the response through the kernel");
        assert_eq!(&got, b"pong");
        // The client ends first, and lb relays its FIN.
        client_far.shutdown(Shutdown::Write).expect("the client's FIN");
        wait_for(&s.client.stream, libc::POLLRDHUP, "the client's FIN never arrived");
        s.client.hangup = Hangup::Fin;
        resume_until(&mut s, pools, "the client's FIN relayed", |o| matches!(o, Outcome::Continue));
        assert_eq!(s.up.flow, Flow::Done);
        let mut rest = Vec::new();
        backend_far.read_to_end(&mut rest).expect("lb's FIN to the backend");
        assert!(rest.is_empty());
        // Then the backend's last bytes and its FIN, in one segment (MSG_MORE
        // holds the bytes for it). lb's socket sent its FIN first, so it is
        // in CLOSE now, not TIME_WAIT. Noted as an error report that proved
        // empty leaves it, the state must tell the end.
        assert_eq!(SockRef::from(&backend_far).send_with_flags(b"bye", libc::MSG_MORE).expect("send"), 3);
        backend_far.shutdown(Shutdown::Write).expect("the backend's FIN");
        // TCP marks the receive side shut before the state reaches CLOSE.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !redirect::was_closed(s.backend.stream.as_raw_fd()).expect("TCP_INFO") {
            assert!(Instant::now() < deadline, "the backend socket never reached CLOSE");
            std::thread::sleep(Duration::from_millis(1));
        }
        s.backend.hangup = Hangup::Unsure;
        resume_until(&mut s, pools, "the pair's end", |o| matches!(o, Outcome::Close(CloseReason::Done)));
        drop(s);
        let (got, end) = read_to_the_end(client_far);
        assert_eq!((got.as_slice(), end), (&b"bye"[..], Ok(())), "the client got the backend's last bytes and its FIN");
    }

    #[test]
    fn the_line_of_a_direction_back_from_the_kernel_tells_why() {
        let late = LeftBecause(None).to_string();
        assert_eq!(late, "lb came too late to its notice");
        for d in [Declined::Bulk, Declined::NotDraining, Declined::Failed] {
            let let_go = LeftBecause(Some(d)).to_string();
            assert!(let_go.starts_with("lb let it run out: ") && let_go != late, "{d:?}: {let_go}");
        }
    }

    #[test]
    fn a_session_grows_only_on_purpose() {
        // Every pair holds one while it lives, idle or not, so this is most
        // of lb's memory per idle connection. 480 bytes on 64-bit before
        // the kernel relay, 680 with the relay's state held by every
        // pair; 520 with it out of line ([`KernelPair`]), what the bound
        // holds (428 on 32-bit). A field that must make it bigger raises
        // the bound knowingly, and what the benchmark's idle connections
        // cost moves with it. Debug builds are larger: mio's sockets then
        // carry the id of their selector, one word each.
        let release = if cfg!(target_pointer_width = "64") { 520 } else { 428 };
        let bound = release + if cfg!(debug_assertions) { 2 * 16 } else { 0 };
        let (session, direction) = (std::mem::size_of::<Session>(), std::mem::size_of::<Direction>());
        assert!(session <= bound, "a Session takes {session} bytes (a Direction {direction}), past {bound}");
    }

    #[test]
    fn bytes_read_just_ahead_of_a_reset_still_reach_the_other_side() {
        let shared = shared();
        let pools = test_pools(1024, 0);
        let (mut s, client_far, mut backend_far) = relaying(&shared);
        let now = Instant::now();
        backend_far.write_all(b"reply").expect("write");
        reset(backend_far);
        wait_for_error(&s.backend.stream);
        // As an error a read took leaves it, with no telling whether a FIN
        // came first: the short read is followed by a second one, which
        // meets the reset.
        s.backend.hangup = Hangup::Unsure;
        s.backend.readable = true;
        s.client.writable = true;
        assert!(matches!(s.resume(pools, now), Outcome::Close(CloseReason::Aborted(Side::Backend)) | Outcome::Linger));
        drop(s);
        let (got, end) = read_to_the_end(client_far);
        assert_eq!(got, b"reply", "the stream ended with {end:?}");
        assert_eq!(end, Err(io::ErrorKind::ConnectionReset));
    }

    /// A relaying pair whose backend sent what `send` sends, then its FIN,
    /// noted as an event would, with the client ready to take bytes.
    fn after_the_backends_fin<'a>(
        shared: &'a Shared,
        send: impl FnOnce(&std::net::TcpStream),
    ) -> (Session<'a>, std::net::TcpStream) {
        let (mut s, client_far, backend_far) = relaying(shared);
        send(&backend_far);
        backend_far.shutdown(std::net::Shutdown::Write).expect("FIN");
        wait_for(&s.backend.stream, libc::POLLRDHUP, "the FIN never arrived");
        s.backend.hangup = Hangup::Fin;
        s.backend.readable = true;
        s.client.writable = true;
        (s, client_far)
    }

    /// Reads `far` to its end (within 5 s): what came, and how it ended.
    fn read_to_the_end(mut far: std::net::TcpStream) -> (Vec<u8>, Result<(), io::ErrorKind>) {
        far.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut got = Vec::new();
        let end = far.read_to_end(&mut got).map(|_| ()).map_err(|e| e.kind());
        (got, end)
    }

    #[test]
    fn a_short_read_behind_a_noted_fin_ends_the_direction_with_the_bytes_and_a_fin() {
        // Whether the read that would return 0 is made shows only in a
        // syscall count (measured, not tested): either way the direction
        // ends in this one pass.
        let shared = shared();
        let pools = test_pools(1024, 0);
        let (mut s, client_far) = after_the_backends_fin(&shared, |mut b| {
            b.write_all(b"reply").expect("write");
        });
        assert!(matches!(s.resume(pools, Instant::now()), Outcome::Continue));
        assert_eq!(s.down.flow, Flow::Done);
        assert_eq!(read_to_the_end(client_far), (b"reply".to_vec(), Ok(())));
    }

    #[test]
    fn a_read_cut_short_at_an_urgent_mark_ahead_of_the_fin_is_not_taken_for_the_end() {
        let shared = shared();
        let pools = test_pools(1024, 0);
        let (mut s, client_far) = after_the_backends_fin(&shared, |mut b| {
            b.write_all(b"before ").expect("write");
            socket2::SockRef::from(b).send_with_flags(b"!", libc::MSG_OOB).expect("send urgent");
            b.write_all(b"after").expect("write");
        });
        // As the event that reported the urgent data leaves it.
        s.backend.urgent = true;
        assert!(matches!(s.resume(pools, Instant::now()), Outcome::Continue));
        assert_eq!(s.down.flow, Flow::Done);
        // lb does not read out-of-band bytes: the urgent one drops out.
        assert_eq!(read_to_the_end(client_far), (b"before after".to_vec(), Ok(())));
    }

    #[test]
    fn a_backend_reset_behind_bytes_a_client_is_not_reading_yet_fails_the_pair_but_keeps_the_bytes() {
        let shared = shared();
        let pools = test_pools(1024, 0);
        let (mut s, client_far, backend_far, reply) = replying_to_a_client_not_reading(&shared);
        let now = Instant::now();
        reset(backend_far);
        failing(&mut s);
        assert!(matches!(s.resume(pools, now), Outcome::Continue));
        assert!(s.down.pending() > 0, "lb holds bytes for the client");
        assert_eq!(shared.backends[0].load_key(), 0, "the failed backend is still counted");
        assert_eq!(s.idle_limit(None), Some(LINGER_LIMIT), "the pair could wait for its client for ever");
        // The client reads at last: it gets every byte, then the reset.
        let (closed, got, end) = relay_to_the_end(s, pools, client_far, now);
        if let Some(reason) = closed {
            assert!(matches!(reason, CloseReason::Aborted(Side::Backend)), "{reason:?}");
        }
        assert!(got.ends_with(&reply), "the backend's last {} bytes were lost", reply.len());
        assert_eq!(end, Err(io::ErrorKind::ConnectionReset));
    }

    /// A pair whose client reads nothing (its socket's queues are full)
    /// while the backend has sent a reply; the reply is returned.
    fn replying_to_a_client_not_reading(
        shared: &Shared,
    ) -> (Session<'_>, std::net::TcpStream, std::net::TcpStream, Vec<u8>) {
        let (mut s, client_far, mut backend_far) = relaying(shared);
        fill_queue(&mut s.client.stream);
        let reply: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        backend_far.write_all(&reply).expect("write");
        (s, client_far, backend_far, reply)
    }

    /// Waits for the backend socket's error and reports it as the event
    /// loop would.
    fn failing(s: &mut Session) {
        wait_for_error(&s.backend.stream);
        s.backend.hangup = Hangup::Error;
        s.backend.readable = true;
        s.client.writable = true;
    }

    /// Relays what the client sent (and its FIN, with `hangup` Fin) until
    /// the upload reaches `flow`, leaving the backend's reply unread.
    fn upload_until<'a>(s: &mut Session<'a>, pools: Pools<'a>, now: Instant, hangup: Hangup, flow: Flow) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.up.flow != flow {
            assert!(Instant::now() < deadline, "the upload never reached {flow:?}");
            s.client.readable = true;
            s.client.hangup = hangup;
            s.backend.writable = true;
            s.backend.readable = false;
            assert!(matches!(s.resume(pools, now), Outcome::Continue | Outcome::Again));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs the pair to its end and checks that the client got the
    /// backend's whole reply, then a FIN.
    fn ends_whole_with_a_fin<'a>(
        s: Session<'a>,
        pools: Pools<'a>,
        client_far: std::net::TcpStream,
        now: Instant,
        reply: &[u8],
    ) {
        let (_, got, end) = relay_to_the_end(s, pools, client_far, now);
        assert!(got.ends_with(reply), "the backend's last {} bytes were lost", reply.len());
        assert_eq!(end, Ok(()), "the backend's stream ended with a FIN, not a reset");
    }

    /// Runs a pair, its client reading on another thread, until it
    /// closes; returns why (None when it lingered), what the client got
    /// and how its stream ended.
    fn relay_to_the_end<'a>(
        mut s: Session<'a>,
        pools: Pools<'a>,
        client_far: std::net::TcpStream,
        now: Instant,
    ) -> (Option<CloseReason>, Vec<u8>, Result<(), io::ErrorKind>) {
        let reader = std::thread::spawn(move || read_to_the_end(client_far));
        let deadline = Instant::now() + Duration::from_secs(5);
        let closed = loop {
            assert!(Instant::now() < deadline, "the pair never ended");
            s.client.writable = true;
            match s.resume(pools, now) {
                Outcome::Close(reason) => break Some(reason),
                Outcome::Linger => {
                    while !matches!(s.linger(now), Outcome::Close(_)) {
                        assert!(Instant::now() < deadline, "the client never took its last bytes");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    break None;
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        drop(s);
        let (got, end) = reader.join().expect("reader");
        (closed, got, end)
    }

    #[test]
    fn a_backend_that_refuses_an_upload_after_its_fin_still_ends_the_client_stream_with_a_fin() {
        let shared = shared();
        let pools = test_pools(1024, 0);
        let (mut s, client_far, backend_far, reply) = replying_to_a_client_not_reading(&shared);
        let now = Instant::now();
        drop(backend_far);
        // The client's upload reaches a closed socket, which resets.
        s.backend.stream.write_all(b"late upload").expect("write");
        failing(&mut s);
        assert!(matches!(s.resume(pools, now), Outcome::Continue));
        assert_eq!(shared.backends[0].load_key(), 0, "the failed backend is still counted");
        ends_whole_with_a_fin(s, pools, client_far, now, &reply);
    }

    #[test]
    fn an_upload_refused_with_epipe_after_the_backends_fin_still_ends_the_client_stream_with_a_fin() {
        let shared = shared();
        let pools = test_pools(1024, 0);
        let (mut s, mut client_far, backend_far, reply) = replying_to_a_client_not_reading(&shared);
        let now = Instant::now();
        drop(backend_far);
        // Bytes to the closed socket bring its reset; the next write of
        // the upload meets it as EPIPE (the socket is in CLOSE_WAIT).
        s.backend.stream.write_all(b"first").expect("write");
        wait_for_error(&s.backend.stream);
        client_far.write_all(b"late upload").expect("write");
        upload_until(&mut s, pools, now, Hangup::None, Flow::Abandoned);
        // As epoll reported the reset meanwhile.
        s.backend.hangup = Hangup::Error;
        fill_queue(&mut s.client.stream);
        ends_whole_with_a_fin(s, pools, client_far, now, &reply);
    }

    #[test]
    fn a_backend_that_resets_the_clients_last_bytes_after_both_fins_still_ends_the_client_stream_with_a_fin() {
        let shared = shared();
        let pools = test_pools(1024, 0);
        let (mut s, mut client_far, backend_far, reply) = replying_to_a_client_not_reading(&shared);
        let now = Instant::now();
        drop(backend_far);
        // The client's last bytes follow lb's FIN to a closed socket, which
        // resets: past lb's FIN the socket reports ECONNRESET, not EPIPE,
        // although the backend's FIN came first.
        client_far.write_all(b"late upload").expect("write");
        client_far.shutdown(Shutdown::Write).expect("shutdown");
        upload_until(&mut s, pools, now, Hangup::Fin, Flow::Done);
        // The client's queue drained a little meanwhile.
        fill_queue(&mut s.client.stream);
        failing(&mut s);
        assert!(matches!(s.resume(pools, now), Outcome::Continue));
        ends_whole_with_a_fin(s, pools, client_far, now, &reply);
    }

    #[test]
    fn a_pair_whose_backend_failed_is_reset_when_it_expires_even_with_nothing_held() {
        let shared = shared();
        let (mut s, mut client_far, _backend_far) = relaying(&shared);
        s.up.abandon();
        s.expire(Cut::Idle);
        drop(s);
        client_far.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let end = client_far.read(&mut [0u8; 16]).map_err(|e| e.kind());
        assert_eq!(end, Err(io::ErrorKind::ConnectionReset));
    }

    #[test]
    fn a_pair_cut_by_a_shutdown_or_a_failed_event_loop_is_reset_even_with_nothing_held() {
        let shared = shared();
        for cut in [Cut::Shutdown, Cut::LoopFailed] {
            let (mut s, mut client_far, mut backend_far) = relaying(&shared);
            s.expire(cut);
            drop(s);
            for (far, side) in [(&mut client_far, "client"), (&mut backend_far, "backend")] {
                far.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                let end = far.read(&mut [0u8; 16]).map_err(|e| e.kind());
                assert_eq!(end, Err(io::ErrorKind::ConnectionReset), "{cut:?}: the {side}");
            }
        }
    }

    #[test]
    fn a_failed_pair_waits_for_its_client_no_longer_than_the_linger_limit() {
        let shared = shared();
        let (mut s, _client_far, _backend_far) = relaying(&shared);
        let hour = Some(Duration::from_secs(3600));
        let second = Some(Duration::from_secs(1));
        assert_eq!(s.idle_limit(None), None, "a relaying pair with no idle timeout is held for ever");
        assert_eq!(s.idle_limit(hour), hour);
        s.stage = Stage::Lingering { side: Side::Backend, queued: 1 };
        assert_eq!(s.idle_limit(None), Some(LINGER_LIMIT));
        assert_eq!(s.idle_limit(hour), Some(LINGER_LIMIT));
        assert_eq!(s.idle_limit(second), second, "a shorter idle timeout applies as it is");
        // Still relaying the backend's last bytes after it failed.
        s.stage = Stage::Relaying;
        s.up.abandon();
        assert_eq!(s.idle_limit(None), Some(LINGER_LIMIT));
        assert_eq!(s.idle_limit(hour), Some(LINGER_LIMIT));
    }

    #[test]
    fn a_pair_still_connecting_is_left_to_the_connect_timeout() {
        let shared = shared();
        let (mut s, _client_far, _backend_far) = relaying(&shared);
        let now = s.last_active;
        s.stage = Stage::Connecting { started: now, deadline: now + Duration::from_secs(10) };
        let second = Some(Duration::from_secs(1));
        assert_eq!(s.idle_limit(second), None);
        assert!(!s.is_idle(now + Duration::from_secs(5), second), "a connect in progress was cut as idle");
    }

    /// Fills lb's send queue on `stream` (the far end reads nothing).
    fn fill_queue(stream: &mut TcpStream) {
        let chunk = [7u8; 65536];
        for _ in 0..10_000 {
            match stream.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => panic!("write: {e}"),
            }
        }
        panic!("the send queue never filled");
    }

    /// Reads from `far` until the kernel has moved some of lb's send queue
    /// on `near`, its end of the connection.
    fn take_until_the_queue_moves(near: &TcpStream, far: &mut std::net::TcpStream) {
        let before = send_queue_bytes(near);
        let deadline = Instant::now() + Duration::from_secs(5);
        while send_queue_bytes(near) >= before {
            assert!(Instant::now() < deadline, "the queue never moved");
            far.read_exact(&mut [0u8; 4096]).expect("read");
        }
    }

    #[test]
    fn a_slow_reader_draining_lbs_send_queue_keeps_the_pair_from_going_idle() {
        let shared = shared();
        let (mut s, mut client_far, _backend_far) = relaying(&shared);
        fill_queue(&mut s.client.stream);
        let limit = Duration::from_secs(10);
        let t0 = s.last_active;
        assert!(!s.is_idle(t0 + limit / 2, Some(limit)), "half way: only a look");
        // The reader takes a little: the kernel moves more of lb's queue.
        take_until_the_queue_moves(&s.client.stream, &mut client_far);
        assert!(!s.is_idle(t0 + limit, Some(limit)), "a pair whose reader took bytes was cut as idle");
        assert_eq!(s.last_active, t0 + limit, "the progress restarts the quiet spell");
        // The reader stops: a whole limit without progress is idle.
        let t1 = s.last_active;
        assert!(!s.is_idle(t1 + limit / 2, Some(limit)));
        assert!(s.is_idle(t1 + limit, Some(limit)), "a stuck pair was held past its limit");
    }

    #[test]
    fn a_reader_taking_bytes_less_often_than_every_half_limit_is_not_cut() {
        // Its bytes taken before the first read of the queues went unseen:
        // a whole limit without a move must be measured from a read.
        let shared = shared();
        let (mut s, mut client_far, _backend_far) = relaying(&shared);
        fill_queue(&mut s.client.stream);
        let limit = Duration::from_secs(10);
        let t0 = s.last_active;
        assert!(!s.is_idle(t0 + limit / 2, Some(limit)));
        assert!(!s.is_idle(t0 + limit, Some(limit)), "cut after half a limit without a move");
        take_until_the_queue_moves(&s.client.stream, &mut client_far);
        assert!(!s.is_idle(t0 + limit * 3 / 2, Some(limit)), "a pair whose reader took bytes was cut as idle");
        assert_eq!(s.last_active, t0 + limit * 3 / 2);
    }

    #[test]
    fn a_backend_slowly_taking_an_upload_keeps_the_pair_from_going_idle() {
        let shared = shared();
        let (mut s, _client_far, mut backend_far) = relaying(&shared);
        fill_queue(&mut s.backend.stream);
        let limit = Duration::from_secs(10);
        let t0 = s.last_active;
        assert!(!s.is_idle(t0 + limit / 2, Some(limit)));
        take_until_the_queue_moves(&s.backend.stream, &mut backend_far);
        assert!(!s.is_idle(t0 + limit, Some(limit)), "a pair whose backend took bytes was cut as idle");
    }

    #[test]
    fn a_quiet_pair_is_idle_at_its_limit_even_when_first_seen_past_it() {
        let shared = shared();
        let limit = Some(Duration::from_millis(500));
        let (mut s, _client_far, _backend_far) = relaying(&shared);
        let t0 = s.last_active;
        assert!(s.is_idle(t0 + Duration::from_secs(1), limit), "nothing queued: idle at the first look");
        // With bytes queued, the first look past the limit only reads them.
        let (mut s, _client_far, _backend_far) = relaying(&shared);
        fill_queue(&mut s.client.stream);
        let t0 = s.last_active;
        assert!(!s.is_idle(t0 + Duration::from_secs(1), limit));
        assert!(s.is_idle(t0 + Duration::from_secs(2), limit), "nothing moved since the last look");
    }

    #[test]
    fn an_urgent_byte_last_before_the_fin_is_consumed_so_the_close_is_clean() {
        // The event announcing urgent data not yet seen, splice(2) returns
        // 0 at the mark as at the end of the stream, and a peek steps over
        // the byte without taking it. Left in the socket, that unread byte
        // turned the final close into a reset, discarding what lb's send
        // queue still held for the client.
        let shared = shared();
        let pools = test_pools(4096, 4);
        let (mut s, mut client_far, mut backend_far) = relaying(&shared);
        s.up = Direction::new(SpliceMode::Always);
        socket2::SockRef::from(&client_far).send_with_flags(b"!", libc::MSG_OOB).expect("send urgent");
        client_far.shutdown(Shutdown::Write).expect("shutdown");
        wait_for(&s.client.stream, libc::POLLRDHUP, "the FIN never arrived");
        s.client.readable = true;
        s.client.hangup = Hangup::Fin;
        s.backend.writable = true;
        let _ = s.resume(pools, Instant::now());
        assert_ne!(s.up.flow, Flow::Open, "the client's FIN was not taken");
        backend_far.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        assert_eq!(backend_far.read(&mut [0u8; 16]).expect("the backend's read"), 0, "the FIN was not relayed");
        drop(s);
        client_far.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let end = client_far.read(&mut [0u8; 16]).map_err(|e| e.kind());
        assert_eq!(end, Ok(0), "the client's connection ended in a reset");
    }

    #[test]
    fn an_error_report_the_socket_does_not_confirm_is_not_acted_on() {
        let shared = shared();
        let pools = test_pools(1024, 0);
        let (mut s, client_far, _backend_far) = relaying(&shared);
        let now = Instant::now();

        // As a stale event for a closed pair's socket would leave it.
        s.client.hangup = Hangup::Error;
        assert!(matches!(s.resume(pools, now), Outcome::Continue), "a healthy pair was ended");

        // A real reset is acted on although nothing reads the client.
        reset(client_far);
        wait_for_error(&s.client.stream);
        s.client.hangup = Hangup::Error;
        s.client.readable = false;
        assert!(matches!(s.resume(pools, now), Outcome::Close(CloseReason::Aborted(Side::Client))));
    }
}
