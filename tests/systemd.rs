//! Socket activation seen from outside: lb serves every listening socket
//! systemd passes (LISTEN_FDS), and refuses at start-up, in one line, more
//! than it can serve rather than leave some unserved.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;

use common::*;

/// Starts lb as systemd would with `listeners` as fds 3.. (LISTEN_FDS,
/// LISTEN_PID set by a shell that then execs lb, so the pid matches). The
/// test keeps its own copies open, as systemd does. Returns the child and
/// its stderr lines.
fn activated(listeners: &[TcpListener], extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    activated_after(listeners, extra, "")
}

/// As [`activated`], with `setup` run by the shell first (e.g. a ulimit).
fn activated_after(listeners: &[TcpListener], extra: &[&str], setup: &str) -> (Child, mpsc::Receiver<String>) {
    let raw: Vec<i32> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("{setup}LISTEN_PID=$$ LISTEN_FDS={} exec \"$0\" \"$@\"", raw.len()))
        .arg(lb_bin())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    pass_fds_from_3(&mut cmd, raw);
    let mut child = cmd.spawn().expect("spawn lb");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// The exit status of an lb that must fail to start, and every line it
/// wrote, up to the EOF its exit gave the reader thread.
fn failed_start((mut child, lines): (Child, mpsc::Receiver<String>)) -> (std::process::ExitStatus, Vec<String>) {
    let exited = wait_until(WAIT, || matches!(child.try_wait(), Ok(Some(_))));
    let _ = child.kill();
    let status = child.wait().expect("wait");
    assert!(exited, "lb started anyway");
    (status, lines.iter().collect())
}

fn loopback_listeners(n: usize) -> Vec<TcpListener> {
    (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect()
}

#[test]
fn every_socket_systemd_passes_is_served() {
    let echo = echo_backend();
    // More than the 8 an earlier lb kept, silently dropping the rest.
    let ls = loopback_listeners(9);
    let (mut child, lines) = activated(&ls, &["--workers", "2", "--no-health-check", "-b", &echo.addr.to_string()]);
    let started = std::iter::from_fn(|| lines.recv_timeout(WAIT).ok()).find(|l| l.contains("listening on"));
    let served: Vec<bool> = ls
        .iter()
        .map(|l| {
            let mut c = TcpStream::connect_timeout(&l.local_addr().expect("addr"), WAIT).expect("connect");
            c.set_read_timeout(Some(WAIT)).expect("timeout");
            let mut got = [0u8; 4];
            c.write_all(b"ping").is_ok() && c.read_exact(&mut got).is_ok() && &got == b"ping"
        })
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    let started = started.expect("lb did not start");
    // The start-up line names every address served, not just the first.
    let named: Vec<bool> = ls.iter().map(|l| started.contains(&l.local_addr().expect("addr").to_string())).collect();
    assert!(named.iter().all(|&n| n), "named per passed socket: {named:?} in {started:?}");
    assert!(served.iter().all(|&s| s), "served per passed socket: {served:?}");
}

#[test]
fn more_sockets_than_lb_serves_is_a_one_line_error() {
    let ls = loopback_listeners(65);
    // Under a descriptor limit too low for 4 copies of each: raising it
    // would not help, so that is not what lb asks for.
    let (status, err) = failed_start(activated_after(
        &ls,
        &["--no-health-check", "--workers", "4", "-b", "127.0.0.1:9"],
        "ulimit -n 200 && ",
    ));
    assert!(!status.success());
    assert_eq!(err.len(), 1, "one line: {err:?}");
    assert!(err[0].contains("65 listening sockets") && err[0].contains("at most 64"), "{}", err[0]);
}

#[test]
fn each_worker_s_copy_of_each_passed_socket_counts_against_the_descriptor_limit() {
    // What lb asks the limit to be, with one passed socket and with two:
    // four workers hold a copy of each, so the second costs four more.
    let needed = |sockets: usize| {
        let ls = loopback_listeners(sockets);
        let (_, err) = failed_start(activated_after(
            &ls,
            &["--no-health-check", "--workers", "4", "-b", "127.0.0.1:9"],
            "ulimit -n 20 && ",
        ));
        let line = err.first().cloned().unwrap_or_default();
        let n = line.split("raise it (ulimit -n, LimitNOFILE=) to ").nth(1).and_then(|r| r.split(' ').next());
        n.and_then(|n| n.parse::<usize>().ok()).unwrap_or_else(|| panic!("no limit asked for: {err:?}"))
    };
    assert_eq!(needed(2), needed(1) + 4);
}

#[test]
fn an_admin_address_that_overlaps_a_passed_socket_is_refused() {
    // The passed socket is lb's listening address, whatever --port says.
    let ls = loopback_listeners(1);
    let listen = ls[0].local_addr().expect("addr").to_string();
    let (status, err) = failed_start(activated(&ls, &["--no-health-check", "-b", "127.0.0.1:9", "--admin", &listen]));
    assert_eq!(status.code(), Some(2), "{err:?}");
    assert_eq!(
        err,
        [format!(
            "error: --admin: {listen} overlaps lb's own listening address ({listen}); give one of them another port"
        )]
    );
}

#[test]
fn a_start_up_failure_after_taking_the_passed_sockets_is_one_line() {
    // The sockets are fine; the --admin port is taken. Nothing may be
    // logged before the error (such as the note that the passed sockets
    // are used), so the journal shows the failure as one line.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = held.local_addr().expect("addr").to_string();
    let ls = loopback_listeners(1);
    let (status, err) = failed_start(activated(&ls, &["--no-health-check", "-b", "127.0.0.1:9", "--admin", &admin]));
    assert_eq!(status.code(), Some(1));
    assert_eq!(err.len(), 1, "one line: {err:?}");
    assert!(err[0].starts_with("error: --admin: cannot listen on"), "{}", err[0]);
}
