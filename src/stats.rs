//! Counters and distributions that outlive a single connection: the global
//! counters shared by all workers and the fixed-bucket, allocation-free
//! histogram used for backend connect times. Also the point-in-time
//! [`Snapshot`] every report is made from, and the operators' stats report
//! printed on stdout every `--stats-period` and on SIGUSR1, by a
//! [`Reporter`] thread so a stalled stdout never holds up signals.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use log::{info, warn};

use crate::shared::Shared;

/// Number of log2 buckets over microseconds: bucket i holds samples in
/// (2^i, 2^(i+1)] µs, bucket 0 also holds 0 and 1 µs; the last is
/// open-ended.
pub const BUCKETS: usize = 32;

/// Lock-free histogram of durations; recording is one relaxed add.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_micros: AtomicU64::new(0) }
    }

    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(us, Ordering::Relaxed);
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }
}

/// The first bucket whose upper bound is at least `us`: Prometheus buckets
/// count samples `<= le`, so a sample on a bound belongs below it.
fn bucket_of(us: u64) -> usize {
    // Bucket i holds (2^i, 2^(i+1)]; bucket 0 also holds 0 and 1.
    (64 - us.saturating_sub(1).leading_zeros() as usize).saturating_sub(1).min(BUCKETS - 1)
}

/// Upper bound of bucket `i`, in microseconds.
pub fn bucket_upper_micros(i: usize) -> u64 {
    1u64 << (i + 1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub counts: [u64; BUCKETS],
    pub sum_micros: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), or `None`
    /// with no samples. Bucketed, so it over-reports by at most 2x.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(bucket_upper_micros(i)));
            }
        }
        Some(Duration::from_micros(bucket_upper_micros(BUCKETS - 1)))
    }
}

/// Process-wide counters, shared by all workers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Times a worker paused accepting because the cap was reached.
    pub cap_reached: AtomicU64,
    /// Clients reset at once because no backend was up.
    pub no_backend: AtomicU64,
    /// Clients reset because every connect attempt failed.
    pub connect_gave_up: AtomicU64,
    /// Clients reset after waiting `--connection-timeout` for a descriptor
    /// for their backend socket.
    pub descriptor_wait_timeouts: AtomicU64,
    /// Relay buffer requests refused by an exhausted pool.
    pub pool_exhausted: AtomicU64,
    /// accept() failures other than a client that left first; each backs
    /// the worker off for 100 ms.
    pub accept_errors: AtomicU64,
    /// Pairs closed by the idle timeout.
    pub idle_closed: AtomicU64,
    /// Bytes relayed with splice(2), never entering user memory.
    pub bytes_spliced: AtomicU64,
    /// Bytes relayed by copying through a buffer.
    pub bytes_copied: AtomicU64,
    /// Bytes the kernel relay moved from socket to socket.
    pub bytes_kernel: AtomicU64,
    /// Pipes lent to connections (each worker updates its share once a
    /// second, with the byte counts).
    pub pipes_in_use: AtomicU64,
    /// Relay buffers lent to connections, and allocated in all (each
    /// worker updates its share once a second, as for pipes).
    pub buffers_in_use: AtomicU64,
    pub buffers_allocated: AtomicU64,
    /// Pipes open, lent or idle; bounded by `--max-pipes`. Exact: changed
    /// whenever a pipe is opened or closed.
    pub pipes_open: AtomicU64,
    /// Directions that found splice unsupported and copy instead.
    pub splice_unsupported: AtomicU64,
    /// Times a direction wanted a pipe and none was left, so it copied.
    pub pipes_exhausted: AtomicU64,
}

/// One backend's numbers at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSnapshot {
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub up: bool,
    pub active: usize,
    /// Connections established.
    pub total: u64,
    /// Connect attempts that failed.
    pub failed: u64,
    /// Bytes relayed from clients to the backend.
    pub bytes_in: u64,
    /// Bytes relayed from the backend to clients.
    pub bytes_out: u64,
    pub checks_ok: u64,
    pub checks_failed: u64,
    pub connect_time: HistogramSnapshot,
}

/// Everything a report shows, read once so one report is self-consistent
/// enough; byte counts trail live connections by up to a second, since
/// workers publish them in batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub version: &'static str,
    pub draining: bool,
    pub active: usize,
    pub max_connections: usize,
    pub accepted: u64,
    /// Times a worker stopped accepting at `--max-connections`.
    pub cap_pauses: u64,
    pub no_backend: u64,
    pub connect_gave_up: u64,
    pub descriptor_wait_timeouts: u64,
    pub pool_exhausted: u64,
    pub accept_errors: u64,
    pub idle_closed: u64,
    pub relay: RelaySnapshot,
    /// Each worker's clients, held and queued, as the steering program
    /// counts them; empty when the kernel's hash spreads clients.
    pub worker_loads: Vec<i64>,
    pub backends: Vec<BackendSnapshot>,
}

/// How relayed bytes moved: copied through user memory or spliced through
/// kernel pipes, and what the pipe pools look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelaySnapshot {
    pub bytes_spliced: u64,
    pub bytes_copied: u64,
    pub bytes_kernel: u64,
    /// Relay buffers holding bytes now, and allocated (lent or free), each
    /// worker's as of its last second.
    pub buffers_in_use: u64,
    pub buffers_allocated: u64,
    /// Pipes holding bytes now (each worker's share as of its last second).
    pub pipes_in_use: u64,
    /// Pipes open, lent or idle; at most `--max-pipes`.
    pub pipes_open: u64,
    /// Times a direction wanted a pipe, found none left and copied instead.
    pub pipes_exhausted: u64,
    /// Directions that found splice unsupported and copy for good.
    pub splice_unsupported: u64,
}

impl Snapshot {
    pub fn capture(shared: &Shared) -> Snapshot {
        let c = &shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            draining: shared.is_draining(),
            active: shared.active_clients(),
            max_connections: shared.max_connections(),
            accepted: load(&c.accepted),
            cap_pauses: load(&c.cap_reached),
            no_backend: load(&c.no_backend),
            connect_gave_up: load(&c.connect_gave_up),
            descriptor_wait_timeouts: load(&c.descriptor_wait_timeouts),
            pool_exhausted: load(&c.pool_exhausted),
            accept_errors: load(&c.accept_errors),
            idle_closed: load(&c.idle_closed),
            relay: RelaySnapshot {
                bytes_spliced: load(&c.bytes_spliced),
                bytes_copied: load(&c.bytes_copied),
                bytes_kernel: load(&c.bytes_kernel),
                buffers_in_use: load(&c.buffers_in_use),
                buffers_allocated: load(&c.buffers_allocated),
                pipes_in_use: load(&c.pipes_in_use),
                pipes_open: load(&c.pipes_open),
                pipes_exhausted: load(&c.pipes_exhausted),
                splice_unsupported: load(&c.splice_unsupported),
            },
            worker_loads: shared
                .steering
                .as_ref()
                .map(|st| (0..shared.workers.len()).map(|i| st.slot(i).clients()).collect())
                .unwrap_or_default(),
            backends: shared
                .backends
                .iter()
                .map(|b| BackendSnapshot {
                    name: b.name.clone(),
                    addr: b.addr,
                    weight: b.weight,
                    up: b.is_healthy(),
                    active: b.active.load(Ordering::Relaxed),
                    total: load(&b.total),
                    failed: load(&b.failed),
                    bytes_in: load(&b.bytes_in),
                    bytes_out: load(&b.bytes_out),
                    checks_ok: load(&b.checks_ok),
                    checks_failed: load(&b.checks_failed),
                    connect_time: b.connect_time.snapshot(),
                })
                .collect(),
        }
    }
}

/// The operators' stats report: the historical five-field lines, with
/// bytes and connect-time percentiles appended after `Failed=`.
pub fn render_report(s: &Snapshot) -> String {
    let mut out = String::with_capacity(128 + 192 * s.backends.len());
    out.push_str("=== Load Balancer Stats ===\n");
    let _ = writeln!(out, "Total Active Connections: {}", s.active);
    for (i, b) in s.backends.iter().enumerate() {
        let _ = writeln!(
            out,
            "Backend[{i}] {}: Status={}, Active={}, Total={}, Failed={}, BytesIn={}, BytesOut={}, ConnectP50={}, ConnectP99={}",
            b.name,
            if b.up { "HEALTHY" } else { "UNHEALTHY" },
            b.active,
            b.total,
            b.failed,
            b.bytes_in,
            b.bytes_out,
            millis(b.connect_time.quantile(0.50)),
            millis(b.connect_time.quantile(0.99)),
        );
    }
    out.push_str("============================\n");
    out
}

/// `0.128ms`, or `n/a` before the first sample.
fn millis(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.3}ms", d.as_secs_f64() * 1000.0),
        None => "n/a".to_string(),
    }
}

/// Prints reports on stdout from a thread of its own. A stdout nobody
/// reads (a full pipe) then blocks only that thread, never the one that
/// handles stop signals.
#[derive(Debug)]
pub struct Reporter {
    tx: mpsc::SyncSender<String>,
    skipped: u64,
}

impl Reporter {
    pub fn spawn() -> std::io::Result<Reporter> {
        // One report being written and one waiting; more are skipped.
        let (tx, rx) = mpsc::sync_channel::<String>(1);
        thread::Builder::new().name("lb-stats".into()).spawn(move || {
            for text in rx {
                // One write and a flush, so a reader of a pipe sees the
                // whole report at once. A closed stdout is ignored.
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        })?;
        Ok(Reporter { tx, skipped: 0 })
    }

    /// Hands a report over to be printed, or skips it while stdout is
    /// still taking the earlier ones.
    pub fn report(&mut self, shared: &Shared) {
        match self.tx.try_send(render_report(&Snapshot::capture(shared))) {
            Ok(()) if self.skipped > 0 => {
                info!("stdout is being read again; {} stats reports were skipped", self.skipped);
                self.skipped = 0;
            }
            Ok(()) | Err(mpsc::TrySendError::Disconnected(_)) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                if self.skipped == 0 {
                    warn!("stdout is not being read; stats reports are skipped until it is");
                }
                self.skipped += 1;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn samples_land_in_log2_buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 0);
        assert_eq!(bucket_of(3), 1);
        assert_eq!(bucket_of(4), 1);
        assert_eq!(bucket_of(5), 2);
        assert_eq!(bucket_of(1024), 9);
        assert_eq!(bucket_of(1025), 10);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn a_sample_on_a_bucket_bound_is_counted_at_or_below_that_bound() {
        for us in [1u64, 2, 3, 4, 1000, 1024, 1025, 65_536, 1 << 31] {
            let i = bucket_of(us);
            assert!(us <= bucket_upper_micros(i), "{us} µs in bucket le={}", bucket_upper_micros(i));
            assert!(i == 0 || us > bucket_upper_micros(i - 1), "{us} µs could sit in bucket {}", i - 1);
        }
    }

    #[test]
    fn quantiles_come_from_the_bucket_bounds() {
        let h = Histogram::new();
        for _ in 0..98 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_millis(10));
        h.record(Duration::from_millis(10));
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.quantile(0.5), Some(Duration::from_micros(128)));
        assert_eq!(s.quantile(0.99), Some(Duration::from_micros(16384)));
        assert_eq!(s.sum_micros, 98 * 100 + 2 * 10_000);
    }

    #[test]
    fn an_empty_histogram_has_no_quantiles() {
        assert_eq!(Histogram::new().snapshot().quantile(0.5), None);
    }

    fn backend(name: &str, up: bool) -> BackendSnapshot {
        BackendSnapshot {
            name: name.into(),
            addr: name.parse().unwrap(),
            weight: 1,
            up,
            active: 0,
            total: 0,
            failed: 0,
            bytes_in: 0,
            bytes_out: 0,
            checks_ok: 0,
            checks_failed: 0,
            connect_time: Histogram::new().snapshot(),
        }
    }

    pub(crate) fn sample_snapshot() -> Snapshot {
        let h = Histogram::new();
        for _ in 0..99 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_millis(10));
        let mut a = backend("127.0.0.1:8080", true);
        a.active = 22;
        a.total = 1205;
        a.failed = 3;
        a.bytes_in = 1000;
        a.bytes_out = 20000;
        a.checks_ok = 7;
        a.checks_failed = 1;
        a.connect_time = h.snapshot();
        let mut b = backend("127.0.0.1:8081", false);
        b.total = 892;
        b.failed = 15;
        Snapshot {
            version: "0.1.0",
            draining: false,
            active: 45,
            max_connections: 1000,
            accepted: 2112,
            cap_pauses: 4,
            no_backend: 2,
            connect_gave_up: 1,
            descriptor_wait_timeouts: 6,
            pool_exhausted: 0,
            accept_errors: 0,
            idle_closed: 5,
            relay: RelaySnapshot {
                bytes_spliced: 7_000_000,
                bytes_copied: 21_000,
                bytes_kernel: 450_000,
                buffers_in_use: 2,
                buffers_allocated: 12,
                pipes_in_use: 3,
                pipes_open: 6,
                pipes_exhausted: 9,
                splice_unsupported: 1,
            },
            worker_loads: vec![3, 4],
            backends: vec![a, b],
        }
    }

    #[test]
    fn the_report_keeps_the_operators_shape_with_a_tail_after_failed() {
        let text = render_report(&sample_snapshot());
        let expected = "=== Load Balancer Stats ===\n\
Total Active Connections: 45\n\
Backend[0] 127.0.0.1:8080: Status=HEALTHY, Active=22, Total=1205, Failed=3, BytesIn=1000, BytesOut=20000, ConnectP50=0.128ms, ConnectP99=0.128ms\n\
Backend[1] 127.0.0.1:8081: Status=UNHEALTHY, Active=0, Total=892, Failed=15, BytesIn=0, BytesOut=0, ConnectP50=n/a, ConnectP99=n/a\n\
============================\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_snapshot_reads_the_shared_table() {
        use crate::config::BackendSpec;
        let spec = BackendSpec { name: "b:1".into(), addr: "127.0.0.1:1".parse().unwrap(), weight: 2 };
        let poll = mio::Poll::new().expect("poll");
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
        let shared = Shared::new(crate::backend::table(&[spec]), 10, vec![waker]);
        shared.counters.accepted.fetch_add(3, Ordering::Relaxed);
        shared.backends[0].connect_succeeded(Duration::from_micros(50));
        shared.backends[0].checks_failed.fetch_add(2, Ordering::Relaxed);
        let _slot = shared.try_acquire_client();
        let s = Snapshot::capture(&shared);
        assert_eq!((s.active, s.accepted, s.max_connections), (1, 3, 10));
        let b = &s.backends[0];
        assert_eq!((b.name.as_str(), b.weight, b.up, b.total), ("b:1", 2, true, 1));
        assert_eq!((b.checks_ok, b.checks_failed), (0, 2));
        assert_eq!(b.connect_time.count(), 1);
    }
}
