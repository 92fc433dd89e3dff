//! End-to-end checks of the `be` backend binary over real loopback sockets.
//!
//! Every test starts its own `be -p 0`, learns the port from the
//! `listening on` line and kills the child when it ends, pass or fail. Every
//! blocking step has a timeout so a broken server fails a test instead of
//! hanging the suite.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A running `be`; killed on drop so no test leaks a server.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_be"))
            .args(["-p", "0", "--workers", "2"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn be");
        let stdout = child.stdout.take().expect("piped stdout");
        // Guard first, so a failure below still kills the child.
        let mut server = Server { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)) };

        // Reading a pipe cannot time out by itself; do it on a thread.
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(TIMEOUT).expect("be printed no `listening on` line");
        let addr =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        server.addr = addr.parse().expect("listening address");
        server
    }

    fn connect(&self) -> Client {
        let stream = TcpStream::connect_timeout(&self.addr, TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
        Client { stream, buf: Vec::new() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client that keeps bytes read past one response, so
/// pipelined responses can be read one after another.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write request");
    }

    fn get(&mut self, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: be\r\n\r\n").as_bytes());
        self.read_response()
    }

    /// Reads more input; false on EOF.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) => panic!("read failed (timed out?): {e}"),
        }
    }

    fn read_response(&mut self) -> Response {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.fill(), "connection closed before a full response head");
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("utf-8 head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line");
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        let mut response = Response { status, headers, body: String::new() };
        let len: usize = response.header("content-length").expect("content-length").parse().expect("number");
        while self.buf.len() < head_end + len {
            assert!(self.fill(), "connection closed inside a response body");
        }
        response.body = String::from_utf8(self.buf[head_end..head_end + len].to_vec()).expect("utf-8 body");
        self.buf.drain(..head_end + len);
        response
    }

    /// The server closed the connection: EOF, or a reset after it, and
    /// nothing more was sent.
    fn assert_closed(&mut self) {
        let mut chunk = [0u8; 64];
        match self.stream.read(&mut chunk) {
            Ok(0) => {}
            Ok(n) => panic!("unexpected extra bytes: {:?}", String::from_utf8_lossy(&chunk[..n])),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connection not closed (timed out?): {e}"),
        }
        assert!(self.buf.is_empty(), "unexpected extra bytes: {:?}", String::from_utf8_lossy(&self.buf));
    }
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let server = Server::start(&["-c", "Server X"]);
    let mut client = server.connect();
    for _ in 0..3 {
        let r = client.get("/");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "Server X\n");
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
    }
}

#[test]
fn default_name_is_server_and_port() {
    let server = Server::start(&[]);
    let r = server.connect().get("/any/path?q=1");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("Server {}\n", server.addr.port()));
}

#[test]
fn pipelined_requests_get_one_response_each_in_order() {
    let server = Server::start(&["-c", "Server P"]);
    let mut client = server.connect();
    client.send(b"GET / HTTP/1.1\r\nHost: be\r\n\r\nGET /health HTTP/1.1\r\nHost: be\r\n\r\n");
    let first = client.read_response();
    let second = client.read_response();
    assert_eq!((first.status, first.body.as_str()), (200, "Server P\n"));
    assert_eq!((second.status, second.body.as_str()), (200, "OK\n"));
}

#[test]
fn request_split_across_writes_and_body_is_skipped() {
    let server = Server::start(&["-c", "Server S"]);
    let mut client = server.connect();
    client.send(b"POST /submit HTTP/1.1\r\nHo");
    thread::sleep(Duration::from_millis(50));
    client.send(b"st: be\r\nContent-Length: 5\r\n\r\nhel");
    thread::sleep(Duration::from_millis(50));
    client.send(b"loGET / HTTP/1.1\r\nHost: be\r\n\r\n");
    for _ in 0..2 {
        let r = client.read_response();
        assert_eq!((r.status, r.body.as_str()), (200, "Server S\n"));
    }
}

#[test]
fn health_answers_ok() {
    let server = Server::start(&["-c", "Server H"]);
    let r = server.connect().get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "OK\n");
}

#[test]
fn status_option_applies_to_every_path() {
    let server = Server::start(&["-c", "Server D", "--status", "503"]);
    let mut client = server.connect();
    let r = client.get("/");
    assert_eq!((r.status, r.body.as_str()), (503, "Server D\n"));
    let r = client.get("/health");
    assert_eq!((r.status, r.body.as_str()), (503, "OK\n"));
}

#[test]
fn health_status_option_applies_to_health_only() {
    let server = Server::start(&["-c", "Server D", "--health-status", "503"]);
    let mut client = server.connect();
    assert_eq!(client.get("/").status, 200);
    assert_eq!(client.get("/health").status, 503);
}

#[test]
fn connection_close_is_honoured_after_the_response() {
    let server = Server::start(&["-c", "Server C"]);
    let mut client = server.connect();
    client.send(b"GET / HTTP/1.1\r\nHost: be\r\nConnection: close\r\n\r\n");
    let r = client.read_response();
    assert_eq!((r.status, r.body.as_str()), (200, "Server C\n"));
    assert_eq!(r.header("connection"), Some("close"));
    client.assert_closed();
}

#[test]
fn http10_without_keep_alive_is_closed_after_the_response() {
    let server = Server::start(&["-c", "Server C"]);
    let mut client = server.connect();
    client.send(b"GET / HTTP/1.0\r\n\r\n");
    let r = client.read_response();
    assert_eq!((r.status, r.body.as_str()), (200, "Server C\n"));
    client.assert_closed();
}

#[test]
fn oversized_head_gets_400_and_close() {
    let server = Server::start(&["-c", "Server O"]);
    let mut client = server.connect();
    let big = format!("GET / HTTP/1.1\r\nHost: be\r\nX-Big: {}\r\n\r\n", "a".repeat(20 * 1024));
    client.send(big.as_bytes());
    let r = client.read_response();
    assert_eq!(r.status, 400);
    assert_eq!(r.header("connection"), Some("close"));
    client.assert_closed();
}

#[test]
fn chunked_request_gets_400() {
    let server = Server::start(&["-c", "Server T"]);
    let mut client = server.connect();
    client.send(b"POST / HTTP/1.1\r\nHost: be\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_eq!(client.read_response().status, 400);
    client.assert_closed();
}

#[test]
fn port_in_use_is_a_one_line_error() {
    let server = Server::start(&[]);
    let mut second = Command::new(env!("CARGO_BIN_EXE_be"))
        .args(["-p", &server.addr.port().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn be");
    // If it wrongly starts serving it would never exit: bound the wait.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("second be on a used port did not exit");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let out = second.wait_with_output().expect("collect output");
    assert!(!status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr:?}");
    assert!(out.stdout.is_empty());
}
