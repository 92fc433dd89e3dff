//! The global connection cap and graceful shutdown, observed from outside.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use common::*;

#[test]
fn the_cap_bounds_concurrent_backend_connections_and_waiting_clients_are_served() {
    let echo = echo_backend();
    // Health probes would be extra backend connections in the counts below.
    let lb = lb(&[echo.addr], &["--max-connections", "10", "--no-health-check"]);
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let addr = lb.addr;
            thread::spawn(move || {
                let mut s = connect(addr);
                s.write_all(b"hello").unwrap();
                let mut b = [0u8; 5];
                s.read_exact(&mut b).unwrap_or_else(|e| panic!("client {i}: {e}"));
                assert_eq!(&b, b"hello");
                // Hold the slot a little so clients really overlap.
                thread::sleep(Duration::from_millis(100));
                s.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    assert_eq!(echo.gauge.accepted.load(Ordering::SeqCst), 40, "every client was served");
    let peak = echo.gauge.peak.load(Ordering::SeqCst);
    assert!(peak <= 10, "backend saw {peak} connections at once");
    assert!(peak >= 2, "clients overlapped (peak {peak})");
}

#[test]
fn a_client_queued_at_the_cap_is_served_once_a_slot_frees_whichever_worker_holds_it() {
    // With --max-connections 1, the worker that takes the first client
    // stops accepting at once, and the one the second client is queued on
    // (the idle one, when lb steers) stops when it finds the cap reached.
    // Neither accepts again until the first client's close wakes it.
    let echo = echo_backend();
    let lb = lb(&[echo.addr], &["--workers", "2", "--max-connections", "1", "--no-health-check"]);
    let mut first = connect(lb.addr);
    first.write_all(b"first").expect("write");
    assert_eq!(read_n(&mut first, 5), b"first");
    let mut second = connect(lb.addr);
    second.write_all(b"again").expect("write");
    second.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut b = [0u8; 5];
    let early = second.read(&mut b).map_err(|e| e.kind());
    assert!(
        matches!(early, Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the second client was served past the cap: {early:?}"
    );
    first.shutdown(Shutdown::Write).expect("FIN");
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).expect("the first client's end");
    second.set_read_timeout(Some(WAIT)).expect("timeout");
    assert_eq!(read_n(&mut second, 5), b"again", "the queued client was never served");
}

#[test]
fn sigterm_lets_a_transfer_finish_refuses_new_clients_and_exits_zero() {
    // The backend trickles a 2 MiB reply so the transfer outlives the signal.
    const REPLY: usize = 2 << 20;
    let slow = backend(|mut s| {
        let mut b = [0u8; 1];
        let _ = s.read_exact(&mut b);
        let data = random_bytes(REPLY, 3);
        for chunk in data.chunks(64 * 1024) {
            if s.write_all(chunk).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let mut lb = lb(&[slow.addr], &["--drain-timeout", "20"]);
    let mut c = connect(lb.addr);
    c.write_all(b"g").unwrap();
    let first = read_n(&mut c, 1000);
    lb.signal(libc::SIGTERM);
    assert!(
        wait_until(WAIT, || std::net::TcpStream::connect(lb.addr).is_err()),
        "new connections are still accepted after SIGTERM"
    );
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("transfer completes");
    let mut got = first;
    got.extend_from_slice(&rest);
    assert_eq!(got.len(), REPLY);
    assert!(got == random_bytes(REPLY, 3), "transfer intact");
    drop(c);
    let status = lb.wait_exit(WAIT).expect("lb exits after draining");
    assert_eq!(status.code(), Some(0), "stderr: {}", lb.stderr_text());
}

#[test]
fn the_drain_timeout_closes_stragglers_and_still_exits_zero() {
    let echo = echo_backend();
    let mut lb = lb(&[echo.addr], &["--drain-timeout", "0.3"]);
    let mut c = connect(lb.addr);
    c.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut c, 1), b"x");
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit(WAIT).expect("lb gives up on the idle client");
    assert_eq!(status.code(), Some(0));
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert!(
        lb.wait_stderr(|l| l.contains("drain timeout reached; closing 1 connections still open"), WAIT),
        "{}",
        lb.stderr_text()
    );
}

#[test]
fn a_drain_with_nothing_open_ends_without_a_timeout_warning_or_a_line_per_worker() {
    let echo = echo_backend();
    let mut lb = lb(&[echo.addr], &["--drain-timeout", "0", "--workers", "4"]);
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit(WAIT).expect("lb exits");
    assert_eq!(status.code(), Some(0));
    let log = lb.stderr_text();
    assert!(!log.contains("drain timeout reached"), "{log}");
    // One line says lb drains; idle workers add nothing to it (with a
    // worker per core, a large machine printed dozens of "draining 0").
    assert_eq!(log.matches("draining").count(), 1, "{log}");
}

#[test]
fn the_drain_timeout_resets_a_download_it_cuts_short() {
    // As with the idle timeout: bytes lb held are lost, so the client must
    // not see a clean end.
    let (source, _stopped) = endless_source();
    let mut lb = lb(&[source.addr], &["--drain-timeout", "0.3", "--no-health-check"]);
    let mut c = connect(lb.addr);
    let mut first = [0u8; 1];
    c.read_exact(&mut first).expect("the download starts");
    // Not reading on: lb's buffer fills and stays full.
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit(WAIT).expect("lb gives up on the stalled download");
    assert_eq!(status.code(), Some(0));
    let end = read_to_the_end(&mut c);
    assert!(
        matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client's download ended with {end:?}, not a reset"
    );
}

/// A backend that sends `hello`, then reads the client's stream to its
/// end and reports how that ended: the byte count on a clean EOF, the
/// error kind otherwise.
fn greet_then_read_to_the_end() -> (Backend, std::sync::mpsc::Receiver<Result<usize, std::io::ErrorKind>>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let b = backend(move |mut s| {
        let end = s.write_all(b"hello").and_then(|()| read_to_the_end(&mut s.stream));
        let _ = tx.lock().expect("sender").send(end.map_err(|e| e.kind()));
    });
    (b, rx)
}

/// Brings a pair to where both streams are open and lb holds no bytes of
/// either, lets `stop` make lb end it, and checks that both sides got a
/// reset: the streams were cut, and a FIN would make them look complete.
fn a_pair_cut_by_shutdown_is_reset_on_both_sides(drain_timeout: &str, stop: impl Fn(&Proc)) {
    let (greeter, ends) = greet_then_read_to_the_end();
    for mode in ["never", "always"] {
        let mut lb = lb(&[greeter.addr], &["--drain-timeout", drain_timeout, "--no-health-check", "--splice", mode]);
        let mut c = connect(lb.addr);
        c.write_all(b"up").expect("write");
        assert_eq!(read_n(&mut c, 5), b"hello");
        stop(&lb);
        let status = lb.wait_exit(WAIT).expect("lb cuts the pair and exits");
        assert_eq!(status.code(), Some(0), "--splice {mode}");
        let client_end = read_to_the_end(&mut c).map_err(|e| e.kind());
        assert_eq!(client_end, Err(std::io::ErrorKind::ConnectionReset), "--splice {mode}: the client's stream");
        let backend_end = ends.recv_timeout(WAIT).expect("the backend's stream ended");
        assert_eq!(backend_end, Err(std::io::ErrorKind::ConnectionReset), "--splice {mode}: the backend's stream");
    }
}

#[test]
fn the_drain_timeout_resets_both_sides_of_a_pair_it_cuts_even_with_nothing_in_flight() {
    a_pair_cut_by_shutdown_is_reset_on_both_sides("0.3", |lb| lb.signal(libc::SIGTERM));
}

#[test]
fn a_second_signal_resets_both_sides_of_a_pair_it_cuts_even_with_nothing_in_flight() {
    a_pair_cut_by_shutdown_is_reset_on_both_sides("20", |lb| {
        lb.signal(libc::SIGTERM);
        // Signals that arrive together count once: wait for the first.
        assert!(lb.wait_stderr(|l| l.contains("stop signal: no longer accepting"), WAIT), "lb ignored SIGTERM");
        lb.signal(libc::SIGTERM);
    });
}

/// Which of lb's output streams the test leaves unread.
#[derive(Clone, Copy)]
enum Stalled {
    Stdout,
    Stderr,
}

/// Starts lb with `args` (and `RUST_LOG=log`) whose `stalled` stream is a
/// one-page pipe nobody reads; the other goes to /dev/null. Returns the
/// child and the test's end of the pipe, which must stay open.
fn lb_with_a_stalled_reader(
    args: &[String],
    log: &str,
    stalled: Stalled,
) -> (std::process::Child, std::os::fd::OwnedFd) {
    use std::process::{Command, Stdio};
    let (out, err) = match stalled {
        Stalled::Stdout => (Stdio::piped(), Stdio::null()),
        Stalled::Stderr => (Stdio::null(), Stdio::piped()),
    };
    let mut child = Command::new(lb_bin())
        .args(args)
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn lb");
    let pipe: std::os::fd::OwnedFd = match stalled {
        Stalled::Stdout => child.stdout.take().expect("stdout piped").into(),
        Stalled::Stderr => child.stderr.take().expect("stderr piped").into(),
    };
    // SAFETY: fcntl on a pipe this test owns; one page is the minimum.
    assert_eq!(unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) }, 4096, "pipe resized");
    (child, pipe)
}

/// Reads the pipe until lb logs the address it listens on, and no further:
/// from there on nobody reads it.
fn listening_addr(pipe: &std::os::fd::OwnedFd) -> std::net::SocketAddr {
    let deadline = std::time::Instant::now() + WAIT;
    let mut reader = std::fs::File::from(pipe.try_clone().expect("dup the pipe"));
    let mut text = Vec::new();
    loop {
        let shown = String::from_utf8_lossy(&text);
        // Only whole lines: a chunk may end inside the address.
        if let Some(addr) = shown.split_inclusive('\n').filter(|l| l.ends_with('\n')).find_map(announced_addr) {
            return addr;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd { fd: pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd for a pipe this test owns.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
        assert!(ready > 0, "lb did not say where it listens: {shown:?}");
        let mut chunk = [0u8; 512];
        let n = reader.read(&mut chunk).expect("read lb's stderr");
        assert!(n > 0, "lb closed its stderr before it listened: {shown:?}");
        text.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the one-page pipe is all but full: a write of a longer report,
/// or of a log line once a few more arrive, blocks. (Writes up to a page
/// are atomic, so a page of short lines never fills to the last byte.)
fn pipe_is_full(pipe: &std::os::fd::OwnedFd) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut queued) };
    queued >= 4096 - 512
}

/// SIGTERM, then lb must exit 0 within WAIT.
fn stops_on_sigterm(mut child: std::process::Child) -> bool {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exited = wait_until(WAIT, || matches!(child.try_wait(), Ok(Some(_))));
    let _ = child.kill();
    let status = child.wait().expect("wait");
    exited && status.code() == Some(0)
}

#[test]
fn signals_a_parent_left_blocked_or_pending_neither_kill_lb_nor_keep_sigterm_out() {
    // A parent that blocked SIGTERM, SIGHUP and SIGUSR1 and sent the last
    // two: lb must discard those (their default action is to kill), and
    // still stop on SIGTERM. Before, lb inherited the mask and could not
    // be stopped at all.
    let echo = echo_backend();
    let mut cmd = std::process::Command::new(lb_bin());
    cmd.args(["-p", "0", "--bind", "127.0.0.1", "--workers", "1", "--no-health-check", "-b", &echo.addr.to_string()]);
    // SAFETY: only sigprocmask and raise (async-signal-safe) run between
    // fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
                libc::sigaddset(&raw mut set, sig);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
            // Pending across exec, as they stay blocked.
            libc::raise(libc::SIGHUP);
            libc::raise(libc::SIGUSR1);
            Ok(())
        });
    }
    let mut lb = spawn_listening_cmd(cmd);
    let data = random_bytes(1000, 5);
    assert_eq!(echo_roundtrip(lb.addr, &data), data, "lb serves");
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit(WAIT);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "SIGTERM did not stop lb: {status:?}");
}

#[test]
fn sigterm_stops_lb_while_nobody_reads_its_stdout() {
    // A stalled log reader fills the stdout pipe. Stats reports must not
    // block the thread that handles stop signals.
    let echo = echo_backend();
    let mut args: Vec<String> = ["-p", "0", "--bind", "127.0.0.1", "--no-health-check", "--stats-period", "0.05", "-b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // With 40 backends one report (~5 KiB) is more than the pipe holds, so
    // a full pipe means its writer is blocked. (Distinct addresses, all
    // loopback: lb refuses a backend listed twice.)
    args.extend((1..=40).map(|i| format!("127.0.0.{i}:{}", echo.addr.port())));
    let (child, stdout) = lb_with_a_stalled_reader(&args, "info", Stalled::Stdout);
    assert!(wait_until(WAIT, || pipe_is_full(&stdout)), "lb never filled its stdout pipe");
    assert!(stops_on_sigterm(child), "lb ignored SIGTERM while its stdout was full");
}

#[test]
fn a_stalled_stderr_does_not_stall_the_relay() {
    // Debug logging writes lines per connection from the workers; with
    // nobody reading stderr they must be dropped, not block the relay.
    let echo = echo_backend();
    let args: Vec<String> = ["-p", "0", "--bind", "127.0.0.1", "--no-health-check", "-b", &echo.addr.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (child, stderr) = lb_with_a_stalled_reader(&args, "debug", Stalled::Stderr);
    let addr = listening_addr(&stderr);
    let mut relayed = 0;
    while !pipe_is_full(&stderr) && relayed < 1000 {
        assert_eq!(echo_roundtrip(addr, b"ping"), b"ping");
        relayed += 1;
    }
    assert!(pipe_is_full(&stderr), "{relayed} connections did not fill one page of stderr");
    // Each connection logs at least a line of some 100 bytes: past this
    // point the writer of those lines is blocked.
    for _ in 0..50 {
        assert_eq!(echo_roundtrip(addr, b"ping"), b"ping");
    }
    assert!(stops_on_sigterm(child), "lb did not stop while its stderr was full");
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn running_out_of_descriptors_neither_kills_nor_spins_and_recovers() {
    let echo = echo_backend();
    // Given, so kept although the limit cannot hold it: lb then meets
    // EMFILE at accept.
    let lb = lb_with_fd_limit(48, &[echo.addr], &["--workers", "1", "--max-connections", "1000"]);
    assert!(lb.wait_stderr(|e| e.contains("is too low for --max-connections 1000"), WAIT), "{}", lb.stderr_text());
    // Far more clients than descriptors: some are served, the rest wait or
    // are closed, and lb backs off instead of spinning on EMFILE.
    let held: Vec<_> = (0..60).filter_map(|_| std::net::TcpStream::connect(lb.addr).ok()).collect();
    assert!(wait_until(WAIT, || echo.gauge.active.load(Ordering::SeqCst) >= 5));
    assert!(
        wait_until(WAIT, || lb.stderr_text().contains("Too many open files")),
        "lb never hit the descriptor limit: {}",
        lb.stderr_text()
    );
    let before = cpu_ticks(lb.pid());
    thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(lb.pid()) - before;
    // A spinning loop burns ~100 ticks a second; backing off burns ~none.
    assert!(spent < 50, "lb used {spent} ticks in one second while out of descriptors");
    // Each back-off's failed accept, or failed backend socket for the
    // client parked with the last descriptor (which of the two depends on
    // the descriptors' parity), is not a line of its own: one a second,
    // with a count of those held back.
    let throttled = |l: &str| (l.contains("accept: ") || l.contains("connect to ")) && l.contains("not logged");
    assert!(wait_until(WAIT, || lb.stderr_text().lines().any(throttled)), "no throttled warning: {}", lb.stderr_text());
    drop(held);
    assert!(wait_until(WAIT, || echo.gauge.active.load(Ordering::SeqCst) == 0));
    // Recovered: a new client is served.
    let data = random_bytes(10_000, 11);
    assert_eq!(echo_roundtrip(lb.addr, &data), data);
    assert!(lb.fd_count() > 0, "lb is alive");
}

#[test]
fn the_admin_endpoint_answers_while_the_workers_hold_every_descriptor() {
    let echo = echo_backend();
    // A cap given past the limit is kept, so clients take every descriptor.
    let args = [&ONE_WORKER_PAST_THE_LIMIT[..], &["--admin", "127.0.0.1:0"]].concat();
    let lb = lb_with_fd_limit(48, &[echo.addr], &args);
    let admin = common::admin::admin_addr(&lb);
    let held: Vec<_> = (0..60).filter_map(|_| std::net::TcpStream::connect(lb.addr).ok()).collect();
    assert!(
        wait_until(WAIT, || lb.stderr_text().contains("Too many open files")),
        "lb never ran out of descriptors: {}",
        lb.stderr_text()
    );
    // Twice: the reserve is taken back when the first scrape closes.
    for scrape in 0..2 {
        let active = common::admin::scrape(admin).value("lb_connections_active", &[]);
        assert!(active >= 5.0, "scrape {scrape}: {active} active");
    }
    drop(held);
}

/// `n` clients at once, each sending "hello", reading it back, holding its
/// connection for `hold` (so that they overlap) and closing; what each
/// that failed met.
fn hello_clients(addr: std::net::SocketAddr, n: usize, hold: Duration) -> Vec<String> {
    let clients: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || {
                let mut s = connect(addr);
                s.write_all(b"hello").map_err(|e| format!("client {i}: {e}"))?;
                let mut b = [0u8; 5];
                s.read_exact(&mut b).map_err(|e| format!("client {i} was not served: {e}"))?;
                thread::sleep(hold);
                s.shutdown(Shutdown::Write).map_err(|e| format!("client {i}: {e}"))?;
                s.read_to_end(&mut Vec::new()).map_err(|e| format!("client {i}: {e}"))?;
                Ok::<_, String>(())
            })
        })
        .collect();
    clients.into_iter().filter_map(|c| c.join().expect("client thread").err()).collect()
}

/// lb on 127.0.0.1 under `ulimit -n limit` in front of `backends`, with
/// `extra` flags.
fn lb_with_fd_limit(limit: u32, backends: &[std::net::SocketAddr], extra: &[&str]) -> Proc {
    let mut cmd = lb_under_fd_limit(limit);
    cmd.args(["-p", "0", "--bind", "127.0.0.1"]).args(extra).arg("-b").args(backends.iter().map(|b| b.to_string()));
    spawn_listening_cmd(cmd)
}

#[test]
fn a_client_accepted_with_the_last_descriptor_waits_for_its_backend_socket_instead_of_being_reset() {
    let echo = echo_backend();
    every_client_is_served_at_the_descriptor_limit(&echo, &[echo.addr], &[]);
}

#[test]
fn a_connect_retry_that_finds_no_descriptor_waits_instead_of_resetting_the_client() {
    // Every client tries the dead backend first (it never holds a
    // connection, and a high --fall keeps it up), so some retry finds the
    // descriptors taken by the failed socket and its client.
    let echo = echo_backend();
    let dead = dead_addr();
    every_client_is_served_at_the_descriptor_limit(&echo, &[dead, echo.addr], &["--fall", "1000", "--retries", "1"]);
}

#[test]
fn a_failed_connect_frees_its_descriptor_before_the_retry_so_two_free_serve_a_client() {
    // Every client tries the silent backend first (it never holds a
    // connection, and a high --fall keeps it up), and its connect times
    // out. With two descriptors free, the client takes one and that
    // connect the other: the retry to the echo backend only fits once the
    // timed-out socket is closed. Kept open, the client waited, retried
    // the silent backend first again, and was never served. (A refused
    // connect on loopback fails at once, its socket already closed.)
    let echo = echo_backend();
    let (_hole, _fillers, silent) = blackhole();
    let args = [&ONE_WORKER_PAST_THE_LIMIT[..], &["--fall", "1000", "--connection-timeout", "0.2"]].concat();
    const HELD: usize = 4;
    // Room for the held clients (client and backend socket each) and one
    // client more.
    let (lb, free) = lb_with_free_descriptors(2 * HELD + 2, &[silent, echo.addr], &args);
    let mut held: Vec<_> = (0..HELD).map(|i| hello_client(lb.addr, i)).collect();
    assert_eq!(free(&lb), 2);
    let mut last = connect(lb.addr);
    let served = hello(&mut last);
    assert!(served.is_ok(), "the client with two descriptors free: {served:?}\n{}", lb.stderr_text());
    assert_eq!(free(&lb), 0);
    // One more waits for a descriptor, and is served once one frees.
    let mut waiting = connect(lb.addr);
    drop(held.pop());
    assert_eq!(hello(&mut waiting).expect("the waiting client is served"), *b"hello");
}

#[test]
fn a_client_waiting_for_a_descriptor_when_sigterm_arrives_is_still_served() {
    let echo = echo_backend();
    // The client must not give up waiting first, however slow the machine.
    let args = [&ONE_WORKER_PAST_THE_LIMIT[..], &["--connection-timeout", "30"]].concat();
    const HELD: usize = 3;
    // One descriptor past the held clients: the next is accepted, and
    // waits for its backend socket.
    let (mut lb, free) = lb_with_free_descriptors(2 * HELD + 1, &[echo.addr], &args);
    let held: Vec<_> = (0..HELD).map(|i| hello_client(lb.addr, i)).collect();
    let mut waiting = connect(lb.addr);
    waiting.write_all(b"hello").expect("write");
    assert!(wait_until(WAIT, || free(&lb) == 0), "the client was not accepted");
    lb.signal(libc::SIGTERM);
    let draining = format!("worker 0: draining {} connections", HELD + 1);
    assert!(lb.wait_stderr(|l| l.contains(&draining), WAIT), "{}", lb.stderr_text());
    // The listener closed for the drain frees the descriptor it waits for.
    let mut b = [0u8; 5];
    waiting.read_exact(&mut b).expect("the waiting client is served");
    assert_eq!(&b, b"hello");
    drop((held, waiting));
    let status = lb.wait_exit(WAIT).expect("lb exits once drained");
    assert_eq!(status.code(), Some(0), "{}", lb.stderr_text());
}

#[test]
fn a_client_waiting_for_a_descriptor_is_reset_after_the_connection_timeout() {
    // Clients waiting in two workers, each holding the descriptor the
    // other waits for, never moved: nothing bounded the wait. (Whether it
    // was accepted before the reset is not checked: the window is short.)
    let echo = echo_backend();
    let args = [&ONE_WORKER_PAST_THE_LIMIT[..], &["--connection-timeout", "0.3", "--admin", "127.0.0.1:0"]].concat();
    const HELD: usize = 3;
    let (lb, free) = lb_with_free_descriptors(2 * HELD + 1, &[echo.addr], &args);
    let admin = common::admin::admin_addr(&lb);
    let mut held: Vec<_> = (0..HELD).map(|i| hello_client(lb.addr, i)).collect();
    let mut waiting = connect(lb.addr);
    waiting.write_all(b"hello").expect("write");
    let mut b = [0u8; 5];
    let cut = waiting.read(&mut b).map_err(|e| e.kind());
    assert_eq!(cut, Err(std::io::ErrorKind::ConnectionReset), "{}", lb.stderr_text());
    // Counted, and lb serves clients again once descriptors free: enough
    // that neither the scrape nor the next client waits.
    drop(held.pop());
    assert!(wait_until(WAIT, || free(&lb) >= 3), "the held pair was not closed");
    let timeouts = common::admin::scrape(admin).value("lb_connections_descriptor_wait_timeouts_total", &[]);
    assert_eq!(timeouts, 1.0);
    assert!(wait_until(WAIT, || free(&lb) >= 3), "the scrape's connection was not closed");
    hello_client(lb.addr, HELD);
}

#[test]
fn no_worker_accepts_while_a_client_in_another_waits_for_a_descriptor() {
    // Each client accepted then would take the descriptor the waiting one
    // needs. Before, the other worker accepted (and failed to, EMFILE), and
    // with two descriptors free each worker could hold one waiting client,
    // resetting it after the timeout and taking its descriptor back at
    // once, so that the clients of both were reset over and over.
    let echo = echo_backend();
    let args = [&ONE_WORKER_PAST_THE_LIMIT[2..], &["--workers", "2", "--connection-timeout", "30"]].concat();
    const HELD: usize = 16;
    let (lb, free) = lb_with_free_descriptors(2 * HELD + 1, &[echo.addr], &args);
    let held: Vec<_> = (0..HELD).map(|i| hello_client(lb.addr, i)).collect();
    let mut waiting = connect(lb.addr);
    waiting.write_all(b"hello").expect("write");
    assert!(wait_until(WAIT, || free(&lb) == 0), "the client was not accepted");
    // Logged once the client is marked as waiting.
    let warned = wait_until(WAIT, || lb.stderr_text().contains("connect to "));
    assert!(warned, "no descriptor shortage was met: {}", lb.stderr_text());
    // As many as the held clients' descriptors serve with the waiting
    // one's. Some land on the other worker's listener (SO_REUSEPORT
    // spreads them by address: all fifteen on the waiting client's, which
    // would hide an accept by the other, 1 time in 32768).
    let mut later: Vec<_> = (1..HELD).map(|_| connect(lb.addr)).collect();
    for c in &mut later {
        c.write_all(b"hello").expect("write");
    }
    let tried = wait_until(Duration::from_secs(1), || lb.stderr_text().contains("accept: "));
    assert!(!tried, "a worker accepted while a client waited: {}", lb.stderr_text());
    drop(held);
    let mut b = [0u8; 5];
    waiting.read_exact(&mut b).expect("the waiting client is served");
    for (i, c) in later.iter_mut().enumerate() {
        c.read_exact(&mut b).unwrap_or_else(|e| panic!("client {i} after it: {e}\n{}", lb.stderr_text()));
        assert_eq!(&b, b"hello");
    }
}

/// One worker, so one loop holds every descriptor, and a cap given past
/// the descriptor limit, so it is kept; no probe or pipe takes
/// descriptors meanwhile.
const ONE_WORKER_PAST_THE_LIMIT: [&str; 7] =
    ["--workers", "1", "--max-connections", "1000", "--no-health-check", "--splice", "never"];

/// Sends "hello" and reads it back.
fn hello(s: &mut std::net::TcpStream) -> std::io::Result<[u8; 5]> {
    s.write_all(b"hello")?;
    let mut b = [0u8; 5];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// A client served through `addr`, kept open.
fn hello_client(addr: std::net::SocketAddr, i: usize) -> std::net::TcpStream {
    let mut c = connect(addr);
    assert_eq!(hello(&mut c).unwrap_or_else(|e| panic!("client {i}: {e}")), *b"hello");
    c
}

/// lb under the descriptor limit that leaves it `room` descriptors once
/// started, and how many it has free now. Descriptors it inherited above
/// the limit (a test runner's jobserver pipe, say) take no room.
fn lb_with_free_descriptors(
    room: usize,
    backends: &[std::net::SocketAddr],
    args: &[&str],
) -> (Proc, impl Fn(&Proc) -> usize + use<>) {
    let open = open_descriptors(&lb_with_fd_limit(1024, backends, args));
    let limit = (1..1024).find(|&l| l - open.iter().filter(|&&fd| fd < l).count() == room).expect("a limit");
    let free = move |lb: &Proc| limit - open_descriptors(lb).iter().filter(|&&fd| fd < limit).count();
    let lb = lb_with_fd_limit(limit as u32, backends, args);
    assert_eq!(free(&lb), room, "lb holds the same descriptors under any limit");
    (lb, free)
}

/// The descriptor numbers `p` has open.
fn open_descriptors(p: &Proc) -> Vec<usize> {
    std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
        .expect("list descriptors")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Forty clients at once, each holding its connection a little, through
/// lb under two adjacent descriptor limits far below what the given cap
/// needs (the cap is given, so kept). One limit leaves lb a last
/// descriptor that accept() takes and the backend socket then finds none.
fn every_client_is_served_at_the_descriptor_limit(echo: &Backend, backends: &[std::net::SocketAddr], extra: &[&str]) {
    for limit in [40, 41] {
        let mut args = ONE_WORKER_PAST_THE_LIMIT.to_vec();
        args.extend(extra);
        let before = echo.gauge.accepted.load(Ordering::SeqCst);
        let lb = lb_with_fd_limit(limit, backends, &args);
        let failed = hello_clients(lb.addr, 40, Duration::from_millis(200));
        assert!(failed.is_empty(), "limit {limit}: {failed:?}\n{}", lb.stderr_text());
        assert_eq!(echo.gauge.accepted.load(Ordering::SeqCst) - before, 40, "limit {limit}");
        assert!(
            lb.wait_stderr(|l| l.contains("Too many open files"), WAIT),
            "limit {limit} was never reached: {}",
            lb.stderr_text()
        );
    }
}

#[test]
fn a_descriptor_limit_too_low_for_the_default_cap_lowers_it_so_no_waiting_client_is_dropped() {
    // Before, lb accepted a client with the last descriptor and then closed
    // it, unserved, for want of one for its backend socket (which of two
    // adjacent limits did so depended on the descriptors' parity).
    for limit in [60, 61] {
        let echo = echo_backend();
        let lb = lb_with_fd_limit(limit, &[echo.addr], &["--workers", "2", "--no-health-check"]);
        let line = format!("the descriptor limit ({limit}) is too low for 1000 connections");
        assert!(lb.wait_stderr(|e| e.contains(&line), WAIT), "limit {limit}: {}", lb.stderr_text());
        let cap: usize = lb
            .stderr_text()
            .split("serving at most ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("the lowered cap is logged");
        let failed = hello_clients(lb.addr, 3 * cap, Duration::from_millis(100));
        assert!(failed.is_empty(), "limit {limit}: {failed:?}\n{}", lb.stderr_text());
        assert_eq!(echo.gauge.accepted.load(Ordering::SeqCst), 3 * cap, "limit {limit}");
        assert!(echo.gauge.peak.load(Ordering::SeqCst) <= cap, "limit {limit}: more than {cap} at once");
        assert!(!lb.stderr_text().contains("Too many open files"), "limit {limit}: {}", lb.stderr_text());
    }
}

#[test]
fn a_lowered_max_pipes_is_logged_before_the_descriptor_limit_lowers_it_again() {
    // The --max-pipes note names what the command line settled on; the
    // descriptor note, which may lower that again, has to come after it or
    // the log ends on a pipe count lb does not use.
    let echo = echo_backend();
    let lb = lb_with_fd_limit(60, &[echo.addr], &["--workers", "1", "--no-health-check", "--max-pipes", "5000"]);
    let fd_line = "the descriptor limit (60) is too low for 1000 connections and 2000 pipes";
    assert!(lb.wait_stderr(|e| e.contains(fd_line), WAIT), "{}", lb.stderr_text());
    let log = lb.stderr_text();
    let pipes = log.find("--max-pipes: '5000' is more than two per connection").expect("the --max-pipes note");
    assert!(pipes < log.find(fd_line).expect("the descriptor note"), "{log}");
}
