//! Socket-level helpers shared by the relay, the accept path and the health
//! prober: the one place that decides what an `io::Error` means, and when
//! two addresses are the same endpoint.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// What an I/O error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoClass {
    /// Nothing to do now; wait for the next readiness event.
    WouldBlock,
    /// A signal interrupted the call; retry it at once.
    Interrupted,
    /// The peer went away (reset, refused, broken pipe): expected traffic,
    /// logged at debug.
    Closed,
    /// Anything else: worth a log line.
    Error,
}

pub fn classify(e: &io::Error) -> IoClass {
    use io::ErrorKind::*;
    // Errors that accept(2) passes on from the new connection itself (the
    // man page says to retry them as EAGAIN); on an established socket they
    // also mean that peer is gone. EOPNOTSUPP, also in the man page's list,
    // is left out: from accept it can mean the listener is unusable, where
    // retrying at once would spin.
    if matches!(
        e.raw_os_error(),
        Some(libc::EPROTO | libc::ENETDOWN | libc::ENOPROTOOPT | libc::EHOSTDOWN | libc::ENONET)
    ) {
        return IoClass::Closed;
    }
    match e.kind() {
        WouldBlock => IoClass::WouldBlock,
        Interrupted => IoClass::Interrupted,
        ConnectionReset | ConnectionAborted | ConnectionRefused | BrokenPipe | NotConnected | UnexpectedEof
        | WriteZero | TimedOut | HostUnreachable | NetworkUnreachable => IoClass::Closed,
        _ => IoClass::Error,
    }
}

/// True for accept() failures caused by running out of descriptors or
/// kernel memory: the listener is fine, the process must back off.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM))
}

/// True when connect() found no free local port to that destination
/// (EADDRNOTAVAIL: every ephemeral port to it is in use, typically held in
/// TIME_WAIT under a high connection rate). It is lb's own shortage and
/// says nothing about the backend; another backend, being another
/// destination, may still have ports.
pub fn is_local_port_shortage(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
}

/// Bytes written to `s` that its peer has not acknowledged yet: they are
/// still in the send queue, which closing with a reset would discard. Zero
/// once the connection is closed (by a reset or an error), when nothing
/// more can be delivered although the kernel's count (SIOCOUTQ) keeps
/// them, and zero if the socket cannot be asked.
pub fn unacknowledged(s: &impl AsRawFd) -> usize {
    /// `TCP_CLOSE` of the kernel's TCP states (include/net/tcp_states.h).
    const CLOSED: u8 = 7;
    let fd = s.as_raw_fd();
    // SAFETY: tcp_info is plain data for which all zeroes is valid, and
    // getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let asked = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    if asked != 0 || info.tcpi_state == CLOSED {
        return 0;
    }
    send_queue(s)
}

/// The kernel's count of bytes in `s`'s send queue (SIOCOUTQ), zero if the
/// socket cannot be asked. One syscall; unlike [`unacknowledged`] it keeps
/// a closed socket's last count, which stands still from then on.
pub fn send_queue(s: &impl AsRawFd) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int through the pointer.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) } != 0 {
        return 0;
    }
    usize::try_from(queued).unwrap_or(0)
}

/// Whether `s` holds an error it has yet to report, without taking it as
/// SO_ERROR would: a read still tells whether the peer's FIN came before
/// it (0) or not (the error).
pub fn has_pending_error(s: &impl AsRawFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: 0, revents: 0 };
    // A signal handled on this thread interrupts even a poll that does not
    // wait; a second one in a row would need a storm of them.
    for _ in 0..8 {
        // SAFETY: one valid pollfd for the duration of the call; no wait.
        if unsafe { libc::poll(&mut pfd, 1, 0) } >= 0 {
            return Ok(pfd.revents & libc::POLLERR != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Err(io::Error::from(io::ErrorKind::Interrupted))
}

/// The same address, IPv4-mapped or not; a link-local one on the same
/// link (fe80::1 on another link is another machine).
pub fn same_address(a: SocketAddr, b: SocketAddr) -> bool {
    let link = |s: SocketAddr| match s {
        SocketAddr::V6(v6) if v6.ip().is_unicast_link_local() => Some(v6.scope_id()),
        _ => None,
    };
    a.ip().to_canonical() == b.ip().to_canonical() && link(a) == link(b)
}

/// An interface's name from its index (if_indextoname(3)).
pub fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes the call may write.
    let got = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if got.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Makes the coming close of `s` send RST instead of FIN: its stream did
/// not end but was cut, or never began (no backend took the client), and a
/// FIN would make it look complete.
pub fn reset_on_close(s: &impl std::os::fd::AsFd) {
    // Fails only on a socket already gone, whose close sends nothing.
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}

/// Drops what `s` has received so far without copying it (MSG_TRUNC on a
/// TCP socket), so a peer whose bytes lb no longer wants is not left
/// blocked on a full window. Stops at `WouldBlock`, the EOF, an error, or
/// after a bounded amount, the rest waiting for the next call.
pub fn discard_received(s: &impl AsRawFd) {
    for _ in 0..16 {
        // SAFETY: with MSG_TRUNC a TCP socket discards the bytes instead of
        // copying them, so the null buffer is never written.
        let n =
            unsafe { libc::recv(s.as_raw_fd(), std::ptr::null_mut(), 1 << 20, libc::MSG_TRUNC | libc::MSG_DONTWAIT) };
        if n <= 0 {
            return;
        }
    }
}

/// A short, operator-facing reason for a failed connect or probe
/// ("connection refused", "timed out").
pub fn describe(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        TimedOut => "timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_and_refusals_are_closed_not_errors() {
        for kind in [io::ErrorKind::ConnectionReset, io::ErrorKind::ConnectionRefused, io::ErrorKind::BrokenPipe] {
            assert_eq!(classify(&io::Error::from(kind)), IoClass::Closed);
        }
        assert_eq!(classify(&io::Error::from(io::ErrorKind::WouldBlock)), IoClass::WouldBlock);
        assert_eq!(classify(&io::Error::from(io::ErrorKind::Interrupted)), IoClass::Interrupted);
        assert_eq!(classify(&io::Error::from(io::ErrorKind::PermissionDenied)), IoClass::Error);
    }

    #[test]
    fn network_errors_accept_passes_on_from_the_new_connection_are_closed() {
        for errno in
            [libc::EPROTO, libc::ENETDOWN, libc::ENOPROTOOPT, libc::EHOSTDOWN, libc::ENONET, libc::EHOSTUNREACH]
        {
            assert_eq!(classify(&io::Error::from_raw_os_error(errno)), IoClass::Closed, "errno {errno}");
        }
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EOPNOTSUPP)), IoClass::Error);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EMFILE)), IoClass::Error);
    }

    #[test]
    fn fd_exhaustion_is_recognised() {
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
    }

    #[test]
    fn a_pending_error_is_seen_without_being_taken() {
        use std::net::{TcpListener, TcpStream};
        use std::time::{Duration, Instant};
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let near = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (far, _) = l.accept().expect("accept");
        assert!(!has_pending_error(&near).expect("poll"), "a healthy connection");
        reset_on_close(&far);
        drop(far);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !has_pending_error(&near).expect("poll") {
            assert!(Instant::now() < deadline, "the reset never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Still there for the read, or SO_ERROR, to report.
        assert!(has_pending_error(&near).expect("poll"));
        let e = near.take_error().expect("SO_ERROR").expect("an error");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn unacknowledged_bytes_are_counted_until_the_peer_takes_them_and_none_after_a_reset() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::time::{Duration, Instant};
        let until = |cond: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cond() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            cond()
        };
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sender = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut receiver, _) = l.accept().expect("accept");
        assert_eq!(unacknowledged(&sender), 0);
        // More than the receiver's window: the rest waits in the send queue.
        sender.set_nonblocking(true).expect("nonblocking");
        let mut written = 0;
        while let Ok(n) = sender.write(&[7u8; 64 * 1024]) {
            written += n;
        }
        assert!(written > 0 && unacknowledged(&sender) > 0, "nothing queued after {written} bytes");
        let mut buf = vec![0u8; 1 << 20];
        let mut read = 0;
        while read < written {
            read += receiver.read(&mut buf).expect("read");
        }
        assert!(until(&|| unacknowledged(&sender) == 0), "still {} unacknowledged", unacknowledged(&sender));
        // Queued again, then the peer resets: nothing is left to deliver.
        while sender.write(&[7u8; 64 * 1024]).is_ok() {}
        assert!(unacknowledged(&sender) > 0);
        socket2::SockRef::from(&receiver).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(receiver);
        assert!(until(&|| unacknowledged(&sender) == 0), "a reset socket still counts {}", unacknowledged(&sender));
    }

    #[test]
    fn what_a_peer_sent_is_discarded_up_to_the_eof_without_a_buffer() {
        use std::io::Write;
        use std::net::{Shutdown, TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sender = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (receiver, _) = l.accept().expect("accept");
        sender.write_all(&[7u8; 100_000]).expect("write");
        sender.shutdown(Shutdown::Write).expect("shutdown");
        // A blocking peek waits for bytes or the EOF, and says 0 only at
        // the EOF with nothing left before it.
        let mut rounds = 0;
        while receiver.peek(&mut [0u8; 1]).expect("peek") > 0 {
            rounds += 1;
            assert!(rounds < 1000, "the bytes are not being discarded");
            discard_received(&receiver);
        }
    }

    #[test]
    fn no_free_local_port_is_a_shortage_of_ours_not_a_refusal() {
        assert!(is_local_port_shortage(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)));
        assert!(!is_local_port_shortage(&io::Error::from_raw_os_error(libc::ECONNREFUSED)));
        assert!(!is_local_port_shortage(&io::Error::from_raw_os_error(libc::EMFILE)));
    }
}
