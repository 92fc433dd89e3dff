//! Active health checks and the recovery of passively downed backends.
//!
//! A dedicated thread with its own mio `Poll` probes every backend once per
//! `--health-check-period`, all probes in flight at once and non-blocking, so
//! a hanging backend never delays the others and no worker ever waits on a
//! probe. A probe is a TCP connect or, with `--health-check-url`, an
//! HTTP/1.1 `GET` whose status line decides (2xx/3xx is up). `--rise` and
//! `--fall` consecutive results flip a backend ([`Threshold`]); each flip is
//! logged once, with its reason.
//!
//! Workers take a backend down on their own after `--fall` consecutive
//! failed client connects (`Backend::connect_failed`); probes then bring it
//! back after `--rise` good results. With `--no-health-check` nothing probes,
//! so a passively downed backend is instead put back after a hold-down of one
//! health period ([`HoldDown`]) and real traffic tests it again: `--fall`
//! more failed connects take it down for another period.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::backend::Backend;
use crate::config::HealthConfig;
use crate::logging::Throttle;
use crate::net::{IoClass, classify, describe, is_local_port_shortage, is_resource_exhaustion};
use crate::shared::Shared;

/// Bytes of an HTTP probe response kept while waiting for the end of its
/// head; a backend sending more without finishing its head fails the probe.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Response headers httparse can hold; more fails the probe.
const MAX_RESPONSE_HEADERS: usize = 64;

/// Consecutive-result counting for one backend: `fall` failures in a row
/// take an up backend down, `rise` successes in a row bring a down one up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive results that disagree with `up`.
    streak: u32,
}

impl Threshold {
    /// Starts up: backends take traffic before the first probe answers.
    pub fn new(rise: u32, fall: u32) -> Threshold {
        Threshold { rise: rise.max(1), fall: fall.max(1), up: true, streak: 0 }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Counts one probe result; returns the new state when it flips.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }

    /// Adopts a state set by someone else (a worker's passive detection),
    /// so a passively downed backend needs `rise` good probes to return.
    pub fn sync(&mut self, up: bool) {
        if up != self.up {
            self.up = up;
            self.streak = 0;
        }
    }
}

/// With probes off: when a down backend may be put back into rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldDown {
    down_since: Option<Instant>,
}

impl HoldDown {
    /// Feeds the backend's current state; true when it has been down for
    /// `hold` and should be marked up again.
    pub fn revive(&mut self, up: bool, now: Instant, hold: Duration) -> bool {
        if up {
            self.down_since = None;
            return false;
        }
        let since = *self.down_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= hold {
            self.down_since = None;
            return true;
        }
        false
    }

    /// When `revive` will next say yes, if the backend stays down.
    pub fn due(&self, hold: Duration) -> Option<Instant> {
        self.down_since.map(|s| s + hold)
    }
}

/// What an HTTP probe response says so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpVerdict {
    /// The status line and headers have not all arrived.
    Incomplete,
    /// 2xx or 3xx: the backend is up; carries the status code.
    Up(u16),
    /// Anything else, with the reason to log.
    Down(String),
}

/// Judges the bytes of an HTTP probe response received so far.
pub fn judge_response(bytes: &[u8]) -> HttpVerdict {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => match response.code {
            Some(code) if (200..400).contains(&code) => HttpVerdict::Up(code),
            Some(code) => HttpVerdict::Down(format!("HTTP {code}")),
            None => HttpVerdict::Down("invalid HTTP response".into()),
        },
        Ok(httparse::Status::Partial) if bytes.len() >= MAX_RESPONSE_HEAD => {
            HttpVerdict::Down("HTTP response head too large".into())
        }
        Ok(httparse::Status::Partial) => HttpVerdict::Incomplete,
        Err(e) => HttpVerdict::Down(format!("invalid HTTP response ({e})")),
    }
}

/// The probe request for one backend; `host` is the backend as the
/// operator wrote it (host:port), which is what a virtual host expects.
pub fn probe_request(path: &str, host: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health-check/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// Logs a backend going down, in the wording shared by probes and passive
/// detection: `backend NAME is DOWN: REASON (DETAIL)`.
pub fn log_down(backend: &Backend, reason: &str, detail: &str) {
    warn!("backend {} is DOWN: {reason} ({detail})", backend.name);
}

pub fn log_up(backend: &Backend, reason: &str, detail: &str) {
    info!("backend {} is UP: {reason} ({detail})", backend.name);
}

/// Where one probe is.
#[derive(Debug)]
enum Phase {
    Connecting,
    Sending { sent: usize },
    Receiving { received: Vec<u8> },
}

#[derive(Debug)]
struct Probe {
    stream: TcpStream,
    deadline: Instant,
    phase: Phase,
}

/// Whether a backend's probe for the current round has started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Taken,
    /// The round came while the previous probe was still running; the next
    /// one starts as soon as that one ends.
    Owed,
}

/// The prober's view of one backend.
#[derive(Debug)]
struct Slot {
    threshold: Threshold,
    /// The HTTP request, built once; `None` for TCP probes.
    request: Option<Vec<u8>>,
    probe: Option<Probe>,
    turn: Turn,
    /// Probes skipped for a shortage of ours: at a short period, one line
    /// each would be many a second for as long as the shortage lasts.
    skip_warnings: Throttle,
}

/// How a probe ended.
enum Ended {
    Passed(String),
    Failed(String),
    /// Our own descriptor, memory or local port shortage: says nothing
    /// about the backend.
    Skipped(io::Error),
}

/// Starts the health thread: probes when enabled, otherwise the hold-down
/// that returns passively downed backends to rotation. The thread ends when
/// lb stops.
pub fn spawn(shared: Arc<Shared>, config: HealthConfig) -> io::Result<()> {
    let poll = Poll::new()?;
    thread::Builder::new().name("lb-health".into()).spawn(move || {
        if config.probes {
            Prober::new(poll, &shared, config).run();
        } else {
            hold_down_loop(&shared, config.period);
        }
    })?;
    Ok(())
}

/// How often the hold-down loop looks for passively downed backends: a
/// backend returns one period after it was noticed down, which is at most
/// a quarter period (and at most a second) after it went down.
fn hold_down_tick(period: Duration) -> Duration {
    (period / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

fn hold_down_loop(shared: &Shared, period: Duration) {
    let mut holds = vec![HoldDown::default(); shared.backends.len()];
    let tick = hold_down_tick(period);
    while !shared.is_stopping() {
        let now = Instant::now();
        let mut next = now + tick;
        for (b, hold) in shared.backends.iter().zip(holds.iter_mut()) {
            if hold.revive(b.is_healthy(), now, period) && b.set_healthy(true) {
                log_up(b, "retrying with client traffic", &format!("down for {period:?}; health checks are disabled"));
            }
            if let Some(due) = hold.due(period) {
                next = next.min(due);
            }
        }
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

struct Prober<'a> {
    poll: Poll,
    shared: &'a Shared,
    config: HealthConfig,
    slots: Vec<Slot>,
    next_round: Instant,
    /// Reused across reads of every probe.
    scratch: Box<[u8]>,
}

impl<'a> Prober<'a> {
    fn new(poll: Poll, shared: &'a Shared, config: HealthConfig) -> Prober<'a> {
        let slots = shared
            .backends
            .iter()
            .map(|b| Slot {
                threshold: Threshold::new(config.rise, config.fall),
                request: config.url.as_deref().map(|path| probe_request(path, &b.name)),
                probe: None,
                turn: Turn::Taken,
                skip_warnings: Throttle::default(),
            })
            .collect();
        Prober {
            poll,
            shared,
            config,
            slots,
            // The first round runs at once.
            next_round: Instant::now(),
            scratch: vec![0; 4096].into_boxed_slice(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        while !self.shared.is_stopping() {
            let now = Instant::now();
            if now >= self.next_round {
                self.start_round(now);
                // Rounds keep their cadence even when one started late.
                self.next_round += self.config.period;
                if self.next_round <= now {
                    self.next_round = now + self.config.period;
                }
            }
            self.expire(now);
            let timeout = self.next_wake().saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("health checks stopped: poll failed: {e}");
                return;
            }
            for ev in events.iter() {
                let i = ev.token().0;
                if i < self.slots.len() {
                    self.advance(i);
                }
            }
        }
    }

    fn next_wake(&self) -> Instant {
        self.slots.iter().filter_map(|s| s.probe.as_ref().map(|p| p.deadline)).fold(self.next_round, Instant::min)
    }

    /// Starts a probe of every backend whose previous probe has ended. One
    /// still running is left to finish and the next starts when it ends:
    /// with a timeout as long as the period, a hanging backend's probe
    /// expires just after the round began, and skipping it would probe
    /// that backend only every other round.
    fn start_round(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            if self.slots[i].probe.is_some() {
                self.slots[i].turn = Turn::Owed;
            } else {
                self.start_probe(i, now);
            }
        }
    }

    fn start_probe(&mut self, i: usize, now: Instant) {
        self.slots[i].turn = Turn::Taken;
        let addr = self.shared.backends[i].addr;
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                if let Err(e) =
                    self.poll.registry().register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)
                {
                    self.record(i, Ended::Skipped(e));
                    return;
                }
                self.slots[i].probe =
                    Some(Probe { stream, deadline: now + self.config.timeout, phase: Phase::Connecting });
            }
            Err(e) if is_resource_exhaustion(&e) || is_local_port_shortage(&e) => self.record(i, Ended::Skipped(e)),
            Err(e) => self.record(i, Ended::Failed(describe(&e))),
        }
    }

    fn expire(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            if self.slots[i].probe.as_ref().is_some_and(|p| now >= p.deadline) {
                self.end(i, Ended::Failed("timed out".into()));
            }
        }
    }

    /// Moves probe `i` as far as it can go without blocking.
    fn advance(&mut self, i: usize) {
        if let Some(ended) = self.step(i) {
            self.end(i, ended);
        }
    }

    fn step(&mut self, i: usize) -> Option<Ended> {
        let slot = &mut self.slots[i];
        let probe = slot.probe.as_mut()?;
        loop {
            match &mut probe.phase {
                Phase::Connecting => match connected(&probe.stream) {
                    Ok(false) => return None,
                    Ok(true) => match &slot.request {
                        None => return Some(Ended::Passed("connected".into())),
                        Some(_) => probe.phase = Phase::Sending { sent: 0 },
                    },
                    Err(e) => return Some(Ended::Failed(describe(&e))),
                },
                Phase::Sending { sent } => {
                    let request = slot.request.as_deref().unwrap_or_default();
                    if *sent == request.len() {
                        probe.phase = Phase::Receiving { received: Vec::new() };
                        continue;
                    }
                    match probe.stream.write(&request[*sent..]) {
                        Ok(n) => *sent += n,
                        Err(e) => match classify(&e) {
                            IoClass::WouldBlock => return None,
                            IoClass::Interrupted => {}
                            _ => return Some(Ended::Failed(describe(&e))),
                        },
                    }
                }
                Phase::Receiving { received } => match probe.stream.read(&mut self.scratch) {
                    Ok(0) => {
                        return Some(match judge_response(received) {
                            HttpVerdict::Up(code) => Ended::Passed(format!("HTTP {code}")),
                            HttpVerdict::Down(reason) => Ended::Failed(reason),
                            HttpVerdict::Incomplete => {
                                Ended::Failed("connection closed before an HTTP response".into())
                            }
                        });
                    }
                    Ok(n) => {
                        let room = MAX_RESPONSE_HEAD - received.len();
                        received.extend_from_slice(&self.scratch[..n.min(room)]);
                        match judge_response(received) {
                            HttpVerdict::Incomplete => {}
                            HttpVerdict::Up(code) => return Some(Ended::Passed(format!("HTTP {code}"))),
                            HttpVerdict::Down(reason) => return Some(Ended::Failed(reason)),
                        }
                    }
                    Err(e) => match classify(&e) {
                        IoClass::WouldBlock => return None,
                        IoClass::Interrupted => {}
                        _ => return Some(Ended::Failed(describe(&e))),
                    },
                },
            }
        }
    }

    /// Closes probe `i`, records how it ended and starts the one a round
    /// that came meanwhile is owed.
    fn end(&mut self, i: usize, ended: Ended) {
        if let Some(mut probe) = self.slots[i].probe.take()
            && let Err(e) = self.poll.registry().deregister(&mut probe.stream)
        {
            debug!("deregistering a health probe: {e}");
        }
        self.record(i, ended);
        if self.slots[i].turn == Turn::Owed {
            self.start_probe(i, Instant::now());
        }
    }

    fn record(&mut self, i: usize, ended: Ended) {
        let backend = &self.shared.backends[i];
        let (ok, reason) = match ended {
            Ended::Passed(r) => (true, r),
            Ended::Failed(r) => (false, r),
            Ended::Skipped(e) => {
                if let Some(held_back) = self.slots[i].skip_warnings.allow(Instant::now()) {
                    warn!("health check of {} skipped: {e}{held_back}", backend.name);
                }
                return;
            }
        };
        let counter = if ok { &backend.checks_ok } else { &backend.checks_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        debug!("health check of {}: {}", backend.name, if ok { "ok" } else { &reason });
        let threshold = &mut self.slots[i].threshold;
        threshold.sync(backend.is_healthy());
        // set_healthy reports whether the flag really changed, so a flip a
        // worker already made and logged is not logged twice.
        match threshold.observe(ok) {
            Some(true) if backend.set_healthy(true) => {
                log_up(backend, &reason, &plural(self.config.rise, "successful health check"));
            }
            Some(false) if backend.set_healthy(false) => {
                log_down(backend, &reason, &plural(self.config.fall, "failed health check"));
            }
            _ => {}
        }
    }
}

/// "1 failed health check", "3 consecutive failed health checks".
pub fn plural(n: u32, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} consecutive {what}s") }
}

/// Whether a non-blocking connect has finished: `Ok(false)` while in
/// progress, the connect error if it failed.
fn connected(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_consecutive_failures_take_an_up_backend_down_once() {
        let mut t = Threshold::new(2, 3);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(false), None, "already down: no second flip");
        assert!(!t.is_up());
    }

    #[test]
    fn a_success_between_failures_restarts_the_count() {
        let mut t = Threshold::new(2, 3);
        t.observe(false);
        t.observe(false);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert!(t.is_up());
        assert_eq!(t.observe(false), Some(false));
    }

    #[test]
    fn rise_consecutive_successes_bring_a_down_backend_up() {
        let mut t = Threshold::new(2, 1);
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None, "a failure resets the rise count");
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(true));
        assert!(t.is_up());
    }

    #[test]
    fn a_passively_downed_backend_needs_rise_good_probes() {
        let mut t = Threshold::new(3, 2);
        t.observe(false); // a half-way failure streak while up
        t.sync(false);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(true));
    }

    #[test]
    fn syncing_to_the_same_state_keeps_the_streak() {
        let mut t = Threshold::new(2, 2);
        t.observe(false);
        t.sync(true);
        assert_eq!(t.observe(false), Some(false));
    }

    #[test]
    fn thresholds_of_zero_act_as_one() {
        let mut t = Threshold::new(0, 0);
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(true), Some(true));
    }

    #[test]
    fn a_down_backend_is_revived_after_the_hold_down() {
        let hold = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut h = HoldDown::default();
        assert!(!h.revive(true, t0, hold));
        assert_eq!(h.due(hold), None);
        assert!(!h.revive(false, t0, hold), "just went down");
        assert_eq!(h.due(hold), Some(t0 + hold));
        assert!(!h.revive(false, t0 + Duration::from_secs(4), hold));
        assert!(h.revive(false, t0 + hold, hold));
        // Down again later: a fresh hold-down starts from then.
        let t1 = t0 + Duration::from_secs(20);
        assert!(!h.revive(false, t1, hold));
        assert!(h.revive(false, t1 + hold, hold));
    }

    #[test]
    fn coming_back_up_cancels_the_hold_down() {
        let hold = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut h = HoldDown::default();
        h.revive(false, t0, hold);
        h.revive(true, t0 + Duration::from_secs(1), hold);
        assert!(!h.revive(false, t0 + Duration::from_secs(6), hold), "a new hold-down started");
    }

    #[test]
    fn two_hundred_and_three_hundred_statuses_are_up() {
        assert_eq!(judge_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nOK\n"), HttpVerdict::Up(200));
        assert_eq!(judge_response(b"HTTP/1.0 302 Found\r\nLocation: /\r\n\r\n"), HttpVerdict::Up(302));
        assert_eq!(judge_response(b"HTTP/1.1 204 No Content\r\n\r\n"), HttpVerdict::Up(204));
    }

    #[test]
    fn other_statuses_are_down_with_the_code_as_reason() {
        assert_eq!(judge_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"), HttpVerdict::Down("HTTP 503".into()));
        assert_eq!(judge_response(b"HTTP/1.1 404 Not Found\r\n\r\n"), HttpVerdict::Down("HTTP 404".into()));
        assert_eq!(judge_response(b"HTTP/1.1 101 Switching\r\n\r\n"), HttpVerdict::Down("HTTP 101".into()));
    }

    #[test]
    fn a_partial_head_waits_for_more() {
        assert_eq!(judge_response(b""), HttpVerdict::Incomplete);
        assert_eq!(judge_response(b"HTTP/1.1 200 OK\r\nServer: x"), HttpVerdict::Incomplete);
    }

    #[test]
    fn garbage_and_oversized_heads_are_down() {
        assert!(matches!(judge_response(b"SSH-2.0-OpenSSH\r\n\r\n"), HttpVerdict::Down(_)));
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.resize(MAX_RESPONSE_HEAD, b'a');
        assert_eq!(judge_response(&big), HttpVerdict::Down("HTTP response head too large".into()));
    }

    #[test]
    fn the_probe_request_names_the_host_and_asks_to_close() {
        let r = String::from_utf8(probe_request("/health", "10.0.0.1:8080")).unwrap();
        assert!(r.starts_with("GET /health HTTP/1.1\r\n"), "{r}");
        assert!(r.contains("\r\nHost: 10.0.0.1:8080\r\n"));
        assert!(r.contains("\r\nConnection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(r.as_bytes()).unwrap().is_complete());
    }

    #[test]
    fn counts_read_naturally_in_log_lines() {
        assert_eq!(plural(1, "failed health check"), "1 failed health check");
        assert_eq!(plural(3, "failed health check"), "3 consecutive failed health checks");
    }
}
