//! The splice relay end to end, in every `--splice` mode: byte-exact bulk
//! transfer both ways over many connections, a half-close with bytes still
//! in a pipe, a backend reset while a pipe holds bytes, pipe exhaustion,
//! and descriptors (pipes included) returning once traffic ends.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Pipe descriptors lb holds (its stdout and stderr are pipes too).
fn pipe_fds(lb: &Proc) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", lb.pid())) else { return 0 };
    dir.filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:")))
        .count()
}

/// Runs `data.len()` bytes through an echo and checks them, over `n`
/// concurrent connections of 1–4 MiB each.
fn echo_many(addr: SocketAddr, n: u64, seed: u64) {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || {
                let len = (1 << 20) + (i as usize * 397_643) % (3 << 20);
                let data = random_bytes(len, seed + i);
                let got = echo_roundtrip(addr, &data);
                assert_eq!(got.len(), data.len(), "connection {i} length");
                assert!(got == data, "connection {i} bytes differ");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("transfer thread");
    }
}

/// Writes `data` `times` times on a thread, counting progress, then
/// half-closes.
fn writer(mut s: TcpStream, data: Vec<u8>, times: usize) -> (Arc<AtomicUsize>, mpsc::Receiver<std::io::Result<()>>) {
    let written = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let w = Arc::clone(&written);
    thread::spawn(move || {
        let r = (|| {
            for _ in 0..times {
                for chunk in data.chunks(64 * 1024) {
                    s.write_all(chunk)?;
                    w.fetch_add(chunk.len(), Ordering::SeqCst);
                }
            }
            s.shutdown(Shutdown::Write)
        })();
        let _ = tx.send(r);
    });
    (written, rx)
}

/// Waits until `written` stops growing: the writer finished, or every
/// buffer on the way is full.
fn wait_stalled(written: &AtomicUsize) -> bool {
    let mut last = usize::MAX;
    wait_until(WAIT, || {
        let now = written.load(Ordering::SeqCst);
        let still = now == last && now > 0;
        last = now;
        if !still {
            thread::sleep(Duration::from_millis(150));
        }
        still
    })
}

fn relays_random_bytes_exactly_over_16_concurrent_connections(mode: &str) {
    let echo = echo_backend();
    let lb = lb(&[echo.addr], &["--splice", mode, "--no-health-check"]);
    echo_many(lb.addr, 16, 0x5eed);
}

fn a_half_close_waits_for_the_pipe_to_drain_and_the_reply_still_arrives(mode: &str) {
    const SENT: usize = 8 << 20;
    const REPLY: usize = 1 << 20;
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Arc::new(Mutex::new(go_rx));
    let (got_tx, got_rx) = mpsc::channel::<Vec<u8>>();
    let got_tx = Mutex::new(got_tx);
    let backend = backend(move |mut s| {
        // Not reading yet: lb's pipe or buffer fills behind us.
        let _ = go_rx.lock().expect("go lock").recv_timeout(WAIT);
        let mut got = Vec::with_capacity(SENT);
        if s.read_to_end(&mut got).is_err() {
            return;
        }
        let _ = got_tx.lock().expect("got lock").send(got);
        let _ = s.write_all(&random_bytes(REPLY, 11));
    });
    let lb = lb(&[backend.addr], &["--splice", mode, "--no-health-check"]);
    let c = connect(lb.addr);
    let mut r = c.try_clone().expect("clone");
    let data = random_bytes(SENT, 10);
    let (written, done) = writer(c, data.clone(), 1);
    // Everything the kernel buffers is queued and lb holds the rest
    // (possibly with the FIN behind it) when the backend starts reading.
    assert!(wait_stalled(&written), "the writer neither stalled nor finished");
    go_tx.send(()).expect("backend waiting");
    let got = got_rx.recv_timeout(WAIT).expect("the backend saw EOF");
    assert_eq!(got.len(), SENT, "bytes before the half-close");
    assert!(got == data, "request bytes differ");
    let mut reply = Vec::new();
    r.read_to_end(&mut reply).expect("client reads the reply to EOF");
    assert_eq!(reply.len(), REPLY);
    assert!(reply == random_bytes(REPLY, 11), "reply bytes differ");
    assert!(done.recv_timeout(WAIT).expect("writer ended").is_ok());
}

fn a_backend_reset_while_lb_holds_bytes_ends_the_client_promptly(mode: &str) {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Arc::new(Mutex::new(go_rx));
    let first = AtomicUsize::new(0);
    let backend = backend(move |mut s| {
        if first.fetch_add(1, Ordering::SeqCst) > 0 {
            // Later connections: a plain echo, to show lb still serves.
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            return;
        }
        // Never read; on the signal, reset.
        let _ = go_rx.lock().expect("go lock").recv_timeout(WAIT);
        socket2::SockRef::from(&*s).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(s);
    });
    let lb = lb(&[backend.addr], &["--splice", mode, "--no-health-check"]);
    let idle_pipes = pipe_fds(&lb);
    let c = connect(lb.addr);
    let mut r = c.try_clone().expect("clone");
    // Far more than every socket buffer on the way can hold (tcp_rmem may
    // let each grow to 32 MiB), so the writer is still busy at the reset.
    let (written, done) = writer(c, random_bytes(1 << 20, 12), 512);
    assert!(wait_stalled(&written), "the writer never stalled");
    let holding = pipe_fds(&lb);
    if mode == "never" {
        assert_eq!(holding, idle_pipes, "--splice never opened a pipe");
    } else {
        assert!(holding > idle_pipes, "a stalled bulk flow holds a pipe with --splice {mode}");
    }
    go_tx.send(()).expect("backend waiting");
    let started = Instant::now();
    r.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = [0u8; 1024];
    let ended = match r.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("the echo-less backend sent {n} bytes"),
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    };
    assert!(ended, "the client still saw an open connection after {:?}", started.elapsed());
    assert!(done.recv_timeout(WAIT).expect("writer ended").is_err(), "the cut stream was not reported as complete");
    let data = random_bytes(3 << 20, 13);
    assert!(echo_roundtrip(lb.addr, &data) == data, "lb still relays after the reset");
}

fn running_out_of_pipes_falls_back_to_copying_without_loss(mode: &str) {
    let echo = echo_backend();
    let lb = lb(&[echo.addr], &["--splice", mode, "--max-pipes", "1", "--no-health-check"]);
    let idle_pipes = pipe_fds(&lb);
    echo_many(lb.addr, 20, 0xfa11);
    assert!(pipe_fds(&lb) <= idle_pipes + 2, "one pipe (two descriptors) at most");
}

fn descriptors_return_to_the_idle_count_after_bulk_traffic_and_resets(mode: &str) {
    let echo = echo_backend();
    let lb = lb(&[echo.addr], &["--splice", mode, "--no-health-check"]);
    let no_pipes = pipe_fds(&lb);
    // Warm up (lazily created descriptors) with a pair lb closes once the
    // echo's EOF reached the client.
    let mut w = connect(lb.addr);
    w.write_all(&random_bytes(1 << 20, 1)).expect("warm-up write");
    w.shutdown(Shutdown::Write).expect("shutdown");
    let mut sink = Vec::new();
    w.read_to_end(&mut sink).expect("warm-up echo");
    drop(w);
    // Idle pipes are closed after a quiet second or two.
    assert!(wait_until(WAIT, || pipe_fds(&lb) == no_pipes), "idle pipes were never closed");
    let mut last = 0;
    assert!(wait_until(WAIT, || {
        let now = lb.fd_count();
        std::mem::replace(&mut last, now) == now
    }));
    let idle = last;
    assert!(idle > 0, "fd count readable");
    echo_many(lb.addr, 8, 0xfd);
    // Clients that vanish mid-transfer, leaving bytes in lb's pipes.
    for i in 0..8u64 {
        let mut s = connect(lb.addr);
        s.write_all(&random_bytes(1 << 20, i)).expect("write");
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(s);
    }
    assert!(
        wait_until(WAIT, || lb.fd_count() == idle),
        "lb holds {} descriptors ({} pipes), {idle} when idle",
        lb.fd_count(),
        pipe_fds(&lb)
    );
}

macro_rules! in_every_mode {
    ($($scenario:ident),* $(,)?) => {
        mod never {
            $( #[test] fn $scenario() { super::$scenario("never") } )*
        }
        mod auto {
            $( #[test] fn $scenario() { super::$scenario("auto") } )*
        }
        mod always {
            $( #[test] fn $scenario() { super::$scenario("always") } )*
        }
    };
}

in_every_mode!(
    relays_random_bytes_exactly_over_16_concurrent_connections,
    a_half_close_waits_for_the_pipe_to_drain_and_the_reply_still_arrives,
    a_backend_reset_while_lb_holds_bytes_ends_the_client_promptly,
    running_out_of_pipes_falls_back_to_copying_without_loss,
    descriptors_return_to_the_idle_count_after_bulk_traffic_and_resets,
);
