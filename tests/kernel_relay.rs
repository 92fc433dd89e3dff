//! The kernel relay end to end: pairs that trade small messages move into
//! the kernel, and from there every byte still arrives in order, through
//! half-closes, budgets running out, resets and the idle timeout. Loading
//! the program needs root where bpf(2) is allowed; without it each test
//! says so and passes, as do those that need a join in a 32-bit build,
//! which keeps every pair with lb.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const JOINED: &str = "relayed in the kernel from now on";
const LEFT: &str = "the kernel relay's budget ran out";

fn root() -> bool {
    let yes = bpf_allowed();
    if !yes {
        eprintln!("skipped: the kernel relay needs root and bpf(2)");
    }
    yes
}

/// Whether pairs can join here: where lb may load the program (`root`),
/// in a 64-bit build (a 32-bit one keeps every pair with lb, as
/// `the_start_up_line_says_whether_pairs_can_join` checks).
fn joins_here() -> bool {
    if cfg!(target_pointer_width = "32") {
        eprintln!("skipped: a 32-bit build keeps every pair with lb");
        return false;
    }
    root()
}

/// lb with the kernel relay on (it is off by default) and its debug log,
/// which tells when pairs join and leave the relay. An explicit
/// `--kernel-relay` in `extra` wins.
fn lb_logging(backends: &[std::net::SocketAddr], extra: &[&str]) -> Proc {
    let mut args = extra.to_vec();
    if !args.contains(&"--kernel-relay") {
        args.extend(["--kernel-relay", "auto"]);
    }
    lb_env(backends, &args, &[("RUST_LOG", "debug")])
}

fn count(lb: &Proc, what: &str) -> usize {
    lb.stderr_text().matches(what).count()
}

/// How many pairs lb says joined, once it says at least `n` did (or after
/// `WAIT`): a worker writes the line and a thread here reads it, so the
/// line may come after the bytes that followed the join.
fn joined(lb: &Proc, n: usize) -> usize {
    wait_until(WAIT, || count(lb, JOINED) >= n);
    count(lb, JOINED)
}

/// Sends `rounds` short messages and checks each echo.
fn ping_pong(c: &mut TcpStream, rounds: usize, seed: u64) {
    for i in 0..rounds {
        let msg = random_bytes(1 + (i * 37) % 900, seed.wrapping_add(i as u64));
        c.write_all(&msg).expect("send a message");
        let mut got = vec![0; msg.len()];
        c.read_exact(&mut got).expect("read its echo");
        assert!(got == msg, "round {i}: the echo differs");
    }
}

fn timed_connect(addr: std::net::SocketAddr) -> TcpStream {
    let c = connect(addr);
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    c.set_write_timeout(Some(WAIT)).expect("timeout");
    c
}

#[test]
fn a_pair_trading_small_messages_moves_into_the_kernel_and_every_message_arrives() {
    if !joins_here() {
        return;
    }
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 2000, 1);
    assert_eq!(joined(&lb, 1), 1, "the pair joined the relay: {}", lb.stderr_text());
    // Small messages never spend the budget while lb answers the
    // program's notices in time. On a machine short of CPU it may answer
    // one too late, and the direction goes back to lb (the designed
    // fallback: every message still arrived); that is told apart from lb
    // declining a top-up, and comes only after top-ups kept it in the
    // kernel (the exchange is several budgets' worth). Every line about
    // the pair is in once lb's line for its close is (the lines come in
    // order, through a reader thread here).
    drop(c);
    assert!(lb.wait_stderr(|l| l.contains(": closed ("), WAIT), "the pair closed: {}", lb.stderr_text());
    let log = lb.stderr_text();
    for line in log.lines().filter(|l| l.contains(LEFT)) {
        assert!(
            line.contains("lb came too late to its notice") && !line.contains("after 0 top-up"),
            "small messages never spend the budget: {line}"
        );
    }
}

#[test]
fn never_and_the_default_keep_every_pair_with_lb() {
    if !root() {
        return;
    }
    let echo = echo_backend();
    for (seed, args) in [(2, &["--no-health-check", "--kernel-relay", "never"][..]), (3, &["--no-health-check"][..])] {
        let lb = lb_env(&[echo.addr], args, &[("RUST_LOG", "debug")]);
        let mut c = timed_connect(lb.addr);
        ping_pong(&mut c, 50, seed);
        assert_eq!(count(&lb, JOINED), 0, "{args:?}: {}", lb.stderr_text());
        assert!(lb.stderr_text().contains("kernel relay: never"), "{args:?}: {}", lb.stderr_text());
    }
}

/// A client that trades messages, then uploads `up` bytes and half-closes
/// while the echo comes back, and checks the echo to its end.
fn exchange_then_upload(addr: std::net::SocketAddr, rounds: usize, up: usize, seed: u64) {
    let mut c = timed_connect(addr);
    ping_pong(&mut c, rounds, seed);
    let body = random_bytes(up, seed ^ 0x5555);
    let mut w = c.try_clone().expect("clone");
    let writer = {
        let body = body.clone();
        thread::spawn(move || {
            w.write_all(&body).expect("upload");
            w.shutdown(Shutdown::Write).expect("half-close");
        })
    };
    let mut got = Vec::with_capacity(up);
    c.read_to_end(&mut got).expect("the echo ends with a FIN");
    writer.join().expect("writer");
    assert_eq!(got.len(), body.len(), "the whole echo came back");
    assert!(got == body, "the echo came back in order");
}

#[test]
fn a_half_close_in_the_kernel_is_relayed_after_every_byte_before_it() {
    if !joins_here() {
        return;
    }
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check"]);
    exchange_then_upload(lb.addr, 10, 10_000, 3);
    assert_eq!(joined(&lb, 1), 1, "{}", lb.stderr_text());
}

#[test]
fn a_joined_pair_that_turns_bulk_goes_back_to_lb_without_losing_a_byte() {
    if !joins_here() {
        return;
    }
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check"]);
    exchange_then_upload(lb.addr, 10, 32 << 20, 4);
    assert_eq!(joined(&lb, 1), 1);
    assert!(
        wait_until(WAIT, || count(&lb, LEFT) >= 1),
        "a bulk flow spends the budget and lb takes it back: {}",
        lb.stderr_text()
    );
}

/// The ending `redirect`'s unit test of a spent budget meets only when the
/// CPU is short: lb has copied every byte of the directions it took back,
/// and the client's FIN then comes on its own. lb's reads must see it (a
/// blocking `recv` on such a socket returns EAGAIN when the FIN wakes it)
/// and relay it.
#[test]
fn a_fin_that_comes_after_lb_copied_every_byte_it_took_back_is_relayed() {
    if !joins_here() {
        return;
    }
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 10, 7);
    assert_eq!(joined(&lb, 1), 1);
    let body = random_bytes(32 << 20, 8);
    let writer = {
        let mut w = c.try_clone().expect("clone");
        let body = body.clone();
        thread::spawn(move || w.write_all(&body).expect("upload"))
    };
    let mut got = vec![0; body.len()];
    c.read_exact(&mut got).expect("the whole echo");
    writer.join().expect("writer");
    assert!(got == body, "the echo came back in order");
    assert!(
        wait_until(WAIT, || count(&lb, "lb relays up from now on") == 1),
        "the upload spent the budget and lb took it back: {}",
        lb.stderr_text()
    );
    thread::sleep(Duration::from_millis(50));
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("the echo ends with a FIN");
    assert!(rest.is_empty(), "{} bytes after the echo", rest.len());
}

#[test]
fn forty_pairs_relay_exactly_through_joins_fallbacks_and_half_closes() {
    if !joins_here() {
        return;
    }
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check"]);
    let clients: Vec<_> = (0..40u64)
        .map(|i| {
            let addr = lb.addr;
            // From a few bytes to 3 MiB: some stay in the kernel to the end,
            // some spend the budget on the way.
            let up = [0, 1, 700, 40_000, 200_000, 3 << 20][i as usize % 6];
            thread::spawn(move || exchange_then_upload(addr, 3 + i as usize % 7, up, 100 + i))
        })
        .collect();
    for c in clients {
        c.join().expect("every pair relays exactly");
    }
    let n = joined(&lb, 30);
    assert!(n >= 30, "most pairs joined: {n}");
}

#[test]
fn the_backends_reply_and_fin_after_the_clients_fin_arrive_whole() {
    if !joins_here() {
        return;
    }
    const REPLY: usize = 3 << 20;
    let backend = backend(|mut s| {
        echo_rounds(&mut s, 5);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the client's FIN");
        s.write_all(&random_bytes(REPLY, 9)).expect("reply");
    });
    let lb = lb_logging(&[backend.addr], &["--no-health-check"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 5, 5);
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("the reply ends with a FIN");
    assert!(got == random_bytes(REPLY, 9), "the reply arrived whole, {} of {REPLY} bytes", got.len());
    assert_eq!(joined(&lb, 1), 1);
}

/// Echoes `rounds` messages of the shape [`ping_pong`] sends.
fn echo_rounds(s: &mut Conn, rounds: usize) {
    for i in 0..rounds {
        let mut msg = vec![0; 1 + (i * 37) % 900];
        s.read_exact(&mut msg).expect("a message");
        s.write_all(&msg).expect("its echo");
    }
}

#[test]
fn a_backend_reset_in_the_kernel_resets_the_client_after_the_bytes_before_it() {
    if !joins_here() {
        return;
    }
    let backend = backend(|mut s| {
        echo_rounds(&mut s, 5);
        s.write_all(b"last words").expect("last words");
        thread::sleep(Duration::from_millis(50));
        socket2::SockRef::from(&s.stream).set_linger(Some(Duration::ZERO)).expect("linger");
    });
    let lb = lb_logging(&[backend.addr], &["--no-health-check"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 5, 5);
    let mut got = [0u8; 10];
    c.read_exact(&mut got).expect("the bytes ahead of the reset");
    assert_eq!(&got, b"last words");
    match c.read(&mut [0u8; 16]) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
        Ok(n) => panic!("a reset backend ends the client's stream in a reset, not {n} bytes"),
    }
    assert_eq!(joined(&lb, 1), 1);
}

#[test]
fn a_client_reset_in_the_kernel_resets_the_backend_and_frees_the_pair() {
    if !joins_here() {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let backend = backend(move |mut s| {
        echo_rounds(&mut s, 5);
        let ended = read_to_the_end(&mut s);
        let _ = tx.lock().expect("sender").send(ended.map_err(|e| e.kind()));
    });
    let lb = lb_logging(&[backend.addr], &["--no-health-check"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 5, 6);
    socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).expect("linger");
    drop(c);
    let ended = rx.recv_timeout(WAIT).expect("the backend's stream ends");
    assert_eq!(ended, Err(ErrorKind::ConnectionReset));
    assert!(wait_until(WAIT, || backend.gauge.active.load(std::sync::atomic::Ordering::SeqCst) == 0));
    assert_eq!(joined(&lb, 1), 1);
}

#[test]
fn a_pair_busy_in_the_kernel_is_not_idle_and_a_quiet_one_is() {
    if !joins_here() {
        return;
    }
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check", "--idle-timeout", "1"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 5, 7);
    // Busy for three idle limits, in messages lb never sees.
    let until = Instant::now() + Duration::from_secs(3);
    let mut round = 0;
    while Instant::now() < until {
        ping_pong(&mut c, 1, 1000 + round);
        round += 1;
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(joined(&lb, 1), 1);
    // Then quiet: lb closes it.
    let ended = read_to_the_end(&mut c);
    assert!(matches!(ended, Ok(0)), "the idle pair got a FIN: {ended:?}");
}

#[test]
fn the_bytes_relayed_in_the_kernel_are_counted() {
    if !joins_here() {
        return;
    }
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check", "--admin", "127.0.0.1:0"]);
    let admin = common::admin::admin_addr(&lb);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 500, 8);
    let sent: usize = (0..500).map(|i| 1 + (i * 37) % 900).sum();
    drop(c);
    let relayed = Arc::new(Mutex::new(0.0));
    let seen = Arc::clone(&relayed);
    assert!(
        wait_until(WAIT, move || {
            let m = common::admin::scrape(admin);
            *seen.lock().expect("lock") = m.sum("lb_relayed_bytes_total");
            m.sum("lb_relayed_bytes_total") == (2 * sent) as f64
                && m.value("lb_relayed_bytes_total", &[("method", "kernel")]) > 0.0
        }),
        "relayed {} bytes of {}",
        relayed.lock().expect("lock"),
        2 * sent
    );
    assert_eq!(joined(&lb, 1), 1);
}

#[test]
fn lb_holds_no_descriptors_after_joined_pairs_close() {
    if !joins_here() {
        return;
    }
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check"]);
    // Each worker loads its relay as it starts: a pair served by each one
    // shows they have.
    for i in 0..2 {
        ping_pong(&mut timed_connect(lb.addr), 5, 100 + i);
    }
    assert!(wait_until(WAIT, || count(&lb, "closed (Done)") == 2));
    let before = lb.fd_count();
    for i in 0..20 {
        let mut c = timed_connect(lb.addr);
        ping_pong(&mut c, 5, 200 + i);
    }
    assert!(wait_until(WAIT, || lb.fd_count() == before), "descriptors {} != {before}", lb.fd_count());
    assert_eq!(joined(&lb, 22), 22);
}

#[test]
fn a_flow_that_is_bulk_from_the_start_never_joins_and_still_splices() {
    if !root() {
        return;
    }
    const BULK: usize = 16 << 20;
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = Arc::clone(&written);
    let backend = backend(move |mut s| {
        let mut ask = [0u8; 4];
        s.read_exact(&mut ask).expect("the request");
        for chunk in random_bytes(BULK, 11).chunks(64 * 1024) {
            s.write_all(chunk).expect("the download");
            w.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
        }
    });
    let lb = lb_logging(&[backend.addr], &["--no-health-check", "--admin", "127.0.0.1:0"]);
    let admin = common::admin::admin_addr(&lb);
    let mut c = timed_connect(lb.addr);
    c.write_all(b"get!").expect("ask");
    // Not reading until megabytes wait behind lb: its reads fill the
    // buffer, as a bulk flow's do.
    assert!(wait_until(WAIT, || written.load(std::sync::atomic::Ordering::SeqCst) >= 2 << 20));
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("the download ends with a FIN");
    assert!(got == random_bytes(BULK, 11), "the download arrived whole");
    assert_eq!(count(&lb, JOINED), 0, "a bulk flow stays with lb");
    assert!(
        wait_until(WAIT, || common::admin::scrape(admin).value("lb_relayed_bytes_total", &[("method", "splice")])
            >= (BULK / 2) as f64),
        "the download was spliced"
    );
}

#[test]
fn a_backend_reset_during_an_upload_lb_took_back_ends_the_pair_as_a_reset() {
    if !joins_here() {
        return;
    }
    // helper-65's case: the upload spent its budget and went back to lb,
    // the reply direction stayed in the kernel, and the backend resets.
    // lb's write takes the reset's error, so the event that follows shows a
    // hang-up only: it must not wait for a FIN that never comes.
    let backend = backend(|mut s| {
        echo_rounds(&mut s, 5);
        let mut got = vec![0u8; 500_000];
        s.read_exact(&mut got).expect("part of the upload");
        socket2::SockRef::from(&s.stream).set_linger(Some(Duration::ZERO)).expect("linger");
    });
    let lb = lb_logging(&[backend.addr], &["--no-health-check"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 5, 12);
    let mut w = c.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..320 {
            if let Err(e) = w.write_all(&chunk) {
                return Some(e.kind());
            }
        }
        None
    });
    let ended = read_to_the_end(&mut c).map_err(|e| e.kind());
    let wrote = writer.join().expect("writer");
    assert!(wait_until(WAIT, || count(&lb, ": closed (") == 1), "{}", lb.stderr_text());
    // The reset's error goes to whichever of the two calls meets it first;
    // the other then sees the end.
    assert!(
        ended == Err(ErrorKind::ConnectionReset) || wrote == Some(ErrorKind::ConnectionReset),
        "the client was reset: read {ended:?}, write {wrote:?}"
    );
    assert!(wait_until(WAIT, || count(&lb, "closed (Aborted(Backend))") == 1), "{}", lb.stderr_text());
    assert_eq!(count(&lb, "never added up"), 0, "{}", lb.stderr_text());
    assert_eq!(joined(&lb, 1), 1);
}

#[test]
fn the_start_up_line_says_whether_pairs_can_join() {
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 50, 4);
    let log = lb.stderr_text();
    if cfg!(target_pointer_width = "32") {
        assert!(log.contains("kernel relay: off in a 32-bit build"), "{log}");
        assert_eq!(count(&lb, JOINED), 0, "{log}");
    } else if bpf_allowed() {
        assert!(log.contains("kernel relay: pairs that trade small messages move into the kernel"), "{log}");
        assert_eq!(joined(&lb, 1), 1, "{log}");
    } else {
        assert!(log.contains("kernel relay: cannot load the eBPF program"), "{log}");
        assert_eq!(count(&lb, JOINED), 0, "{log}");
    }
}

#[test]
fn with_splice_always_the_relay_is_not_loaded_and_says_so() {
    let echo = echo_backend();
    let lb = lb_logging(&[echo.addr], &["--no-health-check", "--splice", "always"]);
    let mut c = timed_connect(lb.addr);
    ping_pong(&mut c, 50, 5);
    let log = lb.stderr_text();
    assert!(log.contains("kernel relay: off with --splice always"), "{log}");
    assert_eq!(count(&lb, JOINED), 0, "{log}");
}
