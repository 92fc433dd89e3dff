//! systemd integration: readiness/status notification (the `sd_notify`
//! protocol over `$NOTIFY_SOCKET`) and socket activation (the
//! `sd_listen_fds` protocol via `$LISTEN_PID`/`$LISTEN_FDS`).
//!
//! Both protocols are small and stable, so they are implemented here by hand
//! on top of std and libc instead of linking libsystemd. Nothing in this
//! module is required: outside systemd `Notifier::from_env` returns `None` and
//! `listen_fds` returns an empty list, and lb binds its own listeners.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Environment variable naming the service manager's notification socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// First file descriptor passed by socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Sends state changes to the service manager (`Type=notify` units).
///
/// Sends are non-blocking: if the manager is slow or gone, `notify` fails with
/// an error (typically `WouldBlock` or `ConnectionRefused`) instead of
/// stalling an event loop. Callers should log and otherwise ignore errors;
/// notifications are advisory.
///
/// With `NotifyAccess=main` systemd only accepts messages whose sender PID is
/// the main PID. Worker threads share that PID, so any thread may notify.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// Returns a notifier for `$NOTIFY_SOCKET`, or `None` when lb was not
    /// started by a service manager that wants notifications.
    ///
    /// The variable is left in the environment; see
    /// [`Notifier::from_env_and_unset`] for the alternative.
    pub fn from_env() -> Option<Notifier> {
        from_env_value(std::env::var_os(NOTIFY_SOCKET_ENV).as_deref())
    }

    /// Like [`Notifier::from_env`], but also removes `$NOTIFY_SOCKET` so that
    /// processes lb might spawn do not talk to lb's service manager on its
    /// behalf.
    ///
    /// Call this from `main` before any thread is spawned: it mutates the
    /// process environment, which is only sound while single-threaded.
    pub fn from_env_and_unset() -> Option<Notifier> {
        let value = std::env::var_os(NOTIFY_SOCKET_ENV)?;
        // SAFETY: documented precondition: called at startup, before lb
        // spawns any thread, so nothing can read the environment concurrently.
        unsafe { std::env::remove_var(NOTIFY_SOCKET_ENV) };
        from_env_value(Some(&value))
    }

    /// Builds a notifier for an explicit `NOTIFY_SOCKET` value: an absolute
    /// filesystem path, or `@name` for a Linux abstract socket.
    pub fn open(notify_socket: &OsStr) -> io::Result<Notifier> {
        let bytes = notify_socket.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
            Some(b'/') => SocketAddr::from_pathname(notify_socket)?,
            _ => {
                // Other forms (relative paths, systemd's newer `vsock:`
                // addresses) are not produced for local services; refusing
                // them beats sending readiness into the void.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unsupported NOTIFY_SOCKET address {notify_socket:?}"),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier { socket, addr })
    }

    /// Sends a raw notification, e.g. `"READY=1"` or `"WATCHDOG=1"`. Several
    /// assignments may be sent at once separated by newlines.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            // Datagrams are all-or-nothing on Unix sockets, so this should be
            // unreachable; a truncated "STATUS=" would be silently wrong.
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes to the notify socket", state.len()),
            ));
        }
        Ok(())
    }

    /// Tells the manager start-up is finished: send once every listener is
    /// bound and accepting, as systemd then starts units ordered after lb.
    pub fn ready(&self) -> io::Result<()> {
        self.notify("READY=1")
    }

    /// Tells the manager lb is shutting down (draining). Without it systemd
    /// reports the service as active until the process actually exits.
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }

    /// Sets the one-line status shown by `systemctl status lb`.
    pub fn status(&self, status: &str) -> io::Result<()> {
        // A newline would start a new assignment, letting the status text
        // inject arbitrary state (e.g. "READY=1") into the message.
        let line: String = status.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
        self.notify(&format!("STATUS={line}"))
    }
}

fn from_env_value(value: Option<&OsStr>) -> Option<Notifier> {
    let value = value.filter(|v| !v.is_empty())?;
    match Notifier::open(value) {
        Ok(notifier) => Some(notifier),
        Err(err) => {
            // Running without notifications is better than refusing to start,
            // but under Type=notify systemd will time the start out, so make
            // the reason visible.
            log::warn!("ignoring {NOTIFY_SOCKET_ENV}: {err}");
            None
        }
    }
}

/// Interprets `$LISTEN_PID` and `$LISTEN_FDS` and returns how many sockets
/// were passed to the process `my_pid` (starting at fd [`LISTEN_FDS_START`]).
///
/// Variables addressed to another process (inherited from a parent that was
/// itself socket-activated) mean "not activated", not an error.
pub fn parse_listen_env(pid: Option<&str>, fds: Option<&str>, my_pid: u32) -> Result<usize, String> {
    let Some(pid) = pid else { return Ok(0) };
    let pid: u32 = match pid.parse() {
        Ok(0) | Err(_) => return Err(format!("invalid LISTEN_PID {pid:?}")),
        Ok(pid) => pid,
    };
    if pid != my_pid {
        return Ok(0);
    }
    let Some(fds) = fds else { return Ok(0) };
    let n: usize = fds.parse().map_err(|_| format!("invalid LISTEN_FDS {fds:?}"))?;
    // Keeps `LISTEN_FDS_START + n` from overflowing in listen_fds (what
    // libsystemd reports as E2BIG).
    let max = (RawFd::MAX - LISTEN_FDS_START) as usize;
    if n > max {
        return Err(format!("LISTEN_FDS {n} is out of range"));
    }
    Ok(n)
}

/// Takes the listening sockets passed by socket activation (`lb.socket`).
///
/// Returns an empty list when lb was not socket-activated. Each returned fd is
/// a listening `SOCK_STREAM` IPv4/IPv6 socket with `FD_CLOEXEC` set; anything
/// else is an error, since lb cannot serve it. `LISTEN_PID`, `LISTEN_FDS` and
/// `LISTEN_FDNAMES` are removed from the environment so the fds are claimed
/// exactly once, even if this is called again.
///
/// Call this from `main` before any thread is spawned: it mutates the
/// process environment, which is only sound while single-threaded.
pub fn listen_fds() -> io::Result<Vec<OwnedFd>> {
    const VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
    let pid = std::env::var_os(VARS[0]);
    let fds = std::env::var_os(VARS[1]);
    if VARS.iter().any(|v| std::env::var_os(v).is_some()) {
        for var in VARS {
            // SAFETY: documented precondition: called at startup, before lb
            // spawns any thread, so nothing can read the environment
            // concurrently.
            unsafe { std::env::remove_var(var) };
        }
    }
    let n = parse_listen_env(env_str(VARS[0], pid.as_deref())?, env_str(VARS[1], fds.as_deref())?, std::process::id())
        .map_err(|msg| io::Error::new(io::ErrorKind::InvalidInput, msg))?;

    // Validate everything before taking ownership so that an error does not
    // close descriptors we did not understand.
    let passed = LISTEN_FDS_START..LISTEN_FDS_START + n as RawFd;
    for fd in passed.clone() {
        set_cloexec(fd)?;
        check_listener(fd)?;
    }
    Ok(passed
        // SAFETY: the fd is open (set_cloexec succeeded) and was handed to this
        // process by the service manager; the environment that announced it
        // is gone, so no other code in lb can claim it a second time.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect())
}

fn env_str<'a>(name: &str, value: Option<&'a OsStr>) -> io::Result<Option<&'a str>> {
    value
        .map(|v| v.to_str().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is not UTF-8"))))
        .transpose()
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // Passed fds arrive without FD_CLOEXEC (they had to survive systemd's
    // exec); without it they would leak into anything lb executes.
    // SAFETY: F_GETFD/F_SETFD only read/write descriptor flags; an invalid fd
    // yields EBADF, which is reported below.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(fd_error(fd, "is not open", Some(io::Error::last_os_error())));
    }
    if flags & libc::FD_CLOEXEC == 0 {
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(fd_error(fd, "cannot set FD_CLOEXEC", Some(io::Error::last_os_error())));
        }
    }
    Ok(())
}

/// Checks that `fd` is something lb can accept TCP connections on: a
/// listening stream socket in the IPv4 or IPv6 family.
fn check_listener(fd: RawFd) -> io::Result<()> {
    let sock_type = getsockopt_int(fd, libc::SO_TYPE).map_err(|err| fd_error(fd, "is not a socket", Some(err)))?;
    if sock_type != libc::SOCK_STREAM {
        return Err(fd_error(fd, "is not a stream (TCP) socket", None));
    }
    let domain =
        getsockopt_int(fd, libc::SO_DOMAIN).map_err(|err| fd_error(fd, "has no readable address family", Some(err)))?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        // lb treats listeners as TCP; e.g. ListenStream=/run/lb.sock would
        // only fail later, at accept time, with a confusing error.
        return Err(fd_error(fd, "is not an IPv4/IPv6 socket", None));
    }
    let listening =
        getsockopt_int(fd, libc::SO_ACCEPTCONN).map_err(|err| fd_error(fd, "cannot be queried", Some(err)))?;
    if listening == 0 {
        return Err(fd_error(fd, "is not listening", None));
    }
    Ok(())
}

fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value/len point to a properly sized, writable c_int; the kernel
    // writes at most `len` bytes and reports errors (EBADF, ENOTSOCK) via -1.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut value as *mut libc::c_int).cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn fd_error(fd: RawFd, what: &str, cause: Option<io::Error>) -> io::Error {
    let cause = cause.map(|c| format!(" ({c})")).unwrap_or_default();
    io::Error::new(io::ErrorKind::InvalidInput, format!("socket activation: fd {fd} passed by systemd {what}{cause}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn unique(tag: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("lb-systemd-test-{}-{tag}-{n}", std::process::id())
    }

    struct TempSocket {
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl TempSocket {
        fn bind(tag: &str) -> TempSocket {
            let path = std::env::temp_dir().join(unique(tag));
            let _ = std::fs::remove_file(&path);
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            TempSocket { path, socket }
        }

        fn recv(&self) -> String {
            recv(&self.socket)
        }
    }

    impl Drop for TempSocket {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notify_delivers_ready_to_a_socket_in_the_filesystem() {
        let manager = TempSocket::bind("path");
        let notifier = Notifier::open(manager.path.as_os_str()).unwrap();
        notifier.ready().unwrap();
        assert_eq!(manager.recv(), "READY=1");
    }

    #[test]
    fn notify_delivers_to_an_abstract_socket() {
        let name = unique("abstract");
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        manager.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let notifier = Notifier::open(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.stopping().unwrap();
        assert_eq!(recv(&manager), "STOPPING=1");
    }

    #[test]
    fn helpers_send_the_documented_assignments() {
        let manager = TempSocket::bind("helpers");
        let notifier = Notifier::open(manager.path.as_os_str()).unwrap();
        notifier.status("active connections: 12").unwrap();
        assert_eq!(manager.recv(), "STATUS=active connections: 12");
        notifier.notify("WATCHDOG=1").unwrap();
        assert_eq!(manager.recv(), "WATCHDOG=1");
    }

    #[test]
    fn status_cannot_inject_other_assignments() {
        let manager = TempSocket::bind("inject");
        let notifier = Notifier::open(manager.path.as_os_str()).unwrap();
        notifier.status("draining\nREADY=1").unwrap();
        assert_eq!(manager.recv(), "STATUS=draining READY=1");
    }

    #[test]
    fn notify_fails_instead_of_blocking_when_the_manager_is_gone() {
        let manager = TempSocket::bind("gone");
        let notifier = Notifier::open(manager.path.as_os_str()).unwrap();
        drop(manager);
        assert!(notifier.ready().is_err());
    }

    #[test]
    fn notify_fails_instead_of_blocking_when_the_manager_is_not_reading() {
        let manager = TempSocket::bind("full");
        let notifier = Notifier::open(manager.path.as_os_str()).unwrap();
        // Nobody reads, so the receive queue fills up; a blocking sender
        // would hang here forever.
        let err = (0..100_000)
            .find_map(|_| notifier.status("x".repeat(1024).as_str()).err())
            .expect("the receive queue never filled up");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn an_unset_or_empty_notify_socket_means_no_notifier() {
        assert!(from_env_value(None).is_none());
        assert!(from_env_value(Some(OsStr::new(""))).is_none());
    }

    #[test]
    fn relative_notify_socket_paths_are_refused() {
        let err = Notifier::open(OsStr::new("run/notify")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(from_env_value(Some(OsStr::new("run/notify"))).is_none());
    }

    #[test]
    fn listen_env_for_our_pid_gives_the_fd_count() {
        assert_eq!(parse_listen_env(Some("42"), Some("2"), 42), Ok(2));
        assert_eq!(parse_listen_env(Some("42"), Some("0"), 42), Ok(0));
    }

    #[test]
    fn listen_env_for_another_pid_means_not_activated() {
        assert_eq!(parse_listen_env(Some("41"), Some("2"), 42), Ok(0));
        // Even a broken count is someone else's problem.
        assert_eq!(parse_listen_env(Some("41"), Some("x"), 42), Ok(0));
    }

    #[test]
    fn missing_listen_env_means_not_activated() {
        assert_eq!(parse_listen_env(None, None, 42), Ok(0));
        assert_eq!(parse_listen_env(None, Some("2"), 42), Ok(0));
        assert_eq!(parse_listen_env(Some("42"), None, 42), Ok(0));
    }

    #[test]
    fn garbage_listen_env_is_an_error() {
        assert!(parse_listen_env(Some("abc"), Some("1"), 42).is_err());
        assert!(parse_listen_env(Some(""), Some("1"), 42).is_err());
        assert!(parse_listen_env(Some("0"), Some("1"), 42).is_err());
        assert!(parse_listen_env(Some("-42"), Some("1"), 42).is_err());
        assert!(parse_listen_env(Some("42"), Some("two"), 42).is_err());
        assert!(parse_listen_env(Some("42"), Some("-1"), 42).is_err());
        assert!(parse_listen_env(Some("42"), Some(" 1"), 42).is_err());
        assert!(parse_listen_env(Some("42"), Some("99999999999"), 42).is_err());
    }

    #[test]
    fn a_listening_tcp_socket_is_accepted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        check_listener(listener.as_raw_fd()).unwrap();
    }

    #[test]
    fn a_non_listening_tcp_socket_is_rejected() {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP)).unwrap();
        let err = check_listener(socket.as_raw_fd()).unwrap_err();
        assert!(err.to_string().contains("is not listening"), "{err}");
    }

    #[test]
    fn a_udp_socket_is_rejected() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = check_listener(socket.as_raw_fd()).unwrap_err();
        assert!(err.to_string().contains("is not a stream"), "{err}");
    }

    #[test]
    fn a_listening_unix_socket_is_rejected() {
        let path = std::env::temp_dir().join(unique("unix-listener"));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let result = check_listener(listener.as_raw_fd());
        let _ = std::fs::remove_file(&path);
        let err = result.unwrap_err();
        assert!(err.to_string().contains("IPv4/IPv6"), "{err}");
    }

    #[test]
    fn a_regular_file_is_rejected() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = check_listener(file.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("is not a socket"), "{err}");
    }

    #[test]
    fn a_closed_fd_is_rejected() {
        // Far above any RLIMIT_NOFILE, so never open.
        let err = set_cloexec(RawFd::MAX - 1).unwrap_err();
        assert!(err.to_string().contains("is not open"), "{err}");
        assert!(check_listener(RawFd::MAX - 1).is_err());
    }

    const CHILD_ENV: &str = "LB_SYSTEMD_TEST_CHILD";

    /// End to end: re-runs this test binary the way systemd would start lb,
    /// with a listener on fd 3 and LISTEN_* addressed to the child's PID.
    #[test]
    fn listen_fds_takes_the_listener_passed_by_the_service_manager() {
        if std::env::var_os(CHILD_ENV).is_some() {
            let fds = listen_fds().unwrap();
            assert_eq!(fds.len(), 1);
            assert_eq!(fds[0].as_raw_fd(), LISTEN_FDS_START);
            check_listener(fds[0].as_raw_fd()).unwrap();
            // SAFETY: F_GETFD on an fd we own.
            let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "FD_CLOEXEC not set");
            for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                assert!(std::env::var_os(var).is_none(), "{var} still set");
            }
            // A second call must not hand out the same fds again.
            assert!(listen_fds().unwrap().is_empty());
            return;
        }

        use std::os::unix::process::CommandExt;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let mut cmd = std::process::Command::new("/bin/sh");
        // `exec` keeps the shell's PID, so $$ is the PID listen_fds() sees.
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "systemd::tests::listen_fds_takes_the_listener_passed_by_the_service_manager",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, "1")
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "lb.socket");
        // SAFETY: only async-signal-safe calls (dup2, fcntl) run between fork
        // and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == LISTEN_FDS_START {
                    // dup2 onto itself would keep FD_CLOEXEC set.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, LISTEN_FDS_START) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "child failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "child did not run the test:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
