//! The backend table shared by every worker: each backend's address, weight,
//! health flag and atomic counters. Workers only touch atomics here, never a
//! lock, and a [`Lease`] ties one client's use of a backend to its lifetime.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::config::BackendSpec;
use crate::stats::Histogram;

/// One upstream server. Aligned to its own cache lines so that two workers
/// updating two different backends never share a line.
#[repr(align(128))]
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Client pairs currently connected or connecting to this backend.
    pub active: AtomicUsize,
    /// Connections successfully established.
    pub total: AtomicU64,
    /// Connect attempts that failed (refused, timed out, unreachable).
    pub failed: AtomicU64,
    /// Bytes relayed from clients to this backend.
    pub bytes_in: AtomicU64,
    /// Bytes relayed from this backend to clients.
    pub bytes_out: AtomicU64,
    /// Health probes that passed.
    pub checks_ok: AtomicU64,
    /// Health probes that failed (refused, timed out, bad status).
    pub checks_failed: AtomicU64,
    healthy: AtomicBool,
    /// Consecutive connect failures seen on real traffic (passive checks).
    consecutive_failures: AtomicU32,
    /// Time from connect() to an established connection.
    pub connect_time: Histogram,
}

impl Backend {
    pub fn new(spec: &BackendSpec) -> Backend {
        Backend {
            name: spec.name.clone(),
            addr: spec.addr,
            weight: spec.weight,
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            // Backends start as up so traffic flows before the first probe round.
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            connect_time: Histogram::new(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the health flag and reports whether it changed, so the caller
    /// logs a flip exactly once.
    pub fn set_healthy(&self, up: bool) -> bool {
        let was = self.healthy.swap(up, Ordering::AcqRel);
        if up {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        was != up
    }

    pub fn connect_succeeded(&self, took: Duration) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.connect_time.record(took);
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failed connect on real traffic. Returns true when this
    /// failure takes the backend down (`fall` consecutive failures), so the
    /// caller logs the flip once; `fall == 0` disables passive detection.
    pub fn connect_failed(&self, fall: u32) -> bool {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        fall != 0 && n >= fall && self.healthy.swap(false, Ordering::AcqRel)
    }

    pub fn lease(&self) -> Lease<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        Lease { backend: self }
    }
}

/// One client's claim on a backend: counted in `active` while it lives.
#[derive(Debug)]
pub struct Lease<'a> {
    backend: &'a Backend,
}

impl<'a> Lease<'a> {
    pub fn backend(&self) -> &'a Backend {
        self.backend
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        Backend::new(&BackendSpec {
            name: "b".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: 1,
        })
    }

    #[test]
    fn a_lease_counts_as_active_until_dropped() {
        let b = backend();
        let l1 = b.lease();
        let l2 = b.lease();
        assert_eq!(b.active.load(Ordering::Relaxed), 2);
        drop(l1);
        assert_eq!(b.active.load(Ordering::Relaxed), 1);
        drop(l2);
        assert_eq!(b.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn consecutive_connect_failures_take_a_backend_down_once() {
        let b = backend();
        assert!(!b.connect_failed(3));
        assert!(!b.connect_failed(3));
        assert!(b.connect_failed(3), "third failure flips it");
        assert!(!b.connect_failed(3), "already down: no second flip");
        assert!(!b.is_healthy());
        assert_eq!(b.failed.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let b = backend();
        b.connect_failed(2);
        b.connect_succeeded(Duration::from_micros(10));
        assert!(!b.connect_failed(2));
        assert!(b.is_healthy());
    }

    #[test]
    fn fall_zero_disables_passive_detection() {
        let b = backend();
        for _ in 0..10 {
            assert!(!b.connect_failed(0));
        }
        assert!(b.is_healthy());
    }
}
