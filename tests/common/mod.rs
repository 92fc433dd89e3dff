//! Shared integration-test harness: spawns `lb` and `be` on loopback port 0,
//! reads the address they bound, and kills them on drop; in-process echo
//! and scripted backends; and probes for descriptors and socket states.
//! Every wait has a deadline; nothing here sleeps for a fixed time to let
//! something happen.

#![allow(dead_code)]

pub mod admin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// Default bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(10);

/// A new empty directory under the system's temp dir, one per call: tests
/// run in parallel in one process. The caller removes it.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{name}.{}.{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A child process whose output lines are collected, killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("stderr lock").join("\n")
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.lock().expect("stdout lock").join("\n")
    }

    /// Waits until a stdout line satisfies `pred`.
    pub fn wait_stdout(&self, pred: impl Fn(&str) -> bool, limit: Duration) -> bool {
        wait_until(limit, || self.stdout.lock().expect("stdout lock").iter().any(|l| pred(l)))
    }

    /// Waits until a stderr line satisfies `pred`.
    pub fn wait_stderr(&self, pred: impl Fn(&str) -> bool, limit: Duration) -> bool {
        wait_until(limit, || self.stderr.lock().expect("stderr lock").iter().any(|l| pred(l)))
    }

    /// Open descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect<R: Read + Send + 'static>(r: R, into: Arc<Mutex<Vec<String>>>, tx: Option<mpsc::Sender<String>>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &tx {
                let _ = tx.send(line.clone());
            }
            into.lock().expect("line lock").push(line);
        }
    });
}

/// Starts a binary that announces `listening on ADDR` on stdout or stderr
/// and waits for that line.
pub fn spawn_listening(bin: &str, args: &[String], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    spawn_listening_cmd(cmd)
}

/// [`spawn_listening`] for a command the caller has prepared.
pub fn spawn_listening_cmd(mut cmd: Command) -> Proc {
    let bin = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    collect(child.stderr.take().expect("stderr piped"), Arc::clone(&stderr), Some(tx.clone()));
    collect(child.stdout.take().expect("stdout piped"), Arc::clone(&stdout), Some(tx));
    let deadline = Instant::now() + WAIT;
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(addr) = announced_addr(&line) {
                    break addr;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{bin} did not report its address; stderr: {}", stderr.lock().expect("stderr lock").join("\n"));
            }
        }
    };
    Proc { child, addr, stderr, stdout }
}

/// The address in a `listening on ADDR ...` line, if `line` is one.
pub fn announced_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on ").nth(1)?;
    let a = rest.split_whitespace().next().expect("address after 'listening on'");
    Some(a.parse::<SocketAddr>().unwrap_or_else(|e| panic!("bad address {a}: {e}")))
}

/// Whether the tests run as root (raw sockets, setpriv, eBPF).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this process may load eBPF programs, as lb's steering and
/// kernel relay do: root, where bpf(2) is not filtered out (a container
/// run with a default seccomp profile refuses it even to root). Probed
/// once by creating a one-entry array map, which takes the same privilege.
pub fn bpf_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        if !is_root() {
            return false;
        }
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size,
        // max_entries, then fields left 0.
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_ARRAY: u32 = 2;
        let mut attr = [0u32; 16];
        attr[..4].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, 4, 1]);
        // SAFETY: attr is a valid, writable bpf_attr of the size passed.
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
        if fd < 0 {
            eprintln!("bpf(2) refused here: {}", std::io::Error::last_os_error());
            return false;
        }
        // SAFETY: fd is the map just created and owned by nobody else.
        unsafe { libc::close(fd as libc::c_int) };
        true
    })
}

pub fn lb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

pub fn be_bin() -> &'static str {
    env!("CARGO_BIN_EXE_be")
}

/// Starts lb on 127.0.0.1:0 in front of `backends`, with 2 workers and
/// `extra` flags.
pub fn lb(backends: &[SocketAddr], extra: &[&str]) -> Proc {
    lb_env(backends, extra, &[])
}

pub fn lb_env(backends: &[SocketAddr], extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut args: Vec<String> = ["-p", "0", "--bind", "127.0.0.1"].iter().map(|s| s.to_string()).collect();
    if !extra.contains(&"--workers") {
        args.extend(["--workers".to_string(), "2".to_string()]);
    }
    if !backends.is_empty() {
        args.push("-b".into());
        args.extend(backends.iter().map(|b| b.to_string()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_listening(lb_bin(), &args, envs)
}

/// Starts a `be` HTTP backend answering with `name`.
pub fn be(name: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec!["-p".into(), "0".into(), "-c".into(), name.into(), "--workers".into(), "1".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_listening(be_bin(), &args, &[])
}

/// lb (no arguments yet) under `ulimit -n limit`, soft and hard: bash sets
/// the limit, then becomes lb (same pid).
pub fn lb_under_fd_limit(limit: u32) -> Command {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", "ulimit -n \"$1\" && shift && exec \"$@\"", "-", &limit.to_string(), lb_bin()]);
    cmd
}

/// Runs lb to completion (for command-line errors), bounded in time.
pub fn lb_output(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(lb_bin());
    cmd.args(args);
    output_within_wait(cmd)
}

/// Runs `cmd` (stdin and stdout closed) and returns its exit code and stderr;
/// panics, after killing it, if it is still running after `WAIT`, so a
/// command that unexpectedly starts serving cannot hang the test.
pub fn output_within_wait(mut cmd: Command) -> (Option<i32>, String) {
    let what = format!("{cmd:?}");
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut err = child.stderr.take().expect("stderr piped");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    (status.code(), reader.join().expect("stderr reader"))
}

/// Makes `fds` the child's descriptors 3, 4, ... without close-on-exec, as
/// systemd passes sockets. The caller keeps its own copies open until the
/// child has started.
pub fn pass_fds_from_3(cmd: &mut Command, fds: Vec<i32>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only dup2 runs (async-signal-safe; no
    // allocation), and the descriptors outlive the spawn.
    unsafe {
        cmd.pre_exec(move || {
            // Out of the way first, so that dup2 onto 3.. clobbers no source.
            for (i, &fd) in fds.iter().enumerate() {
                if libc::dup2(fd, 200 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..fds.len() as i32 {
                if libc::dup2(200 + i, 3 + i) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port free now, for a process that must be told its port
/// (another may take it first, though ephemeral ports are picked at random).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A loopback address on which nothing listens.
pub fn dead_addr() -> SocketAddr {
    // Bound but never listening, so connects are refused; kept bound (and
    // without SO_REUSEADDR) for the rest of the test process, so that no
    // listener of a test running alongside can be given the port.
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
    let addr = s.local_addr().expect("addr").as_socket().expect("an inet address");
    std::mem::forget(s);
    addr
}

/// `N` distinct dead addresses (each stays bound, so no two share a port;
/// lb refuses a backend listed twice).
pub fn dead_addrs<const N: usize>() -> [SocketAddr; N] {
    std::array::from_fn(|_| dead_addr())
}

/// A listener that never accepts and whose queue is already full: SYNs to
/// it are dropped, so a connect hangs until the connector gives up.
pub fn blackhole() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("blackhole");
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("blackhole").into()).expect("blackhole");
    s.listen(0).expect("blackhole");
    let addr = s.local_addr().expect("blackhole").as_socket().expect("blackhole");
    let mut fillers = Vec::new();
    // Fill the accept queue; later SYNs are dropped.
    for _ in 0..4 {
        if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(c);
        }
    }
    (s, fillers, addr)
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, WAIT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.set_write_timeout(Some(WAIT)).expect("timeout");
    s
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Counts live and peak connections of an in-process backend.
#[derive(Default)]
pub struct Gauge {
    pub active: AtomicUsize,
    pub peak: AtomicUsize,
    pub accepted: AtomicUsize,
}

impl Gauge {
    fn enter(&self) {
        self.accepted.fetch_add(1, Ordering::SeqCst);
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One accepted connection of an in-process backend. It is counted out of
/// the gauge before its socket closes (Drop runs before the fields drop),
/// so the gauge never lags behind what lb can observe.
pub struct Conn {
    pub stream: TcpStream,
    gauge: Arc<Gauge>,
}

impl std::ops::Deref for Conn {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.gauge.leave();
    }
}

/// An in-process backend: a thread per connection runs `handler`.
pub struct Backend {
    pub addr: SocketAddr,
    pub gauge: Arc<Gauge>,
}

pub fn backend<F>(handler: F) -> Backend
where
    F: Fn(Conn) + Send + Sync + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = l.local_addr().expect("addr");
    let gauge = Arc::new(Gauge::default());
    let handler = Arc::new(handler);
    let g = Arc::clone(&gauge);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
            g.enter();
            let (h, g) = (Arc::clone(&handler), Arc::clone(&g));
            thread::spawn(move || h(Conn { stream: s, gauge: g }));
        }
    });
    Backend { addr, gauge }
}

/// A backend that streams bytes to each client until a write fails (at
/// most 256 MiB), then reports on `stopped` how many it wrote.
pub fn endless_source() -> (Backend, mpsc::Receiver<usize>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let b = backend(move |mut s| {
        let chunk = [b'z'; 64 * 1024];
        let mut sent = 0;
        while sent < 256 << 20 && s.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        let _ = tx.lock().expect("sender").send(sent);
    });
    (b, rx)
}

/// Reads `s` to its end and says how it ended: `Ok` with the byte count on
/// a clean EOF, the error (after any bytes queued ahead of it) otherwise.
pub fn read_to_the_end(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => return Err(e),
        }
    }
}

/// Echoes until EOF, then closes.
pub fn echo_backend() -> Backend {
    backend(|mut s| echo_until_eof(&mut s))
}

/// Writes back whatever arrives until EOF or an error.
pub fn echo_until_eof(s: &mut Conn) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

/// Writes `tag` at once, then echoes until EOF.
pub fn tagged_backend(tag: &'static str) -> Backend {
    backend(move |mut s| {
        if s.write_all(tag.as_bytes()).is_ok() {
            echo_until_eof(&mut s);
        }
    })
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read_exact");
    v
}

/// Sends `data` and the FIN in one TCP segment: MSG_MORE holds the bytes
/// back and the shutdown pushes them out with the FIN.
pub fn send_with_fin(s: &TcpStream, data: &[u8]) {
    let n = socket2::SockRef::from(s).send_with_flags(data, libc::MSG_MORE).expect("send with MSG_MORE");
    assert_eq!(n, data.len(), "a small send goes in whole");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown(Write)");
}

/// Sends `before`, one urgent (out-of-band) byte and `after` in one TCP
/// segment, with the FIN in it too when `then_fin`.
pub fn send_around_urgent_byte(s: &TcpStream, before: &[u8], after: &[u8], then_fin: bool) {
    let sock = socket2::SockRef::from(s);
    sock.send_with_flags(before, libc::MSG_MORE).expect("send");
    sock.send_with_flags(b"!", libc::MSG_MORE | libc::MSG_OOB).expect("send urgent");
    if then_fin {
        send_with_fin(s, after);
    } else {
        sock.send_with_flags(after, 0).expect("send");
    }
}

/// TCP segments this socket has received so far (`tcpi_segs_in` of
/// TCP_INFO, Linux 4.2+), the SYN-ACK included.
pub fn segments_received(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // struct tcp_info up to tcpi_segs_in (offset 140, see linux/tcp.h).
    const SEGS_IN: usize = 140;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the buffer is valid for `len` bytes and outlives the call.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    assert_eq!(rc, 0, "getsockopt(TCP_INFO): {}", std::io::Error::last_os_error());
    assert!(len as usize >= SEGS_IN + 4, "TCP_INFO too short for tcpi_segs_in ({len} bytes)");
    u32::from_ne_bytes(info[SEGS_IN..SEGS_IN + 4].try_into().expect("4 bytes"))
}

/// Sockets in CLOSE_WAIT whose local or remote port is one of `ports`,
/// from /proc/net/tcp and tcp6.
pub fn close_wait_count(ports: &[u16]) -> usize {
    let mut n = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "08" {
                continue;
            }
            let port_of = |s: &str| s.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if [f[1], f[2]].iter().any(|a| port_of(a).is_some_and(|p| ports.contains(&p))) {
                n += 1;
            }
        }
    }
    n
}

/// Sends `data` and reads the full echo concurrently; returns what came back.
pub fn echo_roundtrip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let s = connect(addr);
    let mut r = s.try_clone().expect("clone");
    let want = data.len();
    let reader = thread::spawn(move || {
        let mut got = Vec::with_capacity(want);
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < want {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("read echo after {} bytes: {e}", got.len()),
            }
        }
        got
    });
    let mut w = s;
    w.write_all(data).expect("write payload");
    w.shutdown(Shutdown::Write).expect("shutdown");
    reader.join().expect("reader thread")
}

/// Runs random data through an echo and checks it, over `n` concurrent
/// connections of 1–4 MiB each; returns the bytes lb relayed (both ways).
pub fn echo_many(addr: SocketAddr, n: u64, seed: u64) -> u64 {
    let total: usize = (0..n).map(|i| echo_len(i) * 2).sum();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || {
                let data = random_bytes(echo_len(i), seed + i);
                let got = echo_roundtrip(addr, &data);
                assert_eq!(got.len(), data.len(), "connection {i} length");
                assert!(got == data, "connection {i} bytes differ");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("transfer thread");
    }
    total as u64
}

pub fn echo_len(i: u64) -> usize {
    (1 << 20) + (i as usize * 397_643) % (3 << 20)
}
