//! The sockets lb accepts on: one `SO_REUSEPORT` listener per worker bound
//! with socket2 (or listeners inherited from systemd), and the descriptor
//! budget they need. Every failure here is reported as one line naming the
//! address and the step that failed.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Listen backlog; the kernel caps it at net.core.somaxconn.
const BACKLOG: i32 = 4096;

#[derive(Debug)]
pub enum ListenError {
    /// Someone else holds the address.
    InUse { addr: SocketAddr },
    /// Ports below 1024 need privileges.
    Permission { addr: SocketAddr },
    /// No interface of this host has the address (or a link-local one
    /// is not on the interface named).
    NotLocal { addr: SocketAddr },
    /// Any other step failing (socket, setsockopt, bind, listen).
    Other { addr: SocketAddr, step: &'static str, source: io::Error },
    /// A descriptor handed over by the service manager is unusable.
    Inherited { source: io::Error },
    /// The service manager passed more sockets than a worker serves.
    TooManyInherited { count: usize },
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::InUse { addr } => {
                write!(f, "cannot listen on {addr}: address already in use")
            }
            ListenError::Permission { addr } => write!(
                f,
                "cannot listen on {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            ),
            // The kernel heeds the zone of link-local addresses alone.
            ListenError::NotLocal { addr: SocketAddr::V6(a) }
                if a.ip().is_unicast_link_local() && a.scope_id() != 0 =>
            {
                let link = crate::net::interface_name(a.scope_id()).unwrap_or_else(|| a.scope_id().to_string());
                write!(
                    f,
                    "cannot listen on [{}%{link}]:{}: interface {link} does not have that address",
                    a.ip(),
                    a.port()
                )
            }
            ListenError::NotLocal { addr } => {
                write!(f, "cannot listen on {addr}: no interface of this host has that address")
            }
            ListenError::Other { addr, step, source } => {
                write!(f, "cannot listen on {addr}: {step} failed: {source}")
            }
            ListenError::Inherited { source } => {
                write!(f, "cannot use the listening sockets passed by systemd: {source}")
            }
            ListenError::TooManyInherited { count } => {
                write!(f, "systemd passed {count} listening sockets; lb serves at most {MAX_LISTENERS}")
            }
        }
    }
}

impl std::error::Error for ListenError {}

/// Most listening sockets one worker serves (each takes a reserved mio
/// token); more passed by systemd are refused at start-up rather than
/// left unserved.
pub const MAX_LISTENERS: usize = 64;

/// A bind-time failure, with the common causes (in use, privileged port)
/// named; the admin endpoint's bind goes through it too.
pub fn classify_bind(addr: SocketAddr, step: &'static str, e: io::Error) -> ListenError {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => ListenError::InUse { addr },
        Some(libc::EACCES) | Some(libc::EPERM) => ListenError::Permission { addr },
        Some(libc::EADDRNOTAVAIL) => ListenError::NotLocal { addr },
        _ => ListenError::Other { addr, step, source: e },
    }
}

/// What [`reaches`] needs to know of a listening socket beyond its
/// address.
#[derive(Clone, Copy, Debug)]
pub struct Listening<'a> {
    pub addr: SocketAddr,
    /// An IPv6 socket on every address takes IPv4 too unless IPV6_V6ONLY
    /// is set (by systemd's `BindIPv6Only=ipv6-only`, or the
    /// net.ipv6.bindv6only sysctl).
    pub v6only: bool,
    /// The host's own interface addresses (port 0; link-local ones with
    /// their interface): a listener on every address answers on each.
    pub host: &'a [SocketAddr],
}

/// Reads what [`reaches`] needs from a socket lb serves.
pub fn listening<'a>(l: &std::net::TcpListener, host: &'a [SocketAddr]) -> Option<Listening<'a>> {
    let addr = local_addr(l)?;
    let v6only = addr.is_ipv6() && SockRef::from(l).only_v6().unwrap_or(false);
    Some(Listening { addr, v6only, host })
}

/// Whether a connect to `target` would reach a socket listening at
/// `listen`: a backend that is lb itself would relay every client to lb
/// again, and each relayed connection would do the same, until the cap.
pub fn reaches(target: SocketAddr, listen: Listening) -> bool {
    if target.port() != listen.addr.port() {
        return false;
    }
    // An IPv4-mapped address (::ffff:127.0.0.1) is an IPv4 connect.
    let t = target.ip().to_canonical();
    let l = listen.addr.ip().to_canonical();
    if l.is_unspecified() {
        let family_taken = t.is_ipv4() == l.is_ipv4() || (l.is_ipv6() && !listen.v6only);
        family_taken
            && (t.is_loopback()
                || t.is_unspecified()
                || listen.host.iter().any(|&h| crate::net::same_address(target, h)))
    } else {
        // Connecting to the unspecified address reaches 127.0.0.1 or ::1.
        let unspecified_reaches = match t {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        };
        crate::net::same_address(target, listen.addr) || (t.is_unspecified() && l == unspecified_reaches)
    }
}

/// Whether sockets listening at `a` and at `b` (each with its
/// IPV6_V6ONLY) cannot both be bound: the same port, and addresses that
/// overlap, as Linux judges it (inet_rcv_saddr_equal). Port 0 clashes
/// with nothing: the kernel picks a port that is free.
pub fn clashes(a: SocketAddr, a_v6only: bool, b: SocketAddr, b_v6only: bool) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    // An IPv4-mapped address (::ffff:127.0.0.1) is bound as IPv4.
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    // An IPv6 socket on every address takes IPv4 too, unless IPV6_V6ONLY.
    let takes_ipv4 = |ip: IpAddr, v6only: bool| ip.is_ipv6() && ip.is_unspecified() && !v6only;
    if x.is_ipv4() != y.is_ipv4() {
        return takes_ipv4(x, a_v6only) || takes_ipv4(y, b_v6only);
    }
    x.is_unspecified() || y.is_unspecified() || crate::net::same_address(a, b)
}

/// Whether an IPv6 socket that does not set IPV6_V6ONLY (lb's own do
/// not) gets it all the same: the net.ipv6.bindv6only sysctl, off
/// unless set, and taken as off if it cannot be read.
pub fn default_v6only() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1")
}

/// The addresses of the host's interfaces (getifaddrs(3)); empty if they
/// cannot be read, which only narrows what [`reaches`] sees.
pub fn host_addresses() -> Vec<SocketAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut at = head;
    while !at.is_null() {
        // SAFETY: every node of the list is valid until freeifaddrs, and
        // ifa_addr points at a sockaddr of the family it names.
        unsafe {
            let sa = (*at).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(sa as *const libc::sockaddr_in);
                        out.push(SocketAddr::from((u32::from_be(v4.sin_addr.s_addr).to_be_bytes(), 0)));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(sa as *const libc::sockaddr_in6);
                        let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
                        out.push(SocketAddr::V6(std::net::SocketAddrV6::new(ip, 0, 0, v6.sin6_scope_id)));
                    }
                    _ => {}
                }
            }
            at = (*at).ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn socket_for(addr: SocketAddr, reuse_port: bool) -> Result<Socket, ListenError> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))
        .map_err(|e| classify_bind(addr, "socket", e))?;
    // SO_REUSEADDR lets a restarted lb bind while old connections sit in TIME_WAIT.
    sock.set_reuse_address(true).map_err(|e| classify_bind(addr, "SO_REUSEADDR", e))?;
    if reuse_port {
        sock.set_reuse_port(true).map_err(|e| classify_bind(addr, "SO_REUSEPORT", e))?;
    }
    // Accepted sockets inherit TCP_NODELAY: one setsockopt here instead of
    // one per client.
    sock.set_tcp_nodelay(true).map_err(|e| classify_bind(addr, "TCP_NODELAY", e))?;
    Ok(sock)
}

/// Binds `count` listeners on `addr`, one per worker, that the kernel
/// load-balances between. Port 0 picks one free port shared by all.
pub fn bind(addr: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, ListenError> {
    // With SO_REUSEPORT a second lb would silently share the port and take
    // half the clients; a plain bind first makes "already in use" an error.
    let probe = socket_for(addr, false)?;
    probe.bind(&addr.into()).map_err(|e| classify_bind(addr, "bind", e))?;
    let actual = probe.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(addr);
    drop(probe);

    let mut out = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let sock = socket_for(actual, true)?;
        sock.bind(&actual.into()).map_err(|e| classify_bind(actual, "bind", e))?;
        sock.listen(BACKLOG).map_err(|e| classify_bind(actual, "listen", e))?;
        out.push(sock.into());
    }
    Ok(out)
}

/// Turns inherited listening descriptors into per-worker listeners: each
/// worker gets its own duplicate of every socket.
pub fn from_inherited(
    fds: Vec<std::os::fd::OwnedFd>,
    count: usize,
) -> Result<Vec<Vec<std::net::TcpListener>>, ListenError> {
    if fds.len() > MAX_LISTENERS {
        return Err(ListenError::TooManyInherited { count: fds.len() });
    }
    let base: Vec<std::net::TcpListener> = fds.into_iter().map(std::net::TcpListener::from).collect();
    let mut per_worker = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let mut mine = Vec::with_capacity(base.len());
        for l in &base {
            let dup = l.try_clone().map_err(|source| ListenError::Inherited { source })?;
            dup.set_nonblocking(true).map_err(|source| ListenError::Inherited { source })?;
            SockRef::from(&dup).set_tcp_nodelay(true).map_err(|source| ListenError::Inherited { source })?;
            mine.push(dup);
        }
        per_worker.push(mine);
    }
    Ok(per_worker)
}

/// Local address of a listener, for logs.
pub fn local_addr(l: &std::net::TcpListener) -> Option<SocketAddr> {
    SockRef::from(l).local_addr().ok().and_then(|a| a.as_socket())
}

/// Raises the soft descriptor limit to the hard limit: every client costs
/// two descriptors and the default soft limit (1024) is far too low.
/// Returns the limit now in force.
// The casts are no-ops where rlim_t is u64; it is u32 on 32-bit targets.
#[allow(clippy::unnecessary_cast)]
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok());
    match fd_limit_plan(lim.rlim_cur as u64, lim.rlim_max as u64, nr_open) {
        Some((cur, max)) => {
            let want = libc::rlimit { rlim_cur: cur as libc::rlim_t, rlim_max: max as libc::rlim_t };
            // SAFETY: setrlimit only reads the struct.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(cur)
        }
        None => Ok(lim.rlim_cur as u64),
    }
}

/// The (soft, hard) descriptor limits to set, if the soft one can go up.
/// The kernel refuses any hard limit above `fs.nr_open` (EPERM), even one
/// already in force (unlimited, or set before nr_open was lowered): there
/// both go to nr_open, the most a process can have.
fn fd_limit_plan(soft: u64, hard: u64, nr_open: Option<u64>) -> Option<(u64, u64)> {
    let hard = nr_open.map_or(hard, |n| hard.min(n));
    (soft < hard).then_some((hard, hard))
}

/// Descriptors kept back for the margin: the systemd notify socket, /proc
/// reads, a log destination reopened, and whatever else a thread briefly
/// needs.
const FD_MARGIN: usize = 16;

/// Descriptors lb holds besides its connections and pipes: stdio, each
/// worker's epoll and waker, the listeners, signal handling, the health
/// prober (its epoll and one probe per backend), the admin endpoint (its
/// listener, epoll, reserve and client cap) and a margin.
pub fn reserved_fds(workers: usize, listeners: usize, backends: usize, admin: bool) -> usize {
    let admin = if admin { 3 + crate::admin::MAX_CLIENTS } else { 0 };
    3 + 2 * workers + listeners + 2 + (1 + backends) + admin + FD_MARGIN
}

/// What the descriptor limit allows. Connections and pipes take two
/// descriptors each. `None` when `connections` and `pipes` all fit in
/// `limit` beside `reserved`; otherwise the most that fit, in the same
/// proportion (HAProxy sizes an unset maxconn the same way).
pub fn fit_fd_limit(limit: u64, reserved: usize, connections: usize, pipes: usize) -> Option<(usize, usize)> {
    let pairs = usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(reserved) / 2;
    let wanted = connections.saturating_add(pipes);
    if wanted <= pairs {
        return None;
    }
    // u128: pairs * connections cannot overflow. At least one connection
    // while one fits: pipes far outnumbering connections would round the
    // proportion down to none, and lb would refuse to start.
    let fitted = ((pairs as u128 * connections as u128 / wanted as u128) as usize).max(pairs.min(1));
    Some((fitted, (pairs - fitted).min(pipes)))
}

/// Descriptors that `connections` and `pipes` need beside `reserved`.
pub fn fds_needed(reserved: usize, connections: usize, pipes: usize) -> usize {
    reserved.saturating_add(connections.saturating_add(pipes).saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_and_pipes_that_fit_the_descriptor_limit_are_left_alone() {
        let reserved = reserved_fds(2, 2, 2, false);
        assert_eq!(fit_fd_limit(1_048_576, reserved, 1000, 250), None);
        let exact = fds_needed(reserved, 1000, 250) as u64;
        assert_eq!(fit_fd_limit(exact, reserved, 1000, 250), None);
    }

    #[test]
    fn a_limit_too_low_keeps_the_proportion_of_pipes_to_connections() {
        // 1024 (a common soft limit) less 100 reserved leaves 462 pairs.
        assert_eq!(fit_fd_limit(1024, 100, 1000, 250), Some((369, 93)));
        assert_eq!(fit_fd_limit(1024, 100, 1000, 0), Some((462, 0)));
        let (c, p) = fit_fd_limit(1024, 100, 1000, 250).expect("too low");
        assert!(fds_needed(100, c, p) <= 1024);
    }

    #[test]
    fn pipes_far_outnumbering_connections_still_leave_a_connection_that_fits() {
        let (c, p) = fit_fd_limit(1024, 100, 1000, 1_000_000).expect("too low");
        assert!(c >= 1, "no connection left of 462 pairs ({c}, {p})");
        assert!(fds_needed(100, c, p) <= 1024);
        assert_eq!(fit_fd_limit(102, 100, 1000, 250), Some((1, 0)), "room for exactly one connection");
    }

    #[test]
    fn a_limit_below_the_reserve_leaves_no_connection() {
        assert_eq!(fit_fd_limit(20, 30, 1000, 250), Some((0, 0)));
        assert_eq!(fit_fd_limit(0, 30, 1, 0), Some((0, 0)));
    }

    #[test]
    fn the_reserve_counts_the_admin_endpoint_and_one_probe_per_backend() {
        let without = reserved_fds(2, 2, 3, false);
        assert_eq!(reserved_fds(2, 2, 3, true), without + 3 + crate::admin::MAX_CLIENTS);
        assert_eq!(reserved_fds(2, 2, 4, false), without + 1);
        assert_eq!(reserved_fds(3, 3, 3, false), without + 3, "a worker's epoll, waker and listener");
    }

    #[test]
    fn the_soft_fd_limit_rises_to_the_hard_one_capped_at_nr_open() {
        assert_eq!(fd_limit_plan(1024, 524_288, Some(1_048_576)), Some((524_288, 524_288)));
        assert_eq!(fd_limit_plan(1024, u64::MAX, Some(1_048_576)), Some((1_048_576, 1_048_576)));
        assert_eq!(fd_limit_plan(1024, 4096, None), Some((4096, 4096)));
        assert_eq!(fd_limit_plan(4096, 4096, Some(1_048_576)), None);
        assert_eq!(fd_limit_plan(2_000_000, 2_000_000, Some(1_048_576)), None, "never lowered");
    }

    #[test]
    fn port_zero_gives_every_worker_the_same_port() {
        let ls = bind("127.0.0.1:0".parse().unwrap(), 3).expect("bind");
        let ports: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap().port()).collect();
        assert_ne!(ports[0], 0);
        assert!(ports.iter().all(|p| *p == ports[0]));
    }

    #[test]
    fn accepted_sockets_inherit_tcp_nodelay() {
        let ls = bind("127.0.0.1:0".parse().unwrap(), 1).expect("bind");
        ls[0].set_nonblocking(false).unwrap();
        let _c = std::net::TcpStream::connect(ls[0].local_addr().unwrap()).unwrap();
        let (accepted, _) = ls[0].accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn a_port_held_by_another_socket_is_reported_in_use() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind(held.local_addr().unwrap(), 1).expect_err("port is taken");
        assert!(matches!(err, ListenError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("already in use"));
    }

    fn reaches_with(target: &str, listen: &str, v6only: bool, host: &[&str]) -> bool {
        let host: Vec<SocketAddr> = host.iter().map(|h| h.parse().unwrap()).collect();
        reaches(target.parse().unwrap(), Listening { addr: listen.parse().unwrap(), v6only, host: &host })
    }

    #[test]
    fn a_target_on_the_listeners_own_address_and_port_reaches_it() {
        for (target, listen) in [
            ("127.0.0.1:80", "127.0.0.1:80"),
            ("127.0.0.1:80", "0.0.0.0:80"),
            ("127.0.0.2:80", "0.0.0.0:80"),
            ("0.0.0.0:80", "0.0.0.0:80"),
            ("0.0.0.0:80", "127.0.0.1:80"),
            ("127.0.0.1:80", "[::]:80"),
            ("[::1]:80", "[::]:80"),
            ("[::]:80", "[::1]:80"),
            ("10.1.2.3:80", "10.1.2.3:80"),
        ] {
            assert!(reaches_with(target, listen, false, &[]), "{target} reaches {listen}");
        }
        for (target, listen) in [
            ("127.0.0.1:81", "127.0.0.1:80"),
            ("127.0.0.2:80", "127.0.0.1:80"),
            ("[::1]:80", "0.0.0.0:80"),
            ("10.1.2.3:80", "0.0.0.0:80"),
            ("0.0.0.0:80", "10.1.2.3:80"),
        ] {
            assert!(!reaches_with(target, listen, false, &[]), "{target} does not reach {listen}");
        }
    }

    #[test]
    fn the_unspecified_address_reaches_only_127_0_0_1_or_the_ipv6_loopback() {
        assert!(reaches_with("0.0.0.0:80", "127.0.0.1:80", false, &[]));
        assert!(!reaches_with("0.0.0.0:80", "127.0.0.5:80", false, &[]));
        assert!(reaches_with("[::]:80", "[::1]:80", false, &[]));
        assert!(!reaches_with("[::]:80", "127.0.0.1:80", false, &[]));
    }

    #[test]
    fn a_link_local_backend_on_another_link_is_not_a_link_local_listener() {
        assert!(reaches_with("[fe80::1%2]:80", "[fe80::1%2]:80", false, &[]));
        assert!(!reaches_with("[fe80::1%3]:80", "[fe80::1%2]:80", false, &[]));
    }

    #[test]
    fn an_ipv6_listener_on_every_address_set_v6only_takes_no_ipv4_backend() {
        assert!(!reaches_with("127.0.0.1:80", "[::]:80", true, &[]));
        assert!(!reaches_with("0.0.0.0:80", "[::]:80", true, &[]));
        assert!(!reaches_with("[::ffff:127.0.0.1]:80", "[::]:80", true, &[]));
        assert!(reaches_with("[::1]:80", "[::]:80", true, &[]));
    }

    #[test]
    fn an_ipv4_mapped_backend_address_is_the_ipv4_address() {
        assert!(reaches_with("[::ffff:127.0.0.1]:80", "127.0.0.1:80", false, &[]));
        assert!(reaches_with("[::ffff:127.0.0.1]:80", "0.0.0.0:80", false, &[]));
        assert!(!reaches_with("[::ffff:127.0.0.1]:81", "0.0.0.0:80", false, &[]));
    }

    #[test]
    fn the_hosts_own_interface_address_reaches_a_listener_on_every_address() {
        let host = ["10.1.2.3:0", "[fe80::1%2]:0"];
        assert!(reaches_with("10.1.2.3:80", "0.0.0.0:80", false, &host));
        assert!(reaches_with("10.1.2.3:80", "[::]:80", false, &host));
        assert!(reaches_with("[fe80::1%2]:80", "[::]:80", false, &host));
        assert!(!reaches_with("[fe80::1%3]:80", "[::]:80", false, &host), "another link, another machine");
        assert!(!reaches_with("10.1.2.4:80", "0.0.0.0:80", false, &host));
        assert!(!reaches_with("10.1.2.3:80", "[::]:80", true, &host));
        assert!(!reaches_with("10.1.2.3:80", "10.1.2.4:80", false, &host));
    }

    fn clash(a: &str, b: &str) -> bool {
        let (a, b) = (a.parse().unwrap(), b.parse().unwrap());
        let either = clashes(a, false, b, false);
        assert_eq!(either, clashes(b, false, a, false), "{a} and {b} clash in either order");
        either
    }

    #[test]
    fn overlapping_addresses_on_the_same_port_clash() {
        assert!(clash("127.0.0.1:80", "127.0.0.1:80"));
        assert!(clash("0.0.0.0:80", "127.0.0.1:80"));
        assert!(clash("[::]:80", "[::]:80"));
        assert!(clash("[::]:80", "[::1]:80"));
        assert!(clash("[fe80::1%2]:80", "[fe80::1%2]:80"));
        assert!(clash("[::ffff:127.0.0.1]:80", "127.0.0.1:80"));
        assert!(clash("[::ffff:127.0.0.1]:80", "0.0.0.0:80"));
    }

    #[test]
    fn other_ports_or_addresses_that_do_not_overlap_do_not_clash() {
        assert!(!clash("127.0.0.1:80", "127.0.0.1:81"));
        assert!(!clash("0.0.0.0:80", "[::1]:81"));
        assert!(!clash("127.0.0.1:80", "127.0.0.2:80"));
        assert!(!clash("[::1]:80", "127.0.0.1:80"));
        assert!(!clash("[::1]:80", "0.0.0.0:80"), "a specific IPv6 address takes no IPv4");
        assert!(!clash("[fe80::1%2]:80", "[fe80::1%3]:80"), "another link");
    }

    #[test]
    fn port_zero_clashes_with_nothing() {
        assert!(!clash("0.0.0.0:0", "0.0.0.0:0"));
        assert!(!clash("127.0.0.1:0", "127.0.0.1:0"));
        assert!(!clash("[::]:0", "0.0.0.0:0"));
    }

    #[test]
    fn an_ipv6_socket_on_every_address_takes_ipv4_unless_v6only() {
        let (any6, any4, lo4): (SocketAddr, SocketAddr, SocketAddr) =
            ("[::]:80".parse().unwrap(), "0.0.0.0:80".parse().unwrap(), "127.0.0.1:80".parse().unwrap());
        assert!(clash("[::]:80", "0.0.0.0:80"));
        assert!(clash("[::]:80", "127.0.0.1:80"));
        assert!(!clashes(any6, true, any4, false));
        assert!(!clashes(lo4, false, any6, true));
        // Both on every IPv6 address: the same address, v6only or not.
        assert!(clashes(any6, true, any6, false));
    }

    #[test]
    fn a_listening_socket_set_v6only_is_read_as_such() {
        let host = [];
        for only in [true, false] {
            let sock = Socket::new(Domain::IPV6, Type::STREAM, None).expect("IPv6 socket");
            sock.set_only_v6(only).expect("IPV6_V6ONLY");
            sock.bind(&"[::]:0".parse::<SocketAddr>().unwrap().into()).expect("bind");
            sock.listen(1).expect("listen");
            let l: std::net::TcpListener = sock.into();
            assert_eq!(listening(&l, &host).expect("bound").v6only, only);
        }
    }

    #[test]
    fn the_hosts_addresses_include_loopback() {
        let host = host_addresses();
        assert!(host.contains(&SocketAddr::from(([127, 0, 0, 1], 0))), "{host:?}");
    }

    #[test]
    fn an_address_no_interface_has_is_reported_as_not_local() {
        // The documentation ranges, which test machines do take for their
        // own network (this one's eth0 is 192.0.2.2): one the host lacks.
        let host = host_addresses();
        let addr = ["192.0.2.1:0", "198.51.100.1:0", "203.0.113.1:0", "192.0.2.254:0"]
            .iter()
            .map(|a| a.parse::<SocketAddr>().unwrap())
            .find(|a| !host.contains(a))
            .expect("an address the host lacks");
        let err = bind(addr, 1).expect_err("no interface has it");
        assert!(matches!(err, ListenError::NotLocal { .. }), "{err}");
        assert_eq!(err.to_string(), format!("cannot listen on {addr}: no interface of this host has that address"));
    }

    #[test]
    fn a_link_local_address_on_the_wrong_interface_names_that_interface() {
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        let addr = SocketAddr::V6(std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 0, 0, lo));
        let err = bind(addr, 1).expect_err("lo has no link-local address");
        assert!(matches!(err, ListenError::NotLocal { .. }), "{err}");
        assert_eq!(err.to_string(), "cannot listen on [fe80::1%lo]:0: interface lo does not have that address");
        // The zone of any other address names no link.
        let addr = SocketAddr::V6(std::net::SocketAddrV6::new("2001:db8::1".parse().unwrap(), 0, 0, lo));
        let err = bind(addr, 1).expect_err("no interface has it");
        assert!(err.to_string().ends_with(": no interface of this host has that address"), "{err}");
    }

    #[test]
    fn inherited_sockets_are_duplicated_per_worker() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let per = from_inherited(vec![l.into()], 2).unwrap();
        assert_eq!(per.len(), 2);
        assert_eq!(per[1][0].local_addr().unwrap(), addr);
    }
}
