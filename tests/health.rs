//! Health checking seen from outside: active TCP and HTTP probes, passive
//! detection on client traffic, the hold-down with probes off, and what a
//! client gets when no backend is up. Backend state is read from the admin
//! endpoint's `lb_backend_up`; every wait is a deadline loop.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::admin::{admin_addr, raw_request, scrape, wait_backend};
use common::*;

/// Short periods keep these tests to seconds.
const PERIOD: f64 = 0.2;
const FALL: u32 = 2;
const RISE: u32 = 2;
/// Long beside the probes' loopback round trips, so that a loaded machine
/// does not take a healthy backend down; the dead ones here refuse at once.
const TIMEOUT: f64 = 2.0;
/// Headroom over the computed bounds for a loaded machine.
const SLACK: Duration = Duration::from_secs(3);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn probe_flags() -> Vec<String> {
    [
        "--health-check-period".to_string(),
        PERIOD.to_string(),
        "--fall".into(),
        FALL.to_string(),
        "--rise".into(),
        RISE.to_string(),
        "--health-check-timeout".into(),
        TIMEOUT.to_string(),
        "--admin".into(),
        "127.0.0.1:0".into(),
    ]
    .to_vec()
}

fn lb_with(backends: &[SocketAddr], extra: &[&str]) -> Proc {
    let flags = probe_flags();
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    lb(backends, &all)
}

/// One HTTP request through lb on a fresh connection; the body names the
/// backend that answered.
fn who_answers(lb: SocketAddr) -> String {
    let r = raw_request(lb, b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200);
    r.body.trim().to_string()
}

/// Starts `be` again on the port a killed one had.
fn be_on(addr: SocketAddr, name: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> =
        vec!["-p".into(), addr.port().to_string(), "-c".into(), name.into(), "--workers".into(), "1".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_listening(be_bin(), &args, &[])
}

fn count_lines(lb: &Proc, needle: &str) -> usize {
    lb.stderr_text().lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_killed_backend_is_reported_down_and_avoided_then_returns_when_restarted() {
    let a = be("Server A", &[]);
    let b = be("Server B", &[]);
    let (a_addr, b_addr) = (a.addr, b.addr);
    let lb = lb_with(&[a_addr, b_addr], &["--stats-period", "0"]);
    let admin = admin_addr(&lb);
    let answered: Vec<String> = (0..4).map(|_| who_answers(lb.addr)).collect();
    assert!(answered.iter().any(|s| s == "Server A"), "{answered:?}");

    drop(a); // killed
    let killed = Instant::now();
    let bound = secs(PERIOD * f64::from(FALL) + TIMEOUT);
    assert!(
        wait_backend(admin, a_addr, false, bound + SLACK),
        "A still up {:?} after the kill: {}",
        killed.elapsed(),
        lb.stderr_text()
    );
    // The operators' report says so too.
    lb.signal(libc::SIGUSR1);
    let line = format!("{a_addr}: Status=UNHEALTHY");
    assert!(lb.wait_stdout(|l| l.contains(&line), WAIT), "{}", lb.stdout_text());
    assert!(
        lb.wait_stderr(|l| l.contains(&format!("backend {a_addr} is DOWN: connection refused")), WAIT),
        "{}",
        lb.stderr_text()
    );

    let before = scrape(admin).backend("lb_backend_connections_total", a_addr);
    for i in 0..20 {
        assert_eq!(who_answers(lb.addr), "Server B", "client {i} after A went down");
    }
    let after = scrape(admin);
    assert_eq!(after.backend("lb_backend_connections_total", a_addr), before, "no new client went to A");
    assert_eq!(after.backend("lb_backend_up", b_addr), 1.0);

    let a = be_on(a_addr, "Server A", &[]);
    let restarted = Instant::now();
    let bound = secs(PERIOD * f64::from(RISE));
    assert!(
        wait_backend(admin, a.addr, true, bound + SLACK),
        "A still down {:?} after the restart: {}",
        restarted.elapsed(),
        lb.stderr_text()
    );
    lb.signal(libc::SIGUSR1);
    let line = format!("{a_addr}: Status=HEALTHY");
    assert!(lb.wait_stdout(|l| l.contains(&line), WAIT), "{}", lb.stdout_text());
    let served_by_a = (0..20).map(|_| who_answers(lb.addr)).any(|s| s == "Server A");
    assert!(served_by_a, "A gets traffic again");
    // The lines are written by lb's logging thread and collected by the
    // test's reader: once a flip shows, its line may still be on the way.
    assert!(lb.wait_stderr(|l| l.contains(&format!("backend {a_addr} is UP")), WAIT), "{}", lb.stderr_text());
    assert_eq!(count_lines(&lb, &format!("backend {a_addr} is DOWN")), 1, "one line per flip");
    assert_eq!(count_lines(&lb, &format!("backend {a_addr} is UP")), 1, "one line per flip");
    assert_eq!(count_lines(&lb, &format!("backend {b_addr} is")), 0, "B never flipped");
}

#[test]
fn the_http_probe_marks_a_503_backend_down_and_a_200_backend_up() {
    let sick = be("Server A", &["--health-status", "503"]);
    let fine = be("Server B", &[]);
    let sick_addr = sick.addr;
    let lb = lb_with(&[sick_addr, fine.addr], &["--health-check-url", "/health"]);
    let admin = admin_addr(&lb);
    assert!(wait_backend(admin, sick_addr, false, WAIT), "{}", lb.stderr_text());
    assert!(
        lb.wait_stderr(
            |l| l.contains(&format!("backend {sick_addr} is DOWN: HTTP 503 ({FALL} consecutive failed health checks)")),
            WAIT
        ),
        "{}",
        lb.stderr_text()
    );
    // More failed probes while down log nothing more.
    assert!(wait_until(WAIT, || {
        scrape(admin)
            .value("lb_backend_health_checks_total", &[("backend", &sick_addr.to_string()), ("result", "failed")])
            >= f64::from(FALL + 3)
    }));
    assert_eq!(count_lines(&lb, &format!("backend {sick_addr} is DOWN")), 1);
    let m = scrape(admin);
    let fine_label = fine.addr.to_string();
    assert!(m.value("lb_backend_health_checks_total", &[("backend", &fine_label), ("result", "ok")]) >= 1.0);
    assert_eq!(m.value("lb_backend_health_checks_total", &[("backend", &fine_label), ("result", "failed")]), 0.0);
    assert_eq!(m.backend("lb_backend_up", fine.addr), 1.0);

    drop(sick);
    let healed = be_on(sick_addr, "Server A", &[]);
    assert!(wait_backend(admin, healed.addr, true, WAIT), "{}", lb.stderr_text());
    assert!(
        lb.wait_stderr(
            |l| l.contains(&format!(
                "backend {sick_addr} is UP: HTTP 200 ({RISE} consecutive successful health checks)"
            )),
            WAIT
        ),
        "{}",
        lb.stderr_text()
    );
}

/// lb sending HTTP probes every 0.2 s (down after 2 failures, up after 2
/// successes) that give up after `timeout` seconds.
fn lb_probing_http(backends: &[SocketAddr], timeout: &str) -> Proc {
    let flags = ["--health-check-url", "/health", "--health-check-period", "0.2", "--fall", "2", "--rise", "2"];
    let mut all = flags.to_vec();
    all.extend(["--health-check-timeout", timeout, "--admin", "127.0.0.1:0"]);
    lb(backends, &all)
}

#[test]
fn a_probe_waiting_on_a_silent_backend_does_not_delay_the_others() {
    // The kernel completes the handshake into the backlog; nobody answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let sick = be("Server S", &["--health-status", "503"]);
    let fine = be("Server F", &[]);
    // A probe timeout the test never reaches, however slow the machine.
    let lb = lb_probing_http(&[silent_addr, sick.addr, fine.addr], "60");
    let admin = admin_addr(&lb);
    let checks = |backend: SocketAddr, result: &str| {
        scrape(admin).value("lb_backend_health_checks_total", &[("backend", &backend.to_string()), ("result", result)])
    };
    // Three rounds of the others complete while the silent backend's first
    // probe is still waiting out its timeout.
    assert!(wait_until(WAIT, || checks(sick.addr, "failed") >= 3.0 && checks(fine.addr, "ok") >= 3.0));
    assert!(!common::admin::backend_up(admin, sick.addr), "{}", lb.stderr_text());
    assert_eq!(
        checks(silent_addr, "ok") + checks(silent_addr, "failed"),
        0.0,
        "the silent backend's probe is still pending, so nothing was serialised behind it"
    );
    assert!(common::admin::backend_up(admin, silent_addr), "not down before its timeout");
    drop(silent);
}

#[test]
fn a_backend_that_never_answers_goes_down_after_the_probe_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let fine = be("Server F", &[]);
    // Long enough that the answering backend's probes never time out on a
    // loaded machine: it must stay up to take the client below.
    let lb = lb_probing_http(&[silent_addr, fine.addr], "1");
    let admin = admin_addr(&lb);
    assert!(wait_backend(admin, silent_addr, false, secs(1.0 * 2.0 + 0.4) + SLACK), "{}", lb.stderr_text());
    assert!(
        lb.wait_stderr(|l| l.contains(&format!("backend {silent_addr} is DOWN: timed out")), WAIT),
        "{}",
        lb.stderr_text()
    );
    assert_eq!(who_answers(lb.addr), "Server F");
    drop(silent);
}

#[test]
fn with_probes_off_a_refusing_backend_is_marked_down_after_fall_failed_connects() {
    let dead = dead_addr();
    let live = be("Server B", &[]);
    // A long period: the hold-down keeps it down for the whole test.
    let lb = lb(
        &[dead, live.addr],
        &[
            "--no-health-check",
            "--fall",
            "2",
            "--retries",
            "1",
            "--health-check-period",
            "60",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let admin = admin_addr(&lb);
    let mut sent = 0;
    while common::admin::backend_up(admin, dead) && sent < 100 {
        // Every client is served: a refused connect is retried on B.
        assert_eq!(who_answers(lb.addr), "Server B");
        sent += 1;
    }
    let m = scrape(admin);
    assert_eq!(m.backend("lb_backend_up", dead), 0.0, "still up after {sent} clients");
    assert_eq!(m.backend("lb_backend_connect_failures_total", dead), 2.0, "down after exactly --fall failures");
    assert_eq!(m.sum("lb_backend_health_checks_total"), 0.0, "no probes were sent");
    assert!(
        lb.wait_stderr(
            |l| l.contains(&format!(
                "backend {dead} is DOWN: connection refused (2 consecutive failed client connects)"
            )),
            WAIT
        ),
        "{}",
        lb.stderr_text()
    );
    for _ in 0..10 {
        assert_eq!(who_answers(lb.addr), "Server B");
    }
    let m = scrape(admin);
    assert_eq!(m.backend("lb_backend_connect_failures_total", dead), 2.0, "a down backend is not tried");
    assert_eq!(m.backend("lb_backend_connections_total", live.addr), f64::from(sent + 10));
}

#[test]
fn with_probes_off_a_passively_downed_backend_is_retried_after_one_period() {
    let dead = dead_addr();
    let live = be("Server B", &[]);
    let lb = lb(
        &[dead, live.addr],
        &["--no-health-check", "--fall", "1", "--health-check-period", "0.3", "--admin", "127.0.0.1:0"],
    );
    let admin = admin_addr(&lb);
    let failures = || scrape(admin).backend("lb_backend_connect_failures_total", dead);
    for round in 1..=2 {
        assert!(
            wait_until(WAIT, || {
                assert_eq!(who_answers(lb.addr), "Server B");
                failures() >= f64::from(round)
            }),
            "round {round}: the dead backend was never tried"
        );
        assert_eq!(failures(), f64::from(round), "one failure takes it down with --fall 1");
        // Back in rotation after the hold-down, so traffic tests it again.
        assert!(wait_backend(admin, dead, true, secs(0.3 * 1.25) + SLACK), "{}", lb.stderr_text());
    }
    assert!(
        lb.wait_stderr(|l| l.contains(&format!("backend {dead} is UP: retrying with client traffic")), WAIT),
        "{}",
        lb.stderr_text()
    );
}

#[test]
fn with_no_backend_up_a_client_is_closed_at_once_and_counted() {
    let [d1, d2] = dead_addrs();
    let lb = lb(&[d1, d2], &["--health-check-period", "0.2", "--fall", "1", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&lb);
    assert!(wait_backend(admin, d1, false, WAIT) && wait_backend(admin, d2, false, WAIT));
    let before = scrape(admin);
    // Reset, as a refused connect would be: a FIN would read as an empty
    // but complete reply. (The reset may come before connect returns.)
    let end = std::net::TcpStream::connect(lb.addr).and_then(|mut c| {
        c.set_read_timeout(Some(Duration::from_secs(1)))?;
        c.read(&mut [0u8; 16])
    });
    match end {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(0) => panic!("the client got a clean end, not a reset"),
        Ok(n) => panic!("got {n} bytes from nowhere"),
        Err(e) => panic!("client not reset within a second: {e}"),
    }
    assert!(wait_until(WAIT, || scrape(admin).value("lb_connections_no_backend_total", &[]) == 1.0));
    let after = scrape(admin);
    assert_eq!(
        after.value("lb_connections_accepted_total", &[]),
        before.value("lb_connections_accepted_total", &[]) + 1.0
    );
    assert_eq!(
        after.sum("lb_backend_connect_failures_total"),
        before.sum("lb_backend_connect_failures_total"),
        "no connect was attempted"
    );
    assert_eq!(after.value("lb_connections_active", &[]), 0.0);
}

#[test]
fn a_probe_timeout_equal_to_the_period_still_probes_every_round() {
    // The kernel completes the handshake into the backlog; nobody answers,
    // so every HTTP probe of it runs out its whole timeout.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let dead = dead_addr();
    let lb = lb(
        &[silent_addr, dead],
        &[
            "--health-check-url",
            "/health",
            "--health-check-period",
            "0.2",
            "--health-check-timeout",
            "0.2",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let admin = admin_addr(&lb);
    let failed = |backend: SocketAddr| {
        scrape(admin)
            .value("lb_backend_health_checks_total", &[("backend", &backend.to_string()), ("result", "failed")])
    };
    // The refusing backend fails at once, once per round: it counts the
    // rounds. The silent one must fail once per round too, not every other.
    assert!(wait_until(WAIT, || failed(dead) >= 12.0), "{}", lb.stderr_text());
    let (rounds, timed_out) = (failed(dead), failed(silent_addr));
    assert!(timed_out >= rounds - 2.0, "{timed_out} timed-out probes in {rounds} rounds");
    drop(silent);
}
