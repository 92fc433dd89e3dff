//! A worker whose event loop fails makes lb exit non-zero, so that systemd
//! (Restart=on-failure) sees the fault instead of a clean stop. The fault is
//! injected for real: every epoll descriptor lb created is replaced with
//! /dev/null, so the workers' epoll calls fail with EINVAL. It runs lb
//! in-process, alone in this test binary, because it sabotages descriptors
//! process-wide.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;

use clap::Parser;
use common::{WAIT, dead_addr, wait_until};
use lb::config::{Args, Config};

/// Descriptors of this process that are epoll instances.
fn epoll_fds() -> Vec<i32> {
    let mut fds = Vec::new();
    for entry in fs::read_dir("/proc/self/fd").expect("list /proc/self/fd").flatten() {
        let is_epoll = fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:[eventpoll]");
        if is_epoll && let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            fds.push(fd);
        }
    }
    fds
}

#[test]
fn workers_whose_event_loop_fails_make_lb_exit_with_an_error() {
    let before = epoll_fds();
    let backend = dead_addr().to_string();
    let args = Args::try_parse_from([
        "lb",
        "--bind",
        "127.0.0.1",
        "-p",
        "0",
        "--workers",
        "2",
        "--no-health-check",
        "--stats-period",
        "0",
        "-b",
        &backend,
    ])
    .expect("valid flags");
    let config = Config::from_args(&args).expect("valid config");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(lb::run(config, Vec::new()));
    });

    // One epoll instance per worker exists once run() has set them up.
    let mut created = Vec::new();
    assert!(
        wait_until(WAIT, || {
            created = epoll_fds().into_iter().filter(|fd| !before.contains(fd)).collect();
            created.len() >= 2
        }),
        "lb never created its event loops"
    );
    let null = fs::File::open("/dev/null").expect("open /dev/null");
    for fd in &created {
        // SAFETY: replaces an epoll descriptor lb owns with /dev/null; lb
        // later closes it as its own, which is what a dup2 target is for.
        assert!(unsafe { libc::dup2(null.as_raw_fd(), *fd) } >= 0, "dup2 onto fd {fd}");
    }

    let result = rx.recv_timeout(WAIT * 2).expect("lb::run returned after its workers failed");
    let err = result.expect_err("lb::run reported success although every worker failed");
    let text = err.to_string();
    assert_eq!(text, "2 of 2 workers failed (see the log above)");
}
