//! `be`: the backend HTTP/1.1 server that lb's demos, tests and benchmarks
//! put behind the load balancer.
//!
//! It owns everything between the command line and the bytes on the wire:
//! argument parsing, binding one `SO_REUSEPORT` listener per worker, the
//! per-worker mio event loops, request parsing (keep-alive, pipelining,
//! partial heads, discarded bodies) and the responses, which are built once at
//! startup. Every response body names the server (`-c`), so a client can see
//! which backend answered. It deliberately does not use the `lb` library: it
//! is a test fixture and must keep working whatever state the library is in.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

/// A request head larger than this is refused with 400: it bounds how much a
/// single connection can make us buffer.
const MAX_HEAD: usize = 16 * 1024;
/// More headers than this is refused with 400 (httparse needs a fixed array).
const MAX_HEADERS: usize = 64;
/// One read syscall can pull this much; shared by all connections of a worker
/// so idle connections do not each hold a large buffer.
const READ_CHUNK: usize = 64 * 1024;
/// Output buffers that grew past this (deep pipelining) are released once
/// drained, so one burst does not pin memory for the connection's lifetime.
const OUT_KEEP: usize = 64 * 1024;
/// How long accepting pauses when the process runs out of descriptors or
/// memory. Edge-triggered readiness would not fire again for connections
/// already queued, and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
const EVENTS_CAPACITY: usize = 1024;
const LISTENER: Token = Token(0);

#[derive(Parser, Debug)]
#[command(
    name = "be",
    version,
    about = "Backend HTTP/1.1 server whose responses name the server, for lb demos, tests and benchmarks"
)]
struct Cli {
    /// Port to listen on; 0 picks a free one (the real address is printed).
    #[arg(short, long, value_name = "PORT")]
    port: u16,

    /// Text that names this server; the response body is this text plus "\n".
    /// [default: "Server <port>"]
    #[arg(short, long, value_name = "TEXT")]
    content: Option<String>,

    /// Address to bind.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    bind: String,

    /// Worker threads, each with its own event loop and listener.
    /// [default: available cores]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,

    /// Status code of every response, /health included.
    #[arg(long, value_name = "CODE", default_value_t = 200, value_parser = clap::value_parser!(u16).range(200..=599))]
    status: u16,

    /// Status code of /health only. [default: --status]
    #[arg(long, value_name = "CODE", value_parser = clap::value_parser!(u16).range(200..=599))]
    health_status: Option<u16>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are "errors" that belong on stdout.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message can span lines (e.g. a list of missing
            // arguments) before its usage hint; keep it to one line.
            let text = e.to_string();
            let parts: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            eprintln!("be: {}", parts.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };

    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("be: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Binds and sets up every worker before announcing the address, so a caller
/// that read the `listening on` line can connect at once, and so setup errors
/// are reported instead of the line.
fn run(cli: Cli) -> Result<(), String> {
    let ip: IpAddr = cli.bind.parse().map_err(|_| format!("invalid --bind address '{}'", cli.bind))?;
    let workers = match cli.workers {
        Some(n) => usize::from(n),
        None => thread::available_parallelism().map_or(1, |n| n.get()),
    };

    // lb's own listener set-up: SO_REUSEPORT per worker, and "address in
    // use" reported instead of silently sharing a port with another process.
    let listeners = lb::listener::bind(SocketAddr::new(ip, cli.port), workers).map_err(|e| e.to_string())?;
    let addr = listeners
        .first()
        .and_then(lb::listener::local_addr)
        .ok_or_else(|| "cannot read the bound address".to_string())?;
    let listeners: Vec<TcpListener> = listeners.into_iter().map(TcpListener::from_std).collect();

    let name = cli.content.unwrap_or_else(|| format!("Server {}", addr.port()));
    let responses = Responses::new(&name, cli.status, cli.health_status.unwrap_or(cli.status));

    let mut ready = Vec::with_capacity(listeners.len());
    for listener in listeners {
        ready.push(Worker::new(listener, responses.clone()).map_err(|e| format!("cannot set up event loop: {e}"))?);
    }

    let mut stdout = io::stdout().lock();
    // A reader that went away must not stop the server from serving.
    let _ = writeln!(stdout, "listening on {addr}");
    let _ = stdout.flush();
    drop(stdout);

    // Workers only return on a fatal poll error; the first one ends the process.
    let (failed_tx, failed_rx) = mpsc::channel();
    for (i, worker) in ready.into_iter().enumerate() {
        let failed_tx = failed_tx.clone();
        thread::Builder::new()
            .name(format!("be-worker-{i}"))
            .spawn(move || {
                let err = worker.run();
                let _ = failed_tx.send(err);
            })
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
    }
    drop(failed_tx);
    match failed_rx.recv() {
        Ok(err) => Err(format!("event loop failed: {err}")),
        Err(_) => Err("all workers stopped".to_string()),
    }
}

/// One complete HTTP response; `head_len` lets HEAD requests get the head only.
#[derive(Clone)]
struct Response {
    bytes: Box<[u8]>,
    head_len: usize,
}

impl Response {
    fn new(status: u16, body: &[u8], keep_alive: bool) -> Self {
        // These statuses must not carry a body, and a 204 not even a length.
        let body: &[u8] = if matches!(status, 204 | 304) { b"" } else { body };
        let mut head = format!("HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\n", reason(status));
        if status != 204 {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
        let mut bytes = head.into_bytes();
        let head_len = bytes.len();
        bytes.extend_from_slice(body);
        Response { bytes: bytes.into_boxed_slice(), head_len }
    }

    fn write_to(&self, out: &mut Vec<u8>, head_only: bool) {
        let bytes = if head_only { &self.bytes[..self.head_len] } else { &self.bytes[..] };
        out.extend_from_slice(bytes);
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Every response the server can send, built once so the hot path only copies.
#[derive(Clone)]
struct Responses {
    /// Indexed by `close as usize`.
    named: [Response; 2],
    health: [Response; 2],
    bad_request: Response,
}

impl Responses {
    fn new(name: &str, status: u16, health_status: u16) -> Self {
        let body = format!("{name}\n");
        Responses {
            named: [Response::new(status, body.as_bytes(), true), Response::new(status, body.as_bytes(), false)],
            health: [Response::new(health_status, b"OK\n", true), Response::new(health_status, b"OK\n", false)],
            bad_request: Response::new(400, b"Bad Request\n", false),
        }
    }
}

/// What the parser decided about the bytes it was given.
struct Served {
    /// Bytes fully handled (heads answered, bodies skipped); the rest is an
    /// incomplete head to keep for the next read.
    consumed: usize,
    /// A response that ends the connection was queued; ignore further input.
    close: bool,
}

/// Answers every complete request in `input`, appending responses to `out`.
/// `body_left` carries an unfinished request body across reads.
fn serve(input: &[u8], body_left: &mut u64, out: &mut Vec<u8>, responses: &Responses) -> Served {
    let mut pos = 0;
    loop {
        if *body_left > 0 {
            let avail = (input.len() - pos) as u64;
            let skip = (*body_left).min(avail);
            pos += skip as usize;
            *body_left -= skip;
            if *body_left > 0 {
                return Served { consumed: pos, close: false };
            }
        }
        if pos == input.len() {
            return Served { consumed: pos, close: false };
        }

        let rest = &input[pos..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(rest) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
            Ok(httparse::Status::Partial) if rest.len() < MAX_HEAD => {
                return Served { consumed: pos, close: false };
            }
            // Oversized (complete or not), malformed, or too many headers.
            _ => return bad_request(out, responses, input.len()),
        };
        let Some(meta) = RequestMeta::read(&req) else {
            return bad_request(out, responses, input.len());
        };
        pos += head_len;

        if meta.expect_continue && meta.content_length > 0 {
            // Clients that wait for this would otherwise stall before
            // sending the body we are about to skip.
            out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let close = !meta.keep_alive;
        let set = if meta.health { &responses.health } else { &responses.named };
        set[usize::from(close)].write_to(out, meta.head_only);
        if close {
            return Served { consumed: input.len(), close: true };
        }
        *body_left = meta.content_length;
    }
}

fn bad_request(out: &mut Vec<u8>, responses: &Responses, all: usize) -> Served {
    responses.bad_request.write_to(out, false);
    Served { consumed: all, close: true }
}

/// The parts of a request head that decide the response.
struct RequestMeta {
    health: bool,
    head_only: bool,
    keep_alive: bool,
    content_length: u64,
    expect_continue: bool,
}

impl RequestMeta {
    /// `None` means the request must get 400: a body framing we do not
    /// support (chunked) or cannot trust (bad or conflicting lengths).
    fn read(req: &httparse::Request<'_, '_>) -> Option<Self> {
        let http11 = req.version == Some(1);
        let path = req.path.unwrap_or("");
        let path = path.split_once('?').map_or(path, |(p, _)| p);

        let mut close_token = false;
        let mut keep_alive_token = false;
        let mut content_length: Option<u64> = None;
        let mut expect_continue = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = parse_content_length(h.value)?;
                if content_length.is_some_and(|prev| prev != n) {
                    return None;
                }
                content_length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return None;
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    close_token |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if h.name.eq_ignore_ascii_case("expect") {
                expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
        }

        Some(RequestMeta {
            health: path == "/health",
            head_only: req.method == Some("HEAD"),
            // HTTP/1.0 closes unless asked not to; `close` always wins.
            keep_alive: !close_token && (http11 || keep_alive_token),
            content_length: content_length.unwrap_or(0),
            expect_continue,
        })
    }
}

fn parse_content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

struct Conn {
    stream: TcpStream,
    /// Unparsed input: only ever an incomplete head, shorter than MAX_HEAD.
    input: Vec<u8>,
    out: Vec<u8>,
    /// How much of `out` the kernel has taken.
    out_pos: usize,
    body_left: u64,
    /// A `Connection: close` (or error) response is queued: close once flushed.
    closing: bool,
    /// The peer sent FIN: flush what we owe, then close.
    peer_eof: bool,
}

/// What the event loop should do with a connection after driving it.
enum Next {
    Wait,
    /// Our decision to close: the peer may still be sending, so drain first.
    Close,
    /// The peer ended or broke the connection: just drop it.
    Drop,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Conn { stream, input: Vec::new(), out: Vec::new(), out_pos: 0, body_left: 0, closing: false, peer_eof: false }
    }

    /// Alternates flushing and reading until the socket would block either
    /// way. While output is stuck the connection is not read (backpressure):
    /// a client that pipelines without reading cannot make us buffer more
    /// than one read's worth of responses.
    fn drive(&mut self, scratch: &mut [u8], responses: &Responses) -> Next {
        loop {
            match self.flush() {
                Ok(true) => {}
                Ok(false) => return Next::Wait,
                Err(e) => {
                    log_io_error("write", &e);
                    return Next::Drop;
                }
            }
            if self.closing {
                return Next::Close;
            }
            if self.peer_eof {
                return Next::Drop;
            }
            match self.stream.read(scratch) {
                Ok(0) => self.peer_eof = true,
                Ok(n) => self.ingest(&scratch[..n], responses),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log_io_error("read", &e);
                    return Next::Drop;
                }
            }
        }
    }

    fn ingest(&mut self, data: &[u8], responses: &Responses) {
        // Common case: no leftover head, so parse straight from the read
        // buffer and copy only an incomplete tail.
        if self.input.is_empty() {
            let served = serve(data, &mut self.body_left, &mut self.out, responses);
            self.closing = served.close;
            if !served.close {
                self.input.extend_from_slice(&data[served.consumed..]);
            }
        } else {
            self.input.extend_from_slice(data);
            let served = serve(&self.input, &mut self.body_left, &mut self.out, responses);
            self.closing = served.close;
            self.input.drain(..served.consumed);
        }
    }

    /// `Ok(true)` once everything queued has been written.
    fn flush(&mut self) -> io::Result<bool> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out.capacity() > OUT_KEEP {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        self.out_pos = 0;
        Ok(true)
    }

    /// Closing a socket with unread input makes the kernel send RST, which
    /// can destroy the response the peer has not read yet. Reading what has
    /// already arrived lets the close be a plain FIN in the usual case.
    fn close_gracefully(mut self, scratch: &mut [u8]) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        for _ in 0..16 {
            match self.stream.read(scratch) {
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => break,
            }
        }
    }
}

/// Peers vanishing is normal for a benchmark backend; anything else is worth a warning.
fn log_io_error(op: &str, e: &io::Error) {
    match lb::net::classify(e) {
        lb::net::IoClass::Closed => debug!("{op}: peer went away: {e}"),
        _ => warn!("{op}: {e}"),
    }
}

/// One event loop: a listener of its own and the connections it accepted.
struct Worker {
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    responses: Responses,
    scratch: Vec<u8>,
    /// Set while accepting is paused after running out of resources.
    accept_paused_until: Option<Instant>,
    accept_failing: bool,
}

impl Worker {
    fn new(mut listener: TcpListener, responses: Responses) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Worker {
            poll,
            listener,
            conns: Slab::new(),
            responses,
            scratch: vec![0; READ_CHUNK],
            accept_paused_until: None,
            accept_failing: false,
        })
    }

    /// Runs until polling itself fails, which is returned.
    fn run(mut self) -> io::Error {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            let timeout = self.accept_paused_until.map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return e;
            }
            if self.accept_paused_until.is_some_and(|t| Instant::now() >= t) {
                self.accept_paused_until = None;
                self.accept_all();
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => {
                        if self.accept_paused_until.is_none() {
                            self.accept_all();
                        }
                    }
                    Token(t) => self.drive(t - 1),
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.accept_failing {
                        info!("accept: recovered");
                        self.accept_failing = false;
                    }
                    self.add(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM, or something unknown:
                    // retrying now would fail the same way, so back off.
                    // Warn once per episode, not on every retry.
                    if self.accept_failing {
                        debug!("accept still failing: {e}");
                    } else {
                        warn!("accept: {e}; retrying every {ACCEPT_BACKOFF:?} until it succeeds");
                        self.accept_failing = true;
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn add(&mut self, mut stream: TcpStream) {
        // Pipelined responses go out as separate small writes; Nagle would
        // hold them back waiting for ACKs.
        if let Err(e) = stream.set_nodelay(true) {
            debug!("set_nodelay: {e}");
        }
        let entry = self.conns.vacant_entry();
        // Both interests once, edge-triggered: no re-registration per request.
        match self.poll.registry().register(
            &mut stream,
            Token(entry.key() + 1),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            Ok(()) => {
                entry.insert(Conn::new(stream));
            }
            Err(e) => warn!("register connection: {e}"),
        }
    }

    fn drive(&mut self, key: usize) {
        // Events for a connection closed earlier in the same batch.
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.drive(&mut self.scratch, &self.responses) {
            Next::Wait => {}
            Next::Close => self.conns.remove(key).close_gracefully(&mut self.scratch),
            Next::Drop => drop(self.conns.remove(key)),
        }
    }
}
