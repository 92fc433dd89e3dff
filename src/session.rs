//! One client/backend pair and the relay between them. A [`Session`] owns
//! both sockets, the backend [`Lease`], the client's slot under the global
//! cap and, while bytes are in flight, pooled buffers; dropping it releases
//! all of them. Event handlers return an [`Outcome`] that the worker acts on.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use log::debug;
use mio::event::Event;
use mio::net::TcpStream;

use crate::backend::Lease;
use crate::config::MAX_RETRIES;
use crate::net::{IoClass, classify};
use crate::pool::{Buffer, BufferPool};
use crate::shared::ClientSlot;

/// Chunks moved per direction per wakeup before yielding to other sessions;
/// the worker re-runs a session that stopped here.
const MAX_CHUNKS_PER_PUMP: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

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
    /// The backend connect failed; the worker retries elsewhere or gives up.
    ConnectFailed(io::Error),
    /// The pair is finished; drop it.
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions reached EOF and were relayed.
    Done,
    /// A peer reset or errored; the other side is reset too.
    Aborted(Side),
}

/// Where the backend connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connecting { started: Instant, deadline: Instant },
    Relaying,
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
}

/// A socket plus readiness hints. The hints let edge-triggered readiness be
/// remembered, so no syscall is made that is known to return `WouldBlock`.
#[derive(Debug)]
struct Peer {
    stream: TcpStream,
    readable: bool,
    writable: bool,
    /// The peer's FIN (or an error) was already reported: it sits behind
    /// the queued data and raises no new edge, so reads go on until EOF.
    hup_pending: bool,
}

impl Peer {
    fn new(stream: TcpStream) -> Peer {
        Peer { stream, readable: false, writable: false, hup_pending: false }
    }

    fn note(&mut self, ev: &Event) {
        // Errors and hang-ups are surfaced by the next read or write.
        let fault = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
        self.hup_pending |= ev.is_error() || ev.is_read_closed();
        self.readable |= ev.is_readable() || fault;
        self.writable |= ev.is_writable() || fault;
    }
}

/// Bytes travelling one way, source to destination.
#[derive(Debug)]
struct Direction<'p> {
    buf: Option<Buffer<'p>>,
    start: usize,
    end: usize,
    flow: Flow,
    /// Bytes written to the destination and not yet added to the backend's
    /// shared counters (flushed in batches to keep atomics off the hot path).
    unreported: u64,
}

/// Why a pump stopped.
enum Pumped {
    Idle,
    Again,
    Starved,
}

impl<'p> Direction<'p> {
    fn new() -> Direction<'p> {
        Direction { buf: None, start: 0, end: 0, flow: Flow::Open, unreported: 0 }
    }

    fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Moves bytes from `src` to `dst` until nothing more can move now.
    /// Reads only into an empty buffer, so a full buffer stops reading from
    /// the source (backpressure) and a buffer never grows.
    /// `closing_next` says the other direction is done, so the pair closes
    /// once this one is: the close itself then sends the FIN.
    fn pump(&mut self, src: &mut Peer, dst: &mut Peer, pool: &'p BufferPool, closing_next: bool) -> io::Result<Pumped> {
        for _ in 0..MAX_CHUNKS_PER_PUMP {
            if self.pending() > 0 {
                if !dst.writable {
                    return Ok(Pumped::Idle);
                }
                let buf = self.buf.as_ref().expect("pending bytes live in a buffer");
                match dst.stream.write(&buf[self.start..self.end]) {
                    Ok(n) => {
                        self.start += n;
                        self.unreported += n as u64;
                        if self.pending() > 0 {
                            // A short write means the socket buffer is full.
                            dst.writable = false;
                            return Ok(Pumped::Idle);
                        }
                        self.start = 0;
                        self.end = 0;
                        self.buf = None;
                    }
                    Err(e) => match classify(&e) {
                        IoClass::WouldBlock => {
                            dst.writable = false;
                            return Ok(Pumped::Idle);
                        }
                        IoClass::Interrupted => continue,
                        _ => return Err(e),
                    },
                }
            }
            if self.flow != Flow::Open {
                break;
            }
            if !src.readable {
                return Ok(Pumped::Idle);
            }
            if self.buf.is_none() {
                match pool.get() {
                    Some(b) => self.buf = Some(b),
                    None => return Ok(Pumped::Starved),
                }
            }
            let buf = self.buf.as_mut().expect("buffer taken above");
            let room = buf.len();
            match src.stream.read(&mut buf[..]) {
                Ok(0) => {
                    self.buf = None;
                    self.flow = Flow::Draining;
                }
                Ok(n) => {
                    self.end = n;
                    // A short read drained the socket; epoll reports the
                    // next arrival, so skip the read that would WouldBlock.
                    if n < room && !src.hup_pending {
                        src.readable = false;
                    }
                }
                Err(e) => {
                    self.buf = None;
                    match classify(&e) {
                        IoClass::WouldBlock => {
                            src.readable = false;
                            return Ok(Pumped::Idle);
                        }
                        IoClass::Interrupted => continue,
                        _ => return Err(e),
                    }
                }
            }
        }
        if self.flow == Flow::Draining && self.pending() == 0 {
            if !closing_next {
                match dst.stream.shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    // The destination already went away; nothing left to tell it.
                    Err(e) if classify(&e) == IoClass::Closed => {}
                    Err(e) => return Err(e),
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
    pub tried: Tried,
    _slot: ClientSlot<'a>,
}

impl<'a> Session<'a> {
    pub fn new(
        client: TcpStream,
        backend: TcpStream,
        lease: Lease<'a>,
        slot: ClientSlot<'a>,
        tried: Tried,
        now: Instant,
        connect_timeout: Duration,
    ) -> Session<'a> {
        Session {
            lease,
            client: Peer::new(client),
            backend: Peer::new(backend),
            stage: Stage::Connecting { started: now, deadline: now + connect_timeout },
            up: Direction::new(),
            down: Direction::new(),
            last_active: now,
            tried,
            _slot: slot,
        }
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

    /// Swaps in a new backend connection after a failed attempt; the old
    /// socket and lease are dropped (closed and uncounted) here.
    pub fn retry_with(&mut self, backend: TcpStream, lease: Lease<'a>, now: Instant, timeout: Duration) {
        self.backend = Peer::new(backend);
        self.lease = lease;
        self.stage = Stage::Connecting { started: now, deadline: now + timeout };
    }

    /// Handles readiness on one of the two sockets.
    pub fn on_event(&mut self, side: Side, ev: &Event, pool: &'a BufferPool, now: Instant) -> Outcome {
        match side {
            Side::Client => self.client.note(ev),
            Side::Backend => self.backend.note(ev),
        }
        if let Stage::Connecting { started, .. } = self.stage {
            if side == Side::Client {
                // Client bytes wait in the kernel until the backend is up, so
                // a retry on another backend loses nothing.
                return Outcome::Continue;
            }
            match self.finish_connect() {
                Ok(false) => return Outcome::Continue,
                Ok(true) => {
                    self.stage = Stage::Relaying;
                    self.lease.backend().connect_succeeded(now.saturating_duration_since(started));
                    if let Err(e) = self.backend.stream.set_nodelay(true) {
                        debug!("TCP_NODELAY on backend socket: {e}");
                    }
                    // Data may have arrived from the client while connecting.
                    self.client.readable = true;
                }
                Err(e) => return Outcome::ConnectFailed(e),
            }
        }
        self.last_active = now;
        self.relay(pool)
    }

    /// Runs the relay without a new event (after `Again` or `Starved`).
    pub fn resume(&mut self, pool: &'a BufferPool, now: Instant) -> Outcome {
        if self.stage != Stage::Relaying {
            return Outcome::Continue;
        }
        self.last_active = now;
        self.relay(pool)
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

    fn relay(&mut self, pool: &'a BufferPool) -> Outcome {
        let up = match self.up.pump(&mut self.client, &mut self.backend, pool, self.down.flow == Flow::Done) {
            Ok(p) => p,
            Err(e) => return self.abort(Side::Client, &e),
        };
        let down = match self.down.pump(&mut self.backend, &mut self.client, pool, self.up.flow == Flow::Done) {
            Ok(p) => p,
            Err(e) => return self.abort(Side::Backend, &e),
        };
        if self.up.flow == Flow::Done && self.down.flow == Flow::Done {
            return Outcome::Close(CloseReason::Done);
        }
        match (up, down) {
            (Pumped::Again, _) | (_, Pumped::Again) => Outcome::Again,
            (Pumped::Starved, _) | (_, Pumped::Starved) => Outcome::Starved,
            _ => Outcome::Continue,
        }
    }

    /// A reset or error on the direction read from `side` (or written to
    /// the other one). The stream was cut, so the survivor is reset too:
    /// a clean FIN would make a truncated stream look complete.
    fn abort(&mut self, side: Side, e: &io::Error) -> Outcome {
        if classify(e) == IoClass::Error {
            log::warn!("relay error ({side:?} side direction): {e}");
        } else {
            debug!("relay closed ({side:?} side direction): {e}");
        }
        self.reset_both();
        Outcome::Close(CloseReason::Aborted(side))
    }

    /// Makes the coming close send RST instead of FIN.
    pub fn reset_both(&mut self) {
        for s in [&self.client.stream, &self.backend.stream] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }

    /// Bytes relayed since the last call, as (client→backend, backend→client).
    pub fn take_unreported(&mut self) -> (u64, u64) {
        let r = (self.up.unreported, self.down.unreported);
        self.up.unreported = 0;
        self.down.unreported = 0;
        r
    }

    /// Buffers this session holds right now (0 when idle).
    pub fn buffers_held(&self) -> usize {
        usize::from(self.up.buf.is_some()) + usize::from(self.down.buf.is_some())
    }
}
