//! The `--admin` HTTP endpoint: `GET /metrics` (Prometheus text), `GET
//! /stats` (JSON) and `GET /health` (200 while serving, 503 while
//! draining or while no backend is healthy). It runs on a thread of its own with its own mio `Poll` and
//! only reads the shared atomics, so a scrape never slows a worker.
//!
//! It answers one request per connection and closes (`Connection: close`).
//! Untrusted clients are bounded: at most [`MAX_CLIENTS`] connections at
//! once (more wait in the listen backlog), a request head of at most
//! [`MAX_HEAD`] bytes (larger, malformed or cut short by a FIN: 400), and
//! [`DEADLINE`] per connection from accept to close. It has no
//! authentication: bind it to 127.0.0.1 or a private address.
//!
//! It keeps one descriptor in reserve, so that a scrape is still answered
//! while the workers have taken every other descriptor (an explicit
//! `--max-connections` past the descriptor limit): that is when an
//! operator most needs to look.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::balancer;
use crate::logging::Throttle;
use crate::metrics::{PROMETHEUS_CONTENT_TYPE, render_json, render_prometheus};
use crate::net::{IoClass, classify};
use crate::shared::Shared;
use crate::stats::Snapshot;

/// Connections served at once.
pub const MAX_CLIENTS: usize = 64;
/// Largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Longest a connection may live, however slow its client.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// After the response, how long unread request bytes are drained so the
/// close is a FIN (a close with unread bytes resets, and a reset can
/// destroy the response before the client has read it).
const LINGER: Duration = Duration::from_millis(500);
/// Reads per wakeup of a lingering connection before it is closed.
const MAX_LINGERING_READS: usize = 64;
const MAX_HEADERS: usize = 32;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const LISTENER: Token = Token(usize::MAX - 1);

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Stats,
    Health,
    NotFound,
    /// A known path with a method other than GET or HEAD.
    MethodNotAllowed,
}

/// How far a request head has been understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Partial,
    /// Malformed, or too large: answered with 400.
    Bad,
    Request {
        route: Route,
        head_only: bool,
    },
}

/// Parses the bytes of a request head received so far.
pub fn parse_request(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let (Some(method), Some(target)) = (req.method, req.path) else {
                return Parsed::Bad;
            };
            let path = target.split(['?', '#']).next().unwrap_or(target);
            let route = match path {
                "/metrics" => Route::Metrics,
                "/stats" => Route::Stats,
                "/health" => Route::Health,
                _ => return Parsed::Request { route: Route::NotFound, head_only: method == "HEAD" },
            };
            match method {
                "GET" => Parsed::Request { route, head_only: false },
                "HEAD" => Parsed::Request { route, head_only: true },
                _ => Parsed::Request { route: Route::MethodNotAllowed, head_only: false },
            }
        }
        Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD => Parsed::Bad,
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Bad,
    }
}

/// A complete `Connection: close` response.
pub fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let allow = if status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}\
Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The answer to a parsed request, from the live numbers.
pub fn answer(parsed: Parsed, shared: &Shared) -> Vec<u8> {
    let (route, head_only) = match parsed {
        Parsed::Request { route, head_only } => (route, head_only),
        Parsed::Partial | Parsed::Bad => return response(400, TEXT, b"bad request\n", false),
    };
    match route {
        Route::Metrics => {
            let body = render_prometheus(&Snapshot::capture(shared));
            response(200, PROMETHEUS_CONTENT_TYPE, body.as_bytes(), head_only)
        }
        Route::Stats => {
            let body = render_json(&Snapshot::capture(shared));
            response(200, "application/json", body.as_bytes(), head_only)
        }
        Route::Health if shared.is_draining() => response(503, TEXT, b"draining\n", head_only),
        // A balancer with nowhere to send clients is not serving, so the
        // check in front of it (DNS failover, a cloud LB) should move on.
        Route::Health if !balancer::any_healthy(&shared.backends) => {
            response(503, TEXT, b"no healthy backend\n", head_only)
        }
        Route::Health => response(200, TEXT, b"OK\n", head_only),
        Route::NotFound => response(404, TEXT, b"not found\n", head_only),
        Route::MethodNotAllowed => response(405, TEXT, b"method not allowed\n", false),
    }
}

/// Binds the endpoint at start-up, so a bad `--admin` is a start-up error.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, crate::listener::ListenError> {
    let classify = |step| move |e| crate::listener::classify_bind(addr, step, e);
    let l = std::net::TcpListener::bind(addr).map_err(classify("bind"))?;
    l.set_nonblocking(true).map_err(classify("O_NONBLOCK"))?;
    Ok(l)
}

/// Serves the endpoint on its own thread until the process ends.
pub fn spawn(listener: std::net::TcpListener, shared: Arc<Shared>) -> io::Result<()> {
    let poll = Poll::new()?;
    // Any descriptor holds the slot; a copy of the listener needs no path.
    let reserve = listener.as_fd().try_clone_to_owned()?;
    let mut server = Server {
        poll,
        reserve: Some(reserve),
        listener: TcpListener::from_std(listener),
        listening: false,
        backoff_until: None,
        accept_warnings: Throttle::default(),
        conns: Slab::with_capacity(MAX_CLIENTS),
        scratch: vec![0; 4096].into_boxed_slice(),
    };
    server.listen();
    thread::Builder::new().name("lb-admin".into()).spawn(move || server.run(&shared))?;
    Ok(())
}

#[derive(Debug)]
enum State {
    Reading,
    Writing {
        written: usize,
    },
    /// Response sent and write side shut: reading until the client closes.
    Lingering,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    head: Vec<u8>,
    out: Vec<u8>,
    state: State,
    deadline: Instant,
}

struct Server {
    poll: Poll,
    /// A descriptor given up to accept a client when none is left, and
    /// taken back from a closing connection.
    reserve: Option<OwnedFd>,
    listener: TcpListener,
    listening: bool,
    backoff_until: Option<Instant>,
    /// accept() failures: at most one line per interval, not one per back-off.
    accept_warnings: Throttle,
    conns: Slab<Conn>,
    scratch: Box<[u8]>,
}

impl Server {
    fn listen(&mut self) {
        if self.listening {
            return;
        }
        match self.poll.registry().register(&mut self.listener, LISTENER, Interest::READABLE) {
            Ok(()) => self.listening = true,
            Err(e) => {
                warn!("admin endpoint: cannot register the listener: {e}");
                self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
            }
        }
    }

    fn unlisten(&mut self) {
        if self.listening {
            if let Err(e) = self.poll.registry().deregister(&mut self.listener) {
                debug!("admin endpoint: deregistering the listener: {e}");
            }
            self.listening = false;
        }
    }

    fn run(mut self, shared: &Shared) {
        let mut events = Events::with_capacity(128);
        loop {
            let timeout = self.next_wake().map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("admin endpoint stopped: poll failed: {e}");
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    Token(key) => self.drive(key, shared),
                }
            }
            self.check_timers(Instant::now());
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        self.conns.iter().map(|(_, c)| c.deadline).chain(self.backoff_until).min()
    }

    fn accept(&mut self) {
        loop {
            if self.conns.len() >= MAX_CLIENTS {
                // The rest wait in the backlog until a connection ends.
                self.unlisten();
                return;
            }
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    debug!("admin endpoint: connection from {peer}");
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) =
                        self.poll.registry().register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)
                    {
                        warn!("admin endpoint: cannot register a connection: {e}");
                        continue;
                    }
                    entry.insert(Conn {
                        stream,
                        head: Vec::new(),
                        out: Vec::new(),
                        state: State::Reading,
                        deadline: Instant::now() + DEADLINE,
                    });
                }
                Err(e) => match classify(&e) {
                    IoClass::WouldBlock => return,
                    IoClass::Interrupted | IoClass::Closed => {}
                    // Only for lb's own limit: the reserve shares the
                    // listener's open file, so giving it up frees no
                    // system-wide entry (ENFILE).
                    IoClass::Error if e.raw_os_error() == Some(libc::EMFILE) && self.reserve.is_some() => {
                        debug!("admin endpoint: out of descriptors; accepting with the reserve");
                        self.reserve = None;
                    }
                    // Out of descriptors, or any other failure: clients
                    // already queued raise no new edge, and retrying at
                    // once could spin. Step back, then drain the backlog.
                    IoClass::Error => {
                        let now = Instant::now();
                        if let Some(held_back) = self.accept_warnings.allow(now) {
                            warn!("admin endpoint: accept: {e}; retrying in {ACCEPT_BACKOFF:?}{held_back}");
                        }
                        self.unlisten();
                        self.backoff_until = Some(now + ACCEPT_BACKOFF);
                        return;
                    }
                },
            }
        }
    }

    fn check_timers(&mut self, now: Instant) {
        let expired: Vec<usize> = self.conns.iter().filter(|(_, c)| now >= c.deadline).map(|(k, _)| k).collect();
        for key in expired {
            debug!("admin endpoint: closing a connection past its deadline");
            self.close(key);
        }
        if self.backoff_until.is_some_and(|t| now >= t) {
            self.backoff_until = None;
        }
        if !self.listening && self.backoff_until.is_none() && self.conns.len() < MAX_CLIENTS {
            self.listen();
            // Clients queued meanwhile raised no new edge.
            self.accept();
        }
    }

    fn close(&mut self, key: usize) {
        let Some(mut c) = self.conns.try_remove(key) else { return };
        if let Err(e) = self.poll.registry().deregister(&mut c.stream) {
            debug!("admin endpoint: deregistering a connection: {e}");
        }
        if self.reserve.is_none() {
            self.reserve = reserve_from(c.stream, &self.listener);
        }
    }

    /// Moves connection `key` as far as it can go without blocking.
    fn drive(&mut self, key: usize, shared: &Shared) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let done = match step(conn, &mut self.scratch, shared) {
            Ok(done) => done,
            Err(e) => {
                debug!("admin endpoint: connection ended: {e}");
                true
            }
        };
        if done {
            self.close(key);
        }
    }
}

/// Closes `stream` by putting a copy of `listener` in its descriptor's
/// slot, in one step: a worker waiting for a descriptor cannot take the
/// slot in between, as it could after a close.
fn reserve_from(stream: TcpStream, listener: &TcpListener) -> Option<OwnedFd> {
    let fd = stream.into_raw_fd();
    // SAFETY: `fd` was the stream's and is owned here alone; dup3 either
    // replaces it (closing the socket) or leaves it as it was.
    let kept = unsafe { libc::dup3(listener.as_raw_fd(), fd, libc::O_CLOEXEC) };
    // SAFETY: either way `fd` is open and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // On failure dropping `fd` closes the socket.
    (kept != -1).then_some(fd)
}

/// Advances one connection; `Ok(true)` when it is finished.
fn step(conn: &mut Conn, scratch: &mut [u8], shared: &Shared) -> io::Result<bool> {
    let mut lingering_reads = 0;
    loop {
        match &mut conn.state {
            State::Reading => {
                let room = (MAX_HEAD - conn.head.len()).min(scratch.len());
                let n = match conn.stream.read(&mut scratch[..room]) {
                    Ok(0) if conn.head.is_empty() => return Ok(true),
                    // The client half-closed with its head unfinished: it
                    // can still read the answer, and a silent close would
                    // look like lb failing.
                    Ok(0) => {
                        conn.out = answer(Parsed::Bad, shared);
                        conn.head = Vec::new();
                        conn.state = State::Writing { written: 0 };
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) => match classify(&e) {
                        IoClass::WouldBlock => return Ok(false),
                        IoClass::Interrupted => continue,
                        _ => return Err(e),
                    },
                };
                conn.head.extend_from_slice(&scratch[..n]);
                let parsed = parse_request(&conn.head);
                if parsed != Parsed::Partial {
                    conn.out = answer(parsed, shared);
                    conn.head = Vec::new();
                    conn.state = State::Writing { written: 0 };
                }
            }
            State::Writing { written } => {
                if *written == conn.out.len() {
                    conn.stream.shutdown(Shutdown::Write)?;
                    conn.out = Vec::new();
                    conn.state = State::Lingering;
                    conn.deadline = conn.deadline.min(Instant::now() + LINGER);
                    continue;
                }
                match conn.stream.write(&conn.out[*written..]) {
                    Ok(n) => *written += n,
                    Err(e) => match classify(&e) {
                        IoClass::WouldBlock => return Ok(false),
                        IoClass::Interrupted => {}
                        _ => return Err(e),
                    },
                }
            }
            State::Lingering => match conn.stream.read(scratch) {
                Ok(0) => return Ok(true),
                // A client still sending after its answer is closed rather
                // than let it hold the endpoint's thread in this loop.
                Ok(_) if lingering_reads == MAX_LINGERING_READS => return Ok(true),
                Ok(_) => lingering_reads += 1,
                Err(e) => match classify(&e) {
                    IoClass::WouldBlock => return Ok(false),
                    IoClass::Interrupted => {}
                    _ => return Err(e),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;

    fn shared() -> (Poll, Shared) {
        let poll = Poll::new().expect("poll");
        let waker = mio::Waker::new(poll.registry(), Token(0)).expect("waker");
        let spec = BackendSpec { name: "a:1".into(), addr: "127.0.0.1:1".parse().expect("addr"), weight: 1 };
        (poll, Shared::new(crate::backend::table(&[spec]), 10, vec![waker]))
    }

    fn status_of(response: &[u8]) -> u16 {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut headers);
        assert!(r.parse(response).unwrap().is_complete());
        r.code.unwrap()
    }

    #[test]
    fn known_paths_route_and_queries_are_ignored() {
        let get = |p: &str| parse_request(format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert_eq!(get("/metrics"), Parsed::Request { route: Route::Metrics, head_only: false });
        assert_eq!(get("/metrics?name[]=x"), Parsed::Request { route: Route::Metrics, head_only: false });
        assert_eq!(get("/stats"), Parsed::Request { route: Route::Stats, head_only: false });
        assert_eq!(get("/health"), Parsed::Request { route: Route::Health, head_only: false });
        assert_eq!(get("/"), Parsed::Request { route: Route::NotFound, head_only: false });
        assert_eq!(get("/metrics/x"), Parsed::Request { route: Route::NotFound, head_only: false });
    }

    #[test]
    fn head_is_served_without_a_body_and_other_methods_are_refused() {
        assert_eq!(
            parse_request(b"HEAD /health HTTP/1.1\r\n\r\n"),
            Parsed::Request { route: Route::Health, head_only: true }
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Parsed::Request { route: Route::MethodNotAllowed, head_only: false }
        );
    }

    #[test]
    fn partial_heads_wait_and_malformed_or_oversized_ones_are_bad() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost"), Parsed::Partial);
        assert_eq!(parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), Parsed::Bad);
        assert_eq!(parse_request(b"GET /metrics HTTP/9.9\r\n\r\n"), Parsed::Bad);
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(parse_request(&big), Parsed::Bad);
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = response(200, TEXT, b"OK\n", false);
        let text = String::from_utf8(r.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("\r\nContent-Length: 3\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nOK\n"));
        let head = response(200, TEXT, b"OK\n", true);
        assert!(
            String::from_utf8(head)
                .unwrap()
                .ends_with("Content-Length: 3\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n")
        );
        let r405 = String::from_utf8(response(405, TEXT, b"", false)).unwrap();
        assert!(r405.contains("\r\nAllow: GET, HEAD\r\n"));
    }

    #[test]
    fn health_answers_503_once_draining() {
        let (_poll, s) = shared();
        let health = Parsed::Request { route: Route::Health, head_only: false };
        assert_eq!(status_of(&answer(health, &s)), 200);
        s.begin_drain();
        assert_eq!(status_of(&answer(health, &s)), 503);
    }

    #[test]
    fn health_answers_503_while_no_backend_is_healthy() {
        let (_poll, s) = shared();
        let health = Parsed::Request { route: Route::Health, head_only: false };
        s.backends[0].set_healthy(false);
        assert_eq!(status_of(&answer(health, &s)), 503);
        s.backends[0].set_healthy(true);
        assert_eq!(status_of(&answer(health, &s)), 200);
    }

    #[test]
    fn bad_and_unknown_requests_get_400_404_and_405() {
        let (_poll, s) = shared();
        assert_eq!(status_of(&answer(Parsed::Bad, &s)), 400);
        assert_eq!(status_of(&answer(Parsed::Request { route: Route::NotFound, head_only: false }, &s)), 404);
        assert_eq!(status_of(&answer(Parsed::Request { route: Route::MethodNotAllowed, head_only: false }, &s)), 405);
        let metrics = answer(Parsed::Request { route: Route::Metrics, head_only: false }, &s);
        assert_eq!(status_of(&metrics), 200);
        assert!(String::from_utf8(metrics).unwrap().contains("lb_connections_max 10\n"));
    }
}
