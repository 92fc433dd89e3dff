//! Command-line surface and its validation: raw clap arguments become a
//! [`Config`] of resolved `SocketAddr`s and `Duration`s, so nothing after
//! start-up parses a string. Every rejected value is a [`ConfigError`] whose
//! `Display` is the one line the operator sees.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::Parser;

/// Upper bound for `--retries`: a connect attempt list lives inline in each
/// session, so the bound keeps sessions fixed-size.
pub const MAX_RETRIES: u32 = 32;

/// Raw arguments exactly as the operator typed them.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "lb",
    version,
    allow_negative_numbers = true,
    about = "Layer-4 TCP load balancer: least connections over per-core event loops",
    after_help = "At --max-connections the listeners stop accepting; extra clients wait in the \
kernel backlog and are served as earlier connections close."
)]
pub struct Args {
    /// Listen port.
    #[arg(short = 'p', long = "port", default_value = "80")]
    pub port: String,

    /// Listen address (IPv4 or IPv6, e.g. 0.0.0.0 or ::1).
    #[arg(long = "bind", default_value = "0.0.0.0")]
    pub bind: String,

    /// Backends as host:port or host:port@weight; several may follow one -b.
    #[arg(
        short = 'b',
        long = "backends",
        num_args = 1..,
        default_values = ["127.0.0.1:8080", "127.0.0.1:8081"]
    )]
    pub backends: Vec<String>,

    /// Global cap on concurrent client connections.
    #[arg(long = "max-connections", default_value = "1000")]
    pub max_connections: String,

    /// Backend connect timeout in seconds (fractions allowed).
    #[arg(long = "connection-timeout", default_value = "3")]
    pub connection_timeout: String,

    /// Relay buffer size in bytes.
    #[arg(long = "buffer-size", default_value = "32768")]
    pub buffer_size: String,

    /// Number of event loops (default: available cores).
    #[arg(long = "workers")]
    pub workers: Option<String>,

    /// Close a pair idle in both directions for this many seconds (0 = never).
    #[arg(long = "idle-timeout", default_value = "3600")]
    pub idle_timeout: String,

    /// Other backends tried when a connect fails.
    #[arg(long = "retries", default_value = "2")]
    pub retries: String,

    /// Seconds SIGTERM/SIGINT waits for in-flight connections.
    #[arg(long = "drain-timeout", default_value = "30")]
    pub drain_timeout: String,
}

/// Validated run-time configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub backends: Vec<BackendSpec>,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub buffer_size: usize,
    pub workers: usize,
    /// `None` means connections never time out for idleness.
    pub idle_timeout: Option<Duration>,
    pub retries: u32,
    pub drain_timeout: Duration,
}

/// One backend after resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// What the operator wrote, kept for logs and stats.
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

/// One variant per way a command line can be wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Port { value: String },
    BindAddress { value: String },
    BackendFormat { value: String },
    BackendPort { value: String },
    BackendWeight { value: String },
    Resolve { value: String, reason: String },
    Number { flag: &'static str, value: String, expected: &'static str },
    Seconds { flag: &'static str, value: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Port { value } => {
                write!(f, "--port: '{value}' is not a port number (1-65535)")
            }
            ConfigError::BindAddress { value } => {
                write!(f, "--bind: '{value}' is not an IPv4 or IPv6 address")
            }
            ConfigError::BackendFormat { value } => write!(
                f,
                "--backends: '{value}' is not host:port or host:port@weight"
            ),
            ConfigError::BackendPort { value } => {
                write!(f, "--backends: '{value}' has no valid port (1-65535)")
            }
            ConfigError::BackendWeight { value } => write!(
                f,
                "--backends: '{value}' has an invalid weight (a whole number from 1 to 65535)"
            ),
            ConfigError::Resolve { value, reason } => {
                write!(f, "--backends: cannot resolve '{value}': {reason}")
            }
            ConfigError::Number { flag, value, expected } => {
                write!(f, "{flag}: '{value}' is not {expected}")
            }
            ConfigError::Seconds { flag, value } => write!(
                f,
                "{flag}: '{value}' is not a number of seconds (e.g. 3 or 0.5)"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Validates and resolves everything once, at start-up.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let port = parse_port(&args.port).ok_or_else(|| ConfigError::Port {
            value: args.port.clone(),
        })?;
        let ip: IpAddr = args
            .bind
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| ConfigError::BindAddress { value: args.bind.clone() })?;
        let max_connections = parse_count("--max-connections", &args.max_connections, 1)?;
        let buffer_size = parse_count("--buffer-size", &args.buffer_size, 1)?;
        if buffer_size > 1 << 30 {
            return Err(ConfigError::Number {
                flag: "--buffer-size",
                value: args.buffer_size.clone(),
                expected: "a size from 1 byte to 1 GiB",
            });
        }
        let workers = match &args.workers {
            Some(w) => parse_count("--workers", w, 1)?,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let retries = parse_count("--retries", &args.retries, 0)?;
        if retries > MAX_RETRIES as usize {
            return Err(ConfigError::Number {
                flag: "--retries",
                value: args.retries.clone(),
                expected: "a whole number from 0 to 32",
            });
        }
        let connect_timeout = parse_seconds("--connection-timeout", &args.connection_timeout)?;
        if connect_timeout.is_zero() {
            return Err(ConfigError::Seconds {
                flag: "--connection-timeout",
                value: args.connection_timeout.clone(),
            });
        }
        let idle = parse_seconds("--idle-timeout", &args.idle_timeout)?;
        let drain_timeout = parse_seconds("--drain-timeout", &args.drain_timeout)?;
        let backends = args
            .backends
            .iter()
            .map(|b| parse_backend(b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            listen: SocketAddr::new(ip, port),
            backends,
            max_connections,
            connect_timeout,
            buffer_size,
            workers,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            retries: retries as u32,
            drain_timeout,
        })
    }
}

fn parse_port(s: &str) -> Option<u16> {
    // Port 0 lets the kernel choose; tests rely on it.
    s.trim().parse::<u16>().ok()
}

fn parse_count(flag: &'static str, s: &str, min: usize) -> Result<usize, ConfigError> {
    let expected = if min == 0 {
        "a whole number (0 or more)"
    } else {
        "a whole number greater than 0"
    };
    match s.trim().parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(ConfigError::Number { flag, value: s.to_string(), expected }),
    }
}

/// Accepts whole or fractional seconds; rejects negatives, NaN and values
/// too large for a `Duration`.
pub fn parse_seconds(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::Seconds { flag, value: s.to_string() };
    let secs: f64 = s.trim().parse().map_err(|_| err())?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(err());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| err())
}

/// `host:port` or `host:port@weight`; IPv6 literals go in brackets.
pub fn parse_backend(s: &str) -> Result<BackendSpec, ConfigError> {
    let (hostport, weight) = match s.rsplit_once('@') {
        Some((hp, w)) => {
            let weight = w
                .parse::<u32>()
                .ok()
                .filter(|w| (1..=65535).contains(w))
                .ok_or_else(|| ConfigError::BackendWeight { value: s.to_string() })?;
            (hp, weight)
        }
        None => (s, 1),
    };
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| ConfigError::BackendFormat { value: s.to_string() })?;
    if host.is_empty() {
        return Err(ConfigError::BackendFormat { value: s.to_string() });
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConfigError::BackendPort { value: s.to_string() })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = if let Ok(ip) = host.parse::<IpAddr>() {
        SocketAddr::new(ip, port)
    } else {
        (host, port)
            .to_socket_addrs()
            .map_err(|e| ConfigError::Resolve {
                value: s.to_string(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| ConfigError::Resolve {
                value: s.to_string(),
                reason: "no addresses found".to_string(),
            })?
    };
    Ok(BackendSpec { name: hostport.to_string(), addr, weight })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["lb"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).expect("test arguments parse")
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::from_args(&args(&[])).expect("defaults are valid");
        assert_eq!(c.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].addr, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.max_connections, 1000);
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.buffer_size, 32768);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.retries, 2);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let c = Config::from_args(&args(&["--connection-timeout", "0.5"])).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
    }

    #[test]
    fn idle_timeout_zero_means_never() {
        let c = Config::from_args(&args(&["--idle-timeout", "0"])).unwrap();
        assert_eq!(c.idle_timeout, None);
    }

    #[test]
    fn several_backends_follow_one_flag_with_weights() {
        let c = Config::from_args(&args(&["-b", "127.0.0.1:1", "[::1]:2@3"])).unwrap();
        assert_eq!(c.backends[0].weight, 1);
        assert_eq!(c.backends[1].addr, "[::1]:2".parse().unwrap());
        assert_eq!(c.backends[1].weight, 3);
    }

    #[test]
    fn ipv6_bind_address_is_accepted() {
        let c = Config::from_args(&args(&["--bind", "::1", "-p", "0"])).unwrap();
        assert_eq!(c.listen, "[::1]:0".parse().unwrap());
    }

    #[test]
    fn rejects_each_bad_value_naming_its_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["-p", "70000"], "--port"),
            (&["-b", "nohost"], "--backends"),
            (&["-b", "127.0.0.1:80@0"], "--backends"),
            (&["-b", "127.0.0.1:0"], "--backends"),
            (&["--max-connections", "0"], "--max-connections"),
            (&["--buffer-size", "0"], "--buffer-size"),
            (&["--workers", "0"], "--workers"),
            (&["--connection-timeout", "-1"], "--connection-timeout"),
            (&["--connection-timeout", "0"], "--connection-timeout"),
            (&["--idle-timeout", "abc"], "--idle-timeout"),
            (&["--retries", "99"], "--retries"),
            (&["--drain-timeout", "NaN"], "--drain-timeout"),
            (&["--bind", "not-an-ip"], "--bind"),
        ];
        for (argv, flag) in cases {
            let err = Config::from_args(&args(argv)).expect_err("value must be rejected");
            let msg = err.to_string();
            assert!(msg.starts_with(flag), "{argv:?} gave '{msg}'");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }

    #[test]
    fn an_unknown_flag_is_a_parse_error() {
        assert!(Args::try_parse_from(["lb", "--frobnicate"]).is_err());
    }
}
