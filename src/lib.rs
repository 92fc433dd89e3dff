//! lb: a layer-4 TCP load balancer built on per-core mio event loops.
//!
//! Start-up turns the command line into a [`config::Config`], binds one
//! listener per worker ([`listener`]), builds the shared backend table
//! ([`backend`], [`shared`]) and starts one [`worker`] thread per core. Each
//! worker relays client/backend pairs ([`session`]) through pooled buffers
//! ([`pool`]) or, for bulk flows, spliced through pooled pipes ([`pipe`],
//! [`splice`]), choosing backends by least connections ([`balancer`]). The
//! calling thread supervises: it turns [`signals`] into a graceful drain and
//! prints the [`stats`] report. Off the data path, [`health`] probes the
//! backends and [`admin`] serves [`metrics`] on its own thread; log lines
//! reach stderr through [`logging`]'s writer thread. Two eBPF programs, built
//! with [`bpf`], run in the kernel: [`steer`] sends each new client to the
//! least loaded worker, and [`redirect`] relays the bytes of pairs that
//! trade small messages without waking lb.

pub mod admin;
pub mod backend;
pub mod balancer;
pub mod bpf;
pub mod config;
pub mod health;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod pipe;
pub mod pool;
pub mod redirect;
pub mod session;
pub mod shared;
pub mod signals;
pub mod splice;
pub mod stats;
pub mod steer;
pub mod systemd;
pub mod worker;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::{Poll, Waker};

use crate::config::Config;
use crate::listener::ListenError;
use crate::pipe::PipePool;
use crate::pool::BufferPool;
use crate::session::Pools;
use crate::shared::Shared;
use crate::signals::Signal;
use crate::worker::{WAKER, Worker, WorkerSettings};

/// One variant per start-up step that can fail.
#[derive(Debug)]
pub enum RunError {
    Listen(ListenError),
    Poll(io::Error),
    Signals(io::Error),
    Spawn(io::Error),
    Stats(io::Error),
    Health(io::Error),
    /// `--steer always`, and the steering program cannot be loaded.
    Steer(io::Error),
    /// The descriptor limit leaves no room for a single connection.
    FdLimit {
        limit: u64,
        needed: usize,
    },
    /// The admin endpoint's address cannot be bound.
    AdminBind(ListenError),
    /// Its thread or event loop cannot start.
    Admin {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    /// A backend is lb's own listening address.
    BackendIsListener {
        backend: String,
        listen: std::net::SocketAddr,
    },
    /// `--admin` overlaps lb's own listening address: one of the two
    /// binds would fail, and "already in use" would blame another process.
    AdminIsListener {
        admin: std::net::SocketAddr,
        listen: std::net::SocketAddr,
    },
    /// A backend that is lb's own admin endpoint: clients would get its
    /// HTTP answers.
    BackendIsAdmin {
        backend: String,
        admin: std::net::SocketAddr,
    },
    /// Event loops that failed or panicked while lb ran (each logged when
    /// it happened); the others kept serving until they stopped too.
    Workers {
        failed: usize,
        of: usize,
    },
}

impl RunError {
    /// Whether the command line itself is at fault (exit status 2, as for
    /// a bad value): its backends or its --admin address are lb's own
    /// sockets. That may show only once they are bound (-p 0) or passed
    /// by systemd.
    pub fn is_command_line(&self) -> bool {
        matches!(
            self,
            RunError::BackendIsListener { .. } | RunError::BackendIsAdmin { .. } | RunError::AdminIsListener { .. }
        )
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Listen(e) => write!(f, "{e}"),
            RunError::Poll(e) => write!(f, "cannot create an event loop: {e}"),
            RunError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            RunError::Spawn(e) => write!(f, "cannot start a worker thread: {e}"),
            RunError::Stats(e) => write!(f, "cannot start the stats reporter thread: {e}"),
            RunError::Health(e) => write!(f, "cannot start health checks: {e}"),
            RunError::Steer(e) => write!(
                f,
                "--steer always: cannot load the eBPF program that steers clients to workers: {e} (it needs root or CAP_BPF)"
            ),
            RunError::FdLimit { limit, needed } => write!(
                f,
                "the descriptor limit ({limit}) leaves no room for a connection; raise it (ulimit -n, LimitNOFILE=) to {needed} or more"
            ),
            RunError::AdminBind(e) => write!(f, "--admin: {e}"),
            RunError::BackendIsListener { backend, listen } => write!(
                f,
                "--backends: '{backend}' is lb's own listening address ({listen}); lb would relay every client to itself"
            ),
            RunError::AdminIsListener { admin, listen } => write!(
                f,
                "--admin: {admin} overlaps lb's own listening address ({listen}); give one of them another port"
            ),
            RunError::BackendIsAdmin { backend, admin } => write!(
                f,
                "--backends: '{backend}' is lb's own admin endpoint ({admin}); clients would be relayed to it"
            ),
            RunError::Admin { addr, source } => write!(f, "--admin: cannot serve on {addr}: {source}"),
            RunError::Workers { failed, of } => write!(f, "{failed} of {of} workers failed (see the log above)"),
        }
    }
}

impl std::error::Error for RunError {}

/// What wakes the supervisor.
#[derive(Debug)]
enum Event {
    Signal(Signal),
    /// A worker thread returned: the supervisor checks at once whether all
    /// have, instead of at its next tick.
    WorkerExited,
}

impl From<Signal> for Event {
    fn from(s: Signal) -> Self {
        Event::Signal(s)
    }
}

/// How often the supervisor checks on workers while nothing else happens.
const SUPERVISOR_TICK: Duration = Duration::from_millis(200);

/// Runs lb until it is drained by a signal, serving on `inherited` (the
/// sockets from [`systemd::listen_fds`], which `main` takes before any
/// thread starts) or, when there are none, on `--bind`/`--port`. Errors are
/// start-up errors: once serving, faults are logged and survived.
pub fn run(mut config: Config, inherited: Vec<OwnedFd>) -> Result<(), RunError> {
    // Logged once serving, so a start-up failure stays a single line.
    let fd_limit = listener::raise_fd_limit();
    let inherited_count = inherited.len();
    // Checked before binding: each worker's listeners take descriptors
    // too, and too many workers for the limit would otherwise fail there,
    // naming a socket call rather than the limit.
    if inherited_count > listener::MAX_LISTENERS {
        // Said first: raising the descriptor limit would not help.
        return Err(RunError::Listen(ListenError::TooManyInherited { count: inherited_count }));
    }
    let listeners = config.workers.max(1) * inherited_count.max(1);
    let fd_note = match &fd_limit {
        Ok(limit) => fit_fd_limit(&mut config, *limit, listeners)?,
        Err(_) => None,
    };
    // --admin is checked against the listening address before either is
    // bound: the second bind would fail as if another process held it.
    let per_worker = if inherited.is_empty() {
        admin_clash(config.admin, &[(config.listen, None)])?;
        listener::bind(config.listen, config.workers)
            .map_err(RunError::Listen)?
            .into_iter()
            .map(|l| vec![l])
            .collect::<Vec<_>>()
    } else {
        // The passed sockets are the listening addresses; --bind/--port
        // are ignored, so they cannot clash.
        let per_worker = listener::from_inherited(inherited, config.workers).map_err(RunError::Listen)?;
        let passed: Vec<_> = per_worker
            .first()
            .into_iter()
            .flatten()
            .filter_map(|l| listener::listening(l, &[]))
            .map(|l| (l.addr, Some(l.v6only)))
            .collect();
        admin_clash(config.admin, &passed)?;
        per_worker
    };
    // Every address served (systemd may pass several), the first one first:
    // scripts read the address that follows "listening on".
    let addrs: Vec<String> =
        per_worker.first().into_iter().flatten().filter_map(listener::local_addr).map(|a| a.to_string()).collect();
    let bound = if addrs.is_empty() { config.listen.to_string() } else { addrs.join(" and ") };
    // Checked against the sockets lb really serves: those systemd passed,
    // or the port the kernel chose for -p 0.
    let host = listener::host_addresses();
    for listen in per_worker.first().into_iter().flatten().filter_map(|l| listener::listening(l, &host)) {
        if let Some(backend) = reaching(&config.backends, listen) {
            return Err(RunError::BackendIsListener { backend, listen: listen.addr });
        }
    }

    let mut polls = Vec::with_capacity(config.workers);
    let mut wakers = Vec::with_capacity(config.workers);
    for _ in 0..config.workers {
        let poll = Poll::new().map_err(RunError::Poll)?;
        wakers.push(Waker::new(poll.registry(), WAKER).map_err(RunError::Poll)?);
        polls.push(poll);
    }
    let (steering, steer_note) = steer_workers(&config, &per_worker, inherited_count)?;
    let (relays, relay_note) = kernel_relays(&config);
    let backends = backend::table(&config.backends);
    let shared = Arc::new(Shared::new(backends, config.max_connections, wakers).steered_by(steering));

    let (tx, rx) = mpsc::channel::<Event>();
    signals::forward(tx.clone()).map_err(RunError::Signals)?;

    let settings = WorkerSettings {
        connect_timeout: config.connect_timeout,
        idle_timeout: config.idle_timeout,
        retries: config.retries,
        fall: config.health.fall,
        splice: config.splice,
    };
    // Bound before the workers start, so a taken --admin port is a start-up
    // error, and announced before the `listening on` line.
    let admin_addr = match config.admin {
        Some(addr) => {
            let admin_listener = admin::bind(addr).map_err(RunError::AdminBind)?;
            let actual = admin_listener.local_addr().unwrap_or(addr);
            if let Some(listen) = listener::listening(&admin_listener, &host)
                && let Some(backend) = reaching(&config.backends, listen)
            {
                return Err(RunError::BackendIsAdmin { backend, admin: listen.addr });
            }
            admin::spawn(admin_listener, Arc::clone(&shared)).map_err(|source| RunError::Admin { addr, source })?;
            Some(actual)
        }
        None => None,
    };
    health::spawn(Arc::clone(&shared), config.health.clone()).map_err(RunError::Health)?;
    let mut reporter = stats::Reporter::spawn().map_err(RunError::Stats)?;
    let handles = spawn_workers(&config, &shared, polls, per_worker, &settings, relays, &tx)?;
    drop(tx);

    // Notes from here on: a start-up failure above stays a single line.
    if inherited_count > 0 {
        info!("using {inherited_count} listening socket(s) passed by systemd; --port/--bind ignored");
    }
    // May warn about an unusable NOTIFY_SOCKET.
    let notifier = systemd::Notifier::from_env();
    if let Some(note) = steer_note {
        info!("{note}");
    }
    info!("{relay_note}");
    if let Some(actual) = admin_addr {
        info!("admin endpoint on http://{actual} (/metrics, /stats, /health)");
    }
    match fd_limit {
        Ok(n) => info!("file descriptor limit: {n}"),
        Err(e) => warn!("cannot raise the file descriptor limit: {e}"),
    }
    // The command line's own notes first: the descriptor note may lower
    // what they settled on, and reads right only after them.
    for note in &config.notes {
        warn!("{note}");
    }
    if let Some(note) = fd_note {
        warn!("{note}");
    }
    info!("{}", config.splice_summary());
    info!(
        "listening on {bound} with {} worker{}; backends: {}; max connections {}",
        config.workers,
        if config.workers == 1 { "" } else { "s" },
        config.backends.iter().map(config::BackendSpec::describe).collect::<Vec<_>>().join(", "),
        config.max_connections,
    );

    if let Some(n) = &notifier
        && let Err(e) = n.ready()
    {
        warn!("sd_notify READY=1: {e}");
    }
    let failed = supervise(&config, &shared, &rx, handles, notifier.as_ref(), &mut reporter);
    // A failed worker is a fault even if the others drained cleanly: exit
    // non-zero so that a supervisor such as systemd sees it.
    if failed > 0 {
        return Err(RunError::Workers { failed, of: config.workers });
    }
    Ok(())
}

/// Loads the program that sends each new client to the least-loaded
/// worker, as `--steer` asks. Returns it, if loaded, and the line to log
/// once serving. Sockets passed by systemd need none: each worker has a
/// copy of the same socket, so they share its one queue already; and one
/// worker has nothing to choose between.
fn steer_workers(
    config: &Config,
    per_worker: &[Vec<std::net::TcpListener>],
    inherited: usize,
) -> Result<(Option<steer::Steering>, Option<String>), RunError> {
    if config.steer == config::SteerMode::Never || inherited > 0 || per_worker.len() < 2 {
        return Ok((None, None));
    }
    let fds: Vec<_> = per_worker.iter().filter_map(|ls| ls.first()).map(AsRawFd::as_raw_fd).collect();
    match steer::Steering::attach(&fds) {
        Ok(s) => Ok((Some(s), Some("steering: each new client goes to the worker holding the fewest".to_string()))),
        Err(e) if config.steer == config::SteerMode::Always => Err(RunError::Steer(e)),
        Err(e) => Ok((
            None,
            Some(format!(
                "steering: cannot load the eBPF program ({e}); new clients go to workers by the kernel's hash (it needs root or CAP_BPF; --steer never skips it)"
            )),
        )),
    }
}

/// Refuses an `--admin` address that overlaps one of `listening`: each
/// listening address with its IPV6_V6ONLY, or `None` for a socket lb
/// binds itself, which has the system's default, as the admin socket does.
fn admin_clash(
    admin: Option<std::net::SocketAddr>,
    listening: &[(std::net::SocketAddr, Option<bool>)],
) -> Result<(), RunError> {
    let Some(admin) = admin else {
        return Ok(());
    };
    let v6only = listener::default_v6only();
    match listening.iter().find(|(l, l_v6only)| listener::clashes(admin, v6only, *l, l_v6only.unwrap_or(v6only))) {
        Some(&(listen, _)) => Err(RunError::AdminIsListener { admin, listen }),
        None => Ok(()),
    }
}

/// The name of the first backend that is lb's own socket `listen`.
fn reaching(backends: &[config::BackendSpec], listen: listener::Listening) -> Option<String> {
    backends.iter().find(|b| listener::reaches(b.addr, listen)).map(|b| b.name.clone())
}

/// Makes sure every connection lb accepts can also open its backend socket.
/// Returns the warning to log when the descriptor limit cannot hold
/// `--max-connections` and the pipes: with the default cap both are lowered
/// to what fits, so extra clients wait at the cap instead of being accepted
/// and then closed for want of a descriptor; a cap the operator gave is
/// kept, and lb then relies on backing off when accept runs out.
fn fit_fd_limit(config: &mut Config, limit: u64, listeners: usize) -> Result<Option<String>, RunError> {
    let reserved = listener::reserved_fds(config.workers, listeners, config.backends.len(), config.admin.is_some());
    let Some((connections, pipes)) = listener::fit_fd_limit(limit, reserved, config.max_connections, config.max_pipes)
    else {
        return Ok(None);
    };
    let needed = listener::fds_needed(reserved, config.max_connections, config.max_pipes);
    if !config.fit_to_fd_limit {
        return Ok(Some(format!(
            "the descriptor limit ({limit}) is too low for --max-connections {} and {} pipes, which need {needed}: \
             clients past it wait while lb is out of descriptors, or are closed; raise the limit (ulimit -n, LimitNOFILE=)",
            config.max_connections, config.max_pipes
        )));
    }
    if connections == 0 {
        return Err(RunError::FdLimit { limit, needed: listener::fds_needed(reserved, 1, 0) });
    }
    let note = format!(
        "the descriptor limit ({limit}) is too low for {} connections and {} pipes, which need {needed}: \
         serving at most {connections} connections with {pipes} pipes; raise the limit (ulimit -n, LimitNOFILE=) for more",
        config.max_connections, config.max_pipes
    );
    config.max_connections = connections;
    config.max_pipes = pipes;
    Ok(Some(note))
}

/// Directions one worker's kernel relay has slots for: two per client it
/// may hold, up to a bound on the kernel memory it pins. Pairs on slab
/// keys past it stay with lb.
const MAX_RELAY_SLOTS: usize = 1 << 17;

/// Each worker's kernel relay, as `--kernel-relay` asks and the kernel
/// allows, and the start-up line that says which. Loaded here rather
/// than by the workers so that lb holds all it needs once it listens.
/// A worker whose relay fails to load relays every byte itself.
fn kernel_relays(config: &Config) -> (Vec<Option<redirect::Redirector>>, String) {
    let none = || (0..config.workers).map(|_| None).collect();
    if config.kernel_relay == config::KernelRelay::Never {
        return (none(), "kernel relay: never (every byte passes through lb)".to_string());
    }
    if config.splice == config::SpliceMode::Always {
        // Only pairs that copy join, and with this no direction does.
        return (none(), "kernel relay: off with --splice always (every byte passes through lb)".to_string());
    }
    if !worker::EVENTS_ARE_THE_SESSIONS_OWN {
        // A joined pair learns of its ends from events alone, and these
        // tokens cannot tell them from those of the pair before it.
        return (none(), "kernel relay: off in a 32-bit build (every byte passes through lb)".to_string());
    }
    let slots = config.max_connections.saturating_mul(2).clamp(2, MAX_RELAY_SLOTS) as u32;
    let mut relays = Vec::with_capacity(config.workers);
    for _ in 0..config.workers {
        match redirect::Redirector::new(slots, redirect::BUDGET) {
            Ok(r) => relays.push(Some(r)),
            Err(e) => {
                let note = format!(
                    "kernel relay: cannot load the eBPF program ({e}); every byte passes through lb (it needs \
                     root or CAP_BPF and CAP_NET_ADMIN; --kernel-relay never skips it)"
                );
                relays.resize_with(config.workers, || None);
                return (relays, note);
            }
        }
    }
    let note = format!(
        "kernel relay: pairs that trade small messages move into the kernel after {} short reads each way",
        session::SHORT_READS_TO_JOIN
    );
    (relays, note)
}

fn spawn_workers(
    config: &Config,
    shared: &Arc<Shared>,
    polls: Vec<Poll>,
    listeners: Vec<Vec<std::net::TcpListener>>,
    settings: &WorkerSettings,
    relays: Vec<Option<redirect::Redirector>>,
    events: &mpsc::Sender<Event>,
) -> Result<Vec<JoinHandle<bool>>, RunError> {
    let mut handles = Vec::with_capacity(polls.len());
    for (id, ((poll, ls), relay)) in polls.into_iter().zip(listeners).zip(relays).enumerate() {
        let shared = Arc::clone(shared);
        let settings = settings.clone();
        let events = events.clone();
        let buffer_size = config.buffer_size;
        // Every client may hold two buffers; no worker can hold more clients
        // than the global cap, so this limit never starves a live pair.
        let pool_limit = config.max_connections.saturating_mul(2);
        let capacity = config.max_connections;
        let max_pipes = config.max_pipes;
        // Each worker keeps at most its share of the budget idle, so one
        // worker's spare pipes cannot starve the others for long.
        let idle_pipes = max_pipes.div_ceil(config.workers.max(1));
        let handle = thread::Builder::new()
            .name(format!("lb-worker-{id}"))
            .spawn(move || {
                let buffers = BufferPool::new(buffer_size, pool_limit);
                let pipes = PipePool::new(buffer_size, max_pipes, idle_pipes, &shared.counters.pipes_open);
                let pools = Pools { buffers: &buffers, pipes: &pipes, relay: relay.as_ref() };
                // A failed worker has dropped its listeners, so the kernel
                // hands new clients to the other workers' sockets.
                let ok = match Worker::new(id, poll, ls, &shared, pools, settings, capacity) {
                    Ok(w) => w.run().is_ok(),
                    Err(e) => {
                        error!("worker {id} could not start: {e}");
                        // Its listener is closed: keep the steering program
                        // from choosing it.
                        if let Some(s) = &shared.steering {
                            steer::Tracker::new(s.slot(id)).retire(0);
                        }
                        false
                    }
                };
                // Ignored if the supervisor is gone: so is the process.
                let _ = events.send(Event::WorkerExited);
                ok
            })
            .map_err(RunError::Spawn)?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Waits for signals; on the first SIGTERM/SIGINT drains up to
/// `--drain-timeout`, then stops whatever is left. Returns how many
/// workers failed or panicked.
fn supervise(
    config: &Config,
    shared: &Shared,
    rx: &mpsc::Receiver<Event>,
    handles: Vec<JoinHandle<bool>>,
    notifier: Option<&systemd::Notifier>,
    reporter: &mut stats::Reporter,
) -> usize {
    let mut drain_deadline: Option<Instant> = None;
    let mut exited = 0;
    let mut last_status = usize::MAX;
    let mut next_stats = config.stats_period.map(|p| Instant::now() + p);
    loop {
        if let Some(n) = notifier {
            let active = shared.active_clients();
            if active != last_status {
                last_status = active;
                let _ = n.status(&format!("active connections: {active}"));
            }
        }
        // A thread that just sent WorkerExited may not count as finished
        // yet; join below waits out the instant it has left to run.
        if exited == handles.len() || handles.iter().all(JoinHandle::is_finished) {
            break;
        }
        // Wake for the next report or the drain deadline if either comes
        // before the tick: a shorter --stats-period or --drain-timeout must
        // not be stretched to the tick.
        let now = Instant::now();
        let wait = [next_stats, drain_deadline.filter(|_| !shared.is_stopping())]
            .into_iter()
            .flatten()
            .map(|due| due.saturating_duration_since(now))
            .fold(SUPERVISOR_TICK, Duration::min);
        match rx.recv_timeout(wait) {
            Ok(Event::Signal(Signal::Terminate)) => {
                if drain_deadline.is_some() {
                    warn!("second stop signal: closing all connections now");
                    shared.stop_now();
                } else {
                    info!(
                        "stop signal: no longer accepting; draining {} connections for up to {:?}",
                        shared.active_clients(),
                        config.drain_timeout
                    );
                    shared.begin_drain();
                    if let Some(n) = notifier {
                        let _ = n.stopping();
                    }
                    drain_deadline = Some(Instant::now() + config.drain_timeout);
                }
            }
            Ok(Event::Signal(Signal::ReportStats)) => reporter.report(shared),
            Ok(Event::WorkerExited) => exited += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                thread::sleep(SUPERVISOR_TICK);
            }
        }
        if let (Some(due), Some(period)) = (next_stats, config.stats_period)
            && Instant::now() >= due
        {
            reporter.report(shared);
            // Keep the cadence, but never try to catch up on missed reports.
            let now = Instant::now();
            next_stats = Some(if due + period > now { due + period } else { now + period });
        }
        if let Some(deadline) = drain_deadline
            && Instant::now() >= deadline
            && !shared.is_stopping()
        {
            match shared.active_clients() {
                // The workers were about to stop on their own.
                0 => {}
                open => warn!("drain timeout reached; closing {open} connections still open"),
            }
            shared.stop_now();
        }
    }
    let mut failed = 0;
    for h in handles {
        match h.join() {
            Ok(true) => {}
            Ok(false) => failed += 1,
            Err(_) => {
                error!("a worker thread panicked");
                failed += 1;
            }
        }
    }
    info!("stopped");
    failed
}
