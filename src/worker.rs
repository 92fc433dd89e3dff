//! One event loop on one thread: its own `Poll`, its own listeners, and a
//! `Slab` of sessions whose keys are the mio tokens. It accepts under the
//! global cap, picks and connects backends (with retries), drives the relay,
//! and enforces connect and idle timeouts. Nothing here locks.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::backend::{Backend, Lease};
use crate::balancer;
use crate::config::SpliceMode;
use crate::listener::MAX_LISTENERS;
use crate::logging::Throttle;
use crate::net::{IoClass, classify, is_local_port_shortage, is_resource_exhaustion, reset_on_close};
use crate::session::{
    Client, CloseReason, Cut, KernelPairs, Origin, Outcome, Pools, SOCKET_INTEREST, Session, Side, Stage, Tried,
};
use crate::shared::Shared;
use crate::steer::Tracker;

/// Reserved tokens sit at the top of the token space, away from sessions.
pub const WAKER: Token = Token(usize::MAX - 1);
/// The kernel relay's notices (its ring buffer).
const RELAY: Token = Token(usize::MAX - 2);
/// Listener `i` has token `LISTENER_BASE - i`, for `i < MAX_LISTENERS`.
const LISTENER_BASE: usize = usize::MAX - 16;

/// accept() calls per listener wakeup before serving other events.
const ACCEPTS_PER_WAKEUP: usize = 64;
/// How long accept() backs off after running out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Cadence of idle checks and byte-counter publication.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How often a pair waiting for its client to take the last bytes before
/// a reset ([`Stage::Lingering`]) is looked at: the kernel raises no event
/// when a send queue empties.
const LINGER_CHECK: Duration = Duration::from_millis(10);
/// How often a pair waiting for the kernel relay to finish its last bytes
/// is looked at: the kernel raises no event for it, and it takes
/// microseconds.
const KERNEL_WAIT_CHECK: Duration = Duration::from_millis(1);
/// Per-worker knobs, copied out of the `Config` at start-up.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub retries: u32,
    /// Consecutive connect failures that take a backend down (0 = never).
    pub fall: u32,
    pub splice: SpliceMode,
}

/// This worker's shares of the shared gauges and counters, published at
/// a close or once per scan, so the relay itself touches no atomic.
#[derive(Debug, Default)]
struct Tally {
    /// Bytes relayed by splice, by copy and by the kernel relay, not yet
    /// published.
    spliced: u64,
    copied: u64,
    kernel: u64,
    /// What this worker last added to the shared gauges and counters.
    published_pipes_in_use: u64,
    published_buffers_in_use: u64,
    published_buffers_allocated: u64,
    published_exhausted: u64,
    published_unsupported: u64,
}

/// Whether the listeners are registered, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepting {
    Active,
    /// The global cap is reached; resumed when a slot frees.
    AtCap,
    /// accept() ran out of descriptors; retried at the instant given.
    BackingOff(Instant),
    /// Draining or stopping: listeners are closed for good.
    Closed,
}

/// Why no backend connect was started for a client.
#[derive(Debug)]
enum NoConnect<'a> {
    /// lb itself is out of descriptors or memory: not the backends' fault,
    /// and over once connections close. The mark is taken as soon as the
    /// connect fails, before anything else (a warning's write takes long
    /// enough for another worker to accept meanwhile and fail for want of
    /// a descriptor itself).
    Shortage(crate::shared::ParkedMark<'a>),
    /// No backend is up, or every one tried failed.
    GaveUp,
}

/// A client with no descriptor left for its backend socket: accepted with
/// the last one, or its connect failed and the retry found none. It waits,
/// unread, like the clients still in the backlog, and its connect is
/// retried after a back-off, rather than being reset.
#[derive(Debug)]
struct Parked<'a> {
    waiting: Unpaired<'a>,
    retry_at: Instant,
    /// Keeps every worker from accepting while it waits.
    _mark: crate::shared::ParkedMark<'a>,
}

/// A client not yet paired with a backend: just accepted, back from a
/// failed connect, or parked.
#[derive(Debug)]
struct Unpaired<'a> {
    /// Its `tried` is kept so that a retry or a wait does not reset
    /// `--retries`.
    client: Client<'a>,
    /// Once parked: when it stops waiting and is reset instead,
    /// `--connection-timeout` after it was parked (a connect made after
    /// the wait that fails starts a new one), as HAProxy's `timeout queue`
    /// defaults to its `timeout connect`. Without it, clients parked by
    /// every worker at once could hold each descriptor the others wait
    /// for, and none would ever move.
    give_up_at: Option<Instant>,
}

impl<'a> Unpaired<'a> {
    fn new(client: Client<'a>) -> Self {
        Unpaired { client, give_up_at: None }
    }
}

/// Session tokens: the side in bit 0, the slab key above it, and the
/// pair's generation above the key. The generation is what keeps an event
/// for a closed pair away from the next pair in its slab key: one epoll
/// batch can hold a closed pair's last reports behind the accept that
/// reuses its key, and on the new pair they would read as its own FIN or
/// error.
const KEY_BITS: u32 = 30;
const GENERATION_SHIFT: u32 = 1 + KEY_BITS;
/// What the word leaves above the key, short of the two top bits, where
/// the reserved tokens are. None on a 32-bit target: its tokens carry no
/// generation.
const GENERATION_BITS: u32 = usize::BITS.saturating_sub(GENERATION_SHIFT + 2);
const GENERATION_MASK: u32 = ((1u64 << GENERATION_BITS) - 1) as u32;
/// Whether a session sees only its own sockets' events. Where it does
/// not, a FIN it is told of may have been a closed pair's.
pub const EVENTS_ARE_THE_SESSIONS_OWN: bool = GENERATION_BITS != 0;

// `--max-connections` stays below 2^30, and with it every slab key.
const _: () = assert!(crate::config::MAX_CONNECTIONS < 1 << KEY_BITS);
const _: () = assert!(
    (GENERATION_MASK as usize) << GENERATION_SHIFT | ((1 << GENERATION_SHIFT) - 1) < LISTENER_BASE - MAX_LISTENERS
);

fn session_token(key: usize, side: Side, generation: u32) -> Token {
    debug_assert!(key < 1 << KEY_BITS);
    let generation = (generation & GENERATION_MASK) as usize;
    Token(generation << GENERATION_SHIFT | key << 1 | usize::from(side == Side::Backend))
}

/// The slab key, side and generation a session token carries.
fn parse_session_token(token: usize) -> (usize, Side, u32) {
    let side = if token & 1 == 0 { Side::Client } else { Side::Backend };
    let key = (token >> 1) & ((1 << KEY_BITS) - 1);
    (key, side, (token >> GENERATION_SHIFT) as u32)
}

fn listener_token(i: usize) -> Token {
    Token(LISTENER_BASE - i)
}

pub struct Worker<'a> {
    id: usize,
    poll: Poll,
    listeners: Vec<TcpListener>,
    accepting: Accepting,
    /// A listener stopped at the per-wakeup bound and must be drained again.
    accept_pending: bool,
    shared: &'a Shared,
    pools: Pools<'a>,
    settings: WorkerSettings,
    tally: Tally,
    sessions: Slab<Session<'a>>,
    /// The generation the next session's tokens carry.
    next_generation: u32,
    /// Rotates ties in backend selection.
    cursor: usize,
    /// Sessions that stopped at the per-wakeup bound.
    again: Vec<usize>,
    again_spare: Vec<usize>,
    /// Reused by the idle scan.
    expired: Vec<usize>,
    /// Sessions waiting for a buffer.
    starved: Vec<usize>,
    /// Sessions waiting for the kernel relay ([`Outcome::Wait`]).
    waiting: Vec<usize>,
    waiting_spare: Vec<usize>,
    next_wait_check: Instant,
    /// Reused for the kernel relay's notices.
    notices: Vec<u32>,
    /// The kernel relay's state of closed pairs, for the next to join.
    kernel_pairs: KernelPairs<'a>,
    /// Backend connects in flight, as (session key, deadline), in deadline
    /// order: every connect gets the same timeout, so each new entry goes
    /// last, and only the front needs looking at. An entry whose session
    /// has moved on (connected, closed, retried with a new deadline, or its
    /// key reused) is stale and dropped when it reaches the front.
    connecting: VecDeque<(usize, Instant)>,
    /// Failed sessions waiting for their client to take the last bytes.
    lingering: Vec<usize>,
    /// In retry order. Accepting stops in every worker while any client
    /// is parked, so this holds few: the accepted clients that found no
    /// descriptor before the others saw the mark, and those whose connect
    /// retry found none.
    parked: VecDeque<Parked<'a>>,
    next_linger_check: Instant,
    next_scan: Instant,
    /// Connects that failed for want of our own descriptors or ports.
    shortage_warnings: Throttle,
    /// accept() failures (out of descriptors, most likely): one every
    /// back-off while the shortage lasts is too many.
    accept_warnings: Throttle,
    /// This worker's load as the kernel's steering program sees it.
    steer: Option<Tracker<'a>>,
}

impl<'a> Worker<'a> {
    pub fn new(
        id: usize,
        poll: Poll,
        listeners: Vec<std::net::TcpListener>,
        shared: &'a Shared,
        pools: Pools<'a>,
        settings: WorkerSettings,
        capacity: usize,
    ) -> io::Result<Worker<'a>> {
        debug_assert!(listeners.len() <= MAX_LISTENERS, "listener::from_inherited bounds the count");
        let listeners: Vec<TcpListener> = listeners.into_iter().map(TcpListener::from_std).collect();
        let mut w = Worker {
            id,
            poll,
            listeners,
            accepting: Accepting::Closed,
            accept_pending: false,
            shared,
            pools,
            settings,
            tally: Tally::default(),
            // Grows on demand past this; the capacity is kept once reached.
            sessions: Slab::with_capacity(capacity.min(4096)),
            next_generation: 0,
            cursor: id,
            again: Vec::with_capacity(capacity.min(4096)),
            again_spare: Vec::with_capacity(capacity.min(4096)),
            expired: Vec::new(),
            starved: Vec::with_capacity(capacity.min(4096)),
            waiting: Vec::with_capacity(capacity.min(4096)),
            waiting_spare: Vec::with_capacity(capacity.min(4096)),
            next_wait_check: Instant::now(),
            notices: Vec::with_capacity(capacity.min(4096)),
            kernel_pairs: KernelPairs::default(),
            connecting: VecDeque::with_capacity(capacity.min(4096)),
            lingering: Vec::new(),
            parked: VecDeque::new(),
            next_linger_check: Instant::now(),
            next_scan: Instant::now() + SCAN_INTERVAL,
            shortage_warnings: Throttle::default(),
            accept_warnings: Throttle::default(),
            steer: shared.steering.as_ref().map(|s| Tracker::new(s.slot(id))),
        };
        w.register_listeners()?;
        if let Some(relay) = w.pools.relay {
            let fd = relay.events_fd();
            w.poll.registry().register(&mut mio::unix::SourceFd(&fd), RELAY, Interest::READABLE)?;
        }
        w.accepting = Accepting::Active;
        Ok(w)
    }

    /// Clients this worker holds: paired, or parked waiting for a
    /// descriptor.
    fn clients_held(&self) -> usize {
        self.sessions.len() + self.parked.len()
    }

    /// Registers every listener, or none: a retry must not find some of
    /// them registered already (EEXIST for good).
    fn register_listeners(&mut self) -> io::Result<()> {
        for i in 0..self.listeners.len() {
            if let Err(e) = self.poll.registry().register(&mut self.listeners[i], listener_token(i), Interest::READABLE)
            {
                for l in &mut self.listeners[..i] {
                    let _ = self.poll.registry().deregister(l);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn deregister_listeners(&mut self) {
        for l in &mut self.listeners {
            if let Err(e) = self.poll.registry().deregister(l) {
                debug!("deregistering a listener: {e}");
            }
        }
    }

    /// Runs until drained or stopped; an error means the event loop itself
    /// failed (its connections were closed and its listeners with them).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let result = loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("worker {}: poll failed: {e}", self.id);
                break Err(e);
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    WAKER => self.on_wake(now),
                    RELAY => self.on_kernel_notices(now),
                    Token(t) if t > LISTENER_BASE - MAX_LISTENERS && t <= LISTENER_BASE => self.accept(now),
                    Token(t) => self.on_session_event(t, ev, now),
                }
            }
            self.run_deferred(now);
            self.check_timers(now);
            let held = self.clients_held();
            if let Some(t) = &mut self.steer {
                t.settle(held);
            }
            if self.shared.is_stopping() {
                break Ok(());
            }
            if self.accepting == Accepting::Closed && self.sessions.is_empty() && self.parked.is_empty() {
                break Ok(());
            }
        };
        self.finish(if result.is_ok() { Cut::Shutdown } else { Cut::LoopFailed });
        result
    }

    /// Ends what the worker still holds, for `cut`: lb stopping, or this
    /// worker's event loop failing while the others serve on.
    fn finish(&mut self, cut: Cut) {
        if let Some(t) = &mut self.steer {
            t.retire(0);
        }
        // Parked clients are connections still open too.
        let left = self.clients_held();
        if left > 0 {
            info!("worker {}: closing {left} connections still open", self.id);
        }
        self.publish_fallbacks();
        self.publish_all_bytes();
        for p in self.parked.drain(..) {
            debug!("client {}: reset ({cut:?}) while waiting for a descriptor", p.waiting.client.origin.addr);
            reset_on_close(&p.waiting.client.stream);
        }
        for (_, s) in self.sessions.iter_mut() {
            s.expire(cut);
            log_closed(s, &cut);
        }
        self.sessions.clear();
        self.publish_relay_stats();
        // The pool goes with this thread; other workers may serve on.
        publish_share(&self.shared.counters.buffers_allocated, &mut self.tally.published_buffers_allocated, 0);
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.again.is_empty() || self.accept_pending {
            return Some(Duration::ZERO);
        }
        let mut next = self.next_scan;
        if !self.waiting.is_empty() {
            next = next.min(self.next_wait_check);
        }
        if let Accepting::BackingOff(until) = self.accepting {
            next = next.min(until);
        }
        if let Some(p) = self.parked.front() {
            next = next.min(p.retry_at);
        }
        // check_timers leaves a live entry at the front.
        if let Some(&(_, deadline)) = self.connecting.front() {
            next = next.min(deadline);
        }
        if !self.lingering.is_empty() {
            next = next.min(self.next_linger_check);
        }
        // Sessions wait for a buffer the allocator refused: try again then.
        if !self.starved.is_empty()
            && let Some(retry) = self.pools.buffers.retry_at()
        {
            next = next.min(retry);
        }
        Some(next.saturating_duration_since(now))
    }

    fn on_wake(&mut self, now: Instant) {
        if self.shared.is_draining() {
            if self.accepting != Accepting::Closed {
                // The supervisor logs the drain once for all workers: a
                // worker adds a line only for connections of its own.
                match self.clients_held() {
                    0 => debug!("worker {}: nothing to drain", self.id),
                    held => info!("worker {}: draining {held} connections", self.id),
                }
                self.close_listeners();
            }
            return;
        }
        if self.accepting == Accepting::AtCap && self.shared.active_clients() < self.shared.max_connections() {
            self.resume_accepting(now);
        }
        if matches!(self.accepting, Accepting::BackingOff(_))
            && self.shared.workers[self.id].held_for_parked.load(Ordering::SeqCst)
            && !self.shared.any_parked()
        {
            self.resume_accepting(now);
        }
    }

    fn close_listeners(&mut self) {
        if matches!(self.accepting, Accepting::Active) {
            self.deregister_listeners();
        }
        // Dropping them closes the sockets: new clients are refused.
        self.listeners.clear();
        let held = self.clients_held();
        if let Some(t) = &mut self.steer {
            t.retire(held);
        }
        self.accepting = Accepting::Closed;
        self.accept_pending = false;
    }

    /// Resumes accepting, or backs off while a client waits for a
    /// descriptor in any worker: a client accepted now would take the one
    /// it waits for. (A worker that resumed at once after resetting a
    /// client that waited too long took its descriptor back each time, and
    /// the client waiting in the other worker never got one.)
    fn resume_accepting(&mut self, now: Instant) {
        let control = &self.shared.workers[self.id];
        control.paused_at_cap.store(false, Ordering::SeqCst);
        control.held_for_parked.store(false, Ordering::SeqCst);
        if self.shared.any_parked() {
            self.hold_for_parked(self.parked.front().map_or(now + ACCEPT_BACKOFF, |p| p.retry_at), now);
            return;
        }
        match self.register_listeners() {
            Ok(()) => {
                self.accepting = Accepting::Active;
                // Clients queued in the backlog raised no new edge.
                self.accept_pending = true;
            }
            Err(e) => {
                warn!("worker {}: cannot re-register listeners: {e}", self.id);
                self.accepting = Accepting::BackingOff(now + ACCEPT_BACKOFF);
            }
        }
    }

    /// Stops accepting until `until`, or until woken when the last client
    /// waiting for a descriptor is served (not for one of this worker's
    /// own: their retries are timed).
    fn hold_for_parked(&mut self, until: Instant, now: Instant) {
        if self.parked.is_empty() {
            self.shared.workers[self.id].held_for_parked.store(true, Ordering::SeqCst);
            if !self.shared.any_parked() {
                // Served between the caller's look and the flag: that
                // wake was missed, so go on at the next turn of the loop.
                self.accepting = Accepting::BackingOff(now);
                return;
            }
        }
        self.accepting = Accepting::BackingOff(until);
    }

    fn pause_at_cap(&mut self, now: Instant) {
        self.deregister_listeners();
        self.accepting = Accepting::AtCap;
        self.accept_pending = false;
        self.shared.counters.cap_reached.fetch_add(1, Ordering::Relaxed);
        debug!("worker {}: at --max-connections, not accepting", self.id);
        self.shared.workers[self.id].paused_at_cap.store(true, Ordering::SeqCst);
        // A slot may have freed before the flag was visible; see
        // Shared::release_client for the other half of this handshake.
        if self.shared.active_clients() < self.shared.max_connections() {
            self.resume_accepting(now);
        }
    }

    fn accept(&mut self, now: Instant) {
        self.accept_pending = false;
        if self.accepting != Accepting::Active {
            return;
        }
        for i in 0..self.listeners.len() {
            // Failed accepts count too: a stream of clients that are gone
            // before their turn must not hold the loop either.
            let mut attempts = 0;
            loop {
                if attempts == ACCEPTS_PER_WAKEUP {
                    self.accept_pending = true;
                    break;
                }
                attempts += 1;
                if self.shared.any_parked() {
                    // A client waits for a descriptor, here or in another
                    // worker: checked before each accept, as a burst
                    // already under way would otherwise take the one it
                    // waits for.
                    self.deregister_listeners();
                    self.hold_for_parked(now + ACCEPT_BACKOFF, now);
                    self.accept_pending = false;
                    return;
                }
                let Some(slot) = self.shared.try_acquire_client() else {
                    self.pause_at_cap(now);
                    return;
                };
                match self.listeners[i].accept() {
                    Ok((stream, peer)) => {
                        self.shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        if let Some(t) = &mut self.steer {
                            t.accepted();
                        }
                        debug!("client {peer}: accepted by worker {}", self.id);
                        let origin = Origin { addr: peer, accepted: now };
                        let client = Client { stream, slot, tried: Tried::default(), origin };
                        self.start_session(Unpaired::new(client), now);
                        if self.accepting != Accepting::Active {
                            return; // That client was parked.
                        }
                    }
                    Err(e) => {
                        drop(slot);
                        match classify(&e) {
                            IoClass::WouldBlock => {
                                let held = self.clients_held();
                                if let Some(t) = &mut self.steer {
                                    t.queue_empty(held);
                                }
                                break;
                            }
                            // ECONNABORTED, EPROTO and friends: that client is
                            // gone, the next may not be.
                            IoClass::Interrupted | IoClass::Closed => continue,
                            // Out of descriptors, or any other failure. The
                            // backlog raises no new edge for clients already
                            // queued, and retrying at once could spin on the
                            // same error: step back, then drain it.
                            IoClass::Error => {
                                self.shared.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                                if let Some(held_back) = self.accept_warnings.allow(now) {
                                    warn!("worker {}: accept: {e}; retrying in {ACCEPT_BACKOFF:?}{held_back}", self.id);
                                }
                                self.deregister_listeners();
                                self.accepting = Accepting::BackingOff(now + ACCEPT_BACKOFF);
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    fn start_session(&mut self, waiting: Unpaired<'a>, now: Instant) {
        if !balancer::any_healthy(&self.shared.backends) {
            self.shared.counters.no_backend.fetch_add(1, Ordering::Relaxed);
            debug!("client {}: no backend is up; resetting it", waiting.client.origin.addr);
            // As a refused connect would: a FIN would read as an empty reply.
            reset_on_close(&waiting.client.stream);
            return;
        }
        self.connect_client(waiting, now);
    }

    /// Pairs the client with the next backend that takes a connect; parks
    /// it while descriptors are short, resets it once none is left to try.
    fn connect_client(&mut self, mut waiting: Unpaired<'a>, now: Instant) {
        let (backend, lease) = match self.connect_next(&mut waiting.client) {
            Ok(connect) => connect,
            Err(NoConnect::Shortage(mark)) => return self.park(waiting, mark, now),
            Err(NoConnect::GaveUp) => {
                self.shared.counters.connect_gave_up.fetch_add(1, Ordering::Relaxed);
                debug!("client {}: no backend accepted a connection; resetting it", waiting.client.origin.addr);
                reset_on_close(&waiting.client.stream);
                return;
            }
        };
        let generation = self.next_generation;
        self.next_generation = generation.wrapping_add(1) & GENERATION_MASK;
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let session =
            entry.insert(Session::new(waiting.client, backend, lease, now, &self.settings).in_generation(generation));
        let (client_token, backend_token) =
            (session_token(key, Side::Client, generation), session_token(key, Side::Backend, generation));
        let registry = self.poll.registry();
        let registered = registry
            .register(session.client_stream(), client_token, SOCKET_INTEREST)
            .and_then(|()| registry.register(session.backend_stream(), backend_token, SOCKET_INTEREST));
        if let Err(e) = registered {
            warn!("worker {}: cannot register client {}: {e}", self.id, session.origin().addr);
            session.reset_both();
            self.sessions.try_remove(key);
            return;
        }
        self.watch_connect(key);
    }

    /// Holds a client until a descriptor for its backend socket frees, and
    /// stops accepting meanwhile: the next client would need two. A client
    /// that waited its time already is reset instead.
    fn park(&mut self, mut waiting: Unpaired<'a>, mark: crate::shared::ParkedMark<'a>, now: Instant) {
        let give_up_at = *waiting.give_up_at.get_or_insert(now + self.settings.connect_timeout);
        let addr = waiting.client.origin.addr;
        if now >= give_up_at {
            self.shared.counters.descriptor_wait_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!("client {addr}: waited too long for a descriptor in worker {}; resetting it", self.id);
            reset_on_close(&waiting.client.stream);
            return;
        }
        debug!("client {addr}: worker {} is out of descriptors for a backend socket; the client waits", self.id);
        let retry_at = now + ACCEPT_BACKOFF;
        match self.accepting {
            Accepting::Active => {
                self.deregister_listeners();
                self.accepting = Accepting::BackingOff(retry_at);
            }
            Accepting::BackingOff(_) => self.accepting = Accepting::BackingOff(retry_at),
            // Resumed only when a slot frees; draining stays closed.
            Accepting::AtCap | Accepting::Closed => {}
        }
        self.accept_pending = false;
        self.parked.push_back(Parked { waiting, retry_at, _mark: mark });
    }

    /// Puts the session's connect under its timeout.
    fn watch_connect(&mut self, key: usize) {
        if let Some(Stage::Connecting { deadline, .. }) = self.sessions.get(key).map(Session::stage) {
            self.connecting.push_back((key, deadline));
        }
    }

    /// Starts a connect to the best backend not yet tried, moving on after
    /// immediate failures, within `--retries`.
    fn connect_next(&mut self, client: &mut Client<'a>) -> Result<(TcpStream, Lease<'a>), NoConnect<'a>> {
        let backends: &'a [Backend] = &self.shared.backends;
        let tried = &mut client.tried;
        while tried.attempts() <= self.settings.retries as usize {
            let i = balancer::pick(backends, self.cursor, tried.as_slice()).ok_or(NoConnect::GaveUp)?;
            // The next tie goes to the backend after the one picked, not
            // after the cursor: stepping the cursor by one would hand a
            // down backend's turn to the healthy one after it, doubling
            // its share. Kept below the table size so pick needs no division.
            let next_cursor = if i + 1 < backends.len() { i + 1 } else { 0 };
            let backend = &backends[i];
            let lease = backend.lease();
            let connected = TcpStream::connect(backend.addr);
            // Our own shortages, not the backend's fault: it is not counted
            // against the backend, which would otherwise take every backend
            // down while lb itself is short, nor as an attempt, as nothing
            // reached it.
            if let Err(e) = &connected
                && is_resource_exhaustion(e)
            {
                let mark = self.shared.mark_parked();
                self.warn_shortage(backend, e);
                // Another backend would need a descriptor too. Its turn is
                // kept: nothing reached it.
                return Err(NoConnect::Shortage(mark));
            }
            self.cursor = next_cursor;
            tried.push(i);
            match connected {
                Ok(stream) => return Ok((stream, lease)),
                // Ports are per destination: another backend may have some.
                Err(e) if is_local_port_shortage(&e) => self.warn_shortage(
                    backend,
                    &"no free local port (every port of net.ipv4.ip_local_port_range to it is in use)",
                ),
                Err(e) => self.count_connect_failure(client.origin, backend, &e),
            }
        }
        Err(NoConnect::GaveUp)
    }

    fn warn_shortage(&mut self, backend: &Backend, e: &dyn std::fmt::Display) {
        if let Some(held_back) = self.shortage_warnings.allow(Instant::now()) {
            warn!("worker {}: connect to {}: {e}{held_back}", self.id, backend.name);
        }
    }

    fn count_connect_failure(&self, origin: Origin, backend: &Backend, e: &io::Error) {
        debug!("client {}: connect to {} failed: {e}", origin.addr, backend.name);
        if backend.connect_failed(self.settings.fall) {
            crate::health::log_down(
                backend,
                &crate::net::describe(e),
                &crate::health::plural(self.settings.fall, "failed client connect"),
            );
        }
    }

    fn on_session_event(&mut self, token: usize, ev: &Event, now: Instant) {
        let (key, side, generation) = parse_session_token(token);
        let Some(session) = self.sessions.get_mut(key).filter(|s| s.generation() == generation) else {
            return; // A stale event for a pair already closed.
        };
        let outcome = session.on_event(side, ev, self.pools, now);
        self.act(key, outcome, now);
    }

    fn act(&mut self, key: usize, outcome: Outcome, now: Instant) {
        if self.pools.relay.is_some() && !matches!(outcome, Outcome::Close(_) | Outcome::ConnectFailed(_)) {
            self.follow_kernel_relay(key, matches!(outcome, Outcome::Continue));
        }
        match outcome {
            Outcome::Continue => {}
            Outcome::Wait => {
                if self.waiting.is_empty() {
                    self.next_wait_check = now + KERNEL_WAIT_CHECK;
                }
                self.waiting.push(key);
            }
            Outcome::Again => self.again.push(key),
            Outcome::Starved => {
                self.shared.counters.pool_exhausted.fetch_add(1, Ordering::Relaxed);
                self.starved.push(key);
            }
            Outcome::ConnectFailed(e) => self.on_connect_failed(key, &e, now),
            // A key closed on an event stays listed until the next check;
            // reused by another failed pair meanwhile, it is listed once.
            Outcome::Linger if self.lingering.contains(&key) => {}
            Outcome::Linger => self.lingering.push(key),
            Outcome::Close(reason) => self.close(key, reason),
        }
    }

    fn on_connect_failed(&mut self, key: usize, e: &io::Error, now: Instant) {
        let Some(mut session) = self.sessions.try_remove(key) else { return };
        self.count_connect_failure(session.origin(), session.lease().backend(), e);
        if let Err(e) = self.poll.registry().deregister(session.client_stream()) {
            debug!("client {}: deregistering it failed: {e}", session.origin().addr);
        }
        // Nothing was read from the client while connecting: it starts
        // over as a new one would, minus the backends already tried.
        self.connect_client(Unpaired::new(session.into_client()), now);
    }

    /// Starts the parked clients whose back-off is over, until one is
    /// parked again: the shortage lasts, and the others due are tried on
    /// the next pass (a zero-timeout poll, as the front is due).
    fn retry_parked(&mut self, now: Instant) {
        while self.parked.front().is_some_and(|p| now >= p.retry_at) {
            let Some(p) = self.parked.pop_front() else { break };
            let waiting = self.parked.len();
            self.start_session(p.waiting, now);
            if self.parked.len() > waiting {
                break;
            }
        }
    }

    /// Moves a pair that is ready into the kernel relay (`may_join`: it
    /// waits for nothing), and registers its sockets for what it needs:
    /// while the kernel relays both ways, only the ends of the streams and
    /// errors, through epoll directly (mio has no such interest).
    fn follow_kernel_relay(&mut self, key: usize, may_join: bool) {
        let Some(relay) = self.pools.relay else { return };
        let Some(s) = self.sessions.get_mut(key) else { return };
        if may_join && s.ready_to_join() {
            s.join(relay, key, &mut self.kernel_pairs);
        }
        let want = s.interest();
        if want.is_none() == s.kernel_only_registered {
            return;
        }
        let generation = s.generation();
        for side in [Side::Client, Side::Backend] {
            let token = session_token(key, side, generation);
            let stream = match side {
                Side::Client => s.client_stream(),
                Side::Backend => s.backend_stream(),
            };
            let done = match want {
                Some(interest) => self.poll.registry().reregister(stream, token, interest),
                None => watch_ends_only(&self.poll, stream, token),
            };
            if let Err(e) = done {
                debug!("client {}: re-registering a socket for the kernel relay failed: {e}", s.origin().addr);
            }
        }
        s.kernel_only_registered = want.is_none();
    }

    /// Top-up requests and spent budgets from the kernel relay: each names
    /// a direction's slot, whose pair is slab key `slot / 2`. A notice for
    /// a pair since closed reaches the one now on its key, which only
    /// looks at its own slots' state: harmless.
    fn on_kernel_notices(&mut self, now: Instant) {
        let Some(relay) = self.pools.relay else { return };
        let mut notices = std::mem::take(&mut self.notices);
        relay.events(|slot| notices.push(slot));
        for slot in notices.drain(..) {
            let key = (slot / 2) as usize;
            if let Some(s) = self.sessions.get_mut(key) {
                s.on_kernel_notice(slot, relay, now);
                let outcome = s.resume(self.pools, now);
                self.act(key, outcome, now);
            }
        }
        self.notices = notices;
    }

    fn close(&mut self, key: usize, reason: CloseReason) {
        if let Some(mut session) = self.sessions.try_remove(key) {
            if let (Some(relay), Some((client, backend))) = (self.pools.relay, session.cookies()) {
                relay.leave(client, backend);
            }
            // The fallbacks this pair met show no later than its bytes.
            self.publish_fallbacks();
            publish_bytes(&mut session, &mut self.tally);
            self.publish_split();
            log_closed(&session, &reason);
            // After the last count of the relay's bytes above.
            session.release_kernel_state(&mut self.kernel_pairs);
        }
    }

    /// Re-runs sessions that stopped at their per-wakeup bound, and starved
    /// ones once buffers are free again.
    fn run_deferred(&mut self, now: Instant) {
        if !self.again.is_empty() {
            // Swap in the spare list so sessions deferred again land in a
            // fresh round; both lists keep their capacity.
            let mut batch = std::mem::replace(&mut self.again, std::mem::take(&mut self.again_spare));
            for key in batch.drain(..) {
                if let Some(s) = self.sessions.get_mut(key) {
                    let outcome = s.resume(self.pools, now);
                    self.act(key, outcome, now);
                }
            }
            self.again_spare = batch;
        }
        if !self.waiting.is_empty() && now >= self.next_wait_check {
            let mut batch = std::mem::replace(&mut self.waiting, std::mem::take(&mut self.waiting_spare));
            self.next_wait_check = now + KERNEL_WAIT_CHECK;
            batch.sort_unstable();
            batch.dedup();
            for key in batch.drain(..) {
                if let Some(s) = self.sessions.get_mut(key) {
                    let outcome = s.resume(self.pools, now);
                    self.act(key, outcome, now);
                }
            }
            self.waiting_spare = batch;
        }
        while self.pools.buffers.has_free() {
            let Some(key) = self.starved.pop() else { break };
            if let Some(s) = self.sessions.get_mut(key) {
                let outcome = s.resume(self.pools, now);
                self.act(key, outcome, now);
            }
        }
        if self.accept_pending {
            self.accept(now);
        }
    }

    fn check_timers(&mut self, now: Instant) {
        // Before the accept back-off ends: parked again, it is extended.
        self.retry_parked(now);
        if let Accepting::BackingOff(until) = self.accepting
            && now >= until
        {
            if self.shared.is_draining() {
                self.listeners.clear();
                self.accepting = Accepting::Closed;
            } else {
                self.resume_accepting(now);
            }
        }
        while let Some(&(key, deadline)) = self.connecting.front() {
            let live = matches!(
                self.sessions.get(key).map(Session::stage),
                Some(Stage::Connecting { deadline: d, .. }) if d == deadline
            );
            if live && now < deadline {
                break;
            }
            self.connecting.pop_front();
            if live {
                let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                self.on_connect_failed(key, &e, now);
            }
        }
        if !self.lingering.is_empty() && now >= self.next_linger_check {
            self.next_linger_check = now + LINGER_CHECK;
            self.check_lingering(now);
        }
        if now >= self.next_scan {
            self.next_scan = now + SCAN_INTERVAL;
            self.scan(now);
            // A SYN the steering program counted whose handshake never
            // completed (a scan, a flood, a client that gave up) leaves
            // this worker looking busier than it is, and a worker that
            // gets no clients would never find its queue empty to correct
            // that: look once a scan. Costs one accept() a second.
            if self.steer.is_some() && self.accepting == Accepting::Active {
                self.accept_pending = true;
            }
        }
    }

    /// Closes the failed pairs whose client has taken the last bytes.
    fn check_lingering(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.lingering.len() {
            let key = self.lingering[i];
            let session = self.sessions.get_mut(key).filter(|s| matches!(s.stage(), Stage::Lingering { .. }));
            match session.map(|s| s.linger(now)) {
                // Closed meanwhile on an event (the key may be reused).
                None => {
                    self.lingering.swap_remove(i);
                }
                Some(Outcome::Close(reason)) => {
                    self.lingering.swap_remove(i);
                    self.close(key, reason);
                }
                Some(_) => i += 1,
            }
        }
    }

    /// Publishes byte counters, closes pairs idle past the timeout and
    /// closes pipes no longer needed.
    fn scan(&mut self, now: Instant) {
        let idle = self.settings.idle_timeout;
        // Fallbacks go out ahead of the bytes they came with, as at close.
        self.publish_fallbacks();
        let mut expired = std::mem::take(&mut self.expired);
        for (key, s) in self.sessions.iter_mut() {
            publish_bytes(s, &mut self.tally);
            if s.is_idle(now, idle) {
                expired.push(key);
            } else if s.kernel_spent() {
                // Its notice was lost: lb takes over at the next check.
                self.waiting.push(key);
            }
        }
        for key in expired.drain(..) {
            self.shared.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
            if let Some(s) = self.sessions.get_mut(key) {
                debug!(
                    "client {}: idle for {:?}; closing",
                    s.origin().addr,
                    now.saturating_duration_since(s.last_active)
                );
                s.expire(Cut::Idle);
                self.close(key, CloseReason::Expired);
            }
        }
        self.expired = expired;
        self.pools.pipes.trim_idle();
        self.publish_relay_stats();
    }

    fn publish_all_bytes(&mut self) {
        for (_, s) in self.sessions.iter_mut() {
            publish_bytes(s, &mut self.tally);
        }
        self.publish_split();
    }

    fn publish_split(&mut self) {
        let (c, t) = (&self.shared.counters, &mut self.tally);
        for (counter, n) in
            [(&c.bytes_spliced, &mut t.spliced), (&c.bytes_copied, &mut t.copied), (&c.bytes_kernel, &mut t.kernel)]
        {
            if *n != 0 {
                counter.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
    }

    fn publish_relay_stats(&mut self) {
        self.publish_split();
        let c = &self.shared.counters;
        let t = &mut self.tally;
        let (pipes, buffers) = (self.pools.pipes, self.pools.buffers);
        publish_share(&c.pipes_in_use, &mut t.published_pipes_in_use, pipes.in_use() as u64);
        publish_share(&c.buffers_in_use, &mut t.published_buffers_in_use, buffers.in_use() as u64);
        publish_share(&c.buffers_allocated, &mut t.published_buffers_allocated, buffers.allocated() as u64);
        self.publish_fallbacks();
    }

    fn publish_fallbacks(&mut self) {
        let (c, t, pipes) = (&self.shared.counters, &mut self.tally, self.pools.pipes);
        publish_share(&c.pipes_exhausted, &mut t.published_exhausted, pipes.exhausted());
        publish_share(&c.splice_unsupported, &mut t.published_unsupported, pipes.unsupported());
    }
}

/// Registers `stream` for the end of its peer's stream (EPOLLRDHUP) and,
/// as always, errors and hang-ups, edge-triggered, under `token`.
fn watch_ends_only(poll: &Poll, stream: &TcpStream, token: Token) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut ev = libc::epoll_event { events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32, u64: token.0 as u64 };
    // SAFETY: both descriptors are open; the event is read during the call.
    let rc = unsafe { libc::epoll_ctl(poll.as_raw_fd(), libc::EPOLL_CTL_MOD, stream.as_raw_fd(), &mut ev) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Moves this worker's share of a shared gauge or counter from
/// `published` to `now`.
fn publish_share(shared: &std::sync::atomic::AtomicU64, published: &mut u64, now: u64) {
    if now > *published {
        shared.fetch_add(now - *published, Ordering::Relaxed);
    } else if now < *published {
        shared.fetch_sub(*published - now, Ordering::Relaxed);
    }
    *published = now;
}

/// Adds a pair's bytes since the last call to its backend's counters, and
/// to the worker's splice/copy split, which the caller publishes right
/// after ([`Worker::publish_split`]): once for a whole scan.
fn publish_bytes(s: &mut Session<'_>, tally: &mut Tally) {
    let (up, down) = s.take_unreported();
    let spliced = s.take_unreported_spliced();
    let kernel = s.take_unreported_kernel();
    tally.spliced += spliced;
    tally.kernel += kernel;
    tally.copied += up + down - spliced - kernel;
    let b = s.lease().backend();
    if up != 0 {
        b.bytes_in.fetch_add(up, Ordering::Relaxed);
    }
    if down != 0 {
        b.bytes_out.fetch_add(down, Ordering::Relaxed);
    }
}

/// The debug line that ends a client's story: why, after how long, and the
/// bytes each way (as published, so after [`publish_bytes`]).
fn log_closed(s: &Session<'_>, reason: &dyn std::fmt::Debug) {
    let (origin, (up, down)) = (s.origin(), s.reported());
    debug!(
        "client {}: closed ({reason:?}) after {:?}; {up} bytes to {}, {down} bytes from it",
        origin.addr,
        origin.accepted.elapsed(),
        s.lease().backend().name
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_token_gives_back_its_key_side_and_generation() {
        for (key, side, generation) in
            [(0, Side::Client, 0), (7, Side::Backend, 1), ((1 << KEY_BITS) - 1, Side::Backend, GENERATION_MASK)]
        {
            let Token(token) = session_token(key, side, generation);
            assert_eq!(parse_session_token(token), (key, side, generation & GENERATION_MASK));
        }
    }

    #[test]
    fn the_same_slab_key_in_the_next_generation_has_other_tokens() {
        for side in [Side::Client, Side::Backend] {
            // Unless the target has no room for generations.
            assert_eq!(session_token(3, side, 4) != session_token(3, side, 5), EVENTS_ARE_THE_SESSIONS_OWN);
        }
        // Generations wrap within the bits a token has for them.
        assert_eq!(session_token(3, Side::Client, GENERATION_MASK + 1), session_token(3, Side::Client, 0));
    }
}
