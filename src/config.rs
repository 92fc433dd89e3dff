//! Command-line surface and its validation: raw clap arguments become a
//! [`Config`] of resolved `SocketAddr`s and `Duration`s, so nothing after
//! start-up parses a string. Every rejected value is a [`ConfigError`] whose
//! `Display` is the one line the operator sees.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::Parser;

use crate::net::{interface_name, same_address};

/// Upper bound for `--retries`: a connect attempt list lives inline in each
/// session, so the bound keeps sessions fixed-size.
pub const MAX_RETRIES: u32 = 32;

/// Raw arguments exactly as the operator typed them. The flags that take
/// one number accept a value starting with `-` (`-3s`, `-inf`), so that
/// it reaches the flag's own check and its message, not clap's "unexpected
/// argument".
#[derive(Parser, Debug, Clone)]
#[command(
    name = "lb",
    version,
    allow_negative_numbers = true,
    about = "Layer-4 TCP load balancer: least connections over per-core event loops",
    after_help = "At --max-connections the listeners stop accepting; extra clients wait in the \
kernel backlog and are served as earlier connections close.

Signals: SIGTERM or SIGINT drains (no new clients; open connections get \
--drain-timeout) and exits 0 (1 if an event loop failed); a second one stops at once. SIGUSR1 or SIGHUP \
prints a stats report (there is no configuration file to reload).
Logging: RUST_LOG sets the level (default info). Exit status: 2 for a bad \
command line, 1 for a start-up failure or a failed event loop."
)]
pub struct Args {
    /// Listen port.
    #[arg(short = 'p', long = "port", allow_hyphen_values = true, default_value = "80")]
    pub port: String,

    /// Listen address (IPv4 or IPv6, e.g. 0.0.0.0 or ::1; a link-local one
    /// with its interface: fe80::1%eth0).
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

    /// Global cap on concurrent client connections [default: 1000, or
    /// fewer if the descriptor limit cannot hold that many].
    #[arg(long = "max-connections", allow_hyphen_values = true)]
    pub max_connections: Option<String>,

    /// Backend connect timeout in seconds (fractions allowed).
    #[arg(long = "connection-timeout", allow_hyphen_values = true, default_value = "3")]
    pub connection_timeout: String,

    /// Relay buffer size in bytes.
    #[arg(long = "buffer-size", allow_hyphen_values = true, default_value = "32768")]
    pub buffer_size: String,

    /// Number of event loops (default: available cores).
    #[arg(long = "workers", allow_hyphen_values = true)]
    pub workers: Option<String>,

    /// Close a pair idle in both directions for this many seconds (0 = never).
    #[arg(long = "idle-timeout", allow_hyphen_values = true, default_value = "3600")]
    pub idle_timeout: String,

    /// Other backends tried when a connect fails.
    #[arg(long = "retries", allow_hyphen_values = true, default_value = "2")]
    pub retries: String,

    /// Seconds SIGTERM/SIGINT waits for in-flight connections.
    #[arg(long = "drain-timeout", allow_hyphen_values = true, default_value = "30")]
    pub drain_timeout: String,

    /// Seconds between health probes of each backend (fractions allowed).
    /// With --no-health-check: how long a backend marked down by failed
    /// client connects stays out before real traffic tries it again.
    #[arg(long = "health-check-period", allow_hyphen_values = true, default_value = "5")]
    pub health_check_period: String,

    /// Seconds a probe may take before it counts as failed
    /// [default: --connection-timeout].
    #[arg(long = "health-check-timeout", allow_hyphen_values = true, conflicts_with = "no_health_check")]
    pub health_check_timeout: Option<String>,

    /// Consecutive successful probes that bring a down backend back up.
    #[arg(long = "rise", allow_hyphen_values = true, default_value = "2", conflicts_with = "no_health_check")]
    pub rise: String,

    /// Consecutive failed probes, or failed client connects, that take a
    /// backend down.
    #[arg(long = "fall", allow_hyphen_values = true, default_value = "3")]
    pub fall: String,

    /// Probe with `GET <path>` over HTTP/1.1 (up on 2xx/3xx) instead of a
    /// plain TCP connect.
    #[arg(long = "health-check-url", value_name = "PATH", conflicts_with = "no_health_check")]
    pub health_check_url: Option<String>,

    /// Send no probes; failed client connects still take a backend down.
    /// The probe flags (--health-check-url, --health-check-timeout,
    /// --rise) cannot go with it: they would do nothing.
    #[arg(long = "no-health-check")]
    pub no_health_check: bool,

    /// Seconds between stats reports on stdout (0 = only on SIGUSR1 or SIGHUP).
    #[arg(long = "stats-period", allow_hyphen_values = true, default_value = "30")]
    pub stats_period: String,

    /// Serve /metrics, /stats and /health on this IP address or localhost
    /// (e.g. 127.0.0.1:9100; keep it on a private address: it has no auth).
    #[arg(long = "admin", value_name = "ADDR:PORT")]
    pub admin: Option<String>,

    /// Zero-copy relay through kernel pipes: auto (bulk flows only), always or never.
    #[arg(long = "splice", default_value = "auto")]
    pub splice: String,

    /// Pipes that may exist at once for splicing (default: --max-connections / 4;
    /// at most two per connection; only 0 goes with --splice never).
    #[arg(long = "max-pipes", allow_hyphen_values = true)]
    pub max_pipes: Option<String>,

    /// Send each new client to the worker holding the fewest, by an eBPF
    /// program the kernel runs per connection: auto (when lb may load it:
    /// root or CAP_BPF), always (or exit) or never (the kernel's hash).
    #[arg(long = "steer", default_value = "auto")]
    pub steer: String,

    /// Relay request/response pairs inside the kernel (an eBPF sockmap
    /// program), so lb is not woken per message: auto (when lb may load
    /// it: root or CAP_BPF + CAP_NET_ADMIN) or never. Off by default: it
    /// moves lb's work into kernel threads, which pays only where the
    /// scheduler gives those their own share (see the README).
    #[arg(long = "kernel-relay", default_value = "never")]
    pub kernel_relay: String,
}

/// Whether pairs may move to the kernel relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelRelay {
    /// When the program loads; pairs that trade small messages join it.
    Auto,
    /// Every byte passes through lb.
    Never,
}

/// How new clients are spread over the workers' listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerMode {
    /// To the least-loaded worker when the program loads, else by hash.
    Auto,
    /// To the least-loaded worker; failing to load the program is an error.
    Always,
    /// By the kernel's hash of each client's address and port.
    Never,
}

/// When a direction moves bytes with splice(2) instead of a user-space copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceMode {
    /// Copy first; splice once a flow shows itself to be bulk.
    Auto,
    /// Splice from the first byte, while pipes last.
    Always,
    /// Never splice.
    Never,
}

/// Validated run-time configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub backends: Vec<BackendSpec>,
    pub max_connections: usize,
    /// `--max-connections` was left to its default, so lb may lower it (and
    /// the pipes) to what the descriptor limit can hold, as HAProxy does
    /// with an unset maxconn. A value the operator gave is kept.
    pub fit_to_fd_limit: bool,
    pub connect_timeout: Duration,
    pub buffer_size: usize,
    pub workers: usize,
    /// `None` means connections never time out for idleness.
    pub idle_timeout: Option<Duration>,
    pub retries: u32,
    pub drain_timeout: Duration,
    pub splice: SpliceMode,
    pub steer: SteerMode,
    pub kernel_relay: KernelRelay,
    /// Pipes open at once across all workers (0 = none, so splice always
    /// falls back to copying).
    pub max_pipes: usize,
    pub health: HealthConfig,
    /// `None`: stats are printed only on SIGUSR1.
    pub stats_period: Option<Duration>,
    /// Where the admin endpoint listens, if anywhere.
    pub admin: Option<SocketAddr>,
    /// Warnings for the start-up log: the command line is valid, but
    /// perhaps not what was meant.
    pub notes: Vec<String>,
}

/// How backends are checked, actively and passively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// False with `--no-health-check`: no probes are sent.
    pub probes: bool,
    /// Probe interval; also the hold-down of a passively downed backend
    /// when probes are off.
    pub period: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// HTTP probe path; `None` probes with a TCP connect.
    pub url: Option<String>,
}

/// One backend after resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// What the operator wrote, kept for logs and stats.
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

impl BackendSpec {
    /// As the start-up line shows it: as written, with its weight, and
    /// the address a name resolved to. Only that first address is used,
    /// as HAProxy does, and it is worth seeing: a `localhost` that
    /// resolves to ::1 first never reaches a backend on 127.0.0.1.
    pub fn describe(&self) -> String {
        let mut s = self.name.clone();
        if self.weight != 1 {
            s.push_str(&format!("@{}", self.weight));
        }
        let addr = self.addr.to_string();
        if addr != self.name {
            s.push_str(&format!(" ({addr})"));
        }
        s
    }
}

/// One variant per way a command line can be wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Port { value: String },
    BindAddress { value: String },
    BindInterface { value: String },
    BindZoneMissing { value: String },
    BindUnusable { value: String, what: &'static str },
    BackendFormat { value: String },
    BackendPort { value: String },
    BackendWeight { value: String },
    BackendDuplicate { value: String, first: String, addr: SocketAddr },
    BackendUnusable { value: String, what: &'static str },
    BackendZoneMissing { value: String },
    BackendPartialIpv4 { value: String },
    Resolve { value: String, reason: String },
    Number { flag: &'static str, value: String, expected: &'static str },
    NumberRange { flag: &'static str, value: String, max: usize },
    Seconds { flag: &'static str, value: String },
    SecondsRange { flag: &'static str, value: String, expected: &'static str },
    Splice { value: String },
    Steer { value: String },
    KernelRelay { value: String },
    PipesWithoutSplice { value: String },
    HealthUrl { value: String },
    HealthUrlLength { length: usize },
    AdminAddress { value: String },
    AdminZone { value: String },
    AdminInterface { value: String },
    AdminUnusable { value: String, what: &'static str },
    BackendInterface { value: String },
    ZoneNotLinkLocal { flag: &'static str, value: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Port { value } => {
                write!(f, "--port: '{value}' is not a port number (0-65535; 0 picks a free port)")
            }
            ConfigError::BindAddress { value } => {
                write!(f, "--bind: '{value}' is not an IPv4 or IPv6 address")
            }
            ConfigError::BindInterface { value } => {
                write!(f, "--bind: '{value}' names no network interface of this host (after the %: a name or index)")
            }
            ConfigError::BindZoneMissing { value } => {
                let bare = value.trim_start_matches('[').trim_end_matches(']');
                write!(f, "--bind: '{value}' is link-local: name its interface after a % ({bare}%eth0)")
            }
            ConfigError::BindUnusable { value, what } => {
                write!(f, "--bind: '{value}' is {what}: TCP cannot listen there")
            }
            ConfigError::BackendUnusable { value, what } => {
                write!(f, "--backends: '{value}' is {what}: TCP cannot connect there")
            }
            ConfigError::BackendZoneMissing { value } => {
                write!(f, "--backends: '{value}' is link-local: name its interface after a % ([fe80::1%eth0]:80)")
            }
            ConfigError::BackendPartialIpv4 { value } => write!(
                f,
                "--backends: '{value}' is not an IPv4 address (four numbers from 0 to 255, without leading zeros: \
                 10.0.0.1) nor a host name (whose last part is never a number)"
            ),
            ConfigError::BackendFormat { value } => {
                write!(f, "--backends: '{value}' is not host:port or host:port@weight (IPv6 in brackets: [::1]:80)")
            }
            ConfigError::BackendPort { value } => {
                write!(f, "--backends: '{value}' has no valid port (1-65535)")
            }
            ConfigError::BackendWeight { value } => {
                write!(f, "--backends: '{value}' has an invalid weight (a whole number from 1 to 65535)")
            }
            ConfigError::BackendDuplicate { value, first, addr } => write!(
                f,
                "--backends: '{value}' is the same backend ({addr}) as '{first}'; list it once and use @weight"
            ),
            ConfigError::Resolve { value, reason } => {
                write!(f, "--backends: cannot resolve '{value}': {reason}")
            }
            ConfigError::Number { flag, value, expected } => {
                write!(f, "{flag}: '{value}' is not {expected}")
            }
            ConfigError::NumberRange { flag, value, max } => {
                write!(f, "{flag}: '{value}' is out of range: at most {max}")
            }
            ConfigError::Seconds { flag, value } => {
                write!(f, "{flag}: '{value}' is not a number of seconds (e.g. 3 or 0.5)")
            }
            ConfigError::SecondsRange { flag, value, expected } => {
                write!(f, "{flag}: '{value}' seconds is out of range: {expected}")
            }
            ConfigError::Splice { value } => {
                write!(f, "--splice: '{value}' is not one of auto, always, never")
            }
            ConfigError::Steer { value } => write!(f, "--steer: '{value}' is not one of auto, always, never"),
            ConfigError::KernelRelay { value } => write!(f, "--kernel-relay: '{value}' is not one of auto, never"),
            ConfigError::PipesWithoutSplice { value } => {
                write!(f, "--max-pipes: '{value}' pipes would never be used with --splice never (drop one of the two)")
            }
            ConfigError::HealthUrl { value } => write!(
                f,
                "--health-check-url: '{}' is not a path starting with '/' (printable ASCII: no spaces, control \
                 characters or other scripts; percent-encode them)",
                value.escape_debug()
            ),
            ConfigError::HealthUrlLength { length } => {
                write!(f, "--health-check-url: the path is {length} bytes long; at most {MAX_HEALTH_PATH}")
            }
            ConfigError::AdminAddress { value } => {
                write!(f, "--admin: '{value}' is not addr:port (e.g. 127.0.0.1:9100)")
            }
            ConfigError::AdminUnusable { value, what } => {
                write!(f, "--admin: '{value}' is {what}: TCP cannot listen there")
            }
            ConfigError::BackendInterface { value } => {
                write!(
                    f,
                    "--backends: '{value}' names no network interface of this host (after the %: a name or index)"
                )
            }
            ConfigError::AdminZone { value } => write!(
                f,
                "--admin: '{value}' is link-local: it needs an interface of this host after a % ([fe80::1%eth0]:9100)"
            ),
            ConfigError::AdminInterface { value } => {
                write!(f, "--admin: '{value}' names no network interface of this host (after the %: a name or index)")
            }
            ConfigError::ZoneNotLinkLocal { flag, value } => write!(
                f,
                "{flag}: '{value}' is not link-local (fe80::/10): only such an address takes a %interface; drop it"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Validates and resolves everything once, at start-up.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let port = parse_port(&args.port).ok_or_else(|| ConfigError::Port { value: args.port.clone() })?;
        // Surrounding blanks are trimmed from every value, as from numbers.
        let listen = parse_bind(args.bind.trim(), port)?;
        let max_connections = match &args.max_connections {
            Some(m) => match parse_count("--max-connections", m, 1) {
                Ok(n) if n <= MAX_CONNECTIONS => n,
                Ok(_) | Err(ConfigError::NumberRange { .. }) => {
                    let (flag, value) = ("--max-connections", m.to_string());
                    return Err(ConfigError::NumberRange { flag, value, max: MAX_CONNECTIONS });
                }
                Err(e) => return Err(e),
            },
            None => DEFAULT_MAX_CONNECTIONS,
        };
        let buffer_size = parse_bounded("--buffer-size", &args.buffer_size, 1, 1 << 30, "a size from 1 byte to 1 GiB")?;
        let workers = match &args.workers {
            Some(w) => parse_bounded("--workers", w, 1, MAX_WORKERS, "a whole number from 1 to 1024")?,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS),
        };
        let retries =
            parse_bounded("--retries", &args.retries, 0, MAX_RETRIES as usize, "a whole number from 0 to 32")?;
        let connect_timeout = positive_seconds("--connection-timeout", &args.connection_timeout)?;
        let idle = parse_seconds("--idle-timeout", &args.idle_timeout)?;
        let drain_timeout = parse_seconds("--drain-timeout", &args.drain_timeout)?;
        let splice = match args.splice.trim() {
            "auto" => SpliceMode::Auto,
            "always" => SpliceMode::Always,
            "never" => SpliceMode::Never,
            _ => return Err(ConfigError::Splice { value: args.splice.clone() }),
        };
        let steer = match args.steer.trim() {
            "auto" => SteerMode::Auto,
            "always" => SteerMode::Always,
            "never" => SteerMode::Never,
            _ => return Err(ConfigError::Steer { value: args.steer.clone() }),
        };
        let kernel_relay = match args.kernel_relay.trim() {
            "auto" => KernelRelay::Auto,
            "never" => KernelRelay::Never,
            _ => return Err(ConfigError::KernelRelay { value: args.kernel_relay.clone() }),
        };
        // HAProxy's default ratio: bulk flows are a minority of connections.
        // No connection holds more than two (one per direction): more
        // could never be used, and would take descriptors from connections
        // where the limit is fitted to them.
        let mut notes = Vec::new();
        let max_pipes = match &args.max_pipes {
            // Past any count is past the cap too.
            Some(m) => {
                let asked = match parse_count("--max-pipes", m, 0) {
                    Err(ConfigError::NumberRange { .. }) => usize::MAX,
                    n => n?,
                };
                let (pipes, note) = cap_pipes(m, asked, max_connections);
                notes.extend(note);
                pipes
            }
            None => max_connections / 4,
        };
        // Like the probe flags with --no-health-check: a flag that could do
        // nothing is more likely a mistake than a wish.
        if let (Some(m), SpliceMode::Never) = (&args.max_pipes, splice)
            && max_pipes > 0
        {
            return Err(ConfigError::PipesWithoutSplice { value: m.clone() });
        }
        let health = parse_health(args, connect_timeout)?;
        let stats_period = match parse_seconds("--stats-period", &args.stats_period)? {
            Duration::ZERO => Duration::ZERO,
            d => at_least_min_period("--stats-period", &args.stats_period, d)?,
        };
        let admin = args.admin.as_deref().map(|a| parse_admin(a.trim())).transpose()?;
        let mut backends = Vec::with_capacity(args.backends.len());
        for b in &args.backends {
            let (spec, found) = resolve_backend(b.trim())?;
            notes.extend(several_addresses(&spec, found));
            backends.push(spec);
        }
        // A backend listed twice would get twice its share and, under one
        // name, duplicate series on /metrics that Prometheus rejects.
        for (i, b) in backends.iter().enumerate() {
            if let Some(first) = backends[..i]
                .iter()
                .find(|f| f.name == b.name || (f.addr.port() == b.addr.port() && same_address(f.addr, b.addr)))
            {
                return Err(ConfigError::BackendDuplicate {
                    value: args.backends[i].trim().to_string(),
                    first: first.name.clone(),
                    addr: b.addr,
                });
            }
        }
        Ok(Config {
            listen,
            backends,
            max_connections,
            fit_to_fd_limit: args.max_connections.is_none(),
            connect_timeout,
            buffer_size,
            workers,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            retries: retries as u32,
            drain_timeout,
            splice,
            steer,
            kernel_relay,
            max_pipes,
            health,
            stats_period: (!stats_period.is_zero()).then_some(stats_period),
            admin,
            notes,
        })
    }
}

/// `--max-pipes` as given (`value`, read as `asked`) held to two per
/// connection, with the note to log when that lowers it: the operator
/// asked for more, and should not have to find out from /metrics.
fn cap_pipes(value: &str, asked: usize, max_connections: usize) -> (usize, Option<String>) {
    let cap = max_connections.saturating_mul(2);
    if asked <= cap {
        return (asked, None);
    }
    let note = format!(
        "--max-pipes: '{}' is more than two per connection (--max-connections {max_connections}); \
         using {cap}, as a connection uses no more",
        value.trim()
    );
    (cap, Some(note))
}

impl Config {
    /// The start-up line about splicing. With no pipes splice is as good
    /// as off, which the line says rather than leave the operator to
    /// notice "up to 0 pipes" (a small --max-connections makes the
    /// default quarter 0).
    pub fn splice_summary(&self) -> String {
        let mode = match self.splice {
            SpliceMode::Never => return "splice: never (every byte is copied)".to_string(),
            SpliceMode::Auto => "auto",
            SpliceMode::Always => "always",
        };
        if self.max_pipes == 0 {
            return format!("splice: {mode}, but with 0 pipes every byte is copied (--max-pipes sets how many)");
        }
        format!("splice: {mode}, up to {} pipes of {} bytes", self.max_pipes, self.buffer_size)
    }
}

/// Upper bound for `--rise` and `--fall`: beyond it a flip would take
/// longer than anyone would wait for, so it is surely a typo.
const MAX_THRESHOLD: usize = 1000;

fn parse_health(args: &Args, connect_timeout: Duration) -> Result<HealthConfig, ConfigError> {
    let threshold = |flag: &'static str, s: &str| {
        parse_bounded(flag, s, 1, MAX_THRESHOLD, "a whole number from 1 to 1000").map(|n| n as u32)
    };
    let period = at_least_min_period(
        "--health-check-period",
        &args.health_check_period,
        parse_seconds("--health-check-period", &args.health_check_period)?,
    )?;
    let timeout = match &args.health_check_timeout {
        Some(t) => positive_seconds("--health-check-timeout", t)?,
        None => connect_timeout,
    };
    let url = match &args.health_check_url {
        Some(u) if u.len() > MAX_HEALTH_PATH => return Err(ConfigError::HealthUrlLength { length: u.len() }),
        Some(u) if is_request_path(u) => Some(u.clone()),
        Some(u) => return Err(ConfigError::HealthUrl { value: u.clone() }),
        None => None,
    };
    Ok(HealthConfig {
        probes: !args.no_health_check,
        period,
        timeout,
        rise: threshold("--rise", &args.rise)?,
        fall: threshold("--fall", &args.fall)?,
        url,
    })
}

/// The path goes verbatim into a request line, so anything that could end
/// the line or split it into more tokens is refused.
fn is_request_path(s: &str) -> bool {
    s.starts_with('/') && s.len() <= MAX_HEALTH_PATH && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Longest `--health-check-url` path, in bytes.
const MAX_HEALTH_PATH: usize = 2048;

/// `addr:port` with an IP literal (IPv6 in brackets), or `localhost:port`.
/// Port 0 lets the kernel choose (the log line names the real one).
fn parse_admin(s: &str) -> Result<SocketAddr, ConfigError> {
    let err = || ConfigError::AdminAddress { value: s.to_string() };
    let zone = || ConfigError::AdminZone { value: s.to_string() };
    let interface = || ConfigError::AdminInterface { value: s.to_string() };
    if let Some((address, rest)) = s.split_once('%')
        && let Some(ip) = address.strip_prefix('[').and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
    {
        if takes_no_zone(ip) && rest.contains("]:") {
            return Err(ConfigError::ZoneNotLinkLocal { flag: "--admin", value: s.to_string() });
        }
        // A link-local address's interface by name too, as --bind takes it.
        if let Some((name, port)) = rest.split_once(']')
            && name.parse::<u32>().is_err()
            && ip.is_unicast_link_local()
        {
            let index = interface_index(name).ok_or_else(interface)?;
            return format!("{address}%{index}]{port}").parse::<SocketAddr>().map_err(|_| err());
        }
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return match addr {
            // The kernel refuses a link-local address without its link, or
            // on a link that does not exist, with a bare EINVAL or ENODEV.
            SocketAddr::V6(a) if lacks_its_link(addr) && a.scope_id() != 0 => Err(interface()),
            _ if lacks_its_link(addr) => Err(zone()),
            _ => match unusable(addr.ip()) {
                Some(what) => Err(ConfigError::AdminUnusable { value: s.to_string(), what }),
                None => Ok(addr),
            },
        };
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Err(err())
}

/// An IP literal; an IPv6 one may come in brackets (`[::1]`), as it
/// would in an address with a port, and a link-local one may name its
/// interface (`fe80::1%eth0`, or its index), as `ip` and `ss` print it:
/// such an address is ambiguous without one.
fn parse_bind(s: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    let addr = parse_bind_address(s, port)?;
    match unusable(addr.ip()) {
        Some(what) => Err(ConfigError::BindUnusable { value: s.to_string(), what }),
        None => Ok(addr),
    }
}

fn parse_bind_address(s: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    let format = || ConfigError::BindAddress { value: s.to_string() };
    let inner = match s.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']').ok_or_else(format)?,
        None if s.contains(['[', ']']) => return Err(format()),
        None => s,
    };
    let Some((address, zone)) = inner.split_once('%') else {
        let ip = if inner.len() == s.len() {
            s.parse::<IpAddr>().map_err(|_| format())?
        } else {
            // Brackets belong to IPv6 alone.
            IpAddr::V6(inner.parse().map_err(|_| format())?)
        };
        // The kernel refuses it with a bare EINVAL: which link is unknown.
        if matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()) {
            return Err(ConfigError::BindZoneMissing { value: s.to_string() });
        }
        return Ok(SocketAddr::new(ip, port));
    };
    // So do zones.
    let ip = address.parse::<std::net::Ipv6Addr>().map_err(|_| format())?;
    if takes_no_zone(ip) {
        return Err(ConfigError::ZoneNotLinkLocal { flag: "--bind", value: s.to_string() });
    }
    let scope_id = interface_index(zone).ok_or_else(|| ConfigError::BindInterface { value: s.to_string() })?;
    Ok(SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, scope_id)))
}

/// An interface's index, from its name or the index itself.
fn interface_index(zone: &str) -> Option<u32> {
    if let Ok(index) = zone.parse::<u32>() {
        return interface_name(index).map(|_| index);
    }
    let name = std::ffi::CString::new(zone).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

fn parse_port(s: &str) -> Option<u16> {
    // Port 0 lets the kernel choose; tests rely on it.
    s.trim().parse::<u16>().ok()
}

fn parse_count(flag: &'static str, s: &str, min: usize) -> Result<usize, ConfigError> {
    let expected = if min == 0 { "a whole number (0 or more)" } else { "a whole number greater than 0" };
    match s.trim().parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => {
            Err(ConfigError::NumberRange { flag, value: s.to_string(), max: usize::MAX })
        }
        _ => Err(ConfigError::Number { flag, value: s.to_string(), expected }),
    }
}

/// A count from `min` to `max`, which `expected` states: any value
/// outside, or not a number, gets that message.
fn parse_bounded(
    flag: &'static str,
    s: &str,
    min: usize,
    max: usize,
    expected: &'static str,
) -> Result<usize, ConfigError> {
    match parse_count(flag, s, min) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(ConfigError::Number { flag, value: s.to_string(), expected }),
    }
}

/// Most workers `--workers` takes: far more than any machine has cores,
/// and few enough that sizing anything by it cannot overflow. (Whether the
/// threads and their descriptors fit is the system's call, reported as a
/// start-up error when they do not.)
pub const MAX_WORKERS: usize = 1024;

/// Longest duration any flag takes: a year, far past any useful timeout
/// or period, and far below where adding it to an `Instant` overflows.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// `--max-connections` when not given.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;

/// Most connections `--max-connections` takes: each holds two descriptors,
/// and Linux lets a process open at most 2,147,483,584 (the ceiling of
/// fs.nr_open). A larger cap could never be reached, only overflow the
/// arithmetic that sizes the descriptor budget.
pub const MAX_CONNECTIONS: usize = 2_147_483_584 / 2;

/// Shortest period between health-check rounds or stats reports: a
/// shorter one would keep its thread busy doing nothing else.
pub const MIN_PERIOD: Duration = Duration::from_millis(10);

/// Accepts whole or fractional seconds up to [`MAX_SECONDS`]; rejects
/// negatives, NaN and anything longer.
pub fn parse_seconds(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::Seconds { flag, value: s.to_string() };
    let secs: f64 = s.trim().parse().map_err(|_| err())?;
    // A number too large for f64 (1e400) parses as infinity: out of range,
    // unlike the words inf and infinity.
    let spelled_infinite = s.to_ascii_lowercase().contains("inf");
    if secs.is_nan() || secs < 0.0 || (secs.is_infinite() && spelled_infinite) {
        return Err(err());
    }
    if secs > MAX_SECONDS as f64 {
        return Err(ConfigError::SecondsRange { flag, value: s.to_string(), expected: "at most 31536000 (a year)" });
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|_| err())?;
    // Zero means "off" or "never" to some flags: a positive value too small
    // for a nanosecond must not turn into that.
    if d.is_zero() && secs > 0.0 {
        return Ok(Duration::from_nanos(1));
    }
    Ok(d)
}

/// Seconds for a flag where 0 would mean nothing sensible (unlike
/// `--idle-timeout`, where it means "never").
fn positive_seconds(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    match parse_seconds(flag, s)? {
        Duration::ZERO => Err(ConfigError::SecondsRange { flag, value: s.to_string(), expected: "more than 0" }),
        d => Ok(d),
    }
}

/// `d`, parsed from `s`, if it is a period of at least [`MIN_PERIOD`].
fn at_least_min_period(flag: &'static str, s: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d < MIN_PERIOD {
        return Err(ConfigError::SecondsRange { flag, value: s.to_string(), expected: "at least 0.01" });
    }
    Ok(d)
}

/// `host:port` or `host:port@weight`; IPv6 literals go in brackets.
pub fn parse_backend(s: &str) -> Result<BackendSpec, ConfigError> {
    resolve_backend(s).map(|(spec, _)| spec)
}

/// The note for a backend whose name resolved to `found` addresses, when
/// that is more than the one lb uses.
fn several_addresses(spec: &BackendSpec, found: usize) -> Option<String> {
    (found > 1).then(|| {
        format!(
            "backend {} resolves to {found} addresses; lb connects to the first, {}, alone (as HAProxy does): \
             give an address to choose another",
            spec.name, spec.addr
        )
    })
}

/// [`parse_backend`], and how many addresses its host resolved to.
fn resolve_backend(s: &str) -> Result<(BackendSpec, usize), ConfigError> {
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
    let format = || ConfigError::BackendFormat { value: s.to_string() };
    let (host, port) = hostport.rsplit_once(':').ok_or_else(format)?;
    // An IPv6 literal goes in brackets, as nginx and HAProxy want it:
    // without them `2001:db8::1:80` is itself a whole address, and which
    // colon starts the port is a guess. Brackets hold nothing else, but
    // for a link-local address's zone (`[fe80::1%eth0]`), which the
    // resolver below turns into a scope id without any lookup.
    let host = match host.strip_prefix('[') {
        Some(inner) => {
            let inner = inner.strip_suffix(']').ok_or_else(format)?;
            let (address, zone) = inner.split_once('%').map_or((inner, None), |(a, zone)| (a, Some(zone)));
            let ip = address.parse::<std::net::Ipv6Addr>().map_err(|_| format())?;
            if zone.is_some() && takes_no_zone(ip) {
                return Err(ConfigError::ZoneNotLinkLocal { flag: "--backends", value: s.to_string() });
            }
            inner
        }
        None if host.is_empty() || host.contains([':', '[', ']']) => return Err(format()),
        // The resolver would take it as inet_aton(3) does: `10.0.1` as
        // 10.0.0.1, `010.0.0.1` (octal) as 8.0.0.1, `2130706433` as
        // 127.0.0.1. A typo must not connect somewhere else.
        None if is_partial_ipv4(host) && host.parse::<IpAddr>().is_err() => {
            return Err(ConfigError::BackendPartialIpv4 { value: s.to_string() });
        }
        None => host,
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConfigError::BackendPort { value: s.to_string() })?;
    let (addr, found) = if let Ok(ip) = host.parse::<IpAddr>() {
        (SocketAddr::new(ip, port), 1)
    } else {
        let mut all = (host, port)
            .to_socket_addrs()
            .map_err(|e| ConfigError::Resolve { value: s.to_string(), reason: e.to_string() })?;
        let first = all
            .next()
            .ok_or_else(|| ConfigError::Resolve { value: s.to_string(), reason: "no addresses found".to_string() })?;
        (first, 1 + all.count())
    };
    if let Some(what) = unusable(addr.ip()) {
        return Err(ConfigError::BackendUnusable { value: s.to_string(), what });
    }
    // connect(2) refuses it with a bare EINVAL (which link is unknown) or
    // ENETUNREACH (no such link).
    if lacks_its_link(addr) {
        return Err(match addr {
            SocketAddr::V6(a) if a.scope_id() != 0 => ConfigError::BackendInterface { value: s.to_string() },
            _ => ConfigError::BackendZoneMissing { value: s.to_string() },
        });
    }
    Ok((BackendSpec { name: hostport.to_string(), addr, weight }, found))
}

/// Whether `host` (outside brackets) ends in a number: no host name does
/// (a top-level domain is never numeric), so unless it is a plain IPv4
/// address it is one written short, in octal or hex, or mistyped.
fn is_partial_ipv4(host: &str) -> bool {
    let last = host.strip_suffix('.').unwrap_or(host).rsplit('.').next().unwrap_or_default();
    let (digits, radix) = match last.strip_prefix("0x").or_else(|| last.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (last, 10),
    };
    !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix))
}

/// Whether the kernel ignores a zone on `ip`: it heeds one on link-local
/// addresses alone. (Multicast is refused anyway, as such.)
fn takes_no_zone(ip: std::net::Ipv6Addr) -> bool {
    !ip.is_unicast_link_local() && !ip.is_multicast()
}

/// A link-local address without an interface of this host as its zone
/// (none, or one that does not exist): the kernel cannot tell which link.
fn lacks_its_link(addr: SocketAddr) -> bool {
    matches!(addr, SocketAddr::V6(a) if a.ip().is_unicast_link_local() && interface_name(a.scope_id()).is_none())
}

/// What makes `ip` unusable at either end of a TCP connection, if
/// anything: TCP is unicast.
fn unusable(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        ip if ip.is_multicast() => Some("a multicast address"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["lb"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).expect("test arguments parse")
    }

    /// Each of `values` given to `flag` is refused with `expected(value)`.
    fn refused(flag: &str, values: &[&str], expected: impl Fn(String) -> ConfigError) {
        for v in values {
            let e = Config::from_args(&args(&[flag, v])).expect_err(v);
            assert_eq!(e, expected(v.to_string()), "{flag} {v}");
        }
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::from_args(&args(&[])).expect("defaults are valid");
        assert_eq!(c.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].addr, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.max_connections, 1000);
        assert!(c.fit_to_fd_limit, "the default cap may be lowered to fit the descriptor limit");
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.buffer_size, 32768);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.retries, 2);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.splice, SpliceMode::Auto);
        assert_eq!(c.steer, SteerMode::Auto);
        assert_eq!(c.max_pipes, 250);
        assert_eq!(
            c.health,
            HealthConfig {
                probes: true,
                period: Duration::from_secs(5),
                timeout: Duration::from_secs(3),
                rise: 2,
                fall: 3,
                url: None,
            }
        );
        assert_eq!(c.stats_period, Some(Duration::from_secs(30)));
        assert_eq!(c.admin, None);
    }

    #[test]
    fn the_probe_timeout_follows_the_connection_timeout_unless_given() {
        let c = Config::from_args(&args(&["--connection-timeout", "1.5"])).unwrap();
        assert_eq!(c.health.timeout, Duration::from_millis(1500));
        let c = Config::from_args(&args(&["--connection-timeout", "1.5", "--health-check-timeout", "0.2"])).unwrap();
        assert_eq!(c.health.timeout, Duration::from_millis(200));
    }

    #[test]
    fn health_and_stats_flags_are_validated_into_the_config() {
        let c = Config::from_args(&args(&[
            "--health-check-period",
            "0.2",
            "--rise",
            "1",
            "--fall",
            "5",
            "--health-check-url",
            "/health?full=1",
            "--stats-period",
            "0",
            "--admin",
            "[::1]:9100",
        ]))
        .unwrap();
        assert_eq!(c.health.period, Duration::from_millis(200));
        assert_eq!((c.health.rise, c.health.fall), (1, 5));
        assert_eq!(c.health.url.as_deref(), Some("/health?full=1"));
        assert!(c.health.probes);
        assert_eq!(c.stats_period, None);
        assert_eq!(c.admin, Some("[::1]:9100".parse().unwrap()));
        let c = Config::from_args(&args(&["--no-health-check", "--health-check-period", "1", "--fall", "2"])).unwrap();
        assert!(!c.health.probes);
        assert_eq!((c.health.period, c.health.fall), (Duration::from_secs(1), 2), "hold-down and passive fall");
    }

    #[test]
    fn admin_accepts_localhost_and_port_zero() {
        let c = Config::from_args(&args(&["--admin", "localhost:0"])).unwrap();
        assert_eq!(c.admin, Some("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn splice_modes_and_pipe_limits_are_parsed() {
        let c = Config::from_args(&args(&["--splice", "never", "--max-pipes", "0"])).unwrap();
        assert_eq!(c.splice, SpliceMode::Never);
        assert_eq!(c.max_pipes, 0);
        let c = Config::from_args(&args(&["--splice", "always", "--max-connections", "40"])).unwrap();
        assert!(!c.fit_to_fd_limit, "a cap the operator gave is kept");
        assert_eq!(c.splice, SpliceMode::Always);
        assert_eq!(c.max_pipes, 10, "defaults to a quarter of --max-connections");
    }

    #[test]
    fn steer_modes_are_parsed() {
        for (value, mode) in [("auto", SteerMode::Auto), ("always", SteerMode::Always), ("never", SteerMode::Never)] {
            assert_eq!(Config::from_args(&args(&["--steer", value])).unwrap().steer, mode);
        }
        let e = Config::from_args(&args(&["--steer", "hash"])).unwrap_err();
        assert_eq!(e.to_string(), "--steer: 'hash' is not one of auto, always, never");
    }

    #[test]
    fn kernel_relay_is_off_unless_asked_for_and_its_modes_are_parsed() {
        assert_eq!(Config::from_args(&args(&[])).unwrap().kernel_relay, KernelRelay::Never);
        assert_eq!(Config::from_args(&args(&["--kernel-relay", "auto"])).unwrap().kernel_relay, KernelRelay::Auto);
        assert_eq!(Config::from_args(&args(&["--kernel-relay", "never"])).unwrap().kernel_relay, KernelRelay::Never);
        let e = Config::from_args(&args(&["--kernel-relay", "always"])).unwrap_err();
        assert_eq!(e.to_string(), "--kernel-relay: 'always' is not one of auto, never");
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let c = Config::from_args(&args(&["--connection-timeout", "0.5"])).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
    }

    #[test]
    fn a_bad_port_says_that_0_is_allowed_too() {
        let e = Config::from_args(&args(&["-p", "70000"])).unwrap_err().to_string();
        assert_eq!(e, "--port: '70000' is not a port number (0-65535; 0 picks a free port)");
    }

    #[test]
    fn a_zero_timeout_that_cannot_mean_off_asks_for_more_than_0() {
        for flag in ["--connection-timeout", "--health-check-timeout"] {
            let e = Config::from_args(&args(&[flag, "0"])).unwrap_err();
            assert_eq!(e.to_string(), format!("{flag}: '0' seconds is out of range: more than 0"));
        }
    }

    #[test]
    fn idle_timeout_zero_means_never() {
        let c = Config::from_args(&args(&["--idle-timeout", "0"])).unwrap();
        assert_eq!(c.idle_timeout, None);
        let c = Config::from_args(&args(&["--idle-timeout", "1e-10"])).unwrap();
        assert_eq!(c.idle_timeout, Some(Duration::from_nanos(1)), "only 0 means never");
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
    fn the_longest_and_shortest_allowed_values_are_accepted() {
        let c = Config::from_args(&args(&[
            "--idle-timeout",
            "31536000",
            "--stats-period",
            "0.01",
            "--health-check-period",
            "0.01",
            "--workers",
            "1024",
        ]))
        .expect("limits are inclusive");
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(MAX_SECONDS)));
        assert_eq!(c.stats_period, Some(MIN_PERIOD));
        assert_eq!(c.health.period, MIN_PERIOD);
        assert_eq!(c.workers, MAX_WORKERS);
    }

    #[test]
    fn rejects_each_bad_value_naming_its_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["-p", "70000"], "--port"),
            (&["-b", "nohost"], "--backends"),
            (&["-b", "127.0.0.1:80@0"], "--backends"),
            (&["-b", "127.0.0.1:0"], "--backends"),
            (&["-b", "127.0.0.1:1", "127.0.0.1:1@2"], "--backends"),
            (&["-b", "[::1]:1", "[0:0:0:0:0:0:0:1]:1"], "--backends"),
            (&["--max-connections", "0"], "--max-connections"),
            (&["--buffer-size", "0"], "--buffer-size"),
            (&["--workers", "0"], "--workers"),
            (&["--connection-timeout", "-1"], "--connection-timeout"),
            (&["--connection-timeout", "0"], "--connection-timeout"),
            (&["--idle-timeout", "abc"], "--idle-timeout"),
            (&["--retries", "99"], "--retries"),
            (&["--drain-timeout", "NaN"], "--drain-timeout"),
            (&["--bind", "not-an-ip"], "--bind"),
            (&["--splice", "sometimes"], "--splice"),
            (&["--splice", ""], "--splice"),
            (&["--steer", "least"], "--steer"),
            (&["--kernel-relay", "on"], "--kernel-relay"),
            (&["--max-pipes", "-1"], "--max-pipes"),
            (&["--max-pipes", "many"], "--max-pipes"),
            (&["--health-check-period", "0"], "--health-check-period"),
            (&["--health-check-period", "-2"], "--health-check-period"),
            (&["--health-check-timeout", "0"], "--health-check-timeout"),
            (&["--health-check-timeout", "soon"], "--health-check-timeout"),
            (&["--rise", "0"], "--rise"),
            (&["--rise", "1001"], "--rise"),
            (&["--fall", "0"], "--fall"),
            (&["--fall", "-1"], "--fall"),
            (&["--health-check-url", "health"], "--health-check-url"),
            (&["--health-check-url", "/a b"], "--health-check-url"),
            (&["--health-check-url", "/a\r\nX: y"], "--health-check-url"),
            (&["--stats-period", "-1"], "--stats-period"),
            (&["--admin", "9100"], "--admin"),
            (&["--admin", "example.com:9100"], "--admin"),
            (&["--admin", "127.0.0.1:99999"], "--admin"),
            // Values whose use would overflow or spin rather than fail here.
            (&["--workers", "1025"], "--workers"),
            (&["--workers", "18446744073709551615"], "--workers"),
            (&["--stats-period", "1e19"], "--stats-period"),
            (&["--stats-period", "0.001"], "--stats-period"),
            (&["--stats-period", "1e-10"], "--stats-period"),
            (&["--drain-timeout", "1e19"], "--drain-timeout"),
            (&["--idle-timeout", "31536001"], "--idle-timeout"),
            (&["--connection-timeout", "1e19"], "--connection-timeout"),
            (&["--health-check-period", "1e19"], "--health-check-period"),
            (&["--health-check-period", "1e-9"], "--health-check-period"),
            (&["--health-check-timeout", "1e19"], "--health-check-timeout"),
            // A leading `-` that is not a plain negative number.
            (&["--workers", "-inf"], "--workers"),
            (&["--idle-timeout", "-3s"], "--idle-timeout"),
            (&["-p", "-80x"], "--port"),
            (&["--max-connections", "-1e3"], "--max-connections"),
            (&["--buffer-size", "-32k"], "--buffer-size"),
            (&["--max-pipes", "-x"], "--max-pipes"),
        ];
        for (argv, flag) in cases {
            let err = Config::from_args(&args(argv)).expect_err("value must be rejected");
            let msg = err.to_string();
            assert!(msg.starts_with(flag), "{argv:?} gave '{msg}'");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }

    #[test]
    fn ipv6_backends_need_brackets_and_brackets_hold_only_ipv6() {
        // Without brackets the last group would be taken for the port.
        for bad in ["2001:db8::1", "::1:80", "2001:db8::1:80", "[127.0.0.1]:80", "[[::1]]:80", "[::1:80", "::1]:80"] {
            let e = parse_backend(bad).expect_err(bad);
            assert_eq!(e, ConfigError::BackendFormat { value: bad.to_string() }, "{bad}");
            assert!(e.to_string().contains("[::1]:80"), "the message shows the form: {e}");
        }
        assert_eq!(parse_backend("[2001:db8::1]:80").unwrap().addr, "[2001:db8::1]:80".parse().unwrap());
        assert_eq!(parse_backend("[::1]:80@2").unwrap().weight, 2);
    }

    #[test]
    fn a_link_local_ipv6_backend_keeps_its_zone() {
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        assert_ne!(lo, 0, "the loopback interface has an index");
        for spec in ["[fe80::1%lo]:80", &format!("[fe80::1%{lo}]:80")] {
            let SocketAddr::V6(a) = parse_backend(spec).expect(spec).addr else { panic!("{spec}: not IPv6") };
            assert_eq!((*a.ip(), a.port(), a.scope_id()), ("fe80::1".parse().unwrap(), 80, lo), "{spec}");
        }
        assert!(matches!(parse_backend("[fe80::1%no-such-interface]:80"), Err(ConfigError::Resolve { .. })));
        assert!(matches!(parse_backend("[nothost%lo]:80"), Err(ConfigError::BackendFormat { .. })));
    }

    #[test]
    fn a_bind_address_takes_brackets_only_around_ipv6() {
        let c = Config::from_args(&args(&["--bind", "[::1]", "-p", "0"])).unwrap();
        assert_eq!(c.listen, "[::1]:0".parse().unwrap());
        refused("--bind", &["[::1", "::1]", "[127.0.0.1]", "[[::1]]"], |value| ConfigError::BindAddress { value });
    }

    #[test]
    fn a_link_local_bind_address_takes_its_interface_by_name_or_index() {
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        assert_ne!(lo, 0, "the loopback interface has an index");
        for bind in ["fe80::1%lo", "[fe80::1%lo]", &format!("fe80::1%{lo}")] {
            let c = Config::from_args(&args(&["--bind", bind, "-p", "7"])).expect(bind);
            let SocketAddr::V6(a) = c.listen else { panic!("{bind}: not IPv6") };
            assert_eq!((*a.ip(), a.port(), a.scope_id()), ("fe80::1".parse().unwrap(), 7, lo), "{bind}");
        }
        refused("--bind", &["127.0.0.1%lo", "fe80::1%lo]", "nothost%lo"], |value| ConfigError::BindAddress { value });
        refused("--bind", &["fe80::1%no-such-interface", "fe80::1%", "fe80::1%0"], |value| {
            ConfigError::BindInterface { value }
        });
        for bare in ["fe80::1", "[fe80::1]"] {
            let e = Config::from_args(&args(&["--bind", bare])).expect_err(bare);
            assert_eq!(e, ConfigError::BindZoneMissing { value: bare.to_string() });
            assert_eq!(
                e.to_string(),
                format!("--bind: '{bare}' is link-local: name its interface after a % (fe80::1%eth0)")
            );
        }
    }

    #[test]
    fn a_number_of_seconds_too_large_for_a_float_is_out_of_range_not_unreadable() {
        let e = Config::from_args(&args(&["--connection-timeout", "1e400"])).expect_err("too large");
        assert!(matches!(e, ConfigError::SecondsRange { .. }), "{e}");
        for word in ["inf", "Infinity", "1e400x"] {
            let e = Config::from_args(&args(&["--connection-timeout", word])).expect_err(word);
            assert!(matches!(e, ConfigError::Seconds { .. }), "{word}: {e}");
        }
    }

    #[test]
    fn a_health_check_path_is_refused_for_its_length_or_its_characters_by_name() {
        let long = format!("/{}", "a".repeat(MAX_HEALTH_PATH));
        let e = Config::from_args(&args(&["--health-check-url", &long])).expect_err("too long");
        assert_eq!(e.to_string(), format!("--health-check-url: the path is 2049 bytes long; at most 2048"));
        let e = Config::from_args(&args(&["--health-check-url", "/ü"])).expect_err("not ASCII");
        assert!(e.to_string().contains("percent-encode"), "{e}");
        Config::from_args(&args(&["--health-check-url", &long[..MAX_HEALTH_PATH]])).expect("at the limit");
    }

    #[test]
    fn blanks_around_addresses_are_trimmed_as_around_numbers() {
        let c = Config::from_args(&args(&[
            "--bind",
            " 127.0.0.1 ",
            "-p",
            " 7",
            "-b",
            "127.0.0.1:80 ",
            "--admin",
            " 127.0.0.1:9",
        ]))
        .expect("blanks trimmed");
        assert_eq!(c.listen, "127.0.0.1:7".parse().unwrap());
        assert_eq!(c.backends[0].name, "127.0.0.1:80");
        assert_eq!(c.admin, Some("127.0.0.1:9".parse().unwrap()));
    }

    #[test]
    fn a_link_local_admin_address_takes_its_interface_by_name_or_index() {
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        for admin in ["[fe80::1%lo]:9100", &format!("[fe80::1%{lo}]:9100")] {
            let c = Config::from_args(&args(&["--admin", admin])).expect(admin);
            let Some(SocketAddr::V6(a)) = c.admin else { panic!("{admin}: not IPv6") };
            assert_eq!((*a.ip(), a.port(), a.scope_id()), ("fe80::1".parse().unwrap(), 9100, lo), "{admin}");
        }
        refused("--admin", &["[fe80::1]:9100"], |value| ConfigError::AdminZone { value });
        // An interface was given: the fault is its name, as for --bind.
        refused(
            "--admin",
            &["[fe80::1%no-such-interface]:9100", "[fe80::1%nosuchif]:0", "[fe80::1%99999]:9100"],
            |value| ConfigError::AdminInterface { value },
        );
        let e = Config::from_args(&args(&["--admin", "[fe80::1%nosuchif]:0"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--admin: '[fe80::1%nosuchif]:0' names no network interface of this host (after the %: a name or index)"
        );
        refused("--admin", &["[%]:1"], |value| ConfigError::AdminAddress { value });
        // Not link-local: no zone at all.
        refused("--admin", &["[::1%nosuch]:9100"], |value| ConfigError::ZoneNotLinkLocal { flag: "--admin", value });
    }

    #[test]
    fn multicast_and_broadcast_addresses_are_refused_for_bind_and_backends() {
        for (bind, what) in [
            ("224.0.0.1", "a multicast address"),
            ("255.255.255.255", "the broadcast address"),
            ("ff02::1", "a multicast address"),
        ] {
            let e = Config::from_args(&args(&["--bind", bind])).expect_err(bind);
            assert_eq!(e, ConfigError::BindUnusable { value: bind.to_string(), what });
            let admin = if bind.contains(':') { format!("[{bind}]:9100") } else { format!("{bind}:9100") };
            let e = Config::from_args(&args(&["--admin", &admin])).expect_err(&admin);
            assert_eq!(e, ConfigError::AdminUnusable { value: admin.clone(), what });
        }
        for (backend, what) in [
            ("224.0.0.1:80", "a multicast address"),
            ("255.255.255.255:80", "the broadcast address"),
            ("[ff02::1]:80", "a multicast address"),
            ("[::ffff:224.0.0.1]:80", "a multicast address"),
        ] {
            let e = Config::from_args(&args(&["-b", backend])).expect_err(backend);
            assert_eq!(e, ConfigError::BackendUnusable { value: backend.to_string(), what });
            assert!(e.to_string().ends_with(": TCP cannot connect there"), "{e}");
        }
    }

    #[test]
    fn a_backend_ipv4_address_written_short_or_in_octal_or_hex_is_refused_not_resolved() {
        let values =
            ["10.0.1:80", "127.1:80", "2130706433:80", "0x7f.1:80", "010.0.0.1:80", "1.2.3.4.5:80", "1.2.3.:80"];
        refused("-b", &values, |value| ConfigError::BackendPartialIpv4 { value });
        for host in ["localhost", "example.com", "x.0x7g", "db1.internal", "1a.example", "a.0x", "0x"] {
            assert!(!is_partial_ipv4(host), "{host} is a host name");
        }
        // An interface's name may end in a number after a dot (a VLAN).
        let e = parse_backend("[fe80::1%eth0.100]:80").expect_err("this host has no eth0.100");
        assert!(matches!(e, ConfigError::Resolve { .. }), "{e}");
    }

    #[test]
    fn a_zone_is_refused_on_an_address_that_is_not_link_local() {
        refused("--bind", &["2001:db8::1%lo", "[::1%1]"], |value| ConfigError::ZoneNotLinkLocal {
            flag: "--bind",
            value,
        });
        refused("-b", &["[2001:db8::1%lo]:80", "[::1%1]:80"], |value| ConfigError::ZoneNotLinkLocal {
            flag: "--backends",
            value,
        });
        refused("--admin", &["[::1%lo]:9100", "[2001:db8::1%1]:9100"], |value| ConfigError::ZoneNotLinkLocal {
            flag: "--admin",
            value,
        });
        // Other faults first: multicast, a missing bracket.
        refused("--bind", &["ff02::1%lo"], |value| ConfigError::BindUnusable { value, what: "a multicast address" });
        refused("-b", &["[ff02::1%lo]:80"], |value| ConfigError::BackendUnusable {
            value,
            what: "a multicast address",
        });
        refused("--admin", &["[::1%lo"], |value| ConfigError::AdminAddress { value });
    }

    #[test]
    fn a_backend_named_by_host_shows_the_address_it_resolved_to() {
        let c = Config::from_args(&args(&["-b", "localhost:80@3", "127.0.0.1:81", "[::1]:82"])).expect("valid");
        let shown: Vec<String> = c.backends.iter().map(BackendSpec::describe).collect();
        let localhost = c.backends[0].addr;
        assert_eq!(shown, [format!("localhost:80@3 ({localhost})"), "127.0.0.1:81".into(), "[::1]:82".into()]);
    }

    #[test]
    fn a_backend_name_with_several_addresses_is_noted_with_the_one_used() {
        let spec = BackendSpec { name: "db:5432".into(), addr: "[::1]:5432".parse().unwrap(), weight: 1 };
        assert_eq!(several_addresses(&spec, 1), None);
        let note = several_addresses(&spec, 2).expect("two addresses");
        assert!(note.starts_with("backend db:5432 resolves to 2 addresses; lb connects to the first, [::1]:5432,"));
        let c = Config::from_args(&args(&["-b", "127.0.0.1:80", "[::1]:81"])).expect("valid");
        assert!(c.notes.is_empty(), "addresses resolve to themselves: {:?}", c.notes);
    }

    #[test]
    fn a_link_local_backend_needs_its_interface() {
        let e = Config::from_args(&args(&["-b", "[fe80::1]:80"])).expect_err("no zone");
        assert_eq!(e, ConfigError::BackendZoneMissing { value: "[fe80::1]:80".to_string() });
        let e = Config::from_args(&args(&["-b", "[fe80::1%99999]:80"])).expect_err("no such interface");
        assert_eq!(e, ConfigError::BackendInterface { value: "[fe80::1%99999]:80".to_string() });
        Config::from_args(&args(&["-b", "[fe80::1%lo]:80"])).expect("with its zone");
    }

    #[test]
    fn an_ipv4_mapped_backend_is_the_same_backend_as_its_ipv4_address() {
        let e = Config::from_args(&args(&["-b", "127.0.0.1:80", "[::ffff:127.0.0.1]:80 "])).expect_err("twice");
        assert!(e.to_string().starts_with("--backends: '[::ffff:127.0.0.1]:80' is the same backend"), "{e}");
        Config::from_args(&args(&["-b", "127.0.0.1:80", "[::ffff:127.0.0.1]:81"])).expect("another port");
    }

    #[test]
    fn a_zone_by_index_must_name_an_interface_that_exists() {
        let e = Config::from_args(&args(&["--bind", "fe80::1%99999"])).expect_err("no such index");
        assert_eq!(e, ConfigError::BindInterface { value: "fe80::1%99999".to_string() });
    }

    #[test]
    fn pipes_are_refused_with_splice_never_unless_there_are_none() {
        let e = Config::from_args(&args(&["--splice", "never", "--max-pipes", "8"])).unwrap_err();
        assert_eq!(e, ConfigError::PipesWithoutSplice { value: "8".to_string() });
        assert!(e.to_string().starts_with("--max-pipes: '8' "), "{e}");
        let c = Config::from_args(&args(&["--splice", "never", "--max-pipes", "0"])).unwrap();
        assert_eq!(c.max_pipes, 0);
        // The default count is lb's own, not a wish to splice.
        let c = Config::from_args(&args(&["--splice", "never"])).unwrap();
        assert_eq!(c.splice, SpliceMode::Never);
    }

    #[test]
    fn a_count_too_large_for_any_number_is_out_of_range_not_a_non_number() {
        for value in ["99999999999999999999", "18446744073709551615", "1073741793"] {
            let e = Config::from_args(&args(&["--max-connections", value])).unwrap_err();
            assert_eq!(e.to_string(), format!("--max-connections: '{value}' is out of range: at most 1073741792"));
        }
        let c = Config::from_args(&args(&["--max-connections", "1073741792"])).expect("the most Linux allows");
        assert_eq!(c.max_connections, MAX_CONNECTIONS);
        // A flag with a range of its own states it.
        let e = Config::from_args(&args(&["--workers", "99999999999999999999"])).unwrap_err();
        assert_eq!(e.to_string(), "--workers: '99999999999999999999' is not a whole number from 1 to 1024");
    }

    #[test]
    fn max_pipes_is_capped_at_two_per_connection() {
        let c = Config::from_args(&args(&["--max-connections", "10", "--max-pipes", "100000"])).unwrap();
        assert_eq!(c.max_pipes, 20);
        let c = Config::from_args(&args(&["--max-connections", "10", "--max-pipes", "20"])).unwrap();
        assert_eq!(c.max_pipes, 20);
        let c = Config::from_args(&args(&["--max-connections", "10", "--max-pipes", "99999999999999999999"])).unwrap();
        assert_eq!(c.max_pipes, 20, "past any count is past the cap too");
    }

    #[test]
    fn max_pipes_lowered_to_two_per_connection_is_noted() {
        let c = Config::from_args(&args(&["--max-connections", "1000", "--max-pipes", "3000"])).unwrap();
        assert_eq!(c.max_pipes, 2000);
        assert_eq!(
            c.notes,
            ["--max-pipes: '3000' is more than two per connection (--max-connections 1000); \
              using 2000, as a connection uses no more"]
        );
        for kept in [&["--max-connections", "1000", "--max-pipes", "2000"][..], &["--max-connections", "2"]] {
            let c = Config::from_args(&args(kept)).unwrap();
            assert!(c.notes.is_empty(), "{kept:?}: {:?}", c.notes);
        }
    }

    #[test]
    fn the_splice_line_says_when_there_are_no_pipes_to_splice_with() {
        let line = |extra: &[&str]| Config::from_args(&args(extra)).unwrap().splice_summary();
        assert_eq!(
            line(&["--max-connections", "2"]),
            "splice: auto, but with 0 pipes every byte is copied (--max-pipes sets how many)"
        );
        assert_eq!(
            line(&["--splice", "always", "--max-pipes", "0"]),
            "splice: always, but with 0 pipes every byte is copied (--max-pipes sets how many)"
        );
        assert_eq!(line(&["--max-connections", "40"]), "splice: auto, up to 10 pipes of 32768 bytes");
        assert_eq!(line(&["--splice", "never"]), "splice: never (every byte is copied)");
    }

    #[test]
    fn an_unknown_flag_is_a_parse_error() {
        assert!(Args::try_parse_from(["lb", "--frobnicate"]).is_err());
    }
}
