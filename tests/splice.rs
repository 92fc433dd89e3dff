//! The splice relay end to end, in every `--splice` mode: byte-exact bulk
//! transfer both ways over many connections, a half-close with bytes still
//! in a pipe, a backend reset while a pipe holds bytes, pipe exhaustion,
//! descriptors (pipes included) returning once traffic ends, how each
//! mode splits the bytes between splice and copy (read from `/metrics`),
//! and TCP urgent data in the middle of a bulk flow and just before its end.
//! Health probes are off throughout: they would be extra backend
//! connections and descriptors.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{admin_addr, scrape};
use common::*;

/// lb in front of `backends` with splice `mode`, no probes, and an admin
/// endpoint to read the relay counters from.
fn lb_splice(backends: &[SocketAddr], mode: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["--splice", mode, "--no-health-check", "--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let lb = lb(backends, &args);
    let admin = admin_addr(&lb);
    (lb, admin)
}

/// Bytes relayed so far, as (spliced, copied), once they add up to `total`
/// (workers publish them about once a second).
fn relayed(admin: SocketAddr, total: u64) -> (u64, u64) {
    let mut last = (0, 0);
    let settled = wait_until(WAIT, || {
        let m = scrape(admin);
        last = (
            m.value("lb_relayed_bytes_total", &[("method", "splice")]) as u64,
            m.value("lb_relayed_bytes_total", &[("method", "copy")]) as u64,
        );
        last.0 + last.1 == total
    });
    assert!(settled, "relayed (spliced, copied) = {last:?}, expected {total} in all");
    last
}

fn fallbacks(admin: SocketAddr, reason: &str) -> u64 {
    scrape(admin).value("lb_splice_fallbacks_total", &[("reason", reason)]) as u64
}

/// Pipe descriptors lb holds (its stdout and stderr are pipes too).
fn pipe_fds(lb: &Proc) -> usize {
    pipe_fds_of(lb.pid())
}

fn pipe_fds_of(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    dir.filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:")))
        .count()
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
    let (lb, admin) = lb_splice(&[echo.addr], mode, &[]);
    let total = echo_many(lb.addr, 16, 0x5eed);
    let (spliced, copied) = relayed(admin, total);
    match mode {
        "never" => assert_eq!(spliced, 0, "--splice never spliced"),
        // The default --max-pipes (250) covers 16 pairs, so nothing copies.
        "always" => assert_eq!(copied, 0, "--splice always copied"),
        // Whether these flows look bulk depends on timing; the split is
        // checked where the traffic makes it certain.
        _ => {}
    }
    assert_eq!(fallbacks(admin, "unsupported"), 0, "TCP sockets can splice");
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
    let (lb, admin) = lb_splice(&[backend.addr], mode, &[]);
    let idle_pipes = pipe_fds(&lb);
    let c = connect(lb.addr);
    let mut r = c.try_clone().expect("clone");
    let data = random_bytes(SENT, 10);
    let (written, done) = writer(c, data.clone(), 1);
    // Everything the kernel buffers is queued and lb holds the rest
    // (possibly with the FIN behind it) when the backend starts reading.
    assert!(wait_stalled(&written), "the writer neither stalled nor finished");
    if mode == "never" {
        assert!(
            wait_until(WAIT, || scrape(admin).value("lb_buffers_in_use", &[]) >= 1.0),
            "lb_buffers_in_use never showed the held buffer"
        );
    }
    if mode == "always" {
        // The stalled direction's pipe holds bytes: it must not be given
        // back, and the FIN must wait behind it.
        assert!(pipe_fds(&lb) > idle_pipes, "no pipe holds the stalled bytes");
        assert!(
            wait_until(WAIT, || scrape(admin).value("lb_pipes_in_use", &[]) >= 1.0),
            "lb_pipes_in_use never showed the held pipe"
        );
    }
    go_tx.send(()).expect("backend waiting");
    let got = got_rx.recv_timeout(WAIT).expect("the backend saw EOF");
    assert_eq!(got.len(), SENT, "bytes before the half-close");
    assert!(got == data, "request bytes differ");
    let mut reply = Vec::new();
    r.read_to_end(&mut reply).expect("client reads the reply to EOF");
    assert_eq!(reply.len(), REPLY);
    assert!(reply == random_bytes(REPLY, 11), "reply bytes differ");
    assert!(done.recv_timeout(WAIT).expect("writer ended").is_ok());
    let (spliced, _) = relayed(admin, (SENT + REPLY) as u64);
    // Everything went back to the pools (the gauges lag by up to a second).
    let returned = wait_until(WAIT, || {
        let m = scrape(admin);
        m.value("lb_buffers_in_use", &[]) == 0.0 && m.value("lb_pipes_in_use", &[]) == 0.0
    });
    assert!(returned, "buffers or pipes still lent after the transfer");
    if mode == "never" {
        assert!(scrape(admin).value("lb_buffers_allocated", &[]) >= 1.0, "the copies used no buffer");
    }
    match mode {
        "never" => assert_eq!(spliced, 0),
        // The backlog behind the stall is read in full buffers: bulk.
        _ => assert!(spliced > 0, "--splice {mode} never spliced a stalled 8 MiB upload"),
    }
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
    let (lb, _admin) = lb_splice(&[backend.addr], mode, &[]);
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
    // lb refuses pipes it could never use: `never` keeps its default count.
    let one_pipe: &[&str] = if mode == "never" { &[] } else { &["--max-pipes", "1"] };
    let (lb, admin) = lb_splice(&[echo.addr], mode, one_pipe);
    let idle_pipes = pipe_fds(&lb);
    let most = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (most, stop, pid) = (Arc::clone(&most), Arc::clone(&stop), lb.pid());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                most.fetch_max(pipe_fds_of(pid), Ordering::SeqCst);
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let total = echo_many(lb.addr, 20, 0xfa11);
    stop.store(true, Ordering::SeqCst);
    watcher.join().expect("watcher");
    assert!(
        most.load(Ordering::SeqCst) <= idle_pipes + 2,
        "one pipe (two descriptors) at most, saw {} pipe descriptors beyond the idle {idle_pipes}",
        most.load(Ordering::SeqCst).saturating_sub(idle_pipes)
    );
    let (spliced, copied) = relayed(admin, total);
    let no_pipe = fallbacks(admin, "no_pipe");
    match mode {
        "never" => assert_eq!((spliced, no_pipe), (0, 0), "--splice never wanted no pipe"),
        // 40 directions want a pipe from the first byte; one pipe serves
        // one at a time, so the others copy and are counted.
        "always" => {
            assert!(no_pipe > 0, "no fallback counted");
            assert!(spliced > 0 && copied > 0, "(spliced, copied) = {:?}", (spliced, copied));
        }
        _ => {}
    }
}

fn descriptors_return_to_the_idle_count_after_bulk_traffic_and_resets(mode: &str) {
    let echo = echo_backend();
    let (lb, _admin) = lb_splice(&[echo.addr], mode, &[]);
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

/// One connection that chats, downloads in bulk, then chats again: `auto`
/// copies the small messages, splices the download and goes back to
/// copying; `never` copies all of it and `always` splices all of it.
fn small_messages_copy_and_a_bulk_download_splices(mode: &str) {
    const BULK: usize = 8 << 20;
    const MSG: usize = 100;
    const ROUNDS: usize = 50;
    let progress = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&progress);
    // Echoes each message; `bulk` instead gets BULK bytes back.
    let backend = backend(move |mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let r = if &buf[..n] == b"bulk" {
                random_bytes(BULK, 21).chunks(64 * 1024).try_for_each(|c| {
                    s.write_all(c)?;
                    p.fetch_add(c.len(), Ordering::SeqCst);
                    Ok::<(), std::io::Error>(())
                })
            } else {
                s.write_all(&buf[..n])
            };
            if r.is_err() {
                return;
            }
        }
    });
    // The chat would move the pair into the kernel relay, which lb cannot
    // splice out of again (tests/kernel_relay.rs covers that case).
    let (lb, admin) = lb_splice(&[backend.addr], mode, &["--kernel-relay", "never"]);
    let mut c = connect(lb.addr);
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    let chat = |c: &mut TcpStream, seed: u64| {
        for i in 0..ROUNDS as u64 {
            let msg = random_bytes(MSG, seed + i);
            c.write_all(&msg).expect("send a message");
            assert!(read_n(c, MSG) == msg, "message {i} echoed wrong");
        }
    };
    chat(&mut c, 100);
    let mut total = (2 * MSG * ROUNDS) as u64;
    let (spliced, _) = relayed(admin, total);
    match mode {
        "always" => assert_eq!(spliced, total, "--splice always copied"),
        _ => assert_eq!(spliced, 0, "--splice {mode} spliced {MSG}-byte messages"),
    }

    c.write_all(b"bulk").expect("ask for the download");
    // Not reading until the backend is stalled: a backlog of megabytes
    // waits behind lb, so its reads fill the buffer (a bulk flow).
    assert!(wait_stalled(&progress), "the backend neither stalled nor finished");
    assert!(read_n(&mut c, BULK) == random_bytes(BULK, 21), "download bytes differ");
    total += (4 + BULK) as u64;
    let (after_bulk, _) = relayed(admin, total);
    match mode {
        "never" => assert_eq!(after_bulk, 0),
        "always" => assert_eq!(after_bulk, total),
        _ => assert!(after_bulk >= (BULK / 2) as u64, "auto spliced only {after_bulk} of an {BULK}-byte download"),
    }

    chat(&mut c, 200);
    total += (2 * MSG * ROUNDS) as u64;
    let (spliced, _) = relayed(admin, total);
    match mode {
        "never" => assert_eq!(spliced, 0),
        "always" => assert_eq!(spliced, total),
        // A few small splices show the flow turned small; then it copies.
        _ => assert!(
            spliced - after_bulk <= (MSG * splice_back_allowance()) as u64,
            "auto kept splicing small messages: {} bytes after the download",
            spliced - after_bulk
        ),
    }
}

/// A download the client keeps up with, sent in small writes with pauses,
/// so that lb reads each as it lands and no read fills its buffer: `auto`
/// still splices it once a mebibyte has gone one way with no reply.
fn a_one_way_flow_lb_keeps_up_with_splices_all_the_same(mode: &str) {
    const CHUNK: usize = 8 * 1024;
    const CHUNKS: usize = 512; // 4 MiB
    let backend = backend(move |mut s| {
        let mut go = [0u8; 2];
        if s.read_exact(&mut go).is_err() {
            return;
        }
        let data = random_bytes(CHUNK * CHUNKS, 31);
        for c in data.chunks(CHUNK) {
            if s.write_all(c).is_err() {
                return;
            }
            thread::sleep(Duration::from_micros(200));
        }
    });
    let (lb, admin) = lb_splice(&[backend.addr], mode, &[]);
    let mut c = connect(lb.addr);
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    c.write_all(b"go").expect("ask for the download");
    assert!(read_n(&mut c, CHUNK * CHUNKS) == random_bytes(CHUNK * CHUNKS, 31), "download bytes differ");
    let total = (2 + CHUNK * CHUNKS) as u64;
    let (spliced, _) = relayed(admin, total);
    match mode {
        "never" => assert_eq!(spliced, 0),
        "always" => assert_eq!(spliced, total),
        _ => assert!(
            spliced >= (2 * CHUNK * CHUNKS / 3) as u64,
            "auto spliced only {spliced} of a {}-byte one-way flow in {CHUNK}-byte writes",
            CHUNK * CHUNKS
        ),
    }
}

fn urgent_data_in_a_bulk_flow_is_stepped_over_without_a_stall(mode: &str) {
    // splice(2) stops at TCP's urgent mark and returns EAGAIN there for
    // good; read(2) steps over the urgent byte. A backlog behind lb makes
    // auto splice by the time the mark arrives; always splices from the
    // start. The urgent byte itself is out of band and lb does not relay
    // it; every other byte must arrive, without the backend sending more.
    const BULK: usize = 4 << 20;
    let progress = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&progress);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = Mutex::new(done_rx);
    let backend = backend(move |mut s| {
        let r = (|| {
            for c in random_bytes(BULK, 33).chunks(64 * 1024) {
                s.write_all(c)?;
                p.fetch_add(c.len(), Ordering::SeqCst);
            }
            let sock = socket2::SockRef::from(&*s);
            sock.send_with_flags(b"!", libc::MSG_OOB)?;
            s.write_all(b"after the mark")
        })();
        if r.is_ok() {
            // Silent and open until the client has read it all.
            let _ = done_rx.lock().expect("receiver").recv_timeout(Duration::from_secs(30));
        }
    });
    let (lb, admin) = lb_splice(&[backend.addr], mode, &[]);
    let mut c = connect(lb.addr);
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    assert!(wait_stalled(&progress), "the backend neither stalled nor finished");
    assert!(read_n(&mut c, BULK) == random_bytes(BULK, 33), "bulk bytes differ");
    assert_eq!(read_n(&mut c, 14), b"after the mark");
    let _ = done_tx.send(());
    if mode == "always" {
        // Workers publish the counter about once a second.
        let counted = wait_until(WAIT, || fallbacks(admin, "unsupported") >= 1);
        assert!(counted, "the urgent mark did not move the flow to copying");
    }
}

fn urgent_data_just_before_the_fin_does_not_cut_the_stream_short(mode: &str) {
    // Once the FIN is in, splice(2) returns 0 at an urgent mark, as at the
    // end of the stream, when lb has not yet seen the event announcing the
    // urgent data. That happens when mark and FIN arrive while a pump is
    // splicing, so the race is run over many connections.
    const BULK: usize = 1 << 20;
    const TAIL: &[u8] = b"after the mark";
    let backend = backend(|mut s| {
        let r = (|| {
            for c in random_bytes(BULK, 41).chunks(64 * 1024) {
                s.write_all(c)?;
            }
            socket2::SockRef::from(&*s).send_with_flags(b"!", libc::MSG_OOB)?;
            s.write_all(TAIL)?;
            s.shutdown(Shutdown::Write)
        })();
        if r.is_ok() {
            let _ = s.read_to_end(&mut Vec::new());
        }
    });
    let (lb, _admin) = lb_splice(&[backend.addr], mode, &[]);
    let mut want = random_bytes(BULK, 41);
    want.extend_from_slice(TAIL);
    let mut short = Vec::new();
    for i in 0..20 {
        let mut c = connect(lb.addr);
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("the client reads to the EOF");
        if got != want {
            short.push((i, got.len()));
        }
    }
    assert!(short.is_empty(), "streams that ended early (connection, bytes of {}): {short:?}", want.len());
}

/// Small messages auto may still splice after a bulk flow before it
/// notices the flow turned small (lb's SMALL_READS_TO_COPY, with room).
fn splice_back_allowance() -> usize {
    16
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
    small_messages_copy_and_a_bulk_download_splices,
    a_one_way_flow_lb_keeps_up_with_splices_all_the_same,
    urgent_data_in_a_bulk_flow_is_stepped_over_without_a_stall,
    urgent_data_just_before_the_fin_does_not_cut_the_stream_short,
);
