//! The operators' shell helpers (scripts/common.sh, sourced by
//! test_script.sh, scripts/demo.sh and scripts/load-test.sh) on a machine
//! whose environment names an HTTP proxy.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// Runs `script` in bash after sourcing scripts/common.sh, with `envs`
/// added; returns its exit code and stdout. Bounded by curl's own timeouts.
fn with_common_sh(script: &str, envs: &[(&str, String)]) -> (Option<i32>, String) {
    let work = scratch_dir("lb-scripts-test");
    let repo = env!("CARGO_MANIFEST_DIR");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(". \"{repo}/scripts/common.sh\" && {script}"))
        .env("LB_WORK", &work)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run bash");
    let _ = std::fs::remove_dir_all(&work);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn curl_in_the_scripts_reaches_loopback_servers_past_a_configured_proxy() {
    if Command::new("curl").arg("--version").stdout(Stdio::null()).status().is_err() {
        eprintln!("curl is not installed; skipping");
        return;
    }
    let a = be("Server A", &[]);
    // A proxy address where nothing listens: a request sent to it fails,
    // and on a real machine it would have left the host.
    let proxy = format!("http://{}", dead_addr());
    let envs: Vec<(&str, String)> = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .into_iter()
        .map(|k| (k, proxy.clone()))
        .chain([("no_proxy", "example.com".to_string())])
        .collect();
    let (code, body) = with_common_sh(&format!("curl -sS --max-time 5 http://{}/", a.addr), &envs);
    assert_eq!((code, body.as_str()), (Some(0), "Server A\n"), "curl went through the proxy");
    // The operator's own exemptions are kept.
    let (_, no_proxy) = with_common_sh("printf '%s' \"$no_proxy\"", &envs);
    assert!(no_proxy.split(',').any(|h| h == "example.com"), "no_proxy is now {no_proxy:?}");
}

#[test]
fn start_lb_with_a_fixed_port_still_listens_on_loopback_only() {
    let a = be("Server A", &[]);
    let envs = [("LB", env!("CARGO_BIN_EXE_lb").to_string())];
    // A port free now may be taken by another process before lb binds it;
    // lb then refuses to start, and another port is tried.
    let (port, code, addr) = (0..5)
        .map(|_| {
            let port = free_port();
            let script = format!(
                "start_lb -p {port} -b {} --no-health-check --stats-period 0 || {{ echo \"$ERR\"; exit 1; }}; \
                 printf '%s' \"$LB_ADDR\"; stop_tracked",
                a.addr
            );
            let (code, addr) = with_common_sh(&script, &envs);
            (port, code, addr)
        })
        .find(|(_, code, addr)| !(*code == Some(1) && addr.contains("address already in use")))
        .expect("every port tried was taken before lb bound it");
    assert_eq!(code, Some(0), "start_lb failed: {addr}");
    assert_eq!(addr, format!("127.0.0.1:{port}"), "lb listened beyond loopback");
}
