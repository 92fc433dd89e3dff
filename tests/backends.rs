//! Backend handling seen from a client: connect timeouts and retries,
//! weights, names, IPv6 and idle timeouts.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_connect_that_hangs_times_out_and_the_client_is_served_elsewhere() {
    let (_hole, _fillers, hole_addr) = blackhole();
    let echo = echo_backend();
    let lb = lb(&[hole_addr, echo.addr], &["--connection-timeout", "0.3", "--retries", "1"]);
    for i in 0..6u64 {
        let data = random_bytes(100, i + 5);
        assert_eq!(echo_roundtrip(lb.addr, &data), data, "client {i}");
    }
}

#[test]
fn with_no_retries_a_hanging_backend_closes_the_client_after_the_timeout() {
    let (_hole, _fillers, hole_addr) = blackhole();
    let lb = lb(&[hole_addr], &["--connection-timeout", "0.2", "--retries", "0"]);
    let mut c = connect(lb.addr);
    let mut buf = [0u8; 8];
    // Closed (EOF or reset), not left hanging until our read timeout.
    match c.read(&mut buf) {
        Ok(0) => {}
        Err(e) => assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "client was left hanging"
        ),
        Ok(n) => panic!("client got {n} bytes from nowhere"),
    }
}

#[test]
fn a_client_no_backend_would_take_is_reset_not_given_a_clean_end() {
    // Every connect is refused: without a proxy the client's own connect
    // would be. A FIN would read as an empty but complete reply.
    let [d1, d2] = dead_addrs();
    let lb = lb(&[d1, d2], &["--no-health-check", "--retries", "1", "--fall", "100"]);
    for sends_first in [false, true] {
        // The reset may come before connect returns.
        let end = std::net::TcpStream::connect(lb.addr).and_then(|mut c| {
            c.set_read_timeout(Some(WAIT))?;
            if sends_first {
                c.write_all(b"request")?;
            }
            c.read(&mut [0u8; 16])
        });
        assert_eq!(end.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset), "sends first: {sends_first}");
    }
}

#[test]
fn weights_scale_each_backends_share_of_held_connections() {
    let a = tagged_backend("A");
    let b = tagged_backend("B");
    // A health probe in flight would be one more connection on a backend.
    let lb = lb(&[], &["--no-health-check", "-b", &format!("{}@1", a.addr), &format!("{}@3", b.addr)]);
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = connect(lb.addr);
        let _ = read_n(&mut s, 1);
        held.push(s);
    }
    assert_eq!(a.gauge.active.load(Ordering::SeqCst), 2, "A (weight 1) holds a quarter");
    assert_eq!(b.gauge.active.load(Ordering::SeqCst), 6, "B (weight 3) holds three quarters");
}

#[test]
fn backend_host_names_resolve_at_start_up() {
    let echo = echo_backend();
    let lb = lb(&[], &["-b", &format!("localhost:{}", echo.addr.port())]);
    assert_eq!(echo_roundtrip(lb.addr, b"named"), b"named");
}

#[test]
fn listens_on_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback on this machine; nothing to test");
        return;
    }
    let echo = echo_backend();
    let args: Vec<String> = ["-p", "0", "--bind", "::1", "--workers", "1", "-b"]
        .iter()
        .map(|s| s.to_string())
        .chain([echo.addr.to_string()])
        .collect();
    let lb = spawn_listening(lb_bin(), &args, &[]);
    assert!(lb.addr.is_ipv6(), "bound {}", lb.addr);
    assert_eq!(echo_roundtrip(lb.addr, b"six"), b"six");
}

#[test]
fn an_idle_pair_is_closed_after_the_idle_timeout() {
    let echo = echo_backend();
    let lb = lb(&[echo.addr], &["--idle-timeout", "0.5"]);
    let mut c = connect(lb.addr);
    c.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut c, 2), b"hi");
    let mut rest = Vec::new();
    // Ends by itself well before the 10 s read timeout.
    c.read_to_end(&mut rest).expect("lb closes the idle pair");
    assert!(rest.is_empty());
    assert!(wait_until(WAIT, || echo.gauge.active.load(Ordering::SeqCst) == 0));
}

#[test]
fn the_idle_timeout_leaves_a_connect_in_progress_to_the_connection_timeout() {
    // Whichever of the two clients lb sends to the black hole first waits
    // out the connect timeout, then goes to the other backend. An idle
    // timeout shorter than the connect timeout once ended it with a FIN
    // and no retry: an empty reply.
    let (_hole, _fillers, hole) = blackhole();
    let greeter = tagged_backend("hello");
    let lb = lb(
        &[hole, greeter.addr],
        &["--idle-timeout", "0.5", "--connection-timeout", "2", "--retries", "1", "--no-health-check"],
    );
    let clients: Vec<_> = (0..2).map(|_| connect(lb.addr)).collect();
    for (i, mut c) in clients.into_iter().enumerate() {
        let mut got = [0u8; 5];
        c.read_exact(&mut got).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(&got, b"hello", "client {i}");
    }
}

#[test]
fn a_slow_reader_taking_bytes_all_along_is_not_cut_as_idle() {
    // lb's send queue to the client is full and drains slowly: the socket
    // reports room only after a third of it has gone, seconds later, while
    // the client takes bytes every 50 ms.
    let (source, _stopped) = endless_source();
    let lb = lb(&[source.addr], &["--idle-timeout", "1", "--no-health-check"]);
    let mut c = connect(lb.addr);
    let mut buf = [0u8; 16 * 1024];
    let until = Instant::now() + Duration::from_secs(6);
    let mut total = 0;
    while Instant::now() < until {
        match c.read(&mut buf) {
            Ok(0) => panic!("lb ended the stream after {total} bytes"),
            Ok(n) => total += n,
            Err(e) => panic!("lb cut the stream after {total} bytes: {e}"),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_idle_timeout_resets_a_stream_it_cuts_short() {
    // The client stops reading a download: lb's buffer fills, the pair goes
    // idle and the timeout throws away bytes lb holds. A FIN after what the
    // client already has would pass the shortened stream off as complete.
    let (source, stopped) = endless_source();
    let lb = lb(&[source.addr], &["--idle-timeout", "0.5", "--no-health-check"]);
    let mut c = connect(lb.addr);
    let sent = stopped.recv_timeout(WAIT).expect("lb ends the stalled pair");
    let end = read_to_the_end(&mut c);
    assert!(
        matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client's stream ended with {end:?} (the backend sent {sent} bytes), not a reset"
    );
}
