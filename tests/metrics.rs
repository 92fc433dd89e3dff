//! What operators read: the stats report on stdout (shape, growth, SIGUSR1,
//! period) and the `--admin` endpoint (`/metrics` as strict Prometheus text
//! whose counters equal the traffic sent, `/stats` as JSON with the same
//! numbers, `/health`, and how it treats bad or slow clients).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use common::admin::{Exposition, admin_addr, get, parse_exposition, parse_json, raw_request, scrape};
use common::*;

/// A pattern piece: literal text, or a run of characters of one class.
enum Piece {
    Lit(&'static str),
    Digits,
    HostPort,
    Word,
    Millis,
}

/// Matches `line` against `pattern` exactly, returning the captured runs.
/// (The repository keeps to its dependency list, so no regex crate.)
fn shape<'a>(pattern: &[Piece], line: &'a str) -> Option<Vec<&'a str>> {
    fn go<'a>(p: &[Piece], s: &'a str, caps: &mut Vec<&'a str>) -> bool {
        let Some((first, rest)) = p.split_first() else { return s.is_empty() };
        let class: fn(char) -> bool = match first {
            Piece::Lit(l) => return s.strip_prefix(l).is_some_and(|r| go(rest, r, caps)),
            Piece::Digits => |c| c.is_ascii_digit(),
            Piece::HostPort => |c| c.is_ascii_alphanumeric() || ".:[]-".contains(c),
            Piece::Word => |c| c.is_ascii_uppercase(),
            Piece::Millis => |c| c.is_ascii_digit() || "./nams".contains(c),
        };
        let run = s.find(|c: char| !class(c)).unwrap_or(s.len());
        // Longest first; backtrack for classes that overlap the next literal.
        for len in (1..=run).rev() {
            caps.push(&s[..len]);
            if go(rest, &s[len..], caps) {
                return true;
            }
            caps.pop();
        }
        false
    }
    let mut caps = Vec::new();
    go(pattern, line, &mut caps).then_some(caps)
}

/// One backend line of a report.
#[derive(Debug)]
struct Row {
    index: usize,
    name: String,
    healthy: bool,
    active: u64,
    total: u64,
    failed: u64,
    bytes_in: u64,
    bytes_out: u64,
    p50: String,
    p99: String,
}

fn is_millis(s: &str) -> bool {
    s == "n/a"
        || s.strip_suffix("ms").and_then(|n| n.split_once('.')).is_some_and(|(a, b)| {
            !a.is_empty() && b.len() == 3 && a.chars().chain(b.chars()).all(|c| c.is_ascii_digit())
        })
}

/// Checks a whole report block strictly and returns its rows.
fn parse_report(lines: &[String]) -> (u64, Vec<Row>) {
    use Piece::*;
    assert_eq!(lines.first().map(String::as_str), Some("=== Load Balancer Stats ==="), "{lines:#?}");
    assert_eq!(lines.last().map(String::as_str), Some("============================"), "{lines:#?}");
    let total = shape(&[Lit("Total Active Connections: "), Digits], &lines[1])
        .unwrap_or_else(|| panic!("bad total line {:?}", lines[1]))[0]
        .parse()
        .expect("number");
    let row = [
        Lit("Backend["),
        Digits,
        Lit("] "),
        HostPort,
        Lit(": Status="),
        Word,
        Lit(", Active="),
        Digits,
        Lit(", Total="),
        Digits,
        Lit(", Failed="),
        Digits,
        Lit(", BytesIn="),
        Digits,
        Lit(", BytesOut="),
        Digits,
        Lit(", ConnectP50="),
        Millis,
        Lit(", ConnectP99="),
        Millis,
    ];
    let rows = lines[2..lines.len() - 1]
        .iter()
        .map(|l| {
            let c = shape(&row, l).unwrap_or_else(|| panic!("bad backend line {l:?}"));
            assert!(c[2] == "HEALTHY" || c[2] == "UNHEALTHY", "{l}");
            assert!(is_millis(c[8]) && is_millis(c[9]), "{l}");
            let n = |i: usize| c[i].parse::<u64>().expect("number");
            Row {
                index: n(0) as usize,
                name: c[1].to_string(),
                healthy: c[2] == "HEALTHY",
                active: n(3),
                total: n(4),
                failed: n(5),
                bytes_in: n(6),
                bytes_out: n(7),
                p50: c[8].to_string(),
                p99: c[9].to_string(),
            }
        })
        .collect();
    (total, rows)
}

/// Every complete report block printed so far.
fn reports(lb: &Proc) -> Vec<Vec<String>> {
    let text = lb.stdout_text();
    let mut blocks = Vec::new();
    let mut cur: Option<Vec<String>> = None;
    for line in text.lines() {
        if line == "=== Load Balancer Stats ===" {
            cur = Some(Vec::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push(line.to_string());
            if line == "============================" {
                blocks.extend(cur.take());
            }
        }
    }
    blocks
}

/// Sends SIGUSR1 and returns the report it printed.
fn report_now(lb: &Proc) -> (u64, Vec<Row>) {
    let before = reports(lb).len();
    lb.signal(libc::SIGUSR1);
    assert!(wait_until(WAIT, || reports(lb).len() > before), "no report after SIGUSR1: {}", lb.stdout_text());
    parse_report(&reports(lb)[before])
}

#[test]
fn sighup_prints_the_report_and_lb_carries_on_serving() {
    // Before, SIGHUP's default action killed lb and every connection with
    // it, e.g. when the terminal it was started from closed.
    let a = be("Server A", &[]);
    let lb = lb(&[a.addr], &["--stats-period", "0", "--no-health-check"]);
    let mut held = connect(lb.addr);
    held.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n").expect("send");
    let mut head = [0u8; 12];
    held.read_exact(&mut head).expect("served before SIGHUP");
    let before = reports(&lb).len();
    lb.signal(libc::SIGHUP);
    assert!(wait_until(WAIT, || reports(&lb).len() > before), "no report after SIGHUP: {}", lb.stderr_text());
    let (active, _) = parse_report(&reports(&lb)[before]);
    assert_eq!(active, 1, "the held connection is still open");
    // And new clients are still served (request_through checks the answer).
    request_through(lb.addr, "/");
}

/// One HTTP request through lb on a fresh connection, read to EOF; returns
/// the bytes sent and received.
fn request_through(lb: SocketAddr, path: &str) -> (usize, usize) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
    let mut s = connect(lb);
    s.write_all(req.as_bytes()).expect("send");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to EOF");
    assert!(got.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&got));
    (req.len(), got.len())
}

#[test]
fn the_stats_report_has_the_operators_shape_grows_with_traffic_and_sigusr1_prints_it() {
    let a = be("Server A", &[]);
    let b = be("Server B", &[]);
    let lb = lb(&[a.addr, b.addr], &["--stats-period", "0"]);
    let (active, rows) = report_now(&lb);
    assert_eq!(active, 0);
    assert_eq!(rows.len(), 2);
    for (i, (r, addr)) in rows.iter().zip([a.addr, b.addr]).enumerate() {
        assert_eq!((r.index, r.name.as_str()), (i, addr.to_string().as_str()));
        assert!(r.healthy && r.active == 0 && r.total == 0 && r.failed == 0, "{r:?}");
        assert_eq!((r.bytes_in, r.bytes_out, r.p50.as_str(), r.p99.as_str()), (0, 0, "n/a", "n/a"));
    }

    let n = 10;
    let (mut sent, mut received) = (0, 0);
    for _ in 0..n {
        let (s, r) = request_through(lb.addr, "/");
        sent += s;
        received += r;
    }
    // Byte counts are published when a pair closes, just after the client
    // saw its EOF: wait for the report to catch up.
    let mut last = None;
    assert!(
        wait_until(WAIT, || {
            let (active, rows) = report_now(&lb);
            let done = active == 0
                && rows.iter().map(|r| r.total).sum::<u64>() == n
                && rows.iter().map(|r| r.bytes_in).sum::<u64>() == sent as u64
                && rows.iter().map(|r| r.bytes_out).sum::<u64>() == received as u64;
            last = Some(rows);
            done
        }),
        "report never matched the traffic: {last:?}"
    );
    let rows = last.expect("a report");
    assert!(rows.iter().all(|r| r.total > 0 && r.p50 != "n/a" && r.p99 != "n/a"), "both served: {rows:?}");
}

#[test]
fn the_report_is_printed_every_stats_period_without_a_signal() {
    let a = be("Server A", &[]);
    let lb = lb(&[a.addr], &["--stats-period", "0.3"]);
    assert!(wait_until(WAIT, || reports(&lb).len() >= 2), "{}", lb.stdout_text());
    for block in reports(&lb) {
        let (_, rows) = parse_report(&block);
        assert_eq!(rows.len(), 1);
    }
}

#[test]
fn a_stats_period_shorter_than_the_supervisor_tick_keeps_its_cadence() {
    // --stats-period accepts 0.01; the reports must come that often, not at
    // the supervisor's own 200 ms tick. The clock to compare with is lb's own
    // health prober on the same 50 ms period, not the wall clock: a busy
    // machine slows both alike, so the ratio holds where a deadline would not.
    let a = be("Server A", &[]);
    let addr = a.addr.to_string();
    let lb = lb(&[a.addr], &["--stats-period", "0.05", "--health-check-period", "0.05", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&lb);
    let probes = || scrape(admin).value("lb_backend_health_checks_total", &[("backend", &addr), ("result", "ok")]);
    assert!(wait_until(WAIT, || !reports(&lb).is_empty()), "{}", lb.stdout_text());
    let (first_reports, first_probes) = (reports(&lb).len(), probes());
    // 40 probe rounds are 2 s at the set period.
    assert!(wait_until(WAIT * 2, || probes() >= first_probes + 40.0), "the prober stalled");
    let (n_reports, n_probes) = (reports(&lb).len() - first_reports, probes() - first_probes);
    // At the tick there would be a quarter as many reports as probes.
    assert!(
        n_reports as f64 >= n_probes / 2.0,
        "{n_reports} stats reports while the prober ran {n_probes} rounds, both at a 50 ms period"
    );
}

#[test]
fn metrics_parse_as_prometheus_text_and_counters_match_the_traffic() {
    let a = be("Server A", &[]);
    let b = be("Server B", &[]);
    let lb = lb(
        &[a.addr, b.addr],
        &["--health-check-url", "/health", "--health-check-period", "0.2", "--admin", "127.0.0.1:0"],
    );
    let admin = admin_addr(&lb);
    let r = get(admin, "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/plain; version=0.0.4; charset=utf-8"));

    let n = 12;
    let (mut sent, mut received) = (0, 0);
    for _ in 0..n {
        let (s, r) = request_through(lb.addr, "/");
        sent += s;
        received += r;
    }
    let mut m = Exposition::default();
    let matched = wait_until(WAIT, || {
        m = scrape(admin);
        m.value("lb_connections_active", &[]) == 0.0
            && m.sum("lb_backend_received_bytes_total") == received as f64
            && m.sum("lb_backend_sent_bytes_total") == sent as f64
    });
    assert!(matched, "byte counters never matched: {m:?}");
    // The splice/copy split is published with the backends' bytes, so one
    // scrape never shows the two disagreeing.
    assert_eq!(m.sum("lb_relayed_bytes_total"), (sent + received) as f64, "relayed bytes lag the backends' bytes");
    assert_eq!(m.value("lb_connections_accepted_total", &[]), n as f64);
    assert_eq!(m.sum("lb_backend_connections_total"), n as f64);
    assert_eq!(m.sum("lb_backend_connect_failures_total"), 0.0);
    assert_eq!(m.value("lb_connections_no_backend_total", &[]), 0.0);
    assert_eq!(m.value("lb_cap_pauses_total", &[]), 0.0);
    assert_eq!(m.value("lb_connections_max", &[]), 1000.0);
    assert_eq!(m.value("lb_draining", &[]), 0.0);
    assert_eq!(m.value("lb_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(m.types["lb_backend_connect_duration_seconds"], "histogram");
    for addr in [a.addr, b.addr] {
        let label = addr.to_string();
        assert_eq!(m.backend("lb_backend_up", addr), 1.0);
        assert_eq!(m.backend("lb_backend_active_connections", addr), 0.0);
        let conns = m.backend("lb_backend_connections_total", addr);
        assert!(conns > 0.0, "least connections used both backends");
        assert_eq!(m.backend("lb_backend_connect_duration_seconds_count", addr), conns);
        assert_eq!(
            m.value("lb_backend_connect_duration_seconds_bucket", &[("backend", &label), ("le", "+Inf")]),
            conns
        );
        assert!(m.backend("lb_backend_connect_duration_seconds_sum", addr) > 0.0);
        assert!(m.value("lb_backend_health_checks_total", &[("backend", &label), ("result", "ok")]) >= 1.0);
    }

    // /stats carries the same numbers.
    let s = get(admin, "/stats");
    assert_eq!(s.status, 200);
    assert_eq!(s.header("Content-Type"), Some("application/json"));
    let j = parse_json(&s.body).unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", s.body));
    assert_eq!(j.get("connections").get("accepted").num(), n as f64);
    assert_eq!(j.get("connections").get("active").num(), 0.0);
    assert_eq!(j.get("draining"), &common::admin::Json::Bool(false));
    let backends = j.get("backends").items();
    assert_eq!(backends.len(), 2);
    let total_received: f64 = backends.iter().map(|b| b.get("received_bytes").num()).sum();
    assert_eq!(total_received, received as f64);
    for (entry, addr) in backends.iter().zip([a.addr, b.addr]) {
        assert_eq!(entry.get("name"), &common::admin::Json::String(addr.to_string()));
        assert_eq!(entry.get("connections").num(), m.backend("lb_backend_connections_total", addr));
        assert_eq!(entry.get("sent_bytes").num(), m.backend("lb_backend_sent_bytes_total", addr));
        assert_eq!(entry.get("up"), &common::admin::Json::Bool(true));
        assert_eq!(entry.get("connect_seconds").get("count").num(), m.backend("lb_backend_connections_total", addr));
    }

    let h = get(admin, "/health");
    assert_eq!((h.status, h.body.as_str()), (200, "OK\n"));
}

#[test]
fn bad_admin_requests_get_400_404_or_405_and_lb_keeps_serving() {
    let a = be("Server A", &[]);
    let lb = lb(&[a.addr], &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&lb);

    assert_eq!(get(admin, "/nope").status, 404);
    assert_eq!(get(admin, "/metrics/").status, 404);
    assert_eq!(raw_request(admin, b"garbage\r\n\r\n").status, 400);
    assert_eq!(raw_request(admin, b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n").status, 400);
    assert_eq!(raw_request(admin, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03").status, 400);
    // A head cut short by the client's FIN is answered, not dropped.
    let mut s = TcpStream::connect(admin).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n").expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("closed after the answer");
    assert!(!raw.is_empty(), "a half-closed partial head got no answer");
    assert_eq!(common::admin::parse_response(&raw).status, 400);
    let post = raw_request(admin, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((post.status, post.header("Allow")), (405, Some("GET, HEAD")));
    let head = raw_request(admin, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert!(head.header("Content-Length").is_some_and(|l| l != "0"), "HEAD tells the GET length");

    // An oversized head gets 400 and the connection is closed.
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    big.resize(9 * 1024, b'a');
    let mut s = TcpStream::connect(admin).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let _ = s.write_all(&big); // the server may stop reading part-way
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("closed after the 400");
    assert_eq!(common::admin::parse_response(&raw).status, 400);

    // lb still relays and still answers scrapes.
    assert!(request_through(lb.addr, "/").0 > 0);
    let m = scrape(admin);
    assert_eq!(m.value("lb_connections_accepted_total", &[]), 1.0);
    assert_eq!(get(admin, "/health").status, 200);
}

#[test]
fn slow_admin_clients_are_cut_off_and_cannot_pin_the_endpoint() {
    let a = be("Server A", &[]);
    let lb = lb(&[a.addr], &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&lb);
    // As many idle connections as the endpoint serves at once, each holding
    // half a request head; the scrape below is one more.
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(admin).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\n").expect("partial head");
            s.set_read_timeout(Some(WAIT)).expect("timeout");
            s
        })
        .collect();
    // The data path does not care.
    assert!(request_through(lb.addr, "/").0 > 0);
    // A real scrape is served once the deadline frees the slots.
    let r = get(admin, "/health");
    assert_eq!(r.status, 200);
    for mut s in idle {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a slow client was not cut off: {other:?}"),
        }
    }
}

#[test]
fn health_answers_503_while_draining() {
    let a = be("Server A", &[]);
    let lb = lb(&[a.addr], &["--admin", "127.0.0.1:0", "--drain-timeout", "20"]);
    let admin = admin_addr(&lb);
    // A keep-alive client holds the drain open.
    let mut held = connect(lb.addr);
    held.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n").expect("send");
    let mut buf = [0u8; 256];
    assert!(held.read(&mut buf).expect("response") > 0);
    assert_eq!(get(admin, "/health").status, 200);
    lb.signal(libc::SIGTERM);
    assert!(wait_until(WAIT, || get(admin, "/health").status == 503), "{}", lb.stderr_text());
    assert_eq!(get(admin, "/health").body, "draining\n");
    assert_eq!(scrape(admin).value("lb_draining", &[]), 1.0);
}

#[test]
fn the_exposition_parser_rejects_what_prometheus_would() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
    assert!(parse_exposition(ok).is_ok());
    let bad = [
        "a_total 1\n",                                              // no TYPE
        "# TYPE a_total counter\na_total{x=1} 3\n",                 // unquoted label
        "# TYPE a_total counter\na_total 3",                        // no final newline
        "# TYPE a counter\na 3\n",                                  // counter without _total
        "# TYPE a_total counter\na_total 1\na_total 2\n",           // duplicate series
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"y\"} 1\n", // family split in two
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
        "# TYPE 1a gauge\n1a 1\n",                                        // bad name
        "# TYPE a gauge\na 1.2.3\n",                                      // bad value
    ];
    for text in bad {
        assert!(parse_exposition(text).is_err(), "accepted {text:?}");
    }
}

#[test]
fn promtool_accepts_the_metrics_when_it_is_installed() {
    // .ci/run installs promtool, so CI always checks; a developer without
    // it still gets parse_exposition's checks from the other tests.
    let Ok(out) = Command::new("promtool").arg("--version").output() else {
        assert!(std::env::var_os("CI").is_none(), "promtool is missing on CI (.ci/run installs prometheus)");
        println!("note: promtool not found; skipping (the Debian 'prometheus' package ships it)");
        return;
    };
    assert!(out.status.success());
    let a = be("Server A", &[]);
    let lb = lb(&[a.addr, dead_addr()], &["--admin", "127.0.0.1:0", "--health-check-period", "0.2"]);
    let admin = admin_addr(&lb);
    request_through(lb.addr, "/");
    let body = get(admin, "/metrics").body;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}\n{body}");
}

#[test]
fn a_taken_admin_port_is_a_one_line_start_up_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let (code, err) = lb_output(&["-p", "0", "--bind", "127.0.0.1", "-b", "127.0.0.1:9", "--admin", &addr]);
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: --admin: cannot listen on") && last.contains("in use"), "{err}");
}

#[test]
fn debug_logs_name_the_client_in_each_line_of_its_connection() {
    let echo = echo_backend();
    let lb = lb_env(&[echo.addr], &["--no-health-check"], &[("RUST_LOG", "debug")]);
    // Two clients at once, as an operator reading the log would see them.
    let (mut one, mut two) = (connect(lb.addr), connect(lb.addr));
    for (c, msg) in [(&mut one, &b"ping"[..]), (&mut two, &b"a longer message"[..])] {
        c.write_all(msg).expect("write");
        assert_eq!(read_n(c, msg.len()), msg);
    }
    let backend = echo.addr.to_string();
    for (c, len) in [(one, 4), (two, 16)] {
        let client = c.local_addr().expect("addr").to_string();
        drop(c);
        let lines = |l: &str| l.contains(&format!("client {client}: "));
        let closed = format!("; {len} bytes to {backend}, {len} bytes from it");
        assert!(
            lb.wait_stderr(|l| lines(l) && l.contains(": closed (") && l.contains(&closed), WAIT),
            "no close line for {client} with its bytes: {}",
            lb.stderr_text()
        );
        let log = lb.stderr_text();
        for step in ["accepted by worker", &format!("connected to {backend} in ")] {
            assert!(log.lines().any(|l| lines(l) && l.contains(step)), "no '{step}' line for {client}: {log}");
        }
    }
}

#[test]
fn debug_logs_name_the_client_in_a_failed_connect_and_in_a_cut_at_shutdown() {
    let echo = echo_backend();
    let dead = dead_addr();
    // One worker, whose first pick is the first backend: the dead one.
    let args = ["--no-health-check", "--workers", "1", "--drain-timeout", "0"];
    let mut lb = lb_env(&[dead, echo.addr], &args, &[("RUST_LOG", "debug")]);
    let mut c = connect(lb.addr);
    c.write_all(b"ping").expect("write");
    assert_eq!(read_n(&mut c, 4), b"ping");
    let client = c.local_addr().expect("addr").to_string();
    // stderr is gathered by a reader thread, so a line lb has written may
    // not be in it yet: wait for it rather than look once.
    let logged = |lb: &Proc, what: &str| {
        let line = format!("client {client}: {what}");
        lb.wait_stderr(|l| l.contains(&line), WAIT)
    };
    assert!(logged(&lb, &format!("connect to {dead} failed")), "{}", lb.stderr_text());
    // Still open when lb stops: cut, and logged as such.
    lb.signal(libc::SIGTERM);
    assert!(lb.wait_exit(WAIT).is_some(), "lb did not stop");
    assert!(logged(&lb, "closed (Shutdown) after "), "{}", lb.stderr_text());
}
