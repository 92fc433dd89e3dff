//! lb out of local ports: once every ephemeral port to a backend is in use,
//! connect() fails with EADDRNOTAVAIL. That is lb's own shortage, not the
//! backend's: the client that found no port is closed, but the backend is
//! not counted as failing, so it stays up and serves the next client as soon
//! as a port is free.
//!
//! The shortage is made for real: lb and its backend run in a network (and
//! pid) namespace of their own whose ephemeral port range is two ports wide.
//! Clients reach lb through a listener made here and passed to it as systemd
//! passes sockets.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use common::*;

/// What the backend answers with: its `-c` name and a newline.
const BODY: &[u8] = b"ports-test-backend\n";

/// Runs in the namespace: loopback up, the backend started and answering,
/// then the port range narrowed to two ports and lb exec'd (as pid 1 of the
/// pid namespace, so every process in it dies with lb). $0 is lb, $1 be; with
/// $2 = hold, the shell takes both ports to the backend first and lb inherits
/// them, so lb never gets one. The rest are lb's flags.
const SCRIPT: &str = r#"
set -e
lb=$0 be=$1 hold=$2
shift 2
ip link set lo up
"$be" -p 9000 -c ports-test-backend --workers 1 3>&- >/dev/null 2>&1 &
n=0
until (exec 4<>/dev/tcp/127.0.0.1/9000) 2>/dev/null; do
  n=$((n + 1)); [ "$n" -lt 200 ] || { echo "be did not start" >&2; exit 1; }
  sleep 0.05
done
echo "40000 40001" > /proc/sys/net/ipv4/ip_local_port_range
if [ "$hold" = hold ]; then exec 5<>/dev/tcp/127.0.0.1/9000 6<>/dev/tcp/127.0.0.1/9000; fi
LISTEN_PID=$$ LISTEN_FDS=1 exec "$lb" --workers 1 -b 127.0.0.1:9000 "$@"
"#;

/// lb with its backend in their own namespaces, killed (with everything in
/// the pid namespace) on drop.
struct Isolated {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Isolated {
    fn log(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `unshare` making new network and pid namespaces; as root directly,
/// otherwise inside a user namespace where we are root.
fn unshare() -> Command {
    let mut cmd = Command::new("unshare");
    if !is_root() {
        cmd.arg("--map-root-user");
    }
    cmd.args(["--net", "--pid", "--fork", "--kill-child"]);
    cmd
}

fn isolated_lb(listener: &TcpListener, hold: bool, flags: &[&str]) -> Isolated {
    let can_isolate = unshare().arg("true").status().is_ok_and(|s| s.success());
    assert!(can_isolate, "this test needs unshare (util-linux), and user namespaces when not run as root");
    let mut cmd = unshare();
    cmd.args(["bash", "-c", SCRIPT])
        .args([lb_bin(), be_bin(), if hold { "hold" } else { "-" }])
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    pass_fds_from_3(&mut cmd, vec![listener.as_raw_fd()]);
    let mut child = cmd.spawn().expect("spawn unshare");
    let mut err = child.stderr.take().expect("stderr piped");
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&stderr);
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("stderr lock").push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Isolated { child, stderr }
}

/// A keep-alive request on a new connection; false when it is refused or
/// reset (lb resets a client no backend takes, maybe before connect returns).
fn connect_and_request(addr: std::net::SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, WAIT)
        .and_then(|c| c.set_read_timeout(Some(WAIT)).and_then(|()| c.set_write_timeout(Some(WAIT))).map(|()| c))
        .is_ok_and(|mut c| request(&mut c, false))
}

/// Sends one request on `c` and reads the answer; false if lb closed the
/// connection instead.
fn request(c: &mut TcpStream, close: bool) -> bool {
    let head = if close { "Connection: close\r\n" } else { "" };
    if c.write_all(format!("GET / HTTP/1.1\r\nHost: t\r\n{head}\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
        if got.ends_with(BODY) {
            return true;
        }
    }
}

/// One client served end to end, retried while lb is still starting.
fn served_client(listener: &TcpListener) -> Option<TcpStream> {
    let addr = listener.local_addr().expect("addr");
    let mut served = None;
    wait_until(WAIT, || {
        let mut c = connect(addr);
        if request(&mut c, false) {
            served = Some(c);
        }
        served.is_some()
    });
    served
}

#[test]
fn a_client_that_finds_no_free_local_port_does_not_take_the_backend_down() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let flags = ["--no-health-check", "--health-check-period", "600", "--fall", "1", "--retries", "0"];
    let lb = isolated_lb(&listener, false, &flags);

    // Two clients hold the only two ports to the backend.
    let first = served_client(&listener);
    let second = served_client(&listener);
    let held = first.is_some() && second.is_some();

    // A third finds no port: it is reset unanswered (possibly before its
    // connect returns).
    let third_served = connect_and_request(addr);

    // The first asks the backend to close, which frees its port (the
    // backend closes first, so the TIME_WAIT is on its side, not lb's).
    let released = first.is_some_and(|mut c| request(&mut c, true) && c.read(&mut [0u8; 1]).is_ok_and(|n| n == 0));
    // The backend is still up: a new client is served once lb has let go
    // of the port. Before, the failed connect counted against the backend
    // (--fall 1) and every later client was refused.
    let fourth = wait_until(WAIT, || connect_and_request(addr));
    // lb logs the failed connect either way: as a shortage of its own, or
    // (before) as the backend going down.
    let said = |log: &str| log.contains("no free local port") || log.contains("is DOWN");
    wait_until(WAIT, || said(&lb.log()));
    let log = lb.log();
    drop(second);
    drop(lb);

    assert!(held, "lb did not serve the first two clients\n{log}");
    assert!(!third_served, "a third client was served although lb had only two ports\n{log}");
    assert!(released, "the backend did not close the first client's connection\n{log}");
    assert!(fourth, "no client was served after a port was freed\n{log}");
    assert!(log.contains("no free local port"), "{log}");
    assert!(!log.contains("is DOWN"), "{log}");
}

#[test]
fn a_health_probe_that_finds_no_free_local_port_is_skipped_not_failed() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let flags = ["--health-check-period", "0.05", "--fall", "1"];
    let lb = isolated_lb(&listener, true, &flags);
    // Probes every 50 ms: before, the first one took the backend down.
    // Skips are logged once a second, the second line counting the skips
    // held back since the first.
    let skipped_again = wait_until(WAIT, || {
        lb.log().lines().any(|l| l.contains("health check of 127.0.0.1:9000 skipped") && l.contains("not logged"))
    });
    let log = lb.log();
    drop(lb);
    assert!(skipped_again, "{log}");
    assert!(!log.contains("is DOWN"), "{log}");
}
