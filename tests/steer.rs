//! How lb spreads new clients over its workers (`--steer`): with the
//! eBPF program loaded, each client goes to the worker holding the fewest,
//! as `/metrics` shows; without the privilege to load it, `auto` falls
//! back to the kernel's hash and `always` refuses to start.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::admin::{admin_addr, scrape};
use common::*;

/// One small message through the echo backend on a held connection.
fn echo_on(c: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    c.write_all(data).expect("send");
    let mut back = vec![0; data.len()];
    c.read_exact(&mut back).expect("echo");
    back
}

/// Each worker's load as lb's /metrics gives it.
fn loads(admin: std::net::SocketAddr, workers: usize) -> Vec<i64> {
    let e = scrape(admin);
    (0..workers).map(|i| e.value("lb_worker_load", &[("worker", &i.to_string())]) as i64).collect()
}

/// lb steering clients over `workers` workers, in front of a new echo
/// backend, and its admin address; `None` (the test is skipped) unless
/// this runs as root where bpf(2) is allowed, which `what` needs.
fn steering_lb(workers: &str, what: &str) -> Option<(Backend, Proc, std::net::SocketAddr)> {
    if !bpf_allowed() {
        eprintln!("skipped: {what} needs root and bpf(2)");
        return None;
    }
    let backend = echo_backend();
    let lb = lb(&[backend.addr], &["--workers", workers, "--admin", "127.0.0.1:0", "--steer", "always"]);
    let admin = admin_addr(&lb);
    Some((backend, lb, admin))
}

#[test]
fn each_new_client_goes_to_the_worker_holding_the_fewest() {
    let Some((_backend, lb, admin)) = steering_lb("3", "loading the steering program") else { return };
    assert_eq!(loads(admin, 3), [0, 0, 0]);

    // Clients held open, with the worker each went to: the one whose load
    // rose. They take turns, so the loads never drift more than one apart.
    let mut held: Vec<(usize, TcpStream)> = Vec::new();
    for k in 0..12u64 {
        let before = loads(admin, 3);
        let mut c = connect(lb.addr);
        assert_eq!(echo_on(&mut c, &k.to_be_bytes()), k.to_be_bytes());
        let after = loads(admin, 3);
        let rose: Vec<usize> = (0..3).filter(|&i| after[i] == before[i] + 1).collect();
        assert_eq!(rose.len(), 1, "one worker took client {k}: {before:?} -> {after:?}");
        assert_eq!(after.iter().sum::<i64>(), k as i64 + 1, "{after:?}");
        assert!(after.iter().max().unwrap() - after.iter().min().unwrap() <= 1, "uneven after client {k}: {after:?}");
        held.push((rose[0], c));
    }

    // Worker 1's clients leave: the next four all go there, where the
    // hash would send each to any of the three.
    held.retain(|(w, _)| *w != 1);
    assert!(
        wait_until(WAIT, || loads(admin, 3) == [4, 0, 4]),
        "worker 1 still counts its clients: {:?}",
        loads(admin, 3)
    );
    for k in 0..4u64 {
        let mut c = connect(lb.addr);
        assert_eq!(echo_on(&mut c, &k.to_be_bytes()), k.to_be_bytes());
        held.push((1, c));
    }
    assert_eq!(loads(admin, 3), [4, 4, 4]);
}

/// Sends bare TCP segments with `flags` to `port` on 127.0.0.1 from
/// `count` source ports nothing listens on, through a raw socket (root).
fn raw_segments(port: u16, flags: u8, count: u16) {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor owned by no one else.
    let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
        sin_zero: [0; 8],
    };
    for i in 0..count {
        let mut h = [0u8; 20];
        h[0..2].copy_from_slice(&(61000 + i).to_be_bytes());
        h[2..4].copy_from_slice(&port.to_be_bytes());
        h[4..8].copy_from_slice(&(0x1000_0000u32 + u32::from(i)).to_be_bytes());
        if flags & 0x10 != 0 {
            h[8..12].copy_from_slice(&0x2000_0000u32.to_be_bytes());
        }
        h[12] = 5 << 4;
        h[13] = flags;
        h[14..16].copy_from_slice(&65535u16.to_be_bytes());
        // The checksum over the pseudo-header (both addresses, protocol,
        // length) and the header.
        let mut sum: u32 = 0x7f00 + 0x0001 + 0x7f00 + 0x0001 + 6 + 20;
        for w in h.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        h[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        // SAFETY: sending a local buffer to a valid sockaddr_in.
        let sent = unsafe {
            libc::sendto(
                fd,
                h.as_ptr().cast(),
                h.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(sent, 20, "sendto: {}", std::io::Error::last_os_error());
    }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

#[test]
fn segments_that_open_no_connection_leave_the_loads_as_they_were() {
    let Some((_backend, lb, admin)) = steering_lb("2", "sending raw segments") else { return };
    // Stray ACKs and FINs (a closed connection's last segments) reach the
    // listener too; the program must not count them as clients.
    raw_segments(lb.addr.port(), ACK, 40);
    raw_segments(lb.addr.port(), FIN | ACK, 40);
    let mut c = connect(lb.addr);
    assert_eq!(echo_on(&mut c, b"one"), b"one");
    assert_eq!(loads(admin, 2).iter().sum::<i64>(), 1, "only the real client counts: {:?}", loads(admin, 2));
    // A SYN whose handshake never completes (a scan, a flood) counts at
    // first, and each worker forgets it within a scan even if no client
    // comes its way.
    raw_segments(lb.addr.port(), SYN, 20);
    assert!(wait_until(WAIT, || loads(admin, 2).iter().sum::<i64>() == 21), "{:?}", loads(admin, 2));
    assert!(
        wait_until(WAIT, || loads(admin, 2).iter().sum::<i64>() == 1),
        "SYNs never forgotten: {:?}",
        loads(admin, 2)
    );
    assert_eq!(echo_on(&mut c, b"two"), b"two");
}

#[test]
fn with_steer_never_the_kernel_hash_spreads_clients_and_no_loads_are_shown() {
    let backend = echo_backend();
    let lb = lb(&[backend.addr], &["--admin", "127.0.0.1:0", "--steer", "never"]);
    let mut c = connect(lb.addr);
    assert_eq!(echo_on(&mut c, b"hello"), b"hello");
    let text = common::admin::get(admin_addr(&lb), "/metrics").body;
    assert!(!text.contains("lb_worker_load"), "{text}");
    assert!(!lb.stderr_text().contains("steering"), "{}", lb.stderr_text());
}

/// lb with two workers in front of a new echo backend, CAP_BPF and
/// CAP_SYS_ADMIN out of its reach (root keeps the rest), and `extra`.
fn lb_without_bpf(extra: &[&str]) -> (Backend, Command) {
    let backend = echo_backend();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-bpf,-sys_admin", "--inh-caps", "-bpf,-sys_admin", lb_bin()])
        .args(["-p", "0", "--bind", "127.0.0.1", "--workers", "2", "-b", &backend.addr.to_string()])
        .args(extra);
    (backend, cmd)
}

#[test]
fn steer_always_without_the_privilege_is_a_one_line_start_up_error() {
    if !is_root() {
        eprintln!("skipped: setpriv can drop capabilities only as root");
        return;
    }
    let (_backend, cmd) = lb_without_bpf(&["--steer", "always"]);
    let (code, err) = output_within_wait(cmd);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: --steer always: cannot load the eBPF program"), "{err}");
    assert!(err.contains("Operation not permitted") && err.contains("CAP_BPF"), "{err}");
}

#[test]
fn steer_auto_without_the_privilege_says_so_and_serves() {
    if !is_root() {
        eprintln!("skipped: setpriv can drop capabilities only as root");
        return;
    }
    let (_backend, cmd) = lb_without_bpf(&[]);
    let lb = spawn_listening_cmd(cmd);
    let mut c = connect(lb.addr);
    assert_eq!(echo_on(&mut c, b"hello"), b"hello");
    let log = lb.stderr_text();
    assert!(log.contains("steering: cannot load the eBPF program"), "{log}");
    assert!(log.contains("kernel's hash"), "{log}");
}

#[test]
fn cap_bpf_alone_is_enough_to_steer() {
    if !bpf_allowed() {
        eprintln!("skipped: setpriv can change user and capabilities only as root, and bpf(2) must be allowed");
        return;
    }
    // A copy that user nobody can run, wherever the checkout is.
    let dir = scratch_dir("lb-steer");
    let bin = dir.join("lb");
    std::fs::copy(lb_bin(), &bin).expect("copy lb");
    for p in [&dir, &bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let backend = echo_backend();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps",
        "+bpf",
        "--ambient-caps",
        "+bpf",
    ])
    .arg(&bin)
    .args([
        "-p",
        "0",
        "--bind",
        "127.0.0.1",
        "--workers",
        "2",
        "-b",
        &backend.addr.to_string(),
        "--steer",
        "always",
    ]);
    let lb = spawn_listening_cmd(cmd);
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = connect(lb.addr);
    assert_eq!(echo_on(&mut c, b"hello"), b"hello");
    assert!(
        lb.wait_stderr(|l| l.contains("steering: each new client goes to the worker holding the fewest"), WAIT),
        "{}",
        lb.stderr_text()
    );
}
