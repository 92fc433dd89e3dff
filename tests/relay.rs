//! The relay end to end: byte-exact transfer, half-close, least connections,
//! dead and resetting backends, and resource hygiene after many connections.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lb::net::unacknowledged;

#[test]
fn relays_random_bytes_exactly_in_both_directions_over_32_connections() {
    let echo = echo_backend();
    let lb = lb(&[echo.addr], &[]);
    echo_many(lb.addr, 32, 0x9e37_79b9);
}

#[test]
fn a_half_close_is_relayed_and_the_reply_still_arrives() {
    const REPLY: usize = 1 << 20;
    let backend = backend(|mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("backend reads to EOF");
        assert_eq!(got, b"request body");
        let reply = random_bytes(REPLY, 7);
        s.write_all(&reply).expect("backend writes reply");
    });
    let lb = lb(&[backend.addr], &[]);
    let mut c = connect(lb.addr);
    c.write_all(b"request body").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("client reads the whole reply");
    assert_eq!(got.len(), REPLY);
    assert!(got == random_bytes(REPLY, 7));
}

#[test]
fn a_reply_that_arrives_with_the_backends_fin_leaves_in_one_segment_with_it() {
    // The backend's last bytes and its FIN arrive together; lb relays them
    // together too (one segment, not data then a bare FIN). The client's
    // direction stays open: what it sends afterwards still reaches the
    // backend, which proves the early EOF did not end the pair.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    let backend = backend(move |mut s| {
        send_with_fin(&s, b"last words");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = tx.lock().expect("sender").send(got);
    });
    // No probes: each would be a connection of its own to this backend.
    let lb = lb(&[backend.addr], &["--no-health-check"]);
    let mut c = connect(lb.addr);
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("client reads to EOF");
    assert_eq!(got, b"last words");
    // The SYN-ACK, then the bytes and the FIN in one segment.
    assert_eq!(segments_received(&c), 2, "the reply and the FIN came in separate segments");
    c.write_all(b"after the FIN").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let at_backend = rx.recv_timeout(Duration::from_secs(10)).expect("the backend reached EOF");
    assert_eq!(at_backend, b"after the FIN");
}

#[test]
fn urgent_data_ahead_of_the_fin_does_not_cut_the_stream_short() {
    // A read stops short at TCP's urgent mark even with more bytes queued,
    // so a short read is no proof that the FIN is next. Everything here
    // (the urgent byte in the middle) arrives in one segment with the FIN.
    // lb does not read out-of-band bytes: the urgent one drops out and the
    // rest must all arrive.
    let backend = backend(|s| {
        send_around_urgent_byte(&s, b"before ", b"after", true);
        let mut rest = Vec::new();
        let _ = (&*s).read_to_end(&mut rest);
    });
    let lb = lb(&[backend.addr], &["--no-health-check"]);
    let mut c = connect(lb.addr);
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("client reads to EOF");
    assert_eq!(String::from_utf8_lossy(&got), "before after");
}

#[test]
fn bytes_behind_urgent_data_are_relayed_without_waiting_for_more() {
    // The same short read at the urgent mark, with no FIN behind it: the
    // bytes after the mark are already queued and no new edge will report
    // them, so a relay that took the short read as "drained" would hold
    // them until the backend sent something else (here: never).
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let done_rx = std::sync::Mutex::new(done_rx);
    let backend = backend(move |s| {
        send_around_urgent_byte(&s, b"before ", b"after", false);
        // Hold the connection open, silent, until the client is done.
        let _ = done_rx.lock().expect("receiver").recv_timeout(Duration::from_secs(30));
    });
    let lb = lb(&[backend.addr], &["--no-health-check"]);
    let mut c = connect(lb.addr);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let got = read_n(&mut c, "before after".len());
    assert_eq!(String::from_utf8_lossy(&got), "before after");
    let _ = done_tx.send(());
}

fn tag_of(s: &mut std::net::TcpStream) -> String {
    String::from_utf8(read_n(s, 1)).expect("tag")
}

#[test]
fn new_connections_go_to_the_backend_with_fewer_active_connections() {
    let a = tagged_backend("A");
    let b = tagged_backend("B");
    let lb = lb(&[a.addr, b.addr], &[]);
    // Hold six connections, then release the ones on B: A keeps three.
    let mut held: Vec<(String, std::net::TcpStream)> = (0..6)
        .map(|_| {
            let mut s = connect(lb.addr);
            (tag_of(&mut s), s)
        })
        .collect();
    held.retain(|(tag, _)| tag == "A");
    assert!(!held.is_empty(), "some connections landed on A");
    // lb releases a connection before closing its backend socket, so once
    // B has seen its connections close, lb no longer counts them. Waiting
    // for that after each short connection keeps the next connect from
    // racing the release of the previous one (which would see a tie).
    let b_idle = || wait_until(WAIT, || b.gauge.active.load(std::sync::atomic::Ordering::SeqCst) == 0);
    assert!(b_idle(), "B still holds connections");
    for i in 0..10 {
        let mut s = connect(lb.addr);
        assert_eq!(tag_of(&mut s), "B", "short connection {i} must avoid the loaded backend");
        drop(s);
        assert!(b_idle(), "B still holds short connection {i}");
    }
}

#[test]
fn sequential_short_connections_split_evenly() {
    let a = tagged_backend("A");
    let b = tagged_backend("B");
    let lb = lb(&[a.addr, b.addr], &[]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    const N: usize = 200;
    for _ in 0..N {
        let mut s = connect(lb.addr);
        *counts.entry(tag_of(&mut s)).or_default() += 1;
    }
    let share = counts.get("A").copied().unwrap_or(0) as f64 / N as f64;
    assert!((0.35..=0.65).contains(&share), "A got {share:.2} of connections: {counts:?}");
}

#[test]
fn a_down_backend_does_not_double_the_share_of_the_one_after_it() {
    let a = tagged_backend("A");
    let b = tagged_backend("B");
    let dead = dead_addr();
    // Probes off and a long hold-down: the dead backend, once down, stays
    // down, and no probe adds to the backends' connection counts.
    let lb = lb(
        &[a.addr, dead, b.addr],
        &["--no-health-check", "--fall", "1", "--health-check-period", "60", "--admin", "127.0.0.1:0"],
    );
    let admin = common::admin::admin_addr(&lb);
    let mut tries = 0;
    while common::admin::backend_up(admin, dead) && tries < 100 {
        let mut s = connect(lb.addr);
        tag_of(&mut s);
        tries += 1;
    }
    assert!(!common::admin::backend_up(admin, dead), "the dead backend never went down");
    // Each connection is released before the next, so every pick is a tie.
    let idle = || {
        wait_until(WAIT, || {
            a.gauge.active.load(std::sync::atomic::Ordering::SeqCst) == 0
                && b.gauge.active.load(std::sync::atomic::Ordering::SeqCst) == 0
        })
    };
    assert!(idle(), "connections still open");
    let mut counts: HashMap<String, usize> = HashMap::new();
    const N: usize = 60;
    for i in 0..N {
        let mut s = connect(lb.addr);
        *counts.entry(tag_of(&mut s)).or_default() += 1;
        drop(s);
        assert!(idle(), "short connection {i} still open");
    }
    let share = counts.get("A").copied().unwrap_or(0) as f64 / N as f64;
    assert!((0.4..=0.6).contains(&share), "A got {share:.2} of connections: {counts:?}");
}

#[test]
fn a_dead_backend_among_live_ones_costs_no_client_anything() {
    let a = echo_backend();
    let b = echo_backend();
    let lb = lb(&[a.addr, dead_addr(), b.addr], &["--retries", "2"]);
    for i in 0..50u64 {
        let data = random_bytes(1000, i + 1);
        assert_eq!(echo_roundtrip(lb.addr, &data), data, "connection {i}");
    }
}

/// A backend that reads the client's two-byte "go", sends `reply`, waits
/// until lb's kernel has acknowledged all of it, and resets. It reports on
/// the channel, per connection, whether it got that far.
fn reply_then_reset(reply: Vec<u8>) -> (Backend, mpsc::Receiver<bool>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let b = backend(move |mut s| {
        let mut go = [0u8; 2];
        let taken = s.read_exact(&mut go).is_ok()
            && s.write_all(&reply).is_ok()
            && wait_until(WAIT, || unacknowledged(&s.stream) == 0)
            && socket2::SockRef::from(&s.stream).set_linger(Some(Duration::ZERO)).is_ok();
        drop(s); // RST
        let _ = tx.lock().expect("sender").send(taken);
    });
    (b, rx)
}

#[test]
fn a_backend_reset_mid_stream_ends_the_client_promptly_and_lb_keeps_serving() {
    let (resetting, _) = reply_then_reset(vec![b'x'; 1000]);
    let lb_proc = lb(&[resetting.addr], &[]);
    let mut c = connect(lb_proc.addr);
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(b"go").unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let ended = loop {
        match c.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break false,
            Err(_) => break true, // reset relayed
        }
    };
    assert!(ended, "the client still saw an open connection after {:?}", started.elapsed());
    // lb still serves: the next connection gets its bytes and the reset too.
    let mut c2 = connect(lb_proc.addr);
    c2.write_all(b"go").unwrap();
    let mut first = [0u8; 1];
    c2.read_exact(&mut first).expect("lb still relays");
    assert_eq!(&first, b"x");
}

/// A backend that takes the connection and then neither reads nor writes
/// until `release` is dropped or sent to (or 30 s pass), reporting on
/// `started` when it reached that point: with `read_request` after reading
/// the request to its EOF, otherwise at once.
fn silent_backend(read_request: bool) -> (Backend, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
    let b = backend(move |mut s| {
        if read_request {
            let _ = s.read_to_end(&mut Vec::new());
        }
        let _ = started_tx.lock().expect("sender").send(());
        let _ = release_rx.lock().expect("receiver").recv_timeout(Duration::from_secs(30));
    });
    (b, started, release)
}

/// Connects through lb to a `silent_backend`, lets `setup` bring the pair
/// to where nothing reads from or writes to the client, then resets the
/// client (close with SO_LINGER 0): lb must let go of the pair.
fn a_client_reset_ends_the_pair(backend_reads_request: bool, setup: impl FnOnce(&TcpStream)) {
    let (silent, started, _release) = silent_backend(backend_reads_request);
    let lb = lb(&[silent.addr], &["--no-health-check"]);
    let idle = lb.fd_count();
    let c = connect(lb.addr);
    setup(&c);
    started.recv_timeout(WAIT).expect("the backend went silent");
    socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).expect("linger");
    drop(c);
    assert!(wait_until(WAIT, || lb.fd_count() == idle), "lb still holds {} descriptors", lb.fd_count() - idle);
}

#[test]
fn a_client_reset_while_its_bytes_wait_for_the_backend_ends_the_pair() {
    // The up direction holds bytes for a backend that is not reading, so it
    // never reads the client again; the reset must still end the pair
    // rather than hold both sockets until the backend reads.
    a_client_reset_ends_the_pair(false, |c| {
        c.set_write_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let chunk = [b'u'; 64 * 1024];
        // Blocks once every buffer on the way is full, then times out.
        while (&*c).write(&chunk).is_ok() {}
    });
}

#[test]
fn a_client_reset_after_its_half_close_ends_the_pair() {
    // The request and its FIN were relayed and the backend is working on
    // the reply: nothing reads from or writes to the client now.
    a_client_reset_ends_the_pair(true, |c| {
        (&*c).write_all(b"request").expect("write");
        c.shutdown(Shutdown::Write).expect("shutdown");
    });
}

#[test]
fn a_reply_sent_before_the_backend_resets_an_upload_reaches_the_client() {
    // A server that refuses an upload answers and closes with the rest of
    // the body unread, which the kernel turns into a reset. Without a
    // proxy the client reads the answer and then the reset; lb must not
    // drop the answer when its next write to the backend fails.
    let refusing = backend(|mut s| {
        let mut head = [0u8; 1024];
        let _ = s.read_exact(&mut head);
        let _ = s.write_all(b"413 too large");
        // Dropped with unread bytes queued: RST.
    });
    for mode in ["never", "auto", "always"] {
        let lb = lb(&[refusing.addr], &["--no-health-check", "--splice", mode]);
        let mut c = connect(lb.addr);
        let mut w = c.try_clone().expect("clone");
        let uploader = thread::spawn(move || {
            let chunk = [b'u'; 64 * 1024];
            for _ in 0..256 {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let end = loop {
            match c.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Some(e.kind()),
            }
        };
        uploader.join().expect("uploader");
        assert_eq!(got, b"413 too large", "--splice {mode}: the client's stream ended with {end:?}");
    }
}

#[test]
fn what_a_backend_sent_before_it_reset_reaches_a_slow_client_ahead_of_the_reset() {
    // The backend sends a reply, waits until lb's kernel has acknowledged
    // all of it, and resets. Without a proxy the client, however late it
    // reads, gets every byte and then the reset. lb used to reset the
    // client as soon as its own buffer was written out, discarding what
    // still sat unsent in the client's send queue behind a full window.
    const REPLY: usize = 200_000;
    let reply = random_bytes(REPLY, 11);
    let (resetting, done) = reply_then_reset(reply.clone());
    for mode in ["never", "auto", "always"] {
        let lb = lb(&[resetting.addr], &["--no-health-check", "--splice", mode]);
        let mut c = connect(lb.addr);
        c.write_all(b"go").expect("write");
        assert_eq!(done.recv_timeout(WAIT), Ok(true), "--splice {mode}: lb did not take the whole reply");
        // A slow reader: lb meets the reset while the client's window is full.
        thread::sleep(Duration::from_millis(200));
        let mut got = Vec::new();
        let end = c.read_to_end(&mut got).map_err(|e| e.kind());
        assert_eq!(got.len(), REPLY, "--splice {mode}: the client's stream ended with {end:?}");
        assert!(got == reply, "--splice {mode}: the bytes differ");
        assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "--splice {mode}: a cut stream must not end cleanly");
    }
}

#[test]
fn a_reset_pair_does_not_stall_a_client_that_uploads_before_it_reads() {
    // Most clients send their whole request before they read the reply.
    // While lb holds a reset pair for the client to take the last bytes,
    // it must not stop reading the client: the upload would block for
    // good, the client would never read, and only the idle timeout (an
    // hour by default) would end it. Without a proxy the upload fails on
    // the reset at once.
    let reply = random_bytes(200_000, 12);
    let (resetting, done) = reply_then_reset(reply.clone());
    let lb = lb(&[resetting.addr], &["--no-health-check"]);
    let mut c = connect(lb.addr);
    c.set_write_timeout(Some(WAIT)).expect("write timeout");
    c.set_read_timeout(Some(WAIT)).expect("read timeout");
    c.write_all(b"go").expect("write");
    assert_eq!(done.recv_timeout(WAIT), Ok(true), "lb did not take the whole reply");
    // Far more than the socket buffers between the client and lb hold.
    let chunk = [b'u'; 64 * 1024];
    let upload = (0..256).try_for_each(|_| c.write_all(&chunk)).map_err(|e| e.kind());
    assert!(
        matches!(upload, Ok(()) | Err(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)),
        "the upload stalled: {upload:?}"
    );
    let mut got = Vec::new();
    let end = c.read_to_end(&mut got).map_err(|e| e.kind());
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "after {} bytes", got.len());
    // lb resets only once the client's kernel holds the whole reply.
    assert_eq!(got.len(), reply.len(), "the reply was cut short");
    assert!(got == reply, "the bytes differ");
}

#[test]
fn a_pair_waiting_for_its_client_to_take_the_last_bytes_no_longer_counts_on_its_backend() {
    // The backend connection is over; only the client still reads. Counted
    // on, the dead connection would skew leastconn for as long as the
    // client takes.
    use common::admin::{admin_addr, scrape};
    let reply = random_bytes(200_000, 13);
    let (resetting, done) = reply_then_reset(reply.clone());
    let lb = lb(&[resetting.addr], &["--no-health-check", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&lb);
    let mut c = connect(lb.addr);
    c.write_all(b"go").expect("write");
    assert_eq!(done.recv_timeout(WAIT), Ok(true), "lb did not take the whole reply");
    let active = || scrape(admin).backend("lb_backend_active_connections", resetting.addr);
    assert!(wait_until(WAIT, || active() == 0.0), "the backend still counts {} connections", active());
    assert_eq!(scrape(admin).sum("lb_connections_active"), 1.0, "the client is still held");
    let mut got = Vec::new();
    let end = c.read_to_end(&mut got).map_err(|e| e.kind());
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "after {} bytes", got.len());
    assert!(got == reply, "the client got {} bytes, not the whole reply", got.len());
}

#[test]
fn a_reset_pair_whose_client_never_reads_the_rest_is_closed_by_the_idle_timeout() {
    // lb holds such a pair open while the client might still take the last
    // bytes; a client that never does must not keep it for ever.
    let (resetting, _) = reply_then_reset(vec![b'r'; 200_000]);
    let lb = lb(&[resetting.addr], &["--no-health-check", "--idle-timeout", "1"]);
    let idle = lb.fd_count();
    let mut c = connect(lb.addr);
    c.write_all(b"go").expect("write");
    let released = wait_until(WAIT, || lb.fd_count() == idle);
    assert!(released, "lb still holds {} descriptors", lb.fd_count() - idle);
    // The client's kernel kept what arrived, then the reset.
    let mut got = Vec::new();
    let end = c.read_to_end(&mut got).map_err(|e| e.kind());
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "after {} bytes", got.len());
}

/// Byte `i` of a reply: a cycle of prime length, so a dropped run of any
/// usual size (pages, buffers) shifts what follows and shows.
fn reply_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// A backend that reads 1 KiB of the client's upload, then replies (bytes
/// [`reply_byte`]) until nothing more fits on the way (its writes stall
/// for 300 ms) and resets. It reports how many reply bytes lb's kernel had
/// acknowledged by then: each of them could have been delivered.
fn reply_until_stalled_then_reset() -> (Backend, mpsc::Receiver<usize>) {
    const LIMIT: usize = 64 << 20;
    let (tx, acked_rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let b = backend(move |mut s| {
        let mut head = [0u8; 1024];
        let _ = s.read_exact(&mut head);
        s.set_write_timeout(Some(Duration::from_millis(300))).expect("write timeout");
        let chunk: Vec<u8> = (0..64 * 1024).map(reply_byte).collect();
        let mut written = 0;
        // 64 KiB is a multiple of 251 plus 23; keep the cycle going.
        while written < LIMIT {
            let from = written % 251;
            match s.write(&chunk[from..]) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        let acked = written - unacknowledged(&s.stream);
        let _ = socket2::SockRef::from(&s.stream).set_linger(Some(Duration::ZERO));
        drop(s); // RST
        let _ = tx.lock().expect("sender").send(acked);
    });
    (b, acked_rx)
}

#[test]
fn everything_lb_took_from_a_backend_that_resets_an_upload_reaches_the_client() {
    // The client uploads and reads only later. The backend reads a little,
    // then replies until nothing more fits on the way (its writes stall for
    // 300 ms), and resets. Every reply byte lb's kernel acknowledged before
    // the reset could have been delivered, however slowly the client reads:
    // lb used to pass on one more burst after its write to the backend
    // failed and drop the rest (its buffer and what its socket still held).
    let (resetting, acked_rx) = reply_until_stalled_then_reset();
    for mode in ["never", "auto", "always"] {
        let lb = lb(&[resetting.addr], &["--no-health-check", "--splice", mode, "--admin", "127.0.0.1:0"]);
        let admin = common::admin::admin_addr(&lb);
        let mut c = connect(lb.addr);
        c.set_read_timeout(Some(WAIT)).expect("read timeout");
        let mut w = c.try_clone().expect("clone");
        w.set_write_timeout(Some(WAIT)).expect("write timeout");
        let uploader = thread::spawn(move || {
            let chunk = [b'u'; 64 * 1024];
            (0..512).try_for_each(|_| w.write_all(&chunk)).map_err(|e| e.kind())
        });
        let acked = acked_rx.recv_timeout(WAIT * 2).expect("the backend replied and reset");
        // Its connection is over while the client has yet to read: it no
        // longer counts for leastconn.
        let active = || common::admin::scrape(admin).backend("lb_backend_active_connections", resetting.addr);
        assert!(wait_until(WAIT, || active() == 0.0), "--splice {mode}: the backend still counts {}", active());
        let mut got = Vec::new();
        let end = c.read_to_end(&mut got).map_err(|e| e.kind());
        let upload = uploader.join().expect("uploader");
        assert!(
            got.len() >= acked,
            "--splice {mode}: the client got {} of the {acked} bytes lb took, then {end:?}",
            got.len()
        );
        let first_wrong = got.iter().enumerate().position(|(i, &b)| b != reply_byte(i));
        assert_eq!(first_wrong, None, "--splice {mode}: the reply differs");
        // The socket reports a reset once: to the reader, or to the
        // uploader if its write came first, and the reader then sees 0.
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        let reset = end == Err(ConnectionReset) || (end == Ok(got.len()) && upload == Err(ConnectionReset));
        assert!(reset, "--splice {mode}: a cut stream must not end cleanly: read {end:?}, upload {upload:?}");
        // Discarded, not stalled, once the backend has failed.
        assert!(
            matches!(upload, Ok(()) | Err(ConnectionReset | BrokenPipe)),
            "--splice {mode}: the upload ended with {upload:?}"
        );
    }
}

#[test]
fn a_client_that_uploads_for_ever_after_its_backend_failed_and_never_reads_meets_the_idle_timeout() {
    // lb discards what such a client sends while the backend's last bytes
    // wait for it; that must not count as activity, or the pair would be
    // held as long as the client writes. Without a proxy its writes fail.
    let (resetting, acked) = reply_until_stalled_then_reset();
    let lb = lb(&[resetting.addr], &["--no-health-check", "--idle-timeout", "1"]);
    let mut c = connect(lb.addr);
    // A steady trickle, for at most 20 s: every write is activity if
    // discarding counts.
    let started = Instant::now();
    let chunk = [b'u'; 16 * 1024];
    let upload = loop {
        if let Err(e) = c.write_all(&chunk) {
            break Err(e.kind());
        }
        if started.elapsed() > Duration::from_secs(20) {
            break Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    };
    acked.recv_timeout(WAIT).expect("the backend replied and reset");
    assert!(
        matches!(upload, Err(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)),
        "the upload ended with {upload:?} after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_client_slowly_reading_what_a_failed_backend_sent_is_not_cut_as_idle() {
    // lb writes nothing new while its send queue to a slow reader stays
    // nearly full, possibly for longer than the idle timeout; the client
    // taking bytes out of that queue is still progress.
    let (resetting, acked) = reply_until_stalled_then_reset();
    let lb = lb(&[resetting.addr], &["--no-health-check", "--idle-timeout", "2"]);
    // A small window from the start: lb's queue drains at the reader's
    // pace, not from a large buffer the client's kernel filled earlier.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    sock.connect(&lb.addr.into()).expect("connect");
    let c: TcpStream = sock.into();
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut w = c.try_clone().expect("clone");
    let uploader = thread::spawn(move || {
        let chunk = [b'u'; 64 * 1024];
        let _ = (0..512).try_for_each(|_| w.write_all(&chunk));
    });
    let acked = acked.recv_timeout(WAIT * 2).expect("the backend replied and reset");
    // 2 KiB every 50 ms for 5 s: two and a half idle timeouts.
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let slow_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < slow_until {
        match (&c).read(&mut buf) {
            Ok(0) => panic!("a clean end after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("cut after {} bytes of {acked}, while reading: {e}", got.len()),
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(got.iter().enumerate().position(|(i, &b)| b != reply_byte(i)), None, "the reply differs");
    // The rest is not waited for: through a 4 KiB window it takes minutes.
    drop(c);
    uploader.join().expect("uploader");
}

#[test]
fn a_client_that_resets_while_the_backend_connect_is_in_flight_is_let_go_and_its_request_goes_nowhere() {
    // The first backend never completes a connect; the second would take
    // the request on a retry after the timeout. A client that reset before
    // then has given up: lb must free its pair at once and not deliver the
    // request elsewhere later, whether or not it half-closed first.
    let (_hole, _fillers, hole) = blackhole();
    let recorder = echo_backend();
    for half_close in [false, true] {
        // One worker, and a fresh lb each time, so the table order decides:
        // the hole is tried first.
        let lb = lb(
            &[hole, recorder.addr],
            // A connect timeout the test never reaches: no retry can
            // happen before lb sees the reset, however slow the machine.
            &["--workers", "1", "--retries", "1", "--connection-timeout", "30", "--no-health-check"],
        );
        let idle = lb.fd_count();
        let c = connect(lb.addr);
        // Accepted, and the connect to the hole started.
        assert!(wait_until(WAIT, || lb.fd_count() >= idle + 2), "lb never took the client");
        (&c).write_all(b"request").expect("write");
        if half_close {
            c.shutdown(Shutdown::Write).expect("shutdown");
        }
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(c);
        assert!(
            wait_until(WAIT, || lb.fd_count() == idle),
            "half-close {half_close}: lb still holds {} descriptors",
            lb.fd_count() - idle
        );
        // Nor was the reset taken for a failed connect and retried on the
        // second backend (the timeout is too far off to retry otherwise).
        let relayed = recorder.gauge.accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(relayed, 0, "half-close {half_close}: the request reached the second backend");
    }
}

#[test]
fn no_descriptors_or_close_wait_sockets_leak_after_many_connections_and_resets() {
    let echo = echo_backend();
    // A health probe's socket would come and go in the descriptor counts.
    let lb = lb(&[echo.addr], &["--no-health-check"]);
    // lb opens no descriptor lazily, so the count before traffic is its idle level.
    let idle = lb.fd_count();
    assert!(idle > 0, "fd count readable");
    assert_eq!(echo_roundtrip(lb.addr, b"warm"), b"warm");

    let workers: Vec<_> = (0..4)
        .map(|t| {
            let addr = lb.addr;
            thread::spawn(move || {
                for i in 0..500 {
                    let mut s = connect(addr);
                    s.write_all(b"ping").unwrap();
                    let mut b = [0u8; 4];
                    s.read_exact(&mut b).unwrap_or_else(|e| panic!("thread {t} conn {i}: {e}"));
                    assert_eq!(&b, b"ping");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client thread");
    }
    for _ in 0..50 {
        let mut s = connect(lb.addr);
        s.write_all(&[7u8; 5000]).unwrap();
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s); // client RST
    }
    let ports = [lb.addr.port(), echo.addr.port()];
    assert!(wait_until(WAIT, || lb.fd_count() == idle), "lb holds {} descriptors, {idle} when idle", lb.fd_count());
    assert!(
        wait_until(WAIT, || close_wait_count(&ports) == 0),
        "{} sockets left in CLOSE_WAIT",
        close_wait_count(&ports)
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).expect("value").parse().expect("kB")
}

#[test]
fn a_client_that_stops_reading_stalls_the_backend_instead_of_growing_lb() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // More than every kernel buffer on the way can hold (a few MiB each),
    // so without backpressure lb itself would have to hold the rest.
    const TOTAL: usize = 64 << 20;
    let stalled = Arc::new(AtomicBool::new(false));
    let sent_before_stall = Arc::new(AtomicUsize::new(0));
    let (st, sent) = (Arc::clone(&stalled), Arc::clone(&sent_before_stall));
    let source = backend(move |mut s| {
        let data = random_bytes(TOTAL, 11);
        s.stream.set_nonblocking(true).expect("nonblocking");
        let mut off = 0;
        while off < TOTAL {
            match s.write(&data[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
        sent.store(off, Ordering::SeqCst);
        st.store(true, Ordering::SeqCst);
        s.stream.set_nonblocking(false).expect("blocking");
        let _ = s.write_all(&data[off..]);
    });
    let lb = lb(&[source.addr], &["--no-health-check"]);
    let before = rss_kib(lb.pid());

    let mut c = connect(lb.addr);
    assert!(wait_until(WAIT, || stalled.load(Ordering::SeqCst)), "the backend never had to wait for lb");
    let sent = sent_before_stall.load(Ordering::SeqCst);
    assert!(sent < TOTAL, "lb took all {TOTAL} bytes from the backend without the client reading");
    let grown = rss_kib(lb.pid()).saturating_sub(before);
    assert!(grown < 4096, "lb grew by {grown} KiB while the client was not reading");

    let mut got = Vec::with_capacity(TOTAL);
    c.read_to_end(&mut got).expect("the client reads everything once it starts");
    assert_eq!(got.len(), TOTAL);
    assert!(got == random_bytes(TOTAL, 11), "bytes differ after the stall");
}

/// The next connection `l` (non-blocking) takes, within [`WAIT`].
fn accept_within(l: &std::net::TcpListener) -> TcpStream {
    let mut got = None;
    assert!(
        wait_until(WAIT, || {
            got = l.accept().ok().map(|(s, _)| s);
            got.is_some()
        }),
        "lb never connected"
    );
    let s = got.expect("accepted");
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

/// Whether every thread of `pid` is stopped by a signal.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
    })
}

#[test]
fn a_closed_pairs_last_events_do_not_reach_the_pair_that_takes_its_slab_key() {
    // One epoll batch can report a closed pair's sockets after the accept
    // that gave its slab key to a new pair. Stopping lb lines such a batch
    // up: client A's reset (which closes pair A), client C's connect, then
    // the FIN of A's backend. Taken for C's backend's FIN, it would make lb
    // end C's reply at the first short read.
    let backends = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    backends.set_nonblocking(true).expect("non-blocking");
    let lb = lb(&[backends.local_addr().expect("addr")], &["--workers", "1", "--no-health-check"]);
    let mut a = connect(lb.addr);
    a.write_all(b"a").expect("write");
    let mut a_backend = accept_within(&backends);
    assert_eq!(read_n(&mut a_backend, 1), b"a");

    lb.signal(libc::SIGSTOP);
    assert!(wait_until(WAIT, || all_threads_stopped(lb.pid())), "lb never stopped");
    socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO)).expect("linger");
    drop(a);
    let mut c = connect(lb.addr);
    a_backend.shutdown(Shutdown::Write).expect("FIN");
    lb.signal(libc::SIGCONT);

    let mut c_backend = accept_within(&backends);
    c_backend.write_all(b"first part").expect("write");
    assert_eq!(read_n(&mut c, 10), b"first part");
    c_backend.write_all(b", then the rest").expect("write");
    c_backend.shutdown(Shutdown::Write).expect("FIN");
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("the rest, then the end");
    assert_eq!(String::from_utf8_lossy(&got), ", then the rest");
}
