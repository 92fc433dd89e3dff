//! Machine-readable renderings of a [`Snapshot`]: the Prometheus text
//! exposition format (version 0.0.4) served at `/metrics`, and the same
//! numbers as JSON for `/stats`. Pure functions; the admin endpoint
//! ([`crate::admin`]) does the serving.
//!
//! Naming follows the Prometheus conventions: an `lb_` prefix, `_total` on
//! counters, seconds and bytes as units, one `backend="host:port"` label
//! per backend (the backend as written on the command line).
//!
//! `lb_cap_pauses_total` counts how often a worker stopped accepting because
//! `--max-connections` was reached. lb never refuses a client at the cap:
//! extra clients wait in the kernel's listen backlog until a slot frees, so
//! this is the honest "rejected at cap" signal, not a count of clients.

use std::fmt::Write as _;

use crate::stats::{BUCKETS, BackendSnapshot, Snapshot, bucket_upper_micros};

/// The `Content-Type` of [`render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Writes one family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family with one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A family with one sample per backend.
fn per_backend(
    out: &mut String,
    s: &Snapshot,
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&BackendSnapshot) -> u64,
) {
    family(out, name, kind, help);
    for b in &s.backends {
        let _ = writeln!(out, "{name}{{backend=\"{}\"}} {}", label_value(&b.name), value(b));
    }
}

/// Escapes a label value: backslash, double quote and newline.
pub fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds from microseconds, printed exactly enough for bucket bounds.
fn seconds(micros: u64) -> f64 {
    micros as f64 / 1e6
}

pub fn render_prometheus(s: &Snapshot) -> String {
    let mut out = String::with_capacity(4096 + 4096 * s.backends.len());
    family(&mut out, "lb_build_info", "gauge", "Build information of the running lb; always 1.");
    let _ = writeln!(out, "lb_build_info{{version=\"{}\"}} 1", label_value(s.version));
    single(&mut out, "lb_draining", "gauge", "1 while lb drains after a stop signal, else 0.", u64::from(s.draining));
    single(&mut out, "lb_connections_accepted_total", "counter", "Client connections accepted.", s.accepted);
    single(&mut out, "lb_connections_active", "gauge", "Client connections open now.", s.active as u64);
    single(
        &mut out,
        "lb_connections_max",
        "gauge",
        "Cap on concurrent client connections (--max-connections).",
        s.max_connections as u64,
    );
    single(
        &mut out,
        "lb_cap_pauses_total",
        "counter",
        "Times a worker stopped accepting because --max-connections was reached; clients wait in the listen backlog meanwhile.",
        s.cap_pauses,
    );
    single(
        &mut out,
        "lb_connections_no_backend_total",
        "counter",
        "Clients reset at once because no backend was up.",
        s.no_backend,
    );
    single(
        &mut out,
        "lb_connections_gave_up_total",
        "counter",
        "Clients reset because every backend connect attempt failed.",
        s.connect_gave_up,
    );
    single(
        &mut out,
        "lb_connections_descriptor_wait_timeouts_total",
        "counter",
        "Clients reset after waiting --connection-timeout for a descriptor for their backend socket.",
        s.descriptor_wait_timeouts,
    );
    single(
        &mut out,
        "lb_connections_idle_closed_total",
        "counter",
        "Client connections closed by --idle-timeout.",
        s.idle_closed,
    );
    single(
        &mut out,
        "lb_accept_errors_total",
        "counter",
        "accept() failures other than a client that left first (out of descriptors or memory, a firewall refusal); each pauses accepting for 100 ms.",
        s.accept_errors,
    );
    single(
        &mut out,
        "lb_buffer_pool_exhausted_total",
        "counter",
        "Times a connection waited because every relay buffer was in use.",
        s.pool_exhausted,
    );
    let r = &s.relay;
    family(
        &mut out,
        "lb_relayed_bytes_total",
        "counter",
        "Bytes relayed in either direction, by how they moved: splice (kernel pipes, never in user memory), copy, or kernel \
         (the kernel relay, socket to socket without waking lb).",
    );
    let _ = writeln!(out, "lb_relayed_bytes_total{{method=\"splice\"}} {}", r.bytes_spliced);
    let _ = writeln!(out, "lb_relayed_bytes_total{{method=\"copy\"}} {}", r.bytes_copied);
    let _ = writeln!(out, "lb_relayed_bytes_total{{method=\"kernel\"}} {}", r.bytes_kernel);
    single(
        &mut out,
        "lb_pipes_in_use",
        "gauge",
        "Pipes holding spliced bytes in flight (each worker's count as of its last second).",
        r.pipes_in_use,
    );
    single(&mut out, "lb_pipes_open", "gauge", "Pipes open, in use or idle; at most --max-pipes.", r.pipes_open);
    single(
        &mut out,
        "lb_buffers_in_use",
        "gauge",
        "Relay buffers holding copied bytes in flight (each worker's count as of its last second).",
        r.buffers_in_use,
    );
    single(
        &mut out,
        "lb_buffers_allocated",
        "gauge",
        "Relay buffers allocated, in use or free, each of --buffer-size bytes; kept for reuse while their event loop runs.",
        r.buffers_allocated,
    );
    family(
        &mut out,
        "lb_splice_fallbacks_total",
        "counter",
        "Times a relay direction copied instead of splicing: no pipe left under --max-pipes, or splice unsupported for its sockets.",
    );
    let _ = writeln!(out, "lb_splice_fallbacks_total{{reason=\"no_pipe\"}} {}", r.pipes_exhausted);
    let _ = writeln!(out, "lb_splice_fallbacks_total{{reason=\"unsupported\"}} {}", r.splice_unsupported);
    if !s.worker_loads.is_empty() {
        family(
            &mut out,
            "lb_worker_load",
            "gauge",
            "Clients each worker holds or has in its listen queue, as --steer counts them to pick the worker for the next.",
        );
        for (i, load) in s.worker_loads.iter().enumerate() {
            let _ = writeln!(out, "lb_worker_load{{worker=\"{i}\"}} {load}");
        }
    }

    per_backend(
        &mut out,
        s,
        "lb_backend_up",
        "gauge",
        "1 if the backend takes new clients, 0 if it is marked down.",
        |b| u64::from(b.up),
    );
    per_backend(
        &mut out,
        s,
        "lb_backend_weight",
        "gauge",
        "Weight of the backend in least-connections selection.",
        |b| u64::from(b.weight),
    );
    per_backend(
        &mut out,
        s,
        "lb_backend_active_connections",
        "gauge",
        "Client connections using or connecting to the backend now.",
        |b| b.active as u64,
    );
    per_backend(
        &mut out,
        s,
        "lb_backend_connections_total",
        "counter",
        "Connections to the backend established for clients.",
        |b| b.total,
    );
    per_backend(
        &mut out,
        s,
        "lb_backend_connect_failures_total",
        "counter",
        "Connect attempts to the backend for clients that failed.",
        |b| b.failed,
    );
    per_backend(
        &mut out,
        s,
        "lb_backend_sent_bytes_total",
        "counter",
        "Bytes relayed from clients to the backend.",
        |b| b.bytes_in,
    );
    per_backend(
        &mut out,
        s,
        "lb_backend_received_bytes_total",
        "counter",
        "Bytes relayed from the backend to clients.",
        |b| b.bytes_out,
    );

    family(&mut out, "lb_backend_health_checks_total", "counter", "Health probes of the backend, by result.");
    for b in &s.backends {
        let name = label_value(&b.name);
        let _ = writeln!(out, "lb_backend_health_checks_total{{backend=\"{name}\",result=\"ok\"}} {}", b.checks_ok);
        let _ =
            writeln!(out, "lb_backend_health_checks_total{{backend=\"{name}\",result=\"failed\"}} {}", b.checks_failed);
    }

    let h = "lb_backend_connect_duration_seconds";
    family(&mut out, h, "histogram", "Time from connect() to an established connection to the backend.");
    for b in &s.backends {
        let name = label_value(&b.name);
        let mut cumulative = 0;
        // The last bucket is open-ended: it is the +Inf line.
        for (i, count) in b.connect_time.counts.iter().enumerate().take(BUCKETS - 1) {
            cumulative += count;
            let le = seconds(bucket_upper_micros(i));
            let _ = writeln!(out, "{h}_bucket{{backend=\"{name}\",le=\"{le}\"}} {cumulative}");
        }
        let count = b.connect_time.count();
        let _ = writeln!(out, "{h}_bucket{{backend=\"{name}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{h}_sum{{backend=\"{name}\"}} {}", seconds(b.connect_time.sum_micros));
        let _ = writeln!(out, "{h}_count{{backend=\"{name}\"}} {count}");
    }
    out
}

/// Appends `s` as a JSON string literal.
pub fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON number of seconds, or `null` when there is no value.
fn json_seconds(out: &mut String, d: Option<std::time::Duration>) {
    match d {
        Some(d) => {
            let _ = write!(out, "{}", d.as_secs_f64());
        }
        None => out.push_str("null"),
    }
}

/// The `/stats` document: the same numbers as `/metrics`, grouped.
pub fn render_json(s: &Snapshot) -> String {
    let mut out = String::with_capacity(512 + 512 * s.backends.len());
    out.push_str("{\"version\":");
    json_string(&mut out, s.version);
    let _ = write!(
        out,
        ",\"draining\":{},\"connections\":{{\"active\":{},\"max\":{},\"accepted\":{},\"cap_pauses\":{},\
\"no_backend\":{},\"gave_up\":{},\"descriptor_wait_timeouts\":{},\"idle_closed\":{}}},\"accept_errors\":{},\"buffer_pool_exhausted\":{},\
\"relay\":{{\"spliced_bytes\":{},\"copied_bytes\":{},\"kernel_bytes\":{},\"buffers_in_use\":{},\"buffers_allocated\":{},\
\"pipes_in_use\":{},\"pipes_open\":{},\
\"splice_fallbacks\":{{\"no_pipe\":{},\"unsupported\":{}}}}},\"worker_loads\":[",
        s.draining,
        s.active,
        s.max_connections,
        s.accepted,
        s.cap_pauses,
        s.no_backend,
        s.connect_gave_up,
        s.descriptor_wait_timeouts,
        s.idle_closed,
        s.accept_errors,
        s.pool_exhausted,
        s.relay.bytes_spliced,
        s.relay.bytes_copied,
        s.relay.bytes_kernel,
        s.relay.buffers_in_use,
        s.relay.buffers_allocated,
        s.relay.pipes_in_use,
        s.relay.pipes_open,
        s.relay.pipes_exhausted,
        s.relay.splice_unsupported,
    );
    for (i, load) in s.worker_loads.iter().enumerate() {
        let _ = write!(out, "{}{load}", if i > 0 { "," } else { "" });
    }
    out.push_str("],\"backends\":[");
    for (i, b) in s.backends.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        json_string(&mut out, &b.name);
        out.push_str(",\"address\":");
        json_string(&mut out, &b.addr.to_string());
        let _ = write!(
            out,
            ",\"weight\":{},\"up\":{},\"active\":{},\"connections\":{},\"connect_failures\":{},\
\"sent_bytes\":{},\"received_bytes\":{},\"health_checks\":{{\"ok\":{},\"failed\":{}}},\
\"connect_seconds\":{{\"count\":{},\"sum\":{},\"p50\":",
            b.weight,
            b.up,
            b.active,
            b.total,
            b.failed,
            b.bytes_in,
            b.bytes_out,
            b.checks_ok,
            b.checks_failed,
            b.connect_time.count(),
            seconds(b.connect_time.sum_micros),
        );
        json_seconds(&mut out, b.connect_time.quantile(0.50));
        out.push_str(",\"p99\":");
        json_seconds(&mut out, b.connect_time.quantile(0.99));
        out.push_str("}}");
    }
    out.push_str("]}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::tests::sample_snapshot;

    fn lines_of<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let text = render_prometheus(&sample_snapshot());
        let mut declared: Vec<String> = Vec::new();
        let mut last_help: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                last_help = Some(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert_eq!(last_help.as_deref(), Some(name.as_str()), "TYPE right after HELP");
                assert!(!declared.contains(&name), "{name} declared twice");
                declared.push(name);
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = declared.last().expect("a sample after a TYPE");
                assert!(
                    name == family || ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{family}{s}")),
                    "{name} outside its family {family}"
                );
            }
        }
        assert!(declared.iter().all(|n| n.starts_with("lb_")));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn counters_end_in_total_and_carry_the_numbers() {
        let text = render_prometheus(&sample_snapshot());
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let parts: Vec<_> = line.split(' ').collect();
            if parts[3] == "counter" {
                assert!(parts[2].ends_with("_total"), "{line}");
            }
        }
        assert!(text.contains("\nlb_connections_accepted_total 2112\n"));
        assert!(text.contains("\nlb_cap_pauses_total 4\n"));
        assert!(text.contains("\nlb_backend_connections_total{backend=\"127.0.0.1:8081\"} 892\n"));
        assert!(text.contains("\nlb_backend_up{backend=\"127.0.0.1:8081\"} 0\n"));
        assert!(text.contains("\nlb_backend_received_bytes_total{backend=\"127.0.0.1:8080\"} 20000\n"));
        assert!(text.contains("\nlb_backend_health_checks_total{backend=\"127.0.0.1:8080\",result=\"failed\"} 1\n"));
        assert!(text.contains("lb_build_info{version=\"0.1.0\"} 1\n"));
    }

    #[test]
    fn worker_loads_are_exposed_only_while_steering() {
        let mut s = sample_snapshot();
        let text = render_prometheus(&s);
        assert!(text.contains("\nlb_worker_load{worker=\"0\"} 3\nlb_worker_load{worker=\"1\"} 4\n"), "{text}");
        s.worker_loads.clear();
        assert!(!render_prometheus(&s).contains("lb_worker_load"));
        assert!(render_json(&s).contains("\"worker_loads\":[],\"backends\""));
    }

    #[test]
    fn relay_methods_buffers_pipes_and_fallbacks_are_exposed() {
        let text = render_prometheus(&sample_snapshot());
        for line in [
            "lb_relayed_bytes_total{method=\"splice\"} 7000000",
            "lb_relayed_bytes_total{method=\"copy\"} 21000",
            "lb_relayed_bytes_total{method=\"kernel\"} 450000",
            "lb_buffers_in_use 2",
            "lb_buffers_allocated 12",
            "lb_pipes_in_use 3",
            "lb_pipes_open 6",
            "lb_splice_fallbacks_total{reason=\"no_pipe\"} 9",
            "lb_splice_fallbacks_total{reason=\"unsupported\"} 1",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} missing from\n{text}");
        }
        let json = render_json(&sample_snapshot());
        assert!(
            json.contains(
                "\"relay\":{\"spliced_bytes\":7000000,\"copied_bytes\":21000,\"kernel_bytes\":450000,\"buffers_in_use\":2,\"buffers_allocated\":12,\
\"pipes_in_use\":3,\"pipes_open\":6,\
\"splice_fallbacks\":{\"no_pipe\":9,\"unsupported\":1}},\"worker_loads\":[3,4],\"backends\":["
            ),
            "{json}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_in_seconds_and_end_at_the_count() {
        let text = render_prometheus(&sample_snapshot());
        let buckets = lines_of(&text, "lb_backend_connect_duration_seconds_bucket{backend=\"127.0.0.1:8080\"");
        assert_eq!(buckets.len(), BUCKETS);
        let mut last_le = 0.0;
        let mut last_count = 0;
        for line in &buckets {
            let le = line.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            let count: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(count >= last_count, "cumulative: {line}");
            last_count = count;
            if le != "+Inf" {
                let le: f64 = le.parse().unwrap();
                assert!(le > last_le);
                last_le = le;
            }
        }
        assert!(buckets[0].contains("le=\"0.000002\""), "{}", buckets[0]);
        assert!(buckets.iter().any(|l| l.contains("le=\"0.000128\"} 99")));
        assert!(buckets.last().unwrap().ends_with("le=\"+Inf\"} 100"));
        assert!(text.contains("lb_backend_connect_duration_seconds_sum{backend=\"127.0.0.1:8080\"} 0.0199\n"));
        assert!(text.contains("lb_backend_connect_duration_seconds_count{backend=\"127.0.0.1:8080\"} 100\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label_value("x\ny"), "x\\ny");
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\nd\te\u{1}f\u{2028}é");
        assert_eq!(s, r#""a\"b\\c\nd\te\u0001f\u2028é""#);
    }

    #[test]
    fn the_json_document_carries_the_same_numbers() {
        let text = render_json(&sample_snapshot());
        assert!(text.starts_with("{\"version\":\"0.1.0\",\"draining\":false,"), "{text}");
        assert!(text.contains("\"connections\":{\"active\":45,\"max\":1000,\"accepted\":2112,\"cap_pauses\":4,"));
        assert!(text.contains(
            "{\"name\":\"127.0.0.1:8080\",\"address\":\"127.0.0.1:8080\",\"weight\":1,\"up\":true,\"active\":22,\
\"connections\":1205,\"connect_failures\":3,\"sent_bytes\":1000,\"received_bytes\":20000,\
\"health_checks\":{\"ok\":7,\"failed\":1},\"connect_seconds\":{\"count\":100,\"sum\":0.0199,\"p50\":0.000128,\"p99\":0.000128}}"
        ), "{text}");
        assert!(text.contains("\"p50\":null,\"p99\":null"));
        let opens = text.matches(['{', '[']).count();
        let closes = text.matches(['}', ']']).count();
        assert_eq!(opens, closes);
    }
}
