//! The `lb` command: parse, validate, run; every failure is one line on
//! stderr and a non-zero exit.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clap::error::ErrorKind;

use lb::config::{Args, Config};
use lb::listener::ListenError;

fn main() -> ExitCode {
    lb::signals::prepare();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's rendering adds usage lines; operators get the first
            // one, and the tip naming the flag they likely meant.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            match text.lines().map(str::trim).find(|l| l.starts_with("tip:")) {
                Some(tip) => eprintln!("{first} ({tip})"),
                None => eprintln!("{first}"),
            }
            return ExitCode::from(2);
        }
    };
    // Reads and clears LISTEN_FDS and friends, which is sound only while
    // this is the one thread: before the log writer starts.
    let inherited = match lb::systemd::listen_fds() {
        Ok(fds) => fds,
        Err(source) => {
            eprintln!("error: {}", one_line(lb::RunError::Listen(ListenError::Inherited { source })));
            return ExitCode::FAILURE;
        }
    };
    let log = match lb::logging::init() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot start the log writer thread: {}", one_line(e));
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", one_line(e));
            return ExitCode::from(2);
        }
    };
    let result = lb::run(config, inherited);
    // Lines still queued for stderr go out first, within reason: a stderr
    // nobody reads must not keep the process from exiting.
    log.flush(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if e.is_command_line() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// An error as one line: a value quoted in it may hold a newline or other
/// control characters (`-p $'8\n0'`), which are shown escaped.
fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string().chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
}
