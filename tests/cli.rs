//! Command-line errors: one line naming the flag and a non-zero exit, and
//! start-up failures (port in use, privileges, unresolvable hosts).

mod common;

use std::process::Command;

use common::*;

fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, err) = lb_output(args);
    assert!(matches!(code, Some(c) if c != 0), "{args:?} exited with {code:?}");
    let err = err.trim_end();
    assert_eq!(err.lines().count(), 1, "{args:?} printed more than one line: {err}");
    assert!(err.contains(needle), "{args:?}: '{err}' does not mention {needle}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn every_bad_value_is_one_line_naming_its_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["-p", "70000"], "--port"),
        (&["-p", "abc"], "--port"),
        (&["-b", "nohost"], "--backends"),
        (&["-b", "127.0.0.1:8080@0"], "--backends"),
        (&["-b", "127.0.0.1:99999"], "--backends"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--buffer-size", "0"], "--buffer-size"),
        (&["--workers", "0"], "--workers"),
        (&["--connection-timeout", "soon"], "--connection-timeout"),
        (&["--idle-timeout", "-1"], "--idle-timeout"),
        (&["--retries", "x"], "--retries"),
        (&["--drain-timeout", "inf"], "--drain-timeout"),
        (&["--bind", "999.0.0.1"], "--bind"),
        (&["--health-check-period", "0"], "--health-check-period"),
        (&["--health-check-timeout", "-1"], "--health-check-timeout"),
        (&["--rise", "0"], "--rise"),
        (&["--fall", "many"], "--fall"),
        (&["--health-check-url", "health"], "--health-check-url"),
        (&["--health-check-url", "/a\r\nHost: evil"], "--health-check-url"),
        (&["--stats-period", "-5"], "--stats-period"),
        (&["--admin", "9100"], "--admin"),
        (&["--splice", "sometimes"], "--splice"),
        (&["--max-pipes", "-4"], "--max-pipes"),
        (&["--max-pipes", "8", "--splice", "never"], "--max-pipes"),
        (&["--bind", "fe80::1%no-such-interface"], "--bind"),
        (&["--workers", "100000000000"], "--workers"),
        (&["--stats-period", "1e19"], "--stats-period"),
        (&["--drain-timeout", "1e19"], "--drain-timeout"),
        (&["--connection-timeout", "1e19", "--no-health-check"], "--connection-timeout"),
        (&["--health-check-period", "1e-9"], "--health-check-period"),
        // Below a nanosecond: once read as 0, which means "off" here.
        (&["-p", "0", "--bind", "127.0.0.1", "-b", "127.0.0.1:9", "--stats-period", "1e-10"], "--stats-period"),
        (&["--frobnicate"], "--frobnicate"),
        // clap's tip is kept on the one line.
        (&["--backend", "127.0.0.1:80"], "similar argument exists: '--backends'"),
        // Not looked up as the host "2001:db8:" with port 1.
        (&["-b", "2001:db8::1"], "[::1]:80"),
        (&["--max-connections", "99999999999999999999"], "out of range"),
        // Probe settings that would do nothing without probes.
        (&["--no-health-check", "--health-check-url", "/h"], "cannot be used with"),
        (&["--rise", "3", "--no-health-check"], "cannot be used with"),
        // A value quoted in the error must not break it into lines.
        (&["-p", "8\n0"], "--port"),
        (&["-b", "a\nb:x"], "--backends"),
        // Accepted, these would serve (hence a free port): a backend listed
        // twice doubles its share and duplicates its /metrics series.
        (&["-p", "0", "--bind", "127.0.0.1", "-b", "127.0.0.1:9", "127.0.0.1:9@2"], "--backends"),
        (&["-p", "0", "--bind", "127.0.0.1", "-b", "[::1]:9", "[0:0:0:0:0:0:0:1]:9"], "--backends"),
    ];
    for (args, flag) in cases {
        assert_one_line_error(args, flag);
    }
}

#[test]
fn help_and_version_exit_zero() {
    let out = Command::new(lb_bin()).arg("--help").output().expect("run lb --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let flags =
        ["--port", "--backends", "--max-connections", "--drain-timeout", "--idle-timeout", "--splice", "--max-pipes"];
    for flag in flags {
        assert!(help.contains(flag), "help lacks {flag}");
    }
    let out = Command::new(lb_bin()).arg("-V").output().expect("run lb -V");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lb "));
}

#[test]
fn a_port_in_use_is_a_one_line_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    assert_one_line_error(&["--bind", "127.0.0.1", "-p", &port, "-b", "127.0.0.1:1"], "already in use");
}

/// A name no resolver can look up: a label longer than 63 bytes is refused
/// by the stub resolver before any query is built.
const UNRESOLVABLE: &str = "this-label-is-longer-than-sixty-three-characters-so-no-dns-query-is-sent.invalid:80";

#[test]
fn an_unresolvable_host_is_a_one_line_error_without_network_access() {
    // In a fresh network namespace with only loopback (when we may create
    // one) not even a malformed query can leave the machine.
    let isolated = Command::new("unshare").args(["-n", "--", "true"]).status().is_ok_and(|s| s.success());
    let (code, err) = if isolated {
        let mut cmd = Command::new("unshare");
        cmd.args(["-n", "--", lb_bin(), "-b", UNRESOLVABLE]);
        output_within_wait(cmd)
    } else {
        lb_output(&["-b", UNRESOLVABLE])
    };
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    let err = err.trim_end();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--backends") && err.contains("cannot resolve"), "{err}");
}

#[test]
fn a_privileged_port_without_permission_is_a_one_line_error() {
    // The listener and the admin endpoint alike name the cause.
    for args in [&["-p", "81"][..], &["-p", "0", "--admin", "127.0.0.1:81"]] {
        let (code, err) = output_within_wait(unprivileged(args));
        assert!(matches!(code, Some(c) if c != 0), "{args:?}: exit {code:?}: {err}");
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(last.contains("permission denied") && last.contains("CAP_NET_BIND_SERVICE"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// lb on 127.0.0.1 with `args`, without the right to bind low ports. As
/// root it drops to nobody with setpriv so the bind really is refused.
/// Where unprivileged ports start at 0 (net.ipv4.ip_unprivileged_port_start)
/// the bind succeeds and lb serves: output_within_wait then fails the test
/// instead of hanging it.
fn unprivileged(args: &[&str]) -> Command {
    let as_root = is_root();
    let mut cmd = if as_root {
        let have_setpriv = Command::new("setpriv").arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(have_setpriv, "setpriv (util-linux) is needed to drop privileges in this test");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]);
        cmd.arg(lb_bin());
        cmd
    } else {
        Command::new(lb_bin())
    };
    cmd.args(["--bind", "127.0.0.1", "-b", "127.0.0.1:1"]).args(args);
    cmd
}

#[test]
fn a_descriptor_limit_too_low_names_the_limit_and_what_it_needs() {
    // Too many workers for the limit too: their listeners were bound
    // first, and the failing socket() was reported instead.
    for (limit, workers) in [(20, "1"), (1024, "1024")] {
        let mut cmd = lb_under_fd_limit(limit);
        cmd.args(["-p", "0", "--bind", "127.0.0.1", "-b", "127.0.0.1:1", "--workers", workers]);
        let (code, err) = output_within_wait(cmd);
        assert_eq!(code, Some(1), "limit {limit}, {workers} workers: {err}");
        let err = err.trim_end();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&format!("the descriptor limit ({limit}) leaves no room")), "{err}");
    }
}

#[test]
fn a_backend_that_is_lbs_own_listener_is_refused_at_start_up() {
    let port = common::free_port();
    let own = format!("127.0.0.1:{port}");
    let (code, err) = lb_output(&["--bind", "127.0.0.1", "-p", &port.to_string(), "-b", "127.0.0.1:1", &own]);
    assert_eq!(code, Some(2), "a command-line error: {err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "error: --backends: '{own}' is lb's own listening address ({own}); lb would relay every client to itself"
        )
    );
}

#[test]
fn a_backend_that_is_lbs_own_admin_endpoint_is_refused_at_start_up() {
    let admin = format!("127.0.0.1:{}", common::free_port());
    let (code, err) = lb_output(&["--bind", "127.0.0.1", "-p", "0", "--admin", &admin, "-b", "127.0.0.1:1", &admin]);
    assert_eq!(code, Some(2), "a command-line error: {err}");
    assert_eq!(
        err.trim_end(),
        format!("error: --backends: '{admin}' is lb's own admin endpoint ({admin}); clients would be relayed to it")
    );
}

#[test]
fn an_admin_address_that_overlaps_lbs_own_listener_is_refused_before_binding() {
    // The port is held here: refused before lb binds anything, lb would
    // otherwise fail on --bind with "already in use".
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port().to_string();
    let admin = format!("127.0.0.1:{port}");
    let (code, err) = lb_output(&["--admin", &admin, "-p", &port, "--bind", "127.0.0.1", "-b", "127.0.0.1:1"]);
    assert_eq!(code, Some(2), "a command-line error: {err}");
    assert_eq!(
        err.trim_end(),
        format!("error: --admin: {admin} overlaps lb's own listening address ({admin}); give one of them another port")
    );
    // Every address, and the IPv6 one that takes IPv4 too.
    let port = common::free_port().to_string();
    for (bind, admin, listen) in [
        ("0.0.0.0", format!("0.0.0.0:{port}"), format!("0.0.0.0:{port}")),
        ("0.0.0.0", format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}")),
        ("::", format!("[::]:{port}"), format!("[::]:{port}")),
    ] {
        let (code, err) = lb_output(&["-p", &port, "--bind", bind, "-b", "127.0.0.1:1", "--admin", &admin]);
        assert_eq!(code, Some(2), "--bind {bind} --admin {admin}: {err}");
        assert!(err.contains(&format!("--admin: {admin} overlaps lb's own listening address ({listen})")), "{err}");
    }
}
