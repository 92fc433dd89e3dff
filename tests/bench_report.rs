//! scripts/bench/report.py, which turns bench.sh's raw samples into the
//! published results: the kernel work tables every run gets, and what a
//! `--counts` run (whose figures perf skewed) must leave out.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::scratch_dir;

/// Samples of one round: a plain run's figures plus the kernel work, and
/// the syscall counts only a `--counts` run records.
const RAW: &str = "round\trow\tmetric\tvalue
1\tdirect\tka_rps\t120000
1\tdirect\tka_segs_per_req\t2.0
1\tdirect\tka_idle_pct\t0.8
1\tdirect\tka_machine_cpu_us_per_req\t16.5
1\tlb\tka_rps\t60000
1\tlb\tka_cpu_us_per_req\t14.0
1\tlb\tcc_rps\t12000
1\tlb\tka_segs_per_req\t4.0
1\tlb\tka_cs_per_req\t0.3
1\tlb\tka_sys_cs_per_req\t0.8
1\tlb\tka_idle_pct\t2.4
1\tlb\tka_machine_cpu_us_per_req\t33.3
1\tlb\tka_syscalls_per_req\t4.14
1\tlb\tfwd_gbps\t12.0
1\tlb\tfwd_splices_per_gb\t61393
1\thaproxy-nosplice\tka_rps\t50000
1\thaproxy-nosplice\tka_cpu_us_per_req\t17.0
1\thaproxy-nosplice\tka_segs_per_req\t4.0
1\thaproxy-nosplice\tka_syscalls_per_req\t4.42
1\thaproxy-nosplice\tfwd_gbps\t10.0
1\thaproxy-nosplice\tfwd_splices_per_gb\t0
";

const META: &str = "date\t2026-12-07 03:15 UTC
rows\tdirect,lb,haproxy-nosplice
kinds\tdirect=direct,lb=lb,haproxy-nosplice=haproxy
rounds\t1
";

/// What report.py wrote: the Markdown, and the gnuplot script of the chart
/// if it wrote one.
struct Report {
    md: String,
    chart: Option<String>,
}

/// Runs report.py on `raw` and `meta`, and gnuplot on the chart script it
/// writes (when gnuplot is installed, as CI installs it); None without
/// python3.
fn run_report(raw: &str, meta: &str) -> Option<Report> {
    if !installed("python3") {
        eprintln!("python3 is not installed; skipping");
        return None;
    }
    let dir = scratch_dir("lb-bench-report-test");
    let file = |name: &str| dir.join(name);
    std::fs::write(file("raw.tsv"), raw).expect("raw");
    std::fs::write(file("meta.tsv"), meta).expect("meta");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/report.py");
    let mut cmd = Command::new("python3");
    cmd.arg("-B").arg(script);
    for (flag, name) in [
        ("--raw", "raw.tsv"),
        ("--meta", "meta.tsv"),
        ("--md", "results.md"),
        ("--chart-data", "chart.dat"),
        ("--chart-script", "chart.gp"),
        ("--chart-png", "chart.png"),
    ] {
        cmd.arg(flag).arg(file(name));
    }
    let out = cmd.output().expect("run report.py");
    assert!(out.status.success(), "report.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let md = std::fs::read_to_string(file("results.md")).expect("results.md");
    let chart = std::fs::read_to_string(file("chart.gp")).ok();
    if chart.is_some() && installed("gnuplot") {
        let out = Command::new("gnuplot").arg(file("chart.gp")).output().expect("run gnuplot");
        assert!(out.status.success(), "gnuplot failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(file("chart.png").exists(), "gnuplot drew no chart");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Some(Report { md, chart })
}

/// report.py on `RAW` and `META` plus `extra_meta`.
fn report(extra_meta: &str) -> Option<Report> {
    run_report(RAW, &format!("{META}{extra_meta}"))
}

fn installed(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// The table row of `row` in the section that starts with `heading`.
fn row_in<'a>(md: &'a str, heading: &str, row: &str) -> &'a str {
    let section = &md[md.find(heading).unwrap_or_else(|| panic!("no {heading:?} in:\n{md}"))..];
    let prefix = format!("| `{row}` |");
    section.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {row} row under {heading:?}"))
}

#[test]
fn a_plain_run_reports_kernel_work_beside_its_ratios_targets_and_chart() {
    let Some(Report { md, chart }) = report("") else { return };
    assert!(md.starts_with("# lb benchmark results"), "{md}");
    // Columns: row, idle %, machine CPU, segments, proxy and machine
    // switches, syscalls.
    assert_eq!(row_in(&md, "## Kernel work per request", "lb"), "| `lb` | 2.4 | 33.30 | 4.00 | 0.300 | 0.800 | 4.14 |");
    assert_eq!(row_in(&md, "## Kernel work per request", "direct"), "| `direct` | 0.8 | 16.50 | 2.00 | — | — | — |");
    assert_eq!(row_in(&md, "## Kernel work per GB of bulk", "lb"), "| `lb` | 61,393 |");
    assert_eq!(md.matches("Machine idle:").count(), 1, "the columns are explained once");
    assert!(md.contains("## Ratios `lb` / other rows"), "{md}");
    assert!(md.contains("## Targets (issue 5)"), "{md}");
    assert!(md.contains("![chart](chart.png)"), "{md}");
    let chart = chart.expect("a plain run has a chart");
    for panel in ["HTTP keep-alive", "New connection per request", "Bulk", "Proxy CPU"] {
        assert!(chart.contains(panel), "no {panel:?} panel in:\n{chart}");
    }
}

#[test]
fn a_counts_run_reports_kernel_work_without_ratios_targets_or_chart() {
    let Some(Report { md, chart }) = report("perf\tperf version 6.1, counting raw_syscalls:sys_enter\n") else {
        return;
    };
    assert!(md.starts_with("# lb benchmark: kernel work counts"), "{md}");
    assert_eq!(
        row_in(&md, "## Kernel work per request", "haproxy-nosplice"),
        "| `haproxy-nosplice` | — | — | 4.00 | — | — | 4.42 |"
    );
    // perf slowed each proxy by its own syscalls: nothing is judged on it.
    for skewed in ["## Ratios", "## Targets", "![chart]"] {
        assert!(!md.contains(skewed), "a counts run has {skewed:?}:\n{md}");
    }
    assert!(chart.is_none(), "a counts run wrote a chart script:\n{chart:?}");
}

#[test]
fn a_run_of_direct_alone_charts_the_figures_it_has_and_no_proxy_cpu() {
    let raw = "round\trow\tmetric\tvalue
1\tdirect\tka_rps\t120000
1\tdirect\tcc_rps\t24000
1\tdirect\tfwd_gbps\t20.0
1\tdirect\trev_gbps\t19.0
";
    let meta = "date\t2026-12-07 05:00 UTC\nrows\tdirect\nkinds\tdirect=direct\nrounds\t1\n";
    let Some(Report { md, chart }) = run_report(raw, meta) else { return };
    assert!(md.contains("| `direct` | 120,000 |"), "{md}");
    // gnuplot stops at a plot with no point at all: run_report has it draw this.
    let chart = chart.expect("a plain run has a chart");
    assert!(chart.contains("Bulk"), "{chart}");
    assert!(!chart.contains("Proxy CPU"), "direct alone has no proxy CPU to plot:\n{chart}");
}

#[test]
fn an_ab_comparison_is_headed_as_one_and_names_its_command() {
    // `--compare` with `--rows` that leave out the other build's row
    // (lb-compare): still an A/B run, not results to publish.
    let command = "scripts/bench.sh --compare /tmp/old-lb --rows direct,lb,haproxy-nosplice";
    let meta = format!("{META}lb-compare\tlb 0.1.0 (/tmp/old-lb)\ncommand\t{command}\n");
    let Some(Report { md, .. }) = run_report(RAW, &meta) else { return };
    assert!(md.starts_with("# lb A/B comparison\n"), "{md}");
    assert!(md.contains(&format!("Latest run of `{command}`")), "{md}");
    let Some(Report { md, .. }) = run_report(RAW, &format!("{meta}perf\tperf version 6.1\n")) else { return };
    assert!(md.starts_with("# lb A/B comparison: kernel work counts\n"), "{md}");
}
